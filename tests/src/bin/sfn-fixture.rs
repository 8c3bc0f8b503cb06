//! `sfn-fixture`: the fake Bulk Data source and fake Pathling for the Step Functions tests
//! (`tests/asl/run.mjs`), configured per scenario.
//!
//! Usage: `sfn-fixture '<scenario JSON>'`. Prints one JSON line once everything listens:
//! `{"source": URL, "target": URL, "control": URL, "client_id", "client_secret",
//! "expected": {"Patient": 20, ...}}`, then serves until stdin reaches end-of-file or SIGTERM.
//! `GET {control}/stats` answers what the client did (kick-offs, polls, downloads, job
//! deletes) and what Pathling now holds (resources per type, import requests).
//!
//! Scenario members (all optional):
//! - `types`: `[["Patient", 20, 1], ...]` (type, resources, files); `[]` exports nothing.
//! - `in_progress_polls` (default 1), `retry_after` seconds on 202 answers (default 1).
//! - `latency_ms`: delay before every source request (slows the transfer down).
//! - `kickoff_error`: `[status, "diagnostics"]`: every export kick-off fails so.
//! - `pathling_generation`: 7 or 9 (default 9); `import_duration_polls` (default 1).
//! - `s3_endpoint`, `bucket`: Pathling reads `s3://bucket/` and `s3a://bucket/` from there.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use pathling_import_tests::auth::AuthConfig;
use pathling_import_tests::data::DatasetConfig;
use pathling_import_tests::fake_pathling::{
    FakePathling, FakePathlingHandle, Generation, PathlingConfig, S3Access,
};
use pathling_import_tests::fake_source::{FakeSource, FakeSourceHandle, HttpFailure, SourceConfig};
use pathling_import_tests::fhir::RetryAfter;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt as _;

const CLIENT_ID: &str = "sfn-client";
const CLIENT_SECRET: &str = "sfn-secret";

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Scenario {
    types: Option<Vec<(String, u64, u32)>>,
    in_progress_polls: Option<u32>,
    retry_after: Option<u64>,
    latency_ms: Option<u64>,
    kickoff_error: Option<(u16, String)>,
    pathling_generation: Option<u8>,
    import_duration_polls: Option<u32>,
    s3_endpoint: Option<String>,
    bucket: Option<String>,
    /// Files (`{Type}.{k}.ndjson`) the manifest lists but whose downloads answer 404.
    lost_files: Option<Vec<String>>,
    /// Serve files as an object store does: ranges, a strong `ETag`, `Content-Length`, no
    /// compression.
    ranges: Option<bool>,
}

struct Servers {
    source: FakeSourceHandle,
    target: FakePathlingHandle,
}

async fn stats(State(servers): State<Arc<Servers>>) -> Json<Value> {
    let s = servers.source.stats();
    let p = servers.target.stats();
    let resources: BTreeMap<String, usize> = servers
        .target
        .resources()
        .iter()
        .map(|(t, by_id)| (t.clone(), by_id.len()))
        .collect();
    let imports: Vec<Value> = servers
        .target
        .import_requests()
        .into_iter()
        .map(|r| json!({"status": r.status, "body": r.body}))
        .collect();
    let last_kickoff = servers
        .source
        .last_kickoff()
        .map(|k| json!({"params": k.params, "status": k.status}));
    Json(json!({
        "last_kickoff": last_kickoff,
        "source": {
            "kickoffs": s.kickoffs,
            "kickoffs_accepted": s.kickoffs_accepted,
            "polls": s.polls,
            "manifests": s.manifests,
            "job_deletes": s.job_deletes,
            "file_gets": s.file_gets,
            "files_completed": s.files_completed,
            "ranges_served": s.ranges_served,
            "file_attempts": servers.source.file_attempts(),
        },
        "pathling": {
            "resources": resources,
            "total": servers.target.total_resources(),
            "import_kickoffs": p.import_kickoffs,
            "imports_accepted": p.imports_accepted,
            "jobs_completed": p.jobs_completed,
            "job_polls": p.job_polls,
            "imports": imports,
        },
    }))
}

async fn wait_for_stop() {
    let stdin_closed = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 256];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = stdin_closed => {}
        _ = terminate => {}
    }
}

fn main() -> ExitCode {
    let scenario: Scenario = match std::env::args().nth(1).as_deref().map(serde_json::from_str) {
        Some(Ok(s)) => s,
        None => Scenario::default(),
        Some(Err(e)) => {
            eprintln!("sfn-fixture: bad scenario: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sfn-fixture: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(scenario));
    // The stdin reader sits in a blocking thread; do not wait for it.
    runtime.shutdown_timeout(Duration::from_millis(200));
    code
}

async fn run(scenario: Scenario) -> ExitCode {
    let types = scenario.types.unwrap_or_else(|| {
        vec![
            ("Patient".into(), 20, 1),
            ("Observation".into(), 60, 2),
            ("Condition".into(), 30, 1),
        ]
    });
    let spec: Vec<(&str, u64, u32)> = types.iter().map(|(t, n, f)| (t.as_str(), *n, *f)).collect();
    let expected: BTreeMap<&str, u64> = spec.iter().map(|(t, n, _)| (*t, *n)).collect();
    let source_config = SourceConfig {
        dataset: DatasetConfig::new(&spec),
        auth: Some(AuthConfig::client_secret_basic(CLIENT_ID, CLIENT_SECRET)),
        requires_access_token: true,
        in_progress_polls: scenario.in_progress_polls.unwrap_or(1),
        progress_retry_after: RetryAfter::Seconds(scenario.retry_after.unwrap_or(1)),
        kickoff_error: scenario
            .kickoff_error
            .map(|(status, text)| HttpFailure::new(status, "processing", &text)),
        latency: Duration::from_millis(scenario.latency_ms.unwrap_or(0)),
        lost_files: scenario
            .lost_files
            .unwrap_or_default()
            .into_iter()
            .collect(),
        ranges: scenario.ranges.unwrap_or(false),
        gzip_when_asked: !scenario.ranges.unwrap_or(false),
        ..SourceConfig::default()
    };
    let source = match FakeSource::start(source_config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sfn-fixture: cannot start the fake source: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut allowed = vec!["file:///".to_string()];
    if let Some(bucket) = &scenario.bucket {
        allowed.push(format!("s3://{bucket}/"));
        allowed.push(format!("s3a://{bucket}/"));
    }
    let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
    let target_config = PathlingConfig {
        generation: match scenario.pathling_generation {
            Some(7) => Generation::V7,
            _ => Generation::V9,
        },
        s3: scenario
            .s3_endpoint
            .as_deref()
            .map(|e| S3Access::new(e, "test", "test")),
        import_duration_polls: scenario.import_duration_polls.unwrap_or(1),
        ..PathlingConfig::v9(&allowed)
    };
    let target = match FakePathling::start(target_config).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sfn-fixture: cannot start the fake Pathling: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sfn-fixture: cannot bind the control port: {e}");
            return ExitCode::FAILURE;
        }
    };
    let control = match listener.local_addr() {
        Ok(a) => format!("http://{a}"),
        Err(e) => {
            eprintln!("sfn-fixture: {e}");
            return ExitCode::FAILURE;
        }
    };
    let line = json!({
        "source": source.base_url(),
        "target": target.base_url(),
        "control": control,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "expected": expected,
    });
    let servers = Arc::new(Servers { source, target });
    let app = Router::new()
        .route("/stats", get(stats))
        .with_state(servers.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    println!("{line}");
    wait_for_stop().await;
    server.abort();
    ExitCode::SUCCESS
}
