//! The controller's view of the cluster: Kubernetes objects by key, in stable order.
//!
//! Stores are `BTreeMap`s so everything computed from a view (desired NSX state, plans) comes
//! out in the same order every time.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;

pub mod selector;
pub mod watch;

/// Annotations NCP reads and writes.
pub mod annotation {
    /// On a namespace: `"true"` opts it out of SNAT.
    pub const NO_SNAT: &str = "ncp/no_snat";
    /// Written on a namespace: its subnet CIDR.
    pub const SUBNET: &str = "ncp/subnet-0";
    /// Written on a namespace: its SNAT IP.
    pub const SNAT_IP: &str = "ncp/snat_ip";
    /// Written on a pod: its network as JSON (`ip`, `mac`, `gateway`, `vlan`,
    /// `logical_port_id`); the node agent waits for it.
    pub const POD_NETWORK: &str = "ncp/network";
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
