//! Load balancer services, virtual servers, pools (with member actions) and profiles.
//!
//! An LB service attaches to one TIER1 router (one service per router); a virtual server
//! belongs to at most one service; an object still referenced cannot be deleted. The default
//! application and persistence profiles exist from the start and are system owned.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::grouping::check_ports;
use super::{Ctx, Store};
use crate::error::{ApiError, ApiResult};
use crate::ipam;
use crate::kind::Kind;

fn member_key(m: &Value) -> (String, String) {
    (
        m.get("ip_address")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        m.get("port")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    )
}

fn check_member(m: &Value) -> ApiResult<()> {
    let ip = m.get("ip_address").and_then(Value::as_str).unwrap_or("");
    ipam::parse_ip(ip).map_err(|e| ApiError::validation(format!("members.ip_address: {e}")))?;
    if let Some(p) = m.get("port") {
        check_ports("members.port", Some(&json!([p])))?;
    }
    if let Some(w) = m.get("weight").and_then(Value::as_i64)
        && !(1..=256).contains(&w)
    {
        return Err(ApiError::validation(format!(
            "members.weight {w} is out of range 1-256"
        )));
    }
    match m.get("admin_state").and_then(Value::as_str) {
        None | Some("ENABLED") | Some("DISABLED") | Some("GRACEFUL_DISABLED") => Ok(()),
        Some(o) => Err(ApiError::validation(format!(
            "members.admin_state {o} is not valid"
        ))),
    }
}

fn normalize_member(m: &mut Value) {
    if let Some(o) = m.as_object_mut() {
        o.entry("weight").or_insert(json!(1));
        o.entry("admin_state").or_insert(json!("ENABLED"));
        o.entry("backup_member").or_insert(json!(false));
    }
}

pub(super) fn lb_pool_check(doc: &mut Map<String, Value>) -> ApiResult<()> {
    let mut members = doc
        .get("members")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut seen = BTreeSet::new();
    for m in &mut members {
        check_member(m)?;
        if !seen.insert(member_key(m)) {
            return Err(ApiError::validation(format!(
                "duplicate pool member {:?}",
                member_key(m)
            )));
        }
        normalize_member(m);
    }
    if doc.contains_key("members") {
        doc.insert("members".into(), Value::Array(members));
    }
    // Transparent when absent; automap (the load balancer's uplink address) or an IP pool.
    if let Some(t) = doc.get("snat_translation").filter(|t| !t.is_null()) {
        match t.get("type").and_then(Value::as_str) {
            Some("LbSnatAutoMap") => {}
            Some("LbSnatIpPool") => {
                let addrs = t.get("ip_addresses").and_then(Value::as_array);
                if addrs.is_none_or(Vec::is_empty) {
                    return Err(ApiError::validation(
                        "snat_translation.ip_addresses: required for LbSnatIpPool",
                    ));
                }
                for a in addrs.into_iter().flatten() {
                    let text = a.get("ip_address").and_then(Value::as_str).unwrap_or("");
                    ipam::parse_ip_element(text).map_err(|e| {
                        ApiError::validation(format!("snat_translation.ip_addresses: {e}"))
                    })?;
                }
            }
            other => {
                return Err(ApiError::validation(format!(
                    "snat_translation.type {other:?} is not LbSnatAutoMap or LbSnatIpPool"
                )));
            }
        }
    }
    doc.entry("algorithm").or_insert(json!("ROUND_ROBIN"));
    Ok(())
}

impl Store {
    pub(super) fn lb_service_write(
        &mut self,
        own: Option<&str>,
        doc: &mut Map<String, Value>,
    ) -> ApiResult<()> {
        if let Some(att) = doc.get("attachment").filter(|a| !a.is_null()) {
            let t = att.get("target_type").and_then(Value::as_str).unwrap_or("");
            let router = att.get("target_id").and_then(Value::as_str).unwrap_or("");
            if t != "LogicalRouter" {
                return Err(ApiError::validation(
                    "attachment.target_type must be LogicalRouter",
                ));
            }
            let r = self.expect_ref("attachment.target_id", router, &[Kind::LogicalRouter])?;
            if r.str("router_type") != Some("TIER1") {
                return Err(ApiError::validation(
                    "a load balancer service attaches to a TIER1 router",
                ));
            }
            // The load balancer runs on the router's edges: a tier-1 without an edge cluster
            // has none.
            if r.str("edge_cluster_id").is_none() {
                return Err(ApiError::validation(format!(
                    "logical router {router} has no edge cluster: a load balancer service needs \
                     its TIER1 router on an edge cluster"
                )));
            }
            if let Some(other) = self.ids_of(Kind::LbService).find(|l| {
                Some(l.as_str()) != own
                    && self.objects[*l]
                        .doc
                        .get("attachment")
                        .and_then(|a| a.get("target_id"))
                        .and_then(Value::as_str)
                        == Some(router)
            }) {
                return Err(ApiError::validation(format!(
                    "logical router {router} already has load balancer service {other}"
                )));
            }
        }
        for vs in doc
            .get("virtual_server_ids")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let vs = vs.as_str().unwrap_or("");
            self.expect_ref("virtual_server_ids", vs, &[Kind::LbVirtualServer])?;
            if let Some(other) = self.ids_of(Kind::LbService).find(|l| {
                Some(l.as_str()) != own
                    && self.objects[*l]
                        .doc
                        .get("virtual_server_ids")
                        .and_then(Value::as_array)
                        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(vs)))
            }) {
                return Err(ApiError::validation(format!(
                    "virtual server {vs} already belongs to load balancer service {other}"
                )));
            }
        }
        doc.entry("size").or_insert(json!("SMALL"));
        doc.entry("enabled").or_insert(json!(true));
        // What a load balancer of each size holds (NSX-T 2.4's published limits).
        let size = doc.get("size").and_then(Value::as_str).unwrap_or("");
        let limit = match size {
            "SMALL" => 20,
            "MEDIUM" => 100,
            "LARGE" => 1000,
            other => {
                return Err(ApiError::validation(format!(
                    "size {other:?} is invalid: SMALL, MEDIUM or LARGE"
                )));
            }
        };
        let servers = doc
            .get("virtual_server_ids")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        if servers > limit {
            return Err(ApiError::validation(format!(
                "a {size} load balancer service holds at most {limit} virtual servers, \
                 {servers} given"
            )));
        }
        Ok(())
    }

    pub(super) fn lb_vs_write(&mut self, doc: &mut Map<String, Value>) -> ApiResult<()> {
        let ip = doc.get("ip_address").and_then(Value::as_str).unwrap_or("");
        ipam::parse_ip(ip).map_err(|e| ApiError::validation(format!("ip_address: {e}")))?;
        let profile_id = doc
            .get("application_profile_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let profile =
            self.expect_ref("application_profile_id", &profile_id, &[Kind::LbAppProfile])?;
        let protocol = doc
            .get("ip_protocol")
            .and_then(Value::as_str)
            .unwrap_or("TCP")
            .to_string();
        let profile_type = profile.resource_type().to_string();
        if (protocol == "UDP") != (profile_type == "LbFastUdpProfile") {
            return Err(ApiError::validation(format!(
                "a {protocol} virtual server can not use a {profile_type}"
            )));
        }
        if let Some(p) = doc.get("pool_id").and_then(Value::as_str) {
            self.expect_ref("pool_id", p, &[Kind::LbPool])?;
        }
        if let Some(p) = doc.get("persistence_profile_id").and_then(Value::as_str) {
            self.expect_ref("persistence_profile_id", p, &[Kind::LbPersistenceProfile])?;
        }
        if let Some(p) = doc.get("port") {
            check_ports("port", Some(&json!([p])))?;
        }
        check_ports("ports", doc.get("ports"))?;
        if doc.get("port").is_none()
            && doc
                .get("ports")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty)
        {
            return Err(ApiError::validation("a virtual server needs port or ports"));
        }
        doc.insert("ip_protocol".into(), json!(protocol));
        doc.entry("enabled").or_insert(json!(true));
        Ok(())
    }

    /// `GET /loadbalancer/services/{id}/status`, as the manager reports it with no health
    /// monitor: an enabled member is UP; a pool is UP with all its enabled members up, DOWN
    /// with none; a virtual server has its pool's status (DISABLED when disabled); the service
    /// is DETACHED without a tier-1, DOWN when disabled, else UP on its tier-1's edges (the
    /// edge cluster's first member active, the second standby).
    pub fn lb_service_status(&self, id: &str) -> ApiResult<Value> {
        let svc = self.get(Kind::LbService, id)?;
        let enabled = |d: &Value| d.get("enabled").and_then(Value::as_bool) != Some(false);
        let tier1 = svc["attachment"]["target_id"]
            .as_str()
            .and_then(|r| self.objects.get(r));
        let edges: Vec<String> = tier1
            .and_then(|r| r.str("edge_cluster_id"))
            .and_then(|e| self.objects.get(e))
            .map(|e| {
                Self::field_list(&e.doc, "members")
                    .iter()
                    .filter_map(|m| m["transport_node_id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let service_status = if tier1.is_none() {
            "DETACHED"
        } else if !enabled(&svc) {
            "DOWN"
        } else {
            "UP"
        };
        let mut pools: Vec<Value> = Vec::new();
        let mut servers: Vec<Value> = Vec::new();
        for vs_id in svc["virtual_server_ids"].as_array().into_iter().flatten() {
            let Some(vs) = vs_id.as_str().and_then(|v| self.objects.get(v)) else {
                continue;
            };
            let pool = vs.str("pool_id").and_then(|p| self.objects.get(p));
            let pool_status = match pool {
                None => "DOWN",
                Some(p) => {
                    let members = Self::field_list(&p.doc, "members");
                    let up = members
                        .iter()
                        .filter(|m| m["admin_state"].as_str().unwrap_or("ENABLED") == "ENABLED")
                        .count();
                    match (up, members.len()) {
                        (0, _) => "DOWN",
                        (u, n) if u == n => "UP",
                        _ => "PARTIALLY_UP",
                    }
                }
            };
            if let Some(p) = pool
                && !pools.iter().any(|x| x["pool_id"].as_str() == p.str("id"))
            {
                let members: Vec<Value> = Self::field_list(&p.doc, "members")
                    .iter()
                    .map(|m| {
                        let state = m["admin_state"].as_str().unwrap_or("ENABLED");
                        json!({"ip_address": m["ip_address"], "port": m["port"],
                            "status": if state == "ENABLED" { "UP" } else { state }})
                    })
                    .collect();
                pools.push(
                    json!({"pool_id": p.str("id"), "status": pool_status, "members": members}),
                );
            }
            let status = if !enabled(&Value::Object(vs.doc.clone())) {
                "DISABLED"
            } else if service_status != "UP" {
                service_status
            } else {
                pool_status
            };
            servers.push(json!({"virtual_server_id": vs.str("id"), "status": status}));
        }
        Ok(json!({
            "service_id": id,
            "service_status": service_status,
            "active_transport_nodes": edges.first().into_iter().collect::<Vec<_>>(),
            "standby_transport_nodes": edges.get(1).into_iter().collect::<Vec<_>>(),
            "pools": pools,
            "virtual_servers": servers,
        }))
    }

    pub(super) fn lb_delete(&mut self, id: &str) -> ApiResult<()> {
        self.delete_unless_referenced(id, "LoadBalancer", false)
    }

    /// `POST /loadbalancer/pools/{id}?action=ADD_MEMBERS|REMOVE_MEMBERS|UPDATE_MEMBERS`.
    pub fn lb_pool_members(
        &mut self,
        ctx: &Ctx,
        id: &str,
        action: &str,
        body: &Value,
    ) -> ApiResult<Value> {
        let (current, given, mut members) =
            self.member_action_inputs(ctx, Kind::LbPool, id, body)?;
        for m in &given {
            check_member(m)?;
        }
        for m in given {
            let key = member_key(&m);
            let at = members.iter().position(|x| member_key(x) == key);
            match (action, at) {
                ("ADD_MEMBERS", None) => {
                    let mut m = m;
                    normalize_member(&mut m);
                    members.push(m);
                }
                ("ADD_MEMBERS", Some(_)) => {
                    return Err(ApiError::validation(format!(
                        "pool member {key:?} already exists"
                    )));
                }
                ("REMOVE_MEMBERS", Some(i)) => {
                    members.remove(i);
                }
                ("UPDATE_MEMBERS", Some(i)) => {
                    let mut m = m;
                    normalize_member(&mut m);
                    members[i] = m;
                }
                (_, None) => {
                    return Err(ApiError::validation(format!(
                        "pool member {key:?} does not exist"
                    )));
                }
                (other, _) => return Err(ApiError::validation(format!("unknown action {other}"))),
            }
        }
        let mut doc = current.doc.clone();
        doc.insert("members".into(), Value::Array(members));
        self.commit_update(ctx, id, &current, doc);
        Ok(Value::Object(self.render(id)))
    }

    /// Bootstrap: the default LB profiles, system owned.
    pub fn create_default_lb_profiles(&mut self, ctx: &Ctx) {
        let defaults = [
            (
                Kind::LbAppProfile,
                "LbFastTcpProfile",
                "nsx-default-lb-fast-tcp-profile",
            ),
            (
                Kind::LbAppProfile,
                "LbFastUdpProfile",
                "nsx-default-lb-fast-udp-profile",
            ),
            (
                Kind::LbAppProfile,
                "LbHttpProfile",
                "nsx-default-lb-http-profile",
            ),
            (
                Kind::LbPersistenceProfile,
                "LbSourceIpPersistenceProfile",
                "nsx-default-source-ip-persistence-profile",
            ),
            (
                Kind::LbPersistenceProfile,
                "LbCookiePersistenceProfile",
                "nsx-default-cookie-lb-persistence-profile",
            ),
        ];
        for (kind, rt, name) in defaults {
            let id = self.new_id(kind);
            let mut doc = Map::new();
            doc.insert("resource_type".into(), json!(rt));
            doc.insert("display_name".into(), json!(name));
            self.insert_new(ctx, kind, &id, doc, None);
            if let Some(o) = self.objects.get_mut(&id) {
                o.doc.insert("_system_owned".into(), json!(true));
            }
        }
    }
}

/// A persistence profile's fields as NSX checks them, with its defaults filled in: a source-IP
/// profile's `timeout` (seconds, at least 1; 300 when absent), `purge` (`FULL` or `NO_PURGE`),
/// `persistence_shared` (false when absent).
pub(super) fn persistence_check(doc: &mut Map<String, Value>) -> ApiResult<()> {
    if doc.get("resource_type").and_then(Value::as_str) != Some("LbSourceIpPersistenceProfile") {
        return Ok(());
    }
    match doc.get("timeout") {
        None | Some(Value::Null) => {
            doc.insert("timeout".into(), json!(300));
        }
        Some(t) if t.as_i64().is_some_and(|t| t >= 1) => {}
        Some(t) => {
            return Err(ApiError::validation(format!(
                "timeout {t} is invalid: a persistence timeout is at least 1 second"
            )));
        }
    }
    match doc.get("purge").and_then(Value::as_str) {
        None => {
            doc.insert("purge".into(), json!("FULL"));
        }
        Some("FULL" | "NO_PURGE") => {}
        Some(p) => {
            return Err(ApiError::validation(format!(
                "purge {p:?} is invalid: FULL or NO_PURGE"
            )));
        }
    }
    if doc.get("persistence_shared").is_none_or(Value::is_null) {
        doc.insert("persistence_shared".into(), json!(false));
    }
    Ok(())
}
