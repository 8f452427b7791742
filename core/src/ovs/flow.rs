//! Flows, actions and groups as OpenFlow 1.3 (with the Nicira extensions OVS adds) defines
//! them, and their text as OVS 3.1's `ovs-ofctl -O OpenFlow13 dump-flows` and
//! `-O OpenFlow15 dump-groups` print it.

use std::borrow::Cow;
use std::fmt::{self, Display, Write};

use super::field::{Field, format_masked, format_value};

/// Ethernet types and IP protocols with a shorthand in a match (`tcp` = `ip,nw_proto=6`).
pub const ETH_IP: u128 = 0x0800;
pub const ETH_ARP: u128 = 0x0806;
pub const ETH_IPV6: u128 = 0x86dd;

/// Fields with their (value, mask), sorted by field: a small map in one allocation (a match
/// has a handful of fields, and switches hold hundreds of thousands of matches).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FieldMap(Vec<(Field, (u128, u128))>);

impl FieldMap {
    fn position(&self, f: &Field) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.cmp(f))
    }

    pub fn get(&self, f: &Field) -> Option<&(u128, u128)> {
        self.position(f).ok().map(|i| &self.0[i].1)
    }

    pub fn insert(&mut self, f: Field, v: (u128, u128)) -> Option<(u128, u128)> {
        // Matches are mostly built in field order: append without a search.
        if self.0.last().is_none_or(|(last, _)| *last < f) {
            if self.0.capacity() == 0 {
                self.0.reserve_exact(4);
            }
            self.0.push((f, v));
            return None;
        }
        match self.position(&f) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, v)),
            Err(i) => {
                self.0.insert(i, (f, v));
                None
            }
        }
    }

    pub fn remove(&mut self, f: &Field) -> Option<(u128, u128)> {
        self.position(f).ok().map(|i| self.0.remove(i).1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Field, &(u128, u128))> {
        self.0.iter().map(|(f, v)| (f, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &Field> {
        self.0.iter().map(|(f, _)| f)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&Field, &mut (u128, u128)) -> bool) {
        self.0.retain_mut(|(f, v)| keep(f, v));
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a FieldMap {
    type Item = (&'a Field, &'a (u128, u128));
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Field, (u128, u128))>,
        fn(&'a (Field, (u128, u128))) -> (&'a Field, &'a (u128, u128)),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(f, v)| (f, v))
    }
}

/// A match: each constrained field with its value and mask (the value has no bit outside the
/// mask). An empty match matches every packet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Match {
    pub fields: FieldMap,
}

impl Match {
    pub fn get(&self, f: Field) -> Option<(u128, u128)> {
        self.fields.get(&f).copied()
    }

    /// Constrains `f`; a zero mask removes the constraint.
    pub fn set(&mut self, f: Field, value: u128, mask: u128) {
        let mask = mask & f.full_mask();
        if mask == 0 {
            self.fields.remove(&f);
        } else {
            self.fields.insert(f, (value & mask, mask));
        }
    }

    pub fn exact(&mut self, f: Field, value: u128) {
        self.set(f, value, f.full_mask());
    }

    /// A match of `(field, value, mask)` constraints, as `set` makes them, built in one
    /// allocation when they come in field order (as a compiler emits them; a proxy builds
    /// 100,000 matches in a full sync). Any order is accepted.
    pub fn from_constraints(constraints: &[(Field, u128, u128)]) -> Self {
        let mut fields = Vec::with_capacity(constraints.len());
        let mut last: Option<Field> = None;
        for (i, &(f, value, mask)) in constraints.iter().enumerate() {
            let mask = mask & f.full_mask();
            if mask == 0 || last.is_some_and(|l| l >= f) {
                // Out of order or a removal: the general path for the rest.
                let mut m = Match {
                    fields: FieldMap(fields),
                };
                for &(f, v, mask) in &constraints[i..] {
                    m.set(f, v, mask);
                }
                return m;
            }
            fields.push((f, (value & mask, mask)));
            last = Some(f);
        }
        Match {
            fields: FieldMap(fields),
        }
    }

    fn exact_value(&self, f: Field) -> Option<u128> {
        self.get(f)
            .filter(|(_, m)| *m == f.full_mask())
            .map(|(v, _)| v)
    }

    /// The mask signature: which fields with which masks (the key of a tuple-space subtable).
    pub fn signature(&self) -> Vec<(Field, u128)> {
        self.fields.iter().map(|(f, (_, m))| (*f, *m)).collect()
    }
}

impl Display for Match {
    /// The match as `dump-flows` prints it (without `priority`).
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        let put = |f: Field, parts: &mut Vec<String>| {
            if let Some((v, m)) = self.get(f) {
                parts.push(format!("{}={}", f.match_name(), format_masked(f, v, m)));
            }
        };
        for f in super::field::CT_FIELDS {
            put(f, &mut parts);
        }
        let eth = self.exact_value(Field::EthType);
        let proto = self.exact_value(Field::IpProto);
        let mut skip_type = false;
        let mut skip_proto = false;
        match eth {
            Some(ETH_IP) => {
                skip_type = true;
                let short = match proto {
                    Some(1) => Some("icmp"),
                    Some(6) => Some("tcp"),
                    Some(17) => Some("udp"),
                    Some(132) => Some("sctp"),
                    _ => None,
                };
                match short {
                    Some(s) => {
                        skip_proto = true;
                        parts.push(s.into());
                    }
                    None => parts.push("ip".into()),
                }
            }
            Some(ETH_IPV6) => {
                skip_type = true;
                let short = match proto {
                    Some(58) => Some("icmp6"),
                    Some(6) => Some("tcp6"),
                    Some(17) => Some("udp6"),
                    Some(132) => Some("sctp6"),
                    _ => None,
                };
                match short {
                    Some(s) => {
                        skip_proto = true;
                        parts.push(s.into());
                    }
                    None => parts.push("ipv6".into()),
                }
            }
            Some(ETH_ARP) => {
                skip_type = true;
                parts.push("arp".into());
            }
            _ => {}
        }
        for r in 0..16 {
            put(Field::Reg(r), &mut parts);
        }
        put(Field::Metadata, &mut parts);
        put(Field::InPort, &mut parts);
        if let Some((v, m)) = self.get(Field::VlanTci) {
            if m == 0x1fff && v & 0x1000 != 0 {
                parts.push(format!("dl_vlan={}", v & 0xfff));
            } else {
                parts.push(format!("vlan_tci={}", format_masked(Field::VlanTci, v, m)));
            }
        }
        put(Field::EthSrc, &mut parts);
        put(Field::EthDst, &mut parts);
        if !skip_type {
            put(Field::EthType, &mut parts);
        }
        put(Field::IpSrc, &mut parts);
        put(Field::IpDst, &mut parts);
        if !skip_proto {
            put(Field::IpProto, &mut parts);
        }
        put(Field::IpTtl, &mut parts);
        if proto == Some(1) {
            put(Field::IcmpType, &mut parts);
            put(Field::IcmpCode, &mut parts);
        } else {
            put(Field::TpSrc, &mut parts);
            put(Field::TpDst, &mut parts);
        }
        out.write_str(&parts.join(","))
    }
}

/// A bit range of a field, `NXM_NX_REG0[0..15]`; `[]` is the whole field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subfield {
    pub field: Field,
    pub ofs: u32,
    pub bits: u32,
}

impl Subfield {
    pub fn whole(field: Field) -> Self {
        Self {
            field,
            ofs: 0,
            bits: field.bits(),
        }
    }

    pub fn is_whole(&self) -> bool {
        self.ofs == 0 && self.bits == self.field.bits()
    }

    pub fn mask(&self) -> u128 {
        let m = if self.bits >= 128 {
            u128::MAX
        } else {
            (1u128 << self.bits) - 1
        };
        m << self.ofs
    }
}

impl Display for Subfield {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.field.nxm_name();
        if self.is_whole() {
            write!(f, "{name}[]")
        } else if self.bits == 1 {
            write!(f, "{name}[{}]", self.ofs)
        } else {
            write!(f, "{name}[{}..{}]", self.ofs, self.ofs + self.bits - 1)
        }
    }
}

/// The zone of a `ct` action: a number or the bits of a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CtZone {
    Imm(u16),
    Field(Subfield),
}

/// `nat(src=a-b:p-q,random)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Nat {
    /// `Some(true)` = src, `Some(false)` = dst, `None` = plain `nat` (un-NAT by the connection).
    pub src: Option<bool>,
    pub ip_min: Option<u32>,
    pub ip_max: Option<u32>,
    pub port_min: Option<u16>,
    pub port_max: Option<u16>,
    pub flags: Vec<String>,
}

/// One spec of a `learn` action.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LearnSpec {
    /// Match the new flow's `dst` against this packet's `src` bits (`NXM_OF_IP_SRC[]`).
    MatchField {
        dst: Subfield,
        src: Subfield,
    },
    /// Match the new flow's `dst` against a constant (`eth_type=0x800`).
    MatchImm {
        dst: Subfield,
        value: u128,
    },
    /// The new flow loads this packet's `src` bits into `dst`.
    LoadField {
        dst: Subfield,
        src: Subfield,
    },
    LoadImm {
        dst: Subfield,
        value: u128,
    },
    /// The new flow outputs to the port in `src`.
    Output {
        src: Subfield,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Learn {
    pub table: u8,
    pub idle_timeout: u16,
    pub hard_timeout: u16,
    pub fin_idle_timeout: u16,
    pub fin_hard_timeout: u16,
    pub priority: u16,
    pub cookie: u64,
    pub delete_learned: bool,
    pub specs: Vec<LearnSpec>,
}

/// An action.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Output(u32),
    InPort,
    Controller(u16),
    Normal,
    Group(u32),
    GotoTable(u8),
    Resubmit {
        port: Option<u32>,
        table: Option<u8>,
    },
    PushVlan(u16),
    PopVlan,
    /// `set_field:V->field` of a whole field (the form OVS prints for full-width writes).
    SetField {
        field: Field,
        value: u128,
    },
    /// `load:V->NXM_..[a..b]` of part of a field.
    Load {
        dst: Subfield,
        value: u128,
    },
    Move {
        src: Subfield,
        dst: Subfield,
    },
    Ct {
        commit: bool,
        table: Option<u8>,
        zone: Option<CtZone>,
        exec: Vec<Action>,
        nat: Option<Nat>,
    },
    CtClear,
    DecTtl,
    Learn(Box<Learn>),
}

fn nat_text(n: &Nat) -> String {
    let mut s = String::from("nat");
    if let Some(src) = n.src {
        s.push('(');
        s.push_str(if src { "src" } else { "dst" });
        if let Some(a) = n.ip_min {
            let _ = write!(s, "={}", std::net::Ipv4Addr::from(a));
            if let Some(b) = n.ip_max.filter(|b| *b != a) {
                let _ = write!(s, "-{}", std::net::Ipv4Addr::from(b));
            }
            if let Some(p) = n.port_min {
                let _ = write!(s, ":{p}");
                if let Some(q) = n.port_max.filter(|q| *q != p) {
                    let _ = write!(s, "-{q}");
                }
            }
        }
        for f in &n.flags {
            let _ = write!(s, ",{f}");
        }
        s.push(')');
    }
    s
}

fn learn_value(dst: &Subfield, value: u128) -> String {
    if dst.is_whole() {
        let v = match dst.field.style() {
            super::field::Style::Hex4 => format!("{value:#x}"),
            _ => format_value(dst.field, value),
        };
        format!("{}={v}", dst.field.match_name_learn())
    } else {
        format!("{dst}={value:#x}")
    }
}

impl Field {
    /// `learn` prints immediate matches with the OpenFlow name (`eth_type`, `nw_proto`).
    fn match_name_learn(self) -> String {
        match self {
            Field::IpProto => "nw_proto".into(),
            other => other.name(),
        }
    }
}

impl Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // A reserved port prints by name, as `ovs-ofctl dump-flows` does.
            Action::Output(p) if *p == super::field::LOCAL_PORT => f.write_str("LOCAL"),
            Action::Output(p) => write!(f, "output:{p}"),
            Action::InPort => f.write_str("IN_PORT"),
            Action::Controller(n) => write!(f, "CONTROLLER:{n}"),
            Action::Normal => f.write_str("NORMAL"),
            Action::Group(g) => write!(f, "group:{g}"),
            Action::GotoTable(t) => write!(f, "goto_table:{t}"),
            Action::Resubmit { port, table } => {
                let p = port.map(|p| p.to_string()).unwrap_or_default();
                let t = table.map(|t| t.to_string()).unwrap_or_default();
                write!(f, "resubmit({p},{t})")
            }
            Action::PushVlan(t) => write!(f, "push_vlan:{t:#x}"),
            Action::PopVlan => f.write_str("pop_vlan"),
            Action::SetField { field, value } => {
                write!(
                    f,
                    "set_field:{}->{}",
                    format_value(*field, *value),
                    field.name()
                )
            }
            Action::Load { dst, value } => write!(f, "load:{value:#x}->{dst}"),
            Action::Move { src, dst } => write!(f, "move:{src}->{dst}"),
            Action::Ct {
                commit,
                table,
                zone,
                exec,
                nat,
            } => {
                let mut parts: Vec<String> = Vec::new();
                if *commit {
                    parts.push("commit".into());
                }
                if let Some(t) = table {
                    parts.push(format!("table={t}"));
                }
                match zone {
                    Some(CtZone::Imm(z)) => parts.push(format!("zone={z}")),
                    Some(CtZone::Field(s)) => parts.push(format!("zone={s}")),
                    None => {}
                }
                // OVS 3.1 prints nat inside exec(...) when there is an exec.
                let nat = nat.as_ref().map(nat_text);
                if exec.is_empty() {
                    parts.extend(nat);
                } else {
                    let mut inner: Vec<String> = exec.iter().map(|a| a.to_string()).collect();
                    inner.extend(nat);
                    parts.push(format!("exec({})", inner.join(",")));
                }
                write!(f, "ct({})", parts.join(","))
            }
            Action::CtClear => f.write_str("ct_clear"),
            Action::DecTtl => f.write_str("dec_ttl"),
            Action::Learn(l) => {
                let mut parts = vec![format!("table={}", l.table)];
                if l.idle_timeout > 0 {
                    parts.push(format!("idle_timeout={}", l.idle_timeout));
                }
                if l.hard_timeout > 0 {
                    parts.push(format!("hard_timeout={}", l.hard_timeout));
                }
                if l.fin_idle_timeout > 0 {
                    parts.push(format!("fin_idle_timeout={}", l.fin_idle_timeout));
                }
                if l.fin_hard_timeout > 0 {
                    parts.push(format!("fin_hard_timeout={}", l.fin_hard_timeout));
                }
                if l.priority != 32768 {
                    parts.push(format!("priority={}", l.priority));
                }
                if l.delete_learned {
                    parts.push("delete_learned".into());
                }
                if l.cookie != 0 {
                    parts.push(format!("cookie={:#x}", l.cookie));
                }
                for s in &l.specs {
                    parts.push(match s {
                        LearnSpec::MatchField { dst, src } if dst == src => dst.to_string(),
                        LearnSpec::MatchField { dst, src } => format!("{dst}={src}"),
                        LearnSpec::MatchImm { dst, value } => learn_value(dst, *value),
                        LearnSpec::LoadField { dst, src } => format!("load:{src}->{dst}"),
                        LearnSpec::LoadImm { dst, value } => format!("load:{value:#x}->{dst}"),
                        LearnSpec::Output { src } => format!("output:{src}"),
                    });
                }
                write!(f, "learn({})", parts.join(","))
            }
        }
    }
}

/// A flow: where it is, what it matches, what it does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    pub cookie: u64,
    pub table: u8,
    pub priority: u16,
    pub idle_timeout: u16,
    pub hard_timeout: u16,
    pub matches: Match,
    pub actions: Vec<Action>,
}

impl Default for Flow {
    fn default() -> Self {
        Self {
            cookie: 0,
            table: 0,
            priority: 32768,
            idle_timeout: 0,
            hard_timeout: 0,
            matches: Match::default(),
            actions: Vec::new(),
        }
    }
}

/// Per-flow counters, printed by `dump-flows` with statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub duration_ms: u64,
    pub n_packets: u64,
    pub n_bytes: u64,
}

pub(crate) fn actions_text(actions: &[Action]) -> String {
    if actions.is_empty() {
        "drop".into()
    } else {
        actions
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Flow {
    /// The match part with `priority=` first, as `dump-flows` prints it.
    fn match_text(&self) -> String {
        let m = self.matches.to_string();
        match (self.priority != 32768, m.is_empty()) {
            (true, true) => format!("priority={}", self.priority),
            (true, false) => format!("priority={},{m}", self.priority),
            (false, _) => m,
        }
    }

    fn timeouts(&self) -> String {
        let mut s = String::new();
        if self.idle_timeout > 0 {
            let _ = write!(s, "idle_timeout={}, ", self.idle_timeout);
        }
        if self.hard_timeout > 0 {
            let _ = write!(s, "hard_timeout={}, ", self.hard_timeout);
        }
        s
    }

    /// One line of `ovs-ofctl -O OpenFlow13 dump-flows --no-stats` (without the leading
    /// space): fields at their defaults are left out.
    pub fn to_dump_no_stats(&self) -> String {
        let mut s = String::new();
        if self.cookie != 0 {
            let _ = write!(s, "cookie={:#x}, ", self.cookie);
        }
        if self.table != 0 {
            let _ = write!(s, "table={}, ", self.table);
        }
        s.push_str(&self.timeouts());
        let m = self.match_text();
        if m.is_empty() {
            let _ = write!(s, "actions={}", actions_text(&self.actions));
        } else {
            let _ = write!(s, "{m} actions={}", actions_text(&self.actions));
        }
        s
    }

    /// One line of `ovs-ofctl -O OpenFlow13 dump-flows` (without the leading space).
    pub fn to_dump(&self, stats: &FlowStats) -> String {
        let m = self.match_text();
        format!(
            "cookie={:#x}, duration={}.{:03}s, table={}, n_packets={}, n_bytes={}, {}{}{}actions={}",
            self.cookie,
            stats.duration_ms / 1000,
            stats.duration_ms % 1000,
            self.table,
            stats.n_packets,
            stats.n_bytes,
            self.timeouts(),
            m,
            if m.is_empty() { "" } else { " " },
            actions_text(&self.actions)
        )
    }
}

impl Display for Flow {
    /// `add-flow` text that OVS accepts and that parses back to the same flow.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut head = Vec::new();
        if self.cookie != 0 {
            head.push(format!("cookie={:#x}", self.cookie));
        }
        if self.table != 0 {
            head.push(format!("table={}", self.table));
        }
        if self.idle_timeout > 0 {
            head.push(format!("idle_timeout={}", self.idle_timeout));
        }
        if self.hard_timeout > 0 {
            head.push(format!("hard_timeout={}", self.hard_timeout));
        }
        let m = self.match_text();
        if !m.is_empty() {
            head.push(m);
        }
        head.push(format!("actions={}", actions_text(&self.actions)));
        f.write_str(&head.join(","))
    }
}

/// Group types this model knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GroupType {
    All,
    Select,
    Indirect,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bucket {
    pub bucket_id: u32,
    pub weight: u16,
    pub actions: Vec<Action>,
}

/// A group. `selection_method=hash` with `fields` hashes those fields to pick a bucket (OVS's
/// own extension; `ofproto/trace` follows it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Group {
    pub group_id: u32,
    pub group_type: GroupType,
    /// Borrowed when a compiler names a constant (`hash`): a proxy makes a group per
    /// service port, and these strings were a third of a group's allocations.
    pub selection_method: Option<Cow<'static, str>>,
    /// The hashed fields, by the names they were given (`ip_src`, `tcp_src`).
    pub fields: Vec<Cow<'static, str>>,
    pub buckets: Vec<Bucket>,
}

impl Display for Group {
    /// As `ovs-ofctl -O OpenFlow15 dump-groups` prints it (and `add-group` accepts).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = match self.group_type {
            GroupType::All => "all",
            GroupType::Select => "select",
            GroupType::Indirect => "indirect",
        };
        write!(f, "group_id={},type={t}", self.group_id)?;
        if let Some(m) = &self.selection_method {
            write!(f, ",selection_method={m}")?;
        }
        if !self.fields.is_empty() {
            write!(f, ",fields({})", self.fields.join(","))?;
        }
        for b in &self.buckets {
            write!(f, ",bucket=bucket_id:{}", b.bucket_id)?;
            if self.group_type == GroupType::Select {
                write!(f, ",weight:{}", b.weight)?;
            }
            write!(f, ",actions={}", actions_text(&b.actions))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn by_set(constraints: &[(Field, u128, u128)]) -> Match {
        let mut m = Match::default();
        for &(f, v, mask) in constraints {
            m.set(f, v, mask);
        }
        m
    }

    #[test]
    fn a_match_from_constraints_is_the_one_set_builds_in_any_order() {
        let cases: Vec<Vec<(Field, u128, u128)>> = vec![
            // In field order, with a partial mask and a value outside its mask.
            vec![
                (Field::EthType, 0x0800, u128::MAX),
                (Field::IpProto, 6, u128::MAX),
                (Field::Reg(0), 0x0a01_0203, u128::MAX),
                (Field::Reg(1), 0x1_1f90, 0xffff),
            ],
            // Out of order, a field twice (the last wins) and a zero mask removing one.
            vec![
                (Field::Reg(1), 80, 0xffff),
                (Field::EthType, 0x0800, u128::MAX),
                (Field::Reg(1), 443, 0xffff),
                (Field::IpProto, 17, u128::MAX),
                (Field::IpProto, 0, 0),
            ],
            // A mask wider than the field is cut to it.
            vec![(Field::IpDst, 0x0a00_0001, u128::MAX)],
            vec![],
        ];
        for c in cases {
            let m = Match::from_constraints(&c);
            assert_eq!(m, by_set(&c), "{c:?}");
            let fields: Vec<&Field> = m.fields.keys().collect();
            assert!(fields.windows(2).all(|w| w[0] < w[1]), "sorted: {m:?}");
        }
    }
}
