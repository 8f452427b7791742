//! The scenario engine: YAML scenarios (format in `spec`) run against the whole system on turmoil.
//!
//! - [`spec`]: the file format, loading and validation (file and line in every error).
//! - [`names`]: endpoints, protocols, NSX resource types.
//! - [`node`]: a node host: agent, nsx-kube-proxy, the OVS watcher, the kubelet.
//! - [`world`]: the hosts, the harness's Kubernetes controllers, faults.
//! - [`dataplane`]: connectivity traced end to end through OVS, NSX and OVS again.
//! - [`probes`]: the kubelet's readiness and liveness probes, through that dataplane.
//! - [`run`]: steps, expectations, invariants, the report.
//! - [`snapshot`]: golden files of the realized state, redacted.

pub mod dataplane;
pub mod detail;
pub mod names;
pub mod node;
pub mod oracle;
pub mod probes;
pub mod run;
pub mod snapshot;
pub mod spec;
pub mod world;
