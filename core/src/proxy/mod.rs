//! nsx-kube-proxy: ClusterIP and NodePort services load-balanced inside Open vSwitch with
//! select groups and conntrack NAT.
//!
//! - [`model`]: Services and EndpointSlices to service ports with their endpoints (ready
//!   ones, else serving-terminating ones; `internalTrafficPolicy: Local`; named target ports
//!   as the slices resolve them).
//! - [`compile`]: a service port to flows and a group (pure), and the shared per-endpoint
//!   DNAT flows, in the tables and registers of [`crate::ovs::pipeline`].
//! - [`sync`]: the incremental proxy: per-key caches, one atomic bundle per sync, reference
//!   counted endpoint flows, groups split past the OpenFlow message size, conntrack flushes,
//!   rounds in cookies for restarts.
//! - [`view`]: the service ports kept up to date from watch events, one service at a time.
//! - [`run`]: the loop over Service and EndpointSlice watches that drives the sync.

pub mod compile;
mod model;
pub mod run;
mod sync;
pub mod view;

pub use model::{
    EXTERNAL_LOCAL_SUFFIX, Endpoint, NODE_PORT_SUFFIX, Scope, ServicePort, ServicePortKey,
    all_service_ports, service_ports,
};
pub use sync::{Proxy, ProxyConfig, SyncReport};
pub use view::{ProxyEvents, ProxyView};
