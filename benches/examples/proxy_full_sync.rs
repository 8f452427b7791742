//! A profiling aid for `proxy/full_sync/10000`: runs the full sync of 10,000 services (10
//! endpoints each) into fake-ovs a number of times and prints, per run, the time and the heap
//! allocations, then the best time of the compile alone (into a bridge that keeps the
//! operations) and of the install alone. Made to run under callgrind:
//!
//! ```text
//! cargo build --release -p benches --example proxy_full_sync
//! target/release/examples/proxy_full_sync 15
//! valgrind --tool=callgrind --toggle-collect='*Proxy::full_sync*' \
//!     target/release/examples/proxy_full_sync 1
//! ```

use std::alloc::{GlobalAlloc, Layout};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use fake_ovs::Bridge;
use nsx_core::ovs::bridge::{BridgeError, ConntrackFilter, OfOp, OpenFlowBridge};
use nsx_core::proxy::{Proxy, ProxyConfig};

/// The allocator the binaries ship with (mimalloc), counting allocations.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as received.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Keeps the operations instead of applying them: the compile alone.
struct Keep(Vec<OfOp>);

impl OpenFlowBridge for Keep {
    fn bundle(&mut self, ops: Vec<OfOp>) -> Result<(), BridgeError> {
        self.0 = ops;
        Ok(())
    }

    fn flush_conntrack(&mut self, _: ConntrackFilter) -> usize {
        0
    }

    fn flows_with_cookie(
        &mut self,
        cookie: u64,
        mask: u64,
    ) -> Result<Vec<nsx_core::ovs::flow::Flow>, BridgeError> {
        Ok(self
            .0
            .iter()
            .filter_map(|op| match op {
                OfOp::AddFlow(f) if f.cookie & mask == cookie & mask => Some(f.clone()),
                _ => None,
            })
            .collect())
    }
}

fn proxy() -> Proxy {
    let cfg = ProxyConfig {
        node_name: "node-1".into(),
        node_ips: vec![0xac10_000b],
    };
    Proxy::new(cfg, 1, None, BTreeSet::new())
}

fn main() -> anyhow::Result<()> {
    let runs: usize = match std::env::args().nth(1) {
        Some(a) => a.parse()?,
        None => 5,
    };
    let want = benches::proxy_cluster(10_000);
    let mut best = f64::MAX;
    for _ in 0..runs {
        let mut bridge = Bridge::new("br-int");
        let mut p = proxy();
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let t = Instant::now();
        p.full_sync(&mut bridge, &want)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
        println!("full sync: {ms:.1} ms, {allocations} allocations");
        best = best.min(ms);
    }
    let (mut compile, mut install) = (f64::MAX, f64::MAX);
    for _ in 0..runs {
        let mut keep = Keep(Vec::new());
        let mut p = proxy();
        let t = Instant::now();
        p.full_sync(&mut keep, &want)?;
        compile = compile.min(t.elapsed().as_secs_f64() * 1e3);
        let mut bridge = Bridge::new("br-int");
        let t = Instant::now();
        OpenFlowBridge::bundle(&mut bridge, std::mem::take(&mut keep.0))?;
        install = install.min(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("best: full sync {best:.1} ms, compile {compile:.1} ms, install {install:.1} ms");
    Ok(())
}
