//! NCP replicas as turmoil hosts, as both the built-in NCP world and the scenario engine run
//! them: the production controller against the fake apiserver and the fake NSX manager, each
//! replica with its own NSX user, leader election when there are several.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use fake_nsx_manager::{FakeNsxManager, User};
use nsx_core::ncp::config::NcpConfig;
use nsx_core::ncp::controller::{self, LoopConfig, PassEvent};
use nsx_core::ncp::desired::NetworkSettings;
use nsx_core::ncp::leader::LeaderConfig;
use nsx_core::nsx::{Auth, ClientConfig, ClientStats, NsxClient, StatsHandle};

use crate::net::{TurmoilConnector, kube_client};
use crate::trace::Trace;

/// Simulated time starts at 2026-01-01T00:00:00Z in every run.
pub const EPOCH_MS: i64 = 1_767_225_600_000;

thread_local! {
    /// The simulated time the harness last stepped to, for clock reads outside any host.
    static HARNESS_MS: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

/// Milliseconds since the epoch in simulated time. Inside a host, turmoil's time; outside
/// (the harness applying a manifest or editing NSX between steps), the time the harness last
/// stepped to ([`note_sim_time`]), not the start of the run: a write stamped in the past sorts
/// before writes already made (the fake's search index would apply it first and then bury it
/// under an older one).
pub fn sim_clock() -> i64 {
    let ms = match turmoil::sim_elapsed() {
        Some(d) => d.as_millis() as i64,
        None => HARNESS_MS.get(),
    };
    EPOCH_MS + ms
}

/// Records where the harness's simulation stands (after every step, and 0 for a new one).
pub fn note_sim_time(elapsed: Duration) {
    HARNESS_MS.set(elapsed.as_millis() as i64);
}

/// The host (and NSX user) name of replica `i`.
pub fn replica(i: usize) -> String {
    format!("ncp-{i}")
}

/// Connections a simulated server holds waiting for accept, and messages a socket buffers.
pub const TCP_CAPACITY: usize = 8192;

/// A simulation with the control plane's servers on it: `apiserver` (port 6443) and
/// `nsx-manager` (port 80; a restart keeps its data, like a real manager's database).
pub fn control_plane(
    seed: u64,
    tick_ms: u64,
    api: &crate::apiserver::ApiServer,
    nsx: &FakeNsxManager,
    trace: &Trace,
) -> turmoil::Sim<'static> {
    let mut sim = turmoil::Builder::new()
        .epoch(std::time::UNIX_EPOCH + Duration::from_millis(EPOCH_MS as u64))
        .rng_seed(seed)
        .tick_duration(Duration::from_millis(tick_ms))
        .simulation_duration(Duration::from_secs(24 * 3600))
        .max_message_latency(Duration::from_millis(3))
        // turmoil's accept backlog and socket buffers (64 by default, and a panic beyond):
        // every kubelet pod worker of a node connects to its agent at once, as every client
        // of a large world connects to the apiserver.
        .tcp_capacity(TCP_CAPACITY)
        .build();
    let a = api.clone();
    sim.host("apiserver", move || {
        let a = a.clone();
        async move { crate::net::serve(6443, a.router()).await }
    });
    let (n, t) = (nsx.clone(), trace.clone());
    sim.host("nsx-manager", move || {
        let (n, t) = (n.clone(), t.clone());
        async move {
            n.restart();
            t.record("nsx-manager", "started");
            crate::net::serve(80, n.router()).await
        }
    });
    sim
}

/// What the replicas are configured with.
#[derive(Debug, Clone)]
pub struct NcpHosts {
    pub cluster: String,
    pub snat_pool: String,
    pub lb_pool: String,
    pub net: NetworkSettings,
    pub replicas: usize,
    pub seed: u64,
}

/// What the harness keeps of the replicas across their crashes: passes run, and the NSX
/// client counters of every incarnation.
#[derive(Debug, Clone, Default)]
pub struct NcpCounters {
    pub passes: Rc<RefCell<usize>>,
    pub clients: Rc<RefCell<Vec<StatsHandle>>>,
}

impl NcpCounters {
    /// The counters of every NSX client any replica has had, summed.
    pub fn client_stats(&self) -> ClientStats {
        let mut sum = ClientStats::default();
        for h in self.clients.borrow().iter() {
            sum.add(&h.get());
        }
        sum
    }
}

/// Adds hosts `ncp-0..` and their NSX users; every pass is counted and traced.
pub fn spawn(
    sim: &mut turmoil::Sim<'static>,
    nsx: &FakeNsxManager,
    cfg: &NcpHosts,
    trace: &Trace,
    counters: &NcpCounters,
) {
    for i in 0..cfg.replicas {
        let name = replica(i);
        nsx.add_user(User::new(&name, "pw", "enterprise_admin"));
        let (t, counters, cfg) = (trace.clone(), counters.clone(), cfg.clone());
        sim.host(name.as_str(), move || {
            let (t, p, cfg, name) = (t.clone(), counters.passes.clone(), cfg.clone(), replica(i));
            let clients = counters.clients.clone();
            async move {
                t.record(&name, "started");
                let kube = kube_client("http://apiserver:6443")?;
                let mut cc = ClientConfig::new(
                    "http://nsx-manager:80",
                    Auth::Session {
                        user: name.clone(),
                        password: "pw".into(),
                    },
                );
                cc.seed = cfg.seed.wrapping_add(i as u64);
                cc.request_timeout_ms = 5_000;
                let mut config = NcpConfig::for_cluster(&cfg.cluster);
                cc.max_concurrent_requests = config.concurrent_connections;
                let nsx = Arc::new(NsxClient::new(TurmoilConnector, cc));
                clients.borrow_mut().push(nsx.stats_handle());
                config.external_ip_pools = vec![cfg.snat_pool.clone()];
                config.external_ip_pools_lb = vec![cfg.lb_pool.clone()];
                config.subnet_prefix = cfg.net.subnet_prefix;
                config.enable_snat = cfg.net.enable_snat;
                config.lb = cfg.net.lb;
                let timing = LoopConfig {
                    resync: Duration::from_secs(30),
                    ..LoopConfig::default()
                };
                let on_pass = {
                    let name = name.clone();
                    move |e: &PassEvent| {
                        *p.borrow_mut() += 1;
                        t.record(&name, format!("{e:?}"));
                    }
                };
                if cfg.replicas > 1 {
                    controller::run_ha(
                        kube,
                        nsx,
                        config,
                        timing,
                        LeaderConfig::new(&cfg.cluster, &name),
                        Arc::new(sim_clock),
                        on_pass,
                    )
                    .await;
                } else {
                    controller::run(kube, nsx, config, timing, None, on_pass).await;
                }
                Ok(())
            }
        });
    }
}
