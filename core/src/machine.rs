//! The transition function: [`SyncRun::next`] says what to do, [`SyncRun::step`] applies a
//! result. One exhaustive `match` per phase, no wildcard arms.

use crate::bulk::{FileKind, OutcomeSummary};
use crate::effect::*;
use crate::pathling::{import_parameters, is_wrong_generation, ImportInput};
use crate::retry::{
    classify, failure_delay_ms, patience_ms, poll_delay_ms, stable_hash, Failure, Verdict,
};
use crate::spec::{PathlingApi, PathlingApiChoice, PhasePolicy, RunSpec, SinceSpec};
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
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error("run id {0:?} must be 1 to 64 characters of A-Z a-z 0-9 - _")]
    BadRunId(String),
}

/// Files handed out per `Next::Run`, relative to the transfer concurrency: enough to keep
/// every slot busy, few enough that a crash repeats little.
const BATCH_PER_SLOT: usize = 4;

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
            }),
        })
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
                    reason: reason.to_string(),
                })
        };
        match &self.state {
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
            ),
            SyncState::KickingOffImport(s) => waiting(&s.retry, "retrying the import kick-off")
                .unwrap_or_else(|| match s.api {
                    ApiState::Detecting => run_req(Effect::DetectPathling),
                    ApiState::Known { api } | ApiState::Guessed { api } => {
                        run_req(Effect::KickoffImport {
                            api,
                            parameters: self.import_parameters(&s.export, api),
                        })
                    }
                }),
            SyncState::PollingImport(s) => waiting(&s.retry, "waiting for the import")
                .unwrap_or_else(|| {
                    run_req(Effect::PollImport {
                        job_url: s.job_url.clone(),
                    })
                }),
            SyncState::ApplyingDeletions(s) => {
                self.file_batch(&s.export, now, FileStatus::Staged, "retrying deletions")
            }
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

    /// Staging (`Pending` output/deleted/error files) or deletions (`Staged` deleted files).
    fn file_batch(
        &self,
        export: &Exported,
        now: Timestamp,
        want: FileStatus,
        reason: &str,
    ) -> Next {
        let deleting = want == FileStatus::Staged;
        let limit = (self.spec.transfer.concurrency.max(1) as usize) * BATCH_PER_SLOT;
        let in_phase = |r: &FileRow| r.status == want && (!deleting || r.kind == FileKind::Deleted);
        // While `limit` files wait to retry, no fresh file is handed out: a source outage then
        // costs a few retry entries in the envelope instead of one per file of the manifest
        // (which would outgrow a DynamoDB item), and a failing source is not hammered.
        let retrying = export
            .files
            .rows
            .iter()
            .filter(|r| in_phase(r) && r.failures > 0)
            .count();
        let eligible = |r: &FileRow| in_phase(r) && (retrying < limit || r.failures > 0);
        let requests: Vec<Request> = export
            .files
            .rows
            .iter()
            .enumerate()
            .filter(|(_, r)| eligible(r) && r.not_before <= now)
            .take(limit)
            .map(|(i, r)| {
                let index = i as u32;
                let key = self.file_key(export, index);
                let effect = if deleting {
                    Effect::ApplyDeletions { index, key }
                } else {
                    Effect::StageFile {
                        manifest_key: export.manifest_key.clone(),
                        index,
                        kind: r.kind,
                        type_name: export.files.type_name(r).to_string(),
                        key,
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
        match export
            .files
            .rows
            .iter()
            .filter(|r| eligible(r))
            .map(|r| r.not_before)
            .min()
        {
            Some(until) => Next::SleepUntil {
                until,
                reason: reason.to_string(),
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
            .rows
            .get(index as usize)
            .map(|r| (r.kind, export.files.type_name(r)))
            .unwrap_or((FileKind::Output, ""));
        self.spec
            .staging
            .file_key(&self.run_id, index, kind, type_name)
    }

    /// Every staged `output[]` file, as `$import` inputs.
    pub fn import_inputs(&self, export: &Exported, api: PathlingApi) -> Vec<ImportInput> {
        export
            .files
            .rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.kind == FileKind::Output && r.status == FileStatus::Staged)
            .map(|(i, r)| ImportInput {
                type_name: export.files.type_name(r).to_string(),
                url: self
                    .spec
                    .staging
                    .import_url(&self.file_key(export, i as u32), api),
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
    pub fn step(&self, input: Input, now: Timestamp) -> Result<SyncRun, Rejected> {
        if self.is_done() {
            return Err(Rejected::Ended);
        }
        let state = match input {
            Input::Cancel { reason } => self.cancel(reason),
            Input::Completed { id, result } => self.complete(id, result, now)?,
        };
        let mut next = self.clone();
        next.seq = self.seq.saturating_add(1);
        if let SyncState::Succeeded(summary) = &state {
            if let Some(tt) = &summary.transaction_time {
                next.watermark = Some(Watermark {
                    transaction_time: tt.clone(),
                    run_id: self.run_id.clone(),
                });
            }
        }
        next.state = state;
        Ok(next)
    }

    fn cancel(&self, reason: String) -> SyncState {
        let phase = self.state.name().to_string();
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
        policy: &PhasePolicy,
        deadline: Timestamp,
        failure: &Failure,
        op: &str,
        now: Timestamp,
    ) -> Result<Retrying, String> {
        if classify(failure) == Verdict::Permanent {
            return Err(failure.to_string());
        }
        let failures = retry.failures.saturating_add(1);
        if failures > policy.times {
            return Err(format!("gave up after {failures} attempt(s): {failure}"));
        }
        if now >= deadline {
            return Err(format!("deadline passed: {failure}"));
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
            last_error: Some(failure.to_string()),
        })
    }

    /// Schedules the next poll of a running job, or says it took too long.
    fn next_poll(
        &self,
        polls: u32,
        policy: &PhasePolicy,
        deadline: Timestamp,
        retry_after: Option<&str>,
        what: &str,
        now: Timestamp,
    ) -> Result<Retrying, String> {
        if now >= deadline {
            return Err(format!(
                "{what} did not complete within {} s ({} polls)",
                patience_ms(policy) / 1000,
                polls.saturating_add(1)
            ));
        }
        let delay = poll_delay_ms(
            policy,
            polls,
            retry_after,
            self.spec.retry.retry_after_max_ms,
            now,
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
        let mismatch = |phase: &'static str, result: &EffectResult| Rejected::Mismatch {
            result: result_name(result).to_string(),
            phase,
        };
        let spec = &self.spec;
        match &self.state {
            SyncState::KickingOffExport(s) => {
                run_level(id)?;
                match result {
                    EffectResult::ExportAccepted { status_url } => {
                        if crate::bulk::origin_of(&status_url).is_none() {
                            return Ok(self.fail(
                                "kicking_off_export",
                                format!("the source answered 202 with Content-Location {status_url:?}, which is not an absolute http(s) URL"),
                                Summary::default(),
                                None,
                            ));
                        }
                        Ok(SyncState::PollingExport(PollingExport {
                            since: s.since.clone(),
                            status_url,
                            polls: 0,
                            progress: None,
                            retry: Retrying::default(),
                            deadline: s.deadline,
                        }))
                    }
                    EffectResult::Failed(f) => {
                        match self.retry_after_failure(
                            &s.retry,
                            &spec.retry.export,
                            s.deadline,
                            &f,
                            "kickoff-export",
                            now,
                        ) {
                            Ok(retry) => Ok(SyncState::KickingOffExport(KickingOffExport {
                                retry,
                                ..s.clone()
                            })),
                            Err(reason) => Ok(self.fail(
                                "kicking_off_export",
                                format!("export kick-off failed: {reason}"),
                                Summary::default(),
                                None,
                            )),
                        }
                    }
                    other => Err(mismatch("kicking_off_export", &other)),
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
                            &spec.retry.export,
                            s.deadline,
                            retry_after.as_deref(),
                            "the export",
                            now,
                        ) {
                            Ok(retry) => Ok(SyncState::PollingExport(PollingExport {
                                polls: s.polls.saturating_add(1),
                                progress: progress.map(|p| crate::bulk::truncate(&p, 200)),
                                retry,
                                ..s.clone()
                            })),
                            Err(reason) => Ok(self.fail(
                                "polling_export",
                                reason,
                                Summary::default(),
                                Some(&s.status_url),
                            )),
                        }
                    }
                    EffectResult::ExportCompleted { digest } => Ok(self.exported(s, digest, now)),
                    EffectResult::Failed(f) => {
                        match self.retry_after_failure(
                            &s.retry,
                            &spec.retry.export,
                            s.deadline,
                            &f,
                            "poll-export",
                            now,
                        ) {
                            Ok(retry) => Ok(SyncState::PollingExport(PollingExport {
                                retry,
                                ..s.clone()
                            })),
                            Err(reason) => Ok(self.fail(
                                "polling_export",
                                format!("export status check failed: {reason}"),
                                Summary::default(),
                                Some(&s.status_url),
                            )),
                        }
                    }
                    other => Err(mismatch("polling_export", &other)),
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
                        let row = &mut table.rows[index as usize];
                        row.status = FileStatus::Staged;
                        // Staging retries are over: deletions count their own attempts, and a
                        // staged row costs nothing in the envelope's retry map.
                        row.failures = 0;
                        row.not_before = Timestamp::ZERO;
                        let (kind, type_idx) = (row.kind, usize::from(row.type_idx));
                        table.errors.remove(&index);
                        table.bytes = table.bytes.saturating_add(bytes);
                        if kind == FileKind::Output {
                            if let Some(n) = table.resources_by_type.get_mut(type_idx) {
                                *n = n.saturating_add(resources);
                            }
                        }
                        if let Some(o) = outcomes {
                            export.source_errors.merge(&o);
                        }
                        Ok(self.after_staging_step(export, now))
                    }
                    EffectResult::Failed(f) => {
                        let row = export.files.rows[index as usize];
                        let failures = row.failures.saturating_add(1);
                        let give_up = if classify(&f) == Verdict::Permanent {
                            Some(f.to_string())
                        } else if failures > spec.retry.transfer.times {
                            Some(format!("gave up after {failures} attempt(s): {f}"))
                        } else if now >= s.stall_deadline {
                            Some(format!("no file staged within the transfer patience: {f}"))
                        } else {
                            None
                        };
                        export
                            .files
                            .errors
                            .insert(index, crate::bulk::truncate(&f.to_string(), 300));
                        let what = export.files.describe(index);
                        let r = &mut export.files.rows[index as usize];
                        r.failures = failures;
                        if let Some(reason) = give_up {
                            r.status = FileStatus::Failed;
                            let summary = summarise(&export);
                            return Ok(self.fail(
                                "staging_files",
                                format!("could not stage {what}: {reason}"),
                                summary,
                                Some(&export.status_url),
                            ));
                        }
                        let delay = failure_delay_ms(
                            &spec.retry.transfer,
                            failures,
                            self.jitter_key("stage", index),
                            &f,
                            spec.retry.retry_after_max_ms,
                            now,
                        );
                        r.not_before = now.plus_ms(delay).min(s.stall_deadline);
                        Ok(SyncState::StagingFiles(StagingFiles {
                            export,
                            stall_deadline: s.stall_deadline,
                        }))
                    }
                    other => Err(mismatch("staging_files", &other)),
                }
            }
            SyncState::KickingOffImport(s) => {
                run_level(id)?;
                self.kicking_off_import(s, result, now)
            }
            SyncState::PollingImport(s) => {
                run_level(id)?;
                match result {
                    EffectResult::ImportInProgress {
                        progress,
                        retry_after,
                    } => {
                        match self.next_poll(
                            s.polls,
                            &spec.retry.import,
                            s.deadline,
                            retry_after.as_deref(),
                            "the import",
                            now,
                        ) {
                            Ok(retry) => Ok(SyncState::PollingImport(PollingImport {
                                polls: s.polls.saturating_add(1),
                                progress: progress.map(|p| crate::bulk::truncate(&p, 200)),
                                retry,
                                ..s.clone()
                            })),
                            Err(reason) => Ok(self.fail(
                                "polling_import",
                                reason,
                                self.import_summary(&s.export, Some(&s.job_url)),
                                Some(&s.export.status_url),
                            )),
                        }
                    }
                    EffectResult::ImportCompleted => {
                        Ok(self.after_import(s.export.clone(), Some(&s.job_url)))
                    }
                    EffectResult::Failed(f) => {
                        match self.retry_after_failure(
                            &s.retry,
                            &spec.retry.import,
                            s.deadline,
                            &f,
                            "poll-import",
                            now,
                        ) {
                            Ok(retry) => Ok(SyncState::PollingImport(PollingImport {
                                retry,
                                ..s.clone()
                            })),
                            Err(reason) => Ok(self.fail(
                                "polling_import",
                                format!("import failed: {reason}"),
                                self.import_summary(&s.export, Some(&s.job_url)),
                                Some(&s.export.status_url),
                            )),
                        }
                    }
                    other => Err(mismatch("polling_import", &other)),
                }
            }
            SyncState::ApplyingDeletions(s) => {
                let index = self.file_id(&s.export, id, FileStatus::Staged)?;
                let mut next = s.clone();
                match result {
                    EffectResult::DeletionsApplied { deleted, absent } => {
                        next.export.files.rows[index as usize].status = FileStatus::Applied;
                        next.export.files.errors.remove(&index);
                        next.deleted = next.deleted.saturating_add(deleted);
                        next.absent = next.absent.saturating_add(absent);
                        let pending =
                            next.export.files.rows.iter().any(|r| {
                                r.kind == FileKind::Deleted && r.status == FileStatus::Staged
                            });
                        if pending {
                            return Ok(SyncState::ApplyingDeletions(next));
                        }
                        let mut summary =
                            self.import_summary(&next.export, next.import_job.as_deref());
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
                        let failures = next.export.files.rows[index as usize]
                            .failures
                            .saturating_add(1);
                        let what = next.export.files.describe(index);
                        next.export
                            .files
                            .errors
                            .insert(index, crate::bulk::truncate(&f.to_string(), 300));
                        if classify(&f) == Verdict::Permanent || failures > spec.retry.import.times
                        {
                            let mut summary =
                                self.import_summary(&next.export, next.import_job.as_deref());
                            summary.deleted = next.deleted;
                            summary.already_absent = next.absent;
                            return Ok(self.fail(
                                "applying_deletions",
                                format!("could not apply the deletions of {what}: {f}"),
                                summary,
                                Some(&next.export.status_url),
                            ));
                        }
                        let delay = failure_delay_ms(
                            &spec.retry.import,
                            failures,
                            self.jitter_key("delete", index),
                            &f,
                            spec.retry.retry_after_max_ms,
                            now,
                        );
                        let row = &mut next.export.files.rows[index as usize];
                        row.failures = failures;
                        row.not_before = now.plus_ms(delay);
                        Ok(SyncState::ApplyingDeletions(next))
                    }
                    other => Err(mismatch("applying_deletions", &other)),
                }
            }
            SyncState::CleaningUp(s) => {
                run_level(id)?;
                match result {
                    // Best effort: a failed DELETE does not change how the run ended.
                    EffectResult::ExportJobDeleted | EffectResult::Failed(_) => {
                        Ok(s.then.clone().into_state())
                    }
                    other => Err(mismatch("cleaning_up", &other)),
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
        let ok = export.files.rows.get(index as usize).is_some_and(|r| {
            r.status == want && r.failures == attempt && (!deleting || r.kind == FileKind::Deleted)
        });
        if ok {
            Ok(index)
        } else {
            Err(Rejected::Stale { got: id })
        }
    }

    fn exported(&self, s: &PollingExport, digest: ManifestDigest, now: Timestamp) -> SyncState {
        let export = Exported {
            since: s.since.clone(),
            status_url: s.status_url.clone(),
            transaction_time: digest.transaction_time,
            manifest_key: self.spec.staging.manifest_key(&self.run_id),
            files: FileTable::from_digest(&digest.files),
            source_errors: OutcomeSummary::default(),
        };
        self.after_staging_step(export, now)
    }

    /// Stays in staging while files are pending (a staged file renews the stall deadline);
    /// otherwise moves on.
    fn after_staging_step(&self, export: Exported, now: Timestamp) -> SyncState {
        if export
            .files
            .rows
            .iter()
            .any(|r| r.status == FileStatus::Pending)
        {
            return SyncState::StagingFiles(StagingFiles {
                export,
                stall_deadline: now.plus_ms(patience_ms(&self.spec.retry.transfer)),
            });
        }
        let errors = &export.source_errors;
        if errors.fatal > 0 {
            let reason = format!(
                "the source reported {} fatal error(s) during the export: {}",
                errors.fatal,
                errors.samples.join("; ")
            );
            let summary = summarise(&export);
            return self.fail("staging_files", reason, summary, Some(&export.status_url));
        }
        if export.files.count(FileKind::Output) > 0 {
            let api = match self.spec.target.api {
                PathlingApiChoice::Auto => ApiState::Detecting,
                PathlingApiChoice::V7 => ApiState::Known {
                    api: PathlingApi::V7,
                },
                PathlingApiChoice::V9 => ApiState::Known {
                    api: PathlingApi::V9,
                },
            };
            return SyncState::KickingOffImport(KickingOffImport {
                export,
                api,
                retry: Retrying::default(),
                deadline: now.plus_ms(patience_ms(&self.spec.retry.import)),
            });
        }
        self.after_import(export, None)
    }

    fn kicking_off_import(
        &self,
        s: &KickingOffImport,
        result: EffectResult,
        now: Timestamp,
    ) -> Result<SyncState, Rejected> {
        let spec = &self.spec;
        let retry_or_fail = |f: Failure, op: &str| match self.retry_after_failure(
            &s.retry,
            &spec.retry.import,
            s.deadline,
            &f,
            op,
            now,
        ) {
            Ok(retry) => SyncState::KickingOffImport(KickingOffImport { retry, ..s.clone() }),
            Err(reason) => self.fail(
                "kicking_off_import",
                format!("import kick-off failed: {reason}"),
                self.import_summary(&s.export, None),
                Some(&s.export.status_url),
            ),
        };
        match (s.api, result) {
            (ApiState::Detecting, EffectResult::PathlingDetected { api, version }) => {
                let Some(api) = api else {
                    return Ok(SyncState::KickingOffImport(KickingOffImport {
                        api: ApiState::Guessed {
                            api: PathlingApi::V9,
                        },
                        retry: Retrying::default(),
                        ..s.clone()
                    }));
                };
                if api == PathlingApi::V7 {
                    let version = version.unwrap_or_else(|| "7.x".into());
                    if !spec.target.import_mode.supported_by_v7() {
                        return Ok(self.fail("kicking_off_import", format!("IMPORT_MODE {} needs Pathling 9.2+, but the target is Pathling {version}", spec.target.import_mode.as_code()), self.import_summary(&s.export, None), Some(&s.export.status_url)));
                    }
                    if spec.target.apply_deletions && s.export.files.count(FileKind::Deleted) > 0 {
                        return Ok(self.fail("kicking_off_import", format!("APPLY_DELETIONS needs Pathling 9.x, but the target is Pathling {version}, which cannot delete"), self.import_summary(&s.export, None), Some(&s.export.status_url)));
                    }
                }
                Ok(SyncState::KickingOffImport(KickingOffImport {
                    api: ApiState::Known { api },
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
                    api: ApiState::Guessed {
                        api: PathlingApi::V9,
                    },
                    retry: Retrying::default(),
                    ..s.clone()
                }))
            }
            (
                ApiState::Known { api } | ApiState::Guessed { api },
                EffectResult::ImportAccepted { job_url },
            ) => {
                if crate::bulk::origin_of(&job_url).is_none() {
                    return Ok(self.fail("kicking_off_import", format!("Pathling answered 202 with Content-Location {job_url:?}, which is not an absolute http(s) URL"), self.import_summary(&s.export, None), Some(&s.export.status_url)));
                }
                Ok(SyncState::PollingImport(PollingImport {
                    export: s.export.clone(),
                    api,
                    job_url,
                    polls: 0,
                    progress: None,
                    retry: Retrying::default(),
                    deadline: s.deadline,
                }))
            }
            (ApiState::Known { api } | ApiState::Guessed { api }, EffectResult::Failed(f)) => {
                let wrong = f
                    .status()
                    .is_some_and(|st| is_wrong_generation(api, st, &f.message));
                let other = match api {
                    PathlingApi::V7 => PathlingApi::V9,
                    PathlingApi::V9 => PathlingApi::V7,
                };
                if wrong
                    && matches!(s.api, ApiState::Guessed { .. })
                    && spec.target.api == PathlingApiChoice::Auto
                {
                    return Ok(SyncState::KickingOffImport(KickingOffImport {
                        api: ApiState::Known { api: other },
                        retry: Retrying::default(),
                        ..s.clone()
                    }));
                }
                if wrong {
                    let hint = match other {
                        PathlingApi::V7 => "7",
                        PathlingApi::V9 => "9",
                    };
                    let reason = format!("import kick-off failed: {f} (the target looks like the other Pathling generation; set PATHLING_API={hint} or auto)");
                    return Ok(self.fail(
                        "kicking_off_import",
                        reason,
                        self.import_summary(&s.export, None),
                        Some(&s.export.status_url),
                    ));
                }
                Ok(retry_or_fail(f, "kickoff-import"))
            }
            (_, other) => Err(Rejected::Mismatch {
                result: result_name(&other).to_string(),
                phase: "kicking_off_import",
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
        let mut summary = self.import_summary(&export, job_url);
        summary.nothing_to_import = job_url.is_none();
        self.cleanup_then(&export.status_url, Terminal::Succeeded(summary))
    }

    fn import_summary(&self, export: &Exported, job_url: Option<&str>) -> Summary {
        let mut summary = summarise(export);
        summary.import_job = job_url.map(str::to_string);
        if job_url.is_some() {
            summary.imported_files = export
                .files
                .rows
                .iter()
                .filter(|r| r.kind == FileKind::Output && r.status == FileStatus::Staged)
                .count() as u32;
        }
        summary
    }

    fn cleanup_then(&self, status_url: &str, then: Terminal) -> SyncState {
        SyncState::CleaningUp(CleaningUp {
            status_url: status_url.to_string(),
            then,
        })
    }

    /// A failed run; the export job is cleaned up first when one is known.
    fn fail(
        &self,
        phase: &str,
        reason: String,
        summary: Summary,
        status_url: Option<&str>,
    ) -> SyncState {
        let failed = Terminal::Failed(FailedRun {
            phase: phase.to_string(),
            reason,
            summary,
        });
        match status_url {
            Some(url) => self.cleanup_then(url, failed),
            None => failed.into_state(),
        }
    }
}

fn summarise(export: &Exported) -> Summary {
    let t = &export.files;
    let mut by_type = std::collections::BTreeMap::new();
    for r in t.rows.iter().filter(|r| r.kind == FileKind::Output) {
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
        files: t.rows.len() as u32,
        files_staged: t
            .rows
            .iter()
            .filter(|r| matches!(r.status, FileStatus::Staged | FileStatus::Applied))
            .count() as u32,
        bytes: t.bytes,
        resources: by_type.values().fold(0u64, |a, b| a.saturating_add(*b)),
        resources_by_type: by_type,
        imported_files: 0,
        deleted: 0,
        already_absent: 0,
        source_errors: export.source_errors.clone(),
        import_job: None,
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
        EffectResult::ImportCompleted => "import_completed",
        EffectResult::DeletionsApplied { .. } => "deletions_applied",
        EffectResult::ExportJobDeleted => "export_job_deleted",
        EffectResult::Failed(_) => "failed",
    }
}
