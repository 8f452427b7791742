//! The firewall asks whether one port is in an NSGroup (`Store::nsgroup_holds`) instead of
//! listing the group's effective members for every packet. That fast path must say exactly
//! what the listing says: random switches and ports with random tags, and NSGroups with
//! random port, switch and nested-group members and tag criteria on ports and switches (alone
//! and ANDed), built through the API, then every (group, port) pair compared.

mod common;

use common::Client;
use fake_nsx_manager::kind::Kind;
use proptest::prelude::*;
use serde_json::{Value, json};

const TAGS: [(&str, &str); 4] = [
    ("app", "web"),
    ("app", "db"),
    ("tier", "front"),
    ("ncp/x", ""),
];

#[derive(Debug, Clone)]
enum Member {
    Port(usize),
    Switch(usize),
    Group(usize),
}

#[derive(Debug, Clone)]
enum Criterion {
    /// A tag expression on ports or (true) switches; `None` as the tag matches any value.
    Tag(usize, bool, bool),
    /// Two port tag expressions ANDed.
    Both(usize, usize),
}

#[derive(Debug, Clone)]
struct World {
    /// Per port: its switch (of 2) and tags (indices into TAGS).
    ports: Vec<(usize, Vec<usize>)>,
    switch_tags: [Vec<usize>; 2],
    groups: Vec<(Vec<Member>, Vec<Criterion>)>,
}

fn world() -> impl Strategy<Value = World> {
    let tags = || proptest::collection::vec(0usize..4, 0..3);
    let member = prop_oneof![
        (0usize..6).prop_map(Member::Port),
        (0usize..2).prop_map(Member::Switch),
        (0usize..4).prop_map(Member::Group),
    ];
    let criterion = prop_oneof![
        (0usize..4, any::<bool>(), any::<bool>()).prop_map(|(t, s, a)| Criterion::Tag(t, s, a)),
        (0usize..4, 0usize..4).prop_map(|(a, b)| Criterion::Both(a, b)),
    ];
    (
        proptest::collection::vec((0usize..2, tags()), 1..6),
        [tags(), tags()],
        proptest::collection::vec(
            (
                proptest::collection::vec(member, 0..3),
                proptest::collection::vec(criterion, 0..3),
            ),
            1..4,
        ),
    )
        .prop_map(|(ports, switch_tags, groups)| World {
            ports,
            switch_tags,
            groups,
        })
}

fn tags_json(tags: &[usize]) -> Value {
    json!(
        tags.iter()
            .map(|t| json!({"scope": TAGS[*t].0, "tag": TAGS[*t].1}))
            .collect::<Vec<_>>()
    )
}

fn expr(t: usize, switch: bool, any_value: bool) -> Value {
    let mut e = json!({"resource_type": "NSGroupTagExpression",
        "target_type": if switch { "LogicalSwitch" } else { "LogicalPort" },
        "scope": TAGS[t].0, "scope_op": "EQUALS"});
    if !any_value {
        e["tag"] = json!(TAGS[t].1);
        e["tag_op"] = json!("EQUALS");
    }
    e
}

async fn build(c: &Client, w: &World) -> (Vec<String>, Vec<String>) {
    let mut switches = Vec::new();
    for (i, tags) in w.switch_tags.iter().enumerate() {
        let (ls, _) = c.switch_with_pool(&format!("10.9.{i}.0/24")).await;
        let path = format!("logical-switches/{ls}");
        let mut doc = c.get(&path).await.expect(200).body;
        doc["tags"] = tags_json(tags);
        c.put(&path, doc).await.expect(200);
        switches.push(ls);
    }
    let mut ports = Vec::new();
    for (s, tags) in &w.ports {
        ports.push(
            c.post(
                "logical-ports",
                json!({"logical_switch_id": switches[*s], "admin_state": "UP", "tags": tags_json(tags)}),
            )
            .await
            .expect(201)
            .id(),
        );
    }
    // Groups first without members, so that members may name any group (cycles included).
    let mut groups = Vec::new();
    for (i, _) in w.groups.iter().enumerate() {
        groups.push(
            c.post("ns-groups", json!({"display_name": format!("g{i}")}))
                .await
                .expect(201)
                .id(),
        );
    }
    for (i, (members, criteria)) in w.groups.iter().enumerate() {
        let members: Vec<Value> = members
            .iter()
            .filter_map(|m| {
                let (target, value) = match m {
                    Member::Port(p) => ("LogicalPort", ports.get(*p)?),
                    Member::Switch(s) => ("LogicalSwitch", &switches[*s]),
                    Member::Group(g) => ("NSGroup", groups.get(*g)?),
                };
                Some(
                    json!({"resource_type": "NSGroupSimpleExpression", "target_type": target,
                    "target_property": "id", "op": "EQUALS", "value": value}),
                )
            })
            .collect();
        let criteria: Vec<Value> = criteria
            .iter()
            .map(|c| match c {
                Criterion::Tag(t, switch, any) => expr(*t, *switch, *any),
                Criterion::Both(a, b) => json!({"resource_type": "NSGroupComplexExpression",
                    "expressions": [expr(*a, false, false), expr(*b, false, false)]}),
            })
            .collect();
        let path = format!("ns-groups/{}", groups[i]);
        let mut doc = c.get(&path).await.expect(200).body;
        doc["members"] = json!(members);
        doc["membership_criteria"] = json!(criteria);
        // The fake may refuse a shape the real manager refuses (a group in itself); the
        // comparison holds for whatever it keeps.
        c.put(&path, doc).await;
    }
    (groups, ports)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    fn one_port_membership_equals_the_effective_listing(w in world()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
        let c = Client::new();
        let (groups, ports) = rt.block_on(build(&c, &w));
        let mut members = 0;
        for g in &groups {
            let listed = c.nsx.with_store(|s| s.nsgroup_effective(g, Kind::LogicalPort));
            for p in &ports {
                let fast = c.nsx.with_store(|s| s.nsgroup_holds(g, Kind::LogicalPort, p));
                prop_assert_eq!(fast, listed.contains(p), "group {} port {}", g, p);
                members += usize::from(fast);
            }
        }
        // Not vacuous: across cases some pairs are members and some are not.
        MEMBERS.fetch_add(members, std::sync::atomic::Ordering::Relaxed);
        PAIRS.fetch_add(groups.len() * ports.len(), std::sync::atomic::Ordering::Relaxed);
    }
}

static MEMBERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static PAIRS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[test]
fn the_comparison_sees_members_and_non_members() {
    one_port_membership_equals_the_effective_listing();
    let m = MEMBERS.load(std::sync::atomic::Ordering::Relaxed);
    let p = PAIRS.load(std::sync::atomic::Ordering::Relaxed);
    assert!(m * 10 > p && m * 10 < p * 9, "{m} members of {p} pairs");
}
