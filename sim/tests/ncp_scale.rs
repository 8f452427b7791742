//! Issue 3's scale target: a converged cluster of 1,000 namespaces and 10,000 pods restarts
//! with zero NSX writes and at most one list call per 1,000 objects.

mod common;

use common::{World, view};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_converged_cluster_of_10000_pods_restarts_with_zero_writes_and_few_lists() {
    let w = World::new(&["k8s-a"]).await;
    let v = view(1000, 10);
    let first = w.reconcile("k8s-a", &v, None).await.unwrap();
    assert!(first.plan.unrealizable.is_empty());
    let objects = w.nsx.with_store(|s| s.len());
    assert!(objects > 19_000, "{objects}");
    let writes = w.nsx.counters().writes;
    let restart = w.reconcile("k8s-a", &v, None).await.unwrap();
    assert!(restart.plan.is_empty(), "{:?}", restart.plan.ops.first());
    assert_eq!(w.nsx.counters().writes, writes, "a restart must not write");
    // One list call per page of 1,000 per collection (13 collections) and two allocation reads:
    // one call per 1,000 objects stored, plus the partial last page of each collection. NSX
    // pages NSGroups by 50 at most, so the 1,000 namespace NSGroups take 20 calls of their own
    // (the consistent list is worth it: search lags, and a group created just before a crash
    // would be created again).
    let groups = w
        .nsx
        .with_store(|s| s.ids_of(fake_nsx_manager::kind::Kind::NsGroup).count());
    let budget = (objects - groups).div_ceil(1000) + groups.div_ceil(50) + 15;
    assert!(
        restart.observe_calls <= budget,
        "{} calls for {objects} objects",
        restart.observe_calls
    );
    eprintln!(
        "scale: {objects} NSX objects, {} writes to create, restart observed with {} calls",
        writes, restart.observe_calls
    );
}
