//! End-to-end: what the CLI does with file content a source should never have served. An HTML
//! page answered with `200 OK` for an NDJSON file fails the run naming the file and the line,
//! and nothing of it is staged or counted; `VALIDATE=off` stages it as sent (Pathling then
//! judges it). A file URL the manifest lists twice is downloaded, staged and imported once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::*;
use pathling_import_tests::fake_pathling::{FakePathling, FakePathlingHandle, PathlingConfig};
use pathling_import_tests::fake_source::{FakeSource, FakeSourceHandle, SourceConfig, HTML_PAGE};
use serde_json::json;

/// The default dataset's second Observation file.
const BAD_FILE: &str = "Observation.1.ndjson";

struct World {
    sandbox: Sandbox,
    staging: Staging,
    src: FakeSourceHandle,
    pathling: FakePathlingHandle,
}

async fn world(source: SourceConfig) -> World {
    let mut sandbox = Sandbox::new();
    let staging = Staging::Dir;
    let src = FakeSource::start(SourceConfig {
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
    // One file at a time, so the order of events is fixed.
    sandbox
        .configure(&src.base_url(), &pathling.base_url(), &staging)
        .set("transferConcurrency", 1);
    World {
        sandbox,
        staging,
        src,
        pathling,
    }
}

fn html_source() -> SourceConfig {
    SourceConfig {
        html_files: BTreeSet::from([BAD_FILE.to_string()]),
        ..SourceConfig::default()
    }
}

/// The manifest row of a file name, and its staging key.
async fn row_of(w: &World, name: &str) -> (usize, String) {
    let run_id = w.sandbox.run_id();
    let names = manifest_file_names(&w.staging, &w.sandbox, &run_id).await;
    let index = names
        .iter()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("{name} is not in the manifest: {names:?}"));
    let type_name = name.split('.').next().unwrap();
    (
        index,
        format!("{run_id}/output/{index:06}-{type_name}.ndjson"),
    )
}

/// Every file under the staging directory, dot files (temp files) included.
fn all_files(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(all_files(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_html_body_fails_the_run_naming_the_file_and_line_and_nothing_of_it_is_staged() {
    let w = world(html_source()).await;
    let out = w.sandbox.run(&[]).await;
    out.assert_code(1);
    let (index, key) = row_of(&w, BAD_FILE).await;
    out.assert_stderr_contains(&format!(
        "download of output file #{index} (Observation): line 1 is not a JSON object: \
         \"<!DOCTYPE html>\""
    ));

    let state = w.sandbox.state().unwrap();
    assert_eq!(phase_of(&state), "failed");
    assert_eq!(state["state"]["in_phase"], json!("staging_files"));
    assert_eq!(
        state["state"]["cause"]["kind"]["kind"],
        json!("undecodable")
    );
    // A permanent failure: downloaded once, not retried.
    assert_eq!(w.src.file_attempts()[BAD_FILE], 1);
    assert_eq!(w.pathling.stats().import_kickoffs, 0, "nothing imported");

    // Nothing under its key, no temp file left, and its bytes are not in the summary.
    let objects = w.staging.objects(&w.sandbox).await;
    assert!(!objects.contains_key(&key), "{key} was staged");
    let leftovers: Vec<String> = all_files(&w.sandbox.staging_dir())
        .into_iter()
        .filter(|f| f.contains(".partial-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let run_id = w.sandbox.run_id();
    let staged: Vec<(&String, &Vec<u8>)> = objects
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{run_id}/output/")))
        .collect();
    // The other files went on, so a retry has only this one left to stage.
    let outputs = output_files(&w.src);
    assert_eq!(staged.len(), outputs - 1, "every other file is staged");
    let staged_bytes: usize = staged.iter().map(|(_, v)| v.len()).sum();
    let summary = &state["state"]["summary"];
    assert_eq!(summary["bytes"], json!(staged_bytes), "{summary}");
    assert_eq!(summary["files_staged"], json!(outputs - 1), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_validate_off_the_html_is_staged_as_sent_and_pathling_judges_it() {
    let mut w = world(html_source()).await;
    w.sandbox.set("validate", "off");
    let out = w.sandbox.run(&[]).await;
    // The fake Pathling, like the real one, refuses to import the page.
    out.assert_code(1).assert_stderr_contains("invalid JSON");
    let state = w.sandbox.state().unwrap();
    assert_ne!(
        state["state"]["in_phase"],
        json!("staging_files"),
        "{state}"
    );
    assert!(w.pathling.stats().import_kickoffs > 0);

    let (_, key) = row_of(&w, BAD_FILE).await;
    let objects = w.staging.objects(&w.sandbox).await;
    assert_eq!(
        objects
            .get(&key)
            .map(|v| String::from_utf8_lossy(v).into_owned()),
        Some(HTML_PAGE.to_string()),
        "the page is staged under its key as sent"
    );
    let summary = &state["state"]["summary"];
    assert_eq!(
        summary["files_staged"],
        json!(output_files(&w.src)),
        "{summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_url_listed_twice_is_staged_and_imported_once() {
    let repeated = "Patient.0.ndjson";
    let w = world(SourceConfig {
        repeat_in_manifest: BTreeSet::from([repeated.to_string()]),
        ..SourceConfig::default()
    })
    .await;
    let out = w.sandbox.run(&[]).await;
    out.assert_code(0);
    let report = format!("{}{}", out.stdout, out.stderr);
    assert!(
        report.contains("1 duplicate file URL(s) in the manifest staged once"),
        "{report}"
    );

    assert_eq!(w.src.file_attempts()[repeated], 1, "downloaded once");
    let run_id = w.sandbox.run_id();
    let files = output_files(&w.src);
    assert_eq!(
        manifest_file_names(&w.staging, &w.sandbox, &run_id)
            .await
            .len(),
        files
    );
    let expected = w
        .src
        .expected_resources(&pathling_import_tests::data::ExportFilter::default());
    assert_staged(&w.staging, &w.sandbox, &run_id, files, &expected).await;

    let inputs: Vec<String> = w
        .pathling
        .jobs()
        .iter()
        .flat_map(|j| j.inputs.iter().map(|i| i.original_url.clone()))
        .collect();
    let distinct: BTreeSet<&String> = inputs.iter().collect();
    assert_eq!(inputs.len(), files, "{inputs:?}");
    assert_eq!(distinct.len(), files, "an input imported twice: {inputs:?}");
    assert_pathling_holds_export(&w.pathling, &w.src);

    let state = w.sandbox.state().unwrap();
    assert_eq!(phase_of(&state), "succeeded");
    assert_eq!(state["state"]["duplicate_urls"], json!(1));
    assert_eq!(state["state"]["files"], json!(files));
}
