//! Error answers, with the NSX error body and the codes this fake uses.
//!
//! Codes marked "chosen" are not documented publicly; they are what this fake answers and are
//! listed in the crate README among the known differences.

use nsx_core::nsx::ErrorBody;

/// Object not found (documented; vmware-nsxlib maps it to BackendResourceNotFound).
pub const NOT_FOUND: i64 = 202;
/// A server-side failure (the general error code NSX gives a 500).
pub const INTERNAL: i64 = 100;
/// "Field level validation errors" on a body.
pub const FIELD_VALIDATION: i64 = 255;
/// A body that is not JSON at all (chosen).
pub const INVALID_JSON: i64 = 250;
/// Stale `_revision` on PUT (not public; configurable, this is the default).
pub const STALE_REVISION: i64 = 208;
/// Concurrent change of a firewall section or rule (chosen).
pub const FIREWALL_CONFLICT: i64 = 246;
/// Modifying a protected object (documented).
pub const PROTECTED: i64 = 289;
/// Per-client request rate exceeded (documented; the body carries it as a string).
pub const RATE_LIMIT: i64 = 102;
/// Expired session token (documented).
pub const SESSION_EXPIRED: i64 = 98;
/// Wrong credentials (documented).
pub const BAD_CREDENTIALS: i64 = 403;
/// The role does not allow the operation (chosen).
pub const PERMISSION_DENIED: i64 = 401;
/// Concurrency limit reached (chosen).
pub const TOO_MANY_IN_FLIGHT: i64 = 503;
/// A logical port still has an attachment (as the reference notes).
pub const PORT_ATTACHED: i64 = 8402;
/// An object is still referenced or has children (chosen).
pub const IN_USE: i64 = 5072;
/// IP pool exhausted / address not in pool / already allocated (documented).
pub const POOL_EXHAUSTED: i64 = 5109;
pub const NOT_IN_POOL: i64 = 5110;
pub const ALREADY_ALLOCATED: i64 = 5141;
/// No room left in an IP block (chosen).
pub const BLOCK_EXHAUSTED: i64 = 5120;
/// The default firewall rule must stay last (documented).
pub const DEFAULT_RULE_LAST: i64 = 100077;
/// An unparsable search query (chosen).
pub const SEARCH_QUERY: i64 = 60501;
/// Method not supported on a path (chosen).
pub const METHOD_NOT_ALLOWED: i64 = 405;
/// Cluster reconfiguring (documented).
pub const CLUSTER_RECONFIGURING: i64 = 607;

/// An error answer: status plus body. `extra` carries a raw body when the real manager's
/// differs from the usual shape (the 429 body's string `error_code`).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub body: ErrorBody,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: u16, code: i64, module: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody::new(status, code, module, message),
        }
    }

    pub fn bad_request(code: i64, module: &str, message: impl Into<String>) -> Self {
        Self::new(400, code, module, message)
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(
            400,
            FIELD_VALIDATION,
            "common-services",
            format!("Field level validation errors: {{{}}}", message.into()),
        )
    }

    pub fn not_found(id: &str) -> Self {
        Self::new(
            404,
            NOT_FOUND,
            "common-services",
            format!(
                "The requested object : {id} could not be found. Object identifiers are case sensitive."
            ),
        )
    }

    pub fn in_use(module: &str, message: impl Into<String>) -> Self {
        Self::bad_request(IN_USE, module, message)
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            405,
            METHOD_NOT_ALLOWED,
            "common-services",
            format!("The method {method} is not supported for the URI {path}."),
        )
    }
}
