//! What NSX holds for this cluster: every object tagged `ncp/cluster=<cluster>` that carries an
//! NCP identity (`ncp/project_uid`, `ncp/pod_uid`), classified by [`Key`].
//!
//! Discovery reads the list endpoints, which are consistent, not the search API, which lags
//! behind writes: an object created just before a crash must be found after the restart, or it
//! would be created twice. A list costs one call per page of 1,000, so a restart reads
//! `objects / 1000` pages per collection. Objects tagged with the cluster but without an NCP
//! identity are the admin's (node ports, the tier-0, the block) and are never touched.

use std::collections::{BTreeMap, BTreeSet};

use hyper_util::client::legacy::connect::Connect;
use serde_json::Value;

use super::desired::Key;
use super::infra::{Infra, has_tag};
use super::naming::scope;
use super::policy::{FW_SECT_TYPE, POLICY_UID};
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
    if !has_tag(doc, scope::CLUSTER, cluster) {
        return None;
    }
    let rt = doc.get("resource_type")?.as_str()?;
    if tag_value(doc, scope::ROLE) == Some("lb") {
        let c = cluster.to_string();
        return match rt {
            "LogicalRouter" => Some(Key::LbTier1(c)),
            "LogicalRouterLinkPortOnTIER0" => Some(Key::LbT0Link(c)),
            "LogicalRouterLinkPortOnTIER1" => Some(Key::LbT1Link(c)),
            "LbService" => Some(Key::LbService(c)),
            _ => None,
        };
    }
    if let (Some(svc), Some(port)) = (
        tag_value(doc, scope::SERVICE_UID),
        tag_value(doc, scope::SERVICE_PORT),
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
        let policy = tag_value(doc, POLICY_UID).map(str::to_string);
        return match (tag_value(doc, FW_SECT_TYPE)?, policy) {
            ("marker_top", _) => Some(Key::FwMarkerTop(c)),
            ("marker_bottom", _) => Some(Key::FwMarkerBottom(c)),
            ("allow", Some(p)) => Some(Key::AllowSection(p)),
            ("isolation", Some(p)) => Some(Key::IsolationSection(p)),
            _ => None,
        };
    }
    if let (Some(policy), Some(role)) = (tag_value(doc, POLICY_UID), tag_value(doc, scope::ROLE)) {
        let k = format!("{policy}/{role}");
        return match rt {
            "NSGroup" => Some(Key::PolicyGroup(k)),
            "IPSet" => Some(Key::PolicyIpSet(k)),
            _ => None,
        };
    }
    if let Some(pod) = tag_value(doc, scope::POD_UID) {
        return (rt == "LogicalPort").then(|| Key::PodPort(pod.to_string()));
    }
    let ns = tag_value(doc, scope::PROJECT_UID)?.to_string();
    Some(match rt {
        "IpBlockSubnet" => Key::Subnet(ns),
        "IpPool" => Key::Pool(ns),
        "LogicalSwitch" => Key::Switch(ns),
        "LogicalRouter" if doc["router_type"] == "TIER1" => Key::Tier1(ns),
        "LogicalRouterLinkPortOnTIER0" => Key::T0Link(ns),
        "LogicalRouterLinkPortOnTIER1" => Key::T1Link(ns),
        "LogicalRouterDownLinkPort" => Key::Downlink(ns),
        "LogicalPort" if tag_value(doc, scope::ROLE) == Some("downlink") => {
            Key::DownlinkSwitchPort(ns)
        }
        "NatRule" => Key::Snat(ns),
        "NSGroup" if tag_value(doc, scope::ROLE) == Some("ns") => Key::NsGroup(ns),
        _ => return None,
    })
}

impl Observed {
    /// Classifies documents (any order) into an observation.
    pub fn from_docs(docs: impl IntoIterator<Item = Value>, cluster: &str) -> Self {
        let mut objects: BTreeMap<Key, Vec<Value>> = BTreeMap::new();
        for d in docs {
            if let Some(k) = classify(&d, cluster) {
                objects.entry(k).or_default().push(d);
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
        Self {
            objects,
            snat_allocations: BTreeSet::new(),
            lb_vips: BTreeMap::new(),
            calls: 0,
        }
    }

    /// What NSX holds after `report`'s plan ran to its end, as far as NCP's own writes tell:
    /// the observation the next incremental pass plans against, without reading NSX again.
    /// Changes made by others are seen at the next full observation (the periodic resync).
    pub fn after(report: &super::apply::ApplyReport) -> Self {
        Self {
            objects: report
                .realized
                .iter()
                .map(|(k, d)| (k.clone(), vec![d.clone()]))
                .collect(),
            snat_allocations: report.snat_allocations.clone(),
            lb_vips: report.lb_vips.clone(),
            calls: 0,
        }
    }

    /// The kept (oldest) document of a key.
    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key).and_then(|v| v.first())
    }
}

/// Reads everything NCP owns from NSX.
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
        "ns-groups".to_string(),
        "ip-sets".to_string(),
        "firewall/sections".to_string(),
    ] {
        docs.extend(client.list_all::<Value>(&path).await?);
    }
    // A policy section's rules are part of what NCP owns: one read per section.
    for d in &mut docs {
        if d["resource_type"] == "FirewallSection"
            && matches!(
                classify(d, cluster),
                Some(Key::AllowSection(_) | Key::IsolationSection(_))
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
    if let Some(pool) = &infra.snat_pool {
        let a: Value = client
            .get(&format!("pools/ip-pools/{pool}/allocations"))
            .await?;
        // Only allocations NCP made (tagged with the cluster) are NCP's to release.
        observed.snat_allocations = a["results"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| has_tag(r, scope::CLUSTER, cluster))
            .filter_map(|r| r["allocation_id"].as_str().map(str::to_string))
            .collect();
    }
    if let Some(pool) = &infra.lb_pool {
        let a: Value = client
            .get(&format!("pools/ip-pools/{pool}/allocations"))
            .await?;
        for r in a["results"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| has_tag(r, scope::CLUSTER, cluster))
        {
            if let (Some(svc), Some(ip)) = (
                tag_value(r, scope::SERVICE_UID),
                r["allocation_id"].as_str(),
            ) {
                observed.lb_vips.insert(svc.to_string(), ip.to_string());
            }
        }
    }
    observed.calls = (client.stats().requests - before) as usize;
    Ok(observed)
}
