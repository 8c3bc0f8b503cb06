//! Writes the operator's event log ([`pathling_import_core::events`]): as the loop runs, each
//! line goes to the runner's sink (the CLI's `--event-log` file or stdout; a Lambda's stdout,
//! i.e. CloudWatch), and at the end of every drive the lines are appended to the run's own
//! copy next to its staged data, `{prefix}{run id}/log.ndjson`, so every run carries its audit
//! trail (a resumed run's copy shows the resume).

use crate::driver::Observer;
use crate::executor::{now, Executor};
use crate::staging::StagingStore;
use bytes::Bytes;
use pathling_import_core::effect::{Effect, EffectResult, Request};
use pathling_import_core::events::{self, LogEvent};
use pathling_import_core::SyncRun;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// Where lines go as they happen.
pub enum Sink {
    /// Only the staging copy.
    None,
    Stdout,
    File(std::fs::File),
}

/// An observer writing the event log of one run.
pub struct EventLog {
    run_id: String,
    executor: Arc<Executor>,
    sink: Mutex<Sink>,
    /// Lines not yet appended to the staging copy.
    pending: Mutex<Vec<String>>,
}

impl EventLog {
    pub fn new(run_id: &str, executor: Arc<Executor>, sink: Sink) -> EventLog {
        EventLog {
            run_id: run_id.to_string(),
            executor,
            sink: Mutex::new(sink),
            pending: Mutex::new(Vec::new()),
        }
    }

    /// Opens `path` for appending (its directory created), for the CLI's `--event-log`.
    pub fn file_sink(path: &std::path::Path) -> std::io::Result<Sink> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Sink::File(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ))
    }

    /// Records an event now.
    pub fn record(&self, event: &LogEvent) {
        let line = event.line(&self.run_id, now()).to_string();
        {
            let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
            // The log is a record, not a control path: a failing sink must not stop the run.
            let _ = match &mut *sink {
                Sink::None => Ok(()),
                Sink::Stdout => writeln!(std::io::stdout(), "{line}"),
                Sink::File(f) => writeln!(f, "{line}"),
            };
        }
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line);
    }

    /// Appends what was recorded since the last flush to `{prefix}{run id}/log.ndjson` in
    /// the staging store. Objects cannot be appended to in S3: the copy is read and written
    /// whole, once per drive.
    pub async fn flush(&self, staging: &StagingStore, key: &str) -> Result<(), String> {
        let lines: Vec<String> =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if lines.is_empty() {
            return Ok(());
        }
        let mut body = staging
            .get_bytes(key, crate::staging::MAX_EVENT_LOG)
            .await
            .map_err(|e| format!("{key}: {e}"))?
            .map(|b| b.to_vec())
            .unwrap_or_default();
        for line in &lines {
            body.extend_from_slice(line.as_bytes());
            body.push(b'\n');
        }
        staging
            .put_bytes(key, Bytes::from(body))
            .await
            .map_err(|e| format!("{key}: {e}"))
    }

    fn file_url(&self, request: &Request) -> Option<String> {
        match &request.effect {
            Effect::StageFile {
                manifest_key,
                index,
                ..
            } => self.executor.cached_file_url(manifest_key, *index),
            _ => None,
        }
    }
}

/// `{prefix}{run id}/log.ndjson`.
pub fn staging_key(run: &SyncRun) -> String {
    format!("{}log.ndjson", run.spec.staging.run_prefix(&run.run_id))
}

impl Observer for EventLog {
    fn started(&self, _run: &SyncRun, request: &Request) {
        if let Some(event) = events::started(request, self.file_url(request).as_deref()) {
            self.record(&event);
        }
    }

    fn stepped(&self, before: &SyncRun, after: &SyncRun, request: &Request, result: &EffectResult) {
        let url = self.file_url(request);
        for event in events::stepped(before, request, result, after, url.as_deref(), now()) {
            self.record(&event);
        }
    }
}
