//! OpenFlow 1.5 spoken directly to ovs-vswitchd on its management socket (`<bridge>.mgmt`):
//! the flow and group messages of a sync go out as one atomic, ordered bundle
//! (`OFPT_BUNDLE_CONTROL` open, `OFPT_BUNDLE_ADD_MESSAGE` per message, commit), encoded from the
//! flow model without the text round trip through `ovs-ofctl`, whose parsing of every flow
//! costs more than the switch's own work on large bundles.
//!
//! Matches use OXM for the OpenFlow fields and Nicira's NXM classes for registers, conntrack
//! fields, `vlan_tci` and the TTL; actions are OpenFlow 1.5 actions plus Nicira extensions
//! (`resubmit`, `load`, `move`, `ct` with `nat`, `ct_clear`, `learn`). Select groups carry
//! their selection method in the Netronome group property OVS defines for it. Everything the
//! flow model can express is encoded; what it cannot is an error before anything is sent.
//!
//! A refused message names its index in the bundle: OVS answers an error with the xid of the
//! bundle-add that carried it, and discards the whole bundle.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nsx_core::ovs::bridge::{BridgeError, OfOp};
use nsx_core::ovs::field::Field;
use nsx_core::ovs::flow::{
    Action, Bucket, CtZone, Flow, Group, GroupType, Learn, LearnSpec, Match, Nat, Subfield,
};

const VERSION: u8 = 0x06;
const OFPT_HELLO: u8 = 0;
const OFPT_ERROR: u8 = 1;
const OFPT_ECHO_REQUEST: u8 = 2;
const OFPT_ECHO_REPLY: u8 = 3;
const OFPT_SET_CONFIG: u8 = 9;
const OFPT_PACKET_IN: u8 = 10;
const OFPT_PACKET_OUT: u8 = 13;
const OFPT_FLOW_MOD: u8 = 14;
const OFPT_BARRIER_REQUEST: u8 = 20;
const OFPT_BARRIER_REPLY: u8 = 21;
const OFPT_GROUP_MOD: u8 = 15;
const OFPT_BUNDLE_CONTROL: u8 = 33;
const OFPT_BUNDLE_ADD_MESSAGE: u8 = 34;

const BUNDLE_OPEN_REQUEST: u16 = 0;
const BUNDLE_COMMIT_REQUEST: u16 = 4;
const BUNDLE_DISCARD_REQUEST: u16 = 6;
const BUNDLE_ATOMIC: u16 = 1;
const BUNDLE_ORDERED: u16 = 2;

const NX_VENDOR_ID: u32 = 0x0000_2320;
const NTR_VENDOR_ID: u32 = 0x0000_154d;

const OFPP_IN_PORT: u32 = 0xffff_fff8;
const OFPP_NORMAL: u32 = 0xffff_fffa;
const OFPP_CONTROLLER: u32 = 0xffff_fffd;
const OFPP_ANY: u32 = 0xffff_ffff;
const OFPG_ANY: u32 = 0xffff_ffff;

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode {what} in OpenFlow 1.5")]
pub struct EncodeError {
    pub what: String,
}

impl From<EncodeError> for BridgeError {
    fn from(e: EncodeError) -> Self {
        BridgeError {
            index: 0,
            message: e.to_string(),
        }
    }
}

fn unsupported(what: impl Into<String>) -> EncodeError {
    EncodeError { what: what.into() }
}

/// Where a field lives on the wire: class, field number, length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    class: u16,
    field: u8,
    len: u8,
}

impl Header {
    const fn basic(field: u8, len: u8) -> Self {
        Self {
            class: 0x8000,
            field,
            len,
        }
    }
    const fn nxm0(field: u8, len: u8) -> Self {
        Self {
            class: 0x0000,
            field,
            len,
        }
    }
    const fn nxm1(field: u8, len: u8) -> Self {
        Self {
            class: 0x0001,
            field,
            len,
        }
    }

    fn word(self, masked: bool) -> u32 {
        let len = if masked { self.len * 2 } else { self.len };
        (u32::from(self.class) << 16)
            | (u32::from(self.field) << 9)
            | (u32::from(masked) << 8)
            | u32::from(len)
    }
}

/// The wire header of `field`. The generic transport ports take the protocol the match gives.
fn header(field: Field, proto: Option<u8>) -> Result<Header, EncodeError> {
    let by_proto = |tcp: u8, udp: u8, sctp: u8, name: &str| match proto {
        Some(6) => Ok(Header::basic(tcp, 2)),
        Some(17) => Ok(Header::basic(udp, 2)),
        Some(132) => Ok(Header::basic(sctp, 2)),
        _ => Err(unsupported(format!(
            "{name} without a TCP, UDP or SCTP ip_proto"
        ))),
    };
    Ok(match field {
        Field::InPort => Header::basic(0, 4),
        Field::Metadata => Header::basic(2, 8),
        Field::EthDst => Header::basic(3, 6),
        Field::EthSrc => Header::basic(4, 6),
        Field::EthType => Header::basic(5, 2),
        Field::VlanVid => Header::basic(6, 2),
        Field::VlanTci => Header::nxm0(4, 2),
        Field::IpProto => Header::basic(10, 1),
        Field::IpSrc => Header::basic(11, 4),
        Field::IpDst => Header::basic(12, 4),
        Field::TcpSrc => Header::basic(13, 2),
        Field::TcpDst => Header::basic(14, 2),
        Field::UdpSrc => Header::basic(15, 2),
        Field::UdpDst => Header::basic(16, 2),
        Field::SctpSrc => Header::basic(17, 2),
        Field::SctpDst => Header::basic(18, 2),
        Field::TpSrc => by_proto(13, 15, 17, "tp_src")?,
        Field::TpDst => by_proto(14, 16, 18, "tp_dst")?,
        Field::IcmpType => Header::basic(19, 1),
        Field::IcmpCode => Header::basic(20, 1),
        Field::IpTtl => Header::nxm1(29, 1),
        Field::Reg(n) if n < 16 => Header::nxm1(n, 4),
        Field::Reg(n) => return Err(unsupported(format!("reg{n}"))),
        Field::CtState => Header::nxm1(105, 4),
        Field::CtZone => Header::nxm1(106, 2),
        Field::CtMark => Header::nxm1(107, 4),
        Field::CtLabel => Header::nxm1(108, 16),
        Field::CtNwProto => Header::nxm1(119, 1),
        Field::CtNwSrc => Header::nxm1(120, 4),
        Field::CtNwDst => Header::nxm1(121, 4),
        Field::CtTpSrc => Header::nxm1(124, 2),
        Field::CtTpDst => Header::nxm1(125, 2),
    })
}

/// A growing message with big-endian writers.
#[derive(Default)]
struct Buf(Vec<u8>);

impl Buf {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn zeros(&mut self, n: usize) {
        self.0.resize(self.0.len() + n, 0);
    }
    /// The low `len` bytes of `v`, big-endian.
    fn value(&mut self, v: u128, len: u8) {
        let bytes = v.to_be_bytes();
        self.0.extend_from_slice(&bytes[16 - usize::from(len)..]);
    }
    fn pad8(&mut self, from: usize) {
        let n = (self.0.len() - from) % 8;
        if n != 0 {
            self.zeros(8 - n);
        }
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn set_u16(&mut self, at: usize, v: u16) {
        self.0[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
}

fn len16(n: usize, what: &str) -> Result<u16, EncodeError> {
    u16::try_from(n).map_err(|_| unsupported(format!("{what} of {n} bytes")))
}

/// Starts an OpenFlow message; [`finish`] writes its length.
fn start(b: &mut Buf, kind: u8, xid: u32) -> usize {
    let at = b.len();
    b.u8(VERSION);
    b.u8(kind);
    b.u16(0);
    b.u32(xid);
    at
}

/// Writes the length of the message, action or instruction that starts at `at` (its length
/// field is the second 16-bit word in all of them).
fn close(b: &mut Buf, at: usize, what: &str) -> Result<(), EncodeError> {
    let n = len16(b.len() - at, what)?;
    b.set_u16(at + 2, n);
    Ok(())
}

fn finish(b: &mut Buf, at: usize) -> Result<(), EncodeError> {
    close(b, at, "a message")
}

fn oxm(
    b: &mut Buf,
    field: Field,
    value: u128,
    mask: u128,
    proto: Option<u8>,
) -> Result<(), EncodeError> {
    let h = header(field, proto)?;
    let full = field.full_mask();
    let masked = mask & full != full;
    let value = if field == Field::InPort {
        u128::from(ofp11_port(value as u32))
    } else {
        value
    };
    b.u32(h.word(masked));
    b.value(value, h.len);
    if masked {
        b.value(mask, h.len);
    }
    Ok(())
}

fn write_match(b: &mut Buf, m: &Match) -> Result<(), EncodeError> {
    let at = b.len();
    b.u16(1); // OFPMT_OXM
    b.u16(0);
    let proto = m.get(Field::IpProto).map(|(v, _)| v as u8);
    for (f, (v, mask)) in m.fields.iter() {
        oxm(b, *f, *v, *mask, proto)?;
    }
    close(b, at, "a match")?;
    b.pad8(at);
    Ok(())
}

/// A Nicira action's header; returns where it starts (its length is written by [`end_action`]).
fn nx_action(b: &mut Buf, subtype: u16) -> usize {
    let at = b.len();
    b.u16(0xffff);
    b.u16(0);
    b.u32(NX_VENDOR_ID);
    b.u16(subtype);
    at
}

fn end_action(b: &mut Buf, at: usize) -> Result<(), EncodeError> {
    b.pad8(at);
    close(b, at, "an action")
}

/// `OFPAT_SET_FIELD` of `value` under `mask` (OpenFlow 1.5 takes a mask: a partial write).
fn set_field(b: &mut Buf, field: Field, value: u128, mask: u128) -> Result<(), EncodeError> {
    let at = b.len();
    b.u16(25);
    b.u16(0);
    oxm(b, field, value, mask, None)?;
    end_action(b, at)
}

fn nxm_header(field: Field) -> Result<u32, EncodeError> {
    Ok(header(field, None)?.word(false))
}

fn ofs_nbits(s: &Subfield) -> u16 {
    ((s.ofs as u16) << 6) | (s.bits.saturating_sub(1) as u16 & 0x3f)
}

/// A port number as OpenFlow 1.1+ carries it: the model numbers reserved ports as OpenFlow
/// 1.0 and OVS do (`LOCAL` is 0xfffe), the wire as 0xffffff00 and up.
fn ofp11_port(port: u32) -> u32 {
    if (0xff00..=0xffff).contains(&port) {
        port + 0xffff_0000
    } else {
        port
    }
}

fn output(b: &mut Buf, port: u32, max_len: u16) {
    let port = ofp11_port(port);
    b.u16(0); // OFPAT_OUTPUT
    b.u16(16);
    b.u32(port);
    b.u16(max_len);
    b.zeros(6);
}

fn write_actions(b: &mut Buf, actions: &[Action]) -> Result<(), EncodeError> {
    for a in actions {
        write_action(b, a)?;
    }
    Ok(())
}

fn write_action(b: &mut Buf, a: &Action) -> Result<(), EncodeError> {
    match a {
        Action::Output(p) => output(b, *p, 0),
        Action::InPort => output(b, OFPP_IN_PORT, 0),
        Action::Normal => output(b, OFPP_NORMAL, 0),
        Action::Controller(n) => output(b, OFPP_CONTROLLER, *n),
        Action::Group(g) => {
            b.u16(22);
            b.u16(8);
            b.u32(*g);
        }
        Action::GotoTable(_) => return Err(unsupported("goto_table before the last action")),
        Action::Resubmit { port, table } => {
            let at = nx_action(b, 14);
            let port = match port {
                Some(p) => {
                    u16::try_from(*p).map_err(|_| unsupported(format!("resubmit port {p}")))?
                }
                None => 0xfff8, // OFPP_IN_PORT, OpenFlow 1.0 numbering
            };
            b.u16(port);
            b.u8(table.unwrap_or(0xff));
            b.zeros(3);
            end_action(b, at)?;
        }
        Action::PushVlan(t) => {
            b.u16(17);
            b.u16(8);
            b.u16(*t);
            b.zeros(2);
        }
        Action::PopVlan => {
            b.u16(18);
            b.u16(8);
            b.zeros(4);
        }
        Action::DecTtl => {
            b.u16(24);
            b.u16(8);
            b.zeros(4);
        }
        Action::SetField { field, value } => set_field(b, *field, *value, field.full_mask())?,
        // OpenFlow 1.5 has no NXAST_REG_LOAD: a masked set_field.
        Action::Load { dst, value } => {
            set_field(b, dst.field, (*value << dst.ofs) & dst.mask(), dst.mask())?
        }
        Action::Move { src, dst } => {
            // OFPAT_COPY_FIELD (OpenFlow 1.5 has no NXAST_REG_MOVE).
            let at = b.len();
            b.u16(28);
            b.u16(0);
            b.u16(src.bits as u16);
            b.u16(src.ofs as u16);
            b.u16(dst.ofs as u16);
            b.zeros(2);
            b.u32(nxm_header(src.field)?);
            b.u32(nxm_header(dst.field)?);
            end_action(b, at)?;
        }
        Action::Ct {
            commit,
            table,
            zone,
            exec,
            nat,
        } => {
            let at = nx_action(b, 35);
            b.u16(u16::from(*commit));
            match zone {
                None => {
                    b.u32(0);
                    b.u16(0);
                }
                Some(CtZone::Imm(z)) => {
                    b.u32(0);
                    b.u16(*z);
                }
                Some(CtZone::Field(s)) => {
                    b.u32(nxm_header(s.field)?);
                    b.u16(ofs_nbits(s));
                }
            }
            b.u8(table.unwrap_or(0xff));
            b.zeros(3);
            b.u16(0); // alg
            // Nested actions as OVS orders them: exec's, then nat.
            write_actions(b, exec)?;
            if let Some(n) = nat {
                write_nat(b, n)?;
            }
            end_action(b, at)?;
        }
        Action::CtClear => {
            let at = nx_action(b, 43);
            b.zeros(6);
            end_action(b, at)?;
        }
        Action::Learn(l) => write_learn(b, l)?,
    }
    Ok(())
}

fn write_nat(b: &mut Buf, n: &Nat) -> Result<(), EncodeError> {
    let at = nx_action(b, 36);
    b.zeros(2);
    let mut flags = match n.src {
        Some(true) => 1,
        Some(false) => 2,
        None => 0,
    };
    for f in &n.flags {
        flags |= match f.as_str() {
            "persistent" => 4,
            "hash" => 8,
            "random" => 16,
            other => return Err(unsupported(format!("nat flag {other}"))),
        };
    }
    b.u16(flags);
    let mut present = 0u16;
    if n.ip_min.is_some() {
        present |= 1;
    }
    if n.ip_max.is_some_and(|m| Some(m) != n.ip_min) {
        present |= 2;
    }
    if n.port_min.is_some() {
        present |= 16;
    }
    if n.port_max.is_some_and(|m| Some(m) != n.port_min) {
        present |= 32;
    }
    b.u16(present);
    if let Some(ip) = n.ip_min {
        b.u32(ip);
    }
    if present & 2 != 0 {
        b.u32(n.ip_max.unwrap_or_default());
    }
    if let Some(p) = n.port_min {
        b.u16(p);
    }
    if present & 32 != 0 {
        b.u16(n.port_max.unwrap_or_default());
    }
    end_action(b, at)
}

fn write_learn(b: &mut Buf, l: &Learn) -> Result<(), EncodeError> {
    let at = nx_action(b, 16);
    b.u16(l.idle_timeout);
    b.u16(l.hard_timeout);
    b.u16(l.priority);
    b.u64(l.cookie);
    b.u16(if l.delete_learned { 2 } else { 0 });
    b.u8(l.table);
    b.u8(0);
    b.u16(l.fin_idle_timeout);
    b.u16(l.fin_hard_timeout);
    let field = |b: &mut Buf, s: &Subfield| -> Result<(), EncodeError> {
        b.u32(nxm_header(s.field)?);
        b.u16(s.ofs as u16);
        Ok(())
    };
    let imm = |b: &mut Buf, v: u128, bits: u32| {
        let bytes = bits.div_ceil(16) as usize * 2;
        let all = v.to_be_bytes();
        b.0.extend_from_slice(&all[16 - bytes..]);
    };
    for s in &l.specs {
        // header: src_type (bit 13: immediate), dst_type (bits 11-12), n_bits (0-10).
        match s {
            LearnSpec::MatchField { dst, src } => {
                b.u16(dst.bits as u16);
                field(b, src)?;
                field(b, dst)?;
            }
            LearnSpec::MatchImm { dst, value } => {
                b.u16((1 << 13) | dst.bits as u16);
                imm(b, *value, dst.bits);
                field(b, dst)?;
            }
            LearnSpec::LoadField { dst, src } => {
                b.u16((1 << 11) | dst.bits as u16);
                field(b, src)?;
                field(b, dst)?;
            }
            LearnSpec::LoadImm { dst, value } => {
                b.u16((1 << 13) | (1 << 11) | dst.bits as u16);
                imm(b, *value, dst.bits);
                field(b, dst)?;
            }
            LearnSpec::Output { src } => {
                b.u16((2 << 11) | src.bits as u16);
                field(b, src)?;
            }
        }
    }
    end_action(b, at)
}

/// Actions as OpenFlow 1.5 instructions: apply-actions, then goto-table when it ends them.
fn write_instructions(b: &mut Buf, actions: &[Action]) -> Result<(), EncodeError> {
    let (body, goto) = match actions.split_last() {
        Some((Action::GotoTable(t), rest)) => (rest, Some(*t)),
        _ => (actions, None),
    };
    if !body.is_empty() {
        let at = b.len();
        b.u16(4); // OFPIT_APPLY_ACTIONS
        b.u16(0);
        b.zeros(4);
        write_actions(b, body)?;
        close(b, at, "an instruction")?;
    }
    if let Some(t) = goto {
        b.u16(1); // OFPIT_GOTO_TABLE
        b.u16(8);
        b.u8(t);
        b.zeros(3);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn flow_mod_head(
    b: &mut Buf,
    cookie: u64,
    cookie_mask: u64,
    table: u8,
    command: u8,
    idle: u16,
    hard: u16,
    priority: u16,
) {
    b.u64(cookie);
    b.u64(cookie_mask);
    b.u8(table);
    b.u8(command);
    b.u16(idle);
    b.u16(hard);
    b.u16(priority);
    b.u32(0xffff_ffff); // buffer_id: none
    b.u32(OFPP_ANY);
    b.u32(OFPG_ANY);
    b.u16(0); // flags
    b.u16(0); // importance
}

fn flow_add(b: &mut Buf, xid: u32, f: &Flow) -> Result<(), EncodeError> {
    let at = start(b, OFPT_FLOW_MOD, xid);
    flow_mod_head(
        b,
        f.cookie,
        0,
        f.table,
        0,
        f.idle_timeout,
        f.hard_timeout,
        f.priority,
    );
    write_match(b, &f.matches)?;
    write_instructions(b, &f.actions)?;
    finish(b, at)
}

fn bucket(b: &mut Buf, bk: &Bucket) -> Result<(), EncodeError> {
    let at = b.len();
    b.u16(0);
    b.u16(0);
    b.u32(bk.bucket_id);
    write_actions(b, &bk.actions)?;
    let actions_len = len16(b.len() - at - 8, "a bucket's actions")?;
    b.set_u16(at + 2, actions_len);
    // OFPGBPT15_WEIGHT
    b.u16(0);
    b.u16(8);
    b.u16(bk.weight);
    b.zeros(2);
    let n = len16(b.len() - at, "a bucket")?;
    b.set_u16(at, n);
    Ok(())
}

fn group_mod(
    b: &mut Buf,
    xid: u32,
    command: u16,
    group_id: u32,
    command_bucket_id: u32,
    buckets: &[Bucket],
    group: Option<&Group>,
) -> Result<(), EncodeError> {
    // Inserting buckets is for select groups here; a delete names no type (OVS shows "all").
    let group_type = group.map_or(u8::from(command == 3), |g| group_type(&g.group_type));
    let at = start(b, OFPT_GROUP_MOD, xid);
    b.u16(command);
    b.u8(group_type);
    b.u8(0);
    b.u32(group_id);
    let len_at = b.len();
    b.u16(0);
    b.zeros(2);
    b.u32(command_bucket_id);
    let buckets_at = b.len();
    for bk in buckets {
        bucket(b, bk)?;
    }
    let n = len16(b.len() - buckets_at, "a group's buckets")?;
    b.set_u16(len_at, n);
    if let Some(g) = group
        && let Some(method) = &g.selection_method
    {
        // ntr_group_prop_selection_method, then the hashed fields' headers.
        let p = b.len();
        b.u16(0xffff);
        b.u16(0);
        b.u32(NTR_VENDOR_ID);
        b.u32(1); // NTRT_SELECTION_METHOD
        b.zeros(4);
        let mut name = [0u8; 16];
        let bytes = method.as_bytes();
        if bytes.len() >= 16 {
            return Err(unsupported(format!("selection method {method}")));
        }
        name[..bytes.len()].copy_from_slice(bytes);
        b.0.extend_from_slice(&name);
        b.u64(0);
        for f in &g.fields {
            let field = Field::from_name(f).ok_or_else(|| unsupported(format!("field {f}")))?;
            // Each field is a TLV whose value is the mask of the bits hashed: all of them.
            let h = header(field, None)?;
            b.u32(h.word(false));
            b.value(field.full_mask(), h.len);
        }
        close(b, p, "a group property")?;
        b.pad8(p);
    }
    finish(b, at)
}

fn group_type(t: &GroupType) -> u8 {
    match t {
        GroupType::All => 0,
        GroupType::Select => 1,
        GroupType::Indirect => 2,
    }
}

/// One bundle message, as the body of a bundle-add with `xid`.
pub fn encode(op: &OfOp, xid: u32) -> Result<Vec<u8>, EncodeError> {
    let mut b = Buf::default();
    encode_into(&mut b, op, xid)?;
    Ok(b.0)
}

fn encode_into(b: &mut Buf, op: &OfOp, xid: u32) -> Result<(), EncodeError> {
    match op {
        OfOp::AddFlow(f) => flow_add(b, xid, f),
        OfOp::DelFlowStrict {
            table,
            priority,
            matches,
        } => {
            let at = start(b, OFPT_FLOW_MOD, xid);
            flow_mod_head(b, 0, 0, *table, 4, 0, 0, *priority);
            write_match(b, matches)?;
            finish(b, at)
        }
        OfOp::DelFlowsByCookie {
            cookie,
            cookie_mask,
        } => {
            let at = start(b, OFPT_FLOW_MOD, xid);
            flow_mod_head(b, *cookie, *cookie_mask, 0xff, 3, 0, 0, 0);
            write_match(b, &Match::default())?;
            finish(b, at)
        }
        OfOp::AddGroup(g) => group_mod(b, xid, 0, g.group_id, 0xffff_ffff, &g.buckets, Some(g)),
        OfOp::ModGroup(g) => group_mod(b, xid, 1, g.group_id, 0xffff_ffff, &g.buckets, Some(g)),
        OfOp::InsertBuckets { group_id, buckets } => {
            // OFPGC15_INSERT_BUCKET after the last (OFPG15_BUCKET_LAST).
            group_mod(b, xid, 3, *group_id, 0xffff_fffe, buckets, None)
        }
        OfOp::DelGroup(id) => group_mod(b, xid, 2, *id, 0xffff_ffff, &[], None),
    }
}

fn bundle_control(b: &mut Buf, xid: u32, bundle: u32, kind: u16) {
    let at = start(b, OFPT_BUNDLE_CONTROL, xid);
    b.u32(bundle);
    b.u16(kind);
    b.u16(BUNDLE_ATOMIC | BUNDLE_ORDERED);
    // Fixed size: far below the limit.
    let _ = finish(b, at);
}

/// The names of the errors a sync can meet, as `ovs-ofctl` prints them.
fn error_name(kind: u16, code: u16) -> String {
    let name = match (kind, code) {
        (1, 1) => "OFPBRC_BAD_TYPE",
        (1, 8) => "OFPBRC_BAD_TABLE_ID",
        (1, 6) => "OFPBRC_EPERM",
        (2, 0) => "OFPBAC_BAD_TYPE",
        (2, 4) => "OFPBAC_BAD_OUT_PORT",
        (2, 5) => "OFPBAC_BAD_ARGUMENT",
        (2, 9) => "OFPBAC_BAD_OUT_GROUP",
        (2, 13) => "OFPBAC_BAD_SET_TYPE",
        (2, 15) => "OFPBAC_BAD_SET_ARGUMENT",
        (3, 1) => "OFPBIC_BAD_TABLE_ID",
        (4, 3) => "OFPBMC_BAD_FIELD",
        (4, 5) => "OFPBMC_BAD_VALUE",
        (4, 7) => "OFPBMC_BAD_PREREQ",
        (5, 0) => "OFPFMFC_UNKNOWN",
        (5, 1) => "OFPFMFC_TABLE_FULL",
        (5, 2) => "OFPFMFC_BAD_TABLE_ID",
        (6, 0) => "OFPGMFC_GROUP_EXISTS",
        (6, 8) => "OFPGMFC_UNKNOWN_GROUP",
        (6, 9) => "OFPGMFC_CHAINING_UNSUPPORTED",
        (17, 13) => "OFPBFC_MSG_FAILED",
        _ => return format!("OpenFlow error type {kind} code {code}"),
    };
    name.to_string()
}

/// A session with one bridge's management socket.
pub struct Session {
    writer: Arc<Mutex<UnixStream>>,
    reader: UnixStream,
    next_xid: u32,
}

fn io_error(e: std::io::Error) -> BridgeError {
    BridgeError {
        index: 0,
        message: format!("OpenFlow connection: {e}"),
    }
}

/// One message: version, type, xid, body.
fn read_msg(r: &mut UnixStream) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 8];
    r.read_exact(&mut head)?;
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let mut body = vec![0u8; len.saturating_sub(8)];
    r.read_exact(&mut body)?;
    Ok((
        head[0],
        head[1],
        u32::from_be_bytes([head[4], head[5], head[6], head[7]]),
        body,
    ))
}

impl Session {
    /// Connects and agrees on OpenFlow 1.5 (`path` is `<rundir>/<bridge>.mgmt`).
    pub fn connect(path: &Path) -> Result<Self, BridgeError> {
        let stream = UnixStream::connect(path).map_err(|e| BridgeError {
            index: 0,
            message: format!("connecting to {}: {e}", path.display()),
        })?;
        Self::over(stream)
    }

    /// Agrees on OpenFlow 1.5 over a connected stream (the management socket, or a socket
    /// pair whose other end plays the switch: the fuzz target feeds it arbitrary answers).
    pub fn over(stream: UnixStream) -> Result<Self, BridgeError> {
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io_error)?;
        let mut reader = stream.try_clone().map_err(io_error)?;
        let mut b = Buf::default();
        let at = start(&mut b, OFPT_HELLO, 1);
        // A version bitmap element: OpenFlow 1.5 only.
        b.u16(1);
        b.u16(8);
        b.u32(1 << VERSION);
        finish(&mut b, at)?;
        let mut w = stream;
        w.write_all(&b.0).map_err(io_error)?;
        let (version, kind, _, rest) = read_msg(&mut reader).map_err(io_error)?;
        if kind != OFPT_HELLO {
            return Err(BridgeError {
                index: 0,
                message: format!("expected a hello, got OpenFlow message type {kind}"),
            });
        }
        // Without a bitmap, the peer's header version is the highest it speaks.
        let speaks_15 = if rest.len() >= 8 && u16::from_be_bytes([rest[0], rest[1]]) == 1 {
            u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) & (1 << VERSION) != 0
        } else {
            version >= VERSION
        };
        if !speaks_15 {
            return Err(BridgeError {
                index: 0,
                message: "ovs-vswitchd does not speak OpenFlow 1.5 on this bridge (set \
                          the Bridge's protocols to include OpenFlow15)"
                    .into(),
            });
        }
        Ok(Self {
            writer: Arc::new(Mutex::new(w)),
            reader,
            next_xid: 2,
        })
    }

    fn xid(&mut self) -> u32 {
        self.next_xid = self.next_xid.wrapping_add(1).max(2);
        self.next_xid
    }

    /// Sends `ops` as one atomic, ordered bundle and waits for its commit. Encoding errors
    /// are found before anything is sent. The adds are followed by a barrier: OVS answers a
    /// message it cannot add with an error but would still commit the others, so the commit
    /// is sent only once the barrier shows every add was taken.
    pub fn bundle(&mut self, ops: &[OfOp]) -> Result<(), BridgeError> {
        let bundle_id = self.xid();
        let open_xid = self.xid();
        let first = self.next_xid.wrapping_add(1);
        // Encode everything first: an op the encoder refuses sends nothing.
        let mut wire = Buf::default();
        bundle_control(&mut wire, open_xid, bundle_id, BUNDLE_OPEN_REQUEST);
        for (i, op) in ops.iter().enumerate() {
            let xid = self.xid();
            let at = start(&mut wire, OFPT_BUNDLE_ADD_MESSAGE, xid);
            wire.u32(bundle_id);
            wire.zeros(2);
            wire.u16(BUNDLE_ATOMIC | BUNDLE_ORDERED);
            encode_into(&mut wire, op, xid).map_err(|e| BridgeError {
                index: i,
                message: e.to_string(),
            })?;
            let n = u16::try_from(wire.len() - at).map_err(|_| BridgeError {
                index: i,
                message: "message longer than 65535 bytes".into(),
            })?;
            wire.set_u16(at + 2, n);
        }
        let last = self.next_xid;
        let barrier_xid = self.xid();
        let at = start(&mut wire, OFPT_BARRIER_REQUEST, barrier_xid);
        finish(&mut wire, at)?;
        // The switch may answer (errors, echo requests) while the bundle is still being
        // written: a reader drains it so that neither side blocks on a full socket.
        let errors = self.exchange(wire.0, barrier_xid, OFPT_BARRIER_REPLY)?;
        let mine = |xid: u32| xid.wrapping_sub(open_xid) <= last.wrapping_sub(open_xid);
        let refused = errors.iter().find(|(xid, _)| mine(*xid));
        if let Some((xid, body)) = refused {
            let mut b = Buf::default();
            let discard_xid = self.xid();
            bundle_control(&mut b, discard_xid, bundle_id, BUNDLE_DISCARD_REQUEST);
            let _ = self.exchange(b.0, discard_xid, OFPT_BUNDLE_CONTROL);
            let index = if *xid == open_xid {
                0
            } else {
                xid.wrapping_sub(first) as usize
            };
            return Err(refusal(ops, index, body));
        }
        let commit_xid = self.xid();
        let mut b = Buf::default();
        bundle_control(&mut b, commit_xid, bundle_id, BUNDLE_COMMIT_REQUEST);
        let errors = self.exchange(b.0, commit_xid, OFPT_BUNDLE_CONTROL)?;
        // A failed commit answers the failing message's error, then the commit's own.
        let failed = errors
            .iter()
            .find(|(xid, _)| mine(*xid) && *xid != open_xid)
            .map(|(xid, body)| (xid.wrapping_sub(first) as usize, body))
            .or_else(|| {
                errors
                    .iter()
                    .find(|(xid, _)| *xid == commit_xid)
                    .map(|(_, body)| (0, body))
            });
        match failed {
            None => Ok(()),
            Some((index, body)) => Err(refusal(ops, index, body)),
        }
    }

    /// Writes `wire` while reading answers, until the message of `kind` with `until_xid` (or
    /// an error with that xid). Returns the errors seen, by xid.
    fn exchange(
        &mut self,
        wire: Vec<u8>,
        until_xid: u32,
        kind_wanted: u8,
    ) -> Result<Vec<(u32, Vec<u8>)>, BridgeError> {
        let mut reader = self.reader.try_clone().map_err(io_error)?;
        let echo = self.writer.clone();
        let answers = std::thread::spawn(move || -> std::io::Result<Vec<(u32, Vec<u8>)>> {
            let mut errors = Vec::new();
            loop {
                let (_, kind, xid, body) = read_msg(&mut reader)?;
                match kind {
                    OFPT_ECHO_REQUEST => {
                        let mut b = Buf::default();
                        let at = start(&mut b, OFPT_ECHO_REPLY, xid);
                        b.0.extend_from_slice(&body);
                        // The body came in a message: it fits in one.
                        let _ = finish(&mut b, at);
                        if let Ok(mut w) = echo.lock() {
                            w.write_all(&b.0)?;
                        }
                    }
                    OFPT_ERROR => {
                        let done = xid == until_xid;
                        errors.push((xid, body));
                        if done {
                            return Ok(errors);
                        }
                    }
                    k if k == kind_wanted && xid == until_xid => return Ok(errors),
                    _ => {}
                }
            }
        });
        let written = match self.writer.lock() {
            Ok(mut w) => w.write_all(&wire),
            Err(_) => Err(std::io::Error::other("OpenFlow writer poisoned")),
        };
        let got = answers.join().map_err(|_| BridgeError {
            index: 0,
            message: "OpenFlow reader panicked".into(),
        })?;
        written.map_err(io_error)?;
        got.map_err(io_error)
    }
}

impl Session {
    /// Answers the packets the bridge's flows send to the controller, until the connection
    /// ends (ovs-vswitchd stopped or restarted: the caller connects again). `answer` gets the
    /// flow's cookie and the packet, and returns the frame to send back out of the port it
    /// came in on, if any (see [`crate::reject`]).
    ///
    /// A connection to the management socket is a "service" connection, which ovs-vswitchd
    /// sends packet-ins to only once it has asked for them with a nonzero `miss_send_len`.
    pub fn serve_packet_ins(
        mut self,
        mut answer: impl FnMut(u64, &[u8]) -> Option<Vec<u8>>,
    ) -> std::io::Result<()> {
        self.reader.set_read_timeout(None)?;
        let mut b = Buf::default();
        let xid = self.xid();
        let at = start(&mut b, OFPT_SET_CONFIG, xid);
        b.u16(0);
        b.u16(0xffff);
        finish(&mut b, at).map_err(|e| std::io::Error::other(e.what))?;
        self.write(&b.0)?;
        loop {
            let (_, kind, xid, body) = read_msg(&mut self.reader)?;
            match kind {
                OFPT_ECHO_REQUEST => {
                    let mut b = Buf::default();
                    let at = start(&mut b, OFPT_ECHO_REPLY, xid);
                    b.0.extend_from_slice(&body);
                    if finish(&mut b, at).is_ok() {
                        self.write(&b.0)?;
                    }
                }
                OFPT_PACKET_IN => {
                    let Some((cookie, in_port, frame)) = parse_packet_in(&body) else {
                        continue;
                    };
                    let Some(reply) = answer(cookie, frame) else {
                        continue;
                    };
                    let xid = self.xid();
                    if let Some(msg) = packet_out(xid, in_port, &reply) {
                        self.write(&msg)?;
                    }
                }
                _ => {}
            }
        }
    }

    fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        match self.writer.lock() {
            Ok(mut w) => w.write_all(bytes),
            Err(_) => Err(std::io::Error::other("OpenFlow writer poisoned")),
        }
    }
}

/// An OpenFlow 1.5 packet-in's cookie, input port and packet (`None` if it is malformed or
/// carries no input port).
fn parse_packet_in(body: &[u8]) -> Option<(u64, u32, &[u8])> {
    // buffer_id, total_len, reason, table_id, cookie; then the match.
    let cookie = u64::from_be_bytes(body.get(8..16)?.try_into().ok()?);
    let m = body.get(16..)?;
    let len = usize::from(u16::from_be_bytes([*m.get(2)?, *m.get(3)?]));
    if u16::from_be_bytes([m[0], m[1]]) != 1 || len < 4 {
        return None;
    }
    let mut oxms = m.get(4..len)?;
    let mut in_port = None;
    while oxms.len() >= 4 {
        let head = u32::from_be_bytes(oxms[..4].try_into().ok()?);
        let n = (head & 0xff) as usize;
        let value = oxms.get(4..4 + n)?;
        // OXM_OF_IN_PORT: class 0x8000, field 0, no mask, 4 bytes.
        if head == 0x8000_0004 {
            in_port = Some(u32::from_be_bytes(value.try_into().ok()?));
        }
        oxms = &oxms[4 + n..];
    }
    // The match is padded to 8 bytes, then 2 bytes of padding before the packet.
    let data = m.get(len.div_ceil(8) * 8 + 2..)?;
    Some((cookie, in_port?, data))
}

/// An OpenFlow 1.5 packet-out sending `frame` out of `in_port` (as having come in on it, so
/// that the `in_port` output port means that port).
fn packet_out(xid: u32, in_port: u32, frame: &[u8]) -> Option<Vec<u8>> {
    let mut b = Buf::default();
    let at = start(&mut b, OFPT_PACKET_OUT, xid);
    b.u32(0xffff_ffff);
    b.u16(16);
    b.zeros(2);
    // The match: in_port only (4 + 8 bytes, padded to 16).
    b.u16(1);
    b.u16(12);
    b.u32(0x8000_0004);
    b.u32(in_port);
    b.zeros(4);
    output(&mut b, OFPP_IN_PORT, 0);
    b.0.extend_from_slice(frame);
    finish(&mut b, at).ok()?;
    Some(b.0)
}

/// The error for a refused message, worded as `ovs-ofctl` words it.
fn refusal(ops: &[OfOp], index: usize, body: &[u8]) -> BridgeError {
    let (kind, code) = if body.len() >= 4 {
        (
            u16::from_be_bytes([body[0], body[1]]),
            u16::from_be_bytes([body[2], body[3]]),
        )
    } else {
        (0, 0)
    };
    let described = ops
        .get(index)
        .map(|op| op.to_bundle_line())
        .unwrap_or_default();
    BridgeError {
        index,
        message: format!("Error {} for: {described}", error_name(kind, code)),
    }
}

#[cfg(test)]
mod tests {
    //! Every message is checked against Open vSwitch itself: `ovs-ofctl ofp-print` decodes
    //! our bytes, and must print what `ovs-ofctl parse-flow`/`parse-group` print for the same
    //! flow or group given as text (the form the adapter sent before). OVS must be installed
    //! (`scripts/test.sh` installs it); the test fails without it.

    use std::process::Command;

    use nsx_core::agent::wiring::{PodNetwork, pod_flows};
    use nsx_core::ovs::parse::{parse_flow, parse_group};
    use nsx_core::proxy::compile::{endpoint_flow, group, service_flows, static_flows};
    use nsx_core::proxy::{Endpoint, Scope, ServicePort, ServicePortKey};

    use super::*;

    fn ofctl(args: &[&str]) -> String {
        let out = Command::new(crate::ovs::find_tool("ovs-ofctl").expect("ovs-ofctl installed"))
            .args(args)
            .output()
            .expect("ovs-ofctl runs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// What OVS decodes from our bytes: the message's text without its header line's xid.
    fn decoded(op: &OfOp) -> String {
        let hex: String = encode(op, 1)
            .expect("encodes")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let text = ofctl(&["ofp-print", &hex]);
        assert!(!text.contains("error"), "OVS refused {op:?}: {text}");
        text.split_once("(xid=0x1):")
            .map(|(_, rest)| rest.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or(text)
    }

    /// What OVS makes of the same message given as text.
    fn reference(kind: &str, text: &str) -> String {
        let out = ofctl(&["-O", "OpenFlow15", kind, text]);
        out.split_once("(xid=0x1):")
            .map(|(_, rest)| rest.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("ovs-ofctl {kind} {text}: {out}"))
    }

    #[test]
    fn a_packet_out_decodes_as_ovs_reads_it_and_a_packet_in_is_read_back() {
        let frame: Vec<u8> = (0u8..60).collect();
        let msg = packet_out(7, 5, &frame).expect("fits");
        let hex: String = msg.iter().map(|b| format!("{b:02x}")).collect();
        let text = ofctl(&["ofp-print", &hex]);
        assert!(
            text.contains("OFPT_PACKET_OUT (OF1.5)")
                && text.contains("in_port=5")
                && text.contains("actions=IN_PORT")
                && text.contains("data_len=60"),
            "{text}"
        );
        // A packet-in as OVS sends it (OpenFlow 1.5, the match with in_port and a register),
        // read back to its cookie, port and packet; cut anywhere, it is refused, not a panic.
        let mut b = Buf::default();
        let at = start(&mut b, OFPT_PACKET_IN, 9);
        b.u32(0xffff_ffff);
        b.u16(60);
        b.u8(1);
        b.u8(10);
        b.u64(0x0002_0200_0000_0007);
        b.u16(1);
        b.u16(4 + 8 + 8);
        b.u32(0x8000_0004);
        b.u32(5);
        b.u32(0x0001_0004);
        b.u32(0xdead_beef);
        b.zeros(4);
        b.zeros(2);
        b.0.extend_from_slice(&frame);
        finish(&mut b, at).unwrap();
        let body = &b.0[8..];
        assert_eq!(
            parse_packet_in(body),
            Some((0x0002_0200_0000_0007, 5, &frame[..]))
        );
        for cut in 0..body.len() - frame.len() {
            assert_eq!(parse_packet_in(&body[..cut]), None, "cut at {cut}");
        }
    }

    fn service(protocol: u8, affinity: Option<u32>, node_port: Option<u16>) -> ServicePort {
        let key = ServicePortKey {
            namespace: "ns".into(),
            name: "svc".into(),
            port: "p".into(),
        };
        ServicePort {
            key,
            cluster_ip: 0x0a60_0001,
            port: 80,
            protocol,
            node_port,
            no_local_endpoints: false,
            scope: Default::default(),
            affinity_timeout: affinity,
            endpoints: vec![
                Endpoint {
                    ip: 0x0a01_0001,
                    port: 8080,
                },
                Endpoint {
                    ip: 0x0a01_0102,
                    port: 8081,
                },
            ],
        }
    }

    #[test]
    fn every_flow_the_agent_and_the_proxy_make_decodes_as_ovs_encodes_its_text() {
        let net = PodNetwork {
            ip: "10.4.0.10/24".into(),
            mac: "02:50:56:00:00:0a".into(),
            gateway: "10.4.0.1".into(),
            vlan: 7,
            logical_port_id: "lp".into(),
        };
        let mut flows = static_flows(3, &[0xac10_000b]);
        flows.extend(pod_flows("c0ffee", 5, &net, 1));
        for protocol in [6, 17, 132] {
            let sp = service(protocol, Some(10_800), Some(30_080));
            flows.extend(service_flows(3, &sp, 9, &[0xac10_000b]));
            for scope in [Scope::Internal, Scope::ExternalLocal] {
                let sp = ServicePort {
                    scope,
                    ..sp.clone()
                };
                flows.extend(service_flows(3, &sp, 10, &[0xac10_000b]));
            }
            for e in &sp.endpoints {
                flows.push(endpoint_flow(3, protocol, e));
            }
        }
        // Every action and field of the model, beyond what the agent and proxy use today.
        for text in [
            "table=3,priority=10,in_port=2,dl_vlan=7,actions=pop_vlan,move:NXM_OF_ETH_SRC[]->NXM_OF_ETH_DST[],output:4",
            "priority=11,vlan_tci=0x1000/0x1000,actions=push_vlan:0x8100,set_field:4097->vlan_vid,IN_PORT",
            "priority=12,ip,nw_ttl=2,actions=dec_ttl,ct_clear,NORMAL",
            "priority=13,icmp,icmp_type=8,icmp_code=0,actions=CONTROLLER:65535",
            "priority=14,ct_state=+trk+est-new,ct_zone=5,ct_mark=0x1/0x1,ip,actions=goto_table:20",
            "priority=15,ct_state=+est+trk,ip,ct_nw_src=10.1.0.0/16,ct_nw_dst=10.2.0.1,ct_nw_proto=6,ct_tp_src=80,ct_tp_dst=8080,actions=drop",
            "priority=16,metadata=0x5/0xff,reg3=0x10/0xf0,dl_src=02:00:00:00:00:01,dl_dst=02:00:00:00:00:02/ff:ff:ff:00:00:00,actions=set_field:02:00:00:00:00:03->eth_src,load:0x1->NXM_NX_REG7[3]",
            "priority=17,ip,actions=ct(commit,zone=9,exec(load:0x1->NXM_NX_CT_MARK[0]),nat(src=100.64.0.1-100.64.0.9:1024-65535,random))",
            "priority=18,ip,actions=ct(table=21,zone=NXM_NX_REG6[0..15],nat)",
            "priority=19,udp,tp_src=53,actions=ct(commit,table=22,nat(dst=10.0.0.5:5353,persistent))",
            "priority=20,sctp,tp_dst=9,actions=resubmit(4,7),group:3",
        ] {
            flows.push(parse_flow(text).unwrap_or_else(|e| panic!("{text}: {e:?}")));
        }
        assert!(flows.len() > 30, "{}", flows.len());
        for f in flows {
            let text = f.to_string();
            assert_eq!(
                decoded(&OfOp::AddFlow(f)),
                reference("parse-flow", &text),
                "{text}"
            );
        }
    }

    #[test]
    fn select_groups_with_hash_fields_weights_and_learn_decode_as_ovs_encodes_their_text() {
        for (protocol, affinity) in [(6, None), (17, Some(60)), (132, Some(10_800))] {
            let g = group(&service(protocol, affinity, None), 12);
            let text = g.to_string();
            assert_eq!(
                decoded(&OfOp::AddGroup(g.clone())),
                reference("parse-group", &text),
                "{text}"
            );
            let m = decoded(&OfOp::ModGroup(g.clone()));
            assert!(m.starts_with("MOD group_id=12,type=select"), "{m}");
        }
        let g = parse_group("group_id=4,type=select,bucket=bucket_id:1,actions=output:2")
            .expect("parses");
        let ins = decoded(&OfOp::InsertBuckets {
            group_id: 4,
            buckets: g.buckets,
        });
        assert!(
            ins.starts_with("INSERT_BUCKET command_bucket_id:last,group_id=4"),
            "{ins}"
        );
        assert!(ins.contains("bucket=bucket_id:1"), "{ins}");
        assert_eq!(decoded(&OfOp::DelGroup(4)), "DEL group_id=4,type=all");
    }

    #[test]
    fn deletions_decode_to_the_strict_match_and_the_cookie_mask() {
        let f = parse_flow("table=20,priority=100,tcp,nw_dst=10.96.0.1,tp_dst=80,actions=drop")
            .expect("parses");
        let strict = decoded(&OfOp::DelFlowStrict {
            table: f.table,
            priority: f.priority,
            matches: f.matches,
        });
        assert_eq!(
            strict,
            "DEL_STRICT table:20 priority=100,tcp,nw_dst=10.96.0.1,tp_dst=80 actions=drop"
        );
        let by_cookie = decoded(&OfOp::DelFlowsByCookie {
            cookie: 0x3_0000_0000_0000,
            cookie_mask: 0xffff_0000_0000_0000,
        });
        // Table 255 is OFPTT_ALL: every table.
        assert_eq!(
            by_cookie,
            "DEL table:255 priority=0 cookie:0x3000000000000/0xffff000000000000 actions=drop"
        );
    }

    #[test]
    fn what_openflow_cannot_carry_is_refused_before_sending() {
        let mut f = parse_flow("priority=1,actions=drop").expect("parses");
        f.matches.set(Field::TpDst, 80, 0xffff);
        let e = encode(&OfOp::AddFlow(f), 1).expect_err("no protocol for tp_dst");
        assert!(e.to_string().contains("tp_dst"), "{e}");
    }
}
