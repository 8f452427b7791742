//! NSX Manager: the API model, the error body, the search query syntax, and the client.
//!
//! Layout:
//! - [`model`]: serde types with the API's exact field names, shared with `fake-nsx-manager`.
//! - [`error`]: the NSX error body (`httpStatus`, `error_code`, `module_name`, `error_message`).
//! - [`search`]: building Lucene-style search queries as NSX clients write them.
//! - [`client`]: the production HTTP client, generic over its connector.

pub mod client;
mod error;
pub mod model;
pub mod search;

pub use client::{Auth, ClientConfig, ClientStats, NsxClient, NsxError, StatsHandle};
pub use error::ErrorBody;
