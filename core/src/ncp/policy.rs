//! NetworkPolicy as NSX distributed firewall: NSGroups, IPSets and firewall sections.
//!
//! **Layout.** Two marker sections per cluster, top and bottom. Each policy gets an allow
//! section right below the top marker (its ingress rules `ir-...`, direction IN, and egress
//! rules `er-...`, direction OUT, all ALLOW and applied to the pods the policy selects) and an
//! isolation section right above the bottom marker (DROP IN and/or DROP OUT, applied to the
//! same pods). Every allow rule of every policy is met before any isolation rule, so a
//! connection is allowed when any policy allows it (the union Kubernetes asks for), and a pod
//! selected by a policy of a direction loses everything else in that direction. Traffic of
//! unselected pods falls through both markers to the admin's sections. The firewall is
//! evaluated at both ends (OUT at the sender's port, IN at the receiver's), so a connection
//! needs the sender's egress and the receiver's ingress, as Kubernetes says; sections are
//! stateful, so replies pass.
//!
//! **Selections.** A pod selector becomes NSGroup tag criteria on logical ports (a pod's port
//! carries its labels as tags and its namespace's `ncp/project_uid`): `matchLabels`, `In` and
//! `Exists` expand to at most 5 ORed criteria of at most 5 ANDed tag expressions, as NSX
//! allows. What tags cannot say (`NotIn`, `DoesNotExist`, larger expansions, a pod selector
//! joined with a namespace selector over more namespaces than criteria allow) becomes an
//! NSGroup of explicit pod ports that NCP keeps up to date; a bare namespace selector becomes
//! an NSGroup whose members are the selected namespaces' NSGroups. `ipBlock` becomes an IPSet
//! of the CIDR minus its exceptions.
//!
//! **Ports.** Numbers and ranges (`endPort`) become L4 port-set services. A named port is the
//! number each pod on the receiving side (the selected pods for ingress, the peer pods for
//! egress) gives that name, and two pods may give it different numbers: each receiver must get
//! its own number only. When every receiver resolves a rule's names alike, the numbers join the
//! rule's other ports; otherwise the receivers are grouped by the numbers they resolve to, and
//! each group (an NSGroup of explicit pods, one per distinct resolution) gets a rule of its own
//! that reaches only it (as destination). A name resolves only on a pod: an egress rule without
//! peers reaches the cluster's pods by name (a group of every pod port by tag when they all
//! agree), and an ipBlock peer's named ports reach only the pods whose addresses the block
//! holds, never an address outside the cluster. NSX 2.4 cannot match SCTP ports: an SCTP port
//! becomes the SCTP protocol, which allows every SCTP port, and is reported.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::naming::{self, ns_tags, scope, tag};
use super::vocab::{
    Detail, Key, LiveNamespaces, Problem, RuleSpec, Selection, ServiceSpec, Spec, pod_is_wired,
};
use crate::k8s::{ClusterView, selector};
use crate::nsx::model::Tag;
use scope::{FW_SECT_TYPE, POLICY_UID};

/// NSX limits on an NSGroup (2.4): ORed criteria, ANDed expressions in one, static members.
pub const CRITERIA_MAX: usize = 5;
pub const EXPRESSIONS_MAX: usize = 5;
pub const MEMBERS_MAX: usize = 500;
/// Ports or ranges in one L4 port-set service.
pub const PORTS_PER_SERVICE: usize = 15;

fn wired_pods<'v>(
    view: &'v ClusterView,
    namespaces: &BTreeSet<&str>,
    sel: Option<&LabelSelector>,
) -> Vec<&'v Pod> {
    let sel = sel.map(selector::Compiled::new);
    // By namespace range: the cost is the selected namespaces' pods, not the cluster's.
    namespaces
        .iter()
        .flat_map(|ns| {
            view.pods
                .range((ns.to_string(), String::new())..)
                .take_while(move |((n, _), _)| n == ns)
        })
        .filter(|(_, p)| {
            pod_is_wired(p)
                && sel
                    .as_ref()
                    .is_none_or(|s| s.matches(p.metadata.labels.as_ref()))
        })
        .map(|(_, p)| p)
        .collect()
}

fn uid_of(ns: &Namespace) -> String {
    ns.metadata.uid.clone().unwrap_or_default()
}

/// The selection of pods matching `sel` in `namespaces` (names).
fn select(
    view: &ClusterView,
    live_ns: LiveNamespaces<'_>,
    namespaces: &BTreeSet<&str>,
    sel: &LabelSelector,
) -> Selection {
    let uids: Vec<String> = namespaces
        .iter()
        .filter_map(|n| live_ns.get(n).map(uid_of))
        .collect();
    let dnf = selector::positive_dnf(sel, CRITERIA_MAX);
    if let Some(dnf) = dnf
        && dnf.len() * uids.len() <= CRITERIA_MAX
        && dnf.iter().all(|t| t.len() < EXPRESSIONS_MAX)
    {
        let mut criteria = Vec::new();
        for u in &uids {
            for t in &dnf {
                let mut c = vec![(scope::PROJECT_UID.to_string(), Some(u.clone()))];
                c.extend(t.iter().cloned());
                criteria.push(c);
            }
        }
        return Selection::Criteria(criteria);
    }
    let mut pods: Vec<String> = wired_pods(view, namespaces, Some(sel))
        .into_iter()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    pods.sort();
    Selection::Pods(pods)
}

/// Namespaces (names) whose labels match `sel`.
fn namespaces_matching<'a>(live_ns: LiveNamespaces<'a>, sel: &LabelSelector) -> BTreeSet<&'a str> {
    let sel = selector::Compiled::new(sel);
    live_ns
        .iter()
        .filter(|(_, ns)| sel.matches(ns.metadata.labels.as_ref()))
        .map(|(n, _)| n)
        .collect()
}

/// CIDR `a.b.c.d/n` (ipnet's parser) as (network, prefix): host bits are cleared, as
/// Kubernetes reads an ipBlock.
fn parse_cidr(text: &str) -> Option<(u32, u8)> {
    let net: Ipv4Net = text.parse().ok()?;
    Some((u32::from(net.network()), net.prefix_len()))
}

fn net((addr, prefix): (u32, u8)) -> Option<Ipv4Net> {
    Ipv4Net::new(std::net::Ipv4Addr::from(addr), prefix).ok()
}

fn cidr_text(cidr: (u32, u8)) -> String {
    net(cidr).map(|n| n.trunc().to_string()).unwrap_or_default()
}

fn contains(outer: (u32, u8), inner: (u32, u8)) -> bool {
    matches!((net(outer), net(inner)), (Some(a), Some(b)) if a.trunc().contains(&b))
}

/// `cidr` minus `except`, as a minimal list of CIDRs (splitting halves around each hole).
pub fn subtract(cidr: (u32, u8), except: &[(u32, u8)]) -> Vec<(u32, u8)> {
    if except.iter().any(|e| contains(*e, cidr)) {
        return vec![];
    }
    let holes: Vec<(u32, u8)> = except
        .iter()
        .copied()
        .filter(|e| contains(cidr, *e))
        .collect();
    if holes.is_empty() {
        return vec![cidr];
    }
    let (net, prefix) = cidr;
    let half = 1u32 << (31 - prefix);
    let mut out = subtract((net, prefix + 1), &holes);
    out.extend(subtract((net | half, prefix + 1), &holes));
    out
}

struct PolicyCtx<'a> {
    view: &'a ClusterView,
    cluster: &'a str,
    live_ns: LiveNamespaces<'a>,
    ns_name: &'a str,
    ns: &'a Namespace,
    name: &'a str,
    uid: String,
    problems: Vec<Problem>,
}

impl<'a> PolicyCtx<'a> {
    fn problem(&mut self, message: String) {
        self.problems.push(Problem {
            namespace: self.ns_name.to_string(),
            policy: self.name.to_string(),
            uid: self.uid.clone(),
            message,
        });
    }

    fn tags(&self, role: &str) -> Vec<Tag> {
        let mut t = ns_tags(self.cluster, self.ns);
        t.push(tag(POLICY_UID, &self.uid));
        t.push(tag(scope::ROLE, role));
        t.push(tag(
            "ncp/network_policy",
            &format!("{}/{}", self.ns_name, self.name),
        ));
        t
    }

    /// The target of one peer, with the objects it needs; `None` for a peer that can select
    /// nothing valid (reported).
    fn peer(
        &mut self,
        peer: &NetworkPolicyPeer,
        role: &str,
        objects: &mut BTreeMap<Key, Spec>,
    ) -> Option<(Key, Vec<&'a Pod>)> {
        let own: BTreeSet<&str> = [self.ns_name].into();
        let dn = naming::name(self.cluster, &[self.ns_name, self.name, role]);
        if let Some(block) = &peer.ip_block {
            let Some(cidr) = parse_cidr(&block.cidr) else {
                self.problem(format!("ipBlock cidr {:?} is not an IPv4 CIDR", block.cidr));
                return None;
            };
            let mut except = Vec::new();
            for e in block.except.iter().flatten() {
                match parse_cidr(e) {
                    Some(c) => except.push(c),
                    None => {
                        self.problem(format!("ipBlock except {e:?} is not an IPv4 CIDR"));
                        return None;
                    }
                }
            }
            let addresses: Vec<String> =
                subtract(cidr, &except).into_iter().map(cidr_text).collect();
            let key = Key::PolicyIpSet(format!("{}/{role}", self.uid));
            objects.insert(
                key.clone(),
                Spec {
                    display_name: dn,
                    tags: self.tags(role),
                    detail: Detail::IpSet { addresses },
                },
            );
            return Some((key, vec![]));
        }
        let view = self.view;
        let live_ns = self.live_ns;
        let (selection, pods) = match (&peer.namespace_selector, &peer.pod_selector) {
            (Some(nsel), None) => {
                let nss = namespaces_matching(live_ns, nsel);
                let uids: Vec<String> = nss
                    .iter()
                    .filter_map(|n| live_ns.get(n).map(uid_of))
                    .collect();
                if uids.len() > MEMBERS_MAX {
                    self.problem(format!(
                        "a namespace selector selects {} namespaces; an NSGroup holds {MEMBERS_MAX}",
                        uids.len()
                    ));
                    return None;
                }
                (Selection::Namespaces(uids), wired_pods(view, &nss, None))
            }
            (nsel, Some(psel)) => {
                let nss = match nsel {
                    Some(nsel) => namespaces_matching(live_ns, nsel),
                    None => own.clone(),
                };
                (
                    select(view, live_ns, &nss, psel),
                    wired_pods(view, &nss, Some(psel)),
                )
            }
            (None, None) => {
                self.problem("a peer with neither selector nor ipBlock selects nothing".into());
                return None;
            }
        };
        if let Selection::Pods(p) = &selection
            && p.len() > MEMBERS_MAX
        {
            self.problem(format!(
                "peer {role} selects {} pods by a selector NSX tags cannot express; an NSGroup holds {MEMBERS_MAX}",
                p.len()
            ));
            return None;
        }
        let key = Key::PolicyGroup(format!("{}/{role}", self.uid));
        objects.insert(
            key.clone(),
            Spec {
                display_name: dn,
                tags: self.tags(role),
                detail: Detail::Group { selection },
            },
        );
        Some((key, pods))
    }

    /// What one Kubernetes rule's ports become: NSX rules as (the pods they reach, when not
    /// every peer the rule names; their services). Empty when the rule can allow nothing.
    ///
    /// Numbers, ranges and whole protocols hold for every peer, in one rule. A named port is
    /// the number each receiving pod gives that name (the selected pods for ingress, the
    /// peer pods for egress), so it may differ between them: the receivers are grouped by the
    /// numbers they resolve the rule's names to, and each group gets its own rule reaching
    /// only its pods (an NSGroup of explicit pods). When every receiver resolves the names
    /// alike, `receivers` says what reaches them without listing pods.
    fn rule_parts(
        &mut self,
        ports: Option<&Vec<NetworkPolicyPort>>,
        receivers: &[&'a Pod],
        reach: Reach,
        role: &str,
        objects: &mut BTreeMap<Key, Spec>,
    ) -> Vec<(Option<Key>, Vec<ServiceSpec>)> {
        let Some(ports) = ports.filter(|p| !p.is_empty()) else {
            return vec![(None, vec![])];
        };
        let mut common = PortSet::default();
        let mut named: BTreeSet<(String, String)> = BTreeSet::new();
        for p in ports {
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            match &p.port {
                None => {
                    common.whole.insert(protocol);
                }
                Some(IntOrString::Int(n)) => {
                    let range = match p.end_port {
                        Some(end) if end > *n => format!("{n}-{end}"),
                        _ => n.to_string(),
                    };
                    common.add(&protocol, range);
                }
                Some(IntOrString::String(name)) => {
                    named.insert((protocol, name.clone()));
                }
            }
        }
        named.retain(|(protocol, _)| !common.whole.contains(protocol));
        // Receivers by the numbers they give the rule's names (uids, deduplicated).
        let mut groups: BTreeMap<PortSet, BTreeSet<String>> = BTreeMap::new();
        let mut resolving: BTreeSet<&str> = BTreeSet::new();
        let mut all: BTreeSet<&str> = BTreeSet::new();
        for pod in receivers {
            let Some(uid) = pod.metadata.uid.as_deref() else {
                continue;
            };
            all.insert(uid);
            let mut own = PortSet::default();
            for (protocol, name) in &named {
                for c in pod.spec.iter().flat_map(|s| &s.containers) {
                    for cp in c.ports.iter().flatten() {
                        if cp.name.as_deref() == Some(name.as_str())
                            && cp.protocol.as_deref().unwrap_or("TCP") == protocol
                        {
                            own.add(protocol, cp.container_port.to_string());
                        }
                    }
                }
            }
            if !own.is_empty() && resolving.insert(uid) {
                groups.entry(own).or_default().insert(uid.to_string());
            }
        }
        let mut uniform = None;
        if groups.len() == 1 && resolving.len() == all.len() && reach != Reach::Listed {
            uniform = groups.pop_first().map(|(own, _)| own);
        }
        let mut out = Vec::new();
        match (uniform, reach) {
            (Some(own), Reach::Peers) => common.extend(own),
            (Some(own), _) => {
                // Every pod of the cluster resolves the names alike: a group of them all by
                // their tags, which no pod's coming or going changes.
                let every_pod = Selection::Criteria(vec![vec![
                    (scope::CLUSTER.to_string(), Some(self.cluster.to_string())),
                    (scope::POD_UID.to_string(), None),
                ]]);
                let key = self.group(&format!("{role}-pods"), every_pod, objects);
                out.push((Some(key), self.services_of(&own)));
            }
            (None, _) => {}
        }
        if !common.is_empty() {
            out.insert(0, (None, self.services_of(&common)));
        }
        for (own, uids) in groups {
            if uids.len() > MEMBERS_MAX {
                self.problem(format!(
                    "{} pods give the named ports of rule {role} the numbers {}; an NSGroup holds {MEMBERS_MAX}",
                    uids.len(),
                    own.label()
                ));
                continue;
            }
            let role = format!("{role}-{}", naming::fit(&own.label(), 48));
            let key = self.group(&role, Selection::Pods(uids.into_iter().collect()), objects);
            out.push((Some(key), self.services_of(&own)));
        }
        out
    }

    /// Adds the policy's NSGroup of `role` holding `selection`; returns its key.
    fn group(&self, role: &str, selection: Selection, objects: &mut BTreeMap<Key, Spec>) -> Key {
        let key = Key::PolicyGroup(format!("{}/{role}", self.uid));
        objects.insert(
            key.clone(),
            Spec {
                display_name: naming::name(self.cluster, &[self.ns_name, self.name, role]),
                tags: self.tags(role),
                detail: Detail::Group { selection },
            },
        );
        key
    }

    /// NSX services for `ports`. NSX 2.4 cannot match SCTP ports: an SCTP port allows the
    /// whole protocol, and the policy says so in a Warning Event.
    fn services_of(&mut self, ports: &PortSet) -> Vec<ServiceSpec> {
        if ports.numbered.contains_key("SCTP") {
            self.problem(
                "NSX cannot match SCTP ports: every SCTP port of the peers is allowed".into(),
            );
        }
        let mut out = Vec::new();
        let whole = ports
            .whole
            .iter()
            .chain(ports.numbered.keys().filter(|p| *p == "SCTP"))
            .collect::<BTreeSet<_>>();
        for protocol in &whole {
            out.push(match protocol.as_str() {
                "SCTP" => ServiceSpec::Ip { number: 132 },
                _ => ServiceSpec::L4 {
                    protocol: protocol.to_string(),
                    ports: vec![],
                },
            });
        }
        for (protocol, ranges) in &ports.numbered {
            if whole.contains(protocol) {
                continue;
            }
            let ranges: Vec<String> = ranges.iter().cloned().collect();
            for chunk in ranges.chunks(PORTS_PER_SERVICE) {
                out.push(ServiceSpec::L4 {
                    protocol: protocol.clone(),
                    ports: chunk.to_vec(),
                });
            }
        }
        out
    }
}

/// What the receivers of a rule's named ports are, when they all resolve the names alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Exactly the pods the rule's peers select: the numbers join the rule's other ports.
    Peers,
    /// Every pod of the cluster (an egress rule without peers): one group of them all.
    AllPods,
    /// Some of the pods an ipBlock holds: always listed, one group per resolution.
    Listed,
}

/// A set of ports: protocols allowed whole, and numbers or ranges per protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
struct PortSet {
    whole: BTreeSet<String>,
    numbered: BTreeMap<String, BTreeSet<String>>,
}

impl PortSet {
    fn add(&mut self, protocol: &str, range: String) {
        self.numbered
            .entry(protocol.to_string())
            .or_default()
            .insert(range);
    }

    fn extend(&mut self, other: PortSet) {
        self.whole.extend(other.whole);
        for (protocol, ranges) in other.numbered {
            self.numbered.entry(protocol).or_default().extend(ranges);
        }
    }

    fn is_empty(&self) -> bool {
        self.whole.is_empty() && self.numbered.is_empty()
    }

    /// `tcp-80-8080.udp-53`: names the group of the pods that resolve a rule's names to these.
    fn label(&self) -> String {
        let mut parts: Vec<String> = self.whole.iter().map(|p| p.to_lowercase()).collect();
        for (protocol, ranges) in &self.numbered {
            let mut part = protocol.to_lowercase();
            if protocol != "SCTP" {
                for r in ranges {
                    part.push('-');
                    part.push_str(r);
                }
            }
            parts.push(part);
        }
        parts.join(".")
    }
}

/// The display name of the `k`th NSX rule made of a policy's `i`th rule of one direction.
fn rule_name(prefix: &str, cluster: &str, ns: &str, name: &str, i: usize, k: usize) -> String {
    let text = match k {
        0 => format!("{prefix}-{cluster}-{ns}-{name}-{i}"),
        _ => format!("{prefix}-{cluster}-{ns}-{name}-{i}.{k}"),
    };
    naming::fit(&text, naming::DISPLAY_NAME_MAX)
}

/// The cluster's wired pods whose address (as NCP allocated it, in the pod's network
/// annotation) lies in `block`: where a named port of an ipBlock peer can resolve.
fn pods_in_block<'v>(
    view: &'v ClusterView,
    live_ns: LiveNamespaces<'_>,
    block: &k8s_openapi::api::networking::v1::IPBlock,
) -> Vec<&'v Pod> {
    let Some(cidr) = parse_cidr(&block.cidr) else {
        return vec![];
    };
    let except: Vec<(u32, u8)> = block
        .except
        .iter()
        .flatten()
        .filter_map(|e| parse_cidr(e))
        .collect();
    let every: BTreeSet<&str> = live_ns.iter().map(|(n, _)| n).collect();
    wired_pods(view, &every, None)
        .into_iter()
        .filter(|p| {
            pod_address(p).is_some_and(|ip| {
                contains(cidr, (ip, 32)) && !except.iter().any(|e| contains(*e, (ip, 32)))
            })
        })
        .collect()
}

/// The address NCP gave a pod, from its network annotation.
fn pod_address(pod: &Pod) -> Option<u32> {
    let text = pod
        .metadata
        .annotations
        .as_ref()?
        .get(crate::k8s::annotation::POD_NETWORK)?;
    let net: crate::k8s::pod_network::PodNetwork = serde_json::from_str(text).ok()?;
    net.address().ok().map(|(ip, _)| ip)
}

/// A namespace's NSGroup: every pod port of the namespace (by its `ncp/project_uid` tag).
pub fn ns_group(cluster: &str, name: &str, ns: &Namespace) -> (Key, Spec) {
    let mut tags = ns_tags(cluster, ns);
    tags.push(tag(scope::ROLE, "ns"));
    (
        Key::NsGroup(uid_of(ns)),
        Spec {
            display_name: naming::name(cluster, &[name]),
            tags,
            detail: Detail::Group {
                selection: Selection::Criteria(vec![vec![(
                    scope::PROJECT_UID.to_string(),
                    Some(uid_of(ns)),
                )]]),
            },
        },
    )
}

/// Whose pods a policy's objects are computed from: what an incremental pass must recompute
/// the policy for when a pod changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodScope {
    /// The pods of its own namespace only.
    Own,
    /// Pods of any namespace: a namespace selector, or an egress rule whose named ports resolve
    /// on every pod (no peers, or an ipBlock).
    All,
}

/// Whether a rule's ports include a named one.
fn names_a_port(ports: Option<&Vec<NetworkPolicyPort>>) -> bool {
    ports
        .into_iter()
        .flatten()
        .any(|p| matches!(p.port, Some(IntOrString::String(_))))
}

fn pod_scope(spec: &k8s_openapi::api::networking::v1::NetworkPolicySpec) -> PodScope {
    let cross = |peers: Option<&Vec<NetworkPolicyPeer>>| {
        peers
            .into_iter()
            .flatten()
            .any(|p| p.namespace_selector.is_some())
    };
    let ingress = spec
        .ingress
        .iter()
        .flatten()
        .any(|r| cross(r.from.as_ref()));
    let egress = spec.egress.iter().flatten().any(|r| {
        let peers = r.to.as_ref().filter(|t| !t.is_empty());
        cross(peers)
            || (names_a_port(r.ports.as_ref())
                && peers.is_none_or(|ps| ps.iter().any(|p| p.ip_block.is_some())))
    });
    if ingress || egress {
        PodScope::All
    } else {
        PodScope::Own
    }
}

/// What one realized policy reports.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyOutcome {
    pub problems: Vec<Problem>,
    pub scope: PodScope,
}

/// Adds every policy's objects (not the namespaces' NSGroups, which are the namespaces'), and
/// the markers when there is any policy; returns what could not be realized exactly.
pub fn policies(
    view: &ClusterView,
    cluster: &str,
    live_ns: LiveNamespaces<'_>,
    objects: &mut BTreeMap<Key, Spec>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut any = false;
    for ((ns_name, name), np) in &view.network_policies {
        if let Some(outcome) = policy_objects(view, cluster, live_ns, ns_name, name, np, objects) {
            any = true;
            problems.extend(outcome.problems);
        }
    }
    if any {
        marker_objects(cluster, view, objects);
    }
    sort_problems(&mut problems);
    problems
}

/// The order problems are reported in.
pub fn sort_problems(problems: &mut Vec<Problem>) {
    problems.sort_by(|a, b| (&a.uid, &a.message).cmp(&(&b.uid, &b.message)));
    problems.dedup();
}

/// One policy's groups, IPSets and sections; `None` when it is not realized (its namespace is
/// gone or going, it is being deleted, or it has no uid or spec).
pub fn policy_objects(
    view: &ClusterView,
    cluster: &str,
    live_ns: LiveNamespaces<'_>,
    ns_name: &str,
    name: &str,
    np: &k8s_openapi::api::networking::v1::NetworkPolicy,
    objects: &mut BTreeMap<Key, Spec>,
) -> Option<PolicyOutcome> {
    let (Some(ns), Some(uid), Some(spec)) = (
        live_ns.get(ns_name),
        np.metadata.uid.clone(),
        np.spec.as_ref(),
    ) else {
        return None;
    };
    if np.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let mut cx = PolicyCtx {
        view,
        cluster,
        live_ns,
        ns_name,
        ns,
        name,
        uid: uid.clone(),
        problems: Vec::new(),
    };
    let types = policy_types(spec);
    let own: BTreeSet<&str> = [ns_name].into();
    let applied = Key::PolicyGroup(format!("{uid}/applied"));
    let pod_selector = spec.pod_selector.clone().unwrap_or_default();
    let selected = wired_pods(view, &own, Some(&pod_selector));
    objects.insert(
        applied.clone(),
        Spec {
            display_name: naming::name(cluster, &[ns_name, name]),
            tags: cx.tags("applied"),
            detail: Detail::Group {
                selection: select(view, live_ns, &own, &pod_selector),
            },
        },
    );
    let mut rules = Vec::new();
    if types.contains("Ingress") {
        rules.extend(cx.ingress_rules(spec, &selected, &applied, objects));
    }
    if types.contains("Egress") {
        rules.extend(cx.egress_rules(spec, &applied, objects));
    }
    cx.sections(&types, rules, &applied, objects);
    Some(PolicyOutcome {
        problems: cx.problems,
        scope: pod_scope(spec),
    })
}

/// The directions a policy isolates: `policyTypes`, or by default Ingress, and Egress when it
/// has egress rules.
fn policy_types(spec: &k8s_openapi::api::networking::v1::NetworkPolicySpec) -> BTreeSet<String> {
    match &spec.policy_types {
        Some(t) if !t.is_empty() => t.iter().cloned().collect(),
        _ => {
            let mut t: BTreeSet<String> = ["Ingress".to_string()].into();
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                t.insert("Egress".into());
            }
            t
        }
    }
}

impl<'a> PolicyCtx<'a> {
    /// The ALLOW rules of the policy's ingress rules, into the pods it selects.
    fn ingress_rules(
        &mut self,
        spec: &k8s_openapi::api::networking::v1::NetworkPolicySpec,
        selected: &[&'a Pod],
        applied: &Key,
        objects: &mut BTreeMap<Key, Spec>,
    ) -> Vec<RuleSpec> {
        let (cluster, ns_name, name) = (self.cluster, self.ns_name, self.name);
        let mut rules = Vec::new();
        for (i, r) in spec.ingress.iter().flatten().enumerate() {
            let mut sources = Vec::new();
            let peers = r.from.as_ref().filter(|f| !f.is_empty());
            for (j, p) in peers.into_iter().flatten().enumerate() {
                if let Some((k, _)) = self.peer(p, &format!("in{i}-{j}"), objects) {
                    sources.push(k);
                }
            }
            // Peers given, none valid: the rule allows nothing.
            if peers.is_some() && sources.is_empty() {
                continue;
            }
            let role = format!("in{i}");
            let parts = self.rule_parts(r.ports.as_ref(), selected, Reach::Peers, &role, objects);
            for (k, (target, services)) in parts.into_iter().enumerate() {
                rules.push(RuleSpec {
                    display_name: rule_name("ir", cluster, ns_name, name, i, k),
                    action: "ALLOW".into(),
                    direction: "IN".into(),
                    sources: sources.clone(),
                    destinations: target.into_iter().collect(),
                    services,
                    applied_to: applied.clone(),
                });
            }
        }
        rules
    }

    /// The ALLOW rules of the policy's egress rules, from the pods it selects.
    fn egress_rules(
        &mut self,
        spec: &k8s_openapi::api::networking::v1::NetworkPolicySpec,
        applied: &Key,
        objects: &mut BTreeMap<Key, Spec>,
    ) -> Vec<RuleSpec> {
        let (view, live_ns) = (self.view, self.live_ns);
        let (cluster, ns_name, name) = (self.cluster, self.ns_name, self.name);
        let mut rules = Vec::new();
        for (i, r) in spec.egress.iter().flatten().enumerate() {
            let mut destinations = Vec::new();
            let mut receivers: Vec<&Pod> = Vec::new();
            let peers = r.to.as_ref().filter(|f| !f.is_empty());
            let mut any_block = false;
            // The pods a named port could resolve on are looked for only when the rule names
            // a port: finding those an ipBlock holds, or every pod, costs the cluster.
            let named = names_a_port(r.ports.as_ref());
            for (j, p) in peers.into_iter().flatten().enumerate() {
                if let Some((k, pods)) = self.peer(p, &format!("eg{i}-{j}"), objects) {
                    destinations.push(k);
                    receivers.extend(pods);
                    if let Some(block) = &p.ip_block {
                        any_block = true;
                        if named {
                            receivers.extend(pods_in_block(view, live_ns, block));
                        }
                    }
                }
            }
            if peers.is_some() && destinations.is_empty() {
                continue;
            }
            // No peers: a named port resolves on every pod of the cluster (and on nothing
            // outside it, so the rule's named ports never reach an outside address).
            if peers.is_none() && named {
                let every: BTreeSet<&str> = live_ns.iter().map(|(n, _)| n).collect();
                receivers = wired_pods(view, &every, None);
            }
            let reach = match (peers, any_block) {
                (None, _) => Reach::AllPods,
                (Some(_), true) => Reach::Listed,
                (Some(_), false) => Reach::Peers,
            };
            let role = format!("eg{i}");
            let parts = self.rule_parts(r.ports.as_ref(), &receivers, reach, &role, objects);
            for (k, (target, services)) in parts.into_iter().enumerate() {
                rules.push(RuleSpec {
                    display_name: rule_name("er", cluster, ns_name, name, i, k),
                    action: "ALLOW".into(),
                    direction: "OUT".into(),
                    sources: vec![],
                    destinations: match target {
                        Some(t) => vec![t],
                        None => destinations.clone(),
                    },
                    services,
                    applied_to: applied.clone(),
                });
            }
        }
        rules
    }

    /// The policy's two firewall sections: its ALLOW rules below the top marker, and below
    /// every policy's allows (above the bottom marker) a DROP for each direction it isolates.
    fn sections(
        &self,
        types: &BTreeSet<String>,
        rules: Vec<RuleSpec>,
        applied: &Key,
        objects: &mut BTreeMap<Key, Spec>,
    ) {
        let (cluster, ns_name, name) = (self.cluster, self.ns_name, self.name);
        let isolation = [("Ingress", "IN"), ("Egress", "OUT")]
            .into_iter()
            .filter(|(t, _)| types.contains(*t))
            .map(|(_, dir)| RuleSpec {
                display_name: naming::fit(
                    &format!("is-{cluster}-{ns_name}-{name}-{}", dir.to_lowercase()),
                    naming::DISPLAY_NAME_MAX,
                ),
                action: "DROP".into(),
                direction: dir.into(),
                sources: vec![],
                destinations: vec![],
                services: vec![],
                applied_to: applied.clone(),
            })
            .collect();
        let c = cluster.to_string();
        let mut allow_tags = self.tags("allow");
        allow_tags.push(tag(FW_SECT_TYPE, "allow"));
        objects.insert(
            Key::AllowSection(self.uid.clone()),
            Spec {
                display_name: naming::name(cluster, &[ns_name, name]),
                tags: allow_tags,
                detail: Detail::Section {
                    marker: Key::FwMarkerTop(c.clone()),
                    rules,
                },
            },
        );
        let mut isol_tags = self.tags("isolation");
        isol_tags.push(tag(FW_SECT_TYPE, "isolation"));
        objects.insert(
            Key::IsolationSection(self.uid.clone()),
            Spec {
                display_name: naming::fit(
                    &format!("is-{}", naming::name(cluster, &[ns_name, name])),
                    naming::DISPLAY_NAME_MAX,
                ),
                tags: isol_tags,
                detail: Detail::Section {
                    marker: Key::FwMarkerBottom(c),
                    rules: isolation,
                },
            },
        );
    }
}

/// The cluster's two marker sections, and the node access section with its IPSet and group
/// (there while any policy is).
///
/// Kubernetes requires that a node can always reach its own pods (the kubelet's probes come
/// from the node's address), whatever the NetworkPolicies; on NSX the probes cross the
/// distributed firewall like any traffic, so an isolated pod would fail them. The node access
/// section allows, IN, from the IPSet of every node's InternalIP addresses to the NSGroup of
/// every pod port of the cluster (tags `ncp/cluster` and `ncp/pod_uid`), and sits with the
/// allow sections, above every isolation section. It reaches the cluster's pods only: nothing
/// else on the node network, and never the other way.
pub fn marker_objects(cluster: &str, view: &ClusterView, objects: &mut BTreeMap<Key, Spec>) {
    for (key, which) in [
        (Key::FwMarkerTop(cluster.to_string()), "top"),
        (Key::FwMarkerBottom(cluster.to_string()), "bottom"),
    ] {
        objects.insert(
            key,
            Spec {
                display_name: naming::name(cluster, &["marker", which]),
                tags: vec![
                    tag(scope::CLUSTER, cluster),
                    tag(scope::VERSION, naming::VERSION),
                    tag(FW_SECT_TYPE, &format!("marker_{which}")),
                    tag("ncp/fw_sect_marker", which),
                ],
                detail: Detail::Marker,
            },
        );
    }
    let c = cluster.to_string();
    let role_tags = |role: &str| {
        vec![
            tag(scope::CLUSTER, cluster),
            tag(scope::VERSION, naming::VERSION),
            tag(scope::ROLE, role),
        ]
    };
    objects.insert(
        Key::NodeIpSet(c.clone()),
        Spec {
            display_name: naming::name(cluster, &["node-access", "nodes"]),
            tags: role_tags("nodes"),
            detail: Detail::IpSet {
                addresses: node_addresses(view),
            },
        },
    );
    objects.insert(
        Key::PodsGroup(c.clone()),
        Spec {
            display_name: naming::name(cluster, &["node-access", "pods"]),
            tags: role_tags("cluster_pods"),
            detail: Detail::Group {
                selection: Selection::Criteria(vec![vec![
                    (scope::CLUSTER.to_string(), Some(c.clone())),
                    (scope::POD_UID.to_string(), None),
                ]]),
            },
        },
    );
    let mut section_tags = vec![
        tag(scope::CLUSTER, cluster),
        tag(scope::VERSION, naming::VERSION),
    ];
    section_tags.push(tag(FW_SECT_TYPE, "nodes"));
    objects.insert(
        Key::NodeSection(c.clone()),
        Spec {
            display_name: naming::name(cluster, &["node-access"]),
            tags: section_tags,
            detail: Detail::Section {
                marker: Key::FwMarkerTop(c.clone()),
                rules: vec![RuleSpec {
                    display_name: naming::name(cluster, &["node-to-pods"]),
                    action: "ALLOW".into(),
                    direction: "IN".into(),
                    sources: vec![Key::NodeIpSet(c.clone())],
                    destinations: vec![Key::PodsGroup(c.clone())],
                    services: vec![],
                    applied_to: Key::PodsGroup(c),
                }],
            },
        },
    );
}

/// Every node's InternalIP addresses (IPv4), sorted and without duplicates.
fn node_addresses(view: &ClusterView) -> Vec<String> {
    let mut out: BTreeSet<String> = BTreeSet::new();
    for node in view.nodes.values() {
        for a in node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
        {
            if a.type_ == "InternalIP" && a.address.parse::<std::net::Ipv4Addr>().is_ok() {
                out.insert(a.address.clone());
            }
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_blocks_parse_contain_and_subtract_as_kubernetes_reads_them() {
        let c = |s: &str| parse_cidr(s).unwrap();
        assert_eq!(c("10.4.0.0/16"), (0x0a04_0000, 16));
        assert_eq!(c("10.4.7.9/16"), (0x0a04_0000, 16), "host bits cleared");
        assert_eq!(c("0.0.0.0/0"), (0, 0));
        for bad in [
            "10.4.0.0",
            "10.4.0.0/33",
            "10.4.0/16",
            "a.b.c.d/8",
            "10.4.0.0/-1",
        ] {
            assert_eq!(parse_cidr(bad), None, "{bad}");
        }
        assert!(contains(c("10.4.0.0/16"), c("10.4.8.0/24")));
        assert!(!contains(c("10.4.8.0/24"), c("10.4.0.0/16")));
        assert!(contains(c("0.0.0.0/0"), c("192.0.2.1/32")));
        let left: Vec<String> = subtract(c("10.0.0.0/30"), &[c("10.0.0.1/32")])
            .into_iter()
            .map(cidr_text)
            .collect();
        assert_eq!(left, ["10.0.0.0/32", "10.0.0.2/31"]);
        assert!(subtract(c("10.0.0.0/24"), &[c("10.0.0.0/16")]).is_empty());
    }
}
