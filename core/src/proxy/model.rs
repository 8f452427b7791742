//! Service ports and their endpoints, as nsx-kube-proxy needs them, read from Services and
//! EndpointSlices the way kube-proxy reads them.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// `namespace/name:port-name` of a service port.
///
/// Shared strings: the proxy keeps a key in its caches for every service port it installs,
/// and a full sync of 10,000 ports would otherwise copy 30,000 strings.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub port: Arc<str>,
}

impl std::fmt::Display for ServicePortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
    }
}

/// An endpoint: address and target port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: u32,
    pub port: u16,
}

/// Which traffic a [`ServicePort`] takes. A Service port whose traffic policies give different
/// kinds of traffic different endpoints is split into several service ports, each with its
/// own group: the ClusterIP follows `internalTrafficPolicy`, the NodePort from outside
/// `externalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// Everything: the ClusterIP, the NodePort from pods and, from outside (the node's own
    /// traffic), the NodePort masqueraded to the node's address (both policies Cluster).
    #[default]
    Cluster,
    /// The ClusterIP and the NodePort from pods: `externalTrafficPolicy: Local`, whose traffic
    /// from outside an [`Scope::ExternalLocal`] port takes.
    Internal,
    /// The NodePort from outside under `externalTrafficPolicy: Local`: this node's endpoints
    /// only, the client's address kept (no masquerade); none here while others exist: dropped.
    ExternalLocal,
    /// The ClusterIP alone: `internalTrafficPolicy: Local` with an
    /// `externalTrafficPolicy: Cluster` NodePort, which a [`Scope::NodePort`] port takes.
    ClusterIp,
    /// The NodePort from pods and from outside (masqueraded), over every endpoint.
    NodePort,
}

impl Scope {
    pub fn takes_cluster_ip(self) -> bool {
        matches!(self, Scope::Cluster | Scope::Internal | Scope::ClusterIp)
    }

    pub fn takes_node_port_from_pods(self) -> bool {
        matches!(self, Scope::Cluster | Scope::Internal | Scope::NodePort)
    }

    /// `Some(masquerade)` when it takes the NodePort from outside.
    pub fn takes_node_port_from_outside(self) -> Option<bool> {
        match self {
            Scope::Cluster | Scope::NodePort => Some(true),
            Scope::ExternalLocal => Some(false),
            Scope::Internal | Scope::ClusterIp => None,
        }
    }
}

/// The suffix of the port name in the key of a [`Scope::ExternalLocal`] service port.
pub const EXTERNAL_LOCAL_SUFFIX: &str = "@external-local";
/// The suffix of the port name in the key of a [`Scope::NodePort`] service port.
pub const NODE_PORT_SUFFIX: &str = "@node-port";

/// What the proxy programs for one service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub key: ServicePortKey,
    pub cluster_ip: u32,
    pub port: u16,
    /// IP protocol number: 6, 17 or 132.
    pub protocol: u8,
    pub node_port: Option<u16>,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// The endpoints traffic goes to, sorted (empty: the service rejects, or drops when
    /// `no_local_endpoints`).
    pub endpoints: Vec<Endpoint>,
    /// `internalTrafficPolicy: Local` and the service has usable endpoints, but none on this
    /// node: kube-proxy drops such traffic (its "has no local endpoints" rule) where a service
    /// without any endpoint is rejected.
    pub no_local_endpoints: bool,
    pub scope: Scope,
}

pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn protocol_number(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(6),
        "UDP" => Some(17),
        "SCTP" => Some(132),
        _ => None,
    }
}

fn ipv4(text: &str) -> Option<u32> {
    text.parse::<std::net::Ipv4Addr>().ok().map(u32::from)
}

/// The service ports of `svc` with their endpoints from `slices` (those labelled for it), as
/// seen from node `node`: ready endpoints; if none, the serving ones that are terminating
/// (KEP-1669); with `internalTrafficPolicy: Local`, only endpoints on `node`. A NodePort under
/// `externalTrafficPolicy: Local` gives a second, [`Scope::ExternalLocal`] port (key suffixed
/// [`EXTERNAL_LOCAL_SUFFIX`]) with the endpoints on `node` alone. Headless and ExternalName
/// services, and IPv6, have no service ports here.
pub fn service_ports<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &str,
) -> Vec<ServicePort> {
    let (Some(ns), Some(name), Some(spec)) = (
        svc.metadata.namespace.as_deref(),
        svc.metadata.name.as_deref(),
        svc.spec.as_ref(),
    ) else {
        return vec![];
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return vec![];
    }
    let Some(cluster_ip) = spec.cluster_ip.as_deref().and_then(ipv4) else {
        return vec![];
    };
    let local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map_or(10_800, |t| t.clamp(1, 86_400) as u32)
    });
    let slices: Vec<&EndpointSlice> = slices
        .into_iter()
        .filter(|s| {
            s.metadata.namespace.as_deref() == Some(ns)
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .map(String::as_str)
                    == Some(name)
                && s.address_type == "IPv4"
        })
        .collect();
    let mut out = Vec::new();
    for p in spec.ports.iter().flatten() {
        let Some(protocol) = protocol_number(p.protocol.as_deref()) else {
            continue;
        };
        let port_name = p.name.clone().unwrap_or_default();
        // Every endpoint address of this port: whether it is on this node, ready (and not
        // terminating), or serving while terminating.
        let mut candidates: Vec<(Endpoint, bool, bool, bool)> = Vec::new();
        for s in &slices {
            let Some(target) = s.ports.iter().flatten().find(|sp| {
                sp.name.clone().unwrap_or_default() == port_name
                    && protocol_number(sp.protocol.as_deref()) == Some(protocol)
            }) else {
                continue;
            };
            let Some(tport) = target.port.and_then(|n| u16::try_from(n).ok()) else {
                continue;
            };
            for e in &s.endpoints {
                let c = e.conditions.as_ref();
                let is_ready = c.and_then(|c| c.ready).unwrap_or(true);
                let is_serving = c.and_then(|c| c.serving).unwrap_or(is_ready);
                let is_terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                let here = e.node_name.as_deref() == Some(node);
                for ip in e.addresses.iter().filter_map(|a| ipv4(a)) {
                    candidates.push((
                        Endpoint { ip, port: tport },
                        here,
                        is_ready && !is_terminating,
                        is_serving && is_terminating,
                    ));
                }
            }
        }
        // The endpoints among those `keep` takes (ready ones; if none, the serving terminating
        // ones), and whether it took none while usable ones exist elsewhere (a drop, not a
        // reject).
        let pick = |local_only: bool| {
            let usable = |c: &&(Endpoint, bool, bool, bool)| c.2 || c.3;
            let kept: Vec<&(Endpoint, bool, bool, bool)> =
                candidates.iter().filter(|c| !local_only || c.1).collect();
            let ready: Vec<Endpoint> = kept.iter().filter(|c| c.2).map(|c| c.0).collect();
            let mut eps = if ready.is_empty() {
                kept.iter().filter(|c| c.3).map(|c| c.0).collect()
            } else {
                ready
            };
            eps.sort();
            eps.dedup();
            let elsewhere = local_only && candidates.iter().filter(usable).any(|c| !c.1);
            let none_here = eps.is_empty() && elsewhere;
            (eps, none_here)
        };
        let port_key = if port_name.is_empty() {
            p.port.to_string()
        } else {
            port_name
        };
        let node_port = p.node_port.and_then(|n| u16::try_from(n).ok());
        // Who takes which endpoints, as kube-proxy routes them: the ClusterIP the
        // internalTrafficPolicy's; the NodePort from outside the externalTrafficPolicy's
        // (Cluster: every endpoint, masqueraded; Local: this node's); the NodePort from pods
        // every endpoint under Cluster, the internal ones under Local.
        let parts: Vec<(Scope, bool, &str)> = match (node_port.is_some(), local, external_local) {
            (false, _, _) | (true, false, false) => vec![(Scope::Cluster, local, "")],
            (true, _, true) => vec![
                (Scope::Internal, local, ""),
                (Scope::ExternalLocal, true, EXTERNAL_LOCAL_SUFFIX),
            ],
            (true, true, false) => vec![
                (Scope::ClusterIp, true, ""),
                (Scope::NodePort, false, NODE_PORT_SUFFIX),
            ],
        };
        for (scope, local_only, suffix) in parts {
            let (endpoints, no_local_endpoints) = pick(local_only);
            out.push(ServicePort {
                key: ServicePortKey {
                    namespace: ns.into(),
                    name: name.into(),
                    port: format!("{port_key}{suffix}").into(),
                },
                cluster_ip,
                port: p.port as u16,
                protocol,
                node_port,
                affinity_timeout: affinity,
                endpoints,
                no_local_endpoints,
                scope,
            });
        }
    }
    out
}

/// Every service port of a cluster, by key.
pub fn all_service_ports<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: &BTreeMap<(String, String), EndpointSlice>,
    node: &str,
) -> BTreeMap<ServicePortKey, ServicePort> {
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices.values() {
        if let (Some(ns), Some(owner)) = (
            s.metadata.namespace.clone(),
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL).cloned()),
        ) {
            by_service.entry((ns, owner)).or_default().push(s);
        }
    }
    let mut out = BTreeMap::new();
    for svc in services {
        let k = (
            svc.metadata.namespace.clone().unwrap_or_default(),
            svc.metadata.name.clone().unwrap_or_default(),
        );
        let slices = by_service.get(&k).cloned().unwrap_or_default();
        for sp in service_ports(svc, slices, node) {
            out.insert(sp.key.clone(), sp);
        }
    }
    out
}
