//! Deterministic simulation of the production driver (`driver::drive_until`): a fake world
//! answers every effect according to a seeded fault plan, a virtual clock jumps to each
//! wake-up, and a step bound turns non-termination into a failure. See `common/sim.rs` for
//! the world and the harness.
//!
//! The last section observes the driver's own paths directly: refilling slots, a budget
//! running out with effects in flight, a phase change mid-batch, an interrupt, and the
//! `Sending` record of an append kick-off.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::sim::*;
use common::*;
use pathling_import_core::bulk::FileKind;
use pathling_import_core::spec::PathlingApi;
use pathling_import_core::state::Terminal;

fn run_plan(
    spec: &pathling_import_core::spec::RunSpec,
    plan: &Plan,
    opts: &Options,
) -> (Outcome, World) {
    let mut world = World::new(spec, plan);
    let outcome = drive(started(spec), &mut world, opts);
    check_accounting(&outcome, &world, spec, None);
    let bound = duration_bound_ms(spec, plan);
    let took = outcome.started.until(outcome.ended);
    assert!(
        took <= bound,
        "run took {took} ms, more than its bound {bound} ms"
    );
    (outcome, world)
}

fn failed(outcome: &Outcome) -> (&str, &str) {
    match &outcome.terminal {
        Terminal::Failed(f) => (f.phase.as_str(), f.reason.as_str()),
        other => panic!("expected Failed, got {other:?}"),
    }
}

fn with_extra_files(mut files: Vec<PlanFile>) -> Vec<PlanFile> {
    files.push(PlanFile::ok(FileKind::Deleted, "Bundle"));
    files.push(PlanFile::ok(FileKind::Error, "OperationOutcome"));
    files
}

// =============================================================================================
// Happy paths.

#[test]
fn happy_path_imports_every_output_file_exactly_once() {
    let spec = quick_spec(&[]);
    let plan = Plan::happy(with_extra_files(Plan::outputs(9)));

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    let Terminal::Succeeded(s) = &outcome.terminal else {
        panic!("{:?}", outcome.terminal)
    };
    assert_eq!(s.imported_files, 9);
    assert_eq!(s.files, 11);
    assert_eq!(world.imported_urls().len(), 9);
    assert_eq!(world.kickoffs, 1);
    assert_eq!(world.import_kickoffs, 1);
    assert_eq!(s.source_errors.warning, 1, "the error[] file was read");
    assert!(world.deletions_applied.is_empty(), "APPLY_DELETIONS is off");
}

#[test]
fn happy_path_applies_deletions_when_asked() {
    let spec = quick_spec(&[("APPLY_DELETIONS", "true")]);
    let plan = Plan::happy(with_extra_files(Plan::outputs(3)));

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    let Terminal::Succeeded(s) = &outcome.terminal else {
        panic!("{:?}", outcome.terminal)
    };
    assert_eq!((s.deleted, s.already_absent), (3, 1));
    assert_eq!(world.deletions_applied.len(), 1);
}

#[test]
fn empty_manifest_succeeds_with_nothing_to_import() {
    let spec = quick_spec(&[]);
    let plan = Plan::happy(Vec::new());

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    let Terminal::Succeeded(s) = &outcome.terminal else {
        panic!()
    };
    assert!(s.nothing_to_import);
    assert_eq!(
        world.detects + world.import_kickoffs,
        0,
        "Pathling is never asked"
    );
    assert_eq!(world.export_job_deletes, 1);
}

#[test]
fn huge_manifest_of_ten_thousand_files_imports_each_exactly_once() {
    let spec = quick_spec(&[("TRANSFER_CONCURRENCY", "8")]);
    let mut files = Plan::outputs(10_000);
    // A sprinkling of flaky downloads.
    for i in (0..10_000).step_by(97) {
        files[i].stage = Fault::Transient(1 + (i % 3) as u32);
    }
    let mut plan = Plan::happy(files);
    plan.max_latency_ms = 200;
    let opts = Options {
        record_states: false,
        ..Options::default()
    };

    let (outcome, world) = run_plan(&spec, &plan, &opts);

    let Terminal::Succeeded(s) = &outcome.terminal else {
        panic!("{:?}", outcome.terminal)
    };
    assert_eq!(s.imported_files, 10_000);
    assert_eq!(world.imported_urls().len(), 10_000);
    assert_eq!(world.staged.len(), 10_000);
    assert!(world.staged.values().all(|n| *n == 1));
}

// =============================================================================================
// The export.

#[test]
fn export_polls_honour_every_retry_after_form() {
    let spec = quick_spec(&[("RETRY_AFTER_MAX", "600"), ("EXPORT_TIMEOUT", "3600")]);
    let mut plan = Plan::happy(Plan::outputs(2));
    plan.max_latency_ms = 500;
    plan.hiccups = vec![
        Hiccup::InProgress(Hint::Delta(40)),
        Hiccup::InProgress(Hint::HttpDate(70)),
        Hiccup::InProgress(Hint::Epoch(100)),
        Hiccup::InProgress(Hint::None),
        Hiccup::TooMany(Hint::Epoch(200)),
        Hiccup::Transient5xx,
        Hiccup::Network,
    ];

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    assert!(
        matches!(outcome.terminal, Terminal::Succeeded(_)),
        "{:?}",
        outcome.terminal
    );
    let t = world.times_of("poll_export");
    assert_eq!(t.len(), 8);
    let gap = |i: usize| t[i].0 - t[i - 1].0;
    let l = plan.max_latency_ms;
    // The next poll comes when the server asked (HTTP-dates and epochs round up to seconds).
    for (i, wait) in [
        (1, 40_000),
        (2, 70_000),
        (3, 100_000),
        (4, 30_000),
        (5, 200_000),
    ] {
        assert!(
            gap(i) >= wait && gap(i) <= wait + 1_000 + l,
            "poll {i}: gap {} ms, asked {wait} ms",
            gap(i)
        );
    }
    // After the transient 5xx and the reset: backoff, at least a jittered second.
    assert!(gap(6) >= 750 && gap(7) >= 1_500);
}

#[test]
fn huge_epoch_retry_after_is_clamped() {
    let spec = quick_spec(&[("RETRY_AFTER_MAX", "120")]);
    let mut plan = Plan::happy(Plan::outputs(1));
    plan.hiccups = vec![Hiccup::InProgress(Hint::Epoch(5_000_000_000))];

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    assert!(matches!(outcome.terminal, Terminal::Succeeded(_)));
    let t = world.times_of("poll_export");
    let gap = t[1].0 - t[0].0;
    assert!(
        (120_000..=120_000 + plan.max_latency_ms).contains(&gap),
        "{gap}"
    );
}

#[test]
fn kickoff_throttled_then_accepted() {
    let spec = quick_spec(&[]);
    let mut plan = Plan::happy(Plan::outputs(2));
    plan.kickoff = Fault::Transient(4);

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    assert!(matches!(outcome.terminal, Terminal::Succeeded(_)));
    assert_eq!(world.kickoffs, 5);
}

#[test]
fn kickoff_refused_fails_without_cleanup() {
    let spec = quick_spec(&[]);
    let mut plan = Plan::happy(Plan::outputs(2));
    plan.kickoff = Fault::Permanent;

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    let (phase, reason) = failed(&outcome);
    assert_eq!(phase, "kicking_off_export");
    assert!(reason.contains("unsupported _type"), "{reason}");
    assert_eq!(world.export_job_deletes, 0);
}

#[test]
fn export_job_gone_fails_polling_and_cleans_up() {
    let spec = quick_spec(&[]);
    let mut plan = Plan::happy(Plan::outputs(2));
    plan.hiccups = vec![Hiccup::InProgress(Hint::Delta(5))];
    plan.export_gone = true;

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    let (phase, reason) = failed(&outcome);
    assert_eq!(phase, "polling_export");
    assert!(reason.contains("HTTP 404"), "{reason}");
    assert_eq!(world.export_job_deletes, 1);
}

#[test]
fn an_export_that_never_finishes_fails_at_its_deadline() {
    let spec = quick_spec(&[
        ("EXPORT_RETRY_TIMES", "3"),
        ("EXPORT_RETRY_WAIT", "60"),
        ("EXPORT_TIMEOUT", "180"),
    ]);
    let mut plan = Plan::happy(Plan::outputs(1));
    plan.hiccups = vec![Hiccup::InProgress(Hint::None); 50];

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    let (phase, reason) = failed(&outcome);
    assert_eq!(phase, "polling_export");
    assert!(reason.contains("did not complete within 180 s"), "{reason}");
    assert!(
        reason.contains("set EXPORT_TIMEOUT to wait longer"),
        "{reason}"
    );
    assert_eq!(world.export_polls, 4);
}

#[test]
fn a_short_poll_interval_does_not_shorten_the_export_patience() {
    // EXPORT_RETRY_WAIT=1 once made the whole patience 24 polls of 1 s: an export that the
    // server paces at 5 s per poll for ten minutes then failed.
    let spec = quick_spec(&[("EXPORT_RETRY_TIMES", "24"), ("EXPORT_RETRY_WAIT", "1")]);
    let mut plan = Plan::happy(Plan::outputs(1));
    plan.hiccups = vec![Hiccup::InProgress(Hint::Delta(5)); 120];

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    assert!(
        matches!(outcome.terminal, Terminal::Succeeded(_)),
        "{:?}",
        outcome.terminal
    );
    assert_eq!(world.export_polls, 121);
}

#[test]
fn export_failing_more_often_than_allowed_fails() {
    let spec = quick_spec(&[("EXPORT_RETRY_TIMES", "2")]);
    let mut plan = Plan::happy(Plan::outputs(1));
    plan.hiccups = vec![
        Hiccup::Transient5xx,
        Hiccup::Network,
        Hiccup::TooMany(Hint::Delta(1)),
    ];

    let (outcome, _) = run_plan(&spec, &plan, &Options::default());

    let (phase, reason) = failed(&outcome);
    assert_eq!(phase, "polling_export");
    assert!(reason.contains("gave up after 3 attempt(s)"), "{reason}");
}

// =============================================================================================
// Staging.

#[test]
fn flaky_files_are_retried_until_staged() {
    let spec = quick_spec(&[]);
    let mut files = with_extra_files(Plan::outputs(6));
    files[1].stage = Fault::Transient(3);
    files[4].stage = Fault::Transient(1);
    files[6].stage = Fault::Transient(2); // the deleted[] file
    files[7].stage = Fault::Transient(4); // the error[] file
    let plan = Plan::happy(files);

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    assert!(
        matches!(outcome.terminal, Terminal::Succeeded(_)),
        "{:?}",
        outcome.terminal
    );
    assert_eq!(world.stage_attempts, [1, 4, 1, 1, 2, 1, 3, 5]);
}

#[test]
fn a_permanently_failing_file_fails_the_run_naming_it() {
    let spec = quick_spec(&[]);
    let mut files = Plan::outputs(6);
    files[3].stage = Fault::Permanent;
    let plan = Plan::happy(files);

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    let (phase, reason) = failed(&outcome);
    assert_eq!(phase, "staging_files");
    assert!(
        reason.starts_with("could not stage output[3] Encounter: HTTP 403"),
        "{reason}"
    );
    assert!(world.accepted_import.is_none());
    // Files remain to be staged: the export job is kept so that a retry can download them.
    assert_eq!(world.export_job_deletes, 0);
    assert!(outcome.run.resumable().is_some_and(|r| r.export_kept));
}

#[test]
fn a_file_failing_more_often_than_allowed_fails_the_run_naming_it() {
    let spec = quick_spec(&[("TRANSFER_RETRY_TIMES", "2")]);
    let mut files = Plan::outputs(3);
    files[2].stage = Fault::Transient(3);
    let plan = Plan::happy(files);

    let (outcome, _) = run_plan(&spec, &plan, &Options::default());

    let (phase, reason) = failed(&outcome);
    assert_eq!(phase, "staging_files");
    assert!(
        reason.contains("could not stage output[2] Encounter: gave up after 3 attempt(s)"),
        "{reason}"
    );
}

#[test]
fn a_fatal_error_outcome_fails_the_run() {
    let spec = quick_spec(&[]);
    let mut files = with_extra_files(Plan::outputs(2));
    files[3].fatal = true;
    let plan = Plan::happy(files);

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    let (phase, reason) = failed(&outcome);
    assert_eq!(phase, "staging_files");
    assert!(reason.contains("fatal error(s)"), "{reason}");
    assert!(
        world.accepted_import.is_none(),
        "nothing is imported from a broken export"
    );
}

#[test]
fn a_source_outage_during_staging_keeps_few_files_in_retry() {
    // Every file fails twice: at most a batch worth of files is retrying at any time.
    let spec = quick_spec(&[("TRANSFER_CONCURRENCY", "2")]);
    let mut files = Plan::outputs(200);
    for f in &mut files {
        f.stage = Fault::Transient(2);
    }
    let plan = Plan::happy(files);

    let (outcome, _) = run_plan(&spec, &plan, &Options::default());

    assert!(
        matches!(outcome.terminal, Terminal::Succeeded(_)),
        "{:?}",
        outcome.terminal
    );
    let most_retrying = outcome
        .events
        .iter()
        .filter_map(|e| match &e.after.as_ref().unwrap().state {
            pathling_import_core::state::SyncState::StagingFiles(s) => {
                Some(s.export.files.failing().count())
            }
            _ => None,
        })
        .max()
        .unwrap();
    assert!(
        most_retrying <= 2 * 8,
        "{most_retrying} files retrying at once"
    );
}

// =============================================================================================
// Pathling.

#[test]
fn pathling_busy_with_another_import_is_waited_for() {
    let spec = quick_spec(&[]);
    let mut plan = Plan::happy(Plan::outputs(3));
    plan.busy = 3;
    plan.import_polls = vec![Hint::Delta(10), Hint::None, Hint::HttpDate(5)];

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    assert!(matches!(outcome.terminal, Terminal::Succeeded(_)));
    assert_eq!(world.import_kickoffs, 4);
    assert_eq!(world.import_polls, 4);
    let kickoffs = world.times_of("kickoff_import");
    for w in kickoffs.windows(2) {
        assert!(w[1].0 - w[0].0 >= 2_000, "Retry-After: 2 honoured");
    }
}

#[test]
fn detected_v7_gets_the_v7_shape() {
    let spec = quick_spec(&[]);
    let mut plan = Plan::happy(Plan::outputs(3));
    plan.generation = PathlingApi::V7;

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    assert!(matches!(outcome.terminal, Terminal::Succeeded(_)));
    assert_eq!(world.accepted_import.as_ref().unwrap().0, PathlingApi::V7);
    assert!(world.imported_urls().iter().all(|u| u.starts_with("s3://")));
    assert_eq!(world.import_kickoffs, 1);
}

#[test]
fn detected_v9_gets_the_v9_shape() {
    let spec = quick_spec(&[]);
    let plan = Plan::happy(Plan::outputs(3));

    let (_, world) = run_plan(&spec, &plan, &Options::default());

    assert_eq!(world.accepted_import.as_ref().unwrap().0, PathlingApi::V9);
    assert!(world
        .imported_urls()
        .iter()
        .all(|u| u.starts_with("s3a://")));
}

#[test]
fn unknown_version_on_a_7x_server_switches_after_one_400() {
    let spec = quick_spec(&[]);
    let mut plan = Plan::happy(Plan::outputs(3));
    plan.generation = PathlingApi::V7;
    plan.reports_version = false;

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    assert!(matches!(outcome.terminal, Terminal::Succeeded(_)));
    assert_eq!(world.import_kickoffs, 2);
    assert_eq!(world.accepted_import.as_ref().unwrap().0, PathlingApi::V7);
}

#[test]
fn failing_detection_falls_back_on_the_kickoff_answer() {
    let spec = quick_spec(&[]);
    let mut plan = Plan::happy(Plan::outputs(3));
    plan.generation = PathlingApi::V7;
    plan.detect = Fault::Permanent;

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    assert!(matches!(outcome.terminal, Terminal::Succeeded(_)));
    assert_eq!(world.accepted_import.as_ref().unwrap().0, PathlingApi::V7);
}

#[test]
fn v7_with_import_mode_append_fails_before_importing() {
    let spec = quick_spec(&[("IMPORT_MODE", "append")]);
    let mut plan = Plan::happy(Plan::outputs(3));
    plan.generation = PathlingApi::V7;

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    let (phase, reason) = failed(&outcome);
    assert_eq!(phase, "kicking_off_import");
    assert!(reason.contains("IMPORT_MODE append"), "{reason}");
    assert_eq!(world.import_kickoffs, 0);
}

#[test]
fn a_failed_import_job_fails_the_run() {
    let spec = quick_spec(&[]);
    let mut plan = Plan::happy(Plan::outputs(3));
    plan.import_fails = true;

    let (outcome, _) = run_plan(&spec, &plan, &Options::default());

    let (phase, reason) = failed(&outcome);
    assert_eq!(phase, "polling_import");
    assert!(reason.contains("has no id"), "{reason}");
}

#[test]
fn a_permanently_failing_deletion_fails_the_run_naming_the_file() {
    let spec = quick_spec(&[("APPLY_DELETIONS", "true")]);
    let mut files = Plan::outputs(1);
    files.push(PlanFile::ok(FileKind::Deleted, "Bundle"));
    files.push(PlanFile {
        delete: Fault::Permanent,
        ..PlanFile::ok(FileKind::Deleted, "Bundle")
    });
    let plan = Plan::happy(files);

    let (outcome, _) = run_plan(&spec, &plan, &Options::default());

    let (phase, reason) = failed(&outcome);
    assert_eq!(phase, "applying_deletions");
    assert!(
        reason.contains("deletions of deleted[1] Bundle"),
        "{reason}"
    );
}

#[test]
fn a_failed_cleanup_does_not_change_the_outcome() {
    let spec = quick_spec(&[]);
    let mut plan = Plan::happy(Plan::outputs(2));
    plan.cleanup_fails = true;

    let (outcome, _) = run_plan(&spec, &plan, &Options::default());

    assert!(matches!(outcome.terminal, Terminal::Succeeded(_)));
}

// =============================================================================================
// Cancel, the step bound, and a seeded sweep.

#[test]
fn cancel_mid_staging_deletes_the_export_job() {
    let spec = quick_spec(&[]);
    let plan = Plan::happy(Plan::outputs(40));
    let opts = Options {
        cancel_after: Some(10),
        ..Options::default()
    };

    let (outcome, world) = run_plan(&spec, &plan, &opts);

    let Terminal::Cancelled(c) = &outcome.terminal else {
        panic!("{:?}", outcome.terminal)
    };
    assert_eq!(c.phase, "staging_files");
    assert_eq!(world.export_job_deletes, 1);
    assert!(world.accepted_import.is_none());
}

#[test]
#[should_panic(expected = "no termination after 5 steps")]
fn the_step_bound_catches_a_run_that_does_not_end() {
    let spec = quick_spec(&[]);
    let mut plan = Plan::happy(Plan::outputs(1));
    plan.hiccups = vec![Hiccup::InProgress(Hint::Delta(1)); 20];
    let mut world = World::new(&spec, &plan);
    drive(
        started(&spec),
        &mut world,
        &Options {
            max_steps: 5,
            ..Options::default()
        },
    );
}

#[test]
fn seeded_sweep_of_random_fault_plans() {
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for seed in 0..300u64 {
        let plan = Plan::random(seed, 12);
        let mut rng = SplitMix64::new(seed ^ 0x5eed);
        let api = rng.pick(&["auto", "auto", "7", "9"]);
        let deletions = rng.pick(&["true", "false"]);
        let api = if deletions == "true" && api == "7" {
            "auto"
        } else {
            api
        };
        let spec = quick_spec(&[
            ("PATHLING_API", api),
            ("APPLY_DELETIONS", deletions),
            ("TRANSFER_CONCURRENCY", rng.pick(&["1", "2", "4"])),
        ]);
        // Odd seeds run as a Lambda would: every drive has a budget of its own and sleeps
        // at most a few seconds; the next one continues from the stored envelope.
        let opts = if seed % 2 == 0 {
            Options::default()
        } else {
            Options {
                budget_ms: Some(1 + rng.below(5_000)),
                max_sleep: std::time::Duration::from_millis(rng.below(10_000)),
                ..Options::default()
            }
        };

        let (outcome, _) = run_plan(&spec, &plan, &opts);

        if plan.must_succeed(&spec) {
            assert!(
                matches!(outcome.terminal, Terminal::Succeeded(_)),
                "seed {seed}: {plan:?}\nended {:?}",
                outcome.terminal
            );
        }
        let key = match &outcome.terminal {
            Terminal::Succeeded(_) => "succeeded".to_string(),
            Terminal::Failed(f) => format!("failed in {}", f.phase),
            Terminal::Cancelled(_) => "cancelled".to_string(),
        };
        *outcomes.entry(key).or_default() += 1;
    }
    println!("outcomes of 300 random plans: {outcomes:?}");
    // The sweep exercises success and failures in several phases.
    assert!(
        outcomes.get("succeeded").copied().unwrap_or(0) >= 30,
        "{outcomes:?}"
    );
    assert!(outcomes.len() >= 4, "{outcomes:?}");
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let spec = quick_spec(&[]);
    let plan = Plan::random(42, 10);
    let (a, _) = run_plan(&spec, &plan, &Options::default());
    let (b, _) = run_plan(&spec, &plan, &Options::default());
    assert_eq!(a.events, b.events);
    assert_eq!(a.ended, b.ended);
}

#[test]
fn wakeups_are_never_in_the_past() {
    let spec = quick_spec(&[]);
    for seed in 0..50 {
        let plan = Plan::random(seed, 8);
        let (outcome, _) = run_plan(&spec, &plan, &Options::default());
        for (now, until) in &outcome.sleeps {
            assert!(until > now);
        }
    }
}

// =============================================================================================
// The production driver's own paths, observed.

use pathling_import_core::effect::{Effect, EffectId};
use pathling_import_core::state::SyncState;
use pathling_import_core::SyncRun;
use pathling_import_runners::driver::{self, DriveOptions, Stopped};
use std::sync::Arc;
use std::time::Duration;

/// A world, its virtual clock and a store, for driving by hand.
fn rig(spec: &pathling_import_core::spec::RunSpec, plan: &Plan) -> (Sim, SimStore, SyncRun) {
    let run = started(spec);
    let clock = Arc::new(VirtualClock::new(run.started_at, None));
    let sim = Sim::new(World::new(spec, plan), clock, true);
    let mut store = sim.store(true, false);
    store.put(&run);
    (sim, store, run)
}

/// One call of the driver on the rig's clock.
fn drive_once(
    sim: &Sim,
    store: &mut SimStore,
    run: SyncRun,
    budget_until: Option<pathling_import_core::Timestamp>,
    stop: impl Fn(&SyncRun) -> bool,
) -> (SyncRun, Stopped) {
    let options = DriveOptions::new(Duration::MAX, budget_until).with_clock(sim.clock());
    sim.run(driver::drive_until(
        run,
        sim,
        store,
        &options,
        sim,
        sim.crash_signal(),
        stop,
    ))
    .unwrap()
}

fn started_id(t: &Trace) -> Option<EffectId> {
    match t {
        Trace::Started { request, .. } => Some(request.id),
        _ => None,
    }
}

/// Where in the trace `id` started.
fn start_of(trace: &[Trace], id: EffectId) -> usize {
    trace
        .iter()
        .position(|t| started_id(t) == Some(id))
        .unwrap_or_else(|| panic!("{id:?} never started"))
}

fn position(trace: &[Trace], wanted: &Trace) -> usize {
    trace
        .iter()
        .position(|t| t == wanted)
        .unwrap_or_else(|| panic!("{wanted:?} not in the trace"))
}

fn file(index: u32) -> EffectId {
    EffectId::File { index, attempt: 0 }
}

#[test]
fn the_driver_refills_slots_from_the_machine_as_they_free_up() {
    // Two slots, a first batch of 8 files (2 × BATCH_PER_SLOT), 20 files in all.
    let spec = quick_spec(&[("TRANSFER_CONCURRENCY", "2")]);
    let plan = Plan::happy(Plan::outputs(20));

    let (outcome, world) = run_plan(&spec, &plan, &Options::default());

    assert!(matches!(outcome.terminal, Terminal::Succeeded(_)));
    assert_eq!(world.staged.len(), 20);
    // Never more than two files in flight, and two whenever two remain to be started.
    let mut in_flight = 0usize;
    let mut most = 0usize;
    let mut starts = 0usize;
    for t in &outcome.trace {
        match t {
            Trace::Started { request, .. } if matches!(request.id, EffectId::File { .. }) => {
                in_flight += 1;
                starts += 1;
                most = most.max(in_flight);
            }
            Trace::Stepped(EffectId::File { .. }) => {
                assert!(
                    in_flight == 2 || starts == 20,
                    "a slot stayed idle with files left to start: {in_flight} in flight after {starts} starts"
                );
                in_flight -= 1;
            }
            _ => {}
        }
    }
    assert_eq!(most, 2);
    // File 8 is not in the first batch: it is asked of the machine (a refill) as soon as a
    // slot frees up after the batch was handed out, while a file of the batch is in flight.
    let t = &outcome.trace;
    let last_of_batch = (0..8)
        .map(|i| position(t, &Trace::Stepped(file(i))))
        .max()
        .unwrap();
    assert!(start_of(t, file(8)) < last_of_batch);
}

#[test]
fn a_budget_that_runs_out_lets_the_effects_in_flight_finish_and_starts_none() {
    let spec = quick_spec(&[("TRANSFER_CONCURRENCY", "3")]);
    let mut plan = Plan::happy(Plan::outputs(10));
    plan.max_latency_ms = 1_000;
    plan.seed = 7;
    let (sim, mut store, run) = rig(&spec, &plan);
    let staging = |r: &SyncRun| matches!(r.state, SyncState::StagingFiles(_));
    let (run, stopped) = drive_once(&sim, &mut store, run, None, staging);
    assert_eq!(stopped, Stopped::Interrupted);
    let before = sim.trace().len();

    // The budget ends 1 ms from now: the first result comes later than that.
    let budget = sim.clock().real().plus_ms(1);
    let (run, stopped) = drive_once(&sim, &mut store, run, Some(budget), |_| false);

    assert_eq!(stopped, Stopped::OutOfBudget);
    let trace = sim.trace()[before..].to_vec();
    let started: Vec<EffectId> = trace.iter().filter_map(started_id).collect();
    let stepped: Vec<EffectId> = trace
        .iter()
        .filter_map(|t| match t {
            Trace::Stepped(id) => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(
        &started[..3],
        [file(0), file(1), file(2)],
        "three slots filled"
    );
    let (mut started, mut stepped) = (started, stepped);
    started.sort_by_key(|id| format!("{id:?}"));
    stepped.sort_by_key(|id| format!("{id:?}"));
    assert_eq!(
        stepped, started,
        "every effect in flight finished and was stepped"
    );
    for t in &trace {
        if let Trace::Started { at, .. } = t {
            assert!(*at < budget, "an effect started after the budget");
        }
    }
    assert_eq!(store.reload(), run, "what was stepped is saved");

    // The next drive goes on from there: every file staged exactly once.
    let again = store.reload();
    let (_, stopped) = drive_once(&sim, &mut store, again, None, |_| false);
    assert!(matches!(stopped, Stopped::Done(t) if matches!(*t, Terminal::Succeeded(_))));
    sim.world(|w| {
        assert_eq!(w.staged.len(), 10);
        assert!(w.staged.values().all(|n| *n == 1));
    });
}

#[test]
fn a_phase_change_mid_batch_refuses_the_rest_and_starts_nothing_more_of_it() {
    let spec = quick_spec(&[("APPLY_DELETIONS", "true"), ("TRANSFER_CONCURRENCY", "4")]);
    let mut files = Plan::outputs(1);
    for _ in 0..3 {
        files.push(PlanFile::ok(FileKind::Deleted, "Bundle"));
    }
    files[1].delete = Fault::Permanent;
    let deletions = |index| EffectId::Deletions { index, attempt: 0 };
    let mut refused = 0;
    // The latencies decide which deletions answer before the failing one.
    for seed in 0..16 {
        let mut plan = Plan::happy(files.clone());
        plan.seed = seed;

        let (outcome, world) = run_plan(&spec, &plan, &Options::default());

        let (phase, reason) = failed(&outcome);
        assert_eq!(phase, "applying_deletions");
        assert!(
            reason.contains("deletions of deleted[0] Bundle"),
            "{reason}"
        );
        let t = &outcome.trace;
        // The three deletions go out together; the first fails for good, which ends the
        // phase: results that come after are refused, and what starts next is the export
        // job's clean-up, nothing more of the batch.
        let failure = position(t, &Trace::Stepped(deletions(1)));
        for i in 1..4 {
            assert!(start_of(t, deletions(i)) < failure);
        }
        for later in &t[failure + 1..] {
            if let Trace::Stepped(id) = later {
                assert!(
                    !matches!(id, EffectId::Deletions { .. }),
                    "{id:?} stepped after the failure"
                );
            }
        }
        let after: Vec<&Trace> = t[failure..]
            .iter()
            .filter(|t| matches!(t, Trace::Started { .. }))
            .collect();
        assert!(
            matches!(after.as_slice(), [Trace::Started { request, .. }] if matches!(request.effect, Effect::DeleteExportJob { .. })),
            "{after:?}"
        );
        let rejected = t[failure..]
            .iter()
            .filter(|t| matches!(t, Trace::Rejected(EffectId::Deletions { .. })))
            .count();
        assert_eq!(outcome.refused_in_batch, rejected);
        refused += rejected;
        assert_eq!(world.export_job_deletes, 1);
    }
    assert!(refused > 0, "no result ever came after the failure");
}

#[test]
fn an_interrupt_abandons_the_effects_in_flight_and_a_reload_goes_on() {
    let spec = quick_spec(&[("TRANSFER_CONCURRENCY", "3")]);
    let plan = Plan::happy(Plan::outputs(8));
    let (sim, mut store, run) = rig(&spec, &plan);
    // Crash as the first effect after the export (2 events) and one staged file starts.
    sim.crash_at([3], 11);

    let (run, stopped) = drive_once(&sim, &mut store, run, None, |_| false);

    assert_eq!(stopped, Stopped::Interrupted);
    assert!(sim.take_crash());
    assert_eq!(sim.event_count(), 3, "nothing stepped after the crash");
    assert_eq!(store.reload(), run, "the driver returns the run as saved");
    let trace = sim.trace();
    let last_step = trace
        .iter()
        .rposition(|t| matches!(t, Trace::Stepped(_)))
        .unwrap();
    let abandoned: Vec<EffectId> = trace[last_step..].iter().filter_map(started_id).collect();
    assert!(
        !abandoned.is_empty(),
        "effects were in flight at the interrupt"
    );
    assert!(!trace[last_step + 1..]
        .iter()
        .any(|t| matches!(t, Trace::Stepped(_) | Trace::Rejected(_))));

    // A new drive from the stored envelope stages what was in flight again (once more at
    // most for a file whose write reached the store) and ends.
    let again = store.reload();
    let (_, stopped) = drive_once(&sim, &mut store, again, None, |_| false);
    assert!(matches!(stopped, Stopped::Done(t) if matches!(*t, Terminal::Succeeded(_))));
    let lost = sim.lost();
    sim.world(|w| {
        assert_eq!(w.staged.len(), 8);
        for (key, n) in &w.staged {
            let lost_here = lost
                .iter()
                .filter(
                    |(q, _)| matches!(&q.effect, Effect::StageFile { key: k, .. } if &k.0 == key),
                )
                .count() as u32;
            assert_eq!(*n, 1 + lost_here, "{key}");
        }
    });
}

#[test]
fn an_append_kickoff_is_recorded_before_it_goes_out_and_never_repeated_after_a_crash() {
    let spec = quick_spec(&[("IMPORT_MODE", "append"), ("PATHLING_API", "9")]);
    let plan = Plan::happy(Plan::outputs(3));

    // Without a crash: the `Sending` record is saved, then the kick-off goes out under the
    // new seq.
    let (outcome, world) = run_plan(&spec, &plan, &Options::default());
    assert!(matches!(outcome.terminal, Terminal::Succeeded(_)));
    assert_eq!(world.accepted_imports.len(), 1);
    let t = &outcome.trace;
    let kickoff = t
        .iter()
        .position(|t| matches!(t, Trace::Started { request, .. } if matches!(request.effect, Effect::KickoffImport { .. })))
        .unwrap();
    let Trace::Saved {
        seq,
        phase,
        sending: true,
        ..
    } = &t[kickoff - 1]
    else {
        panic!(
            "no Sending record right before the kick-off: {:?}",
            &t[kickoff - 1]
        )
    };
    assert_eq!(*phase, "kicking_off_import");
    let Trace::Started { request, .. } = &t[kickoff] else {
        unreachable!()
    };
    assert_eq!(request.id, EffectId::Run { seq: *seq });
    let events_before = outcome.events.iter().filter(|e| e.seq < *seq).count();

    // A crash while the kick-off is in flight, whether or not it reached Pathling: the run
    // fails asking the operator to check, and Pathling never gets a second import.
    let mut performed = 0;
    for seed in 0..8 {
        let opts = Options {
            crash_at: vec![events_before],
            crash_seed: seed,
            check_redelivery: true,
            ..Options::default()
        };
        let (outcome, world) = run_plan(&spec, &plan, &opts);
        assert_eq!(outcome.crashes, 1);
        let (phase, reason) = failed(&outcome);
        assert_eq!(phase, "kicking_off_import");
        assert!(reason.contains("was lost"), "{reason}");
        assert!(world.accepted_imports.len() <= 1);
        performed += world.accepted_imports.len();
    }
    assert!(
        (1..8).contains(&performed),
        "both cases seen: {performed}/8"
    );
}

/// Drives `plan` to its end with the production driver and a fresh store (checking every
/// envelope's round-trip when asked): the final run and the trace.
fn drive_to_end(
    spec: &pathling_import_core::spec::RunSpec,
    plan: &Plan,
    check_roundtrip: bool,
    save_interval: Duration,
) -> (SyncRun, Vec<Trace>) {
    let run = started(spec);
    let clock = Arc::new(VirtualClock::new(run.started_at, None));
    let sim = Sim::new(World::new(spec, plan), clock, false);
    let mut store = sim.store(check_roundtrip, false);
    store.put(&run);
    let options = DriveOptions::new(Duration::MAX, None)
        .with_clock(sim.clock())
        .with_save_interval(save_interval);
    let (run, stopped) = sim
        .run(driver::drive(
            run,
            &sim,
            &mut store,
            &options,
            &sim,
            sim.crash_signal(),
        ))
        .unwrap();
    assert!(matches!(stopped, Stopped::Done(_)), "{stopped:?}");
    assert_eq!(store.reload(), run, "the store holds the final run");
    (run, sim.trace())
}

/// Saves are bounded by time as well as by count: while a 10,000-file export stages, the
/// production driver saves the run about once per (virtual) second, not once per file; every
/// step outside the per-file work is still saved at once.
#[test]
fn staging_saves_are_bounded_by_time_not_by_the_number_of_files() {
    const FILES: usize = 10_000;
    let spec = quick_spec(&[("TRANSFER_CONCURRENCY", "4")]);
    let mut plan = Plan::happy(Plan::outputs(FILES));
    plan.max_latency_ms = 40;
    let drive_all = |interval: Duration| drive_to_end(&spec, &plan, false, interval).1;
    let saves_in = |trace: &[Trace], phase: &str| {
        trace
            .iter()
            .filter(|t| matches!(t, Trace::Saved { phase: p, .. } if *p == phase))
            .count()
    };
    let steps = |trace: &[Trace], files: bool| {
        trace
            .iter()
            .filter(
                |t| matches!(t, Trace::Stepped(id) if matches!(id, EffectId::File { .. }) == files),
            )
            .count()
    };

    let every_step = drive_all(Duration::ZERO);
    let throttled = drive_all(driver::SAVE_INTERVAL);

    assert_eq!(steps(&throttled, true), FILES, "every file staged once");
    assert!(saves_in(&every_step, "staging_files") >= FILES);
    // Virtual time spent staging: from the first file started to the last one stepped.
    let at = |t: &Trace| match t {
        Trace::Started { at, request } if matches!(request.id, EffectId::File { .. }) => Some(*at),
        _ => None,
    };
    let first = throttled.iter().find_map(at).unwrap();
    let last = throttled.iter().rev().find_map(at).unwrap();
    let seconds = first.until(last) / 1000;
    assert!(
        seconds >= 20,
        "the staging lasts long enough to matter: {seconds} s"
    );
    let staging = saves_in(&throttled, "staging_files");
    // One save per elapsed second, one as the phase ends its last second, one on the way out.
    assert!(
        staging as u64 <= seconds + 3,
        "{staging} saves while staging for {seconds} s"
    );
    // Everything but file steps is saved as before.
    let others = |trace: &[Trace]| {
        trace
            .iter()
            .filter(|t| matches!(t, Trace::Saved { phase, .. } if *phase != "staging_files"))
            .count()
    };
    assert_eq!(others(&throttled), others(&every_step));
    assert_eq!(steps(&throttled, false), steps(&every_step, false));
    println!(
        "{FILES} files staged in {seconds} virtual s: {staging} saves while staging (every step: {})",
        saves_in(&every_step, "staging_files")
    );
}

/// What a whole run writes to its store grows linearly with the manifest, and no save is
/// larger than 16 KiB: the production driver with its save interval, a 10,000- and a
/// 100,000-file export over the same virtual network, every envelope encoded and decoded.
#[test]
fn state_writes_grow_linearly_with_the_files_and_every_save_is_small() {
    const BUDGET: usize = 16 * 1024;
    let spec = quick_spec(&[("TRANSFER_CONCURRENCY", "8")]);
    let measure = |files: usize| {
        let mut plan = Plan::happy(with_extra_files(Plan::outputs(files)));
        plan.max_latency_ms = 40;
        let (run, trace) = drive_to_end(&spec, &plan, true, driver::SAVE_INTERVAL);
        let SyncState::Succeeded(summary) = &run.state else {
            panic!("{}", run.state.name())
        };
        assert_eq!(summary.files_staged as usize, files + 2);
        let sizes: Vec<usize> = trace
            .iter()
            .filter_map(|t| match t {
                Trace::Saved { bytes, .. } => *bytes,
                _ => None,
            })
            .collect();
        let total: usize = sizes.iter().sum();
        let largest = sizes.iter().copied().max().unwrap_or(0);
        println!(
            "{files:>7} files: {} saves, {total} bytes written, largest save {largest} bytes",
            sizes.len()
        );
        assert!(
            largest <= BUDGET,
            "{files} files: a save of {largest} bytes"
        );
        (sizes.len(), total)
    };
    let (saves_10k, bytes_10k) = measure(10_000);
    let (saves_100k, bytes_100k) = measure(100_000);
    let ratio = bytes_100k as f64 / bytes_10k as f64;
    println!("10x the files: {ratio:.1}x the bytes, {saves_100k}/{saves_10k} the saves");
    // Linear: ten times the files (and the time they take) write about ten times the bytes,
    // not a hundred times (which a table growing with the files, saved once a second, did).
    assert!(ratio <= 12.0, "10x the files wrote {ratio:.1}x the bytes");
    assert!(saves_100k <= 12 * saves_10k);
}

/// Per-file steps left unsaved are saved once the save interval is over even while no effect
/// ends (one large file still moving): a crash then repeats only the files of the last
/// interval, not every file since the large one started. Ordered with explicit signals: the
/// time moves only when the test moves it, after the small files were stepped.
#[test]
fn unsaved_files_are_saved_after_the_interval_while_a_large_file_still_moves() {
    use pathling_import_core::effect::{EffectResult, Request};
    use pathling_import_core::state::FileStatus;
    use pathling_import_core::Timestamp;
    use pathling_import_runners::driver::{Clock, Effects, Observer, RunStore, StoreError};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use tokio::sync::{mpsc, watch, Notify};

    /// Time moves only when the test says so; alarms wake when it does.
    struct TestClock {
        now: AtomicU64,
        moved: watch::Sender<u64>,
    }
    impl Clock for TestClock {
        fn now(&self) -> Timestamp {
            Timestamp(self.now.load(Ordering::SeqCst))
        }
        fn sleep(&self, d: Duration) -> futures::future::BoxFuture<'static, ()> {
            // Waits the machine asks for (export polls) pass at once.
            let t = self.now.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
            self.moved.send_replace(t + d.as_millis() as u64);
            Box::pin(std::future::ready(()))
        }
        fn alarm(&self, at: Timestamp) -> futures::future::BoxFuture<'static, ()> {
            let mut moved = self.moved.subscribe();
            Box::pin(async move {
                let _ = moved.wait_for(|now| *now >= at.0).await;
            })
        }
    }

    /// The simulated world answers at once, except the large file, which waits for `release`.
    struct LargeFileWorld {
        world: Mutex<World>,
        clock: Arc<TestClock>,
        large: u32,
        release: Arc<Notify>,
    }
    impl Effects for LargeFileWorld {
        async fn execute(&self, request: &Request) -> EffectResult {
            if matches!(request.id, EffectId::File { index, .. } if index == self.large) {
                self.release.notified().await;
            }
            let now = self.clock.now();
            self.world.lock().unwrap().answer(request, now)
        }
    }

    fn staged(run: &SyncRun) -> usize {
        match &run.state {
            SyncState::StagingFiles(s) => s
                .export
                .files
                .iter()
                .filter(|r| r.status != FileStatus::Pending)
                .count(),
            _ => 0,
        }
    }

    /// Records, for every save, how many files the saved run has staged.
    struct Saves(mpsc::UnboundedSender<(String, usize)>);
    impl RunStore for Saves {
        async fn save(&mut self, run: &SyncRun) -> Result<u64, StoreError> {
            let _ = self.0.send((run.state.name().to_string(), staged(run)));
            Ok(0)
        }
    }

    /// Says when a small file was stepped.
    struct Stepped(mpsc::UnboundedSender<u32>);
    impl Observer for Stepped {
        fn stepped(&self, _: &SyncRun, _: &SyncRun, request: &Request, _: &EffectResult) {
            if let EffectId::File { index, .. } = request.id {
                let _ = self.0.send(index);
            }
        }
    }

    let spec = quick_spec(&[("TRANSFER_CONCURRENCY", "4")]);
    let plan = Plan::happy(Plan::outputs(4));
    let run = started(&spec);
    let (moved, _) = watch::channel(run.started_at.0);
    let clock = Arc::new(TestClock {
        now: AtomicU64::new(run.started_at.0),
        moved,
    });
    let release = Arc::new(Notify::new());
    let effects = Arc::new(LargeFileWorld {
        world: Mutex::new(World::new(&spec, &plan)),
        clock: clock.clone(),
        large: 3,
        release: release.clone(),
    });
    let (saved_tx, mut saved) = mpsc::unbounded_channel();
    let (stepped_tx, mut stepped) = mpsc::unbounded_channel();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let options = DriveOptions::new(Duration::MAX, None).with_clock(clock.clone());
        let drive = {
            let effects = effects.clone();
            async move {
                let mut store = Saves(saved_tx);
                driver::drive(
                    run,
                    effects.as_ref(),
                    &mut store,
                    &options,
                    &Stepped(stepped_tx),
                    std::future::pending(),
                )
                .await
            }
        };
        let drive = tokio::spawn(drive);

        // The three small files are stepped; none of them is saved yet (same instant).
        let mut small = Vec::new();
        while small.len() < 3 {
            small.push(stepped.recv().await.unwrap());
        }
        small.sort();
        assert_eq!(small, [0, 1, 2]);
        tokio::task::yield_now().await;
        while let Ok((phase, n)) = saved.try_recv() {
            assert!(n == 0, "saved at once ({phase}, {n} staged): not throttled");
        }

        // The interval passes while the large file still moves: the three are saved.
        let now = clock.now.fetch_add(1_000, Ordering::SeqCst) + 1_000;
        clock.moved.send_replace(now);
        // (A safety net, not an ordering: without the save the test would wait forever.)
        let (phase, n) = tokio::time::timeout(Duration::from_secs(30), saved.recv())
            .await
            .expect("no save while the large file moves")
            .unwrap();
        assert_eq!((phase.as_str(), n), ("staging_files", 3));

        release.notify_one();
        let (_, stopped) = drive.await.unwrap().unwrap();
        assert!(matches!(stopped, Stopped::Done(_)), "{stopped:?}");
    });
}

/// Invocation after invocation, as a Lambda runner is called: each drive reads the run from
/// the store, works for a 60 s budget and is cut 20 s later; the next one starts when the
/// previous one said to wake up. Returns how the run ended, the last run and the trace.
fn invocations_until_done(
    spec: &pathling_import_core::spec::RunSpec,
    plan: &Plan,
) -> (Terminal, SyncRun, Vec<Trace>, SimStore) {
    let (sim, mut store, _) = rig(spec, plan);
    let clock = sim.clock();
    let mut outcomes = Vec::new();
    let (terminal, last) = loop {
        assert!(outcomes.len() < 20, "no end after {outcomes:?}");
        let start = clock.real();
        let options = DriveOptions::new(Duration::from_secs(30), Some(start.plus_secs(60)))
            .with_clock(clock.clone())
            .with_cut_at(start.plus_secs(80));
        let (next, stopped) = sim
            .run(driver::drive(
                store.reload(),
                &sim,
                &mut store,
                &options,
                &sim,
                sim.crash_signal(),
            ))
            .unwrap();
        assert!(
            clock.real().0 <= start.plus_secs(80).0 + 1_000,
            "the invocation outlived its cut"
        );
        outcomes.push(format!("{stopped:?}"));
        match stopped {
            Stopped::Done(terminal) => break (*terminal, next),
            Stopped::Sleeping { until } => clock.advance_to(until),
            Stopped::OutOfBudget | Stopped::Interrupted => clock.advance(1_000),
        }
    };
    (terminal, last, sim.trace(), store)
}

fn starts_where(
    trace: &[Trace],
    wanted: impl Fn(&pathling_import_core::effect::Request) -> bool,
) -> usize {
    trace
        .iter()
        .filter(|t| matches!(t, Trace::Started { request, .. } if wanted(request)))
        .count()
}

/// A file too slow for any invocation: each invocation's cut (after its budget, before its
/// end) steps it as unfinished while the other files are staged, and the third cut fails the
/// run naming it.
#[test]
fn a_file_cut_in_every_invocation_fails_the_run_naming_it() {
    use pathling_import_core::state::FileStatus;
    let spec = quick_spec(&[("TRANSFER_CONCURRENCY", "2")]);
    let mut files = Plan::outputs(4);
    // Ten minutes to stage, against invocations of 60 s of budget and a cut 20 s later.
    files[2].slow_ms = Some(600_000);
    let mut plan = Plan::happy(files);
    plan.max_latency_ms = 200;
    let (terminal, last, trace, store) = invocations_until_done(&spec, &plan);
    let Terminal::Failed(f) = terminal else {
        panic!("{terminal:?}")
    };
    assert!(
        f.reason.starts_with(&format!(
            "could not stage {}: gave up after 3 attempt(s): unfinished:",
            plan.describe(2)
        )),
        "{}",
        f.reason
    );
    // Three attempts at the slow file, each cut; the others staged once.
    let file = |index: u32| move |r: &pathling_import_core::effect::Request| matches!(r.id, EffectId::File { index: i, .. } if i == index);
    assert_eq!(starts_where(&trace, file(2)), 3);
    for other in [0, 1, 3] {
        assert_eq!(starts_where(&trace, file(other)), 1, "file {other}");
    }
    let resume = f.resume.expect("the failed run can be retried");
    let statuses: Vec<FileStatus> = resume.export.files.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [
            FileStatus::Staged,
            FileStatus::Staged,
            FileStatus::Failed,
            FileStatus::Staged
        ]
    );
    assert_eq!(store.reload(), last, "the store holds the failed run");
}

/// A file larger than any invocation, whose transfer keeps each part it stores, moves across
/// invocations: each cut after a part more is a pause, not a failure, and the run succeeds
/// with the file staged once and the others untouched.
#[test]
fn a_resumable_file_larger_than_an_invocation_moves_across_invocations() {
    let spec = quick_spec(&[("TRANSFER_CONCURRENCY", "2")]);
    let mut files = Plan::outputs(4);
    // Ten minutes to stage, in parts of 10 s, against invocations of 60 s of budget and a cut
    // 20 s later.
    files[2].slow_ms = Some(600_000);
    files[2].part_ms = Some(10_000);
    let mut plan = Plan::happy(files);
    plan.max_latency_ms = 200;
    let (terminal, last, trace, store) = invocations_until_done(&spec, &plan);
    assert!(matches!(terminal, Terminal::Succeeded(_)), "{terminal:?}");
    let file = |index: u32| move |r: &pathling_import_core::effect::Request| matches!(r.id, EffectId::File { index: i, .. } if i == index);
    let attempts = starts_where(&trace, file(2));
    // At most 80 s an invocation, so at least eight of them; every cut gave a part more.
    assert!((8..=12).contains(&attempts), "{attempts} attempts");
    for other in [0, 1, 3] {
        assert_eq!(starts_where(&trace, file(other)), 1, "file {other}");
    }
    assert_eq!(store.reload(), last, "the store holds the finished run");
}

/// Reading the manifest (a paged one, from a slow source) that no invocation can finish is
/// cut like a file: after three cuts the run fails in its export phase, instead of asking the
/// source again from the first page in every invocation until the export expires.
#[test]
fn a_manifest_read_cut_in_every_invocation_fails_the_run() {
    let spec = quick_spec(&[]);
    let mut plan = Plan::happy(Plan::outputs(2));
    plan.max_latency_ms = 200;
    plan.slow_manifest_ms = Some(600_000);
    let (terminal, _, trace, _) = invocations_until_done(&spec, &plan);
    let Terminal::Failed(f) = terminal else {
        panic!("{terminal:?}")
    };
    assert_eq!(f.phase.as_str(), "polling_export", "{}", f.reason);
    assert!(f.reason.contains("unfinished"), "{}", f.reason);
    let polls = starts_where(&trace, |r| matches!(r.effect, Effect::PollExport { .. }));
    assert_eq!(polls, 3);
    assert_eq!(
        starts_where(&trace, |r| matches!(r.effect, Effect::StageFile { .. })),
        0
    );
}
