//! Golden snapshots of the realized state: NSX objects of the cluster and every node's OVS
//! flows and groups, with what varies from seed to seed (ids, addresses, cookies, port
//! numbers, revisions) redacted, so one file holds for every seed. A missing or different
//! snapshot fails the step unless snapshots are being updated (`nsx-sim run
//! --update-snapshots`).
//!
//! The files are insta's (`snapshots/<scenario>__<label>.snap`: a YAML header between `---`
//! lines, then the snapshot), so the bundled suite's snapshots are also checked by an insta
//! test (`sim/tests/sim/scenarios.rs`) and `cargo insta review` works on them; `nsx-sim`
//! compares the part after the header, which is all insta compares too.

use std::path::PathBuf;

use serde_json::Value;

use super::world::World;

/// Where the snapshot of `label` lives.
pub fn path(w: &World, label: &str) -> PathBuf {
    w.sc.file
        .parent()
        .unwrap_or_else(|| std::path::Path::new("."))
        .join("snapshots")
        .join(format!("{}__{label}.snap", w.sc.name))
}

/// Replaces every dotted quad, MAC, hex number and UUID-like id in `s`.
fn redact(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut token = String::new();
    let flush = |token: &mut String, out: &mut String| {
        if token.is_empty() {
            return;
        }
        let t = token.as_str();
        let is_ip = t.split('.').count() == 4
            && t.split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        let is_mac = t.split(':').count() == 6
            && t.split(':')
                .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
        let is_hex = t.starts_with("0x") && t.len() > 2;
        let is_id = t.len() >= 16 && t.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        let ip_port = t.rsplit_once(':').filter(|(ip, port)| {
            ip.split('.').count() == 4
                && ip
                    .split('.')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
        });
        if is_ip {
            out.push_str("<ip>");
        } else if let Some((_, port)) = ip_port {
            out.push_str("<ip>:");
            out.push_str(port);
        } else if is_mac {
            out.push_str("<mac>");
        } else if is_hex {
            out.push_str("<hex>");
        } else if is_id {
            out.push_str("<id>");
        } else {
            out.push_str(t);
        }
        token.clear();
    };
    let mut chars = s.chars().peekable();
    while let Some(ch) = chars.next() {
        // `->` (a flow action's destination) ends a token: `set_field:10.4.0.2->ip_dst`.
        let arrow = ch == '-' && chars.peek() == Some(&'>');
        // `set_field:` ends one too, so the value after it is a token of its own.
        if ch == ':' && token == "field" {
            token.push(ch);
            out.push_str(&token);
            token.clear();
        } else if !arrow && (ch.is_ascii_alphanumeric() || ch == '.' || ch == ':' || ch == '-') {
            token.push(ch);
        } else {
            flush(&mut token, &mut out);
            out.push(ch);
        }
    }
    flush(&mut token, &mut out);
    // Hex numbers anywhere (register loads, masks, cookies).
    let mut hexless = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find("0x") {
        hexless.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let n = after.bytes().take_while(u8::is_ascii_hexdigit).count();
        if n > 0 {
            hexless.push_str("<hex>");
        } else {
            hexless.push_str("0x");
        }
        rest = &after[n..];
    }
    hexless.push_str(rest);
    // Port numbers, bucket ids and the like are numbers after these keys.
    let mut r = hexless;
    for key in [
        "bucket_id:",
        "in_port=",
        "output:",
        "reg5=",
        "reg7=",
        "group_id=",
        "group:",
        "vlan_vid=",
        "dl_vlan=",
        "set_field:",
        "load:",
        "mod_vlan_vid:",
        "traffic_tag\":",
        "vlan\":",
        "nodePort\":",
        "n_packets=",
        "n_bytes=",
    ] {
        let mut s2 = String::new();
        let mut rest = r.as_str();
        while let Some(i) = rest.find(key) {
            s2.push_str(&rest[..i + key.len()]);
            rest = &rest[i + key.len()..];
            let n = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
            if n > 0 {
                s2.push('N');
                rest = &rest[n..];
            }
        }
        s2.push_str(rest);
        r = s2;
    }
    r
}

/// The redacted state, one line per object, flow and group, sorted.
pub fn render(w: &World) -> String {
    let cluster = w.sc.cluster.name.clone();
    let mut nsx: Vec<String> = w.nsx.inspect(|s| {
        s.objects()
            .filter(|o| {
                o.doc
                    .get("tags")
                    .and_then(Value::as_array)
                    .is_some_and(|t| {
                        t.iter()
                            .any(|t| t["scope"] == "ncp/cluster" && t["tag"] == cluster.as_str())
                    })
            })
            .map(|o| {
                let mut tags: Vec<String> = o
                    .doc
                    .get("tags")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|t| !t["scope"].as_str().unwrap_or("").ends_with("uid"))
                    .map(|t| {
                        format!(
                            "{}={}",
                            t["scope"].as_str().unwrap_or(""),
                            t["tag"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                tags.sort();
                redact(&format!(
                    "{} {:?} [{}]",
                    o.doc
                        .get("resource_type")
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                    o.doc
                        .get("display_name")
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                    tags.join(" ")
                ))
            })
            .collect()
    });
    nsx.sort();
    let mut out = format!("# {} NSX objects of cluster {cluster}\n", nsx.len());
    for l in nsx {
        out.push_str(&l);
        out.push('\n');
    }
    for (name, n) in &w.nodes {
        let Ok(b) = n.bridge.try_lock() else { continue };
        let mut flows: Vec<String> = b
            .dump_flows(false)
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("NXST") && !l.starts_with("OFPST"))
            .map(|l| redact(l.trim()))
            .collect();
        flows.sort();
        let mut groups: Vec<String> = b
            .dump_groups()
            .lines()
            .filter(|l| l.trim().starts_with("group_id"))
            .map(|l| redact(l.trim()))
            .collect();
        groups.sort();
        out.push_str(&format!(
            "# {name}: {} flows, {} groups\n",
            flows.len(),
            groups.len()
        ));
        for l in flows.into_iter().chain(groups) {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

/// An insta file as (the lines of its header, the snapshot): a file without a header is all
/// snapshot; the trailing newlines insta ignores are left out.
pub fn split(file: &str) -> (usize, &str) {
    let (header_lines, body) = file
        .strip_prefix("---\n")
        .and_then(|rest| rest.split_once("\n---\n"))
        .map_or((0, file), |(meta, body)| (meta.lines().count() + 2, body));
    (header_lines, body.trim_end_matches('\n'))
}

/// An insta file holding `snapshot`.
pub fn file_text(w: &World, label: &str, snapshot: &str) -> String {
    format!(
        "---\nsource: {}\nexpression: snapshot {label}\n---\n{}\n",
        w.sc.file.display(),
        snapshot.trim_end_matches('\n')
    )
}

/// Compares (or writes) the snapshot.
pub fn check(w: &World, label: &str, update: bool) -> Result<(), String> {
    let p = path(w, label);
    let now = render(w);
    let file = std::fs::read_to_string(&p).ok();
    // The header's lines count in a message that names the file's line.
    let (header_lines, old) = match file.as_deref().map(split) {
        Some((h, body)) => (h, Some(body)),
        None => (0, None),
    };
    if old == Some(now.trim_end_matches('\n')) {
        return Ok(());
    }
    if update {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        return std::fs::write(&p, file_text(w, label, &now))
            .map_err(|e| format!("{}: {e}", p.display()));
    }
    match old {
        None => Err(format!(
            "snapshot {} does not exist (run with --update-snapshots to write it)",
            p.display()
        )),
        Some(old) => {
            let (a, b): (Vec<&str>, Vec<&str>) = (old.lines().collect(), now.lines().collect());
            let first = a
                .iter()
                .zip(&b)
                .position(|(x, y)| x != y)
                .unwrap_or(a.len().min(b.len()));
            Err(format!(
                "snapshot {} differs at line {}: expected {:?}, got {:?}",
                p.display(),
                header_lines + first + 1,
                a.get(first).copied().unwrap_or("<end>"),
                b.get(first).copied().unwrap_or("<end>")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn addresses_written_by_actions_are_redacted_like_matched_ones() {
        assert_eq!(
            redact(
                "priority=210,ip,nw_dst=10.4.0.2 actions=set_field:10.4.0.2->ip_dst,\
                 set_field:02:50:56:00:00:01->eth_dst,set_field:4101->vlan_vid,\
                 set_field:0x3->reg1,move:NXM_OF_ETH_DST[]->NXM_OF_ETH_SRC[]"
            ),
            "priority=210,ip,nw_dst=<ip> actions=set_field:<ip>->ip_dst,\
             set_field:<mac>->eth_dst,set_field:N->vlan_vid,\
             set_field:<hex>->reg1,move:NXM_OF_ETH_DST[]->NXM_OF_ETH_SRC[]"
        );
    }
}
