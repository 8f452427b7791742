//! The connection tracker behind the `ct` action: connections per zone, found from either
//! direction; `commit` creates one (with its NAT and `exec` mark and label); `nat` rewrites a
//! packet of a NATed connection (and un-NATs its replies); entries expire; flushing by zone
//! and tuple as `ovs-appctl dpctl/flush-conntrack` does. Like the kernel's, it outlives an
//! ovs-vswitchd restart.

use std::collections::BTreeMap;

use nsx_core::ovs::Field;
use nsx_core::ovs::flow::Nat;

use crate::packet::Packet;

/// ct_state bits.
pub const NEW: u128 = 0x01;
pub const EST: u128 = 0x02;
pub const RPL: u128 = 0x08;
pub const INV: u128 = 0x10;
pub const TRK: u128 = 0x20;
pub const SNAT: u128 = 0x40;
pub const DNAT: u128 = 0x80;

/// A connection's 5-tuple (ICMP uses the ports as type/code are ignored: 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tuple {
    pub src: u32,
    pub dst: u32,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

impl Tuple {
    pub fn of(p: &Packet) -> Tuple {
        let proto = p.get(Field::IpProto) as u8;
        let l4 = matches!(proto, 6 | 17 | 132);
        Tuple {
            src: p.get(Field::IpSrc) as u32,
            dst: p.get(Field::IpDst) as u32,
            proto,
            sport: if l4 { p.get(Field::TpSrc) as u16 } else { 0 },
            dport: if l4 { p.get(Field::TpDst) as u16 } else { 0 },
        }
    }

    pub fn reversed(&self) -> Tuple {
        Tuple {
            src: self.dst,
            dst: self.src,
            proto: self.proto,
            sport: self.dport,
            dport: self.sport,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conn {
    pub zone: u16,
    /// As the first packet was, before NAT.
    pub orig: Tuple,
    /// As replies arrive (after NAT of the original direction).
    pub reply: Tuple,
    pub mark: u32,
    pub label: u128,
    /// Whether a reply has been seen (the connection is established).
    pub replied: bool,
    pub snat: bool,
    pub dnat: bool,
    pub expires_ms: u64,
}

/// Timeouts (Linux defaults): TCP established 5 days, TCP other 2 min, UDP 30 s unreplied
/// and 120 s once replied, anything else 30 s.
pub fn timeout_ms(proto: u8, replied: bool) -> u64 {
    match (proto, replied) {
        (6, true) => 432_000_000,
        (6, false) => 120_000,
        (17, false) => 30_000,
        (17, true) => 120_000,
        _ => 30_000,
    }
}

#[derive(Debug, Clone, Default)]
pub struct Conntrack {
    conns: BTreeMap<u64, Conn>,
    /// (zone, tuple as seen on the wire) -> (connection, is the reply direction).
    index: BTreeMap<(u16, Tuple), (u64, bool)>,
    /// (expiry, connection), so expiring costs what expires, not every connection.
    by_expiry: std::collections::BTreeSet<(u64, u64)>,
    next: u64,
}

/// What `ct` did to a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtResult {
    pub state: u128,
    pub conn: Option<u64>,
}

impl Conntrack {
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn connections(&self) -> impl Iterator<Item = &Conn> {
        self.conns.values()
    }

    fn remove(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id) {
            self.by_expiry.remove(&(c.expires_ms, id));
            self.index.remove(&(c.zone, c.orig));
            self.index.remove(&(c.zone, c.reply));
        }
    }

    /// Drops connections whose timeout has passed.
    pub fn expire(&mut self, now_ms: u64) {
        while let Some(&(at, id)) = self.by_expiry.first()
            && at <= now_ms
        {
            self.remove(id);
        }
    }

    /// `dpctl/flush-conntrack [zone=N] [original tuple]`: every connection of the zone, or the
    /// one whose original tuple is `orig`.
    pub fn flush(&mut self, zone: Option<u16>, orig: Option<Tuple>) -> usize {
        let gone: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| zone.is_none_or(|z| c.zone == z) && orig.is_none_or(|t| c.orig == t))
            .map(|(id, _)| *id)
            .collect();
        let n = gone.len();
        for id in gone {
            self.remove(id);
        }
        n
    }

    /// Forgets the connections of `zone` and `proto` that were NATed to `ip:port` (their reply
    /// comes from it) or are addressed to it directly: what a proxy flushes when an endpoint
    /// goes, so UDP flows stop reaching a dead backend.
    pub fn flush_endpoint(&mut self, zone: Option<u16>, proto: u8, ip: u32, port: u16) -> usize {
        let gone: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                zone.is_none_or(|z| c.zone == z)
                    && c.orig.proto == proto
                    && ((c.reply.src == ip && c.reply.sport == port)
                        || (c.orig.dst == ip && c.orig.dport == port))
            })
            .map(|(id, _)| *id)
            .collect();
        let n = gone.len();
        for id in gone {
            self.remove(id);
        }
        n
    }

    /// Runs `ct(zone, commit, nat, exec mark/label)` on `p` at `now_ms`: sets its ct fields,
    /// applies NAT, and (when `commit` and `record`) creates or updates the connection. With
    /// `record` false nothing is stored (a trace).
    #[allow(clippy::too_many_arguments)]
    pub fn execute(
        &mut self,
        p: &mut Packet,
        zone: u16,
        commit: bool,
        nat: Option<&Nat>,
        set_mark: Option<(u32, u32)>,
        set_label: Option<(u128, u128)>,
        now_ms: u64,
        record: bool,
    ) -> CtResult {
        if record {
            self.expire(now_ms);
        }
        let t = Tuple::of(p);
        let mut state;
        // A trace sees an expired entry as gone without removing it (it changes nothing).
        let found = self
            .index
            .get(&(zone, t))
            .copied()
            .filter(|(id, _)| self.conns[id].expires_ms > now_ms);
        let id = match found {
            Some((id, is_reply)) => {
                let c = self
                    .conns
                    .get_mut(&id)
                    .expect("index points at a connection");
                if is_reply && record {
                    c.replied = true;
                }
                state = TRK
                    | if is_reply {
                        RPL | EST
                    } else if c.replied {
                        EST
                    } else {
                        NEW
                    };
                if c.snat {
                    state |= SNAT;
                }
                if c.dnat {
                    state |= DNAT;
                }
                if nat.is_some() {
                    apply_nat(p, c, is_reply);
                }
                if commit && record {
                    apply_meta(c, set_mark, set_label);
                }
                if record {
                    let at = now_ms + timeout_ms(t.proto, c.replied);
                    self.by_expiry.remove(&(c.expires_ms, id));
                    self.by_expiry.insert((at, id));
                    c.expires_ms = at;
                }
                Some(id)
            }
            None => {
                state = TRK | NEW;
                let mut c = Conn {
                    zone,
                    orig: t,
                    reply: t.reversed(),
                    mark: 0,
                    label: 0,
                    replied: false,
                    snat: false,
                    dnat: false,
                    expires_ms: now_ms + timeout_ms(t.proto, false),
                };
                if commit && let Some(n) = nat.filter(|n| n.src.is_some()) {
                    let ip = n.ip_min.unwrap_or(0);
                    let port = n.port_min;
                    if n.src == Some(true) {
                        c.snat = true;
                        c.reply.dst = ip;
                        if let Some(pt) = port {
                            c.reply.dport = pt;
                        }
                        state |= SNAT;
                    } else {
                        c.dnat = true;
                        c.reply.src = ip;
                        if let Some(pt) = port {
                            c.reply.sport = pt;
                        }
                        state |= DNAT;
                    }
                    apply_nat(p, &c, false);
                }
                if commit {
                    apply_meta(&mut c, set_mark, set_label);
                    if record {
                        let id = self.next;
                        self.next += 1;
                        self.index.insert((zone, c.orig), (id, false));
                        self.index.insert((zone, c.reply), (id, true));
                        self.by_expiry.insert((c.expires_ms, id));
                        self.conns.insert(id, c);
                        Some(id)
                    } else {
                        None
                    }
                } else {
                    None
                }
            }
        };
        let conn = id.and_then(|i| self.conns.get(&i));
        p.set(Field::CtState, state);
        p.set(Field::CtZone, u128::from(zone));
        p.set(Field::CtMark, conn.map_or(0, |c| u128::from(c.mark)));
        p.set(Field::CtLabel, conn.map_or(0, |c| c.label));
        let orig = conn.map_or(t, |c| c.orig);
        p.set(Field::CtNwSrc, u128::from(orig.src));
        p.set(Field::CtNwDst, u128::from(orig.dst));
        p.set(Field::CtNwProto, u128::from(orig.proto));
        p.set(Field::CtTpSrc, u128::from(orig.sport));
        p.set(Field::CtTpDst, u128::from(orig.dport));
        CtResult { state, conn: id }
    }
}

fn apply_meta(c: &mut Conn, mark: Option<(u32, u32)>, label: Option<(u128, u128)>) {
    if let Some((v, m)) = mark {
        c.mark = (c.mark & !m) | (v & m);
    }
    if let Some((v, m)) = label {
        c.label = (c.label & !m) | (v & m);
    }
}

/// Rewrites `p` as the connection's NAT says: the original direction to the reply tuple's
/// reverse, the reply direction back to the original's reverse.
fn apply_nat(p: &mut Packet, c: &Conn, is_reply: bool) {
    if !(c.snat || c.dnat) {
        return;
    }
    let want = if is_reply {
        c.orig.reversed()
    } else {
        c.reply.reversed()
    };
    p.set(Field::IpSrc, u128::from(want.src));
    p.set(Field::IpDst, u128::from(want.dst));
    if matches!(want.proto, 6 | 17 | 132) {
        p.set(Field::TpSrc, u128::from(want.sport));
        p.set(Field::TpDst, u128::from(want.dport));
    }
}
