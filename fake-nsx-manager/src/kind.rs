//! The object kinds the fake serves: their collection paths, accepted `resource_type`s, required
//! and immutable fields, enumerations, page-size limits, and typed validation of a body.

use nsx_core::nsx::model;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    EdgeCluster,
    TransportZone,
    LogicalSwitch,
    LogicalPort,
    LogicalRouter,
    LogicalRouterPort,
    IpBlock,
    IpBlockSubnet,
    IpPool,
    NatRule,
    NsGroup,
    IpSet,
    NsService,
    FirewallSection,
    FirewallRule,
    LbService,
    LbVirtualServer,
    LbPool,
    LbAppProfile,
    LbPersistenceProfile,
}

/// Top-level collections: (path under `/api/v1/`, kind). Nested ones (NAT rules, firewall
/// rules) are routed by `dispatch`.
pub const COLLECTIONS: &[(&str, Kind)] = &[
    ("edge-clusters", Kind::EdgeCluster),
    ("transport-zones", Kind::TransportZone),
    ("logical-switches", Kind::LogicalSwitch),
    ("logical-ports", Kind::LogicalPort),
    ("logical-routers", Kind::LogicalRouter),
    ("logical-router-ports", Kind::LogicalRouterPort),
    ("pools/ip-blocks", Kind::IpBlock),
    ("pools/ip-subnets", Kind::IpBlockSubnet),
    ("pools/ip-pools", Kind::IpPool),
    ("ns-groups", Kind::NsGroup),
    ("ip-sets", Kind::IpSet),
    ("ns-services", Kind::NsService),
    ("firewall/sections", Kind::FirewallSection),
    ("loadbalancer/services", Kind::LbService),
    ("loadbalancer/virtual-servers", Kind::LbVirtualServer),
    ("loadbalancer/pools", Kind::LbPool),
    ("loadbalancer/application-profiles", Kind::LbAppProfile),
    (
        "loadbalancer/persistence-profiles",
        Kind::LbPersistenceProfile,
    ),
];

impl Kind {
    /// Accepted `resource_type` values; the first is the default when a body has none.
    pub fn resource_types(self) -> &'static [&'static str] {
        match self {
            Kind::EdgeCluster => &["EdgeCluster"],
            Kind::TransportZone => &["TransportZone"],
            Kind::LogicalSwitch => &["LogicalSwitch"],
            Kind::LogicalPort => &["LogicalPort"],
            Kind::LogicalRouter => &["LogicalRouter"],
            // No default: a router port must say which kind it is.
            Kind::LogicalRouterPort => &[
                "LogicalRouterLinkPortOnTIER0",
                "LogicalRouterLinkPortOnTIER1",
                "LogicalRouterDownLinkPort",
            ],
            Kind::IpBlock => &["IpBlock"],
            Kind::IpBlockSubnet => &["IpBlockSubnet"],
            Kind::IpPool => &["IpPool"],
            Kind::NatRule => &["NatRule"],
            Kind::NsGroup => &["NSGroup"],
            Kind::IpSet => &["IPSet"],
            Kind::NsService => &["NSService"],
            Kind::FirewallSection => &["FirewallSection"],
            Kind::FirewallRule => &["FirewallRule"],
            Kind::LbService => &["LbService"],
            Kind::LbVirtualServer => &["LbVirtualServer"],
            Kind::LbPool => &["LbPool"],
            Kind::LbAppProfile => &["LbFastTcpProfile", "LbFastUdpProfile", "LbHttpProfile"],
            Kind::LbPersistenceProfile => {
                &["LbSourceIpPersistenceProfile", "LbCookiePersistenceProfile"]
            }
        }
    }

    fn needs_explicit_resource_type(self) -> bool {
        matches!(
            self,
            Kind::LogicalRouterPort | Kind::LbAppProfile | Kind::LbPersistenceProfile
        )
    }

    /// Fields a create (and a full PUT) must carry.
    pub fn required(self, resource_type: &str) -> &'static [&'static str] {
        match self {
            Kind::EdgeCluster => &[],
            Kind::TransportZone => &["transport_type", "host_switch_name"],
            Kind::LogicalSwitch => &["transport_zone_id", "admin_state"],
            Kind::LogicalPort => &["logical_switch_id", "admin_state"],
            Kind::LogicalRouter => &["router_type"],
            Kind::LogicalRouterPort => match resource_type {
                "LogicalRouterLinkPortOnTIER1" => {
                    &["logical_router_id", "linked_logical_router_port_id"]
                }
                "LogicalRouterDownLinkPort" => &[
                    "logical_router_id",
                    "linked_logical_switch_port_id",
                    "subnets",
                ],
                _ => &["logical_router_id"],
            },
            Kind::IpBlock => &["cidr"],
            Kind::IpBlockSubnet => &["block_id", "size"],
            Kind::IpPool => &[],
            Kind::NatRule => &["action"],
            Kind::NsGroup => &[],
            Kind::IpSet => &[],
            Kind::NsService => &["nsservice_element"],
            Kind::FirewallSection => &["section_type", "stateful"],
            Kind::FirewallRule => &["action"],
            Kind::LbService => &[],
            Kind::LbVirtualServer => &["ip_address", "application_profile_id"],
            Kind::LbPool => &[],
            Kind::LbAppProfile => &[],
            Kind::LbPersistenceProfile => &[],
        }
    }

    /// Fields that a PUT may not change.
    pub fn immutable(self) -> &'static [&'static str] {
        match self {
            Kind::LogicalSwitch => &["transport_zone_id"],
            Kind::LogicalPort => &["logical_switch_id"],
            Kind::LogicalRouter => &["router_type"],
            Kind::LogicalRouterPort => &["logical_router_id", "resource_type"],
            Kind::IpBlockSubnet => &["block_id", "size"],
            Kind::TransportZone => &["transport_type", "host_switch_name"],
            Kind::FirewallSection => &["section_type"],
            Kind::NatRule => &["logical_router_id"],
            _ => &[],
        }
    }

    /// `(dotted path, allowed values)` for enumerated fields.
    pub fn enums(self) -> &'static [(&'static str, &'static [&'static str])] {
        const ADMIN: &[&str] = &["UP", "DOWN"];
        match self {
            Kind::TransportZone => &[("transport_type", &["OVERLAY", "VLAN"])],
            Kind::LogicalSwitch => &[
                ("admin_state", ADMIN),
                ("replication_mode", &["MTEP", "SOURCE"]),
            ],
            Kind::LogicalPort => &[
                ("admin_state", ADMIN),
                (
                    "attachment.attachment_type",
                    &[
                        "VIF",
                        "LOGICALROUTER",
                        "BRIDGEENDPOINT",
                        "DHCP_SERVICE",
                        "METADATA_PROXY",
                        "L2VPN_SESSION",
                    ],
                ),
                (
                    "attachment.context.resource_type",
                    &["VifAttachmentContext"],
                ),
                (
                    "attachment.context.vif_type",
                    &["PARENT", "CHILD", "INDEPENDENT"],
                ),
                (
                    "attachment.context.allocate_addresses",
                    &["IpPool", "MacPool", "Both", "None"],
                ),
                ("init_state", &["UNBLOCKED_VLAN", "RESTORE_VIF"]),
            ],
            Kind::LogicalRouter => &[
                ("router_type", &["TIER0", "TIER1"]),
                (
                    "high_availability_mode",
                    &["ACTIVE_ACTIVE", "ACTIVE_STANDBY"],
                ),
                ("failover_mode", &["PREEMPTIVE", "NON_PREEMPTIVE"]),
            ],
            Kind::LogicalRouterPort => &[("urpf_mode", &["NONE", "STRICT"])],
            Kind::NatRule => &[(
                "action",
                &["SNAT", "DNAT", "NO_NAT", "NO_SNAT", "NO_DNAT", "REFLEXIVE"],
            )],
            Kind::NsService => &[
                (
                    "nsservice_element.resource_type",
                    &[
                        "L4PortSetNSService",
                        "IPProtocolNSService",
                        "ICMPTypeNSService",
                        "ALGTypeNSService",
                        "EtherTypeNSService",
                    ],
                ),
                ("nsservice_element.l4_protocol", &["TCP", "UDP"]),
            ],
            Kind::FirewallSection => &[("section_type", &["LAYER2", "LAYER3"])],
            Kind::FirewallRule => &[
                ("action", &["ALLOW", "DROP", "REJECT"]),
                ("direction", &["IN", "OUT", "IN_OUT"]),
                ("ip_protocol", &["IPV4", "IPV6", "IPV4_IPV6"]),
            ],
            Kind::LbService => &[
                ("size", &["SMALL", "MEDIUM", "LARGE", "DLB"]),
                (
                    "error_log_level",
                    &[
                        "DEBUG",
                        "INFO",
                        "WARNING",
                        "ERROR",
                        "CRITICAL",
                        "ALERT",
                        "EMERGENCY",
                    ],
                ),
            ],
            Kind::LbVirtualServer => &[("ip_protocol", &["TCP", "UDP"])],
            Kind::LbPool => &[(
                "algorithm",
                &[
                    "ROUND_ROBIN",
                    "WEIGHTED_ROUND_ROBIN",
                    "LEAST_CONNECTION",
                    "WEIGHTED_LEAST_CONNECTION",
                    "IP_HASH",
                ],
            )],
            _ => &[],
        }
    }

    /// Largest page a list of this kind answers with (NSGroups: 50).
    pub fn max_page_size(self) -> usize {
        match self {
            Kind::NsGroup => 50,
            _ => 1000,
        }
    }

    /// Firewall objects answer a stale revision with 409, the rest with 412.
    pub fn stale_status(self) -> u16 {
        match self {
            Kind::FirewallSection | Kind::FirewallRule => 409,
            _ => 412,
        }
    }

    pub fn module(self) -> &'static str {
        match self {
            Kind::EdgeCluster => "edge-cluster",
            Kind::TransportZone | Kind::LogicalSwitch | Kind::LogicalPort => "switching",
            Kind::LogicalRouter | Kind::LogicalRouterPort | Kind::NatRule => "routing",
            Kind::IpBlock | Kind::IpBlockSubnet | Kind::IpPool => "id-allocation-service",
            Kind::NsGroup | Kind::IpSet | Kind::NsService => "nsgroup",
            Kind::FirewallSection | Kind::FirewallRule => "firewall",
            Kind::LbService
            | Kind::LbVirtualServer
            | Kind::LbPool
            | Kind::LbAppProfile
            | Kind::LbPersistenceProfile => "LoadBalancer",
        }
    }

    /// Checks a request body against the kind's wire type and rules, and returns it in
    /// canonical form (unknown fields dropped, `resource_type` set). Server-owned fields are
    /// left for the store to overwrite.
    pub fn validate(self, body: &Value) -> ApiResult<Map<String, Value>> {
        let obj = body
            .as_object()
            .ok_or_else(|| ApiError::validation("the request body must be a JSON object"))?;
        let rt = match obj.get("resource_type") {
            None | Some(Value::Null) if self.needs_explicit_resource_type() => {
                return Err(ApiError::validation(format!(
                    "required property resource_type is missing; one of {:?}",
                    self.resource_types()
                )));
            }
            None | Some(Value::Null) => self.resource_types()[0].to_string(),
            Some(Value::String(s)) if self.resource_types().contains(&s.as_str()) => s.clone(),
            Some(other) => {
                return Err(ApiError::validation(format!(
                    "resource_type {other} is not valid here; expected one of {:?}",
                    self.resource_types()
                )));
            }
        };
        let mut canonical = match self {
            Kind::EdgeCluster => typed::<model::EdgeCluster>(body)?,
            Kind::TransportZone => typed::<model::TransportZone>(body)?,
            Kind::LogicalSwitch => typed::<model::LogicalSwitch>(body)?,
            Kind::LogicalPort => typed::<model::LogicalPort>(body)?,
            Kind::LogicalRouter => typed::<model::LogicalRouter>(body)?,
            Kind::LogicalRouterPort => typed::<model::LogicalRouterPort>(body)?,
            Kind::IpBlock => typed::<model::IpBlock>(body)?,
            Kind::IpBlockSubnet => typed::<model::IpBlockSubnet>(body)?,
            Kind::IpPool => typed::<model::IpPool>(body)?,
            Kind::NatRule => typed::<model::NatRule>(body)?,
            Kind::NsGroup => typed::<model::NsGroup>(body)?,
            Kind::IpSet => typed::<model::IpSet>(body)?,
            Kind::NsService => typed::<model::NsService>(body)?,
            Kind::FirewallSection => typed::<model::FirewallSection>(body)?,
            Kind::FirewallRule => typed::<model::FirewallRule>(body)?,
            Kind::LbService => typed::<model::LbService>(body)?,
            Kind::LbVirtualServer => typed::<model::LbVirtualServer>(body)?,
            Kind::LbPool => typed::<model::LbPool>(body)?,
            Kind::LbAppProfile => typed::<model::LbAppProfile>(body)?,
            Kind::LbPersistenceProfile => typed::<model::LbPersistenceProfile>(body)?,
        };
        canonical.insert("resource_type".into(), Value::String(rt.clone()));
        for field in self.required(&rt) {
            if is_missing(canonical.get(*field)) {
                return Err(ApiError::validation(format!(
                    "required property {field} is missing"
                )));
            }
        }
        for (path, allowed) in self.enums() {
            for v in values_at(&Value::Object(canonical.clone()), path) {
                match v.as_str() {
                    Some(s) if allowed.contains(&s) => {}
                    _ => {
                        return Err(ApiError::validation(format!(
                            "{path}: {v} is not one of {allowed:?}"
                        )));
                    }
                }
            }
        }
        Ok(canonical)
    }
}

fn is_missing(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        _ => false,
    }
}

/// Every value at a dotted path; arrays along the way fan out.
pub fn values_at<'a>(v: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut current = vec![v];
    for key in path.split('.') {
        let mut next = Vec::new();
        for c in current {
            match c {
                Value::Object(m) => {
                    if let Some(x) = m.get(key) {
                        match x {
                            Value::Array(items) => next.extend(items.iter()),
                            Value::Null => {}
                            other => next.push(other),
                        }
                    }
                }
                Value::Array(items) => {
                    for i in items {
                        if let Some(x) = i.get(key) {
                            next.push(x);
                        }
                    }
                }
                _ => {}
            }
        }
        current = next;
    }
    current
}

fn typed<T: DeserializeOwned + Serialize>(body: &Value) -> ApiResult<Map<String, Value>> {
    let t: T =
        serde_json::from_value(body.clone()).map_err(|e| ApiError::validation(e.to_string()))?;
    match serde_json::to_value(&t) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(ApiError::validation("the body does not describe an object")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn missing_required_field_wrong_type_and_bad_enum_are_rejected() {
        let e = Kind::LogicalSwitch
            .validate(&json!({"admin_state": "UP"}))
            .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.body.error_message.contains("transport_zone_id"), "{e:?}");
        let e = Kind::LogicalSwitch
            .validate(&json!({"admin_state": 1, "transport_zone_id": "tz"}))
            .unwrap_err();
        assert_eq!(e.body.error_code, Some(255));
        let e = Kind::LogicalSwitch
            .validate(&json!({"admin_state": "SIDEWAYS", "transport_zone_id": "tz"}))
            .unwrap_err();
        assert!(e.body.error_message.contains("SIDEWAYS"));
        let e = Kind::LogicalSwitch
            .validate(&json!({"resource_type": "LogicalPort", "admin_state": "UP", "transport_zone_id": "tz"}))
            .unwrap_err();
        assert!(e.body.error_message.contains("resource_type"));
        assert!(Kind::LogicalSwitch.validate(&json!([1])).is_err());
    }

    #[test]
    fn router_ports_must_name_their_type() {
        assert!(
            Kind::LogicalRouterPort
                .validate(&json!({"logical_router_id": "r"}))
                .is_err()
        );
        let ok = Kind::LogicalRouterPort
            .validate(
                &json!({"resource_type": "LogicalRouterLinkPortOnTIER0", "logical_router_id": "r"}),
            )
            .unwrap();
        assert_eq!(ok["resource_type"], "LogicalRouterLinkPortOnTIER0");
    }

    #[test]
    fn enums_inside_nested_objects_are_checked() {
        let e = Kind::LogicalPort
            .validate(&json!({"logical_switch_id": "ls", "admin_state": "UP",
                "attachment": {"attachment_type": "VIF", "id": "x", "context": {"resource_type": "VifAttachmentContext", "vif_type": "GRANDCHILD"}}}))
            .unwrap_err();
        assert!(e.body.error_message.contains("vif_type"));
    }
}
