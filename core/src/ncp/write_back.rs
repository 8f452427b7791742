//! What a pass writes back to Kubernetes: each pod's network annotation (which the node agent
//! waits for), each namespace's subnet and SNAT address, each LoadBalancer service's VIP, and
//! Warning Events for what NSX refused or cannot express. Everything is patched only when it
//! differs, so a pass that changes nothing writes nothing.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use hyper_util::client::legacy::connect::Connect;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use super::leader::Fence;
use super::naming;
use super::observe::Observed;
use super::plan::Op;
use super::reconcile::{Outcome, WriteGate};
use super::render::pod_network;
use super::vocab::{Detail, Key};
use crate::k8s::pod_network::PodNetwork;
use crate::k8s::{ClusterView, ViewChanges, annotation};
use crate::nsx::NsxClient;

fn annotations_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> BTreeMap<String, String> {
    meta.annotations.clone().unwrap_or_default()
}

/// The objects whose annotations or status a pass checks, when not all of them.
#[derive(Debug, Default)]
pub(super) struct WriteScope {
    namespaces: BTreeSet<String>,
    pods: BTreeSet<(String, String)>,
    services: BTreeSet<(String, String)>,
}

impl WriteScope {
    /// What changed in the cluster, and the owners of what the plan created or updated.
    pub(super) fn of(changes: &ViewChanges, outcome: &Outcome) -> Self {
        let mut w = Self {
            namespaces: changes.namespaces.clone(),
            pods: changes.pods.clone(),
            services: changes.services.clone(),
        };
        let pair = |text: &str| {
            text.split_once('/')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        };
        for op in &outcome.plan.ops {
            let (Op::Create { key, spec } | Op::Update { key, spec, .. }) = op else {
                continue;
            };
            let tag = |scope_name: &str| {
                spec.tags
                    .iter()
                    .find(|t| t.scope == scope_name)
                    .map(|t| t.tag.as_str())
            };
            match (key, &spec.detail) {
                (Key::PodPort(_), Detail::PodPort { app_id, .. }) => {
                    w.pods.extend(pair(app_id));
                }
                (Key::Subnet(_) | Key::Snat(_), _) => {
                    w.namespaces
                        .extend(tag(naming::scope::PROJECT).map(str::to_string));
                }
                (Key::LbVirtualServer(_), _) => {
                    w.services
                        .extend(tag(naming::scope::SERVICE).and_then(pair));
                }
                _ => {}
            }
        }
        w
    }
}

/// The objects of `all` named in `keys`, or all of them.
fn in_scope<'a, K: Ord, V>(
    all: &'a BTreeMap<K, V>,
    keys: Option<&BTreeSet<K>>,
) -> Vec<(&'a K, &'a V)> {
    match keys {
        None => all.iter().collect(),
        Some(keys) => keys.iter().filter_map(|k| all.get_key_value(k)).collect(),
    }
}

/// Writes the annotations that differ (of every object, or of those in `scope`); returns how
/// many objects were patched.
pub(super) async fn write_back<C>(
    kube: &kube::Client,
    nsx: &NsxClient<C>,
    view: &ClusterView,
    realized: &Observed,
    outcome: &Outcome,
    scope: Option<&WriteScope>,
    gate: &WriteGate,
) -> Result<usize, String>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let mut patched = 0;
    let fence = gate.fence.as_deref();
    let allowed = || fence.is_none_or(Fence::allows_writes);
    let namespaces = in_scope(&view.namespaces, scope.map(|s| &s.namespaces));
    let services = in_scope(&view.services, scope.map(|s| &s.services));
    let pods = in_scope(&view.pods, scope.map(|s| &s.pods));
    for (name, ns) in namespaces {
        let Some(uid) = ns.metadata.uid.clone() else {
            continue;
        };
        let current = annotations_of(&ns.metadata);
        // A value to set, or null to remove (a merge patch).
        let mut want: BTreeMap<String, Value> = BTreeMap::new();
        if let Some(cidr) = realized
            .get(&Key::Subnet(uid.clone()))
            .and_then(|d| d["cidr"].as_str())
        {
            want.insert(annotation::SUBNET.to_string(), json!(cidr));
        }
        match realized
            .get(&Key::Snat(uid.clone()))
            .and_then(|d| d["translated_network"].as_str())
        {
            Some(ip) => {
                want.insert(annotation::SNAT_IP.to_string(), json!(ip));
            }
            // No SNAT rule (the namespace opted out, or NSX refused it): no SNAT address to
            // show, and an old one would mislead.
            None if current.contains_key(annotation::SNAT_IP) => {
                want.insert(annotation::SNAT_IP.to_string(), Value::Null);
            }
            None => {}
        }
        let differs = |(k, v): (&String, &Value)| match v {
            Value::Null => current.contains_key(k),
            v => current.get(k).map(String::as_str) != v.as_str(),
        };
        if want.iter().any(differs) {
            if !allowed() {
                return Err("no longer the leader".into());
            }
            let api: Api<Namespace> = Api::all(kube.clone());
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": want}})),
            )
            .await
            .map_err(|e| format!("failed to annotate namespace {name}: {e}"))?;
            patched += 1;
        }
    }
    for ((ns_name, svc_name), svc) in services {
        let Some(uid) = svc.metadata.uid.clone() else {
            continue;
        };
        // The service's virtual servers (`<uid>/<port>`) sort together: found by range.
        let prefix = format!("{uid}/");
        let vip = realized
            .objects
            .range(Key::LbVirtualServer(prefix.clone())..)
            .next()
            .filter(|(k, _)| matches!(k, Key::LbVirtualServer(v) if v.starts_with(&prefix)))
            .and_then(|(_, d)| d.first())
            .and_then(|d| d["ip_address"].as_str());
        let error = annotations_of(&svc.metadata)
            .get(annotation::LB_ERROR)
            .cloned();
        // The error annotation: set while the service cannot have its VIP, gone once it has.
        let is_lb = svc
            .spec
            .as_ref()
            .is_some_and(|s| s.type_.as_deref() == Some("LoadBalancer"));
        let want_error = match vip {
            Some(_) => None,
            None if !is_lb => None,
            None => outcome
                .report
                .lb_errors
                .get(&uid)
                .map(|c| c.to_string())
                .or(error.clone()),
        };
        if want_error != error {
            if !allowed() {
                return Err("no longer the leader".into());
            }
            let api: Api<Service> = Api::namespaced(kube.clone(), ns_name);
            match api
                .patch(
                    svc_name,
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"metadata": {"annotations": {annotation::LB_ERROR: want_error}}}),
                    ),
                )
                .await
            {
                Ok(_) => patched += 1,
                Err(kube::Error::Api(s)) if s.code == 404 => continue,
                Err(e) => {
                    return Err(format!(
                        "failed to annotate service {ns_name}/{svc_name}: {e}"
                    ));
                }
            }
        }
        let Some(vip) = vip else { continue };
        let current = crate::k8s::lb_ingress_ip(svc);
        if current.as_deref() == Some(vip) {
            continue;
        }
        if !allowed() {
            return Err("no longer the leader".into());
        }
        let api: Api<Service> = Api::namespaced(kube.clone(), ns_name);
        match api
            .patch_status(
                svc_name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": vip}]}}})),
            )
            .await
        {
            Ok(_) => patched += 1,
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                return Err(format!(
                    "failed to set the VIP of service {ns_name}/{svc_name}: {e}"
                ));
            }
        }
    }
    // Pods are the many: their patches go `concurrency` at a time (what each needs is decided
    // first, in order; a port's state is read from NSX only when this pass did not create it).
    let mut jobs = Vec::new();
    for ((ns_name, pod_name), pod) in pods {
        let Some(uid) = pod.metadata.uid.clone() else {
            continue;
        };
        let Some(port) = realized.get(&Key::PodPort(uid.clone())) else {
            continue;
        };
        let Some(ns_uid) = view
            .namespaces
            .get(ns_name)
            .and_then(|n| n.metadata.uid.clone())
        else {
            continue;
        };
        let Some(cidr) = realized
            .get(&Key::Subnet(ns_uid))
            .and_then(|d| d["cidr"].as_str())
        else {
            continue;
        };
        let Some(port_id) = port["id"].as_str().filter(|id| !id.is_empty()) else {
            continue;
        };
        let current = annotations_of(&pod.metadata)
            .get(annotation::POD_NETWORK)
            .cloned();
        if current
            .as_deref()
            .and_then(|c| serde_json::from_str::<PodNetwork>(c).ok())
            .is_some_and(|c| c.logical_port_id == port_id)
        {
            continue;
        }
        let Some(vlan) = port["attachment"]["context"]["traffic_tag"]
            .as_u64()
            .and_then(|v| u16::try_from(v).ok())
            .filter(|v| (1..=4094).contains(v))
        else {
            continue;
        };
        let known = outcome
            .report
            .pod_networks
            .get(&uid)
            .filter(|n| n.logical_port_id == port_id)
            .cloned();
        jobs.push(annotate_pod(
            kube, nsx, ns_name, pod_name, uid, port_id, cidr, vlan, known, &allowed,
        ));
    }
    let mut results = futures::stream::iter(jobs).buffer_unordered(gate.concurrency.max(1));
    let mut first_error = None;
    while let Some(r) = results.next().await {
        match r {
            Ok(true) => patched += 1,
            Ok(false) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(patched)
}

/// Writes one pod's network annotation: `known` when this pass created its port, else read
/// from the port's realized state. `Ok(false)` when there is nothing to write yet (NSX has not
/// realized the binding) or the pod is gone.
#[allow(clippy::too_many_arguments)]
async fn annotate_pod<C>(
    kube: &kube::Client,
    nsx: &NsxClient<C>,
    ns_name: &str,
    pod_name: &str,
    uid: String,
    port_id: &str,
    cidr: &str,
    vlan: u16,
    known: Option<PodNetwork>,
    allowed: &dyn Fn() -> bool,
) -> Result<bool, String>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let net = match known {
        Some(n) => n,
        None => {
            // A port created by an earlier pass whose annotation never made it.
            let state: Value = nsx
                .get(&format!("logical-ports/{port_id}/state"))
                .await
                .map_err(|e| format!("failed to read the state of port {port_id}: {e}"))?;
            let b = &state["realized_bindings"][0]["binding"];
            // Not realized yet: a later pass reads it again.
            let (Some(ip), Some(mac)) = (b["ip_address"].as_str(), b["mac_address"].as_str())
            else {
                return Ok(false);
            };
            let Some(n) = pod_network(ip, mac, vlan, cidr, port_id) else {
                return Ok(false);
            };
            n
        }
    };
    let value = net.to_json();
    if !allowed() {
        return Err("no longer the leader".into());
    }
    let api: Api<Pod> = Api::namespaced(kube.clone(), ns_name);
    match api
        .patch(
            pod_name,
            &PatchParams::default(),
            // The uid is a precondition: if the pod was deleted and recreated under its name
            // meanwhile, the old pod's network must not land on the new one (its node agent
            // would wire it with the old port's VLAN).
            &Patch::Merge(
                json!({"metadata": {"uid": uid, "annotations": {annotation::POD_NETWORK: value}}}),
            ),
        )
        .await
    {
        Ok(_) => Ok(true),
        // The pod went away meanwhile (or was replaced): the next pass cleans up its port.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(false),
        Err(e) => Err(format!("failed to annotate pod {ns_name}/{pod_name}: {e}")),
    }
}

/// Posts a Warning Event on the Kubernetes owner of each object NSX refused, once per distinct
/// message (`reported` remembers what was said).
pub(super) async fn report_failures(
    kube: &kube::Client,
    view: &ClusterView,
    failed: &BTreeMap<Key, String>,
    reported: &mut BTreeMap<Key, String>,
    reason: &str,
) {
    reported.retain(|k, _| failed.contains_key(k));
    for (key, message) in failed {
        if reported.get(key) == Some(message) {
            continue;
        }
        // Per-policy and per-service-port keys are `<owner uid>/<part>`.
        let uid = key.owner_uid().split('/').next().unwrap_or_default();
        let owner = view
            .namespaces
            .values()
            .find(|n| n.metadata.uid.as_deref() == Some(uid))
            .map(|n| {
                (
                    "Namespace",
                    n.metadata.name.clone().unwrap_or_default(),
                    n.metadata.name.clone().unwrap_or_default(),
                )
            })
            .or_else(|| {
                view.pods
                    .iter()
                    .find(|(_, p)| p.metadata.uid.as_deref() == Some(uid))
                    .map(|((ns, name), _)| ("Pod", ns.clone(), name.clone()))
            })
            .or_else(|| {
                view.network_policies
                    .iter()
                    .find(|(_, p)| p.metadata.uid.as_deref() == Some(uid))
                    .map(|((ns, name), _)| ("NetworkPolicy", ns.clone(), name.clone()))
            })
            .or_else(|| {
                view.services
                    .iter()
                    .find(|(_, s)| s.metadata.uid.as_deref() == Some(uid))
                    .map(|((ns, name), _)| ("Service", ns.clone(), name.clone()))
            });
        let Some((kind, ns, name)) = owner else {
            continue;
        };
        let event = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": format!("{name}.ncp-"), "namespace": ns},
            "involvedObject": {"kind": kind, "name": name, "namespace": if kind == "Namespace" { None } else { Some(ns.clone()) }, "uid": uid},
            "reason": reason,
            "message": format!("{key:?}: {message}"),
            "type": "Warning",
            "source": {"component": "ncp"},
        });
        let Ok(event) = serde_json::from_value::<k8s_openapi::api::core::v1::Event>(event) else {
            continue;
        };
        let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(kube.clone(), &ns);
        match api.create(&Default::default(), &event).await {
            Ok(_) => {
                reported.insert(key.clone(), message.clone());
            }
            Err(e) => tracing::warn!(error = %e, "failed to post an Event"),
        }
    }
}
