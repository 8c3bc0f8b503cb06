//! A fake Pathling server speaking both `$import` generations (see `docs/protocols.md`,
//! §3 "Pathling `$import`").
//!
//! [`FakePathling::start`] binds `127.0.0.1:0`; the FHIR base is `{origin}{fhir_path}`
//! (default `/fhir`). Knobs are in [`PathlingConfig`] and may change while it runs
//! ([`FakePathlingHandle::update`]); the handle exposes the stored resources, the import
//! requests received and counters.
//!
//! Contract:
//! - `GET metadata`: CapabilityStatement whose `software` is `{"name": "Pathling", "version":
//!   "7.2.0+abc"}` ([`Generation::V7`]) or `{"name": "Pathling Server", "version":
//!   "9.8.0+abc"}` ([`Generation::V9`]); [`PathlingConfig::version_override`] can make the
//!   version `UNKNOWN`.
//! - `POST $import`:
//!   - `Content-Type: application/fhir+json` (9.x also `application/json` for the JSON
//!     manifest form) else 415; `Accept` must list `application/fhir+json` else 406;
//!     `Prefer: respond-async` is mandatory on 9.x (400 without); 7.x without it imports
//!     synchronously and answers 200.
//!   - 7.x body: `Parameters` with `source` parts (`resourceType` valueCode, `url` valueUrl,
//!     `mode` valueCode `overwrite` (default) | `merge`, `format` valueCode `ndjson` (default) |
//!     `parquet` | `delta`). The 9.x shape gets 400 with a message naming the shape. `s3://` is
//!     rewritten to `s3a://`; the URL must `startsWith` an allowable source (original or
//!     rewritten form) else 400 "Not allowed to import from URL: ...".
//!   - 9.x body: `Parameters` with `inputFormat`, `saveMode` (valueCode only; a valueCoding is
//!     400) and `input` parts (`resourceType`, `url`), or the JSON manifest. No `input` (e.g.
//!     the 7.x shape) gets 400 "The input may not be empty."; a URL outside the allow-list
//!     gets 403 "{url} is not an allowed source for import.".
//!   - One import at a time: a kick-off while a job is unfinished gets 503 "Another import
//!     operation is currently in progress" (also forced by
//!     [`PathlingConfig::external_import_running`]). On 9.x an identical body returns the
//!     existing job (even a failed one) until that job is DELETEd.
//!   - 202 + `Content-Location: {base}/$job?id={uuid}`.
//! - Jobs: the data is read in the background (`file:///abs/path`, a file or a directory of
//!   files; `s3://`/`s3a://bucket/key` through [`PathlingConfig::s3`], a key or, if absent, the
//!   objects under `key/`; `.gz` names are gunzipped). Each non-blank line must be JSON with
//!   the declared `resourceType` and an `id`, else the job fails (400 OperationOutcome). The
//!   first [`PathlingConfig::import_duration_polls`] polls answer 202 with `X-Progress: NN%`;
//!   the changes are applied when the job is first reported complete (immediately when that
//!   knob is 0), then 200: 7.x an OperationOutcome "Data import completed successfully", 9.x a
//!   `Parameters` with `transactionTime`, `request` and one `output` (part `inputUrl`) per
//!   input. `DELETE` a job → 202, then 404; unknown jobs 404.
//! - Save modes: 7.x applies each `source` in order (so two `overwrite` sources of one type
//!   leave only the second). 9.x groups inputs by type, then `merge` upserts by id,
//!   `overwrite` replaces the type, `append` upserts too (the fake cannot hold duplicate ids,
//!   a real Delta append would), `ignore` skips types that have data, `error` fails the job if
//!   any input type has data.
//! - 9.x deletes: `DELETE {Type}/{id}` → 204 (404 if absent), `POST {base}` with a `batch`
//!   Bundle of `DELETE` entries → `batch-response` with a status per entry. 7.x answers 405 to
//!   both. `GET {Type}/{id}` reads a stored resource on both.
//! - Misbehaviour for tests of the client's judgement: [`PathlingConfig::finished_answer`]
//!   replaces a finished job's `200` answer (another body, or a `302` to a same-origin
//!   `GET /login` page answering `200` HTML, as an authenticating proxy would);
//!   [`PathlingConfig::import_answer_delay`] holds back the answer to an accepted `$import`
//!   (the job exists and is counted at once).
//! - With [`PathlingConfig::auth`], the server serves its own SMART discovery and token
//!   endpoint ([`crate::auth`]) and every endpoint but `metadata` and discovery needs a bearer
//!   token. Pathling's mapping of scopes to authorities is not modelled.

// Handlers build their error answers early and pass them up as `Err(Response)`; these are cold
// paths of a test server, so the size of `Response` does not matter.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{OriginalUri, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use crate::auth::{smart_configuration, AuthConfig, AuthRuntime, AuthStats};
use crate::fhir::{
    empty_response, fhir_response, header_has_token, header_lists_media_type, header_str,
    is_resource_type_name, media_type_of, now_instant, operation_outcome, outcome_response,
    parameters_of, part_value, set_header, FHIR_JSON, FHIR_NDJSON,
};
use crate::server::{Bound, Running};

/// Which Pathling API generation the fake speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generation {
    /// Pathling 7.x: `source` parts, `mode`.
    V7,
    /// Pathling 9.2+: `input`, `saveMode`, `inputFormat`, deletes.
    V9,
}

/// How the fake reaches S3 (any S3-compatible server: moto, s3s-fs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Access {
    /// e.g. `http://127.0.0.1:9000`.
    pub endpoint_url: String,
    /// e.g. `us-east-1`.
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret key.
    pub secret_access_key: String,
}

impl S3Access {
    /// Path-style access to an endpoint in `us-east-1` with the given credentials.
    pub fn new(endpoint_url: &str, access_key_id: &str, secret_access_key: &str) -> Self {
        Self {
            endpoint_url: endpoint_url.into(),
            region: "us-east-1".into(),
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
        }
    }
}

/// A failure answer: status and OperationOutcome text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportFailure {
    /// HTTP status.
    pub status: u16,
    /// OperationOutcome `issue.code`.
    pub code: String,
    /// OperationOutcome `issue.diagnostics`.
    pub diagnostics: String,
}

impl ImportFailure {
    /// A failure with the given status, code and text.
    pub fn new(status: u16, code: &str, diagnostics: &str) -> Self {
        Self {
            status,
            code: code.into(),
            diagnostics: diagnostics.into(),
        }
    }

    fn response(&self) -> Response {
        outcome_response(
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &self.code,
            &self.diagnostics,
        )
    }
}

/// What a finished job's poll answers instead of its real result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishedAnswer {
    /// `200 OK` with this `Content-Type` and body.
    Body {
        /// `Content-Type` header.
        content_type: String,
        /// Body as sent.
        body: String,
    },
    /// `302 Found` to `{origin}/login`, which answers `200 OK` with [`LOGIN_PAGE`].
    LoginRedirect,
}

impl FinishedAnswer {
    /// `200 OK` with a body of the given content type.
    pub fn body(content_type: &str, body: &str) -> Self {
        FinishedAnswer::Body {
            content_type: content_type.into(),
            body: body.into(),
        }
    }
}

/// What `GET /login` answers (the target of [`FinishedAnswer::LoginRedirect`]).
pub const LOGIN_PAGE: &str = "<!DOCTYPE html>\n<html><head><title>Sign in</title></head>\n\
    <body><form action=\"/login\" method=\"post\">Please sign in.</form></body></html>\n";

/// Every knob of the fake Pathling. All can change at run time.
#[derive(Clone, Debug)]
pub struct PathlingConfig {
    /// API generation.
    pub generation: Generation,
    /// Replaces the `software.version` in `metadata` (e.g. `UNKNOWN`).
    pub version_override: Option<String>,
    /// `pathling.import.allowableSources` (plain prefixes).
    pub allowable_sources: Vec<String>,
    /// SMART auth; `None` = open server.
    pub auth: Option<AuthConfig>,
    /// How to read `s3://`/`s3a://` URLs; without it such imports fail.
    pub s3: Option<S3Access>,
    /// Polls answered 202 before a job completes.
    pub import_duration_polls: u32,
    /// Path of the FHIR base, e.g. `/fhir`. Routes are built at start: changing it later does
    /// not move them.
    pub fhir_path: String,
    /// Pretend someone else's import runs: every kick-off gets 503.
    pub external_import_running: bool,
    /// 9.x: an identical body returns the existing job.
    pub dedupe_identical_requests: bool,
    /// Make every job fail with this when it would complete.
    pub fail_imports: Option<ImportFailure>,
    /// Delay before handling any request.
    pub latency: Duration,
    /// A finished job's `200` answer is replaced by this (the job itself completes or fails
    /// as usual); `None` = the real answer.
    pub finished_answer: Option<FinishedAnswer>,
    /// Delay of the answer to `POST $import`, after the request was handled (a job created)
    /// and counted: a client stopped meanwhile never learns the answer.
    pub import_answer_delay: Duration,
}

impl PathlingConfig {
    /// A 7.x server allowing the given URL prefixes.
    pub fn v7(allowable_sources: &[&str]) -> Self {
        Self {
            generation: Generation::V7,
            version_override: None,
            allowable_sources: allowable_sources.iter().map(|s| s.to_string()).collect(),
            auth: None,
            s3: None,
            import_duration_polls: 1,
            fhir_path: "/fhir".into(),
            external_import_running: false,
            dedupe_identical_requests: true,
            fail_imports: None,
            latency: Duration::ZERO,
            finished_answer: None,
            import_answer_delay: Duration::ZERO,
        }
    }

    /// A 9.x server allowing the given URL prefixes.
    pub fn v9(allowable_sources: &[&str]) -> Self {
        Self {
            generation: Generation::V9,
            ..Self::v7(allowable_sources)
        }
    }
}

/// A save mode (7.x `mode` knows only the first two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveMode {
    /// Upsert by id.
    Merge,
    /// Replace all resources of the type.
    Overwrite,
    /// Add (modelled as upsert).
    Append,
    /// Skip types that already have data.
    Ignore,
    /// Fail if a type already has data.
    Error,
}

impl SaveMode {
    fn parse(text: &str, generation: Generation) -> Option<Self> {
        match (text, generation) {
            ("merge", _) => Some(SaveMode::Merge),
            ("overwrite", _) => Some(SaveMode::Overwrite),
            ("append", Generation::V9) => Some(SaveMode::Append),
            ("ignore", Generation::V9) => Some(SaveMode::Ignore),
            ("error", Generation::V9) => Some(SaveMode::Error),
            _ => None,
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SaveMode::Merge => "merge",
            SaveMode::Overwrite => "overwrite",
            SaveMode::Append => "append",
            SaveMode::Ignore => "ignore",
            SaveMode::Error => "error",
        }
    }
}

/// One input of an import as the fake understood it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportInput {
    /// Declared resource type.
    pub resource_type: String,
    /// URL to read (7.x: after the `s3://` → `s3a://` rewrite).
    pub url: String,
    /// URL as sent (9.x reports it back as `inputUrl`).
    pub original_url: String,
    /// Mode of this input (9.x: the request's `saveMode`).
    pub mode: SaveMode,
    /// `ndjson`/`application/fhir+ndjson`, or another format the fake cannot read.
    pub format: String,
}

/// Lifecycle of an import job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStatus {
    /// Reading the sources.
    Running,
    /// Sources read; waiting for the configured polls before applying.
    Loaded,
    /// Applied; answers 200.
    Completed,
    /// Failed; answers its error.
    Failed,
    /// DELETEd; answers 404.
    Cancelled,
}

/// A summary of a job for inspection.
#[derive(Clone, Debug)]
pub struct ImportJobInfo {
    /// Job id.
    pub id: String,
    /// Where it is.
    pub status: JobStatus,
    /// GETs of the job URL.
    pub polls: u32,
    /// Inputs.
    pub inputs: Vec<ImportInput>,
    /// The failure, when failed.
    pub failure: Option<ImportFailure>,
}

/// One `$import` request as received.
#[derive(Clone, Debug)]
pub struct ImportRequestRecord {
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// `Accept`.
    pub accept: Option<String>,
    /// `Prefer`.
    pub prefer: Option<String>,
    /// Body parsed as JSON (None if it was not JSON).
    pub body: Option<Value>,
    /// Status answered.
    pub status: u16,
    /// The job it created or returned.
    pub job_id: Option<String>,
}

/// Counters.
#[derive(Clone, Debug, Default)]
pub struct PathlingStats {
    /// `$import` requests.
    pub import_kickoffs: u64,
    /// New jobs created.
    pub imports_accepted: u64,
    /// 503 "another import in progress" answers.
    pub rejected_busy: u64,
    /// Identical 9.x re-submissions answered with the existing job.
    pub deduplicated: u64,
    /// 7.x imports done synchronously (no `Prefer`).
    pub sync_imports: u64,
    /// GETs of job URLs.
    pub job_polls: u64,
    /// Jobs that completed.
    pub jobs_completed: u64,
    /// Jobs that failed.
    pub jobs_failed: u64,
    /// DELETEs of job URLs that found a job.
    pub job_deletes: u64,
    /// Resources deleted (single and batch).
    pub deletes_applied: u64,
    /// Deletes of absent resources (404).
    pub deletes_not_found: u64,
    /// Batch Bundles received.
    pub batch_requests: u64,
}

type Store = BTreeMap<String, BTreeMap<String, Value>>;
type Loaded = Vec<Vec<Value>>;

#[derive(Clone, Debug)]
enum JobState {
    Running,
    Loaded(Result<Loaded, ImportFailure>),
    Completed(Value),
    Failed(ImportFailure),
    Cancelled,
}

#[derive(Clone, Debug)]
struct Job {
    id: String,
    state: JobState,
    polls: u32,
    inputs: Vec<ImportInput>,
    save_mode: SaveMode,
    body: Value,
    request_url: String,
}

impl Job {
    fn unfinished(&self) -> bool {
        matches!(self.state, JobState::Running | JobState::Loaded(_))
    }
}

#[derive(Default)]
struct Runtime {
    store: Store,
    jobs: BTreeMap<String, Job>,
    job_order: Vec<String>,
    requests: Vec<ImportRequestRecord>,
    deletes: Vec<(String, String)>,
    stats: PathlingStats,
    auth: AuthRuntime,
}

struct Shared {
    origin: String,
    config: Mutex<PathlingConfig>,
    rt: Mutex<Runtime>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn config(&self) -> PathlingConfig {
        lock(&self.config).clone()
    }

    fn base_url(&self, cfg: &PathlingConfig) -> String {
        format!("{}{}", self.origin, cfg.fhir_path)
    }
}

/// Entry point of the fake Pathling.
pub struct FakePathling;

impl FakePathling {
    /// Starts the server on `127.0.0.1:0`.
    pub async fn start(config: PathlingConfig) -> std::io::Result<FakePathlingHandle> {
        FakePathling::start_at(config, 0).await
    }

    /// As [`FakePathling::start`], on `127.0.0.1:port` (0: any free port).
    pub async fn start_at(
        config: PathlingConfig,
        port: u16,
    ) -> std::io::Result<FakePathlingHandle> {
        let bound = Bound::on(port).await?;
        let p = config.fhir_path.trim_end_matches('/').to_string();
        let config = PathlingConfig {
            fhir_path: p.clone(),
            ..config
        };
        let shared = Arc::new(Shared {
            origin: bound.origin(),
            config: Mutex::new(config),
            rt: Mutex::new(Runtime::default()),
        });
        let base_route = if p.is_empty() {
            "/".to_string()
        } else {
            p.clone()
        };
        let router = Router::new()
            .route(
                &format!("{p}/.well-known/smart-configuration"),
                get(discovery),
            )
            .route(&format!("{p}/auth/token"), post(token))
            .route(&format!("{p}/metadata"), get(metadata))
            .route(&format!("{p}/$import"), post(import))
            .route(&format!("{p}/$job"), get(poll_job).delete(delete_job))
            .route(
                &format!("{p}/{{rtype}}/{{id}}"),
                get(read_resource).delete(delete_resource),
            )
            .route(&base_route, post(batch))
            .route("/login", get(login_page))
            .layer(middleware::from_fn_with_state(shared.clone(), latency))
            // Pathling (Spring Boot) sets no limit on a JSON request body; axum's default of
            // 2 MB would refuse the `$import` of a 100,000-file export (about 15 MB).
            .layer(axum::extract::DefaultBodyLimit::max(256 * 1024 * 1024))
            .with_state(shared.clone());
        Ok(FakePathlingHandle {
            shared,
            server: bound.serve(router),
        })
    }
}

/// A running fake Pathling; dropping it stops the server.
pub struct FakePathlingHandle {
    shared: Arc<Shared>,
    server: Running,
}

impl FakePathlingHandle {
    /// Stops serving, then returns the unfinished and completed jobs as JSON, for
    /// [`FakePathlingHandle::restore_jobs`] in a later process (the imported resources
    /// themselves are not kept). Stopped first, so nothing accepted is missing.
    pub async fn shutdown_with_jobs(self) -> Value {
        let shared = self.shared.clone();
        self.shutdown().await;
        snapshot(&shared)
    }

    /// Takes over jobs saved by [`FakePathlingHandle::shutdown_with_jobs`] (entries it cannot read
    /// are skipped): an unfinished one reads its inputs again, a completed one answers as before.
    pub fn restore_jobs(&self, saved: &Value) {
        let generation = lock(&self.shared.config).generation;
        let mode = |v: &Value| SaveMode::parse(v.as_str()?, generation);
        for v in saved.as_array().into_iter().flatten() {
            let text = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
            let inputs: Option<Vec<ImportInput>> =
                v.get("inputs").and_then(Value::as_array).and_then(|a| {
                    a.iter()
                        .map(|i| {
                            let t =
                                |key: &str| i.get(key).and_then(Value::as_str).map(str::to_owned);
                            Some(ImportInput {
                                resource_type: t("resource_type")?,
                                url: t("url")?,
                                original_url: t("original_url")?,
                                mode: mode(i.get("mode")?)?,
                                format: t("format")?,
                            })
                        })
                        .collect()
                });
            let (Some(id), Some(inputs), Some(save_mode), Some(request_url), Some(body)) = (
                text("id"),
                inputs,
                v.get("save_mode").and_then(mode),
                text("request_url"),
                v.get("body").cloned(),
            ) else {
                continue;
            };
            let result = v.get("result").cloned().unwrap_or(Value::Null);
            let unfinished = result.is_null();
            let job = Job {
                id: id.clone(),
                state: if unfinished {
                    JobState::Running
                } else {
                    JobState::Completed(result)
                },
                polls: 0,
                inputs: inputs.clone(),
                save_mode,
                body,
                request_url,
            };
            {
                let mut rt = lock(&self.shared.rt);
                rt.job_order.push(id.clone());
                rt.jobs.insert(id.clone(), job);
            }
            if unfinished {
                spawn_load(self.shared.clone(), id, inputs);
            }
        }
    }

    /// The FHIR base URL, e.g. `http://127.0.0.1:PORT/fhir`.
    pub fn base_url(&self) -> String {
        self.shared.base_url(&lock(&self.shared.config))
    }

    /// `http://127.0.0.1:PORT`.
    pub fn origin(&self) -> String {
        self.shared.origin.clone()
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.server.addr().port()
    }

    /// The token endpoint (when auth is on).
    pub fn token_url(&self) -> String {
        format!("{}/auth/token", self.base_url())
    }

    /// The URL of a job.
    pub fn job_url(&self, job_id: &str) -> String {
        format!("{}/$job?id={job_id}", self.base_url())
    }

    /// Changes knobs while the server runs.
    pub fn update(&self, change: impl FnOnce(&mut PathlingConfig)) {
        change(&mut lock(&self.shared.config));
    }

    /// A copy of the configuration.
    pub fn config(&self) -> PathlingConfig {
        self.shared.config()
    }

    /// Counters.
    pub fn stats(&self) -> PathlingStats {
        lock(&self.shared.rt).stats.clone()
    }

    /// Token endpoint and bearer-check counters.
    pub fn auth_stats(&self) -> AuthStats {
        lock(&self.shared.rt).auth.stats.clone()
    }

    /// Every `$import` request received, in order.
    pub fn import_requests(&self) -> Vec<ImportRequestRecord> {
        lock(&self.shared.rt).requests.clone()
    }

    /// The last `$import` request.
    pub fn last_import_request(&self) -> Option<ImportRequestRecord> {
        lock(&self.shared.rt).requests.last().cloned()
    }

    /// Jobs in creation order.
    pub fn jobs(&self) -> Vec<ImportJobInfo> {
        let rt = lock(&self.shared.rt);
        rt.job_order
            .iter()
            .filter_map(|id| rt.jobs.get(id))
            .map(|j| ImportJobInfo {
                id: j.id.clone(),
                status: match &j.state {
                    JobState::Running => JobStatus::Running,
                    JobState::Loaded(_) => JobStatus::Loaded,
                    JobState::Completed(_) => JobStatus::Completed,
                    JobState::Failed(_) => JobStatus::Failed,
                    JobState::Cancelled => JobStatus::Cancelled,
                },
                polls: j.polls,
                inputs: j.inputs.clone(),
                failure: match &j.state {
                    JobState::Failed(f) | JobState::Loaded(Err(f)) => Some(f.clone()),
                    _ => None,
                },
            })
            .collect()
    }

    /// All stored resources: type → id → resource.
    pub fn resources(&self) -> BTreeMap<String, BTreeMap<String, Value>> {
        lock(&self.shared.rt).store.clone()
    }

    /// One stored resource.
    pub fn resource(&self, resource_type: &str, id: &str) -> Option<Value> {
        lock(&self.shared.rt)
            .store
            .get(resource_type)
            .and_then(|m| m.get(id))
            .cloned()
    }

    /// Stored ids of a type.
    pub fn resource_ids(&self, resource_type: &str) -> BTreeSet<String> {
        lock(&self.shared.rt)
            .store
            .get(resource_type)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Number of stored resources of a type.
    pub fn resource_count(&self, resource_type: &str) -> usize {
        lock(&self.shared.rt)
            .store
            .get(resource_type)
            .map_or(0, BTreeMap::len)
    }

    /// Number of stored resources of all types.
    pub fn total_resources(&self) -> usize {
        lock(&self.shared.rt)
            .store
            .values()
            .map(BTreeMap::len)
            .sum()
    }

    /// Resources deleted so far `(type, id)`, in order.
    pub fn deletes_applied(&self) -> Vec<(String, String)> {
        lock(&self.shared.rt).deletes.clone()
    }

    /// Puts resources into the store directly (upsert by `id`; resources without one are
    /// skipped).
    pub fn seed(&self, resource_type: &str, resources: impl IntoIterator<Item = Value>) {
        let mut rt = lock(&self.shared.rt);
        let map = rt.store.entry(resource_type.to_string()).or_default();
        for r in resources {
            if let Some(id) = r.get("id").and_then(Value::as_str).map(str::to_string) {
                map.insert(id, r);
            }
        }
    }

    /// Empties the store.
    pub fn clear_store(&self) {
        lock(&self.shared.rt).store.clear();
    }

    /// Invalidates all issued tokens.
    pub fn revoke_tokens(&self) {
        lock(&self.shared.rt).auth.revoke_all();
    }

    /// Stops the server, waiting briefly for in-flight requests.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

/// Unfinished and completed jobs as JSON (see [`FakePathlingHandle::shutdown_with_jobs`]).
fn snapshot(shared: &Shared) -> Value {
    let rt = lock(&shared.rt);
    let jobs = rt.job_order.iter().filter_map(|id| rt.jobs.get(id));
    Value::Array(
        jobs.filter_map(|job| {
            let result = match &job.state {
                JobState::Running | JobState::Loaded(_) => Value::Null,
                JobState::Completed(v) => v.clone(),
                JobState::Failed(_) | JobState::Cancelled => return None,
            };
            let inputs: Vec<Value> = job
                .inputs
                .iter()
                .map(|i| {
                    json!({"resource_type": i.resource_type, "url": i.url,
                           "original_url": i.original_url, "mode": i.mode.as_str(),
                           "format": i.format})
                })
                .collect();
            Some(
                json!({"id": job.id, "inputs": inputs, "save_mode": job.save_mode.as_str(),
                        "body": job.body, "request_url": job.request_url, "result": result}),
            )
        })
        .collect(),
    )
}

async fn latency(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let delay = lock(&shared.config).latency;
    if !delay.is_zero() {
        // The scenario's own wait: a server configured to answer slowly (`latency`).
        tokio::time::sleep(delay).await;
    }
    next.run(req).await
}

async fn discovery(State(shared): State<Arc<Shared>>) -> Response {
    let cfg = shared.config();
    match &cfg.auth {
        Some(auth) => crate::fhir::json_response(
            StatusCode::OK,
            &smart_configuration(auth, &format!("{}/auth/token", shared.base_url(&cfg))),
        ),
        None => outcome_response(StatusCode::NOT_FOUND, "not-found", "authorization is off"),
    }
}

async fn token(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let cfg = shared.config();
    let Some(auth) = &cfg.auth else {
        return outcome_response(StatusCode::NOT_FOUND, "not-found", "authorization is off");
    };
    let url = format!("{}/auth/token", shared.base_url(&cfg));
    lock(&shared.rt)
        .auth
        .token_endpoint(auth, &url, &headers, &body)
}

fn check_auth(shared: &Shared, cfg: &PathlingConfig, headers: &HeaderMap) -> Result<(), Response> {
    if cfg.auth.is_some() {
        lock(&shared.rt).auth.check_bearer(headers)
    } else {
        Ok(())
    }
}

async fn metadata(State(shared): State<Arc<Shared>>) -> Response {
    let cfg = shared.config();
    let (name, version) = match cfg.generation {
        Generation::V7 => ("Pathling", "7.2.0+abc"),
        Generation::V9 => ("Pathling Server", "9.8.0+abc"),
    };
    let version = cfg
        .version_override
        .clone()
        .unwrap_or_else(|| version.into());
    let mut operations = vec![json!({"name": "import",
        "definition": "https://pathling.csiro.au/fhir/OperationDefinition/import"})];
    if cfg.generation == Generation::V9 {
        operations.push(json!({"name": "import-pnp",
            "definition": "https://pathling.csiro.au/fhir/OperationDefinition/import-pnp"}));
    }
    fhir_response(
        StatusCode::OK,
        &json!({
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": now_instant(),
            "kind": "instance",
            "fhirVersion": "4.0.1",
            "format": ["json", "xml"],
            "software": {"name": name, "version": version},
            "implementation": {"description": "pathling-import test fake",
                               "url": shared.base_url(&cfg)},
            "rest": [{"mode": "server", "operation": operations}],
        }),
    )
}

fn bad(status: StatusCode, code: &str, msg: &str) -> Response {
    outcome_response(status, code, msg)
}

fn allowed(cfg: &PathlingConfig, urls: &[&str]) -> bool {
    cfg.allowable_sources
        .iter()
        .any(|prefix| urls.iter().any(|u| u.starts_with(prefix.as_str())))
}

/// Parses a 7.x `source` request.
fn parse_v7(cfg: &PathlingConfig, body: &Value) -> Result<Vec<ImportInput>, Response> {
    let params = parameters_of(body).map_err(|e| bad(StatusCode::BAD_REQUEST, "invalid", &e))?;
    let sources: Vec<&Value> = params
        .iter()
        .filter(|p| p.get("name").and_then(Value::as_str) == Some("source"))
        .collect();
    if sources.is_empty() {
        let names: BTreeSet<&str> = params
            .iter()
            .filter_map(|p| p.get("name").and_then(Value::as_str))
            .collect();
        let msg = if names.contains("input")
            || names.contains("saveMode")
            || names.contains("inputFormat")
        {
            "Missing 'source' parameter: Pathling 7 expects 'source' parts (resourceType, url, \
             mode); 'input'/'saveMode'/'inputFormat' is the Pathling 9.2+ request shape."
        } else {
            "Missing 'source' parameter."
        };
        return Err(bad(StatusCode::BAD_REQUEST, "invalid", msg));
    }
    let mut inputs = Vec::new();
    for source in sources {
        let parts = source
            .get("part")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let resource_type = match part_value(parts, "resourceType") {
            Some(("valueCode", Value::String(t))) if is_resource_type_name(t) => t.clone(),
            Some(("valueCode", v)) => {
                return Err(bad(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    &format!("Unsupported resource type: {v}"),
                ))
            }
            _ => {
                return Err(bad(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    "Each source needs a 'resourceType' part with a valueCode.",
                ))
            }
        };
        let url = match part_value(parts, "url") {
            Some(("valueUrl", Value::String(u))) => u.clone(),
            _ => {
                return Err(bad(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    "Each source needs a 'url' part with a valueUrl.",
                ))
            }
        };
        let mode = match part_value(parts, "mode") {
            None => SaveMode::Overwrite,
            Some(("valueCode", Value::String(m))) => SaveMode::parse(m, Generation::V7)
                .ok_or_else(|| {
                    bad(
                        StatusCode::BAD_REQUEST,
                        "invalid",
                        &format!("Unknown import mode: {m}"),
                    )
                })?,
            Some(_) => {
                return Err(bad(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    "The 'mode' part must be a valueCode.",
                ))
            }
        };
        let format = match part_value(parts, "format") {
            None => "ndjson".to_string(),
            Some(("valueCode", Value::String(f)))
                if ["ndjson", "parquet", "delta"].contains(&f.as_str()) =>
            {
                f.clone()
            }
            Some(_) => {
                return Err(bad(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    "The 'format' part must be a valueCode: ndjson, parquet or delta.",
                ))
            }
        };
        // Pathling 7 converts s3:// to s3a:// before reading (Hadoop's S3A filesystem).
        let rewritten = match url.strip_prefix("s3://") {
            Some(rest) => format!("s3a://{rest}"),
            None => url.clone(),
        };
        if !allowed(cfg, &[&url, &rewritten]) {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                "processing",
                &format!("Not allowed to import from URL: {rewritten}"),
            ));
        }
        inputs.push(ImportInput {
            resource_type,
            url: rewritten,
            original_url: url,
            mode,
            format,
        });
    }
    Ok(inputs)
}

/// Parses a 9.x request (Parameters or JSON manifest).
fn parse_v9(
    cfg: &PathlingConfig,
    body: &Value,
    manifest_form: bool,
) -> Result<(Vec<ImportInput>, SaveMode), Response> {
    let invalid = |msg: &str| bad(StatusCode::BAD_REQUEST, "invalid", msg);
    let mut format = FHIR_NDJSON.to_string();
    let mut mode = SaveMode::Merge;
    let mut raw_inputs: Vec<(String, String)> = Vec::new();
    if manifest_form {
        if let Some(f) = body.get("inputFormat") {
            format = f
                .as_str()
                .ok_or_else(|| invalid("inputFormat must be a string."))?
                .into();
        }
        if let Some(m) = body.get("saveMode") {
            let m = m
                .as_str()
                .ok_or_else(|| invalid("saveMode must be a string."))?;
            mode = SaveMode::parse(m, Generation::V9)
                .ok_or_else(|| invalid(&format!("Unknown saveMode: {m}")))?;
        }
        for item in body
            .get("input")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let t = item
                .get("type")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("Each input needs a 'type'."))?;
            let u = item
                .get("url")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("Each input needs a 'url'."))?;
            raw_inputs.push((t.into(), u.into()));
        }
    } else {
        let params = parameters_of(body).map_err(|e| invalid(&e))?;
        for p in params {
            match p.get("name").and_then(Value::as_str) {
                Some("inputFormat") => match crate::fhir::value_of_parameter(p) {
                    Some(("valueCode", Value::String(f))) => format = f.clone(),
                    _ => return Err(invalid("inputFormat must be given as a valueCode.")),
                },
                Some("saveMode") => match crate::fhir::value_of_parameter(p) {
                    Some(("valueCode", Value::String(m))) => {
                        mode = SaveMode::parse(m, Generation::V9)
                            .ok_or_else(|| invalid(&format!("Unknown saveMode: {m}")))?;
                    }
                    _ => return Err(invalid("saveMode must be given as a valueCode.")),
                },
                Some("input") => {
                    let parts = p
                        .get("part")
                        .and_then(Value::as_array)
                        .map(Vec::as_slice)
                        .unwrap_or(&[]);
                    let t = match part_value(parts, "resourceType") {
                        Some(("valueCode", Value::String(t))) => t.clone(),
                        _ => {
                            return Err(invalid(
                                "Each input needs a 'resourceType' part with a valueCode.",
                            ))
                        }
                    };
                    let u = match part_value(parts, "url") {
                        Some(("valueUrl", Value::String(u))) => u.clone(),
                        _ => return Err(invalid("Each input needs a 'url' part with a valueUrl.")),
                    };
                    raw_inputs.push((t, u));
                }
                _ => {}
            }
        }
    }
    if raw_inputs.is_empty() {
        return Err(invalid("The input may not be empty."));
    }
    if ![FHIR_NDJSON, "application/vnd.apache.parquet"].contains(&format.as_str()) {
        return Err(invalid(&format!("Unsupported inputFormat: {format}")));
    }
    let mut inputs = Vec::new();
    for (t, u) in raw_inputs {
        if !is_resource_type_name(&t) {
            return Err(invalid(&format!("Unsupported resource type: {t}")));
        }
        if !allowed(cfg, &[&u]) {
            return Err(bad(
                StatusCode::FORBIDDEN,
                "forbidden",
                &format!("{u} is not an allowed source for import."),
            ));
        }
        inputs.push(ImportInput {
            resource_type: t,
            url: u.clone(),
            original_url: u,
            mode,
            format: format.clone(),
        });
    }
    Ok((inputs, mode))
}

async fn import(
    State(shared): State<Arc<Shared>>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let (resp, job_id) = import_inner(&shared, &uri, &headers, parsed.as_ref()).await;
    {
        let mut rt = lock(&shared.rt);
        rt.stats.import_kickoffs += 1;
        rt.requests.push(ImportRequestRecord {
            content_type: header_str(&headers, "content-type").map(str::to_string),
            accept: header_str(&headers, "accept").map(str::to_string),
            prefer: header_str(&headers, "prefer").map(str::to_string),
            body: parsed,
            status: resp.status().as_u16(),
            job_id,
        });
    }
    let delay = lock(&shared.config).import_answer_delay;
    if !delay.is_zero() {
        // The scenario's own wait: the kick-off is accepted (and counted above) but its answer
        // is held back (`import_answer_delay`), as over a slow or broken connection.
        tokio::time::sleep(delay).await;
    }
    resp
}

async fn import_inner(
    shared: &Arc<Shared>,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: Option<&Value>,
) -> (Response, Option<String>) {
    let cfg = shared.config();
    if let Err(resp) = check_auth(shared, &cfg, headers) {
        return (resp, None);
    }
    let content_type = header_str(headers, "content-type")
        .map(media_type_of)
        .unwrap_or("");
    let manifest_form =
        cfg.generation == Generation::V9 && content_type.eq_ignore_ascii_case("application/json");
    if !content_type.eq_ignore_ascii_case(FHIR_JSON) && !manifest_form {
        return (
            bad(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                &format!("Unsupported Content-Type '{content_type}'; send {FHIR_JSON}."),
            ),
            None,
        );
    }
    if !header_lists_media_type(headers, "accept", FHIR_JSON) {
        return (
            bad(
                StatusCode::NOT_ACCEPTABLE,
                "not-supported",
                &format!("The Accept header must include {FHIR_JSON}."),
            ),
            None,
        );
    }
    let async_requested = header_has_token(headers, "prefer", "respond-async");
    if cfg.generation == Generation::V9 && !async_requested {
        return (
            bad(
                StatusCode::BAD_REQUEST,
                "invalid",
                "The $import operation is asynchronous only: send 'Prefer: respond-async'.",
            ),
            None,
        );
    }
    let Some(body) = body else {
        return (
            bad(
                StatusCode::BAD_REQUEST,
                "invalid",
                "The request body is not valid JSON.",
            ),
            None,
        );
    };
    let (inputs, save_mode) = match cfg.generation {
        Generation::V7 => match parse_v7(&cfg, body) {
            Ok(inputs) => (inputs, SaveMode::Overwrite),
            Err(resp) => return (resp, None),
        },
        Generation::V9 => match parse_v9(&cfg, body, manifest_form) {
            Ok(x) => x,
            Err(resp) => return (resp, None),
        },
    };
    let base = shared.base_url(&cfg);
    let job_id = {
        let mut rt = lock(&shared.rt);
        if cfg.generation == Generation::V9 && cfg.dedupe_identical_requests {
            let existing = rt
                .job_order
                .iter()
                .rev()
                .filter_map(|id| rt.jobs.get(id))
                .find(|j| !matches!(j.state, JobState::Cancelled) && j.body == *body)
                .map(|j| j.id.clone());
            if let Some(id) = existing {
                rt.stats.deduplicated += 1;
                return (accepted(&base, &id), Some(id));
            }
        }
        if cfg.external_import_running || rt.jobs.values().any(Job::unfinished) {
            rt.stats.rejected_busy += 1;
            return (
                bad(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "transient",
                    "Another import operation is currently in progress",
                ),
                None,
            );
        }
        let id = uuid::Uuid::new_v4().to_string();
        rt.jobs.insert(
            id.clone(),
            Job {
                id: id.clone(),
                state: JobState::Running,
                polls: 0,
                inputs: inputs.clone(),
                save_mode,
                body: body.clone(),
                request_url: format!("{}{}", shared.origin, uri),
            },
        );
        rt.job_order.push(id.clone());
        rt.stats.imports_accepted += 1;
        id
    };
    if !async_requested {
        // Pathling 7 without `Prefer: respond-async` runs the import inside the request.
        let loaded = load_inputs(&inputs, cfg.s3.as_ref()).await;
        let mut rt = lock(&shared.rt);
        rt.stats.sync_imports += 1;
        if let Some(job) = rt.jobs.get_mut(&job_id) {
            job.state = JobState::Loaded(loaded);
        }
        let resp = finalize(&mut rt, &cfg, &job_id)
            .unwrap_or_else(|| bad(StatusCode::NOT_FOUND, "not-found", "job vanished"));
        return (resp, Some(job_id));
    }
    spawn_load(shared.clone(), job_id.clone(), inputs);
    (accepted(&base, &job_id), Some(job_id))
}

/// Reads a job's inputs in the background, as Pathling does after answering 202.
fn spawn_load(task_shared: Arc<Shared>, task_id: String, inputs: Vec<ImportInput>) {
    tokio::spawn(async move {
        let cfg = task_shared.config();
        let loaded = load_inputs(&inputs, cfg.s3.as_ref()).await;
        let mut rt = lock(&task_shared.rt);
        if let Some(job) = rt.jobs.get_mut(&task_id) {
            if matches!(job.state, JobState::Running) {
                job.state = JobState::Loaded(loaded);
                if cfg.import_duration_polls == 0 {
                    let _ = finalize(&mut rt, &cfg, &task_id);
                }
            }
        }
    });
}

fn accepted(base: &str, id: &str) -> Response {
    let mut resp = fhir_response(
        StatusCode::ACCEPTED,
        &operation_outcome("information", "informational", "Import job accepted"),
    );
    set_header(
        &mut resp,
        header::CONTENT_LOCATION,
        &format!("{base}/$job?id={id}"),
    );
    resp
}

/// Applies a loaded job (or records its failure) and returns the final answer.
fn finalize(rt: &mut Runtime, cfg: &PathlingConfig, job_id: &str) -> Option<Response> {
    let job = rt.jobs.get_mut(job_id)?;
    if matches!(job.state, JobState::Running | JobState::Cancelled) {
        return None;
    }
    let newly_done = job.unfinished();
    // Taking the state out avoids copying the loaded resources; it is put back below.
    let state = std::mem::replace(&mut job.state, JobState::Running);
    let inputs = job.inputs.clone();
    let save_mode = job.save_mode;
    let success_body = result_body(cfg.generation, job);
    let outcome = match state {
        JobState::Loaded(Ok(loaded)) => match &cfg.fail_imports {
            Some(f) => Err(f.clone()),
            None => apply(&mut rt.store, cfg.generation, &inputs, save_mode, loaded)
                .map(|()| success_body),
        },
        JobState::Loaded(Err(f)) | JobState::Failed(f) => Err(f),
        JobState::Completed(v) => Ok(v),
        JobState::Running | JobState::Cancelled => return None,
    };
    let (state, resp) = match outcome {
        Ok(v) => {
            let resp = fhir_response(StatusCode::OK, &v);
            (JobState::Completed(v), resp)
        }
        Err(f) => {
            let resp = f.response();
            (JobState::Failed(f), resp)
        }
    };
    if newly_done {
        match &state {
            JobState::Completed(_) => rt.stats.jobs_completed += 1,
            _ => rt.stats.jobs_failed += 1,
        }
    }
    if let Some(j) = rt.jobs.get_mut(job_id) {
        j.state = state;
    }
    Some(resp)
}

fn result_body(generation: Generation, job: &Job) -> Value {
    match generation {
        Generation::V7 => operation_outcome(
            "information",
            "informational",
            "Data import completed successfully",
        ),
        Generation::V9 => {
            let mut params = vec![
                json!({"name": "transactionTime", "valueInstant": now_instant()}),
                json!({"name": "request", "valueString": job.request_url}),
            ];
            for input in &job.inputs {
                params.push(json!({"name": "output", "part": [
                    {"name": "inputUrl", "valueUrl": input.original_url}
                ]}));
            }
            json!({"resourceType": "Parameters", "parameter": params})
        }
    }
}

fn upsert(map: &mut BTreeMap<String, Value>, resources: Vec<Value>) {
    for r in resources {
        if let Some(id) = r.get("id").and_then(Value::as_str).map(str::to_string) {
            map.insert(id, r);
        }
    }
}

fn apply(
    store: &mut Store,
    generation: Generation,
    inputs: &[ImportInput],
    save_mode: SaveMode,
    loaded: Loaded,
) -> Result<(), ImportFailure> {
    match generation {
        Generation::V7 => {
            for (input, resources) in inputs.iter().zip(loaded) {
                let map = store.entry(input.resource_type.clone()).or_default();
                if input.mode == SaveMode::Overwrite {
                    map.clear();
                }
                upsert(map, resources);
            }
        }
        Generation::V9 => {
            let mut by_type: Vec<(String, Vec<Value>)> = Vec::new();
            for (input, resources) in inputs.iter().zip(loaded) {
                match by_type.iter_mut().find(|(t, _)| *t == input.resource_type) {
                    Some((_, list)) => list.extend(resources),
                    None => by_type.push((input.resource_type.clone(), resources)),
                }
            }
            let has_data = |store: &Store, t: &str| store.get(t).is_some_and(|m| !m.is_empty());
            if save_mode == SaveMode::Error {
                if let Some((t, _)) = by_type.iter().find(|(t, _)| has_data(store, t)) {
                    return Err(ImportFailure::new(
                        400,
                        "processing",
                        &format!("Data already exists for {t} and saveMode is 'error'."),
                    ));
                }
            }
            for (t, resources) in by_type {
                if save_mode == SaveMode::Ignore && has_data(store, &t) {
                    continue;
                }
                let map = store.entry(t).or_default();
                if save_mode == SaveMode::Overwrite {
                    map.clear();
                }
                upsert(map, resources);
            }
        }
    }
    Ok(())
}

/// Reads and validates every input, in order.
async fn load_inputs(
    inputs: &[ImportInput],
    s3: Option<&S3Access>,
) -> Result<Loaded, ImportFailure> {
    let mut out = Vec::new();
    for input in inputs {
        if !["ndjson", FHIR_NDJSON].contains(&input.format.as_str()) {
            return Err(ImportFailure::new(
                400,
                "not-supported",
                &format!("The fake Pathling reads only NDJSON, not {}.", input.format),
            ));
        }
        let files = read_url(&input.url, s3).await?;
        let mut resources = Vec::new();
        for (name, bytes) in files {
            parse_ndjson(&input.resource_type, &name, &bytes, &mut resources)?;
        }
        out.push(resources);
    }
    Ok(out)
}

fn parse_ndjson(
    resource_type: &str,
    name: &str,
    bytes: &[u8],
    out: &mut Vec<Value>,
) -> Result<(), ImportFailure> {
    for (n, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let fail = |why: String| {
            ImportFailure::new(400, "invalid", &format!("{name} line {}: {why}", n + 1))
        };
        let v: Value =
            serde_json::from_slice(line).map_err(|e| fail(format!("invalid JSON: {e}")))?;
        match v.get("resourceType").and_then(Value::as_str) {
            Some(t) if t == resource_type => {}
            Some(t) => {
                return Err(fail(format!(
                    "resourceType {t} does not match the declared {resource_type}"
                )))
            }
            None => return Err(fail("no resourceType".into())),
        }
        if v.get("id")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(fail("the resource has no id".into()));
        }
        out.push(v);
    }
    Ok(())
}

fn maybe_gunzip(name: &str, bytes: Vec<u8>) -> Result<Vec<u8>, ImportFailure> {
    if !name.ends_with(".gz") {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes.as_slice())
        .read_to_end(&mut out)
        .map_err(|e| ImportFailure::new(400, "invalid", &format!("{name}: bad gzip: {e}")))?;
    Ok(out)
}

/// Reads a source URL into `(name, content)` pairs (several for a directory or prefix).
async fn read_url(
    url: &str,
    s3: Option<&S3Access>,
) -> Result<Vec<(String, Vec<u8>)>, ImportFailure> {
    let unreadable = |why: String| {
        ImportFailure::new(400, "processing", &format!("Unable to read {url}: {why}"))
    };
    let parsed = url::Url::parse(url).map_err(|e| unreadable(e.to_string()))?;
    match parsed.scheme() {
        "file" => {
            let path = parsed
                .to_file_path()
                .map_err(|()| unreadable("not a local path".into()))?;
            let meta = tokio::fs::metadata(&path)
                .await
                .map_err(|e| unreadable(e.to_string()))?;
            let mut paths = Vec::new();
            if meta.is_dir() {
                let mut dir = tokio::fs::read_dir(&path)
                    .await
                    .map_err(|e| unreadable(e.to_string()))?;
                while let Some(entry) = dir
                    .next_entry()
                    .await
                    .map_err(|e| unreadable(e.to_string()))?
                {
                    let name = entry.file_name().to_string_lossy().to_string();
                    // Spark skips hidden and metadata files such as `_SUCCESS` and `.crc`.
                    let is_file = entry.file_type().await.is_ok_and(|t| t.is_file());
                    if is_file && !name.starts_with('.') && !name.starts_with('_') {
                        paths.push(entry.path());
                    }
                }
                paths.sort();
            } else {
                paths.push(path);
            }
            let mut out = Vec::new();
            for p in paths {
                let name = p.to_string_lossy().to_string();
                let bytes = tokio::fs::read(&p)
                    .await
                    .map_err(|e| unreadable(e.to_string()))?;
                out.push((name.clone(), maybe_gunzip(&name, bytes)?));
            }
            Ok(out)
        }
        "s3" | "s3a" => {
            let s3 = s3.ok_or_else(|| {
                unreadable("the fake Pathling has no S3 access configured".into())
            })?;
            let bucket = parsed
                .host_str()
                .ok_or_else(|| unreadable("no bucket".into()))?
                .to_string();
            let key = parsed.path().trim_start_matches('/').to_string();
            read_s3(s3, &bucket, &key).await.map_err(unreadable)
        }
        other => Err(unreadable(format!("unsupported scheme {other}"))),
    }
}

fn s3_client(s3: &S3Access) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let creds = Credentials::new(
        &s3.access_key_id,
        &s3.secret_access_key,
        None,
        None,
        "fake-pathling",
    );
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(s3.region.clone()))
        .endpoint_url(&s3.endpoint_url)
        .credentials_provider(creds)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

async fn get_s3_object(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
) -> Result<Option<Vec<u8>>, String> {
    match client.get_object().bucket(bucket).key(key).send().await {
        Ok(obj) => obj
            .body
            .collect()
            .await
            .map(|b| Some(b.into_bytes().to_vec()))
            .map_err(|e| e.to_string()),
        Err(e) => {
            let missing = e.as_service_error().is_some_and(|se| se.is_no_such_key())
                || e.raw_response().is_some_and(|r| r.status().as_u16() == 404);
            if missing {
                Ok(None)
            } else {
                Err(format!("{}", aws_sdk_s3::error::DisplayErrorContext(&e)))
            }
        }
    }
}

async fn read_s3(s3: &S3Access, bucket: &str, key: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let client = s3_client(s3);
    if !key.is_empty() && !key.ends_with('/') {
        if let Some(bytes) = get_s3_object(&client, bucket, key).await? {
            let name = format!("s3://{bucket}/{key}");
            return maybe_gunzip(&name, bytes)
                .map(|b| vec![(name, b)])
                .map_err(|f| f.diagnostics);
        }
    }
    // Like Spark, treat a key without an object as a directory of objects.
    let prefix = if key.is_empty() || key.ends_with('/') {
        key.to_string()
    } else {
        format!("{key}/")
    };
    let mut keys = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(&prefix)
            .set_continuation_token(token.clone())
            .send()
            .await
            .map_err(|e| format!("{}", aws_sdk_s3::error::DisplayErrorContext(&e)))?;
        keys.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_string)),
        );
        token = page.next_continuation_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    keys.retain(|k| {
        let name = k.rsplit('/').next().unwrap_or(k);
        !name.is_empty() && !name.starts_with('.') && !name.starts_with('_')
    });
    if keys.is_empty() {
        return Err("no such object or prefix".into());
    }
    keys.sort();
    let mut out = Vec::new();
    for k in keys {
        let name = format!("s3://{bucket}/{k}");
        let bytes = get_s3_object(&client, bucket, &k)
            .await?
            .ok_or(format!("{name} vanished"))?;
        out.push((
            name.clone(),
            maybe_gunzip(&name, bytes).map_err(|f| f.diagnostics)?,
        ));
    }
    Ok(out)
}

#[derive(serde::Deserialize)]
struct JobQuery {
    id: Option<String>,
}

async fn poll_job(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<JobQuery>,
    headers: HeaderMap,
) -> Response {
    let cfg = shared.config();
    if let Err(resp) = check_auth(&shared, &cfg, &headers) {
        return resp;
    }
    let mut rt = lock(&shared.rt);
    rt.stats.job_polls += 1;
    let id = q.id.unwrap_or_default();
    let Some(job) = rt
        .jobs
        .get_mut(&id)
        .filter(|j| !matches!(j.state, JobState::Cancelled))
    else {
        return bad(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("Job {id} not found"),
        );
    };
    job.polls += 1;
    let polls = job.polls;
    let waiting = matches!(job.state, JobState::Running)
        || (matches!(job.state, JobState::Loaded(_)) && polls <= cfg.import_duration_polls);
    if waiting {
        let pct = (u64::from(polls) * 100 / (u64::from(cfg.import_duration_polls) + 1)).min(99);
        let mut resp = empty_response(StatusCode::ACCEPTED);
        set_header(
            &mut resp,
            HeaderName::from_static("x-progress"),
            &format!("{pct}%"),
        );
        return resp;
    }
    let resp = finalize(&mut rt, &cfg, &id)
        .unwrap_or_else(|| bad(StatusCode::NOT_FOUND, "not-found", "Job not found"));
    match &cfg.finished_answer {
        Some(answer) if resp.status() == StatusCode::OK => match answer {
            FinishedAnswer::Body { content_type, body } => {
                let mut resp = Response::new(axum::body::Body::from(body.clone()));
                set_header(&mut resp, header::CONTENT_TYPE, content_type);
                resp
            }
            FinishedAnswer::LoginRedirect => {
                let mut resp = empty_response(StatusCode::FOUND);
                set_header(
                    &mut resp,
                    header::LOCATION,
                    &format!("{}/login", shared.origin),
                );
                resp
            }
        },
        _ => resp,
    }
}

async fn login_page() -> Response {
    let mut resp = Response::new(axum::body::Body::from(LOGIN_PAGE));
    set_header(&mut resp, header::CONTENT_TYPE, "text/html; charset=utf-8");
    resp
}

async fn delete_job(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<JobQuery>,
    headers: HeaderMap,
) -> Response {
    let cfg = shared.config();
    if let Err(resp) = check_auth(&shared, &cfg, &headers) {
        return resp;
    }
    let mut rt = lock(&shared.rt);
    let id = q.id.unwrap_or_default();
    match rt
        .jobs
        .get_mut(&id)
        .filter(|j| !matches!(j.state, JobState::Cancelled))
    {
        Some(job) => {
            job.state = JobState::Cancelled;
            rt.stats.job_deletes += 1;
            fhir_response(
                StatusCode::ACCEPTED,
                &operation_outcome("information", "informational", "Job cancelled"),
            )
        }
        None => bad(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("Job {id} not found"),
        ),
    }
}

async fn read_resource(
    State(shared): State<Arc<Shared>>,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let cfg = shared.config();
    if let Err(resp) = check_auth(&shared, &cfg, &headers) {
        return resp;
    }
    let rt = lock(&shared.rt);
    match rt.store.get(&rtype).and_then(|m| m.get(&id)) {
        Some(r) => fhir_response(StatusCode::OK, r),
        None => bad(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("{rtype}/{id} not found"),
        ),
    }
}

/// Removes a resource; true if it existed.
fn remove(rt: &mut Runtime, rtype: &str, id: &str) -> bool {
    let removed = rt.store.get_mut(rtype).and_then(|m| m.remove(id)).is_some();
    if removed {
        rt.stats.deletes_applied += 1;
        rt.deletes.push((rtype.to_string(), id.to_string()));
    } else {
        rt.stats.deletes_not_found += 1;
    }
    removed
}

async fn delete_resource(
    State(shared): State<Arc<Shared>>,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let cfg = shared.config();
    if let Err(resp) = check_auth(&shared, &cfg, &headers) {
        return resp;
    }
    if cfg.generation == Generation::V7 {
        return bad(
            StatusCode::METHOD_NOT_ALLOWED,
            "not-supported",
            "The delete interaction is not supported by this server.",
        );
    }
    if !is_resource_type_name(&rtype) {
        return bad(
            StatusCode::BAD_REQUEST,
            "invalid",
            &format!("Unknown resource type {rtype}"),
        );
    }
    let mut rt = lock(&shared.rt);
    if remove(&mut rt, &rtype, &id) {
        empty_response(StatusCode::NO_CONTENT)
    } else {
        bad(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("{rtype}/{id} not found"),
        )
    }
}

async fn batch(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let cfg = shared.config();
    if let Err(resp) = check_auth(&shared, &cfg, &headers) {
        return resp;
    }
    if cfg.generation == Generation::V7 {
        return bad(
            StatusCode::METHOD_NOT_ALLOWED,
            "not-supported",
            "Batch deletes are not supported by this server.",
        );
    }
    let ct = header_str(&headers, "content-type")
        .map(media_type_of)
        .unwrap_or("");
    if !ct.eq_ignore_ascii_case(FHIR_JSON) && !ct.eq_ignore_ascii_case("application/json") {
        return bad(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
            &format!("Unsupported Content-Type '{ct}'; send {FHIR_JSON}."),
        );
    }
    let Ok(bundle) = serde_json::from_slice::<Value>(&body) else {
        return bad(
            StatusCode::BAD_REQUEST,
            "invalid",
            "The request body is not valid JSON.",
        );
    };
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle")
        || bundle.get("type").and_then(Value::as_str) != Some("batch")
    {
        return bad(
            StatusCode::BAD_REQUEST,
            "invalid",
            "Expected a Bundle of type 'batch'.",
        );
    }
    let mut rt = lock(&shared.rt);
    rt.stats.batch_requests += 1;
    let entries = bundle
        .get("entry")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let mut out = Vec::new();
    for entry in entries {
        let method = entry
            .pointer("/request/method")
            .and_then(Value::as_str)
            .unwrap_or("");
        let url = entry
            .pointer("/request/url")
            .and_then(Value::as_str)
            .unwrap_or("");
        let target = url
            .split_once('/')
            .filter(|(t, id)| is_resource_type_name(t) && !id.is_empty() && !id.contains('/'));
        let response = match (method, target) {
            ("DELETE", Some((t, id))) => {
                if remove(&mut rt, t, id) {
                    json!({"status": "204 No Content"})
                } else {
                    json!({"status": "404 Not Found",
                           "outcome": operation_outcome("error", "not-found", &format!("{t}/{id} not found"))})
                }
            }
            ("DELETE", None) => json!({"status": "400 Bad Request",
                "outcome": operation_outcome("error", "invalid", &format!("Bad request.url '{url}'; expected Type/id"))}),
            _ => json!({"status": "405 Method Not Allowed",
                "outcome": operation_outcome("error", "not-supported", "Only DELETE entries are supported by this fake")}),
        };
        out.push(json!({"response": response}));
    }
    fhir_response(
        StatusCode::OK,
        &json!({
            "resourceType": "Bundle",
            "type": "batch-response",
            "entry": out,
        }),
    )
}
