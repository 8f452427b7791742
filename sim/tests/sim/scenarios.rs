//! The scenario engine: the bundled suite parses, runs are deterministic, failures are
//! reported with their step and replay to the same failure, bad files are refused with their
//! line, and the CLI keeps its contract (exit codes, JSON report, shards, dumps a real OVS
//! accepts).

use std::path::{Path, PathBuf};
use std::process::Command;

use nsx_sim::scenario::run::{RunOptions, run};
use nsx_sim::scenario::spec::{Scenario, load, parse};

fn suite() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

fn scenario(name: &str) -> Scenario {
    load(&suite().join(format!("{name}.yaml"))).expect("bundled scenario loads")
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nsx-sim"))
}

#[test]
fn every_bundled_scenario_is_valid_and_names_are_unique() {
    let mut names = std::collections::BTreeSet::new();
    let mut n = 0;
    for e in std::fs::read_dir(suite()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            let s = load(&p).unwrap_or_else(|e| panic!("{e}"));
            assert!(names.insert(s.name.clone()), "duplicate name {}", s.name);
            assert!(!s.steps.is_empty());
            n += 1;
        }
    }
    assert!(n >= 14, "only {n} scenarios");
}

#[test]
fn the_same_scenario_and_seed_give_the_same_trace() {
    for name in ["services", "ncp-crash", "nsx-storms", "node-restarts"] {
        let s = scenario(name);
        let (a, _) = run(&s, 5, &RunOptions::default());
        let (b, _) = run(&s, 5, &RunOptions::default());
        assert!(a.passed, "{name}: {:?}", a.message);
        assert_eq!(a.trace_hash, b.trace_hash, "{name}");
        assert_eq!(a.trace, b.trace, "{name}");
        assert_eq!(a.sim_time_ms, b.sim_time_ms);
        assert_eq!(a.nsx_requests.total, b.nsx_requests.total);
        let (c, _) = run(&s, 6, &RunOptions::default());
        assert_ne!(
            a.trace_hash, c.trace_hash,
            "{name}: seeds 5 and 6 ran identically"
        );
    }
}

const FAILING: &str = r#"
name: wrong-expectation
cluster: {nodes: 2}
steps:
  - apply: |
      apiVersion: v1
      kind: Namespace
      metadata: {name: a}
      ---
      apiVersion: v1
      kind: Pod
      metadata: {name: p, namespace: a}
      spec: {containers: [{name: c, image: x}]}
      ---
      apiVersion: v1
      kind: Pod
      metadata: {name: q, namespace: a}
      spec: {containers: [{name: c, image: x}]}
  - converge: {within: 30s}
  - expect:
      connectivity:
        - {from: a/p, to: a/q, port: 80, allowed: false}
"#;

#[test]
fn a_failure_names_its_step_and_replays_to_the_same_failure() {
    let s = parse(Path::new("inline.yaml"), FAILING).unwrap();
    let (a, _) = run(&s, 3, &RunOptions::default());
    assert!(!a.passed);
    assert_eq!(a.failed_step.as_deref(), Some("3 (line 20, expect)"));
    let m = a.message.clone().unwrap();
    assert!(
        m.contains("a/p -> a/q TCP 80: expected blocked, it connects"),
        "{m}"
    );
    let (b, _) = run(&s, 3, &RunOptions::default());
    assert_eq!(a.message, b.message);
    assert_eq!(a.trace_hash, b.trace_hash);
}

/// (scenario text, the line the error must name, text the message must contain)
const BAD: &[(&str, u64, &str)] = &[
    (
        "name: x\nsteps:\n  - expect:\n      pods: [{pod: svc/a/b, ready: true}]\n",
        3,
        "`svc/a/b` is not a pod",
    ),
    (
        "name: x\nsteps:\n  - expect:\n      pods: [{pod: a/b, min_restarts: 2, max_restarts: 1}]\n",
        3,
        "min_restarts 2 is above max_restarts 1",
    ),
    (
        "name: x\nsteps:\n  - expect:\n      pods: [{pod: a/b, restarts: 1}]\n",
        0,
        "restarts",
    ),
    (
        "name: x\nsteps:\n  - expect:\n      connectivity: [{from: a/b, to: node/node-1, port: 30080, allowed: false, client_ip_kept: true}]\n",
        3,
        "`client_ip_kept` needs `allowed: true`",
    ),
    ("name: x\nstepz: []\n", 2, "stepz"),
    ("name: x\nsteps:\n  - wait: 5 parsecs\n", 3, "parsecs"),
    ("name: x\nsteps:\n  - frobnicate: 1\n", 3, "frobnicate"),
    (
        "name: x\nsteps:\n  - fault: {crash: node-9}\n",
        3,
        "`node-9` is not a host",
    ),
    (
        "name: x\nsteps:\n  - apply: |\n      apiVersion: v1\n      kind: Namespace\n      metadata: {name: a, labelz: {}}\n",
        4,
        "unknown field `metadata.labelz`",
    ),
    (
        "name: x\nsteps:\n  - apply: |\n      apiVersion: v1\n      kind: Namespace\n      metadata: {name: a}\n      ---\n      apiVersion: v1\n      kind: Pod\n      metadata: {name: p, namespace: a}\n      spec: {containers: [{name: c, image: x, portz: []}]}\n",
        8,
        "spec.containers[0].portz",
    ),
    (
        "name: x\nsteps:\n  - apply: |\n      apiVersion: apps/v1\n      kind: StatefulSet\n      metadata: {name: a}\n",
        4,
        "kind `StatefulSet` is not supported",
    ),
    (
        "name: x\nsteps:\n  - expect:\n      reachability: {port: 80, table: \"-  a/b\\na/b . X\\n\"}\n",
        3,
        "has 2 cells for 1 columns",
    ),
    (
        "name: x\nsteps:\n  - expect:\n      nsx: {count: {Router: 1}}\n",
        3,
        "`Router` is not one of",
    ),
    (
        "name: x\nsteps:\n  - apply_file: nowhere.yaml\n",
        3,
        "nowhere.yaml",
    ),
    // A device is not a manifest: reading /dev/zero would never end.
    (
        "name: x\nsteps:\n  - apply_file: /dev/zero\n",
        3,
        "/dev/zero: not a regular file",
    ),
    (
        "name: x\ncluster: {nodes: 2, subnet_prefix: 12}\nsteps: []\n",
        2,
        "subnet_prefix 12",
    ),
    // A huge node count is refused before any node name is made (it used to exhaust memory).
    (
        "name: x\ncluster: {nodes: 100000000000}\nsteps: []\n",
        2,
        "1 to 1000 nodes, not 100000000000",
    ),
    (
        "name: x\ncluster:\n  name: k\n  # a comment\n\n  nodes: 0\nsteps: []\n",
        6,
        "1 to 1000 nodes, not 0",
    ),
    (
        "name: x\ncluster:\n  nodes: [node-1, ncp]\n  ip_block: 10.4.0.0/16\nsteps: []\n",
        3,
        "`ncp` is not a usable node name",
    ),
    (
        "name: x\ncluster:\n  nodes: 2\n  snat_pool: 192.0.2.0/33\nsteps: []\n",
        4,
        "cluster.snat_pool",
    ),
    (
        "name: x\ncluster:\n  nodes: 2\n  ncp_replicas: 7\nsteps: []\n",
        4,
        "ncp_replicas must be 1, 2 or 3",
    ),
    (
        "name: x\nsteps:\n  - heal: everything\n",
        3,
        "neither `all` nor a fault",
    ),
];

#[test]
fn bad_scenarios_are_refused_with_file_line_and_key() {
    for (text, line, needle) in BAD {
        let e = parse(Path::new("bad.yaml"), text).expect_err(text);
        let shown = e.to_string();
        assert!(shown.starts_with("bad.yaml"), "{shown}");
        if *line > 0 {
            assert_eq!(e.line, Some(*line), "{text}: {shown}");
        }
        assert!(shown.contains(needle), "{text}: {shown}");
    }
}

#[test]
fn cli_exit_codes_json_report_and_shards() {
    let dir = std::env::temp_dir().join(format!("nsx-sim-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let failing = dir.join("failing.yaml");
    std::fs::write(&failing, FAILING).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "name: x\nsteps:\n  - wait: soon\n").unwrap();
    let good = suite().join("pod-lifecycle.yaml");

    let out = bin()
        .args(["run", good.to_str().unwrap(), "--seeds", "1..3", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["passed"], 2);
    assert_eq!(v["failed"], 0);
    let seed = &v["scenarios"][0]["seeds"][0];
    for k in [
        "seed",
        "passed",
        "failed_step",
        "message",
        "sim_time_ms",
        "wall_ms",
        "trace_hash",
    ] {
        assert!(seed.get(k).is_some(), "{k} missing in {seed}");
    }
    assert!(seed["nsx_requests"]["total"].as_u64().unwrap() > 0);
    assert!(seed["nsx_requests"]["by_status"].is_object());

    let out = bin()
        .args(["run", failing.to_str().unwrap(), "--seed", "4"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("seed 4: step 3 (line 20, expect)"), "{text}");
    assert!(
        text.contains(&format!("run {} --seed 4", failing.display())),
        "{text}"
    );

    let out = bin().args(["run", bad.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.yaml:3"));
    let out = bin()
        .args(["check", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // Seed ranges: refused with a message, never a panic or an attempt to allocate them;
    // the largest seed is a seed.
    for (range, needle) in [
        ("5..2", "is empty"),
        ("3..3", "is empty"),
        ("0..0", "is empty"),
        (
            "0..18446744073709551615",
            "names 18446744073709551615 seeds",
        ),
        (
            "0..=18446744073709551615",
            "names 18446744073709551616 seeds",
        ),
        ("1..x", "bad end"),
        ("7", "takes A..B or A..=B"),
    ] {
        let out = bin()
            .args(["run", good.to_str().unwrap(), "--seeds", range])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{range}: {err}");
        assert!(err.contains(needle), "{range}: {err}");
    }
    let out = bin()
        .args(["spine", "--seeds", "0..100000000000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 1000000"));
    let out = bin()
        .args([
            "run",
            good.to_str().unwrap(),
            "--seeds",
            "18446744073709551615..=18446744073709551615",
            "--json",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["scenarios"][0]["seeds"][0]["seed"], u64::MAX);

    // Shards are disjoint and together cover every (scenario, seed) pair.
    let mut seen = Vec::new();
    for k in 1..=3 {
        let out = bin()
            .args([
                "run",
                good.to_str().unwrap(),
                "--seeds",
                "1..6",
                "--shard",
                &format!("{k}/3"),
                "--json",
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for s in v["scenarios"][0]["seeds"].as_array().unwrap() {
            seen.push(s["seed"].as_u64().unwrap());
        }
    }
    seen.sort();
    assert_eq!(seen, vec![1, 2, 3, 4, 5]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dump_ovs_prints_flows_a_real_ovs_accepts() {
    let out = bin()
        .args([
            "dump",
            suite().join("services.yaml").to_str().unwrap(),
            "--at",
            "2",
            "--ovs",
            "node-1",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let flows: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains("actions=") && !l.starts_with(" group_id") && !l.starts_with("group_id")
        })
        .collect();
    let groups: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("group_id"))
        .collect();
    assert!(flows.len() > 20, "{text}");
    assert!(!groups.is_empty(), "{text}");
    // Our own parser reads the dump back...
    for f in &flows {
        nsx_core::ovs::parse::parse_flow(f).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    // ... and a real ovs-vswitchd takes every group and flow.
    let sb = fake_ovs::real::Sandbox::start("simdump");
    for g in &groups {
        sb.ofctl_ok("OpenFlow15", "add-group", g.trim());
    }
    for f in &flows {
        let f = f.trim();
        // add-flow takes the flow without the dump's statistics.
        let stripped: String = f
            .split(", ")
            .filter(|p| {
                !p.starts_with("duration=")
                    && !p.starts_with("n_packets=")
                    && !p.starts_with("n_bytes=")
            })
            .collect::<Vec<_>>()
            .join(", ");
        sb.ofctl_ok("OpenFlow15", "add-flow", &stripped);
    }
}

#[test]
fn check_accepts_the_suite() {
    let out = bin()
        .args(["check", suite().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).lines().count() >= 14);
}

/// A built-in world is a scenario: its printed text, run from a file, gives the same trace as
/// the command, and the command's report has the same shape as `run`'s.
#[test]
fn a_built_in_world_printed_and_run_from_a_file_replays_the_same_trace() {
    let dir = std::env::temp_dir().join(format!("nsx-sim-preset-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ncp-storm.yaml");
    let text = bin()
        .args(["ncp", "--replicas", "2", "--print-scenario"])
        .output()
        .unwrap();
    assert!(text.status.success());
    std::fs::write(&file, &text.stdout).unwrap();
    let hash = |out: std::process::Output| -> String {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let seed = &v["scenarios"][0]["seeds"][0];
        assert!(
            seed["ncp_client"]["requests"].as_u64().unwrap() > 0,
            "{seed}"
        );
        seed["trace_hash"].as_str().unwrap().to_string()
    };
    let from_command = hash(
        bin()
            .args(["ncp", "--replicas", "2", "--seed", "3", "--json"])
            .output()
            .unwrap(),
    );
    let from_file = hash(
        bin()
            .args(["run", file.to_str().unwrap(), "--seed", "3", "--json"])
            .output()
            .unwrap(),
    );
    assert_eq!(from_command, from_file);
    std::fs::remove_dir_all(&dir).ok();
}

/// The bundled suite's golden snapshots, checked by insta: every `snapshot` step of every
/// bundled scenario, run to that step with the scenario's seed, renders what its file holds.
/// (`nsx-sim run` checks the same files; `cargo insta review` accepts a changed one.)
#[test]
fn the_bundled_snapshots_hold_under_insta() {
    use nsx_sim::scenario::spec::StepKind;
    let mut checked = 0;
    let mut files: Vec<PathBuf> = std::fs::read_dir(suite())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for f in files {
        let sc = load(&f).unwrap();
        for (i, step) in sc.steps.iter().enumerate() {
            let StepKind::Snapshot(label) = &step.kind else {
                continue;
            };
            let (r, w) = run(
                &sc,
                sc.seed.unwrap_or(1),
                &RunOptions {
                    stop_after: Some(i + 1),
                    update_snapshots: false,
                    ..RunOptions::default()
                },
            );
            assert!(r.passed, "{}: {:?}", sc.name, r.message);
            let rendered = nsx_sim::scenario::snapshot::render(&w.expect("a world"));
            insta::with_settings!({
                snapshot_path => suite().join("snapshots"),
                prepend_module_to_snapshot => false,
            }, {
                insta::assert_snapshot!(format!("{}__{label}", sc.name), rendered);
            });
            checked += 1;
        }
    }
    assert!(checked >= 3, "the suite has snapshot steps: {checked}");
}

/// `--update-snapshots` writes an insta file (header, then the snapshot); a run without it
/// then passes, and a changed snapshot fails naming the file's line.
#[test]
fn update_snapshots_writes_insta_files_that_later_runs_check() {
    let dir = std::env::temp_dir().join(format!("nsx-sim-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("snap.yaml");
    std::fs::write(
        &file,
        "name: snap\nsteps:\n  - apply: |\n      apiVersion: v1\n      kind: Namespace\n      metadata: {name: a}\n  - converge: {within: 60s}\n  - snapshot: one\n",
    )
    .unwrap();
    let run_it = |update: bool| {
        let mut c = bin();
        c.args(["run", file.to_str().unwrap(), "--seed", "2"]);
        if update {
            c.arg("--update-snapshots");
        }
        c.output().unwrap()
    };
    let missing = run_it(false);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stdout).contains("does not exist"));
    assert!(run_it(true).status.success());
    let snap = dir.join("snapshots/snap__one.snap");
    let text = std::fs::read_to_string(&snap).unwrap();
    assert!(
        text.starts_with("---\nsource: ") && text.contains("\nexpression: snapshot one\n---\n# "),
        "{text}"
    );
    assert!(run_it(false).status.success());
    std::fs::write(
        &snap,
        text.replacen("LogicalSwitch", "LogicalSwitcheroo", 1),
    )
    .unwrap();
    let changed = run_it(false);
    assert_eq!(changed.status.code(), Some(1));
    let out = String::from_utf8_lossy(&changed.stdout);
    let line = text
        .lines()
        .position(|l| l.contains("LogicalSwitch"))
        .unwrap()
        + 1;
    assert!(out.contains(&format!("differs at line {line}:")), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A case the scenario state machine found (`cases/pod-back-on-another-node.yaml`): a pod
/// deleted while one node's kubelet waited on its ADD comes back under its name on another
/// node. The waiting agent must not wire the new pod's network (another node's VLAN) on its
/// node, where it replaced a neighbour's uplink flow and cut that pod off.
#[test]
fn a_pod_back_on_another_node_is_not_wired_on_the_old_one() {
    let f =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sim/cases/pod-back-on-another-node.yaml");
    let sc = load(&f).unwrap_or_else(|e| panic!("{e}"));
    let (r, _) = run(&sc, 555_397, &RunOptions::default());
    assert!(r.passed, "{:?}: {:?}", r.failed_step, r.message);
}

/// `(scenario, seed) -> (passed, failure, trace_hash)` of a `--json` report.
fn verdicts(
    report: &serde_json::Value,
) -> std::collections::BTreeMap<(String, u64), (bool, String, String)> {
    let mut out = std::collections::BTreeMap::new();
    for s in report["scenarios"].as_array().expect("scenarios") {
        for r in s["seeds"].as_array().expect("seeds") {
            out.insert(
                (
                    s["name"].as_str().unwrap().to_string(),
                    r["seed"].as_u64().unwrap(),
                ),
                (
                    r["passed"].as_bool().unwrap(),
                    r["failure"].as_str().unwrap_or("").to_string(),
                    r["trace_hash"].as_str().unwrap_or("").to_string(),
                ),
            );
        }
    }
    out
}

#[test]
fn a_pair_that_panics_or_overruns_fails_alone_and_the_rest_run_on() {
    let files = [
        suite().join("nsx-restart.yaml"),
        suite().join("snat-disabled.yaml"),
    ];
    let run = |inject: Option<&str>, html: Option<&Path>| {
        let mut c = bin();
        c.arg("run").args(&files).args([
            "--seeds",
            "1..5",
            "--json",
            "--jobs",
            "2",
            "--pair-timeout",
            "3",
        ]);
        if let Some(h) = html {
            c.arg("--html").arg(h);
        }
        match inject {
            Some(i) => c.env("NSX_SIM_INJECT", i),
            None => c.env_remove("NSX_SIM_INJECT"),
        };
        let out = c.output().unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), report)
    };
    let (code, clean) = run(None, None);
    assert_eq!(code, Some(0), "{clean}");
    let clean = verdicts(&clean);
    assert_eq!(clean.len(), 8);
    let page = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("isolation-{}.html", std::process::id()));
    let (code, hurt) = run(
        Some("panic@nsx-restart#2,stall@snat-disabled#3"),
        Some(&page),
    );
    assert_eq!(code, Some(1), "a failed pair makes the run exit 1");
    let got = verdicts(&hurt);
    for (k, (passed, failure, hash)) in &got {
        match (k.0.as_str(), k.1) {
            ("nsx-restart", 2) => assert_eq!((*passed, failure.as_str()), (false, "panic")),
            ("snat-disabled", 3) => assert_eq!((*passed, failure.as_str()), (false, "timeout")),
            _ => assert_eq!(
                (passed, failure, hash),
                (&clean[k].0, &clean[k].1, &clean[k].2),
                "{k:?} changed beside the failed pairs"
            ),
        }
    }
    assert_eq!(got.len(), 8, "every pair is reported");
    let entry = |name: &str, seed: u64| {
        hurt["scenarios"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .and_then(|s| {
                s["seeds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|r| r["seed"] == seed)
            })
            .cloned()
            .unwrap()
    };
    let p = entry("nsx-restart", 2);
    assert!(
        p["message"].as_str().unwrap().contains("injected panic"),
        "{p}"
    );
    assert_eq!(p["failed_step"], "setup", "{p}");
    let t = entry("snat-disabled", 3);
    assert!(
        t["message"].as_str().unwrap().contains("--pair-timeout"),
        "{t}"
    );
    assert!(
        t["failed_step"].as_str().unwrap().starts_with("1 (line"),
        "{t}"
    );
    // The page is written too, with both failures and their replay commands.
    let html = std::fs::read_to_string(&page).expect("the --html page");
    assert!(html.contains("panicked: injected panic"));
    assert!(html.contains("snat-disabled.yaml --seed 3 --print-trace"));
}
