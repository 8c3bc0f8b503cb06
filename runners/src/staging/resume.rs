//! Checkpoints of resumable transfers: what a later attempt (another invocation, a restarted
//! CLI, another Lambda) needs to continue a file's upload where an interrupted one stopped.
//!
//! A checkpoint describes the first `stored` bytes of the file, which are durably in the store
//! (S3: the parts of a multipart upload; directory: the fsynced start of a partial file). It
//! also names the start of the line those bytes cut (`line_start`) and the counts before it, so
//! that the download can continue at a line boundary: the content check and the counters
//! restart there without any state from the middle of a line. The bytes between `line_start`
//! and `stored` are read again but only checked, and compared with the `tail` kept of them, so
//! a source that serves other bytes on the second read is caught instead of spliced.
//!
//! Stored beside the file, in a `.resume/` folder of the file's own folder:
//! `.resume/{name}.json` holds the latest checkpoint; for S3 the ETags of parts
//! `1..=segments * SEGMENT` are in immutable `.resume/{name}.{k}.json` segments (each written
//! once), so a checkpoint write stays small however many parts the upload has.

use serde::{Deserialize, Serialize};

use super::{BodyStats, StagingError};

/// ETags per immutable segment of a checkpoint.
pub(crate) const SEGMENT: usize = 256;

/// Bytes of the tail kept to recognise the bytes before `stored` on a second read.
pub(crate) const TAIL: usize = 64;

/// Checkpoints larger than this are not read (a checkpoint is at most a few KiB).
pub(crate) const MAX_CHECKPOINT: u64 = 1024 * 1024;

/// What the download said about the file, kept to recognise it when continuing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFacts {
    /// A hash of the file's URL up to its query (a re-signed URL names the same file).
    pub identity: u64,
    /// The strong `ETag` (a weak one, as servers make when they compress, is left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// The `Last-Modified` date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    /// The file's full length, when the source said it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
}

impl SourceFacts {
    /// Whether `other` (said by a later answer) may be the same file: whatever both know agrees.
    pub fn agrees_with(&self, other: &SourceFacts) -> bool {
        fn same<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
            a.is_none() || b.is_none() || a == b
        }
        // Validators of the same kind only: the first answer may have been compressed (its
        // ETag weak, so left out) and a continued one not.
        self.identity == other.identity
            && same(&self.etag, &other.etag)
            && same(&self.last_modified, &other.last_modified)
            && same(&self.length, &other.length)
    }

    /// What to send as `If-Range`: the strong ETag, else the date.
    pub fn if_range(&self) -> Option<&str> {
        self.etag.as_deref().or(self.last_modified.as_deref())
    }
}

/// Where an interrupted transfer continues: the body handed to
/// [`put_resumable`](super::StagingStore::put_resumable) must start at [`offset`](Self::offset).
#[derive(Debug, Clone)]
pub struct ResumeFrom {
    pub(crate) checkpoint: Checkpoint,
    /// The ETags of every stored part, in order (S3).
    pub(crate) etags: Vec<String>,
}

impl ResumeFrom {
    /// The byte the body must start from: the start of the line the stored bytes cut.
    pub fn offset(&self) -> u64 {
        self.checkpoint.line_start
    }

    /// Bytes already stored: the body's bytes before this are only checked, not stored again.
    pub fn stored(&self) -> u64 {
        self.checkpoint.stored
    }

    /// Lines (blank ones included) before [`offset`](Self::offset).
    pub fn newlines(&self) -> u64 {
        self.checkpoint.newlines
    }

    /// Non-blank lines (resources) before [`offset`](Self::offset).
    pub fn lines(&self) -> u64 {
        self.checkpoint.lines
    }

    pub fn facts(&self) -> &SourceFacts {
        &self.checkpoint.facts
    }
}

/// The stored form of a checkpoint (`.resume/{name}.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Checkpoint {
    pub v: u32,
    pub facts: SourceFacts,
    /// The S3 multipart upload holding the stored bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    /// How the store cut the parts (S3: part size, growth, largest part, ETags per segment;
    /// directory: bytes per checkpoint); a store configured otherwise does not continue the
    /// upload, as its parts would fall elsewhere.
    pub layout: [u64; 4],
    pub stored: u64,
    pub line_start: u64,
    pub newlines: u64,
    pub lines: u64,
    /// The last bytes before `stored` (at most [`TAIL`]), hex.
    pub tail: String,
    /// Full segments of ETags stored apart.
    #[serde(default)]
    pub segments: u32,
    /// The ETags of the parts after the segments.
    #[serde(default)]
    pub etags: Vec<String>,
}

pub(crate) const VERSION: u32 = 1;

/// Where the checkpoint of `key` is stored, and its segments.
pub(crate) fn checkpoint_key(key: &str) -> String {
    let (dir, name) = split(key);
    format!("{dir}.resume/{name}.json")
}

pub(crate) fn segment_key(key: &str, k: u32) -> String {
    let (dir, name) = split(key);
    format!("{dir}.resume/{name}.{k}.json")
}

/// The directory store's partial file of `key`.
pub(crate) fn partial_key(key: &str) -> String {
    let (dir, name) = split(key);
    format!("{dir}.resume/{name}")
}

/// `("a/b/", "c")` for `a/b/c`.
pub(crate) fn split(key: &str) -> (&str, &str) {
    match key.rfind('/') {
        Some(at) => (&key[..=at], &key[at + 1..]),
        None => ("", key),
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn decode(key: &str, bytes: &[u8]) -> Result<Checkpoint, StagingError> {
    let checkpoint: Checkpoint =
        serde_json::from_slice(bytes).map_err(|e| StagingError::Store {
            operation: "read checkpoint",
            key: key.to_owned(),
            status: None,
            code: None,
            transient: false,
            message: format!("unreadable checkpoint: {e}"),
        })?;
    Ok(checkpoint)
}

/// The checkpoint stored at `ckey`, when it is one of the file `identity` names, written by a
/// store cutting parts as `layout` says, and consistent; `None` for any other.
pub(crate) fn usable(
    ckey: &str,
    bytes: &[u8],
    identity: u64,
    layout: [u64; 4],
) -> Option<Checkpoint> {
    decode(ckey, bytes).ok().filter(|c| {
        c.v == VERSION
            && c.facts.identity == identity
            && c.layout == layout
            && c.line_start <= c.stored
    })
}

/// The stored bytes a continued put reads again, from the line's start up to the stored end:
/// they are only counted and checked against the checkpoint's tail, never stored again.
#[derive(Debug)]
pub(crate) struct ReadAgain {
    until: u64,
    tail: String,
}

impl ReadAgain {
    /// What a continued put starts from: the stats at the line's start, and the bytes to read
    /// again.
    pub(crate) fn start(checkpoint: &Checkpoint) -> (BodyStats, Option<ReadAgain>) {
        let stats = BodyStats::at(LinePoint {
            line_start: checkpoint.line_start,
            newlines: checkpoint.newlines,
            lines: checkpoint.lines,
        });
        let again = ReadAgain {
            until: checkpoint.stored,
            tail: checkpoint.tail.clone(),
        };
        (stats, Some(again))
    }

    /// Counts what of `data` lies before the stored end and returns the rest, to be stored;
    /// `done` once the stored end is reached (its tail matched). Other bytes than those stored
    /// fail with [`mismatch`].
    pub(crate) fn take<'a>(
        &self,
        key: &str,
        stats: &mut BodyStats,
        data: &'a [u8],
    ) -> Result<(&'a [u8], bool), StagingError> {
        let take = usize::try_from(self.until.saturating_sub(stats.bytes()))
            .unwrap_or(usize::MAX)
            .min(data.len());
        stats.observe(&data[..take]);
        if stats.bytes() < self.until {
            return Ok((&data[take..], false));
        }
        if !self.tail.ends_with(&hex(stats.tail())) {
            return Err(mismatch(
                key,
                format!(
                    "the bytes before {} differ from those stored before",
                    self.until
                ),
            ));
        }
        Ok((&data[take..], true))
    }

    /// The body ended before the stored end.
    pub(crate) fn ended_early(&self, key: &str) -> StagingError {
        mismatch(
            key,
            format!("the source's file ended before byte {}", self.until),
        )
    }
}

/// The error of a continued put whose source served other bytes than before: transient, as
/// the next attempt starts the file over.
pub(crate) fn mismatch(key: &str, what: String) -> StagingError {
    StagingError::Store {
        operation: "resume",
        key: key.to_owned(),
        status: None,
        code: Some("ResumeMismatch".into()),
        transient: true,
        message: format!("{what}; the file starts over"),
    }
}

/// What a stream of stored bytes tells about where its lines are: kept by
/// [`BodyStats`](super::BodyStats) so that a checkpoint can be cut at any byte.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LinePoint {
    /// Offset just after the last newline (0 before the first).
    pub line_start: u64,
    /// Newlines before `line_start`.
    pub newlines: u64,
    /// Non-blank lines before `line_start`.
    pub lines: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sit_in_a_resume_folder_beside_the_file() {
        assert_eq!(
            checkpoint_key("p/run/output/000001-Patient.ndjson"),
            "p/run/output/.resume/000001-Patient.ndjson.json"
        );
        assert_eq!(segment_key("a", 3), ".resume/a.3.json");
        assert_eq!(partial_key("x/y"), "x/.resume/y");
        for key in [
            checkpoint_key("a/b"),
            segment_key("a/b", 0),
            partial_key("a/b"),
        ] {
            assert!(super::super::validate_key(&key).is_ok(), "{key}");
        }
    }

    #[test]
    fn facts_agree_on_what_both_know() {
        let a = SourceFacts {
            identity: 1,
            etag: Some("\"v1\"".into()),
            last_modified: Some("Mon, 30 Nov 2026 10:00:00 GMT".into()),
            length: Some(10),
        };
        let unknown = SourceFacts {
            identity: 1,
            ..SourceFacts::default()
        };
        assert!(a.agrees_with(&unknown) && unknown.agrees_with(&a));
        let changed = SourceFacts {
            etag: Some("\"v2\"".into()),
            ..a.clone()
        };
        assert!(!a.agrees_with(&changed));
        // A first answer compressed (no strong ETag) agrees with a plain one of the same date.
        let compressed = SourceFacts {
            etag: None,
            ..a.clone()
        };
        assert!(compressed.agrees_with(&a) && a.agrees_with(&compressed));
        let later = SourceFacts {
            last_modified: Some("Mon, 30 Nov 2026 11:00:00 GMT".into()),
            ..compressed.clone()
        };
        assert!(!compressed.agrees_with(&later));
        assert_eq!(compressed.if_range(), Some("Mon, 30 Nov 2026 10:00:00 GMT"));
        assert_eq!(a.if_range(), Some("\"v1\""));
        let longer = SourceFacts {
            length: Some(11),
            ..a.clone()
        };
        assert!(!a.agrees_with(&longer));
        let other = SourceFacts {
            identity: 2,
            ..unknown.clone()
        };
        assert!(!unknown.agrees_with(&other));
    }
}
