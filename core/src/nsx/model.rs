//! The NSX-T Manager API (2.4/2.5, base path `/api/v1`) objects that NCP uses, as serde types.
//!
//! Field names are the API's own, letter for letter (`_revision`, `transport_zone_id`,
//! `linked_logical_router_port_id`). Every field is optional in the type: the API's required
//! fields differ between create and update and some are filled in by the server, so the types
//! describe the wire shape and the checks of "required" live where the rule is known (the
//! server, or the code that builds a body). Unknown fields are dropped on deserialization, as the
//! real manager does with properties it does not know.
//!
//! The same types are used by our client and by `fake-nsx-manager`, so the two can never
//! disagree on a field name without a test noticing.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Declares a wire type whose fields are all `Option`, omitted from the JSON when `None`.
macro_rules! nsx_struct {
    (
        $(#[$m:meta])*
        pub struct $name:ident {
            $( $(#[$fm:meta])* $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        pub struct $name {
            $(
                $(#[$fm])*
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
        }
    };
}

/// Declares a managed resource: the common [`ResourceMeta`] fields flattened in, plus its own.
macro_rules! nsx_resource {
    (
        $(#[$m:meta])*
        pub struct $name:ident {
            $( $(#[$fm:meta])* $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        pub struct $name {
            #[serde(flatten)]
            pub meta: ResourceMeta,
            $(
                $(#[$fm])*
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
        }
    };
}

/// One tag. NSX matches tags by scope and value; both default to the empty string.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Tag {
    #[serde(default)]
    pub scope: String,
    #[serde(default)]
    pub tag: String,
}

impl Tag {
    pub fn new(scope: impl Into<String>, tag: impl Into<String>) -> Self {
        Self {
            scope: scope.into(),
            tag: tag.into(),
        }
    }
}

nsx_struct! {
    /// Fields every managed resource carries. The underscore fields are set by the server.
    pub struct ResourceMeta {
        id: String,
        resource_type: String,
        display_name: String,
        description: String,
        tags: Vec<Tag>,
        #[serde(rename = "_revision")]
        revision: i64,
        #[serde(rename = "_create_user")]
        create_user: String,
        #[serde(rename = "_create_time")]
        create_time: i64,
        #[serde(rename = "_last_modified_user")]
        last_modified_user: String,
        #[serde(rename = "_last_modified_time")]
        last_modified_time: i64,
        #[serde(rename = "_system_owned")]
        system_owned: bool,
        #[serde(rename = "_protection")]
        protection: String,
    }
}

impl ResourceMeta {
    /// The value of the first tag with this scope.
    pub fn tag(&self, scope: &str) -> Option<&str> {
        self.tags
            .as_ref()?
            .iter()
            .find(|t| t.scope == scope)
            .map(|t| t.tag.as_str())
    }
}

nsx_resource! {
    /// `/edge-clusters`: the edges that host tier-0s and tier-1s with services (a load
    /// balancer needs its tier-1 on one); NCP finds the configured one by id or name.
    pub struct EdgeCluster {
        deployment_type: String,
        member_node_type: String,
        members: Vec<Value>,
        cluster_profile_bindings: Vec<Value>,
    }
}

nsx_resource! {
    /// `/transport-zones`: pre-created by the admin; NCP finds the overlay one by tag.
    pub struct TransportZone {
        transport_type: String,
        host_switch_name: String,
        host_switch_mode: String,
        is_default: bool,
        transport_zone_profile_ids: Vec<Value>,
    }
}

nsx_struct! {
    /// A static binding on a switch or port.
    pub struct PacketAddressClassifier {
        ip_address: String,
        mac_address: String,
        vlan: i64,
    }
}

nsx_resource! {
    /// `/logical-switches`.
    pub struct LogicalSwitch {
        transport_zone_id: String,
        admin_state: String,
        replication_mode: String,
        ip_pool_id: String,
        mac_pool_id: String,
        vni: i64,
        vlan: i64,
        switching_profile_ids: Vec<Value>,
        address_bindings: Vec<PacketAddressClassifier>,
        extra_configs: Vec<Value>,
    }
}

nsx_struct! {
    /// `VifAttachmentContext`: how a VIF attachment relates to its parent and what NSX allocates.
    pub struct AttachmentContext {
        resource_type: String,
        vif_type: String,
        parent_vif_id: String,
        traffic_tag: i64,
        app_id: String,
        allocate_addresses: String,
        transport_node_uuid: String,
    }
}

nsx_struct! {
    /// A logical port's attachment (`attachment_type: VIF` for VMs and containers).
    pub struct LogicalPortAttachment {
        attachment_type: String,
        id: String,
        context: AttachmentContext,
    }
}

nsx_resource! {
    /// `/logical-ports`. A container's port is a CHILD VIF of its node VM's PARENT VIF.
    pub struct LogicalPort {
        logical_switch_id: String,
        admin_state: String,
        attachment: LogicalPortAttachment,
        address_bindings: Vec<PacketAddressClassifier>,
        switching_profile_ids: Vec<Value>,
        init_state: String,
        extra_configs: Vec<Value>,
    }
}

nsx_struct! {
    /// A binding the manager realized for a port (`/logical-ports/{id}/state`).
    pub struct RealizedBinding {
        binding: PacketAddressClassifier,
        binding_type: String,
    }
}

nsx_struct! {
    /// `GET /logical-ports/{id}/state`: what the manager realized, including the addresses it
    /// allocated for `allocate_addresses`.
    pub struct LogicalPortState {
        logical_port_id: String,
        state: String,
        realized_bindings: Vec<RealizedBinding>,
        discovered_bindings: Vec<Value>,
        duplicate_bindings: Vec<Value>,
    }
}

nsx_resource! {
    /// `/logical-routers`, tier-0 or tier-1.
    pub struct LogicalRouter {
        router_type: String,
        edge_cluster_id: String,
        high_availability_mode: String,
        failover_mode: String,
        advanced_config: Value,
        firewall_sections: Vec<Value>,
    }
}

nsx_resource! {
    /// `/logical-routers/{id}/routing/advertisement`.
    pub struct AdvertisementConfig {
        logical_router_id: String,
        enabled: bool,
        advertise_nsx_connected_routes: bool,
        advertise_static_routes: bool,
        advertise_nat_routes: bool,
        advertise_lb_vip: bool,
        advertise_lb_snat_ip: bool,
        advertise_dns_forwarder: bool,
    }
}

nsx_struct! {
    /// A reference to another object (`linked_logical_switch_port_id`, LB attachments).
    pub struct ResourceReference {
        target_id: String,
        target_type: String,
        target_display_name: String,
        is_valid: bool,
    }
}

nsx_struct! {
    /// A router port's subnet.
    pub struct IpSubnet {
        ip_addresses: Vec<String>,
        prefix_length: i64,
    }
}

nsx_resource! {
    /// `/logical-router-ports`: `resource_type` is LogicalRouterLinkPortOnTIER0,
    /// LogicalRouterLinkPortOnTIER1 or LogicalRouterDownLinkPort.
    ///
    /// `linked_logical_router_port_id` is a plain string on a TIER0 link port (read-only, filled
    /// in when a TIER1 port links to it) and a [`ResourceReference`] on a TIER1 port, so it is
    /// kept as raw JSON here.
    pub struct LogicalRouterPort {
        logical_router_id: String,
        linked_logical_router_port_id: Value,
        linked_logical_switch_port_id: ResourceReference,
        subnets: Vec<IpSubnet>,
        mac_address: String,
        urpf_mode: String,
        service_bindings: Vec<Value>,
        edge_cluster_member_index: Vec<i64>,
    }
}

nsx_resource! {
    /// `/pools/ip-blocks`: a CIDR carved into subnets.
    pub struct IpBlock {
        cidr: String,
    }
}

nsx_struct! {
    /// An inclusive range of addresses.
    pub struct IpPoolRange {
        start: String,
        end: String,
    }
}

nsx_resource! {
    /// `/pools/ip-subnets`: created with `block_id` and `size`; the server carves `cidr`.
    pub struct IpBlockSubnet {
        block_id: String,
        size: i64,
        cidr: String,
        allocation_ranges: Vec<IpPoolRange>,
        start_ip: String,
    }
}

nsx_struct! {
    /// One of an IP pool's subnets.
    pub struct IpPoolSubnet {
        cidr: String,
        allocation_ranges: Vec<IpPoolRange>,
        gateway_ip: String,
        dns_nameservers: Vec<String>,
        dns_suffix: String,
    }
}

nsx_struct! {
    /// `pool_usage`, read-only.
    pub struct PoolUsage {
        total_ids: i64,
        allocated_ids: i64,
        free_ids: i64,
    }
}

nsx_resource! {
    /// `/pools/ip-pools`.
    pub struct IpPool {
        subnets: Vec<IpPoolSubnet>,
        pool_usage: PoolUsage,
    }
}

nsx_resource! {
    /// The body and answer of `POST /pools/ip-pools/{id}?action=ALLOCATE|RELEASE` and of the
    /// block-subnet equivalent. On ALLOCATE the request's `allocation_id` is absent or null
    /// (any address) or the address wanted; a managed resource, so it carries a display name
    /// and tags (nsxlib's `IpPool.allocate(display_name, tags)`).
    pub struct AllocationIpAddress {
        allocation_id: String,
    }
}

nsx_resource! {
    /// `/logical-routers/{id}/nat/rules`.
    pub struct NatRule {
        logical_router_id: String,
        action: String,
        match_source_network: String,
        match_destination_network: String,
        translated_network: String,
        translated_ports: String,
        rule_priority: i64,
        enabled: bool,
        logging: bool,
        nat_pass: bool,
    }
}

nsx_struct! {
    /// NSGroupSimpleExpression / NSGroupTagExpression / NSGroupComplexExpression in one shape,
    /// told apart by `resource_type` (the API's own discriminator).
    pub struct NsGroupExpression {
        resource_type: String,
        target_type: String,
        target_property: String,
        op: String,
        value: String,
        scope: String,
        scope_op: String,
        tag: String,
        tag_op: String,
        expressions: Vec<NsGroupExpression>,
    }
}

nsx_resource! {
    /// `/ns-groups`.
    pub struct NsGroup {
        members: Vec<NsGroupExpression>,
        membership_criteria: Vec<NsGroupExpression>,
        member_count: i64,
    }
}

nsx_resource! {
    /// `/ip-sets`.
    pub struct IpSet {
        ip_addresses: Vec<String>,
    }
}

nsx_struct! {
    /// `nsservice_element` / inline rule service: L4PortSetNSService and friends.
    pub struct NsServiceElement {
        resource_type: String,
        l4_protocol: String,
        destination_ports: Vec<String>,
        source_ports: Vec<String>,
        protocol_number: i64,
        icmp_type: i64,
        icmp_code: i64,
        protocol: String,
    }
}

nsx_resource! {
    /// `/ns-services`.
    pub struct NsService {
        nsservice_element: NsServiceElement,
        default_service: bool,
    }
}

nsx_struct! {
    /// A rule's reference to a service: either an NSService by id or an inline element.
    pub struct FirewallService {
        target_id: String,
        target_type: String,
        target_display_name: String,
        is_valid: bool,
        service: NsServiceElement,
    }
}

nsx_resource! {
    /// `/firewall/sections/{id}/rules/{rid}`. Rule ids are numbers as strings.
    pub struct FirewallRule {
        action: String,
        direction: String,
        ip_protocol: String,
        sources: Vec<ResourceReference>,
        destinations: Vec<ResourceReference>,
        applied_tos: Vec<ResourceReference>,
        sources_excluded: bool,
        destinations_excluded: bool,
        services: Vec<FirewallService>,
        disabled: bool,
        logged: bool,
        notes: String,
        rule_tag: String,
        section_id: String,
        is_default: bool,
    }
}

nsx_resource! {
    /// `/firewall/sections`. `rules` appears only in the `*_with_rules` calls.
    pub struct FirewallSection {
        section_type: String,
        stateful: bool,
        applied_tos: Vec<ResourceReference>,
        rule_count: i64,
        is_default: bool,
        enforced_on: String,
        rules: Vec<FirewallRule>,
    }
}

nsx_resource! {
    /// `/loadbalancer/services`.
    pub struct LbService {
        attachment: ResourceReference,
        virtual_server_ids: Vec<String>,
        size: String,
        enabled: bool,
        error_log_level: String,
        access_log_enabled: bool,
    }
}

nsx_resource! {
    /// `/loadbalancer/virtual-servers`.
    pub struct LbVirtualServer {
        ip_address: String,
        port: String,
        ports: Vec<String>,
        ip_protocol: String,
        pool_id: String,
        application_profile_id: String,
        persistence_profile_id: String,
        enabled: bool,
        max_concurrent_connections: i64,
        default_pool_member_port: String,
        default_pool_member_ports: Vec<String>,
    }
}

nsx_struct! {
    /// An LB pool member.
    pub struct PoolMember {
        ip_address: String,
        port: String,
        weight: i64,
        admin_state: String,
        display_name: String,
        backup_member: bool,
        max_concurrent_connections: i64,
    }
}

nsx_resource! {
    /// `/loadbalancer/pools`.
    pub struct LbPool {
        members: Vec<PoolMember>,
        algorithm: String,
        snat_translation: Value,
        min_active_members: i64,
        active_monitor_ids: Vec<String>,
        passive_monitor_id: String,
        tcp_multiplexing_enabled: bool,
    }
}

nsx_resource! {
    /// `/loadbalancer/application-profiles` (LbFastTcpProfile, LbFastUdpProfile, LbHttpProfile).
    pub struct LbAppProfile {
        idle_timeout: i64,
        close_timeout: i64,
        ha_flow_mirroring_enabled: bool,
        http_redirect_to_https: bool,
        ntlm: bool,
        x_forwarded_for: String,
    }
}

nsx_resource! {
    /// `/loadbalancer/persistence-profiles` (LbSourceIpPersistenceProfile, LbCookiePersistenceProfile).
    pub struct LbPersistenceProfile {
        persistence_shared: bool,
        timeout: i64,
        purge: String,
        cookie_name: String,
        cookie_mode: String,
    }
}

nsx_struct! {
    /// `{results, result_count, cursor, sort_by, sort_ascending}`: every list and search answer.
    /// `cursor` is absent on the last page.
    pub struct ListResult {
        results: Vec<Value>,
        result_count: i64,
        cursor: String,
        sort_by: String,
        sort_ascending: bool,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn revision_and_server_fields_use_underscore_names() {
        let mut ls = LogicalSwitch::default();
        ls.meta.revision = Some(3);
        ls.meta.create_user = Some("admin".into());
        ls.transport_zone_id = Some("tz".into());
        let v = serde_json::to_value(&ls).unwrap();
        assert_eq!(
            v,
            json!({"_revision": 3, "_create_user": "admin", "transport_zone_id": "tz"})
        );
    }

    #[test]
    fn unknown_fields_are_dropped_and_wrong_types_rejected() {
        let p: LogicalPort =
            serde_json::from_value(json!({"logical_switch_id": "ls", "bogus": 1})).unwrap();
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"logical_switch_id": "ls"})
        );
        let err = serde_json::from_value::<LogicalPort>(json!({"logical_switch_id": 5}));
        assert!(err.is_err());
        let err = serde_json::from_value::<LogicalPort>(json!({"_revision": "x"}));
        assert!(err.is_err());
    }

    #[test]
    fn nested_container_attachment_round_trips() {
        let body = json!({
            "resource_type": "LogicalPort",
            "logical_switch_id": "ls-1",
            "admin_state": "UP",
            "attachment": {"attachment_type": "VIF", "id": "c1",
                "context": {"resource_type": "VifAttachmentContext", "vif_type": "CHILD",
                    "parent_vif_id": "vif-9", "traffic_tag": 101, "app_id": "ns/pod",
                    "allocate_addresses": "Both"}},
            "tags": [{"scope": "ncp/cluster", "tag": "k8s-a"}]
        });
        let p: LogicalPort = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(p.meta.tag("ncp/cluster"), Some("k8s-a"));
        assert_eq!(serde_json::to_value(&p).unwrap(), body);
    }
}
