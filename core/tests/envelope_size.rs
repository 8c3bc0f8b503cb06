//! Size budgets of the persisted envelope: it must not grow with the manifest. Target: at
//! most 16 KiB at 1,000,000 files, in every phase, with the worst the machine allows (the most
//! transfer slots, files retrying, files failed for good, long error texts). That is what one
//! save writes to the state file, a DynamoDB item or a Step Functions payload.
//!
//! Run with `cargo test -p pathling-import-core --test envelope_size -- --nocapture` to see
//! the measured sizes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use pathling_import_core::bulk::{parse_manifest, FileKind, OutcomeSummary, MAX_MANIFEST_FILES};
use pathling_import_core::effect::{EffectResult, Next};
use pathling_import_core::machine::{MAX_FAILED_FILES, MAX_RETRYING};
use pathling_import_core::persist;
use pathling_import_core::retry::{Failure, FailureKind};
use pathling_import_core::spec::RunSpec;
use pathling_import_core::state::{FileStatus, SyncState};
use pathling_import_core::{SyncRun, Timestamp};

const KIB: usize = 1024;
/// The budget of one envelope, whatever the manifest.
const BUDGET: usize = 16 * KIB;

/// Realistic resource types, long names included.
const TYPES: [&str; 30] = [
    "Patient",
    "Observation",
    "Encounter",
    "Condition",
    "Procedure",
    "MedicationRequest",
    "MedicationAdministration",
    "MedicationStatement",
    "DiagnosticReport",
    "Immunization",
    "AllergyIntolerance",
    "CarePlan",
    "CareTeam",
    "Claim",
    "ExplanationOfBenefit",
    "Coverage",
    "DocumentReference",
    "Device",
    "Goal",
    "ImagingStudy",
    "Location",
    "Organization",
    "Practitioner",
    "PractitionerRole",
    "Provenance",
    "QuestionnaireResponse",
    "ServiceRequest",
    "Specimen",
    "FamilyMemberHistory",
    "RelatedPerson",
];

/// The worst case for the bounds: the most transfer slots configuration allows.
fn spec() -> RunSpec {
    spec_with(&[("TRANSFER_CONCURRENCY", "32"), ("APPLY_DELETIONS", "true")])
}

/// A manifest of `n` files as a server that interleaves its types would list them: about
/// 90 % `output[]` over 30 types round-robin, 7 % `deleted[]`, 3 % `error[]`. Decoded by the
/// production [`parse_manifest`], as the executor does.
fn manifest_run(n: usize) -> SyncRun {
    let deleted = n * 7 / 100;
    let errors = n * 3 / 100;
    let outputs = n - deleted - errors;
    let entry = |t: &str, i: usize| format!(r#"{{"type":"{t}","url":"https://s.example/f/{i}"}}"#);
    let output: Vec<String> = (0..outputs)
        .map(|i| entry(TYPES[i % TYPES.len()], i))
        .collect();
    let deleted: Vec<String> = (0..deleted).map(|i| entry("Bundle", outputs + i)).collect();
    let error: Vec<String> = (0..errors)
        .map(|i| entry("OperationOutcome", n + i))
        .collect();
    let body = format!(
        r#"{{"transactionTime":"{TRANSACTION_TIME}","request":"x","requiresAccessToken":true,"output":[{}],"deleted":[{}],"error":[{}]}}"#,
        output.join(","),
        deleted.join(","),
        error.join(",")
    );
    let manifest = parse_manifest(body.as_bytes(), "https://s.example").unwrap();
    assert_eq!(manifest.files.len(), n);
    let run = answer(
        &polling_export(spec()),
        EffectResult::ExportCompleted {
            digest: manifest.digest(),
        },
        T0,
    );
    assert!(matches!(run.state, SyncState::StagingFiles(_)));
    run
}

/// A long error text, as a proxy's HTML error page would give.
fn long_failure(i: usize, status: u16) -> EffectResult {
    let message = format!(
        "{status} from upstream while fetching export file {i}: <html><head><title>502 \
         Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr>\
         <center>nginx/1.25.3</center><p>The upstream server returned an invalid response \
         while the proxy was reading the response header. Request id {i:032x}.</p></body></html>"
    );
    EffectResult::Failed(Failure::new(
        FailureKind::Http {
            status,
            transient_outcome: false,
            outcome: false,
        },
        message,
    ))
}

fn table(run: &mut SyncRun) -> &mut pathling_import_core::state::FileTable {
    match &mut run.state {
        SyncState::StagingFiles(s) => &mut s.export.files,
        SyncState::ApplyingDeletions(s) => &mut s.export.files,
        other => panic!("{}", other.name()),
    }
}

/// Marks the first `count` files of this status as `to`, as their results would (bytes,
/// resources per type), and records what the `error[]` files said at their longest.
fn settle(run: &mut SyncRun, count: usize, from: FileStatus, to: FileStatus) {
    let t = table(run);
    let indexes: Vec<u32> = t
        .with_status(0, None, from)
        .filter(|(_, r)| to != FileStatus::Applied || r.kind == FileKind::Deleted)
        .take(count)
        .map(|(i, _)| i)
        .collect();
    for i in indexes {
        t.update(i, |r| r.status = to);
        t.bytes += 250_000_000;
        let ty = usize::from(t.row(i).unwrap().type_idx);
        t.resources_by_type[ty] += 123_456;
    }
    if let SyncState::StagingFiles(s) = &mut run.state {
        let mut outcomes = OutcomeSummary::default();
        for i in 0..20 {
            outcomes.add_line(
                format!(
                    r#"{{"resourceType":"OperationOutcome","issue":[{{"severity":"error","code":"processing","diagnostics":"{}"}}]}}"#,
                    format!("Resource Observation/{i} could not be exported: ").repeat(8)
                )
                .as_bytes(),
            );
        }
        s.export.source_errors = outcomes;
    }
}

/// One batch answered out of order (last first), its first file failing for good: what a
/// source that cannot serve a few files leaves in the table (a failed file amid staged ones).
fn batch_with_a_lost_file(run: SyncRun, now: Timestamp) -> SyncRun {
    let mut run = run;
    let mut reqs = requests(&run, now);
    let lost = reqs.remove(0);
    for req in reqs.into_iter().rev() {
        run = step_ok(&run, req.id, file_staged(), now);
    }
    step_ok(&run, lost.id, long_failure(lost_index(&lost), 404), now)
}

fn lost_index(req: &pathling_import_core::effect::Request) -> usize {
    match req.id {
        pathling_import_core::effect::EffectId::File { index, .. }
        | pathling_import_core::effect::EffectId::Deletions { index, .. } => index as usize,
        other => panic!("{other:?}"),
    }
}

/// A source outage at its worst: every file handed out fails with a long error, until the
/// machine stops handing out fresh files and sleeps. The first file succeeds, so that one
/// less than a batch is retrying when the next batch of fresh files goes out.
fn outage(run: SyncRun, now: Timestamp) -> SyncRun {
    let mut run = run;
    let mut failed = 0usize;
    let mut first = true;
    loop {
        match run.next(now) {
            Next::Run { requests } => {
                for req in requests {
                    let result = if std::mem::take(&mut first) {
                        match req.id {
                            pathling_import_core::effect::EffectId::Deletions { .. } => {
                                EffectResult::DeletionsApplied {
                                    deleted: 1,
                                    absent: 0,
                                }
                            }
                            _ => file_staged(),
                        }
                    } else {
                        failed += 1;
                        long_failure(failed, 502)
                    };
                    run = step_ok(&run, req.id, result, now);
                }
            }
            Next::SleepUntil { .. } => return run,
            Next::Done { .. } => panic!("the outage ended the run"),
        }
        assert!(failed <= 10_000, "the machine kept handing out fresh files");
    }
}

fn retrying(run: &SyncRun) -> usize {
    let files = match &run.state {
        SyncState::StagingFiles(s) => &s.export.files,
        SyncState::ApplyingDeletions(s) => &s.export.files,
        _ => return 0,
    };
    files
        .failing()
        .filter(|(_, r)| r.status != FileStatus::Failed)
        .count()
}

/// Half the files staged, the most files failed for good that leave the run staging, out of
/// order answers, then an outage: the largest `StagingFiles` envelope.
fn mid_staging(base: &SyncRun) -> SyncRun {
    let mut run = base.clone();
    let n = files_of(base);
    settle(&mut run, n / 2, FileStatus::Pending, FileStatus::Staged);
    let mut now = T0.plus_secs(60);
    // Batches of 128 files (32 slots × 4); leave pending files for the outage.
    for _ in 1..MAX_FAILED_FILES.min(n / 2 / 128) {
        run = batch_with_a_lost_file(run, now);
        now = now.plus_secs(1);
    }
    let run = outage(run, now.plus_secs(3_600));
    assert!(matches!(run.state, SyncState::StagingFiles(_)));
    assert!(retrying(&run) > 0);
    run
}

/// Every file staged: the run is kicking off the import (detecting the Pathling generation).
fn kicking_off(base: &SyncRun) -> SyncRun {
    let mut run = base.clone();
    let n = files_of(base);
    settle(&mut run, n - 1, FileStatus::Pending, FileStatus::Staged);
    let last = requests(&run, T0).remove(0);
    let run = step_ok(&run, last.id, file_staged(), T0);
    assert!(
        matches!(run.state, SyncState::KickingOffImport(_)),
        "{}",
        run.state.name()
    );
    run
}

/// The import done, half the deletions applied, then the target failing every deletion.
fn mid_deletions(base: &SyncRun) -> SyncRun {
    let n = files_of(base);
    let run = import_accepted(kicking_off(base));
    let mut run = answer(&run, import_completed(), T0);
    assert!(
        matches!(run.state, SyncState::ApplyingDeletions(_)),
        "{}",
        run.state.name()
    );
    let deleted = n * 7 / 100;
    settle(
        &mut run,
        deleted / 2,
        FileStatus::Staged,
        FileStatus::Applied,
    );
    outage(run, T0.plus_secs(60))
}

/// Staging stopped by too many files failing for good: the failed run keeps its table (a
/// resume point) and cleans up the export job.
fn failed(base: &SyncRun) -> SyncRun {
    let mut run = base.clone();
    let n = files_of(base);
    settle(&mut run, n / 2, FileStatus::Pending, FileStatus::Staged);
    let mut now = T0.plus_secs(60);
    while matches!(run.state, SyncState::StagingFiles(_)) {
        run = batch_with_a_lost_file(run, now);
        now = now.plus_secs(1);
    }
    assert!(run.failing(), "{}", run.state.name());
    run
}

fn files_of(run: &SyncRun) -> usize {
    match &run.state {
        SyncState::StagingFiles(s) => s.export.files.len(),
        other => panic!("{}", other.name()),
    }
}

fn size(run: &SyncRun) -> usize {
    let text = persist::encode_string(run);
    // What is measured must be what is stored: it decodes to the same run.
    assert_eq!(&persist::decode(text.as_bytes()).unwrap(), run);
    text.len()
}

#[test]
fn the_envelope_stays_within_16_kib_up_to_a_million_files_in_every_phase() {
    println!(
        "files      staging     kicking_off   deletions     failed       (bytes; retrying files)"
    );
    for n in [1_000usize, 10_000, 100_000, MAX_MANIFEST_FILES] {
        let base = manifest_run(n);
        let staging = mid_staging(&base);
        let sizes = [
            size(&staging),
            size(&kicking_off(&base)),
            size(&mid_deletions(&base)),
            size(&failed(&base)),
        ];
        println!(
            "{n:>9}  {:>9}   {:>9}     {:>9}     {:>9}    ({} retrying)",
            sizes[0],
            sizes[1],
            sizes[2],
            sizes[3],
            retrying(&staging)
        );
        for (phase, bytes) in ["staging", "kicking_off", "deletions", "failed"]
            .iter()
            .zip(sizes)
        {
            assert!(bytes <= BUDGET, "{n} files, {phase}: {bytes} bytes");
        }
    }
}

#[test]
fn a_source_outage_keeps_few_files_in_the_retry_map() {
    // 100,000 files, none staged yet, the source down: the machine stops handing out fresh
    // files once MAX_RETRYING files wait to retry, so the retry map stays small instead of
    // growing to one long entry per file.
    let run = outage(manifest_run(100_000), T0);
    let entries = retrying(&run);
    let bytes = size(&run);
    println!("outage over 100,000 fresh files: {entries} files retrying, {bytes} bytes");
    assert!(entries <= 2 * MAX_RETRYING, "{entries} files retrying");
    assert!(bytes <= BUDGET, "{bytes} bytes");
}

#[test]
fn an_interleaved_manifest_is_grouped_by_type() {
    let run = manifest_run(3_000);
    let SyncState::StagingFiles(s) = &run.state else {
        panic!()
    };
    let t = &s.export.files;
    // 30 output types, then Bundle, then OperationOutcome: one run each, in first-seen order.
    let mut groups: Vec<(FileKind, String)> = Vec::new();
    for r in t.iter() {
        let g = (r.kind, t.type_name(&r).to_string());
        if groups.last() != Some(&g) {
            groups.push(g);
        }
    }
    assert_eq!(groups.len(), 32);
    assert_eq!(groups[0], (FileKind::Output, "Patient".to_string()));
    assert_eq!(groups[1], (FileKind::Output, "Observation".to_string()));
    assert_eq!(
        groups[31],
        (FileKind::Error, "OperationOutcome".to_string())
    );
}
