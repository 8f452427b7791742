//! One scenario's world on turmoil: the apiserver, the NSX manager, NCP replicas, the nodes;
//! the harness playing Kubernetes (ClusterIPs, placement, the endpoints controller); faults;
//! the standing invariants and the convergence check.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use fake_nsx_manager::{Clock, FakeNsxManager, FaultRule, ManagerConfig};
use k8s_openapi::api::core::v1::Pod;
use nsx_core::k8s::pod_network::PodNetwork;
use nsx_core::k8s::{ClusterView, annotation};
use nsx_core::ncp::desired::NetworkSettings;
use nsx_core::ncp::observe::classify_object;
use nsx_core::ncp::vocab::Key;
use nsx_core::ovs::flow::Action;
use nsx_core::ovs::interface::external_id;
use nsx_core::ovs::pipeline::Cookie;
use serde_json::{Value, json};

use super::names::{self, ip_string};
use super::node::{self, NodeState};
use super::spec::{Fault, Scenario};
use crate::apiserver::ApiServer;
use crate::trace::Trace;

/// Simulated milliseconds per turmoil step. Every host is polled once per step, so this is
/// the harness's main cost. 25 ms is below every timer that matters (the node agent's 200 ms
/// annotation poll, NCP's 100 ms debounce; the proxy's 20 ms debounce ends at the next step)
/// and above the 3 ms message latency bound.
const TICK_MS: u64 = 25;

pub use crate::ncp_host::{replica, sim_clock};

pub struct World {
    pub sc: Scenario,
    pub seed: u64,
    pub sim: turmoil::Sim<'static>,
    pub api: ApiServer,
    pub nsx: FakeNsxManager,
    pub trace: Trace,
    pub nodes: BTreeMap<String, Rc<NodeState>>,
    pub tier0: String,
    /// Objects not of this cluster when NCP started (id -> document): never to change.
    pub foreign: BTreeMap<String, Value>,
    /// Ids of the preloaded objects.
    pub preloaded: Vec<String>,
    /// Objects an `admin_edit` touched (not NCP's doing).
    pub edited: BTreeSet<String>,
    pub crashed: BTreeSet<String>,
    /// Replicas to crash once the manager stopped answering them.
    pub crash_pending: BTreeSet<String>,
    next_service_ip: u32,
    next_node_port: u16,
    next_node: usize,
    /// The annotations each object's last `apply` set, by (plural, namespace, name): what
    /// kubectl keeps in `last-applied-configuration`, so that an annotation dropped from the
    /// manifest is removed while those others wrote stay.
    applied_annotations: BTreeMap<(String, String, String), BTreeSet<String>>,
    /// NCP's passes and NSX client counters, summed over replicas and restarts.
    pub ncp: crate::ncp_host::NcpCounters,
    /// The next ephemeral source port for a connectivity check (fresh for every connection,
    /// as a client's stack would pick, so old conntrack entries are not reused).
    pub next_sport: std::cell::Cell<u16>,
    /// Connectivity checks whose path nobody reads (the policy oracle's): the per-hop text of
    /// OVS and NSX is not built. Verdicts are the same either way.
    pub(super) quiet_paths: std::cell::Cell<bool>,
    /// The apiserver revision the endpoints controller last worked from (its own writes
    /// included, so the run after a write settles).
    endpoints_seen: std::cell::Cell<u64>,
    /// The pods the kubelets probe, and the apiserver revision they were last looked for at.
    pub(super) probes: std::cell::RefCell<BTreeMap<(String, String), super::probes::PodProbes>>,
    pub(super) probes_seen: std::cell::Cell<u64>,
}

impl World {
    pub fn new(sc: &Scenario, seed: u64) -> Result<World, String> {
        let c = &sc.cluster;
        let trace = Trace::default();
        crate::ncp_host::note_sim_time(Duration::ZERO);
        let api = ApiServer::new(seed, sim_clock);
        let mut mc = ManagerConfig {
            clock: Clock::new(sim_clock),
            ..Default::default()
        };
        mc.store.seed = seed;
        mc.store.search_lag_ms = sc.nsx.search_lag_ms as i64;
        mc.latency_ms = sc.nsx.latency_ms;
        let mut setup = fake_nsx_manager::bootstrap::ClusterSetup::new(&c.name, c.nodes.len());
        setup.nodes = c.nodes.clone();
        setup.container_block = c.ip_block.clone();
        setup.snat_pool = c.snat_pool.clone();
        setup.lb_pool = c.lb_pool.clone();
        // The node VMs' network holds every node (the bootstrap keeps the first addresses of
        // it for itself): a /24 up to 240 nodes, larger beyond.
        let host_bits = ((c.nodes.len() + 16) as u32)
            .next_power_of_two()
            .trailing_zeros()
            .max(8);
        setup.node_cidr = format!("172.16.0.0/{}", 32 - host_bits);
        mc.bootstrap = Some(fake_nsx_manager::BootstrapConfig {
            clusters: vec![setup],
        });
        let nsx = FakeNsxManager::try_new(mc).map_err(|e| format!("the fake NSX manager: {e}"))?;
        nsx.set_rate_limit(sc.nsx.rate_limit);
        nsx.set_concurrency_limit(sc.nsx.concurrency_limit);
        let boot = nsx
            .bootstrap()
            .ok_or("the fake NSX manager has no bootstrap")?;
        let ids = boot
            .clusters
            .get(&c.name)
            .cloned()
            .ok_or("the cluster was not bootstrapped")?;
        // Preloaded objects (another cluster's, an admin's).
        let mut preloaded = Vec::new();
        for (i, o) in sc.nsx.preload.iter().enumerate() {
            let text = o
                .to_string()
                .replace("{{tier0}}", &boot.tier0_router)
                .replace("{{transport_zone}}", &boot.transport_zone);
            let rt = o["resource_type"].as_str().unwrap_or_default();
            let path = names::collection_of(rt).ok_or(format!("preload[{i}]: {rt}"))?;
            let body: Value =
                serde_json::from_str(&text).map_err(|e| format!("nsx.preload[{i}] ({rt}): {e}"))?;
            let r = nsx.as_admin("POST", path, &[], Some(&body));
            if !r.is_success() {
                return Err(format!(
                    "nsx.preload[{i}] ({rt}) was refused by NSX ({}): {}",
                    r.status, r.body
                ));
            }
            preloaded.push(r.body["id"].as_str().unwrap_or_default().to_string());
        }
        let foreign = nsx.inspect(|s| {
            s.objects()
                .map(|o| (o.id.to_string(), Value::Object(o.doc.clone())))
                .collect::<BTreeMap<_, _>>()
        });
        let mut sim = crate::ncp_host::control_plane(seed, TICK_MS, &api, &nsx, &trace);
        let ncp = crate::ncp_host::NcpCounters::default();
        crate::ncp_host::spawn(
            &mut sim,
            &nsx,
            &crate::ncp_host::NcpHosts {
                cluster: c.name.clone(),
                snat_pool: ids.snat_pool.clone(),
                lb_pool: ids.lb_pool.clone(),
                net: NetworkSettings {
                    subnet_prefix: c.subnet_prefix,
                    enable_snat: c.enable_snat,
                    lb: c.lb,
                },
                replicas: c.ncp_replicas,
                seed,
            },
            &trace,
            &ncp,
        );
        let mut nodes = BTreeMap::new();
        for (i, n) in c.nodes.iter().enumerate() {
            let port = ids
                .node_ports
                .get(n)
                .ok_or(format!("node {n} has no VIF in NSX"))?;
            let node_ip = names::parse_ip(&port.ip_address).unwrap_or(0xac10_0000 + i as u32 + 1);
            let st = NodeState::new(n, &port.vif_id, &port.logical_port_id, node_ip);
            nodes.insert(n.clone(), st.clone());
            let t = trace.clone();
            sim.host(n.as_str(), move || node::host(st.clone(), t.clone()));
        }
        let (base, _) = names::parse_cidr(&c.service_cidr)?;
        let w = World {
            sc: sc.clone(),
            seed,
            sim,
            api,
            nsx,
            trace,
            nodes,
            tier0: boot.tier0_router,
            foreign,
            preloaded,
            edited: BTreeSet::new(),
            crashed: BTreeSet::new(),
            crash_pending: BTreeSet::new(),
            next_service_ip: base + 10,
            next_node_port: 30000,
            next_node: 0,
            applied_annotations: BTreeMap::new(),
            ncp,
            next_sport: std::cell::Cell::new(32768),
            quiet_paths: std::cell::Cell::new(false),
            endpoints_seen: std::cell::Cell::new(0),
            probes: Default::default(),
            probes_seen: std::cell::Cell::new(0),
        };
        // The namespaces every cluster has (NCP realizes them like any other; its Lease is in
        // kube-system).
        for ns in ["default", "kube-system"] {
            w.apply_raw(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            )?;
        }
        for (n, st) in &w.nodes {
            // Its address as the kubelet reports it (NCP lets the nodes reach their pods).
            w.apply_raw(
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n},
                "status": {"addresses": [
                    {"type": "InternalIP", "address": names::ip_string(st.node_ip)},
                    {"type": "Hostname", "address": n}]}}),
            )?;
        }
        Ok(w)
    }

    /// A fresh ephemeral port (32768..=60999, wrapping).
    pub fn ephemeral_port(&self) -> u16 {
        let p = self.next_sport.get();
        self.next_sport.set(if p >= 60999 { 32768 } else { p + 1 });
        p
    }

    /// A hint that the whole system may look different: the apiserver's revision, NSX's
    /// request counters, and per node the bridge's generation and the node's events. Equal
    /// tokens within a step mean a check would give the same answer (admin edits happen only
    /// at steps, and callers forget their memo at each step).
    pub fn token(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        self.api.revision().hash(&mut h);
        let c = self.nsx.counters();
        (c.total, c.writes).hash(&mut h);
        for n in self.nodes.values() {
            n.events.get().hash(&mut h);
            match n.bridge.try_lock() {
                Ok(b) => (b.generation, b.restarts).hash(&mut h),
                // Busy: something is changing it.
                Err(_) => self.now_ms().hash(&mut h),
            }
        }
        h.finish()
    }

    pub fn now_ms(&self) -> u64 {
        self.sim.elapsed().as_millis() as u64
    }

    /// One simulation step; the harness's clock (for what it does between steps) follows.
    pub fn step(&mut self) -> Result<(), String> {
        let r = self.sim.step().map(|_| ()).map_err(|e| e.to_string());
        crate::ncp_host::note_sim_time(self.sim.elapsed());
        r
    }

    pub fn record(&self, what: impl Into<String>) {
        self.trace
            .record_at(u128::from(self.now_ms()), "runner", what.into());
    }

    fn apply_raw(&self, v: Value) -> Result<(), String> {
        self.api.apply(v).map(|_| ())
    }

    // ----- the harness as Kubernetes -----------------------------------------------------

    /// `kubectl apply`: kept fields others own (annotations NCP wrote, status, the assigned
    /// ClusterIP and node), fills in what Kubernetes would (ClusterIP, NodePorts, a node).
    pub fn apply(&mut self, mut v: Value) -> Result<(), String> {
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        let ns = v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
        let plural = match kind.as_str() {
            "Namespace" => "namespaces",
            "Node" => "nodes",
            "Pod" => "pods",
            "Service" => "services",
            "EndpointSlice" => "endpointslices",
            _ => "networkpolicies",
        };
        let existing = self.api.get(plural, &ns, &name);
        if kind == "Node" && !self.nodes.contains_key(&name) {
            return Err(format!(
                "Node {name} is not one of the cluster's nodes ({})",
                self.sc.cluster.nodes.join(", ")
            ));
        }
        let id = (plural.to_string(), ns.clone(), name.clone());
        let applied: BTreeSet<String> = v["metadata"]["annotations"]
            .as_object()
            .map(|a| a.keys().cloned().collect())
            .unwrap_or_default();
        let last = self.applied_annotations.insert(id, applied);
        if let Some(cur) = &existing {
            if let Some(a) = cur["metadata"]["annotations"].as_object() {
                for (k, val) in a {
                    let dropped = last.as_ref().is_some_and(|l| l.contains(k));
                    if v["metadata"]["annotations"].get(k).is_none() && !dropped {
                        v["metadata"]["annotations"][k] = val.clone();
                    }
                }
            }
            if !cur["status"].is_null() {
                v["status"] = cur["status"].clone();
            }
        }
        match kind.as_str() {
            "Pod" => {
                let keep = existing
                    .as_ref()
                    .and_then(|c| c["spec"]["nodeName"].as_str().map(str::to_string));
                if v["spec"]["nodeName"].is_null() {
                    let n = match keep {
                        Some(n) => n,
                        None => {
                            let nodes = &self.sc.cluster.nodes;
                            let n = nodes[self.next_node % nodes.len()].clone();
                            self.next_node += 1;
                            n
                        }
                    };
                    v["spec"]["nodeName"] = Value::from(n);
                } else {
                    let n = v["spec"]["nodeName"].as_str().unwrap_or("");
                    if !self.nodes.contains_key(n) {
                        return Err(format!("Pod {ns}/{name}: node {n} is not in the cluster"));
                    }
                }
            }
            "Service" => {
                let keep = existing
                    .as_ref()
                    .and_then(|c| c["spec"]["clusterIP"].as_str().map(str::to_string));
                if v["spec"]["clusterIP"].as_str().unwrap_or("").is_empty() {
                    let ip = match keep {
                        Some(ip) => ip,
                        None => {
                            let ip = ip_string(self.next_service_ip);
                            self.next_service_ip += 1;
                            ip
                        }
                    };
                    v["spec"]["clusterIP"] = Value::from(ip.clone());
                    v["spec"]["clusterIPs"] = json!([ip]);
                }
                let ty = v["spec"]["type"]
                    .as_str()
                    .unwrap_or("ClusterIP")
                    .to_string();
                if ty == "NodePort" || ty == "LoadBalancer" {
                    let old_ports = existing
                        .as_ref()
                        .map(|c| c["spec"]["ports"].clone())
                        .unwrap_or(Value::Null);
                    if let Some(ports) = v["spec"]["ports"].as_array_mut() {
                        for (i, p) in ports.iter_mut().enumerate() {
                            if p["nodePort"].is_null() {
                                let np = old_ports[i]["nodePort"].as_u64().map_or_else(
                                    || {
                                        self.next_node_port += 1;
                                        self.next_node_port - 1
                                    },
                                    |n| n as u16,
                                );
                                p["nodePort"] = Value::from(np);
                            }
                        }
                    }
                }
            }
            "Node" => {
                // Labels on an existing node: merged, as `kubectl label` would.
                if let Some(cur) = existing {
                    let mut n = cur;
                    if let Some(l) = v["metadata"]["labels"].as_object() {
                        for (k, val) in l {
                            n["metadata"]["labels"][k] = val.clone();
                        }
                    }
                    v = n;
                }
            }
            _ => {}
        }
        self.record(format!("apply {kind} {ns}/{name}"));
        self.api
            .apply(v)
            .map(|_| ())
            .map_err(|e| format!("{kind} {ns}/{name} was refused: {e}"))
    }

    pub fn delete(&mut self, kind: &str, ns: &str, name: &str) -> Result<(), String> {
        let plural = match kind {
            "Namespace" => "namespaces",
            "Node" => "nodes",
            "Pod" => "pods",
            "Service" => "services",
            "EndpointSlice" => "endpointslices",
            _ => "networkpolicies",
        };
        self.record(format!("delete {kind} {ns}/{name}"));
        self.api
            .delete(plural, ns, name)
            .map(|_| ())
            .map_err(|e| format!("delete {kind} {ns}/{name}: {e}"))
    }

    /// The endpoints controller: a slice per service (and per distinct resolution of named
    /// ports) from the ready pods its selector picks.
    pub fn endpoints_controller(&self) {
        // Nothing changed since the last run: nothing to do (a list of every pod is not free).
        let rv = self.api.revision();
        if self.endpoints_seen.get() == rv {
            return;
        }
        let services = self.api.list("services");
        if services.iter().all(|s| {
            s["spec"]["selector"]
                .as_object()
                .is_none_or(|m| m.is_empty())
        }) {
            self.endpoints_seen.set(rv);
            return;
        }
        let pods = self.api.list("pods");
        let existing = self.api.list("endpointslices");
        for svc in services {
            let Some(sel) = svc["spec"]["selector"].as_object() else {
                continue;
            };
            if sel.is_empty() {
                continue;
            }
            let ns = svc["metadata"]["namespace"].as_str().unwrap_or("");
            let sname = svc["metadata"]["name"].as_str().unwrap_or("");
            let ports = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
            // Resolved ports -> endpoints.
            let mut groups: BTreeMap<String, (Vec<Value>, Vec<Value>)> = BTreeMap::new();
            for p in &pods {
                if p["metadata"]["namespace"].as_str() != Some(ns) {
                    continue;
                }
                let labels = &p["metadata"]["labels"];
                if !sel.iter().all(|(k, v)| labels.get(k) == Some(v)) {
                    continue;
                }
                let Some(ip) = p["status"]["podIP"].as_str() else {
                    continue;
                };
                let ready = p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                let resolved: Vec<Value> = ports
                    .iter()
                    .filter_map(|sp| {
                        let target = &sp["targetPort"];
                        let number = match target {
                            Value::Number(n) => n.as_u64(),
                            Value::String(name) => p["spec"]["containers"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
                                .find(|cp| cp["name"].as_str() == Some(name.as_str()))
                                .and_then(|cp| cp["containerPort"].as_u64()),
                            _ => sp["port"].as_u64(),
                        }?;
                        Some(
                            json!({"name": sp["name"].as_str().unwrap_or(""), "port": number,
                            "protocol": sp["protocol"].as_str().unwrap_or("TCP")}),
                        )
                    })
                    .collect();
                let group = groups
                    .entry(Value::from(resolved.clone()).to_string())
                    .or_insert_with(|| (resolved, Vec::new()));
                group.1.push(json!({
                    "addresses": [ip],
                    "conditions": {"ready": ready, "serving": ready, "terminating": false},
                    "nodeName": p["spec"]["nodeName"],
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": p["metadata"]["name"], "uid": p["metadata"]["uid"]},
                }));
            }
            let mut want: BTreeMap<String, Value> = BTreeMap::new();
            for (i, (ports, endpoints)) in groups.into_values().enumerate() {
                let name = format!("{sname}-sim{i}");
                want.insert(
                    name.clone(),
                    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": sname, "endpointslice.kubernetes.io/managed-by": "nsx-sim"}},
                        "addressType": "IPv4", "ports": ports, "endpoints": endpoints}),
                );
            }
            let have: Vec<&Value> = existing
                .iter()
                .filter(|s| {
                    s["metadata"]["namespace"].as_str() == Some(ns)
                        && s["metadata"]["labels"]["kubernetes.io/service-name"].as_str()
                            == Some(sname)
                        && s["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"]
                            == "nsx-sim"
                })
                .collect();
            for h in &have {
                let n = h["metadata"]["name"].as_str().unwrap_or("");
                if !want.contains_key(n) {
                    let _ = self.api.delete("endpointslices", ns, n);
                }
            }
            for (n, w) in want {
                let same = have.iter().any(|h| {
                    h["metadata"]["name"].as_str() == Some(n.as_str())
                        && h["ports"] == w["ports"]
                        && h["endpoints"] == w["endpoints"]
                });
                if !same {
                    let _ = self.api.apply(w);
                }
            }
        }
        self.endpoints_seen.set(self.api.revision());
    }

    // ----- faults ------------------------------------------------------------------------

    fn hosts(&self, h: &str) -> Vec<String> {
        if h == "ncp" {
            (0..self.sc.cluster.ncp_replicas).map(replica).collect()
        } else {
            vec![h.to_string()]
        }
    }

    fn pairs(&self, hs: &[String]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for a in self.hosts(&hs[0]) {
            for b in self.hosts(&hs[1]) {
                out.push((a.clone(), b));
            }
        }
        out
    }

    pub fn fault(&mut self, f: &Fault) -> Result<(), String> {
        self.record(format!("fault {f:?}"));
        match f {
            Fault::Partition(hs) => {
                for (a, b) in self.pairs(hs) {
                    self.sim.partition(a.as_str(), b.as_str());
                }
            }
            Fault::Hold(hs) => {
                for (a, b) in self.pairs(hs) {
                    self.sim.hold(a.as_str(), b.as_str());
                }
            }
            Fault::NsxErrors(e) => self.nsx.add_fault(FaultRule {
                user: None,
                method: e.method.clone(),
                path: e.path.clone(),
                status: e.status,
                error_code: e.error_code,
                rate: e.rate,
                remaining: None,
                message: None,
            }),
            Fault::Latency(l) => {
                for (a, b) in self.pairs(&l.between) {
                    self.sim
                        .set_link_latency(a.as_str(), b.as_str(), Duration::from_millis(l.min));
                    self.sim.set_link_max_message_latency(
                        a.as_str(),
                        b.as_str(),
                        Duration::from_millis(l.max),
                    );
                }
            }
            Fault::Crash(h) => {
                for x in self.hosts(h) {
                    self.sim.crash(x.as_str());
                    self.crashed.insert(x);
                }
            }
            Fault::Restart(h) => {
                for x in self.hosts(h) {
                    // A new process: a write limit set for the old one does not carry over.
                    self.nsx.unfreeze(&x);
                    self.crash_pending.remove(&x);
                    self.sim.bounce(x.as_str());
                    self.crashed.remove(&x);
                }
            }
            Fault::RestartOvs(n) => {
                let node = self.nodes.get(n).ok_or(format!("no node {n}"))?;
                node.bridge
                    .try_lock()
                    .map_err(|_| "the bridge is busy".to_string())?
                    .restart();
            }
            Fault::RestartAgent(n) => self.sim.bounce(n.as_str()),
            Fault::WatchDisconnect(_) => {
                self.api.drop_watches();
                self.api.expire_history();
            }
            Fault::CrashAfterWrites(c) => {
                for x in self.hosts(&c.host) {
                    self.nsx.freeze_after_writes(&x, c.writes);
                    self.crash_pending.insert(x);
                }
            }
            Fault::AdminEdit(a) => self.admin_edit(a)?,
        }
        Ok(())
    }

    /// Every pair of hosts.
    fn all_pairs(&self) -> Vec<(String, String)> {
        let hosts: Vec<String> = ["apiserver", "nsx-manager"]
            .into_iter()
            .map(str::to_string)
            .chain((0..self.sc.cluster.ncp_replicas).map(replica))
            .chain(self.sc.cluster.nodes.iter().cloned())
            .collect();
        let mut v = Vec::new();
        for a in &hosts {
            for b in &hosts {
                if a < b {
                    v.push((a.clone(), b.clone()));
                }
            }
        }
        v
    }

    pub fn heal(&mut self, f: Option<&Fault>) {
        self.record(format!(
            "heal {}",
            f.map_or("all".to_string(), |f| format!("{f:?}"))
        ));
        let all = f.is_none();
        if all || matches!(f, Some(Fault::Partition(_)) | Some(Fault::Hold(_))) {
            let pairs = match f {
                Some(Fault::Partition(hs)) | Some(Fault::Hold(hs)) => self.pairs(hs),
                _ => self.all_pairs(),
            };
            for (a, b) in pairs {
                self.sim.repair(a.as_str(), b.as_str());
                self.sim.release(a.as_str(), b.as_str());
            }
        }
        if all || matches!(f, Some(Fault::NsxErrors(_))) {
            self.nsx.clear_faults();
        }
        if all || matches!(f, Some(Fault::Latency(_))) {
            let pairs = match f {
                Some(Fault::Latency(l)) => self.pairs(&l.between),
                _ => self.all_pairs(),
            };
            for (a, b) in pairs {
                self.sim
                    .set_link_latency(a.as_str(), b.as_str(), Duration::from_millis(0));
                self.sim.set_link_max_message_latency(
                    a.as_str(),
                    b.as_str(),
                    Duration::from_millis(3),
                );
            }
        }
        let restart: Vec<String> = match f {
            None => self.crashed.iter().cloned().collect(),
            Some(Fault::Crash(h)) => self.hosts(h),
            Some(Fault::CrashAfterWrites(c)) => self.hosts(&c.host),
            _ => Vec::new(),
        };
        for x in restart {
            if self.crashed.remove(&x) {
                self.nsx.unfreeze(&x);
                self.sim.bounce(x.as_str());
            }
        }
        if all || matches!(f, Some(Fault::CrashAfterWrites(_))) {
            for x in std::mem::take(&mut self.crash_pending) {
                self.nsx.unfreeze(&x);
            }
        }
    }

    /// Crashes a replica as soon as its write limit is reached.
    pub fn crash_frozen(&mut self) {
        let due: Vec<String> = self
            .crash_pending
            .iter()
            .filter(|u| self.nsx.frozen(u))
            .cloned()
            .collect();
        for u in due {
            self.crash_pending.remove(&u);
            self.record(format!("{u} made its last allowed write: crashed"));
            self.sim.crash(u.as_str());
            self.crashed.insert(u);
        }
    }

    fn admin_edit(&mut self, a: &super::spec::AdminEdit) -> Result<(), String> {
        let cluster = self.sc.cluster.name.clone();
        let target = self.nsx.inspect(|s| {
            s.objects()
                .filter(|o| {
                    o.doc.get("resource_type").and_then(Value::as_str)
                        == Some(a.resource_type.as_str())
                        && o.doc
                            .get("display_name")
                            .and_then(Value::as_str)
                            .is_some_and(|n| n.contains(&a.name_contains))
                        && Value::Object(o.doc.clone())
                            .to_string()
                            .contains(&format!("\"{cluster}\""))
                })
                .map(|o| (o.id.to_string(), Value::Object(o.doc.clone())))
                .next()
        });
        let (id, doc) = target.ok_or(format!(
            "admin_edit: no {} of this cluster whose name contains `{}`",
            a.resource_type, a.name_contains
        ))?;
        let base = names::collection_of(&a.resource_type).unwrap_or("/api/v1");
        let path = format!("{base}/{id}");
        let r = if a.delete {
            // As an admin would pass: a section goes with its rules, a port with its
            // attachment.
            let query: &[(&str, &str)] = match a.resource_type.as_str() {
                "FirewallSection" => &[("cascade", "true")],
                "LogicalPort" => &[("detach", "true")],
                _ => &[],
            };
            self.nsx.as_admin("DELETE", &path, query, None)
        } else {
            let mut d = doc;
            crate::apiserver::merge_patch(&mut d, a.set.as_ref().unwrap_or(&Value::Null));
            self.nsx.as_admin("PUT", &path, &[], Some(&d))
        };
        if !r.is_success() {
            return Err(format!(
                "admin_edit of {id} was refused by NSX ({}): {}",
                r.status, r.body
            ));
        }
        self.edited.insert(id);
        Ok(())
    }

    // ----- checks ------------------------------------------------------------------------

    /// The standing safety checks (the README's "standing invariants"), cheap enough to run after every step.
    pub fn invariants(&self) -> Result<(), String> {
        let cluster = &self.sc.cluster.name;
        self.nsx
            .inspect(|s| s.check_invariants())
            .map_err(|e| format!("NSX store: {e}"))?;
        // Objects not of this cluster: unchanged, not deleted.
        let changed = self.nsx.inspect(|s| {
            self.foreign.iter().find_map(|(id, before)| {
                if self.edited.contains(id) {
                    return None;
                }
                match s.get(id) {
                    None => Some(format!(
                        "{} {id} ({}) not of this cluster was deleted",
                        before["resource_type"].as_str().unwrap_or("?"),
                        before["display_name"].as_str().unwrap_or("")
                    )),
                    Some(o) if o.doc.get("_revision") != before.get("_revision") => Some(format!(
                        "{} {id} ({}) not of this cluster was modified (by {:?})",
                        before["resource_type"].as_str().unwrap_or("?"),
                        before["display_name"].as_str().unwrap_or(""),
                        o.doc.get("_last_modified_user")
                    )),
                    _ => None,
                }
            })
        });
        if let Some(c) = changed {
            return Err(c);
        }
        // NCP's objects, one per key, and no VLAN twice under one VIF (read in place: the
        // store's documents are many, and this runs every few seconds).
        self.nsx.inspect(|s| -> Result<(), String> {
            let mut ours: BTreeMap<Key, Vec<&serde_json::Map<String, Value>>> = BTreeMap::new();
            for o in s.objects() {
                if let Some(k) = classify_object(o.doc, cluster) {
                    ours.entry(k).or_default().push(o.doc);
                }
            }
            let id = |d: &serde_json::Map<String, Value>| {
                d.get("id")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string()
            };
            for docs in ours.values_mut() {
                docs.sort_by_key(|d| {
                    (
                        d.get("_create_time").and_then(Value::as_i64).unwrap_or(0),
                        id(d),
                    )
                });
            }
            if let Some((k, v)) = ours.iter().find(|(_, v)| v.len() > 1) {
                return Err(format!(
                    "NCP created {} NSX objects for {k:?}: {}",
                    v.len(),
                    v.iter().map(|d| id(d)).collect::<Vec<_>>().join(", ")
                ));
            }
            let mut vlans: BTreeMap<(String, i64), String> = BTreeMap::new();
            for d in ours.values().flatten() {
                let Some(ctx) = d.get("attachment").map(|a| &a["context"]) else {
                    continue;
                };
                if let (Some(parent), Some(tag)) =
                    (ctx["parent_vif_id"].as_str(), ctx["traffic_tag"].as_i64())
                    && let Some(other) = vlans.insert((parent.to_string(), tag), id(d))
                {
                    return Err(format!(
                        "ports {other} and {} share VLAN {tag} under VIF {parent}",
                        id(d)
                    ));
                }
            }
            Ok(())
        })?;
        // Pods: addresses unique, inside their namespace's subnet; VLANs unique per VIF.
        let mut ips: BTreeMap<String, String> = BTreeMap::new();
        let mut macs: BTreeMap<String, String> = BTreeMap::new();
        let namespaces: BTreeMap<String, Value> = self
            .api
            .list("namespaces")
            .into_iter()
            .map(|n| (n["metadata"]["name"].as_str().unwrap_or("").to_string(), n))
            .collect();
        // Read in place: every pod, every few seconds.
        self.api.try_each("pods", |p| -> Result<(), String> {
            let Some(text) = p["metadata"]["annotations"][annotation::POD_NETWORK].as_str() else {
                return Ok(());
            };
            let ns = p["metadata"]["namespace"].as_str().unwrap_or("");
            let who = format!("{ns}/{}", p["metadata"]["name"].as_str().unwrap_or(""));
            // What the agent would accept: NCP never writes an annotation it would refuse.
            let net =
                PodNetwork::parse(text).map_err(|e| format!("pod {who}: bad annotation: {e}"))?;
            let ip = net.ip.split('/').next().unwrap_or("").to_string();
            let mac = net.mac.clone();
            if let Some(other) = ips.insert(ip.clone(), who.clone()) {
                return Err(format!("pods {other} and {who} both have {ip}"));
            }
            if let Some(other) = macs.insert(mac.clone(), who.clone()) {
                return Err(format!("pods {other} and {who} both have MAC {mac}"));
            }
            if let Some(subnet) = namespaces
                .get(ns)
                .and_then(|n| n["metadata"]["annotations"][annotation::SUBNET].as_str())
                && let (Ok(a), Ok((net_addr, len))) =
                    (names::parse_ip(&ip), names::parse_cidr(subnet))
            {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                if a & mask != net_addr {
                    return Err(format!(
                        "pod {who} has {ip}, outside its namespace's {subnet}"
                    ));
                }
            }
            Ok(())
        })?;
        // OVS: a flow naming a group names an existing one.
        for (name, n) in &self.nodes {
            let Ok(b) = n.bridge.try_lock() else { continue };
            let groups: BTreeSet<u32> = b.groups().map(|g| g.group_id).collect();
            for (f, _) in b.flows() {
                let mut named = Vec::new();
                groups_in(&f.actions, &mut named);
                if let Some(g) = named.iter().find(|g| !groups.contains(g)) {
                    return Err(format!(
                        "{name}: a flow names group {g}, which does not exist: {}",
                        f.to_dump_no_stats()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Realized == desired everywhere: NSX, annotations, every node's OVS (pods wired and
    /// nothing of deleted pods left; the proxy's services as the apiserver has them).
    pub fn converged(&self) -> Result<(), String> {
        let cluster = &self.sc.cluster.name;
        let net = NetworkSettings {
            subnet_prefix: self.sc.cluster.subnet_prefix,
            enable_snat: self.sc.cluster.enable_snat,
            lb: self.sc.cluster.lb,
        };
        let view = crate::converge::view_from(&self.api)?;
        // Every part must hold; the cheap ones, which read only the cluster and the nodes,
        // come first, so that a check made while the system is still busy answers quickly.
        // The desired state once, from scratch (the slow path, never NCP's cache).
        let want = nsx_core::ncp::desired::desired(&view, cluster, net);
        crate::converge::pods_annotated(&view, &want)?;
        self.nodes_converged(&view)?;
        let realized = crate::converge::ncp_converged_in(&view, &want, &self.nsx, cluster)?;
        crate::converge::vip_refusals_reported(&self.api, &realized)
    }

    fn nodes_converged(&self, view: &ClusterView) -> Result<(), String> {
        let slices: BTreeMap<(String, String), _> = view
            .endpoint_slices
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, n) in &self.nodes {
            let b = n
                .bridge
                .try_lock()
                .map_err(|_| format!("{name}: bridge busy"))?;
            let live: Vec<(&(String, String), &Pod)> = view
                .pods
                .iter()
                .filter(|(_, p)| {
                    p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str())
                        && !p
                            .spec
                            .as_ref()
                            .and_then(|s| s.host_network)
                            .unwrap_or(false)
                })
                .collect();
            let kubelet = n.kubelet.borrow();
            // The node's pod ports by container id, read once (a lookup per pod would scan
            // every port: quadratic in the node's pods on every check).
            let ports: BTreeMap<&str, &fake_ovs::bridge::Port> = b
                .ports()
                .filter_map(|p| Some((p.external_ids.get(external_id::CONTAINER_ID)?.as_str(), p)))
                .collect();
            let mut cookies = BTreeSet::new();
            let mut containers = BTreeSet::new();
            for (key, p) in &live {
                let uid = p.metadata.uid.clone().unwrap_or_default();
                let Some(kp) = kubelet.get(*key).filter(|k| k.uid == uid) else {
                    let why = n
                        .cni_errors
                        .borrow()
                        .get(*key)
                        .cloned()
                        .unwrap_or_else(|| "not attempted yet".into());
                    return Err(format!(
                        "pod {}/{} is not set up on {name}: {why}",
                        key.0, key.1
                    ));
                };
                if !kp.reported {
                    return Err(format!(
                        "pod {}/{}: its status is not reported",
                        key.0, key.1
                    ));
                }
                let Some(ann) = p
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(annotation::POD_NETWORK))
                    .and_then(|t| PodNetwork::parse(t).ok())
                else {
                    return Err(format!(
                        "pod {}/{}: wired with {}, NCP's annotation is missing or malformed",
                        key.0, key.1, kp.ip
                    ));
                };
                if ann.ip != kp.ip {
                    return Err(format!(
                        "pod {}/{}: wired with {}, NCP's annotation says {}",
                        key.0, key.1, kp.ip, ann.ip
                    ));
                }
                let Some(port) = ports.get(kp.container_id.as_str()) else {
                    return Err(format!("pod {}/{}: no OVS port on {name}", key.0, key.1));
                };
                // Wired on the VLAN NCP annotated (what NSX holds): a pod wired with another
                // pod's network passes its traffic to the wrong port. (The iface-id is not
                // compared: the agent does not follow a later annotation change, so a port an
                // admin deleted and NCP recreated keeps its old id in OVS; a known gap.)
                let want = ann.vlan.to_string();
                let held = port.external_ids.get(external_id::VLAN);
                if held != Some(&want) {
                    return Err(format!(
                        "pod {}/{}: wired on {name} with vlan {held:?}, NCP's annotation says {want}",
                        key.0, key.1
                    ));
                }
                cookies.insert(Cookie::of_pod(&kp.container_id).value());
                containers.insert(kp.container_id.clone());
            }
            if let Some(p) = b.ports().find(|p| {
                p.external_ids
                    .get(external_id::CONTAINER_ID)
                    .is_some_and(|c| !containers.contains(c))
            }) {
                return Err(format!(
                    "{name}: OVS port {} of a pod that is gone ({:?})",
                    p.name,
                    p.external_ids.get(external_id::POD_NAME)
                ));
            }
            use nsx_core::ovs::pipeline::Category;
            let of_a_pod = |c: u64| Cookie::parse(c).is_some_and(|c| c.category == Category::Pod);
            if let Some((f, _)) = b
                .flows()
                .into_iter()
                .find(|(f, _)| of_a_pod(f.cookie) && !cookies.contains(&f.cookie))
            {
                return Err(format!(
                    "{name}: a flow of a pod that is gone: {}",
                    f.to_dump_no_stats()
                ));
            }
            if *n.agent_replayed.borrow() != Some(b.restarts) {
                return Err(format!(
                    "{name}: the agent has not replayed its flows since OVS restarted"
                ));
            }
            let want = nsx_core::proxy::all_service_ports(view.services.values(), &slices, name);
            match &*n.proxy_installed.borrow() {
                Some((have, restarts)) if *have == want && *restarts == b.restarts => {}
                Some((have, _)) if *have != want => {
                    let diff = want
                        .keys()
                        .chain(have.keys())
                        .find(|k| want.get(*k) != have.get(*k))
                        .map(ToString::to_string)
                        .unwrap_or_default();
                    return Err(format!(
                        "{name}: nsx-kube-proxy has not synced service port {diff}"
                    ));
                }
                Some(_) => {
                    return Err(format!(
                        "{name}: nsx-kube-proxy has not replayed since OVS restarted"
                    ));
                }
                None => return Err(format!("{name}: nsx-kube-proxy has not synced yet")),
            }
        }
        Ok(())
    }
}

fn groups_in(actions: &[Action], out: &mut Vec<u32>) {
    for a in actions {
        match a {
            Action::Group(g) => out.push(*g),
            Action::Ct { exec, .. } => groups_in(exec, out),
            _ => {}
        }
    }
}
