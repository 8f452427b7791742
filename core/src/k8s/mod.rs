//! The controller's view of the cluster: Kubernetes objects by key, in stable order.
//!
//! Stores are `BTreeMap`s so everything computed from a view (desired NSX state, plans) comes
//! out in the same order every time.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;

pub(crate) mod dirty;
pub mod pod_network;
pub mod selector;
pub mod watch;

/// Annotations NCP reads and writes.
/// The first ingress IP a LoadBalancer service's status shows (what NCP writes there).
pub fn lb_ingress_ip(svc: &k8s_openapi::api::core::v1::Service) -> Option<String> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .and_then(|i| i.first())
        .and_then(|i| i.ip.clone())
}

pub mod annotation {
    /// On a namespace: `"true"` opts it out of SNAT.
    pub const NO_SNAT: &str = "ncp/no_snat";
    /// Written on a namespace: its subnet CIDR.
    pub const SUBNET: &str = "ncp/subnet-0";
    /// Written on a namespace: its SNAT IP.
    pub const SNAT_IP: &str = "ncp/snat_ip";
    /// Written on a pod: its network, a [`super::pod_network::PodNetwork`] as JSON; the node
    /// agent waits for it.
    pub const POD_NETWORK: &str = "ncp/network";
    /// Written on a LoadBalancer service that has no VIP: why (`IP_ALREADY_ALLOCATED`, ...);
    /// removed once it has one.
    pub const LB_ERROR: &str = "ncp/error.loadbalancer";
}

/// The objects NCP reconciles, keyed by name (and namespace).
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<(String, String), Pod>,
    pub nodes: BTreeMap<String, Node>,
    pub services: BTreeMap<(String, String), Service>,
    pub endpoint_slices: BTreeMap<(String, String), EndpointSlice>,
    pub network_policies: BTreeMap<(String, String), NetworkPolicy>,
}

/// Feeds serialized JSON into a hasher without building the text.
struct HashWriter<'a, H: std::hash::Hasher>(&'a mut H);

impl<H: std::hash::Hasher> std::io::Write for HashWriter<'_, H> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn hash_json<T: serde::Serialize, H: std::hash::Hasher>(h: &mut H, v: &T) {
    // Serializing a k8s-openapi type into a hasher cannot fail.
    let _ = serde_json::to_writer(HashWriter(h), v);
}

fn hash_meta<H: std::hash::Hasher>(
    h: &mut H,
    m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) {
    use std::hash::Hash;
    (&m.namespace, &m.name, &m.uid, &m.labels, &m.annotations).hash(h);
    m.deletion_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .hash(h);
}

/// Hashes of what NCP reads of each object: names, uids, labels, annotations and specs (and a
/// Service's status, which NCP writes, and a pod's phase); not the rest of the status, nor
/// resourceVersions. Two versions of an object with the same hash are the same change-wise: a
/// watch event that changes nothing else costs a pass nothing.
pub mod fingerprint {
    use std::hash::{Hash, Hasher};

    use super::{
        EndpointSlice, Namespace, NetworkPolicy, Node, Pod, Service, hash_json, hash_meta,
    };

    fn start(kind: u8) -> std::hash::DefaultHasher {
        let mut h = std::hash::DefaultHasher::new();
        kind.hash(&mut h);
        h
    }

    pub fn namespace(n: &Namespace) -> u64 {
        let mut h = start(0);
        hash_meta(&mut h, &n.metadata);
        h.finish()
    }

    pub fn pod(p: &Pod) -> u64 {
        let mut h = start(1);
        hash_meta(&mut h, &p.metadata);
        hash_json(&mut h, &p.spec);
        // A finished pod loses its port: the phase is read, the rest of the status is not.
        p.status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .hash(&mut h);
        h.finish()
    }

    /// A node's spec and addresses (NCP's node access section lists them), not the rest of
    /// its status: its conditions' heartbeats change every few seconds and mean nothing here.
    pub fn node(n: &Node) -> u64 {
        let mut h = start(2);
        hash_meta(&mut h, &n.metadata);
        hash_json(&mut h, &n.spec);
        hash_json(&mut h, &n.status.as_ref().map(|s| &s.addresses));
        h.finish()
    }

    pub fn service(s: &Service) -> u64 {
        let mut h = start(3);
        hash_meta(&mut h, &s.metadata);
        hash_json(&mut h, &s.spec);
        hash_json(&mut h, &s.status);
        h.finish()
    }

    pub fn endpoint_slice(s: &EndpointSlice) -> u64 {
        let mut h = start(4);
        hash_meta(&mut h, &s.metadata);
        hash_json(&mut h, &s.endpoints);
        hash_json(&mut h, &s.ports);
        h.finish()
    }

    pub fn network_policy(p: &NetworkPolicy) -> u64 {
        let mut h = start(5);
        hash_meta(&mut h, &p.metadata);
        hash_json(&mut h, &p.spec);
        h.finish()
    }
}

/// What changed between two views, by object key: what an incremental pass recomputes. A
/// change NCP does not read (a pod's IP in its status, a resourceVersion) is not one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewChanges {
    pub namespaces: BTreeSet<String>,
    pub pods: BTreeSet<(String, String)>,
    pub nodes: BTreeSet<String>,
    pub services: BTreeSet<(String, String)>,
    pub endpoint_slices: BTreeSet<(String, String)>,
    pub network_policies: BTreeSet<(String, String)>,
}

/// Adds to `out` the keys whose object is in one map only, or whose fingerprint differs: one
/// merge of two sorted maps.
pub(crate) fn diff_maps<K: Ord + Clone, V>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    f: fn(&V) -> u64,
    out: &mut BTreeSet<K>,
) {
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((k, _)), None) => {
                out.insert((*k).clone());
                a.next();
            }
            (None, Some((k, _))) => {
                out.insert((*k).clone());
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.insert((*ka).clone());
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.insert((*kb).clone());
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if f(va) != f(vb) {
                        out.insert((*ka).clone());
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

impl ViewChanges {
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.pods.is_empty()
            && self.nodes.is_empty()
            && self.services.is_empty()
            && self.endpoint_slices.is_empty()
            && self.network_policies.is_empty()
    }

    /// How many objects changed.
    pub fn len(&self) -> usize {
        self.namespaces.len()
            + self.pods.len()
            + self.nodes.len()
            + self.services.len()
            + self.endpoint_slices.len()
            + self.network_policies.len()
    }

    /// Every object that differs between `old` and `new` in what NCP reads: a pass over both
    /// views, for a relist and for tests; a running controller learns its changes from watch
    /// events instead.
    pub fn between(old: &ClusterView, new: &ClusterView) -> Self {
        let mut c = Self::default();
        diff_maps(
            &old.namespaces,
            &new.namespaces,
            fingerprint::namespace,
            &mut c.namespaces,
        );
        diff_maps(&old.pods, &new.pods, fingerprint::pod, &mut c.pods);
        diff_maps(&old.nodes, &new.nodes, fingerprint::node, &mut c.nodes);
        diff_maps(
            &old.services,
            &new.services,
            fingerprint::service,
            &mut c.services,
        );
        diff_maps(
            &old.endpoint_slices,
            &new.endpoint_slices,
            fingerprint::endpoint_slice,
            &mut c.endpoint_slices,
        );
        diff_maps(
            &old.network_policies,
            &new.network_policies,
            fingerprint::network_policy,
            &mut c.network_policies,
        );
        c
    }
}

impl ClusterView {
    pub fn add_namespace(&mut self, ns: Namespace) {
        let name = ns.metadata.name.clone().unwrap_or_default();
        self.namespaces.insert(name, ns);
    }

    pub fn add_pod(&mut self, pod: Pod) {
        let key = (
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        self.pods.insert(key, pod);
    }

    pub fn add_service(&mut self, svc: Service) {
        let key = (
            svc.metadata.namespace.clone().unwrap_or_default(),
            svc.metadata.name.clone().unwrap_or_default(),
        );
        self.services.insert(key, svc);
    }

    pub fn add_endpoint_slice(&mut self, slice: EndpointSlice) {
        let key = (
            slice.metadata.namespace.clone().unwrap_or_default(),
            slice.metadata.name.clone().unwrap_or_default(),
        );
        self.endpoint_slices.insert(key, slice);
    }

    pub fn add_network_policy(&mut self, np: NetworkPolicy) {
        let key = (
            np.metadata.namespace.clone().unwrap_or_default(),
            np.metadata.name.clone().unwrap_or_default(),
        );
        self.network_policies.insert(key, np);
    }

    pub fn add_node(&mut self, node: Node) {
        let name = node.metadata.name.clone().unwrap_or_default();
        self.nodes.insert(name, node);
    }
}

/// Small constructors for tests and the simulation's fixtures.
pub mod fixture {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    pub fn namespace(name: &str, uid: &str) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: Some(uid.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    pub fn pod(ns: &str, name: &str, uid: &str, node: &str, labels: &[(&str, &str)]) -> Pod {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                uid: Some(uid.into()),
                labels: (!labels.is_empty()).then_some(labels),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                ..Default::default()
            }),
            status: None,
        }
    }
}
