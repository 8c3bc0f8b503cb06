//! Golden envelopes and the persistence rules.
//!
//! `tests/fixtures/v{N}/<phase>.json` holds one envelope per phase (every `SyncState` variant,
//! every `ApiState` of `KickingOffImport`, every `Terminal` a `CleaningUp` leads to) as
//! released with schema version N. They are written once, by
//! `BLESS_FIXTURES=1 cargo test -p pathling-import-core --test fixtures`, which only creates
//! missing files and never overwrites one; after that they are never edited. Every fixture of
//! every version must keep decoding; those of the current version must also re-encode to the
//! same JSON, and cover every phase.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use pathling_import_core::bulk::FileKind;
use pathling_import_core::effect::{EffectResult, Input};
use pathling_import_core::persist::{self, PersistError, Upcaster, SCHEMA_VERSION, UPCASTERS};
use pathling_import_core::retry::Failure;
use pathling_import_core::state::{ApiState, SyncState, Terminal};
use pathling_import_core::{SyncRun, Timestamp};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Every fixture name of a complete set. `key` below maps each state to one of them with an
/// exhaustive match: a new variant does not compile until it has a name here (and then a
/// fixture, blessed for the version that introduces it).
const ALL_KEYS: [&str; 15] = [
    "kicking_off_export",
    "polling_export",
    "staging_files",
    "kicking_off_import_detecting",
    "kicking_off_import_known",
    "kicking_off_import_guessed",
    "polling_import",
    "applying_deletions",
    "cleaning_up_succeeded",
    "cleaning_up_failed",
    "cleaning_up_cancelled",
    "succeeded",
    "failed",
    "failed_resumable",
    "cancelled",
];

fn key(run: &SyncRun) -> &'static str {
    match &run.state {
        SyncState::KickingOffExport(_) => "kicking_off_export",
        SyncState::PollingExport(_) => "polling_export",
        SyncState::StagingFiles(_) => "staging_files",
        SyncState::KickingOffImport(s) => match s.api {
            ApiState::Detecting => "kicking_off_import_detecting",
            ApiState::Known { .. } => "kicking_off_import_known",
            ApiState::Guessed { .. } => "kicking_off_import_guessed",
        },
        SyncState::PollingImport(_) => "polling_import",
        SyncState::ApplyingDeletions(_) => "applying_deletions",
        SyncState::CleaningUp(c) => match c.then {
            Terminal::Succeeded(_) => "cleaning_up_succeeded",
            Terminal::Failed(_) => "cleaning_up_failed",
            Terminal::Cancelled(_) => "cleaning_up_cancelled",
        },
        SyncState::Succeeded(_) => "succeeded",
        SyncState::Failed(f) if f.resume.is_some() => "failed_resumable",
        SyncState::Failed(_) => "failed",
        SyncState::Cancelled(_) => "cancelled",
    }
}

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A plain secret value: it must appear in no envelope.
const SECRET_VALUE: &str = "s3cr3t-never-persisted";

fn at(secs: u64) -> Timestamp {
    T0.plus_secs(secs)
}

// =============================================================================================
// The runs the fixtures were blessed from.

const FILES: &[(FileKind, &str)] = &[
    (FileKind::Output, "Patient"),
    (FileKind::Output, "Observation"),
    (FileKind::Output, "Observation"),
    (FileKind::Deleted, "Bundle"),
    (FileKind::Deleted, "Bundle"),
    (FileKind::Error, "OperationOutcome"),
];

/// Group level with patients (a POST kick-off), SINCE=auto with a previous watermark, and
/// authentication on both sides through AWS secret references.
fn kicking_off_export() -> SyncRun {
    let spec = spec_with(&[
        ("EXPORT_LEVEL", "group/cohort-7"),
        ("PATIENTS", "Patient/1,Patient/2"),
        ("TYPES", "Patient,Observation"),
        ("SINCE", "auto"),
        ("TYPE_FILTERS", "Observation?status=final"),
        ("ELEMENTS", "id,meta"),
        ("INCLUDE_ASSOCIATED_DATA", "LatestProvenanceResources"),
        ("SOURCE_AUTHENTICATION_ENABLED", "true"),
        ("SOURCE_CLIENT_ID", "client-1"),
        ("SOURCE_AUTH_METHOD", "client_secret_basic"),
        (
            "SOURCE_CLIENT_SECRET",
            "secretsmanager:arn:aws:secretsmanager:eu-west-1:123456789012:secret:src",
        ),
        ("TARGET_AUTHENTICATION_ENABLED", "true"),
        ("TARGET_CLIENT_ID", "pathling-import"),
        ("TARGET_AUTH_METHOD", "private_key_jwt"),
        ("TARGET_PRIVATE_KEY", "ssm:/pathling-import/target-key"),
        ("TARGET_KEY_ID", "key-2026"),
        ("TARGET_SIGNING_ALGORITHM", "ES384"),
        ("EXPORT_TIMEOUT", "86400"),
        ("EXPORT_RETRY_BACK_OFF", "1.5"),
    ]);
    let run = start_with_watermark(spec, "2026-12-01T10:00:00.000Z");
    let f = Failure::http(429, "Too Many Requests").with_retry_after(Some("120".into()));
    answer(&run, EffectResult::Failed(f), at(1))
}

/// Patient level, a fixed SINCE, a plain client secret (referenced by its key only).
fn polling_export() -> SyncRun {
    let spec = spec_with(&[
        ("EXPORT_LEVEL", "patient"),
        ("SINCE", "2026-01-01T00:00:00Z"),
        ("SOURCE_AUTHENTICATION_ENABLED", "true"),
        ("SOURCE_CLIENT_ID", "client-1"),
        ("SOURCE_CLIENT_SECRET", SECRET_VALUE),
        ("RETRY_AFTER_MAX", "600"),
    ]);
    let run = answer(&start(spec), export_accepted(), at(2));
    let run = answer(&run, export_in_progress(Some("60")), at(3));
    // A 429: polls stay twice as far apart from now on (`throttled`, schema v2).
    let f = Failure::http(429, "Too Many Requests").with_retry_after(Some("5".into()));
    answer(&run, EffectResult::Failed(f), at(63))
}

/// A directory staging store; staged, retrying and fresh files; error outcomes folded.
fn staging_files() -> SyncRun {
    let spec = spec_with(&[
        ("STAGING_URL", "file:///var/lib/pathling-import/"),
        ("TRANSFER_CONCURRENCY", "2"),
    ]);
    let run = answer(&polling_export_of(spec), export_completed(FILES), at(10));
    let reqs = requests(&run, at(10));
    let run = step_ok(&run, reqs[0].id, file_staged(), at(11));
    let run = step_ok(&run, reqs[1].id, network(), at(12));
    let run = step_ok(
        &run,
        reqs[5].id,
        error_file_staged(&[WARNING_OUTCOME]),
        at(13),
    );
    assert!(matches!(run.state, SyncState::StagingFiles(_)));
    run
}

fn polling_export_of(spec: pathling_import_core::spec::RunSpec) -> SyncRun {
    answer(&start(spec), export_accepted(), T0)
}

fn kicking_off_import_detecting() -> SyncRun {
    kicking_off_import(spec(), FILES)
}

/// PATHLING_API=7 with overwrite; a 503 "another import" is being waited out.
fn kicking_off_import_known() -> SyncRun {
    let run = kicking_off_import(
        spec_with(&[("PATHLING_API", "7"), ("IMPORT_MODE", "overwrite")]),
        FILES,
    );
    let f = Failure::http(503, "Another import operation is currently in progress")
        .with_retry_after(Some("30".into()));
    answer(&run, EffectResult::Failed(f), at(20))
}

/// IMPORT_MODE=append: the kick-off is recorded as sent before it goes out (schema v2).
fn kicking_off_import_guessed() -> SyncRun {
    let run = kicking_off_import(spec_with(&[("IMPORT_MODE", "append")]), FILES);
    let run = answer(
        &run,
        EffectResult::PathlingDetected {
            api: None,
            version: Some("UNKNOWN".into()),
        },
        at(21),
    );
    let request = requests(&run, at(22)).remove(0);
    let (run, still) = run.sending(&request, at(22)).unwrap();
    assert!(still.is_some());
    run
}

fn polling_import() -> SyncRun {
    let run = polling_import_of(spec_with(&[("APPLY_DELETIONS", "true")]));
    answer(
        &run,
        EffectResult::ImportInProgress {
            progress: Some("40%".into()),
            retry_after: None,
        },
        at(30),
    )
}

fn polling_import_of(spec: pathling_import_core::spec::RunSpec) -> SyncRun {
    common::polling_import(spec, FILES)
}

/// One deleted[] file applied, the other waiting to retry.
fn applying_deletions() -> SyncRun {
    let run = polling_import_of(spec_with(&[("APPLY_DELETIONS", "true")]));
    let run = answer(&run, import_completed(), at(40));
    let reqs = requests(&run, at(40));
    let run = step_ok(
        &run,
        reqs[0].id,
        EffectResult::DeletionsApplied {
            deleted: 12,
            absent: 3,
        },
        at(41),
    );
    step_ok(&run, reqs[1].id, http(500, "Internal Server Error"), at(42))
}

fn cleaning_up_succeeded() -> SyncRun {
    answer(&polling_import_of(spec()), import_completed(), at(50))
}

/// Pathling refused the import: the export job is deleted, the run can be retried.
fn cleaning_up_failed() -> SyncRun {
    answer(
        &polling_import_of(spec()),
        http(400, "Error parsing s3a://bucket/x.ndjson"),
        at(45),
    )
}

/// A file the source refuses for good: the others are staged, the export job is kept for a
/// retry.
fn failed_resumable() -> SyncRun {
    let run = staging(spec(), FILES);
    let req = requests(&run, T0).remove(1);
    let run = step_ok(
        &run,
        req.id,
        http(403, "Forbidden: signature expired"),
        at(5),
    );
    stage_all(&run, at(6))
}

fn cleaning_up_cancelled() -> SyncRun {
    polling_import_of(spec())
        .step(
            Input::Cancel {
                reason: "stopped by the operator".into(),
            },
            at(60),
        )
        .unwrap()
}

fn succeeded() -> SyncRun {
    answer(
        &cleaning_up_succeeded(),
        EffectResult::ExportJobDeleted,
        at(51),
    )
}

/// The kick-off refused: no status URL, so no clean-up.
fn failed_run() -> SyncRun {
    answer(
        &start(spec()),
        http(400, "Unknown resource type Foo"),
        at(1),
    )
}

fn cancelled() -> SyncRun {
    answer(
        &cleaning_up_cancelled(),
        EffectResult::Failed(Failure::http(404, "Not Found")),
        at(61),
    )
}

fn fixture_runs() -> Vec<SyncRun> {
    vec![
        kicking_off_export(),
        polling_export(),
        staging_files(),
        kicking_off_import_detecting(),
        kicking_off_import_known(),
        kicking_off_import_guessed(),
        polling_import(),
        applying_deletions(),
        cleaning_up_succeeded(),
        cleaning_up_failed(),
        cleaning_up_cancelled(),
        succeeded(),
        failed_run(),
        failed_resumable(),
        cancelled(),
    ]
}

fn pretty(run: &SyncRun) -> String {
    let mut text = serde_json::to_string_pretty(&persist::encode(run)).unwrap();
    text.push('\n');
    text
}

// =============================================================================================
// Blessing and checking the fixtures.

/// Writes the fixtures of the current version that do not exist yet. Never overwrites one.
#[test]
fn bless_fixtures() {
    if std::env::var("BLESS_FIXTURES").as_deref() != Ok("1") {
        return;
    }
    let dir = fixtures_root().join(format!("v{SCHEMA_VERSION}"));
    std::fs::create_dir_all(&dir).unwrap();
    for run in fixture_runs() {
        let path = dir.join(format!("{}.json", key(&run)));
        if path.exists() {
            println!("kept    {}", path.display());
            continue;
        }
        std::fs::write(&path, pretty(&run)).unwrap();
        println!("blessed {}", path.display());
    }
}

/// The generator makes one run per fixture name, so blessing a new version is complete.
#[test]
fn the_generator_covers_every_phase() {
    let keys: Vec<&str> = fixture_runs().iter().map(key).collect();
    assert_eq!(keys, ALL_KEYS);
}

/// `(version, name, text)` of every fixture file.
fn fixture_files() -> Vec<(u64, String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(fixtures_root()).expect("tests/fixtures exists") {
        let dir = entry.unwrap().path();
        let Some(version) = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix('v'))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            panic!("unexpected entry {} in tests/fixtures", dir.display());
        };
        for file in std::fs::read_dir(&dir).unwrap() {
            let path = file.unwrap().path();
            assert_eq!(
                path.extension().and_then(|e| e.to_str()),
                Some("json"),
                "{}",
                path.display()
            );
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            out.push((version, name, std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}

#[test]
fn every_fixture_of_every_version_still_decodes() {
    let files = fixture_files();
    assert!(
        !files.is_empty(),
        "no fixtures: run with BLESS_FIXTURES=1 once"
    );
    for (version, name, text) in &files {
        let run = persist::decode(text)
            .unwrap_or_else(|e| panic!("v{version}/{name}.json no longer decodes: {e}"));
        assert_eq!(
            key(&run),
            name,
            "v{version}/{name}.json holds another phase"
        );
        // A decoded run answers `next` (at its own times and any other).
        let _ = run.next(Timestamp::ZERO);
        let _ = run.next(at(100_000));
    }
}

#[test]
fn current_fixtures_reencode_to_the_same_json_and_cover_every_phase() {
    let mut names = BTreeSet::new();
    for (version, name, text) in fixture_files() {
        if version != SCHEMA_VERSION {
            continue;
        }
        let stored: Value = serde_json::from_slice(&text).unwrap();
        let run = persist::decode(&text).unwrap();
        assert_eq!(
            persist::encode(&run),
            stored,
            "v{version}/{name}.json does not re-encode to the same JSON"
        );
        names.insert(name);
    }
    let expected: BTreeSet<String> = ALL_KEYS.iter().map(|k| k.to_string()).collect();
    assert_eq!(
        names, expected,
        "the v{SCHEMA_VERSION} fixtures must cover every phase (BLESS_FIXTURES=1 adds missing ones)"
    );
}

#[test]
fn no_fixture_holds_a_secret_value() {
    for (version, name, text) in fixture_files() {
        let text = String::from_utf8(text).unwrap();
        assert!(!text.contains(SECRET_VALUE), "v{version}/{name}.json");
    }
    // The generator's runs neither.
    for run in fixture_runs() {
        assert!(!persist::encode_string(&run).contains(SECRET_VALUE));
    }
}

#[test]
fn the_envelope_has_the_documented_shape() {
    let run = staging_files();
    let v = persist::encode(&run);
    let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "schema_version",
            "run_id",
            "seq",
            "started_at",
            "phase_since",
            "spec",
            "watermark",
            "state"
        ])
    );
    assert_eq!(v["schema_version"], json!(SCHEMA_VERSION));
    assert_eq!(v["state"]["phase"], "staging_files");
    // A failed run keeps its tag: the failed phase does not overwrite it.
    let failed = persist::encode(&cleaning_up_failed());
    assert_eq!(failed["state"]["phase"], "cleaning_up");
    assert_eq!(failed["state"]["then"]["status"], "failed");
    assert_eq!(failed["state"]["then"]["in_phase"], "polling_import");
    assert_eq!(
        failed["state"]["then"]["resume"]["from"],
        "kicking_off_import"
    );
    let failed = persist::encode(&failed_run());
    assert_eq!(failed["state"]["phase"], "failed");
    assert_eq!(failed["state"]["in_phase"], "kicking_off_export");
}

// =============================================================================================
// Versions and upcasters.

fn fixture_value(name: &str) -> Value {
    let path = fixtures_root()
        .join(format!("v{SCHEMA_VERSION}"))
        .join(format!("{name}.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn with_version(mut v: Value, version: Value) -> Value {
    v["schema_version"] = version;
    v
}

#[test]
fn a_newer_schema_version_is_refused_with_a_clear_error() {
    let v = with_version(fixture_value("polling_export"), json!(SCHEMA_VERSION + 1));

    let err = persist::decode(v.to_string().as_bytes()).unwrap_err();

    assert_eq!(
        err,
        PersistError::TooNew {
            found: SCHEMA_VERSION + 1
        }
    );
    let text = err.to_string();
    assert!(
        text.contains(&format!("schema_version {}", SCHEMA_VERSION + 1)),
        "{text}"
    );
    assert!(text.contains("newer than this build understands"), "{text}");
    assert!(text.contains("upgrade pathling-import"), "{text}");
}

#[test]
fn a_missing_or_unusable_schema_version_is_refused() {
    let mut missing = fixture_value("polling_export");
    missing.as_object_mut().unwrap().remove("schema_version");
    for v in [
        missing,
        with_version(fixture_value("polling_export"), json!("1")),
        with_version(fixture_value("polling_export"), json!(0)),
        with_version(fixture_value("polling_export"), json!(-1)),
        with_version(fixture_value("polling_export"), json!(1.5)),
        with_version(fixture_value("polling_export"), Value::Null),
    ] {
        let err = persist::decode(v.to_string().as_bytes()).unwrap_err();
        assert_eq!(err, PersistError::NoVersion, "{}", v["schema_version"]);
        assert!(err.to_string().contains("schema_version"));
    }
}

/// A synthetic "v1 → v2" upgrade: pretend v1 called `started_at` `started`.
fn rename_started(mut v: Value) -> Result<Value, String> {
    let obj = v.as_object_mut().ok_or("not an object")?;
    let started = obj.remove("started").ok_or("no `started` field")?;
    obj.insert("started_at".into(), started);
    Ok(v)
}

/// The same envelope as it would have looked in that pretended older version.
fn as_old_version(mut v: Value, version: u64) -> Value {
    let obj = v.as_object_mut().unwrap();
    let started = obj.remove("started_at").unwrap();
    obj.insert("started".into(), started);
    obj.insert("schema_version".into(), json!(version));
    v
}

#[test]
fn an_upcaster_chain_upgrades_an_older_envelope() {
    let current = fixture_value("applying_deletions");
    let expected = persist::decode(current.to_string().as_bytes()).unwrap();
    let chain: &[Upcaster] = &[rename_started];

    let mut upgraded = persist::decode_value(as_old_version(current.clone(), 1), chain).unwrap();

    assert_eq!(
        upgraded.upgraded_from,
        Some(1),
        "the runner logs the upgrade"
    );
    upgraded.upgraded_from = None;
    assert_eq!(upgraded, expected);
    // Without the upcaster the old shape does not decode.
    let err = persist::decode_value(as_old_version(current, 1), UPCASTERS).unwrap_err();
    assert!(
        matches!(&err, PersistError::Malformed(m) if m.contains("started_at")),
        "{err}"
    );
}

#[test]
fn upcasters_run_in_order_from_the_stored_version() {
    // v1 called it `a`, v2 called it `started`, v3 (current for this chain) `started_at`.
    fn v1_to_v2(mut v: Value) -> Result<Value, String> {
        let obj = v.as_object_mut().ok_or("not an object")?;
        let a = obj.remove("a").ok_or("v1 envelope without `a`")?;
        obj.insert("started".into(), a);
        Ok(v)
    }
    let chain: &[Upcaster] = &[v1_to_v2, rename_started];
    let current = fixture_value("succeeded");
    let expected = persist::decode(current.to_string().as_bytes()).unwrap();

    let upgraded = |v: Value| {
        let mut run = persist::decode_value(v, chain).unwrap();
        run.upgraded_from = None;
        run
    };
    let mut v1 = as_old_version(current.clone(), 1);
    let started = v1.as_object_mut().unwrap().remove("started").unwrap();
    v1["a"] = started;
    assert_eq!(upgraded(v1), expected);

    // A v2 envelope only goes through the second step.
    let v2 = as_old_version(current.clone(), 2);
    assert_eq!(upgraded(v2), expected);

    // v3 is current for this chain: no upcaster runs.
    let v3 = with_version(current.clone(), json!(3));
    assert_eq!(persist::decode_value(v3, chain).unwrap(), expected);

    // v4 is newer than the chain knows.
    let v4 = with_version(current, json!(4));
    assert_eq!(
        persist::decode_value(v4, chain).unwrap_err(),
        PersistError::TooNew { found: 4 }
    );
}

#[test]
fn a_failing_upcaster_names_the_version_it_started_from() {
    fn broken(_: Value) -> Result<Value, String> {
        Err("field `x` has no v2 equivalent".into())
    }
    let v = with_version(fixture_value("failed"), json!(1));

    let err = persist::decode_value(v, &[broken]).unwrap_err();

    assert_eq!(
        err,
        PersistError::Upcast {
            version: 1,
            reason: "field `x` has no v2 equivalent".into()
        }
    );
    assert!(err.to_string().contains("schema_version 1"), "{err}");
}

#[test]
fn malformed_envelopes_are_refused() {
    assert!(matches!(
        persist::decode(b"{not json"),
        Err(PersistError::NotJson(_))
    ));
    assert!(matches!(
        persist::decode(b""),
        Err(PersistError::NotJson(_))
    ));
    assert_eq!(persist::decode(b"[1, 2]"), Err(PersistError::NoVersion));

    let malformed = |edit: &dyn Fn(&mut Value)| {
        let mut v = fixture_value("staging_files");
        edit(&mut v);
        match persist::decode(v.to_string().as_bytes()) {
            Err(PersistError::Malformed(m)) => m,
            other => panic!("expected Malformed, got {other:?}"),
        }
    };
    malformed(&|v| {
        v.as_object_mut().unwrap().remove("state");
    });
    malformed(&|v| v["state"]["phase"] = json!("teleporting"));
    malformed(&|v| v["seq"] = json!("three"));
    malformed(&|v| v["state"]["export"] = json!(null));
    let m = malformed(&|v| v["state"]["export"]["files"]["status"] = json!("s1"));
    assert!(m.contains("status and layout differ in length"), "{m}");
    let m = malformed(&|v| v["state"]["export"]["files"]["status"] = json!("s7"));
    assert!(m.contains("status and layout differ in length"), "{m}");
    let m = malformed(&|v| v["state"]["export"]["files"]["status"] = json!("s1p1x1p3"));
    assert!(m.contains("unknown status"), "{m}");
    let m = malformed(&|v| v["state"]["export"]["files"]["status"] = json!("s0p6"));
    assert!(m.contains("bad run length"), "{m}");
    // A run length that would expand a corrupt file into billions of rows is refused.
    let m = malformed(&|v| v["state"]["export"]["files"]["layout"] = json!("o0*99999999999"));
    assert!(m.contains("bad run length"), "{m}");
    let m = malformed(&|v| v["state"]["export"]["files"]["layout"] = json!("o99*6"));
    assert!(m.contains("out of range"), "{m}");
    let m = malformed(&|v| v["state"]["export"]["files"]["layout"] = json!("o0-6"));
    assert!(m.contains("is not {kind}{type}*{rows}"), "{m}");
    let m = malformed(&|v| {
        v["state"]["export"]["files"]["retries"] = json!({"first": [1, 0, "x"]});
    });
    assert!(m.contains("not a file index"), "{m}");
    let m = malformed(&|v| {
        v["state"]["export"]["files"]["retries"] = json!({"77": [1, 0, "x"]});
    });
    assert!(m.contains("unknown file 77"), "{m}");
}

#[test]
fn the_staging_fixture_keeps_its_retry_entry() {
    // The retry map is keyed by file index as a JSON string; it must survive a reload.
    let run = persist::decode(fixture_value("staging_files").to_string().as_bytes()).unwrap();
    let SyncState::StagingFiles(s) = &run.state else {
        panic!()
    };
    let row = s.export.files.row(1).unwrap();
    assert_eq!(row.failures, 1);
    assert!(s
        .export
        .files
        .error(1)
        .unwrap()
        .contains("connection reset"));
}

/// v2 stored the file table as columns; upcast, it is the table the generator builds today
/// (every status, a retry entry with its error).
#[test]
fn a_v2_file_table_upcasts_to_the_same_rows() {
    let files = |run: &SyncRun| match &run.state {
        SyncState::StagingFiles(s) => s.export.files.clone(),
        other => panic!("{}", other.name()),
    };
    let v2 = std::fs::read(fixtures_root().join("v2/staging_files.json")).unwrap();
    let old = files(&persist::decode(&v2).unwrap());
    let new = files(&staging_files());
    assert_eq!(
        old.iter().collect::<Vec<_>>(),
        new.iter().collect::<Vec<_>>()
    );
    assert_eq!(old, new);
}
