//! The original's five Lambda handlers, with its input and output shapes, so that its Step
//! Functions definition (`FHIR export` → `Check export status` → `Transfer to S3` →
//! `Pathling import` → `Check import status`) runs unchanged on this project's functions.
//!
//! | handler | input | output |
//! |---|---|---|
//! | `fhirExport` | (ignored) | `{"statusUrl"}` |
//! | `checkExportStatus` | `{"statusUrl"}` | `{"result": <manifest>}`, or `JobInProgressError` |
//! | `transferToS3` | `{"result": <manifest>}` | `{"parameters": <Parameters>}`, or `JobInProgressError` while files remain |
//! | `pathlingImport` | `{"parameters"}` | `{"statusUrl"}`, or `{"statusUrl": null}` (no call) without inputs |
//! | `checkImportStatus` | `{"statusUrl"}` | `{"result": <body>}`, or `JobInProgressError` |
//!
//! Every HTTP, auth and staging detail goes through the shared [`Executor`]; the transfer is
//! the core machine's staging phase, driven by [`driver::drive_until`].
//!
//! Defects of the original fixed here:
//! - **A retried transfer imports everything.** The transfer's run id is derived from the
//!   manifest (`request` + `transactionTime`), its progress is an envelope at
//!   `{prefix}{run}/transfer-state.json`, and `parameters` always lists every staged
//!   `output[]` file (the original skipped objects that already existed and left them out).
//! - **A transfer longer than one invocation finishes.** It stages what fits the invocation's
//!   budget, saves its progress, and fails with `JobInProgressError` naming it; the
//!   definition's `Retry` (`States.ALL`) calls it again and it continues.
//! - **Manifests larger than a Step Functions payload.** `checkExportStatus` stores a manifest
//!   of more than [`INLINE_MANIFEST_LIMIT`] bytes in the staging store and returns a stub
//!   naming it (`pathlingImportManifest`), which `transferToS3` reads back.
//! - **Pathling 9.2+.** `transferToS3` emits the original's 7.x `source` shape (compatible with
//!   anything that consumed it) unless `PATHLING_API=9`; `pathlingImport` sends it as given when
//!   it fits the target, and converts it to the other generation's shape when the target is
//!   the other generation (configured, detected from `/metadata`, or recognised from the 400
//!   answer).

use super::{effective_budget, storage_failure, ExecutorCache};
use crate::auth::Side;
use crate::aws::{self, LambdaFailure};
use crate::driver::LogObserver;
use crate::driver::{self, DriveOptions, RunStore, Stopped, StoreError};
use crate::executor::{now, Executor, JobPoll};
use crate::resume::admit;
use crate::staging::StagingStore;
use bytes::Bytes;
use pathling_import_core::bulk::parse_manifest;
use pathling_import_core::config::Config;
use pathling_import_core::effect::{Effect, EffectId, EffectResult, Input, Request};
use pathling_import_core::pathling::{
    import_parameters, judge_import_answer, read_import_answer, read_parameters, ImportAnswer,
    ImportInput,
};
use pathling_import_core::persist;
use pathling_import_core::retry::{classify, stable_hash, Failure, Verdict};
use pathling_import_core::spec::{PathlingApi, PathlingApiChoice, SinceSpec};
use pathling_import_core::state::{ApiState, FileStatus, SyncState};
use pathling_import_core::{SyncRun, Terminal, Timestamp};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Manifests up to this size are returned inline by `checkExportStatus`; larger ones would
/// not fit Step Functions' 256 KiB payload next to the rest of the state.
pub const INLINE_MANIFEST_LIMIT: usize = 192 * 1024;
/// The stub's member naming the stored manifest's key.
pub const MANIFEST_REF: &str = "pathlingImportManifest";
/// How often the transfer's progress is written to the staging store while it runs (and
/// always when the invocation ends): a crash repeats at most this much work.
const SAVE_EVERY: Duration = Duration::from_secs(10);

/// The five handlers, by the names of the original's `handlers` module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Handler {
    FhirExport,
    CheckExportStatus,
    TransferToS3,
    PathlingImport,
    CheckImportStatus,
}

impl Handler {
    pub const ALL: [Handler; 5] = [
        Handler::FhirExport,
        Handler::CheckExportStatus,
        Handler::TransferToS3,
        Handler::PathlingImport,
        Handler::CheckImportStatus,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Handler::FhirExport => "fhirExport",
            Handler::CheckExportStatus => "checkExportStatus",
            Handler::TransferToS3 => "transferToS3",
            Handler::PathlingImport => "pathlingImport",
            Handler::CheckImportStatus => "checkImportStatus",
        }
    }

    /// Reads a Lambda `Handler` setting: `fhirExport`, or the original's
    /// `handlers.fhirExport` / `index.fhirExport` (the part after the last dot counts).
    pub fn from_setting(setting: &str) -> Option<Handler> {
        let name = setting.trim().rsplit('.').next().unwrap_or_default();
        Handler::ALL.into_iter().find(|h| h.name() == name)
    }
}

impl std::fmt::Display for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The handlers' configuration and clients, built once per container.
pub struct Handlers {
    handler: Handler,
    config: Config,
    executors: ExecutorCache,
    budget: Option<Duration>,
}

impl Handlers {
    /// Validates the configuration for `handler` and builds its clients.
    pub async fn new(handler: Handler, config: Config) -> Result<Handlers, LambdaFailure> {
        if handler == Handler::FhirExport && config.spec.export.since == SinceSpec::LastSuccess {
            return Err(LambdaFailure::configuration(
                "SINCE: `auto` needs the run history that only the project's own state machine \
                 (state-machine.json) keeps; give the compatibility handlers a FHIR instant",
            ));
        }
        // Read for validation only: the handlers sleep through any wait within their budget.
        aws::max_sleep(&config, super::DEFAULT_MAX_SLEEP)?;
        let budget = aws::configured_budget(&config)?;
        let executors = ExecutorCache::new(&config);
        executors.for_spec(&config.spec).await?;
        Ok(Handlers {
            handler,
            config,
            executors,
            budget,
        })
    }

    pub fn handler(&self) -> Handler {
        self.handler
    }

    /// `LAMBDA_TIME_BUDGET`, for [`aws::budget_until`].
    pub fn configured_budget(&self) -> Option<Duration> {
        self.budget
    }

    /// One invocation of the handler.
    pub async fn invoke(
        &self,
        input: Value,
        budget_until: Timestamp,
    ) -> Result<Value, LambdaFailure> {
        let executor = self.executors.for_spec(&self.config.spec).await?;
        match self.handler {
            Handler::FhirExport => self.fhir_export(&executor).await,
            Handler::CheckExportStatus => {
                let url = status_url(&input)?;
                self.check_export_status(&executor, url).await
            }
            Handler::TransferToS3 => self.transfer_to_s3(&executor, &input, budget_until).await,
            Handler::PathlingImport => self.pathling_import(&executor, &input).await,
            Handler::CheckImportStatus => {
                let url = status_url(&input)?;
                check_import_status(&executor, url).await
            }
        }
    }

    async fn fhir_export(&self, executor: &Executor) -> Result<Value, LambdaFailure> {
        let since = match &self.config.spec.export.since {
            SinceSpec::None => None,
            SinceSpec::At(s) => Some(s.as_str()),
            SinceSpec::LastSuccess => None,
        };
        let effect = Effect::KickoffExport(Effect::export_kickoff(&self.config.spec, since));
        match execute(executor, effect).await {
            EffectResult::ExportAccepted { status_url } => Ok(json!({ "statusUrl": status_url })),
            EffectResult::Failed(f) => Err(effect_failure("export kick-off", &f)),
            other => Err(unexpected("export kick-off", &other)),
        }
    }

    async fn check_export_status(
        &self,
        executor: &Executor,
        status_url: &str,
    ) -> Result<Value, LambdaFailure> {
        let body = match executor.poll_job(Side::Source, status_url).await {
            Ok(JobPoll::InProgress { progress, .. }) => {
                return Err(in_progress("Export job", progress.as_deref()))
            }
            Ok(JobPoll::Completed { body, .. }) => body,
            Err(f) => return Err(effect_failure("export status", &f)),
        };
        // Validate as the machine would, so that a bad manifest fails here, clearly.
        parse_manifest(&body, &self.config.spec.source.endpoint)
            .map_err(|e| LambdaFailure::sync_failed(format!("export status: {e}")))?;
        let manifest: Value = serde_json::from_slice(&body)
            .map_err(|e| LambdaFailure::sync_failed(format!("export status: {e}")))?;
        if body.len() <= INLINE_MANIFEST_LIMIT {
            return Ok(json!({ "result": manifest }));
        }
        // Too large for the payload: keep it in the staging store, return a stub naming it.
        let run_id = transfer_run_id(&manifest);
        let key = stored_manifest_key(&self.config, &run_id);
        executor
            .staging()
            .put_bytes(&key, body)
            .await
            .map_err(|e| {
                storage_failure(
                    &format!("storing the manifest at {key}"),
                    &e,
                    aws::ErrorType::SyncFailed,
                )
            })?;
        let mut stub = serde_json::Map::new();
        for field in ["transactionTime", "request", "requiresAccessToken"] {
            if let Some(v) = manifest.get(field) {
                stub.insert(field.into(), v.clone());
            }
        }
        stub.insert(MANIFEST_REF.into(), Value::String(key));
        Ok(json!({ "result": stub }))
    }

    async fn transfer_to_s3(
        &self,
        executor: &Executor,
        input: &Value,
        budget_until: Timestamp,
    ) -> Result<Value, LambdaFailure> {
        let manifest = input
            .get("result")
            .filter(|r| r.is_object())
            .ok_or_else(|| {
                LambdaFailure::state("the input has no \"result\" object (the export manifest)")
            })?;
        let run_id = transfer_run_id(manifest);
        let body = match manifest.get(MANIFEST_REF) {
            Some(reference) => self.stored_manifest(executor, &run_id, reference).await?,
            None => Bytes::from(manifest.to_string()),
        };
        let staging = executor.staging().clone();
        let state_key = transfer_state_key(&self.config, &run_id);
        let run = match staging
            .get_bytes(&state_key, crate::staging::MAX_STATE_OBJECT)
            .await
            .map_err(|e| {
                storage_failure(
                    &format!("reading {state_key}"),
                    &e,
                    aws::ErrorType::SyncFailed,
                )
            })? {
            Some(stored) => {
                let run = persist::decode(&stored)
                    .map_err(|e| LambdaFailure::state(format!("{state_key}: {e}")))?;
                // The stored progress is only used with the settings it was made with: the
                // staging bucket's writers must not choose where our credentials go.
                let run = match admit(run, &self.config.spec, false) {
                    Ok(admitted) => admitted.run().clone(),
                    Err(refused) => {
                        return Err(LambdaFailure::state(format!("{state_key}: {refused}")))
                    }
                };
                // A transfer that failed for good is retried by the definition's `Retry`:
                // continue it, re-staging only what is missing.
                if run.resumable().is_some() {
                    let retried = run
                        .step(
                            Input::Retry {
                                spec: Box::new(self.config.spec.clone()),
                            },
                            now(),
                        )
                        .map_err(|e| LambdaFailure::state(e.to_string()))?;
                    tracing::info!(run_id = %retried.run_id, "retrying a failed transfer");
                    retried
                } else {
                    run
                }
            }
            None => {
                let run = self.new_transfer(executor, &run_id, &body).await?;
                write_run(&staging, &state_key, &run).await?;
                run
            }
        };
        let executor = self.executors.for_spec(&run.spec).await?;
        let mut store = TransferStore {
            staging: staging.clone(),
            key: state_key.clone(),
            last_write: Instant::now(),
        };
        // A file waiting to be retried is waited for inside the invocation when the wait ends
        // within the budget: the original definition retries the transfer only five times,
        // 60 s apart, which a longer backoff would use up.
        let options = DriveOptions::new(Duration::MAX, Some(effective_budget(budget_until, now())));
        let (run, stopped) = driver::drive_until(
            run,
            executor.as_ref(),
            &mut store,
            &options,
            &LogObserver::default(),
            std::future::pending(),
            |r| !matches!(r.state, SyncState::StagingFiles(_)),
        )
        .await
        .map_err(|e| LambdaFailure::transient(format!("transfer: {e}")))?;
        // Always at the end: the store writes at most every SAVE_EVERY while driving.
        write_run(&staging, &state_key, &run).await?;
        self.transfer_outcome(&run, &stopped)
    }

    /// Reads a manifest that `checkExportStatus` stored, checking that the reference is the
    /// key it would have used for this manifest.
    async fn stored_manifest(
        &self,
        executor: &Executor,
        run_id: &str,
        reference: &Value,
    ) -> Result<Bytes, LambdaFailure> {
        let expected = stored_manifest_key(&self.config, run_id);
        if reference.as_str() != Some(expected.as_str()) {
            return Err(LambdaFailure::state(format!(
                "{MANIFEST_REF} must be {expected:?} for this transactionTime and request"
            )));
        }
        executor
            .staging()
            .get_bytes(
                &expected,
                self.config
                    .spec
                    .transfer
                    .manifest_max_bytes
                    .saturating_mul(2),
            )
            .await
            .map_err(|e| {
                storage_failure(
                    &format!("reading {expected}"),
                    &e,
                    aws::ErrorType::SyncFailed,
                )
            })?
            .ok_or_else(|| {
                LambdaFailure::state(format!("the stored manifest {expected} is missing"))
            })
    }

    /// A run in the staging phase for this manifest: the manifest is stored where the
    /// executor's `StageFile` reads it, and the machine is stepped through the export phases
    /// with what the earlier handlers already did.
    async fn new_transfer(
        &self,
        executor: &Executor,
        run_id: &str,
        body: &[u8],
    ) -> Result<SyncRun, LambdaFailure> {
        let spec = &self.config.spec;
        let manifest = parse_manifest(body, &spec.source.endpoint)
            .map_err(|e| LambdaFailure::sync_failed(format!("transfer: {e}")))?;
        let request = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|m| m.get("request").and_then(Value::as_str).map(str::to_string))
            .filter(|r| pathling_import_core::bulk::origin_of(r).is_some())
            .unwrap_or_else(|| spec.source.endpoint.clone());
        let t = now();
        let manifest_key = spec.staging.manifest_key(run_id);
        let digest = executor
            .store_manifest(&manifest_key, manifest)
            .await
            .map_err(|f| effect_failure("storing the manifest", &f))?;
        // `request` stands for the export job: the handlers never DELETE it (no handler knows
        // both the job and the end of the import), and the drive stops before clean-up.
        SyncRun::from_manifest(run_id, spec.clone(), &request, digest, t)
            .map_err(|e| LambdaFailure::state(format!("starting the transfer: {e}")))
    }

    fn transfer_outcome(&self, run: &SyncRun, stopped: &Stopped) -> Result<Value, LambdaFailure> {
        let export = match &run.state {
            SyncState::StagingFiles(s) => {
                let staged = s.export.files.count_of(None, FileStatus::Staged);
                let when = match stopped {
                    Stopped::Sleeping { until } => format!("; next retry at {until}"),
                    _ => String::new(),
                };
                return Err(LambdaFailure::job_in_progress(format!(
                    "Transfer in progress: {staged}/{} file(s) staged (run {}){when}",
                    s.export.files.len(),
                    run.run_id
                )));
            }
            SyncState::KickingOffImport(s) => &s.export,
            SyncState::ApplyingDeletions(s) => &s.export,
            SyncState::PollingImport(s) => &s.export,
            SyncState::CleaningUp(c) => match &c.then {
                Terminal::Succeeded(_) => return Ok(self.parameters(&[])),
                Terminal::Failed(f) => return Err(failed_run(f)),
                Terminal::Cancelled(c) => {
                    return Err(LambdaFailure::sync_failed(format!(
                        "transfer cancelled: {}",
                        c.reason
                    )))
                }
            },
            SyncState::Failed(f) => return Err(failed_run(f)),
            SyncState::Succeeded(_) => return Ok(self.parameters(&[])),
            SyncState::Cancelled(c) => {
                return Err(LambdaFailure::sync_failed(format!(
                    "transfer cancelled: {}",
                    c.reason
                )))
            }
            SyncState::KickingOffExport(_) | SyncState::PollingExport(_) => {
                return Err(LambdaFailure::state(format!(
                    "the transfer of run {} is in phase {}",
                    run.run_id,
                    run.state.name()
                )))
            }
        };
        let api = self.parameters_api();
        Ok(self.parameters(&run.import_inputs(export, api)))
    }

    /// The shape `transferToS3` emits: the original's 7.x `source` shape unless the target is
    /// configured as 9.2+ (or the import mode only exists there).
    fn parameters_api(&self) -> PathlingApi {
        let target = &self.config.spec.target;
        match target.api {
            PathlingApiChoice::V9 => PathlingApi::V9,
            PathlingApiChoice::V7 => PathlingApi::V7,
            PathlingApiChoice::Auto if !target.import_mode.supported_by_v7() => PathlingApi::V9,
            PathlingApiChoice::Auto => PathlingApi::V7,
        }
    }

    fn parameters(&self, inputs: &[ImportInput]) -> Value {
        let api = self.parameters_api();
        json!({ "parameters": import_parameters(api, self.config.spec.target.import_mode, inputs) })
    }

    async fn pathling_import(
        &self,
        executor: &Executor,
        input: &Value,
    ) -> Result<Value, LambdaFailure> {
        let parameters = input
            .get("parameters")
            .filter(|p| p.is_object())
            .ok_or_else(|| LambdaFailure::state("the input has no \"parameters\" object"))?;
        let given = read_parameters(parameters).map_err(LambdaFailure::sync_failed)?;
        if given.inputs.is_empty() {
            return Ok(json!({ "statusUrl": null }));
        }
        // The same generation logic as the machine's (ApiState): detect, else try the shape
        // given and switch once when the answer says the target is the other generation.
        let mut state = ApiState::initial(self.config.spec.target.api);
        if state == ApiState::Detecting {
            state = match execute(executor, Effect::DetectPathling).await {
                EffectResult::PathlingDetected { api, .. } => ApiState::detected(api, given.api),
                EffectResult::Failed(f) if classify(&f) == Verdict::Transient => {
                    return Err(effect_failure("Pathling capability statement", &f))
                }
                _ => ApiState::detected(None, given.api),
            };
        }
        loop {
            let api = state.api().unwrap_or(given.api);
            let body = given
                .for_api(api, parameters)
                .map_err(LambdaFailure::sync_failed)?;
            let effect = Effect::KickoffImport {
                api,
                parameters: body,
                replaces: None,
            };
            match execute(executor, effect).await {
                EffectResult::ImportAccepted { job_url } => {
                    return Ok(json!({ "statusUrl": job_url }))
                }
                EffectResult::Failed(f) => {
                    if let Some(next) = f.status().and_then(|s| state.switched(s, &f.message)) {
                        state = next;
                        continue;
                    }
                    return Err(effect_failure("Pathling $import kick-off", &f));
                }
                other => return Err(unexpected("Pathling $import kick-off", &other)),
            }
        }
    }
}

async fn check_import_status(
    executor: &Executor,
    status_url: &str,
) -> Result<Value, LambdaFailure> {
    match executor.poll_job(Side::Target, status_url).await {
        Ok(JobPoll::InProgress { progress, .. }) => {
            Err(in_progress("Import job", progress.as_deref()))
        }
        Ok(JobPoll::Completed {
            body,
            redirected_to,
        }) => {
            // The same judgement as the machine's: only a real import result is success.
            let answer = ImportAnswer {
                redirected_to,
                ..read_import_answer(&body)
            };
            judge_import_answer(&answer).map_err(|reason| {
                LambdaFailure::sync_failed(format!("Pathling import: {reason}"))
            })?;
            let result = serde_json::from_slice::<Value>(&body)
                .map_err(|e| LambdaFailure::sync_failed(format!("Pathling import: {e}")))?;
            Ok(json!({ "result": result }))
        }
        Err(f) => Err(effect_failure("Pathling import status", &f)),
    }
}

/// The transfer's run id: stable for one manifest (its `transactionTime` and `request`), so
/// that every retry continues the same transfer and names the same staged objects.
pub fn transfer_run_id(manifest: &Value) -> String {
    let field = |name: &str| {
        manifest
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    let (time, request) = (field("transactionTime"), field("request"));
    let hash = stable_hash(&[time.as_bytes(), b"\n", request.as_bytes()]);
    let stamp: String = time
        .chars()
        .take_while(|c| *c != '.' && *c != '+' && *c != 'Z')
        .filter(|c| c.is_ascii_alphanumeric())
        .take(15)
        .collect();
    if stamp.is_empty() {
        format!("transfer-{hash:016x}")
    } else {
        format!("{stamp}Z-{hash:016x}")
    }
}

/// `{prefix}{run}/transfer-state.json`.
pub fn transfer_state_key(config: &Config, run_id: &str) -> String {
    format!(
        "{}transfer-state.json",
        config.spec.staging.run_prefix(run_id)
    )
}

/// `{prefix}{run}/export-manifest.json`: a manifest too large for the payload, as received.
pub fn stored_manifest_key(config: &Config, run_id: &str) -> String {
    format!(
        "{}export-manifest.json",
        config.spec.staging.run_prefix(run_id)
    )
}

fn status_url(input: &Value) -> Result<&str, LambdaFailure> {
    input
        .get("statusUrl")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| LambdaFailure::state("the input has no \"statusUrl\" string"))
}

async fn execute(executor: &Executor, effect: Effect) -> EffectResult {
    executor
        .execute(&Request {
            id: EffectId::Run { seq: 0 },
            effect,
        })
        .await
}

fn in_progress(what: &str, progress: Option<&str>) -> LambdaFailure {
    LambdaFailure::job_in_progress(match progress {
        Some(p) => format!("{what} in progress: {p}"),
        None => format!("{what} in progress"),
    })
}

/// A failed effect: transient failures are worth the definition's retry, others are final.
fn effect_failure(what: &str, f: &Failure) -> LambdaFailure {
    let message = format!("{what}: {f}");
    match classify(f) {
        Verdict::Transient => LambdaFailure::transient(message),
        Verdict::Permanent => LambdaFailure::sync_failed(message),
    }
}

fn failed_run(f: &pathling_import_core::state::FailedRun) -> LambdaFailure {
    LambdaFailure::sync_failed(format!("transfer failed in {}: {}", f.phase, f.reason))
}

fn unexpected(what: &str, result: &EffectResult) -> LambdaFailure {
    LambdaFailure::state(format!("{what}: unexpected result {result:?}"))
}

async fn write_run(staging: &StagingStore, key: &str, run: &SyncRun) -> Result<(), LambdaFailure> {
    staging
        .put_bytes(key, Bytes::from(persist::encode_string(run)))
        .await
        .map_err(|e| {
            storage_failure(
                &format!("saving the transfer's progress to {key}"),
                &e,
                aws::ErrorType::SyncFailed,
            )
        })
}

/// Keeps the transfer's envelope in the staging store, written at most every
/// [`SAVE_EVERY`] (10,000 small files would otherwise mean 10,000 writes of the envelope)
/// and always at the end of the invocation.
struct TransferStore {
    staging: StagingStore,
    key: String,
    last_write: Instant,
}

impl RunStore for TransferStore {
    async fn save(&mut self, run: &SyncRun) -> Result<u64, StoreError> {
        if self.last_write.elapsed() < SAVE_EVERY {
            return Ok(0);
        }
        let envelope = Bytes::from(persist::encode_string(run));
        let bytes = envelope.len() as u64;
        self.staging
            .put_bytes(&self.key, envelope)
            .await
            .map_err(|e| StoreError::Io(format!("saving the transfer's progress: {e}")))?;
        self.last_write = Instant::now();
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn handler_settings_are_read_like_the_original_module_paths() {
        assert_eq!(
            Handler::from_setting("fhirExport"),
            Some(Handler::FhirExport)
        );
        assert_eq!(
            Handler::from_setting("handlers.transferToS3"),
            Some(Handler::TransferToS3)
        );
        assert_eq!(
            Handler::from_setting("dist/index.checkImportStatus"),
            Some(Handler::CheckImportStatus)
        );
        assert_eq!(Handler::from_setting("bootstrap"), None);
        for h in Handler::ALL {
            assert_eq!(Handler::from_setting(h.name()), Some(h));
        }
    }

    #[test]
    fn transfer_run_ids_are_stable_valid_and_distinct() {
        let m = json!({"transactionTime": "2024-05-01T10:20:30.123+00:00", "request": "https://x/$export"});
        let id = transfer_run_id(&m);
        assert_eq!(id, transfer_run_id(&m.clone()));
        assert!(id.starts_with("20240501T102030Z-"), "{id}");
        assert!(id.len() <= 64);
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        let other = json!({"transactionTime": "2024-05-01T10:20:30.123+00:00", "request": "https://x/$export?_type=Patient"});
        assert_ne!(id, transfer_run_id(&other));
        let hostile = json!({"transactionTime": "../../x", "request": 5});
        let id = transfer_run_id(&hostile);
        assert!(
            id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "{id}"
        );
    }
}
