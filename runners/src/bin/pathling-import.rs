//! `pathling-import`: runs a complete, resumable sync from a FHIR Bulk Data source into
//! Pathling on this machine. See the README for configuration and exit codes.

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use pathling_import_core::config::{self, Config, RawConfig};
use pathling_import_core::effect::{Effect, EffectResult, Input, Next, Request};
use pathling_import_core::plan::{latest, next_run, NextRun};
use pathling_import_core::state::{FileStatus, SyncState};
use pathling_import_core::{SyncRun, Terminal, Watermark};
use pathling_import_runners::driver::{
    self, DriveOptions, LogObserver, Observer, RunStore, Stopped, SystemClock,
};
use pathling_import_runners::executor::{now, Counters, Executor};
use pathling_import_runners::file_store::{FileStore, FileStoreError, Stored};
use pathling_import_runners::report;
use pathling_import_runners::resume::{admit, Admitted, Refused};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DEFAULT_CONFIG: &str = "pathling-import.config.json";
const DEFAULT_STATE: &str = "pathling-import.state.json";
const DEFAULT_STAGING_DIR: &str = "pathling-import-staging";
/// Runner-only configuration keys (also accepted in the JSON file, as `stateFile`).
const EXTRA_KEYS: &[&str] = &["STATE_FILE"];
/// Without a terminal, staging progress is logged this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Exit codes: distinct for every way a run can end.
mod exit {
    pub const IMPORTED: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const BAD_CONFIG: u8 = 2;
    pub const NOTHING_TO_IMPORT: u8 = 3;
    pub const CANCELLED: u8 = 4;
    pub const INTERRUPTED: u8 = 130;
}

/// Keeps an analytics copy of FHIR data fresh: Bulk Data $export from a FHIR server, staging
/// to S3 or a local directory, Pathling $import.
///
/// Configuration comes from CONFIG (a JSON file with lowerCamelCase keys, e.g.
/// "sourceEndpoint"), else from ./pathling-import.config.json when present, else from
/// environment variables (SOURCE_ENDPOINT, TARGET_ENDPOINT, STAGING_URL, ...); the README
/// lists every key. The run is saved to a state file after every step: run the same command
/// again after an interruption, or after a failure once its cause is fixed, and it continues
/// where it stopped.
///
/// Exit codes: 0 imported, 3 succeeded with nothing to import, 1 the run failed, 2 bad
/// configuration or arguments, 4 cancelled, 130 interrupted by Ctrl-C or SIGTERM (resumable).
#[derive(Parser, Debug)]
#[command(
    name = "pathling-import",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args, Debug, Clone)]
struct Common {
    /// JSON configuration file (lowerCamelCase keys). A file that is named but missing or
    /// broken is an error, never a silent fallback to the environment.
    config: Option<PathBuf>,
    /// Where the run is persisted [default: STATE_FILE, else ./pathling-import.state.json].
    #[arg(long, value_name = "PATH")]
    state_file: Option<PathBuf>,
    /// Log format when not showing a progress display (json: one JSON object per line, and
    /// nothing else).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(clap::Args, Debug, Clone)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// Replace an unfinished or failed run with a new one (its export job is deleted at the
    /// source first); also replaces a corrupt state file.
    #[arg(long)]
    fresh: bool,
    /// Continue the stored run with the configured endpoints, credentials and staging
    /// location although they differ from the ones it was started with (lists what differs).
    #[arg(long)]
    rebind: bool,
    /// Never show the progress display, even on a terminal.
    #[arg(long)]
    no_progress: bool,
}

#[derive(clap::Args, Debug, Clone)]
struct RetryArgs {
    #[command(flatten)]
    common: Common,
    /// As for `run`.
    #[arg(long)]
    rebind: bool,
    /// Never show the progress display, even on a terminal.
    #[arg(long)]
    no_progress: bool,
}

#[derive(clap::Args, Debug, Clone)]
struct CancelArgs {
    #[command(flatten)]
    common: Common,
    /// Cancel with the configured settings although the run was started with others.
    #[arg(long)]
    rebind: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run (or resume) the sync. The default when no subcommand is given.
    Run(RunArgs),
    /// Continue a failed run from where it failed (its staged files are kept), after the
    /// cause is fixed. A plain run does the same; `retry` refuses to start a new run.
    Retry(RetryArgs),
    /// Show the current or last run from the state file (also while a run is in progress),
    /// as JSON with --log-format json.
    Status(Common),
    /// Cancel the unfinished run (its export job is deleted at the source), or abandon a
    /// failed one; clears a corrupt state file.
    Cancel(CancelArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            None => run(cli.run, false).await,
            Some(Command::Run(args)) => run(args, false).await,
            Some(Command::Retry(args)) => {
                let args = RunArgs {
                    common: args.common,
                    fresh: false,
                    rebind: args.rebind,
                    no_progress: args.no_progress,
                };
                run(args, true).await
            }
            Some(Command::Status(common)) => status(common),
            Some(Command::Cancel(args)) => cancel(args).await,
        }
    });
    ExitCode::from(code)
}

/// Messages for the user: plain lines on stderr, or — with `--log-format json` — JSON log
/// events like everything else, so a JSON consumer never meets a plain-text line.
#[derive(Clone, Copy)]
struct Out {
    json: bool,
}

impl Out {
    fn error(&self, text: &str) {
        if self.json {
            tracing::error!("{text}");
        } else {
            eprintln!("error: {text}");
        }
    }
    fn warn(&self, text: &str) {
        if self.json {
            tracing::warn!("{text}");
        } else {
            eprintln!("warning: {text}");
        }
    }
    fn say(&self, text: &str) {
        if self.json {
            tracing::info!("{text}");
        } else {
            eprintln!("{text}");
        }
    }
}

fn init_logging(format: LogFormat, quiet: bool) -> Out {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("PATHLING_IMPORT_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(if quiet { "warn" } else { "info" })
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only where a terminal renders them.
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    Out {
        json: format == LogFormat::Json,
    }
}

/// Loads configuration as the original did: a named file, else the default file when present,
/// else the environment. Problems are reported together, naming each key.
fn load_config(common: &Common, out: Out) -> Result<Config, u8> {
    let (raw, from) = match &common.config {
        Some(path) => (read_config_file(path, out)?, path.display().to_string()),
        None if Path::new(DEFAULT_CONFIG).exists() => (
            read_config_file(Path::new(DEFAULT_CONFIG), out)?,
            DEFAULT_CONFIG.to_string(),
        ),
        None => (
            RawConfig::from_env(std::env::vars(), EXTRA_KEYS),
            "the environment".to_string(),
        ),
    };
    let mut raw = raw;
    if let Ok(cwd) = std::env::current_dir() {
        if let Ok(url) = url::Url::from_directory_path(cwd.join(DEFAULT_STAGING_DIR)) {
            raw.set_default("STAGING_URL", url.as_str());
        }
    }
    config::parse(&raw, EXTRA_KEYS).map_err(|e| {
        out.error(&format!(
            "configuration from {from} is {}",
            e.to_string().trim_end()
        ));
        report::capture_error(
            "cli",
            &format!("invalid configuration: {} problem(s)", e.problems.len()),
        );
        exit::BAD_CONFIG
    })
}

fn read_config_file(path: &Path, out: Out) -> Result<RawConfig, u8> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(RawConfig::from_json(&text, EXTRA_KEYS)),
        Err(e) => {
            out.error(&format!(
                "cannot read configuration file {}: {e}",
                path.display()
            ));
            Err(exit::BAD_CONFIG)
        }
    }
}

fn state_path(common: &Common, config: Option<&Config>) -> PathBuf {
    common
        .state_file
        .clone()
        .or_else(|| {
            config
                .and_then(|c| c.extras.get("STATE_FILE"))
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE))
}

fn open_store(path: &Path, out: Out) -> Result<(FileStore, Stored), u8> {
    FileStore::open(path).map_err(|e| {
        match &e {
            FileStoreError::Locked(_) => {
                out.error(&format!("{e}; `pathling-import status` shows its progress"))
            }
            FileStoreError::Io { .. } => out.error(&e.to_string()),
        }
        exit::FAILED
    })
}

/// A corrupt state file: `--fresh` and `cancel` replace it after saying what is lost.
fn corrupt_notice(
    path: &Path,
    state: &pathling_import_runners::file_store::CorruptState,
) -> String {
    let kept = match &state.watermark {
        Some(w) => format!(
            "the incremental starting point ({}) is kept",
            w.transaction_time
        ),
        None => "no incremental starting point could be read from it".to_string(),
    };
    format!(
        "{} cannot be read ({}); the run it held is lost (an export job it started is left to \
         expire at the source), and {kept}",
        path.display(),
        state.error
    )
}

async fn run(args: RunArgs, retry_only: bool) -> u8 {
    let show_progress = !args.no_progress
        && args.common.log_format == LogFormat::Text
        && std::io::stderr().is_terminal();
    let out = init_logging(args.common.log_format, show_progress);
    let config = match load_config(&args.common, out) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let _sentry = report::init_sentry(&config.sentry);

    let path = state_path(&args.common, Some(&config));
    let (mut store, stored) = match open_store(&path, out) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let mut salvaged: Option<Watermark> = None;
    let stored = match stored {
        Stored::Nothing => None,
        Stored::Run(run) => Some(*run),
        Stored::Corrupt(state) if args.fresh => {
            out.warn(&format!(
                "--fresh: {}",
                corrupt_notice(store.path(), &state)
            ));
            salvaged = state.watermark;
            None
        }
        Stored::Corrupt(state) => {
            out.error(&format!(
                "the state file {} cannot be read: {}. Nothing was changed. `pathling-import \
                 --fresh` (or `cancel`) replaces it: the run it held is lost{}",
                store.path().display(),
                state.error,
                match &state.watermark {
                    Some(w) => format!(
                        ", its incremental starting point ({}) is kept",
                        w.transaction_time
                    ),
                    None => String::new(),
                }
            ));
            return exit::FAILED;
        }
    };

    // --fresh: the stored run is replaced by a new one, which deletes the old export job
    // itself (so a kill at any moment leaves one whole run, never half of two).
    let mut superseded = None;
    let decision = match &stored {
        Some(previous) if args.fresh && (!previous.is_done() || previous.resumable().is_some()) => {
            let job = previous.export_job().map(str::to_string);
            if job.is_some() {
                if pathling_import_core::binding::differences(&previous.spec, &config.spec)
                    .is_empty()
                {
                    superseded = job;
                } else {
                    out.warn(&format!(
                        "--fresh: run {} was started with other settings; its export job is left \
                         to expire at the source (the current credentials are never sent to \
                         another server)",
                        previous.run_id
                    ));
                }
            }
            out.say(&format!(
                "--fresh: replacing run {} ({})",
                previous.run_id,
                previous.state.name()
            ));
            NextRun::Start {
                watermark: previous.watermark.clone(),
            }
        }
        other => next_run(other.as_ref(), true),
    };
    if retry_only && matches!(decision, NextRun::Start { .. } | NextRun::Idle) {
        let what = match &stored {
            Some(run) => format!(
                "run {} ended {} and cannot be retried (only a run that failed after its export \
                 was known can); `pathling-import` starts the next one",
                run.run_id,
                run.state.name()
            ),
            None => format!("there is no run in {}", path.display()),
        };
        out.error(&format!("nothing to retry: {what}"));
        return exit::FAILED;
    }

    let (run, executor) = match decision {
        NextRun::Continue | NextRun::Retry => {
            let Some(stored) = stored else {
                return exit::FAILED;
            };
            let run = match admitted(stored, &config, args.rebind, &mut store, out).await {
                Ok(run) => run,
                Err(code) => return code,
            };
            let executor = match executor_for(&run, &config, out).await {
                Ok(e) => e,
                Err(code) => return code,
            };
            if matches!(decision, NextRun::Retry) {
                if let Err(code) = preflight(&executor, &run.run_id, &config, out).await {
                    return code;
                }
                let reason = match &run.state {
                    SyncState::Failed(f) => f.reason.clone(),
                    _ => String::new(),
                };
                let from = run.resumable().map(|r| r.from.as_str()).unwrap_or("");
                let retried = match run.step(
                    Input::Retry {
                        spec: Box::new(config.spec.clone()),
                    },
                    now(),
                ) {
                    Ok(r) => r,
                    Err(e) => {
                        out.error(&e.to_string());
                        return exit::FAILED;
                    }
                };
                if let Err(e) = store.save(&retried).await {
                    out.error(&e.to_string());
                    return exit::FAILED;
                }
                out.say(&format!(
                    "retrying run {} from {from} (it failed: {reason})",
                    retried.run_id
                ));
                (retried, executor)
            } else {
                tracing::info!(run_id = %run.run_id, phase = run.state.name(), "resuming");
                (run, executor)
            }
        }
        NextRun::Start { watermark } => {
            // Credentials and the staging location are checked before a new run is
            // persisted: a run that could never start would otherwise be resumed, with its
            // snapshotted bad settings, by every rerun.
            let run_id = pathling_import_runners::new_run_id(now());
            let executor = match Executor::new(&config.spec, &config.secrets, &config.tls).await {
                Ok(e) => e,
                Err(e) => {
                    out.error(&e.to_string());
                    report::capture_error("cli", &e.to_string());
                    return exit::BAD_CONFIG;
                }
            };
            if let Err(code) = preflight(&executor, &run_id, &config, out).await {
                return code;
            }
            let recorded = match pathling_import_runners::watermark::read(
                executor.staging(),
                &config.spec.staging,
            )
            .await
            {
                Ok(w) => w,
                Err(e) => {
                    out.warn(&format!(
                        "the watermark recorded in the staging store is not used: {e}"
                    ));
                    None
                }
            };
            let watermark = latest(latest(watermark, salvaged), recorded);
            let run = match SyncRun::start(&run_id, config.spec.clone(), watermark, now()) {
                Ok(r) => r.superseding(superseded),
                Err(e) => {
                    out.error(&e.to_string());
                    return exit::FAILED;
                }
            };
            if let Err(e) = store.replace(&run) {
                out.error(&e.to_string());
                return exit::FAILED;
            }
            tracing::info!(run_id = %run.run_id, since = ?run.state_since(), "starting a new run");
            (run, executor)
        }
        // Not asked for by `next_run(_, true)`; nothing to do.
        NextRun::Idle => return exit::IMPORTED,
    };
    drive_to_end(run, executor, &mut store, show_progress, out).await
}

/// The stored run if bound to the configured settings, or rebound on request (saved so).
async fn admitted(
    run: SyncRun,
    config: &Config,
    rebind: bool,
    store: &mut FileStore,
    out: Out,
) -> Result<SyncRun, u8> {
    match admit(run, &config.spec, rebind) {
        Ok(Admitted::AsStored(run)) => Ok(run),
        Ok(Admitted::Rebound { run, differences }) => {
            let mut text = format!(
                "--rebind: run {} continues with the configured settings:",
                run.run_id
            );
            for d in &differences {
                text.push_str(&format!("\n  {d}"));
            }
            out.say(&text);
            if let Err(e) = store.save(&run).await {
                out.error(&e.to_string());
                return Err(exit::FAILED);
            }
            Ok(run)
        }
        Err(Refused::Differs {
            run_id,
            differences,
        }) => {
            let keys: Vec<&str> = differences.iter().map(|d| d.key).collect();
            out.error(&format!(
                "run {run_id} was started with other settings than the configuration has now: \
                 {}. Its credentials are never paired with other settings. Either restore the \
                 settings it was started with and run again; or start anew with `--fresh`; or \
                 continue it with the new settings with `--rebind` (which lists what changes)",
                keys.join(", ")
            ));
            Err(exit::BAD_CONFIG)
        }
        Err(refused @ Refused::CannotRebind { .. }) => {
            out.error(&refused.to_string());
            Err(exit::BAD_CONFIG)
        }
    }
}

/// Builds the executor for a stored run; credentials that cannot be used are bad
/// configuration.
async fn executor_for(run: &SyncRun, config: &Config, out: Out) -> Result<Executor, u8> {
    Executor::new(&run.spec, &config.secrets, &config.tls)
        .await
        .map_err(|e| {
            out.error(&e.to_string());
            report::capture_error("cli", &e.to_string());
            exit::BAD_CONFIG
        })
}

/// The staging location and the target's credentials, tried in seconds before an export
/// that may take hours.
async fn preflight(executor: &Executor, run_id: &str, config: &Config, out: Out) -> Result<(), u8> {
    match executor
        .preflight(&config.spec.staging.run_prefix(run_id))
        .await
    {
        Ok(()) => Ok(()),
        Err(e) => {
            let transient = e.is_transient();
            out.error(&format!(
                "preflight: {e}{}",
                if transient {
                    " (try again later)"
                } else {
                    " (nothing was exported; fix the configuration and run again)"
                }
            ));
            report::capture_error("cli", &format!("preflight: {e}"));
            Err(if transient {
                exit::FAILED
            } else {
                exit::BAD_CONFIG
            })
        }
    }
}

async fn drive_to_end(
    run: SyncRun,
    executor: Executor,
    store: &mut FileStore,
    show_progress: bool,
    out: Out,
) -> u8 {
    let path = store.path().to_path_buf();
    // This process holds the run (the state file's lock): temp files under its prefix are a
    // killed predecessor's leftovers.
    match executor
        .staging()
        .remove_leftovers(&run.spec.staging.run_prefix(&run.run_id))
        .await
    {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(run_id = %run.run_id, "removed {n} leftover temp file(s) of an interrupted run")
        }
        Err(e) => out.warn(&format!(
            "could not remove leftovers of an interrupted run: {e}"
        )),
    }
    let progress = Progress::new(show_progress, executor.counters.clone());
    let options = DriveOptions::new(Duration::MAX, None);
    let result = driver::drive(
        run.clone(),
        &executor,
        store,
        &options,
        &progress,
        interrupted(),
    )
    .await;
    progress.finish();
    let (run, stopped) = match result {
        Ok(x) => x,
        Err(e) => {
            out.error(&e.to_string());
            report::capture_error("cli", &e.to_string());
            return exit::FAILED;
        }
    };
    match stopped {
        Stopped::Done(terminal) => {
            if let Some(w) = run.watermark.as_ref().filter(|w| w.run_id == run.run_id) {
                if let Err(e) = pathling_import_runners::watermark::record(
                    executor.staging(),
                    &run.spec.staging,
                    w,
                )
                .await
                {
                    out.warn(&format!(
                        "could not record the watermark next to the staged data (the state file \
                         has it): {e}"
                    ));
                }
            }
            finish(&run, &terminal, out)
        }
        Stopped::Interrupted => {
            out.say(&format!(
                "interrupted in {}; the run is saved in {} — run the same command again to \
                 continue",
                run.state.name(),
                path.display()
            ));
            exit::INTERRUPTED
        }
        Stopped::Sleeping { .. } | Stopped::OutOfBudget => exit::FAILED,
    }
}

fn finish(run: &SyncRun, terminal: &Terminal, out: Out) -> u8 {
    let text = report::describe_terminal(terminal);
    match terminal {
        Terminal::Succeeded(s) => {
            out.say(&format!("pathling-import run {} {text}", run.run_id));
            if s.nothing_to_import {
                exit::NOTHING_TO_IMPORT
            } else {
                exit::IMPORTED
            }
        }
        Terminal::Failed(f) => {
            let next = match &f.resume {
                Some(point) => format!(
                    " Run `pathling-import` again (or `pathling-import retry`) once the cause is \
                     fixed: it continues from {} with the files already staged; `--fresh` starts \
                     over.",
                    point.from.as_str()
                ),
                None => " The next run starts anew.".to_string(),
            };
            out.error(&format!("pathling-import run {} {text}.{next}", run.run_id));
            report::capture_failure(&run.run_id, "cli", f);
            exit::FAILED
        }
        Terminal::Cancelled(_) => {
            out.say(&format!("pathling-import run {} {text}", run.run_id));
            exit::CANCELLED
        }
    }
}

/// Cancels `run` and drives it to its end (the export job DELETE), returning the final run.
async fn cancel_run(
    run: SyncRun,
    config: &Config,
    store: &mut FileStore,
    out: Out,
) -> Result<SyncRun, u8> {
    let cancelled = match driver::cancel(&run, store, "cancelled by the user", &SystemClock).await {
        Ok(Some(c)) => c,
        Ok(None) => return Ok(run),
        Err(e) => {
            out.error(&e.to_string());
            return Err(exit::FAILED);
        }
    };
    let executor = executor_for(&cancelled, config, out).await?;
    let options = DriveOptions::new(Duration::from_secs(0), None);
    match driver::drive(
        cancelled,
        &executor,
        store,
        &options,
        &driver::Quiet,
        std::future::pending(),
    )
    .await
    {
        Ok((run, _)) => Ok(run),
        Err(e) => {
            out.error(&e.to_string());
            Err(exit::FAILED)
        }
    }
}

fn status(common: Common) -> u8 {
    let out = init_logging(common.log_format, false);
    let config = load_config(&common, out).ok();
    let path = state_path(&common, config.as_ref());
    let stored = match FileStore::peek(&path) {
        Ok(s) => s,
        Err(e) => {
            out.error(&e.to_string());
            return exit::FAILED;
        }
    };
    let run = match stored {
        Stored::Nothing => {
            out.say(&format!("no run recorded in {}", path.display()));
            return exit::IMPORTED;
        }
        Stored::Corrupt(state) => {
            out.error(&format!(
                "{}; `pathling-import --fresh` or `cancel` replaces it",
                corrupt_notice(&path, &state)
            ));
            return exit::FAILED;
        }
        Stored::Run(run) => *run,
    };
    let live = FileStore::in_use(&path);
    if common.log_format == LogFormat::Json {
        println!("{}", pathling_import_core::persist::encode(&run));
        return exit::IMPORTED;
    }
    println!(
        "run {} ({}{}), started {}",
        run.run_id,
        run.state.name(),
        if live {
            ", in progress in another process"
        } else {
            ""
        },
        run.started_at
    );
    if let SyncState::StagingFiles(s) = &run.state {
        let rows = &s.export.files.rows;
        let staged = rows
            .iter()
            .filter(|r| r.status == FileStatus::Staged)
            .count();
        println!(
            "{staged}/{} file(s) staged, {:.1} MB",
            rows.len(),
            s.export.files.bytes as f64 / 1e6
        );
    }
    match run.next(now()) {
        Next::Done { terminal } => println!("{}", report::describe_terminal(&terminal)),
        Next::SleepUntil { until, reason } => println!("{reason} until {until}"),
        Next::Run { requests } => println!("next: {}", describe_requests(&requests)),
    }
    if let Some(point) = run.resumable() {
        println!(
            "can be retried from {} (`pathling-import retry`, or a plain run)",
            point.from.as_str()
        );
    }
    if let Some(w) = &run.watermark {
        println!(
            "next incremental export starts at {} (run {})",
            w.transaction_time, w.run_id
        );
    }
    exit::IMPORTED
}

async fn cancel(args: CancelArgs) -> u8 {
    let out = init_logging(args.common.log_format, false);
    let config = match load_config(&args.common, out) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let path = state_path(&args.common, Some(&config));
    let (mut store, stored) = match open_store(&path, out) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match stored {
        Stored::Run(run) if !run.is_done() || run.resumable().is_some() => {
            let run = match admitted(*run, &config, args.rebind, &mut store, out).await {
                Ok(run) => run,
                Err(code) => return code,
            };
            match cancel_run(run, &config, &mut store, out).await {
                Ok(run) => {
                    out.say(&format!("run {} {}", run.run_id, run.state.name()));
                    exit::CANCELLED
                }
                Err(code) => code,
            }
        }
        Stored::Corrupt(state) => {
            out.warn(&format!("cancel: {}", corrupt_notice(store.path(), &state)));
            // The salvaged watermark goes next to the staged data, where a new run finds it.
            if let Some(w) = &state.watermark {
                let recorded = match Executor::new(&config.spec, &config.secrets, &config.tls).await
                {
                    Ok(executor) => pathling_import_runners::watermark::record(
                        executor.staging(),
                        &config.spec.staging,
                        w,
                    )
                    .await
                    .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = recorded {
                    out.error(&format!(
                        "the incremental starting point could not be saved ({e}); the state \
                         file is left as it is"
                    ));
                    return exit::FAILED;
                }
            }
            if let Err(e) = std::fs::remove_file(store.path()) {
                out.error(&format!("{}: {e}", store.path().display()));
                return exit::FAILED;
            }
            out.say(&format!("removed {}", store.path().display()));
            exit::CANCELLED
        }
        Stored::Run(_) | Stored::Nothing => {
            out.say(&format!("no unfinished run in {}", path.display()));
            exit::IMPORTED
        }
    }
}

fn describe_requests(requests: &[Request]) -> String {
    match requests.first().map(|r| &r.effect) {
        Some(Effect::StageFile { .. }) => format!("stage {} file(s)", requests.len()),
        Some(Effect::ApplyDeletions { .. }) => {
            format!("apply deletions of {} file(s)", requests.len())
        }
        Some(Effect::KickoffExport(k)) => format!("export kick-off {}", k.url),
        Some(Effect::PollExport { .. }) => "poll the export".into(),
        Some(Effect::DetectPathling) => "detect the Pathling version".into(),
        Some(Effect::KickoffImport { .. }) => "import kick-off".into(),
        Some(Effect::PollImport { .. }) => "poll the import".into(),
        Some(Effect::DeleteExportJob { .. }) => "delete the export job".into(),
        None => "nothing".into(),
    }
}

trait RunExt {
    fn state_since(&self) -> Option<String>;
}

impl RunExt for SyncRun {
    fn state_since(&self) -> Option<String> {
        match &self.state {
            SyncState::KickingOffExport(k) => k.since.clone(),
            _ => None,
        }
    }
}

/// A progress display on a terminal (files, bytes, resources, throughput, server progress);
/// structured log lines otherwise: phase changes, waits, and staging progress every
/// [`PROGRESS_EVERY`].
struct Progress {
    bar: Option<ProgressBar>,
    /// Without a terminal: the runners' one log observer, plus periodic staging lines.
    log: LogObserver,
    counters: Arc<Counters>,
    last_log: Mutex<Instant>,
    started: Instant,
}

impl Progress {
    fn new(show: bool, counters: Arc<Counters>) -> Self {
        let bar = show.then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            log: LogObserver::default(),
            counters,
            last_log: Mutex::new(Instant::now()),
            started: Instant::now(),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    fn line(&self, run: &SyncRun) -> String {
        match &run.state {
            SyncState::KickingOffExport(_) => "kicking off the export".into(),
            SyncState::PollingExport(p) => format!(
                "export running ({} polls){}",
                p.polls,
                p.progress
                    .as_deref()
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default()
            ),
            SyncState::StagingFiles(s) => {
                let total = s.export.files.rows.len();
                let staged = s
                    .export
                    .files
                    .rows
                    .iter()
                    .filter(|r| r.status != FileStatus::Pending)
                    .count();
                let bytes = self.counters.bytes_downloaded.load(Ordering::Relaxed);
                let secs = self.started.elapsed().as_secs_f64().max(0.001);
                format!(
                    "staging {staged}/{total} files, {:.1} MB, {} resources, {:.1} MB/s",
                    bytes as f64 / 1e6,
                    self.counters.resources_staged.load(Ordering::Relaxed),
                    bytes as f64 / 1e6 / secs
                )
            }
            SyncState::KickingOffImport(_) => "kicking off the Pathling import".into(),
            SyncState::PollingImport(p) => format!(
                "import running ({} polls){}",
                p.polls,
                p.progress
                    .as_deref()
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default()
            ),
            SyncState::ApplyingDeletions(d) => {
                format!("applying deletions ({} deleted)", d.deleted)
            }
            SyncState::CleaningUp(_) => "cleaning up the export job".into(),
            SyncState::Succeeded(_) | SyncState::Failed(_) | SyncState::Cancelled(_) => {
                "done".into()
            }
        }
    }

    /// Without a terminal: a staging line at a steady interval, so a long phase is visible.
    fn periodic(&self, run: &SyncRun) {
        if !matches!(run.state, SyncState::StagingFiles(_)) {
            return;
        }
        let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= PROGRESS_EVERY {
            tracing::info!(run_id = %run.run_id, phase = run.state.name(), "{}", self.line(run));
            *last = Instant::now();
        }
    }
}

impl Observer for Progress {
    fn next(&self, run: &SyncRun, next: &Next) {
        match &self.bar {
            Some(bar) => bar.set_message(self.line(run)),
            None => self.log.next(run, next),
        }
    }

    fn stepped(&self, run: &SyncRun, request: &Request, _result: &EffectResult) {
        if let Some(bar) = &self.bar {
            bar.set_message(self.line(run));
            return;
        }
        if let Effect::StageFile {
            index, type_name, ..
        } = &request.effect
        {
            tracing::debug!(run_id = %run.run_id, index, type_name = %type_name, "file staged");
        }
        self.periodic(run);
    }

    fn rejected(&self, request: &Request, why: &str) {
        self.log.rejected(request, why);
    }
}

/// Ctrl-C, or SIGTERM from a service manager or `kill`: both stop the run at the next step
/// boundary with the state saved (exit 130), where SIGKILL would lose the in-flight step.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the run cleanly");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
