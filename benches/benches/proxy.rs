//! `proxy/full_sync/{100,1000,10000}`: compile that many services (10 endpoints each) and
//! install them into an empty fake-ovs bridge in one bundle (target: 10,000 under 100 ms).
//! `proxy/endpoint_update/{100,1000,10000}`: one endpoint of one service changes in a
//! converged cluster of that size (target: under 20 us, the same at every size).

use std::collections::BTreeSet;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use fake_ovs::Bridge;
use nsx_core::proxy::{Endpoint, Proxy, ProxyConfig, ServicePortKey};

fn config() -> ProxyConfig {
    ProxyConfig {
        node_name: "node-1".into(),
        node_ips: vec![0xac10_000b],
    }
}

fn proxy(c: &mut Criterion) {
    let mut group = c.benchmark_group("proxy");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_millis(500));
    for n in [100usize, 1_000, 10_000] {
        let want = benches::proxy_cluster(n);
        group.bench_with_input(BenchmarkId::new("full_sync", n), &n, |b, _| {
            b.iter_batched(
                || {
                    (
                        Bridge::new("br-int"),
                        Proxy::new(config(), 1, None, BTreeSet::new()),
                    )
                },
                |(mut bridge, mut proxy)| {
                    proxy.full_sync(&mut bridge, &want).expect("installs");
                    (bridge, proxy)
                },
                BatchSize::PerIteration,
            )
        });
    }
    for n in [100usize, 1_000, 10_000] {
        let mut want = benches::proxy_cluster(n);
        let mut bridge = Bridge::new("br-int");
        let mut proxy = Proxy::new(config(), 1, None, BTreeSet::new());
        proxy.full_sync(&mut bridge, &want).expect("installs");
        let key = want.keys().nth(n / 2).expect("a service").clone();
        let changed: BTreeSet<ServicePortKey> = [key.clone()].into();
        let extra = Endpoint {
            ip: 0x0a02_0001,
            port: 8080,
        };
        let mut on = false;
        group.bench_with_input(BenchmarkId::new("endpoint_update", n), &n, |b, _| {
            b.iter(|| {
                on = !on;
                let eps = &mut want.get_mut(&key).expect("the service").endpoints;
                if on {
                    eps.push(extra);
                } else {
                    eps.retain(|e| *e != extra);
                }
                proxy.sync(&mut bridge, &want, &changed).expect("syncs")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, proxy);
criterion_main!(benches);
