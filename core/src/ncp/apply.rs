//! Executes a plan with the NSX client, resolving references as objects come into being.
//!
//! Creates render their body at the moment they run, from the observed objects and those the
//! plan has created so far, so a child gets its parent's id even when the parent was created a
//! moment ago. Updates are read-modify-write on the fields NCP owns ([`NsxClient::update_with`]
//! re-reads on 412). Deletes treat 404 as done. The first error stops the plan: the caller
//! observes again and plans anew, which is always safe because planning is idempotent.
//!
//! Multi-request steps are ordered so that a crash between their requests is repaired by the
//! next plan: a tier-1 router is created without its route-advertisement marker tag, then the
//! advertisement is written, then the tag; a SNAT address is allocated, then the rule carrying
//! it in `ncp/address` is created (an allocation without a rule is released by a later plan).
//!
//! `write_budget` stops the applier right after that many writes, as a crash would; tests use it
//! to crash NCP after every write of a scenario.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;

use http::Method;
use hyper_util::client::legacy::connect::Connect;
use serde_json::{Value, json};

use super::infra::Infra;
use super::naming::scope;
use super::observe::Observed;
use super::plan::{Op, Plan, tag_of};
use super::render::{ADVERTISED, Missing, advertised_tag, pod_network, render, wire};
use super::vocab::{Collection, Detail, Key, Spec};
use crate::k8s::pod_network::PodNetwork;
use crate::nsx::model::{
    AdvertisementConfig, AllocationIpAddress, LogicalPortState, RealizedBinding, ResourceMeta, Tag,
};
use crate::nsx::{NsxClient, NsxError};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("failed to {op}")]
    Nsx {
        op: String,
        #[source]
        source: NsxError,
    },
    #[error("failed to render {key:?}: {missing:?} does not exist")]
    Unresolved { key: Key, missing: Key },
    #[error("stopped after the write budget of {writes} writes")]
    BudgetSpent { writes: usize },
    #[error("stopped: this replica is no longer the leader")]
    Fenced,
    #[error("failed to {op}: the external IP pool for it is not configured")]
    NoPool { op: String },
    /// NSX answered without a field its answer always carries (an id, an address): nothing
    /// is written on from it (an empty id in a path, an empty address in an annotation).
    #[error("NSX answered {op} without {field}")]
    BadAnswer { op: String, field: &'static str },
    /// A LoadBalancer service's VIP cannot be had as asked (`code` is what NCP writes in the
    /// service's `ncp/error.loadbalancer` annotation).
    #[error("no VIP for service {service}: {code}: {reason}")]
    Vip {
        service: String,
        code: &'static str,
        reason: String,
    },
}

/// `field` of an NSX answer, which must be there.
fn required<'a>(
    doc: &'a Value,
    field: &'static str,
    op: impl FnOnce() -> String,
) -> Result<&'a str, ApplyError> {
    doc.get(field)
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApplyError::BadAnswer { op: op(), field })
}

impl ApplyError {
    /// Whether a later attempt can succeed without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            ApplyError::Nsx { source, .. } => source.is_retryable() || source.is_stale_revision(),
            // A later pass observes what NSX holds and starts from that.
            ApplyError::Unresolved { .. }
            | ApplyError::BudgetSpent { .. }
            | ApplyError::BadAnswer { .. } => true,
            ApplyError::NoPool { .. } | ApplyError::Fenced | ApplyError::Vip { .. } => false,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    pub writes: usize,
    pub ops_done: usize,
    /// Pod UID -> its network annotation, for ports created by this plan whose binding NSX
    /// had realized.
    pub pod_networks: BTreeMap<String, PodNetwork>,
    /// Objects NSX refused for good (a 4xx that retrying cannot fix: an exhausted pool, a
    /// validation error), and those skipped because they depend on one. The rest of the plan
    /// went ahead: one bad namespace must not hold up the others.
    pub failed: BTreeMap<Key, String>,
    /// Service UID -> why it has no VIP (the `ncp/error.loadbalancer` value), for services
    /// whose VIP this plan could not have.
    pub lb_errors: BTreeMap<String, &'static str>,
}

pub struct Applier<'a, C> {
    client: &'a NsxClient<C>,
    infra: &'a Infra,
    /// Writes left before the simulated crash; `None` = no limit.
    pub write_budget: Option<usize>,
    /// Checked before every write: a replica that lost the lease stops at once.
    pub fence: Option<Arc<super::leader::Fence>>,
    /// Operations in flight at most (at least one).
    pub concurrency: usize,
    /// What the operations in flight share. Held only between awaits, never across one.
    state: Mutex<Shared>,
    /// Set by the first error that stops the plan: no lane starts another operation.
    stopped: AtomicBool,
}

struct Shared {
    /// NCP's objects, allocations and VIPs: observed, then kept up to date write by write.
    resolved: Observed,
    report: ApplyReport,
    /// Writes left; a write takes its share before it is sent.
    budget: Option<usize>,
}

/// Which operations of one phase must not overlap: they run one after another, in plan order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Lane<'p> {
    Object(&'p Key),
    /// The virtual servers of one service share its VIP: the first allocates it.
    ServiceVip(&'p str),
    /// Sections are inserted next to markers and each other; NSX keeps their order.
    Firewall,
    Address(&'p str),
}

fn lane(op: &Op) -> Lane<'_> {
    match op {
        Op::ReleaseIp { ip, .. } => Lane::Address(ip),
        Op::Create {
            spec:
                Spec {
                    detail: Detail::LbVirtualServer { service_uid, .. },
                    ..
                },
            ..
        } => Lane::ServiceVip(service_uid),
        Op::Create { key, .. } | Op::Update { key, .. } | Op::Delete { key, .. } => match key {
            Key::FwMarkerTop(_)
            | Key::FwMarkerBottom(_)
            | Key::AllowSection(_)
            | Key::IsolationSection(_)
            | Key::NodeSection(_) => Lane::Firewall,
            _ => Lane::Object(key),
        },
    }
}

/// Where the plan's order matters. Deletes come children first, creates parents first, both
/// by rank ([`Key::rank`]), and a key depends only on keys of a lower rank; so consecutive
/// operations of the same kind (delete, release, create or update) and rank are independent
/// of each other, and every dependency crosses from one phase into a later one. Returns the
/// phases in order, each as its lanes.
pub(crate) fn phases(ops: &[Op]) -> Vec<Vec<Vec<&Op>>> {
    let class = |op: &Op| match op {
        Op::Delete { key, .. } => (0, key.rank()),
        Op::ReleaseIp { .. } => (1, 0),
        Op::Create { key, .. } | Op::Update { key, .. } => (2, key.rank()),
    };
    let mut out: Vec<Vec<Vec<&Op>>> = Vec::new();
    let mut lanes: BTreeMap<Lane<'_>, usize> = BTreeMap::new();
    let mut current = None;
    for op in ops {
        let c = class(op);
        if current != Some(c) {
            current = Some(c);
            lanes.clear();
            out.push(Vec::new());
        }
        let phase = out.last_mut().expect("pushed above");
        let at = *lanes.entry(lane(op)).or_insert_with(|| {
            phase.push(Vec::new());
            phase.len() - 1
        });
        phase[at].push(op);
    }
    out
}

fn tag_value<'s>(spec: &'s Spec, scope_name: &str) -> &'s str {
    spec.tags
        .iter()
        .find(|t| t.scope == scope_name)
        .map_or("", |t| t.tag.as_str())
}

/// The object an operation is about.
fn op_key(op: &Op) -> Option<&Key> {
    match op {
        Op::Create { key, .. } | Op::Update { key, .. } | Op::Delete { key, .. } => Some(key),
        Op::ReleaseIp { .. } => None,
    }
}

/// An error that retrying the same request cannot fix (a 4xx other than conflicts and
/// throttling): the object is reported and the plan goes on.
fn is_permanent(e: &ApplyError) -> bool {
    match e {
        ApplyError::Nsx { source, .. } => {
            matches!(source.status(), Some(400..=499))
                && !source.is_retryable()
                && !source.is_stale_revision()
        }
        ApplyError::NoPool { .. } | ApplyError::Vip { .. } => true,
        ApplyError::Unresolved { .. }
        | ApplyError::BudgetSpent { .. }
        | ApplyError::Fenced
        | ApplyError::BadAnswer { .. } => false,
    }
}

/// NSX's error codes for an address that cannot be allocated from an IP pool.
const NSX_POOL_EXHAUSTED: i64 = 5109;
const NSX_NOT_IN_POOL: i64 = 5110;
const NSX_ALREADY_ALLOCATED: i64 = 5141;

fn source_text(e: &ApplyError) -> String {
    std::error::Error::source(e)
        .map(|s| s.to_string())
        .unwrap_or_default()
}

fn path(collection: Collection, infra: &Infra) -> String {
    match collection {
        Collection::BlockSubnet => "pools/ip-subnets".into(),
        Collection::IpPool => "pools/ip-pools".into(),
        Collection::LogicalSwitch => "logical-switches".into(),
        Collection::LogicalRouter => "logical-routers".into(),
        Collection::LogicalRouterPort => "logical-router-ports".into(),
        Collection::LogicalPort => "logical-ports".into(),
        Collection::NatRule => format!("logical-routers/{}/nat/rules", infra.tier0),
        Collection::LbService => "loadbalancer/services".into(),
        Collection::LbVirtualServer => "loadbalancer/virtual-servers".into(),
        Collection::LbPool => "loadbalancer/pools".into(),
        Collection::LbPersistenceProfile => "loadbalancer/persistence-profiles".into(),
        Collection::NsGroup => "ns-groups".into(),
        Collection::IpSet => "ip-sets".into(),
        Collection::FirewallSection => "firewall/sections".into(),
    }
}

fn delete_query(collection: Collection) -> &'static str {
    match collection {
        Collection::LogicalPort => "?detach=true",
        Collection::LogicalSwitch => "?cascade=true&detach=true",
        Collection::LogicalRouter | Collection::LogicalRouterPort | Collection::IpPool => {
            "?force=true"
        }
        Collection::FirewallSection => "?cascade=true",
        Collection::BlockSubnet
        | Collection::NsGroup
        | Collection::IpSet
        | Collection::NatRule
        | Collection::LbService
        | Collection::LbVirtualServer
        | Collection::LbPool
        | Collection::LbPersistenceProfile => "",
    }
}

impl<'a, C> Applier<'a, C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    /// Takes the observation and updates it in place: what it holds after the plan is what
    /// the next pass plans against (a copy of every document would make each pass cost the
    /// cluster's size).
    pub fn new(client: &'a NsxClient<C>, infra: &'a Infra, observed: Observed) -> Self {
        Self {
            client,
            infra,
            write_budget: None,
            fence: None,
            concurrency: 1,
            state: Mutex::new(Shared {
                resolved: observed,
                report: ApplyReport::default(),
                budget: None,
            }),
            stopped: AtomicBool::new(false),
        }
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding it cannot leave half an update: every critical section is a
        // few map operations.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the plan to its end or to the first error. On success, also what NSX holds now by
    /// NCP's account: observed, plus created, minus deleted, with allocations and VIPs.
    ///
    /// After an error no operation starts, but those in flight finish (a crash would cut them
    /// anywhere, and the next plan repairs either way), so that the report counts every write
    /// that reached NSX.
    pub async fn apply(
        self,
        plan: &Plan,
    ) -> Result<(ApplyReport, Observed), (ApplyError, ApplyReport)> {
        self.shared().budget = self.write_budget;
        let width = self.concurrency.max(1);
        let mut first_error = None;
        for phase in phases(&plan.ops) {
            let mut lanes = futures::stream::iter(phase.into_iter().map(|l| self.lane(l)))
                .buffer_unordered(width);
            while let Some(r) = lanes.next().await {
                if let (Err(e), None) = (r, &first_error) {
                    first_error = Some(e);
                }
            }
            if first_error.is_some() {
                break;
            }
        }
        let Shared {
            resolved, report, ..
        } = self.state.into_inner().unwrap_or_else(|p| p.into_inner());
        match first_error {
            Some(e) => Err((e, report)),
            None => Ok((report, resolved)),
        }
    }

    /// One lane's operations in order, until one fails or another lane's error stops them.
    async fn lane(&self, ops: Vec<&Op>) -> Result<(), ApplyError> {
        for op in ops {
            if self.stopped.load(Ordering::SeqCst) {
                return Ok(());
            }
            if let Some(key) = op_key(op) {
                let detail = match op {
                    Op::Create { spec, .. } | Op::Update { spec, .. } => Some(&spec.detail),
                    _ => None,
                };
                let mut shared = self.shared();
                // A replacement whose old object NSX would not delete: creating it anyway
                // would leave two.
                if matches!(op, Op::Create { .. }) && shared.report.failed.contains_key(key) {
                    continue;
                }
                if let Some(dep) = key
                    .deps(detail)
                    .into_iter()
                    .find(|d| shared.report.failed.contains_key(d))
                {
                    shared
                        .report
                        .failed
                        .insert(key.clone(), format!("depends on {dep:?}, which failed"));
                    continue;
                }
            }
            match self.run(op).await {
                Ok(()) => self.shared().report.ops_done += 1,
                Err(e) if is_permanent(&e) && op_key(op).is_some() => {
                    let key = op_key(op).cloned().expect("checked above");
                    tracing::warn!(?key, error = %e, "NSX refused an object; going on with the rest");
                    let mut shared = self.shared();
                    if let ApplyError::Vip { service, code, .. } = &e {
                        shared.report.lb_errors.insert(service.clone(), code);
                    }
                    let text = match source_text(&e) {
                        s if s.is_empty() => e.to_string(),
                        s => format!("{e}: {s}"),
                    };
                    shared.report.failed.insert(key, text);
                }
                Err(e) => {
                    self.stopped.store(true, Ordering::SeqCst);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Takes one write from the budget, or says it is spent.
    fn take_write(&self) -> Result<(), ApplyError> {
        self.check_fence()?;
        let mut shared = self.shared();
        match &mut shared.budget {
            Some(0) => Err(ApplyError::BudgetSpent {
                writes: shared.report.writes,
            }),
            Some(b) => {
                *b -= 1;
                shared.report.writes += 1;
                Ok(())
            }
            None => {
                shared.report.writes += 1;
                Ok(())
            }
        }
    }

    fn check_fence(&self) -> Result<(), ApplyError> {
        match &self.fence {
            Some(f) if !f.allows_writes() => Err(ApplyError::Fenced),
            _ => Ok(()),
        }
    }

    async fn write(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ApplyError> {
        // A write counts once it is sent, whatever the answer.
        self.take_write()?;
        let op = format!("{method} {path}");
        self.client
            .call(method, path, body)
            .await
            .map_err(|source| ApplyError::Nsx { op, source })
    }

    fn render(&self, key: &Key, spec: &Spec, address: Option<&str>) -> Result<Value, ApplyError> {
        render(key, spec, self.infra, &self.shared().resolved, address).map_err(|Missing(m)| {
            ApplyError::Unresolved {
                key: key.clone(),
                missing: m,
            }
        })
    }

    async fn run(&self, op: &Op) -> Result<(), ApplyError> {
        match op {
            Op::Delete { key, doc } => self.delete(key, doc).await,
            Op::ReleaseIp { pool, ip } => self.release(pool, ip).await,
            Op::Create { key, spec } => self.create(key, spec).await,
            Op::Update { key, id, spec } => self.update(key, id, spec).await,
        }
    }

    async fn delete(&self, key: &Key, doc: &Value) -> Result<(), ApplyError> {
        let id = required(doc, "id", || format!("{key:?}: the observed document"))?;
        let p = format!(
            "{}/{id}{}",
            path(key.collection(), self.infra),
            delete_query(key.collection())
        );
        match self.write(Method::DELETE, &p, None).await {
            Ok(_) => {}
            Err(ApplyError::Nsx { source, .. })
                if source.is_not_found()
                    || (key.collection() == Collection::NatRule
                        && source.status() == Some(400)) => {}
            Err(e) => return Err(e),
        }
        self.shared().resolved.remove(key, id);
        if let (Key::Snat(_), Some(ip), Some(pool)) = (
            key,
            tag_of(doc, scope::SNAT_IP),
            self.infra.snat_pool.clone(),
        ) {
            let ip = ip.to_string();
            self.release(&pool, &ip).await?;
        }
        Ok(())
    }

    async fn release(&self, pool: &str, ip: &str) -> Result<(), ApplyError> {
        let p = format!("pools/ip-pools/{pool}?action=RELEASE");
        match self
            .write(Method::POST, &p, Some(json!({"allocation_id": ip})))
            .await
        {
            // Already released: done.
            Err(ApplyError::Nsx { source, .. })
                if source.status() == Some(400) || source.is_not_found() => {}
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        if self.infra.snat_pool.as_deref() == Some(pool) {
            self.shared().resolved.snat_allocations.remove(ip);
        }
        if self.infra.lb_pool.as_deref() == Some(pool) {
            self.shared().resolved.lb_vips.retain(|_, v| v != ip);
        }
        Ok(())
    }

    async fn create(&self, key: &Key, spec: &Spec) -> Result<(), ApplyError> {
        let collection = key.collection();
        let mut address = None;
        if let Key::Snat(_) = key {
            // Check the rule can be rendered before taking an address.
            self.render(key, spec, Some("0.0.0.0"))?;
            let pool = self.infra.snat_pool.clone();
            let ip = self
                .allocate_tagged(pool, key, spec, scope::PROJECT_UID, key.owner_uid(), None)
                .await?;
            self.shared().resolved.snat_allocations.insert(ip.clone());
            address = Some(ip);
        }
        if let (
            Key::LbVirtualServer(_),
            Detail::LbVirtualServer {
                service_uid,
                requested_ip,
                ..
            },
        ) = (key, &spec.detail)
        {
            address = Some(
                self.vip(key, spec, service_uid, requested_ip.as_deref())
                    .await?,
            );
        }
        let mut body = self.render(key, spec, address.as_deref())?;
        if let Key::Tier1(_) | Key::LbTier1(_) = key {
            // Without the marker: it is added once the advertisement is written.
            if let Some(tags) = body["tags"].as_array_mut() {
                tags.retain(|t| t["scope"] != ADVERTISED.0);
            }
        }
        let target = match self.section_placement(key, spec)? {
            Some(query) => format!("{}{query}", path(collection, self.infra)),
            None => path(collection, self.infra),
        };
        let created = self.write(Method::POST, &target, Some(body)).await?;
        self.shared().resolved.put(key.clone(), created.clone());
        match (key, &spec.detail) {
            (Key::Tier1(_) | Key::LbTier1(_), _) => {
                // Advertisement, then the marker tag: the update path does both.
                let id = required(&created, "id", || format!("POST {target}"))?.to_string();
                self.update(key, &id, spec).await?;
            }
            (
                Key::PodPort(pod),
                Detail::PodPort {
                    vlan,
                    namespace_uid,
                    ..
                },
            ) => {
                let id = required(&created, "id", || format!("POST {target}"))?.to_string();
                let state: LogicalPortState = self
                    .client
                    .get(&format!("logical-ports/{id}/state"))
                    .await
                    .map_err(|source| ApplyError::Nsx {
                        op: format!("GET logical-ports/{id}/state"),
                        source,
                    })?;
                // A binding NSX has not realized yet is no error: the write-back reads the
                // port's state again on a later pass. Never an annotation with an empty field.
                let binding = state
                    .realized_bindings
                    .as_deref()
                    .and_then(<[RealizedBinding]>::first)
                    .and_then(|b| b.binding.as_ref());
                let cidr = self
                    .shared()
                    .resolved
                    .get(&Key::Subnet(namespace_uid.clone()))
                    .and_then(|d| d["cidr"].as_str().map(str::to_string));
                if let (Some(b), Some(cidr), Some(vlan)) = (binding, cidr, *vlan)
                    && let (Some(ip), Some(mac)) = (&b.ip_address, &b.mac_address)
                    && let Some(n) = pod_network(ip, mac, vlan, &cidr, &id)
                {
                    self.shared().report.pod_networks.insert(pod.clone(), n);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Where a new firewall section goes: markers at the top of the firewall (the bottom one
    /// right after the top one), allow sections right after the top marker, isolation sections
    /// right before the bottom marker. `None` for other objects. A marker that NCP has not
    /// observed or created is [`ApplyError::Unresolved`] (the plan orders markers first, so a
    /// later pass finds it), never a placement next to an empty id.
    fn section_placement(&self, key: &Key, spec: &Spec) -> Result<Option<String>, ApplyError> {
        let id_of = |marker: Key| -> Result<String, ApplyError> {
            match self.shared().resolved.get(&marker) {
                Some(doc) => required(doc, "id", || format!("{marker:?}: the observed document"))
                    .map(str::to_string),
                None => Err(ApplyError::Unresolved {
                    key: key.clone(),
                    missing: marker,
                }),
            }
        };
        let c = key.owner_uid().to_string();
        Ok(Some(match key {
            Key::FwMarkerTop(_) => "?operation=insert_top".into(),
            Key::FwMarkerBottom(_) => {
                format!("?operation=insert_after&id={}", id_of(Key::FwMarkerTop(c))?)
            }
            Key::AllowSection(_) | Key::IsolationSection(_) | Key::NodeSection(_) => {
                let Detail::Section { marker, .. } = &spec.detail else {
                    return Ok(None);
                };
                let op = match marker {
                    Key::FwMarkerTop(_) => "insert_after",
                    _ => "insert_before",
                };
                format!(
                    "?action=create_with_rules&operation={op}&id={}",
                    id_of(marker.clone())?
                )
            }
            _ => return Ok(None),
        }))
    }

    /// Replaces a section's rules with `want`'s (`update_with_rules`, which needs the section's
    /// current `_revision`; a concurrent change of the section answers 409 or 412, and the read
    /// and write are repeated).
    async fn update_section(&self, key: &Key, id: &str, want: Value) -> Result<(), ApplyError> {
        let p = format!("firewall/sections/{id}");
        let mut tries = 0;
        loop {
            tries += 1;
            let current: Value = self
                .client
                .get(&p)
                .await
                .map_err(|source| ApplyError::Nsx {
                    op: format!("GET {p}"),
                    source,
                })?;
            let mut body = want.clone();
            body["_revision"] = current["_revision"].clone();
            body["id"] = json!(id);
            match self
                .write(
                    Method::POST,
                    &format!("{p}?action=update_with_rules"),
                    Some(body),
                )
                .await
            {
                Ok(updated) => {
                    self.shared().resolved.put(key.clone(), updated);
                    return Ok(());
                }
                Err(ApplyError::Nsx { source, .. })
                    if (source.is_stale_revision() || source.status() == Some(409))
                        && tries < 5 => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Allocates an address from `pool`, tagged with the cluster and its owner (`owner_scope`
    /// = `owner`), so that only NCP's own allocations are ever found and released as leaks.
    async fn allocate_tagged(
        &self,
        pool: Option<String>,
        key: &Key,
        spec: &Spec,
        owner_scope: &str,
        owner: &str,
        wanted: Option<&str>,
    ) -> Result<String, ApplyError> {
        let pool = pool.ok_or_else(|| ApplyError::NoPool {
            op: format!("allocate an address for {key:?}"),
        })?;
        let body = wire(&AllocationIpAddress {
            meta: ResourceMeta {
                display_name: Some(spec.display_name.clone()),
                tags: Some(vec![
                    Tag::new(scope::CLUSTER, tag_value(spec, scope::CLUSTER)),
                    Tag::new(owner_scope, owner),
                ]),
                ..Default::default()
            },
            // Absent: any free address.
            allocation_id: wanted.map(str::to_string),
        });
        let a = self
            .write(
                Method::POST,
                &format!("pools/ip-pools/{pool}?action=ALLOCATE"),
                Some(body),
            )
            .await?;
        Ok(required(&a, "allocation_id", || {
            format!("POST pools/ip-pools/{pool}?action=ALLOCATE")
        })?
        .to_string())
    }

    /// The VIP of a LoadBalancer service: the one it has, or a new one from the LB pool (the
    /// address `spec.loadBalancerIP` asks for, when it does), tagged so that it is found (and
    /// released) by service. A service that asks for another address than it holds gives
    /// the old one back first.
    async fn vip(
        &self,
        key: &Key,
        spec: &Spec,
        service_uid: &str,
        requested: Option<&str>,
    ) -> Result<String, ApplyError> {
        let held = self.shared().resolved.lb_vips.get(service_uid).cloned();
        if let Some(ip) = &held
            && requested.is_none_or(|r| r == ip)
        {
            return Ok(ip.clone());
        }
        let refuse = |code: &'static str, reason: String| ApplyError::Vip {
            service: service_uid.to_string(),
            code,
            reason,
        };
        let requested = match requested {
            None => None,
            Some(r) => match r.parse::<std::net::Ipv4Addr>() {
                Ok(ip) => Some(ip.to_string()),
                Err(_) => {
                    return Err(refuse(
                        "INVALID_LOADBALANCER_IP",
                        format!(
                            "loadBalancerIP {r:?} is not an IPv4 address (naming an IP pool \
                             there is not supported)"
                        ),
                    ));
                }
            },
        };
        let pool = self.infra.lb_pool.clone();
        if let (Some(old), Some(p)) = (&held, &pool) {
            self.release(p, old).await?;
        }
        let allocated = self
            .allocate_tagged(
                pool.clone(),
                key,
                spec,
                scope::SERVICE_UID,
                service_uid,
                requested.as_deref(),
            )
            .await;
        // NSX's refusals of the address are the service's errors; anything else is NSX's.
        let ip = match allocated {
            Ok(ip) => ip,
            Err(ApplyError::Nsx { op, source }) => {
                let (code, why) = match source.error_code().filter(|_| source.status() == Some(400))
                {
                    Some(NSX_NOT_IN_POOL) => ("IP_NOT_IN_POOL", "is not in"),
                    Some(NSX_ALREADY_ALLOCATED) => ("IP_ALREADY_ALLOCATED", "is already taken in"),
                    Some(NSX_POOL_EXHAUSTED) => ("IP_POOL_EXHAUSTED", "cannot be allocated from"),
                    _ => return Err(ApplyError::Nsx { op, source }),
                };
                let asked = match &requested {
                    Some(ip) => format!("loadBalancerIP {ip}"),
                    None => "an address".into(),
                };
                let pool = pool.unwrap_or_default();
                return Err(refuse(
                    code,
                    format!("{asked} {why} the LB pool {pool}: {source}"),
                ));
            }
            Err(e) => return Err(e),
        };
        self.shared()
            .resolved
            .lb_vips
            .insert(service_uid.to_string(), ip.clone());
        Ok(ip)
    }

    /// Turns on route advertisement of a tier-1 router (connected and NAT routes).
    async fn write_advertisement(&self, id: &str) -> Result<(), ApplyError> {
        let adv_path = format!("logical-routers/{id}/routing/advertisement");
        // Read as raw JSON and only NCP's four fields changed: a field this model does not know
        // (a later NSX's) goes back as it came.
        let mut adv: Value =
            self.client
                .get(&adv_path)
                .await
                .map_err(|source| ApplyError::Nsx {
                    op: format!("GET {adv_path}"),
                    source,
                })?;
        let ours = AdvertisementConfig {
            enabled: Some(true),
            advertise_nsx_connected_routes: Some(true),
            advertise_nat_routes: Some(true),
            advertise_lb_vip: Some(true),
            ..Default::default()
        };
        if let (Some(doc), Value::Object(fields)) = (adv.as_object_mut(), wire(&ours)) {
            doc.extend(fields);
        }
        self.write(Method::PUT, &adv_path, Some(adv))
            .await
            .map(|_| ())
    }

    async fn update(&self, key: &Key, id: &str, spec: &Spec) -> Result<(), ApplyError> {
        let p = format!("{}/{id}", path(key.collection(), self.infra));
        let current = self.shared().resolved.get(key).cloned();
        if let Some((scope_name, value)) = advertised_tag(key)
            && current
                .as_ref()
                .is_none_or(|d| tag_of(d, scope_name) != Some(value))
        {
            self.write_advertisement(id).await?;
        }
        let address = current
            .as_ref()
            .and_then(|d| {
                d["translated_network"]
                    .as_str()
                    .or(d["ip_address"].as_str())
            })
            .map(str::to_string);
        let want = self.render(key, spec, address.as_deref())?;
        if let Key::AllowSection(_) | Key::IsolationSection(_) | Key::NodeSection(_) = key {
            return self.update_section(key, id, want).await;
        }
        self.take_write()?;
        let r = self
            .client
            .update_with::<Value, _>(&p, |doc| {
                for (k, v) in want.as_object().into_iter().flatten() {
                    if k != "resource_type" {
                        doc[k] = v.clone();
                    }
                }
                // A field NCP owns and no longer sets goes (a virtual server's persistence
                // profile once the service drops its affinity).
                if let Some(fields) = doc.as_object_mut() {
                    for f in super::plan::owned(key).0 {
                        if !f.contains('.') && want.get(*f).is_none() {
                            fields.remove(*f);
                        }
                    }
                }
            })
            .await;
        let updated = r.map_err(|source| ApplyError::Nsx {
            op: format!("PUT {p}"),
            source,
        })?;
        self.shared().resolved.put(key.clone(), updated);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(key: Key, detail: Detail) -> Op {
        Op::Create {
            key,
            spec: Spec {
                display_name: String::new(),
                tags: Vec::new(),
                detail,
            },
        }
    }

    fn delete(key: Key) -> Op {
        Op::Delete {
            key,
            doc: json!({"id": "x"}),
        }
    }

    fn vs(service: &str, port: i32) -> Op {
        create(
            Key::LbVirtualServer(format!("{service}/{port}")),
            Detail::LbVirtualServer {
                service_uid: service.into(),
                port,
                protocol: "TCP".into(),
                requested_ip: None,
                persistence: None,
            },
        )
    }

    fn section(key: Key) -> Op {
        create(
            key,
            Detail::Section {
                marker: Key::FwMarkerTop("c".into()),
                rules: Vec::new(),
            },
        )
    }

    /// Names each phase's lanes by their operations' keys.
    fn shape(ops: &[Op]) -> Vec<Vec<Vec<String>>> {
        phases(ops)
            .into_iter()
            .map(|phase| {
                phase
                    .into_iter()
                    .map(|lane| {
                        lane.into_iter()
                            .map(|op| match op {
                                Op::ReleaseIp { ip, .. } => format!("release {ip}"),
                                Op::Delete { key, .. } => format!("delete {key:?}"),
                                Op::Create { key, .. } | Op::Update { key, .. } => {
                                    format!("{key:?}")
                                }
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn phases_keep_dependencies_apart_and_lanes_keep_shared_things_in_order() {
        let ns = |k: fn(String) -> Key, u: &str| k(u.to_string());
        let pod = |uid: &str| {
            create(
                Key::PodPort(uid.into()),
                Detail::PodPort {
                    namespace_uid: "a".into(),
                    node: "n".into(),
                    app_id: String::new(),
                    attachment_id: String::new(),
                    vlan: None,
                },
            )
        };
        let ops = vec![
            delete(Key::PodPort("old".into())),
            delete(ns(Key::Switch, "gone")),
            Op::ReleaseIp {
                pool: "p".into(),
                ip: "192.0.2.9".into(),
            },
            create(ns(Key::Subnet, "a"), Detail::Subnet { size: 256 }),
            create(ns(Key::Tier1, "a"), Detail::Tier1),
            create(ns(Key::Subnet, "b"), Detail::Subnet { size: 256 }),
            create(ns(Key::Pool, "a"), Detail::Pool),
            vs("svc", 80),
            vs("svc", 443),
            vs("other", 80),
            create(ns(Key::Switch, "a"), Detail::Switch),
            pod("p1"),
            pod("p2"),
            section(Key::AllowSection("pol".into())),
            section(Key::IsolationSection("pol".into())),
            delete(Key::PolicyGroup("g".into())),
        ];
        let s = |v: &[&[&str]]| -> Vec<Vec<String>> {
            v.iter()
                .map(|l| l.iter().map(|x| x.to_string()).collect())
                .collect()
        };
        assert_eq!(
            shape(&ops),
            vec![
                // Children deleted before their parents, in phases of their own.
                s(&[&["delete PodPort(\"old\")"]]),
                s(&[&["delete Switch(\"gone\")"]]),
                s(&[&["release 192.0.2.9"]]),
                // Independent roots at once.
                s(&[&["Subnet(\"a\")"], &["Tier1(\"a\")"], &["Subnet(\"b\")"]]),
                // One service's virtual servers share its VIP: one lane.
                s(&[
                    &["Pool(\"a\")"],
                    &[
                        "LbVirtualServer(\"svc/80\")",
                        "LbVirtualServer(\"svc/443\")"
                    ],
                    &["LbVirtualServer(\"other/80\")"],
                ]),
                s(&[&["Switch(\"a\")"]]),
                s(&[&["PodPort(\"p1\")"], &["PodPort(\"p2\")"]]),
                // The firewall's sections go one at a time, in plan order.
                s(&[&["AllowSection(\"pol\")", "IsolationSection(\"pol\")"]]),
                s(&[&["delete PolicyGroup(\"g\")"]]),
            ]
        );
    }

    #[test]
    fn an_answer_without_its_id_is_an_error_never_an_empty_string() {
        let op = || "POST logical-ports".to_string();
        assert_eq!(
            required(&json!({"id": "lp-1"}), "id", op).ok(),
            Some("lp-1")
        );
        for answer in [json!({}), json!({"id": ""}), json!({"id": 7}), json!(null)] {
            match required(&answer, "id", op) {
                Err(e @ ApplyError::BadAnswer { field: "id", .. }) => {
                    assert!(e.is_retryable(), "a later pass observes and starts again");
                    assert!(!is_permanent(&e));
                    assert_eq!(e.to_string(), "NSX answered POST logical-ports without id");
                }
                other => panic!("{answer}: {other:?}"),
            }
        }
    }
}
