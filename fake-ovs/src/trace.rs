//! The pipeline: a packet walks the tables from table 0, actions run in order, `resubmit` and
//! `goto_table` continue in another table (the packet's changes stay), a group runs its
//! bucket(s) on copies, `ct(table=N)` sends a tracked copy to table N once the current
//! pipeline is done (a recirculation) while the original continues untracked. `trace` explains
//! every step in `ofproto/trace` style and changes nothing; `process` also counts, commits
//! connections and learns flows.

use nsx_core::ovs::Field;
use nsx_core::ovs::field::format_ct_state;
use nsx_core::ovs::flow::{Action, CtZone, GroupType, LearnSpec, Match};

use crate::bridge::Bridge;
use crate::conntrack::TRK;
use crate::hash;
use crate::packet::Packet;

/// Where a packet left the bridge, and as what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub port: u32,
    pub packet: Packet,
}

/// What happened to one packet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    /// One line per table visited and action taken, indented by depth.
    pub lines: Vec<String>,
    pub outputs: Vec<Output>,
    /// Copies sent to the controller.
    pub controller: usize,
    /// `NORMAL` was reached (the L2 learning switch is not modelled: no output).
    pub normal: bool,
    /// Flows `learn` added (only when processing).
    pub learned: usize,
}

impl Trace {
    /// `Datapath actions:` in the spirit of ofproto/trace: the output ports, or `drop`.
    pub fn datapath_actions(&self) -> String {
        if self.outputs.is_empty() {
            "drop".into()
        } else {
            self.outputs
                .iter()
                .map(|o| o.port.to_string())
                .collect::<Vec<_>>()
                .join(",")
        }
    }

    /// The ports the packet left on, in order.
    pub fn ports(&self) -> Vec<u32> {
        self.outputs.iter().map(|o| o.port).collect()
    }
}

const MAX_DEPTH: usize = 64;

/// Adds a line to the trace's explanation, formatting it only when one is wanted (a packet
/// forwarded for a connectivity check needs the outputs, not the text).
macro_rules! explain {
    ($ctx:expr, $text:expr $(,)?) => {
        if $ctx.explain {
            Bridge::explain_line($ctx, $text)
        }
    };
}

struct Ctx {
    record: bool,
    /// Whether `trace.lines` is written.
    explain: bool,
    bytes: u64,
    depth: usize,
    trace: Trace,
    recirc: Vec<(Packet, u8)>,
    stop: bool,
}

fn fields_hash(fields: &[std::borrow::Cow<'static, str>], p: &Packet) -> u32 {
    // Hashed in OVS's field-id order, each in network byte order; fields whose
    // prerequisites the packet lacks are skipped (as OVS does).
    let mut ids: Vec<Field> = fields.iter().filter_map(|n| Field::from_name(n)).collect();
    let rank = |f: &Field| -> u32 {
        match f {
            Field::Metadata => 0,
            Field::InPort => 1,
            Field::CtState => 2,
            Field::CtZone => 3,
            Field::CtMark => 4,
            Field::CtNwSrc => 5,
            Field::CtNwDst => 6,
            Field::Reg(n) => 10 + u32::from(*n),
            Field::EthSrc => 100,
            Field::EthDst => 101,
            Field::EthType => 102,
            Field::VlanTci => 103,
            Field::IpSrc => 110,
            Field::IpDst => 111,
            Field::IpProto => 115,
            Field::IpTtl => 116,
            Field::TcpSrc | Field::TpSrc => 120,
            Field::TcpDst | Field::TpDst => 121,
            Field::UdpSrc => 123,
            Field::UdpDst => 124,
            Field::SctpSrc => 125,
            Field::SctpDst => 126,
            Field::IcmpType => 127,
            Field::IcmpCode => 128,
            _ => 200,
        }
    };
    ids.sort_by_key(rank);
    ids.dedup();
    let (eth, proto) = (p.get(Field::EthType), p.get(Field::IpProto));
    let mut basis = hash::uint64(0);
    for f in ids {
        if nsx_core::ovs::field::prerequisite(f, Some(eth), Some(proto)).is_err() {
            continue;
        }
        let n_bytes = (f.bits().div_ceil(8)) as usize;
        let v = p.get(f);
        let be = v.to_be_bytes();
        basis = hash::bytes(&be[16 - n_bytes..], basis);
    }
    basis
}

/// OVS's default selection (a symmetric L4 hash); not bit-exact with OVS, only stable.
fn default_hash(p: &Packet) -> u32 {
    let (a, b) = (p.get(Field::IpSrc) as u32, p.get(Field::IpDst) as u32);
    let (x, y) = (p.get(Field::TpSrc) as u32, p.get(Field::TpDst) as u32);
    hash::int((a ^ b) ^ (x ^ y), p.get(Field::IpProto) as u32)
}

impl Bridge {
    /// Explains what the bridge would do with `p`, changing nothing.
    pub fn trace(&mut self, p: Packet) -> Trace {
        self.run(p, 0, false, true)
    }

    /// Sends `p` (of `bytes` bytes) through the bridge: counters, conntrack and learned flows
    /// change as they would.
    pub fn process(&mut self, p: Packet, bytes: u64) -> Trace {
        self.run(p, bytes, true, true)
    }

    /// `process` without the explanation (`lines` stays empty): the same outputs, counters,
    /// conntrack entries and learned flows, at a fraction of the cost, for callers that only
    /// want where the packet went.
    pub fn forward(&mut self, p: Packet, bytes: u64) -> Trace {
        self.run(p, bytes, true, false)
    }

    fn run(&mut self, mut p: Packet, bytes: u64, record: bool, explain: bool) -> Trace {
        let mut ctx = Ctx {
            record,
            explain,
            bytes,
            depth: 0,
            trace: Trace::default(),
            recirc: Vec::new(),
            stop: false,
        };
        if ctx.explain {
            ctx.trace.lines.push(format!("Flow: {}", p.describe()));
        }
        self.table(&mut ctx, &mut p, 0);
        let mut n = 0;
        while !ctx.recirc.is_empty() && n < MAX_DEPTH {
            n += 1;
            let (mut q, t) = ctx.recirc.remove(0);
            if ctx.explain {
                ctx.trace.lines.push(format!(
                    "recirc: ct_state={} -> table {t}: {}",
                    format_ct_state(q.get(Field::CtState) as u32, 0xff),
                    q.describe()
                ));
            }
            ctx.depth = 0;
            ctx.stop = false;
            self.table(&mut ctx, &mut q, t);
        }
        if ctx.explain {
            ctx.trace.lines.push(format!(
                "Datapath actions: {}",
                ctx.trace.datapath_actions()
            ));
        }
        ctx.trace
    }

    fn explain_line(ctx: &mut Ctx, text: String) {
        let pad = "    ".repeat(ctx.depth);
        ctx.trace.lines.push(format!("{pad}{text}"));
    }

    fn table(&mut self, ctx: &mut Ctx, p: &mut Packet, table: u8) {
        if ctx.depth >= MAX_DEPTH {
            explain!(ctx, "over 64 resubmit actions: dropped".into());
            ctx.stop = true;
            return;
        }
        let found = self.tables.get(&table).and_then(|c| c.lookup(p));
        let Some(id) = found else {
            explain!(ctx, format!("{table}. No match. drop"));
            return;
        };
        let flow = &self.flows[&id].flow;
        explain!(ctx, {
            let m = flow.matches.to_string();
            format!(
                "{table}. {}priority {}{}",
                if m.is_empty() {
                    String::new()
                } else {
                    format!("{m}, ")
                },
                flow.priority,
                if flow.cookie != 0 {
                    format!(", cookie {:#x}", flow.cookie)
                } else {
                    String::new()
                }
            )
        });
        let actions = flow.actions.clone();
        if ctx.record {
            self.count(id, ctx.bytes);
        }
        ctx.depth += 1;
        self.actions(ctx, p, &actions, table);
        ctx.depth -= 1;
    }

    fn actions(&mut self, ctx: &mut Ctx, p: &mut Packet, actions: &[Action], table: u8) {
        if actions.is_empty() {
            explain!(ctx, "drop".into());
        }
        for a in actions {
            if ctx.stop {
                return;
            }
            match a {
                Action::Output(port) => {
                    if u128::from(*port) == p.get(Field::InPort) {
                        explain!(ctx, format!("output:{port}: skipping output to input port"));
                    } else {
                        // `LOCAL` by name, as OVS prints it.
                        explain!(ctx, a.to_string());
                        ctx.trace.outputs.push(Output {
                            port: *port,
                            packet: *p,
                        });
                    }
                }
                Action::InPort => {
                    let port = p.get(Field::InPort) as u32;
                    explain!(ctx, format!("IN_PORT ({port})"));
                    ctx.trace.outputs.push(Output { port, packet: *p });
                }
                Action::Controller(_) => {
                    explain!(ctx, "CONTROLLER".into());
                    ctx.trace.controller += 1;
                }
                Action::Normal => {
                    explain!(ctx, "NORMAL (not modelled)".into());
                    ctx.trace.normal = true;
                }
                Action::Group(g) => self.run_group(ctx, p, *g, table),
                Action::GotoTable(t) => {
                    explain!(ctx, format!("goto_table:{t}"));
                    self.table(ctx, p, *t);
                    return;
                }
                Action::Resubmit { port, table: t } => {
                    let t = t.unwrap_or(table);
                    explain!(ctx, a.to_string());
                    let saved = p.get(Field::InPort);
                    if let Some(port) = port {
                        p.set(Field::InPort, u128::from(*port));
                    }
                    self.table(ctx, p, t);
                    if port.is_some() {
                        p.set(Field::InPort, saved);
                    }
                }
                Action::PushVlan(_) => {
                    p.set(Field::VlanTci, 0x1000);
                    explain!(ctx, a.to_string());
                }
                Action::PopVlan => {
                    p.set(Field::VlanTci, 0);
                    explain!(ctx, a.to_string());
                }
                Action::SetField { field, value } => {
                    p.set(*field, *value);
                    explain!(ctx, a.to_string());
                }
                Action::Load { dst, value } => {
                    p.set_bits(dst.field, dst.ofs, dst.bits, *value);
                    explain!(ctx, a.to_string());
                }
                Action::Move { src, dst } => {
                    let v = p.get_bits(src.field, src.ofs, src.bits);
                    p.set_bits(dst.field, dst.ofs, dst.bits, v);
                    explain!(ctx, a.to_string());
                }
                Action::Ct {
                    commit,
                    table: next,
                    zone,
                    exec,
                    nat,
                } => {
                    let zone = match zone {
                        None => 0,
                        Some(CtZone::Imm(z)) => *z,
                        Some(CtZone::Field(s)) => p.get_bits(s.field, s.ofs, s.bits) as u16,
                    };
                    let mut mark = None;
                    let mut label = None;
                    for e in exec {
                        match e {
                            Action::SetField {
                                field: Field::CtMark,
                                value,
                            } => mark = Some((*value as u32, u32::MAX)),
                            Action::Load { dst, value } if dst.field == Field::CtMark => {
                                mark = Some(((*value << dst.ofs) as u32, dst.mask() as u32));
                            }
                            Action::SetField {
                                field: Field::CtLabel,
                                value,
                            } => label = Some((*value, u128::MAX)),
                            Action::Load { dst, value } if dst.field == Field::CtLabel => {
                                label = Some((*value << dst.ofs, dst.mask()));
                            }
                            _ => {}
                        }
                    }
                    let mut q = *p;
                    let now = self.now_ms;
                    let r = self.conntrack.execute(
                        &mut q,
                        zone,
                        *commit,
                        nat.as_ref(),
                        mark,
                        label,
                        now,
                        ctx.record,
                    );
                    explain!(
                        ctx,
                        format!("{a} -> ct_state={}", format_ct_state(r.state as u32, 0xff)),
                    );
                    match next {
                        Some(t) => ctx.recirc.push((q, *t)),
                        None => {
                            // Without table= the pipeline goes on untracked, but NAT applies
                            // to the packet as the datapath sends it.
                            if nat.is_some() {
                                for f in [Field::IpSrc, Field::IpDst, Field::TpSrc, Field::TpDst] {
                                    p.set(f, q.get(f));
                                }
                            }
                        }
                    }
                }
                Action::CtClear => {
                    for f in nsx_core::ovs::field::CT_FIELDS {
                        p.set(f, 0);
                    }
                    explain!(ctx, "ct_clear".into());
                }
                Action::DecTtl => {
                    let ttl = p.get(Field::IpTtl);
                    if ttl <= 1 {
                        explain!(ctx, "dec_ttl: TTL exceeded: dropped".into());
                        ctx.stop = true;
                        return;
                    }
                    p.set(Field::IpTtl, ttl - 1);
                    explain!(ctx, "dec_ttl".into());
                }
                Action::Learn(l) => {
                    let mut flow = nsx_core::ovs::Flow {
                        table: l.table,
                        priority: l.priority,
                        idle_timeout: l.idle_timeout,
                        hard_timeout: l.hard_timeout,
                        cookie: l.cookie,
                        ..Default::default()
                    };
                    let mut m = Match::default();
                    for s in &l.specs {
                        match s {
                            LearnSpec::MatchField { dst, src } => {
                                let v = p.get_bits(src.field, src.ofs, src.bits);
                                let (cur, cm) = m.get(dst.field.storage()).unwrap_or((0, 0));
                                let mask = dst.mask();
                                m.set(
                                    dst.field.storage(),
                                    (cur & !mask) | (v << dst.ofs),
                                    cm | mask,
                                );
                            }
                            LearnSpec::MatchImm { dst, value } => {
                                let (cur, cm) = m.get(dst.field.storage()).unwrap_or((0, 0));
                                let mask = dst.mask();
                                m.set(
                                    dst.field.storage(),
                                    (cur & !mask) | (value << dst.ofs),
                                    cm | mask,
                                );
                            }
                            LearnSpec::LoadField { dst, src } => {
                                let v = p.get_bits(src.field, src.ofs, src.bits);
                                flow.actions.push(Action::Load {
                                    dst: *dst,
                                    value: v,
                                });
                            }
                            LearnSpec::LoadImm { dst, value } => {
                                flow.actions.push(Action::Load {
                                    dst: *dst,
                                    value: *value,
                                });
                            }
                            LearnSpec::Output { src } => {
                                let v = p.get_bits(src.field, src.ofs, src.bits);
                                flow.actions.push(Action::Output(v as u32));
                            }
                        }
                    }
                    flow.matches = m;
                    if ctx.record {
                        let text = flow.to_dump_no_stats();
                        if self.add_flow(flow).is_ok() {
                            ctx.trace.learned += 1;
                        }
                        explain!(ctx, format!("learn: {text}"));
                    } else {
                        explain!(
                            ctx,
                            format!(
                                "learn (not applied by a trace): {}",
                                flow.to_dump_no_stats()
                            ),
                        );
                    }
                }
            }
        }
    }

    fn run_group(&mut self, ctx: &mut Ctx, p: &mut Packet, id: u32, table: u8) {
        let Some(g) = self.groups.get(&id).cloned() else {
            explain!(ctx, format!("group:{id}: no such group: dropped"));
            return;
        };
        explain!(ctx, format!("group:{id}"));
        let chosen: Vec<usize> = match g.group_type {
            GroupType::All => (0..g.buckets.len()).collect(),
            GroupType::Indirect => vec![0],
            GroupType::Select => {
                let basis = match g.selection_method.as_deref() {
                    Some("hash") => fields_hash(&g.fields, p),
                    _ => default_hash(p),
                };
                let weights: Vec<(u32, u16)> =
                    g.buckets.iter().map(|b| (b.bucket_id, b.weight)).collect();
                hash::best_bucket(&weights, basis)
                    .filter(|i| g.buckets[*i].weight > 0)
                    .into_iter()
                    .collect()
            }
        };
        if chosen.is_empty() {
            explain!(ctx, "no live bucket: dropped".into());
        }
        ctx.depth += 1;
        for i in chosen {
            let b = &g.buckets[i];
            explain!(ctx, format!("bucket {}", b.bucket_id));
            // A bucket works on a copy; the packet after the group is the one before it.
            let mut q = *p;
            let actions = b.actions.clone();
            ctx.depth += 1;
            self.actions(ctx, &mut q, &actions, table);
            ctx.depth -= 1;
            ctx.stop = false;
        }
        ctx.depth -= 1;
    }
}

/// Whether the packet is tracked (for tests).
pub fn tracked(p: &Packet) -> bool {
    p.get(Field::CtState) & TRK != 0
}
