//! NSGroups, IPSets and NSServices, their member actions, and effective membership.
//!
//! Membership as NSX evaluates it: an NSGroup holds explicit `members` (by id) plus objects
//! matching any of its `membership_criteria` (ORed). A tag expression matches an object that has
//! a tag with that scope and value; a complex expression ANDs its sub-expressions. A member
//! logical switch stands for all its ports, and a member NSGroup for its own members (cycles are
//! cut).

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::{Ctx, DeleteFlags, Store};
use crate::error::{ApiError, ApiResult};
use crate::ipam;
use crate::kind::Kind;

const MEMBER_TARGETS: &[&str] = &[
    "LogicalPort",
    "LogicalSwitch",
    "IPSet",
    "NSGroup",
    "MACSet",
    "VirtualMachine",
    "VIF",
    "TransportNode",
];

fn kind_of_target(t: &str) -> Option<Kind> {
    match t {
        "LogicalPort" => Some(Kind::LogicalPort),
        "LogicalSwitch" => Some(Kind::LogicalSwitch),
        "IPSet" => Some(Kind::IpSet),
        "NSGroup" => Some(Kind::NsGroup),
        _ => None,
    }
}

impl Store {
    fn check_member(&self, own: Option<&str>, m: &Value) -> ApiResult<()> {
        let rt = m
            .get("resource_type")
            .and_then(Value::as_str)
            .unwrap_or("NSGroupSimpleExpression");
        if rt != "NSGroupSimpleExpression" {
            return Err(ApiError::validation(format!(
                "members: {rt} is not an NSGroupSimpleExpression"
            )));
        }
        let target = m.get("target_type").and_then(Value::as_str).unwrap_or("");
        if !MEMBER_TARGETS.contains(&target) {
            return Err(ApiError::validation(format!(
                "members.target_type {target} is not one of {MEMBER_TARGETS:?}"
            )));
        }
        let prop = m
            .get("target_property")
            .and_then(Value::as_str)
            .unwrap_or("");
        let op = m.get("op").and_then(Value::as_str).unwrap_or("");
        if prop != "id" || op != "EQUALS" {
            return Err(ApiError::validation(
                "members: target_property must be id and op EQUALS",
            ));
        }
        let value = m.get("value").and_then(Value::as_str).unwrap_or("");
        if Some(value) == own {
            return Err(ApiError::validation(
                "an NSGroup can not be a member of itself",
            ));
        }
        if let Some(k) = kind_of_target(target) {
            self.expect_ref("members.value", value, &[k])?;
        }
        Ok(())
    }

    fn check_criterion(c: &Value, depth: usize) -> ApiResult<()> {
        match c.get("resource_type").and_then(Value::as_str).unwrap_or("") {
            "NSGroupTagExpression" => {
                let t = c.get("target_type").and_then(Value::as_str).unwrap_or("");
                if ![
                    "LogicalPort",
                    "LogicalSwitch",
                    "IPSet",
                    "VirtualMachine",
                    "NSGroup",
                ]
                .contains(&t)
                {
                    return Err(ApiError::validation(format!(
                        "membership_criteria.target_type {t} is not supported"
                    )));
                }
                for (field, op) in [("scope", "scope_op"), ("tag", "tag_op")] {
                    if let Some(o) = c.get(op).and_then(Value::as_str)
                        && o != "EQUALS"
                    {
                        return Err(ApiError::validation(format!(
                            "membership_criteria.{op} {o} is not supported; only EQUALS"
                        )));
                    }
                    let _ = field;
                }
                if c.get("scope").is_none() && c.get("tag").is_none() {
                    return Err(ApiError::validation(
                        "a tag expression needs a scope or a tag",
                    ));
                }
                Ok(())
            }
            "NSGroupComplexExpression" if depth == 0 => {
                let exprs = c
                    .get("expressions")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                if !(2..=5).contains(&exprs.len()) {
                    return Err(ApiError::validation(
                        "a complex expression needs 2 to 5 expressions",
                    ));
                }
                for e in &exprs {
                    Self::check_criterion(e, depth + 1)?;
                }
                Ok(())
            }
            other => Err(ApiError::validation(format!(
                "membership_criteria: {other:?} is not a supported expression"
            ))),
        }
    }

    pub(super) fn nsgroup_write(
        &mut self,
        own: Option<&str>,
        doc: &mut Map<String, Value>,
    ) -> ApiResult<()> {
        let members = super::bounded_list(doc, "members", 500)?;
        for m in &members {
            self.check_member(own, m)?;
        }
        let criteria = super::bounded_list(doc, "membership_criteria", 5)?;
        for c in &criteria {
            Self::check_criterion(c, 0)?;
        }
        doc.remove("member_count");
        Ok(())
    }

    /// `POST /ns-groups/{id}?action=ADD_MEMBERS|REMOVE_MEMBERS`, body `{members: [...]}`.
    pub fn nsgroup_members(
        &mut self,
        ctx: &Ctx,
        id: &str,
        add: bool,
        body: &Value,
    ) -> ApiResult<Value> {
        let (current, given, mut members) =
            self.member_action_inputs(ctx, Kind::NsGroup, id, body)?;
        let key = |m: &Value| {
            (
                m.get("target_type")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                m.get("value")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            )
        };
        for m in &given {
            if add {
                self.check_member(Some(id), m)?;
            }
        }
        if add {
            for m in given {
                if !members.iter().any(|x| key(x) == key(&m)) {
                    let mut m = m;
                    if let Some(o) = m.as_object_mut() {
                        o.entry("resource_type")
                            .or_insert(json!("NSGroupSimpleExpression"));
                    }
                    members.push(m);
                }
            }
        } else {
            let remove: BTreeSet<(String, String)> = given.iter().map(key).collect();
            members.retain(|x| !remove.contains(&key(x)));
        }
        if members.len() > 500 {
            return Err(ApiError::validation(
                "members: size must be between 0 and 500",
            ));
        }
        let mut doc = current.doc.clone();
        doc.insert("members".into(), Value::Array(members));
        self.commit_update(ctx, id, &current, doc);
        Ok(Value::Object(self.render(id)))
    }

    /// `POST /ip-sets/{id}?action=add_ip|remove_ip`, body `{ip_address}`.
    pub fn ipset_modify(
        &mut self,
        ctx: &Ctx,
        id: &str,
        add: bool,
        body: &Value,
    ) -> ApiResult<Value> {
        let current = self.expect(Kind::IpSet, id)?.clone();
        self.check_writable(ctx, &current)?;
        let addr = body
            .get("ip_address")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::validation("required property ip_address is missing"))?
            .to_string();
        ipam::parse_ip_element(&addr).map_err(ApiError::validation)?;
        let mut list = current
            .doc
            .get("ip_addresses")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let present = list.iter().any(|x| x.as_str() == Some(addr.as_str()));
        if add {
            if present {
                return Err(ApiError::validation(format!(
                    "{addr} is already in IPSet {id}"
                )));
            }
            if list.len() >= 4000 {
                return Err(ApiError::validation(
                    "ip_addresses: size must be between 0 and 4000",
                ));
            }
            list.push(json!(addr));
        } else {
            if !present {
                return Err(ApiError::validation(format!("{addr} is not in IPSet {id}")));
            }
            list.retain(|x| x.as_str() != Some(addr.as_str()));
        }
        let mut doc = current.doc.clone();
        doc.insert("ip_addresses".into(), Value::Array(list));
        self.commit_update(ctx, id, &current, doc);
        Ok(json!({"ip_address": addr}))
    }

    pub(super) fn grouping_delete(&mut self, id: &str, flags: DeleteFlags) -> ApiResult<()> {
        self.delete_unless_referenced(id, "nsgroup", flags.force)
    }

    fn tag_matches(&self, obj_id: &str, expr: &Value) -> bool {
        let Some(o) = self.objects.get(obj_id) else {
            return false;
        };
        let tags: &[Value] = o
            .doc
            .get("tags")
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice);
        match expr.get("resource_type").and_then(Value::as_str) {
            Some("NSGroupComplexExpression") => expr
                .get("expressions")
                .and_then(Value::as_array)
                .is_some_and(|es| es.iter().all(|e| self.tag_matches(obj_id, e))),
            _ => {
                let want_type = expr
                    .get("target_type")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if o.resource_type() != want_type {
                    return false;
                }
                let scope = expr.get("scope").and_then(Value::as_str);
                let tag = expr.get("tag").and_then(Value::as_str);
                // scope AND tag on one tag, as NSX matches a tag expression.
                tags.iter().any(|t| {
                    scope.is_none_or(|s| t.get("scope").and_then(Value::as_str).unwrap_or("") == s)
                        && tag
                            .is_none_or(|v| t.get("tag").and_then(Value::as_str).unwrap_or("") == v)
                })
            }
        }
    }

    fn criterion_target(expr: &Value) -> Option<Kind> {
        match expr.get("resource_type").and_then(Value::as_str) {
            Some("NSGroupComplexExpression") => expr
                .get("expressions")
                .and_then(Value::as_array)
                .and_then(|es| es.first())
                .and_then(Self::criterion_target),
            _ => kind_of_target(
                expr.get("target_type")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
            ),
        }
    }

    /// Effective members of an NSGroup of one target kind (ports, switches or IPSets).
    pub fn nsgroup_effective(&self, id: &str, want: Kind) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut seen = BTreeSet::new();
        self.collect_effective(id, want, &mut out, &mut seen);
        out
    }

    fn collect_effective(
        &self,
        id: &str,
        want: Kind,
        out: &mut BTreeSet<String>,
        seen: &mut BTreeSet<String>,
    ) {
        if !seen.insert(id.to_string()) {
            return;
        }
        let Some(g) = self.objects.get(id) else {
            return;
        };
        for m in g
            .doc
            .get("members")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let target = m.get("target_type").and_then(Value::as_str).unwrap_or("");
            let value = m.get("value").and_then(Value::as_str).unwrap_or("");
            match (kind_of_target(target), want) {
                (Some(k), w) if k == w && self.objects.contains_key(value) => {
                    out.insert(value.to_string());
                }
                (Some(Kind::LogicalSwitch), Kind::LogicalPort) => out.extend(self.ports_on(value)),
                (Some(Kind::NsGroup), _) => self.collect_effective(value, want, out, seen),
                _ => {}
            }
        }
        for c in g
            .doc
            .get("membership_criteria")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            match (Self::criterion_target(c), want) {
                (Some(k), w) if k == w => {
                    out.extend(self.ids_of(k).filter(|o| self.tag_matches(o, c)).cloned());
                }
                (Some(Kind::LogicalSwitch), Kind::LogicalPort) => {
                    let switches: Vec<String> = self
                        .ids_of(Kind::LogicalSwitch)
                        .filter(|s| self.tag_matches(s, c))
                        .cloned()
                        .collect();
                    for s in switches {
                        out.extend(self.ports_on(&s));
                    }
                }
                _ => {}
            }
        }
    }

    /// Whether `obj` (of kind `want`) is an effective member of NSGroup `id`: what
    /// `nsgroup_effective(id, want).contains(obj)` says, without listing every member. The
    /// firewall asks this for one port per rule and packet, which is why it exists.
    pub fn nsgroup_holds(&self, id: &str, want: Kind, obj: &str) -> bool {
        self.holds(id, want, obj, &mut BTreeSet::new())
    }

    fn holds(&self, id: &str, want: Kind, obj: &str, seen: &mut BTreeSet<String>) -> bool {
        if !seen.insert(id.to_string()) {
            return false;
        }
        let Some(g) = self.objects.get(id) else {
            return false;
        };
        let Some(o) = self.objects.get(obj).filter(|o| o.kind == want) else {
            return false;
        };
        let switch_of_port = || o.str("logical_switch_id");
        let members = g.doc.get("members").and_then(Value::as_array);
        for m in members.into_iter().flatten() {
            let target = m.get("target_type").and_then(Value::as_str).unwrap_or("");
            let value = m.get("value").and_then(Value::as_str).unwrap_or("");
            let hit = match (kind_of_target(target), want) {
                (Some(k), w) if k == w => value == obj,
                (Some(Kind::LogicalSwitch), Kind::LogicalPort) => switch_of_port() == Some(value),
                (Some(Kind::NsGroup), _) => self.holds(value, want, obj, seen),
                _ => false,
            };
            if hit {
                return true;
            }
        }
        let criteria = g.doc.get("membership_criteria").and_then(Value::as_array);
        criteria
            .into_iter()
            .flatten()
            .any(|c| match (Self::criterion_target(c), want) {
                (Some(k), w) if k == w => self.tag_matches(obj, c),
                (Some(Kind::LogicalSwitch), Kind::LogicalPort) => {
                    switch_of_port().is_some_and(|s| {
                        self.objects
                            .get(s)
                            .is_some_and(|sw| sw.kind == Kind::LogicalSwitch)
                            && self.tag_matches(s, c)
                    })
                }
                _ => false,
            })
    }

    fn ports_on(&self, switch: &str) -> Vec<String> {
        self.ids_of(Kind::LogicalPort)
            .filter(|p| self.objects[*p].str("logical_switch_id") == Some(switch))
            .cloned()
            .collect()
    }

    /// `GET /ns-groups/{id}/effective-logical-port-members`.
    pub fn effective_port_members(&self, id: &str) -> ApiResult<Value> {
        self.expect(Kind::NsGroup, id)?;
        let results: Vec<Value> = self
            .nsgroup_effective(id, Kind::LogicalPort)
            .into_iter()
            .map(|p| {
                let name = self.objects[&p].str("display_name").unwrap_or("").to_string();
                json!({"target_id": p, "target_type": "LogicalPort", "target_display_name": name, "is_valid": true})
            })
            .collect();
        Ok(json!({"result_count": results.len(), "results": results}))
    }

    /// `GET /ns-groups/{id}/effective-ip-address-members`: IPSet addresses and the ports' IPs.
    pub fn effective_ip_members(&self, id: &str) -> ApiResult<Value> {
        self.expect(Kind::NsGroup, id)?;
        let mut ips = BTreeSet::new();
        for s in self.nsgroup_effective(id, Kind::IpSet) {
            for a in self.objects[&s]
                .doc
                .get("ip_addresses")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(a) = a.as_str() {
                    ips.insert(a.to_string());
                }
            }
        }
        for p in self.nsgroup_effective(id, Kind::LogicalPort) {
            if let Some(ip) = self.port_alloc.get(&p).and_then(|a| a.ip) {
                ips.insert(ipam::ip_to_string(ip));
            }
            for b in self.objects[&p]
                .doc
                .get("address_bindings")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(ip) = b.get("ip_address").and_then(Value::as_str) {
                    ips.insert(ip.to_string());
                }
            }
        }
        let results: Vec<Value> = ips
            .into_iter()
            .map(|ip| json!({"ip_addresses": [ip]}))
            .collect();
        Ok(json!({"result_count": results.len(), "results": results}))
    }
}

pub(super) fn ipset_check(doc: &mut Map<String, Value>) -> ApiResult<()> {
    let list = super::bounded_list(doc, "ip_addresses", 4000)?;
    for a in list {
        let text = a.as_str().unwrap_or("");
        ipam::parse_ip_element(text)
            .map_err(|e| ApiError::validation(format!("ip_addresses: {e}")))?;
    }
    Ok(())
}

/// Checks a port list like `["80", "8000-8080"]`.
pub(super) fn check_ports(field: &str, ports: Option<&Value>) -> ApiResult<()> {
    let list = ports.and_then(Value::as_array).cloned().unwrap_or_default();
    if list.len() > 15 {
        return Err(ApiError::validation(format!(
            "{field}: at most 15 ports or ranges"
        )));
    }
    for p in list {
        let text = p.as_str().unwrap_or("");
        let ok = match text.split_once('-') {
            Some((a, b)) => {
                matches!((a.parse::<u32>(), b.parse::<u32>()), (Ok(a), Ok(b)) if (1..=65535).contains(&a) && (1..=65535).contains(&b) && a <= b)
            }
            None => matches!(text.parse::<u32>(), Ok(n) if (1..=65535).contains(&n)),
        };
        if !ok {
            return Err(ApiError::validation(format!(
                "{field}: '{text}' is not a port or port range"
            )));
        }
    }
    Ok(())
}

/// Checks a service element (of an NSService or inline in a rule).
pub(super) fn check_service_element(e: &Value) -> ApiResult<()> {
    match e.get("resource_type").and_then(Value::as_str).unwrap_or("") {
        "L4PortSetNSService" => {
            match e.get("l4_protocol").and_then(Value::as_str) {
                Some("TCP") | Some("UDP") => {}
                other => {
                    return Err(ApiError::validation(format!(
                        "l4_protocol {other:?} must be TCP or UDP"
                    )));
                }
            }
            check_ports("destination_ports", e.get("destination_ports"))?;
            check_ports("source_ports", e.get("source_ports"))
        }
        "IPProtocolNSService" => match e.get("protocol_number").and_then(Value::as_i64) {
            Some(n) if (0..=255).contains(&n) => Ok(()),
            _ => Err(ApiError::validation("protocol_number must be 0-255")),
        },
        "ICMPTypeNSService" => match e.get("protocol").and_then(Value::as_str) {
            Some("ICMPv4") | Some("ICMPv6") => Ok(()),
            _ => Err(ApiError::validation("protocol must be ICMPv4 or ICMPv6")),
        },
        "ALGTypeNSService" | "EtherTypeNSService" => Ok(()),
        other => Err(ApiError::validation(format!(
            "service resource_type {other:?} is not supported"
        ))),
    }
}

pub(super) fn nsservice_check(doc: &mut Map<String, Value>) -> ApiResult<()> {
    match doc.get("nsservice_element") {
        Some(e) => check_service_element(e),
        None => Err(ApiError::validation(
            "required property nsservice_element is missing",
        )),
    }
}
