//! `nsx_manager/create_logical_port/{10000,100000}`: one container port create (validation,
//! reference checks, IP and MAC allocation, indexing) in a store already holding that many
//! ports. `nsx_manager/search_by_tag/{10000,100000}`: NCP's search for one pod's port by tag in
//! such a store. Neither may grow linearly with the store.

use std::time::{Duration, Instant};

use benches::{manager_with_ports, port_body};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fake_nsx_manager::dispatch::ApiRequest;

fn nsx_manager(c: &mut Criterion) {
    let mut group = c.benchmark_group("nsx_manager");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for n in [10_000usize, 100_000] {
        let (nsx, switch) = manager_with_ports(n);
        let mut next = n;
        group.bench_with_input(BenchmarkId::new("create_logical_port", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let bodies: Vec<Vec<u8>> = (0..iters)
                    .map(|k| {
                        serde_json::to_vec(&port_body(&switch, next + k as usize)).expect("json")
                    })
                    .collect();
                let mut ids = Vec::with_capacity(bodies.len());
                let start = Instant::now();
                for body in &bodies {
                    let r = nsx.call_as_admin(ApiRequest {
                        method: "POST",
                        path: "/api/v1/logical-ports",
                        query: &[],
                        body,
                    });
                    ids.push(r);
                }
                let elapsed = start.elapsed();
                // Back to n ports, outside the measurement.
                for r in ids {
                    assert_eq!(r.status, 201, "{:?}", r.body);
                    let id = r
                        .body
                        .as_ref()
                        .and_then(|b| b["id"].as_str())
                        .unwrap_or_default()
                        .to_string();
                    let q = [("detach".to_string(), "true".to_string())];
                    let path = format!("/api/v1/logical-ports/{id}");
                    let d = nsx.call_as_admin(ApiRequest {
                        method: "DELETE",
                        path: &path,
                        query: &q,
                        body: b"",
                    });
                    assert_eq!(d.status, 200);
                }
                next += iters as usize;
                elapsed
            })
        });
        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::new("search_by_tag", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 7919) % n;
                let q = format!(
                    "resource_type:LogicalPort AND tags.scope:ncp\\/pod AND tags.tag:pod\\-{i}"
                );
                let query = [("query".to_string(), q)];
                let r = nsx.call_as_admin(ApiRequest {
                    method: "GET",
                    path: "/api/v1/search",
                    query: &query,
                    body: b"",
                });
                assert_eq!(
                    r.body.as_ref().map(|b| b["result_count"].as_i64()),
                    Some(Some(1))
                );
                r
            })
        });
    }
    group.finish();
}

criterion_group!(benches, nsx_manager);
criterion_main!(benches);
