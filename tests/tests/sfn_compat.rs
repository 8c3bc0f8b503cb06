//! The original's handlers (`pathling_import_runners::sfn::compat`, the logic of
//! `pathling-import-handlers`) called in-process, for what the ASL execution tests do not
//! reach cheaply: a manifest too large for a Step Functions payload travels as a stub naming
//! the stored manifest, and the transfer still stages and lists every file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use pathling_import_core::config::{self, RawConfig};
use pathling_import_core::Timestamp;
use pathling_import_runners::aws::ErrorType;
use pathling_import_runners::executor::now;
use pathling_import_runners::sfn::compat::{
    transfer_run_id, Handler, Handlers, INLINE_MANIFEST_LIMIT, MANIFEST_REF,
};
use pathling_import_runners::sfn::EXTRA_KEYS;
use pathling_import_tests::auth::AuthConfig;
use pathling_import_tests::data::DatasetConfig;
use pathling_import_tests::fake_source::{FakeSource, SourceConfig};
use pathling_import_tests::keys::TestKey;
use serde_json::{json, Value};

/// A directory removed on drop.
fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir()
        .unwrap()
}

async fn handlers(
    handler: Handler,
    source: &str,
    staging: &std::path::Path,
    extra: &[(&str, &str)],
) -> Handlers {
    let mut vars: Vec<(String, String)> = vec![
        ("SOURCE_ENDPOINT".into(), source.into()),
        ("SOURCE_AUTHENTICATION_ENABLED".into(), "false".into()),
        ("TARGET_ENDPOINT".into(), "http://127.0.0.1:9/fhir".into()),
        ("TARGET_AUTHENTICATION_ENABLED".into(), "false".into()),
        ("TRANSFER_CONCURRENCY".into(), "8".into()),
        (
            "STAGING_URL".into(),
            format!("file://{}/", staging.display()),
        ),
    ];
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let raw = RawConfig::from_env(vars, EXTRA_KEYS);
    let config = config::parse(&raw, EXTRA_KEYS).unwrap();
    Handlers::new(handler, config).await.unwrap()
}

fn budget(secs: u64) -> Timestamp {
    Timestamp(now().0 + secs * 1000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_too_large_for_the_payload_travels_as_a_stub_and_every_file_is_listed() {
    let files = 2_500u32;
    let source = FakeSource::start(SourceConfig {
        dataset: DatasetConfig::new(&[("Observation", u64::from(files), files)]),
        in_progress_polls: 0,
        ..SourceConfig::default()
    })
    .await
    .unwrap();
    let staging = temp_dir("sfn-compat-stub");
    let base = source.base_url();

    let export = handlers(Handler::FhirExport, &base, staging.path(), &[]).await;
    let out = export.invoke(json!({}), budget(30)).await.unwrap();
    let status_url = out["statusUrl"].as_str().unwrap().to_string();

    let check = handlers(Handler::CheckExportStatus, &base, staging.path(), &[]).await;
    let out = check
        .invoke(json!({ "statusUrl": status_url }), budget(30))
        .await
        .unwrap();
    let result = &out["result"];
    let key = result[MANIFEST_REF]
        .as_str()
        .expect("a stub naming the stored manifest");
    assert!(result.get("output").is_none(), "no file list in the stub");
    assert!(result["transactionTime"].is_string());
    let stored = std::fs::read(staging.path().join(key)).unwrap();
    assert!(
        stored.len() > INLINE_MANIFEST_LIMIT,
        "{} bytes",
        stored.len()
    );
    let payload = serde_json::to_vec(&out).unwrap().len();
    assert!(payload < 1024, "stub payload {payload} bytes");

    // The transfer reads the stored manifest back; a short budget makes it take several calls.
    let transfer = handlers(Handler::TransferToS3, &base, staging.path(), &[]).await;
    let input = json!({ "result": result });
    let mut calls = 0;
    let parameters = loop {
        calls += 1;
        assert!(calls < 200, "the transfer does not finish");
        match transfer.invoke(input.clone(), budget(0)).await {
            Ok(out) => break out["parameters"].clone(),
            Err(e) => {
                assert_eq!(e.error_type, ErrorType::JobInProgress, "{e}");
                assert!(e.message.starts_with("Transfer in progress: "), "{e}");
            }
        }
    };
    assert!(
        calls > 1,
        "a 100 ms budget cannot stage {files} files at once"
    );
    let sources = parameters["parameter"].as_array().unwrap();
    assert_eq!(sources.len(), files as usize, "every staged file is listed");
    assert!(sources.iter().all(|p| p["name"] == "source"));
    let mut urls: Vec<&str> = sources
        .iter()
        .map(|p| {
            p["part"]
                .as_array()
                .unwrap()
                .iter()
                .find(|q| q["name"] == "url")
                .and_then(|q| q["valueUrl"].as_str())
                .unwrap()
        })
        .collect();
    urls.sort_unstable();
    urls.dedup();
    assert_eq!(urls.len(), files as usize, "distinct staged objects");
    for url in urls.iter().take(3) {
        let path = url.strip_prefix("file://").unwrap();
        assert!(std::path::Path::new(path).is_file(), "{path}");
    }
    println!(
        "compat transfer of {files} files from a {} KiB manifest: {calls} invocations",
        stored.len() / 1024
    );

    // A stub must name the key this manifest would be stored at.
    let mut forged = result.clone();
    forged[MANIFEST_REF] = Value::String("elsewhere/secret.json".into());
    let e = transfer
        .invoke(json!({ "result": forged }), budget(5))
        .await
        .unwrap_err();
    assert_eq!(e.error_type, ErrorType::State, "{e}");
}

#[tokio::test]
async fn bad_inputs_and_settings_have_stable_error_names() {
    let source = FakeSource::start(SourceConfig::default()).await.unwrap();
    let staging = temp_dir("sfn-compat-errors");
    let base = source.base_url();
    let check = handlers(Handler::CheckImportStatus, &base, staging.path(), &[]).await;
    let e = check.invoke(json!({}), budget(5)).await.unwrap_err();
    assert_eq!(e.error_type, ErrorType::State);
    assert!(e.message.contains("statusUrl"), "{e}");

    let import = handlers(Handler::PathlingImport, &base, staging.path(), &[]).await;
    let out = import
        .invoke(
            json!({"parameters": {"resourceType": "Parameters", "parameter": []}}),
            budget(5),
        )
        .await
        .unwrap();
    assert_eq!(out, json!({ "statusUrl": null }));

    // Pathling unreachable: a network failure is worth the definition's retry.
    let params = json!({"parameters": {"resourceType": "Parameters", "parameter": [
        {"name": "source", "part": [
            {"name": "resourceType", "valueCode": "Patient"},
            {"name": "url", "valueUrl": "s3://bucket/k.ndjson"},
            {"name": "mode", "valueCode": "merge"}]}]}});
    let import7 = handlers(
        Handler::PathlingImport,
        &base,
        staging.path(),
        &[("PATHLING_API", "7")],
    )
    .await;
    let e = import7.invoke(params, budget(5)).await.unwrap_err();
    assert_eq!(e.error_type, ErrorType::Transient, "{e}");

    let raw = RawConfig::from_env(
        vec![
            ("SOURCE_ENDPOINT".to_string(), base.clone()),
            (
                "TARGET_ENDPOINT".to_string(),
                "http://127.0.0.1:9/fhir".to_string(),
            ),
            (
                "STAGING_URL".to_string(),
                format!("file://{}/", staging.path().display()),
            ),
            ("SINCE".to_string(), "auto".to_string()),
            (
                "SOURCE_AUTHENTICATION_ENABLED".to_string(),
                "false".to_string(),
            ),
            (
                "TARGET_AUTHENTICATION_ENABLED".to_string(),
                "false".to_string(),
            ),
        ],
        EXTRA_KEYS,
    );
    let config = config::parse(&raw, EXTRA_KEYS).unwrap();
    let e = Handlers::new(Handler::FhirExport, config)
        .await
        .err()
        .unwrap();
    assert_eq!(e.error_type, ErrorType::Configuration);
    assert!(e.message.contains("SINCE"), "{e}");
}

#[tokio::test]
async fn a_transfer_state_rewritten_to_a_foreign_source_is_a_state_error_before_any_request() {
    let logs = common::leaks::LogCapture::start();
    let foreign = common::Recorder::start().await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let source_secret = format!("S3cr3t+compat-source:{tag}%x");
    let target_secret = format!("S3cr3t+compat-target:{tag}%x");
    let key = TestKey::generate_ec().unwrap();
    let mut secrets = vec![
        source_secret.clone(),
        target_secret.clone(),
        key.private_jwk["d"].as_str().unwrap().to_string(),
    ];
    secrets.extend(
        key.private_pem
            .lines()
            .filter(|l| l.len() >= 40)
            .map(str::to_string),
    );
    let source = FakeSource::start(SourceConfig {
        auth: Some(AuthConfig::client_secret_post(
            "compat-client",
            &source_secret,
        )),
        dataset: DatasetConfig::new(&[("Observation", 300, 30)]),
        in_progress_polls: 0,
        latency: std::time::Duration::from_millis(50),
        ..SourceConfig::default()
    })
    .await
    .unwrap();
    let staging = temp_dir("sfn-compat-foreign");
    let base = source.base_url();
    let jwk = key.private_jwk.to_string();
    let credentials = [
        ("SOURCE_AUTHENTICATION_ENABLED", "true"),
        ("SOURCE_CLIENT_ID", "compat-client"),
        ("SOURCE_CLIENT_SECRET", source_secret.as_str()),
        // The target is never contacted by these handlers; its credentials are configured
        // (and parsed) all the same.
        ("TARGET_AUTHENTICATION_ENABLED", "true"),
        ("TARGET_CLIENT_ID", "compat-importer"),
        ("TARGET_AUTH_METHOD", "private_key_jwt"),
        ("TARGET_PRIVATE_KEY", jwk.as_str()),
        ("TARGET_CLIENT_SECRET", target_secret.as_str()),
    ];
    let mut shown = Vec::new();

    let export = handlers(Handler::FhirExport, &base, staging.path(), &credentials).await;
    let out = export.invoke(json!({}), budget(30)).await.unwrap();
    let check = handlers(
        Handler::CheckExportStatus,
        &base,
        staging.path(),
        &credentials,
    )
    .await;
    let out = check.invoke(out, budget(30)).await.unwrap();
    shown.push(out.to_string());
    let input = json!({ "result": out["result"] });

    // The first transfer stages what its budget allows and saves its progress.
    let transfer = handlers(Handler::TransferToS3, &base, staging.path(), &credentials).await;
    let e = transfer.invoke(input.clone(), budget(0)).await.unwrap_err();
    assert_eq!(e.error_type, ErrorType::JobInProgress, "{e}");
    let state_path = staging
        .path()
        .join(transfer_run_id(&input["result"]))
        .join("transfer-state.json");
    let mut state: Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    assert_eq!(state["spec"]["source"]["endpoint"], json!(base));

    // Whoever can write the staging bucket points the transfer at another host.
    state["spec"]["source"]["endpoint"] = json!(format!("{}/fhir", foreign.url()));
    let forged = serde_json::to_vec(&state).unwrap();
    std::fs::write(&state_path, &forged).unwrap();
    let downloads: u32 = source.file_attempts().values().sum();
    let e = transfer.invoke(input.clone(), budget(5)).await.unwrap_err();
    assert_eq!(e.error_type, ErrorType::State, "{e}");
    assert!(
        e.message.contains("transfer-state.json")
            && e.message.contains("started with other settings")
            && e.message.contains("(SOURCE_ENDPOINT)"),
        "{e}"
    );
    shown.push(format!("{e} {e:?}"));
    assert!(foreign.requests().is_empty(), "{:?}", foreign.requests());
    assert_eq!(source.file_attempts().values().sum::<u32>(), downloads);
    assert_eq!(
        std::fs::read(&state_path).unwrap(),
        forged,
        "left as it was"
    );

    shown.push(logs.text());
    for (i, text) in shown.iter().enumerate() {
        common::leaks::assert_absent(&format!("output #{i}"), text, &secrets);
    }
    let files = common::leaks::scan_dir(staging.path(), &secrets, &[]);
    assert!(files > 2, "{files} files staged");
}
