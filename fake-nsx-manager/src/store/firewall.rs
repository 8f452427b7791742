//! Distributed firewall sections and rules, in evaluation order.
//!
//! Sections form one list (`section_order`); the default section stays last and its default
//! rule stays last inside it. Every rule change bumps its section's `_revision`, and from NSX 2.4
//! on a rule POST must carry the section's current revision: a stale or missing one is a
//! conflict (409), as is a stale PUT of a section or rule. The `*_with_rules` actions change a
//! section and all its rules in one step.

use serde_json::{Map, Value, json};

use super::{Ctx, DeleteFlags, Obj, Store};
use crate::error::{self, ApiError, ApiResult};
use crate::ipam;
use crate::kind::Kind;

/// Where to put a new or moved section or rule (`?operation=...&id=...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    Top,
    Bottom,
    Before(String),
    After(String),
}

impl Placement {
    pub fn parse(operation: Option<&str>, anchor: Option<&str>) -> ApiResult<Self> {
        let need = |op: &str| {
            anchor
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .ok_or_else(|| {
                    ApiError::validation(format!("operation {op} needs the id of an anchor"))
                })
        };
        match operation.unwrap_or("insert_bottom") {
            "insert_top" => Ok(Placement::Top),
            "insert_bottom" => Ok(Placement::Bottom),
            "insert_before" => Ok(Placement::Before(need("insert_before")?)),
            "insert_after" => Ok(Placement::After(need("insert_after")?)),
            other => Err(ApiError::validation(format!(
                "operation {other} is not one of insert_top, insert_bottom, insert_before, insert_after"
            ))),
        }
    }
}

fn conflict(message: impl Into<String>) -> ApiError {
    ApiError::new(409, error::FIREWALL_CONFLICT, "firewall", message)
}

impl Store {
    fn check_refs(&self, field: &str, refs: Option<&Value>, allowed: &[&str]) -> ApiResult<()> {
        let list = refs.and_then(Value::as_array).cloned().unwrap_or_default();
        if list.len() > 128 {
            return Err(ApiError::validation(format!(
                "{field}: at most 128 entries"
            )));
        }
        for r in list {
            let t = r.get("target_type").and_then(Value::as_str).unwrap_or("");
            let id = r.get("target_id").and_then(Value::as_str).unwrap_or("");
            if !allowed.contains(&t) {
                return Err(ApiError::validation(format!(
                    "{field}.target_type {t:?} is not one of {allowed:?}"
                )));
            }
            let kind = match t {
                "NSGroup" => Some(Kind::NsGroup),
                "IPSet" => Some(Kind::IpSet),
                "LogicalPort" => Some(Kind::LogicalPort),
                "LogicalSwitch" => Some(Kind::LogicalSwitch),
                "LogicalRouter" => Some(Kind::LogicalRouter),
                _ => None,
            };
            match kind {
                Some(k) => {
                    self.expect_ref(&format!("{field}.target_id"), id, &[k])?;
                }
                None if t.starts_with("IPv4") => {
                    ipam::parse_ip_element(id)
                        .map_err(|e| ApiError::validation(format!("{field}: {e}")))?;
                }
                None => {}
            }
        }
        Ok(())
    }

    pub(super) fn section_create_check(&mut self, doc: &mut Map<String, Value>) -> ApiResult<()> {
        self.check_refs(
            "applied_tos",
            doc.get("applied_tos"),
            &["NSGroup", "LogicalSwitch", "LogicalPort", "LogicalRouter"],
        )?;
        doc.remove("rules");
        doc.remove("rule_count");
        doc.insert("is_default".into(), json!(false));
        Ok(())
    }

    pub(super) fn section_update_check(
        &mut self,
        _current: &Obj,
        doc: &mut Map<String, Value>,
    ) -> ApiResult<()> {
        self.check_refs(
            "applied_tos",
            doc.get("applied_tos"),
            &["NSGroup", "LogicalSwitch", "LogicalPort", "LogicalRouter"],
        )?;
        doc.remove("rules");
        doc.remove("rule_count");
        Ok(())
    }

    pub(super) fn rule_check(&mut self, doc: &mut Map<String, Value>) -> ApiResult<()> {
        const PEERS: &[&str] = &[
            "NSGroup",
            "IPSet",
            "LogicalPort",
            "LogicalSwitch",
            "IPv4Address",
            "IPv6Address",
            "MACSet",
        ];
        self.check_refs("sources", doc.get("sources"), PEERS)?;
        self.check_refs("destinations", doc.get("destinations"), PEERS)?;
        self.check_refs(
            "applied_tos",
            doc.get("applied_tos"),
            &["NSGroup", "LogicalSwitch", "LogicalPort", "LogicalRouter"],
        )?;
        for s in doc
            .get("services")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            match (s.get("target_id").and_then(Value::as_str), s.get("service")) {
                (Some(id), _) => {
                    self.expect_ref("services.target_id", id, &[Kind::NsService])?;
                }
                (None, Some(e)) => super::grouping::check_service_element(e)?,
                (None, None) => {
                    return Err(ApiError::validation(
                        "services: an entry needs target_id or service",
                    ));
                }
            }
        }
        doc.entry("direction").or_insert(json!("IN_OUT"));
        doc.entry("ip_protocol").or_insert(json!("IPV4_IPV6"));
        doc.entry("disabled").or_insert(json!(false));
        doc.entry("logged").or_insert(json!(false));
        doc.remove("section_id");
        doc.remove("is_default");
        doc.remove("_revision");
        Ok(())
    }

    pub(super) fn rule_update_check(
        &mut self,
        current: &Obj,
        doc: &mut Map<String, Value>,
    ) -> ApiResult<()> {
        let revision = doc.get("_revision").cloned();
        self.rule_check(doc)?;
        if let Some(r) = revision {
            doc.insert("_revision".into(), r);
        }
        // The last step: nothing can fail after this.
        if let Some(section) = current.parent.clone() {
            self.touch_section(&section);
        }
        Ok(())
    }

    /// A rule change: the section's revision goes up.
    fn touch_section(&mut self, section: &str) {
        if let Some(s) = self.objects.get_mut(section) {
            let r = s.revision();
            s.doc.insert("_revision".into(), json!(r + 1));
        }
        self.touch(section.to_string());
    }

    fn is_default(&self, id: &str) -> bool {
        self.objects
            .get(id)
            .and_then(|o| o.doc.get("is_default"))
            .and_then(Value::as_bool)
            == Some(true)
    }

    /// Index in `section_order` where a section goes.
    fn section_slot(&self, placement: &Placement, moving: Option<&str>) -> ApiResult<usize> {
        let order: Vec<&String> = self
            .section_order
            .iter()
            .filter(|s| Some(s.as_str()) != moving)
            .collect();
        let first_default = order
            .iter()
            .position(|s| self.is_default(s))
            .unwrap_or(order.len());
        let anchor_at = |a: &str| {
            order
                .iter()
                .position(|s| s.as_str() == a)
                .ok_or_else(|| ApiError::validation(format!("anchor section {a} does not exist")))
        };
        match placement {
            Placement::Top => Ok(0),
            Placement::Bottom => Ok(first_default),
            Placement::Before(a) => {
                let i = anchor_at(a)?;
                Ok(i)
            }
            Placement::After(a) => {
                let i = anchor_at(a)?;
                if self.is_default(a) {
                    return Err(ApiError::bad_request(
                        error::DEFAULT_RULE_LAST,
                        "firewall",
                        "No section can be placed after the default section.",
                    ));
                }
                Ok(i + 1)
            }
        }
    }

    /// Index in a section's rule list where a rule goes (before the default rule).
    fn rule_slot(&self, section: &str, placement: &Placement) -> ApiResult<usize> {
        let rules = self.rules_of(section);
        let end = if self.is_default(section) {
            rules
                .iter()
                .position(|r| self.is_default(r))
                .unwrap_or(rules.len())
        } else {
            rules.len()
        };
        let anchor_at = |a: &str| {
            rules.iter().position(|r| r == a).ok_or_else(|| {
                ApiError::validation(format!("anchor rule {a} is not in section {section}"))
            })
        };
        match placement {
            Placement::Top => Ok(0),
            Placement::Bottom => Ok(end),
            Placement::Before(a) => anchor_at(a),
            Placement::After(a) => {
                let i = anchor_at(a)?;
                if self.is_default(a) {
                    return Err(ApiError::bad_request(
                        error::DEFAULT_RULE_LAST,
                        "firewall",
                        "The default rule must stay the last rule of the default section.",
                    ));
                }
                Ok(i + 1)
            }
        }
    }

    /// `POST /firewall/sections[?operation=..][&action=create_with_rules]`.
    pub fn section_create(
        &mut self,
        ctx: &Ctx,
        body: &Value,
        placement: &Placement,
        with_rules: bool,
    ) -> ApiResult<Value> {
        let mut doc = Kind::FirewallSection.validate(body)?;
        self.check_common(&doc)?;
        self.section_create_check(&mut doc)?;
        let slot = self.section_slot(placement, None)?;
        let rules = if with_rules {
            self.validate_rules(body)?
        } else {
            Vec::new()
        };
        let id = self.new_id(Kind::FirewallSection);
        self.insert_new(ctx, Kind::FirewallSection, &id, doc, None);
        self.section_order.insert(slot, id.clone());
        let rule_ids = self.insert_rules(ctx, &id, rules);
        self.children.insert(id.clone(), rule_ids);
        Ok(self.section_with_rules(&id, with_rules))
    }

    fn validate_rules(&mut self, body: &Value) -> ApiResult<Vec<Map<String, Value>>> {
        let mut out = Vec::new();
        for r in body
            .get("rules")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let mut doc = Kind::FirewallRule.validate(r)?;
            self.check_common(&doc)?;
            let id = doc.get("id").cloned();
            self.rule_check(&mut doc)?;
            if let Some(id) = id {
                doc.insert("id".into(), id);
            }
            out.push(doc);
        }
        Ok(out)
    }

    /// Stores validated rules under a section (appending to its children) and returns their ids.
    fn insert_rules(
        &mut self,
        ctx: &Ctx,
        section: &str,
        rules: Vec<Map<String, Value>>,
    ) -> Vec<String> {
        let mut ids = Vec::new();
        for mut doc in rules {
            doc.remove("id");
            doc.insert("section_id".into(), json!(section));
            doc.insert("is_default".into(), json!(false));
            let id = self.new_id(Kind::FirewallRule);
            self.insert_new(ctx, Kind::FirewallRule, &id, doc, Some(section));
            ids.push(id);
        }
        ids
    }

    fn section_with_rules(&self, id: &str, with_rules: bool) -> Value {
        let mut doc = self.render(id);
        if with_rules {
            let rules: Vec<Value> = self
                .rules_of(id)
                .iter()
                .map(|r| Value::Object(self.render(r)))
                .collect();
            doc.insert("rules".into(), Value::Array(rules));
        }
        Value::Object(doc)
    }

    /// `POST /firewall/sections/{id}?action=list_with_rules`.
    pub fn section_list_with_rules(&self, id: &str) -> ApiResult<Value> {
        self.expect(Kind::FirewallSection, id)?;
        Ok(self.section_with_rules(id, true))
    }

    /// `POST /firewall/sections/{id}?action=update_with_rules`: the section and all its rules.
    pub fn section_update_with_rules(
        &mut self,
        ctx: &Ctx,
        id: &str,
        body: &Value,
    ) -> ApiResult<Value> {
        let current = self.expect(Kind::FirewallSection, id)?.clone();
        self.check_writable(ctx, &current)?;
        let mut doc = Kind::FirewallSection.validate(body)?;
        self.check_common(&doc)?;
        self.check_revision(Kind::FirewallSection, &current, doc.get("_revision"))?;
        if doc.get("section_type") != current.doc.get("section_type") {
            return Err(ApiError::validation("section_type can not be modified"));
        }
        self.section_update_check(&current, &mut doc)?;
        let rules = self.validate_rules(body)?;
        let old: Vec<String> = self.rules_of(id).to_vec();
        let default_rule = old.iter().find(|r| self.is_default(r)).cloned();
        for r in &rules {
            if let Some(rid) = r.get("id").and_then(Value::as_str) {
                if default_rule.as_deref() == Some(rid) {
                    continue;
                }
                if !old.iter().any(|o| o == rid) {
                    return Err(ApiError::validation(format!(
                        "rule {rid} is not in section {id}"
                    )));
                }
            }
        }
        // Commit: keep rules named by id, replace the rest, default rule stays last.
        let mut order = Vec::new();
        let mut kept = std::collections::BTreeSet::new();
        for mut r in rules {
            match r.get("id").and_then(Value::as_str).map(str::to_string) {
                Some(rid) if default_rule.as_deref() == Some(rid.as_str()) => {
                    // The default rule's fields may change; its place may not.
                    let cur = self.objects[&rid].clone();
                    r.insert("is_default".into(), json!(true));
                    r.insert("section_id".into(), json!(id));
                    self.commit_update(ctx, &rid, &cur, r);
                    kept.insert(rid);
                }
                Some(rid) => {
                    let cur = self.objects[&rid].clone();
                    r.insert("is_default".into(), json!(false));
                    r.insert("section_id".into(), json!(id));
                    self.commit_update(ctx, &rid, &cur, r);
                    kept.insert(rid.clone());
                    order.push(rid);
                }
                None => {
                    let new = self.insert_rules(ctx, id, vec![r]);
                    order.extend(new);
                }
            }
        }
        for r in old {
            if !kept.contains(&r) && default_rule.as_deref() != Some(r.as_str()) {
                self.remove(&r);
            }
        }
        if let Some(d) = default_rule {
            order.push(d);
        }
        self.children.insert(id.to_string(), order);
        self.commit_update(ctx, id, &current, doc);
        Ok(self.section_with_rules(id, true))
    }

    /// `POST /firewall/sections/{id}?action=revise&operation=..&id=..`: move (and update) a section.
    pub fn section_revise(
        &mut self,
        ctx: &Ctx,
        id: &str,
        body: &Value,
        placement: &Placement,
    ) -> ApiResult<Value> {
        let current = self.expect(Kind::FirewallSection, id)?.clone();
        self.check_writable(ctx, &current)?;
        if self.is_default(id) {
            return Err(ApiError::bad_request(
                error::DEFAULT_RULE_LAST,
                "firewall",
                "The default section can not be moved.",
            ));
        }
        let mut doc = Kind::FirewallSection.validate(body)?;
        self.check_common(&doc)?;
        self.check_revision(Kind::FirewallSection, &current, doc.get("_revision"))?;
        self.section_update_check(&current, &mut doc)?;
        if matches!(placement, Placement::Before(a) | Placement::After(a) if a == id) {
            return Err(ApiError::validation(
                "a section can not be placed relative to itself",
            ));
        }
        let slot = self.section_slot(placement, Some(id))?;
        self.section_order.retain(|s| s != id);
        self.section_order.insert(slot, id.to_string());
        self.commit_update(ctx, id, &current, doc);
        Ok(Value::Object(self.render(id)))
    }

    pub(super) fn section_delete(
        &mut self,
        id: &str,
        _current: &Obj,
        flags: DeleteFlags,
    ) -> ApiResult<()> {
        if self.is_default(id) {
            return Err(ApiError::bad_request(
                error::DEFAULT_RULE_LAST,
                "firewall",
                "The default section can not be deleted.",
            ));
        }
        let rules = self.rules_of(id).to_vec();
        if !rules.is_empty() && !flags.cascade {
            return Err(ApiError::in_use(
                "firewall",
                format!(
                    "Firewall section {id} has {} rule(s). Delete them first or use cascade=true.",
                    rules.len()
                ),
            ));
        }
        for r in rules {
            self.remove(&r);
        }
        self.section_order.retain(|s| s != id);
        self.remove(id);
        Ok(())
    }

    /// `POST /firewall/sections/{s}/rules[?action=create_multiple]`.
    pub fn rules_create(
        &mut self,
        ctx: &Ctx,
        section: &str,
        body: &Value,
        placement: &Placement,
        multiple: bool,
    ) -> ApiResult<Value> {
        let current = self.expect(Kind::FirewallSection, section)?.clone();
        self.check_writable(ctx, &current)?;
        let given: Vec<Value> = if multiple {
            body.get("rules")
                .and_then(Value::as_array)
                .cloned()
                .ok_or_else(|| ApiError::validation("required property rules is missing"))?
        } else {
            vec![body.clone()]
        };
        for r in &given {
            match r.get("_revision").and_then(Value::as_i64) {
                Some(rev) if rev == current.revision() => {}
                other => {
                    return Err(conflict(format!(
                        "The section {section} was modified by somebody else: current revision {}, given {other:?}.",
                        current.revision()
                    )));
                }
            }
        }
        let slot = self.rule_slot(section, placement)?;
        let mut docs = Vec::new();
        for r in &given {
            let mut doc = Kind::FirewallRule.validate(r)?;
            self.check_common(&doc)?;
            self.rule_check(&mut doc)?;
            docs.push(doc);
        }
        let ids = self.insert_rules(ctx, section, docs);
        // insert_rules appended; move them to their slot.
        let list = self.children.entry(section.to_string()).or_default();
        list.truncate(list.len() - ids.len());
        for (i, id) in ids.iter().enumerate() {
            list.insert(slot + i, id.clone());
        }
        self.touch_section(section);
        let rendered: Vec<Value> = ids.iter().map(|i| Value::Object(self.render(i))).collect();
        Ok(if multiple {
            json!({"rules": rendered})
        } else {
            rendered.into_iter().next().unwrap_or(Value::Null)
        })
    }

    pub(super) fn rule_delete(&mut self, id: &str, current: &Obj) -> ApiResult<()> {
        if self.is_default(id) {
            return Err(ApiError::bad_request(
                error::DEFAULT_RULE_LAST,
                "firewall",
                "The default rule of the default section can not be deleted.",
            ));
        }
        self.remove(id);
        if let Some(s) = &current.parent {
            self.touch_section(s);
        }
        Ok(())
    }

    /// Bootstrap: the default LAYER3 section with its default ALLOW rule, last in order.
    pub fn create_default_section(&mut self, ctx: &Ctx) -> String {
        let id = self.new_id(Kind::FirewallSection);
        let mut doc = Map::new();
        doc.insert("resource_type".into(), json!("FirewallSection"));
        doc.insert("display_name".into(), json!("Default Layer3 Section"));
        doc.insert("section_type".into(), json!("LAYER3"));
        doc.insert("stateful".into(), json!(true));
        doc.insert("is_default".into(), json!(true));
        self.insert_new(ctx, Kind::FirewallSection, &id, doc, None);
        self.section_order.push(id.clone());
        let rid = self.new_id(Kind::FirewallRule);
        let mut rule = Map::new();
        rule.insert("resource_type".into(), json!("FirewallRule"));
        rule.insert("display_name".into(), json!("Default Layer3 Rule"));
        rule.insert("action".into(), json!("ALLOW"));
        rule.insert("direction".into(), json!("IN_OUT"));
        rule.insert("ip_protocol".into(), json!("IPV4_IPV6"));
        rule.insert("disabled".into(), json!(false));
        rule.insert("logged".into(), json!(false));
        rule.insert("is_default".into(), json!(true));
        rule.insert("section_id".into(), json!(id));
        self.insert_new(ctx, Kind::FirewallRule, &rid, rule, Some(&id));
        id
    }

    pub(super) fn check_firewall_invariants(&self) -> Result<(), String> {
        let sections: Vec<&String> = self.ids_of(Kind::FirewallSection).collect();
        if sections.len() != self.section_order.len() {
            return Err(format!(
                "{} sections, {} in order",
                sections.len(),
                self.section_order.len()
            ));
        }
        let mut seen_default = false;
        for s in &self.section_order {
            if self
                .objects
                .get(s)
                .is_none_or(|o| o.kind != Kind::FirewallSection)
            {
                return Err(format!("section order names {s}, which is not a section"));
            }
            if self.is_default(s) {
                seen_default = true;
                let rules = self.rules_of(s);
                if let Some(last) = rules.last()
                    && rules.iter().any(|r| self.is_default(r))
                    && !self.is_default(last)
                {
                    return Err(format!("default section {s}: the default rule is not last"));
                }
            } else if seen_default {
                return Err(format!("section {s} comes after the default section"));
            }
        }
        for r in self.ids_of(Kind::FirewallRule) {
            let o = &self.objects[r];
            let p = o
                .parent
                .as_deref()
                .ok_or(format!("rule {r} has no section"))?;
            if o.str("section_id") != Some(p) {
                return Err(format!("rule {r}: section_id differs from its parent {p}"));
            }
        }
        Ok(())
    }
}

/// The kinds the distributed firewall's exclude list takes members of.
const EXCLUDABLE: &[(&str, Kind)] = &[
    ("LogicalPort", Kind::LogicalPort),
    ("LogicalSwitch", Kind::LogicalSwitch),
    ("NSGroup", Kind::NsGroup),
];

impl Store {
    /// `GET /firewall/excludelist`: the objects the distributed firewall skips.
    pub fn exclude_list(&self) -> Value {
        json!({
            "resource_type": "ExcludeList",
            "id": "excludelist",
            "display_name": "excludelist",
            "members": self.exclude_list.0,
            "_revision": self.exclude_list.1,
        })
    }

    /// `POST /firewall/excludelist?action=add_member` (body: a reference to a logical port,
    /// switch or NSGroup), `?action=remove_member&object_id=` (given as the body's
    /// `object_id` by the dispatcher) and `?action=check_if_member`.
    pub fn exclude_list_action(
        &mut self,
        ctx: &Ctx,
        action: Option<&str>,
        body: &Value,
    ) -> ApiResult<Value> {
        let _ = ctx;
        match action {
            Some("add_member") => {
                let id = body.get("target_id").and_then(Value::as_str).unwrap_or("");
                let ty = body
                    .get("target_type")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let kind = EXCLUDABLE
                    .iter()
                    .find(|(t, _)| *t == ty)
                    .map(|(_, k)| *k)
                    .ok_or_else(|| {
                        ApiError::validation(format!(
                            "target_type {ty:?} is invalid: LogicalPort, LogicalSwitch or NSGroup"
                        ))
                    })?;
                let o = self.expect_ref("target_id", id, &[kind])?;
                let member = json!({
                    "target_id": id,
                    "target_type": ty,
                    "target_display_name": o.str("display_name").unwrap_or(id),
                    "is_valid": true,
                });
                if self.exclude_list.0.iter().any(|m| m["target_id"] == id) {
                    return Err(ApiError::validation(format!(
                        "{id} is already a member of the exclude list"
                    )));
                }
                self.exclude_list.0.push(member.clone());
                self.exclude_list.1 += 1;
                Ok(member)
            }
            Some("remove_member") => {
                let id = body.get("object_id").and_then(Value::as_str).unwrap_or("");
                let before = self.exclude_list.0.len();
                self.exclude_list.0.retain(|m| m["target_id"] != id);
                if self.exclude_list.0.len() == before {
                    return Err(ApiError::not_found(id));
                }
                self.exclude_list.1 += 1;
                Ok(json!({}))
            }
            Some("check_if_member") => {
                let id = body.get("object_id").and_then(Value::as_str).unwrap_or("");
                Ok(json!({"result": self.exclude_list.0.iter().any(|m| m["target_id"] == id)}))
            }
            other => Err(ApiError::validation(format!(
                "action {other:?} is invalid: add_member, remove_member or check_if_member"
            ))),
        }
    }
}
