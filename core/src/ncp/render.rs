//! What NCP writes: the NSX request body of each object it owns, rendered from its [`Spec`]
//! with references (ids, a subnet's CIDR) resolved to the objects NSX holds. Pure, and shared:
//! the planner renders to compare with what NSX holds ([`super::plan`]), the applier to write
//! ([`super::apply`]), and the harness's converge check to compare from scratch.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::infra::Infra;
use super::naming::{self, scope};
use super::vocab::{Detail, Key, RuleSpec, Selection, ServiceSpec, Spec};
use crate::nsx::model::Tag;

/// Tag marking a tier-1 router whose route advertisement NCP has configured. A router is
/// created without it and gets it after the advertisement is written, so a crash in between is
/// seen as drift and repaired.
pub const ADVERTISED: (&str, &str) = ("ncp/route_adv", "connected,nat");

/// The same marker on the load balancer's tier-1, whose VIPs the tier-0 only learns when the
/// router advertises them. Its value differs from [`ADVERTISED`]'s because NCP once tagged
/// that router without writing its advertisement: a router with the old value is drift, and
/// the update writes the advertisement.
pub const ADVERTISED_LB: (&str, &str) = ("ncp/route_adv", "connected,nat,lb_vip");

/// The advertisement marker tag a router of this key carries once advertised, if any.
pub fn advertised_tag(key: &Key) -> Option<(&'static str, &'static str)> {
    match key {
        Key::Tier1(_) => Some(ADVERTISED),
        Key::LbTier1(_) => Some(ADVERTISED_LB),
        _ => None,
    }
}

/// A dependency that has no object yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Missing(pub Key);

/// Where [`render`] finds the objects a body refers to: the planner passes borrowed observed
/// documents, the applier its own map of observed and created ones.
pub trait Resolve {
    fn resolve(&self, key: &Key) -> Option<&Value>;
}

impl Resolve for BTreeMap<Key, Value> {
    fn resolve(&self, key: &Key) -> Option<&Value> {
        self.get(key)
    }
}

impl Resolve for BTreeMap<Key, &Value> {
    fn resolve(&self, key: &Key) -> Option<&Value> {
        self.get(key).copied()
    }
}

fn id<'a, R: Resolve + ?Sized>(resolved: &'a R, key: &Key) -> Result<&'a str, Missing> {
    resolved
        .resolve(key)
        .and_then(|d| d["id"].as_str())
        .ok_or_else(|| Missing(key.clone()))
}

/// Network, gateway, first and last pool address and prefix of a namespace subnet.
pub fn subnet_layout(cidr: &str) -> Option<(u32, u32, u32, u32, u8)> {
    let subnet: ipnet::Ipv4Net = cidr
        .parse()
        .ok()
        .filter(|n: &ipnet::Ipv4Net| n.prefix_len() <= 30)?;
    let (net, last) = (u32::from(subnet.network()), u32::from(subnet.broadcast()));
    Some((net, net + 1, net + 2, last - 1, subnet.prefix_len()))
}

/// The `ncp/network` annotation of a pod whose port NSX gave `ip` and `mac`, on the subnet
/// `cidr`; `None` for a CIDR that is not a namespace subnet.
pub fn pod_network(
    ip: &str,
    mac: &str,
    vlan: u16,
    cidr: &str,
    port_id: &str,
) -> Option<crate::k8s::pod_network::PodNetwork> {
    let (_, gw, _, _, prefix) = subnet_layout(cidr)?;
    Some(crate::k8s::pod_network::PodNetwork {
        gateway: std::net::Ipv4Addr::from(gw).to_string(),
        ip: format!("{ip}/{prefix}"),
        logical_port_id: port_id.to_string(),
        mac: mac.to_string(),
        vlan,
    })
}

fn ip(n: u32) -> String {
    std::net::Ipv4Addr::from(n).to_string()
}

fn tags_json(tags: &[Tag]) -> Value {
    serde_json::to_value(tags).unwrap_or(Value::Null)
}

/// The body NCP writes for `key`, with references resolved from `resolved` (observed and
/// already created objects). `address` is the address NCP allocated for it: the translated
/// address of a SNAT rule, the VIP of a virtual server.
pub fn render<R: Resolve + ?Sized>(
    key: &Key,
    spec: &Spec,
    infra: &Infra,
    resolved: &R,
    address: Option<&str>,
) -> Result<Value, Missing> {
    let ns = key.owner_uid().to_string();
    let subnet_cidr = |u: &str| -> Result<String, Missing> {
        let k = Key::Subnet(u.to_string());
        resolved
            .resolve(&k)
            .and_then(|d| d["cidr"].as_str())
            .map(str::to_string)
            .ok_or(Missing(k))
    };
    let mut tags = spec.tags.clone();
    let mut body = match &spec.detail {
        Detail::Group { selection } => render_group(selection, resolved),
        Detail::IpSet { addresses } => {
            json!({"resource_type": "IPSet", "ip_addresses": addresses})
        }
        Detail::Marker => {
            json!({"resource_type": "FirewallSection", "section_type": "LAYER3", "stateful": true})
        }
        Detail::Section { rules, .. } => {
            let rules = rules
                .iter()
                .map(|r| render_rule(r, resolved))
                .collect::<Result<Vec<Value>, Missing>>()?;
            json!({"resource_type": "FirewallSection", "section_type": "LAYER3", "stateful": true, "rules": rules})
        }
        Detail::LbTier1 => {
            tags.push(Tag::new(ADVERTISED_LB.0, ADVERTISED_LB.1));
            json!({"resource_type": "LogicalRouter", "router_type": "TIER1"})
        }
        Detail::LbT0Link => {
            json!({"resource_type": "LogicalRouterLinkPortOnTIER0", "logical_router_id": infra.tier0})
        }
        Detail::LbT1Link => {
            json!({"resource_type": "LogicalRouterLinkPortOnTIER1", "logical_router_id": id(resolved, &Key::LbTier1(ns.clone()))?,
            "linked_logical_router_port_id": {"target_id": id(resolved, &Key::LbT0Link(ns.clone()))?}})
        }
        Detail::LbService { virtual_servers } => {
            // Only the virtual servers that exist now: before new ones are created and after
            // old ones are gone, the applier updates the list again.
            let ids: Vec<&str> = virtual_servers
                .iter()
                .filter_map(|k| resolved.resolve(k).and_then(|d| d["id"].as_str()))
                .collect();
            json!({"resource_type": "LbService", "attachment": {"target_type": "LogicalRouter", "target_id": id(resolved, &Key::LbTier1(ns.clone()))?},
                "virtual_server_ids": ids, "size": "SMALL", "enabled": true})
        }
        Detail::LbPool { members } => {
            let m: Vec<Value> = members
                .iter()
                .map(|(ip, port)| json!({"ip_address": ip, "port": port.to_string()}))
                .collect();
            json!({"resource_type": "LbPool", "algorithm": "ROUND_ROBIN", "members": m})
        }
        Detail::LbVirtualServer { port, protocol, .. } => {
            let profile = if protocol == "UDP" {
                &infra.lb_udp_profile
            } else {
                &infra.lb_tcp_profile
            };
            let profile = profile.as_deref().ok_or_else(|| Missing(key.clone()))?;
            let vip = address.ok_or_else(|| Missing(key.clone()))?;
            json!({"resource_type": "LbVirtualServer", "ip_address": vip, "port": port.to_string(), "ip_protocol": protocol,
                "application_profile_id": profile, "pool_id": id(resolved, &Key::LbPool(key.owner_uid().to_string()))?, "enabled": true})
        }
        Detail::Subnet { size } => {
            json!({"resource_type": "IpBlockSubnet", "block_id": infra.ip_block, "size": size})
        }
        Detail::Pool => {
            let cidr = subnet_cidr(&ns)?;
            let (_, gw, first, last, _) =
                subnet_layout(&cidr).ok_or_else(|| Missing(Key::Subnet(ns.clone())))?;
            tags.push(Tag::new(scope::SUBNET, cidr.clone()));
            tags.push(Tag::new(
                scope::SUBNET_ID,
                id(resolved, &Key::Subnet(ns.clone()))?,
            ));
            json!({"resource_type": "IpPool", "subnets": [{"cidr": cidr, "gateway_ip": ip(gw), "allocation_ranges": [{"start": ip(first), "end": ip(last)}]}]})
        }
        Detail::Switch => {
            json!({"resource_type": "LogicalSwitch", "transport_zone_id": infra.transport_zone, "admin_state": "UP",
            "replication_mode": "MTEP", "ip_pool_id": id(resolved, &Key::Pool(ns.clone()))?})
        }
        Detail::Tier1 => {
            tags.push(Tag::new(ADVERTISED.0, ADVERTISED.1));
            json!({"resource_type": "LogicalRouter", "router_type": "TIER1"})
        }
        Detail::T0Link => {
            json!({"resource_type": "LogicalRouterLinkPortOnTIER0", "logical_router_id": infra.tier0})
        }
        Detail::T1Link => {
            json!({"resource_type": "LogicalRouterLinkPortOnTIER1", "logical_router_id": id(resolved, &Key::Tier1(ns.clone()))?,
            "linked_logical_router_port_id": {"target_id": id(resolved, &Key::T0Link(ns.clone()))?}})
        }
        Detail::DownlinkSwitchPort => {
            json!({"resource_type": "LogicalPort", "logical_switch_id": id(resolved, &Key::Switch(ns.clone()))?, "admin_state": "UP"})
        }
        Detail::Downlink => {
            let cidr = subnet_cidr(&ns)?;
            let (_, gw, _, _, prefix) =
                subnet_layout(&cidr).ok_or_else(|| Missing(Key::Subnet(ns.clone())))?;
            json!({"resource_type": "LogicalRouterDownLinkPort", "logical_router_id": id(resolved, &Key::Tier1(ns.clone()))?,
                "linked_logical_switch_port_id": {"target_id": id(resolved, &Key::DownlinkSwitchPort(ns.clone()))?},
                "subnets": [{"ip_addresses": [ip(gw)], "prefix_length": prefix}]})
        }
        Detail::Snat => {
            let cidr = subnet_cidr(&ns)?;
            let translated = address.unwrap_or("");
            tags.push(Tag::new(scope::SNAT_IP, translated));
            if let Some(pool) = &infra.snat_pool {
                tags.push(Tag::new(scope::EXTPOOL_ID, pool.clone()));
            }
            json!({"resource_type": "NatRule", "action": "SNAT", "match_source_network": cidr, "translated_network": translated, "enabled": true})
        }
        Detail::PodPort {
            namespace_uid,
            node,
            app_id,
            attachment_id,
            vlan,
        } => {
            let parent = infra
                .node_vifs
                .get(node)
                .ok_or_else(|| Missing(key.clone()))?;
            json!({"resource_type": "LogicalPort", "logical_switch_id": id(resolved, &Key::Switch(namespace_uid.clone()))?, "admin_state": "UP",
                "attachment": {"attachment_type": "VIF", "id": attachment_id, "context": {"resource_type": "VifAttachmentContext",
                    "vif_type": "CHILD", "parent_vif_id": parent, "traffic_tag": vlan.unwrap_or(0), "app_id": app_id, "allocate_addresses": "Both"}}})
        }
    };
    body["display_name"] = json!(spec.display_name);
    body["tags"] = tags_json(&tags);
    Ok(body)
}

fn target_type(key: &Key) -> &'static str {
    match key {
        Key::PolicyIpSet(_) => "IPSet",
        _ => "NSGroup",
    }
}

fn tag_expression(scope_name: &str, value: Option<&str>) -> Value {
    let mut e = json!({"resource_type": "NSGroupTagExpression", "target_type": "LogicalPort",
        "scope": naming::fit(scope_name, naming::TAG_SCOPE_MAX), "scope_op": "EQUALS"});
    if let Some(v) = value {
        e["tag"] = json!(naming::fit(v, naming::TAG_VALUE_MAX));
        e["tag_op"] = json!("EQUALS");
    }
    e
}

/// An NSGroup body. Explicit members that do not exist yet are left out; the group is planned
/// after the pods' ports, and a later pass adds what is still missing.
fn render_group<R: Resolve + ?Sized>(selection: &Selection, resolved: &R) -> Value {
    let simple = |target: &str, id: &str| {
        json!({"resource_type": "NSGroupSimpleExpression", "target_type": target,
            "target_property": "id", "op": "EQUALS", "value": id})
    };
    let (criteria, members): (Vec<Value>, Vec<Value>) = match selection {
        Selection::Criteria(cs) => (
            cs.iter()
                .map(|c| match c.as_slice() {
                    [(s, t)] => tag_expression(s, t.as_deref()),
                    many => json!({"resource_type": "NSGroupComplexExpression", "expressions":
                        many.iter().map(|(s, t)| tag_expression(s, t.as_deref())).collect::<Vec<_>>()}),
                })
                .collect(),
            vec![],
        ),
        Selection::Pods(uids) => (
            vec![],
            uids.iter()
                .filter_map(|u| resolved.resolve(&Key::PodPort(u.clone()))?["id"].as_str())
                .map(|id| simple("LogicalPort", id))
                .collect(),
        ),
        Selection::Namespaces(uids) => (
            vec![],
            uids.iter()
                .filter_map(|u| resolved.resolve(&Key::NsGroup(u.clone()))?["id"].as_str())
                .map(|id| simple("NSGroup", id))
                .collect(),
        ),
    };
    json!({"resource_type": "NSGroup", "membership_criteria": criteria, "members": members})
}

fn render_rule<R: Resolve + ?Sized>(rule: &RuleSpec, resolved: &R) -> Result<Value, Missing> {
    let refs = |keys: &[Key]| -> Result<Vec<Value>, Missing> {
        keys.iter()
            .map(|k| Ok(json!({"target_id": id(resolved, k)?, "target_type": target_type(k)})))
            .collect()
    };
    let services: Vec<Value> = rule
        .services
        .iter()
        .map(|s| match s {
            ServiceSpec::L4 { protocol, ports } => {
                let mut e = json!({"resource_type": "L4PortSetNSService", "l4_protocol": protocol});
                if !ports.is_empty() {
                    e["destination_ports"] = json!(ports);
                }
                json!({"service": e})
            }
            ServiceSpec::Ip { number } => {
                json!({"service": {"resource_type": "IPProtocolNSService", "protocol_number": number}})
            }
        })
        .collect();
    let mut r = json!({"resource_type": "FirewallRule", "display_name": rule.display_name, "action": rule.action,
        "direction": rule.direction, "ip_protocol": "IPV4", "disabled": false, "logged": false,
        "applied_tos": refs(std::slice::from_ref(&rule.applied_to))?});
    if !rule.sources.is_empty() {
        r["sources"] = json!(refs(&rule.sources)?);
    }
    if !rule.destinations.is_empty() {
        r["destinations"] = json!(refs(&rule.destinations)?);
    }
    if !services.is_empty() {
        r["services"] = json!(services);
    }
    Ok(r)
}
