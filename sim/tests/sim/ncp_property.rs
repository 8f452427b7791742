//! For random cluster states (with NetworkPolicies tags can and cannot express) and random NSX starting states (another converged cluster state,
//! then objects deleted, renamed, duplicated by an admin and SNAT addresses leaked), one
//! reconcile pass reaches exactly the desired state, and planning again yields no operation.

use crate::common;

use std::collections::BTreeMap;

use common::World;
use nsx_core::k8s::{ClusterView, annotation, fixture};
use nsx_core::ncp::desired::desired;
use nsx_core::ncp::vocab::Key;
use proptest::prelude::*;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
struct NsGen {
    no_snat: bool,
    /// A NetworkPolicy in the namespace: none, one tags can express, one they cannot.
    policy: u8,
    pods: Vec<(u8, bool)>, // (node 0..3 where 3 has no VIF, label)
}

fn cluster() -> impl Strategy<Value = Vec<NsGen>> {
    proptest::collection::vec(
        (
            any::<bool>(),
            0u8..3,
            proptest::collection::vec((0u8..4, any::<bool>()), 0..4),
        )
            .prop_map(|(no_snat, policy, pods)| NsGen {
                no_snat,
                policy,
                pods,
            }),
        0..4,
    )
}

fn to_view(spec: &[NsGen], generation: u8) -> ClusterView {
    let mut v = ClusterView::default();
    for (n, ns) in spec.iter().enumerate() {
        let mut nsobj = fixture::namespace(&format!("ns-{n}"), &format!("uid-ns-{n}"));
        if ns.no_snat {
            nsobj.metadata.annotations =
                Some([(annotation::NO_SNAT.to_string(), "true".to_string())].into());
        }
        v.add_namespace(nsobj);
        if ns.policy > 0 {
            let op = if ns.policy == 1 { "In" } else { "NotIn" };
            let np = serde_json::from_value(json!({"metadata": {"name": "np", "namespace": format!("ns-{n}"), "uid": format!("uid-np-{n}-g{generation}")},
                "spec": {"podSelector": {"matchExpressions": [{"key": "app", "operator": op, "values": ["web"]}]},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}, {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}]}],
                    "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": 53, "protocol": "UDP"}]}],
                    "policyTypes": ["Ingress", "Egress"]}}))
            .unwrap();
            v.add_network_policy(np);
        }
        for (p, (node, label)) in ns.pods.iter().enumerate() {
            let labels: &[(&str, &str)] = if *label { &[("app", "web")] } else { &[] };
            // Even-numbered pods can be the same pod in start and target (same UID); odd ones are
            // recreated (a new UID). A pod never changes nodes, so the node is part of its UID.
            let uid = format!(
                "uid-{n}-{p}-g{}-n{node}",
                if p % 2 == 0 { 0 } else { generation }
            );
            v.add_pod(fixture::pod(
                &format!("ns-{n}"),
                &format!("pod-{p}"),
                &uid,
                &format!("node-{}", node + 1),
                labels,
            ));
        }
    }
    v
}

#[derive(Debug, Clone)]
enum Damage {
    DeleteOne(usize),
    Rename(usize),
    DuplicatePort(usize),
    /// An address NCP allocated before crashing (tagged) or someone else's (untagged).
    LeakSnatIp {
        ncp: bool,
    },
}

fn damage() -> impl Strategy<Value = Vec<Damage>> {
    proptest::collection::vec(
        prop_oneof![
            (0usize..64).prop_map(Damage::DeleteOne),
            (0usize..64).prop_map(Damage::Rename),
            (0usize..64).prop_map(Damage::DuplicatePort),
            any::<bool>().prop_map(|ncp| Damage::LeakSnatIp { ncp }),
        ],
        0..5,
    )
}

fn ncp_docs(w: &World) -> Vec<Value> {
    w.docs()
        .into_values()
        .filter(|d| nsx_core::ncp::observe::classify(d, "k8s-a").is_some())
        .collect()
}

/// Where an admin reads and writes NCP's object `doc` in the API.
fn path_of(doc: &Value) -> String {
    let id = doc["id"].as_str().unwrap_or("");
    match doc["resource_type"].as_str().unwrap_or("") {
        "NatRule" => format!(
            "/api/v1/logical-routers/{}/nat/rules/{id}",
            doc["logical_router_id"].as_str().unwrap_or("")
        ),
        "IpBlockSubnet" => format!("/api/v1/pools/ip-subnets/{id}"),
        "IpPool" => format!("/api/v1/pools/ip-pools/{id}"),
        "LogicalSwitch" => format!("/api/v1/logical-switches/{id}"),
        "LogicalRouter" => format!("/api/v1/logical-routers/{id}"),
        "LogicalPort" => format!("/api/v1/logical-ports/{id}"),
        "NSGroup" => format!("/api/v1/ns-groups/{id}"),
        "IPSet" => format!("/api/v1/ip-sets/{id}"),
        "FirewallSection" => format!("/api/v1/firewall/sections/{id}"),
        _ => format!("/api/v1/logical-router-ports/{id}"),
    }
}

/// Damage done as an admin does it, through the API (some of it NSX refuses, which is fine).
fn apply_damage(w: &World, damage: &[Damage], snat_pool: &str) {
    for d in damage {
        let docs = ncp_docs(w);
        if docs.is_empty() && !matches!(d, Damage::LeakSnatIp { .. }) {
            continue;
        }
        match d {
            Damage::DeleteOne(i) => {
                let doc = &docs[i % docs.len()];
                let q = [("detach", "true"), ("cascade", "true"), ("force", "true")];
                w.nsx.as_admin("DELETE", &path_of(doc), &q, None);
            }
            Damage::Rename(i) => {
                let mut doc = docs[i % docs.len()].clone();
                doc["display_name"] = json!("renamed by admin");
                w.nsx.as_admin("PUT", &path_of(&doc), &[], Some(&doc));
            }
            Damage::DuplicatePort(i) => {
                let ports: Vec<&Value> = docs
                    .iter()
                    .filter(|d| {
                        nsx_core::ncp::observe::classify(d, "k8s-a")
                            .is_some_and(|k| matches!(k, Key::PodPort(_)))
                    })
                    .collect();
                if let Some(p) = ports.get(i % ports.len().max(1)) {
                    // A lost answer to a create, repeated: a second port with the same identity.
                    let mut copy = (*p).clone();
                    for k in [
                        "id",
                        "_revision",
                        "_create_time",
                        "_create_user",
                        "_last_modified_time",
                        "_last_modified_user",
                        "_protection",
                        "_system_owned",
                    ] {
                        copy.as_object_mut().unwrap().remove(k);
                    }
                    copy["attachment"]["id"] = json!(format!(
                        "{}-dup",
                        p["attachment"]["id"].as_str().unwrap_or("")
                    ));
                    w.nsx
                        .as_admin("POST", "/api/v1/logical-ports", &[], Some(&copy));
                }
            }
            Damage::LeakSnatIp { ncp } => {
                let path = format!("/api/v1/pools/ip-pools/{snat_pool}");
                let body = if *ncp {
                    json!({"allocation_id": null, "tags": [{"scope": "ncp/cluster", "tag": "k8s-a"}, {"scope": "ncp/project_uid", "tag": "gone"}]})
                } else {
                    json!({"allocation_id": null})
                };
                w.nsx
                    .as_admin("POST", &path, &[("action", "ALLOCATE")], Some(&body));
            }
        }
    }
}

fn expected_counts(view: &ClusterView, node_vifs: usize) -> BTreeMap<Key, usize> {
    let want = desired(view, "k8s-a", 24);
    want.objects
        .into_iter()
        .filter(|(k, spec)| match &spec.detail {
            nsx_core::ncp::vocab::Detail::PodPort { node, .. } => {
                let n: usize = node.trim_start_matches("node-").parse().unwrap_or(99);
                let _ = k;
                n <= node_vifs
            }
            _ => true,
        })
        .map(|(k, _)| (k, 1))
        .collect()
}

fn run_case(
    start: Vec<NsGen>,
    damage: Vec<Damage>,
    target: Vec<NsGen>,
) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let damage2 = damage.clone();
    rt.block_on(async move {
        let damage = damage2;
        let w = World::new(&["k8s-a"]).await;
        let infra = w.infra("k8s-a").await;
        let snat_pool = infra.snat_pool.clone().unwrap();
        let start_view = to_view(&start, 1);
        w.reconcile("k8s-a", &start_view, None)
            .await
            .map_err(|e| TestCaseError::fail(format!("start: {e:?}")))?;
        apply_damage(&w, &damage, &snat_pool);
        let target_view = to_view(&target, 2);
        let out = w
            .reconcile("k8s-a", &target_view, None)
            .await
            .map_err(|e| TestCaseError::fail(format!("target: {e:?}")))?;
        let o = w.observe("k8s-a").await;
        let got: BTreeMap<Key, usize> = o
            .objects
            .iter()
            .map(|(k, v)| (k.clone(), v.len()))
            .collect();
        prop_assert_eq!(
            got,
            expected_counts(&target_view, 3),
            "unrealizable: {:?}",
            out.plan.unrealizable
        );
        let snat_rules = o
            .objects
            .keys()
            .filter(|k| matches!(k, Key::Snat(_)))
            .count();
        let foreign = damage
            .iter()
            .filter(|d| matches!(d, Damage::LeakSnatIp { ncp: false }))
            .count();
        prop_assert_eq!(
            o.snat_allocations.len(),
            snat_rules,
            "NCP's SNAT allocations leaked"
        );
        prop_assert_eq!(
            w.allocations(&snat_pool).len(),
            snat_rules + foreign,
            "someone else's allocation was released"
        );
        w.nsx
            .inspect(|s| s.check_invariants())
            .map_err(TestCaseError::fail)?;
        let again = w
            .reconcile("k8s-a", &target_view, None)
            .await
            .map_err(|e| TestCaseError::fail(format!("again: {e:?}")))?;
        prop_assert!(
            again.plan.is_empty(),
            "a converged state planned {:?}",
            again.plan.ops
        );
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn one_pass_reaches_the_desired_state_from_any_start(start in cluster(), damage in damage(), target in cluster()) {
        run_case(start, damage, target)?;
    }
}
