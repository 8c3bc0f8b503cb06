//! Helpers shared by the core's integration tests: specs built through the real configuration
//! parser, result constructors, builders that walk a run into each phase, an HTTP-date
//! formatter and a small seeded PRNG. (The simulation — the fake world driven by the
//! production driver — lives in the runners' tests: `runners/tests/common/sim.rs`.)
//!
//! Every test binary compiles this module and uses a different part of it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use pathling_import_core::bulk::{FileKind, OutcomeSummary};
use pathling_import_core::config::{self, RawConfig};
use pathling_import_core::effect::{EffectId, EffectResult, Input, ManifestDigest, Next, Request};
use pathling_import_core::retry::{Failure, FailureKind};
use pathling_import_core::spec::RunSpec;
use pathling_import_core::state::SyncState;
use pathling_import_core::{Rejected, SyncRun, Timestamp, Watermark};

/// A fixed "now" for tests: 2027-01-15T08:00:00Z.
pub const T0: Timestamp = Timestamp(1_800_000_000_000);
pub const RUN_ID: &str = "run-1";
pub const SOURCE: &str = "https://source.example.org/fhir";
pub const TARGET: &str = "https://pathling.example.org/fhir";
pub const STATUS_URL: &str = "https://source.example.org/fhir/$export-status?job=42";
pub const JOB_URL: &str = "https://pathling.example.org/fhir/$job?id=7f1c";
pub const TRANSACTION_TIME: &str = "2027-01-15T07:59:00.000Z";

/// The smallest valid environment, without authentication (the machine never sees secrets).
const MINIMAL: &[(&str, &str)] = &[
    ("SOURCE_ENDPOINT", SOURCE),
    ("SOURCE_AUTHENTICATION_ENABLED", "false"),
    ("STAGING_URL", "s3://staging-bucket/sync/"),
    ("TARGET_ENDPOINT", TARGET),
    ("TARGET_AUTHENTICATION_ENABLED", "false"),
];

/// A spec from the minimal environment plus `extra` (later keys win), through the real parser.
pub fn spec_with(extra: &[(&str, &str)]) -> RunSpec {
    let mut vars: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    for (k, v) in MINIMAL.iter().chain(extra.iter()) {
        vars.insert(k.to_string(), v.to_string());
    }
    match config::parse(&RawConfig::from_env(vars, &[]), &[]) {
        Ok(c) => c.spec,
        Err(e) => panic!("test configuration is invalid: {e}"),
    }
}

/// The default spec (seed defaults: 24 retries, 900 s waits, back-off 1.0).
pub fn spec() -> RunSpec {
    spec_with(&[])
}

pub fn start(spec: RunSpec) -> SyncRun {
    SyncRun::start(RUN_ID, spec, None, T0).unwrap()
}

pub fn start_with_watermark(spec: RunSpec, transaction_time: &str) -> SyncRun {
    let mark = Watermark {
        transaction_time: transaction_time.to_string(),
        run_id: "run-0".to_string(),
    };
    SyncRun::start(RUN_ID, spec, Some(mark), T0).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Asking and answering.

/// The requests `next` asks for at `now`; panics on anything else.
pub fn requests(run: &SyncRun, now: Timestamp) -> Vec<Request> {
    match run.next(now) {
        Next::Run { requests } => {
            assert!(!requests.is_empty(), "Next::Run must never be empty");
            requests
        }
        other => panic!("expected Next::Run in {}, got {other:?}", run.state.name()),
    }
}

/// The one request of a run-level phase.
pub fn single(run: &SyncRun, now: Timestamp) -> Request {
    let mut r = requests(run, now);
    assert_eq!(r.len(), 1, "a run-level phase asks for exactly one effect");
    r.remove(0)
}

/// The time `next` says to sleep until; panics on anything else.
pub fn sleep_until(run: &SyncRun, now: Timestamp) -> Timestamp {
    match run.next(now) {
        Next::SleepUntil { until, .. } => {
            assert!(until > now, "a wake-up must lie in the future");
            until
        }
        other => panic!("expected SleepUntil, got {other:?}"),
    }
}

pub fn completed(id: EffectId, result: EffectResult) -> Input {
    Input::Completed { id, result }
}

/// Answers the single pending run-level request with `result`.
pub fn answer(run: &SyncRun, result: EffectResult, now: Timestamp) -> SyncRun {
    let req = single(run, now);
    step_ok(run, req.id, result, now)
}

pub fn step_ok(run: &SyncRun, id: EffectId, result: EffectResult, now: Timestamp) -> SyncRun {
    match run.step(completed(id, result.clone()), now) {
        Ok(next) => {
            assert_eq!(
                next.seq,
                run.seq + 1,
                "an accepted input moves seq on by one"
            );
            next
        }
        Err(e) => panic!(
            "{result:?} for {id:?} rejected in {}: {e}",
            run.state.name()
        ),
    }
}

/// Steps an input that must be refused, and checks that the refusal changed nothing.
pub fn refused(run: &SyncRun, input: Input, now: Timestamp) -> Rejected {
    let before = run.clone();
    let err = match run.step(input.clone(), now) {
        Err(e) => e,
        Ok(next) => panic!(
            "{input:?} was accepted in {}; now {}",
            run.state.name(),
            next.state.name()
        ),
    };
    assert_eq!(run, &before, "a refused input changes nothing");
    assert_eq!(run.next(now), before.next(now));
    err
}

// ---------------------------------------------------------------------------------------------
// Results.

pub fn export_accepted() -> EffectResult {
    EffectResult::ExportAccepted {
        status_url: STATUS_URL.into(),
    }
}

pub fn export_in_progress(retry_after: Option<&str>) -> EffectResult {
    EffectResult::ExportInProgress {
        progress: Some("45% complete".into()),
        retry_after: retry_after.map(str::to_string),
    }
}

pub fn digest(files: &[(FileKind, &str)]) -> ManifestDigest {
    ManifestDigest {
        transaction_time: TRANSACTION_TIME.into(),
        files: files.iter().map(|(k, t)| (*k, t.to_string())).collect(),
        duplicates: 0,
        files_hash: None,
    }
}

pub fn export_completed(files: &[(FileKind, &str)]) -> EffectResult {
    EffectResult::ExportCompleted {
        digest: digest(files),
    }
}

pub fn file_staged() -> EffectResult {
    EffectResult::FileStaged {
        bytes: 1_000,
        resources: 10,
        newline_added: false,
        outcomes: None,
    }
}

/// An `error[]` file staged with its OperationOutcomes folded.
pub fn error_file_staged(lines: &[&str]) -> EffectResult {
    let mut summary = OutcomeSummary::default();
    for line in lines {
        summary.add_line(line.as_bytes());
    }
    EffectResult::FileStaged {
        bytes: 200,
        resources: lines.len() as u64,
        newline_added: true,
        outcomes: Some(summary),
    }
}

pub const FATAL_OUTCOME: &str = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"fatal","code":"exception","diagnostics":"Observation export aborted"}]}"#;
pub const WARNING_OUTCOME: &str = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"warning","code":"processing","diagnostics":"Patient/9 skipped"}]}"#;

pub fn failed(f: Failure) -> EffectResult {
    EffectResult::Failed(f)
}

pub fn http(status: u16, message: &str) -> EffectResult {
    failed(Failure::http(status, message))
}

/// A 5xx whose OperationOutcome says `transient`.
pub fn transient_outcome(status: u16) -> Failure {
    Failure::new(
        FailureKind::Http {
            status,
            transient_outcome: true,
            outcome: true,
        },
        "OperationOutcome: transient: try again later",
    )
}

/// What a finished Pathling 9.2+ job answers: the import result `Parameters`.
pub fn import_completed() -> EffectResult {
    EffectResult::ImportCompleted {
        answer: pathling_import_core::pathling::read_import_answer(
            br#"{"resourceType":"Parameters","parameter":[]}"#,
        ),
    }
}

pub fn network() -> EffectResult {
    failed(Failure::new(
        FailureKind::Network,
        "connection reset by peer",
    ))
}

// ---------------------------------------------------------------------------------------------
// Walking a run into each phase (all at T0).

pub fn polling_export(spec: RunSpec) -> SyncRun {
    answer(&start(spec), export_accepted(), T0)
}

pub fn staging(spec: RunSpec, files: &[(FileKind, &str)]) -> SyncRun {
    assert!(!files.is_empty());
    let run = answer(&polling_export(spec), export_completed(files), T0);
    assert!(matches!(run.state, SyncState::StagingFiles(_)));
    run
}

/// Answers every staging request with success until the run leaves `StagingFiles`.
pub fn stage_all(run: &SyncRun, now: Timestamp) -> SyncRun {
    let mut run = run.clone();
    while let SyncState::StagingFiles(_) = run.state {
        for req in requests(&run, now) {
            run = step_ok(&run, req.id, file_staged(), now);
        }
    }
    run
}

pub fn kicking_off_import(spec: RunSpec, files: &[(FileKind, &str)]) -> SyncRun {
    let run = stage_all(&staging(spec, files), T0);
    assert!(
        matches!(run.state, SyncState::KickingOffImport(_)),
        "{}",
        run.state.name()
    );
    run
}

/// Detects (when `auto`) a 9.x server, then has the import accepted.
pub fn polling_import(spec: RunSpec, files: &[(FileKind, &str)]) -> SyncRun {
    import_accepted(kicking_off_import(spec, files))
}

/// From `KickingOffImport`: detects (when `auto`) a 9.x server, then has the import accepted.
pub fn import_accepted(run: SyncRun) -> SyncRun {
    let mut run = run;
    if let pathling_import_core::effect::Effect::DetectPathling = single(&run, T0).effect {
        run = answer(
            &run,
            EffectResult::PathlingDetected {
                api: Some(pathling_import_core::spec::PathlingApi::V9),
                version: Some("9.8.0+abc".into()),
            },
            T0,
        );
    }
    let run = answer(
        &run,
        EffectResult::ImportAccepted {
            job_url: JOB_URL.into(),
        },
        T0,
    );
    assert!(matches!(run.state, SyncState::PollingImport(_)));
    run
}

/// The `file_key` of file `index` as the spec lays it out.
pub fn key_of(run: &SyncRun, index: u32, kind: FileKind, type_name: &str) -> String {
    run.spec
        .staging
        .file_key(&run.run_id, index, kind, type_name)
        .0
}

// ---------------------------------------------------------------------------------------------
// HTTP-dates and a PRNG.

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Formats an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the HTTP-date of `Retry-After`.
pub fn http_date(t: Timestamp) -> String {
    let secs = t.0 / 1000;
    let days = secs / 86_400;
    let sod = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // 1970-01-01 was a Thursday.
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    format!(
        "{weekday}, {d:02} {} {y} {:02}:{:02}:{:02} GMT",
        MONTHS[(m - 1) as usize],
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

/// splitmix64: tiny, seedable, good enough to draw fault plans and latencies.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize].clone()
    }
}
