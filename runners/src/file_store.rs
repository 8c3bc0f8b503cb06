//! The local runner's store: the run's envelope in one JSON file, replaced atomically
//! (write a temp file, fsync, rename) after every step, and guarded by an exclusive lock on a
//! sibling `.lock` file so two processes never drive the same run.
//!
//! - A symlinked state file is followed: the file it points to is replaced in its own
//!   directory, and the lock is taken next to it, so two processes reaching the same file
//!   through different paths still exclude each other.
//! - A corrupt file is reported as such ([`Stored::Corrupt`]), with the watermark salvaged
//!   when it is still readable, so that `--fresh` or `cancel` can replace it knowingly.
//! - [`FileStore::peek`] reads without the lock (for `status` while a run is in progress):
//!   the file is only ever replaced by a rename, so a reader sees a whole envelope.

use crate::driver::{RunStore, StoreError};
use pathling_import_core::persist;
use pathling_import_core::{SyncRun, Watermark};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct FileStore {
    /// The state file itself, symlinks resolved.
    path: PathBuf,
    /// The `seq` of the run as last read or written; saves must continue from it.
    seq: Option<u64>,
    _lock: File,
}

/// What the state file holds.
#[derive(Debug)]
pub enum Stored {
    Nothing,
    Run(Box<SyncRun>),
    /// Not a readable envelope (or a newer version's).
    Corrupt(CorruptState),
}

#[derive(Debug)]
pub struct CorruptState {
    pub error: persist::PersistError,
    /// The incremental starting point, when the file still has a readable `watermark`.
    pub watermark: Option<Watermark>,
}

#[derive(Debug, thiserror::Error)]
pub enum FileStoreError {
    #[error("another pathling-import process is using {0} (lock held); wait for it or stop it")]
    Locked(PathBuf),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
}

/// Follows symlinks to the file that holds the state (which may not exist yet).
pub fn resolve(path: &Path) -> Result<PathBuf, std::io::Error> {
    let mut current = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&current) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&current)?;
                current = match current.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                };
            }
            Ok(_) => return Ok(current),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(current),
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("too many levels of symbolic links"))
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

fn read_stored(path: &Path) -> Result<Stored, FileStoreError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Stored::Nothing),
        Err(e) => {
            return Err(FileStoreError::Io {
                path: path.to_path_buf(),
                message: format!("reading: {e}"),
            })
        }
    };
    match persist::decode(&bytes) {
        Ok(run) => Ok(Stored::Run(Box::new(run))),
        Err(error) => {
            let watermark = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("watermark").cloned())
                .and_then(|w| serde_json::from_value::<Watermark>(w).ok());
            Ok(Stored::Corrupt(CorruptState { error, watermark }))
        }
    }
}

impl FileStore {
    /// Opens (and locks) the state file, returning what it holds. A corrupt or too-new file
    /// is left untouched until the caller replaces it.
    pub fn open(path: &Path) -> Result<(FileStore, Stored), FileStoreError> {
        let io = |message: String| FileStoreError::Io {
            path: path.to_path_buf(),
            message,
        };
        let path = resolve(path).map_err(|e| io(format!("following the link: {e}")))?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| io(format!("creating its directory: {e}")))?;
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(sibling(&path, ".lock"))
            .map_err(|e| io(format!("opening the lock file: {e}")))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(FileStoreError::Locked(path)),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(format!("locking: {e}"))),
        }
        // Under the lock no writer is between writing its temp file and renaming it: a temp
        // file still there is a killed writer's leftover.
        let _ = std::fs::remove_file(sibling(&path, ".tmp"));
        let stored = read_stored(&path)?;
        let seq = match &stored {
            Stored::Run(run) => Some(run.seq),
            Stored::Nothing | Stored::Corrupt(_) => None,
        };
        Ok((
            FileStore {
                path,
                seq,
                _lock: lock,
            },
            stored,
        ))
    }

    /// Reads the state file without taking the lock (for `status`, also while a run is in
    /// progress: the file only ever changes by an atomic rename).
    pub fn peek(path: &Path) -> Result<Stored, FileStoreError> {
        let path = resolve(path).map_err(|e| FileStoreError::Io {
            path: path.to_path_buf(),
            message: format!("following the link: {e}"),
        })?;
        read_stored(&path)
    }

    /// Whether another process holds the state file's lock (a run is in progress).
    pub fn in_use(path: &Path) -> bool {
        let Ok(path) = resolve(path) else {
            return false;
        };
        let Ok(lock) = OpenOptions::new().write(true).open(sibling(&path, ".lock")) else {
            return false;
        };
        // Taking the lock for a moment is harmless: it is released when `lock` is dropped.
        matches!(lock.try_lock(), Err(std::fs::TryLockError::WouldBlock))
    }

    /// The state file, symlinks resolved.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the stored run with another one (a new run after the previous ended, or one
    /// that replaces a corrupt file).
    pub fn replace(&mut self, run: &SyncRun) -> Result<(), StoreError> {
        self.write(run)
    }

    fn write(&mut self, run: &SyncRun) -> Result<(), StoreError> {
        let text = serde_json::to_vec_pretty(&persist::encode(run))
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let tmp = sibling(&self.path, ".tmp");
        let result = (|| -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
                // Make the rename itself durable.
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            Ok(())
        })();
        result.map_err(|e| StoreError::Io(format!("{}: {e}", self.path.display())))?;
        self.seq = Some(run.seq);
        Ok(())
    }
}

impl RunStore for FileStore {
    async fn save(&mut self, run: &SyncRun) -> Result<(), StoreError> {
        let expected = run.seq.saturating_sub(1);
        if self.seq.is_some_and(|s| s != expected) {
            return Err(StoreError::Conflict { expected });
        }
        self.write(run)
    }
}
