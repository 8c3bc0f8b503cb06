//! Failures as facts, their classification, and every wait the machine schedules.
//!
//! Runners report what happened ([`Failure`]); only the core decides whether it is worth
//! another try ([`classify`]) and when ([`backoff_ms`], [`poll_delay_ms`]). Jitter is
//! deterministic — derived from the run id, the operation and the attempt — so a replayed run
//! schedules exactly the same wake-ups.

use crate::spec::PhasePolicy;
use crate::time::{retry_after_delay_ms, Timestamp};
use serde::{Deserialize, Serialize};

/// What went wrong with an effect, as observed by the executor. Never carries a secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    /// The raw `Retry-After` header, when the server sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<String>,
    /// Human-readable detail (status line, OperationOutcome diagnostics, I/O error).
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FailureKind {
    /// The connection broke (reset, closed mid-answer) or could not be made for another
    /// reason than the three below.
    Network,
    /// The host name did not resolve.
    Dns,
    /// The server refused the connection (nothing listens on the port).
    Refused,
    /// The TLS handshake failed: an untrusted or invalid certificate, a protocol mismatch.
    Tls,
    /// No progress within the read timeout, or the connect timeout.
    Timeout,
    /// An HTTP error status. `outcome`: the body was a FHIR OperationOutcome;
    /// `transient_outcome`: one of its issues has code `transient` (Bulk Data's "ask again
    /// later").
    Http {
        status: u16,
        transient_outcome: bool,
        #[serde(default)]
        outcome: bool,
    },
    /// A success status with a body that could not be understood (bad manifest, no
    /// Content-Location, not JSON).
    Undecodable,
    /// The staging store failed; `transient` as the store's client judged it (throttling,
    /// 5xx) versus permanent (access denied, no such bucket).
    Storage { transient: bool },
    /// Something local and permanent: a credential that cannot be loaded, a key that does
    /// not parse.
    Local,
    /// An effect (a file's transfer, reading a paged manifest) was cut because the invocation
    /// running it ended (a Lambda's time budget) before it did. Transient, but retried only
    /// while the failures so far, of any kind, are at most [`UNFINISHED_RETRIES`]: a file that
    /// cannot move within one invocation would otherwise start over in every one, forever.
    Unfinished,
    /// A file's transfer was cut at an invocation's end after it stored more of the file than
    /// it started with (a checkpoint advanced): the next attempt continues from there, so the
    /// attempt is not counted as a failure and is retried at once. It cannot repeat forever:
    /// each one stores more of a file of finite size.
    Paused,
}

impl FailureKind {
    /// A short, stable name for logs and reports.
    pub fn name(&self) -> &'static str {
        match self {
            FailureKind::Network => "network",
            FailureKind::Dns => "dns",
            FailureKind::Refused => "refused",
            FailureKind::Tls => "tls",
            FailureKind::Timeout => "timeout",
            FailureKind::Http { .. } => "http",
            FailureKind::Undecodable => "undecodable",
            FailureKind::Storage { .. } => "storage",
            FailureKind::Local => "local",
            FailureKind::Unfinished => "unfinished",
            FailureKind::Paused => "paused",
        }
    }
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            retry_after: None,
            message: message.into(),
        }
    }
    pub fn http(status: u16, message: impl Into<String>) -> Self {
        Failure::new(
            FailureKind::Http {
                status,
                transient_outcome: false,
                outcome: false,
            },
            message,
        )
    }
    pub fn with_retry_after(mut self, value: Option<String>) -> Self {
        self.retry_after = value;
        self
    }
    pub fn status(&self) -> Option<u16> {
        match self.kind {
            FailureKind::Http { status, .. } => Some(status),
            _ => None,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            FailureKind::Http { status, .. } => write!(f, "HTTP {status}: {}", self.message),
            FailureKind::Network => write!(f, "network error: {}", self.message),
            FailureKind::Dns => write!(f, "host name not found: {}", self.message),
            FailureKind::Refused => write!(f, "connection refused: {}", self.message),
            FailureKind::Tls => write!(f, "TLS error: {}", self.message),
            FailureKind::Timeout => write!(f, "timed out: {}", self.message),
            FailureKind::Undecodable => write!(f, "unexpected answer: {}", self.message),
            FailureKind::Storage { .. } => write!(f, "staging store: {}", self.message),
            FailureKind::Local => f.write_str(&self.message),
            FailureKind::Unfinished => write!(f, "unfinished: {}", self.message),
            FailureKind::Paused => write!(f, "paused: {}", self.message),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Transient,
    Permanent,
}

/// 408, 429, 5xx, network errors, timeouts and Bulk Data `transient` outcomes are worth
/// another try (Pathling's 503 "another import in progress" among them); other 4xx and
/// undecodable answers are not. A 5xx other than 503 whose body is an OperationOutcome
/// without a `transient` issue is the server's considered answer (Bulk Data: "the export
/// failed"), not a hiccup: it is permanent. A TLS failure (an untrusted certificate) does not
/// heal by waiting.
pub fn classify(f: &Failure) -> Verdict {
    match f.kind {
        FailureKind::Network
        | FailureKind::Timeout
        | FailureKind::Dns
        | FailureKind::Refused
        | FailureKind::Unfinished
        | FailureKind::Paused => Verdict::Transient,
        FailureKind::Tls => Verdict::Permanent,
        FailureKind::Http {
            status,
            transient_outcome,
            outcome,
        } => {
            let asked_to_retry = transient_outcome || matches!(status, 408 | 429 | 503);
            let unexplained_5xx = (500..600).contains(&status) && !outcome;
            if asked_to_retry || unexplained_5xx {
                Verdict::Transient
            } else {
                Verdict::Permanent
            }
        }
        FailureKind::Storage { transient: true } => Verdict::Transient,
        FailureKind::Storage { transient: false }
        | FailureKind::Undecodable
        | FailureKind::Local => Verdict::Permanent,
    }
}

/// Retries after an unresolvable host name or a refused connection: enough to ride out a
/// restart or a resolver hiccup, not hours against a typo in an endpoint.
pub const FAST_FAIL_RETRIES: u32 = 3;

/// Retries after an invocation's end cut an effect ([`FailureKind::Unfinished`]), counting the
/// effect's earlier failures of any kind: a first attempt may have started late in an
/// invocation, a third is not going to fit either.
pub const UNFINISHED_RETRIES: u32 = 2;

/// How many times a transient failure of this kind is retried under `policy`.
pub fn retry_limit(f: &Failure, policy: &PhasePolicy) -> u32 {
    match f.kind {
        FailureKind::Dns | FailureKind::Refused => policy.times.min(FAST_FAIL_RETRIES),
        FailureKind::Unfinished => policy.times.min(UNFINISHED_RETRIES),
        _ => policy.times,
    }
}

/// The first backoff after a transient failure; it doubles per consecutive failure.
pub const BACKOFF_BASE_MS: u64 = 1_000;
/// Poll no faster than this, whatever a server says: obeying `Retry-After: 1` exactly meets
/// a limit of 60 requests a minute and leaves no room for any other request (the SMART
/// reference server then blocks the client for minutes).
pub const MIN_POLL_MS: u64 = 2_000;
/// Without `*_TIMEOUT`, a phase may take at least this long whatever the poll interval: the
/// server sets the pace with `Retry-After`, so a short `*_RETRY_WAIT` must not shorten the
/// patience (24 polls of 1 s would give up on any export longer than half a minute).
pub const MIN_DEFAULT_PATIENCE_MS: u64 = 3_600_000;
/// Jitter shortens a wait by at most a quarter: with a doubling base, jittered waits stay
/// monotone until the cap.
const JITTER_SPAN: f64 = 0.25;

/// FNV-1a: a stable, dependency-free hash for deterministic jitter.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(std::iter::once(&0xff)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The un-jittered backoff before retry number `failures` (1-based), capped at the phase's
/// wait (an explicit 0 retries at once).
pub fn backoff_base_ms(policy: &PhasePolicy, failures: u32) -> u64 {
    let exp = failures.saturating_sub(1).min(40);
    BACKOFF_BASE_MS
        .saturating_mul(1u64 << exp)
        .min(policy.wait_ms)
}

/// The backoff with deterministic jitter in `(1 - JITTER_SPAN) × base ..= base`.
pub fn backoff_ms(policy: &PhasePolicy, failures: u32, jitter_key: u64) -> u64 {
    let base = backoff_base_ms(policy, failures);
    let h = stable_hash(&[&jitter_key.to_le_bytes(), &failures.to_le_bytes()]);
    let fraction = (h % 10_001) as f64 / 10_000.0;
    let factor = 1.0 - JITTER_SPAN * fraction;
    (base as f64 * factor).round() as u64
}

/// The wait before poll number `poll + 1` of a running job: the server's `Retry-After` when
/// it gave one (clamped to `[MIN_POLL_MS, retry_after_max_ms]`), else the original's schedule
/// `wait × back_off^poll`; doubled for the rest of the phase once the server has answered
/// `429` (`throttled`), so the client stays clear of its limit.
pub fn poll_delay_ms(
    policy: &PhasePolicy,
    poll: u32,
    retry_after: Option<&str>,
    retry_after_max_ms: u64,
    now: Timestamp,
    throttled: bool,
) -> u64 {
    let scheduled = schedule_ms(policy, poll);
    let chosen = retry_after
        .and_then(|v| retry_after_delay_ms(v, now))
        .map(|ms| ms.min(retry_after_max_ms))
        .unwrap_or(scheduled)
        .max(MIN_POLL_MS);
    if throttled {
        chosen.saturating_mul(2)
    } else {
        chosen
    }
}

/// Honours a failure's `Retry-After` (429, 503) when it asks for longer than the backoff.
pub fn failure_delay_ms(
    policy: &PhasePolicy,
    failures: u32,
    jitter_key: u64,
    failure: &Failure,
    retry_after_max_ms: u64,
    now: Timestamp,
) -> u64 {
    let backoff = backoff_ms(policy, failures, jitter_key);
    let hinted = failure
        .retry_after
        .as_deref()
        .and_then(|v| retry_after_delay_ms(v, now))
        .map(|ms| ms.min(retry_after_max_ms))
        .unwrap_or(0);
    backoff.max(hinted)
}

fn schedule_ms(policy: &PhasePolicy, i: u32) -> u64 {
    let factor = policy.back_off.max(1.0).powi(i.min(1000) as i32);
    let ms = policy.wait_ms as f64 * factor;
    if ms.is_finite() && ms < 7.0 * 86_400_000.0 {
        ms as u64
    } else {
        7 * 86_400_000
    }
}

/// How long a phase may take in all: the configured timeout, or the original's total
/// patience `Σ max(wait × back_off^i, MIN_POLL_MS)` over `i < times`, but at least
/// [`MIN_DEFAULT_PATIENCE_MS`] (an explicit `times = 0` still means "one attempt only").
pub fn patience_ms(policy: &PhasePolicy) -> u64 {
    policy.timeout_ms.unwrap_or_else(|| {
        if policy.times == 0 {
            return 0;
        }
        (0..policy.times)
            .fold(0u64, |acc, i| {
                acc.saturating_add(schedule_ms(policy, i).max(MIN_POLL_MS))
            })
            .max(MIN_DEFAULT_PATIENCE_MS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(times: u32, wait_s: u64, back_off: f64) -> PhasePolicy {
        PhasePolicy {
            times,
            wait_ms: wait_s * 1000,
            back_off,
            timeout_ms: None,
        }
    }

    #[test]
    fn an_unfinished_transfer_is_tried_again_only_twice() {
        let cut = Failure::new(FailureKind::Unfinished, "the invocation ended");
        assert_eq!(classify(&cut), Verdict::Transient);
        assert_eq!(retry_limit(&cut, &policy(24, 1, 1.0)), UNFINISHED_RETRIES);
        assert_eq!(retry_limit(&cut, &policy(1, 1, 1.0)), 1);
        assert_eq!(cut.to_string(), "unfinished: the invocation ended");
        assert_eq!(cut.kind.name(), "unfinished");
    }

    #[test]
    fn classification() {
        let t = |s| classify(&Failure::http(s, ""));
        assert_eq!(t(408), Verdict::Transient);
        assert_eq!(t(429), Verdict::Transient);
        assert_eq!(t(503), Verdict::Transient);
        assert_eq!(t(404), Verdict::Permanent);
        assert_eq!(t(400), Verdict::Permanent);
        let oo = |status, transient_outcome| {
            classify(&Failure::new(
                FailureKind::Http {
                    status,
                    transient_outcome,
                    outcome: true,
                },
                "",
            ))
        };
        assert_eq!(oo(400, true), Verdict::Transient);
        // The SMART reference server's kick-off 500 with code `processing`: fail fast.
        assert_eq!(oo(500, false), Verdict::Permanent);
        assert_eq!(oo(500, true), Verdict::Transient);
        assert_eq!(oo(503, false), Verdict::Transient, "503 stays retryable");
        assert_eq!(t(500), Verdict::Transient, "a 500 without an outcome");
        assert_eq!(
            classify(&Failure::new(FailureKind::Tls, "")),
            Verdict::Permanent
        );
        let p = policy(24, 900, 1.0);
        assert_eq!(retry_limit(&Failure::new(FailureKind::Dns, ""), &p), 3);
        assert_eq!(retry_limit(&Failure::new(FailureKind::Refused, ""), &p), 3);
        assert_eq!(retry_limit(&Failure::new(FailureKind::Network, ""), &p), 24);
        assert_eq!(
            classify(&Failure::new(FailureKind::Undecodable, "")),
            Verdict::Permanent
        );
        assert_eq!(
            classify(&Failure::new(FailureKind::Network, "")),
            Verdict::Transient
        );
    }

    #[test]
    fn seed_patience_is_times_times_wait_but_at_least_an_hour() {
        assert_eq!(patience_ms(&policy(24, 900, 1.0)), 24 * 900_000);
        assert_eq!(patience_ms(&policy(0, 900, 1.0)), 0);
        assert_eq!(patience_ms(&policy(3, 1000, 2.0)), 7_000_000);
        // EXPORT_RETRY_WAIT=1 no longer shrinks the patience to 24 s.
        assert_eq!(patience_ms(&policy(24, 1, 1.0)), MIN_DEFAULT_PATIENCE_MS);
        let explicit = PhasePolicy {
            timeout_ms: Some(30_000),
            ..policy(24, 1, 1.0)
        };
        assert_eq!(patience_ms(&explicit), 30_000);
    }

    #[test]
    fn poll_delay_prefers_retry_after_and_clamps() {
        let p = policy(24, 900, 1.0);
        let now = Timestamp::from_secs(1_800_000_000);
        assert_eq!(poll_delay_ms(&p, 0, None, 3_600_000, now, false), 900_000);
        assert_eq!(
            poll_delay_ms(&p, 0, Some("5"), 3_600_000, now, false),
            5_000
        );
        assert_eq!(
            poll_delay_ms(&p, 0, Some("0"), 3_600_000, now, false),
            MIN_POLL_MS
        );
        // Retry-After: 1 keeps a margin under a 60-a-minute limit.
        assert_eq!(
            poll_delay_ms(&p, 0, Some("1"), 3_600_000, now, false),
            2_000
        );
        assert_eq!(
            poll_delay_ms(&p, 0, Some("1900000000"), 3_600_000, now, false),
            3_600_000
        );
        assert_eq!(
            poll_delay_ms(&p, 0, Some("garbage"), 3_600_000, now, false),
            900_000
        );
    }

    #[test]
    fn after_a_429_polls_are_twice_as_far_apart() {
        let p = policy(24, 900, 1.0);
        let now = Timestamp::from_secs(1_800_000_000);
        assert_eq!(poll_delay_ms(&p, 0, Some("1"), 3_600_000, now, true), 4_000);
        assert_eq!(poll_delay_ms(&p, 3, None, 3_600_000, now, true), 1_800_000);
    }

    #[test]
    fn backoff_is_jittered_within_a_quarter_and_capped() {
        let p = policy(24, 60, 1.0);
        for failures in 1..20 {
            let base = backoff_base_ms(&p, failures);
            let d = backoff_ms(&p, failures, 42);
            assert!(d <= base && d as f64 >= base as f64 * 0.75 - 1.0);
            assert!(d <= 60_000);
        }
        assert_eq!(backoff_ms(&policy(24, 0, 1.0), 5, 1), 0);
    }
}
