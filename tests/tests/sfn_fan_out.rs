//! The Step Functions task's fan-out (`FAN_OUT_FILES`): with S3 staging on moto, the task hands
//! batches of due files to the definition's Distributed Map as an items file, each item runs
//! through the same task Lambda (`{"fanOutItem": ...}`) — here up to 16 at once, as the Map
//! would run them — and the next task invocation folds their results into the run.
//!
//! The Map itself is played by this test, as `state-machine.json` describes it: read the items
//! file from S3 (`ItemReader`), run every item (`ItemProcessor`, `MaxConcurrency`), then call
//! the task again with the same payload (`ResultPath: null`).
//!
//! One large file is split into byte ranges (`FAN_OUT_RANGE_MB`): its first item only starts
//! the plan, and the next fan-out moves its ranges in parallel items; the fold completes it.
//!
//! One test per binary: the S3 client of the task reads its endpoint from the process
//! environment, which is set before the runtime starts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use futures_util::StreamExt;
use pathling_import_core::config::{self, RawConfig};
use pathling_import_core::Timestamp;
use pathling_import_runners::executor::now;
use pathling_import_runners::sfn::{Task, EXTRA_KEYS};
use pathling_import_tests::data::DatasetConfig;
use pathling_import_tests::fake_pathling::{
    FakePathling, FakePathlingHandle, PathlingConfig, S3Access,
};
use pathling_import_tests::fake_source::{FakeSource, FakeSourceHandle, SourceConfig};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

async fn object(bucket: &S3Bucket, key: &str) -> Vec<u8> {
    bucket
        .client
        .get_object()
        .bucket(&bucket.bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GetObject {key}: {e:?}"))
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes()
        .to_vec()
}

/// The task's S3 client reads its endpoint from the process environment: set once, before
/// any runtime's thread exists.
fn runtime() -> tokio::runtime::Runtime {
    static ENV: std::sync::Once = std::sync::Once::new();
    ENV.call_once(|| {
        let endpoint = moto_endpoint();
        for (k, v) in [
            ("AWS_ENDPOINT_URL", endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ] {
            std::env::set_var(k, v);
        }
    });
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_fan_out_stages_every_file_once_through_parallel_item_lambdas() {
    runtime().block_on(fan_out());
}

#[test]
fn a_split_file_whose_version_changes_is_split_again() {
    runtime().block_on(changed_while_split());
}

/// The source, serving files as an object store does: ranges, and no compression (a
/// compressed answer's offsets are not the file's, so such a file is not split).
async fn source(dataset: DatasetConfig) -> FakeSourceHandle {
    FakeSource::start(SourceConfig {
        dataset,
        in_progress_polls: 0,
        ranges: true,
        gzip_when_asked: false,
        chunk_bytes: 64 * 1024,
        ..SourceConfig::default()
    })
    .await
    .unwrap()
}

/// Pathling, and the task fanning out batches of 8 files or more, 16 items at once, files of
/// at least 10 MiB split into 5 MiB ranges.
async fn task(bucket: &S3Bucket, src: &FakeSourceHandle) -> (Task, FakePathlingHandle) {
    let staged = format!("s3://{}/staged/", bucket.bucket);
    let s3a = format!("s3a://{}/staged/", bucket.bucket);
    let mut pathling_config = PathlingConfig::v9(&[staged.as_str(), s3a.as_str()]);
    pathling_config.s3 = Some(S3Access::new(&bucket.endpoint, "test", "test"));
    let pathling = FakePathling::start(pathling_config).await.unwrap();
    let vars: Vec<(String, String)> = [
        ("SOURCE_ENDPOINT", src.base_url()),
        ("SOURCE_AUTHENTICATION_ENABLED", "false".into()),
        ("TARGET_ENDPOINT", pathling.base_url()),
        ("TARGET_AUTHENTICATION_ENABLED", "false".into()),
        ("EXPORT_RETRY_WAIT", "1".into()),
        ("IMPORT_RETRY_WAIT", "1".into()),
        ("TRANSFER_RETRY_WAIT", "1".into()),
        ("TRANSFER_CONCURRENCY", "2".into()),
        ("STAGING_URL", staged),
        ("FAN_OUT_FILES", "8".into()),
        ("FAN_OUT_CONCURRENCY", "16".into()),
        ("TRANSFER_PART_SIZE", "5".into()),
        ("FAN_OUT_RANGE_MB", "5".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let raw = RawConfig::from_env(vars, EXTRA_KEYS);
    let config = config::parse(&raw, EXTRA_KEYS).unwrap();
    let task = Task::new(config)
        .await
        .unwrap()
        .without_event_log_on_stdout();
    (task, pathling)
}

fn budget() -> Timestamp {
    Timestamp(now().0 + 30_000)
}

/// The Map's ItemProcessor: one task invocation per item, `concurrency` at once.
async fn run_items(task: &Task, items: Vec<Value>, concurrency: usize) -> Vec<Value> {
    futures_util::stream::iter(items)
        .map(|item| async move {
            task.invoke(json!({ "fanOutItem": item }), budget())
                .await
                .unwrap()
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// The staged object whose key contains `type_name`.
async fn staged_file(bucket: &S3Bucket, type_name: &str) -> Vec<u8> {
    bucket
        .objects()
        .await
        .into_iter()
        .find(|(k, _)| k.contains("/output/") && k.ends_with(".ndjson") && k.contains(type_name))
        .map(|(_, v)| v)
        .unwrap()
}

/// The URL of the manifest's `type_name` file, and what the source serves there now.
async fn source_file(bucket: &S3Bucket, run_id: &str, type_name: &str) -> (String, Vec<u8>) {
    let manifest: Value =
        serde_json::from_slice(&object(bucket, &format!("staged/{run_id}/manifest.json")).await)
            .unwrap();
    let url = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["type"] == type_name)
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let bytes = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    (url, bytes.to_vec())
}

async fn fan_out() {
    let bucket = S3Bucket::create().await;
    // 200 files of two types, and one of about 20 MB.
    let src = source(DatasetConfig::new(&[
        ("Patient", 400, 100),
        ("Observation", 800, 100),
        ("Condition", 60_000, 1),
    ]))
    .await;
    let (task, pathling) = task(&bucket, &src).await;

    let mut input = json!({});
    let (mut fan_outs, mut items_run) = (0, 0);
    let mut skipped = None;
    // The large file: its URL and bytes (read once the manifest is staged), and the range
    // items of each fan-out.
    let mut large: Option<(String, Vec<u8>)> = None;
    let mut range_items = Vec::new();
    let mut last = Value::Null;
    for _ in 0..200 {
        let out = task.invoke(input, budget()).await.unwrap();
        match out["action"].as_str().unwrap() {
            "continue" => {}
            "wait" => {
                tokio::time::sleep(Duration::from_secs(
                    out["waitSeconds"].as_u64().unwrap().min(5),
                ))
                .await
            }
            "fan_out" => {
                fan_outs += 1;
                let fan = &out["fanOut"];
                assert_eq!(fan["bucket"], json!(bucket.bucket));
                let concurrency = fan["maxConcurrency"].as_u64().unwrap() as usize;
                assert_eq!(concurrency, 16);
                // ItemReader: the items file, a JSON array.
                let items: Vec<Value> = serde_json::from_slice(
                    &object(&bucket, fan["itemsKey"].as_str().unwrap()).await,
                )
                .unwrap();
                assert_eq!(items.len() as u64, fan["items"].as_u64().unwrap());
                assert!(items.len() <= 64 + 8, "{}", items.len());
                if large.is_none() {
                    let run_id = out["runId"].as_str().unwrap();
                    large = Some(source_file(&bucket, run_id, "Condition").await);
                }
                range_items.push(items.iter().filter(|i| i.get("range").is_some()).count());
                // The first batch's first child fails for good (no result): the fold counts
                // an unfinished attempt, and a later batch hands its file out again.
                let items = if fan_outs == 1 {
                    skipped = Some(items[0].clone());
                    items[1..].to_vec()
                } else {
                    items
                };
                // ItemProcessor: one task invocation per item, MaxConcurrency at once.
                let answers = run_items(&task, items, concurrency).await;
                items_run += answers.len();
                // The large file's first item answers `paused`: it only split the file.
                assert!(
                    answers.iter().all(|a| a["outcome"] == "staged"
                        || (a["outcome"] == "paused"
                            && a["key"].as_str().unwrap().contains("Condition"))),
                    "{answers:?}"
                );
            }
            "succeed" | "fail" => {
                last = out;
                break;
            }
            other => panic!("unknown action {other:?}: {out}"),
        }
        input = out;
    }
    assert_eq!(last["action"], "succeed", "{last}");
    assert!(skipped.is_some());
    let files = output_files(&src);
    assert_eq!(files, 201);
    println!("{fan_outs} fan-out(s) ran {items_run} item(s) for {files} files");
    assert!(fan_outs >= 4, "{fan_outs} fan-outs");
    // Every file staged exactly once, by the items (the task's own drive staged none, or
    // only a last batch smaller than FAN_OUT_FILES), and imported once.
    let attempts = src.file_attempts();
    assert_eq!(attempts.len(), files);
    let (url, served) = large.unwrap();
    let name = url.rsplit('/').next().unwrap();
    let (large_key, large_attempts) = attempts.iter().find(|(k, _)| k.ends_with(name)).unwrap();
    assert!(
        attempts.iter().all(|(k, n)| k == large_key || *n == 1),
        "{attempts:?}"
    );
    // Split in 5 MiB ranges, moved by one fan-out's items at once.
    let ranges = served.len().div_ceil(5 * 1024 * 1024);
    assert!(ranges >= 4, "{} bytes", served.len());
    let ranged: Vec<usize> = range_items.iter().copied().filter(|n| *n > 0).collect();
    assert_eq!(
        ranged,
        vec![ranges],
        "range items per fan-out: {range_items:?}"
    );
    // Its attempts: the item that split it, one per range, and this test's read.
    assert_eq!(*large_attempts as usize, 1 + ranges + 1);
    assert_eq!(src.stats().ranges_served as usize, ranges);
    let staged_large = staged_file(&bucket, "Condition").await;
    assert!(
        staged_large == served,
        "the staged file differs from the source's"
    );
    println!("{} bytes moved as {ranges} ranges", served.len());
    assert!(items_run + 8 > files, "{items_run} items for {files} files");
    // Items come only from the task's own requests: a foreign folder, or a run's folder
    // outside the staging prefix, is refused before anything is read.
    for folder in [
        "elsewhere/run-1/fanout/3/".to_string(),
        format!("staged/{}/fanout/x/", last["runId"].as_str().unwrap()),
        "staged/../fanout/3/".to_string(),
    ] {
        let err = task
            .invoke(json!({"fanOutItem": {"fanOut": folder, "n": 0}}), budget())
            .await
            .unwrap_err();
        assert!(
            err.message.contains("fan-out folder"),
            "{folder}: {}",
            err.message
        );
    }
    assert_pathling_holds_export(&pathling, &src);
    assert_eq!(pathling.stats().imports_accepted, 1);
    // The fan-out folders were folded and removed.
    let left: BTreeSet<String> = bucket
        .objects()
        .await
        .into_keys()
        .filter(|k| k.contains("/fanout/"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A file split into ranges whose source serves another version before its ranges move: the
/// range items are answered with the whole new file (`If-Range`), void the plan and report the
/// file changed; the file is split again (a new plan, new range items) and staged whole.
async fn changed_while_split() {
    let bucket = S3Bucket::create().await;
    // About 12 MB in one file (3 ranges), and 8 small ones.
    let src = source(DatasetConfig::new(&[
        ("Patient", 80, 10),
        ("Observation", 30_000, 1),
    ]))
    .await;
    let (task, pathling) = task(&bucket, &src).await;
    let mut input = json!({});
    let (mut range_fan_outs, mut changed_answers) = (0, 0);
    let mut ranges_before_retry = 0;
    let mut last = Value::Null;
    let mut now_served = None;
    for _ in 0..100 {
        let out = task.invoke(input, budget()).await.unwrap();
        match out["action"].as_str().unwrap() {
            "continue" => {}
            "wait" => tokio::time::sleep(Duration::from_secs(1)).await,
            "fan_out" => {
                let items: Vec<Value> = serde_json::from_slice(
                    &object(&bucket, out["fanOut"]["itemsKey"].as_str().unwrap()).await,
                )
                .unwrap();
                if items.iter().any(|i| i.get("range").is_some()) {
                    range_fan_outs += 1;
                    if range_fan_outs == 1 {
                        src.update(|c| c.file_version += 1);
                    } else {
                        // Read while the export job still exists.
                        let run_id = out["runId"].as_str().unwrap();
                        now_served = Some(source_file(&bucket, run_id, "Observation").await.1);
                    }
                }
                let ranged = items.iter().any(|i| i.get("range").is_some());
                let answers = run_items(&task, items, 16).await;
                changed_answers += answers.iter().filter(|a| a["outcome"] == "network").count();
                if ranged && range_fan_outs == 2 {
                    // The Sync step that folds the ranges completes the file; its answer is
                    // lost (it ends at once, before the run does) and Step Functions retries
                    // it with the same payload, which must find the file staged rather than
                    // split it again.
                    let lost = task.invoke(out.clone(), now()).await.unwrap();
                    assert_ne!(lost["action"], "fan_out", "{lost}");
                    ranges_before_retry = src.stats().ranges_served;
                }
            }
            "succeed" | "fail" => {
                last = out;
                break;
            }
            other => panic!("unknown action {other:?}: {out}"),
        }
        input = out;
    }
    assert_eq!(last["action"], "succeed", "{last}");
    assert_eq!(range_fan_outs, 2, "split, voided, split again");
    assert_eq!(
        src.stats().ranges_served,
        ranges_before_retry,
        "the retried fold asked for no range again"
    );
    assert!(changed_answers >= 1, "a range item reported the change");
    assert!(
        staged_file(&bucket, "Observation").await == now_served.unwrap(),
        "the staged file is not the source's current version"
    );
    assert_pathling_holds_export(&pathling, &src);
    let left: BTreeSet<String> = bucket
        .objects()
        .await
        .into_keys()
        .filter(|k| k.contains("/.resume/") || k.contains("/fanout/"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
