//! The HTTP client every effect uses, and the translation of HTTP outcomes into the core's
//! [`Failure`] facts.
//!
//! - rustls; a connect timeout and a read-idle timeout (a stalled download fails and is
//!   retried by the machine instead of hanging — the original hung forever);
//! - `Accept-Encoding: gzip` with transparent decoding (Bulk Data servers send ~20× fewer
//!   bytes), chunked bodies without Content-Length are fine;
//! - redirects are followed, and reqwest drops `Authorization` whenever a redirect leaves the
//!   original host or port, so a token never reaches object storage or another origin.
//!
//! Error messages are built without URLs (`reqwest::Error::without_url`): a pre-signed file
//! URL carries a signature that must not end up in logs or persisted state.

use pathling_import_core::retry::{Failure, FailureKind};
use pathling_import_core::spec::TransferSpec;
use reqwest::header::HeaderMap;
use reqwest::{Client, Response};
use std::time::Duration;

pub const USER_AGENT: &str = concat!("pathling-import/", env!("CARGO_PKG_VERSION"));

/// Error bodies are read up to this size for diagnostics.
const MAX_ERROR_BODY: usize = 64 * 1024;

pub fn build_client(transfer: &TransferSpec) -> Result<Client, reqwest::Error> {
    client_builder(transfer)
        .redirect(reqwest::redirect::Policy::limited(10))
        .build()
}

/// The settings every client of a run shares (timeouts, user agent, and whatever transport
/// trust is configured). The SMART authenticators build their own clients from it with
/// redirects turned off, so anything added here reaches them too.
pub fn client_builder(transfer: &TransferSpec) -> reqwest::ClientBuilder {
    Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(Duration::from_millis(transfer.connect_timeout_ms))
        .read_timeout(Duration::from_millis(transfer.read_timeout_ms))
        .gzip(true)
}

/// A transport-level failure (no HTTP status) as a fact.
pub fn transport_failure(context: &str, err: reqwest::Error) -> Failure {
    let kind = if err.is_timeout() {
        FailureKind::Timeout
    } else if err.is_decode() && !err.is_body() {
        FailureKind::Undecodable
    } else {
        FailureKind::Network
    };
    let err = err.without_url();
    Failure::new(kind, format!("{context}: {}", error_chain(&err)))
}

/// `err` and its sources, joined: reqwest's own message alone is often just "error sending
/// request".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

pub fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// An unexpected status as a fact: status, `Retry-After`, and what the body says (an
/// OperationOutcome's diagnostics, an OAuth error, or the start of the text), noting whether
/// an OperationOutcome issue has code `transient`.
pub async fn status_failure(context: &str, response: Response) -> Failure {
    let status = response.status();
    let retry_after = header(response.headers(), "retry-after");
    let body = read_limited(response).await;
    let (detail, transient_outcome) = describe_body(&body);
    let reason = status.canonical_reason().unwrap_or("");
    let message = if detail.is_empty() {
        format!("{context}: {} {reason}", status.as_u16())
    } else {
        format!("{context}: {} {reason}: {detail}", status.as_u16())
    };
    Failure::new(
        FailureKind::Http {
            status: status.as_u16(),
            transient_outcome,
        },
        message,
    )
    .with_retry_after(retry_after)
}

async fn read_limited(mut response: Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_ERROR_BODY.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    body
}

/// Summarises an error body; the flag is true when an OperationOutcome issue is `transient`.
pub fn describe_body(body: &[u8]) -> (String, bool) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        let text = String::from_utf8_lossy(body);
        let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        return (text.chars().take(300).collect(), false);
    };
    if let Some(issues) = v.get("issue").and_then(|i| i.as_array()) {
        let transient = issues
            .iter()
            .any(|i| i.get("code").and_then(|c| c.as_str()) == Some("transient"));
        let texts: Vec<String> = issues
            .iter()
            .filter_map(|i| {
                i.get("diagnostics")
                    .and_then(|d| d.as_str())
                    .or_else(|| i.pointer("/details/text").and_then(|d| d.as_str()))
                    .or_else(|| i.get("code").and_then(|d| d.as_str()))
            })
            .map(|s| s.chars().take(300).collect())
            .take(3)
            .collect();
        return (texts.join("; "), transient);
    }
    if let Some(error) = v.get("error").and_then(|e| e.as_str()) {
        let desc = v
            .get("error_description")
            .and_then(|d| d.as_str())
            .map(|d| format!(" ({})", d.chars().take(200).collect::<String>()))
            .unwrap_or_default();
        return (format!("{error}{desc}"), false);
    }
    (v.to_string().chars().take(300).collect(), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_bodies_are_described_and_transient_detected() {
        let (text, transient) = describe_body(
            br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"transient","diagnostics":"try later"}]}"#,
        );
        assert_eq!(text, "try later");
        assert!(transient);
        let (text, transient) =
            describe_body(br#"{"error":"invalid_client","error_description":"bad"}"#);
        assert_eq!(text, "invalid_client (bad)");
        assert!(!transient);
        let (text, _) = describe_body(b"<html>\n  Bad   gateway </html>");
        assert_eq!(text, "<html> Bad gateway </html>");
    }
}
