//! The transition function: [`SyncRun::next`] says what to do, [`SyncRun::step`] applies a
//! result. One exhaustive `match` per phase, no wildcard arms.

use crate::bulk::{FileKind, OutcomeSummary};
use crate::effect::*;
use crate::pathling::{import_parameters, is_wrong_generation, judge_import_answer, ImportInput};
use crate::retry::{
    classify, failure_delay_ms, patience_ms, poll_delay_ms, retry_limit, stable_hash, Failure,
    FailureKind, Verdict,
};
use crate::spec::{ImportMode, PathlingApi, PhasePolicy, RunSpec, SinceSpec};
use crate::state::*;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// Where the next incremental run starts: the `transactionTime` of the last successful run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    pub transaction_time: String,
    pub run_id: String,
}

/// One sync run: identity, the spec snapshotted at its start, and its state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncRun {
    pub run_id: String,
    /// Accepted inputs so far; stores use it for conditional writes.
    pub seq: u64,
    pub started_at: Timestamp,
    pub spec: RunSpec,
    /// The last successful run's mark (this run's own once it succeeds).
    pub watermark: Option<Watermark>,
    pub state: SyncState,
    /// When the run entered its current phase (for the phase durations the Lambda runners
    /// report); absent in runs stored before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_since: Option<Timestamp>,
    /// The schema version this run was stored with, when [`crate::persist::decode`] had to
    /// upgrade it (runners log that once); never stored.
    #[serde(default, skip_serializing)]
    pub upgraded_from: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error("run id {0:?} must be 1 to 64 characters of A-Z a-z 0-9 - _")]
    BadRunId(String),
    #[error(
        "the previous run's watermark {0:?} is not a FHIR instant, so it cannot become _since"
    )]
    BadWatermark(String),
}

/// The longest cancel reason a run keeps, in bytes: reasons may come from an execution input
/// anyone allowed to start one can write.
pub const MAX_REASON_BYTES: usize = 1024;

/// `text` without control characters, cut to [`MAX_REASON_BYTES`] at a character boundary.
pub fn bounded_reason(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_REASON_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

/// The three phases with a patience of their own, and the setting that overrides it.
#[derive(Clone, Copy)]
enum Patience {
    Export,
    Transfer,
    Import,
}

impl Patience {
    fn policy(self, spec: &RunSpec) -> &PhasePolicy {
        match self {
            Patience::Export => &spec.retry.export,
            Patience::Transfer => &spec.retry.transfer,
            Patience::Import => &spec.retry.import,
        }
    }
    fn key(self) -> &'static str {
        match self {
            Patience::Export => "EXPORT_TIMEOUT",
            Patience::Transfer => "TRANSFER_TIMEOUT",
            Patience::Import => "IMPORT_TIMEOUT",
        }
    }
}

/// How a run fails: [`SyncRun::fail`] builds the terminal from it.
struct Failing<'a> {
    phase: Phase,
    reason: String,
    summary: Summary,
    /// The export job to DELETE at the source first.
    cleanup: Option<&'a str>,
    cause: Option<&'a Failure>,
    resume: Option<ResumePoint>,
}

fn resume_point(from: ResumeFrom, export: &Exported) -> ResumePoint {
    ResumePoint {
        from,
        export: export.clone(),
        import_job: None,
        deleted: 0,
        absent: 0,
        export_kept: false,
        check_first: false,
    }
}

/// Files handed out per `Next::Run`, relative to the transfer concurrency: enough to keep
/// every slot busy, few enough that a crash repeats little.
const BATCH_PER_SLOT: usize = 4;

/// The most files of a phase that wait to retry before no fresh file is handed out (fewer
/// when a batch is smaller): what bounds the retry entries in the envelope.
pub const MAX_RETRYING: usize = 64;

/// The most files that may fail for good before staging stops and the run fails (a retry
/// continues it): a source that cannot serve this many files is broken, and each failed file
/// costs room in the envelope.
pub const MAX_FAILED_FILES: usize = 16;

impl SyncRun {
    /// Starts a run. `watermark` is the previous run's (for `SINCE=auto`).
    pub fn start(
        run_id: &str,
        spec: RunSpec,
        watermark: Option<Watermark>,
        now: Timestamp,
    ) -> Result<SyncRun, StartError> {
        let ok = !run_id.is_empty()
            && run_id.len() <= 64
            && run_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(StartError::BadRunId(run_id.to_string()));
        }
        let since = match &spec.export.since {
            SinceSpec::None => None,
            SinceSpec::At(s) => Some(s.clone()),
            SinceSpec::LastSuccess => watermark.as_ref().map(|w| w.transaction_time.clone()),
        };
        if let Some(w) = &watermark {
            if crate::time::parse_fhir_instant(&w.transaction_time).is_none() {
                return Err(StartError::BadWatermark(crate::bulk::truncate(
                    &w.transaction_time,
                    80,
                )));
            }
        }
        let deadline = now.plus_ms(patience_ms(&spec.retry.export));
        Ok(SyncRun {
            run_id: run_id.to_string(),
            seq: 0,
            started_at: now,
            spec,
            watermark,
            state: SyncState::KickingOffExport(KickingOffExport {
                since,
                retry: Retrying::default(),
                deadline,
                superseded_job: None,
            }),
            phase_since: Some(now),
            upgraded_from: None,
        })
    }

    /// A run whose export another party completed (the original tool's handlers: an earlier
    /// Lambda ran the export and hands over its manifest): it starts in the staging phase,
    /// with the manifest already stored at the spec's `manifest_key` for `run_id`.
    /// `status_url` names the export job, if known.
    pub fn from_manifest(
        run_id: &str,
        spec: RunSpec,
        status_url: &str,
        digest: ManifestDigest,
        now: Timestamp,
    ) -> Result<SyncRun, StartError> {
        let mut run = SyncRun::start(run_id, spec, None, now)?;
        let since = match &run.spec.export.since {
            SinceSpec::At(s) => Some(s.clone()),
            SinceSpec::None | SinceSpec::LastSuccess => None,
        };
        let polling = PollingExport {
            since,
            status_url: status_url.to_string(),
            polls: 0,
            progress: None,
            retry: Retrying::default(),
            deadline: now,
            throttled: false,
            resuming: None,
        };
        run.state = run.exported(&polling, digest, now);
        run.phase_since = Some(now);
        Ok(run)
    }

    /// A just-started run that first deletes `job`, the export job of the run it replaces.
    pub fn superseding(mut self, job: Option<String>) -> SyncRun {
        if let SyncState::KickingOffExport(k) = &mut self.state {
            k.superseded_job = job;
        }
        self
    }

    /// The export job this run holds at the source: one that is running or whose files are
    /// still wanted (a failed run that can be retried).
    pub fn export_job(&self) -> Option<&str> {
        match &self.state {
            SyncState::KickingOffExport(_) | SyncState::Succeeded(_) | SyncState::Cancelled(_) => {
                None
            }
            SyncState::PollingExport(s) => Some(&s.status_url),
            SyncState::StagingFiles(s) => Some(&s.export.status_url),
            SyncState::KickingOffImport(s) => Some(&s.export.status_url),
            SyncState::PollingImport(s) => Some(&s.export.status_url),
            SyncState::ApplyingDeletions(s) => Some(&s.export.status_url),
            SyncState::CleaningUp(s) => Some(&s.status_url),
            SyncState::Failed(f) => f
                .resume
                .as_ref()
                .filter(|r| r.export_kept)
                .map(|r| r.export.status_url.as_str()),
        }
    }

    pub fn is_done(&self) -> bool {
        self.state.terminal().is_some()
    }

    /// What the driver must do now. Pure: the same state and `now` give the same answer.
    pub fn next(&self, now: Timestamp) -> Next {
        let run_req = |effect: Effect| Next::Run {
            requests: vec![Request {
                id: EffectId::Run { seq: self.seq },
                effect,
            }],
        };
        let waiting = |retry: &Retrying, reason: &str| {
            retry
                .not_before
                .filter(|t| *t > now)
                .map(|until| Next::SleepUntil {
                    until,
                    // The cause goes with every retry line an operator reads.
                    reason: match &retry.last_error {
                        Some(cause) => format!("{reason} after: {cause}"),
                        None => reason.to_string(),
                    },
                })
        };
        match &self.state {
            SyncState::KickingOffExport(KickingOffExport {
                superseded_job: Some(job),
                ..
            }) => run_req(Effect::DeleteExportJob {
                status_url: job.clone(),
            }),
            SyncState::KickingOffExport(s) => waiting(&s.retry, "retrying the export kick-off")
                .unwrap_or_else(|| {
                    run_req(Effect::KickoffExport(Effect::export_kickoff(
                        &self.spec,
                        s.since.as_deref(),
                    )))
                }),
            SyncState::PollingExport(s) => waiting(&s.retry, "waiting for the export")
                .unwrap_or_else(|| {
                    run_req(Effect::PollExport {
                        status_url: s.status_url.clone(),
                        manifest_key: self.spec.staging.manifest_key(&self.run_id),
                    })
                }),
            SyncState::StagingFiles(s) => self.file_batch(
                &s.export,
                now,
                FileStatus::Pending,
                "retrying failed transfers",
                self.batch_limit(),
            ),
            SyncState::KickingOffImport(s) => waiting(&s.retry, "retrying the import kick-off")
                .unwrap_or_else(|| match s.api {
                    ApiState::Detecting => run_req(Effect::DetectPathling),
                    ApiState::Known { api } | ApiState::Guessed { api } => {
                        run_req(Effect::KickoffImport {
                            api,
                            parameters: self.import_parameters(&s.export, api),
                            replaces: s.replaces.clone(),
                        })
                    }
                }),
            SyncState::PollingImport(s) => waiting(&s.retry, "waiting for the import")
                .unwrap_or_else(|| {
                    run_req(Effect::PollImport {
                        job_url: s.job_url.clone(),
                    })
                }),
            SyncState::ApplyingDeletions(s) => self.file_batch(
                &s.export,
                now,
                FileStatus::Staged,
                "retrying deletions",
                self.batch_limit(),
            ),
            SyncState::CleaningUp(s) => run_req(Effect::DeleteExportJob {
                status_url: s.status_url.clone(),
            }),
            SyncState::Succeeded(s) => Next::Done {
                terminal: Terminal::Succeeded(s.clone()),
            },
            SyncState::Failed(f) => Next::Done {
                terminal: Terminal::Failed(f.clone()),
            },
            SyncState::Cancelled(c) => Next::Done {
                terminal: Terminal::Cancelled(c.clone()),
            },
        }
    }

    /// Files handed out per `Next::Run` to one worker.
    fn batch_limit(&self) -> usize {
        (self.spec.transfer.concurrency.max(1) as usize) * BATCH_PER_SLOT
    }

    /// The staging requests due now for a fan-out to parallel workers (a Step Functions
    /// Distributed Map): as many as may be retrying at once ([`MAX_RETRYING`]), so that even
    /// a batch that fails as a whole keeps the envelope's retry entries bounded. Empty outside
    /// staging or when nothing is due. Their results are stepped like any other.
    pub fn fan_out_batch(&self, now: Timestamp) -> Vec<Request> {
        let SyncState::StagingFiles(s) = &self.state else {
            return Vec::new();
        };
        match self.file_batch(&s.export, now, FileStatus::Pending, "", MAX_RETRYING) {
            Next::Run { requests } => requests,
            _ => Vec::new(),
        }
    }

    /// Staging (`Pending` output/deleted/error files) or deletions (`Staged` deleted files),
    /// at most `limit` at once.
    fn file_batch(
        &self,
        export: &Exported,
        now: Timestamp,
        want: FileStatus,
        reason: &str,
        limit: usize,
    ) -> Next {
        let deleting = want == FileStatus::Staged;
        let kind = deleting.then_some(FileKind::Deleted);
        let table = &export.files;
        let in_phase = |r: &FileRow| r.status == want && kind.is_none_or(|k| k == r.kind);
        // Files waiting to retry hold back fresh ones: at most `hold` files are retrying or
        // fresh in a batch. A source outage then costs a bounded number of retry entries and
        // status holes in the envelope instead of one per file, and a failing source is not
        // hammered.
        let hold = limit.min(MAX_RETRYING);
        let retrying: Vec<(u32, FileRow)> = table.failing().filter(|(_, r)| in_phase(r)).collect();
        let fresh_allowed = hold.saturating_sub(retrying.len());
        let due_retries = retrying
            .iter()
            .filter(|(_, r)| r.not_before <= now)
            .copied();
        let fresh = table
            .with_status(0, kind, want)
            .filter(|(_, r)| r.failures == 0)
            .take(fresh_allowed);
        let mut due: Vec<(u32, FileRow)> = due_retries.chain(fresh).collect();
        due.sort_unstable_by_key(|(i, _)| *i);
        due.truncate(limit);
        let requests: Vec<Request> = due
            .into_iter()
            .map(|(index, r)| {
                let key = self.file_key(export, index);
                let effect = if deleting {
                    Effect::ApplyDeletions { index, key }
                } else {
                    Effect::StageFile {
                        manifest_key: export.manifest_key.clone(),
                        index,
                        kind: r.kind,
                        type_name: table.type_name(&r).to_string(),
                        key,
                        validate: self.spec.transfer.validate,
                    }
                };
                let attempt = r.failures;
                Request {
                    id: if deleting {
                        EffectId::Deletions { index, attempt }
                    } else {
                        EffectId::File { index, attempt }
                    },
                    effect,
                }
            })
            .collect();
        if !requests.is_empty() {
            return Next::Run { requests };
        }
        // Nothing due: every file of the phase is waiting to retry.
        match retrying.iter().min_by_key(|(_, r)| r.not_before) {
            Some((index, row)) => Next::SleepUntil {
                until: row.not_before,
                reason: match table.error(*index) {
                    Some(cause) => {
                        format!("{reason} ({} after: {cause})", table.describe(*index))
                    }
                    None => reason.to_string(),
                },
            },
            // Unreachable by construction: `step` leaves the phase when its last file settles.
            None => Next::SleepUntil {
                until: now.plus_secs(60),
                reason: "inconsistent state: no file left in this phase".into(),
            },
        }
    }

    pub fn file_key(&self, export: &Exported, index: u32) -> crate::staging::StagingKey {
        let (kind, type_name) = export
            .files
            .row(index)
            .map(|r| (r.kind, export.files.type_name(&r)))
            .unwrap_or((FileKind::Output, ""));
        self.spec
            .staging
            .file_key(&self.run_id, index, kind, type_name)
    }

    /// Every staged `output[]` file, as `$import` inputs.
    pub fn import_inputs(&self, export: &Exported, api: PathlingApi) -> Vec<ImportInput> {
        export
            .files
            .with_status(0, Some(FileKind::Output), FileStatus::Staged)
            .map(|(i, r)| ImportInput {
                type_name: export.files.type_name(&r).to_string(),
                url: self.spec.staging.import_url(&self.file_key(export, i), api),
            })
            .collect()
    }

    fn import_parameters(&self, export: &Exported, api: PathlingApi) -> serde_json::Value {
        import_parameters(
            api,
            self.spec.target.import_mode,
            &self.import_inputs(export, api),
        )
    }

    /// Applies one input. A refused input leaves the run unchanged.
    ///
    /// Ended runs refuse everything, except that a failed run with a
    /// [`ResumePoint`] takes [`Input::Retry`] (continue it) and [`Input::Cancel`] (abandon it).
    pub fn step(&self, input: Input, now: Timestamp) -> Result<SyncRun, Rejected> {
        let mut next = self.clone();
        let state = match input {
            Input::Retry { spec } => {
                next.spec = self.retry_spec(&spec)?;
                next.retried(now)?
            }
            Input::Cancel { reason } if self.resumable().is_some() => {
                self.abandon(bounded_reason(&reason))
            }
            _ if self.is_done() => return Err(Rejected::Ended),
            Input::Cancel { reason } => self.cancel(bounded_reason(&reason)),
            Input::Sending { id } => self.sending_state(id, now)?,
            Input::Completed { id, result } => self.complete(id, result, now)?,
        };
        next.seq = self.seq.saturating_add(1);
        next.upgraded_from = None;
        if let SyncState::Succeeded(summary) = &state {
            if let Some(tt) = &summary.transaction_time {
                next.watermark = Some(Watermark {
                    transaction_time: tt.clone(),
                    run_id: self.run_id.clone(),
                });
            }
        }
        if state.phase() != self.state.phase() {
            next.phase_since = Some(now);
        }
        next.state = state;
        Ok(next)
    }

    /// Whether the run has failed, or is cleaning up after a failure.
    pub fn failing(&self) -> bool {
        match &self.state {
            SyncState::Failed(_) => true,
            SyncState::CleaningUp(c) => matches!(c.then, Terminal::Failed(_)),
            _ => false,
        }
    }

    /// Why the run failed, when it did.
    pub fn failure(&self) -> Option<&FailedRun> {
        match &self.state {
            SyncState::Failed(f) => Some(f),
            _ => None,
        }
    }

    /// The resume point of a failed run that can be retried.
    pub fn resumable(&self) -> Option<&ResumePoint> {
        self.failure().and_then(|f| f.resume.as_deref())
    }

    /// Whether the driver must persist [`Input::Sending`] before performing `request`: an
    /// `$import` kick-off with `IMPORT_MODE=append`, which imports the data twice if it is
    /// repeated after Pathling accepted it.
    pub fn record_before(&self, request: &Request) -> bool {
        matches!(&self.state, SyncState::KickingOffImport(s) if self.must_record(s))
            && matches!(request.effect, Effect::KickoffImport { .. })
            && request.id == (EffectId::Run { seq: self.seq })
    }

    fn must_record(&self, s: &KickingOffImport) -> bool {
        self.spec.target.import_mode == ImportMode::Append
            && matches!(s.api, ApiState::Known { .. } | ApiState::Guessed { .. })
    }

    /// Steps [`Input::Sending`] for `request` and returns the run to persist before
    /// performing it, with the request as the run now expects it (under the new `seq`), or
    /// `None` when the run no longer wants it performed (the answer to an earlier send was
    /// lost, and the run stopped).
    pub fn sending(
        &self,
        request: &Request,
        now: Timestamp,
    ) -> Result<(SyncRun, Option<Request>), Rejected> {
        let next = self.step(Input::Sending { id: request.id }, now)?;
        let still = matches!(&next.state, SyncState::KickingOffImport(s) if s.sent_at.is_some());
        let request = still.then(|| Request {
            id: EffectId::Run { seq: next.seq },
            effect: request.effect.clone(),
        });
        Ok((next, request))
    }

    fn sending_state(&self, id: EffectId, now: Timestamp) -> Result<SyncState, Rejected> {
        let SyncState::KickingOffImport(s) = &self.state else {
            return Err(Rejected::Stale { got: id });
        };
        if id != (EffectId::Run { seq: self.seq }) {
            return Err(Rejected::Stale { got: id });
        }
        if !self.must_record(s) {
            return Err(Rejected::Mismatch {
                result: "sending".into(),
                phase: Phase::KickingOffImport,
            });
        }
        let Some(sent_at) = s.sent_at else {
            return Ok(SyncState::KickingOffImport(KickingOffImport {
                sent_at: Some(now),
                ..s.clone()
            }));
        };
        Ok(self.fail(Failing {
            phase: Phase::KickingOffImport,
            reason: format!(
                "the answer to the $import kick-off sent at {sent_at} was lost (the process \
                 stopped or the connection dropped), and with IMPORT_MODE=append sending it \
                 again would import the data twice if Pathling had accepted it. Check \
                 Pathling for an import job started then: if there is none, retry this run \
                 explicitly (`pathling-import retry`, or invoke with {{\"retry\": true}}); if \
                 there is, let it finish, then abandon this run (`--fresh`, or a cancel \
                 invocation) and start the next. Schedules and plain reruns leave it alone"
            ),
            summary: self.import_summary(&s.export, None),
            cleanup: Some(&s.export.status_url),
            cause: None,
            resume: Some(ResumePoint {
                check_first: true,
                ..resume_point(ResumeFrom::KickingOffImport, &s.export)
            }),
        }))
    }

    /// The spec a retried run continues with: the import, retry and transfer settings may
    /// have been corrected; what defines the export and the bound settings stay as recorded.
    fn retry_spec(&self, current: &RunSpec) -> Result<RunSpec, Rejected> {
        if self.resumable().is_none() {
            return Err(Rejected::NotRetryable {
                phase: self.state.phase(),
            });
        }
        let mut spec = self.spec.clone();
        spec.target.import_mode = current.target.import_mode;
        spec.target.api = current.target.api;
        spec.target.apply_deletions = current.target.apply_deletions;
        spec.retry = current.retry.clone();
        spec.transfer = current.transfer.clone();
        Ok(spec)
    }

    /// The state a retry continues in (`self.spec` is already the retried run's).
    fn retried(&self, now: Timestamp) -> Result<SyncState, Rejected> {
        let Some(point) = self.resumable() else {
            return Err(Rejected::NotRetryable {
                phase: self.state.phase(),
            });
        };
        let mut export = point.export.clone();
        Ok(match point.from {
            // Ask the source first whether the export still stands (pre-signed file URLs
            // expire, and so do exports): see `PollingExport::resuming`.
            ResumeFrom::StagingFiles => SyncState::PollingExport(PollingExport {
                since: export.since.clone(),
                status_url: export.status_url.clone(),
                polls: 0,
                progress: None,
                retry: Retrying::default(),
                deadline: now.plus_ms(patience_ms(&self.spec.retry.export)),
                throttled: false,
                resuming: Some(Box::new(export)),
            }),
            ResumeFrom::KickingOffImport => match self.import_kickoff(export, now) {
                SyncState::KickingOffImport(k) => SyncState::KickingOffImport(KickingOffImport {
                    replaces: point.import_job.clone(),
                    ..k
                }),
                other => other,
            },
            ResumeFrom::ApplyingDeletions => {
                let retrying: Vec<u32> = export
                    .files
                    .failing()
                    .filter(|(_, r)| r.kind == FileKind::Deleted && r.status == FileStatus::Staged)
                    .map(|(i, _)| i)
                    .collect();
                for index in retrying {
                    export.files.update(index, |row| {
                        row.failures = 0;
                        row.not_before = Timestamp::ZERO;
                    });
                }
                export.files.forget_errors();
                SyncState::ApplyingDeletions(ApplyingDeletions {
                    export,
                    import_job: point.import_job.clone(),
                    deleted: point.deleted,
                    absent: point.absent,
                })
            }
        })
    }

    /// Gives up on a failed run that could have been retried; a kept export job is deleted.
    fn abandon(&self, reason: String) -> SyncState {
        let (summary, kept) = match &self.state {
            SyncState::Failed(f) => (
                f.summary.clone(),
                f.resume
                    .as_ref()
                    .filter(|r| r.export_kept)
                    .map(|r| r.export.status_url.clone()),
            ),
            _ => (Summary::default(), None),
        };
        let cancelled = Terminal::Cancelled(CancelledRun {
            phase: self.state.phase(),
            reason,
            summary,
        });
        match kept {
            Some(status_url) => self.cleanup_then(&status_url, cancelled),
            None => cancelled.into_state(),
        }
    }

    fn cancel(&self, reason: String) -> SyncState {
        let phase = self.state.phase();
        let (status_url, summary) = match &self.state {
            SyncState::KickingOffExport(_) => (None, Summary::default()),
            SyncState::PollingExport(s) => (Some(s.status_url.clone()), Summary::default()),
            SyncState::StagingFiles(s) => (Some(s.export.status_url.clone()), summarise(&s.export)),
            SyncState::KickingOffImport(s) => {
                (Some(s.export.status_url.clone()), summarise(&s.export))
            }
            SyncState::PollingImport(s) => {
                (Some(s.export.status_url.clone()), summarise(&s.export))
            }
            SyncState::ApplyingDeletions(s) => {
                (Some(s.export.status_url.clone()), summarise(&s.export))
            }
            // Already on the way out: stop the best-effort clean-up.
            SyncState::CleaningUp(s) => return s.then.clone().into_state(),
            SyncState::Succeeded(_) | SyncState::Failed(_) | SyncState::Cancelled(_) => {
                return self.state.clone()
            }
        };
        let cancelled = Terminal::Cancelled(CancelledRun {
            phase,
            reason,
            summary,
        });
        match status_url {
            Some(status_url) => SyncState::CleaningUp(CleaningUp {
                status_url,
                then: cancelled,
            }),
            None => cancelled.into_state(),
        }
    }

    fn jitter_key(&self, op: &str, index: u32) -> u64 {
        stable_hash(&[self.run_id.as_bytes(), op.as_bytes(), &index.to_le_bytes()])
    }

    /// Reschedules a run-level operation after a failure, or says why the phase must fail.
    fn retry_after_failure(
        &self,
        retry: &Retrying,
        patience: Patience,
        deadline: Timestamp,
        failure: &Failure,
        op: &str,
        now: Timestamp,
    ) -> Result<Retrying, String> {
        if classify(failure) == Verdict::Permanent {
            return Err(failure.to_string());
        }
        let policy = patience.policy(&self.spec);
        let failures = retry.failures.saturating_add(1);
        if failures > retry_limit(failure, policy) {
            return Err(format!("gave up after {failures} attempt(s): {failure}"));
        }
        if now >= deadline {
            return Err(format!(
                "gave up: the phase took longer than its patience ({} s; {} sets it): {failure}",
                patience_ms(policy) / 1000,
                patience.key()
            ));
        }
        let delay = failure_delay_ms(
            policy,
            failures,
            self.jitter_key(op, 0),
            failure,
            self.spec.retry.retry_after_max_ms,
            now,
        );
        Ok(Retrying {
            failures,
            not_before: Some(now.plus_ms(delay).min(deadline)),
            last_error: Some(crate::bulk::truncate(&failure.to_string(), 300)),
        })
    }

    /// Schedules the next poll of a running job, or says it took too long.
    #[allow(clippy::too_many_arguments)]
    fn next_poll(
        &self,
        polls: u32,
        patience: Patience,
        deadline: Timestamp,
        retry_after: Option<&str>,
        throttled: bool,
        what: &str,
        now: Timestamp,
    ) -> Result<Retrying, String> {
        let policy = patience.policy(&self.spec);
        if now >= deadline {
            return Err(format!(
                "{what} did not complete within {} s ({} polls); set {} to wait longer",
                patience_ms(policy) / 1000,
                polls.saturating_add(1),
                patience.key()
            ));
        }
        let delay = poll_delay_ms(
            policy,
            polls,
            retry_after,
            self.spec.retry.retry_after_max_ms,
            now,
            throttled,
        );
        Ok(Retrying {
            failures: 0,
            not_before: Some(now.plus_ms(delay).min(deadline)),
            last_error: None,
        })
    }

    fn complete(
        &self,
        id: EffectId,
        result: EffectResult,
        now: Timestamp,
    ) -> Result<SyncState, Rejected> {
        let run_level = |id: EffectId| -> Result<(), Rejected> {
            if id == (EffectId::Run { seq: self.seq }) {
                Ok(())
            } else {
                Err(Rejected::Stale { got: id })
            }
        };
        let mismatch = |phase: Phase, result: &EffectResult| Rejected::Mismatch {
            result: result_name(result).to_string(),
            phase,
        };
        let spec = &self.spec;
        match &self.state {
            SyncState::KickingOffExport(s) if s.superseded_job.is_some() => {
                run_level(id)?;
                match result {
                    // Best effort, as any clean-up: the old job expires at the source anyway.
                    EffectResult::ExportJobDeleted | EffectResult::Failed(_) => {
                        Ok(SyncState::KickingOffExport(KickingOffExport {
                            superseded_job: None,
                            ..s.clone()
                        }))
                    }
                    other => Err(mismatch(Phase::KickingOffExport, &other)),
                }
            }
            SyncState::KickingOffExport(s) => {
                run_level(id)?;
                match result {
                    EffectResult::ExportAccepted { status_url } => {
                        if crate::bulk::origin_of(&status_url).is_none() {
                            return Ok(self.fail(Failing {
                                phase: Phase::KickingOffExport,
                                reason: format!("the source answered 202 with Content-Location {:?}, which is not an absolute http(s) URL", crate::bulk::truncate(&status_url, 200)),
                                summary: Summary::default(),
                                cleanup: None,
                                cause: None,
                                resume: None,
                            }));
                        }
                        Ok(SyncState::PollingExport(PollingExport {
                            since: s.since.clone(),
                            status_url,
                            polls: 0,
                            progress: None,
                            retry: Retrying::default(),
                            deadline: s.deadline,
                            throttled: false,
                            resuming: None,
                        }))
                    }
                    EffectResult::Failed(f) => {
                        match self.retry_after_failure(
                            &s.retry,
                            Patience::Export,
                            s.deadline,
                            &f,
                            "kickoff-export",
                            now,
                        ) {
                            Ok(retry) => Ok(SyncState::KickingOffExport(KickingOffExport {
                                retry,
                                ..s.clone()
                            })),
                            Err(reason) => Ok(self.fail(Failing {
                                phase: Phase::KickingOffExport,
                                reason: format!("export kick-off failed: {reason}"),
                                summary: Summary::default(),
                                cleanup: None,
                                cause: Some(&f),
                                resume: None,
                            })),
                        }
                    }
                    other => Err(mismatch(Phase::KickingOffExport, &other)),
                }
            }
            SyncState::PollingExport(s) => {
                run_level(id)?;
                match result {
                    EffectResult::ExportInProgress {
                        progress,
                        retry_after,
                    } => {
                        match self.next_poll(
                            s.polls,
                            Patience::Export,
                            s.deadline,
                            retry_after.as_deref(),
                            s.throttled,
                            "the export",
                            now,
                        ) {
                            Ok(retry) => Ok(SyncState::PollingExport(PollingExport {
                                polls: s.polls.saturating_add(1),
                                progress: progress.map(|p| crate::bulk::truncate(&p, 200)),
                                retry,
                                ..s.clone()
                            })),
                            Err(reason) => Ok(self.fail(Failing {
                                phase: Phase::PollingExport,
                                reason,
                                summary: Summary::default(),
                                cleanup: Some(&s.status_url),
                                cause: None,
                                resume: None,
                            })),
                        }
                    }
                    EffectResult::ExportCompleted { digest } => Ok(self.exported(s, digest, now)),
                    // A retried run whose export is gone at the source: export again.
                    EffectResult::Failed(f)
                        if s.resuming.is_some() && matches!(f.status(), Some(404 | 410)) =>
                    {
                        Ok(SyncState::KickingOffExport(KickingOffExport {
                            since: s.since.clone(),
                            retry: Retrying::default(),
                            deadline: now.plus_ms(patience_ms(&spec.retry.export)),
                            superseded_job: None,
                        }))
                    }
                    EffectResult::Failed(f) => {
                        match self.retry_after_failure(
                            &s.retry,
                            Patience::Export,
                            s.deadline,
                            &f,
                            "poll-export",
                            now,
                        ) {
                            Ok(retry) => Ok(SyncState::PollingExport(PollingExport {
                                retry,
                                throttled: s.throttled || f.status() == Some(429),
                                ..s.clone()
                            })),
                            Err(reason) => Ok(self.fail(Failing {
                                phase: Phase::PollingExport,
                                reason: format!("export status check failed: {reason}"),
                                summary: Summary::default(),
                                cleanup: Some(&s.status_url),
                                cause: Some(&f),
                                resume: None,
                            })),
                        }
                    }
                    other => Err(mismatch(Phase::PollingExport, &other)),
                }
            }
            SyncState::StagingFiles(s) => {
                let index = self.file_id(&s.export, id, FileStatus::Pending)?;
                let mut export = s.export.clone();
                match result {
                    EffectResult::FileStaged {
                        bytes,
                        resources,
                        outcomes,
                        ..
                    } => {
                        let table = &mut export.files;
                        // Staging retries are over: deletions count their own attempts, and a
                        // staged row costs nothing in the envelope's retry map.
                        table.update(index, |row| {
                            row.status = FileStatus::Staged;
                            row.failures = 0;
                            row.not_before = Timestamp::ZERO;
                        });
                        let Some(row) = table.row(index) else {
                            return Err(Rejected::Stale { got: id });
                        };
                        let (kind, type_idx) = (row.kind, usize::from(row.type_idx));
                        table.forget_error(index);
                        table.bytes = table.bytes.saturating_add(bytes);
                        if kind == FileKind::Output {
                            if let Some(n) = table.resources_by_type.get_mut(type_idx) {
                                *n = n.saturating_add(resources);
                            }
                        }
                        if let Some(o) = outcomes {
                            export.source_errors.merge(&o);
                        }
                        Ok(self.after_staging_step(export, s.failed.as_ref(), now))
                    }
                    EffectResult::Failed(f) if f.kind == FailureKind::Paused => {
                        // Progress, not a failure: the file stays due (it was, to be handed
                        // out), and the patience restarts as if a file had been staged.
                        Ok(SyncState::StagingFiles(StagingFiles {
                            export,
                            stall_deadline: now.plus_ms(patience_ms(&spec.retry.transfer)),
                            failed: s.failed.clone(),
                        }))
                    }
                    EffectResult::Failed(f) => {
                        let Some(row) = export.files.row(index) else {
                            return Err(Rejected::Stale { got: id });
                        };
                        let failures = row.failures.saturating_add(1);
                        let give_up = if classify(&f) == Verdict::Permanent {
                            Some(f.to_string())
                        } else if failures > retry_limit(&f, &spec.retry.transfer) {
                            Some(format!("gave up after {failures} attempt(s): {f}"))
                        } else if now >= s.stall_deadline {
                            Some(format!(
                                "no file was staged for {} s ({} sets this patience): {f}",
                                patience_ms(&spec.retry.transfer) / 1000,
                                Patience::Transfer.key()
                            ))
                        } else {
                            None
                        };
                        if let Some(reason) = give_up {
                            export.files.update(index, |r| {
                                r.failures = failures;
                                r.status = FileStatus::Failed;
                            });
                            export.files.note_error(index, &reason);
                            // The staging store failing is every file's problem: stop now. A
                            // file the source cannot serve is its own: the others go on, so
                            // that a retry has only the failed ones left to stage, until so
                            // many failed that the source is plainly broken.
                            let store_failed =
                                matches!(f.kind, FailureKind::Storage { .. } | FailureKind::Local);
                            let pending = export.files.count_of(None, FileStatus::Pending) > 0;
                            let too_many =
                                export.files.count_of(None, FileStatus::Failed) >= MAX_FAILED_FILES;
                            let first = s.failed.clone().unwrap_or(f);
                            if pending && !store_failed && !too_many {
                                return Ok(SyncState::StagingFiles(StagingFiles {
                                    export,
                                    stall_deadline: s.stall_deadline,
                                    failed: Some(first),
                                }));
                            }
                            return Ok(self.staging_failed(export, Some(&first)));
                        }
                        export.files.note_error(index, &f.to_string());
                        let delay = failure_delay_ms(
                            &spec.retry.transfer,
                            failures,
                            self.jitter_key("stage", index),
                            &f,
                            spec.retry.retry_after_max_ms,
                            now,
                        );
                        export.files.update(index, |r| {
                            r.failures = failures;
                            r.not_before = now.plus_ms(delay).min(s.stall_deadline);
                        });
                        Ok(SyncState::StagingFiles(StagingFiles {
                            export,
                            stall_deadline: s.stall_deadline,
                            failed: s.failed.clone(),
                        }))
                    }
                    other => Err(mismatch(Phase::StagingFiles, &other)),
                }
            }
            SyncState::KickingOffImport(s) => {
                run_level(id)?;
                self.kicking_off_import(s, result, now)
            }
            SyncState::PollingImport(s) => {
                run_level(id)?;
                let failed = |reason: String, cause: Option<&Failure>| {
                    // Unless Pathling said the job failed, it may have imported the data: with
                    // IMPORT_MODE=append a retry imports it twice, so someone checks first.
                    let job_failed = cause.is_some_and(|f| {
                        matches!(
                            f.kind,
                            FailureKind::Http { status, outcome: true, .. }
                                if !matches!(status, 404 | 410)
                        )
                    });
                    let check_first =
                        self.spec.target.import_mode == ImportMode::Append && !job_failed;
                    self.fail(Failing {
                        phase: Phase::PollingImport,
                        reason,
                        summary: self.import_summary(&s.export, Some(&s.job_url)),
                        cleanup: Some(&s.export.status_url),
                        cause,
                        resume: Some(ResumePoint {
                            import_job: Some(s.job_url.clone()),
                            check_first,
                            ..resume_point(ResumeFrom::KickingOffImport, &s.export)
                        }),
                    })
                };
                match result {
                    EffectResult::ImportInProgress {
                        progress,
                        retry_after,
                    } => {
                        match self.next_poll(
                            s.polls,
                            Patience::Import,
                            s.deadline,
                            retry_after.as_deref(),
                            s.throttled,
                            "the import",
                            now,
                        ) {
                            Ok(retry) => Ok(SyncState::PollingImport(PollingImport {
                                polls: s.polls.saturating_add(1),
                                progress: progress.map(|p| crate::bulk::truncate(&p, 200)),
                                retry,
                                ..s.clone()
                            })),
                            Err(reason) => Ok(failed(reason, None)),
                        }
                    }
                    EffectResult::ImportCompleted { answer } => {
                        match judge_import_answer(&answer) {
                            Ok(()) => Ok(self.after_import(s.export.clone(), Some(&s.job_url))),
                            Err(reason) => {
                                let cause = Failure::new(FailureKind::Undecodable, reason.clone());
                                Ok(failed(
                                    format!("the import did not succeed: {reason}"),
                                    Some(&cause),
                                ))
                            }
                        }
                    }
                    EffectResult::Failed(f) => {
                        match self.retry_after_failure(
                            &s.retry,
                            Patience::Import,
                            s.deadline,
                            &f,
                            "poll-import",
                            now,
                        ) {
                            Ok(retry) => Ok(SyncState::PollingImport(PollingImport {
                                retry,
                                throttled: s.throttled || f.status() == Some(429),
                                ..s.clone()
                            })),
                            Err(reason) => Ok(failed(format!("import failed: {reason}"), Some(&f))),
                        }
                    }
                    other => Err(mismatch(Phase::PollingImport, &other)),
                }
            }
            SyncState::ApplyingDeletions(s) => {
                let index = self.file_id(&s.export, id, FileStatus::Staged)?;
                let mut next = s.clone();
                match result {
                    EffectResult::DeletionsApplied { deleted, absent } => {
                        next.export
                            .files
                            .update(index, |r| r.status = FileStatus::Applied);
                        next.export.files.forget_error(index);
                        next.deleted = next.deleted.saturating_add(deleted);
                        next.absent = next.absent.saturating_add(absent);
                        let pending = next
                            .export
                            .files
                            .count_of(Some(FileKind::Deleted), FileStatus::Staged)
                            > 0;
                        if pending {
                            return Ok(SyncState::ApplyingDeletions(next));
                        }
                        let mut summary =
                            self.completed_summary(&next.export, next.import_job.as_deref());
                        summary.deleted = next.deleted;
                        summary.already_absent = next.absent;
                        summary.nothing_to_import = next.import_job.is_none();
                        Ok(
                            self.cleanup_then(
                                &next.export.status_url,
                                Terminal::Succeeded(summary),
                            ),
                        )
                    }
                    EffectResult::Failed(f) => {
                        let failures = next
                            .export
                            .files
                            .row(index)
                            .map_or(0, |r| r.failures)
                            .saturating_add(1);
                        let what = next.export.files.describe(index);
                        next.export.files.note_error(index, &f.to_string());
                        if classify(&f) == Verdict::Permanent
                            || failures > retry_limit(&f, &spec.retry.import)
                        {
                            let mut summary =
                                self.completed_summary(&next.export, next.import_job.as_deref());
                            summary.deleted = next.deleted;
                            summary.already_absent = next.absent;
                            let mut resume =
                                resume_point(ResumeFrom::ApplyingDeletions, &next.export);
                            resume.import_job = next.import_job.clone();
                            resume.deleted = next.deleted;
                            resume.absent = next.absent;
                            return Ok(self.fail(Failing {
                                phase: Phase::ApplyingDeletions,
                                reason: format!("could not apply the deletions of {what}: {f}"),
                                summary,
                                cleanup: Some(&next.export.status_url),
                                cause: Some(&f),
                                resume: Some(resume),
                            }));
                        }
                        let delay = failure_delay_ms(
                            &spec.retry.import,
                            failures,
                            self.jitter_key("delete", index),
                            &f,
                            spec.retry.retry_after_max_ms,
                            now,
                        );
                        next.export.files.update(index, |row| {
                            row.failures = failures;
                            row.not_before = now.plus_ms(delay);
                        });
                        Ok(SyncState::ApplyingDeletions(next))
                    }
                    other => Err(mismatch(Phase::ApplyingDeletions, &other)),
                }
            }
            SyncState::CleaningUp(s) => {
                run_level(id)?;
                match result {
                    // Best effort: a failed DELETE does not change how the run ended.
                    EffectResult::ExportJobDeleted | EffectResult::Failed(_) => {
                        Ok(s.then.clone().into_state())
                    }
                    other => Err(mismatch(Phase::CleaningUp, &other)),
                }
            }
            SyncState::Succeeded(_) | SyncState::Failed(_) | SyncState::Cancelled(_) => {
                Err(Rejected::Ended)
            }
        }
    }

    /// Checks a per-file result's id against the table: the file must be in `want` status
    /// and the attempt must be its current one.
    fn file_id(&self, export: &Exported, id: EffectId, want: FileStatus) -> Result<u32, Rejected> {
        let deleting = want == FileStatus::Staged;
        let (index, attempt) = match id {
            EffectId::File { index, attempt } if !deleting => (index, attempt),
            EffectId::Deletions { index, attempt } if deleting => (index, attempt),
            EffectId::File { .. } | EffectId::Deletions { .. } | EffectId::Run { .. } => {
                return Err(Rejected::Stale { got: id })
            }
        };
        let ok = export.files.row(index).is_some_and(|r| {
            r.status == want && r.failures == attempt && (!deleting || r.kind == FileKind::Deleted)
        });
        if ok {
            Ok(index)
        } else {
            Err(Rejected::Stale { got: id })
        }
    }

    fn exported(&self, s: &PollingExport, digest: ManifestDigest, now: Timestamp) -> SyncState {
        if let Some(previous) = s.resuming.as_deref() {
            // The same files in the same order, their URLs too when both runs know them: a
            // staged index must never stand for another file of the same type.
            let same_urls = match (previous.files_hash, digest.files_hash) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            };
            let same = same_urls
                && previous.transaction_time == digest.transaction_time
                && previous.files.len() == digest.files.len()
                && previous
                    .files
                    .iter()
                    .zip(&digest.files)
                    .all(|(row, (kind, type_name))| {
                        row.kind == *kind && previous.files.type_name(&row) == type_name
                    });
            if same {
                let mut export = previous.clone();
                export.files_hash = digest.files_hash.or(previous.files_hash);
                // Failed and retrying files start over; only they have failures to forget.
                let failing: Vec<u32> = export.files.failing().map(|(i, _)| i).collect();
                for index in failing {
                    export.files.update(index, |row| {
                        if row.status == FileStatus::Failed {
                            row.status = FileStatus::Pending;
                        }
                        if row.status == FileStatus::Pending {
                            row.failures = 0;
                            row.not_before = Timestamp::ZERO;
                        }
                    });
                }
                export.files.forget_errors();
                return self.after_staging_step(export, None, now);
            }
            // Another manifest for the same job (the source re-ran it): stage it all anew.
        }
        let export = Exported {
            since: s.since.clone(),
            status_url: s.status_url.clone(),
            transaction_time: digest.transaction_time,
            manifest_key: self.spec.staging.manifest_key(&self.run_id),
            files: FileTable::from_digest(&digest.files),
            source_errors: OutcomeSummary::default(),
            duplicate_urls: digest.duplicates,
            files_hash: digest.files_hash,
        };
        self.after_staging_step(export, None, now)
    }

    /// Stays in staging while files are pending (a staged file renews the stall deadline);
    /// otherwise moves on.
    fn after_staging_step(
        &self,
        export: Exported,
        failed: Option<&Failure>,
        now: Timestamp,
    ) -> SyncState {
        if export.files.count_of(None, FileStatus::Pending) > 0 {
            return SyncState::StagingFiles(StagingFiles {
                export,
                stall_deadline: now.plus_ms(patience_ms(&self.spec.retry.transfer)),
                failed: failed.cloned(),
            });
        }
        if export.files.count_of(None, FileStatus::Failed) > 0 {
            return self.staging_failed(export, failed);
        }
        let errors = &export.source_errors;
        if errors.fatal > 0 {
            // The export itself is broken: retrying the import cannot help, so this failure
            // keeps no resume point (a new run exports again).
            let reason = format!(
                "the source reported {} fatal error(s) during the export: {}",
                errors.fatal,
                errors.samples.join("; ")
            );
            return self.fail(Failing {
                phase: Phase::StagingFiles,
                reason,
                summary: summarise(&export),
                cleanup: Some(&export.status_url),
                cause: None,
                resume: None,
            });
        }
        if export.files.count(FileKind::Output) > 0 {
            return self.import_kickoff(export, now);
        }
        self.after_import(export, None)
    }

    /// Staging ends with files that could not be staged: the run fails naming them, and keeps
    /// the export job so that a retry stages only those.
    fn staging_failed(&self, export: Exported, cause: Option<&Failure>) -> SyncState {
        let failed = export.files.count_of(None, FileStatus::Failed);
        let first = export
            .files
            .with_status(0, None, FileStatus::Failed)
            .next()
            .map_or(0, |(i, _)| i);
        let why = match export.files.error(first) {
            Some(why) => why.to_string(),
            None => "see the event log for its error".to_string(),
        };
        let more = match failed {
            0 | 1 => String::new(),
            n => format!(" (and {} other file(s))", n - 1),
        };
        let mut resume = resume_point(ResumeFrom::StagingFiles, &export);
        resume.export_kept = true;
        self.fail(Failing {
            phase: Phase::StagingFiles,
            reason: format!(
                "could not stage {}: {why}{more}",
                export.files.describe(first)
            ),
            summary: summarise(&export),
            cleanup: None,
            cause,
            resume: Some(resume),
        })
    }

    /// The import's kick-off, first asking Pathling's generation when configured `auto`.
    fn import_kickoff(&self, export: Exported, now: Timestamp) -> SyncState {
        SyncState::KickingOffImport(KickingOffImport {
            export,
            api: ApiState::initial(self.spec.target.api),
            retry: Retrying::default(),
            deadline: now.plus_ms(patience_ms(&self.spec.retry.import)),
            sent_at: None,
            replaces: None,
        })
    }

    fn kicking_off_import(
        &self,
        s: &KickingOffImport,
        result: EffectResult,
        now: Timestamp,
    ) -> Result<SyncState, Rejected> {
        let spec = &self.spec;
        let failed = |reason: String, cause: Option<&Failure>| {
            self.fail(Failing {
                phase: Phase::KickingOffImport,
                reason,
                summary: self.import_summary(&s.export, None),
                cleanup: Some(&s.export.status_url),
                cause,
                resume: Some(resume_point(ResumeFrom::KickingOffImport, &s.export)),
            })
        };
        let retry_or_fail = |f: Failure, op: &str| match self.retry_after_failure(
            &s.retry,
            Patience::Import,
            s.deadline,
            &f,
            op,
            now,
        ) {
            Ok(retry) => SyncState::KickingOffImport(KickingOffImport {
                retry,
                sent_at: None,
                ..s.clone()
            }),
            Err(reason) => failed(format!("import kick-off failed: {reason}"), Some(&f)),
        };
        match (s.api, result) {
            (ApiState::Detecting, EffectResult::PathlingDetected { api, version }) => {
                if api == Some(PathlingApi::V7) {
                    let version = version.unwrap_or_else(|| "7.x".into());
                    if !spec.target.import_mode.supported_by_v7() {
                        return Ok(failed(format!("IMPORT_MODE {} needs Pathling 9.2+, but the target is Pathling {version}", spec.target.import_mode.as_code()), None));
                    }
                    if spec.target.apply_deletions && s.export.files.count(FileKind::Deleted) > 0 {
                        return Ok(failed(format!("APPLY_DELETIONS needs Pathling 9.x, but the target is Pathling {version}, which cannot delete"), None));
                    }
                }
                Ok(SyncState::KickingOffImport(KickingOffImport {
                    api: ApiState::detected(api, PathlingApi::V9),
                    retry: Retrying::default(),
                    ..s.clone()
                }))
            }
            (ApiState::Detecting, EffectResult::Failed(f)) => {
                if classify(&f) == Verdict::Transient {
                    return Ok(retry_or_fail(f, "detect-pathling"));
                }
                // Detection is a convenience; the kick-off's own answer is authoritative.
                Ok(SyncState::KickingOffImport(KickingOffImport {
                    api: ApiState::detected(None, PathlingApi::V9),
                    retry: Retrying::default(),
                    ..s.clone()
                }))
            }
            (
                ApiState::Known { api } | ApiState::Guessed { api },
                EffectResult::ImportAccepted { job_url },
            ) => {
                if crate::bulk::origin_of(&job_url).is_none() {
                    return Ok(failed(format!("Pathling answered 202 with Content-Location {:?}, which is not an absolute http(s) URL", crate::bulk::truncate(&job_url, 200)), None));
                }
                Ok(SyncState::PollingImport(PollingImport {
                    export: s.export.clone(),
                    api,
                    job_url,
                    polls: 0,
                    progress: None,
                    retry: Retrying::default(),
                    deadline: s.deadline,
                    throttled: false,
                }))
            }
            (ApiState::Known { api } | ApiState::Guessed { api }, EffectResult::Failed(f)) => {
                if let Some(switched) = f.status().and_then(|st| s.api.switched(st, &f.message)) {
                    return Ok(SyncState::KickingOffImport(KickingOffImport {
                        api: switched,
                        retry: Retrying::default(),
                        sent_at: None,
                        ..s.clone()
                    }));
                }
                if f.status()
                    .is_some_and(|st| is_wrong_generation(api, st, &f.message))
                {
                    let reason = format!("import kick-off failed: {f} (the target looks like the other Pathling generation; set PATHLING_API={} or auto)", api.other().setting());
                    return Ok(failed(reason, Some(&f)));
                }
                Ok(retry_or_fail(f, "kickoff-import"))
            }
            (_, other) => Err(Rejected::Mismatch {
                result: result_name(&other).to_string(),
                phase: Phase::KickingOffImport,
            }),
        }
    }

    fn after_import(&self, export: Exported, job_url: Option<&str>) -> SyncState {
        let deletions =
            self.spec.target.apply_deletions && export.files.count(FileKind::Deleted) > 0;
        if deletions {
            return SyncState::ApplyingDeletions(ApplyingDeletions {
                export,
                import_job: job_url.map(str::to_string),
                deleted: 0,
                absent: 0,
            });
        }
        let mut summary = self.completed_summary(&export, job_url);
        summary.nothing_to_import = job_url.is_none();
        self.cleanup_then(&export.status_url, Terminal::Succeeded(summary))
    }

    /// The summary of a run whose import has not (or not yet) succeeded: no file counts as
    /// imported.
    fn import_summary(&self, export: &Exported, job_url: Option<&str>) -> Summary {
        let mut summary = summarise(export);
        summary.import_job = job_url.map(str::to_string);
        summary
    }

    /// The summary once the import job (if any) has succeeded.
    fn completed_summary(&self, export: &Exported, job_url: Option<&str>) -> Summary {
        let mut summary = self.import_summary(export, job_url);
        if job_url.is_some() {
            summary.imported_files = export
                .files
                .count_of(Some(FileKind::Output), FileStatus::Staged)
                as u32;
        }
        summary
    }

    fn cleanup_then(&self, status_url: &str, then: Terminal) -> SyncState {
        SyncState::CleaningUp(CleaningUp {
            status_url: status_url.to_string(),
            then,
        })
    }

    /// A failed run; the export job is cleaned up first when asked.
    fn fail(&self, f: Failing<'_>) -> SyncState {
        let failed = Terminal::Failed(FailedRun {
            phase: f.phase,
            reason: f.reason,
            summary: f.summary,
            cause: f.cause.map(|c| Failure {
                message: crate::bulk::truncate(&c.message, 500),
                ..c.clone()
            }),
            resume: f.resume.map(Box::new),
        });
        match f.cleanup {
            Some(url) => self.cleanup_then(url, failed),
            None => failed.into_state(),
        }
    }
}

fn summarise(export: &Exported) -> Summary {
    let t = &export.files;
    let mut by_type = std::collections::BTreeMap::new();
    for r in t.iter().filter(|r| r.kind == FileKind::Output) {
        let idx = usize::from(r.type_idx);
        by_type.insert(
            t.types.get(idx).cloned().unwrap_or_default(),
            t.resources_by_type.get(idx).copied().unwrap_or(0),
        );
    }
    Summary {
        transaction_time: Some(export.transaction_time.clone()),
        since: export.since.clone(),
        nothing_to_import: false,
        files: t.len() as u32,
        files_staged: (t.count_of(None, FileStatus::Staged) + t.count_of(None, FileStatus::Applied))
            as u32,
        bytes: t.bytes,
        resources: by_type.values().fold(0u64, |a, b| a.saturating_add(*b)),
        resources_by_type: by_type,
        imported_files: 0,
        deleted: 0,
        already_absent: 0,
        source_errors: export.source_errors.clone(),
        import_job: None,
        duplicate_urls: export.duplicate_urls,
    }
}

fn result_name(r: &EffectResult) -> &'static str {
    match r {
        EffectResult::ExportAccepted { .. } => "export_accepted",
        EffectResult::ExportInProgress { .. } => "export_in_progress",
        EffectResult::ExportCompleted { .. } => "export_completed",
        EffectResult::FileStaged { .. } => "file_staged",
        EffectResult::PathlingDetected { .. } => "pathling_detected",
        EffectResult::ImportAccepted { .. } => "import_accepted",
        EffectResult::ImportInProgress { .. } => "import_in_progress",
        EffectResult::ImportCompleted { .. } => "import_completed",
        EffectResult::DeletionsApplied { .. } => "deletions_applied",
        EffectResult::ExportJobDeleted => "export_job_deleted",
        EffectResult::Failed(_) => "failed",
    }
}
