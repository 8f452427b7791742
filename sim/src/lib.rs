//! The deterministic harness: the real core against the fakes on turmoil's simulated network,
//! replayable from a seed.
//!
//! Layout:
//! - [`net`]: HTTP over turmoil TCP (a connector for the production client, an accept loop for
//!   axum apps).
//! - [`trace`]: the run's event trace and its stable hash.
//! - [`apiserver`]: a fake kube-apiserver that kube-rs works against unchanged.
//! - [`ncp_host`]: NCP replicas as hosts (shared by the NCP world and the scenario engine).
//! - [`ncp_world`]: the whole NCP stack (apiserver, NSX manager, NCP replicas) under faults.
//! - [`spine`]: the NSX spine: fake manager, a controller host with the production client,
//!   scheduled faults (partition, hold, latency, manager restart, injected NSX errors).
//!
//! ```no_run
//! let report = nsx_sim::spine::run(&nsx_sim::spine::SpineConfig::new(7));
//! assert!(report.finished, "{:?}", report.error);
//! println!("trace hash {:016x}", report.trace_hash);
//! ```

pub mod apiserver;
pub mod converge;
pub mod ncp_host;
pub mod ncp_world;
pub mod net;
pub mod scenario;
pub mod spine;
pub mod trace;
