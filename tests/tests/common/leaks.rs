//! Finding secrets where they must never be: in a text (output, an error, a JSON answer), in
//! any file under a directory (state, staged objects, manifests, the watermark, captured
//! output), or in the log lines of code run in-process ([`LogCapture`]).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Panics when one of `secrets` occurs in `text`, naming `what` (never the secret itself
/// twice: the text is shown, which holds it).
pub fn assert_absent(what: &str, text: &str, secrets: &[String]) {
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "a secret leaked into {what}:\n{text}"
        );
    }
}

/// Every file under `dir` (recursively, hidden and temporary files too) except `skip`,
/// checked for `secrets`. Returns how many files were read.
pub fn scan_dir(dir: &Path, secrets: &[String], skip: &[PathBuf]) -> usize {
    let mut files = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if skip.iter().any(|s| s == &path) {
            continue;
        }
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            files += scan_dir(&path, secrets, skip);
        } else if kind.is_file() {
            // A file may vanish between listing and reading (a temp file renamed).
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            files += 1;
            let text = String::from_utf8_lossy(&bytes);
            for secret in secrets {
                assert!(
                    !text.contains(secret.as_str()),
                    "a secret leaked into {}",
                    path.display()
                );
            }
        }
    }
    files
}

/// Captures every log line (`debug` and up, JSON) of code running on this thread — all of a
/// current-thread Tokio runtime's tasks — until dropped.
pub struct LogCapture {
    buffer: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

#[derive(Clone)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    pub fn start() -> LogCapture {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = SharedBuffer(buffer.clone());
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        LogCapture {
            buffer,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    /// What was logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buffer.lock().unwrap()).into_owned()
    }
}
