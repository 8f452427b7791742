//! What NSX should hold for a cluster: a pure function of the cluster view and the config.
//!
//! Every NCP object has a stable identity, its [`Key`]: the Kubernetes UID of its owner and the
//! part it plays. The identity is written into the object's tags (`ncp/project_uid`,
//! `ncp/pod_uid`, `ncp/role`), so after a restart NCP finds its objects again by reading tags,
//! and a namespace or pod recreated under the same name (a new UID) gets new objects rather
//! than the old network config.
//!
//! Per namespace (not being deleted): a block subnet carved from the container IP block, an IP
//! pool over it, a logical switch using the pool, a tier-1 router linked to the tier-0 (a link
//! port on each side), a switch port and a downlink router port joining switch and router, and,
//! unless the namespace opts out with `ncp/no_snat: "true"` or the cluster does with `[coe]
//! enable_snat = False`, a SNAT rule on the tier-0 that translates the namespace subnet to an
//! address from the external pool.
//!
//! Per pod (scheduled, not host-network, not finished, not being deleted): a logical port on
//! its namespace's switch, attached as a CHILD VIF of its node's VIF with a VLAN unique under
//! that parent (chosen by the planner, which knows the VLANs in use), addresses allocated by
//! NSX, labels as tags.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod};

pub use super::config::{LbSettings, LbSize, PoolAlgorithm};
use super::naming::{self, VERSION, ns_tags, scope, tag};
use super::vocab::{Desired, Detail, Key, LiveNamespaces, Spec, pod_is_wired};
use crate::k8s::{ClusterView, annotation};
use crate::nsx::model::Tag;

/// What NCP's configuration decides about every namespace's network: the size of its subnet,
/// and whether its pods leave through a SNAT address (`[coe] enable_snat`; without it they leave
/// with their own, routable addresses, as a namespace annotated `ncp/no_snat` does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkSettings {
    pub subnet_prefix: u8,
    pub enable_snat: bool,
    pub lb: LbSettings,
}

impl NetworkSettings {
    pub fn of(config: &super::config::NcpConfig) -> Self {
        Self {
            subnet_prefix: config.subnet_prefix,
            enable_snat: config.enable_snat,
            lb: config.lb,
        }
    }
}

/// A subnet prefix alone: NCP's defaults otherwise (SNAT for every namespace, the default
/// load balancer settings).
impl From<u8> for NetworkSettings {
    fn from(subnet_prefix: u8) -> Self {
        Self {
            subnet_prefix,
            enable_snat: true,
            lb: LbSettings::default(),
        }
    }
}

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`, and NCP's L4
/// persistence timeout: services with it share one persistence profile.
pub const DEFAULT_AFFINITY_TIMEOUT_S: i64 = 10_800;

/// The persistence a LoadBalancer service's virtual servers get, as NCP decides it: `None`, or
/// the timeout in seconds.
pub fn persistence_timeout(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    lb: LbSettings,
) -> Option<i64> {
    let affinity = spec.session_affinity.as_deref() == Some("ClientIP");
    if !affinity && !lb.l4_persistence {
        return None;
    }
    let asked = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .filter(|_| affinity)
        .map(i64::from);
    Some(asked.unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S))
}

/// The size of a namespace subnet of this prefix length.
fn subnet_size(subnet_prefix: u8) -> u64 {
    1u64 << (32 - u32::from(subnet_prefix.min(32)))
}

/// The desired state of the cluster's NSX objects.
pub fn desired(view: &ClusterView, cluster: &str, net: impl Into<NetworkSettings>) -> Desired {
    let net = net.into();
    let mut objects = BTreeMap::new();
    let live = LiveNamespaces(&view.namespaces);
    for (name, ns) in live.iter() {
        namespace_objects(cluster, net, name, ns, &mut objects);
    }
    for ((ns_name, pod_name), pod) in &view.pods {
        pod_objects(cluster, live, ns_name, pod_name, pod, &mut objects);
    }
    let mut any_lb = false;
    for ((ns_name, svc_name), svc) in &view.services {
        any_lb |= service_objects(
            view,
            cluster,
            net.lb,
            live,
            ns_name,
            svc_name,
            svc,
            &mut objects,
        );
    }
    if any_lb {
        let servers = virtual_servers(&objects);
        let shared = uses_shared_persistence(&objects, cluster);
        lb_objects(cluster, net.lb, servers, shared, &mut objects);
    }
    let problems = super::policy::policies(view, cluster, live, &mut objects);
    Desired { objects, problems }
}

/// A live namespace's objects: subnet, pool, switch, tier-1 with its links and downlink, the
/// SNAT rule unless opted out (or the cluster has no SNAT), and its NSGroup.
pub fn namespace_objects(
    cluster: &str,
    net: NetworkSettings,
    name: &str,
    ns: &Namespace,
    objects: &mut BTreeMap<Key, Spec>,
) {
    let Some(uid) = ns.metadata.uid.as_deref() else {
        return;
    };
    let size = subnet_size(net.subnet_prefix);
    let tags = ns_tags(cluster, ns);
    let dn = naming::name(cluster, &[name]);
    let spec = |detail: Detail, tags: Vec<Tag>, dn: String| Spec {
        display_name: dn,
        tags,
        detail,
    };
    let u = uid.to_string();
    objects.insert(
        Key::Subnet(u.clone()),
        spec(Detail::Subnet { size }, tags.clone(), dn.clone()),
    );
    objects.insert(
        Key::Pool(u.clone()),
        spec(Detail::Pool, tags.clone(), dn.clone()),
    );
    objects.insert(
        Key::Switch(u.clone()),
        spec(Detail::Switch, tags.clone(), dn.clone()),
    );
    objects.insert(
        Key::Tier1(u.clone()),
        spec(Detail::Tier1, tags.clone(), dn.clone()),
    );
    objects.insert(
        Key::T0Link(u.clone()),
        spec(
            Detail::T0Link,
            tags.clone(),
            naming::name(cluster, &[name, "t0-link"]),
        ),
    );
    objects.insert(
        Key::T1Link(u.clone()),
        spec(
            Detail::T1Link,
            tags.clone(),
            naming::name(cluster, &[name, "t1-link"]),
        ),
    );
    let mut port_tags = tags.clone();
    port_tags.push(tag(scope::ROLE, "downlink"));
    objects.insert(
        Key::DownlinkSwitchPort(u.clone()),
        spec(
            Detail::DownlinkSwitchPort,
            port_tags,
            naming::name(cluster, &[name, "downlink"]),
        ),
    );
    objects.insert(
        Key::Downlink(u.clone()),
        spec(
            Detail::Downlink,
            tags.clone(),
            naming::name(cluster, &[name, "downlink"]),
        ),
    );
    let no_snat = !net.enable_snat
        || ns
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotation::NO_SNAT))
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if !no_snat {
        objects.insert(
            Key::Snat(u),
            spec(
                Detail::Snat,
                tags.clone(),
                naming::name(cluster, &[name, "snat"]),
            ),
        );
    }
    let (key, group) = super::policy::ns_group(cluster, name, ns);
    objects.insert(key, group);
}

/// A wired pod's logical port (nothing for a pod that needs none or whose namespace is not
/// live).
pub fn pod_objects(
    cluster: &str,
    live: LiveNamespaces<'_>,
    ns_name: &str,
    pod_name: &str,
    pod: &Pod,
    objects: &mut BTreeMap<Key, Spec>,
) {
    let Some(ns) = live.get(ns_name) else {
        return;
    };
    if !pod_is_wired(pod) {
        return;
    }
    let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
    let mut tags = ns_tags(cluster, ns);
    tags.push(tag(scope::POD, pod_name));
    tags.push(tag(scope::POD_UID, &pod_uid));
    if let Some(labels) = &pod.metadata.labels {
        for (k, v) in labels.iter().take(naming::TAGS_MAX - tags.len()) {
            tags.push(tag(k, v));
        }
    }
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    objects.insert(
        Key::PodPort(pod_uid.clone()),
        Spec {
            display_name: naming::name(cluster, &[ns_name, pod_name]),
            tags,
            detail: Detail::PodPort {
                namespace_uid: ns.metadata.uid.clone().unwrap_or_default(),
                node,
                app_id: format!("{ns_name}/{pod_name}"),
                attachment_id: pod_uid,
                vlan: None,
            },
        },
    );
}

/// Service and endpoint labels and tags.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The service an endpoint slice belongs to (its `kubernetes.io/service-name` label).
pub fn slice_service(slice: &k8s_openapi::api::discovery::v1::EndpointSlice) -> Option<&str> {
    slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .map(String::as_str)
}

/// A LoadBalancer service's objects: per port a pool of the service's ready endpoints and a
/// virtual server on the service VIP. Returns whether the service needs the cluster's load
/// balancer at all.
#[allow(clippy::too_many_arguments)]
pub fn service_objects(
    view: &ClusterView,
    cluster: &str,
    lb: LbSettings,
    live: LiveNamespaces<'_>,
    ns_name: &str,
    svc_name: &str,
    svc: &k8s_openapi::api::core::v1::Service,
    objects: &mut BTreeMap<Key, Spec>,
) -> bool {
    let Some(ns) = live.get(ns_name) else {
        return false;
    };
    let Some(spec) = svc.spec.as_ref() else {
        return false;
    };
    if spec.type_.as_deref() != Some("LoadBalancer") || svc.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let Some(svc_uid) = svc.metadata.uid.clone() else {
        return false;
    };
    let requested_ip = spec
        .load_balancer_ip
        .as_deref()
        .map(str::trim)
        .filter(|ip| !ip.is_empty())
        .map(str::to_string);
    // Persistence: the cluster's shared profile for the default timeout, else the service's own.
    let persistence = persistence_timeout(spec, lb).map(|timeout| {
        if timeout == DEFAULT_AFFINITY_TIMEOUT_S {
            Key::LbPersistence(cluster.to_string())
        } else {
            let mut tags = ns_tags(cluster, ns);
            tags.push(tag(scope::SERVICE, &format!("{ns_name}/{svc_name}")));
            tags.push(tag(scope::SERVICE_UID, &svc_uid));
            let key = Key::LbPersistence(svc_uid.clone());
            objects.insert(
                key.clone(),
                Spec {
                    display_name: naming::name(cluster, &[ns_name, svc_name, "persistence"]),
                    tags,
                    detail: Detail::LbPersistence { timeout },
                },
            );
            key
        }
    });
    // The namespace's slices, by range: a service costs its namespace's slices, not the
    // cluster's.
    let slices: Vec<&k8s_openapi::api::discovery::v1::EndpointSlice> = view
        .endpoint_slices
        .range((ns_name.to_string(), String::new())..)
        .take_while(|((n, _), _)| n == ns_name)
        .map(|(_, s)| s)
        .filter(|s| slice_service(s) == Some(svc_name))
        .collect();
    for port in spec.ports.iter().flatten() {
        let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
        if protocol != "TCP" && protocol != "UDP" {
            continue;
        }
        let port_id = port
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| port.port.to_string());
        let key = format!("{svc_uid}/{port_id}");
        let mut tags = ns_tags(cluster, ns);
        tags.push(tag(scope::SERVICE, &format!("{ns_name}/{svc_name}")));
        tags.push(tag(scope::SERVICE_UID, &svc_uid));
        tags.push(tag(scope::SERVICE_PORT, &port_id));
        let mut members: Vec<(String, i32)> = Vec::new();
        for slice in &slices {
            let slice_port = slice.ports.iter().flatten().find(|p| {
                p.name.clone().unwrap_or_default() == port.name.clone().unwrap_or_default()
            });
            let Some(target) = slice_port.and_then(|p| p.port) else {
                continue;
            };
            for ep in &slice.endpoints {
                if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                for a in &ep.addresses {
                    members.push((a.clone(), target));
                }
            }
        }
        members.sort();
        members.dedup();
        let dn = naming::name(cluster, &[ns_name, svc_name, &port_id]);
        objects.insert(
            Key::LbPool(key.clone()),
            Spec {
                display_name: dn.clone(),
                tags: tags.clone(),
                detail: Detail::LbPool {
                    members,
                    algorithm: lb.algorithm.nsx_name().to_string(),
                },
            },
        );
        objects.insert(
            Key::LbVirtualServer(key),
            Spec {
                display_name: dn,
                tags,
                detail: Detail::LbVirtualServer {
                    service_uid: svc_uid.clone(),
                    port: port.port,
                    protocol,
                    requested_ip: requested_ip.clone(),
                    persistence: persistence.clone(),
                },
            },
        );
    }
    true
}

/// The virtual servers among `objects`, found by range (the key order puts them together).
pub fn virtual_servers(objects: &BTreeMap<Key, Spec>) -> Vec<Key> {
    objects
        .range(Key::LbVirtualServer(String::new())..)
        .take_while(|(k, _)| matches!(k, Key::LbVirtualServer(_)))
        .map(|(k, _)| k.clone())
        .collect()
}

/// Whether a virtual server among `objects` uses the cluster's shared persistence profile.
pub fn uses_shared_persistence(objects: &BTreeMap<Key, Spec>, cluster: &str) -> bool {
    objects
        .range(Key::LbVirtualServer(String::new())..)
        .take_while(|(k, _)| matches!(k, Key::LbVirtualServer(_)))
        .any(|(_, s)| {
            matches!(&s.detail, Detail::LbVirtualServer { persistence: Some(Key::LbPersistence(c)), .. } if c == cluster)
        })
}

/// The cluster's load balancer: one LB tier-1 with its links and one LB service listing
/// `virtual_servers`, and the shared persistence profile when a virtual server uses it.
pub fn lb_objects(
    cluster: &str,
    lb: LbSettings,
    virtual_servers: Vec<Key>,
    shared_persistence: bool,
    objects: &mut BTreeMap<Key, Spec>,
) {
    let cluster_tags = vec![
        tag(scope::CLUSTER, cluster),
        tag(scope::VERSION, VERSION),
        tag(scope::ROLE, "lb"),
    ];
    let c = cluster.to_string();
    let spec = |detail: Detail, suffix: &str| Spec {
        display_name: naming::name(cluster, &["lb", suffix]),
        tags: cluster_tags.clone(),
        detail,
    };
    objects.insert(Key::LbTier1(c.clone()), spec(Detail::LbTier1, "t1"));
    objects.insert(Key::LbT0Link(c.clone()), spec(Detail::LbT0Link, "t0-link"));
    objects.insert(Key::LbT1Link(c.clone()), spec(Detail::LbT1Link, "t1-link"));
    if shared_persistence {
        objects.insert(
            Key::LbPersistence(c.clone()),
            spec(
                Detail::LbPersistence {
                    timeout: DEFAULT_AFFINITY_TIMEOUT_S,
                },
                "persistence",
            ),
        );
    }
    objects.insert(
        Key::LbService(c),
        spec(
            Detail::LbService {
                virtual_servers,
                size: lb.size.nsx_name().to_string(),
            },
            "service",
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::fixture;

    #[test]
    fn a_namespace_gets_its_full_set_and_pods_get_ports() {
        let mut v = ClusterView::default();
        v.add_namespace(fixture::namespace("shop", "ns-1"));
        v.add_pod(fixture::pod(
            "shop",
            "web-1",
            "p-1",
            "node-1",
            &[("app", "web")],
        ));
        let d = desired(&v, "k8s-a", 24);
        // 9 per namespace (with its NSGroup) and one port.
        assert_eq!(d.objects.len(), 11);
        assert!(d.objects.contains_key(&Key::NsGroup("ns-1".into())));
        let port = &d.objects[&Key::PodPort("p-1".into())];
        assert_eq!(port.display_name, "k8s-a-shop-web-1");
        assert!(port.tags.contains(&Tag::new("app", "web")));
        assert!(port.tags.contains(&Tag::new("ncp/pod_uid", "p-1")));
        assert!(matches!(
            &d.objects[&Key::Subnet("ns-1".into())].detail,
            Detail::Subnet { size: 256 }
        ));
    }

    #[test]
    fn no_snat_deleting_namespaces_host_network_and_unscheduled_pods() {
        let mut v = ClusterView::default();
        let mut ns = fixture::namespace("quiet", "ns-2");
        ns.metadata.annotations =
            Some([(annotation::NO_SNAT.to_string(), "true".to_string())].into());
        v.add_namespace(ns);
        let mut gone = fixture::namespace("gone", "ns-3");
        gone.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
        );
        v.add_namespace(gone);
        let mut host = fixture::pod("quiet", "h", "p-h", "node-1", &[]);
        host.spec.as_mut().unwrap().host_network = Some(true);
        v.add_pod(host);
        v.add_pod(fixture::pod("quiet", "u", "p-u", "", &[]));
        v.add_pod(fixture::pod("gone", "x", "p-x", "node-1", &[]));
        let d = desired(&v, "k8s-a", 24);
        assert!(!d.objects.contains_key(&Key::Snat("ns-2".into())));
        assert!(d.objects.contains_key(&Key::Switch("ns-2".into())));
        assert!(
            d.objects.keys().all(|k| k.owner_uid() == "ns-2"),
            "{:?}",
            d.objects.keys()
        );
        assert_eq!(d.objects.len(), 9);
    }
}
