//! The persisted state of a run: a closed enum of phases, each a struct named for what it is
//! doing or awaiting (the per-file table is [`crate::file_table`]).

use crate::bulk::OutcomeSummary;
use crate::retry::Failure;
use crate::spec::{PathlingApi, PathlingApiChoice};
use crate::staging::StagingKey;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use crate::file_table::{FileRow, FileStatus, FileTable};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum SyncState {
    KickingOffExport(KickingOffExport),
    PollingExport(PollingExport),
    StagingFiles(StagingFiles),
    KickingOffImport(KickingOffImport),
    PollingImport(PollingImport),
    ApplyingDeletions(ApplyingDeletions),
    CleaningUp(CleaningUp),
    Succeeded(Summary),
    Failed(FailedRun),
    Cancelled(CancelledRun),
}

/// The phases of a run, by name (`staging_files`): what logs, reports and metrics say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    KickingOffExport,
    PollingExport,
    StagingFiles,
    KickingOffImport,
    PollingImport,
    ApplyingDeletions,
    CleaningUp,
    Succeeded,
    Failed,
    Cancelled,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::KickingOffExport => "kicking_off_export",
            Phase::PollingExport => "polling_export",
            Phase::StagingFiles => "staging_files",
            Phase::KickingOffImport => "kicking_off_import",
            Phase::PollingImport => "polling_import",
            Phase::ApplyingDeletions => "applying_deletions",
            Phase::CleaningUp => "cleaning_up",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Phase {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl SyncState {
    pub fn phase(&self) -> Phase {
        match self {
            SyncState::KickingOffExport(_) => Phase::KickingOffExport,
            SyncState::PollingExport(_) => Phase::PollingExport,
            SyncState::StagingFiles(_) => Phase::StagingFiles,
            SyncState::KickingOffImport(_) => Phase::KickingOffImport,
            SyncState::PollingImport(_) => Phase::PollingImport,
            SyncState::ApplyingDeletions(_) => Phase::ApplyingDeletions,
            SyncState::CleaningUp(_) => Phase::CleaningUp,
            SyncState::Succeeded(_) => Phase::Succeeded,
            SyncState::Failed(_) => Phase::Failed,
            SyncState::Cancelled(_) => Phase::Cancelled,
        }
    }

    pub fn name(&self) -> &'static str {
        self.phase().as_str()
    }

    pub fn terminal(&self) -> Option<Terminal> {
        match self {
            SyncState::Succeeded(s) => Some(Terminal::Succeeded(s.clone())),
            SyncState::Failed(f) => Some(Terminal::Failed(f.clone())),
            SyncState::Cancelled(c) => Some(Terminal::Cancelled(c.clone())),
            _ => None,
        }
    }
}

/// Retry bookkeeping of a run-level operation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retrying {
    /// Consecutive transient failures so far.
    pub failures: u32,
    /// Not before this time (a backoff or a poll interval).
    pub not_before: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KickingOffExport {
    /// The resolved `_since` (from the spec or the last successful run).
    pub since: Option<String>,
    pub retry: Retrying,
    pub deadline: Timestamp,
    /// The export job of the run this one replaced (`--fresh`), deleted at the source
    /// (best effort) before the new export starts. Part of the new run, so that a kill at
    /// any point leaves either the old run or the new one, never half of each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_job: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PollingExport {
    pub since: Option<String>,
    pub status_url: String,
    /// Polls answered "in progress" so far.
    pub polls: u32,
    pub progress: Option<String>,
    pub retry: Retrying,
    pub deadline: Timestamp,
    /// The server answered `429` in this phase: polls stay twice as far apart from then on.
    #[serde(default, skip_serializing_if = "is_false")]
    pub throttled: bool,
    /// A retried run asking whether its export still stands: the file table it had. When the
    /// source answers with the same manifest, staging continues with it (already staged files
    /// stay staged; the manifest's URLs, which may have been re-signed, are stored anew);
    /// when the export is gone (404/410), the run exports again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resuming: Option<Box<Exported>>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What the export produced, carried through every later phase.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exported {
    pub since: Option<String>,
    pub status_url: String,
    pub transaction_time: String,
    /// Where the executor stored the full manifest (file URLs live there, not here).
    pub manifest_key: StagingKey,
    pub files: FileTable,
    pub source_errors: OutcomeSummary,
    /// File URLs the manifest listed more than once: each is staged (and imported) once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub duplicate_urls: u32,
    /// The manifest's [`crate::effect::ManifestDigest::files_hash`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_hash: Option<u64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StagingFiles {
    pub export: Exported,
    /// The phase fails when no file has been staged for the transfer patience.
    pub stall_deadline: Timestamp,
    /// Why the first file that could not be staged failed: the other files go on, and the
    /// run then fails with this as its cause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<Failure>,
}

/// Which `$import` shape to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ApiState {
    /// Configured `auto` and not yet asked: `GET /metadata` first.
    Detecting,
    /// Known (configured or detected).
    Known { api: PathlingApi },
    /// Guessed (metadata did not tell); one switch to the other shape is allowed when the
    /// server's 400 answer says it is the other generation.
    Guessed { api: PathlingApi },
}

impl ApiState {
    /// Where an `$import` kick-off starts: ask the server first when configured `auto`.
    pub fn initial(choice: PathlingApiChoice) -> ApiState {
        match choice {
            PathlingApiChoice::Auto => ApiState::Detecting,
            PathlingApiChoice::V7 => ApiState::Known {
                api: PathlingApi::V7,
            },
            PathlingApiChoice::V9 => ApiState::Known {
                api: PathlingApi::V9,
            },
        }
    }

    /// After asking the server: the generation it told, else `guess` (tried, and switched
    /// once if the server's answer says it is the other generation).
    pub fn detected(told: Option<PathlingApi>, guess: PathlingApi) -> ApiState {
        match told {
            Some(api) => ApiState::Known { api },
            None => ApiState::Guessed { api: guess },
        }
    }

    /// The shape to send, once known or guessed.
    pub fn api(self) -> Option<PathlingApi> {
        match self {
            ApiState::Detecting => None,
            ApiState::Known { api } | ApiState::Guessed { api } => Some(api),
        }
    }

    /// After a refused kick-off: the other generation, once, when the shape was only guessed
    /// and the answer is the one the other generation gives to this shape.
    pub fn switched(self, status: u16, body: &str) -> Option<ApiState> {
        match self {
            ApiState::Guessed { api }
                if crate::pathling::is_wrong_generation(api, status, body) =>
            {
                Some(ApiState::Known { api: api.other() })
            }
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KickingOffImport {
    pub export: Exported,
    pub api: ApiState,
    pub retry: Retrying,
    pub deadline: Timestamp,
    /// When a kick-off that must not be repeated blindly (`IMPORT_MODE=append`) was sent and
    /// its answer is not recorded yet. Found set when the kick-off is due again, it means the
    /// answer was lost (a kill, a dropped connection): Pathling may have started the import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<Timestamp>,
    /// The job of this run's failed import, cancelled before the retried kick-off: Pathling
    /// 9 answers an identical re-submission with the existing job, even a failed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PollingImport {
    pub export: Exported,
    pub api: PathlingApi,
    pub job_url: String,
    pub polls: u32,
    pub progress: Option<String>,
    pub retry: Retrying,
    pub deadline: Timestamp,
    /// As [`PollingExport::throttled`].
    #[serde(default, skip_serializing_if = "is_false")]
    pub throttled: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApplyingDeletions {
    pub export: Exported,
    /// The `$import` job that ran before (for the summary); `None` when there was nothing
    /// to import.
    pub import_job: Option<String>,
    pub deleted: u64,
    pub absent: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CleaningUp {
    pub status_url: String,
    /// Where the run ends once the export job is deleted (or the attempt failed).
    pub then: Terminal,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Terminal {
    Succeeded(Summary),
    Failed(FailedRun),
    Cancelled(CancelledRun),
}

impl Terminal {
    pub fn into_state(self) -> SyncState {
        match self {
            Terminal::Succeeded(s) => SyncState::Succeeded(s),
            Terminal::Failed(f) => SyncState::Failed(f),
            Terminal::Cancelled(c) => SyncState::Cancelled(c),
        }
    }
}

/// What a run did; the `Succeeded` phase and part of `Failed`/`Cancelled`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The export's `transactionTime`: where the next incremental run starts.
    pub transaction_time: Option<String>,
    pub since: Option<String>,
    /// The manifest listed no `output[]` file: nothing was imported.
    pub nothing_to_import: bool,
    pub files: u32,
    pub files_staged: u32,
    pub bytes: u64,
    pub resources: u64,
    /// Resources staged per `output[]` type.
    pub resources_by_type: BTreeMap<String, u64>,
    pub imported_files: u32,
    pub deleted: u64,
    pub already_absent: u64,
    pub source_errors: OutcomeSummary,
    pub import_job: Option<String>,
    /// File URLs the export's manifest listed more than once (each staged once).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub duplicate_urls: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailedRun {
    /// The phase that failed. Serialized as `in_phase`: `SyncState`'s tag is `phase`, and a
    /// field of the same name would overwrite it (the envelope would not decode).
    #[serde(rename = "in_phase")]
    pub phase: Phase,
    pub reason: String,
    pub summary: Summary,
    /// The failure fact that ended the run, when one did (reports read its status and kind
    /// instead of parsing `reason`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Failure>,
    /// Where a retry continues, for failures after the export's manifest was known: its
    /// staged files are kept and a retry ([`crate::effect::Input::Retry`]) picks up from
    /// there instead of exporting again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Box<ResumePoint>>,
}

/// What a failed run keeps so that a retry can continue it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResumePoint {
    pub from: ResumeFrom,
    pub export: Exported,
    /// The `$import` job that ran: the one that succeeded before a deletions failure, or the
    /// one that failed (replaced by the retry's kick-off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_job: Option<String>,
    #[serde(default)]
    pub deleted: u64,
    #[serde(default)]
    pub absent: u64,
    /// The export job was left at the source (files remain to be downloaded); it is deleted
    /// when the run finally ends or is abandoned.
    #[serde(default)]
    pub export_kept: bool,
    /// Retrying may repeat something that already happened (an `IMPORT_MODE=append`
    /// kick-off whose answer was lost): someone must check first, so only an explicit retry
    /// continues the run, never a schedule or a plain rerun.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub check_first: bool,
}

/// The phase a retry continues in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumeFrom {
    /// Stage the files not staged yet (the failed ones again).
    StagingFiles,
    /// Kick off the import of every staged file again.
    KickingOffImport,
    /// Apply the deletions not applied yet.
    ApplyingDeletions,
}

impl ResumeFrom {
    pub fn phase(self) -> Phase {
        match self {
            ResumeFrom::StagingFiles => Phase::StagingFiles,
            ResumeFrom::KickingOffImport => Phase::KickingOffImport,
            ResumeFrom::ApplyingDeletions => Phase::ApplyingDeletions,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.phase().as_str()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CancelledRun {
    /// The phase the run was cancelled in (serialized as `in_phase`, see [`FailedRun`]).
    #[serde(rename = "in_phase")]
    pub phase: Phase,
    pub reason: String,
    pub summary: Summary,
}
