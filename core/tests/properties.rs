//! Properties over random fault plans and random specs, driving the simulation of
//! `common/sim.rs`:
//!
//! - every envelope reached round-trips through `persist`;
//! - a crash and reload between any two steps yields the same trace as an uninterrupted run;
//! - re-delivering any earlier (id, result) is refused and changes nothing;
//! - every run terminates within a bound derived from the spec's policies;
//! - backoff is monotone up to its cap and never above it;
//! - no wake-up lies in the past;
//! - `now` moving backwards never panics;
//! - every manifest file is imported/staged, or the run failed naming it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::sim::*;
use common::*;
use pathling_import_core::bulk::FileKind;
use pathling_import_core::effect::{Input, Next};
use pathling_import_core::persist;
use pathling_import_core::retry::{
    backoff_base_ms, backoff_ms, failure_delay_ms, poll_delay_ms, Failure, MIN_POLL_MS,
};
use pathling_import_core::spec::{PathlingApi, PhasePolicy, RunSpec};
use pathling_import_core::state::Terminal;
use pathling_import_core::{SyncRun, Timestamp};
use proptest::prelude::*;

// =============================================================================================
// Strategies.

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        14 => Just(Fault::None),
        6 => (1u32..4).prop_map(Fault::Transient),
        1 => Just(Fault::Permanent),
    ]
}

fn hint() -> impl Strategy<Value = Hint> {
    prop_oneof![
        3 => Just(Hint::None),
        3 => (0u64..60).prop_map(Hint::Delta),
        2 => (0u64..60).prop_map(Hint::HttpDate),
        2 => (0u64..60).prop_map(Hint::Epoch),
        1 => (60u64..3_600).prop_map(Hint::Delta),
        // Far beyond any clamp.
        1 => Just(Hint::Epoch(50_000_000_000)),
    ]
}

fn hiccup() -> impl Strategy<Value = Hiccup> {
    prop_oneof![
        4 => hint().prop_map(Hiccup::InProgress),
        1 => hint().prop_map(Hiccup::TooMany),
        1 => Just(Hiccup::Transient5xx),
        1 => Just(Hiccup::Network),
    ]
}

fn files(
    kind: FileKind,
    types: &'static [&'static str],
    max: usize,
) -> impl Strategy<Value = Vec<PlanFile>> {
    prop::collection::vec(
        (
            prop::sample::select(types),
            fault(),
            fault(),
            prop::bool::weighted(0.2),
            any::<bool>(),
        )
            .prop_map(move |(t, stage, delete, fatal, no_nl)| PlanFile {
                kind,
                type_name: t.to_string(),
                stage,
                delete,
                fatal: fatal && kind == FileKind::Error,
                no_final_newline: no_nl,
            }),
        0..=max,
    )
}

fn plan() -> impl Strategy<Value = Plan> {
    let export = (
        prop_oneof![8 => Just(Fault::None), 4 => (1u32..4).prop_map(Fault::Transient), 1 => Just(Fault::Permanent)],
        prop::collection::vec(hiccup(), 0..5),
        prop::bool::weighted(0.05),
    );
    let manifest = (
        files(
            FileKind::Output,
            &["Patient", "Observation", "Encounter"],
            8,
        ),
        files(FileKind::Deleted, &["Bundle"], 2),
        files(FileKind::Error, &["OperationOutcome"], 1),
    );
    let pathling = (
        prop_oneof![Just(PathlingApi::V9), Just(PathlingApi::V7)],
        prop::bool::weighted(0.7),
        prop_oneof![4 => Just(Fault::None), 1 => (1u32..3).prop_map(Fault::Transient), 1 => Just(Fault::Permanent)],
        0u32..3,
        prop::collection::vec(hint(), 0..4),
        prop::bool::weighted(0.05),
        prop::bool::weighted(0.2),
    );
    (export, manifest, pathling, 0u64..3_000, any::<u64>()).prop_map(
        |((kickoff, hiccups, export_gone), (o, d, e), p, max_latency_ms, seed)| {
            let (
                generation,
                reports_version,
                detect,
                busy,
                import_polls,
                import_fails,
                cleanup_fails,
            ) = p;
            Plan {
                kickoff,
                hiccups,
                export_gone,
                files: o.into_iter().chain(d).chain(e).collect(),
                generation,
                reports_version,
                detect,
                busy,
                import_polls,
                import_fails,
                cleanup_fails,
                max_latency_ms,
                seed,
            }
        },
    )
}

/// One phase's `{PHASE}_RETRY_*` and `{PHASE}_TIMEOUT` settings.
fn phase_policy(phase: &'static str) -> impl Strategy<Value = Vec<(String, String)>> {
    (
        prop_oneof![1 => Just(0u32), 5 => 1u32..10],
        0u32..60,
        prop::sample::select(&["1", "1.5", "2"][..]),
        prop::option::weighted(0.3, prop_oneof![1 => 0u32..60, 3 => 60u32..7_200]),
    )
        .prop_map(move |(times, wait, back_off, timeout)| {
            let mut v = vec![
                (format!("{phase}_RETRY_TIMES"), times.to_string()),
                (format!("{phase}_RETRY_WAIT"), wait.to_string()),
                (format!("{phase}_RETRY_BACK_OFF"), back_off.to_string()),
            ];
            if let Some(t) = timeout {
                v.push((format!("{phase}_TIMEOUT"), t.to_string()));
            }
            v
        })
}

/// A valid configuration (as `config::parse` would accept) over every knob the machine reads.
fn run_spec() -> impl Strategy<Value = RunSpec> {
    (
        phase_policy("EXPORT"),
        phase_policy("TRANSFER"),
        phase_policy("IMPORT"),
        1u32..600,
        1u32..5,
        prop::sample::select(&["auto", "7", "9"][..]),
        any::<bool>(),
        prop::sample::select(&["merge", "overwrite", "append", "ignore"][..]),
        prop::sample::select(&["", "auto", "2026-01-01T00:00:00Z"][..]),
        prop::sample::select(&["system", "patient", "group/g-1"][..]),
    )
        .prop_map(
            |(e, t, i, ra_max, concurrency, api, deletions, mode, since, level)| {
                let mut pairs: Vec<(String, String)> = e.into_iter().chain(t).chain(i).collect();
                pairs.push(("RETRY_AFTER_MAX".into(), ra_max.to_string()));
                pairs.push(("TRANSFER_CONCURRENCY".into(), concurrency.to_string()));
                pairs.push(("PATHLING_API".into(), api.into()));
                // PATHLING_API=7 refuses the 9.x-only settings up front.
                let v7 = api == "7";
                pairs.push(("APPLY_DELETIONS".into(), (deletions && !v7).to_string()));
                pairs.push((
                    "IMPORT_MODE".into(),
                    if v7 && mode != "overwrite" {
                        "merge"
                    } else {
                        mode
                    }
                    .into(),
                ));
                pairs.push(("SINCE".into(), since.into()));
                pairs.push(("EXPORT_LEVEL".into(), level.into()));
                let refs: Vec<(&str, &str)> = pairs
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                spec_with(&refs)
            },
        )
}

/// Plans and specs whose every budget is generous: such runs must succeed unless the plan
/// holds a permanent fault (checked by `Plan::must_succeed`).
fn generous_spec() -> impl Strategy<Value = RunSpec> {
    (prop::sample::select(&["auto", "9"][..]), any::<bool>()).prop_map(|(api, deletions)| {
        spec_with(&[
            ("EXPORT_RETRY_TIMES", "10"),
            ("EXPORT_RETRY_WAIT", "30"),
            ("EXPORT_TIMEOUT", "86400"),
            ("TRANSFER_RETRY_TIMES", "10"),
            ("TRANSFER_RETRY_WAIT", "30"),
            ("TRANSFER_TIMEOUT", "86400"),
            ("IMPORT_RETRY_TIMES", "10"),
            ("IMPORT_RETRY_WAIT", "30"),
            ("IMPORT_TIMEOUT", "86400"),
            ("RETRY_AFTER_MAX", "300"),
            ("PATHLING_API", api),
            ("APPLY_DELETIONS", if deletions { "true" } else { "false" }),
        ])
    })
}

fn start_mark(spec: &RunSpec, mark: bool) -> (SyncRun, Option<&'static str>) {
    if mark {
        (
            start_with_watermark(spec.clone(), "2026-06-01T00:00:00Z"),
            Some("2026-06-01T00:00:00Z"),
        )
    } else {
        (start(spec.clone()), None)
    }
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Batch), Just(Mode::Sequential)]
}

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
// Properties of whole runs.

proptest! {
    #![proptest_config(config(256))]

    /// Every envelope reached decodes to the run it came from; every run ends within the
    /// bound its spec's policies give (see `duration_bound_ms`); no wake-up lies in the past
    /// (the driver asserts `until > now` on every `SleepUntil`); and every manifest file is
    /// accounted for (`check_accounting`).
    #[test]
    fn runs_roundtrip_terminate_in_time_and_account_for_every_file(
        spec in run_spec(),
        plan in plan(),
        mode in mode(),
        mark in any::<bool>(),
        cancel_after in prop::option::weighted(0.1, 1usize..30),
    ) {
        let (run, mark) = start_mark(&spec, mark);
        let mut world = World::new(&spec, &plan);
        let opts = Options {
            mode,
            max_steps: 100_000,
            check_roundtrip: true,
            cancel_after,
            ..Options::default()
        };

        let outcome = drive(run, &mut world, &opts);

        check_accounting(&outcome, &world, &spec, mark);
        let took = outcome.started.until(outcome.ended);
        let bound = duration_bound_ms(&spec, &plan);
        prop_assert!(took <= bound, "took {} ms, bound {} ms", took, bound);
        for (now, until) in &outcome.sleeps {
            prop_assert!(until > now);
        }
    }

    /// Under generous budgets, any plan without a permanent fault ends Succeeded.
    #[test]
    fn plans_within_every_budget_succeed(spec in generous_spec(), plan in plan(), mode in mode()) {
        let mut world = World::new(&spec, &plan);
        let outcome = drive(start(spec.clone()), &mut world, &Options { mode, ..Options::default() });
        check_accounting(&outcome, &world, &spec, None);
        if plan.must_succeed(&spec) {
            prop_assert!(
                matches!(outcome.terminal, Terminal::Succeeded(_)),
                "ended {:?}", outcome.terminal
            );
        }
    }

    /// A driver that crashes and reloads the envelope between steps (at the chosen steps, or
    /// after every one) sees exactly the trace of one that never crashed: the same requests
    /// with the same ids, the same results, the same states, at the same times.
    ///
    /// Sequential mode: every step starts from a fresh `next`, as after a reload. (A batch
    /// driver that crashes mid-batch asks `next` again and legitimately gets a different
    /// batch: its in-flight results were lost, which the contract allows.)
    #[test]
    fn crash_and_reload_between_steps_gives_the_same_trace(
        spec in run_spec(),
        plan in plan(),
        reload in prop_oneof![
            Just(ReloadAt::Every),
            prop::collection::vec(1usize..120, 1..8).prop_map(ReloadAt::Steps),
        ],
        mark in any::<bool>(),
    ) {
        let base = Options { mode: Mode::Sequential, max_steps: 100_000, ..Options::default() };
        let (run, _) = start_mark(&spec, mark);
        let mut world_a = World::new(&spec, &plan);
        let a = drive(run.clone(), &mut world_a, &base);
        let mut world_b = World::new(&spec, &plan);
        let b = drive(run, &mut world_b, &Options { reload_at: reload, ..base });

        prop_assert_eq!(&a.events, &b.events);
        prop_assert_eq!(&a.terminal, &b.terminal);
        prop_assert_eq!(&a.run, &b.run);
        prop_assert_eq!(a.ended, b.ended);
        prop_assert_eq!(&world_a.log, &world_b.log);
    }

    /// After every accepted step, every earlier (id, result) and every earlier cancel is
    /// delivered again: each is refused (`step` returns `Err`, so the run is unchanged).
    #[test]
    fn redelivering_any_earlier_result_is_refused(
        spec in run_spec(),
        plan in plan(),
        mode in mode(),
    ) {
        let mut world = World::new(&spec, &plan);
        let opts = Options { mode, check_redelivery: true, ..Options::default() };
        let outcome = drive(start(spec.clone()), &mut world, &opts);
        check_accounting(&outcome, &world, &spec, None);
    }

    /// Feeding `next` and `step` random earlier timestamps (down to the epoch) never panics,
    /// never yields a wake-up at or before the `now` asked, and the run still ends.
    #[test]
    fn time_moving_backwards_never_panics(
        spec in run_spec(),
        plan in plan(),
        mode in mode(),
        seed in any::<u64>(),
    ) {
        let mut world = World::new(&spec, &plan);
        let opts = Options { mode, backwards: Some(seed), max_steps: 100_000, ..Options::default() };
        let outcome = drive(start(spec.clone()), &mut world, &opts);
        check_accounting(&outcome, &world, &spec, None);
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// Every state a run passes through, asked `next` at arbitrary times (earlier, equal,
    /// later, extreme), answers without panicking and never with a wake-up in the past; and
    /// stepping any input of the trace at those times does not panic either.
    #[test]
    fn every_state_answers_next_at_any_time(
        spec in run_spec(),
        plan in plan(),
        offsets in prop::collection::vec(any::<i64>(), 1..6),
    ) {
        let mut world = World::new(&spec, &plan);
        let outcome = drive(start(spec.clone()), &mut world, &Options::default());
        let mut states: Vec<&SyncRun> =
            outcome.events.iter().filter_map(|e| e.after.as_ref()).collect();
        let first = start(spec.clone());
        states.push(&first);
        let inputs: Vec<&Input> = outcome.events.iter().map(|e| &e.input).collect();
        for (k, run) in states.iter().enumerate() {
            let base = outcome.events.get(k).map_or(T0, |e| e.now);
            let mut times: Vec<Timestamp> = offsets
                .iter()
                .map(|o| Timestamp(base.0.saturating_add_signed(*o % 10_000_000_000)))
                .collect();
            times.extend([Timestamp::ZERO, base, Timestamp(u64::MAX / 2)]);
            for now in times {
                if let Next::SleepUntil { until, .. } = run.next(now) {
                    prop_assert!(until > now, "{until:?} <= {now:?} in {}", run.state.name());
                }
                // Some inputs from anywhere in the trace; accepted or refused, never a panic.
                for input in inputs.iter().skip(k.saturating_sub(2)).take(4) {
                    let _ = run.step((*input).clone(), now);
                }
            }
        }
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

/// The strategies must keep reaching deep into runs: successes, and failures in every phase.
/// (Without this, a change to the strategies could quietly make every property vacuous.)
#[test]
fn the_strategies_reach_every_outcome() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..400 {
        let spec = run_spec().new_tree(&mut runner).unwrap().current();
        let plan = plan().new_tree(&mut runner).unwrap().current();
        let mut world = World::new(&spec, &plan);
        let outcome = drive(start(spec.clone()), &mut world, &Options::default());
        let key = match &outcome.terminal {
            Terminal::Succeeded(_) => "succeeded".to_string(),
            Terminal::Failed(f) => f.phase.to_string(),
            Terminal::Cancelled(_) => "cancelled".to_string(),
        };
        *seen.entry(key).or_default() += 1;
    }
    println!("outcomes of 400 drawn (spec, plan) pairs: {seen:?}");
    assert!(
        seen.get("succeeded").copied().unwrap_or(0) >= 40,
        "{seen:?}"
    );
    for phase in [
        "kicking_off_export",
        "polling_export",
        "staging_files",
        "kicking_off_import",
        "polling_import",
        "applying_deletions",
    ] {
        assert!(
            seen.contains_key(phase),
            "no run failed in {phase}: {seen:?}"
        );
    }
}

// =============================================================================================
// A few fixed cases the strategies rarely draw.

#[test]
fn every_envelope_of_a_long_run_roundtrips_as_text_and_value() {
    let spec = quick_spec(&[("APPLY_DELETIONS", "true")]);
    let mut plan = Plan::happy(
        Plan::outputs(30)
            .into_iter()
            .chain([
                PlanFile::ok(FileKind::Deleted, "Bundle"),
                PlanFile::ok(FileKind::Error, "OperationOutcome"),
            ])
            .collect(),
    );
    for (i, f) in plan.files.iter_mut().enumerate() {
        if i % 4 == 1 {
            f.stage = Fault::Transient(2);
        }
    }
    plan.files[30].delete = Fault::Transient(2);
    let mut world = World::new(&spec, &plan);
    let outcome = drive(start(spec.clone()), &mut world, &Options::default());
    assert!(matches!(outcome.terminal, Terminal::Succeeded(_)));
    for e in &outcome.events {
        let after = e.after.as_ref().unwrap();
        let value = persist::encode(after);
        assert_eq!(
            &persist::decode_value(value.clone(), persist::UPCASTERS).unwrap(),
            after
        );
        let text = persist::encode_string(after);
        let again = persist::decode(text.as_bytes()).unwrap();
        assert_eq!(persist::encode(&again), value, "re-encoding is stable");
    }
}
