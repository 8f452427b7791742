//! `fake_ovs/lookup/{1000,100000}`: one packet through a table of that many flows, the shapes
//! nsx-kube-proxy installs (one exact VIP:port flow per service port, per-endpoint flows, a
//! few wildcard flows). Tuple-space search makes the cost depend on the number of distinct
//! masks, not on the number of flows: the two sizes must take about the same time.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fake_ovs::{Bridge, Packet};
use nsx_core::ovs::parse_flow;

/// The allocator the binaries ship with (`ncp`, `nsx-node-agent`, `fake-nsx-manager`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bridge(flows: usize) -> Bridge {
    let mut b = Bridge::new("br-int");
    for i in 0..flows {
        let (hi, lo) = ((i / 250) % 250, i % 250);
        let top = i / 62_500;
        let text = match i % 4 {
            0 | 1 => format!(
                "table=0,priority=100,tcp,nw_dst=10.{}.{hi}.{lo},tp_dst={},actions=output:2",
                96 + top,
                80 + (i % 4)
            ),
            2 => format!(
                "table=0,priority=90,ip,nw_dst=10.{}.{}.0/24,actions=output:3",
                1 + hi % 200,
                lo
            ),
            _ => format!(
                "table=0,priority=80,ip,nw_src=10.{}.{hi}.{lo},actions=output:4",
                200 + top
            ),
        };
        let _ = b.add_flow(parse_flow(&text).expect("bench flow parses"));
    }
    b.add_flow(parse_flow("table=0,priority=0,actions=drop").expect("parses"))
        .expect("adds");
    b
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("fake_ovs");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for flows in [1_000usize, 100_000] {
        let mut b = bridge(flows);
        let packets: Vec<Packet> = (0..64)
            .map(|i| {
                Packet::parse(&format!(
                    "in_port=1,tcp,nw_src=10.200.{}.{},nw_dst=10.96.{}.{},tcp_src=40000,tcp_dst=80",
                    i % 7,
                    i % 250,
                    i % 3,
                    i * 3 % 250
                ))
                .expect("bench packet parses")
            })
            .collect();
        let mut i = 0;
        group.bench_with_input(BenchmarkId::new("lookup", flows), &flows, |bench, _| {
            bench.iter(|| {
                i = (i + 1) % packets.len();
                b.trace(packets[i]).outputs.len()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
