//! The scenario file: its schema, and loading it into a validated
//! [`Scenario`]. Every mistake is reported with the file, the line and what is wrong; unknown
//! keys are errors, in the scenario and in the Kubernetes manifests it carries.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_saphyr::Spanned;

/// A scenario file that cannot be used, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ScenarioError {
    pub file: String,
    pub line: Option<u64>,
    pub message: String,
}

/// A scenario, validated.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub seed: Option<u64>,
    pub file: PathBuf,
    pub cluster: Cluster,
    pub nsx: Nsx,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub name: String,
    pub nodes: Vec<String>,
    pub ip_block: String,
    pub subnet_prefix: u8,
    /// NCP's `[coe] enable_snat`: false gives no namespace a SNAT rule.
    pub enable_snat: bool,
    /// NCP's `[nsx_v3] pool_algorithm`, `service_size` and `l4_persistence`.
    pub lb: nsx_core::ncp::desired::LbSettings,
    pub snat_pool: String,
    pub lb_pool: String,
    pub service_cidr: String,
    pub ncp_replicas: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Nsx {
    pub rate_limit: u32,
    pub concurrency_limit: u32,
    pub latency_ms: u64,
    pub search_lag_ms: u64,
    /// NSX objects to create before NCP starts.
    pub preload: Vec<Value>,
}

/// One step, with the line it starts on (for failure reports).
#[derive(Debug, Clone)]
pub struct Step {
    pub line: u64,
    pub kind: StepKind,
}

#[derive(Debug, Clone)]
pub enum StepKind {
    /// Manifests, parsed and checked.
    Apply(Vec<Value>),
    Delete(ObjectRef),
    /// Advance simulated time by a duration in `min..=max` (equal for a fixed wait), drawn
    /// from the seed and the step's line.
    Wait {
        min: u64,
        max: u64,
    },
    Converge(u64),
    Fault(Fault),
    /// `None`: heal everything.
    Heal(Option<Fault>),
    Expect(Box<Expect>),
    Snapshot(String),
}

impl StepKind {
    /// The step's name as the file spells it.
    pub fn name(&self) -> &'static str {
        match self {
            StepKind::Apply(_) => "apply",
            StepKind::Delete(_) => "delete",
            StepKind::Wait { .. } => "wait",
            StepKind::Converge(_) => "converge",
            StepKind::Fault(_) => "fault",
            StepKind::Heal(_) => "heal",
            StepKind::Expect(_) => "expect",
            StepKind::Snapshot(_) => "snapshot",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectRef {
    pub kind: String,
    #[serde(default)]
    pub namespace: Option<String>,
    pub name: String,
}

/// A fault, as written (host names checked against the cluster).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    Partition(Vec<String>),
    Hold(Vec<String>),
    NsxErrors(NsxErrors),
    Latency(Latency),
    Crash(String),
    Restart(String),
    RestartOvs(String),
    RestartAgent(String),
    WatchDisconnect(String),
    CrashAfterWrites(CrashAfterWrites),
    AdminEdit(AdminEdit),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NsxErrors {
    pub status: u16,
    #[serde(default = "one")]
    pub rate: f64,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub error_code: Option<i64>,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    pub between: Vec<String>,
    #[serde(deserialize_with = "duration")]
    pub min: u64,
    #[serde(deserialize_with = "duration")]
    pub max: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrashAfterWrites {
    pub host: String,
    pub writes: u64,
}

/// Someone else changes or deletes one of NCP's objects in NSX.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminEdit {
    /// NSX `resource_type` (`LogicalPort`, `FirewallSection`, ...).
    pub resource_type: String,
    /// The object whose `display_name` contains this text (the first in id order).
    pub name_contains: String,
    #[serde(default)]
    pub delete: bool,
    /// Fields to overwrite (a JSON merge patch on the object) when not deleting.
    #[serde(default)]
    pub set: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    #[serde(default)]
    pub converged: Option<bool>,
    #[serde(default)]
    pub invariants: Option<bool>,
    #[serde(default)]
    pub nsx: Option<NsxExpect>,
    #[serde(default)]
    pub api_calls: Option<ApiCalls>,
    #[serde(default)]
    pub connectivity: Vec<Connectivity>,
    #[serde(default)]
    pub reachability: Option<Reachability>,
    /// Every pod pair on every declared port (and one undeclared) as the NetworkPolicy oracle
    /// says (`true`), checked against the traced dataplane.
    #[serde(default)]
    pub policy_oracle: Option<bool>,
    /// What the kubelet reports of pods (readiness, container restarts).
    #[serde(default)]
    pub pods: Vec<PodExpect>,
    /// What NCP wrote on services (the VIP in the status, the error annotation, Events).
    #[serde(default)]
    pub services: Vec<ServiceExpect>,
}

/// `{service: ns/name, ingress: IP | null, lb_error: CODE | null, warning: TEXT}`: the
/// service's `status.loadBalancer.ingress[0].ip` (null: none), its `ncp/error.loadbalancer`
/// annotation (null: none), and a Warning Event on it whose message contains `warning`. A
/// key left out is not checked.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceExpect {
    pub service: String,
    #[serde(default, deserialize_with = "present")]
    pub ingress: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    pub lb_error: Option<Option<String>>,
    #[serde(default)]
    pub warning: Option<String>,
}

/// A key that is there, null or not (`Some(None)` for null); `None` when left out.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// `{pod: ns/name, ready: true, min_restarts: 1, max_restarts: 0}`: the pod's `Ready`
/// condition, and the sum of its containers' `restartCount`, as the pod's status says.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodExpect {
    pub pod: String,
    #[serde(default)]
    pub ready: Option<bool>,
    #[serde(default)]
    pub min_restarts: Option<u32>,
    #[serde(default)]
    pub max_restarts: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NsxExpect {
    #[serde(default)]
    pub count: BTreeMap<String, usize>,
    #[serde(default)]
    pub untouched: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiCalls {
    #[serde(default)]
    pub max: Option<u64>,
    #[serde(default)]
    pub writes_max: Option<u64>,
    /// The requests since the previous expect went from the first to the last within this
    /// many times what NSX's rate limit allows for them (count / `nsx.rate_limit`): how well
    /// NCP uses its request budget. Needs a rate limit.
    #[serde(default)]
    pub rate_bound_factor_max: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connectivity {
    pub from: String,
    pub to: String,
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
    pub allowed: bool,
    #[serde(default)]
    pub backends: Option<Vec<String>>,
    #[serde(default)]
    pub snat: Option<bool>,
    /// Every connection from this source reaches the same backend (session affinity).
    #[serde(default)]
    pub sticky: bool,
    /// The pod reached sees the client's own address (`true`), or a translated one (`false`:
    /// the node's under `externalTrafficPolicy: Cluster`, a load balancer's SNAT).
    #[serde(default)]
    pub client_ip_kept: Option<bool>,
}

fn tcp() -> String {
    "TCP".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reachability {
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
    pub table: String,
}

/// The parsed matrix: sources, destinations, `allowed[row][col]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matrix {
    pub columns: Vec<String>,
    pub rows: Vec<(String, Vec<bool>)>,
}

impl Reachability {
    pub fn matrix(&self) -> Result<Matrix, String> {
        let mut lines = self.table.lines().filter(|l| !l.trim().is_empty());
        let header = lines.next().ok_or("the table is empty")?;
        let mut head = header.split_whitespace();
        if head.next() != Some("-") {
            return Err("the table's first row must start with `-`".into());
        }
        let columns: Vec<String> = head.map(str::to_string).collect();
        let mut rows = Vec::new();
        for l in lines {
            let mut cells = l.split_whitespace();
            let src = cells.next().unwrap_or_default().to_string();
            let marks: Vec<&str> = cells.collect();
            if marks.len() != columns.len() {
                return Err(format!(
                    "row {src} has {} cells for {} columns",
                    marks.len(),
                    columns.len()
                ));
            }
            let allowed = marks
                .iter()
                .map(|m| match *m {
                    "." => Ok(true),
                    "X" | "x" => Ok(false),
                    other => Err(format!("row {src}: `{other}` is neither `.` nor `X`")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            rows.push((src, allowed));
        }
        Ok(Matrix { columns, rows })
    }
}

// ---- the raw document ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    cluster: ClusterDoc,
    #[serde(default)]
    nsx: NsxDoc,
    steps: Vec<Spanned<StepDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Nodes {
    Count(usize),
    Names(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterDoc {
    #[serde(default = "default_cluster")]
    name: String,
    #[serde(default)]
    nodes: Option<Nodes>,
    #[serde(default = "default_block")]
    ip_block: String,
    #[serde(default = "default_prefix")]
    subnet_prefix: u8,
    #[serde(default = "default_enable_snat")]
    enable_snat: bool,
    #[serde(default)]
    pool_algorithm: Option<String>,
    #[serde(default)]
    service_size: Option<String>,
    #[serde(default)]
    l4_persistence: Option<String>,
    #[serde(default = "default_snat")]
    snat_pool: String,
    #[serde(default = "default_lb")]
    lb_pool: String,
    #[serde(default = "default_service_cidr")]
    service_cidr: String,
    #[serde(default = "default_replicas")]
    ncp_replicas: usize,
}

fn default_cluster() -> String {
    "k8s-a".into()
}
fn default_block() -> String {
    "10.4.0.0/16".into()
}
fn default_prefix() -> u8 {
    24
}
fn default_enable_snat() -> bool {
    true
}
fn default_snat() -> String {
    "192.0.2.0/24".into()
}
fn default_lb() -> String {
    "198.51.100.0/24".into()
}
fn default_service_cidr() -> String {
    "10.96.0.0/16".into()
}
fn default_replicas() -> usize {
    1
}

impl Default for ClusterDoc {
    fn default() -> Self {
        Self {
            name: default_cluster(),
            nodes: None,
            ip_block: default_block(),
            subnet_prefix: default_prefix(),
            enable_snat: default_enable_snat(),
            pool_algorithm: None,
            service_size: None,
            l4_persistence: None,
            snat_pool: default_snat(),
            lb_pool: default_lb(),
            service_cidr: default_service_cidr(),
            ncp_replicas: default_replicas(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NsxDoc {
    #[serde(default)]
    rate_limit: u32,
    #[serde(default)]
    concurrency_limit: u32,
    #[serde(default, deserialize_with = "opt_duration")]
    latency: Option<u64>,
    #[serde(default, deserialize_with = "opt_duration")]
    search_lag: Option<u64>,
    #[serde(default)]
    preload: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum StepDoc {
    Apply(String),
    ApplyFile(String),
    Delete(ObjectRef),
    Wait(#[serde(deserialize_with = "wait_range")] (u64, u64)),
    Converge(ConvergeDoc),
    Fault(Fault),
    Heal(HealDoc),
    Expect(Expect),
    Snapshot(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConvergeDoc {
    #[serde(deserialize_with = "duration")]
    within: u64,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum HealDoc {
    Word(String),
    One(Fault),
}

/// `250ms`, `5s`, `2m`, `1h`, or a bare number of milliseconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 250ms, 5s, 2m"))?;
    let scale = match unit {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("`{text}`: unknown unit `{unit}` (ms, s, m, h)")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("`{text}` is too long"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum DurationDoc {
    Text(String),
    Millis(u64),
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match DurationDoc::deserialize(d)? {
        DurationDoc::Millis(ms) => Ok(ms),
        DurationDoc::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
    }
}

/// `5s` (a fixed wait) or `1s..3s` (a wait the seed chooses, both ends included).
pub fn parse_wait(text: &str) -> Result<(u64, u64), String> {
    match text.split_once("..") {
        None => parse_duration(text).map(|ms| (ms, ms)),
        Some((a, b)) => {
            let (min, max) = (parse_duration(a)?, parse_duration(b)?);
            if min > max {
                return Err(format!("`{text}`: the range runs backwards"));
            }
            Ok((min, max))
        }
    }
}

fn wait_range<'de, D: serde::Deserializer<'de>>(d: D) -> Result<(u64, u64), D::Error> {
    match DurationDoc::deserialize(d)? {
        DurationDoc::Millis(ms) => Ok((ms, ms)),
        DurationDoc::Text(t) => parse_wait(&t).map_err(serde::de::Error::custom),
    }
}

fn opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    duration(d).map(Some)
}

// ---- loading ----

struct Ctx<'a> {
    file: &'a Path,
}

impl Ctx<'_> {
    fn err(&self, line: Option<u64>, message: impl Into<String>) -> ScenarioError {
        ScenarioError {
            file: self.file.display().to_string(),
            line,
            message: message.into(),
        }
    }
}

fn yaml_error(ctx: &Ctx<'_>, e: &serde_saphyr::Error, line_offset: u64) -> ScenarioError {
    let line = e.location().map(|l| l.line() + line_offset);
    // The rendered message repeats the position and quotes the source; the first line is
    // the message itself.
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default().to_string();
    ctx.err(line, first)
}

/// Loads and validates one scenario file.
pub fn load(file: &Path) -> Result<Scenario, ScenarioError> {
    let ctx = Ctx { file };
    let text = read_text_file(file).map_err(|e| ctx.err(None, e))?;
    parse(file, &text)
}

/// The largest scenario or manifest file read.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// A scenario or manifest file: a regular file of at most [`MAX_FILE_BYTES`] (never a device
/// or a FIFO, which `apply_file: /dev/zero` would read forever), in UTF-8.
fn read_text_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{} bytes; files are read up to {MAX_FILE_BYTES}",
            meta.len()
        ));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("longer than {MAX_FILE_BYTES} bytes"));
    }
    Ok(text)
}

/// Validates scenario text as if it were `file` (which `apply_file` resolves against).
pub fn parse(file: &Path, text: &str) -> Result<Scenario, ScenarioError> {
    let ctx = Ctx { file };
    let doc: Doc = serde_saphyr::from_str(text).map_err(|e| yaml_error(&ctx, &e, 0))?;
    if doc.name.trim().is_empty() {
        return Err(ctx.err(Some(1), "`name` must not be empty"));
    }
    let c = doc.cluster;
    let at = |key: &str| cluster_line(text, key);
    // The count is checked before any name is made: `nodes: 100000000000` is an error, not
    // an attempt to allocate them.
    let count = match &c.nodes {
        None => 3,
        Some(Nodes::Count(n)) => *n,
        Some(Nodes::Names(v)) => v.len(),
    };
    if !(1..=MAX_NODES).contains(&count) {
        return Err(ctx.err(
            at("nodes"),
            format!("cluster.nodes must be 1 to {MAX_NODES} nodes, not {count}"),
        ));
    }
    let nodes = match c.nodes {
        None | Some(Nodes::Count(_)) => (1..=count).map(|i| format!("node-{i}")).collect(),
        Some(Nodes::Names(v)) => v,
    };
    for n in &nodes {
        if !crate::scenario::names::is_dns_label(n) || reserved_host(n) {
            return Err(ctx.err(
                at("nodes"),
                format!("cluster.nodes: `{n}` is not a usable node name (a DNS label that is not a host name the harness uses)"),
            ));
        }
    }
    for (key, cidr) in [
        ("ip_block", &c.ip_block),
        ("snat_pool", &c.snat_pool),
        ("lb_pool", &c.lb_pool),
        ("service_cidr", &c.service_cidr),
    ] {
        crate::scenario::names::parse_cidr(cidr)
            .map_err(|e| ctx.err(at(key), format!("cluster.{key}: {e}")))?;
    }
    let (_, block_len) = crate::scenario::names::parse_cidr(&c.ip_block).unwrap_or((0, 16));
    if c.subnet_prefix <= block_len || c.subnet_prefix > 30 {
        return Err(ctx.err(
            at("subnet_prefix"),
            format!(
                "cluster.subnet_prefix {} must be longer than the block's /{block_len} and at most 30",
                c.subnet_prefix
            ),
        ));
    }
    if !(1..=3).contains(&c.ncp_replicas) {
        return Err(ctx.err(at("ncp_replicas"), "cluster.ncp_replicas must be 1, 2 or 3"));
    }
    let mut lb = nsx_core::ncp::desired::LbSettings::default();
    for (key, value) in [
        ("pool_algorithm", &c.pool_algorithm),
        ("service_size", &c.service_size),
        ("l4_persistence", &c.l4_persistence),
    ] {
        if let Some(v) = value {
            lb.set(key, v)
                .map_err(|reason| ctx.err(at(key), format!("cluster.{key}: {reason}")))?;
        }
    }
    let cluster = Cluster {
        name: c.name,
        nodes,
        ip_block: c.ip_block,
        subnet_prefix: c.subnet_prefix,
        enable_snat: c.enable_snat,
        lb,
        snat_pool: c.snat_pool,
        lb_pool: c.lb_pool,
        service_cidr: c.service_cidr,
        ncp_replicas: c.ncp_replicas,
    };
    let preload = match &doc.nsx.preload {
        None => Vec::new(),
        Some(t) => {
            let v: Value = serde_saphyr::from_str(t).map_err(|e| {
                let mut err = yaml_error(&ctx, &e, 0);
                err.message = format!("nsx.preload: {}", err.message);
                err.line = line_of(text, "preload:").map(|l| l + err.line.unwrap_or(0));
                err
            })?;
            let list = match v {
                Value::Array(a) => a,
                Value::Object(_) => vec![v],
                _ => {
                    return Err(ctx.err(
                        line_of(text, "preload:"),
                        "nsx.preload must be a list of NSX objects",
                    ));
                }
            };
            for (i, o) in list.iter().enumerate() {
                let rt = o.get("resource_type").and_then(Value::as_str);
                if rt.is_none_or(|rt| crate::scenario::names::collection_of(rt).is_none()) {
                    return Err(ctx.err(
                        line_of(text, "preload:"),
                        format!(
                            "nsx.preload[{i}]: resource_type {rt:?} is not one the harness can preload ({})",
                            crate::scenario::names::PRELOADABLE.join(", ")
                        ),
                    ));
                }
            }
            list
        }
    };
    let nsx = Nsx {
        rate_limit: doc.nsx.rate_limit,
        concurrency_limit: doc.nsx.concurrency_limit,
        latency_ms: doc.nsx.latency.unwrap_or(2),
        search_lag_ms: doc.nsx.search_lag.unwrap_or(500),
        preload,
    };
    let mut steps = Vec::new();
    for s in doc.steps {
        let line = s.referenced.line();
        let kind = step(&ctx, &cluster, line, s.value)?;
        steps.push(Step { line, kind });
    }
    Ok(Scenario {
        name: doc.name,
        description: doc.description.unwrap_or_default(),
        seed: doc.seed,
        file: file.to_path_buf(),
        cluster,
        nsx,
        steps,
    })
}

fn line_of(text: &str, needle: &str) -> Option<u64> {
    text.lines()
        .position(|l| l.trim_start().starts_with(needle))
        .map(|i| i as u64 + 1)
}

/// The most nodes a scenario's cluster may have.
pub const MAX_NODES: usize = 1000;

/// The line of `cluster.<key>` (the `cluster:` line when the key is written on it, in flow
/// style, or is absent and defaulted), for errors about the cluster's settings.
fn cluster_line(text: &str, key: &str) -> Option<u64> {
    let start = line_of(text, "cluster:")?;
    let lines: Vec<&str> = text.lines().collect();
    let field = format!("{key}:");
    if lines.get(start as usize - 1)?.contains(&field) {
        return Some(start);
    }
    for (i, l) in lines.iter().enumerate().skip(start as usize) {
        let t = l.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if !l.starts_with([' ', '\t']) {
            break;
        }
        if t.starts_with(&field) {
            return Some(i as u64 + 1);
        }
    }
    Some(start)
}

fn reserved_host(n: &str) -> bool {
    n == "apiserver" || n == "nsx-manager" || n == "ncp" || n.starts_with("ncp-") || n == "external"
}

fn step(
    ctx: &Ctx<'_>,
    cluster: &Cluster,
    line: u64,
    s: StepDoc,
) -> Result<StepKind, ScenarioError> {
    let err = |m: String| ctx.err(Some(line), m);
    Ok(match s {
        // The block's text starts on the line after `apply: |`.
        StepDoc::Apply(text) => StepKind::Apply(manifests(ctx, &text, line)?),
        StepDoc::ApplyFile(rel) => {
            let path = ctx
                .file
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join(&rel);
            let text = read_text_file(&path)
                .map_err(|e| err(format!("apply_file {}: {e}", path.display())))?;
            let sub = Ctx { file: &path };
            StepKind::Apply(manifests(&sub, &text, 0)?)
        }
        StepDoc::Delete(r) => {
            if !KINDS.iter().any(|(k, _, _)| *k == r.kind) {
                return Err(err(format!(
                    "delete: kind `{}` is not one of {}",
                    r.kind,
                    KINDS.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
                )));
            }
            let namespaced = KINDS.iter().any(|(k, _, n)| *k == r.kind && *n);
            if namespaced != r.namespace.is_some() {
                return Err(err(format!(
                    "delete: a {} {} a namespace",
                    r.kind,
                    if namespaced { "needs" } else { "has no" }
                )));
            }
            StepKind::Delete(r)
        }
        StepDoc::Wait((min, max)) => StepKind::Wait { min, max },
        StepDoc::Converge(c) => StepKind::Converge(c.within),
        StepDoc::Fault(f) => {
            check_fault(cluster, &f).map_err(err)?;
            StepKind::Fault(f)
        }
        StepDoc::Heal(HealDoc::Word(w)) if w == "all" => StepKind::Heal(None),
        StepDoc::Heal(HealDoc::Word(w)) => {
            return Err(err(format!("heal: `{w}` is neither `all` nor a fault")));
        }
        StepDoc::Heal(HealDoc::One(f)) => {
            check_fault(cluster, &f).map_err(err)?;
            StepKind::Heal(Some(f))
        }
        StepDoc::Expect(e) => {
            check_expect(&e).map_err(err)?;
            StepKind::Expect(Box::new(e))
        }
        StepDoc::Snapshot(label) => {
            if label.is_empty()
                || !label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(err(format!(
                    "snapshot: `{label}` must be letters, digits, - and _"
                )));
            }
            StepKind::Snapshot(label)
        }
    })
}

/// The hosts a fault may name.
pub fn check_host(cluster: &Cluster, h: &str, node_only: bool) -> Result<(), String> {
    let ok = if node_only {
        cluster.nodes.iter().any(|n| n == h)
    } else {
        h == "ncp"
            || h == "nsx-manager"
            || h == "apiserver"
            || cluster.nodes.iter().any(|n| n == h)
            || h.strip_prefix("ncp-")
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(|i| i < cluster.ncp_replicas)
    };
    if ok {
        Ok(())
    } else if node_only {
        Err(format!(
            "`{h}` is not a node (nodes: {})",
            cluster.nodes.join(", ")
        ))
    } else {
        Err(format!(
            "`{h}` is not a host (ncp, ncp-0..ncp-{}, nsx-manager, apiserver, {})",
            cluster.ncp_replicas - 1,
            cluster.nodes.join(", ")
        ))
    }
}

fn pair(cluster: &Cluster, what: &str, hosts: &[String]) -> Result<(), String> {
    if hosts.len() != 2 {
        return Err(format!("{what} takes two hosts, got {}", hosts.len()));
    }
    for h in hosts {
        check_host(cluster, h, false).map_err(|e| format!("{what}: {e}"))?;
    }
    Ok(())
}

fn check_fault(cluster: &Cluster, f: &Fault) -> Result<(), String> {
    match f {
        Fault::Partition(h) => pair(cluster, "partition", h),
        Fault::Hold(h) => pair(cluster, "hold", h),
        Fault::Latency(l) => {
            pair(cluster, "latency.between", &l.between)?;
            if l.min > l.max {
                return Err(format!("latency: min {} ms > max {} ms", l.min, l.max));
            }
            Ok(())
        }
        Fault::NsxErrors(e) => {
            if !(400..=599).contains(&e.status) {
                return Err(format!(
                    "nsx_errors.status {} is not an HTTP error status",
                    e.status
                ));
            }
            if !(0.0..=1.0).contains(&e.rate) {
                return Err(format!("nsx_errors.rate {} is not within 0..1", e.rate));
            }
            Ok(())
        }
        Fault::Crash(h) | Fault::Restart(h) => {
            check_host(cluster, h, false)?;
            if h == "apiserver" || cluster.nodes.contains(h) {
                return Err(format!(
                    "crash/restart take ncp, ncp-N or nsx-manager (use restart_agent / restart_ovs for a node), not `{h}`"
                ));
            }
            Ok(())
        }
        Fault::RestartOvs(h) | Fault::RestartAgent(h) => check_host(cluster, h, true),
        Fault::WatchDisconnect(h) => {
            check_host(cluster, h, false)?;
            if h == "nsx-manager" || h == "apiserver" {
                return Err(format!(
                    "watch_disconnect takes a watcher (ncp, ncp-N or a node), not `{h}`"
                ));
            }
            Ok(())
        }
        Fault::CrashAfterWrites(c) => {
            check_host(cluster, &c.host, false)?;
            if !(c.host == "ncp" || c.host.starts_with("ncp-")) {
                return Err(format!(
                    "crash_after_writes.host must be an NCP replica, not `{}`",
                    c.host
                ));
            }
            if c.writes == 0 {
                return Err("crash_after_writes.writes must be at least 1".into());
            }
            Ok(())
        }
        Fault::AdminEdit(a) => {
            if crate::scenario::names::collection_of(&a.resource_type).is_none() {
                return Err(format!(
                    "admin_edit.resource_type `{}` is not one of {}",
                    a.resource_type,
                    crate::scenario::names::editable().join(", ")
                ));
            }
            if a.delete == a.set.is_some() {
                return Err("admin_edit takes either `delete: true` or `set: {...}`".into());
            }
            if a.set.as_ref().is_some_and(|s| !s.is_object()) {
                return Err("admin_edit.set must be a map of fields".into());
            }
            Ok(())
        }
    }
}

fn check_expect(e: &Expect) -> Result<(), String> {
    if let Some(n) = &e.nsx {
        for k in n.count.keys() {
            if !crate::scenario::names::COUNTABLE.contains(&k.as_str()) {
                return Err(format!(
                    "expect.nsx.count: `{k}` is not one of {}",
                    crate::scenario::names::COUNTABLE.join(", ")
                ));
            }
        }
        if let Some(u) = &n.untouched
            && u != "preload"
        {
            return Err(format!(
                "expect.nsx.untouched: `{u}` (only `preload` is known)"
            ));
        }
    }
    for p in &e.pods {
        match crate::scenario::names::Endpoint::parse(&p.pod, false)? {
            crate::scenario::names::Endpoint::Pod { .. } => {}
            _ => return Err(format!("expect.pods: `{}` is not a pod (ns/name)", p.pod)),
        }
        if let (Some(lo), Some(hi)) = (p.min_restarts, p.max_restarts)
            && lo > hi
        {
            return Err(format!(
                "expect.pods: `{}`: min_restarts {lo} is above max_restarts {hi}",
                p.pod
            ));
        }
    }
    for sv in &e.services {
        match crate::scenario::names::Endpoint::parse(&sv.service, false)? {
            crate::scenario::names::Endpoint::Pod { .. } => {}
            _ => {
                return Err(format!(
                    "expect.services: `{}` is not a service (ns/name)",
                    sv.service
                ));
            }
        }
        if let Some(Some(ip)) = &sv.ingress
            && ip.parse::<std::net::Ipv4Addr>().is_err()
        {
            return Err(format!(
                "expect.services: `{}`: ingress `{ip}` is not an IPv4 address",
                sv.service
            ));
        }
    }
    for c in &e.connectivity {
        crate::scenario::names::protocol(&c.protocol)?;
        crate::scenario::names::Endpoint::parse(&c.from, true)?;
        let to = crate::scenario::names::Endpoint::parse(&c.to, false)?;
        let balanced = matches!(
            to,
            crate::scenario::names::Endpoint::Service { .. }
                | crate::scenario::names::Endpoint::Lb { .. }
                | crate::scenario::names::Endpoint::Node(_)
        );
        if c.sticky && !balanced {
            return Err(format!(
                "connectivity to {}: `sticky` is for svc/, lb/ and node/ targets",
                c.to
            ));
        }
        if c.backends.is_some() && !balanced {
            return Err(format!(
                "connectivity to {}: `backends` is for svc/, lb/ and node/ targets",
                c.to
            ));
        }
        if c.client_ip_kept.is_some() && !c.allowed {
            return Err(format!(
                "connectivity to {}: `client_ip_kept` needs `allowed: true` (a pod must be \
                 reached to see a source)",
                c.to
            ));
        }
        if let Some(b) = &c.backends {
            for p in b {
                crate::scenario::names::Endpoint::parse(p, true)?;
            }
        }
    }
    if let Some(r) = &e.reachability {
        crate::scenario::names::protocol(&r.protocol)?;
        let m = r
            .matrix()
            .map_err(|m| format!("expect.reachability: {m}"))?;
        for name in m.columns.iter().chain(m.rows.iter().map(|r| &r.0)) {
            match crate::scenario::names::Endpoint::parse(name, true)? {
                crate::scenario::names::Endpoint::Pod { .. } => {}
                _ => {
                    return Err(format!(
                        "expect.reachability: `{name}` is not a pod (ns/name)"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Kinds the harness accepts: (kind, apiVersion, namespaced).
pub const KINDS: &[(&str, &str, bool)] = &[
    ("Namespace", "v1", false),
    ("Node", "v1", false),
    ("Pod", "v1", true),
    ("Service", "v1", true),
    ("EndpointSlice", "discovery.k8s.io/v1", true),
    ("NetworkPolicy", "networking.k8s.io/v1", true),
];

/// Splits multi-document YAML, parses and checks each manifest; `line0` is the line before
/// the text's first line in the file.
fn manifests(ctx: &Ctx<'_>, text: &str, line0: u64) -> Result<Vec<Value>, ScenarioError> {
    let mut docs: Vec<(u64, String)> = vec![(line0, String::new())];
    for (i, l) in text.lines().enumerate() {
        if l.trim_end() == "---" {
            docs.push((line0 + i as u64 + 1, String::new()));
            continue;
        }
        if let Some(d) = docs.last_mut() {
            d.1.push_str(l);
            d.1.push('\n');
        }
    }
    let mut out = Vec::new();
    for (start, body) in docs {
        if body.lines().all(|l| {
            let t = l.trim();
            t.is_empty() || t.starts_with('#')
        }) {
            continue;
        }
        let v: Value = serde_saphyr::from_str(&body).map_err(|e| yaml_error(ctx, &e, start))?;
        let first = start
            + 1
            + body
                .lines()
                .position(|l| !l.trim().is_empty() && !l.trim().starts_with('#'))
                .unwrap_or(0) as u64;
        out.push(manifest(v).map_err(|m| ctx.err(Some(first), m))?);
    }
    Ok(out)
}

/// Whether `v` is a valid `T` with no field `T` does not know (the API server's strict
/// decoding): a typed round trip, then the first key it dropped.
pub fn round_trip<T: DeserializeOwned + serde::Serialize>(v: &Value) -> Result<(), String> {
    let t: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&t).map_err(|e| e.to_string())?;
    match unknown_field(v, &back, "") {
        Some(path) => Err(format!("unknown field `{path}`")),
        None => Ok(()),
    }
}

/// The first key of `input` the typed round trip dropped: a field Kubernetes does not know.
fn unknown_field(input: &Value, typed: &Value, at: &str) -> Option<String> {
    match (input, typed) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(k, v)| {
            let path = if at.is_empty() {
                k.clone()
            } else {
                format!("{at}.{k}")
            };
            match b.get(k) {
                None if !v.is_null() => Some(path),
                None => None,
                Some(w) => unknown_field(v, w, &path),
            }
        }),
        (Value::Array(a), Value::Array(b)) => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| unknown_field(v, w, &format!("{at}[{i}]"))),
        _ => None,
    }
}

/// Checks one manifest the way the API server would (kind, apiVersion, name, the schema,
/// unknown fields).
pub fn manifest(v: Value) -> Result<Value, String> {
    let kind = v
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("a manifest without `kind`")?;
    let Some((_, api_version, namespaced)) = KINDS.iter().find(|(k, _, _)| *k == kind) else {
        return Err(format!(
            "kind `{kind}` is not supported (supported: {})",
            KINDS.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
        ));
    };
    let av = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    if av != *api_version {
        return Err(format!(
            "{kind} has apiVersion `{av}`, expected `{api_version}`"
        ));
    }
    let name = match v.pointer("/metadata/name") {
        Some(Value::String(n)) => n.as_str(),
        None | Some(Value::Null) => return Err(format!("{kind} without metadata.name")),
        Some(other) => {
            return Err(format!(
                "{kind} metadata.name is {other}, not a string (quote it: YAML reads y, n, on, off as booleans)"
            ));
        }
    };
    // Namespaces and nodes are DNS labels; the rest may be subdomains (the apiserver checks).
    if matches!(kind, "Namespace" | "Node") && !crate::scenario::names::is_dns_label(name) {
        return Err(format!("{kind} name `{name}` is not a DNS label"));
    }
    if !*namespaced && v.pointer("/metadata/namespace").is_some() {
        return Err(format!(
            "{kind} {name} is not namespaced but has metadata.namespace"
        ));
    }
    use k8s_openapi::api::core::v1 as core;
    let r = match kind {
        "Namespace" => round_trip::<core::Namespace>(&v),
        "Node" => round_trip::<core::Node>(&v),
        "Pod" => round_trip::<core::Pod>(&v),
        "Service" => round_trip::<core::Service>(&v),
        "EndpointSlice" => round_trip::<k8s_openapi::api::discovery::v1::EndpointSlice>(&v),
        _ => round_trip::<k8s_openapi::api::networking::v1::NetworkPolicy>(&v),
    };
    r.map_err(|e| format!("{kind} {name}: {e}"))?;
    let mut v = v;
    if *namespaced && v.pointer("/metadata/namespace").is_none() {
        v["metadata"]["namespace"] = Value::from("default");
    }
    Ok(v)
}
