//! Properties over random fault plans and random specs, driving the production driver
//! through the simulation of `common/sim.rs` (moved here from the core, whose tests keep the
//! properties that need no loop):
//!
//! - every envelope reached round-trips through `persist`;
//! - a graceful stop and reload between any two steps yields the same trace as an
//!   uninterrupted run (with one transfer slot and no file retried: see the property);
//! - crashes with effects in flight, and invocation budgets, never stage a file twice, never
//!   kick off a second export or import once one was accepted (but for the lost answer's own
//!   repeat), and every file is still accounted for;
//! - re-delivering any earlier input (result, cancel, `Sending` record) is refused by every
//!   later run;
//! - every run terminates within a bound derived from the spec's policies;
//! - no wake-up lies in the past;
//! - `now` moving backwards never panics;
//! - every manifest file is imported/staged, or the run failed naming it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::sim::*;
use common::strategies::*;
use common::*;
use pathling_import_core::bulk::FileKind;
use pathling_import_core::effect::{Input, Next};
use pathling_import_core::persist;
use pathling_import_core::spec::RunSpec;
use pathling_import_core::state::Terminal;
use pathling_import_core::{SyncRun, Timestamp};
use proptest::prelude::*;
use std::time::Duration;

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

/// How a run is cut into drives: one drive, or invocations with a budget (virtual ms) and a
/// longest in-process sleep, as the Lambda runners drive.
fn invocations() -> impl Strategy<Value = (Option<u64>, Duration)> {
    prop_oneof![
        2 => Just((None, Duration::MAX)),
        1 => (1u64..6_000, 0u64..60_000)
            .prop_map(|(budget, sleep)| (Some(budget), Duration::from_millis(sleep))),
    ]
}

// =============================================================================================
// Properties of whole runs.

proptest! {
    #![proptest_config(config(256))]

    /// Every envelope reached decodes to the run it came from; every run ends within the
    /// bound its spec's policies give (see `duration_bound_ms`); no wake-up lies in the past
    /// (the observer asserts `until > now` on every `SleepUntil`); and every manifest file is
    /// accounted for (`check_accounting`).
    #[test]
    fn runs_roundtrip_terminate_in_time_and_account_for_every_file(
        spec in run_spec(),
        plan in plan(),
        (budget_ms, max_sleep) in invocations(),
        mark in any::<bool>(),
        cancel_after in prop::option::weighted(0.1, 1usize..30),
    ) {
        let (run, mark) = start_mark(&spec, mark);
        let mut world = World::new(&spec, &plan);
        let opts = Options {
            budget_ms,
            max_sleep,
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
    fn plans_within_every_budget_succeed(
        spec in generous_spec(),
        plan in plan(),
        (budget_ms, max_sleep) in invocations(),
    ) {
        let mut world = World::new(&spec, &plan);
        let opts = Options { budget_ms, max_sleep, ..Options::default() };
        let outcome = drive(start(spec.clone()), &mut world, &opts);
        check_accounting(&outcome, &world, &spec, None);
        if plan.must_succeed(&spec) {
            prop_assert!(
                matches!(outcome.terminal, Terminal::Succeeded(_)),
                "ended {:?}", outcome.terminal
            );
        }
    }

    /// A driver stopped gracefully (its `stop` condition: the effects in flight finish) and
    /// resumed from the stored envelope between steps — at the chosen steps, or after every
    /// one — sees exactly the trace of one that never stopped: the same requests with the
    /// same ids, the same results, the same states, at the same times.
    ///
    /// With one transfer slot, for plans whose files are never retried. Otherwise the trace
    /// may legitimately differ: with more slots, a stopped drive lets its effects in flight
    /// finish while an uninterrupted one starts the next files beside them, so the effects
    /// overlap differently in time; and with retries, an uninterrupted drive works through
    /// the batch it was handed before it asks the machine again, while a resumed one asks at
    /// once, and the machine puts a file that became due for a retry first, by index.
    #[test]
    fn graceful_stops_and_reloads_between_steps_give_the_same_trace(
        spec in run_spec().prop_map(|mut s| { s.transfer.concurrency = 1; s }),
        plan in plan().prop_map(without_file_retries),
        reload in prop_oneof![
            Just(ReloadAt::Every),
            prop::collection::vec(1usize..120, 1..8).prop_map(ReloadAt::Steps),
        ],
        mark in any::<bool>(),
    ) {
        let base = Options { max_steps: 100_000, ..Options::default() };
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

    /// Hard crashes at random points — the effects in flight are lost, performed or not —
    /// with or without invocation budgets, and the run reloaded from the stored envelope each
    /// time: the run still ends, every file is accounted for, no staged file is downloaded
    /// again, no export or import is started again once one was accepted (except as the one
    /// repeat of an effect whose answer was lost), an append import is never repeated, and
    /// every earlier input is refused by every later run.
    #[test]
    fn crashes_with_effects_in_flight_keep_every_file_accounted_for(
        spec in run_spec(),
        plan in plan(),
        crashes in prop::collection::btree_set(1usize..80, 1..6),
        crash_seed in any::<u64>(),
        (budget_ms, max_sleep) in invocations(),
        mark in any::<bool>(),
    ) {
        let (run, mark) = start_mark(&spec, mark);
        let mut world = World::new(&spec, &plan);
        let opts = Options {
            crash_at: crashes.into_iter().collect(),
            crash_seed,
            budget_ms,
            max_sleep,
            max_steps: 100_000,
            check_roundtrip: true,
            check_redelivery: true,
            ..Options::default()
        };

        let outcome = drive(run, &mut world, &opts);

        check_accounting(&outcome, &world, &spec, mark);
    }

    /// At the end, every earlier (id, result), every cancel and every `Sending` record is
    /// delivered again to every run saved since it was accepted: each is refused (`step`
    /// returns `Err`, so the run is unchanged).
    #[test]
    fn redelivering_any_earlier_result_is_refused(
        spec in run_spec(),
        plan in plan(),
        (budget_ms, max_sleep) in invocations(),
        cancel_after in prop::option::weighted(0.2, 1usize..30),
    ) {
        let mut world = World::new(&spec, &plan);
        let opts = Options {
            budget_ms,
            max_sleep,
            cancel_after,
            check_redelivery: true,
            ..Options::default()
        };
        let outcome = drive(start(spec.clone()), &mut world, &opts);
        check_accounting(&outcome, &world, &spec, None);
    }

    /// Feeding `next` and `step` random earlier timestamps (down to the epoch) never panics,
    /// never yields a wake-up at or before the `now` asked, and the run still ends.
    #[test]
    fn time_moving_backwards_never_panics(
        spec in run_spec(),
        plan in plan(),
        (budget_ms, max_sleep) in invocations(),
        seed in any::<u64>(),
    ) {
        let mut world = World::new(&spec, &plan);
        let opts = Options {
            budget_ms,
            max_sleep,
            backwards: Some(seed),
            max_steps: 100_000,
            ..Options::default()
        };
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

/// The crash property must reach what it is about: answers lost in every phase, files staged
/// again after their answer was lost, and runs that still succeed.
#[test]
fn the_crashes_lose_answers_in_every_phase() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut lost = std::collections::BTreeMap::<&'static str, usize>::new();
    let (mut restaged, mut succeeded, mut crashes) = (0, 0, 0);
    for seed in 0..300u64 {
        let spec = run_spec().new_tree(&mut runner).unwrap().current();
        let plan = plan().new_tree(&mut runner).unwrap().current();
        let mut rng = SplitMix64::new(seed);
        let mut world = World::new(&spec, &plan);
        let opts = Options {
            crash_at: (0..3)
                .map(|_| 1 + rng.below(30) as usize)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
            crash_seed: seed,
            ..Options::default()
        };
        let outcome = drive(start(spec.clone()), &mut world, &opts);
        check_accounting(&outcome, &world, &spec, None);
        crashes += outcome.crashes;
        for (request, _) in &outcome.lost {
            *lost.entry(request.effect.name()).or_default() += 1;
        }
        restaged += world.staged.values().filter(|n| **n > 1).count();
        succeeded += usize::from(matches!(outcome.terminal, Terminal::Succeeded(_)));
    }
    println!("{crashes} crashes; answers lost: {lost:?}; {restaged} file(s) staged again; {succeeded} runs succeeded");
    for effect in [
        "kickoff_export",
        "poll_export",
        "stage_file",
        "kickoff_import",
        "poll_import",
    ] {
        assert!(
            lost.contains_key(effect),
            "no {effect} answer lost: {lost:?}"
        );
    }
    assert!(restaged > 0 && succeeded > 0);
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
