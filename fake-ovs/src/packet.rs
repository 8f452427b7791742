//! A packet as the pipeline sees it: the value of every field, in a fixed array (a lookup
//! reads a handful of slots, whatever the number of flows).

use nsx_core::ovs::Field;
use nsx_core::ovs::field::{format_masked, parse_masked};
use nsx_core::ovs::flow::{ETH_IP, Match};

pub const SLOTS: usize = 23 + 16;

/// The slot of a field's bits (protocol-specific port names share the L4 port slots).
pub fn slot(f: Field) -> usize {
    match f.storage() {
        Field::InPort => 0,
        Field::EthSrc => 1,
        Field::EthDst => 2,
        Field::VlanTci => 3,
        Field::EthType => 4,
        Field::IpSrc => 5,
        Field::IpDst => 6,
        Field::IpProto => 7,
        Field::IpTtl => 8,
        Field::TpSrc => 9,
        Field::TpDst => 10,
        Field::IcmpType => 11,
        Field::IcmpCode => 12,
        Field::CtState => 13,
        Field::CtZone => 14,
        Field::CtMark => 15,
        Field::CtLabel => 16,
        Field::CtNwSrc => 17,
        Field::CtNwDst => 18,
        Field::CtNwProto => 19,
        Field::CtTpSrc => 20,
        Field::CtTpDst => 21,
        Field::Metadata => 22,
        Field::Reg(n) => 23 + usize::from(n),
        // storage() maps these away.
        _ => 0,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Packet {
    pub v: [u128; SLOTS],
}

impl Default for Packet {
    fn default() -> Self {
        Self { v: [0; SLOTS] }
    }
}

impl Packet {
    pub fn get(&self, f: Field) -> u128 {
        let v = self.v[slot(f)];
        if f == Field::VlanVid { v & 0x1fff } else { v }
    }

    pub fn set(&mut self, f: Field, value: u128) {
        let s = slot(f);
        if f == Field::VlanVid {
            // vlan_vid writes VID and the "present" bit, keeping PCP.
            self.v[s] = (self.v[s] & 0xe000) | (value & 0x1fff);
        } else {
            self.v[s] = value & f.full_mask();
        }
    }

    /// Writes `value` into bits `ofs..ofs+bits` of `f`.
    pub fn set_bits(&mut self, f: Field, ofs: u32, bits: u32, value: u128) {
        let m = if bits >= 128 {
            u128::MAX
        } else {
            ((1u128 << bits) - 1) << ofs
        };
        let s = slot(f);
        self.v[s] = (self.v[s] & !m) | ((value << ofs) & m);
    }

    pub fn get_bits(&self, f: Field, ofs: u32, bits: u32) -> u128 {
        let m = if bits >= 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        };
        (self.v[slot(f)] >> ofs) & m
    }

    /// Whether `m` matches this packet.
    pub fn matches(&self, m: &Match) -> bool {
        m.fields
            .iter()
            .all(|(f, (v, mask))| self.v[slot(*f)] & mask == *v)
    }

    /// A packet from `ofproto/trace`-style text: `in_port=1,tcp,nw_src=10.0.0.1,tp_dst=80`
    /// (every field exact).
    pub fn parse(text: &str) -> Result<Packet, String> {
        let flow = nsx_core::ovs::parse_flow(&format!("{text},actions=drop"))
            .map_err(|e| e.to_string())?;
        let mut p = Packet::default();
        for (f, (v, _)) in &flow.matches.fields {
            p.v[slot(*f)] = *v;
        }
        if p.get(Field::EthType) == ETH_IP && p.get(Field::IpTtl) == 0 {
            p.set(Field::IpTtl, 64);
        }
        Ok(p)
    }

    /// The fields that are set, as `field=value` text.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let fields = [
            Field::InPort,
            Field::EthSrc,
            Field::EthDst,
            Field::VlanTci,
            Field::EthType,
            Field::IpSrc,
            Field::IpDst,
            Field::IpProto,
            Field::TpSrc,
            Field::TpDst,
            Field::CtState,
            Field::CtZone,
            Field::CtMark,
        ];
        for f in fields {
            let v = self.get(f);
            if v != 0 {
                parts.push(format!(
                    "{}={}",
                    f.match_name(),
                    format_masked(f, v, f.full_mask())
                ));
            }
        }
        for r in 0..16 {
            let v = self.get(Field::Reg(r));
            if v != 0 {
                parts.push(format!("reg{r}={v:#x}"));
            }
        }
        parts.join(",")
    }
}

/// Parses one `field=value` for tests and tools.
pub fn field_value(text: &str) -> Result<(Field, u128), String> {
    let (k, v) = text.split_once('=').ok_or("expected field=value")?;
    let f = Field::from_name(k).ok_or_else(|| format!("unknown field {k}"))?;
    let (v, _) = parse_masked(f, v)?;
    Ok((f, v))
}
