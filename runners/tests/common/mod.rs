//! Helpers shared by the runners' simulation tests: specs built through the real configuration
//! parser, an HTTP-date formatter, a small seeded PRNG, (in [`sim`]) the fake world and the
//! harness that drives it through the production driver, and (in [`strategies`]) the
//! proptest strategies for fault plans and specs.
//!
//! The core's own tests keep their copy of the first helpers (`core/tests/common`): test
//! crates cannot share modules across packages.
//!
//! Every test binary compiles this module and uses a different part of it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod sim;
pub mod strategies;

use pathling_import_core::config::{self, RawConfig};
use pathling_import_core::effect::EffectResult;
use pathling_import_core::spec::RunSpec;
use pathling_import_core::{SyncRun, Timestamp, Watermark};

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

pub const FATAL_OUTCOME: &str = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"fatal","code":"exception","diagnostics":"Observation export aborted"}]}"#;
pub const WARNING_OUTCOME: &str = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"warning","code":"processing","diagnostics":"Patient/9 skipped"}]}"#;

/// What a finished Pathling 9.2+ job answers: the import result `Parameters`.
pub fn import_completed() -> EffectResult {
    EffectResult::ImportCompleted {
        answer: pathling_import_core::pathling::read_import_answer(
            br#"{"resourceType":"Parameters","parameter":[]}"#,
        ),
    }
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
