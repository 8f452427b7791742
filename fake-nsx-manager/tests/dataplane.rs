//! The dataplane model on topologies built through the API, as an admin would: switching,
//! routing through tier-1 and tier-0 routers, route advertisement, SNAT, SpoofGuard, the
//! distributed firewall (order, applied-to, direction, exclusion, services, state) and the
//! load balancer, and the `/fake-admin/trace` endpoint.

mod common;

use common::Client;
use fake_nsx_manager::store::{Entry, Packet, Protocol, Trace, Verdict};
use serde_json::{Value, json};

struct Net {
    switch: String,
    tier1: String,
}

/// A switch with a /24 pool, a tier-1 with a downlink to it, linked to the tier-0, advertising
/// its connected routes when `advertise`.
async fn net(c: &Client, cidr: &str, advertise: bool) -> Net {
    let (switch, _) = c.switch_with_pool(cidr).await;
    let base = cidr.split('/').next().unwrap();
    let gw = format!("{}.1", base.rsplit_once('.').unwrap().0);
    let tier1 = c
        .post(
            "logical-routers",
            json!({"router_type": "TIER1", "display_name": cidr, "edge_cluster_id": c.boot().edge_cluster}),
        )
        .await
        .expect(201)
        .id();
    let t0 = c.boot().tier0_router;
    let t0_link = c
        .post(
            "logical-router-ports",
            json!({"resource_type": "LogicalRouterLinkPortOnTIER0", "logical_router_id": t0}),
        )
        .await
        .expect(201)
        .id();
    c.post(
        "logical-router-ports",
        json!({"resource_type": "LogicalRouterLinkPortOnTIER1", "logical_router_id": tier1,
        "linked_logical_router_port_id": {"target_id": t0_link}}),
    )
    .await
    .expect(201);
    let lsp = c
        .post(
            "logical-ports",
            json!({"logical_switch_id": switch, "admin_state": "UP"}),
        )
        .await
        .expect(201)
        .id();
    c.post("logical-router-ports", json!({"resource_type": "LogicalRouterDownLinkPort", "logical_router_id": tier1,
        "linked_logical_switch_port_id": {"target_id": lsp}, "subnets": [{"ip_addresses": [gw], "prefix_length": 24}]}))
        .await
        .expect(201);
    if advertise {
        let path = format!("logical-routers/{tier1}/routing/advertisement");
        let mut adv = c.get(&path).await.expect(200).body;
        adv["enabled"] = json!(true);
        adv["advertise_nsx_connected_routes"] = json!(true);
        c.put(&path, adv).await.expect(200);
    }
    Net { switch, tier1 }
}

struct Pod {
    port: String,
    ip: String,
    vif: String,
    vlan: u16,
}

async fn pod(c: &Client, net: &Net, node: &str, vlan: u16) -> Pod {
    let vif = c.boot().clusters["k8s-a"].node_ports[node].vif_id.clone();
    let port = c
        .post("logical-ports", json!({"logical_switch_id": net.switch, "admin_state": "UP",
            "attachment": {"attachment_type": "VIF", "id": format!("{node}-{vlan}"), "context": {"resource_type": "VifAttachmentContext",
                "vif_type": "CHILD", "parent_vif_id": vif, "traffic_tag": vlan, "app_id": "x", "allocate_addresses": "Both"}}}))
        .await
        .expect(201)
        .id();
    let ip = c.nsx.with_store(|s| s.port_addresses())[&port][0].clone();
    Pod {
        port,
        ip,
        vif,
        vlan,
    }
}

fn send(c: &Client, from: &Pod, dst: &str, proto: Protocol, port: u16) -> Trace {
    let p = Packet::new(&from.ip, dst, proto, 33000, port);
    c.nsx.with_store(|s| {
        s.trace(
            &Entry::Vif {
                parent_vif_id: from.vif.clone(),
                vlan: from.vlan,
            },
            &p,
        )
    })
}

fn connect(
    c: &Client,
    from: &Pod,
    dst: &str,
    proto: Protocol,
    port: u16,
) -> (Trace, Option<Trace>) {
    let p = Packet::new(&from.ip, dst, proto, 33000, port);
    c.nsx
        .with_store(|s| s.trace_connection(&Entry::LogicalPort(from.port.clone()), &p))
}

fn dropped(t: &Trace) -> &str {
    match &t.verdict {
        Verdict::Dropped { reason } => reason,
        other => panic!("not dropped: {other:?} {:?}", t.hops),
    }
}

#[tokio::test]
async fn switching_routing_advertisement_snat_and_spoofguard() {
    let c = Client::new();
    let a = net(&c, "10.1.1.0/24", true).await;
    let b = net(&c, "10.1.2.0/24", true).await;
    let quiet = net(&c, "10.1.3.0/24", false).await;
    let a1 = pod(&c, &a, "node-1", 1).await;
    let a2 = pod(&c, &a, "node-2", 1).await;
    let b1 = pod(&c, &b, "node-1", 2).await;
    let q1 = pod(&c, &quiet, "node-2", 2).await;

    // Same switch: delivered without a router, to the port's VIF and VLAN.
    let t = send(&c, &a1, &a2.ip, Protocol::Tcp, 80);
    assert!(t.hops.iter().all(|h| !h.contains("tier-1")), "{:?}", t.hops);
    match &t.verdict {
        Verdict::Delivered {
            logical_port,
            parent_vif_id,
            vlan,
            ..
        } => {
            assert_eq!(logical_port, &a2.port);
            assert_eq!(parent_vif_id.as_deref(), Some(a2.vif.as_str()));
            assert_eq!(*vlan, Some(1));
        }
        v => panic!("{v:?}"),
    }
    // Across tier-1s through the tier-0.
    let t = send(&c, &a1, &b1.ip, Protocol::Udp, 53);
    assert!(t.delivered(), "{t:?}");
    assert!(
        t.hops
            .iter()
            .any(|h| h.contains(&format!("tier-1 {}", a.tier1))),
        "{:?}",
        t.hops
    );
    assert!(t.hops.iter().any(|h| h.contains("tier-0")), "{:?}", t.hops);
    // A tier-1 that does not advertise is unreachable from other tier-1s...
    assert!(dropped(&send(&c, &a1, &q1.ip, Protocol::Tcp, 80)).contains("does not advertise"));
    // ... but its own pods can still leave (the tier-0 routes outward).
    // Outside: no SNAT rule yet, the source is kept.
    match send(&c, &a1, "8.8.8.8", Protocol::Udp, 53).verdict {
        Verdict::External { packet } => assert_eq!(
            packet.src_ip,
            Packet::new(&a1.ip, "0.0.0.0", Protocol::Udp, 0, 0).src_ip
        ),
        v => panic!("{v:?}"),
    }
    let t0 = c.boot().tier0_router;
    c.post(
        &format!("logical-routers/{t0}/nat/rules"),
        json!({"action": "SNAT", "match_source_network": "10.1.1.0/24",
        "translated_network": "100.64.0.9", "enabled": true}),
    )
    .await
    .expect(201);
    let t = send(&c, &a1, "8.8.8.8", Protocol::Udp, 53);
    match &t.verdict {
        Verdict::External { packet } => assert_eq!(
            packet.src_ip,
            Packet::new("100.64.0.9", "0.0.0.0", Protocol::Udp, 0, 0).src_ip
        ),
        v => panic!("{v:?} {:?}", t.hops),
    }
    // b's pods are not covered by the rule.
    match send(&c, &b1, "8.8.8.8", Protocol::Udp, 53).verdict {
        Verdict::External { packet } => assert_eq!(
            packet.src_ip,
            Packet::new(&b1.ip, "0.0.0.0", Protocol::Udp, 0, 0).src_ip
        ),
        v => panic!("{v:?}"),
    }
    // SpoofGuard, unknown VLANs, unknown destinations inside a subnet.
    let mut forged = Packet::new(&a1.ip, &b1.ip, Protocol::Tcp, 1, 80);
    forged.src_ip += 100;
    let t = c
        .nsx
        .with_store(|s| s.trace(&Entry::LogicalPort(a1.port.clone()), &forged));
    assert!(dropped(&t).starts_with("spoofguard"));
    let t = c.nsx.with_store(|s| {
        s.trace(
            &Entry::Vif {
                parent_vif_id: a1.vif.clone(),
                vlan: 99,
            },
            &forged,
        )
    });
    assert!(dropped(&t).contains("VLAN 99"));
    assert!(dropped(&send(&c, &a1, "10.1.2.77", Protocol::Tcp, 80)).contains("no logical port"));
}

async fn section(c: &Client, body: Value, rules: Value) -> String {
    let mut body = body;
    body["section_type"] = json!("LAYER3");
    body["rules"] = rules;
    c.call(
        "POST",
        "/api/v1/firewall/sections?operation=insert_top&action=create_with_rules",
        Some(body),
    )
    .await
    .expect(201)
    .id()
}

#[tokio::test]
async fn the_firewall_is_first_match_with_applied_to_direction_exclusion_services_and_state() {
    let c = Client::new();
    let n = net(&c, "10.2.1.0/24", true).await;
    let web = pod(&c, &n, "node-1", 1).await;
    let db = pod(&c, &n, "node-2", 1).await;
    let other = pod(&c, &n, "node-3", 1).await;
    let tcp = |port: &str| json!({"service": {"resource_type": "L4PortSetNSService", "l4_protocol": "TCP", "destination_ports": [port]}});
    let port_ref = |p: &Pod| json!({"target_type": "LogicalPort", "target_id": p.port});
    // The default rule drops everything; what is allowed is said above it.
    let boot = c.boot();
    let def = boot.default_section.clone();
    let rules = c
        .get(&format!("firewall/sections/{def}/rules"))
        .await
        .expect(200)
        .body;
    let rid = rules["results"][0]["id"].as_str().unwrap().to_string();
    let mut rule = rules["results"][0].clone();
    rule["action"] = json!("DROP");
    c.put(&format!("firewall/sections/{def}/rules/{rid}"), rule)
        .await
        .expect(200);
    assert!(dropped(&send(&c, &web, &db.ip, Protocol::Tcp, 5432)).contains("dfw OUT"));

    let ipset = c
        .post("ip-sets", json!({"ip_addresses": [web.ip.clone()]}))
        .await
        .expect(201)
        .id();
    let svc = c
        .post("ns-services", json!({"nsservice_element": {"resource_type": "L4PortSetNSService", "l4_protocol": "TCP", "destination_ports": ["5432"]}}))
        .await
        .expect(201)
        .id();
    // Stateful: web -> db on 5432 (by NSService id, source by IPSet), applied to both ends.
    section(&c, json!({"display_name": "app", "stateful": true}), json!([
        {"display_name": "disabled-drop", "action": "DROP", "disabled": true},
        {"display_name": "web-db", "action": "ALLOW", "sources": [{"target_type": "IPSet", "target_id": ipset}],
         "destinations": [port_ref(&db)], "services": [{"target_type": "NSService", "target_id": svc}],
         "applied_tos": [port_ref(&web), port_ref(&db)]},
    ])).await;
    let (fwd, reply) = connect(&c, &web, &db.ip, Protocol::Tcp, 5432);
    assert!(fwd.delivered(), "{fwd:?}");
    assert!(
        reply.as_ref().unwrap().delivered(),
        "stateful: the reply passes {reply:?}"
    );
    assert!(
        reply
            .unwrap()
            .hops
            .iter()
            .any(|h| h.contains("tracked connection"))
    );
    assert!(
        !send(&c, &web, &db.ip, Protocol::Tcp, 5433).delivered(),
        "other service"
    );
    assert!(
        !send(&c, &db, &web.ip, Protocol::Tcp, 5432).delivered(),
        "other direction"
    );
    assert!(
        !send(&c, &other, &db.ip, Protocol::Tcp, 5432).delivered(),
        "other source"
    );

    // Stateless: other -> web on 80 allowed one way only; the reply meets the DROP.
    section(&c, json!({"display_name": "stateless", "stateful": false}), json!([
        {"display_name": "other-web", "action": "ALLOW", "direction": "OUT", "sources": [port_ref(&other)], "services": [tcp("80")],
         "applied_tos": [port_ref(&other)]},
        {"display_name": "other-web-in", "action": "ALLOW", "direction": "IN", "destinations": [port_ref(&web)], "services": [tcp("80")],
         "applied_tos": [port_ref(&web)]},
    ])).await;
    let (fwd, reply) = connect(&c, &other, &web.ip, Protocol::Tcp, 80);
    assert!(fwd.delivered(), "{fwd:?}");
    assert!(
        !reply.unwrap().delivered(),
        "a stateless section does not admit replies"
    );

    // Exclusion and a section applied to one port only; sections evaluate in order. The
    // default rule allows again, so only the new section can stop other -> db.
    let mut rule = c
        .get(&format!("firewall/sections/{def}/rules/{rid}"))
        .await
        .expect(200)
        .body;
    rule["action"] = json!("ALLOW");
    c.put(&format!("firewall/sections/{def}/rules/{rid}"), rule)
        .await
        .expect(200);
    assert!(send(&c, &other, &db.ip, Protocol::Tcp, 5432).delivered());
    let sec = section(&c, json!({"display_name": "excl", "stateful": true, "applied_tos": [port_ref(&db)]}), json!([
        {"display_name": "not-web", "action": "REJECT", "direction": "IN", "sources": [port_ref(&web)], "sources_excluded": true},
    ])).await;
    let t = send(&c, &other, &db.ip, Protocol::Tcp, 5432);
    assert!(dropped(&t).contains("dfw IN"), "{t:?}");
    assert!(
        t.hops
            .iter()
            .any(|h| h.contains("not-web") && h.contains("REJECT")),
        "{:?}",
        t.hops
    );
    assert!(
        send(&c, &web, &db.ip, Protocol::Tcp, 5432).delivered(),
        "web is excluded from the reject"
    );
    c.call(
        "DELETE",
        &format!("/api/v1/firewall/sections/{sec}?cascade=true"),
        None,
    )
    .await
    .expect(200);
    assert!(send(&c, &other, &db.ip, Protocol::Tcp, 5432).delivered());
}

#[tokio::test]
async fn the_load_balancer_dnats_to_members_and_replies_come_from_the_vip() {
    let c = Client::new();
    let n = net(&c, "10.3.1.0/24", true).await;
    let client = pod(&c, &n, "node-1", 1).await;
    let m1 = pod(&c, &n, "node-2", 1).await;
    let m2 = pod(&c, &n, "node-3", 1).await;
    let profile = c.app_profile("LbFastTcpProfile").await;
    let pool = c
        .post("loadbalancer/pools", json!({"members": [{"ip_address": m1.ip, "port": "8080"}, {"ip_address": m2.ip, "port": "8080"}]}))
        .await
        .expect(201)
        .id();
    let vs = c
        .post(
            "loadbalancer/virtual-servers",
            json!({"ip_address": "198.51.100.10", "port": "80", "ip_protocol": "TCP",
            "application_profile_id": profile, "pool_id": pool, "enabled": true}),
        )
        .await
        .expect(201)
        .id();
    // Not on a service yet: refused.
    assert!(
        dropped(&send(&c, &client, "198.51.100.10", Protocol::Tcp, 80))
            .contains("no enabled LB service")
    );
    c.post(
        "loadbalancer/services",
        json!({"attachment": {"target_type": "LogicalRouter", "target_id": n.tier1},
        "virtual_server_ids": [vs], "enabled": true, "size": "SMALL"}),
    )
    .await
    .expect(201);
    let mut seen = std::collections::BTreeSet::new();
    for sport in 0..8u16 {
        let p = Packet::new(
            &client.ip,
            "198.51.100.10",
            Protocol::Tcp,
            40000 + sport,
            80,
        );
        let (fwd, reply) = c
            .nsx
            .with_store(|s| s.trace_connection(&Entry::LogicalPort(client.port.clone()), &p));
        let Verdict::Delivered {
            logical_port,
            packet,
            ..
        } = &fwd.verdict
        else {
            panic!("{fwd:?}")
        };
        assert_eq!(packet.dst_port, 8080);
        seen.insert(logical_port.clone());
        let reply = reply.unwrap();
        let Verdict::Delivered {
            logical_port,
            packet,
            ..
        } = &reply.verdict
        else {
            panic!("{reply:?}")
        };
        assert_eq!(logical_port, &client.port);
        assert_eq!(packet.src_ip, p.dst_ip, "the client sees the VIP answer");
        assert_eq!(packet.src_port, 80);
    }
    assert_eq!(seen.len(), 2, "both members get connections");
    // Another port of the VIP is not load-balanced: the address is nobody's.
    assert!(!send(&c, &client, "198.51.100.10", Protocol::Tcp, 81).delivered());

    // Source translation: transparent so far (a member saw the client); automap gives the
    // load balancer's transit address (its tier-1's side of the link to the tier-0), an IP
    // pool its first address; replies still come back from the VIP.
    let transit = c.get("logical-router-ports").await.expect(200).body["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| {
            p["resource_type"] == "LogicalRouterLinkPortOnTIER1"
                && p["logical_router_id"] == n.tier1.as_str()
        })
        .unwrap()["subnets"][0]["ip_addresses"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(transit.starts_with("100.64."), "{transit}");
    // The transit subnet is the manager's: a PUT that leaves it out (or says another) keeps it.
    let link = c.get("logical-router-ports").await.expect(200).body["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| {
            p["resource_type"] == "LogicalRouterLinkPortOnTIER1"
                && p["logical_router_id"] == n.tier1.as_str()
        })
        .unwrap()
        .clone();
    let link_path = format!("logical-router-ports/{}", link["id"].as_str().unwrap());
    let mut body = link.clone();
    body.as_object_mut().unwrap().remove("subnets");
    c.put(&link_path, body).await.expect(200);
    let mut body = c.get(&link_path).await.expect(200).body;
    assert_eq!(body["subnets"], link["subnets"]);
    body["subnets"] = json!([{"ip_addresses": ["100.64.99.1"], "prefix_length": 31}]);
    c.put(&link_path, body).await.expect(200);
    assert_eq!(
        c.get(&link_path).await.expect(200).body["subnets"],
        link["subnets"]
    );
    let seen_source = |c: &Client| {
        let p = Packet::new(&client.ip, "198.51.100.10", Protocol::Tcp, 41000, 80);
        let (fwd, reply) = c
            .nsx
            .with_store(|s| s.trace_connection(&Entry::LogicalPort(client.port.clone()), &p));
        let Verdict::Delivered { packet, .. } = fwd.verdict else {
            panic!("{fwd:?}")
        };
        let reply = reply.unwrap();
        let Verdict::Delivered { packet: back, .. } = &reply.verdict else {
            panic!("{reply:?}")
        };
        assert_eq!(
            (back.src_ip, back.dst_ip),
            (p.dst_ip, p.src_ip),
            "{reply:?}"
        );
        packet.src_ip
    };
    assert_eq!(
        seen_source(&c),
        Packet::new(&client.ip, "0.0.0.0", Protocol::Tcp, 0, 0).src_ip
    );
    let path = format!("loadbalancer/pools/{pool}");
    for (t, want) in [
        (json!({"type": "LbSnatAutoMap"}), transit.as_str()),
        (
            json!({"type": "LbSnatIpPool", "ip_addresses": [{"ip_address": "192.0.2.7-192.0.2.9"}]}),
            "192.0.2.7",
        ),
    ] {
        let mut doc = c.get(&path).await.expect(200).body;
        doc["snat_translation"] = t;
        c.put(&path, doc).await.expect(200);
        assert_eq!(
            seen_source(&c),
            Packet::new(want, "0.0.0.0", Protocol::Tcp, 0, 0).src_ip
        );
    }
    for bad in [
        json!({"type": "LbSnatNowhere"}),
        json!({"type": "LbSnatIpPool"}),
    ] {
        let mut doc = c.get(&path).await.expect(200).body;
        doc["snat_translation"] = bad;
        c.put(&path, doc).await.expect(400);
    }
}

#[tokio::test]
async fn the_trace_endpoint_answers_traces_and_rejects_bad_requests() {
    let c = Client::new();
    let n = net(&c, "10.4.1.0/24", true).await;
    let a = pod(&c, &n, "node-1", 1).await;
    let b = pod(&c, &n, "node-2", 1).await;
    let body = json!({"entry": {"vif": {"parent_vif_id": a.vif, "vlan": 1}},
        "packet": {"src_ip": a.ip, "dst_ip": b.ip, "protocol": "TCP", "src_port": 1000, "dst_port": 80}, "reply": true});
    let r = c
        .call("POST", "/fake-admin/trace", Some(body))
        .await
        .expect(200);
    assert_eq!(r.body["forward"]["verdict"], "delivered", "{}", r.body);
    assert_eq!(r.body["forward"]["logical_port"], b.port);
    assert_eq!(r.body["reply"]["verdict"], "delivered");
    let bad = json!({"entry": {"logical_port": a.port}, "packet": {"src_ip": "10.4.1.300", "dst_ip": b.ip, "protocol": "TCP"}});
    let r = c
        .call("POST", "/fake-admin/trace", Some(bad))
        .await
        .expect(400);
    assert!(r.body.to_string().contains("10.4.1.300"), "{}", r.body);
    let r = c
        .call("POST", "/fake-admin/trace", Some(json!({"entry": {"logical_port": a.port}, "packet": {"src_ip": a.ip, "dst_ip": b.ip, "protocol": "GRE"}})))
        .await
        .expect(400);
    assert!(r.body.to_string().contains("GRE"), "{}", r.body);
}
