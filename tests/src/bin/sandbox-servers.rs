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
//! Options: `--pathling-generation 7|9` (default 9), `--no-source-auth`, `--state FILE`.
//!
//! With `--state FILE` the servers come back as they were: they listen on the ports recorded
//! there (free ports the first time) and take over the export and import jobs recorded when
//! they last stopped, so that a run interrupted with Ctrl-C finds its export job, its files and
//! its import job again when the sandbox is started anew. The file is written when the servers
//! stop (stdin closed, SIGTERM or Ctrl-C); the data Pathling imported is not kept.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use pathling_import_tests::auth::AuthConfig;
use pathling_import_tests::data::DatasetConfig;
use pathling_import_tests::fake_pathling::{FakePathling, Generation, PathlingConfig};
use pathling_import_tests::fake_source::{FakeSource, SourceConfig};
use pathling_import_tests::fhir::RetryAfter;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt as _;

const CLIENT_ID: &str = "sandbox-client";
const CLIENT_SECRET: &str = "sandbox-secret";

struct Options {
    generation: Generation,
    source_auth: bool,
    state: Option<PathBuf>,
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        generation: Generation::V9,
        source_auth: true,
        state: None,
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
            "--state" => match args.next() {
                Some(path) => opts.state = Some(PathBuf::from(path)),
                None => return Err("--state takes a file name".into()),
            },
            "-h" | "--help" => {
                return Err(
                    "usage: sandbox-servers [--pathling-generation 7|9] [--no-source-auth] [--state FILE]".into(),
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
    let saved = match &opts.state {
        Some(path) => match load_state(path) {
            Ok(saved) => saved,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
        None => Value::Null,
    };
    let port = |key: &str| {
        saved
            .get(key)
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(0)
    };
    let in_use = |what: &str, e: std::io::Error| {
        let hint = match &opts.state {
            Some(path) if !saved.is_null() => format!(
                " (the port recorded in {}: is another sandbox running? Stop it, or delete \
                 that file to start on new ports)",
                path.display()
            ),
            _ => String::new(),
        };
        eprintln!("cannot start the fake {what}: {e}{hint}");
        ExitCode::FAILURE
    };
    let source = match FakeSource::start_at(
        source_config,
        port("source_port"),
        port("storage_port"),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => return in_use("source", e),
    };
    source.restore_jobs(&saved["source_jobs"]);
    let target_config = PathlingConfig {
        generation: opts.generation,
        ..PathlingConfig::v9(&["file:///"])
    };
    let target = match FakePathling::start_at(target_config, port("target_port")).await {
        Ok(t) => t,
        Err(e) => return in_use("Pathling", e),
    };
    target.restore_jobs(&saved["target_jobs"]);
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
    let ports = (source.port(), source.storage_port(), target.port());
    // Stopped first, so that nothing is accepted after the snapshot.
    let source_jobs = source.shutdown_with_jobs().await;
    let target_jobs = target.shutdown_with_jobs().await;
    if let Some(path) = &opts.state {
        let state = json!({
            "source_port": ports.0,
            "storage_port": ports.1,
            "target_port": ports.2,
            "source_jobs": source_jobs,
            "target_jobs": target_jobs,
        });
        if let Err(e) = save_state(path, &state) {
            eprintln!(
                "cannot save the sandbox servers' state to {}: {e}",
                path.display()
            );
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// The saved state, or `null` when there is none yet.
fn load_state(path: &Path) -> Result<Value, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "{} is not a sandbox servers' state ({e}); delete it to start anew",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Value::Null),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Written beside and renamed, so an interrupted save leaves the previous state.
fn save_state(path: &Path, state: &Value) -> std::io::Result<()> {
    let temp = path.with_extension("json.tmp");
    std::fs::write(&temp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&temp, path)
}
