//! The error body every NSX Manager error answer carries.

use serde::{Deserialize, Deserializer, Serialize};

/// `{httpStatus, error_code, module_name, error_message, details, related_errors}`.
///
/// `error_code` has been seen on the wire both as a number and as a JSON string (the 429 body
/// carries `"102"`), so it is read from either and always written as a number.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    #[serde(rename = "httpStatus", default)]
    pub http_status: String,
    #[serde(default, deserialize_with = "int_or_string")]
    pub error_code: Option<i64>,
    #[serde(default)]
    pub module_name: String,
    #[serde(default)]
    pub error_message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub related_errors: Vec<ErrorBody>,
}

impl ErrorBody {
    /// A body for `status` with NSX's reason phrase spelling (`BAD_REQUEST`, `NOT_FOUND`, ...).
    pub fn new(
        status: u16,
        error_code: i64,
        module_name: &str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            http_status: http_status_name(status).to_string(),
            error_code: Some(error_code),
            module_name: module_name.to_string(),
            error_message: message.into(),
            details: None,
            related_errors: Vec::new(),
        }
    }
}

fn int_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Code {
        Int(i64),
        Str(String),
    }
    Ok(match Option::<Code>::deserialize(d)? {
        None => None,
        Some(Code::Int(i)) => Some(i),
        Some(Code::Str(s)) => s.trim().parse().ok(),
    })
}

/// The Java `HttpStatus` enum name NSX puts in `httpStatus`.
pub fn http_status_name(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "CREATED",
        400 => "BAD_REQUEST",
        401 => "UNAUTHORIZED",
        403 => "FORBIDDEN",
        404 => "NOT_FOUND",
        405 => "METHOD_NOT_ALLOWED",
        409 => "CONFLICT",
        412 => "PRECONDITION_FAILED",
        415 => "UNSUPPORTED_MEDIA_TYPE",
        429 => "TOO_MANY_REQUESTS",
        500 => "INTERNAL_SERVER_ERROR",
        503 => "SERVICE_UNAVAILABLE",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_is_read_from_number_or_string() {
        let a: ErrorBody =
            serde_json::from_str(r#"{"httpStatus":"TOO_MANY_REQUESTS","error_code":"102","module_name":"common-services","error_message":"x"}"#)
                .unwrap();
        assert_eq!(a.error_code, Some(102));
        let b: ErrorBody = serde_json::from_str(r#"{"error_code":202}"#).unwrap();
        assert_eq!(b.error_code, Some(202));
        let c: ErrorBody = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!(c.error_code, None);
    }
}
