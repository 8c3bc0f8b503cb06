//! Deterministic simulation: a fake world answers every effect according to a seeded fault
//! plan, a virtual clock jumps to each wake-up, and a step bound turns non-termination into a
//! failure. See `common/sim.rs` for the world and the driver.
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
        reason.starts_with("could not stage output[3] Condition: HTTP 403"),
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
            pathling_import_core::state::SyncState::StagingFiles(s) => Some(
                s.export
                    .files
                    .rows
                    .iter()
                    .filter(|r| r.failures > 0)
                    .count(),
            ),
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
        let mode = if seed % 2 == 0 {
            Mode::Batch
        } else {
            Mode::Sequential
        };
        let opts = Options {
            mode,
            ..Options::default()
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
