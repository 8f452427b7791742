//! The module structure of `nsx-core` holds: no two modules use each other (directly or around
//! a cycle), and a top-level module uses only the layers below it. Read from the sources, so a
//! new `use` that breaks either fails here with the path that does it.
//!
//! Layers, lowest first: what a layer may use is every layer before it.
//! 1. `hash`, `rng`: fixed hashes and the seeded random source;
//! 2. `nsx`, `k8s`, `ovs`: the models and clients of what the system talks to;
//! 3. `cni`: the plugin's protocol and its wire to the agent;
//! 4. `ncp`, `agent`, `proxy`: the three programs, which share nothing but the layers below.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const LAYERS: &[&[&str]] = &[
    &["hash", "rng"],
    &["nsx", "k8s", "ovs"],
    &["cni"],
    &["ncp", "agent", "proxy"],
];

/// Module path (`ncp::plan`) -> source without comments and without its test module.
fn modules() -> BTreeMap<String, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read core/src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path
                .strip_prefix(&root)
                .expect("under src")
                .with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
                parts.pop();
            }
            let text = std::fs::read_to_string(&path).expect("read source");
            let code = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            out.insert(parts.join("::"), code);
        }
    }
    out
}

fn ident_at(s: &str) -> Option<&str> {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    (end > 0).then(|| &s[..end])
}

/// The segments of every `crate::...` and `super::...` path in `code`, with a `{...}` group
/// expanded one level (`super::{a::X, b}` names `super::a` and `super::b`).
fn paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let mut segs = vec![start.trim_end_matches("::").to_string()];
            let mut rest = &code[at + start.len()..];
            loop {
                if let Some(group) = rest.strip_prefix('{') {
                    let close = group.find('}').unwrap_or(group.len());
                    for item in group[..close].split(',') {
                        let item = item.trim();
                        if let Some(id) = ident_at(item) {
                            let mut p = segs.clone();
                            p.push(id.to_string());
                            out.push(p);
                        }
                    }
                    break;
                }
                let Some(id) = ident_at(rest) else { break };
                segs.push(id.to_string());
                rest = &rest[id.len()..];
                match rest.strip_prefix("::") {
                    Some(r) => rest = r,
                    None => break,
                }
            }
            out.push(segs);
        }
    }
    out
}

/// The module a path in module `from` names (the longest known prefix), if another one.
fn target(from: &str, segs: &[String], known: &BTreeMap<String, String>) -> Option<String> {
    let mut path: Vec<&str> = from.split("::").filter(|s| !s.is_empty()).collect();
    let mut rest = segs;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            path.clear();
            rest = &rest[1..];
        }
        Some("super") => {
            while rest.first().is_some_and(|s| s == "super") {
                path.pop();
                rest = &rest[1..];
            }
        }
        _ => return None,
    }
    let mut best = None;
    for s in rest {
        path.push(s);
        let p = path.join("::");
        if known.contains_key(&p) {
            best = Some(p);
        }
    }
    best.filter(|t| {
        t != from && !from.starts_with(&format!("{t}::")) && !t.starts_with(&format!("{from}::"))
    })
}

fn edges() -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let known = modules();
    let mut edges: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for (m, code) in &known {
        for segs in paths(code) {
            if let Some(t) = target(m, &segs, &known) {
                edges
                    .entry(m.clone())
                    .or_default()
                    .entry(t)
                    .or_default()
                    .push(segs.join("::"));
            }
        }
    }
    edges
}

fn layer(module: &str) -> Option<usize> {
    let top = module.split("::").next()?;
    LAYERS.iter().position(|l| l.contains(&top))
}

#[test]
fn every_top_level_module_has_a_layer() {
    let known = modules();
    let tops: BTreeSet<&str> = known
        .keys()
        .filter_map(|m| m.split("::").next())
        .filter(|t| !t.is_empty())
        .collect();
    let missing: Vec<_> = tops.iter().filter(|t| layer(t).is_none()).collect();
    assert!(missing.is_empty(), "modules without a layer: {missing:?}");
    assert!(known.contains_key("ncp::vocab") && known.contains_key("ovs::pipeline"));
}

#[test]
fn modules_use_only_lower_layers() {
    let mut bad = Vec::new();
    for (from, tos) in edges() {
        for (to, via) in tos {
            let (Some(a), Some(b)) = (layer(&from), layer(&to)) else {
                continue;
            };
            let same_top = from.split("::").next() == to.split("::").next();
            if !same_top && b >= a {
                bad.push(format!("{from} -> {to} (via {})", via[0]));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "uses of a layer not below:\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_module_depends_on_itself_through_others() {
    let edges = edges();
    // Tarjan would name the components; a depth-first search for a back edge names a cycle,
    // which is what a reader needs to break it.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeMap<String, Vec<String>>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for next in edges.get(m).into_iter().flat_map(|t| t.keys()) {
            match state.get(next).copied().unwrap_or(0) {
                1 => {
                    let i = stack.iter().position(|s| s == next).unwrap_or(0);
                    let mut cycle = stack[i..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(next, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in edges.keys() {
        if state.get(m).copied().unwrap_or(0) == 0 {
            let cycle = visit(m, &edges, &mut state, &mut Vec::new());
            assert!(
                cycle.is_none(),
                "an import cycle: {}",
                cycle.unwrap_or_default().join(" -> ")
            );
        }
    }
}

#[test]
fn the_reader_sees_uses_through_groups_and_super() {
    // The scanner itself: a grouped import names each module, `super` climbs.
    let mut known = BTreeMap::new();
    for m in [
        "ncp",
        "ncp::plan",
        "ncp::vocab",
        "ncp::render",
        "ovs",
        "ovs::pipeline",
    ] {
        known.insert(m.to_string(), String::new());
    }
    let found: BTreeSet<String> =
        paths("use super::{vocab::Key, render};\nlet x = crate::ovs::pipeline::table::FORWARD;")
            .iter()
            .filter_map(|p| target("ncp::plan", p, &known))
            .collect();
    assert_eq!(
        found,
        ["ncp::render", "ncp::vocab", "ovs::pipeline"]
            .map(String::from)
            .into_iter()
            .collect()
    );
}
