//! Connectivity traced through the realized dataplane, never read off Kubernetes objects: the
//! source pod's port on its node's fake OVS (SpoofGuard, nsx-kube-proxy's NAT, the VLAN tag),
//! the uplink into the NSX dataplane model (switching, routing, the distributed firewall, load
//! balancers, SNAT), the destination node's OVS and pod port, and the reply back the same way.

use fake_nsx_manager::store::{Connections, Entry, Packet as NsxPacket, Protocol, Verdict};
use fake_ovs::Packet;
use nsx_core::k8s::annotation;
use nsx_core::k8s::pod_network::PodNetwork;
use nsx_core::ovs::Field;
use nsx_core::ovs::interface::external_id;
use nsx_core::ovs::pipeline::LOCAL_PORT;

use super::names::{Endpoint, ip_string};
use super::node::UPLINK;
use super::world::World;

/// A pod as the dataplane knows it.
#[derive(Debug, Clone)]
pub struct PodAt {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: u32,
    pub mac: u64,
    pub ofport: u32,
}

/// Where a connection ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reached {
    Pod {
        namespace: String,
        name: String,
    },
    /// Left through the tier-0 with this source address.
    External {
        src: u32,
    },
    /// A node's own address (its host).
    Node {
        name: String,
    },
    /// Reached the pod, which listens on no such port: refused (TCP RST, ICMP port
    /// unreachable for UDP), as its host's stack would.
    Refused {
        namespace: String,
        name: String,
        reason: String,
    },
    Dropped(String),
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub reached: Reached,
    /// The reply came back to the source, from the address it sent to.
    pub reply_ok: bool,
    pub path: Vec<String>,
    /// The source address the destination pod saw (after any SNAT on the way).
    pub seen_src: Option<u32>,
}

impl Outcome {
    /// The connection is established: it got there, something answered, and the answer came
    /// back.
    pub fn works(&self) -> bool {
        self.reply_ok && !matches!(self.reached, Reached::Dropped(_) | Reached::Refused { .. })
    }

    /// The network carried it both ways, whether or not anything listened at the far end:
    /// what a NetworkPolicy decides (a refusal is the destination's answer, after the
    /// firewall let the connection in).
    pub fn admitted(&self) -> bool {
        self.reply_ok && !matches!(self.reached, Reached::Dropped(_))
    }
}

/// Where a connection starts, as the reply must find it again.
enum Source {
    Pod(PodAt),
    Node { name: String },
    External,
}

fn proto(p: u8) -> Protocol {
    match p {
        17 => Protocol::Udp,
        132 => Protocol::Sctp,
        _ => Protocol::Tcp,
    }
}

fn parse_mac(m: &str) -> u64 {
    u64::from_str_radix(&m.replace(':', ""), 16).unwrap_or(0)
}

/// Where NSX delivered a packet on a node: the node, the pod's port, the packet as it left
/// OVS.
type Arrival = (String, u32, Packet);

/// One node-side hop: a packet processed by the bridge; the uplink output (its VLAN, none for
/// the node's own traffic, and the packet), the pod port it reached, or the host's stack.
enum OvsOut {
    Uplink(Option<u16>, Packet),
    Port(u32, Packet),
    Host(Packet),
    Dropped(String),
}

/// How many times one packet may pass through nodes' bridges and NSX on its way (a NodePort
/// connection forwarded to another node's endpoint takes two).
const MAX_NODE_HOPS: usize = 4;

impl World {
    /// Which of the cluster's own ranges holds `ip` (pods, services, nodes, the SNAT and LB
    /// pools), if any.
    pub fn cluster_range_of(&self, ip: u32) -> Option<&'static str> {
        let c = &self.sc.cluster;
        let within = |cidr: &str| {
            super::names::parse_cidr(cidr).is_ok_and(|(net, len)| {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                ip & mask == net
            })
        };
        if within(&c.ip_block) {
            Some("pod range")
        } else if within(&c.service_cidr) {
            Some("service range")
        } else if self.nodes.values().any(|n| n.node_ip == ip) {
            Some("node addresses")
        } else if within(&c.snat_pool) {
            Some("SNAT pool")
        } else if within(&c.lb_pool) {
            Some("LoadBalancer pool")
        } else {
            None
        }
    }

    /// A pod by `ns/name`, as wired.
    pub fn pod_at(&self, ns: &str, name: &str) -> Result<PodAt, String> {
        let p = self
            .api
            .get("pods", ns, name)
            .ok_or(format!("no pod {ns}/{name}"))?;
        let node = p["spec"]["nodeName"].as_str().unwrap_or("").to_string();
        let net: PodNetwork = p["metadata"]["annotations"][annotation::POD_NETWORK]
            .as_str()
            .and_then(|t| serde_json::from_str(t).ok())
            .ok_or(format!("pod {ns}/{name} has no network from NCP"))?;
        let ip = super::names::parse_ip(net.ip.split('/').next().unwrap_or(""))?;
        let n = self
            .nodes
            .get(&node)
            .ok_or(format!("pod {ns}/{name} is on no node"))?;
        let cid = n
            .kubelet
            .borrow()
            .get(&(ns.to_string(), name.to_string()))
            .map(|k| k.container_id.clone())
            .ok_or(format!("pod {ns}/{name} is not set up on {node}"))?;
        let ofport = n
            .bridge
            .try_lock()
            .map_err(|_| "bridge busy".to_string())?
            .port_with(external_id::CONTAINER_ID, &cid)
            .map(|p| p.ofport)
            .ok_or(format!("pod {ns}/{name} has no OVS port on {node}"))?;
        Ok(PodAt {
            namespace: ns.into(),
            name: name.into(),
            node,
            ip,
            mac: parse_mac(&net.mac),
            ofport,
        })
    }

    fn ovs(&self, node: &str, p: Packet, path: &mut Vec<String>) -> OvsOut {
        let Some(n) = self.nodes.get(node) else {
            return OvsOut::Dropped(format!("no node {node}"));
        };
        let Ok(mut b) = n.bridge.try_lock() else {
            return OvsOut::Dropped(format!("{node}: bridge busy"));
        };
        b.now_ms = self.now_ms();
        let t = b.forward(p, 64);
        if !self.quiet_paths.get() {
            path.push(format!(
                "{node} ovs: {} -> {}",
                p.describe(),
                t.datapath_actions()
            ));
        }
        match t.outputs.first() {
            // Sent to the controller: the agent answers with a TCP RST or an ICMP port
            // unreachable (kube-proxy's REJECT); nothing else answers.
            None if t.controller > 0 => OvsOut::Dropped(format!(
                "{node}: rejected by nsx-kube-proxy (to the controller: TCP RST / ICMP port \
                 unreachable)"
            )),
            None => OvsOut::Dropped(format!("{node}: OVS dropped it")),
            Some(o) if o.port == UPLINK => {
                let tci = o.packet.get(Field::VlanTci);
                let vlan = (tci & 0x1000 != 0).then_some((tci & 0xfff) as u16);
                OvsOut::Uplink(vlan, o.packet)
            }
            Some(o) if o.port == LOCAL_PORT => OvsOut::Host(o.packet),
            Some(o) => OvsOut::Port(o.port, o.packet),
        }
    }

    fn pod_by_port(&self, node: &str, ofport: u32) -> Option<(String, String)> {
        let n = self.nodes.get(node)?;
        let b = n.bridge.try_lock().ok()?;
        let p = b.ports().find(|p| p.ofport == ofport)?;
        n.kubelet
            .borrow()
            .iter()
            .find(|(_, kp)| p.external_ids.get(external_id::CONTAINER_ID) == Some(&kp.container_id))
            .map(|(k, _)| k.clone())
    }

    /// The node whose VIF's logical port this is.
    fn node_of_port(&self, port: &str) -> Option<String> {
        self.nodes
            .iter()
            .find(|(_, n)| n.port_id == port)
            .map(|(k, _)| k.clone())
    }

    /// Whether the pod listens on `protocol`/`port`: on the ports its containers declare
    /// (`containerPort`, protocol TCP unless given), or on every port when a container declares
    /// none. `Err` says why not.
    pub fn listens(&self, ns: &str, name: &str, protocol: u8, port: u16) -> Result<(), String> {
        let Some(pod) = self.api.get("pods", ns, name) else {
            return Err(format!("no pod {ns}/{name}"));
        };
        let mut declared = Vec::new();
        for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
            let ports = c["ports"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            if ports.is_empty() {
                return Ok(());
            }
            for p in ports {
                let proto = p["protocol"].as_str().unwrap_or("TCP");
                let number = p["containerPort"].as_u64().unwrap_or(0);
                if super::names::protocol(proto) == Ok(protocol) && number == u64::from(port) {
                    return Ok(());
                }
                declared.push(format!("{proto} {number}"));
            }
        }
        if declared.is_empty() {
            // No container at all: nothing could listen, but nothing declares it either.
            return Ok(());
        }
        Err(format!(
            "{ns}/{name} listens on {} only: {} {port} refused",
            declared.join(", "),
            match protocol {
                17 => "UDP",
                132 => "SCTP",
                _ => "TCP",
            }
        ))
    }

    fn node_of_vif(&self, vif: &str) -> Option<String> {
        self.nodes
            .iter()
            .find(|(_, n)| n.vif_id == vif)
            .map(|(k, _)| k.clone())
    }

    /// NSX's verdict on a packet, then (if it reached a pod) the destination node's OVS.
    fn through_nsx(
        &self,
        conns: &mut Connections,
        entry: Entry,
        pkt: NsxPacket,
        path: &mut Vec<String>,
    ) -> Result<(Option<Arrival>, Reached), String> {
        self.through_nsx_hops(conns, entry, pkt, path, 0)
    }

    fn through_nsx_hops(
        &self,
        conns: &mut Connections,
        entry: Entry,
        pkt: NsxPacket,
        path: &mut Vec<String>,
        hops: usize,
    ) -> Result<(Option<Arrival>, Reached), String> {
        let t = self.nsx.inspect(|s| s.trace(conns, &entry, &pkt));
        if !self.quiet_paths.get() {
            for h in &t.hops {
                path.push(format!("nsx: {h}"));
            }
        }
        match t.verdict {
            Verdict::Dropped { reason } => Ok((None, Reached::Dropped(format!("NSX: {reason}")))),
            Verdict::External { packet } => match self.cluster_range_of(packet.dst_ip) {
                // Routed out as if it were an outside address: nothing out there answers for
                // the cluster's own ranges.
                Some(range) => Ok((
                    None,
                    Reached::Dropped(format!(
                        "left through the tier-0 toward {}, an address of the cluster's {range}: \
                         nothing outside answers there",
                        ip_string(packet.dst_ip)
                    )),
                )),
                None => Ok((None, Reached::External { src: packet.src_ip })),
            },
            Verdict::Delivered {
                logical_port,
                parent_vif_id,
                vlan,
                packet,
            } => {
                // A node's own port: into its bridge untagged, where a NodePort is
                // load-balanced and anything else goes to the host.
                let (node, p) = match self.node_of_port(&logical_port) {
                    Some(name) => (name, from_uplink(None, &packet)),
                    None => (
                        parent_vif_id
                            .as_deref()
                            .and_then(|v| self.node_of_vif(v))
                            .ok_or("NSX delivered to a port that is not a pod's on a node")?,
                        from_uplink(vlan, &packet),
                    ),
                };
                match self.ovs(&node, p, path) {
                    OvsOut::Port(port, out) => match self.pod_by_port(&node, port) {
                        Some((ns, name)) => Ok((
                            Some((node, port, out)),
                            Reached::Pod {
                                namespace: ns,
                                name,
                            },
                        )),
                        None => Ok((
                            None,
                            Reached::Dropped(format!("{node}: out of port {port}, no pod's")),
                        )),
                    },
                    // The node forwards it (a NodePort's endpoint elsewhere): from its own port.
                    OvsOut::Uplink(None, out) if hops < MAX_NODE_HOPS => {
                        let port = self.nodes[&node].port_id.clone();
                        path.push(format!("{node}: out of its own port"));
                        self.through_nsx_hops(
                            conns,
                            Entry::LogicalPort(port),
                            nsx_packet(&out, protocol_number(pkt.protocol)),
                            path,
                            hops + 1,
                        )
                    }
                    OvsOut::Uplink(..) => Ok((
                        None,
                        Reached::Dropped(format!("{node}: sent back to the uplink")),
                    )),
                    OvsOut::Host(_) => Ok((None, Reached::Node { name: node })),
                    OvsOut::Dropped(r) => Ok((None, Reached::Dropped(r))),
                }
            }
        }
    }

    /// The pod's answer to a connection its node turned back to it (`delivered` as it reached
    /// the pod): it must come back out of the same port, from the address the pod dialled.
    fn hairpin_reply(
        &self,
        pod: &PodAt,
        delivered: &Packet,
        dst_ip: u32,
        dport: u16,
        path: &mut Vec<String>,
    ) -> bool {
        let mut r = Packet::default();
        r.set(Field::InPort, u128::from(pod.ofport));
        r.set(Field::EthSrc, u128::from(pod.mac));
        r.set(Field::EthType, 0x0800);
        r.set(Field::IpSrc, delivered.get(Field::IpDst));
        r.set(Field::IpDst, delivered.get(Field::IpSrc));
        r.set(Field::IpProto, delivered.get(Field::IpProto));
        r.set(Field::TpSrc, delivered.get(Field::TpDst));
        r.set(Field::TpDst, delivered.get(Field::TpSrc));
        path.push("reply:".into());
        match self.ovs(&pod.node, r, path) {
            OvsOut::Port(port, out) => {
                port == pod.ofport
                    && out.get(Field::IpSrc) == u128::from(dst_ip)
                    && out.get(Field::TpSrc) == u128::from(dport)
                    && out.get(Field::IpDst) == u128::from(pod.ip)
                    && out.get(Field::EthDst) == u128::from(pod.mac)
            }
            _ => false,
        }
    }

    /// A connection from `from` to `dst_ip:dport` (and its reply), from source port `sport`.
    pub fn connect(
        &self,
        from: &Endpoint,
        dst_ip: u32,
        protocol: u8,
        sport: u16,
        dport: u16,
    ) -> Result<Outcome, String> {
        let mut path = Vec::new();
        let mut conns = Connections::default();
        let (first, src_ip, source) = match from {
            Endpoint::Pod { namespace, name } => {
                let pod = self.pod_at(namespace, name)?;
                let mut p = Packet::default();
                p.set(Field::InPort, u128::from(pod.ofport));
                p.set(Field::EthSrc, u128::from(pod.mac));
                p.set(Field::EthType, 0x0800);
                p.set(Field::IpSrc, u128::from(pod.ip));
                p.set(Field::IpDst, u128::from(dst_ip));
                p.set(Field::IpProto, u128::from(protocol));
                p.set(Field::TpSrc, u128::from(sport));
                p.set(Field::TpDst, u128::from(dport));
                let (entry, out) = match self.ovs(&pod.node, p, &mut path) {
                    OvsOut::Uplink(v, out) => (self.uplink_entry(&pod.node, v), out),
                    // Hairpin: the proxy chose the pod itself; the node turns it around.
                    OvsOut::Port(port, out) if port == pod.ofport => {
                        let reply_ok = self.hairpin_reply(&pod, &out, dst_ip, dport, &mut path);
                        let reached = self.refused_or_reached(
                            &pod.namespace,
                            &pod.name,
                            protocol,
                            out.get(Field::TpDst) as u16,
                            &mut path,
                        );
                        return Ok(Outcome {
                            reached,
                            reply_ok,
                            path,
                            seen_src: Some(out.get(Field::IpSrc) as u32),
                        });
                    }
                    OvsOut::Port(port, _) => {
                        return Ok(Outcome {
                            reached: Reached::Dropped(format!(
                                "{}: switched locally to port {port}, not through the uplink",
                                pod.node
                            )),
                            reply_ok: false,
                            path,
                            seen_src: None,
                        });
                    }
                    OvsOut::Host(_) => {
                        return Ok(Outcome {
                            reached: Reached::Dropped(format!(
                                "{}: a pod's packet went to the host's stack",
                                pod.node
                            )),
                            reply_ok: false,
                            path,
                            seen_src: None,
                        });
                    }
                    OvsOut::Dropped(r) => {
                        return Ok(Outcome {
                            reached: Reached::Dropped(r),
                            reply_ok: false,
                            path,
                            seen_src: None,
                        });
                    }
                };
                let pkt = nsx_packet(&out, protocol);
                let ip = pod.ip;
                (
                    self.through_nsx(&mut conns, entry, pkt, &mut path)?,
                    ip,
                    Source::Pod(pod),
                )
            }
            Endpoint::Node(name) => {
                let n = self.nodes.get(name).ok_or(format!("no node {name}"))?;
                let pkt = NsxPacket {
                    src_ip: n.node_ip,
                    dst_ip,
                    protocol: proto(protocol),
                    src_port: sport,
                    dst_port: dport,
                };
                path.push(format!("{name}: from the host's own address"));
                (
                    self.through_nsx(
                        &mut conns,
                        Entry::LogicalPort(n.port_id.clone()),
                        pkt,
                        &mut path,
                    )?,
                    n.node_ip,
                    Source::Node { name: name.clone() },
                )
            }
            Endpoint::External(ip) => {
                let pkt = NsxPacket {
                    src_ip: *ip,
                    dst_ip,
                    protocol: proto(protocol),
                    src_port: sport,
                    dst_port: dport,
                };
                (
                    self.through_nsx(&mut conns, Entry::External, pkt, &mut path)?,
                    *ip,
                    Source::External,
                )
            }
            _ => return Err(format!("{from} cannot be a source")),
        };
        let (arrived, reached) = first;
        // The port it arrived on at the pod, after any DNAT on the way, and from whom.
        let arrived_port = arrived
            .as_ref()
            .map_or(dport, |(_, _, p)| p.get(Field::TpDst) as u16);
        let seen_src = arrived.as_ref().map(|(_, _, p)| p.get(Field::IpSrc) as u32);
        // The reply, from where the packet arrived, to where it came from.
        let reply_ok = match (&reached, arrived) {
            (Reached::Pod { .. }, Some((node, port, delivered))) => {
                let mut r = Packet::default();
                r.set(Field::InPort, u128::from(port));
                r.set(Field::EthType, 0x0800);
                let (dsrc, ddst) = (delivered.get(Field::IpSrc), delivered.get(Field::IpDst));
                r.set(Field::IpSrc, ddst);
                r.set(Field::IpDst, dsrc);
                r.set(Field::IpProto, u128::from(protocol));
                r.set(Field::TpSrc, delivered.get(Field::TpDst));
                r.set(Field::TpDst, delivered.get(Field::TpSrc));
                path.push("reply:".into());
                match self.ovs(&node, r, &mut path) {
                    OvsOut::Uplink(vlan, out) => {
                        let entry = self.uplink_entry(&node, vlan);
                        self.reply_home(
                            &mut conns,
                            &entry,
                            &nsx_packet(&out, protocol),
                            &source,
                            (src_ip, dst_ip, dport),
                            &mut path,
                        )
                    }
                    _ => false,
                }
            }
            (Reached::Node { name }, _) => {
                // The host answers from the address it was reached at.
                let entry = Entry::LogicalPort(self.nodes[name].port_id.clone());
                let back = NsxPacket {
                    src_ip: dst_ip,
                    dst_ip: src_ip,
                    protocol: proto(protocol),
                    src_port: dport,
                    dst_port: sport,
                };
                path.push(format!("reply from {name}:"));
                self.reply_home(
                    &mut conns,
                    &entry,
                    &back,
                    &source,
                    (src_ip, dst_ip, dport),
                    &mut path,
                )
            }
            (Reached::External { src }, _) => {
                // The far end answers to the address it saw; NSX un-SNATs it back.
                let back = NsxPacket {
                    src_ip: dst_ip,
                    dst_ip: *src,
                    protocol: proto(protocol),
                    src_port: dport,
                    dst_port: sport,
                };
                path.push(format!(
                    "reply from outside: {} -> {}",
                    ip_string(dst_ip),
                    ip_string(*src)
                ));
                match self.through_nsx(&mut conns, Entry::External, back, &mut path)? {
                    (Some((_, _, out)), Reached::Pod { namespace, name }) => match &source {
                        Source::Pod(p) => {
                            p.namespace == namespace
                                && p.name == name
                                && out.get(Field::IpSrc) == u128::from(dst_ip)
                        }
                        _ => false,
                    },
                    (None, Reached::Node { name }) => {
                        matches!(&source, Source::Node { name: n, .. } if *n == name)
                    }
                    _ => false,
                }
            }
            _ => false,
        };
        let reached = match reached {
            Reached::Pod { namespace, name } => {
                self.refused_or_reached(&namespace, &name, protocol, arrived_port, &mut path)
            }
            other => other,
        };
        Ok(Outcome {
            reached,
            reply_ok,
            path,
            seen_src,
        })
    }

    /// Where a packet a node sends out of its uplink enters NSX: a pod's (tagged) on the
    /// CHILD port of its VLAN, the node's own (untagged) on the node's port.
    fn uplink_entry(&self, node: &str, vlan: Option<u16>) -> Entry {
        let n = &self.nodes[node];
        match vlan {
            Some(vlan) => Entry::Vif {
                parent_vif_id: n.vif_id.clone(),
                vlan,
            },
            None => Entry::LogicalPort(n.port_id.clone()),
        }
    }

    /// A pod reached on `port`: still `Pod` if it listens there, else `Refused`.
    fn refused_or_reached(
        &self,
        ns: &str,
        name: &str,
        protocol: u8,
        port: u16,
        path: &mut Vec<String>,
    ) -> Reached {
        match self.listens(ns, name, protocol, port) {
            Ok(()) => Reached::Pod {
                namespace: ns.to_string(),
                name: name.to_string(),
            },
            Err(reason) => {
                path.push(format!("refused: {reason}"));
                Reached::Refused {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    reason,
                }
            }
        }
    }

    /// A reply entering NSX at `entry` as `pkt`: whether it comes back to `source` from the
    /// address and port the source dialled (`(src_ip, dst_ip, dport)` of the first packet).
    fn reply_home(
        &self,
        conns: &mut Connections,
        entry: &Entry,
        pkt: &NsxPacket,
        source: &Source,
        addrs: (u32, u32, u16),
        path: &mut Vec<String>,
    ) -> bool {
        self.reply_home_hops(conns, entry, pkt, source, addrs, path, 0)
    }

    #[allow(clippy::too_many_arguments)]
    fn reply_home_hops(
        &self,
        conns: &mut Connections,
        entry: &Entry,
        pkt: &NsxPacket,
        source: &Source,
        (src_ip, dst_ip, dport): (u32, u32, u16),
        path: &mut Vec<String>,
        hops: usize,
    ) -> bool {
        let t = self.nsx.inspect(|s| s.trace(conns, entry, pkt));
        if !self.quiet_paths.get() {
            for h in &t.hops {
                path.push(format!("nsx: {h}"));
            }
        }
        // Delivered to a node's own port: through its bridge untagged, which un-NATs the
        // reply of a NodePort connection it forwarded (and sends it on) or hands it to the
        // host.
        if let Verdict::Delivered {
            logical_port,
            packet,
            ..
        } = &t.verdict
            && let Some(node) = self.node_of_port(logical_port)
        {
            let protocol = protocol_number(packet.protocol);
            return match self.ovs(&node, from_uplink(None, packet), path) {
                OvsOut::Uplink(None, out) if hops < MAX_NODE_HOPS => {
                    path.push(format!("{node}: out of its own port"));
                    let entry = Entry::LogicalPort(self.nodes[&node].port_id.clone());
                    self.reply_home_hops(
                        conns,
                        &entry,
                        &nsx_packet(&out, protocol),
                        source,
                        (src_ip, dst_ip, dport),
                        path,
                        hops + 1,
                    )
                }
                OvsOut::Host(out) => match source {
                    Source::Node { name, .. } => {
                        *name == node
                            && out.get(Field::IpDst) == u128::from(src_ip)
                            && out.get(Field::IpSrc) == u128::from(dst_ip)
                            && out.get(Field::TpSrc) == u128::from(dport)
                    }
                    _ => {
                        path.push(format!("reply ended at {node}'s host"));
                        false
                    }
                },
                _ => {
                    path.push(format!("reply ended in {node}'s bridge"));
                    false
                }
            };
        }
        match (t.verdict, source) {
            (Verdict::External { packet }, Source::External) => {
                packet.dst_ip == src_ip && packet.src_ip == dst_ip && packet.src_port == dport
            }
            (
                Verdict::Delivered {
                    parent_vif_id,
                    vlan,
                    packet,
                    ..
                },
                Source::Pod(pod),
            ) => {
                let node_ok = parent_vif_id.as_deref().and_then(|v| self.node_of_vif(v))
                    == Some(pod.node.clone());
                let p = from_uplink(vlan, &packet);
                node_ok
                    && match self.ovs(&pod.node, p, path) {
                        OvsOut::Port(port, out) => {
                            port == pod.ofport
                                && out.get(Field::IpSrc) == u128::from(dst_ip)
                                && out.get(Field::TpSrc) == u128::from(dport)
                        }
                        _ => false,
                    }
            }
            (v, _) => {
                path.push(format!("reply ended: {v:?}"));
                false
            }
        }
    }
}

fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
        Protocol::Icmp => 1,
    }
}

/// A packet NSX delivered on a node's VIF, as it enters the node's bridge on the uplink.
fn from_uplink(vlan: Option<u16>, packet: &NsxPacket) -> Packet {
    let mut p = Packet::default();
    p.set(Field::InPort, u128::from(UPLINK));
    p.set(Field::VlanTci, vlan.map_or(0, |v| 0x1000 | u128::from(v)));
    p.set(Field::EthType, 0x0800);
    p.set(Field::IpSrc, u128::from(packet.src_ip));
    p.set(Field::IpDst, u128::from(packet.dst_ip));
    p.set(Field::IpProto, u128::from(protocol_number(packet.protocol)));
    p.set(Field::TpSrc, u128::from(packet.src_port));
    p.set(Field::TpDst, u128::from(packet.dst_port));
    p
}

fn nsx_packet(p: &Packet, protocol: u8) -> NsxPacket {
    NsxPacket {
        src_ip: p.get(Field::IpSrc) as u32,
        dst_ip: p.get(Field::IpDst) as u32,
        protocol: proto(protocol),
        src_port: p.get(Field::TpSrc) as u16,
        dst_port: p.get(Field::TpDst) as u16,
    }
}
