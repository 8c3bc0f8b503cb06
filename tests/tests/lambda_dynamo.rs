//! The single Lambda (`pathling_import_runners::single_lambda`) against moto's DynamoDB, with
//! the fake Bulk Data source, the fake Pathling 9 and directory staging. The handler is called
//! in-process with a constructed Lambda `Context` (deadline 0, as cargo-lambda's emulator
//! effectively sends, so `LAMBDA_TIME_BUDGET` rules).
//!
//! Needs `MOTO_ENDPOINT` (started by `scripts/test.sh`) and fails without it:
//!
//! ```sh
//! "$(bash .ci/moto.sh)" -H 127.0.0.1 -p 5055 &
//! MOTO_ENDPOINT=http://127.0.0.1:5055 cargo test -p pathling-import-tests --test lambda_dynamo
//! ```
//!
//! Every test uses its own table, so they run in parallel against one server.
//!
//! Lease expiries are not waited out: a [`DynamoTable`] on a [`ManualClock`] is moved past
//! them. Orderings between concurrent invocations are awaited as observable conditions (the
//! item, the fake servers' counters), polled with a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::config::Credentials;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use lambda_runtime::Context;
use pathling_import_core::config::{self, Config, RawConfig};
use pathling_import_core::persist;
use pathling_import_core::state::{FileStatus, SyncState};
use pathling_import_core::{SyncRun, Timestamp};
use pathling_import_runners::aws::{self as aws_plumbing, AwsSecrets, ErrorType};
use pathling_import_runners::driver::{Clock, RunStore, StoreError};
use pathling_import_runners::dynamo_store::{
    self, Acquired, DynamoTable, DEFAULT_LEASE, DEFAULT_RETENTION,
};
use pathling_import_runners::emf::MetricsSink;
use pathling_import_runners::executor::now;
use pathling_import_runners::single_lambda::{self, SingleLambda, StopReason, Summary};
use pathling_import_tests::auth::AuthConfig;
use pathling_import_tests::data::DatasetConfig;
use pathling_import_tests::fake_pathling::{
    FakePathling, FakePathlingHandle, FinishedAnswer, PathlingConfig,
};
use pathling_import_tests::fake_source::{
    FakeSource, FakeSourceHandle, HttpFailure, PollFailure, SourceConfig,
};
use pathling_import_tests::fhir::RetryAfter;
use pathling_import_tests::keys::TestKey;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

fn moto_endpoint() -> String {
    match std::env::var("MOTO_ENDPOINT") {
        Ok(v) if !v.trim().is_empty() => v.trim().trim_end_matches('/').to_owned(),
        _ => panic!(
            "MOTO_ENDPOINT is not set: the single-Lambda tests need moto's DynamoDB. Run \
             scripts/test.sh, or `\"$(bash .ci/moto.sh)\" -H 127.0.0.1 -p 5055 &` and then \
             `MOTO_ENDPOINT=http://127.0.0.1:5055 cargo test -p pathling-import-tests --test lambda_dynamo`"
        ),
    }
}

async fn sdk() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(moto_endpoint())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
        .load()
        .await
}

fn unique(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{test}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A clock the test moves by hand, for lease expiries (a sleep moves it on at once).
struct ManualClock(AtomicU64);

impl ManualClock {
    fn at(t: Timestamp) -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicU64::new(t.0)))
    }

    fn set(&self, t: Timestamp) {
        self.0.store(t.0, Ordering::SeqCst);
    }

    fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }

    // The Clock trait's sleep, not a wait: it moves the manual time on and returns at once.
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        self.advance(duration);
        Box::pin(std::future::ready(()))
    }
}

/// Polls `condition` (every 10 ms) until it holds; fails after `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, condition: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        // Polling interval: the condition is another task's progress, which sends no signal.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A directory removed on drop.
fn temp_dir(test: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("pathling-import-{}", unique(test)))
        .tempdir()
        .unwrap()
}

struct World {
    source: FakeSourceHandle,
    pathling: FakePathlingHandle,
    staging: tempfile::TempDir,
    client: Client,
    table: String,
}

const SYNC: &str = "test-sync";

async fn world(test: &str, source: SourceConfig) -> World {
    world_with(test, source, None).await
}

/// With `target_auth`, the fake Pathling asks for it.
async fn world_with(test: &str, source: SourceConfig, target_auth: Option<AuthConfig>) -> World {
    let staging = temp_dir(test);
    let staging_url = format!("file://{}/", staging.path().display());
    let source = FakeSource::start(source).await.unwrap();
    let pathling = FakePathling::start(PathlingConfig {
        auth: target_auth,
        ..PathlingConfig::v9(&[&staging_url])
    })
    .await
    .unwrap();
    let client = Client::new(&sdk().await);
    let table = unique(test);
    dynamo_store::create_table(&client, &table)
        .await
        .unwrap_or_else(|e| panic!("creating table {table} on moto at {}: {e}", moto_endpoint()));
    World {
        source,
        pathling,
        staging,
        client,
        table,
    }
}

impl World {
    fn config(&self, extra: &[(&str, &str)]) -> Config {
        let staging_url = format!("file://{}/", self.staging.path().display());
        let mut pairs: Vec<(String, String)> = [
            ("SOURCE_ENDPOINT", self.source.base_url().as_str()),
            ("SOURCE_AUTHENTICATION_ENABLED", "false"),
            ("TARGET_ENDPOINT", self.pathling.base_url().as_str()),
            ("TARGET_AUTHENTICATION_ENABLED", "false"),
            ("STAGING_URL", staging_url.as_str()),
            ("PATHLING_API", "9"),
            ("SINCE", "auto"),
            ("EXPORT_RETRY_WAIT", "1"),
            ("IMPORT_RETRY_WAIT", "1"),
            ("TRANSFER_RETRY_WAIT", "1"),
            ("TRANSFER_CONCURRENCY", "1"),
            ("SYNC_TABLE", self.table.as_str()),
            ("SYNC_ID", SYNC),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        pairs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let raw = RawConfig::from_env(pairs, single_lambda::EXTRA_KEYS);
        config::parse(&raw, single_lambda::EXTRA_KEYS).unwrap()
    }

    async fn lambda(&self, extra: &[(&str, &str)]) -> SingleLambda {
        SingleLambda::new(self.config(extra), self.client.clone())
            .await
            .unwrap()
    }

    async fn item(&self) -> Option<HashMap<String, AttributeValue>> {
        self.client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(format!("sync#{SYNC}")))
            .key("sk", AttributeValue::S("current".into()))
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .item
    }

    async fn stored_run(&self) -> Option<SyncRun> {
        let item = self.item().await?;
        let text = item.get("envelope")?.as_s().ok()?.clone();
        Some(persist::decode(text.as_bytes()).unwrap())
    }

    fn files(&self) -> usize {
        self.source.file_attempts().len()
    }

    fn downloads(&self) -> u32 {
        self.source.file_attempts().values().sum()
    }
}

/// A Lambda context without a usable deadline (as under the emulator).
fn ctx() -> Context {
    let mut c = Context::default();
    c.request_id = unique("req");
    c
}

fn scheduled() -> Value {
    json!({"version": "0", "source": "aws.events", "detail-type": "Scheduled Event", "detail": {}})
}

/// Invokes until the run ends, sleeping until each wake-up; returns every summary.
async fn invoke_until_done(lambda: &SingleLambda, event: &Value) -> Vec<Summary> {
    let mut out = Vec::new();
    let started = Instant::now();
    loop {
        let s = lambda.handle(event, &ctx()).await.unwrap();
        let done = s.stopped == StopReason::Done;
        out.push(s);
        if done {
            return out;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the run did not end: {out:#?}"
        );
        // The scenario's own wait: the fake servers' jobs progress on the wall clock, and the
        // run's wake-ups (their Retry-After) are real; the next invocation comes a little later.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn slow_source(files_per_type: u32, latency_ms: u64) -> SourceConfig {
    SourceConfig {
        dataset: DatasetConfig::new(&[
            ("Patient", 40, files_per_type),
            ("Observation", 60, files_per_type),
        ]),
        latency: Duration::from_millis(latency_ms),
        ..SourceConfig::default()
    }
}

fn staged_files(run: &SyncRun) -> usize {
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

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_schedule_creates_runs_and_the_next_run_is_incremental() {
    let w = world("create", SourceConfig::default()).await;
    let lambda = w.lambda(&[]).await;

    // A direct invocation without `start` on an empty table does nothing.
    let idle = lambda.handle(&json!({}), &ctx()).await.unwrap();
    assert_eq!(idle.stopped, StopReason::Idle);
    assert_eq!(idle.run_id, None);
    assert_eq!(w.source.stats().kickoffs, 0);

    let first = invoke_until_done(&lambda, &scheduled()).await;
    let last = first.last().unwrap();
    assert_eq!(last.phase.as_deref(), Some("succeeded"), "{first:#?}");
    assert_eq!(last.outcome.as_ref().unwrap()["status"], "succeeded");
    let run_id = last.run_id.clone().unwrap();
    assert!(
        first.iter().all(|s| s.run_id.as_deref() == Some(&run_id)),
        "later invocations resume the same run: {first:#?}"
    );
    assert_eq!(w.pathling.total_resources(), 50 + 120 + 60);

    // The item: the finished run, no lease left, and a history copy with a TTL.
    let item = w.item().await.unwrap();
    assert_eq!(item["run_id"].as_s().unwrap(), &run_id);
    assert_eq!(item["phase"].as_s().unwrap(), "succeeded");
    assert!(
        !item.contains_key("lease_owner"),
        "lease released: {item:?}"
    );
    let history = w
        .client
        .get_item()
        .table_name(&w.table)
        .key("pk", AttributeValue::S(format!("sync#{SYNC}")))
        .key("sk", AttributeValue::S(format!("run#{run_id}")))
        .send()
        .await
        .unwrap()
        .item
        .expect("history item");
    let expires: u64 = history["expires_at"].as_n().unwrap().parse().unwrap();
    let in_days = (expires.saturating_sub(now().0 / 1000)) / 86_400;
    assert!((29..=30).contains(&in_days), "TTL in {in_days} days");

    // A direct invocation without `start` reports the finished run and starts nothing.
    let report = lambda
        .handle(&json!({"syncId": SYNC}), &ctx())
        .await
        .unwrap();
    assert_eq!(report.stopped, StopReason::Done);
    assert_eq!(report.run_id.as_deref(), Some(run_id.as_str()));
    assert_eq!(w.source.stats().kickoffs, 1);

    // The next scheduled invocation starts a new run from the watermark (SINCE=auto).
    let second = invoke_until_done(&lambda, &json!({"scheduled": true})).await;
    let second_id = second.last().unwrap().run_id.clone().unwrap();
    assert_ne!(second_id, run_id);
    let kickoff = w.source.last_kickoff().unwrap();
    let since = kickoff.param_values("_since");
    assert_eq!(since.len(), 1, "incremental export: {kickoff:?}");
    assert_eq!(
        Some(since[0].as_str()),
        w.source.jobs()[0].transaction_time.as_str().into()
    );
}

#[tokio::test]
async fn a_concurrent_invocation_returns_busy_promptly_and_only_one_works() {
    let w = world("busy", slow_source(3, 150)).await;
    let lambda = w.lambda(&[]).await;

    let (event, first_ctx) = (scheduled(), ctx());
    let first = lambda.handle(&event, &first_ctx);
    let second = async {
        // Once the first holds the lease and has stored its run.
        eventually(
            "the first invocation's lease",
            Duration::from_secs(10),
            || async {
                w.item()
                    .await
                    .is_some_and(|i| i.contains_key("lease_owner") && i.contains_key("envelope"))
            },
        )
        .await;
        let t = Instant::now();
        let s = lambda.handle(&scheduled(), &ctx()).await.unwrap();
        (s, t.elapsed())
    };
    let (first, (second, second_took)) = tokio::join!(first, second);
    let first = first.unwrap();
    assert_eq!(second.stopped, StopReason::Busy, "{second:#?}");
    assert!(
        second_took < Duration::from_secs(2),
        "busy answer took {second_took:?}"
    );
    assert_eq!(
        second.run_id, first.run_id,
        "it reports the run being worked on"
    );
    assert_eq!(
        w.source.stats().kickoffs,
        1,
        "only one invocation kicked off"
    );

    // The first invocation had the time to finish the whole run.
    assert_eq!(first.stopped, StopReason::Done, "{first:#?}");
    assert_eq!(first.phase.as_deref(), Some("succeeded"));
    assert_eq!(
        w.downloads() as usize,
        w.files(),
        "no file downloaded twice"
    );
    assert_eq!(w.pathling.total_resources(), 100);
}

#[tokio::test]
async fn a_killed_invocation_is_resumed_after_its_lease_expires_without_restaging() {
    let w = world("kill", slow_source(4, 150)).await;
    let lambda = w.lambda(&[]).await;

    // Kill the invocation (drop its future) once the item records a staged file (per-file
    // steps are saved at most once a second).
    let (event, kill_ctx) = (scheduled(), ctx());
    let killed = tokio::select! {
        r = lambda.handle(&event, &kill_ctx) => panic!("finished before the kill: {r:?}"),
        _ = eventually("a staged file saved", Duration::from_secs(30), || async {
            w.stored_run().await.is_some_and(|run| staged_files(&run) >= 1)
        }) => true,
    };
    assert!(killed);
    let completed_at_kill = w.source.stats().files_completed as usize;
    let at_kill = w.stored_run().await.unwrap();
    let staged_at_kill = staged_files(&at_kill);
    assert!(staged_at_kill >= 1, "{:?}", at_kill.state.name());
    let item = w.item().await.unwrap();
    assert!(
        item.contains_key("lease_owner"),
        "a killed invocation cannot release its lease"
    );

    // While the dead invocation's lease lasts, nobody takes over.
    let busy = lambda.handle(&scheduled(), &ctx()).await.unwrap();
    assert_eq!(busy.stopped, StopReason::Busy);

    // The lease expires (16 minutes on, not waited out): on a clock just before its expiry
    // the table still refuses it; past it, it is taken over — as the next invocation then
    // does — with the run the dead invocation last saved. (A minute past: a save the killed
    // invocation had in flight may still land and renew the lease by a few milliseconds.)
    // The successor hands it on to the Lambda.
    let expires: u64 = item["lease_expires"].as_n().unwrap().parse().unwrap();
    let clock = ManualClock::at(Timestamp(expires - 1));
    let successor = DynamoTable::new(
        w.client.clone(),
        w.table.clone(),
        DEFAULT_LEASE,
        DEFAULT_RETENTION,
    )
    .with_clock(clock.clone());
    assert!(matches!(
        successor.acquire(SYNC, "successor").await.unwrap(),
        Acquired::Busy { .. }
    ));
    clock.set(Timestamp(expires + 60_000));
    let Acquired::Leased { store, run } = successor.acquire(SYNC, "successor").await.unwrap()
    else {
        panic!("an expired lease must be taken over")
    };
    let run = run.expect("the dead invocation's run");
    assert_eq!(run.run_id, at_kill.run_id);
    assert!(run.seq >= at_kill.seq);
    store.release().await;

    let rest = invoke_until_done(&lambda, &scheduled()).await;
    let last = rest.last().unwrap();
    assert_eq!(last.phase.as_deref(), Some("succeeded"), "{rest:#?}");
    assert_eq!(last.run_id.as_deref(), Some(at_kill.run_id.as_str()));
    assert_eq!(w.source.stats().kickoffs, 1);
    eprintln!(
        "staged at the kill: {staged_at_kill}; downloads: {:?}",
        w.source.file_attempts()
    );
    // Downloaded again: at most the files downloaded since the last save before the kill,
    // and the one in flight (concurrency 1). None the item recorded as staged.
    let files = w.files();
    assert_eq!(files, 8);
    assert!(
        staged_at_kill < files,
        "the kill came too late to test anything"
    );
    let unsaved = completed_at_kill.saturating_sub(staged_at_kill);
    assert!(
        (w.downloads() as usize) <= files + unsaved + 1,
        "re-downloaded staged files ({staged_at_kill} recorded, {completed_at_kill} downloaded at the kill): {:?}",
        w.source.file_attempts()
    );
    assert_eq!(w.pathling.total_resources(), 100);
}

#[tokio::test]
async fn a_budget_that_runs_out_mid_transfer_stops_cleanly_and_continues() {
    let w = world("budget", slow_source(4, 200)).await;
    let lambda = w.lambda(&[("LAMBDA_TIME_BUDGET", "1.5")]).await;

    let all = invoke_until_done(&lambda, &scheduled()).await;
    let mid_transfer: Vec<&Summary> = all
        .iter()
        .filter(|s| {
            s.stopped == StopReason::OutOfBudget && s.phase.as_deref() == Some("staging_files")
        })
        .collect();
    assert!(
        !mid_transfer.is_empty(),
        "the budget never ran out mid-transfer: {all:#?}"
    );
    let trace: Vec<String> = all
        .iter()
        .map(|s| format!("{:?}@{}", s.stopped, s.phase.as_deref().unwrap_or("-")))
        .collect();
    eprintln!("invocations: {trace:?}");
    let last = all.last().unwrap();
    assert_eq!(last.phase.as_deref(), Some("succeeded"));
    assert!(all.iter().all(|s| s.run_id == last.run_id));
    // Budget stops let the file in flight finish: nothing is downloaded twice.
    assert_eq!(
        w.downloads() as usize,
        w.files(),
        "{:?}",
        w.source.file_attempts()
    );
    assert_eq!(w.pathling.total_resources(), 100);
}

#[tokio::test]
async fn a_failed_run_is_a_normal_return_not_a_lambda_error() {
    let source = SourceConfig {
        permanent_error: Some(PollFailure {
            from_poll: 1,
            failure: HttpFailure::new(400, "invalid", "the export cannot be done"),
        }),
        ..SourceConfig::default()
    };
    let w = world("failed", source).await;
    let lambda = w.lambda(&[]).await;
    let all = invoke_until_done(&lambda, &json!({"start": true})).await;
    let last = all.last().unwrap();
    assert_eq!(last.phase.as_deref(), Some("failed"));
    let outcome = last.outcome.as_ref().unwrap();
    assert_eq!(outcome["status"], "failed");
    assert!(last.message.as_ref().unwrap().contains("400"), "{last:#?}");
}

#[tokio::test]
async fn a_direct_cancel_ends_the_unfinished_run_and_deletes_the_export_job() {
    let w = world("cancel", slow_source(4, 200)).await;
    let lambda = w.lambda(&[("LAMBDA_TIME_BUDGET", "1")]).await;
    let first = lambda.handle(&scheduled(), &ctx()).await.unwrap();
    assert_ne!(first.stopped, StopReason::Done, "{first:#?}");

    let cancelled = invoke_until_done(&lambda, &json!({"cancel": true})).await;
    let last = cancelled.last().unwrap();
    assert_eq!(last.phase.as_deref(), Some("cancelled"), "{cancelled:#?}");
    assert_eq!(last.run_id, first.run_id);
    assert_eq!(last.outcome.as_ref().unwrap()["status"], "cancelled");
    assert_eq!(w.source.stats().job_deletes, 1, "the export job is deleted");
    assert_eq!(w.pathling.stats().import_kickoffs, 0);
}

/// An append import whose outcome is unknown (Pathling's answer was a login page, not a
/// result) may have imported the data: schedules and plain starts leave the failed run alone,
/// `{"retry": true}` cancels the old job and kicks off again.
#[tokio::test]
async fn a_run_that_asks_for_a_check_waits_for_an_explicit_retry() {
    let w = world("held", SourceConfig::default()).await;
    w.pathling
        .update(|c| c.finished_answer = Some(FinishedAnswer::LoginRedirect));
    let lambda = w.lambda(&[("IMPORT_MODE", "append")]).await;
    let failed = invoke_until_done(&lambda, &scheduled()).await;
    let last = failed.last().unwrap();
    assert_eq!(last.phase.as_deref(), Some("failed"), "{failed:#?}");
    let run = w.stored_run().await.unwrap();
    let point = run.resumable().unwrap();
    assert!(point.check_first, "{point:?}");
    let seq: u64 = w.item().await.unwrap()["seq"]
        .as_n()
        .unwrap()
        .parse()
        .unwrap();
    let before = w.item().await.unwrap();
    w.pathling.update(|c| c.finished_answer = None);

    for event in [scheduled(), json!({"start": true})] {
        let e = lambda.handle(&event, &ctx()).await.unwrap_err();
        assert_eq!(e.error_type, ErrorType::State, "{e}");
        assert!(e.message.contains("not retried without a check"), "{e}");
        assert!(e.message.contains("\"retry\": true"), "{e}");
    }
    assert_eq!(w.item().await.unwrap(), before, "the held run is untouched");
    assert_eq!(w.pathling.stats().import_kickoffs, 1);
    assert_eq!(w.source.stats().kickoffs, 1, "no new export was started");

    let retried = invoke_until_done(&lambda, &json!({"retry": true})).await;
    let done = retried.last().unwrap();
    assert_eq!(done.phase.as_deref(), Some("succeeded"), "{retried:#?}");
    assert_eq!(done.run_id, last.run_id);
    assert_eq!(
        w.pathling.stats().job_deletes,
        1,
        "the old job was cancelled first"
    );
    assert_eq!(w.pathling.stats().import_kickoffs, 2);
    assert_eq!(w.source.stats().kickoffs, 1, "the staged export was reused");
    let after: u64 = w.item().await.unwrap()["seq"]
        .as_n()
        .unwrap()
        .parse()
        .unwrap();
    assert!(after > seq, "the retry was saved");
}

/// The EMF specification's required structure, checked field by field: a root `_aws` with an
/// integer `Timestamp` and a non-empty `CloudWatchMetrics`; each directive's `Namespace` (1 to
/// 255 characters), `Dimensions` (sets of at most 30 names, each a string member of the root)
/// and `Metrics` (1 to 100 definitions, each `Name` 1 to 255 characters and unique, `Unit` a
/// CloudWatch unit, each name a numeric member of the root, or an array of at most 100 numbers).
fn assert_emf(line: &str) -> Value {
    const UNITS: &[&str] = &[
        "Seconds",
        "Microseconds",
        "Milliseconds",
        "Bytes",
        "Kilobytes",
        "Megabytes",
        "Gigabytes",
        "Terabytes",
        "Bits",
        "Kilobits",
        "Megabits",
        "Gigabits",
        "Terabits",
        "Percent",
        "Count",
        "Bytes/Second",
        "Kilobytes/Second",
        "Megabytes/Second",
        "Gigabytes/Second",
        "Terabytes/Second",
        "Bits/Second",
        "Kilobits/Second",
        "Megabits/Second",
        "Gigabits/Second",
        "Terabits/Second",
        "Count/Second",
        "None",
    ];
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let root = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {line}"));
    let aws = root["_aws"]
        .as_object()
        .unwrap_or_else(|| panic!("no _aws: {line}"));
    assert!(aws["Timestamp"].is_u64(), "{line}");
    let directives = aws["CloudWatchMetrics"].as_array().unwrap();
    assert!(!directives.is_empty(), "{line}");
    for d in directives {
        let ns = d["Namespace"].as_str().unwrap();
        assert!((1..=255).contains(&ns.len()), "{line}");
        for set in d["Dimensions"].as_array().unwrap() {
            let set = set.as_array().unwrap();
            assert!(set.len() <= 30, "{line}");
            for name in set {
                let name = name.as_str().unwrap();
                assert!(root[name].is_string(), "dimension {name} missing: {line}");
            }
        }
        let metrics = d["Metrics"].as_array().unwrap();
        assert!((1..=100).contains(&metrics.len()), "{line}");
        let mut names = std::collections::BTreeSet::new();
        for m in metrics {
            let name = m["Name"].as_str().unwrap();
            assert!((1..=255).contains(&name.len()), "{line}");
            assert!(names.insert(name), "{name} twice: {line}");
            if let Some(unit) = m.get("Unit") {
                assert!(UNITS.contains(&unit.as_str().unwrap()), "{line}");
            }
            let value = &root[name];
            let numeric = value.is_number()
                || value
                    .as_array()
                    .is_some_and(|a| a.len() <= 100 && a.iter().all(Value::is_number));
            assert!(numeric, "metric {name} has no numeric value: {line}");
        }
    }
    v
}

/// The metrics of a whole run, over several invocations: every line is valid EMF, the totals
/// equal what the fakes saw, each phase reports its duration once, and the run's end is
/// counted with the run id attached.
#[tokio::test]
async fn a_run_publishes_valid_emf_metrics_that_add_up() {
    let source = SourceConfig {
        throttle_polls: std::collections::BTreeSet::from([1]),
        ..slow_source(2, 50)
    };
    let w = world("emf", source).await;
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let lambda = w
        .lambda(&[
            ("LAMBDA_TIME_BUDGET", "1"),
            ("METRICS_NAMESPACE", "Test/Sync"),
        ])
        .await
        .with_metrics_sink(MetricsSink::Memory(lines.clone()));
    let all = invoke_until_done(&lambda, &scheduled()).await;
    assert!(all.len() > 1, "the run spans invocations: {all:#?}");
    let run_id = all.last().unwrap().run_id.clone().unwrap();

    let lines = lines.lock().unwrap().clone();
    let mut totals: HashMap<String, u64> = HashMap::new();
    let mut durations: Vec<String> = Vec::new();
    let mut ends = Vec::new();
    for line in &lines {
        let v = assert_emf(line);
        let directive = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "Test/Sync");
        assert_eq!(v["Runner"], "single-lambda");
        assert_eq!(v["RunId"], run_id.as_str());
        for m in directive["Metrics"].as_array().unwrap() {
            let name = m["Name"].as_str().unwrap();
            let value = v[name].as_u64().unwrap();
            match v.get("Phase").and_then(Value::as_str) {
                None => *totals.entry(name.to_string()).or_default() += value,
                Some(phase) if name == "PhaseDuration" => durations.push(phase.to_string()),
                Some(phase) => ends.push((name.to_string(), phase.to_string(), value)),
            }
        }
    }
    let staged_bytes: u64 = walk(w.staging.path())
        .iter()
        .filter(|p| {
            p.extension().is_some_and(|e| e == "ndjson") && p.to_string_lossy().contains("/output/")
        })
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(totals["FilesStaged"], w.files() as u64, "{lines:#?}");
    assert_eq!(totals["BytesStaged"], staged_bytes);
    assert_eq!(
        totals["ResourcesStaged"],
        w.pathling.total_resources() as u64
    );
    assert_eq!(totals["Retries"], 1, "the one 429");
    // The saves of the run wrote the DynamoDB item, each a small envelope: the kick-off,
    // every phase change and at least one staged file at a time.
    assert!(totals["StateWrites"] >= 7, "{totals:?}");
    assert!(
        totals["StateBytes"] <= totals["StateWrites"] * 16 * 1024,
        "{totals:?}"
    );
    assert!(
        totals["StateBytes"] >= totals["StateWrites"] * 500,
        "{totals:?}"
    );
    assert_eq!(
        durations,
        [
            "kicking_off_export",
            "polling_export",
            "staging_files",
            "kicking_off_import",
            "polling_import",
            "cleaning_up"
        ],
        "each phase's duration once, in order"
    );
    assert_eq!(
        ends.iter().filter(|(n, _, _)| n == "RunsSucceeded").count(),
        1
    );
    assert!(ends
        .iter()
        .any(|(n, p, ms)| n == "RunDuration" && p == "succeeded" && *ms > 0));
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Moves the `current` item's `seq` attribute, as another writer would.
async fn set_item_seq(w: &World, seq: u64) {
    w.client
        .update_item()
        .table_name(&w.table)
        .key("pk", AttributeValue::S(format!("sync#{SYNC}")))
        .key("sk", AttributeValue::S("current".into()))
        .update_expression("SET #seq = :seq")
        .expression_attribute_names("#seq", "seq")
        .expression_attribute_values(":seq", AttributeValue::N(seq.to_string()))
        .send()
        .await
        .unwrap();
}

async fn put_current(w: &World, envelope: &str, seq: u64) -> HashMap<String, AttributeValue> {
    w.client
        .put_item()
        .table_name(&w.table)
        .item("pk", AttributeValue::S(format!("sync#{SYNC}")))
        .item("sk", AttributeValue::S("current".into()))
        .item("envelope", AttributeValue::S(envelope.into()))
        .item("seq", AttributeValue::N(seq.to_string()))
        .item("run_id", AttributeValue::S("r1".into()))
        .send()
        .await
        .unwrap();
    w.item().await.unwrap()
}

#[tokio::test]
async fn a_corrupt_or_newer_item_is_a_state_error_and_left_untouched() {
    let w = world("corrupt", SourceConfig::default()).await;
    let lambda = w.lambda(&[]).await;

    let before = put_current(&w, "{\"schema_version\": 1, \"run_id\": ", 3).await;
    let e = lambda.handle(&scheduled(), &ctx()).await.unwrap_err();
    assert_eq!(e.error_type, ErrorType::State);
    assert!(e.message.contains("not valid JSON"), "{e}");
    assert_eq!(w.item().await.unwrap(), before, "corrupt item untouched");

    // A valid envelope, but written by a newer build.
    let spec = w.config(&[]).spec;
    let run = SyncRun::start("r1", spec, None, now()).unwrap();
    let mut envelope = persist::encode(&run);
    envelope["schema_version"] = json!(persist::SCHEMA_VERSION + 1);
    let before = put_current(&w, &envelope.to_string(), 0).await;
    let e = lambda.handle(&scheduled(), &ctx()).await.unwrap_err();
    assert_eq!(e.error_type, ErrorType::State);
    assert!(e.message.contains("newer"), "{e}");
    assert_eq!(w.item().await.unwrap(), before, "newer item untouched");

    // An envelope whose seq disagrees with the item's.
    let before = put_current(&w, &persist::encode_string(&run), 7).await;
    let e = lambda.handle(&scheduled(), &ctx()).await.unwrap_err();
    assert_eq!(e.error_type, ErrorType::State);
    assert!(e.message.contains("disagrees"), "{e}");
    assert_eq!(w.item().await.unwrap(), before);
    assert_eq!(w.source.stats().kickoffs, 0, "no effect was performed");
}

#[tokio::test]
async fn saves_on_a_stale_seq_or_a_lost_lease_conflict() {
    let w = world("conflict", SourceConfig::default()).await;
    let spec = w.config(&[]).spec;
    let clock = ManualClock::at(now());
    let table = DynamoTable::new(
        w.client.clone(),
        w.table.clone(),
        Duration::from_millis(400),
        Duration::from_secs(3600),
    )
    .with_clock(clock.clone());
    let Acquired::Leased { store: mut a, run } = table.acquire(SYNC, "a").await.unwrap() else {
        panic!("the first acquire must get the lease")
    };
    assert!(run.is_none());
    let run0 = SyncRun::start("r1", spec, None, now()).unwrap();
    a.replace(&run0).await.unwrap();

    // A save must advance the seq the store last read or wrote (0)...
    assert!(matches!(
        a.save(&run0).await,
        Err(StoreError::Conflict { expected: 0 })
    ));
    // ...by any amount: the driver leaves out saves of some per-file steps.
    let mut ahead = run0.clone();
    ahead.seq = 5;
    a.save(&ahead).await.unwrap();
    // Saving the same seq twice is stale.
    assert!(matches!(
        a.save(&ahead).await,
        Err(StoreError::Conflict { expected: 5 })
    ));
    // The item changed underneath (another writer moved its seq on): stale, though the saved
    // seq advances past both.
    set_item_seq(&w, 6).await;
    let mut beyond = run0.clone();
    beyond.seq = 9;
    assert!(matches!(
        a.save(&beyond).await,
        Err(StoreError::Conflict { .. })
    ));
    assert_eq!(w.item().await.unwrap()["seq"].as_n().unwrap(), "6");
    // Put back as `a` wrote it, for the lease checks below.
    set_item_seq(&w, 5).await;
    let mut next = run0.clone();
    next.seq = 6;
    a.save(&next).await.unwrap();

    // While a's lease lasts, b is busy; once it lapses b takes over and a can no longer save.
    assert!(matches!(
        table.acquire(SYNC, "b").await.unwrap(),
        Acquired::Busy { .. }
    ));
    clock.advance(Duration::from_millis(500));
    let Acquired::Leased { store: b, run } = table.acquire(SYNC, "b").await.unwrap() else {
        panic!("an expired lease must be taken over")
    };
    assert_eq!(run.unwrap().seq, 6);
    let mut later = next.clone();
    later.seq = 7;
    assert!(matches!(
        a.save(&later).await,
        Err(StoreError::Conflict { .. })
    ));
    // a's release does not remove b's lease.
    a.release().await;
    let item = w.item().await.unwrap();
    assert_eq!(item["lease_owner"].as_s().unwrap(), "b");
    b.release().await;
    assert!(!w.item().await.unwrap().contains_key("lease_owner"));
}

#[tokio::test]
async fn secret_references_are_resolved_from_secrets_manager_and_ssm() {
    let sdk = sdk().await;
    let name = unique("source-secret");
    aws_sdk_secretsmanager::Client::new(&sdk)
        .create_secret()
        .name(&name)
        .secret_string("the-source-secret")
        .send()
        .await
        .unwrap();
    let param = format!("/{}", unique("target-key"));
    aws_sdk_ssm::Client::new(&sdk)
        .put_parameter()
        .name(&param)
        .value("the-target-secret")
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .unwrap();
    let vars: Vec<(String, String)> = [
        (
            "SOURCE_ENDPOINT",
            "https://fhir.example.org/fhir".to_string(),
        ),
        ("SOURCE_CLIENT_ID", "id".into()),
        ("SOURCE_CLIENT_SECRET", format!("secretsmanager:{name}")),
        ("STAGING_URL", "s3://bucket/prefix/".into()),
        (
            "TARGET_ENDPOINT",
            "https://pathling.example.org/fhir".into(),
        ),
        ("TARGET_CLIENT_ID", "importer".into()),
        ("TARGET_CLIENT_SECRET", format!("ssm:{param}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let resolver = AwsSecrets::new(&sdk);
    let c = aws_plumbing::load_config_from(vars.clone(), &[], &resolver)
        .await
        .unwrap();
    let expose = |s: &Option<pathling_import_core::config::Secret>| {
        s.as_ref().map(|s| s.expose().to_string())
    };
    assert_eq!(
        expose(&c.secrets.source_client_secret).as_deref(),
        Some("the-source-secret")
    );
    assert_eq!(
        expose(&c.secrets.target_client_secret).as_deref(),
        Some("the-target-secret")
    );

    let mut missing = vars;
    missing[2].1 = "secretsmanager:no-such-secret".into();
    let e = aws_plumbing::load_config_from(missing, &[], &resolver)
        .await
        .unwrap_err();
    assert_eq!(e.error_type, ErrorType::Configuration);
    assert!(e.message.starts_with("SOURCE_CLIENT_SECRET"), "{e}");
}

/// Credentials for both sides, with distinctive values: the source's client secret
/// (`client_secret_post`), the target's private key (`private_key_jwt`) and a target client
/// secret the method leaves unused.
struct SyncCredentials {
    source: AuthConfig,
    target: AuthConfig,
    vars: Vec<(String, String)>,
    secrets: Vec<String>,
}

fn credentials() -> SyncCredentials {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let source_secret = format!("S3cr3t+lambda-source:{tag}%x");
    let target_secret = format!("S3cr3t+lambda-target:{tag}%x");
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
    let vars = [
        ("SOURCE_AUTHENTICATION_ENABLED", "true".to_string()),
        ("SOURCE_CLIENT_ID", "lambda-client".into()),
        ("SOURCE_CLIENT_SECRET", source_secret.clone()),
        ("TARGET_AUTHENTICATION_ENABLED", "true".into()),
        ("TARGET_CLIENT_ID", "lambda-importer".into()),
        ("TARGET_AUTH_METHOD", "private_key_jwt".into()),
        ("TARGET_PRIVATE_KEY", key.private_jwk.to_string()),
        ("TARGET_CLIENT_SECRET", target_secret),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    SyncCredentials {
        source: AuthConfig::client_secret_post("lambda-client", &source_secret),
        target: AuthConfig::private_key_jwt("lambda-importer", &[&key]),
        vars,
        secrets,
    }
}

#[tokio::test]
async fn an_item_rewritten_to_a_foreign_source_is_refused_before_any_request() {
    let logs = common::leaks::LogCapture::start();
    let foreign = common::Recorder::start().await;
    let creds = credentials();
    let w = world_with(
        "foreign",
        SourceConfig {
            auth: Some(creds.source.clone()),
            in_progress_polls: 1_000,
            progress_retry_after: RetryAfter::Seconds(2),
            ..SourceConfig::default()
        },
        Some(creds.target.clone()),
    )
    .await;
    let mut extra: Vec<(&str, &str)> = creds
        .vars
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    extra.push(("LAMBDA_MAX_SLEEP", "1"));
    let lambda = w.lambda(&extra).await;
    let mut shown = Vec::new();

    // An unfinished run, waiting for the export.
    let first = lambda.handle(&scheduled(), &ctx()).await.unwrap();
    assert_eq!(first.stopped, StopReason::Sleeping, "{first:#?}");
    assert_eq!(first.phase.as_deref(), Some("polling_export"));
    shown.push(serde_json::to_string(&first).unwrap());

    // Whoever can write the table points the run at another host.
    let mut item = w.item().await.unwrap();
    let mut envelope: Value = serde_json::from_str(item["envelope"].as_s().unwrap()).unwrap();
    assert_eq!(
        envelope["spec"]["source"]["endpoint"],
        json!(w.source.base_url())
    );
    let foreign_base = format!("{}/fhir", foreign.url());
    envelope["spec"]["source"]["endpoint"] = json!(foreign_base);
    item.insert("envelope".into(), AttributeValue::S(envelope.to_string()));
    w.client
        .put_item()
        .table_name(&w.table)
        .set_item(Some(item))
        .send()
        .await
        .unwrap();
    let before = w.item().await.unwrap();

    for event in [
        scheduled(),
        json!({"syncId": SYNC}),
        json!({"cancel": true}),
    ] {
        let e = lambda.handle(&event, &ctx()).await.unwrap_err();
        assert_eq!(e.error_type, ErrorType::State, "{e}");
        assert!(
            e.message.contains("started with other settings")
                && e.message.contains("(SOURCE_ENDPOINT)")
                && e.message.contains("{\"rebind\": true}"),
            "{e}"
        );
        shown.push(format!("{e} {e:?}"));
        assert!(foreign.requests().is_empty(), "{:?}", foreign.requests());
        assert_eq!(
            w.item().await.unwrap(),
            before,
            "the item is left as it was"
        );
    }
    let kickoffs = w.source.stats().kickoffs;

    // The operator's explicit choice: continue with the configured endpoint.
    w.source.update(|c| c.in_progress_polls = 0);
    let rest = invoke_until_done(&lambda, &json!({"rebind": true})).await;
    let last = rest.last().unwrap();
    assert_eq!(last.phase.as_deref(), Some("succeeded"), "{rest:#?}");
    assert!(rest.iter().all(|s| s.run_id == first.run_id), "{rest:#?}");
    assert_eq!(
        w.source.stats().kickoffs,
        kickoffs,
        "the export was not restarted"
    );
    assert!(foreign.requests().is_empty(), "{:?}", foreign.requests());
    assert_eq!(w.pathling.total_resources(), 50 + 120 + 60);
    shown.extend(rest.iter().map(|s| serde_json::to_string(s).unwrap()));

    let item = w.item().await.unwrap();
    shown.push(format!("{item:?}"));
    shown.push(logs.text());
    assert!(logs.text().contains("rebound"), "the rebind is logged");
    for (i, text) in shown.iter().enumerate() {
        common::leaks::assert_absent(&format!("output #{i}"), text, &creds.secrets);
    }
    let files = common::leaks::scan_dir(w.staging.path(), &creds.secrets, &[]);
    assert!(files > 0, "nothing staged to scan");
}

/// Scale: a 100,000-file export through the single Lambda, its run in moto's DynamoDB. The
/// item stays small at every save (sampled while the run goes on, and from the metrics), and
/// the writes are bounded by time, not by files; each file is downloaded and imported once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_100000_file_export_writes_small_items_a_bounded_number_of_times() {
    const FILES: u32 = 100_000;
    const BUDGET: usize = 16 * 1024;
    let w = world(
        "scale",
        SourceConfig {
            dataset: DatasetConfig::new(&[("Observation", u64::from(FILES), FILES)]),
            in_progress_polls: 0,
            ..SourceConfig::default()
        },
    )
    .await;
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let lambda = w
        .lambda(&[("TRANSFER_CONCURRENCY", "8"), ("LAMBDA_TIME_BUDGET", "20")])
        .await
        .with_metrics_sink(MetricsSink::Memory(lines.clone()))
        .without_event_log_on_stdout();

    // Samples the item's envelope while the run goes on.
    let largest = Arc::new(AtomicU64::new(0));
    let sampling = {
        let (client, table, largest) = (w.client.clone(), w.table.clone(), largest.clone());
        tokio::spawn(async move {
            loop {
                let item = client
                    .get_item()
                    .table_name(&table)
                    .key("pk", AttributeValue::S(format!("sync#{SYNC}")))
                    .key("sk", AttributeValue::S("current".into()))
                    .send()
                    .await
                    .ok()
                    .and_then(|o| o.item);
                if let Some(len) = item
                    .as_ref()
                    .and_then(|i| i.get("envelope"))
                    .and_then(|e| e.as_s().ok())
                    .map(String::len)
                {
                    largest.fetch_max(len as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let started = Instant::now();
    let mut invocations = 0;
    let mut largest_write = 0;
    loop {
        let s = lambda.handle(&scheduled(), &ctx()).await.unwrap();
        invocations += 1;
        // Every save of the invocation, as its summary reports them.
        largest_write = largest_write.max(s.state_writes.map_or(0, |w| w.largest));
        if s.stopped == StopReason::Done {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "the run did not end"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = started.elapsed().as_secs();
    sampling.abort();

    let mut totals: HashMap<String, u64> = HashMap::new();
    for line in lines.lock().unwrap().iter() {
        let v: Value = serde_json::from_str(line).unwrap();
        if v.get("Phase").is_none() {
            for name in ["StateWrites", "StateBytes", "FilesStaged"] {
                *totals.entry(name.into()).or_default() += v[name].as_u64().unwrap_or(0);
            }
        }
    }
    let (writes, bytes) = (totals["StateWrites"], totals["StateBytes"]);
    let sampled = largest.load(Ordering::Relaxed) as usize;
    println!(
        "{FILES} files through the single Lambda in {secs} s ({invocations} invocations): \
         {writes} item writes, {bytes} bytes in all ({:.1} bytes per file), largest write \
         {largest_write} bytes (largest item sampled {sampled} bytes)",
        bytes as f64 / f64::from(FILES),
    );
    assert!(
        largest_write > 0 && largest_write <= BUDGET as u64,
        "{largest_write} bytes"
    );
    assert!(sampled > 0 && sampled <= BUDGET, "{sampled} bytes");
    assert!(bytes <= writes * BUDGET as u64);
    // One write a second at most while files move, plus phase changes and each invocation's
    // lease and end.
    assert!(
        writes <= secs + 30 + 3 * invocations,
        "{writes} writes in {secs} s"
    );
    assert_eq!(totals["FilesStaged"], u64::from(FILES));
    let run = w.stored_run().await.unwrap();
    assert_eq!(run.state.name(), "succeeded");
    assert_eq!(w.downloads(), FILES, "each file downloaded once");
    assert_eq!(w.pathling.resource_count("Observation"), FILES as usize);
}

/// A file too slow for one invocation is cut before the invocation ends (its transfer
/// aborted, nothing left behind), and after a few cut attempts the run fails naming it,
/// instead of starting the file over in every invocation forever. The other files are staged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_too_slow_for_an_invocation_fails_the_run_naming_it_after_a_few_cuts() {
    let w = world(
        "unfinished",
        SourceConfig {
            // The Observation file comes in 16 KiB chunks 250 ms apart (about 12 s; not
            // gzipped, whose encoder would gather the chunks); with a budget of 1 s, an
            // invocation's cut comes 6 s after it starts.
            dataset: DatasetConfig::new(&[("Patient", 10, 1), ("Observation", 2_000, 1)]),
            gzip_when_asked: false,
            chunk_delay: Duration::from_millis(250),
            in_progress_polls: 0,
            ..SourceConfig::default()
        },
    )
    .await;
    let lambda = w
        .lambda(&[("LAMBDA_TIME_BUDGET", "1"), ("TRANSFER_CONCURRENCY", "2")])
        .await;
    let all = invoke_until_done(&lambda, &scheduled()).await;
    let last = all.last().unwrap();
    let outcome = last.outcome.as_ref().unwrap();
    assert_eq!(outcome["status"], "failed", "{outcome}");
    let reason = outcome["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(
            "could not stage output[1] Observation: gave up after 3 attempt(s): unfinished:"
        ) && reason.contains("within one invocation"),
        "{reason}"
    );
    let attempts = w.source.file_attempts();
    let observation = attempts
        .iter()
        .find(|(name, _)| name.contains("Observation"))
        .map(|(_, n)| *n);
    assert_eq!(observation, Some(3), "{attempts:?}");
    // The small file was staged; the cut transfers left nothing behind.
    let staged: Vec<String> = walk(w.staging.path())
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    assert!(
        staged.iter().any(|p| p.ends_with("Patient.ndjson")),
        "{staged:#?}"
    );
    assert!(
        !staged.iter().any(|p| p.contains(".partial-")),
        "{staged:#?}"
    );
    assert!(!staged.iter().any(|p| p.contains("Observation.ndjson")));
}

/// A file too large for one invocation moves across several: at the end of its budget each
/// invocation winds the transfer down at the next part boundary (checkpointed), which does
/// not count as a failure; the next invocation continues from there with a range request,
/// and the run succeeds with every resource imported once and next to nothing sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_too_large_for_an_invocation_continues_across_invocations() {
    let w = world(
        "paused",
        SourceConfig {
            // About 24 MB of Observations in 64 KiB chunks 40 ms apart (1.6 MB/s, about 15 s);
            // with a budget of 4 s, an invocation's cut comes 9 s after it starts: room for
            // a part or two (5 MiB each) even on a loaded machine, not for the whole file.
            dataset: DatasetConfig::new(&[("Patient", 10, 1), ("Observation", 60_000, 1)]),
            gzip_when_asked: false,
            ranges: true,
            chunk_bytes: 64 * 1024,
            chunk_delay: Duration::from_millis(40),
            in_progress_polls: 0,
            ..SourceConfig::default()
        },
    )
    .await;
    let lambda = w
        .lambda(&[
            ("LAMBDA_TIME_BUDGET", "4"),
            ("TRANSFER_CONCURRENCY", "2"),
            ("TRANSFER_PART_SIZE", "5"),
        ])
        .await;
    let all = invoke_until_done(&lambda, &scheduled()).await;
    let outcome = all.last().unwrap().outcome.as_ref().unwrap();
    assert_eq!(outcome["status"], "succeeded", "{outcome}");
    let attempts = w.source.file_attempts();
    let observation = attempts
        .iter()
        .find(|(name, _)| name.contains("Observation"))
        .map_or(0, |(_, n)| *n);
    assert!(
        observation >= 2,
        "the file took one invocation: {attempts:?}"
    );
    let stats = w.source.stats();
    assert_eq!(stats.ranges_served, u64::from(observation - 1), "continued");
    assert_eq!(w.pathling.resource_count("Observation"), 60_000);
    let files = walk(w.staging.path());
    assert!(
        files
            .iter()
            .all(|p| !p.to_string_lossy().contains(".resume/")),
        "checkpoints left behind: {files:#?}"
    );
    let staged: u64 = files
        .iter()
        .filter(|p| p.to_string_lossy().contains("/output/"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let again = stats.file_bytes_sent - staged;
    println!(
        "{} invocations, {observation} attempts at the file, {staged} B staged, {again} B sent again",
        all.len()
    );
    // Each invocation winds down at a part boundary before its cut: what is sent again is the
    // line that boundary cut, and at most a chunk the source had sent after it.
    assert!(
        again <= u64::from(observation - 1) * (64 * 1024 + 4096),
        "{again} B sent again"
    );
}
