//! The whole NCP stack on turmoil: the fake kube-apiserver, the fake NSX manager and NCP
//! (one replica, or two with leader election), a workload of namespaces and pods, faults on a
//! schedule, and a liveness check that the system converges once they stop.
//!
//! Convergence means: NSX holds exactly the objects `desired()` computes from what the
//! apiserver holds (one each, nothing extra), every namespace is annotated with its subnet and
//! SNAT address, every pod with a network whose address lies in its namespace's subnet, NCP's
//! SNAT allocations match its SNAT rules, and every invariant of the fake NSX store holds.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use fake_nsx_manager::server::Counters;
use fake_nsx_manager::{Clock, FakeNsxManager, FaultRule, ManagerConfig};
use k8s_openapi::api::core::v1::Pod;
use nsx_core::k8s::ClusterView;
use serde::Serialize;
use serde_json::{Value, json};

use crate::apiserver::ApiServer;
use crate::spine::EPOCH_MS;
use crate::trace::Trace;

/// Something that happens at a point in simulated time.
#[derive(Debug, Clone, PartialEq)]
pub enum NcpFault {
    NsxErrors(FaultRule),
    ClearNsxErrors,
    RestartNsx,
    CrashNcp(usize),
    StartNcp(usize),
    /// The apiserver drops every watch connection.
    DropWatches,
    /// The apiserver forgets its history: every watcher gets 410 and relists.
    ExpireWatchHistory,
    PartitionNcpFromNsx(usize),
    RepairNcpFromNsx(usize),
    PartitionNcpFromApiserver(usize),
    RepairNcpFromApiserver(usize),
    AddPods {
        namespace: usize,
        count: usize,
    },
    DeleteNamespace(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scheduled {
    pub at_ms: u64,
    pub fault: NcpFault,
}

#[derive(Debug, Clone)]
pub struct NcpWorldConfig {
    pub seed: u64,
    pub nodes: usize,
    pub namespaces: usize,
    pub pods_per_namespace: usize,
    /// 1, or 2 for leader election.
    pub replicas: usize,
    pub tick_ms: u64,
    /// Give up if not converged this long after the last fault.
    pub converge_within_ms: u64,
    pub faults: Vec<Scheduled>,
}

impl NcpWorldConfig {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            nodes: 3,
            namespaces: 3,
            pods_per_namespace: 4,
            replicas: 1,
            tick_ms: 5,
            converge_within_ms: 120_000,
            faults: Vec::new(),
        }
    }

    /// A storm: NSX 503s, dropped watches, a manager restart, an NCP crash, a 410 relist,
    /// new pods and a namespace deleted during it; all at seed-chosen times.
    pub fn storm(seed: u64, replicas: usize) -> Self {
        let mut rng = nsx_core::rng::SeededRng::new(seed ^ 0x5707);
        let mut at = |lo: u64, hi: u64| rng.range_u64(lo, hi);
        let mut faults = vec![
            Scheduled {
                at_ms: at(500, 1_500),
                fault: NcpFault::NsxErrors(FaultRule {
                    user: None,
                    method: None,
                    path: Some("/api/v1/logical-ports".into()),
                    status: 503,
                    error_code: None,
                    rate: 0.3,
                    remaining: None,
                    message: None,
                }),
            },
            Scheduled {
                at_ms: at(1_000, 3_000),
                fault: NcpFault::DropWatches,
            },
            Scheduled {
                at_ms: at(2_000, 4_000),
                fault: NcpFault::AddPods {
                    namespace: 0,
                    count: 3,
                },
            },
            Scheduled {
                at_ms: at(4_000, 6_000),
                fault: NcpFault::RestartNsx,
            },
            Scheduled {
                at_ms: at(6_000, 7_000),
                fault: NcpFault::CrashNcp(0),
            },
            Scheduled {
                at_ms: at(7_000, 8_000),
                fault: NcpFault::DeleteNamespace(1),
            },
            Scheduled {
                at_ms: at(8_000, 9_000),
                fault: NcpFault::StartNcp(0),
            },
            Scheduled {
                at_ms: at(9_000, 10_000),
                fault: NcpFault::ExpireWatchHistory,
            },
            Scheduled {
                at_ms: at(10_000, 11_000),
                fault: NcpFault::AddPods {
                    namespace: 2,
                    count: 2,
                },
            },
            Scheduled {
                at_ms: 12_000,
                fault: NcpFault::ClearNsxErrors,
            },
        ];
        if replicas > 1 {
            faults.push(Scheduled {
                at_ms: at(13_000, 14_000),
                fault: NcpFault::PartitionNcpFromApiserver(1),
            });
            faults.push(Scheduled {
                at_ms: 40_000,
                fault: NcpFault::RepairNcpFromApiserver(1),
            });
        }
        Self {
            replicas,
            faults,
            ..Self::new(seed)
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct NcpReport {
    pub seed: u64,
    pub converged: bool,
    pub error: Option<String>,
    pub sim_time_ms: u64,
    /// When the check first passed after the last fault.
    pub converged_at_ms: Option<u64>,
    pub trace_hash: u64,
    #[serde(skip)]
    pub trace: Vec<String>,
    pub nsx: Counters,
    pub apiserver_requests: BTreeMap<String, u64>,
    pub passes: usize,
    pub pods: usize,
}

use crate::ncp_host::{replica as replica_name, sim_clock};

struct World {
    sim: turmoil::Sim<'static>,
    api: ApiServer,
    nsx: FakeNsxManager,
    trace: Trace,
    passes: Rc<RefCell<usize>>,
    next_pod: usize,
}

impl World {
    fn new(cfg: &NcpWorldConfig) -> Self {
        let trace = Trace::default();
        crate::ncp_host::note_sim_time(std::time::Duration::ZERO);
        let api = ApiServer::new(cfg.seed, sim_clock);
        let mut mc = ManagerConfig {
            clock: Clock::new(sim_clock),
            ..Default::default()
        };
        mc.store.seed = cfg.seed;
        mc.store.search_lag_ms = 500;
        mc.latency_ms = 2;
        let mut setup = fake_nsx_manager::bootstrap::ClusterSetup::new("k8s-a", cfg.nodes);
        setup.container_block = "10.4.0.0/16".into();
        mc.bootstrap = Some(fake_nsx_manager::BootstrapConfig {
            clusters: vec![setup],
        });
        let nsx = FakeNsxManager::new(mc);
        let boot = nsx.bootstrap().expect("bootstrapped");
        let (snat, lb) = (
            boot.clusters["k8s-a"].snat_pool.clone(),
            boot.clusters["k8s-a"].lb_pool.clone(),
        );
        let mut sim = crate::ncp_host::control_plane(cfg.seed, cfg.tick_ms, &api, &nsx, &trace);
        let passes: Rc<RefCell<usize>> = Rc::default();
        crate::ncp_host::spawn(
            &mut sim,
            &nsx,
            &crate::ncp_host::NcpHosts {
                cluster: "k8s-a".into(),
                snat_pool: snat,
                lb_pool: lb,
                subnet_prefix: 24,
                replicas: cfg.replicas,
                seed: cfg.seed,
            },
            &trace,
            &passes,
        );
        Self {
            sim,
            api,
            nsx,
            trace,
            passes,
            next_pod: 0,
        }
    }

    fn apply(&self, v: Value) {
        if let Err(e) = self.api.apply(v.clone()) {
            panic!("workload object rejected: {e}: {v}");
        }
    }

    fn add_pods(&mut self, cfg: &NcpWorldConfig, ns: usize, count: usize) {
        for _ in 0..count {
            let i = self.next_pod;
            self.next_pod += 1;
            let node = format!("node-{}", i % cfg.nodes + 1);
            self.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("pod-{i}"), "namespace": format!("ns-{ns}"), "labels": {"app": format!("app-{}", i % 3)}},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]}}));
        }
    }

    fn now_ms(&self) -> u64 {
        self.sim.elapsed().as_millis() as u64
    }

    fn fault(&mut self, cfg: &NcpWorldConfig, f: &NcpFault) {
        self.trace
            .record_at(u128::from(self.now_ms()), "runner", format!("fault {f:?}"));
        match f {
            NcpFault::NsxErrors(rule) => self.nsx.add_fault(rule.clone()),
            NcpFault::ClearNsxErrors => self.nsx.clear_faults(),
            NcpFault::RestartNsx => self.sim.bounce("nsx-manager"),
            NcpFault::CrashNcp(i) => self.sim.crash(replica_name(*i)),
            NcpFault::StartNcp(i) => self.sim.bounce(replica_name(*i)),
            NcpFault::DropWatches => self.api.drop_watches(),
            NcpFault::ExpireWatchHistory => self.api.expire_history(),
            NcpFault::PartitionNcpFromNsx(i) => self.sim.partition(replica_name(*i), "nsx-manager"),
            NcpFault::RepairNcpFromNsx(i) => self.sim.repair(replica_name(*i), "nsx-manager"),
            NcpFault::PartitionNcpFromApiserver(i) => {
                self.sim.partition(replica_name(*i), "apiserver")
            }
            NcpFault::RepairNcpFromApiserver(i) => self.sim.repair(replica_name(*i), "apiserver"),
            NcpFault::AddPods { namespace, count } => self.add_pods(cfg, *namespace, *count),
            NcpFault::DeleteNamespace(i) => {
                let _ = self.api.delete("namespaces", "", &format!("ns-{i}"));
            }
        }
    }

    /// The liveness check; `Err` says the first thing that is not there yet.
    fn check(&self) -> Result<(), String> {
        let (view, observed) = crate::converge::ncp_converged(&self.api, &self.nsx, "k8s-a", 24)?;
        self.check_connectivity(&view, &observed)?;
        Ok(())
    }
}

impl World {
    /// The `web` policy through the NSX dataplane model: every `app-0` pod of `ns-0` accepts
    /// TCP 80 from `app-1` pods of any namespace and from nobody else (up to 3 servers and 12
    /// clients, enough to cover both answers without making the check quadratic).
    fn check_connectivity(
        &self,
        view: &ClusterView,
        observed: &crate::converge::Realized,
    ) -> Result<(), String> {
        use fake_nsx_manager::store::{Entry, Packet, Protocol};
        if view.network_policies.is_empty() {
            return Ok(());
        }
        let addresses = self.nsx.with_store(|s| s.port_addresses());
        let wired: Vec<(&(String, String), &Pod, String, String)> = view
            .pods
            .iter()
            .filter_map(|(k, p)| {
                let id = observed.port_ids.get(p.metadata.uid.as_deref()?)?.clone();
                let ip = addresses.get(&id)?.first()?.clone();
                Some((k, p, id, ip))
            })
            .collect();
        let app = |p: &Pod| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("app").cloned())
                .unwrap_or_default()
        };
        let servers = wired
            .iter()
            .filter(|(k, p, _, _)| k.0 == "ns-0" && app(p) == "app-0")
            .take(3);
        let (mut allowed, mut denied) = (0, 0);
        for (sk, _, _, sip) in servers {
            for (ck, cp, cport, cip) in wired.iter().take(12) {
                if ck == sk {
                    continue;
                }
                let packet = Packet::new(cip, sip, Protocol::Tcp, 40000, 80);
                let (fwd, reply) = self.nsx.with_store(|s| {
                    s.trace_connection(&Entry::LogicalPort(cport.clone()), &packet)
                });
                let works = fwd.delivered() && reply.is_some_and(|r| r.delivered());
                let want = app(cp) == "app-1";
                if want {
                    allowed += 1;
                } else {
                    denied += 1;
                }
                if works != want {
                    return Err(format!(
                        "{}/{} -> {}/{} TCP 80: policy says {want}, NSX does {works}: {:?}",
                        ck.0, ck.1, sk.0, sk.1, fwd.hops
                    ));
                }
            }
        }
        if allowed == 0 || denied == 0 {
            return Err(format!(
                "the connectivity check saw {allowed} allowed and {denied} denied pairs; it needs both"
            ));
        }
        Ok(())
    }
}

/// Runs one world to convergence (or the limit).
pub fn run(cfg: &NcpWorldConfig) -> NcpReport {
    let mut w = World::new(cfg);
    w.trace.record_at(
        0,
        "runner",
        format!(
            "options seed={} nodes={} namespaces={} pods/ns={} replicas={} faults={:?}",
            cfg.seed, cfg.nodes, cfg.namespaces, cfg.pods_per_namespace, cfg.replicas, cfg.faults
        ),
    );
    w.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}}));
    for n in 1..=cfg.nodes {
        w.apply(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{n}")}}),
        );
    }
    for ns in 0..cfg.namespaces {
        w.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("ns-{ns}")}}));
        w.add_pods(cfg, ns, cfg.pods_per_namespace);
    }
    if cfg.namespaces > 0 {
        // A LoadBalancer service with its endpoints (until the harness runs an endpoints
        // controller, the slice is written by hand).
        w.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "front", "namespace": "ns-0"},
            "spec": {"type": "LoadBalancer", "selector": {"app": "app-0"}, "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}}));
        w.apply(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "front-1", "namespace": "ns-0", "labels": {"kubernetes.io/service-name": "front"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": [{"addresses": ["10.4.0.10"], "conditions": {"ready": true}}]}));
        // A NetworkPolicy: the app-0 pods of ns-0 take TCP 80 from app-1 pods anywhere.
        w.apply(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "web", "namespace": "ns-0"},
            "spec": {"podSelector": {"matchLabels": {"app": "app-0"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "app-1"}}}], "ports": [{"protocol": "TCP", "port": 80}]}]}}));
    }
    let mut faults = cfg.faults.clone();
    faults.sort_by_key(|f| f.at_ms);
    let last_fault = faults.last().map_or(0, |f| f.at_ms);
    let deadline = last_fault + cfg.converge_within_ms;
    let mut next = 0;
    let mut next_check = last_fault + 1_000;
    let mut converged_at = None;
    let mut error = None;
    let mut last_check = String::new();
    while converged_at.is_none() {
        let now = w.now_ms();
        while next < faults.len() && faults[next].at_ms <= now {
            let f = faults[next].fault.clone();
            w.fault(cfg, &f);
            next += 1;
        }
        if now >= next_check && next == faults.len() {
            next_check = now + 1_000;
            match w.check() {
                Ok(()) => converged_at = Some(now),
                Err(e) => last_check = e,
            }
        }
        if converged_at.is_some() {
            break;
        }
        if now > deadline {
            error = Some(format!(
                "not converged {} ms after the last fault: {last_check}",
                cfg.converge_within_ms
            ));
            break;
        }
        if let Err(e) = w.sim.step() {
            error = Some(format!("simulation failed: {e}"));
            break;
        }
        crate::ncp_host::note_sim_time(w.sim.elapsed());
    }
    for line in w.api.request_log() {
        if let Some((ms, rest)) = line.split_once(' ') {
            let ms: i64 = ms.parse().unwrap_or(EPOCH_MS);
            w.trace
                .record_at((ms - EPOCH_MS).max(0) as u128, "apiserver", rest);
        }
    }
    for e in w.nsx.requests_since(0) {
        w.trace.record_at(
            (e.time_ms - EPOCH_MS).max(0) as u128,
            "nsx-manager",
            format!("{} {} {} -> {}", e.user, e.method, e.path, e.status),
        );
    }
    let lines = w.trace.lines();
    let pods = w.api.list("pods").len();
    let passes = *w.passes.borrow();
    NcpReport {
        seed: cfg.seed,
        converged: converged_at.is_some(),
        error,
        sim_time_ms: w.now_ms(),
        converged_at_ms: converged_at,
        trace_hash: crate::trace::hash_lines(&lines),
        trace: lines,
        nsx: w.nsx.counters(),
        apiserver_requests: w.api.request_counts(),
        passes,
        pods,
    }
}
