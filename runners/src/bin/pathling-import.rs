//! `pathling-import`: runs a complete, resumable sync from a FHIR Bulk Data source into
//! Pathling on this machine. See the README for configuration and exit codes.

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use pathling_import_core::config::{self, Config, RawConfig};
use pathling_import_core::effect::{Effect, EffectResult, Next, Request};
use pathling_import_core::state::{FileStatus, SyncState};
use pathling_import_core::SyncRun;
use pathling_import_runners::driver::{LogObserver, Observer};
use pathling_import_runners::executor::Counters;
use pathling_import_runners::local::{self, exit, RunRequest, Say};
use pathling_import_runners::report;
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
    /// The event log (one JSON object per line, the SMART bulk-data-client format): a file
    /// appended to, or `-` for stdout [default: events.ndjson beside the state file]. A copy
    /// is always kept next to the staged data ({prefix}{run id}/log.ndjson).
    #[arg(long, value_name = "PATH")]
    event_log: Option<PathBuf>,
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
    /// As for `run`.
    #[arg(long, value_name = "PATH")]
    event_log: Option<PathBuf>,
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
                    event_log: args.event_log,
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

impl Say for Out {
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
    let event_log = match args.event_log {
        Some(p) if p.as_os_str() == "-" => None,
        Some(p) => Some(p),
        None => Some(path.with_file_name("events.ndjson")),
    };
    let request = RunRequest {
        fresh: args.fresh,
        rebind: args.rebind,
        retry_only,
        event_log,
    };
    let observe = |counters: Arc<Counters>| -> Box<dyn Observer> {
        Box::new(Progress::new(show_progress, counters))
    };
    local::run(&config, &path, &request, &out, &observe, interrupted()).await
}

fn status(common: Common) -> u8 {
    let out = init_logging(common.log_format, false);
    let config = load_config(&common, out).ok();
    let path = state_path(&common, config.as_ref());
    local::status(&path, common.log_format == LogFormat::Json, &out)
}

async fn cancel(args: CancelArgs) -> u8 {
    let out = init_logging(args.common.log_format, false);
    let config = match load_config(&args.common, out) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let path = state_path(&args.common, Some(&config));
    local::cancel(&config, &path, args.rebind, &out).await
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
                let total = s.export.files.len();
                let staged = total - s.export.files.count_of(None, FileStatus::Pending);
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

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Observer for Progress {
    fn next(&self, run: &SyncRun, next: &Next) {
        match &self.bar {
            Some(bar) => bar.set_message(self.line(run)),
            None => self.log.next(run, next),
        }
    }

    fn stepped(&self, _before: &SyncRun, run: &SyncRun, request: &Request, _result: &EffectResult) {
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
