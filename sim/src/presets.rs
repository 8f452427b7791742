//! The built-in worlds of `nsx-sim ncp` and `nsx-sim spine`: scenarios written by a function
//! instead of a file, run by the same engine, checked by the same converge check and
//! invariants, and reported by the same printer as `nsx-sim run`. `--print-scenario` prints
//! the text, which `nsx-sim run` replays to the same trace for the same seed.
//!
//! Times a storm picks from the seed are `wait` ranges (`1s..2s`): the engine draws them.

use std::fmt::Write as _;
use std::path::Path;

use crate::scenario::spec::{Scenario, ScenarioError, parse};

/// The NSX error storm both presets use: 30 % of port requests answered 503.
const PORT_503S: &str = "{nsx_errors: {status: 503, rate: 0.3, path: /api/v1/logical-ports}}";

/// `count` pods `p-<first>..` in namespace `ns`, as one apply step's documents.
fn pods(out: &mut String, ns: &str, first: usize, count: usize) {
    for i in first..first + count {
        let _ = write!(
            out,
            "      ---\n      apiVersion: v1\n      kind: Pod\n      metadata: {{name: p-{i}, namespace: {ns}, labels: {{app: a}}}}\n      spec: {{containers: [{{name: c, image: x}}]}}\n"
        );
    }
}

/// Namespaces `ns-0..` with `per_namespace` pods each, as an apply step (the spine's workload
/// is `workload(namespaces, ports)`).
pub fn workload(namespaces: usize, per_namespace: usize) -> String {
    let mut out = String::from("  - apply: |\n");
    for n in 0..namespaces {
        let _ = write!(
            out,
            "      ---\n      apiVersion: v1\n      kind: Namespace\n      metadata: {{name: ns-{n}}}\n"
        );
        pods(&mut out, &format!("ns-{n}"), 0, per_namespace);
    }
    out
}

fn add_pods(ns: &str, first: usize, count: usize) -> String {
    let mut out = String::from("  - apply: |\n");
    pods(&mut out, ns, first, count);
    out
}

/// `nsx-sim ncp`: three nodes, three namespaces of four pods, and (unless `calm`) a storm at
/// seed-chosen times: NSX 503s on ports, dropped watches with 410 relists, pods added, the
/// manager restarted, NCP crashed while a namespace is deleted and started again; with two
/// replicas the second is also cut off from the apiserver (it must stop writing before its
/// lease can be taken). Then everything converges.
pub fn ncp(replicas: usize, calm: bool) -> String {
    let name = match (calm, replicas) {
        (true, 1) => "ncp-calm".to_string(),
        (true, r) => format!("ncp-calm-{r}-replicas"),
        (false, 1) => "ncp-storm".to_string(),
        (false, r) => format!("ncp-storm-{r}-replicas"),
    };
    let mut s = format!(
        "name: {name}\ndescription: the built-in NCP world (nsx-sim ncp)\ncluster:\n  nodes: 3\n  ncp_replicas: {replicas}\nsteps:\n"
    );
    s += &workload(3, 4);
    if calm {
        s += &add_pods("ns-0", 4, 3);
        s += "  - delete: {kind: Namespace, name: ns-1}\n";
        s += &add_pods("ns-2", 4, 2);
    } else {
        s += "  - wait: 500ms..1500ms\n";
        let _ = writeln!(s, "  - fault: {PORT_503S}");
        s += "  - wait: 500ms..1500ms\n  - fault: {watch_disconnect: ncp}\n";
        s += "  - wait: 1s..2s\n";
        s += &add_pods("ns-0", 4, 3);
        s += "  - wait: 1s..2s\n  - fault: {restart: nsx-manager}\n";
        s += "  - wait: 1s..2s\n  - fault: {crash: ncp-0}\n";
        s += "  - wait: 500ms..1s\n  - delete: {kind: Namespace, name: ns-1}\n";
        s += "  - wait: 500ms..1s\n  - heal: {crash: ncp-0}\n";
        s += "  - wait: 500ms..1500ms\n  - fault: {watch_disconnect: ncp}\n";
        s += "  - wait: 500ms..1500ms\n";
        s += &add_pods("ns-2", 4, 2);
        s += "  - wait: 1s\n";
        let _ = writeln!(s, "  - heal: {PORT_503S}");
        if replicas > 1 {
            s += "  - wait: 1s..2s\n  - fault: {partition: [ncp-1, apiserver]}\n";
            s += "  - wait: 27s\n  - heal: {partition: [ncp-1, apiserver]}\n";
        }
    }
    s += "  - converge: {within: 120s}\n  - expect: {converged: true, invariants: true}\n";
    s
}

/// The fault schedules of `nsx-sim spine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpineFaults {
    None,
    /// 30 % 503s on ports, NCP cut off from the manager from 40 ms to 12 s, a manager
    /// restart, 30 ms of latency on the link, then the errors clear.
    Storm,
}

/// `nsx-sim spine`: NCP and the NSX Manager under network and manager faults, with
/// `namespaces` namespaces of `ports` pods (one logical port each) on two nodes.
pub fn spine(namespaces: usize, ports: usize, faults: SpineFaults) -> String {
    let mut steps = String::new();
    if faults == SpineFaults::Storm {
        let _ = writeln!(steps, "  - fault: {PORT_503S}");
    }
    steps += &workload(namespaces, ports);
    if faults == SpineFaults::Storm {
        steps += "  - wait: 30ms\n  - fault: {partition: [ncp, nsx-manager]}\n";
        steps += "  - wait: 12s\n  - heal: {partition: [ncp, nsx-manager]}\n";
        steps += "  - wait: 500ms\n  - fault: {restart: nsx-manager}\n";
        steps += "  - wait: 500ms\n  - fault: {latency: {between: [ncp, nsx-manager], min: 30ms, max: 30ms}}\n";
        steps += "  - wait: 7s\n";
        let _ = writeln!(steps, "  - heal: {PORT_503S}");
    }
    spine_with(&steps)
}

/// The spine's cluster with `steps` (scenario step lines, indented two spaces) and a final
/// converge and check: for tests that want one fault at a time.
pub fn spine_with(steps: &str) -> String {
    format!(
        "name: nsx-spine\ndescription: the built-in NSX spine (nsx-sim spine)\ncluster:\n  nodes: 2\nsteps:\n{steps}  - converge: {{within: 180s}}\n  - expect: {{converged: true, invariants: true}}\n"
    )
}

/// A preset's text as a scenario; `name` stands for the file in messages.
pub fn load(name: &str, text: &str) -> Result<Scenario, ScenarioError> {
    parse(Path::new(&format!("<preset {name}>")), text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_a_valid_scenario() {
        for replicas in [1, 2] {
            for calm in [false, true] {
                let s = load("ncp", &ncp(replicas, calm)).expect("ncp preset");
                assert_eq!(s.cluster.ncp_replicas, replicas);
                assert_eq!(s.cluster.nodes.len(), 3);
            }
        }
        for f in [SpineFaults::None, SpineFaults::Storm] {
            load("spine", &spine(3, 4, f)).expect("spine preset");
        }
    }
}
