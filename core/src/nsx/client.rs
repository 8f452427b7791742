//! The NSX Manager HTTP client that runs in production and, over a different connector, in the
//! simulation.
//!
//! What it does beyond sending requests, and why:
//! - **Authentication**: HTTP basic, or a session (`POST /api/session/create`, then the
//!   `JSESSIONID` cookie and `X-XSRF-TOKEN` header on every request). A 403 with error_code 98
//!   (expired token) drops the session, creates a new one and repeats the request once.
//! - **Retries** follow the rules NSX clients (vmware-nsxlib) use: 429, 503 and 500/607|610 are
//!   retried with random exponential backoff, bounded by `max_attempts`; the jitter comes from
//!   the seeded source handed in, so a simulation replays the same waits. Transport failures
//!   are retried only for GET, PUT and DELETE: a POST whose answer was lost may have created
//!   the object, and blind repetition would duplicate it; the caller reconciles instead.
//! - **Optimistic concurrency**: [`NsxClient::update_with`] re-reads and re-applies a change on
//!   412 (stale `_revision`) or 409 (firewall), as nsxlib does.
//! - **Client-side rate limit** (GCRA) and a concurrency cap, so that a well-behaved controller
//!   does not meet the manager's 429/503 in steady state.
//! - **Pagination**: [`NsxClient::list_all`] and [`NsxClient::search_all`] follow `cursor`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::Connect;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::error::ErrorBody;
use super::model::ListResult;
use crate::rng::SeededRng;

/// How the client proves who it is.
#[derive(Debug, Clone)]
pub enum Auth {
    /// `Authorization: Basic` on every request.
    Basic { user: String, password: String },
    /// A session from `/api/session/create`; basic credentials are sent along, as nsxlib does,
    /// so a manager that refuses sessions still authenticates the request.
    Session { user: String, password: String },
    /// A principal identity: the client certificate the connector presents in the TLS
    /// handshake is the credential; no header is sent.
    ClientCertificate,
}

impl Auth {
    fn basic_header(&self) -> Option<HeaderValue> {
        let (Auth::Basic { user, password } | Auth::Session { user, password }) = self else {
            return None;
        };
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Some(
            HeaderValue::from_str(&format!("Basic {token}"))
                .expect("base64 is a valid header value"),
        )
    }
}

/// Client settings. The defaults are nsxlib's where it has one.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port`, without a path.
    pub base_url: String,
    /// The cluster's other managers (`nsx_api_managers` after the first): a request that
    /// gets no answer from the current manager moves the client to the next one.
    pub standby_urls: Vec<String>,
    pub auth: Auth,
    /// Total tries for a retryable failure (nsxlib: 10).
    pub max_attempts: u32,
    /// Backoff before retry n is a random duration in `[base/2, base] * 2^n`, capped.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// Per-request deadline; a partitioned manager must not hang the controller forever.
    pub request_timeout_ms: u64,
    /// Client-side rate limit (requests per second; 0 = none) and burst.
    pub rate_limit_per_second: u32,
    pub rate_limit_burst: u32,
    /// Requests in flight at once (the manager refuses more than 40 per client with 503).
    pub max_concurrent_requests: usize,
    /// Seed of the jitter source.
    pub seed: u64,
    /// Send `X-Allow-Overwrite: true` (superuser override of protected objects).
    pub allow_overwrite: bool,
}

impl ClientConfig {
    pub fn new(base_url: impl Into<String>, auth: Auth) -> Self {
        Self {
            base_url: base_url.into(),
            standby_urls: Vec::new(),
            auth,
            max_attempts: 10,
            backoff_base_ms: 500,
            backoff_max_ms: 5_000,
            request_timeout_ms: 30_000,
            rate_limit_per_second: 90,
            rate_limit_burst: 10,
            max_concurrent_requests: 20,
            seed: 0,
            allow_overwrite: false,
        }
    }
}

/// Failures of an NSX call. `is_retryable` says whether waiting and trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum NsxError {
    #[error("failed to {op}: NSX answered {status} (error_code {code}): {message}", code = body.error_code.map_or("none".to_string(), |c| c.to_string()), message = body.error_message)]
    Api {
        op: String,
        status: u16,
        body: Box<ErrorBody>,
    },
    #[error("failed to {op}: transport error")]
    Transport {
        op: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("failed to {op}: no answer within {timeout_ms} ms")]
    Timeout { op: String, timeout_ms: u64 },
    #[error("failed to decode the answer to {op}")]
    Decode {
        op: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("failed to build the request for {op}: {reason}")]
    BadRequest { op: String, reason: String },
    /// This client's write fence is down (its replica no longer leads, or may not know that
    /// it still does): the write was not sent, or its attempt was abandoned at the fence.
    #[error("refused to {op}: this replica's write fence is down")]
    Fenced { op: String },
}

impl NsxError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            NsxError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The NSX `error_code` of an API error.
    pub fn error_code(&self) -> Option<i64> {
        match self {
            NsxError::Api { body, .. } => body.error_code,
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// 412, or 409 on firewall objects: someone else changed the object since it was read.
    pub fn is_stale_revision(&self) -> bool {
        matches!(self.status(), Some(412) | Some(409))
    }

    /// Throttling, overload, a cluster reconfiguring, a lost connection or a timeout.
    pub fn is_retryable(&self) -> bool {
        match self {
            NsxError::Api { status, body, .. } => match status {
                429 | 503 => true,
                500 => matches!(body.error_code, Some(607) | Some(610)),
                _ => false,
            },
            NsxError::Transport { .. } | NsxError::Timeout { .. } => true,
            NsxError::Decode { .. } | NsxError::BadRequest { .. } | NsxError::Fenced { .. } => {
                false
            }
        }
    }
}

/// Until when this client may write: the leader's fence (see `ncp::leader`). NSX has no
/// fencing token, so the client enforces it on every attempt: a write is not sent once the
/// fence is down, an attempt in flight is abandoned when it falls, and no retry or re-login
/// happens after it.
pub trait WriteFence: Send + Sync {
    /// The instant writes stop being allowed; `None` when they are not allowed now.
    fn writes_until(&self) -> Option<Instant>;
}

/// A shared view of one client's [`ClientStats`].
#[derive(Debug, Clone, Default)]
pub struct StatsHandle(Arc<Mutex<ClientStats>>);

impl StatsHandle {
    pub fn get(&self) -> ClientStats {
        lock(&self.0).clone()
    }
}

impl ClientStats {
    /// Adds `other`'s counts to these (the clients of several replicas or incarnations).
    pub fn add(&mut self, other: &ClientStats) {
        self.requests += other.requests;
        self.writes += other.writes;
        self.retries += other.retries;
        for (status, n) in &other.by_status {
            *self.by_status.entry(*status).or_default() += n;
        }
        self.transport_errors += other.transport_errors;
        self.sessions_created += other.sessions_created;
        self.failovers += other.failovers;
        self.fenced += other.fenced;
    }
}

/// What the client has sent, for reports and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClientStats {
    pub requests: u64,
    pub writes: u64,
    pub retries: u64,
    pub by_status: BTreeMap<u16, u64>,
    pub transport_errors: u64,
    pub sessions_created: u64,
    /// Moves to another manager after one did not answer.
    pub failovers: u64,
    /// Writes refused or abandoned because the write fence was down.
    pub fenced: u64,
}

#[derive(Debug, Clone)]
struct Session {
    cookie: HeaderValue,
    xsrf: HeaderValue,
}

/// GCRA rate limiter on tokio time (simulated under turmoil).
#[derive(Debug)]
struct RateLimiter {
    interval: Duration,
    tolerance: Duration,
    theoretical_arrival: Option<Instant>,
}

impl RateLimiter {
    fn new(per_second: u32, burst: u32) -> Option<Self> {
        if per_second == 0 {
            return None;
        }
        let interval = Duration::from_secs_f64(1.0 / f64::from(per_second));
        Some(Self {
            interval,
            tolerance: interval * burst.saturating_sub(1),
            theoretical_arrival: None,
        })
    }

    /// Reserves the next slot and says how long to wait for it.
    fn reserve(&mut self, now: Instant) -> Duration {
        let tat = self.theoretical_arrival.unwrap_or(now).max(now);
        let allowed_at = tat.checked_sub(self.tolerance).unwrap_or(now);
        self.theoretical_arrival = Some(tat + self.interval);
        allowed_at.saturating_duration_since(now)
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// The NSX Manager client. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct NsxClient<C> {
    http: Client<C, Full<Bytes>>,
    config: ClientConfig,
    session: Mutex<Option<Session>>,
    rng: Mutex<SeededRng>,
    limiter: Mutex<Option<RateLimiter>>,
    in_flight: Arc<Semaphore>,
    stats: Arc<Mutex<ClientStats>>,
    /// Index into `[base_url] + standby_urls` of the manager in use.
    current: std::sync::atomic::AtomicUsize,
    /// Checked before every attempt of a write (any method but GET).
    fence: Mutex<Option<Arc<dyn WriteFence>>>,
}

impl<C> NsxClient<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    /// A client that opens its connections with `connector` (TLS in production, a turmoil TCP
    /// stream in the simulation).
    pub fn new(connector: C, config: ClientConfig) -> Self {
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Self {
            http,
            rng: Mutex::new(SeededRng::new(config.seed)),
            limiter: Mutex::new(RateLimiter::new(
                config.rate_limit_per_second,
                config.rate_limit_burst,
            )),
            in_flight: Arc::new(Semaphore::new(config.max_concurrent_requests.max(1))),
            session: Mutex::new(None),
            stats: Arc::default(),
            current: std::sync::atomic::AtomicUsize::new(0),
            fence: Mutex::new(None),
            config,
        }
    }

    /// Fences every later write of this client (`None`: unfenced, a single replica).
    pub fn set_write_fence(&self, fence: Option<Arc<dyn WriteFence>>) {
        *lock(&self.fence) = fence;
    }

    /// For a write: the fence's deadline (`None` when unfenced), or `Fenced` when it is down.
    fn write_deadline(&self, op: &str, method: &Method) -> Result<Option<Instant>, NsxError> {
        if *method == Method::GET {
            return Ok(None);
        }
        let Some(fence) = lock(&self.fence).clone() else {
            return Ok(None);
        };
        match fence.writes_until() {
            Some(until) if Instant::now() < until => Ok(Some(until)),
            _ => {
                lock(&self.stats).fenced += 1;
                Err(NsxError::Fenced { op: op.to_string() })
            }
        }
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    pub fn stats(&self) -> ClientStats {
        lock(&self.stats).clone()
    }

    /// The client's counters, readable after the client is gone: a controller that crashes
    /// drops its client, and a harness still reports what it sent.
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle(self.stats.clone())
    }

    /// `GET` a path under `/api/v1` (or an absolute `/api/...` path) as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, NsxError> {
        let v = self.call(Method::GET, path, None).await?;
        decode(&format!("GET {path}"), v)
    }

    /// `POST` a new object (201) or an action (200); the answer decoded as `T`.
    pub async fn create<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, NsxError> {
        let body = to_value(path, body)?;
        let v = self.call(Method::POST, path, Some(body)).await?;
        decode(&format!("POST {path}"), v)
    }

    /// `PUT` a full object; the body must carry the `_revision` it was read at.
    pub async fn update<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, NsxError> {
        let body = to_value(path, body)?;
        let v = self.call(Method::PUT, path, Some(body)).await?;
        decode(&format!("PUT {path}"), v)
    }

    /// `DELETE`; a 404 is reported as an error, and callers that only want the object gone
    /// check [`NsxError::is_not_found`].
    pub async fn delete(&self, path: &str) -> Result<(), NsxError> {
        self.call(Method::DELETE, path, None).await.map(|_| ())
    }

    /// Any method with an optional JSON body; the answer as raw JSON (`Null` for an empty body).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, NsxError> {
        let op = format!("{method} {path}");
        let bytes = match &body {
            Some(v) => Bytes::from(serde_json::to_vec(v).map_err(|e| NsxError::Decode {
                op: op.clone(),
                source: e,
            })?),
            None => Bytes::new(),
        };
        let answer = self.send_with_retries(&op, &method, path, bytes).await?;
        if answer.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&answer.body).map_err(|e| NsxError::Decode { op, source: e })
    }

    /// Read-modify-write with optimistic concurrency: GET, apply `change`, PUT; on 412/409 read
    /// again and re-apply, up to `max_attempts` times. `change` must be idempotent.
    pub async fn update_with<T, F>(&self, path: &str, mut change: F) -> Result<T, NsxError>
    where
        T: DeserializeOwned + Serialize,
        F: FnMut(&mut T),
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut current: T = self.get(path).await?;
            change(&mut current);
            match self.update::<T, T>(path, &current).await {
                Err(e) if e.is_stale_revision() && attempt < self.config.max_attempts => {
                    lock(&self.stats).retries += 1;
                    tracing::debug!(path, attempt, "stale revision, re-reading");
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
                other => return other,
            }
        }
    }

    /// Every object of a collection, following `cursor` page by page.
    pub async fn list_all<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>, NsxError> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        // Bound: a manager that keeps answering with a cursor cannot loop us forever.
        for _ in 0..100_000 {
            let url = match &cursor {
                None => path.to_string(),
                Some(c) => with_query(path, "cursor", c),
            };
            let page: ListResult = self.get(&url).await?;
            let results = page.results.unwrap_or_default();
            let empty = results.is_empty();
            for item in results {
                out.push(decode(&format!("GET {url}"), item)?);
            }
            // Search answers carry a cursor on every page, on the last one the result count
            // (nsxlib stops there); lists leave it out on the last page.
            let at_end = |c: &str| {
                empty
                    || c.parse::<i64>()
                        .is_ok_and(|c| page.result_count.is_some_and(|n| c >= n))
            };
            match page.cursor {
                // nsxlib treats a cursor starting with "0000" as "no more pages"; so do we.
                Some(c) if !c.is_empty() && !c.starts_with("0000") && !at_end(&c) => {
                    cursor = Some(c)
                }
                _ => return Ok(out),
            }
        }
        Err(NsxError::BadRequest {
            op: format!("GET {path}"),
            reason: "pagination did not end after 100000 pages".into(),
        })
    }

    /// Several independent reads in one request, through `POST /api/v1/batch`: one round trip
    /// and one request against the manager's rate limit instead of one per path. The answers
    /// come in the order of `paths`; the first that failed is the error, as if it had been read
    /// alone.
    pub async fn get_many(&self, paths: &[String]) -> Result<Vec<Value>, NsxError> {
        if paths.len() == 1 {
            return Ok(vec![self.get(&paths[0]).await?]);
        }
        let relative = |p: &str| match p.strip_prefix("/api") {
            Some(rest) => rest.to_string(),
            None => format!("/v1/{}", p.trim_start_matches('/')),
        };
        let body = serde_json::json!({
            "continue_on_error": true,
            "requests": paths
                .iter()
                .map(|p| serde_json::json!({"method": "GET", "uri": relative(p)}))
                .collect::<Vec<_>>(),
        });
        let answer = self.call(Method::POST, "batch", Some(body)).await?;
        let results = answer["results"].as_array().cloned().unwrap_or_default();
        if results.len() != paths.len() {
            return Err(NsxError::BadRequest {
                op: "POST batch".into(),
                reason: format!("{} answers to {} requests", results.len(), paths.len()),
            });
        }
        paths
            .iter()
            .zip(results)
            .map(|(path, r)| {
                let code = r["code"].as_u64().unwrap_or(0);
                let body = r.get("body").cloned().unwrap_or(Value::Null);
                if (200..300).contains(&code) {
                    return Ok(body);
                }
                let status = u16::try_from(code).unwrap_or(500);
                let body = serde_json::from_value::<ErrorBody>(body.clone()).unwrap_or_else(|_| {
                    ErrorBody::new(status, i64::from(status), "", body.to_string())
                });
                Err(NsxError::Api {
                    op: format!("GET {path} (in a batch)"),
                    status,
                    body: Box::new(body),
                })
            })
            .collect()
    }

    /// Every result of a search query (2.4 path `/api/v1/search`), following the cursor.
    pub async fn search_all(&self, query: &str) -> Result<Vec<Value>, NsxError> {
        let path = format!("/api/v1/search?query={}&sort_by=id", percent_encode(query));
        self.list_all(&path).await
    }

    /// Creates a session now (otherwise the first request does).
    pub async fn login(&self) -> Result<(), NsxError> {
        self.login_until(None).await
    }

    /// Creates a session, abandoning the attempt at `deadline` (a write's fence).
    async fn login_until(&self, deadline: Option<Instant>) -> Result<(), NsxError> {
        let (user, password) = match &self.config.auth {
            Auth::Session { user, password } => (user.clone(), password.clone()),
            Auth::Basic { .. } | Auth::ClientCertificate => return Ok(()),
        };
        let op = "create a session".to_string();
        let form = format!(
            "j_username={}&j_password={}",
            percent_encode(&user),
            percent_encode(&password)
        );
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.uri(&op, "/api/session/create")?)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| NsxError::BadRequest {
                op: op.clone(),
                reason: e.to_string(),
            })?;
        let answer = self.send_once(&op, req, deadline).await?;
        if !answer.status.is_success() {
            return Err(api_error(&op, &answer));
        }
        let cookie = answer
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| {
                v.split(';')
                    .next()
                    .filter(|kv| kv.trim_start().starts_with("JSESSIONID="))
                    .map(|kv| kv.trim().to_string())
            });
        let xsrf = answer.headers.get("x-xsrf-token").cloned();
        match (cookie, xsrf) {
            (Some(cookie), Some(xsrf)) => {
                let cookie = HeaderValue::from_str(&cookie).map_err(|e| NsxError::BadRequest {
                    op: op.clone(),
                    reason: e.to_string(),
                })?;
                *lock(&self.session) = Some(Session { cookie, xsrf });
                lock(&self.stats).sessions_created += 1;
                Ok(())
            }
            _ => Err(NsxError::BadRequest {
                op,
                reason: "the session answer had no JSESSIONID cookie or X-XSRF-TOKEN".into(),
            }),
        }
    }

    async fn send_with_retries(
        &self,
        op: &str,
        method: &Method,
        path: &str,
        body: Bytes,
    ) -> Result<Answer, NsxError> {
        let mut attempt: u32 = 0;
        let mut relogged = false;
        loop {
            attempt += 1;
            // A write checks the fence before every attempt and every re-login, and each
            // attempt ends when the fence does: a deposed leader sends nothing more.
            let deadline = self.write_deadline(op, method)?;
            if matches!(self.config.auth, Auth::Session { .. })
                && lock(&self.session).is_none()
                && let Err(e) = self.login_until(deadline).await
            {
                if e.is_retryable() && attempt < self.config.max_attempts {
                    self.note_retry(op, attempt, &e, deadline).await?;
                    continue;
                }
                return Err(e);
            }
            let req = self.build(op, method, path, body.clone())?;
            let err = match self.send_once(op, req, deadline).await {
                Ok(answer) if answer.status.is_success() => return Ok(answer),
                Ok(answer) => api_error(op, &answer),
                Err(e) => e,
            };
            if err.status() == Some(403) && err.error_code() == Some(98) && !relogged {
                // Expired session token: log in again and repeat once.
                *lock(&self.session) = None;
                relogged = true;
                continue;
            }
            let transport = matches!(err, NsxError::Transport { .. } | NsxError::Timeout { .. });
            if transport {
                self.fail_over();
            }
            let may_repeat = !transport || *method != Method::POST;
            if err.is_retryable() && may_repeat && attempt < self.config.max_attempts {
                self.note_retry(op, attempt, &err, deadline).await?;
                continue;
            }
            return Err(err);
        }
    }

    /// The manager requests go to now.
    pub fn manager_url(&self) -> &str {
        self.url_at(self.current.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The current manager did not answer: the next one of the cluster takes the requests
    /// (and a new session, which belongs to one manager).
    fn fail_over(&self) {
        let count = 1 + self.config.standby_urls.len();
        if count == 1 {
            return;
        }
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        let next = (i + 1) % count;
        self.current
            .store(next, std::sync::atomic::Ordering::Relaxed);
        *lock(&self.session) = None;
        lock(&self.stats).failovers += 1;
        tracing::warn!(from = %self.url_at(i), to = %self.url_at(next), "NSX Manager did not answer; failing over");
    }

    fn url_at(&self, i: usize) -> &str {
        if i == 0 {
            &self.config.base_url
        } else {
            self.config
                .standby_urls
                .get(i - 1)
                .map_or(&self.config.base_url, String::as_str)
        }
    }

    /// Waits before the next attempt; a fenced write whose fence falls first gives up now.
    async fn note_retry(
        &self,
        op: &str,
        attempt: u32,
        err: &NsxError,
        deadline: Option<Instant>,
    ) -> Result<(), NsxError> {
        let wait = self.backoff(attempt);
        if deadline.is_some_and(|d| Instant::now() + wait >= d) {
            lock(&self.stats).fenced += 1;
            return Err(NsxError::Fenced { op: op.to_string() });
        }
        lock(&self.stats).retries += 1;
        tracing::debug!(op, attempt, error = %err, "retrying NSX request");
        tokio::time::sleep(wait).await;
        Ok(())
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .config
            .backoff_base_ms
            .saturating_mul(1u64 << attempt.min(20).saturating_sub(1))
            .min(self.config.backoff_max_ms);
        Duration::from_millis(lock(&self.rng).range_u64(ceiling / 2, ceiling))
    }

    fn uri(&self, op: &str, path: &str) -> Result<Uri, NsxError> {
        let path = if path.starts_with("/api/") {
            path.to_string()
        } else {
            format!("/api/v1/{}", path.trim_start_matches('/'))
        };
        format!("{}{}", self.manager_url().trim_end_matches('/'), path)
            .parse()
            .map_err(|e: http::uri::InvalidUri| NsxError::BadRequest {
                op: op.to_string(),
                reason: e.to_string(),
            })
    }

    fn build(
        &self,
        op: &str,
        method: &Method,
        path: &str,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, NsxError> {
        let mut b = Request::builder()
            .method(method.clone())
            .uri(self.uri(op, path)?)
            .header(header::ACCEPT, "application/json");
        if let Some(basic) = self.config.auth.basic_header() {
            b = b.header(header::AUTHORIZATION, basic);
        }
        if !body.is_empty() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        if self.config.allow_overwrite {
            b = b.header("X-Allow-Overwrite", "true");
        }
        if let Some(s) = lock(&self.session).clone() {
            b = b
                .header(header::COOKIE, s.cookie)
                .header("X-XSRF-TOKEN", s.xsrf);
        }
        b.body(Full::new(body)).map_err(|e| NsxError::BadRequest {
            op: op.to_string(),
            reason: e.to_string(),
        })
    }

    /// One exchange, abandoned at `deadline` (a write's fence) or after the request timeout.
    async fn send_once(
        &self,
        op: &str,
        req: Request<Full<Bytes>>,
        deadline: Option<Instant>,
    ) -> Result<Answer, NsxError> {
        let wait = {
            let mut limiter = lock(&self.limiter);
            limiter.as_mut().map(|l| l.reserve(Instant::now()))
        };
        let fenced = || {
            lock(&self.stats).fenced += 1;
            NsxError::Fenced { op: op.to_string() }
        };
        if let Some(w) = wait.filter(|w| !w.is_zero()) {
            if deadline.is_some_and(|d| Instant::now() + w >= d) {
                return Err(fenced());
            }
            tokio::time::sleep(w).await;
        }
        let permit = self.in_flight.acquire();
        let permit = match deadline {
            Some(d) => tokio::time::timeout_at(d, permit)
                .await
                .map_err(|_| fenced())?,
            None => permit.await,
        };
        let _permit = permit.map_err(|e| NsxError::Transport {
            op: op.to_string(),
            source: Box::new(e),
        })?;
        let is_write = req.method() != Method::GET;
        {
            let mut s = lock(&self.stats);
            s.requests += 1;
            if is_write {
                s.writes += 1;
            }
        }
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| NsxError::Transport {
                    op: op.to_string(),
                    source: Box::new(e),
                })?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| NsxError::Transport {
                    op: op.to_string(),
                    source: Box::new(e),
                })?
                .to_bytes();
            Ok::<_, NsxError>(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        let cut_by_fence = deadline.is_some_and(|d| d < Instant::now() + timeout);
        let until = deadline.map_or(Instant::now() + timeout, |d| {
            d.min(Instant::now() + timeout)
        });
        let result = match tokio::time::timeout_at(until, exchange).await {
            Ok(r) => r,
            Err(_) if cut_by_fence => Err(fenced()),
            Err(_) => Err(NsxError::Timeout {
                op: op.to_string(),
                timeout_ms: self.config.request_timeout_ms,
            }),
        };
        let mut s = lock(&self.stats);
        match &result {
            Ok(a) => *s.by_status.entry(a.status.as_u16()).or_default() += 1,
            Err(_) => s.transport_errors += 1,
        }
        result
    }
}

fn api_error(op: &str, answer: &Answer) -> NsxError {
    let body = serde_json::from_slice::<ErrorBody>(&answer.body).unwrap_or_else(|_| {
        ErrorBody::new(
            answer.status.as_u16(),
            i64::from(answer.status.as_u16()),
            "",
            String::from_utf8_lossy(&answer.body).into_owned(),
        )
    });
    NsxError::Api {
        op: op.to_string(),
        status: answer.status.as_u16(),
        body: Box::new(body),
    }
}

fn decode<T: DeserializeOwned>(op: &str, v: Value) -> Result<T, NsxError> {
    serde_json::from_value(v).map_err(|e| NsxError::Decode {
        op: op.to_string(),
        source: e,
    })
}

fn to_value<B: Serialize>(path: &str, body: &B) -> Result<Value, NsxError> {
    serde_json::to_value(body).map_err(|e| NsxError::Decode {
        op: format!("encode body for {path}"),
        source: e,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these short critical sections leaves plain data behind,
    // never a broken invariant, so the poison flag carries no information.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Appends `key=value` to a path that may already have a query.
pub fn with_query(path: &str, key: &str, value: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}{key}={}", percent_encode(value))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_statuses_follow_nsxlib() {
        let e = |status, code| NsxError::Api {
            op: "x".into(),
            status,
            body: Box::new(ErrorBody::new(status, code, "m", "msg")),
        };
        assert!(e(429, 102).is_retryable());
        assert!(e(503, 503).is_retryable());
        assert!(e(500, 607).is_retryable());
        assert!(!e(500, 100).is_retryable());
        assert!(!e(400, 255).is_retryable());
        assert!(!e(404, 202).is_retryable());
        assert!(e(412, 208).is_stale_revision());
        assert!(e(409, 0).is_stale_revision());
        assert!(!e(404, 202).is_stale_revision());
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_allows_burst_then_spaces_requests() {
        let mut l = RateLimiter::new(10, 3).unwrap();
        let t0 = Instant::now();
        let waits: Vec<Duration> = (0..6).map(|_| l.reserve(t0)).collect();
        assert_eq!(waits[0], Duration::ZERO);
        assert_eq!(waits[1], Duration::ZERO);
        assert_eq!(waits[2], Duration::ZERO);
        assert!(waits[3] >= Duration::from_millis(99), "{waits:?}");
        assert!(waits[4] > waits[3] && waits[5] > waits[4], "{waits:?}");
        // After a quiet second the burst is available again.
        let later = t0 + Duration::from_secs(2);
        assert_eq!(l.reserve(later), Duration::ZERO);
    }

    #[test]
    fn percent_encoding_keeps_unreserved_only() {
        assert_eq!(percent_encode("a b/c-d"), "a%20b%2Fc-d");
        assert_eq!(with_query("/x?a=1", "cursor", "10"), "/x?a=1&cursor=10");
        assert_eq!(with_query("/x", "cursor", "10"), "/x?cursor=10");
    }
}
