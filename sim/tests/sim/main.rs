//! The simulator's integration tests, one module per subject, in one binary: fifteen test
//! binaries each linked the whole stack, which cost minutes of every build.
//!
//! Run one subject with a filter, e.g. `cargo test -p nsx-sim --test sim policy_conformance::`.

mod common;

mod apiserver;
mod converge_content;
mod ncp;
mod ncp_e2e;
mod ncp_ha;
mod ncp_policy;
mod ncp_property;
mod ncp_scale;
mod policy_conformance;
mod presets;
mod report_html;
mod scenario_machine;
mod scenarios;
