//! The node agent: wires pods into Open vSwitch on CNI ADD and unwires them on DEL.
//!
//! A pod's traffic never switches locally: everything it sends goes to the uplink (the node
//! VM's NIC, a port of the hypervisor's NSX switch) tagged with the pod's VLAN, where NSX maps
//! it to the pod's logical port and applies the distributed firewall; traffic arriving on the
//! uplink with that VLAN is untagged and delivered to the pod. Both directions pass the
//! proxy's tables first (so ClusterIP traffic is load-balanced, and replies un-NATed). The
//! tables, registers and priorities are named in [`crate::ovs::pipeline`]:
//!
//! - table 0, from the pod (IP with the pod's own source address; other addresses are dropped,
//!   a SpoofGuard): `reg5` = the pod's port, then the proxy (table 10); ARP goes straight out
//!   tagged;
//! - table 0, from the uplink with the pod's VLAN: untag, `reg7` = the pod's port, then the
//!   proxy; non-IP is delivered directly;
//! - table 40 (after the proxy): `reg7` set: out to that pod; `reg5` set: tag with the pod's
//!   VLAN and out to the uplink, unless the proxy DNATed the pod's packet to the pod itself
//!   (hairpin): then back out of its own port from [`wiring::HAIRPIN_SOURCE`], the one case
//!   that never reaches NSX: the distributed firewall does not see a pod talk to itself,
//!   which other CNIs (Cilium's service loopback) exempt from policy too.
//!
//! Every flow of a pod carries a cookie derived from its container id, so DEL removes exactly
//! that pod's flows even after its OpenFlow port number was reused by another pod. The pods'
//! identity lives in the OVS ports' external ids, so a restarted agent rebuilds its view from
//! the switch ([`Agent::recover`]), and after an OVS restart it replays every pod's flows
//! ([`Agent::replay`]).
//!
//! - [`wiring`]: a pod's flows and port, and the agent's record of pods;
//! - [`server`]: the CNI socket: requests on the [`crate::cni::wire`] protocol, answered after
//!   NCP's annotation ([`crate::k8s::pod_network::PodNetwork`]) is there;
//! - [`kube_pods`]: where the annotation is read from on a real cluster.

pub mod kube_pods;
pub mod server;
pub mod wiring;

pub use wiring::{
    Agent, AgentConfig, AgentError, PodNetwork, PodRequest, PodSwitch, PortInfo, Wired,
};
