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
        self.write(run).map(|_| ())
    }

    /// Writes the run durably; answers the bytes written.
    fn write(&mut self, run: &SyncRun) -> Result<u64, StoreError> {
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
        Ok(text.len() as u64)
    }
}

impl RunStore for FileStore {
    async fn save(&mut self, run: &SyncRun) -> Result<u64, StoreError> {
        // The file is locked: the only writer is this store, so the run only has to move on.
        if let Some(last) = self.seq.filter(|last| run.seq <= *last) {
            return Err(StoreError::Conflict { expected: last });
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
        assert!(matches!(none, Stored::Nothing));
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
        assert!(matches!(stored, Stored::Run(r) if r.run_id == "run-1"));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            saved,
            "the state is untouched"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_symlinked_state_file_is_written_through_and_locked_at_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let real_dir = dir.path().join("real");
        std::fs::create_dir(&real_dir).unwrap();
        let target = real_dir.join("state.json");
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();

        let (mut store, _) = FileStore::open(&link).unwrap();
        store.replace(&run()).unwrap();
        // The link is still a link; the run is in the file it points to.
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(matches!(FileStore::peek(&target).unwrap(), Stored::Run(_)));
        // A second process going through either path is locked out.
        assert!(matches!(
            FileStore::open(&target),
            Err(FileStoreError::Locked(_))
        ));
        assert!(matches!(
            FileStore::open(&link),
            Err(FileStoreError::Locked(_))
        ));
        assert!(FileStore::in_use(&link));
        // `status` reads while the run is in progress.
        assert!(matches!(FileStore::peek(&link).unwrap(), Stored::Run(_)));
        drop(store);
        assert!(!FileStore::in_use(&link));
    }

    #[test]
    fn a_corrupt_file_is_reported_with_its_readable_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(
            &path,
            r#"{"schema_version": 2, "state": "garbage",
                "watermark": {"transaction_time": "2026-01-01T00:00:00Z", "run_id": "r0"}}"#,
        )
        .unwrap();
        let (_store, stored) = FileStore::open(&path).unwrap();
        let Stored::Corrupt(c) = stored else {
            panic!("{stored:?}")
        };
        assert_eq!(
            c.watermark.map(|w| w.transaction_time).as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
        std::fs::write(&path, b"\x00\x01 not json").unwrap();
        let Stored::Corrupt(c) = FileStore::peek(&path).unwrap() else {
            panic!()
        };
        assert!(c.watermark.is_none());
    }
}
