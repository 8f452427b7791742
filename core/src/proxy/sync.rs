//! The incremental proxy: per service port a cache of what is installed; a sync compiles only
//! the changed service ports, diffs them against the cache and sends one atomic bundle; shared
//! endpoint flows are reference counted; stale UDP/SCTP connections of removed endpoints are
//! flushed (TCP ones drain, as kube-proxy lets them). Cookies carry a round: a restarted agent
//! installs everything under the next round and deletes the previous one in the same bundle;
//! after an OVS restart everything is replayed.

use std::collections::{BTreeMap, BTreeSet};

use crate::hash::WordMap;

use crate::ovs::bridge::{BridgeError, ConntrackFilter, OfOp, OpenFlowBridge};
use crate::ovs::flow::{Flow, Group};

use super::compile::{
    cluster_ip_flow, endpoint_flow, endpoint_of_flow, group, service_flows, static_flows,
};
use super::model::{Endpoint, ServicePort, ServicePortKey};
use crate::ovs::pipeline::{Category, Cookie};

/// Bytes an OpenFlow message may carry, and what a group message and a bucket take (a
/// bucket with two loads and a resubmit; one with a learn is bigger).
pub const MAX_MESSAGE_BYTES: usize = 65535;
const GROUP_HEADER_BYTES: usize = 40;
const BUCKET_BYTES: usize = 96;
const BUCKET_WITH_LEARN_BYTES: usize = 256;

/// A service port as last installed. Its flows and group are not kept: they are a pure
/// function of `sp`, the group id and the proxy's fixed round and node addresses, so they are
/// compiled again when the port changes (keeping them doubled a full sync's allocations).
#[derive(Debug, Clone)]
struct Installed {
    sp: ServicePort,
    group_id: u32,
    /// Its flows and group are on the bridge (false after an OVS restart wiped them).
    present: bool,
}

/// `endpoints` as a sorted set: borrowed when it already is one (as the model builds it).
fn endpoint_set(endpoints: &[Endpoint]) -> std::borrow::Cow<'_, [Endpoint]> {
    if endpoints.windows(2).all(|w| w[0] < w[1]) {
        std::borrow::Cow::Borrowed(endpoints)
    } else {
        let mut v = endpoints.to_vec();
        v.sort();
        v.dedup();
        std::borrow::Cow::Owned(v)
    }
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
    /// Hash maps: looked up per changed key (a tree compares three strings per level),
    /// iterated only where order cannot reach the output.
    installed: KeyMap<Installed>,
    /// (protocol, endpoint) -> how many service ports use its DNAT flow.
    endpoint_refs: RefMap,
    /// ClusterIP -> how many installed service ports use it (and so its reject flow).
    cluster_ip_refs: BTreeMap<u32, u32>,
    group_ids: KeyMap<u32>,
    free_ids: BTreeSet<u32>,
    next_id: u32,
    /// Groups found on the bridge at start (from a previous run): modified, not added.
    existing_groups: BTreeSet<u32>,
    /// After an OVS restart this proxy learned of late: groups it may have added to the wiped
    /// bridge in between. Each is deleted (a no-op when absent) before it is added again.
    uncertain_groups: BTreeSet<u32>,
}

fn chunks(mut g: Group) -> (Group, Vec<Vec<crate::ovs::flow::Bucket>>) {
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
        return (g, vec![]);
    }
    let rest: Vec<_> = g.buckets.split_off(fit);
    (g, rest.chunks(fit).map(<[_]>::to_vec).collect())
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
            installed: KeyMap::default(),
            endpoint_refs: RefMap::default(),
            cluster_ip_refs: BTreeMap::new(),
            group_ids: KeyMap::default(),
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
        for i in self.installed.values_mut() {
            i.present = false;
        }
        self.endpoint_refs.clear();
        self.cluster_ip_refs.clear();
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
        let keys: Vec<(&ServicePortKey, Option<&ServicePort>)> =
            changed.iter().map(|k| (k, want.get(k))).collect();
        self.sync_keys(bridge, &keys)
    }

    /// `sync` over `keys` (sorted, distinct) with what is wanted of each, borrowed so that a
    /// full sync copies no key and looks none up again.
    fn sync_keys<B: OpenFlowBridge>(
        &mut self,
        bridge: &mut B,
        keys: &[(&ServicePortKey, Option<&ServicePort>)],
    ) -> Result<SyncReport, BridgeError> {
        // Sized for the changed ports' endpoint flows, group and service flows: a full sync of
        // 10,000 ports makes 120,000 operations, and growing the vector copies them all again.
        let endpoints: usize = keys
            .iter()
            .filter_map(|(_, sp)| *sp)
            .map(|sp| sp.endpoints.len())
            .sum();
        let capacity = endpoints + keys.len() * (4 + 3 * self.cfg.node_ips.len());
        // Endpoint reference changes, kept as a delta and committed after success (a copy of
        // every count would make a sync cost the cluster's size).
        let base = std::mem::take(&mut self.endpoint_refs);
        // A copy of a few addresses, so that group ids can be allocated meanwhile.
        let node_ips = self.cfg.node_ips.clone();
        let mut b = Batch::new(self.round, &node_ips, capacity, &base, endpoints);
        if !self.static_installed {
            b.ops.extend(
                static_flows(self.round, &node_ips)
                    .into_iter()
                    .map(OfOp::AddFlow),
            );
        }
        for &(key, wanted) in keys {
            let id = wanted.is_some().then(|| self.group_id(key));
            let old = self.installed.get(key);
            b.count_cluster_ip(old, wanted);
            match (wanted, id) {
                (Some(sp), Some(id)) => b.port_wanted(
                    key,
                    old,
                    sp,
                    id,
                    &mut self.existing_groups,
                    &self.uncertain_groups,
                ),
                _ => {
                    if let Some(old) = old {
                        b.port_gone(key, old);
                    }
                }
            }
        }
        let ip_refs = b.cluster_ip_flows(&self.cluster_ip_refs);
        // The endpoints a previous run served (read before its flows are deleted below): those
        // no service port has any more went while no proxy watched, and their connections are
        // forgotten as if this run had removed them.
        let mut previous_endpoints = Vec::new();
        if !self.static_installed
            && let Some(prev) = self.previous_round.filter(|p| *p != self.round)
        {
            let (cookie, cookie_mask) = Cookie::of_round(prev);
            previous_endpoints = bridge
                .flows_with_cookie(
                    Cookie::new(prev, Category::Endpoint, 0).value(),
                    cookie_mask | Cookie::CATEGORY_MASK,
                )?
                .iter()
                .filter_map(endpoint_of_flow)
                .collect();
            // The last run's flows that this one did not replace.
            b.tail.push(OfOp::DelFlowsByCookie {
                cookie,
                cookie_mask,
            });
        }
        let Batch {
            mut ops,
            tail,
            mut flush,
            refs,
            installed: new_installed,
            released,
            ..
        } = b;
        // A flow one service port gives up and another takes in this sync (a port split off
        // for NodePort traffic, or joined back) is replaced by the taker's add: deleting it
        // afterwards would remove the new flow. (Only the deletes are hashed, not every add of
        // a full sync.)
        let mut tail = tail;
        let deleted: std::collections::HashSet<(u8, u16, &crate::ovs::flow::Match)> = tail
            .iter()
            .filter_map(|op| match op {
                OfOp::DelFlowStrict {
                    table,
                    priority,
                    matches,
                } => Some((*table, *priority, matches)),
                _ => None,
            })
            .collect();
        let retaken: Vec<(u8, u16, crate::ovs::flow::Match)> = if deleted.is_empty() {
            Vec::new()
        } else {
            ops.iter()
                .filter_map(|op| match op {
                    OfOp::AddFlow(f) if deleted.contains(&(f.table, f.priority, &f.matches)) => {
                        Some((f.table, f.priority, f.matches.clone()))
                    }
                    _ => None,
                })
                .collect()
        };
        drop(deleted);
        if !retaken.is_empty() {
            tail.retain(|op| match op {
                OfOp::DelFlowStrict {
                    table,
                    priority,
                    matches,
                } => !retaken
                    .iter()
                    .any(|(t, p, m)| t == table && p == priority && m == matches),
                _ => true,
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
        refs_commit(&mut self.endpoint_refs, delta);
        for (ip, n) in ip_refs {
            if n == 0 {
                self.cluster_ip_refs.remove(&ip);
            } else {
                self.cluster_ip_refs.insert(ip, n);
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
        for (protocol, e) in previous_endpoints {
            if protocol != 6 && !self.endpoint_refs.contains_key(&(protocol, e)) {
                flush.push(ConntrackFilter {
                    zone: None,
                    protocol,
                    ip: e.ip,
                    port: e.port,
                });
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
            service_ports: keys.len(),
        })
    }

    /// Brings the bridge to `want` entirely: every installed or wanted service port.
    pub fn full_sync<B: OpenFlowBridge>(
        &mut self,
        bridge: &mut B,
        want: &BTreeMap<ServicePortKey, ServicePort>,
    ) -> Result<SyncReport, BridgeError> {
        let gone: Vec<ServicePortKey> = self
            .installed
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        let mut keys: Vec<(&ServicePortKey, Option<&ServicePort>)> =
            want.iter().map(|(k, sp)| (k, Some(sp))).collect();
        if !gone.is_empty() {
            keys.extend(gone.iter().map(|k| (k, None)));
            keys.sort_by(|a, b| a.0.cmp(b.0));
        }
        self.sync_keys(bridge, &keys)
    }
}

/// One sync's operations: `ops` go first (what is added, each before what names it: endpoint
/// flows, then a group, then the flows that use it), `tail` after (what is deleted, after
/// whatever named it is gone), in one bundle; and what the caches take once it is in.
struct Batch<'r> {
    round: u16,
    /// The node's addresses (NodePort flows).
    node_ips: &'r [u32],
    ops: Vec<OfOp>,
    tail: Vec<OfOp>,
    /// Conntrack entries of removed UDP and SCTP endpoints (TCP connections drain).
    flush: Vec<ConntrackFilter>,
    refs: RefDelta<'r>,
    /// ClusterIP reference changes.
    ip_delta: BTreeMap<u32, i64>,
    installed: Vec<(ServicePortKey, Option<Installed>)>,
    /// Service ports gone, whose group ids are free again.
    released: Vec<ServicePortKey>,
}

impl<'r> Batch<'r> {
    fn new(
        round: u16,
        node_ips: &'r [u32],
        capacity: usize,
        base: &'r RefMap,
        endpoints: usize,
    ) -> Self {
        let mut refs = RefDelta {
            base,
            delta: DeltaMap::default(),
        };
        // About one endpoint reference per changed key's endpoint: no rehashing midway.
        refs.delta.reserve(endpoints);
        Batch {
            round,
            node_ips,
            ops: Vec::with_capacity(capacity),
            tail: Vec::new(),
            flush: Vec::new(),
            refs,
            ip_delta: BTreeMap::new(),
            installed: Vec::new(),
            released: Vec::new(),
        }
    }

    fn delete_flow(&mut self, f: &Flow) {
        self.tail.push(OfOp::DelFlowStrict {
            table: f.table,
            priority: f.priority,
            matches: f.matches.clone(),
        });
    }

    /// A UDP or SCTP service port's addresses that it no longer has (all of them when it goes):
    /// the connections addressed to them are forgotten, as kube-proxy clears a UDP service's
    /// conntrack entries, so that a client does not keep reaching the old backend through an
    /// address that no longer means it. TCP connections drain.
    fn forget_addresses(&mut self, old: &ServicePort, new: Option<&ServicePort>) {
        if old.protocol == 6 {
            return;
        }
        // What the port still is, if it stays with the same protocol.
        let kept = new.filter(|n| n.protocol == old.protocol);
        let forget = |ip: u32, port: u16| ConntrackFilter {
            zone: None,
            protocol: old.protocol,
            ip,
            port,
        };
        if kept.is_none_or(|n| (n.cluster_ip, n.port) != (old.cluster_ip, old.port)) {
            self.flush.push(forget(old.cluster_ip, old.port));
        }
        if let Some(np) = old.node_port
            && kept.is_none_or(|n| n.node_port != Some(np))
        {
            self.flush
                .extend(self.node_ips.iter().map(|ip| forget(*ip, np)));
        }
    }

    /// One service port fewer uses endpoint `e`: its flow goes with the last user, and its
    /// connections are flushed unless TCP.
    fn release(&mut self, protocol: u8, e: &Endpoint) {
        release_endpoint(self.round, &mut self.refs, protocol, e, &mut self.tail);
        if protocol != 6 {
            self.flush.push(ConntrackFilter {
                zone: None,
                protocol,
                ip: e.ip,
                port: e.port,
            });
        }
    }

    /// A service port's ClusterIP changes (or it comes or goes): the reject flow of each
    /// address is counted.
    fn count_cluster_ip(&mut self, old: Option<&Installed>, wanted: Option<&ServicePort>) {
        // A port split off for NodePort traffic takes no ClusterIP traffic.
        let takes = |sp: &ServicePort| sp.scope.takes_cluster_ip();
        let old_ip = old
            .filter(|o| o.present && takes(&o.sp))
            .map(|o| o.sp.cluster_ip);
        let new_ip = wanted.filter(|sp| takes(sp)).map(|sp| sp.cluster_ip);
        if old_ip != new_ip {
            if let Some(ip) = old_ip {
                *self.ip_delta.entry(ip).or_default() -= 1;
            }
            if let Some(ip) = new_ip {
                *self.ip_delta.entry(ip).or_default() += 1;
            }
        }
    }

    /// What the last sync installed for a service port, compiled again (see [`Installed`]).
    fn compiled_before(&self, old: Option<&Installed>) -> (Vec<Flow>, Option<Group>) {
        match old {
            Some(o) if o.present => (
                service_flows(self.round, &o.sp, o.group_id, self.node_ips),
                (!o.sp.endpoints.is_empty()).then(|| group(&o.sp, o.group_id)),
            ),
            _ => (Vec::new(), None),
        }
    }

    /// A service port that is wanted: what differs from what is installed, and no more.
    fn port_wanted(
        &mut self,
        key: &ServicePortKey,
        old: Option<&Installed>,
        sp: &ServicePort,
        id: u32,
        existing_groups: &mut BTreeSet<u32>,
        uncertain_groups: &BTreeSet<u32>,
    ) {
        let round = self.round;
        if let Some(o) = old {
            self.forget_addresses(&o.sp, Some(sp));
        }
        let (old_flows, old_group) = self.compiled_before(old);
        let flows = service_flows(round, sp, id, self.node_ips);
        let g = (!sp.endpoints.is_empty()).then(|| group(sp, id));
        // The group first (flows name it), endpoints' flows before the group that resubmits
        // to them.
        let old_eps = match old {
            Some(o) if old_group.is_some() => endpoint_set(&o.sp.endpoints),
            _ => std::borrow::Cow::Borrowed(&[][..]),
        };
        let new_eps = endpoint_set(&sp.endpoints);
        let old_proto = old.map_or(sp.protocol, |o| o.sp.protocol);
        for e in new_eps
            .iter()
            .filter(|e| old_eps.binary_search(e).is_err() || old_proto != sp.protocol)
        {
            if self.refs.add((sp.protocol, *e), 1) == 1 {
                self.ops
                    .push(OfOp::AddFlow(endpoint_flow(round, sp.protocol, e)));
            }
        }
        let group_changed = old_group != g;
        match (&old_group, g) {
            (None, Some(g)) if !existing_groups.contains(&id) => {
                let (first, rest) = chunks(g);
                if uncertain_groups.contains(&id) {
                    self.ops.push(OfOp::DelGroup(id));
                }
                self.ops.push(OfOp::AddGroup(first));
                self.ops
                    .extend(rest.into_iter().map(|buckets| OfOp::InsertBuckets {
                        group_id: id,
                        buckets,
                    }));
            }
            (_, Some(g)) if group_changed => {
                existing_groups.remove(&id);
                let (first, rest) = chunks(g);
                self.ops.push(OfOp::ModGroup(first));
                self.ops
                    .extend(rest.into_iter().map(|buckets| OfOp::InsertBuckets {
                        group_id: id,
                        buckets,
                    }));
            }
            _ => {}
        }
        for f in &old_flows {
            if !flows
                .iter()
                .any(|n| n.table == f.table && n.priority == f.priority && n.matches == f.matches)
            {
                self.delete_flow(f);
            }
        }
        for f in flows {
            if !old_flows.contains(&f) {
                self.ops.push(OfOp::AddFlow(f));
            }
        }
        if old_group.is_some() && sp.endpoints.is_empty() {
            self.tail.push(OfOp::DelGroup(id));
        }
        for e in old_eps
            .iter()
            .filter(|e| new_eps.binary_search(e).is_err() || old_proto != sp.protocol)
        {
            self.release(old_proto, e);
        }
        self.installed.push((
            key.clone(),
            Some(Installed {
                sp: sp.clone(),
                group_id: id,
                present: true,
            }),
        ));
    }

    /// A service port that is no longer wanted: its flows, group and endpoint references go.
    fn port_gone(&mut self, key: &ServicePortKey, old: &Installed) {
        self.forget_addresses(&old.sp, None);
        let (old_flows, old_group) = self.compiled_before(Some(old));
        for f in &old_flows {
            self.delete_flow(f);
        }
        if old_group.is_some() {
            self.tail.push(OfOp::DelGroup(old.group_id));
            for e in &old.sp.endpoints {
                self.release(old.sp.protocol, e);
            }
        }
        self.installed.push((key.clone(), None));
        self.released.push(key.clone());
    }

    /// The reject flow of each ClusterIP whose count crosses zero; the counts to commit.
    fn cluster_ip_flows(&mut self, committed: &BTreeMap<u32, u32>) -> Vec<(u32, u32)> {
        let mut ip_refs: Vec<(u32, u32)> = Vec::with_capacity(self.ip_delta.len());
        for (ip, d) in std::mem::take(&mut self.ip_delta) {
            let before = committed.get(&ip).copied().unwrap_or(0);
            let after = u32::try_from(i64::from(before) + d).unwrap_or(0);
            let f = cluster_ip_flow(self.round, ip);
            if before == 0 && after > 0 {
                self.ops.push(OfOp::AddFlow(f));
            } else if before > 0 && after == 0 {
                self.delete_flow(&f);
            }
            ip_refs.push((ip, after));
        }
        ip_refs
    }
}

/// Endpoint reference counts as the committed ones plus this sync's changes. The delta is
/// a hash map: only looked up here, and its commit (`refs_commit`) does not depend on order.
struct RefDelta<'a> {
    base: &'a RefMap,
    delta: DeltaMap,
}

type KeyMap<V> = WordMap<ServicePortKey, V>;

type DeltaMap = WordMap<(u8, Endpoint), i64>;

/// Endpoint reference counts. A hash map: only looked up and updated, never iterated, so its
/// order cannot reach any output.
type RefMap = WordMap<(u8, Endpoint), i64>;

/// Applies a sync's reference changes: the cost of the delta, whatever the map's size.
fn refs_commit(refs: &mut RefMap, mut delta: DeltaMap) {
    if refs.is_empty() {
        // The first sync: the delta is the counts (kept in one pass, not inserted anew).
        delta.retain(|_, n| *n > 0);
        *refs = delta;
        return;
    }
    refs.reserve(delta.len().saturating_sub(refs.capacity() - refs.len()));
    for (k, d) in delta {
        let n = refs.get(&k).copied().unwrap_or(0) + d;
        if n <= 0 {
            refs.remove(&k);
        } else {
            refs.insert(k, n);
        }
    }
}

impl RefDelta<'_> {
    /// Adds `d` to the count of `k`; returns the new count.
    fn add(&mut self, k: (u8, Endpoint), d: i64) -> i64 {
        let base = self.base.get(&k).copied().unwrap_or(0);
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
