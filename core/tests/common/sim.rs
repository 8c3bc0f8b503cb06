//! A deterministic simulation of the world a run talks to.
//!
//! [`World`] answers every [`Request`] according to a [`Plan`] (what goes wrong where, and how
//! often) the way the real servers do — it builds a real manifest and decodes it with
//! [`bulk::parse_manifest`], folds real OperationOutcome lines, reads the generation from a
//! CapabilityStatement and judges an `$import` body by its shape. [`drive`] is the runners'
//! driver loop over a virtual clock that advances by a seeded latency per effect and jumps to
//! each `SleepUntil`; a step bound turns non-termination into a test failure.

use super::{SplitMix64, RUN_ID, SOURCE, STATUS_URL, T0, TARGET};
use pathling_import_core::bulk::{self, FileKind, Manifest, OutcomeSummary};
use pathling_import_core::effect::{Effect, EffectId, EffectResult, Input, Next, Request};
use pathling_import_core::pathling;
use pathling_import_core::persist;
use pathling_import_core::retry::{patience_ms, Failure, FailureKind};
use pathling_import_core::spec::{PathlingApi, PathlingApiChoice, PhasePolicy, RunSpec};
use pathling_import_core::state::Terminal;
use pathling_import_core::{SyncRun, Timestamp};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// A server's `Retry-After`, as seconds from the moment it answers, in one of the three forms
/// servers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hint {
    None,
    /// `Retry-After: 120`
    Delta(u64),
    /// `Retry-After: Fri, 15 Jan 2027 08:02:00 GMT`
    HttpDate(u64),
    /// `Retry-After: 1800000120` (the SMART reference server's absolute epoch seconds).
    Epoch(u64),
}

impl Hint {
    pub fn header(self, now: Timestamp) -> Option<String> {
        match self {
            Hint::None => None,
            Hint::Delta(s) => Some(s.to_string()),
            // Rounded up to a whole second, as an HTTP-date cannot say less.
            Hint::HttpDate(s) => Some(super::http_date(Timestamp::from_secs(
                now.0.div_ceil(1000) + s,
            ))),
            Hint::Epoch(s) => Some((now.0.div_ceil(1000) + s).to_string()),
        }
    }
}

/// One answer to an export status poll before the export completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hiccup {
    /// 202 with `X-Progress` and maybe `Retry-After`.
    InProgress(Hint),
    /// 429 Too Many Requests with `Retry-After`.
    TooMany(Hint),
    /// 503 with an OperationOutcome of code `transient`.
    Transient5xx,
    /// Connection reset.
    Network,
}

/// How an operation misbehaves: not at all, `k` transient failures before it works, or a
/// permanent failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    Transient(u32),
    Permanent,
}

impl Fault {
    /// What attempt `n` (1-based) gets: `Some(true)` transient, `Some(false)` permanent,
    /// `None` success.
    fn fails(self, n: u32) -> Option<bool> {
        match self {
            Fault::None => None,
            Fault::Transient(k) => (n <= k).then_some(true),
            Fault::Permanent => Some(false),
        }
    }
    pub fn transient_count(self) -> u32 {
        match self {
            Fault::Transient(k) => k,
            _ => 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PlanFile {
    pub kind: FileKind,
    pub type_name: String,
    /// Downloading and staging it.
    pub stage: Fault,
    /// Applying its deletions (`deleted[]` files).
    pub delete: Fault,
    /// An `error[]` file whose OperationOutcomes include a `fatal` issue.
    pub fatal: bool,
    /// The file does not end with a newline.
    pub no_final_newline: bool,
}

impl PlanFile {
    pub fn ok(kind: FileKind, type_name: &str) -> Self {
        PlanFile {
            kind,
            type_name: type_name.to_string(),
            stage: Fault::None,
            delete: Fault::None,
            fatal: false,
            no_final_newline: false,
        }
    }
}

/// Everything the world does, decided up front.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The kick-off (429 with an epoch `Retry-After`, a transient 503, resets, in turn).
    pub kickoff: Fault,
    /// Status poll answers before the export completes.
    pub hiccups: Vec<Hiccup>,
    /// After the hiccups the status URL answers 404 instead of the manifest.
    pub export_gone: bool,
    /// The manifest, in index order (`output[]`, then `deleted[]`, then `error[]`).
    pub files: Vec<PlanFile>,
    /// The Pathling generation of the target.
    pub generation: PathlingApi,
    /// `GET /metadata` reports the version (else `UNKNOWN`).
    pub reports_version: bool,
    pub detect: Fault,
    /// Kick-offs answered 503 "Another import operation is currently in progress" first.
    pub busy: u32,
    /// Import status answers "in progress" before the end.
    pub import_polls: Vec<Hint>,
    /// The import job ends in failure.
    pub import_fails: bool,
    /// `DELETE {status url}` fails (it is best effort).
    pub cleanup_fails: bool,
    /// Each effect takes `0..=max_latency_ms` of virtual time.
    pub max_latency_ms: u64,
    pub seed: u64,
}

impl Plan {
    /// Nothing goes wrong.
    pub fn happy(files: Vec<PlanFile>) -> Self {
        Plan {
            kickoff: Fault::None,
            hiccups: Vec::new(),
            export_gone: false,
            files,
            generation: PathlingApi::V9,
            reports_version: true,
            detect: Fault::None,
            busy: 0,
            import_polls: Vec::new(),
            import_fails: false,
            cleanup_fails: false,
            max_latency_ms: 2_000,
            seed: 1,
        }
    }

    /// `n` output files over a few types, in manifest order.
    pub fn outputs(n: usize) -> Vec<PlanFile> {
        const TYPES: [&str; 5] = [
            "Patient",
            "Observation",
            "Encounter",
            "Condition",
            "MedicationRequest",
        ];
        (0..n)
            .map(|i| PlanFile::ok(FileKind::Output, TYPES[i % TYPES.len()]))
            .collect()
    }

    /// A random plan: every kind of fault the world knows, with small counts.
    pub fn random(seed: u64, max_files: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let fault = |rng: &mut SplitMix64, p_transient: u64, p_permanent: u64| {
            let roll = rng.below(100);
            if roll < p_permanent {
                Fault::Permanent
            } else if roll < p_permanent + p_transient {
                Fault::Transient(1 + rng.below(3) as u32)
            } else {
                Fault::None
            }
        };
        let hint = |rng: &mut SplitMix64| match rng.below(4) {
            0 => Hint::None,
            1 => Hint::Delta(1 + rng.below(120)),
            2 => Hint::HttpDate(1 + rng.below(120)),
            _ => Hint::Epoch(1 + rng.below(120)),
        };
        let hiccups = (0..rng.below(6))
            .map(|_| match rng.below(6) {
                0 => Hiccup::TooMany(hint(&mut rng)),
                1 => Hiccup::Transient5xx,
                2 => Hiccup::Network,
                _ => Hiccup::InProgress(hint(&mut rng)),
            })
            .collect();
        let mut files = Vec::new();
        for (kind, types, n) in [
            (
                FileKind::Output,
                &["Patient", "Observation", "Encounter"][..],
                rng.below(max_files + 1),
            ),
            (FileKind::Deleted, &["Bundle"][..], rng.below(3)),
            (FileKind::Error, &["OperationOutcome"][..], rng.below(2)),
        ] {
            for _ in 0..n {
                let type_name: &str = rng.pick(types);
                let mut f = PlanFile::ok(kind, type_name);
                f.stage = fault(&mut rng, 25, 3);
                f.delete = fault(&mut rng, 25, 3);
                f.fatal = kind == FileKind::Error && rng.chance(20);
                f.no_final_newline = rng.chance(30);
                files.push(f);
            }
        }
        Plan {
            kickoff: fault(&mut rng, 30, 3),
            hiccups,
            export_gone: rng.chance(3),
            files,
            generation: if rng.chance(50) {
                PathlingApi::V9
            } else {
                PathlingApi::V7
            },
            reports_version: rng.chance(70),
            detect: fault(&mut rng, 20, 10),
            busy: rng.below(3) as u32,
            import_polls: (0..rng.below(4)).map(|_| hint(&mut rng)).collect(),
            import_fails: rng.chance(3),
            cleanup_fails: rng.chance(20),
            max_latency_ms: rng.below(3_000),
            seed: rng.next_u64(),
        }
    }

    pub fn count(&self, kind: FileKind) -> usize {
        self.files.iter().filter(|f| f.kind == kind).count()
    }

    /// `output[2] Patient`: how the machine names file `index` in messages.
    pub fn describe(&self, index: usize) -> String {
        let f = &self.files[index];
        let pos = self.files[..index]
            .iter()
            .filter(|g| g.kind == f.kind)
            .count();
        format!("{}[{pos}] {}", f.kind.as_str(), f.type_name)
    }

    /// True when nothing in the plan may fail the run under `spec`: every transient fault
    /// within its retry budget, nothing permanent, a compatible target, and every phase's
    /// patience longer than the longest its waits can add up to (each wait is at most the
    /// policy's schedule, its backoff cap or the `Retry-After` clamp, plus one latency).
    pub fn must_succeed(&self, spec: &RunSpec) -> bool {
        let r = &spec.retry;
        let l = self.max_latency_ms;
        let n = self.files.len() as u64;
        let fail_wait = |p: &PhasePolicy| p.wait_ms.max(r.retry_after_max_ms) + l;
        let poll_wait = |p: &PhasePolicy, i: u32| {
            let scheduled = p.wait_ms as f64 * p.back_off.powi(i as i32);
            (scheduled.min(7.0 * 86_400_000.0) as u64).max(r.retry_after_max_ms) + l
        };
        // Consecutive failed polls (an in-progress answer resets the count).
        let (mut run_of_failures, mut worst_run, mut polls) = (0u32, 0u32, 0u32);
        let mut export_total =
            (u64::from(self.kickoff.transient_count()) + 2) * fail_wait(&r.export);
        for h in &self.hiccups {
            if let Hiccup::InProgress(_) = h {
                run_of_failures = 0;
                export_total += poll_wait(&r.export, polls);
                polls += 1;
            } else {
                run_of_failures += 1;
                worst_run = worst_run.max(run_of_failures);
                export_total += fail_wait(&r.export);
            }
        }
        let mut import_total =
            (u64::from(self.detect.transient_count()) + u64::from(self.busy) + 4)
                * fail_wait(&r.import);
        for i in 0..self.import_polls.len() {
            import_total += poll_wait(&r.import, i as u32);
        }
        let has_deleted = self.count(FileKind::Deleted) > 0;
        let generation_ok = match (spec.target.api, self.generation) {
            (PathlingApiChoice::V7, PathlingApi::V9) | (PathlingApiChoice::V9, PathlingApi::V7) => {
                false
            }
            (_, PathlingApi::V9) => true,
            (_, PathlingApi::V7) => {
                spec.target.import_mode.supported_by_v7()
                    && !(spec.target.apply_deletions && has_deleted)
            }
        };
        let files_ok = self.files.iter().all(|f| {
            let k = f.stage.transient_count();
            let stage_ok = f.stage != Fault::Permanent
                && k <= r.transfer.times
                && (u64::from(k) + 1) * (fail_wait(&r.transfer) + n * l) < patience_ms(&r.transfer);
            let delete_ok = !(spec.target.apply_deletions && f.kind == FileKind::Deleted)
                || (f.delete != Fault::Permanent && f.delete.transient_count() <= r.import.times);
            stage_ok && delete_ok && !f.fatal
        });
        self.kickoff != Fault::Permanent
            && self.kickoff.transient_count() <= r.export.times
            && !self.export_gone
            && worst_run <= r.export.times
            && export_total < patience_ms(&r.export)
            && self.detect.transient_count() <= r.import.times
            && self.busy <= r.import.times
            && import_total < patience_ms(&r.import)
            && !self.import_fails
            && generation_ok
            && files_ok
    }
}

/// The fake source, staging store and Pathling server, answering by the plan.
#[derive(Clone, Debug)]
pub struct World {
    pub spec: RunSpec,
    pub plan: Plan,
    rng: SplitMix64,
    pub kickoffs: u32,
    pub export_polls: u32,
    /// Where the executor stored the manifest (contract: before answering `ExportCompleted`).
    pub stored_manifest: Option<(String, Manifest)>,
    pub stage_attempts: Vec<u32>,
    /// Successful writes per staging key.
    pub staged: BTreeMap<String, u32>,
    pub detects: u32,
    pub import_kickoffs: u32,
    /// The body of the accepted `$import` kick-off and the shape it had.
    pub accepted_import: Option<(PathlingApi, Value)>,
    pub import_polls: u32,
    pub delete_attempts: Vec<u32>,
    /// Successful deletions per file index.
    pub deletions_applied: BTreeMap<u32, u32>,
    pub export_job_deletes: u32,
    /// Effects performed, in order: when, and which.
    pub log: Vec<(Timestamp, &'static str)>,
}

impl World {
    pub fn new(spec: &RunSpec, plan: &Plan) -> Self {
        World {
            spec: spec.clone(),
            plan: plan.clone(),
            rng: SplitMix64::new(plan.seed),
            kickoffs: 0,
            export_polls: 0,
            stored_manifest: None,
            stage_attempts: vec![0; plan.files.len()],
            staged: BTreeMap::new(),
            detects: 0,
            import_kickoffs: 0,
            accepted_import: None,
            import_polls: 0,
            delete_attempts: vec![0; plan.files.len()],
            deletions_applied: BTreeMap::new(),
            export_job_deletes: 0,
            log: Vec::new(),
        }
    }

    /// How long the next effect takes.
    pub fn latency(&mut self) -> u64 {
        self.rng.below(self.plan.max_latency_ms + 1)
    }

    /// The manifest the source hands out once the export is done.
    pub fn manifest_json(&self) -> Value {
        let item = |i: usize, f: &PlanFile| {
            // Half the files on the source's origin, half pre-signed elsewhere.
            let url = if i.is_multiple_of(2) {
                format!("{SOURCE}/files/{i}.ndjson")
            } else {
                format!("https://bucket.s3.example.com/export/{i}.ndjson?X-Amz-Signature=abc")
            };
            json!({"type": f.type_name, "url": url, "count": 10})
        };
        let array = |kind: FileKind| -> Vec<Value> {
            self.plan
                .files
                .iter()
                .enumerate()
                .filter(|(_, f)| f.kind == kind)
                .map(|(i, f)| item(i, f))
                .collect()
        };
        json!({
            "transactionTime": super::TRANSACTION_TIME,
            "request": format!("{SOURCE}/$export"),
            "requiresAccessToken": true,
            "output": array(FileKind::Output),
            "deleted": array(FileKind::Deleted),
            "error": array(FileKind::Error),
        })
    }

    fn transient(&mut self, n: u32, now: Timestamp) -> EffectResult {
        let f = match n % 4 {
            0 => Failure::http(429, "Too Many Requests")
                .with_retry_after(Hint::Epoch(1 + self.rng.below(30)).header(now)),
            1 => Failure::new(
                FailureKind::Http {
                    status: 503,
                    transient_outcome: true,
                    outcome: true,
                },
                "transient: try again later",
            ),
            2 => Failure::new(FailureKind::Network, "connection reset by peer"),
            _ => Failure::new(FailureKind::Timeout, ""),
        };
        EffectResult::Failed(f)
    }

    /// Performs one effect at `now` and reports what happened, as a runner's executor would.
    pub fn answer(&mut self, req: &Request, now: Timestamp) -> EffectResult {
        let name = match &req.effect {
            Effect::KickoffExport(_) => "kickoff_export",
            Effect::PollExport { .. } => "poll_export",
            Effect::StageFile { .. } => "stage_file",
            Effect::DetectPathling => "detect_pathling",
            Effect::KickoffImport { .. } => "kickoff_import",
            Effect::PollImport { .. } => "poll_import",
            Effect::ApplyDeletions { .. } => "apply_deletions",
            Effect::DeleteExportJob { .. } => "delete_export_job",
        };
        self.log.push((now, name));
        match &req.effect {
            Effect::KickoffExport(k) => {
                assert!(k.url.starts_with(SOURCE), "kick-off to {}", k.url);
                self.kickoffs += 1;
                match self.plan.kickoff.fails(self.kickoffs) {
                    Some(true) => self.transient(self.kickoffs, now),
                    Some(false) => EffectResult::Failed(Failure::http(
                        400,
                        "OperationOutcome: unsupported _type parameter",
                    )),
                    None => EffectResult::ExportAccepted {
                        status_url: STATUS_URL.into(),
                    },
                }
            }
            Effect::PollExport {
                status_url,
                manifest_key,
            } => {
                assert_eq!(status_url, STATUS_URL);
                let i = self.export_polls as usize;
                self.export_polls += 1;
                if let Some(h) = self.plan.hiccups.get(i).copied() {
                    return match h {
                        Hiccup::InProgress(hint) => EffectResult::ExportInProgress {
                            progress: Some(format!("{}% complete", 10 * (i + 1))),
                            retry_after: hint.header(now),
                        },
                        Hiccup::TooMany(hint) => EffectResult::Failed(
                            Failure::http(429, "Too Many Requests")
                                .with_retry_after(hint.header(now)),
                        ),
                        Hiccup::Transient5xx => EffectResult::Failed(Failure::new(
                            FailureKind::Http {
                                status: 503,
                                transient_outcome: true,
                                outcome: true,
                            },
                            "transient",
                        )),
                        Hiccup::Network => EffectResult::Failed(Failure::new(
                            FailureKind::Network,
                            "connection reset by peer",
                        )),
                    };
                }
                if self.plan.export_gone {
                    return EffectResult::Failed(Failure::http(404, "export job not found"));
                }
                let body = self.manifest_json().to_string();
                let manifest = match bulk::parse_manifest(body.as_bytes(), SOURCE) {
                    Ok(m) => m,
                    Err(e) => panic!("the world's own manifest does not parse: {e}"),
                };
                let digest = manifest.digest();
                self.stored_manifest = Some((manifest_key.0.clone(), manifest));
                EffectResult::ExportCompleted { digest }
            }
            Effect::StageFile {
                manifest_key,
                index,
                kind,
                type_name,
                key,
                ..
            } => {
                let (stored_at, manifest) = self
                    .stored_manifest
                    .as_ref()
                    .expect("StageFile before the manifest was stored");
                assert_eq!(stored_at, &manifest_key.0, "manifest key");
                let i = *index as usize;
                let m = &manifest.files[i];
                assert_eq!((m.kind, &m.type_name), (*kind, type_name), "file {i}");
                let expected = self.spec.staging.file_key(RUN_ID, *index, *kind, type_name);
                assert_eq!(key, &expected, "staging key of file {i}");
                let file = self.plan.files[i].clone();
                self.stage_attempts[i] += 1;
                match file.stage.fails(self.stage_attempts[i]) {
                    Some(true) => return self.transient(self.stage_attempts[i], now),
                    Some(false) => {
                        return EffectResult::Failed(Failure::http(
                            403,
                            "Forbidden: the signature has expired",
                        ))
                    }
                    None => {}
                }
                *self.staged.entry(key.0.clone()).or_insert(0) += 1;
                let outcomes = (*kind == FileKind::Error).then(|| {
                    let mut s = OutcomeSummary::default();
                    s.add_line(super::WARNING_OUTCOME.as_bytes());
                    if file.fatal {
                        s.add_line(super::FATAL_OUTCOME.as_bytes());
                    }
                    s
                });
                EffectResult::FileStaged {
                    bytes: 10_000 + *index as u64,
                    resources: 10,
                    newline_added: file.no_final_newline,
                    outcomes,
                }
            }
            Effect::DetectPathling => {
                self.detects += 1;
                match self.plan.detect.fails(self.detects) {
                    Some(true) => return self.transient(self.detects, now),
                    Some(false) => return EffectResult::Failed(Failure::http(401, "Unauthorized")),
                    None => {}
                }
                let version = match (self.plan.reports_version, self.plan.generation) {
                    (false, _) => "UNKNOWN",
                    (true, PathlingApi::V7) => "7.2.0+4bd8e1a",
                    (true, PathlingApi::V9) => "9.8.0+0c1d2e3",
                };
                let capability = json!({"resourceType": "CapabilityStatement",
                    "software": {"name": "Pathling", "version": version}});
                EffectResult::PathlingDetected {
                    api: pathling::api_from_capability(&capability),
                    version: Some(version.to_string()),
                }
            }
            Effect::KickoffImport { api, parameters } => {
                self.import_kickoffs += 1;
                let names: Vec<&str> = parameters["parameter"]
                    .as_array()
                    .map(|ps| ps.iter().filter_map(|p| p["name"].as_str()).collect())
                    .unwrap_or_default();
                let shape = if names.contains(&"source") {
                    PathlingApi::V7
                } else {
                    PathlingApi::V9
                };
                assert_eq!(shape, *api, "the body's shape is the one the effect names");
                if shape != self.plan.generation {
                    let message = match self.plan.generation {
                        PathlingApi::V9 => "The input may not be empty.",
                        PathlingApi::V7 => "Missing 'source' parameter.",
                    };
                    return EffectResult::Failed(Failure::http(400, message));
                }
                if shape == PathlingApi::V7 {
                    let modes_ok = parameters["parameter"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|p| p["part"].as_array().into_iter().flatten())
                        .filter(|part| part["name"] == "mode")
                        .all(|part| {
                            part["valueCode"] == "merge" || part["valueCode"] == "overwrite"
                        });
                    if !modes_ok {
                        return EffectResult::Failed(Failure::http(400, "Unsupported import mode"));
                    }
                }
                if self.import_kickoffs <= self.plan.busy {
                    return EffectResult::Failed(
                        Failure::http(503, "Another import operation is currently in progress")
                            .with_retry_after(Hint::Delta(2).header(now)),
                    );
                }
                self.accepted_import = Some((shape, parameters.clone()));
                EffectResult::ImportAccepted {
                    job_url: super::JOB_URL.into(),
                }
            }
            Effect::PollImport { job_url } => {
                assert_eq!(job_url, super::JOB_URL);
                assert!(self.accepted_import.is_some(), "poll before a kick-off");
                let i = self.import_polls as usize;
                self.import_polls += 1;
                if let Some(hint) = self.plan.import_polls.get(i).copied() {
                    return EffectResult::ImportInProgress {
                        progress: Some(format!("{}%", 20 * (i + 1))),
                        retry_after: hint.header(now),
                    };
                }
                if self.plan.import_fails {
                    return EffectResult::Failed(Failure::http(
                        400,
                        "Import failed: resource Patient has no id",
                    ));
                }
                super::import_completed()
            }
            Effect::ApplyDeletions { index, key } => {
                let i = *index as usize;
                assert_eq!(self.plan.files[i].kind, FileKind::Deleted);
                assert!(
                    self.staged.contains_key(&key.0),
                    "deletions read from an unstaged key"
                );
                if self.plan.generation == PathlingApi::V7 {
                    return EffectResult::Failed(Failure::http(405, "Method Not Allowed"));
                }
                self.delete_attempts[i] += 1;
                match self.plan.files[i].delete.fails(self.delete_attempts[i]) {
                    Some(true) => self.transient(self.delete_attempts[i], now),
                    Some(false) => EffectResult::Failed(Failure::http(
                        422,
                        "Unprocessable: Bundle entry is not a DELETE",
                    )),
                    None => {
                        *self.deletions_applied.entry(*index).or_insert(0) += 1;
                        EffectResult::DeletionsApplied {
                            deleted: 3,
                            absent: 1,
                        }
                    }
                }
            }
            Effect::DeleteExportJob { status_url } => {
                assert_eq!(status_url, STATUS_URL);
                self.export_job_deletes += 1;
                if self.plan.cleanup_fails {
                    EffectResult::Failed(Failure::http(404, "Not Found"))
                } else {
                    EffectResult::ExportJobDeleted
                }
            }
        }
    }

    /// When each effect called `name` was performed.
    pub fn times_of(&self, name: &str) -> Vec<Timestamp> {
        self.log
            .iter()
            .filter(|(_, n)| *n == name)
            .map(|(t, _)| *t)
            .collect()
    }

    /// The `valueUrl`s of the accepted `$import` body, in order.
    pub fn imported_urls(&self) -> Vec<String> {
        let Some((_, params)) = &self.accepted_import else {
            return Vec::new();
        };
        params["parameter"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["name"] == "source" || p["name"] == "input")
            .flat_map(|p| p["part"].as_array().into_iter().flatten())
            .filter(|part| part["name"] == "url")
            .filter_map(|part| part["valueUrl"].as_str().map(str::to_string))
            .collect()
    }
}

/// How the driver performs a `Next::Run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every request of the batch, one after the other, stepping each result (the runners'
    /// loop with one transfer slot).
    Batch,
    /// Only the first request, then ask `next` again. Every step then starts from a fresh
    /// `next`, which is what a process that crashed and reloaded does.
    Sequential,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub mode: Mode,
    /// Calls of `next` before the run counts as not terminating.
    pub max_steps: usize,
    /// Encode and decode the run after every accepted step (a crash and reload).
    pub reload_at: ReloadAt,
    /// Check `decode(encode(run)) == run` after every accepted step.
    pub check_roundtrip: bool,
    /// After every accepted step, re-deliver every earlier (id, result) and expect refusal.
    pub check_redelivery: bool,
    /// Cancel the run after this many accepted inputs.
    pub cancel_after: Option<usize>,
    /// Feed `next` and `step` random earlier timestamps now and then (seeded).
    pub backwards: Option<u64>,
    /// Keep the run after every step in the trace (off for huge manifests: a clone per step).
    pub record_states: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadAt {
    Never,
    Every,
    /// After these accepted-step counts.
    Steps(Vec<usize>),
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Batch,
            max_steps: 200_000,
            reload_at: ReloadAt::Never,
            check_roundtrip: false,
            check_redelivery: false,
            cancel_after: None,
            backwards: None,
            record_states: true,
        }
    }
}

/// One accepted input and the run it produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub now: Timestamp,
    pub request: Option<Request>,
    pub input: Input,
    /// The run the input produced (when `Options::record_states`).
    pub after: Option<SyncRun>,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub run: SyncRun,
    pub terminal: Terminal,
    pub started: Timestamp,
    pub ended: Timestamp,
    pub events: Vec<Event>,
    /// Calls of `next`.
    pub steps: usize,
    /// Results of a batch refused because an earlier one of the batch ended the phase.
    pub refused_in_batch: usize,
    /// Every `SleepUntil` seen, with the `now` it was asked at.
    pub sleeps: Vec<(Timestamp, Timestamp)>,
}

pub const CANCEL_REASON: &str = "cancelled by the operator";

/// Runs the driver loop until the run is done, answering effects from `world`.
pub fn drive(run: SyncRun, world: &mut World, opts: &Options) -> Outcome {
    let mut run = run;
    let started = run.started_at;
    let mut clock = started;
    let mut back = opts.backwards.map(SplitMix64::new);
    // The `now` handed to the machine: usually the clock, sometimes an earlier time.
    let mut fed = |clock: Timestamp| -> Timestamp {
        match back.as_mut() {
            Some(rng) => {
                if rng.chance(25) {
                    Timestamp(rng.below(clock.0 + 1))
                } else {
                    clock
                }
            }
            None => clock,
        }
    };
    let mut events: Vec<Event> = Vec::new();
    let mut delivered: Vec<Input> = Vec::new();
    let mut steps = 0usize;
    let mut refused_in_batch = 0usize;
    let mut sleeps = Vec::new();

    let accept = |run: &mut SyncRun,
                  next: SyncRun,
                  request: Option<Request>,
                  input: Input,
                  now: Timestamp,
                  events: &mut Vec<Event>,
                  delivered: &mut Vec<Input>| {
        if opts.check_roundtrip {
            let text = persist::encode_string(&next);
            let back = persist::decode(text.as_bytes())
                .unwrap_or_else(|e| panic!("envelope does not decode: {e}\n{text}"));
            assert_eq!(back, next, "envelope round-trip in {}", next.state.name());
        }
        if opts.check_redelivery {
            for old in delivered.iter() {
                let refused = next.step(old.clone(), now);
                assert!(
                    refused.is_err(),
                    "re-delivered {old:?} was accepted in {}",
                    next.state.name()
                );
            }
        }
        delivered.push(input.clone());
        events.push(Event {
            now,
            request,
            input,
            after: opts.record_states.then(|| next.clone()),
        });
        let reload = match &opts.reload_at {
            ReloadAt::Never => false,
            ReloadAt::Every => true,
            ReloadAt::Steps(at) => at.contains(&events.len()),
        };
        *run = if reload {
            persist::decode(persist::encode_string(&next).as_bytes()).expect("reload")
        } else {
            next
        };
    };

    loop {
        steps += 1;
        assert!(
            steps <= opts.max_steps,
            "no termination after {} steps; phase {}, virtual time {} s",
            opts.max_steps,
            run.state.name(),
            started.until(clock) / 1000
        );
        let now = fed(clock);
        match run.next(now) {
            Next::Done { terminal } => {
                assert_eq!(run.state.terminal(), Some(terminal.clone()));
                return Outcome {
                    run,
                    terminal,
                    started,
                    ended: clock,
                    events,
                    steps,
                    refused_in_batch,
                    sleeps,
                };
            }
            Next::SleepUntil { until, reason } => {
                assert!(
                    until > now,
                    "wake-up {until:?} is not after now {now:?} ({reason}) in {}",
                    run.state.name()
                );
                sleeps.push((now, until));
                clock = clock.max(until);
            }
            Next::Run { requests } => {
                assert!(!requests.is_empty(), "Next::Run with no request");
                let batch = match opts.mode {
                    Mode::Batch => &requests[..],
                    Mode::Sequential => &requests[..1],
                };
                let phase = run.state.name();
                for req in batch {
                    clock = clock.plus_ms(world.latency());
                    let result = world.answer(req, clock);
                    let now = fed(clock);
                    let input = Input::Completed { id: req.id, result };
                    match run.step(input.clone(), now) {
                        Ok(next) => accept(
                            &mut run,
                            next,
                            Some(req.clone()),
                            input,
                            now,
                            &mut events,
                            &mut delivered,
                        ),
                        Err(e) => {
                            // Only a batch whose phase ended early may see its rest refused.
                            assert!(
                                opts.mode == Mode::Batch && run.state.name() != phase,
                                "result for {:?} refused in {}: {e}",
                                req.id,
                                run.state.name()
                            );
                            refused_in_batch += 1;
                        }
                    }
                }
            }
        }
        if opts.cancel_after.is_some_and(|n| events.len() >= n) && !run.is_done() {
            let already = events
                .iter()
                .any(|e| matches!(e.input, Input::Cancel { .. }));
            if !already {
                let input = Input::Cancel {
                    reason: CANCEL_REASON.into(),
                };
                let now = fed(clock);
                let next = run.step(input.clone(), now).expect("cancel is accepted");
                accept(
                    &mut run,
                    next,
                    None,
                    input,
                    now,
                    &mut events,
                    &mut delivered,
                );
            }
        }
    }
}

/// Checks what every run must satisfy at its end, whatever the plan:
/// - Succeeded: every `output[]` file is in the import request exactly once (and nothing
///   else is), every file of the manifest was staged, every `deleted[]` file's deletions were
///   applied once when configured, and the watermark is this run's transactionTime;
/// - Failed in staging: the reason names a file the plan made fail, or the fatal outcome;
/// - Failed or Cancelled: the watermark is the one the run started with.
pub fn check_accounting(
    outcome: &Outcome,
    world: &World,
    spec: &RunSpec,
    start_mark: Option<&str>,
) {
    let plan = &world.plan;
    let key = |i: usize| {
        let f = &plan.files[i];
        spec.staging
            .file_key(RUN_ID, i as u32, f.kind, &f.type_name)
            .0
    };
    match &outcome.terminal {
        Terminal::Succeeded(summary) => {
            assert_eq!(summary.files as usize, plan.files.len());
            for i in 0..plan.files.len() {
                assert_eq!(
                    world.staged.get(&key(i)),
                    Some(&1),
                    "{} staged once",
                    plan.describe(i)
                );
            }
            let outputs: Vec<usize> = (0..plan.files.len())
                .filter(|i| plan.files[*i].kind == FileKind::Output)
                .collect();
            assert_eq!(summary.nothing_to_import, outputs.is_empty());
            if outputs.is_empty() {
                assert!(
                    world.accepted_import.is_none(),
                    "nothing to import, yet imported"
                );
            } else {
                let (api, _) = world.accepted_import.as_ref().expect("an import");
                let mut expected: Vec<String> = outputs
                    .iter()
                    .map(|i| {
                        spec.staging
                            .import_url(&pathling_import_core::staging::StagingKey(key(*i)), *api)
                    })
                    .collect();
                let mut got = world.imported_urls();
                expected.sort();
                got.sort();
                assert_eq!(
                    got, expected,
                    "the import names every output file exactly once"
                );
                assert_eq!(summary.imported_files as usize, outputs.len());
            }
            if spec.target.apply_deletions {
                for i in 0..plan.files.len() {
                    if plan.files[i].kind == FileKind::Deleted {
                        assert_eq!(world.deletions_applied.get(&(i as u32)), Some(&1));
                    }
                }
            } else {
                assert!(world.deletions_applied.is_empty());
            }
            let mark = outcome.run.watermark.as_ref().expect("a watermark");
            assert_eq!(mark.transaction_time, super::TRANSACTION_TIME);
            assert_eq!(mark.run_id, RUN_ID);
        }
        Terminal::Failed(failed) => {
            assert!(!failed.reason.is_empty());
            if failed.phase == "staging_files" {
                let named = (0..plan.files.len()).any(|i| {
                    plan.files[i].stage != Fault::None
                        && failed
                            .reason
                            .contains(&format!("could not stage {}:", plan.describe(i)))
                });
                let fatal =
                    plan.files.iter().any(|f| f.fatal) && failed.reason.contains("fatal error(s)");
                assert!(
                    named || fatal,
                    "staging failure names no faulty file: {}",
                    failed.reason
                );
            }
            if failed.phase == "applying_deletions" {
                let named = (0..plan.files.len()).any(|i| {
                    plan.files[i].kind == FileKind::Deleted
                        && failed
                            .reason
                            .contains(&format!("deletions of {}:", plan.describe(i)))
                });
                assert!(named, "deletions failure names no file: {}", failed.reason);
            }
            assert_eq!(
                outcome
                    .run
                    .watermark
                    .as_ref()
                    .map(|w| w.transaction_time.as_str()),
                start_mark,
                "a failed run keeps the previous watermark"
            );
        }
        Terminal::Cancelled(c) => {
            assert_eq!(c.reason, CANCEL_REASON);
            assert_eq!(
                outcome
                    .run
                    .watermark
                    .as_ref()
                    .map(|w| w.transaction_time.as_str()),
                start_mark
            );
        }
    }
    // Clean-up: the export job is deleted exactly once whenever one was accepted.
    let accepted_export = world.kickoffs > 0
        && outcome.events.iter().any(|e| {
            matches!(
                e.input,
                Input::Completed {
                    result: EffectResult::ExportAccepted { .. },
                    ..
                }
            )
        });
    let skipped_by_cancel = outcome
        .events
        .iter()
        .any(|e| matches!(e.input, Input::Cancel { .. }));
    // A run that failed while files remained to be staged keeps its export job for a retry.
    let kept_for_retry = matches!(
        &outcome.run.state,
        pathling_import_core::state::SyncState::Failed(f)
            if f.resume.as_ref().is_some_and(|r| r.export_kept)
    );
    if accepted_export && !skipped_by_cancel {
        assert_eq!(
            world.export_job_deletes,
            u32::from(!kept_for_retry),
            "the export job is deleted once (unless kept for a retry)"
        );
    }
    if !accepted_export {
        assert_eq!(world.export_job_deletes, 0);
    }
    // Requests carry the ids the machine expects.
    for e in &outcome.events {
        if let (Some(req), Input::Completed { id, .. }) = (&e.request, &e.input) {
            assert_eq!(&req.id, id);
            let per_file = matches!(id, EffectId::File { .. } | EffectId::Deletions { .. });
            let file_effect = matches!(
                req.effect,
                Effect::StageFile { .. } | Effect::ApplyDeletions { .. }
            );
            assert_eq!(per_file, file_effect);
        }
    }
}

/// An upper bound on a run's virtual duration, derived from the spec's policies; every run
/// of a plan without backwards time must end within it.
///
/// ```text
/// export:    patience(export) + 2L     the deadline is set at the start; the last kick-off
///                                       or poll may begin at the deadline and take L
/// staging:   n × (patience(transfer) + L)
///                                       each staged file renews the stall deadline; a failure
///                                       past it gives up
/// import:    patience(import) + 5L     detection, a generation switch, the kick-off and a
///                                       poll may each follow the last wait without a check
/// deletions: Σ over deleted[] files (times(import) + 1) × (L + max(wait(import),
///            retry_after_max))         the phase has no deadline: per-file attempts bound it
/// clean-up:  L, plus 2L of slack
/// ```
/// where `L` is the plan's largest effect latency and `n` the number of manifest files.
pub fn duration_bound_ms(spec: &RunSpec, plan: &Plan) -> u64 {
    let l = plan.max_latency_ms;
    let r = &spec.retry;
    let n = plan.files.len() as u64;
    let deleted = if spec.target.apply_deletions {
        plan.count(FileKind::Deleted) as u64
    } else {
        0
    };
    let per_deletion = (u64::from(r.import.times) + 1)
        .saturating_mul(l.saturating_add(r.import.wait_ms.max(r.retry_after_max_ms)));
    patience_ms(&r.export)
        .saturating_add(2 * l)
        .saturating_add(n.saturating_mul(patience_ms(&r.transfer).saturating_add(l)))
        .saturating_add(patience_ms(&r.import).saturating_add(5 * l))
        .saturating_add(deleted.saturating_mul(per_deletion))
        .saturating_add(3 * l)
}

/// The spec a simulation runs with when the test does not care: small waits, so that
/// retries do not need hours of virtual time.
pub fn quick_spec(extra: &[(&str, &str)]) -> RunSpec {
    let mut pairs = vec![
        ("EXPORT_RETRY_TIMES", "6"),
        ("EXPORT_RETRY_WAIT", "30"),
        ("TRANSFER_RETRY_TIMES", "4"),
        ("TRANSFER_RETRY_WAIT", "20"),
        ("IMPORT_RETRY_TIMES", "6"),
        ("IMPORT_RETRY_WAIT", "30"),
        ("RETRY_AFTER_MAX", "300"),
    ];
    pairs.extend_from_slice(extra);
    super::spec_with(&pairs)
}

pub fn started(spec: &RunSpec) -> SyncRun {
    super::start(spec.clone())
}

pub fn start_time() -> Timestamp {
    T0
}

pub fn target() -> &'static str {
    TARGET
}
