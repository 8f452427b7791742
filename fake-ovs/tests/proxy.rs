//! nsx-kube-proxy on fake-ovs: services load-balanced with DNAT and un-NATed replies, reject
//! without endpoints, NodePort, session affinity, terminating endpoints, internal traffic
//! policy, shared endpoint flows, stale UDP conntrack, oversized groups, agent and OVS
//! restarts, and a property test that any sequence of changes synced incrementally leaves
//! exactly what a from-scratch sync of the final state installs.

use std::collections::{BTreeMap, BTreeSet};

use fake_ovs::{Bridge, Packet};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use nsx_core::ovs::{Field, parse_flow};
use nsx_core::proxy::{
    EXTERNAL_LOCAL_SUFFIX, NODE_PORT_SUFFIX, Proxy, ProxyConfig, ServicePort, ServicePortKey,
    all_service_ports,
};
use proptest::prelude::*;
use serde_json::json;

const NODE_IP: &str = "172.16.0.11";

fn ip(s: &str) -> u32 {
    u32::from(s.parse::<std::net::Ipv4Addr>().unwrap())
}

fn config() -> ProxyConfig {
    ProxyConfig {
        node_name: "node-1".into(),
        node_ips: vec![ip(NODE_IP)],
    }
}

fn service(name: &str, vip: &str, extra: serde_json::Value) -> Service {
    let mut spec = json!({"clusterIP": vip, "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web"}]});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(
        json!({"metadata": {"name": name, "namespace": "default"}, "spec": spec}),
    )
    .unwrap()
}

/// A slice for `svc` with endpoints (address, ready, terminating, node).
fn slice(
    svc: &str,
    port_name: &str,
    port: i32,
    proto: &str,
    eps: &[(&str, bool, bool, &str)],
) -> EndpointSlice {
    let endpoints: Vec<serde_json::Value> = eps
        .iter()
        .map(|(a, ready, term, node)| json!({"addresses": [a], "conditions": {"ready": ready, "serving": true, "terminating": term}, "nodeName": node}))
        .collect();
    serde_json::from_value(json!({"metadata": {"name": format!("{svc}-1"), "namespace": "default", "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "ports": [{"name": port_name, "port": port, "protocol": proto}], "endpoints": endpoints})).unwrap()
}

struct World {
    bridge: Bridge,
    proxy: Proxy,
    services: Vec<Service>,
    slices: BTreeMap<(String, String), EndpointSlice>,
}

impl World {
    fn new() -> Self {
        let mut bridge = Bridge::new("br-int");
        // The agent's side: table 0 sends pod traffic to the proxy's tables; forwarding by
        // destination (a stand-in for the uplink and pod ports).
        for f in [
            "table=0,priority=10,ip,actions=resubmit(,10)",
            "table=40,priority=10,ip,nw_dst=10.1.0.0/16,actions=output:2",
            "table=40,priority=5,ip,actions=output:1",
        ] {
            bridge.add_flow(parse_flow(f).unwrap()).unwrap();
        }
        Self {
            bridge,
            proxy: Proxy::new(config(), 1, None, BTreeSet::new()),
            services: vec![],
            slices: BTreeMap::new(),
        }
    }

    fn want(&self) -> BTreeMap<ServicePortKey, ServicePort> {
        all_service_ports(&self.services, &self.slices, "node-1")
    }

    fn sync(&mut self) {
        let want = self.want();
        self.proxy.full_sync(&mut self.bridge, &want).unwrap();
    }

    fn add_slice(&mut self, s: EndpointSlice) {
        let k = (
            s.metadata.namespace.clone().unwrap(),
            s.metadata.name.clone().unwrap(),
        );
        self.slices.insert(k, s);
    }
}

fn client(src_port: u16, dst: &str, dport: u16) -> Packet {
    Packet::parse(&format!(
        "in_port=5,tcp,nw_src=10.1.9.9,nw_dst={dst},tcp_src={src_port},tcp_dst={dport}"
    ))
    .unwrap()
}

#[test]
fn a_clusterip_balances_with_dnat_and_replies_come_back_from_the_vip() {
    let mut w = World::new();
    w.services.push(service("web", "10.96.0.10", json!({})));
    w.add_slice(slice(
        "web",
        "http",
        8080,
        "TCP",
        &[
            ("10.1.0.5", true, false, "node-1"),
            ("10.1.0.6", true, false, "node-2"),
            ("10.1.0.7", true, false, "node-3"),
        ],
    ));
    w.sync();
    let mut seen = BTreeSet::new();
    for sport in 0..40 {
        let t = w
            .bridge
            .process(client(30000 + sport, "10.96.0.10", 80), 60);
        assert_eq!(t.ports(), vec![2], "{:#?}", t.lines);
        let out = t.outputs[0].packet;
        assert_eq!(out.get(Field::TpDst), 8080);
        seen.insert(out.get(Field::IpDst));
        // The reply from the backend is un-NATed.
        let reply = Packet::parse(&format!(
            "in_port=3,tcp,nw_src={},nw_dst=10.1.9.9,tcp_src=8080,tcp_dst={}",
            std::net::Ipv4Addr::from(out.get(Field::IpDst) as u32),
            30000 + sport
        ))
        .unwrap();
        let t = w.bridge.process(reply, 60);
        let back = t.outputs[0].packet;
        assert_eq!(
            back.get(Field::IpSrc),
            u128::from(ip("10.96.0.10")),
            "{:?}",
            t.lines
        );
        assert_eq!(back.get(Field::TpSrc), 80);
    }
    assert_eq!(seen.len(), 3, "every endpoint gets connections");
    // Another port of the VIP is not a service.
    let t = w.bridge.trace(client(1, "10.96.0.10", 81));
    assert!(
        t.outputs
            .iter()
            .all(|o| o.packet.get(Field::IpDst) == u128::from(ip("10.96.0.10")))
    );
}

#[test]
fn without_endpoints_the_service_rejects_and_nodeport_works() {
    let mut w = World::new();
    w.services.push(service("empty", "10.96.0.20", json!({})));
    w.services.push(service("np", "10.96.0.21", json!({"type": "NodePort", "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]})));
    w.add_slice(slice(
        "np",
        "http",
        9090,
        "TCP",
        &[("10.1.0.8", true, false, "node-1")],
    ));
    w.sync();
    let t = w.bridge.trace(client(1, "10.96.0.20", 80));
    assert_eq!(
        t.controller, 1,
        "rejected through the controller: {:?}",
        t.lines
    );
    assert!(t.outputs.is_empty());
    let t = w.bridge.trace(client(1, NODE_IP, 30080));
    assert_eq!(
        t.outputs[0].packet.get(Field::IpDst),
        u128::from(ip("10.1.0.8")),
        "{:?}",
        t.lines
    );
    assert_eq!(t.outputs[0].packet.get(Field::TpDst), 9090);
}

/// A packet to the node's NodePort from outside: in from the uplink, marked as the node's own
/// traffic (the agent's table 0 does that on a real bridge).
fn outside(src_port: u16, dport: u16) -> Packet {
    Packet::parse(&format!(
        "in_port=1,tcp,nw_src=203.0.113.9,nw_dst={NODE_IP},tcp_src={src_port},tcp_dst={dport}"
    ))
    .unwrap()
}

/// Where 40 connections from outside (`from_outside`) or from a local pod went: the
/// endpoints, and the sources they saw; empty when dropped.
fn nodeport_spread(w: &mut World, from_outside: bool, dport: u16) -> BTreeSet<(String, String)> {
    let mut seen = BTreeSet::new();
    for sport in 0..40 {
        let p = if from_outside {
            outside(40000 + sport, dport)
        } else {
            client(40000 + sport, NODE_IP, dport)
        };
        let t = w.bridge.trace(p);
        assert_eq!(t.controller, 0, "never rejected here: {:?}", t.lines);
        for o in &t.outputs {
            let a = |f| std::net::Ipv4Addr::from(o.packet.get(f) as u32).to_string();
            seen.insert((a(Field::IpDst), a(Field::IpSrc)));
        }
    }
    seen
}

#[test]
fn node_port_traffic_follows_the_traffic_policies() {
    let mut w = World::new();
    // The agent's part for the node's own traffic: from the uplink, marked, into the proxy.
    w.bridge
        .add_flow(
            parse_flow(&format!(
                "table=0,priority=20,in_port=1,ip,nw_dst={NODE_IP},actions=load:1->NXM_NX_REG4[0],resubmit(,5)"
            ))
            .unwrap(),
        )
        .unwrap();
    let both = [
        ("10.1.0.5", true, false, "node-1"),
        ("10.1.0.6", true, false, "node-2"),
    ];
    let np = |name: &str, vip: &str, node_port: u16, extra: serde_json::Value| {
        let mut e = json!({"type": "NodePort", "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": node_port}]});
        for (k, v) in extra.as_object().unwrap() {
            e[k] = v.clone();
        }
        service(name, vip, e)
    };
    w.services.push(np("cc", "10.96.0.40", 30040, json!({})));
    w.services.push(np(
        "lc",
        "10.96.0.41",
        30041,
        json!({"externalTrafficPolicy": "Local"}),
    ));
    w.services.push(np(
        "cl",
        "10.96.0.42",
        30042,
        json!({"internalTrafficPolicy": "Local"}),
    ));
    w.services.push(np(
        "ll",
        "10.96.0.43",
        30043,
        json!({"externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local"}),
    ));
    w.services.push(np(
        "far",
        "10.96.0.44",
        30044,
        json!({"externalTrafficPolicy": "Local"}),
    ));
    for name in ["cc", "lc", "cl", "ll"] {
        w.add_slice(slice(name, "http", 8080, "TCP", &both));
    }
    w.add_slice(slice(
        "far",
        "http",
        8080,
        "TCP",
        &[("10.1.0.6", true, false, "node-2")],
    ));
    w.sync();
    let pair = |dst: &str, src: &str| (dst.to_string(), src.to_string());
    let everywhere_masqueraded: BTreeSet<_> =
        [pair("10.1.0.5", NODE_IP), pair("10.1.0.6", NODE_IP)].into();
    let here_kept: BTreeSet<_> = [pair("10.1.0.5", "203.0.113.9")].into();
    let pods_everywhere: BTreeSet<_> =
        [pair("10.1.0.5", "10.1.9.9"), pair("10.1.0.6", "10.1.9.9")].into();
    let pods_here: BTreeSet<_> = [pair("10.1.0.5", "10.1.9.9")].into();
    // externalTrafficPolicy Cluster: every endpoint, masqueraded to the node's address.
    assert_eq!(nodeport_spread(&mut w, true, 30040), everywhere_masqueraded);
    assert_eq!(nodeport_spread(&mut w, false, 30040), pods_everywhere);
    // Local: this node's endpoint, the client's address kept; pods still reach every one.
    assert_eq!(nodeport_spread(&mut w, true, 30041), here_kept);
    assert_eq!(nodeport_spread(&mut w, false, 30041), pods_everywhere);
    // internalTrafficPolicy Local does not narrow the NodePort (Cluster from outside and from
    // pods), only the ClusterIP.
    assert_eq!(nodeport_spread(&mut w, true, 30042), everywhere_masqueraded);
    assert_eq!(nodeport_spread(&mut w, false, 30042), pods_everywhere);
    let mut to_vip = BTreeSet::new();
    for sport in 0..40 {
        let t = w.bridge.trace(client(40000 + sport, "10.96.0.42", 80));
        to_vip.extend(t.outputs.iter().map(|o| o.packet.get(Field::IpDst)));
    }
    assert_eq!(to_vip, [u128::from(ip("10.1.0.5"))].into());
    // Both Local: outside this node's endpoint with the client's address; pods the internal
    // (node-local) ones.
    assert_eq!(nodeport_spread(&mut w, true, 30043), here_kept);
    assert_eq!(nodeport_spread(&mut w, false, 30043), pods_here);
    // Local with its only endpoint elsewhere: dropped from outside (not rejected), served to
    // pods.
    assert_eq!(nodeport_spread(&mut w, true, 30044), BTreeSet::new());
    assert_eq!(
        nodeport_spread(&mut w, false, 30044),
        [pair("10.1.0.6", "10.1.9.9")].into()
    );
}

#[test]
fn session_affinity_keeps_a_client_on_one_endpoint() {
    let mut w = World::new();
    w.services.push(service("sticky", "10.96.0.30", json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}})));
    w.add_slice(slice(
        "sticky",
        "http",
        8080,
        "TCP",
        &[
            ("10.1.0.5", true, false, "n"),
            ("10.1.0.6", true, false, "n"),
            ("10.1.0.7", true, false, "n"),
        ],
    ));
    w.sync();
    let first = w.bridge.process(client(40000, "10.96.0.30", 80), 60);
    let chosen = first.outputs[0].packet.get(Field::IpDst);
    assert_eq!(first.learned, 1, "{:?}", first.lines);
    for sport in 1..30 {
        let t = w
            .bridge
            .process(client(40000 + sport, "10.96.0.30", 80), 60);
        assert_eq!(
            t.outputs[0].packet.get(Field::IpDst),
            chosen,
            "{:?}",
            t.lines
        );
    }
    assert!(w.bridge.dump_flows(false).contains("table=19, hard_timeout=600, priority=200,tcp,nw_src=10.1.9.9,nw_dst=10.96.0.30,tp_dst=80"), "{}", w.bridge.dump_flows(false));
}

#[test]
fn terminating_endpoints_serve_only_when_nothing_is_ready_and_local_policy_filters_by_node() {
    let mut w = World::new();
    w.services.push(service("drain", "10.96.0.40", json!({})));
    w.add_slice(slice(
        "drain",
        "http",
        8080,
        "TCP",
        &[
            ("10.1.0.5", false, true, "node-1"),
            ("10.1.0.6", true, false, "node-2"),
        ],
    ));
    w.services.push(service(
        "local",
        "10.96.0.41",
        json!({"internalTrafficPolicy": "Local"}),
    ));
    let mut local = slice(
        "local",
        "http",
        8080,
        "TCP",
        &[
            ("10.1.0.7", true, false, "node-1"),
            ("10.1.0.8", true, false, "node-2"),
        ],
    );
    local.metadata.name = Some("local-1".into());
    w.add_slice(local);
    w.sync();
    let want = w.want();
    let drain = &want[&ServicePortKey {
        namespace: "default".into(),
        name: "drain".into(),
        port: "http".into(),
    }];
    assert_eq!(drain.endpoints.len(), 1, "the ready one only");
    assert_eq!(drain.endpoints[0].ip, ip("10.1.0.6"));
    let loc = &want[&ServicePortKey {
        namespace: "default".into(),
        name: "local".into(),
        port: "http".into(),
    }];
    assert_eq!(
        loc.endpoints.iter().map(|e| e.ip).collect::<Vec<_>>(),
        vec![ip("10.1.0.7")]
    );
    // The ready endpoint goes: the terminating one serves.
    w.add_slice(slice(
        "drain",
        "http",
        8080,
        "TCP",
        &[("10.1.0.5", false, true, "node-1")],
    ));
    w.sync();
    let t = w.bridge.trace(client(1, "10.96.0.40", 80));
    assert_eq!(
        t.outputs[0].packet.get(Field::IpDst),
        u128::from(ip("10.1.0.5")),
        "{:?}",
        t.lines
    );
}

/// kube-proxy rejects traffic to a service without any endpoint, but drops traffic that
/// `internalTrafficPolicy: Local` leaves no endpoint on this node (its "has no local
/// endpoints" rule): a client must not be told "refused" for a service that works elsewhere.
#[test]
fn a_local_policy_without_a_local_endpoint_drops_where_no_endpoint_at_all_rejects() {
    let mut w = World::new();
    let local = json!({"internalTrafficPolicy": "Local"});
    w.services.push(service("far", "10.96.0.50", local.clone()));
    w.add_slice(slice(
        "far",
        "http",
        8080,
        "TCP",
        &[("10.1.0.8", true, false, "node-2")],
    ));
    w.services.push(service("gone", "10.96.0.51", local));
    w.add_slice(slice(
        "gone",
        "http",
        8080,
        "TCP",
        &[("10.1.0.9", false, false, "node-2")],
    ));
    w.sync();
    let far = w.bridge.trace(client(1, "10.96.0.50", 80));
    assert!(
        far.outputs.is_empty() && far.controller == 0,
        "dropped: {:?}",
        far.lines
    );
    // Endpoints elsewhere, but none ready: nothing serves anywhere, so it is rejected.
    let gone = w.bridge.trace(client(2, "10.96.0.51", 80));
    assert!(
        gone.outputs.is_empty() && gone.controller == 1,
        "rejected: {:?}",
        gone.lines
    );
    // A local endpoint appears: served by it.
    w.add_slice(slice(
        "far",
        "http",
        8080,
        "TCP",
        &[
            ("10.1.0.8", true, false, "node-2"),
            ("10.1.0.7", true, false, "node-1"),
        ],
    ));
    w.sync();
    let t = w.bridge.trace(client(3, "10.96.0.50", 80));
    assert_eq!(
        t.outputs[0].packet.get(Field::IpDst),
        u128::from(ip("10.1.0.7")),
        "{:?}",
        t.lines
    );
}

#[test]
fn shared_endpoint_flows_are_reference_counted_and_stale_udp_is_flushed() {
    let mut w = World::new();
    let dns = |name: &str, vip: &str| {
        service(
            name,
            vip,
            json!({"ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}),
        )
    };
    w.services.push(dns("dns-a", "10.96.0.50"));
    w.services.push(dns("dns-b", "10.96.0.51"));
    let mut a = slice(
        "dns-a",
        "dns",
        5353,
        "UDP",
        &[("10.1.0.9", true, false, "n")],
    );
    a.metadata.name = Some("dns-a-1".into());
    let mut b = slice(
        "dns-b",
        "dns",
        5353,
        "UDP",
        &[("10.1.0.9", true, false, "n")],
    );
    b.metadata.name = Some("dns-b-1".into());
    w.add_slice(a);
    w.add_slice(b);
    w.sync();
    let endpoint_flows = |w: &World| {
        w.bridge
            .dump_flows(false)
            .lines()
            .filter(|l| l.contains("table=30"))
            .count()
    };
    assert_eq!(
        endpoint_flows(&w),
        1,
        "one DNAT flow for the shared endpoint"
    );
    let q =
        Packet::parse("in_port=5,udp,nw_src=10.1.9.9,nw_dst=10.96.0.50,udp_src=5000,udp_dst=53")
            .unwrap();
    assert_eq!(w.bridge.process(q, 60).ports(), vec![2]);
    assert_eq!(w.bridge.conntrack.len(), 1);
    // dns-a goes: the shared flow stays for dns-b; dns-a's UDP connection is flushed.
    w.services
        .retain(|s| s.metadata.name.as_deref() != Some("dns-a"));
    w.sync();
    assert_eq!(endpoint_flows(&w), 1);
    assert!(w.bridge.conntrack.is_empty(), "stale UDP entry flushed");
    let q =
        Packet::parse("in_port=5,udp,nw_src=10.1.9.9,nw_dst=10.96.0.51,udp_src=5000,udp_dst=53")
            .unwrap();
    assert_eq!(w.bridge.process(q, 60).ports(), vec![2]);
    w.services.clear();
    w.sync();
    assert_eq!(endpoint_flows(&w), 0);
    assert_eq!(w.bridge.groups().count(), 0);
}

#[test]
fn a_group_too_big_for_one_message_is_built_with_insert_buckets_in_the_same_bundle() {
    let mut w = World::new();
    w.services.push(service("big", "10.96.1.1", json!({})));
    let eps: Vec<(String, bool, bool, &str)> = (0..2000)
        .map(|i| {
            (
                format!("10.1.{}.{}", i / 250, 1 + i % 250),
                true,
                false,
                "n",
            )
        })
        .collect();
    let eps: Vec<(&str, bool, bool, &str)> = eps
        .iter()
        .map(|(a, r, t, n)| (a.as_str(), *r, *t, *n))
        .collect();
    w.add_slice(slice("big", "http", 8080, "TCP", &eps));
    w.sync();
    let g = w.bridge.groups().next().unwrap();
    assert_eq!(g.buckets.len(), 2000);
    let t = w.bridge.trace(client(7, "10.96.1.1", 80));
    assert_eq!(t.ports(), vec![2]);
}

#[test]
fn an_agent_restart_installs_a_new_round_and_an_ovs_restart_is_replayed() {
    let mut w = World::new();
    w.services.push(service("web", "10.96.0.10", json!({})));
    w.add_slice(slice(
        "web",
        "http",
        8080,
        "TCP",
        &[("10.1.0.5", true, false, "n")],
    ));
    w.sync();
    let before_flows = w.bridge.flow_count();
    // The agent restarts: round 2, knowing round 1 and the groups on the bridge.
    let existing: BTreeSet<u32> = w.bridge.groups().map(|g| g.group_id).collect();
    w.proxy = Proxy::new(config(), 2, Some(1), existing);
    // Meanwhile a service went away.
    w.services
        .push(service("gone-later", "10.96.0.11", json!({})));
    w.sync();
    let dump = w.bridge.dump_flows(false);
    assert!(
        !dump.contains("cookie=0x1"),
        "no round-1 flow is left: {dump}"
    );
    assert_eq!(
        w.bridge.flow_count(),
        before_flows + 2,
        "the new service's reject flow, and its ClusterIP's for unexposed ports"
    );
    assert_eq!(w.bridge.trace(client(1, "10.96.0.10", 80)).ports(), vec![2]);
    // OVS restarts: the proxy replays everything.
    w.bridge.restart();
    for f in [
        "table=0,priority=10,ip,actions=resubmit(,10)",
        "table=40,priority=10,ip,nw_dst=10.1.0.0/16,actions=output:2",
        "table=40,priority=5,ip,actions=output:1",
    ] {
        w.bridge.add_flow(parse_flow(f).unwrap()).unwrap();
    }
    w.proxy.bridge_restarted();
    w.sync();
    assert_eq!(w.bridge.trace(client(1, "10.96.0.10", 80)).ports(), vec![2]);
    assert_eq!(w.bridge.flow_count(), before_flows + 2);
}

#[test]
fn an_ovs_restart_learned_after_a_sync_to_the_new_bridge_still_replays() {
    // Found by the scenario state machine: OVS restarts, the proxy (not told yet) adds a
    // service with its group to the wiped bridge, then learns of the restart. The replay must
    // not fail on the group that is already there.
    let mut w = World::new();
    w.services.push(service("web", "10.96.0.10", json!({})));
    w.add_slice(slice(
        "web",
        "http",
        8080,
        "TCP",
        &[("10.1.0.5", true, false, "n")],
    ));
    w.sync();
    w.bridge.restart();
    w.services.push(service("api", "10.96.0.11", json!({})));
    w.add_slice(slice(
        "api",
        "http",
        8080,
        "TCP",
        &[("10.1.0.6", true, false, "n")],
    ));
    w.sync();
    assert!(
        w.bridge.groups().count() >= 1,
        "the new service's group went in"
    );
    w.proxy.bridge_restarted();
    let want = w.want();
    w.proxy
        .full_sync(&mut w.bridge, &want)
        .expect("the replay deletes and re-adds the group it may have added");
    for f in [
        "table=0,priority=10,ip,actions=resubmit(,10)",
        "table=40,priority=10,ip,nw_dst=10.1.0.0/16,actions=output:2",
    ] {
        w.bridge.add_flow(parse_flow(f).unwrap()).unwrap();
    }
    assert_eq!(w.bridge.trace(client(1, "10.96.0.10", 80)).ports(), vec![2]);
    assert_eq!(w.bridge.trace(client(1, "10.96.0.11", 80)).ports(), vec![2]);
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Change {
    /// Service i exists with protocol UDP when true, affinity when `sticky`, nodePort when `np`,
    /// a second port `q` when `two_ports` (both share the ClusterIP and its reject flow), on
    /// another ClusterIP when `moved`; `policy` bit 0: externalTrafficPolicy Local, bit 1:
    /// internalTrafficPolicy Local (a NodePort's ports split by who takes which endpoints).
    Service {
        i: u8,
        udp: bool,
        sticky: bool,
        np: bool,
        two_ports: bool,
        moved: bool,
        policy: u8,
    },
    DropService(u8),
    /// Slice of service i: endpoints from a pool of 6 addresses (bit set), ready flags.
    Endpoints {
        i: u8,
        set: u8,
        ready: u8,
    },
}

fn arb_change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (
            0u8..5,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0u8..4
        )
            .prop_map(
                |(i, udp, sticky, np, two_ports, moved, policy)| Change::Service {
                    i,
                    udp,
                    sticky,
                    np,
                    two_ports,
                    moved,
                    policy
                }
            ),
        (0u8..5).prop_map(Change::DropService),
        (0u8..5, any::<u8>(), any::<u8>()).prop_map(|(i, set, ready)| Change::Endpoints {
            i,
            set,
            ready
        }),
    ]
}

/// Applies `c`; returns the service's ports (every one it may have, split or not: all are
/// synced).
fn apply(w: &mut World, c: &Change) -> Vec<ServicePortKey> {
    let name = |i: u8| format!("svc-{i}");
    let key = |i: u8| {
        let mut keys = Vec::new();
        for port in ["p", "q"] {
            for suffix in ["", EXTERNAL_LOCAL_SUFFIX, NODE_PORT_SUFFIX] {
                keys.push(ServicePortKey {
                    namespace: "default".into(),
                    name: name(i).into(),
                    port: format!("{port}{suffix}").into(),
                });
            }
        }
        keys
    };
    match c {
        Change::Service {
            i,
            udp,
            sticky,
            np,
            two_ports,
            moved,
            policy,
        } => {
            let proto = if *udp { "UDP" } else { "TCP" };
            let mut ports = vec![json!({"name": "p", "port": 80, "protocol": proto})];
            if *np {
                ports[0]["nodePort"] = json!(30000 + u16::from(*i));
            }
            if *two_ports {
                ports.push(json!({"name": "q", "port": 81, "protocol": proto}));
            }
            let mut extra = json!({"ports": ports});
            if *np {
                extra["type"] = json!("NodePort");
            }
            if *sticky {
                extra["sessionAffinity"] = json!("ClientIP");
            }
            if policy & 1 != 0 {
                extra["externalTrafficPolicy"] = json!("Local");
            }
            if policy & 2 != 0 {
                extra["internalTrafficPolicy"] = json!("Local");
            }
            w.services
                .retain(|s| s.metadata.name.as_deref() != Some(&name(*i)));
            let subnet = if *moved { 1 } else { 0 };
            w.services.push(service(
                &name(*i),
                &format!("10.96.{subnet}.{}", 100 + i),
                extra,
            ));
            // The slice's protocol follows the service.
            if let Some(s) = w
                .slices
                .get_mut(&("default".to_string(), format!("{}-1", name(*i))))
            {
                for p in s.ports.iter_mut().flatten() {
                    p.protocol = Some(proto.into());
                }
            }
            key(*i)
        }
        Change::DropService(i) => {
            w.services
                .retain(|s| s.metadata.name.as_deref() != Some(&name(*i)));
            key(*i)
        }
        Change::Endpoints { i, set, ready } => {
            let proto = w
                .services
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(&name(*i)))
                .and_then(|s| s.spec.as_ref()?.ports.as_ref()?.first()?.protocol.clone())
                .unwrap_or_else(|| "TCP".into());
            let addrs: Vec<String> = (0..6)
                .filter(|b| set & (1 << b) != 0)
                .map(|b| format!("10.1.0.{}", 10 + b))
                .collect();
            let eps: Vec<(&str, bool, bool, &str)> = addrs
                .iter()
                .enumerate()
                .map(|(n, a)| {
                    (
                        a.as_str(),
                        ready & (1 << n) != 0,
                        ready & (1 << n) == 0,
                        if n % 2 == 0 { "node-1" } else { "node-2" },
                    )
                })
                .collect();
            w.add_slice(slice(&name(*i), "p", 8080, &proto, &eps));
            key(*i)
        }
    }
}

fn state(b: &Bridge) -> (Vec<String>, Vec<String>) {
    // Round numbers are the same in both; groups are compared by content, not id.
    // Group ids (in group actions and in service cookies) depend on allocation order.
    let mut flows: Vec<String> = b
        .dump_flows(false)
        .lines()
        .map(|l| {
            let mut l = l.to_string();
            if let Some(i) = l.find("group:") {
                l.truncate(i);
            }
            if let Some(rest) = l.trim_start().strip_prefix("cookie=0x") {
                let end = rest.find(',').unwrap_or(rest.len());
                let c = u64::from_str_radix(&rest[..end], 16).unwrap();
                let kind = (c >> 40) & 0xff;
                let norm = if kind == 2 {
                    c & !((1u64 << 40) - 1)
                } else {
                    c
                };
                l = format!(" cookie={norm:#x}{}", &rest[end..]);
            }
            l
        })
        .collect();
    flows.sort();
    let mut groups: Vec<String> = b
        .groups()
        .map(|g| {
            let mut g = g.clone();
            g.group_id = 0;
            g.to_string()
        })
        .collect();
    groups.sort();
    (flows, groups)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Syncing only what each change touched leaves the bridge exactly as a fresh proxy's full
    /// sync of the final state does.
    #[test]
    fn incremental_syncs_equal_a_from_scratch_sync(changes in prop::collection::vec(arb_change(), 1..25)) {
        let mut w = World::new();
        for c in &changes {
            let k = apply(&mut w, c);
            let want = w.want();
            // The changed service's ports.
            let changed: BTreeSet<ServicePortKey> = k.into_iter().collect();
            w.proxy.sync(&mut w.bridge, &want, &changed).unwrap();
        }
        let mut fresh = World::new();
        fresh.services = w.services.clone();
        fresh.slices = w.slices.clone();
        fresh.sync();
        prop_assert_eq!(state(&w.bridge), state(&fresh.bridge));
    }
}
