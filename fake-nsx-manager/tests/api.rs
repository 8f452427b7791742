//! The fake NSX Manager through HTTP: every object type's CRUD and each documented semantic.

mod common;

use common::{Client, basic};
use serde_json::{Value, json};

fn tags(pairs: &[(&str, &str)]) -> Value {
    Value::Array(
        pairs
            .iter()
            .map(|(s, t)| json!({"scope": s, "tag": t}))
            .collect(),
    )
}

#[tokio::test]
async fn health_identity_and_tag_spec_answer_like_nsx_manager() {
    let c = Client::new();
    assert_eq!(
        c.get("reverse-proxy/node/health").await.expect(200).body,
        json!({"healthy": true})
    );
    let node = c.get("node").await.expect(200).body;
    assert!(node["node_version"].as_str().unwrap().starts_with("2.4"));
    let tag = c.get("spec/vmware/types/Tag").await.expect(200).body;
    assert_eq!(tag["properties"]["scope"]["maxLength"], 128);
    assert_eq!(tag["properties"]["tag"]["maxLength"], 256);
    let mr = c
        .get("spec/vmware/types/ManagedResource")
        .await
        .expect(200)
        .body;
    assert_eq!(mr["properties"]["tags"]["maxItems"], 30);
    let tz = c.get("transport-zones").await.expect(200).body;
    assert!(tz["result_count"].as_i64().unwrap() > 0);
    c.get("no-such-thing").await.expect(404);
}

#[tokio::test]
async fn unauthenticated_and_wrong_password_get_403_with_nsx_body() {
    let mut c = Client::new();
    c.auth = None;
    let a = c.get("logical-switches").await.expect(403);
    assert_eq!(a.code(), Some(403));
    assert_eq!(a.body["httpStatus"], "FORBIDDEN");
    c.auth = Some(basic("admin", "wrong"));
    assert_eq!(
        c.get("logical-switches").await.expect(403).code(),
        Some(403)
    );
}

#[tokio::test]
async fn session_login_gives_cookie_and_xsrf_and_an_expired_session_answers_98() {
    let c = Client::new();
    let login = c
        .raw(
            "POST",
            "/api/session/create",
            b"j_username=admin&j_password=admin",
            &[("content-type", "application/x-www-form-urlencoded")],
        )
        .await
        .expect(200);
    let set_cookie = login.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set_cookie.starts_with("JSESSIONID=") && set_cookie.contains(';'),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let xsrf = login.headers["x-xsrf-token"].to_str().unwrap().to_string();
    let mut s = c.as_user("x", "y");
    s.auth = None;
    s.extra = vec![
        ("cookie".into(), cookie.clone()),
        ("x-xsrf-token".into(), xsrf.clone()),
    ];
    s.get("logical-switches").await.expect(200);
    s.extra = vec![
        ("cookie".into(), cookie.clone()),
        ("x-xsrf-token".into(), "forged".into()),
    ];
    assert_eq!(s.get("logical-switches").await.expect(403).code(), Some(98));
    // A forged token is refused without ending the session: the client holding the right
    // token is not logged out by somebody else's bad request.
    s.extra = vec![
        ("cookie".into(), cookie.clone()),
        ("x-xsrf-token".into(), xsrf.clone()),
    ];
    s.get("logical-switches").await.expect(200);
    // A bad password is refused; a new login works, and expiry answers 98 again.
    let bad = c
        .raw(
            "POST",
            "/api/session/create",
            b"j_username=admin&j_password=nope",
            &[],
        )
        .await;
    assert_eq!(bad.status, 403);
    let (cookie, xsrf) = c.session().await;
    s.extra = vec![("cookie".into(), cookie), ("x-xsrf-token".into(), xsrf)];
    s.get("logical-switches").await.expect(200);
    c.nsx.expire_sessions();
    assert_eq!(s.get("logical-switches").await.expect(403).code(), Some(98));
}

#[tokio::test]
async fn an_auditor_reads_but_cannot_write() {
    let c = Client::new();
    let a = c.as_user("audit", "audit");
    a.get("logical-switches").await.expect(200);
    let tz = c.boot().transport_zone;
    a.post(
        "logical-switches",
        json!({"transport_zone_id": tz, "admin_state": "UP"}),
    )
    .await
    .expect(403);
}

#[tokio::test]
async fn logical_switch_crud_with_server_fields_revisions_and_immutable_fields() {
    let c = Client::new();
    let tz = c.boot().transport_zone;
    let created = c
        .post("logical-switches", json!({"transport_zone_id": tz, "admin_state": "UP", "tags": tags(&[("ncp/cluster", "k8s-a")])}))
        .await
        .expect(201);
    let id = created.id();
    let b = &created.body;
    assert_eq!(b["resource_type"], "LogicalSwitch");
    assert_eq!(b["_revision"], 0);
    assert_eq!(b["_create_user"], "admin");
    assert_eq!(b["display_name"], id.as_str());
    assert_eq!(b["replication_mode"], "MTEP");
    assert_eq!(b["_protection"], "NOT_PROTECTED");
    assert!(b["vni"].as_i64().unwrap() > 0);
    assert!(b["_create_time"].as_i64().unwrap() > 1_600_000_000_000);
    let mut doc = c
        .get(&format!("logical-switches/{id}"))
        .await
        .expect(200)
        .body;
    doc["display_name"] = json!("renamed");
    doc["vni"] = json!(1); // read-only: ignored
    let updated = c
        .put(&format!("logical-switches/{id}"), doc.clone())
        .await
        .expect(200)
        .body;
    assert_eq!(updated["_revision"], 1);
    assert_eq!(updated["display_name"], "renamed");
    assert_eq!(updated["vni"], b["vni"]);
    // The same stale body again: 412 with the configured error code.
    let stale = c
        .put(&format!("logical-switches/{id}"), doc.clone())
        .await
        .expect(412);
    assert_eq!(stale.code(), Some(208));
    assert_eq!(stale.body["httpStatus"], "PRECONDITION_FAILED");
    let mut no_rev = doc.clone();
    no_rev.as_object_mut().unwrap().remove("_revision");
    c.put(&format!("logical-switches/{id}"), no_rev)
        .await
        .expect(412);
    let mut moved = updated.clone();
    moved["transport_zone_id"] = json!("other");
    let e = c
        .put(&format!("logical-switches/{id}"), moved)
        .await
        .expect(400);
    assert!(
        e.body["error_message"]
            .as_str()
            .unwrap()
            .contains("transport_zone_id")
    );
    c.delete(&format!("logical-switches/{id}"))
        .await
        .expect(200);
    assert_eq!(
        c.get(&format!("logical-switches/{id}"))
            .await
            .expect(404)
            .code(),
        Some(202)
    );
    c.delete(&format!("logical-switches/{id}"))
        .await
        .expect(404);
    c.invariants();
}

#[tokio::test]
async fn bad_bodies_get_400_with_nsx_body_and_change_nothing() {
    let c = Client::new();
    let tz = c.boot().transport_zone;
    let before = c.nsx.state_json();
    let bad_json = c
        .raw("POST", "/api/v1/logical-switches", b"{not json", &[])
        .await
        .expect(400);
    assert_eq!(bad_json.body["httpStatus"], "BAD_REQUEST");
    assert!(
        bad_json.body["error_message"]
            .as_str()
            .unwrap()
            .contains("JSON")
    );
    for body in [
        json!({"admin_state": "UP"}),
        json!({"transport_zone_id": tz, "admin_state": 7}),
        json!({"transport_zone_id": tz, "admin_state": "UP", "tags": "x"}),
        json!({"transport_zone_id": tz, "admin_state": "UP", "resource_type": "Banana"}),
        json!({"transport_zone_id": "missing", "admin_state": "UP"}),
        json!({"transport_zone_id": tz, "admin_state": "UP", "display_name": "x".repeat(256)}),
        json!({"transport_zone_id": tz, "admin_state": "UP", "tags": (0..31).map(|i| json!({"scope": "s", "tag": i.to_string()})).collect::<Vec<_>>()}),
        json!({"transport_zone_id": tz, "admin_state": "UP", "tags": [{"scope": "s".repeat(129), "tag": "t"}]}),
        json!([1, 2]),
    ] {
        let a = c.post("logical-switches", body.clone()).await;
        assert_eq!(a.status, 400, "{body} -> {}", a.body);
        assert_eq!(a.body["httpStatus"], "BAD_REQUEST");
        assert!(a.code().is_some(), "{}", a.body);
    }
    assert_eq!(
        c.nsx.state_json(),
        before,
        "a rejected request changed the store"
    );
}

#[tokio::test]
async fn container_ports_get_ip_and_mac_from_the_switch_pool_and_release_them() {
    let c = Client::new();
    let (ls, pool) = c.switch_with_pool("10.9.0.0/24").await;
    let port = |tag: i64, cid: &str| {
        json!({"logical_switch_id": ls, "admin_state": "UP",
            "attachment": {"attachment_type": "VIF", "id": cid, "context": {"resource_type": "VifAttachmentContext",
                "vif_type": "CHILD", "parent_vif_id": "vif-node-1", "traffic_tag": tag, "app_id": "ns/pod", "allocate_addresses": "Both"}}})
    };
    let p1 = c
        .post("logical-ports", port(101, "c1"))
        .await
        .expect(201)
        .id();
    let p2 = c
        .post("logical-ports", port(102, "c2"))
        .await
        .expect(201)
        .id();
    let s1 = c
        .get(&format!("logical-ports/{p1}/state"))
        .await
        .expect(200)
        .body;
    let s2 = c
        .get(&format!("logical-ports/{p2}/state"))
        .await
        .expect(200)
        .body;
    let b1 = &s1["realized_bindings"][0]["binding"];
    let b2 = &s2["realized_bindings"][0]["binding"];
    assert_eq!(
        b1["ip_address"], "10.9.0.2",
        "the gateway .1 is never handed out"
    );
    assert_eq!(b2["ip_address"], "10.9.0.3");
    assert_eq!(b1["vlan"], 101);
    assert_ne!(b1["mac_address"], b2["mac_address"]);
    assert!(b1["mac_address"].as_str().unwrap().starts_with("02:50:56"));
    // The same VIF id cannot be attached twice; bad child contexts are rejected.
    c.post("logical-ports", port(103, "c1")).await.expect(400);
    let mut no_parent = port(104, "c9");
    no_parent["attachment"]["context"]
        .as_object_mut()
        .unwrap()
        .remove("parent_vif_id");
    c.post("logical-ports", no_parent).await.expect(400);
    c.post("logical-ports", port(5000, "c8")).await.expect(400);
    // Range .2-.6 holds five addresses: three more fit, the next is refused with 5109.
    for i in 0..3 {
        c.post("logical-ports", port(110 + i, &format!("x{i}")))
            .await
            .expect(201);
    }
    assert_eq!(
        c.post("logical-ports", port(120, "y"))
            .await
            .expect(400)
            .code(),
        Some(5109)
    );
    let usage = c
        .get(&format!("pools/ip-pools/{pool}"))
        .await
        .expect(200)
        .body["pool_usage"]
        .clone();
    assert_eq!(
        usage,
        json!({"total_ids": 5, "allocated_ids": 5, "free_ids": 0})
    );
    // An attached port needs detach=true; then its address is free again.
    assert_eq!(
        c.delete(&format!("logical-ports/{p1}"))
            .await
            .expect(400)
            .code(),
        Some(8402)
    );
    c.delete(&format!("logical-ports/{p1}?detach=true"))
        .await
        .expect(200);
    let p3 = c
        .post("logical-ports", port(130, "z"))
        .await
        .expect(201)
        .id();
    let s3 = c
        .get(&format!("logical-ports/{p3}/state"))
        .await
        .expect(200)
        .body;
    assert_eq!(
        s3["realized_bindings"][0]["binding"]["ip_address"],
        "10.9.0.2"
    );
    // Filters NCP uses.
    let children = c
        .get(&format!(
            "logical-ports?logical_switch_id={ls}&container_ports_only=true"
        ))
        .await
        .expect(200)
        .body;
    assert_eq!(children["result_count"], 5);
    let by_parent = c
        .get("logical-ports?parent_vif_id=vif-node-1&attachment_id=c2")
        .await
        .expect(200)
        .body;
    assert_eq!(by_parent["results"][0]["id"], p2.as_str());
    c.invariants();
}

#[tokio::test]
async fn switch_delete_needs_cascade_and_detach_for_attached_ports() {
    let c = Client::new();
    let (ls, _) = c.switch_with_pool("10.9.0.0/24").await;
    c.post(
        "logical-ports",
        json!({"logical_switch_id": ls, "admin_state": "UP"}),
    )
    .await
    .expect(201);
    c.post("logical-ports", json!({"logical_switch_id": ls, "admin_state": "UP", "attachment": {"attachment_type": "VIF", "id": "vm"}}))
        .await
        .expect(201);
    c.delete(&format!("logical-switches/{ls}"))
        .await
        .expect(400);
    assert_eq!(
        c.delete(&format!("logical-switches/{ls}?cascade=true"))
            .await
            .expect(400)
            .code(),
        Some(8402)
    );
    c.delete(&format!("logical-switches/{ls}?cascade=true&detach=true"))
        .await
        .expect(200);
    assert_eq!(
        c.get(&format!("logical-ports?logical_switch_id={ls}"))
            .await
            .body["result_count"],
        0
    );
    c.invariants();
}

#[tokio::test]
async fn tier1_links_to_tier0_and_downlinks_attach_switch_ports() {
    let c = Client::new();
    let t0 = c.boot().tier0_router;
    let t1 = c
        .post(
            "logical-routers",
            json!({"router_type": "TIER1", "display_name": "k8s-a-shop"}),
        )
        .await
        .expect(201)
        .id();
    c.post(
        "logical-router-ports",
        json!({"resource_type": "LogicalRouterLinkPortOnTIER0", "logical_router_id": t1}),
    )
    .await
    .expect(400);
    let t0p = c
        .post(
            "logical-router-ports",
            json!({"resource_type": "LogicalRouterLinkPortOnTIER0", "logical_router_id": t0}),
        )
        .await
        .expect(201)
        .id();
    let t1p = c
        .post("logical-router-ports", json!({"resource_type": "LogicalRouterLinkPortOnTIER1", "logical_router_id": t1, "linked_logical_router_port_id": {"target_id": t0p}}))
        .await
        .expect(201)
        .id();
    assert_eq!(
        c.get(&format!("logical-router-ports/{t0p}")).await.body["linked_logical_router_port_id"],
        t1p.as_str()
    );
    // One T0 port links one T1 port; one T1 links once.
    let t1b = c
        .post("logical-routers", json!({"router_type": "TIER1"}))
        .await
        .expect(201)
        .id();
    c.post("logical-router-ports", json!({"resource_type": "LogicalRouterLinkPortOnTIER1", "logical_router_id": t1b, "linked_logical_router_port_id": {"target_id": t0p}}))
        .await
        .expect(400);
    c.delete(&format!("logical-router-ports/{t0p}"))
        .await
        .expect(400);
    // Downlink to a switch port.
    let (ls, _) = c.switch_with_pool("10.9.0.0/24").await;
    let lsp = c
        .post(
            "logical-ports",
            json!({"logical_switch_id": ls, "admin_state": "UP"}),
        )
        .await
        .expect(201)
        .id();
    let dl = c
        .post("logical-router-ports", json!({"resource_type": "LogicalRouterDownLinkPort", "logical_router_id": t1,
            "linked_logical_switch_port_id": {"target_id": lsp}, "subnets": [{"ip_addresses": ["10.9.0.1"], "prefix_length": 24}]}))
        .await
        .expect(201)
        .id();
    let port = c.get(&format!("logical-ports/{lsp}")).await.body;
    assert_eq!(
        port["attachment"],
        json!({"attachment_type": "LOGICALROUTER", "id": dl})
    );
    let lsp2 = c
        .post(
            "logical-ports",
            json!({"logical_switch_id": ls, "admin_state": "UP"}),
        )
        .await
        .expect(201)
        .id();
    c.post("logical-router-ports", json!({"resource_type": "LogicalRouterDownLinkPort", "logical_router_id": t1,
        "linked_logical_switch_port_id": {"target_id": lsp2}, "subnets": [{"ip_addresses": ["10.9.0.129"], "prefix_length": 25}]}))
        .await
        .expect(400);
    c.delete(&format!("logical-ports/{lsp}?detach=true"))
        .await
        .expect(400);
    assert_eq!(
        c.get(&format!("logical-router-ports?logical_switch_id={ls}"))
            .await
            .body["result_count"],
        1
    );
    // A router with ports needs force; force cleans up every link.
    c.delete(&format!("logical-routers/{t1}")).await.expect(400);
    c.delete(&format!("logical-routers/{t1}?force=true"))
        .await
        .expect(200);
    assert!(
        c.get(&format!("logical-router-ports/{t0p}"))
            .await
            .body
            .get("linked_logical_router_port_id")
            .is_none()
    );
    assert!(
        c.get(&format!("logical-ports/{lsp}"))
            .await
            .body
            .get("attachment")
            .is_none()
    );
    c.delete(&format!("logical-router-ports/{t0p}"))
        .await
        .expect(200);
    c.invariants();
}

#[tokio::test]
async fn route_advertisement_is_revisioned() {
    let c = Client::new();
    let t1 = c
        .post("logical-routers", json!({"router_type": "TIER1"}))
        .await
        .expect(201)
        .id();
    let path = format!("logical-routers/{t1}/routing/advertisement");
    let mut adv = c.get(&path).await.expect(200).body;
    assert_eq!(adv["_revision"], 0);
    adv["advertise_nsx_connected_routes"] = json!(true);
    let done = c.put(&path, adv.clone()).await.expect(200).body;
    assert_eq!(done["_revision"], 1);
    assert_eq!(
        c.get(&path).await.body["advertise_nsx_connected_routes"],
        true
    );
    c.put(&path, adv).await.expect(412);
    c.get("logical-routers/missing/routing/advertisement")
        .await
        .expect(404);
}

#[tokio::test]
async fn block_subnets_are_carved_aligned_reused_and_guarded() {
    let c = Client::new();
    let block = c
        .post("pools/ip-blocks", json!({"cidr": "10.20.0.0/22"}))
        .await
        .expect(201)
        .id();
    c.post("pools/ip-blocks", json!({"cidr": "10.20.0.1/22"}))
        .await
        .expect(400);
    let s = |size: i64| json!({"block_id": block, "size": size});
    let a = c.post("pools/ip-subnets", s(256)).await.expect(201).body;
    assert_eq!(a["cidr"], "10.20.0.0/24");
    assert_eq!(
        a["allocation_ranges"],
        json!([{"start": "10.20.0.1", "end": "10.20.0.254"}])
    );
    let b = c.post("pools/ip-subnets", s(512)).await.expect(201).body;
    assert_eq!(b["cidr"], "10.20.2.0/23", "aligned to its size");
    let small = c.post("pools/ip-subnets", s(128)).await.expect(201).body;
    assert_eq!(small["cidr"], "10.20.1.0/25");
    c.post("pools/ip-subnets", s(100)).await.expect(400);
    c.post("pools/ip-subnets", s(512)).await.expect(409);
    let aid = a["id"].as_str().unwrap();
    c.put(&format!("pools/ip-subnets/{aid}"), a.clone())
        .await
        .expect(405);
    let got = c
        .post(
            &format!("pools/ip-subnets/{aid}?action=ALLOCATE"),
            json!({"allocation_id": null}),
        )
        .await
        .expect(200)
        .body;
    assert_eq!(got["allocation_id"], "10.20.0.1");
    c.delete(&format!("pools/ip-subnets/{aid}"))
        .await
        .expect(400);
    c.post(
        &format!("pools/ip-subnets/{aid}?action=RELEASE"),
        json!({"allocation_id": "10.20.0.1"}),
    )
    .await
    .expect(200);
    c.delete(&format!("pools/ip-blocks/{block}"))
        .await
        .expect(400);
    c.delete(&format!("pools/ip-subnets/{aid}"))
        .await
        .expect(200);
    assert_eq!(
        c.post("pools/ip-subnets", s(256)).await.expect(201).body["cidr"],
        "10.20.0.0/24"
    );
    assert_eq!(
        c.get(&format!("pools/ip-subnets?block_id={block}"))
            .await
            .body["result_count"],
        3
    );
    c.invariants();
}

#[tokio::test]
async fn ip_pool_allocate_release_errors_and_delete_rules() {
    let c = Client::new();
    let pool = c
        .post("pools/ip-pools", json!({"subnets": [{"cidr": "192.0.2.0/29", "gateway_ip": "192.0.2.1", "allocation_ranges": [{"start": "192.0.2.1", "end": "192.0.2.4"}]}]}))
        .await
        .expect(201)
        .id();
    let alloc_path = format!("pools/ip-pools/{pool}?action=ALLOCATE");
    let alloc = |ip: Value| c.post(&alloc_path, json!({"allocation_id": ip}));
    assert_eq!(
        alloc(Value::Null).await.expect(200).body["allocation_id"],
        "192.0.2.2"
    );
    assert_eq!(
        alloc(json!("192.0.2.4")).await.expect(200).body["allocation_id"],
        "192.0.2.4"
    );
    assert_eq!(
        alloc(json!("192.0.2.4")).await.expect(400).code(),
        Some(5141)
    );
    assert_eq!(
        alloc(json!("192.0.2.7")).await.expect(400).code(),
        Some(5110)
    );
    assert_eq!(
        alloc(Value::Null).await.expect(200).body["allocation_id"],
        "192.0.2.3"
    );
    assert_eq!(alloc(Value::Null).await.expect(400).code(), Some(5109));
    let list = c
        .get(&format!("pools/ip-pools/{pool}/allocations"))
        .await
        .expect(200)
        .body;
    assert_eq!(list["result_count"], 3);
    let rel = c
        .post(
            &format!("pools/ip-pools/{pool}?action=RELEASE"),
            json!({"allocation_id": "192.0.2.3"}),
        )
        .await
        .expect(200);
    assert_eq!(rel.body, Value::Null, "RELEASE answers with an empty body");
    c.post(
        &format!("pools/ip-pools/{pool}?action=RELEASE"),
        json!({"allocation_id": "192.0.2.3"}),
    )
    .await
    .expect(400);
    c.post(&format!("pools/ip-pools/{pool}?action=FROB"), json!({}))
        .await
        .expect(400);
    // Shrinking the ranges below an allocated address is refused.
    let mut doc = c.get(&format!("pools/ip-pools/{pool}")).await.body;
    doc["subnets"][0]["allocation_ranges"] = json!([{"start": "192.0.2.1", "end": "192.0.2.2"}]);
    c.put(&format!("pools/ip-pools/{pool}"), doc)
        .await
        .expect(400);
    c.delete(&format!("pools/ip-pools/{pool}"))
        .await
        .expect(400);
    c.delete(&format!("pools/ip-pools/{pool}?force=true"))
        .await
        .expect(200);
    let (_, used) = c.switch_with_pool("10.9.0.0/24").await;
    c.delete(&format!("pools/ip-pools/{used}?force=true"))
        .await
        .expect(400);
    c.post("pools/ip-pools", json!({"subnets": [{"cidr": "10.0.0.0/24", "allocation_ranges": [{"start": "10.0.1.1", "end": "10.0.1.5"}]}]}))
        .await
        .expect(400);
    c.invariants();
}

#[tokio::test]
async fn nat_rules_live_under_their_router_with_numeric_ids() {
    let c = Client::new();
    let t0 = c.boot().tier0_router;
    let base = format!("logical-routers/{t0}/nat/rules");
    let r = c
        .post(&base, json!({"action": "SNAT", "match_source_network": "10.4.0.0/24", "translated_network": "192.0.2.5", "tags": tags(&[("ncp/cluster", "k8s-a")])}))
        .await
        .expect(201)
        .body;
    let id = r["id"].as_str().unwrap().to_string();
    assert!(id.parse::<u64>().is_ok(), "{id}");
    assert_eq!(r["rule_priority"], 1024);
    assert_eq!(r["logical_router_id"], t0.as_str());
    c.post(
        &base,
        json!({"action": "SNAT", "match_source_network": "10.4.1.0/24"}),
    )
    .await
    .expect(400);
    c.post(
        &base,
        json!({"action": "SNAT", "translated_network": "not-an-ip"}),
    )
    .await
    .expect(400);
    assert_eq!(c.get(&base).await.expect(200).body["result_count"], 1);
    // The real manager answers 400 for a missing NAT rule.
    c.get(&format!("{base}/99999")).await.expect(400);
    let mut doc = c.get(&format!("{base}/{id}")).await.expect(200).body;
    doc["translated_network"] = json!("192.0.2.6");
    assert_eq!(
        c.put(&format!("{base}/{id}"), doc).await.expect(200).body["_revision"],
        1
    );
    c.post(
        "logical-routers/missing/nat/rules",
        json!({"action": "NO_NAT"}),
    )
    .await
    .expect(404);
    c.delete(&format!("{base}/{id}")).await.expect(200);
    assert_eq!(c.get(&base).await.body["result_count"], 0);
    c.invariants();
}

#[tokio::test]
async fn nsgroups_tag_criteria_members_actions_effective_members_and_page_size() {
    let c = Client::new();
    let (ls, _) = c.switch_with_pool("10.9.0.0/24").await;
    let mut ports = Vec::new();
    for (i, app) in ["web", "web", "db"].iter().enumerate() {
        let p = c
            .post("logical-ports", json!({"logical_switch_id": ls, "admin_state": "UP",
                "attachment": {"attachment_type": "VIF", "id": format!("c{i}"), "context": {"resource_type": "VifAttachmentContext", "vif_type": "CHILD", "parent_vif_id": "v", "traffic_tag": 10 + i, "allocate_addresses": "Both"}},
                "tags": tags(&[("ncp/cluster", "k8s-a"), ("app", app)])}))
            .await
            .expect(201)
            .id();
        ports.push(p);
    }
    let g = c
        .post("ns-groups", json!({"display_name": "web", "membership_criteria": [
            {"resource_type": "NSGroupComplexExpression", "expressions": [
                {"resource_type": "NSGroupTagExpression", "target_type": "LogicalPort", "scope": "ncp/cluster", "scope_op": "EQUALS", "tag": "k8s-a", "tag_op": "EQUALS"},
                {"resource_type": "NSGroupTagExpression", "target_type": "LogicalPort", "scope": "app", "tag": "web"}]}]}))
        .await
        .expect(201)
        .id();
    let eff = c
        .get(&format!("ns-groups/{g}/effective-logical-port-members"))
        .await
        .expect(200)
        .body;
    let mut got: Vec<String> = eff["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["target_id"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    let mut want = vec![ports[0].clone(), ports[1].clone()];
    want.sort();
    assert_eq!(got, want);
    let ips = c
        .get(&format!("ns-groups/{g}/effective-ip-address-members"))
        .await
        .expect(200)
        .body;
    assert_eq!(ips["result_count"], 2);
    let member = json!({"resource_type": "NSGroupSimpleExpression", "target_type": "LogicalPort", "target_property": "id", "op": "EQUALS", "value": ports[2]});
    let after = c
        .post(
            &format!("ns-groups/{g}?action=ADD_MEMBERS"),
            json!({"members": [member.clone()]}),
        )
        .await
        .expect(200)
        .body;
    assert_eq!(after["_revision"], 1);
    assert_eq!(
        c.get(&format!("ns-groups/{g}/effective-logical-port-members"))
            .await
            .body["result_count"],
        3
    );
    c.post(
        &format!("ns-groups/{g}?action=REMOVE_MEMBERS"),
        json!({"members": [member]}),
    )
    .await
    .expect(200);
    assert_eq!(
        c.get(&format!("ns-groups/{g}/effective-logical-port-members"))
            .await
            .body["result_count"],
        2
    );
    let dangling = json!({"resource_type": "NSGroupSimpleExpression", "target_type": "LogicalPort", "target_property": "id", "op": "EQUALS", "value": "nope"});
    c.post(
        &format!("ns-groups/{g}?action=ADD_MEMBERS"),
        json!({"members": [dangling]}),
    )
    .await
    .expect(400);
    c.post("ns-groups", json!({"membership_criteria": [{"resource_type": "NSGroupTagExpression", "target_type": "LogicalPort", "scope": "a", "scope_op": "CONTAINS"}]}))
        .await
        .expect(400);
    for i in 0..60 {
        c.post("ns-groups", json!({"display_name": format!("g{i}")}))
            .await
            .expect(201);
    }
    let page = c.get("ns-groups?page_size=1000").await.expect(200).body;
    assert_eq!(
        page["results"].as_array().unwrap().len(),
        50,
        "NSGroup pages hold at most 50"
    );
    assert_eq!(page["result_count"], 61);
    assert_eq!(page["cursor"], "50");
    c.invariants();
}

#[tokio::test]
async fn ipsets_and_nsservices_validate_and_modify() {
    let c = Client::new();
    c.post("ip-sets", json!({"ip_addresses": ["10.0.0.1", "bogus"]}))
        .await
        .expect(400);
    let s = c
        .post(
            "ip-sets",
            json!({"ip_addresses": ["10.0.0.0/24", "10.1.0.1-10.1.0.9"]}),
        )
        .await
        .expect(201)
        .id();
    c.post(
        &format!("ip-sets/{s}?action=add_ip"),
        json!({"ip_address": "172.16.0.1"}),
    )
    .await
    .expect(200);
    c.post(
        &format!("ip-sets/{s}?action=add_ip"),
        json!({"ip_address": "172.16.0.1"}),
    )
    .await
    .expect(400);
    c.post(
        &format!("ip-sets/{s}?action=remove_ip"),
        json!({"ip_address": "10.0.0.0/24"}),
    )
    .await
    .expect(200);
    let doc = c.get(&format!("ip-sets/{s}")).await.body;
    assert_eq!(
        doc["ip_addresses"],
        json!(["10.1.0.1-10.1.0.9", "172.16.0.1"])
    );
    assert_eq!(doc["_revision"], 2);
    c.post("ns-services", json!({"nsservice_element": {"resource_type": "L4PortSetNSService", "l4_protocol": "TCP", "destination_ports": ["70000"]}}))
        .await
        .expect(400);
    c.post("ns-services", json!({"nsservice_element": {"resource_type": "L4PortSetNSService", "l4_protocol": "SCTP", "destination_ports": ["80"]}}))
        .await
        .expect(400);
    c.post("ns-services", json!({"nsservice_element": {"resource_type": "L4PortSetNSService", "l4_protocol": "TCP", "destination_ports": ["80", "8000-8080"]}}))
        .await
        .expect(201);
}

async fn section_order(c: &Client) -> Vec<String> {
    c.get("firewall/sections").await.expect(200).body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["display_name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn firewall_sections_keep_their_order_and_the_default_section_stays_last() {
    let c = Client::new();
    let sec =
        |name: &str| json!({"display_name": name, "section_type": "LAYER3", "stateful": true});
    let a = c.post("firewall/sections", sec("A")).await.expect(201).id();
    c.post("firewall/sections?operation=insert_top", sec("B"))
        .await
        .expect(201);
    c.post(
        &format!("firewall/sections?operation=insert_after&id={a}"),
        sec("C"),
    )
    .await
    .expect(201);
    c.post(
        &format!("firewall/sections?operation=insert_before&id={a}"),
        sec("D"),
    )
    .await
    .expect(201);
    assert_eq!(
        section_order(&c).await,
        ["B", "D", "A", "C", "Default Layer3 Section"]
    );
    let default = c.boot().default_section;
    c.post(
        &format!("firewall/sections?operation=insert_after&id={default}"),
        sec("E"),
    )
    .await
    .expect(400);
    c.post("firewall/sections?operation=insert_before", sec("E"))
        .await
        .expect(400);
    c.post(
        "firewall/sections",
        json!({"display_name": "x", "section_type": "LAYER3"}),
    )
    .await
    .expect(400);
    // revise moves a section.
    let doc = c.get(&format!("firewall/sections/{a}")).await.body;
    c.post(
        &format!("firewall/sections/{a}?action=revise&operation=insert_top"),
        doc.clone(),
    )
    .await
    .expect(200);
    assert_eq!(
        section_order(&c).await,
        ["A", "B", "D", "C", "Default Layer3 Section"]
    );
    c.post(
        &format!("firewall/sections/{a}?action=revise&operation=insert_top"),
        doc,
    )
    .await
    .expect(409);
    c.delete(&format!("firewall/sections/{default}"))
        .await
        .expect(400);
    c.invariants();
}

#[tokio::test]
async fn firewall_rules_need_the_section_revision_and_the_default_rule_stays_last() {
    let c = Client::new();
    let g = c
        .post("ns-groups", json!({"display_name": "g"}))
        .await
        .expect(201)
        .id();
    let created = c
        .post("firewall/sections?action=create_with_rules", json!({"display_name": "np", "section_type": "LAYER3", "stateful": true,
            "rules": [{"display_name": "r1", "action": "ALLOW", "sources": [{"target_type": "NSGroup", "target_id": g}]},
                      {"display_name": "r2", "action": "DROP", "services": [{"service": {"resource_type": "L4PortSetNSService", "l4_protocol": "TCP", "destination_ports": ["80"]}}]}]}))
        .await
        .expect(201)
        .body;
    let s = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["rules"].as_array().unwrap().len(), 2);
    assert_eq!(created["rule_count"], 2);
    let r1 = created["rules"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(created["rules"][0]["section_id"], s.as_str());
    let rev = created["_revision"].as_i64().unwrap();
    let rules = format!("firewall/sections/{s}/rules");
    c.post(&rules, json!({"display_name": "r0", "action": "ALLOW"}))
        .await
        .expect(409);
    c.post(
        &rules,
        json!({"display_name": "r0", "action": "ALLOW", "_revision": rev + 5}),
    )
    .await
    .expect(409);
    let r0 = c
        .post(
            &format!("{rules}?operation=insert_top"),
            json!({"display_name": "r0", "action": "ALLOW", "_revision": rev}),
        )
        .await
        .expect(200)
        .body;
    assert_eq!(
        c.get(&format!("firewall/sections/{s}")).await.body["_revision"],
        rev + 1
    );
    let names: Vec<String> = c.get(&rules).await.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["display_name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["r0", "r1", "r2"]);
    c.post(&rules, json!({"display_name": "bad", "action": "ALLOW", "_revision": rev + 1, "sources": [{"target_type": "NSGroup", "target_id": "missing"}]}))
        .await
        .expect(400);
    let multi = c
        .post(&format!("{rules}?action=create_multiple&operation=insert_after&id={r1}"), json!({"rules": [
            {"display_name": "m1", "action": "ALLOW", "_revision": rev + 1}, {"display_name": "m2", "action": "ALLOW", "_revision": rev + 1}]}))
        .await
        .expect(200)
        .body;
    assert_eq!(multi["rules"].as_array().unwrap().len(), 2);
    let names: Vec<String> = c.get(&rules).await.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["display_name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["r0", "r1", "m1", "m2", "r2"]);
    // Stale rule PUT: 409.
    let r0id = r0["id"].as_str().unwrap();
    let mut doc = c.get(&format!("{rules}/{r0id}")).await.body;
    doc["action"] = json!("DROP");
    c.put(&format!("{rules}/{r0id}"), doc.clone())
        .await
        .expect(200);
    c.put(&format!("{rules}/{r0id}"), doc).await.expect(409);
    // A section with rules needs cascade.
    c.delete(&format!("firewall/sections/{s}"))
        .await
        .expect(400);
    // update_with_rules replaces the rule list.
    let mut full = c
        .post(
            &format!("firewall/sections/{s}?action=list_with_rules"),
            json!({}),
        )
        .await
        .expect(200)
        .body;
    let keep = full["rules"][1].clone();
    full["rules"] = json!([keep, {"display_name": "new", "action": "REJECT"}]);
    let upd = c
        .post(
            &format!("firewall/sections/{s}?action=update_with_rules"),
            full.clone(),
        )
        .await
        .expect(200)
        .body;
    let names: Vec<&str> = upd["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["display_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["r1", "new"]);
    assert_eq!(upd["rules"][0]["id"], r1.as_str());
    c.post(
        &format!("firewall/sections/{s}?action=update_with_rules"),
        full,
    )
    .await
    .expect(409);
    // The default rule.
    let default = c.boot().default_section;
    let drules = c
        .get(&format!("firewall/sections/{default}/rules"))
        .await
        .body;
    let default_rule = drules["results"][0]["id"].as_str().unwrap().to_string();
    let drev = c.get(&format!("firewall/sections/{default}")).await.body["_revision"]
        .as_i64()
        .unwrap();
    assert_eq!(
        c.delete(&format!("firewall/sections/{default}/rules/{default_rule}"))
            .await
            .expect(400)
            .code(),
        Some(100077)
    );
    c.post(
        &format!("firewall/sections/{default}/rules?operation=insert_after&id={default_rule}"),
        json!({"action": "DROP", "_revision": drev}),
    )
    .await
    .expect(400);
    c.post(
        &format!("firewall/sections/{default}/rules"),
        json!({"display_name": "late", "action": "DROP", "_revision": drev}),
    )
    .await
    .expect(200);
    let last = c
        .get(&format!("firewall/sections/{default}/rules"))
        .await
        .body["results"]
        .as_array()
        .unwrap()
        .last()
        .cloned()
        .unwrap();
    assert_eq!(
        last["id"],
        default_rule.as_str(),
        "the default rule stays last"
    );
    // The group is referenced by r1 now: delete needs force.
    c.delete(&format!("ns-groups/{g}")).await.expect(400);
    c.delete(&format!("firewall/sections/{s}?cascade=true"))
        .await
        .expect(200);
    c.delete(&format!("ns-groups/{g}")).await.expect(200);
    c.invariants();
}

#[tokio::test]
async fn load_balancer_objects_reference_each_other_and_guard_deletes() {
    let c = Client::new();
    let profiles = c
        .get("loadbalancer/application-profiles")
        .await
        .expect(200)
        .body;
    let tcp = profiles["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["resource_type"] == "LbFastTcpProfile")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let udp = profiles["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["resource_type"] == "LbFastUdpProfile")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    c.delete(&format!("loadbalancer/application-profiles/{tcp}"))
        .await
        .expect(400);
    let pool = c
        .post(
            "loadbalancer/pools",
            json!({"members": [{"ip_address": "10.4.0.5", "port": "8080"}]}),
        )
        .await
        .expect(201)
        .body;
    assert_eq!(pool["algorithm"], "ROUND_ROBIN");
    assert_eq!(pool["members"][0]["weight"], 1);
    let pool = pool["id"].as_str().unwrap().to_string();
    c.post(
        "loadbalancer/pools",
        json!({"members": [{"ip_address": "10.4.0.5"}, {"ip_address": "10.4.0.5"}]}),
    )
    .await
    .expect(400);
    c.post(
        "loadbalancer/virtual-servers",
        json!({"ip_address": "198.51.100.10", "port": "80", "application_profile_id": "nope"}),
    )
    .await
    .expect(400);
    c.post("loadbalancer/virtual-servers", json!({"ip_address": "198.51.100.10", "port": "80", "ip_protocol": "UDP", "application_profile_id": tcp})).await.expect(400);
    c.post(
        "loadbalancer/virtual-servers",
        json!({"ip_address": "198.51.100.10", "application_profile_id": tcp}),
    )
    .await
    .expect(400);
    let vs = c
        .post("loadbalancer/virtual-servers", json!({"ip_address": "198.51.100.10", "port": "80", "application_profile_id": tcp, "pool_id": pool}))
        .await
        .expect(201)
        .id();
    c.post("loadbalancer/virtual-servers", json!({"ip_address": "198.51.100.11", "port": "53", "ip_protocol": "UDP", "application_profile_id": udp})).await.expect(201);
    let t0 = c.boot().tier0_router;
    c.post(
        "loadbalancer/services",
        json!({"attachment": {"target_type": "LogicalRouter", "target_id": t0}}),
    )
    .await
    .expect(400);
    let t1 = c
        .post("logical-routers", json!({"router_type": "TIER1"}))
        .await
        .expect(201)
        .id();
    // A load balancer runs on its tier-1's edges: none, no LB service.
    let e = c
        .post("loadbalancer/services", json!({"attachment": {"target_type": "LogicalRouter", "target_id": t1}, "virtual_server_ids": [vs]}))
        .await
        .expect(400)
        .body;
    assert!(
        e["error_message"]
            .as_str()
            .unwrap()
            .contains("no edge cluster"),
        "{e}"
    );
    // The edge clusters answer; a router names one that exists.
    let edges = c.get("edge-clusters").await.expect(200).body;
    let edge = c.boot().edge_cluster;
    assert_eq!(edges["results"][0]["id"], edge.as_str());
    assert_eq!(edges["results"][0]["resource_type"], "EdgeCluster");
    c.get(&format!("edge-clusters/{edge}")).await.expect(200);
    let mut router = c
        .get(&format!("logical-routers/{t1}"))
        .await
        .expect(200)
        .body;
    router["edge_cluster_id"] = json!("no-such-edges");
    c.put(&format!("logical-routers/{t1}"), router.clone())
        .await
        .expect(400);
    router["edge_cluster_id"] = json!(edge);
    c.put(&format!("logical-routers/{t1}"), router)
        .await
        .expect(200);
    let lb = c
        .post("loadbalancer/services", json!({"attachment": {"target_type": "LogicalRouter", "target_id": t1}, "virtual_server_ids": [vs]}))
        .await
        .expect(201)
        .body;
    // Its status, as the manager reports it without health monitors: every enabled member is
    // UP, on the edge cluster's first member (the second standing by).
    let status = c
        .get(&format!(
            "loadbalancer/services/{}/status",
            lb["id"].as_str().unwrap()
        ))
        .await
        .expect(200)
        .body;
    assert_eq!(status["service_status"], "UP", "{status}");
    assert_eq!(
        status["virtual_servers"][0]["virtual_server_id"],
        vs.as_str()
    );
    assert_eq!(status["virtual_servers"][0]["status"], "UP");
    assert_eq!(status["pools"][0]["pool_id"], pool.as_str());
    assert_eq!(status["pools"][0]["members"][0]["status"], "UP");
    assert_eq!(status["active_transport_nodes"], json!(["edge-node-1"]));
    assert_eq!(status["standby_transport_nodes"], json!(["edge-node-2"]));
    c.get("loadbalancer/services/nope/status").await.expect(404);
    // Neither the edge cluster nor the tier-1's hold on it goes while in use.
    c.delete(&format!("edge-clusters/{edge}")).await.expect(400);
    let mut router = c
        .get(&format!("logical-routers/{t1}"))
        .await
        .expect(200)
        .body;
    router.as_object_mut().unwrap().remove("edge_cluster_id");
    c.put(&format!("logical-routers/{t1}"), router)
        .await
        .expect(400);
    assert_eq!(lb["size"], "SMALL");
    c.post(
        "loadbalancer/services",
        json!({"attachment": {"target_type": "LogicalRouter", "target_id": t1}}),
    )
    .await
    .expect(400);
    c.delete(&format!("logical-routers/{t1}?force=true"))
        .await
        .expect(400);
    c.delete(&format!("loadbalancer/pools/{pool}"))
        .await
        .expect(400);
    c.delete(&format!("loadbalancer/virtual-servers/{vs}"))
        .await
        .expect(400);
    let m = c
        .post(
            &format!("loadbalancer/pools/{pool}?action=ADD_MEMBERS"),
            json!({"members": [{"ip_address": "10.4.0.6", "port": "8080"}]}),
        )
        .await
        .expect(200)
        .body;
    assert_eq!(m["members"].as_array().unwrap().len(), 2);
    c.post(
        &format!("loadbalancer/pools/{pool}?action=ADD_MEMBERS"),
        json!({"members": [{"ip_address": "10.4.0.6", "port": "8080"}]}),
    )
    .await
    .expect(400);
    c.post(
        &format!("loadbalancer/pools/{pool}?action=UPDATE_MEMBERS"),
        json!({"members": [{"ip_address": "10.4.0.6", "port": "8080", "admin_state": "DISABLED"}]}),
    )
    .await
    .expect(200);
    let m = c
        .post(
            &format!("loadbalancer/pools/{pool}?action=REMOVE_MEMBERS"),
            json!({"members": [{"ip_address": "10.4.0.5", "port": "8080"}]}),
        )
        .await
        .expect(200)
        .body;
    assert_eq!(
        m["members"],
        json!([{"ip_address": "10.4.0.6", "port": "8080", "admin_state": "DISABLED", "weight": 1, "backup_member": false}])
    );
    c.delete(&format!(
        "loadbalancer/services/{}",
        lb["id"].as_str().unwrap()
    ))
    .await
    .expect(200);
    c.delete(&format!("loadbalancer/virtual-servers/{vs}"))
        .await
        .expect(200);
    c.delete(&format!("loadbalancer/pools/{pool}"))
        .await
        .expect(200);
    c.invariants();
}

#[tokio::test]
async fn lists_page_with_numeric_cursors_sort_and_project_fields() {
    let c = Client::new();
    for i in 0..25 {
        c.post("ip-sets", json!({"display_name": format!("set-{i:02}")}))
            .await
            .expect(201);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "ip-sets?page_size=10".to_string(),
            Some(cur) => format!("ip-sets?page_size=10&cursor={cur}"),
        };
        let page = c.get(&path).await.expect(200).body;
        assert_eq!(page["result_count"], 25);
        for r in page["results"].as_array().unwrap() {
            seen.push(r["id"].as_str().unwrap().to_string());
        }
        match page.get("cursor").and_then(Value::as_str) {
            Some(next) => {
                assert!(!next.starts_with("0000"));
                cursor = Some(next.to_string());
            }
            None => break,
        }
    }
    assert_eq!(seen.len(), 25);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 25, "pages overlap");
    let desc = c.get("ip-sets?sort_by=display_name&sort_ascending=false&page_size=2&included_fields=display_name").await.expect(200).body;
    assert_eq!(
        desc["results"],
        json!([{"display_name": "set-24"}, {"display_name": "set-23"}])
    );
    c.get("ip-sets?cursor=abc").await.expect(400);
    c.get("ip-sets?page_size=x").await.expect(400);
}

#[tokio::test]
async fn search_finds_by_tags_escaped_or_not_and_rejects_bad_queries() {
    let c = Client::new();
    let tz = c.boot().transport_zone;
    let ls = c
        .post("logical-switches", json!({"transport_zone_id": tz, "admin_state": "UP", "tags": tags(&[("ncp/cluster", "k8s-a"), ("ncp/project", "shop")])}))
        .await
        .expect(201)
        .id();
    let q = |query: &str| {
        format!(
            "search?query={}&sort_by=id",
            nsx_core::nsx::client::percent_encode(query)
        )
    };
    let escaped = c
        .get(&q(
            r"resource_type:LogicalSwitch AND tags.scope:ncp\/project AND tags.tag:shop",
        ))
        .await
        .expect(200)
        .body;
    assert_eq!(escaped["result_count"], 1);
    assert_eq!(escaped["results"][0]["id"], ls.as_str());
    let bare = c
        .get(&q(
            "resource_type:LogicalSwitch AND tags.scope:ncp/project AND tags.tag:shop",
        ))
        .await
        .expect(200)
        .body;
    assert_eq!(bare["results"], escaped["results"]);
    let all = c
        .get(&q(r"tags.scope:ncp\/cluster AND tags.tag:k8s\-a"))
        .await
        .expect(200)
        .body;
    assert!(
        all["result_count"].as_i64().unwrap() >= 5,
        "bootstrap objects are tagged too: {all}"
    );
    let e = c.get(&q("resource_type:(LogicalSwitch")).await.expect(400);
    assert_eq!(e.code(), Some(60501));
    c.get("search").await.expect(400);
}

#[tokio::test(start_paused = true)]
async fn search_lags_behind_writes_by_the_configured_time() {
    let c = Client::new();
    c.nsx.set_search_lag_ms(500);
    let tz = c.boot().transport_zone;
    let ls = c
        .post(
            "logical-switches",
            json!({"transport_zone_id": tz, "admin_state": "UP", "display_name": "lagging"}),
        )
        .await
        .expect(201)
        .id();
    let q = "search?query=display_name:lagging";
    assert_eq!(c.get(q).await.expect(200).body["result_count"], 0);
    c.get(&format!("logical-switches/{ls}")).await.expect(200);
    tokio::time::advance(std::time::Duration::from_millis(499)).await;
    assert_eq!(c.get(q).await.body["result_count"], 0);
    tokio::time::advance(std::time::Duration::from_millis(1)).await;
    assert_eq!(c.get(q).await.body["result_count"], 1);
    c.delete(&format!("logical-switches/{ls}"))
        .await
        .expect(200);
    assert_eq!(c.get(q).await.body["result_count"], 1, "a delete lags too");
    tokio::time::advance(std::time::Duration::from_millis(500)).await;
    assert_eq!(c.get(q).await.body["result_count"], 0);
}

#[tokio::test]
async fn protected_objects_answer_289_unless_a_superuser_overrides() {
    let c = Client::new();
    c.nsx.add_user(fake_nsx_manager::User {
        name: "ncp".into(),
        password: "pw".into(),
        role: "enterprise_admin".into(),
        protected_principal: true,
        ..fake_nsx_manager::User::new("", "", "")
    });
    let ncp = c.as_user("ncp", "pw");
    let tz = c.boot().transport_zone;
    let created = ncp
        .post(
            "logical-switches",
            json!({"transport_zone_id": tz, "admin_state": "UP"}),
        )
        .await
        .expect(201)
        .body;
    assert_eq!(created["_protection"], "PROTECTED");
    let id = created["id"].as_str().unwrap().to_string();
    let mut doc = created.clone();
    doc["display_name"] = json!("admin edit");
    let e = c
        .put(&format!("logical-switches/{id}"), doc.clone())
        .await
        .expect(400);
    assert_eq!(e.code(), Some(289));
    assert_eq!(e.body["module_name"], "common-services");
    assert!(
        e.body["error_message"]
            .as_str()
            .unwrap()
            .contains("allowOverwrite=null")
    );
    c.delete(&format!("logical-switches/{id}"))
        .await
        .expect(400);
    let over = c
        .raw(
            "PUT",
            &format!("/api/v1/logical-switches/{id}"),
            &serde_json::to_vec(&doc).unwrap(),
            &[("x-allow-overwrite", "true")],
        )
        .await;
    assert_eq!(over.status, 200, "{}", over.body);
    let mut mine = over.body.clone();
    mine["display_name"] = json!("ncp again");
    ncp.put(&format!("logical-switches/{id}"), mine)
        .await
        .expect(200);
}

#[tokio::test(start_paused = true)]
async fn the_rate_limit_answers_429_with_a_string_error_code_then_recovers() {
    let c = Client::new();
    c.nsx.set_rate_limit(5);
    for _ in 0..5 {
        c.get("logical-switches").await.expect(200);
    }
    let e = c.get("logical-switches").await.expect(429);
    assert_eq!(e.body["error_code"], json!("102"));
    assert_eq!(e.body["module_name"], "common-services");
    assert_eq!(
        e.body["error_message"],
        "Client 'admin' exceeded request rate of 5 per second"
    );
    // Another client has its own budget.
    c.as_user("audit", "audit")
        .get("logical-switches")
        .await
        .expect(200);
    tokio::time::advance(std::time::Duration::from_millis(200)).await;
    c.get("logical-switches").await.expect(200);
    assert_eq!(c.nsx.counters().by_status.get(&429), Some(&1));
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_beyond_the_client_limit_get_503() {
    let c = Client::new();
    c.nsx.set_concurrency_limit(2);
    c.nsx.set_latency_ms(100);
    let (a, b, d) = tokio::join!(
        c.get("logical-switches"),
        c.get("logical-switches"),
        c.get("logical-switches")
    );
    let mut statuses = vec![a.status, b.status, d.status];
    statuses.sort();
    assert_eq!(statuses, [200, 200, 503]);
    // Slots are freed when requests finish.
    c.get("logical-switches").await.expect(200);
}

#[tokio::test]
async fn injected_faults_match_method_and_path_and_run_out() {
    let c = Client::new();
    c.nsx.add_fault(fake_nsx_manager::FaultRule {
        user: None,
        method: Some("POST".into()),
        path: Some("/api/v1/logical-ports".into()),
        status: 500,
        error_code: Some(607),
        rate: 1.0,
        remaining: Some(2),
        message: None,
    });
    let (ls, _) = c.switch_with_pool("10.9.0.0/24").await;
    let body = json!({"logical_switch_id": ls, "admin_state": "UP"});
    assert_eq!(
        c.post("logical-ports", body.clone())
            .await
            .expect(500)
            .code(),
        Some(607)
    );
    c.get("logical-ports").await.expect(200);
    c.post("logical-ports", body.clone()).await.expect(500);
    c.post("logical-ports", body).await.expect(201);
    // The admin API sees the log.
    let log = c.get("/fake-admin/requests").await.expect(200).body;
    let statuses: Vec<i64> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_i64().unwrap())
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == 500).count(), 2);
}

#[tokio::test]
async fn atomic_batches_roll_back_and_plain_batches_continue() {
    let c = Client::new();
    let tz = c.boot().transport_zone;
    let before = c.get("logical-switches").await.body["result_count"].clone();
    let reqs = json!({"requests": [
        {"method": "POST", "uri": "/v1/logical-switches", "body": {"transport_zone_id": tz, "admin_state": "UP"}},
        {"method": "POST", "uri": "/v1/logical-switches", "body": {"admin_state": "UP"}},
        {"method": "GET", "uri": "/v1/logical-switches"}]});
    let atomic = c
        .post("batch?atomic=true", reqs.clone())
        .await
        .expect(200)
        .body;
    assert_eq!(atomic["has_errors"], true);
    assert_eq!(atomic["rolled_back"], true);
    assert_eq!(c.get("logical-switches").await.body["result_count"], before);
    let plain = c.post("batch", reqs).await.expect(200).body;
    let codes: Vec<i64> = plain["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, [201, 400, 200]);
    assert_eq!(plain["rolled_back"], false);
    assert_eq!(
        c.get("logical-switches").await.body["result_count"],
        before.as_i64().unwrap() + 1
    );
    c.invariants();
}

#[tokio::test]
async fn concurrent_read_modify_write_lets_exactly_one_stale_writer_win() {
    let c = Client::new();
    let tz = c.boot().transport_zone;
    let id = c
        .post(
            "logical-switches",
            json!({"transport_zone_id": tz, "admin_state": "UP"}),
        )
        .await
        .expect(201)
        .id();
    let path = format!("logical-switches/{id}");
    let mut a = c.get(&path).await.body;
    let mut b = c.get(&path).await.body;
    a["display_name"] = json!("a");
    b["display_name"] = json!("b");
    let (ra, rb) = tokio::join!(c.put(&path, a), c.put(&path, b));
    let mut statuses = [ra.status, rb.status];
    statuses.sort();
    assert_eq!(statuses, [200, 412]);
    let winner = if ra.status == 200 { "a" } else { "b" };
    let now = c.get(&path).await.body;
    assert_eq!(now["display_name"], winner);
    assert_eq!(now["_revision"], 1);
}

#[tokio::test]
async fn the_state_file_survives_a_restart_and_a_torn_temp_file() {
    let dir = std::env::temp_dir().join(format!("fake-nsx-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("nsx.json");
    let _ = std::fs::remove_file(&file);
    let config = || fake_nsx_manager::ManagerConfig {
        state_file: Some(file.clone()),
        ..Default::default()
    };
    let c = Client::on(fake_nsx_manager::FakeNsxManager::open(config()).unwrap());
    let tz = c.boot().transport_zone;
    let id = c
        .post(
            "logical-switches",
            json!({"transport_zone_id": tz, "admin_state": "UP", "display_name": "kept"}),
        )
        .await
        .expect(201)
        .id();
    // A half-written temp file from a crash must not matter.
    std::fs::write(dir.join(".nsx.json.tmp"), b"{\"version\": 1, \"sto").unwrap();
    drop(c);
    let c2 = Client::on(fake_nsx_manager::FakeNsxManager::open(config()).unwrap());
    assert_eq!(
        c2.get(&format!("logical-switches/{id}"))
            .await
            .expect(200)
            .body["display_name"],
        "kept"
    );
    assert_eq!(c2.boot().transport_zone, tz);
    let found = c2
        .get("search?query=display_name:kept")
        .await
        .expect(200)
        .body;
    assert_eq!(found["result_count"], 1, "the index is rebuilt on load");
    std::fs::write(&file, b"garbage").unwrap();
    let err = fake_nsx_manager::FakeNsxManager::open(config())
        .err()
        .expect("a corrupt state file is an error");
    assert!(err.contains("failed to parse"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_manager_restart_keeps_data_and_drops_sessions() {
    let c = Client::new();
    let login = c
        .raw(
            "POST",
            "/api/session/create",
            b"j_username=admin&j_password=admin",
            &[],
        )
        .await
        .expect(200);
    let cookie = login.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let xsrf = login.headers["x-xsrf-token"].to_str().unwrap().to_string();
    let tz = c.boot().transport_zone;
    let id = c
        .post(
            "logical-switches",
            json!({"transport_zone_id": tz, "admin_state": "UP"}),
        )
        .await
        .expect(201)
        .id();
    c.nsx.restart();
    let mut s = c.as_user("x", "y");
    s.auth = None;
    s.extra = vec![("cookie".into(), cookie), ("x-xsrf-token".into(), xsrf)];
    assert_eq!(s.get("logical-switches").await.expect(403).code(), Some(98));
    c.get(&format!("logical-switches/{id}")).await.expect(200);
}

#[tokio::test]
async fn the_api_service_limits_are_readable_and_revisioned() {
    let c = Client::new();
    let cfg = c.get("cluster/api-service").await.expect(200).body;
    assert_eq!(cfg["client_api_rate_limit"], 100);
    assert_eq!(cfg["client_api_concurrency_limit"], 40);
    assert_eq!(cfg["global_api_concurrency_limit"], 199);
    let mut next = cfg.clone();
    next["client_api_rate_limit"] = json!(50);
    assert_eq!(
        c.put("cluster/api-service", next.clone())
            .await
            .expect(200)
            .body["client_api_rate_limit"],
        50
    );
    c.put("cluster/api-service", next).await.expect(412);
}

#[tokio::test]
async fn wrong_methods_answer_405_and_unknown_actions_400() {
    let c = Client::new();
    c.call("PATCH", "logical-switches", Some(json!({})))
        .await
        .expect(405);
    let tz = c.boot().transport_zone;
    c.post(&format!("transport-zones/{tz}?action=explode"), json!({}))
        .await
        .expect(400);
    c.post(&format!("transport-zones/{tz}"), json!({}))
        .await
        .expect(405);
    c.delete(&format!("transport-zones/{tz}")).await.expect(400);
}

#[tokio::test]
async fn principal_identities_are_created_with_a_certificate_listed_read_and_deleted() {
    let c = Client::new();
    let key = rcgen::KeyPair::generate().unwrap();
    let pem = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&key)
        .unwrap()
        .pem();
    let path = "trust-management/principal-identities/with-certificate";
    let body = json!({"name": "ncp-k8s-a", "node_id": "k8s-a", "role": "enterprise_admin",
                      "is_protected": true, "certificate_pem": pem});
    // Only an enterprise admin may create one.
    c.as_user("audit", "audit")
        .post(path, body.clone())
        .await
        .expect(403);
    // Refused bodies change nothing: a missing field, an unknown role, a bad PEM.
    let mut missing = body.clone();
    missing.as_object_mut().unwrap().remove("node_id");
    assert_eq!(c.post(path, missing).await.expect(400).code(), Some(255));
    let mut role = body.clone();
    role["role"] = json!("root");
    c.post(path, role).await.expect(400);
    let mut bad = body.clone();
    bad["certificate_pem"] =
        json!("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----");
    c.post(path, bad).await.expect(400);
    let list = c
        .get("trust-management/principal-identities")
        .await
        .expect(200);
    assert_eq!(list.body["result_count"], 0, "{}", list.body);

    let pi = c.post(path, body.clone()).await.expect(201).body;
    assert_eq!(pi["resource_type"], "PrincipalIdentity");
    assert_eq!(
        (pi["name"].as_str(), pi["is_protected"].as_bool()),
        (Some("ncp-k8s-a"), Some(true))
    );
    let id = pi["id"].as_str().unwrap().to_string();
    // The same name or certificate twice is refused.
    c.post(path, body).await.expect(400);
    let list = c
        .get("trust-management/principal-identities")
        .await
        .expect(200);
    assert_eq!(list.body["result_count"], 1);
    let got = c
        .get(&format!("trust-management/principal-identities/{id}"))
        .await
        .expect(200);
    assert_eq!(got.body, pi);
    // It has no password: basic authentication as it fails.
    c.as_user("ncp-k8s-a", "")
        .get("logical-switches")
        .await
        .expect(403);
    c.delete(&format!("trust-management/principal-identities/{id}"))
        .await
        .expect(200);
    c.get(&format!("trust-management/principal-identities/{id}"))
        .await
        .expect(404);
}

#[tokio::test]
async fn source_ip_persistence_profiles_get_defaults_refuse_bad_values_and_guard_deletes() {
    let c = Client::new();
    let p = c
        .post(
            "loadbalancer/persistence-profiles",
            json!({"resource_type": "LbSourceIpPersistenceProfile", "display_name": "p"}),
        )
        .await
        .expect(201)
        .body;
    assert_eq!(p["timeout"], 300, "NSX's default timeout: {p}");
    assert_eq!(p["purge"], "FULL");
    assert_eq!(p["persistence_shared"], false);
    let id = p["id"].as_str().unwrap().to_string();
    for bad in [
        json!({"resource_type": "LbSourceIpPersistenceProfile", "timeout": 0}),
        json!({"resource_type": "LbSourceIpPersistenceProfile", "timeout": "600"}),
        json!({"resource_type": "LbSourceIpPersistenceProfile", "purge": "SOMETIMES"}),
    ] {
        let e = c
            .post("loadbalancer/persistence-profiles", bad.clone())
            .await
            .expect(400)
            .body;
        assert!(e["error_message"].is_string(), "{bad}: {e}");
    }
    // An update is checked the same way and leaves the profile as it was when refused.
    let mut doc = c
        .get(&format!("loadbalancer/persistence-profiles/{id}"))
        .await
        .expect(200)
        .body;
    doc["timeout"] = json!(-5);
    c.put(&format!("loadbalancer/persistence-profiles/{id}"), doc)
        .await
        .expect(400);
    let kept = c
        .get(&format!("loadbalancer/persistence-profiles/{id}"))
        .await
        .expect(200)
        .body;
    assert_eq!(kept["timeout"], 300);
    let tcp = c.app_profile("LbFastTcpProfile").await;
    let vs = c
        .post("loadbalancer/virtual-servers", json!({"ip_address": "198.51.100.10", "port": "80", "application_profile_id": tcp, "persistence_profile_id": id}))
        .await
        .expect(201)
        .id();
    c.post("loadbalancer/virtual-servers", json!({"ip_address": "198.51.100.11", "port": "80", "application_profile_id": tcp, "persistence_profile_id": "nope"}))
        .await
        .expect(400);
    // In use: NSX refuses the delete until the virtual server lets go of it.
    c.delete(&format!("loadbalancer/persistence-profiles/{id}"))
        .await
        .expect(400);
    c.delete(&format!("loadbalancer/virtual-servers/{vs}"))
        .await
        .expect(200);
    c.delete(&format!("loadbalancer/persistence-profiles/{id}"))
        .await
        .expect(200);
    c.invariants();
}

#[tokio::test]
async fn an_lb_service_holds_as_many_virtual_servers_as_its_size_allows() {
    let c = Client::new();
    let tcp = c.app_profile("LbFastTcpProfile").await;
    let edge = c.boot().edge_cluster;
    let t1 = c
        .post(
            "logical-routers",
            json!({"router_type": "TIER1", "edge_cluster_id": edge}),
        )
        .await
        .expect(201)
        .id();
    let mut servers = Vec::new();
    for i in 0..21 {
        let vs = c
            .post("loadbalancer/virtual-servers", json!({"ip_address": "198.51.100.10", "port": (1000 + i).to_string(), "application_profile_id": tcp}))
            .await
            .expect(201)
            .id();
        servers.push(json!(vs));
    }
    let attach = json!({"target_type": "LogicalRouter", "target_id": t1});
    // SMALL (the default): 20 virtual servers; 21 are refused and nothing is created.
    let e = c
        .post(
            "loadbalancer/services",
            json!({"attachment": attach, "virtual_server_ids": servers[..21]}),
        )
        .await
        .expect(400)
        .body;
    assert!(
        e["error_message"].as_str().unwrap().contains("at most 20"),
        "{e}"
    );
    c.post(
        "loadbalancer/services",
        json!({"attachment": attach, "virtual_server_ids": servers[..1], "size": "HUGE"}),
    )
    .await
    .expect(400);
    let lb = c
        .post(
            "loadbalancer/services",
            json!({"attachment": attach, "virtual_server_ids": servers[..20]}),
        )
        .await
        .expect(201)
        .body;
    assert_eq!(lb["size"], "SMALL");
    let id = lb["id"].as_str().unwrap().to_string();
    // An update beyond the size is refused and leaves the service as it was; a larger size
    // takes more.
    let mut doc = lb.clone();
    doc["virtual_server_ids"] = json!(servers[..21]);
    c.put(&format!("loadbalancer/services/{id}"), doc.clone())
        .await
        .expect(400);
    let kept = c
        .get(&format!("loadbalancer/services/{id}"))
        .await
        .expect(200)
        .body;
    assert_eq!(kept["virtual_server_ids"].as_array().unwrap().len(), 20);
    doc["size"] = json!("MEDIUM");
    c.put(&format!("loadbalancer/services/{id}"), doc)
        .await
        .expect(200);
    c.invariants();
}
