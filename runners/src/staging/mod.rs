//! Staging stores: where downloaded Bulk Data files are put before Pathling imports them.
//!
//! A [`StagingStore`] is either an S3 bucket ([`S3Store`]) or a local directory ([`DirStore`]).
//! Both take an already computed, relative object key (e.g.
//! `prefix/run-1/output/000001-Patient.ndjson`); this layer never builds keys from external
//! input, and it still refuses unsafe ones as defence in depth (see [Keys](#keys)).
//!
//! # Contract of [`StagingStore::put_stream`]
//!
//! - The body is streamed: chunks of any size are accepted, nothing is staged on local disk for
//!   S3, and the object appears under its key only once the whole body has been stored (S3:
//!   `PutObject` or `CompleteMultipartUpload`; directory: atomic rename of a fsynced temp file).
//! - The stored object ends with `\n`: when the body's last byte is not a newline one is
//!   appended ([`PutReport::newline_added`]), so two NDJSON files can never merge two lines. An
//!   empty body stays empty (0 bytes, 0 lines).
//! - [`PutReport::lines`] counts non-blank lines (lines with a non-whitespace byte), i.e. NDJSON
//!   resources; [`PutReport::bytes`] is the stored size, newline included.
//! - On any failure (the body stream yields an error, or the store fails) nothing is left under
//!   the key and (except for a resumable put, see [Resuming](#resuming)) no unfinished S3
//!   multipart upload is left behind: it is aborted before the error
//!   is returned. If the abort itself fails the error is
//!   [`StagingError::CleanupFailed`]. If the `put_stream` future is dropped midway (e.g. a
//!   caller's timeout), a best-effort abort is spawned on the current Tokio runtime (a frozen or
//!   ended Lambda may not finish it: keep an `AbortIncompleteMultipartUpload` lifecycle rule on
//!   the bucket) and the directory store removes its temp file.
//! - Errors tell which side failed ([`StagingError::side`]: the body, i.e. the download, or the
//!   store), whether a retry may help ([`StagingError::is_transient`]) and the HTTP status when
//!   known.
//!
//! # Memory bound
//!
//! Each store has one [`MemoryBudget`] (`TRANSFER_MEMORY`, shared by its clones) from which
//! every large buffer of a `put_stream` is drawn: S3 part buffers (the part being filled and the
//! part in flight) and the directory store's 256 KiB write buffer. What they take together never
//! exceeds the budget, however many `put_stream` calls run at once: a call waits for budget
//! rather than exceed it. An S3 upload holds one or two parts: the part being uploaded (at most
//! one part upload is in flight) and the part being filled from the body; a second part is taken
//! only when the budget can spare it, so with a tight budget some uploads fill and send one part
//! at a time (see [`budget`](self::budget) for why this cannot deadlock). Part buffers have
//! their full capacity from the start, so filling never reallocates or copies, and they are
//! handed to the SDK without copying; freed ones are pooled for the next part instead of going
//! back to the allocator (glibc would keep them resident, fragmented over its arenas).
//! Beyond the budget, a call holds the body chunk being copied, and the download's NDJSON check
//! may buffer one line that spans chunks (bounded by its own line limit).
//! A body smaller than one part is sent with a single `PutObject`. `get_bytes` loads the whole
//! object (use it for small objects such as manifests); `open_read` streams.
//!
//! # S3 specifics
//!
//! Parts start at `part_size` bytes (minimum 5 MiB) and double every [`GROW_EVERY`] parts up to
//! half the memory budget (at most 5 GiB), the last part being whatever remains, because a
//! download's length is often unknown when its upload starts. An object needing more than
//! 10,000 parts fails with [`StagingError::TooManyParts`] (about 139.6 GiB with the defaults)
//! instead of producing a broken upload. Request checksums are only
//! calculated when an operation requires them: checksum trailers make uploads to moto slow
//! quadratically and S3 still verifies the `Content-Length` and (over TLS) the transport.
//!
//! # Resuming
//!
//! [`StagingStore::put_resumable`] is `put_stream` that an interrupted attempt (a killed
//! process, a Lambda invocation cut at its end, a broken download) leaves continuable. After
//! every part it stored (S3: a part uploaded; directory: every `checkpoint_every` bytes, the
//! part size in the runners, fsynced to a partial file `.resume/{name}`), it writes a
//! checkpoint beside the file, `.resume/{name}.json`: the source's facts (URL identity, strong
//! `ETag` or `Last-Modified`, length), the S3 upload and its parts' ETags (full segments of 256
//! in immutable `.resume/{name}.{k}.json`, so every checkpoint write stays small), the bytes
//! stored, where the line they cut starts, the line counts there and the last 64 bytes.
//!
//! [`StagingStore::resume_point`] reads it back for a later attempt, which asks the source for
//! the rest from that line's start (or skips to it in a whole body) and hands the store a body
//! from there: the bytes up to the stored end are only checked against the kept tail (other
//! bytes there fail with the transient `ResumeMismatch` and the checkpoint is dropped, so the
//! next attempt starts over rather than splice two versions of a file), the rest is stored. An
//! attempt cut short keeps its upload (or partial file) once a checkpoint names it, and so
//! does one whose download broke or whose store failure may pass; any other failure aborts it
//! and drops the checkpoint, as a completed write does. A checkpoint of another file, or of a
//! store configured with other part sizes, is forgotten rather than continued.
//!
//! An interrupted attempt thus costs what it had read beyond its last checkpoint: at most two
//! parts (the one uploading and the one filling) and one line. A caller about to be stopped
//! sets the put's `wind_down` flag instead: the put then stops at its next part boundary, the
//! part stored and checkpointed, with [`StagingError::Paused`], and nothing but the cut line
//! is read again.
//!
//! # Keys
//!
//! A key is a `/`-separated relative path: non-empty, no leading or trailing `/`, no empty, `.`
//! or `..` segments, no NUL or backslash, at most 1024 bytes. Both stores apply the same rules
//! so that a run behaves identically on either.

pub mod budget;
mod dir;
mod error;
mod resume;
mod s3;
pub mod split;

pub use budget::{BudgetStats, MemoryBudget, DEFAULT_TRANSFER_MEMORY};
pub use dir::{DirStore, CHECKPOINT_EVERY, WRITE_BUFFER};
pub use error::{FailureSide, StagingError};
pub use resume::{ResumeFrom, SourceFacts};
pub(crate) use s3::CONCURRENT_REQUESTS;
pub use s3::{
    S3Options, S3Store, DEFAULT_PART_SIZE, GROW_EVERY, MAX_PARTS, MAX_PART_SIZE, MIN_PART_SIZE,
};

use bytes::Bytes;
use futures::stream::{BoxStream, Stream};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

/// What [`StagingStore::put_stream`] stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PutReport {
    /// Size of the stored object, including an appended newline.
    pub bytes: u64,
    /// Non-blank lines (NDJSON resources).
    pub lines: u64,
    /// Whether a `\n` was appended because the body did not end with one.
    pub newline_added: bool,
    /// Bytes an earlier, interrupted attempt had stored, which this one continued from (0: it
    /// stored the whole file).
    pub resumed_at: u64,
}

/// A streaming read of a stored object.
pub type ReadStream = BoxStream<'static, Result<Bytes, StagingError>>;

/// The most [`StagingStore::get_bytes`] reads of a run's state or a watermark stored beside
/// the staged data (an envelope of 50,000 files is about 0.3 MB): whoever can write the
/// staging prefix must not be able to exhaust a runner's memory.
pub const MAX_STATE_OBJECT: u64 = 16 * 1024 * 1024;

/// The most read of a run's event log copy (`{prefix}{run id}/log.ndjson`), which is read
/// and written whole to append.
pub const MAX_EVENT_LOG: u64 = 64 * 1024 * 1024;

/// Where downloaded files are staged.
#[derive(Debug, Clone)]
pub enum StagingStore {
    S3(S3Store),
    Dir(DirStore),
}

impl StagingStore {
    /// Stream `body` into `key`; see the [module documentation](self) for the contract and the
    /// memory bound.
    pub async fn put_stream<S, E>(&self, key: &str, body: S) -> Result<PutReport, StagingError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::error::Error + Send + Sync + 'static,
    {
        match self {
            StagingStore::S3(s) => s.put_stream(key, body).await,
            StagingStore::Dir(d) => d.put_stream(key, body).await,
        }
    }

    /// The checkpoint of an interrupted [`put_resumable`](Self::put_resumable) of `key`, when
    /// one exists for the file `identity` names (see [`SourceFacts::identity`]) and this store,
    /// as configured now, can continue it. An unusable checkpoint is forgotten (its upload
    /// aborted).
    pub async fn resume_point(
        &self,
        key: &str,
        identity: u64,
    ) -> Result<Option<ResumeFrom>, StagingError> {
        match self {
            StagingStore::S3(s) => s.resume_point(key, identity).await,
            StagingStore::Dir(d) => d.resume_point(key, identity).await,
        }
    }

    /// The names of the files under `folder` (a key prefix ending with `/`) that have a
    /// checkpoint, and maybe a few other names: one listing, so that a caller asks for
    /// [`resume_point`](Self::resume_point)s only where one may be.
    pub async fn checkpointed(
        &self,
        folder: &str,
    ) -> Result<std::collections::HashSet<String>, StagingError> {
        let prefix = format!("{folder}.resume/");
        let keys = match self {
            StagingStore::S3(s) => s.list(&prefix).await?,
            StagingStore::Dir(d) => d.list(&prefix).await?,
        };
        Ok(keys
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix)?.strip_suffix(".json"))
            .map(str::to_owned)
            .collect())
    }

    /// Forgets what an interrupted [`put_resumable`](Self::put_resumable) of `key` left: S3
    /// aborts its upload, the directory removes its partial file, and the checkpoint goes.
    pub async fn forget_resume(&self, key: &str) -> Result<(), StagingError> {
        match self {
            StagingStore::S3(s) => s.forget(key, None).await,
            StagingStore::Dir(d) => d.forget(key).await,
        }
    }

    /// [`put_stream`](Self::put_stream), resumable: the store records checkpoints as it goes
    /// (see [Resuming](self#resuming)), and `from` continues an interrupted attempt, `body`
    /// then starting at [`ResumeFrom::offset`]. `progress` is set to the bytes each
    /// checkpoint holds, so a caller can tell an interrupted attempt that got somewhere. Once
    /// `wind_down` is set, the put stops at its next part boundary (S3) or chunk (directory)
    /// with [`StagingError::Paused`], its checkpoint written.
    pub async fn put_resumable<S, E>(
        &self,
        key: &str,
        body: S,
        facts: SourceFacts,
        from: Option<ResumeFrom>,
        progress: Arc<AtomicU64>,
        wind_down: Arc<AtomicBool>,
    ) -> Result<PutReport, StagingError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::error::Error + Send + Sync + 'static,
    {
        match self {
            StagingStore::S3(s) => {
                s.put_resumable(key, body, facts, from, progress, wind_down)
                    .await
            }
            StagingStore::Dir(d) => {
                d.put_resumable(key, body, facts, from, progress, wind_down)
                    .await
            }
        }
    }

    /// The budget the store's `put_stream` buffers are drawn from.
    pub fn budget(&self) -> &MemoryBudget {
        match self {
            StagingStore::S3(s) => s.budget(),
            StagingStore::Dir(d) => d.budget(),
        }
    }

    /// Store a small object (e.g. a manifest) as-is: no newline is appended.
    pub async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<(), StagingError> {
        match self {
            StagingStore::S3(s) => s.put_bytes(key, bytes).await,
            StagingStore::Dir(d) => d.put_bytes(key, bytes).await,
        }
    }

    /// Read a whole object. `Ok(None)` only when the store says the key does not exist; every
    /// other failure (including S3's 403 for a missing key when the caller lacks
    /// `s3:ListBucket`) is an error, never "absent".
    pub async fn get_bytes(&self, key: &str, limit: u64) -> Result<Option<Bytes>, StagingError> {
        match self {
            StagingStore::S3(s) => s.get_bytes(key, limit).await,
            StagingStore::Dir(d) => d.get_bytes(key, limit).await,
        }
    }

    /// Remove an object (the preflight's marker); an absent key is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StagingError> {
        match self {
            StagingStore::S3(s) => s.delete(key).await,
            StagingStore::Dir(d) => d.delete(key).await,
        }
    }

    /// Stream an object. A missing key is [`StagingError::NotFound`].
    pub async fn open_read(&self, key: &str) -> Result<ReadStream, StagingError> {
        match self {
            StagingStore::S3(s) => s.open_read(key).await,
            StagingStore::Dir(d) => d.open_read(key).await,
        }
    }

    /// Removes what interrupted writes (a crash, a SIGKILL) left under `prefix` (a key prefix
    /// ending with `/`, e.g. a run's, or empty for the whole store) and returns how many
    /// leftovers were removed. Staged objects are never touched.
    ///
    /// - Directory: the temp files `put_stream`/`put_bytes` write before renaming them into
    ///   place ([`DirStore::remove_leftovers`]), except those of this process's writes still in
    ///   flight. Another process writing under the same prefix would lose its temp files: call
    ///   it while the run is held exclusively, when it starts or resumes.
    /// - S3: nothing to do, always `Ok(0)`. An interrupted multipart upload leaves no object,
    ///   only parts that are invisible and billed: the bucket's lifecycle rule
    ///   `AbortIncompleteMultipartUpload` removes them (the README asks for one on the staging
    ///   bucket).
    ///   Listing and aborting them here could abort another writer's upload in flight.
    pub async fn remove_leftovers(&self, prefix: &str) -> Result<u32, StagingError> {
        match self {
            StagingStore::S3(_) => Ok(0),
            StagingStore::Dir(d) => d.remove_leftovers(prefix).await,
        }
    }
}

/// Where the store writes, as a user would name it (`s3://bucket`, `file:///dir`): for
/// messages.
impl std::fmt::Display for StagingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StagingStore::S3(s) => write!(f, "s3://{}", s.bucket()),
            StagingStore::Dir(d) => write!(f, "file://{}", d.root().display()),
        }
    }
}

impl From<S3Store> for StagingStore {
    fn from(s: S3Store) -> Self {
        StagingStore::S3(s)
    }
}

impl From<DirStore> for StagingStore {
    fn from(d: DirStore) -> Self {
        StagingStore::Dir(d)
    }
}

/// Maximum key length: S3's limit, also kept for directories so both stores accept the same keys.
const MAX_KEY_LEN: usize = 1024;

/// Check that `key` is a safe relative object key (see [Keys](self#keys)).
pub(crate) fn validate_key(key: &str) -> Result<(), StagingError> {
    let reject = |reason: &'static str| {
        Err(StagingError::InvalidKey {
            key: key.to_owned(),
            reason,
        })
    };
    if key.is_empty() {
        return reject("empty key");
    }
    if key.len() > MAX_KEY_LEN {
        return reject("longer than 1024 bytes");
    }
    if key.starts_with('/') {
        return reject("absolute key (starts with '/')");
    }
    if key.contains('\0') {
        return reject("contains NUL");
    }
    if key.contains('\\') {
        return reject("contains a backslash");
    }
    for segment in key.split('/') {
        match segment {
            "" => return reject("empty path segment ('//' or trailing '/')"),
            "." | ".." => return reject("'.' or '..' path segment"),
            _ => {}
        }
    }
    Ok(())
}

/// Tracks what `put_stream` needs to know about the body as it passes: size, non-blank lines,
/// whether it ends with a newline, and (for checkpoints) where its last line starts and its
/// last few bytes.
#[derive(Debug, Clone, Default)]
pub(crate) struct BodyStats {
    bytes: u64,
    lines: u64,
    /// The current (unterminated) line has a non-whitespace byte.
    line_has_content: bool,
    last_byte: Option<u8>,
    /// Newlines so far, and the offset after the last one.
    newlines: u64,
    line_start: u64,
    /// The last bytes (at most [`resume::TAIL`]).
    tail: Vec<u8>,
}

impl BodyStats {
    /// The stats of a body whose first `point.line_start` bytes were stored before, as a
    /// checkpoint recorded them.
    pub(crate) fn at(point: resume::LinePoint) -> Self {
        BodyStats {
            bytes: point.line_start,
            lines: point.lines,
            line_has_content: false,
            last_byte: (point.line_start > 0).then_some(b'\n'),
            newlines: point.newlines,
            line_start: point.line_start,
            tail: Vec::new(),
        }
    }

    pub(crate) fn observe(&mut self, chunk: &[u8]) {
        if let Some(&last) = chunk.last() {
            self.last_byte = Some(last);
        }
        let start = self.bytes;
        self.bytes += chunk.len() as u64;
        if chunk.len() >= resume::TAIL {
            self.tail.clear();
            self.tail
                .extend_from_slice(&chunk[chunk.len() - resume::TAIL..]);
        } else {
            self.tail.extend_from_slice(chunk);
            let excess = self.tail.len().saturating_sub(resume::TAIL);
            self.tail.drain(..excess);
        }
        // Per line: one SIMD search for its end, and a content check that stops at the first
        // non-blank byte (a resource's opening brace).
        let mut rest = chunk;
        loop {
            let end = memchr::memchr(b'\n', rest);
            let segment = &rest[..end.unwrap_or(rest.len())];
            if !self.line_has_content && segment.iter().any(|b| !b.is_ascii_whitespace()) {
                self.line_has_content = true;
            }
            let Some(end) = end else { break };
            self.lines += u64::from(self.line_has_content);
            self.line_has_content = false;
            self.newlines += 1;
            rest = &rest[end + 1..];
            self.line_start = start + (chunk.len() - rest.len()) as u64;
        }
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Where the current line starts, and the counts before it.
    pub(crate) fn line_point(&self) -> resume::LinePoint {
        resume::LinePoint {
            line_start: self.line_start,
            newlines: self.newlines,
            lines: self.lines,
        }
    }

    /// The last bytes seen (at most [`resume::TAIL`]).
    pub(crate) fn tail(&self) -> &[u8] {
        &self.tail
    }

    /// A non-empty body must end with a newline.
    pub(crate) fn needs_newline(&self) -> bool {
        matches!(self.last_byte, Some(b) if b != b'\n')
    }

    pub(crate) fn report(&self, newline_added: bool) -> PutReport {
        PutReport {
            bytes: self.bytes,
            lines: self.lines,
            newline_added,
            resumed_at: 0,
        }
    }
}

/// The newline appended to a body that lacks one.
pub(crate) const NEWLINE: &[u8] = b"\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for ok in [
            "a",
            "prefix/run-1/output/000001-Patient.ndjson",
            "a/.b/c..d",
        ] {
            assert!(validate_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/a", "a/../b", "..", "../a", "a/..", "a//b", "a/", "./a", "a\\b", "a\0b",
        ] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
        assert!(validate_key(&"a".repeat(1025)).is_err());
    }

    #[test]
    fn stats_count_lines_across_chunks() {
        let mut s = BodyStats::default();
        for chunk in [&b"{\"a\""[..], b":1}\n\n  \n{\"b", b"\":2}"] {
            s.observe(chunk);
        }
        assert!(s.needs_newline());
        s.observe(NEWLINE);
        assert_eq!(s.report(true).lines, 2);
        assert_eq!(s.bytes(), 20);
        assert!(!s.needs_newline());
        assert!(!BodyStats::default().needs_newline());
    }

    proptest::proptest! {
        /// However a body is cut into chunks, the count is its non-blank lines.
        #[test]
        fn stats_count_non_blank_lines(
            body in proptest::collection::vec(
                proptest::sample::select(vec![b'\n', b' ', b'\t', b'\r', b'{', b'a']),
                0..300,
            ),
            cuts in proptest::collection::vec(0usize..300, 0..8),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
            cuts.sort_unstable();
            let mut s = BodyStats::default();
            let mut from = 0;
            for cut in cuts.into_iter().chain([body.len()]) {
                s.observe(&body[from..cut]);
                from = cut;
            }
            // The text after the last newline is a line only once it ends.
            let terminated = body.iter().filter(|b| **b == b'\n').count();
            let expected = body
                .split(|b| *b == b'\n')
                .take(terminated)
                .filter(|line| line.iter().any(|b| !b.is_ascii_whitespace()))
                .count() as u64;
            proptest::prop_assert_eq!(s.report(false).lines, expected);
            proptest::prop_assert_eq!(s.bytes(), body.len() as u64);
            // Where a checkpoint would continue: after the last newline, with the counts
            // before it, and the last bytes to recognise the rest by.
            let line_start = body.iter().rposition(|b| *b == b'\n').map_or(0, |at| at + 1);
            let point = s.line_point();
            proptest::prop_assert_eq!(point.line_start, line_start as u64);
            proptest::prop_assert_eq!(point.newlines, terminated as u64);
            proptest::prop_assert_eq!(point.lines, expected);
            let tail = &body[body.len().saturating_sub(resume::TAIL)..];
            proptest::prop_assert_eq!(s.tail(), tail);
            // Stats restored at the line's start go on as if they had seen it all.
            let mut resumed = BodyStats::at(point);
            resumed.observe(&body[line_start..]);
            proptest::prop_assert_eq!(resumed.line_point(), point);
            proptest::prop_assert_eq!(resumed.report(false), s.report(false));
            proptest::prop_assert_eq!(resumed.needs_newline(), s.needs_newline());
        }
    }
}
