//! Pod wiring: ports, flows, and the agent's record of pods.

use std::collections::{BTreeMap, BTreeSet};

use crate::k8s::pod_network::BadPodNetwork;
pub use crate::k8s::pod_network::PodNetwork;
use crate::ovs::bridge::{BridgeError, OfOp, OpenFlowBridge};
use crate::ovs::field::Field;
use crate::ovs::flow::CtZone;
use crate::ovs::flow::{Action, Flow, Match, Subfield};
pub use crate::ovs::interface::{external_id, port_name};
use crate::ovs::pipeline::{
    Category, Cookie, LOCAL_PORT, ct_mark, ct_state, match_bits, priority, reg, table,
};

/// A switch port as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    pub name: String,
    pub ofport: u32,
    pub external_ids: BTreeMap<String, String>,
}

/// The switch the agent wires pods into: flows (the OpenFlow side) and ports (OVSDB).
pub trait PodSwitch: OpenFlowBridge {
    fn add_port(
        &mut self,
        name: &str,
        external_ids: BTreeMap<String, String>,
    ) -> Result<u32, BridgeError>;
    fn del_port(&mut self, name: &str) -> Result<(), BridgeError>;
    fn list_ports(&self) -> Vec<PortInfo>;
    /// Whether a port of that name exists (OVSDB answers this without listing every port).
    fn has_port(&self, name: &str) -> bool {
        self.list_ports().iter().any(|p| p.name == name)
    }
}

impl From<BadPodNetwork> for AgentError {
    fn from(e: BadPodNetwork) -> Self {
        AgentError::BadAnnotation(e.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("the pod annotation is malformed: {0}")]
    BadAnnotation(String),
    #[error("the switch refused: {0}")]
    Switch(String),
    #[error("container {0} was deleted while it was being added")]
    DeletedDuringAdd(String),
}

/// What CNI ADD asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRequest {
    pub container_id: String,
    pub namespace: String,
    pub name: String,
    pub ifname: String,
}

/// A wired pod: what the CNI result reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wired {
    pub port: String,
    pub ofport: u32,
    pub network: PodNetwork,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The uplink port's OpenFlow number.
    pub uplink: u32,
}

/// The agent's view: container id -> wired pod.
#[derive(Debug, Default)]
pub struct Agent {
    cfg: Option<AgentConfig>,
    pods: BTreeMap<String, Wired>,
    /// Containers whose ADD is waiting for NCP's annotation.
    adding: BTreeSet<String>,
    /// Containers DEL has seen while their ADD was still waiting (so the ADD gives up).
    tombstones: BTreeSet<String>,
    static_installed: bool,
}

/// The cookie of the agent's own (pod-independent) flows: while one is on the bridge,
/// ovs-vswitchd has not restarted since the agent last installed them.
pub const AGENT_STATIC_COOKIE: u64 = (Category::AgentStatic as u64) << Cookie::CATEGORY_SHIFT;

/// The cookie of a pod's flows.
fn pod_cookie(container_id: &str) -> u64 {
    Cookie::of_pod(container_id).value()
}

/// The source address a pod sees on a connection to itself through a Service (hairpin):
/// link-local, so it is never another pod's or a node's, and the pod's reply to it leaves by
/// its default route into this bridge. Without it the pod would receive a packet from its own
/// address, which Linux drops as a martian.
pub const HAIRPIN_SOURCE: u32 = 0xa9fe_a9fc; // 169.254.169.252

/// Back to the port the packet came from, addressed to the pod as its gateway would address
/// it (the pod sent it to the gateway's MAC).
fn hairpin_turn(mac: u64) -> [Action; 3] {
    [
        Action::Move {
            src: Subfield::whole(Field::EthDst),
            dst: Subfield::whole(Field::EthSrc),
        },
        Action::SetField {
            field: Field::EthDst,
            value: u128::from(mac),
        },
        Action::InPort,
    ]
}

/// The flows of one pod.
///
/// Besides the path through the uplink, a pod that reaches itself through a Service
/// (nsx-kube-proxy's DNAT picked the pod's own address) is answered on the node: NSX would not
/// send a packet back out of the port it came in on, and the pod would drop one from its own
/// address. The connection is turned around in table 40 with the source rewritten to
/// [`HAIRPIN_SOURCE`] (stateless: only this pod ever talks to itself through it); the pod's
/// replies to that address get their destination back in table 0, before conntrack, so the
/// proxy's zone sees the connection's own reply and un-DNATs it.
pub fn pod_flows(container_id: &str, ofport: u32, net: &PodNetwork, uplink: u32) -> Vec<Flow> {
    let cookie = pod_cookie(container_id);
    let (ip, _) = net.address().unwrap_or((0, 32));
    let mac = net.mac_address().unwrap_or(0);
    let vid = 0x1000 | u128::from(net.vlan);
    let mut from_pod_ip = Match::default();
    from_pod_ip.exact(Field::InPort, u128::from(ofport));
    from_pod_ip.exact(Field::EthType, 0x0800);
    let spoofed = from_pod_ip.clone();
    from_pod_ip.exact(Field::IpSrc, u128::from(ip));
    let mut hairpin_reply = from_pod_ip.clone();
    hairpin_reply.exact(Field::IpDst, u128::from(HAIRPIN_SOURCE));
    let mut from_pod = Match::default();
    from_pod.exact(Field::InPort, u128::from(ofport));
    let mut from_uplink = Match::default();
    from_uplink.exact(Field::InPort, u128::from(uplink));
    from_uplink.set(Field::VlanTci, vid, 0x1fff);
    let mut from_uplink_ip = from_uplink.clone();
    from_uplink_ip.exact(Field::EthType, 0x0800);
    let mut to_pod = Match::default();
    match_bits(&mut to_pod, reg::TO_POD, u128::from(ofport));
    let mut out_of_pod = Match::default();
    match_bits(&mut out_of_pod, reg::FROM_POD, u128::from(ofport));
    let mut to_itself = out_of_pod.clone();
    to_itself.exact(Field::EthType, 0x0800);
    to_itself.exact(Field::IpDst, u128::from(ip));
    // +trk-rpl: the pod's own packets of the connection (the replies, +rpl, keep the source
    // the proxy's un-DNAT gave them).
    let mut to_itself_request = to_itself.clone();
    to_itself_request.set(Field::CtState, ct_state::TRK, ct_state::TRK | ct_state::RPL);
    // The node's own traffic for this pod (a NodePort connection DNATed to it): delivered by
    // address, and committed in the pod's zone with the NodePort mark so that the pod's
    // replies go back through the node's zones (see `pipeline`).
    let mut host_to_pod = Match::default();
    match_bits(&mut host_to_pod, reg::HOST, 1);
    match_bits(&mut host_to_pod, reg::TO_HOST, 0);
    host_to_pod.exact(Field::EthType, 0x0800);
    host_to_pod.exact(Field::IpDst, u128::from(ip));
    let host_to_pod_actions = vec![
        Action::SetField {
            field: Field::EthDst,
            value: u128::from(mac),
        },
        Action::Ct {
            commit: true,
            table: None,
            zone: Some(CtZone::Imm(ofport as u16)),
            exec: vec![Action::Load {
                dst: ct_mark::NODE_PORT,
                value: 1,
            }],
            nat: None,
        },
        Action::Output(ofport),
    ];
    let tag = vec![
        Action::PushVlan(0x8100),
        Action::SetField {
            field: Field::VlanVid,
            value: vid,
        },
        Action::Output(uplink),
    ];
    let flow = |table: u8, priority: u16, matches: Match, actions: Vec<Action>| Flow {
        cookie,
        table,
        priority,
        matches,
        actions,
        ..Flow::default()
    };
    // Into the proxy's tables, with the pod's port in `marker` (from the pod, or to it) and
    // as the conntrack zone.
    let to_proxy = |marker: Subfield| {
        [
            Action::Load {
                dst: marker,
                value: u128::from(ofport),
            },
            Action::Load {
                dst: reg::ZONE,
                value: u128::from(ofport),
            },
            Action::Resubmit {
                port: None,
                table: Some(table::CT_ZONE),
            },
        ]
    };
    let from_pod_actions = to_proxy(reg::FROM_POD);
    let mut hairpin_back = vec![Action::SetField {
        field: Field::IpDst,
        value: u128::from(ip),
    }];
    hairpin_back.extend(from_pod_actions.iter().cloned());
    let mut hairpin_request = vec![Action::SetField {
        field: Field::IpSrc,
        value: u128::from(HAIRPIN_SOURCE),
    }];
    hairpin_request.extend(hairpin_turn(mac));
    use {priority as p, table::CLASSIFIER as IN, table::FORWARD as OUT};
    vec![
        flow(IN, p::POD_IP, from_pod_ip, from_pod_actions.to_vec()),
        // A reply to the hairpin address: to the pod itself, as the connection was.
        flow(IN, p::HAIRPIN_REPLY, hairpin_reply, hairpin_back),
        // Any other source address from this pod: SpoofGuard.
        flow(IN, p::SPOOFED, spoofed, vec![]),
        flow(IN, p::POD_OTHER, from_pod, tag.clone()),
        flow(
            IN,
            p::POD_IP,
            from_uplink_ip,
            [Action::PopVlan]
                .into_iter()
                .chain(to_proxy(reg::TO_POD))
                .collect(),
        ),
        flow(
            IN,
            p::POD_OTHER,
            from_uplink,
            vec![Action::PopVlan, Action::Output(ofport)],
        ),
        flow(OUT, p::TO_POD, to_pod, vec![Action::Output(ofport)]),
        flow(OUT, p::HOST_TO_POD, host_to_pod, host_to_pod_actions),
        flow(OUT, p::HAIRPIN_REQUEST, to_itself_request, hairpin_request),
        flow(OUT, p::TO_ITSELF, to_itself, hairpin_turn(mac).to_vec()),
        flow(OUT, p::OUT_OF_POD, out_of_pod, tag),
    ]
}

/// The agent's part of the node's own traffic (see `pipeline`): IP from the uplink untagged
/// into the proxy's [`table::HOST_IN`] (whose miss, until a proxy runs, is the host), other
/// frames between the uplink and the host's `LOCAL` port as they are, and in
/// [`table::FORWARD`] the host's packets to `LOCAL`, the rest out of the uplink untagged (a
/// local pod's take precedence, see [`pod_flows`]).
fn host_flows(uplink: u32) -> Vec<Flow> {
    let c = AGENT_STATIC_COOKIE;
    let flow = |table: u8, priority: u16, matches: Match, actions: Vec<Action>| Flow {
        cookie: c,
        table,
        priority,
        matches,
        actions,
        ..Flow::default()
    };
    let mut untagged = Match::default();
    untagged.exact(Field::InPort, u128::from(uplink));
    untagged.set(Field::VlanTci, 0, 0x1fff);
    let mut untagged_ip = untagged.clone();
    untagged_ip.exact(Field::EthType, 0x0800);
    let mut from_host = Match::default();
    from_host.exact(Field::InPort, u128::from(LOCAL_PORT));
    let mut to_host = Match::default();
    match_bits(&mut to_host, reg::HOST, 1);
    match_bits(&mut to_host, reg::TO_HOST, 1);
    let mut host = Match::default();
    match_bits(&mut host, reg::HOST, 1);
    // OVS skips an output to the port a packet came in on: back out of the uplink is IN_PORT.
    let mut host_back = host.clone();
    host_back.exact(Field::InPort, u128::from(uplink));
    let resubmit = |t: u8| Action::Resubmit {
        port: None,
        table: Some(t),
    };
    let load = |dst: Subfield| Action::Load { dst, value: 1 };
    use {priority as p, table::CLASSIFIER as IN, table::FORWARD as OUT};
    vec![
        flow(
            IN,
            p::HOST_IP,
            untagged_ip,
            vec![load(reg::HOST), resubmit(table::HOST_IN)],
        ),
        flow(
            IN,
            p::HOST_OTHER,
            untagged,
            vec![Action::Output(LOCAL_PORT)],
        ),
        flow(IN, p::HOST_OTHER, from_host, vec![Action::Output(uplink)]),
        flow(
            table::HOST_IN,
            p::MISS,
            Match::default(),
            vec![load(reg::TO_HOST), resubmit(OUT)],
        ),
        flow(
            OUT,
            p::HOST_TO_LOCAL,
            to_host,
            vec![Action::Output(LOCAL_PORT)],
        ),
        flow(OUT, p::HOST_BACK_TO_UPLINK, host_back, vec![Action::InPort]),
        flow(OUT, p::HOST_TO_UPLINK, host, vec![Action::Output(uplink)]),
    ]
}

/// Removes a pod's flows (by its cookie) and its port.
fn unwire<S: PodSwitch>(switch: &mut S, container_id: &str, port: &str) -> Result<(), AgentError> {
    switch
        .bundle(vec![OfOp::DelFlowsByCookie {
            cookie: pod_cookie(container_id),
            cookie_mask: u64::MAX,
        }])
        .map_err(|e| AgentError::Switch(e.to_string()))?;
    switch
        .del_port(port)
        .map_err(|e| AgentError::Switch(e.to_string()))
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> Self {
        Self {
            cfg: Some(cfg),
            ..Self::default()
        }
    }

    fn uplink(&self) -> u32 {
        self.cfg.as_ref().map_or(0, |c| c.uplink)
    }

    pub fn pods(&self) -> &BTreeMap<String, Wired> {
        &self.pods
    }

    fn static_flows(&self) -> Vec<OfOp> {
        // Anything else in table 0 and table 40 is dropped. Until the proxy's tables are in
        // (or after an OVS restart, before it replays), pod traffic skips them.
        let c = AGENT_STATIC_COOKIE;
        let mut ops: Vec<OfOp> = [table::CLASSIFIER, table::FORWARD]
            .into_iter()
            .map(|t| {
                OfOp::AddFlow(Flow {
                    cookie: c,
                    table: t,
                    priority: priority::MISS,
                    ..Flow::default()
                })
            })
            .collect();
        ops.push(OfOp::AddFlow(Flow {
            cookie: c,
            table: table::CT_ZONE,
            priority: priority::MISS,
            actions: vec![Action::Resubmit {
                port: None,
                table: Some(table::FORWARD),
            }],
            ..Flow::default()
        }));
        ops.extend(host_flows(self.uplink()).into_iter().map(OfOp::AddFlow));
        ops
    }

    /// A restarted agent: the pods are the switch's ports that carry a container id.
    pub fn recover<S: PodSwitch>(&mut self, switch: &S) {
        self.pods.clear();
        for p in switch.list_ports() {
            let ids = &p.external_ids;
            let (Some(cid), Some(ip), Some(mac), Some(vlan), Some(lp)) = (
                ids.get(external_id::CONTAINER_ID),
                ids.get(external_id::IP),
                ids.get(external_id::ATTACHED_MAC),
                ids.get(external_id::VLAN).and_then(|v| v.parse().ok()),
                ids.get(external_id::IFACE_ID),
            ) else {
                continue;
            };
            self.pods.insert(
                cid.clone(),
                Wired {
                    port: p.name.clone(),
                    ofport: p.ofport,
                    network: PodNetwork {
                        ip: ip.clone(),
                        mac: mac.clone(),
                        gateway: ids.get("gateway").cloned().unwrap_or_default(),
                        vlan,
                        logical_port_id: lp.clone(),
                    },
                },
            );
        }
        self.static_installed = true;
    }

    /// OVS restarted (flows gone, ports kept): installs every pod's flows again.
    pub fn replay<S: PodSwitch>(&mut self, switch: &mut S) -> Result<(), AgentError> {
        let mut ops = self.static_flows();
        for (cid, w) in &self.pods {
            ops.extend(
                pod_flows(cid, w.ofport, &w.network, self.uplink())
                    .into_iter()
                    .map(OfOp::AddFlow),
            );
        }
        switch
            .bundle(ops)
            .map_err(|e| AgentError::Switch(e.to_string()))?;
        self.static_installed = true;
        Ok(())
    }

    /// Marks the start of an ADD (before waiting for NCP's annotation): a DEL from now on
    /// leaves a tombstone the ADD will find.
    pub fn begin_add(&mut self, container_id: &str) {
        self.tombstones.remove(container_id);
        self.adding.insert(container_id.to_string());
    }

    /// An ADD gave up before [`Agent::add`] (its wait timed out).
    pub fn abort_add(&mut self, container_id: &str) {
        self.adding.remove(container_id);
        self.tombstones.remove(container_id);
    }

    /// CNI ADD once NCP's annotation is known: the port and its flows, in one bundle.
    /// Idempotent: a container already wired gets the same answer.
    pub fn add<S: PodSwitch>(
        &mut self,
        switch: &mut S,
        req: &PodRequest,
        net: PodNetwork,
    ) -> Result<Wired, AgentError> {
        self.adding.remove(&req.container_id);
        if self.tombstones.remove(&req.container_id) {
            return Err(AgentError::DeletedDuringAdd(req.container_id.clone()));
        }
        if let Some(w) = self.pods.get(&req.container_id) {
            if w.network == net {
                return Ok(w.clone());
            }
            // The same container with a different network: rewire.
            self.remove(switch, &req.container_id)?;
        }
        let name = port_name(&req.container_id);
        let ids: BTreeMap<String, String> = [
            (external_id::CONTAINER_ID, req.container_id.clone()),
            (external_id::POD_NAME, req.name.clone()),
            (external_id::POD_NAMESPACE, req.namespace.clone()),
            (external_id::IFACE_ID, net.logical_port_id.clone()),
            (external_id::ATTACHED_MAC, net.mac.clone()),
            (external_id::IP, net.ip.clone()),
            (external_id::VLAN, net.vlan.to_string()),
            ("gateway", net.gateway.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // A leftover port of the same name (a crash between port and record): replace it.
        if switch.has_port(&name) {
            switch
                .del_port(&name)
                .map_err(|e| AgentError::Switch(e.to_string()))?;
        }
        let ofport = switch
            .add_port(&name, ids)
            .map_err(|e| AgentError::Switch(e.to_string()))?;
        let mut ops = Vec::new();
        if !self.static_installed {
            ops.extend(self.static_flows());
        }
        ops.extend(
            pod_flows(&req.container_id, ofport, &net, self.uplink())
                .into_iter()
                .map(OfOp::AddFlow),
        );
        if let Err(e) = switch.bundle(ops) {
            let _ = switch.del_port(&name);
            return Err(AgentError::Switch(e.to_string()));
        }
        self.static_installed = true;
        let w = Wired {
            port: name,
            ofport,
            network: net,
        };
        self.pods.insert(req.container_id.clone(), w.clone());
        Ok(w)
    }

    /// CNI DEL: the pod's flows (by its cookie) and its port. Idempotent; succeeds when the
    /// pod is unknown. A DEL that overtakes its ADD leaves a tombstone.
    pub fn remove<S: PodSwitch>(
        &mut self,
        switch: &mut S,
        container_id: &str,
    ) -> Result<(), AgentError> {
        let Some(w) = self.pods.get(container_id).cloned() else {
            if self.adding.contains(container_id) {
                self.tombstones.insert(container_id.to_string());
            }
            // A port left behind by a crashed ADD still goes.
            let name = port_name(container_id);
            if switch.has_port(&name) {
                unwire(switch, container_id, &name)?;
            }
            return Ok(());
        };
        unwire(switch, container_id, &w.port)?;
        self.pods.remove(container_id);
        Ok(())
    }
}
