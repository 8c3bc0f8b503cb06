//! The one effect executor every runner shares: performs a core [`Request`] and reports what
//! happened as an [`EffectResult`]. It holds everything the core must not: the HTTP client,
//! credentials and tokens, the staging store, a cache of stored manifests.
//!
//! It judges nothing: failures are reported as facts (status, `Retry-After`, message) and the
//! core decides about retries. It never returns a secret in a result.

use crate::auth::{Authenticator, BearerToken, Side};
use crate::http::{header, read_capped, status_failure, transport_failure, MAX_JSON_ANSWER};
use crate::net::{AddressPolicy, Clients};
use crate::redact;
use crate::staging::{
    FailureSide, PutReport, S3Options, S3Store, SourceFacts, StagingError, StagingStore,
};
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use pathling_import_core::bulk::{
    deleted_refs, FileKind, Manifest, ManifestPages, OutcomeSummary, ResourceRef,
};
use pathling_import_core::config::{Secrets, TlsConfig};
use pathling_import_core::effect::{
    Effect, EffectResult, ExportKickoffRequest, ManifestDigest, Request,
};
use pathling_import_core::pathling::{
    api_from_capability, delete_batch_bundle, judge_delete_entry, read_import_answer, DeleteEntry,
    ImportAnswer,
};
use pathling_import_core::retry::{Failure, FailureKind};
use pathling_import_core::spec::{PathlingApi, RunSpec, TransferSpec};
use pathling_import_core::staging::{StagingKey, StagingLocation};
use pathling_import_core::{ContentError, NdjsonCheck, Timestamp, Validation};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::Mutex;

mod ranges;
pub use ranges::RangeFailure;

const FHIR_JSON: &str = "application/fhir+json";
const NDJSON: &str = "application/fhir+ndjson";
/// Deletions are sent as `batch` Bundles of at most this many entries.
const DELETE_BATCH: usize = 100;

/// Wall-clock now, for the core.
pub fn now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Timestamp(ms)
}

/// Live counters for progress displays.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes received from the source while staging (decoded).
    pub bytes_downloaded: AtomicU64,
    pub files_staged: AtomicU64,
    pub resources_staged: AtomicU64,
    /// Files whose staging continued an interrupted attempt's.
    pub files_resumed: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{0}")]
    Auth(#[from] crate::auth::AuthSetupError),
    #[error("{0}")]
    CaFile(#[from] crate::net::CaFileError),
    #[error("HTTP client: {0}")]
    Http(String),
    #[error("staging store: {0}")]
    Staging(#[from] StagingError),
}

/// What the preflight found wrong, before any export is started.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("the staging location {location} is not usable: {failure}")]
    Staging { location: String, failure: Failure },
    #[error("no token could be obtained for the target: {0}")]
    TargetAuth(Failure),
}

impl PreflightError {
    /// Whether waiting might fix it (the service was unreachable), rather than configuration.
    pub fn is_transient(&self) -> bool {
        let failure = match self {
            PreflightError::Staging { failure, .. } | PreflightError::TargetAuth(failure) => {
                failure
            }
        };
        pathling_import_core::retry::classify(failure)
            == pathling_import_core::retry::Verdict::Transient
    }
}

/// What one poll of an asynchronous job answered ([`Executor::poll_job`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobPoll {
    /// `202 Accepted`: still running; `X-Progress` and `Retry-After` as sent.
    InProgress {
        progress: Option<String>,
        retry_after: Option<String>,
    },
    /// `200 OK`, with the body as sent (a Bulk Data manifest, or Pathling's answer), read up
    /// to the side's cap.
    Completed {
        body: Bytes,
        /// The origin the answer came from, when redirects led away from the job URL's.
        redirected_to: Option<String>,
    },
}

pub struct Executor {
    /// The source's client (and its file URLs'): its trust, the address policy, redirects.
    source_http: reqwest::Client,
    target_http: reqwest::Client,
    policy: Arc<AddressPolicy>,
    manifest_max_bytes: u64,
    source_base: String,
    target_base: String,
    source_auth: Authenticator,
    target_auth: Authenticator,
    staging: StagingStore,
    manifests: Mutex<HashMap<StagingKey, Arc<Manifest>>>,
    pub counters: Arc<Counters>,
    /// Per file being staged (by staging key): the bytes stored when its attempt started, and
    /// those its latest checkpoint holds, so a cut attempt that got somewhere is told apart.
    progress: std::sync::Mutex<HashMap<String, (u64, Arc<AtomicU64>)>>,
    /// Set while the invocation is about to end: transfers stop at their next part boundary.
    winding_down: Arc<std::sync::atomic::AtomicBool>,
    /// Files whose attempt in this process left a checkpoint.
    continued: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Per folder of staged files, the names with a checkpoint when it was last listed (and
    /// when): one listing instead of a lookup per file.
    listings: Mutex<HashMap<String, Listing>>,
    /// Bytes per range of a file split for a fan-out (0: files are not split); see
    /// [`split_files`](Self::split_files).
    split_ranges: AtomicU64,
    /// The files this process split.
    split_keys: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// The names with a checkpoint in a folder, and when they were listed.
type Listing = (std::time::Instant, Arc<std::collections::HashSet<String>>);

/// How long a folder's listing of checkpoints is trusted: one left meanwhile by another process
/// (another Lambda container) is missed for at most this long, which costs its progress only.
const LISTING_TTL: std::time::Duration = std::time::Duration::from_secs(60);

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("source", &self.source_base)
            .field("target", &self.target_base)
            .field("staging", &self.staging)
            .finish_non_exhaustive()
    }
}

impl Executor {
    /// Builds clients and parses credentials once (per process or Lambda container).
    pub async fn new(
        spec: &RunSpec,
        secrets: &Secrets,
        tls: &TlsConfig,
    ) -> Result<Executor, SetupError> {
        let policy =
            AddressPolicy::new([spec.source.endpoint.as_str(), spec.target.endpoint.as_str()]);
        let clients = Clients::new(&spec.transfer, policy.clone(), tls)?;
        let http_error = |e: reqwest::Error| SetupError::Http(e.to_string());
        let source_http = clients.build(Side::Source).map_err(http_error)?;
        let target_http = clients.build(Side::Target).map_err(http_error)?;
        // Each authenticator builds its own client from the side's settings, with redirects
        // off (a followed 307 would re-send the client secret or assertion).
        let source_auth = Authenticator::new(
            clients.builder(Side::Source),
            &spec.source.endpoint,
            &spec.source.auth,
            secrets.source_client_secret.clone(),
            secrets.source_private_key.clone(),
            Side::Source,
        )?;
        let target_auth = Authenticator::new(
            clients.builder(Side::Target),
            &spec.target.endpoint,
            &spec.target.auth,
            secrets.target_client_secret.clone(),
            secrets.target_private_key.clone(),
            Side::Target,
        )?;
        for (side, endpoint, auth) in [
            ("source", &spec.source.endpoint, &spec.source.auth),
            ("target", &spec.target.endpoint, &spec.target.auth),
        ] {
            if crate::net::credentials_in_clear(endpoint, auth.enabled) {
                tracing::warn!(
                    side,
                    "credentials for the {side} travel over plain http to a host that is not \
                     this machine; use https"
                );
            }
        }
        let staging = open_staging(&spec.staging, &spec.transfer).await?;
        Ok(Executor {
            source_http,
            target_http,
            policy,
            manifest_max_bytes: spec.transfer.manifest_max_bytes,
            source_base: spec.source.endpoint.clone(),
            target_base: spec.target.endpoint.clone(),
            source_auth,
            target_auth,
            staging,
            manifests: Mutex::new(HashMap::new()),
            counters: Arc::new(Counters::default()),
            progress: std::sync::Mutex::new(HashMap::new()),
            winding_down: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            continued: std::sync::Mutex::new(Default::default()),
            listings: Mutex::new(HashMap::new()),
            split_ranges: AtomicU64::new(0),
            split_keys: std::sync::Mutex::new(Default::default()),
        })
    }

    pub fn staging(&self) -> &StagingStore {
        &self.staging
    }

    /// Fails in seconds what would otherwise fail hours later, after the export: the staging
    /// location is written to and cleaned (a marker under `prefix`), and the target's token
    /// is obtained when authentication is on.
    pub async fn preflight(&self, prefix: &str) -> Result<(), PreflightError> {
        let key = format!("{prefix}.pathling-import-preflight");
        let location = format!("{}/{prefix}", self.staging);
        let staging = |e: StagingError, what: &str| PreflightError::Staging {
            location: location.clone(),
            failure: redacted(staging_failure(what, &e)),
        };
        self.staging
            .put_bytes(&key, Bytes::from_static(b"preflight\n"))
            .await
            .map_err(|e| staging(e, &format!("writing {key}")))?;
        self.staging
            .delete(&key)
            .await
            .map_err(|e| staging(e, &format!("deleting {key}")))?;
        self.target_auth
            .token(now().0)
            .await
            .map_err(|f| PreflightError::TargetAuth(redacted(f)))?;
        Ok(())
    }

    /// The client for a side.
    fn http(&self, side: Side) -> &reqwest::Client {
        match side {
            Side::Source => &self.source_http,
            Side::Target => &self.target_http,
        }
    }

    /// A URL a server handed us (a file, a status or job URL) must pass the address policy
    /// before it is requested.
    fn allowed(&self, context: &str, url: &str) -> Result<(), Failure> {
        self.policy
            .check_url(url)
            .map_err(|why| Failure::new(FailureKind::Local, format!("{context}: {why}")))
    }

    /// Performs one effect. Never panics on external data; every problem is a `Failed` fact.
    pub async fn execute(&self, request: &Request) -> EffectResult {
        let result = match &request.effect {
            Effect::KickoffExport(k) => self.kickoff_export(k).await,
            Effect::PollExport {
                status_url,
                manifest_key,
            } => self.poll_export(status_url, manifest_key).await,
            Effect::StageFile {
                manifest_key,
                index,
                kind,
                type_name,
                key,
                validate,
            } => {
                self.stage_file(manifest_key, *index, *kind, type_name, key, *validate)
                    .await
            }
            Effect::DetectPathling => self.detect_pathling().await,
            Effect::KickoffImport {
                api,
                parameters,
                replaces,
            } => {
                self.kickoff_import(*api, parameters, replaces.as_deref())
                    .await
            }
            Effect::PollImport { job_url } => self.poll_import(job_url).await,
            Effect::ApplyDeletions { key, .. } => self.apply_deletions(key).await,
            Effect::DeleteExportJob { status_url } => self.delete_export_job(status_url).await,
        };
        // The one exit of facts that may quote a server: no secret leaves through it.
        match result {
            Ok(EffectResult::ImportCompleted { mut answer }) => {
                for issue in answer.issues.iter_mut() {
                    issue.diagnostics = issue.diagnostics.as_deref().map(redact::scrub);
                }
                answer.undecodable = answer.undecodable.as_deref().map(redact::scrub);
                EffectResult::ImportCompleted { answer }
            }
            Ok(other) => other,
            Err(f) => EffectResult::Failed(redacted(f)),
        }
    }

    /// Sends a request with the side's bearer token (when `authenticate`), re-authenticating
    /// once after a 401.
    async fn send(
        &self,
        side: Side,
        authenticate: bool,
        context: &str,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, Failure> {
        let auth = match side {
            Side::Source => &self.source_auth,
            Side::Target => &self.target_auth,
        };
        let mut retried = false;
        loop {
            let token: Option<BearerToken> = if authenticate {
                auth.token(now().0).await?
            } else {
                None
            };
            let mut req = build();
            if let Some(t) = &token {
                req = req.header(reqwest::header::AUTHORIZATION, t.header_value());
            }
            let resp = req
                .send()
                .await
                .map_err(|e| transport_failure(context, e))?;
            if resp.status() == StatusCode::UNAUTHORIZED && !retried {
                if let Some(t) = &token {
                    auth.invalidate(t).await;
                    retried = true;
                    continue;
                }
            }
            return Ok(resp);
        }
    }

    async fn kickoff_export(&self, k: &ExportKickoffRequest) -> Result<EffectResult, Failure> {
        let ctx = "export kick-off";
        let resp = self
            .send(Side::Source, true, ctx, || {
                let req = match &k.post_body {
                    Some(body) => self
                        .source_http
                        .post(&k.url)
                        .header("content-type", FHIR_JSON)
                        .body(body.to_string()),
                    None => self.source_http.get(&k.url).query(&k.query),
                };
                req.header("accept", FHIR_JSON)
                    .header("prefer", "respond-async")
            })
            .await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(unexpected(ctx, resp, "202 Accepted").await);
        }
        let location = header(resp.headers(), "content-location").ok_or_else(|| {
            Failure::new(
                FailureKind::Undecodable,
                format!("{ctx}: 202 without a Content-Location header"),
            )
        })?;
        Ok(EffectResult::ExportAccepted {
            status_url: location,
        })
    }

    async fn poll_export(
        &self,
        status_url: &str,
        manifest_key: &StagingKey,
    ) -> Result<EffectResult, Failure> {
        match self.poll_job(Side::Source, status_url).await? {
            JobPoll::InProgress {
                progress,
                retry_after,
            } => Ok(EffectResult::ExportInProgress {
                progress,
                retry_after,
            }),
            JobPoll::Completed { body, .. } => {
                // A paged manifest is read to its end now: its `next` links may not outlive
                // the export, and the machine needs every file to plan the run.
                let undecodable = |e: pathling_import_core::bulk::ManifestError| {
                    Failure::new(FailureKind::Undecodable, e.to_string())
                };
                let mut pages = ManifestPages::new(&self.source_base);
                let mut next = pages.add(&body).map_err(undecodable)?;
                while let Some(url) = next {
                    let page = self.manifest_page(&url, pages.pages() + 1).await?;
                    next = pages.add(&page).map_err(undecodable)?;
                }
                let manifest = pages.finish().map_err(undecodable)?;
                let digest = self.store_manifest(manifest_key, manifest).await?;
                Ok(EffectResult::ExportCompleted { digest })
            }
        }
    }

    /// Page `page` of a paged manifest, at its `next` link: read like the first page (the
    /// token only to the source's origin, capped by `MANIFEST_MAX_SIZE`).
    async fn manifest_page(&self, url: &str, page: u32) -> Result<Bytes, Failure> {
        let ctx = format!("export manifest page {page}");
        self.allowed(&ctx, url)?;
        let authenticate = same_origin(url, &self.source_base);
        let resp = self
            .send(Side::Source, authenticate, &ctx, || {
                self.http(Side::Source)
                    .get(url)
                    .header("accept", "application/json")
            })
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(status_failure(&ctx, resp).await);
        }
        read_capped(resp, self.manifest_max_bytes, &ctx, "MANIFEST_MAX_SIZE").await
    }

    /// One poll of an asynchronous job (the export's status URL on the source, or a Pathling
    /// import job on the target): `202` is in progress, `200` completed with its body, anything
    /// else a failure. The bearer token goes along only to the side's own origin.
    pub async fn poll_job(&self, side: Side, status_url: &str) -> Result<JobPoll, Failure> {
        let (ctx, base, accept) = match side {
            Side::Source => ("export status", &self.source_base, "application/json"),
            Side::Target => ("Pathling import status", &self.target_base, FHIR_JSON),
        };
        self.allowed(ctx, status_url)?;
        let authenticate = same_origin(status_url, base);
        let resp = self
            .send(side, authenticate, ctx, || {
                self.http(side).get(status_url).header("accept", accept)
            })
            .await?;
        match resp.status() {
            StatusCode::ACCEPTED => Ok(JobPoll::InProgress {
                progress: header(resp.headers(), "x-progress"),
                retry_after: header(resp.headers(), "retry-after"),
            }),
            StatusCode::OK => {
                let origin = pathling_import_core::bulk::origin_of;
                let redirected_to = origin(resp.url().as_str())
                    .filter(|final_origin| origin(status_url).as_ref() != Some(final_origin));
                let body = match side {
                    Side::Source => {
                        read_capped(resp, self.manifest_max_bytes, ctx, "MANIFEST_MAX_SIZE").await?
                    }
                    // A 9.2+ import result lists every input (1.5 MB at 10,000 files): it is
                    // bounded like a manifest.
                    Side::Target => {
                        let limit = self.manifest_max_bytes.max(MAX_JSON_ANSWER);
                        read_capped(resp, limit, ctx, "MANIFEST_MAX_SIZE").await?
                    }
                };
                Ok(JobPoll::Completed {
                    body,
                    redirected_to,
                })
            }
            _ => Err(status_failure(ctx, resp).await),
        }
    }

    /// Stores a decoded manifest at `key` in the staging store (where [`Effect::StageFile`]
    /// reads it) and caches it; returns its digest.
    pub async fn store_manifest(
        &self,
        key: &StagingKey,
        manifest: Manifest,
    ) -> Result<ManifestDigest, Failure> {
        let stored = serde_json::to_vec(&manifest)
            .map_err(|e| Failure::new(FailureKind::Local, format!("encoding the manifest: {e}")))?;
        // What is stored must read back (a new process, another invocation): the read is
        // capped at twice MANIFEST_MAX_SIZE, which a paged manifest may outgrow.
        let cap = self.manifest_max_bytes.saturating_mul(2);
        if stored.len() as u64 > cap {
            return Err(Failure::new(
                FailureKind::Local,
                format!(
                    "the export's manifest ({} files over its pages) is {} MiB decoded, more than \
                     twice MANIFEST_MAX_SIZE ({} MiB) allows to read back; raise \
                     MANIFEST_MAX_SIZE or narrow the export",
                    manifest.files.len(),
                    stored.len().div_ceil(1024 * 1024),
                    self.manifest_max_bytes / (1024 * 1024)
                ),
            ));
        }
        self.staging
            .put_bytes(key.as_str(), Bytes::from(stored))
            .await
            .map_err(|e| staging_failure("storing the manifest", &e))?;
        let digest = manifest.digest();
        self.manifests
            .lock()
            .await
            .insert(key.clone(), Arc::new(manifest));
        Ok(digest)
    }

    /// A file's URL for the event log, when its manifest is at hand (it is, once the file's
    /// staging has started); never waits for the cache.
    pub fn cached_file_url(&self, key: &StagingKey, index: u32) -> Option<String> {
        let cache = self.manifests.try_lock().ok()?;
        let url = &cache.get(key)?.files.get(index as usize)?.url;
        Some(pathling_import_core::events::loggable_url(url))
    }

    async fn manifest(&self, key: &StagingKey) -> Result<Arc<Manifest>, Failure> {
        let mut cache = self.manifests.lock().await;
        if let Some(m) = cache.get(key) {
            return Ok(m.clone());
        }
        let bytes = self
            .staging
            .get_bytes(key.as_str(), self.manifest_max_bytes.saturating_mul(2))
            .await
            .map_err(|e| staging_failure("reading the stored manifest", &e))?
            .ok_or_else(|| {
                Failure::new(
                    FailureKind::Local,
                    format!("the stored manifest {key} is missing from the staging store"),
                )
            })?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            Failure::new(
                FailureKind::Local,
                format!("the stored manifest {key} is unreadable: {e}"),
            )
        })?;
        let manifest = Arc::new(manifest);
        cache.insert(key.clone(), manifest.clone());
        Ok(manifest)
    }

    /// The manifest's file `index`: its URL, whether the source's token goes with it, and the
    /// context its failures name.
    async fn file_of(
        &self,
        manifest_key: &StagingKey,
        index: u32,
        kind: FileKind,
        type_name: &str,
    ) -> Result<(String, bool, String), Failure> {
        let manifest = self.manifest(manifest_key).await?;
        let file = manifest
            .files
            .get(index as usize)
            .filter(|f| f.kind == kind && f.type_name == type_name)
            .ok_or_else(|| {
                Failure::new(
                    FailureKind::Local,
                    format!(
                        "the stored manifest has no {} file #{index} of type {type_name}",
                        kind.as_str()
                    ),
                )
            })?;
        let ctx = format!("download of {} file #{index} ({type_name})", kind.as_str());
        self.allowed(&ctx, &file.url)?;
        // Decided here, at the moment of the request, from the URL itself: the stored
        // manifest may have been rewritten by whoever can write the staging prefix.
        let send_token =
            manifest.requires_access_token && same_origin(&file.url, &self.source_base);
        Ok((file.url.clone(), send_token, ctx))
    }

    async fn stage_file(
        &self,
        manifest_key: &StagingKey,
        index: u32,
        kind: FileKind,
        type_name: &str,
        key: &StagingKey,
        validate: Validation,
    ) -> Result<EffectResult, Failure> {
        let (url, send_token, ctx) = self.file_of(manifest_key, index, kind, type_name).await?;
        // An error[] file's lines are folded as they pass, which a continued transfer could
        // not redo: it always moves whole (such files are small).
        if kind == FileKind::Error {
            return self
                .stage_whole(&ctx, &url, send_token, type_name, key, validate)
                .await;
        }
        let identity = url_identity(&url);
        let staging_ctx = format!("staging {key}");
        let mut from = match self.may_resume(key).await {
            Ok(false) => Ok(None),
            Ok(true) => self.staging.resume_point(key.as_str(), identity).await,
            Err(e) => Err(e),
        }
        .map_err(|e| staging_failure(&staging_ctx, &e))?;
        let progress = Arc::new(AtomicU64::new(0));
        let started_with = from.as_ref().map_or(0, |f| f.stored());
        self.progress_of()
            .insert(key.as_str().to_owned(), (started_with, progress.clone()));
        let resp = self
            .send(Side::Source, send_token, &ctx, || {
                let req = self.source_http.get(&url).header("accept", NDJSON);
                match &from {
                    Some(f) => {
                        // Offsets count decoded bytes: ask for them unencoded.
                        let req = req
                            .header(reqwest::header::ACCEPT_ENCODING, "identity")
                            .header(reqwest::header::RANGE, format!("bytes={}-", f.offset()));
                        match f.facts().if_range() {
                            Some(v) => req.header(reqwest::header::IF_RANGE, v),
                            None => req,
                        }
                    }
                    None => req,
                }
            })
            .await?;
        let mut facts = SourceFacts {
            identity,
            etag: header(resp.headers(), "etag").filter(|e| !e.starts_with("W/")),
            last_modified: header(resp.headers(), "last-modified"),
            length: None,
        };
        let skip = match (resp.status(), &from) {
            (StatusCode::PARTIAL_CONTENT, Some(f)) => {
                let range =
                    header(resp.headers(), "content-range").and_then(|r| parse_content_range(&r));
                match range {
                    Some((start, total)) if start == f.offset() => {
                        facts.length = total;
                    }
                    _ => {
                        return Err(self
                            .restart(
                                &ctx,
                                key,
                                "the source answered the range request with another range",
                            )
                            .await)
                    }
                }
                if !f.facts().agrees_with(&facts) {
                    return Err(self.restart(&ctx, key, "the source's file changed").await);
                }
                0
            }
            (StatusCode::OK, _) => {
                facts.length = resp.content_length();
                let split = self.split_ranges.load(Ordering::Relaxed);
                if let (true, None) = (split > 0, &from) {
                    if let Some(paused) = self.split(&ctx, key, &resp, &facts, split).await? {
                        self.progress_of().remove(key.as_str());
                        return Err(paused);
                    }
                }
                match &from {
                    Some(f) if f.facts().agrees_with(&facts) => f.offset(),
                    Some(_) => {
                        // Another file now: the whole body is here, start over with it.
                        self.staging
                            .forget_resume(key.as_str())
                            .await
                            .map_err(|e| staging_failure(&staging_ctx, &e))?;
                        from = None;
                        0
                    }
                    None => 0,
                }
            }
            // The stored bytes reach past the file now (it shrank): start over.
            (StatusCode::RANGE_NOT_SATISFIABLE, Some(_)) => {
                return Err(self
                    .restart(&ctx, key, "the source cannot serve the file's rest")
                    .await)
            }
            _ => return Err(unexpected(&ctx, resp, "200 OK").await),
        };
        if let Some(f) = &from {
            // Kept from the first answer: a continued one says nothing of the file's identity
            // that the checkpoint does not already hold.
            facts = f.facts().clone();
            tracing::info!(
                key = %key,
                stored = f.stored(),
                from = f.offset(),
                ranged = skip == 0,
                "{key} continues after the {} bytes an interrupted attempt stored",
                f.stored()
            );
        }
        let counters = self.counters.clone();
        let body = resp.bytes_stream().inspect_ok(move |chunk| {
            counters
                .bytes_downloaded
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        });
        let body = skip_bytes(body, skip);
        let check = match &from {
            Some(f) => NdjsonCheck::resume_at(type_name, validate, f.newlines(), f.lines()),
            None => NdjsonCheck::new(type_name, validate),
        };
        let body = CheckedBody::new(body, check, None);
        let staged = self
            .staging
            .put_resumable(
                key.as_str(),
                Box::pin(body),
                facts,
                from,
                progress.clone(),
                self.winding_down.clone(),
            )
            .await;
        self.progress_of().remove(key.as_str());
        if staged.is_ok() {
            self.continued_of().remove(key.as_str());
        } else if progress.load(Ordering::Relaxed) > 0 {
            self.continued_of().insert(key.as_str().to_owned());
        }
        let report = match staged {
            Ok(report) => report,
            Err(e) => {
                // Only a pause that stored more is progress (a checkpoint that could not be
                // written leaves nothing to continue from): otherwise it is an attempt the
                // invocation's end left unfinished.
                if e.is_paused() {
                    let kind = if progress.load(Ordering::Relaxed) > started_with {
                        FailureKind::Paused
                    } else {
                        FailureKind::Unfinished
                    };
                    return Err(Failure::new(
                        kind,
                        format!("{ctx}: {e} (the invocation is about to end)"),
                    ));
                }
                // Bytes that fail the check will fail it again: nothing to continue.
                if e.body_error().is_some_and(|b| {
                    b.downcast_ref::<BodyFailure>()
                        .is_some_and(|f| matches!(f, BodyFailure::Content(_)))
                }) {
                    let _ = self.staging.forget_resume(key.as_str()).await;
                }
                return Err(match e.side() {
                    FailureSide::Body => body_failure(&ctx, &e),
                    // The source served other bytes, or the upload to continue vanished: the
                    // next attempt starts over; nothing is wrong with the store.
                    FailureSide::Store
                        if matches!(e.code(), Some("ResumeMismatch" | "NoSuchUpload")) =>
                    {
                        Failure::new(FailureKind::Network, format!("{staging_ctx}: {e}"))
                    }
                    FailureSide::Store => staging_failure(&staging_ctx, &e),
                });
            }
        };
        if report.resumed_at > 0 {
            self.counters.files_resumed.fetch_add(1, Ordering::Relaxed);
        }
        self.staged(kind, report, None)
    }

    /// Stages a file from its first byte, with no checkpoint.
    async fn stage_whole(
        &self,
        ctx: &str,
        url: &str,
        send_token: bool,
        type_name: &str,
        key: &StagingKey,
        validate: Validation,
    ) -> Result<EffectResult, Failure> {
        let resp = self
            .send(Side::Source, send_token, ctx, || {
                self.source_http.get(url).header("accept", NDJSON)
            })
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(unexpected(ctx, resp, "200 OK").await);
        }
        let counters = self.counters.clone();
        let body = resp.bytes_stream().inspect_ok(move |chunk| {
            counters
                .bytes_downloaded
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        });
        let mut outcomes = Some(OutcomeSummary::default());
        let check = NdjsonCheck::new(type_name, validate);
        let body = CheckedBody::new(body, check, outcomes.as_mut());
        let report = self
            .staging
            .put_stream(key.as_str(), Box::pin(body))
            .await
            .map_err(|e| match e.side() {
                FailureSide::Body => body_failure(ctx, &e),
                FailureSide::Store => staging_failure(&format!("staging {key}"), &e),
            })?;
        self.staged(FileKind::Error, report, outcomes)
    }

    /// Drops the checkpoint of `key` after the source answered otherwise than it promised; the
    /// next attempt starts over.
    async fn restart(&self, ctx: &str, key: &StagingKey, why: &str) -> Failure {
        self.progress_of().remove(key.as_str());
        if let Err(e) = self.staging.forget_resume(key.as_str()).await {
            return staging_failure(&format!("staging {key}"), &e);
        }
        Failure::new(
            FailureKind::Network,
            format!("{ctx}: {why}; the file starts over"),
        )
    }

    fn progress_of(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Arc<AtomicU64>)>> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn continued_of(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.continued.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `key` may have a checkpoint: this process left one, or the folder's listing
    /// (taken at most [`LISTING_TTL`] ago) shows one.
    async fn may_resume(&self, key: &StagingKey) -> Result<bool, StagingError> {
        let key = key.as_str();
        if self.continued_of().contains(key) {
            return Ok(true);
        }
        let (folder, name) = match key.rsplit_once('/') {
            Some((folder, name)) => (format!("{folder}/"), name),
            None => (String::new(), key),
        };
        // Held across the listing, so that concurrent files of a folder list it once.
        let mut listings = self.listings.lock().await;
        if let Some((at, names)) = listings.get(&folder) {
            if at.elapsed() < LISTING_TTL {
                return Ok(names.contains(name));
            }
        }
        let names = Arc::new(self.staging.checkpointed(&folder).await?);
        let found = names.contains(name);
        listings.insert(folder, (std::time::Instant::now(), names));
        Ok(found)
    }

    /// With `Some(bytes)`, a file that starts afresh, at least two ranges of `bytes` long, from
    /// a source that serves ranges, is not moved but split ([`ranges`]): its upload and plan
    /// are started, and the attempt answers `paused`, for a fan-out to hand out its ranges.
    /// Only a runner whose fan-out moves ranges asks for it.
    pub fn split_files(&self, range_bytes: Option<u64>) {
        self.split_ranges
            .store(range_bytes.unwrap_or(0), Ordering::Relaxed);
    }

    /// Whether this process split the file staged to `key`.
    pub fn is_split(&self, key: &str) -> bool {
        self.split_keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key)
    }

    /// See [`crate::driver::Effects::wind_down`].
    pub fn wind_down(&self, on: bool) {
        self.winding_down.store(on, Ordering::Relaxed);
    }

    /// Whether the attempt at staging `request`'s file stored more than it started with (a
    /// checkpoint advanced); forgets the attempt. For attempts cut short.
    pub fn progressed(&self, request: &Request) -> bool {
        let Effect::StageFile { key, .. } = &request.effect else {
            return false;
        };
        let progressed = self
            .progress_of()
            .remove(key.as_str())
            .is_some_and(|(start, now)| now.load(Ordering::Relaxed) > start);
        if progressed {
            self.continued_of().insert(key.as_str().to_owned());
        }
        progressed
    }

    fn staged(
        &self,
        kind: FileKind,
        report: PutReport,
        outcomes: Option<OutcomeSummary>,
    ) -> Result<EffectResult, Failure> {
        self.counters.files_staged.fetch_add(1, Ordering::Relaxed);
        if kind == FileKind::Output {
            self.counters
                .resources_staged
                .fetch_add(report.lines, Ordering::Relaxed);
        }
        Ok(EffectResult::FileStaged {
            bytes: report.bytes,
            resources: report.lines,
            newline_added: report.newline_added,
            outcomes,
        })
    }

    async fn detect_pathling(&self) -> Result<EffectResult, Failure> {
        let ctx = "Pathling capability statement";
        let url = format!("{}/metadata", self.target_base);
        let resp = self
            .send(Side::Target, true, ctx, || {
                self.target_http.get(&url).header("accept", FHIR_JSON)
            })
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(status_failure(ctx, resp).await);
        }
        let body = read_capped(resp, MAX_JSON_ANSWER, ctx, "a fixed limit").await?;
        let body: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| Failure::new(FailureKind::Undecodable, format!("{ctx}: not JSON: {e}")))?;
        Ok(EffectResult::PathlingDetected {
            api: api_from_capability(&body),
            version: body
                .pointer("/software/version")
                .and_then(|v| v.as_str())
                .map(str::to_string),
        })
    }

    async fn kickoff_import(
        &self,
        api: PathlingApi,
        parameters: &serde_json::Value,
        replaces: Option<&str>,
    ) -> Result<EffectResult, Failure> {
        if let Some(job_url) = replaces {
            self.cancel_import_job(job_url).await?;
        }
        let ctx = match api {
            PathlingApi::V7 => "Pathling $import kick-off (7.x request)",
            PathlingApi::V9 => "Pathling $import kick-off (9.2+ request)",
        };
        let url = format!("{}/$import", self.target_base);
        let body = parameters.to_string();
        let resp = self
            .send(Side::Target, true, ctx, || {
                self.target_http
                    .post(&url)
                    .header("content-type", FHIR_JSON)
                    .header("accept", FHIR_JSON)
                    .header("prefer", "respond-async")
                    .body(body.clone())
            })
            .await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(unexpected(ctx, resp, "202 Accepted").await);
        }
        let location = header(resp.headers(), "content-location").ok_or_else(|| {
            Failure::new(
                FailureKind::Undecodable,
                format!("{ctx}: 202 without a Content-Location header"),
            )
        })?;
        Ok(EffectResult::ImportAccepted { job_url: location })
    }

    /// Cancels a failed import job before it is re-submitted: Pathling 9 would otherwise
    /// answer the identical request with that job. A job already gone is fine.
    async fn cancel_import_job(&self, job_url: &str) -> Result<(), Failure> {
        let ctx = "cancelling the failed Pathling import job";
        self.allowed(ctx, job_url)?;
        let authenticate = same_origin(job_url, &self.target_base);
        let resp = self
            .send(Side::Target, authenticate, ctx, || {
                self.target_http.delete(job_url)
            })
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND | StatusCode::GONE | StatusCode::METHOD_NOT_ALLOWED => Ok(()),
            _ => Err(status_failure(ctx, resp).await),
        }
    }

    async fn poll_import(&self, job_url: &str) -> Result<EffectResult, Failure> {
        Ok(match self.poll_job(Side::Target, job_url).await? {
            JobPoll::InProgress {
                progress,
                retry_after,
            } => EffectResult::ImportInProgress {
                progress,
                retry_after,
            },
            JobPoll::Completed {
                body,
                redirected_to,
            } => EffectResult::ImportCompleted {
                answer: ImportAnswer {
                    redirected_to,
                    ..read_import_answer(&body)
                },
            },
        })
    }

    async fn apply_deletions(&self, key: &StagingKey) -> Result<EffectResult, Failure> {
        let stream = self
            .staging
            .open_read(key.as_str())
            .await
            .map_err(|e| staging_failure(&format!("reading {key}"), &e))?;
        let mut lines = LineSplitter::default();
        let mut pending: Vec<ResourceRef> = Vec::new();
        let (mut deleted, mut absent) = (0u64, 0u64);
        let mut stream = std::pin::pin!(stream);
        loop {
            let chunk = stream
                .next()
                .await
                .transpose()
                .map_err(|e| staging_failure(&format!("reading {key}"), &e))?;
            let done = chunk.is_none();
            let mut bad: Option<String> = None;
            let mut on_line = |n: u64, line: &[u8]| match deleted_refs(line) {
                Ok(refs) => pending.extend(refs),
                Err(e) => {
                    bad.get_or_insert(format!("{key} line {n}: {e}"));
                }
            };
            match chunk {
                Some(c) => lines.push(&c, &mut on_line),
                None => lines.finish(&mut on_line),
            }
            if let Some(e) = bad {
                return Err(Failure::new(
                    FailureKind::Undecodable,
                    format!("deleted[] file {e}"),
                ));
            }
            while pending.len() >= DELETE_BATCH || (done && !pending.is_empty()) {
                let batch: Vec<ResourceRef> =
                    pending.drain(..pending.len().min(DELETE_BATCH)).collect();
                let (d, a) = self.delete_batch(&batch).await?;
                deleted += d;
                absent += a;
            }
            if done {
                return Ok(EffectResult::DeletionsApplied { deleted, absent });
            }
        }
    }

    /// One `batch` Bundle; per entry 2xx is deleted, 404/410 already absent, anything else
    /// fails the file (it is retried as a whole: deleting twice is harmless).
    async fn delete_batch(&self, refs: &[ResourceRef]) -> Result<(u64, u64), Failure> {
        let ctx = "Pathling delete batch";
        let bundle = delete_batch_bundle(refs).to_string();
        let resp = self
            .send(Side::Target, true, ctx, || {
                self.target_http
                    .request(Method::POST, &self.target_base)
                    .header("content-type", FHIR_JSON)
                    .header("accept", FHIR_JSON)
                    .body(bundle.clone())
            })
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(status_failure(ctx, resp).await);
        }
        let body = read_capped(resp, MAX_JSON_ANSWER, ctx, "a fixed limit").await?;
        let body: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| Failure::new(FailureKind::Undecodable, format!("{ctx}: not JSON: {e}")))?;
        let entries = body
            .get("entry")
            .and_then(|e| e.as_array())
            .cloned()
            .unwrap_or_default();
        if entries.len() != refs.len() {
            return Err(Failure::new(
                FailureKind::Undecodable,
                format!(
                    "{ctx}: {} entries answered for {} requests",
                    entries.len(),
                    refs.len()
                ),
            ));
        }
        let (mut deleted, mut absent) = (0, 0);
        for (entry, r) in entries.iter().zip(refs) {
            let status = entry.pointer("/response/status").and_then(|s| s.as_str());
            match judge_delete_entry(status, &format!("{ctx}: deleting {}/{}", r.type_name, r.id))?
            {
                DeleteEntry::Deleted => deleted += 1,
                DeleteEntry::AlreadyAbsent => absent += 1,
            }
        }
        Ok((deleted, absent))
    }

    async fn delete_export_job(&self, status_url: &str) -> Result<EffectResult, Failure> {
        let ctx = "export job clean-up";
        self.allowed(ctx, status_url)?;
        let authenticate = same_origin(status_url, &self.source_base);
        let resp = self
            .send(Side::Source, authenticate, ctx, || {
                self.source_http.delete(status_url)
            })
            .await?;
        // Any answer ends the (best-effort) clean-up; the core decides, a 404 included.
        if resp.status().is_success() {
            Ok(EffectResult::ExportJobDeleted)
        } else {
            Err(status_failure(ctx, resp).await)
        }
    }
}

fn redacted(f: Failure) -> Failure {
    Failure {
        message: redact::scrub(&f.message),
        ..f
    }
}

/// Opens the store a staging location names, with the transfer settings' part size and memory
/// budget (one budget for every transfer of this store).
pub async fn open_staging(
    location: &StagingLocation,
    transfer: &TransferSpec,
) -> Result<StagingStore, StagingError> {
    let bytes = |n: u64| {
        usize::try_from(n)
            .map_err(|_| StagingError::Config(format!("{n} bytes do not fit this machine")))
    };
    let memory = bytes(transfer.memory_budget())?;
    Ok(match location {
        StagingLocation::S3 { bucket, .. } => StagingStore::S3(
            S3Store::from_env(
                bucket.clone(),
                S3Options {
                    part_size: bytes(transfer.part_size)?,
                    memory,
                    ..S3Options::default()
                },
            )
            .await?,
        ),
        StagingLocation::Directory { root } => StagingStore::Dir(
            crate::staging::DirStore::from_file_url(&format!("file://{root}"))
                .await?
                .with_memory(memory)?
                .with_checkpoint_every(transfer.part_size),
        ),
    })
}

fn same_origin(url: &str, base: &str) -> bool {
    let origin = pathling_import_core::bulk::origin_of;
    matches!((origin(url), origin(base)), (Some(a), Some(b)) if a == b)
}

/// A 2xx other than the expected one is "undecodable" (the protocol was not followed); an
/// error status is reported as such.
/// Another status than the protocol's: reported as the status it is (the core judges a 2xx
/// that is not the expected one as permanent: the server does not follow the protocol).
async fn unexpected(ctx: &str, resp: Response, expected: &str) -> Failure {
    let status = resp.status();
    if status.is_success() {
        Failure::http(
            status.as_u16(),
            format!("{ctx}: expected {expected}, got {}", status.as_u16()),
        )
    } else {
        status_failure(ctx, resp).await
    }
}

fn staging_failure(ctx: &str, e: &StagingError) -> Failure {
    Failure::new(
        FailureKind::Storage {
            transient: e.is_transient(),
        },
        format!("{ctx}: {e}"),
    )
}

/// A download that ended mid-body: its content failed the NDJSON check (permanent: the
/// same URL serves the same bytes), or the transfer broke (the reqwest error says whether it
/// timed out).
fn body_failure(ctx: &str, e: &StagingError) -> Failure {
    let transfer = match e.body_error().and_then(|b| b.downcast_ref::<BodyFailure>()) {
        Some(BodyFailure::Content(c)) => {
            return Failure::new(FailureKind::Undecodable, format!("{ctx}: {c}"))
        }
        Some(BodyFailure::Transfer(t)) => Some(t.as_ref()),
        None => e.body_error(),
    };
    let timeout = transfer
        .and_then(|b| b.downcast_ref::<reqwest::Error>())
        .is_some_and(|r| r.is_timeout());
    let detail = transfer
        .map(|b| crate::error_chain(b))
        .unwrap_or_else(|| e.to_string());
    Failure::new(
        if timeout {
            FailureKind::Timeout
        } else {
            FailureKind::Network
        },
        format!("{ctx}: {e}: {detail}"),
    )
}

/// A download whose body broke (read on its own, not through a store).
fn body_failure_of(ctx: &str, e: &reqwest::Error) -> Failure {
    Failure::new(
        if e.is_timeout() {
            FailureKind::Timeout
        } else {
            FailureKind::Network
        },
        format!("{ctx}: the download broke: {}", crate::error_chain(e)),
    )
}

/// A hash of a file URL up to its query: a re-signed pre-signed URL names the same file.
fn url_identity(url: &str) -> u64 {
    let path = url.split(['?', '#']).next().unwrap_or("");
    pathling_import_core::retry::stable_hash(&[path.as_bytes()])
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`): the start, and the total when given. A range
/// that stops short of a known total is refused: the rest of the file would be missing.
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let spec = value.trim().strip_prefix("bytes ")?;
    let (range, total) = spec.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    if total.is_some_and(|t| end.checked_add(1) != Some(t)) {
        return None;
    }
    Some((start, total))
}

/// The stream without its first `skip` bytes (a source that ignored a `Range` request sends
/// the file from its start).
fn skip_bytes<S, E>(body: S, skip: u64) -> impl Stream<Item = Result<Bytes, E>> + Send + Unpin
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: Send,
{
    let mut left = skip;
    body.filter_map(move |item| {
        let out = match item {
            Ok(mut chunk) if left > 0 => {
                let cut = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
                left -= cut as u64;
                let rest = chunk.split_off(cut);
                (!rest.is_empty()).then_some(Ok(rest))
            }
            other => Some(other),
        };
        std::future::ready(out)
    })
}

/// Splits a byte stream into lines without holding more than one partial line.
#[derive(Default)]
struct LineSplitter {
    partial: Vec<u8>,
    line_no: u64,
}

/// Longer lines are not OperationOutcomes or delete Bundles worth reading in full.
const MAX_LINE: usize = 16 * 1024 * 1024;

impl LineSplitter {
    fn push(&mut self, chunk: &[u8], on_line: &mut impl FnMut(u64, &[u8])) {
        let mut rest = chunk;
        while let Some(pos) = memchr::memchr(b'\n', rest) {
            self.line_no += 1;
            if self.partial.is_empty() {
                on_line(self.line_no, &rest[..pos]);
            } else {
                self.partial.extend_from_slice(&rest[..pos]);
                on_line(self.line_no, &self.partial);
                self.partial.clear();
            }
            rest = &rest[pos + 1..];
        }
        if self.partial.len() + rest.len() <= MAX_LINE {
            self.partial.extend_from_slice(rest);
        }
    }
    fn finish(&mut self, on_line: &mut impl FnMut(u64, &[u8])) {
        if !self.partial.is_empty() {
            self.line_no += 1;
            on_line(self.line_no, &self.partial);
            self.partial.clear();
        }
    }
}

/// Why a download's body stream ended early; what [`StagingError::body_error`] holds after
/// [`CheckedBody`] fed `put_stream`.
#[derive(Debug)]
enum BodyFailure {
    /// The transfer broke (the download's own error).
    Transfer(Box<dyn std::error::Error + Send + Sync + 'static>),
    /// The bytes are not NDJSON of the manifest's type.
    Content(ContentError),
}

impl std::fmt::Display for BodyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyFailure::Transfer(e) => e.fmt(f),
            BodyFailure::Content(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for BodyFailure {
    /// Transparent: the wrapped error's own causes.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BodyFailure::Transfer(e) => e.source(),
            BodyFailure::Content(_) => None,
        }
    }
}

/// Passes a download through to the staging store while checking it as NDJSON of the
/// manifest's type ([`NdjsonCheck`]) and, for `error[]` files, folding its lines into an
/// [`OutcomeSummary`]. A chunk that fails the check is not passed on: the stream yields
/// [`BodyFailure::Content`] instead and ends, so the store aborts the upload and nothing is
/// staged under the key.
struct CheckedBody<'a, S> {
    inner: S,
    check: NdjsonCheck,
    fold: Option<(LineSplitter, &'a mut OutcomeSummary)>,
    ended: bool,
}

impl<'a, S> CheckedBody<'a, S> {
    fn new(inner: S, check: NdjsonCheck, summary: Option<&'a mut OutcomeSummary>) -> Self {
        CheckedBody {
            inner,
            check,
            fold: summary.map(|s| (LineSplitter::default(), s)),
            ended: false,
        }
    }
}

impl<S, E> Stream for CheckedBody<'_, S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    type Item = Result<Bytes, BodyFailure>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        let item = match std::task::ready!(this.inner.poll_next_unpin(cx)) {
            Some(Ok(chunk)) => match this.check.push(&chunk) {
                Ok(()) => {
                    if let Some((lines, summary)) = &mut this.fold {
                        lines.push(&chunk, &mut |_, line| summary.add_line(line));
                    }
                    Some(Ok(chunk))
                }
                Err(e) => Some(Err(BodyFailure::Content(e))),
            },
            Some(Err(e)) => Some(Err(BodyFailure::Transfer(Box::new(e)))),
            None => match this.check.finish() {
                Ok(()) => {
                    if let Some((lines, summary)) = &mut this.fold {
                        lines.finish(&mut |_, line| summary.add_line(line));
                    }
                    None
                }
                Err(e) => Some(Err(BodyFailure::Content(e))),
            },
        };
        this.ended = !matches!(item, Some(Ok(_)));
        Poll::Ready(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(
        parts: &[&'static [u8]],
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    const CTX: &str = "download of output file #3 (Patient)";

    /// Streams `parts` through a [`CheckedBody`] into a directory store, as `stage_file` does.
    async fn stage(
        parts: &[&'static [u8]],
        type_name: &str,
        mode: Validation,
        summary: Option<&mut OutcomeSummary>,
    ) -> (
        tempfile::TempDir,
        Result<crate::staging::PutReport, Failure>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::staging::DirStore::new(dir.path())
            .await
            .expect("store");
        let body = CheckedBody::new(chunks(parts), NdjsonCheck::new(type_name, mode), summary);
        let result = store
            .put_stream("run/output/000003-Patient.ndjson", body)
            .await
            .map_err(|e| match e.side() {
                FailureSide::Body => body_failure(CTX, &e),
                FailureSide::Store => staging_failure("staging", &e),
            });
        (dir, result)
    }

    fn files_under(dir: &std::path::Path) -> Vec<String> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                out.extend(files_under(&entry.path()));
            } else {
                out.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        out
    }

    #[tokio::test]
    async fn an_html_body_is_refused_as_undecodable_and_nothing_is_staged() {
        let parts: &[&'static [u8]] = &[
            br#"{"resourceType":"Patient","id":"1"}"#,
            b"\n<!DOCTYPE html><html><head><title>Sign in</title>",
            b"</head></html>\n",
        ];
        let (dir, result) = stage(parts, "Patient", Validation::Sample, None).await;
        let failure = result.expect_err("the HTML line must fail the file");
        assert_eq!(failure.kind, FailureKind::Undecodable);
        assert_eq!(
            failure.message,
            "download of output file #3 (Patient): line 2 is not a JSON object: \
             \"<!DOCTYPE html><html><head><title>Sign in</title></head></html>\""
        );
        assert!(
            files_under(dir.path()).is_empty(),
            "{:?}",
            files_under(dir.path())
        );
    }

    #[tokio::test]
    async fn a_file_of_another_type_is_refused() {
        let parts: &[&'static [u8]] = &[br#"{"resourceType":"Observation","id":"1"}"#, b"\n"];
        let (_dir, result) = stage(parts, "Patient", Validation::Sample, None).await;
        let failure = result.expect_err("wrong type");
        assert_eq!(failure.kind, FailureKind::Undecodable);
        assert!(
            failure.message.ends_with(
                r#"line 1 has resourceType "Observation", but the manifest lists this file as Patient"#
            ),
            "{}",
            failure.message
        );
    }

    #[tokio::test]
    async fn valid_files_stage_and_error_files_are_still_folded() {
        let parts: &[&'static [u8]] = &[
            br#"{"resourceType":"OperationOutcome","issue":[{"severity":"warning","#,
            br#""code":"x","diagnostics":"careful"}]}"#,
        ];
        let mut summary = OutcomeSummary::default();
        let (_dir, result) = stage(
            parts,
            "OperationOutcome",
            Validation::Full,
            Some(&mut summary),
        )
        .await;
        let report = result.expect("a valid error[] file stages");
        assert_eq!((report.lines, report.newline_added), (1, true));
        assert_eq!((summary.warning, summary.unreadable), (1, 0));
        assert_eq!(summary.samples, ["warning: careful"]);
    }

    #[tokio::test]
    async fn validation_off_stages_anything() {
        let (dir, result) = stage(&[b"<html>\n"], "Patient", Validation::Off, None).await;
        assert_eq!(result.expect("off checks nothing").bytes, 7);
        assert_eq!(files_under(dir.path()), ["000003-Patient.ndjson"]);
    }

    #[tokio::test]
    async fn a_broken_transfer_is_still_a_network_failure() {
        let body = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"{\"resourceType\":\"Patient\"")),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "reset by peer",
            )),
        ]);
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::staging::DirStore::new(dir.path())
            .await
            .expect("store");
        let check = NdjsonCheck::new("Patient", Validation::Sample);
        let err = store
            .put_stream("k.ndjson", CheckedBody::new(body, check, None))
            .await
            .expect_err("the transfer broke");
        let failure = body_failure(CTX, &err);
        assert_eq!(failure.kind, FailureKind::Network);
        assert!(
            failure.message.contains("reset by peer"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn line_splitter_handles_chunk_boundaries_and_missing_final_newline() {
        let mut s = LineSplitter::default();
        let mut got: Vec<(u64, String)> = Vec::new();
        let mut f = |n: u64, l: &[u8]| got.push((n, String::from_utf8_lossy(l).into_owned()));
        s.push(b"ab", &mut f);
        s.push(b"c\nde", &mut f);
        s.push(b"f\n\ngh", &mut f);
        s.finish(&mut f);
        assert_eq!(
            got,
            [
                (1, "abc".into()),
                (2, "def".into()),
                (3, "".into()),
                (4, "gh".into())
            ]
        );
    }
}
