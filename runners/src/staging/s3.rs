//! The S3 staging store: streaming multipart uploads with at most one part in flight, their
//! part buffers drawn from the store's [`MemoryBudget`].

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_s3::config::RequestChecksumCalculation;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use aws_types::service_config::ServiceConfigKey;
use bytes::Bytes;
use futures::stream::{Stream, StreamExt};
use tokio::task::JoinHandle;

use super::budget::{MemoryBudget, PartBuf, DEFAULT_TRANSFER_MEMORY};
use super::error::scrub;
use super::resume::{self, ReadAgain, ResumeFrom, SourceFacts};
use super::split::{self, RangeDone, SplitPlan};
use super::{validate_key, BodyStats, FailureSide, PutReport, ReadStream, StagingError, NEWLINE};

/// S3's minimum size of every part but the last.
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// S3's maximum part size.
pub const MAX_PART_SIZE: usize = 5 * 1024 * 1024 * 1024;
/// The part size of an [`S3Options::default`] (the configuration derives its own from the
/// memory budget): small enough that moto stays fast.
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;
/// Small requests (range records) sent at once.
pub(crate) const CONCURRENT_REQUESTS: usize = 32;
/// S3's maximum number of parts of one multipart upload.
pub const MAX_PARTS: u32 = 10_000;
/// Parts double in size every this many parts of an upload (up to [`S3Store::max_part_size`]),
/// so that 10,000 parts reach far beyond 10,000 × the part size while every object up to
/// 1,000 parts (4.9 GiB at 5 MiB) keeps the configured size. The length of a download is often
/// unknown in advance (chunked answers), so the size cannot be chosen from it.
pub const GROW_EVERY: u32 = 1_000;

/// Settings of an [`S3Store`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S3Options {
    /// Size of every multipart part but the last, in bytes (5 MiB to 5 GiB).
    pub part_size: usize,
    /// Bytes for the part buffers of all uploads together (`TRANSFER_MEMORY`); at least two
    /// parts. An upload holds one or two parts of it.
    pub memory: usize,
    /// Path-style addressing (`http://host/bucket/key`). `None` = use it exactly when an
    /// endpoint override is configured (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`, the profile's
    /// `endpoint_url`, or the `SdkConfig`'s), since custom endpoints such as `127.0.0.1` cannot
    /// serve virtual-hosted buckets.
    pub force_path_style: Option<bool>,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            part_size: DEFAULT_PART_SIZE,
            memory: DEFAULT_TRANSFER_MEMORY,
            force_path_style: None,
        }
    }
}

/// An S3 bucket used as staging store.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    part_size: usize,
    max_parts: u32,
    /// Parts double every this many parts ([`GROW_EVERY`]).
    grow_every: u32,
    /// The largest part: half the budget (a growing upload still leaves room for another
    /// transfer), no less than the part size, at most S3's 5 GiB.
    max_part: usize,
    budget: MemoryBudget,
    /// ETags per checkpoint segment ([`resume::SEGMENT`]).
    segment: usize,
}

impl fmt::Debug for S3Store {
    // The client's Debug would print its whole configuration; the bucket is what identifies us.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("part_size", &self.part_size)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// Build a store from the environment: the standard credential chain, region and endpoint
    /// settings (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`, profiles) as loaded by
    /// `aws_config::defaults(BehaviorVersion::latest())`.
    pub async fn from_env(
        bucket: impl Into<String>,
        options: S3Options,
    ) -> Result<Self, StagingError> {
        let sdk = aws_config::defaults(BehaviorVersion::latest()).load().await;
        Self::from_sdk_config(bucket, &sdk, options)
    }

    /// Build a store from an already loaded [`SdkConfig`] (shared with other clients, or with an
    /// explicit endpoint and credentials in tests).
    pub fn from_sdk_config(
        bucket: impl Into<String>,
        sdk: &SdkConfig,
        options: S3Options,
    ) -> Result<Self, StagingError> {
        let bucket = bucket.into();
        if bucket.is_empty() || bucket.contains('/') {
            return Err(StagingError::Config(format!(
                "invalid S3 bucket name {bucket:?}"
            )));
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&options.part_size) {
            return Err(StagingError::Config(format!(
                "part size {} is outside S3's limits ({MIN_PART_SIZE}..={MAX_PART_SIZE} bytes)",
                options.part_size
            )));
        }
        // Two parts let an upload fill one while the other is in flight; with one it could
        // still progress, but the configuration promises the overlap.
        if options.memory < options.part_size.saturating_mul(2) {
            return Err(StagingError::Config(format!(
                "the transfer memory budget of {} bytes cannot hold two parts of {} bytes",
                options.memory, options.part_size
            )));
        }
        let budget = MemoryBudget::new(options.memory, options.part_size)?;
        let path_style = options
            .force_path_style
            .unwrap_or_else(|| has_endpoint_override(sdk));
        let config = aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .build();
        Ok(S3Store {
            client: Client::from_conf(config),
            bucket,
            part_size: options.part_size,
            max_parts: MAX_PARTS,
            grow_every: GROW_EVERY,
            max_part: (options.memory / 2).clamp(options.part_size, MAX_PART_SIZE),
            budget,
            segment: resume::SEGMENT,
        })
    }

    /// The size of part `number` (from 1) of an upload, every part but the last.
    fn part_size_of(&self, number: i32) -> usize {
        let doublings = u32::try_from(number.max(1) - 1).unwrap_or(0) / self.grow_every.max(1);
        // 2^20 parts sizes exceed S3's 5 GiB from any 5 MiB start: the cap applies anyway.
        let factor = 1usize << doublings.min(20);
        self.part_size
            .saturating_mul(factor)
            .clamp(self.part_size, self.max_part)
    }

    /// The largest part of any upload of this store.
    pub fn max_part_size(&self) -> usize {
        self.max_part
    }

    /// The largest object this store can upload: its part limit's worth of growing parts.
    pub fn largest_object(&self) -> u64 {
        (1..=self.max_parts as i32)
            .map(|n| self.part_size_of(n) as u64)
            .sum()
    }

    /// Parts double every `every` parts, so tests can see them grow without uploading gigabytes.
    /// Not for production.
    #[doc(hidden)]
    pub fn with_part_growth_for_tests(mut self, every: u32) -> Self {
        self.grow_every = every.max(1);
        self
    }

    /// Checkpoints keep `etags` ETags per segment, so tests see segments without uploading
    /// 256 parts. Not for production.
    #[doc(hidden)]
    pub fn with_checkpoint_segment_for_tests(mut self, etags: usize) -> Self {
        self.segment = etags.max(1);
        self
    }

    /// Lower the part limit so tests can reach it without uploading 50 GB. Not for production.
    #[doc(hidden)]
    pub fn with_max_parts_for_tests(mut self, max_parts: u32) -> Self {
        self.max_parts = max_parts.clamp(1, MAX_PARTS);
        self
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn part_size(&self) -> usize {
        self.part_size
    }

    /// The budget every part buffer of this store (and its clones) is drawn from.
    pub fn budget(&self) -> &MemoryBudget {
        &self.budget
    }

    /// The underlying client, e.g. for tests that list multipart uploads.
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub async fn put_stream<S, E>(&self, key: &str, body: S) -> Result<PutReport, StagingError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::error::Error + Send + Sync + 'static,
    {
        self.put(key, body, None).await
    }

    /// How this store cuts parts, recorded in checkpoints.
    fn layout(&self) -> [u64; 4] {
        [
            self.part_size as u64,
            u64::from(self.grow_every),
            self.max_part as u64,
            self.segment as u64,
        ]
    }

    /// The checkpoint of an interrupted resumable upload of `key`, when one exists for the
    /// file `identity` names and this store can continue it; an unusable one is forgotten.
    pub async fn resume_point(
        &self,
        key: &str,
        identity: u64,
    ) -> Result<Option<ResumeFrom>, StagingError> {
        validate_key(key)?;
        let ckey = resume::checkpoint_key(key);
        let Some(bytes) = self.get_bytes(&ckey, resume::MAX_CHECKPOINT).await? else {
            return Ok(None);
        };
        let usable = resume::usable(&ckey, &bytes, identity, self.layout())
            .filter(|c| c.upload_id.is_some());
        let Some(checkpoint) = usable else {
            self.forget(key, None).await?;
            return Ok(None);
        };
        let mut etags = Vec::new();
        for k in 0..checkpoint.segments {
            let skey = resume::segment_key(key, k);
            let segment: Option<Vec<String>> = self
                .get_bytes(&skey, resume::MAX_CHECKPOINT)
                .await?
                .and_then(|b| serde_json::from_slice(&b).ok());
            match segment {
                Some(s) if s.len() == self.segment => etags.extend(s),
                _ => {
                    self.forget(key, Some(&checkpoint)).await?;
                    return Ok(None);
                }
            }
        }
        etags.extend(checkpoint.etags.iter().cloned());
        let parts = i32::try_from(etags.len()).unwrap_or(i32::MAX);
        let stored: u64 = (1..=parts).map(|n| self.part_size_of(n) as u64).sum();
        if stored != checkpoint.stored || parts == 0 {
            self.forget(key, Some(&checkpoint)).await?;
            return Ok(None);
        }
        Ok(Some(ResumeFrom { checkpoint, etags }))
    }

    /// The keys under `prefix`.
    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<String>, StagingError> {
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|e| sdk_error("ListObjectsV2", prefix, e))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => return Ok(keys),
            }
        }
    }

    /// Aborts the upload a checkpoint of `key` names and removes the checkpoint.
    pub(crate) async fn forget(
        &self,
        key: &str,
        known: Option<&resume::Checkpoint>,
    ) -> Result<(), StagingError> {
        validate_key(key)?;
        let ckey = resume::checkpoint_key(key);
        let read;
        let checkpoint = match known {
            Some(c) => Some(c),
            None => {
                read = match self.get_bytes(&ckey, resume::MAX_CHECKPOINT).await? {
                    Some(b) => resume::decode(&ckey, &b).ok(),
                    None => None,
                };
                read.as_ref()
            }
        };
        if let Some(c) = checkpoint {
            if let Some(id) = &c.upload_id {
                let _ = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(id)
                    .send()
                    .await;
            }
            for k in 0..c.segments {
                self.delete(&resume::segment_key(key, k)).await?;
            }
        }
        self.delete(&ckey).await
    }

    /// Streams `body` into `key` like [`put_stream`](Self::put_stream), recording a checkpoint
    /// after every part so that an interrupted upload can continue ([`resume_point`]
    /// (Self::resume_point)); `from` continues one, and `body` then starts at its
    /// [`offset`](ResumeFrom::offset). `progress` is set to the bytes each checkpoint holds.
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
        let resumable = Resumable {
            facts,
            from,
            progress,
            wind_down,
        };
        self.put(key, body, Some(resumable)).await
    }

    async fn put<S, E>(
        &self,
        key: &str,
        mut body: S,
        resumable: Option<Resumable>,
    ) -> Result<PutReport, StagingError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::error::Error + Send + Sync + 'static,
    {
        validate_key(key)?;
        let mut upload = Upload {
            store: self,
            key,
            buf: None,
            spare: None,
            multipart: None,
            stats: BodyStats::default(),
            boundary: None,
            checkpoints: None,
            verify: None,
        };
        let mut resumed_at = 0;
        if let Some(r) = resumable {
            let keep = Arc::new(AtomicBool::new(false));
            if let Some(from) = r.from {
                let c = from.checkpoint;
                let Some(upload_id) = c.upload_id.clone() else {
                    return Err(StagingError::Config(format!(
                        "the checkpoint of {key:?} names no multipart upload"
                    )));
                };
                resumed_at = c.stored;
                (upload.stats, upload.verify) = ReadAgain::start(&c);
                keep.store(true, Ordering::Relaxed);
                let parts = numbered_parts(from.etags);
                upload.multipart = Some(Multipart {
                    client: self.client.clone(),
                    bucket: self.bucket.clone(),
                    key: key.to_owned(),
                    upload_id,
                    next_part_number: parts.len() as i32 + 1,
                    parts,
                    in_flight: None,
                    armed: true,
                    keep: keep.clone(),
                });
            }
            upload.checkpoints = Some(Checkpoints {
                facts: r.facts,
                progress: r.progress,
                keep,
                wind_down: r.wind_down,
            });
        }
        loop {
            let chunk = match body.next().await {
                None => break,
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => {
                    let err = StagingError::body(upload.stats.bytes(), e);
                    return Err(upload.fail(err).await);
                }
            };
            if let Err(err) = upload.push(&chunk).await {
                return Err(upload.fail(err).await);
            }
        }
        if let Some(again) = &upload.verify {
            let err = again.ended_early(key);
            return Err(upload.fail(err).await);
        }
        let newline_added = upload.stats.needs_newline();
        if newline_added {
            if let Err(err) = upload.push(NEWLINE).await {
                return Err(upload.fail(err).await);
            }
        }
        let stats = upload.stats.clone();
        // Read once the upload is complete: the last part in flight may write the first
        // checkpoint while `finish` waits for it.
        let keep = upload.checkpoints.as_ref().map(|c| c.keep.clone());
        upload.finish().await?;
        if keep.is_some_and(|k| k.load(Ordering::Relaxed)) {
            // The object is complete: a checkpoint left behind would only name a finished
            // upload, which a later attempt finds gone and starts over from.
            let _ = self.forget_checkpoint(key).await;
        }
        let mut report = stats.report(newline_added);
        report.resumed_at = resumed_at;
        Ok(report)
    }

    /// Removes the checkpoint of `key` (not its upload).
    async fn forget_checkpoint(&self, key: &str) -> Result<(), StagingError> {
        let ckey = resume::checkpoint_key(key);
        if let Some(b) = self.get_bytes(&ckey, resume::MAX_CHECKPOINT).await? {
            if let Ok(c) = resume::decode(&ckey, &b) {
                for k in 0..c.segments {
                    self.delete(&resume::segment_key(key, k)).await?;
                }
            }
        }
        self.delete(&ckey).await
    }

    pub async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<(), StagingError> {
        validate_key(key)?;
        self.put_object(key, bytes).await
    }

    pub async fn get_bytes(&self, key: &str, limit: u64) -> Result<Option<Bytes>, StagingError> {
        validate_key(key)?;
        let mut resp = match self.get_object(key).await {
            Ok(resp) => resp,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let too_large = || StagingError::TooLarge {
            key: key.to_owned(),
            limit,
        };
        let announced = resp
            .content_length
            .and_then(|l| u64::try_from(l).ok())
            .unwrap_or(0);
        if announced > limit {
            return Err(too_large());
        }
        let mut data = Vec::with_capacity(usize::try_from(announced).unwrap_or(0));
        while let Some(chunk) = resp
            .body
            .try_next()
            .await
            .map_err(|e| body_read_error(key, &e))?
        {
            if (data.len() + chunk.len()) as u64 > limit {
                return Err(too_large());
            }
            data.extend_from_slice(&chunk);
        }
        Ok(Some(Bytes::from(data)))
    }

    /// Removes an object; an absent one is fine (S3's DeleteObject says so itself).
    pub async fn delete(&self, key: &str) -> Result<(), StagingError> {
        validate_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| sdk_error("DeleteObject", key, e))
    }

    pub async fn open_read(&self, key: &str) -> Result<ReadStream, StagingError> {
        validate_key(key)?;
        let resp = self.get_object(key).await?;
        let key = key.to_owned();
        let stream = futures::stream::unfold(Some(resp.body), move |body| {
            let key = key.clone();
            async move {
                let mut body = body?;
                match body.next().await {
                    None => None,
                    Some(Ok(chunk)) => Some((Ok(chunk), Some(body))),
                    // Stop after the first error: a broken response cannot be resumed here.
                    Some(Err(e)) => Some((Err(body_read_error(&key, &e)), None)),
                }
            }
        });
        Ok(stream.boxed())
    }

    /// GetObject, with NoSuchKey mapped to [`StagingError::NotFound`]. Only the explicit
    /// `NoSuchKey` code counts as absent: a 404 `NoSuchBucket` or a bare 403 is a real error.
    async fn get_object(
        &self,
        key: &str,
    ) -> Result<aws_sdk_s3::operation::get_object::GetObjectOutput, StagingError> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(resp) => Ok(resp),
            Err(SdkError::ServiceError(se)) if se.err().is_no_such_key() => {
                Err(StagingError::NotFound {
                    key: key.to_owned(),
                    status: Some(se.raw().status().as_u16()),
                })
            }
            Err(e) => Err(sdk_error("GetObject", key, e)),
        }
    }

    async fn put_object(&self, key: &str, bytes: Bytes) -> Result<(), StagingError> {
        let len = bytes.len() as i64;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(len)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| sdk_error("PutObject", key, e))?;
        Ok(())
    }
}

/// One `put_stream` in progress: the part being filled and, once the body outgrew one part, the
/// multipart upload.
///
/// Memory: the upload holds at most two part buffers of the store's budget, the one in flight
/// and the one being filled. It waits for budget only while it holds none (for its first part,
/// or when its part in flight could not be reclaimed); a second buffer is taken only if the
/// budget has it to spare, and given back while other uploads wait for their first. Without
/// one, the upload waits for its own part in flight and refills that buffer.
struct Upload<'a> {
    store: &'a S3Store,
    key: &'a str,
    /// The part being filled; never more than `part_size` bytes. Drawn from the budget when the
    /// first byte of a part arrives, at full capacity, so filling never reallocates.
    buf: Option<PartBuf>,
    /// A buffer back from a finished part upload, to fill next.
    spare: Option<PartBuf>,
    multipart: Option<Multipart>,
    /// What the bytes pushed so far (and, resumed, those stored before) hold.
    stats: BodyStats,
    /// The stats where the full part in `buf` ends, for its checkpoint.
    boundary: Option<Boundary>,
    /// Set for a resumable upload.
    checkpoints: Option<Checkpoints>,
    /// Resumed: the body's first bytes, stored already, are only checked.
    verify: Option<ReadAgain>,
}

/// What a resumable upload records.
struct Resumable {
    facts: SourceFacts,
    from: Option<ResumeFrom>,
    progress: Arc<AtomicU64>,
    wind_down: Arc<AtomicBool>,
}

struct Checkpoints {
    facts: SourceFacts,
    /// The bytes the last checkpoint holds.
    progress: Arc<AtomicU64>,
    /// A checkpoint names the upload: dropped, it is kept for a later attempt.
    keep: Arc<AtomicBool>,
    /// Set when the caller's time is nearly up: stop at the next part boundary.
    wind_down: Arc<AtomicBool>,
}

/// The stats at the end of a part.
#[derive(Clone)]
struct Boundary {
    stored: u64,
    point: resume::LinePoint,
    tail: String,
}

impl Upload<'_> {
    /// Append `data`, uploading full parts as needed. A full buffer is only sent once more data
    /// arrives, so the data left at the end (the last part, or the whole object for a
    /// `PutObject`) is never empty unless the whole body is.
    async fn push(&mut self, mut data: &[u8]) -> Result<(), StagingError> {
        if let Some(again) = &self.verify {
            let (rest, done) = again.take(self.key, &mut self.stats, data)?;
            data = rest;
            if done {
                self.verify = None;
            }
        }
        while !data.is_empty() {
            if self.buf.as_ref().is_some_and(PartBuf::is_full) {
                if let Some(full) = self.buf.take() {
                    let boundary = self.boundary.take();
                    self.send_part(full, boundary).await?;
                }
            }
            let buf = match &mut self.buf {
                Some(buf) => buf,
                None => {
                    let next = self.next_buffer().await?;
                    self.buf.insert(next)
                }
            };
            let taken = buf.fill(data);
            self.stats.observe(&data[..taken]);
            if buf.is_full() {
                if let Some(c) = &self.checkpoints {
                    let boundary = Boundary {
                        stored: self.stats.bytes(),
                        point: self.stats.line_point(),
                        tail: resume::hex(self.stats.tail()),
                    };
                    if c.wind_down.load(Ordering::Relaxed) {
                        return self.pause(boundary).await;
                    }
                    self.boundary = Some(boundary);
                }
            }
            data = &data[taken..];
        }
        Ok(())
    }

    /// Winding down at a part boundary: uploads the full part (its checkpoint written), and
    /// stops with [`StagingError::Paused`]; the bytes after it are read again next time.
    async fn pause(&mut self, boundary: Boundary) -> Result<(), StagingError> {
        let stored = boundary.stored;
        if let Some(full) = self.buf.take() {
            self.send_part(full, Some(boundary)).await?;
        }
        if let Some(m) = self.multipart.as_mut() {
            m.wait_in_flight().await?;
        }
        Err(StagingError::Paused {
            key: self.key.to_owned(),
            stored,
        })
    }

    /// A buffer for the next part: the spare, a second one the budget can spare, our own part
    /// in flight once it is uploaded, or (holding nothing) whatever the budget gives when it can.
    /// A buffer smaller than the part now due (parts grow) is let go instead of reused.
    async fn next_buffer(&mut self) -> Result<PartBuf, StagingError> {
        let store = self.store;
        let number = self.multipart.as_ref().map_or(1, |m| m.next_part_number);
        let part_size = store.part_size_of(number);
        let fits = |buf: &PartBuf| buf.capacity() == part_size;
        if let Some(spare) = self.spare.take().filter(fits) {
            return Ok(spare);
        }
        let budget = &store.budget;
        if let Some(multipart) = self.multipart.as_mut() {
            if multipart.in_flight.is_some() {
                if let Some(buf) = budget.try_buffer(part_size) {
                    return Ok(buf);
                }
                if let Some(buf) = multipart.wait_in_flight().await?.filter(fits) {
                    return Ok(buf);
                }
            }
        }
        // Nothing of the budget is held here, so waiting for it cannot deadlock.
        budget.buffer(part_size).await
    }

    /// Start an upload of a full, non-last part after the previous one has finished (so at most
    /// one part is in flight while the next fills).
    async fn send_part(
        &mut self,
        part: PartBuf,
        boundary: Option<Boundary>,
    ) -> Result<(), StagingError> {
        let store = self.store;
        let keep = self.checkpoints.as_ref().map(|c| c.keep.clone());
        let multipart = match &mut self.multipart {
            Some(m) => m,
            None => self
                .multipart
                .insert(Multipart::create(store, self.key, keep.unwrap_or_default()).await?),
        };
        // This part is not the last one (more data follows), so the last part will need
        // a number too: refuse before uploading anything that can never be completed.
        if multipart.next_part_number >= store.max_parts as i32 {
            return Err(StagingError::TooManyParts {
                key: self.key.to_owned(),
                max_parts: store.max_parts,
                part_size: store.part_size,
                largest: store.largest_object(),
            });
        }
        let reclaimed = multipart.wait_in_flight().await?;
        let number = multipart.next_part_number;
        multipart.next_part_number += 1;
        let client = store.client.clone();
        let bucket = store.bucket.clone();
        let key = self.key.to_owned();
        let upload_id = multipart.upload_id.clone();
        let (bytes, frozen) = part.freeze();
        // The checkpoint this part completes, written once it is uploaded.
        let checkpoint = match (&self.checkpoints, boundary) {
            (Some(c), Some(b)) => {
                // After part `number`, the segments hold every full SEGMENT of ETags; the
                // part that fills one writes it.
                let per = store.segment;
                let segments = number as usize / per;
                let first = if (number as usize).is_multiple_of(per) {
                    (segments - 1) * per
                } else {
                    segments * per
                };
                let etags: Vec<String> = multipart
                    .parts
                    .get(first..)
                    .unwrap_or_default()
                    .iter()
                    .map(|p| p.e_tag().unwrap_or_default().to_owned())
                    .collect();
                Some(PendingCheckpoint {
                    checkpoint: resume::Checkpoint {
                        v: resume::VERSION,
                        facts: c.facts.clone(),
                        upload_id: Some(upload_id.clone()),
                        layout: store.layout(),
                        stored: b.stored,
                        line_start: b.point.line_start,
                        newlines: b.point.newlines,
                        lines: b.point.lines,
                        tail: b.tail,
                        segments: (first / per) as u32,
                        etags,
                    },
                    progress: c.progress.clone(),
                    keep: c.keep.clone(),
                })
            }
            _ => None,
        };
        let store_for_task = store.clone();
        // Spawned so the part uploads while the caller keeps pulling the body into the next
        // buffer; the handle is awaited (or aborted) before the next part or completion.
        multipart.in_flight = Some(tokio::spawn(async move {
            let part = upload_part(&client, &bucket, &key, &upload_id, number, bytes).await?;
            if let Some(pending) = checkpoint {
                pending.write(&store_for_task, &key, &part).await;
            }
            Ok((part, frozen.reclaim()))
        }));
        // Kept for the next part unless another upload waits for its first: then it goes
        // back, and this upload fills one part at a time until the budget is free again.
        if !store.budget.contended() {
            self.spare = reclaimed;
        }
        Ok(())
    }

    /// Store what was buffered: a single PutObject for a body that fits in one part (including
    /// the empty body: S3 cannot complete a multipart upload with zero parts), otherwise the
    /// last part and CompleteMultipartUpload.
    async fn finish(mut self) -> Result<(), StagingError> {
        self.spare = None;
        // The request's reference keeps the buffer (and its budget) until the request is done.
        let data = match self.buf.take() {
            Some(buf) => buf.freeze().0,
            None => Bytes::new(),
        };
        let Some(multipart) = self.multipart.as_mut() else {
            return self.store.put_object(self.key, data).await;
        };
        let store = self.store;
        let key = self.key;
        let result = async {
            multipart.wait_in_flight().await?;
            // Resumed at the very end, nothing may be left for a last part.
            if !data.is_empty() || multipart.parts.is_empty() {
                let number = multipart.next_part_number;
                let part = upload_part(
                    &store.client,
                    &store.bucket,
                    key,
                    &multipart.upload_id,
                    number,
                    data,
                )
                .await?;
                multipart.parts.push(part);
            }
            store
                .complete(
                    key,
                    &multipart.upload_id,
                    std::mem::take(&mut multipart.parts),
                )
                .await
        }
        .await;
        match result {
            Ok(()) => {
                multipart.armed = false;
                Ok(())
            }
            Err(err) => Err(self.fail(err).await),
        }
    }

    /// After `err`: a resumable upload with a checkpoint is kept for a later attempt when the
    /// failure may pass (the download broke, the store was busy), once its part in flight has
    /// landed (and recorded its checkpoint); otherwise the upload is aborted and its
    /// checkpoint removed.
    async fn fail(&mut self, err: StagingError) -> StagingError {
        let gone = err.code() == Some("NoSuchUpload");
        let passing = (err.side() == FailureSide::Body || err.is_transient() || err.is_paused())
            && err.code() != Some("ResumeMismatch");
        if let (Some(c), true, false) = (&self.checkpoints, passing, gone) {
            if let Some(m) = self.multipart.as_mut() {
                // The part in flight records a checkpoint when it lands: worth the wait. Its
                // own failure changes nothing here.
                let _ = m.wait_in_flight().await;
                if c.keep.load(Ordering::Relaxed) {
                    m.armed = false;
                    return err;
                }
            }
        }
        let err = self.abort(err).await;
        if self.checkpoints.is_some() {
            if let Err(e) = self.store.forget_checkpoint(self.key).await {
                return err.with_cleanup_failure(format!("removing the checkpoint: {e}"));
            }
        }
        if gone {
            // The upload this attempt continued vanished (aborted, or completed by another
            // attempt): the next attempt starts over.
            return StagingError::Store {
                operation: "UploadPart",
                key: self.key.to_owned(),
                status: err.status(),
                code: Some("NoSuchUpload".into()),
                transient: true,
                message: "the multipart upload to continue is gone; the file starts over".into(),
            };
        }
        err
    }

    /// Abort the multipart upload (if one was started) after `err`, and return the error to
    /// report.
    async fn abort(&mut self, err: StagingError) -> StagingError {
        let Some(multipart) = self.multipart.as_mut() else {
            return err;
        };
        // Stop the in-flight part first: a part landing after the abort would recreate storage
        // that S3 then keeps until the next abort.
        if let Some(handle) = multipart.in_flight.take() {
            handle.abort();
            let _ = handle.await;
        }
        let store = self.store;
        let result = store
            .client
            .abort_multipart_upload()
            .bucket(&store.bucket)
            .key(self.key)
            .upload_id(&multipart.upload_id)
            .send()
            .await;
        multipart.armed = false;
        match result {
            Ok(_) => err,
            // Already gone (aborted by someone else, or the failure was that it vanished):
            // nothing is left behind, which is all the abort is for.
            Err(SdkError::ServiceError(se)) if se.err().code() == Some("NoSuchUpload") => err,
            Err(e) => err.with_cleanup_failure(format!(
                "AbortMultipartUpload of upload {}: {}",
                multipart.upload_id,
                sdk_error("AbortMultipartUpload", self.key, e)
            )),
        }
    }
}

/// A split transfer ([`split`](super::split)): its plan, ranges and completion.
impl S3Store {
    /// Starts moving `key` as ranges of `range_bytes` (rounded down to whole parts): the
    /// multipart upload, then the plan beside the file. `None` when the file is too short to
    /// gain from it (under two ranges) or needs more parts than an upload may have.
    pub(crate) async fn start_split(
        &self,
        key: &str,
        facts: SourceFacts,
        length: u64,
        range_bytes: u64,
    ) -> Result<Option<SplitPlan>, StagingError> {
        validate_key(key)?;
        let part = self.part_size as u64;
        let range_bytes = (range_bytes / part).max(1) * part;
        let mut plan = SplitPlan {
            v: split::VERSION,
            facts: SourceFacts {
                length: Some(length),
                ..facts
            },
            length,
            upload_id: String::new(),
            part_size: part,
            range_bytes,
        };
        if length < range_bytes.saturating_mul(2) || !plan.is_sound(self.max_parts) {
            return Ok(None);
        }
        // A plan left by an earlier attempt names an upload nobody completes now.
        self.forget_split(key).await?;
        // Aborted when dropped, until the plan that names it is written.
        let mut multipart = Multipart::create(self, key, Arc::default()).await?;
        plan.upload_id = multipart.upload_id.clone();
        let body = serde_json::to_vec(&plan).unwrap_or_default();
        self.put_object(&split::plan_key(key), Bytes::from(body))
            .await?;
        multipart.armed = false;
        Ok(Some(plan))
    }

    /// The plan of a split transfer of `key`, when there is one this store can carry out.
    pub(crate) async fn split_plan(&self, key: &str) -> Result<Option<SplitPlan>, StagingError> {
        validate_key(key)?;
        let pkey = split::plan_key(key);
        let Some(bytes) = self.get_bytes(&pkey, resume::MAX_CHECKPOINT).await? else {
            return Ok(None);
        };
        let plan = serde_json::from_slice::<SplitPlan>(&bytes)
            .ok()
            .filter(|p| p.is_sound(self.max_parts) && p.part_size == self.part_size as u64);
        if plan.is_none() {
            tracing::warn!(
                key,
                "an unusable split plan is dropped; the file starts over"
            );
            self.forget_split(key).await?;
        }
        Ok(plan)
    }

    /// What range `i` of `plan` stored, when it is done.
    pub(crate) async fn range_done(
        &self,
        key: &str,
        plan: &SplitPlan,
        i: u32,
    ) -> Result<Option<RangeDone>, StagingError> {
        let rkey = split::range_key(key, i);
        let Some(bytes) = self.get_bytes(&rkey, resume::MAX_CHECKPOINT).await? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice::<RangeDone>(&bytes)
            .ok()
            .filter(|d| d.v == split::VERSION && d.upload_id == plan.upload_id))
    }

    /// Records that range `i` is stored.
    pub(crate) async fn record_range(
        &self,
        key: &str,
        i: u32,
        done: &RangeDone,
    ) -> Result<(), StagingError> {
        let body = serde_json::to_vec(done).unwrap_or_default();
        self.put_object(&split::range_key(key, i), Bytes::from(body))
            .await
    }

    /// Writes range `i`'s bytes as its parts of the plan's upload.
    pub(crate) fn range_writer<'a>(
        &'a self,
        key: &'a str,
        plan: &SplitPlan,
        i: u32,
    ) -> RangeWriter<'a> {
        RangeWriter {
            store: self,
            key,
            upload_id: plan.upload_id.clone(),
            next_part: plan.first_part(i),
            part_size: self.part_size,
            buf: None,
            etags: Vec::new(),
        }
    }

    /// Completes the upload from every range's parts, in order (the caller records that and
    /// then forgets the plan). An upload already completed (by an earlier fold that failed
    /// before recording it) is accepted when the object has the length the ranges add up to
    /// and as many parts.
    pub(crate) async fn complete_split(
        &self,
        key: &str,
        plan: &SplitPlan,
        ranges: &[RangeDone],
    ) -> Result<PutReport, StagingError> {
        let bytes: u64 = ranges.iter().map(|d| d.bytes).sum();
        let newline_added = ranges.last().is_some_and(|d| d.newline_added);
        if bytes != plan.length + u64::from(newline_added) {
            return Err(StagingError::Store {
                operation: "CompleteMultipartUpload",
                key: key.to_owned(),
                status: None,
                code: Some("ResumeMismatch".into()),
                transient: true,
                message: format!(
                    "the ranges hold {bytes} bytes of a file of {}; the file starts over",
                    plan.length
                ),
            });
        }
        let parts = numbered_parts(ranges.iter().flat_map(|d| d.etags.iter().cloned()));
        if let Err(e) = self.complete(key, &plan.upload_id, parts).await {
            // A multipart object's ETag ends with its number of parts.
            let parts = format!("-{}\"", ranges.iter().map(|d| d.etags.len()).sum::<usize>());
            let stored = match e.code() {
                Some("NoSuchUpload") => self
                    .client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .send()
                    .await
                    .ok()
                    .filter(|h| h.e_tag().is_some_and(|t| t.ends_with(&parts)))
                    .and_then(|h| h.content_length),
                _ => None,
            };
            if stored.and_then(|n| u64::try_from(n).ok()) != Some(bytes) {
                return Err(e);
            }
        }
        Ok(PutReport {
            bytes,
            lines: ranges.iter().map(|d| d.lines).sum(),
            newline_added,
            resumed_at: 0,
        })
    }

    /// Removes a split transfer of `key`: its plan, (when not yet completed) its upload, and
    /// every range record under its name, also those a range item wrote after an earlier
    /// plan was dropped.
    pub(crate) async fn forget_split(&self, key: &str) -> Result<(), StagingError> {
        validate_key(key)?;
        let pkey = split::plan_key(key);
        if let Some(bytes) = self.get_bytes(&pkey, resume::MAX_CHECKPOINT).await? {
            if let Ok(plan) = serde_json::from_slice::<SplitPlan>(&bytes) {
                let _ = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&plan.upload_id)
                    .send()
                    .await;
            }
            self.delete(&pkey).await?;
        }
        let records = self.list(&split::range_prefix(key)).await?;
        let deleted: Vec<Result<(), StagingError>> = futures::stream::iter(records)
            .map(|k| async move { self.delete(&k).await })
            .buffer_unordered(CONCURRENT_REQUESTS)
            .collect()
            .await;
        deleted.into_iter().collect()
    }
}

impl S3Store {
    /// CompleteMultipartUpload of `upload_id` from `parts`.
    async fn complete(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
    ) -> Result<(), StagingError> {
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map(|_| ())
            .map_err(|e| sdk_error("CompleteMultipartUpload", key, e))
    }
}

/// Parts 1, 2, … with these ETags, as CompleteMultipartUpload lists them.
fn numbered_parts(etags: impl IntoIterator<Item = String>) -> Vec<CompletedPart> {
    etags
        .into_iter()
        .zip(1..)
        .map(|(e_tag, number)| {
            CompletedPart::builder()
                .e_tag(e_tag)
                .part_number(number)
                .build()
        })
        .collect()
}

/// Writes one range's bytes as consecutive parts of a split transfer's upload, one part buffer
/// (from the store's budget) at a time.
pub(crate) struct RangeWriter<'a> {
    store: &'a S3Store,
    key: &'a str,
    upload_id: String,
    next_part: i32,
    part_size: usize,
    buf: Option<PartBuf>,
    etags: Vec<String>,
}

impl RangeWriter<'_> {
    pub(crate) async fn push(&mut self, mut data: &[u8]) -> Result<(), StagingError> {
        while !data.is_empty() {
            let buf = match &mut self.buf {
                Some(buf) => buf,
                None => {
                    let next = self.store.budget.buffer(self.part_size).await?;
                    self.buf.insert(next)
                }
            };
            let taken = buf.fill(data);
            data = &data[taken..];
            if buf.is_full() {
                self.send().await?;
            }
        }
        Ok(())
    }

    async fn send(&mut self) -> Result<(), StagingError> {
        let Some(buf) = self.buf.take() else {
            return Ok(());
        };
        let (bytes, frozen) = buf.freeze();
        if bytes.is_empty() {
            return Ok(());
        }
        let store = self.store;
        let part = upload_part(
            &store.client,
            &store.bucket,
            self.key,
            &self.upload_id,
            self.next_part,
            bytes,
        )
        .await?;
        self.next_part += 1;
        self.etags.push(part.e_tag().unwrap_or_default().to_owned());
        self.buf = frozen.reclaim();
        Ok(())
    }

    /// Sends the last (short) part and returns the ETags of the range's parts.
    pub(crate) async fn finish(mut self) -> Result<Vec<String>, StagingError> {
        self.send().await?;
        Ok(self.etags)
    }
}

/// A started multipart upload. Dropping it while `armed` (the `put_stream` future was cancelled)
/// aborts it in the background.
/// A part upload in flight: the part, and its buffer once the request let go of it.
type PartUpload = JoinHandle<Result<(CompletedPart, Option<PartBuf>), StagingError>>;

struct Multipart {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    next_part_number: i32,
    parts: Vec<CompletedPart>,
    /// The part upload in flight; it ends with the part's buffer when the request let go of it.
    in_flight: Option<PartUpload>,
    armed: bool,
    /// A checkpoint names this upload: dropped, it is kept for a later attempt to continue.
    keep: Arc<AtomicBool>,
}

impl Multipart {
    async fn create(
        store: &S3Store,
        key: &str,
        keep: Arc<AtomicBool>,
    ) -> Result<Self, StagingError> {
        let resp = store
            .client
            .create_multipart_upload()
            .bucket(&store.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| sdk_error("CreateMultipartUpload", key, e))?;
        let upload_id = resp
            .upload_id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| missing_field("CreateMultipartUpload", key, "UploadId"))?;
        Ok(Multipart {
            client: store.client.clone(),
            bucket: store.bucket.clone(),
            key: key.to_owned(),
            upload_id,
            next_part_number: 1,
            parts: Vec::new(),
            in_flight: None,
            armed: true,
            keep,
        })
    }

    /// Waits for the part in flight (if any) and records it; returns its buffer for reuse.
    async fn wait_in_flight(&mut self) -> Result<Option<PartBuf>, StagingError> {
        if let Some(handle) = self.in_flight.take() {
            let (part, buf) = handle.await.map_err(|e| StagingError::Store {
                operation: "UploadPart",
                key: self.key.clone(),
                status: None,
                code: None,
                transient: false,
                message: format!("part upload task failed: {e}"),
            })??;
            self.parts.push(part);
            return Ok(buf);
        }
        Ok(None)
    }
}

impl Drop for Multipart {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(handle) = self.in_flight.take() {
            handle.abort();
        }
        if self.keep.load(Ordering::Relaxed) {
            // A later attempt continues it from its checkpoint (or the bucket's lifecycle
            // rule removes it, should none ever come).
            return;
        }
        // Best effort: without a runtime (or if the process ends first) the upload stays until
        // the bucket's lifecycle rule removes it.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let request = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(&self.upload_id);
            rt.spawn(async move {
                let _ = request.send().await;
            });
        }
    }
}

/// A checkpoint to write once its part is uploaded.
struct PendingCheckpoint {
    checkpoint: resume::Checkpoint,
    progress: Arc<AtomicU64>,
    keep: Arc<AtomicBool>,
}

impl PendingCheckpoint {
    /// Writes the checkpoint (after the segment the part completes, if it does). A failure
    /// only costs a later attempt the progress since the previous checkpoint, so it is
    /// logged, not fatal.
    async fn write(mut self, store: &S3Store, key: &str, part: &CompletedPart) {
        let c = &mut self.checkpoint;
        c.etags.push(part.e_tag().unwrap_or_default().to_owned());
        let result = async {
            if c.etags.len() == store.segment {
                let segment = serde_json::to_vec(&c.etags).unwrap_or_default();
                let skey = resume::segment_key(key, c.segments);
                store.put_object(&skey, Bytes::from(segment)).await?;
                c.segments += 1;
                c.etags.clear();
            }
            let body = serde_json::to_vec(&c).unwrap_or_default();
            store
                .put_object(&resume::checkpoint_key(key), Bytes::from(body))
                .await
        }
        .await;
        match result {
            Ok(()) => {
                self.keep.store(true, Ordering::Relaxed);
                self.progress.store(c.stored, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(key, error = %e, "could not record a checkpoint"),
        }
    }
}

async fn upload_part(
    client: &Client,
    bucket: &str,
    key: &str,
    upload_id: &str,
    number: i32,
    bytes: Bytes,
) -> Result<CompletedPart, StagingError> {
    let len = bytes.len() as i64;
    let resp = client
        .upload_part()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .part_number(number)
        .content_length(len)
        .body(ByteStream::from(bytes))
        .send()
        .await
        .map_err(|e| sdk_error("UploadPart", key, e))?;
    let e_tag = resp
        .e_tag
        .ok_or_else(|| missing_field("UploadPart", key, "ETag"))?;
    Ok(CompletedPart::builder()
        .e_tag(e_tag)
        .part_number(number)
        .build())
}

/// Whether the S3 client built from `sdk` will talk to a custom endpoint. Mirrors how
/// `aws_sdk_s3::config::Builder::from(&SdkConfig)` picks its endpoint: the service-specific
/// setting (`AWS_ENDPOINT_URL_S3`, a profile's `[services]` section), then the global one.
fn has_endpoint_override(sdk: &SdkConfig) -> bool {
    if sdk.endpoint_url().is_some() {
        return true;
    }
    let key = ServiceConfigKey::builder()
        .service_id("S3")
        .env("AWS_ENDPOINT_URL")
        .profile("endpoint_url")
        .build();
    match (sdk.service_config(), key) {
        (Some(conf), Ok(key)) => conf.load_config(key).is_some(),
        _ => false,
    }
}

fn missing_field(operation: &'static str, key: &str, field: &str) -> StagingError {
    StagingError::Store {
        operation,
        key: key.to_owned(),
        status: None,
        code: None,
        transient: false,
        message: format!("response has no {field}"),
    }
}

/// A failure while reading a response body from S3: the connection broke mid-object.
fn body_read_error(key: &str, e: &aws_sdk_s3::primitives::ByteStreamError) -> StagingError {
    StagingError::Store {
        operation: "GetObject",
        key: key.to_owned(),
        status: None,
        code: None,
        transient: true,
        message: scrub(&crate::error_chain(e)),
    }
}

/// Error codes S3 (and S3-compatible stores) use for conditions that pass with time.
const TRANSIENT_CODES: &[&str] = &[
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException",
    "RequestTimeout",
    "RequestTimeoutException",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "PriorRequestNotComplete",
    "OperationAborted",
];

/// Classify an SDK failure (after the SDK's own retries) for the caller.
fn sdk_error<E>(
    operation: &'static str,
    key: &str,
    err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> StagingError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_owned);
    let status_transient = status.is_some_and(|s| s >= 500 || s == 429);
    let transient = match &err {
        SdkError::ConstructionFailure(_) => false,
        SdkError::TimeoutError(_) => true,
        // Connection refused/reset, DNS, TLS hiccups and timeouts; a "user" error is a bad
        // request we built and will build again.
        SdkError::DispatchFailure(d) => !d.is_user(),
        // The response could not be parsed: a proxy's HTML error page or a truncated body.
        SdkError::ResponseError(_) => status.is_none() || status_transient,
        SdkError::ServiceError(_) => {
            status_transient
                || code
                    .as_deref()
                    .is_some_and(|c| TRANSIENT_CODES.contains(&c))
        }
        _ => status_transient,
    };
    let message = match (&err, err.message()) {
        (SdkError::ServiceError(_), Some(m)) => m.to_owned(),
        _ => crate::error_chain(&err),
    };
    StagingError::Store {
        operation,
        key: key.to_owned(),
        status,
        code,
        transient,
        message: scrub(&message),
    }
}
