//! The HTTP face of the fake: what happens to a request before and after the store.
//!
//! Order of work for one request (each step can answer on its own):
//! 1. `/fake-admin/...` goes to the admin API (no NSX auth: it is the harness's back door).
//! 2. `POST /api/session/create` checks the form credentials and answers with a `JSESSIONID`
//!    cookie and an `X-XSRF-TOKEN` header.
//! 3. Authentication: a `JSESSIONID` cookie must name a live session and come with its XSRF
//!    token (403, error_code 98 otherwise); else HTTP basic (403, error_code 403).
//! 4. Authorization: an `auditor` may only read.
//! 5. Admission: the client's request rate (token bucket, 429 with error_code "102"), its
//!    requests in flight and everyone's (503), then the injected fault rules.
//! 6. Latency: the configured delay, on tokio time (simulated under turmoil), holding the
//!    in-flight slot as a slow real manager would.
//! 7. The store, under one lock: a write is journaled to the state file first (a write that
//!    cannot be is a 500 and changes nothing), then dispatch, flush to the search index, log
//!    the request.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::response::Response;
use base64::Engine;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use nsx_core::nsx::ErrorBody;
use nsx_core::rng::SeededRng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::bootstrap::{self, Bootstrap, BootstrapConfig};
use crate::dispatch::{self, ApiRequest, ApiResponse, changes_state, parse_query};
use crate::error;
use crate::state_file::{self, Entry, SnapshotRef, StateFile};
use crate::store::{Ctx, Store, StoreConfig};

/// The largest body of one API request. NSX objects are small (an IP set's 4,000 addresses
/// are under 200 KB); bigger bodies are refused with 413 before they are parsed.
const MAX_BODY_BYTES: usize = 4 << 20;
/// The largest `POST /api/v1/batch` body (many requests with their bodies).
const MAX_BATCH_BYTES: usize = 16 << 20;
/// The largest login form.
const MAX_FORM_BYTES: usize = 64 << 10;
const LOG_CAPACITY: usize = 200_000;

/// Where the fake's time comes from, in milliseconds since the Unix epoch.
///
/// The store never reads a clock itself; the simulation passes turmoil's simulated time, the
/// standalone binary the wall clock, tests whatever they like.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> i64 + Send + Sync>);

impl Clock {
    pub fn new(f: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// `epoch_ms` plus tokio time elapsed since this call (paused and simulated in tests).
    pub fn tokio_since(epoch_ms: i64) -> Self {
        let start = tokio::time::Instant::now();
        Self::new(move || epoch_ms + start.elapsed().as_millis() as i64)
    }

    pub fn now_ms(&self) -> i64 {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({} ms)", self.now_ms())
    }
}

/// An account. `enterprise_admin` may do anything (and override protected objects with
/// `X-Allow-Overwrite`), `auditor` only read. Objects created by a `protected_principal` (a
/// principal identity such as NCP's) are PROTECTED.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub password: String,
    pub role: String,
    #[serde(default)]
    pub protected_principal: bool,
    /// A principal identity's certificate (SHA-256 of its DER, lower-case hex): a TLS client
    /// presenting it is this user, without a password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_sha256: Option<String>,
    /// The principal identity record (`/api/v1/trust-management/principal-identities`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal_identity: Option<Value>,
}

impl User {
    pub fn new(name: &str, password: &str, role: &str) -> Self {
        Self {
            name: name.into(),
            password: password.into(),
            role: role.into(),
            protected_principal: false,
            certificate_sha256: None,
            principal_identity: None,
        }
    }
}

/// The SHA-256 of the client certificate a TLS connection presented (lower-case hex), put
/// on each of its requests by [`crate::listen::serve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate(pub String);

/// Roles a principal identity may have (NSX 2.4's role ids).
const PI_ROLES: &[&str] = &[
    "enterprise_admin",
    "auditor",
    "network_engineer",
    "network_op",
    "security_engineer",
    "security_op",
    "lb_admin",
    "lb_auditor",
];

/// An injected failure: requests matching `method` (any if None), `path` (a prefix; any if
/// None) and `user` (any if None) are answered with `status` and `error_code` with probability
/// `rate`, at most `remaining` times.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultRule {
    /// Only this client's requests (one replica throttled, say).
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    pub status: u16,
    #[serde(default)]
    pub error_code: Option<i64>,
    #[serde(default = "one")]
    pub rate: f64,
    #[serde(default)]
    pub remaining: Option<u64>,
    #[serde(default)]
    pub message: Option<String>,
}

fn one() -> f64 {
    1.0
}

/// One line of the request log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestLogEntry {
    pub seq: u64,
    pub time_ms: i64,
    pub user: String,
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// See [`FakeNsxManager::request_span`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestSpan {
    pub count: u64,
    pub first_ms: Option<i64>,
    pub last_ms: Option<i64>,
    pub last_seq: u64,
}

/// Totals since start (or the last reset).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub total: u64,
    /// Non-GET requests to `/api/v1` (session logins are not writes).
    pub writes: u64,
    pub by_status: BTreeMap<u16, u64>,
}

/// Everything needed to build a manager.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub store: StoreConfig,
    /// Admin objects to pre-create; `None` leaves only the system objects.
    pub bootstrap: Option<BootstrapConfig>,
    pub users: Vec<User>,
    pub latency_ms: u64,
    pub clock: Clock,
    /// Keep the store in this file across restarts (standalone binary).
    pub state_file: Option<PathBuf>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            store: StoreConfig::default(),
            bootstrap: Some(BootstrapConfig::default()),
            users: vec![
                User::new("admin", "admin", "enterprise_admin"),
                User::new("audit", "audit", "auditor"),
            ],
            latency_ms: 0,
            clock: Clock::tokio_since(1_767_225_600_000),
            state_file: None,
        }
    }
}

#[derive(Debug, Clone)]
struct Session {
    user: String,
    xsrf: String,
    last_used_ms: i64,
}

struct Inner {
    store: Store,
    bootstrap: Option<Bootstrap>,
    users: BTreeMap<String, User>,
    sessions: BTreeMap<String, Session>,
    faults: Vec<FaultRule>,
    /// user -> writes it may still make before the manager stops answering it (a harness
    /// stopping a client right after its Nth write, as a crash would).
    freeze: BTreeMap<String, u64>,
    latency_ms: u64,
    in_flight: BTreeMap<String, u32>,
    global_in_flight: u32,
    buckets: BTreeMap<String, (f64, i64)>,
    log: VecDeque<RequestLogEntry>,
    log_seq: u64,
    counters: Counters,
    rng: SeededRng,
    clock: Clock,
    /// `--state FILE`: the snapshot and journal every write goes through.
    state: Option<StateFile>,
    initial: ManagerConfig,
}

/// A handle on one fake manager. Clones share it; the data lives as long as any handle, so a
/// simulated manager host can restart and find its database again.
#[derive(Clone)]
pub struct FakeNsxManager {
    inner: Arc<Mutex<Inner>>,
}

/// Admin-side answer for the harness.
type AdminResult = Result<Value, (u16, String)>;

impl FakeNsxManager {
    /// A fresh manager: system objects plus the configured bootstrap.
    ///
    /// # Panics
    /// If the bootstrap config is invalid (a programmer error in the caller's config); use
    /// [`FakeNsxManager::try_new`] for configs from users.
    pub fn new(config: ManagerConfig) -> Self {
        match Self::try_new(config) {
            Ok(m) => m,
            Err(e) => panic!("invalid fake NSX manager config: {e}"),
        }
    }

    pub fn try_new(config: ManagerConfig) -> Result<Self, String> {
        let (store, bootstrap) = fresh_store(&config)?;
        Ok(Self::from_parts(config, store, bootstrap))
    }

    /// Loads the state file if it exists (the data of a previous run: its snapshot, then the
    /// writes its journal holds, replayed in order), else starts fresh and writes it.
    pub fn open(config: ManagerConfig) -> Result<Self, String> {
        let Some(path) = config.state_file.clone() else {
            return Self::try_new(config);
        };
        let Some(loaded) = StateFile::load(&path)? else {
            let m = Self::try_new(config)?;
            let mut g = m.lock();
            g.state = Some(StateFile::create(&path)?);
            g.snapshot()
                .map_err(|e| format!("failed to write state file: {e}"))?;
            drop(g);
            return Ok(m);
        };
        let state_file::Loaded {
            file,
            snapshot,
            entries,
            dropped_torn_entry,
        } = loaded;
        let mut store = snapshot.store;
        let replayed = entries.len();
        let now = config.clock.now_ms();
        // Replay as the requests were first served: on a store whose derived indexes (the VIF
        // uniqueness index above all) are whole, indexing after each request; then every write
        // is visible to search at once, as after any restart.
        store.rebuild_index(entries.first().map_or(now, |e| e.now_ms));
        for e in &entries {
            let body = e.body_bytes()?;
            dispatch::dispatch(
                &mut store,
                &e.ctx(),
                &ApiRequest {
                    method: &e.method,
                    path: &e.path,
                    query: &e.query,
                    body: &body,
                },
            );
            store.flush_index(e.now_ms);
        }
        store.catch_up_index();
        let m = Self::from_parts(config, store, snapshot.bootstrap);
        let mut g = m.lock();
        g.users = snapshot.users;
        g.state = Some(file);
        if replayed > 0 || dropped_torn_entry || snapshot.version < state_file::VERSION {
            tracing::info!(
                file = %path.display(),
                replayed,
                dropped_torn_entry,
                "state file loaded; folding its journal into a new snapshot"
            );
            g.snapshot()
                .map_err(|e| format!("failed to write state file: {e}"))?;
        }
        drop(g);
        Ok(m)
    }

    fn from_parts(config: ManagerConfig, store: Store, bootstrap: Option<Bootstrap>) -> Self {
        let users = config
            .users
            .iter()
            .map(|u| (u.name.clone(), u.clone()))
            .collect();
        let inner = Inner {
            rng: SeededRng::new(config.store.seed ^ 0x5eed_fa17),
            store,
            bootstrap,
            users,
            sessions: BTreeMap::new(),
            faults: Vec::new(),
            freeze: BTreeMap::new(),
            latency_ms: config.latency_ms,
            in_flight: BTreeMap::new(),
            global_in_flight: 0,
            buckets: BTreeMap::new(),
            log: VecDeque::new(),
            log_seq: 0,
            counters: Counters::default(),
            clock: config.clock.clone(),
            state: None,
            initial: config,
        };
        Self {
            inner: Arc::new(Mutex::new(inner)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section below leaves the data consistent before anything can panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps this manager's database in `path` from now on, as if it had been opened with it
    /// (a world set up in memory, then persisted): writes the snapshot now, replacing any file
    /// there, and journals every later write.
    pub fn persist_to(&self, path: &std::path::Path) -> Result<(), String> {
        let mut g = self.lock();
        let previous = g.state.replace(StateFile::create(path)?);
        if let Err(e) = g.snapshot() {
            g.state = previous;
            return Err(format!("failed to write state file: {e}"));
        }
        Ok(())
    }

    /// The axum app serving the NSX API and the admin API.
    pub fn router(&self) -> Router {
        Router::new().fallback(handle).with_state(self.clone())
    }

    /// The ids of the bootstrap objects.
    pub fn bootstrap(&self) -> Option<Bootstrap> {
        self.lock().bootstrap.clone()
    }

    /// Reads the store.
    pub fn with_store<R>(&self, f: impl FnOnce(&Store) -> R) -> R {
        f(&self.lock().store)
    }

    /// Changes the store directly, as an admin in the UI would (the change is indexed). With a
    /// state file the whole store is saved afterwards (a change that is not a request cannot
    /// be journaled): this is for tests and tools, not for a hot path.
    pub fn with_store_mut<R>(&self, f: impl FnOnce(&mut Store, &Ctx) -> R) -> R {
        let mut g = self.lock();
        let now = g.clock.now_ms();
        let ctx = Ctx::admin(now);
        let r = f(&mut g.store, &ctx);
        g.store.flush_index(now);
        if let Err(e) = g.snapshot() {
            tracing::error!(error = %e, "failed to save the state file after a direct change");
        }
        r
    }

    /// Lets the search index catch up with every write (derived state: nothing to save).
    pub(crate) fn catch_up_index(&self) {
        self.lock().store.catch_up_index();
    }

    /// Serves one API request as `admin`, without HTTP, limits or faults (a write is journaled
    /// to the state file as any other).
    pub fn call_as_admin(&self, req: ApiRequest<'_>) -> ApiResponse {
        let mut g = self.lock();
        let now = g.clock.now_ms();
        let write = changes_state(req.method, req.path, req.body);
        g.serve(&Ctx::admin(now), &req, write)
    }

    /// The manager process restarts: sessions, in-flight counts and rate buckets are gone; the
    /// database stays, as a real manager's does.
    pub fn restart(&self) {
        let mut g = self.lock();
        g.sessions.clear();
        g.in_flight.clear();
        g.global_in_flight = 0;
        g.buckets.clear();
    }

    pub fn set_latency_ms(&self, ms: u64) {
        self.lock().latency_ms = ms;
    }

    pub fn set_search_lag_ms(&self, ms: i64) {
        self.lock().store.config.search_lag_ms = ms;
    }

    pub fn set_rate_limit(&self, per_second: u32) {
        self.lock().store.config.api_service.client_api_rate_limit = per_second;
    }

    pub fn set_concurrency_limit(&self, per_client: u32) {
        self.lock()
            .store
            .config
            .api_service
            .client_api_concurrency_limit = per_client;
    }

    pub fn add_fault(&self, rule: FaultRule) {
        self.lock().faults.push(rule);
    }

    /// Lets `user` make `writes` more writes, then stops answering it (until
    /// [`FakeNsxManager::unfreeze`]): a harness crashing that client right after its Nth write.
    pub fn freeze_after_writes(&self, user: &str, writes: u64) {
        self.lock().freeze.insert(user.to_string(), writes);
    }

    /// Whether `user` made its last allowed write.
    pub fn frozen(&self, user: &str) -> bool {
        self.lock().freeze.get(user) == Some(&0)
    }

    pub fn unfreeze(&self, user: &str) {
        self.lock().freeze.remove(user);
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    pub fn add_user(&self, user: User) {
        self.lock().users.insert(user.name.clone(), user);
    }

    /// Expires every session now (clients must log in again: 403 error_code 98).
    pub fn expire_sessions(&self) {
        let mut g = self.lock();
        for s in g.sessions.values_mut() {
            s.last_used_ms = i64::MIN / 2;
        }
    }

    /// The request log after sequence number `since`.
    pub fn requests_since(&self, since: u64) -> Vec<RequestLogEntry> {
        self.lock()
            .log
            .iter()
            .filter(|e| e.seq > since)
            .cloned()
            .collect()
    }

    pub fn counters(&self) -> Counters {
        self.lock().counters.clone()
    }

    /// The requests logged after sequence number `since`: how many, when the first and the
    /// last came (server clock, ms), and the last one's sequence number (`since` when none).
    /// Reads the log from its end, so it costs the requests it counts.
    pub fn request_span(&self, since: u64) -> RequestSpan {
        let g = self.lock();
        let mut span = RequestSpan {
            count: 0,
            first_ms: None,
            last_ms: None,
            last_seq: since,
        };
        for e in g.log.iter().rev().take_while(|e| e.seq > since) {
            if span.count == 0 {
                span.last_ms = Some(e.time_ms);
                span.last_seq = e.seq;
            }
            span.first_ms = Some(e.time_ms);
            span.count += 1;
        }
        span
    }

    /// The sequence number of the last request logged.
    pub fn request_seq(&self) -> u64 {
        self.lock().log_seq
    }

    /// `client_api_rate_limit` now (0: none).
    pub fn rate_limit(&self) -> u32 {
        self.lock().store.config.api_service.client_api_rate_limit
    }

    /// The full JSON dump of the database (the admin API's `/fake-admin/state`).
    pub fn state_json(&self) -> Value {
        serde_json::to_value(&self.lock().store).unwrap_or(Value::Null)
    }

    fn admin(
        &self,
        method: &str,
        path: &str,
        query: &[(String, String)],
        body: &[u8],
    ) -> AdminResult {
        let parse = || -> Result<Value, (u16, String)> {
            if body.is_empty() {
                return Ok(json!({}));
            }
            serde_json::from_slice(body).map_err(|e| (400, format!("invalid JSON body: {e}")))
        };
        match (method, path) {
            ("GET", "/fake-admin/state") => Ok(self.state_json()),
            ("GET", "/fake-admin/bootstrap") => {
                Ok(serde_json::to_value(self.bootstrap()).unwrap_or(Value::Null))
            }
            ("POST", "/fake-admin/reset") => {
                let mut g = self.lock();
                let (store, boot) = fresh_store(&g.initial).map_err(|e| (400, e))?;
                g.store = store;
                g.bootstrap = boot;
                g.faults.clear();
                g.sessions.clear();
                g.log.clear();
                g.counters = Counters::default();
                g.snapshot().map_err(|e| (500, e))?;
                Ok(json!({"reset": true}))
            }
            ("POST", "/fake-admin/restart") => {
                self.restart();
                Ok(json!({"restarted": true}))
            }
            ("GET", "/fake-admin/requests") => {
                let since = query
                    .iter()
                    .find(|(k, _)| k == "since")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                Ok(json!({"entries": self.requests_since(since), "counters": self.counters()}))
            }
            ("GET", "/fake-admin/config") => Ok(self.admin_config()),
            ("PUT", "/fake-admin/config") => {
                let v = parse()?;
                let Some(fields) = v.as_object() else {
                    return Err((400, "the config must be a JSON object".into()));
                };
                // Every value is checked before any is applied: a number out of range is a
                // 400, never wrapped into another setting (4294967296 into a rate limit of 0).
                const RANGES: [(&str, u64, u64); 7] = [
                    ("latency_ms", 0, 3_600_000),
                    ("search_lag_ms", 0, 3_600_000),
                    ("rate_limit", 0, u32::MAX as u64),
                    ("concurrency_limit", 0, u32::MAX as u64),
                    ("global_concurrency_limit", 0, u32::MAX as u64),
                    ("stale_revision_error_code", 0, 1_000_000),
                    ("connection_timeout", 1, 86_400),
                ];
                let mut checked = BTreeMap::new();
                for (k, val) in fields {
                    let Some(&(_, lo, hi)) = RANGES.iter().find(|(name, ..)| name == k) else {
                        let known: Vec<&str> = RANGES.iter().map(|(n, ..)| *n).collect();
                        return Err((
                            400,
                            format!("unknown setting '{k}' (known: {})", known.join(", ")),
                        ));
                    };
                    match val.as_u64().filter(|n| (lo..=hi).contains(n)) {
                        Some(n) => checked.insert(k.as_str(), n),
                        None => {
                            return Err((
                                400,
                                format!("{k} must be an integer from {lo} to {hi}, not {val}"),
                            ));
                        }
                    };
                }
                {
                    let mut g = self.lock();
                    let (config, latency) = (g.store.config.clone(), g.latency_ms);
                    let small = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
                    for (k, n) in checked {
                        let api = &mut g.store.config.api_service;
                        match k {
                            "rate_limit" => api.client_api_rate_limit = small(n),
                            "concurrency_limit" => api.client_api_concurrency_limit = small(n),
                            "global_concurrency_limit" => {
                                api.global_api_concurrency_limit = small(n)
                            }
                            "connection_timeout" => api.connection_timeout = small(n),
                            "latency_ms" => g.latency_ms = n,
                            "search_lag_ms" => g.store.config.search_lag_ms = n as i64,
                            _ => g.store.config.stale_revision_error_code = n as i64,
                        }
                    }
                    // The settings are part of the store: a restart keeps them, or nothing
                    // changes.
                    if let Err(e) = g.snapshot() {
                        g.store.config = config;
                        g.latency_ms = latency;
                        return Err((500, format!("failed to persist: {e}")));
                    }
                }
                Ok(self.admin_config())
            }
            ("GET", "/fake-admin/faults") => Ok(json!({"faults": self.lock().faults})),
            ("POST", "/fake-admin/faults") => {
                let rule: FaultRule = serde_json::from_value(parse()?)
                    .map_err(|e| (400, format!("invalid fault rule: {e}")))?;
                if !(0.0..=1.0).contains(&rule.rate) || !(400..=599).contains(&rule.status) {
                    return Err((400, "rate must be in [0, 1] and status in 400-599".into()));
                }
                self.add_fault(rule);
                Ok(json!({"faults": self.lock().faults}))
            }
            ("DELETE", "/fake-admin/faults") => {
                self.clear_faults();
                Ok(json!({"faults": []}))
            }
            ("POST", "/fake-admin/users") => {
                let user: User = serde_json::from_value(parse()?)
                    .map_err(|e| (400, format!("invalid user: {e}")))?;
                self.add_user(user);
                Ok(json!({"users": self.lock().users.keys().collect::<Vec<_>>()}))
            }
            ("POST", "/fake-admin/expire-sessions") => {
                self.expire_sessions();
                Ok(json!({"expired": true}))
            }
            ("POST", "/fake-admin/trace") => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct TraceRequest {
                    entry: crate::store::Entry,
                    packet: crate::store::Packet,
                    #[serde(default)]
                    reply: bool,
                }
                let req: TraceRequest = serde_json::from_value(parse()?)
                    .map_err(|e| (400, format!("invalid trace request: {e}")))?;
                let g = self.lock();
                if req.reply {
                    let (forward, reply) = g.store.trace_connection(&req.entry, &req.packet);
                    Ok(json!({"forward": forward, "reply": reply}))
                } else {
                    Ok(serde_json::to_value(g.store.trace(&req.entry, &req.packet))
                        .unwrap_or(Value::Null))
                }
            }
            ("GET", "/fake-admin/invariants") => {
                let r = self.lock().store.check_invariants();
                Ok(json!({"ok": r.is_ok(), "violation": r.err()}))
            }
            _ => Err((404, format!("no admin endpoint {method} {path}"))),
        }
    }

    /// The API service's `connection_timeout`, the bound on a handshake, on sending a
    /// request's headers or body, and on idling between requests.
    pub fn connection_timeout(&self) -> Duration {
        let secs = self.lock().store.config.api_service.connection_timeout;
        Duration::from_secs(u64::from(secs.max(1)))
    }

    fn admin_config(&self) -> Value {
        let g = self.lock();
        json!({
            "latency_ms": g.latency_ms,
            "search_lag_ms": g.store.config.search_lag_ms,
            "rate_limit": g.store.config.api_service.client_api_rate_limit,
            "concurrency_limit": g.store.config.api_service.client_api_concurrency_limit,
            "global_concurrency_limit": g.store.config.api_service.global_api_concurrency_limit,
            "stale_revision_error_code": g.store.config.stale_revision_error_code,
            "connection_timeout": g.store.config.api_service.connection_timeout,
            "search_pending": g.store.search_pending(),
            "objects": g.store.len(),
        })
    }
}

fn fresh_store(config: &ManagerConfig) -> Result<(Store, Option<Bootstrap>), String> {
    let mut store = Store::new(config.store.clone());
    let now = config.clock.now_ms();
    let ctx = Ctx::admin(now);
    let section = bootstrap::system_objects(&mut store, &ctx);
    let boot = match &config.bootstrap {
        Some(b) => Some(bootstrap::run(&mut store, &ctx, b, section)?),
        None => None,
    };
    // Bootstrap objects are searchable at once, as on a manager that has been up for a while.
    store.flush_index(now - config.store.search_lag_ms.max(0));
    Ok((store, boot))
}

impl Inner {
    /// With a state file, replaces its snapshot with the whole database (atomically: a crash
    /// leaves the old or the new one) and empties the journal.
    fn snapshot(&mut self) -> Result<(), String> {
        let Some(state) = self.state.as_mut() else {
            return Ok(());
        };
        state.write_snapshot(&SnapshotRef {
            version: state_file::VERSION,
            journal_seq: state.covered(),
            store: &self.store,
            users: &self.users,
            bootstrap: &self.bootstrap,
        })
    }

    /// Serves a request on the store. With a state file a write is journaled before the store
    /// is touched, so an answered write is on disk and one that could not be saved is a 500
    /// that changed nothing (a client retrying it does not create twice what a restart would
    /// then lose).
    /// `write`: [`changes_state`] of the request.
    fn serve(&mut self, ctx: &Ctx, req: &ApiRequest<'_>, write: bool) -> ApiResponse {
        if write && let Err(e) = self.journal(ctx, req) {
            tracing::error!(error = %e, "failed to save a write to the state file; it is refused");
            return persist_failed(&e);
        }
        let r = dispatch::dispatch(&mut self.store, ctx, req);
        self.store.flush_index(ctx.now_ms);
        if write && self.state.as_ref().is_some_and(StateFile::wants_snapshot) {
            // The write is safe in the journal already: a failed snapshot only delays folding.
            if let Err(e) = self.snapshot() {
                tracing::warn!(error = %e, "failed to fold the journal into a new snapshot");
            }
        }
        r
    }

    /// Appends `req` to the state file's journal (nothing without one), after the snapshot a
    /// torn journal waits for.
    fn journal(&mut self, ctx: &Ctx, req: &ApiRequest<'_>) -> Result<(), String> {
        if self.state.as_ref().is_some_and(StateFile::needs_snapshot) {
            self.snapshot()?;
        }
        let Some(state) = self.state.as_mut() else {
            return Ok(());
        };
        state.append(&mut Entry::new(
            ctx, req.method, req.path, req.query, req.body,
        ))
    }

    /// `write`: whether the request asked to change state ([`dispatch::changes_state`]).
    fn log(&mut self, user: &str, method: &str, path: &str, status: u16, write: bool) {
        self.log_seq += 1;
        let entry = RequestLogEntry {
            seq: self.log_seq,
            time_ms: self.clock.now_ms(),
            user: user.to_string(),
            method: method.to_string(),
            path: path.to_string(),
            status,
        };
        if self.log.len() == LOG_CAPACITY {
            self.log.pop_front();
        }
        self.log.push_back(entry);
        self.counters.total += 1;
        // A write changes the API's objects; logging in and out does not.
        if write && path.starts_with("/api/v1/") {
            self.counters.writes += 1;
        }
        *self.counters.by_status.entry(status).or_default() += 1;
    }

    /// Token bucket per client: capacity and refill = the rate limit per second.
    fn take_token(&mut self, user: &str) -> bool {
        let rate = self.store.config.api_service.client_api_rate_limit;
        if rate == 0 {
            return true;
        }
        let now = self.clock.now_ms();
        let cap = f64::from(rate);
        let (tokens, last) = self.buckets.get(user).copied().unwrap_or((cap, now));
        let refilled = (tokens + (now - last).max(0) as f64 * cap / 1000.0).min(cap);
        if refilled >= 1.0 {
            self.buckets.insert(user.to_string(), (refilled - 1.0, now));
            true
        } else {
            self.buckets.insert(user.to_string(), (refilled, now));
            false
        }
    }

    fn matching_fault(&mut self, user: &str, method: &str, path: &str) -> Option<FaultRule> {
        let mut hit = None;
        for i in 0..self.faults.len() {
            let f = &self.faults[i];
            let applies = f.user.as_deref().is_none_or(|u| u == user)
                && f.method
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && f.path.as_deref().is_none_or(|p| path.starts_with(p));
            if !applies {
                continue;
            }
            let rate = f.rate;
            if self.rng.next_f64() < rate {
                hit = Some(i);
                break;
            }
        }
        let i = hit?;
        let rule = self.faults[i].clone();
        if let Some(n) = &mut self.faults[i].remaining {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.faults.remove(i);
            }
        }
        Some(rule)
    }
}

/// The answer to a write that could not be saved: NSX's internal error.
fn persist_failed(e: &str) -> ApiResponse {
    ApiResponse {
        status: 500,
        body: serde_json::to_value(ErrorBody::new(
            500,
            error::INTERNAL,
            "common-services",
            format!("failed to persist: {e}"),
        ))
        .ok(),
    }
}

/// The authenticated caller.
struct Principal {
    user: String,
    role: String,
    protected_principal: bool,
}

fn error_response(status: u16, body: &ErrorBody) -> Response {
    json_response(
        status,
        Some(serde_json::to_value(body).unwrap_or(Value::Null)),
        HeaderMap::new(),
    )
}

fn json_response(status: u16, body: Option<Value>, headers: HeaderMap) -> Response {
    let mut r = match body {
        Some(v) => Response::new(Body::from(serde_json::to_vec(&v).unwrap_or_default())),
        None => Response::new(Body::empty()),
    };
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut().extend(headers);
    r
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn bad_credentials() -> ErrorBody {
    ErrorBody::new(
        403,
        error::BAD_CREDENTIALS,
        "common-services",
        "The credentials were incorrect or the account specified has been locked.",
    )
}

impl FakeNsxManager {
    fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: Option<&PeerCertificate>,
    ) -> Result<Principal, ErrorBody> {
        let mut g = self.lock();
        // A principal identity: the certificate is the credential (headers are ignored, as
        // NSX does for certificate-authenticated requests).
        if let Some(PeerCertificate(tp)) = peer
            && let Some(u) = g
                .users
                .values()
                .find(|u| u.certificate_sha256.as_deref() == Some(tp.as_str()))
        {
            return Ok(Principal {
                user: u.name.clone(),
                role: u.role.clone(),
                protected_principal: u.protected_principal,
            });
        }
        let now = g.clock.now_ms();
        if let Some(sid) = cookie(headers, "JSESSIONID") {
            let timeout_ms = i64::from(g.store.config.api_service.session_timeout) * 1000;
            let xsrf = headers
                .get("x-xsrf-token")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            // An expired session is gone; a live one presented with the wrong token stays (a
            // forged or garbled request must not log the legitimate client out).
            let live = g
                .sessions
                .get(&sid)
                .filter(|s| now - s.last_used_ms <= timeout_ms);
            let valid = live.filter(|s| s.xsrf == xsrf).map(|s| s.user.clone());
            let expired = live.is_none();
            return match valid.and_then(|u| g.users.get(&u).cloned()) {
                Some(u) => {
                    if let Some(s) = g.sessions.get_mut(&sid) {
                        s.last_used_ms = now;
                    }
                    Ok(Principal {
                        user: u.name,
                        role: u.role,
                        protected_principal: u.protected_principal,
                    })
                }
                None => {
                    if expired {
                        g.sessions.remove(&sid);
                    }
                    Err(ErrorBody::new(
                        403,
                        error::SESSION_EXPIRED,
                        "common-services",
                        "Bad XSRF token or session expired.",
                    ))
                }
            };
        }
        match basic_credentials(headers) {
            Some((u, p)) => match g.users.get(&u) {
                Some(user) if !user.password.is_empty() && user.password == p => Ok(Principal {
                    user: user.name.clone(),
                    role: user.role.clone(),
                    protected_principal: user.protected_principal,
                }),
                _ => Err(bad_credentials()),
            },
            None => Err(bad_credentials()),
        }
    }

    fn session_create(&self, body: &[u8]) -> Response {
        let form = parse_query(&String::from_utf8_lossy(body));
        let field = |k: &str| {
            form.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let (user, password) = (field("j_username"), field("j_password"));
        let mut g = self.lock();
        let status = match g.users.get(&user) {
            Some(u) if !u.password.is_empty() && u.password == password => 200,
            _ => 403,
        };
        g.log(&user, "POST", "/api/session/create", status, false);
        if status != 200 {
            drop(g);
            return error_response(403, &bad_credentials());
        }
        let sid = format!("{:016x}{:016x}", g.rng.next_u64(), g.rng.next_u64());
        let xsrf = g.rng.uuid();
        let now = g.clock.now_ms();
        g.sessions.insert(
            sid.clone(),
            Session {
                user,
                xsrf: xsrf.clone(),
                last_used_ms: now,
            },
        );
        drop(g);
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&format!("JSESSIONID={sid}; Path=/; Secure; HttpOnly"))
        {
            h.insert(header::SET_COOKIE, v);
        }
        if let Ok(v) = HeaderValue::from_str(&xsrf) {
            h.insert("x-xsrf-token", v);
        }
        json_response(200, None, h)
    }
}

impl FakeNsxManager {
    /// `/api/v1/trust-management/principal-identities[/with-certificate|/<id>]`: list,
    /// create with a certificate (NSX 2.4's one-step call), read, delete. Only an
    /// `enterprise_admin` may change them; a principal identity is a user whose TLS client
    /// certificate authenticates it.
    fn principal_identities(
        &self,
        principal: &Principal,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> (u16, Value) {
        let err = |status: u16, code: i64, msg: String| {
            (
                status,
                serde_json::to_value(ErrorBody::new(status, code, "common-services", msg))
                    .unwrap_or(Value::Null),
            )
        };
        let rest = path
            .trim_start_matches("/api/v1/trust-management/principal-identities")
            .trim_start_matches('/');
        let records = |g: &Inner| -> Vec<Value> {
            g.users
                .values()
                .filter_map(|u| u.principal_identity.clone())
                .collect()
        };
        if method != "GET" && principal.role != "enterprise_admin" {
            return err(
                403,
                error::PERMISSION_DENIED,
                format!(
                    "The user '{}' does not have permission to perform {method} on {path}.",
                    principal.user
                ),
            );
        }
        match (method, rest) {
            ("GET", "") => {
                let results = records(&self.lock());
                (
                    200,
                    json!({"results": results, "result_count": results.len()}),
                )
            }
            ("POST", "with-certificate") => match self.create_principal_identity(body) {
                Ok(v) => (201, v),
                Err((code, msg)) if code == error::INTERNAL => err(500, code, msg),
                Err((code, msg)) => err(400, code, msg),
            },
            ("GET", id) => match records(&self.lock()).into_iter().find(|r| r["id"] == id) {
                Some(r) => (200, r),
                None => err(
                    404,
                    error::NOT_FOUND,
                    format!(
                        "The requested object : {id} could not be found. Object identifiers are case sensitive."
                    ),
                ),
            },
            ("DELETE", id) => {
                let mut g = self.lock();
                let name = g
                    .users
                    .values()
                    .find(|u| u.principal_identity.as_ref().is_some_and(|r| r["id"] == id))
                    .map(|u| u.name.clone());
                match name {
                    Some(n) => {
                        let removed = g.users.remove(&n);
                        match g.snapshot() {
                            Ok(()) => (200, Value::Null),
                            Err(e) => {
                                if let Some(u) = removed {
                                    g.users.insert(n, u);
                                }
                                err(500, error::INTERNAL, format!("failed to persist: {e}"))
                            }
                        }
                    }
                    None => err(
                        404,
                        error::NOT_FOUND,
                        format!(
                            "The requested object : {id} could not be found. Object identifiers are case sensitive."
                        ),
                    ),
                }
            }
            _ => err(
                405,
                error::METHOD_NOT_ALLOWED,
                format!("Method {method} is not supported on {path}."),
            ),
        }
    }

    fn create_principal_identity(&self, body: &[u8]) -> Result<Value, (i64, String)> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| (error::INVALID_JSON, format!("Invalid JSON: {e}")))?;
        let text = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .trim()
                .to_string()
        };
        let (name, node_id, role, pem) = (
            text("name"),
            text("node_id"),
            text("role"),
            text("certificate_pem"),
        );
        for (k, val) in [
            ("name", &name),
            ("node_id", &node_id),
            ("role", &role),
            ("certificate_pem", &pem),
        ] {
            if val.is_empty() {
                return Err((
                    error::FIELD_VALIDATION,
                    format!("Field level validation errors: {{required property {k} is missing}}"),
                ));
            }
        }
        if !PI_ROLES.contains(&role.as_str()) {
            return Err((error::FIELD_VALIDATION, format!("Invalid role {role}.")));
        }
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
            (
                error::FIELD_VALIDATION,
                format!("Invalid PEM certificate: {e}"),
            )
        })?;
        // PEM markers around anything are not a certificate: the DER must parse as X.509.
        webpki::EndEntityCert::try_from(&der).map_err(|e| {
            (
                error::FIELD_VALIDATION,
                format!("Invalid PEM certificate: not an X.509 certificate ({e})"),
            )
        })?;
        let thumbprint = crate::tls::sha256_hex(der.as_ref());
        let mut g = self.lock();
        let taken = g.users.values().any(|u| {
            u.name == name || u.certificate_sha256.as_deref() == Some(thumbprint.as_str())
        });
        if taken {
            return Err((
                error::FIELD_VALIDATION,
                format!("Principal identity with name {name} or its certificate already exists."),
            ));
        }
        // Ids from the store's seeded generator: deterministic under the simulation.
        let id = g.rng.uuid();
        let certificate_id = g.rng.uuid();
        let record = json!({
            "resource_type": "PrincipalIdentity",
            "id": id,
            "name": name,
            "node_id": node_id,
            "role": role,
            "is_protected": v.get("is_protected").and_then(Value::as_bool).unwrap_or(false),
            "certificate_id": certificate_id,
            "permission_group": "undefined",
            "_revision": 0,
        });
        let user = User {
            protected_principal: record["is_protected"] == true,
            certificate_sha256: Some(thumbprint),
            principal_identity: Some(record.clone()),
            // No password: this identity authenticates by certificate only.
            ..User::new(&name, "", &role)
        };
        let previous = g.users.insert(name.clone(), user);
        if let Err(e) = g.snapshot() {
            match previous {
                Some(p) => g.users.insert(name, p),
                None => g.users.remove(&name),
            };
            return Err((error::INTERNAL, format!("failed to persist: {e}")));
        }
        Ok(record)
    }
}

/// Decrements the in-flight counts when a request ends, however it ends.
struct InFlight {
    nsx: FakeNsxManager,
    user: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut g = self.nsx.lock();
        if let Some(n) = g.in_flight.get_mut(&self.user) {
            *n = n.saturating_sub(1);
        }
        g.global_in_flight = g.global_in_flight.saturating_sub(1);
    }
}

/// Reads a request body of at most `limit` bytes within `timeout` (the API service's
/// `connection_timeout`): a larger body is a 413 and a body that stops arriving a 408, both
/// with NSX's error body, and neither holds the connection or memory any longer.
async fn read_body(body: Body, limit: usize, timeout: Duration) -> Result<bytes::Bytes, Response> {
    match tokio::time::timeout(timeout, to_bytes(body, limit)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            let (status, msg) = if too_large {
                (
                    413,
                    format!("The request body is larger than {limit} bytes."),
                )
            } else {
                (400, format!("failed to read the request body: {e}"))
            };
            let b = ErrorBody::new(status, error::INVALID_JSON, "common-services", msg);
            Err(error_response(status, &b))
        }
        Err(_) => {
            let b = ErrorBody::new(
                408,
                error::INVALID_JSON,
                "common-services",
                format!(
                    "The request body did not arrive within {} s.",
                    timeout.as_secs()
                ),
            );
            Err(error_response(408, &b))
        }
    }
}

async fn handle(State(nsx): State<FakeNsxManager>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let method = parts.method.as_str().to_string();
    let path = parts.uri.path().to_string();
    let raw_query = parts.uri.query().unwrap_or("").to_string();
    let query = parse_query(&raw_query);
    let full_path = if raw_query.is_empty() {
        path.clone()
    } else {
        format!("{path}?{raw_query}")
    };
    let timeout = nsx.connection_timeout();
    if path.starts_with("/fake-admin/") {
        let bytes = match read_body(body, MAX_BODY_BYTES, timeout).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        return match nsx.admin(&method, &path, &query, &bytes) {
            Ok(v) => json_response(200, Some(v), HeaderMap::new()),
            Err((status, msg)) => {
                json_response(status, Some(json!({"error": msg})), HeaderMap::new())
            }
        };
    }
    if path == "/api/session/create" && method == "POST" {
        let bytes = match read_body(body, MAX_FORM_BYTES, timeout).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        return nsx.session_create(&bytes);
    }
    if path == "/api/session/destroy" && method == "POST" {
        if let Some(sid) = cookie(&parts.headers, "JSESSIONID") {
            nsx.lock().sessions.remove(&sid);
        }
        return json_response(200, None, HeaderMap::new());
    }
    // Who is asking is known from the headers alone: a caller without credentials is refused
    // before a byte of its body is read or parsed.
    let principal = match nsx.authenticate(&parts.headers, parts.extensions.get()) {
        Ok(p) => p,
        Err(body) => {
            nsx.lock()
                .log("", &method, &full_path, 403, dispatch::is_write(&method));
            return error_response(403, &body);
        }
    };
    let limit = if path.trim_end_matches('/') == "/api/v1/batch" {
        MAX_BATCH_BYTES
    } else {
        MAX_BODY_BYTES
    };
    let bytes = match read_body(body, limit, timeout).await {
        Ok(b) => b,
        Err(resp) => {
            nsx.lock().log(
                &principal.user,
                &method,
                &full_path,
                resp.status().as_u16(),
                false,
            );
            return resp;
        }
    };
    let write = changes_state(&method, &path, &bytes);
    if principal.role == "auditor" && write {
        nsx.lock()
            .log(&principal.user, &method, &full_path, 403, write);
        let b = ErrorBody::new(
            403,
            error::PERMISSION_DENIED,
            "common-services",
            format!(
                "The user '{}' does not have permission to perform {method} on {path}.",
                principal.user
            ),
        );
        return error_response(403, &b);
    }
    if path.starts_with("/api/v1/trust-management/principal-identities") {
        let (status, body) = nsx.principal_identities(&principal, &method, &path, &bytes);
        nsx.lock()
            .log(&principal.user, &method, &full_path, status, write);
        return json_response(status, Some(body), HeaderMap::new());
    }
    let admitted = admit(&nsx, &principal, &method, &path, &full_path, write);
    let _guard = match admitted {
        Ok(g) => g,
        Err(resp) => return resp,
    };
    let latency = nsx.lock().latency_ms;
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    // Checked after the last await before dispatch, so no write lands past the limit.
    if nsx.lock().freeze.get(&principal.user) == Some(&0) {
        // The client is about to be crashed by the harness: nothing more of it lands.
        return std::future::pending().await;
    }
    let allow_overwrite = parts
        .headers
        .get("x-allow-overwrite")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let resp = {
        let mut g = nsx.lock();
        let now = g.clock.now_ms();
        let ctx = Ctx {
            user: principal.user.clone(),
            superuser: principal.role == "enterprise_admin",
            protected_principal: principal.protected_principal,
            allow_overwrite,
            now_ms: now,
        };
        let r = g.serve(
            &ctx,
            &ApiRequest {
                method: &method,
                path: &path,
                query: &query,
                body: &bytes,
            },
            write,
        );
        if write && let Some(left) = g.freeze.get_mut(&principal.user) {
            *left = left.saturating_sub(1);
        }
        g.log(&principal.user, &method, &full_path, r.status, write);
        r
    };
    json_response(resp.status, resp.body, HeaderMap::new())
}

/// Rate limit, concurrency limits and injected faults; on success the in-flight guard.
fn admit(
    nsx: &FakeNsxManager,
    p: &Principal,
    method: &str,
    path: &str,
    full_path: &str,
    write: bool,
) -> Result<InFlight, Response> {
    let mut g = nsx.lock();
    if !g.take_token(&p.user) {
        g.log(&p.user, method, full_path, 429, write);
        let rate = g.store.config.api_service.client_api_rate_limit;
        // The real 429 body carries error_code as a string.
        let body = json!({
            "httpStatus": "TOO_MANY_REQUESTS",
            "error_code": error::RATE_LIMIT.to_string(),
            "module_name": "common-services",
            "error_message": format!("Client '{}' exceeded request rate of {rate} per second", p.user),
        });
        return Err(json_response(429, Some(body), HeaderMap::new()));
    }
    let limits = g.store.config.api_service.clone();
    let mine = g.in_flight.get(&p.user).copied().unwrap_or(0);
    let over_client =
        limits.client_api_concurrency_limit > 0 && mine >= limits.client_api_concurrency_limit;
    let over_global = limits.global_api_concurrency_limit > 0
        && g.global_in_flight >= limits.global_api_concurrency_limit;
    if over_client || over_global {
        g.log(&p.user, method, full_path, 503, write);
        let which = if over_client {
            format!("client '{}'", p.user)
        } else {
            "all clients".to_string()
        };
        let b = ErrorBody::new(
            503,
            error::TOO_MANY_IN_FLIGHT,
            "common-services",
            format!("The concurrency limit for {which} has been reached. Retry later."),
        );
        return Err(error_response(503, &b));
    }
    if let Some(f) = g.matching_fault(&p.user, method, path) {
        g.log(&p.user, method, full_path, f.status, write);
        let b = ErrorBody::new(
            f.status,
            f.error_code.unwrap_or(i64::from(f.status)),
            "common-services",
            f.message
                .clone()
                .unwrap_or_else(|| format!("Injected fault: {} for {method} {path}", f.status)),
        );
        return Err(error_response(f.status, &b));
    }
    *g.in_flight.entry(p.user.clone()).or_default() += 1;
    g.global_in_flight += 1;
    drop(g);
    Ok(InFlight {
        nsx: nsx.clone(),
        user: p.user.clone(),
    })
}
