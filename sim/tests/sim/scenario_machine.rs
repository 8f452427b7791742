//! A state machine over scenarios (proptest-state-machine): a reference model of the cluster
//! (namespaces with their team label and `ncp/no_snat`, pods with their node, policies)
//! decides which changes are valid next, so generated and shrunk cases only hold changes the
//! apiserver accepts. Changes: namespaces, pods, services, policies, deletions; in-place
//! updates (policies edited, pods and namespaces relabelled, a service's selector, port and
//! type changed, `ncp/no_snat` toggled, pods deleted and recreated under the same name); and
//! faults (NSX errors, NCP crashes after N writes and restarts, OVS and agent restarts,
//! dropped watches, partitions). Each case is one scenario run through the engine, which
//! checks the standing invariants after every step; healed converges come in the middle and
//! at the end: each compares every NSX object's content with what the cluster implies and,
//! once a policy exists, the traced dataplane with the NetworkPolicy oracle. Failing cases are
//! kept in `proptest-regressions/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use nsx_sim::scenario::run::{RunOptions, run};
use nsx_sim::scenario::spec::parse;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::strategy::Union;
use proptest::test_runner::FileFailurePersistence;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};

#[derive(Debug, Clone)]
enum Op {
    Namespace(u8),
    /// A pod created, or (when it exists) applied again with this app label on its own node.
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

/// What the cluster holds, as far as the next valid change depends on it.
#[derive(Debug, Clone, Default)]
struct Model {
    seed: u64,
    /// Namespace -> (team label, `ncp/no_snat`).
    namespaces: BTreeMap<u8, (u8, bool)>,
    /// (namespace, pod) -> node: a pod's node cannot change.
    pods: BTreeMap<(u8, u8), u8>,
    /// (namespace, app) of the `allow-a<app>` policies.
    policies: BTreeSet<(u8, u8)>,
}

/// A starting cluster, so that in-place changes have something to change: two namespaces
/// (teams t0 and t1) with three pods each, spread over the nodes.
fn base() -> Vec<Op> {
    let pod = |ns, pod, node, app| Op::Pod { ns, pod, node, app };
    vec![
        Op::Namespace(0),
        Op::Namespace(1),
        pod(0, 0, 1, 0),
        pod(0, 1, 2, 1),
        pod(0, 2, 3, 0),
        pod(1, 0, 2, 0),
        pod(1, 1, 3, 1),
        pod(1, 2, 1, 1),
    ]
}

impl Model {
    fn has_ns(&self, n: u8) -> bool {
        self.namespaces.contains_key(&n)
    }

    /// Whether the apiserver accepts `op` now (a pod needs its namespace, and so on).
    fn allows(&self, op: &Op) -> bool {
        match op {
            Op::Pod { ns, .. }
            | Op::Service { ns, .. }
            | Op::DenyPolicy(ns)
            | Op::AllowPolicy { ns, .. }
            | Op::DeleteNamespace(ns)
            | Op::RelabelNamespace(ns)
            | Op::NoSnat(ns)
            | Op::EditPolicy { ns, .. }
            | Op::EditService { ns, .. } => self.has_ns(*ns),
            Op::DeletePod { ns, pod }
            | Op::RelabelPod { ns, pod, .. }
            | Op::RecreatePod { ns, pod } => self.pods.contains_key(&(*ns, *pod)),
            Op::DeletePolicy { ns, app } => self.policies.contains(&(*ns, *app)),
            _ => true,
        }
    }

    fn apply(mut self, op: &Op) -> Self {
        match op {
            Op::Namespace(n) => {
                self.namespaces.entry(*n).or_insert((n % 2, false));
            }
            Op::Pod { ns, pod, node, .. } => {
                self.pods.entry((*ns, *pod)).or_insert(*node);
            }
            Op::DeletePod { ns, pod } => {
                self.pods.remove(&(*ns, *pod));
            }
            Op::RelabelNamespace(n) => {
                if let Some(s) = self.namespaces.get_mut(n) {
                    s.0 = 1 - s.0;
                }
            }
            Op::NoSnat(n) => {
                if let Some(s) = self.namespaces.get_mut(n) {
                    s.1 = !s.1;
                }
            }
            Op::AllowPolicy { ns, app } | Op::EditPolicy { ns, app, .. } => {
                self.policies.insert((*ns, *app));
            }
            Op::DeletePolicy { ns, app } => {
                self.policies.remove(&(*ns, *app));
            }
            Op::DeleteNamespace(n) => {
                self.namespaces.remove(n);
                self.pods.retain(|(ns, _), _| ns != n);
                self.policies.retain(|(ns, _)| ns != n);
            }
            _ => {}
        }
        self
    }
}

struct Cluster;

impl ReferenceStateMachine for Cluster {
    type State = Model;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Model> {
        (0u64..1_000_000)
            .prop_map(|seed| {
                base().iter().fold(
                    Model {
                        seed,
                        ..Model::default()
                    },
                    |m, op| m.apply(op),
                )
            })
            .boxed()
    }

    fn transitions(m: &Model) -> BoxedStrategy<Op> {
        let mut ops: Vec<(u32, BoxedStrategy<Op>)> = vec![
            (3, (0u8..3).prop_map(Op::Namespace).boxed()),
            (3, (50u16..3000).prop_map(Op::Wait).boxed()),
            (1, Just(Op::NsxErrors).boxed()),
            (1, (1u8..12).prop_map(Op::CrashAfterWrites).boxed()),
            (1, Just(Op::RestartNcp).boxed()),
            (1, (1u8..4).prop_map(Op::RestartOvs).boxed()),
            (1, (1u8..4).prop_map(Op::RestartAgent).boxed()),
            (1, Just(Op::WatchDisconnect).boxed()),
            (1, Just(Op::Partition).boxed()),
            (1, Just(Op::HealAll).boxed()),
            (8, Just(Op::Converge).boxed()),
        ];
        let namespaces: Vec<u8> = m.namespaces.keys().copied().collect();
        if !namespaces.is_empty() {
            let ns = || select(namespaces.clone());
            ops.extend([
                (
                    6,
                    (ns(), 0u8..4, 1u8..4, 0u8..2)
                        .prop_map(|(ns, pod, node, app)| Op::Pod { ns, pod, node, app })
                        .boxed(),
                ),
                (
                    2,
                    (ns(), 0u8..2)
                        .prop_map(|(ns, app)| Op::Service { ns, app })
                        .boxed(),
                ),
                (1, ns().prop_map(Op::DenyPolicy).boxed()),
                (
                    1,
                    (ns(), 0u8..2)
                        .prop_map(|(ns, app)| Op::AllowPolicy { ns, app })
                        .boxed(),
                ),
                (1, ns().prop_map(Op::DeleteNamespace).boxed()),
                (4, ns().prop_map(Op::RelabelNamespace).boxed()),
                (1, ns().prop_map(Op::NoSnat).boxed()),
                (
                    6,
                    (ns(), 0u8..2, 0u8..5)
                        .prop_map(|(ns, app, variant)| Op::EditPolicy { ns, app, variant })
                        .boxed(),
                ),
                (
                    2,
                    (ns(), 0u8..2, 0u8..4)
                        .prop_map(|(ns, app, variant)| Op::EditService { ns, app, variant })
                        .boxed(),
                ),
            ]);
        }
        let pods: Vec<(u8, u8)> = m.pods.keys().copied().collect();
        if !pods.is_empty() {
            let pod = || select(pods.clone());
            ops.extend([
                (
                    2,
                    pod()
                        .prop_map(|(ns, pod)| Op::DeletePod { ns, pod })
                        .boxed(),
                ),
                (
                    4,
                    (pod(), 0u8..2)
                        .prop_map(|((ns, pod), app)| Op::RelabelPod { ns, pod, app })
                        .boxed(),
                ),
                (
                    1,
                    pod()
                        .prop_map(|(ns, pod)| Op::RecreatePod { ns, pod })
                        .boxed(),
                ),
            ]);
        }
        let policies: Vec<(u8, u8)> = m.policies.iter().copied().collect();
        if !policies.is_empty() {
            ops.push((
                1,
                select(policies)
                    .prop_map(|(ns, app)| Op::DeletePolicy { ns, app })
                    .boxed(),
            ));
        }
        Union::new_weighted(ops).boxed()
    }

    fn preconditions(m: &Model, op: &Op) -> bool {
        m.allows(op)
    }

    fn apply(m: Model, op: &Op) -> Model {
        m.apply(op)
    }
}

fn pod_manifest(ns: u8, pod: u8, node: u8, app: u8) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: p-{pod}, namespace: ns-{ns}, labels: {{app: a{app}}}}}\nspec: {{nodeName: node-{node}, containers: [{{name: c, image: x, ports: [{{name: http, containerPort: 8080}}, {{name: dns, containerPort: 5353, protocol: UDP}}]}}]}}"
    )
}

fn ns_manifest(n: u8, (team, no_snat): (u8, bool)) -> String {
    let ann = if no_snat {
        ", annotations: {ncp/no_snat: \"true\"}"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{team: t{team}}}{ann}}}"
    )
}

fn policy_manifest(ns: u8, app: u8, variant: u8) -> String {
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
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-a{app}, namespace: ns-{ns}}}\nspec:\n{spec}"
    )
}

fn service_manifest(ns: u8, app: u8, selector: u8, port: u16, kind: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s-{app}, namespace: ns-{ns}}}\nspec: {{type: {kind}, selector: {{app: a{selector}}}, ports: [{{name: web, port: {port}, targetPort: http}}, {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}]}}"
    )
}

fn apply_step(manifest: String) -> String {
    let mut s = String::from("  - apply: |\n");
    for l in manifest.lines() {
        s.push_str("      ");
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// The scenario steps of `op`, given the model after it.
fn steps(op: &Op, after: &Model) -> String {
    let node = |ns: u8, pod: u8| after.pods.get(&(ns, pod)).copied().unwrap_or(1);
    let ns_state = |n: u8| after.namespaces.get(&n).copied().unwrap_or((n % 2, false));
    match op {
        Op::Namespace(n) | Op::RelabelNamespace(n) | Op::NoSnat(n) => {
            apply_step(ns_manifest(*n, ns_state(*n)))
        }
        Op::Pod { ns, pod, app, .. } | Op::RelabelPod { ns, pod, app } => {
            apply_step(pod_manifest(*ns, *pod, node(*ns, *pod), *app))
        }
        Op::RecreatePod { ns, pod } => {
            format!("  - delete: {{kind: Pod, namespace: ns-{ns}, name: p-{pod}}}\n")
                + &apply_step(pod_manifest(*ns, *pod, node(*ns, *pod), pod % 2))
        }
        Op::DeletePod { ns, pod } => {
            format!("  - delete: {{kind: Pod, namespace: ns-{ns}, name: p-{pod}}}\n")
        }
        Op::Service { ns, app } => apply_step(service_manifest(*ns, *app, *app, 80, "ClusterIP")),
        Op::EditService { ns, app, variant } => {
            let (selector, port, kind) = match variant {
                0 => (*app, 80, "ClusterIP"),
                1 => (1 - app, 80, "ClusterIP"),
                2 => (*app, 81, "ClusterIP"),
                _ => (*app, 80, "LoadBalancer"),
            };
            apply_step(service_manifest(*ns, *app, selector, port, kind))
        }
        Op::DenyPolicy(ns) => apply_step(format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: deny, namespace: ns-{ns}}}\nspec: {{podSelector: {{}}, policyTypes: [Ingress]}}"
        )),
        Op::AllowPolicy { ns, app } => apply_step(policy_manifest(*ns, *app, 0)),
        Op::EditPolicy { ns, app, variant } => apply_step(policy_manifest(*ns, *app, *variant)),
        Op::DeletePolicy { ns, app } => {
            format!("  - delete: {{kind: NetworkPolicy, namespace: ns-{ns}, name: allow-a{app}}}\n")
        }
        Op::DeleteNamespace(n) => format!("  - delete: {{kind: Namespace, name: ns-{n}}}\n"),
        Op::Converge => {
            "  - heal: all\n  - converge: {within: 180s}\n  - expect: {converged: true}\n".into()
        }
        Op::Wait(ms) => format!("  - wait: {ms}ms\n"),
        Op::NsxErrors => "  - fault: {nsx_errors: {status: 503, rate: 0.5}}\n".into(),
        Op::CrashAfterWrites(n) => {
            format!("  - fault: {{crash_after_writes: {{host: ncp-0, writes: {n}}}}}\n")
        }
        Op::RestartNcp => "  - fault: {restart: ncp-0}\n".into(),
        Op::RestartOvs(n) => format!("  - fault: {{restart_ovs: node-{n}}}\n"),
        Op::RestartAgent(n) => format!("  - fault: {{restart_agent: node-{n}}}\n"),
        Op::WatchDisconnect => "  - fault: {watch_disconnect: ncp}\n".into(),
        Op::Partition => "  - fault: {partition: [ncp, nsx-manager]}\n".into(),
        Op::HealAll => "  - heal: all\n".into(),
    }
}

/// The system under test is the scenario being written: each transition appends its steps,
/// and the teardown runs the whole scenario through the engine with the case's seed.
struct ScenarioRun;

impl StateMachineTest for ScenarioRun {
    type SystemUnderTest = String;
    type Reference = Cluster;

    fn init_test(_: &Model) -> String {
        let mut m = Model::default();
        let mut text = String::new();
        for op in base() {
            m = m.apply(&op);
            text += &steps(&op, &m);
        }
        text
    }

    fn apply(mut text: String, after: &Model, op: Op) -> String {
        text += &steps(&op, after);
        text
    }

    fn teardown(text: String, m: Model) {
        run_case(&text, m.seed);
    }
}

/// Runs the scenario of `steps` with `seed`, ending with a healed converge; panics (the
/// case fails) on any failed step.
fn run_case(steps: &str, seed: u64) {
    let text = format!(
        "name: machine\ncluster: {{nodes: 3}}\nsteps:\n{steps}  - heal: all\n  - converge: {{within: 180s}}\n  - expect: {{converged: true, invariants: true}}\n"
    );
    let s = parse(Path::new("machine.yaml"), &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let (r, _) = run(&s, seed, &RunOptions::default());
    assert!(
        r.passed,
        "seed {seed}: step {:?}: {:?}\n{text}",
        r.failed_step, r.message
    );
}

/// `ops` after the base cluster, those the model refuses left out, as the generator would.
fn replay(ops: &[Op], seed: u64) {
    let mut m = base().iter().fold(Model::default(), |m, op| m.apply(op));
    let mut text = ScenarioRun::init_test(&m);
    for op in ops {
        if m.allows(op) {
            m = m.apply(op);
            text += &steps(op, &m);
        }
    }
    run_case(&text, seed);
}

prop_state_machine! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(30),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/scenario_machine.txt"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_changes_and_faults_keep_the_invariants_and_converge(sequential 4..28 => ScenarioRun);
}

/// Cases the machine found before it had a reference model (their persisted seeds no longer
/// name the same cases), replayed as they were shrunk.
#[test]
fn cases_found_before_stay_fixed() {
    let pod = |ns, pod, node, app| Op::Pod { ns, pod, node, app };
    replay(
        &[
            Op::CrashAfterWrites(1),
            Op::Wait(156),
            Op::RestartNcp,
            Op::Namespace(0),
        ],
        457_547,
    );
    replay(
        &[
            Op::Wait(976),
            Op::Namespace(0),
            pod(0, 2, 1, 0),
            Op::DenyPolicy(0),
            Op::Wait(271),
            Op::Wait(501),
            Op::Wait(1101),
            Op::Wait(506),
            Op::RestartOvs(1),
            pod(0, 0, 1, 0),
            Op::Namespace(0),
            Op::Service { ns: 0, app: 0 },
        ],
        0,
    );
    replay(
        &[
            Op::Wait(101),
            Op::RecreatePod { ns: 0, pod: 0 },
            Op::EditPolicy {
                ns: 0,
                app: 0,
                variant: 0,
            },
            Op::RestartOvs(1),
        ],
        626_178,
    );
}
