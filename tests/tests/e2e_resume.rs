//! End-to-end: the local runner survives being killed (SIGKILL) at several points and being
//! interrupted (SIGINT, SIGTERM): running the same command again finishes the same run, with
//! one export kick-off at the source, no staged file downloaded twice, and the same data in
//! Pathling as an uninterrupted run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use pathling_import_tests::data::DatasetConfig;
use pathling_import_tests::fake_pathling::{FakePathling, FakePathlingHandle, PathlingConfig};
use pathling_import_tests::fake_source::{FakeSource, FakeSourceHandle, SourceConfig};
use pathling_import_tests::fhir::RetryAfter;
use serde_json::Value;

struct World {
    sandbox: Sandbox,
    staging: Staging,
    src: FakeSourceHandle,
    pathling: FakePathlingHandle,
}

async fn world(source: SourceConfig, import_duration_polls: u32) -> World {
    let mut sandbox = Sandbox::new();
    let staging = Staging::Dir;
    let auth = SourceAuth::basic();
    let src = FakeSource::start(SourceConfig {
        auth: Some(auth.fake.clone()),
        requires_access_token: true,
        ..source
    })
    .await
    .unwrap();
    let allowed = staging.allowable_sources(&sandbox);
    let pathling = FakePathling::start(PathlingConfig {
        import_duration_polls,
        ..PathlingConfig::v9(&[allowed[0].as_str()])
    })
    .await
    .unwrap();
    sandbox
        .configure(&src.base_url(), &pathling.base_url(), &staging)
        .source_auth(&auth)
        .set("transferConcurrency", 2);
    World {
        sandbox,
        staging,
        src,
        pathling,
    }
}

/// Many small files, each answered after `latency`: a transfer that takes a few seconds.
fn slow_transfer(latency_ms: u64) -> SourceConfig {
    SourceConfig {
        dataset: DatasetConfig::new(&[
            ("Patient", 40, 2),
            ("Observation", 240, 12),
            ("Condition", 120, 6),
        ]),
        in_progress_polls: 0,
        latency: Duration::from_millis(latency_ms),
        ..SourceConfig::default()
    }
}

/// After the resumed run: the same run finished, one export, Pathling complete.
async fn assert_resumed(w: &World, run_id: &str) {
    assert_eq!(
        w.sandbox.run_id(),
        run_id,
        "the rerun continued the same run"
    );
    assert_eq!(w.sandbox.phase(), "succeeded");
    let stats = w.src.stats();
    assert_eq!(stats.kickoffs, 1, "exactly one export kick-off");
    assert_eq!(w.src.jobs().len(), 1);
    assert!(w.src.jobs()[0].deleted, "the export job was DELETEd");
    assert_pathling_holds_export(&w.pathling, &w.src);
    let expected = w
        .src
        .expected_resources(&pathling_import_tests::data::ExportFilter::default());
    assert_staged(
        &w.staging,
        &w.sandbox,
        run_id,
        output_files(&w.src),
        &expected,
    )
    .await;
}

/// Files staged when the process died were not downloaded again; the others at most twice
/// (they may have been in flight).
async fn assert_no_staged_file_downloaded_twice(w: &World, run_id: &str, at_kill: &Value) {
    let names = manifest_file_names(&w.staging, &w.sandbox, run_id).await;
    let staged = staged_indexes(at_kill);
    let attempts = w.src.file_attempts();
    for (i, name) in names.iter().enumerate() {
        let n = attempts.get(name).copied().unwrap_or(0);
        if staged.contains(&i) {
            assert_eq!(
                n, 1,
                "{name} was staged before the kill but downloaded {n} times"
            );
        } else {
            assert!((1..=2).contains(&n), "{name} downloaded {n} times");
        }
    }
    let total: u32 = attempts.values().sum();
    let concurrency = 2;
    assert!(
        total as usize <= names.len() + concurrency,
        "{total} downloads for {} files",
        names.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_polling_the_export_resumes_the_same_export() {
    let w = world(
        SourceConfig {
            in_progress_polls: 3,
            progress_retry_after: RetryAfter::Seconds(1),
            ..SourceConfig::default()
        },
        0,
    )
    .await;
    let mut child = w.sandbox.spawn(&[]);
    let at_kill = w
        .sandbox
        .wait_for_state(&mut child, "an export poll", Duration::from_secs(20), |s| {
            phase_of(s) == "polling_export" && s["state"]["polls"].as_u64() >= Some(1)
        })
        .await;
    let killed = child.kill().await;
    assert_eq!(killed.code, None, "killed by the signal");
    let run_id = at_kill["run_id"].as_str().unwrap().to_string();
    assert_eq!(w.sandbox.phase(), "polling_export");
    assert_eq!(w.src.stats().file_gets, 0);

    w.sandbox.run(&[]).await.assert_code(0);
    assert_resumed(&w, &run_id).await;
    assert_eq!(w.src.stats().file_gets as usize, output_files(&w.src));
    assert_eq!(w.pathling.stats().imports_accepted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_transfer_downloads_only_what_was_not_staged() {
    let w = world(slow_transfer(120), 0).await;
    let mut child = w.sandbox.spawn(&[]);
    w.sandbox
        .wait_for_state(&mut child, "6 staged files", Duration::from_secs(30), |s| {
            phase_of(s) == "staging_files" && staged_indexes(s).len() >= 6
        })
        .await;
    child.kill().await;
    // The state as the process left it: what it had recorded as staged.
    let at_kill = w.sandbox.state().unwrap();
    assert_eq!(phase_of(&at_kill), "staging_files");
    let run_id = at_kill["run_id"].as_str().unwrap().to_string();
    let files = output_files(&w.src);
    assert!(
        staged_indexes(&at_kill).len() < files,
        "the kill came too late to test anything"
    );

    w.sandbox.run(&[]).await.assert_code(0);
    assert_resumed(&w, &run_id).await;
    assert_no_staged_file_downloaded_twice(&w, &run_id, &at_kill).await;
    assert_eq!(w.pathling.stats().imports_accepted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_import_kickoff_polls_the_same_import() {
    let w = world(
        SourceConfig {
            in_progress_polls: 0,
            ..SourceConfig::default()
        },
        4,
    )
    .await;
    let mut child = w.sandbox.spawn(&[]);
    let at_kill = w
        .sandbox
        .wait_for_state(
            &mut child,
            "the import kick-off",
            Duration::from_secs(20),
            |s| phase_of(s) == "polling_import",
        )
        .await;
    child.kill().await;
    let run_id = at_kill["run_id"].as_str().unwrap().to_string();
    assert_eq!(w.sandbox.phase(), "polling_import");
    assert_eq!(w.pathling.stats().imports_accepted, 1);
    assert!(
        w.pathling.total_resources() == 0,
        "the import had not completed at the kill"
    );

    w.sandbox.run(&[]).await.assert_code(0);
    assert_resumed(&w, &run_id).await;
    let p = w.pathling.stats();
    assert_eq!(p.import_kickoffs, 1, "no second $import");
    assert_eq!(p.imports_accepted, 1);
    // Every file was downloaded once: they were all staged before the kill.
    let attempts = w.src.file_attempts();
    assert_eq!(attempts.len(), output_files(&w.src));
    assert!(attempts.values().all(|n| *n == 1), "{attempts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_during_a_slow_transfer_exits_130_and_resumes() {
    interrupted_during_a_slow_transfer("INT").await;
}

/// What a service manager (systemd, Kubernetes) sends before SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_slow_transfer_exits_130_and_resumes() {
    interrupted_during_a_slow_transfer("TERM").await;
}

async fn interrupted_during_a_slow_transfer(signal: &str) {
    let w = world(slow_transfer(300), 0).await;
    let mut child = w.sandbox.spawn(&[]);
    w.sandbox
        .wait_for_state(&mut child, "a staged file", Duration::from_secs(30), |s| {
            phase_of(s) == "staging_files" && !staged_indexes(s).is_empty()
        })
        .await;
    let sent = Instant::now();
    child.signal(signal);
    let out = child.wait(Duration::from_secs(15)).await;
    let took = sent.elapsed();
    out.assert_code(130).assert_stderr_contains("interrupted");
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");

    // The state file decodes: the CLI itself reads it back.
    let state = w.sandbox.state().unwrap();
    assert_eq!(phase_of(&state), "staging_files");
    let run_id = state["run_id"].as_str().unwrap().to_string();
    let status = w
        .sandbox
        .spawn_args(&[
            "status",
            "--state-file",
            w.sandbox.state_path().to_str().unwrap(),
            "--log-format",
            "json",
        ])
        .wait(Duration::from_secs(20))
        .await;
    status.assert_code(0);
    let shown: Value = serde_json::from_str(status.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "status --log-format json printed no JSON ({e}): {}",
            status.stdout
        )
    });
    assert_eq!(shown["run_id"], Value::from(run_id.as_str()));
    assert_eq!(phase_of(&shown), "staging_files");

    w.sandbox.run(&[]).await.assert_code(0);
    assert_resumed(&w, &run_id).await;
    assert_no_staged_file_downloaded_twice(&w, &run_id, &state).await;
}

/// Starts a run and kills it while it polls the export; returns its run id.
async fn stuck_in_export_polling(w: &World) -> String {
    let mut child = w.sandbox.spawn(&[]);
    let s = w
        .sandbox
        .wait_for_state(&mut child, "export polling", Duration::from_secs(20), |s| {
            phase_of(s) == "polling_export"
        })
        .await;
    child.kill().await;
    s["run_id"].as_str().unwrap().to_string()
}

/// `cancel` ends an unfinished run (its export job is deleted at the source, exit 4); `--fresh`
/// abandons one the same way and starts a new run at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_fresh_clean_up_the_abandoned_export() {
    let w = world(
        SourceConfig {
            in_progress_polls: 100,
            progress_retry_after: RetryAfter::Seconds(1),
            ..SourceConfig::default()
        },
        0,
    )
    .await;
    let config = w.sandbox.config_path();
    let config = config.to_str().unwrap();
    let first = stuck_in_export_polling(&w).await;
    let status = w
        .sandbox
        .spawn_args(&["status", config])
        .wait(Duration::from_secs(20))
        .await;
    status.assert_code(0);
    assert!(status.stdout.contains(&first), "{}", status.stdout);
    assert!(
        status.stdout.contains("polling_export"),
        "{}",
        status.stdout
    );
    let cancelled = w
        .sandbox
        .spawn_args(&["cancel", config])
        .wait(Duration::from_secs(20))
        .await;
    cancelled.assert_code(4);
    assert_eq!(w.sandbox.phase(), "cancelled");
    assert_eq!(w.sandbox.run_id(), first);
    assert!(w.src.jobs()[0].deleted, "cancel deletes the export job");

    let second = stuck_in_export_polling(&w).await;
    assert_ne!(second, first, "a cancelled run is not resumed");
    assert!(!w.src.jobs()[1].deleted);
    w.src.update(|c| c.in_progress_polls = 0);
    w.sandbox.run(&["--fresh"]).await.assert_code(0);
    let third = w.sandbox.run_id();
    assert_ne!(third, second, "--fresh starts a new run");
    let jobs = w.src.jobs();
    assert_eq!(jobs.len(), 3);
    assert!(jobs.iter().all(|j| j.deleted), "every export job deleted");
    assert_eq!(w.sandbox.phase(), "succeeded");
    assert_pathling_holds_export(&w.pathling, &w.src);
}

// ---------------------------------------------------------------------------------------------
// Killed inside a file
// ---------------------------------------------------------------------------------------------

const PART: u64 = 5 * 1024 * 1024;

/// The bytes the checkpoint of the run's one staged file holds (0 without one).
async fn checkpointed(staging: &Staging, sandbox: &Sandbox) -> u64 {
    let objects = staging.objects(sandbox).await;
    objects
        .iter()
        .find(|(k, _)| k.contains("/.resume/") && k.ends_with(".ndjson.json"))
        .map_or(0, |(_, v)| {
            let c: Value = serde_json::from_slice(v).unwrap();
            c["stored"].as_u64().unwrap()
        })
}

/// One large file, SIGKILLed twice while it moves (each time once a part more is stored), then
/// run to the end: the staged file is byte-identical to the source's, each kill cost at most
/// a part (and a line) downloaded again when the source serves ranges, and without ranges the
/// upload still continues from its last part.
async fn killed_mid_file(ranges: bool) {
    killed_mid_file_then(ranges, false).await;
}

/// With `changed`, the source's file has another version (`ETag`) when the run continues: the
/// file starts over from the whole body the source then sends.
async fn killed_mid_file_then(ranges: bool, changed: bool) {
    let staging = Staging::s3().await;
    let mut sandbox = Sandbox::new();
    let src = FakeSource::start(SourceConfig {
        dataset: DatasetConfig::new(&[("Observation", 60_000, 1)]),
        in_progress_polls: 0,
        ranges,
        chunk_bytes: 64 * 1024,
        ..SourceConfig::default()
    })
    .await
    .unwrap();
    let allowed = staging.allowable_sources(&sandbox);
    let mut config = PathlingConfig::v9(&[allowed[0].as_str(), allowed[1].as_str()]);
    config.s3 = staging.pathling_s3();
    let pathling = FakePathling::start(config).await.unwrap();
    sandbox
        .configure(&src.base_url(), &pathling.base_url(), &staging)
        .set("transferPartSize", 5);
    // The source goes silent mid part 2, then just after part 3 begins: the kills come once
    // parts 1, then 1-2 are stored (and checkpointed).
    let kills: &[(u64, u64)] = if changed {
        &[(PART + PART / 2, PART)]
    } else {
        &[(PART + PART / 2, PART), (2 * PART + 1, 2 * PART)]
    };
    let mut run_id = None;
    for &(stall, stored) in kills {
        src.update(|c| c.stall_at = Some(stall));
        let mut child = sandbox.spawn(&[]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while checkpointed(&staging, &sandbox).await < stored {
            assert!(Instant::now() < deadline, "no checkpoint of {stored} bytes");
            assert!(child.child.try_wait().unwrap().is_none(), "the CLI ended");
            // Polling interval of a condition the CLI brings about.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(checkpointed(&staging, &sandbox).await, stored);
        let killed = child.kill().await;
        assert_eq!(killed.code, None, "killed by the signal");
        let id = sandbox.run_id();
        assert_eq!(run_id.get_or_insert(id.clone()), &id, "one run");
    }
    src.update(|c| {
        c.stall_at = None;
        c.file_version += u32::from(changed);
    });
    // The source's file, read whole while its export job still exists.
    let run_id = run_id.unwrap();
    let objects = staging.objects(&sandbox).await;
    let manifest: Value =
        serde_json::from_slice(&objects[&format!("{run_id}/manifest.json")]).unwrap();
    let url = manifest["files"][0]["url"].as_str().unwrap();
    let before = src.stats().file_bytes_sent;
    let served = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    let read_by_test = src.stats().file_bytes_sent - before;

    let out = sandbox.run(&[]).await;
    out.assert_code(0);
    assert_eq!(
        out.stderr
            .contains("continues after the 10485760 bytes an interrupted attempt stored"),
        !changed,
        "{}",
        out.stderr
    );
    assert_eq!(sandbox.run_id(), run_id);
    assert_pathling_holds_export(&pathling, &src);
    let sent = src.stats().file_bytes_sent - read_by_test;
    // Byte-identical to what the source serves.
    let objects = staging.objects(&sandbox).await;
    let staged = objects
        .iter()
        .find(|(k, _)| k.starts_with(&format!("{run_id}/output/")) && k.ends_with(".ndjson"))
        .map(|(_, v)| v)
        .expect("the staged file");
    assert!(
        staged[..] == served[..],
        "the staged file differs from the source's"
    );
    let len = staged.len() as u64;
    assert!(len > 3 * PART, "a file of more than three parts: {len}");
    assert!(
        objects.keys().all(|k| !k.contains(".resume")),
        "checkpoints left: {:?}",
        objects.keys().collect::<Vec<_>>()
    );
    let expected = src.expected_resources(&pathling_import_tests::data::ExportFilter::default());
    assert_staged(&staging, &sandbox, &run_id, 1, &expected).await;
    println!(
        "ranges {ranges}: file {len} B, sent {sent} B ({} B more than the file)",
        sent - len
    );
    if changed {
        // The If-Range answer was the whole new file, staged from its start.
        assert_eq!(sent, (PART + PART / 2) + len);
        assert_eq!(src.stats().ranges_served, 0);
    } else if ranges {
        // Each kill: what was sent after the last stored part (under a part), plus the start of
        // the line that part cut, sent again.
        let again = sent - len;
        assert!(again <= 2 * (PART / 2 + 4096), "{again} bytes sent again");
        assert_eq!(src.stats().ranges_served, 2);
    } else {
        // Without ranges each attempt reads from the start, but stores only what is new.
        assert_eq!(sent, (PART + PART / 2) + (2 * PART + 1) + len);
        assert_eq!(src.stats().ranges_served, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_file_continues_from_its_last_part_with_ranges() {
    killed_mid_file(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_file_continues_its_upload_without_ranges() {
    killed_mid_file(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_file_starts_over_when_the_source_file_changed() {
    killed_mid_file_then(true, true).await;
}
