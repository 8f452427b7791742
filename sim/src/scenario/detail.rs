//! What a seed's HTML page shows beyond its verdict: when each step ran, the faults in force,
//! NSX's requests second by second, the topology NCP built, and every connectivity check with
//! its answer. Collected only when a report page is asked for (`nsx-sim run --html`).

use std::collections::BTreeMap;

use fake_nsx_manager::kind::Kind;
use fake_nsx_manager::store::Store;
use serde::Serialize;

use super::spec::{Fault, StepKind};

/// One step: what it was and when it ran (simulated milliseconds).
#[derive(Debug, Clone, Serialize)]
pub struct StepSpan {
    pub n: usize,
    pub line: u64,
    pub kind: &'static str,
    pub what: String,
    pub start_ms: u64,
    pub end_ms: u64,
    pub ok: bool,
}

/// A fault in force from `start_ms` until healed (`end_ms`: `None` for one still in force at
/// the end, or an instant fault such as a restart).
#[derive(Debug, Clone, Serialize)]
pub struct FaultSpan {
    pub what: String,
    pub start_ms: u64,
    pub end_ms: Option<u64>,
    pub instant: bool,
}

/// NSX's requests in one simulated second: by status, and how many were writes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestSecond {
    pub second: u64,
    pub by_status: BTreeMap<u16, u64>,
    pub writes: u64,
}

/// One connectivity check and what the traced dataplane answered.
#[derive(Debug, Clone, Serialize)]
pub struct ConnCheck {
    pub at_ms: u64,
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: String,
    pub expected: bool,
    pub got: bool,
    /// The backends reached, for balanced targets.
    pub reached: Vec<String>,
}

/// One reachability matrix: expected and traced, `.` connected, `X` blocked.
#[derive(Debug, Clone, Serialize)]
pub struct MatrixCheck {
    pub at_ms: u64,
    pub port: u16,
    pub protocol: String,
    /// Sources, then destinations.
    pub rows: Vec<String>,
    pub cols: Vec<String>,
    pub expected: Vec<Vec<bool>>,
    pub got: Vec<Vec<bool>>,
}

/// A node of the topology tree: a label, and what hangs under it.
#[derive(Debug, Clone, Serialize)]
pub struct TopoNode {
    pub label: String,
    pub children: Vec<TopoNode>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Detail {
    pub steps: Vec<StepSpan>,
    pub faults: Vec<FaultSpan>,
    pub requests: Vec<RequestSecond>,
    pub connectivity: Vec<ConnCheck>,
    pub matrices: Vec<MatrixCheck>,
    /// Tier-0 -> tier-1s -> switches; load balancers; firewall sections.
    pub topology: Vec<TopoNode>,
}

/// A one-line summary of a step, for the timeline.
pub fn describe(kind: &StepKind) -> String {
    match kind {
        StepKind::Apply(docs) => {
            let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
            for d in docs {
                *kinds.entry(d["kind"].as_str().unwrap_or("?")).or_default() += 1;
            }
            let parts: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
            format!("apply {}", parts.join(", "))
        }
        StepKind::Delete(r) => format!(
            "delete {} {}{}",
            r.kind,
            r.namespace
                .as_deref()
                .map(|n| format!("{n}/"))
                .unwrap_or_default(),
            r.name
        ),
        StepKind::Wait { min, max } if min == max => format!("wait {min} ms"),
        StepKind::Wait { min, max } => format!("wait {min}-{max} ms"),
        StepKind::Converge(within) => format!("converge within {within} ms"),
        StepKind::Fault(f) => format!("fault: {}", fault_text(f)),
        StepKind::Heal(None) => "heal everything".into(),
        StepKind::Heal(Some(f)) => format!("heal: {}", fault_text(f)),
        StepKind::Expect(_) => "expect".into(),
        StepKind::Snapshot(name) => format!("snapshot {name}"),
    }
}

pub fn fault_text(f: &Fault) -> String {
    match f {
        Fault::Partition(hosts) => format!("partition {}", hosts.join(" | ")),
        Fault::Hold(hosts) => format!("hold {}", hosts.join(" | ")),
        Fault::NsxErrors(e) => format!(
            "NSX answers {} ({}%{}{})",
            e.status,
            (e.rate * 100.0).round(),
            e.method
                .as_deref()
                .map(|m| format!(" {m}"))
                .unwrap_or_default(),
            e.path
                .as_deref()
                .map(|p| format!(" {p}"))
                .unwrap_or_default()
        ),
        Fault::Latency(l) => format!(
            "latency {}-{} ms between {}",
            l.min,
            l.max,
            l.between.join(", ")
        ),
        Fault::Crash(h) => format!("crash {h}"),
        Fault::Restart(h) => format!("restart {h}"),
        Fault::RestartOvs(n) => format!("restart ovs-vswitchd on {n}"),
        Fault::RestartAgent(n) => format!("restart the agent on {n}"),
        Fault::WatchDisconnect(h) => format!("watch disconnect {h}"),
        Fault::CrashAfterWrites(c) => format!("crash {} after {} NSX writes", c.host, c.writes),
        Fault::AdminEdit(_) => "an admin edits NSX".into(),
    }
}

/// Whether a fault stays in force until healed (a span) rather than happening once.
fn lasting(f: &Fault) -> bool {
    matches!(
        f,
        Fault::Partition(_)
            | Fault::Hold(_)
            | Fault::NsxErrors(_)
            | Fault::Latency(_)
            | Fault::Crash(_)
            | Fault::CrashAfterWrites(_)
    )
}

impl Detail {
    /// Records a fault or heal step at `now_ms`.
    pub fn fault_step(&mut self, kind: &StepKind, now_ms: u64) {
        match kind {
            StepKind::Fault(f) => {
                if let Fault::Restart(h) = f {
                    // A restart ends the host's crash.
                    let crash = fault_text(&Fault::Crash(h.clone()));
                    for s in self.faults.iter_mut() {
                        if s.end_ms.is_none() && !s.instant && s.what == crash {
                            s.end_ms = Some(now_ms);
                        }
                    }
                }
                self.faults.push(FaultSpan {
                    what: fault_text(f),
                    start_ms: now_ms,
                    end_ms: None,
                    instant: !lasting(f),
                });
            }
            StepKind::Heal(which) => {
                let text = which.as_ref().map(fault_text);
                for s in self.faults.iter_mut() {
                    if s.end_ms.is_none()
                        && !s.instant
                        && text.as_ref().is_none_or(|t| *t == s.what)
                    {
                        s.end_ms = Some(now_ms);
                    }
                }
            }
            _ => {}
        }
    }

    /// NSX's request log, bucketed by simulated second (`epoch_ms` is simulated time 0).
    pub fn requests_from(
        &mut self,
        log: &[fake_nsx_manager::server::RequestLogEntry],
        epoch_ms: i64,
    ) {
        let mut by_second: BTreeMap<u64, RequestSecond> = BTreeMap::new();
        for e in log {
            let second = ((e.time_ms - epoch_ms).max(0) / 1000) as u64;
            let b = by_second.entry(second).or_insert_with(|| RequestSecond {
                second,
                ..RequestSecond::default()
            });
            *b.by_status.entry(e.status).or_default() += 1;
            if e.method != "GET" {
                b.writes += 1;
            }
        }
        self.requests = by_second.into_values().collect();
    }

    /// The topology in NSX: tier-0s with their tier-1s and those with their switches (and
    /// their ports), then load balancers with their virtual servers, then firewall sections.
    pub fn topology_from(&mut self, s: &Store) {
        let name = |id: &str| {
            s.object(id)
                .and_then(|o| o.str("display_name"))
                .unwrap_or(id)
                .to_string()
        };
        let routers: Vec<(&String, String)> = s
            .ids_of(Kind::LogicalRouter)
            .filter_map(|id| {
                let t = s.object(id)?.str("router_type")?.to_string();
                Some((id, t))
            })
            .collect();
        // tier-1 -> tier-0, switch -> tier-1, from the router ports.
        let mut tier0_of: BTreeMap<String, String> = BTreeMap::new();
        let mut switches_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for rp in s.ids_of(Kind::LogicalRouterPort) {
            let Some(o) = s.object(rp) else { continue };
            let router = o.str("logical_router_id").unwrap_or("").to_string();
            let target = |field: &str| {
                o.doc
                    .get(field)
                    .and_then(|l| l.get("target_id"))
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            };
            match o.resource_type() {
                "LogicalRouterLinkPortOnTIER1" => {
                    if let Some(peer) = target("linked_logical_router_port_id")
                        && let Some(t0) = s.object(&peer).and_then(|p| p.str("logical_router_id"))
                    {
                        tier0_of.insert(router, t0.to_string());
                    }
                }
                "LogicalRouterDownLinkPort" => {
                    if let Some(lsp) = target("linked_logical_switch_port_id")
                        && let Some(sw) = s.object(&lsp).and_then(|p| p.str("logical_switch_id"))
                    {
                        switches_of.entry(router).or_default().push(sw.to_string());
                    }
                }
                _ => {}
            }
        }
        let mut ports_on: BTreeMap<String, usize> = BTreeMap::new();
        for p in s.ids_of(Kind::LogicalPort) {
            if let Some(sw) = s.object(p).and_then(|o| o.str("logical_switch_id")) {
                *ports_on.entry(sw.to_string()).or_default() += 1;
            }
        }
        let switch_node = |sw: &str| TopoNode {
            label: format!(
                "switch {} ({} ports)",
                name(sw),
                ports_on.get(sw).copied().unwrap_or(0)
            ),
            children: vec![],
        };
        let tier1_node = |t1: &str| TopoNode {
            label: format!("tier-1 {}", name(t1)),
            children: switches_of
                .get(t1)
                .into_iter()
                .flatten()
                .map(|sw| switch_node(sw))
                .collect(),
        };
        for (t0, _) in routers.iter().filter(|(_, t)| t == "TIER0") {
            self.topology.push(TopoNode {
                label: format!("tier-0 {}", name(t0)),
                children: routers
                    .iter()
                    .filter(|(id, t)| t == "TIER1" && tier0_of.get(*id) == Some(*t0))
                    .map(|(id, _)| tier1_node(id))
                    .collect(),
            });
        }
        let unlinked: Vec<TopoNode> = routers
            .iter()
            .filter(|(id, t)| t == "TIER1" && !tier0_of.contains_key(*id))
            .map(|(id, _)| tier1_node(id))
            .collect();
        if !unlinked.is_empty() {
            self.topology.push(TopoNode {
                label: "tier-1s linked to no tier-0".into(),
                children: unlinked,
            });
        }
        let mut lbs = Vec::new();
        for lb in s.ids_of(Kind::LbService) {
            let Some(o) = s.object(lb) else { continue };
            let vss: Vec<TopoNode> = o
                .doc
                .get("virtual_server_ids")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str())
                .map(|vs| {
                    let d = s.object(vs);
                    TopoNode {
                        label: format!(
                            "virtual server {} {}:{}",
                            name(vs),
                            d.and_then(|d| d.str("ip_address")).unwrap_or("?"),
                            d.and_then(|d| d.str("port")).unwrap_or("?")
                        ),
                        children: vec![],
                    }
                })
                .collect();
            lbs.push(TopoNode {
                label: format!(
                    "load balancer {} ({})",
                    name(lb),
                    o.str("size").unwrap_or("SMALL")
                ),
                children: vss,
            });
        }
        if !lbs.is_empty() {
            self.topology.push(TopoNode {
                label: "load balancers".into(),
                children: lbs,
            });
        }
        let sections: Vec<TopoNode> = s
            .section_order()
            .iter()
            .map(|sec| TopoNode {
                label: format!("section {} ({} rules)", name(sec), s.rules_of(sec).len()),
                children: vec![],
            })
            .collect();
        if !sections.is_empty() {
            self.topology.push(TopoNode {
                label: "distributed firewall, in order".into(),
                children: sections,
            });
        }
    }
}
