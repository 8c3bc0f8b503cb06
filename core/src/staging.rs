//! Where staged files go, and what they are called.
//!
//! Keys are derived from the run id and the file's position in the manifest, never from a
//! URL, and the resource type only contributes a sanitised, length-limited suffix. So keys are
//! unique per run and file (no hashes to collide), deterministic (a retried step writes the
//! same object), and safe against hostile manifests (`../x`, `/`, empty, very long types).

use crate::bulk::FileKind;
use crate::spec::PathlingApi;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "store", rename_all = "snake_case")]
pub enum StagingLocation {
    /// `s3://bucket/prefix/`; `prefix` is empty or ends with exactly one `/`.
    S3 { bucket: String, prefix: String },
    /// `file:///absolute/dir/`; `root` is absolute and ends with exactly one `/`.
    Directory { root: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StagingUrlError {
    #[error("must start with s3:// or file:// (got scheme {0:?})")]
    Scheme(String),
    #[error("s3 URL has no bucket")]
    NoBucket,
    #[error("bucket name {0:?} is not a valid S3 bucket name")]
    BadBucket(String),
    #[error("file URL must name an absolute directory, like file:///var/lib/pathling-import/")]
    NotAbsolute,
    #[error("path segment {0:?} is not allowed")]
    BadSegment(String),
    #[error("query strings and fragments are not allowed")]
    QueryOrFragment,
}

impl StagingLocation {
    /// Parses `STAGING_URL`. Empty and doubled slashes are dropped so that keys never start
    /// with `/` or contain `//`, whatever the prefix looks like.
    pub fn parse(url: &str) -> Result<Self, StagingUrlError> {
        let url = url.trim();
        if url.contains('?') || url.contains('#') {
            return Err(StagingUrlError::QueryOrFragment);
        }
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| StagingUrlError::Scheme(String::new()))?;
        match scheme.to_ascii_lowercase().as_str() {
            "s3" | "s3a" => {
                let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(StagingUrlError::NoBucket);
                }
                let ok = (3..=63).contains(&bucket.len())
                    && bucket.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                    });
                if !ok {
                    return Err(StagingUrlError::BadBucket(bucket.to_string()));
                }
                Ok(StagingLocation::S3 {
                    bucket: bucket.to_string(),
                    prefix: normalise_path(path, "")?,
                })
            }
            "file" => {
                if !rest.starts_with('/') {
                    return Err(StagingUrlError::NotAbsolute);
                }
                // Refuse dot segments before the url crate would silently resolve them.
                normalise_path(rest, "/")?;
                if rest.to_ascii_lowercase().contains("%2e") {
                    return Err(StagingUrlError::BadSegment(rest.to_string()));
                }
                // The url crate percent-encodes what must be (a space in a directory name),
                // so `root` is always in URL form, ready to prefix import URLs.
                let parsed = url::Url::parse(&format!("file://{rest}"))
                    .map_err(|_| StagingUrlError::NotAbsolute)?;
                if parsed.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(StagingUrlError::NotAbsolute);
                }
                Ok(StagingLocation::Directory {
                    root: normalise_path(parsed.path(), "/")?,
                })
            }
            other => Err(StagingUrlError::Scheme(other.to_string())),
        }
    }

    /// The URL Pathling reads a staged object from. Pathling 7.x rewrites `s3://` to `s3a://`
    /// itself; 9.x is given `s3a://` directly.
    pub fn import_url(&self, key: &StagingKey, api: PathlingApi) -> String {
        match self {
            StagingLocation::S3 { bucket, .. } => {
                let scheme = match api {
                    PathlingApi::V7 => "s3",
                    PathlingApi::V9 => "s3a",
                };
                format!("{scheme}://{bucket}/{}", key.0)
            }
            StagingLocation::Directory { root } => format!("file://{root}{}", key.0),
        }
    }

    /// The key prefix every object of this run lives under.
    pub fn run_prefix(&self, run_id: &str) -> String {
        match self {
            StagingLocation::S3 { prefix, .. } => format!("{prefix}{run_id}/"),
            StagingLocation::Directory { .. } => format!("{run_id}/"),
        }
    }

    pub fn manifest_key(&self, run_id: &str) -> StagingKey {
        StagingKey(format!("{}manifest.json", self.run_prefix(run_id)))
    }

    /// `{prefix}{run}/{kind}/{index:06}-{Type}.ndjson`; the index makes it unique.
    pub fn file_key(
        &self,
        run_id: &str,
        index: u32,
        kind: FileKind,
        type_name: &str,
    ) -> StagingKey {
        StagingKey(format!(
            "{}{}/{index:06}-{}.ndjson",
            self.run_prefix(run_id),
            kind.as_str(),
            sanitise_type(type_name)
        ))
    }
}

impl std::fmt::Display for StagingLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StagingLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StagingLocation::Directory { root } => write!(f, "file://{root}"),
        }
    }
}

fn normalise_path(path: &str, lead: &str) -> Result<String, StagingUrlError> {
    let mut out = String::from(lead);
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        if seg == "." || seg == ".." || seg.chars().any(|c| c.is_control()) {
            return Err(StagingUrlError::BadSegment(seg.to_string()));
        }
        out.push_str(seg);
        out.push('/');
    }
    Ok(out)
}

/// Keeps ASCII letters and digits only, at most 64 of them; `x` when nothing is left.
fn sanitise_type(type_name: &str) -> String {
    let s: String = type_name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(64)
        .collect();
    if s.is_empty() {
        "x".to_string()
    } else {
        s
    }
}

/// An object key relative to the staging store's root (bucket or directory). Always relative,
/// never containing `..`, `//` or characters outside `[A-Za-z0-9._/-]` besides those of the
/// configured prefix.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StagingKey(pub String);

impl StagingKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for StagingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_prefixes_are_normalised() {
        for (url, prefix) in [
            ("s3://bucket", ""),
            ("s3://bucket/", ""),
            ("s3://bucket//a//b/", "a/b/"),
            ("s3://bucket/a", "a/"),
        ] {
            assert_eq!(
                StagingLocation::parse(url),
                Ok(StagingLocation::S3 {
                    bucket: "bucket".into(),
                    prefix: prefix.into()
                }),
                "{url}"
            );
        }
    }

    #[test]
    fn bad_staging_urls_are_rejected() {
        assert!(matches!(
            StagingLocation::parse("http://x/"),
            Err(StagingUrlError::Scheme(_))
        ));
        assert_eq!(
            StagingLocation::parse("s3:///x"),
            Err(StagingUrlError::NoBucket)
        );
        assert!(StagingLocation::parse("s3://Bad_Bucket/").is_err());
        assert_eq!(
            StagingLocation::parse("file://relative/x"),
            Err(StagingUrlError::NotAbsolute)
        );
        assert!(StagingLocation::parse("file:///a/../etc").is_err());
        assert!(StagingLocation::parse("file:///a/%2E%2E/etc").is_err());
        assert_eq!(
            StagingLocation::parse("file:///tmp/with space/"),
            Ok(StagingLocation::Directory {
                root: "/tmp/with%20space/".into()
            })
        );
        assert!(StagingLocation::parse("bucket/prefix").is_err());
    }

    #[test]
    fn keys_are_safe_for_hostile_types() {
        let loc = StagingLocation::parse("s3://bucket/p/").unwrap();
        let long = "A".repeat(10_000);
        for t in ["../x", "/", "", long.as_str(), "Pa tient\n"] {
            let key = loc.file_key("run-1", 7, FileKind::Output, t);
            let k = key.as_str();
            assert!(k.starts_with("p/run-1/output/000007-"), "{k}");
            assert!(!k.contains(".."), "{k}");
            assert!(!k.contains("//"), "{k}");
            assert!(k.len() < 120, "{k}");
            assert!(k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b)));
        }
        assert_ne!(
            loc.file_key("r", 1, FileKind::Output, "Patient"),
            loc.file_key("r", 2, FileKind::Output, "Patient")
        );
    }

    #[test]
    fn import_urls_follow_the_api_generation() {
        let loc = StagingLocation::parse("s3://bucket").unwrap();
        let key = loc.file_key("r", 0, FileKind::Output, "Patient");
        assert_eq!(
            loc.import_url(&key, PathlingApi::V7),
            "s3://bucket/r/output/000000-Patient.ndjson"
        );
        assert_eq!(
            loc.import_url(&key, PathlingApi::V9),
            "s3a://bucket/r/output/000000-Patient.ndjson"
        );
        let dir = StagingLocation::parse("file:///tmp/stage").unwrap();
        assert_eq!(
            dir.import_url(
                &dir.file_key("r", 0, FileKind::Output, "Patient"),
                PathlingApi::V9
            ),
            "file:///tmp/stage/r/output/000000-Patient.ndjson"
        );
    }
}
