//! The translation of HTTP outcomes into the core's [`Failure`] facts, and capped reads of
//! answers. (The clients themselves are built in [`crate::net`].)
//!
//! - Transport errors are classified by walking their source chain: an unresolvable host,
//!   a refused connection, a TLS failure and an address the policy forbids each become their
//!   own fact, so the core can fail fast with the cause instead of retrying for hours.
//! - Error messages are built without URLs (`reqwest::Error::without_url`): a pre-signed file
//!   URL carries a signature that must not end up in logs or persisted state.
//! - Every body read into memory is capped ([`read_capped`]): a broken or hostile server
//!   cannot exhaust a Lambda's memory.

use bytes::Bytes;
use pathling_import_core::retry::{Failure, FailureKind};
use reqwest::header::HeaderMap;
use reqwest::Response;

pub const USER_AGENT: &str = concat!("pathling-import/", env!("CARGO_PKG_VERSION"));

/// Error bodies are read up to this size for diagnostics.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// JSON answers other than manifests (Pathling's job results, `/metadata`, batch answers).
pub const MAX_JSON_ANSWER: u64 = 1024 * 1024;

/// A transport-level failure (no HTTP status) as a fact, its kind read from the cause.
pub fn transport_failure(context: &str, err: reqwest::Error) -> Failure {
    let kind = transport_kind(&err);
    let err = err.without_url();
    Failure::new(kind, format!("{context}: {}", crate::error_chain(&err)))
}

/// The kind of a transport error: a timeout, the specific cause in its source chain, a body
/// that could not be decoded, else a network failure. (The authenticator's requests use it
/// too: a TLS failure of a token request is as permanent as any other.)
pub(crate) fn transport_kind(err: &reqwest::Error) -> FailureKind {
    if err.is_timeout() {
        FailureKind::Timeout
    } else if let Some(kind) = cause_kind(err) {
        kind
    } else if err.is_decode() && !err.is_body() {
        FailureKind::Undecodable
    } else {
        FailureKind::Network
    }
}

/// The specific cause in an error's source chain: the address policy's refusal, DNS, a
/// refused connection, TLS.
pub(crate) fn cause_kind(err: &(dyn std::error::Error + 'static)) -> Option<FailureKind> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if e.is::<crate::net::AddressRefused>() {
            return Some(FailureKind::Local);
        }
        if e.is::<crate::net::DnsFailure>() {
            return Some(FailureKind::Dns);
        }
        if e.is::<rustls::Error>() {
            return Some(FailureKind::Tls);
        }
        next = match e.downcast_ref::<std::io::Error>() {
            Some(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Some(FailureKind::Refused)
            }
            // An io::Error's `source()` skips the error it wraps (it answers that error's
            // source): walk into the wrapped error itself. tokio-rustls wraps a handshake's
            // rustls::Error in an io::Error, which hyper-rustls wraps in another.
            Some(io) => match io.get_ref() {
                Some(inner) => Some(inner),
                None => e.source(),
            },
            None => e.source(),
        };
    }
    None
}

/// Reads a whole answer, refusing one larger than `limit` bytes (`setting` names what sets
/// the limit, for the message).
pub async fn read_capped(
    mut response: Response,
    limit: u64,
    context: &str,
    setting: &str,
) -> Result<Bytes, Failure> {
    let too_large = |size: String| {
        Failure::new(
            FailureKind::Undecodable,
            format!(
                "{context}: the answer is {size}, more than the {} MiB pathling-import reads \
                 ({setting})",
                limit / (1024 * 1024)
            ),
        )
    };
    if let Some(length) = response.content_length().filter(|l| *l > limit) {
        return Err(too_large(format!("{length} bytes")));
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    // An announced length is reserved once; otherwise the buffer grows as chunks come.
    let announced = response.content_length().map_or(0, |l| l as usize);
    let mut body = Vec::with_capacity(announced);
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport_failure(context, e))?
    {
        if !append_capped(&mut body, &chunk, limit) {
            return Err(too_large("larger".into()));
        }
    }
    Ok(Bytes::from(body))
}

/// Appends `chunk` unless that would make `body` longer than `limit` (then `false`). The
/// buffer grows by doubling, as a `Vec` would, but never reserves more than `limit`: a plain
/// `extend_from_slice` could reserve up to twice the limit on the last growth.
fn append_capped(body: &mut Vec<u8>, chunk: &[u8], limit: usize) -> bool {
    let needed = body.len().saturating_add(chunk.len());
    if needed > limit {
        return false;
    }
    if needed > body.capacity() {
        let grown = body.capacity().saturating_mul(2).clamp(needed, limit);
        body.reserve_exact(grown - body.len());
    }
    body.extend_from_slice(chunk);
    true
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
    let described = describe_body(&body);
    let detail = described.text;
    let reason = status.canonical_reason().unwrap_or("");
    let message = if detail.is_empty() {
        format!("{context}: {} {reason}", status.as_u16())
    } else {
        format!("{context}: {} {reason}: {detail}", status.as_u16())
    };
    Failure::new(
        FailureKind::Http {
            status: status.as_u16(),
            transient_outcome: described.transient,
            outcome: described.outcome,
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

/// What an error body says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BodyText {
    /// An OperationOutcome's diagnostics, an OAuth error, or the start of the text.
    pub text: String,
    /// The body is a FHIR OperationOutcome (the server's considered answer).
    pub outcome: bool,
    /// One of its issues has code `transient`.
    pub transient: bool,
}

/// Summarises an error body.
pub fn describe_body(body: &[u8]) -> BodyText {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        let text = String::from_utf8_lossy(body);
        let text: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        return BodyText {
            text: text.chars().take(300).collect(),
            ..BodyText::default()
        };
    };
    let outcome = v.get("resourceType").and_then(|t| t.as_str()) == Some("OperationOutcome");
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
        return BodyText {
            text: texts.join("; "),
            outcome,
            transient,
        };
    }
    if let Some(error) = v.get("error").and_then(|e| e.as_str()) {
        let desc = v
            .get("error_description")
            .and_then(|d| d.as_str())
            .map(|d| format!(" ({})", d.chars().take(200).collect::<String>()))
            .unwrap_or_default();
        return BodyText {
            text: format!("{error}{desc}"),
            ..BodyText::default()
        };
    }
    BodyText {
        text: v.to_string().chars().take(300).collect(),
        outcome,
        transient: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_reads_never_reserve_more_than_the_limit() {
        // Chunk sizes that do not divide the limit: doubling from 4093 bytes would reserve
        // 4093 * 256 = 1,047,808 bytes for the last chunks.
        let limit = 1_000_003;
        let chunk = vec![b'x'; 4093];
        let mut body = Vec::new();
        let mut appended = 0;
        while append_capped(&mut body, &chunk, limit) {
            appended += 1;
            assert!(body.capacity() <= limit, "{} reserved", body.capacity());
        }
        assert_eq!(appended, limit / chunk.len());
        assert_eq!(body.len(), appended * chunk.len());
        // What is left fits exactly; one byte more does not.
        let rest = vec![b'y'; limit - body.len()];
        assert!(append_capped(&mut body, &rest, limit));
        assert_eq!((body.len(), body.capacity()), (limit, limit));
        assert!(!append_capped(&mut body, b"z", limit));
        assert_eq!(body.len(), limit);
    }

    #[test]
    fn tls_failures_are_found_inside_wrapped_io_errors() {
        let rustls_error =
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        // As tokio-rustls reports a failed handshake, and as hyper-rustls passes that on.
        let handshake = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls_error);
        assert_eq!(cause_kind(&handshake), Some(FailureKind::Tls));
        let wrapped = std::io::Error::other(handshake);
        assert_eq!(cause_kind(&wrapped), Some(FailureKind::Tls));
        let refused =
            std::io::Error::other(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(cause_kind(&refused), Some(FailureKind::Refused));
        assert_eq!(cause_kind(&std::io::Error::other("reset")), None);
    }

    #[test]
    fn outcome_bodies_are_described_and_transient_detected() {
        let d = describe_body(
            br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"transient","diagnostics":"try later"}]}"#,
        );
        assert_eq!(d.text, "try later");
        assert!(d.transient && d.outcome);
        let d = describe_body(
            br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"processing","diagnostics":"Unsupported _type"}]}"#,
        );
        assert!(d.outcome && !d.transient);
        let d = describe_body(br#"{"error":"invalid_client","error_description":"bad"}"#);
        assert_eq!(d.text, "invalid_client (bad)");
        assert!(!d.transient && !d.outcome);
        let d = describe_body(b"<html>\n  Bad   gateway </html>");
        assert_eq!(d.text, "<html> Bad gateway </html>");
        assert!(!d.outcome);
    }
}
