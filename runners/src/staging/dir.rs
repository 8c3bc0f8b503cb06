//! The directory staging store: atomic writes under a local root (`file:///abs/root/`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use futures::stream::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufWriter};
use url::Url;

use super::budget::{MemoryBudget, DEFAULT_TRANSFER_MEMORY};
use super::resume::{self, ReadAgain, ResumeFrom, SourceFacts};
use super::{validate_key, BodyStats, FailureSide, PutReport, ReadStream, StagingError, NEWLINE};

/// Write buffer: fewer blocking-pool round trips than writing each (often small) download chunk.
/// Drawn from the store's memory budget.
pub const WRITE_BUFFER: usize = 256 * 1024;
/// Read chunk size of `open_read`.
const READ_CHUNK: usize = 64 * 1024;

/// Distinguishes temp files of concurrent writes within this process (the pid separates
/// processes).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Temp files of this process's writes in flight: [`DirStore::remove_leftovers`] never
/// removes them. A path is registered before its file is created and deregistered when its
/// [`TempFile`] is dropped (committed, discarded or abandoned).
static LIVE_TEMPS: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn live_temps() -> MutexGuard<'static, BTreeSet<PathBuf>> {
    LIVE_TEMPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a file name is one [`TempFile`] makes: `.{name}.partial-{pid}-{n}`.
fn is_temp_name(name: &str) -> bool {
    let Some((base, suffix)) = name
        .strip_prefix('.')
        .and_then(|n| n.rsplit_once(".partial-"))
    else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    !base.is_empty()
        && suffix
            .split_once('-')
            .is_some_and(|(pid, n)| digits(pid) && digits(n))
}

/// Removes the temp files under `dir` (recursively, not following symbolic links) that no
/// write of this process is using; returns how many.
fn remove_temps(dir: &Path, shown: &str) -> Result<u32, StagingError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(StagingError::io("read_dir", shown, &e)),
    };
    let mut removed = 0u32;
    for entry in entries {
        let entry = entry.map_err(|e| StagingError::io("read_dir", shown, &e))?;
        let file_type = entry
            .file_type()
            .map_err(|e| StagingError::io("read_dir", shown, &e))?;
        let path = entry.path();
        if file_type.is_dir() {
            removed = removed.saturating_add(remove_temps(&path, shown)?);
            continue;
        }
        let is_temp = file_type.is_file() && entry.file_name().to_str().is_some_and(is_temp_name);
        if !is_temp || live_temps().contains(&path) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => removed = removed.saturating_add(1),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StagingError::io("remove_leftover", shown, &e)),
        }
    }
    Ok(removed)
}

/// A resumable write records a checkpoint (after an fsync of what it wrote) every this many
/// bytes, unless [`DirStore::with_checkpoint_every`] says otherwise (the runners use the part
/// size, so that a part is the unit of resumption on either store).
pub const CHECKPOINT_EVERY: u64 = 8 * 1024 * 1024;

/// A local directory used as staging store. Objects are files under the root; a key's `/`
/// separates directories.
#[derive(Debug, Clone)]
pub struct DirStore {
    root: PathBuf,
    budget: MemoryBudget,
    checkpoint_every: u64,
}

impl DirStore {
    /// Use `root` (created if missing) as the store's root. The path is canonicalised, so the
    /// import URLs are absolute even when `root` is relative.
    pub async fn new(root: impl AsRef<Path>) -> Result<Self, StagingError> {
        let root = root.as_ref();
        let shown = root.display().to_string();
        tokio::fs::create_dir_all(root)
            .await
            .map_err(|e| StagingError::io("create_dir", &shown, &e))?;
        let root = tokio::fs::canonicalize(root)
            .await
            .map_err(|e| StagingError::io("canonicalize", &shown, &e))?;
        Ok(DirStore {
            root,
            budget: MemoryBudget::new(DEFAULT_TRANSFER_MEMORY, WRITE_BUFFER)?,
            checkpoint_every: CHECKPOINT_EVERY,
        })
    }

    /// The same store with its own budget of `memory` bytes for write buffers (at least one,
    /// [`WRITE_BUFFER`]).
    pub fn with_memory(self, memory: usize) -> Result<Self, StagingError> {
        Ok(DirStore {
            budget: MemoryBudget::new(memory, WRITE_BUFFER)?,
            ..self
        })
    }

    /// The same store, checkpointing resumable writes every `bytes` (at least 1).
    pub fn with_checkpoint_every(mut self, bytes: u64) -> Self {
        self.checkpoint_every = bytes.max(1);
        self
    }

    /// The budget write buffers are drawn from.
    pub fn budget(&self) -> &MemoryBudget {
        &self.budget
    }

    /// Use the directory a `file:///abs/path/` URL names as the root.
    pub async fn from_file_url(url: &str) -> Result<Self, StagingError> {
        let parsed = Url::parse(url)
            .map_err(|e| StagingError::Config(format!("invalid staging URL {url:?}: {e}")))?;
        if parsed.scheme() != "file" {
            return Err(StagingError::Config(format!(
                "staging URL {url:?} is not a file:// URL"
            )));
        }
        let path = parsed.to_file_path().map_err(|()| {
            StagingError::Config(format!("staging URL {url:?} is not a local absolute path"))
        })?;
        Self::new(path).await
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StagingError> {
        validate_key(key)?;
        // validate_key guarantees a relative path of normal components, so the join stays
        // under the root.
        Ok(self.root.join(key))
    }

    pub async fn put_stream<S, E>(&self, key: &str, mut body: S) -> Result<PutReport, StagingError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::error::Error + Send + Sync + 'static,
    {
        let path = self.path_of(key)?;
        // Held until the write buffer is gone (declared before it, so dropped after it).
        let _lease = self.budget.reserve(WRITE_BUFFER).await?;
        let (mut temp, file) = TempFile::create(key, &path).await?;
        let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
        let mut stats = BodyStats::default();
        while let Some(item) = body.next().await {
            let chunk = match item {
                Ok(chunk) => chunk,
                Err(e) => return Err(temp.discard(StagingError::body(stats.bytes(), e)).await),
            };
            stats.observe(&chunk);
            if let Err(e) = out.write_all(&chunk).await {
                return Err(temp.discard(StagingError::io("write", key, &e)).await);
            }
        }
        let newline_added = stats.needs_newline();
        if newline_added {
            stats.observe(NEWLINE);
            if let Err(e) = out.write_all(NEWLINE).await {
                return Err(temp.discard(StagingError::io("write", key, &e)).await);
            }
        }
        if let Err(e) = out.flush().await {
            return Err(temp.discard(StagingError::io("write", key, &e)).await);
        }
        temp.commit(out.into_inner(), key, &path).await?;
        Ok(stats.report(newline_added))
    }

    fn layout(&self) -> [u64; 4] {
        [self.checkpoint_every, 0, 0, 0]
    }

    /// The checkpoint of an interrupted resumable write of `key`, when one exists for the file
    /// `identity` names and its partial file holds what it says; an unusable one is forgotten.
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
        let checkpoint = resume::usable(&ckey, &bytes, identity, self.layout());
        let partial = self.path_of(&resume::partial_key(key))?;
        let held = match tokio::fs::metadata(&partial).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(StagingError::io("stat", key, &e)),
        };
        match checkpoint {
            Some(checkpoint) if held >= checkpoint.stored && checkpoint.stored > 0 => {
                Ok(Some(ResumeFrom {
                    checkpoint,
                    etags: Vec::new(),
                }))
            }
            _ => {
                self.forget(key).await?;
                Ok(None)
            }
        }
    }

    /// The keys of the files directly in the folder `prefix` names (ending with `/`).
    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<String>, StagingError> {
        let dir = self.path_of(prefix.trim_end_matches('/'))?;
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StagingError::io("read_dir", prefix, &e)),
        };
        let mut keys = Vec::new();
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|e| StagingError::io("read_dir", prefix, &e))?
        {
            if let Some(name) = entry.file_name().to_str() {
                keys.push(format!("{prefix}{name}"));
            }
        }
        Ok(keys)
    }

    /// Removes the partial file and the checkpoint of `key`.
    pub async fn forget(&self, key: &str) -> Result<(), StagingError> {
        self.delete(&resume::partial_key(key)).await?;
        self.delete(&resume::checkpoint_key(key)).await
    }

    /// Streams `body` into `key` like [`put_stream`](Self::put_stream), but through a partial
    /// file beside it (`.resume/{name}`) whose start is fsynced and recorded in a checkpoint
    /// every [`CHECKPOINT_EVERY`] bytes, so an interrupted write can continue; `from` continues
    /// one, and `body` then starts at its [`offset`](ResumeFrom::offset). `progress` is set to
    /// the bytes each checkpoint holds.
    pub async fn put_resumable<S, E>(
        &self,
        key: &str,
        mut body: S,
        facts: SourceFacts,
        from: Option<ResumeFrom>,
        progress: Arc<AtomicU64>,
        wind_down: Arc<AtomicBool>,
    ) -> Result<PutReport, StagingError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::error::Error + Send + Sync + 'static,
    {
        let path = self.path_of(key)?;
        let partial_key = resume::partial_key(key);
        let partial_path = self.path_of(&partial_key)?;
        let _lease = self.budget.reserve(WRITE_BUFFER).await?;
        if let Some(dir) = partial_path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| StagingError::io("create_dir", key, &e))?;
        }
        let mut stats = BodyStats::default();
        let mut verify = None;
        let mut resumed_at = 0;
        let file = match &from {
            Some(from) => {
                let c = &from.checkpoint;
                (stats, verify) = ReadAgain::start(c);
                resumed_at = c.stored;
                let opened = async {
                    let mut file = tokio::fs::OpenOptions::new()
                        .write(true)
                        .open(&partial_path)
                        .await?;
                    // What was written after the checkpoint is not known to be whole.
                    file.set_len(c.stored).await?;
                    file.seek(std::io::SeekFrom::End(0)).await?;
                    Ok::<_, std::io::Error>(file)
                }
                .await;
                opened.map_err(|e| StagingError::io("open_partial", key, &e))?
            }
            None => tokio::fs::File::create(&partial_path)
                .await
                .map_err(|e| StagingError::io("create_partial", key, &e))?,
        };
        let mut partial = Partial {
            store: self,
            key,
            path: partial_path,
            keep: from.is_some(),
            done: false,
        };
        let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
        let mut last_checkpoint = stats.bytes().max(resumed_at);
        let mut body_failed = None;
        while let Some(item) = body.next().await {
            let chunk = match item {
                Ok(chunk) => chunk,
                Err(e) => {
                    body_failed = Some(StagingError::body(stats.bytes(), e));
                    break;
                }
            };
            let mut data = &chunk[..];
            if let Some(again) = &verify {
                match again.take(key, &mut stats, data) {
                    Ok((rest, done)) => {
                        data = rest;
                        if done {
                            verify = None;
                        }
                    }
                    Err(err) => return Err(partial.discard(err).await),
                }
            }
            if data.is_empty() {
                continue;
            }
            stats.observe(data);
            if let Err(e) = out.write_all(data).await {
                return Err(partial.fail(StagingError::io("write", key, &e)).await);
            }
            if stats.bytes() - last_checkpoint >= self.checkpoint_every {
                // Winding down stops here, at a part's worth, as an S3 upload would.
                let winding_down = wind_down.load(Ordering::Relaxed);
                let checkpoint = resume::Checkpoint {
                    v: resume::VERSION,
                    facts: facts.clone(),
                    upload_id: None,
                    layout: self.layout(),
                    stored: stats.bytes(),
                    line_start: stats.line_point().line_start,
                    newlines: stats.line_point().newlines,
                    lines: stats.line_point().lines,
                    tail: resume::hex(stats.tail()),
                    segments: 0,
                    etags: Vec::new(),
                };
                if let Err(err) = self.checkpoint(&mut out, key, &checkpoint).await {
                    return Err(partial.fail(err).await);
                }
                partial.keep = true;
                last_checkpoint = stats.bytes();
                progress.store(last_checkpoint, Ordering::Relaxed);
                if winding_down {
                    partial.done = true;
                    return Err(StagingError::Paused {
                        key: key.to_owned(),
                        stored: last_checkpoint,
                    });
                }
            }
        }
        if let Some(err) = body_failed {
            return Err(partial.fail(err).await);
        }
        if let Some(again) = verify {
            let err = again.ended_early(key);
            return Err(partial.discard(err).await);
        }
        let newline_added = stats.needs_newline();
        if newline_added {
            stats.observe(NEWLINE);
            if let Err(e) = out.write_all(NEWLINE).await {
                return Err(partial.fail(StagingError::io("write", key, &e)).await);
            }
        }
        let committed = async {
            out.flush().await?;
            let file = out.into_inner();
            file.sync_all().await?;
            drop(file);
            tokio::fs::rename(&partial.path, &path).await?;
            Ok::<(), std::io::Error>(())
        }
        .await;
        if let Err(e) = committed {
            return Err(partial.fail(StagingError::io("commit", key, &e)).await);
        }
        partial.done = true;
        if let Some(dir) = path.parent() {
            let synced = async { tokio::fs::File::open(dir).await?.sync_all().await }.await;
            synced.map_err(|e| StagingError::io("fsync_dir", key, &e))?;
        }
        if partial.keep {
            let _ = self.delete(&resume::checkpoint_key(key)).await;
        }
        let mut report = stats.report(newline_added);
        report.resumed_at = resumed_at;
        Ok(report)
    }

    /// Makes what `out` wrote durable, then records `checkpoint` of it.
    async fn checkpoint(
        &self,
        out: &mut BufWriter<tokio::fs::File>,
        key: &str,
        checkpoint: &resume::Checkpoint,
    ) -> Result<(), StagingError> {
        out.flush()
            .await
            .map_err(|e| StagingError::io("write", key, &e))?;
        out.get_ref()
            .sync_data()
            .await
            .map_err(|e| StagingError::io("fsync", key, &e))?;
        // Written and renamed into place without an fsync of its own: the data it names is
        // durable already, and a checkpoint lost with the machine only means an earlier one
        // (or none) is found, which claims less.
        let ckey = resume::checkpoint_key(key);
        let path = self.path_of(&ckey)?;
        let (mut temp, mut file) = TempFile::create(&ckey, &path).await?;
        let body = serde_json::to_vec(checkpoint).unwrap_or_default();
        if let Err(e) = file.write_all(&body).await {
            return Err(temp.discard(StagingError::io("write", &ckey, &e)).await);
        }
        drop(file);
        if let Err(e) = tokio::fs::rename(&temp.path, &path).await {
            return Err(temp.discard(StagingError::io("rename", &ckey, &e)).await);
        }
        temp.armed = false;
        Ok(())
    }

    /// Removes the temp files that writes interrupted by a crash or a SIGKILL left under
    /// `prefix` (a key prefix ending with `/`, such as a run's, or empty for the whole store),
    /// returning how many. Only files named like this store's temp files
    /// (`.{name}.partial-{pid}-{n}`) are removed, never a staged object, and never the temp
    /// file of a write this process still has in flight. Another process writing under the
    /// same prefix would lose its temp files: call it where the run is held exclusively (at a
    /// run's start or resumption).
    pub async fn remove_leftovers(&self, prefix: &str) -> Result<u32, StagingError> {
        let trimmed = prefix.trim_end_matches('/');
        let dir = if trimmed.is_empty() {
            self.root.clone()
        } else {
            self.path_of(trimmed)?
        };
        let shown = prefix.to_owned();
        tokio::task::spawn_blocking(move || remove_temps(&dir, &shown))
            .await
            .map_err(|e| StagingError::Store {
                operation: "remove_leftovers",
                key: prefix.to_owned(),
                status: None,
                code: None,
                transient: false,
                message: e.to_string(),
            })?
    }

    pub async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<(), StagingError> {
        let path = self.path_of(key)?;
        let (mut temp, mut file) = TempFile::create(key, &path).await?;
        if let Err(e) = file.write_all(&bytes).await {
            return Err(temp.discard(StagingError::io("write", key, &e)).await);
        }
        temp.commit(file, key, &path).await
    }

    pub async fn get_bytes(&self, key: &str, limit: u64) -> Result<Option<Bytes>, StagingError> {
        use tokio::io::AsyncReadExt;
        let path = self.path_of(key)?;
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StagingError::io("read", key, &e)),
        };
        let too_large = || StagingError::TooLarge {
            key: key.to_owned(),
            limit,
        };
        let size = file
            .metadata()
            .await
            .map_err(|e| StagingError::io("read", key, &e))?
            .len();
        if size > limit {
            return Err(too_large());
        }
        // The file may grow between the two calls: read no more than the limit allows.
        let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        file.take(limit.saturating_add(1))
            .read_to_end(&mut data)
            .await
            .map_err(|e| StagingError::io("read", key, &e))?;
        if data.len() as u64 > limit {
            return Err(too_large());
        }
        Ok(Some(Bytes::from(data)))
    }

    /// Removes an object; an absent one is fine.
    pub async fn delete(&self, key: &str) -> Result<(), StagingError> {
        let path = self.path_of(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StagingError::io("remove", key, &e)),
        }
    }

    pub async fn open_read(&self, key: &str) -> Result<ReadStream, StagingError> {
        let path = self.path_of(key)?;
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StagingError::NotFound {
                    key: key.to_owned(),
                    status: None,
                })
            }
            Err(e) => return Err(StagingError::io("open", key, &e)),
        };
        let key = key.to_owned();
        let stream = futures::stream::unfold(Some(file), move |file| {
            let key = key.clone();
            async move {
                let mut file = file?;
                let mut buf = BytesMut::with_capacity(READ_CHUNK);
                match file.read_buf(&mut buf).await {
                    Ok(0) => None,
                    Ok(_) => Some((Ok(buf.freeze()), Some(file))),
                    Err(e) => Some((Err(StagingError::io("read", &key, &e)), None)),
                }
            }
        });
        Ok(stream.boxed())
    }
}

/// The partial file of a resumable write: kept when dropped or failed once a checkpoint names
/// it (a later attempt continues it), removed otherwise.
struct Partial<'a> {
    store: &'a DirStore,
    key: &'a str,
    path: PathBuf,
    keep: bool,
    done: bool,
}

impl Partial<'_> {
    /// After `err`: kept when a checkpoint names it and the failure may pass (the download
    /// broke, an interruption), else removed with its checkpoint.
    async fn fail(&mut self, err: StagingError) -> StagingError {
        if self.keep && (err.side() == FailureSide::Body || err.is_transient()) {
            self.done = true;
            return err;
        }
        self.discard(err).await
    }

    async fn discard(&mut self, err: StagingError) -> StagingError {
        self.done = true;
        match self.store.forget(self.key).await {
            Ok(()) => err,
            Err(e) => err.with_cleanup_failure(format!("removing the partial file: {e}")),
        }
    }
}

impl Drop for Partial<'_> {
    fn drop(&mut self) {
        if !self.done && !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A temp file beside the final path: written fully, fsynced, then renamed into place, so the
/// final name only ever shows a complete object. Removed on failure or when dropped unfinished.
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl TempFile {
    async fn create(key: &str, final_path: &Path) -> Result<(Self, tokio::fs::File), StagingError> {
        let (Some(dir), Some(name)) = (final_path.parent(), final_path.file_name()) else {
            return Err(StagingError::InvalidKey {
                key: key.to_owned(),
                reason: "no file name",
            });
        };
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| StagingError::io("create_dir", key, &e))?;
        let name = name.to_string_lossy();
        let pid = std::process::id();
        // create_new never reuses a file, e.g. one left by an earlier process with the same pid.
        loop {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(".{name}.partial-{pid}-{n}"));
            // Registered before it exists, so that no clean-up ever sees it unregistered.
            live_temps().insert(path.clone());
            match tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .await
            {
                Ok(file) => return Ok((TempFile { path, armed: true }, file)),
                Err(e) => {
                    live_temps().remove(&path);
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        continue;
                    }
                    return Err(StagingError::io("create_temp", key, &e));
                }
            }
        }
    }

    /// fsync, rename into place and fsync the directory (so the rename survives a crash).
    async fn commit(
        mut self,
        mut file: tokio::fs::File,
        key: &str,
        final_path: &Path,
    ) -> Result<(), StagingError> {
        if let Err(e) = file.flush().await {
            return Err(self.discard(StagingError::io("write", key, &e)).await);
        }
        if let Err(e) = file.sync_all().await {
            return Err(self.discard(StagingError::io("fsync", key, &e)).await);
        }
        drop(file);
        if let Err(e) = tokio::fs::rename(&self.path, final_path).await {
            return Err(self.discard(StagingError::io("rename", key, &e)).await);
        }
        self.armed = false;
        if let Some(dir) = final_path.parent() {
            let synced = async { tokio::fs::File::open(dir).await?.sync_all().await }.await;
            synced.map_err(|e| StagingError::io("fsync_dir", key, &e))?;
        }
        Ok(())
    }

    /// Remove the temp file after `err`; report a failed removal alongside it.
    async fn discard(&mut self, err: StagingError) -> StagingError {
        self.armed = false;
        match tokio::fs::remove_file(&self.path).await {
            Ok(()) => err,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => err,
            Err(e) => {
                err.with_cleanup_failure(format!("removing temp file {}: {e}", self.path.display()))
            }
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // The future was dropped mid-write: do not leave the partial file behind.
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
        live_temps().remove(&self.path);
    }
}
