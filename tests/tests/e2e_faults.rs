//! End-to-end: faults a real Bulk Data source produces are survived with nothing lost —
//! throttling with an epoch `Retry-After`, transient 5xx, connections reset mid-file, gzip and
//! chunked bodies, files without a final newline, redirects and pre-signed URLs on another
//! origin, `requiresAccessToken: false`, and tokens expiring during a long transfer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use pathling_import_tests::data::{DatasetConfig, ExportFilter};
use pathling_import_tests::fake_pathling::{FakePathling, FakePathlingHandle, PathlingConfig};
use pathling_import_tests::fake_source::{
    FakeSource, FakeSourceHandle, FileRouting, ResetKnob, SourceConfig,
};
use pathling_import_tests::fhir::RetryAfter;
use serde_json::json;

struct World {
    sandbox: Sandbox,
    staging: Staging,
    src: FakeSourceHandle,
    pathling: FakePathlingHandle,
}

async fn world(source: SourceConfig) -> World {
    let mut sandbox = Sandbox::new();
    let staging = Staging::Dir;
    let auth = SourceAuth::basic();
    let src = FakeSource::start(SourceConfig {
        auth: Some(auth.fake.clone()),
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
        staging,
        src,
        pathling,
    }
}

/// Success with nothing lost: Pathling and the staged objects hold exactly the export.
async fn assert_complete(w: &World) {
    assert_eq!(w.sandbox.phase(), "succeeded");
    assert_pathling_holds_export(&w.pathling, &w.src);
    let expected = w.src.expected_resources(&ExportFilter::default());
    let run_id = w.sandbox.run_id();
    assert_staged(
        &w.staging,
        &w.sandbox,
        &run_id,
        output_files(&w.src),
        &expected,
    )
    .await;
    let state = w.sandbox.state().unwrap();
    assert_eq!(state["state"]["resources"], json!(expected.len()));
    assert!(w.src.jobs().iter().all(|j| j.deleted));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_polls_with_an_epoch_retry_after() {
    // An epoch-seconds Retry-After two seconds ahead. Read as a delay it would be ~55 years
    // (clamped to retryAfterMax, an hour): the run would never finish in time.
    let w = world(SourceConfig {
        throttle_polls: BTreeSet::from([1, 2]),
        throttle_retry_after: RetryAfter::EpochSeconds(2),
        in_progress_polls: 1,
        progress_retry_after: RetryAfter::Seconds(1),
        ..SourceConfig::default()
    })
    .await;
    let out = w.sandbox.spawn(&[]).wait(Duration::from_secs(30)).await;
    out.assert_code(0);
    let stats = w.src.stats();
    assert_eq!(stats.throttled, 2);
    assert_eq!(stats.kickoffs, 1);
    assert!(
        out.elapsed >= Duration::from_secs(2),
        "the Retry-After was not honoured: {:?}",
        out.elapsed
    );
    assert_complete(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_server_errors_at_kickoff_and_polling() {
    let w = world(SourceConfig {
        kickoff_transient_failures: 1,
        transient_error_polls: BTreeSet::from([1, 2]),
        transient_error_status: 500,
        throttle_retry_after: RetryAfter::Omit,
        in_progress_polls: 1,
        progress_retry_after: RetryAfter::Seconds(1),
        ..SourceConfig::default()
    })
    .await;
    w.sandbox.run(&[]).await.assert_code(0);
    let stats = w.src.stats();
    assert_eq!(stats.kickoffs, 2, "one refused transiently, one accepted");
    assert_eq!(stats.kickoffs_accepted, 1);
    assert_eq!(stats.transient_errors, 2);
    assert_complete(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets_mid_file_lose_nothing() {
    let w = world(SourceConfig {
        in_progress_polls: 0,
        reset: Some(ResetKnob {
            after_bytes: 1500,
            first_attempts: 2,
        }),
        chunk_bytes: 512,
        ..SourceConfig::default()
    })
    .await;
    w.sandbox.run(&[]).await.assert_code(0);
    let files = output_files(&w.src);
    let stats = w.src.stats();
    assert_eq!(stats.resets_injected as usize, 2 * files);
    assert_eq!(stats.files_completed as usize, files);
    let attempts = w.src.file_attempts();
    assert!(attempts.values().all(|n| *n == 3), "{attempts:?}");
    // The partial bodies of the broken attempts left no trace in the staged objects.
    assert_complete(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_chunked_files_without_final_newline_keep_every_line() {
    let w = world(SourceConfig {
        in_progress_polls: 0,
        dataset: DatasetConfig::new(&[
            ("Patient", 30, 3),
            ("Observation", 90, 3),
            ("Condition", 7, 1),
        ]),
        gzip_when_asked: true,
        no_trailing_newline: true,
        chunk_bytes: 100,
        ..SourceConfig::default()
    })
    .await;
    w.sandbox.run(&[]).await.assert_code(0);
    // Counted per type: a joined line would count one resource short (and be invalid JSON).
    let state = w.sandbox.state().unwrap();
    let mut by_type = BTreeMap::new();
    for (t, _) in w.src.expected_resources(&ExportFilter::default()).keys() {
        *by_type.entry(t.clone()).or_insert(0u64) += 1;
    }
    assert_eq!(state["state"]["resources_by_type"], json!(by_type));
    assert_complete(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_to_presigned_storage_drops_the_token() {
    let w = world(SourceConfig {
        in_progress_polls: 0,
        requires_access_token: true,
        file_routing: FileRouting::Redirect,
        ..SourceConfig::default()
    })
    .await;
    w.sandbox.run(&[]).await.assert_code(0);
    let files = output_files(&w.src) as u64;
    let stats = w.src.stats();
    // The FHIR origin got the token (it requires it) and redirected ...
    assert_eq!(stats.file_gets, files);
    assert_eq!(stats.file_gets_with_authorization, files);
    assert_eq!(stats.redirects, files);
    // ... and the storage origin never saw it.
    assert_eq!(stats.storage_gets, files);
    assert_eq!(stats.storage_rejected_authorization, 0);
    assert_eq!(stats.storage_bad_signature, 0);
    assert_complete(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_manifest_urls_get_no_token() {
    let w = world(SourceConfig {
        in_progress_polls: 0,
        requires_access_token: true,
        file_routing: FileRouting::Presigned,
        ..SourceConfig::default()
    })
    .await;
    w.sandbox.run(&[]).await.assert_code(0);
    let files = output_files(&w.src) as u64;
    let stats = w.src.stats();
    assert_eq!(stats.file_gets, 0);
    assert_eq!(stats.storage_gets, files);
    assert_eq!(stats.storage_rejected_authorization, 0);
    assert_eq!(stats.storage_bad_signature, 0);
    assert_complete(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_on_file_downloads_unless_required() {
    let w = world(SourceConfig {
        in_progress_polls: 0,
        requires_access_token: false,
        ..SourceConfig::default()
    })
    .await;
    w.sandbox.run(&[]).await.assert_code(0);
    let stats = w.src.stats();
    assert_eq!(stats.file_gets as usize, output_files(&w.src));
    assert_eq!(stats.file_gets_with_authorization, 0);
    // The export itself was authenticated.
    assert!(w.src.kickoffs().iter().all(|k| k.authorization_sent));
    assert_complete(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expiring_during_a_long_transfer_are_renewed() {
    let mut w = world(SourceConfig {
        in_progress_polls: 0,
        requires_access_token: true,
        dataset: DatasetConfig::new(&[("Patient", 30, 6), ("Observation", 60, 12)]),
        latency: Duration::from_millis(250),
        ..SourceConfig::default()
    })
    .await;
    w.src.update(|c| {
        c.auth.as_mut().unwrap().token_lifetime = Duration::from_secs(2);
    });
    w.sandbox.set("transferConcurrency", 1);
    let out = w.sandbox.run(&[]).await;
    out.assert_code(0);
    assert!(
        out.elapsed > Duration::from_secs(4),
        "the transfer must outlive two token lifetimes ({:?})",
        out.elapsed
    );
    let auth = w.src.auth_stats();
    assert!(
        auth.tokens_issued >= 3,
        "tokens issued: {}",
        auth.tokens_issued
    );
    assert_eq!(
        w.src.stats().file_gets_with_authorization,
        w.src.stats().file_gets
    );
    assert_complete(&w).await;
}
