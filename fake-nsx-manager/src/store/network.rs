//! Switches, ports, routers, router ports, route advertisement and NAT rules.
//!
//! Linking as NSX does it: a TIER1 link port names the TIER0 link port it connects to, and
//! the manager fills that TIER0 port's read-only `linked_logical_router_port_id`; a downlink
//! port names a logical switch port, and the manager sets that port's attachment to
//! `{attachment_type: LOGICALROUTER, id: <router port>}`. Deleting undoes the links, and a
//! TIER0 port that is still linked cannot go without `force=true`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{Ctx, DeleteFlags, Obj, Store};
use crate::error::{self, ApiError, ApiResult};
use crate::ipam::{self, Cidr, Range};
use crate::kind::Kind;

/// What a logical port was given for `allocate_addresses`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortAlloc {
    pub pool_id: Option<String>,
    pub ip: Option<u32>,
    pub mac: Option<String>,
}

/// The key of a port's client-set attachment in the VIF index (`type:id`); router attachments
/// are set by the manager and not indexed.
pub(super) fn vif_key(o: &Obj) -> Option<String> {
    if o.kind != Kind::LogicalPort {
        return None;
    }
    let a = o.doc.get("attachment")?;
    let t = a
        .get("attachment_type")
        .and_then(Value::as_str)
        .unwrap_or("VIF");
    let id = a.get("id").and_then(Value::as_str)?;
    (t != "LOGICALROUTER").then(|| format!("{t}:{id}"))
}

fn str_at<'a>(doc: &'a Map<String, Value>, path: &[&str]) -> Option<&'a str> {
    let mut v = doc.get(path[0])?;
    for k in &path[1..] {
        v = v.get(*k)?;
    }
    v.as_str()
}

/// 100.64.0.0: where the tier-0/tier-1 transit subnets come from.
const TRANSIT_BASE: u32 = 0x6440_0000;

impl Store {
    pub(super) fn switch_create(&mut self, doc: &mut Map<String, Value>) -> ApiResult<()> {
        let tz_id = str_at(doc, &["transport_zone_id"])
            .unwrap_or_default()
            .to_string();
        let tz = self.expect_ref("transport_zone_id", &tz_id, &[Kind::TransportZone])?;
        let overlay = tz.str("transport_type") == Some("OVERLAY");
        if let Some(pool) = str_at(doc, &["ip_pool_id"]) {
            self.expect_ref("ip_pool_id", pool, &[Kind::IpPool])?;
        }
        if !overlay && doc.get("vlan").is_none() {
            return Err(ApiError::validation(
                "vlan is required on a VLAN transport zone",
            ));
        }
        if overlay {
            doc.entry("replication_mode").or_insert(json!("MTEP"));
            doc.insert("vni".into(), json!(self.next_vni));
            self.next_vni += 1;
        }
        Ok(())
    }

    pub(super) fn switch_update(
        &mut self,
        _current: &Obj,
        doc: &mut Map<String, Value>,
    ) -> ApiResult<()> {
        if let Some(pool) = str_at(doc, &["ip_pool_id"]) {
            self.expect_ref("ip_pool_id", pool, &[Kind::IpPool])?;
        }
        Ok(())
    }

    fn ports_of_switch(&self, switch_id: &str) -> Vec<String> {
        self.ids_of(Kind::LogicalPort)
            .filter(|p| self.objects[*p].str("logical_switch_id") == Some(switch_id))
            .cloned()
            .collect()
    }

    pub(super) fn switch_delete(
        &mut self,
        _ctx: &Ctx,
        id: &str,
        flags: DeleteFlags,
    ) -> ApiResult<()> {
        let ports = self.ports_of_switch(id);
        if !ports.is_empty() && !flags.cascade {
            return Err(ApiError::in_use(
                "switching",
                format!(
                    "Logical switch {id} has {} logical port(s). Delete them first or use cascade=true.",
                    ports.len()
                ),
            ));
        }
        for p in &ports {
            let port = &self.objects[p];
            match str_at(&port.doc, &["attachment", "attachment_type"]) {
                Some("LOGICALROUTER") => {
                    return Err(ApiError::in_use(
                        "switching",
                        format!(
                            "Logical port {p} of switch {id} is attached to a router port; delete the router port first."
                        ),
                    ));
                }
                Some(_) if !flags.detach => {
                    return Err(ApiError::bad_request(
                        error::PORT_ATTACHED,
                        "switching",
                        format!(
                            "Logical port {p} of switch {id} has an attachment. Use detach=true to force the delete."
                        ),
                    ));
                }
                _ => {}
            }
        }
        for p in ports {
            self.release_port(&p);
            self.remove(&p);
        }
        self.remove(id);
        Ok(())
    }

    /// Checks a port's attachment; returns whether it is attached.
    fn check_attachment(
        &self,
        port_id: &str,
        doc: &Map<String, Value>,
        current: Option<&Obj>,
    ) -> ApiResult<()> {
        let Some(att) = doc.get("attachment").filter(|a| !a.is_null()) else {
            return Ok(());
        };
        let att_type = att
            .get("attachment_type")
            .and_then(Value::as_str)
            .unwrap_or("VIF");
        let att_id = att.get("id").and_then(Value::as_str).unwrap_or("");
        if att_id.is_empty() {
            return Err(ApiError::validation("attachment.id is required"));
        }
        if att_type == "LOGICALROUTER" {
            let same = current.and_then(|c| c.doc.get("attachment")) == Some(att);
            return if same {
                Ok(())
            } else {
                Err(ApiError::validation(
                    "attachment_type LOGICALROUTER is set by linking a router port, not by the client",
                ))
            };
        }
        if let Some(ctx) = att.get("context")
            && ctx.get("vif_type").and_then(Value::as_str) == Some("CHILD")
        {
            if ctx
                .get("parent_vif_id")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(ApiError::validation(
                    "attachment.context.parent_vif_id is required for a CHILD VIF",
                ));
            }
            match ctx.get("traffic_tag").and_then(Value::as_i64) {
                Some(t) if (0..=4094).contains(&t) => {}
                Some(t) => {
                    return Err(ApiError::validation(format!(
                        "attachment.context.traffic_tag {t} is out of range 0-4094"
                    )));
                }
                None => {
                    return Err(ApiError::validation(
                        "attachment.context.traffic_tag is required for a CHILD VIF",
                    ));
                }
            }
        }
        // A VIF id belongs to one port.
        if let Some(other) = self.vif_index.get(&format!("{att_type}:{att_id}"))
            && other != port_id
        {
            return Err(ApiError::validation(format!(
                "attachment {att_type} {att_id} is already attached to logical port {other}"
            )));
        }
        Ok(())
    }

    fn wanted_allocation(doc: &Map<String, Value>) -> (bool, bool) {
        match str_at(doc, &["attachment", "context", "allocate_addresses"]) {
            Some("Both") => (true, true),
            Some("IpPool") => (true, false),
            Some("MacPool") => (false, true),
            _ => (false, false),
        }
    }

    /// Plans the allocation a port needs beyond what it has; fails without changing anything.
    fn plan_port_allocation(
        &self,
        doc: &Map<String, Value>,
        have: Option<&PortAlloc>,
    ) -> ApiResult<(Option<(String, u32)>, bool)> {
        let (want_ip, want_mac) = Self::wanted_allocation(doc);
        let mut ip = None;
        if want_ip && have.and_then(|h| h.ip).is_none() {
            let switch_id = str_at(doc, &["logical_switch_id"]).unwrap_or("");
            let pool_id = self
                .objects
                .get(switch_id)
                .and_then(|s| s.str("ip_pool_id"))
                .ok_or_else(|| {
                    ApiError::validation(format!(
                        "allocate_addresses needs an IP pool on logical switch {switch_id}"
                    ))
                })?
                .to_string();
            let addr = self.pool_first_free(&pool_id).ok_or_else(|| {
                ApiError::bad_request(
                    error::POOL_EXHAUSTED,
                    "id-allocation-service",
                    format!("IP pool {pool_id} is exhausted."),
                )
            })?;
            ip = Some((pool_id, addr));
        }
        let mac = want_mac && have.and_then(|h| h.mac.as_ref()).is_none();
        Ok((ip, mac))
    }

    fn apply_port_allocation(&mut self, port_id: &str, plan: (Option<(String, u32)>, bool)) {
        let (ip, mac) = plan;
        if ip.is_none() && !mac {
            return;
        }
        let entry = self
            .port_alloc
            .entry(port_id.to_string())
            .or_insert(PortAlloc {
                pool_id: None,
                ip: None,
                mac: None,
            });
        if let Some((pool, addr)) = ip {
            self.ip_alloc
                .entry(pool.clone())
                .or_default()
                .insert(addr, port_id.to_string());
            entry.pool_id = Some(pool.clone());
            entry.ip = Some(addr);
            self.ip_hint.insert(pool.clone(), addr.saturating_add(1));
            self.dirty.insert(pool);
            self.topology.clear();
        }
        if mac {
            let n = self.next_mac;
            self.next_mac += 1;
            entry.mac = Some(format!(
                "02:50:56:{:02x}:{:02x}:{:02x}",
                (n >> 16) & 0xff,
                (n >> 8) & 0xff,
                n & 0xff
            ));
        }
    }

    pub(super) fn release_port(&mut self, port_id: &str) {
        if let Some(a) = self.port_alloc.remove(port_id)
            && let (Some(pool), Some(ip)) = (a.pool_id, a.ip)
        {
            if let Some(m) = self.ip_alloc.get_mut(&pool) {
                m.remove(&ip);
            }
            self.lower_hint(&pool, ip);
            self.touch(pool);
        }
    }

    pub(super) fn port_create(&mut self, id: &str, doc: &mut Map<String, Value>) -> ApiResult<()> {
        let ls = str_at(doc, &["logical_switch_id"])
            .unwrap_or_default()
            .to_string();
        self.expect_ref("logical_switch_id", &ls, &[Kind::LogicalSwitch])?;
        self.check_attachment(id, doc, None)?;
        let plan = self.plan_port_allocation(doc, None)?;
        self.apply_port_allocation(id, plan);
        Ok(())
    }

    pub(super) fn port_update(
        &mut self,
        id: &str,
        current: &Obj,
        doc: &mut Map<String, Value>,
    ) -> ApiResult<()> {
        self.check_attachment(id, doc, Some(current))?;
        let attached = doc.get("attachment").is_some_and(|a| !a.is_null());
        let (want_ip, want_mac) = Self::wanted_allocation(doc);
        let have = self.port_alloc.get(id).cloned();
        let plan = self.plan_port_allocation(doc, have.as_ref())?;
        // Addresses go back when the VIF goes away or stops asking for them.
        if let Some(h) = have
            && (!attached || !want_ip || !want_mac)
        {
            let mut keep = h.clone();
            if (!attached || !want_ip) && h.ip.is_some() {
                if let (Some(pool), Some(ip)) = (&h.pool_id, h.ip) {
                    if let Some(m) = self.ip_alloc.get_mut(pool) {
                        m.remove(&ip);
                    }
                    self.lower_hint(pool, ip);
                    self.touch(pool.clone());
                }
                keep.ip = None;
                keep.pool_id = None;
            }
            if !attached || !want_mac {
                keep.mac = None;
            }
            if keep.ip.is_none() && keep.mac.is_none() {
                self.port_alloc.remove(id);
            } else {
                self.port_alloc.insert(id.to_string(), keep);
            }
        }
        self.apply_port_allocation(id, plan);
        Ok(())
    }

    pub(super) fn port_delete(
        &mut self,
        id: &str,
        current: &Obj,
        flags: DeleteFlags,
    ) -> ApiResult<()> {
        match str_at(&current.doc, &["attachment", "attachment_type"]) {
            Some("LOGICALROUTER") => {
                return Err(ApiError::in_use(
                    "switching",
                    format!(
                        "Logical port {id} is attached to a logical router port; delete the router port first."
                    ),
                ));
            }
            Some(_) if !flags.detach => {
                return Err(ApiError::bad_request(
                    error::PORT_ATTACHED,
                    "switching",
                    format!(
                        "Logical port {id} has an attachment. Detach it first or use detach=true."
                    ),
                ));
            }
            _ => {}
        }
        self.release_port(id);
        self.remove(id);
        Ok(())
    }

    /// `GET /logical-ports/{id}/state`.
    pub fn port_state(&self, id: &str) -> ApiResult<Value> {
        let port = self.expect(Kind::LogicalPort, id)?;
        let mut bindings = Vec::new();
        if let Some(a) = self.port_alloc.get(id) {
            let mut b = Map::new();
            if let Some(ip) = a.ip {
                b.insert("ip_address".into(), json!(ipam::ip_to_string(ip)));
            }
            if let Some(mac) = &a.mac {
                b.insert("mac_address".into(), json!(mac));
            }
            if let Some(tag) = port
                .doc
                .get("attachment")
                .and_then(|a| a.get("context"))
                .and_then(|c| c.get("traffic_tag"))
            {
                b.insert("vlan".into(), tag.clone());
            }
            bindings.push(json!({"binding": b, "binding_type": "ADDRESS_POOL"}));
        }
        let state = if port.str("admin_state") == Some("UP") {
            "UP"
        } else {
            "DOWN"
        };
        Ok(json!({
            "logical_port_id": id,
            "state": state,
            "realized_bindings": bindings,
            "discovered_bindings": [],
            "duplicate_bindings": [],
        }))
    }

    pub(super) fn transport_zone_delete(&mut self, id: &str) -> ApiResult<()> {
        let users = self
            .ids_of(Kind::LogicalSwitch)
            .filter(|s| self.objects[*s].str("transport_zone_id") == Some(id))
            .count();
        if users > 0 {
            return Err(ApiError::in_use(
                "switching",
                format!("Transport zone {id} is used by {users} logical switch(es)."),
            ));
        }
        self.remove(id);
        Ok(())
    }

    // ----- routers -----------------------------------------------------------------------

    pub(super) fn router_update_check(
        &mut self,
        id: &str,
        _current: &Obj,
        doc: &mut Map<String, Value>,
    ) -> ApiResult<()> {
        self.router_edge_check(doc)?;
        // A tier-1 with a load balancer keeps an edge cluster.
        if doc.get("edge_cluster_id").is_none_or(Value::is_null)
            && let Some(lb) = self
                .ids_of(Kind::LbService)
                .find(|l| str_at(&self.objects[*l].doc, &["attachment", "target_id"]) == Some(id))
        {
            return Err(ApiError::validation(format!(
                "logical router {id} has load balancer service {lb}: it needs an edge cluster"
            )));
        }
        Ok(())
    }

    /// A router's `edge_cluster_id`, when given, names an edge cluster that exists.
    pub(super) fn router_edge_check(&self, doc: &Map<String, Value>) -> ApiResult<()> {
        if let Some(e) = doc.get("edge_cluster_id").and_then(Value::as_str) {
            self.expect_ref("edge_cluster_id", e, &[Kind::EdgeCluster])?;
        }
        Ok(())
    }

    pub(super) fn edge_cluster_delete(&mut self, id: &str) -> ApiResult<()> {
        let users = self
            .ids_of(Kind::LogicalRouter)
            .filter(|r| self.objects[*r].str("edge_cluster_id") == Some(id))
            .count();
        if users > 0 {
            return Err(ApiError::in_use(
                "edge-cluster",
                format!("Edge cluster {id} is used by {users} logical router(s)."),
            ));
        }
        self.remove(id);
        Ok(())
    }

    fn ports_of_router(&self, router_id: &str) -> Vec<String> {
        self.ids_of(Kind::LogicalRouterPort)
            .filter(|p| self.objects[*p].str("logical_router_id") == Some(router_id))
            .cloned()
            .collect()
    }

    pub(super) fn router_delete(&mut self, id: &str, flags: DeleteFlags) -> ApiResult<()> {
        let lbs: Vec<String> = self
            .ids_of(Kind::LbService)
            .filter(|l| str_at(&self.objects[*l].doc, &["attachment", "target_id"]) == Some(id))
            .cloned()
            .collect();
        if let Some(lb) = lbs.first() {
            return Err(ApiError::in_use(
                "routing",
                format!("Logical router {id} is used by load balancer service {lb}."),
            ));
        }
        let ports = self.ports_of_router(id);
        if !ports.is_empty() && !flags.force {
            return Err(ApiError::in_use(
                "routing",
                format!(
                    "Logical router {id} has {} router port(s). Delete them first or use force=true.",
                    ports.len()
                ),
            ));
        }
        for p in ports {
            let current = self.objects[&p].clone();
            self.unlink_router_port(&p, &current);
            self.remove(&p);
        }
        for rule in self.children.get(id).cloned().unwrap_or_default() {
            self.remove(&rule);
        }
        self.advertisement.remove(id);
        self.remove(id);
        Ok(())
    }

    pub(super) fn router_port_create(
        &mut self,
        id: &str,
        doc: &mut Map<String, Value>,
    ) -> ApiResult<()> {
        let rt = str_at(doc, &["resource_type"])
            .unwrap_or_default()
            .to_string();
        let router_id = str_at(doc, &["logical_router_id"])
            .unwrap_or_default()
            .to_string();
        let router = self.expect_ref("logical_router_id", &router_id, &[Kind::LogicalRouter])?;
        let router_type = router.str("router_type").unwrap_or("").to_string();
        match (rt.as_str(), router_type.as_str()) {
            ("LogicalRouterLinkPortOnTIER0", "TIER0")
            | ("LogicalRouterLinkPortOnTIER1", "TIER1")
            | ("LogicalRouterDownLinkPort", _) => {}
            _ => {
                return Err(ApiError::validation(format!(
                    "a {rt} can not be created on a {router_type} router"
                )));
            }
        }
        match rt.as_str() {
            "LogicalRouterLinkPortOnTIER0" => {
                // Read-only: filled in when a TIER1 port links here.
                doc.remove("linked_logical_router_port_id");
                doc.remove("subnets");
            }
            "LogicalRouterLinkPortOnTIER1" => {
                let target = self.check_tier1_link(&router_id, doc, None)?;
                doc.insert(
                    "linked_logical_router_port_id".into(),
                    json!({"target_id": target, "target_type": "LogicalRouterLinkPortOnTIER0", "is_valid": true}),
                );
                // The link's transit subnet, as NSX assigns it: a /31 of 100.64.0.0/16, the
                // tier-0's side even, the tier-1's odd.
                let pair = self.free_transit_pair();
                let subnet = |ip: u32| json!([{"ip_addresses": [ipam::ip_to_string(ip)], "prefix_length": 31}]);
                doc.insert("subnets".into(), subnet(pair + 1));
                if let Some(t0) = self.objects.get_mut(&target) {
                    t0.doc
                        .insert("linked_logical_router_port_id".into(), json!(id));
                    t0.doc.insert("subnets".into(), subnet(pair));
                }
                self.touch(target);
            }
            _ => {
                self.check_subnets(&router_id, id, doc)?;
                let port_id = str_at(doc, &["linked_logical_switch_port_id", "target_id"])
                    .unwrap_or_default()
                    .to_string();
                let port = self.expect_ref(
                    "linked_logical_switch_port_id",
                    &port_id,
                    &[Kind::LogicalPort],
                )?;
                if port.doc.get("attachment").is_some_and(|a| !a.is_null()) {
                    return Err(ApiError::validation(format!(
                        "logical port {port_id} already has an attachment"
                    )));
                }
                doc.insert(
                    "linked_logical_switch_port_id".into(),
                    json!({"target_id": port_id, "target_type": "LogicalPort", "is_valid": true}),
                );
                let n = self.next_mac;
                self.next_mac += 1;
                doc.insert(
                    "mac_address".into(),
                    json!(format!(
                        "02:50:56:56:{:02x}:{:02x}",
                        (n >> 8) & 0xff,
                        n & 0xff
                    )),
                );
                if let Some(p) = self.objects.get_mut(&port_id) {
                    p.doc.insert(
                        "attachment".into(),
                        json!({"attachment_type": "LOGICALROUTER", "id": id}),
                    );
                }
                self.touch(port_id);
            }
        }
        Ok(())
    }

    /// A TIER1 link port's target: an unlinked TIER0 link port, and one per TIER1 router.
    fn check_tier1_link(
        &self,
        router_id: &str,
        doc: &Map<String, Value>,
        own: Option<&str>,
    ) -> ApiResult<String> {
        let target = str_at(doc, &["linked_logical_router_port_id", "target_id"])
            .ok_or_else(|| {
                ApiError::validation("linked_logical_router_port_id.target_id is required")
            })?
            .to_string();
        let t0 = self.expect_ref(
            "linked_logical_router_port_id",
            &target,
            &[Kind::LogicalRouterPort],
        )?;
        if t0.resource_type() != "LogicalRouterLinkPortOnTIER0" {
            return Err(ApiError::validation(format!(
                "{target} is not a LogicalRouterLinkPortOnTIER0"
            )));
        }
        if let Some(linked) = t0
            .str("linked_logical_router_port_id")
            .filter(|s| !s.is_empty())
            && Some(linked) != own
        {
            return Err(ApiError::validation(format!(
                "TIER0 link port {target} is already linked to {linked}"
            )));
        }
        if own.is_none() {
            let existing = self
                .ports_of_router(router_id)
                .into_iter()
                .find(|p| self.objects[p].resource_type() == "LogicalRouterLinkPortOnTIER1");
            if let Some(p) = existing {
                return Err(ApiError::validation(format!(
                    "TIER1 router {router_id} is already linked to a TIER0 router through {p}"
                )));
            }
        }
        Ok(target)
    }

    fn check_subnets(&self, router_id: &str, own: &str, doc: &Map<String, Value>) -> ApiResult<()> {
        let subnets = doc
            .get("subnets")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut mine = Vec::new();
        for s in &subnets {
            let prefix = s.get("prefix_length").and_then(Value::as_i64).unwrap_or(-1);
            if !(1..=32).contains(&prefix) {
                return Err(ApiError::validation(format!(
                    "subnets.prefix_length {prefix} is out of range 1-32"
                )));
            }
            let ips = s
                .get("ip_addresses")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if ips.is_empty() {
                return Err(ApiError::validation(
                    "subnets.ip_addresses must not be empty",
                ));
            }
            for ip in ips {
                let text = ip.as_str().unwrap_or("");
                let addr = ipam::parse_ip(text).map_err(ApiError::validation)?;
                mine.push(Cidr {
                    network: addr & ipam::mask(prefix as u8),
                    prefix: prefix as u8,
                });
            }
        }
        for other in self.ports_of_router(router_id) {
            if other == own {
                continue;
            }
            let o = &self.objects[&other];
            for s in o
                .doc
                .get("subnets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let prefix = s.get("prefix_length").and_then(Value::as_i64).unwrap_or(32) as u8;
                for ip in s
                    .get("ip_addresses")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(addr) = ip.as_str().and_then(|t| ipam::parse_ip(t).ok()) {
                        let theirs = Cidr {
                            network: addr & ipam::mask(prefix),
                            prefix,
                        };
                        if mine.iter().any(|m| m.overlaps(&theirs)) {
                            return Err(ApiError::validation(format!(
                                "subnet {theirs} overlaps a subnet of router port {other} on the same router"
                            )));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The lowest /31 of the transit range no tier-0 link port holds.
    fn free_transit_pair(&self) -> u32 {
        let used: std::collections::BTreeSet<u32> = self
            .ids_of(Kind::LogicalRouterPort)
            .filter(|p| self.objects[*p].resource_type() == "LogicalRouterLinkPortOnTIER0")
            .filter_map(|p| {
                let s = self.objects[p].doc.get("subnets")?;
                ipam::parse_ip(s[0]["ip_addresses"][0].as_str()?).ok()
            })
            .collect();
        (0..32768u32)
            .map(|k| TRANSIT_BASE + 2 * k)
            .find(|ip| !used.contains(ip))
            .unwrap_or(TRANSIT_BASE)
    }

    pub(super) fn router_port_update(
        &mut self,
        current: &Obj,
        doc: &mut Map<String, Value>,
    ) -> ApiResult<()> {
        // A link port's transit subnet is the manager's: kept whatever a PUT says.
        if current.resource_type() != "LogicalRouterDownLinkPort" {
            match current.doc.get("subnets") {
                Some(v) => doc.insert("subnets".into(), v.clone()),
                None => doc.remove("subnets"),
            };
        }
        let id = current.str("id").unwrap_or_default().to_string();
        let router_id = current
            .str("logical_router_id")
            .unwrap_or_default()
            .to_string();
        match current.resource_type() {
            "LogicalRouterLinkPortOnTIER0" => {
                match current.doc.get("linked_logical_router_port_id") {
                    Some(v) => doc.insert("linked_logical_router_port_id".into(), v.clone()),
                    None => doc.remove("linked_logical_router_port_id"),
                };
            }
            "LogicalRouterLinkPortOnTIER1" => {
                let was = str_at(
                    &current.doc,
                    &["linked_logical_router_port_id", "target_id"],
                );
                let now = str_at(doc, &["linked_logical_router_port_id", "target_id"]);
                if was != now {
                    return Err(ApiError::validation(
                        "linked_logical_router_port_id can not be modified",
                    ));
                }
                if let Some(v) = current.doc.get("linked_logical_router_port_id") {
                    doc.insert("linked_logical_router_port_id".into(), v.clone());
                }
            }
            _ => {
                let was = str_at(
                    &current.doc,
                    &["linked_logical_switch_port_id", "target_id"],
                );
                let now = str_at(doc, &["linked_logical_switch_port_id", "target_id"]);
                if was != now {
                    return Err(ApiError::validation(
                        "linked_logical_switch_port_id can not be modified",
                    ));
                }
                self.check_subnets(&router_id, &id, doc)?;
                if let Some(v) = current.doc.get("linked_logical_switch_port_id") {
                    doc.insert("linked_logical_switch_port_id".into(), v.clone());
                }
            }
        }
        Ok(())
    }

    pub(super) fn router_port_delete(
        &mut self,
        id: &str,
        current: &Obj,
        flags: DeleteFlags,
    ) -> ApiResult<()> {
        if current.resource_type() == "LogicalRouterLinkPortOnTIER0"
            && current
                .str("linked_logical_router_port_id")
                .is_some_and(|s| !s.is_empty())
            && !flags.force
        {
            return Err(ApiError::in_use(
                "routing",
                format!(
                    "TIER0 link port {id} is linked to TIER1 port {}. Delete that port first or use force=true.",
                    current.str("linked_logical_router_port_id").unwrap_or("")
                ),
            ));
        }
        self.unlink_router_port(id, current);
        self.remove(id);
        Ok(())
    }

    /// Undoes what creating the port linked (cannot fail).
    fn unlink_router_port(&mut self, id: &str, current: &Obj) {
        match current.resource_type() {
            "LogicalRouterLinkPortOnTIER0" => {
                if let Some(t1) = current
                    .str("linked_logical_router_port_id")
                    .map(str::to_string)
                {
                    if let Some(p) = self.objects.get_mut(&t1)
                        && let Some(Value::Object(r)) =
                            p.doc.get_mut("linked_logical_router_port_id")
                    {
                        r.insert("is_valid".into(), json!(false));
                    }
                    self.touch(t1);
                }
            }
            "LogicalRouterLinkPortOnTIER1" => {
                if let Some(t0) = str_at(
                    &current.doc,
                    &["linked_logical_router_port_id", "target_id"],
                )
                .map(str::to_string)
                {
                    if let Some(p) = self.objects.get_mut(&t0)
                        && p.str("linked_logical_router_port_id") == Some(id)
                    {
                        p.doc.remove("linked_logical_router_port_id");
                    }
                    self.touch(t0);
                }
            }
            _ => {
                if let Some(lp) = str_at(
                    &current.doc,
                    &["linked_logical_switch_port_id", "target_id"],
                )
                .map(str::to_string)
                {
                    if let Some(p) = self.objects.get_mut(&lp)
                        && str_at(&p.doc, &["attachment", "id"]) == Some(id)
                    {
                        p.doc.remove("attachment");
                    }
                    self.touch(lp);
                }
            }
        }
    }

    /// `GET /logical-routers/{id}/routing/advertisement`.
    pub fn advertisement_get(&self, router_id: &str) -> ApiResult<Value> {
        self.expect(Kind::LogicalRouter, router_id)?;
        Ok(Value::Object(
            self.advertisement
                .get(router_id)
                .cloned()
                .unwrap_or_else(|| {
                    let mut m = Map::new();
                    m.insert("resource_type".into(), json!("AdvertisementConfig"));
                    m.insert("logical_router_id".into(), json!(router_id));
                    m.insert("enabled".into(), json!(true));
                    for k in [
                        "advertise_nsx_connected_routes",
                        "advertise_static_routes",
                        "advertise_nat_routes",
                        "advertise_lb_vip",
                        "advertise_lb_snat_ip",
                        "advertise_dns_forwarder",
                    ] {
                        m.insert(k.into(), json!(false));
                    }
                    m.insert("_revision".into(), json!(0));
                    m
                }),
        ))
    }

    /// `PUT /logical-routers/{id}/routing/advertisement`, revision-checked like any object.
    pub fn advertisement_put(
        &mut self,
        ctx: &Ctx,
        router_id: &str,
        body: &Value,
    ) -> ApiResult<Value> {
        let current = self.advertisement_get(router_id)?;
        let typed: nsx_core::nsx::model::AdvertisementConfig = serde_json::from_value(body.clone())
            .map_err(|e| ApiError::validation(e.to_string()))?;
        let current_rev = current
            .get("_revision")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        match typed.meta.revision {
            Some(r) if r == current_rev => {}
            other => {
                return Err(ApiError::new(
                    412,
                    self.config.stale_revision_error_code,
                    "routing",
                    format!(
                        "The object was modified by somebody else. Current revision is {current_rev}, given {other:?}."
                    ),
                ));
            }
        }
        let Value::Object(mut doc) = serde_json::to_value(&typed).unwrap_or_default() else {
            return Err(ApiError::validation(
                "advertisement config must be an object",
            ));
        };
        doc.insert("resource_type".into(), json!("AdvertisementConfig"));
        doc.insert("logical_router_id".into(), json!(router_id));
        doc.insert("_revision".into(), json!(current_rev + 1));
        doc.insert("_last_modified_user".into(), json!(ctx.user));
        doc.insert("_last_modified_time".into(), json!(ctx.now_ms));
        self.advertisement
            .insert(router_id.to_string(), doc.clone());
        Ok(Value::Object(doc))
    }

    // ----- NAT ----------------------------------------------------------------------------

    fn check_nat(doc: &Map<String, Value>) -> ApiResult<()> {
        let action = str_at(doc, &["action"]).unwrap_or("");
        if matches!(action, "SNAT" | "DNAT" | "REFLEXIVE")
            && str_at(doc, &["translated_network"]).is_none()
        {
            return Err(ApiError::validation(format!(
                "translated_network is required for a {action} rule"
            )));
        }
        if let Some(p) = doc.get("rule_priority")
            && !p.as_i64().is_some_and(|p| (0..=2_147_483_647).contains(&p))
        {
            return Err(ApiError::validation(format!(
                "rule_priority must be an integer from 0 to 2147483647, not {p}"
            )));
        }
        for field in [
            "translated_network",
            "match_source_network",
            "match_destination_network",
        ] {
            if let Some(v) = str_at(doc, &[field]) {
                ipam::parse_ip_element(v)
                    .map_err(|e| ApiError::validation(format!("{field}: {e}")))?;
            }
        }
        Ok(())
    }

    pub(super) fn nat_create(
        &mut self,
        doc: &mut Map<String, Value>,
        parent: Option<&str>,
    ) -> ApiResult<()> {
        let router = parent.unwrap_or_default().to_string();
        self.expect(Kind::LogicalRouter, &router)?;
        Self::check_nat(doc)?;
        doc.insert("logical_router_id".into(), json!(router));
        doc.entry("rule_priority").or_insert(json!(1024));
        doc.entry("enabled").or_insert(json!(true));
        doc.entry("nat_pass").or_insert(json!(true));
        Ok(())
    }

    pub(super) fn nat_update(
        &mut self,
        current: &Obj,
        doc: &mut Map<String, Value>,
    ) -> ApiResult<()> {
        Self::check_nat(doc)?;
        if let Some(r) = current.doc.get("logical_router_id") {
            doc.insert("logical_router_id".into(), r.clone());
        }
        doc.entry("rule_priority").or_insert(json!(1024));
        doc.entry("enabled").or_insert(json!(true));
        Ok(())
    }

    /// A NAT rule of `router`; a missing one answers as the real manager does (400 by default).
    pub fn nat_rule(&self, router: &str, rule: &str) -> ApiResult<&Obj> {
        self.expect(Kind::LogicalRouter, router)?;
        match self.objects.get(rule) {
            Some(o) if o.kind == Kind::NatRule && o.parent.as_deref() == Some(router) => Ok(o),
            _ if self.config.missing_nat_rule_status == 400 => Err(ApiError::bad_request(
                error::FIELD_VALIDATION,
                "routing",
                format!("NAT rule {rule} not found on logical router {router}."),
            )),
            _ => Err(ApiError::not_found(rule)),
        }
    }
}

/// Allocation ranges as [`Range`]s.
pub(super) fn ranges_of(v: Option<&Value>) -> Vec<Range> {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let s = ipam::parse_ip(r.get("start")?.as_str()?).ok()?;
            let e = ipam::parse_ip(r.get("end")?.as_str()?).ok()?;
            Some(Range { start: s, end: e })
        })
        .collect()
}
