//! The NSX dataplane model: what the hypervisors would do with the realized configuration, so
//! that connectivity is traced rather than assumed.
//!
//! A packet enters at a logical port, named directly or as the node VIF and VLAN it arrives
//! with (a container's traffic is tagged by the node's OVS and lands on the CHILD port with
//! that `traffic_tag` under the node's PARENT VIF). From there:
//!
//! 1. **SpoofGuard**: the source address must be the port's (its allocated address or an
//!    address binding).
//! 2. **Distributed firewall, OUT** at the source port (see below).
//! 3. **Load balancer**: a destination that is an enabled virtual server's VIP and port, on a
//!    tier-1 with an enabled LB service, is DNATed to a pool member chosen by a hash of the
//!    source address and port (deterministic, like a real LB's persistence-free hash), and
//!    its source translated as the pool's `snat_translation` says: automap to the LB tier-1's
//!    transit address (100.64.x.y, assigned when the tier-1 links to the tier-0), an IP pool to
//!    its first address, none when absent (transparent). Replies are translated back.
//! 4. **Switching and routing**: same switch, then the source switch's tier-1 (through its
//!    downlink), then the tier-0 (through the link ports), then the tier-1 whose downlink
//!    subnet holds the destination. The tier-0 knows a tier-1's subnets only when that tier-1
//!    advertises its connected routes. An address no tier-1 holds leaves through the tier-0,
//!    whose SNAT rules (enabled, `match_source_network` holding the source; the lowest
//!    `rule_priority`, then the most specific network) rewrite the source.
//! 5. **Distributed firewall, IN** at the destination port; then delivery, with the VIF and
//!    VLAN the packet leaves on.
//!
//! **Firewall evaluation** as NSX does it: sections in order, a section's `applied_tos` first,
//! then its rules in order, skipping disabled ones and rules whose `applied_tos` or
//! `direction` do not cover this port and direction; sources and destinations match by
//! address (NSGroups by effective members: ports' addresses, ports on member switches, IPSets,
//! nested groups; IPSets; ports; switches; literal addresses), with `*_excluded` negating;
//! services by protocol and ports. The first matching rule decides. **Stateful**: a connection
//! allowed through stateful sections is remembered in [`Connections`]; its replies pass without
//! evaluation (as the DFW's connection table does), and a stateless section's rules are
//! evaluated for replies like any packet.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Store;
use crate::ipam::{self, Cidr};
use crate::kind::Kind;

/// IP protocols the model knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
}

impl Protocol {
    pub fn number(self) -> i64 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
            Protocol::Icmp => 1,
        }
    }

    fn l4_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Icmp => "ICMP",
        }
    }
}

/// An IPv4 packet's 5-tuple (addresses as dotted quads in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Packet {
    #[serde(with = "ip_text")]
    pub src_ip: u32,
    #[serde(with = "ip_text")]
    pub dst_ip: u32,
    pub protocol: Protocol,
    #[serde(default)]
    pub src_port: u16,
    #[serde(default)]
    pub dst_port: u16,
}

mod ip_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ip: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::ipam::ip_to_string(*ip))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let text = String::deserialize(d)?;
        crate::ipam::parse_ip(&text).map_err(serde::de::Error::custom)
    }
}

impl Packet {
    pub fn new(src: &str, dst: &str, protocol: Protocol, src_port: u16, dst_port: u16) -> Self {
        Self {
            src_ip: ipam::parse_ip(src).unwrap_or(0),
            dst_ip: ipam::parse_ip(dst).unwrap_or(0),
            protocol,
            src_port,
            dst_port,
        }
    }

    /// The reply's tuple.
    pub fn reversed(&self) -> Self {
        Self {
            src_ip: self.dst_ip,
            dst_ip: self.src_ip,
            protocol: self.protocol,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }
}

/// Where a packet enters NSX.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entry {
    /// A logical port, by id.
    LogicalPort(String),
    /// A node's VIF (the PARENT attachment id) and the VLAN the node tagged the packet with.
    Vif { parent_vif_id: String, vlan: u16 },
    /// From outside, through the tier-0's uplink: to a load balancer's VIP, or a reply to a
    /// connection that left through SNAT.
    External,
}

/// How a trace ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Delivered to a logical port; a container port leaves on its parent VIF with its VLAN.
    Delivered {
        logical_port: String,
        parent_vif_id: Option<String>,
        vlan: Option<u16>,
        packet: Packet,
    },
    /// Left NSX through the tier-0 towards an external network, as `packet` (after SNAT).
    External {
        packet: Packet,
    },
    Dropped {
        reason: String,
    },
}

/// The path of one packet: a line per decision, and the outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    pub hops: Vec<String>,
    #[serde(flatten)]
    pub verdict: Verdict,
}

impl Trace {
    pub fn delivered(&self) -> bool {
        matches!(self.verdict, Verdict::Delivered { .. })
    }
}

/// The firewall's connection table: connections allowed through stateful sections, as the
/// tuple of their first packet at each port, and the NAT applied on the way.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Connections {
    entries: BTreeSet<(String, Packet)>,
    /// Load-balanced connections: the reply tuple from the member -> the reply as the client
    /// expects it (from the VIP).
    unnat: BTreeMap<Packet, Packet>,
    /// Connections opened from outside straight to a routed address: their replies leave as
    /// they are (NAT is stateful; a SNAT rule applies to connections from inside).
    #[serde(default)]
    inbound: BTreeSet<Packet>,
}

impl Connections {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.unnat.clear();
        self.inbound.clear();
    }
}

/// The firewall's decision at one port.
struct Decision {
    allow: bool,
    stateful: bool,
    hop: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    In,
    Out,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::In => "IN",
            Dir::Out => "OUT",
        }
    }
}

impl Store {
    /// A port's addresses: its allocation, then its address bindings.
    pub(super) fn port_addrs(&self, port: &str) -> impl Iterator<Item = u32> + '_ {
        let allocated = self.port_alloc.get(port).and_then(|a| a.ip);
        let bound = self.objects[port]
            .doc
            .get("address_bindings")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|b| b.get("ip_address").and_then(Value::as_str))
            .filter_map(|t| ipam::parse_ip(t).ok());
        allocated.into_iter().chain(bound)
    }

    fn port_ips(&self, port: &str) -> Vec<u32> {
        self.port_addrs(port).collect()
    }

    /// `port_ips(port).contains(&ip)` without collecting them.
    fn port_has_ip(&self, port: &str, ip: u32) -> bool {
        self.port_addrs(port).any(|a| a == ip)
    }

    fn port_for_ip(&self, ip: u32) -> Option<String> {
        self.topology().port_for_ip(ip).cloned()
    }

    fn entry_port(&self, entry: &Entry) -> Result<String, String> {
        match entry {
            Entry::LogicalPort(id) => match self.objects.get(id) {
                Some(o) if o.kind == Kind::LogicalPort => Ok(id.clone()),
                _ => Err(format!("no logical port {id}")),
            },
            Entry::External => Err("traffic from outside has no logical port".into()),
            Entry::Vif {
                parent_vif_id,
                vlan,
            } => self
                .topology()
                .port_by_vif(parent_vif_id, *vlan)
                .cloned()
                .ok_or_else(|| format!("no CHILD port with VLAN {vlan} under VIF {parent_vif_id}")),
        }
    }

    /// Whether `port` is one of the targets (applied-to semantics).
    fn port_in_targets(&self, port: &str, targets: &[Value]) -> bool {
        targets.iter().any(|t| {
            let id = t.get("target_id").and_then(Value::as_str).unwrap_or("");
            match t.get("target_type").and_then(Value::as_str).unwrap_or("") {
                "LogicalPort" => id == port,
                "LogicalSwitch" => self.objects[port].str("logical_switch_id") == Some(id),
                "NSGroup" => self.topology().group_holds_port(self, id, port),
                _ => false,
            }
        })
    }

    fn ipset_holds(&self, id: &str, ip: u32) -> bool {
        self.objects.get(id).is_some_and(|o| {
            o.doc
                .get("ip_addresses")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .filter_map(|e| ipam::parse_ip_element(e).ok())
                .any(|r| (r.start..=r.end).contains(&ip))
        })
    }

    /// Whether `ip` is one of the targets (source/destination semantics).
    fn ip_in_targets(&self, ip: u32, targets: &[Value]) -> bool {
        targets.iter().any(|t| {
            let id = t.get("target_id").and_then(Value::as_str).unwrap_or("");
            match t.get("target_type").and_then(Value::as_str).unwrap_or("") {
                "LogicalPort" => self.objects.contains_key(id) && self.port_has_ip(id, ip),
                "LogicalSwitch" => self
                    .topology()
                    .ports_with_ip(ip)
                    .iter()
                    .any(|p| self.objects[p].str("logical_switch_id") == Some(id)),
                "IPSet" => self.ipset_holds(id, ip),
                "NSGroup" => self.topology().group_holds_ip(self, id, ip),
                "IPv4Address" => {
                    ipam::parse_ip_element(id).is_ok_and(|r| (r.start..=r.end).contains(&ip))
                }
                _ => false,
            }
        })
    }

    /// Whether NSGroup `id` holds `ip`: a member port has it, or a member IPSet holds it (the
    /// scan the topology index memoizes).
    pub(super) fn group_holds_ip_scan(&self, id: &str, ip: u32) -> bool {
        self.ids_of(Kind::LogicalPort)
            .filter(|p| self.port_has_ip(p, ip))
            .any(|p| self.nsgroup_holds(id, Kind::LogicalPort, p))
            || self
                .nsgroup_effective(id, Kind::IpSet)
                .iter()
                .any(|s| self.ipset_holds(s, ip))
    }

    fn service_matches(&self, svc: &Value, p: &Packet) -> bool {
        let element = match svc.get("service") {
            Some(e) => e.clone(),
            None => {
                let id = svc.get("target_id").and_then(Value::as_str).unwrap_or("");
                match self
                    .objects
                    .get(id)
                    .and_then(|o| o.doc.get("nsservice_element"))
                {
                    Some(e) => e.clone(),
                    None => return false,
                }
            }
        };
        let in_ranges = |field: &str, port: u16| {
            let list: Vec<&str> = element
                .get(field)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            list.is_empty()
                || list.iter().any(|r| {
                    let (a, b) = r.split_once('-').unwrap_or((r, r));
                    matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if (a..=b).contains(&port))
                })
        };
        match element
            .get("resource_type")
            .and_then(Value::as_str)
            .unwrap_or("")
        {
            "L4PortSetNSService" => {
                element.get("l4_protocol").and_then(Value::as_str) == Some(p.protocol.l4_name())
                    && in_ranges("destination_ports", p.dst_port)
                    && in_ranges("source_ports", p.src_port)
            }
            "IPProtocolNSService" => {
                element.get("protocol_number").and_then(Value::as_i64) == Some(p.protocol.number())
            }
            "ICMPTypeNSService" => p.protocol == Protocol::Icmp,
            _ => false,
        }
    }

    pub(super) fn field_list<'a>(
        doc: &'a serde_json::Map<String, Value>,
        field: &str,
    ) -> &'a [Value] {
        doc.get(field)
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice)
    }

    fn rule_matches(
        &self,
        rule: &serde_json::Map<String, Value>,
        port: &str,
        dir: Dir,
        p: &Packet,
    ) -> bool {
        if rule.get("disabled").and_then(Value::as_bool) == Some(true) {
            return false;
        }
        let direction = rule
            .get("direction")
            .and_then(Value::as_str)
            .unwrap_or("IN_OUT");
        if direction != "IN_OUT" && direction != dir.name() {
            return false;
        }
        if rule.get("ip_protocol").and_then(Value::as_str) == Some("IPV6") {
            return false;
        }
        let applied = Self::field_list(rule, "applied_tos");
        if !applied.is_empty() && !self.port_in_targets(port, applied) {
            return false;
        }
        let side = |field: &str, excluded: &str, ip: u32| {
            let targets = Self::field_list(rule, field);
            if targets.is_empty() {
                return true;
            }
            let hit = self.ip_in_targets(ip, targets);
            hit != (rule.get(excluded).and_then(Value::as_bool) == Some(true))
        };
        if !side("sources", "sources_excluded", p.src_ip)
            || !side("destinations", "destinations_excluded", p.dst_ip)
        {
            return false;
        }
        let services = Self::field_list(rule, "services");
        services.is_empty() || services.iter().any(|s| self.service_matches(s, p))
    }

    fn firewall(&self, port: &str, dir: Dir, p: &Packet) -> Decision {
        for section in &self.section_order {
            let Some(s) = self.objects.get(section) else {
                continue;
            };
            let applied = Self::field_list(&s.doc, "applied_tos");
            if !applied.is_empty() && !self.port_in_targets(port, applied) {
                continue;
            }
            for rid in self.rules_of(section) {
                let Some(r) = self.objects.get(rid) else {
                    continue;
                };
                if self.rule_matches(&r.doc, port, dir, p) {
                    let action = r.str("action").unwrap_or("ALLOW");
                    return Decision {
                        allow: action == "ALLOW",
                        stateful: s.doc.get("stateful").and_then(Value::as_bool) != Some(false),
                        hop: format!(
                            "dfw {} at {port}: section {:?} rule {rid} {:?}: {action}",
                            dir.name(),
                            s.str("display_name").unwrap_or(section),
                            r.str("display_name").unwrap_or("")
                        ),
                    };
                }
            }
        }
        Decision {
            allow: true,
            stateful: true,
            hop: format!("dfw {} at {port}: no rule matched: ALLOW", dir.name()),
        }
    }

    /// The firewall at one port, consulting and filling the connection table.
    fn firewall_stateful(
        &self,
        conns: &mut Connections,
        port: &str,
        dir: Dir,
        p: &Packet,
        hops: &mut Vec<String>,
    ) -> bool {
        if conns.entries.contains(&(port.to_string(), p.reversed())) {
            hops.push(format!(
                "dfw {} at {port}: reply of a tracked connection: ALLOW",
                dir.name()
            ));
            return true;
        }
        let d = self.firewall(port, dir, p);
        hops.push(d.hop);
        if d.allow && d.stateful {
            conns.entries.insert((port.to_string(), *p));
        }
        d.allow
    }

    /// Every downlink: (router port, its switch, its tier-1).
    pub(super) fn downlinks(&self) -> impl Iterator<Item = (&String, String, String)> + '_ {
        self.ids_of(Kind::LogicalRouterPort).filter_map(|rp| {
            let o = &self.objects[rp];
            if o.resource_type() != "LogicalRouterDownLinkPort" {
                return None;
            }
            let lsp = o
                .doc
                .get("linked_logical_switch_port_id")
                .and_then(|l| l.get("target_id"))
                .and_then(Value::as_str)?;
            let switch = self.objects.get(lsp)?.str("logical_switch_id")?.to_string();
            Some((rp, switch, o.str("logical_router_id")?.to_string()))
        })
    }

    /// The tier-1 that routes for a switch: the router of the downlink attached to it.
    fn router_of_switch(&self, switch: &str) -> Option<String> {
        self.topology().router_of_switch(switch).map(str::to_string)
    }

    pub(super) fn downlink_subnets(&self, rp: &str) -> Vec<Cidr> {
        Self::field_list(&self.objects[rp].doc, "subnets")
            .iter()
            .flat_map(|s| {
                let prefix = s.get("prefix_length").and_then(Value::as_i64).unwrap_or(32);
                Self::field_list(
                    s.as_object().unwrap_or(&serde_json::Map::new()),
                    "ip_addresses",
                )
                .iter()
                .filter_map(|a| a.as_str())
                .filter_map(move |a| Cidr::parse_loose(&format!("{a}/{prefix}")).ok())
                .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The tier-0 a tier-1 is linked to.
    fn tier0_of(&self, tier1: &str) -> Option<String> {
        self.topology().tier0_of(tier1).map(str::to_string)
    }

    /// The router at the other end of link port `rp`.
    pub(super) fn link_peer_router(&self, rp: &str) -> Option<String> {
        let peer = self.objects[rp]
            .doc
            .get("linked_logical_router_port_id")
            .and_then(|l| l.get("target_id"))
            .and_then(Value::as_str)?;
        Some(
            self.objects
                .get(peer)?
                .str("logical_router_id")?
                .to_string(),
        )
    }

    fn advertises_connected(&self, tier1: &str) -> bool {
        self.advertisement.get(tier1).is_some_and(|a| {
            a.get("enabled").and_then(Value::as_bool) == Some(true)
                && a.get("advertise_nsx_connected_routes")
                    .and_then(Value::as_bool)
                    == Some(true)
        })
    }

    /// The downlink (switch, tier-1) holding `ip`, if any.
    fn switch_holding(&self, ip: u32) -> Option<(String, String)> {
        self.topology()
            .switch_holding(ip)
            .map(|(sw, t1)| (sw.to_string(), t1.to_string()))
    }

    /// Where virtual server `vs` listens: (VIP, port, L4 protocol); `None` when it has no
    /// parsable address or port (it answers nothing).
    pub(super) fn virtual_server_key(&self, vs: &str) -> Option<(u32, u16, String)> {
        let d = &self.objects[vs].doc;
        let ip = d
            .get("ip_address")
            .and_then(Value::as_str)
            .and_then(|t| ipam::parse_ip(t).ok())?;
        let port = d
            .get("port")
            .and_then(Value::as_str)
            .and_then(|t| t.parse::<u16>().ok())?;
        let proto = d
            .get("ip_protocol")
            .and_then(Value::as_str)
            .unwrap_or("TCP");
        Some((ip, port, proto.to_string()))
    }

    /// A virtual server for the packet's destination, and the pool member it picks.
    fn load_balance(&self, p: &Packet, hops: &mut Vec<String>) -> Result<Option<Packet>, String> {
        if let Some(vs) = self
            .topology()
            .virtual_server(p.dst_ip, p.dst_port, p.protocol.l4_name())
        {
            let d = &self.objects[vs].doc;
            if d.get("enabled").and_then(Value::as_bool) == Some(false) {
                return Err(format!("virtual server {vs} is disabled"));
            }
            let attached = self.ids_of(Kind::LbService).any(|s| {
                let sd = &self.objects[s].doc;
                sd.get("enabled").and_then(Value::as_bool) != Some(false)
                    && Self::field_list(sd, "virtual_server_ids")
                        .iter()
                        .any(|v| v.as_str() == Some(vs))
            });
            if !attached {
                return Err(format!("virtual server {vs} is on no enabled LB service"));
            }
            let pool = d.get("pool_id").and_then(Value::as_str).unwrap_or("");
            let members: Vec<(u32, u16)> = self
                .objects
                .get(pool)
                .map(|o| Self::field_list(&o.doc, "members"))
                .unwrap_or(&[])
                .iter()
                .filter(|m| {
                    m.get("admin_state")
                        .and_then(Value::as_str)
                        .unwrap_or("ENABLED")
                        == "ENABLED"
                })
                .filter_map(|m| {
                    let ip = ipam::parse_ip(m.get("ip_address")?.as_str()?).ok()?;
                    let port = m
                        .get("port")
                        .and_then(Value::as_str)
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(p.dst_port);
                    Some((ip, port))
                })
                .collect();
            if members.is_empty() {
                return Err(format!("pool {pool} of virtual server {vs} has no member"));
            }
            // Source-IP persistence keeps a client on one member (while the members stay):
            // the pick hashes the client's address alone.
            let sticky = d
                .get("persistence_profile_id")
                .and_then(Value::as_str)
                .and_then(|id| self.objects.get(id))
                .is_some_and(|o| o.resource_type() == "LbSourceIpPersistenceProfile");
            let h = if sticky {
                u64::from(p.src_ip) * 31
            } else {
                u64::from(p.src_ip) * 31 + u64::from(p.src_port)
            };
            let (mip, mport) = members[(h % members.len() as u64) as usize];
            hops.push(format!(
                "lb virtual server {vs}: member {}:{mport} of pool {pool}{}",
                ipam::ip_to_string(mip),
                if sticky {
                    " (source-IP persistence)"
                } else {
                    ""
                }
            ));
            let mut out = Packet {
                dst_ip: mip,
                dst_port: mport,
                ..*p
            };
            if let Some(src) = self.lb_snat(pool, vs) {
                hops.push(format!(
                    "lb SNAT: source {} -> {}",
                    ipam::ip_to_string(p.src_ip),
                    ipam::ip_to_string(src)
                ));
                out.src_ip = src;
            }
            return Ok(Some(out));
        }
        Ok(None)
    }

    /// The source a pool's `snat_translation` gives a load-balanced connection: automap, the
    /// load balancer's uplink address (its tier-1's transit address towards the tier-0); an IP
    /// pool, its first address. `None`: transparent (the client's address stays).
    fn lb_snat(&self, pool: &str, vs: &str) -> Option<u32> {
        let t = self.objects.get(pool)?.doc.get("snat_translation")?;
        match t.get("type").and_then(Value::as_str)? {
            "LbSnatAutoMap" => {
                let tier1 = self.ids_of(Kind::LbService).find_map(|s| {
                    let d = &self.objects[s].doc;
                    Self::field_list(d, "virtual_server_ids")
                        .iter()
                        .any(|v| v.as_str() == Some(vs))
                        .then(|| d.get("attachment")?.get("target_id")?.as_str())
                        .flatten()
                })?;
                self.ids_of(Kind::LogicalRouterPort).find_map(|rp| {
                    let o = &self.objects[rp];
                    if o.resource_type() != "LogicalRouterLinkPortOnTIER1"
                        || o.str("logical_router_id") != Some(tier1)
                    {
                        return None;
                    }
                    let ip = o.doc.get("subnets")?[0]["ip_addresses"][0].as_str()?;
                    ipam::parse_ip(ip).ok()
                })
            }
            "LbSnatIpPool" => {
                let first = t.get("ip_addresses")?.get(0)?.get("ip_address")?.as_str()?;
                ipam::parse_ip_element(first).ok().map(|r| r.start)
            }
            _ => None,
        }
    }

    fn snat(&self, tier0: &str, p: &Packet) -> Option<(String, u32)> {
        let mut best: Option<(i64, u8, String, u32)> = None;
        for rid in self.children.get(tier0).into_iter().flatten() {
            let Some(r) = self.objects.get(rid) else {
                continue;
            };
            if r.str("action") != Some("SNAT")
                || r.doc.get("enabled").and_then(Value::as_bool) == Some(false)
            {
                continue;
            }
            let Some(net) = r
                .str("match_source_network")
                .and_then(|t| Cidr::parse_loose(t).ok())
            else {
                continue;
            };
            if !net.contains(p.src_ip) {
                continue;
            }
            let Some(to) = r
                .str("translated_network")
                .and_then(|t| ipam::parse_ip_element(t).ok())
            else {
                continue;
            };
            let prio = r
                .doc
                .get("rule_priority")
                .and_then(Value::as_i64)
                .unwrap_or(1024);
            let cand = (prio, 32 - net.prefix, rid.clone(), to.start);
            if best.as_ref().is_none_or(|b| (cand.0, cand.1) < (b.0, b.1)) {
                best = Some(cand);
            }
        }
        best.map(|(_, _, id, ip)| (id, ip))
    }

    /// Traces one packet without a connection table (every packet is evaluated).
    pub fn trace(&self, entry: &Entry, packet: &Packet) -> Trace {
        self.trace_with(&mut Connections::default(), entry, packet)
    }

    /// Traces one packet, consulting and updating the firewall's connection table.
    pub fn trace_with(&self, conns: &mut Connections, entry: &Entry, packet: &Packet) -> Trace {
        let mut hops = Vec::new();
        let verdict = self.walk(conns, entry, packet, &mut hops);
        Trace { hops, verdict }
    }

    fn walk(
        &self,
        conns: &mut Connections,
        entry: &Entry,
        packet: &Packet,
        hops: &mut Vec<String>,
    ) -> Verdict {
        let drop = |reason: String| Verdict::Dropped { reason };
        if *entry == Entry::External {
            return self.walk_inbound(conns, packet, hops);
        }
        let src_port = match self.entry_port(entry) {
            Ok(p) => p,
            Err(e) => return drop(e),
        };
        let src = &self.objects[&src_port];
        hops.push(format!(
            "ingress at logical port {src_port} {:?}",
            src.str("display_name").unwrap_or("")
        ));
        if src.str("admin_state") == Some("DOWN") {
            return drop(format!("logical port {src_port} is admin down"));
        }
        if !self.port_ips(&src_port).contains(&packet.src_ip) {
            return drop(format!(
                "spoofguard: {} is not an address of logical port {src_port}",
                ipam::ip_to_string(packet.src_ip)
            ));
        }
        if !self.firewall_stateful(conns, &src_port, Dir::Out, packet, hops) {
            return drop(format!("dfw OUT at {src_port}"));
        }
        let src_switch = src.str("logical_switch_id").unwrap_or("").to_string();
        let mut p = *packet;
        if let Some(unnat) = conns.unnat.get(&p) {
            hops.push(format!(
                "lb reply: source {}:{} -> {}:{}",
                ipam::ip_to_string(p.src_ip),
                p.src_port,
                ipam::ip_to_string(unnat.src_ip),
                unnat.src_port
            ));
            p = *unnat;
        } else {
            match self.load_balance(&p, hops) {
                Ok(Some(dnat)) => {
                    conns.unnat.insert(dnat.reversed(), p.reversed());
                    p = dnat;
                }
                Ok(None) => {}
                Err(e) => return drop(e),
            }
        }
        let dst_port = self.port_for_ip(p.dst_ip);
        let dst_switch = dst_port
            .as_ref()
            .and_then(|d| self.objects[d].str("logical_switch_id"))
            .map(str::to_string);
        if dst_switch.as_deref() != Some(src_switch.as_str()) {
            let Some(t1) = self.router_of_switch(&src_switch) else {
                return drop(format!(
                    "switch {src_switch} has no router and {} is not on it",
                    ipam::ip_to_string(p.dst_ip)
                ));
            };
            hops.push(format!("switch {src_switch} -> tier-1 {t1}"));
            match self.switch_holding(p.dst_ip) {
                Some((sw, r)) if r == t1 => {
                    hops.push(format!("tier-1 {t1} -> switch {sw}"));
                }
                holder => {
                    let Some(t0) = self.tier0_of(&t1) else {
                        return drop(format!("tier-1 {t1} has no link to a tier-0"));
                    };
                    hops.push(format!("tier-1 {t1} -> tier-0 {t0}"));
                    match holder {
                        Some((sw, t1b)) => {
                            if self.tier0_of(&t1b).as_deref() != Some(t0.as_str()) {
                                return drop(format!(
                                    "tier-0 {t0} has no route to {}",
                                    ipam::ip_to_string(p.dst_ip)
                                ));
                            }
                            if !self.advertises_connected(&t1b) {
                                return drop(format!(
                                    "tier-0 {t0} has no route to {}: tier-1 {t1b} does not advertise its connected routes",
                                    ipam::ip_to_string(p.dst_ip)
                                ));
                            }
                            hops.push(format!("tier-0 {t0} -> tier-1 {t1b} -> switch {sw}"));
                        }
                        None => {
                            if conns.inbound.contains(&p) {
                                hops.push(format!(
                                    "tier-0 {t0}: reply of a connection from outside, not SNATed"
                                ));
                            } else if let Some((rule, ip)) = self.snat(&t0, &p) {
                                hops.push(format!(
                                    "tier-0 {t0} SNAT rule {rule}: {} -> {}",
                                    ipam::ip_to_string(p.src_ip),
                                    ipam::ip_to_string(ip)
                                ));
                                let before = p;
                                p.src_ip = ip;
                                conns.unnat.insert(p.reversed(), before.reversed());
                            }
                            hops.push(format!(
                                "tier-0 {t0} -> external {}",
                                ipam::ip_to_string(p.dst_ip)
                            ));
                            return Verdict::External { packet: p };
                        }
                    }
                }
            }
        } else {
            hops.push(format!("switch {src_switch}"));
        }
        self.deliver(conns, dst_port, p, hops)
    }

    /// A packet from outside: un-SNAT of a reply, or a load balancer's DNAT, then the route
    /// from the tier-0 down to the switch holding the address (which its tier-1 must
    /// advertise), then the destination's firewall.
    fn walk_inbound(
        &self,
        conns: &mut Connections,
        packet: &Packet,
        hops: &mut Vec<String>,
    ) -> Verdict {
        let drop = |reason: String| Verdict::Dropped { reason };
        hops.push(format!(
            "from outside to {}",
            ipam::ip_to_string(packet.dst_ip)
        ));
        let mut p = *packet;
        let mut routed = false;
        if let Some(orig) = conns.unnat.get(&p) {
            hops.push(format!(
                "tier-0 reverse SNAT: destination {} -> {}",
                ipam::ip_to_string(p.dst_ip),
                ipam::ip_to_string(orig.dst_ip)
            ));
            p = *orig;
        } else {
            match self.load_balance(&p, hops) {
                Ok(Some(dnat)) => {
                    conns.unnat.insert(dnat.reversed(), p.reversed());
                    p = dnat;
                }
                // Not a VIP: routed like any address the tier-0 has a route to (a subnet a
                // tier-1 advertises), e.g. a reply to a namespace that does not SNAT.
                Ok(None) => routed = true,
                Err(e) => return drop(e),
            }
        }
        let Some((sw, t1)) = self.switch_holding(p.dst_ip) else {
            return drop(format!("no switch holds {}", ipam::ip_to_string(p.dst_ip)));
        };
        let Some(t0) = self.tier0_of(&t1) else {
            return drop(format!("tier-1 {t1} has no link to a tier-0"));
        };
        if !self.advertises_connected(&t1) {
            return drop(format!(
                "tier-0 {t0} has no route to {}: tier-1 {t1} does not advertise its connected routes",
                ipam::ip_to_string(p.dst_ip)
            ));
        }
        hops.push(format!("tier-0 {t0} -> tier-1 {t1} -> switch {sw}"));
        let verdict = self.deliver(conns, self.port_for_ip(p.dst_ip), p, hops);
        if routed && matches!(verdict, Verdict::Delivered { .. }) {
            conns.inbound.insert(p.reversed());
        }
        verdict
    }

    /// Delivery at the port holding the destination address: the port must be up and its
    /// firewall (IN) must allow the packet; a container port leaves on its parent VIF with its
    /// VLAN.
    fn deliver(
        &self,
        conns: &mut Connections,
        dst_port: Option<String>,
        p: Packet,
        hops: &mut Vec<String>,
    ) -> Verdict {
        let drop = |reason: String| Verdict::Dropped { reason };
        let Some(dst_port) = dst_port else {
            return drop(format!(
                "no logical port has address {}",
                ipam::ip_to_string(p.dst_ip)
            ));
        };
        let dst = &self.objects[&dst_port];
        if dst.str("admin_state") == Some("DOWN") {
            return drop(format!("logical port {dst_port} is admin down"));
        }
        if !self.firewall_stateful(conns, &dst_port, Dir::In, &p, hops) {
            return drop(format!("dfw IN at {dst_port}"));
        }
        let ctx = dst.doc.get("attachment").and_then(|a| a.get("context"));
        hops.push(format!(
            "delivered at logical port {dst_port} {:?}",
            dst.str("display_name").unwrap_or("")
        ));
        Verdict::Delivered {
            parent_vif_id: ctx
                .and_then(|c| c.get("parent_vif_id"))
                .and_then(Value::as_str)
                .map(str::to_string),
            vlan: ctx
                .and_then(|c| c.get("traffic_tag"))
                .and_then(Value::as_i64)
                .and_then(|v| u16::try_from(v).ok()),
            logical_port: dst_port,
            packet: p,
        }
    }

    /// Traces a packet and, if it is delivered, its reply from the destination port (with
    /// the connection table both share): whether a connection works both ways.
    pub fn trace_connection(&self, entry: &Entry, packet: &Packet) -> (Trace, Option<Trace>) {
        let mut conns = Connections::default();
        let forward = self.trace_with(&mut conns, entry, packet);
        let reply = match &forward.verdict {
            Verdict::Delivered {
                logical_port,
                packet: delivered,
                ..
            } => Some(self.trace_with(
                &mut conns,
                &Entry::LogicalPort(logical_port.clone()),
                &delivered.reversed(),
            )),
            _ => None,
        };
        (forward, reply)
    }

    /// Addresses of every logical port, for harnesses that address pods by IP.
    pub fn port_addresses(&self) -> BTreeMap<String, Vec<String>> {
        self.ids_of(Kind::LogicalPort)
            .map(|p| {
                (
                    p.clone(),
                    self.port_ips(p)
                        .into_iter()
                        .map(ipam::ip_to_string)
                        .collect(),
                )
            })
            .collect()
    }
}
