//! The local runner's store: the run's envelope in one JSON file, replaced atomically
//! (write a temp file, fsync, rename) after every step, and guarded by an exclusive lock on a
//! sibling `.lock` file so two processes never drive the same run. A temp file that a killed
//! process left behind is removed when the store is next opened.

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
    /// or too-new file is an error and is left untouched. A stale temp file
    /// (`<state>.json.tmp`, left by a process killed mid-save) is removed: holding the lock,
    /// no writer can be between writing it and renaming it.
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
        match std::fs::remove_file(tmp_path(path)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("removing the stale temp file: {e}"))),
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
        let tmp = tmp_path(&self.path);
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

/// Where a save writes before renaming over the state file.
fn tmp_path(path: &Path) -> PathBuf {
    path.with_extension("json.tmp")
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use pathling_import_core::config::{parse, RawConfig};
    use pathling_import_core::Timestamp;

    fn run() -> SyncRun {
        let vars = [
            ("SOURCE_ENDPOINT", "https://source.example.org/fhir"),
            ("SOURCE_AUTHENTICATION_ENABLED", "false"),
            ("STAGING_URL", "file:///tmp/staging/"),
            ("TARGET_ENDPOINT", "https://pathling.example.org/fhir"),
            ("TARGET_AUTHENTICATION_ENABLED", "false"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let spec = parse(&RawConfig::from_env(vars, &[]), &[]).unwrap().spec;
        SyncRun::start("run-1", spec, None, Timestamp(1_800_000_000_000)).unwrap()
    }

    #[test]
    fn a_stale_temp_file_is_removed_once_the_lock_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let tmp = dir.path().join("state.json.tmp");
        let (mut store, none) = FileStore::open(&path).unwrap();
        assert!(none.is_none());
        store.replace(&run()).unwrap();
        let saved = std::fs::read(&path).unwrap();

        // A process killed between writing the temp file and renaming it left this behind.
        std::fs::write(&tmp, b"{\"half\": ").unwrap();
        // While another process holds the lock, the temp file may be its save in progress.
        assert!(matches!(
            FileStore::open(&path),
            Err(FileStoreError::Locked(_))
        ));
        assert!(tmp.exists(), "not removed without the lock");

        drop(store);
        let (_store, stored) = FileStore::open(&path).unwrap();
        assert!(!tmp.exists(), "the stale temp file is removed");
        assert_eq!(stored.map(|r| r.run_id), Some("run-1".to_string()));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            saved,
            "the state is untouched"
        );
    }
}
