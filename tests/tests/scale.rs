//! Scale: a 100,000-file export through the real `pathling-import` binary. The state file
//! stays small at every save and is written a bounded number of times (by time, not by
//! files); every file is downloaded once and imported once.
//!
//! The linear growth of all state writes with the files (10,000 against 100,000) is shown
//! deterministically by the simulation (`runners/tests/simulation.rs`); the single Lambda and
//! the Step Functions task have their 100,000-file tests in `lambda_dynamo.rs` and
//! `sfn_task.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use pathling_import_tests::data::DatasetConfig;
use pathling_import_tests::fake_pathling::{FakePathling, PathlingConfig};
use pathling_import_tests::fake_source::{FakeSource, SourceConfig};
use std::time::Duration;

const FILES: u32 = 100_000;
const BUDGET: u64 = 16 * 1024;

/// `state file written N time(s), B bytes in all, L at most`, from the CLI's log.
fn state_writes(stderr: &str) -> (u64, u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.contains("state file written"))
        .unwrap_or_else(|| panic!("no state write summary in:\n{stderr}"));
    let at = line.find("state file written").unwrap();
    let n: Vec<u64> = line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse().unwrap())
        .collect();
    assert!(n.len() >= 3, "{line}");
    (n[0], n[1], n[2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_100000_file_export_through_the_cli_writes_small_state_a_bounded_number_of_times() {
    let mut sandbox = Sandbox::new();
    let src = FakeSource::start(SourceConfig {
        dataset: DatasetConfig::new(&[("Observation", u64::from(FILES), FILES)]),
        in_progress_polls: 0,
        ..SourceConfig::default()
    })
    .await
    .unwrap();
    let staging = Staging::Dir;
    let allowed = staging.allowable_sources(&sandbox);
    let pathling = FakePathling::start(PathlingConfig::v9(&[allowed[0].as_str()]))
        .await
        .unwrap();
    sandbox
        .configure(&src.base_url(), &pathling.base_url(), &staging)
        .set("transferConcurrency", 8);

    let out = sandbox.spawn(&[]).wait(Duration::from_secs(900)).await;
    out.assert_code(0);
    let (writes, bytes, largest) = state_writes(&out.stderr);
    let secs = out.elapsed.as_secs();
    println!(
        "{FILES} files through the CLI in {secs} s: the state file written {writes} times, \
         {bytes} bytes in all ({:.1} bytes per file), largest write {largest} bytes",
        bytes as f64 / f64::from(FILES)
    );
    assert!(largest <= BUDGET, "a state write of {largest} bytes");
    // One write a second at most while files move, plus one per phase change and wait.
    assert!(writes <= secs + 30, "{writes} writes in {secs} s");
    assert!(bytes <= writes * BUDGET);
    let final_size = std::fs::metadata(sandbox.state_path()).unwrap().len();
    assert!(final_size <= BUDGET, "{final_size} bytes");

    assert_eq!(sandbox.phase(), "succeeded");
    assert_eq!(
        src.stats().files_completed,
        u64::from(FILES),
        "each file once"
    );
    assert_eq!(pathling.resource_count("Observation"), FILES as usize);
    assert_eq!(pathling.stats().import_kickoffs, 1);
}
