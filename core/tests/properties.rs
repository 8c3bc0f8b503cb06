//! Properties of the retry arithmetic over random policies:
//!
//! - backoff is monotone up to its cap and never above it;
//! - a failure's delay lies between the backoff and the `Retry-After` clamp;
//! - a poll's delay lies within its bounds.
//!
//! The properties of whole runs (round-trips, reloads, crashes, redelivery, termination,
//! time moving backwards, accounting) drive the production driver and live in the runners'
//! tests: `runners/tests/properties.rs`, with the runner parity in `runners/tests/parity.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pathling_import_core::retry::{
    backoff_base_ms, backoff_ms, failure_delay_ms, poll_delay_ms, Failure, MIN_POLL_MS,
};
use pathling_import_core::spec::PhasePolicy;
use pathling_import_core::Timestamp;
use proptest::prelude::*;

/// `cases` unless `PROPTEST_CASES` asks for another number (for a longer hunt).
fn config(cases: u32) -> ProptestConfig {
    let default = ProptestConfig::default();
    ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            default.cases
        } else {
            cases
        },
        max_shrink_iters: 2_000,
        ..default
    }
}

// =============================================================================================
// Retry arithmetic.

fn policy() -> impl Strategy<Value = PhasePolicy> {
    (
        0u32..50,
        0u64..10_000_000,
        1.0f64..10.0,
        prop::option::of(0u64..100_000_000),
    )
        .prop_map(|(times, wait_ms, back_off, timeout_ms)| PhasePolicy {
            times,
            wait_ms,
            back_off,
            timeout_ms,
        })
}

proptest! {
    #![proptest_config(config(1024))]

    /// The backoff (with its deterministic jitter) never decreases from one failure to the
    /// next while the un-jittered base is below the cap, and never exceeds the cap
    /// (the phase's wait). The base itself is monotone throughout.
    #[test]
    fn backoff_is_monotone_until_the_cap_and_never_above_it(
        policy in policy(),
        key in any::<u64>(),
    ) {
        let cap = policy.wait_ms;
        for n in 1u32..70 {
            let (b, b_next) = (backoff_base_ms(&policy, n), backoff_base_ms(&policy, n + 1));
            prop_assert!(b <= b_next, "base {b} then {b_next}");
            let (d, d_next) = (backoff_ms(&policy, n, key), backoff_ms(&policy, n + 1, key));
            prop_assert!(d <= cap && d_next <= cap, "{d}/{d_next} above cap {cap}");
            if b_next < cap {
                prop_assert!(d <= d_next, "failure {n}: {d} then {d_next} below the cap {cap}");
            }
            // Jitter only ever shortens, by at most a quarter.
            prop_assert!(d <= b && d as f64 >= b as f64 * 0.75 - 1.0);
        }
    }

    /// A failure's delay is the backoff or the server's (clamped) `Retry-After`, whichever is
    /// longer: never more than both bounds, never less than the backoff.
    #[test]
    fn failure_delay_is_bounded_by_backoff_and_clamp(
        policy in policy(),
        key in any::<u64>(),
        n in 1u32..40,
        ra in prop::option::of(prop_oneof![
            (0u64..100_000).prop_map(|s| s.to_string()),
            (1_700_000_000u64..99_999_999_999).prop_map(|s| s.to_string()),
            Just("soon".to_string()),
        ]),
        ra_max in 1_000u64..86_400_000,
        now in 1_600_000_000_000u64..2_000_000_000_000,
    ) {
        let f = Failure::http(429, "slow down").with_retry_after(ra);
        let d = failure_delay_ms(&policy, n, key, &f, ra_max, Timestamp(now));
        let backoff = backoff_ms(&policy, n, key);
        prop_assert!(d >= backoff);
        prop_assert!(d <= backoff.max(ra_max));
    }

    /// A poll waits at least the minimum and at most the larger of the schedule and the clamp.
    #[test]
    fn poll_delay_is_within_bounds(
        policy in policy(),
        poll in 0u32..200,
        ra in prop::option::of((0u64..99_999_999_999).prop_map(|s| s.to_string())),
        ra_max in 1_000u64..86_400_000,
        now in 0u64..4_000_000_000_000,
        throttled in any::<bool>(),
    ) {
        let d = poll_delay_ms(&policy, poll, ra.as_deref(), ra_max, Timestamp(now), throttled);
        // After a 429 every wait is doubled, so the client stays clear of the server's limit.
        let factor = if throttled { 2 } else { 1 };
        prop_assert!(d >= MIN_POLL_MS * factor);
        prop_assert!(d <= ra_max.max(7 * 86_400_000).max(MIN_POLL_MS) * factor);
        if ra.is_some() {
            prop_assert!(d <= ra_max.max(MIN_POLL_MS) * factor);
        }
        if throttled {
            let plain = poll_delay_ms(&policy, poll, ra.as_deref(), ra_max, Timestamp(now), false);
            prop_assert_eq!(d, plain * 2);
        }
    }
}
