//! `ncp/desired_state/{1000,10000}`: the desired NSX state of a cluster of that many pods (10
//! per namespace). `ncp/plan_noop/{1000,10000}`: planning a converged cluster of that size (no
//! operation may come out): the cost NCP pays on every resync. `ncp/plan_cached/{1000,10000}`:
//! the plan of a running NCP after one pod changed its labels, against the cache of its
//! previous pass (which knows what it verified): the cost of a change.

use std::time::Duration;

use benches::{cluster_view, converged_observation, infra};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use nsx_core::ncp::desired::desired;
use nsx_core::ncp::plan::plan;

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
        // A running NCP: its cache verified `want`; one pod's labels (its port's tags) change.
        let mut cached = observed.clone();
        cached.verified = Some(std::sync::Arc::new(want.clone()));
        let mut changed = want.clone();
        let (key, spec) = changed
            .objects
            .iter_mut()
            .find(|(k, _)| matches!(k, nsx_core::ncp::desired::Key::PodPort(_)))
            .expect("a pod port");
        spec.tags
            .push(nsx_core::nsx::model::Tag::new("app", "changed"));
        let key = key.clone();
        let p = plan(&changed, &cached, &infra);
        assert_eq!(p.ops.len(), 1, "{:?}", p.ops);
        assert!(
            matches!(&p.ops[0], nsx_core::ncp::plan::Op::Update { key: k, .. } if *k == key),
            "{:?}",
            p.ops[0]
        );
        group.bench_with_input(BenchmarkId::new("plan_cached", pods), &pods, |b, _| {
            b.iter(|| plan(&changed, &cached, &infra))
        });
    }
    group.finish();
}

criterion_group!(benches, ncp);
criterion_main!(benches);
