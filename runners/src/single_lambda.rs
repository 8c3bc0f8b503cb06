//! The single-Lambda runner: one function, invoked by a schedule (EventBridge) or directly,
//! that keeps a sync's current run in DynamoDB ([`crate::dynamo_store`]) and drives it with the
//! shared [`driver`] for as long as one invocation allows.
//!
//! ## One invocation
//!
//! 1. Take the sync's lease (`{"syncId": ...}` or the configured `SYNC_ID`). Held by another
//!    live invocation → return at once with `stopped: "busy"`; nothing is written.
//! 2. Load the current run. None yet, or the last one ended: a scheduled invocation (or a
//!    direct one with `"start": true`) starts the next run, carrying the previous run's
//!    watermark so `SINCE=auto` is incremental; otherwise report the last run (`"done"`) or
//!    that there is none (`"idle"`). `{"cancel": true}` cancels an unfinished run (its export
//!    job is deleted).
//! 3. Drive until the run ends (`"done"`), must wait longer than `LAMBDA_MAX_SLEEP`
//!    (`"sleeping"`, with `wakeAt`; the schedule wakes it again), or the time budget runs out
//!    (`"out_of_budget"`; the next invocation continues). Every step is saved (conditional on
//!    `seq`, renewing the lease).
//! 4. Release the lease and return the summary `{syncId, runId, phase, stopped, wakeAt?,
//!    outcome?, message?}`.
//!
//! A run that fails is a normal return (phase `failed`, the outcome says why; reported to
//! Sentry). Only infrastructure and configuration problems are Lambda errors, named by
//! [`ErrorType`]: `ConfigurationError`, `StateError` (corrupt or newer stored run, or the run
//! was taken over), `TransientError`.
//!
//! ## Time
//!
//! The budget is the invocation deadline minus `margin` (30 s), clamped by
//! `LAMBDA_TIME_BUDGET` ([`aws::budget_until`]). No effect starts after it; effects in flight
//! finish. A watchdog interrupts effects still in flight shortly before the real deadline, and
//! before the lease could lapse without a renewing save — after that another invocation may take
//! the run over, so this one must not act any more.
//!
//! ## Configuration (besides the core's keys)
//!
//! `SYNC_TABLE` (required), `SYNC_ID` (default `default`), `LAMBDA_TIME_BUDGET` (seconds),
//! `LAMBDA_MAX_SLEEP` (seconds slept in-process, default 30), `LEASE_SECONDS` (default 960:
//! longer than any invocation), `RUN_RETENTION_DAYS` (history TTL, default 30).

use crate::aws::{self, ErrorType, LambdaFailure, LAMBDA_MAX_SLEEP, LAMBDA_TIME_BUDGET};
use crate::driver::{
    self, All, DriveError, DriveOptions, LogObserver, RunStore, Stopped, SystemClock,
};
use crate::dynamo_store::{
    Acquired, DynamoStore, DynamoTable, Lease, DEFAULT_LEASE, DEFAULT_RETENTION,
};
use crate::emf::{Emf, MetricsSink};
use crate::event_log::{self, EventLog, Sink};
use crate::executor::{now, Executor};
use crate::report;
use crate::resume::{admit, Admitted};
use lambda_runtime::Context;
use pathling_import_core::config::Config;
use pathling_import_core::effect::{Input, Next};
use pathling_import_core::events;
use pathling_import_core::plan::{latest, next_run, Ask, NextRun};
use pathling_import_core::{SyncRun, Terminal, Timestamp};
use serde::Serialize;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub const SYNC_TABLE: &str = "SYNC_TABLE";
pub const SYNC_ID: &str = "SYNC_ID";
pub const LEASE_SECONDS: &str = "LEASE_SECONDS";
pub const RUN_RETENTION_DAYS: &str = "RUN_RETENTION_DAYS";

/// The runner-only configuration keys of the single Lambda.
pub const EXTRA_KEYS: &[&str] = &[
    SYNC_TABLE,
    SYNC_ID,
    LAMBDA_TIME_BUDGET,
    LAMBDA_MAX_SLEEP,
    LEASE_SECONDS,
    RUN_RETENTION_DAYS,
    crate::emf::METRICS_NAMESPACE,
];

/// Time kept between the budget and the invocation deadline: for the last save, releasing the
/// lease and answering.
pub const MARGIN: Duration = Duration::from_secs(30);

/// The single Lambda's own settings, from the configuration's extra keys.
#[derive(Clone, Debug)]
pub struct Settings {
    pub table: String,
    pub sync_id: String,
    pub budget: Option<Duration>,
    pub max_sleep: Duration,
    pub lease: Duration,
    pub retention: Duration,
}

impl Settings {
    pub fn from_config(config: &Config) -> Result<Settings, LambdaFailure> {
        let extra = |k: &str| config.extras.get(k).map(String::as_str);
        let table = extra(SYNC_TABLE)
            .ok_or_else(|| {
                LambdaFailure::configuration(format!(
                    "{SYNC_TABLE}: required (the DynamoDB table holding the runs)"
                ))
            })?
            .to_string();
        let sync_id = extra(SYNC_ID).unwrap_or("default").to_string();
        DynamoTable::partition_key(&sync_id)
            .map_err(|e| LambdaFailure::configuration(format!("{SYNC_ID}: {e}")))?;
        let retention_days = match extra(RUN_RETENTION_DAYS) {
            None => DEFAULT_RETENTION,
            Some(text) => match text.trim().parse::<u64>() {
                Ok(d) if (1..=3650).contains(&d) => Duration::from_secs(d * 86_400),
                _ => {
                    return Err(LambdaFailure::configuration(format!(
                        "{RUN_RETENTION_DAYS}: expected whole days from 1 to 3650, got {text:?}"
                    )))
                }
            },
        };
        Ok(Settings {
            table,
            sync_id,
            budget: aws::configured_budget(config)?,
            max_sleep: aws::max_sleep(config, Duration::from_secs(30))?,
            lease: aws::seconds_setting(config, LEASE_SECONDS, 1.0..=86_400.0)?
                .unwrap_or(DEFAULT_LEASE),
            retention: retention_days,
        })
    }
}

/// What an invocation asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub sync_id: String,
    /// From a schedule: start the next run when the last one ended.
    pub scheduled: bool,
    /// Direct: start a run if none is unfinished.
    pub start: bool,
    /// Direct: cancel the unfinished run (or abandon a failed one that could be retried).
    pub cancel: bool,
    /// Direct: retry the failed run, also one whose failure asks for a check first (never
    /// implied by a schedule).
    pub retry: bool,
    /// Direct: continue the stored run with the configured settings although they differ
    /// from the ones it was started with (never implied by a schedule).
    pub rebind: bool,
}

impl Invocation {
    /// Reads the event: an EventBridge scheduled event (`"source": "aws.events"` or
    /// `"detail-type": "Scheduled Event"`), or a JSON object with optional `syncId`, `start`,
    /// `cancel`, `retry`, `rebind` and `scheduled` (what the deployed schedule sends). `null` is a direct
    /// invocation asking for nothing but progress.
    pub fn parse(event: &Value, default_sync_id: &str) -> Result<Invocation, LambdaFailure> {
        let bad = |m: &str| LambdaFailure::configuration(format!("the invocation event {m}"));
        let obj = match event {
            Value::Null => {
                return Ok(Invocation {
                    sync_id: default_sync_id.to_string(),
                    scheduled: false,
                    start: false,
                    cancel: false,
                    retry: false,
                    rebind: false,
                })
            }
            Value::Object(o) => o,
            _ => return Err(bad("must be a JSON object")),
        };
        let flag = |k: &str| -> Result<bool, LambdaFailure> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(bad(&format!("field {k:?} must be true or false"))),
            }
        };
        let from_eventbridge = obj.get("source").and_then(Value::as_str) == Some("aws.events")
            || obj.get("detail-type").and_then(Value::as_str) == Some("Scheduled Event");
        let sync_id = match obj.get("syncId") {
            None | Some(Value::Null) => default_sync_id.to_string(),
            Some(Value::String(s)) => {
                DynamoTable::partition_key(s).map_err(|e| bad(&format!("syncId: {e}")))?;
                s.clone()
            }
            Some(_) => return Err(bad("field \"syncId\" must be a string")),
        };
        Ok(Invocation {
            sync_id,
            scheduled: from_eventbridge || flag("scheduled")?,
            start: flag("start")?,
            cancel: flag("cancel")?,
            retry: flag("retry")?,
            rebind: flag("rebind")?,
        })
    }
}

/// Why an invocation returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The run has ended (in this invocation or before).
    Done,
    /// The run waits until `wakeAt`.
    Sleeping,
    /// The time budget ran out; the next invocation continues.
    OutOfBudget,
    /// Another invocation holds the lease.
    Busy,
    /// No run exists and none was asked for.
    Idle,
}

impl StopReason {
    /// The JSON name (`out_of_budget`), also used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Done => "done",
            StopReason::Sleeping => "sleeping",
            StopReason::OutOfBudget => "out_of_budget",
            StopReason::Busy => "busy",
            StopReason::Idle => "idle",
        }
    }
}

/// The JSON an invocation returns.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub sync_id: String,
    pub run_id: Option<String>,
    pub phase: Option<String>,
    pub stopped: StopReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wake_at: Option<String>,
    /// The terminal state (`status`: succeeded, failed or cancelled, with the summary).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Value>,
    /// One human line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What this invocation wrote to the DynamoDB item (also published as metrics).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_writes: Option<driver::StateWrites>,
}

impl Summary {
    fn of(sync_id: &str, run: Option<&SyncRun>, stopped: StopReason) -> Summary {
        let terminal = run.and_then(|r| r.state.terminal());
        Summary {
            sync_id: sync_id.to_string(),
            run_id: run.map(|r| r.run_id.clone()),
            phase: run.map(|r| r.state.name().to_string()),
            stopped,
            wake_at: None,
            outcome: terminal.as_ref().and_then(|t| serde_json::to_value(t).ok()),
            message: terminal.as_ref().map(report::describe_terminal),
            state_writes: None,
        }
    }
}

/// Everything built once per container: configuration, the executor (HTTP clients, tokens,
/// staging store) and the table.
pub struct SingleLambda {
    config: Config,
    settings: Settings,
    table: DynamoTable,
    executor: Arc<Executor>,
    metrics_namespace: String,
    metrics: MetricsSink,
    /// Print the event log on stdout (CloudWatch Logs); its staging copy is kept either way.
    event_log_on_stdout: bool,
    _sentry: Option<sentry::ClientInitGuard>,
}

impl std::fmt::Debug for SingleLambda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleLambda")
            .field("settings", &self.settings)
            .field("executor", &self.executor)
            .finish_non_exhaustive()
    }
}

impl SingleLambda {
    /// The cold start: configuration from the environment (secrets resolved), Sentry, SDK
    /// clients, the executor.
    pub async fn from_env() -> Result<SingleLambda, LambdaFailure> {
        let sdk = aws::sdk_config().await;
        let config =
            aws::load_config_from(std::env::vars(), EXTRA_KEYS, &aws::AwsSecrets::new(&sdk))
                .await?;
        let sentry = report::init_sentry(&config.sentry);
        let mut lambda = SingleLambda::new(config, aws_sdk_dynamodb::Client::new(&sdk)).await?;
        lambda._sentry = sentry;
        Ok(lambda)
    }

    /// Builds the runner from a parsed configuration and a DynamoDB client (tests point it at
    /// a local server).
    pub async fn new(
        config: Config,
        dynamo: aws_sdk_dynamodb::Client,
    ) -> Result<SingleLambda, LambdaFailure> {
        let settings = Settings::from_config(&config)?;
        let metrics_namespace = crate::emf::namespace(&config)?;
        let executor = Executor::new(&config.spec, &config.secrets, &config.tls)
            .await
            .map_err(|e| LambdaFailure::configuration(e.to_string()))?;
        let table = DynamoTable::new(
            dynamo,
            settings.table.clone(),
            settings.lease,
            settings.retention,
        );
        Ok(SingleLambda {
            config,
            settings,
            table,
            executor: Arc::new(executor),
            metrics_namespace,
            metrics: MetricsSink::Stdout,
            event_log_on_stdout: true,
            _sentry: None,
        })
    }

    /// Sends the metrics elsewhere than stdout (tests).
    pub fn with_metrics_sink(mut self, sink: MetricsSink) -> SingleLambda {
        self.metrics = sink;
        self
    }

    /// Keeps the event log off stdout (tests of 100,000 files: it would be 30 MB of output;
    /// the staging copy is still written).
    pub fn without_event_log_on_stdout(mut self) -> SingleLambda {
        self.event_log_on_stdout = false;
        self
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The stored run, if bound to the configured settings — or rebound on request, and
    /// saved so. Never rebinds implicitly.
    async fn admitted(
        &self,
        run: SyncRun,
        rebind: bool,
        store: &mut DynamoStore,
    ) -> Result<SyncRun, LambdaFailure> {
        match admit(run, &self.config.spec, rebind) {
            Ok(Admitted::AsStored(run)) => Ok(run),
            Ok(Admitted::Rebound { run, .. }) => {
                store.save(&run).await?;
                Ok(run)
            }
            Err(refused) => Err(LambdaFailure::state(format!(
                "{refused}; restore the settings it was started with, or invoke with \
                 {{\"rebind\": true}} to continue it with the configured ones"
            ))),
        }
    }

    pub fn table(&self) -> &DynamoTable {
        &self.table
    }

    /// One invocation (see the module docs).
    pub async fn handle(&self, event: &Value, ctx: &Context) -> Result<Summary, LambdaFailure> {
        let invocation = Invocation::parse(event, &self.settings.sync_id)?;
        let started = now();
        let requester = if ctx.request_id.is_empty() {
            "local"
        } else {
            ctx.request_id.as_str()
        };
        // Unique per invocation, even when Lambda redelivers the same request id.
        let owner = format!("{requester}/{}", uuid::Uuid::new_v4().simple());
        let sync_id = invocation.sync_id.clone();
        let result = match self.table.acquire(&sync_id, &owner).await? {
            Acquired::Busy { lease, run } => {
                tracing::info!(sync_id = %sync_id, holder = lease.as_ref().map(|l| l.owner.as_str()).unwrap_or(""), "another invocation holds the lease");
                Ok(busy(&sync_id, run.as_deref(), lease.as_ref()))
            }
            Acquired::Leased { mut store, run } => {
                let result = self
                    .work(&invocation, &mut store, run.map(|r| *r), ctx, started)
                    .await;
                store.release().await;
                result
            }
        };
        match &result {
            Ok(summary) => tracing::info!(
                sync_id = %summary.sync_id,
                run_id = summary.run_id.as_deref().unwrap_or(""),
                phase = summary.phase.as_deref().unwrap_or(""),
                stopped = summary.stopped.as_str(),
                wake_at = summary.wake_at.as_deref().unwrap_or(""),
                "invocation ends"
            ),
            Err(e) => {
                tracing::error!(sync_id = %sync_id, error_type = %e.error_type, "{}", e.message);
                if e.error_type != ErrorType::Transient {
                    report::capture_error("lambda", &e.to_string());
                }
            }
        }
        result
    }

    async fn work(
        &self,
        invocation: &Invocation,
        store: &mut DynamoStore,
        stored: Option<SyncRun>,
        ctx: &Context,
        started: Timestamp,
    ) -> Result<Summary, LambdaFailure> {
        let sync_id = invocation.sync_id.as_str();
        let ask = if invocation.cancel {
            Ask::Nothing
        } else if invocation.retry {
            Ask::Retry
        } else if invocation.scheduled || invocation.start {
            Ask::Start
        } else {
            Ask::Nothing
        };
        let mut resumed = None;
        let mut run = match (next_run(stored.as_ref(), ask), stored) {
            (NextRun::Held, Some(held)) => {
                return Err(LambdaFailure::state(format!(
                    "run {} is not retried without a check ({}); once checked, invoke with {{\"retry\": true}} to continue it or {{\"cancel\": true}} to abandon it",
                    held.run_id,
                    held.failure().map_or("", |f| f.reason.as_str())
                )));
            }
            (NextRun::Continue, Some(stored)) => {
                let run = self.admitted(stored, invocation.rebind, store).await?;
                resumed = Some(events::run_resumed(&run, false));
                if invocation.cancel {
                    driver::cancel(
                        &run,
                        store,
                        "cancelled by a direct invocation",
                        &SystemClock,
                    )
                    .await?
                    .unwrap_or(run)
                } else {
                    run
                }
            }
            (NextRun::Retry, Some(failed)) => {
                let failed = self.admitted(failed, invocation.rebind, store).await?;
                self.executor
                    .preflight(&self.config.spec.staging.run_prefix(&failed.run_id))
                    .await
                    .map_err(LambdaFailure::from)?;
                let retried = failed
                    .step(
                        Input::Retry {
                            spec: Box::new(self.config.spec.clone()),
                        },
                        now(),
                    )
                    .map_err(|e| LambdaFailure::state(e.to_string()))?;
                store.save(&retried).await?;
                tracing::info!(sync_id, run_id = %retried.run_id, phase = retried.state.name(), "retrying a failed run");
                resumed = Some(events::run_resumed(&retried, true));
                retried
            }
            (NextRun::Start { watermark }, previous) => {
                let recorded =
                    crate::watermark::read(self.executor.staging(), &self.config.spec.staging)
                        .await
                        .map_err(LambdaFailure::from)?;
                let watermark = latest(watermark, recorded);
                let run_id = crate::new_run_id(started);
                self.executor
                    .preflight(&self.config.spec.staging.run_prefix(&run_id))
                    .await
                    .map_err(LambdaFailure::from)?;
                let run = SyncRun::start(&run_id, self.config.spec.clone(), watermark, started)
                    .map_err(|e| LambdaFailure::state(e.to_string()))?;
                if previous.as_ref().is_some_and(|p| p.resumable().is_some()) {
                    tracing::warn!(
                        sync_id,
                        "a failed run that could have been retried is replaced by a new one"
                    );
                }
                store.replace(&run).await?;
                tracing::info!(sync_id, run_id = %run.run_id, "starting a new run");
                run
            }
            // A cancel also abandons a failed run that could still be retried (its kept
            // export job is deleted).
            (_, Some(failed)) if invocation.cancel && failed.resumable().is_some() => {
                let failed = self.admitted(failed, invocation.rebind, store).await?;
                driver::cancel(
                    &failed,
                    store,
                    "abandoned by a direct invocation",
                    &SystemClock,
                )
                .await?
                .unwrap_or(failed)
            }
            (_, previous) => {
                let stopped = if previous.is_some() {
                    StopReason::Done
                } else {
                    StopReason::Idle
                };
                return Ok(Summary::of(sync_id, previous.as_ref(), stopped));
            }
        };
        let executor = if run.spec == self.config.spec {
            self.executor.clone()
        } else {
            Arc::new(
                Executor::new(&run.spec, &self.config.secrets, &self.config.tls)
                    .await
                    .map_err(|e| LambdaFailure::configuration(e.to_string()))?,
            )
        };
        let sink = if self.event_log_on_stdout {
            Sink::Stdout
        } else {
            Sink::None
        };
        let log = EventLog::new(&run.run_id, executor.clone(), sink);
        if let Some(event) = resumed {
            log.record(&event);
        }
        let log_key = event_log::staging_key(&run);

        let t = now();
        let budget = aws::budget_until(ctx, t, self.settings.budget, MARGIN);
        // Cut effects still in flight well before Lambda's hard stop, so the last save and the
        // lease release still happen (files in flight count an unfinished attempt).
        let cut_at = aws::cut_after(budget, t, MARGIN);
        let lease = store.lease_watch();
        let lease_guard = (ms(self.settings.lease) / 4).min(1000);
        let watchdog = async move {
            loop {
                // Stop shortly before the lease could lapse (every save renews it).
                let stop_at = lease.load(Ordering::Acquire).saturating_sub(lease_guard);
                let now_ms = now().0;
                if now_ms >= stop_at {
                    return;
                }
                tokio::time::sleep(Duration::from_millis((stop_at - now_ms).min(1000))).await;
            }
        };
        // Never sleep past the lease: nothing renews it while asleep.
        // Saves renew the lease: a short lease (a test setting) must not outlast the save interval.
        let options = DriveOptions::new(
            self.settings.max_sleep.min(self.settings.lease / 2),
            Some(budget),
        )
        .with_save_interval(driver::SAVE_INTERVAL.min(self.settings.lease / 4))
        .with_cut_at(cut_at);
        let was_done = run.is_done();
        let observer = LogObserver::default();
        let metrics = Emf::new(
            &self.metrics_namespace,
            "single-lambda",
            &run.run_id,
            self.metrics.clone(),
        );
        let saves = driver::SaveCount::default();
        let drove = driver::drive(
            run.clone(),
            executor.as_ref(),
            store,
            &options,
            &All(&[&observer, &log, &metrics, &saves]),
            watchdog,
        )
        .await;
        metrics.flush();
        // The run's own copy of its event log, whatever happened (best effort: it is a record).
        if let Err(e) = log.flush(executor.staging(), &log_key).await {
            tracing::warn!(run_id = %run.run_id, "could not keep the event log next to the staged data: {e}");
        }
        let (latest, stopped) = match drove {
            Ok(x) => x,
            Err(DriveError::Store(e)) => return Err(e.into()),
        };
        run = latest;
        let mut summary = Summary::of(sync_id, Some(&run), StopReason::Done);
        summary.state_writes = Some(saves.figures());
        match stopped {
            Stopped::Done(terminal) => {
                if let (Terminal::Failed(f), false) = (terminal.as_ref(), was_done) {
                    report::capture_failure(&run.run_id, "lambda", f);
                }
                if let Some(w) = run.watermark.as_ref().filter(|w| w.run_id == run.run_id) {
                    // Best effort: the item holds the watermark too.
                    if let Err(e) =
                        crate::watermark::record(executor.staging(), &run.spec.staging, w).await
                    {
                        tracing::warn!(run_id = %run.run_id, "could not record the watermark in the staging store: {e}");
                    }
                }
            }
            Stopped::Sleeping { until } => {
                summary.stopped = StopReason::Sleeping;
                summary.wake_at = Some(until.to_fhir_instant());
            }
            Stopped::OutOfBudget | Stopped::Interrupted => {
                summary.stopped = StopReason::OutOfBudget;
                if let Next::SleepUntil { until, .. } = run.next(now()) {
                    summary.wake_at = Some(until.to_fhir_instant());
                }
            }
        }
        Ok(summary)
    }
}

fn busy(sync_id: &str, run: Option<&SyncRun>, lease: Option<&Lease>) -> Summary {
    let mut s = Summary::of(sync_id, run, StopReason::Busy);
    s.message = Some(match lease {
        Some(l) => format!(
            "another invocation holds the lease until {}",
            l.expires.to_fhir_instant()
        ),
        None => "another invocation took the lease".to_string(),
    });
    s
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn events_are_read() {
        let direct = Invocation::parse(&json!({"syncId": "s1", "start": true}), "d").unwrap();
        assert_eq!(
            direct,
            Invocation {
                sync_id: "s1".into(),
                scheduled: false,
                start: true,
                cancel: false,
                retry: false,
                rebind: false
            }
        );
        assert!(
            Invocation::parse(&json!({"retry": true}), "d")
                .unwrap()
                .retry
        );
        assert!(Invocation::parse(&json!({"retry": 1}), "d").is_err());
        let rule = json!({"version": "0", "source": "aws.events", "detail-type": "Scheduled Event", "detail": {}});
        let scheduled = Invocation::parse(&rule, "d").unwrap();
        assert!(scheduled.scheduled && scheduled.sync_id == "d");
        assert!(
            Invocation::parse(&json!({"scheduled": true}), "d")
                .unwrap()
                .scheduled
        );
        assert!(!Invocation::parse(&Value::Null, "d").unwrap().start);
        let e = Invocation::parse(&json!({"syncId": "../x"}), "d").unwrap_err();
        assert_eq!(e.error_type, ErrorType::Configuration);
        assert!(Invocation::parse(&json!({"start": "yes"}), "d").is_err());
        assert!(Invocation::parse(&json!([1]), "d").is_err());
    }

    #[test]
    fn summaries_serialize_in_camel_case() {
        let s = Summary {
            sync_id: "s".into(),
            run_id: Some("r".into()),
            phase: Some("staging_files".into()),
            stopped: StopReason::OutOfBudget,
            wake_at: None,
            outcome: None,
            message: None,
            state_writes: None,
        };
        assert_eq!(
            serde_json::to_value(StopReason::OutOfBudget).unwrap(),
            StopReason::OutOfBudget.as_str()
        );
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            json!({"syncId": "s", "runId": "r", "phase": "staging_files", "stopped": "out_of_budget"})
        );
    }
}
