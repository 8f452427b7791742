//! Random sequences of valid and invalid requests never corrupt the store: after every request
//! every store invariant holds, a rejected request (4xx) leaves the store byte-for-byte as it
//! was, and nothing answers 5xx. The same sequences through a state file, reopened midway,
//! give the same answers and the same store as a manager that never stopped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use fake_nsx_manager::dispatch::ApiRequest;
use fake_nsx_manager::kind::Kind;
use fake_nsx_manager::store::{Entry, Packet, Protocol};
use fake_nsx_manager::{Clock, FakeNsxManager, ManagerConfig};
use proptest::prelude::*;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
enum Op {
    Switch {
        pool: Option<usize>,
        valid: bool,
    },
    UpdateSwitch {
        s: usize,
        stale: bool,
    },
    DeleteSwitch {
        s: usize,
        cascade: bool,
        detach: bool,
    },
    Port {
        s: usize,
        alloc: u8,
        vif: u8,
        tag: u16,
        child: bool,
    },
    UpdatePort {
        p: usize,
        alloc: u8,
        drop_attachment: bool,
    },
    DeletePort {
        p: usize,
        detach: bool,
    },
    Pool {
        hosts: u8,
        valid: bool,
    },
    Allocate {
        pool: usize,
        ip: Option<u8>,
    },
    Release {
        pool: usize,
        ip: u8,
    },
    DeletePool {
        pool: usize,
        force: bool,
    },
    Block {
        third: u8,
    },
    Subnet {
        block: usize,
        size_log2: u8,
    },
    DeleteSubnet {
        subnet: usize,
    },
    DeleteBlock {
        block: usize,
    },
    Router {
        tier1: bool,
    },
    RouterPort {
        kind: u8,
        router: usize,
        target: usize,
    },
    DeleteRouterPort {
        rp: usize,
        force: bool,
    },
    DeleteRouter {
        r: usize,
        force: bool,
    },
    Group {
        member: Option<usize>,
        criteria: bool,
    },
    DeleteGroup {
        g: usize,
        force: bool,
    },
    Section {
        op: u8,
        anchor: usize,
        with_rules: bool,
    },
    Rule {
        section: usize,
        rev_offset: i8,
        group: Option<usize>,
        op: u8,
    },
    DeleteRule {
        section: usize,
        rule: usize,
    },
    DeleteSection {
        section: usize,
        cascade: bool,
    },
    Nat {
        router: usize,
        valid: bool,
    },
    LbPool {
        members: u8,
    },
    Vs {
        pool: Option<usize>,
        valid: bool,
    },
    LbService {
        router: usize,
        vs: Option<usize>,
    },
    DeleteLb {
        which: u8,
        i: usize,
    },
    Garbage {
        path: u8,
        body: Vec<u8>,
    },
    Batch {
        atomic: bool,
        a: Box<Op>,
        b: Box<Op>,
    },
}

fn leaf() -> impl Strategy<Value = Op> {
    let u = || 0usize..8;
    prop_oneof![
        4 => (proptest::option::weighted(0.8, u()), proptest::bool::weighted(0.85)).prop_map(|(pool, valid)| Op::Switch { pool, valid }),
        1 => (u(), any::<bool>()).prop_map(|(s, stale)| Op::UpdateSwitch { s, stale }),
        1 => (u(), any::<bool>(), any::<bool>()).prop_map(|(s, cascade, detach)| Op::DeleteSwitch { s, cascade, detach }),
        6 => (u(), 0u8..4, 0u8..40, 0u16..4100, any::<bool>()).prop_map(|(s, alloc, vif, tag, child)| Op::Port { s, alloc, vif, tag, child }),
        1 => (u(), 0u8..4, any::<bool>()).prop_map(|(p, alloc, drop_attachment)| Op::UpdatePort { p, alloc, drop_attachment }),
        1 => (u(), any::<bool>()).prop_map(|(p, detach)| Op::DeletePort { p, detach }),
        3 => (1u8..6, proptest::bool::weighted(0.85)).prop_map(|(hosts, valid)| Op::Pool { hosts, valid }),
        3 => (u(), proptest::option::of(0u8..8)).prop_map(|(pool, ip)| Op::Allocate { pool, ip }),
        2 => (u(), 0u8..8).prop_map(|(pool, ip)| Op::Release { pool, ip }),
        1 => (u(), any::<bool>()).prop_map(|(pool, force)| Op::DeletePool { pool, force }),
        1 => (0u8..3).prop_map(|third| Op::Block { third }),
        1 => (u(), 0u8..10).prop_map(|(block, size_log2)| Op::Subnet { block, size_log2 }),
        1 => u().prop_map(|subnet| Op::DeleteSubnet { subnet }),
        1 => u().prop_map(|block| Op::DeleteBlock { block }),
        1 => any::<bool>().prop_map(|tier1| Op::Router { tier1 }),
        1 => (0u8..3, u(), u()).prop_map(|(kind, router, target)| Op::RouterPort { kind, router, target }),
        1 => (u(), any::<bool>()).prop_map(|(rp, force)| Op::DeleteRouterPort { rp, force }),
        1 => (u(), any::<bool>()).prop_map(|(r, force)| Op::DeleteRouter { r, force }),
        1 => (proptest::option::of(u()), any::<bool>()).prop_map(|(member, criteria)| Op::Group { member, criteria }),
        1 => (u(), any::<bool>()).prop_map(|(g, force)| Op::DeleteGroup { g, force }),
        2 => (0u8..5, u(), any::<bool>()).prop_map(|(op, anchor, with_rules)| Op::Section { op, anchor, with_rules }),
        4 => (u(), prop_oneof![4 => Just(0i8), 1 => -1i8..2], proptest::option::of(u()), 0u8..4).prop_map(|(section, rev_offset, group, op)| Op::Rule { section, rev_offset, group, op }),
        1 => (u(), u()).prop_map(|(section, rule)| Op::DeleteRule { section, rule }),
        1 => (u(), any::<bool>()).prop_map(|(section, cascade)| Op::DeleteSection { section, cascade }),
        1 => (u(), any::<bool>()).prop_map(|(router, valid)| Op::Nat { router, valid }),
        1 => (0u8..3).prop_map(|members| Op::LbPool { members }),
        1 => (proptest::option::of(u()), any::<bool>()).prop_map(|(pool, valid)| Op::Vs { pool, valid }),
        1 => (u(), proptest::option::of(u())).prop_map(|(router, vs)| Op::LbService { router, vs }),
        1 => (0u8..3, u()).prop_map(|(which, i)| Op::DeleteLb { which, i }),
        1 => (0u8..6, proptest::collection::vec(any::<u8>(), 0..40)).prop_map(|(path, body)| Op::Garbage { path, body }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        9 => leaf(),
        1 => (any::<bool>(), leaf(), leaf()).prop_map(|(atomic, a, b)| Op::Batch { atomic, a: Box::new(a), b: Box::new(b) }),
    ]
}

/// Ids the run has seen created, per collection, so that most references are valid.
#[derive(Default)]
struct Seen(BTreeMap<&'static str, Vec<String>>);

impl Seen {
    fn pick(&self, kind: &'static str, i: usize) -> String {
        match self.0.get(kind) {
            Some(v) if !v.is_empty() => v[i % v.len()].clone(),
            _ => format!("missing-{kind}"),
        }
    }
    fn pick_opt(&self, kind: &'static str, i: Option<usize>) -> Option<String> {
        i.map(|i| self.pick(kind, i))
    }
}

struct Call {
    method: &'static str,
    path: String,
    body: Option<Value>,
    raw: Option<Vec<u8>>,
    /// The collection whose created id to remember.
    remember: Option<&'static str>,
}

impl Call {
    /// The body's bytes, the path and the query, as `ApiRequest` takes them.
    fn parts(&self) -> (Vec<u8>, String, Vec<(String, String)>) {
        let body = self.raw.clone().unwrap_or_else(|| {
            self.body
                .as_ref()
                .map(|b| serde_json::to_vec(b).unwrap())
                .unwrap_or_default()
        });
        let (path, query) = fake_nsx_manager::dispatch::split_query(&self.path);
        (body, path.to_string(), query)
    }
}

fn call(
    method: &'static str,
    path: String,
    body: Option<Value>,
    remember: Option<&'static str>,
) -> Call {
    Call {
        method,
        path,
        body,
        raw: None,
        remember,
    }
}

fn build(op: &Op, seen: &Seen, nsx: &FakeNsxManager) -> Call {
    let boot = nsx.bootstrap().expect("bootstrap");
    let tz = boot.transport_zone.clone();
    let v = |p: &str| format!("/api/v1/{p}");
    let current = |path: &str| -> Value {
        let r = nsx.call_as_admin(ApiRequest {
            method: "GET",
            path,
            query: &[],
            body: b"",
        });
        r.body.unwrap_or(Value::Null)
    };
    match op {
        Op::Switch { pool, valid } => {
            let mut b = json!({"transport_zone_id": if *valid { tz.clone() } else { "nope".into() }, "admin_state": "UP"});
            if let Some(p) = seen.pick_opt("pool", *pool) {
                b["ip_pool_id"] = json!(p);
            }
            call("POST", v("logical-switches"), Some(b), Some("switch"))
        }
        Op::UpdateSwitch { s, stale } => {
            let path = v(&format!("logical-switches/{}", seen.pick("switch", *s)));
            let mut doc = current(&path);
            if doc.get("_revision").is_some() {
                doc["display_name"] = json!("changed");
                if *stale {
                    doc["_revision"] = json!(doc["_revision"].as_i64().unwrap_or(0) + 7);
                }
            }
            call("PUT", path, Some(doc), None)
        }
        Op::DeleteSwitch { s, cascade, detach } => call(
            "DELETE",
            v(&format!(
                "logical-switches/{}?cascade={cascade}&detach={detach}",
                seen.pick("switch", *s)
            )),
            None,
            None,
        ),
        Op::Port {
            s,
            alloc,
            vif,
            tag,
            child,
        } => {
            let mode = ["None", "IpPool", "MacPool", "Both"][*alloc as usize % 4];
            let ctx = if *child {
                json!({"resource_type": "VifAttachmentContext", "vif_type": "CHILD", "parent_vif_id": "vif-p", "traffic_tag": tag, "allocate_addresses": mode})
            } else {
                json!({"resource_type": "VifAttachmentContext", "vif_type": "INDEPENDENT", "allocate_addresses": mode})
            };
            let b = json!({"logical_switch_id": seen.pick("switch", *s), "admin_state": "UP",
                "attachment": {"attachment_type": "VIF", "id": format!("vif-{vif}"), "context": ctx}});
            call("POST", v("logical-ports"), Some(b), Some("port"))
        }
        Op::UpdatePort {
            p,
            alloc,
            drop_attachment,
        } => {
            let path = v(&format!("logical-ports/{}", seen.pick("port", *p)));
            let mut doc = current(&path);
            if let Some(o) = doc.as_object_mut() {
                if *drop_attachment {
                    o.remove("attachment");
                } else if let Some(ctx) = o.get_mut("attachment").and_then(|a| a.get_mut("context"))
                {
                    ctx["allocate_addresses"] =
                        json!(["None", "IpPool", "MacPool", "Both"][*alloc as usize % 4]);
                }
            }
            call("PUT", path, Some(doc), None)
        }
        Op::DeletePort { p, detach } => call(
            "DELETE",
            v(&format!(
                "logical-ports/{}?detach={detach}",
                seen.pick("port", *p)
            )),
            None,
            None,
        ),
        Op::Pool { hosts, valid } => {
            let end = if *valid { 1 + *hosts } else { 200 };
            let b = json!({"subnets": [{"cidr": "10.50.0.0/28", "gateway_ip": "10.50.0.1",
                "allocation_ranges": [{"start": "10.50.0.1", "end": format!("10.50.0.{end}")}]}]});
            call("POST", v("pools/ip-pools"), Some(b), Some("pool"))
        }
        Op::Allocate { pool, ip } => call(
            "POST",
            v(&format!(
                "pools/ip-pools/{}?action=ALLOCATE",
                seen.pick("pool", *pool)
            )),
            Some(json!({"allocation_id": ip.map(|i| format!("10.50.0.{i}"))})),
            None,
        ),
        Op::Release { pool, ip } => {
            let id = seen.pick("pool", *pool);
            let allocated = current(&v(&format!("pools/ip-pools/{id}/allocations")));
            let list: Vec<String> = allocated["results"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a["allocation_id"].as_str().map(str::to_string))
                .collect();
            // Mostly an address that is allocated (by the API or a port), sometimes any.
            let addr = if *ip < 6 && !list.is_empty() {
                list[*ip as usize % list.len()].clone()
            } else {
                format!("10.50.0.{ip}")
            };
            call(
                "POST",
                v(&format!("pools/ip-pools/{id}?action=RELEASE")),
                Some(json!({"allocation_id": addr})),
                None,
            )
        }
        Op::DeletePool { pool, force } => call(
            "DELETE",
            v(&format!(
                "pools/ip-pools/{}?force={force}",
                seen.pick("pool", *pool)
            )),
            None,
            None,
        ),
        Op::Block { third } => call(
            "POST",
            v("pools/ip-blocks"),
            Some(json!({"cidr": format!("10.{}.0.0/22", 60 + third)})),
            Some("block"),
        ),
        Op::Subnet { block, size_log2 } => call(
            "POST",
            v("pools/ip-subnets"),
            Some(
                json!({"block_id": seen.pick("block", *block), "size": (1u64 << size_log2) + u64::from(*size_log2 == 9)}),
            ),
            Some("subnet"),
        ),
        Op::DeleteSubnet { subnet } => call(
            "DELETE",
            v(&format!(
                "pools/ip-subnets/{}",
                seen.pick("subnet", *subnet)
            )),
            None,
            None,
        ),
        Op::DeleteBlock { block } => call(
            "DELETE",
            v(&format!("pools/ip-blocks/{}", seen.pick("block", *block))),
            None,
            None,
        ),
        Op::Router { tier1 } => call(
            "POST",
            v("logical-routers"),
            Some(json!({"router_type": if *tier1 { "TIER1" } else { "TIER0" }})),
            Some("router"),
        ),
        Op::RouterPort {
            kind,
            router,
            target,
        } => {
            let r = if *kind == 0 && *router % 2 == 0 {
                boot.tier0_router.clone()
            } else {
                seen.pick("router", *router)
            };
            let b = match kind {
                0 => {
                    json!({"resource_type": "LogicalRouterLinkPortOnTIER0", "logical_router_id": r})
                }
                1 => {
                    json!({"resource_type": "LogicalRouterLinkPortOnTIER1", "logical_router_id": r,
                    "linked_logical_router_port_id": {"target_id": seen.pick("router_port", *target)}})
                }
                _ => json!({"resource_type": "LogicalRouterDownLinkPort", "logical_router_id": r,
                    "linked_logical_switch_port_id": {"target_id": seen.pick("port", *target)},
                    "subnets": [{"ip_addresses": [format!("10.70.{target}.1")], "prefix_length": 24}]}),
            };
            call(
                "POST",
                v("logical-router-ports"),
                Some(b),
                Some("router_port"),
            )
        }
        Op::DeleteRouterPort { rp, force } => call(
            "DELETE",
            v(&format!(
                "logical-router-ports/{}?force={force}",
                seen.pick("router_port", *rp)
            )),
            None,
            None,
        ),
        Op::DeleteRouter { r, force } => call(
            "DELETE",
            v(&format!(
                "logical-routers/{}?force={force}",
                seen.pick("router", *r)
            )),
            None,
            None,
        ),
        Op::Group { member, criteria } => {
            let mut b = json!({});
            if let Some(p) = seen.pick_opt("port", *member) {
                b["members"] = json!([{"resource_type": "NSGroupSimpleExpression", "target_type": "LogicalPort", "target_property": "id", "op": "EQUALS", "value": p}]);
            }
            if *criteria {
                b["membership_criteria"] = json!([{"resource_type": "NSGroupTagExpression", "target_type": "LogicalPort", "scope": "app", "tag": "web"}]);
            }
            call("POST", v("ns-groups"), Some(b), Some("group"))
        }
        Op::DeleteGroup { g, force } => call(
            "DELETE",
            v(&format!(
                "ns-groups/{}?force={force}",
                seen.pick("group", *g)
            )),
            None,
            None,
        ),
        Op::Section {
            op,
            anchor,
            with_rules,
        } => {
            let operation = [
                "insert_top",
                "insert_bottom",
                "insert_before",
                "insert_after",
                "bogus",
            ][*op as usize % 5];
            let anchor = if *anchor == 7 {
                boot.default_section.clone()
            } else {
                seen.pick("section", *anchor)
            };
            let action = if *with_rules {
                "&action=create_with_rules"
            } else {
                ""
            };
            let b = json!({"section_type": "LAYER3", "stateful": true, "rules": [{"action": "ALLOW"}, {"action": "DROP"}]});
            call(
                "POST",
                v(&format!(
                    "firewall/sections?operation={operation}&id={anchor}{action}"
                )),
                Some(b),
                Some("section"),
            )
        }
        Op::Rule {
            section,
            rev_offset,
            group,
            op,
        } => {
            let s = if *section == 7 {
                boot.default_section.clone()
            } else {
                seen.pick("section", *section)
            };
            let rev = current(&v(&format!("firewall/sections/{s}")))["_revision"]
                .as_i64()
                .unwrap_or(0)
                + i64::from(*rev_offset);
            let mut b = json!({"action": "DROP", "_revision": rev});
            if let Some(g) = seen.pick_opt("group", *group) {
                b["sources"] = json!([{"target_type": "NSGroup", "target_id": g}]);
            }
            let rules = current(&v(&format!("firewall/sections/{s}/rules")));
            let anchor = rules["results"]
                .as_array()
                .and_then(|r| r.first())
                .and_then(|r| r["id"].as_str())
                .unwrap_or("x")
                .to_string();
            let operation = [
                "insert_top",
                "insert_bottom",
                "insert_before",
                "insert_after",
            ][*op as usize % 4];
            call(
                "POST",
                v(&format!(
                    "firewall/sections/{s}/rules?operation={operation}&id={anchor}"
                )),
                Some(b),
                None,
            )
        }
        Op::DeleteRule { section, rule } => {
            let s = if *section == 7 {
                boot.default_section.clone()
            } else {
                seen.pick("section", *section)
            };
            let rules = current(&v(&format!("firewall/sections/{s}/rules")));
            let ids: Vec<String> = rules["results"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["id"].as_str().map(str::to_string))
                .collect();
            let r = if ids.is_empty() {
                "1".to_string()
            } else {
                ids[rule % ids.len()].clone()
            };
            call(
                "DELETE",
                v(&format!("firewall/sections/{s}/rules/{r}")),
                None,
                None,
            )
        }
        Op::DeleteSection { section, cascade } => {
            let s = if *section == 7 {
                boot.default_section.clone()
            } else {
                seen.pick("section", *section)
            };
            call(
                "DELETE",
                v(&format!("firewall/sections/{s}?cascade={cascade}")),
                None,
                None,
            )
        }
        Op::Nat { router, valid } => {
            let r = if *router == 0 {
                boot.tier0_router.clone()
            } else {
                seen.pick("router", *router)
            };
            let b = if *valid {
                json!({"action": "SNAT", "match_source_network": "10.4.0.0/24", "translated_network": "192.0.2.9"})
            } else {
                json!({"action": "SNAT"})
            };
            call(
                "POST",
                v(&format!("logical-routers/{r}/nat/rules")),
                Some(b),
                None,
            )
        }
        Op::LbPool { members } => {
            let m: Vec<Value> = (0..*members)
                .map(|i| json!({"ip_address": format!("10.4.0.{}", 10 + i / 2), "port": "80"}))
                .collect();
            call(
                "POST",
                v("loadbalancer/pools"),
                Some(json!({"members": m})),
                Some("lbpool"),
            )
        }
        Op::Vs { pool, valid } => {
            let profiles = current(&v("loadbalancer/application-profiles"));
            let tcp = profiles["results"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["resource_type"] == "LbFastTcpProfile")
                .and_then(|p| p["id"].as_str())
                .unwrap_or("x")
                .to_string();
            let mut b = json!({"ip_address": if *valid { "198.51.100.7" } else { "nope" }, "port": "80", "application_profile_id": tcp});
            if let Some(p) = seen.pick_opt("lbpool", *pool) {
                b["pool_id"] = json!(p);
            }
            call(
                "POST",
                v("loadbalancer/virtual-servers"),
                Some(b),
                Some("vs"),
            )
        }
        Op::LbService { router, vs } => {
            let mut b = json!({"attachment": {"target_type": "LogicalRouter", "target_id": seen.pick("router", *router)}});
            if let Some(x) = seen.pick_opt("vs", *vs) {
                b["virtual_server_ids"] = json!([x]);
            }
            call(
                "POST",
                v("loadbalancer/services"),
                Some(b),
                Some("lbservice"),
            )
        }
        Op::DeleteLb { which, i } => {
            let (coll, kind) = [
                ("loadbalancer/services", "lbservice"),
                ("loadbalancer/virtual-servers", "vs"),
                ("loadbalancer/pools", "lbpool"),
            ][*which as usize % 3];
            call(
                "DELETE",
                v(&format!("{coll}/{}", seen.pick(kind, *i))),
                None,
                None,
            )
        }
        Op::Garbage { path, body } => {
            let p = [
                "logical-switches",
                "logical-ports",
                "pools/ip-pools",
                "firewall/sections",
                "ns-groups",
                "batch",
            ][*path as usize % 6];
            Call {
                method: "POST",
                path: v(p),
                body: None,
                raw: Some(body.clone()),
                remember: None,
            }
        }
        Op::Batch { atomic, a, b } => {
            let reqs: Vec<Value> = [a, b]
                .iter()
                .map(|o| {
                    let c = build(o, seen, nsx);
                    json!({"method": c.method, "uri": c.path.trim_start_matches("/api"), "body": c.body})
                })
                .collect();
            call(
                "POST",
                v(&format!("batch?atomic={atomic}")),
                Some(json!({"requests": reqs})),
                None,
            )
        }
    }
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let nsx = FakeNsxManager::new(ManagerConfig::default());
    let mut seen = Seen::default();
    for (i, op) in ops.iter().enumerate() {
        let c = build(op, &seen, &nsx);
        let (body, path, query) = c.parts();
        let before = nsx.state_json();
        let r = nsx.call_as_admin(ApiRequest {
            method: c.method,
            path: &path,
            query: &query,
            body: &body,
        });
        prop_assert!(
            r.status < 500,
            "step {i} {op:?}: {} {}",
            r.status,
            r.body.unwrap_or_default()
        );
        if r.status >= 400 {
            prop_assert_eq!(
                &nsx.state_json(),
                &before,
                "step {} {:?} was rejected ({}) but changed the store",
                i,
                op,
                r.status
            );
            let body = r.body.unwrap_or_default();
            prop_assert!(
                body.get("error_code").is_some() && body.get("httpStatus").is_some(),
                "no NSX error body: {}",
                body
            );
        } else if let (Some(kind), Some(id)) = (
            c.remember,
            r.body
                .as_ref()
                .and_then(|b| b.get("id"))
                .and_then(Value::as_str),
        ) {
            seen.0.entry(kind).or_default().push(id.to_string());
        }
        if let Err(e) = nsx.with_store(|s| s.check_invariants()) {
            return Err(TestCaseError::fail(format!(
                "step {i} {op:?}: invariant broken: {e}"
            )));
        }
        exercise_dataplane(&nsx);
    }
    Ok(())
}

/// Traces packets between the ports' addresses, from their VIFs, from outside and to every
/// virtual server, so that the dataplane's topology index and NSGroup memos are built before
/// the next request: `check_invariants` after that request proves what is still cached equal
/// to a rebuild and to the scans it replaces (a change that forgot to drop it fails there).
fn exercise_dataplane(nsx: &FakeNsxManager) {
    nsx.with_store(|s| {
        let addrs = s.port_addresses();
        let mut dsts: Vec<(String, u16)> = addrs
            .values()
            .flatten()
            .take(6)
            .map(|ip| (ip.clone(), 80))
            .collect();
        let mut entries: Vec<(Entry, String)> = Vec::new();
        for p in s.ids_of(Kind::LogicalPort).take(6) {
            let src = addrs
                .get(p)
                .and_then(|a| a.first())
                .cloned()
                .unwrap_or_else(|| "10.0.0.1".into());
            entries.push((Entry::LogicalPort(p.clone()), src.clone()));
            let ctx = s
                .object(p)
                .and_then(|o| o.doc.get("attachment"))
                .and_then(|a| a.get("context"));
            let vif = ctx
                .and_then(|c| c.get("parent_vif_id"))
                .and_then(Value::as_str);
            let tag = ctx
                .and_then(|c| c.get("traffic_tag"))
                .and_then(Value::as_u64);
            if let (Some(vif), Some(tag)) = (vif, tag.and_then(|t| u16::try_from(t).ok())) {
                entries.push((
                    Entry::Vif {
                        parent_vif_id: vif.to_string(),
                        vlan: tag,
                    },
                    src,
                ));
            }
        }
        entries.push((Entry::External, "203.0.113.9".into()));
        for vs in s.ids_of(Kind::LbVirtualServer) {
            let d = s.object(vs).map(|o| &o.doc);
            let ip = d.and_then(|d| d.get("ip_address")).and_then(Value::as_str);
            let port = d
                .and_then(|d| d.get("port"))
                .and_then(Value::as_str)
                .and_then(|p| p.parse().ok());
            if let (Some(ip), Some(port)) = (ip, port) {
                dsts.push((ip.to_string(), port));
            }
        }
        for (entry, src) in &entries {
            for (dst, port) in &dsts {
                for proto in [Protocol::Tcp, Protocol::Udp] {
                    s.trace_connection(entry, &Packet::new(src, dst, proto, 40_000, *port));
                }
            }
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_request_sequences_never_corrupt_the_store(ops in proptest::collection::vec(op(), 1..100)) {
        run(&ops)?;
    }
}

/// A manager whose clock is `now`, which the test moves per request, so that two managers fed
/// the same requests stamp the same times.
fn at(now: &Arc<AtomicI64>, state_file: Option<PathBuf>) -> ManagerConfig {
    let now = now.clone();
    ManagerConfig {
        clock: Clock::new(move || now.load(Ordering::SeqCst)),
        state_file,
        ..ManagerConfig::default()
    }
}

/// Runs `ops` on a manager with a state file and on one without; after `split` requests the
/// persisted one is dropped and opened again from its file (snapshot plus journal). Every
/// answer, before and after, must equal the unpersisted manager's, and so must the whole store
/// right after the reopen and at the end: replaying the journal gives back exactly what was
/// served, ids, allocations and revisions included.
fn run_persisted(ops: &[Op], split: usize) -> Result<(), TestCaseError> {
    static CASE: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fake-nsx-replay-{}-{}",
        std::process::id(),
        CASE.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("nsx.json");
    let now = Arc::new(AtomicI64::new(1_767_225_600_000));
    let reference = FakeNsxManager::new(at(&now, None));
    let mut persisted = FakeNsxManager::open(at(&now, Some(file.clone()))).unwrap();
    let split = split % (ops.len() + 1);
    let mut seen = Seen::default();
    for (i, op) in ops.iter().enumerate() {
        if i == split {
            let held = persisted.state_json();
            drop(persisted);
            persisted = FakeNsxManager::open(at(&now, Some(file.clone()))).unwrap();
            prop_assert_eq!(
                &persisted.state_json(),
                &held,
                "the store read back after {} requests differs",
                i
            );
        }
        now.fetch_add(37, Ordering::SeqCst);
        let c = build(op, &seen, &reference);
        let (body, path, query) = c.parts();
        let req = || ApiRequest {
            method: c.method,
            path: &path,
            query: &query,
            body: &body,
        };
        let want = reference.call_as_admin(req());
        let got = persisted.call_as_admin(req());
        prop_assert_eq!(&got, &want, "step {} {:?}", i, op);
        if let (true, Some(kind), Some(id)) = (
            want.status < 400,
            c.remember,
            want.body
                .as_ref()
                .and_then(|b| b.get("id"))
                .and_then(Value::as_str),
        ) {
            seen.0.entry(kind).or_default().push(id.to_string());
        }
    }
    prop_assert_eq!(persisted.state_json(), reference.state_json());
    drop(persisted);
    let reopened = FakeNsxManager::open(at(&now, Some(file))).unwrap();
    prop_assert_eq!(reopened.state_json(), reference.state_json());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 1000, ..ProptestConfig::default() })]

    #[test]
    fn the_state_file_gives_back_exactly_what_was_served(
        ops in proptest::collection::vec(op(), 1..80),
        split in any::<usize>(),
    ) {
        run_persisted(&ops, split)?;
    }
}
