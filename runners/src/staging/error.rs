//! Errors of the staging layer, classified for the caller's retry and reporting decisions.

use std::error::Error as StdError;
use std::fmt;

/// Which side of a transfer failed: the body being streamed in (the download from the Bulk Data
/// source) or the staging store itself. A caller uses this to tell "the source file broke"
/// (retry the download, maybe from another URL) from "staging is broken" (check the bucket,
/// credentials or disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureSide {
    /// The body stream handed to [`put_stream`](super::StagingStore::put_stream) yielded an error.
    Body,
    /// The store (S3 or the directory) failed or refused the operation, or the request was
    /// invalid for the store (bad key, object too large, bad configuration).
    Store,
}

impl fmt::Display for FailureSide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureSide::Body => "source body",
            FailureSide::Store => "staging store",
        })
    }
}

/// A failure of the staging layer.
///
/// Callers should prefer the accessors ([`side`](Self::side), [`is_transient`](Self::is_transient),
/// [`status`](Self::status), [`code`](Self::code)) over matching variants: they see through
/// [`CleanupFailed`](Self::CleanupFailed).
///
/// Messages never carry credentials: store messages are built from the service's error code and
/// message (plus connection-level causes) and scrubbed of signature/credential query parameters;
/// the body's own error is kept only as [`source`](StdError::source), never formatted into this
/// error's `Display`, because a download error may name a pre-signed URL.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// The body stream yielded an error after `bytes_read` bytes. Nothing was stored under the key.
    /// Whether it is worth retrying depends on the source: inspect the source error (downcast it
    /// to the stream's error type).
    #[error("source body stream failed after {bytes_read} bytes; nothing was stored")]
    Body {
        bytes_read: u64,
        #[source]
        source: Box<dyn StdError + Send + Sync + 'static>,
    },

    /// The store failed or refused an operation.
    #[error("staging {operation} of {key:?} failed{}: {message}", StatusSuffix(*status, code.as_deref()))]
    Store {
        /// The store operation, e.g. `"UploadPart"`, `"PutObject"`, `"rename"`.
        operation: &'static str,
        key: String,
        /// HTTP status of the store's response, when there was one.
        status: Option<u16>,
        /// The store's error code (`"AccessDenied"`, `"NoSuchBucket"`, an `io::ErrorKind` name...).
        code: Option<String>,
        /// Throttling, 5xx, timeouts and network failures: the same request may succeed later.
        transient: bool,
        message: String,
    },

    /// `open_read` of a key that does not exist (`get_bytes` returns `Ok(None)` instead).
    #[error("staging object {key:?} does not exist")]
    NotFound { key: String, status: Option<u16> },

    /// The key is not a safe relative object key (see the module documentation).
    #[error("invalid staging key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },

    /// The streamed body does not fit in S3's part limit with the configured part size and
    /// memory budget (parts grow with the part number, up to half the budget).
    #[error(
        "staging object {key:?} exceeds {max_parts} parts, {largest} bytes with a part size of \
         {part_size} bytes (S3's multipart limit); configure a larger part size or transfer memory"
    )]
    TooManyParts {
        key: String,
        max_parts: u32,
        part_size: usize,
        /// The largest object these settings can upload.
        largest: u64,
    },

    /// `get_bytes` of an object larger than the caller reads into memory. Whoever can write
    /// the staging prefix must not be able to exhaust a runner's memory.
    #[error("staging object {key:?} is larger than the {limit} bytes read into memory")]
    TooLarge { key: String, limit: u64 },

    /// The store was configured with invalid settings.
    #[error("invalid staging configuration: {0}")]
    Config(String),

    /// A resumable put stopped at a part boundary because it was asked to wind down (its
    /// invocation is about to end); its checkpoint holds `stored` bytes, and a later attempt
    /// continues from there.
    #[error("staging {key:?} stopped at a part boundary after {stored} bytes, to continue later")]
    Paused { key: String, stored: u64 },

    /// `error` happened, and cleaning up after it (aborting the multipart upload, removing the
    /// temporary file) failed too, so something unfinished may be left behind (for S3, an
    /// incomplete multipart upload: a bucket lifecycle rule `AbortIncompleteMultipartUpload`
    /// removes those).
    #[error("{error}; cleaning up also failed: {cleanup}")]
    CleanupFailed {
        #[source]
        error: Box<StagingError>,
        cleanup: String,
    },
}

struct StatusSuffix<'a>(Option<u16>, Option<&'a str>);

impl fmt::Display for StatusSuffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(s), Some(c)) => write!(f, " (HTTP {s}, {c})"),
            (Some(s), None) => write!(f, " (HTTP {s})"),
            (None, Some(c)) => write!(f, " ({c})"),
            (None, None) => Ok(()),
        }
    }
}

impl StagingError {
    /// The innermost error, looking through [`CleanupFailed`](Self::CleanupFailed).
    fn primary(&self) -> &StagingError {
        match self {
            StagingError::CleanupFailed { error, .. } => error.primary(),
            other => other,
        }
    }

    /// Whether the body stream (the download) or the store failed.
    pub fn side(&self) -> FailureSide {
        match self.primary() {
            StagingError::Body { .. } => FailureSide::Body,
            _ => FailureSide::Store,
        }
    }

    /// Whether retrying the same store operation later may succeed (throttling, 5xx, timeouts,
    /// network failures). Always `false` for body failures: the staging layer cannot judge the
    /// source; see [`body_error`](Self::body_error).
    pub fn is_transient(&self) -> bool {
        match self.primary() {
            StagingError::Store { transient, .. } => *transient,
            _ => false,
        }
    }

    /// HTTP status of the store's response, when there was one.
    pub fn status(&self) -> Option<u16> {
        match self.primary() {
            StagingError::Store { status, .. } | StagingError::NotFound { status, .. } => *status,
            _ => None,
        }
    }

    /// The store's error code, when known (e.g. `"AccessDenied"`, `"NoSuchBucket"`, `"SlowDown"`).
    pub fn code(&self) -> Option<&str> {
        match self.primary() {
            StagingError::Store { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// True when a resumable put stopped at a part boundary to continue later.
    pub fn is_paused(&self) -> bool {
        matches!(self.primary(), StagingError::Paused { .. })
    }

    /// True when the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self.primary(), StagingError::NotFound { .. })
    }

    /// The body stream's own error, for the caller to downcast and classify.
    pub fn body_error(&self) -> Option<&(dyn StdError + Send + Sync + 'static)> {
        match self.primary() {
            StagingError::Body { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }

    pub(crate) fn body<E>(bytes_read: u64, source: E) -> Self
    where
        E: StdError + Send + Sync + 'static,
    {
        StagingError::Body {
            bytes_read,
            source: Box::new(source),
        }
    }

    pub(crate) fn with_cleanup_failure(self, cleanup: impl Into<String>) -> Self {
        StagingError::CleanupFailed {
            error: Box::new(self),
            cleanup: scrub(&cleanup.into()),
        }
    }

    /// A local filesystem failure of the directory store.
    pub(crate) fn io(operation: &'static str, key: &str, err: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        // Only interruptions and timeouts are worth retrying as-is; a full disk, a permission
        // problem or a missing directory needs someone to act.
        let transient = matches!(
            err.kind(),
            K::Interrupted | K::TimedOut | K::WouldBlock | K::ResourceBusy
        );
        StagingError::Store {
            operation,
            key: key.to_owned(),
            status: None,
            code: Some(format!("{:?}", err.kind())),
            transient,
            message: err.to_string(),
        }
    }
}

/// Defence in depth for messages built from lower layers: cut the values of query parameters that
/// carry signatures or credentials (e.g. when a connector error quotes a pre-signed URL).
pub(crate) fn scrub(message: &str) -> String {
    const SECRET_PARAMS: [&str; 6] = [
        "x-amz-signature=",
        "x-amz-credential=",
        "x-amz-security-token=",
        "signature=",
        "credential=",
        "awsaccesskeyid=",
    ];
    let lower = message.to_ascii_lowercase();
    let bytes = message.as_bytes();
    let mut out = String::with_capacity(message.len());
    let mut i = 0;
    'outer: while i < bytes.len() {
        for p in SECRET_PARAMS {
            if lower[i..].starts_with(p) {
                out.push_str(&message[i..i + p.len()]);
                out.push_str("REDACTED");
                i += p.len();
                while i < bytes.len()
                    && !matches!(
                        bytes[i],
                        b'&' | b' ' | b'"' | b'\'' | b',' | b')' | b'>' | b'<'
                    )
                {
                    i += 1;
                }
                continue 'outer;
            }
        }
        // Advance by one whole character so slicing stays on UTF-8 boundaries.
        let ch_len = message[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&message[i..i + ch_len]);
        i += ch_len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_cuts_signature_values() {
        let m = "GET https://b.s3/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc123 failed é";
        let s = scrub(m);
        assert!(!s.contains("AKIA"), "{s}");
        assert!(!s.contains("abc123"), "{s}");
        assert!(s.ends_with(" failed é"), "{s}");
    }

    #[test]
    fn accessors_see_through_cleanup_failure() {
        let e = StagingError::Store {
            operation: "UploadPart",
            key: "k".into(),
            status: Some(503),
            code: Some("SlowDown".into()),
            transient: true,
            message: "slow down".into(),
        }
        .with_cleanup_failure("abort failed");
        assert!(e.is_transient());
        assert_eq!(e.status(), Some(503));
        assert_eq!(e.code(), Some("SlowDown"));
        assert_eq!(e.side(), FailureSide::Store);
    }
}
