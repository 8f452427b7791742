//! `nsx_manager/create_logical_port/{10000,100000}`: one container port create (validation,
//! reference checks, IP and MAC allocation, indexing) in a store already holding that many
//! ports. `nsx_manager/search_by_tag/{10000,100000}`: NCP's search for one pod's port by tag in
//! such a store. Neither may grow linearly with the store.
//! `nsx_manager/persisted_write/{1000,20000}`: one port update (a PUT with its revision) on a
//! manager keeping its database in a state file (`--state`): journaled and synced before it is
//! answered, the journal folded into a new snapshot as often as it outgrows it, so the fold's
//! cost is spread over the writes it follows. Within 2x across sizes.

use std::time::{Duration, Instant};

use benches::{manager_with_ports, port_body};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fake_nsx_manager::dispatch::ApiRequest;

/// The allocator the binaries ship with (`ncp`, `nsx-node-agent`, `fake-nsx-manager`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    for n in [1_000usize, 20_000] {
        let (nsx, switch) = manager_with_ports(n);
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("persisted-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("bench folder");
        nsx.persist_to(&dir.join("nsx.json")).expect("state file");
        // The last port created; each update bumps its revision.
        let list = nsx.call_as_admin(ApiRequest {
            method: "GET",
            path: "/api/v1/search",
            query: &[(
                "query".to_string(),
                format!("resource_type:LogicalPort AND tags.tag:pod\\-{}", n - 1),
            )],
            body: b"",
        });
        let port = list.body.expect("search")["results"][0].clone();
        let id = port["id"].as_str().expect("port id").to_string();
        let path = format!("/api/v1/logical-ports/{id}");
        let mut revision = port["_revision"].as_i64().expect("revision");
        let mut k = 0u64;
        group.bench_with_input(BenchmarkId::new("persisted_write", n), &n, |b, _| {
            b.iter(|| {
                k += 1;
                let mut body = port_body(&switch, n - 1);
                body["display_name"] = format!("pod-{}-v{k}", n - 1).into();
                body["_revision"] = revision.into();
                let bytes = serde_json::to_vec(&body).expect("json");
                let r = nsx.call_as_admin(ApiRequest {
                    method: "PUT",
                    path: &path,
                    query: &[],
                    body: &bytes,
                });
                assert_eq!(r.status, 200, "{:?}", r.body);
                revision += 1;
                r
            })
        });
        drop(nsx);
        let _ = std::fs::remove_dir_all(&dir);
    }
    group.finish();
}

criterion_group!(benches, nsx_manager);
criterion_main!(benches);
