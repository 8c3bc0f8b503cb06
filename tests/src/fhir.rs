//! Small FHIR and HTTP helpers shared by the fakes: OperationOutcome bodies, FHIR instants,
//! header inspection and `Retry-After` rendering.
//!
//! Everything here is deliberately lenient about what it *parses* only where real servers are
//! lenient too (e.g. media-type parameters such as `; charset=utf-8`), and strict elsewhere, so
//! that a client that passes against the fakes also passes against the real servers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

/// The FHIR JSON media type.
pub const FHIR_JSON: &str = "application/fhir+json";
/// The Bulk Data NDJSON media type.
pub const FHIR_NDJSON: &str = "application/fhir+ndjson";

/// An OperationOutcome with a single issue.
pub fn operation_outcome(severity: &str, code: &str, diagnostics: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]
    })
}

/// A FHIR JSON response with the given status.
pub fn fhir_response(status: StatusCode, body: &Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    set_header(&mut resp, header::CONTENT_TYPE, FHIR_JSON);
    resp
}

/// An error response carrying an OperationOutcome (severity `error`).
pub fn outcome_response(status: StatusCode, code: &str, diagnostics: &str) -> Response {
    fhir_response(status, &operation_outcome("error", code, diagnostics))
}

/// A plain JSON response (`application/json`), as Bulk Data manifests and OAuth use.
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    set_header(&mut resp, header::CONTENT_TYPE, "application/json");
    resp
}

/// An empty response with a status.
pub fn empty_response(status: StatusCode) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = status;
    resp
}

/// Sets a header; values we build are always valid header text, and an invalid one is dropped
/// rather than turned into a panic inside a server task.
pub fn set_header(resp: &mut Response, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, v);
    }
}

/// The header's value as text, if present and valid UTF-8.
pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Whether any comma-separated element of any instance of the header has the given media type
/// (ignoring parameters and case).
pub fn header_lists_media_type(headers: &HeaderMap, name: &str, media_type: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| media_type_of(item).eq_ignore_ascii_case(media_type))
}

/// Whether any comma-separated token of any instance of the header equals `token` (ignoring
/// parameters after `;`, and case).
pub fn header_has_token(headers: &HeaderMap, name: &str, token: &str) -> bool {
    header_lists_media_type(headers, name, token)
}

/// The media type of a header element without parameters.
pub fn media_type_of(value: &str) -> &str {
    value.split(';').next().unwrap_or("").trim()
}

/// Parses a FHIR `instant` (RFC 3339 with seconds and a zone).
pub fn parse_instant(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Formats a time as a FHIR instant with milliseconds and `Z`.
pub fn format_instant(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The current time as a FHIR instant.
pub fn now_instant() -> String {
    format_instant(Utc::now())
}

/// How a fake renders `Retry-After`. Real servers use all these forms; the absolute epoch
/// numbers are non-standard (the SMART reference server sends epoch milliseconds on a 429).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryAfter {
    /// No `Retry-After` header.
    Omit,
    /// `Retry-After: <delta seconds>`.
    Seconds(u64),
    /// `Retry-After: <HTTP-date>` that many seconds from now.
    HttpDate(u64),
    /// `Retry-After: <epoch seconds>` of the instant that many seconds from now.
    EpochSeconds(u64),
    /// `Retry-After: <epoch milliseconds>` of the instant that many seconds from now.
    EpochMillis(u64),
}

impl RetryAfter {
    /// The header value to send, if any.
    pub fn header_value(&self) -> Option<String> {
        match self {
            RetryAfter::Omit => None,
            RetryAfter::Seconds(s) => Some(s.to_string()),
            RetryAfter::HttpDate(s) => SystemTime::now()
                .checked_add(Duration::from_secs(*s))
                .map(httpdate::fmt_http_date),
            RetryAfter::EpochSeconds(s) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                Some(now.saturating_add(*s).to_string())
            }
            RetryAfter::EpochMillis(s) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis();
                Some(now.saturating_add(u128::from(*s) * 1000).to_string())
            }
        }
    }

    /// Adds the header to a response.
    pub fn apply(&self, resp: &mut Response) {
        if let Some(v) = self.header_value() {
            set_header(resp, header::RETRY_AFTER, &v);
        }
    }
}

/// Whether a string looks like a FHIR resource type name (so that it can safely appear in a URL
/// path, and so that nonsense types are rejected the way real servers do).
pub fn is_resource_type_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_alphanumeric())
        && name.len() <= 64
}

/// Value of a named part (`valueX` key) inside a Parameters `part` list, with the key that held
/// it, so callers can reject the wrong value type.
pub fn part_value<'a>(parts: &'a [Value], name: &str) -> Option<(&'a str, &'a Value)> {
    parts
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
        .and_then(value_of_parameter)
}

/// The `(valueX key, value)` of a Parameters parameter or part.
pub fn value_of_parameter(param: &Value) -> Option<(&str, &Value)> {
    param
        .as_object()?
        .iter()
        .find(|(k, _)| k.starts_with("value"))
        .map(|(k, v)| (k.as_str(), v))
}

/// The `parameter` array of a Parameters resource, or an explanation of why it is not one.
pub fn parameters_of(body: &Value) -> Result<&[Value], String> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err("The request body must be a FHIR Parameters resource.".to_string());
    }
    Ok(body
        .get("parameter")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_ignore_parameters_and_case() {
        let mut h = HeaderMap::new();
        h.insert(
            "accept",
            HeaderValue::from_static("text/html, Application/FHIR+JSON; q=0.9"),
        );
        assert!(header_lists_media_type(&h, "accept", FHIR_JSON));
        assert!(!header_lists_media_type(&h, "accept", "application/json"));
    }

    #[test]
    fn instants_round_trip() {
        let t = parse_instant("2024-01-01T10:00:00+02:00");
        assert_eq!(
            t.map(format_instant).as_deref(),
            Some("2024-01-01T08:00:00.000Z")
        );
        assert!(parse_instant("2024-01-01").is_none());
    }

    #[test]
    fn resource_type_names() {
        assert!(is_resource_type_name("Patient"));
        assert!(!is_resource_type_name("../x"));
        assert!(!is_resource_type_name("patient"));
    }
}
