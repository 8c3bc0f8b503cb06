//! The operator's event log: what happened to a run, one JSON object per line, in the format
//! the SMART bulk-data-client writes (`exportId`, `timestamp`, `eventId`, `eventDetail`) —
//! the de-facto format Bulk Data pipelines already parse — with the same event ids and
//! details for the export and the downloads, and events of our own for staging, the import,
//! deletions and the run's end.
//!
//! Events are derived here, purely, from what the loop sees: a request being started, a result
//! and the runs before and after it. The runner supplies the two facts the core does not keep:
//! the time, and a file's URL (from the stored manifest; callers strip its query string, which
//! may hold a pre-signed signature).

use crate::bulk::FileKind;
use crate::effect::{Effect, EffectResult, Request};
use crate::state::{Phase, SyncState, Terminal};
use crate::time::Timestamp;
use crate::SyncRun;
use serde_json::{json, Value};

/// The version of this log's format: the bulk-data-client events as they are, plus ours
/// (`staging_complete`, `import_kickoff`, `import_complete`, `deletions_complete`,
/// `run_resumed`, `run_complete`).
pub const LOG_VERSION: u32 = 1;

/// One event.
#[derive(Clone, Debug, PartialEq)]
pub struct LogEvent {
    pub event_id: &'static str,
    pub detail: Value,
}

impl LogEvent {
    fn new(event_id: &'static str, detail: Value) -> Self {
        LogEvent { event_id, detail }
    }

    /// The log line's JSON object.
    pub fn line(&self, export_id: &str, at: Timestamp) -> Value {
        json!({
            "exportId": export_id,
            "timestamp": at.to_fhir_instant(),
            "eventId": self.event_id,
            "eventDetail": self.detail,
            "logVersion": LOG_VERSION,
        })
    }
}

/// A URL as the log may show it: without its query string and fragment (a pre-signed URL's
/// signature is a credential).
pub fn loggable_url(url: &str) -> String {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    url[..end].to_string()
}

/// The event of an effect being started: `download_request` for a file.
pub fn started(request: &Request, file_url: Option<&str>) -> Option<LogEvent> {
    match &request.effect {
        Effect::StageFile {
            kind, type_name, ..
        } => Some(LogEvent::new(
            "download_request",
            json!({
                "fileUrl": file_url.map(loggable_url),
                "itemType": kind.as_str(),
                "resourceType": type_name,
            }),
        )),
        _ => None,
    }
}

/// The events of an accepted result at `now`: `before` is the run the request was made from,
/// `after` the run the result produced.
pub fn stepped(
    before: &SyncRun,
    request: &Request,
    result: &EffectResult,
    after: &SyncRun,
    file_url: Option<&str>,
    now: Timestamp,
) -> Vec<LogEvent> {
    let mut out = Vec::new();
    match (&request.effect, result) {
        (Effect::KickoffExport(k), _) => {
            let (error_code, error_body) = match result {
                EffectResult::Failed(f) => (f.status(), Some(f.message.clone())),
                _ => (None, None),
            };
            let parameters: serde_json::Map<String, Value> = k
                .query
                .iter()
                .map(|(name, value)| (name.clone(), Value::String(value.clone())))
                .collect();
            out.push(LogEvent::new(
                "kickoff",
                json!({
                    "exportUrl": k.url,
                    "errorCode": error_code,
                    "errorBody": error_body,
                    "softwareName": null,
                    "softwareVersion": null,
                    "softwareReleaseDate": null,
                    "fhirVersion": null,
                    "requestParameters": parameters,
                }),
            ));
        }
        (
            Effect::PollExport { .. },
            EffectResult::ExportInProgress {
                progress,
                retry_after,
            },
        ) => out.push(LogEvent::new(
            "status_progress",
            json!({"body": null, "xProgress": progress, "retryAfter": retry_after}),
        )),
        (Effect::PollExport { .. }, EffectResult::Failed(f)) => out.push(LogEvent::new(
            "status_error",
            json!({
                "body": null,
                "code": f.status(),
                "message": f.message,
                "responseHeaders": null,
            }),
        )),
        (Effect::PollExport { .. }, EffectResult::ExportCompleted { digest }) => {
            let count = |kind| digest.files.iter().filter(|(k, _)| *k == kind).count();
            out.push(LogEvent::new(
                "status_complete",
                json!({
                    "transactionTime": digest.transaction_time,
                    "outputFileCount": count(FileKind::Output),
                    "deletedFileCount": count(FileKind::Deleted),
                    "errorFileCount": count(FileKind::Error),
                }),
            ));
            out.push(LogEvent::new(
                "manifest_complete",
                json!({
                    "transactionTime": digest.transaction_time,
                    "totalOutputFileCount": count(FileKind::Output),
                    "totalDeletedFileCount": count(FileKind::Deleted),
                    "totalErrorFileCount": count(FileKind::Error),
                    "totalManifests": 1,
                }),
            ));
        }
        (
            Effect::StageFile { .. },
            EffectResult::FileStaged {
                bytes, resources, ..
            },
        ) => out.push(LogEvent::new(
            "download_complete",
            json!({
                "fileUrl": file_url.map(loggable_url),
                "fileSize": bytes,
                "resourceCount": resources,
            }),
        )),
        (Effect::StageFile { .. }, EffectResult::Failed(f)) => out.push(LogEvent::new(
            "download_error",
            json!({
                "body": null,
                "code": f.status(),
                "fileUrl": file_url.map(loggable_url),
                "message": f.message,
                "responseHeaders": null,
            }),
        )),
        (
            Effect::KickoffImport {
                api, parameters, ..
            },
            _,
        ) => {
            let (job_url, error_code, message) = match result {
                EffectResult::ImportAccepted { job_url } => (Some(job_url.clone()), None, None),
                EffectResult::Failed(f) => (None, f.status(), Some(f.message.clone())),
                _ => (None, None, None),
            };
            let inputs = parameters
                .get("parameter")
                .and_then(Value::as_array)
                .map(|p| {
                    p.iter()
                        .filter(|e| matches!(e["name"].as_str(), Some("input" | "source")))
                        .count()
                })
                .unwrap_or(0);
            out.push(LogEvent::new(
                "import_kickoff",
                json!({
                    "pathlingApi": api.setting(),
                    "inputCount": inputs,
                    "jobUrl": job_url,
                    "errorCode": error_code,
                    "message": message,
                }),
            ));
        }
        (Effect::PollImport { job_url }, EffectResult::ImportCompleted { .. }) => {
            let succeeded = !after.failing();
            out.push(LogEvent::new(
                "import_complete",
                json!({"jobUrl": job_url, "succeeded": succeeded}),
            ));
        }
        _ => {}
    }
    // The end of a phase, seen in the step that leaves it.
    if let SyncState::StagingFiles(s) = &before.state {
        if !matches!(after.state, SyncState::StagingFiles(_)) {
            let (files, bytes, resources) = staged_counts(after).unwrap_or_else(|| {
                let t = &s.export.files;
                let files = t.count_of(None, crate::state::FileStatus::Staged) as u64;
                (files, t.bytes, t.resources_by_type.iter().sum())
            });
            out.push(LogEvent::new(
                "export_complete",
                json!({
                    "files": files,
                    "resources": resources,
                    "bytes": bytes,
                    "attachments": 0,
                    "duration": before.started_at.until(now),
                }),
            ));
            if !after.failing() {
                out.push(LogEvent::new(
                    "staging_complete",
                    json!({
                        "files": files,
                        "bytes": bytes,
                        "resources": resources,
                        "manifest": s.export.manifest_key.as_str(),
                    }),
                ));
            }
        }
    }
    if let SyncState::ApplyingDeletions(_) = &before.state {
        if !matches!(after.state, SyncState::ApplyingDeletions(_)) {
            if let SyncState::ApplyingDeletions(d) = &before.state {
                let (deleted, absent) = match result {
                    EffectResult::DeletionsApplied { deleted, absent } => (
                        d.deleted.saturating_add(*deleted),
                        d.absent.saturating_add(*absent),
                    ),
                    _ => (d.deleted, d.absent),
                };
                out.push(LogEvent::new(
                    "deletions_complete",
                    json!({"deleted": deleted, "alreadyAbsent": absent}),
                ));
            }
        }
    }
    if before.state.terminal().is_none() {
        if let Some(terminal) = after.state.terminal() {
            out.push(run_complete(&terminal));
        }
    }
    out
}

/// Files, bytes and resources staged, as the run after the end of staging records them.
fn staged_counts(run: &SyncRun) -> Option<(u64, u64, u64)> {
    let table = |e: &crate::state::Exported| {
        let t = &e.files;
        let files = t.count_of(None, crate::state::FileStatus::Staged) as u64;
        (files, t.bytes, t.resources_by_type.iter().sum())
    };
    let summary = |s: &crate::state::Summary| (u64::from(s.files_staged), s.bytes, s.resources);
    match &run.state {
        SyncState::KickingOffImport(s) => Some(table(&s.export)),
        SyncState::PollingImport(s) => Some(table(&s.export)),
        SyncState::ApplyingDeletions(s) => Some(table(&s.export)),
        SyncState::CleaningUp(c) => Some(match &c.then {
            Terminal::Succeeded(s) => summary(s),
            Terminal::Failed(f) => summary(&f.summary),
            Terminal::Cancelled(c) => summary(&c.summary),
        }),
        SyncState::Succeeded(s) => Some(summary(s)),
        SyncState::Failed(f) => Some(summary(&f.summary)),
        SyncState::Cancelled(c) => Some(summary(&c.summary)),
        SyncState::KickingOffExport(_)
        | SyncState::PollingExport(_)
        | SyncState::StagingFiles(_) => None,
    }
}

/// `run_complete`: how the run ended.
pub fn run_complete(terminal: &Terminal) -> LogEvent {
    let detail = match terminal {
        Terminal::Succeeded(s) => json!({"status": Phase::Succeeded.as_str(), "summary": s}),
        Terminal::Failed(f) => json!({
            "status": Phase::Failed.as_str(),
            "phase": f.phase,
            "reason": f.reason,
            "canRetry": f.resume.is_some(),
            "summary": f.summary,
        }),
        Terminal::Cancelled(c) => json!({
            "status": Phase::Cancelled.as_str(),
            "phase": c.phase,
            "reason": c.reason,
            "summary": c.summary,
        }),
    };
    LogEvent::new("run_complete", detail)
}

/// `run_resumed`: a runner continues a stored run (after a kill, an interruption, the end of
/// an invocation, or to retry it).
pub fn run_resumed(run: &SyncRun, retry: bool) -> LogEvent {
    LogEvent::new(
        "run_resumed",
        json!({"phase": run.state.name(), "seq": run.seq, "retry": retry}),
    )
}
