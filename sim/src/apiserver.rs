//! A fake kube-apiserver, faithful enough that kube-rs's `Client`, `watcher`, reflector stores
//! and patch calls work unchanged against it.
//!
//! What it serves, for core/v1 (namespaces, nodes, pods, services, events),
//! discovery.k8s.io/v1 endpointslices, networking.k8s.io/v1 networkpolicies and
//! coordination.k8s.io/v1 leases:
//! - objects with `uid`, `resourceVersion` (one counter for everything, as etcd's revision),
//!   `creationTimestamp`, `generation`;
//! - GET of one object or a list (`limit`/`continue` paging, `labelSelector` with `=`, `!=`,
//!   `key`, `!key`; `fieldSelector` on `metadata.name`, `metadata.namespace`, `spec.nodeName`);
//! - watches (`watch=true`): events after the given `resourceVersion` are replayed from the
//!   history, then live ones follow; without a version, every current object is sent as ADDED
//!   first. A version older than the retained history gets an ERROR event with a 410 `Expired`
//!   Status inside the stream (where kube-rs's watcher expects it, and relists). BOOKMARKs are
//!   sent when asked for; the stream ends after `timeoutSeconds`;
//! - POST (create; 409 AlreadyExists; 404 when the namespace does not exist), PUT (replace;
//!   409 Conflict on a stale `resourceVersion`), PATCH with a JSON merge patch (also for the
//!   `status` subresource), DELETE (deleting a namespace deletes everything in it);
//! - errors as `Status` objects with `reason` and `code`.
//!
//! Fault hooks ([`ApiServer::drop_watches`], [`ApiServer::expire_history`],
//! [`ApiServer::duplicate_next_events`]) reproduce what controllers meet in production:
//! dropped watch connections, 410 Gone on the next watch, repeated events.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, to_bytes};
use axum::extract::{Request, State};
use axum::response::Response;
use http::{HeaderValue, StatusCode, header};
use nsx_core::rng::SeededRng;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

/// A resource the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ResourceDef {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
}

const RESOURCES: &[ResourceDef] = &[
    ResourceDef {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
    },
    ResourceDef {
        group: "",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
    },
    ResourceDef {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
    },
    ResourceDef {
        group: "networking.k8s.io",
        version: "v1",
        plural: "networkpolicies",
        kind: "NetworkPolicy",
        namespaced: true,
    },
    ResourceDef {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
    },
];

impl ResourceDef {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// One change, as a watch sends it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    plural: &'static str,
    event: &'static str,
    object: Value,
}

type ObjKey = (&'static str, String, String);

struct Inner {
    objects: BTreeMap<ObjKey, Value>,
    rv: u64,
    history: VecDeque<Change>,
    history_max: usize,
    /// Every change at or below this version has been forgotten.
    compacted_rv: u64,
    rng: SeededRng,
    duplicate_next: usize,
    clock: Arc<dyn Fn() -> i64 + Send + Sync>,
    /// Requests served, by method and resource: the report reads it.
    requests: BTreeMap<String, u64>,
    /// Every request: simulated time, method, path and query, status; bounded.
    log: VecDeque<String>,
}

/// Changes a watch may fall behind by before it is ended (the client then watches again from
/// its last resourceVersion, from the history: a lag costs a re-watch, never an event). Tokio's
/// broadcast channel allocates every slot up front, for every world: 65,536 slots were a
/// measurable share of a short scenario's setup and teardown.
const CHANGE_BUFFER: usize = 8_192;

/// A handle on the fake apiserver; clones share it.
#[derive(Clone)]
pub struct ApiServer {
    inner: Arc<Mutex<Inner>>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch.
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    bookmark_interval: Duration,
}

/// A Kubernetes API error.
#[derive(Debug, Clone)]
pub struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }
    fn not_found(kind: &str, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", kind.to_lowercase()),
        )
    }
    /// 409 Conflict: "Operation cannot be fulfilled on <plural> "<name>": <why>".
    fn conflict(plural: &str, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {plural} \"{name}\": {why}"),
        )
    }
    fn status(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code})
    }
}

/// RFC 3339 UTC time from milliseconds since the epoch (no calendar crate needed).
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("made an object above");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn labels_match(obj: &Value, selector: &str) -> bool {
    let labels = obj["metadata"]["labels"].as_object();
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    selector
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .all(|req| {
            if let Some((k, v)) = req.split_once("!=") {
                get(k.trim()) != Some(v.trim())
            } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                get(k.trim()) == Some(v.trim())
            } else if let Some(k) = req.strip_prefix('!') {
                get(k.trim()).is_none()
            } else {
                get(req).is_some()
            }
        })
}

fn fields_match(obj: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .all(|req| {
            let (k, v, neg) = match req.split_once("!=") {
                Some((k, v)) => (k, v, true),
                None => match req.split_once("==").or_else(|| req.split_once('=')) {
                    Some((k, v)) => (k, v, false),
                    None => return false,
                },
            };
            let actual = match k.trim() {
                "metadata.name" => obj["metadata"]["name"].as_str(),
                "metadata.namespace" => obj["metadata"]["namespace"].as_str(),
                "spec.nodeName" => obj["spec"]["nodeName"].as_str(),
                _ => return false,
            };
            (actual.unwrap_or("") == v.trim()) != neg
        })
}

struct Query(Vec<(String, String)>);

impl Query {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }
    fn matches(&self, obj: &Value) -> bool {
        self.get("labelSelector")
            .is_none_or(|s| labels_match(obj, s))
            && self
                .get("fieldSelector")
                .is_none_or(|s| fields_match(obj, s))
    }
}

/// The parsed path: which resource, which namespace, which object, which subresource.
struct Target {
    def: ResourceDef,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let find = |plural: &str| {
        RESOURCES
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
            .copied()
    };
    let t = |def, ns: Option<&str>, name: Option<&str>, sub: Option<&str>| Target {
        def,
        namespace: ns.map(str::to_string),
        name: name.map(str::to_string),
        subresource: sub.map(str::to_string),
    };
    match rest {
        [plural] => Some(t(find(plural)?, None, None, None)),
        ["namespaces", ns, plural] => Some(t(find(plural)?, Some(*ns), None, None)),
        ["namespaces", ns, plural, name] => Some(t(find(plural)?, Some(*ns), Some(*name), None)),
        ["namespaces", ns, plural, name, sub] => {
            Some(t(find(plural)?, Some(*ns), Some(*name), Some(*sub)))
        }
        [plural, name] => Some(t(find(plural)?, None, Some(*name), None)),
        [plural, name, sub] => Some(t(find(plural)?, None, Some(*name), Some(*sub))),
        _ => None,
    }
}

impl ApiServer {
    /// A fresh apiserver. `clock` gives milliseconds since the epoch (simulated time in the
    /// harness); `seed` drives UIDs.
    pub fn new(seed: u64, clock: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        let (changes, _) = broadcast::channel(CHANGE_BUFFER);
        let (generation, _) = tokio::sync::watch::channel(0);
        Self {
            inner: Arc::new(Mutex::new(Inner {
                objects: BTreeMap::new(),
                rv: 1,
                history: VecDeque::new(),
                history_max: 100_000,
                compacted_rv: 0,
                rng: SeededRng::new(seed),
                duplicate_next: 0,
                clock: Arc::new(clock),
                requests: BTreeMap::new(),
                log: VecDeque::new(),
            })),
            changes,
            generation: Arc::new(generation),
            bookmark_interval: Duration::from_secs(10),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The axum app.
    pub fn router(&self) -> Router {
        Router::new().fallback(handle).with_state(self.clone())
    }

    /// Ends every open watch (the connection drops; clients re-watch from their version).
    pub fn drop_watches(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Forgets the history: the next watch from any earlier version gets 410 Gone.
    pub fn expire_history(&self) {
        let mut g = self.lock();
        // Compact past every version a client can hold, so any watch from one is too old.
        g.rv += 1;
        g.compacted_rv = g.rv;
        g.history.clear();
        drop(g);
        self.drop_watches();
    }

    /// The next `n` changes are delivered twice to every watch.
    pub fn duplicate_next_events(&self, n: usize) {
        self.lock().duplicate_next = n;
    }

    /// The latest resourceVersion: changes whenever any object changes.
    pub fn revision(&self) -> u64 {
        self.lock().rv
    }

    /// Requests served so far, by `METHOD resource`.
    pub fn request_counts(&self) -> BTreeMap<String, u64> {
        self.lock().requests.clone()
    }

    /// Every stored object of a resource (`"pods"`, `"namespaces"`, ...), in key order.
    pub fn list(&self, plural: &str) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|((p, _, _), _)| *p == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Visits every stored object of a resource in key order, without copying them (the
    /// harness's checks read the whole cluster often); stops at the first error.
    pub fn try_each<E>(
        &self,
        plural: &str,
        mut f: impl FnMut(&Value) -> Result<(), E>,
    ) -> Result<(), E> {
        let Some(def) = RESOURCES.iter().find(|r| r.plural == plural) else {
            return Ok(());
        };
        let g = self.lock();
        let from = (def.plural, String::new(), String::new());
        for ((p, _, _), v) in g.objects.range(from..) {
            if *p != def.plural {
                break;
            }
            f(v)?;
        }
        Ok(())
    }

    pub fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let def = RESOURCES.iter().find(|r| r.plural == plural)?;
        self.lock()
            .objects
            .get(&(def.plural, namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Creates or replaces an object as an admin (kubectl apply). Returns the stored object.
    pub fn apply(&self, obj: Value) -> Result<Value, String> {
        let kind = obj["kind"].as_str().unwrap_or("").to_string();
        let def = *RESOURCES
            .iter()
            .find(|r| r.kind == kind)
            .ok_or(format!("kind {kind:?} is not served"))?;
        let ns = if def.namespaced {
            Some(
                obj["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string(),
            )
        } else {
            None
        };
        let name = obj["metadata"]["name"]
            .as_str()
            .ok_or("metadata.name is required")?
            .to_string();
        let existing = self.get(def.plural, ns.as_deref().unwrap_or(""), &name);
        let r = match existing {
            None => self.create(def, ns.as_deref(), obj),
            Some(cur) => {
                let mut o = obj;
                o["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"].clone();
                self.replace(def, ns.as_deref(), &name, o)
            }
        };
        r.map_err(|e| e.message)
    }

    /// Deletes an object as an admin.
    pub fn delete(&self, plural: &str, namespace: &str, name: &str) -> Result<Value, String> {
        let def = *RESOURCES
            .iter()
            .find(|r| r.plural == plural)
            .ok_or(format!("{plural} is not served"))?;
        let ns = def.namespaced.then_some(namespace);
        self.remove(def, ns, name).map_err(|e| e.message)
    }

    /// Changes an object with a merge patch, as another client would.
    pub fn patch(
        &self,
        plural: &str,
        namespace: &str,
        name: &str,
        patch: &Value,
    ) -> Result<Value, String> {
        let def = *RESOURCES
            .iter()
            .find(|r| r.plural == plural)
            .ok_or(format!("{plural} is not served"))?;
        let ns = def.namespaced.then_some(namespace);
        self.merge(def, ns, name, patch, None)
            .map_err(|e| e.message)
    }

    fn record(&self, g: &mut Inner, plural: &'static str, event: &'static str, object: Value) {
        let change = Change {
            rv: g.rv,
            plural,
            event,
            object,
        };
        g.history.push_back(change.clone());
        while g.history.len() > g.history_max {
            if let Some(c) = g.history.pop_front() {
                g.compacted_rv = c.rv;
            }
        }
        let times = if g.duplicate_next > 0 {
            g.duplicate_next -= 1;
            2
        } else {
            1
        };
        for _ in 0..times {
            let _ = self.changes.send(change.clone());
        }
    }

    fn create(
        &self,
        def: ResourceDef,
        ns: Option<&str>,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        let mut g = self.lock();
        let name = obj["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .map(str::to_string);
        let name = match name {
            Some(n) => n,
            None => match obj["metadata"]["generateName"].as_str() {
                Some(prefix) => format!("{prefix}{:05x}", g.rng.next_u64() & 0xfffff),
                None => {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        format!("{}: metadata.name: Required value", def.kind),
                    ));
                }
            },
        };
        if let Some(ns) = ns
            && !g
                .objects
                .contains_key(&("namespaces", String::new(), ns.to_string()))
        {
            return Err(ApiError::not_found("namespaces", ns));
        }
        let key = (def.plural, ns.unwrap_or("").to_string(), name.clone());
        if g.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", def.plural),
            ));
        }
        g.rv += 1;
        let now = (g.clock)();
        let uid = g.rng.uuid();
        let m = obj["metadata"]
            .as_object_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        let mut meta = m;
        meta.insert("name".into(), json!(name));
        if let Some(ns) = ns {
            meta.insert("namespace".into(), json!(ns));
        }
        meta.insert("uid".into(), json!(uid));
        meta.insert("resourceVersion".into(), json!(g.rv.to_string()));
        meta.insert("creationTimestamp".into(), json!(rfc3339(now)));
        meta.insert("generation".into(), json!(1));
        obj["metadata"] = Value::Object(meta);
        obj["apiVersion"] = json!(def.api_version());
        obj["kind"] = json!(def.kind);
        if def.plural == "namespaces" {
            obj["status"] = json!({"phase": "Active"});
        }
        g.objects.insert(key, obj.clone());
        self.record(&mut g, def.plural, "ADDED", obj.clone());
        Ok(obj)
    }

    fn replace(
        &self,
        def: ResourceDef,
        ns: Option<&str>,
        name: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        let mut g = self.lock();
        let key = (def.plural, ns.unwrap_or("").to_string(), name.to_string());
        let cur = g
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(def.plural, name))?;
        let given = obj["metadata"]["resourceVersion"].as_str().unwrap_or("");
        if !given.is_empty() && given != cur["metadata"]["resourceVersion"].as_str().unwrap_or("") {
            return Err(ApiError::conflict(
                def.plural,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        g.rv += 1;
        for k in ["uid", "creationTimestamp", "namespace", "name"] {
            obj["metadata"][k] = cur["metadata"][k].clone();
        }
        let generation = cur["metadata"]["generation"].as_i64().unwrap_or(1)
            + i64::from(obj.get("spec") != cur.get("spec"));
        obj["metadata"]["generation"] = json!(generation);
        obj["metadata"]["resourceVersion"] = json!(g.rv.to_string());
        obj["apiVersion"] = json!(def.api_version());
        obj["kind"] = json!(def.kind);
        g.objects.insert(key, obj.clone());
        self.record(&mut g, def.plural, "MODIFIED", obj.clone());
        Ok(obj)
    }

    fn merge(
        &self,
        def: ResourceDef,
        ns: Option<&str>,
        name: &str,
        patch: &Value,
        sub: Option<&str>,
    ) -> Result<Value, ApiError> {
        // A merge patch of an object is an object; its metadata an object; kind and
        // apiVersion are the object's (as the apiserver, which refuses anything else with 400
        // or 422 and changes nothing).
        if !patch.is_object() {
            return Err(ApiError::new(
                400,
                "BadRequest",
                format!("the patch must be a JSON object, not {patch}"),
            ));
        }
        if patch.get("metadata").is_some_and(|m| !m.is_object()) {
            return Err(ApiError::new(
                422,
                "Invalid",
                "metadata in the patch must be an object",
            ));
        }
        let mut g = self.lock();
        let key = (def.plural, ns.unwrap_or("").to_string(), name.to_string());
        let cur = g
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(def.plural, name))?;
        for k in ["kind", "apiVersion"] {
            if let Some(v) = patch.get(k)
                && Some(v) != cur.get(k)
            {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "{k} cannot be changed by a patch (is {}, patch says {v})",
                        cur[k]
                    ),
                ));
            }
        }
        if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
            && rv != cur["metadata"]["resourceVersion"].as_str().unwrap_or("")
        {
            return Err(ApiError::conflict(
                def.plural,
                name,
                "the object has been modified",
            ));
        }
        // A uid in the patch is a precondition: a patch meant for an object that was deleted
        // and recreated under the same name must not land on the new one.
        if let Some(uid) = patch["metadata"]["uid"].as_str()
            && uid != cur["metadata"]["uid"].as_str().unwrap_or("")
        {
            return Err(ApiError::conflict(
                def.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    cur["metadata"]["uid"].as_str().unwrap_or("")
                ),
            ));
        }
        let mut next = cur.clone();
        match sub {
            Some("status") if patch.get("status").is_some_and(|s| !s.is_object()) => {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "status in the patch must be an object",
                ));
            }
            Some("status") => merge_patch(&mut next["status"], &patch["status"]),
            Some(other) => {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    format!("subresource {other} is not served"),
                ));
            }
            None => {
                let mut p = patch.clone();
                // Identity fields cannot change through a patch.
                for k in [
                    "uid",
                    "name",
                    "namespace",
                    "creationTimestamp",
                    "resourceVersion",
                ] {
                    if let Some(m) = p.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.remove(k);
                    }
                }
                merge_patch(&mut next, &p);
            }
        }
        if next == cur {
            return Ok(cur);
        }
        g.rv += 1;
        if next.get("spec") != cur.get("spec") {
            next["metadata"]["generation"] =
                json!(cur["metadata"]["generation"].as_i64().unwrap_or(1) + 1);
        }
        next["metadata"]["resourceVersion"] = json!(g.rv.to_string());
        g.objects.insert(key, next.clone());
        self.record(&mut g, def.plural, "MODIFIED", next.clone());
        Ok(next)
    }

    fn remove(&self, def: ResourceDef, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        let mut g = self.lock();
        let key = (def.plural, ns.unwrap_or("").to_string(), name.to_string());
        let mut cur = g
            .objects
            .remove(&key)
            .ok_or_else(|| ApiError::not_found(def.plural, name))?;
        if def.plural == "namespaces" {
            let inside: Vec<ObjKey> = g
                .objects
                .keys()
                .filter(|(_, n, _)| n == name)
                .cloned()
                .collect();
            for k in inside {
                if let Some(mut o) = g.objects.remove(&k) {
                    g.rv += 1;
                    o["metadata"]["resourceVersion"] = json!(g.rv.to_string());
                    self.record(&mut g, k.0, "DELETED", o);
                }
            }
        }
        g.rv += 1;
        cur["metadata"]["resourceVersion"] = json!(g.rv.to_string());
        self.record(&mut g, def.plural, "DELETED", cur.clone());
        Ok(cur)
    }

    fn list_body(&self, def: ResourceDef, ns: Option<&str>, q: &Query) -> Result<Value, ApiError> {
        let g = self.lock();
        let (list_rv, offset) = match q.get("continue").filter(|c| !c.is_empty()) {
            None => (g.rv, 0usize),
            Some(c) => {
                let (rv, off) = c.split_once(':').ok_or_else(|| {
                    ApiError::new(400, "BadRequest", format!("invalid continue token {c}"))
                })?;
                (rv.parse().unwrap_or(g.rv), off.parse().unwrap_or(0))
            }
        };
        let items: Vec<Value> = g
            .objects
            .iter()
            .filter(|((p, n, _), _)| *p == def.plural && ns.is_none_or(|ns| n == ns))
            .map(|(_, v)| v)
            .filter(|v| q.matches(v))
            .cloned()
            .collect();
        let limit = q
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let end = offset.saturating_add(limit).min(items.len());
        let page: Vec<Value> = items[offset.min(items.len())..end].to_vec();
        let mut meta = json!({"resourceVersion": list_rv.to_string()});
        if end < items.len() {
            meta["continue"] = json!(format!("{list_rv}:{end}"));
            meta["remainingItemCount"] = json!(items.len() - end);
        }
        Ok(
            json!({"kind": format!("{}List", def.kind), "apiVersion": def.api_version(), "metadata": meta, "items": page}),
        )
    }

    fn count(&self, key: String) {
        *self.lock().requests.entry(key).or_default() += 1;
    }

    fn log_request(&self, line: String) {
        let mut g = self.lock();
        let ms = (g.clock)();
        if g.log.len() >= 100_000 {
            g.log.pop_front();
        }
        g.log.push_back(format!("{ms} {line}"));
    }

    /// The request log (`<epoch ms> <METHOD> <path?query> -> <status>`), oldest first.
    pub fn request_log(&self) -> Vec<String> {
        self.lock().log.iter().cloned().collect()
    }

    /// A watch stream: history after `rv` (or every current object as ADDED), then live changes.
    fn watch(&self, def: ResourceDef, ns: Option<String>, q: Query) -> Response {
        let mut live = self.changes.subscribe();
        let mut gen_rx = self.generation.subscribe();
        let start_gen = *gen_rx.borrow_and_update();
        let (initial, snapshot_rv, expired) = {
            let g = self.lock();
            let from = q
                .get("resourceVersion")
                .and_then(|r| r.parse::<u64>().ok())
                .filter(|r| *r > 0);
            let in_scope = |plural: &str, obj: &Value| {
                plural == def.plural
                    && ns
                        .as_deref()
                        .is_none_or(|n| obj["metadata"]["namespace"].as_str() == Some(n))
                    && q.matches(obj)
            };
            match from {
                Some(rv) if rv < g.compacted_rv => (Vec::new(), rv, true),
                // A relist returns the current version, which is never too old.
                Some(rv) => {
                    let events: Vec<Value> = g
                        .history
                        .iter()
                        .filter(|c| c.rv > rv && in_scope(c.plural, &c.object))
                        .map(|c| json!({"type": c.event, "object": c.object}))
                        .collect();
                    (events, g.rv.max(rv), false)
                }
                None => {
                    let events = g
                        .objects
                        .iter()
                        .filter(|((p, _, _), o)| in_scope(p, o))
                        .map(|(_, o)| json!({"type": "ADDED", "object": o}))
                        .collect();
                    (events, g.rv, false)
                }
            }
        };
        let mut last_rv = snapshot_rv;
        let bookmarks = q.get("allowWatchBookmarks") == Some("true");
        let timeout = Duration::from_secs(
            q.get("timeoutSeconds")
                .and_then(|t| t.parse().ok())
                .unwrap_or(1800),
        );
        let deadline = tokio::time::Instant::now() + timeout;
        let interval = self.bookmark_interval;
        let kind = def.kind;
        let api_version = def.api_version();
        let line = |v: Value| -> Result<Bytes, Infallible> {
            let mut b = serde_json::to_vec(&v).unwrap_or_default();
            b.push(b'\n');
            Ok(Bytes::from(b))
        };
        let stream = async_stream(move |tx| async move {
            if expired {
                let status = ApiError::new(410, "Expired", "too old resource version").status();
                let _ = tx
                    .send(line(json!({"type": "ERROR", "object": status})))
                    .await;
                return;
            }
            for e in initial {
                if tx.send(line(e)).await.is_err() {
                    return;
                }
            }
            let mut next_bookmark = tokio::time::Instant::now() + interval;
            loop {
                tokio::select! {
                biased;
                    _ = tokio::time::sleep_until(deadline) => return,
                    r = gen_rx.changed() => {
                        if r.is_err() || *gen_rx.borrow() != start_gen {
                            return;
                        }
                    }
                    _ = tokio::time::sleep_until(next_bookmark), if bookmarks => {
                        next_bookmark = tokio::time::Instant::now() + interval;
                        let bm = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": last_rv.to_string()}}});
                        if tx.send(line(bm)).await.is_err() {
                            return;
                        }
                    }
                    c = live.recv() => match c {
                        // The snapshot covered everything up to its version; a deliberate
                        // duplicate is a second copy of a newer change and goes out twice.
                        Ok(c) if c.plural != def.plural || c.rv <= snapshot_rv => {}
                        Ok(c) => {
                            last_rv = last_rv.max(c.rv);
                            let in_ns = ns.as_deref().is_none_or(|n| c.object["metadata"]["namespace"].as_str() == Some(n));
                            if in_ns && q.matches(&c.object) && tx.send(line(json!({"type": c.event, "object": c.object}))).await.is_err() {
                                return;
                            }
                        }
                        // Lagged or closed: end the watch; the client re-watches.
                        Err(_) => return,
                    }
                }
            }
        });
        let mut r = Response::new(Body::from_stream(stream));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}

/// A stream fed by an async producer through a small channel (no extra crate).
fn async_stream<F, Fut>(producer: F) -> impl futures::Stream<Item = Result<Bytes, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(producer(tx));
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

fn reply(status: u16, body: &Value) -> Response {
    let mut r = Response::new(Body::from(serde_json::to_vec(body).unwrap_or_default()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn err(e: ApiError) -> Response {
    reply(e.code, &e.status())
}

async fn handle(State(api): State<ApiServer>, req: Request) -> Response {
    let method = req.method().to_string();
    let target = req.uri().to_string();
    let resp = serve_request(&api, req).await;
    api.log_request(format!("{method} {target} -> {}", resp.status().as_u16()));
    resp
}

async fn serve_request(api: &ApiServer, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let q = Query(
        form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect(),
    );
    let bytes = match to_bytes(body, 16 << 20).await {
        Ok(b) => b,
        Err(e) => {
            return err(ApiError::new(
                400,
                "BadRequest",
                format!("failed to read the body: {e}"),
            ));
        }
    };
    let Some(t) = parse_path(&path) else {
        return err(ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        ));
    };
    let method = parts.method.as_str().to_string();
    let watching = matches!(q.get("watch"), Some("true") | Some("1"));
    api.count(format!(
        "{} {}{}",
        if watching { "WATCH" } else { &method },
        t.def.plural,
        if t.subresource.is_some() {
            "/status"
        } else {
            ""
        }
    ));
    if t.def.namespaced && t.name.is_some() && t.namespace.is_none() {
        return err(ApiError::new(
            404,
            "NotFound",
            format!("{} must be addressed within a namespace", t.def.plural),
        ));
    }
    let ns = if t.def.namespaced {
        t.namespace.clone()
    } else {
        None
    };
    let body_json = || -> Result<Value, ApiError> {
        serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(
                400,
                "BadRequest",
                format!("the body is not valid JSON: {e}"),
            )
        })
    };
    let result = match (method.as_str(), &t.name) {
        ("GET", None) if watching => return api.watch(t.def, ns, q),
        ("GET", None) => api.list_body(t.def, ns.as_deref(), &q),
        ("GET", Some(name)) => {
            let key = (t.def.plural, ns.clone().unwrap_or_default(), name.clone());
            api.lock()
                .objects
                .get(&key)
                .cloned()
                .ok_or_else(|| ApiError::not_found(t.def.plural, name))
        }
        ("POST", None) => body_json().and_then(|b| {
            if t.def.namespaced && ns.is_none() {
                return Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "create needs a namespace in the path",
                ));
            }
            let body_ns = b["metadata"]["namespace"].as_str();
            if body_ns.is_some_and(|n| Some(n) != ns.as_deref()) {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    "the namespace of the object does not match the namespace of the request",
                ));
            }
            api.create(t.def, ns.as_deref(), b).map(|o| {
                // 201 Created.
                json!({"__created": o})
            })
        }),
        ("PUT", Some(name)) => body_json().and_then(|b| api.replace(t.def, ns.as_deref(), name, b)),
        ("PATCH", Some(name)) => {
            let ct = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !(ct.starts_with("application/merge-patch+json")
                || ct.starts_with("application/strategic-merge-patch+json"))
            {
                Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json (got {ct})"
                    ),
                ))
            } else {
                body_json().and_then(|b| {
                    api.merge(t.def, ns.as_deref(), name, &b, t.subresource.as_deref())
                })
            }
        }
        ("DELETE", Some(name)) => api.remove(t.def, ns.as_deref(), name),
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {path}"),
        )),
    };
    match result {
        Ok(mut v) => match v.get_mut("__created").map(Value::take) {
            Some(created) => reply(201, &created),
            None => reply(200, &v),
        },
        Err(e) => err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_600_000), "2026-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn a_patch_that_is_not_an_object_or_changes_the_kind_is_refused_and_changes_nothing() {
        // Found by the apiserver_patch fuzz target: a patch of `0` replaced the whole object
        // and the next line indexed its metadata (a panic in the handler).
        let api = ApiServer::new(1, || 0);
        api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}))
            .unwrap();
        let before = api.get("namespaces", "", "a").unwrap();
        for patch in [
            json!(0),
            json!(null),
            json!([1]),
            json!("x"),
            json!({"metadata": 5}),
            json!({"metadata": null}),
            json!({"kind": "Pod"}),
            json!({"apiVersion": "v2"}),
        ] {
            let e = api
                .patch("namespaces", "", "a", &patch)
                .expect_err(&patch.to_string());
            assert!(!e.is_empty());
            assert_eq!(api.get("namespaces", "", "a").unwrap(), before, "{patch}");
        }
        api.patch(
            "namespaces",
            "",
            "a",
            &json!({"metadata": {"labels": {"x": "1"}}}),
        )
        .unwrap();
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
        let mut t = json!({"a": [1, 2]});
        merge_patch(&mut t, &json!({"a": [3]}));
        assert_eq!(t, json!({"a": [3]}));
    }

    #[test]
    fn selectors_match_labels_and_fields() {
        let o = json!({"metadata": {"name": "p", "namespace": "n", "labels": {"app": "web", "tier": "f"}}, "spec": {"nodeName": "node-1"}});
        assert!(labels_match(&o, "app=web,tier"));
        assert!(labels_match(&o, "app!=db,!missing"));
        assert!(!labels_match(&o, "app=db"));
        assert!(fields_match(
            &o,
            "spec.nodeName=node-1,metadata.namespace=n"
        ));
        assert!(!fields_match(&o, "spec.nodeName!=node-1"));
        assert!(!fields_match(&o, "status.phase=Running"));
    }

    #[test]
    fn paths_parse_to_resources() {
        let t = parse_path("/api/v1/namespaces/shop/pods/web-1/status").unwrap();
        assert_eq!(
            (
                t.def.plural,
                t.namespace.as_deref(),
                t.name.as_deref(),
                t.subresource.as_deref()
            ),
            ("pods", Some("shop"), Some("web-1"), Some("status"))
        );
        let t = parse_path("/api/v1/namespaces/shop").unwrap();
        assert_eq!(
            (t.def.plural, t.name.as_deref()),
            ("namespaces", Some("shop"))
        );
        let t =
            parse_path("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/ncp").unwrap();
        assert_eq!(t.def.kind, "Lease");
        assert!(parse_path("/apis/apps/v1/deployments").is_none());
    }
}
