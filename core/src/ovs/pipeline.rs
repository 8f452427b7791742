//! The node's OpenFlow pipeline: one bridge shared by the node agent (pod wiring) and
//! nsx-kube-proxy (service load balancing). Every table, register, priority, conntrack bit and
//! cookie either of them uses is named here once, with what its values mean, so that neither
//! has to know the other's literals.
//!
//! A packet's path:
//! - [`table::CLASSIFIER`] (the agent's): a pod's IP packets from its own address, and IP
//!   packets from the uplink with the VLAN of a local pod, load the pod's port into
//!   [`reg::FROM_POD`] or [`reg::TO_POD`] and into [`reg::ZONE`], and go to the proxy's tables;
//!   any other source address of a pod is dropped (SpoofGuard); a pod's non-IP frames are
//!   tagged with its VLAN and sent to the uplink, the uplink's are untagged to the pod.
//! - [`table::CT_ZONE`], [`table::CT_STATE`], [`table::AFFINITY`], [`table::SERVICE_LB`],
//!   [`table::AFFINITY_CHECK`], [`table::ENDPOINT_DNAT`] (the proxy's): conntrack in the local
//!   pod's zone, then service load balancing (see `proxy::compile`). A bridge where the proxy
//!   has installed nothing yet sends every packet of [`table::CT_ZONE`] straight on to
//!   [`table::FORWARD`] (the agent's default flow there).
//! - [`table::FORWARD`] (the agent's): to the pod in [`reg::TO_POD`], hairpin turns for a pod
//!   that reached itself through a service, and everything else of a pod ([`reg::FROM_POD`])
//!   tagged with its VLAN to the uplink, where NSX takes over.
//!
//! **The node's own traffic.** The node's address lives on its VIF, as the pods' VLANs do:
//! what NSX delivers to the node arrives on the uplink untagged, and the host stack sits
//! behind the bridge's `LOCAL` port. The agent marks such packets [`reg::HOST`] and hands them
//! to [`table::HOST_IN`], whose miss (no proxy yet) is the host. The proxy un-SNATs there (the
//! [`zone::SNAT`] zone), tracks in [`zone::HOST`] and load-balances NodePorts: DNAT to an
//! endpoint, then (`externalTrafficPolicy: Cluster`) SNAT to the node's address in
//! [`table::HOST_OUT`], as kube-proxy masquerades, so that the endpoint's replies come back
//! through this node; [`table::HOST_ROUTE`] sends a packet for the node's own address to the
//! host ([`reg::TO_HOST`]) and anything else on: to a local pod (the agent commits it in the
//! pod's zone with [`ct_mark::NODE_PORT`], so that the pod's replies come back through the
//! host zones) or out of the uplink untagged. A reply from a local pod with that mark is
//! turned into [`table::HOST_REPLY`] by [`table::CT_STATE`]: un-SNAT, un-DNAT, out untagged.
//!
//! The shape follows Antrea's `pkg/agent/openflow` (fields named once, with their bits; one
//! cookie allocator with a category and a round).

use super::field::Field;
use super::flow::{Match, Subfield};

/// The tables, in the order a packet visits them.
pub mod table {
    /// The agent's entry table: which pod a packet belongs to, SpoofGuard, VLAN tags.
    pub const CLASSIFIER: u8 = 0;
    /// The node's own IP traffic from the uplink (the proxy's; the agent's miss: the host):
    /// un-SNAT in [`super::zone::SNAT`], then on to [`CT_ZONE`] in [`super::zone::HOST`].
    pub const HOST_IN: u8 = 5;
    /// A local pod's reply on a NodePort connection, after un-SNAT: un-DNAT in
    /// [`super::zone::HOST`], then [`HOST_ROUTE`].
    pub const HOST_REPLY: u8 = 6;
    /// Conntrack in the local pod's zone, with NAT (un-DNATs replies of load-balanced
    /// connections).
    pub const CT_ZONE: u8 = 10;
    /// Invalid packets dropped, established ones past load balancing, new ones to
    /// [`SERVICE_LB`].
    pub const CT_STATE: u8 = 11;
    /// The flows session affinity learns: a client's endpoint for a service port.
    pub const AFFINITY: u8 = 19;
    /// One flow per service port (and NodePort), one reject flow per ClusterIP.
    pub const SERVICE_LB: u8 = 20;
    /// With session affinity: the learned endpoint if [`AFFINITY`] found one, else the group.
    pub const AFFINITY_CHECK: u8 = 21;
    /// One flow per endpoint, shared by every service that uses it: commit with DNAT.
    pub const ENDPOINT_DNAT: u8 = 30;
    /// The node's own traffic after DNAT: SNAT to the node's address (a new NodePort
    /// connection with [`super::reg::MASQUERADE`]; established ones through the SNAT zone).
    /// Everything else goes on to [`FORWARD`].
    pub const HOST_OUT: u8 = 31;
    /// Where the node's own traffic goes: its address to the host ([`super::reg::TO_HOST`]),
    /// the rest to [`FORWARD`] (a local pod, or the uplink untagged).
    pub const HOST_ROUTE: u8 = 32;
    /// The agent's output table: to a local pod, hairpin, or to the uplink.
    pub const FORWARD: u8 = 40;
}

/// Registers, by what they carry between tables.
pub mod reg {
    use super::{Field, Subfield};

    const fn bits(n: u8, ofs: u32, bits: u32) -> Subfield {
        Subfield {
            field: Field::Reg(n),
            ofs,
            bits,
        }
    }

    /// The endpoint a service group's bucket (or a learned affinity flow) picked: its IPv4
    /// address, for [`super::table::ENDPOINT_DNAT`].
    pub const ENDPOINT_IP: Subfield = bits(0, 0, 32);
    /// The endpoint's port.
    pub const ENDPOINT_PORT: Subfield = bits(1, 0, 16);
    /// 1: [`super::table::AFFINITY`] found a learned endpoint for this client (0: it did
    /// not, the group picks one).
    pub const AFFINITY_HIT: Subfield = bits(2, 0, 1);
    /// The OpenFlow port of the local pod a packet came from (0: not from a local pod).
    pub const FROM_POD: Subfield = bits(5, 0, 32);
    /// The conntrack zone of the packet: the OpenFlow port of the local pod it comes from or
    /// goes to. One zone per pod keeps a client's and a server's view of one connection apart
    /// when both are on this node (every packet between them passes the bridge twice, out
    /// and back in through the uplink): the client's DNAT entry must not un-NAT the server's
    /// reply on its way out.
    pub const ZONE: Subfield = bits(6, 0, 16);
    /// The OpenFlow port of the local pod a packet from the uplink goes to.
    pub const TO_POD: Subfield = bits(7, 0, 32);
    /// 1: the node's own traffic (it came from the uplink untagged, or it is a local pod's
    /// reply on a NodePort connection that came that way).
    pub const HOST: Subfield = bits(4, 0, 1);
    /// 1: a new NodePort connection from outside under `externalTrafficPolicy: Cluster`: SNAT
    /// it to the node's address after DNAT.
    pub const MASQUERADE: Subfield = bits(4, 1, 1);
    /// 1: the node's own traffic for the host's stack (the `LOCAL` port).
    pub const TO_HOST: Subfield = bits(4, 2, 1);
}

/// Conntrack zones besides the pods' (a pod's zone is its OpenFlow port number).
pub mod zone {
    /// The node's own traffic: NodePort DNAT from outside.
    pub const HOST: u16 = 0xfff0;
    /// The node's masquerade: SNAT of NodePort connections to the node's address.
    pub const SNAT: u16 = 0xfff1;
}

/// `ct_mark` bits.
pub mod ct_mark {
    use super::{Field, Subfield};

    /// In a local pod's zone: the connection reached the pod through the node's NodePort
    /// path, so its replies go back through [`super::table::HOST_REPLY`].
    pub const NODE_PORT: Subfield = Subfield {
        field: Field::CtMark,
        ofs: 0,
        bits: 1,
    };
}

pub use super::field::LOCAL_PORT;

/// `ct_state` bits, as OVS numbers them.
pub mod ct_state {
    pub const NEW: u128 = 0x01;
    pub const EST: u128 = 0x02;
    pub const REL: u128 = 0x04;
    pub const RPL: u128 = 0x08;
    pub const INV: u128 = 0x10;
    pub const TRK: u128 = 0x20;
}

/// Flow priorities: within a table, the more specific flow wins.
pub mod priority {
    /// A table's miss flow (the agent's drops, the proxy's "not a service").
    pub const MISS: u16 = 0;

    // table::CLASSIFIER
    /// A pod's reply to the hairpin source, before anything else of the pod.
    pub const HAIRPIN_REPLY: u16 = 210;
    /// A pod's IP packet from its own address; an uplink IP packet with a pod's VLAN.
    pub const POD_IP: u16 = 200;
    /// Any other IP source address of a pod (SpoofGuard: dropped).
    pub const SPOOFED: u16 = 150;
    /// A pod's (or the uplink's) other frames: straight through with the VLAN tag.
    pub const POD_OTHER: u16 = 100;
    /// The node's own traffic: IP from the uplink untagged to [`super::table::HOST_IN`]; the
    /// rest between the uplink and the host as it is.
    pub const HOST_IP: u16 = 90;
    pub const HOST_OTHER: u16 = 80;

    // table::CT_ZONE
    /// Every IP packet through conntrack.
    pub const CONNTRACK: u16 = 100;

    // table::CT_STATE
    pub const CT_INVALID: u16 = 200;
    /// A local pod's reply on a NodePort connection from the host path: back to it.
    pub const NODE_PORT_REPLY: u16 = 196;
    /// The node's own established traffic: through [`super::table::HOST_OUT`].
    pub const HOST_ESTABLISHED: u16 = 195;
    pub const CT_ESTABLISHED: u16 = 190;

    // table::SERVICE_LB (and table::AFFINITY_CHECK)
    /// A ClusterIP and port.
    pub const SERVICE_PORT: u16 = 200;
    /// A NodePort on one of the node's addresses.
    pub const NODE_PORT: u16 = 190;
    /// In [`super::table::HOST_OUT`]: a new connection to masquerade; the node's other traffic.
    pub const MASQUERADE: u16 = 200;
    pub const HOST_TRAFFIC: u16 = 100;
    /// In [`super::table::HOST_ROUTE`]: the node's own address.
    pub const TO_HOST: u16 = 100;
    /// Any other port or protocol to a ClusterIP: rejected, below its ports' flows.
    pub const CLUSTER_IP_REJECT: u16 = 100;
    /// In [`super::table::AFFINITY_CHECK`], the flow taken when affinity found an endpoint
    /// sits this far above the entry's own priority.
    pub const AFFINITY_KNOWN_ABOVE: u16 = 10;

    // table::AFFINITY, table::ENDPOINT_DNAT
    pub const LEARNED: u16 = 200;
    pub const ENDPOINT: u16 = 200;

    // table::FORWARD
    /// A pod's request to itself through a service: turned around with the hairpin source.
    pub const HAIRPIN_REQUEST: u16 = 210;
    /// The rest of a pod's traffic to itself (replies): turned around as it is.
    pub const TO_ITSELF: u16 = 205;
    pub const TO_POD: u16 = 200;
    /// The node's own traffic: to the host's stack; to a local pod by address (between the
    /// two); out of the uplink untagged.
    pub const HOST_TO_LOCAL: u16 = 190;
    pub const HOST_TO_POD: u16 = 180;
    pub const HOST_BACK_TO_UPLINK: u16 = 175;
    pub const HOST_TO_UPLINK: u16 = 170;
    pub const OUT_OF_POD: u16 = 100;
}

/// What a flow belongs to: the cookie's middle byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    /// The proxy's flows every bridge gets once.
    ProxyStatic = 1,
    /// One service port's flows (the id is its group).
    Service = 2,
    /// One endpoint's shared DNAT flow (the id is [`crate::proxy::compile::endpoint_id`]'s).
    Endpoint = 3,
    /// One pod's flows (the id is a hash of its container id).
    Pod = 4,
    /// The agent's own flows; while one is on the bridge, ovs-vswitchd has not restarted
    /// since the agent last installed them.
    AgentStatic = 5,
    /// A ClusterIP's reject flow (the id is the address).
    ClusterIp = 6,
}

impl Category {
    const ALL: [Category; 6] = [
        Category::ProxyStatic,
        Category::Service,
        Category::Endpoint,
        Category::Pod,
        Category::AgentStatic,
        Category::ClusterIp,
    ];

    /// Whether the proxy owns flows of this category (it replaces them round by round; the
    /// agent's are keyed by pod and never carry a round).
    pub fn is_proxy(self) -> bool {
        matches!(
            self,
            Category::ProxyStatic | Category::Service | Category::Endpoint | Category::ClusterIp
        )
    }
}

/// A flow cookie: round (16 bits) | category (8 bits) | id (40 bits). The round tells a
/// restarted proxy's flows from its predecessor's, so it can install its own first and then
/// delete the old ones by round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cookie {
    pub round: u16,
    pub category: Category,
    /// Truncated to 40 bits.
    pub id: u64,
}

impl Cookie {
    pub const ROUND_SHIFT: u32 = 48;
    pub const ROUND_MASK: u64 = 0xffff << Self::ROUND_SHIFT;
    pub const CATEGORY_SHIFT: u32 = 40;
    pub const CATEGORY_MASK: u64 = 0xff << Self::CATEGORY_SHIFT;
    pub const ID_MASK: u64 = (1 << Self::CATEGORY_SHIFT) - 1;

    pub fn new(round: u16, category: Category, id: u64) -> Self {
        Cookie {
            round,
            category,
            id: id & Self::ID_MASK,
        }
    }

    /// The cookie of a pod's flows: from its container id (not its port number, which OVS
    /// may hand to another pod later), so whoever reads a bridge can tell a live pod's flows
    /// from a gone one's.
    pub fn of_pod(container_id: &str) -> Self {
        Cookie::new(0, Category::Pod, crate::hash::stable_hash(container_id))
    }

    /// The 64-bit value on the flow.
    pub fn value(self) -> u64 {
        debug_assert!(self.id <= Self::ID_MASK, "a cookie id has 40 bits");
        (u64::from(self.round) << Self::ROUND_SHIFT)
            | ((self.category as u64) << Self::CATEGORY_SHIFT)
            | (self.id & Self::ID_MASK)
    }

    /// A flow's cookie read back; `None` for a cookie that is not ours.
    pub fn parse(value: u64) -> Option<Self> {
        let c = (value & Self::CATEGORY_MASK) >> Self::CATEGORY_SHIFT;
        let category = Category::ALL.into_iter().find(|k| *k as u64 == c)?;
        Some(Cookie {
            round: ((value & Self::ROUND_MASK) >> Self::ROUND_SHIFT) as u16,
            category,
            id: value & Self::ID_MASK,
        })
    }

    /// The cookie and mask that select every flow of one round (to delete a predecessor's).
    pub fn of_round(round: u16) -> (u64, u64) {
        (u64::from(round) << Self::ROUND_SHIFT, Self::ROUND_MASK)
    }
}

/// The round a previous proxy left on a bridge with flows of these cookies (the highest among
/// the proxy's own categories; the agent's flows do not count).
pub fn previous_round(cookies: impl IntoIterator<Item = u64>) -> Option<u16> {
    cookies
        .into_iter()
        .filter_map(Cookie::parse)
        .filter(|c| c.category.is_proxy())
        .map(|c| c.round)
        .max()
}

/// The round a proxy starts with after `previous` (never 0, which means "none").
pub fn next_round(previous: Option<u16>) -> u16 {
    previous.map_or(1, |r| r.wrapping_add(1).max(1))
}

/// Matches `value` in the bits of `sf` (what `reg5=3` or `reg1=0x50/0xffff` say), keeping
/// what the match already asks of the field's other bits (two flags of one register).
pub fn match_bits(m: &mut Match, sf: Subfield, value: u128) {
    debug_assert!(value < (1u128 << sf.bits), "{value} does not fit {sf:?}");
    let (v, mask) = m.get(sf.field).unwrap_or((0, 0));
    m.set(
        sf.field,
        (v & !sf.mask()) | (value << sf.ofs),
        mask | sf.mask(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_keep_the_layout_the_bridge_holds() {
        // The values flows already on bridges carry: the layout is a contract with them.
        assert_eq!(
            Cookie::new(0, Category::Pod, 0x12).value(),
            (4 << 40) | 0x12
        );
        assert_eq!(
            Cookie::new(3, Category::Service, 7).value(),
            (3 << 48) | (2 << 40) | 7
        );
        let c = Cookie::new(0xfffe, Category::ClusterIp, u64::MAX);
        assert_eq!(c.id, Cookie::ID_MASK, "ids are truncated to 40 bits");
        assert_eq!(Cookie::parse(c.value()), Some(c));
        assert_eq!(Cookie::parse(0x77 << 40), None, "an unknown category");
    }

    #[test]
    fn the_previous_round_is_the_proxys_highest() {
        let agent = Cookie::new(9, Category::Pod, 1).value();
        let old = Cookie::new(4, Category::Endpoint, 1).value();
        let older = Cookie::new(2, Category::ProxyStatic, 0).value();
        assert_eq!(previous_round([agent, old, older]), Some(4));
        assert_eq!(previous_round([agent]), None);
        assert_eq!(next_round(None), 1);
        assert_eq!(next_round(Some(u16::MAX)), 1, "wraps past 0");
    }

    #[test]
    fn registers_do_not_overlap() {
        let all = [
            reg::ENDPOINT_IP,
            reg::ENDPOINT_PORT,
            reg::AFFINITY_HIT,
            reg::FROM_POD,
            reg::ZONE,
            reg::TO_POD,
            reg::HOST,
            reg::MASQUERADE,
            reg::TO_HOST,
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert!(
                    a.field != b.field || (a.mask() & b.mask()) == 0,
                    "{a:?} overlaps {b:?}"
                );
            }
        }
    }

    #[test]
    fn matching_bits_shifts_and_masks() {
        let mut m = Match::default();
        match_bits(&mut m, reg::ENDPOINT_PORT, 80);
        assert_eq!(m.get(Field::Reg(1)), Some((80, 0xffff)));
        // Two flags of one register: both kept.
        match_bits(&mut m, reg::HOST, 1);
        match_bits(&mut m, reg::TO_HOST, 0);
        assert_eq!(m.get(Field::Reg(4)), Some((0x1, 0x5)));
    }
}
