//! A deterministic simulation of the world a run talks to, driven by the production driver.
//!
//! [`World`] answers every [`Request`] according to a [`Plan`] (what goes wrong where, and how
//! often) the way the real servers do — it builds a real manifest and decodes it with
//! [`bulk::parse_manifest`], folds real OperationOutcome lines, reads the generation from a
//! CapabilityStatement and judges an `$import` body by its shape.
//!
//! [`drive`] has no loop of its own: it runs `pathling_import_runners::driver::drive_until`
//! with
//! - [`Sim`] as the driver's [`Effects`] (the world behind a mutex; each effect is answered a
//!   seeded latency after it went out, and effects in flight overlap: [`Sim::run`] polls the
//!   driver and, whenever it waits, moves the [`VirtualClock`] on to the effect due first)
//!   and as its [`Observer`] (events, sleeps, refused results, and a trace of starts, steps
//!   and saves);
//! - the [`VirtualClock`] as its `Clock` (a sleep jumps to the wake-up at once; optionally
//!   `now` is sometimes an earlier time, as a clock stepping backwards would give);
//! - [`SimStore`] as its `RunStore` (checks the envelope round-trip on every save, keeps the
//!   saved runs);
//!
//! and stops and resumes the drive as a runner would: reloads from the stored envelope at
//! planned points (graceful stops, invocation budgets, hard crashes that lose the answers of
//! the effects in flight), a cancel after a number of events, and a step bound that turns
//! non-termination into a test failure.

use super::{SplitMix64, RUN_ID, SOURCE, STATUS_URL, T0, TARGET};
use futures::future::BoxFuture;
use pathling_import_core::bulk::{self, FileKind, Manifest, OutcomeSummary};
use pathling_import_core::effect::{Effect, EffectId, EffectResult, Input, Next, Request};
use pathling_import_core::pathling;
use pathling_import_core::persist;
use pathling_import_core::retry::{patience_ms, Failure, FailureKind};
use pathling_import_core::spec::{
    ImportMode, PathlingApi, PathlingApiChoice, PhasePolicy, RunSpec,
};
use pathling_import_core::state::{SyncState, Terminal};
use pathling_import_core::{SyncRun, Timestamp};
use pathling_import_runners::driver::{
    self, Clock, DriveOptions, Effects, Observer, RunStore, Stopped, StoreError,
};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

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
    /// Staging it takes this long (virtual ms), whatever the plan's latency.
    pub slow_ms: Option<u64>,
    /// Its staging stores a part every this many virtual ms, which an attempt cut short
    /// keeps: the next attempt takes only what is left (a resumable transfer).
    pub part_ms: Option<u64>,
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
            slow_ms: None,
            part_ms: None,
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
    /// The completing export poll (reading the manifest) takes this long instead.
    pub slow_manifest_ms: Option<u64>,
    pub seed: u64,
}

impl Plan {
    /// Nothing goes wrong.
    pub fn happy(files: Vec<PlanFile>) -> Self {
        Plan {
            kickoff: Fault::None,
            hiccups: Vec::new(),
            export_gone: false,
            files: Plan::grouped(files),
            generation: PathlingApi::V9,
            reports_version: true,
            detect: Fault::None,
            busy: 0,
            import_polls: Vec::new(),
            import_fails: false,
            cleanup_fails: false,
            max_latency_ms: 2_000,
            slow_manifest_ms: None,
            seed: 1,
        }
    }

    /// Files in the order the machine indexes them: by array, then by type in the order types
    /// first appear (what `parse_manifest` makes of any manifest). [`Plan::manifest_json`]
    /// lists them interleaved, so the grouping is exercised.
    pub fn grouped(mut files: Vec<PlanFile>) -> Vec<PlanFile> {
        let mut rank: Vec<String> = Vec::new();
        for f in &files {
            if !rank.contains(&f.type_name) {
                rank.push(f.type_name.clone());
            }
        }
        let array = |k: FileKind| match k {
            FileKind::Output => 0,
            FileKind::Deleted => 1,
            FileKind::Error => 2,
        };
        files.sort_by_key(|f| (array(f.kind), rank.iter().position(|t| *t == f.type_name)));
        files
    }

    /// `n` output files over a few types, in the machine's order (grouped by type).
    pub fn outputs(n: usize) -> Vec<PlanFile> {
        const TYPES: [&str; 5] = [
            "Patient",
            "Observation",
            "Encounter",
            "Condition",
            "MedicationRequest",
        ];
        Plan::grouped(
            (0..n)
                .map(|i| PlanFile::ok(FileKind::Output, TYPES[i % TYPES.len()]))
                .collect(),
        )
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
            files: Plan::grouped(files),
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
            slow_manifest_ms: None,
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
    /// Virtual ms of each file's staging stored by attempts cut short (see
    /// [`PlanFile::part_ms`]).
    pub stage_progress_ms: Vec<u64>,
    /// Successful writes per staging key.
    pub staged: BTreeMap<String, u32>,
    pub detects: u32,
    pub import_kickoffs: u32,
    /// The body of the (last) accepted `$import` kick-off and the shape it had.
    pub accepted_import: Option<(PathlingApi, Value)>,
    /// Every accepted `$import` kick-off (more than one only when an answer was lost).
    pub accepted_imports: Vec<(PathlingApi, Value)>,
    /// Export kick-offs answered `ExportAccepted`.
    pub exports_accepted: u32,
    pub import_polls: u32,
    pub delete_attempts: Vec<u32>,
    /// Successful deletions per file index.
    pub deletions_applied: BTreeMap<u32, u32>,
    pub export_job_deletes: u32,
    /// Effects performed, in order: when, and which.
    pub log: Vec<(Timestamp, &'static str)>,
    /// Effects performed, in order, each with what it acted on (see [`World::effect_set`]).
    pub performed: Vec<String>,
}

impl World {
    pub fn new(spec: &RunSpec, plan: &Plan) -> Self {
        let order = |files: &[PlanFile]| -> Vec<(FileKind, String)> {
            files
                .iter()
                .map(|f| (f.kind, f.type_name.clone()))
                .collect()
        };
        assert_eq!(
            order(&plan.files),
            order(&Plan::grouped(plan.files.clone())),
            "a plan lists its files in the machine's order: build it with Plan::grouped"
        );
        World {
            spec: spec.clone(),
            plan: plan.clone(),
            rng: SplitMix64::new(plan.seed),
            kickoffs: 0,
            export_polls: 0,
            stored_manifest: None,
            stage_attempts: vec![0; plan.files.len()],
            stage_progress_ms: vec![0; plan.files.len()],
            staged: BTreeMap::new(),
            detects: 0,
            import_kickoffs: 0,
            accepted_import: None,
            accepted_imports: Vec::new(),
            exports_accepted: 0,
            import_polls: 0,
            delete_attempts: vec![0; plan.files.len()],
            deletions_applied: BTreeMap::new(),
            export_job_deletes: 0,
            log: Vec::new(),
            performed: Vec::new(),
        }
    }

    /// How long the next effect takes.
    pub fn latency(&mut self, request: &Request) -> u64 {
        let slow = match &request.effect {
            Effect::StageFile { index, .. } => {
                let done = self.stage_progress_ms.get(*index as usize).copied();
                self.plan
                    .files
                    .get(*index as usize)
                    .and_then(|f| f.slow_ms)
                    .map(|slow| slow.saturating_sub(done.unwrap_or(0)))
            }
            Effect::PollExport { .. } => self.plan.slow_manifest_ms,
            _ => None,
        };
        let random = self.rng.below(self.plan.max_latency_ms + 1);
        slow.unwrap_or(random)
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
        // Each array lists its types round-robin (a server may interleave them), keeping the
        // order in which types first appear: the machine's grouping gives the plan's order.
        let array = |kind: FileKind| -> Vec<Value> {
            let mut groups: Vec<Vec<(usize, &PlanFile)>> = Vec::new();
            for (i, f) in self
                .plan
                .files
                .iter()
                .enumerate()
                .filter(|(_, f)| f.kind == kind)
            {
                match groups.last_mut() {
                    Some(g) if g[0].1.type_name == f.type_name => g.push((i, f)),
                    _ => groups.push(vec![(i, f)]),
                }
            }
            let longest = groups.iter().map(Vec::len).max().unwrap_or(0);
            (0..longest)
                .flat_map(|round| groups.iter().filter_map(move |g| g.get(round)))
                .map(|(i, f)| item(*i, f))
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
        let name = req.effect.name();
        self.log.push((now, name));
        let target = match &req.effect {
            Effect::KickoffExport(k) => format!("{} {:?} {:?}", k.url, k.query, k.post_body),
            Effect::PollExport { status_url, .. } => status_url.clone(),
            Effect::StageFile { key, .. } | Effect::ApplyDeletions { key, .. } => key.0.clone(),
            Effect::DetectPathling => String::new(),
            Effect::KickoffImport {
                api, parameters, ..
            } => format!("{api:?} {parameters}"),
            Effect::PollImport { job_url } => job_url.clone(),
            Effect::DeleteExportJob { status_url } => status_url.clone(),
        };
        self.performed.push(format!("{name} {target}"));
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
                    None => {
                        self.exports_accepted += 1;
                        EffectResult::ExportAccepted {
                            status_url: STATUS_URL.into(),
                        }
                    }
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
            Effect::KickoffImport {
                api, parameters, ..
            } => {
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
                self.accepted_imports.push((shape, parameters.clone()));
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

    /// The `valueUrl`s of the (last) accepted `$import` body, in order.
    pub fn imported_urls(&self) -> Vec<String> {
        match &self.accepted_import {
            Some((_, params)) => urls_of(params),
            None => Vec::new(),
        }
    }

    /// The effects performed, as a set: what each acted on, repeats folded.
    pub fn effect_set(&self) -> BTreeSet<String> {
        self.performed.iter().cloned().collect()
    }
}

/// The `valueUrl`s of an `$import` body, in order.
pub fn urls_of(params: &Value) -> Vec<String> {
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

// =============================================================================================
// Time.

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Virtual time: effects advance it by their latency, sleeps jump it to the wake-up at once.
///
/// With `backwards`, [`Clock::now`] now and then answers an earlier time (down to the epoch),
/// seeded, as a clock that steps backwards would; the virtual time itself never goes back.
pub struct VirtualClock {
    state: Arc<Mutex<ClockState>>,
}

struct ClockState {
    /// The virtual time.
    now: Timestamp,
    /// The last `now` handed to the driver.
    fed: Timestamp,
    back: Option<SplitMix64>,
    /// Alarms the driver waits on (time → how many): [`Sim::run`] moves the virtual time on
    /// to the earliest when it comes before every effect in flight ends.
    alarms: std::collections::BTreeMap<Timestamp, usize>,
}

impl VirtualClock {
    pub fn new(start: Timestamp, backwards: Option<u64>) -> Self {
        VirtualClock {
            state: Arc::new(Mutex::new(ClockState {
                now: start,
                fed: start,
                back: backwards.map(SplitMix64::new),
                alarms: std::collections::BTreeMap::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ClockState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The virtual time (not what `now` last answered).
    pub fn real(&self) -> Timestamp {
        self.lock().now
    }

    /// What [`Clock::now`] last answered: the `now` of the driver's latest `next` or `step`.
    pub fn last_fed(&self) -> Timestamp {
        self.lock().fed
    }

    pub fn advance(&self, ms: u64) {
        let mut s = self.lock();
        s.now = s.now.plus_ms(ms);
    }

    /// The earliest alarm still waited on that has not rung yet.
    fn next_alarm(&self) -> Option<Timestamp> {
        let s = self.lock();
        s.alarms.keys().find(|at| **at > s.now).copied()
    }

    /// Moves the virtual time on to `t` (never back).
    pub fn advance_to(&self, t: Timestamp) {
        let mut s = self.lock();
        s.now = s.now.max(t);
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> Timestamp {
        let mut s = self.lock();
        let now = s.now;
        let fed = match s.back.as_mut() {
            Some(rng) => {
                if rng.chance(25) {
                    Timestamp(rng.below(now.0 + 1))
                } else {
                    now
                }
            }
            None => now,
        };
        s.fed = fed;
        fed
    }

    /// The driver sleeps `until - now` for the `now` it was handed: the virtual time jumps to
    /// that wake-up (a backwards `now` does not make it sleep past it).
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        let mut s = self.lock();
        let wake = s.fed.plus_ms(millis(duration));
        s.now = s.now.max(wake);
        Box::pin(std::future::ready(()))
    }

    /// Ready once the virtual time has reached `at`: by effects ending, or, when it comes
    /// first, by [`Sim::run`] moving the time on to it. The simulation polls the driver again
    /// after each, so no waker is needed. Registered while the future lives.
    fn alarm(&self, at: Timestamp) -> BoxFuture<'static, ()> {
        struct Registered {
            state: Arc<Mutex<ClockState>>,
            at: Timestamp,
        }
        impl Drop for Registered {
            fn drop(&mut self) {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(n) = s.alarms.get_mut(&self.at) {
                    *n -= 1;
                    if *n == 0 {
                        s.alarms.remove(&self.at);
                    }
                }
            }
        }
        *self.lock().alarms.entry(at).or_default() += 1;
        let registered = Registered {
            state: self.state.clone(),
            at,
        };
        Box::pin(std::future::poll_fn(move |_| {
            let now = registered
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .now;
            if now >= registered.at {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }))
    }
}

// =============================================================================================
// The driver's effects, observer and store.

/// One accepted input and the run it produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub now: Timestamp,
    pub request: Option<Request>,
    pub input: Input,
    /// The `seq` of the run the input produced.
    pub seq: u64,
    /// The run the input produced (when `Options::record_states`).
    pub after: Option<SyncRun>,
}

/// What the driver did, in order, as the simulation saw it.
#[derive(Clone, Debug, PartialEq)]
pub enum Trace {
    /// An effect started, at this virtual time (the world answers it at once, unless a crash
    /// is under way).
    Started { at: Timestamp, request: Request },
    /// Its result was accepted and saved.
    Stepped(EffectId),
    /// Its result was refused.
    Rejected(EffectId),
    /// A run was saved (`sending`: the `Input::Sending` record of an append kick-off).
    Saved {
        seq: u64,
        phase: &'static str,
        sending: bool,
        /// The envelope's size, when the store checks its round-trip (it encodes it then).
        bytes: Option<usize>,
    },
}

struct SimState {
    world: World,
    record_states: bool,
    events: Vec<Event>,
    sleeps: Vec<(Timestamp, Timestamp)>,
    /// Refused results: the request, why, and the phase of the stored run at the time.
    rejected: Vec<(Request, String, &'static str)>,
    /// Calls of `next` by the driver's loop.
    steps: usize,
    trace: Vec<Trace>,
    // Hard crashes: once the events reach the next point, the next time the driver waits for
    // its effects, every effect in flight is lost — performed or not, seeded — and the
    // interrupt fires.
    crash_points: VecDeque<usize>,
    crash_rng: SplitMix64,
    crashed: bool,
    waker: Option<Waker>,
    /// Effects performed whose answers were lost in a crash.
    lost: Vec<(Request, EffectResult)>,
    in_flight: Vec<Flight>,
    completed: BTreeMap<u64, EffectResult>,
    next_ticket: u64,
    // The store.
    last_saved: Option<SyncRun>,
    /// Every saved run, with the `now` it was saved at (when recording).
    saves: Vec<(Timestamp, SyncRun)>,
    record_saves: bool,
    /// `Input::Sending` records, with the `seq` of the run they produced.
    sendings: Vec<(Input, u64)>,
}

/// The simulated world as the driver sees it: its [`Effects`] and its [`Observer`].
#[derive(Clone)]
pub struct Sim {
    state: Arc<Mutex<SimState>>,
    clock: Arc<VirtualClock>,
}

impl Sim {
    pub fn new(world: World, clock: Arc<VirtualClock>, record_states: bool) -> Sim {
        Sim {
            state: Arc::new(Mutex::new(SimState {
                world,
                record_states,
                events: Vec::new(),
                sleeps: Vec::new(),
                rejected: Vec::new(),
                steps: 0,
                trace: Vec::new(),
                crash_points: VecDeque::new(),
                crash_rng: SplitMix64::new(0),
                crashed: false,
                waker: None,
                lost: Vec::new(),
                in_flight: Vec::new(),
                completed: BTreeMap::new(),
                next_ticket: 0,
                last_saved: None,
                saves: Vec::new(),
                record_saves: false,
                sendings: Vec::new(),
            })),
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn clock(&self) -> Arc<VirtualClock> {
        self.clock.clone()
    }

    pub fn world<R>(&self, f: impl FnOnce(&World) -> R) -> R {
        f(&self.lock().world)
    }

    pub fn events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }

    pub fn event_count(&self) -> usize {
        self.lock().events.len()
    }

    pub fn steps(&self) -> usize {
        self.lock().steps
    }

    pub fn trace(&self) -> Vec<Trace> {
        self.lock().trace.clone()
    }

    pub fn rejected(&self) -> Vec<(Request, String, &'static str)> {
        self.lock().rejected.clone()
    }

    pub fn lost(&self) -> Vec<(Request, EffectResult)> {
        self.lock().lost.clone()
    }

    /// Crash at the first effect started once the accepted events reach each of `points`.
    pub fn crash_at(&self, points: impl IntoIterator<Item = usize>, seed: u64) {
        let mut s = self.lock();
        s.crash_points = points.into_iter().collect();
        s.crash_rng = SplitMix64::new(seed);
    }

    /// Fires once a crash is under way: the driver's `interrupt`.
    pub fn crash_signal(&self) -> CrashSignal {
        CrashSignal { sim: self.clone() }
    }

    /// Whether the drive just ended by a crash (and forgets it); otherwise checks that the
    /// driver left nothing in flight.
    pub fn take_crash(&self) -> bool {
        let mut s = self.lock();
        s.waker = None;
        let crashed = std::mem::replace(&mut s.crashed, false);
        if !crashed {
            drop(s);
            self.settled();
        }
        crashed
    }

    /// A store whose saves this simulation keeps.
    pub fn store(&self, check_roundtrip: bool, record_saves: bool) -> SimStore {
        self.lock().record_saves = record_saves;
        SimStore {
            sim: self.clone(),
            check_roundtrip,
        }
    }

    /// Records a cancel applied between two drives.
    pub fn record_cancel(&self, run: &SyncRun, reason: &str) {
        let now = self.clock.last_fed();
        let mut s = self.lock();
        let after = s.record_states.then(|| run.clone());
        s.events.push(Event {
            now,
            request: None,
            input: Input::Cancel {
                reason: reason.to_string(),
            },
            seq: run.seq,
            after,
        });
    }

    /// An effect goes out: it is in flight until [`Sim::complete_next`] answers it, at its
    /// start plus a seeded latency.
    fn start(&self, request: &Request, waker: Waker) -> u64 {
        let mut s = self.lock();
        let at = self.clock.real();
        let latency = s.world.latency(request);
        let ticket = s.next_ticket;
        s.next_ticket += 1;
        s.trace.push(Trace::Started {
            at,
            request: request.clone(),
        });
        s.in_flight.push(Flight {
            ticket,
            request: request.clone(),
            due: at.plus_ms(latency),
            waker,
        });
        ticket
    }

    /// The effect's answer, once [`Sim::complete_next`] gave it.
    fn answered(&self, ticket: u64, waker: &Waker) -> Option<EffectResult> {
        let mut s = self.lock();
        let answer = s.completed.remove(&ticket);
        if answer.is_none() {
            if let Some(f) = s.in_flight.iter_mut().find(|f| f.ticket == ticket) {
                f.waker = waker.clone();
            }
        }
        answer
    }

    /// Called when the driver waits for its effects and nothing else: moves the virtual time
    /// on to the earliest effect due and answers it from the world. At a planned crash
    /// instead, every effect in flight is lost (performed or not, seeded) and the interrupt
    /// fires. False when nothing is in flight.
    pub fn complete_next(&self) -> bool {
        let mut s = self.lock();
        let s = &mut *s;
        assert!(
            s.completed.is_empty(),
            "an answer was not taken by the driver"
        );
        if s.in_flight.is_empty() {
            return false;
        }
        let events = s.events.len();
        if !s.crashed && s.crash_points.front().is_some_and(|p| events >= *p) {
            s.crash_points.pop_front();
            s.crashed = true;
            for f in std::mem::take(&mut s.in_flight) {
                // The process dies with the effect in flight: it may have reached the server.
                if s.crash_rng.chance(50) {
                    self.clock.advance_to(f.due);
                    let result = s.world.answer(&f.request, self.clock.real());
                    s.lost.push((f.request, result));
                }
            }
            if let Some(w) = s.waker.take() {
                w.wake();
            }
            return true;
        }
        let first = s
            .in_flight
            .iter()
            .enumerate()
            .min_by_key(|(_, f)| (f.due, f.ticket))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let f = s.in_flight.remove(first);
        self.clock.advance_to(f.due);
        let result = s.world.answer(&f.request, self.clock.real());
        s.completed.insert(f.ticket, result);
        f.waker.wake();
        true
    }

    /// After a drive that was not interrupted: nothing may be left in flight.
    pub fn settled(&self) {
        let s = self.lock();
        assert!(
            s.in_flight.is_empty() && s.completed.is_empty(),
            "the driver returned with effects in flight: {:?}",
            s.in_flight.iter().map(|f| f.request.id).collect::<Vec<_>>()
        );
    }

    /// Runs a driver future to its end: polls it, and whenever it waits, answers the effect
    /// due first ([`Sim::complete_next`]). The virtual time only moves there and in sleeps, so
    /// the effects in flight overlap as they would, and everything is deterministic.
    pub fn run<F: Future>(&self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
                return out;
            }
            // An alarm before every effect in flight ends rings first.
            let next_due = self.lock().in_flight.iter().map(|f| f.due).min();
            if let Some(at) = self
                .clock
                .next_alarm()
                .filter(|at| next_due.is_none_or(|due| *at < due))
            {
                self.clock.advance_to(at);
                continue;
            }
            if !self.complete_next() && !self.lock().crashed {
                panic!("the driver waits, with no effect in flight");
            }
        }
    }

    /// Takes out the world and everything recorded.
    fn finish(&self) -> Recorded {
        let mut s = self.lock();
        Recorded {
            world: s.world.clone(),
            events: std::mem::take(&mut s.events),
            sleeps: std::mem::take(&mut s.sleeps),
            rejected: std::mem::take(&mut s.rejected),
            steps: s.steps,
            trace: std::mem::take(&mut s.trace),
            lost: std::mem::take(&mut s.lost),
            saves: std::mem::take(&mut s.saves),
            sendings: std::mem::take(&mut s.sendings),
        }
    }
}

struct Recorded {
    world: World,
    events: Vec<Event>,
    sleeps: Vec<(Timestamp, Timestamp)>,
    rejected: Vec<(Request, String, &'static str)>,
    steps: usize,
    trace: Vec<Trace>,
    lost: Vec<(Request, EffectResult)>,
    saves: Vec<(Timestamp, SyncRun)>,
    sendings: Vec<(Input, u64)>,
}

/// One effect in flight.
struct Flight {
    ticket: u64,
    request: Request,
    due: Timestamp,
    waker: Waker,
}

/// The future of one effect: goes out when first polled, answers once its turn came (never,
/// when a crash lost it).
pub struct SimEffect<'a> {
    sim: &'a Sim,
    request: Request,
    ticket: Option<u64>,
}

/// A dropped effect (the driver cut it at an invocation's end) is gone from the world: it
/// will never be answered.
impl Drop for SimEffect<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket {
            let mut s = self.sim.lock();
            s.in_flight.retain(|f| f.ticket != ticket);
            s.completed.remove(&ticket);
        }
    }
}

impl Future for SimEffect<'_> {
    type Output = EffectResult;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<EffectResult> {
        match self.ticket {
            None => {
                let ticket = self.sim.start(&self.request, cx.waker().clone());
                self.ticket = Some(ticket);
                Poll::Pending
            }
            Some(ticket) => match self.sim.answered(ticket, cx.waker()) {
                Some(result) => Poll::Ready(result),
                None => Poll::Pending,
            },
        }
    }
}

impl Effects for Sim {
    fn execute(&self, request: &Request) -> impl Future<Output = EffectResult> + Send {
        SimEffect {
            sim: self,
            request: request.clone(),
            ticket: None,
        }
    }

    /// A resumable file ([`PlanFile::part_ms`]) keeps the whole parts its cut attempt moved.
    fn progressed(&self, request: &Request) -> bool {
        let Effect::StageFile { index, .. } = &request.effect else {
            return false;
        };
        let mut s = self.lock();
        let now = self.clock.real();
        let Some(part) = s
            .world
            .plan
            .files
            .get(*index as usize)
            .and_then(|f| f.part_ms)
        else {
            return false;
        };
        let started = s.trace.iter().rev().find_map(|t| match t {
            Trace::Started { at, request: r } if r.id == request.id => Some(*at),
            _ => None,
        });
        let Some(started) = started else {
            return false;
        };
        let elapsed = now.0.saturating_sub(started.0);
        let gained = elapsed / part.max(1) * part;
        if let Some(p) = s.world.stage_progress_ms.get_mut(*index as usize) {
            *p += gained;
        }
        gained > 0
    }
}

impl Observer for Sim {
    fn next(&self, run: &SyncRun, next: &Next) {
        let now = self.clock.last_fed();
        let mut s = self.lock();
        s.steps += 1;
        match next {
            Next::Run { requests } => assert!(!requests.is_empty(), "Next::Run with no request"),
            Next::SleepUntil { until, reason } => {
                assert!(
                    *until > now,
                    "wake-up {until:?} is not after now {now:?} ({reason}) in {}",
                    run.state.name()
                );
                s.sleeps.push((now, *until));
            }
            Next::Done { terminal } => {
                assert_eq!(run.state.terminal().as_ref(), Some(terminal));
            }
        }
    }

    fn stepped(&self, _before: &SyncRun, run: &SyncRun, request: &Request, result: &EffectResult) {
        let now = self.clock.last_fed();
        let mut s = self.lock();
        let after = s.record_states.then(|| run.clone());
        s.events.push(Event {
            now,
            request: Some(request.clone()),
            input: Input::Completed {
                id: request.id,
                result: result.clone(),
            },
            seq: run.seq,
            after,
        });
        s.trace.push(Trace::Stepped(request.id));
    }

    fn rejected(&self, request: &Request, why: &str) {
        let mut s = self.lock();
        let phase = s.last_saved.as_ref().map_or("", |r| r.state.name());
        s.rejected.push((request.clone(), why.to_string(), phase));
        s.trace.push(Trace::Rejected(request.id));
    }
}

/// The driver's `interrupt`: ready once a crash is under way.
pub struct CrashSignal {
    sim: Sim,
}

impl Future for CrashSignal {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.sim.lock();
        if s.crashed {
            Poll::Ready(())
        } else {
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// The simulation's store: keeps the last saved run (what a reload reads back, through its
/// envelope), checks the envelope round-trip on every save when asked, refuses a save that
/// does not advance the stored `seq` (as every runner's store does) and notes `Sending`
/// records.
pub struct SimStore {
    sim: Sim,
    check_roundtrip: bool,
}

impl SimStore {
    /// Stores a new run (as a runner does before driving it).
    pub fn put(&mut self, run: &SyncRun) {
        let mut s = self.sim.lock();
        if s.record_saves {
            s.saves.push((run.started_at, run.clone()));
        }
        s.last_saved = Some(run.clone());
    }

    /// The stored run, read back from its envelope (what a restarted runner gets).
    pub fn reload(&self) -> SyncRun {
        let s = self.sim.lock();
        let run = s.last_saved.as_ref().expect("a stored run");
        let text = persist::encode_string(run);
        persist::decode(text.as_bytes())
            .unwrap_or_else(|e| panic!("the stored envelope does not decode: {e}\n{text}"))
    }
}

impl RunStore for SimStore {
    async fn save(&mut self, run: &SyncRun) -> Result<u64, StoreError> {
        let mut bytes = None;
        if self.check_roundtrip {
            let text = persist::encode_string(run);
            let back = persist::decode(text.as_bytes())
                .unwrap_or_else(|e| panic!("envelope does not decode: {e}\n{text}"));
            assert_eq!(&back, run, "envelope round-trip in {}", run.state.name());
            bytes = Some(text.len());
        }
        let now = self.sim.clock.last_fed();
        let mut s = self.sim.lock();
        let mut sending = false;
        if let Some(previous) = &s.last_saved {
            // The driver may leave out saves of per-file steps: `seq` only has to advance.
            if run.seq <= previous.seq {
                return Err(StoreError::Conflict {
                    expected: previous.seq,
                });
            }
            if let (SyncState::KickingOffImport(p), SyncState::KickingOffImport(n)) =
                (&previous.state, &run.state)
            {
                sending = p.sent_at.is_none() && n.sent_at.is_some();
            }
            if sending {
                // The `Sending` step follows the run that asked for the effect directly.
                let id = EffectId::Run { seq: run.seq - 1 };
                s.sendings.push((Input::Sending { id }, run.seq));
            }
        }
        s.trace.push(Trace::Saved {
            seq: run.seq,
            phase: run.state.name(),
            sending,
            bytes,
        });
        if s.record_saves {
            s.saves.push((now, run.clone()));
        }
        s.last_saved = Some(run.clone());
        Ok(bytes.unwrap_or(0) as u64)
    }
}

// =============================================================================================
// The harness.

#[derive(Clone, Debug)]
pub struct Options {
    /// Calls of `next` before the run counts as not terminating.
    pub max_steps: usize,
    /// Stop the drive gracefully (its `stop` condition: effects in flight finish) after these
    /// numbers of accepted events, and drive on from the stored envelope.
    pub reload_at: ReloadAt,
    /// Crash once the accepted events reach each of these counts (at the next moment the
    /// driver waits for its effects): the effects in flight are lost, performed or not, and
    /// the run is reloaded from the stored envelope.
    pub crash_at: Vec<usize>,
    pub crash_seed: u64,
    /// Each drive may start effects for this long (virtual ms), as one Lambda invocation;
    /// the next continues from the stored envelope.
    pub budget_ms: Option<u64>,
    /// Waits up to this long are slept in the drive; longer ones end it (`Sleeping`), and the
    /// next drive starts at the wake-up from the stored envelope.
    pub max_sleep: Duration,
    /// Check `decode(encode(run)) == run` on every save.
    pub check_roundtrip: bool,
    /// At the end, re-deliver every accepted input (results, cancels, `Sending` records) to
    /// every run saved after the one it produced, and expect refusal.
    pub check_redelivery: bool,
    /// Cancel the run after this many accepted inputs (stop, `driver::cancel`, drive on).
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
    /// After these accepted-event counts.
    Steps(Vec<usize>),
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_steps: 200_000,
            reload_at: ReloadAt::Never,
            crash_at: Vec::new(),
            crash_seed: 0,
            budget_ms: None,
            max_sleep: Duration::MAX,
            check_roundtrip: false,
            check_redelivery: false,
            cancel_after: None,
            backwards: None,
            record_states: true,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub run: SyncRun,
    pub terminal: Terminal,
    pub started: Timestamp,
    pub ended: Timestamp,
    pub events: Vec<Event>,
    /// Calls of `next` by the driver's loop.
    pub steps: usize,
    /// Results refused because an earlier one moved the run to another phase.
    pub refused_in_batch: usize,
    /// Every `SleepUntil` seen, with the `now` it was asked at.
    pub sleeps: Vec<(Timestamp, Timestamp)>,
    /// Effects performed whose answers a crash lost.
    pub lost: Vec<(Request, EffectResult)>,
    /// Calls of the driver.
    pub drives: usize,
    /// Hard crashes.
    pub crashes: usize,
    pub trace: Vec<Trace>,
}

pub const CANCEL_REASON: &str = "cancelled by the operator";

/// Runs `run` to its end through the production driver, answering effects from `world`.
pub fn drive(run: SyncRun, world: &mut World, opts: &Options) -> Outcome {
    let started = run.started_at;
    let clock = Arc::new(VirtualClock::new(started, opts.backwards));
    let sim = Sim::new(world.clone(), clock.clone(), opts.record_states);
    sim.crash_at(opts.crash_at.iter().copied(), opts.crash_seed);
    let mut store = sim.store(opts.check_roundtrip, opts.check_redelivery);
    store.put(&run);
    let mut run = run;
    let mut next_reload = match &opts.reload_at {
        ReloadAt::Never => None,
        ReloadAt::Every => Some(1),
        ReloadAt::Steps(at) => at.iter().copied().min(),
    };
    let mut cancel_at = opts.cancel_after;
    let (mut drives, mut crashes) = (0usize, 0usize);
    let terminal = loop {
        drives += 1;
        assert!(
            drives <= opts.max_steps,
            "{drives} drives without an end; phase {}",
            run.state.name()
        );
        let budget_until = opts.budget_ms.map(|b| clock.real().plus_ms(b.max(1)));
        let options = DriveOptions::new(opts.max_sleep, budget_until).with_clock(clock.clone());
        let stop = |run: &SyncRun| {
            let events = sim.event_count();
            sim.steps() >= opts.max_steps
                || next_reload.is_some_and(|at| events >= at)
                || cancel_at.is_some_and(|at| events >= at && !run.is_done())
        };
        let driven = sim.run(driver::drive_until(
            run,
            &sim,
            &mut store,
            &options,
            &sim,
            sim.crash_signal(),
            stop,
        ));
        let (latest, stopped) = match driven {
            Ok(x) => x,
            Err(e) => panic!("the simulation's store refused a save: {e}"),
        };
        run = latest;
        if stopped != Stopped::Interrupted {
            sim.settled();
        }
        match stopped {
            Stopped::Done(terminal) => break *terminal,
            Stopped::Sleeping { until } => {
                clock.advance_to(until);
                run = store.reload();
            }
            Stopped::OutOfBudget => run = store.reload(),
            Stopped::Interrupted => {
                if sim.take_crash() {
                    crashes += 1;
                    run = store.reload();
                    continue;
                }
                let events = sim.event_count();
                assert!(
                    sim.steps() < opts.max_steps,
                    "no termination after {} steps; phase {}, virtual time {} s",
                    opts.max_steps,
                    run.state.name(),
                    started.until(clock.real()) / 1000
                );
                if cancel_at.is_some_and(|at| events >= at) && !run.is_done() {
                    cancel_at = None;
                    let cancelled = sim.run(driver::cancel(
                        &run,
                        &mut store,
                        CANCEL_REASON,
                        clock.as_ref(),
                    ));
                    match cancelled {
                        Ok(Some(c)) => {
                            sim.record_cancel(&c, CANCEL_REASON);
                            run = c;
                        }
                        Ok(None) => panic!("cancel refused in {}", run.state.name()),
                        Err(e) => panic!("the simulation's store refused a save: {e}"),
                    }
                }
                if next_reload.is_some_and(|at| events >= at) {
                    next_reload = match &opts.reload_at {
                        ReloadAt::Never => None,
                        ReloadAt::Every => Some(events + 1),
                        ReloadAt::Steps(at) => at.iter().copied().filter(|a| *a > events).min(),
                    };
                    run = store.reload();
                }
            }
        }
    };
    let ended = clock.real();
    let s = sim.finish();
    *world = s.world;
    if opts.check_redelivery {
        check_redelivery(&s.events, &s.sendings, &s.saves);
    }
    for (request, why, phase) in &s.rejected {
        // Only results of a batch whose phase ended early may be refused.
        let own_phase = match request.id {
            EffectId::File { .. } => "staging_files",
            EffectId::Deletions { .. } => "applying_deletions",
            EffectId::Run { .. } => "",
        };
        assert!(
            !own_phase.is_empty() && *phase != own_phase,
            "result for {:?} refused in {phase}: {why}",
            request.id
        );
    }
    Outcome {
        run,
        terminal,
        started,
        ended,
        events: s.events,
        steps: s.steps,
        refused_in_batch: s.rejected.len(),
        sleeps: s.sleeps,
        lost: s.lost,
        drives,
        crashes,
        trace: s.trace,
    }
}

/// Every accepted input, delivered again to every run saved after the one it produced, is
/// refused (`step` returns `Err`, so the run is unchanged). (The run it produced itself may
/// take it: a second cancel while cleaning up after the first skips the clean-up.)
fn check_redelivery(events: &[Event], sendings: &[(Input, u64)], saves: &[(Timestamp, SyncRun)]) {
    let inputs = events
        .iter()
        .map(|e| (&e.input, e.seq))
        .chain(sendings.iter().map(|(i, seq)| (i, *seq)));
    for (input, seq) in inputs {
        for (now, later) in saves.iter().filter(|(_, r)| r.seq > seq) {
            assert!(
                later.step(input.clone(), *now).is_err(),
                "re-delivered {input:?} was accepted in {} (seq {})",
                later.state.name(),
                later.seq
            );
        }
    }
}

/// How many effects that a crash lost answered `matches`.
fn lost_where(outcome: &Outcome, matches: impl Fn(&Request, &EffectResult) -> bool) -> u32 {
    outcome.lost.iter().filter(|(q, r)| matches(q, r)).count() as u32
}

/// Checks what every run must satisfy at its end, whatever the plan:
/// - Succeeded: every `output[]` file is in the import request exactly once (and nothing
///   else is), every file of the manifest was staged, every `deleted[]` file's deletions were
///   applied once when configured, and the watermark is this run's transactionTime;
/// - Failed in staging: the reason names a file the plan made fail, or the fatal outcome;
/// - Failed or Cancelled: the watermark is the one the run started with;
/// - always: no file staged twice, no export kicked off again once one was accepted, no
///   import naming a file twice, and with `IMPORT_MODE=append` never a second import.
///
/// An effect whose answer a crash lost (`Outcome::lost`) may have been performed once more:
/// each such answer allows exactly one repeat of what it did.
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
    let lost_staged = |k: &str| {
        lost_where(outcome, |q, r| {
            matches!(&q.effect, Effect::StageFile { key, .. } if key.0 == k)
                && matches!(r, EffectResult::FileStaged { .. })
        })
    };
    // No staged file downloaded twice (but for a repeat of a write whose answer was lost).
    for (k, n) in &world.staged {
        assert!(
            *n <= 1 + lost_staged(k),
            "{k} staged {n} times ({} answer(s) lost)",
            lost_staged(k)
        );
    }
    // No export kicked off again once one was accepted (unless that answer was lost).
    let lost_exports = lost_where(outcome, |_, r| {
        matches!(r, EffectResult::ExportAccepted { .. })
    });
    assert!(
        world.exports_accepted <= 1 + lost_exports,
        "{} exports accepted ({lost_exports} answer(s) lost)",
        world.exports_accepted
    );
    // No import names a file twice; with IMPORT_MODE=append, there is at most one import.
    for (_, body) in &world.accepted_imports {
        let urls = urls_of(body);
        let distinct: BTreeSet<&String> = urls.iter().collect();
        assert_eq!(
            distinct.len(),
            urls.len(),
            "an import names a file twice: {urls:?}"
        );
    }
    if spec.target.import_mode == ImportMode::Append {
        assert!(
            world.accepted_imports.len() <= 1,
            "IMPORT_MODE=append imported {} times",
            world.accepted_imports.len()
        );
    }
    match &outcome.terminal {
        Terminal::Succeeded(summary) => {
            assert_eq!(summary.files as usize, plan.files.len());
            for i in 0..plan.files.len() {
                assert_eq!(
                    world.staged.get(&key(i)).copied(),
                    Some(1 + lost_staged(&key(i))),
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
                        let lost = lost_where(outcome, |q, r| {
                            matches!(&q.effect, Effect::ApplyDeletions { index, .. } if *index as usize == i)
                                && matches!(r, EffectResult::DeletionsApplied { .. })
                        });
                        assert_eq!(
                            world.deletions_applied.get(&(i as u32)).copied(),
                            Some(1 + lost)
                        );
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
    let lost_deletes = lost_where(outcome, |q, _| {
        matches!(q.effect, Effect::DeleteExportJob { .. })
    });
    if accepted_export && !skipped_by_cancel {
        let expected = u32::from(!kept_for_retry);
        assert!(
            world.export_job_deletes >= expected
                && world.export_job_deletes <= expected + lost_deletes,
            "the export job is deleted once (unless kept for a retry): {} DELETE(s), {lost_deletes} lost",
            world.export_job_deletes
        );
    }
    if !accepted_export {
        assert_eq!(world.export_job_deletes, lost_deletes);
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
