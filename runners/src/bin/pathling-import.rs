//! `pathling-import`: runs a complete, resumable sync from a FHIR Bulk Data source into
//! Pathling on this machine. See the README for configuration and exit codes.

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use pathling_import_core::config::{self, Config, RawConfig};
use pathling_import_core::effect::{Effect, Next, Request};
use pathling_import_core::spec::RunSpec;
use pathling_import_core::state::SyncState;
use pathling_import_core::{SyncRun, Terminal};
use pathling_import_runners::driver::{self, DriveOptions, Observer, Stopped};
use pathling_import_runners::executor::{now, Counters, Executor};
use pathling_import_runners::file_store::FileStore;
use pathling_import_runners::report;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const DEFAULT_CONFIG: &str = "pathling-import.config.json";
const DEFAULT_STATE: &str = "pathling-import.state.json";
const DEFAULT_STAGING_DIR: &str = "pathling-import-staging";
/// Runner-only configuration keys (also accepted in the JSON file, as `stateFile`).
const EXTRA_KEYS: &[&str] = &["STATE_FILE"];

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
/// again after an interruption and it continues where it stopped.
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
    /// Log format when not showing a progress display.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(clap::Args, Debug, Clone)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// Abandon an unfinished run (cancelling its export job) and start a new one.
    #[arg(long)]
    fresh: bool,
    /// Never show the progress display, even on a terminal.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run (or resume) the sync. The default when no subcommand is given.
    Run(RunArgs),
    /// Show the current or last run from the state file, as JSON with --log-format json.
    Status(Common),
    /// Cancel the unfinished run: its export job is deleted at the source.
    Cancel(Common),
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
            None => run(cli.run).await,
            Some(Command::Run(args)) => run(args).await,
            Some(Command::Status(common)) => status(common),
            Some(Command::Cancel(common)) => cancel(common).await,
        }
    });
    ExitCode::from(code)
}

fn init_logging(format: LogFormat, quiet: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("PATHLING_IMPORT_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(if quiet { "warn" } else { "info" })
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Loads configuration as the original did: a named file, else the default file when present,
/// else the environment. Problems are printed together, naming each key.
fn load_config(common: &Common) -> Result<Config, u8> {
    let (raw, from) = match &common.config {
        Some(path) => (read_config_file(path)?, path.display().to_string()),
        None if Path::new(DEFAULT_CONFIG).exists() => (
            read_config_file(Path::new(DEFAULT_CONFIG))?,
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
        eprintln!("error: configuration from {from} is {e}");
        report::capture_error(
            "cli",
            &format!("invalid configuration: {} problem(s)", e.problems.len()),
        );
        exit::BAD_CONFIG
    })
}

fn read_config_file(path: &Path) -> Result<RawConfig, u8> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(RawConfig::from_json(&text, EXTRA_KEYS)),
        Err(e) => {
            eprintln!(
                "error: cannot read configuration file {}: {e}",
                path.display()
            );
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

fn open_store(path: &Path) -> Result<(FileStore, Option<SyncRun>), u8> {
    FileStore::open(path).map_err(|e| {
        eprintln!("error: {e}");
        exit::FAILED
    })
}

fn new_run_id() -> String {
    let t = now();
    let stamp = t.to_fhir_instant().replace(['-', ':'], "");
    let stamp = stamp.split('.').next().unwrap_or("run").to_string();
    // Uniqueness across runs started within the same second: the process id and a hash of
    // the clock's nanoseconds.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let salt = pathling_import_core::retry::stable_hash(&[
        &nanos.to_le_bytes(),
        &std::process::id().to_le_bytes(),
    ]);
    format!("{stamp}Z-{:06x}", salt & 0xff_ffff)
}

async fn run(args: RunArgs) -> u8 {
    let config = match load_config(&args.common) {
        Ok(c) => c,
        Err(code) => {
            init_logging(args.common.log_format, false);
            return code;
        }
    };
    let _sentry = report::init_sentry(&config.sentry);
    let show_progress = !args.no_progress && std::io::stderr().is_terminal();
    init_logging(args.common.log_format, show_progress);

    let path = state_path(&args.common, Some(&config));
    let (mut store, stored) = match open_store(&path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let (mut run, executor) = match stored {
        Some(run) if !run.is_done() && !args.fresh => {
            if run.spec != config.spec {
                tracing::warn!(run_id = %run.run_id, "the unfinished run was started with other settings; it continues with those (use --fresh to start over)");
            }
            tracing::info!(run_id = %run.run_id, phase = run.state.name(), "resuming");
            let executor = match executor_for(&run.spec, &config).await {
                Ok(e) => e,
                Err(code) => return code,
            };
            (run, executor)
        }
        stored => {
            // Credentials are checked before a new run is persisted (or an old one cancelled):
            // a saved run snapshots its settings, so a run that could never start would make
            // every rerun resume it with the bad settings, even after they were corrected.
            let executor = match executor_for(&config.spec, &config).await {
                Ok(e) => e,
                Err(code) => return code,
            };
            let mut watermark = stored.as_ref().and_then(|r| r.watermark.clone());
            if let Some(unfinished) = stored.filter(|r| !r.is_done()) {
                // --fresh: cancel the old run first so its export job is cleaned up.
                match cancel_run(unfinished, &config, &mut store).await {
                    Ok(cancelled) => watermark = cancelled.watermark,
                    Err(code) => return code,
                }
            }
            let run_id = new_run_id();
            let run = match SyncRun::start(&run_id, config.spec.clone(), watermark, now()) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    return exit::FAILED;
                }
            };
            if let Err(e) = store.replace(&run) {
                eprintln!("error: {e}");
                return exit::FAILED;
            }
            tracing::info!(run_id = %run.run_id, since = ?run.state_since(), "starting a new run");
            (run, executor)
        }
    };
    let progress = Progress::new(show_progress, executor.counters.clone());
    let options = DriveOptions {
        max_sleep: Duration::MAX,
        budget_until: None,
    };
    let interrupt = interrupted();
    let result = driver::drive(
        run.clone(),
        &executor,
        &mut store,
        &options,
        &progress,
        interrupt,
    )
    .await;
    progress.finish();
    let stopped = match result {
        Ok((latest, stopped)) => {
            run = latest;
            stopped
        }
        Err(e) => {
            eprintln!("error: {e}");
            report::capture_error("cli", &e.to_string());
            return exit::FAILED;
        }
    };
    match stopped {
        Stopped::Done(terminal) => finish(&run, &terminal),
        Stopped::Interrupted => {
            eprintln!(
                "interrupted in {}; the run is saved in {} — run the same command again to continue",
                run.state.name(),
                path.display()
            );
            exit::INTERRUPTED
        }
        Stopped::Sleeping { .. } | Stopped::OutOfBudget => exit::FAILED,
    }
}

/// Builds the executor for `spec`; credentials that cannot be used are bad configuration.
async fn executor_for(spec: &RunSpec, config: &Config) -> Result<Executor, u8> {
    Executor::new(spec, &config.secrets).await.map_err(|e| {
        eprintln!("error: {e}");
        report::capture_error("cli", &e.to_string());
        exit::BAD_CONFIG
    })
}

fn finish(run: &SyncRun, terminal: &Terminal) -> u8 {
    let text = report::describe_terminal(terminal);
    match terminal {
        Terminal::Succeeded(s) => {
            tracing::info!(run_id = %run.run_id, "{text}");
            eprintln!("pathling-import run {} {text}", run.run_id);
            if s.nothing_to_import {
                exit::NOTHING_TO_IMPORT
            } else {
                exit::IMPORTED
            }
        }
        Terminal::Failed(f) => {
            tracing::error!(run_id = %run.run_id, phase = %f.phase, "{text}");
            eprintln!("pathling-import run {} {text}", run.run_id);
            report::capture_failure(&run.run_id, "cli", f);
            exit::FAILED
        }
        Terminal::Cancelled(_) => {
            eprintln!("pathling-import run {} {text}", run.run_id);
            exit::CANCELLED
        }
    }
}

/// Cancels `run` and drives it to its end (the export job DELETE), returning the final run.
async fn cancel_run(run: SyncRun, config: &Config, store: &mut FileStore) -> Result<SyncRun, u8> {
    let cancelled = match driver::cancel(&run, store, "cancelled by the user").await {
        Ok(Some(c)) => c,
        Ok(None) => return Ok(run),
        Err(e) => {
            eprintln!("error: {e}");
            return Err(exit::FAILED);
        }
    };
    let executor = Executor::new(&cancelled.spec, &config.secrets)
        .await
        .map_err(|e| {
            eprintln!("error: {e}");
            exit::BAD_CONFIG
        })?;
    let options = DriveOptions {
        max_sleep: Duration::from_secs(0),
        budget_until: None,
    };
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
            eprintln!("error: {e}");
            Err(exit::FAILED)
        }
    }
}

fn status(common: Common) -> u8 {
    init_logging(common.log_format, false);
    let config = load_config(&common).ok();
    let path = state_path(&common, config.as_ref());
    if !path.exists() {
        eprintln!("no run recorded in {}", path.display());
        return exit::IMPORTED;
    }
    let (_, stored) = match open_store(&path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let Some(run) = stored else {
        eprintln!("no run recorded in {}", path.display());
        return exit::IMPORTED;
    };
    if common.log_format == LogFormat::Json {
        println!("{}", pathling_import_core::persist::encode(&run));
        return exit::IMPORTED;
    }
    println!(
        "run {} ({}), started {}",
        run.run_id,
        run.state.name(),
        run.started_at
    );
    match run.next(now()) {
        Next::Done { terminal } => println!("{}", report::describe_terminal(&terminal)),
        Next::SleepUntil { until, reason } => println!("{reason} until {until}"),
        Next::Run { requests } => println!("next: {}", describe_requests(&requests)),
    }
    if let Some(w) = &run.watermark {
        println!(
            "next incremental export starts at {} (run {})",
            w.transaction_time, w.run_id
        );
    }
    exit::IMPORTED
}

async fn cancel(common: Common) -> u8 {
    init_logging(common.log_format, false);
    let config = match load_config(&common) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let path = state_path(&common, Some(&config));
    let (mut store, stored) = match open_store(&path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match stored {
        Some(run) if !run.is_done() => match cancel_run(run, &config, &mut store).await {
            Ok(run) => {
                eprintln!("run {} {}", run.run_id, run.state.name());
                exit::CANCELLED
            }
            Err(code) => code,
        },
        _ => {
            eprintln!("no unfinished run in {}", path.display());
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
/// structured log lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    counters: Arc<Counters>,
    last_phase: Mutex<String>,
    started: std::time::Instant,
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
            counters,
            last_phase: Mutex::new(String::new()),
            started: std::time::Instant::now(),
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
                    .filter(|r| r.status != pathling_import_core::state::FileStatus::Pending)
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
}

impl Observer for Progress {
    fn next(&self, run: &SyncRun, next: &Next) {
        let line = self.line(run);
        if let Some(bar) = &self.bar {
            bar.set_message(line);
            return;
        }
        let phase = run.state.name().to_string();
        let mut last = self.last_phase.lock().unwrap_or_else(|p| p.into_inner());
        let wait = match next {
            Next::SleepUntil { until, reason } => format!(" ({reason} until {until})"),
            _ => String::new(),
        };
        // Log phase changes and waits; per-file progress goes to `stepped`.
        if *last != phase || !wait.is_empty() {
            tracing::info!(run_id = %run.run_id, phase = %phase, "{line}{wait}");
            *last = phase;
        }
    }

    fn stepped(&self, run: &SyncRun, request: &Request) {
        if let Some(bar) = &self.bar {
            bar.set_message(self.line(run));
        } else if let Effect::StageFile {
            index, type_name, ..
        } = &request.effect
        {
            tracing::debug!(run_id = %run.run_id, index, type_name = %type_name, "file staged");
        }
    }

    fn rejected(&self, request: &Request, why: &str) {
        tracing::debug!(id = ?request.id, "result not applied: {why}");
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
