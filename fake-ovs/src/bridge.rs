//! A bridge: ports, OpenFlow 1.3 tables, groups, conntrack, counters; flow and group mods one
//! by one or in atomic bundles; a restart that wipes flows and groups and keeps ports.

use std::collections::{BTreeMap, BTreeSet};

use nsx_core::ovs::flow::{Action, Flow, FlowStats, Group, GroupType, Match};

use crate::classifier::{Classifier, FlowId};
use crate::conntrack::Conntrack;

/// Errors as OVS reports them (the OpenFlow error names).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OvsError {
    #[error("OFPBAC_BAD_OUT_GROUP: group {0} does not exist")]
    BadOutGroup(u32),
    #[error("OFPBIC_BAD_TABLE_ID: goto_table:{to} from table {from} must go forward")]
    BadTableId { from: u8, to: u8 },
    #[error("OFPGMFC_GROUP_EXISTS: group {0} exists")]
    GroupExists(u32),
    #[error("OFPGMFC_UNKNOWN_GROUP: group {0} does not exist")]
    UnknownGroup(u32),
    #[error("OFPGMFC_LOOP: group {0} would chain to itself")]
    GroupLoop(u32),
    #[error("OFPGMFC_BAD_BUCKET: {0}")]
    BadBucket(String),
    #[error("no port named {0}")]
    NoSuchPort(String),
    #[error("port {0} exists")]
    PortExists(String),
    #[error("bundle failed at message {index}: {error}")]
    Bundle { index: usize, error: Box<OvsError> },
}

/// A port: its OpenFlow number, VLAN tag (access port) and external ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub name: String,
    pub ofport: u32,
    pub tag: Option<u16>,
    pub external_ids: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct FlowEntry {
    pub flow: Flow,
    pub n_packets: u64,
    pub n_bytes: u64,
    pub created_ms: u64,
}

/// A flow-table change, as `ovs-ofctl add-flow`/`mod-flows`/`del-flows` (and their
/// `--strict` forms) and group mods send it. Used alone or in a bundle.
#[derive(Debug, Clone, PartialEq)]
pub enum FlowMod {
    Add(Flow),
    /// Replaces the actions of every flow the match covers (or, `strict`, the one flow with
    /// exactly this match and priority) whose cookie matches under the mask.
    Modify {
        table: u8,
        matches: Match,
        priority: Option<u16>,
        cookie: u64,
        cookie_mask: u64,
        actions: Vec<Action>,
    },
    /// Deletes like `del-flows`: `table` `None` is every table.
    Delete {
        table: Option<u8>,
        matches: Match,
        priority: Option<u16>,
        cookie: u64,
        cookie_mask: u64,
    },
    AddGroup(Group),
    ModGroup(Group),
    /// Appends buckets (OpenFlow 1.5 `insert-buckets`).
    InsertBuckets {
        group_id: u32,
        buckets: Vec<nsx_core::ovs::Bucket>,
    },
    DelGroup(u32),
}

/// Boxed payloads keep the log at 16 bytes an entry: a bundle of 100,000 adds logs
/// 100,000 `Inserted`.
enum Undo {
    Inserted(FlowId),
    Removed(FlowId, Box<FlowEntry>),
    Replaced(FlowId, Box<FlowEntry>),
    GroupAdded(u32),
    GroupRemoved(Box<Group>),
    GroupReplaced(Box<Group>),
}

/// An in-memory Open vSwitch bridge.
#[derive(Debug, Clone, Default)]
pub struct Bridge {
    pub name: String,
    ports: BTreeMap<u32, Port>,
    by_name: BTreeMap<String, u32>,
    /// The number each port name had, for giving it back.
    last_ofport: BTreeMap<String, u32>,
    /// Every number ever handed out.
    used_ofports: BTreeSet<u32>,
    next_ofport: u32,
    /// The highest OpenFlow port number (OVS: 65279, OFPP_MAX). Tests lower it to reach
    /// number reuse quickly.
    pub max_ofport: u32,
    pub(crate) tables: BTreeMap<u8, Classifier>,
    pub(crate) flows: crate::store::FlowStore,
    /// group id -> flows that name it (in actions or buckets of groups they reach directly).
    group_users: BTreeMap<u32, BTreeSet<FlowId>>,
    /// cookie -> its flows: `del-flows`/`mod-flows` with an exact cookie (`cookie=C/-1`) find
    /// theirs without looking at every flow, as OVS's cookie index does; the agent removes a
    /// pod's flows this way, and that must not cost the node's pod count.
    by_cookie: nsx_core::hash::WordMap<u64, smallvec::SmallVec<[FlowId; 4]>>,
    pub(crate) groups: BTreeMap<u32, Group>,
    next_flow: FlowId,
    pub conntrack: Conntrack,
    /// Simulated time, set by the owner (the harness's clock).
    pub now_ms: u64,
    /// How many times ovs-vswitchd restarted: what a controller watching it (OVSDB's
    /// `Open_vSwitch` row in the real thing) sees change.
    pub restarts: u64,
    /// Bumped by every change to ports, flows or groups: a hint for whoever caches a reading
    /// of the bridge (it may move without a net change).
    pub generation: u64,
}

/// Group ids an action list names: a few at most, kept on the stack.
type Named = smallvec::SmallVec<[u32; 4]>;

fn groups_named(actions: &[Action], out: &mut Named) {
    for a in actions {
        match a {
            Action::Group(g) => out.push(*g),
            Action::Ct { exec, .. } => groups_named(exec, out),
            _ => {}
        }
    }
}

impl Bridge {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            next_ofport: 1,
            max_ofport: 65279,
            next_flow: 1,
            ..Self::default()
        }
    }

    // ----- ports -------------------------------------------------------------------------

    /// Adds a port. Its number is the one the name had before if free, else the next number
    /// after the last one handed out, skipping numbers in use (OVS avoids reusing a freed
    /// number at once, so old flows do not catch a new port's traffic).
    pub fn add_port(
        &mut self,
        name: &str,
        tag: Option<u16>,
        external_ids: BTreeMap<String, String>,
    ) -> Result<u32, OvsError> {
        if self.by_name.contains_key(name) {
            return Err(OvsError::PortExists(name.to_string()));
        }
        let max = self.max_ofport.max(1);
        let ofport = match self.last_ofport.get(name) {
            Some(n) if !self.ports.contains_key(n) => *n,
            _ => {
                // A number never used yet, after the last one handed out; when every number
                // has been used, the lowest free one.
                let fresh = (self.next_ofport..=max)
                    .chain(1..self.next_ofport)
                    .find(|n| !self.ports.contains_key(n) && !self.used_ofports.contains(n));
                let n = match fresh {
                    Some(n) => n,
                    None => (1..=max)
                        .find(|x| !self.ports.contains_key(x))
                        .ok_or_else(|| OvsError::PortExists("no free OpenFlow port".into()))?,
                };
                self.next_ofport = if n >= max { 1 } else { n + 1 };
                n
            }
        };
        self.generation += 1;
        self.used_ofports.insert(ofport);
        self.ports.insert(
            ofport,
            Port {
                name: name.to_string(),
                ofport,
                tag,
                external_ids,
            },
        );
        self.by_name.insert(name.to_string(), ofport);
        self.last_ofport.insert(name.to_string(), ofport);
        Ok(ofport)
    }

    pub fn del_port(&mut self, name: &str) -> Result<Port, OvsError> {
        let n = self
            .by_name
            .remove(name)
            .ok_or_else(|| OvsError::NoSuchPort(name.to_string()))?;
        self.generation += 1;
        Ok(self.ports.remove(&n).expect("indexed port"))
    }

    pub fn port(&self, name: &str) -> Option<&Port> {
        self.by_name.get(name).and_then(|n| self.ports.get(n))
    }

    /// The first port (by port number) whose external id `key` is `value`, as `ovs-vsctl find
    /// Interface external_ids:key=value` answers.
    pub fn port_with(&self, key: &str, value: &str) -> Option<&Port> {
        self.ports
            .values()
            .find(|p| p.external_ids.get(key).is_some_and(|v| v == value))
    }

    pub fn ports(&self) -> impl Iterator<Item = &Port> {
        self.ports.values()
    }

    /// `ovs-vswitchd` restarted: flows and groups are gone (the controller must reinstall
    /// them), ports and conntrack stay.
    pub fn restart(&mut self) {
        self.tables.clear();
        self.flows.clear();
        self.group_users.clear();
        self.by_cookie.clear();
        self.groups.clear();
        self.restarts += 1;
        self.generation += 1;
    }

    // ----- flows and groups --------------------------------------------------------------

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }

    pub fn group(&self, id: u32) -> Option<&Group> {
        self.groups.get(&id)
    }

    /// Flows in `dump-flows` order: by table, then priority (highest first), then age.
    pub fn flows(&self) -> Vec<(&Flow, FlowStats)> {
        let mut v: Vec<(&FlowId, &FlowEntry)> = self.flows.iter().collect();
        v.sort_by(|a, b| {
            (a.1.flow.table, std::cmp::Reverse(a.1.flow.priority), a.0).cmp(&(
                b.1.flow.table,
                std::cmp::Reverse(b.1.flow.priority),
                b.0,
            ))
        });
        v.into_iter()
            .map(|(_, e)| {
                (
                    &e.flow,
                    FlowStats {
                        duration_ms: self.now_ms.saturating_sub(e.created_ms),
                        n_packets: e.n_packets,
                        n_bytes: e.n_bytes,
                    },
                )
            })
            .collect()
    }

    /// `ovs-ofctl -O OpenFlow13 dump-flows` text.
    pub fn dump_flows(&self, stats: bool) -> String {
        let mut s = String::new();
        for (f, st) in self.flows() {
            s.push(' ');
            s.push_str(&if stats {
                f.to_dump(&st)
            } else {
                f.to_dump_no_stats()
            });
            s.push('\n');
        }
        s
    }

    /// `ovs-ofctl -O OpenFlow15 dump-groups` text.
    pub fn dump_groups(&self) -> String {
        self.groups.values().map(|g| format!(" {g}\n")).collect()
    }

    fn check_actions(&self, table: u8, actions: &[Action]) -> Result<(), OvsError> {
        let mut named = Named::new();
        groups_named(actions, &mut named);
        if let Some(g) = named.iter().find(|g| !self.groups.contains_key(g)) {
            return Err(OvsError::BadOutGroup(*g));
        }
        for a in actions {
            if let Action::GotoTable(t) = a
                && *t <= table
            {
                return Err(OvsError::BadTableId {
                    from: table,
                    to: *t,
                });
            }
        }
        Ok(())
    }

    fn unindex_groups(&mut self, id: FlowId, actions: &[Action]) {
        let mut named = Named::new();
        groups_named(actions, &mut named);
        for g in named {
            if let Some(u) = self.group_users.get_mut(&g) {
                u.remove(&id);
                if u.is_empty() {
                    self.group_users.remove(&g);
                }
            }
        }
    }

    /// The flow with exactly this table, priority and match (OpenFlow allows one).
    fn find_exact(&self, table: u8, priority: u16, m: &Match) -> Option<FlowId> {
        self.tables.get(&table)?.find_exact(m, priority)
    }

    /// Indexes and stores flow `id`; returns the entry it replaced (same table, match and
    /// priority), which is no longer indexed.
    fn insert_entry(&mut self, id: FlowId, e: FlowEntry) -> Option<(FlowId, FlowEntry)> {
        let f = &e.flow;
        let replaced = self
            .tables
            .entry(f.table)
            .or_default()
            .insert(&f.matches, f.priority, id);
        let mut named = Named::new();
        groups_named(&f.actions, &mut named);
        self.by_cookie.entry(f.cookie).or_default().push(id);
        self.flows.insert(id, e);
        for g in named {
            self.group_users.entry(g).or_default().insert(id);
        }
        let old = replaced?;
        let e = self.flows.remove(&old)?;
        self.unindex_cookie(old, e.flow.cookie);
        self.unindex_groups(old, &e.flow.actions);
        Some((old, e))
    }

    fn remove_entry(&mut self, id: FlowId) -> Option<FlowEntry> {
        let e = self.flows.remove(&id)?;
        let f = &e.flow;
        if let Some(t) = self.tables.get_mut(&f.table) {
            t.remove(&f.matches, f.priority, id);
        }
        self.unindex_cookie(id, f.cookie);
        self.unindex_groups(id, &e.flow.actions);
        Some(e)
    }

    fn unindex_cookie(&mut self, id: FlowId, cookie: u64) {
        if let Some(ids) = self.by_cookie.get_mut(&cookie) {
            ids.retain(|x| *x != id);
            if ids.is_empty() {
                self.by_cookie.remove(&cookie);
            }
        }
    }

    /// Whether `flow`'s match is covered by `m` (every constraint of `m` holds for every
    /// packet `flow` matches): the non-strict selection of `mod-flows` and `del-flows`.
    fn covered(flow: &Match, m: &Match) -> bool {
        m.fields.iter().all(|(f, (v, mask))| {
            flow.fields
                .get(f)
                .is_some_and(|(fv, fm)| fm & mask == *mask && fv & mask == *v)
        })
    }

    fn select(
        &self,
        table: Option<u8>,
        m: &Match,
        priority: Option<u16>,
        cookie: u64,
        cookie_mask: u64,
    ) -> Vec<FlowId> {
        match priority {
            Some(p) => {
                let tables: Vec<u8> = match table {
                    Some(t) => vec![t],
                    None => self.tables.keys().copied().collect(),
                };
                tables
                    .into_iter()
                    .filter_map(|t| self.find_exact(t, p, m))
                    .filter(|id| self.flows[id].flow.cookie & cookie_mask == cookie & cookie_mask)
                    .collect()
            }
            // An exact cookie: its flows only, in id order as the scan below gives them.
            None if cookie_mask == u64::MAX => {
                let mut ids: Vec<FlowId> = self
                    .by_cookie
                    .get(&cookie)
                    .into_iter()
                    .flatten()
                    .copied()
                    .filter(|id| {
                        let e = &self.flows[id];
                        table.is_none_or(|t| e.flow.table == t) && Self::covered(&e.flow.matches, m)
                    })
                    .collect();
                ids.sort_unstable();
                ids
            }
            None => self
                .flows
                .iter()
                .filter(|(_, e)| {
                    table.is_none_or(|t| e.flow.table == t)
                        && e.flow.cookie & cookie_mask == cookie & cookie_mask
                        && Self::covered(&e.flow.matches, m)
                })
                .map(|(id, _)| *id)
                .collect(),
        }
    }

    fn apply(&mut self, m: FlowMod, undo: &mut Vec<Undo>) -> Result<(), OvsError> {
        self.generation += 1;
        match m {
            FlowMod::Add(flow) => {
                self.check_actions(flow.table, &flow.actions)?;
                // An identical match and priority is replaced; OpenFlow 1.2+ keeps its
                // counters (no reset_counts flag here).
                let id = self.next_flow;
                self.next_flow += 1;
                let entry = FlowEntry {
                    flow,
                    n_packets: 0,
                    n_bytes: 0,
                    created_ms: self.now_ms,
                };
                if let Some((old, e)) = self.insert_entry(id, entry) {
                    if let Some(new) = self.flows.get_mut(&id) {
                        new.n_packets = e.n_packets;
                        new.n_bytes = e.n_bytes;
                    }
                    undo.push(Undo::Replaced(old, Box::new(e)));
                }
                undo.push(Undo::Inserted(id));
            }
            FlowMod::Modify {
                table,
                matches,
                priority,
                cookie,
                cookie_mask,
                actions,
            } => {
                self.check_actions(table, &actions)?;
                for id in self.select(Some(table), &matches, priority, cookie, cookie_mask) {
                    let mut e = self.remove_entry(id).expect("selected flow");
                    undo.push(Undo::Replaced(id, Box::new(e.clone())));
                    e.flow.actions = actions.clone();
                    let _ = self.insert_entry(id, e);
                    undo.push(Undo::Inserted(id));
                }
            }
            FlowMod::Delete {
                table,
                matches,
                priority,
                cookie,
                cookie_mask,
            } => {
                for id in self.select(table, &matches, priority, cookie, cookie_mask) {
                    let e = self.remove_entry(id).expect("selected flow");
                    undo.push(Undo::Removed(id, Box::new(e)));
                }
            }
            FlowMod::AddGroup(g) => {
                if self.groups.contains_key(&g.group_id) {
                    return Err(OvsError::GroupExists(g.group_id));
                }
                self.check_group(&g)?;
                undo.push(Undo::GroupAdded(g.group_id));
                self.groups.insert(g.group_id, g);
            }
            FlowMod::ModGroup(g) => {
                let old = self
                    .groups
                    .get(&g.group_id)
                    .cloned()
                    .ok_or(OvsError::UnknownGroup(g.group_id))?;
                self.check_group(&g)?;
                undo.push(Undo::GroupReplaced(Box::new(old)));
                self.groups.insert(g.group_id, g);
            }
            FlowMod::InsertBuckets { group_id, buckets } => {
                let mut g = self
                    .groups
                    .get(&group_id)
                    .cloned()
                    .ok_or(OvsError::UnknownGroup(group_id))?;
                let old = g.clone();
                g.buckets.extend(buckets);
                self.check_group(&g)?;
                undo.push(Undo::GroupReplaced(Box::new(old)));
                self.groups.insert(group_id, g);
            }
            FlowMod::DelGroup(id) => {
                // Deleting a group deletes the flows that output to it (OpenFlow 1.3 5.6.1).
                if let Some(g) = self.groups.remove(&id) {
                    undo.push(Undo::GroupRemoved(Box::new(g)));
                    let users: Vec<FlowId> = self
                        .group_users
                        .get(&id)
                        .map(|u| u.iter().copied().collect())
                        .unwrap_or_default();
                    for f in users {
                        if let Some(e) = self.remove_entry(f) {
                            undo.push(Undo::Removed(f, Box::new(e)));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn check_group(&self, g: &Group) -> Result<(), OvsError> {
        if g.group_type == GroupType::Indirect && g.buckets.len() != 1 {
            return Err(OvsError::BadBucket(
                "an indirect group has exactly one bucket".into(),
            ));
        }
        // Bucket ids sorted to find a repeat: a group has a few buckets and a full sync adds
        // thousands of groups, so no tree per group.
        let mut ids: smallvec::SmallVec<[u32; 16]> =
            g.buckets.iter().map(|b| b.bucket_id).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(OvsError::BadBucket(format!("bucket_id {} twice", w[0])));
        }
        for b in &g.buckets {
            let mut named = Named::new();
            groups_named(&b.actions, &mut named);
            if named.contains(&g.group_id) {
                return Err(OvsError::GroupLoop(g.group_id));
            }
            if let Some(x) = named.iter().find(|x| !self.groups.contains_key(x)) {
                return Err(OvsError::BadOutGroup(*x));
            }
        }
        Ok(())
    }

    fn rollback(&mut self, undo: Vec<Undo>) {
        for u in undo.into_iter().rev() {
            match u {
                Undo::Inserted(id) => {
                    self.remove_entry(id);
                }
                Undo::Removed(id, e) | Undo::Replaced(id, e) => {
                    let _ = self.insert_entry(id, *e);
                }
                Undo::GroupAdded(g) => {
                    self.groups.remove(&g);
                }
                Undo::GroupRemoved(g) | Undo::GroupReplaced(g) => {
                    self.groups.insert(g.group_id, *g);
                }
            }
        }
    }

    /// One flow or group mod.
    pub fn modify(&mut self, m: FlowMod) -> Result<(), OvsError> {
        let mut undo = Vec::new();
        let r = self.apply(m, &mut undo);
        if r.is_err() {
            self.rollback(undo);
        }
        self.flows.compact();
        r
    }

    /// An atomic bundle (OpenFlow 1.4 bundles, `ovs-ofctl --bundle`): all of it or nothing.
    /// Costs what its messages cost, whatever the size of the bridge.
    pub fn bundle(&mut self, mods: Vec<FlowMod>) -> Result<(), OvsError> {
        self.reserve_for(&mods);
        let mut undo = Vec::with_capacity(mods.len());
        let mut result = Ok(());
        for (index, m) in mods.into_iter().enumerate() {
            if let Err(error) = self.apply(m, &mut undo) {
                self.rollback(undo);
                result = Err(OvsError::Bundle {
                    index,
                    error: Box::new(error),
                });
                break;
            }
        }
        for t in self.tables.values_mut() {
            t.end_bundle();
        }
        self.flows.compact();
        result
    }

    /// Sizes the classifiers' tables for a large bundle's adds up front.
    fn reserve_for(&mut self, mods: &[FlowMod]) {
        const WORTH_IT: usize = 1024;
        if mods.len() < WORTH_IT {
            return;
        }
        // A bundle's adds come in a handful of shapes: a scan, comparing each match's shape
        // without building its signature.
        let mut adds: Vec<(u8, crate::classifier::Signature, usize)> = Vec::new();
        for m in mods {
            let FlowMod::Add(f) = m else { continue };
            match adds.iter_mut().find(|(table, sig, _)| {
                *table == f.table && crate::classifier::has_signature(&f.matches, sig)
            }) {
                Some((_, _, n)) => *n += 1,
                None => adds.push((f.table, crate::classifier::signature(&f.matches), 1)),
            }
        }
        self.flows.reserve(adds.iter().map(|(_, _, n)| n).sum());
        for (table, sig, n) in adds {
            if n >= WORTH_IT {
                self.tables.entry(table).or_default().reserve(&sig, n);
            }
        }
    }

    pub fn add_flow(&mut self, flow: Flow) -> Result<(), OvsError> {
        self.modify(FlowMod::Add(flow))
    }

    pub fn add_group(&mut self, g: Group) -> Result<(), OvsError> {
        self.modify(FlowMod::AddGroup(g))
    }

    /// Converts a core `OfOp` into this bridge's flow mod.
    pub fn flow_mod(op: nsx_core::ovs::bridge::OfOp) -> FlowMod {
        use nsx_core::ovs::bridge::OfOp;
        match op {
            OfOp::AddFlow(f) => FlowMod::Add(f),
            OfOp::DelFlowStrict {
                table,
                priority,
                matches,
            } => FlowMod::Delete {
                table: Some(table),
                matches,
                priority: Some(priority),
                cookie: 0,
                cookie_mask: 0,
            },
            OfOp::DelFlowsByCookie {
                cookie,
                cookie_mask,
            } => FlowMod::Delete {
                table: None,
                matches: Match::default(),
                priority: None,
                cookie,
                cookie_mask,
            },
            OfOp::AddGroup(g) => FlowMod::AddGroup(g),
            OfOp::ModGroup(g) => FlowMod::ModGroup(g),
            OfOp::InsertBuckets { group_id, buckets } => {
                FlowMod::InsertBuckets { group_id, buckets }
            }
            OfOp::DelGroup(id) => FlowMod::DelGroup(id),
        }
    }

    /// Counts a packet against a flow.
    pub(crate) fn count(&mut self, id: FlowId, bytes: u64) {
        if let Some(e) = self.flows.get_mut(&id) {
            e.n_packets += 1;
            e.n_bytes += bytes;
        }
    }
}

impl nsx_core::ovs::bridge::OpenFlowBridge for Bridge {
    fn bundle(
        &mut self,
        ops: Vec<nsx_core::ovs::bridge::OfOp>,
    ) -> Result<(), nsx_core::ovs::bridge::BridgeError> {
        let mods: Vec<FlowMod> = ops.into_iter().map(Bridge::flow_mod).collect();
        Bridge::bundle(self, mods).map_err(|e| match e {
            OvsError::Bundle { index, error } => nsx_core::ovs::bridge::BridgeError {
                index,
                message: error.to_string(),
            },
            other => nsx_core::ovs::bridge::BridgeError {
                index: 0,
                message: other.to_string(),
            },
        })
    }

    fn flush_conntrack(&mut self, f: nsx_core::ovs::bridge::ConntrackFilter) -> usize {
        self.conntrack
            .flush_endpoint(f.zone, f.protocol, f.ip, f.port)
    }

    fn flows_with_cookie(
        &mut self,
        cookie: u64,
        mask: u64,
    ) -> Result<Vec<Flow>, nsx_core::ovs::bridge::BridgeError> {
        Ok(self
            .flows()
            .into_iter()
            .filter(|(f, _)| f.cookie & mask == cookie & mask)
            .map(|(f, _)| f.clone())
            .collect())
    }
}

impl nsx_core::agent::PodSwitch for Bridge {
    fn add_port(
        &mut self,
        name: &str,
        external_ids: BTreeMap<String, String>,
    ) -> Result<u32, nsx_core::ovs::bridge::BridgeError> {
        Bridge::add_port(self, name, None, external_ids).map_err(|e| {
            nsx_core::ovs::bridge::BridgeError {
                index: 0,
                message: e.to_string(),
            }
        })
    }

    fn del_port(&mut self, name: &str) -> Result<(), nsx_core::ovs::bridge::BridgeError> {
        Bridge::del_port(self, name)
            .map(|_| ())
            .map_err(|e| nsx_core::ovs::bridge::BridgeError {
                index: 0,
                message: e.to_string(),
            })
    }

    fn has_port(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    fn list_ports(&self) -> Vec<nsx_core::agent::PortInfo> {
        self.ports()
            .map(|p| nsx_core::agent::PortInfo {
                name: p.name.clone(),
                ofport: p.ofport,
                external_ids: p.external_ids.clone(),
            })
            .collect()
    }
}
