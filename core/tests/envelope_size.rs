//! Size budgets of the persisted envelope: it must stay far below the Step Functions payload
//! limit (256 KiB) and a DynamoDB item (400 KB) for realistic manifests.
//!
//! Run with `cargo test -p pathling-import-core --test envelope_size -- --nocapture` to see
//! the measured sizes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use pathling_import_core::bulk::{FileKind, OutcomeSummary, MAX_MANIFEST_FILES};
use pathling_import_core::effect::{EffectResult, Next};
use pathling_import_core::persist;
use pathling_import_core::retry::{Failure, FailureKind};
use pathling_import_core::spec::RunSpec;
use pathling_import_core::state::{FileStatus, SyncState};
use pathling_import_core::{SyncRun, Timestamp};

const KIB: usize = 1024;
/// The budget for a 10,000-file manifest.
const BUDGET_10K: usize = 200 * KIB;
/// DynamoDB's item limit is 400 KB; keep headroom for the store's own attributes.
const DYNAMODB_BUDGET: usize = 350_000;

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

/// The worst case for the retry bound: the most transfer slots configuration allows.
fn spec() -> RunSpec {
    spec_with(&[("TRANSFER_CONCURRENCY", "32"), ("APPLY_DELETIONS", "true")])
}

/// `n` files: about 90 % `output[]` over 30 types, 7 % `deleted[]`, 3 % `error[]`, in manifest
/// order.
fn manifest(n: usize) -> Vec<(FileKind, &'static str)> {
    let deleted = n * 7 / 100;
    let errors = n * 3 / 100;
    let outputs = n - deleted - errors;
    (0..outputs)
        .map(|i| (FileKind::Output, TYPES[i % TYPES.len()]))
        .chain((0..deleted).map(|_| (FileKind::Deleted, "Bundle")))
        .chain((0..errors).map(|_| (FileKind::Error, "OperationOutcome")))
        .collect()
}

/// A long error text, as a proxy's HTML error page would give (the machine keeps 300 chars).
fn long_failure(i: usize) -> EffectResult {
    let message = format!(
        "502 Bad Gateway from upstream while fetching export file {i}: <html><head><title>502 \
         Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr>\
         <center>nginx/1.25.3</center><p>The upstream server returned an invalid response \
         while the proxy was reading the response header. Request id {i:032x}.</p></body></html>"
    );
    EffectResult::Failed(Failure::new(
        FailureKind::Http {
            status: 502,
            transient_outcome: false,
            outcome: false,
        },
        message,
    ))
}

/// Marks files `0..count` staged, as `FileStaged` would (bytes, resources per type).
fn mark_staged(run: &mut SyncRun, count: usize) {
    let SyncState::StagingFiles(s) = &mut run.state else {
        panic!("{}", run.state.name())
    };
    let t = &mut s.export.files;
    for row in t.rows.iter_mut().take(count) {
        row.status = FileStatus::Staged;
        t.bytes += 250_000_000;
        if row.kind == FileKind::Output {
            t.resources_by_type[usize::from(row.type_idx)] += 123_456;
        }
    }
    // What five error[] files' OperationOutcomes say, at their longest.
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

/// A source outage at its worst: every file handed out fails with a long error, until the
/// machine stops handing out fresh files and sleeps. The first file succeeds, so that one
/// less than a batch is retrying when the next batch of fresh files goes out (the most
/// retry entries the machine can reach: just under two batches).
fn outage(run: SyncRun, now: Timestamp) -> SyncRun {
    let mut run = run;
    let mut failed = 0usize;
    let mut first = true;
    loop {
        match run.next(now) {
            Next::Run { requests } => {
                for req in requests {
                    let result = if std::mem::take(&mut first) {
                        file_staged()
                    } else {
                        failed += 1;
                        long_failure(failed)
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
    match &run.state {
        SyncState::StagingFiles(s) => s
            .export
            .files
            .rows
            .iter()
            .filter(|r| r.failures > 0)
            .count(),
        _ => 0,
    }
}

/// Half the files staged, then an outage: the largest `StagingFiles` envelope for `n` files.
fn mid_staging(n: usize) -> SyncRun {
    let mut run = staging(spec(), &manifest(n));
    mark_staged(&mut run, n / 2);
    let run = outage(run, T0.plus_secs(3_600));
    assert!(retrying(&run) > 0 || n < 3);
    run
}

/// Every file staged: the run is kicking off the import (detecting the Pathling generation).
fn kicking_off(n: usize) -> SyncRun {
    let mut run = staging(spec(), &manifest(n));
    mark_staged(&mut run, n - 1);
    let last = requests(&run, T0).remove(0);
    let run = step_ok(&run, last.id, file_staged(), T0);
    assert!(
        matches!(run.state, SyncState::KickingOffImport(_)),
        "{}",
        run.state.name()
    );
    run
}

fn size(run: &SyncRun) -> usize {
    let text = persist::encode_string(run);
    // What is measured must be what is stored: it decodes to the same run.
    assert_eq!(&persist::decode(text.as_bytes()).unwrap(), run);
    text.len()
}

#[test]
fn envelope_sizes_by_manifest_size() {
    println!("files   staging (half staged, outage)   kicking_off_import   retry entries");
    let mut at_10k = (0, 0);
    for n in [1usize, 100, 1_000, 10_000] {
        let staging = mid_staging(n);
        let import = kicking_off(n);
        let (s, i) = (size(&staging), size(&import));
        println!(
            "{n:>6}   {s:>9} bytes ({:>5.1} KiB)      {i:>9} bytes ({:>5.1} KiB)   {}",
            s as f64 / 1024.0,
            i as f64 / 1024.0,
            retrying(&staging)
        );
        if n == 10_000 {
            at_10k = (s, i);
        }
    }
    assert!(
        at_10k.0 < BUDGET_10K,
        "10,000 files while staging: {} bytes",
        at_10k.0
    );
    assert!(
        at_10k.1 < BUDGET_10K,
        "10,000 files at the import: {} bytes",
        at_10k.1
    );
}

#[test]
fn the_largest_allowed_manifest_fits_a_dynamodb_item() {
    let n = MAX_MANIFEST_FILES;
    let staging = size(&mid_staging(n));
    let import = size(&kicking_off(n));
    println!(
        "MAX_MANIFEST_FILES = {n}: staging {staging} bytes ({:.1} KiB), kicking_off_import \
         {import} bytes ({:.1} KiB); Step Functions allows 262,144 bytes",
        staging as f64 / 1024.0,
        import as f64 / 1024.0
    );
    assert!(staging < DYNAMODB_BUDGET, "{staging} bytes");
    assert!(import < DYNAMODB_BUDGET, "{import} bytes");
}

#[test]
fn a_source_outage_keeps_few_files_in_the_retry_map() {
    // 10,000 files, none staged yet, the source down: the machine stops handing out fresh
    // files once a batch worth (concurrency × 4) is waiting to retry, so the retry map stays
    // small instead of growing to one long entry per file.
    let run = outage(staging(spec(), &manifest(10_000)), T0);
    let entries = retrying(&run);
    let bytes = size(&run);
    println!("outage over 10,000 fresh files: {entries} files retrying, {bytes} bytes");
    assert!(entries <= 2 * 32 * 4, "{entries} files retrying");
    assert!(bytes < BUDGET_10K, "{bytes} bytes");
}
