//! The NetworkPolicy oracle: which connections between pods the Kubernetes rules allow,
//! computed from the Kubernetes objects alone.
//!
//! Written from the NetworkPolicy specification (`networking.k8s.io/v1`), the way the upstream
//! network-policy e2e suite models reachability, and sharing no code with NCP's translation
//! (`nsx_core::ncp::policy`) or its label selectors (`nsx_core::k8s::selector`): an oracle that
//! shared them would agree with their bugs. The rules, in short:
//! - A pod is isolated for ingress (egress) when a policy of its namespace selects it and has
//!   `Ingress` (`Egress`) among its policy types (by default `Ingress`, plus `Egress` when the
//!   policy has egress rules). A connection must be allowed on both ends: egress of the
//!   source, ingress of the destination.
//! - An isolated pod accepts what at least one of its policies' rules allows: a rule allows a
//!   peer (no `from`/`to` is every peer) on a port (no `ports` is every port).
//! - A peer is a pod selector (pods of the policy's namespace), a namespace selector (every
//!   pod of the selected namespaces), both (the selected pods of the selected namespaces), or
//!   an IP block (the CIDR minus its exceptions).
//! - A port is a protocol (TCP by default) with a number, a range (`endPort`), a name (the
//!   destination pod's container port of that name and protocol), or no port (all of them).
//! - A pod always reaches itself (the e2e suite's `AllowLoopback`).
//!
//! One deviation is expected on purpose: NSX 2.4 cannot match SCTP ports, so a rule's SCTP
//! port allows the whole SCTP protocol (see `sctp_port_matches`).

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

/// A pod as the oracle sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OraclePod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ip: u32,
    /// Declared container ports: (name, number, protocol).
    pub ports: Vec<(Option<String>, u16, String)>,
}

/// The Kubernetes objects the verdicts depend on.
#[derive(Debug, Clone, Default)]
pub struct PolicyWorld {
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub policies: Vec<NetworkPolicy>,
}

/// (port, protocol) -> (source, destination) -> what the oracle says, for the cells the traced
/// dataplane gets wrong.
type WrongCells = BTreeMap<(u16, String), BTreeMap<(usize, usize), bool>>;

impl PolicyWorld {
    /// Reads namespaces (labels) and policies from their JSON documents.
    pub fn from_docs(namespaces: &[Value], policies: &[Value]) -> Result<Self, String> {
        let mut w = PolicyWorld::default();
        for ns in namespaces {
            let name = ns["metadata"]["name"].as_str().unwrap_or_default();
            w.namespaces
                .insert(name.to_string(), labels_of(&ns["metadata"]["labels"]));
        }
        for p in policies {
            w.policies.push(
                serde_json::from_value(p.clone())
                    .map_err(|e| format!("a NetworkPolicy the oracle cannot read: {e}"))?,
            );
        }
        Ok(w)
    }

    /// Whether `src` may open a connection to `dst` on `port`/`protocol`.
    pub fn allows(&self, src: &OraclePod, dst: &OraclePod, port: u16, protocol: &str) -> bool {
        if src.namespace == dst.namespace && src.name == dst.name {
            return true;
        }
        self.side_allows(Direction::Egress, src, dst, port, protocol)
            && self.side_allows(Direction::Ingress, dst, src, port, protocol)
    }

    /// Whether `subject`'s policies of one direction let `peer` through (the port always
    /// belongs to the destination: `peer` for egress, `subject` for ingress).
    fn side_allows(
        &self,
        dir: Direction,
        subject: &OraclePod,
        peer: &OraclePod,
        port: u16,
        protocol: &str,
    ) -> bool {
        let destination = match dir {
            Direction::Ingress => subject,
            Direction::Egress => peer,
        };
        let mut isolated = false;
        for p in &self.policies {
            if p.metadata.namespace.as_deref() != Some(subject.namespace.as_str()) {
                continue;
            }
            let Some(spec) = &p.spec else { continue };
            // An omitted pod selector, like an empty one, selects every pod of the namespace.
            let selected = spec
                .pod_selector
                .as_ref()
                .is_none_or(|sel| selects(sel, &subject.labels));
            if !selected || !affects(p, dir) {
                continue;
            }
            isolated = true;
            // Each rule as (peers, ports).
            type Rule<'a> = (
                &'a Option<Vec<NetworkPolicyPeer>>,
                &'a Option<Vec<NetworkPolicyPort>>,
            );
            let rules: Vec<Rule<'_>> = match dir {
                Direction::Ingress => spec
                    .ingress
                    .iter()
                    .flatten()
                    .map(|r| (&r.from, &r.ports))
                    .collect(),
                Direction::Egress => spec
                    .egress
                    .iter()
                    .flatten()
                    .map(|r| (&r.to, &r.ports))
                    .collect(),
            };
            let policy_ns = subject.namespace.as_str();
            for (peers, ports) in rules {
                let peer_ok = match peers {
                    None => true,
                    Some(ps) if ps.is_empty() => true,
                    Some(ps) => ps.iter().any(|x| self.peer_matches(x, policy_ns, peer)),
                };
                let port_ok = match ports {
                    None => true,
                    Some(ps) if ps.is_empty() => true,
                    Some(ps) => ps
                        .iter()
                        .any(|x| port_matches(x, destination, port, protocol)),
                };
                if peer_ok && port_ok {
                    return true;
                }
            }
        }
        !isolated
    }

    fn peer_matches(&self, peer: &NetworkPolicyPeer, policy_ns: &str, pod: &OraclePod) -> bool {
        if let Some(block) = &peer.ip_block {
            return in_cidr(&block.cidr, pod.ip)
                && !block.except.iter().flatten().any(|e| in_cidr(e, pod.ip));
        }
        let ns_ok = match &peer.namespace_selector {
            None => pod.namespace == policy_ns,
            Some(sel) => {
                let empty = BTreeMap::new();
                let labels = self.namespaces.get(&pod.namespace).unwrap_or(&empty);
                selects(sel, labels)
            }
        };
        let pod_ok = match &peer.pod_selector {
            None => true,
            Some(sel) => selects(sel, &pod.labels),
        };
        // A peer with neither selector nor block is not valid; it selects nothing.
        let something = peer.namespace_selector.is_some() || peer.pod_selector.is_some();
        something && ns_ok && pod_ok
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

/// The policy's types: as written, or by default `Ingress`, plus `Egress` with egress rules.
fn affects(p: &NetworkPolicy, dir: Direction) -> bool {
    let Some(spec) = &p.spec else { return false };
    let name = match dir {
        Direction::Ingress => "Ingress",
        Direction::Egress => "Egress",
    };
    match &spec.policy_types {
        Some(types) if !types.is_empty() => types.iter().any(|t| t == name),
        _ => match dir {
            Direction::Ingress => true,
            Direction::Egress => spec.egress.as_ref().is_some_and(|e| !e.is_empty()),
        },
    }
}

fn labels_of(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect()
}

/// A label selector, as `metav1.LabelSelector` defines it: every `matchLabels` pair and every
/// expression must hold; the empty selector selects everything.
fn selects(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let pairs_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|e| {
        let have = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => have.is_some_and(|h| values.contains(h)),
            "NotIn" => have.is_none_or(|h| !values.contains(h)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            // An unknown operator is invalid: the apiserver would refuse the object.
            _ => false,
        }
    });
    pairs_ok && exprs_ok
}

fn port_matches(p: &NetworkPolicyPort, destination: &OraclePod, port: u16, protocol: &str) -> bool {
    let proto = p.protocol.as_deref().unwrap_or("TCP");
    if proto != protocol {
        return false;
    }
    if protocol == "SCTP" {
        return sctp_port_matches(p, destination);
    }
    match &p.port {
        None => true,
        Some(IntOrString::Int(n)) => {
            let end = p.end_port.unwrap_or(*n);
            (*n..=end).contains(&i32::from(port))
        }
        Some(IntOrString::String(name)) => destination
            .ports
            .iter()
            .any(|(n, number, pr)| n.as_deref() == Some(name) && pr == protocol && *number == port),
    }
}

/// The one deviation from the Kubernetes rules the oracle expects, because NSX 2.4 documents
/// it: its firewall services match TCP and UDP ports but not SCTP ports, so an SCTP port in a
/// rule can only be realized as the whole SCTP protocol. A numbered or ranged SCTP port then
/// allows every SCTP port; a named one allows every SCTP port of a destination that declares
/// the name over SCTP (and nothing on one that does not). NCP reports it as a Warning Event on
/// the policy.
fn sctp_port_matches(p: &NetworkPolicyPort, destination: &OraclePod) -> bool {
    match &p.port {
        None | Some(IntOrString::Int(_)) => true,
        Some(IntOrString::String(name)) => destination
            .ports
            .iter()
            .any(|(n, _, pr)| n.as_deref() == Some(name) && pr == "SCTP"),
    }
}

fn in_cidr(cidr: &str, ip: u32) -> bool {
    let Some((net, len)) = cidr.split_once('/') else {
        return false;
    };
    let (Ok(net), Ok(len)) = (net.parse::<std::net::Ipv4Addr>(), len.parse::<u32>()) else {
        return false;
    };
    if len > 32 {
        return false;
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    ip & mask == u32::from(net) & mask
}

/// The ports the oracle checks on a destination: each it declares (with its protocol), and one
/// TCP port it does not.
pub fn ports_to_check(dst: &OraclePod) -> Vec<(u16, String)> {
    let mut out: Vec<(u16, String)> = dst.ports.iter().map(|(_, n, p)| (*n, p.clone())).collect();
    out.sort();
    out.dedup();
    let undeclared = [81u16, 8081, 9, 65000]
        .into_iter()
        .find(|p| !out.iter().any(|(n, pr)| n == p && pr == "TCP"))
        .unwrap_or(65001);
    out.push((undeclared, "TCP".into()));
    out
}

/// Reads a pod's document as the oracle sees it (`None`: host network, or no address yet).
fn oracle_pod(doc: &Value, ip: u32) -> Option<OraclePod> {
    if doc["spec"]["hostNetwork"].as_bool() == Some(true) {
        return None;
    }
    let mut ports = Vec::new();
    for c in doc["spec"]["containers"].as_array().into_iter().flatten() {
        for p in c["ports"].as_array().into_iter().flatten() {
            let Some(n) = p["containerPort"]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
            else {
                continue;
            };
            ports.push((
                p["name"].as_str().map(str::to_string),
                n,
                p["protocol"].as_str().unwrap_or("TCP").to_string(),
            ));
        }
    }
    Some(OraclePod {
        namespace: doc["metadata"]["namespace"].as_str()?.to_string(),
        name: doc["metadata"]["name"].as_str()?.to_string(),
        labels: labels_of(&doc["metadata"]["labels"]),
        ip,
        ports,
    })
}

impl super::world::World {
    /// Compares the oracle's verdict with the traced dataplane for every pair of wired pods,
    /// on every port the destination declares and one it does not. `Err` prints the differing
    /// cells as reachability tables, one per port.
    /// The traced verdict of every (source, destination, port) against the oracle's; the
    /// cells that differ go into `wrong`.
    fn oracle_cells(
        &self,
        policy: &PolicyWorld,
        pods: &[OraclePod],
        wrong: &mut WrongCells,
    ) -> Result<(), String> {
        for (j, dst) in pods.iter().enumerate() {
            for (port, protocol) in ports_to_check(dst) {
                let proto = super::names::protocol(&protocol)?;
                for (i, src) in pods.iter().enumerate() {
                    if i == j {
                        continue;
                    }
                    let want = policy.allows(src, dst, port, &protocol);
                    let from = super::names::Endpoint::Pod {
                        namespace: src.namespace.clone(),
                        name: src.name.clone(),
                    };
                    // What the firewall decided: a port the pod does not listen on is
                    // refused by the pod, after the network let the connection in.
                    let got = self
                        .connect(&from, dst.ip, proto, self.ephemeral_port(), port)?
                        .admitted();
                    if got != want {
                        wrong
                            .entry((port, protocol.clone()))
                            .or_default()
                            .insert((i, j), want);
                    }
                }
            }
        }
        Ok(())
    }

    pub fn check_policy_oracle(&self) -> Result<(), String> {
        let policy = PolicyWorld::from_docs(
            &self.api.list("namespaces"),
            &self.api.list("networkpolicies"),
        )?;
        let mut pods: Vec<OraclePod> = Vec::new();
        for doc in self.api.list("pods") {
            let (Some(ns), Some(name)) = (
                doc["metadata"]["namespace"].as_str(),
                doc["metadata"]["name"].as_str(),
            ) else {
                continue;
            };
            // Only pods wired on their node (a converged cluster wires every one that needs it).
            let Ok(at) = self.pod_at(ns, name) else {
                continue;
            };
            pods.extend(oracle_pod(&doc, at.ip));
        }
        // (port, protocol) -> (source, destination) -> (oracle, traced), differing cells only.
        let mut wrong: WrongCells = BTreeMap::new();
        // The verdicts are what is compared; no path of these connections is printed.
        let was_quiet = self.quiet_paths.replace(true);
        let result = self.oracle_cells(&policy, &pods, &mut wrong);
        self.quiet_paths.set(was_quiet);
        result?;
        if wrong.is_empty() {
            return Ok(());
        }
        let name = |p: &OraclePod| format!("{}/{}", p.namespace, p.name);
        let mut out = String::from(
            "the traced dataplane differs from the Kubernetes NetworkPolicy rules \
             (cells: what the rules say; `!` marks a cell the dataplane gets wrong)",
        );
        for ((port, protocol), cells) in &wrong {
            let rows: std::collections::BTreeSet<usize> = cells.keys().map(|(i, _)| *i).collect();
            let cols: std::collections::BTreeSet<usize> = cells.keys().map(|(_, j)| *j).collect();
            out.push_str(&format!("\n{protocol} {port}:\n-"));
            for j in &cols {
                out.push_str(&format!(" {:>8}", name(&pods[*j])));
            }
            for i in &rows {
                out.push_str(&format!("\n{}", name(&pods[*i])));
                for j in &cols {
                    let cell = match cells.get(&(*i, *j)) {
                        Some(true) => ".!".to_string(),
                        Some(false) => "X!".to_string(),
                        None if *i == *j => "-".to_string(),
                        None => {
                            if policy.allows(&pods[*i], &pods[*j], *port, protocol) {
                                ".".into()
                            } else {
                                "X".into()
                            }
                        }
                    };
                    out.push_str(&format!(" {cell:>8}"));
                }
            }
        }
        Err(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ip: u32) -> OraclePod {
        OraclePod {
            namespace: ns.into(),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ip,
            ports: vec![(Some("http".into()), 8080, "TCP".into())],
        }
    }

    fn world(policies: Vec<Value>) -> PolicyWorld {
        PolicyWorld::from_docs(
            &[
                json!({"metadata": {"name": "x", "labels": {"ns": "x"}}}),
                json!({"metadata": {"name": "y", "labels": {"ns": "y"}}}),
            ],
            &policies,
        )
        .expect("policies parse")
    }

    fn policy(ns: &str, spec: Value) -> Value {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": ns}, "spec": spec})
    }

    #[test]
    fn no_policy_allows_and_deny_all_isolates_but_loopback() {
        let (a, b) = (pod("x", "a", &[("pod", "a")], 1), pod("x", "b", &[], 2));
        assert!(world(vec![]).allows(&a, &b, 80, "TCP"));
        let w = world(vec![policy("x", json!({"podSelector": {}}))]);
        assert!(!w.allows(&a, &b, 80, "TCP"));
        assert!(w.allows(&a, &a, 80, "TCP"));
        // Egress was not named: x may still send to y.
        let c = pod("y", "c", &[], 3);
        assert!(w.allows(&a, &c, 80, "TCP"));
        assert!(!w.allows(&c, &a, 80, "TCP"));
    }

    #[test]
    fn peers_namespace_and_pod_selectors_and_blocks() {
        let a = pod("x", "a", &[("pod", "a")], 0x0a04_0001);
        let yb = pod("y", "b", &[("pod", "b")], 0x0a04_0102);
        let yc = pod("y", "c", &[("pod", "c")], 0x0a04_0103);
        let xb = pod("x", "b", &[("pod", "b")], 0x0a04_0002);
        let both = world(vec![policy(
            "x",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )]);
        assert!(both.allows(&yb, &a, 80, "TCP"));
        assert!(!both.allows(&yc, &a, 80, "TCP"));
        assert!(!both.allows(&xb, &a, 80, "TCP"), "x is not labelled ns=y");
        let pods_only = world(vec![policy(
            "x",
            json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        )]);
        assert!(pods_only.allows(&xb, &a, 80, "TCP"));
        assert!(
            !pods_only.allows(&yb, &a, 80, "TCP"),
            "pods of the policy's namespace only"
        );
        let block = world(vec![policy(
            "x",
            json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.4.1.0/24", "except": ["10.4.1.3/32"]}}]}]}),
        )]);
        assert!(block.allows(&yb, &a, 80, "TCP"));
        assert!(!block.allows(&yc, &a, 80, "TCP"));
        let exprs = world(vec![policy(
            "x",
            json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["c"]}]}}]}]}),
        )]);
        assert!(exprs.allows(&yb, &a, 80, "TCP"));
        assert!(!exprs.allows(&yc, &a, 80, "TCP"));
    }

    #[test]
    fn an_sctp_port_allows_the_whole_protocol_as_nsx_realizes_it() {
        let a = pod("x", "a", &[], 1);
        let mut b = pod("x", "b", &[], 2);
        b.ports.push((Some("assoc".into()), 80, "SCTP".into()));
        let c = pod("x", "c", &[], 3);
        let numbered = world(vec![policy(
            "x",
            json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "SCTP", "port": 80}]}]}),
        )]);
        assert!(numbered.allows(&a, &b, 80, "SCTP"));
        assert!(numbered.allows(&a, &b, 81, "SCTP"), "NSX: every SCTP port");
        assert!(!numbered.allows(&a, &b, 80, "TCP"));
        let named = world(vec![policy(
            "x",
            json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "SCTP", "port": "assoc"}]}]}),
        )]);
        assert!(named.allows(&a, &b, 9, "SCTP"), "b declares the name");
        assert!(!named.allows(&a, &c, 80, "SCTP"), "c does not");
    }

    #[test]
    fn ports_names_ranges_protocols_and_egress() {
        let a = pod("x", "a", &[], 1);
        let b = pod("x", "b", &[], 2);
        let named = world(vec![policy(
            "x",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]}),
        )]);
        assert!(named.allows(&a, &b, 8080, "TCP"));
        assert!(!named.allows(&a, &b, 80, "TCP"));
        assert!(!named.allows(&a, &b, 8080, "UDP"));
        let range = world(vec![policy(
            "x",
            json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP", "port": 5000, "endPort": 5010}]}]}),
        )]);
        assert!(range.allows(&a, &b, 5005, "UDP"));
        assert!(!range.allows(&a, &b, 5011, "UDP"));
        assert!(!range.allows(&a, &b, 5005, "TCP"));
        let egress = world(vec![policy(
            "x",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "http"}]}]}),
        )]);
        assert!(
            egress.allows(&a, &b, 8080, "TCP"),
            "named port of the destination"
        );
        assert!(!egress.allows(&a, &b, 53, "UDP"));
        let empty_egress = world(vec![policy("x", json!({"podSelector": {}, "egress": []}))]);
        assert!(
            empty_egress.allows(&a, &pod("y", "c", &[], 3), 80, "TCP"),
            "no Egress type"
        );
        assert_eq!(
            ports_to_check(&a),
            vec![(8080, "TCP".into()), (81, "TCP".into())]
        );
    }
}
