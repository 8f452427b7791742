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
/// (KEP-1669); with `internalTrafficPolicy: Local`, only endpoints on `node`. Headless and
/// ExternalName services, and IPv6, have no service ports here.
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
        let mut ready: Vec<Endpoint> = Vec::new();
        let mut terminating: Vec<Endpoint> = Vec::new();
        // Usable endpoints elsewhere, left out by internalTrafficPolicy: Local.
        let mut elsewhere = false;
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
                if local && e.node_name.as_deref() != Some(node) {
                    elsewhere |= !e.addresses.is_empty()
                        && ((is_ready && !is_terminating) || (is_serving && is_terminating));
                    continue;
                }
                for a in &e.addresses {
                    let Some(ip) = ipv4(a) else { continue };
                    let ep = Endpoint { ip, port: tport };
                    if is_ready && !is_terminating {
                        ready.push(ep);
                    } else if is_serving && is_terminating {
                        terminating.push(ep);
                    }
                }
            }
        }
        let mut endpoints = if ready.is_empty() { terminating } else { ready };
        endpoints.sort();
        endpoints.dedup();
        let no_local_endpoints = endpoints.is_empty() && elsewhere;
        out.push(ServicePort {
            key: ServicePortKey {
                namespace: ns.into(),
                name: name.into(),
                port: if port_name.is_empty() {
                    p.port.to_string().into()
                } else {
                    port_name.into()
                },
            },
            cluster_ip,
            port: p.port as u16,
            protocol,
            node_port: p.node_port.and_then(|n| u16::try_from(n).ok()),
            affinity_timeout: affinity,
            endpoints,
            no_local_endpoints,
        });
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
