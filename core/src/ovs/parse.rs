//! Parsing `ovs-ofctl` text: `add-flow` arguments, `dump-flows` lines (statistics are read and
//! ignored), `add-group` arguments and `dump-groups` lines. Errors name the byte offset of what
//! could not be read, and what was expected there.

use super::field::{self, Field, parse_masked, parse_number, parse_value};
use super::flow::{
    Action, Bucket, CtZone, ETH_ARP, ETH_IP, ETH_IPV6, Flow, Group, GroupType, Learn, LearnSpec,
    Match, Nat, Subfield,
};

/// Text that could not be parsed: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at offset {offset} ({near:?}): {message}")]
pub struct ParseError {
    pub offset: usize,
    pub near: String,
    pub message: String,
}

fn err(offset: usize, near: &str, message: impl Into<String>) -> ParseError {
    ParseError {
        offset,
        near: near.chars().take(40).collect(),
        message: message.into(),
    }
}

/// Splits `text` (starting at `base` in the whole input) at top-level separators (commas,
/// and whitespace when `spaces`), keeping parenthesised groups whole.
fn split_top(text: &str, base: usize, spaces: bool) -> Result<Vec<(usize, &str)>, ParseError> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(err(base + i, &text[i..], "unbalanced ')'"));
                }
            }
            ',' if depth == 0 => {
                out.push((base + start, &text[start..i]));
                start = i + 1;
            }
            c if spaces && depth == 0 && c.is_whitespace() => {
                out.push((base + start, &text[start..i]));
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(err(base + start, &text[start..], "unbalanced '('"));
    }
    out.push((base + start, &text[start..]));
    Ok(out
        .into_iter()
        .filter(|(_, t)| !t.trim().is_empty())
        .map(|(o, t)| {
            let lead = t.len() - t.trim_start().len();
            (o + lead, t.trim())
        })
        .collect())
}

/// Where `actions=` starts at the top level.
fn find_actions(text: &str) -> Option<usize> {
    let mut depth = 0;
    let bytes = text.as_bytes();
    for i in 0..bytes.len() {
        match bytes[i] {
            b'(' => depth += 1,
            b')' => depth -= 1,
            b'a' if depth == 0 && text[i..].starts_with("actions=") => {
                let boundary = i == 0 || matches!(bytes[i - 1], b',' | b' ' | b'\t');
                if boundary {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

fn number<T: TryFrom<u128>>(offset: usize, text: &str, what: &str) -> Result<T, ParseError> {
    parse_number(text)
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| err(offset, text, format!("{what}: expected a number in range")))
}

/// `NAME[]`, `NAME[a..b]`, `NAME[a]`, or a bare field name (the whole field).
pub fn parse_subfield(offset: usize, text: &str) -> Result<Subfield, ParseError> {
    let (name, range) = match text.split_once('[') {
        Some((n, r)) => (
            n,
            Some(
                r.strip_suffix(']')
                    .ok_or_else(|| err(offset, text, "expected ']'"))?,
            ),
        ),
        None => (text, None),
    };
    let field = Field::from_name(name)
        .ok_or_else(|| err(offset, text, format!("unknown field {name:?}")))?;
    let (ofs, bits) = match range {
        None | Some("") => (0, field.bits()),
        Some(r) => {
            let (a, b) = r.split_once("..").unwrap_or((r, r));
            let a: u32 = number(offset, a, "bit offset")?;
            let b: u32 = number(offset, b, "bit offset")?;
            if a > b || b >= field.bits() {
                return Err(err(
                    offset,
                    text,
                    format!(
                        "bits {a}..{b} are outside {} ({} bits)",
                        field.name(),
                        field.bits()
                    ),
                ));
            }
            (a, b - a + 1)
        }
    };
    Ok(Subfield { field, ofs, bits })
}

fn set_eth_proto(m: &mut Match, eth: u128, proto: Option<u128>) {
    m.exact(Field::EthType, eth);
    if let Some(p) = proto {
        m.exact(Field::IpProto, p);
    }
}

/// Applies one match token (`tcp`, `nw_dst=10.0.0.0/8`, `dl_vlan=5`) to `m`.
fn match_token(m: &mut Match, offset: usize, tok: &str) -> Result<(), ParseError> {
    let shorthand: Option<(u128, Option<u128>)> = match tok {
        "ip" => Some((ETH_IP, None)),
        "icmp" => Some((ETH_IP, Some(1))),
        "tcp" => Some((ETH_IP, Some(6))),
        "udp" => Some((ETH_IP, Some(17))),
        "sctp" => Some((ETH_IP, Some(132))),
        "arp" => Some((ETH_ARP, None)),
        "ipv6" => Some((ETH_IPV6, None)),
        "tcp6" => Some((ETH_IPV6, Some(6))),
        "udp6" => Some((ETH_IPV6, Some(17))),
        "icmp6" => Some((ETH_IPV6, Some(58))),
        _ => None,
    };
    if let Some((eth, proto)) = shorthand {
        set_eth_proto(m, eth, proto);
        return Ok(());
    }
    let (key, value) = tok
        .split_once('=')
        .ok_or_else(|| err(offset, tok, "expected field=value or a protocol like tcp"))?;
    let voff = offset + key.len() + 1;
    match key {
        "dl_vlan" => {
            let v: u16 = number(voff, value, "dl_vlan")?;
            if v == 0xffff {
                m.set(Field::VlanTci, 0, 0x1fff);
            } else if v < 4096 {
                m.set(Field::VlanTci, 0x1000 | u128::from(v), 0x1fff);
            } else {
                return Err(err(voff, value, "dl_vlan must be 0-4095 or 0xffff"));
            }
            return Ok(());
        }
        "vlan_tci" => {
            let (v, mask) = parse_masked(Field::VlanTci, value).map_err(|e| err(voff, value, e))?;
            // OpenFlow 1.3 has no way to say "PCP must be 0": an exact TCI matches VID and CFI.
            m.set(Field::VlanTci, v, mask & 0x1fff);
            return Ok(());
        }
        "priority" | "cookie" | "table" | "idle_timeout" | "hard_timeout" => {
            return Err(err(offset, tok, format!("{key} is not a match field")));
        }
        _ => {}
    }
    let named = Field::from_name(key)
        .filter(|f| *f != Field::VlanVid)
        .ok_or_else(|| err(offset, tok, format!("unknown match field {key:?}")))?;
    let (v, mask) = parse_masked(named, value).map_err(|e| err(voff, value, e))?;
    // A match holds the L4 ports once (`tcp_dst` and `tp_dst` are the same bits).
    m.set(named.storage(), v, mask);
    Ok(())
}

/// Why field `f` of match `m` lacks its prerequisites, if it does. A match may name
/// `nw_src`/`nw_dst` under `arp` too (they are ARP's addresses there).
fn unmet(m: &Match, f: Field) -> Option<String> {
    let eth = m.get(Field::EthType).map(|(v, _)| v);
    let proto = m.get(Field::IpProto).map(|(v, _)| v);
    if matches!(f, Field::IpSrc | Field::IpDst) && eth == Some(ETH_ARP) {
        return None;
    }
    field::prerequisite(f, eth, proto).err().map(|need| {
        let need = if matches!(f, Field::IpSrc | Field::IpDst) {
            "ip or arp"
        } else {
            need
        };
        format!("{} needs {need}", f.match_name())
    })
}

/// The fields of `m` that lack their prerequisites. OVS drops them from the match silently (an
/// INFO log line, "normalization changed ofp_match"), which is how a flow meant for one port
/// ends up matching every packet.
fn unmet_prerequisites(m: &Match) -> Vec<Field> {
    m.fields
        .keys()
        .copied()
        .filter(|f| unmet(m, *f).is_some())
        .collect()
}

/// Refuses a match with a field whose prerequisites are missing.
fn check_prerequisites(m: &Match, offset: usize, text: &str) -> Result<(), ParseError> {
    match m.fields.keys().find_map(|f| unmet(m, *f)) {
        Some(why) => Err(err(offset, text, why)),
        None => Ok(()),
    }
}

fn parse_nat(offset: usize, text: &str) -> Result<Nat, ParseError> {
    let mut nat = Nat::default();
    let Some(inner) = text.strip_prefix("nat") else {
        return Err(err(offset, text, "expected nat"));
    };
    if inner.is_empty() {
        return Ok(nat);
    }
    let inner = inner
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| err(offset, text, "expected nat(...)"))?;
    for (o, part) in split_top(inner, offset + 4, false)? {
        match part {
            "random" | "persistent" | "hash" => nat.flags.push(part.to_string()),
            _ => {
                let (kind, range) = part
                    .split_once('=')
                    .ok_or_else(|| err(o, part, "expected src=... or dst=..."))?;
                nat.src = Some(match kind {
                    "src" => true,
                    "dst" => false,
                    _ => return Err(err(o, part, "expected src or dst")),
                });
                let (ips, ports) = match range.split_once(':') {
                    Some((i, p)) => (i, Some(p)),
                    None => (range, None),
                };
                let ip = |t: &str| -> Result<u32, ParseError> {
                    t.parse::<std::net::Ipv4Addr>()
                        .map(u32::from)
                        .map_err(|_| err(o, t, "expected an IPv4 address"))
                };
                let (a, b) = ips.split_once('-').unwrap_or((ips, ips));
                nat.ip_min = Some(ip(a)?);
                nat.ip_max = Some(ip(b)?);
                if let Some(p) = ports {
                    let (a, b) = p.split_once('-').unwrap_or((p, p));
                    nat.port_min = Some(number(o, a, "port")?);
                    nat.port_max = Some(number(o, b, "port")?);
                }
            }
        }
    }
    Ok(nat)
}

fn parse_ct(offset: usize, args: &str) -> Result<Action, ParseError> {
    let mut commit = false;
    let mut table = None;
    let mut zone = None;
    let mut exec = Vec::new();
    let mut nat = None;
    for (o, part) in split_top(args, offset, false)? {
        if part == "commit" {
            commit = true;
        } else if let Some(t) = part.strip_prefix("table=") {
            table = Some(number(o + 6, t, "ct table")?);
        } else if let Some(z) = part.strip_prefix("zone=") {
            zone = Some(if z.contains('[') {
                CtZone::Field(parse_subfield(o + 5, z)?)
            } else {
                CtZone::Imm(number(o + 5, z, "ct zone")?)
            });
        } else if let Some(e) = part.strip_prefix("exec(") {
            let inner = e
                .strip_suffix(')')
                .ok_or_else(|| err(o, part, "expected exec(...)"))?;
            for (ao, a) in split_top(inner, o + 5, false)? {
                if a.starts_with("nat") {
                    nat = Some(parse_nat(ao, a)?);
                } else {
                    let act = parse_action(ao, a)?;
                    match &act {
                        Action::SetField { field, .. }
                        | Action::Load {
                            dst: Subfield { field, .. },
                            ..
                        } if matches!(field, Field::CtMark | Field::CtLabel) => {}
                        _ => return Err(err(ao, a, "ct exec may only set ct_mark or ct_label")),
                    }
                    exec.push(act);
                }
            }
        } else if part.starts_with("nat") {
            nat = Some(parse_nat(o, part)?);
        } else {
            return Err(err(o, part, "unknown ct argument"));
        }
    }
    if !commit && !exec.is_empty() {
        return Err(err(offset, args, "ct exec needs commit"));
    }
    Ok(Action::Ct {
        commit,
        table,
        zone,
        exec,
        nat,
    })
}

fn parse_learn(offset: usize, args: &str) -> Result<Action, ParseError> {
    let mut l = Learn {
        priority: 32768,
        ..Learn::default()
    };
    let is_field = |t: &str| t.contains('[') || Field::from_name(t).is_some();
    for (o, part) in split_top(args, offset, false)? {
        if part == "delete_learned" {
            l.delete_learned = true;
            continue;
        }
        if let Some(rest) = part.strip_prefix("load:") {
            let (src, dst) = rest
                .split_once("->")
                .ok_or_else(|| err(o, part, "expected load:SRC->DST"))?;
            let dst = parse_subfield(o, dst)?;
            l.specs.push(if is_field(src) {
                LearnSpec::LoadField {
                    dst,
                    src: parse_subfield(o + 5, src)?,
                }
            } else {
                LearnSpec::LoadImm {
                    dst,
                    value: number(o + 5, src, "load value")?,
                }
            });
            continue;
        }
        if let Some(src) = part.strip_prefix("output:") {
            l.specs.push(LearnSpec::Output {
                src: parse_subfield(o + 7, src)?,
            });
            continue;
        }
        match part.split_once('=') {
            Some((k, v)) => {
                let num = |what| number::<u16>(o + k.len() + 1, v, what);
                match k {
                    "table" => l.table = number(o + 6, v, "table")?,
                    "idle_timeout" => l.idle_timeout = num("idle_timeout")?,
                    "hard_timeout" => l.hard_timeout = num("hard_timeout")?,
                    "fin_idle_timeout" => l.fin_idle_timeout = num("fin_idle_timeout")?,
                    "fin_hard_timeout" => l.fin_hard_timeout = num("fin_hard_timeout")?,
                    "priority" => l.priority = num("priority")?,
                    "cookie" => l.cookie = number(o + 7, v, "cookie")?,
                    _ => {
                        let dst = parse_subfield(o, k)?;
                        if is_field(v) {
                            l.specs.push(LearnSpec::MatchField {
                                dst,
                                src: parse_subfield(o + k.len() + 1, v)?,
                            });
                        } else {
                            let value = parse_value(dst.field, v)
                                .map_err(|e| err(o + k.len() + 1, v, e))?;
                            l.specs.push(LearnSpec::MatchImm { dst, value });
                        }
                    }
                }
            }
            None => {
                let s = parse_subfield(o, part)?;
                l.specs.push(LearnSpec::MatchField { dst: s, src: s });
            }
        }
    }
    Ok(Action::Learn(Box::new(l)))
}

/// A contiguous mask as (offset, bits).
fn contiguous(mask: u128) -> Option<(u32, u32)> {
    if mask == 0 {
        return None;
    }
    let ofs = mask.trailing_zeros();
    let bits = (mask >> ofs).trailing_ones();
    ((mask >> ofs) >> bits == 0).then_some((ofs, bits))
}

fn set_field(offset: usize, text: &str, value: &str, target: &str) -> Result<Action, ParseError> {
    let field = Field::from_name(target)
        .ok_or_else(|| err(offset, text, format!("unknown field {target:?}")))?;
    let (v, mask) = match value.split_once('/') {
        Some((v, m)) => (
            parse_value(field, v).map_err(|e| err(offset, text, e))?,
            parse_value(field, m).map_err(|e| err(offset, text, e))?,
        ),
        None => (
            parse_value(field, value).map_err(|e| err(offset, text, e))?,
            field.full_mask(),
        ),
    };
    if mask == field.full_mask() {
        return Ok(Action::SetField { field, value: v });
    }
    let (ofs, bits) =
        contiguous(mask).ok_or_else(|| err(offset, text, "only contiguous masks are supported"))?;
    Ok(Action::Load {
        dst: Subfield { field, ofs, bits },
        value: (v & mask) >> ofs,
    })
}

/// One action.
pub fn parse_action(offset: usize, text: &str) -> Result<Action, ParseError> {
    let lower = text.to_ascii_lowercase();
    let (name, arg) = match text.find([':', '(']) {
        Some(i) if text.as_bytes()[i] == b':' => (&lower[..i], Some(&text[i + 1..])),
        Some(i) => (&lower[..i], Some(&text[i..])),
        None => (lower.as_str(), None),
    };
    let aoff = offset + name.len() + 1;
    let need = |what: &str| arg.ok_or_else(|| err(offset, text, format!("{name} needs {what}")));
    let a = match name {
        "output" => {
            let p = need("a port")?;
            if p.eq_ignore_ascii_case("in_port") {
                Action::InPort
            } else if p.eq_ignore_ascii_case("local") {
                Action::Output(super::field::LOCAL_PORT)
            } else {
                Action::Output(number(aoff, p, "output port")?)
            }
        }
        "in_port" if arg.is_none() => Action::InPort,
        "local" if arg.is_none() => Action::Output(super::field::LOCAL_PORT),
        "normal" if arg.is_none() => Action::Normal,
        "controller" => match arg {
            None => Action::Controller(65535),
            Some(a) if a.starts_with('(') => {
                let inner = a.trim_start_matches('(').trim_end_matches(')');
                let n = inner.strip_prefix("max_len=").unwrap_or("65535");
                Action::Controller(number(aoff, n, "controller max_len")?)
            }
            Some(a) => Action::Controller(number(aoff, a, "controller max_len")?),
        },
        "group" => Action::Group(number(aoff, need("a group id")?, "group id")?),
        "goto_table" => Action::GotoTable(number(aoff, need("a table")?, "table")?),
        "resubmit" => {
            let a = need("a port or (port,table)")?;
            match a.strip_prefix('(').and_then(|s| s.strip_suffix(')')) {
                Some(inner) => {
                    let (p, t) = inner
                        .split_once(',')
                        .ok_or_else(|| err(aoff, a, "expected resubmit(port,table)"))?;
                    Action::Resubmit {
                        port: if p.is_empty() {
                            None
                        } else {
                            Some(number(aoff, p, "resubmit port")?)
                        },
                        table: if t.is_empty() {
                            None
                        } else {
                            Some(number(aoff, t, "resubmit table")?)
                        },
                    }
                }
                None => Action::Resubmit {
                    port: Some(number(aoff, a, "resubmit port")?),
                    table: None,
                },
            }
        }
        "push_vlan" => Action::PushVlan(number(aoff, need("an ethertype")?, "push_vlan")?),
        "pop_vlan" | "strip_vlan" if arg.is_none() => Action::PopVlan,
        "mod_vlan_vid" => {
            let v: u16 = number(aoff, need("a VLAN")?, "mod_vlan_vid")?;
            if v > 4095 {
                return Err(err(aoff, text, "mod_vlan_vid must be 0-4095"));
            }
            Action::SetField {
                field: Field::VlanVid,
                value: 0x1000 | u128::from(v),
            }
        }
        "mod_dl_src" | "mod_dl_dst" | "mod_nw_src" | "mod_nw_dst" | "mod_tp_src" | "mod_tp_dst" => {
            let field = match name {
                "mod_dl_src" => Field::EthSrc,
                "mod_dl_dst" => Field::EthDst,
                "mod_nw_src" => Field::IpSrc,
                "mod_nw_dst" => Field::IpDst,
                "mod_tp_src" => Field::TpSrc,
                _ => Field::TpDst,
            };
            let v = parse_value(field, need("a value")?).map_err(|e| err(aoff, text, e))?;
            Action::SetField { field, value: v }
        }
        "set_field" => {
            let a = need("VALUE->FIELD")?;
            let (v, f) = a
                .split_once("->")
                .ok_or_else(|| err(aoff, a, "expected set_field:VALUE->FIELD"))?;
            set_field(aoff, text, v, f)?
        }
        "load" => {
            let a = need("VALUE->DST")?;
            let (v, d) = a
                .split_once("->")
                .ok_or_else(|| err(aoff, a, "expected load:VALUE->DST"))?;
            let dst = parse_subfield(aoff + v.len() + 2, d)?;
            let value: u128 = number(aoff, v, "load value")?;
            if value > dst.mask() >> dst.ofs {
                return Err(err(
                    aoff,
                    v,
                    format!("{v} does not fit in {} bits", dst.bits),
                ));
            }
            // Kept as a load even of a whole field: added over OpenFlow 1.3 it is
            // NXAST_REG_LOAD, and OVS prints it back as `load:`.
            Action::Load { dst, value }
        }
        "move" => {
            let a = need("SRC->DST")?;
            let (s, d) = a
                .split_once("->")
                .ok_or_else(|| err(aoff, a, "expected move:SRC->DST"))?;
            let src = parse_subfield(aoff, s)?;
            let dst = parse_subfield(aoff + s.len() + 2, d)?;
            if src.bits != dst.bits {
                return Err(err(aoff, a, "move: source and destination widths differ"));
            }
            Action::Move { src, dst }
        }
        "ct" => match arg {
            None => parse_ct(aoff, "")?,
            Some(a) => {
                let inner = a
                    .strip_prefix('(')
                    .and_then(|s| s.strip_suffix(')'))
                    .ok_or_else(|| err(aoff, a, "expected ct(...)"))?;
                parse_ct(aoff + 1, inner)?
            }
        },
        "ct_clear" if arg.is_none() => Action::CtClear,
        "dec_ttl" if arg.is_none() => Action::DecTtl,
        "learn" => {
            let a = need("(...)")?;
            let inner = a
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or_else(|| err(aoff, a, "expected learn(...)"))?;
            parse_learn(aoff + 1, inner)?
        }
        _ if text.chars().all(|c| c.is_ascii_digit()) => {
            Action::Output(number(offset, text, "output port")?)
        }
        _ => return Err(err(offset, text, format!("unknown action {name:?}"))),
    };
    Ok(a)
}

/// A list of actions (`drop` alone is the empty list).
pub fn parse_actions(offset: usize, text: &str) -> Result<Vec<Action>, ParseError> {
    let parts = split_top(text, offset, false)?;
    if parts.len() == 1 && parts[0].1.eq_ignore_ascii_case("drop") {
        return Ok(Vec::new());
    }
    parts
        .into_iter()
        .map(|(o, t)| {
            if t.eq_ignore_ascii_case("drop") {
                Err(err(o, t, "drop must be the only action"))
            } else {
                parse_action(o, t)
            }
        })
        .collect()
}

/// A flow from `add-flow` text or a `dump-flows` line, normalized as OVS does: match fields
/// whose prerequisites are missing (`tp_dst` without `tcp`, `nw_dst` without `ip`) are dropped.
pub fn parse_flow(text: &str) -> Result<Flow, ParseError> {
    parse_flow_with(text, false)
}

/// The same, but a match field without its prerequisites is an error rather than dropped:
/// what a controller wants for the flows it writes itself.
pub fn parse_flow_strict(text: &str) -> Result<Flow, ParseError> {
    parse_flow_with(text, true)
}

fn parse_flow_with(text: &str, strict: bool) -> Result<Flow, ParseError> {
    let a = find_actions(text).ok_or_else(|| err(text.len(), "", "expected actions=..."))?;
    let mut flow = Flow::default();
    for (o, tok) in split_top(&text[..a], 0, true)? {
        let (key, value) = match tok.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (tok, None),
        };
        let voff = o + key.len() + 1;
        match (key, value) {
            ("cookie", Some(v)) => {
                let v = v.split('/').next().unwrap_or(v);
                flow.cookie = number(voff, v, "cookie")?;
            }
            ("table", Some(v)) => flow.table = number(voff, v, "table")?,
            ("priority", Some(v)) => flow.priority = number(voff, v, "priority")?,
            ("idle_timeout", Some(v)) => flow.idle_timeout = number(voff, v, "idle_timeout")?,
            ("hard_timeout", Some(v)) => flow.hard_timeout = number(voff, v, "hard_timeout")?,
            // Statistics and ages in dump-flows output.
            ("duration" | "n_packets" | "n_bytes" | "idle_age" | "hard_age", Some(_)) => {}
            ("reset_counts" | "no_packet_counts" | "no_byte_counts" | "send_flow_rem", None) => {}
            _ => match_token(&mut flow.matches, o, tok)?,
        }
    }
    if strict {
        check_prerequisites(&flow.matches, 0, &text[..a])?;
    } else {
        for f in unmet_prerequisites(&flow.matches) {
            flow.matches.fields.remove(&f);
        }
    }
    flow.actions = parse_actions(a + 8, &text[a + 8..])?;
    // `mod_tp_dst` names the port of whatever protocol the flow matches (OVS prints it as
    // `tcp_dst`, `udp_dst`...).
    let proto = flow.matches.get(Field::IpProto).map(|(v, _)| v);
    let eth = flow.matches.get(Field::EthType).map(|(v, _)| v);
    for act in &mut flow.actions {
        if let Action::SetField { field, .. } = act {
            *field = match (*field, proto) {
                (Field::TpSrc, Some(6)) => Field::TcpSrc,
                (Field::TpDst, Some(6)) => Field::TcpDst,
                (Field::TpSrc, Some(17)) => Field::UdpSrc,
                (Field::TpDst, Some(17)) => Field::UdpDst,
                (Field::TpSrc, Some(132)) => Field::SctpSrc,
                (Field::TpDst, Some(132)) => Field::SctpDst,
                (f, _) => f,
            };
        }
    }
    // As OVS: an action may only write (or read) a field the match guarantees exists.
    let fits = |f: Field| field::prerequisite(f, eth, proto).is_ok();
    for act in &flow.actions {
        let used: Vec<Field> = match act {
            Action::SetField { field, .. } => vec![*field],
            Action::Load { dst, .. } => vec![dst.field],
            Action::Move { src, dst } => vec![src.field, dst.field],
            Action::DecTtl => vec![Field::IpTtl],
            _ => vec![],
        };
        if let Some(f) = used.into_iter().find(|f| !fits(*f)) {
            return Err(err(
                a + 8,
                &text[a + 8..],
                format!("{} lacks its prerequisites in this flow's match", f.name()),
            ));
        }
    }
    Ok(flow)
}

/// A group from `add-group` text or a `dump-groups` line.
pub fn parse_group(text: &str) -> Result<Group, ParseError> {
    let first = text.find("bucket=").unwrap_or(text.len());
    let head = text[..first].trim_end_matches([',', ' ']);
    let mut group = Group {
        group_id: 0,
        group_type: GroupType::All,
        selection_method: None,
        fields: Vec::new(),
        buckets: Vec::new(),
    };
    let mut have_id = false;
    let mut have_type = false;
    for (o, tok) in split_top(head, 0, true)? {
        if let Some(inner) = tok
            .strip_prefix("fields(")
            .and_then(|s| s.strip_suffix(')'))
        {
            for (fo, f) in split_top(inner, o + 7, false)? {
                Field::from_name(f).ok_or_else(|| err(fo, f, "unknown field"))?;
                group.fields.push(f.to_string().into());
            }
            continue;
        }
        let (k, v) = tok
            .split_once('=')
            .ok_or_else(|| err(o, tok, "expected key=value"))?;
        match k {
            "group_id" => {
                group.group_id = number(o + k.len() + 1, v, "group_id")?;
                have_id = true;
            }
            "type" => {
                have_type = true;
                group.group_type = match v {
                    "all" => GroupType::All,
                    "select" => GroupType::Select,
                    "indirect" => GroupType::Indirect,
                    _ => return Err(err(o + 5, v, "type must be all, select or indirect")),
                }
            }
            "selection_method" => group.selection_method = Some(v.to_string().into()),
            "fields" => {
                Field::from_name(v).ok_or_else(|| err(o + 7, v, "unknown field"))?;
                group.fields.push(v.to_string().into());
            }
            _ => return Err(err(o, tok, format!("unknown group property {k:?}"))),
        }
    }
    if !have_id {
        return Err(err(0, text, "group_id is required"));
    }
    if !have_type {
        return Err(err(0, text, "type is required"));
    }
    // Buckets: each runs to the next top-level `bucket=`.
    let mut starts = Vec::new();
    let mut depth = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            'b' if depth == 0 && text[i..].starts_with("bucket=") => starts.push(i),
            _ => {}
        }
    }
    for (n, s) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(text.len());
        let body = text[s + 7..end].trim_end_matches([',', ' ']);
        let base = s + 7;
        let mut bucket = Bucket {
            bucket_id: n as u32,
            weight: 1,
            actions: Vec::new(),
        };
        if group.group_type != GroupType::Select {
            bucket.weight = 0;
        }
        let mut rest = body;
        let mut roff = base;
        loop {
            if let Some(v) = rest.strip_prefix("bucket_id:") {
                let end = v.find(',').unwrap_or(v.len());
                bucket.bucket_id = number(roff + 10, &v[..end], "bucket_id")?;
                let adv = 10 + end + usize::from(end < v.len());
                rest = &rest[adv..];
                roff += adv;
            } else if let Some(v) = rest.strip_prefix("weight:") {
                let end = v.find(',').unwrap_or(v.len());
                bucket.weight = number(roff + 7, &v[..end], "weight")?;
                let adv = 7 + end + usize::from(end < v.len());
                rest = &rest[adv..];
                roff += adv;
            } else {
                break;
            }
        }
        let (aoff, actions) = match rest.strip_prefix("actions=") {
            Some(a) => (roff + 8, a),
            None => (roff, rest),
        };
        bucket.actions = if actions.is_empty() {
            Vec::new()
        } else {
            parse_actions(aoff, actions)?
        };
        group.buckets.push(bucket);
    }
    Ok(group)
}
