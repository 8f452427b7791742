//! fake-ovs against a real ovs-vswitchd 3.1: the same flows and groups (the shapes
//! nsx-kube-proxy and the node agent use: VLAN push and pop, resubmits, registers, masked
//! matches, select groups with `selection_method=hash` whose buckets ct-commit with DNAT and
//! recirculate, an `all` group) go into both; many generated packets are traced in both
//! (`ofproto/trace` on the real one); the ports each packet leaves on, the VLAN it carries
//! there and the NAT address its select-group bucket chose must agree.
//!
//! Needs Debian's openvswitch-switch (scripts/test.sh installs it); fails without it.

use fake_ovs::real::Sandbox;
use fake_ovs::{Bridge, Packet};
use nsx_core::ovs::{Field, parse_flow, parse_group};

const GROUPS: &[&str] = &[
    "group_id=1,type=select,selection_method=hash,fields(ip_src,tcp_src),bucket=bucket_id:0,weight:100,actions=ct(commit,table=20,zone=5,nat(dst=10.1.0.21:8080)),bucket=bucket_id:1,weight:50,actions=ct(commit,table=20,zone=5,nat(dst=10.1.0.22:8080)),bucket=bucket_id:2,weight:100,actions=ct(commit,table=20,zone=5,nat(dst=10.1.0.23:8080))",
    "group_id=2,type=select,selection_method=hash,fields(ip_src,ip_dst,udp_src),bucket=bucket_id:0,weight:100,actions=ct(commit,table=20,zone=6,nat(dst=10.1.1.31:5353)),bucket=bucket_id:7,weight:100,actions=ct(commit,table=20,zone=6,nat(dst=10.1.1.32:5353))",
    "group_id=3,type=all,bucket=bucket_id:0,actions=output:2,bucket=bucket_id:1,actions=output:3",
];

const FLOWS: &[&str] = &[
    "table=0,priority=100,in_port=1,dl_vlan=5,actions=pop_vlan,resubmit(,10)",
    "table=0,priority=90,in_port=1,vlan_tci=0x0000/0x1000,actions=resubmit(,10)",
    "table=0,priority=80,in_port=2,vlan_tci=0x0000/0x1000,actions=push_vlan:0x8100,set_field:4101->vlan_vid,output:1",
    "table=0,priority=0,actions=drop",
    "table=10,priority=200,tcp,nw_dst=10.96.0.10,tp_dst=80,actions=group:1",
    "table=10,priority=200,udp,nw_dst=10.96.0.11,tp_dst=53,actions=group:2",
    "table=10,priority=150,ip,nw_dst=10.96.0.12,actions=group:3",
    "table=10,priority=100,ip,nw_dst=10.1.0.0/16,actions=load:0x2->NXM_NX_REG1[],resubmit(,15)",
    "table=10,priority=90,ip,nw_src=10.1.0.0/16,nw_dst=10.2.0.0/255.255.0.0,actions=set_field:0x3->reg1,resubmit(,15)",
    "table=10,priority=50,tcp,tp_dst=0x50/0xfff0,actions=output:3",
    "table=10,priority=0,actions=drop",
    "table=15,priority=10,reg1=0x2,actions=output:2",
    "table=15,priority=10,reg1=0x3,actions=push_vlan:0x8100,set_field:4103->vlan_vid,output:3",
    "table=20,priority=10,ct_state=+trk+new,ip,actions=output:2",
    "table=20,priority=5,ct_state=+trk,ip,actions=output:3",
];

/// A small deterministic generator (xorshift).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// What the real trace says: the ports (all `Datapath actions:` lines, in order), the VLAN
/// pushed before each output, and the DNAT of a `ct(...)`.
struct Real {
    ports: Vec<u32>,
    vlans: Vec<Option<u16>>,
    nat: Option<String>,
}

fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn read_real(trace: &str) -> Real {
    let mut r = Real {
        ports: vec![],
        vlans: vec![],
        nat: None,
    };
    for line in trace.lines() {
        let Some(acts) = line.strip_prefix("Datapath actions: ") else {
            continue;
        };
        let mut vlan: Option<u16> = None;
        for a in split_top(acts) {
            if let Ok(p) = a.parse::<u32>() {
                r.ports.push(p);
                r.vlans.push(vlan);
            } else if let Some(v) = a.strip_prefix("push_vlan(vid=") {
                vlan = v.split(',').next().and_then(|x| x.parse().ok());
            } else if a == "pop_vlan" {
                vlan = None;
            } else if a.starts_with("ct(")
                && let Some(i) = a.find("nat(dst=")
            {
                let rest = &a[i + 8..];
                r.nat = Some(rest[..rest.find(')').unwrap_or(rest.len())].to_string());
            }
        }
    }
    r
}

#[test]
fn fake_ovs_forwards_nats_and_balances_like_a_real_ovs() {
    let ovs = Sandbox::start("diff");
    ovs.vsctl(&[
        "add-port",
        "br0",
        "p3",
        "--",
        "set",
        "interface",
        "p3",
        "type=dummy",
        "ofport_request=3",
    ]);
    let mut fake = Bridge::new("br0");
    for g in GROUPS {
        ovs.ofctl_ok("OpenFlow15", "add-group", g);
        fake.add_group(parse_group(g).unwrap()).unwrap();
    }
    for f in FLOWS {
        ovs.ofctl_ok("OpenFlow13", "add-flow", f);
        fake.add_flow(parse_flow(f).unwrap()).unwrap();
    }
    let mut g = Gen(0x5eed_1234_abcd_0001);
    let mut compared = 0;
    let mut balanced = std::collections::BTreeSet::new();
    for _ in 0..250 {
        let in_port = *g.pick(&[1u32, 1, 1, 2]);
        let vlan = *g.pick(&["", "dl_vlan=5,", "dl_vlan=7,"]);
        let proto = *g.pick(&["tcp", "tcp", "udp", "icmp"]);
        let net = *g.pick(&[1, 3]);
        let src = format!("10.{net}.{}.{}", g.next() % 4, 1 + g.next() % 250);
        let dst = match g.next() % 6 {
            0 => "10.96.0.10".to_string(),
            1 => "10.96.0.11".to_string(),
            2 => "10.96.0.12".to_string(),
            3 => format!("10.1.{}.{}", g.next() % 4, 1 + g.next() % 250),
            4 => format!("10.2.{}.{}", g.next() % 4, 1 + g.next() % 250),
            _ => "8.8.8.8".to_string(),
        };
        // Most packets to a VIP use the service's protocol and port.
        let (proto, forced) = match (dst.as_str(), g.next() % 4) {
            ("10.96.0.10", 0..=2) => ("tcp", Some(80)),
            ("10.96.0.11", 0..=2) => ("udp", Some(53)),
            _ => (proto, None),
        };
        let l4 = if proto == "icmp" {
            "icmp_type=8,icmp_code=0".to_string()
        } else {
            let any = 1 + g.next() % 60000;
            let dport = forced.unwrap_or(*g.pick(&[80u64, 53, 85, 8080, any]));
            // The trace syntax wants the protocol's own names (tp_src is TCP's there).
            format!(
                "{proto}_src={},{proto}_dst={dport}",
                1024 + g.next() % 60000
            )
        };
        let text =
            format!("in_port={in_port},{vlan}{proto},nw_src={src},nw_dst={dst},nw_ttl=64,{l4}");
        let real = read_real(&ovs.trace(&text));
        let packet = Packet::parse(&text).unwrap();
        let t = fake.trace(packet);
        let ports = t.ports();
        assert_eq!(
            ports,
            real.ports,
            "{text}: fake {:?} vs real\n{}",
            t.lines,
            ovs.trace(&text)
        );
        let vlans: Vec<Option<u16>> = t
            .outputs
            .iter()
            .map(|o| {
                let tci = o.packet.get(Field::VlanTci);
                (tci & 0x1000 != 0).then_some((tci & 0xfff) as u16)
            })
            .collect();
        // The real datapath shows a push only where the VLAN changes; compare where it shows one.
        for (i, rv) in real.vlans.iter().enumerate() {
            if rv.is_some() {
                assert_eq!(vlans[i], *rv, "{text}: VLAN at output {i}");
            }
        }
        if let Some(nat) = &real.nat {
            let o = t.outputs.last().expect("a NATed packet leaves");
            let ours = format!(
                "{}:{}",
                std::net::Ipv4Addr::from(o.packet.get(Field::IpDst) as u32),
                o.packet.get(Field::TpDst)
            );
            assert_eq!(&ours, nat, "{text}: select bucket / NAT");
            balanced.insert(ours);
        }
        compared += 1;
    }
    assert_eq!(compared, 250);
    assert!(
        balanced.len() >= 4,
        "the packets should reach most backends: {balanced:?}"
    );
}
