//! fake-ovs semantics, one behaviour at a time: ports, flow mods, groups, bundles, restart,
//! conntrack, counters, and the classifier against a linear scan.

use std::collections::BTreeMap;

use fake_ovs::conntrack::{EST, NEW, RPL, TRK, Tuple};
use fake_ovs::{Bridge, FlowMod, OvsError, Packet};
use nsx_core::ovs::flow::Match;
use nsx_core::ovs::{Field, parse_flow, parse_group};
use proptest::prelude::*;

fn bridge(flows: &[&str]) -> Bridge {
    let mut b = Bridge::new("br-int");
    for f in flows {
        b.add_flow(parse_flow(f).unwrap()).unwrap();
    }
    b
}

fn pkt(text: &str) -> Packet {
    Packet::parse(text).unwrap()
}

#[test]
fn port_numbers_are_handed_out_and_given_back_like_ovs() {
    let mut b = Bridge::new("br-int");
    let ids = BTreeMap::from([("iface-id".to_string(), "pod-a".to_string())]);
    assert_eq!(b.add_port("a", Some(5), ids.clone()).unwrap(), 1);
    assert_eq!(b.add_port("b", None, BTreeMap::new()).unwrap(), 2);
    assert_eq!(b.port("a").unwrap().external_ids["iface-id"], "pod-a");
    assert_eq!(b.port("a").unwrap().tag, Some(5));
    assert!(matches!(
        b.add_port("a", None, BTreeMap::new()),
        Err(OvsError::PortExists(_))
    ));
    b.del_port("a").unwrap();
    // A new name does not get the freed number at once...
    assert_eq!(b.add_port("c", None, BTreeMap::new()).unwrap(), 3);
    // ... and an old name gets its own number back.
    assert_eq!(b.add_port("a", None, BTreeMap::new()).unwrap(), 1);
    assert!(b.del_port("zz").is_err());
}

#[test]
fn add_replaces_identical_and_modify_delete_select_by_cover_cookie_and_strictness() {
    let mut b = bridge(&[
        "cookie=0x101,table=0,priority=10,ip,nw_dst=10.0.0.1,actions=output:1",
        "cookie=0x102,table=0,priority=20,ip,nw_dst=10.0.0.0/24,actions=output:2",
        "cookie=0x201,table=0,priority=10,tcp,nw_dst=10.0.0.1,tp_dst=80,actions=output:3",
        "cookie=0x202,table=1,priority=10,ip,actions=drop",
    ]);
    assert_eq!(b.flow_count(), 4);
    // Same table, priority and match: replaced (not added), counters kept (OpenFlow 1.3).
    b.process(pkt("in_port=9,ip,nw_src=1.1.1.1,nw_dst=10.0.0.1"), 100);
    b.add_flow(
        parse_flow("cookie=0x103,table=0,priority=20,ip,nw_dst=10.0.0.0/24,actions=output:4")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(b.flow_count(), 4);
    let dump = b.dump_flows(true);
    assert!(
        dump.contains("cookie=0x103") && !dump.contains("cookie=0x102"),
        "{dump}"
    );
    assert!(
        dump.contains(
            "n_packets=1, n_bytes=100, priority=20,ip,nw_dst=10.0.0.0/24 actions=output:4"
        ),
        "{dump}"
    );
    // Non-strict modify: every flow in table 0 the match covers, cookie 0x1xx only.
    let cover = parse_flow("ip,nw_dst=10.0.0.0/24,actions=drop")
        .unwrap()
        .matches;
    b.modify(FlowMod::Modify {
        table: 0,
        matches: cover.clone(),
        priority: None,
        cookie: 0x100,
        cookie_mask: 0xf00,
        actions: parse_flow("actions=output:9").unwrap().actions,
    })
    .unwrap();
    let t = b.trace(pkt(
        "in_port=5,tcp,nw_src=1.1.1.1,nw_dst=10.0.0.1,tcp_dst=80",
    ));
    assert_eq!(
        t.ports(),
        vec![9],
        "priority 20 flow modified: {:?}",
        t.lines
    );
    let dump = b.dump_flows(false);
    assert!(
        dump.contains("tp_dst=80 actions=output:3"),
        "cookie 0x201 untouched: {dump}"
    );
    // Strict delete needs the exact match and priority.
    b.modify(FlowMod::Delete {
        table: Some(0),
        matches: cover,
        priority: Some(10),
        cookie: 0,
        cookie_mask: 0,
    })
    .unwrap();
    assert_eq!(
        b.flow_count(),
        4,
        "no flow has exactly that match at priority 10"
    );
    // Non-strict delete everywhere by cookie.
    b.modify(FlowMod::Delete {
        table: None,
        matches: Match::default(),
        priority: None,
        cookie: 0x200,
        cookie_mask: 0xf00,
    })
    .unwrap();
    assert_eq!(b.flow_count(), 2);
}

#[test]
fn groups_keep_referential_integrity() {
    let mut b = Bridge::new("br-int");
    let err = b
        .add_flow(parse_flow("priority=1,ip,actions=group:7").unwrap())
        .unwrap_err();
    assert_eq!(err, OvsError::BadOutGroup(7));
    let err = b
        .add_group(parse_group("group_id=8,type=all,bucket=actions=group:9").unwrap())
        .unwrap_err();
    assert_eq!(err, OvsError::BadOutGroup(9));
    b.add_group(parse_group("group_id=7,type=select,bucket=output:1,bucket=output:2").unwrap())
        .unwrap();
    assert_eq!(
        b.add_group(parse_group("group_id=7,type=all,bucket=output:1").unwrap()),
        Err(OvsError::GroupExists(7))
    );
    assert_eq!(
        b.modify(FlowMod::ModGroup(
            parse_group("group_id=70,type=all,bucket=output:1").unwrap()
        )),
        Err(OvsError::UnknownGroup(70))
    );
    b.add_flow(parse_flow("priority=1,ip,actions=group:7").unwrap())
        .unwrap();
    b.add_flow(parse_flow("priority=2,tcp,actions=output:3").unwrap())
        .unwrap();
    // Deleting a group deletes the flows that use it.
    b.modify(FlowMod::DelGroup(7)).unwrap();
    assert_eq!(b.flow_count(), 1);
    assert!(b.dump_flows(false).contains("tcp actions=output:3"));
    assert!(
        b.add_group(
            parse_group("group_id=3,type=indirect,bucket=output:1,bucket=output:2").unwrap()
        )
        .is_err(),
        "an indirect group has one bucket"
    );
}

#[test]
fn a_bundle_is_all_or_nothing() {
    let mut b = bridge(&["priority=5,ip,actions=output:1"]);
    let before = b.dump_flows(false);
    let err = b
        .bundle(vec![
            FlowMod::Add(parse_flow("priority=6,tcp,actions=output:2").unwrap()),
            FlowMod::AddGroup(parse_group("group_id=1,type=all,bucket=output:2").unwrap()),
            FlowMod::Delete {
                table: None,
                matches: Match::default(),
                priority: None,
                cookie: 0,
                cookie_mask: 0,
            },
            FlowMod::Add(parse_flow("priority=7,udp,actions=group:99").unwrap()),
        ])
        .unwrap_err();
    assert!(matches!(err, OvsError::Bundle { index: 3, .. }), "{err}");
    assert_eq!(b.dump_flows(false), before, "nothing of the bundle stays");
    assert!(b.group(1).is_none());
    b.bundle(vec![
        FlowMod::AddGroup(parse_group("group_id=1,type=all,bucket=output:2").unwrap()),
        FlowMod::Add(parse_flow("priority=7,udp,actions=group:1").unwrap()),
    ])
    .unwrap();
    assert_eq!(b.flow_count(), 2);
}

#[test]
fn a_restart_wipes_flows_and_groups_but_keeps_ports_and_connections() {
    let mut b = bridge(&["priority=5,ip,actions=ct(commit,zone=1),output:2"]);
    b.add_group(parse_group("group_id=1,type=all,bucket=output:2").unwrap())
        .unwrap();
    b.add_port("p1", None, BTreeMap::new()).unwrap();
    b.process(
        pkt("in_port=1,udp,nw_src=10.0.0.1,nw_dst=10.0.0.2,udp_src=5,udp_dst=53"),
        60,
    );
    assert_eq!(b.conntrack.len(), 1);
    b.restart();
    assert_eq!(b.flow_count(), 0);
    assert!(b.group(1).is_none());
    assert!(b.port("p1").is_some());
    assert_eq!(b.conntrack.len(), 1);
    assert_eq!(
        b.trace(pkt("in_port=1,ip,nw_src=1.1.1.1,nw_dst=2.2.2.2"))
            .ports(),
        Vec::<u32>::new()
    );
}

#[test]
fn conntrack_tracks_nats_un_nats_replies_marks_expires_and_flushes() {
    let mut b = bridge(&[
        "table=0,priority=100,ct_state=-trk,ip,actions=ct(table=1,zone=5,nat)",
        "table=1,priority=100,ct_state=+trk+new,tcp,nw_dst=10.96.0.10,tp_dst=80,actions=ct(commit,table=2,zone=5,exec(set_field:0x7->ct_mark),nat(dst=10.1.0.5:8080))",
        "table=1,priority=90,ct_state=+trk+est,ip,actions=resubmit(,2)",
        "table=1,priority=80,ct_state=+trk+new,ip,actions=ct(commit,table=2,zone=5)",
        "table=2,priority=10,ip,nw_dst=10.1.0.5,actions=output:2",
        "table=2,priority=10,ip,nw_dst=10.1.0.9,actions=output:1",
    ]);
    b.now_ms = 1_000;
    let syn = pkt("in_port=1,tcp,nw_src=10.1.0.9,nw_dst=10.96.0.10,tcp_src=40000,tcp_dst=80");
    // A trace changes nothing.
    let t = b.trace(syn);
    assert_eq!(t.ports(), vec![2]);
    assert!(b.conntrack.is_empty());
    let t = b.process(syn, 60);
    assert_eq!(t.ports(), vec![2], "{:?}", t.lines);
    let out = t.outputs[0].packet;
    assert_eq!(out.get(Field::IpDst), 0x0a01_0005);
    assert_eq!(out.get(Field::TpDst), 8080);
    assert_eq!(out.get(Field::CtMark), 0x7);
    assert_eq!(out.get(Field::CtState) & (TRK | NEW), TRK | NEW);
    // The reply from the backend is un-NATed back to the VIP and is established.
    let reply = pkt("in_port=2,tcp,nw_src=10.1.0.5,nw_dst=10.1.0.9,tcp_src=8080,tcp_dst=40000");
    let t = b.process(reply, 60);
    assert_eq!(t.ports(), vec![1], "{:?}", t.lines);
    let back = t.outputs[0].packet;
    assert_eq!(
        back.get(Field::IpSrc),
        0x0a60_000a,
        "source is the VIP again"
    );
    assert_eq!(back.get(Field::TpSrc), 80);
    assert_eq!(back.get(Field::CtState) & (EST | RPL), EST | RPL);
    // The next packet of the connection is established, still NATed, no new entry.
    let t = b.process(syn, 60);
    assert_eq!(t.outputs[0].packet.get(Field::CtState) & EST, EST);
    assert_eq!(b.conntrack.len(), 1);
    // Flush by the original tuple; then UDP entries expire after 30 s unreplied.
    let orig = Tuple::of(&syn);
    assert_eq!(b.conntrack.flush(Some(5), Some(orig)), 1);
    b.process(
        pkt("in_port=1,udp,nw_src=10.1.0.9,nw_dst=10.1.0.5,udp_src=5,udp_dst=53"),
        60,
    );
    assert_eq!(b.conntrack.len(), 1);
    b.conntrack.expire(1_000 + 29_999);
    assert_eq!(b.conntrack.len(), 1);
    b.conntrack.expire(1_000 + 30_000);
    assert!(b.conntrack.is_empty());
}

#[test]
fn counters_learn_and_the_resubmit_limit() {
    let mut b = bridge(&[
        "table=0,priority=10,tcp,actions=learn(table=5,priority=100,eth_type=0x800,nw_proto=6,NXM_OF_IP_SRC[],load:0x1->NXM_NX_REG0[]),resubmit(,5)",
        "table=5,priority=1,actions=output:2",
        "table=9,priority=1,actions=resubmit(,9)",
    ]);
    let p = pkt("in_port=1,tcp,nw_src=10.0.0.7,nw_dst=10.0.0.8,tcp_src=1,tcp_dst=2");
    let t = b.process(p, 100);
    assert_eq!(t.learned, 1);
    assert_eq!(b.flow_count(), 4);
    let dump = b.dump_flows(true);
    assert!(
        dump.contains("table=5, n_packets=0, n_bytes=0, priority=100,ip,nw_src=10.0.0.7,nw_proto=6 actions=load:0x1->NXM_NX_REG0[]")
            || dump.contains("priority=100,tcp,nw_src=10.0.0.7 actions=load:0x1->NXM_NX_REG0[]"),
        "{dump}"
    );
    assert!(dump.contains("table=0, n_packets=1, n_bytes=100"), "{dump}");
    // The learned flow now wins in table 5 (it has no output): dropped.
    assert_eq!(b.process(p, 100).ports(), Vec::<u32>::new());
    let t = b.trace(pkt("in_port=1,ip,nw_src=1.1.1.1,nw_dst=2.2.2.2"));
    assert!(t.ports().is_empty());
    b.add_flow(parse_flow("table=0,priority=1,ip,actions=resubmit(,9)").unwrap())
        .unwrap();
    let t = b.trace(pkt("in_port=1,ip,nw_src=1.1.1.1,nw_dst=2.2.2.2"));
    assert!(
        t.lines.iter().any(|l| l.contains("over 64 resubmit")),
        "{:?}",
        t.lines.last()
    );
}

fn arb_flow() -> impl Strategy<Value = String> {
    (
        0u16..4,
        prop::option::of(0u8..4),
        prop::option::of((0u8..4, 8u8..=32)),
        prop::option::of(0u16..4),
        prop::option::of((0u32..4, prop::bool::ANY)),
    )
        .prop_map(|(prio, port, dst, tp, reg)| {
            let mut s = format!("priority={}", prio * 10);
            if let Some(p) = port {
                s.push_str(&format!(",in_port={p}"));
            }
            s.push_str(",tcp");
            if let Some((d, len)) = dst {
                s.push_str(&format!(",nw_dst=10.0.{d}.0/{len}"));
            }
            if let Some(t) = tp {
                s.push_str(&format!(",tp_dst={}", 80 + t));
            }
            if let Some((r, masked)) = reg {
                if masked {
                    s.push_str(&format!(",reg0={r:#x}/0x3"));
                } else {
                    s.push_str(&format!(",reg0={r:#x}"));
                }
            }
            s
        })
}

proptest! {
    /// The tuple-space lookup picks what a linear scan over every flow would: the highest
    /// priority match (the oldest among equals), after random adds and deletes.
    #[test]
    fn lookup_equals_a_linear_scan(
        flows in prop::collection::vec(arb_flow(), 1..40),
        deletes in prop::collection::vec(0usize..40, 0..10),
        packets in prop::collection::vec((0u32..4, 0u8..4, 0u8..4, 78u16..86, 0u32..8), 1..30),
    ) {
        let mut b = Bridge::new("br");
        let mut live: Vec<(usize, nsx_core::ovs::Flow)> = Vec::new();
        for (i, f) in flows.iter().enumerate() {
            // Outputs well above the in_ports: OVS never outputs to the input port.
            let flow = parse_flow(&format!("{f},actions=output:{}", i + 100)).unwrap();
            b.add_flow(flow.clone()).unwrap();
            live.retain(|(_, l)| !(l.priority == flow.priority && l.matches == flow.matches));
            live.push((i + 100, flow));
        }
        for d in deletes {
            if live.is_empty() { break; }
            let (_, f) = live.remove(d % live.len());
            b.modify(FlowMod::Delete { table: Some(0), matches: f.matches.clone(), priority: Some(f.priority), cookie: 0, cookie_mask: 0 }).unwrap();
        }
        for (port, d, host, tp, reg) in packets {
            let mut p = pkt(&format!("in_port={port},tcp,nw_src=1.1.1.1,nw_dst=10.0.{d}.{host},tcp_src=1,tcp_dst={tp}"));
            p.set(Field::Reg(0), u128::from(reg));
            let want = live
                .iter()
                .filter(|(_, f)| p.matches(&f.matches))
                .max_by(|a, b| a.1.priority.cmp(&b.1.priority).then(b.0.cmp(&a.0)))
                .map(|(n, _)| *n as u32);
            let got = b.trace(p).ports().first().copied();
            prop_assert_eq!(got, want);
        }
    }
}

/// A pipeline with every kind of action the agent and the proxy use: VLANs, registers,
/// resubmits, conntrack with NAT and marks, a select group, learn, the controller.
const PIPELINE: &[&str] = &[
    "table=0,priority=100,in_port=1,dl_vlan=5,actions=pop_vlan,resubmit(,10)",
    "table=0,priority=90,ct_state=-trk,ip,actions=ct(table=10,zone=5,nat)",
    "table=0,priority=0,actions=drop",
    "table=10,priority=200,tcp,nw_dst=10.96.0.10,tp_dst=80,ct_state=+trk+new,actions=group:1",
    "table=10,priority=190,ct_state=+trk+est,ip,actions=resubmit(,20)",
    "table=10,priority=150,udp,actions=learn(table=30,priority=100,eth_type=0x800,nw_proto=17,NXM_OF_IP_SRC[],load:0x1->NXM_NX_REG0[]),resubmit(,30)",
    "table=10,priority=100,ip,nw_dst=10.1.0.0/16,actions=load:0x2->NXM_NX_REG1[],resubmit(,15)",
    "table=10,priority=50,tcp,tp_dst=81,actions=CONTROLLER:65535",
    "table=15,priority=10,reg1=0x2,actions=push_vlan:0x8100,set_field:4103->vlan_vid,output:3",
    "table=20,priority=10,ip,actions=output:2",
    "table=30,priority=100,reg0=0x1,actions=output:4",
    "table=30,priority=1,actions=output:2",
];

proptest! {
    /// `forward` (no explanation) is `process`: for the same packets in the same order, the
    /// same outputs, controller copies, learned flows, counters and conntrack entries.
    #[test]
    fn forward_is_process_without_the_explanation(
        packets in prop::collection::vec((1u32..3, 0u8..3, 0u8..4, 0u8..3, 78u16..83, any::<bool>()), 1..40),
    ) {
        let group = "group_id=1,type=select,selection_method=hash,fields(ip_src,tcp_src),bucket=bucket_id:0,actions=ct(commit,table=20,zone=5,exec(set_field:0x7->ct_mark),nat(dst=10.1.0.21:8080)),bucket=bucket_id:1,actions=ct(commit,table=20,zone=5,nat(dst=10.1.0.22:8080))";
        let mut explained = bridge(&[]);
        let mut quiet = bridge(&[]);
        for b in [&mut explained, &mut quiet] {
            b.add_group(parse_group(group).unwrap()).unwrap();
            for f in PIPELINE {
                b.add_flow(parse_flow(f).unwrap()).unwrap();
            }
        }
        for (port, proto, dst, src, tp, vlan) in packets {
            let dst = ["10.96.0.10", "10.1.0.21", "10.1.3.4", "10.2.0.1"][dst as usize];
            let proto = ["tcp", "udp", "tcp"][proto as usize];
            let vlan = if vlan { ",dl_vlan=5" } else { "" };
            let p = pkt(&format!(
                "in_port={port}{vlan},{proto},nw_src=10.1.0.{src},nw_dst={dst},{proto}_src=4000{src},{proto}_dst={tp}"
            ));
            let a = explained.process(p, 64);
            let b = quiet.forward(p, 64);
            prop_assert!(!a.lines.is_empty() && b.lines.is_empty());
            prop_assert_eq!(&a.outputs, &b.outputs);
            prop_assert_eq!((a.controller, a.normal, a.learned), (b.controller, b.normal, b.learned));
        }
        prop_assert_eq!(explained.dump_flows(true), quiet.dump_flows(true));
        let conns = |b: &Bridge| b.conntrack.connections().map(|c| format!("{c:?}")).collect::<Vec<_>>();
        prop_assert_eq!(conns(&explained), conns(&quiet));
    }
}
