//! An in-memory Open vSwitch bridge for the harness: what nsx-kube-proxy and the node agent
//! program is held and executed here as a real ovs-vswitchd would.
//!
//! - [`bridge`]: ports (OpenFlow numbers handed out and given back as OVS does), OpenFlow 1.3
//!   flow mods (add replaces an identical match and priority; modify and delete, strict or
//!   not, with cookie masks), groups (all, select, indirect) with referential integrity
//!   (a flow or bucket naming a missing group is refused; deleting a group deletes the flows
//!   that use it), atomic bundles, per-flow counters, `dump-flows`/`dump-groups` text, and a
//!   restart that wipes flows and groups but keeps ports and conntrack.
//! - [`classifier`]: tuple-space search (one ordered map per mask signature).
//! - [`store`]: the flows by id, in the order they were added.
//! - [`conntrack`]: zones, states, commit, mark and label, SNAT/DNAT and reply un-NAT,
//!   timeouts, flush.
//! - [`trace`]: the pipeline, `ofproto/trace` style.
//! - [`hash`]: OVS's hash and select-group bucket choice, bit for bit.
//!
//! Known differences from the real one are listed in this crate's README.

pub mod bridge;
pub mod classifier;
pub mod conntrack;
pub mod hash;
pub mod packet;
pub mod real;
pub mod store;
pub mod trace;

pub use bridge::{Bridge, FlowMod, OvsError, Port};
pub use packet::Packet;
pub use trace::{Output, Trace};
