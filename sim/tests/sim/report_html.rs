//! `nsx-sim run --html`: the page is written for passing and failing runs, holds what it
//! promises (timeline, topology, checks, the failure and its replay command), fetches nothing,
//! and renders in a real browser (Debian's headless Chromium) without a script error. Needs
//! `chromium` (scripts/test.sh installs it): it fails, it does not skip, without it.

use std::path::Path;
use std::process::Command;

fn suite() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

/// The DOM after the page's scripts ran, as headless Chromium dumps it.
fn rendered(page: &Path) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--dump-dom",
        ])
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("Debian's chromium runs (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_html_report_renders_in_a_browser_with_the_failure_and_its_replay() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("report-html-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A scenario that fails on purpose (a connection the policy-free cluster allows is
    // expected blocked), beside two bundled ones.
    let failing = dir.join("fails.yaml");
    std::fs::write(
        &failing,
        "name: fails-on-purpose\nsteps:\n  - apply: |\n      apiVersion: v1\n      kind: Namespace\n      metadata: {name: a}\n      ---\n      apiVersion: v1\n      kind: Pod\n      metadata: {name: p, namespace: a}\n      spec: {containers: [{name: c, image: x}]}\n      ---\n      apiVersion: v1\n      kind: Pod\n      metadata: {name: q, namespace: a}\n      spec: {containers: [{name: c, image: x}]}\n  - converge: {within: 60s}\n  - expect:\n      connectivity: [{from: a/p, to: a/q, port: 80, allowed: false}]\n",
    )
    .unwrap();
    let page = dir.join("report.html");
    let out = Command::new(env!("CARGO_BIN_EXE_nsx-sim"))
        .arg("run")
        .arg(suite().join("nsx-storms.yaml"))
        .arg(suite().join("nodeport.yaml"))
        .arg(&failing)
        .args(["--seeds", "1..3", "--html"])
        .arg(&page)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "a failing pair exits 1");
    let html = std::fs::read_to_string(&page).expect("the page is written");
    // Self-contained: no script, style, image or frame from anywhere.
    for fetch in ["src=", "href=\"http", "url(", "@import", "<link"] {
        assert!(!html.contains(fetch), "the page fetches something: {fetch}");
    }
    // What it promises, for the first seed of each scenario and the failing ones.
    for want in [
        "<svg",
        "NSX/s",
        "fault in force",
        "tier-0 ",
        "switch k8s-a-shop",
        "Connectivity checked",
        "Failure at step 3",
        "a/p -&gt; a/q",
        "--seed 2 --print-trace",
        "NSX answers 503", // nsx-storms' faults on its timeline
    ] {
        assert!(html.contains(want), "the page lacks {want:?}");
    }
    // Every seed of the failing scenario has its page; passing scenarios only their first.
    assert_eq!(html.matches("<details class=\"seed failed\"").count(), 2);
    assert_eq!(html.matches("<details class=\"seed\"").count(), 2);
    let dom = rendered(&page);
    assert!(
        dom.contains("data-ready=\"1\""),
        "the page's script did not finish"
    );
    assert!(
        !dom.contains("data-script-error"),
        "a script error: {}",
        dom.split("data-script-error=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("")
    );
    // The script counted the seed pages it shows.
    assert!(
        dom.contains("<span id=\"shown\">4</span>"),
        "the seed count"
    );
}
