//! End-to-end: how the CLI fails. Bad configuration is reported all at once (exit 2) before any
//! network call; permanent failures end the run (exit 1) naming the phase and the file, are
//! recorded in the state file and reported to Sentry without secrets; a rerun starts afresh.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use pathling_import_tests::fake_pathling::{FakePathling, FakePathlingHandle, PathlingConfig};
use pathling_import_tests::fake_source::{
    FakeSource, FakeSourceHandle, HttpFailure, PollFailure, SourceConfig,
};
use serde_json::json;

struct World {
    sandbox: Sandbox,
    src: FakeSourceHandle,
    pathling: FakePathlingHandle,
}

async fn world(source: SourceConfig) -> World {
    let mut sandbox = Sandbox::new();
    let staging = Staging::Dir;
    let auth = SourceAuth::basic();
    let src = FakeSource::start(SourceConfig {
        auth: Some(auth.fake.clone()),
        in_progress_polls: 0,
        ..source
    })
    .await
    .unwrap();
    let allowed = staging.allowable_sources(&sandbox);
    let pathling = FakePathling::start(PathlingConfig {
        import_duration_polls: 0,
        ..PathlingConfig::v9(&[allowed[0].as_str()])
    })
    .await
    .unwrap();
    sandbox
        .configure(&src.base_url(), &pathling.base_url(), &staging)
        .source_auth(&auth);
    World {
        sandbox,
        src,
        pathling,
    }
}

fn cheese() -> PollFailure {
    PollFailure {
        from_poll: 1,
        failure: HttpFailure::new(400, "processing", "the export ran out of cheese"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_names_every_key_before_any_network_call() {
    let recorder = Recorder::start().await;
    let mut sandbox = Sandbox::new();
    let secret = secret_value("bad-config");
    sandbox
        .configure(
            &format!("{}/fhir", recorder.url()),
            &format!("{}/pathling", recorder.url()),
            &Staging::Dir,
        )
        .set("sourceAuthenticationEnabled", true)
        .set("sourceClientId", "someone")
        .set("sourceClientSecret", secret.as_str())
        .secret(&secret)
        .set("importMode", "replace")
        .set("exportRetryTimes", -1)
        .set("transferConcurrency", 100)
        .set("pathlingApi", "8")
        .set("exportRetryWiat", 1);
    let out = sandbox.run(&[]).await;
    out.assert_code(2);
    for key in [
        "importMode",
        "exportRetryTimes",
        "transferConcurrency",
        "pathlingApi",
        "exportRetryWiat",
    ] {
        out.assert_stderr_contains(key);
    }
    out.assert_stderr_contains("did you mean exportRetryWait?")
        .assert_stderr_contains("5 problem(s)");
    assert!(recorder.requests().is_empty(), "{:?}", recorder.requests());
    assert!(!sandbox.staging_dir().exists(), "nothing may be staged");
    assert!(sandbox.state().is_none(), "no run may be started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_config_file_is_an_error_not_a_fallback() {
    let recorder = Recorder::start().await;
    let mut sandbox = Sandbox::new();
    sandbox.configure(
        &format!("{}/fhir", recorder.url()),
        &format!("{}/pathling", recorder.url()),
        &Staging::Dir,
    );
    // A complete configuration in the environment must not be used instead.
    for (k, v) in sandbox.config.clone() {
        let text = v.as_str().map(str::to_string).unwrap_or(v.to_string());
        sandbox.env(&constant_case(&k), &text);
    }
    let missing = sandbox.path().join("no-such-config.json");
    let out = sandbox
        .spawn_args(&[missing.to_str().unwrap(), "--no-progress"])
        .wait(Duration::from_secs(30))
        .await;
    out.assert_code(2)
        .assert_stderr_contains("no-such-config.json");
    assert!(recorder.requests().is_empty());
    assert!(!sandbox.staging_dir().exists());
    assert!(sandbox.state().is_none());
    assert!(!sandbox.path().join("pathling-import.state.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_private_key_is_bad_configuration() {
    let recorder = Recorder::start().await;
    let mut sandbox = Sandbox::new();
    let garbage = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo".repeat(2)
    );
    sandbox
        .configure(
            &format!("{}/fhir", recorder.url()),
            &format!("{}/pathling", recorder.url()),
            &Staging::Dir,
        )
        .set("sourceAuthenticationEnabled", true)
        .set("sourceClientId", "someone")
        .set("sourceAuthMethod", "private_key_jwt")
        .set("sourcePrivateKey", garbage.as_str())
        .set("sourceKeyId", "k1")
        .secret("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo");
    let out = sandbox.run(&[]).await;
    out.assert_code(2)
        .assert_stderr_contains("sourcePrivateKey");
    assert!(recorder.requests().is_empty(), "{:?}", recorder.requests());
    assert!(!sandbox.staging_dir().exists());
    assert!(sandbox.state().is_none(), "no run may be started");
}

/// Settings that only the credential setup can judge (an algorithm the key cannot sign with)
/// are bad configuration too: once corrected, the next run must use the corrected settings,
/// not resume a run that snapshotted the wrong ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrected_credential_settings_take_effect_on_the_next_run() {
    let key = pathling_import_tests::keys::TestKey::ec().unwrap();
    let auth = SourceAuth::jwt_pem(&key);
    let mut w = world(SourceConfig::default()).await;
    w.src.update(|c| c.auth = Some(auth.fake.clone()));
    w.sandbox.source_auth(&auth);
    w.sandbox.set("sourceSigningAlgorithm", "RS384");
    let out = w.sandbox.run(&[]).await;
    out.assert_code(2)
        .assert_stderr_contains("sourceSigningAlgorithm");
    assert_eq!(w.src.stats().kickoffs, 0);
    assert_eq!(w.src.auth_stats().token_requests, 0);
    assert!(w.sandbox.state().is_none(), "no run may be started");

    w.sandbox.set("sourceSigningAlgorithm", "ES384");
    w.sandbox.run(&[]).await.assert_code(0);
    assert_pathling_holds_export(&w.pathling, &w.src);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_export_failure_fails_the_run_and_a_rerun_starts_anew() {
    let w = world(SourceConfig {
        permanent_error: Some(cheese()),
        ..SourceConfig::default()
    })
    .await;
    let out = w.sandbox.run(&[]).await;
    out.assert_code(1)
        .assert_stderr_contains("polling_export")
        .assert_stderr_contains("ran out of cheese");
    let state = w.sandbox.state().unwrap();
    assert_eq!(phase_of(&state), "failed");
    assert_eq!(state["state"]["in_phase"], json!("polling_export"));
    let failed_run = w.sandbox.run_id();
    assert!(
        w.src.jobs()[0].deleted,
        "the failed export job is cleaned up"
    );
    assert_eq!(w.pathling.stats().import_kickoffs, 0);

    w.src.update(|c| c.permanent_error = None);
    w.sandbox.run(&[]).await.assert_code(0);
    assert_ne!(w.sandbox.run_id(), failed_run, "a new run");
    assert_eq!(w.src.stats().kickoffs, 2);
    assert_pathling_holds_export(&w.pathling, &w.src);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_file_fails_the_run_naming_it() {
    // The manifest lists the Condition file, but the source has lost it: its download gets 404.
    let w = world(SourceConfig {
        lost_files: BTreeSet::from(["Condition.0.ndjson".to_string()]),
        ..SourceConfig::default()
    })
    .await;
    assert_eq!(
        w.src.config().dataset.spec("Condition").map(|t| t.files),
        Some(1),
        "one Condition file, the lost one"
    );
    let out = w.sandbox.run(&[]).await;
    out.assert_code(1)
        .assert_stderr_contains("staging_files")
        .assert_stderr_contains("Condition")
        .assert_stderr_contains("404");
    let state = w.sandbox.state().unwrap();
    assert_eq!(phase_of(&state), "failed");
    assert_eq!(state["state"]["in_phase"], json!("staging_files"));
    let failed_run = w.sandbox.run_id();
    assert_eq!(w.pathling.stats().import_kickoffs, 0, "nothing imported");
    assert!(
        !w.src.jobs()[0].deleted,
        "the export job is kept for a retry"
    );
    // The other files were staged while the run went on without the missing one.
    let status = statuses(&state["state"]["resume"]["export"]["files"]).unwrap();
    assert_eq!(status.matches('f').count(), 1, "{status}");
    assert_eq!(status.matches('s').count(), status.len() - 1, "{status}");
    let completed_before = w.src.stats().files_completed;

    // The cause is fixed: the same command continues the failed run.
    w.src.update(|c| c.lost_files.clear());
    let out = w.sandbox.run(&[]).await;
    out.assert_code(0)
        .assert_stderr_contains(&format!("retrying run {failed_run} from staging_files"));
    assert_eq!(w.sandbox.run_id(), failed_run, "the failed run continues");
    assert_eq!(
        w.src.stats().kickoffs,
        1,
        "the export is not requested again"
    );
    assert_eq!(
        w.src.stats().files_completed - completed_before,
        1,
        "only the missing file is downloaded again"
    );
    assert!(
        w.src.jobs()[0].deleted,
        "the export job is cleaned up at the end"
    );
    assert_pathling_holds_export(&w.pathling, &w.src);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_is_reported_to_sentry_without_secrets() {
    let sentry = Recorder::start().await;
    let mut w = world(SourceConfig {
        permanent_error: Some(cheese()),
        ..SourceConfig::default()
    })
    .await;
    let dsn = format!("http://public@{}/1", sentry.addr);
    w.sandbox.set("sentryDsn", dsn.as_str());
    w.sandbox.set("sentryEnvironment", "e2e");
    // SENTRY_DSN from the environment, as a deployment would set it.
    let out = w.sandbox.run_with_env_config().await;
    out.assert_code(1);
    let run_id = w.sandbox.run_id();
    let envelopes: Vec<String> = sentry
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.uri.starts_with("/api/1/envelope"))
        .map(|r| r.body_text())
        .collect();
    assert!(
        !envelopes.is_empty(),
        "no Sentry envelope: {:?}",
        sentry.requests()
    );
    let event = envelopes
        .iter()
        .find(|e| e.contains(&run_id))
        .unwrap_or_else(|| panic!("no envelope names run {run_id}: {envelopes:?}"));
    assert!(event.contains(r#""phase":"polling_export""#), "{event}");
    assert!(event.contains("ran out of cheese"), "{event}");
    let secret = w.sandbox.config["sourceClientSecret"]
        .as_str()
        .unwrap()
        .to_string();
    let mut secrets: Vec<&str> = w.sandbox.secrets().iter().map(String::as_str).collect();
    secrets.push(&secret);
    sentry.assert_no_secrets(&secrets);
}
