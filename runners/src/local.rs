//! The local runner behind the `pathling-import` CLI: what to do with the run the state file
//! holds (continue, retry, start anew, refuse), the preflight, driving to the end, and what
//! the user is told. The binary only parses arguments, sets up logging and the progress
//! display, and maps the outcome to an exit code.

use crate::driver::{self, All, DriveOptions, Observer, RunStore, Stopped, SystemClock};
use crate::event_log::{self, EventLog, Sink};
use crate::executor::{now, Counters, Executor};
use crate::file_store::{CorruptState, FileStore, FileStoreError, Stored};
use crate::report;
use crate::resume::{admit, Admitted, Refused};
use pathling_import_core::config::Config;
use pathling_import_core::effect::{Effect, Input, Next, Request};
use pathling_import_core::events;
use pathling_import_core::plan::{latest, next_run, Ask, NextRun};
use pathling_import_core::state::{FileStatus, SyncState};
use pathling_import_core::{SyncRun, Terminal, Watermark};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Exit codes: distinct for every way a run can end.
pub mod exit {
    pub const IMPORTED: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const BAD_CONFIG: u8 = 2;
    pub const NOTHING_TO_IMPORT: u8 = 3;
    pub const CANCELLED: u8 = 4;
    pub const INTERRUPTED: u8 = 130;
}

/// Where messages for the user go (plain lines, or JSON log events).
pub trait Say {
    fn error(&self, text: &str);
    fn warn(&self, text: &str);
    fn say(&self, text: &str);
}

/// What `pathling-import` / `pathling-import retry` asked for.
#[derive(Clone, Debug, Default)]
pub struct RunRequest {
    /// Replace an unfinished or failed run (and a corrupt state file) with a new one.
    pub fresh: bool,
    /// Continue the stored run with the configured settings although they differ.
    pub rebind: bool,
    /// `retry`: continue a failed run, never start a new one.
    pub retry_only: bool,
    /// Where the event log goes as it happens (a copy is always kept next to the staged
    /// data): `None` for stdout, else the file it is appended to.
    pub event_log: Option<std::path::PathBuf>,
}

fn open_store(path: &Path, out: &dyn Say) -> Result<(FileStore, Stored), u8> {
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
fn corrupt_notice(path: &Path, state: &CorruptState) -> String {
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

/// Runs (or resumes, or retries) the sync the state file at `path` holds, as asked; returns
/// the exit code.
pub async fn run(
    config: &Config,
    path: &Path,
    args: &RunRequest,
    out: &dyn Say,
    observe: &dyn Fn(Arc<Counters>) -> Box<dyn Observer>,
    interrupt: impl Future<Output = ()>,
) -> u8 {
    let retry_only = args.retry_only;
    let (mut store, stored) = match open_store(path, out) {
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
        other => next_run(
            other.as_ref(),
            if retry_only { Ask::Retry } else { Ask::Start },
        ),
    };
    if let (NextRun::Held, Some(run)) = (&decision, &stored) {
        out.error(&format!(
            "run {} is not retried without a check ({}); once checked, `pathling-import retry` continues it and `pathling-import --fresh` abandons it",
            run.run_id,
            run.failure().map_or("", |f| f.reason.as_str())
        ));
        return exit::FAILED;
    }
    if retry_only && matches!(decision, NextRun::Idle) {
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

    let mut resumed = None;
    let (run, executor) = match decision {
        NextRun::Continue | NextRun::Retry => {
            let Some(stored) = stored else {
                return exit::FAILED;
            };
            let run = match admitted(stored, config, args.rebind, &mut store, out).await {
                Ok(run) => run,
                Err(code) => return code,
            };
            let executor = match executor_for(&run, config, out).await {
                Ok(e) => e,
                Err(code) => return code,
            };
            if matches!(decision, NextRun::Retry) {
                if let Err(code) = preflight(&executor, &run.run_id, config, out).await {
                    return code;
                }
                let reason = run.failure().map_or("", |f| f.reason.as_str()).to_string();
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
                resumed = Some(events::run_resumed(&retried, true));
                (retried, executor)
            } else {
                tracing::info!(run_id = %run.run_id, phase = run.state.name(), "resuming");
                resumed = Some(events::run_resumed(&run, false));
                (run, executor)
            }
        }
        NextRun::Start { watermark } => {
            // Credentials and the staging location are checked before a new run is
            // persisted: a run that could never start would otherwise be resumed, with its
            // snapshotted bad settings, by every rerun.
            let run_id = crate::new_run_id(now());
            let executor = match Executor::new(&config.spec, &config.secrets, &config.tls).await {
                Ok(e) => e,
                Err(e) => {
                    out.error(&e.to_string());
                    report::capture_error("cli", &e.to_string());
                    return exit::BAD_CONFIG;
                }
            };
            if let Err(code) = preflight(&executor, &run_id, config, out).await {
                return code;
            }
            let recorded =
                match crate::watermark::read(executor.staging(), &config.spec.staging).await {
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
        // `Held` was answered above; `Idle` is only the answer to an explicit retry.
        NextRun::Held | NextRun::Idle => return exit::FAILED,
    };
    let executor = Arc::new(executor);
    let sink = match &args.event_log {
        None => Sink::Stdout,
        Some(path) => match EventLog::file_sink(path) {
            Ok(sink) => sink,
            Err(e) => {
                out.error(&format!("event log {}: {e}", path.display()));
                return exit::FAILED;
            }
        },
    };
    let log = EventLog::new(&run.run_id, executor.clone(), sink);
    if let Some(event) = resumed {
        log.record(&event);
    }
    let key = event_log::staging_key(&run);
    let code = drive_to_end(run, &executor, &mut store, observe, &log, interrupt, out).await;
    if let Err(e) = log.flush(executor.staging(), &key).await {
        out.warn(&format!(
            "could not keep the event log next to the staged data: {e}"
        ));
    }
    code
}

/// The stored run if bound to the configured settings, or rebound on request (saved so).
async fn admitted(
    run: SyncRun,
    config: &Config,
    rebind: bool,
    store: &mut FileStore,
    out: &dyn Say,
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
async fn executor_for(run: &SyncRun, config: &Config, out: &dyn Say) -> Result<Executor, u8> {
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
async fn preflight(
    executor: &Executor,
    run_id: &str,
    config: &Config,
    out: &dyn Say,
) -> Result<(), u8> {
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
    executor: &Executor,
    store: &mut FileStore,
    observe: &dyn Fn(Arc<Counters>) -> Box<dyn Observer>,
    log: &EventLog,
    interrupt: impl Future<Output = ()>,
    out: &dyn Say,
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
    let observer = observe(executor.counters.clone());
    let options = DriveOptions::new(Duration::MAX, None);
    let saves = driver::SaveCount::default();
    let result = driver::drive(
        run.clone(),
        executor,
        store,
        &options,
        &All(&[observer.as_ref(), log, &saves]),
        interrupt,
    )
    .await;
    drop(observer);
    let driver::StateWrites {
        writes,
        bytes,
        largest,
    } = saves.figures();
    tracing::info!(
        run_id = %run.run_id,
        writes,
        bytes,
        largest,
        "state file written {writes} time(s), {bytes} bytes in all, {largest} at most"
    );
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
                if let Err(e) =
                    crate::watermark::record(executor.staging(), &run.spec.staging, w).await
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

fn finish(run: &SyncRun, terminal: &Terminal, out: &dyn Say) -> u8 {
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
    out: &dyn Say,
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

/// Shows the run the state file holds (without its lock: also while a run is in progress);
/// `json` prints the envelope.
pub fn status(path: &Path, json: bool, out: &dyn Say) -> u8 {
    let stored = match FileStore::peek(path) {
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
                corrupt_notice(path, &state)
            ));
            return exit::FAILED;
        }
        Stored::Run(run) => *run,
    };
    let live = FileStore::in_use(path);
    if json {
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
        let files = &s.export.files;
        let staged = files.count_of(None, FileStatus::Staged);
        println!(
            "{staged}/{} file(s) staged, {:.1} MB",
            files.len(),
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
            "can be retried from {} ({})",
            point.from.as_str(),
            if point.check_first {
                "only by `pathling-import retry`, after the check the failure asks for"
            } else {
                "`pathling-import retry`, or a plain run"
            }
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

/// Cancels the unfinished run (or abandons a failed one, or clears a corrupt state file).
pub async fn cancel(config: &Config, path: &Path, rebind: bool, out: &dyn Say) -> u8 {
    let (mut store, stored) = match open_store(path, out) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match stored {
        Stored::Run(run) if !run.is_done() || run.resumable().is_some() => {
            let run = match admitted(*run, config, rebind, &mut store, out).await {
                Ok(run) => run,
                Err(code) => return code,
            };
            match cancel_run(run, config, &mut store, out).await {
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
                    Ok(executor) => {
                        crate::watermark::record(executor.staging(), &config.spec.staging, w)
                            .await
                            .map_err(|e| e.to_string())
                    }
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
