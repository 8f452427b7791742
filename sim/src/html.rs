//! The report of a run as one self-contained HTML page (`nsx-sim run --html FILE`): no
//! network fetch, no external file; inline CSS, SVG and a few lines of script. Per scenario its
//! seeds' verdicts; for the first seed of each scenario and every failing seed, a timeline
//! (steps, faults in force, converge durations, NSX requests per second by status and writes),
//! the NSX topology NCP built, every connectivity check and reachability matrix with its
//! answer, and for a failure the step, the message and the replay command.

use std::fmt::Write;

use crate::scenario::detail::{Detail, TopoNode};
use crate::scenario::run::SeedReport;

/// One scenario's seeds as the page shows them: the report and its replay command.
pub struct ScenarioRuns<'a> {
    pub name: &'a str,
    pub file: String,
    pub seeds: Vec<(&'a SeedReport, String)>,
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#fafbfc}
h1{font-size:1.4em;margin:0 0 .3em} h2{font-size:1.15em;margin:1.4em 0 .4em}
h3{font-size:1em;margin:1em 0 .3em}
table{border-collapse:collapse;margin:.3em 0} td,th{border:1px solid #d5d9e0;padding:2px 6px;text-align:left}
th{background:#eef1f5} .pass{color:#1a7f37} .fail{color:#c62828;font-weight:600}
.seed{border:1px solid #d5d9e0;border-radius:6px;background:#fff;margin:.6em 0;padding:.2em .8em}
.seed.failed{border-color:#c62828} summary{cursor:pointer;padding:.3em 0}
pre{background:#f3f4f6;padding:.5em;white-space:pre-wrap;word-break:break-word;max-height:24em;overflow:auto}
code{background:#f3f4f6;padding:1px 4px} .bad{background:#fde2e2} .legend span{margin-right:1em}
.matrix td{text-align:center;min-width:2.2em} ul.topo{margin:.2em 0 .2em 1em;padding-left:1em}
.chip{display:inline-block;padding:0 .5em;border-radius:3px;margin-right:.3em}
";

const SCRIPT: &str = "
window.addEventListener('error', function (e) {
  document.body.dataset.scriptError = String(e.message || e);
});
(function () {
  var only = document.getElementById('failing-only');
  var count = document.getElementById('shown');
  function apply() {
    var shown = 0;
    document.querySelectorAll('.seed').forEach(function (el) {
      var hide = only.checked && !el.classList.contains('failed');
      el.style.display = hide ? 'none' : '';
      if (!hide) { shown += 1; }
    });
    count.textContent = String(shown);
  }
  only.addEventListener('change', apply);
  apply();
  document.body.dataset.ready = '1';
})();
";

/// The whole page.
pub fn page(title: &str, runs: &[ScenarioRuns<'_>]) -> String {
    let (mut passed, mut failed) = (0, 0);
    for r in runs {
        for (s, _) in &r.seeds {
            if s.passed {
                passed += 1;
            } else {
                failed += 1;
            }
        }
    }
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>",
        esc(title)
    );
    let _ = write!(
        h,
        "<h1>{}</h1><p><span class=\"pass\">{passed} passed</span>, \
         <span class=\"{}\">{failed} failed</span> (scenario, seed) pairs; nsx-sim {}. \
         <label><input type=\"checkbox\" id=\"failing-only\"> failing seeds only</label> \
         (<span id=\"shown\">0</span> seed pages shown)</p>",
        esc(title),
        if failed > 0 { "fail" } else { "pass" },
        env!("CARGO_PKG_VERSION")
    );
    h.push_str("<table><tr><th>scenario</th><th>seeds</th><th>passed</th><th>simulated per seed</th><th>NSX requests per seed</th></tr>");
    for r in runs {
        let ok = r.seeds.iter().filter(|(s, _)| s.passed).count();
        let n = r.seeds.len().max(1) as u64;
        let sim: u64 = r.seeds.iter().map(|(s, _)| s.sim_time_ms).sum::<u64>() / n;
        let reqs: u64 = r
            .seeds
            .iter()
            .map(|(s, _)| s.nsx_requests.total)
            .sum::<u64>()
            / n;
        let _ = write!(
            h,
            "<tr><td><a href=\"#{}\">{}</a></td><td>{}</td><td class=\"{}\">{ok}</td><td>{:.1} s</td><td>{reqs}</td></tr>",
            esc(r.name),
            esc(r.name),
            r.seeds.len(),
            if ok == r.seeds.len() { "pass" } else { "fail" },
            sim as f64 / 1000.0
        );
    }
    h.push_str("</table>");
    for r in runs {
        let _ = write!(
            h,
            "<h2 id=\"{}\">{} <small>({})</small></h2>",
            esc(r.name),
            esc(r.name),
            esc(&r.file)
        );
        let failing: Vec<String> = r
            .seeds
            .iter()
            .filter(|(s, _)| !s.passed)
            .map(|(s, _)| s.seed.to_string())
            .collect();
        if !failing.is_empty() {
            let _ = write!(
                h,
                "<p class=\"fail\">failing seeds: {}</p>",
                failing.join(", ")
            );
        }
        for (s, replay) in &r.seeds {
            // A pair that panicked has no detail, but its failure is shown.
            if s.detail.is_some() || !s.passed {
                seed_section(&mut h, s, replay, s.detail.as_deref());
            }
        }
    }
    let _ = write!(h, "<script>{SCRIPT}</script></body></html>");
    h
}

fn seed_section(h: &mut String, s: &SeedReport, replay: &str, d: Option<&Detail>) {
    let _ = write!(
        h,
        "<details class=\"seed{}\"{}><summary>seed {} — <span class=\"{}\">{}</span>, {:.1} s simulated, {} NSX requests ({} writes), {} pods</summary>",
        if s.passed { "" } else { " failed" },
        if s.passed { "" } else { " open" },
        s.seed,
        if s.passed { "pass" } else { "fail" },
        if s.passed { "passed" } else { "FAILED" },
        s.sim_time_ms as f64 / 1000.0,
        s.nsx_requests.total,
        s.nsx_requests.writes,
        s.pods
    );
    if !s.passed {
        let how = match s.failure.as_deref() {
            Some("panic") => " (the pair panicked)",
            Some("timeout") => " (past --pair-timeout)",
            _ => "",
        };
        let _ = write!(
            h,
            "<h3>Failure at step {}{how}</h3><pre>{}</pre><p>Replay: <code>{}</code></p>",
            esc(s.failed_step.as_deref().unwrap_or("?")),
            esc(s.message.as_deref().unwrap_or("")),
            esc(replay)
        );
    }
    let Some(d) = d else {
        h.push_str("</details>");
        return;
    };
    h.push_str("<h3>Timeline</h3>");
    timeline(h, d, s.sim_time_ms);
    let converges: Vec<String> = d
        .steps
        .iter()
        .filter(|st| st.kind == "converge")
        .map(|st| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{:.2} s</td></tr>",
                st.line,
                st.start_ms as f64 / 1000.0,
                (st.end_ms - st.start_ms) as f64 / 1000.0
            )
        })
        .collect();
    if !converges.is_empty() {
        let _ = write!(
            h,
            "<h3>Converge</h3><table><tr><th>line</th><th>started (s)</th><th>took</th></tr>{}</table>",
            converges.join("")
        );
    }
    let statuses: Vec<String> = s
        .nsx_requests
        .by_status
        .iter()
        .map(|(st, n)| format!("{st}: {n}"))
        .collect();
    let _ = write!(
        h,
        "<p>NSX answers by status: {}</p>",
        esc(&statuses.join(", "))
    );
    if !d.connectivity.is_empty() {
        h.push_str("<h3>Connectivity checked</h3><table><tr><th>at (s)</th><th>from</th><th>to</th><th>port</th><th>expected</th><th>traced</th><th>backends reached</th></tr>");
        for c in &d.connectivity {
            let _ = write!(
                h,
                "<tr{}><td>{:.1}</td><td>{}</td><td>{}</td><td>{} {}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                if c.expected == c.got {
                    ""
                } else {
                    " class=\"bad\""
                },
                c.at_ms as f64 / 1000.0,
                esc(&c.from),
                esc(&c.to),
                esc(&c.protocol),
                c.port,
                if c.expected { "allowed" } else { "blocked" },
                if c.got {
                    "connects"
                } else {
                    "does not connect"
                },
                esc(&c.reached.join(", "))
            );
        }
        h.push_str("</table>");
    }
    for m in &d.matrices {
        let _ = write!(
            h,
            "<h3>Reachability {} {} at {:.1} s</h3><table class=\"matrix\"><tr><th>-</th>",
            esc(&m.protocol),
            m.port,
            m.at_ms as f64 / 1000.0
        );
        for n in &m.cols {
            let _ = write!(h, "<th>{}</th>", esc(n));
        }
        h.push_str("</tr>");
        for (i, row) in m.rows.iter().enumerate() {
            let _ = write!(h, "<tr><th>{}</th>", esc(row));
            for j in 0..m.cols.len() {
                let (want, got) = (m.expected[i][j], m.got[i][j]);
                let cell = if want { "." } else { "X" };
                if want == got {
                    let _ = write!(h, "<td>{cell}</td>");
                } else {
                    let _ = write!(
                        h,
                        "<td class=\"bad\" title=\"traced: {}\">{cell}!</td>",
                        if got { "connects" } else { "blocked" }
                    );
                }
            }
            h.push_str("</tr>");
        }
        h.push_str("</table>");
    }
    if !d.topology.is_empty() {
        h.push_str("<h3>NSX topology at the end</h3>");
        topology(h, &d.topology);
    }
    h.push_str("</details>");
}

fn topology(h: &mut String, nodes: &[TopoNode]) {
    h.push_str("<ul class=\"topo\">");
    for n in nodes {
        let _ = write!(h, "<li>{}", esc(&n.label));
        if !n.children.is_empty() {
            topology(h, &n.children);
        }
        h.push_str("</li>");
    }
    h.push_str("</ul>");
}

const STATUS_COLORS: [(&str, &str); 4] = [
    ("2xx", "#2e7d32"),
    ("4xx", "#ef6c00"),
    ("429", "#6a1b9a"),
    ("5xx", "#c62828"),
];

fn status_class(status: u16) -> usize {
    match status {
        429 => 2,
        s if s >= 500 => 3,
        s if s >= 400 => 1,
        _ => 0,
    }
}

fn step_color(kind: &str) -> &'static str {
    match kind {
        "converge" => "#1565c0",
        "wait" => "#9e9e9e",
        "apply" | "delete" => "#2e7d32",
        "expect" | "snapshot" => "#6a1b9a",
        "fault" | "heal" => "#c62828",
        _ => "#455a64",
    }
}

/// Steps, faults and NSX requests per second on one time axis, as inline SVG.
fn timeline(h: &mut String, d: &Detail, total_ms: u64) {
    let end_ms = d
        .steps
        .iter()
        .map(|s| s.end_ms)
        .chain(d.requests.iter().map(|r| (r.second + 1) * 1000))
        .chain([total_ms, 1000])
        .max()
        .unwrap_or(1000);
    let (w, left) = (900.0_f64, 60.0_f64);
    let x = |ms: u64| left + (ms as f64 / end_ms as f64) * (w - left - 10.0);
    let fault_rows = d.faults.len().min(8);
    let steps_y = 10.0;
    let faults_y = steps_y + 26.0;
    let req_y = faults_y + 14.0 * fault_rows as f64 + 18.0;
    let req_h = 90.0;
    let height = req_y + req_h + 30.0;
    let _ = write!(
        h,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" role=\"img\" aria-label=\"timeline\">"
    );
    let _ = write!(
        h,
        "<text x=\"4\" y=\"{}\" font-size=\"11\">steps</text>",
        steps_y + 12.0
    );
    for st in &d.steps {
        let (x0, x1) = (x(st.start_ms), x(st.end_ms));
        let _ = write!(
            h,
            "<rect x=\"{x0:.1}\" y=\"{steps_y}\" width=\"{:.1}\" height=\"16\" fill=\"{}\"{}><title>step {} (line {}): {} — {:.2}-{:.2} s</title></rect>",
            (x1 - x0).max(2.0),
            step_color(st.kind),
            if st.ok {
                ""
            } else {
                " stroke=\"#000\" stroke-width=\"2\""
            },
            st.n,
            st.line,
            esc(&st.what),
            st.start_ms as f64 / 1000.0,
            st.end_ms as f64 / 1000.0
        );
    }
    if fault_rows > 0 {
        let _ = write!(
            h,
            "<text x=\"4\" y=\"{}\" font-size=\"11\">faults</text>",
            faults_y + 10.0
        );
    }
    for (i, f) in d.faults.iter().take(fault_rows).enumerate() {
        let y = faults_y + 14.0 * i as f64;
        let x0 = x(f.start_ms);
        let x1 = if f.instant {
            x0 + 3.0
        } else {
            x(f.end_ms.unwrap_or(end_ms))
        };
        let _ = write!(
            h,
            "<rect x=\"{x0:.1}\" y=\"{y}\" width=\"{:.1}\" height=\"11\" fill=\"#c62828\" fill-opacity=\"{}\"><title>{} from {:.2} s{}</title></rect>",
            (x1 - x0).max(3.0),
            if f.instant { "1" } else { "0.35" },
            esc(&f.what),
            f.start_ms as f64 / 1000.0,
            match (f.instant, f.end_ms) {
                (true, _) => String::new(),
                (false, Some(e)) => format!(" to {:.2} s", e as f64 / 1000.0),
                (false, None) => " to the end".into(),
            }
        );
    }
    let max = d
        .requests
        .iter()
        .map(|r| r.by_status.values().sum::<u64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let _ = write!(
        h,
        "<text x=\"4\" y=\"{}\" font-size=\"11\">NSX/s</text><text x=\"4\" y=\"{}\" font-size=\"10\">max {max}</text>",
        req_y + 12.0,
        req_y + 26.0
    );
    let bar_w = (x(1000) - x(0)).max(1.0);
    for r in &d.requests {
        let mut classes = [0u64; 4];
        for (st, n) in &r.by_status {
            classes[status_class(*st)] += n;
        }
        let mut y = req_y + req_h;
        let total: u64 = classes.iter().sum();
        for (c, n) in classes.iter().enumerate() {
            if *n == 0 {
                continue;
            }
            let bh = req_h * *n as f64 / max as f64;
            y -= bh;
            let _ = write!(
                h,
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{bar_w:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>second {}: {n} {} of {total} ({} writes)</title></rect>",
                x(r.second * 1000),
                STATUS_COLORS[c].1,
                r.second,
                STATUS_COLORS[c].0,
                r.writes
            );
        }
        if r.writes > 0 {
            let wy = req_y + req_h - req_h * r.writes as f64 / max as f64;
            let _ = write!(
                h,
                "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{wy:.1}\" y2=\"{wy:.1}\" stroke=\"#000\" stroke-width=\"1.5\"/>",
                x(r.second * 1000),
                x(r.second * 1000) + bar_w
            );
        }
    }
    // The time axis.
    let axis_y = req_y + req_h + 4.0;
    let _ = write!(
        h,
        "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{axis_y}\" y2=\"{axis_y}\" stroke=\"#555\"/>",
        w - 10.0
    );
    let step_s = [1u64, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600]
        .into_iter()
        .find(|s| end_ms / (s * 1000) <= 10)
        .unwrap_or(7200);
    let mut t = 0;
    while t * 1000 <= end_ms {
        let _ = write!(
            h,
            "<text x=\"{:.1}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{t} s</text>",
            x(t * 1000),
            axis_y + 14.0
        );
        t += step_s;
    }
    h.push_str("</svg>");
    h.push_str("<div class=\"legend\">");
    for (name, color) in STATUS_COLORS {
        let _ = write!(
            h,
            "<span><span class=\"chip\" style=\"background:{color}\">&nbsp;</span>NSX {name}</span>"
        );
    }
    h.push_str("<span>— writes</span><span><span class=\"chip\" style=\"background:#c62828;opacity:.35\">&nbsp;</span>fault in force</span></div>");
}
