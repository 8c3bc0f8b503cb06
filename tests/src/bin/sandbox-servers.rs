//! `sandbox-servers`: runs a fake Bulk Data source and a fake Pathling for demos and manual
//! testing, on `127.0.0.1` with free ports.
//!
//! Prints one JSON line to stdout once both listen, e.g.
//! `{"source": "http://127.0.0.1:PORT/fhir", "target": "http://127.0.0.1:PORT/fhir", ...}`,
//! then serves until stdin reaches end-of-file, or SIGTERM / Ctrl-C arrives.
//!
//! The source has 3 types (200 Patients, 400 Observations in 2 files, 300 Conditions),
//! answers 202 twice with `Retry-After: 1`, and requires `client_secret_basic` with client id
//! `sandbox-client` and secret `sandbox-secret`. The target is a Pathling 9 that imports from
//! any `file:///` URL without auth.
//!
//! Options: `--pathling-generation 7|9` (default 9), `--no-source-auth`.

use std::process::ExitCode;

use pathling_import_tests::auth::AuthConfig;
use pathling_import_tests::data::DatasetConfig;
use pathling_import_tests::fake_pathling::{FakePathling, Generation, PathlingConfig};
use pathling_import_tests::fake_source::{FakeSource, SourceConfig};
use pathling_import_tests::fhir::RetryAfter;
use serde_json::json;
use tokio::io::AsyncReadExt as _;

const CLIENT_ID: &str = "sandbox-client";
const CLIENT_SECRET: &str = "sandbox-secret";

struct Options {
    generation: Generation,
    source_auth: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        generation: Generation::V9,
        source_auth: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--pathling-generation" => {
                opts.generation = match args.next().as_deref() {
                    Some("7") => Generation::V7,
                    Some("9") => Generation::V9,
                    other => {
                        return Err(format!("--pathling-generation takes 7 or 9, got {other:?}"))
                    }
                }
            }
            "--no-source-auth" => opts.source_auth = false,
            "-h" | "--help" => {
                return Err(
                    "usage: sandbox-servers [--pathling-generation 7|9] [--no-source-auth]".into(),
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(opts)
}

async fn wait_for_stop() {
    let stdin_closed = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        // Any read error counts as closed: nobody is left to talk to.
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = stdin_closed => {}
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run());
    // The stdin reader sits in a blocking thread that a plain runtime drop would wait for
    // until stdin closes, so a SIGTERM would never end the process.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}

async fn run() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let source_config = SourceConfig {
        dataset: DatasetConfig::new(&[
            ("Patient", 200, 1),
            ("Observation", 400, 2),
            ("Condition", 300, 1),
        ]),
        auth: opts
            .source_auth
            .then(|| AuthConfig::client_secret_basic(CLIENT_ID, CLIENT_SECRET)),
        requires_access_token: opts.source_auth,
        in_progress_polls: 2,
        progress_retry_after: RetryAfter::Seconds(1),
        ..SourceConfig::default()
    };
    let source = match FakeSource::start(source_config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot start the fake source: {e}");
            return ExitCode::FAILURE;
        }
    };
    let target_config = PathlingConfig {
        generation: opts.generation,
        ..PathlingConfig::v9(&["file:///"])
    };
    let target = match FakePathling::start(target_config).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot start the fake Pathling: {e}");
            return ExitCode::FAILURE;
        }
    };
    let line = json!({
        "source": source.base_url(),
        "target": target.base_url(),
        "source_token_endpoint": opts.source_auth.then(|| source.token_url()),
        "source_client_id": opts.source_auth.then_some(CLIENT_ID),
        "source_client_secret": opts.source_auth.then_some(CLIENT_SECRET),
        "source_storage_origin": source.storage_origin(),
        "target_generation": match opts.generation { Generation::V7 => 7, Generation::V9 => 9 },
        "target_allowable_sources": ["file:///"],
    });
    println!("{line}");
    wait_for_stop().await;
    source.shutdown().await;
    target.shutdown().await;
    ExitCode::SUCCESS
}
