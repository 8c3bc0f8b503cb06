//! What the machine asks for ([`Next`], [`Request`], [`Effect`]) and what comes back
//! ([`Input`], [`EffectResult`]).
//!
//! Effects are imperative nouns; results are past-tense facts. Every request carries an
//! [`EffectId`] derived from the persisted state, and its result must echo it: a result whose
//! id the state no longer expects (a Lambda retry, a second worker, a replay) is rejected and
//! changes nothing.

use crate::bulk::{FileKind, OutcomeSummary};
use crate::retry::Failure;
use crate::spec::{PathlingApi, RunSpec, Validation};
use crate::staging::StagingKey;
use crate::state::Terminal;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// Identifies one effect so that its result can be matched, and a stale one refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "of", rename_all = "snake_case")]
pub enum EffectId {
    /// A run-level effect, issued at the run's `seq`; any accepted input moves `seq` on.
    Run { seq: u64 },
    /// A per-file staging effect: the file's index and its attempt number.
    File { index: u32, attempt: u32 },
    /// A per-file deletions effect (`ApplyDeletions`). Distinct from `File`, so that a late
    /// staging result for a `deleted[]` file can never be taken for its deletions result.
    Deletions { index: u32, attempt: u32 },
}

/// What the driver must do now. Pure: the same state and `now` give the same answer.
// One `Next` exists per step and is consumed at once; boxing the summary buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "next", rename_all = "snake_case")]
pub enum Next {
    /// Perform these effects (at most `concurrency` at once) and step each result as it
    /// arrives. Never empty.
    Run { requests: Vec<Request> },
    /// Nothing to do before `until` (always later than `now`).
    SleepUntil { until: Timestamp, reason: String },
    /// The run has ended.
    Done { terminal: Terminal },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub id: EffectId,
    pub effect: Effect,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// Start the export. Answer: `ExportAccepted` or `Failed`.
    KickoffExport(ExportKickoffRequest),
    /// Poll the export. When complete, the executor decodes the manifest with
    /// [`crate::bulk::parse_manifest`], **stores it at `manifest_key` before answering**, and
    /// answers `ExportCompleted`; otherwise `ExportInProgress` or `Failed`.
    PollExport {
        status_url: String,
        manifest_key: StagingKey,
    },
    /// Download manifest file `index` (its URL and token rule are in the stored manifest) and
    /// stream it to `key`, ensuring it ends with a newline. The bytes are checked as they
    /// stream with [`crate::content::NdjsonCheck`] (`type_name`, `validate`): a violation
    /// aborts the upload and answers `Failed` with [`crate::retry::FailureKind::Undecodable`].
    /// For `error[]` files, fold each line into an [`OutcomeSummary`]. Answer: `FileStaged` or
    /// `Failed`.
    StageFile {
        manifest_key: StagingKey,
        index: u32,
        kind: FileKind,
        type_name: String,
        key: StagingKey,
        /// The run's `VALIDATE` setting (absent: the default).
        #[serde(default, skip_serializing_if = "Validation::is_default")]
        validate: Validation,
    },
    /// `GET {target}/metadata`; answer `PathlingDetected` (with
    /// [`crate::pathling::api_from_capability`]) or `Failed`.
    DetectPathling,
    /// `POST {target}/$import` with this Parameters body. Answer `ImportAccepted` or `Failed`
    /// (a 400 body's text in the failure message, so the generation can be recognised).
    KickoffImport {
        api: PathlingApi,
        parameters: serde_json::Value,
        /// A job to `DELETE` first (an answer of 404 or 410 is fine: it is gone).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replaces: Option<String>,
    },
    /// Poll the import job. Answer `ImportInProgress`, `ImportCompleted` with the facts of a
    /// `200` answer (the core decides whether they mean success), or `Failed`.
    PollImport { job_url: String },
    /// Read the staged `deleted[]` file at `key` ([`crate::bulk::deleted_refs`] per line) and
    /// delete those resources from the target; an absent resource counts as done. Answer
    /// `DeletionsApplied` or `Failed`.
    ApplyDeletions { index: u32, key: StagingKey },
    /// Best-effort `DELETE {status_url}` so the source can free the export. Any answer is fine.
    DeleteExportJob { status_url: String },
}

impl Effect {
    /// A short, stable name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Effect::KickoffExport(_) => "kickoff_export",
            Effect::PollExport { .. } => "poll_export",
            Effect::StageFile { .. } => "stage_file",
            Effect::DetectPathling => "detect_pathling",
            Effect::KickoffImport { .. } => "kickoff_import",
            Effect::PollImport { .. } => "poll_import",
            Effect::ApplyDeletions { .. } => "apply_deletions",
            Effect::DeleteExportJob { .. } => "delete_export_job",
        }
    }
}

/// A Bulk Data kick-off, fully resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportKickoffRequest {
    /// `{source}/$export`, `{source}/Patient/$export` or `{source}/Group/{id}/$export`.
    pub url: String,
    /// Query parameters for a GET, in order (values unencoded).
    pub query: Vec<(String, String)>,
    /// Present when the kick-off must be a POST (the `patient` parameter): a FHIR Parameters
    /// resource carrying every parameter; `query` is then empty.
    pub post_body: Option<serde_json::Value>,
}

/// An input to the machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "snake_case")]
pub enum Input {
    /// The result of the effect `id`.
    Completed { id: EffectId, result: EffectResult },
    /// Stop the run: the export job is deleted (best effort) and the run ends `Cancelled`.
    /// Also abandons a failed run that could be retried (its kept export job is deleted).
    /// The reason is cut to [`crate::machine::MAX_REASON_BYTES`] and control characters are
    /// dropped: it may come from an untrusted execution input.
    Cancel { reason: String },
    /// Continue a failed run from its [`crate::state::ResumePoint`]. The run adopts `spec`'s
    /// import, retry and transfer settings (the operator may have fixed them); its export
    /// and bound settings stay.
    Retry { spec: Box<RunSpec> },
    /// The driver is about to perform `id`, an effect that must not be repeated blindly
    /// ([`crate::SyncRun::record_before`]); persist the run before performing it. The
    /// effect is then expected under the new `seq` ([`crate::SyncRun::sending`]).
    Sending { id: EffectId },
}

/// What an effect achieved, as facts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum EffectResult {
    ExportAccepted {
        status_url: String,
    },
    ExportInProgress {
        progress: Option<String>,
        retry_after: Option<String>,
    },
    /// The manifest, already stored at the effect's `manifest_key`.
    ExportCompleted {
        digest: ManifestDigest,
    },
    FileStaged {
        bytes: u64,
        resources: u64,
        newline_added: bool,
        /// For `error[]` files: what their OperationOutcomes said.
        outcomes: Option<OutcomeSummary>,
    },
    PathlingDetected {
        api: Option<PathlingApi>,
        version: Option<String>,
    },
    ImportAccepted {
        job_url: String,
    },
    ImportInProgress {
        progress: Option<String>,
        retry_after: Option<String>,
    },
    ImportCompleted {
        answer: crate::pathling::ImportAnswer,
    },
    DeletionsApplied {
        deleted: u64,
        absent: u64,
    },
    ExportJobDeleted,
    Failed(Failure),
}

/// The part of a manifest the machine keeps: per file its kind and type (in index order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestDigest {
    pub transaction_time: String,
    pub files: Vec<(FileKind, String)>,
    /// File URLs the manifest listed again after their first listing (not in `files`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub duplicates: u32,
    /// A hash of every file's array, type and URL without its query (a pre-signed URL signed
    /// again keeps its path): a retried run continues its staged files only under the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_hash: Option<u64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// FNV-1a over each file's array, type and URL up to its query, with separators.
fn files_hash(files: &[crate::bulk::ManifestFile]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for f in files {
        let path = f.url.split(['?', '#']).next().unwrap_or("");
        eat(f.kind.as_str().as_bytes());
        eat(b"\0");
        eat(f.type_name.as_bytes());
        eat(b"\0");
        eat(path.as_bytes());
        eat(b"\n");
    }
    h
}

impl crate::bulk::Manifest {
    pub fn digest(&self) -> ManifestDigest {
        ManifestDigest {
            transaction_time: self.transaction_time.clone(),
            files: self
                .files
                .iter()
                .map(|f| (f.kind, f.type_name.clone()))
                .collect(),
            duplicates: self.duplicates,
            files_hash: Some(files_hash(&self.files)),
        }
    }
}

/// Why an input was refused. The state is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("the run has ended; input ignored")]
    Ended,
    #[error("stale or duplicate result for {got:?}; the run expects something else now")]
    Stale { got: EffectId },
    #[error("result {result} does not answer the effect the run is waiting for ({phase})")]
    Mismatch {
        result: String,
        phase: crate::state::Phase,
    },
    #[error("the run ({phase}) cannot be retried: only a run that failed after its export's manifest was known can")]
    NotRetryable { phase: crate::state::Phase },
}

impl Effect {
    /// Builds the kick-off request a spec asks for.
    pub fn export_kickoff(spec: &RunSpec, since: Option<&str>) -> ExportKickoffRequest {
        use crate::spec::ExportLevel;
        let e = &spec.export;
        let base = &spec.source.endpoint;
        let url = match &e.level {
            ExportLevel::System => format!("{base}/$export"),
            ExportLevel::Patient => format!("{base}/Patient/$export"),
            ExportLevel::Group(id) => format!("{base}/Group/{id}/$export"),
        };
        let mut params: Vec<(String, String)> =
            vec![("_outputFormat".into(), e.output_format.clone())];
        if let Some(s) = since {
            params.push(("_since".into(), s.to_string()));
        }
        if !e.types.is_empty() {
            params.push(("_type".into(), e.types.join(",")));
        }
        if !e.elements.is_empty() {
            params.push(("_elements".into(), e.elements.join(",")));
        }
        for f in &e.type_filters {
            params.push(("_typeFilter".into(), f.clone()));
        }
        if !e.include_associated_data.is_empty() {
            params.push((
                "includeAssociatedData".into(),
                e.include_associated_data.join(","),
            ));
        }
        if e.patients.is_empty() {
            return ExportKickoffRequest {
                url,
                query: params,
                post_body: None,
            };
        }
        let mut parameter: Vec<serde_json::Value> = params
            .into_iter()
            .map(|(name, value)| {
                let key = if name == "_since" {
                    "valueInstant"
                } else {
                    "valueString"
                };
                serde_json::json!({"name": name, key: value})
            })
            .collect();
        for p in &e.patients {
            parameter
                .push(serde_json::json!({"name": "patient", "valueReference": {"reference": p}}));
        }
        ExportKickoffRequest {
            url,
            query: Vec::new(),
            post_body: Some(
                serde_json::json!({"resourceType": "Parameters", "parameter": parameter}),
            ),
        }
    }
}
