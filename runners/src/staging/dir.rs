//! The directory staging store: atomic writes under a local root (`file:///abs/root/`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use futures::stream::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use url::Url;

use super::{validate_key, BodyStats, PutReport, ReadStream, StagingError, NEWLINE};

/// Write buffer: fewer blocking-pool round trips than writing each (often small) download chunk.
const WRITE_BUFFER: usize = 256 * 1024;
/// Read chunk size of `open_read`.
const READ_CHUNK: usize = 64 * 1024;

/// Distinguishes temp files of concurrent writes within this process (the pid separates
/// processes).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A local directory used as staging store. Objects are files under the root; a key's `/`
/// separates directories.
#[derive(Debug, Clone)]
pub struct DirStore {
    root: PathBuf,
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
        Ok(DirStore { root })
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

    pub async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<(), StagingError> {
        let path = self.path_of(key)?;
        let (mut temp, mut file) = TempFile::create(key, &path).await?;
        if let Err(e) = file.write_all(&bytes).await {
            return Err(temp.discard(StagingError::io("write", key, &e)).await);
        }
        temp.commit(file, key, &path).await
    }

    pub async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, StagingError> {
        let path = self.path_of(key)?;
        match tokio::fs::read(&path).await {
            Ok(data) => Ok(Some(Bytes::from(data))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StagingError::io("read", key, &e)),
        }
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
            match tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .await
            {
                Ok(file) => return Ok((TempFile { path, armed: true }, file)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(StagingError::io("create_temp", key, &e)),
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
    }
}
