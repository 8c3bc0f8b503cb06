//! A fake FHIR Bulk Data Access (v2, STU2) server with SMART Backend Services auth.
//!
//! [`FakeSource::start`] binds two listeners on `127.0.0.1:0`: the FHIR server
//! (`{origin}{fhir_path}`, default `/fhir`; on https with [`FakeSource::start_tls`]) and a
//! second origin standing in for object storage that serves "pre-signed" URLs. Every knob lives in [`SourceConfig`] and can be changed while
//! the server runs ([`FakeSourceHandle::update`]); [`SourceStats`], [`KickoffRecord`] and
//! [`ExportJobInfo`] tell a test what the client did.
//!
//! Endpoints (under the base URL):
//! - `GET .well-known/smart-configuration`, `POST auth/token` (only with [`SourceConfig::auth`];
//!   see [`crate::auth`]), `GET metadata`.
//! - `GET|POST $export`, `Patient/$export`, `Group/{id}/$export`: need `Accept:
//!   application/fhir+json` and `Prefer: respond-async` (else 400). Honour `_type` (comma list,
//!   repeatable), `_since`, `_outputFormat` (400 if not in
//!   [`SourceConfig::supported_output_formats`]); `_typeFilter`, `_elements`,
//!   `includeAssociatedData` are recorded only. POST takes a `Parameters` body and is the only
//!   way to pass `patient`. Unknown groups get 404. Answer: 202 + absolute `Content-Location`.
//! - `GET {status}`: per job, poll `n` (1-based, counting every GET) is answered, in order of
//!   precedence: 429 if the rate limit is exceeded or `n` is in `throttle_polls`; a transient
//!   5xx (OperationOutcome `issue.code = transient`) if `n` is in `transient_error_polls`; the
//!   permanent failure if configured and reached; otherwise 202 (`X-Progress`, `Retry-After`)
//!   for the first `in_progress_polls` of the polls that got this far, then 200 + manifest.
//! - Knobs for hostile answers: [`SourceConfig::oversized_manifest`] (a manifest larger than a
//!   client should read, chunked or with `Content-Length`), [`SourceConfig::extra_output`]
//!   (manifest entries with URLs of other hosts), [`SourceConfig::content_location`] (the
//!   kick-off's status URL on another host).
//! - `DELETE {status}` → 202; afterwards the status URL and the job's files answer 404.
//! - `GET` file URLs: NDJSON streamed with chunked encoding and no `Content-Length`, gzip only
//!   for `Accept-Encoding: gzip`. Options: no trailing newline, connection reset after N bytes
//!   for the first K attempts of each file, a 307 redirect (or a manifest URL) to the storage
//!   origin, a cap on concurrent downloads (429 beyond it), per-request latency, an HTML page
//!   with `200 OK` instead of the NDJSON ([`SourceConfig::html_files`]), a file listed twice in
//!   the manifest ([`SourceConfig::repeat_in_manifest`]), a listed file answered 404
//!   ([`SourceConfig::lost_files`]).
//! - Storage origin: `GET /{bucket}/{job}/{file}?X-Amz-...&X-Amz-Signature=...`; a request with
//!   an `Authorization` header gets 400 (as S3 does when a query signature is also present), a
//!   wrong or missing signature 403. It never gzips, like S3 serving a stored object.
//!
//! The data is [`crate::data`]'s deterministic dataset; [`expected_resources`] and friends
//! compute what an export with a given filter contains. Resources listed in
//! [`SourceConfig::deleted`] are never in the output; they appear in the manifest's `deleted[]`
//! (NDJSON of transaction Bundles with `DELETE` entries) when the kick-off had `_since` or
//! [`SourceConfig::deleted_always`] is set. [`SourceConfig::errors`] become one `error[]` file.

// Handlers build their error answers early and pass them up as `Err(Response)`; these are cold
// paths of a test server, so the size of `Response` does not matter.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{OriginalUri, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::{json, Value};

use crate::auth::{smart_configuration, AuthConfig, AuthRuntime, AuthStats};
use crate::data::{id_of, DatasetConfig, ExportFilter};
use crate::fhir::{
    empty_response, fhir_response, header_has_token, header_lists_media_type, header_str,
    is_resource_type_name, json_response, media_type_of, now_instant, operation_outcome,
    outcome_response, parse_instant, set_header, value_of_parameter, RetryAfter, FHIR_JSON,
    FHIR_NDJSON,
};
use crate::server::{Bound, Running, TlsIdentity, TlsStats};

/// A failure answer: status and OperationOutcome text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpFailure {
    /// HTTP status.
    pub status: u16,
    /// OperationOutcome `issue.code`.
    pub code: String,
    /// OperationOutcome `issue.diagnostics`.
    pub diagnostics: String,
}

impl HttpFailure {
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

/// A permanent failure of a job, from poll `from_poll` on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PollFailure {
    /// First poll (1-based) that fails.
    pub from_poll: u32,
    /// What it answers.
    pub failure: HttpFailure,
}

/// A sliding-window limit on status polls, like the SMART reference server's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Polls allowed per window (all jobs together); more get 429.
    pub max_requests: usize,
    /// The window.
    pub window: Duration,
}

/// One entry of the `error[]` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorEntry {
    /// `fatal`, `error`, `warning` or `information`.
    pub severity: String,
    /// OperationOutcome `issue.code`.
    pub code: String,
    /// Text.
    pub diagnostics: String,
}

impl ErrorEntry {
    /// An entry with the given severity and text (code `processing`).
    pub fn new(severity: &str, diagnostics: &str) -> Self {
        Self {
            severity: severity.into(),
            code: "processing".into(),
            diagnostics: diagnostics.into(),
        }
    }
}

/// Where the manifest's file URLs lead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileRouting {
    /// Files are served by the FHIR origin.
    Direct,
    /// The FHIR origin answers 307 to a pre-signed URL on the storage origin.
    Redirect,
    /// The manifest lists pre-signed storage URLs directly.
    Presigned,
}

/// A manifest answer larger than a client should read: a valid manifest whose last member is
/// a long padding string, streamed in 64 KiB chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OversizedManifest {
    /// Size of the whole body.
    pub bytes: u64,
    /// Announce the size in `Content-Length` (else the body is chunked).
    pub content_length: bool,
}

/// Abort the body of a file download after some bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResetKnob {
    /// Uncompressed bytes sent before the connection is broken.
    pub after_bytes: u64,
    /// How many attempts of each file are broken (later attempts succeed).
    pub first_attempts: u32,
}

/// Every knob of the fake source. All of them can be changed at run time.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Path of the FHIR base on the origin, e.g. `/fhir` (no trailing slash; `""` for the root).
    /// Routes are built at start: changing it later does not move them.
    pub fhir_path: String,
    /// The synthetic data.
    pub dataset: DatasetConfig,
    /// Groups for `Group/{id}/$export`: id → member patient ids.
    pub groups: BTreeMap<String, Vec<String>>,
    /// SMART auth; `None` = open server.
    pub auth: Option<AuthConfig>,
    /// Manifest `requiresAccessToken`; when true (and auth is on) file GETs on the FHIR origin
    /// need the bearer token.
    pub requires_access_token: bool,
    /// Accepted `_outputFormat` values.
    pub supported_output_formats: Vec<String>,
    /// The first N kick-offs get 503 with a transient OperationOutcome.
    pub kickoff_transient_failures: u32,
    /// Every kick-off gets this failure (after the transient ones).
    pub kickoff_error: Option<HttpFailure>,
    /// Refuse a kick-off with 429 while another export is unfinished and not deleted.
    pub reject_concurrent_exports: bool,
    /// Polls answered 202 before the manifest.
    pub in_progress_polls: u32,
    /// `Retry-After` on 202 answers.
    pub progress_retry_after: RetryAfter,
    /// `Retry-After` on 429 and transient 503 answers.
    pub throttle_retry_after: RetryAfter,
    /// Poll numbers (per job, 1-based) answered 429.
    pub throttle_polls: BTreeSet<u32>,
    /// Sliding-window poll limit.
    pub poll_rate_limit: Option<RateLimit>,
    /// Poll numbers answered with a transient 5xx.
    pub transient_error_polls: BTreeSet<u32>,
    /// Status of those transient answers (500 or 503 usually).
    pub transient_error_status: u16,
    /// A permanent failure of the job.
    pub permanent_error: Option<PollFailure>,
    /// Send `Expires` (now + this) with the manifest.
    pub manifest_expires: Option<Duration>,
    /// Answer the completing poll with this oversized (valid JSON) manifest instead.
    pub oversized_manifest: Option<OversizedManifest>,
    /// Page the manifest: at most this many `output[]` entries a page, each page but the last
    /// linking the next (`link: [{relation: next, url: …/bulkmanifest/{job}/{page}}]`, which
    /// needs the bearer token like the status URL); `deleted[]` and `error[]` on the last.
    pub manifest_page_size: Option<usize>,
    /// `(type, url)` entries appended to the manifest's `output[]` as given (a URL of another
    /// host, which a client must judge before fetching it).
    pub extra_output: Vec<(String, String)>,
    /// The kick-off's `Content-Location` instead of the job's status URL (the job is still
    /// created).
    pub content_location: Option<String>,
    /// Deleted resources `(type, id)`.
    pub deleted: Vec<(String, String)>,
    /// List deletions even without `_since`.
    pub deleted_always: bool,
    /// DELETE entries per Bundle line of the deleted file.
    pub deleted_per_bundle: usize,
    /// Entries of the `error[]` file; empty = no error file.
    pub errors: Vec<ErrorEntry>,
    /// List files in which the filter left nothing (real servers usually omit them).
    pub emit_empty_files: bool,
    /// Gzip when the client sends `Accept-Encoding: gzip` (false = never gzip).
    pub gzip_when_asked: bool,
    /// Files end without a newline after the last resource.
    pub no_trailing_newline: bool,
    /// Where file URLs lead.
    pub file_routing: FileRouting,
    /// Types whose files [`Self::file_routing`] applies to; `None` = all (deleted/error files
    /// count as types `Bundle` and `OperationOutcome`). Other files are served directly.
    pub routed_types: Option<BTreeSet<String>>,
    /// Break downloads mid-body.
    pub reset: Option<ResetKnob>,
    /// Concurrent downloads allowed (both origins together); more get 429.
    pub max_concurrent_downloads: Option<usize>,
    /// Uncompressed bytes per body chunk.
    pub chunk_bytes: usize,
    /// Pause before each body chunk of a file download: a source that serves files slowly.
    pub chunk_delay: Duration,
    /// Delay before handling any request (both origins).
    pub latency: Duration,
    /// Files (by name: `{Type}.{k}.ndjson`, `deleted.0.ndjson`, `error.0.ndjson`) answered
    /// `200 OK` with an HTML page instead of their NDJSON, as a login proxy or a misconfigured
    /// bucket would. Their downloads still count in [`FakeSourceHandle::file_attempts`].
    pub html_files: BTreeSet<String>,
    /// Files (by name, as [`Self::html_files`]) the manifest lists but whose downloads answer
    /// `404 Not Found` on either origin, as from a server that lost them after the export.
    pub lost_files: BTreeSet<String>,
    /// `output[]` files (by name) listed a second time, with the same URL, at the end of the
    /// manifest's `output[]`.
    pub repeat_in_manifest: BTreeSet<String>,
    /// Serve `Range: bytes=N-` requests (`206 Partial Content`), with `Accept-Ranges`, a strong
    /// `ETag` per file and `If-Range`, as a static file server does.
    pub ranges: bool,
    /// A download (started while this is set) stops sending after this byte of the file and
    /// hangs, as a source gone silent: the client is killed or cut meanwhile.
    pub stall_at: Option<u64>,
    /// Part of every file's `ETag`: changing it makes the files "changed" for `If-Range`.
    pub file_version: u32,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            fhir_path: "/fhir".into(),
            dataset: DatasetConfig::default(),
            groups: BTreeMap::from([(
                "example-group".to_string(),
                (0..10).map(|i| id_of("Patient", i)).collect(),
            )]),
            auth: None,
            requires_access_token: false,
            supported_output_formats: vec![
                FHIR_NDJSON.into(),
                "application/ndjson".into(),
                "ndjson".into(),
            ],
            kickoff_transient_failures: 0,
            kickoff_error: None,
            reject_concurrent_exports: false,
            in_progress_polls: 1,
            progress_retry_after: RetryAfter::Seconds(0),
            throttle_retry_after: RetryAfter::Seconds(0),
            throttle_polls: BTreeSet::new(),
            poll_rate_limit: None,
            transient_error_polls: BTreeSet::new(),
            transient_error_status: 503,
            permanent_error: None,
            manifest_expires: None,
            oversized_manifest: None,
            manifest_page_size: None,
            extra_output: Vec::new(),
            content_location: None,
            deleted: Vec::new(),
            deleted_always: false,
            deleted_per_bundle: 50,
            errors: Vec::new(),
            emit_empty_files: false,
            gzip_when_asked: true,
            no_trailing_newline: false,
            file_routing: FileRouting::Direct,
            routed_types: None,
            reset: None,
            max_concurrent_downloads: None,
            chunk_bytes: 16 * 1024,
            chunk_delay: Duration::ZERO,
            latency: Duration::ZERO,
            html_files: BTreeSet::new(),
            lost_files: BTreeSet::new(),
            repeat_in_manifest: BTreeSet::new(),
            ranges: false,
            stall_at: None,
            file_version: 0,
        }
    }
}

/// Export level of a kick-off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportLevel {
    /// `$export`.
    System,
    /// `Patient/$export`.
    Patient,
    /// `Group/{id}/$export`.
    Group(String),
}

/// One kick-off request as received (including refused ones).
#[derive(Clone, Debug)]
pub struct KickoffRecord {
    /// `GET` or `POST`.
    pub method: String,
    /// Export level.
    pub level: ExportLevel,
    /// Path and query as sent.
    pub uri: String,
    /// Parameters: query pairs for GET, flattened Parameters for POST (`patient` as
    /// `Patient/id`).
    pub params: Vec<(String, String)>,
    /// POST body.
    pub body: Option<Value>,
    /// `Accept`.
    pub accept: Option<String>,
    /// `Prefer`.
    pub prefer: Option<String>,
    /// Whether an `Authorization` header came along.
    pub authorization_sent: bool,
    /// Status answered.
    pub status: u16,
}

impl KickoffRecord {
    /// All values of a parameter, in order.
    pub fn param_values(&self, name: &str) -> Vec<String> {
        self.params
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// An accepted export job.
#[derive(Clone, Debug)]
pub struct ExportJobInfo {
    /// Job id (last path segment of the status URL).
    pub id: String,
    /// Export level.
    pub level: ExportLevel,
    /// What the export selects.
    pub filter: ExportFilter,
    /// `_since` was given.
    pub since_given: bool,
    /// `_typeFilter` values.
    pub type_filters: Vec<String>,
    /// `_elements` values.
    pub elements: Vec<String>,
    /// Manifest `request`.
    pub request_url: String,
    /// Manifest `transactionTime` (the kick-off time).
    pub transaction_time: String,
    /// GETs of the status URL.
    pub polls: u32,
    /// Polls that reached the progress stage (not 429/5xx).
    pub progress_polls: u32,
    /// A manifest was served.
    pub completed: bool,
    /// DELETEd.
    pub deleted: bool,
}

impl ExportJobInfo {
    fn to_json(&self) -> Value {
        let (level, group) = match &self.level {
            ExportLevel::System => ("system", None),
            ExportLevel::Patient => ("patient", None),
            ExportLevel::Group(id) => ("group", Some(id.clone())),
        };
        json!({
            "id": self.id,
            "level": level,
            "group": group,
            "types": self.filter.types,
            "since": self.filter.since.map(|t| t.to_rfc3339()),
            "patients": self.filter.patients,
            "compartment_only": self.filter.compartment_only,
            "since_given": self.since_given,
            "type_filters": self.type_filters,
            "elements": self.elements,
            "request_url": self.request_url,
            "transaction_time": self.transaction_time,
            "polls": self.polls,
            "progress_polls": self.progress_polls,
            "completed": self.completed,
            "deleted": self.deleted,
        })
    }

    fn from_json(v: &Value) -> Option<ExportJobInfo> {
        let text = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
        let texts = |key: &str| -> Option<Vec<String>> {
            v.get(key)?
                .as_array()?
                .iter()
                .map(|t| t.as_str().map(str::to_owned))
                .collect()
        };
        let count = |key: &str| v.get(key).and_then(Value::as_u64).map(|n| n as u32);
        let level = match (text("level")?.as_str(), text("group")) {
            ("system", _) => ExportLevel::System,
            ("patient", _) => ExportLevel::Patient,
            ("group", Some(id)) => ExportLevel::Group(id),
            _ => return None,
        };
        let since = match text("since") {
            Some(t) => Some(
                chrono::DateTime::parse_from_rfc3339(&t)
                    .ok()?
                    .with_timezone(&chrono::Utc),
            ),
            None => None,
        };
        Some(ExportJobInfo {
            id: text("id")?,
            level,
            filter: ExportFilter {
                types: texts("types"),
                since,
                patients: texts("patients").map(|p| p.into_iter().collect()),
                compartment_only: v.get("compartment_only")?.as_bool()?,
            },
            since_given: v.get("since_given")?.as_bool()?,
            type_filters: texts("type_filters")?,
            elements: texts("elements")?,
            request_url: text("request_url")?,
            transaction_time: text("transaction_time")?,
            polls: count("polls")?,
            progress_polls: count("progress_polls")?,
            completed: v.get("completed")?.as_bool()?,
            deleted: v.get("deleted")?.as_bool()?,
        })
    }
}

/// Counters of what the fake saw.
#[derive(Clone, Debug, Default)]
pub struct SourceStats {
    /// Kick-off requests (all, refused ones too).
    pub kickoffs: u64,
    /// Kick-offs answered 202.
    pub kickoffs_accepted: u64,
    /// Status GETs.
    pub polls: u64,
    /// 429 answers to polls.
    pub throttled: u64,
    /// Transient 5xx answers to polls.
    pub transient_errors: u64,
    /// Manifests served.
    pub manifests: u64,
    /// DELETEs of status URLs that found a job.
    pub job_deletes: u64,
    /// File GETs on the FHIR origin.
    pub file_gets: u64,
    /// Of those, with an `Authorization` header.
    pub file_gets_with_authorization: u64,
    /// 307 answers.
    pub redirects: u64,
    /// GETs on the storage origin.
    pub storage_gets: u64,
    /// Storage GETs refused for carrying `Authorization`.
    pub storage_rejected_authorization: u64,
    /// Storage GETs refused for a wrong/missing signature.
    pub storage_bad_signature: u64,
    /// Downloads broken on purpose.
    pub resets_injected: u64,
    /// File bodies streamed to their end.
    pub files_completed: u64,
    /// Downloads refused by the concurrency cap.
    pub downloads_rejected_concurrency: u64,
    /// Highest number of simultaneous downloads observed.
    pub max_concurrent_downloads_seen: usize,
    /// Bytes of file bodies sent (uncompressed), both origins.
    pub file_bytes_sent: u64,
    /// Downloads answered `206 Partial Content`.
    pub ranges_served: u64,
}

#[derive(Default)]
struct Runtime {
    jobs: BTreeMap<String, ExportJobInfo>,
    job_order: Vec<String>,
    kickoffs: Vec<KickoffRecord>,
    stats: SourceStats,
    poll_times: VecDeque<Instant>,
    kickoff_failures_served: u32,
    file_attempts: HashMap<String, u32>,
    signatures: HashMap<String, String>,
    auth: AuthRuntime,
}

struct Shared {
    origin: String,
    storage_origin: String,
    config: Mutex<SourceConfig>,
    rt: Mutex<Runtime>,
    active_downloads: Arc<AtomicUsize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn config(&self) -> SourceConfig {
        lock(&self.config).clone()
    }

    fn base_url(&self, cfg: &SourceConfig) -> String {
        format!("{}{}", self.origin, cfg.fhir_path)
    }

    fn token_url(&self, cfg: &SourceConfig) -> String {
        format!("{}/auth/token", self.base_url(cfg))
    }
}

const STORAGE_BUCKET: &str = "bulk-export-bucket";

/// Entry point of the fake source.
pub struct FakeSource;

impl FakeSource {
    /// Starts the FHIR listener and the storage listener on `127.0.0.1:0`.
    pub async fn start(config: SourceConfig) -> std::io::Result<FakeSourceHandle> {
        FakeSource::start_on(Bound::new().await?, config).await
    }

    /// As [`FakeSource::start`], but the FHIR listener serves https with `identity` (the
    /// storage origin stays plain http).
    pub async fn start_tls(
        config: SourceConfig,
        identity: &TlsIdentity,
    ) -> std::io::Result<FakeSourceHandle> {
        FakeSource::start_on(Bound::new_tls(identity).await?, config).await
    }

    /// As [`FakeSource::start`], on the given ports (0: any free port): the sandbox keeps its
    /// ports so that a saved run finds its servers again.
    pub async fn start_at(
        config: SourceConfig,
        port: u16,
        storage_port: u16,
    ) -> std::io::Result<FakeSourceHandle> {
        FakeSource::start_with(
            Bound::on(port).await?,
            Bound::on(storage_port).await?,
            config,
        )
        .await
    }

    async fn start_on(main: Bound, config: SourceConfig) -> std::io::Result<FakeSourceHandle> {
        FakeSource::start_with(main, Bound::new().await?, config).await
    }

    async fn start_with(
        main: Bound,
        storage: Bound,
        config: SourceConfig,
    ) -> std::io::Result<FakeSourceHandle> {
        let fhir_path = config.fhir_path.trim_end_matches('/').to_string();
        let config = SourceConfig {
            fhir_path: fhir_path.clone(),
            ..config
        };
        let shared = Arc::new(Shared {
            origin: main.origin(),
            storage_origin: storage.origin(),
            config: Mutex::new(config),
            rt: Mutex::new(Runtime::default()),
            active_downloads: Arc::new(AtomicUsize::new(0)),
        });
        let p = fhir_path;
        let fhir = Router::new()
            .route(
                &format!("{p}/.well-known/smart-configuration"),
                get(discovery),
            )
            .route(&format!("{p}/auth/token"), post(token))
            .route(&format!("{p}/metadata"), get(metadata))
            .route(
                &format!("{p}/$export"),
                get(kickoff_system).post(kickoff_system),
            )
            .route(
                &format!("{p}/Patient/$export"),
                get(kickoff_patient).post(kickoff_patient),
            )
            .route(
                &format!("{p}/Group/{{id}}/$export"),
                get(kickoff_group).post(kickoff_group),
            )
            .route(
                &format!("{p}/bulkstatus/{{job}}"),
                get(poll_status).delete(delete_job),
            )
            .route(&format!("{p}/bulkfiles/{{job}}/{{file}}"), get(file_get))
            .route(
                &format!("{p}/bulkmanifest/{{job}}/{{page}}"),
                get(manifest_page_get),
            )
            .layer(middleware::from_fn_with_state(shared.clone(), latency))
            .with_state(shared.clone());
        let storage_router = Router::new()
            .route("/{bucket}/{job}/{file}", get(storage_get))
            .layer(middleware::from_fn_with_state(shared.clone(), latency))
            .with_state(shared.clone());
        Ok(FakeSourceHandle {
            shared,
            main: main.serve(fhir),
            storage: storage.serve(storage_router),
        })
    }
}

/// A running fake source; dropping it stops both listeners.
pub struct FakeSourceHandle {
    shared: Arc<Shared>,
    main: Running,
    storage: Running,
}

impl FakeSourceHandle {
    /// The FHIR base URL, e.g. `http://127.0.0.1:PORT/fhir`.
    pub fn base_url(&self) -> String {
        self.shared.base_url(&lock(&self.shared.config))
    }

    /// `http://127.0.0.1:PORT` of the FHIR listener.
    pub fn origin(&self) -> String {
        self.shared.origin.clone()
    }

    /// `http://127.0.0.1:PORT` of the storage listener (another origin).
    pub fn storage_origin(&self) -> String {
        self.shared.storage_origin.clone()
    }

    /// TLS counters of the FHIR listener, when started with [`FakeSource::start_tls`].
    pub fn tls_stats(&self) -> Option<Arc<TlsStats>> {
        self.main.tls_stats()
    }

    /// Port of the FHIR listener.
    pub fn port(&self) -> u16 {
        self.main.addr().port()
    }

    /// Port of the storage listener.
    pub fn storage_port(&self) -> u16 {
        self.storage.addr().port()
    }

    /// The token endpoint URL (the exact `aud` of client assertions).
    pub fn token_url(&self) -> String {
        self.shared.token_url(&lock(&self.shared.config))
    }

    /// The status URL of a job.
    pub fn status_url(&self, job_id: &str) -> String {
        format!("{}/bulkstatus/{job_id}", self.base_url())
    }

    /// Changes knobs while the server runs.
    pub fn update(&self, change: impl FnOnce(&mut SourceConfig)) {
        change(&mut lock(&self.shared.config));
    }

    /// A copy of the current configuration.
    pub fn config(&self) -> SourceConfig {
        self.shared.config()
    }

    /// Counters.
    pub fn stats(&self) -> SourceStats {
        lock(&self.shared.rt).stats.clone()
    }

    /// Token endpoint and bearer-check counters.
    pub fn auth_stats(&self) -> AuthStats {
        lock(&self.shared.rt).auth.stats.clone()
    }

    /// Every kick-off request, in order.
    pub fn kickoffs(&self) -> Vec<KickoffRecord> {
        lock(&self.shared.rt).kickoffs.clone()
    }

    /// The last kick-off request.
    pub fn last_kickoff(&self) -> Option<KickoffRecord> {
        lock(&self.shared.rt).kickoffs.last().cloned()
    }

    /// Accepted jobs in kick-off order.
    pub fn jobs(&self) -> Vec<ExportJobInfo> {
        let rt = lock(&self.shared.rt);
        rt.job_order
            .iter()
            .filter_map(|id| rt.jobs.get(id).cloned())
            .collect()
    }

    /// Stops serving, then returns the accepted jobs as JSON, for
    /// [`FakeSourceHandle::restore_jobs`] in a later process. Stopped first, so nothing
    /// accepted is missing.
    pub async fn shutdown_with_jobs(self) -> Value {
        let shared = self.shared.clone();
        self.shutdown().await;
        let rt = lock(&shared.rt);
        let jobs = rt.job_order.iter().filter_map(|id| rt.jobs.get(id));
        Value::Array(jobs.map(ExportJobInfo::to_json).collect())
    }

    /// Takes over jobs saved by [`FakeSourceHandle::shutdown_with_jobs`] (entries it cannot read
    /// are skipped): their status URLs and files answer as before the restart.
    pub fn restore_jobs(&self, saved: &Value) {
        let mut rt = lock(&self.shared.rt);
        for job in saved
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(ExportJobInfo::from_json)
        {
            rt.job_order.push(job.id.clone());
            rt.jobs.insert(job.id.clone(), job);
        }
    }

    /// Download attempts per file name (`{Type}.{k}.ndjson`, `deleted.0.ndjson`, ...), summed
    /// over jobs and both origins.
    pub fn file_attempts(&self) -> BTreeMap<String, u32> {
        let rt = lock(&self.shared.rt);
        let mut out = BTreeMap::new();
        for (key, n) in &rt.file_attempts {
            let name = key.rsplit('/').next().unwrap_or(key).to_string();
            *out.entry(name).or_insert(0) += n;
        }
        out
    }

    /// Invalidates all issued tokens (the next protected request gets 401).
    pub fn revoke_tokens(&self) {
        lock(&self.shared.rt).auth.revoke_all();
    }

    /// What an export with this filter contains, computed from the current configuration.
    pub fn expected_resources(&self, filter: &ExportFilter) -> BTreeMap<(String, String), Value> {
        expected_resources(&self.config(), filter)
    }

    /// Stops both listeners, waiting briefly for in-flight requests.
    pub async fn shutdown(self) {
        let FakeSourceHandle { main, storage, .. } = self;
        main.shutdown().await;
        storage.shutdown().await;
    }
}

/// Every resource an export with this filter must deliver, keyed by `(type, id)`. Holds them
/// all in memory: use [`expected_ids`] or [`expected_count`] for big datasets.
pub fn expected_resources(
    config: &SourceConfig,
    filter: &ExportFilter,
) -> BTreeMap<(String, String), Value> {
    let deleted = deleted_set(config);
    let mut out = BTreeMap::new();
    for spec in config.dataset.selected_types(filter) {
        for i in 0..spec.count {
            if config
                .dataset
                .includes(filter, &deleted, &spec.resource_type, i)
            {
                out.insert(
                    (spec.resource_type.clone(), id_of(&spec.resource_type, i)),
                    config.dataset.resource(&spec.resource_type, i),
                );
            }
        }
    }
    out
}

/// The ids per type an export with this filter must deliver.
pub fn expected_ids(
    config: &SourceConfig,
    filter: &ExportFilter,
) -> BTreeMap<String, BTreeSet<String>> {
    let deleted = deleted_set(config);
    let mut out = BTreeMap::new();
    for spec in config.dataset.selected_types(filter) {
        let ids: BTreeSet<String> = (0..spec.count)
            .filter(|i| {
                config
                    .dataset
                    .includes(filter, &deleted, &spec.resource_type, *i)
            })
            .map(|i| id_of(&spec.resource_type, i))
            .collect();
        out.insert(spec.resource_type.clone(), ids);
    }
    out
}

/// Number of resources an export with this filter must deliver.
pub fn expected_count(config: &SourceConfig, filter: &ExportFilter) -> u64 {
    let deleted = deleted_set(config);
    config
        .dataset
        .selected_types(filter)
        .iter()
        .map(|spec| {
            (0..spec.files)
                .map(|k| config.dataset.count_in_file(filter, &deleted, spec, k))
                .sum::<u64>()
        })
        .sum()
}

/// The `(type, id)` pairs the manifest's `deleted[]` lists for an export with this filter
/// (empty when neither `_since` was given nor `deleted_always` is set).
pub fn expected_deleted(
    config: &SourceConfig,
    filter: &ExportFilter,
) -> BTreeSet<(String, String)> {
    if filter.since.is_none() && !config.deleted_always {
        return BTreeSet::new();
    }
    config
        .deleted
        .iter()
        .filter(|(t, _)| filter.types.as_ref().is_none_or(|ts| ts.contains(t)))
        .cloned()
        .collect()
}

fn deleted_set(config: &SourceConfig) -> HashSet<(String, String)> {
    config.deleted.iter().cloned().collect()
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
        Some(auth) => json_response(
            StatusCode::OK,
            &smart_configuration(auth, &shared.token_url(&cfg)),
        ),
        None => outcome_response(StatusCode::NOT_FOUND, "not-found", "authorization is off"),
    }
}

async fn token(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let cfg = shared.config();
    let Some(auth) = &cfg.auth else {
        return outcome_response(StatusCode::NOT_FOUND, "not-found", "authorization is off");
    };
    let url = shared.token_url(&cfg);
    lock(&shared.rt)
        .auth
        .token_endpoint(auth, &url, &headers, &body)
}

async fn metadata(State(shared): State<Arc<Shared>>) -> Response {
    let cfg = shared.config();
    let base = shared.base_url(&cfg);
    fhir_response(
        StatusCode::OK,
        &json!({
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": now_instant(),
            "kind": "instance",
            "fhirVersion": "4.0.1",
            "format": ["json"],
            "software": {"name": "Fake Bulk Data Source", "version": "1.0.0"},
            "implementation": {"description": "pathling-import test fake", "url": base},
            "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
            "rest": [{"mode": "server",
                      "operation": [{"name": "export",
                                     "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}]}],
        }),
    )
}

async fn kickoff_system(
    State(shared): State<Arc<Shared>>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    kickoff(&shared, ExportLevel::System, &method, &uri, &headers, &body)
}

async fn kickoff_patient(
    State(shared): State<Arc<Shared>>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    kickoff(
        &shared,
        ExportLevel::Patient,
        &method,
        &uri,
        &headers,
        &body,
    )
}

async fn kickoff_group(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    kickoff(
        &shared,
        ExportLevel::Group(id),
        &method,
        &uri,
        &headers,
        &body,
    )
}

fn kickoff(
    shared: &Arc<Shared>,
    level: ExportLevel,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let cfg = shared.config();
    let mut rt = lock(&shared.rt);
    rt.stats.kickoffs += 1;
    let body_json: Option<Value> = if *method == Method::POST {
        serde_json::from_slice(body).ok()
    } else {
        None
    };
    // Refusals carry the parameters too, so that the record shows what was refused.
    let (params, resp) = kickoff_inner(
        shared,
        &cfg,
        &mut rt,
        &level,
        method,
        uri,
        headers,
        body_json.as_ref(),
    )
    .unwrap_or_else(|refused| refused);
    let record = KickoffRecord {
        method: method.to_string(),
        level,
        uri: uri.to_string(),
        params,
        body: body_json,
        accept: header_str(headers, "accept").map(str::to_string),
        prefer: header_str(headers, "prefer").map(str::to_string),
        authorization_sent: headers.contains_key(header::AUTHORIZATION),
        status: resp.status().as_u16(),
    };
    rt.kickoffs.push(record);
    resp
}

type Params = Vec<(String, String)>;

fn bad_request(params: &Params, msg: &str) -> Result<(Params, Response), (Params, Response)> {
    Err((
        params.clone(),
        outcome_response(StatusCode::BAD_REQUEST, "invalid", msg),
    ))
}

/// Flattens a kick-off `Parameters` body into name/value pairs.
fn params_from_body(body: &Value) -> Result<Params, String> {
    let list = crate::fhir::parameters_of(body)?;
    let mut out = Vec::new();
    for p in list {
        let name = p
            .get("name")
            .and_then(Value::as_str)
            .ok_or("a parameter has no name")?;
        let (key, value) = value_of_parameter(p).ok_or(format!("parameter {name} has no value"))?;
        let text = match (key, value) {
            ("valueReference", v) => v
                .get("reference")
                .and_then(Value::as_str)
                .ok_or(format!(
                    "parameter {name} has a reference without 'reference'"
                ))?
                .to_string(),
            (_, Value::String(s)) => s.clone(),
            (_, Value::Bool(b)) => b.to_string(),
            (_, other) => other.to_string(),
        };
        out.push((name.to_string(), text));
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn kickoff_inner(
    shared: &Arc<Shared>,
    cfg: &SourceConfig,
    rt: &mut Runtime,
    level: &ExportLevel,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: Option<&Value>,
) -> Result<(Params, Response), (Params, Response)> {
    let mut params: Params = if *method == Method::POST {
        Vec::new()
    } else {
        form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    };
    if cfg.auth.is_some() {
        if let Err(resp) = rt.auth.check_bearer(headers) {
            return Err((params, resp));
        }
    }
    if rt.kickoff_failures_served < cfg.kickoff_transient_failures {
        rt.kickoff_failures_served += 1;
        let mut resp = fhir_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &operation_outcome("error", "transient", "the server is busy; try again later"),
        );
        cfg.throttle_retry_after.apply(&mut resp);
        return Err((params, resp));
    }
    if let Some(f) = &cfg.kickoff_error {
        return Err((params, f.response()));
    }
    if !header_lists_media_type(headers, "accept", FHIR_JSON) {
        return bad_request(&params, "The Accept header must be application/fhir+json.");
    }
    if !header_has_token(headers, "prefer", "respond-async") {
        return bad_request(&params, "The Prefer header must be respond-async.");
    }
    if *method == Method::POST {
        let ct = header_str(headers, "content-type").map(media_type_of);
        if !ct.is_some_and(|c| {
            c.eq_ignore_ascii_case(FHIR_JSON) || c.eq_ignore_ascii_case("application/json")
        }) {
            return Err((
                params,
                outcome_response(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "not-supported",
                    "A POST kick-off needs a FHIR Parameters body (application/fhir+json).",
                ),
            ));
        }
        match body.map(params_from_body) {
            Some(Ok(p)) => params = p,
            Some(Err(e)) => return bad_request(&params, &e),
            None => return bad_request(&params, "The body is not JSON."),
        }
    }

    let mut types: Option<Vec<String>> = None;
    let mut since = None;
    let mut patients: Option<BTreeSet<String>> = None;
    let mut type_filters = Vec::new();
    let mut elements = Vec::new();
    for (k, v) in &params {
        match k.as_str() {
            "_outputFormat" if !cfg.supported_output_formats.iter().any(|f| f == v) => {
                return bad_request(&params, &format!("The _outputFormat {v} is not supported."));
            }
            "_since" => {
                if since.is_some() {
                    return bad_request(&params, "_since may be given only once.");
                }
                match parse_instant(v) {
                    Some(t) => since = Some(t),
                    None => return bad_request(&params, &format!("Invalid _since instant: {v}")),
                }
            }
            "_type" => {
                for t in v.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                    if !is_resource_type_name(t) {
                        return bad_request(
                            &params,
                            &format!("Invalid resource type in _type: {t}"),
                        );
                    }
                    types.get_or_insert_with(Vec::new).push(t.to_string());
                }
            }
            "_typeFilter" => type_filters.push(v.clone()),
            "_elements" => elements.extend(v.split(',').map(|e| e.trim().to_string())),
            "patient" => {
                if *method != Method::POST {
                    return bad_request(
                        &params,
                        "The patient parameter is only supported with POST.",
                    );
                }
                if *level == ExportLevel::System {
                    return bad_request(
                        &params,
                        "The patient parameter needs a Patient- or Group-level export.",
                    );
                }
                let id = v.strip_prefix("Patient/").unwrap_or(v).to_string();
                patients.get_or_insert_with(BTreeSet::new).insert(id);
            }
            _ => {}
        }
    }
    if let ExportLevel::Group(id) = level {
        let Some(members) = cfg.groups.get(id) else {
            return Err((
                params,
                outcome_response(
                    StatusCode::NOT_FOUND,
                    "not-found",
                    &format!("Group/{id} is not known"),
                ),
            ));
        };
        let members: BTreeSet<String> = members.iter().cloned().collect();
        patients = Some(match patients {
            Some(p) => p.intersection(&members).cloned().collect(),
            None => members,
        });
    }
    if cfg.reject_concurrent_exports && rt.jobs.values().any(|j| !j.completed && !j.deleted) {
        let mut resp = outcome_response(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            "An export is already in progress.",
        );
        cfg.throttle_retry_after.apply(&mut resp);
        return Err((params, resp));
    }

    let id = uuid::Uuid::new_v4().simple().to_string();
    let job = ExportJobInfo {
        id: id.clone(),
        level: level.clone(),
        filter: ExportFilter {
            types,
            since,
            patients,
            compartment_only: *level != ExportLevel::System,
        },
        since_given: since.is_some(),
        type_filters,
        elements,
        request_url: format!("{}{}", shared.origin, uri),
        transaction_time: now_instant(),
        polls: 0,
        progress_polls: 0,
        completed: false,
        deleted: false,
    };
    rt.jobs.insert(id.clone(), job);
    rt.job_order.push(id.clone());
    rt.stats.kickoffs_accepted += 1;
    let mut resp = fhir_response(
        StatusCode::ACCEPTED,
        &operation_outcome("information", "informational", "Export started"),
    );
    let status_url = cfg
        .content_location
        .clone()
        .unwrap_or_else(|| format!("{}/bulkstatus/{id}", shared.base_url(cfg)));
    set_header(&mut resp, header::CONTENT_LOCATION, &status_url);
    Ok((params, resp))
}

async fn poll_status(
    State(shared): State<Arc<Shared>>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let cfg = shared.config();
    let mut rt = lock(&shared.rt);
    rt.stats.polls += 1;
    if cfg.auth.is_some() {
        if let Err(resp) = rt.auth.check_bearer(&headers) {
            return resp;
        }
    }
    let now = Instant::now();
    rt.poll_times.push_back(now);
    let rate_limited = match &cfg.poll_rate_limit {
        Some(limit) => {
            while rt
                .poll_times
                .front()
                .is_some_and(|t| now.duration_since(*t) > limit.window)
            {
                rt.poll_times.pop_front();
            }
            rt.poll_times.len() > limit.max_requests
        }
        None => false,
    };
    let Some(job) = rt.jobs.get_mut(&job_id).filter(|j| !j.deleted) else {
        return outcome_response(
            StatusCode::NOT_FOUND,
            "not-found",
            "Unknown or deleted export job",
        );
    };
    job.polls += 1;
    let n = job.polls;
    if rate_limited || cfg.throttle_polls.contains(&n) {
        rt.stats.throttled += 1;
        let mut resp = outcome_response(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            "Too many requests; slow down.",
        );
        cfg.throttle_retry_after.apply(&mut resp);
        return resp;
    }
    if cfg.transient_error_polls.contains(&n) {
        rt.stats.transient_errors += 1;
        let status = StatusCode::from_u16(cfg.transient_error_status)
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut resp = fhir_response(
            status,
            &operation_outcome("error", "transient", "Temporary failure; ask again later."),
        );
        cfg.throttle_retry_after.apply(&mut resp);
        return resp;
    }
    if let Some(f) = cfg.permanent_error.as_ref().filter(|f| n >= f.from_poll) {
        return f.failure.response();
    }
    job.progress_polls += 1;
    if job.progress_polls <= cfg.in_progress_polls {
        let pct = u64::from(job.progress_polls) * 100 / (u64::from(cfg.in_progress_polls) + 1);
        let mut resp = empty_response(StatusCode::ACCEPTED);
        set_header(
            &mut resp,
            HeaderName::from_static("x-progress"),
            &format!("{pct}% complete"),
        );
        cfg.progress_retry_after.apply(&mut resp);
        return resp;
    }
    job.completed = true;
    let job = job.clone();
    rt.stats.manifests += 1;
    if let Some(oversized) = cfg.oversized_manifest {
        return oversized_manifest(&job, oversized);
    }
    let manifest = build_manifest(&shared, &cfg, &mut rt, &job);
    let manifest = match cfg.manifest_page_size {
        Some(size) => paged(&manifest, size, 1, &shared.base_url(&cfg), &job.id),
        None => manifest,
    };
    let mut resp = json_response(StatusCode::OK, &manifest);
    if let Some(at) = cfg
        .manifest_expires
        .and_then(|exp| std::time::SystemTime::now().checked_add(exp))
    {
        set_header(&mut resp, header::EXPIRES, &httpdate::fmt_http_date(at));
    }
    resp
}

/// [`SourceConfig::oversized_manifest`]: `{"transactionTime": …, "output": [], …,
/// "padding": "xxx…"}` of exactly `bytes` bytes (or just the head, when that is longer).
fn oversized_manifest(job: &ExportJobInfo, oversized: OversizedManifest) -> Response {
    const CHUNK: usize = 64 * 1024;
    let head = json!({
        "transactionTime": job.transaction_time,
        "request": job.request_url,
        "requiresAccessToken": false,
        "output": [],
        "error": [],
    })
    .to_string();
    let head = format!("{},\"padding\":\"", head.trim_end_matches('}'));
    let tail = "\"}";
    let fixed = (head.len() + tail.len()) as u64;
    let padding = oversized.bytes.saturating_sub(fixed);
    let parts = futures_util::stream::iter(
        std::iter::once(Bytes::from(head))
            .chain((0..padding.div_ceil(CHUNK as u64)).map(move |i| {
                let left = padding - i * CHUNK as u64;
                Bytes::from(vec![b'x'; left.min(CHUNK as u64) as usize])
            }))
            .chain(std::iter::once(Bytes::from_static(tail.as_bytes())))
            .map(Ok::<_, std::io::Error>),
    );
    let mut resp = Response::new(Body::from_stream(parts));
    set_header(&mut resp, header::CONTENT_TYPE, "application/json");
    if oversized.content_length {
        set_header(
            &mut resp,
            header::CONTENT_LENGTH,
            &(fixed + padding).to_string(),
        );
    }
    resp
}

fn is_routed(cfg: &SourceConfig, file_type: &str) -> bool {
    cfg.file_routing != FileRouting::Direct
        && cfg
            .routed_types
            .as_ref()
            .is_none_or(|ts| ts.contains(file_type))
}

fn presigned_url(shared: &Shared, rt: &mut Runtime, job: &str, name: &str) -> String {
    let sig = rt
        .signatures
        .entry(format!("{job}/{name}"))
        .or_insert_with(|| uuid::Uuid::new_v4().simple().to_string())
        .clone();
    format!(
        "{}/{STORAGE_BUCKET}/{job}/{name}?X-Amz-Algorithm=AWS4-HMAC-SHA256\
         &X-Amz-Credential=FAKEKEY%2F20240101%2Fus-east-1%2Fs3%2Faws4_request\
         &X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host\
         &X-Amz-Signature={sig}",
        shared.storage_origin
    )
}

fn file_url(
    shared: &Shared,
    cfg: &SourceConfig,
    rt: &mut Runtime,
    job: &str,
    name: &str,
    file_type: &str,
) -> String {
    if cfg.file_routing == FileRouting::Presigned && is_routed(cfg, file_type) {
        presigned_url(shared, rt, job, name)
    } else {
        format!("{}/bulkfiles/{job}/{name}", shared.base_url(cfg))
    }
}

fn deleted_for_job(cfg: &SourceConfig, job: &ExportJobInfo) -> Vec<(String, String)> {
    if !job.since_given && !cfg.deleted_always {
        return Vec::new();
    }
    cfg.deleted
        .iter()
        .filter(|(t, _)| job.filter.types.as_ref().is_none_or(|ts| ts.contains(t)))
        .cloned()
        .collect()
}

/// Page `page` (from 1) of `manifest`, at most `size` `output[]` entries a page.
fn paged(manifest: &Value, size: usize, page: usize, base: &str, job: &str) -> Value {
    let output = manifest["output"].as_array().cloned().unwrap_or_default();
    let pages = output.len().div_ceil(size.max(1)).max(1);
    let mut out = manifest.clone();
    out["output"] = Value::Array(
        output
            .chunks(size.max(1))
            .nth(page - 1)
            .map(<[Value]>::to_vec)
            .unwrap_or_default(),
    );
    if page < pages {
        for array in ["deleted", "error"] {
            if out.get(array).is_some() {
                out[array] = json!([]);
            }
        }
        out["link"] =
            json!([{"relation": "next", "url": format!("{base}/bulkmanifest/{job}/{}", page + 1)}]);
    }
    out
}

/// A later page of a paged manifest ([`SourceConfig::manifest_page_size`]).
async fn manifest_page_get(
    State(shared): State<Arc<Shared>>,
    Path((job_id, page)): Path<(String, usize)>,
    headers: HeaderMap,
) -> Response {
    let cfg = shared.config();
    let mut rt = lock(&shared.rt);
    if cfg.auth.is_some() {
        if let Err(resp) = rt.auth.check_bearer(&headers) {
            return resp;
        }
    }
    let Some(job) = rt.jobs.get(&job_id).filter(|j| j.completed).cloned() else {
        return empty_response(StatusCode::NOT_FOUND);
    };
    let (Some(size), true) = (cfg.manifest_page_size, page >= 2) else {
        return empty_response(StatusCode::NOT_FOUND);
    };
    rt.stats.manifests += 1;
    let manifest = build_manifest(&shared, &cfg, &mut rt, &job);
    json_response(
        StatusCode::OK,
        &paged(&manifest, size, page, &shared.base_url(&cfg), &job.id),
    )
}

fn build_manifest(
    shared: &Shared,
    cfg: &SourceConfig,
    rt: &mut Runtime,
    job: &ExportJobInfo,
) -> Value {
    let deleted = deleted_set(cfg);
    let mut output = Vec::new();
    let mut repeated = Vec::new();
    for spec in cfg.dataset.selected_types(&job.filter) {
        for k in 0..spec.files {
            let count = cfg.dataset.count_in_file(&job.filter, &deleted, spec, k);
            if count == 0 && !cfg.emit_empty_files {
                continue;
            }
            let name = format!("{}.{k}.ndjson", spec.resource_type);
            let url = file_url(shared, cfg, rt, &job.id, &name, &spec.resource_type);
            let entry = json!({"type": spec.resource_type, "url": url, "count": count});
            if cfg.repeat_in_manifest.contains(&name) {
                repeated.push(entry.clone());
            }
            output.push(entry);
        }
    }
    output.extend(repeated);
    for (resource_type, url) in &cfg.extra_output {
        output.push(json!({"type": resource_type, "url": url}));
    }
    let mut manifest = json!({
        "transactionTime": job.transaction_time,
        "request": job.request_url,
        "requiresAccessToken": cfg.requires_access_token,
        "output": output,
        "error": [],
    });
    let del = deleted_for_job(cfg, job);
    if job.since_given || cfg.deleted_always {
        let mut entries = Vec::new();
        if !del.is_empty() {
            let lines = del.len().div_ceil(cfg.deleted_per_bundle.max(1));
            let url = file_url(shared, cfg, rt, &job.id, "deleted.0.ndjson", "Bundle");
            entries.push(json!({"type": "Bundle", "url": url, "count": lines}));
        }
        manifest["deleted"] = Value::Array(entries);
    }
    if !cfg.errors.is_empty() {
        let url = file_url(
            shared,
            cfg,
            rt,
            &job.id,
            "error.0.ndjson",
            "OperationOutcome",
        );
        manifest["error"] =
            json!([{"type": "OperationOutcome", "url": url, "count": cfg.errors.len()}]);
    }
    manifest
}

async fn delete_job(
    State(shared): State<Arc<Shared>>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let cfg = shared.config();
    let mut rt = lock(&shared.rt);
    if cfg.auth.is_some() {
        if let Err(resp) = rt.auth.check_bearer(&headers) {
            return resp;
        }
    }
    match rt.jobs.get_mut(&job_id).filter(|j| !j.deleted) {
        Some(job) => {
            job.deleted = true;
            rt.stats.job_deletes += 1;
            fhir_response(
                StatusCode::ACCEPTED,
                &operation_outcome("information", "informational", "Export job deleted"),
            )
        }
        None => outcome_response(
            StatusCode::NOT_FOUND,
            "not-found",
            "Unknown or deleted export job",
        ),
    }
}

/// What a file name of a job refers to.
enum FileKind {
    Data { resource_type: String, k: u32 },
    Deleted,
    Error,
}

impl FileKind {
    fn parse(cfg: &SourceConfig, job: &ExportJobInfo, name: &str) -> Option<Self> {
        let stem = name.strip_suffix(".ndjson")?;
        let (prefix, k) = stem.rsplit_once('.')?;
        let k: u32 = k.parse().ok()?;
        match prefix {
            "deleted" if k == 0 && !deleted_for_job(cfg, job).is_empty() => Some(FileKind::Deleted),
            "error" if k == 0 && !cfg.errors.is_empty() => Some(FileKind::Error),
            t => {
                let spec = cfg
                    .dataset
                    .selected_types(&job.filter)
                    .into_iter()
                    .find(|s| s.resource_type == t)?;
                (k < spec.files).then(|| FileKind::Data {
                    resource_type: t.to_string(),
                    k,
                })
            }
        }
    }

    fn manifest_type(&self) -> &str {
        match self {
            FileKind::Data { resource_type, .. } => resource_type,
            FileKind::Deleted => "Bundle",
            FileKind::Error => "OperationOutcome",
        }
    }
}

/// Produces the lines of a file one at a time.
enum LineSource {
    Data {
        dataset: DatasetConfig,
        resource_type: String,
        next: u64,
        end: u64,
        filter: ExportFilter,
        deleted: HashSet<(String, String)>,
    },
    Fixed(VecDeque<String>),
}

impl LineSource {
    fn new(cfg: &SourceConfig, job: &ExportJobInfo, kind: &FileKind) -> Self {
        match kind {
            FileKind::Data { resource_type, k } => {
                let range = cfg
                    .dataset
                    .spec(resource_type)
                    .map(|spec| cfg.dataset.file_range(spec, *k))
                    .unwrap_or(0..0);
                LineSource::Data {
                    dataset: cfg.dataset.clone(),
                    resource_type: resource_type.clone(),
                    next: range.start,
                    end: range.end,
                    filter: job.filter.clone(),
                    deleted: deleted_set(cfg),
                }
            }
            FileKind::Deleted => {
                let del = deleted_for_job(cfg, job);
                let lines = del
                    .chunks(cfg.deleted_per_bundle.max(1))
                    .map(|chunk| {
                        let entries: Vec<Value> = chunk
                            .iter()
                            .map(|(t, id)| {
                                json!({"fullUrl": format!("{t}/{id}"),
                                       "request": {"method": "DELETE", "url": format!("{t}/{id}")}})
                            })
                            .collect();
                        json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
                            .to_string()
                    })
                    .collect();
                LineSource::Fixed(lines)
            }
            FileKind::Error => LineSource::Fixed(
                cfg.errors
                    .iter()
                    .map(|e| operation_outcome(&e.severity, &e.code, &e.diagnostics).to_string())
                    .collect(),
            ),
        }
    }

    /// Appends the next line (without newline); false when there is none.
    fn next_line(&mut self, out: &mut Vec<u8>) -> bool {
        match self {
            LineSource::Data {
                dataset,
                resource_type,
                next,
                end,
                filter,
                deleted,
            } => {
                while *next < *end {
                    let i = *next;
                    *next += 1;
                    if dataset.includes(filter, deleted, resource_type, i) {
                        dataset.write_resource(resource_type, i, out);
                        return true;
                    }
                }
                false
            }
            LineSource::Fixed(lines) => match lines.pop_front() {
                Some(l) => {
                    out.extend_from_slice(l.as_bytes());
                    true
                }
                None => false,
            },
        }
    }
}

/// Decrements the active-download count when a body ends or is dropped.
struct DownloadGuard(Arc<AtomicUsize>);

impl Drop for DownloadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct FileBody {
    lines: LineSource,
    wrote_any: bool,
    lines_done: bool,
    done: bool,
    trailing_newline: bool,
    gzip: Option<GzEncoder<Vec<u8>>>,
    emitted: u64,
    reset_at: Option<u64>,
    broken: bool,
    /// Bytes of the file not sent (a range request's start).
    skip: u64,
    /// Stop sending at this byte and hang.
    stall_at: Option<u64>,
    stalled: bool,
    chunk: usize,
    shared: Arc<Shared>,
    _guard: DownloadGuard,
}

impl FileBody {
    fn next_chunk(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        loop {
            if self.done {
                return None;
            }
            if self.broken {
                self.done = true;
                lock(&self.shared.rt).stats.resets_injected += 1;
                return Some(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "connection reset injected by the fake source",
                )));
            }
            let mut raw = Vec::with_capacity(self.chunk + 1024);
            while raw.len() < self.chunk && !self.lines_done {
                let start = raw.len();
                // The separator goes before each line but the first, so that the presence of a
                // final newline is a separate decision.
                if self.wrote_any {
                    raw.push(b'\n');
                }
                if self.lines.next_line(&mut raw) {
                    self.wrote_any = true;
                } else {
                    raw.truncate(start);
                    self.lines_done = true;
                    if self.trailing_newline && self.wrote_any {
                        raw.push(b'\n');
                    }
                }
            }
            if let Some(at) = self.reset_at {
                if self.emitted + raw.len() as u64 >= at {
                    raw.truncate(at.saturating_sub(self.emitted) as usize);
                    self.broken = true;
                }
            }
            if let Some(at) = self.stall_at {
                if self.emitted + raw.len() as u64 >= at {
                    raw.truncate(at.saturating_sub(self.emitted) as usize);
                    self.stalled = true;
                }
            }
            let start = self.emitted;
            self.emitted += raw.len() as u64;
            if self.skip > start {
                let drop = (self.skip - start).min(raw.len() as u64) as usize;
                raw.drain(..drop);
            }
            lock(&self.shared.rt).stats.file_bytes_sent += raw.len() as u64;
            let out = match self.gzip.as_mut() {
                None => raw,
                Some(enc) => {
                    if let Err(e) = enc.write_all(&raw) {
                        self.done = true;
                        return Some(Err(e));
                    }
                    if self.broken {
                        let _ = enc.flush();
                    }
                    if self.lines_done && !self.broken {
                        match self.gzip.take().map(GzEncoder::finish) {
                            Some(Ok(rest)) => rest,
                            Some(Err(e)) => {
                                self.done = true;
                                return Some(Err(e));
                            }
                            None => Vec::new(),
                        }
                    } else {
                        std::mem::take(enc.get_mut())
                    }
                }
            };
            if self.lines_done && !self.broken {
                self.done = true;
                lock(&self.shared.rt).stats.files_completed += 1;
            }
            if !out.is_empty() {
                return Some(Ok(Bytes::from(out)));
            }
        }
    }
}

/// What [`SourceConfig::html_files`] are answered with.
pub const HTML_PAGE: &str = "<!DOCTYPE html>\n<html><head><title>Sign in</title></head>\n\
    <body><form action=\"/login\" method=\"post\">Your session has expired.</form></body></html>\n";

/// The length of a file's body, as [`FileBody`] writes it.
fn file_length(cfg: &SourceConfig, job: &ExportJobInfo, kind: &FileKind) -> u64 {
    let mut lines = LineSource::new(cfg, job, kind);
    let (mut total, mut count, mut line) = (0u64, 0u64, Vec::new());
    while {
        line.clear();
        lines.next_line(&mut line)
    } {
        total += line.len() as u64;
        count += 1;
    }
    let separators = count.saturating_sub(1);
    let trailing = u64::from(!cfg.no_trailing_newline && count > 0);
    total + separators + trailing
}

/// Serves a file body. `gzip_allowed` is false on the storage origin.
#[allow(clippy::too_many_arguments)]
fn serve_file(
    shared: &Arc<Shared>,
    cfg: &SourceConfig,
    rt: &mut Runtime,
    job: &ExportJobInfo,
    name: &str,
    kind: &FileKind,
    headers: &HeaderMap,
    gzip_allowed: bool,
) -> Response {
    let active = shared.active_downloads.fetch_add(1, Ordering::SeqCst) + 1;
    let guard = DownloadGuard(shared.active_downloads.clone());
    if cfg.max_concurrent_downloads.is_some_and(|max| active > max) {
        drop(guard);
        rt.stats.downloads_rejected_concurrency += 1;
        let mut resp = outcome_response(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            "Too many concurrent downloads.",
        );
        cfg.throttle_retry_after.apply(&mut resp);
        return resp;
    }
    rt.stats.max_concurrent_downloads_seen = rt.stats.max_concurrent_downloads_seen.max(active);
    let attempts = rt
        .file_attempts
        .entry(format!("{}/{name}", job.id))
        .or_insert(0);
    *attempts += 1;
    if cfg.html_files.contains(name) {
        rt.stats.files_completed += 1;
        let mut resp = Response::new(Body::from(HTML_PAGE));
        set_header(&mut resp, header::CONTENT_TYPE, "text/html; charset=utf-8");
        return resp;
    }
    let reset_at = cfg
        .reset
        .as_ref()
        .filter(|r| *attempts <= r.first_attempts)
        .map(|r| r.after_bytes);
    let etag = format!("\"{}-{name}-v{}\"", job.id, cfg.file_version);
    let range = cfg
        .ranges
        .then(|| {
            headers
                .get(header::RANGE)?
                .to_str()
                .ok()?
                .strip_prefix("bytes=")?
                .strip_suffix('-')?
                .parse::<u64>()
                .ok()
        })
        .flatten()
        .filter(|_| {
            headers
                .get(header::IF_RANGE)
                .is_none_or(|v| v.to_str().is_ok_and(|v| v == etag))
        });
    // Files served with ranges have their length said, as an object store says it (not for the
    // faults that cut a body short).
    let said_length = cfg.ranges && cfg.stall_at.is_none() && reset_at.is_none();
    let length = (range.is_some() || said_length).then(|| file_length(cfg, job, kind));
    if let (Some(start), Some(length)) = (range, length) {
        if start >= length {
            let mut resp = empty_response(StatusCode::RANGE_NOT_SATISFIABLE);
            set_header(
                &mut resp,
                header::CONTENT_RANGE,
                &format!("bytes */{length}"),
            );
            return resp;
        }
        rt.stats.ranges_served += 1;
    }
    let gzip = range.is_none()
        && gzip_allowed
        && cfg.gzip_when_asked
        && header_has_token(headers, "accept-encoding", "gzip");
    let body = FileBody {
        lines: LineSource::new(cfg, job, kind),
        wrote_any: false,
        lines_done: false,
        done: false,
        trailing_newline: !cfg.no_trailing_newline,
        gzip: gzip.then(|| GzEncoder::new(Vec::new(), Compression::fast())),
        emitted: 0,
        reset_at,
        broken: false,
        skip: range.unwrap_or(0),
        stall_at: cfg.stall_at,
        stalled: false,
        chunk: cfg.chunk_bytes.max(1),
        shared: shared.clone(),
        _guard: guard,
    };
    let delay = cfg.chunk_delay;
    let stream = futures_util::stream::unfold(body, move |mut b| async move {
        if b.stalled {
            // Gone silent: the connection stays open and nothing more comes.
            std::future::pending::<()>().await;
        }
        if !delay.is_zero() && !b.done {
            tokio::time::sleep(delay).await;
        }
        if b.broken && !b.done {
            // Part of the fault being faked: hyper flushes what it has buffered while the body
            // is pending, and says nothing when it is done; without this pause the headers and
            // the bytes before the break could be dropped with the connection, and the client
            // would see a failed request, not a cut-off body.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        b.next_chunk().map(|c| (c, b))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    set_header(&mut resp, header::CONTENT_TYPE, FHIR_NDJSON);
    if cfg.ranges {
        set_header(&mut resp, header::ACCEPT_RANGES, "bytes");
        set_header(&mut resp, header::ETAG, &etag);
    }
    if let (Some(start), Some(length)) = (range, length) {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        let range = format!("bytes {start}-{}/{length}", length - 1);
        set_header(&mut resp, header::CONTENT_RANGE, &range);
    }
    if gzip {
        set_header(&mut resp, header::CONTENT_ENCODING, "gzip");
    } else if let (true, Some(length)) = (said_length, length) {
        let rest = length - range.unwrap_or(0);
        set_header(&mut resp, header::CONTENT_LENGTH, &rest.to_string());
    }
    set_header(&mut resp, header::VARY, "accept-encoding");
    resp
}

async fn file_get(
    State(shared): State<Arc<Shared>>,
    Path((job_id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let cfg = shared.config();
    let mut rt = lock(&shared.rt);
    rt.stats.file_gets += 1;
    if headers.contains_key(header::AUTHORIZATION) {
        rt.stats.file_gets_with_authorization += 1;
    }
    if cfg.auth.is_some() && cfg.requires_access_token {
        if let Err(resp) = rt.auth.check_bearer(&headers) {
            return resp;
        }
    }
    let Some(job) = rt.jobs.get(&job_id).filter(|j| !j.deleted).cloned() else {
        return outcome_response(
            StatusCode::NOT_FOUND,
            "not-found",
            "Unknown or deleted export job",
        );
    };
    let Some(kind) = FileKind::parse(&cfg, &job, &name) else {
        return outcome_response(StatusCode::NOT_FOUND, "not-found", "No such file");
    };
    if cfg.file_routing == FileRouting::Redirect && is_routed(&cfg, kind.manifest_type()) {
        rt.stats.redirects += 1;
        let location = presigned_url(&shared, &mut rt, &job.id, &name);
        let mut resp = empty_response(StatusCode::TEMPORARY_REDIRECT);
        set_header(&mut resp, header::LOCATION, &location);
        return resp;
    }
    if cfg.lost_files.contains(&name) {
        return outcome_response(StatusCode::NOT_FOUND, "not-found", "No such file");
    }
    serve_file(&shared, &cfg, &mut rt, &job, &name, &kind, &headers, true)
}

fn s3_error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut resp = empty_response(status);
    *resp.body_mut() = Body::from(format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>{message}</Message></Error>"
    ));
    set_header(&mut resp, header::CONTENT_TYPE, "application/xml");
    resp
}

async fn storage_get(
    State(shared): State<Arc<Shared>>,
    Path((bucket, job_id, name)): Path<(String, String, String)>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Response {
    let cfg = shared.config();
    let mut rt = lock(&shared.rt);
    rt.stats.storage_gets += 1;
    if headers.contains_key(header::AUTHORIZATION) {
        rt.stats.storage_rejected_authorization += 1;
        return s3_error(
            StatusCode::BAD_REQUEST,
            "InvalidArgument",
            "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, \
             Signature query string parameter or the Authorization header should be specified",
        );
    }
    let sig = form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "X-Amz-Signature")
        .map(|(_, v)| v.into_owned());
    let expected = rt.signatures.get(&format!("{job_id}/{name}")).cloned();
    if bucket != STORAGE_BUCKET || sig.is_none() || sig != expected {
        rt.stats.storage_bad_signature += 1;
        return s3_error(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        );
    }
    let Some(job) = rt.jobs.get(&job_id).filter(|j| !j.deleted).cloned() else {
        return s3_error(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "The specified key does not exist.",
        );
    };
    let Some(kind) = FileKind::parse(&cfg, &job, &name).filter(|_| !cfg.lost_files.contains(&name))
    else {
        return s3_error(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "The specified key does not exist.",
        );
    };
    serve_file(&shared, &cfg, &mut rt, &job, &name, &kind, &headers, false)
}
