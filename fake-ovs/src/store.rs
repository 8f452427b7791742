//! The bridge's flows by id. Ids are handed out in increasing order, so the store is a vector
//! sorted by id: adding a flow appends, finding one is a binary search, and removing one
//! leaves a hole that is filled again if a rolled-back bundle puts the flow back. Holes are
//! swept once they are as many as the flows (`compact`, between bundles), so a sweep's cost
//! is paid for by the removals that made it. A tree would walk from its root for every one
//! of a full sync's 100,000 appends.

use crate::bridge::FlowEntry;
use crate::classifier::FlowId;

#[derive(Debug, Clone, Default)]
pub struct FlowStore {
    slots: Vec<(FlowId, Option<FlowEntry>)>,
    len: usize,
}

impl FlowStore {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.slots.clear();
        self.len = 0;
    }

    fn position(&self, id: FlowId) -> Result<usize, usize> {
        // Most lookups are of recent flows: check the end first.
        match self.slots.last() {
            Some((last, _)) if *last == id => Ok(self.slots.len() - 1),
            Some((last, _)) if *last < id => Err(self.slots.len()),
            None => Err(0),
            _ => self.slots.binary_search_by_key(&id, |(i, _)| *i),
        }
    }

    /// Stores `e` under `id`; returns the entry it replaced.
    pub fn insert(&mut self, id: FlowId, e: FlowEntry) -> Option<FlowEntry> {
        match self.position(id) {
            Ok(i) => {
                let old = self.slots[i].1.replace(e);
                if old.is_none() {
                    self.len += 1;
                }
                old
            }
            Err(i) => {
                self.slots.insert(i, (id, Some(e)));
                self.len += 1;
                None
            }
        }
    }

    pub fn remove(&mut self, id: &FlowId) -> Option<FlowEntry> {
        let i = self.position(*id).ok()?;
        let e = self.slots[i].1.take();
        if e.is_some() {
            self.len -= 1;
        }
        e
    }

    pub fn get(&self, id: &FlowId) -> Option<&FlowEntry> {
        let i = self.position(*id).ok()?;
        self.slots[i].1.as_ref()
    }

    pub fn get_mut(&mut self, id: &FlowId) -> Option<&mut FlowEntry> {
        let i = self.position(*id).ok()?;
        self.slots[i].1.as_mut()
    }

    /// The flows in id order (oldest first).
    pub fn iter(&self) -> impl Iterator<Item = (&FlowId, &FlowEntry)> {
        self.slots
            .iter()
            .filter_map(|(id, e)| e.as_ref().map(|e| (id, e)))
    }

    /// Sweeps the holes once they outnumber the flows. Not during a bundle: a rollback
    /// refills the holes its flows left.
    pub fn compact(&mut self) {
        let holes = self.slots.len() - self.len;
        if holes > self.len.max(64) {
            self.slots.retain(|(_, e)| e.is_some());
        }
    }

    /// Makes room for `additional` appended flows.
    pub fn reserve(&mut self, additional: usize) {
        self.slots.reserve(additional);
    }
}

impl std::ops::Index<&FlowId> for FlowStore {
    type Output = FlowEntry;

    fn index(&self, id: &FlowId) -> &FlowEntry {
        self.get(id).expect("a flow id the classifier holds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsx_core::ovs::Flow;

    fn entry(priority: u16) -> FlowEntry {
        FlowEntry {
            flow: Flow {
                priority,
                ..Flow::default()
            },
            n_packets: 0,
            n_bytes: 0,
            created_ms: 0,
        }
    }

    #[test]
    fn holes_are_refilled_in_place_and_swept_once_they_outnumber_the_flows() {
        let mut s = FlowStore::default();
        for id in 1..=200u64 {
            assert!(s.insert(id, entry(id as u16)).is_none());
        }
        // A rollback puts a removed flow back where it was: order is kept.
        let e = s.remove(&50).expect("present");
        assert!(s.get(&50).is_none());
        assert!(s.remove(&50).is_none(), "removed once");
        s.insert(50, e);
        let ids: Vec<u64> = s.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, (1..=200).collect::<Vec<_>>());
        // Replacing returns the old entry and keeps the count.
        let old = s.insert(7, entry(9999)).expect("replaced");
        assert_eq!(old.flow.priority, 7);
        assert_eq!(s.len(), 200);
        for id in 1..=150u64 {
            s.remove(&id);
        }
        assert_eq!(s.len(), 50);
        s.compact();
        assert_eq!(s.slots.len(), 50, "150 holes for 50 flows: swept");
        assert_eq!(s[&151].flow.priority, 151);
        // An id below the last one that was swept is inserted in order.
        s.insert(3, entry(3));
        let ids: Vec<u64> = s.iter().map(|(id, _)| *id).take(2).collect();
        assert_eq!(ids, vec![3, 151]);
        assert!(s.get(&1000).is_none());
    }
}
