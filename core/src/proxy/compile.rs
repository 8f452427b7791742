//! Service ports to flows and groups: a pure function, so the incremental proxy and a
//! from-scratch compile can be compared.
//!
//! Tables (named in [`crate::ovs::pipeline`]; the agent owns table 0 and everything from
//! [`table::FORWARD`] on):
//! - [`table::CT_ZONE`]: every IP packet goes through `ct(table=CT_STATE,zone=reg6,nat)` (the
//!   local pod's zone, [`reg::ZONE`]), which also un-NATs replies of load-balanced connections;
//! - [`table::CT_STATE`]: invalid packets are dropped; established ones skip load balancing;
//!   new ones go to [`table::SERVICE_LB`];
//! - [`table::SERVICE_LB`]: one flow per service port (ClusterIP:port, and NodePort on the
//!   node's addresses) to its select group, or to the controller when it has no endpoint (the
//!   agent rejects: TCP RST / ICMP unreachable), or nowhere (a drop) when
//!   `internalTrafficPolicy: Local` leaves this node none of its endpoints; with session
//!   affinity, first the learned flows
//!   of [`table::AFFINITY`], then [`table::AFFINITY_CHECK`];
//! - [`table::SERVICE_LB`] also holds one flow per ClusterIP, below its ports' flows: any
//!   other port or protocol to that address goes to the controller and is rejected, as
//!   kube-proxy's nftables mode rejects traffic to a ClusterIP on a port it does not expose
//!   (without it the packet would be routed out as if the address were outside the cluster);
//! - the group's buckets (one per endpoint, `selection_method=hash`) load the endpoint into
//!   [`reg::ENDPOINT_IP`] and [`reg::ENDPOINT_PORT`] and resubmit to [`table::ENDPOINT_DNAT`], where
//!   one flow per endpoint, shared by every service that uses it, commits the connection with
//!   `nat(dst=ip:port)` and goes on to [`table::FORWARD`].

use std::borrow::Cow;

use crate::ovs::field::Field;
use crate::ovs::flow::{
    Action, Bucket, CtZone, Flow, Group, GroupType, Learn, LearnSpec, Match, Nat, Subfield,
};
use crate::ovs::pipeline::{
    Category, Cookie, ct_mark, ct_state, match_bits, priority, reg, table, zone,
};

use super::model::{Endpoint, ServicePort};

fn l4_fields(protocol: u8) -> (&'static str, &'static str) {
    match protocol {
        17 => ("udp_src", "udp_dst"),
        132 => ("sctp_src", "sctp_dst"),
        _ => ("tcp_src", "tcp_dst"),
    }
}

/// The flows every proxy installs once; `node_ips` are the node's addresses (the host's).
pub fn static_flows(round: u16, node_ips: &[u32]) -> Vec<Flow> {
    let mut flows = conntrack_flows(round);
    flows.extend(host_flows(round, node_ips));
    flows
}

/// The node's own traffic (see `crate::ovs::pipeline`): un-SNAT and the host zone on the way
/// in, a local pod's NodePort replies back through both, SNAT of masqueraded NodePort
/// connections after DNAT, and the host's address to the host.
fn host_flows(round: u16, node_ips: &[u32]) -> Vec<Flow> {
    let c = Cookie::new(round, Category::ProxyStatic, 0).value();
    let mut ip = Match::default();
    ip.exact(Field::EthType, 0x0800);
    let flow = |table: u8, priority: u16, matches: Match, actions: Vec<Action>| Flow {
        cookie: c,
        table,
        priority,
        matches,
        actions,
        ..Flow::default()
    };
    let ct = |commit: bool, zone: u16, nat: Nat, table: u8| Action::Ct {
        commit,
        table: Some(table),
        zone: Some(CtZone::Imm(zone)),
        exec: vec![],
        nat: Some(nat),
    };
    let load = |dst: Subfield, value: u128| Action::Load { dst, value };
    let resubmit = |t: u8| Action::Resubmit {
        port: None,
        table: Some(t),
    };
    let with = |sf: Subfield, value: u128| {
        let mut m = ip.clone();
        match_bits(&mut m, sf, value);
        m
    };
    let mut pod_reply = with(reg::HOST, 0);
    match_bits(&mut pod_reply, ct_mark::NODE_PORT, 1);
    pod_reply.set(
        Field::CtState,
        ct_state::TRK | ct_state::RPL,
        ct_state::TRK | ct_state::RPL,
    );
    let mut host_established = with(reg::HOST, 1);
    host_established.set(Field::CtState, ct_state::TRK, ct_state::TRK | ct_state::NEW);
    let mut masquerade = with(reg::HOST, 1);
    match_bits(&mut masquerade, reg::MASQUERADE, 1);
    let mut flows = vec![
        // In: replies of masqueraded connections get their client back, then the host zone.
        flow(
            table::HOST_IN,
            priority::CONNTRACK,
            ip.clone(),
            vec![
                load(reg::ZONE, u128::from(zone::HOST)),
                ct(false, zone::SNAT, Nat::default(), table::CT_ZONE),
            ],
        ),
        // A local pod's reply on a NodePort connection: the node's traffic from here on.
        flow(
            table::CT_STATE,
            priority::NODE_PORT_REPLY,
            pod_reply,
            vec![
                load(reg::HOST, 1),
                load(reg::FROM_POD, 0),
                load(reg::ZONE, u128::from(zone::HOST)),
                ct(false, zone::SNAT, Nat::default(), table::HOST_REPLY),
            ],
        ),
        flow(
            table::HOST_REPLY,
            priority::CONNTRACK,
            ip.clone(),
            vec![ct(false, zone::HOST, Nat::default(), table::HOST_ROUTE)],
        ),
        flow(
            table::CT_STATE,
            priority::HOST_ESTABLISHED,
            host_established,
            vec![resubmit(table::HOST_OUT)],
        ),
        // Out: SNAT a new masqueraded connection; established ones through the SNAT zone.
        flow(
            table::HOST_OUT,
            priority::MASQUERADE,
            masquerade,
            match node_ips.first() {
                Some(&node) => vec![ct(
                    true,
                    zone::SNAT,
                    Nat {
                        src: Some(true),
                        ip_min: Some(node),
                        ip_max: Some(node),
                        ..Nat::default()
                    },
                    table::HOST_ROUTE,
                )],
                // No address to masquerade to: the connection cannot come back; drop it.
                None => vec![],
            },
        ),
        flow(
            table::HOST_OUT,
            priority::HOST_TRAFFIC,
            with(reg::HOST, 1),
            vec![ct(false, zone::SNAT, Nat::default(), table::HOST_ROUTE)],
        ),
        flow(
            table::HOST_OUT,
            priority::MISS,
            Match::default(),
            vec![resubmit(table::FORWARD)],
        ),
        flow(
            table::HOST_ROUTE,
            priority::MISS,
            Match::default(),
            vec![resubmit(table::FORWARD)],
        ),
    ];
    for &node in node_ips {
        let mut to_host = ip.clone();
        to_host.exact(Field::IpDst, u128::from(node));
        flows.push(flow(
            table::HOST_ROUTE,
            priority::TO_HOST,
            to_host,
            vec![load(reg::TO_HOST, 1), resubmit(table::FORWARD)],
        ));
    }
    flows
}

/// Conntrack in the local pod's zone, the state split, and the "not a service" commit.
fn conntrack_flows(round: u16) -> Vec<Flow> {
    let c = Cookie::new(round, Category::ProxyStatic, 0).value();
    let mut ip = Match::default();
    ip.exact(Field::EthType, 0x0800);
    let state = |value: u128, mask: u128| {
        let mut m = ip.clone();
        m.set(Field::CtState, value, mask);
        m
    };
    vec![
        Flow {
            cookie: c,
            table: table::CT_ZONE,
            priority: priority::CONNTRACK,
            matches: ip.clone(),
            actions: vec![Action::Ct {
                commit: false,
                table: Some(table::CT_STATE),
                zone: Some(CtZone::Field(reg::ZONE)),
                exec: vec![],
                nat: Some(Nat::default()),
            }],
            ..Flow::default()
        },
        // +inv+trk: drop.
        Flow {
            cookie: c,
            table: table::CT_STATE,
            priority: priority::CT_INVALID,
            matches: state(ct_state::INV | ct_state::TRK, ct_state::INV | ct_state::TRK),
            actions: vec![],
            ..Flow::default()
        },
        // -new+trk (established, related, replies): already translated.
        Flow {
            cookie: c,
            table: table::CT_STATE,
            priority: priority::CT_ESTABLISHED,
            matches: state(ct_state::TRK, ct_state::TRK | ct_state::NEW),
            actions: vec![Action::Resubmit {
                port: None,
                table: Some(table::FORWARD),
            }],
            ..Flow::default()
        },
        Flow {
            cookie: c,
            table: table::CT_STATE,
            priority: priority::MISS,
            actions: vec![Action::GotoTable(table::SERVICE_LB)],
            ..Flow::default()
        },
        // Not a service: committed in the pod's zone (so that its replies are established,
        // not invalid: conntrack takes a SYN-ACK without a committed SYN as +inv, in the kernel
        // and in the userspace datapath alike), then on to forwarding (through the node's
        // routing when it is the node's own traffic).
        Flow {
            cookie: c,
            table: table::SERVICE_LB,
            priority: priority::MISS,
            // ct needs an IP match (OFPBAC_MATCH_INCONSISTENT otherwise); only IP gets here.
            matches: ip.clone(),
            actions: vec![
                Action::Ct {
                    commit: true,
                    table: None,
                    zone: Some(CtZone::Field(reg::ZONE)),
                    exec: vec![],
                    nat: None,
                },
                Action::Resubmit {
                    port: None,
                    table: Some(table::HOST_OUT),
                },
            ],
            ..Flow::default()
        },
    ]
}

/// A stable id for an endpoint (the endpoint flow's cookie, the bucket id).
pub fn endpoint_id(protocol: u8, e: &Endpoint) -> u64 {
    // FNV-1a over the protocol, address and port bytes: stable across builds.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = [protocol]
        .into_iter()
        .chain(e.ip.to_be_bytes())
        .chain(e.port.to_be_bytes());
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The flow that rejects traffic to `cluster_ip` that no service port of it takes, shared by
/// the service's ports (reference counted by the proxy).
pub fn cluster_ip_flow(round: u16, cluster_ip: u32) -> Flow {
    Flow {
        cookie: Cookie::new(round, Category::ClusterIp, u64::from(cluster_ip)).value(),
        table: table::SERVICE_LB,
        priority: priority::CLUSTER_IP_REJECT,
        matches: Match::from_constraints(&[
            (Field::EthType, 0x0800, u128::MAX),
            (Field::IpDst, u128::from(cluster_ip), u128::MAX),
        ]),
        actions: vec![Action::Controller(65535)],
        ..Flow::default()
    }
}

/// The shared DNAT flow of one endpoint.
pub fn endpoint_flow(round: u16, protocol: u8, e: &Endpoint) -> Flow {
    let (ip, port) = (reg::ENDPOINT_IP, reg::ENDPOINT_PORT);
    debug_assert!(
        ip.ofs == 0 && port.ofs == 0,
        "constraints below are not shifted"
    );
    let m = Match::from_constraints(&[
        (Field::EthType, 0x0800, u128::MAX),
        (Field::IpProto, u128::from(protocol), u128::MAX),
        (ip.field, u128::from(e.ip), ip.mask()),
        (port.field, u128::from(e.port), port.mask()),
    ]);
    Flow {
        cookie: Cookie::new(round, Category::Endpoint, endpoint_id(protocol, e)).value(),
        table: table::ENDPOINT_DNAT,
        priority: priority::ENDPOINT,
        matches: m,
        actions: vec![Action::Ct {
            commit: true,
            table: Some(table::HOST_OUT),
            zone: Some(CtZone::Field(reg::ZONE)),
            exec: vec![],
            nat: Some(Nat {
                src: Some(false),
                ip_min: Some(e.ip),
                ip_max: Some(e.ip),
                port_min: Some(e.port),
                port_max: Some(e.port),
                flags: vec![],
            }),
        }],
        ..Flow::default()
    }
}

/// The endpoint an [`endpoint_flow`] DNATs to, with its protocol: how a restarted proxy
/// learns from the bridge which endpoints its previous run served. `None` for any other flow.
pub fn endpoint_of_flow(f: &Flow) -> Option<(u8, Endpoint)> {
    if f.table != table::ENDPOINT_DNAT || f.priority != priority::ENDPOINT {
        return None;
    }
    let exact = |field: Field, mask: u128| {
        f.matches
            .get(field)
            .filter(|(_, m)| *m == mask & field.full_mask())
            .map(|(v, _)| v)
    };
    let (ip, port) = (reg::ENDPOINT_IP, reg::ENDPOINT_PORT);
    let protocol = u8::try_from(exact(Field::IpProto, u128::MAX)?).ok()?;
    Some((
        protocol,
        Endpoint {
            ip: u32::try_from(exact(ip.field, ip.mask())?).ok()?,
            port: u16::try_from(exact(port.field, port.mask())?).ok()?,
        },
    ))
}

/// The select group of a service port. Bucket ids come from the endpoints, so a change of
/// endpoints does not move the connections of the others (highest-random-weight hashing).
pub fn group(sp: &ServicePort, group_id: u32) -> Group {
    let (src, dst) = l4_fields(sp.protocol);
    let mut buckets: Vec<Bucket> = Vec::with_capacity(sp.endpoints.len());
    for e in &sp.endpoints {
        // Bucket ids taken so far: a few per group, so a scan beats a tree.
        let mut id = (endpoint_id(sp.protocol, e) & 0x7fff_ffff) as u32;
        while buckets.iter().any(|b| b.bucket_id == id) {
            id = (id + 1) & 0x7fff_ffff;
        }
        // Exactly sized: a full sync makes 100,000 of these lists.
        let mut actions = Vec::with_capacity(3 + usize::from(sp.affinity_timeout.is_some()));
        actions.push(Action::Load {
            dst: reg::ENDPOINT_IP,
            value: u128::from(e.ip),
        });
        actions.push(Action::Load {
            dst: reg::ENDPOINT_PORT,
            value: u128::from(e.port),
        });
        if let Some(timeout) = sp.affinity_timeout {
            actions.push(affinity_learn(sp, timeout));
        }
        actions.push(Action::Resubmit {
            port: None,
            table: Some(table::ENDPOINT_DNAT),
        });
        buckets.push(Bucket {
            bucket_id: id,
            weight: 100,
            actions,
        });
    }
    Group {
        group_id,
        group_type: GroupType::Select,
        selection_method: Some(Cow::Borrowed("hash")),
        fields: vec![
            Cow::Borrowed("ip_src"),
            Cow::Borrowed("ip_dst"),
            Cow::Borrowed(src),
            Cow::Borrowed(dst),
        ],
        buckets,
    }
}

/// The learned flow of session affinity: this client to this VIP:port goes to the endpoint
/// in `reg0`/`reg1` for `timeout` seconds (OpenFlow caps hard timeouts at 65535).
fn affinity_learn(sp: &ServicePort, timeout: u32) -> Action {
    let whole = Subfield::whole;
    let dst_port = match sp.protocol {
        17 => Field::UdpDst,
        132 => Field::SctpDst,
        _ => Field::TcpDst,
    };
    Action::Learn(Box::new(Learn {
        table: table::AFFINITY,
        hard_timeout: timeout.min(65535) as u16,
        priority: priority::LEARNED,
        cookie: 0,
        specs: vec![
            LearnSpec::MatchImm {
                dst: whole(Field::EthType),
                value: 0x0800,
            },
            LearnSpec::MatchImm {
                dst: whole(Field::IpProto),
                value: u128::from(sp.protocol),
            },
            LearnSpec::MatchField {
                dst: whole(Field::IpSrc),
                src: whole(Field::IpSrc),
            },
            LearnSpec::MatchField {
                dst: whole(Field::IpDst),
                src: whole(Field::IpDst),
            },
            LearnSpec::MatchField {
                dst: whole(dst_port),
                src: whole(dst_port),
            },
            LearnSpec::LoadField {
                dst: reg::ENDPOINT_IP,
                src: reg::ENDPOINT_IP,
            },
            LearnSpec::LoadField {
                dst: reg::ENDPOINT_PORT,
                src: reg::ENDPOINT_PORT,
            },
            LearnSpec::LoadImm {
                dst: reg::AFFINITY_HIT,
                value: 1,
            },
        ],
        ..Learn::default()
    }))
}

/// The flows of one service port (not its endpoints' shared flows).
pub fn service_flows(round: u16, sp: &ServicePort, group_id: u32, node_ips: &[u32]) -> Vec<Flow> {
    let c = Cookie::new(round, Category::Service, u64::from(group_id)).value();
    let entry = |dst_ip: u32, dst_port: u16| {
        Match::from_constraints(&[
            (Field::EthType, 0x0800, u128::MAX),
            (Field::IpProto, u128::from(sp.protocol), u128::MAX),
            (Field::IpDst, u128::from(dst_ip), u128::MAX),
            (Field::TpDst, u128::from(dst_port), u128::MAX),
        ])
    };
    // (match, priority, masquerade): the ClusterIP; the NodePort from pods (not the node's own
    // traffic) and from outside (the node's own), as the scope takes them.
    let mut entries = Vec::with_capacity(1 + 2 * node_ips.len());
    if sp.scope.takes_cluster_ip() {
        entries.push((entry(sp.cluster_ip, sp.port), priority::SERVICE_PORT, false));
    }
    if let Some(np) = sp.node_port {
        for ip in node_ips {
            if sp.scope.takes_node_port_from_pods() {
                let mut m = entry(*ip, np);
                match_bits(&mut m, reg::HOST, 0);
                entries.push((m, priority::NODE_PORT, false));
            }
            if let Some(masquerade) = sp.scope.takes_node_port_from_outside() {
                let mut m = entry(*ip, np);
                match_bits(&mut m, reg::HOST, 1);
                entries.push((m, priority::NODE_PORT, masquerade));
            }
        }
    }
    let per_entry = if sp.affinity_timeout.is_some() { 3 } else { 1 };
    let mut flows = Vec::with_capacity(entries.len() * per_entry);
    for (m, at, masquerade) in entries {
        let masq = masquerade.then_some(Action::Load {
            dst: reg::MASQUERADE,
            value: 1,
        });
        if sp.endpoints.is_empty() {
            // No endpoint: reject (the agent answers), never a silent drop; but endpoints
            // elsewhere that internalTrafficPolicy: Local keeps from this node: drop, as
            // kube-proxy does.
            let actions = if sp.no_local_endpoints {
                vec![]
            } else {
                vec![Action::Controller(65535)]
            };
            flows.push(Flow {
                cookie: c,
                table: table::SERVICE_LB,
                priority: at,
                matches: m,
                actions,
                ..Flow::default()
            });
            continue;
        }
        match sp.affinity_timeout {
            None => flows.push(Flow {
                cookie: c,
                table: table::SERVICE_LB,
                priority: at,
                matches: m,
                actions: masq.into_iter().chain([Action::Group(group_id)]).collect(),
                ..Flow::default()
            }),
            Some(_) => {
                flows.push(Flow {
                    cookie: c,
                    table: table::SERVICE_LB,
                    priority: at,
                    matches: m.clone(),
                    actions: masq
                        .into_iter()
                        .chain([
                            Action::Resubmit {
                                port: None,
                                table: Some(table::AFFINITY),
                            },
                            Action::Resubmit {
                                port: None,
                                table: Some(table::AFFINITY_CHECK),
                            },
                        ])
                        .collect(),
                    ..Flow::default()
                });
                let mut known = m.clone();
                match_bits(&mut known, reg::AFFINITY_HIT, 1);
                flows.push(Flow {
                    cookie: c,
                    table: table::AFFINITY_CHECK,
                    priority: at + priority::AFFINITY_KNOWN_ABOVE,
                    matches: known,
                    actions: vec![Action::Resubmit {
                        port: None,
                        table: Some(table::ENDPOINT_DNAT),
                    }],
                    ..Flow::default()
                });
                flows.push(Flow {
                    cookie: c,
                    table: table::AFFINITY_CHECK,
                    priority: at,
                    matches: m,
                    actions: vec![Action::Group(group_id)],
                    ..Flow::default()
                });
            }
        }
    }
    flows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_flow_reads_back_as_its_endpoint_and_no_other_flow_does() {
        let e = Endpoint {
            ip: 0x0a04_000b,
            port: 5353,
        };
        for protocol in [6, 17, 132] {
            assert_eq!(
                endpoint_of_flow(&endpoint_flow(7, protocol, &e)),
                Some((protocol, e))
            );
        }
        assert_eq!(endpoint_of_flow(&cluster_ip_flow(7, 0x0a60_000d)), None);
        assert!(
            static_flows(7, &[0xac10_000b])
                .iter()
                .all(|f| endpoint_of_flow(f).is_none())
        );
    }
}
