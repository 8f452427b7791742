//! Running a scenario for one seed: its steps in order, the invariants after each, the
//! expectations where written, and a report with the counters and the trace hash.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::detail::{ConnCheck, Detail, MatrixCheck, StepSpan};
use super::names::{Endpoint, parse_ip, protocol};
use super::spec::{Connectivity, Expect, Scenario, StepKind};
use super::world::World;

/// What one (scenario, seed) run produced.
#[derive(Debug, Clone, Serialize)]
pub struct SeedReport {
    pub seed: u64,
    pub passed: bool,
    /// How a failed pair failed: `step` (a step's check), `timeout` (past `--pair-timeout`),
    /// `panic` (the pair panicked; the others ran on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// `N (line L, kind)` of the step that failed.
    pub failed_step: Option<String>,
    pub message: Option<String>,
    pub sim_time_ms: u64,
    pub wall_ms: u64,
    pub nsx_requests: NsxRequests,
    /// What NCP's NSX clients counted (every replica and incarnation): requests, retries,
    /// transport errors, sessions created.
    pub ncp_client: nsx_core::nsx::ClientStats,
    /// NSX requests counted at each `expect` with `api_calls` (and at the end).
    pub marks: Vec<Mark>,
    pub pods: usize,
    pub trace_hash: String,
    #[serde(skip)]
    pub trace: Vec<String>,
    /// The timeline, topology and checks for `--html` (when asked for).
    #[serde(skip)]
    pub detail: Option<Box<Detail>>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct NsxRequests {
    pub total: u64,
    pub writes: u64,
    pub by_status: BTreeMap<u16, u64>,
}

/// The NSX requests between two `expect`s with `api_calls` (or the start), and how fast they
/// went against NSX's rate limit.
#[derive(Debug, Clone, Serialize)]
pub struct Mark {
    pub line: u64,
    pub total: u64,
    pub writes: u64,
    /// Simulated time since the previous mark.
    pub sim_ms: u64,
    /// From the first request of the interval to its last.
    pub busy_ms: u64,
    /// `total` over `busy_ms`.
    pub nsx_requests_per_s: f64,
    /// NSX's `client_api_rate_limit` (0: none), and the least time it allows for `total`
    /// requests: `total / rate_limit`.
    pub rate_limit: u32,
    pub rate_bound_ms: u64,
}

/// Options of a run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop after this step (1-based), for `dump --at`.
    pub stop_after: Option<usize>,
    /// Write snapshots that differ or are missing instead of failing.
    pub update_snapshots: bool,
    /// Which seeds keep their [`Detail`] (for `--html`).
    pub detail: DetailWhen,
    /// Wall clock the pair may take (`--pair-timeout`); past it the pair stops where it is and
    /// fails as `timeout`. Read only to stop: it never changes what a pair that finishes does.
    pub pair_timeout: Option<std::time::Duration>,
    /// A failure injected by the tests of the runner's isolation (never by a scenario).
    pub inject: Option<Injection>,
}

/// When a run keeps its [`Detail`]: the page details a scenario's first seed and every
/// failing one. The cheap records are kept along the way; the store walk and the request log
/// are read only for a run that keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetailWhen {
    #[default]
    Never,
    Failed,
    Always,
}

/// What a test of the runner's isolation makes a pair do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injection {
    /// Panic once the world is built.
    Panic,
    /// Advance simulated time without end (until `pair_timeout` stops it).
    Stall,
}

thread_local! {
    /// The step this thread's pair is running (`N (line L, kind)`): what a panic report names.
    static RUNNING: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// The step the pair on this thread was running (empty before its first step).
pub fn running_step() -> String {
    RUNNING.with(|r| r.borrow().clone())
}

impl SeedReport {
    /// A pair that ended without a run to report (its world could not be built, or it
    /// panicked): `failure` says how.
    pub fn ended(seed: u64, failure: &str, step: String, message: String, wall_ms: u64) -> Self {
        Self {
            seed,
            passed: false,
            failure: Some(failure.to_string()),
            failed_step: Some(step),
            message: Some(message),
            sim_time_ms: 0,
            wall_ms,
            nsx_requests: NsxRequests::default(),
            ncp_client: Default::default(),
            marks: Vec::new(),
            pods: 0,
            trace_hash: String::new(),
            trace: Vec::new(),
            detail: None,
        }
    }
}

const CONTROLLER_EVERY_MS: u64 = 100;
/// The invariants also hold between steps; checked this often (their cost grows with the
/// cluster).
const INVARIANTS_EVERY_MS: u64 = 5_000;

struct Runner {
    w: World,
    seed: u64,
    next_controllers: u64,
    next_invariants: u64,
    /// NSX counters at the previous expect, the request log's sequence number then, and the
    /// simulated time.
    mark: (u64, u64),
    mark_seq: u64,
    mark_ms: u64,
    marks: Vec<Mark>,
    /// The token of the last periodic invariant check that passed, and of the last failed
    /// convergence check with its answer: unchanged tokens within a step skip the work.
    invariants_ok_at: Option<u64>,
    not_converged_at: Option<(u64, String)>,
    /// The scenario applies a NetworkPolicy: every converge also checks the policy oracle.
    policy_oracle: bool,
    /// What `--html` shows, when asked for.
    detail: Option<Detail>,
    /// `--pair-timeout` as an instant, and whether the pair ran past it.
    deadline: Option<std::time::Instant>,
    timed_out: bool,
}

impl Runner {
    fn converged(&mut self) -> Result<(), String> {
        let token = self.w.token();
        if let Some((t, why)) = &self.not_converged_at
            && *t == token
        {
            return Err(why.clone());
        }
        let r = self.w.converged();
        self.not_converged_at = r.as_ref().err().map(|e| (token, e.clone()));
        r
    }

    /// Runs the simulation `ms` further, with the harness's controllers and the invariants.
    fn advance(&mut self, ms: u64) -> Result<(), String> {
        let until = self.w.now_ms().saturating_add(ms);
        while self.w.now_ms() < until {
            if self
                .deadline
                .is_some_and(|d| std::time::Instant::now() >= d)
            {
                self.timed_out = true;
                return Err("ran past --pair-timeout of wall clock".into());
            }
            let now = self.w.now_ms();
            if now >= self.next_controllers {
                self.next_controllers = now + CONTROLLER_EVERY_MS;
                self.w.kubelet_probes();
                self.w.endpoints_controller();
            }
            if now >= self.next_invariants {
                self.next_invariants = now + INVARIANTS_EVERY_MS;
                let token = self.w.token();
                if self.invariants_ok_at != Some(token) {
                    self.w
                        .invariants()
                        .map_err(|e| format!("invariant violated: {e}"))?;
                    self.invariants_ok_at = Some(token);
                }
            }
            self.w
                .step()
                .map_err(|e| format!("the simulation failed: {e}"))?;
            self.w.crash_frozen();
        }
        Ok(())
    }

    fn converge(&mut self, within: u64) -> Result<(), String> {
        let deadline = self.w.now_ms() + within;
        let mut interval = 250;
        let mut last;
        loop {
            self.w.endpoints_controller();
            match self.converged() {
                Ok(()) if self.policy_oracle => {
                    return self
                        .w
                        .check_policy_oracle()
                        .map_err(|e| format!("converged, but {e}"));
                }
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            let now = self.w.now_ms();
            if now >= deadline {
                return Err(format!("not converged within {within} ms: {last}"));
            }
            // Often at first (most steps settle within a second), then less and less often:
            // the check reads the whole cluster.
            self.advance(interval.min(deadline - now))?;
            interval = (interval * 2).min(4_000);
        }
    }

    /// One `expect.services` entry against the apiserver's service and its Events.
    fn expect_service(&self, sv: &super::spec::ServiceExpect) -> Result<(), String> {
        let (ns, name) = sv.service.split_once('/').unwrap_or_default();
        let doc = self
            .w
            .api
            .get("services", ns, name)
            .ok_or(format!("expect.services: no service {}", sv.service))?;
        let ingress = doc["status"]["loadBalancer"]["ingress"][0]["ip"]
            .as_str()
            .map(str::to_string);
        if let Some(want) = &sv.ingress
            && *want != ingress
        {
            return Err(format!(
                "service {}: ingress {ingress:?}, expected {want:?}",
                sv.service
            ));
        }
        let error = doc["metadata"]["annotations"][nsx_core::k8s::annotation::LB_ERROR]
            .as_str()
            .map(str::to_string);
        if let Some(want) = &sv.lb_error
            && *want != error
        {
            return Err(format!(
                "service {}: {} is {error:?}, expected {want:?}",
                sv.service,
                nsx_core::k8s::annotation::LB_ERROR
            ));
        }
        if let Some(text) = &sv.warning {
            let uid = doc["metadata"]["uid"].as_str().unwrap_or_default();
            let mut messages = Vec::new();
            self.w.api.try_each("events", |ev| {
                if ev["type"] == "Warning"
                    && ev["involvedObject"]["kind"] == "Service"
                    && ev["involvedObject"]["uid"] == uid
                {
                    messages.push(ev["message"].as_str().unwrap_or_default().to_string());
                }
                Ok::<(), String>(())
            })?;
            if !messages.iter().any(|m| m.contains(text.as_str())) {
                return Err(format!(
                    "service {}: no Warning Event says {text:?} (Warnings: {messages:?})",
                    sv.service
                ));
            }
        }
        Ok(())
    }

    fn counters(&self) -> (u64, u64) {
        let c = self.w.nsx.counters();
        (c.total, c.writes)
    }

    fn step(&mut self, kind: &StepKind, line: u64, opts: &RunOptions) -> Result<(), String> {
        self.invariants_ok_at = None;
        self.not_converged_at = None;
        match kind {
            StepKind::Apply(docs) => {
                for d in docs {
                    self.w.apply(d.clone())?;
                }
                self.w.endpoints_controller();
                // Let the watches see it.
                self.advance(10)
            }
            StepKind::Delete(r) => {
                self.w
                    .delete(&r.kind, r.namespace.as_deref().unwrap_or(""), &r.name)?;
                self.advance(10)
            }
            StepKind::Wait { min, max } => {
                // A stream of its own per step, so a range drawn here moves nothing else.
                let ms = if min == max {
                    *min
                } else {
                    nsx_core::rng::SeededRng::new(self.seed ^ line.rotate_left(32))
                        .range_u64(*min, *max)
                };
                self.advance(ms)
            }
            StepKind::Converge(within) => self.converge(*within),
            StepKind::Fault(f) => {
                self.w.fault(f)?;
                self.advance(5)
            }
            StepKind::Heal(f) => {
                self.w.heal(f.as_ref());
                self.advance(5)
            }
            StepKind::Expect(e) => self.expect(e, line),
            StepKind::Snapshot(label) => {
                super::snapshot::check(&self.w, label, opts.update_snapshots)
            }
        }
    }

    fn expect(&mut self, e: &Expect, line: u64) -> Result<(), String> {
        if e.converged == Some(true) {
            self.w
                .converged()
                .map_err(|m| format!("not converged: {m}"))?;
        }
        if e.converged == Some(false) && self.w.converged().is_ok() {
            return Err("expected not converged, but everything is realized".into());
        }
        for p in &e.pods {
            let (ns, name) = p.pod.split_once('/').unwrap_or_default();
            let doc = self
                .w
                .api
                .get("pods", ns, name)
                .ok_or(format!("expect.pods: no pod {}", p.pod))?;
            let ready = doc["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            let restarts: u64 = doc["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["restartCount"].as_u64())
                .sum();
            if let Some(want) = p.ready
                && want != ready
            {
                return Err(format!(
                    "pod {}: expected {}, it is {}",
                    p.pod,
                    if want { "Ready" } else { "not ready" },
                    if ready { "Ready" } else { "not ready" }
                ));
            }
            if p.min_restarts.is_some_and(|m| restarts < u64::from(m))
                || p.max_restarts.is_some_and(|m| restarts > u64::from(m))
            {
                return Err(format!(
                    "pod {}: {restarts} container restarts, expected {}..={}",
                    p.pod,
                    p.min_restarts.unwrap_or(0),
                    p.max_restarts.map_or("any".to_string(), |m| m.to_string())
                ));
            }
        }
        for sv in &e.services {
            self.expect_service(sv)?;
        }
        match e.policy_oracle {
            Some(true) => self.w.check_policy_oracle()?,
            Some(false) if self.w.check_policy_oracle().is_ok() => {
                return Err(
                    "expected the dataplane to differ from the policy oracle; it agrees".into(),
                );
            }
            _ => {}
        }
        if e.invariants.is_some() {
            let r = self.w.invariants();
            match (e.invariants, r) {
                (Some(true), Err(m)) => return Err(format!("invariant violated: {m}")),
                (Some(false), Ok(())) => {
                    return Err("expected an invariant to be violated; all hold".into());
                }
                _ => {}
            }
        }
        if let Some(n) = &e.nsx {
            let cluster = self.w.sc.cluster.name.clone();
            // NCP's own objects (what it would find by tag), not the admin's bootstrap
            // objects that also carry the cluster's tag.
            let docs: Vec<serde_json::Value> = self.w.nsx.inspect(|s| {
                s.objects()
                    .map(|o| serde_json::Value::Object(o.doc.clone()))
                    .collect()
            });
            let observed = nsx_core::ncp::observe::Observed::from_docs(docs, &cluster);
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for d in observed.objects.values().flatten() {
                let rt = d["resource_type"].as_str().unwrap_or("");
                *counts
                    .entry(super::names::count_name(rt).to_string())
                    .or_insert(0) += 1;
            }
            for (k, want) in &n.count {
                let have = counts.get(k).copied().unwrap_or(0);
                if have != *want {
                    return Err(format!(
                        "NSX has {have} {k} of this cluster, expected {want}"
                    ));
                }
            }
            if n.untouched.is_some() {
                for id in &self.w.preloaded {
                    let before = self.w.foreign.get(id).cloned().unwrap_or_default();
                    let now = self
                        .w
                        .nsx
                        .inspect(|s| s.get(id).map(|o| serde_json::Value::Object(o.doc.clone())));
                    match now {
                        None => return Err(format!("preloaded {id} was deleted")),
                        Some(d) if d != before => {
                            return Err(format!("preloaded {id} was changed"));
                        }
                        _ => {}
                    }
                }
            }
        }
        let (total, writes) = self.counters();
        if let Some(a) = &e.api_calls {
            let (t, w) = (total - self.mark.0, writes - self.mark.1);
            let span = self.w.nsx.request_span(self.mark_seq);
            let busy_ms = match (span.first_ms, span.last_ms) {
                (Some(a), Some(b)) => (b - a).max(0) as u64,
                _ => 0,
            };
            let rate_limit = self.w.nsx.rate_limit();
            let rate_bound_ms = (t * 1000)
                .checked_div(u64::from(rate_limit))
                .unwrap_or_default();
            let now = self.w.now_ms();
            self.marks.push(super::run::Mark {
                line,
                total: t,
                writes: w,
                sim_ms: now - self.mark_ms,
                busy_ms,
                nsx_requests_per_s: if busy_ms == 0 {
                    0.0
                } else {
                    (t as f64 * 1000.0 / busy_ms as f64 * 10.0).round() / 10.0
                },
                rate_limit,
                rate_bound_ms,
            });
            if let Some(max) = a.max
                && t > max
            {
                return Err(format!(
                    "{t} NSX requests since the previous expect, at most {max} expected"
                ));
            }
            if let Some(max) = a.writes_max
                && w > max
            {
                return Err(format!(
                    "{w} NSX writes since the previous expect, at most {max} expected"
                ));
            }
            if let Some(factor) = a.rate_bound_factor_max {
                if rate_limit == 0 {
                    return Err(
                        "api_calls.rate_bound_factor_max needs NSX's rate limit (nsx.rate_limit)"
                            .into(),
                    );
                }
                if busy_ms as f64 > factor * rate_bound_ms as f64 {
                    return Err(format!(
                        "{t} NSX requests took {busy_ms} ms from the first to the last; NSX's rate \
                         limit of {rate_limit}/s allows them in {rate_bound_ms} ms, and at most \
                         {factor} times that was expected"
                    ));
                }
            }
        }
        self.mark = (total, writes);
        self.mark_seq = self.w.nsx.request_seq();
        self.mark_ms = self.w.now_ms();
        for c in &e.connectivity {
            self.connectivity(c)?;
        }
        if let Some(r) = &e.reachability {
            let m = r.matrix()?;
            let proto = protocol(&r.protocol)?;
            let mut wrong = Vec::new();
            let mut got_rows = Vec::new();
            for (row, allowed) in &m.rows {
                let mut got_row = Vec::new();
                for (col, want) in m.columns.iter().zip(allowed) {
                    if row == col {
                        got_row.push(true);
                        continue;
                    }
                    let (ns, name) = col.split_once('/').unwrap_or_default();
                    let dst = self.w.pod_at(ns, name)?.ip;
                    let from = Endpoint::parse(row, true)?;
                    let o = self
                        .w
                        .connect(&from, dst, proto, self.w.ephemeral_port(), r.port)?;
                    got_row.push(o.works());
                    if o.works() != *want {
                        wrong.push(format!(
                            "{row} -> {col}: expected {}, got {} ({:?})",
                            if *want { "." } else { "X" },
                            if o.works() { "." } else { "X" },
                            o.reached
                        ));
                    }
                }
                got_rows.push(got_row);
            }
            if let Some(d) = self.detail.as_mut() {
                d.matrices.push(MatrixCheck {
                    at_ms: self.w.now_ms(),
                    port: r.port,
                    protocol: r.protocol.clone(),
                    rows: m.rows.iter().map(|(r, _)| r.clone()).collect(),
                    cols: m.columns.clone(),
                    expected: m.rows.iter().map(|(_, a)| a.clone()).collect(),
                    got: got_rows,
                });
            }
            if !wrong.is_empty() {
                return Err(format!(
                    "reachability on {} {}: {}",
                    r.protocol,
                    r.port,
                    wrong.join("; ")
                ));
            }
        }
        Ok(())
    }

    fn connectivity(&mut self, c: &Connectivity) -> Result<(), String> {
        let from = Endpoint::parse(&c.from, true)?;
        let to = Endpoint::parse(&c.to, false)?;
        let proto = protocol(&c.protocol)?;
        let (dst_ip, service) = match &to {
            Endpoint::Pod { namespace, name } => (self.w.pod_at(namespace, name)?.ip, false),
            Endpoint::External(ip) => (*ip, false),
            // A NodePort is load-balanced like a service.
            Endpoint::Node(name) => (
                self.w
                    .nodes
                    .get(name)
                    .ok_or(format!("no node {name}"))?
                    .node_ip,
                true,
            ),
            Endpoint::Service { namespace, name } => {
                let s = self
                    .w
                    .api
                    .get("services", namespace, name)
                    .ok_or(format!("no service {namespace}/{name}"))?;
                (
                    parse_ip(s["spec"]["clusterIP"].as_str().unwrap_or(""))?,
                    true,
                )
            }
            Endpoint::Lb { namespace, name } => {
                let s = self
                    .w
                    .api
                    .get("services", namespace, name)
                    .ok_or(format!("no service {namespace}/{name}"))?;
                let ip = s["status"]["loadBalancer"]["ingress"][0]["ip"]
                    .as_str()
                    .ok_or(format!(
                        "service {namespace}/{name} has no LoadBalancer ingress IP"
                    ))?;
                (parse_ip(ip)?, true)
            }
        };
        let attempts = if service { 48 } else { 1 };
        let mut reached: BTreeSet<String> = BTreeSet::new();
        let mut ok = 0;
        let mut sample = None;
        for _ in 0..attempts {
            let sport = self.w.ephemeral_port();
            let o = self.w.connect(&from, dst_ip, proto, sport, c.port)?;
            if o.works() {
                ok += 1;
                match &o.reached {
                    super::dataplane::Reached::Pod { namespace, name } => {
                        reached.insert(format!("{namespace}/{name}"));
                        if let Some(kept) = c.client_ip_kept {
                            let client = match &from {
                                Endpoint::Pod { namespace, name } => {
                                    self.w.pod_at(namespace, name)?.ip
                                }
                                Endpoint::External(ip) => *ip,
                                Endpoint::Node(n) => {
                                    self.w.nodes.get(n).ok_or(format!("no node {n}"))?.node_ip
                                }
                                _ => 0,
                            };
                            if kept != (o.seen_src == Some(client)) {
                                return Err(format!(
                                    "{} -> {}: {namespace}/{name} saw the connection from {}, \
                                     client_ip_kept: {kept} expected",
                                    c.from,
                                    c.to,
                                    o.seen_src.map_or("nothing".into(), super::names::ip_string)
                                ));
                            }
                        }
                    }
                    super::dataplane::Reached::External { src } => {
                        if let Some(snat) = c.snat {
                            let pod_ip = match &from {
                                Endpoint::Pod { namespace, name } => {
                                    self.w.pod_at(namespace, name)?.ip
                                }
                                _ => 0,
                            };
                            if snat == (*src == pod_ip) {
                                return Err(format!(
                                    "{} -> {}: left with source {}, snat: {snat} expected",
                                    c.from,
                                    c.to,
                                    super::names::ip_string(*src)
                                ));
                            }
                        }
                    }
                    super::dataplane::Reached::Node { .. }
                    | super::dataplane::Reached::Refused { .. }
                    | super::dataplane::Reached::Dropped(_) => {}
                }
            } else if sample.is_none() {
                sample = Some(o);
            }
        }
        let works = ok > 0;
        if let Some(d) = self.detail.as_mut() {
            d.connectivity.push(ConnCheck {
                at_ms: self.w.now_ms(),
                from: c.from.clone(),
                to: c.to.clone(),
                port: c.port,
                protocol: c.protocol.clone(),
                expected: c.allowed,
                got: works,
                reached: reached.iter().cloned().collect(),
            });
        }
        if works != c.allowed {
            let why = sample
                .map(|o| format!("{:?}; path: {}", o.reached, o.path.join(" | ")))
                .unwrap_or_else(|| {
                    format!(
                        "reached {}",
                        reached.iter().cloned().collect::<Vec<_>>().join(", ")
                    )
                });
            return Err(format!(
                "{} -> {} {} {}: expected {}, {}: {why}",
                c.from,
                c.to,
                c.protocol,
                c.port,
                if c.allowed { "allowed" } else { "blocked" },
                if works {
                    "it connects"
                } else {
                    "it does not connect"
                }
            ));
        }
        if c.allowed && ok < attempts {
            return Err(format!(
                "{} -> {}: only {ok} of {attempts} connections worked",
                c.from, c.to
            ));
        }
        if c.sticky && reached.len() != 1 {
            return Err(format!(
                "{} -> {}: session affinity expected one backend, connections reached {:?}",
                c.from, c.to, reached
            ));
        }
        if let Some(b) = &c.backends {
            let want: BTreeSet<String> = b.iter().cloned().collect();
            if want != reached {
                return Err(format!(
                    "{} -> {}: backends reached {:?}, expected {:?}",
                    c.from, c.to, reached, want
                ));
            }
        }
        Ok(())
    }
}

/// Runs `sc` with `seed`.
pub fn run(sc: &Scenario, seed: u64, opts: &RunOptions) -> (SeedReport, Option<World>) {
    // Wall time is for the report only; nothing in the simulation reads it.
    let started = std::time::Instant::now();
    let w = match World::new(sc, seed) {
        Ok(w) => w,
        Err(e) => {
            return (
                SeedReport::ended(
                    seed,
                    "step",
                    "setup".into(),
                    e,
                    started.elapsed().as_millis() as u64,
                ),
                None,
            );
        }
    };
    w.record(format!("scenario {} seed {seed}", sc.name));
    let mut r = Runner {
        w,
        seed,
        next_controllers: 0,
        next_invariants: 0,
        mark: (0, 0),
        mark_seq: 0,
        mark_ms: 0,
        marks: Vec::new(),
        invariants_ok_at: None,
        not_converged_at: None,
        policy_oracle: sc.steps.iter().any(|s| match &s.kind {
            StepKind::Apply(docs) => docs.iter().any(|d| d["kind"] == "NetworkPolicy"),
            _ => false,
        }),
        detail: (opts.detail != DetailWhen::Never).then(Detail::default),
        deadline: opts.pair_timeout.map(|t| started + t),
        timed_out: false,
    };
    if opts.inject == Some(Injection::Panic) {
        RUNNING.with(|r| *r.borrow_mut() = "setup".into());
        panic!("injected panic (a test of the runner's isolation)");
    }
    let mut failure = None;
    for (i, s) in sc.steps.iter().enumerate() {
        if opts.stop_after.is_some_and(|n| i >= n) {
            break;
        }
        r.w.record(format!(
            "step {} (line {}) {}",
            i + 1,
            s.line,
            s.kind.name()
        ));
        let started_ms = r.w.now_ms();
        if let Some(d) = r.detail.as_mut() {
            d.fault_step(&s.kind, started_ms);
        }
        RUNNING.with(|run| {
            *run.borrow_mut() = format!("{} (line {}, {})", i + 1, s.line, s.kind.name())
        });
        let stall = if i == 0 && opts.inject == Some(Injection::Stall) {
            r.advance(u64::MAX / 4)
        } else {
            Ok(())
        };
        let res = stall
            .and_then(|()| r.step(&s.kind, s.line, opts))
            .and_then(|()| {
                r.w.invariants()
                    .map_err(|e| format!("invariant violated: {e}"))
            });
        if let Some(d) = r.detail.as_mut() {
            d.steps.push(StepSpan {
                n: i + 1,
                line: s.line,
                kind: s.kind.name(),
                what: super::detail::describe(&s.kind),
                start_ms: started_ms,
                end_ms: r.w.now_ms(),
                ok: res.is_ok(),
            });
        }
        if let Err(e) = res {
            r.w.record(format!("step {} failed: {e}", i + 1));
            failure = Some((format!("{} (line {}, {})", i + 1, s.line, s.kind.name()), e));
            break;
        }
    }
    let w = r.w;
    let keep = match opts.detail {
        DetailWhen::Always => true,
        DetailWhen::Failed => failure.is_some(),
        DetailWhen::Never => false,
    };
    let detail = r.detail.filter(|_| keep).map(|mut d| {
        d.requests_from(&w.nsx.requests_since(0), crate::ncp_host::EPOCH_MS);
        w.nsx.with_store(|s| d.topology_from(s));
        Box::new(d)
    });
    for line in w.api.request_log() {
        if let Some((ms, rest)) = line.split_once(' ') {
            let ms: i64 = ms.parse().unwrap_or(crate::ncp_host::EPOCH_MS);
            w.trace.record_at(
                (ms - crate::ncp_host::EPOCH_MS).max(0) as u128,
                "apiserver",
                rest,
            );
        }
    }
    for e in w.nsx.requests_since(0) {
        w.trace.record_at(
            (e.time_ms - crate::ncp_host::EPOCH_MS).max(0) as u128,
            "nsx-manager",
            format!("{} {} {} -> {}", e.user, e.method, e.path, e.status),
        );
    }
    let lines = w.trace.lines();
    let c = w.nsx.counters();
    let kind = if r.timed_out { "timeout" } else { "step" };
    let report = SeedReport {
        seed,
        passed: failure.is_none(),
        failure: failure.as_ref().map(|_| kind.to_string()),
        failed_step: failure.as_ref().map(|f| f.0.clone()),
        message: failure.map(|f| f.1),
        sim_time_ms: w.now_ms(),
        wall_ms: started.elapsed().as_millis() as u64,
        nsx_requests: NsxRequests {
            total: c.total,
            writes: c.writes,
            by_status: c.by_status,
        },
        ncp_client: w.ncp.client_stats(),
        marks: r.marks,
        pods: w.api.list("pods").len(),
        trace_hash: format!("{:016x}", crate::trace::hash_lines(&lines)),
        trace: lines,
        detail,
    };
    (report, Some(w))
}
