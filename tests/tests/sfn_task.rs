//! The Step Functions task (`pathling_import_runners::sfn::Task`, the logic of the
//! `pathling-import-sfn` Lambda) driven the way `state-machine.json` drives it — output fed
//! back as the next input, `wait` honoured, `continue` at once — over a 10,000-file export:
//! every payload must stay far below Step Functions' 256 KiB. Sizes are printed
//! (`cargo test -p pathling-import-tests --test sfn_task -- --nocapture`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use pathling_import_core::config::{self, RawConfig};
use pathling_import_core::Timestamp;
use pathling_import_runners::aws::ErrorType;
use pathling_import_runners::emf::MetricsSink;
use pathling_import_runners::executor::now;
use pathling_import_runners::sfn::{Task, EXTRA_KEYS};
use pathling_import_tests::auth::AuthConfig;
use pathling_import_tests::data::DatasetConfig;
use pathling_import_tests::fake_pathling::{FakePathling, ImportFailure, PathlingConfig};
use pathling_import_tests::fake_source::{FakeSource, SourceConfig};
use pathling_import_tests::fhir::RetryAfter;
use pathling_import_tests::keys::TestKey;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Step Functions' payload limit.
const LIMIT: usize = 256 * 1024;

/// A directory removed on drop.
fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir()
        .unwrap()
}

async fn task(
    source: &str,
    target: &str,
    staging: &std::path::Path,
    extra: &[(&str, &str)],
) -> Task {
    let mut vars: Vec<(String, String)> = [
        ("SOURCE_ENDPOINT", source),
        ("SOURCE_AUTHENTICATION_ENABLED", "false"),
        ("TARGET_ENDPOINT", target),
        ("TARGET_AUTHENTICATION_ENABLED", "false"),
        ("EXPORT_RETRY_WAIT", "1"),
        ("IMPORT_RETRY_WAIT", "1"),
        ("TRANSFER_CONCURRENCY", "8"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    vars.push((
        "STAGING_URL".into(),
        format!("file://{}/", staging.display()),
    ));
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let raw = RawConfig::from_env(vars, EXTRA_KEYS);
    let config = config::parse(&raw, EXTRA_KEYS).unwrap();
    Task::new(config).await.unwrap()
}

/// What a state machine execution saw: every task output's size and action.
struct Execution {
    last: Value,
    sizes: Vec<(usize, String, String)>,
}

/// Loops like `state-machine.json`: `continue` at once, `wait` until `waitUntil`.
async fn execute(task: &Task, budget: Duration, max_steps: usize) -> Execution {
    let mut input = json!({});
    let mut sizes = Vec::new();
    for _ in 0..max_steps {
        let budget_until = Timestamp(now().0 + budget.as_millis() as u64);
        let out = task.invoke(input, budget_until).await.unwrap();
        let bytes = serde_json::to_vec(&out).unwrap().len();
        let action = out["action"].as_str().unwrap_or_default().to_string();
        sizes.push((
            bytes,
            action.clone(),
            out["phase"].as_str().unwrap_or_default().to_string(),
        ));
        match action.as_str() {
            "continue" => {}
            "wait" => {
                let secs = out["waitSeconds"].as_u64().unwrap();
                assert!(secs <= 5, "unexpectedly long wait {out}");
                assert!(out["waitUntil"].as_str().unwrap().ends_with('Z'));
                // The scenario's own wait: the Wait state, as Step Functions would.
                tokio::time::sleep(Duration::from_secs(secs)).await;
            }
            "succeed" | "fail" => return Execution { last: out, sizes },
            other => panic!("unknown action {other:?}"),
        }
        input = out;
    }
    panic!("no end after {max_steps} task invocations");
}

/// Scale: a 100,000-file export through the task. Each answer is a save of the run (the
/// payload is the store): every one stays within 16 KiB, their number is bounded by time (one
/// per invocation budget, plus waits and phase changes), and each file is staged and imported
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_100000_file_export_keeps_every_task_payload_within_16_kib() {
    const BUDGET: usize = 16 * 1024;
    let files = 100_000u32;
    let source = FakeSource::start(SourceConfig {
        dataset: DatasetConfig::new(&[("Observation", u64::from(files), files)]),
        in_progress_polls: 1,
        progress_retry_after: RetryAfter::Seconds(1),
        ..SourceConfig::default()
    })
    .await
    .unwrap();
    let target = FakePathling::start(PathlingConfig::v9(&["file:///"]))
        .await
        .unwrap();
    let staging = temp_dir("sfn-task-100k");
    let task = task(
        &source.base_url(),
        &target.base_url(),
        staging.path(),
        &[("LAMBDA_MAX_SLEEP", "0")],
    )
    .await;
    let metrics = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let task = task
        .with_metrics_sink(MetricsSink::Memory(metrics.clone()))
        .without_event_log_on_stdout();

    let invocation = Duration::from_secs(3);
    let started = Instant::now();
    let run = execute(&task, invocation, 5_000).await;
    let elapsed = started.elapsed();

    assert_eq!(run.last["action"], "succeed", "{}", run.last["status"]);
    assert_eq!(target.resource_count("Observation"), files as usize);
    assert_eq!(
        source.stats().files_completed,
        u64::from(files),
        "each file once"
    );
    let staging_sizes: Vec<usize> = run
        .sizes
        .iter()
        .filter(|(_, _, phase)| phase == "staging_files")
        .map(|(b, _, _)| *b)
        .collect();
    let max = run.sizes.iter().map(|(b, _, _)| *b).max().unwrap();
    let total: usize = run.sizes.iter().map(|(b, _, _)| *b).sum();
    println!(
        "{files}-file export through the Step Functions task: {} invocations ({} mid-transfer) \
         in {:.1} s; {total} payload bytes in all ({:.2} per file); largest payload {max} bytes \
         ({:.1}% of 256 KiB); final payload {} bytes",
        run.sizes.len(),
        staging_sizes.len(),
        elapsed.as_secs_f64(),
        total as f64 / f64::from(files),
        max as f64 * 100.0 / LIMIT as f64,
        run.sizes.last().map(|s| s.0).unwrap_or(0),
    );
    assert!(
        staging_sizes.len() > 2,
        "the budget should end several invocations mid-transfer"
    );
    assert!(max <= BUDGET, "largest payload {max} bytes");
    // One answer per invocation budget while files move, plus the waits and phase changes.
    let bound = (elapsed.as_secs_f64() / invocation.as_secs_f64()).ceil() as usize + 20;
    assert!(
        run.sizes.len() <= bound,
        "{} invocations in {:.0} s",
        run.sizes.len(),
        elapsed.as_secs_f64()
    );
    // The task's metrics: the files staged over every invocation, and the run's end.
    let lines: Vec<Value> = metrics
        .lock()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().all(|l| l["Runner"] == "step-functions"));
    assert!(lines
        .iter()
        .all(|l| l["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "PathlingImport"));
    let staged: u64 = lines.iter().filter_map(|l| l["FilesStaged"].as_u64()).sum();
    assert_eq!(staged, u64::from(files));
    let succeeded: u64 = lines
        .iter()
        .filter_map(|l| l["RunsSucceeded"].as_u64())
        .sum();
    assert_eq!(succeeded, 1);
}

#[tokio::test]
async fn a_cancel_in_the_input_ends_the_run_and_deletes_the_export_job() {
    let source = FakeSource::start(SourceConfig {
        in_progress_polls: 5,
        progress_retry_after: RetryAfter::Seconds(30),
        ..SourceConfig::default()
    })
    .await
    .unwrap();
    let target = FakePathling::start(PathlingConfig::v9(&["file:///"]))
        .await
        .unwrap();
    let staging = temp_dir("sfn-task-cancel");
    let task = task(
        &source.base_url(),
        &target.base_url(),
        staging.path(),
        &[("LAMBDA_MAX_SLEEP", "0")],
    )
    .await;
    let budget_until = || Timestamp(now().0 + 5_000);

    let out = task.invoke(json!({}), budget_until()).await.unwrap();
    assert_eq!(out["action"], "wait", "{out}");
    assert_eq!(out["phase"], "polling_export");
    // Retry-After: 30, clamped to the export's deadline (24 polls × 1 s of patience).
    let wait = out["waitSeconds"].as_u64().unwrap();
    assert!(
        (20..=30).contains(&wait),
        "the server's Retry-After is honoured: {out}"
    );

    let mut input = out.clone();
    input["cancel"] = json!("stopped by the operator");
    let out = task.invoke(input, budget_until()).await.unwrap();
    assert_eq!(out["action"], "fail", "{out}");
    assert_eq!(out["error"]["name"], "SyncCancelledError");
    assert!(out["error"]["cause"]
        .as_str()
        .unwrap()
        .contains("stopped by the operator"));
    assert_eq!(source.stats().job_deletes, 1, "the export job is deleted");

    // A corrupt envelope is a StateError, never a panic.
    let mut corrupt = out.clone();
    corrupt["envelope"]["state"] = json!({"phase": "no_such_phase"});
    let e = task.invoke(corrupt, budget_until()).await.unwrap_err();
    assert_eq!(e.error_type, pathling_import_runners::aws::ErrorType::State);
    let mut newer = out;
    newer["envelope"]["schema_version"] = json!(99);
    let e = task.invoke(newer, budget_until()).await.unwrap_err();
    assert_eq!(e.error_type, pathling_import_runners::aws::ErrorType::State);
    assert!(e.message.contains("newer"), "{e}");
}

/// A task whose configuration holds distinctive credentials for both sides (the source's
/// `client_secret_post` secret, the target's private key and an unused target secret), the
/// fakes asking for them, and the first invocation's output: a run waiting for its export.
struct Guarded {
    task: Task,
    source: pathling_import_tests::fake_source::FakeSourceHandle,
    _target: pathling_import_tests::fake_pathling::FakePathlingHandle,
    staging: tempfile::TempDir,
    secrets: Vec<String>,
    waiting: Value,
}

async fn guarded(name: &str) -> Guarded {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let source_secret = format!("S3cr3t+sfn-source:{tag}%x");
    let target_secret = format!("S3cr3t+sfn-target:{tag}%x");
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
        auth: Some(AuthConfig::client_secret_post("sfn-client", &source_secret)),
        in_progress_polls: 5,
        progress_retry_after: RetryAfter::Seconds(30),
        ..SourceConfig::default()
    })
    .await
    .unwrap();
    let target = FakePathling::start(PathlingConfig {
        auth: Some(AuthConfig::private_key_jwt("sfn-importer", &[&key])),
        ..PathlingConfig::v9(&["file:///"])
    })
    .await
    .unwrap();
    let staging = temp_dir(name);
    let jwk = key.private_jwk.to_string();
    let task = task(
        &source.base_url(),
        &target.base_url(),
        staging.path(),
        &[
            ("LAMBDA_MAX_SLEEP", "0"),
            ("SOURCE_AUTHENTICATION_ENABLED", "true"),
            ("SOURCE_CLIENT_ID", "sfn-client"),
            ("SOURCE_CLIENT_SECRET", &source_secret),
            ("TARGET_AUTHENTICATION_ENABLED", "true"),
            ("TARGET_CLIENT_ID", "sfn-importer"),
            ("TARGET_AUTH_METHOD", "private_key_jwt"),
            ("TARGET_PRIVATE_KEY", &jwk),
            ("TARGET_CLIENT_SECRET", &target_secret),
        ],
    )
    .await;
    let waiting = task
        .invoke(json!({}), Timestamp(now().0 + 5_000))
        .await
        .unwrap();
    assert_eq!(waiting["action"], "wait", "{waiting}");
    assert_eq!(waiting["phase"], "polling_export");
    Guarded {
        task,
        source,
        _target: target,
        staging,
        secrets,
        waiting,
    }
}

#[tokio::test]
async fn an_envelope_pointing_at_a_foreign_source_is_a_state_error_before_any_request() {
    let logs = common::leaks::LogCapture::start();
    let foreign = common::Recorder::start().await;
    let g = guarded("sfn-task-foreign").await;
    let budget_until = || Timestamp(now().0 + 5_000);
    let mut shown = vec![g.waiting.to_string()];

    let mut forged = g.waiting.clone();
    assert_eq!(
        forged["envelope"]["spec"]["source"]["endpoint"],
        json!(g.source.base_url())
    );
    forged["envelope"]["spec"]["source"]["endpoint"] = json!(format!("{}/fhir", foreign.url()));
    // Also with a cancel, which would DELETE the export job at the run's source.
    let mut cancelling = forged.clone();
    cancelling["cancel"] = json!("stop");
    for input in [forged, cancelling] {
        let e = g.task.invoke(input, budget_until()).await.unwrap_err();
        assert_eq!(e.error_type, ErrorType::State, "{e}");
        assert!(
            e.message.contains("started with other settings")
                && e.message.contains("(SOURCE_ENDPOINT)"),
            "{e}"
        );
        shown.push(format!("{e} {e:?}"));
    }
    assert!(foreign.requests().is_empty(), "{:?}", foreign.requests());

    // The envelope as the task returned it is still taken (it waits for the export).
    let out = g
        .task
        .invoke(g.waiting.clone(), budget_until())
        .await
        .unwrap();
    assert_eq!(out["action"], "wait", "{out}");
    assert_eq!(out["runId"], g.waiting["runId"]);
    shown.push(out.to_string());
    shown.push(logs.text());
    for (i, text) in shown.iter().enumerate() {
        common::leaks::assert_absent(&format!("output #{i}"), text, &g.secrets);
    }
    common::leaks::scan_dir(g.staging.path(), &g.secrets, &[]);
}

#[tokio::test]
async fn a_1_mib_cancel_reason_is_cut_to_1_kib_and_a_cancel_must_be_a_string() {
    let g = guarded("sfn-task-cancel-reason").await;
    let budget_until = || Timestamp(now().0 + 5_000);

    for bad in [json!(true), json!(42), json!({"reason": "x"}), json!(["x"])] {
        let mut input = g.waiting.clone();
        input["cancel"] = bad.clone();
        let e = g.task.invoke(input, budget_until()).await.unwrap_err();
        assert_eq!(e.error_type, ErrorType::State, "{bad}: {e}");
        assert!(e.message.contains("cancel must be a string"), "{e}");
    }
    assert_eq!(g.source.stats().job_deletes, 0, "nothing was cancelled");

    // 1 MiB of multi-byte characters and control characters.
    let reason: String = "Ünïcödé\u{7}\n".repeat(1024 * 1024 / 13 + 1);
    assert!(reason.len() >= 1024 * 1024);
    let mut input = g.waiting.clone();
    input["cancel"] = json!(reason);
    let out = g.task.invoke(input, budget_until()).await.unwrap();
    assert_eq!(out["action"], "fail", "{}", out["status"]);
    assert_eq!(out["error"]["name"], "SyncCancelledError");
    let kept = out["envelope"]["state"]["reason"].as_str().unwrap();
    assert!(kept.len() <= 1024, "{} bytes kept", kept.len());
    assert!(kept.starts_with("ÜnïcödéÜnïcödé"), "{kept}");
    assert!(!kept.chars().any(char::is_control), "{kept:?}");
    let envelope = serde_json::to_vec(&out["envelope"]).unwrap().len();
    let whole = serde_json::to_vec(&out).unwrap().len();
    println!(
        "envelope {envelope} bytes, output {whole} bytes, reason {} bytes",
        kept.len()
    );
    assert!(envelope < 16 * 1024, "envelope of {envelope} bytes");
    assert!(whole < 16 * 1024, "output of {whole} bytes");
    assert_eq!(g.source.stats().job_deletes, 1, "the export job is deleted");
}

#[tokio::test]
async fn a_resume_point_rewritten_to_a_foreign_source_is_a_state_error_before_any_request() {
    let foreign = common::Recorder::start().await;
    let source = FakeSource::start(SourceConfig {
        in_progress_polls: 0,
        ..SourceConfig::default()
    })
    .await
    .unwrap();
    let target = FakePathling::start(PathlingConfig {
        import_duration_polls: 0,
        fail_imports: Some(ImportFailure::new(
            400,
            "invalid",
            "the import cannot be done",
        )),
        ..PathlingConfig::v9(&["file:///"])
    })
    .await
    .unwrap();
    let staging = temp_dir("sfn-task-resume-foreign");
    let task = task(
        &source.base_url(),
        &target.base_url(),
        staging.path(),
        &[("LAMBDA_MAX_SLEEP", "5")],
    )
    .await;

    // A run that fails after its export was known waits at sfn-resume.json for the next
    // execution.
    let run = execute(&task, Duration::from_secs(20), 50).await;
    assert_eq!(run.last["action"], "fail", "{}", run.last["status"]);
    let resume_path = staging.path().join("sfn-resume.json");
    let mut resume: Value = serde_json::from_slice(&std::fs::read(&resume_path).unwrap()).unwrap();
    assert_eq!(resume["state"]["phase"], "failed");

    // Whoever can write the staging prefix points it at another host.
    resume["spec"]["source"]["endpoint"] = json!(format!("{}/fhir", foreign.url()));
    std::fs::write(&resume_path, serde_json::to_vec(&resume).unwrap()).unwrap();
    let (kickoffs, imports) = (source.stats().kickoffs, target.stats().import_kickoffs);
    for input in [json!({}), json!({"cancel": "stop"})] {
        let e = task
            .invoke(input, Timestamp(now().0 + 5_000))
            .await
            .unwrap_err();
        assert_eq!(e.error_type, ErrorType::State, "{e}");
        assert!(e.message.contains("(SOURCE_ENDPOINT)"), "{e}");
    }
    assert!(foreign.requests().is_empty(), "{:?}", foreign.requests());
    assert_eq!(source.stats().kickoffs, kickoffs);
    assert_eq!(target.stats().import_kickoffs, imports);
}
