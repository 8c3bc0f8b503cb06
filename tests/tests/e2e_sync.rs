//! End-to-end: complete syncs with the real `pathling-import` binary against the fake source and
//! the fake Pathling, staging to a directory and to S3 (moto at `MOTO_ENDPOINT`), for both
//! Pathling generations and every source auth method; an empty export; incremental runs with
//! `since: auto` and deletions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use chrono::Utc;
use common::*;
use pathling_import_tests::auth::AuthConfig;
use pathling_import_tests::data::{DatasetConfig, ExportFilter};
use pathling_import_tests::fake_pathling::{FakePathling, FakePathlingHandle, PathlingConfig};
use pathling_import_tests::fake_source::{FakeSource, SourceConfig};
use pathling_import_tests::fhir::RetryAfter;
use pathling_import_tests::keys::TestKey;
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gen {
    V7,
    V9,
}

#[derive(Clone, Copy, Debug)]
enum Api {
    Auto,
    Explicit,
}

async fn start_pathling(
    generation: Gen,
    sandbox: &Sandbox,
    staging: &Staging,
    change: impl FnOnce(&mut PathlingConfig),
) -> FakePathlingHandle {
    let allowed = staging.allowable_sources(sandbox);
    let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
    let mut config = match generation {
        Gen::V7 => PathlingConfig::v7(&allowed),
        Gen::V9 => PathlingConfig::v9(&allowed),
    };
    config.s3 = staging.pathling_s3();
    change(&mut config);
    FakePathling::start(config).await.unwrap()
}

/// One complete sync and everything it must leave behind.
async fn full_sync(
    staging: Staging,
    generation: Gen,
    api: Api,
    auth: SourceAuth,
    target_auth: bool,
) {
    let mut sandbox = Sandbox::new();
    let src = FakeSource::start(SourceConfig {
        auth: Some(auth.fake.clone()),
        requires_access_token: true,
        in_progress_polls: 1,
        progress_retry_after: RetryAfter::Seconds(1),
        ..SourceConfig::default()
    })
    .await
    .unwrap();
    let target_secret = secret_value("target");
    let pathling = start_pathling(generation, &sandbox, &staging, |c| {
        c.import_duration_polls = 1;
        if target_auth {
            c.auth = Some(AuthConfig::client_secret_basic(
                "e2e-target",
                &target_secret,
            ));
        }
    })
    .await;
    sandbox
        .configure(&src.base_url(), &pathling.base_url(), &staging)
        .source_auth(&auth);
    if target_auth {
        sandbox
            .set("targetAuthenticationEnabled", true)
            .set("targetClientId", "e2e-target")
            .set("targetClientSecret", target_secret.as_str())
            .secret(&target_secret);
    }
    if let Api::Explicit = api {
        sandbox.set(
            "pathlingApi",
            match generation {
                Gen::V7 => "7",
                Gen::V9 => "9",
            },
        );
    }

    let out = sandbox.run(&[]).await;
    out.assert_code(0).assert_stderr_contains("succeeded");

    // Pathling holds exactly what the source exported, from one import request of the right
    // shape (a detection that guessed wrong would show as a refused first request).
    assert_pathling_holds_export(&pathling, &src);
    let imports = pathling.import_requests();
    assert_eq!(imports.len(), 1, "import requests: {imports:?}");
    let body = imports[0].body.clone().unwrap();
    let params: Vec<&str> = body["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    match generation {
        Gen::V7 => assert!(params.iter().all(|p| *p == "source"), "{body}"),
        Gen::V9 => assert!(
            params.contains(&"input") && params.contains(&"saveMode"),
            "{body}"
        ),
    }
    assert_eq!(pathling.stats().imports_accepted, 1);
    if target_auth {
        assert!(pathling.auth_stats().tokens_issued >= 1);
        assert_eq!(pathling.auth_stats().bearer_rejected, 0);
    }

    // The source: one export, authenticated with the configured method, deleted at the end.
    let stats = src.stats();
    assert_eq!(stats.kickoffs, 1);
    let jobs = src.jobs();
    assert_eq!(jobs.len(), 1);
    assert!(jobs[0].deleted, "the export job was not DELETEd");
    assert_eq!(stats.job_deletes, 1);
    let auth_stats = src.auth_stats();
    assert!(auth_stats.tokens_issued >= 1);
    assert!(
        auth_stats.methods_used.iter().all(|m| *m == auth.method),
        "methods used: {:?}",
        auth_stats.methods_used
    );
    assert_eq!(auth_stats.bearer_rejected, 0);
    assert_eq!(stats.file_gets as usize, output_files(&src));
    assert_eq!(stats.file_gets, stats.file_gets_with_authorization);

    // The staged objects, and the state file's record of the run.
    let run_id = sandbox.run_id();
    let expected = src.expected_resources(&ExportFilter::default());
    assert_staged(&staging, &sandbox, &run_id, output_files(&src), &expected).await;
    let state = sandbox.state().unwrap();
    assert_eq!(phase_of(&state), "succeeded");
    assert_eq!(
        state["watermark"]["transaction_time"],
        json!(jobs[0].transaction_time)
    );
    assert_eq!(state["state"]["resources"], json!(expected.len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_pathling9_auto_client_secret_basic_with_target_auth() {
    full_sync(Staging::Dir, Gen::V9, Api::Auto, SourceAuth::basic(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_pathling7_auto_client_secret_post() {
    full_sync(Staging::Dir, Gen::V7, Api::Auto, SourceAuth::post(), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_pathling9_explicit_private_key_jwt_es384_pem() {
    let key = TestKey::ec().unwrap();
    full_sync(
        Staging::Dir,
        Gen::V9,
        Api::Explicit,
        SourceAuth::jwt_pem(&key),
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_pathling9_auto_private_key_jwt_rs384_jwk() {
    let key = TestKey::rsa().unwrap();
    full_sync(
        Staging::s3().await,
        Gen::V9,
        Api::Auto,
        SourceAuth::jwt_jwk(&key),
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_pathling7_auto_private_key_jwt_es384_jwk() {
    let key = TestKey::ec().unwrap();
    full_sync(
        Staging::s3().await,
        Gen::V7,
        Api::Auto,
        SourceAuth::jwt_jwk(&key),
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_pathling7_explicit_private_key_jwt_rs384_pem() {
    let key = TestKey::rsa().unwrap();
    full_sync(
        Staging::s3().await,
        Gen::V7,
        Api::Explicit,
        SourceAuth::jwt_pem(&key),
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_pathling9_explicit_client_secret_basic() {
    full_sync(
        Staging::s3().await,
        Gen::V9,
        Api::Explicit,
        SourceAuth::basic(),
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_manifest_exits_3_without_an_import() {
    let mut sandbox = Sandbox::new();
    let auth = SourceAuth::basic();
    let src = FakeSource::start(SourceConfig {
        auth: Some(auth.fake.clone()),
        in_progress_polls: 0,
        ..SourceConfig::default()
    })
    .await
    .unwrap();
    let staging = Staging::Dir;
    let pathling = start_pathling(Gen::V9, &sandbox, &staging, |_| {}).await;
    sandbox
        .configure(&src.base_url(), &pathling.base_url(), &staging)
        .source_auth(&auth)
        // A type the source has none of: the manifest's output[] is empty.
        .set("types", "Encounter");

    let out = sandbox.run(&[]).await;
    out.assert_code(3)
        .assert_stderr_contains("nothing to import");
    assert_eq!(
        src.last_kickoff().unwrap().param_values("_type"),
        ["Encounter"]
    );
    assert_eq!(
        pathling.stats().import_kickoffs,
        0,
        "no $import may be sent"
    );
    assert!(pathling_content(&pathling).is_empty());
    assert!(src.jobs()[0].deleted, "the export job was not DELETEd");
    let state = sandbox.state().unwrap();
    assert_eq!(phase_of(&state), "succeeded");
    assert_eq!(state["state"]["nothing_to_import"], json!(true));
}

/// First run: full export. Second run with `since: auto`: `_since` is the first run's
/// transactionTime, the resources changed since are imported and `deleted[]` is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_since_auto_and_deletions_on_pathling9() {
    let mut sandbox = Sandbox::new();
    let auth = SourceAuth::basic();
    // Resources are a minute apart and the newest ones lie in the future: an export `_since`
    // now still has something in it.
    let mut dataset = DatasetConfig::new(&[
        ("Patient", 40, 1),
        ("Observation", 80, 2),
        ("Condition", 30, 1),
    ]);
    dataset.base_time = Utc::now() - chrono::Duration::minutes(20);
    let src = FakeSource::start(SourceConfig {
        auth: Some(auth.fake.clone()),
        in_progress_polls: 0,
        dataset,
        ..SourceConfig::default()
    })
    .await
    .unwrap();
    let staging = Staging::Dir;
    let pathling = start_pathling(Gen::V9, &sandbox, &staging, |c| {
        c.import_duration_polls = 0;
    })
    .await;
    sandbox
        .configure(&src.base_url(), &pathling.base_url(), &staging)
        .source_auth(&auth)
        .set("since", "auto")
        .set("applyDeletions", true);

    sandbox.run(&[]).await.assert_code(0);
    let first = src.last_kickoff().unwrap();
    assert!(
        first.param_values("_since").is_empty(),
        "no watermark yet: full export"
    );
    assert_pathling_holds_export(&pathling, &src);
    let first_run = sandbox.run_id();
    let first_tt = src.jobs()[0].transaction_time.clone();
    assert_eq!(
        sandbox.state().unwrap()["watermark"]["transaction_time"],
        json!(first_tt)
    );

    // Between the runs the source deletes three resources; one of them Pathling never had
    // (it counts as already absent).
    let deleted = [
        ("Patient", "patient-3"),
        ("Observation", "observation-70"),
        ("Condition", "condition-999"),
    ];
    for (t, id) in &deleted[..2] {
        assert!(
            pathling.resource(t, id).is_some(),
            "{t}/{id} imported first"
        );
    }
    src.update(|c| {
        c.deleted = deleted
            .iter()
            .map(|(t, id)| (t.to_string(), id.to_string()))
            .collect();
    });
    let content_before = pathling_content(&pathling);

    let out = sandbox.run(&[]).await;
    out.assert_code(0);
    let second = src.last_kickoff().unwrap();
    assert_eq!(second.param_values("_since"), vec![first_tt.clone()]);
    let second_run = sandbox.run_id();
    assert_ne!(first_run, second_run, "the second run is a new run");

    // Only the resources changed since the first export were staged and imported.
    let since = pathling_import_tests::fhir::parse_instant(&first_tt).unwrap();
    let incremental = src.expected_resources(&ExportFilter {
        since: Some(since),
        ..ExportFilter::default()
    });
    assert!(!incremental.is_empty() && incremental.len() < content_before.len());
    let state = sandbox.state().unwrap();
    assert_eq!(state["state"]["resources"], json!(incremental.len()));
    assert_eq!(state["state"]["deleted"], json!(2));
    assert_eq!(state["state"]["already_absent"], json!(1));
    assert_eq!(state["state"]["since"], json!(first_tt));

    // Pathling: everything the source still has, nothing it deleted.
    for (t, id) in &deleted {
        assert!(
            pathling.resource(t, id).is_none(),
            "{t}/{id} still in Pathling"
        );
    }
    let mut expected: BTreeMap<(String, String), Value> = content_before;
    for (t, id) in &deleted {
        expected.remove(&(t.to_string(), id.to_string()));
    }
    assert_eq!(
        expected,
        src.expected_resources(&ExportFilter::default()),
        "Pathling holds the source's current data"
    );
    assert_same_resources("Pathling", &pathling_content(&pathling), &expected);
    assert_eq!(pathling.stats().deletes_applied, 2);
    assert!(src.jobs().iter().all(|j| j.deleted));
}

/// The sync also runs from environment variables alone (no config file), as the original did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_from_the_environment() {
    let mut sandbox = Sandbox::new();
    let auth = SourceAuth::post();
    let src = FakeSource::start(SourceConfig {
        auth: Some(auth.fake.clone()),
        in_progress_polls: 0,
        ..SourceConfig::default()
    })
    .await
    .unwrap();
    let staging = Staging::Dir;
    let pathling = start_pathling(Gen::V7, &sandbox, &staging, |c| {
        c.import_duration_polls = 0;
    })
    .await;
    sandbox
        .configure(&src.base_url(), &pathling.base_url(), &staging)
        .source_auth(&auth);
    let out = sandbox.run_with_env_config().await;
    out.assert_code(0);
    assert_pathling_holds_export(&pathling, &src);
    assert!(src.jobs()[0].deleted);
}

/// A paged manifest (Bulk Data's `link` with relation `next`) is read to its last page, with
/// the token on every page of the source's origin; the files of every page are staged and
/// imported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_manifest_is_read_to_its_last_page() {
    let mut sandbox = Sandbox::new();
    let auth = SourceAuth::basic();
    let src = FakeSource::start(SourceConfig {
        auth: Some(auth.fake.clone()),
        requires_access_token: true,
        in_progress_polls: 0,
        dataset: DatasetConfig::new(&[("Patient", 40, 4), ("Observation", 120, 7)]),
        manifest_page_size: Some(3),
        ..SourceConfig::default()
    })
    .await
    .unwrap();
    let staging = Staging::Dir;
    let pathling = start_pathling(Gen::V9, &sandbox, &staging, |_| {}).await;
    sandbox
        .configure(&src.base_url(), &pathling.base_url(), &staging)
        .source_auth(&auth);

    let out = sandbox.run(&[]).await;
    out.assert_code(0);
    // 11 files, 3 a page: 4 pages (the first from the status URL).
    assert_eq!(src.stats().manifests, 4);
    assert_eq!(pathling.resource_count("Patient"), 40);
    assert_eq!(pathling.resource_count("Observation"), 120);
    let state = sandbox.state().unwrap();
    assert_eq!(state["state"]["files"], json!(11), "{state}");
}

/// A paged manifest whose decoded whole could not be read back (each page within
/// MANIFEST_MAX_SIZE, all of them more than twice it) fails the run at once naming the
/// setting, before any file is staged: read back later (a new process), it would otherwise
/// fail every file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_manifest_too_large_to_read_back_fails_naming_manifest_max_size() {
    let mut sandbox = Sandbox::new();
    let src = FakeSource::start(SourceConfig {
        in_progress_polls: 0,
        // 20,000 files, 5,000 a page (about 0.6 MB each): about 2.8 MB decoded.
        dataset: DatasetConfig::new(&[("Observation", 20_000, 20_000)]),
        manifest_page_size: Some(5_000),
        ..SourceConfig::default()
    })
    .await
    .unwrap();
    let staging = Staging::Dir;
    let pathling = start_pathling(Gen::V9, &sandbox, &staging, |_| {}).await;
    sandbox
        .configure(&src.base_url(), &pathling.base_url(), &staging)
        .set("manifestMaxSize", 1);

    let out = sandbox.run(&[]).await;
    out.assert_code(1)
        .assert_stderr_contains("MANIFEST_MAX_SIZE")
        .assert_stderr_contains("20000 files");
    assert_eq!(src.stats().manifests, 4, "every page was read");
    assert_eq!(src.stats().files_completed, 0, "no file was downloaded");
    let state = sandbox.state().unwrap();
    assert_eq!(
        state["state"]["in_phase"],
        json!("polling_export"),
        "{state}"
    );
}
