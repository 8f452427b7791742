//! NetworkPolicy conformance from generated cases: random NetworkPolicy sets over the upstream
//! e2e model (namespaces x, y and z; pods a, b and c in each; ports 80 and 81 over TCP, UDP and
//! SCTP), realized by NCP in a simulated cluster and traced through OVS and NSX, with every
//! pod pair on every declared port (and one undeclared) compared with the NetworkPolicy oracle
//! (`nsx_sim::scenario::oracle`, written from the Kubernetes API reference and sharing no code
//! with NCP's translation). The oracle runs after every `converge` of a scenario that applies a
//! policy, so a case is a scenario: the cluster, a first policy set, then an in-place change
//! (policies edited or deleted, a pod or namespace relabelled, a pod recreated with other
//! numbers for its port names), each followed by a converge.
//!
//! What the generator covers: pod selectors with `matchLabels` and each `matchExpressions`
//! operator (and both); namespace selectors, pod selectors and both in one peer; `ipBlock` with
//! and without `except`; numbered, ranged (`endPort`) and named ports, including a name that
//! means port 80 on some pods and 81 on others (`web` over TCP, `data` over UDP); TCP, UDP,
//! SCTP and the default protocol; `policyTypes` given (including empty) and defaulted; rules,
//! peers and ports empty versus absent; several policies on one pod.
//!
//! Failures shrink to a minimal case, kept in `proptest-regressions/policy_conformance.txt`.
//! The run is seeded (`PROPTEST_RNG_SEED`, default 25) and its size is `PROPTEST_CASES`
//! (default 12 here; CI runs 300 in release, and a long sweep is
//! `PROPTEST_CASES=10000 cargo test --release -p nsx-sim --test policy_conformance`).

use std::path::Path;

use nsx_sim::scenario::run::{RunOptions, run};
use nsx_sim::scenario::spec::parse;
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, RngSeed};
use serde_json::{Value, json};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const TIERS: [&str; 2] = ["front", "back"];
const TEAMS: [&str; 2] = ["t0", "t1"];
/// Port names the rules use: per-pod names (`web`, `data`), names every pod gives the same
/// number, and a name no pod declares.
const NAMES: [&str; 6] = [
    "web",
    "data",
    "serve-80-tcp",
    "serve-81-udp",
    "serve-80-sctp",
    "nope",
];

/// A label selector over one label key with two or three values.
#[derive(Debug, Clone)]
enum Sel {
    Empty,
    Label(u8),
    In(Vec<u8>),
    NotIn(Vec<u8>),
    Exists,
    DoesNotExist,
    /// `matchLabels` and an expression together.
    Both(u8, Box<Sel>),
}

fn sel() -> impl Strategy<Value = Sel> {
    let values = proptest::collection::vec(0u8..3, 1..3);
    let leaf = prop_oneof![
        2 => Just(Sel::Empty),
        3 => (0u8..3).prop_map(Sel::Label),
        2 => values.clone().prop_map(Sel::In),
        2 => values.prop_map(Sel::NotIn),
        1 => Just(Sel::Exists),
        1 => Just(Sel::DoesNotExist),
    ];
    prop_oneof![
        6 => leaf.clone(),
        1 => (0u8..3, leaf).prop_map(|(v, s)| Sel::Both(v, Box::new(s))),
    ]
}

/// `sel` over pods (`pod: a|b|c`, `tier: front|back`) or namespaces (`ns: x|y|z`,
/// `team: t0|t1`); `alt` picks the second key.
fn selector(s: &Sel, namespaces: bool, alt: bool) -> Value {
    let (key, values): (&str, &[&str]) = match (namespaces, alt) {
        (false, false) => ("pod", &PODS),
        (false, true) => ("tier", &TIERS),
        (true, false) => ("ns", &NAMESPACES),
        (true, true) => ("team", &TEAMS),
    };
    let v = |i: &u8| values[*i as usize % values.len()];
    let expr = |op: &str, vs: Option<&Vec<u8>>| {
        let mut e = json!({"key": key, "operator": op});
        if let Some(vs) = vs {
            e["values"] = json!(vs.iter().map(v).collect::<Vec<_>>());
        }
        e
    };
    match s {
        Sel::Empty => json!({}),
        Sel::Label(i) => json!({"matchLabels": {key: v(i)}}),
        Sel::In(vs) => json!({"matchExpressions": [expr("In", Some(vs))]}),
        Sel::NotIn(vs) => json!({"matchExpressions": [expr("NotIn", Some(vs))]}),
        Sel::Exists => json!({"matchExpressions": [expr("Exists", None)]}),
        Sel::DoesNotExist => json!({"matchExpressions": [expr("DoesNotExist", None)]}),
        Sel::Both(i, inner) => {
            // The label on the other key, so that the two constrain different labels.
            let mut out = selector(inner, namespaces, !alt);
            let other = selector(&Sel::Label(*i), namespaces, alt);
            out["matchLabels"] = other["matchLabels"].clone();
            out
        }
    }
}

#[derive(Debug, Clone)]
enum Peer {
    Pods(Sel, bool),
    Namespaces(Sel, bool),
    Both(Sel, bool, Sel, bool),
    /// `cidr` and the exceptions, as indices into `BLOCKS` / `EXCEPTS`.
    Block(u8, Vec<u8>),
}

/// Pod addresses come from the namespaces' /24s inside 10.4.0.0/16; these cut across them.
const BLOCKS: [&str; 5] = [
    "10.4.0.0/16",
    "0.0.0.0/0",
    "10.4.0.0/21",
    "10.4.4.0/22",
    "10.4.2.0/23",
];
const EXCEPTS: [&str; 5] = [
    "10.4.2.0/24",
    "10.4.3.0/25",
    "10.4.4.0/30",
    "10.4.5.2/31",
    "10.4.0.0/16",
];

fn peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        3 => (sel(), any::<bool>()).prop_map(|(s, a)| Peer::Pods(s, a)),
        2 => (sel(), any::<bool>()).prop_map(|(s, a)| Peer::Namespaces(s, a)),
        2 => (sel(), any::<bool>(), sel(), any::<bool>()).prop_map(|(n, na, p, pa)| Peer::Both(n, na, p, pa)),
        2 => (0u8..5, proptest::collection::vec(0u8..5, 0..3)).prop_map(|(c, e)| Peer::Block(c, e)),
    ]
}

fn peer_json(p: &Peer) -> Value {
    match p {
        Peer::Pods(s, a) => json!({"podSelector": selector(s, false, *a)}),
        Peer::Namespaces(s, a) => json!({"namespaceSelector": selector(s, true, *a)}),
        Peer::Both(n, na, s, sa) => json!({
            "namespaceSelector": selector(n, true, *na),
            "podSelector": selector(s, false, *sa),
        }),
        Peer::Block(c, e) => {
            let mut b = json!({"cidr": BLOCKS[*c as usize]});
            if !e.is_empty() {
                b["except"] = json!(e.iter().map(|i| EXCEPTS[*i as usize]).collect::<Vec<_>>());
            }
            json!({"ipBlock": b})
        }
    }
}

#[derive(Debug, Clone)]
enum PortNum {
    None,
    Number(u16),
    Range(u16, u16),
    Name(u8),
}

#[derive(Debug, Clone)]
struct Port {
    /// None (TCP by default), TCP, UDP, SCTP.
    protocol: u8,
    port: PortNum,
}

fn port() -> impl Strategy<Value = Port> {
    let num = prop_oneof![
        1 => Just(PortNum::None),
        3 => prop_oneof![Just(80u16), Just(81), Just(8081)].prop_map(PortNum::Number),
        1 => prop_oneof![Just((80u16, 81u16)), Just((81, 8081)), Just((79, 80))].prop_map(|(a, b)| PortNum::Range(a, b)),
        4 => (0u8..6).prop_map(PortNum::Name),
    ];
    (0u8..4, num).prop_map(|(protocol, port)| Port { protocol, port })
}

fn port_json(p: &Port) -> Value {
    let mut out = json!({});
    if p.protocol > 0 {
        out["protocol"] = json!(["TCP", "UDP", "SCTP"][p.protocol as usize - 1]);
    }
    match &p.port {
        PortNum::None => {}
        PortNum::Number(n) => out["port"] = json!(n),
        PortNum::Range(a, b) => {
            out["port"] = json!(a);
            out["endPort"] = json!(b);
        }
        PortNum::Name(i) => out["port"] = json!(NAMES[*i as usize]),
    }
    out
}

/// A list field that may be absent, empty, or hold items: the three mean different things.
fn listed<T: std::fmt::Debug + Clone + 'static>(
    item: BoxedStrategy<T>,
    max: usize,
) -> impl Strategy<Value = Option<Vec<T>>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(vec![])),
        4 => proptest::collection::vec(item, 1..=max).prop_map(Some),
    ]
}

#[derive(Debug, Clone)]
struct Rule {
    peers: Option<Vec<Peer>>,
    ports: Option<Vec<Port>>,
}

fn rule() -> impl Strategy<Value = Rule> {
    (listed(peer().boxed(), 2), listed(port().boxed(), 3))
        .prop_map(|(peers, ports)| Rule { peers, ports })
}

#[derive(Debug, Clone)]
struct Policy {
    ns: u8,
    name: u8,
    selector: (Sel, bool),
    /// Absent, or a subset of Ingress and Egress (bit 0 and bit 1).
    types: Option<u8>,
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        0u8..3,
        0u8..2,
        (sel(), any::<bool>()),
        prop_oneof![2 => Just(None), 3 => (0u8..4).prop_map(Some)],
        listed(rule().boxed(), 2),
        listed(rule().boxed(), 2),
    )
        .prop_map(|(ns, name, selector, types, ingress, egress)| Policy {
            ns,
            name,
            selector,
            types,
            ingress,
            egress,
        })
}

fn policy_json(p: &Policy) -> Value {
    let mut spec = json!({"podSelector": selector(&p.selector.0, false, p.selector.1)});
    if let Some(t) = p.types {
        let mut types = Vec::new();
        if t & 1 != 0 {
            types.push("Ingress");
        }
        if t & 2 != 0 {
            types.push("Egress");
        }
        spec["policyTypes"] = json!(types);
    }
    let rules = |rules: &Vec<Rule>, peers_key: &str| {
        rules
            .iter()
            .map(|r| {
                let mut out = json!({});
                if let Some(ps) = &r.peers {
                    out[peers_key] = json!(ps.iter().map(peer_json).collect::<Vec<_>>());
                }
                if let Some(ps) = &r.ports {
                    out["ports"] = json!(ps.iter().map(port_json).collect::<Vec<_>>());
                }
                out
            })
            .collect::<Vec<_>>()
    };
    if let Some(rs) = &p.ingress {
        spec["ingress"] = json!(rules(rs, "from"));
    }
    if let Some(rs) = &p.egress {
        spec["egress"] = json!(rules(rs, "to"));
    }
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": format!("p{}", p.name), "namespace": NAMESPACES[p.ns as usize]},
        "spec": spec,
    })
}

/// One pod of the nine: its `tier` label (none, front, back) and whether it calls port 81
/// `web` (TCP) and `data` (UDP) instead of port 80.
#[derive(Debug, Clone, Copy)]
struct PodShape {
    tier: u8,
    web81: bool,
    data81: bool,
}

fn pod_shape() -> impl Strategy<Value = PodShape> {
    (
        0u8..3,
        proptest::bool::weighted(0.3),
        proptest::bool::weighted(0.3),
    )
        .prop_map(|(tier, web81, data81)| PodShape {
            tier,
            web81,
            data81,
        })
}

fn pod_json(ns: usize, pod: usize, s: &PodShape) -> Value {
    let mut labels = json!({"pod": PODS[pod]});
    if s.tier > 0 {
        labels["tier"] = json!(TIERS[s.tier as usize - 1]);
    }
    let name = |flip: bool, shared: &str, plain: &str, number: u16| {
        // `shared` names port 80, or port 81 when flipped; the other port keeps its plain name.
        let is_80 = number == 80;
        if is_80 != flip {
            shared.to_string()
        } else {
            format!(
                "{plain}-{number}-{}",
                if shared == "web" { "tcp" } else { "udp" }
            )
        }
    };
    let ports = json!([
        {"name": name(s.web81, "web", "serve", 80), "containerPort": 80},
        {"name": name(s.web81, "web", "serve", 81), "containerPort": 81},
        {"name": name(s.data81, "data", "serve", 80), "containerPort": 80, "protocol": "UDP"},
        {"name": name(s.data81, "data", "serve", 81), "containerPort": 81, "protocol": "UDP"},
        {"name": "serve-80-sctp", "containerPort": 80, "protocol": "SCTP"},
        {"name": "serve-81-sctp", "containerPort": 81, "protocol": "SCTP"},
    ]);
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": PODS[pod], "namespace": NAMESPACES[ns], "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "agnhost", "ports": ports}]},
    })
}

fn namespace_json(ns: usize, team: u8) -> Value {
    let mut labels = json!({"ns": NAMESPACES[ns]});
    if team > 0 {
        labels["team"] = json!(TEAMS[team as usize - 1]);
    }
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACES[ns], "labels": labels}})
}

/// What changes in place after the first converge.
#[derive(Debug, Clone)]
enum Change {
    /// Apply these policies (same names edit in place), and delete the policies named.
    Policies(Vec<Policy>, Vec<(u8, u8)>),
    /// A pod's `tier` label changed.
    RelabelPod(u8, u8),
    /// A namespace's `team` label changed.
    RelabelNamespace(u8, u8),
    /// A pod deleted and created again under its name, with its port names flipped.
    RecreatePod(u8),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (proptest::collection::vec(policy(), 0..3), proptest::collection::vec((0u8..3, 0u8..2), 0..2))
            .prop_map(|(p, d)| Change::Policies(p, d)),
        1 => (0u8..9, 0u8..3).prop_map(|(p, t)| Change::RelabelPod(p, t)),
        1 => (0u8..3, 0u8..3).prop_map(|(n, t)| Change::RelabelNamespace(n, t)),
        1 => (0u8..9).prop_map(Change::RecreatePod),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    teams: [u8; 3],
    pods: [PodShape; 9],
    policies: Vec<Policy>,
    change: Option<Change>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        [0u8..3, 0u8..3, 0u8..3],
        proptest::array::uniform9(pod_shape()),
        proptest::collection::vec(policy(), 1..4),
        proptest::option::weighted(0.7, change()),
    )
        .prop_map(|(teams, pods, policies, change)| Case {
            teams,
            pods,
            policies,
            change,
        })
}

fn apply(steps: &mut String, docs: &[Value]) {
    steps.push_str("  - apply: |\n");
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            steps.push_str("      ---\n");
        }
        steps.push_str("      ");
        steps.push_str(&d.to_string());
        steps.push('\n');
    }
}

const CONVERGE: &str = "  - converge: {within: 180s}\n";

/// The scenario of a case: every converge after the first policy runs the oracle.
fn scenario(c: &Case) -> String {
    let mut steps = String::new();
    let mut docs: Vec<Value> = (0..3).map(|n| namespace_json(n, c.teams[n])).collect();
    for n in 0..3 {
        for p in 0..3 {
            docs.push(pod_json(n, p, &c.pods[n * 3 + p]));
        }
    }
    apply(&mut steps, &docs);
    steps.push_str(CONVERGE);
    apply(
        &mut steps,
        &c.policies.iter().map(policy_json).collect::<Vec<_>>(),
    );
    steps.push_str(CONVERGE);
    match &c.change {
        None => {}
        Some(Change::Policies(edits, deletes)) => {
            if !edits.is_empty() {
                apply(
                    &mut steps,
                    &edits.iter().map(policy_json).collect::<Vec<_>>(),
                );
            }
            // Only policies that exist can be deleted (the apiserver answers 404 otherwise).
            let exists = |ns: u8, name: u8| {
                c.policies
                    .iter()
                    .chain(edits)
                    .any(|p| p.ns == ns && p.name == name)
            };
            let mut deletes: Vec<(u8, u8)> = deletes.clone();
            deletes.sort();
            deletes.dedup();
            for (ns, name) in deletes.iter().filter(|(n, p)| exists(*n, *p)) {
                steps.push_str(&format!(
                    "  - delete: {{kind: NetworkPolicy, namespace: \"{}\", name: p{name}}}\n",
                    NAMESPACES[*ns as usize]
                ));
            }
            steps.push_str(CONVERGE);
        }
        Some(Change::RelabelPod(i, tier)) => {
            let mut shape = c.pods[*i as usize];
            shape.tier = *tier;
            apply(
                &mut steps,
                &[pod_json(*i as usize / 3, *i as usize % 3, &shape)],
            );
            steps.push_str(CONVERGE);
        }
        Some(Change::RelabelNamespace(n, team)) => {
            apply(&mut steps, &[namespace_json(*n as usize, *team)]);
            steps.push_str(CONVERGE);
        }
        Some(Change::RecreatePod(i)) => {
            let (n, p) = (*i as usize / 3, *i as usize % 3);
            steps.push_str(&format!(
                "  - delete: {{kind: Pod, namespace: \"{}\", name: {}}}\n",
                NAMESPACES[n], PODS[p]
            ));
            let mut shape = c.pods[*i as usize];
            shape.web81 = !shape.web81;
            shape.data81 = !shape.data81;
            apply(&mut steps, &[pod_json(n, p, &shape)]);
            steps.push_str(CONVERGE);
        }
    }
    steps.push_str("  - expect: {converged: true, invariants: true, policy_oracle: true}\n");
    format!("name: conformance\ncluster: {{nodes: 3}}\nsteps:\n{steps}")
}

static CASES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
static FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: env("PROPTEST_CASES").unwrap_or(12),
        rng_seed: RngSeed::Fixed(env("PROPTEST_RNG_SEED").unwrap_or(25)),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/policy_conformance.txt"))),
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn generated_policies_allow_exactly_what_kubernetes_allows(c in case(), seed in 0u64..1_000_000) {
        let n = CASES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let text = scenario(&c);
        let s = parse(Path::new("conformance.yaml"), &text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let (r, _) = run(&s, seed, &RunOptions::default());
        if !r.passed && !FAILED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!("the first failing case is case {n}");
        }
        prop_assert!(r.passed, "case {n}, seed {seed}: step {:?}: {}\n{text}", r.failed_step, r.message.unwrap_or_default());
    }
}

/// The reproduction, kept as a scenario of the suite: one name, two numbers, for
/// ingress and for egress, an ipBlock peer's named port, and a pod recreated with another.
#[test]
fn the_named_ports_scenario_passes() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/named-ports.yaml");
    let text = std::fs::read_to_string(&path).expect("bundled scenario");
    let s = parse(&path, &text).expect("valid");
    for seed in [1, 2, 3] {
        let (r, _) = run(&s, seed, &RunOptions::default());
        assert!(
            r.passed,
            "seed {seed}: step {:?}: {}",
            r.failed_step,
            r.message.unwrap_or_default()
        );
    }
}
