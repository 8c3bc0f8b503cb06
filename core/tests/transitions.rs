//! One test per transition of `SyncRun::step` (arrange – act – assert), plus what `next`
//! asks for in each phase. Every (phase, result) pair the machine handles appears here;
//! refused inputs (`Stale`, `Mismatch`, `Ended`) are checked to change nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use pathling_import_core::bulk::{FileKind, OutcomeSummary};
use pathling_import_core::effect::{Effect, EffectId, EffectResult, Input, Next};
use pathling_import_core::plan::{next_run, Ask, NextRun};
use pathling_import_core::retry::{patience_ms, Failure, FailureKind, MIN_POLL_MS};
use pathling_import_core::spec::{ImportMode, PathlingApi, PathlingApiChoice};
use pathling_import_core::state::*;
use pathling_import_core::{Rejected, SyncRun, Timestamp, Watermark};
use serde_json::{json, Value};

const OUT: FileKind = FileKind::Output;
const DEL: FileKind = FileKind::Deleted;
const ERR: FileKind = FileKind::Error;

fn at(secs: u64) -> Timestamp {
    T0.plus_secs(secs)
}

fn kicking_off_export(run: &SyncRun) -> &KickingOffExport {
    match &run.state {
        SyncState::KickingOffExport(s) => s,
        other => panic!("expected kicking_off_export, got {}", other.name()),
    }
}
fn polling(run: &SyncRun) -> &PollingExport {
    match &run.state {
        SyncState::PollingExport(s) => s,
        other => panic!("expected polling_export, got {}", other.name()),
    }
}
fn staging_state(run: &SyncRun) -> &StagingFiles {
    match &run.state {
        SyncState::StagingFiles(s) => s,
        other => panic!("expected staging_files, got {}", other.name()),
    }
}
fn import_kickoff(run: &SyncRun) -> &KickingOffImport {
    match &run.state {
        SyncState::KickingOffImport(s) => s,
        other => panic!("expected kicking_off_import, got {}", other.name()),
    }
}
fn import_polling(run: &SyncRun) -> &PollingImport {
    match &run.state {
        SyncState::PollingImport(s) => s,
        other => panic!("expected polling_import, got {}", other.name()),
    }
}
fn deleting(run: &SyncRun) -> &ApplyingDeletions {
    match &run.state {
        SyncState::ApplyingDeletions(s) => s,
        other => panic!("expected applying_deletions, got {}", other.name()),
    }
}
fn cleaning_up(run: &SyncRun) -> &CleaningUp {
    match &run.state {
        SyncState::CleaningUp(s) => s,
        other => panic!("expected cleaning_up, got {}", other.name()),
    }
}
/// The run failed (directly, or once the export job is cleaned up): (phase, reason).
fn failure_of(run: &SyncRun) -> (String, String) {
    let terminal = match &run.state {
        SyncState::CleaningUp(c) => c.then.clone(),
        other => other
            .terminal()
            .unwrap_or_else(|| panic!("expected a failure, got {}", other.name())),
    };
    match terminal {
        Terminal::Failed(f) => (f.phase.to_string(), f.reason),
        other => panic!("expected Failed, got {other:?}"),
    }
}

/// Files of a typical manifest: three outputs of two types, one deleted, one error file.
const FILES: &[(FileKind, &str)] = &[
    (OUT, "Patient"),
    (OUT, "Observation"),
    (OUT, "Observation"),
    (DEL, "Bundle"),
    (ERR, "OperationOutcome"),
];

// =============================================================================================
// Start and the kick-off request.

#[test]
fn start_asks_for_a_system_kickoff_at_seq_zero() {
    let run = start(spec());

    let req = single(&run, T0);

    assert_eq!(req.id, EffectId::Run { seq: 0 });
    let Effect::KickoffExport(k) = req.effect else {
        panic!("expected a kick-off, got {:?}", req.effect)
    };
    assert_eq!(k.url, format!("{SOURCE}/$export"));
    assert_eq!(
        k.query,
        [(
            "_outputFormat".to_string(),
            "application/fhir+ndjson".to_string()
        )]
    );
    assert_eq!(k.post_body, None);
    let s = kicking_off_export(&run);
    assert_eq!(s.since, None);
    assert_eq!(s.deadline, T0.plus_ms(patience_ms(&run.spec.retry.export)));
}

#[test]
fn bad_run_ids_are_refused() {
    for id in ["", "has space", "../x", &"a".repeat(65)] {
        assert!(SyncRun::start(id, spec(), None, T0).is_err(), "{id:?}");
    }
    assert!(SyncRun::start(&"a".repeat(64), spec(), None, T0).is_ok());
}

#[test]
fn kickoff_carries_every_export_parameter_in_order() {
    let run = start(spec_with(&[
        ("TYPES", "Patient,Observation"),
        ("SINCE", "2026-01-01T00:00:00Z"),
        ("ELEMENTS", "id,meta"),
        (
            "TYPE_FILTERS",
            "Observation?status=final Patient?active=true",
        ),
        ("INCLUDE_ASSOCIATED_DATA", "LatestProvenanceResources"),
    ]));

    let Effect::KickoffExport(k) = single(&run, T0).effect else {
        panic!()
    };

    let q: Vec<(&str, &str)> = k
        .query
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        q,
        [
            ("_outputFormat", "application/fhir+ndjson"),
            ("_since", "2026-01-01T00:00:00Z"),
            ("_type", "Patient,Observation"),
            ("_elements", "id,meta"),
            ("_typeFilter", "Observation?status=final"),
            ("_typeFilter", "Patient?active=true"),
            ("includeAssociatedData", "LatestProvenanceResources"),
        ]
    );
}

#[test]
fn patient_level_kickoff_url() {
    let run = start(spec_with(&[("EXPORT_LEVEL", "patient")]));
    let Effect::KickoffExport(k) = single(&run, T0).effect else {
        panic!()
    };
    assert_eq!(k.url, format!("{SOURCE}/Patient/$export"));
    assert_eq!(k.post_body, None);
}

#[test]
fn group_level_kickoff_url() {
    let run = start(spec_with(&[("EXPORT_LEVEL", "group/cohort-7")]));
    let Effect::KickoffExport(k) = single(&run, T0).effect else {
        panic!()
    };
    assert_eq!(k.url, format!("{SOURCE}/Group/cohort-7/$export"));
}

#[test]
fn patients_make_the_kickoff_a_post_with_a_parameters_body() {
    let run = start_with_watermark(
        spec_with(&[
            ("EXPORT_LEVEL", "group/g1"),
            ("PATIENTS", "Patient/1,Patient/2"),
            ("TYPES", "Patient"),
            ("SINCE", "auto"),
        ]),
        "2026-06-01T00:00:00Z",
    );

    let Effect::KickoffExport(k) = single(&run, T0).effect else {
        panic!()
    };

    assert_eq!(k.url, format!("{SOURCE}/Group/g1/$export"));
    assert!(k.query.is_empty(), "a POST carries everything in its body");
    assert_eq!(
        k.post_body,
        Some(json!({"resourceType": "Parameters", "parameter": [
            {"name": "_outputFormat", "valueString": "application/fhir+ndjson"},
            {"name": "_since", "valueInstant": "2026-06-01T00:00:00Z"},
            {"name": "_type", "valueString": "Patient"},
            {"name": "patient", "valueReference": {"reference": "Patient/1"}},
            {"name": "patient", "valueReference": {"reference": "Patient/2"}},
        ]}))
    );
}

// =============================================================================================
// SINCE and the watermark.

fn since_param(run: &SyncRun) -> Option<String> {
    let Effect::KickoffExport(k) = single(run, T0).effect else {
        panic!()
    };
    k.query
        .into_iter()
        .find(|(n, _)| n == "_since")
        .map(|(_, v)| v)
}

#[test]
fn since_auto_takes_the_previous_watermark() {
    let run = start_with_watermark(spec_with(&[("SINCE", "auto")]), "2026-12-01T10:00:00.000Z");

    assert_eq!(
        since_param(&run).as_deref(),
        Some("2026-12-01T10:00:00.000Z")
    );
    assert_eq!(
        kicking_off_export(&run).since.as_deref(),
        Some("2026-12-01T10:00:00.000Z")
    );
}

#[test]
fn since_auto_without_a_watermark_is_a_full_export() {
    let run = start(spec_with(&[("SINCE", "auto")]));
    assert_eq!(since_param(&run), None);
}

#[test]
fn fixed_since_ignores_the_watermark() {
    let run = start_with_watermark(
        spec_with(&[("SINCE", "2025-01-01T00:00:00Z")]),
        "2026-12-01T10:00:00.000Z",
    );
    assert_eq!(since_param(&run).as_deref(), Some("2025-01-01T00:00:00Z"));
}

#[test]
fn no_since_ignores_the_watermark() {
    let run = start_with_watermark(spec(), "2026-12-01T10:00:00.000Z");
    assert_eq!(since_param(&run), None);
}

#[test]
fn since_travels_into_the_summary() {
    let run = start_with_watermark(spec_with(&[("SINCE", "auto")]), "2026-12-01T10:00:00.000Z");
    let run = answer(&run, export_accepted(), T0);
    assert_eq!(
        polling(&run).since.as_deref(),
        Some("2026-12-01T10:00:00.000Z")
    );
    let run = answer(&run, export_completed(&[]), T0);
    let run = answer(&run, EffectResult::ExportJobDeleted, T0);
    let SyncState::Succeeded(summary) = &run.state else {
        panic!()
    };
    assert_eq!(summary.since.as_deref(), Some("2026-12-01T10:00:00.000Z"));
}

#[test]
fn success_moves_the_watermark_to_this_runs_transaction_time() {
    let run = start_with_watermark(spec_with(&[("SINCE", "auto")]), "2026-12-01T10:00:00.000Z");
    let run = answer(&run, export_accepted(), T0);
    let run = answer(&run, export_completed(&[]), T0);
    // Still the previous mark while cleaning up.
    assert_eq!(
        run.watermark.as_ref().unwrap().transaction_time,
        "2026-12-01T10:00:00.000Z"
    );

    let run = answer(&run, EffectResult::ExportJobDeleted, T0);

    let mark = run.watermark.as_ref().unwrap();
    assert_eq!(mark.transaction_time, TRANSACTION_TIME);
    assert_eq!(mark.run_id, RUN_ID);
}

#[test]
fn failure_keeps_the_previous_watermark() {
    let run = start_with_watermark(spec_with(&[("SINCE", "auto")]), "2026-12-01T10:00:00.000Z");
    let run = answer(&run, export_accepted(), T0);
    let run = answer(&run, export_completed(&[(OUT, "Patient")]), T0);
    let req = requests(&run, T0).remove(0);
    let run = step_ok(&run, req.id, http(403, "Forbidden"), T0);

    assert!(matches!(run.state, SyncState::Failed(_)));
    let mark = run.watermark.as_ref().unwrap();
    assert_eq!(mark.transaction_time, "2026-12-01T10:00:00.000Z");
    assert_eq!(mark.run_id, "run-0");
}

#[test]
fn cancel_keeps_the_previous_watermark() {
    let run = start_with_watermark(spec(), "2026-12-01T10:00:00.000Z");
    let run = answer(&run, export_accepted(), T0);
    let run = answer(&run, export_completed(&[(OUT, "Patient")]), T0);
    let run = run
        .step(
            Input::Cancel {
                reason: "stop".into(),
            },
            T0,
        )
        .unwrap();
    let run = answer(&run, EffectResult::ExportJobDeleted, T0);
    assert!(matches!(run.state, SyncState::Cancelled(_)));
    assert_eq!(
        run.watermark.as_ref().unwrap().transaction_time,
        "2026-12-01T10:00:00.000Z"
    );
}

// =============================================================================================
// KickingOffExport.

#[test]
fn kickoff_202_moves_to_polling_export() {
    let run = start(spec());

    let next = answer(&run, export_accepted(), at(1));

    let s = polling(&next);
    assert_eq!(s.status_url, STATUS_URL);
    assert_eq!(s.polls, 0);
    assert_eq!(s.retry, Retrying::default());
    assert_eq!(s.deadline, kicking_off_export(&run).deadline);
    assert_eq!(next.seq, 1);
    // The first poll is due at once.
    assert!(matches!(
        single(&next, at(1)).effect,
        Effect::PollExport { .. }
    ));
}

#[test]
fn kickoff_202_with_a_relative_content_location_fails() {
    let run = start(spec());

    let next = answer(
        &run,
        EffectResult::ExportAccepted {
            status_url: "/$export-status/42".into(),
        },
        T0,
    );

    // No absolute status URL: nothing to clean up, the run fails at once.
    let SyncState::Failed(f) = &next.state else {
        panic!("{}", next.state.name())
    };
    assert_eq!(f.phase, "kicking_off_export");
    assert!(
        f.reason.contains("not an absolute http(s) URL"),
        "{}",
        f.reason
    );
    assert!(f.reason.contains("/$export-status/42"), "{}", f.reason);
}

#[test]
fn kickoff_transient_failure_backs_off() {
    let run = start(spec());

    let next = answer(&run, failed(transient_outcome(503)), at(5));

    let s = kicking_off_export(&next);
    assert_eq!(s.retry.failures, 1);
    let nb = s.retry.not_before.expect("not_before");
    assert!(nb > at(5) && nb <= at(5).plus_ms(1_000), "{nb:?}");
    assert!(s.retry.last_error.as_deref().unwrap().contains("HTTP 503"));
    // Asleep until then, and the retry carries a new id.
    assert_eq!(sleep_until(&next, at(5)), nb);
    let retry = single(&next, nb);
    assert_eq!(retry.id, EffectId::Run { seq: 1 });
    assert!(matches!(retry.effect, Effect::KickoffExport(_)));
}

#[test]
fn kickoff_429_honours_retry_after_over_the_backoff() {
    let run = start(spec());
    let f = Failure::http(429, "Too Many Requests").with_retry_after(Some("120".into()));

    let next = answer(&run, failed(f), T0);

    let s = kicking_off_export(&next);
    assert_eq!(s.retry.failures, 1);
    assert_eq!(s.retry.not_before, Some(at(120)));
}

#[test]
fn kickoff_permanent_failure_fails_naming_the_reason() {
    let run = start(spec());

    let next = answer(&run, http(400, "Unknown resource type Foo in _type"), T0);

    let SyncState::Failed(f) = &next.state else {
        panic!("{}", next.state.name())
    };
    assert_eq!(f.phase, "kicking_off_export");
    assert!(f.reason.contains("HTTP 400"), "{}", f.reason);
    assert!(
        f.reason.contains("Unknown resource type Foo"),
        "{}",
        f.reason
    );
    assert!(matches!(next.next(T0), Next::Done { .. }));
}

#[test]
fn kickoff_fails_once_its_retries_are_spent() {
    let mut run = start(spec_with(&[("EXPORT_RETRY_TIMES", "2")]));
    let mut now = T0;
    for _ in 0..2 {
        run = answer(&run, network(), now);
        now = kicking_off_export(&run).retry.not_before.unwrap();
    }
    assert_eq!(kicking_off_export(&run).retry.failures, 2);

    let next = answer(&run, network(), now);

    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "kicking_off_export");
    assert!(reason.contains("gave up after 3 attempt(s)"), "{reason}");
    assert!(reason.contains("connection reset"), "{reason}");
}

#[test]
fn kickoff_fails_at_its_deadline() {
    let run = start(spec_with(&[("EXPORT_TIMEOUT", "60")]));
    let deadline = kicking_off_export(&run).deadline;
    assert_eq!(deadline, at(60));

    let next = answer(&run, network(), deadline);

    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "kicking_off_export");
    assert!(
        reason.contains("(60 s; EXPORT_TIMEOUT sets it)"),
        "{reason}"
    );
}

#[test]
fn kickoff_backoff_never_passes_the_deadline() {
    let run = start(spec_with(&[("EXPORT_TIMEOUT", "60")]));
    let f = Failure::http(429, "slow down").with_retry_after(Some("3000".into()));

    let next = answer(&run, failed(f), at(10));

    assert_eq!(kicking_off_export(&next).retry.not_before, Some(at(60)));
}

// =============================================================================================
// PollingExport.

#[test]
fn in_progress_without_retry_after_waits_the_policy_wait() {
    let run = polling_export(spec_with(&[("EXPORT_RETRY_WAIT", "30")]));

    let next = answer(&run, export_in_progress(None), at(2));

    let s = polling(&next);
    assert_eq!(s.polls, 1);
    assert_eq!(s.progress.as_deref(), Some("45% complete"));
    assert_eq!(s.retry.not_before, Some(at(32)));
    assert_eq!(sleep_until(&next, at(2)), at(32));
    assert_eq!(single(&next, at(32)).id, EffectId::Run { seq: 2 });
}

#[test]
fn in_progress_waits_grow_by_the_back_off_factor() {
    let mut run = polling_export(spec_with(&[
        ("EXPORT_RETRY_WAIT", "10"),
        ("EXPORT_RETRY_BACK_OFF", "2"),
    ]));
    let mut now = T0;
    let mut waits = Vec::new();
    for _ in 0..4 {
        run = answer(&run, export_in_progress(None), now);
        let nb = polling(&run).retry.not_before.unwrap();
        waits.push(now.until(nb) / 1000);
        now = nb;
    }
    assert_eq!(waits, [10, 20, 40, 80]);
}

#[test]
fn in_progress_retry_after_delta_sets_the_next_wakeup() {
    let run = polling_export(spec());

    let next = answer(&run, export_in_progress(Some("120")), T0);

    assert_eq!(polling(&next).retry.not_before, Some(at(120)));
    assert_eq!(sleep_until(&next, T0), at(120));
}

#[test]
fn in_progress_retry_after_http_date_sets_the_next_wakeup() {
    let run = polling_export(spec());
    let date = http_date(at(45));
    assert_eq!(
        pathling_import_core::time::parse_http_date(&date),
        Some(at(45))
    );

    let next = answer(&run, export_in_progress(Some(&date)), T0);

    assert_eq!(polling(&next).retry.not_before, Some(at(45)));
}

#[test]
fn in_progress_retry_after_epoch_seconds_sets_the_next_wakeup() {
    let run = polling_export(spec());
    let epoch = (at(75).0 / 1000).to_string();

    let next = answer(&run, export_in_progress(Some(&epoch)), T0);

    assert_eq!(polling(&next).retry.not_before, Some(at(75)));
}

#[test]
fn in_progress_huge_epoch_retry_after_is_clamped_to_retry_after_max() {
    let run = polling_export(spec_with(&[("RETRY_AFTER_MAX", "600")]));

    let next = answer(&run, export_in_progress(Some("99999999999")), T0);

    assert_eq!(polling(&next).retry.not_before, Some(at(600)));
}

#[test]
fn in_progress_retry_after_in_the_past_or_zero_waits_the_minimum() {
    let run = polling_export(spec());
    for value in [
        "0".to_string(),
        http_date(T0),
        http_date(Timestamp(T0.0 - 3_600_000)),
    ] {
        let next = answer(&run, export_in_progress(Some(&value)), T0);
        assert_eq!(
            polling(&next).retry.not_before,
            Some(T0.plus_ms(MIN_POLL_MS)),
            "{value}"
        );
    }
}

#[test]
fn unreadable_retry_after_falls_back_to_the_schedule() {
    let run = polling_export(spec_with(&[("EXPORT_RETRY_WAIT", "30")]));
    let next = answer(&run, export_in_progress(Some("soon")), T0);
    assert_eq!(polling(&next).retry.not_before, Some(at(30)));
}

#[test]
fn polling_fails_at_the_deadline() {
    let run = polling_export(spec_with(&[("EXPORT_TIMEOUT", "3600")]));
    let deadline = polling(&run).deadline;
    assert_eq!(deadline, at(3600));

    let next = answer(&run, export_in_progress(None), deadline);

    let c = cleaning_up(&next);
    assert_eq!(c.status_url, STATUS_URL, "the export job is deleted first");
    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "polling_export");
    assert!(
        reason.contains("did not complete within 3600 s"),
        "{reason}"
    );
}

#[test]
fn poll_wakeups_never_pass_the_deadline() {
    let run = polling_export(spec_with(&[("EXPORT_TIMEOUT", "100")]));
    let next = answer(&run, export_in_progress(Some("3000")), at(50));
    assert_eq!(polling(&next).retry.not_before, Some(at(100)));
}

#[test]
fn export_retry_times_zero_polls_exactly_once() {
    let run = start(spec_with(&[("EXPORT_RETRY_TIMES", "0")]));
    let run = answer(&run, export_accepted(), T0);
    let mut polls = 0;
    let mut run = run;
    let mut now = T0;
    while !run.is_done() {
        match run.next(now) {
            Next::Run { requests } => {
                let req = &requests[0];
                let result = match req.effect {
                    Effect::PollExport { .. } => {
                        polls += 1;
                        export_in_progress(None)
                    }
                    Effect::DeleteExportJob { .. } => EffectResult::ExportJobDeleted,
                    ref other => panic!("unexpected {other:?}"),
                };
                run = step_ok(&run, req.id, result, now);
            }
            Next::SleepUntil { until, .. } => now = until,
            Next::Done { .. } => break,
        }
    }
    assert_eq!(polls, 1);
    let SyncState::Failed(f) = &run.state else {
        panic!()
    };
    assert_eq!(f.phase, "polling_export");
}

#[test]
fn export_retry_times_zero_fails_on_the_first_transient_failure() {
    let run = polling_export(spec_with(&[("EXPORT_RETRY_TIMES", "0")]));
    let next = answer(&run, network(), T0);
    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "polling_export");
    assert!(reason.contains("gave up after 1 attempt(s)"), "{reason}");
}

#[test]
fn poll_transient_failure_backs_off_without_counting_a_poll() {
    let run = polling_export(spec());
    let run = answer(&run, export_in_progress(Some("5")), T0);

    let next = answer(&run, failed(transient_outcome(500)), at(5));

    let s = polling(&next);
    assert_eq!(s.polls, 1, "a failure is not an answered poll");
    assert_eq!(s.retry.failures, 1);
    assert!(s.retry.not_before.unwrap() > at(5));
    assert!(s.retry.last_error.is_some());
}

#[test]
fn poll_429_with_epoch_retry_after_waits_until_then() {
    let run = polling_export(spec());
    let epoch = (at(300).0 / 1000).to_string();
    let f = Failure::http(429, "Too Many Requests").with_retry_after(Some(epoch));

    let next = answer(&run, failed(f), T0);

    let s = polling(&next);
    assert_eq!(s.retry.failures, 1);
    assert_eq!(s.retry.not_before, Some(at(300)));
}

#[test]
fn poll_429_with_huge_epoch_is_clamped() {
    let run = polling_export(spec_with(&[("RETRY_AFTER_MAX", "60")]));
    let f = Failure::http(429, "Too Many Requests").with_retry_after(Some("4102444800".into()));
    let next = answer(&run, failed(f), T0);
    assert_eq!(polling(&next).retry.not_before, Some(at(60)));
}

#[test]
fn in_progress_resets_the_failure_count() {
    let run = polling_export(spec());
    let run = answer(&run, network(), T0);
    let now = polling(&run).retry.not_before.unwrap();
    let next = answer(&run, export_in_progress(None), now);
    assert_eq!(polling(&next).retry.failures, 0);
    assert_eq!(polling(&next).retry.last_error, None);
}

#[test]
fn poll_permanent_failure_fails_naming_the_reason() {
    let run = polling_export(spec());

    let next = answer(&run, http(404, "Unknown export job"), T0);

    assert_eq!(cleaning_up(&next).status_url, STATUS_URL);
    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "polling_export");
    assert!(reason.contains("HTTP 404: Unknown export job"), "{reason}");
}

#[test]
fn undecodable_manifest_is_permanent() {
    let run = polling_export(spec());
    let f = Failure::new(
        FailureKind::Undecodable,
        "export manifest: output[3].url: \"x\" is not an absolute http(s) URL",
    );
    let next = answer(&run, failed(f), T0);
    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "polling_export");
    assert!(reason.contains("output[3].url"), "{reason}");
}

#[test]
fn poll_fails_once_its_retries_are_spent() {
    let mut run = polling_export(spec_with(&[("EXPORT_RETRY_TIMES", "1")]));
    run = answer(&run, network(), T0);
    let now = polling(&run).retry.not_before.unwrap();

    let next = answer(&run, network(), now);

    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "polling_export");
    assert!(reason.contains("gave up after 2 attempt(s)"), "{reason}");
}

#[test]
fn empty_manifest_cleans_up_then_succeeds_with_nothing_to_import() {
    let run = polling_export(spec());

    let next = answer(&run, export_completed(&[]), at(9));

    let c = cleaning_up(&next);
    assert_eq!(c.status_url, STATUS_URL);
    let Terminal::Succeeded(summary) = &c.then else {
        panic!("{:?}", c.then)
    };
    assert!(summary.nothing_to_import);
    assert_eq!(summary.transaction_time.as_deref(), Some(TRANSACTION_TIME));
    assert!(matches!(
        single(&next, at(9)).effect,
        Effect::DeleteExportJob { .. }
    ));

    let done = answer(&next, EffectResult::ExportJobDeleted, at(10));

    let SyncState::Succeeded(s) = &done.state else {
        panic!("{}", done.state.name())
    };
    assert!(s.nothing_to_import);
    assert_eq!(s.files, 0);
    assert_eq!(
        done.watermark.as_ref().unwrap().transaction_time,
        TRANSACTION_TIME
    );
    assert_eq!(
        done.next(at(10)),
        Next::Done {
            terminal: Terminal::Succeeded(s.clone())
        }
    );
}

#[test]
fn manifest_with_files_moves_to_staging() {
    let run = polling_export(spec_with(&[("TRANSFER_TIMEOUT", "600")]));

    let next = answer(&run, export_completed(FILES), at(20));

    let s = staging_state(&next);
    assert_eq!(s.export.status_url, STATUS_URL);
    assert_eq!(s.export.transaction_time, TRANSACTION_TIME);
    assert_eq!(
        s.export.manifest_key,
        next.spec.staging.manifest_key(RUN_ID)
    );
    assert_eq!(s.export.files.len(), 5);
    assert_eq!(
        s.export.files.types,
        ["Patient", "Observation", "Bundle", "OperationOutcome"]
    );
    assert!(s
        .export
        .files
        .iter()
        .all(|r| r.status == FileStatus::Pending && r.failures == 0));
    assert_eq!(s.stall_deadline, at(620));
}

#[test]
fn the_poll_names_where_the_manifest_must_be_stored() {
    let run = polling_export(spec());
    let Effect::PollExport {
        status_url,
        manifest_key,
    } = single(&run, T0).effect
    else {
        panic!()
    };
    assert_eq!(status_url, STATUS_URL);
    assert_eq!(manifest_key.as_str(), "sync/run-1/manifest.json");
}

// =============================================================================================
// StagingFiles.

#[test]
fn staging_hands_out_every_file_with_its_key_and_attempt() {
    let run = staging(spec(), FILES);

    let reqs = requests(&run, T0);

    assert_eq!(reqs.len(), 5);
    for (i, req) in reqs.iter().enumerate() {
        let (kind, type_name) = FILES[i];
        assert_eq!(
            req.id,
            EffectId::File {
                index: i as u32,
                attempt: 0
            }
        );
        let Effect::StageFile {
            manifest_key,
            index,
            kind: k,
            type_name: t,
            key,
            ..
        } = &req.effect
        else {
            panic!("{:?}", req.effect)
        };
        assert_eq!(manifest_key.as_str(), "sync/run-1/manifest.json");
        assert_eq!(*index, i as u32);
        assert_eq!((*k, t.as_str()), (kind, type_name));
        assert_eq!(key.0, key_of(&run, i as u32, kind, type_name));
    }
}

#[test]
fn staging_requests_carry_the_runs_validation_mode() {
    use pathling_import_core::spec::Validation;
    for (setting, want) in [
        (None, Validation::Sample),
        (Some("full"), Validation::Full),
        (Some("off"), Validation::Off),
    ] {
        let extra: Vec<(&str, &str)> = setting.map(|v| ("VALIDATE", v)).into_iter().collect();
        let run = staging(spec_with(&extra), FILES);
        for req in requests(&run, T0) {
            let Effect::StageFile { validate, .. } = req.effect else {
                panic!("{:?}", req.effect)
            };
            assert_eq!(validate, want);
        }
    }
}

#[test]
fn duplicate_urls_of_the_manifest_reach_the_summary() {
    let mut digest = digest(&[(OUT, "Patient"), (OUT, "Observation")]);
    digest.duplicates = 2;
    let run = answer(
        &polling_export(spec()),
        EffectResult::ExportCompleted { digest },
        T0,
    );
    assert_eq!(staging_state(&run).export.duplicate_urls, 2);
    assert_eq!(requests(&run, T0).len(), 2, "each listed file once");
    let run = stage_all(&run, T0);
    let run = answer(
        &run,
        EffectResult::PathlingDetected {
            api: Some(PathlingApi::V9),
            version: Some("9.8.0".into()),
        },
        T0,
    );
    let run = answer(
        &run,
        EffectResult::ImportAccepted {
            job_url: JOB_URL.into(),
        },
        T0,
    );
    let run = answer(&run, import_completed(), T0);
    let run = answer(&run, EffectResult::ExportJobDeleted, T0);
    let SyncState::Succeeded(summary) = &run.state else {
        panic!("{}", run.state.name())
    };
    assert_eq!(summary.duplicate_urls, 2);
    // Not written when zero, so envelopes without duplicates keep their shape.
    let none = answer(&polling_export(spec()), export_completed(&[]), T0);
    let none = answer(&none, EffectResult::ExportJobDeleted, T0);
    let v = serde_json::to_value(&none.state).unwrap();
    assert!(v.get("duplicate_urls").is_none(), "{v}");
    assert_eq!(
        serde_json::to_value(&run.state).unwrap()["duplicate_urls"],
        json!(2)
    );
}

#[test]
fn staging_batches_are_bounded_by_the_concurrency() {
    let files: Vec<(FileKind, &str)> = (0..100).map(|_| (OUT, "Patient")).collect();
    let run = staging(spec_with(&[("TRANSFER_CONCURRENCY", "2")]), &files);

    let reqs = requests(&run, T0);

    assert_eq!(reqs.len(), 8, "2 slots × 4 files per slot");
    let indices: Vec<u32> = reqs
        .iter()
        .map(|r| match r.id {
            EffectId::File { index, .. } => index,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(indices, (0..8).collect::<Vec<u32>>());
}

#[test]
fn a_staged_file_is_recorded_and_renews_the_stall_deadline() {
    let run = staging(spec_with(&[("TRANSFER_TIMEOUT", "600")]), FILES);
    let req = requests(&run, T0).remove(1);

    let next = step_ok(
        &run,
        req.id,
        EffectResult::FileStaged {
            bytes: 4_096,
            resources: 17,
            newline_added: true,
            outcomes: None,
        },
        at(100),
    );

    let s = staging_state(&next);
    assert_eq!(s.export.files.row(1).unwrap().status, FileStatus::Staged);
    assert_eq!(s.export.files.bytes, 4_096);
    assert_eq!(s.export.files.resources_by_type, [0, 17, 0, 0]);
    assert_eq!(s.stall_deadline, at(700));
    // It is not handed out again.
    assert!(requests(&next, at(100)).iter().all(|r| r.id
        != EffectId::File {
            index: 1,
            attempt: 0
        }));
}

#[test]
fn staging_every_file_moves_to_detecting_the_import_api_on_auto() {
    let run = staging(spec(), FILES);

    let next = stage_all(&run, at(3));

    let s = import_kickoff(&next);
    assert_eq!(s.api, ApiState::Detecting);
    assert_eq!(s.retry, Retrying::default());
    assert_eq!(
        s.deadline,
        at(3).plus_ms(patience_ms(&next.spec.retry.import))
    );
    assert_eq!(single(&next, at(3)).effect, Effect::DetectPathling);
}

#[test]
fn staging_every_file_on_pathling_api_7_knows_v7() {
    let next = stage_all(&staging(spec_with(&[("PATHLING_API", "7")]), FILES), T0);
    assert_eq!(
        import_kickoff(&next).api,
        ApiState::Known {
            api: PathlingApi::V7
        }
    );
    assert!(matches!(
        single(&next, T0).effect,
        Effect::KickoffImport {
            api: PathlingApi::V7,
            ..
        }
    ));
}

#[test]
fn staging_every_file_on_pathling_api_9_knows_v9() {
    let next = stage_all(&staging(spec_with(&[("PATHLING_API", "9")]), FILES), T0);
    assert_eq!(
        import_kickoff(&next).api,
        ApiState::Known {
            api: PathlingApi::V9
        }
    );
}

#[test]
fn staging_without_output_files_skips_the_import() {
    let run = staging(spec(), &[(DEL, "Bundle"), (ERR, "OperationOutcome")]);

    let next = stage_all(&run, T0);

    let c = cleaning_up(&next);
    let Terminal::Succeeded(s) = &c.then else {
        panic!()
    };
    assert!(s.nothing_to_import);
    assert_eq!(s.files_staged, 2);
}

#[test]
fn per_file_transient_failure_is_retried_later_with_a_new_attempt() {
    let run = staging(spec(), FILES);
    let req = requests(&run, T0).remove(2);

    let next = step_ok(&run, req.id, network(), at(1));

    let s = staging_state(&next);
    let row = s.export.files.row(2).unwrap();
    assert_eq!(row.status, FileStatus::Pending);
    assert_eq!(row.failures, 1);
    assert!(row.not_before > at(1));
    assert!(s
        .export
        .files
        .error(2)
        .unwrap()
        .contains("connection reset"));
    // Not handed out before its time, then with attempt 1.
    let now_ids: Vec<EffectId> = requests(&next, at(1)).iter().map(|r| r.id).collect();
    assert!(!now_ids
        .iter()
        .any(|id| matches!(id, EffectId::File { index: 2, .. })));
    let later: Vec<EffectId> = requests(&next, row.not_before)
        .iter()
        .map(|r| r.id)
        .collect();
    assert!(later.contains(&EffectId::File {
        index: 2,
        attempt: 1
    }));
}

#[test]
fn staging_sleeps_until_the_earliest_retry_when_only_retries_remain() {
    let run = staging(spec(), &[(OUT, "Patient"), (OUT, "Observation")]);
    let reqs = requests(&run, T0);
    let run = step_ok(&run, reqs[0].id, file_staged(), T0);
    let run = step_ok(&run, reqs[1].id, network(), T0);
    let nb = staging_state(&run).export.files.row(1).unwrap().not_before;

    assert_eq!(sleep_until(&run, T0), nb);
}

#[test]
fn a_file_staged_after_failures_forgets_them() {
    let run = staging(spec(), &[(OUT, "Patient"), (OUT, "Observation")]);
    let reqs = requests(&run, T0);
    let run = step_ok(&run, reqs[0].id, network(), T0);
    let nb = staging_state(&run).export.files.row(0).unwrap().not_before;
    let retry = requests(&run, nb).remove(0);
    assert_eq!(
        retry.id,
        EffectId::File {
            index: 0,
            attempt: 1
        }
    );

    let next = step_ok(&run, retry.id, file_staged(), nb);

    let t = &staging_state(&next).export.files;
    assert_eq!(t.row(0).unwrap().status, FileStatus::Staged);
    assert_eq!(
        t.row(0).unwrap().failures,
        0,
        "deletions count their own attempts"
    );
    assert!(t.error(0).is_none());
}

#[test]
fn per_file_permanent_failure_fails_naming_the_file() {
    let run = staging(spec(), FILES);
    let req = requests(&run, T0).remove(2);

    let next = step_ok(&run, req.id, http(403, "signature expired"), T0);
    // The other files go on: a retry then has only this one left.
    assert!(matches!(next.state, SyncState::StagingFiles(_)));
    let next = stage_all(&next, T0);

    // A file remains to be staged: the export job is kept for a retry, not deleted.
    assert!(
        matches!(next.state, SyncState::Failed(_)),
        "{:?}",
        next.state
    );
    let point = next.resumable().expect("a retry can continue the run");
    assert!(point.export_kept);
    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "staging_files");
    assert!(
        reason.starts_with("could not stage output[2] Observation: HTTP 403"),
        "{reason}"
    );
}

#[test]
fn permanent_failure_of_a_deleted_or_error_file_names_its_array() {
    for (index, name) in [
        (3usize, "deleted[0] Bundle"),
        (4, "error[0] OperationOutcome"),
    ] {
        let run = staging(spec(), FILES);
        let req = requests(&run, T0).remove(index);
        let next = step_ok(
            &run,
            req.id,
            failed(Failure::new(
                FailureKind::Storage { transient: false },
                "AccessDenied",
            )),
            T0,
        );
        let (_, reason) = failure_of(&next);
        assert!(
            reason.contains(&format!(
                "could not stage {name}: staging store: AccessDenied"
            )),
            "{reason}"
        );
    }
}

#[test]
fn per_file_retries_spent_fail_naming_the_file() {
    let mut run = staging(
        spec_with(&[("TRANSFER_RETRY_TIMES", "2")]),
        &[(OUT, "Patient")],
    );
    let mut now = T0;
    for _ in 0..2 {
        let req = requests(&run, now).remove(0);
        run = step_ok(&run, req.id, network(), now);
        now = staging_state(&run).export.files.row(0).unwrap().not_before;
    }
    let req = requests(&run, now).remove(0);
    assert_eq!(
        req.id,
        EffectId::File {
            index: 0,
            attempt: 2
        }
    );

    let next = step_ok(&run, req.id, network(), now);

    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "staging_files");
    assert!(
        reason.contains("could not stage output[0] Patient: gave up after 3 attempt(s)"),
        "{reason}"
    );
}

#[test]
fn staging_fails_when_no_file_is_staged_within_the_transfer_patience() {
    let run = staging(
        spec_with(&[("TRANSFER_TIMEOUT", "60")]),
        &[(OUT, "Patient")],
    );
    let stall = staging_state(&run).stall_deadline;
    assert_eq!(stall, at(60));
    let req = requests(&run, T0).remove(0);
    let run = step_ok(&run, req.id, network(), at(10));
    let nb = staging_state(&run).export.files.row(0).unwrap().not_before;
    assert!(nb <= stall);

    let req = requests(&run, at(61)).remove(0);
    let next = step_ok(&run, req.id, network(), at(61));

    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "staging_files");
    assert!(
        reason.contains("no file was staged for 60 s (TRANSFER_TIMEOUT sets this patience)"),
        "{reason}"
    );
}

/// A fan-out hands out up to MAX_RETRYING due files at once, whatever the concurrency, and
/// nothing outside staging; its results step like the drive's own.
#[test]
fn a_fan_out_batch_is_as_wide_as_the_retry_bound_and_only_while_staging() {
    use pathling_import_core::machine::MAX_RETRYING;
    let files: Vec<(FileKind, &str)> = (0..100).map(|_| (OUT, "Patient")).collect();
    let run = staging(spec_with(&[("TRANSFER_CONCURRENCY", "1")]), &files);
    assert_eq!(requests(&run, T0).len(), 4, "one worker's batch");
    let batch = run.fan_out_batch(T0);
    assert_eq!(batch.len(), MAX_RETRYING);
    let indexes: Vec<u32> = batch
        .iter()
        .map(|r| match r.id {
            EffectId::File { index, attempt: 0 } => index,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(indexes, (0..MAX_RETRYING as u32).collect::<Vec<_>>());
    // Its results step in as any other.
    let mut run = run;
    for r in &batch {
        run = step_ok(&run, r.id, file_staged(), T0);
    }
    let next = run.fan_out_batch(T0);
    assert_eq!(next.len(), 100 - MAX_RETRYING);
    assert!(matches!(next[0].id, EffectId::File { index, .. } if index == MAX_RETRYING as u32));
    // Outside staging: nothing.
    let fresh = SyncRun::start("r", spec(), None, T0).unwrap();
    assert!(fresh.fan_out_batch(T0).is_empty());
}

/// A cut after a checkpoint advanced is progress: it neither counts as a failure nor waits,
/// and it restarts the staging patience, however often it comes (each one stored more).
#[test]
fn a_paused_file_goes_on_at_once_without_counting_a_failure() {
    let run = staging(
        spec_with(&[("TRANSFER_RETRY_TIMES", "1"), ("TRANSFER_TIMEOUT", "60")]),
        &[(OUT, "Patient")],
    );
    let mut run = run;
    let mut now = T0;
    for i in 1..=10u64 {
        let req = requests(&run, now).remove(0);
        let paused = Failure::new(FailureKind::Paused, "the invocation ended");
        now = at(50 * i);
        run = step_ok(&run, req.id, failed(paused), now);
        let s = staging_state(&run);
        let row = s.export.files.row(0).unwrap();
        assert_eq!(row.failures, 0, "not a failure");
        assert!(row.not_before <= now, "goes on at once");
        assert_eq!(s.stall_deadline, at(50 * i + 60), "patience restarts");
        assert!(s.export.files.error(0).is_none(), "no error kept");
    }
    // An ordinary failure after the pauses still counts from zero.
    let req = requests(&run, now).remove(0);
    let run = step_ok(&run, req.id, network(), now);
    assert_eq!(staging_state(&run).export.files.row(0).unwrap().failures, 1);
}

#[test]
fn per_file_retry_after_is_honoured() {
    let run = staging(spec(), &[(OUT, "Patient")]);
    let req = requests(&run, T0).remove(0);
    let f = Failure::http(503, "Slow Down").with_retry_after(Some("90".into()));

    let next = step_ok(&run, req.id, failed(f), T0);

    assert_eq!(
        staging_state(&next).export.files.row(0).unwrap().not_before,
        at(90)
    );
}

#[test]
fn fresh_files_wait_while_a_batch_worth_of_files_is_retrying() {
    // 1 slot: a batch is 4 files. Four failing files hold back the fifth.
    let files: Vec<(FileKind, &str)> = (0..6).map(|_| (OUT, "Patient")).collect();
    let run = staging(spec_with(&[("TRANSFER_CONCURRENCY", "1")]), &files);
    let mut run = run;
    for req in requests(&run, T0) {
        run = step_ok(&run, req.id, network(), T0);
    }
    let t = &staging_state(&run).export.files;
    assert_eq!(t.iter().filter(|r| r.failures > 0).count(), 4);

    // Files 4 and 5 are fresh and due, yet the run sleeps until the first retry.
    let first_retry = t.iter().take(4).map(|r| r.not_before).min().unwrap();
    assert_eq!(sleep_until(&run, T0), first_retry);
    let reqs = requests(&run, first_retry);
    assert!(reqs
        .iter()
        .all(|r| matches!(r.id, EffectId::File { index, attempt: 1 } if index < 4)));

    // Once a retrying file is staged, fresh files flow again.
    let mut run = step_ok(&run, reqs[0].id, file_staged(), first_retry);
    let due = staging_state(&run)
        .export
        .files
        .iter()
        .map(|r| r.not_before)
        .max()
        .unwrap();
    let ids: Vec<EffectId> = requests(&run, due).iter().map(|r| r.id).collect();
    assert!(ids.contains(&EffectId::File {
        index: 4,
        attempt: 0
    }));
    for req in requests(&run, due) {
        run = step_ok(&run, req.id, file_staged(), due);
    }
}

#[test]
fn error_file_with_a_fatal_outcome_fails_the_run() {
    let run = staging(spec(), &[(OUT, "Patient"), (ERR, "OperationOutcome")]);
    let reqs = requests(&run, T0);
    let run = step_ok(&run, reqs[0].id, file_staged(), T0);

    let next = step_ok(
        &run,
        reqs[1].id,
        error_file_staged(&[WARNING_OUTCOME, FATAL_OUTCOME]),
        T0,
    );

    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "staging_files");
    assert!(reason.contains("1 fatal error(s)"), "{reason}");
    assert!(reason.contains("Observation export aborted"), "{reason}");
    let SyncState::CleaningUp(c) = &next.state else {
        panic!()
    };
    let Terminal::Failed(f) = &c.then else {
        panic!()
    };
    assert_eq!(f.summary.source_errors.fatal, 1);
    assert_eq!(f.summary.source_errors.warning, 1);
}

#[test]
fn error_file_without_fatal_issues_is_reported_but_not_fatal() {
    let run = staging(spec(), &[(OUT, "Patient"), (ERR, "OperationOutcome")]);
    let reqs = requests(&run, T0);
    let run = step_ok(&run, reqs[0].id, file_staged(), T0);

    let next = step_ok(&run, reqs[1].id, error_file_staged(&[WARNING_OUTCOME]), T0);

    let s = import_kickoff(&next);
    assert_eq!(s.export.source_errors.warning, 1);
    assert_eq!(
        s.export.source_errors.samples,
        ["warning: Patient/9 skipped"]
    );
}

#[test]
fn absurd_counts_from_the_executor_saturate_instead_of_panicking() {
    let run = staging(
        spec(),
        &[
            (OUT, "Patient"),
            (OUT, "Observation"),
            (ERR, "OperationOutcome"),
        ],
    );
    let reqs = requests(&run, T0);
    let huge = EffectResult::FileStaged {
        bytes: u64::MAX,
        resources: u64::MAX,
        newline_added: false,
        outcomes: None,
    };
    let run = step_ok(&run, reqs[0].id, huge.clone(), T0);
    let mut run = step_ok(&run, reqs[1].id, huge, T0);
    // As if earlier error files had already reported a vast number of fatal issues.
    if let SyncState::StagingFiles(s) = &mut run.state {
        s.export.source_errors.fatal = u64::MAX;
    }
    let outcomes = OutcomeSummary {
        fatal: u64::MAX,
        ..OutcomeSummary::default()
    };

    let next = step_ok(
        &run,
        reqs[2].id,
        EffectResult::FileStaged {
            bytes: 1,
            resources: 1,
            newline_added: false,
            outcomes: Some(outcomes),
        },
        T0,
    );

    let SyncState::CleaningUp(c) = &next.state else {
        panic!()
    };
    let Terminal::Failed(f) = &c.then else {
        panic!()
    };
    assert_eq!(f.summary.resources, u64::MAX);
    assert_eq!(f.summary.bytes, u64::MAX);
    assert_eq!(f.summary.source_errors.fatal, u64::MAX);
}

#[test]
fn staging_results_with_stale_ids_are_refused() {
    let run = staging(spec(), FILES);
    let reqs = requests(&run, T0);
    let run = step_ok(&run, reqs[0].id, file_staged(), T0);
    let run = step_ok(&run, reqs[1].id, network(), T0);

    // Already staged.
    let e = refused(&run, completed(reqs[0].id, file_staged()), T0);
    assert_eq!(e, Rejected::Stale { got: reqs[0].id });
    // The failed attempt's id (the file now expects attempt 1).
    let e = refused(&run, completed(reqs[1].id, file_staged()), T0);
    assert_eq!(e, Rejected::Stale { got: reqs[1].id });
    // An attempt from the future.
    let future = EffectId::File {
        index: 2,
        attempt: 5,
    };
    assert_eq!(
        refused(&run, completed(future, file_staged()), T0),
        Rejected::Stale { got: future }
    );
    // No such file.
    let nowhere = EffectId::File {
        index: 99,
        attempt: 0,
    };
    assert_eq!(
        refused(&run, completed(nowhere, file_staged()), T0),
        Rejected::Stale { got: nowhere }
    );
    // A run-level id.
    let run_id = EffectId::Run { seq: run.seq };
    assert_eq!(
        refused(&run, completed(run_id, file_staged()), T0),
        Rejected::Stale { got: run_id }
    );
    // A deletions id during staging.
    let del = EffectId::Deletions {
        index: 3,
        attempt: 0,
    };
    assert_eq!(
        refused(&run, completed(del, file_staged()), T0),
        Rejected::Stale { got: del }
    );
}

#[test]
fn staging_refuses_results_of_the_wrong_kind() {
    let run = staging(spec(), FILES);
    let id = requests(&run, T0)[0].id;
    for result in [
        import_completed(),
        export_in_progress(None),
        EffectResult::DeletionsApplied {
            deleted: 1,
            absent: 0,
        },
    ] {
        let e = refused(&run, completed(id, result), T0);
        assert!(
            matches!(
                e,
                Rejected::Mismatch {
                    phase: Phase::StagingFiles,
                    ..
                }
            ),
            "{e:?}"
        );
    }
}

// =============================================================================================
// KickingOffImport.

#[test]
fn detection_of_v7_knows_v7() {
    let run = kicking_off_import(spec(), FILES);

    let next = answer(
        &run,
        EffectResult::PathlingDetected {
            api: Some(PathlingApi::V7),
            version: Some("7.2.0+4bd8e1a".into()),
        },
        T0,
    );

    assert_eq!(
        import_kickoff(&next).api,
        ApiState::Known {
            api: PathlingApi::V7
        }
    );
}

#[test]
fn detection_of_v9_knows_v9() {
    let run = kicking_off_import(spec(), FILES);

    let next = answer(
        &run,
        EffectResult::PathlingDetected {
            api: Some(PathlingApi::V9),
            version: Some("9.8.0".into()),
        },
        T0,
    );

    assert_eq!(
        import_kickoff(&next).api,
        ApiState::Known {
            api: PathlingApi::V9
        }
    );
    assert!(matches!(
        single(&next, T0).effect,
        Effect::KickoffImport {
            api: PathlingApi::V9,
            ..
        }
    ));
}

#[test]
fn detection_without_a_version_guesses_v9() {
    let run = kicking_off_import(spec(), FILES);

    let next = answer(
        &run,
        EffectResult::PathlingDetected {
            api: None,
            version: Some("UNKNOWN".into()),
        },
        T0,
    );

    assert_eq!(
        import_kickoff(&next).api,
        ApiState::Guessed {
            api: PathlingApi::V9
        }
    );
}

#[test]
fn detection_transient_failure_is_retried() {
    let run = kicking_off_import(spec(), FILES);

    let next = answer(&run, failed(transient_outcome(503)), T0);

    let s = import_kickoff(&next);
    assert_eq!(s.api, ApiState::Detecting);
    assert_eq!(s.retry.failures, 1);
    let nb = s.retry.not_before.unwrap();
    assert_eq!(single(&next, nb).effect, Effect::DetectPathling);
}

#[test]
fn detection_permanent_failure_guesses_v9() {
    let run = kicking_off_import(spec(), FILES);

    let next = answer(&run, http(401, "Unauthorized"), T0);

    assert_eq!(
        import_kickoff(&next).api,
        ApiState::Guessed {
            api: PathlingApi::V9
        }
    );
}

#[test]
fn v7_detected_with_an_import_mode_it_lacks_fails() {
    let run = kicking_off_import(spec_with(&[("IMPORT_MODE", "append")]), FILES);

    let next = answer(
        &run,
        EffectResult::PathlingDetected {
            api: Some(PathlingApi::V7),
            version: Some("7.2.0".into()),
        },
        T0,
    );

    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "kicking_off_import");
    assert!(
        reason.contains("IMPORT_MODE append needs Pathling 9.2+") && reason.contains("7.2.0"),
        "{reason}"
    );
    assert_eq!(cleaning_up(&next).status_url, STATUS_URL);
}

#[test]
fn v7_detected_with_apply_deletions_and_deleted_files_fails() {
    let run = kicking_off_import(spec_with(&[("APPLY_DELETIONS", "true")]), FILES);

    let next = answer(
        &run,
        EffectResult::PathlingDetected {
            api: Some(PathlingApi::V7),
            version: None,
        },
        T0,
    );

    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "kicking_off_import");
    assert!(
        reason.contains("APPLY_DELETIONS needs Pathling 9.x"),
        "{reason}"
    );
}

#[test]
fn v7_detected_with_apply_deletions_but_no_deleted_files_proceeds() {
    let run = kicking_off_import(
        spec_with(&[("APPLY_DELETIONS", "true")]),
        &[(OUT, "Patient")],
    );
    let next = answer(
        &run,
        EffectResult::PathlingDetected {
            api: Some(PathlingApi::V7),
            version: None,
        },
        T0,
    );
    assert_eq!(
        import_kickoff(&next).api,
        ApiState::Known {
            api: PathlingApi::V7
        }
    );
}

fn guessed_v9(spec: pathling_import_core::spec::RunSpec) -> SyncRun {
    let run = kicking_off_import(spec, FILES);
    answer(
        &run,
        EffectResult::PathlingDetected {
            api: None,
            version: None,
        },
        T0,
    )
}

#[test]
fn guessed_v9_answered_by_a_7x_server_switches_to_v7_once() {
    let run = guessed_v9(spec());
    assert!(matches!(
        single(&run, T0).effect,
        Effect::KickoffImport {
            api: PathlingApi::V9,
            ..
        }
    ));

    // Pathling 7.x answers the 9.x shape by asking for `source`.
    let next = answer(&run, http(400, "Missing 'source' parameter."), T0);

    let s = import_kickoff(&next);
    assert_eq!(
        s.api,
        ApiState::Known {
            api: PathlingApi::V7
        }
    );
    assert_eq!(s.retry, Retrying::default());
    assert!(matches!(
        single(&next, T0).effect,
        Effect::KickoffImport {
            api: PathlingApi::V7,
            ..
        }
    ));

    // Once switched, the other generation's answer is final.
    let again = answer(&next, http(400, "The input may not be empty."), T0);
    let (phase, reason) = failure_of(&again);
    assert_eq!(phase, "kicking_off_import");
    assert!(reason.contains("set PATHLING_API=9 or auto"), "{reason}");
}

#[test]
fn guessed_v7_answered_by_a_9x_server_switches_to_v9() {
    // The machine only ever guesses 9.x, but a guessed 7.x must switch the same way.
    let mut run = guessed_v9(spec());
    if let SyncState::KickingOffImport(s) = &mut run.state {
        s.api = ApiState::Guessed {
            api: PathlingApi::V7,
        };
    }

    let next = answer(&run, http(400, "The input may not be empty."), T0);

    assert_eq!(
        import_kickoff(&next).api,
        ApiState::Known {
            api: PathlingApi::V9
        }
    );
}

#[test]
fn guessed_v9_answered_input_may_not_be_empty_does_not_switch() {
    // "The input may not be empty." is how 9.x refuses the 7.x shape: sent the 9.x shape, it
    // is no sign of the other generation, so it is an ordinary permanent 400.
    let run = guessed_v9(spec());

    let next = answer(&run, http(400, "The input may not be empty."), T0);

    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "kicking_off_import");
    assert!(reason.contains("HTTP 400"), "{reason}");
    assert!(!reason.contains("PATHLING_API"), "{reason}");
}

#[test]
fn configured_v9_answered_by_a_7x_server_fails_with_a_hint() {
    let run = kicking_off_import(spec_with(&[("PATHLING_API", "9")]), FILES);

    let next = answer(&run, http(400, "Missing 'source' parameter."), T0);

    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "kicking_off_import");
    assert!(reason.contains("set PATHLING_API=7 or auto"), "{reason}");
}

#[test]
fn import_not_allowed_source_is_permanent_not_a_generation_switch() {
    let run = guessed_v9(spec());
    let next = answer(
        &run,
        http(
            403,
            "s3a://staging-bucket/x is not an allowed source for import.",
        ),
        T0,
    );
    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "kicking_off_import");
    assert!(reason.contains("not an allowed source"), "{reason}");
}

#[test]
fn import_503_another_import_in_progress_is_retried() {
    let run = kicking_off_import(spec_with(&[("PATHLING_API", "9")]), FILES);
    let f = Failure::http(503, "Another import operation is currently in progress")
        .with_retry_after(Some("30".into()));

    let next = answer(&run, failed(f), at(1));

    let s = import_kickoff(&next);
    assert_eq!(s.retry.failures, 1);
    assert_eq!(s.retry.not_before, Some(at(31)));
    assert!(s
        .retry
        .last_error
        .as_deref()
        .unwrap()
        .contains("Another import"));
    assert!(matches!(
        single(&next, at(31)).effect,
        Effect::KickoffImport { .. }
    ));
}

#[test]
fn import_kickoff_fails_once_its_retries_are_spent() {
    let mut run = kicking_off_import(
        spec_with(&[("PATHLING_API", "9"), ("IMPORT_RETRY_TIMES", "1")]),
        FILES,
    );
    run = answer(&run, http(503, "busy"), T0);
    let nb = import_kickoff(&run).retry.not_before.unwrap();

    let next = answer(&run, http(503, "busy"), nb);

    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "kicking_off_import");
    assert!(
        reason.contains("import kick-off failed: gave up after 2 attempt(s)"),
        "{reason}"
    );
}

#[test]
fn import_kickoff_fails_at_its_deadline() {
    let run = kicking_off_import(
        spec_with(&[("PATHLING_API", "9"), ("IMPORT_TIMEOUT", "120")]),
        FILES,
    );
    let deadline = import_kickoff(&run).deadline;
    let next = answer(&run, http(503, "busy"), deadline);
    let (_, reason) = failure_of(&next);
    assert!(
        reason.contains("(120 s; IMPORT_TIMEOUT sets it)"),
        "{reason}"
    );
}

#[test]
fn import_accepted_moves_to_polling_import() {
    let run = kicking_off_import(spec_with(&[("PATHLING_API", "9")]), FILES);
    let deadline = import_kickoff(&run).deadline;

    let next = answer(
        &run,
        EffectResult::ImportAccepted {
            job_url: JOB_URL.into(),
        },
        at(4),
    );

    let s = import_polling(&next);
    assert_eq!(s.job_url, JOB_URL);
    assert_eq!(s.api, PathlingApi::V9);
    assert_eq!(s.polls, 0);
    assert_eq!(
        s.deadline, deadline,
        "kick-off and polls share one deadline"
    );
    assert_eq!(
        single(&next, at(4)).effect,
        Effect::PollImport {
            job_url: JOB_URL.into()
        }
    );
}

#[test]
fn import_accepted_with_a_relative_job_url_fails() {
    let run = kicking_off_import(spec_with(&[("PATHLING_API", "9")]), FILES);

    let next = answer(
        &run,
        EffectResult::ImportAccepted {
            job_url: "$job?id=1".into(),
        },
        T0,
    );

    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "kicking_off_import");
    assert!(reason.contains("not an absolute http(s) URL"), "{reason}");
}

fn import_body(run: &SyncRun) -> (PathlingApi, Value) {
    match single(run, T0).effect {
        Effect::KickoffImport {
            api, parameters, ..
        } => (api, parameters),
        other => panic!("{other:?}"),
    }
}

#[test]
fn v7_import_parameters_list_every_staged_output_as_a_source() {
    let run = kicking_off_import(
        spec_with(&[("PATHLING_API", "7"), ("IMPORT_MODE", "overwrite")]),
        FILES,
    );

    let (api, params) = import_body(&run);

    assert_eq!(api, PathlingApi::V7);
    let source = |i: u32, t: &str| {
        json!({"name": "source", "part": [
            {"name": "resourceType", "valueCode": t},
            {"name": "url", "valueUrl": format!("s3://staging-bucket/{}", key_of(&run, i, OUT, t))},
            {"name": "mode", "valueCode": "overwrite"},
        ]})
    };
    assert_eq!(
        params,
        json!({"resourceType": "Parameters", "parameter": [
            source(0, "Patient"), source(1, "Observation"), source(2, "Observation")
        ]})
    );
}

#[test]
fn v9_import_parameters_list_every_staged_output_as_an_input() {
    let run = kicking_off_import(spec_with(&[("PATHLING_API", "9")]), FILES);

    let (api, params) = import_body(&run);

    assert_eq!(api, PathlingApi::V9);
    let input = |i: u32, t: &str| {
        json!({"name": "input", "part": [
            {"name": "resourceType", "valueCode": t},
            {"name": "url", "valueUrl": format!("s3a://staging-bucket/{}", key_of(&run, i, OUT, t))},
        ]})
    };
    assert_eq!(
        params,
        json!({"resourceType": "Parameters", "parameter": [
            {"name": "inputFormat", "valueCode": "application/fhir+ndjson"},
            {"name": "saveMode", "valueCode": "merge"},
            input(0, "Patient"), input(1, "Observation"), input(2, "Observation")
        ]})
    );
}

#[test]
fn import_parameters_of_many_files_name_each_exactly_once() {
    let types = ["Patient", "Observation", "Encounter"];
    let files: Vec<(FileKind, &str)> = (0..250).map(|i| (OUT, types[i % 3])).collect();
    let run = kicking_off_import(spec_with(&[("PATHLING_API", "9")]), &files);

    let (_, params) = import_body(&run);

    let urls: Vec<&str> = params["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "input")
        .map(|p| p["part"][1]["valueUrl"].as_str().unwrap())
        .collect();
    let mut unique = urls.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(urls.len(), 250);
    assert_eq!(unique.len(), 250);
}

#[test]
fn import_kickoff_refuses_results_of_the_wrong_kind() {
    let detecting = kicking_off_import(spec(), FILES);
    let id = single(&detecting, T0).id;
    assert!(matches!(
        refused(
            &detecting,
            completed(
                id,
                EffectResult::ImportAccepted {
                    job_url: JOB_URL.into()
                }
            ),
            T0
        ),
        Rejected::Mismatch {
            phase: Phase::KickingOffImport,
            ..
        }
    ));
    let known = kicking_off_import(spec_with(&[("PATHLING_API", "9")]), FILES);
    let id = single(&known, T0).id;
    assert!(matches!(
        refused(
            &known,
            completed(
                id,
                EffectResult::PathlingDetected {
                    api: None,
                    version: None
                }
            ),
            T0
        ),
        Rejected::Mismatch { .. }
    ));
    assert_eq!(
        refused(
            &known,
            completed(
                EffectId::Run {
                    seq: id_seq(id) - 1
                },
                import_completed()
            ),
            T0
        ),
        Rejected::Stale {
            got: EffectId::Run {
                seq: id_seq(id) - 1
            }
        }
    );
}

fn id_seq(id: EffectId) -> u64 {
    match id {
        EffectId::Run { seq } => seq,
        other => panic!("{other:?}"),
    }
}

// =============================================================================================
// PollingImport.

#[test]
fn import_in_progress_waits_and_counts_a_poll() {
    let run = polling_import(spec_with(&[("IMPORT_RETRY_WAIT", "15")]), FILES);

    let next = answer(
        &run,
        EffectResult::ImportInProgress {
            progress: Some("40%".into()),
            retry_after: None,
        },
        T0,
    );

    let s = import_polling(&next);
    assert_eq!(s.polls, 1);
    assert_eq!(s.progress.as_deref(), Some("40%"));
    assert_eq!(s.retry.not_before, Some(at(15)));
}

#[test]
fn import_in_progress_honours_retry_after() {
    let run = polling_import(spec(), FILES);
    let next = answer(
        &run,
        EffectResult::ImportInProgress {
            progress: None,
            retry_after: Some(http_date(at(7))),
        },
        T0,
    );
    assert_eq!(import_polling(&next).retry.not_before, Some(at(7)));
}

#[test]
fn import_poll_deadline_fails() {
    let run = polling_import(spec_with(&[("IMPORT_TIMEOUT", "300")]), FILES);
    let deadline = import_polling(&run).deadline;

    let next = answer(
        &run,
        EffectResult::ImportInProgress {
            progress: None,
            retry_after: None,
        },
        deadline,
    );

    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "polling_import");
    assert!(
        reason.contains("the import did not complete within 300 s"),
        "{reason}"
    );
}

#[test]
fn import_poll_503_is_retried() {
    let run = polling_import(spec(), FILES);
    let next = answer(&run, http(503, "Service Unavailable"), T0);
    let s = import_polling(&next);
    assert_eq!(s.retry.failures, 1);
    assert!(s.retry.not_before.unwrap() > T0);
}

#[test]
fn import_job_failure_fails_naming_the_reason() {
    let run = polling_import(spec(), FILES);

    let next = answer(&run, http(400, "Resource Patient has no id"), T0);

    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "polling_import");
    assert!(
        reason.contains("import failed: HTTP 400: Resource Patient has no id"),
        "{reason}"
    );
    let SyncState::CleaningUp(c) = &next.state else {
        panic!()
    };
    let Terminal::Failed(f) = &c.then else {
        panic!()
    };
    assert_eq!(f.summary.import_job.as_deref(), Some(JOB_URL));
}

#[test]
fn import_completed_cleans_up_then_succeeds_with_the_watermark_set() {
    let run = polling_import(spec(), FILES);

    let next = answer(&run, import_completed(), at(30));

    let c = cleaning_up(&next);
    let Terminal::Succeeded(s) = &c.then else {
        panic!()
    };
    assert!(!s.nothing_to_import);
    assert_eq!(s.imported_files, 3);
    assert_eq!(s.files, 5);
    assert_eq!(s.files_staged, 5);
    assert_eq!(s.import_job.as_deref(), Some(JOB_URL));
    assert_eq!(s.resources_by_type["Patient"], 10);
    assert_eq!(s.resources_by_type["Observation"], 20);
    assert_eq!(s.resources, 30);
    assert_eq!(next.watermark, None, "not before the run has ended");

    let done = answer(&next, EffectResult::ExportJobDeleted, at(31));

    assert!(matches!(done.state, SyncState::Succeeded(_)));
    assert_eq!(
        done.watermark.as_ref().unwrap().transaction_time,
        TRANSACTION_TIME
    );
}

#[test]
fn import_completed_with_apply_deletions_and_deleted_files_applies_them() {
    let run = polling_import(spec_with(&[("APPLY_DELETIONS", "true")]), FILES);

    let next = answer(&run, import_completed(), T0);

    let s = deleting(&next);
    assert_eq!(s.import_job.as_deref(), Some(JOB_URL));
    assert_eq!((s.deleted, s.absent), (0, 0));
    let reqs = requests(&next, T0);
    assert_eq!(reqs.len(), 1, "only the deleted[] file");
    assert_eq!(
        reqs[0].id,
        EffectId::Deletions {
            index: 3,
            attempt: 0
        }
    );
    assert_eq!(
        reqs[0].effect,
        Effect::ApplyDeletions {
            index: 3,
            key: next.spec.staging.file_key(RUN_ID, 3, DEL, "Bundle"),
        }
    );
}

#[test]
fn import_completed_with_apply_deletions_but_no_deleted_files_cleans_up() {
    let run = polling_import(
        spec_with(&[("APPLY_DELETIONS", "true")]),
        &[(OUT, "Patient")],
    );
    let next = answer(&run, import_completed(), T0);
    assert!(matches!(cleaning_up(&next).then, Terminal::Succeeded(_)));
}

#[test]
fn import_completed_without_apply_deletions_ignores_deleted_files() {
    let run = polling_import(spec(), FILES);
    let next = answer(&run, import_completed(), T0);
    assert!(matches!(cleaning_up(&next).then, Terminal::Succeeded(_)));
}

#[test]
fn polling_import_refuses_results_of_the_wrong_kind() {
    let run = polling_import(spec(), FILES);
    let id = single(&run, T0).id;
    assert!(matches!(
        refused(&run, completed(id, export_in_progress(None)), T0),
        Rejected::Mismatch {
            phase: Phase::PollingImport,
            ..
        }
    ));
}

// =============================================================================================
// ApplyingDeletions.

const TWO_DELETED: &[(FileKind, &str)] = &[(OUT, "Patient"), (DEL, "Bundle"), (DEL, "Bundle")];

fn applying(files: &[(FileKind, &str)]) -> SyncRun {
    let run = polling_import(spec_with(&[("APPLY_DELETIONS", "true")]), files);
    answer(&run, import_completed(), T0)
}

#[test]
fn deletions_applied_mark_each_file_then_succeed_with_the_counts() {
    let run = applying(TWO_DELETED);
    let reqs = requests(&run, T0);
    assert_eq!(reqs.len(), 2);

    let run = step_ok(
        &run,
        reqs[0].id,
        EffectResult::DeletionsApplied {
            deleted: 5,
            absent: 1,
        },
        T0,
    );
    let s = deleting(&run);
    assert_eq!(s.export.files.row(1).unwrap().status, FileStatus::Applied);
    assert_eq!((s.deleted, s.absent), (5, 1));

    let done = step_ok(
        &run,
        reqs[1].id,
        EffectResult::DeletionsApplied {
            deleted: 2,
            absent: 0,
        },
        T0,
    );

    let Terminal::Succeeded(s) = &cleaning_up(&done).then else {
        panic!()
    };
    assert_eq!((s.deleted, s.already_absent), (7, 1));
    assert!(!s.nothing_to_import);
    assert_eq!(s.imported_files, 1, "the import is still reported");
    assert_eq!(s.import_job.as_deref(), Some(JOB_URL));
}

#[test]
fn deletions_without_an_import_report_nothing_imported() {
    let run = stage_all(
        &staging(
            spec_with(&[("APPLY_DELETIONS", "true")]),
            &[(DEL, "Bundle")],
        ),
        T0,
    );
    let s = deleting(&run);
    assert_eq!(s.import_job, None);
    let req = requests(&run, T0).remove(0);
    let done = step_ok(
        &run,
        req.id,
        EffectResult::DeletionsApplied {
            deleted: 1,
            absent: 0,
        },
        T0,
    );
    let Terminal::Succeeded(s) = &cleaning_up(&done).then else {
        panic!()
    };
    assert!(s.nothing_to_import);
    assert_eq!(s.deleted, 1);
}

#[test]
fn deletion_transient_failure_is_retried_with_a_new_attempt() {
    let run = applying(TWO_DELETED);
    let req = requests(&run, T0).remove(0);

    let next = step_ok(&run, req.id, http(503, "busy"), T0);

    let row = deleting(&next).export.files.row(1).unwrap();
    assert_eq!(row.status, FileStatus::Staged);
    assert_eq!(row.failures, 1);
    let retry = requests(&next, row.not_before);
    assert!(retry.iter().any(|r| r.id
        == EffectId::Deletions {
            index: 1,
            attempt: 1
        }));
}

#[test]
fn deletion_permanent_failure_fails_naming_the_file() {
    let run = applying(TWO_DELETED);
    let req = requests(&run, T0).remove(1);

    let next = step_ok(&run, req.id, http(405, "Method Not Allowed"), T0);

    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "applying_deletions");
    assert!(
        reason.contains("could not apply the deletions of deleted[1] Bundle: HTTP 405"),
        "{reason}"
    );
    let Terminal::Failed(f) = &cleaning_up(&next).then else {
        panic!()
    };
    assert_eq!(f.summary.import_job.as_deref(), Some(JOB_URL));
    assert_eq!(f.summary.imported_files, 1);
}

#[test]
fn deletion_retries_spent_fail() {
    let mut run = polling_import(
        spec_with(&[("APPLY_DELETIONS", "true"), ("IMPORT_RETRY_TIMES", "1")]),
        &[(OUT, "Patient"), (DEL, "Bundle")],
    );
    run = answer(&run, import_completed(), T0);
    let req = requests(&run, T0).remove(0);
    run = step_ok(&run, req.id, network(), T0);
    let nb = deleting(&run).export.files.row(1).unwrap().not_before;
    let req = requests(&run, nb).remove(0);

    let next = step_ok(&run, req.id, network(), nb);

    let (phase, _) = failure_of(&next);
    assert_eq!(phase, "applying_deletions");
}

#[test]
fn staging_failures_do_not_count_against_the_deletion_retries() {
    // A deleted[] file that needed one retry to stage still gets every deletion retry.
    let spec = spec_with(&[("APPLY_DELETIONS", "true"), ("IMPORT_RETRY_TIMES", "1")]);
    let run = staging(spec, &[(DEL, "Bundle")]);
    let req = requests(&run, T0).remove(0);
    let run = step_ok(&run, req.id, network(), T0);
    let nb = staging_state(&run).export.files.row(0).unwrap().not_before;
    let req = requests(&run, nb).remove(0);
    let run = step_ok(&run, req.id, file_staged(), nb);
    let req = requests(&run, nb).remove(0);
    assert_eq!(
        req.id,
        EffectId::Deletions {
            index: 0,
            attempt: 0
        }
    );

    let next = step_ok(&run, req.id, network(), nb);

    assert_eq!(
        deleting(&next).export.files.row(0).unwrap().failures,
        1,
        "one retry left"
    );
}

#[test]
fn a_late_staging_result_for_a_deleted_file_is_stale_during_deletions() {
    // A second worker's staging attempt of a deleted[] file fails after the first worker's
    // success moved the run on: its id must not pass for the deletions' own attempt.
    let run = applying(TWO_DELETED);
    let late = EffectId::File {
        index: 1,
        attempt: 0,
    };

    let e = refused(&run, completed(late, http(403, "signature expired")), T0);

    assert_eq!(e, Rejected::Stale { got: late });
}

#[test]
fn deletions_refuse_stale_ids() {
    let run = applying(TWO_DELETED);
    let reqs = requests(&run, T0);
    let run = step_ok(
        &run,
        reqs[0].id,
        EffectResult::DeletionsApplied {
            deleted: 1,
            absent: 0,
        },
        T0,
    );

    assert_eq!(
        refused(
            &run,
            completed(
                reqs[0].id,
                EffectResult::DeletionsApplied {
                    deleted: 1,
                    absent: 0
                }
            ),
            T0
        ),
        Rejected::Stale { got: reqs[0].id }
    );
    // The output file is staged but has no deletions.
    let output = EffectId::Deletions {
        index: 0,
        attempt: 0,
    };
    assert_eq!(
        refused(&run, completed(output, http(500, "x")), T0),
        Rejected::Stale { got: output }
    );
    let run_level = EffectId::Run { seq: run.seq };
    assert_eq!(
        refused(&run, completed(run_level, import_completed()), T0),
        Rejected::Stale { got: run_level }
    );
}

#[test]
fn deletions_refuse_results_of_the_wrong_kind() {
    let run = applying(TWO_DELETED);
    let id = requests(&run, T0)[0].id;
    assert!(matches!(
        refused(&run, completed(id, file_staged()), T0),
        Rejected::Mismatch {
            phase: Phase::ApplyingDeletions,
            ..
        }
    ));
}

// =============================================================================================
// CleaningUp.

fn cleaning_up_after_failure() -> SyncRun {
    let run = polling_export(spec());
    answer(&run, http(404, "gone"), T0)
}

#[test]
fn cleanup_asks_to_delete_the_export_job() {
    let run = cleaning_up_after_failure();
    assert_eq!(
        single(&run, T0).effect,
        Effect::DeleteExportJob {
            status_url: STATUS_URL.into()
        }
    );
}

#[test]
fn cleanup_success_ends_as_planned() {
    let run = cleaning_up_after_failure();
    let then = cleaning_up(&run).then.clone();

    let next = answer(&run, EffectResult::ExportJobDeleted, T0);

    assert_eq!(next.state, then.clone().into_state());
    assert_eq!(next.next(T0), Next::Done { terminal: then });
}

#[test]
fn cleanup_failure_of_any_kind_still_ends_as_planned() {
    let run = cleaning_up_after_failure();
    let then = cleaning_up(&run).then.clone();
    for f in [
        Failure::http(404, "Not Found"),
        Failure::http(500, "boom"),
        Failure::new(FailureKind::Network, "reset"),
        Failure::new(FailureKind::Timeout, ""),
        Failure::new(FailureKind::Local, "no token"),
    ] {
        let next = answer(&run, failed(f), T0);
        assert_eq!(next.state, then.clone().into_state());
    }
}

#[test]
fn cleanup_refuses_other_results_and_stale_ids() {
    let run = cleaning_up_after_failure();
    let id = single(&run, T0).id;
    assert!(matches!(
        refused(&run, completed(id, import_completed()), T0),
        Rejected::Mismatch {
            phase: Phase::CleaningUp,
            ..
        }
    ));
    let old = EffectId::Run { seq: 0 };
    assert_eq!(
        refused(&run, completed(old, EffectResult::ExportJobDeleted), T0),
        Rejected::Stale { got: old }
    );
    let file = EffectId::File {
        index: 0,
        attempt: 0,
    };
    assert_eq!(
        refused(&run, completed(file, EffectResult::ExportJobDeleted), T0),
        Rejected::Stale { got: file }
    );
}

// =============================================================================================
// Cancel.

fn cancel(run: &SyncRun) -> SyncRun {
    let next = run
        .step(
            Input::Cancel {
                reason: "operator".into(),
            },
            T0,
        )
        .unwrap();
    assert_eq!(next.seq, run.seq + 1);
    next
}

fn cancelled_via_cleanup(run: &SyncRun, phase: &str) -> CancelledRun {
    let next = cancel(run);
    let c = cleaning_up(&next);
    assert_eq!(c.status_url, STATUS_URL);
    let Terminal::Cancelled(cancelled) = &c.then else {
        panic!("{:?}", c.then)
    };
    assert_eq!(cancelled.phase, phase);
    assert_eq!(cancelled.reason, "operator");
    let done = answer(&next, EffectResult::ExportJobDeleted, T0);
    assert_eq!(done.state, SyncState::Cancelled(cancelled.clone()));
    cancelled.clone()
}

#[test]
fn cancel_while_kicking_off_the_export_ends_at_once() {
    let run = start(spec());

    let next = cancel(&run);

    let SyncState::Cancelled(c) = &next.state else {
        panic!("{}", next.state.name())
    };
    assert_eq!(c.phase, "kicking_off_export");
    assert_eq!(c.reason, "operator");
}

#[test]
fn cancel_while_polling_the_export_deletes_the_job() {
    cancelled_via_cleanup(&polling_export(spec()), "polling_export");
}

#[test]
fn cancel_while_staging_deletes_the_job_and_summarises() {
    let run = staging(spec(), FILES);
    let req = requests(&run, T0).remove(0);
    let run = step_ok(&run, req.id, file_staged(), T0);

    let c = cancelled_via_cleanup(&run, "staging_files");

    assert_eq!(c.summary.files, 5);
    assert_eq!(c.summary.files_staged, 1);
}

#[test]
fn cancel_while_kicking_off_the_import_deletes_the_job() {
    cancelled_via_cleanup(&kicking_off_import(spec(), FILES), "kicking_off_import");
}

#[test]
fn cancel_while_polling_the_import_deletes_the_job() {
    cancelled_via_cleanup(&polling_import(spec(), FILES), "polling_import");
}

#[test]
fn cancel_while_applying_deletions_deletes_the_job() {
    cancelled_via_cleanup(&applying(TWO_DELETED), "applying_deletions");
}

#[test]
fn cancel_while_cleaning_up_ends_as_planned_without_the_delete() {
    let run = cleaning_up_after_failure();
    let then = cleaning_up(&run).then.clone();

    let next = cancel(&run);

    assert_eq!(next.state, then.into_state());
}

#[test]
fn cancel_while_cleaning_up_a_success_still_moves_the_watermark() {
    let run = answer(&polling_export(spec()), export_completed(&[]), T0);
    let next = cancel(&run);
    assert!(matches!(next.state, SyncState::Succeeded(_)));
    assert_eq!(next.watermark.unwrap().transaction_time, TRANSACTION_TIME);
}

// =============================================================================================
// Terminal phases absorb everything.

fn every_input() -> Vec<Input> {
    let ids = [
        EffectId::Run { seq: 0 },
        EffectId::Run { seq: 99 },
        EffectId::File {
            index: 0,
            attempt: 0,
        },
        EffectId::Deletions {
            index: 0,
            attempt: 0,
        },
    ];
    let results = vec![
        export_accepted(),
        export_in_progress(Some("5")),
        export_completed(FILES),
        file_staged(),
        EffectResult::PathlingDetected {
            api: Some(PathlingApi::V9),
            version: None,
        },
        EffectResult::ImportAccepted {
            job_url: JOB_URL.into(),
        },
        EffectResult::ImportInProgress {
            progress: None,
            retry_after: None,
        },
        import_completed(),
        EffectResult::DeletionsApplied {
            deleted: 1,
            absent: 1,
        },
        EffectResult::ExportJobDeleted,
        http(500, "x"),
    ];
    let mut inputs = vec![Input::Cancel {
        reason: "again".into(),
    }];
    for id in ids {
        for r in &results {
            inputs.push(completed(id, r.clone()));
        }
    }
    inputs
}

fn terminal_runs() -> Vec<SyncRun> {
    let succeeded = answer(
        &answer(&polling_export(spec()), export_completed(&[]), T0),
        EffectResult::ExportJobDeleted,
        T0,
    );
    let failed = answer(&start(spec()), http(400, "bad"), T0);
    let cancelled = cancel(&start(spec()));
    vec![succeeded, failed, cancelled]
}

#[test]
fn terminal_phases_absorb_every_input() {
    for run in terminal_runs() {
        for input in every_input() {
            for now in [Timestamp::ZERO, T0, Timestamp(u64::MAX)] {
                assert_eq!(
                    refused(&run, input.clone(), now),
                    Rejected::Ended,
                    "{} absorbs {input:?}",
                    run.state.name()
                );
            }
        }
    }
}

#[test]
fn terminal_phases_say_done_at_any_time() {
    for run in terminal_runs() {
        let terminal = run.state.terminal().unwrap();
        for now in [Timestamp::ZERO, T0, Timestamp(u64::MAX)] {
            assert_eq!(
                run.next(now),
                Next::Done {
                    terminal: terminal.clone()
                }
            );
        }
        assert!(run.is_done());
    }
}

// =============================================================================================
// Run-level staleness and mismatches.

#[test]
fn run_level_results_with_an_old_seq_are_stale_and_change_nothing() {
    let run = polling_export(spec());
    let run = answer(&run, export_in_progress(None), T0);
    assert_eq!(run.seq, 2);
    for seq in [0, 1, 3, u64::MAX] {
        let id = EffectId::Run { seq };
        assert_eq!(
            refused(&run, completed(id, export_completed(FILES)), T0),
            Rejected::Stale { got: id }
        );
    }
    let file = EffectId::File {
        index: 0,
        attempt: 0,
    };
    assert_eq!(
        refused(&run, completed(file, export_completed(FILES)), T0),
        Rejected::Stale { got: file }
    );
}

#[test]
fn results_that_do_not_answer_the_phase_are_mismatches() {
    let run = start(spec());
    let id = single(&run, T0).id;
    for (result, name) in [
        (export_completed(&[]), "export_completed"),
        (export_in_progress(None), "export_in_progress"),
        (file_staged(), "file_staged"),
        (import_completed(), "import_completed"),
        (EffectResult::ExportJobDeleted, "export_job_deleted"),
    ] {
        assert_eq!(
            refused(&run, completed(id, result), T0),
            Rejected::Mismatch {
                result: name.into(),
                phase: Phase::KickingOffExport
            }
        );
    }
    let polling = polling_export(spec());
    let id = single(&polling, T0).id;
    assert!(matches!(
        refused(&polling, completed(id, export_accepted()), T0),
        Rejected::Mismatch {
            phase: Phase::PollingExport,
            ..
        }
    ));
}

#[test]
fn next_is_pure() {
    let run = staging(spec(), FILES);
    assert_eq!(run.next(T0), run.next(T0));
    let decoded = pathling_import_core::persist::decode(
        pathling_import_core::persist::encode_string(&run).as_bytes(),
    )
    .unwrap();
    assert_eq!(decoded.next(T0), run.next(T0));
}

#[test]
fn http_date_helper_matches_the_core_parser() {
    for secs in [0u64, 86_399, 951_782_400, 1_800_000_045, 4_102_444_800] {
        let t = Timestamp::from_secs(secs);
        assert_eq!(
            pathling_import_core::time::parse_http_date(&http_date(t)),
            Some(t),
            "{}",
            http_date(t)
        );
    }
    assert_eq!(
        http_date(Timestamp::from_secs(784_111_777)),
        "Sun, 06 Nov 1994 08:49:37 GMT"
    );
}

#[test]
fn pathling_api_choice_is_snapshotted_into_the_run() {
    let run = start(spec_with(&[("PATHLING_API", "9")]));
    assert_eq!(run.spec.target.api, PathlingApiChoice::V9);
}

// =============================================================================================
// Failure semantics: only a real import result is success; failed runs can be retried.

fn poll_answer(body: &str) -> EffectResult {
    EffectResult::ImportCompleted {
        answer: pathling_import_core::pathling::read_import_answer(body.as_bytes()),
    }
}

#[test]
fn a_200_that_is_not_an_import_result_fails_the_run_and_keeps_the_watermark() {
    for body in [
        "",
        "<html><body>Please log in</body></html>",
        "[]",
        r#"{"resourceType":"Patient","id":"p"}"#,
        r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception","diagnostics":"Import failed: disk full"}]}"#,
    ] {
        let run = start_with_watermark(spec_with(&[("SINCE", "auto")]), "2026-12-01T10:00:00.000Z");
        let run = answer(&run, export_accepted(), T0);
        let run = answer(&run, export_completed(&[(OUT, "Patient")]), T0);
        let run = stage_all(&run, T0);
        let run = answer(
            &run,
            EffectResult::PathlingDetected {
                api: Some(PathlingApi::V9),
                version: None,
            },
            T0,
        );
        let run = answer(
            &run,
            EffectResult::ImportAccepted {
                job_url: JOB_URL.into(),
            },
            T0,
        );
        let next = answer(&run, poll_answer(body), at(1));
        let (phase, reason) = failure_of(&next);
        assert_eq!(phase, "polling_import", "{body:?}");
        assert!(reason.starts_with("the import did not succeed"), "{reason}");
        if body.contains("disk full") {
            assert!(reason.contains("Import failed: disk full"), "{reason}");
        }
        // Never a success: the watermark stays where the last real success put it.
        let done = answer(&next, EffectResult::ExportJobDeleted, at(2));
        assert_eq!(
            done.watermark.as_ref().unwrap().transaction_time,
            "2026-12-01T10:00:00.000Z"
        );
        assert_eq!(
            done.resumable().map(|r| r.from),
            Some(ResumeFrom::KickingOffImport)
        );
        let SyncState::Failed(f) = &done.state else {
            panic!()
        };
        assert_eq!(f.summary.imported_files, 0, "nothing counts as imported");
    }
}

#[test]
fn an_information_outcome_and_an_import_result_are_success() {
    for body in [
        r#"{"resourceType":"OperationOutcome","issue":[{"severity":"information","code":"informational","diagnostics":"Data import completed successfully"}]}"#,
        r#"{"resourceType":"Parameters","parameter":[{"name":"transactionTime","valueInstant":"2027-01-15T08:00:00Z"}]}"#,
    ] {
        let run = polling_import(spec(), FILES);
        let next = answer(&run, poll_answer(body), at(1));
        let SyncState::CleaningUp(c) = &next.state else {
            panic!("{body}: {:?}", next.state)
        };
        assert!(matches!(c.then, Terminal::Succeeded(_)), "{body}");
    }
}

/// Staging fails on file 1 (403); every other file is staged.
fn failed_while_staging() -> SyncRun {
    let run = staging(spec(), FILES);
    let reqs = requests(&run, T0);
    let run = step_ok(&run, reqs[1].id, http(403, "Forbidden"), at(1));
    stage_all(&run, at(1))
}

#[test]
fn a_retry_after_a_staging_failure_stages_only_what_is_missing() {
    let failed = failed_while_staging();
    assert!(failed.is_done());
    let retried = failed
        .step(
            Input::Retry {
                spec: Box::new(spec()),
            },
            at(100),
        )
        .unwrap();
    assert_eq!(retried.seq, failed.seq + 1);
    // The retry first asks the source whether the export still stands; it does, with the
    // same manifest (its URLs stored anew: pre-signed ones may have been re-signed).
    let p = polling(&retried);
    assert_eq!(p.status_url, STATUS_URL);
    assert!(p.resuming.is_some());
    let retried = answer(&retried, export_completed(FILES), at(100));
    let s = staging_state(&retried);
    assert_eq!(s.export.files.row(0).unwrap().status, FileStatus::Staged);
    assert_eq!(s.export.files.row(2).unwrap().status, FileStatus::Staged);
    assert_eq!(s.export.files.row(1).unwrap().status, FileStatus::Pending);
    assert_eq!(
        s.export.files.row(1).unwrap().failures,
        0,
        "a fresh set of attempts"
    );
    assert!((0..s.export.files.len() as u32).all(|i| s.export.files.error(i).is_none()));
    let asked: Vec<u32> = requests(&retried, at(100))
        .iter()
        .map(|r| match r.id {
            EffectId::File { index, .. } => index,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(asked, [1], "only the failed file is staged again");
    // The run completes from there, cleaning up the export job it kept.
    let run = stage_all(&retried, at(101));
    assert!(matches!(run.state, SyncState::KickingOffImport(_)));
}

#[test]
fn a_retry_adopts_corrected_import_settings_but_keeps_the_export_and_binding() {
    let run = polling_import(spec_with(&[("TYPES", "Patient")]), FILES);
    let failed = answer(&run, http(403, "not allowed"), at(1));
    let failed = answer(&failed, EffectResult::ExportJobDeleted, at(2));
    let corrected = spec_with(&[
        ("IMPORT_MODE", "overwrite"),
        ("TYPES", "Observation"),
        ("TARGET_ENDPOINT", "https://elsewhere.example.org/fhir"),
    ]);
    let retried = failed
        .step(
            Input::Retry {
                spec: Box::new(corrected),
            },
            at(3),
        )
        .unwrap();
    assert_eq!(retried.spec.target.import_mode, ImportMode::Overwrite);
    assert_eq!(retried.spec.export.types, ["Patient"], "the export stays");
    assert_eq!(retried.spec.target.endpoint, TARGET, "bound settings stay");
    assert!(matches!(import_kickoff(&retried).api, ApiState::Detecting));
}

fn job_outcome(status: u16) -> EffectResult {
    failed(Failure::new(
        FailureKind::Http {
            status,
            transient_outcome: false,
            outcome: true,
        },
        "OperationOutcome: error: the import failed",
    ))
}

#[test]
fn a_failed_import_job_is_cancelled_by_the_retried_kickoff() {
    // (IMPORT_MODE, the poll's failure, whether the retry waits for a check)
    let cases = [
        ("merge", job_outcome(400), false),
        ("merge", http(403, "proxy says no"), false),
        // Pathling said the job failed: nothing was imported.
        ("append", job_outcome(400), false),
        // Not Pathling's word on the job: it may have imported the data.
        ("append", http(403, "proxy says no"), true),
        ("append", job_outcome(404), true),
    ];
    for (mode, failure, check_first) in cases {
        let run = polling_import(
            spec_with(&[("PATHLING_API", "9"), ("IMPORT_MODE", mode)]),
            FILES,
        );
        let failed = answer(&run, failure.clone(), at(1));
        let failed = answer(&failed, EffectResult::ExportJobDeleted, at(2));
        let point = failed.resumable().unwrap();
        assert_eq!(point.from, ResumeFrom::KickingOffImport);
        assert_eq!(point.import_job.as_deref(), Some(JOB_URL));
        assert_eq!(point.check_first, check_first, "{mode} {failure:?}");
        let retried = failed
            .step(
                Input::Retry {
                    spec: Box::new(failed.spec.clone()),
                },
                at(3),
            )
            .unwrap();
        match single(&retried, at(3)).effect {
            Effect::KickoffImport { replaces, .. } => {
                assert_eq!(replaces.as_deref(), Some(JOB_URL), "{mode} {failure:?}")
            }
            other => panic!("{other:?}"),
        }
    }
    // A kick-off that failed has no job to cancel.
    let run = kicking_off_import(spec_with(&[("PATHLING_API", "9")]), FILES);
    let failed = answer(&run, http(403, "forbidden"), at(1));
    let failed = answer(&failed, EffectResult::ExportJobDeleted, at(2));
    let retried = failed
        .step(
            Input::Retry {
                spec: Box::new(failed.spec.clone()),
            },
            at(3),
        )
        .unwrap();
    assert!(matches!(
        single(&retried, at(3)).effect,
        Effect::KickoffImport { replaces: None, .. }
    ));
}

#[test]
fn an_expired_export_is_exported_again_on_retry() {
    let run = staging(spec(), FILES);
    let req = requests(&run, T0).remove(0);
    let failed = stage_all(&step_ok(&run, req.id, http(404, "Not Found"), T0), T0);
    let retried = failed
        .step(
            Input::Retry {
                spec: Box::new(spec()),
            },
            at(2),
        )
        .unwrap();
    // The source no longer knows the export job: export again, into the same run.
    let next = answer(&retried, http(404, "Unknown job"), at(3));
    assert!(matches!(next.state, SyncState::KickingOffExport(_)));
    assert_eq!(next.run_id, failed.run_id, "same run, same staging prefix");
}

#[test]
fn a_retried_export_with_another_manifest_is_staged_anew() {
    let failed = failed_while_staging();
    let retried = failed
        .step(
            Input::Retry {
                spec: Box::new(spec()),
            },
            at(2),
        )
        .unwrap();
    let other = &[(OUT, "Patient"), (OUT, "Condition")];
    let next = answer(&retried, export_completed(other), at(3));
    let s = staging_state(&next);
    assert_eq!(s.export.files.len(), 2);
    assert!(s
        .export
        .files
        .iter()
        .all(|r| r.status == FileStatus::Pending));
}

#[test]
fn only_a_failure_after_the_manifest_can_be_retried() {
    let run = start(spec());
    let failed = answer(&run, http(400, "bad _type"), T0);
    assert!(failed.resumable().is_none());
    let err = failed
        .step(
            Input::Retry {
                spec: Box::new(spec()),
            },
            T0,
        )
        .unwrap_err();
    assert!(matches!(err, Rejected::NotRetryable { .. }), "{err}");
    // Nor is a running one.
    let polling = answer(&start(spec()), export_accepted(), T0);
    assert!(polling
        .step(
            Input::Retry {
                spec: Box::new(spec())
            },
            T0
        )
        .is_err());
}

#[test]
fn abandoning_a_failed_run_deletes_the_export_job_it_kept() {
    let failed = failed_while_staging();
    let abandoned = failed
        .step(
            Input::Cancel {
                reason: "--fresh".into(),
            },
            at(5),
        )
        .unwrap();
    assert_eq!(cleaning_up(&abandoned).status_url, STATUS_URL);
    let done = answer(&abandoned, EffectResult::ExportJobDeleted, at(6));
    assert!(matches!(done.state, SyncState::Cancelled(_)));
    assert!(done.resumable().is_none());
    // A failed run that kept nothing ends at once.
    let plain = answer(&start(spec()), http(400, "no"), T0);
    assert!(plain
        .step(Input::Cancel { reason: "x".into() }, T0)
        .is_err());
}

#[test]
fn an_append_kickoff_whose_answer_was_lost_is_not_sent_again() {
    let run = kicking_off_import(
        spec_with(&[("PATHLING_API", "9"), ("IMPORT_MODE", "append")]),
        FILES,
    );
    let request = single(&run, T0);
    assert!(run.record_before(&request));
    let (sending, again) = run.sending(&request, T0).unwrap();
    let again = again.expect("the kick-off goes out under the new seq");
    assert_eq!(again.id, EffectId::Run { seq: sending.seq });
    assert_eq!(import_kickoff(&sending).sent_at, Some(T0));
    // Its answer is accepted under the new id.
    let accepted = step_ok(
        &sending,
        again.id,
        EffectResult::ImportAccepted {
            job_url: JOB_URL.into(),
        },
        at(1),
    );
    assert!(matches!(accepted.state, SyncState::PollingImport(_)));

    // A crash after the send: reloaded, the kick-off is due again, and recording it fails the
    // run instead of sending it twice.
    let reloaded = pathling_import_core::persist::decode(
        pathling_import_core::persist::encode_string(&sending).as_bytes(),
    )
    .unwrap();
    let request = single(&reloaded, at(60));
    assert!(reloaded.record_before(&request));
    let (stopped, none) = reloaded.sending(&request, at(60)).unwrap();
    assert!(none.is_none());
    let stopped = answer(&stopped, EffectResult::ExportJobDeleted, at(61));
    let (phase, reason) = failure_of(&stopped);
    assert_eq!(phase, "kicking_off_import");
    assert!(reason.contains("pathling-import retry"), "{reason}");
    assert_eq!(
        stopped.resumable().map(|r| r.from),
        Some(ResumeFrom::KickingOffImport)
    );
    // Nobody has checked Pathling yet: a schedule or a plain rerun must not retry it, and
    // must not replace it either; only an explicit retry continues it.
    assert!(stopped.resumable().unwrap().check_first);
    assert_eq!(next_run(Some(&stopped), Ask::Start), NextRun::Held);
    assert_eq!(next_run(Some(&stopped), Ask::Nothing), NextRun::Idle);
    assert_eq!(next_run(Some(&stopped), Ask::Retry), NextRun::Retry);
    // The mark survives the envelope.
    let reloaded = pathling_import_core::persist::decode(
        pathling_import_core::persist::encode_string(&stopped).as_bytes(),
    )
    .unwrap();
    assert_eq!(next_run(Some(&reloaded), Ask::Start), NextRun::Held);
}

#[test]
fn what_a_runner_does_with_the_run_it_finds() {
    // Nothing stored.
    assert_eq!(
        next_run(None, Ask::Start),
        NextRun::Start { watermark: None }
    );
    assert_eq!(next_run(None, Ask::Nothing), NextRun::Idle);
    assert_eq!(next_run(None, Ask::Retry), NextRun::Idle);
    // Unfinished: always continued.
    let unfinished = polling_export(spec());
    for ask in [Ask::Start, Ask::Nothing, Ask::Retry] {
        assert_eq!(next_run(Some(&unfinished), ask), NextRun::Continue);
    }
    // Failed after its export was known: a schedule retries it.
    let failed = failed_while_staging();
    assert!(!failed.resumable().unwrap().check_first);
    assert_eq!(next_run(Some(&failed), Ask::Start), NextRun::Retry);
    assert_eq!(next_run(Some(&failed), Ask::Retry), NextRun::Retry);
    assert_eq!(next_run(Some(&failed), Ask::Nothing), NextRun::Idle);
    // Failed before: nothing to retry; the next run starts.
    let plain = answer(&start(spec()), http(400, "no"), T0);
    assert!(matches!(
        next_run(Some(&plain), Ask::Start),
        NextRun::Start { .. }
    ));
    assert_eq!(next_run(Some(&plain), Ask::Retry), NextRun::Idle);
}

#[test]
fn merge_kickoffs_are_not_recorded_first() {
    let run = kicking_off_import(spec_with(&[("PATHLING_API", "9")]), FILES);
    let request = single(&run, T0);
    assert!(!run.record_before(&request));
    assert!(matches!(
        run.step(Input::Sending { id: request.id }, T0),
        Err(Rejected::Mismatch { .. })
    ));
}

#[test]
fn a_cancel_reason_is_bounded_and_stripped_of_control_characters() {
    let run = answer(&start(spec()), export_accepted(), T0);
    let huge = format!("stop\n\x1b[31m{}", "x".repeat(1024 * 1024));
    let next = run.step(Input::Cancel { reason: huge }, T0).unwrap();
    let Terminal::Cancelled(c) = &cleaning_up(&next).then else {
        panic!()
    };
    assert!(c.reason.len() <= pathling_import_core::machine::MAX_REASON_BYTES);
    assert!(c.reason.starts_with("stop[31m"), "{:?}", &c.reason[..20]);
    assert!(!c.reason.chars().any(char::is_control));
    assert!(pathling_import_core::persist::encode_string(&next).len() < 16 * 1024);
}

#[test]
fn a_watermark_that_is_not_an_instant_is_refused() {
    let mark = Watermark {
        transaction_time: "'; DROP TABLE".into(),
        run_id: "x".into(),
    };
    let err = SyncRun::start(RUN_ID, spec_with(&[("SINCE", "auto")]), Some(mark), T0).unwrap_err();
    assert!(err.to_string().contains("not a FHIR instant"), "{err}");
}

#[test]
fn after_a_429_the_export_is_polled_half_as_often() {
    let run = polling_export(spec_with(&[("EXPORT_RETRY_WAIT", "10")]));
    let run = answer(&run, http(429, "slow down"), T0);
    assert!(polling(&run).throttled);
    let run = answer(&run, export_in_progress(Some("3")), at(60));
    assert_eq!(polling(&run).retry.not_before, Some(at(66)));
}

#[test]
fn a_non_transient_500_at_kickoff_fails_at_once_with_the_server_message() {
    let run = start(spec());
    let f = Failure::new(
        FailureKind::Http {
            status: 500,
            transient_outcome: false,
            outcome: true,
        },
        "export kick-off: 500 Internal Server Error: Unsupported _type Foo",
    );
    let next = answer(&run, failed(f), T0);
    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "kicking_off_export");
    assert!(reason.contains("Unsupported _type Foo"), "{reason}");
}

#[test]
fn an_unresolvable_host_is_retried_only_a_few_times() {
    let mut run = start(spec());
    for i in 0..10u64 {
        let next = answer(
            &run,
            failed(Failure::new(FailureKind::Dns, "fhir.example.invalid")),
            at(i * 1000),
        );
        if next.is_done() {
            let (_, reason) = failure_of(&next);
            assert!(reason.contains("host name not found"), "{reason}");
            assert_eq!(i, 3, "3 retries, then the cause");
            return;
        }
        run = next;
    }
    panic!("a DNS failure was retried more than 3 times");
}

// =============================================================================================
// Binding: a stored run is only driven with the settings it was started with.

#[test]
fn bound_settings_are_compared_and_named_without_secret_values() {
    use pathling_import_core::binding::differences;
    let recorded = spec_with(&[
        ("SOURCE_AUTHENTICATION_ENABLED", "true"),
        ("SOURCE_CLIENT_ID", "c"),
        ("SOURCE_CLIENT_SECRET", "old-secret-value"),
    ]);
    // Rotating a configured value is no difference; other non-bound settings neither.
    let rotated = spec_with(&[
        ("SOURCE_AUTHENTICATION_ENABLED", "true"),
        ("SOURCE_CLIENT_ID", "c"),
        ("SOURCE_CLIENT_SECRET", "new-secret-value"),
        ("TRANSFER_CONCURRENCY", "8"),
        ("TYPES", "Patient"),
    ]);
    assert!(differences(&recorded, &rotated).is_empty());
    let moved = spec_with(&[
        ("SOURCE_ENDPOINT", "https://evil.example.net/fhir"),
        ("SOURCE_AUTHENTICATION_ENABLED", "true"),
        ("SOURCE_CLIENT_ID", "c"),
        ("SOURCE_CLIENT_SECRET", "secretsmanager:arn:other"),
        ("SOURCE_AUTH_METHOD", "client_secret_post"),
        ("STAGING_URL", "s3://other-bucket/x/"),
    ]);
    let diff = differences(&recorded, &moved);
    let keys: Vec<&str> = diff.iter().map(|d| d.key).collect();
    assert_eq!(
        keys,
        [
            "SOURCE_ENDPOINT",
            "SOURCE_AUTH_METHOD",
            "SOURCE_CLIENT_SECRET",
            "STAGING_URL"
        ]
    );
    let text: String = diff.iter().map(|d| d.to_string()).collect();
    assert!(!text.contains("old-secret-value"), "{text}");
    assert!(text.contains("evil.example.net"), "{text}");
}

#[test]
fn rebinding_takes_the_configured_endpoints_but_never_moves_staged_files() {
    let run = polling_import(spec(), FILES);
    let configured = spec_with(&[("TARGET_ENDPOINT", "https://fixed.example.org/fhir")]);
    let rebound = run.rebind(&configured).unwrap();
    assert_eq!(
        rebound.spec.target.endpoint,
        "https://fixed.example.org/fhir"
    );
    assert_eq!(rebound.seq, run.seq + 1);
    assert!(pathling_import_core::binding::differences(&rebound.spec, &configured).is_empty());
    let elsewhere = spec_with(&[("STAGING_URL", "s3://other-bucket/x/")]);
    assert!(run.rebind(&elsewhere).is_err());
    // Before anything is staged the location may still change.
    let early = polling_export(spec());
    assert!(early.rebind(&elsewhere).is_ok());
}

#[test]
fn a_failing_staging_store_stops_the_phase_at_once() {
    let run = staging(spec(), FILES);
    let req = requests(&run, T0).remove(0);
    let next = step_ok(
        &run,
        req.id,
        failed(Failure::new(
            FailureKind::Storage { transient: false },
            "AccessDenied",
        )),
        T0,
    );
    let (phase, reason) = failure_of(&next);
    assert_eq!(phase, "staging_files");
    assert!(reason.contains("AccessDenied"), "{reason}");
    assert!(next.resumable().is_some());
}

#[test]
fn several_failed_files_are_counted_in_the_reason() {
    let run = staging(spec(), FILES);
    let reqs = requests(&run, T0);
    let run = step_ok(&run, reqs[1].id, http(403, "Forbidden"), T0);
    let run = step_ok(&run, reqs[2].id, http(404, "Gone"), T0);
    let run = stage_all(&run, T0);
    let (_, reason) = failure_of(&run);
    assert!(
        reason.starts_with("could not stage output[1] Observation: HTTP 403"),
        "{reason}"
    );
    assert!(reason.ends_with("(and 1 other file(s))"), "{reason}");
}

/// A source that cannot serve many files is broken: once MAX_FAILED_FILES files failed for
/// good, staging stops (files in flight are abandoned) and the run fails, keeping its export
/// so that a retry continues with every file not staged yet.
#[test]
fn staging_stops_once_too_many_files_failed_for_good() {
    use pathling_import_core::machine::MAX_FAILED_FILES;
    let files: Vec<(FileKind, &str)> = (0..200).map(|_| (OUT, "Patient")).collect();
    let mut run = staging(spec_with(&[("TRANSFER_CONCURRENCY", "8")]), &files);
    let mut lost = 0;
    while matches!(run.state, SyncState::StagingFiles(_)) {
        // Each batch: its first file is gone at the source, the second is staged.
        let reqs = requests(&run, at(1));
        run = step_ok(&run, reqs[0].id, http(404, "Not Found"), at(1));
        lost += 1;
        if let (Some(second), SyncState::StagingFiles(_)) = (reqs.get(1), &run.state) {
            run = step_ok(&run, second.id, file_staged(), at(1));
        }
    }
    assert_eq!(lost, MAX_FAILED_FILES);
    let (phase, reason) = failure_of(&run);
    assert_eq!(phase, "staging_files");
    assert!(
        reason.starts_with("could not stage output[0] Patient: HTTP 404")
            && reason.ends_with(&format!("(and {} other file(s))", MAX_FAILED_FILES - 1)),
        "{reason}"
    );
    // Most files were never tried: a retry stages them, and the failed ones again.
    let failed = match &run.state {
        SyncState::CleaningUp(c) => c.then.clone().into_state(),
        other => other.clone(),
    };
    let SyncState::Failed(f) = &failed else {
        panic!("{failed:?}")
    };
    let resume = f.resume.as_ref().expect("a resume point");
    assert_eq!(resume.from, ResumeFrom::StagingFiles);
    let t = &resume.export.files;
    assert_eq!(t.count_of(None, FileStatus::Failed), MAX_FAILED_FILES);
    assert_eq!(t.count_of(None, FileStatus::Staged), MAX_FAILED_FILES - 1);
    assert_eq!(
        t.count_of(None, FileStatus::Pending),
        200 - 2 * MAX_FAILED_FILES + 1
    );
}

/// Error texts are for people, and each costs room in the envelope: the table keeps those
/// of the MAX_ERRORS lowest-indexed files, sparing files that failed for good (the run's
/// failure names the first of them).
#[test]
fn the_table_keeps_the_errors_of_a_few_files_and_spares_failed_ones() {
    use pathling_import_core::file_table::MAX_ERRORS;
    let files: Vec<(FileKind, &str)> = (0..40).map(|_| (OUT, "Patient")).collect();
    let run = staging(spec_with(&[("TRANSFER_CONCURRENCY", "8")]), &files);
    let reqs = requests(&run, T0);
    assert!(reqs.len() > MAX_ERRORS + 2);
    // The last file of the batch fails for good, every other one fails for now.
    let (last, rest) = reqs.split_last().unwrap();
    let mut run = step_ok(&run, last.id, http(404, "gone for good"), T0);
    for req in rest {
        run = step_ok(&run, req.id, network(), T0);
    }
    let t = &staging_state(&run).export.files;
    let kept: Vec<u32> = (0..40).filter(|i| t.error(*i).is_some()).collect();
    assert_eq!(kept.len(), MAX_ERRORS, "{kept:?}");
    let failed_index = match last.id {
        EffectId::File { index, .. } => index,
        other => panic!("{other:?}"),
    };
    assert!(kept.contains(&failed_index), "{kept:?}");
    assert!(t.error(failed_index).unwrap().contains("gone for good"));
    assert_eq!(
        &kept[..MAX_ERRORS - 1],
        &(0..MAX_ERRORS as u32 - 1).collect::<Vec<_>>()[..]
    );
    // Every retrying file still has its schedule, error text or not.
    assert_eq!(t.failing().count(), reqs.len());
}

/// A retried run continues its staged files only when the source lists the same files: same
/// arrays and types and, when both manifests say, the same URLs up to their query (a
/// pre-signed URL signed again keeps its path). Files listed otherwise are all staged anew, so
/// that a staged index never stands for another file of the same type.
#[test]
fn a_retry_continues_only_a_manifest_with_the_same_file_urls() {
    use pathling_import_core::bulk::{parse_manifest, Manifest};
    let manifest = |paths: &[&str], query: &str| -> Manifest {
        let output: Vec<Value> = paths
            .iter()
            .map(|p| json!({"type": "Patient", "url": format!("https://s.example/{p}{query}")}))
            .collect();
        let body = json!({"transactionTime": TRANSACTION_TIME, "output": output});
        parse_manifest(body.to_string().as_bytes(), "https://s.example").unwrap()
    };
    let completed = |m: &Manifest| EffectResult::ExportCompleted { digest: m.digest() };
    let first = manifest(&["a", "b", "c"], "?sig=1");
    // Staging fails on file 1 (403); the others are staged; then a retry asks again.
    let run = answer(&polling_export(spec()), completed(&first), T0);
    let reqs = requests(&run, T0);
    let run = step_ok(&run, reqs[1].id, http(403, "Forbidden"), at(1));
    let failed = stage_all(&run, at(1));
    let retried = failed
        .step(
            Input::Retry {
                spec: Box::new(spec()),
            },
            at(100),
        )
        .unwrap();
    let staged_after = |m: &Manifest| -> Vec<FileStatus> {
        let run = answer(&retried, completed(m), at(100));
        staging_state(&run)
            .export
            .files
            .iter()
            .map(|r| r.status)
            .collect()
    };
    // Signed again: the same files, only file 1 left to stage.
    assert_eq!(
        staged_after(&manifest(&["a", "b", "c"], "?sig=2")),
        [FileStatus::Staged, FileStatus::Pending, FileStatus::Staged]
    );
    // The same types, other files (or another order): everything anew.
    assert_eq!(
        staged_after(&manifest(&["a", "c", "b"], "?sig=1")),
        [FileStatus::Pending; 3]
    );
}
