//! NCP's reconcile core against the fake NSX manager: what namespaces and pods become, restart
//! safety, garbage collection, self-healing, isolation between clusters, and a crash after every
//! single write of a scenario.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};

use common::{World, view, view_with_uids};
use nsx_core::k8s::fixture;
use nsx_core::ncp::vocab::Key;
use serde_json::Value;

fn tag<'a>(d: &'a Value, scope: &str) -> Option<&'a str> {
    d["tags"].as_array()?.iter().find(|t| t["scope"] == scope)?["tag"].as_str()
}

/// NCP's objects of a cluster, by resource type.
fn counts(w: &World, cluster: &str) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for d in w.docs().values() {
        let ours = d["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["scope"] == "ncp/cluster" && t["tag"] == cluster);
        if ours && (tag(d, "ncp/project_uid").is_some() || tag(d, "ncp/pod_uid").is_some()) {
            *c.entry(d["resource_type"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    c
}

fn expected(namespaces: usize, pods: usize) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    if namespaces > 0 {
        for t in [
            "IpBlockSubnet",
            "IpPool",
            "LogicalSwitch",
            "LogicalRouter",
            "LogicalRouterLinkPortOnTIER0",
            "LogicalRouterLinkPortOnTIER1",
            "LogicalRouterDownLinkPort",
            "NatRule",
            "NSGroup",
        ] {
            c.insert(t.to_string(), namespaces);
        }
        c.insert("LogicalPort".to_string(), namespaces + namespaces * pods);
    }
    c
}

#[track_caller]
fn assert_no_duplicates(o: &nsx_core::ncp::observe::Observed) {
    let dups: Vec<&Key> = o
        .objects
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(k, _)| k)
        .collect();
    assert!(dups.is_empty(), "duplicates: {dups:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_and_pods_become_linked_nsx_objects() {
    let w = World::new(&["k8s-a"]).await;
    let v = view(2, 3);
    let out = w.reconcile("k8s-a", &v, None).await.unwrap();
    assert!(
        out.plan.unrealizable.is_empty(),
        "{:?}",
        out.plan.unrealizable
    );
    assert_eq!(counts(&w, "k8s-a"), expected(2, 3));
    w.invariants();
    let o = w.observe("k8s-a").await;
    let infra = w.infra("k8s-a").await;
    for n in 0..2 {
        let u = format!("uid-ns-{n}");
        let subnet = o.get(&Key::Subnet(u.clone())).unwrap();
        assert_eq!(subnet["size"], 256);
        let cidr = subnet["cidr"].as_str().unwrap();
        let switch = o.get(&Key::Switch(u.clone())).unwrap();
        let pool = o.get(&Key::Pool(u.clone())).unwrap();
        assert_eq!(switch["ip_pool_id"], pool["id"]);
        assert_eq!(pool["subnets"][0]["cidr"], cidr);
        assert_eq!(switch["display_name"], format!("k8s-a-ns-{n}"));
        let t1 = o.get(&Key::Tier1(u.clone())).unwrap();
        let t1link = o.get(&Key::T1Link(u.clone())).unwrap();
        let t0link = o.get(&Key::T0Link(u.clone())).unwrap();
        assert_eq!(t1link["logical_router_id"], t1["id"]);
        assert_eq!(t0link["linked_logical_router_port_id"], t1link["id"]);
        assert_eq!(t0link["logical_router_id"], infra.tier0.as_str());
        let dsp = o.get(&Key::DownlinkSwitchPort(u.clone())).unwrap();
        let downlink = o.get(&Key::Downlink(u.clone())).unwrap();
        assert_eq!(
            dsp["attachment"]["id"], downlink["id"],
            "the downlink attaches the switch port"
        );
        let adv = w
            .nsx
            .inspect(|s| s.advertisement(t1["id"].as_str().unwrap()))
            .unwrap();
        assert_eq!(adv.advertise_nsx_connected_routes, Some(true));
        let snat = o.get(&Key::Snat(u.clone())).unwrap();
        assert_eq!(snat["match_source_network"], cidr);
        let ip = snat["translated_network"].as_str().unwrap();
        assert_eq!(tag(snat, "ncp/snat_ip"), Some(ip));
        assert!(
            w.allocations(infra.snat_pool.as_ref().unwrap())
                .contains(&ip.to_string())
        );
    }
    // Pods: a CHILD VIF of their node's VIF, VLANs unique per node, addresses from the subnet.
    let mut vlans: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    for n in 0..2 {
        for p in 0..3 {
            let port = o.get(&Key::PodPort(format!("uid-{n}-{p}"))).unwrap();
            let ctx = &port["attachment"]["context"];
            assert_eq!(ctx["vif_type"], "CHILD");
            let parent = ctx["parent_vif_id"].as_str().unwrap().to_string();
            assert!(infra.node_vifs.values().any(|v| *v == parent));
            assert!(
                vlans
                    .entry(parent)
                    .or_default()
                    .insert(ctx["traffic_tag"].as_i64().unwrap()),
                "VLAN reused on one node"
            );
            assert_eq!(tag(port, "app"), Some("web"));
            let net = &out.report.pod_networks[&format!("uid-{n}-{p}")];
            let cidr = o.get(&Key::Subnet(format!("uid-ns-{n}"))).unwrap()["cidr"]
                .as_str()
                .unwrap()
                .to_string();
            let prefix = cidr.rsplit_once('.').unwrap().0;
            assert!(net.ip.starts_with(prefix), "{} not in {cidr}", net.ip);
            assert!(!net.ip.ends_with(".1"), "never the gateway");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_converged_cluster_restarts_with_zero_writes() {
    let w = World::new(&["k8s-a"]).await;
    let v = view(3, 4);
    w.reconcile("k8s-a", &v, None).await.unwrap();
    let before = w.nsx.counters();
    let again = w.reconcile("k8s-a", &v, None).await.unwrap();
    assert!(again.plan.is_empty(), "{:?}", again.plan.ops);
    assert_eq!(again.report.writes, 0);
    let after = w.nsx.counters();
    assert_eq!(after.writes, before.writes, "a restart must not write");
    // One search for everything tagged with the cluster, one batch for both pools' allocations.
    assert_eq!(
        again.observe_calls, 2,
        "observation took {} calls",
        again.observe_calls
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_never_writes_on_what_a_lagging_search_index_shows() {
    let w = World::new(&["k8s-a"]).await;
    // Nothing NCP writes from now on shows in search during this test.
    w.nsx.set_search_lag_ms(3_600_000);
    let v = view(3, 4);
    let total = w.reconcile("k8s-a", &v, None).await.unwrap().report.writes;
    let objects = w.nsx.inspect(|s| s.len());
    for budget in [1, total / 3, total / 2, total - 1] {
        let fresh = World::new(&["k8s-a"]).await;
        fresh.nsx.set_search_lag_ms(3_600_000);
        // Crash after `budget` writes; then a new NCP finds none of them in search.
        let crashed = fresh.reconcile("k8s-a", &v, Some(budget)).await;
        assert!(crashed.is_err(), "budget {budget} of {total}");
        let restart = fresh.reconcile("k8s-a", &v, None).await.unwrap();
        // The search showed work; the lists showed what had been done.
        assert!(restart.observe_calls > 2, "{}", restart.observe_calls);
        assert!(restart.plan.unrealizable.is_empty());
        assert_eq!(
            fresh.nsx.inspect(|s| s.len()),
            objects,
            "budget {budget}: nothing created twice, nothing left out"
        );
        let o = fresh.observe("k8s-a").await;
        assert!(o.objects.values().all(|d| d.len() == 1), "a duplicate");
        fresh.invariants();
    }
    // Converged, and still nothing indexed: the restart reads the lists and writes nothing.
    let before = w.nsx.counters().writes;
    let restart = w.reconcile("k8s-a", &v, None).await.unwrap();
    assert!(restart.plan.is_empty());
    assert_eq!(w.nsx.counters().writes, before);
    assert!(restart.observe_calls > 2);
    // Once the index has caught up, the restart costs the search alone.
    w.nsx.settle_search();
    let restart = w.reconcile("k8s-a", &v, None).await.unwrap();
    assert_eq!(restart.observe_calls, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_namespaces_and_pods_removes_everything_and_releases_addresses() {
    let w = World::new(&["k8s-a"]).await;
    let infra = w.infra("k8s-a").await;
    let snat_pool = infra.snat_pool.clone().unwrap();
    let mut v = view(2, 2);
    w.reconcile("k8s-a", &v, None).await.unwrap();
    v.pods.remove(&("ns-0".to_string(), "pod-0".to_string()));
    w.reconcile("k8s-a", &v, None).await.unwrap();
    assert_eq!(counts(&w, "k8s-a")["LogicalPort"], 2 + 3);
    v.namespaces.remove("ns-1");
    w.reconcile("k8s-a", &v, None).await.unwrap();
    assert_eq!(counts(&w, "k8s-a"), expected(1, 1));
    assert_eq!(w.allocations(&snat_pool).len(), 1);
    let mut empty = v.clone();
    empty.namespaces.clear();
    empty.pods.clear();
    w.reconcile("k8s-a", &empty, None).await.unwrap();
    assert!(counts(&w, "k8s-a").is_empty(), "{:?}", counts(&w, "k8s-a"));
    assert!(w.allocations(&snat_pool).is_empty());
    // Nothing of the admin's is gone: the block, pools, node ports, the tier-0.
    let boot = w.nsx.bootstrap().unwrap();
    let docs = w.docs();
    for id in [
        &boot.tier0_router,
        &boot.transport_zone,
        &boot.clusters["k8s-a"].ip_block,
        &snat_pool,
    ] {
        assert!(docs.contains_key(id), "admin object {id} was deleted");
    }
    assert_eq!(
        docs.values()
            .filter(|d| d["resource_type"] == "IpBlockSubnet")
            .count(),
        0
    );
    w.invariants();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_changed_or_deleted_by_an_admin_are_put_back() {
    let w = World::new(&["k8s-a"]).await;
    let v = view(1, 2);
    w.reconcile("k8s-a", &v, None).await.unwrap();
    let o = w.observe("k8s-a").await;
    let port = o.get(&Key::PodPort("uid-0-0".into())).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let switch = o.get(&Key::Switch("uid-ns-0".into())).unwrap().clone();
    let snat = o.get(&Key::Snat("uid-ns-0".into())).unwrap().clone();
    // An admin, through the API: the pod's port deleted (detached), the switch renamed and
    // stripped of a tag, the SNAT rule deleted.
    let admin = |method: &str, path: String, query: &[(&str, &str)], body: Option<&Value>| {
        let r = w.nsx.as_admin(method, &path, query, body);
        assert!(r.is_success(), "{method} {path}: {} {}", r.status, r.body);
    };
    admin(
        "DELETE",
        format!("/api/v1/logical-ports/{port}"),
        &[("detach", "true")],
        None,
    );
    let mut doc = switch.clone();
    doc["display_name"] = "renamed-by-admin".into();
    doc["tags"]
        .as_array_mut()
        .unwrap()
        .retain(|t| t["scope"] != "ncp/version");
    admin(
        "PUT",
        format!(
            "/api/v1/logical-switches/{}",
            switch["id"].as_str().unwrap()
        ),
        &[],
        Some(&doc),
    );
    admin(
        "DELETE",
        format!(
            "/api/v1/logical-routers/{}/nat/rules/{}",
            snat["logical_router_id"].as_str().unwrap(),
            snat["id"].as_str().unwrap()
        ),
        &[],
        None,
    );
    let out = w.reconcile("k8s-a", &v, None).await.unwrap();
    assert_eq!(out.plan.ops.len(), 4, "{:#?}", out.plan.ops);
    let o = w.observe("k8s-a").await;
    assert_eq!(
        o.get(&Key::Switch("uid-ns-0".into())).unwrap()["display_name"],
        "k8s-a-ns-0"
    );
    assert!(o.get(&Key::PodPort("uid-0-0".into())).is_some());
    assert!(o.get(&Key::Snat("uid-ns-0".into())).is_some());
    // The rule's old address was released when it went (by the plan), the new one is allocated.
    let pool = w.infra("k8s-a").await.snat_pool.unwrap();
    assert_eq!(w.allocations(&pool).len(), 1);
    assert!(
        w.reconcile("k8s-a", &v, None)
            .await
            .unwrap()
            .plan
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_on_one_manager_never_touch_each_other() {
    let w = World::new(&["k8s-a", "k8s-b"]).await;
    w.reconcile("k8s-b", &view_with_uids("b-", 2, 2), None)
        .await
        .unwrap();
    let b_before: BTreeMap<String, Value> = w
        .docs()
        .into_iter()
        .filter(|(_, d)| tag(d, "ncp/cluster") == Some("k8s-b"))
        .collect();
    w.reconcile("k8s-a", &view(3, 1), None).await.unwrap();
    w.reconcile("k8s-a", &nsx_core::k8s::ClusterView::default(), None)
        .await
        .unwrap();
    let b_after: BTreeMap<String, Value> = w
        .docs()
        .into_iter()
        .filter(|(_, d)| tag(d, "ncp/cluster") == Some("k8s-b"))
        .collect();
    assert_eq!(b_before, b_after, "cluster A changed cluster B's objects");
    assert_eq!(counts(&w, "k8s-b"), expected(2, 2));
    assert!(counts(&w, "k8s-a").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_recreated_under_the_same_name_while_ncp_was_down_gets_a_new_port() {
    let w = World::new(&["k8s-a"]).await;
    let mut v = view(1, 1);
    w.reconcile("k8s-a", &v, None).await.unwrap();
    let old = w
        .observe("k8s-a")
        .await
        .get(&Key::PodPort("uid-0-0".into()))
        .unwrap()["id"]
        .clone();
    v.add_pod(fixture::pod("ns-0", "pod-0", "uid-0-0-new", "node-1", &[]));
    w.reconcile("k8s-a", &v, None).await.unwrap();
    let o = w.observe("k8s-a").await;
    assert!(o.get(&Key::PodPort("uid-0-0".into())).is_none());
    assert_ne!(
        o.get(&Key::PodPort("uid-0-0-new".into())).unwrap()["id"],
        old
    );
}

/// Runs `from` to convergence, then crashes NCP right after write N of the change to `to`,
/// restarts it and checks it converges to `to` with nothing duplicated or leaked.
async fn crash_sweep(
    from: nsx_core::k8s::ClusterView,
    to: nsx_core::k8s::ClusterView,
    ns: usize,
    pods: usize,
) {
    let clean = World::new(&["k8s-a"]).await;
    clean.reconcile("k8s-a", &from, None).await.unwrap();
    let total = clean
        .reconcile("k8s-a", &to, None)
        .await
        .unwrap()
        .report
        .writes;
    assert!(total > 5, "the scenario should write something: {total}");
    for n in 0..total {
        let w = World::new(&["k8s-a"]).await;
        w.reconcile("k8s-a", &from, None).await.unwrap();
        let crashed = w.reconcile("k8s-a", &to, Some(n)).await;
        assert!(
            crashed.is_err(),
            "budget {n} of {total} did not stop the plan"
        );
        // NCP restarts with empty memory and converges.
        let after = w
            .reconcile("k8s-a", &to, None)
            .await
            .unwrap_or_else(|e| panic!("after a crash at write {n}: {e:?}"));
        assert!(
            after.report.writes <= total + 3,
            "write {n}: recovery wrote {} (clean run {total})",
            after.report.writes
        );
        let o = w.observe("k8s-a").await;
        assert_no_duplicates(&o);
        assert_eq!(
            counts(&w, "k8s-a"),
            expected(ns, pods),
            "after a crash at write {n}"
        );
        let pool = w.infra("k8s-a").await.snat_pool.unwrap();
        assert_eq!(
            w.allocations(&pool).len(),
            ns,
            "SNAT addresses leaked after a crash at write {n}"
        );
        w.invariants();
        let again = w.reconcile("k8s-a", &to, None).await.unwrap();
        assert!(
            again.plan.is_empty(),
            "not converged after a crash at write {n}: {:?}",
            again.plan.ops
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_any_write_of_a_creation_converges_without_duplicates_or_leaks() {
    crash_sweep(nsx_core::k8s::ClusterView::default(), view(2, 2), 2, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_any_write_of_a_deletion_converges_without_leaks() {
    let mut to = view(2, 2);
    to.namespaces.remove("ns-1");
    to.pods.retain(|(ns, _), _| ns != "ns-1");
    to.pods.remove(&("ns-0".to_string(), "pod-1".to_string()));
    crash_sweep(view(2, 2), to, 1, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_snat_pool_fails_only_the_snat_rules_and_heals_when_addresses_free_up() {
    let w = World::new(&["k8s-a"]).await;
    let pool = w.infra("k8s-a").await.snat_pool.unwrap();
    // Someone else took every address of the SNAT pool.
    let taken = common::take_every_address(&w.nsx, &pool);
    let v = view(2, 2);
    let out = w.reconcile("k8s-a", &v, None).await.unwrap();
    let failed: Vec<&Key> = out.report.failed.keys().collect();
    assert_eq!(
        failed,
        [&Key::Snat("uid-ns-0".into()), &Key::Snat("uid-ns-1".into())],
        "{:?}",
        out.report.failed
    );
    assert!(
        out.report.failed.values().all(|m| m.contains("5109")),
        "{:?}",
        out.report.failed
    );
    let c = counts(&w, "k8s-a");
    assert_eq!(
        c.get("LogicalPort"),
        Some(&6),
        "pods are wired despite the SNAT failure"
    );
    assert_eq!(c.get("NatRule"), None);
    // Release two addresses: the next pass creates the rules.
    for ip in &taken[..2] {
        common::give_back(&w.nsx, &pool, ip);
    }
    let healed = w.reconcile("k8s-a", &v, None).await.unwrap();
    assert!(
        healed.report.failed.is_empty(),
        "{:?}",
        healed.report.failed
    );
    assert_eq!(counts(&w, "k8s-a"), expected(2, 2));
}

fn lb_service(
    ns: &str,
    name: &str,
    uid: &str,
    ports: &[(&str, i32)],
) -> k8s_openapi::api::core::v1::Service {
    let ports: Vec<serde_json::Value> = ports
        .iter()
        .map(|(n, p)| serde_json::json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    serde_json::from_value(serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns, "uid": uid},
        "spec": {"type": "LoadBalancer", "ports": ports}})).unwrap()
}

fn slice(
    ns: &str,
    svc: &str,
    ports: &[(&str, i32)],
    endpoints: &[(&str, bool)],
) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    let ports: Vec<serde_json::Value> = ports
        .iter()
        .map(|(n, p)| serde_json::json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    let eps: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(a, ready)| serde_json::json!({"addresses": [a], "conditions": {"ready": ready}}))
        .collect();
    serde_json::from_value(serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{svc}-abc"), "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "ports": ports, "endpoints": eps})).unwrap()
}

fn lb_docs(w: &World) -> Vec<Value> {
    w.docs()
        .into_values()
        .filter(|d| {
            matches!(
                d["resource_type"].as_str(),
                Some("LbService" | "LbVirtualServer" | "LbPool")
            ) && tag(d, "ncp/cluster") == Some("k8s-a")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_services_get_a_vip_virtual_servers_and_pools_that_follow_endpoints() {
    let w = World::new(&["k8s-a"]).await;
    let infra = w.infra("k8s-a").await;
    let lb_pool = infra.lb_pool.clone().expect("LB pool configured");
    let mut v = view(1, 1);
    v.add_service(lb_service(
        "ns-0",
        "web",
        "svc-1",
        &[("http", 80), ("https", 443)],
    ));
    v.add_endpoint_slice(slice(
        "ns-0",
        "web",
        &[("http", 8080), ("https", 8443)],
        &[("10.4.0.5", true), ("10.4.0.6", true), ("10.4.0.7", false)],
    ));
    let out = w.reconcile("k8s-a", &v, None).await.unwrap();
    assert!(out.report.failed.is_empty(), "{:?}", out.report.failed);
    let o = w.observe("k8s-a").await;
    let lb = o.get(&Key::LbService("k8s-a".into())).expect("LB service");
    let t1 = o.get(&Key::LbTier1("k8s-a".into())).unwrap();
    assert_eq!(lb["attachment"]["target_id"], t1["id"]);
    assert_eq!(lb["virtual_server_ids"].as_array().unwrap().len(), 2);
    let http = o.get(&Key::LbVirtualServer("svc-1/http".into())).unwrap();
    let https = o.get(&Key::LbVirtualServer("svc-1/https".into())).unwrap();
    assert_eq!(
        http["ip_address"], https["ip_address"],
        "one VIP per service"
    );
    assert_eq!(http["port"], "80");
    let vip = http["ip_address"].as_str().unwrap().to_string();
    assert!(vip.starts_with("198.51."), "{vip}");
    assert_eq!(w.allocations(&lb_pool), vec![vip.clone()]);
    let pool = o.get(&Key::LbPool("svc-1/http".into())).unwrap();
    assert_eq!(http["pool_id"], pool["id"]);
    let members: Vec<String> = pool["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!(
                "{}:{}",
                m["ip_address"].as_str().unwrap(),
                m["port"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        members,
        ["10.4.0.5:8080", "10.4.0.6:8080"],
        "only ready endpoints"
    );
    assert!(
        w.reconcile("k8s-a", &v, None)
            .await
            .unwrap()
            .plan
            .is_empty()
    );
    // Endpoints change: the pool follows.
    v.endpoint_slices.clear();
    v.add_endpoint_slice(slice(
        "ns-0",
        "web",
        &[("http", 8080), ("https", 8443)],
        &[("10.4.0.7", true)],
    ));
    let out = w.reconcile("k8s-a", &v, None).await.unwrap();
    assert_eq!(out.plan.ops.len(), 2, "{:?}", out.plan.ops);
    let o = w.observe("k8s-a").await;
    assert_eq!(
        o.get(&Key::LbPool("svc-1/http".into())).unwrap()["members"][0]["ip_address"],
        "10.4.0.7"
    );
    // A port goes away: the LB service drops its virtual server first, then it is deleted.
    v.services.clear();
    v.add_service(lb_service("ns-0", "web", "svc-1", &[("http", 80)]));
    let out = w.reconcile("k8s-a", &v, None).await.unwrap();
    assert!(out.report.failed.is_empty(), "{:?}", out.report.failed);
    assert_eq!(lb_docs(&w).len(), 3);
    assert!(
        w.reconcile("k8s-a", &v, None)
            .await
            .unwrap()
            .plan
            .is_empty()
    );
    // The service goes: everything LB goes, and its VIP is released.
    v.services.clear();
    let out = w.reconcile("k8s-a", &v, None).await.unwrap();
    assert!(out.report.failed.is_empty(), "{:?}", out.report.failed);
    assert!(lb_docs(&w).is_empty(), "{:?}", lb_docs(&w));
    assert!(w.allocations(&lb_pool).is_empty());
    assert!(
        w.observe("k8s-a")
            .await
            .get(&Key::LbTier1("k8s-a".into()))
            .is_none()
    );
    w.invariants();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_any_write_of_a_load_balancer_change_converges_without_leaks() {
    let with_lb = |ports: &[(&str, i32)]| {
        let mut v = view(1, 1);
        v.add_service(lb_service("ns-0", "web", "svc-1", ports));
        v.add_endpoint_slice(slice(
            "ns-0",
            "web",
            &[("http", 8080), ("https", 8443)],
            &[("10.4.0.5", true)],
        ));
        v
    };
    for (from, to) in [
        (view(1, 1), with_lb(&[("http", 80), ("https", 443)])),
        (
            with_lb(&[("http", 80), ("https", 443)]),
            with_lb(&[("http", 80)]),
        ),
        (with_lb(&[("http", 80)]), view(1, 1)),
    ] {
        let clean = World::new(&["k8s-a"]).await;
        clean.reconcile("k8s-a", &from, None).await.unwrap();
        let total = clean
            .reconcile("k8s-a", &to, None)
            .await
            .unwrap()
            .report
            .writes;
        for n in 0..total {
            let w = World::new(&["k8s-a"]).await;
            w.reconcile("k8s-a", &from, None).await.unwrap();
            assert!(w.reconcile("k8s-a", &to, Some(n)).await.is_err());
            let after = w.reconcile("k8s-a", &to, None).await.unwrap();
            assert!(
                after.report.failed.is_empty(),
                "crash at {n}: {:?}",
                after.report.failed
            );
            let o = w.observe("k8s-a").await;
            assert_no_duplicates(&o);
            let lb_pool = w.infra("k8s-a").await.lb_pool.unwrap();
            let services = usize::from(!to.services.is_empty());
            assert_eq!(
                w.allocations(&lb_pool).len(),
                services,
                "VIP leaked after a crash at write {n}"
            );
            assert!(
                w.reconcile("k8s-a", &to, None)
                    .await
                    .unwrap()
                    .plan
                    .is_empty(),
                "crash at {n}"
            );
            w.invariants();
        }
    }
}

/// The load balancer's tier-1 goes on an edge cluster, as NSX requires: the one `[nsx_v3]
/// edge_cluster` names (by id or display name), else the tier-0's; a name that matches none
/// stops NCP with a message that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_cluster_is_the_configured_one_or_the_tier0s() {
    let w = World::new(&["k8s-a"]).await;
    let boot = w.nsx.bootstrap().unwrap();
    assert!(!boot.edge_cluster.is_empty());
    assert_eq!(
        w.infra("k8s-a").await.edge_cluster.as_deref(),
        Some(boot.edge_cluster.as_str()),
        "the tier-0's by default"
    );
    let other = w
        .client()
        .create::<_, Value>(
            "edge-clusters",
            &serde_json::json!({"display_name": "edges-for-lb", "deployment_type": "VIRTUAL_MACHINE"}),
        )
        .await
        .unwrap();
    let other = other["id"].as_str().unwrap().to_string();
    for wanted in [other.as_str(), "edges-for-lb"] {
        let mut cfg = w.ncp_config("k8s-a");
        cfg.edge_cluster = Some(wanted.to_string());
        let infra = nsx_core::ncp::infra::discover(&w.client(), &cfg)
            .await
            .unwrap();
        assert_eq!(
            infra.edge_cluster.as_deref(),
            Some(other.as_str()),
            "{wanted}"
        );
    }
    let mut cfg = w.ncp_config("k8s-a");
    cfg.edge_cluster = Some("no-such-edges".into());
    let e = nsx_core::ncp::infra::discover(&w.client(), &cfg)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("edge cluster") && e.contains("no-such-edges"),
        "{e}"
    );
}
