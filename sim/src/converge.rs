//! The liveness check of the NCP side: NSX holds exactly what `desired()` computes from the
//! apiserver's objects (one each, nothing extra), namespaces and pods carry the annotations
//! that match, LoadBalancer services show their VIP, SNAT allocations match SNAT rules, and
//! the fake NSX store's own invariants hold.

use fake_nsx_manager::FakeNsxManager;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use nsx_core::k8s::ClusterView;
use nsx_core::ncp::desired::{Key, desired};
use nsx_core::ncp::observe::classify_object;
use serde_json::Value;
use std::collections::BTreeMap;

use crate::apiserver::ApiServer;

/// The cluster as the apiserver holds it.
pub fn view_from(api: &ApiServer) -> Result<ClusterView, String> {
    let mut v = ClusterView::default();
    for o in api.list("namespaces") {
        v.add_namespace(serde_json::from_value::<Namespace>(o).map_err(|e| e.to_string())?);
    }
    for o in api.list("pods") {
        v.add_pod(serde_json::from_value::<Pod>(o).map_err(|e| e.to_string())?);
    }
    for o in api.list("nodes") {
        v.add_node(serde_json::from_value::<Node>(o).map_err(|e| e.to_string())?);
    }
    for o in api.list("services") {
        v.add_service(serde_json::from_value::<Service>(o).map_err(|e| e.to_string())?);
    }
    for o in api.list("endpointslices") {
        v.add_endpoint_slice(
            serde_json::from_value::<EndpointSlice>(o).map_err(|e| e.to_string())?,
        );
    }
    for o in api.list("networkpolicies") {
        v.add_network_policy(
            serde_json::from_value::<k8s_openapi::api::networking::v1::NetworkPolicy>(o)
                .map_err(|e| e.to_string())?,
        );
    }
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
    snat_rules: usize,
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
    let (observed, strays) = nsx.with_store(|s| -> Result<(Realized, usize), String> {
        let mut ours: BTreeMap<Key, Vec<&serde_json::Map<String, Value>>> = BTreeMap::new();
        // Pod ports (tagged with a pod uid) that NCP would not recognise as its own.
        let mut strays = 0;
        for (_, o) in s.objects() {
            match classify_object(&o.doc, cluster) {
                Some(k) => ours.entry(k).or_default().push(&o.doc),
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
        let text = |d: &serde_json::Map<String, Value>, field: &str| {
            d.get(field)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let mut r = Realized::default();
        for (k, docs) in &ours {
            let d = docs[0];
            match k {
                Key::PodPort(uid) => {
                    r.port_ids.insert(uid.clone(), text(d, "id"));
                }
                Key::Subnet(uid) => {
                    r.cidrs.insert(uid.clone(), text(d, "cidr"));
                }
                Key::LbVirtualServer(v) => {
                    let uid = v.split('/').next().unwrap_or_default().to_string();
                    r.vips.entry(uid).or_insert_with(|| text(d, "ip_address"));
                }
                Key::Snat(_) => r.snat_rules += 1,
                _ => {}
            }
        }
        Ok((r, strays))
    })?;
    for (name, ns) in &view.namespaces {
        let Some(uid) = ns.metadata.uid.clone() else {
            continue;
        };
        if !want.objects.contains_key(&Key::Subnet(uid.clone())) {
            continue;
        }
        let ann = ns.metadata.annotations.clone().unwrap_or_default();
        let cidr = observed.cidrs.get(&uid).map_or("", String::as_str);
        if ann
            .get(nsx_core::k8s::annotation::SUBNET)
            .map(String::as_str)
            != Some(cidr)
        {
            return Err(format!(
                "namespace {name}: subnet annotation {:?}, NSX has {cidr}",
                ann.get(nsx_core::k8s::annotation::SUBNET)
            ));
        }
    }
    for ((ns, name), pod) in &view.pods {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let Some(port) = observed.port_ids.get(&uid) else {
            continue;
        };
        let ann = pod.metadata.annotations.clone().unwrap_or_default();
        let net: Value = ann
            .get(nsx_core::k8s::annotation::POD_NETWORK)
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or(format!("pod {ns}/{name} has no network annotation"))?;
        if net["logical_port_id"] != port.as_str() {
            return Err(format!(
                "pod {ns}/{name}: annotation names port {}, NSX has \"{port}\"",
                net["logical_port_id"]
            ));
        }
        let subnet = view
            .namespaces
            .get(ns)
            .and_then(|n| n.metadata.annotations.clone())
            .and_then(|a| a.get(nsx_core::k8s::annotation::SUBNET).cloned())
            .unwrap_or_default();
        let prefix = subnet.rsplit_once('.').map(|(p, _)| p).unwrap_or("?");
        if !net["ip"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("{prefix}."))
        {
            return Err(format!("pod {ns}/{name}: {} is not in {subnet}", net["ip"]));
        }
    }
    for ((ns, name), svc) in &view.services {
        let uid = svc.metadata.uid.clone().unwrap_or_default();
        let Some(vip) = observed.vips.get(&uid) else {
            continue;
        };
        let ingress = nsx_core::k8s::lb_ingress_ip(svc);
        if ingress.as_deref() != Some(vip.as_str()) {
            return Err(format!(
                "service {ns}/{name}: status shows {ingress:?}, the VIP is \"{vip}\""
            ));
        }
    }
    let snat_rules = observed.snat_rules;
    let boot = nsx.bootstrap().ok_or("no bootstrap")?;
    let pool = &boot
        .clusters
        .get(cluster)
        .ok_or("cluster not bootstrapped")?
        .snat_pool;
    let r = nsx.call_as_admin(fake_nsx_manager::dispatch::ApiRequest {
        method: "GET",
        path: &format!("/api/v1/pools/ip-pools/{pool}/allocations"),
        query: &[],
        body: b"",
    });
    let ours = r.body.unwrap_or_default()["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a.to_string().contains(cluster))
        .count();
    if ours != snat_rules {
        return Err(format!(
            "{ours} SNAT allocations for {snat_rules} SNAT rules"
        ));
    }
    nsx.with_store(|s| s.check_invariants())?;
    if strays > 0 {
        return Err(format!("{strays} pod ports not classified"));
    }
    Ok((view, observed))
}
