//! The deterministic harness: the real core against the fakes on turmoil's simulated network,
//! replayable from a seed.
//!
//! Layout:
//! - [`net`]: HTTP over turmoil TCP (a connector for the production client, an accept loop for
//!   axum apps).
//! - [`trace`]: the run's event trace and its stable hash.
//! - [`apiserver`]: a fake kube-apiserver that kube-rs works against unchanged.
//! - [`ncp_host`]: the control plane's hosts (apiserver, NSX manager) and NCP replicas.
//! - [`converge`]: the from-scratch converge check (NSX content against the desired state).
//! - [`scenario`]: the one engine: a scenario's world (every node's agent, proxy, kubelet and
//!   OVS), its steps, faults, expectations, invariants and report.
//! - [`presets`]: the built-in worlds (`nsx-sim ncp`, `nsx-sim spine`) as generated scenarios.
//!
//! ```no_run
//! use nsx_sim::{presets, scenario::run};
//! let sc = presets::load("ncp", &presets::ncp(1, false)).expect("a valid scenario");
//! let (report, _world) = run::run(&sc, 7, &run::RunOptions::default());
//! assert!(report.passed, "{:?}", report.message);
//! println!("trace hash {}", report.trace_hash);
//! ```

pub mod apiserver;
pub mod converge;
pub mod html;
pub mod ncp_host;
pub mod net;
pub mod presets;
pub mod scenario;
pub mod trace;
