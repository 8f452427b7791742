//! The simulation spine: the fake NSX manager on host `nsx-manager`, a controller host `ncp`
//! running the production NSX client over simulated TCP, faults applied on a schedule, and the
//! full event trace of the run.
//!
//! The workload is what a controller does for a handful of namespaces: make sure a switch
//! exists per namespace and a set of container ports per switch, discovering what exists by
//! listing (lists are consistent; search lags) and creating what is missing, round after
//! round until a round sees no error. It is deliberately small: its job is to put the client,
//! the fake and the network under faults and show that the whole run is a function of the seed.
//!
//! Order of work per tick (turmoil's `step`): the runner first applies every fault scheduled at
//! or before the current simulated time (recording it in the trace), then turmoil delivers
//! network messages and polls each host once.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fake_nsx_manager::server::Counters;
use fake_nsx_manager::store::StoreConfig;
use fake_nsx_manager::{Clock, FakeNsxManager, FaultRule, ManagerConfig};
use nsx_core::nsx::client::ClientStats;
use nsx_core::nsx::model::{LogicalPort, LogicalSwitch, Tag};
use nsx_core::nsx::{Auth, ClientConfig, NsxClient, NsxError};
use nsx_core::rng::SeededRng;
use serde::Serialize;
use serde_json::{Value, json};

use crate::net::{TurmoilConnector, serve};
use crate::trace::Trace;

/// Simulated time starts at 2026-01-01T00:00:00Z in every run.
pub const EPOCH_MS: i64 = 1_767_225_600_000;
pub const NSX_HOST: &str = "nsx-manager";
pub const NCP_HOST: &str = "ncp";
const NSX_PORT: u16 = 80;

/// Something that happens to the system at a point in simulated time.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Messages between ncp and the manager are dropped until `Repair`.
    Partition,
    Repair,
    /// Messages between ncp and the manager queue until `Release`.
    Hold,
    Release,
    /// Fixed one-way latency on the ncp-manager link.
    LinkLatency {
        ms: u64,
    },
    /// The manager process restarts: sessions lost, database kept.
    RestartManager,
    CrashManager,
    StartManager,
    /// The manager answers matching requests with an error.
    NsxErrors(FaultRule),
    ClearNsxErrors,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledFault {
    pub at_ms: u64,
    pub fault: Fault,
}

/// The default fault schedule: 30 % 503s on ports, a partition from 40 ms to 12 s, a manager
/// restart, 30 ms of link latency, then the errors clear.
pub fn storm_faults() -> Vec<ScheduledFault> {
    let at = |at_ms, fault| ScheduledFault { at_ms, fault };
    vec![
        at(
            0,
            Fault::NsxErrors(FaultRule {
                user: None,
                method: None,
                path: Some("/api/v1/logical-ports".into()),
                status: 503,
                error_code: None,
                rate: 0.3,
                remaining: None,
                message: None,
            }),
        ),
        at(40, Fault::Partition),
        at(12_000, Fault::Repair),
        at(12_500, Fault::RestartManager),
        at(13_000, Fault::LinkLatency { ms: 30 }),
        at(20_000, Fault::ClearNsxErrors),
    ]
}

/// Options of one spine run; everything random derives from `seed`.
#[derive(Debug, Clone)]
pub struct SpineConfig {
    pub seed: u64,
    pub namespaces: usize,
    pub ports_per_namespace: usize,
    /// turmoil's tick: the resolution of simulated time (the README's note on simulation speed).
    pub tick_ms: u64,
    /// Give up (and report not finished) after this much simulated time.
    pub max_sim_time_ms: u64,
    pub search_lag_ms: i64,
    pub manager_latency_ms: u64,
    /// Random one-way network latency bounds for every message.
    pub min_message_latency_ms: u64,
    pub max_message_latency_ms: u64,
    pub session_auth: bool,
    pub request_timeout_ms: u64,
    pub faults: Vec<ScheduledFault>,
}

impl SpineConfig {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            namespaces: 3,
            ports_per_namespace: 4,
            tick_ms: 1,
            max_sim_time_ms: 600_000,
            search_lag_ms: 500,
            manager_latency_ms: 2,
            min_message_latency_ms: 0,
            max_message_latency_ms: 5,
            session_auth: true,
            request_timeout_ms: 10_000,
            faults: Vec::new(),
        }
    }

    /// One line per option, printed at the start of a run (the VOPR habit: a failure report
    /// carries everything needed to replay it).
    pub fn describe(&self) -> String {
        format!(
            "seed={} namespaces={} ports={} tick_ms={} latency_ms={}..{} manager_latency_ms={} search_lag_ms={} session_auth={} faults={:?}",
            self.seed,
            self.namespaces,
            self.ports_per_namespace,
            self.tick_ms,
            self.min_message_latency_ms,
            self.max_message_latency_ms,
            self.manager_latency_ms,
            self.search_lag_ms,
            self.session_auth,
            self.faults
        )
    }
}

/// What a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct SpineReport {
    pub seed: u64,
    /// The workload converged (every namespace and port exists, checked by the controller).
    pub finished: bool,
    pub error: Option<String>,
    pub sim_time_ms: u64,
    pub trace_hash: u64,
    #[serde(skip)]
    pub trace: Vec<String>,
    pub client: ClientStats,
    pub manager: Counters,
    /// Objects carrying the workload's tag, by resource_type.
    pub objects: BTreeMap<String, usize>,
    /// Workload tags found on more than one object.
    pub duplicates: Vec<String>,
    pub invariants: Result<(), String>,
}

fn tag(scope: &str, value: impl Into<String>) -> Tag {
    Tag::new(scope, value)
}

fn has_tag(tags: &Option<Vec<Tag>>, scope: &str, value: &str) -> bool {
    tags.as_ref()
        .is_some_and(|t| t.iter().any(|x| x.scope == scope && x.tag == value))
}

fn outcome<T>(r: &Result<T, NsxError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(NsxError::Api { status, body, .. }) => {
            format!("{status}/{}", body.error_code.unwrap_or(0))
        }
        Err(NsxError::Timeout { .. }) => "timeout".into(),
        Err(NsxError::Transport { .. }) => "transport-error".into(),
        Err(e) => format!("error: {e}"),
    }
}

type Client = NsxClient<TurmoilConnector>;

/// One round: list what exists, create what is missing. `Ok(true)` when nothing was missing.
async fn namespace_round(
    c: &Client,
    trace: &Trace,
    cfg: &SpineConfig,
    ns: usize,
    tz: &str,
    pool: &str,
) -> Result<bool, NsxError> {
    let name = format!("ns-{ns}");
    let switches: Vec<LogicalSwitch> = c
        .list_all(&format!("logical-switches?transport_zone_id={tz}"))
        .await?;
    let mine: Vec<&LogicalSwitch> = switches
        .iter()
        .filter(|s| has_tag(&s.meta.tags, "spine/ns", &name))
        .collect();
    let Some(ls) = mine.first() else {
        let mut body = LogicalSwitch::default();
        body.meta.display_name = Some(name.clone());
        body.meta.tags = Some(vec![tag("spine/run", "1"), tag("spine/ns", name.clone())]);
        body.transport_zone_id = Some(tz.to_string());
        body.admin_state = Some("UP".into());
        body.ip_pool_id = Some(pool.to_string());
        let r = c
            .create::<_, LogicalSwitch>("logical-switches", &body)
            .await;
        trace.record(NCP_HOST, format!("create switch {name}: {}", outcome(&r)));
        r?;
        return Ok(false);
    };
    let ls_id = ls.meta.id.clone().unwrap_or_default();
    let ports: Vec<LogicalPort> = c
        .list_all(&format!("logical-ports?logical_switch_id={ls_id}"))
        .await?;
    let mut complete = true;
    for p in 0..cfg.ports_per_namespace {
        let pod = format!("{name}/pod-{p}");
        if ports
            .iter()
            .any(|x| has_tag(&x.meta.tags, "spine/pod", &pod))
        {
            continue;
        }
        complete = false;
        let body = json!({
            "logical_switch_id": ls_id, "admin_state": "UP", "display_name": pod,
            "attachment": {"attachment_type": "VIF", "id": format!("cif-{ns}-{p}"),
                "context": {"resource_type": "VifAttachmentContext", "vif_type": "CHILD", "parent_vif_id": "vif-k8s-a-node-1",
                    "traffic_tag": 100 + ns * 50 + p, "app_id": pod, "allocate_addresses": "Both"}},
            "tags": [{"scope": "spine/run", "tag": "1"}, {"scope": "spine/pod", "tag": pod}],
        });
        let r = c.create::<_, Value>("logical-ports", &body).await;
        trace.record(NCP_HOST, format!("create port {pod}: {}", outcome(&r)));
        // A 400 here means the attachment exists already: a create whose answer was lost.
        match r {
            Err(e) if e.status() == Some(400) => {}
            other => {
                other?;
            }
        }
    }
    Ok(complete)
}

async fn workload(
    c: Arc<Client>,
    trace: Trace,
    cfg: SpineConfig,
    tz: String,
    pool: String,
) -> Result<(), String> {
    for ns in 0..cfg.namespaces {
        let mut rounds = 0;
        loop {
            rounds += 1;
            match namespace_round(&c, &trace, &cfg, ns, &tz, &pool).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    trace.record(
                        NCP_HOST,
                        format!(
                            "round {rounds} of ns-{ns} failed: {}",
                            outcome::<()>(&Err(e))
                        ),
                    );
                    tokio::time::sleep(Duration::from_millis(1_000)).await;
                }
            }
            if rounds > 200 {
                return Err(format!("ns-{ns} did not converge in 200 rounds"));
            }
        }
        trace.record(
            NCP_HOST,
            format!("ns-{ns} converged after {rounds} round(s)"),
        );
    }
    // A read-modify-write on every switch (the 412 path when anyone else writes).
    let switches: Vec<LogicalSwitch> = c
        .list_all(&format!("logical-switches?transport_zone_id={tz}"))
        .await
        .map_err(|e| e.to_string())?;
    for s in switches
        .iter()
        .filter(|s| has_tag(&s.meta.tags, "spine/run", "1"))
    {
        let id = s.meta.id.clone().unwrap_or_default();
        let r = c
            .update_with(
                &format!("logical-switches/{id}"),
                |x: &mut LogicalSwitch| {
                    x.meta.description = Some("converged".into());
                },
            )
            .await;
        trace.record(
            NCP_HOST,
            format!(
                "describe switch {}: {}",
                s.meta.display_name.clone().unwrap_or_default(),
                outcome(&r)
            ),
        );
        r.map_err(|e| e.to_string())?;
    }
    trace.record(NCP_HOST, "workload done");
    Ok(())
}

/// Runs the spine once.
pub fn run(cfg: &SpineConfig) -> SpineReport {
    let mut seeds = SeededRng::new(cfg.seed);
    let store_seed = seeds.next_u64();
    let client_seed = seeds.next_u64();
    let trace = Trace::default();
    trace.record_at(0, "runner", format!("options {}", cfg.describe()));

    let mut store = StoreConfig {
        seed: store_seed,
        search_lag_ms: cfg.search_lag_ms,
        ..StoreConfig::default()
    };
    store.api_service.client_api_rate_limit = 100;
    let nsx = FakeNsxManager::new(ManagerConfig {
        store,
        latency_ms: cfg.manager_latency_ms,
        clock: Clock::new(|| EPOCH_MS + turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as i64)),
        ..ManagerConfig::default()
    });
    let boot = nsx.bootstrap().expect("the spine bootstraps the manager");
    let pool = nsx
        .call_as_admin(fake_nsx_manager::dispatch::ApiRequest {
            method: "POST",
            path: "/api/v1/pools/ip-pools",
            query: &[],
            body: br#"{"display_name": "spine-pods", "subnets": [{"cidr": "10.200.0.0/16", "gateway_ip": "10.200.0.1", "allocation_ranges": [{"start": "10.200.0.2", "end": "10.200.255.254"}]}]}"#,
        })
        .body
        .and_then(|b| b.get("id").and_then(Value::as_str).map(str::to_string))
        .expect("the spine's pool is valid");

    let mut sim = turmoil::Builder::new()
        .epoch(UNIX_EPOCH + Duration::from_millis(EPOCH_MS as u64))
        .rng_seed(cfg.seed)
        .tick_duration(Duration::from_millis(cfg.tick_ms))
        .simulation_duration(Duration::from_millis(cfg.max_sim_time_ms + 1_000))
        .min_message_latency(Duration::from_millis(cfg.min_message_latency_ms))
        .max_message_latency(Duration::from_millis(cfg.max_message_latency_ms))
        .build();

    {
        let nsx = nsx.clone();
        let trace = trace.clone();
        sim.host(NSX_HOST, move || {
            let nsx = nsx.clone();
            let trace = trace.clone();
            async move {
                nsx.restart();
                trace.record(NSX_HOST, "manager started");
                serve(NSX_PORT, nsx.router()).await
            }
        });
    }

    let client_slot: Rc<RefCell<Option<Arc<Client>>>> = Rc::default();
    let result: Rc<RefCell<Option<Result<(), String>>>> = Rc::default();
    {
        let auth = if cfg.session_auth {
            Auth::Session {
                user: "admin".into(),
                password: "admin".into(),
            }
        } else {
            Auth::Basic {
                user: "admin".into(),
                password: "admin".into(),
            }
        };
        let mut cc = ClientConfig::new(format!("http://{NSX_HOST}:{NSX_PORT}"), auth);
        cc.seed = client_seed;
        cc.request_timeout_ms = cfg.request_timeout_ms;
        let (trace, slot, result, cfg) = (
            trace.clone(),
            client_slot.clone(),
            result.clone(),
            cfg.clone(),
        );
        let (tz, pool) = (boot.transport_zone.clone(), pool.clone());
        sim.client(NCP_HOST, async move {
            let c = Arc::new(NsxClient::new(TurmoilConnector, cc));
            *slot.borrow_mut() = Some(c.clone());
            trace.record(NCP_HOST, "controller started");
            let r = workload(c, trace, cfg, tz, pool).await;
            *result.borrow_mut() = Some(r);
            Ok(())
        });
    }

    let mut faults = cfg.faults.clone();
    faults.sort_by_key(|f| f.at_ms);
    let mut next = 0;
    let mut error = None;
    let mut finished = false;
    loop {
        let now_ms = sim.elapsed().as_millis() as u64;
        while next < faults.len() && faults[next].at_ms <= now_ms {
            let f = &faults[next];
            trace.record_at(u128::from(now_ms), "runner", format!("fault {:?}", f.fault));
            apply(&mut sim, &nsx, &f.fault);
            next += 1;
        }
        if now_ms > cfg.max_sim_time_ms {
            error = Some(format!(
                "the workload did not finish within {} ms of simulated time",
                cfg.max_sim_time_ms
            ));
            break;
        }
        match sim.step() {
            Ok(true) => {
                finished = true;
                break;
            }
            Ok(false) => {}
            Err(e) => {
                error = Some(format!("simulation failed: {e}"));
                break;
            }
        }
    }
    let sim_time_ms = sim.elapsed().as_millis() as u64;
    let workload = result.borrow_mut().take();
    match workload {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            finished = false;
            error.get_or_insert(e);
        }
        None => finished = false,
    }
    for e in nsx.requests_since(0) {
        trace.record_at(
            (e.time_ms - EPOCH_MS).max(0) as u128,
            NSX_HOST,
            format!("{} {} {} -> {}", e.user, e.method, e.path, e.status),
        );
    }
    let (objects, duplicates) = summarize(&nsx);
    let client = client_slot
        .borrow()
        .as_ref()
        .map(|c| c.stats())
        .unwrap_or_default();
    let lines = trace.lines();
    SpineReport {
        seed: cfg.seed,
        finished,
        error,
        sim_time_ms,
        trace_hash: crate::trace::hash_lines(&lines),
        trace: lines,
        client,
        manager: nsx.counters(),
        objects,
        duplicates,
        invariants: nsx.with_store(|s| s.check_invariants()),
    }
}

fn apply(sim: &mut turmoil::Sim<'_>, nsx: &FakeNsxManager, fault: &Fault) {
    match fault {
        Fault::Partition => sim.partition(NCP_HOST, NSX_HOST),
        Fault::Repair => sim.repair(NCP_HOST, NSX_HOST),
        Fault::Hold => sim.hold(NCP_HOST, NSX_HOST),
        Fault::Release => sim.release(NCP_HOST, NSX_HOST),
        Fault::LinkLatency { ms } => {
            sim.set_link_latency(NCP_HOST, NSX_HOST, Duration::from_millis(*ms))
        }
        Fault::RestartManager => sim.bounce(NSX_HOST),
        Fault::CrashManager => sim.crash(NSX_HOST),
        Fault::StartManager => sim.bounce(NSX_HOST),
        Fault::NsxErrors(rule) => nsx.add_fault(rule.clone()),
        Fault::ClearNsxErrors => nsx.clear_faults(),
    }
}

/// Objects tagged by the workload, by type, and any workload tag carried twice.
fn summarize(nsx: &FakeNsxManager) -> (BTreeMap<String, usize>, Vec<String>) {
    nsx.with_store(|s| {
        let mut counts = BTreeMap::new();
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (_, o) in s.objects() {
            let tags = o
                .doc
                .get("tags")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if !tags.iter().any(|t| t["scope"] == "spine/run") {
                continue;
            }
            *counts.entry(o.resource_type().to_string()).or_default() += 1;
            for t in &tags {
                let scope = t["scope"].as_str().unwrap_or("");
                if scope == "spine/ns" || scope == "spine/pod" {
                    *seen
                        .entry(format!("{scope}={}", t["tag"].as_str().unwrap_or("")))
                        .or_default() += 1;
                }
            }
        }
        let dups = seen
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(k, n)| format!("{k} x{n}"))
            .collect();
        (counts, dups)
    })
}
