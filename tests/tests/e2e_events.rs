//! End-to-end: the operator's event log (the SMART bulk-data-client format plus our events)
//! written by the real CLI: beside the state file (or where `--event-log` says) and as the
//! run's own copy next to its staged data.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use pathling_import_tests::fake_pathling::{FakePathling, FakePathlingHandle, PathlingConfig};
use pathling_import_tests::fake_source::{FakeSource, FakeSourceHandle, SourceConfig};
use pathling_import_tests::fhir::RetryAfter;
use serde_json::Value;

struct World {
    sandbox: Sandbox,
    src: FakeSourceHandle,
    pathling: FakePathlingHandle,
}

async fn world(source: SourceConfig) -> World {
    let mut sandbox = Sandbox::new();
    let staging = Staging::Dir;
    let src = FakeSource::start(source).await.unwrap();
    let allowed = staging.allowable_sources(&sandbox);
    let pathling = FakePathling::start(PathlingConfig::v9(&[allowed[0].as_str()]))
        .await
        .unwrap();
    sandbox.configure(&src.base_url(), &pathling.base_url(), &staging);
    World {
        sandbox,
        src,
        pathling,
    }
}

/// Every line of an event log, parsed; each must be a JSON object in the format.
fn read_log(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|line| {
            let v: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            for field in [
                "exportId",
                "timestamp",
                "eventId",
                "eventDetail",
                "logVersion",
            ] {
                assert!(v.get(field).is_some(), "{field} missing: {line}");
            }
            v
        })
        .collect()
}

fn ids(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["eventId"].as_str().unwrap())
        .collect()
}

fn position(ids: &[&str], id: &str) -> usize {
    ids.iter()
        .position(|i| *i == id)
        .unwrap_or_else(|| panic!("no {id} in {ids:?}"))
}

fn of<'a>(events: &'a [Value], id: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["eventId"] == id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_writes_a_complete_ordered_event_log_and_keeps_a_copy_with_its_data() {
    let w = world(SourceConfig {
        in_progress_polls: 2,
        progress_retry_after: RetryAfter::Seconds(1),
        ..SourceConfig::default()
    })
    .await;
    w.sandbox.run(&[]).await.assert_code(0);
    let run_id = w.sandbox.run_id();
    let log_path = w.sandbox.state_path().with_file_name("events.ndjson");
    let events = read_log(&log_path);
    let order = ids(&events);

    // Every line belongs to this run.
    assert!(events.iter().all(|e| e["exportId"] == run_id.as_str()));
    // The bulk-data-client's events, then ours, in a valid order.
    let sequence = [
        "kickoff",
        "status_progress",
        "status_complete",
        "manifest_complete",
        "download_request",
        "download_complete",
        "export_complete",
        "staging_complete",
        "import_kickoff",
        "import_complete",
        "run_complete",
    ];
    for pair in sequence.windows(2) {
        assert!(
            position(&order, pair[0]) < position(&order, pair[1]),
            "{} before {} in {order:?}",
            pair[0],
            pair[1]
        );
    }
    assert_eq!(of(&events, "kickoff").len(), 1);
    assert_eq!(of(&events, "status_progress").len(), 2, "{order:?}");
    assert_eq!(order.last(), Some(&"run_complete"));
    assert_eq!(
        of(&events, "run_complete")[0]["eventDetail"]["status"],
        "succeeded"
    );

    // Counts and bytes match what the source served and what was staged.
    let files = w.src.stats().files_completed as usize;
    let requests = of(&events, "download_request");
    let completes = of(&events, "download_complete");
    assert_eq!(requests.len(), files);
    assert_eq!(completes.len(), files);
    for c in &completes {
        let url = c["eventDetail"]["fileUrl"].as_str().unwrap();
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        assert!(!url.contains('?'), "no query string in the log: {url}");
        assert!(
            requests
                .iter()
                .any(|r| r["eventDetail"]["fileUrl"].as_str() == Some(url)),
            "{url} completed without a request"
        );
    }
    let summary = &w.sandbox.state().unwrap()["state"];
    let bytes: u64 = completes
        .iter()
        .map(|c| c["eventDetail"]["fileSize"].as_u64().unwrap())
        .sum();
    let resources: u64 = completes
        .iter()
        .map(|c| c["eventDetail"]["resourceCount"].as_u64().unwrap())
        .sum();
    assert_eq!(bytes, summary["bytes"].as_u64().unwrap());
    assert_eq!(resources as usize, w.pathling.total_resources());
    let export_complete = &of(&events, "export_complete")[0]["eventDetail"];
    assert_eq!(export_complete["files"].as_u64().unwrap() as usize, files);
    assert_eq!(export_complete["bytes"].as_u64().unwrap(), bytes);

    // The run's own copy next to its staged data holds the same lines.
    let copy = read_log(&w.sandbox.staging_dir().join(&run_id).join("log.ndjson"));
    assert_eq!(copy, events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_and_resumed_run_shows_the_resume_in_both_logs() {
    let w = world(SourceConfig {
        in_progress_polls: 3,
        progress_retry_after: RetryAfter::Seconds(1),
        ..SourceConfig::default()
    })
    .await;
    let mut child = w.sandbox.spawn(&[]);
    w.sandbox
        .wait_for_state(
            &mut child,
            "the export running",
            Duration::from_secs(30),
            |s| phase_of(s) == "polling_export",
        )
        .await;
    child.signal("TERM");
    child.wait(Duration::from_secs(30)).await.assert_code(130);
    w.sandbox.run(&[]).await.assert_code(0);

    let run_id = w.sandbox.run_id();
    let local = read_log(&w.sandbox.state_path().with_file_name("events.ndjson"));
    let order = ids(&local);
    let resumed = position(&order, "run_resumed");
    assert!(position(&order, "kickoff") < resumed, "{order:?}");
    assert!(resumed < position(&order, "status_complete"), "{order:?}");
    assert_eq!(
        of(&local, "kickoff").len(),
        1,
        "the export was not kicked off twice"
    );
    assert_eq!(
        of(&local, "run_resumed")[0]["eventDetail"]["phase"],
        "polling_export"
    );
    // The copy next to the data has both drives too (an interruption flushes it).
    let copy = read_log(&w.sandbox.staging_dir().join(&run_id).join("log.ndjson"));
    assert_eq!(copy, local);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_log_can_go_to_stdout() {
    let w = world(SourceConfig::default()).await;
    let out = w.sandbox.run(&["--event-log", "-"]).await;
    out.assert_code(0);
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(ids(&lines).last(), Some(&"run_complete"));
    assert!(!w
        .sandbox
        .state_path()
        .with_file_name("events.ndjson")
        .exists());
}
