//! Issue 3's scale target: a converged cluster of 1,000 namespaces and 10,000 pods restarts
//! with zero NSX writes and at most one list or search call per 1,000 objects.

use crate::common;

use common::{World, view};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_converged_cluster_of_10000_pods_restarts_with_zero_writes_and_few_lists() {
    let w = World::new(&["k8s-a"]).await;
    let v = view(1000, 10);
    let first = w.reconcile("k8s-a", &v, None).await.unwrap();
    assert!(first.plan.unrealizable.is_empty());
    let objects = w.nsx.inspect(|s| s.len());
    assert!(objects > 19_000, "{objects}");
    let writes = w.nsx.counters().writes;
    let restart = w.reconcile("k8s-a", &v, None).await.unwrap();
    assert!(restart.plan.is_empty(), "{:?}", restart.plan.ops.first());
    assert_eq!(w.nsx.counters().writes, writes, "a restart must not write");
    // One search call per page of 1,000 tagged objects, and one batch reading both pools'
    // allocations (1,000 SNAT addresses): at most one call per 1,000 objects, rounded up.
    let allocations = w
        .allocations(&w.infra("k8s-a").await.snat_pool.unwrap())
        .len();
    assert_eq!(allocations, 1000);
    assert!(
        restart.observe_calls <= (objects + allocations).div_ceil(1000),
        "{} calls for {objects} objects and {allocations} allocations",
        restart.observe_calls
    );
    // A running NCP: one full pass fills its cache, then a new pod costs only its own
    // requests (create the port, read its addresses), whatever the size of the cluster.
    let mut cache = None;
    let infra = w.infra("k8s-a").await;
    let full = w
        .reconcile_cached("k8s-a", &infra, &v, &mut cache)
        .await
        .unwrap();
    assert!(full.plan.is_empty());
    let mut grown = v.clone();
    grown.add_pod(nsx_core::k8s::fixture::pod(
        "ns-7",
        "late",
        "uid-late",
        "node-2",
        &[("app", "web")],
    ));
    let before = w.nsx.counters().total;
    let change = w
        .reconcile_cached("k8s-a", &infra, &grown, &mut cache)
        .await
        .unwrap();
    let requests = w.nsx.counters().total - before;
    assert_eq!(change.observe_calls, 0);
    assert_eq!(change.plan.ops.len(), 1, "{:?}", change.plan.ops);
    assert!(requests <= 4, "a new pod cost {requests} NSX requests");
    let settled = w
        .reconcile_cached("k8s-a", &infra, &grown, &mut cache)
        .await
        .unwrap();
    assert!(settled.plan.is_empty(), "{:?}", settled.plan.ops.first());
    eprintln!(
        "scale: {objects} NSX objects, {} writes to create, restart observed with {} calls, a new pod then cost {requests} requests",
        writes, restart.observe_calls
    );
}
