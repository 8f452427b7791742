//! What an NSX admin creates before NCP starts, tagged the way NCP finds it: the overlay
//! transport zone, the tier-0 router, per cluster a container IP block, an external (SNAT) pool
//! and an LB VIP pool, and each node VM's logical port (`ncp/node_name`). The system objects
//! every NSX has (the default firewall section and rule, the default LB profiles) are created
//! too.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::ipam::{self, Cidr};
use crate::store::{Ctx, Store};

/// One cluster's admin-side setup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterSetup {
    pub name: String,
    pub nodes: Vec<String>,
    pub container_block: String,
    pub snat_pool: String,
    pub lb_pool: String,
    /// The node VMs' own network; node i gets the i-th host address.
    pub node_cidr: String,
}

impl ClusterSetup {
    pub fn new(name: &str, nodes: usize) -> Self {
        Self {
            name: name.to_string(),
            nodes: (1..=nodes).map(|i| format!("node-{i}")).collect(),
            container_block: "10.4.0.0/16".into(),
            snat_pool: "192.0.2.0/24".into(),
            lb_pool: "198.51.100.0/24".into(),
            node_cidr: "172.16.0.0/24".into(),
        }
    }
}

/// What to pre-create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootstrapConfig {
    pub clusters: Vec<ClusterSetup>,
}

impl Default for BootstrapConfig {
    fn default() -> Self {
        Self {
            clusters: vec![ClusterSetup::new("k8s-a", 3)],
        }
    }
}

/// Node VM port created for a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodePort {
    pub logical_port_id: String,
    pub vif_id: String,
    pub ip_address: String,
    pub mac_address: String,
}

/// Ids of one cluster's admin objects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterIds {
    pub ip_block: String,
    pub snat_pool: String,
    pub lb_pool: String,
    pub node_switch: String,
    pub node_ports: BTreeMap<String, NodePort>,
}

/// Ids of everything bootstrap created, for configuring NCP and for tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bootstrap {
    /// The edge cluster of the tier-0 (NCP puts its load balancer's tier-1 there).
    #[serde(default)]
    pub edge_cluster: String,
    pub transport_zone: String,
    pub tier0_router: String,
    pub default_section: String,
    pub clusters: BTreeMap<String, ClusterIds>,
}

fn created_id(v: &Value) -> String {
    v.get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn tags(pairs: &[(&str, &str)]) -> Value {
    Value::Array(
        pairs
            .iter()
            .map(|(s, t)| json!({"scope": s, "tag": t}))
            .collect(),
    )
}

/// A pool over a whole CIDR but its first address (the gateway) and broadcast.
fn pool_body(name: &str, cidr: &str, tag_pairs: &[(&str, &str)]) -> Result<Value, String> {
    let c = Cidr::parse_strict(cidr)?;
    if c.size() < 4 {
        return Err(format!("pool {cidr} is too small"));
    }
    Ok(json!({
        "display_name": name,
        "subnets": [{
            "cidr": c.to_string(),
            "allocation_ranges": [{"start": ipam::ip_to_string(c.first() + 1), "end": ipam::ip_to_string(c.last() - 1)}],
        }],
        "tags": tags(tag_pairs),
    }))
}

/// The node network's router, as an admin sets it up: a tier-1 linked to the tier-0, with a
/// downlink on the node switch (the network's first address is the nodes' gateway) and its
/// connected routes advertised, so that nodes reach the pods (the kubelet's probes) and the
/// outside reaches the nodes. Not tagged for any cluster: NCP neither owns nor touches it.
fn node_router(
    store: &mut Store,
    ctx: &Ctx,
    cluster: &str,
    switch: &str,
    net: &Cidr,
    tier0: &str,
) -> Result<(), crate::error::ApiError> {
    use crate::kind::Kind;
    let mut create =
        |kind: Kind, body: Value| store.create(ctx, kind, &body, None).map(|v| created_id(&v));
    let t1 = create(
        Kind::LogicalRouter,
        json!({"display_name": format!("{cluster}-nodes-t1"), "router_type": "TIER1"}),
    )?;
    let switch_port = create(
        Kind::LogicalPort,
        json!({"display_name": format!("{cluster}-nodes-gateway"), "logical_switch_id": switch, "admin_state": "UP"}),
    )?;
    create(
        Kind::LogicalRouterPort,
        json!({
            "resource_type": "LogicalRouterDownLinkPort",
            "display_name": format!("{cluster}-nodes-downlink"),
            "logical_router_id": t1,
            "linked_logical_switch_port_id": {"target_id": switch_port, "target_type": "LogicalPort"},
            "subnets": [{"ip_addresses": [ipam::ip_to_string(net.first() + 1)], "prefix_length": net.prefix}],
        }),
    )?;
    let on_t0 = create(
        Kind::LogicalRouterPort,
        json!({"resource_type": "LogicalRouterLinkPortOnTIER0", "display_name": format!("{cluster}-nodes-t0-link"), "logical_router_id": tier0}),
    )?;
    create(
        Kind::LogicalRouterPort,
        json!({
            "resource_type": "LogicalRouterLinkPortOnTIER1",
            "display_name": format!("{cluster}-nodes-t1-link"),
            "logical_router_id": t1,
            "linked_logical_router_port_id": {"target_id": on_t0, "target_type": "LogicalRouterLinkPortOnTIER0"},
        }),
    )?;
    let current = store.advertisement_get(&t1)?;
    let revision = current
        .get("_revision")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    store.advertisement_put(
        ctx,
        &t1,
        &json!({"enabled": true, "advertise_nsx_connected_routes": true, "_revision": revision}),
    )?;
    Ok(())
}

/// The system objects every manager has from the start.
pub fn system_objects(store: &mut Store, ctx: &Ctx) -> String {
    let section = store.create_default_section(ctx);
    store.create_default_lb_profiles(ctx);
    section
}

/// Creates the admin objects. Fails on a config error (bad CIDR), naming it.
pub fn run(
    store: &mut Store,
    ctx: &Ctx,
    config: &BootstrapConfig,
    default_section: String,
) -> Result<Bootstrap, String> {
    let err = |what: &str, e: crate::error::ApiError| {
        format!(
            "bootstrap: failed to create {what}: {}",
            e.body.error_message
        )
    };
    let mut cluster_tags: Vec<(&str, &str)> = config
        .clusters
        .iter()
        .map(|c| ("ncp/cluster", c.name.as_str()))
        .collect();
    if config.clusters.len() > 1 {
        cluster_tags.push(("ncp/shared_resource", "true"));
    }
    let tz = store
        .create(
            ctx,
            crate::kind::Kind::TransportZone,
            &json!({"display_name": "overlay-tz", "transport_type": "OVERLAY", "host_switch_name": "nsxvswitch", "tags": tags(&cluster_tags)}),
            None,
        )
        .map_err(|e| err("the transport zone", e))?;
    let tz = created_id(&tz);
    let edges = store
        .create(
            ctx,
            crate::kind::Kind::EdgeCluster,
            &json!({"display_name": "edge-cluster-1", "deployment_type": "VIRTUAL_MACHINE", "member_node_type": "EDGE_NODE",
                "members": [{"member_index": 0, "transport_node_id": "edge-node-1"}, {"member_index": 1, "transport_node_id": "edge-node-2"}]}),
            None,
        )
        .map_err(|e| err("the edge cluster", e))?;
    let edges = created_id(&edges);
    let t0 = store
        .create(
            ctx,
            crate::kind::Kind::LogicalRouter,
            &json!({"display_name": "t0", "router_type": "TIER0", "high_availability_mode": "ACTIVE_STANDBY", "edge_cluster_id": edges, "tags": tags(&cluster_tags)}),
            None,
        )
        .map_err(|e| err("the tier-0 router", e))?;
    let t0 = created_id(&t0);
    let mut clusters = BTreeMap::new();
    for c in &config.clusters {
        let name = c.name.as_str();
        let block = Cidr::parse_strict(&c.container_block)
            .map_err(|e| format!("bootstrap: container_block: {e}"))?;
        let ip_block = store
            .create(
                ctx,
                crate::kind::Kind::IpBlock,
                &json!({"display_name": format!("{name}-pods"), "cidr": block.to_string(), "tags": tags(&[("ncp/cluster", name)])}),
                None,
            )
            .map_err(|e| err("the IP block", e))?;
        let snat = pool_body(
            &format!("{name}-snat"),
            &c.snat_pool,
            &[("ncp/cluster", name), ("ncp/external", "true")],
        )?;
        let snat = store
            .create(ctx, crate::kind::Kind::IpPool, &snat, None)
            .map_err(|e| err("the SNAT pool", e))?;
        let lb = pool_body(
            &format!("{name}-lb"),
            &c.lb_pool,
            &[("ncp/cluster", name), ("ncp/external", "true")],
        )?;
        let lb = store
            .create(ctx, crate::kind::Kind::IpPool, &lb, None)
            .map_err(|e| err("the LB pool", e))?;
        let node_net =
            Cidr::parse_strict(&c.node_cidr).map_err(|e| format!("bootstrap: node_cidr: {e}"))?;
        let ls = store
            .create(
                ctx,
                crate::kind::Kind::LogicalSwitch,
                &json!({"display_name": format!("{name}-nodes"), "transport_zone_id": tz, "admin_state": "UP", "replication_mode": "MTEP", "tags": tags(&[("ncp/cluster", name)])}),
                None,
            )
            .map_err(|e| err("the node switch", e))?;
        let ls = created_id(&ls);
        node_router(store, ctx, name, &ls, &node_net, &t0)
            .map_err(|e| err("the node router", e))?;
        let mut node_ports = BTreeMap::new();
        for (i, node) in c.nodes.iter().enumerate() {
            let ip = node_net.first() + 10 + i as u32;
            if !node_net.contains(ip) {
                return Err(format!(
                    "bootstrap: node_cidr {node_net} has no room for node {node}"
                ));
            }
            let vif = format!("vif-{name}-{node}");
            let mac = format!(
                "00:50:56:{:02x}:{:02x}:{:02x}",
                (i >> 16) & 0xff,
                (i >> 8) & 0xff,
                (i & 0xff) + 1
            );
            let port = store
                .create(
                    ctx,
                    crate::kind::Kind::LogicalPort,
                    &json!({
                        "display_name": format!("{node}-vnic"),
                        "logical_switch_id": ls,
                        "admin_state": "UP",
                        "attachment": {"attachment_type": "VIF", "id": vif},
                        "address_bindings": [{"ip_address": ipam::ip_to_string(ip), "mac_address": mac}],
                        "tags": tags(&[("ncp/cluster", name), ("ncp/node_name", node)]),
                    }),
                    None,
                )
                .map_err(|e| err("a node port", e))?;
            node_ports.insert(
                node.clone(),
                NodePort {
                    logical_port_id: created_id(&port),
                    vif_id: vif,
                    ip_address: ipam::ip_to_string(ip),
                    mac_address: mac,
                },
            );
        }
        clusters.insert(
            name.to_string(),
            ClusterIds {
                ip_block: created_id(&ip_block),
                snat_pool: created_id(&snat),
                lb_pool: created_id(&lb),
                node_switch: ls,
                node_ports,
            },
        );
    }
    Ok(Bootstrap {
        edge_cluster: edges,
        transport_zone: tz,
        tier0_router: t0,
        default_section,
        clusters,
    })
}
