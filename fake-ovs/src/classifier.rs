//! Tuple-space search, as OVS's classifier does it: flows are grouped in subtables by their
//! mask signature (which fields, with which masks); a lookup computes one masked key per
//! subtable and finds the flows under it in an ordered map. Subtables are visited by their
//! highest priority, and the search stops once no subtable can beat the best match so far. The
//! cost is the number of distinct signatures (a handful), not the number of flows.

use std::collections::BTreeMap;

use smallvec::SmallVec;

use nsx_core::hash::WordMap;

use nsx_core::ovs::flow::Match;

use crate::packet::{Packet, slot};

/// A flow's identity inside a bridge.
pub type FlowId = u64;

#[derive(Debug, Clone, Default)]
struct Subtable {
    signature: Vec<(usize, u128)>,
    /// Masked key -> flows, best first: (priority descending, id ascending). A hash map:
    /// only looked up, never iterated, so its order cannot reach any output.
    /// Most keys hold one flow, kept inline; most keys are of four fields or fewer, kept
    /// inline too (a full sync inserts 100,000 flows: an allocation each adds up).
    rules: WordMap<RuleKey, SmallVec<[(u16, FlowId); 1]>>,
    priorities: BTreeMap<u16, usize>,
}

impl Subtable {
    fn max_priority(&self) -> Option<u16> {
        self.priorities.keys().next_back().copied()
    }
}

/// One OpenFlow table's classifier.
#[derive(Debug, Clone, Default)]
pub struct Classifier {
    /// A table has a handful of signatures: found by a scan, visited by index.
    subtables: Vec<Subtable>,
    /// Subtable indices by descending max priority (then signature).
    order: Vec<(u16, usize)>,
    len: usize,
    /// Room to make in subtables a bundle is about to create (see `reserve`).
    reserved: Vec<(Vec<(usize, u128)>, usize)>,
}

/// A masked key in a subtable.
type RuleKey = SmallVec<[u128; 4]>;

/// A match's mask signature, on the stack.
pub type Signature = SmallVec<[(usize, u128); 8]>;

// A match's fields come in field order, so signature and key line up without sorting.
// Built on the stack: inserting a flow allocates only for a new subtable or a new key.
// Pushed one by one: a generic `collect` into a SmallVec costs several times as much, and a
// full sync computes 100,000 of each.
pub fn signature(m: &Match) -> Signature {
    let mut sig = Signature::new();
    for (f, (_, mask)) in &m.fields {
        sig.push((slot(*f), *mask));
    }
    sig
}

/// Whether `m`'s mask signature is `sig`, without building it.
pub fn has_signature(m: &Match, sig: &[(usize, u128)]) -> bool {
    m.fields.len() == sig.len()
        && m.fields
            .iter()
            .zip(sig)
            .all(|((f, (_, mask)), (s, smask))| mask == smask && slot(*f) == *s)
}

fn key(m: &Match) -> RuleKey {
    let mut k = RuleKey::new();
    for (_, (v, _)) in &m.fields {
        k.push(*v);
    }
    k
}

impl Classifier {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of subtables (distinct mask signatures).
    pub fn subtables(&self) -> usize {
        self.subtables.len()
    }

    fn find(&self, sig: &[(usize, u128)]) -> Option<usize> {
        self.subtables
            .iter()
            .position(|st| st.signature.as_slice() == sig)
    }

    /// The subtable of `m`'s signature, found without building the signature.
    fn find_match(&self, m: &Match) -> Option<usize> {
        self.subtables
            .iter()
            .position(|st| has_signature(m, &st.signature))
    }

    fn reorder(&mut self) {
        let mut order: Vec<(u16, usize)> = self
            .subtables
            .iter()
            .enumerate()
            .filter_map(|(i, st)| st.max_priority().map(|p| (p, i)))
            .collect();
        let subtables = &self.subtables;
        order.sort_by(|a, b| {
            b.0.cmp(&a.0)
                .then_with(|| subtables[a.1].signature.cmp(&subtables[b.1].signature))
        });
        self.order = order;
    }

    /// Makes room for `additional` more flows with signature `sig`: a bundle of many adds
    /// then grows each hash table once instead of rehashing it as it doubles.
    pub fn reserve(&mut self, sig: &[(usize, u128)], additional: usize) {
        match self.find(sig) {
            Some(i) => self.subtables[i].rules.reserve(additional),
            None => self.reserved.push((sig.to_vec(), additional)),
        }
    }

    /// Forgets reservations for subtables that were not created.
    pub fn end_bundle(&mut self) {
        self.reserved.clear();
    }

    /// Inserts flow `id`. A flow with the same match and priority is taken out of the
    /// classifier and its id returned (OpenFlow keeps one; the caller drops the old entry):
    /// the lookup for that and the insertion share one probe.
    pub fn insert(&mut self, m: &Match, priority: u16, id: FlowId) -> Option<FlowId> {
        let i = match self.find_match(m) {
            Some(i) => i,
            None => {
                let sig = signature(m);
                let room = self
                    .reserved
                    .iter()
                    .position(|(s, _)| s.as_slice() == sig.as_slice())
                    .map_or(0, |i| self.reserved.swap_remove(i).1);
                let mut rules = WordMap::default();
                rules.reserve(room);
                self.subtables.push(Subtable {
                    signature: sig.to_vec(),
                    rules,
                    priorities: BTreeMap::new(),
                });
                self.subtables.len() - 1
            }
        };
        let st = &mut self.subtables[i];
        let before = st.max_priority();
        let list = st.rules.entry(key(m)).or_default();
        if let Some(i) = list.iter().position(|(p, _)| *p == priority) {
            let old = list[i].1;
            list[i].1 = id;
            list.sort_by(|(p1, i1), (p2, i2)| p2.cmp(p1).then(i1.cmp(i2)));
            return Some(old);
        }
        let pos = list
            .binary_search_by(|(p, i)| priority.cmp(p).then(i.cmp(&id)))
            .unwrap_or_else(|e| e);
        list.insert(pos, (priority, id));
        *st.priorities.entry(priority).or_default() += 1;
        self.len += 1;
        if before != st.max_priority() {
            self.reorder();
        }
        None
    }

    pub fn remove(&mut self, m: &Match, priority: u16, id: FlowId) {
        let Some(i) = self.find_match(m) else {
            return;
        };
        let st = &mut self.subtables[i];
        let before = st.max_priority();
        let k = key(m);
        let mut removed = false;
        if let Some(list) = st.rules.get_mut(k.as_slice()) {
            let n = list.len();
            list.retain(|(p, i)| !(*p == priority && *i == id));
            removed = list.len() < n;
            if list.is_empty() {
                st.rules.remove(k.as_slice());
            }
        }
        if !removed {
            return;
        }
        self.len -= 1;
        if let Some(c) = st.priorities.get_mut(&priority) {
            *c -= 1;
            if *c == 0 {
                st.priorities.remove(&priority);
            }
        }
        let after = st.max_priority();
        if st.rules.is_empty() {
            self.subtables.swap_remove(i);
            self.reorder();
        } else if before != after {
            self.reorder();
        }
    }

    /// The flow whose match is exactly `m` (same fields, masks and values) at `priority`.
    pub fn find_exact(&self, m: &Match, priority: u16) -> Option<FlowId> {
        let st = &self.subtables[self.find_match(m)?];
        st.rules
            .get(key(m).as_slice())?
            .iter()
            .find(|(p, _)| *p == priority)
            .map(|(_, id)| *id)
    }

    /// The best flow for `p`: highest priority, then the oldest.
    pub fn lookup(&self, p: &Packet) -> Option<FlowId> {
        let mut best: Option<(u16, FlowId)> = None;
        let mut key = Vec::with_capacity(8);
        for (max, sig) in &self.order {
            if let Some((bp, _)) = best
                && bp > *max
            {
                break;
            }
            let st = &self.subtables[*sig];
            key.clear();
            key.extend(st.signature.iter().map(|(s, m)| p.v[*s] & m));
            if let Some(&(prio, id)) = st.rules.get(key.as_slice()).and_then(|l| l.first()) {
                let better = match best {
                    None => true,
                    Some((bp, bid)) => prio > bp || (prio == bp && id < bid),
                };
                if better {
                    best = Some((prio, id));
                }
            }
        }
        best.map(|(_, id)| id)
    }
}
