//! NCP's vocabulary: the identity of every object it owns ([`Key`]), what each should look
//! like before NSX assigns ids and addresses ([`Spec`], [`Detail`]), the desired state as a
//! whole ([`Desired`]), how a firewall object selects pods ([`Selection`], [`RuleSpec`],
//! [`ServiceSpec`]), what cannot be realized ([`Problem`]), and which cluster objects get NSX
//! objects at all ([`pod_is_wired`], [`LiveNamespaces`]). The modules that compute the
//! desired state (`desired`, `policy`, `desired_cache`), observe NSX (`observe`), plan, render
//! and apply all speak it; it depends on none of them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::k8s::selector;
use crate::nsx::model::Tag;

/// The identity of an NCP object: the UID of its Kubernetes owner and its role.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Subnet(String),
    Pool(String),
    Switch(String),
    Tier1(String),
    T0Link(String),
    T1Link(String),
    DownlinkSwitchPort(String),
    Downlink(String),
    Snat(String),
    PodPort(String),
    /// The cluster's load-balancer tier-1, its links to the tier-0 and its LB service; the
    /// owner is the cluster name.
    LbTier1(String),
    LbT0Link(String),
    LbT1Link(String),
    LbService(String),
    /// Per LoadBalancer service port: `<service uid>/<port name or number>`.
    LbPool(String),
    LbVirtualServer(String),
    /// A source-IP persistence profile: the cluster's shared one (owner: the cluster name;
    /// Kubernetes' default timeout) or a service's own (owner: the service uid).
    LbPersistence(String),
    /// A namespace's NSGroup: every pod port of the namespace.
    NsGroup(String),
    /// NetworkPolicy objects, owned by `<policy uid>/<role>`: `applied` (the pods the policy
    /// selects), `in<i>-<j>` / `eg<i>-<j>` (peer j of ingress or egress rule i).
    PolicyGroup(String),
    PolicyIpSet(String),
    /// The policy's allow section (its rules) and isolation section (drop what no policy
    /// allows), by policy uid.
    AllowSection(String),
    IsolationSection(String),
    /// The cluster's two marker sections: allow sections go right below the top one,
    /// isolation sections right above the bottom one, so every allow precedes every drop.
    FwMarkerTop(String),
    FwMarkerBottom(String),
    /// Kubernetes lets a node reach its own pods whatever the policies (the kubelet's probes):
    /// the IPSet of the cluster's node addresses, the NSGroup of every pod port of the
    /// cluster, and the section that allows the first to the second, placed with the allow
    /// sections (above every isolation); owned by the cluster name, there while the markers
    /// are.
    NodeIpSet(String),
    PodsGroup(String),
    NodeSection(String),
}

/// The NSX collections NCP's objects live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Collection {
    BlockSubnet,
    IpPool,
    LogicalSwitch,
    LogicalRouter,
    LogicalRouterPort,
    LogicalPort,
    NatRule,
    LbService,
    LbVirtualServer,
    LbPool,
    LbPersistenceProfile,
    NsGroup,
    IpSet,
    FirewallSection,
}

impl Key {
    pub fn owner_uid(&self) -> &str {
        match self {
            Key::Subnet(u)
            | Key::Pool(u)
            | Key::Switch(u)
            | Key::Tier1(u)
            | Key::T0Link(u)
            | Key::T1Link(u)
            | Key::DownlinkSwitchPort(u)
            | Key::Downlink(u)
            | Key::Snat(u)
            | Key::PodPort(u)
            | Key::LbTier1(u)
            | Key::LbT0Link(u)
            | Key::LbT1Link(u)
            | Key::LbService(u)
            | Key::LbPool(u)
            | Key::LbVirtualServer(u)
            | Key::LbPersistence(u)
            | Key::NsGroup(u)
            | Key::PolicyGroup(u)
            | Key::PolicyIpSet(u)
            | Key::AllowSection(u)
            | Key::IsolationSection(u)
            | Key::FwMarkerTop(u)
            | Key::FwMarkerBottom(u)
            | Key::NodeIpSet(u)
            | Key::PodsGroup(u)
            | Key::NodeSection(u) => u,
        }
    }

    pub fn collection(&self) -> Collection {
        match self {
            Key::Subnet(_) => Collection::BlockSubnet,
            Key::Pool(_) => Collection::IpPool,
            Key::Switch(_) => Collection::LogicalSwitch,
            Key::Tier1(_) => Collection::LogicalRouter,
            Key::T0Link(_) | Key::T1Link(_) | Key::Downlink(_) => Collection::LogicalRouterPort,
            Key::DownlinkSwitchPort(_) | Key::PodPort(_) => Collection::LogicalPort,
            Key::Snat(_) => Collection::NatRule,
            Key::LbTier1(_) => Collection::LogicalRouter,
            Key::LbT0Link(_) | Key::LbT1Link(_) => Collection::LogicalRouterPort,
            Key::LbService(_) => Collection::LbService,
            Key::LbPool(_) => Collection::LbPool,
            Key::LbVirtualServer(_) => Collection::LbVirtualServer,
            Key::LbPersistence(_) => Collection::LbPersistenceProfile,
            Key::NsGroup(_) | Key::PolicyGroup(_) | Key::PodsGroup(_) => Collection::NsGroup,
            Key::PolicyIpSet(_) | Key::NodeIpSet(_) => Collection::IpSet,
            Key::AllowSection(_)
            | Key::IsolationSection(_)
            | Key::NodeSection(_)
            | Key::FwMarkerTop(_)
            | Key::FwMarkerBottom(_) => Collection::FirewallSection,
        }
    }

    /// Parents before children: the order of creation. Deletion runs it backwards.
    pub fn rank(&self) -> u8 {
        match self {
            Key::Subnet(_) | Key::Tier1(_) | Key::T0Link(_) => 0,
            Key::Pool(_) | Key::T1Link(_) | Key::Snat(_) => 1,
            Key::Switch(_) => 2,
            Key::DownlinkSwitchPort(_) | Key::PodPort(_) => 3,
            Key::Downlink(_) => 4,
            Key::LbTier1(_) | Key::LbT0Link(_) | Key::LbPool(_) | Key::LbPersistence(_) => 0,
            Key::LbT1Link(_) | Key::LbVirtualServer(_) => 1,
            // After its virtual servers; deleted first, so nothing it names is gone before it.
            Key::LbService(_) => 5,
            // Groups after the ports they may list; sections after everything they name, and
            // deleted before it.
            Key::PolicyIpSet(_) | Key::NsGroup(_) | Key::NodeIpSet(_) => 0,
            Key::PolicyGroup(_) | Key::PodsGroup(_) | Key::FwMarkerTop(_) => 6,
            Key::FwMarkerBottom(_) => 7,
            Key::AllowSection(_) | Key::IsolationSection(_) | Key::NodeSection(_) => 8,
        }
    }

    /// The objects whose ids or server-assigned fields this one's body needs. A pod port
    /// depends on its namespace's switch and a section on the groups its rules name, both
    /// found in `detail` (absent for a delete, which needs none).
    pub fn deps(&self, detail: Option<&Detail>) -> Vec<Key> {
        let ns = |u: &str| u.to_string();
        let pod_namespace_uid = match detail {
            Some(Detail::PodPort { namespace_uid, .. }) => Some(namespace_uid.as_str()),
            _ => None,
        };
        match self {
            Key::Subnet(_) | Key::Tier1(_) | Key::T0Link(_) => vec![],
            Key::Pool(u) | Key::Snat(u) => vec![Key::Subnet(ns(u))],
            Key::Switch(u) => vec![Key::Pool(ns(u))],
            Key::T1Link(u) => vec![Key::Tier1(ns(u)), Key::T0Link(ns(u))],
            Key::DownlinkSwitchPort(u) => vec![Key::Switch(ns(u))],
            Key::Downlink(u) => vec![
                Key::Tier1(ns(u)),
                Key::DownlinkSwitchPort(ns(u)),
                Key::Subnet(ns(u)),
            ],
            Key::PodPort(_) => pod_namespace_uid
                .map(|u| vec![Key::Switch(u.to_string())])
                .unwrap_or_default(),
            Key::LbTier1(_) | Key::LbT0Link(_) | Key::LbPool(_) | Key::LbPersistence(_) => {
                vec![]
            }
            Key::LbT1Link(c) => vec![Key::LbTier1(ns(c)), Key::LbT0Link(ns(c))],
            Key::LbVirtualServer(k) => {
                let mut d = vec![Key::LbPool(ns(k))];
                if let Some(Detail::LbVirtualServer {
                    persistence: Some(p),
                    ..
                }) = detail
                {
                    d.push(p.clone());
                }
                d
            }
            Key::LbService(c) => vec![Key::LbTier1(ns(c))],
            Key::NsGroup(_)
            | Key::PolicyGroup(_)
            | Key::PolicyIpSet(_)
            | Key::FwMarkerTop(_)
            | Key::NodeIpSet(_)
            | Key::PodsGroup(_) => vec![],
            Key::FwMarkerBottom(c) => vec![Key::FwMarkerTop(ns(c))],
            Key::AllowSection(_) | Key::IsolationSection(_) | Key::NodeSection(_) => match detail {
                Some(Detail::Section { marker, rules, .. }) => {
                    let mut d: Vec<Key> = vec![marker.clone()];
                    for r in rules {
                        d.extend(r.sources.iter().cloned());
                        d.extend(r.destinations.iter().cloned());
                        d.push(r.applied_to.clone());
                    }
                    d.sort();
                    d.dedup();
                    d
                }
                _ => vec![],
            },
        }
    }
}

/// What one object should look like, before server-assigned values are known.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub display_name: String,
    pub tags: Vec<Tag>,
    pub detail: Detail,
}

/// The kind-specific part of a [`Spec`].
#[derive(Debug, Clone, PartialEq)]
pub enum Detail {
    Subnet {
        size: u64,
    },
    Pool,
    Switch,
    Tier1,
    T0Link,
    T1Link,
    DownlinkSwitchPort,
    Downlink,
    Snat,
    PodPort {
        namespace_uid: String,
        node: String,
        app_id: String,
        attachment_id: String,
        /// Chosen by the planner (kept from the observed port, or the lowest free on the node).
        vlan: Option<u16>,
    },
    LbTier1,
    LbT0Link,
    LbT1Link,
    LbService {
        virtual_servers: Vec<Key>,
        /// `SMALL`, `MEDIUM` or `LARGE`.
        size: String,
    },
    /// Members as (address, port), sorted.
    LbPool {
        members: Vec<(String, i32)>,
        algorithm: String,
    },
    /// A source-IP persistence profile.
    LbPersistence {
        timeout: i64,
    },
    LbVirtualServer {
        service_uid: String,
        port: i32,
        protocol: String,
        /// `spec.loadBalancerIP`: the VIP the service asks for (every port shares it).
        requested_ip: Option<String>,
        /// Its persistence profile, if it keeps clients on one member.
        persistence: Option<Key>,
    },
    /// An NSGroup (a namespace's or a policy's).
    Group {
        selection: Selection,
    },
    IpSet {
        addresses: Vec<String>,
    },
    Marker,
    /// A firewall section with its rules; `marker` is the section it is placed against.
    Section {
        marker: Key,
        rules: Vec<RuleSpec>,
    },
}

/// Desired NSX state: every object by identity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    pub objects: BTreeMap<Key, Spec>,
    /// What in the cluster cannot be realized as asked (a policy NSX cannot express
    /// exactly), by the object NCP reports it on.
    pub problems: Vec<Problem>,
}

impl Desired {
    /// The keys whose spec differs between `self` and `other` (in one only, or different): one
    /// merge of the two sorted maps.
    pub fn changed_keys(&self, other: &Desired) -> std::collections::BTreeSet<Key> {
        let mut out = std::collections::BTreeSet::new();
        let (mut a, mut b) = (
            self.objects.iter().peekable(),
            other.objects.iter().peekable(),
        );
        loop {
            let step = match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
            };
            match step {
                std::cmp::Ordering::Less => {
                    out.extend(a.next().map(|(k, _)| k.clone()));
                }
                std::cmp::Ordering::Greater => {
                    out.extend(b.next().map(|(k, _)| k.clone()));
                }
                std::cmp::Ordering::Equal => {
                    if let (Some((k, x)), Some((_, y))) = (a.next(), b.next())
                        && x != y
                    {
                        out.insert(k.clone());
                    }
                }
            }
        }
        out
    }
}

/// The pods an NSGroup holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Selection {
    /// Tag criteria on logical ports, ORed; each a conjunction of (scope, tag), where a tag of
    /// `None` matches any value of the scope.
    Criteria(Vec<selector::Term>),
    /// Explicit pods, by uid: for selections tags cannot express.
    Pods(Vec<String>),
    /// The pods of these namespaces (by uid), as members that are the namespaces' NSGroups.
    Namespaces(Vec<String>),
}

/// One firewall service of a rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ServiceSpec {
    /// `L4PortSetNSService`: TCP or UDP, destination ports or ranges (empty: every port).
    L4 {
        protocol: String,
        ports: Vec<String>,
    },
    /// `IPProtocolNSService`.
    Ip { number: u8 },
}

/// One firewall rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleSpec {
    pub display_name: String,
    pub action: String,
    pub direction: String,
    /// Empty: any.
    pub sources: Vec<Key>,
    pub destinations: Vec<Key>,
    pub services: Vec<ServiceSpec>,
    pub applied_to: Key,
}

/// Something a policy asks that NSX cannot do exactly, reported as a Warning Event on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub namespace: String,
    pub policy: String,
    pub uid: String,
    pub message: String,
}

/// Whether a pod needs a logical port.
pub fn pod_is_wired(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    let scheduled = spec
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty());
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    );
    scheduled
        && !host_network
        && !finished
        && pod.metadata.deletion_timestamp.is_none()
        && pod.metadata.uid.is_some()
}

/// The namespaces that get NSX objects: with a uid and not being deleted. Looked up in the
/// view's own map, so that a fragment of the desired state costs no pass over the namespaces.
#[derive(Debug, Clone, Copy)]
pub struct LiveNamespaces<'a>(pub &'a BTreeMap<String, Namespace>);

fn namespace_is_live(ns: &Namespace) -> bool {
    ns.metadata.uid.is_some() && ns.metadata.deletion_timestamp.is_none()
}

impl<'a> LiveNamespaces<'a> {
    pub fn get(&self, name: &str) -> Option<&'a Namespace> {
        self.0.get(name).filter(|ns| namespace_is_live(ns))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a Namespace)> + use<'a> {
        self.0
            .iter()
            .filter(|(_, ns)| namespace_is_live(ns))
            .map(|(n, ns)| (n.as_str(), ns))
    }
}
