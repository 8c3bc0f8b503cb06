//! The local runner's store: the run's envelope in one JSON file, replaced atomically
//! (write a temp file, fsync, rename) after every step, and guarded by an exclusive lock on a
//! sibling `.lock` file so two processes never drive the same run.

use crate::driver::{RunStore, StoreError};
use pathling_import_core::persist;
use pathling_import_core::SyncRun;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    /// The `seq` of the run as last read or written; saves must continue from it.
    seq: Option<u64>,
    _lock: File,
}

#[derive(Debug, thiserror::Error)]
pub enum FileStoreError {
    #[error("another pathling-import process is using {0} (lock held); wait for it or stop it")]
    Locked(PathBuf),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: persist::PersistError,
    },
}

impl FileStore {
    /// Opens (and locks) the state file, returning the run stored in it, if any. A corrupt
    /// or too-new file is an error and is left untouched.
    pub fn open(path: &Path) -> Result<(FileStore, Option<SyncRun>), FileStoreError> {
        let io = |message: String| FileStoreError::Io {
            path: path.to_path_buf(),
            message,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| io(format!("creating its directory: {e}")))?;
        }
        let lock_path = lock_path(path);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io(format!("opening the lock file: {e}")))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(FileStoreError::Locked(path.to_path_buf()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(format!("locking: {e}"))),
        }
        let run = match std::fs::read(path) {
            Ok(bytes) => {
                Some(
                    persist::decode(&bytes).map_err(|source| FileStoreError::Decode {
                        path: path.to_path_buf(),
                        source,
                    })?,
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(format!("reading: {e}"))),
        };
        let seq = run.as_ref().map(|r| r.seq);
        Ok((
            FileStore {
                path: path.to_path_buf(),
                seq,
                _lock: lock,
            },
            run,
        ))
    }

    /// Replaces the stored run with a new one (a fresh run after the previous ended).
    pub fn replace(&mut self, run: &SyncRun) -> Result<(), StoreError> {
        self.write(run)
    }

    fn write(&mut self, run: &SyncRun) -> Result<(), StoreError> {
        let text = serde_json::to_vec_pretty(&persist::encode(run))
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let tmp = self.path.with_extension("json.tmp");
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

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".lock");
    path.with_file_name(name)
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
