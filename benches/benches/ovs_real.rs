//! `ovs_real/install_adapter/{10000,100000}`: that many flows installed into a real
//! ovs-vswitchd (a private one, dummy datapath) through the OVS adapter's atomic bundle;
//! `ovs_real/install_ofctl_bundle/{10000,100000}`: the same flows through
//! `ovs-ofctl --bundle add-flows`, measured in the same run. The adapter must not be slower;
//! the ratio is printed at the end. Needs Debian's openvswitch-switch (fails without it).

use std::cell::RefCell;
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use fake_ovs::real::Sandbox;
use nsx_adapters::ovs::{OvsBridge, OvsTools, find_tool};
use nsx_core::ovs::bridge::{OfOp, OpenFlowBridge};
use nsx_core::ovs::{Flow, parse_flow};

/// The allocator the binaries ship with (`ncp`, `nsx-node-agent`, `fake-nsx-manager`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn flows(n: usize) -> Vec<Flow> {
    (0..n)
        .map(|i| {
            parse_flow(&format!(
                "cookie={:#x},table=0,priority=100,tcp,nw_dst=10.{}.{}.{},tp_dst=80,actions=output:2",
                i + 1,
                (i >> 16) & 0xff,
                (i >> 8) & 0xff,
                i & 0xff
            ))
            .expect("valid flow")
        })
        .collect()
}

fn tools(sb: &Sandbox) -> OvsTools {
    let dir = sb.dir().to_string_lossy().into_owned();
    OvsTools {
        vsctl: find_tool("ovs-vsctl").expect("ovs-vsctl (install openvswitch-switch)"),
        ofctl: find_tool("ovs-ofctl").expect("ovs-ofctl (install openvswitch-switch)"),
        appctl: find_tool("ovs-appctl").expect("ovs-appctl (install openvswitch-switch)"),
        db: Some(format!("unix:{}", sb.path("db.sock"))),
        env: ["OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR"]
            .into_iter()
            .map(|k| (k.to_string(), dir.clone()))
            .collect(),
    }
}

fn ovs_real(c: &mut Criterion) {
    let sb = Sandbox::start("bench");
    let t = tools(&sb);
    let clear = || {
        t.ofctl(&["-O", "OpenFlow15", "del-flows", "br0"], None)
            .expect("del-flows");
    };
    let mut group = c.benchmark_group("ovs_real");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_millis(100));
    let means: RefCell<Vec<(usize, &str, Duration)>> = RefCell::default();
    for n in [10_000usize, 100_000] {
        let installed = std::cell::Cell::new(false);
        let fl = flows(n);
        let text: String = fl.iter().map(|f| format!("{f}\n")).collect();
        let mut bridge = OvsBridge::new("br0", t.clone());
        group.bench_with_input(BenchmarkId::new("install_adapter", n), &n, |b, _| {
            let mut total = Duration::ZERO;
            let mut runs = 0u32;
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    clear();
                    let ops: Vec<OfOp> = fl.iter().cloned().map(OfOp::AddFlow).collect();
                    let start = std::time::Instant::now();
                    bridge.bundle(ops).expect("installs");
                    spent += start.elapsed();
                }
                total += spent;
                runs += iters as u32;
                spent
            });
            if runs > 0 {
                means.borrow_mut().push((n, "adapter", total / runs));
                installed.set(true);
            }
        });
        group.bench_with_input(BenchmarkId::new("install_ofctl_bundle", n), &n, |b, _| {
            let mut total = Duration::ZERO;
            let mut runs = 0u32;
            b.iter_batched(
                clear,
                |()| {
                    let start = std::time::Instant::now();
                    t.ofctl(
                        &["-O", "OpenFlow15", "--bundle", "add-flows", "br0", "-"],
                        Some(&text),
                    )
                    .expect("ovs-ofctl installs");
                    total += start.elapsed();
                    runs += 1;
                },
                BatchSize::PerIteration,
            );
            if runs > 0 {
                means.borrow_mut().push((n, "ofctl", total / runs));
                installed.set(true);
            }
        });
        // Both put the same flows in (when a filter left either to run).
        if !installed.get() {
            continue;
        }
        let count = t
            .ofctl(
                &["-O", "OpenFlow15", "--no-stats", "dump-flows", "br0"],
                None,
            )
            .expect("dump-flows")
            .lines()
            .filter(|l| l.contains("actions="))
            .count();
        assert_eq!(count, n);
    }
    group.finish();
    let m = means.into_inner();
    for n in [10_000usize, 100_000] {
        let last = |who: &str| {
            m.iter()
                .rev()
                .find(|(k, w, _)| *k == n && *w == who)
                .map(|(_, _, d)| *d)
        };
        if let (Some(a), Some(o)) = (last("adapter"), last("ofctl")) {
            println!(
                "ovs_real/{n}: adapter {a:?}, ovs-ofctl --bundle {o:?}, ratio {:.2} (adapter / ofctl)",
                a.as_secs_f64() / o.as_secs_f64()
            );
        }
    }
}

criterion_group!(benches, ovs_real);
criterion_main!(benches);
