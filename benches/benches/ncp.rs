//! `ncp/desired_state/{1000,10000}`: the desired NSX state of a cluster of that many pods (10
//! per namespace). `ncp/plan_noop/{1000,10000}`: planning a converged cluster of that size (no
//! operation may come out): the cost NCP pays on every resync.

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
    }
    group.finish();
}

criterion_group!(benches, ncp);
criterion_main!(benches);
