//! The admin-created objects NCP builds on, found by the id or name in `ncp.ini` or, when the
//! config leaves it out, by the `ncp/cluster` tag.

use std::collections::BTreeMap;

use hyper_util::client::legacy::connect::Connect;
use serde_json::Value;

use super::config::NcpConfig;
use super::naming::scope;
use crate::nsx::{NsxClient, NsxError};

/// Ids NCP needs from the admin's setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Infra {
    pub transport_zone: String,
    pub tier0: String,
    pub ip_block: String,
    pub snat_pool: Option<String>,
    /// The pool LoadBalancer VIPs come from (`external_ip_pools_lb`).
    pub lb_pool: Option<String>,
    /// The default fast TCP and UDP application profiles virtual servers use.
    pub lb_tcp_profile: Option<String>,
    pub lb_udp_profile: Option<String>,
    /// The edge cluster of the load balancer's tier-1 (`edge_cluster`, else the tier-0's);
    /// `None`: the tier-0 has none and none is configured (NSX refuses the LB service).
    pub edge_cluster: Option<String>,
    /// Node name -> the VIF id of the node VM's port (the parent of its pods' CHILD VIFs).
    pub node_vifs: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InfraError {
    #[error("failed to find the {what}: {reason}")]
    NotFound { what: &'static str, reason: String },
    #[error("failed to read the {what} from NSX")]
    Nsx {
        what: &'static str,
        #[source]
        source: NsxError,
    },
}

impl InfraError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, InfraError::Nsx { source, .. } if source.is_retryable())
    }
}

/// Whether a document carries a tag with exactly this scope and value.
pub fn has_tag(doc: &Value, scope_name: &str, value: &str) -> bool {
    doc.get("tags").and_then(Value::as_array).is_some_and(|t| {
        t.iter()
            .any(|t| t["scope"] == scope_name && t["tag"] == value)
    })
}

fn pick(
    what: &'static str,
    docs: &[Value],
    wanted: Option<&str>,
    cluster: &str,
    extra: impl Fn(&Value) -> bool,
) -> Result<String, InfraError> {
    let found: Vec<&Value> = match wanted {
        Some(w) => docs
            .iter()
            .filter(|d| d["id"] == w || d["display_name"] == w)
            .collect(),
        None => docs
            .iter()
            .filter(|d| has_tag(d, scope::CLUSTER, cluster) && extra(d))
            .collect(),
    };
    match found.as_slice() {
        [one] => Ok(one["id"].as_str().unwrap_or_default().to_string()),
        [] => Err(InfraError::NotFound {
            what,
            reason: match wanted {
                Some(w) => format!("no object with id or name {w}"),
                None => format!("nothing tagged ncp/cluster={cluster}; set it in ncp.ini"),
            },
        }),
        many => Err(InfraError::NotFound {
            what,
            reason: format!("{} candidates; name one in ncp.ini", many.len()),
        }),
    }
}

/// Finds the admin objects.
pub async fn discover<C>(client: &NsxClient<C>, cfg: &NcpConfig) -> Result<Infra, InfraError>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let list = |what: &'static str, path: &'static str| async move {
        client
            .list_all::<Value>(path)
            .await
            .map_err(|source| InfraError::Nsx { what, source })
    };
    let cluster = cfg.cluster.as_str();
    let tzs = list("transport zone", "transport-zones").await?;
    let transport_zone = pick(
        "overlay transport zone",
        &tzs,
        cfg.overlay_tz.as_deref(),
        cluster,
        |d| d["transport_type"] == "OVERLAY",
    )?;
    let routers = list("tier-0 router", "logical-routers?router_type=TIER0").await?;
    let tier0 = pick(
        "tier-0 router",
        &routers,
        cfg.top_tier_router.as_deref(),
        cluster,
        |_| true,
    )?;
    let edge_cluster = match cfg.edge_cluster.as_deref() {
        Some(w) => {
            let clusters = list("edge cluster", "edge-clusters").await?;
            Some(pick("edge cluster", &clusters, Some(w), cluster, |_| true)?)
        }
        None => routers
            .iter()
            .find(|r| r["id"] == tier0.as_str())
            .and_then(|r| r["edge_cluster_id"].as_str())
            .map(str::to_string),
    };
    let blocks = list("IP block", "pools/ip-blocks").await?;
    let ip_block = pick(
        "container IP block",
        &blocks,
        cfg.container_ip_blocks.first().map(String::as_str),
        cluster,
        |_| true,
    )?;
    let pools = list("IP pools", "pools/ip-pools").await?;
    let snat_pool = match cfg.external_ip_pools.first() {
        Some(w) => Some(pick("external IP pool", &pools, Some(w), cluster, |_| {
            true
        })?),
        None => {
            let lb: Vec<&String> = cfg.external_ip_pools_lb.iter().collect();
            pick("external IP pool", &pools, None, cluster, |d| {
                has_tag(d, scope::EXTERNAL, "true")
                    && !lb
                        .iter()
                        .any(|l| d["id"] == l.as_str() || d["display_name"] == l.as_str())
            })
            .ok()
        }
    };
    let ports = list("node ports", "logical-ports").await?;
    let mut node_vifs = BTreeMap::new();
    for p in ports.iter().filter(|p| has_tag(p, scope::CLUSTER, cluster)) {
        let node = p["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["scope"] == scope::NODE_NAME)
            .and_then(|t| t["tag"].as_str());
        let vif = p["attachment"]["id"].as_str();
        if let (Some(node), Some(vif)) = (node, vif) {
            node_vifs.insert(node.to_string(), vif.to_string());
        }
    }
    let lb_pool = match cfg.external_ip_pools_lb.first() {
        Some(w) => Some(pick("LB IP pool", &pools, Some(w), cluster, |_| true)?),
        None => None,
    };
    let profiles = list(
        "LB application profiles",
        "loadbalancer/application-profiles",
    )
    .await?;
    let profile = |rt: &str| {
        profiles
            .iter()
            .find(|p| p["resource_type"] == rt)
            .and_then(|p| p["id"].as_str())
            .map(str::to_string)
    };
    Ok(Infra {
        transport_zone,
        tier0,
        ip_block,
        snat_pool,
        lb_pool,
        lb_tcp_profile: profile("LbFastTcpProfile"),
        lb_udp_profile: profile("LbFastUdpProfile"),
        edge_cluster,
        node_vifs,
    })
}
