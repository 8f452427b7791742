//! NCP: turns namespaces and pods into NSX objects.
//!
//! Layout:
//! - [`config`]: reading `ncp.ini`, NCP's configuration file.
//! - [`vocab`]: NCP's vocabulary: object identities, specs, selections, problems.
//! - [`naming`]: names and tags within NSX's limits.
//! - [`desired`]: the pure function from the cluster view to the NSX objects that should exist.
//! - [`desired_cache`]: the desired state kept between passes, updated by what changed.
//! - [`observe`]: what NSX holds under this cluster's tag, classified by identity.
//! - [`plan`]: the pure diff of desired against observed: an ordered list of operations.
//! - [`render`]: the NSX request body of each object, from its spec.
//! - [`policy`]: NetworkPolicy as NSGroups, IPSets and firewall sections.
//! - [`apply`]: executes a plan with the NSX client.
//! - [`controller`]: watches, reflector stores, the reconcile loop, annotation write-back.
//! - [`reconcile`]: one pass of observe, plan, apply.
//! - [`write_back`]: annotations, service status and Events a pass writes to Kubernetes.
//! - [`leader`]: leader election on a Lease, with fencing.
//! - [`infra`]: the admin-created objects NCP builds on (transport zone, tier-0, block, pools,
//!   node VIFs), found by config or tag.

mod apply;
pub mod config;
pub mod controller;
pub mod desired;
pub mod desired_cache;
pub mod infra;
pub mod leader;
pub mod naming;
pub mod observe;
pub mod plan;
pub mod policy;
pub mod reconcile;
pub mod render;
pub mod vocab;
mod write_back;

pub use apply::{ApplyError, ApplyReport};
