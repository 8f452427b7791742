//! `agent/add_del/{100,1000,10000}`: the node agent's pod path on a node already holding that
//! many wired pods: the CNI ADD of one more pod (its OVS port and flows in one bundle on
//! fake-ovs) and its DEL. Its cost must not grow with the node's pods (within 1.5x across
//! sizes): the agent keeps per-pod state, so nothing is rebuilt per pod.

use std::collections::BTreeMap;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fake_ovs::Bridge;
use nsx_core::agent::{Agent, AgentConfig, PodNetwork, PodRequest};

/// The allocator the binaries ship with (`ncp`, `nsx-node-agent`, `fake-nsx-manager`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn request(i: usize) -> (PodRequest, PodNetwork) {
    let (hi, lo) = (i / 250, i % 250 + 2);
    (
        PodRequest {
            container_id: format!("{i:064x}"),
            namespace: format!("ns-{}", i % 100),
            name: format!("pod-{i}"),
            ifname: "eth0".into(),
        },
        PodNetwork {
            gateway: format!("10.4.{hi}.1"),
            ip: format!("10.4.{hi}.{lo}/24"),
            logical_port_id: format!("lp-{i}"),
            mac: format!(
                "02:50:56:{:02x}:{:02x}:{:02x}",
                i >> 16 & 0xff,
                i >> 8 & 0xff,
                i & 0xff
            ),
            vlan: (i % 4094 + 1) as u16,
        },
    )
}

fn agent(c: &mut Criterion) {
    let mut group = c.benchmark_group("agent");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for n in [100usize, 1_000, 10_000] {
        let mut bridge = Bridge::new("br-int");
        let uplink = bridge
            .add_port("uplink", None, BTreeMap::new())
            .expect("the uplink");
        let mut agent = Agent::new(AgentConfig { uplink });
        for i in 0..n {
            let (req, net) = request(i);
            agent.add(&mut bridge, &req, net).expect("wires");
        }
        let (req, net) = request(n);
        group.bench_with_input(BenchmarkId::new("add_del", n), &n, |b, _| {
            b.iter(|| {
                agent.add(&mut bridge, &req, net.clone()).expect("wires");
                agent
                    .remove(&mut bridge, &req.container_id)
                    .expect("unwires");
            })
        });
        assert_eq!(agent.pods().len(), n);
    }
    group.finish();
}

criterion_group!(benches, agent);
criterion_main!(benches);
