//! The real NSX-T / Kubernetes integration: everything that runs in production and, unchanged,
//! inside the deterministic simulation.
//!
//! This crate has no fakes and no I/O of its own beyond the ports it is handed (an HTTP
//! connector, a clock through tokio, a seeded random source).
//!
//! Layout:
//! Layout, in layers (a module uses only the layers above it in this list; `tests/layers.rs`
//! checks it):
//! - [`hash`]: the fixed hashes (names and cookies; lookup tables); [`rng`]: the small seeded
//!   random source every component takes instead of OS randomness.
//! - [`nsx`]: the NSX Manager API model (serde types with the API's exact field names), the
//!   error body, and the production HTTP client with NSX's retry, auth and pagination rules;
//!   [`k8s`]: the controller's view of the cluster, watches, label selectors, the pod network
//!   annotation; [`ovs`]: the OpenFlow model, `ovs-ofctl` text, and the node's pipeline.
//! - [`cni`]: the CNI plugin's protocol and its wire to the node agent.
//! - [`ncp`]: NCP: desired NSX state, observation by tags, planning, rendering, applying;
//!   [`agent`]: the node agent; [`proxy`]: nsx-kube-proxy.
//!
//! ```
//! use nsx_core::nsx::model::{LogicalSwitch, Tag};
//! let ls: LogicalSwitch = serde_json::from_str(
//!     r#"{"transport_zone_id": "tz-1", "admin_state": "UP", "tags": [{"scope": "ncp/cluster", "tag": "k8s-a"}]}"#,
//! ).unwrap();
//! assert_eq!(ls.meta.tags.as_deref(), Some(&[Tag::new("ncp/cluster", "k8s-a")][..]));
//! ```

pub mod agent;
pub mod cni;
pub mod hash;
pub mod k8s;
pub mod ncp;
pub mod nsx;
pub mod ovs;
pub mod proxy;
pub mod rng;
