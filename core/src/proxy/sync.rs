//! The incremental proxy: per service port a cache of what is installed; a sync compiles only
//! the changed service ports, diffs them against the cache and sends one atomic bundle; shared
//! endpoint flows are reference counted; stale UDP/SCTP connections of removed endpoints are
//! flushed (TCP ones drain, as kube-proxy lets them). Cookies carry a round: a restarted agent
//! installs everything under the next round and deletes the previous one in the same bundle;
//! after an OVS restart everything is replayed.

use std::collections::{BTreeMap, BTreeSet};

use crate::ovs::bridge::{BridgeError, ConntrackFilter, OfOp, OpenFlowBridge};
use crate::ovs::flow::{Flow, Group};

use super::compile::{cookie, endpoint_flow, group, service_flows, static_flows};
use super::model::{Endpoint, ServicePort, ServicePortKey};

/// Bytes an OpenFlow message may carry, and what a group message and a bucket take (a
/// bucket with two loads and a resubmit; one with a learn is bigger).
pub const MAX_MESSAGE_BYTES: usize = 65535;
const GROUP_HEADER_BYTES: usize = 40;
const BUCKET_BYTES: usize = 96;
const BUCKET_WITH_LEARN_BYTES: usize = 256;

#[derive(Debug, Clone)]
struct Installed {
    sp: ServicePort,
    group_id: u32,
    flows: Vec<Flow>,
    group: Option<Group>,
}

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub ops: usize,
    pub flushed: usize,
    pub service_ports: usize,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub node_name: String,
    /// The node's addresses, for NodePort.
    pub node_ips: Vec<u32>,
}

/// nsx-kube-proxy's state on one node.
#[derive(Debug)]
pub struct Proxy {
    cfg: ProxyConfig,
    round: u16,
    /// The round a previous run of the agent installed, deleted by the first sync.
    previous_round: Option<u16>,
    static_installed: bool,
    installed: BTreeMap<ServicePortKey, Installed>,
    /// (protocol, endpoint) -> how many service ports use its DNAT flow.
    endpoint_refs: BTreeMap<(u8, Endpoint), usize>,
    group_ids: BTreeMap<ServicePortKey, u32>,
    free_ids: BTreeSet<u32>,
    next_id: u32,
    /// Groups found on the bridge at start (from a previous run): modified, not added.
    existing_groups: BTreeSet<u32>,
    /// After an OVS restart this proxy learned of late: groups it may have added to the wiped
    /// bridge in between. Each is deleted (a no-op when absent) before it is added again.
    uncertain_groups: BTreeSet<u32>,
}

fn chunks(g: &Group) -> (Group, Vec<Vec<crate::ovs::flow::Bucket>>) {
    let per = if g.buckets.iter().any(|b| {
        b.actions
            .iter()
            .any(|a| matches!(a, crate::ovs::flow::Action::Learn(_)))
    }) {
        BUCKET_WITH_LEARN_BYTES
    } else {
        BUCKET_BYTES
    };
    let fit = (MAX_MESSAGE_BYTES - GROUP_HEADER_BYTES) / per;
    if g.buckets.len() <= fit {
        return (g.clone(), vec![]);
    }
    let mut first = g.clone();
    let rest: Vec<_> = first.buckets.split_off(fit);
    (first, rest.chunks(fit).map(<[_]>::to_vec).collect())
}

impl Proxy {
    /// A proxy starting with `round`; `previous_round` is the one the last run used (its flows
    /// are deleted once this run's are in), `existing_groups` the group ids on the bridge.
    pub fn new(
        cfg: ProxyConfig,
        round: u16,
        previous_round: Option<u16>,
        existing_groups: BTreeSet<u32>,
    ) -> Self {
        Self {
            cfg,
            round,
            previous_round,
            static_installed: false,
            installed: BTreeMap::new(),
            endpoint_refs: BTreeMap::new(),
            group_ids: BTreeMap::new(),
            free_ids: BTreeSet::new(),
            next_id: 1,
            existing_groups,
            uncertain_groups: BTreeSet::new(),
        }
    }

    pub fn round(&self) -> u16 {
        self.round
    }

    /// Service ports installed.
    pub fn len(&self) -> usize {
        self.installed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.installed.is_empty()
    }

    /// OVS restarted: nothing is installed any more; the next sync replays everything. The
    /// restart may be learned late, after syncs that already wrote to the new bridge: groups
    /// are then deleted before they are added again.
    pub fn bridge_restarted(&mut self) {
        self.static_installed = false;
        self.existing_groups.clear();
        self.uncertain_groups = self.group_ids.values().copied().collect();
        let keys: Vec<ServicePortKey> = self.installed.keys().cloned().collect();
        for k in keys {
            if let Some(i) = self.installed.get_mut(&k) {
                i.flows.clear();
                i.group = None;
            }
        }
        self.endpoint_refs.clear();
    }

    fn group_id(&mut self, key: &ServicePortKey) -> u32 {
        if let Some(id) = self.group_ids.get(key) {
            return *id;
        }
        let id = match self.free_ids.pop_first() {
            Some(id) => id,
            None => {
                self.next_id += 1;
                self.next_id - 1
            }
        };
        self.group_ids.insert(key.clone(), id);
        id
    }

    /// Brings the bridge to `want` for the service ports in `changed` (every one of them:
    /// present in `want` to install or update, absent to remove). Cost: the changed ports'.
    pub fn sync<B: OpenFlowBridge>(
        &mut self,
        bridge: &mut B,
        want: &BTreeMap<ServicePortKey, ServicePort>,
        changed: &BTreeSet<ServicePortKey>,
    ) -> Result<SyncReport, BridgeError> {
        let mut ops: Vec<OfOp> = Vec::new();
        let mut tail: Vec<OfOp> = Vec::new();
        let mut flush: Vec<ConntrackFilter> = Vec::new();
        let round = self.round;
        if !self.static_installed {
            ops.extend(static_flows(round).into_iter().map(OfOp::AddFlow));
        }
        // Endpoint reference changes, kept as a delta and committed after success (a copy of
        // every count would make a sync cost the cluster's size).
        let base = std::mem::take(&mut self.endpoint_refs);
        let mut refs = RefDelta {
            base: &base,
            delta: BTreeMap::new(),
        };
        let mut new_installed: Vec<(ServicePortKey, Option<Installed>)> = Vec::new();
        let mut released: Vec<ServicePortKey> = Vec::new();
        for key in changed {
            let old_owned = self.installed.get(key).cloned();
            let old = old_owned.as_ref();
            match want.get(key) {
                Some(sp) => {
                    let id = self.group_id(key);
                    let flows = service_flows(round, sp, id, &self.cfg.node_ips);
                    let g = (!sp.endpoints.is_empty()).then(|| group(sp, id));
                    let old_flows: &[Flow] = old.map_or(&[], |o| o.flows.as_slice());
                    let old_group = old.and_then(|o| o.group.as_ref());
                    // The group first (flows name it), endpoints' flows before the group
                    // that resubmits to them.
                    let old_eps: BTreeSet<Endpoint> = old
                        .filter(|o| o.group.is_some())
                        .map(|o| o.sp.endpoints.iter().copied().collect())
                        .unwrap_or_default();
                    let new_eps: BTreeSet<Endpoint> = sp.endpoints.iter().copied().collect();
                    let old_proto = old.map_or(sp.protocol, |o| o.sp.protocol);
                    for e in new_eps
                        .iter()
                        .filter(|e| !old_eps.contains(e) || old_proto != sp.protocol)
                    {
                        if refs.add((sp.protocol, *e), 1) == 1 {
                            ops.push(OfOp::AddFlow(endpoint_flow(round, sp.protocol, e)));
                        }
                    }
                    match (old_group, &g) {
                        (None, Some(g)) if !self.existing_groups.contains(&id) => {
                            let (first, rest) = chunks(g);
                            if self.uncertain_groups.contains(&id) {
                                ops.push(OfOp::DelGroup(id));
                            }
                            ops.push(OfOp::AddGroup(first));
                            ops.extend(rest.into_iter().map(|buckets| OfOp::InsertBuckets {
                                group_id: id,
                                buckets,
                            }));
                        }
                        (old, Some(g)) if old != Some(g) => {
                            self.existing_groups.remove(&id);
                            let (first, rest) = chunks(g);
                            ops.push(OfOp::ModGroup(first));
                            ops.extend(rest.into_iter().map(|buckets| OfOp::InsertBuckets {
                                group_id: id,
                                buckets,
                            }));
                        }
                        _ => {}
                    }
                    for f in &flows {
                        if !old_flows.contains(f) {
                            ops.push(OfOp::AddFlow(f.clone()));
                        }
                    }
                    for f in old_flows {
                        if !flows.iter().any(|n| {
                            n.table == f.table && n.priority == f.priority && n.matches == f.matches
                        }) {
                            tail.push(OfOp::DelFlowStrict {
                                table: f.table,
                                priority: f.priority,
                                matches: f.matches.clone(),
                            });
                        }
                    }
                    if g.is_none() && old_group.is_some() {
                        tail.push(OfOp::DelGroup(id));
                    }
                    for e in old_eps
                        .iter()
                        .filter(|e| !new_eps.contains(e) || old_proto != sp.protocol)
                    {
                        release_endpoint(round, &mut refs, old_proto, e, &mut tail);
                        if old_proto != 6 {
                            flush.push(ConntrackFilter {
                                zone: None,
                                protocol: old_proto,
                                ip: e.ip,
                                port: e.port,
                            });
                        }
                    }
                    new_installed.push((
                        key.clone(),
                        Some(Installed {
                            sp: sp.clone(),
                            group_id: id,
                            flows,
                            group: g,
                        }),
                    ));
                }
                None => {
                    let Some(old) = old else { continue };
                    for f in &old.flows {
                        tail.push(OfOp::DelFlowStrict {
                            table: f.table,
                            priority: f.priority,
                            matches: f.matches.clone(),
                        });
                    }
                    if old.group.is_some() {
                        tail.push(OfOp::DelGroup(old.group_id));
                        for e in &old.sp.endpoints {
                            release_endpoint(round, &mut refs, old.sp.protocol, e, &mut tail);
                            if old.sp.protocol != 6 {
                                flush.push(ConntrackFilter {
                                    zone: None,
                                    protocol: old.sp.protocol,
                                    ip: e.ip,
                                    port: e.port,
                                });
                            }
                        }
                    }
                    new_installed.push((key.clone(), None));
                    released.push(key.clone());
                }
            }
        }
        if !self.static_installed
            && let Some(prev) = self.previous_round.filter(|p| *p != round)
        {
            // The last run's flows that this one did not replace.
            tail.push(OfOp::DelFlowsByCookie {
                cookie: u64::from(prev) << cookie::ROUND_SHIFT,
                cookie_mask: cookie::ROUND_MASK,
            });
        }
        ops.extend(tail);
        let n_ops = ops.len();
        let delta = refs.delta;
        self.endpoint_refs = base;
        if !ops.is_empty() {
            bridge.bundle(ops)?;
        }
        // Committed: update the caches.
        self.static_installed = true;
        self.uncertain_groups.clear();
        self.previous_round = None;
        for (k, d) in delta {
            let n = self.endpoint_refs.get(&k).copied().unwrap_or(0) as i64 + d;
            if n <= 0 {
                self.endpoint_refs.remove(&k);
            } else {
                self.endpoint_refs.insert(k, n as usize);
            }
        }
        for (k, v) in new_installed {
            match v {
                Some(i) => {
                    self.installed.insert(k, i);
                }
                None => {
                    self.installed.remove(&k);
                }
            }
        }
        for k in released {
            if let Some(id) = self.group_ids.remove(&k) {
                self.free_ids.insert(id);
            }
        }
        let mut flushed = 0;
        flush.sort();
        flush.dedup();
        for f in flush {
            flushed += bridge.flush_conntrack(f);
        }
        Ok(SyncReport {
            ops: n_ops,
            flushed,
            service_ports: changed.len(),
        })
    }

    /// Brings the bridge to `want` entirely: every installed or wanted service port.
    pub fn full_sync<B: OpenFlowBridge>(
        &mut self,
        bridge: &mut B,
        want: &BTreeMap<ServicePortKey, ServicePort>,
    ) -> Result<SyncReport, BridgeError> {
        let changed: BTreeSet<ServicePortKey> =
            want.keys().chain(self.installed.keys()).cloned().collect();
        self.sync(bridge, want, &changed)
    }
}

/// Endpoint reference counts as the committed ones plus this sync's changes.
struct RefDelta<'a> {
    base: &'a BTreeMap<(u8, Endpoint), usize>,
    delta: BTreeMap<(u8, Endpoint), i64>,
}

impl RefDelta<'_> {
    /// Adds `d` to the count of `k`; returns the new count.
    fn add(&mut self, k: (u8, Endpoint), d: i64) -> i64 {
        let base = self.base.get(&k).copied().unwrap_or(0) as i64;
        let delta = self.delta.entry(k).or_default();
        *delta += d;
        base + *delta
    }
}

fn release_endpoint(
    round: u16,
    refs: &mut RefDelta<'_>,
    protocol: u8,
    e: &Endpoint,
    tail: &mut Vec<OfOp>,
) {
    if refs.add((protocol, *e), -1) == 0 {
        let f = endpoint_flow(round, protocol, e);
        tail.push(OfOp::DelFlowStrict {
            table: f.table,
            priority: f.priority,
            matches: f.matches,
        });
    }
}
