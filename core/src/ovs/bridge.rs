//! The port through which nsx-kube-proxy and the node agent program a switch: a real
//! ovs-vswitchd in production (adapters), fake-ovs in the simulation.

use super::flow::{Bucket, Flow, Group, Match};

/// One message of a bundle.
#[derive(Debug, Clone, PartialEq)]
pub enum OfOp {
    /// Adds (or replaces the one with the same table, priority and match).
    AddFlow(Flow),
    /// Deletes exactly the flow with this table, priority and match.
    DelFlowStrict {
        table: u8,
        priority: u16,
        matches: Match,
    },
    /// Deletes every flow whose cookie matches under the mask (all tables).
    DelFlowsByCookie {
        cookie: u64,
        cookie_mask: u64,
    },
    AddGroup(Group),
    /// Replaces a group's buckets.
    ModGroup(Group),
    /// Appends buckets to a group (OpenFlow 1.5 `insert-buckets`): how a group too big for one
    /// OpenFlow message is built.
    InsertBuckets {
        group_id: u32,
        buckets: Vec<Bucket>,
    },
    DelGroup(u32),
}

/// The connections to forget (`dpctl/flush-conntrack`): those in `zone` over `protocol` whose
/// traffic was NATed to (or comes from) `ip:port`, or was addressed to it (a service address
/// that goes or changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConntrackFilter {
    /// `None`: every zone.
    pub zone: Option<u16>,
    pub protocol: u8,
    pub ip: u32,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bridge refused the bundle at message {index}: {message}")]
pub struct BridgeError {
    pub index: usize,
    pub message: String,
}

/// A switch that takes atomic bundles of flow and group changes.
pub trait OpenFlowBridge {
    /// Applies every message or none.
    fn bundle(&mut self, ops: Vec<OfOp>) -> Result<(), BridgeError>;
    /// Forgets the matching connections; returns how many.
    fn flush_conntrack(&mut self, filter: ConntrackFilter) -> usize;
    /// The flows whose cookie matches `cookie` under `mask`: what a restarted proxy reads of
    /// its previous run (the endpoints it had, whose connections may need forgetting).
    fn flows_with_cookie(&mut self, cookie: u64, mask: u64) -> Result<Vec<Flow>, BridgeError>;
}

impl OfOp {
    /// This message as a line of `ovs-ofctl bundle` input (OVS 2.8+: `flow add ...`,
    /// `group add ...`), the file a real switch takes as one atomic transaction.
    pub fn to_bundle_line(&self) -> String {
        match self {
            OfOp::AddFlow(f) => format!("flow add {f}"),
            OfOp::DelFlowStrict {
                table,
                priority,
                matches,
            } => {
                let m = matches.to_string();
                if m.is_empty() {
                    format!("flow delete_strict table={table},priority={priority}")
                } else {
                    format!("flow delete_strict table={table},priority={priority},{m}")
                }
            }
            OfOp::DelFlowsByCookie {
                cookie,
                cookie_mask,
            } => format!("flow delete cookie={cookie:#x}/{cookie_mask:#x}"),
            OfOp::AddGroup(g) => format!("group add {g}"),
            OfOp::ModGroup(g) => format!("group modify {g}"),
            OfOp::InsertBuckets { group_id, buckets } => {
                let mut s =
                    format!("group insert_bucket group_id={group_id},command_bucket_id=last");
                for b in buckets {
                    s.push_str(&format!(
                        ",bucket=bucket_id:{},weight:{},actions={}",
                        b.bucket_id,
                        b.weight,
                        super::flow::actions_text(&b.actions)
                    ));
                }
                s
            }
            OfOp::DelGroup(id) => format!("group delete group_id={id}"),
        }
    }
}
