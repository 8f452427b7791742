//! The liveness check of the NCP side: NSX holds exactly what `desired()` computes from the
//! apiserver's objects (one each, nothing extra), each with the content NCP would write for it
//! now (every field NCP sets, compared by [`content`]; route advertisement on; a pod port's
//! VLAN a real one), namespaces and pods carry the annotations that match what NSX allocated,
//! LoadBalancer services show their VIP, SNAT rules use exactly the addresses allocated for
//! them, and the fake NSX store's own invariants hold.
//!
//! The desired state is computed from scratch here (the slow path), never taken from NCP's
//! caches, so a change NCP's change-driven passes miss shows up as a content mismatch.

pub mod content;

use fake_nsx_manager::FakeNsxManager;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use nsx_core::k8s::ClusterView;
use nsx_core::k8s::pod_network::PodNetwork;
use nsx_core::ncp::desired::desired;
use nsx_core::ncp::infra::{Infra, has_tag};
use nsx_core::ncp::naming::scope;
use nsx_core::ncp::observe::classify_object;
use nsx_core::ncp::render::{Missing, render};
use nsx_core::ncp::vocab::{Desired, Detail, Key};
use serde_json::Value;
use std::collections::BTreeMap;

use crate::apiserver::ApiServer;

/// The cluster as the apiserver holds it (read in place: this runs at every check).
pub fn view_from(api: &ApiServer) -> Result<ClusterView, String> {
    fn each<T: serde::de::DeserializeOwned>(
        api: &ApiServer,
        plural: &str,
        mut add: impl FnMut(T),
    ) -> Result<(), String> {
        api.try_each(plural, |o| {
            T::deserialize(o)
                .map(&mut add)
                .map_err(|e| format!("{plural}: {e}"))
        })
    }
    let mut v = ClusterView::default();
    each(api, "namespaces", |o: Namespace| v.add_namespace(o))?;
    each(api, "pods", |o: Pod| v.add_pod(o))?;
    each(api, "nodes", |o: Node| v.add_node(o))?;
    each(api, "services", |o: Service| v.add_service(o))?;
    each(api, "endpointslices", |o: EndpointSlice| {
        v.add_endpoint_slice(o)
    })?;
    each(
        api,
        "networkpolicies",
        |o: k8s_openapi::api::networking::v1::NetworkPolicy| v.add_network_policy(o),
    )?;
    Ok(v)
}

/// What the converge check reads of NSX's documents (taken without copying them).
#[derive(Debug, Default)]
pub struct Realized {
    /// Logical port id by pod uid.
    pub port_ids: BTreeMap<String, String>,
    /// Subnet CIDR by namespace uid.
    cidrs: BTreeMap<String, String>,
    /// VIP of each LoadBalancer service's first virtual server, by service uid.
    vips: BTreeMap<String, String>,
    /// Translated address of each namespace's SNAT rule, by namespace uid.
    snat: BTreeMap<String, String>,
    /// What NSX allocated to each pod's port, by pod uid.
    pod_addresses: BTreeMap<String, PortAddress>,
    /// Services refused the VIP they ask for, by uid, with their `ns/name`.
    pub refused_vips: BTreeMap<String, String>,
}

/// NCP has said why each refused service has no VIP: a Warning Event on it.
pub fn vip_refusals_reported(api: &ApiServer, realized: &Realized) -> Result<(), String> {
    for (uid, name) in &realized.refused_vips {
        let mut warned = false;
        api.try_each("events", |ev| {
            warned |= ev["type"] == "Warning"
                && ev["involvedObject"]["kind"] == "Service"
                && ev["involvedObject"]["uid"] == uid.as_str();
            Ok::<(), String>(())
        })?;
        if !warned {
            return Err(format!(
                "service {name} has no VIP and no Warning Event says why"
            ));
        }
    }
    Ok(())
}

/// The addresses and VLAN NSX gave a pod's port.
#[derive(Debug, Default)]
struct PortAddress {
    ip: String,
    mac: String,
    vlan: i64,
}

/// The admin objects NCP builds on, read from the fake's bootstrap and store (as NCP's
/// discovery would find them).
fn infra_of(
    boot: &fake_nsx_manager::Bootstrap,
    s: &fake_nsx_manager::Inspection<'_>,
    cluster: &str,
) -> Result<Infra, String> {
    let c = boot
        .clusters
        .get(cluster)
        .ok_or("cluster not bootstrapped")?;
    let profile = |rt: &str| {
        s.objects()
            .find(|o| o.resource_type() == rt)
            .map(|o| o.id.to_string())
    };
    Ok(Infra {
        transport_zone: boot.transport_zone.clone(),
        tier0: boot.tier0_router.clone(),
        ip_block: c.ip_block.clone(),
        snat_pool: Some(c.snat_pool.clone()),
        lb_pool: Some(c.lb_pool.clone()),
        lb_tcp_profile: profile("LbFastTcpProfile"),
        lb_udp_profile: profile("LbFastUdpProfile"),
        // NCP is not told one: the tier-0's, as the bootstrap made it.
        edge_cluster: Some(boot.edge_cluster.clone()),
        node_vifs: c
            .node_ports
            .iter()
            .map(|(n, p)| (n.clone(), p.vif_id.clone()))
            .collect(),
    })
}

fn text(d: &serde_json::Map<String, Value>, field: &str) -> String {
    d.get(field)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Each object's content against the body NCP would write for it, rendered from scratch with
/// references to the objects NSX holds.
fn check_content(
    boot: &fake_nsx_manager::Bootstrap,
    s: &fake_nsx_manager::Inspection<'_>,
    cluster: &str,
    want: &nsx_core::ncp::vocab::Desired,
    ours: &BTreeMap<Key, Vec<&serde_json::Map<String, Value>>>,
) -> Result<(), String> {
    let infra = infra_of(boot, s, cluster)?;
    // What references resolve to: the id (and a subnet's CIDR) of the one document NSX holds.
    let refs: BTreeMap<Key, Value> = ours
        .iter()
        .map(|(k, docs)| {
            let mut stub = serde_json::Map::new();
            for f in ["id", "cidr"] {
                if let Some(v) = docs[0].get(f) {
                    stub.insert(f.to_string(), v.clone());
                }
            }
            (k.clone(), Value::Object(stub))
        })
        .collect();
    for (key, spec) in &want.objects {
        let have = ours[key][0];
        let name = || {
            format!(
                "{key:?} ({} {} {:?})",
                text(have, "resource_type"),
                text(have, "id"),
                text(have, "display_name")
            )
        };
        let mut spec = spec.clone();
        if let Detail::PodPort { vlan, .. } = &mut spec.detail {
            // The planner picks the VLAN; any real one will do, unique under the parent VIF
            // (a standing invariant).
            let tag = have
                .get("attachment")
                .and_then(|a| a.get("context"))
                .and_then(|c| c.get("traffic_tag"))
                .and_then(Value::as_i64);
            match tag
                .and_then(|t| u16::try_from(t).ok())
                .filter(|t| (1..=4094).contains(t))
            {
                Some(t) => *vlan = Some(t),
                None => return Err(format!("{}: traffic_tag {tag:?} is not a VLAN", name())),
            }
        }
        let address = match key {
            Key::Snat(_) => have.get("translated_network").and_then(Value::as_str),
            Key::LbVirtualServer(_) => have.get("ip_address").and_then(Value::as_str),
            _ => None,
        };
        let body = render(key, &spec, &infra, &refs, address)
            .map_err(|Missing(m)| format!("{}: cannot be rendered, {m:?} is missing", name()))?;
        let Value::Object(body) = body else {
            return Err(format!("{}: rendered as a non-object", name()));
        };
        let mismatch =
            if let Key::AllowSection(_) | Key::IsolationSection(_) | Key::NodeSection(_) = key {
                let mut with_rules = have.clone();
                let id = text(have, "id");
                let rules: Vec<Value> =
                    s.rules(&id).map(|o| Value::Object(o.doc.clone())).collect();
                with_rules.insert("rules".into(), Value::Array(rules));
                content::compare(&body, &with_rules)
            } else {
                content::compare(&body, have)
            };
        if let Some(m) = mismatch {
            return Err(format!("{}: {m}", name()));
        }
        if let Key::Tier1(_) | Key::LbTier1(_) = key {
            let adv = s
                .advertisement(&text(have, "id"))
                .ok_or_else(|| format!("{}: no route advertisement", name()))?;
            for (f, v) in [
                ("enabled", adv.enabled),
                (
                    "advertise_nsx_connected_routes",
                    adv.advertise_nsx_connected_routes,
                ),
                ("advertise_nat_routes", adv.advertise_nat_routes),
                ("advertise_lb_vip", adv.advertise_lb_vip),
            ] {
                if v != Some(true) {
                    return Err(format!(
                        "{}: route advertisement {f}: wanted true, NSX holds {v:?}",
                        name()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The allocations in `pool` tagged with the cluster, by address.
fn allocations(nsx: &FakeNsxManager, pool: &str, cluster: &str) -> BTreeMap<String, Value> {
    let r = nsx.as_admin(
        "GET",
        &format!("/api/v1/pools/ip-pools/{pool}/allocations"),
        &[],
        None,
    );
    r.body["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| has_tag(a, scope::CLUSTER, cluster))
        .map(|a| {
            (
                a["allocation_id"].as_str().unwrap_or_default().to_string(),
                a.clone(),
            )
        })
        .collect()
}

/// The service an LB-pool allocation was made for (its `ncp/service_uid` tag).
fn allocated_for(allocation: &Value) -> Option<&str> {
    allocation["tags"]
        .as_array()?
        .iter()
        .find(|t| t["scope"] == scope::SERVICE_UID)?
        .get("tag")?
        .as_str()
}

/// LoadBalancer services whose `spec.loadBalancerIP` NCP cannot give them, each with the
/// `ncp/error.loadbalancer` value it must carry: decided here from the LB pool's ranges and
/// allocations as NSX reports them (not from NCP's code): an address that is not IPv4, is
/// outside the pool, or is held by anything but the service itself.
pub fn refused_vips(
    view: &ClusterView,
    nsx: &FakeNsxManager,
    cluster: &str,
) -> Result<BTreeMap<String, &'static str>, String> {
    let mut refused = BTreeMap::new();
    let asking: Vec<(String, String)> = view
        .services
        .values()
        .filter(|s| {
            s.spec
                .as_ref()
                .is_some_and(|s| s.type_.as_deref() == Some("LoadBalancer"))
        })
        .filter_map(|s| {
            let ip = s.spec.as_ref()?.load_balancer_ip.as_deref()?.trim();
            (!ip.is_empty()).then(|| (s.metadata.uid.clone().unwrap_or_default(), ip.to_string()))
        })
        .collect();
    if asking.is_empty() {
        return Ok(refused);
    }
    let boot = nsx.bootstrap().ok_or("no bootstrap")?;
    let pool = &boot
        .clusters
        .get(cluster)
        .ok_or("cluster not bootstrapped")?
        .lb_pool;
    let doc = nsx
        .as_admin("GET", &format!("/api/v1/pools/ip-pools/{pool}"), &[], None)
        .body;
    let ranges: Vec<(u32, u32)> = doc["subnets"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["allocation_ranges"].as_array().into_iter().flatten())
        .filter_map(|r| {
            let a: std::net::Ipv4Addr = r["start"].as_str()?.parse().ok()?;
            let b: std::net::Ipv4Addr = r["end"].as_str()?.parse().ok()?;
            Some((u32::from(a), u32::from(b)))
        })
        .collect();
    let held = nsx
        .as_admin(
            "GET",
            &format!("/api/v1/pools/ip-pools/{pool}/allocations"),
            &[],
            None,
        )
        .body;
    let holder = |ip: &str| -> Option<String> {
        held["results"]
            .as_array()?
            .iter()
            .find(|a| a["allocation_id"].as_str() == Some(ip))
            .map(|a| allocated_for(a).unwrap_or("someone else").to_string())
    };
    for (uid, text) in asking {
        let code = match text.parse::<std::net::Ipv4Addr>() {
            Err(_) => Some("INVALID_LOADBALANCER_IP"),
            Ok(ip)
                if !ranges
                    .iter()
                    .any(|(a, b)| (*a..=*b).contains(&u32::from(ip))) =>
            {
                Some("IP_NOT_IN_POOL")
            }
            Ok(ip) => match holder(&ip.to_string()) {
                Some(h) if h != uid => Some("IP_ALREADY_ALLOCATED"),
                _ => None,
            },
        };
        if let Some(code) = code {
            refused.insert(uid, code);
        }
    }
    Ok(refused)
}

/// Adds to `refused` the LoadBalancer services the load balancer has no room for: a service
/// none of whose virtual servers exists is one only if they would not fit beside those that
/// exist (the LB service's size bounds them: SMALL 20, MEDIUM 100, LARGE 1,000); a service
/// with some but not all of them is an error, as is a load balancer over its size.
fn lb_full<'k>(
    want: &Desired,
    realized: impl Iterator<Item = &'k Key>,
    refused: &mut BTreeMap<String, &'static str>,
) -> Result<(), String> {
    let size = want.objects.iter().find_map(|(_, s)| match &s.detail {
        Detail::LbService { size, .. } => Some(size.clone()),
        _ => None,
    });
    let Some(size) = size else {
        return Ok(());
    };
    let limit = match size.as_str() {
        "SMALL" => 20,
        "MEDIUM" => 100,
        "LARGE" => 1000,
        other => return Err(format!("the LB service's size {other:?} is not NSX's")),
    };
    let realized: std::collections::BTreeSet<&Key> = realized
        .filter(|k| matches!(k, Key::LbVirtualServer(_)))
        .collect();
    if realized.len() > limit {
        return Err(format!(
            "the {size} load balancer has {} virtual servers, at most {limit} fit",
            realized.len()
        ));
    }
    let mut by_service: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for k in want.objects.keys() {
        if let Key::LbVirtualServer(v) = k {
            let svc = v.split('/').next().unwrap_or_default();
            if refused.contains_key(svc) {
                continue;
            }
            let e = by_service.entry(svc).or_default();
            e.0 += 1;
            e.1 += usize::from(realized.contains(k));
        }
    }
    let mut full = Vec::new();
    for (svc, (total, existing)) in by_service {
        if existing == total {
            continue;
        }
        if existing > 0 {
            return Err(format!(
                "service {svc} has {existing} of its {total} virtual servers"
            ));
        }
        if realized.len() + total <= limit {
            // It fits: its virtual servers are simply missing (yet).
            continue;
        }
        full.push(svc.to_string());
    }
    for svc in full {
        refused.insert(svc, "LB_SERVICE_FULL");
    }
    Ok(())
}

/// `Err` says the first thing that is not there yet.
pub fn ncp_converged(
    api: &ApiServer,
    nsx: &FakeNsxManager,
    cluster: &str,
    subnet_prefix: u8,
) -> Result<(ClusterView, Realized), String> {
    let view = view_from(api)?;
    let want = desired(&view, cluster, subnet_prefix);
    let realized = ncp_converged_in(&view, &want, nsx, cluster)?;
    vip_refusals_reported(api, &realized)?;
    Ok((view, realized))
}

/// The pods that want an NSX port and carry no network annotation yet: a necessary condition
/// of [`ncp_converged_in`] that reads only the view, so that a check made while NCP is still
/// annotating answers in a fraction of the time of the whole comparison (same verdict; the
/// message may name this instead of an NSX object still missing).
pub fn pods_annotated(view: &ClusterView, want: &Desired) -> Result<(), String> {
    for ((ns, name), pod) in &view.pods {
        let Some(uid) = pod.metadata.uid.as_ref() else {
            continue;
        };
        if !want.objects.contains_key(&Key::PodPort(uid.clone())) {
            continue;
        }
        let annotated = pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(nsx_core::k8s::annotation::POD_NETWORK));
        if !annotated {
            return Err(format!("pod {ns}/{name} has no network annotation"));
        }
    }
    Ok(())
}

/// [`ncp_converged`] on a view already read and its desired state (computed from scratch).
pub fn ncp_converged_in(
    view: &ClusterView,
    want: &Desired,
    nsx: &FakeNsxManager,
    cluster: &str,
) -> Result<Realized, String> {
    let boot = nsx.bootstrap().ok_or("no bootstrap")?;
    // A service refused the VIP it asks for, or the room on the load balancer, has no
    // virtual servers.
    let mut refused = refused_vips(view, nsx, cluster)?;
    let (mut observed, strays) = nsx.inspect(|s| -> Result<(Realized, usize), String> {
        let mut ours: BTreeMap<Key, Vec<&serde_json::Map<String, Value>>> = BTreeMap::new();
        // Pod ports (tagged with a pod uid) that NCP would not recognise as its own.
        let mut strays = 0;
        for o in s.objects() {
            match classify_object(o.doc, cluster) {
                Some(k) => ours.entry(k).or_default().push(o.doc),
                None => {
                    strays += usize::from(
                        o.doc
                            .get("tags")
                            .and_then(Value::as_array)
                            .is_some_and(|t| t.iter().any(|t| t["scope"] == "ncp/pod_uid")),
                    );
                }
            }
        }
        lb_full(want, ours.keys(), &mut refused)?;
        let filtered;
        let want = if refused.is_empty() {
            want
        } else {
            let mut w = want.clone();
            w.objects.retain(|k, _| match k {
                Key::LbVirtualServer(v) => !refused.contains_key(v.split('/').next().unwrap_or("")),
                _ => true,
            });
            filtered = w;
            &filtered
        };
        for key in want.objects.keys() {
            match ours.get(key).map(Vec::len) {
                Some(1) => {}
                Some(n) => return Err(format!("{key:?} exists {n} times")),
                None => return Err(format!("{key:?} is missing")),
            }
        }
        if let Some(extra) = ours.keys().find(|k| !want.objects.contains_key(k)) {
            return Err(format!("{extra:?} should be gone"));
        }
        check_content(&boot, s, cluster, want, &ours)?;
        let mut r = Realized::default();
        for (k, docs) in &ours {
            let d = docs[0];
            match k {
                Key::PodPort(uid) => {
                    let id = text(d, "id");
                    let binding = s.port_binding(&id).unwrap_or_default();
                    r.pod_addresses.insert(
                        uid.clone(),
                        PortAddress {
                            ip: binding.ip_address.unwrap_or_default(),
                            mac: binding.mac_address.unwrap_or_default(),
                            vlan: d
                                .get("attachment")
                                .and_then(|a| a.get("context"))
                                .and_then(|c| c.get("traffic_tag"))
                                .and_then(Value::as_i64)
                                .unwrap_or(-1),
                        },
                    );
                    r.port_ids.insert(uid.clone(), id);
                }
                Key::Subnet(uid) => {
                    r.cidrs.insert(uid.clone(), text(d, "cidr"));
                }
                Key::LbVirtualServer(v) => {
                    let uid = v.split('/').next().unwrap_or_default().to_string();
                    let ip = text(d, "ip_address");
                    let first = r.vips.entry(uid.clone()).or_insert_with(|| ip.clone());
                    if *first != ip {
                        return Err(format!(
                            "service {uid} has virtual servers on {first} and on {ip}"
                        ));
                    }
                }
                Key::Snat(uid) => {
                    r.snat.insert(uid.clone(), text(d, "translated_network"));
                }
                _ => {}
            }
        }
        Ok((r, strays))
    })?;
    let ann = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, k: &str| {
        meta.annotations.as_ref().and_then(|a| a.get(k)).cloned()
    };
    for (name, ns) in &view.namespaces {
        let Some(uid) = ns.metadata.uid.clone() else {
            continue;
        };
        if !want.objects.contains_key(&Key::Subnet(uid.clone())) {
            continue;
        }
        let cidr = observed.cidrs.get(&uid).map_or("", String::as_str);
        let have = ann(&ns.metadata, nsx_core::k8s::annotation::SUBNET);
        if have.as_deref() != Some(cidr) {
            return Err(format!(
                "namespace {name}: subnet annotation {have:?}, NSX has {cidr}"
            ));
        }
        let snat = observed.snat.get(&uid);
        let have = ann(&ns.metadata, nsx_core::k8s::annotation::SNAT_IP);
        if have.as_ref() != snat {
            return Err(format!(
                "namespace {name}: {} annotation {have:?}, its SNAT rule translates to {snat:?}",
                nsx_core::k8s::annotation::SNAT_IP
            ));
        }
    }
    for ((ns, name), pod) in &view.pods {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let Some(port) = observed.port_ids.get(&uid) else {
            continue;
        };
        let text = ann(&pod.metadata, nsx_core::k8s::annotation::POD_NETWORK)
            .ok_or(format!("pod {ns}/{name} has no network annotation"))?;
        let net: PodNetwork = serde_json::from_str(&text)
            .map_err(|e| format!("pod {ns}/{name}: network annotation {text:?}: {e}"))?;
        if net.logical_port_id != *port {
            return Err(format!(
                "pod {ns}/{name}: annotation names port \"{}\", NSX has \"{port}\"",
                net.logical_port_id
            ));
        }
        let subnet = view
            .namespaces
            .get(ns)
            .and_then(|n| n.metadata.uid.as_ref())
            .and_then(|u| observed.cidrs.get(u))
            .cloned()
            .unwrap_or_default();
        let Some((_, gw, _, _, prefix)) = nsx_core::ncp::render::subnet_layout(&subnet) else {
            return Err(format!("pod {ns}/{name}: its namespace has no subnet"));
        };
        let Some(a) = observed.pod_addresses.get(&uid) else {
            return Err(format!(
                "pod {ns}/{name}: NSX allocated nothing to its port"
            ));
        };
        let wanted = [
            ("ip", format!("{}/{prefix}", a.ip), net.ip.clone()),
            ("mac", a.mac.clone(), net.mac.clone()),
            ("vlan", a.vlan.to_string(), net.vlan.to_string()),
            (
                "gateway",
                std::net::Ipv4Addr::from(gw).to_string(),
                net.gateway.clone(),
            ),
        ];
        for (field, want, have) in wanted {
            if want != have {
                return Err(format!(
                    "pod {ns}/{name}: annotation {field} is {have:?}, NSX gave its port {want:?}"
                ));
            }
        }
    }
    for ((ns, name), svc) in &view.services {
        let uid = svc.metadata.uid.clone().unwrap_or_default();
        let error = ann(&svc.metadata, nsx_core::k8s::annotation::LB_ERROR);
        let want_error = refused.get(&uid).map(|c| c.to_string());
        if want_error.is_some() {
            observed
                .refused_vips
                .insert(uid.clone(), format!("{ns}/{name}"));
        }
        if error != want_error {
            return Err(format!(
                "service {ns}/{name}: {} is {error:?}, expected {want_error:?}",
                nsx_core::k8s::annotation::LB_ERROR
            ));
        }
        let Some(vip) = observed.vips.get(&uid) else {
            continue;
        };
        if let Some(asked) = svc
            .spec
            .as_ref()
            .and_then(|s| s.load_balancer_ip.as_deref())
            .map(str::trim)
            .filter(|a| !a.is_empty())
            && asked != vip
        {
            return Err(format!(
                "service {ns}/{name}: loadBalancerIP {asked}, its VIP is \"{vip}\""
            ));
        }
        let ingress = nsx_core::k8s::lb_ingress_ip(svc);
        if ingress.as_deref() != Some(vip.as_str()) {
            return Err(format!(
                "service {ns}/{name}: status shows {ingress:?}, the VIP is \"{vip}\""
            ));
        }
    }
    let ids = boot
        .clusters
        .get(cluster)
        .ok_or("cluster not bootstrapped")?;
    // Every SNAT rule uses an address allocated for it, and no allocation is left over.
    let allocated: std::collections::BTreeSet<String> = allocations(nsx, &ids.snat_pool, cluster)
        .into_keys()
        .collect();
    let used: std::collections::BTreeSet<String> = observed.snat.values().cloned().collect();
    if used.len() != observed.snat.len() {
        return Err("two SNAT rules translate to one address".into());
    }
    if allocated != used {
        return Err(format!(
            "SNAT addresses allocated {allocated:?}, used by SNAT rules {used:?}"
        ));
    }
    // Every VIP is allocated from the LB pool for its service.
    let lb = allocations(nsx, &ids.lb_pool, cluster);
    // ... and nothing else is: a VIP outlives neither its service nor its virtual servers.
    if let Some((ip, _)) = lb
        .iter()
        .find(|(ip, a)| allocated_for(a).is_none_or(|svc| observed.vips.get(svc) != Some(*ip)))
    {
        return Err(format!(
            "VIP {ip} is still allocated in the LB pool, for no virtual server"
        ));
    }
    for (svc, vip) in &observed.vips {
        let for_it = lb
            .get(vip)
            .is_some_and(|a| has_tag(a, scope::SERVICE_UID, svc));
        if !for_it {
            return Err(format!(
                "VIP {vip} of service {svc} is not allocated for it in the LB pool"
            ));
        }
    }
    nsx.inspect(|s| s.check_invariants())?;
    if strays > 0 {
        return Err(format!("{strays} pod ports not classified"));
    }
    Ok(observed)
}
