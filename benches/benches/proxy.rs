//! `proxy/full_sync/{100,1000,10000}`: compile that many services (10 endpoints each) and
//! install them into an empty fake-ovs bridge in one bundle (target: 10,000 under 100 ms).
//! `proxy/endpoint_update/{100,1000,10000}`: one endpoint of one service changes in a
//! converged cluster of that size (target: under 20 us, the same at every size).
//! `proxy/event_to_bundle/{100,1000,10000}`: the same change end to end, as the running proxy
//! meets it: one EndpointSlice modification delivered as a watch event (into the watch's
//! store and the proxy's event record), the view brought up to date, the bundle committed on
//! fake-ovs (target: at most 30 us at 10,000, within 1.5x across sizes).

use std::collections::BTreeSet;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use fake_ovs::Bridge;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{reflector, watcher};
use nsx_core::proxy::{Endpoint, Proxy, ProxyConfig, ProxyEvents, ProxyView, ServicePortKey};

/// The allocator the binaries ship with (`ncp`, `nsx-node-agent`, `fake-nsx-manager`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    for n in [100usize, 1_000, 10_000] {
        let (services, slices) = benches::proxy_objects(n);
        let (svc_store, mut svc_writer) = reflector::store::<Service>();
        let (slice_store, mut slice_writer) = reflector::store::<EndpointSlice>();
        for s in &services {
            svc_writer.apply_watcher_event(&watcher::Event::Apply(s.clone()));
        }
        for s in &slices {
            slice_writer.apply_watcher_event(&watcher::Event::Apply(s.clone()));
        }
        let mut view = ProxyView::new("node-1");
        view.refresh(&svc_store, &slice_store, ProxyEvents::default());
        assert_eq!(view.want().len(), n);
        let mut bridge = Bridge::new("br-int");
        let mut proxy = Proxy::new(config(), 1, None, BTreeSet::new());
        proxy.full_sync(&mut bridge, view.want()).expect("installs");
        let plain = slices[n / 2].clone();
        let mut grown = plain.clone();
        let mut extra = grown.endpoints[0].clone();
        extra.addresses = vec!["10.2.0.1".into()];
        grown.endpoints.push(extra);
        let mut on = false;
        group.bench_with_input(BenchmarkId::new("event_to_bundle", n), &n, |b, _| {
            b.iter(|| {
                on = !on;
                let event = watcher::Event::Apply(if on { grown.clone() } else { plain.clone() });
                slice_writer.apply_watcher_event(&event);
                let mut events = ProxyEvents::default();
                events.slice(&event);
                let changed = view.refresh(&svc_store, &slice_store, events);
                assert_eq!(changed.len(), 1);
                proxy
                    .sync(&mut bridge, view.want(), &changed)
                    .expect("syncs")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, proxy);
criterion_main!(benches);
