//! The plan: what to do to NSX so that it holds the desired state. Pure: desired, observed and
//! the admin infra in, an ordered list of operations out; no I/O, no clock, no randomness.
//!
//! **What it decides, per identity**
//! - observed but not desired: delete (garbage collection, also of what vanished while NCP was
//!   down); observed more than once: keep the oldest, delete the others (duplicates);
//! - desired but not observed: create;
//! - both: compare the fields NCP owns (name, tags, and the kind's own fields). A difference in
//!   a field NSX lets change is an update; in an immutable field (a port's switch, a router
//!   port's links) a replacement (delete, then create). An object whose parent is being
//!   created is replaced too: it points at the parent's old id.
//! - a pod's VLAN: kept from its observed port; a new port gets the lowest VLAN (1-4093) not used
//!   under its node's VIF by any observed port, not even one about to be deleted, so that a
//!   failed delete can never leave two pods on one VLAN.
//! - SNAT addresses allocated in the external pool that no kept SNAT rule carries are released
//!   (an allocation whose rule was never created because NCP crashed in between).
//!
//! **Order**: deletes first, children before parents (router downlinks, ports, link ports,
//! routers, switches, pools, subnets), then creates and updates, parents before children.
//! A converged cluster plans no operation at all.
//!
//! **Cost**: linear in the number of objects, with map lookups; no NSX call.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::infra::Infra;
use super::naming::scope;
use super::observe::{Known, Observed};
use super::render::{Resolve, render};
use super::vocab::{Desired, Detail, Key, Selection, Spec};

/// One step of a plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Create {
        key: Key,
        spec: Spec,
    },
    Update {
        key: Key,
        id: String,
        spec: Spec,
    },
    Delete {
        key: Key,
        doc: Value,
    },
    /// Release an address NCP allocated that nothing uses any more (a SNAT address without its
    /// rule, a LoadBalancer VIP whose service is gone).
    ReleaseIp {
        pool: String,
        ip: String,
    },
}

/// A desired object that cannot be realized now, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Unrealizable {
    pub key: Key,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub unrealizable: Vec<Unrealizable>,
    /// LoadBalancer services (by uid) whose virtual servers the load balancer has no room
    /// for, with why: they are among `unrealizable`.
    pub lb_full: BTreeMap<String, String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Operations that write to NSX (every op does; creates of tier-1 routers and SNAT rules
    /// take more than one request).
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// The observed objects that stay (wanted, the oldest of their key), looked up in place: a
/// copy of the map would cost a pass the size of the cluster in key clones.
struct Kept<'a> {
    observed: &'a Observed,
    desired: &'a Desired,
}

impl<'a> Kept<'a> {
    fn get(&self, key: &Key) -> Option<&'a Value> {
        if self.desired.objects.contains_key(key) {
            self.observed.get(key)
        } else {
            None
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&'a Key, &'a Value)> + '_ {
        let desired = self.desired;
        self.observed
            .objects
            .iter()
            .filter(move |(k, _)| desired.objects.contains_key(*k))
            .filter_map(|(k, v)| v.first().map(|d| (k, d)))
    }
}

impl Resolve for Kept<'_> {
    fn resolve(&self, key: &Key) -> Option<&Value> {
        self.get(key)
    }
}

/// A rule as NCP compares it: what it owns, in one string, with lists in a fixed order.
fn rule_digest(r: &Value) -> String {
    let ids = |field: &str| -> String {
        let mut v: Vec<&str> = r[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["target_id"].as_str())
            .collect();
        v.sort();
        v.join(",")
    };
    let mut services: Vec<String> = r["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let e = &s["service"];
            let mut ports: Vec<&str> = e["destination_ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            ports.sort();
            format!(
                "{}:{}:{}:{}:{}",
                e["resource_type"].as_str().unwrap_or(""),
                e["l4_protocol"].as_str().unwrap_or(""),
                ports.join("+"),
                e["protocol_number"],
                s["target_id"].as_str().unwrap_or("")
            )
        })
        .collect();
    services.sort();
    format!(
        "{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
        r["display_name"].as_str().unwrap_or(""),
        r["action"].as_str().unwrap_or(""),
        r["direction"].as_str().unwrap_or("IN_OUT"),
        ids("sources"),
        ids("destinations"),
        ids("applied_tos"),
        services.join(";"),
        r["disabled"].as_bool().unwrap_or(false),
        r["sources_excluded"].as_bool().unwrap_or(false),
        r["destinations_excluded"].as_bool().unwrap_or(false),
        r["ip_protocol"].as_str().unwrap_or("IPV4_IPV6"),
    )
}

/// An NSGroup criterion as NCP compares it.
fn criterion_digest(c: &Value) -> String {
    let one = |e: &Value| {
        format!(
            "{}:{}={}",
            e["target_type"].as_str().unwrap_or(""),
            e["scope"].as_str().unwrap_or(""),
            e["tag"]
                .as_str()
                .map_or("*".to_string(), |t| format!("'{t}'"))
        )
    };
    match c["expressions"].as_array() {
        Some(es) => {
            let mut v: Vec<String> = es.iter().map(one).collect();
            v.sort();
            v.join("&")
        }
        None => one(c),
    }
}

/// Fields NCP owns beyond name and tags: (changeable, immutable), as dotted paths.
pub(super) fn owned(key: &Key) -> (&'static [&'static str], &'static [&'static str]) {
    match key {
        Key::NsGroup(_)
        | Key::PolicyGroup(_)
        | Key::PolicyIpSet(_)
        | Key::FwMarkerTop(_)
        | Key::FwMarkerBottom(_)
        | Key::NodeIpSet(_)
        | Key::PodsGroup(_) => (&[], &[]),
        Key::AllowSection(_) | Key::IsolationSection(_) | Key::NodeSection(_) => {
            (&[], &["stateful", "section_type"])
        }
        Key::LbTier1(_) => (&["edge_cluster_id"], &["router_type"]),
        Key::LbT0Link(_) => (&[], &["logical_router_id"]),
        Key::LbT1Link(_) => (
            &[],
            &[
                "logical_router_id",
                "linked_logical_router_port_id.target_id",
            ],
        ),
        Key::LbService(_) => (&["enabled", "size"], &["attachment.target_id"]),
        Key::LbPersistence(_) => (&["timeout", "purge", "persistence_shared"], &[]),
        Key::LbPool(_) => (&["algorithm", "snat_translation"], &[]),
        Key::LbVirtualServer(_) => (
            &[
                "port",
                "ip_protocol",
                "pool_id",
                "application_profile_id",
                "persistence_profile_id",
                "enabled",
            ],
            &[],
        ),
        Key::Subnet(_) => (&[], &["block_id", "size"]),
        Key::Pool(_) => (&["subnets"], &[]),
        Key::Switch(_) => (&["ip_pool_id", "admin_state"], &["transport_zone_id"]),
        Key::Tier1(_) => (&[], &["router_type"]),
        Key::T0Link(_) => (&[], &["logical_router_id"]),
        Key::T1Link(_) => (
            &[],
            &[
                "logical_router_id",
                "linked_logical_router_port_id.target_id",
            ],
        ),
        Key::DownlinkSwitchPort(_) => (&["admin_state"], &["logical_switch_id"]),
        Key::Downlink(_) => (
            &["subnets"],
            &[
                "logical_router_id",
                "linked_logical_switch_port_id.target_id",
            ],
        ),
        Key::Snat(_) => (&["action", "match_source_network", "enabled"], &[]),
        Key::PodPort(_) => (
            &[
                "admin_state",
                "attachment.id",
                "attachment.context.vif_type",
                "attachment.context.parent_vif_id",
                "attachment.context.app_id",
                "attachment.context.allocate_addresses",
                "attachment.context.traffic_tag",
            ],
            &["logical_switch_id"],
        ),
    }
}

fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

fn tag_set(v: &Value) -> BTreeSet<(String, String)> {
    v["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            (
                t["scope"].as_str().unwrap_or("").to_string(),
                t["tag"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// How an observed object differs from what NCP wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drift {
    None,
    Update,
    Replace,
}

/// Compares NCP's fields of `want` (a rendered body) with `have` (the observed document).
pub fn drift(key: &Key, want: &Value, have: &Value) -> Drift {
    let (changeable, immutable) = owned(key);
    if immutable.iter().any(|p| at(want, p) != at(have, p)) {
        return Drift::Replace;
    }
    // Lists the manager fills in (pool members get weights and states) or keeps in its own
    // order compare as sets of what NCP owns.
    let set_of = |v: &Value, path: &str, f: &dyn Fn(&Value) -> String| -> BTreeSet<String> {
        at(v, path)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(f)
            .collect()
    };
    let member = |m: &Value| {
        format!(
            "{}:{}",
            m["ip_address"].as_str().unwrap_or(""),
            m["port"].as_str().unwrap_or("")
        )
    };
    let plain = |m: &Value| m.as_str().unwrap_or("").to_string();
    let lists_differ = match key {
        Key::LbPool(_) => set_of(want, "members", &member) != set_of(have, "members", &member),
        Key::LbService(_) => {
            set_of(want, "virtual_server_ids", &plain) != set_of(have, "virtual_server_ids", &plain)
        }
        Key::NsGroup(_) | Key::PolicyGroup(_) | Key::PodsGroup(_) => {
            let member = |m: &Value| {
                format!(
                    "{}:{}",
                    m["target_type"].as_str().unwrap_or(""),
                    m["value"].as_str().unwrap_or("")
                )
            };
            set_of(want, "members", &member) != set_of(have, "members", &member)
                || set_of(want, "membership_criteria", &criterion_digest)
                    != set_of(have, "membership_criteria", &criterion_digest)
        }
        Key::PolicyIpSet(_) | Key::NodeIpSet(_) => {
            set_of(want, "ip_addresses", &plain) != set_of(have, "ip_addresses", &plain)
        }
        Key::AllowSection(_) | Key::IsolationSection(_) | Key::NodeSection(_) => {
            // Observed sections carry their rules (read with the section), in the order NSX
            // evaluates them: a reordered rule is drift.
            let digests = |v: &Value| -> Vec<String> {
                v["rules"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(rule_digest)
                    .collect()
            };
            digests(want) != digests(have)
        }
        _ => false,
    };
    let differs = lists_differ
        || want["display_name"] != have["display_name"]
        || tag_set(want) != tag_set(have)
        || changeable.iter().any(|p| at(want, p) != at(have, p));
    if differs { Drift::Update } else { Drift::None }
}

/// The value of a tag on a document.
pub fn tag_of<'a>(doc: &'a Value, scope_name: &str) -> Option<&'a str> {
    doc["tags"]
        .as_array()?
        .iter()
        .find(|t| t["scope"] == scope_name)?["tag"]
        .as_str()
}

/// Plans the operations that take NSX from `observed` to `desired`: every key is looked at.
pub fn plan(desired: &Desired, observed: &Observed, infra: &Infra) -> Plan {
    let mut p = Planner::new(desired, observed, infra, false);
    for (key, docs) in &observed.objects {
        let wanted = desired.objects.contains_key(key);
        for (i, d) in docs.iter().enumerate() {
            if !wanted || i > 0 {
                p.deletes.push((key.clone(), d.clone()));
            }
        }
    }
    // VLANs in use under each parent VIF, by every observed port (kept, duplicate or doomed).
    for (key, docs) in &observed.objects {
        if matches!(key, Key::PodPort(_)) {
            for d in docs {
                if let Some((parent, tag)) = super::observe::port_vlan(d) {
                    p.vlans.entry(parent.to_string()).or_default().insert(tag);
                }
            }
        }
    }
    let mut keys: Vec<(&Key, &Spec)> = desired.objects.iter().collect();
    keys.sort_by(|(a, _), (b, _)| (a.rank(), *a).cmp(&(b.rank(), *b)));
    for (key, wanted) in keys {
        p.key(key, wanted);
    }
    p.finish(None)
}

/// Plans only the keys in `touched`, for a cache NSX is known to match except for them
/// ([`Known::synced`]: the previous pass realized everything, and `touched` holds every
/// key whose spec appeared, changed or went away since). The cost is that of the touched keys,
/// not the cluster's. The result is the plan [`plan`] would make; `None` when this plan cannot
/// tell it without looking further (an existing object is to be recreated, so its dependents
/// are too; an object that others depend on cannot be realized), and the caller plans in full.
pub fn plan_changes(
    desired: &Desired,
    observed: &Observed,
    known: &Known,
    infra: &Infra,
    touched: &BTreeSet<Key>,
) -> Option<Plan> {
    if !known.synced {
        return None;
    }
    let mut p = Planner::new(desired, observed, infra, true);
    let mut keys: Vec<(&Key, &Spec)> = Vec::new();
    let pending = known.pending.iter().filter(|k| !touched.contains(*k));
    for key in touched.iter().chain(pending) {
        match desired.objects.get(key) {
            Some(spec) => keys.push((key, spec)),
            None => {
                for d in observed.objects.get(key).into_iter().flatten() {
                    p.deletes.push((key.clone(), d.clone()));
                }
            }
        }
    }
    keys.sort_by(|(a, _), (b, _)| (a.rank(), *a).cmp(&(b.rank(), *b)));
    for (key, wanted) in keys {
        p.key(key, wanted);
        if p.recreated
            || p.unrealizable
                .iter()
                .any(|u| !matches!(u.key, Key::PodPort(_)))
        {
            return None;
        }
    }
    Some(p.finish(Some(touched)))
}

/// What NCP knows after a pass that left `observed`: whether NSX now holds `desired` exactly but for
/// `left` (the keys refused or unrealizable, with everything that depends on them, which the
/// apply refuses in turn): then the next pass need only plan what changes, and those keys
/// again, so a refusal that lasts (an exhausted SNAT pool, a rule NSX will not take) does not
/// make every pass cost the cluster. That holds when every key left is one whose realization
/// later changes nothing else:
/// - not one a group lists by id (a pod port, a namespace's NSGroup): the group was rendered
///   without it and needs a full look once it exists;
/// - not an LB object or a firewall marker: the LB service lists the virtual servers, a
///   virtual server's VIP is allocated before it is created, and every section hangs off the
///   markers;
/// - and no SNAT address is allocated without its rule (an allocation whose rule NSX then
///   refused), which only a full plan finds and releases.
pub fn settle(observed: &Observed, desired: &Desired, left: BTreeSet<Key>) -> Known {
    let listed = |key: &Key| {
        let (uid, by_pod) = match key {
            Key::PodPort(u) => (u, true),
            Key::NsGroup(u) => (u, false),
            _ => return false,
        };
        desired
            .objects
            .range(Key::PolicyGroup(String::new())..)
            .take_while(|(k, _)| matches!(k, Key::PolicyGroup(_)))
            .any(|(_, s)| match &s.detail {
                Detail::Group {
                    selection: Selection::Pods(uids),
                } if by_pod => uids.iter().any(|u| u == uid),
                Detail::Group {
                    selection: Selection::Namespaces(uids),
                } if !by_pod => uids.iter().any(|u| u == uid),
                _ => false,
            })
    };
    let retried_alone = |key: &Key| {
        matches!(
            key,
            Key::PodPort(_)
                | Key::Subnet(_)
                | Key::Pool(_)
                | Key::Switch(_)
                | Key::Tier1(_)
                | Key::T0Link(_)
                | Key::T1Link(_)
                | Key::DownlinkSwitchPort(_)
                | Key::Downlink(_)
                | Key::Snat(_)
                | Key::NsGroup(_)
                | Key::PolicyGroup(_)
                | Key::PolicyIpSet(_)
                | Key::AllowSection(_)
                | Key::IsolationSection(_)
                | Key::NodeIpSet(_)
                | Key::PodsGroup(_)
                | Key::NodeSection(_)
        ) && !listed(key)
    };
    let snat_allocations_match_rules = || {
        let rules = observed
            .objects
            .range(Key::Snat(String::new())..)
            .take_while(|(k, _)| matches!(k, Key::Snat(_)))
            .map(|(_, docs)| docs.len())
            .sum::<usize>();
        observed.snat_allocations.len() == rules
    };
    let synced = left.iter().all(retried_alone)
        && (!left.iter().any(|k| matches!(k, Key::Snat(_))) || snat_allocations_match_rules());
    Known {
        synced,
        pending: if synced { left } else { BTreeSet::new() },
        verified: None,
    }
}

/// The state of one planning pass.
struct Planner<'a> {
    desired: &'a Desired,
    observed: &'a Observed,
    infra: &'a Infra,
    kept: Kept<'a>,
    /// VLANs in use or chosen, by parent VIF.
    vlans: BTreeMap<String, BTreeSet<i64>>,
    /// Fill `vlans` from the observation's index when a parent is first needed (an
    /// incremental plan), rather than from a pass over every port.
    vlans_from_index: bool,
    created: BTreeSet<Key>,
    skipped: BTreeSet<Key>,
    deletes: Vec<(Key, Value)>,
    upserts: Vec<Op>,
    unrealizable: Vec<Unrealizable>,
    /// Services the load balancer has no room for (see [`lb_full`]).
    lb_full: BTreeMap<String, String>,
    /// An object that exists is to be recreated.
    recreated: bool,
}

/// The LoadBalancer services whose virtual servers do not fit in the LB service's size: the
/// virtual servers that exist keep their place; the services that need new ones are taken in
/// key order while they fit whole, the others wait (all their virtual servers or none).
fn lb_full(desired: &Desired, kept: &Kept<'_>) -> BTreeMap<String, String> {
    let mut full = BTreeMap::new();
    let Some(size) = desired
        .objects
        .range(Key::LbService(String::new())..)
        .take_while(|(k, _)| matches!(k, Key::LbService(_)))
        .find_map(|(_, s)| match &s.detail {
            Detail::LbService { size, .. } => Some(size.clone()),
            _ => None,
        })
    else {
        return full;
    };
    let limit = super::config::LbSize::parse(&size).map_or(usize::MAX, |s| s.virtual_servers());
    // By service: its virtual servers, and how many of them exist.
    let mut by_service: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for (k, _) in desired
        .objects
        .range(Key::LbVirtualServer(String::new())..)
        .take_while(|(k, _)| matches!(k, Key::LbVirtualServer(_)))
    {
        let Key::LbVirtualServer(v) = k else { continue };
        let e = by_service
            .entry(v.split('/').next().unwrap_or_default())
            .or_default();
        e.0 += 1;
        e.1 += usize::from(kept.get(k).is_some());
    }
    let mut used: usize = by_service.values().map(|(_, existing)| existing).sum();
    for (svc, (total, existing)) in by_service {
        let need = total - existing;
        if need == 0 {
            continue;
        }
        if used + need <= limit {
            used += need;
        } else {
            full.insert(
                svc.to_string(),
                format!(
                    "the {size} load balancer holds {limit} virtual servers and {used} are in \
                     use: no room for this service's {need}"
                ),
            );
        }
    }
    full
}

impl<'a> Planner<'a> {
    fn new(
        desired: &'a Desired,
        observed: &'a Observed,
        infra: &'a Infra,
        vlans_from_index: bool,
    ) -> Self {
        Self {
            desired,
            observed,
            infra,
            kept: Kept { observed, desired },
            vlans: BTreeMap::new(),
            vlans_from_index,
            created: BTreeSet::new(),
            skipped: BTreeSet::new(),
            deletes: Vec::new(),
            upserts: Vec::new(),
            unrealizable: Vec::new(),
            lb_full: lb_full(desired, &Kept { observed, desired }),
            recreated: false,
        }
    }

    fn unrealizable(&mut self, key: &Key, reason: String) {
        self.unrealizable.push(Unrealizable {
            key: key.clone(),
            reason,
        });
        self.skipped.insert(key.clone());
    }

    fn recreate(&mut self, key: &Key, doc: &Value, spec: Spec) {
        self.deletes.push((key.clone(), doc.clone()));
        self.created.insert(key.clone());
        self.recreated = true;
        self.upserts.push(Op::Create {
            key: key.clone(),
            spec,
        });
    }

    /// Decides one desired key: create, update, replace, nothing, or unrealizable.
    fn key(&mut self, key: &Key, wanted: &Spec) {
        if let Key::LbVirtualServer(v) = key
            && let Some(why) = self.lb_full.get(v.split('/').next().unwrap_or_default())
        {
            let why = why.clone();
            self.unrealizable(key, why);
            return;
        }
        // Borrowed until an operation needs it: most keys of a pass need none.
        let mut spec = std::borrow::Cow::Borrowed(wanted);
        let deps = key.deps(Some(&spec.detail));
        if let Some(d) = deps
            .iter()
            .find(|d| self.skipped.contains(d) || !self.desired.objects.contains_key(d))
        {
            let reason = format!("depends on {d:?}, which cannot be realized");
            self.unrealizable(key, reason);
            return;
        }
        let have = self.kept.get(key);
        if let Detail::PodPort { node, .. } = &spec.detail {
            let node = node.clone();
            let Some(parent) = self.infra.node_vifs.get(&node) else {
                self.unrealizable(
                    key,
                    format!("node {node:?} has no VIF tagged ncp/node_name"),
                );
                return;
            };
            // A VLAN is unique under one parent: the observed one is kept only if the port
            // stays under the same parent (a pod recreated on another node gets a new one).
            let observed_tag = have
                .and_then(super::observe::port_vlan)
                .filter(|(p, _)| *p == parent.as_str())
                .map(|(_, t)| t);
            let chosen = match observed_tag {
                Some(t) if (1..=4093).contains(&t) => Some(t),
                _ => {
                    let observed = self.observed;
                    let from_index = self.vlans_from_index;
                    let used = self.vlans.entry(parent.clone()).or_insert_with(|| {
                        if from_index {
                            observed.vlans_under(parent).collect()
                        } else {
                            BTreeSet::new()
                        }
                    });
                    let free = (1..=4093).find(|v| !used.contains(v));
                    if let Some(v) = free {
                        used.insert(v);
                    }
                    free
                }
            };
            match chosen {
                Some(t) => {
                    // 0 is untagged and 4095 reserved; the agent refuses either.
                    debug_assert!((1..=4093).contains(&t), "VLAN {t} for {key:?}");
                    let t = Some(t as u16);
                    if !matches!(&spec.detail, Detail::PodPort { vlan, .. } if *vlan == t)
                        && let Detail::PodPort { vlan, .. } = &mut spec.to_mut().detail
                    {
                        *vlan = t;
                    }
                }
                None => {
                    self.unrealizable(key, format!("no free VLAN under {parent}"));
                    return;
                }
            }
        }
        let parent_recreated = deps.iter().any(|d| self.created.contains(d));
        // A group listing ports or groups by id must follow their recreation (new ids).
        let member_recreated = match &spec.detail {
            Detail::Group {
                selection: Selection::Pods(uids),
            } => uids
                .iter()
                .any(|u| self.created.contains(&Key::PodPort(u.clone()))),
            Detail::Group {
                selection: Selection::Namespaces(uids),
            } => uids
                .iter()
                .any(|u| self.created.contains(&Key::NsGroup(u.clone()))),
            _ => false,
        };
        match have {
            None => {
                self.created.insert(key.clone());
                self.upserts.push(Op::Create {
                    key: key.clone(),
                    spec: spec.into_owned(),
                });
            }
            Some(doc) if parent_recreated => self.recreate(key, doc, spec.into_owned()),
            Some(doc) if member_recreated => self.upserts.push(Op::Update {
                key: key.clone(),
                id: doc["id"].as_str().unwrap_or_default().to_string(),
                spec: spec.into_owned(),
            }),
            Some(doc) => {
                let address = match key {
                    Key::LbVirtualServer(_) => doc["ip_address"].as_str(),
                    _ => doc["translated_network"].as_str(),
                }
                .filter(|s| !s.is_empty());
                // A service that asks for another VIP than its virtual server has: a new
                // virtual server on the address asked for (the applier swaps the VIPs).
                let moved = match &spec.detail {
                    Detail::LbVirtualServer {
                        requested_ip: Some(r),
                        ..
                    } => r
                        .parse::<std::net::Ipv4Addr>()
                        .is_ok_and(|r| address.is_some_and(|a| a != r.to_string())),
                    _ => false,
                };
                let d = match render(key, &spec, self.infra, &self.kept, address) {
                    Ok(_) if moved => Drift::Replace,
                    Ok(want) => drift(key, &want, doc),
                    // A dependency exists but lacks what we need (a subnet without a cidr).
                    Err(_) => Drift::Replace,
                };
                let id = doc["id"].as_str().unwrap_or_default().to_string();
                match d {
                    Drift::None => {}
                    Drift::Update => self.upserts.push(Op::Update {
                        key: key.clone(),
                        id,
                        spec: spec.into_owned(),
                    }),
                    Drift::Replace => self.recreate(key, doc, spec.into_owned()),
                }
            }
        }
    }

    /// Orders the operations, and adds the releases and LB service updates they call for.
    /// `touched`: the keys an incremental plan looked at (`None`: all of them).
    /// The plan in the order it must run: deletes children first (with the SNAT addresses
    /// and VIPs they free, and the LB service's list updated around its virtual servers),
    /// then creates and updates, then the deletes of groups and IPSets something may still
    /// name until its update.
    fn finish(self, touched: Option<&BTreeSet<Key>>) -> Plan {
        let Planner {
            desired,
            observed,
            infra,
            kept,
            deletes,
            mut upserts,
            unrealizable,
            lb_full,
            ..
        } = self;
        let mut ops = ordered_deletes(deletes);
        // A synced cache has no SNAT address beyond those of the rules deleted here (released
        // with them), so an incremental plan need not look.
        if let (Some(pool), None) = (&infra.snat_pool, touched) {
            ops.extend(stray_snat_addresses(&ops, &kept, observed, pool));
        }
        relist_lb_service(desired, observed, &kept, &mut ops, &mut upserts);
        if let Some(pool) = &infra.lb_pool {
            ops.extend(unneeded_vips(desired, observed, touched, pool));
        }
        // Groups and IPSets go last: a section or group that stays may still name one until
        // its update (among the upserts) drops the reference, and NSX refuses to delete a
        // referenced group.
        let (late, mut ops): (Vec<Op>, Vec<Op>) = ops.into_iter().partition(|o| {
            matches!(
                o,
                Op::Delete {
                    key: Key::PolicyGroup(_)
                        | Key::PolicyIpSet(_)
                        | Key::NsGroup(_)
                        | Key::LbPersistence(_),
                    ..
                }
            )
        });
        ops.extend(upserts);
        ops.extend(late);
        debug_assert!(
            {
                let mut created = BTreeSet::new();
                ops.iter().all(|o| match o {
                    Op::Create { key, .. } => created.insert(key),
                    _ => true,
                })
            },
            "a plan creates one object per key"
        );
        Plan {
            ops,
            unrealizable,
            lb_full,
        }
    }
}

/// Deletes, children before parents (by rank, then key and id for a stable order), each SNAT
/// rule's address released right after it.
fn ordered_deletes(mut deletes: Vec<(Key, Value)>) -> Vec<Op> {
    deletes.sort_by(|a, b| {
        (std::cmp::Reverse(a.0.rank()), &a.0, a.1["id"].as_str()).cmp(&(
            std::cmp::Reverse(b.0.rank()),
            &b.0,
            b.1["id"].as_str(),
        ))
    });
    deletes
        .into_iter()
        .map(|(key, doc)| Op::Delete { key, doc })
        .collect()
}

/// SNAT addresses NCP allocated that no kept rule carries (a crash between allocating and
/// creating the rule leaves one), but for those of rules deleted in `ops`, whose delete
/// releases them.
fn stray_snat_addresses(ops: &[Op], kept: &Kept<'_>, observed: &Observed, pool: &str) -> Vec<Op> {
    let mut doomed: BTreeSet<&str> = BTreeSet::new();
    let mut released: BTreeSet<&str> = BTreeSet::new();
    for o in ops {
        if let Op::Delete {
            key: Key::Snat(_),
            doc,
        } = o
        {
            doomed.extend(doc["id"].as_str());
            released.extend(tag_of(doc, scope::SNAT_IP));
        }
    }
    let in_use: BTreeSet<&str> = kept
        .iter()
        .filter(|(k, d)| {
            matches!(k, Key::Snat(_)) && !d["id"].as_str().is_some_and(|id| doomed.contains(id))
        })
        .filter_map(|(_, d)| tag_of(d, scope::SNAT_IP))
        .collect();
    observed
        .snat_allocations
        .iter()
        .filter(|a| !in_use.contains(a.as_str()) && !released.contains(a.as_str()))
        .map(|a| Op::ReleaseIp {
            pool: pool.to_string(),
            ip: a.clone(),
        })
        .collect()
}

/// The LB service lists its virtual servers: it must drop the doomed ones before they are
/// deleted (an update first), and take the new ones after they are created (an update after
/// the creates, unless the service is updated or created anyway). There is one per cluster.
fn relist_lb_service(
    desired: &Desired,
    observed: &Observed,
    kept: &Kept<'_>,
    ops: &mut Vec<Op>,
    upserts: &mut Vec<Op>,
) {
    let lb = observed
        .objects
        .range(Key::LbService(String::new())..)
        .take_while(|(k, _)| matches!(k, Key::LbService(_)))
        .find_map(|(k, _)| kept.get(k).map(|d| (k, d)));
    let Some((lb_key, lb_doc)) = lb else {
        return;
    };
    let Some(spec) = desired.objects.get(lb_key) else {
        return;
    };
    let lb_id = lb_doc["id"].as_str().unwrap_or_default().to_string();
    let vs_deleted = ops.iter().any(|o| {
        matches!(
            o,
            Op::Delete {
                key: Key::LbVirtualServer(_),
                ..
            }
        )
    });
    let vs_created = upserts.iter().any(|o| {
        matches!(
            o,
            Op::Create {
                key: Key::LbVirtualServer(_),
                ..
            }
        )
    });
    let already = upserts.iter().any(|o| {
        matches!(
            o,
            Op::Update {
                key: Key::LbService(_),
                ..
            } | Op::Create {
                key: Key::LbService(_),
                ..
            }
        )
    });
    if vs_deleted {
        // Without the virtual servers deleted here, those replaced too (they are desired, and
        // exist until their delete): NSX refuses to delete one the LB service still lists.
        let gone: BTreeSet<&Key> = ops
            .iter()
            .filter_map(|o| match o {
                Op::Delete {
                    key: k @ Key::LbVirtualServer(_),
                    ..
                } => Some(k),
                _ => None,
            })
            .collect();
        let mut before = spec.clone();
        if let Detail::LbService {
            virtual_servers, ..
        } = &mut before.detail
        {
            virtual_servers.retain(|k| !gone.contains(k));
        }
        ops.insert(
            0,
            Op::Update {
                key: lb_key.clone(),
                id: lb_id.clone(),
                spec: before,
            },
        );
    }
    if vs_created && !already {
        upserts.push(Op::Update {
            key: lb_key.clone(),
            id: lb_id,
            spec: spec.clone(),
        });
    }
}

/// VIPs of services that no longer need one (virtual server keys are `<service
/// uid>/<port>`). An incremental plan looks at the services it touched.
fn unneeded_vips(
    desired: &Desired,
    observed: &Observed,
    touched: Option<&BTreeSet<Key>>,
    pool: &str,
) -> Vec<Op> {
    let serves = |svc: &str| {
        let prefix = format!("{svc}/");
        desired
            .objects
            .range(Key::LbVirtualServer(prefix.clone())..)
            .next()
            .is_some_and(|(k, _)| matches!(k, Key::LbVirtualServer(v) if v.starts_with(&prefix)))
    };
    let svcs: Option<BTreeSet<&str>> = touched.map(|t| {
        t.iter()
            .filter_map(|k| match k {
                Key::LbVirtualServer(v) | Key::LbPool(v) => v.split_once('/').map(|(svc, _)| svc),
                _ => None,
            })
            .collect()
    });
    observed
        .lb_vips
        .iter()
        .filter(|(svc, _)| svcs.as_ref().is_none_or(|s| s.contains(svc.as_str())))
        .filter(|(svc, _)| !serves(svc))
        .map(|(_, ip)| Op::ReleaseIp {
            pool: pool.to_string(),
            ip: ip.clone(),
        })
        .collect()
}
