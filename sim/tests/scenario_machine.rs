//! A state machine over scenarios: random sequences of Kubernetes changes (namespaces, pods,
//! services, policies, deletions) and faults (NSX errors, NCP crashes after N writes and
//! restarts, OVS and agent restarts, dropped watches, partitions), run through the scenario
//! engine, which checks the standing invariants after every step; at the end, everything
//! healed, the system must converge. Failing cases are kept in `proptest-regressions/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use nsx_sim::scenario::run::{RunOptions, run};
use nsx_sim::scenario::spec::parse;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

#[derive(Debug, Clone)]
enum Op {
    Namespace(u8),
    Pod { ns: u8, pod: u8, node: u8, app: u8 },
    DeletePod { ns: u8, pod: u8 },
    Service { ns: u8, app: u8 },
    DenyPolicy(u8),
    AllowPolicy { ns: u8, app: u8 },
    DeleteNamespace(u8),
    Wait(u16),
    NsxErrors,
    CrashAfterWrites(u8),
    RestartNcp,
    RestartOvs(u8),
    RestartAgent(u8),
    WatchDisconnect,
    Partition,
    HealAll,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3).prop_map(Op::Namespace),
        6 => (0u8..3, 0u8..4, 1u8..4, 0u8..2).prop_map(|(ns, pod, node, app)| Op::Pod { ns, pod, node, app }),
        2 => (0u8..3, 0u8..4).prop_map(|(ns, pod)| Op::DeletePod { ns, pod }),
        2 => (0u8..3, 0u8..2).prop_map(|(ns, app)| Op::Service { ns, app }),
        1 => (0u8..3).prop_map(Op::DenyPolicy),
        1 => (0u8..3, 0u8..2).prop_map(|(ns, app)| Op::AllowPolicy { ns, app }),
        1 => (0u8..3).prop_map(Op::DeleteNamespace),
        3 => (50u16..3000).prop_map(Op::Wait),
        1 => Just(Op::NsxErrors),
        1 => (1u8..12).prop_map(Op::CrashAfterWrites),
        1 => Just(Op::RestartNcp),
        1 => (1u8..4).prop_map(Op::RestartOvs),
        1 => (1u8..4).prop_map(Op::RestartAgent),
        1 => Just(Op::WatchDisconnect),
        1 => Just(Op::Partition),
        1 => Just(Op::HealAll),
    ]
}

/// The scenario text of `ops`, skipping changes the apiserver would refuse (a pod in a
/// namespace that does not exist).
fn scenario(ops: &[Op]) -> String {
    let mut namespaces: BTreeSet<u8> = BTreeSet::new();
    let mut pods: BTreeMap<(u8, u8), ()> = BTreeMap::new();
    let mut steps = String::new();
    let apply = |steps: &mut String, manifest: String| {
        steps.push_str("  - apply: |\n");
        for l in manifest.lines() {
            steps.push_str("      ");
            steps.push_str(l);
            steps.push('\n');
        }
    };
    for o in ops {
        match o {
            Op::Namespace(n) => {
                namespaces.insert(*n);
                apply(
                    &mut steps,
                    format!(
                        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{team: t{}}}}}",
                        n % 2
                    ),
                );
            }
            Op::Pod { ns, pod, node, app } if namespaces.contains(ns) => {
                pods.insert((*ns, *pod), ());
                apply(
                    &mut steps,
                    format!(
                        "apiVersion: v1\nkind: Pod\nmetadata: {{name: p-{pod}, namespace: ns-{ns}, labels: {{app: a{app}}}}}\nspec: {{nodeName: node-{node}, containers: [{{name: c, image: x, ports: [{{name: http, containerPort: 8080}}]}}]}}"
                    ),
                );
            }
            Op::DeletePod { ns, pod } if pods.remove(&(*ns, *pod)).is_some() => {
                steps.push_str(&format!(
                    "  - delete: {{kind: Pod, namespace: ns-{ns}, name: p-{pod}}}\n"
                ));
            }
            Op::Service { ns, app } if namespaces.contains(ns) => apply(
                &mut steps,
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s-{app}, namespace: ns-{ns}}}\nspec: {{selector: {{app: a{app}}}, ports: [{{name: web, port: 80, targetPort: http}}, {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}]}}"
                ),
            ),
            Op::DenyPolicy(ns) if namespaces.contains(ns) => apply(
                &mut steps,
                format!(
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: deny, namespace: ns-{ns}}}\nspec: {{podSelector: {{}}, policyTypes: [Ingress]}}"
                ),
            ),
            Op::AllowPolicy { ns, app } if namespaces.contains(ns) => apply(
                &mut steps,
                format!(
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-a{app}, namespace: ns-{ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: a{app}}}}}\n  ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{team: t0}}}}, podSelector: {{matchLabels: {{app: a{}}}}}}}], ports: [{{port: http}}]}}]",
                    1 - app
                ),
            ),
            Op::DeleteNamespace(n) if namespaces.remove(n) => {
                pods.retain(|(ns, _), _| ns != n);
                steps.push_str(&format!("  - delete: {{kind: Namespace, name: ns-{n}}}\n"));
            }
            Op::Wait(ms) => steps.push_str(&format!("  - wait: {ms}ms\n")),
            Op::NsxErrors => steps.push_str("  - fault: {nsx_errors: {status: 503, rate: 0.5}}\n"),
            Op::CrashAfterWrites(n) => steps.push_str(&format!(
                "  - fault: {{crash_after_writes: {{host: ncp-0, writes: {n}}}}}\n"
            )),
            Op::RestartNcp => steps.push_str("  - fault: {restart: ncp-0}\n"),
            Op::RestartOvs(n) => steps.push_str(&format!("  - fault: {{restart_ovs: node-{n}}}\n")),
            Op::RestartAgent(n) => {
                steps.push_str(&format!("  - fault: {{restart_agent: node-{n}}}\n"))
            }
            Op::WatchDisconnect => steps.push_str("  - fault: {watch_disconnect: ncp}\n"),
            Op::Partition => steps.push_str("  - fault: {partition: [ncp, nsx-manager]}\n"),
            Op::HealAll => steps.push_str("  - heal: all\n"),
            _ => {}
        }
    }
    steps.push_str("  - heal: all\n  - converge: {within: 180s}\n  - expect: {converged: true, invariants: true}\n");
    format!("name: machine\ncluster: {{nodes: 3}}\nsteps:\n{steps}")
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(10),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/scenario_machine.txt"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_changes_and_faults_keep_the_invariants_and_converge(ops in proptest::collection::vec(op(), 4..24), seed in 0u64..1_000_000) {
        let text = scenario(&ops);
        let s = parse(Path::new("machine.yaml"), &text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let (r, _) = run(&s, seed, &RunOptions::default());
        prop_assert!(r.passed, "seed {seed}: step {:?}: {:?}\n{text}", r.failed_step, r.message);
    }
}
