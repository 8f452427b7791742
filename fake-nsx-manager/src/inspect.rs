//! What a harness reads from a running fake, and how it acts as the NSX admin: the interface a
//! test or a simulation uses instead of the store's internals.
//!
//! [`FakeNsxManager::inspect`] gives a read-only [`Inspection`] of one consistent moment (the
//! manager's lock is held while the closure runs; it must not call back into the manager):
//! every object as NSX would answer `GET` for it, typed through the API model when asked, the
//! store's own invariants, and the dataplane model's verdict on a packet.
//! [`FakeNsxManager::as_admin`] makes a request as the `admin` user through the same dispatch as
//! HTTP (validation, revisions, error bodies), without limits or injected faults: the way an
//! admin (or an admin's script) changes NSX behind NCP's back.

use std::collections::BTreeMap;

use nsx_core::nsx::model::{AdvertisementConfig, PacketAddressClassifier};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::dispatch::ApiRequest;
use crate::kind::Kind;
use crate::server::FakeNsxManager;
use crate::store::{Connections, Entry, Packet, Store, Trace};

/// A read-only view of what the manager holds.
pub struct Inspection<'a> {
    store: &'a Store,
}

/// One object the manager holds.
#[derive(Debug, Clone, Copy)]
pub struct Held<'a> {
    pub id: &'a str,
    pub kind: Kind,
    /// The document `GET` answers (with `_revision`, `_create_time` and the other server
    /// fields).
    pub doc: &'a Map<String, Value>,
}

impl Held<'_> {
    pub fn resource_type(&self) -> &str {
        self.doc
            .get("resource_type")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// The document as the API model's type (`nsx_core::nsx::model`), as a client reads it.
    pub fn typed<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(Value::Object(self.doc.clone()))
    }

    /// The value of the first tag with `scope`.
    pub fn tag(&self, scope: &str) -> Option<&str> {
        self.doc
            .get("tags")?
            .as_array()?
            .iter()
            .find(|t| t["scope"] == scope)
            .and_then(|t| t["tag"].as_str())
    }
}

impl<'a> Inspection<'a> {
    /// Every object, in id order.
    pub fn objects(&self) -> impl Iterator<Item = Held<'a>> + 'a {
        self.store.objects().map(|(id, o)| Held {
            id: id.as_str(),
            kind: o.kind,
            doc: &o.doc,
        })
    }

    pub fn get(&self, id: &str) -> Option<Held<'a>> {
        let (id, o) = self.store.object_entry(id)?;
        Some(Held {
            id: id.as_str(),
            kind: o.kind,
            doc: &o.doc,
        })
    }

    /// A firewall section's rules, in their order.
    pub fn rules(&self, section_id: &str) -> impl Iterator<Item = Held<'a>> + 'a {
        let store = self.store;
        store.rules_of(section_id).iter().filter_map(move |id| {
            let (id, o) = store.object_entry(id)?;
            Some(Held {
                id: id.as_str(),
                kind: o.kind,
                doc: &o.doc,
            })
        })
    }

    /// The firewall's sections from the top (first applied) down.
    pub fn sections(&self) -> impl Iterator<Item = Held<'a>> + 'a {
        let store = self.store;
        store.section_order().iter().filter_map(move |id| {
            let (id, o) = store.object_entry(id)?;
            Some(Held {
                id: id.as_str(),
                kind: o.kind,
                doc: &o.doc,
            })
        })
    }

    /// A logical router's route advertisement, as `GET .../routing/advertisement` answers;
    /// `None` for a router NSX does not hold.
    pub fn advertisement(&self, router_id: &str) -> Option<AdvertisementConfig> {
        let doc = self.store.advertisement_get(router_id).ok()?;
        serde_json::from_value(doc).ok()
    }

    /// How many objects the manager holds.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.store.len() == 0
    }

    /// The store's own consistency rules (references, allocations, firewall order, index).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.store.check_invariants()
    }

    /// The address and MAC NSX allocated for a logical port (`allocate_addresses`), as its
    /// `/state` reports the realized binding; `None` for a port without an allocation.
    pub fn port_binding(&self, port_id: &str) -> Option<PacketAddressClassifier> {
        let a = self.store.port_allocation(port_id)?;
        Some(PacketAddressClassifier {
            ip_address: a.ip.map(crate::ipam::ip_to_string),
            mac_address: a.mac.clone(),
            vlan: None,
        })
    }

    /// The addresses NSX realized for each logical port, by port id.
    pub fn port_addresses(&self) -> BTreeMap<String, Vec<String>> {
        self.store.port_addresses()
    }

    /// The dataplane model's walk of one packet entering at `entry`, with the connection
    /// tracking state `conns` (updated: a later reply finds the connection).
    pub fn trace(&self, conns: &mut Connections, entry: &Entry, packet: &Packet) -> Trace {
        self.store.trace_with(conns, entry, packet)
    }

    /// A packet and its reply, with fresh connection state.
    pub fn trace_connection(&self, entry: &Entry, packet: &Packet) -> (Trace, Option<Trace>) {
        self.store.trace_connection(entry, packet)
    }
}

/// What an admin request answered.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminAnswer {
    pub status: u16,
    /// The answer's JSON (`Null` for an empty body).
    pub body: Value,
}

impl AdminAnswer {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

impl FakeNsxManager {
    /// Runs `f` on a read-only view of what the manager holds at this moment.
    pub fn inspect<R>(&self, f: impl FnOnce(&Inspection<'_>) -> R) -> R {
        self.with_store(|store| f(&Inspection { store }))
    }

    /// Serves `method path?query` with `body` as the `admin` user, as HTTP would (without
    /// limits or faults); the change is indexed for search at once.
    pub fn as_admin(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> AdminAnswer {
        let query: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let text = body.map(Value::to_string).unwrap_or_default();
        let r = self.call_as_admin(ApiRequest {
            method,
            path,
            query: &query,
            body: text.as_bytes(),
        });
        AdminAnswer {
            status: r.status,
            body: r.body.unwrap_or(Value::Null),
        }
    }

    /// Lets the search index catch up with every write now, as it eventually does: for tests
    /// that want what a client sees once the search lag has passed.
    pub fn settle_search(&self) {
        self.catch_up_index();
    }
}
