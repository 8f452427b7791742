//! A state machine over scenarios: random sequences of Kubernetes changes (namespaces, pods,
//! services, policies, deletions), in-place updates (policies edited, pods and namespaces
//! relabelled, a service's selector, port and type changed, the `ncp/no_snat` annotation
//! toggled, pods and policies deleted and recreated under the same name) and faults (NSX
//! errors, NCP crashes after N writes and restarts, OVS and agent restarts, dropped watches,
//! partitions), run through the scenario engine, which checks the standing invariants after
//! every step. Healed converges come in the middle and at the end: each compares every NSX
//! object's content with what the cluster implies and, once a policy exists, the traced
//! dataplane with the NetworkPolicy oracle. Failing cases are kept in `proptest-regressions/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use nsx_sim::scenario::run::{RunOptions, run};
use nsx_sim::scenario::spec::parse;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

#[derive(Debug, Clone)]
enum Op {
    Namespace(u8),
    Pod {
        ns: u8,
        pod: u8,
        node: u8,
        app: u8,
    },
    DeletePod {
        ns: u8,
        pod: u8,
    },
    Service {
        ns: u8,
        app: u8,
    },
    DenyPolicy(u8),
    AllowPolicy {
        ns: u8,
        app: u8,
    },
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
    /// Heal everything and converge: the content check and the policy oracle run.
    Converge,
    RelabelPod {
        ns: u8,
        pod: u8,
        app: u8,
    },
    RecreatePod {
        ns: u8,
        pod: u8,
    },
    RelabelNamespace(u8),
    NoSnat(u8),
    EditPolicy {
        ns: u8,
        app: u8,
        variant: u8,
    },
    DeletePolicy {
        ns: u8,
        app: u8,
    },
    EditService {
        ns: u8,
        app: u8,
        variant: u8,
    },
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
        8 => Just(Op::Converge),
        4 => (0u8..3, 0u8..4, 0u8..2).prop_map(|(ns, pod, app)| Op::RelabelPod { ns, pod, app }),
        1 => (0u8..3, 0u8..4).prop_map(|(ns, pod)| Op::RecreatePod { ns, pod }),
        4 => (0u8..3).prop_map(Op::RelabelNamespace),
        1 => (0u8..3).prop_map(Op::NoSnat),
        6 => (0u8..3, 0u8..2, 0u8..5).prop_map(|(ns, app, variant)| Op::EditPolicy { ns, app, variant }),
        1 => (0u8..3, 0u8..2).prop_map(|(ns, app)| Op::DeletePolicy { ns, app }),
        2 => (0u8..3, 0u8..2, 0u8..4).prop_map(|(ns, app, variant)| Op::EditService { ns, app, variant }),
    ]
}

/// The scenario text of `ops`, skipping changes the apiserver would refuse (a pod in a
/// namespace that does not exist).
fn scenario(ops: &[Op]) -> String {
    let mut namespaces: BTreeSet<u8> = BTreeSet::new();
    // (namespace, pod) -> node; namespace -> (team label, no_snat).
    let mut pods: BTreeMap<(u8, u8), u8> = BTreeMap::new();
    let mut ns_state: BTreeMap<u8, (u8, bool)> = BTreeMap::new();
    let mut policies: BTreeSet<(u8, u8)> = BTreeSet::new();
    let pod_manifest = |ns: u8, pod: u8, node: u8, app: u8| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p-{pod}, namespace: ns-{ns}, labels: {{app: a{app}}}}}\nspec: {{nodeName: node-{node}, containers: [{{name: c, image: x, ports: [{{name: http, containerPort: 8080}}, {{name: dns, containerPort: 5353, protocol: UDP}}]}}]}}"
        )
    };
    let ns_manifest = |n: u8, team: u8, no_snat: bool| {
        let ann = if no_snat {
            ", annotations: {ncp/no_snat: \"true\"}"
        } else {
            ""
        };
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{team: t{team}}}{ann}}}"
        )
    };
    let mut steps = String::new();
    let apply = |steps: &mut String, manifest: String| {
        steps.push_str("  - apply: |\n");
        for l in manifest.lines() {
            steps.push_str("      ");
            steps.push_str(l);
            steps.push('\n');
        }
    };
    // A starting cluster, so that in-place changes have something to change: two namespaces
    // (teams t0 and t1) with three pods each, spread over the nodes.
    let base = [
        Op::Namespace(0),
        Op::Namespace(1),
        Op::Pod {
            ns: 0,
            pod: 0,
            node: 1,
            app: 0,
        },
        Op::Pod {
            ns: 0,
            pod: 1,
            node: 2,
            app: 1,
        },
        Op::Pod {
            ns: 0,
            pod: 2,
            node: 3,
            app: 0,
        },
        Op::Pod {
            ns: 1,
            pod: 0,
            node: 2,
            app: 0,
        },
        Op::Pod {
            ns: 1,
            pod: 1,
            node: 3,
            app: 1,
        },
        Op::Pod {
            ns: 1,
            pod: 2,
            node: 1,
            app: 1,
        },
    ];
    for o in base.iter().chain(ops) {
        match o {
            Op::Namespace(n) => {
                namespaces.insert(*n);
                let (team, no_snat) = *ns_state.entry(*n).or_insert((n % 2, false));
                apply(&mut steps, ns_manifest(*n, team, no_snat));
            }
            Op::Pod { ns, pod, node, app } if namespaces.contains(ns) => {
                // A pod's node cannot change: an existing pod keeps its own.
                let node = *pods.entry((*ns, *pod)).or_insert(*node);
                apply(&mut steps, pod_manifest(*ns, *pod, node, *app));
            }
            Op::RelabelPod { ns, pod, app } if pods.contains_key(&(*ns, *pod)) => {
                apply(
                    &mut steps,
                    pod_manifest(*ns, *pod, pods[&(*ns, *pod)], *app),
                );
            }
            Op::RecreatePod { ns, pod } if pods.contains_key(&(*ns, *pod)) => {
                steps.push_str(&format!(
                    "  - delete: {{kind: Pod, namespace: ns-{ns}, name: p-{pod}}}\n"
                ));
                apply(
                    &mut steps,
                    pod_manifest(*ns, *pod, pods[&(*ns, *pod)], *pod % 2),
                );
            }
            Op::RelabelNamespace(n) if namespaces.contains(n) => {
                let st = ns_state.entry(*n).or_insert((n % 2, false));
                st.0 = 1 - st.0;
                apply(&mut steps, ns_manifest(*n, st.0, st.1));
            }
            Op::NoSnat(n) if namespaces.contains(n) => {
                let st = ns_state.entry(*n).or_insert((n % 2, false));
                st.1 = !st.1;
                apply(&mut steps, ns_manifest(*n, st.0, st.1));
            }
            Op::EditPolicy { ns, app, variant } if namespaces.contains(ns) => {
                policies.insert((*ns, *app));
                let other = 1 - app;
                let spec = match variant {
                    // Peers: pods of the other app in t0 namespaces, on the named port.
                    0 => format!(
                        "  podSelector: {{matchLabels: {{app: a{app}}}}}\n  ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{team: t0}}}}, podSelector: {{matchLabels: {{app: a{other}}}}}}}], ports: [{{port: http}}]}}]"
                    ),
                    // Pods of this namespace only, UDP by number.
                    1 => format!(
                        "  podSelector: {{matchLabels: {{app: a{app}}}}}\n  ingress: [{{from: [{{podSelector: {{}}}}], ports: [{{protocol: UDP, port: 5353}}]}}]"
                    ),
                    // Egress only, to t1 namespaces.
                    2 => format!(
                        "  podSelector: {{matchLabels: {{app: a{app}}}}}\n  policyTypes: [Egress]\n  egress: [{{to: [{{namespaceSelector: {{matchLabels: {{team: t1}}}}}}]}}]"
                    ),
                    // Everything allowed in, selected by an expression.
                    3 => format!(
                        "  podSelector: {{matchExpressions: [{{key: app, operator: In, values: [a{app}]}}]}}\n  ingress: [{{}}]"
                    ),
                    // Both directions isolated, two rules each.
                    _ => format!(
                        "  podSelector: {{matchLabels: {{app: a{app}}}}}\n  policyTypes: [Ingress, Egress]\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: a{other}}}}}}}]}}, {{ports: [{{port: 8080}}]}}]\n  egress: [{{to: [{{namespaceSelector: {{}}}}]}}, {{ports: [{{protocol: UDP, port: 5353}}]}}]"
                    ),
                };
                apply(
                    &mut steps,
                    format!(
                        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-a{app}, namespace: ns-{ns}}}\nspec:\n{spec}"
                    ),
                );
            }
            Op::DeletePolicy { ns, app } if policies.remove(&(*ns, *app)) => {
                steps.push_str(&format!(
                    "  - delete: {{kind: NetworkPolicy, namespace: ns-{ns}, name: allow-a{app}}}\n"
                ));
            }
            Op::EditService { ns, app, variant } if namespaces.contains(ns) => {
                let (selector, port, kind) = match variant {
                    0 => (*app, 80, "ClusterIP"),
                    1 => (1 - app, 80, "ClusterIP"),
                    2 => (*app, 81, "ClusterIP"),
                    _ => (*app, 80, "LoadBalancer"),
                };
                apply(
                    &mut steps,
                    format!(
                        "apiVersion: v1\nkind: Service\nmetadata: {{name: s-{app}, namespace: ns-{ns}}}\nspec: {{type: {kind}, selector: {{app: a{selector}}}, ports: [{{name: web, port: {port}, targetPort: http}}, {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}]}}"
                    ),
                );
            }
            Op::Converge => steps.push_str(
                "  - heal: all\n  - converge: {within: 180s}\n  - expect: {converged: true}\n",
            ),
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
            Op::AllowPolicy { ns, app } if namespaces.contains(ns) => {
                policies.insert((*ns, *app));
                apply(
                    &mut steps,
                    format!(
                        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-a{app}, namespace: ns-{ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: a{app}}}}}\n  ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{team: t0}}}}, podSelector: {{matchLabels: {{app: a{}}}}}}}], ports: [{{port: http}}]}}]",
                        1 - app
                    ),
                )
            }
            Op::DeleteNamespace(n) if namespaces.remove(n) => {
                pods.retain(|(ns, _), _| ns != n);
                policies.retain(|(ns, _)| ns != n);
                ns_state.remove(n);
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

/// Cases run so far in this process (a failure reports how many it took to find).
static CASES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

static FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(30),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/scenario_machine.txt"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_changes_and_faults_keep_the_invariants_and_converge(ops in proptest::collection::vec(op(), 4..28), seed in 0u64..1_000_000) {
        let case = CASES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let text = scenario(&ops);
        let s = parse(Path::new("machine.yaml"), &text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let (r, _) = run(&s, seed, &RunOptions::default());
        if !r.passed && !FAILED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!("the first failing case is case {case}");
        }
        prop_assert!(r.passed, "case {case}, seed {seed}: step {:?}: {:?}\n{text}", r.failed_step, r.message);
    }
}
