//! The OVS adapter against a private, real ovs-vswitchd (OVS 3.1; it fails, not skips, without
//! one): the node agent and nsx-kube-proxy program it through the adapter, and the switch ends
//! up holding exactly the flows and groups fake-ovs holds for the same messages, after
//! incremental changes, after a refused bundle (nothing applied) and after an ovs-vswitchd
//! restart and replay. Ports keep their external ids; the agent rebuilds its view from them.

use std::collections::{BTreeMap, BTreeSet};

use fake_ovs::real::Sandbox;
use nsx_adapters::ovs::{OvsBridge, OvsTools, find_tool};
use nsx_core::agent::{Agent, AgentConfig, PodNetwork, PodRequest, PodSwitch};
use nsx_core::ovs::bridge::{OfOp, OpenFlowBridge};
use nsx_core::ovs::{Action, Flow, Group, parse_flow, parse_group};
use nsx_core::proxy::{Endpoint, Proxy, ProxyConfig, ServicePort, ServicePortKey};

/// Every message goes to both switches.
struct Both {
    real: OvsBridge,
    fake: fake_ovs::Bridge,
}

impl OpenFlowBridge for Both {
    fn bundle(&mut self, ops: Vec<OfOp>) -> Result<(), nsx_core::ovs::bridge::BridgeError> {
        let real = self.real.bundle(ops.clone());
        let fake = OpenFlowBridge::bundle(&mut self.fake, ops);
        assert_eq!(real.is_ok(), fake.is_ok(), "real {real:?} fake {fake:?}");
        real
    }

    fn flush_conntrack(&mut self, f: nsx_core::ovs::bridge::ConntrackFilter) -> usize {
        self.real.flush_conntrack(f)
    }

    fn flows_with_cookie(
        &mut self,
        cookie: u64,
        mask: u64,
    ) -> Result<Vec<nsx_core::ovs::flow::Flow>, nsx_core::ovs::bridge::BridgeError> {
        self.real.flows_with_cookie(cookie, mask)
    }
}

impl PodSwitch for Both {
    fn add_port(
        &mut self,
        name: &str,
        ids: BTreeMap<String, String>,
    ) -> Result<u32, nsx_core::ovs::bridge::BridgeError> {
        let n = self.real.add_port(name, ids.clone())?;
        // The fake numbers ports itself, as OVS does: the same numbers.
        let f = self.fake.add_port(name, None, ids).unwrap();
        assert_eq!(f, n, "port {name}: fake-ovs numbered it {f}, OVS {n}");
        Ok(n)
    }

    fn del_port(&mut self, name: &str) -> Result<(), nsx_core::ovs::bridge::BridgeError> {
        self.fake.del_port(name).ok();
        self.real.del_port(name)
    }

    fn list_ports(&self) -> Vec<nsx_core::agent::wiring::PortInfo> {
        self.real.list_ports()
    }
}

fn tools(sb: &Sandbox) -> OvsTools {
    let dir = sb.dir().to_string_lossy().into_owned();
    OvsTools {
        vsctl: find_tool("ovs-vsctl").expect("ovs-vsctl"),
        ofctl: find_tool("ovs-ofctl").expect("ovs-ofctl"),
        appctl: find_tool("ovs-appctl").expect("ovs-appctl"),
        db: Some(format!("unix:{}", sb.path("db.sock"))),
        env: ["OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR"]
            .into_iter()
            .map(|k| (k.to_string(), dir.clone()))
            .collect(),
    }
}

/// OVS shows a whole-field `load` sent in an OpenFlow 1.5 message as the `set_field` it is;
/// the two are the same action.
fn canonical(actions: &mut [Action]) {
    for a in actions.iter_mut() {
        match a {
            Action::Load { dst, value } if dst.is_whole() => {
                *a = Action::SetField {
                    field: dst.field,
                    value: *value,
                };
            }
            Action::Ct { exec, .. } => canonical(exec),
            _ => {}
        }
    }
}

fn flow_text(mut f: Flow) -> String {
    canonical(&mut f.actions);
    f.to_string()
}

fn group_text(mut g: Group) -> String {
    for b in &mut g.buckets {
        canonical(&mut b.actions);
    }
    g.to_string()
}

/// The real switch holds exactly the fake's flows and groups.
fn assert_same(b: &Both) {
    let mut real: Vec<String> = b
        .real
        .dump_flows()
        .unwrap()
        .into_iter()
        .map(|l| flow_text(parse_flow(&l).unwrap_or_else(|e| panic!("{l}: {e}"))))
        .collect();
    let mut fake: Vec<String> = b
        .fake
        .flows()
        .into_iter()
        .map(|(f, _)| flow_text(f.clone()))
        .collect();
    real.sort();
    fake.sort();
    assert_eq!(real, fake, "flows differ");
    let mut real_groups: Vec<String> = b
        .real
        .dump_groups()
        .unwrap()
        .into_iter()
        .map(|l| group_text(parse_group(&l).unwrap_or_else(|e| panic!("{l}: {e}"))))
        .collect();
    let mut fake_groups: Vec<String> = b.fake.groups().map(|g| group_text(g.clone())).collect();
    real_groups.sort();
    fake_groups.sort();
    assert_eq!(real_groups, fake_groups, "groups differ");
}

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

fn services(n: u32, endpoints: u32) -> BTreeMap<ServicePortKey, ServicePort> {
    (0..n)
        .map(|i| {
            let key = ServicePortKey {
                namespace: "shop".into(),
                name: format!("svc-{i}").into(),
                port: "http".into(),
            };
            let sp = ServicePort {
                key: key.clone(),
                cluster_ip: 0x0a60_0000 + i,
                port: 80,
                protocol: if i % 3 == 2 { 17 } else { 6 },
                node_port: (i == 0).then_some(30080),
                no_local_endpoints: false,
                scope: Default::default(),
                affinity_timeout: (i == 1).then_some(600),
                endpoints: (0..endpoints)
                    .map(|e| Endpoint {
                        ip: 0x0a04_0000 + i * 256 + e + 2,
                        port: 8080,
                    })
                    .collect(),
            };
            (key, sp)
        })
        .collect()
}

#[test]
fn agent_and_proxy_program_a_real_switch_exactly_as_the_fake() {
    let sb = Sandbox::start("adapter");
    let mut b = Both {
        real: OvsBridge::new("br0", tools(&sb)),
        fake: fake_ovs::Bridge::new("br0"),
    };
    // The sandbox's p1 and p2 are already there (ofports 1 and 2); p1 is the uplink.
    for p in b.real.list_ports() {
        let n = b.fake.add_port(&p.name, None, p.external_ids).unwrap();
        assert_eq!(n, p.ofport);
    }
    let mut agent = Agent::new(AgentConfig { uplink: 1 });
    let web = agent
        .add(&mut b, &req("c-web", "web"), net("10.4.0.10", 11))
        .unwrap();
    let db = agent
        .add(&mut b, &req("c-db", "db"), net("10.4.0.11", 12))
        .unwrap();
    assert_ne!(web.ofport, db.ofport);
    assert!(b.real.has_port(&web.port));
    let ports = b.real.list_ports();
    let p = ports.iter().find(|p| p.name == web.port).unwrap();
    assert_eq!(p.ofport, web.ofport);
    assert_eq!(
        p.external_ids.get("k8s-pod-name").map(String::as_str),
        Some("web"),
        "{:?}",
        p.external_ids
    );
    assert_same(&b);

    let mut want = services(12, 10);
    let mut proxy = Proxy::new(
        ProxyConfig {
            node_name: "node-1".into(),
            node_ips: vec![0xac10_000b],
        },
        1,
        None,
        BTreeSet::new(),
    );
    proxy.full_sync(&mut b, &want).unwrap();
    assert_same(&b);

    // Incremental: one endpoint gone, a service gone, one without endpoints (rejects).
    let k3 = want.keys().nth(3).unwrap().clone();
    want.get_mut(&k3).unwrap().endpoints.pop();
    let k4 = want.keys().nth(4).unwrap().clone();
    want.remove(&k4);
    let k5 = want.keys().nth(5).unwrap().clone();
    want.get_mut(&k5).unwrap().endpoints.clear();
    let changed: BTreeSet<ServicePortKey> = [k3, k4, k5].into();
    proxy.sync(&mut b, &want, &changed).unwrap();
    assert_same(&b);

    // A bundle the switch refuses (a flow naming a missing group) changes nothing.
    let before = b.real.dump_flows().unwrap();
    let bad = vec![
        OfOp::AddFlow(parse_flow("table=0,priority=5,ip,nw_dst=10.9.9.9,actions=drop").unwrap()),
        OfOp::AddFlow(
            parse_flow("table=0,priority=5,ip,nw_dst=10.9.9.8,actions=group:4242").unwrap(),
        ),
    ];
    let e = b.real.bundle(bad.clone()).unwrap_err();
    assert!(e.message.contains("OFPBAC_BAD_OUT_GROUP"), "{e}");
    assert_eq!(e.index, 1, "the switch names the second message: {e}");
    assert_eq!(b.real.dump_flows().unwrap(), before);
    // The same through ovs-ofctl, the adapter's way when the management socket is out of
    // reach: refused alike.
    let e = b.real.bundle_via_ofctl(bad).unwrap_err();
    assert!(e.message.contains("OFPBAC_BAD_OUT_GROUP"), "{e}");
    assert_eq!(b.real.dump_flows().unwrap(), before);
    // A message refused when it is added (here, an action the switch cannot decode for
    // this match) is never committed, while the valid ones before it are not either.
    let mut arp = parse_flow("table=0,priority=6,arp,actions=drop").unwrap();
    arp.actions = vec![nsx_core::ovs::flow::Action::SetField {
        field: nsx_core::ovs::field::Field::IpSrc,
        value: 0x0a00_0001,
    }];
    let undecodable = vec![
        OfOp::AddFlow(parse_flow("table=0,priority=6,ip,nw_dst=10.9.9.7,actions=drop").unwrap()),
        OfOp::AddFlow(arp),
    ];
    let e = b.real.bundle(undecodable).unwrap_err();
    assert_eq!(e.index, 1, "{e}");
    assert_eq!(b.real.dump_flows().unwrap(), before);

    // ovs-vswitchd restarts: flows and groups gone, ports kept; the agent (rebuilt from the
    // ports' external ids) and the proxy replay.
    sb.restart_vswitchd();
    assert!(b.real.dump_flows().unwrap().is_empty());
    b.fake.restart();
    let mut agent = Agent::new(AgentConfig { uplink: 1 });
    agent.recover(&b);
    assert_eq!(agent.pods().len(), 2, "both pods found again from OVSDB");
    agent.replay(&mut b).unwrap();
    proxy.bridge_restarted();
    proxy.full_sync(&mut b, &want).unwrap();
    assert_same(&b);

    // DEL: the port and its flows go.
    agent.remove(&mut b, "c-db").unwrap();
    assert!(!b.real.has_port(&db.port));
    assert_same(&b);
}
