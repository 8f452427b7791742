//! The manager's database: every object, the allocations, the firewall order, and the search
//! index, behind synchronous operations that either apply a whole change or none of it.
//!
//! Contract of every mutating operation (and of the per-kind hooks in the submodules): all
//! checks that can fail come first; mutation starts only when nothing can fail any more. A
//! rejected request therefore leaves the store exactly as it was, which the property test in
//! `tests/` checks after every request ([`Store::check_invariants`]).
//!
//! The store owns no clock: the caller passes `now_ms` in [`Ctx`], so the simulation controls
//! time and the same requests at the same times give the same state.
//!
//! Layout:
//! - this module: generic create/read/update/delete, stamping server fields, revisions,
//!   protection, rendering, lists and the search index plumbing;
//! - [`network`]: switches, ports (address allocation), routers, router ports, NAT;
//! - [`pools`]: IP blocks, block subnets, IP pools and their ALLOCATE/RELEASE actions;
//! - [`grouping`]: NSGroups, IPSets, NSServices;
//! - [`firewall`]: sections in order, rules in order, the default section and rule;
//! - [`lb`]: load balancer services, virtual servers, pools, profiles.

mod dataplane;
mod firewall;
mod grouping;
mod lb;
mod network;
mod pools;
mod topology;

pub use dataplane::{Connections, Entry, Packet, Protocol, Trace, Verdict};

use std::collections::{BTreeMap, BTreeSet};

use nsx_core::rng::SeededRng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::error::{self, ApiError, ApiResult};
use crate::ipam::Allocations;
use crate::kind::Kind;
use crate::search::{self, SearchIndex};

pub use network::PortAlloc;

/// Parses `?operation=..&id=..` of the firewall calls.
pub fn firewall_placement(
    operation: Option<&str>,
    anchor: Option<&str>,
) -> ApiResult<firewall::Placement> {
    firewall::Placement::parse(operation, anchor)
}

pub use firewall::Placement;

/// `/api/v1/cluster/api-service`: the manager's API limits, as an admin sets them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiServiceConfig {
    /// Requests per second per client (429 beyond); 0 = no limit.
    pub client_api_rate_limit: u32,
    /// Requests in flight per client (503 beyond); 0 = no limit.
    pub client_api_concurrency_limit: u32,
    /// Requests in flight in all (503 beyond); 0 = no limit.
    pub global_api_concurrency_limit: u32,
    pub session_timeout: u32,
    /// Seconds a connection may take to send a request's headers or body, and may sit idle
    /// between requests, before the manager closes it (NSX's default 30).
    #[serde(default = "default_connection_timeout")]
    pub connection_timeout: u32,
    #[serde(default)]
    pub resource_type: String,
    #[serde(rename = "_revision", default)]
    pub revision: i64,
}

fn default_connection_timeout() -> u32 {
    30
}

impl Default for ApiServiceConfig {
    fn default() -> Self {
        Self {
            client_api_rate_limit: 100,
            client_api_concurrency_limit: 40,
            global_api_concurrency_limit: 199,
            session_timeout: 1800,
            connection_timeout: default_connection_timeout(),
            resource_type: "ApiServiceConfig".into(),
            revision: 0,
        }
    }
}

impl ApiServiceConfig {
    /// Applies a PUT body, revision-checked.
    pub fn apply(&mut self, body: &Value) -> ApiResult<()> {
        let rev = body.get("_revision").and_then(Value::as_i64);
        if rev != Some(self.revision) {
            return Err(ApiError::new(
                412,
                error::STALE_REVISION,
                "common-services",
                "The object was modified by somebody else.",
            ));
        }
        let num = |k: &str, cur: u32| -> ApiResult<u32> {
            match body.get(k) {
                None => Ok(cur),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        ApiError::validation(format!("{k} must be a non-negative integer"))
                    }),
            }
        };
        let next = Self {
            client_api_rate_limit: num("client_api_rate_limit", self.client_api_rate_limit)?,
            client_api_concurrency_limit: num(
                "client_api_concurrency_limit",
                self.client_api_concurrency_limit,
            )?,
            global_api_concurrency_limit: num(
                "global_api_concurrency_limit",
                self.global_api_concurrency_limit,
            )?,
            session_timeout: num("session_timeout", self.session_timeout)?,
            connection_timeout: num("connection_timeout", self.connection_timeout)?,
            resource_type: self.resource_type.clone(),
            revision: self.revision + 1,
        };
        *self = next;
        Ok(())
    }
}

/// Who is asking, and when. Built by the HTTP layer for every request.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub user: String,
    /// May override protected objects with `X-Allow-Overwrite: true`.
    pub superuser: bool,
    /// Objects this principal creates are PROTECTED.
    pub protected_principal: bool,
    pub allow_overwrite: bool,
    pub now_ms: i64,
}

impl Ctx {
    pub fn admin(now_ms: i64) -> Self {
        Self {
            user: "admin".into(),
            superuser: true,
            protected_principal: false,
            allow_overwrite: false,
            now_ms,
        }
    }
}

/// Settings of the store that a scenario or the admin API may change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreConfig {
    pub seed: u64,
    /// Tag limits (NSX 2.5: scope 128, tag 256, 30 tags).
    pub tag_scope_max: usize,
    pub tag_value_max: usize,
    pub tags_max: usize,
    /// How long a write takes to show in search.
    pub search_lag_ms: i64,
    /// `error_code` of a stale-revision answer (not public).
    pub stale_revision_error_code: i64,
    /// Status of a GET of a missing NAT rule (the real manager answers 400).
    pub missing_nat_rule_status: u16,
    /// Rate and concurrency limits (`/api/v1/cluster/api-service`).
    #[serde(default)]
    pub api_service: ApiServiceConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            tag_scope_max: 128,
            tag_value_max: 256,
            tags_max: 30,
            search_lag_ms: 0,
            stale_revision_error_code: error::STALE_REVISION,
            missing_nat_rule_status: 400,
            api_service: ApiServiceConfig::default(),
        }
    }
}

/// One stored object: its kind, its document (server fields included) and, for nested
/// objects, the id of the object it lives under (a router for NAT rules, a section for rules).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Obj {
    pub kind: Kind,
    pub doc: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

impl Obj {
    pub fn str(&self, field: &str) -> Option<&str> {
        self.doc.get(field).and_then(Value::as_str)
    }

    pub fn resource_type(&self) -> &str {
        self.str("resource_type").unwrap_or("")
    }

    pub fn revision(&self) -> i64 {
        self.doc
            .get("_revision")
            .and_then(Value::as_i64)
            .unwrap_or(0)
    }
}

/// Query flags of a DELETE.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeleteFlags {
    pub cascade: bool,
    pub detach: bool,
    pub force: bool,
}

/// Paging and sorting of a list or search.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub cursor: Option<String>,
    pub page_size: Option<usize>,
    pub sort_by: Option<String>,
    pub sort_ascending: Option<bool>,
    pub included_fields: Option<Vec<String>>,
}

/// The whole database. `Clone` is what atomic batches roll back to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Store {
    pub config: StoreConfig,
    objects: BTreeMap<String, Obj>,
    by_kind: BTreeMap<Kind, BTreeSet<String>>,
    /// Ordered children: firewall section -> rule ids in evaluation order; router -> NAT rules.
    children: BTreeMap<String, Vec<String>>,
    /// Firewall sections in evaluation order; the default section is last.
    section_order: Vec<String>,
    /// Allocated addresses per IP pool and per block subnet.
    ip_alloc: BTreeMap<String, Allocations>,
    /// What each logical port was given for `allocate_addresses`.
    port_alloc: BTreeMap<String, PortAlloc>,
    /// Block subnets carved per block: block id -> subnet ids.
    block_subnets: BTreeMap<String, BTreeSet<String>>,
    /// Route advertisement per router (a sub-resource with its own `_revision`).
    advertisement: BTreeMap<String, Map<String, Value>>,
    /// Lowest address of each pool that may be free: every address of the pool's ranges below
    /// it is allocated or reserved. Makes handing out the next address O(1) amortized instead
    /// of a walk over every allocation. Derived state: 0 (scan from the start) is always safe.
    #[serde(default)]
    ip_hint: BTreeMap<String, u32>,
    /// `display_name` and `tags` an API allocation was made with, per pool and address.
    #[serde(default)]
    alloc_meta: BTreeMap<String, BTreeMap<u32, Value>>,
    /// The distributed firewall's exclude list: its members (references) and revision.
    #[serde(default)]
    exclude_list: (Vec<Value>, i64),
    /// VIF attachment id -> logical port: the uniqueness check without a scan of every port.
    #[serde(skip)]
    vif_index: BTreeMap<String, String>,
    next_mac: u64,
    next_vni: i64,
    next_rule_id: u64,
    rng: SeededRng,
    #[serde(skip)]
    index: SearchIndex,
    #[serde(skip)]
    dirty: BTreeSet<String>,
    /// The dataplane's index of the network (derived, dropped by every change).
    #[serde(skip)]
    topology: topology::TopologyCache,
}

impl Store {
    pub fn new(config: StoreConfig) -> Self {
        Self {
            rng: SeededRng::new(config.seed),
            config,
            objects: BTreeMap::new(),
            by_kind: BTreeMap::new(),
            children: BTreeMap::new(),
            section_order: Vec::new(),
            ip_alloc: BTreeMap::new(),
            port_alloc: BTreeMap::new(),
            block_subnets: BTreeMap::new(),
            advertisement: BTreeMap::new(),
            ip_hint: BTreeMap::new(),
            alloc_meta: BTreeMap::new(),
            exclude_list: (Vec::new(), 0),
            vif_index: BTreeMap::new(),
            next_mac: 1,
            next_vni: 67_584,
            next_rule_id: 1_000,
            index: SearchIndex::default(),
            dirty: BTreeSet::new(),
            topology: topology::TopologyCache::default(),
        }
    }

    /// After loading from a state file (and replaying its journal): rebuild the search index,
    /// immediately visible.
    pub fn rebuild_index(&mut self, now_ms: i64) {
        self.index = SearchIndex::default();
        self.dirty.clear();
        self.topology.clear();
        self.vif_index = self
            .objects
            .iter()
            .filter_map(|(id, o)| network::vif_key(o).map(|k| (k, id.clone())))
            .collect();
        let ids: Vec<String> = self.objects.keys().cloned().collect();
        for id in ids {
            let doc = self.render(&id);
            self.index.upsert(&id, doc, now_ms, 0);
        }
        self.index.catch_up(now_ms);
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    pub fn object(&self, id: &str) -> Option<&Obj> {
        self.objects.get(id)
    }

    /// The object and its id as stored.
    pub fn object_entry(&self, id: &str) -> Option<(&String, &Obj)> {
        self.objects.get_key_value(id)
    }

    /// Objects of one kind, in id order.
    pub fn ids_of(&self, kind: Kind) -> impl Iterator<Item = &String> {
        self.by_kind.get(&kind).into_iter().flatten()
    }

    pub fn objects(&self) -> impl Iterator<Item = (&String, &Obj)> {
        self.objects.iter()
    }

    /// Firewall sections in evaluation order.
    pub fn section_order(&self) -> &[String] {
        &self.section_order
    }

    /// Rules of a section in evaluation order.
    pub fn rules_of(&self, section_id: &str) -> &[String] {
        self.children.get(section_id).map_or(&[], Vec::as_slice)
    }

    pub fn port_allocation(&self, port_id: &str) -> Option<&PortAlloc> {
        self.port_alloc.get(port_id)
    }

    /// Pushes this request's changes into the search index (they show after the lag).
    pub fn flush_index(&mut self, now_ms: i64) {
        let lag = self.config.search_lag_ms;
        for id in std::mem::take(&mut self.dirty) {
            if self.objects.contains_key(&id) {
                let doc = self.render(&id);
                self.index.upsert(&id, doc, now_ms, lag);
            } else {
                self.index.delete(&id, now_ms, lag);
            }
        }
        // Apply what is due now (everything when there is no lag), so indexing costs the write
        // that caused it, as on a manager whose indexer keeps up, not the next search.
        self.index.catch_up(now_ms);
    }

    // ----- generic operations ------------------------------------------------------------

    /// POST a new object of `kind` (under `parent` for nested kinds).
    pub fn create(
        &mut self,
        ctx: &Ctx,
        kind: Kind,
        body: &Value,
        parent: Option<&str>,
    ) -> ApiResult<Value> {
        let mut doc = kind.validate(body)?;
        self.check_common(&doc)?;
        // The id is drawn from a copy of the generators: a rejected create must not advance them.
        let (rng, rule_id) = (self.rng.clone(), self.next_rule_id);
        let id = self.new_id(kind);
        if let Err(e) = self.on_create(ctx, kind, &id, &mut doc, parent) {
            self.rng = rng;
            self.next_rule_id = rule_id;
            return Err(e);
        }
        self.insert_new(ctx, kind, &id, doc, parent);
        Ok(Value::Object(self.render(&id)))
    }

    /// Stamps server fields and stores a document that has passed every check.
    fn insert_new(
        &mut self,
        ctx: &Ctx,
        kind: Kind,
        id: &str,
        mut doc: Map<String, Value>,
        parent: Option<&str>,
    ) {
        doc.insert("id".into(), json!(id));
        if doc
            .get("display_name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            doc.insert("display_name".into(), json!(id));
        }
        doc.insert("_revision".into(), json!(0));
        doc.insert("_create_user".into(), json!(ctx.user));
        doc.insert("_create_time".into(), json!(ctx.now_ms));
        doc.insert("_last_modified_user".into(), json!(ctx.user));
        doc.insert("_last_modified_time".into(), json!(ctx.now_ms));
        doc.insert("_system_owned".into(), json!(false));
        let protection = if ctx.protected_principal {
            "PROTECTED"
        } else {
            "NOT_PROTECTED"
        };
        doc.insert("_protection".into(), json!(protection));
        let obj = Obj {
            kind,
            doc,
            parent: parent.map(str::to_string),
        };
        if let Some(k) = network::vif_key(&obj) {
            self.vif_index.insert(k, id.to_string());
        }
        self.objects.insert(id.to_string(), obj);
        self.by_kind.entry(kind).or_default().insert(id.to_string());
        if let Some(p) = parent {
            self.children
                .entry(p.to_string())
                .or_default()
                .push(id.to_string());
            self.touch(p.to_string());
        }
        self.touch(id.to_string());
    }

    /// GET one object, rendered with its read-only computed fields.
    pub fn get(&self, kind: Kind, id: &str) -> ApiResult<Value> {
        self.expect(kind, id)?;
        Ok(Value::Object(self.render(id)))
    }

    /// PUT a full object: `_revision` must match, immutable fields must not change.
    pub fn update(&mut self, ctx: &Ctx, kind: Kind, id: &str, body: &Value) -> ApiResult<Value> {
        let current = self.expect(kind, id)?.clone();
        self.check_writable(ctx, &current)?;
        let mut doc = kind.validate(body)?;
        self.check_common(&doc)?;
        self.check_revision(kind, &current, doc.get("_revision"))?;
        for field in kind.immutable() {
            let (old, new) = (current.doc.get(*field), doc.get(*field));
            if new.is_some() && old != new {
                return Err(ApiError::validation(format!(
                    "{field} can not be modified (was {}, got {})",
                    old.unwrap_or(&Value::Null),
                    new.unwrap_or(&Value::Null)
                )));
            }
        }
        self.on_update(ctx, kind, id, &current, &mut doc)?;
        self.commit_update(ctx, id, &current, doc);
        Ok(Value::Object(self.render(id)))
    }

    /// Replaces a document after every check passed: server fields carried over, revision +1.
    fn commit_update(&mut self, ctx: &Ctx, id: &str, current: &Obj, mut doc: Map<String, Value>) {
        for key in [
            "id",
            "_create_user",
            "_create_time",
            "_system_owned",
            "_protection",
        ] {
            if let Some(v) = current.doc.get(key) {
                doc.insert(key.into(), v.clone());
            }
        }
        for key in self.server_fields(current.kind) {
            match current.doc.get(*key) {
                Some(v) => doc.insert((*key).into(), v.clone()),
                None => doc.remove(*key),
            };
        }
        if doc
            .get("display_name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            doc.insert("display_name".into(), json!(id));
        }
        doc.insert("_revision".into(), json!(current.revision() + 1));
        doc.insert("_last_modified_user".into(), json!(ctx.user));
        doc.insert("_last_modified_time".into(), json!(ctx.now_ms));
        if let Some(o) = self.objects.get_mut(id) {
            if let Some(k) = network::vif_key(o) {
                self.vif_index.remove(&k);
            }
            o.doc = doc;
            if let Some(k) = network::vif_key(o) {
                self.vif_index.insert(k, id.to_string());
            }
        }
        self.touch(id.to_string());
    }

    /// Fields the server owns beyond the common ones: a PUT cannot set them.
    fn server_fields(&self, kind: Kind) -> &'static [&'static str] {
        match kind {
            Kind::LogicalSwitch => &["vni"],
            Kind::LogicalPort => &["attachment_by_router"],
            Kind::IpBlockSubnet => &["cidr", "allocation_ranges", "start_ip"],
            Kind::LogicalRouterPort => &["mac_address"],
            Kind::FirewallRule => &["section_id", "is_default"],
            Kind::FirewallSection => &["is_default"],
            _ => &[],
        }
    }

    /// DELETE with the kind's dependency rules.
    pub fn delete(&mut self, ctx: &Ctx, kind: Kind, id: &str, flags: DeleteFlags) -> ApiResult<()> {
        let current = self.expect(kind, id)?.clone();
        self.check_writable(ctx, &current)?;
        if current.doc.get("_system_owned") == Some(&Value::Bool(true)) {
            return Err(ApiError::bad_request(
                error::IN_USE,
                kind.module(),
                format!(
                    "{} {id} is system owned and can not be deleted.",
                    current.resource_type()
                ),
            ));
        }
        self.on_delete(ctx, kind, id, &current, flags)
    }

    /// Removes an object whose dependents are already handled.
    fn remove(&mut self, id: &str) -> Option<Obj> {
        let obj = self.objects.remove(id)?;
        if let Some(k) = network::vif_key(&obj) {
            self.vif_index.remove(&k);
        }
        if let Some(set) = self.by_kind.get_mut(&obj.kind) {
            set.remove(id);
        }
        if let Some(parent) = &obj.parent {
            if let Some(list) = self.children.get_mut(parent) {
                list.retain(|c| c != id);
            }
            self.touch(parent.clone());
        }
        self.children.remove(id);
        self.touch(id.to_string());
        Some(obj)
    }

    /// GET a collection: `filter` picks members, paging and sorting as NSX does.
    pub fn list(&self, kind: Kind, filter: impl Fn(&Obj) -> bool, page: &Page) -> ApiResult<Value> {
        let ids: Vec<&String> = self
            .ids_of(kind)
            .filter(|id| self.objects.get(*id).is_some_and(&filter))
            .collect();
        let docs: Vec<Map<String, Value>> = ids.iter().map(|id| self.render(id)).collect();
        paginate(docs, page, kind.max_page_size())
    }

    /// GET a nested collection in its own order (rules of a section, NAT rules of a router).
    pub fn list_children(&self, parent: &str, page: &Page, max: usize) -> ApiResult<Value> {
        let docs: Vec<Map<String, Value>> = self
            .children
            .get(parent)
            .into_iter()
            .flatten()
            .map(|id| self.render(id))
            .collect();
        paginate(docs, page, max)
    }

    /// The search API over the (lagging) index.
    pub fn search(&mut self, query: &str, page: &Page, now_ms: i64) -> ApiResult<Value> {
        let q = search::parse(query).map_err(|reason| {
            ApiError::bad_request(
                error::SEARCH_QUERY,
                "search",
                format!("Invalid search query '{query}': {reason}"),
            )
        })?;
        self.index.catch_up(now_ms);
        let docs: Vec<Map<String, Value>> = self
            .index
            .search(&q)
            .into_iter()
            .map(|(_, d)| (*d).clone())
            .collect();
        let mut answer = paginate(docs, page, 1000)?;
        // Search answers always carry the cursor (on the last page, the result count):
        // nsxlib's `search_all_*` read it on every page and stop once it reaches the count.
        if let Some(out) = answer.as_object_mut()
            && !out.contains_key("cursor")
        {
            let count = out.get("result_count").cloned().unwrap_or(json!(0));
            out.insert(
                "cursor".into(),
                json!(count.as_u64().unwrap_or(0).to_string()),
            );
        }
        Ok(answer)
    }

    /// Makes every write visible to search now, as if the lag had passed (tests).
    pub fn catch_up_index(&mut self) {
        self.index.catch_up(i64::MAX);
    }

    /// Number of writes not yet visible to search.
    pub fn search_pending(&self) -> usize {
        self.index.pending_len()
    }

    /// The common start of a member action (`ADD_MEMBERS` and friends): the object, writable
    /// by this caller, the `members` the body gives and the ones it has.
    fn member_action_inputs(
        &self,
        ctx: &Ctx,
        kind: Kind,
        id: &str,
        body: &Value,
    ) -> ApiResult<(Obj, Vec<Value>, Vec<Value>)> {
        let current = self.expect(kind, id)?.clone();
        self.check_writable(ctx, &current)?;
        let given = body
            .get("members")
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| ApiError::validation("required property members is missing"))?;
        let members = current
            .doc
            .get("members")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        Ok((current, given, members))
    }

    /// Deletes an object no other object refers to (`force` ignores the references, as NSX's
    /// `force=true` does).
    fn delete_unless_referenced(&mut self, id: &str, module: &str, force: bool) -> ApiResult<()> {
        let users: Vec<String> = self
            .referrers(id)
            .iter()
            .filter_map(|o| o.str("id").map(str::to_string))
            .collect();
        if !users.is_empty() && !force {
            let kind = self
                .objects
                .get(id)
                .map(|o| o.resource_type().to_string())
                .unwrap_or_default();
            return Err(ApiError::in_use(
                module,
                format!(
                    "{kind} {id} is referenced by {}. Remove the references first.",
                    users.join(", ")
                ),
            ));
        }
        self.remove(id);
        Ok(())
    }

    // ----- shared checks -----------------------------------------------------------------

    fn expect(&self, kind: Kind, id: &str) -> ApiResult<&Obj> {
        match self.objects.get(id) {
            Some(o) if o.kind == kind => Ok(o),
            _ => Err(ApiError::not_found(id)),
        }
    }

    /// The object exists and is of one of `kinds` (for references in bodies).
    fn expect_ref(&self, field: &str, id: &str, kinds: &[Kind]) -> ApiResult<&Obj> {
        match self.objects.get(id) {
            Some(o) if kinds.contains(&o.kind) => Ok(o),
            _ => Err(ApiError::validation(format!(
                "{field}: the referenced object {id} does not exist or is not a {kinds:?}"
            ))),
        }
    }

    fn check_common(&self, doc: &Map<String, Value>) -> ApiResult<()> {
        if let Some(name) = doc.get("display_name").and_then(Value::as_str)
            && name.chars().count() > 255
        {
            return Err(ApiError::validation(
                "display_name: size must be between 0 and 255",
            ));
        }
        if let Some(d) = doc.get("description").and_then(Value::as_str)
            && d.chars().count() > 1024
        {
            return Err(ApiError::validation(
                "description: size must be between 0 and 1024",
            ));
        }
        if let Some(Value::Array(tags)) = doc.get("tags") {
            if tags.len() > self.config.tags_max {
                return Err(ApiError::validation(format!(
                    "tags: size must be between 0 and {}",
                    self.config.tags_max
                )));
            }
            for t in tags {
                let scope = t.get("scope").and_then(Value::as_str).unwrap_or("");
                let tag = t.get("tag").and_then(Value::as_str).unwrap_or("");
                if scope.chars().count() > self.config.tag_scope_max {
                    return Err(ApiError::validation(format!(
                        "tags.scope: size must be between 0 and {} ({scope})",
                        self.config.tag_scope_max
                    )));
                }
                if tag.chars().count() > self.config.tag_value_max {
                    return Err(ApiError::validation(format!(
                        "tags.tag: size must be between 0 and {} ({tag})",
                        self.config.tag_value_max
                    )));
                }
            }
        }
        Ok(())
    }

    fn check_revision(&self, kind: Kind, current: &Obj, given: Option<&Value>) -> ApiResult<()> {
        let status = kind.stale_status();
        let code = if status == 409 {
            error::FIREWALL_CONFLICT
        } else {
            self.config.stale_revision_error_code
        };
        match given.and_then(Value::as_i64) {
            Some(r) if r == current.revision() => Ok(()),
            Some(r) => Err(ApiError::new(
                status,
                code,
                kind.module(),
                format!(
                    "The object was modified by somebody else. Current revision is {}, given revision is {r}.",
                    current.revision()
                ),
            )),
            None => Err(ApiError::new(
                status,
                code,
                kind.module(),
                "The _revision property is required for an update.",
            )),
        }
    }

    /// Protected objects may be changed only by their creator, or by a superuser who sends
    /// `X-Allow-Overwrite: true`.
    fn check_writable(&self, ctx: &Ctx, obj: &Obj) -> ApiResult<()> {
        let protected = obj.str("_protection") == Some("PROTECTED");
        let owner = obj.str("_create_user").unwrap_or("");
        if !protected || owner == ctx.user || (ctx.allow_overwrite && ctx.superuser) {
            return Ok(());
        }
        Err(ApiError::bad_request(
            error::PROTECTED,
            "common-services",
            format!(
                "Principal '{}' attempts to delete or modify an object of type {} it doesn't own. (createUser={owner}, allowOverwrite={})",
                ctx.user,
                obj.resource_type(),
                if ctx.allow_overwrite { "true" } else { "null" }
            ),
        ))
    }

    fn new_id(&mut self, kind: Kind) -> String {
        match kind {
            // Firewall and NAT rule ids are numbers.
            Kind::FirewallRule | Kind::NatRule => {
                self.next_rule_id += 1;
                self.next_rule_id.to_string()
            }
            _ => loop {
                let id = self.rng.uuid();
                if !self.objects.contains_key(&id) {
                    break id;
                }
            },
        }
    }

    /// The document with read-only computed fields, as GET shows it.
    pub fn render(&self, id: &str) -> Map<String, Value> {
        let Some(obj) = self.objects.get(id) else {
            return Map::new();
        };
        let mut doc = obj.doc.clone();
        match obj.kind {
            Kind::IpPool => {
                doc.insert("pool_usage".into(), self.pool_usage(id));
            }
            Kind::FirewallSection => {
                doc.insert("rule_count".into(), json!(self.rules_of(id).len()));
            }
            _ => {}
        }
        doc
    }

    // ----- dispatch to the per-kind hooks --------------------------------------------------

    fn on_create(
        &mut self,
        ctx: &Ctx,
        kind: Kind,
        id: &str,
        doc: &mut Map<String, Value>,
        parent: Option<&str>,
    ) -> ApiResult<()> {
        match kind {
            Kind::EdgeCluster | Kind::TransportZone => Ok(()),
            Kind::LogicalSwitch => self.switch_create(doc),
            Kind::LogicalPort => self.port_create(id, doc),
            Kind::LogicalRouter => self.router_edge_check(doc),
            Kind::LogicalRouterPort => self.router_port_create(id, doc),
            Kind::NatRule => self.nat_create(doc, parent),
            Kind::IpBlock => self.block_write(None, doc),
            Kind::IpBlockSubnet => self.block_subnet_create(id, doc),
            Kind::IpPool => self.pool_write(None, doc),
            Kind::NsGroup => self.nsgroup_write(Some(id), doc),
            Kind::IpSet => grouping::ipset_check(doc),
            Kind::NsService => grouping::nsservice_check(doc),
            Kind::FirewallSection => self.section_create_check(doc),
            Kind::FirewallRule => self.rule_check(doc),
            Kind::LbService => self.lb_service_write(None, doc),
            Kind::LbVirtualServer => self.lb_vs_write(doc),
            Kind::LbPool => lb::lb_pool_check(doc),
            Kind::LbPersistenceProfile => lb::persistence_check(doc),
            Kind::LbAppProfile => {
                let _ = ctx;
                Ok(())
            }
        }
    }

    fn on_update(
        &mut self,
        _ctx: &Ctx,
        kind: Kind,
        id: &str,
        current: &Obj,
        doc: &mut Map<String, Value>,
    ) -> ApiResult<()> {
        match kind {
            Kind::LogicalSwitch => self.switch_update(current, doc),
            Kind::LogicalPort => self.port_update(id, current, doc),
            Kind::LogicalRouterPort => self.router_port_update(current, doc),
            Kind::NatRule => self.nat_update(current, doc),
            Kind::IpBlock => self.block_write(Some(id), doc),
            Kind::IpBlockSubnet => Err(ApiError::method_not_allowed(
                "PUT",
                &format!("/api/v1/pools/ip-subnets/{id}"),
            )),
            Kind::IpPool => self.pool_write(Some(id), doc),
            Kind::NsGroup => self.nsgroup_write(Some(id), doc),
            Kind::IpSet => grouping::ipset_check(doc),
            Kind::NsService => grouping::nsservice_check(doc),
            Kind::FirewallSection => self.section_update_check(current, doc),
            Kind::FirewallRule => self.rule_update_check(current, doc),
            Kind::LbService => self.lb_service_write(Some(id), doc),
            Kind::LbVirtualServer => self.lb_vs_write(doc),
            Kind::LbPool => lb::lb_pool_check(doc),
            Kind::LogicalRouter => self.router_update_check(id, current, doc),
            Kind::LbPersistenceProfile => lb::persistence_check(doc),
            Kind::EdgeCluster | Kind::TransportZone | Kind::LbAppProfile => Ok(()),
        }
    }

    fn on_delete(
        &mut self,
        ctx: &Ctx,
        kind: Kind,
        id: &str,
        current: &Obj,
        flags: DeleteFlags,
    ) -> ApiResult<()> {
        match kind {
            Kind::EdgeCluster => self.edge_cluster_delete(id),
            Kind::TransportZone => self.transport_zone_delete(id),
            Kind::LogicalSwitch => self.switch_delete(ctx, id, flags),
            Kind::LogicalPort => self.port_delete(id, current, flags),
            Kind::LogicalRouter => self.router_delete(id, flags),
            Kind::LogicalRouterPort => self.router_port_delete(id, current, flags),
            Kind::NatRule => {
                self.remove(id);
                Ok(())
            }
            Kind::IpBlock => self.block_delete(id),
            Kind::IpBlockSubnet => self.block_subnet_delete(id, current),
            Kind::IpPool => self.pool_delete(id, flags),
            Kind::NsGroup | Kind::IpSet | Kind::NsService => self.grouping_delete(id, flags),
            Kind::FirewallSection => self.section_delete(id, current, flags),
            Kind::FirewallRule => self.rule_delete(id, current),
            Kind::LbService => {
                self.remove(id);
                Ok(())
            }
            Kind::LbVirtualServer
            | Kind::LbPool
            | Kind::LbAppProfile
            | Kind::LbPersistenceProfile => self.lb_delete(id),
        }
    }

    /// Every object that refers to `id` in one of the reference fields NSX checks on delete.
    fn referrers(&self, id: &str) -> Vec<&Obj> {
        self.objects
            .values()
            .filter(|o| o.doc.get("id").and_then(Value::as_str) != Some(id))
            .filter(|o| references(&Value::Object(o.doc.clone()), id))
            .collect()
    }

    // ----- invariants --------------------------------------------------------------------

    /// Checks every structural invariant of the store. Used by tests after each request and
    /// by the simulation's checkers; returns the first violation found.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut counted = 0;
        for (kind, ids) in &self.by_kind {
            for id in ids {
                let o = self
                    .objects
                    .get(id)
                    .ok_or(format!("by_kind has {id} but objects does not"))?;
                if o.kind != *kind {
                    return Err(format!("{id} is listed under {kind:?} but is {:?}", o.kind));
                }
                counted += 1;
            }
        }
        if counted != self.objects.len() {
            return Err(format!(
                "by_kind lists {counted} objects, store has {}",
                self.objects.len()
            ));
        }
        for (id, o) in &self.objects {
            if o.str("id") != Some(id.as_str()) {
                return Err(format!("{id}: doc id is {:?}", o.str("id")));
            }
            if o.revision() < 0 {
                return Err(format!("{id}: negative revision"));
            }
            if !o.kind.resource_types().contains(&o.resource_type()) {
                return Err(format!(
                    "{id}: resource_type {} for {:?}",
                    o.resource_type(),
                    o.kind
                ));
            }
            if let Some(p) = &o.parent {
                if !self.objects.contains_key(p) {
                    return Err(format!("{id}: parent {p} is gone"));
                }
                if !self.children.get(p).is_some_and(|c| c.contains(id)) {
                    return Err(format!("{id}: not among the children of {p}"));
                }
            }
            self.check_kind_invariants(id, o)?;
        }
        for (p, kids) in &self.children {
            let unique: BTreeSet<&String> = kids.iter().collect();
            if unique.len() != kids.len() {
                return Err(format!("{p}: a child is listed twice"));
            }
            for k in kids {
                if self.objects.get(k).and_then(|o| o.parent.as_deref()) != Some(p.as_str()) {
                    return Err(format!("{p}: child {k} does not name it as parent"));
                }
            }
        }
        let expected: BTreeMap<String, String> = self
            .objects
            .iter()
            .filter_map(|(id, o)| network::vif_key(o).map(|k| (k, id.clone())))
            .collect();
        if expected != self.vif_index {
            return Err("the VIF attachment index differs from the ports".into());
        }
        self.check_firewall_invariants()?;
        self.check_allocation_invariants()?;
        self.check_topology()?;
        Ok(())
    }

    fn check_kind_invariants(&self, id: &str, o: &Obj) -> Result<(), String> {
        let must_exist = |field: &str, kinds: &[Kind]| -> Result<(), String> {
            if let Some(r) = o.str(field) {
                match self.objects.get(r) {
                    Some(t) if kinds.contains(&t.kind) => {}
                    _ => return Err(format!("{id}: {field} {r} dangles")),
                }
            }
            Ok(())
        };
        match o.kind {
            Kind::LogicalSwitch => {
                must_exist("transport_zone_id", &[Kind::TransportZone])?;
                must_exist("ip_pool_id", &[Kind::IpPool])
            }
            Kind::LogicalPort => must_exist("logical_switch_id", &[Kind::LogicalSwitch]),
            Kind::LogicalRouterPort => must_exist("logical_router_id", &[Kind::LogicalRouter]),
            Kind::IpBlockSubnet => must_exist("block_id", &[Kind::IpBlock]),
            Kind::LbVirtualServer => {
                must_exist("application_profile_id", &[Kind::LbAppProfile])?;
                must_exist("pool_id", &[Kind::LbPool])
            }
            _ => Ok(()),
        }
    }
}

/// A list field of a body, checked against NSX's size limit for it (absent = empty).
pub(crate) fn bounded_list(
    doc: &Map<String, Value>,
    field: &str,
    max: usize,
) -> ApiResult<Vec<Value>> {
    let list = doc
        .get(field)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if list.len() > max {
        return Err(ApiError::validation(format!(
            "{field}: size must be between 0 and {max}"
        )));
    }
    Ok(list)
}

/// Whether a document refers to `id` in a reference field (`*_id`, `target_id`, `value` of a
/// member expression, `*_ids` lists).
fn references(v: &Value, id: &str) -> bool {
    match v {
        Value::Object(m) => m.iter().any(|(k, v)| {
            let is_ref_field = k.ends_with("_id") || k.ends_with("_ids") || k == "value";
            (is_ref_field
                && k != "id"
                && k != "app_id"
                && match v {
                    Value::String(s) => s == id,
                    Value::Array(a) => a.iter().any(|x| x.as_str() == Some(id)),
                    _ => false,
                })
                || (matches!(v, Value::Object(_) | Value::Array(_)) && references(v, id))
        }),
        Value::Array(a) => a.iter().any(|x| references(x, id)),
        _ => false,
    }
}

/// Cursor paging: the cursor is the offset of the next page, as a decimal string (never
/// starting with `0000`, which clients read as "no more pages"); absent on the last page.
pub fn paginate(
    mut docs: Vec<Map<String, Value>>,
    page: &Page,
    max_page_size: usize,
) -> ApiResult<Value> {
    let ascending = page.sort_ascending.unwrap_or(true);
    if let Some(field) = &page.sort_by {
        docs.sort_by(|a, b| {
            let key = |d: &Map<String, Value>| d.get(field).map(sort_key).unwrap_or_default();
            key(a).cmp(&key(b))
        });
    }
    if !ascending {
        docs.reverse();
    }
    let offset = match &page.cursor {
        None => 0,
        Some(c) if c.is_empty() => 0,
        Some(c) => c.parse::<usize>().map_err(|_| {
            ApiError::bad_request(
                error::FIELD_VALIDATION,
                "common-services",
                format!("Invalid cursor {c}"),
            )
        })?,
    };
    let size = page
        .page_size
        .unwrap_or(max_page_size)
        .clamp(1, max_page_size);
    let total = docs.len();
    let end = offset.saturating_add(size).min(total);
    let mut results: Vec<Value> = docs
        .into_iter()
        .skip(offset)
        .take(end.saturating_sub(offset))
        .map(|d| match &page.included_fields {
            Some(fields) => Value::Object(
                d.into_iter()
                    .filter(|(k, _)| fields.iter().any(|f| f == k))
                    .collect(),
            ),
            None => Value::Object(d),
        })
        .collect();
    let mut out = Map::new();
    out.insert("results".into(), Value::Array(std::mem::take(&mut results)));
    out.insert("result_count".into(), json!(total));
    if end < total {
        out.insert("cursor".into(), json!(end.to_string()));
    }
    if let Some(s) = &page.sort_by {
        out.insert("sort_by".into(), json!(s));
        out.insert("sort_ascending".into(), json!(ascending));
    }
    Ok(Value::Object(out))
}

fn sort_key(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        // Numbers sort numerically through zero padding.
        Value::Number(n) => format!("{:020}", n.as_i64().unwrap_or(0)),
        other => other.to_string(),
    }
}
