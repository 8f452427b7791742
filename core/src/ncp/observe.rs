//! What NSX holds for this cluster: every object tagged `ncp/cluster=<cluster>` that carries an
//! NCP identity (`ncp/project_uid`, `ncp/pod_uid`), classified by [`Key`].
//!
//! Two ways to look, with different guarantees:
//! - [`observe`] reads the list endpoints, which are consistent: an object created just before
//!   a crash is there. It costs a call per page per collection, and NSX pages NSGroups by 50, so
//!   a large cluster takes a few calls per 1,000 objects.
//! - [`observe_by_search`] asks the search API once for everything tagged with the cluster: a
//!   call per 1,000 objects whatever their kind. Search lags behind writes, so what it shows may
//!   be missing the newest objects or show older versions; [`super::reconcile`] trusts it only
//!   to say "nothing to do", and observes by lists before it writes anything.
//!
//! Objects tagged with the cluster but without an NCP identity are the admin's (node ports, the
//! tier-0, the block) and are never touched.

use std::collections::{BTreeMap, BTreeSet};

use hyper_util::client::legacy::connect::Connect;
use serde_json::Value;

use super::infra::{Infra, has_tag};
use super::naming::scope;
use super::naming::scope::{FW_SECT_TYPE, POLICY_UID};
use super::vocab::Key;
use crate::nsx::{NsxClient, NsxError};

/// NCP's objects in NSX, by identity. More than one document under a key is a duplicate (a
/// create whose answer was lost and that was repeated); the first is the oldest.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub objects: BTreeMap<Key, Vec<Value>>,
    /// LoadBalancer VIPs NCP allocated in the LB pool: service uid -> address.
    pub lb_vips: BTreeMap<String, String>,
    /// Addresses NCP allocated (tagged `ncp/cluster`) in the SNAT pool.
    pub snat_allocations: BTreeSet<String>,
    /// NSX calls the observation took.
    pub calls: usize,
    /// Read from the search index, which may lag behind writes: good to tell that nothing is to
    /// be done, not to decide what to write.
    pub from_search: bool,
    /// VLANs in use under each parent VIF, by every port document held (kept or duplicate),
    /// with counts: what a new port's VLAN is chosen against, without a pass over all ports.
    vlans: BTreeMap<String, BTreeMap<i64, usize>>,
}

/// What NCP knows about a cache of NSX's objects beyond the documents: never read from NSX,
/// only kept by a running NCP between passes ([`Cache`]). The planner reads it to decide how
/// much to look at; [`super::plan::settle`] computes it after each pass.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// The pass that left these documents realized everything it was asked (nothing refused,
    /// nothing unrealizable): NSX then held exactly that pass's desired state, so the next pass
    /// need only look at the keys whose spec changed since ([`super::plan::plan_changes`]).
    pub synced: bool,
    /// Keys a synced cache still lacks (refused, or unrealizable: a node without a VIF):
    /// planned again by every incremental pass.
    pub pending: BTreeSet<Key>,
    /// The desired state of that pass, kept by callers that do not track their changes
    /// themselves ([`super::reconcile::reconcile_cached`]), to find them by comparison.
    pub verified: Option<std::sync::Arc<super::vocab::Desired>>,
}

/// A running NCP's cache: what NSX held after its last pass, and what it knows about that.
#[derive(Debug, Clone, Default)]
pub struct Cache {
    pub observed: Observed,
    pub known: Known,
}

/// A pod port document's parent VIF and VLAN.
pub fn port_vlan(doc: &Value) -> Option<(&str, i64)> {
    let ctx = doc.get("attachment")?.get("context")?;
    Some((
        ctx.get("parent_vif_id")?.as_str()?,
        ctx.get("traffic_tag")?.as_i64()?,
    ))
}

fn tag_value<'a>(doc: &'a Value, scope_name: &str) -> Option<&'a str> {
    doc.get("tags")?
        .as_array()?
        .iter()
        .find(|t| t["scope"] == scope_name)?
        .get("tag")?
        .as_str()
}

/// The identity of one NSX document, if it is one of this cluster's NCP objects.
pub fn classify(doc: &Value, cluster: &str) -> Option<Key> {
    classify_object(doc.as_object()?, cluster)
}

/// [`classify`] of a document held as a JSON object, for callers that hold many and would
/// rather not copy them (the harness classifies every object of the fake's store).
pub fn classify_object(doc: &serde_json::Map<String, Value>, cluster: &str) -> Option<Key> {
    let tags = doc.get("tags").and_then(Value::as_array);
    let tag_value = |scope_name: &str| -> Option<&str> {
        tags?
            .iter()
            .find(|t| t["scope"] == scope_name)?
            .get("tag")?
            .as_str()
    };
    if !tags.is_some_and(|t| {
        t.iter()
            .any(|t| t["scope"] == scope::CLUSTER && t["tag"] == cluster)
    }) {
        return None;
    }
    let rt = doc.get("resource_type")?.as_str()?;
    if tag_value(scope::ROLE) == Some("lb") {
        let c = cluster.to_string();
        return match rt {
            "LogicalRouter" => Some(Key::LbTier1(c)),
            "LogicalRouterLinkPortOnTIER0" => Some(Key::LbT0Link(c)),
            "LogicalRouterLinkPortOnTIER1" => Some(Key::LbT1Link(c)),
            "LbService" => Some(Key::LbService(c)),
            "LbSourceIpPersistenceProfile" => Some(Key::LbPersistence(c)),
            _ => None,
        };
    }
    if rt == "LbSourceIpPersistenceProfile"
        && let Some(svc) = tag_value(scope::SERVICE_UID)
    {
        return Some(Key::LbPersistence(svc.to_string()));
    }
    if let (Some(svc), Some(port)) = (
        tag_value(scope::SERVICE_UID),
        tag_value(scope::SERVICE_PORT),
    ) {
        let k = format!("{svc}/{port}");
        return match rt {
            "LbPool" => Some(Key::LbPool(k)),
            "LbVirtualServer" => Some(Key::LbVirtualServer(k)),
            _ => None,
        };
    }
    if rt == "FirewallSection" {
        let c = cluster.to_string();
        let policy = tag_value(POLICY_UID).map(str::to_string);
        return match (tag_value(FW_SECT_TYPE)?, policy) {
            ("marker_top", _) => Some(Key::FwMarkerTop(c)),
            ("marker_bottom", _) => Some(Key::FwMarkerBottom(c)),
            ("nodes", _) => Some(Key::NodeSection(c)),
            ("allow", Some(p)) => Some(Key::AllowSection(p)),
            ("isolation", Some(p)) => Some(Key::IsolationSection(p)),
            _ => None,
        };
    }
    if let (Some(policy), Some(role)) = (tag_value(POLICY_UID), tag_value(scope::ROLE)) {
        let k = format!("{policy}/{role}");
        return match rt {
            "NSGroup" => Some(Key::PolicyGroup(k)),
            "IPSet" => Some(Key::PolicyIpSet(k)),
            _ => None,
        };
    }
    match (rt, tag_value(scope::ROLE)) {
        ("IPSet", Some("nodes")) => return Some(Key::NodeIpSet(cluster.to_string())),
        ("NSGroup", Some("cluster_pods")) => return Some(Key::PodsGroup(cluster.to_string())),
        _ => {}
    }
    if let Some(pod) = tag_value(scope::POD_UID) {
        return (rt == "LogicalPort").then(|| Key::PodPort(pod.to_string()));
    }
    let ns = tag_value(scope::PROJECT_UID)?.to_string();
    Some(match rt {
        "IpBlockSubnet" => Key::Subnet(ns),
        "IpPool" => Key::Pool(ns),
        "LogicalSwitch" => Key::Switch(ns),
        "LogicalRouter" if doc.get("router_type").is_some_and(|t| t == "TIER1") => Key::Tier1(ns),
        "LogicalRouterLinkPortOnTIER0" => Key::T0Link(ns),
        "LogicalRouterLinkPortOnTIER1" => Key::T1Link(ns),
        "LogicalRouterDownLinkPort" => Key::Downlink(ns),
        "LogicalPort" if tag_value(scope::ROLE) == Some("downlink") => Key::DownlinkSwitchPort(ns),
        "NatRule" => Key::Snat(ns),
        "NSGroup" if tag_value(scope::ROLE) == Some("ns") => Key::NsGroup(ns),
        _ => return None,
    })
}

impl Observed {
    /// Classifies documents (any order) into an observation.
    pub fn from_docs(docs: impl IntoIterator<Item = Value>, cluster: &str) -> Self {
        let mut objects: BTreeMap<Key, Vec<Value>> = BTreeMap::new();
        for d in docs {
            if let Some(k) = classify(&d, cluster) {
                let same = objects.entry(k).or_default();
                // Offset paging over a changing result set can return a document twice; one
                // object is not a duplicate of itself.
                if !same.iter().any(|o| o["id"] == d["id"]) {
                    same.push(d);
                }
            }
        }
        for docs in objects.values_mut() {
            docs.sort_by(|a, b| {
                let key = |d: &Value| {
                    (
                        d["_create_time"].as_i64().unwrap_or(0),
                        d["id"].as_str().unwrap_or("").to_string(),
                    )
                };
                key(a).cmp(&key(b))
            });
        }
        let mut observed = Self {
            objects,
            ..Self::default()
        };
        for (k, docs) in &observed.objects {
            if matches!(k, Key::PodPort(_)) {
                for (parent, tag) in docs.iter().filter_map(port_vlan) {
                    *observed
                        .vlans
                        .entry(parent.to_string())
                        .or_default()
                        .entry(tag)
                        .or_default() += 1;
                }
            }
        }
        observed
    }

    fn count_vlan(&mut self, doc: &Value, add: bool) {
        let Some((parent, tag)) = port_vlan(doc) else {
            return;
        };
        let under = self.vlans.entry(parent.to_string()).or_default();
        if add {
            *under.entry(tag).or_default() += 1;
        } else if let Some(n) = under.get_mut(&tag) {
            *n -= 1;
            if *n == 0 {
                under.remove(&tag);
            }
        }
    }

    /// The kept (oldest) document of a key.
    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key).and_then(|v| v.first())
    }

    /// Makes `doc` the only document of `key` (it was created or updated).
    pub fn put(&mut self, key: Key, doc: Value) {
        let is_port = matches!(key, Key::PodPort(_));
        if is_port {
            self.count_vlan(&doc, true);
        }
        if let Some(old) = self.objects.insert(key, vec![doc])
            && is_port
        {
            for d in &old {
                self.count_vlan(d, false);
            }
        }
    }

    /// Forgets the document `id` of `key` (it was deleted).
    pub fn remove(&mut self, key: &Key, id: &str) {
        let Some(docs) = self.objects.get_mut(key) else {
            return;
        };
        let Some(i) = docs.iter().position(|d| d["id"] == id) else {
            return;
        };
        let doc = docs.remove(i);
        if docs.is_empty() {
            self.objects.remove(key);
        }
        if matches!(key, Key::PodPort(_)) {
            self.count_vlan(&doc, false);
        }
    }

    /// The VLANs in use under a parent VIF.
    pub fn vlans_under(&self, parent: &str) -> impl Iterator<Item = i64> + '_ {
        self.vlans
            .get(parent)
            .into_iter()
            .flat_map(|m| m.keys().copied())
    }
}

impl super::render::Resolve for Observed {
    fn resolve(&self, key: &Key) -> Option<&Value> {
        self.get(key)
    }
}

/// Reads everything NCP owns from NSX, by the consistent list endpoints.
pub async fn observe<C>(
    client: &NsxClient<C>,
    cluster: &str,
    infra: &Infra,
) -> Result<Observed, NsxError>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let before = client.stats().requests;
    let mut docs: Vec<Value> = Vec::new();
    for path in [
        format!("pools/ip-subnets?block_id={}", infra.ip_block),
        "pools/ip-pools".to_string(),
        "logical-switches".to_string(),
        "logical-routers?router_type=TIER1".to_string(),
        "logical-router-ports".to_string(),
        "logical-ports".to_string(),
        format!("logical-routers/{}/nat/rules", infra.tier0),
        "loadbalancer/services".to_string(),
        "loadbalancer/virtual-servers".to_string(),
        "loadbalancer/pools".to_string(),
        "loadbalancer/persistence-profiles".to_string(),
        "ns-groups".to_string(),
        "ip-sets".to_string(),
        "firewall/sections".to_string(),
    ] {
        docs.extend(client.list_all::<Value>(&path).await?);
    }
    let mut observed = complete(client, cluster, infra, docs).await?;
    observed.calls = (client.stats().requests - before) as usize;
    Ok(observed)
}

/// The search query for everything tagged `ncp/cluster=<cluster>`. NSX matches the scope and
/// the value on any tags, not one tag with both; [`classify`] checks the pair.
pub fn cluster_query(cluster: &str) -> String {
    crate::nsx::search::by_tags(
        None,
        &[crate::nsx::model::Tag::new(scope::CLUSTER, cluster)],
    )
}

/// Reads everything NCP owns from NSX's search index: one call per 1,000 objects. See the
/// module's note on what it may miss.
pub async fn observe_by_search<C>(
    client: &NsxClient<C>,
    cluster: &str,
    infra: &Infra,
) -> Result<Observed, NsxError>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let before = client.stats().requests;
    let docs = client.search_all(&cluster_query(cluster)).await?;
    // The router ports, NAT rules and subnets of other tier-0s and blocks are not NCP's here,
    // as the lists (which are scoped to them) would not show them either.
    let docs = docs.into_iter().filter(|d| in_scope(d, infra)).collect();
    let mut observed = complete(client, cluster, infra, docs).await?;
    observed.from_search = true;
    observed.calls = (client.stats().requests - before) as usize;
    Ok(observed)
}

/// Whether a searched document is one the scoped lists of [`observe`] would return.
fn in_scope(doc: &Value, infra: &Infra) -> bool {
    match doc["resource_type"].as_str() {
        Some("IpBlockSubnet") => doc["block_id"] == infra.ip_block.as_str(),
        Some("NatRule") => doc
            .get("logical_router_id")
            .is_none_or(|r| r == infra.tier0.as_str()),
        _ => true,
    }
}

/// Classifies `docs`, reads the rules of NCP's policy sections and the pool allocations NCP
/// made: what both kinds of observation need besides the objects themselves.
async fn complete<C>(
    client: &NsxClient<C>,
    cluster: &str,
    infra: &Infra,
    mut docs: Vec<Value>,
) -> Result<Observed, NsxError>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    // A policy section's rules are part of what NCP owns: one read per section.
    for d in &mut docs {
        if d["resource_type"] == "FirewallSection"
            && matches!(
                classify(d, cluster),
                Some(Key::AllowSection(_) | Key::IsolationSection(_) | Key::NodeSection(_))
            )
        {
            let id = d["id"].as_str().unwrap_or_default().to_string();
            let rules = client
                .list_all::<Value>(&format!("firewall/sections/{id}/rules"))
                .await?;
            d["rules"] = Value::Array(rules);
        }
    }
    let mut observed = Observed::from_docs(docs, cluster);
    // Both pools' allocations in one batch: a call, not one per pool.
    let pools: Vec<&String> = [&infra.snat_pool, &infra.lb_pool]
        .into_iter()
        .flatten()
        .collect();
    let paths: Vec<String> = pools
        .iter()
        .map(|p| format!("pools/ip-pools/{p}/allocations"))
        .collect();
    let answers = if paths.is_empty() {
        Vec::new()
    } else {
        client.get_many(&paths).await?
    };
    for (pool, a) in pools.into_iter().zip(answers) {
        // Only allocations NCP made (tagged with the cluster) are NCP's to release.
        let ours = a["results"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| has_tag(r, scope::CLUSTER, cluster));
        if Some(pool) == infra.snat_pool.as_ref() {
            for r in ours.clone() {
                if let Some(ip) = r["allocation_id"].as_str() {
                    observed.snat_allocations.insert(ip.to_string());
                }
            }
        }
        if Some(pool) == infra.lb_pool.as_ref() {
            for r in ours {
                if let (Some(svc), Some(ip)) = (
                    tag_value(r, scope::SERVICE_UID),
                    r["allocation_id"].as_str(),
                ) {
                    observed.lb_vips.insert(svc.to_string(), ip.to_string());
                }
            }
        }
    }
    Ok(observed)
}
