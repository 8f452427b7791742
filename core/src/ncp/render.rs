//! What NCP writes: the NSX request body of each object it owns, rendered from its [`Spec`]
//! with references (ids, a subnet's CIDR) resolved to the objects NSX holds. Pure, and shared:
//! the planner renders to compare with what NSX holds ([`super::plan`]), the applier to write
//! ([`super::apply`]), and the harness's converge check to compare from scratch.

use std::collections::BTreeMap;

use serde_json::Value;

use super::infra::Infra;
use super::naming::{self, scope};
use super::vocab::{Detail, Key, RuleSpec, Selection, ServiceSpec, Spec};
use crate::nsx::model::{
    AttachmentContext, FirewallRule, FirewallSection, FirewallService, IpBlockSubnet, IpPool,
    IpPoolRange, IpPoolSubnet, IpSet, IpSubnet, LbPersistenceProfile, LbPool, LbService,
    LbVirtualServer, LogicalPort, LogicalPortAttachment, LogicalRouter, LogicalRouterPort,
    LogicalSwitch, NatRule, NsGroup, NsGroupExpression, NsServiceElement, PoolMember, ResourceMeta,
    ResourceReference, Tag,
};

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

/// The wire form of a typed body. The model's types are plain data with string keys, so this
/// cannot fail; `Null` would be refused by NSX rather than written silently.
pub fn wire<T: serde::Serialize>(body: &T) -> Value {
    serde_json::to_value(body).unwrap_or(Value::Null)
}

fn reference(target_id: &str, target_type: Option<&str>) -> ResourceReference {
    ResourceReference {
        target_id: Some(target_id.to_string()),
        target_type: target_type.map(str::to_string),
        ..Default::default()
    }
}

/// The body NCP writes for `key`, with references resolved from `resolved` (observed and
/// already created objects). `address` is the address NCP allocated for it: the translated
/// address of a SNAT rule, the VIP of a virtual server.
///
/// Every body is built as the API's own type from [`crate::nsx::model`], the type the fake
/// NSX Manager validates requests with: a field NCP names is a field the API has.
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
    // Each body names its type; the fields every kind shares are added below.
    let meta = |rt: &str| ResourceMeta {
        resource_type: Some(rt.to_string()),
        ..Default::default()
    };
    let body = match &spec.detail {
        Detail::Group { selection } => wire(&render_group(selection, resolved, meta("NSGroup"))),
        Detail::IpSet { addresses } => wire(&IpSet {
            meta: meta("IPSet"),
            ip_addresses: Some(addresses.clone()),
        }),
        Detail::Marker => wire(&FirewallSection {
            meta: meta("FirewallSection"),
            section_type: Some("LAYER3".into()),
            stateful: Some(true),
            ..Default::default()
        }),
        Detail::Section { rules, .. } => {
            let rules = rules
                .iter()
                .map(|r| render_rule(r, resolved))
                .collect::<Result<Vec<_>, Missing>>()?;
            wire(&FirewallSection {
                meta: meta("FirewallSection"),
                section_type: Some("LAYER3".into()),
                stateful: Some(true),
                rules: Some(rules),
                ..Default::default()
            })
        }
        Detail::LbTier1 | Detail::Tier1 => {
            let (scope_name, value) = if matches!(spec.detail, Detail::LbTier1) {
                ADVERTISED_LB
            } else {
                ADVERTISED
            };
            tags.push(Tag::new(scope_name, value));
            wire(&LogicalRouter {
                meta: meta("LogicalRouter"),
                router_type: Some("TIER1".into()),
                // A load balancer runs on its tier-1's edges.
                edge_cluster_id: if matches!(spec.detail, Detail::LbTier1) {
                    infra.edge_cluster.clone()
                } else {
                    None
                },
                ..Default::default()
            })
        }
        Detail::LbT0Link | Detail::T0Link => wire(&LogicalRouterPort {
            meta: meta("LogicalRouterLinkPortOnTIER0"),
            logical_router_id: Some(infra.tier0.clone()),
            ..Default::default()
        }),
        Detail::LbT1Link | Detail::T1Link => {
            let (router, tier0_port) = if matches!(spec.detail, Detail::LbT1Link) {
                (Key::LbTier1(ns.clone()), Key::LbT0Link(ns.clone()))
            } else {
                (Key::Tier1(ns.clone()), Key::T0Link(ns.clone()))
            };
            wire(&LogicalRouterPort {
                meta: meta("LogicalRouterLinkPortOnTIER1"),
                logical_router_id: Some(id(resolved, &router)?.to_string()),
                linked_logical_router_port_id: Some(wire(&reference(
                    id(resolved, &tier0_port)?,
                    None,
                ))),
                ..Default::default()
            })
        }
        Detail::LbService {
            virtual_servers,
            size,
        } => {
            // Only the virtual servers that exist now: before new ones are created and after
            // old ones are gone, the applier updates the list again.
            let ids = virtual_servers
                .iter()
                .filter_map(|k| resolved.resolve(k).and_then(|d| d["id"].as_str()))
                .map(str::to_string)
                .collect();
            wire(&LbService {
                meta: meta("LbService"),
                attachment: Some(reference(
                    id(resolved, &Key::LbTier1(ns.clone()))?,
                    Some("LogicalRouter"),
                )),
                virtual_server_ids: Some(ids),
                size: Some(size.clone()),
                enabled: Some(true),
                ..Default::default()
            })
        }
        Detail::LbPool { members, algorithm } => wire(&LbPool {
            meta: meta("LbPool"),
            algorithm: Some(algorithm.clone()),
            // Automap, as NCP sets its pools: the load balancer translates the client's
            // source to its own uplink address, so that replies come back through it.
            snat_translation: Some(serde_json::json!({"type": "LbSnatAutoMap"})),
            members: Some(
                members
                    .iter()
                    .map(|(ip, port)| PoolMember {
                        ip_address: Some(ip.clone()),
                        port: Some(port.to_string()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        Detail::LbPersistence { timeout } => wire(&LbPersistenceProfile {
            meta: meta("LbSourceIpPersistenceProfile"),
            persistence_shared: Some(false),
            timeout: Some(*timeout),
            purge: Some("FULL".into()),
            ..Default::default()
        }),
        Detail::LbVirtualServer {
            port,
            protocol,
            persistence,
            ..
        } => {
            let profile = if protocol == "UDP" {
                &infra.lb_udp_profile
            } else {
                &infra.lb_tcp_profile
            };
            let profile = profile.as_deref().ok_or_else(|| Missing(key.clone()))?;
            let vip = address.ok_or_else(|| Missing(key.clone()))?;
            wire(&LbVirtualServer {
                meta: meta("LbVirtualServer"),
                ip_address: Some(vip.to_string()),
                port: Some(port.to_string()),
                ip_protocol: Some(protocol.clone()),
                application_profile_id: Some(profile.to_string()),
                pool_id: Some(id(resolved, &Key::LbPool(ns.clone()))?.to_string()),
                persistence_profile_id: match persistence {
                    Some(p) => Some(id(resolved, p)?.to_string()),
                    None => None,
                },
                enabled: Some(true),
                ..Default::default()
            })
        }
        Detail::Subnet { size } => wire(&IpBlockSubnet {
            meta: meta("IpBlockSubnet"),
            block_id: Some(infra.ip_block.clone()),
            size: Some(i64::try_from(*size).unwrap_or(i64::MAX)),
            ..Default::default()
        }),
        Detail::Pool => {
            let cidr = subnet_cidr(&ns)?;
            let (_, gw, first, last, _) =
                subnet_layout(&cidr).ok_or_else(|| Missing(Key::Subnet(ns.clone())))?;
            tags.push(Tag::new(scope::SUBNET, cidr.clone()));
            tags.push(Tag::new(
                scope::SUBNET_ID,
                id(resolved, &Key::Subnet(ns.clone()))?,
            ));
            wire(&IpPool {
                meta: meta("IpPool"),
                subnets: Some(vec![IpPoolSubnet {
                    cidr: Some(cidr),
                    gateway_ip: Some(ip(gw)),
                    allocation_ranges: Some(vec![IpPoolRange {
                        start: Some(ip(first)),
                        end: Some(ip(last)),
                    }]),
                    ..Default::default()
                }]),
                ..Default::default()
            })
        }
        Detail::Switch => wire(&LogicalSwitch {
            meta: meta("LogicalSwitch"),
            transport_zone_id: Some(infra.transport_zone.clone()),
            admin_state: Some("UP".into()),
            replication_mode: Some("MTEP".into()),
            ip_pool_id: Some(id(resolved, &Key::Pool(ns.clone()))?.to_string()),
            ..Default::default()
        }),
        Detail::DownlinkSwitchPort => wire(&LogicalPort {
            meta: meta("LogicalPort"),
            logical_switch_id: Some(id(resolved, &Key::Switch(ns.clone()))?.to_string()),
            admin_state: Some("UP".into()),
            ..Default::default()
        }),
        Detail::Downlink => {
            let cidr = subnet_cidr(&ns)?;
            let (_, gw, _, _, prefix) =
                subnet_layout(&cidr).ok_or_else(|| Missing(Key::Subnet(ns.clone())))?;
            wire(&LogicalRouterPort {
                meta: meta("LogicalRouterDownLinkPort"),
                logical_router_id: Some(id(resolved, &Key::Tier1(ns.clone()))?.to_string()),
                linked_logical_switch_port_id: Some(reference(
                    id(resolved, &Key::DownlinkSwitchPort(ns.clone()))?,
                    None,
                )),
                subnets: Some(vec![IpSubnet {
                    ip_addresses: Some(vec![ip(gw)]),
                    prefix_length: Some(i64::from(prefix)),
                }]),
                ..Default::default()
            })
        }
        Detail::Snat => {
            let cidr = subnet_cidr(&ns)?;
            let translated = address.unwrap_or("");
            tags.push(Tag::new(scope::SNAT_IP, translated));
            if let Some(pool) = &infra.snat_pool {
                tags.push(Tag::new(scope::EXTPOOL_ID, pool.clone()));
            }
            wire(&NatRule {
                meta: meta("NatRule"),
                action: Some("SNAT".into()),
                match_source_network: Some(cidr),
                translated_network: Some(translated.to_string()),
                enabled: Some(true),
                ..Default::default()
            })
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
            wire(&LogicalPort {
                meta: meta("LogicalPort"),
                logical_switch_id: Some(
                    id(resolved, &Key::Switch(namespace_uid.clone()))?.to_string(),
                ),
                admin_state: Some("UP".into()),
                attachment: Some(LogicalPortAttachment {
                    attachment_type: Some("VIF".into()),
                    id: Some(attachment_id.clone()),
                    context: Some(AttachmentContext {
                        resource_type: Some("VifAttachmentContext".into()),
                        vif_type: Some("CHILD".into()),
                        parent_vif_id: Some(parent.clone()),
                        traffic_tag: Some(i64::from(vlan.unwrap_or(0))),
                        app_id: Some(app_id.clone()),
                        allocate_addresses: Some("Both".into()),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            })
        }
    };
    let common = wire(&ResourceMeta {
        display_name: Some(spec.display_name.clone()),
        tags: Some(tags),
        ..Default::default()
    });
    Ok(merge(body, common))
}

/// `body` with `meta`'s fields set: the common fields are known only after the kind's own.
fn merge(mut body: Value, meta: Value) -> Value {
    if let (Value::Object(b), Value::Object(m)) = (&mut body, meta) {
        b.extend(m);
    }
    body
}

fn target_type(key: &Key) -> &'static str {
    match key {
        Key::PolicyIpSet(_) | Key::NodeIpSet(_) => "IPSet",
        _ => "NSGroup",
    }
}

fn tag_expression(scope_name: &str, value: Option<&str>) -> NsGroupExpression {
    NsGroupExpression {
        resource_type: Some("NSGroupTagExpression".into()),
        target_type: Some("LogicalPort".into()),
        scope: Some(naming::fit(scope_name, naming::TAG_SCOPE_MAX).to_string()),
        scope_op: Some("EQUALS".into()),
        tag: value.map(|v| naming::fit(v, naming::TAG_VALUE_MAX).to_string()),
        tag_op: value.map(|_| "EQUALS".to_string()),
        ..Default::default()
    }
}

/// An NSGroup body. Explicit members that do not exist yet are left out; the group is planned
/// after the pods' ports, and a later pass adds what is still missing.
fn render_group<R: Resolve + ?Sized>(
    selection: &Selection,
    resolved: &R,
    meta: ResourceMeta,
) -> NsGroup {
    let simple = |target: &str, id: &str| NsGroupExpression {
        resource_type: Some("NSGroupSimpleExpression".into()),
        target_type: Some(target.to_string()),
        target_property: Some("id".into()),
        op: Some("EQUALS".into()),
        value: Some(id.to_string()),
        ..Default::default()
    };
    let (criteria, members) = match selection {
        Selection::Criteria(cs) => (
            cs.iter()
                .map(|c| match c.as_slice() {
                    [(s, t)] => tag_expression(s, t.as_deref()),
                    many => NsGroupExpression {
                        resource_type: Some("NSGroupComplexExpression".into()),
                        expressions: Some(
                            many.iter()
                                .map(|(s, t)| tag_expression(s, t.as_deref()))
                                .collect(),
                        ),
                        ..Default::default()
                    },
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
    NsGroup {
        meta,
        membership_criteria: Some(criteria),
        members: Some(members),
        ..Default::default()
    }
}

fn render_rule<R: Resolve + ?Sized>(
    rule: &RuleSpec,
    resolved: &R,
) -> Result<FirewallRule, Missing> {
    let refs = |keys: &[Key]| -> Result<Vec<ResourceReference>, Missing> {
        keys.iter()
            .map(|k| Ok(reference(id(resolved, k)?, Some(target_type(k)))))
            .collect()
    };
    let services: Vec<FirewallService> = rule
        .services
        .iter()
        .map(|s| FirewallService {
            service: Some(match s {
                ServiceSpec::L4 { protocol, ports } => NsServiceElement {
                    resource_type: Some("L4PortSetNSService".into()),
                    l4_protocol: Some(protocol.clone()),
                    destination_ports: (!ports.is_empty()).then(|| ports.clone()),
                    ..Default::default()
                },
                ServiceSpec::Ip { number } => NsServiceElement {
                    resource_type: Some("IPProtocolNSService".into()),
                    protocol_number: Some(i64::from(*number)),
                    ..Default::default()
                },
            }),
            ..Default::default()
        })
        .collect();
    let non_empty = |v: Vec<ResourceReference>| (!v.is_empty()).then_some(v);
    Ok(FirewallRule {
        meta: ResourceMeta {
            resource_type: Some("FirewallRule".into()),
            display_name: Some(rule.display_name.clone()),
            ..Default::default()
        },
        action: Some(rule.action.clone()),
        direction: Some(rule.direction.clone()),
        ip_protocol: Some("IPV4".into()),
        disabled: Some(false),
        logged: Some(false),
        applied_tos: Some(refs(std::slice::from_ref(&rule.applied_to))?),
        sources: non_empty(refs(&rule.sources)?),
        destinations: non_empty(refs(&rule.destinations)?),
        services: (!services.is_empty()).then_some(services),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn infra() -> Infra {
        Infra {
            transport_zone: "tz-1".into(),
            tier0: "t0-1".into(),
            ip_block: "block-1".into(),
            snat_pool: Some("snat-1".into()),
            lb_pool: None,
            lb_tcp_profile: None,
            lb_udp_profile: None,
            edge_cluster: None,
            node_vifs: [("node-a".to_string(), "vif-a".to_string())].into(),
        }
    }

    fn spec(detail: Detail) -> Spec {
        Spec {
            display_name: "ns-x".into(),
            tags: vec![Tag::new("ncp/cluster", "k8s-a")],
            detail,
        }
    }

    fn held(pairs: &[(Key, Value)]) -> BTreeMap<Key, Value> {
        pairs.iter().cloned().collect()
    }

    /// The bodies are pinned here with the API's field names written out by hand, not through
    /// the model: a field the model (and so NCP and the fake) misspelled would fail this test.
    #[test]
    fn bodies_carry_the_api_field_names_letter_for_letter() {
        let nsx = held(&[
            (Key::Switch("u1".into()), json!({"id": "ls-1"})),
            (
                Key::Subnet("u1".into()),
                json!({"id": "sn-1", "cidr": "10.4.0.0/24"}),
            ),
            (Key::Tier1("u1".into()), json!({"id": "t1-1"})),
            (Key::DownlinkSwitchPort("u1".into()), json!({"id": "lp-d"})),
            (Key::PolicyGroup("p/applied".into()), json!({"id": "g-1"})),
            (Key::PolicyIpSet("p/in0-0".into()), json!({"id": "ips-1"})),
        ]);
        let port = spec(Detail::PodPort {
            namespace_uid: "u1".into(),
            node: "node-a".into(),
            app_id: "ns-x/web".into(),
            attachment_id: "att-1".into(),
            vlan: Some(7),
        });
        let body = render(&Key::PodPort("pod-1".into()), &port, &infra(), &nsx, None);
        assert_eq!(
            body,
            Ok(json!({
                "resource_type": "LogicalPort", "display_name": "ns-x",
                "tags": [{"scope": "ncp/cluster", "tag": "k8s-a"}],
                "logical_switch_id": "ls-1", "admin_state": "UP",
                "attachment": {"attachment_type": "VIF", "id": "att-1", "context": {
                    "resource_type": "VifAttachmentContext", "vif_type": "CHILD",
                    "parent_vif_id": "vif-a", "traffic_tag": 7, "app_id": "ns-x/web",
                    "allocate_addresses": "Both"}}
            }))
        );
        let body = render(
            &Key::Downlink("u1".into()),
            &spec(Detail::Downlink),
            &infra(),
            &nsx,
            None,
        );
        assert_eq!(
            body,
            Ok(json!({
                "resource_type": "LogicalRouterDownLinkPort", "display_name": "ns-x",
                "tags": [{"scope": "ncp/cluster", "tag": "k8s-a"}],
                "logical_router_id": "t1-1",
                "linked_logical_switch_port_id": {"target_id": "lp-d"},
                "subnets": [{"ip_addresses": ["10.4.0.1"], "prefix_length": 24}]
            }))
        );
        let rule = RuleSpec {
            display_name: "in-0".into(),
            action: "ALLOW".into(),
            direction: "IN".into(),
            sources: vec![Key::PolicyIpSet("p/in0-0".into())],
            destinations: vec![],
            services: vec![
                ServiceSpec::L4 {
                    protocol: "TCP".into(),
                    ports: vec!["80".into()],
                },
                ServiceSpec::Ip { number: 132 },
            ],
            applied_to: Key::PolicyGroup("p/applied".into()),
        };
        let section = spec(Detail::Section {
            marker: Key::FwMarkerTop("c".into()),
            rules: vec![rule],
        });
        let body = render(
            &Key::AllowSection("p".into()),
            &section,
            &infra(),
            &nsx,
            None,
        );
        assert_eq!(
            body,
            Ok(json!({
                "resource_type": "FirewallSection", "display_name": "ns-x",
                "tags": [{"scope": "ncp/cluster", "tag": "k8s-a"}],
                "section_type": "LAYER3", "stateful": true,
                "rules": [{"resource_type": "FirewallRule", "display_name": "in-0",
                    "action": "ALLOW", "direction": "IN", "ip_protocol": "IPV4",
                    "disabled": false, "logged": false,
                    "applied_tos": [{"target_id": "g-1", "target_type": "NSGroup"}],
                    "sources": [{"target_id": "ips-1", "target_type": "IPSet"}],
                    "services": [
                        {"service": {"resource_type": "L4PortSetNSService",
                            "l4_protocol": "TCP", "destination_ports": ["80"]}},
                        {"service": {"resource_type": "IPProtocolNSService",
                            "protocol_number": 132}}]}]
            }))
        );
        let group = spec(Detail::Group {
            selection: Selection::Criteria(vec![vec![
                ("ncp/project".into(), Some("ns-x".into())),
                ("app".into(), None),
            ]]),
        });
        let body = render(
            &Key::PolicyGroup("p/applied".into()),
            &group,
            &infra(),
            &nsx,
            None,
        );
        assert_eq!(
            body,
            Ok(json!({
                "resource_type": "NSGroup", "display_name": "ns-x",
                "tags": [{"scope": "ncp/cluster", "tag": "k8s-a"}],
                "members": [],
                "membership_criteria": [{"resource_type": "NSGroupComplexExpression",
                    "expressions": [
                        {"resource_type": "NSGroupTagExpression", "target_type": "LogicalPort",
                            "scope": "ncp/project", "scope_op": "EQUALS",
                            "tag": "ns-x", "tag_op": "EQUALS"},
                        {"resource_type": "NSGroupTagExpression", "target_type": "LogicalPort",
                            "scope": "app", "scope_op": "EQUALS"}]}]
            }))
        );
    }

    #[test]
    fn a_reference_to_an_object_not_there_is_missing_never_an_empty_id() {
        let body = render(
            &Key::Downlink("u1".into()),
            &spec(Detail::Downlink),
            &infra(),
            &held(&[(
                Key::Subnet("u1".into()),
                json!({"id": "sn-1", "cidr": "10.4.0.0/24"}),
            )]),
            None,
        );
        assert_eq!(body, Err(Missing(Key::Tier1("u1".into()))));
    }
}
