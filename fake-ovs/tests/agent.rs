//! The node agent on fake-ovs: pods wired with their VLAN so every packet goes through the
//! uplink (also between pods of one node), SpoofGuard, ClusterIP through the proxy with the
//! reply un-NATed, a pod reaching itself through its Service (hairpin), idempotent ADD and DEL, port-number reuse, DEL overtaking ADD, agent and
//! OVS restarts.

use std::collections::{BTreeMap, BTreeSet};

use fake_ovs::{Bridge, Packet};
use nsx_core::agent::{Agent, AgentConfig, AgentError, PodNetwork, PodRequest, PodSwitch};
use nsx_core::ovs::Field;
use nsx_core::proxy::{Endpoint, Proxy, ProxyConfig, ServicePort, ServicePortKey};

const UPLINK: u32 = 100;

fn net(ip: &str, vlan: u16) -> PodNetwork {
    PodNetwork::parse(&format!(
        r#"{{"ip": "{ip}/24", "mac": "02:00:00:00:00:{vlan:02x}", "gateway": "10.4.0.1", "vlan": {vlan}, "logical_port_id": "lp-{vlan}"}}"#
    ))
    .unwrap()
}

fn req(cid: &str, name: &str) -> PodRequest {
    PodRequest {
        container_id: cid.into(),
        namespace: "shop".into(),
        name: name.into(),
        ifname: "eth0".into(),
    }
}

fn node() -> (Bridge, Agent) {
    let mut b = Bridge::new("br-int");
    assert_eq!(b.add_port("uplink-pad", None, BTreeMap::new()).unwrap(), 1);
    (b, Agent::new(AgentConfig { uplink: UPLINK }))
}

fn from_pod(ofport: u32, src: &str, dst: &str) -> Packet {
    Packet::parse(&format!(
        "in_port={ofport},tcp,nw_src={src},nw_dst={dst},tcp_src=40000,tcp_dst=80"
    ))
    .unwrap()
}

fn from_uplink(vlan: u16, src: &str, dst: &str, sport: u16, dport: u16) -> Packet {
    Packet::parse(&format!(
        "in_port={UPLINK},dl_vlan={vlan},tcp,nw_src={src},nw_dst={dst},tcp_src={sport},tcp_dst={dport}"
    ))
    .unwrap()
}

fn proxy_with(b: &mut Bridge, vip: u32, ep: (u32, u16)) -> Proxy {
    let mut p = Proxy::new(
        ProxyConfig {
            node_name: "node-1".into(),
            node_ips: vec![],
        },
        1,
        None,
        BTreeSet::new(),
    );
    let key = ServicePortKey {
        namespace: "shop".into(),
        name: "web".into(),
        port: "http".into(),
    };
    let want: BTreeMap<ServicePortKey, ServicePort> = [(
        key.clone(),
        ServicePort {
            key,
            cluster_ip: vip,
            port: 80,
            protocol: 6,
            node_port: None,
            no_local_endpoints: false,
            scope: Default::default(),
            affinity_timeout: None,
            endpoints: vec![Endpoint {
                ip: ep.0,
                port: ep.1,
            }],
        },
    )]
    .into();
    p.full_sync(b, &want).unwrap();
    p
}

fn ip(s: &str) -> u32 {
    u32::from(s.parse::<std::net::Ipv4Addr>().unwrap())
}

#[test]
fn pod_traffic_always_leaves_through_the_uplink_with_the_pods_vlan() {
    let (mut b, mut agent) = node();
    let _proxy = proxy_with(&mut b, ip("10.96.0.10"), (ip("10.4.0.20"), 8080));
    let a = agent
        .add(&mut b, &req("c-a", "a"), net("10.4.0.5", 5))
        .unwrap();
    let bb = agent
        .add(&mut b, &req("c-b", "b"), net("10.4.0.6", 6))
        .unwrap();
    // a -> b, both on this node: out of the uplink tagged 5, never straight to b.
    let t = b.trace(from_pod(a.ofport, "10.4.0.5", "10.4.0.6"));
    assert_eq!(t.ports(), vec![UPLINK], "{:?}", t.lines);
    assert_eq!(t.outputs[0].packet.get(Field::VlanTci), 0x1005);
    // NSX sends it back tagged 6: delivered to b untagged.
    let t = b.trace(from_uplink(6, "10.4.0.5", "10.4.0.6", 40000, 80));
    assert_eq!(t.ports(), vec![bb.ofport], "{:?}", t.lines);
    assert_eq!(t.outputs[0].packet.get(Field::VlanTci), 0);
    // An unknown VLAN goes nowhere.
    assert!(
        b.trace(from_uplink(9, "10.4.0.5", "10.4.0.6", 1, 80))
            .ports()
            .is_empty()
    );
    // SpoofGuard: a's port with b's address.
    assert!(
        b.trace(from_pod(a.ofport, "10.4.0.6", "10.4.0.9"))
            .ports()
            .is_empty()
    );
    // ARP leaves tagged.
    let arp = Packet::parse(&format!("in_port={},arp", a.ofport)).unwrap();
    let t = b.trace(arp);
    assert_eq!(t.ports(), vec![UPLINK]);
    assert_eq!(t.outputs[0].packet.get(Field::VlanTci), 0x1005);
}

#[test]
fn a_clusterip_connection_is_dnated_on_the_way_out_and_un_nated_on_the_way_back() {
    let (mut b, mut agent) = node();
    let _proxy = proxy_with(&mut b, ip("10.96.0.10"), (ip("10.4.0.20"), 8080));
    let a = agent
        .add(&mut b, &req("c-a", "a"), net("10.4.0.5", 5))
        .unwrap();
    let t = b.process(from_pod(a.ofport, "10.4.0.5", "10.96.0.10"), 60);
    assert_eq!(t.ports(), vec![UPLINK], "{:?}", t.lines);
    let out = t.outputs[0].packet;
    assert_eq!(out.get(Field::IpDst), u128::from(ip("10.4.0.20")));
    assert_eq!(out.get(Field::TpDst), 8080);
    assert_eq!(out.get(Field::VlanTci), 0x1005);
    let t = b.process(from_uplink(5, "10.4.0.20", "10.4.0.5", 8080, 40000), 60);
    assert_eq!(t.ports(), vec![a.ofport], "{:?}", t.lines);
    let back = t.outputs[0].packet;
    assert_eq!(back.get(Field::IpSrc), u128::from(ip("10.96.0.10")));
    assert_eq!(back.get(Field::TpSrc), 80);
}

#[test]
fn a_pod_reaches_itself_through_its_service_without_leaving_the_node() {
    let (mut b, mut agent) = node();
    // a is the only endpoint of the service it dials.
    let _proxy = proxy_with(&mut b, ip("10.96.0.10"), (ip("10.4.0.5"), 8080));
    let a = agent
        .add(&mut b, &req("c-a", "a"), net("10.4.0.5", 5))
        .unwrap();
    let other = agent
        .add(&mut b, &req("c-b", "b"), net("10.4.0.6", 6))
        .unwrap();
    let hairpin = u128::from(nsx_core::agent::wiring::HAIRPIN_SOURCE);
    let gateway_mac = 0x02_00_0a_04_00_01_u128;
    for round in 0..2 {
        // The SYN (then a later segment of the same connection): back out of a's own port,
        // DNATed to a, from the hairpin address, addressed to a's MAC by the gateway's.
        let mut syn = from_pod(a.ofport, "10.4.0.5", "10.96.0.10");
        syn.set(Field::EthSrc, 0x02_00_00_00_00_05);
        syn.set(Field::EthDst, gateway_mac);
        let t = b.process(syn, 60);
        assert_eq!(t.ports(), vec![a.ofport], "round {round}: {:?}", t.lines);
        let got = t.outputs[0].packet;
        assert_eq!(got.get(Field::IpSrc), hairpin);
        assert_eq!(got.get(Field::TpSrc), 40000);
        assert_eq!(got.get(Field::IpDst), u128::from(ip("10.4.0.5")));
        assert_eq!(got.get(Field::TpDst), 8080);
        assert_eq!(got.get(Field::EthDst), 0x02_00_00_00_00_05);
        assert_eq!(got.get(Field::EthSrc), gateway_mac);
        assert_eq!(got.get(Field::VlanTci), 0, "never tagged: it did not leave");
        // a answers the hairpin address: back to a, from the VIP it dialled.
        let mut reply = Packet::parse(&format!(
            "in_port={},tcp,nw_src=10.4.0.5,nw_dst=169.254.169.252,tcp_src=8080,tcp_dst=40000",
            a.ofport
        ))
        .unwrap();
        reply.set(Field::EthSrc, 0x02_00_00_00_00_05);
        reply.set(Field::EthDst, gateway_mac);
        let t = b.process(reply, 60);
        assert_eq!(t.ports(), vec![a.ofport], "round {round}: {:?}", t.lines);
        let back = t.outputs[0].packet;
        assert_eq!(back.get(Field::IpSrc), u128::from(ip("10.96.0.10")));
        assert_eq!(back.get(Field::TpSrc), 80);
        assert_eq!(back.get(Field::IpDst), u128::from(ip("10.4.0.5")));
        assert_eq!(back.get(Field::TpDst), 40000);
        assert_eq!(back.get(Field::EthDst), 0x02_00_00_00_00_05);
    }
    // Another pod dialling the same service still goes out through NSX to a.
    let t = b.process(from_pod(other.ofport, "10.4.0.6", "10.96.0.10"), 60);
    assert_eq!(t.ports(), vec![UPLINK], "{:?}", t.lines);
    assert_eq!(
        t.outputs[0].packet.get(Field::IpSrc),
        u128::from(ip("10.4.0.6"))
    );
    assert_eq!(t.outputs[0].packet.get(Field::VlanTci), 0x1006);
    // The hairpin address from another pod is not a's: b's own flows turn it to b, never to a.
    let stray = Packet::parse(&format!(
        "in_port={},tcp,nw_src=10.4.0.6,nw_dst=169.254.169.252,tcp_src=8080,tcp_dst=40000",
        other.ofport
    ))
    .unwrap();
    let t = b.process(stray, 60);
    assert!(!t.ports().contains(&a.ofport), "{:?}", t.lines);
}

#[test]
fn a_malformed_mac_in_the_annotation_is_refused() {
    for mac in [
        "02:00:00:00:00",
        "02:00:00:00:00:0g",
        "0200.0000.0005",
        "02:00:00:00:00:005",
    ] {
        let text = format!(
            r#"{{"ip": "10.4.0.5/24", "mac": "{mac}", "gateway": "10.4.0.1", "vlan": 5, "logical_port_id": "lp"}}"#
        );
        match PodNetwork::parse(&text) {
            Err(nsx_core::k8s::pod_network::BadPodNetwork(m)) => {
                assert!(m.contains(mac), "{mac}: {m}")
            }
            other => panic!("{mac}: {other:?}"),
        }
    }
}

#[test]
fn add_and_del_are_idempotent_and_a_reused_port_number_is_safe() {
    let (mut b, mut agent) = node();
    let a1 = agent
        .add(&mut b, &req("c-a", "a"), net("10.4.0.5", 5))
        .unwrap();
    let flows = b.flow_count();
    let a2 = agent
        .add(&mut b, &req("c-a", "a"), net("10.4.0.5", 5))
        .unwrap();
    assert_eq!(a1, a2);
    assert_eq!(b.flow_count(), flows);
    assert_eq!(b.ports().count(), 2);
    agent.remove(&mut b, "c-a").unwrap();
    agent.remove(&mut b, "c-a").unwrap();
    agent.remove(&mut b, "never-added").unwrap();
    assert_eq!(b.ports().count(), 1);
    // Pods come and go until a new pod gets a's old port number (a small port space gets
    // there quickly; OVS reuses numbers the same way once its 65279 are used).
    b.max_ofport = 8;
    let mut reused = None;
    for i in 0..100u32 {
        let cid = format!("c-{i}");
        let w = agent
            .add(&mut b, &req(&cid, "x"), net("10.4.0.7", 7))
            .unwrap();
        if w.ofport == a1.ofport {
            reused = Some((cid, w));
            break;
        }
        agent.remove(&mut b, &cid).unwrap();
    }
    let (cid, w) = reused.expect("OVS hands the number out again eventually");
    // A late DEL of the old pod must not touch the new pod's flows.
    agent.remove(&mut b, "c-a").unwrap();
    let t = b.trace(from_pod(w.ofport, "10.4.0.7", "10.4.0.8"));
    assert_eq!(t.ports(), vec![UPLINK], "{cid}: {:?}", t.lines);
}

#[test]
fn a_del_that_overtakes_its_add_wins() {
    let (mut b, mut agent) = node();
    agent.begin_add("c-a");
    agent.remove(&mut b, "c-a").unwrap();
    let e = agent
        .add(&mut b, &req("c-a", "a"), net("10.4.0.5", 5))
        .unwrap_err();
    assert_eq!(e, AgentError::DeletedDuringAdd("c-a".into()));
    assert_eq!(b.ports().count(), 1, "no port was created");
    // A later ADD of the same container (kubelet retries) works.
    agent.begin_add("c-a");
    agent
        .add(&mut b, &req("c-a", "a"), net("10.4.0.5", 5))
        .unwrap();
}

#[test]
fn restarts_of_the_agent_and_of_ovs() {
    let (mut b, mut agent) = node();
    let a = agent
        .add(&mut b, &req("c-a", "a"), net("10.4.0.5", 5))
        .unwrap();
    agent
        .add(&mut b, &req("c-b", "b"), net("10.4.0.6", 6))
        .unwrap();
    // The agent restarts with no memory: its pods come back from the ports' external ids.
    let mut agent = Agent::new(AgentConfig { uplink: UPLINK });
    agent.recover(&b);
    assert_eq!(agent.pods().len(), 2);
    assert_eq!(agent.pods()["c-a"].network, net("10.4.0.5", 5));
    agent.remove(&mut b, "c-b").unwrap();
    assert_eq!(b.ports().count(), 2);
    // OVS restarts: flows are gone until the agent replays them.
    b.restart();
    assert!(
        b.trace(from_pod(a.ofport, "10.4.0.5", "10.4.0.6"))
            .ports()
            .is_empty()
    );
    agent.replay(&mut b).unwrap();
    let t = b.trace(from_pod(a.ofport, "10.4.0.5", "10.4.0.6"));
    assert_eq!(t.ports(), vec![UPLINK], "{:?}", t.lines);
    assert!(
        b.list_ports()
            .iter()
            .any(|p| p.external_ids.get("container-id").map(String::as_str) == Some("c-a"))
    );
}

#[test]
fn a_malformed_annotation_is_refused_with_the_reason() {
    for (text, why) in [
        ("not json", "expected"),
        (
            r#"{"ip": "10.4.0.5", "mac": "m", "gateway": "g", "vlan": 5, "logical_port_id": "x"}"#,
            "prefix",
        ),
        (
            r#"{"ip": "10.4.0.5/24", "mac": "m", "gateway": "g", "vlan": 4095, "logical_port_id": "x"}"#,
            "vlan",
        ),
        (
            r#"{"ip": "10.4.0/24", "mac": "m", "gateway": "g", "vlan": 5, "logical_port_id": "x"}"#,
            "10.4.0/24",
        ),
    ] {
        let e = PodNetwork::parse(text).unwrap_err();
        assert!(e.to_string().contains(why), "{text}: {e}");
    }
}
