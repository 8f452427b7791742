//! `ncp/desired_state/{1000,10000}`: the desired NSX state of a cluster of that many pods (10
//! per namespace). `ncp/plan_noop/{1000,10000}`: planning a converged cluster of that size (no
//! operation may come out): the cost NCP pays on every resync. `ncp/plan_cached/{1000,10000}`:
//! the plan of a running NCP after one pod changed its labels, over the keys that changed,
//! against the synced cache of its previous pass. `ncp/change/{1000,10000}`: all of a running
//! NCP's CPU for a change: one pod's labels change and change back (two passes), each taking
//! the pod into the view, updating the desired state and planning the changed keys. The last
//! two must not grow with the cluster.

use std::time::Duration;

use benches::{cluster_view, converged_observation, infra};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use std::collections::BTreeSet;

use nsx_core::k8s::ViewChanges;
use nsx_core::ncp::desired::desired;
use nsx_core::ncp::desired_cache::DesiredCache;
use nsx_core::ncp::observe::Known;
use nsx_core::ncp::plan::{Op, plan, plan_changes};
use nsx_core::ncp::vocab::Key;

/// The allocator the binaries ship with (`ncp`, `nsx-node-agent`, `fake-nsx-manager`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn ncp(c: &mut Criterion) {
    let mut group = c.benchmark_group("ncp");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    let infra = infra();
    for pods in [1_000usize, 10_000] {
        let view = cluster_view(pods);
        group.bench_with_input(BenchmarkId::new("desired_state", pods), &pods, |b, _| {
            b.iter(|| desired(&view, "k8s-a", 24))
        });
        let want = desired(&view, "k8s-a", 24);
        let observed = converged_observation(&view, &infra);
        let p = plan(&want, &observed, &infra);
        assert!(
            p.is_empty() && p.unrealizable.is_empty(),
            "not converged: {:?}",
            p.ops.first()
        );
        group.bench_with_input(BenchmarkId::new("plan_noop", pods), &pods, |b, _| {
            b.iter(|| plan(&want, &observed, &infra))
        });
        // A running NCP: its cache is synced with `want`; one pod's labels (its port's tags)
        // change.
        let cached = observed.clone();
        let known = Known {
            synced: true,
            ..Known::default()
        };
        let mut changed = want.clone();
        let (key, spec) = changed
            .objects
            .iter_mut()
            .find(|(k, _)| matches!(k, Key::PodPort(_)))
            .expect("a pod port");
        spec.tags
            .push(nsx_core::nsx::model::Tag::new("app", "changed"));
        let key = key.clone();
        let touched: BTreeSet<Key> = [key.clone()].into();
        let p = plan_changes(&changed, &cached, &known, &infra, &touched).expect("synced");
        assert_eq!(p, plan(&changed, &cached, &infra));
        assert_eq!(p.ops.len(), 1, "{:?}", p.ops);
        assert!(
            matches!(&p.ops[0], Op::Update { key: k, .. } if *k == key),
            "{:?}",
            p.ops[0]
        );
        group.bench_with_input(BenchmarkId::new("plan_cached", pods), &pods, |b, _| {
            b.iter(|| plan_changes(&changed, &cached, &known, &infra, &touched))
        });
        // The whole of a change: the pod into the view, the desired state updated, the plan.
        let mut view = view;
        let mut tracked = DesiredCache::new(&view, "k8s-a", 24);
        let pod_key = ("ns-7".to_string(), "pod-70".to_string());
        let original = view.pods[&pod_key].clone();
        let mut relabelled = original.clone();
        relabelled.metadata.labels = Some([("app".to_string(), "changed".to_string())].into());
        let changes = ViewChanges {
            pods: [pod_key.clone()].into(),
            ..ViewChanges::default()
        };
        let mut pass = |pod: &k8s_openapi::api::core::v1::Pod| {
            view.pods.insert(pod_key.clone(), pod.clone());
            let touched = tracked.update(&view, &changes);
            plan_changes(tracked.desired(), &cached, &known, &infra, &touched).expect("synced")
        };
        let there = pass(&relabelled);
        assert!(
            matches!(&there.ops[..], [Op::Update { key: Key::PodPort(u), .. }] if u == "uid-pod-70"),
            "{:?}",
            there.ops
        );
        assert!(pass(&original).is_empty());
        group.bench_with_input(BenchmarkId::new("change", pods), &pods, |b, _| {
            b.iter(|| (pass(&relabelled), pass(&original)))
        });
    }
    group.finish();
}

criterion_group!(benches, ncp);
criterion_main!(benches);
