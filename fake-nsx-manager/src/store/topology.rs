//! An index of the network for the dataplane model: which port holds an address, which CHILD
//! port a VIF and VLAN land on, which tier-1 routes a switch and which tier-0 a tier-1 links
//! to, which virtual server answers an address and port, and (memoized) NSGroup membership.
//!
//! Without it every hop of a traced packet scanned every logical port and router port as JSON
//! (a connectivity check cost O(ports) per hop, a policy oracle over n pods O(n^3)). The index
//! is derived state: built on the first trace after a change, dropped by every change
//! ([`Store::touch`], which every mutation already calls to keep search current), never
//! persisted. [`Store::check_invariants`] rebuilds it from scratch and compares, and checks each
//! memoized answer against the scan it replaces, so the random request sequences of the
//! property test prove the fast path equal to the slow one.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use serde_json::Value;

use super::Store;
use crate::ipam::Cidr;
use crate::kind::Kind;

/// A tier-1 downlink: the switch it attaches and the subnets it routes there.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Downlink {
    pub switch: String,
    pub tier1: String,
    pub subnets: Vec<Cidr>,
}

/// The index; every list and first-match keeps the store's id order, as the scans did.
#[derive(Debug, Default)]
pub(super) struct Topology {
    /// Address -> the logical ports holding it, in id order.
    ports_by_ip: HashMap<u32, Vec<String>>,
    /// PARENT VIF -> VLAN -> the first CHILD port with that `traffic_tag` under it (nested, so
    /// that a packet's lookup allocates nothing).
    port_by_vif: HashMap<String, HashMap<u16, String>>,
    /// Every downlink, in router-port id order.
    downlinks: Vec<Downlink>,
    /// Switch -> index in `downlinks` of the first downlink attaching it.
    router_of_switch: HashMap<String, usize>,
    /// Tier-1 -> the tier-0 its first resolvable link port points at.
    tier0_of: HashMap<String, String>,
    /// (VIP, port) -> (L4 protocol, virtual server) in id order: the first of a protocol
    /// listens there.
    virtual_servers: HashMap<(u32, u16), Vec<(String, String)>>,
    /// Memo: NSGroup -> logical port -> whether the group holds the port.
    group_ports: Mutex<HashMap<String, HashMap<String, bool>>>,
    /// Memo: NSGroup -> address -> whether the group holds the address.
    group_ips: Mutex<HashMap<String, HashMap<u32, bool>>>,
}

/// The store's slot for the index. Cloning (a batch's rollback copy) and deserializing give an
/// empty slot: the index is rebuilt on demand, never trusted across a copy.
#[derive(Default)]
pub(super) struct TopologyCache(OnceLock<Topology>);

impl Clone for TopologyCache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for TopologyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TopologyCache(built: {})", self.0.get().is_some())
    }
}

impl TopologyCache {
    pub fn clear(&mut self) {
        self.0 = OnceLock::new();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Topology {
    fn build(s: &Store) -> Self {
        let mut t = Topology::default();
        for p in s.ids_of(Kind::LogicalPort) {
            for ip in s.port_addrs(p) {
                let ports = t.ports_by_ip.entry(ip).or_default();
                if ports.last() != Some(p) {
                    ports.push(p.clone());
                }
            }
            let ctx = s.objects[p]
                .doc
                .get("attachment")
                .and_then(|a| a.get("context"));
            let vif = ctx
                .and_then(|c| c.get("parent_vif_id"))
                .and_then(Value::as_str);
            let tag = ctx
                .and_then(|c| c.get("traffic_tag"))
                .and_then(Value::as_i64)
                .and_then(|v| u16::try_from(v).ok());
            if let (Some(vif), Some(tag)) = (vif, tag) {
                t.port_by_vif
                    .entry(vif.to_string())
                    .or_default()
                    .entry(tag)
                    .or_insert_with(|| p.clone());
            }
        }
        for (rp, switch, tier1) in s.downlinks() {
            t.router_of_switch
                .entry(switch.clone())
                .or_insert(t.downlinks.len());
            t.downlinks.push(Downlink {
                switch,
                tier1,
                subnets: s.downlink_subnets(rp),
            });
        }
        for rp in s.ids_of(Kind::LogicalRouterPort) {
            let o = &s.objects[rp];
            if o.resource_type() != "LogicalRouterLinkPortOnTIER1" {
                continue;
            }
            let (Some(t1), Some(t0)) = (o.str("logical_router_id"), s.link_peer_router(rp)) else {
                continue;
            };
            t.tier0_of.entry(t1.to_string()).or_insert(t0);
        }
        for vs in s.ids_of(Kind::LbVirtualServer) {
            if let Some((ip, port, proto)) = s.virtual_server_key(vs) {
                t.virtual_servers
                    .entry((ip, port))
                    .or_default()
                    .push((proto, vs.clone()));
            }
        }
        t
    }

    /// The first port (in id order) holding `ip`.
    pub fn port_for_ip(&self, ip: u32) -> Option<&String> {
        self.ports_by_ip.get(&ip).and_then(|v| v.first())
    }

    /// Every port holding `ip`, in id order.
    pub fn ports_with_ip(&self, ip: u32) -> &[String] {
        self.ports_by_ip.get(&ip).map_or(&[], Vec::as_slice)
    }

    pub fn port_by_vif(&self, vif: &str, vlan: u16) -> Option<&String> {
        self.port_by_vif.get(vif)?.get(&vlan)
    }

    /// The tier-1 of the first downlink attaching `switch`.
    pub fn router_of_switch(&self, switch: &str) -> Option<&str> {
        self.router_of_switch
            .get(switch)
            .map(|&i| self.downlinks[i].tier1.as_str())
    }

    /// The first downlink whose subnets hold `ip`: (switch, tier-1).
    pub fn switch_holding(&self, ip: u32) -> Option<(&str, &str)> {
        self.downlinks
            .iter()
            .find(|d| d.subnets.iter().any(|c| c.contains(ip)))
            .map(|d| (d.switch.as_str(), d.tier1.as_str()))
    }

    pub fn tier0_of(&self, tier1: &str) -> Option<&str> {
        self.tier0_of.get(tier1).map(String::as_str)
    }

    pub fn virtual_server(&self, ip: u32, port: u16, proto: &str) -> Option<&String> {
        self.virtual_servers
            .get(&(ip, port))?
            .iter()
            .find(|(p, _)| p == proto)
            .map(|(_, vs)| vs)
    }

    pub fn group_holds_port(&self, s: &Store, group: &str, port: &str) -> bool {
        let known = lock(&self.group_ports)
            .get(group)
            .and_then(|m| m.get(port).copied());
        known.unwrap_or_else(|| {
            let hit = s.nsgroup_holds(group, Kind::LogicalPort, port);
            lock(&self.group_ports)
                .entry(group.to_string())
                .or_default()
                .insert(port.to_string(), hit);
            hit
        })
    }

    pub fn group_holds_ip(&self, s: &Store, group: &str, ip: u32) -> bool {
        let known = lock(&self.group_ips)
            .get(group)
            .and_then(|m| m.get(&ip).copied());
        known.unwrap_or_else(|| {
            let hit = s.group_holds_ip_scan(group, ip);
            lock(&self.group_ips)
                .entry(group.to_string())
                .or_default()
                .insert(ip, hit);
            hit
        })
    }

    /// The index as built equals one built now, and every memoized answer equals the scan.
    /// The first difference named is the same on every run (the maps are visited sorted), so
    /// a failure's message, which the simulation's trace records, does not vary.
    fn verify(&self, s: &Store) -> Result<(), String> {
        let fresh = Topology::build(s);
        let parts = [
            ("ports by address", self.ports_by_ip == fresh.ports_by_ip),
            ("CHILD ports by VIF", self.port_by_vif == fresh.port_by_vif),
            ("downlinks", self.downlinks == fresh.downlinks),
            (
                "routers of switches",
                self.router_of_switch == fresh.router_of_switch,
            ),
            ("tier-0 links", self.tier0_of == fresh.tier0_of),
            (
                "virtual servers",
                self.virtual_servers == fresh.virtual_servers,
            ),
        ];
        if let Some((part, _)) = parts.iter().find(|(_, same)| !same) {
            return Err(format!(
                "the dataplane's topology index is stale: its {part} differ from a rebuild"
            ));
        }
        let ports = lock(&self.group_ports);
        let mut memo: Vec<(&String, &String, bool)> = ports
            .iter()
            .flat_map(|(g, m)| m.iter().map(move |(p, hit)| (g, p, *hit)))
            .collect();
        memo.sort();
        for (g, p, hit) in memo {
            if s.nsgroup_holds(g, Kind::LogicalPort, p) != hit {
                return Err(format!(
                    "memoized membership of port {p} in NSGroup {g} is stale ({hit})"
                ));
            }
        }
        let ips = lock(&self.group_ips);
        let mut memo: Vec<(&String, u32, bool)> = ips
            .iter()
            .flat_map(|(g, m)| m.iter().map(move |(ip, hit)| (g, *ip, *hit)))
            .collect();
        memo.sort();
        for (g, ip, hit) in memo {
            if s.group_holds_ip_scan(g, ip) != hit {
                return Err(format!(
                    "memoized membership of {} in NSGroup {g} is stale ({hit})",
                    crate::ipam::ip_to_string(ip)
                ));
            }
        }
        Ok(())
    }
}

impl Store {
    /// The index, built now if a change dropped it.
    pub(super) fn topology(&self) -> &Topology {
        self.topology.0.get_or_init(|| Topology::build(self))
    }

    /// Records a change of `id`: search will show it, and the dataplane's index is rebuilt.
    pub(super) fn touch(&mut self, id: impl Into<String>) {
        self.dirty.insert(id.into());
        self.topology.clear();
    }

    /// For [`Store::check_invariants`]: a built index must equal a fresh one.
    pub(super) fn check_topology(&self) -> Result<(), String> {
        match self.topology.0.get() {
            Some(t) => t.verify(self),
            None => Ok(()),
        }
    }
}
