//! A fake NSX-T Manager (2.4/2.5 Manager API) that real NSX clients cannot tell from the real
//! thing for everything NCP uses.
//!
//! Layout:
//! - [`store`]: the database: objects, allocations, firewall order, search index; every
//!   operation all-or-nothing.
//! - [`dispatch`]: routes `(method, path, query, body)` to the store (also used by `/batch`).
//! - [`server`]: the HTTP face: authentication (basic and session), users and roles, rate and
//!   concurrency limits, injected faults and latency, the request log, the admin API.
//! - [`inspect`]: what a harness reads (a read-only view, typed objects, the dataplane model's
//!   verdicts) and the admin's requests it makes.
//! - [`bootstrap`]: what an NSX admin creates before NCP starts.
//! - [`tls`]: TLS for the standalone binary.
//! - [`search`], [`ipam`], [`kind`], [`error`]: the query language and index, IPv4
//!   arithmetic, the kind table, error bodies.
//!
//! ```
//! use fake_nsx_manager::{FakeNsxManager, ManagerConfig, dispatch::ApiRequest};
//! let nsx = FakeNsxManager::new(ManagerConfig::default());
//! let r = nsx.call_as_admin(ApiRequest { method: "GET", path: "/api/v1/transport-zones", query: &[], body: b"" });
//! assert_eq!(r.status, 200);
//! assert!(r.body.unwrap()["result_count"].as_u64().unwrap() >= 1);
//! ```

// `ApiError` is the answer itself (status and NSX body), built once per failed request; boxing
// it would only add an allocation to every error path.
#![allow(clippy::result_large_err)]

pub mod bootstrap;
pub mod dispatch;
pub mod error;
pub mod inspect;
pub mod ipam;
pub mod kind;
pub mod listen;
pub mod search;
pub mod server;
mod state_file;
pub mod store;
pub mod tls;

pub use bootstrap::{Bootstrap, BootstrapConfig};
pub use inspect::{AdminAnswer, Held, Inspection};
pub use server::{
    Clock, FakeNsxManager, FaultRule, ManagerConfig, RequestLogEntry, RequestSpan, User,
};
