//! The Step Functions runner: a stateless task whose payload *is* the store.
//!
//! `state-machine.json` calls the `pathling-import-sfn` Lambda in a loop. Each invocation
//! takes the run's envelope from its input, drives the machine through the shared
//! [`Executor`] and [`driver::drive`] for as long as its time budget allows, and returns the
//! new envelope with what the state machine must do next:
//!
//! ```text
//! input:  {"envelope": <persist envelope> | null, "watermark"?: {...}, "cancel"?: "reason",
//!          "retry"?: true, "fanOut"?: {...}}   (or {"fanOutItem": {...}}: one Map item)
//! output: {"envelope": {...}, "runId": "...", "phase": "staging_files",
//!          "action": "continue" | "wait" | "fan_out" | "succeed" | "fail",
//!          "fanOut": {"bucket", "itemsKey", "resultsPrefix", "items", "maxConcurrency"},
//!                                                                       (action "fan_out")
//!          "waitSeconds": 30, "waitUntil": "2026-01-01T00:00:30Z",      (action "wait")
//!          "summary": {...},                                            (succeed / fail)
//!          "error": {"name": "SyncFailedError", "cause": "failed in …"}, (action "fail")
//!          "watermark": {"transaction_time": "...", "run_id": "..."} | null,
//!          "status": "staging_files: 12/40 file(s) staged"}
//! ```
//!
//! - No envelope: a new run starts from the configuration (the environment). With
//!   `SINCE=auto` its `_since` is the input's `watermark` when given (a previous execution's
//!   output `watermark`), else the one the last successful run recorded at
//!   `{prefix}watermark.json` in the staging store (see [`crate::watermark`]), so that a
//!   scheduled execution started with `{}` is incremental. A run that failed after its
//!   export was known (recorded at `{prefix}sfn-resume.json`) is retried instead; one whose
//!   failure asks for a check first only with `"retry": true`.
//! - `continue`: the budget ran out with work left; call again at once.
//! - `wait`: the machine waits (a server's `Retry-After`, a poll interval, a backoff) longer
//!   than [`aws::LAMBDA_MAX_SLEEP`]; call again at `waitUntil` (`waitSeconds` from now).
//! - `succeed` / `fail`: the run has ended (`fail` also for a cancelled run).
//! - `fan_out` ([`FAN_OUT_FILES`]): a batch of due files is written as the items of the
//!   definition's Distributed Map; each item comes back as `{"fanOutItem": ...}`, which stages
//!   that one file and writes its result beside the items; the next invocation, given the same
//!   payload, folds the results into the run ([`driver::fold`]) and goes on. A large file
//!   split into byte ranges ([`FAN_OUT_RANGE_MB`], [`crate::staging::split`]) is one item per
//!   range, `{"fanOut", "n", "range"}`, and the fold completes its upload once all are in.
//!
//! The envelope stays compact (file URLs live in the manifest the executor stored in the
//! staging store), so the payload stays far below Step Functions' 256 KiB for manifests of
//! thousands of files (`tests/tests/sfn_task.rs` measures a 10,000-file export).
//!
//! The original's five handlers, for its Step Functions definition, are in [`compat`].

pub mod compat;

use crate::aws::{self, LambdaFailure};
use crate::driver::{
    self, All, DriveOptions, LogObserver, RunStore, Stopped, StoreError, SystemClock,
};
use crate::emf::{Emf, MetricsSink};
use crate::event_log::{self, EventLog, Sink};
use crate::executor::{now, Executor, RangeFailure};
use crate::report;
use crate::resume::admit;
use crate::staging::split::{RangeDone, SplitPlan};
use crate::staging::{StagingError, StagingStore};
use pathling_import_core::config::{Config, Secrets, TlsConfig};
use pathling_import_core::effect::{Effect, EffectId, EffectResult, Input, Request};
use pathling_import_core::events;
use pathling_import_core::machine::MAX_RETRYING;
use pathling_import_core::persist;
use pathling_import_core::plan::{latest, next_run, Ask, NextRun};
use pathling_import_core::retry::{classify, Failure, FailureKind, Verdict};
use pathling_import_core::spec::{RunSpec, SinceSpec};
use pathling_import_core::staging::StagingLocation;
use pathling_import_core::state::{FileStatus, SyncState};
use pathling_import_core::time::parse_fhir_instant;
use pathling_import_core::{SyncRun, Terminal, Timestamp, Watermark};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// Short waits (a `Retry-After: 1`) cost less inside the invocation than a Wait state and a
/// second invocation.
pub const DEFAULT_MAX_SLEEP: Duration = Duration::from_secs(5);
/// Time kept free before the invocation's deadline: effects in flight when the budget ends
/// (a large download) still finish and are returned.
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(45);
/// The largest output the task returns: Step Functions refuses a state of more than 256 KiB
/// (`States.DataLimitExceeded`); a little is kept free for the execution's own fields.
pub const PAYLOAD_LIMIT: usize = 250 * 1024;
/// The largest [`FAN_OUT_RANGE_MB`]: 64 GiB (a range is whole parts of at most 5 GiB).
const MAX_RANGE_MB: u64 = 64 * 1024;
/// Every invocation may start work for at least this long, so that a loop always makes
/// progress (the first effect always starts).
const MIN_BUDGET_MS: u64 = 100;

/// `FAN_OUT_FILES`: with S3 staging, a batch of at least this many due files is handed to the
/// definition's Distributed Map, one Lambda per file, instead of moving through this
/// invocation (unset or 0: never).
pub const FAN_OUT_FILES: &str = "FAN_OUT_FILES";
/// `FAN_OUT_CONCURRENCY`: how many of a fan-out's Lambdas run at once (the Map's
/// `MaxConcurrency`; at most a batch, [`MAX_RETRYING`]; default
/// [`DEFAULT_FAN_OUT_CONCURRENCY`]).
pub const FAN_OUT_CONCURRENCY: &str = "FAN_OUT_CONCURRENCY";
pub const DEFAULT_FAN_OUT_CONCURRENCY: u64 = MAX_RETRYING as u64;
/// `FAN_OUT_RANGE_MB`: with fanning out on, a file at least twice this long (in MiB) whose
/// source serves ranges moves as ranges of this size (whole parts), one item each, so that
/// many Lambdas move it at once (unset or 0: every file is one item).
pub const FAN_OUT_RANGE_MB: &str = "FAN_OUT_RANGE_MB";

/// The Step Functions task's runner-specific configuration keys.
pub const EXTRA_KEYS: &[&str] = &[
    aws::LAMBDA_TIME_BUDGET,
    aws::LAMBDA_MAX_SLEEP,
    crate::emf::METRICS_NAMESPACE,
    FAN_OUT_FILES,
    FAN_OUT_CONCURRENCY,
    FAN_OUT_RANGE_MB,
];

/// A whole-number runner key within `range`, if set.
fn count_setting(
    config: &Config,
    key: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, LambdaFailure> {
    let Some(text) = config.extras.get(key) else {
        return Ok(None);
    };
    match text.trim().parse::<u64>() {
        Ok(n) if range.contains(&n) => Ok(Some(n)),
        _ => Err(LambdaFailure::configuration(format!(
            "{key}: expected a whole number from {} to {}, got {text:?}",
            range.start(),
            range.end()
        ))),
    }
}

/// One executor per container, rebuilt only for a run whose snapshotted spec differs from
/// the current configuration (a run started before a redeploy keeps its own settings).
pub struct ExecutorCache {
    secrets: Secrets,
    tls: TlsConfig,
    slot: Mutex<Option<(RunSpec, Arc<Executor>)>>,
}

impl ExecutorCache {
    pub fn new(config: &Config) -> Self {
        ExecutorCache {
            secrets: config.secrets.clone(),
            tls: config.tls.clone(),
            slot: Mutex::new(None),
        }
    }

    /// The executor for `spec`: HTTP client, authenticators and staging store, built once.
    pub async fn for_spec(&self, spec: &RunSpec) -> Result<Arc<Executor>, LambdaFailure> {
        let mut slot = self.slot.lock().await;
        if let Some((cached, executor)) = slot.as_ref() {
            if cached == spec {
                return Ok(executor.clone());
            }
        }
        let executor = Executor::new(spec, &self.secrets, &self.tls)
            .await
            .map_err(|e| LambdaFailure::configuration(e.to_string()))?;
        let executor = Arc::new(executor);
        *slot = Some((spec.clone(), executor.clone()));
        Ok(executor)
    }
}

/// The budget an invocation works with: the deadline (or `LAMBDA_TIME_BUDGET`) less the
/// margin, but never less than [`MIN_BUDGET_MS`].
pub fn effective_budget(budget_until: Timestamp, now: Timestamp) -> Timestamp {
    budget_until.max(now.plus_ms(MIN_BUDGET_MS))
}

/// The Step Functions task: configuration and clients, built once per container.
pub struct Task {
    config: Config,
    executors: ExecutorCache,
    max_sleep: Duration,
    budget: Option<Duration>,
    metrics_namespace: String,
    metrics: MetricsSink,
    /// Print the event log on stdout (CloudWatch Logs); its staging copy is kept either way.
    event_log_on_stdout: bool,
    /// [`FAN_OUT_FILES`], when fanning out is on.
    fan_out_files: Option<usize>,
    fan_out_concurrency: u64,
    /// [`FAN_OUT_RANGE_MB`] in bytes, when large files are split.
    fan_out_range: Option<u64>,
}

impl Task {
    /// Validates the runner keys and builds the executor for the configured spec, so that a
    /// bad key or credential fails at start-up with a `ConfigurationError`.
    pub async fn new(config: Config) -> Result<Task, LambdaFailure> {
        let max_sleep = aws::max_sleep(&config, DEFAULT_MAX_SLEEP)?;
        let budget = aws::configured_budget(&config)?;
        let metrics_namespace = crate::emf::namespace(&config)?;
        // A batch holds at most MAX_RETRYING files: a larger threshold would never be met.
        let most = MAX_RETRYING as u64;
        let fan_out_files = count_setting(&config, FAN_OUT_FILES, 0..=most)?
            .filter(|n| *n > 0)
            .map(|n| usize::try_from(n).unwrap_or(MAX_RETRYING));
        let fan_out_concurrency = count_setting(&config, FAN_OUT_CONCURRENCY, 1..=most)?
            .unwrap_or(DEFAULT_FAN_OUT_CONCURRENCY);
        let fan_out_range = count_setting(&config, FAN_OUT_RANGE_MB, 0..=MAX_RANGE_MB)?
            .filter(|n| *n > 0)
            .map(|mib| mib * 1024 * 1024);
        if fan_out_range.is_some() && fan_out_files.is_none() {
            return Err(LambdaFailure::configuration(format!(
                "{FAN_OUT_RANGE_MB}: ranges are items of the fan-out, so it needs {FAN_OUT_FILES}"
            )));
        }
        if fan_out_files.is_some() && !matches!(config.spec.staging, StagingLocation::S3 { .. }) {
            return Err(LambdaFailure::configuration(format!(
                "{FAN_OUT_FILES}: a Distributed Map reads its items from S3, so fanning out \
                 needs an s3:// staging location"
            )));
        }
        let executors = ExecutorCache::new(&config);
        executors.for_spec(&config.spec).await?;
        Ok(Task {
            config,
            executors,
            max_sleep,
            budget,
            metrics_namespace,
            metrics: MetricsSink::Stdout,
            event_log_on_stdout: true,
            fan_out_files,
            fan_out_concurrency,
            fan_out_range,
        })
    }

    /// Sends the metrics elsewhere than stdout (tests).
    pub fn with_metrics_sink(mut self, sink: MetricsSink) -> Task {
        self.metrics = sink;
        self
    }

    /// Keeps the event log off stdout (tests of 100,000 files: it would be 30 MB of output;
    /// the staging copy is still written).
    pub fn without_event_log_on_stdout(mut self) -> Task {
        self.event_log_on_stdout = false;
        self
    }

    /// `LAMBDA_TIME_BUDGET`, for [`aws::budget_until`].
    pub fn configured_budget(&self) -> Option<Duration> {
        self.budget
    }

    /// A stored run is only driven when bound to the configured settings; the task never
    /// rebinds (whoever can start an execution could otherwise choose the endpoints).
    fn admitted(&self, run: SyncRun) -> Result<SyncRun, LambdaFailure> {
        match admit(run, &self.config.spec, false) {
            Ok(admitted) => Ok(admitted.run().clone()),
            Err(refused) => Err(LambdaFailure::state(refused.to_string())),
        }
    }

    /// One invocation: decode (or start) the run, drive it until `budget_until`, and say what
    /// the state machine does next.
    pub async fn invoke(
        &self,
        input: Value,
        budget_until: Timestamp,
    ) -> Result<Value, LambdaFailure> {
        let input = match input {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => {
                return Err(LambdaFailure::state(format!(
                    "the task input must be a JSON object, got {}",
                    json_kind(&other)
                )))
            }
        };
        if let Some(item) = input.get("fanOutItem") {
            if self.fan_out_files.is_none() {
                return Err(LambdaFailure::state(format!(
                    "a fan-out item, but {FAN_OUT_FILES} is not set"
                )));
            }
            return self.stage_item(item, budget_until).await;
        }
        let cancel = match input.get("cancel") {
            None | Some(Value::Null) => None,
            Some(Value::String(reason)) => Some(reason.as_str()),
            Some(other) => {
                return Err(LambdaFailure::state(format!(
                    "the task input's cancel must be a string (the reason), got {}",
                    json_kind(other)
                )))
            }
        };
        let retry = match input.get("retry") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(LambdaFailure::state(format!(
                    "the task input's retry must be true or false, got {}",
                    json_kind(other)
                )))
            }
        };
        let home = self.executors.for_spec(&self.config.spec).await?;
        let staging = home.staging();
        let location = &self.config.spec.staging;
        let mut store = PayloadStore::default();
        let run = match input.get("envelope").filter(|v| !v.is_null()) {
            Some(envelope) => {
                let run = persist::decode_value(envelope.clone(), persist::UPCASTERS)
                    .map_err(|e| LambdaFailure::state(format!("the task input's envelope: {e}")))?;
                self.admitted(run)?
            }
            None => match read_resume(staging, location).await? {
                // A run that failed after its export was known: this execution continues it.
                Some(failed) => {
                    let failed = self.admitted(failed)?;
                    let ask = if retry { Ask::Retry } else { Ask::Start };
                    match (cancel, next_run(Some(&failed), ask)) {
                        (Some(_), _) => failed,
                        (None, NextRun::Held) => {
                            return Err(LambdaFailure::state(format!(
                                "run {} is not retried without a check ({}); once checked, start an execution with {{\"retry\": true}} to continue it or {{\"cancel\": \"<reason>\"}} to abandon it",
                                failed.run_id,
                                failed.failure().map_or("", |f| f.reason.as_str())
                            )))
                        }
                        (None, _) => {
                            home.preflight(&location.run_prefix(&failed.run_id))
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
                            tracing::info!(run_id = %retried.run_id, phase = retried.state.name(), "retrying a failed run");
                            retried
                        }
                    }
                }
                None if retry => {
                    return Err(LambdaFailure::state(format!(
                        "nothing to retry: no failed run is recorded at {}",
                        resume_key(location)
                    )))
                }
                None => {
                    let watermark = if self.config.spec.export.since == SinceSpec::LastSuccess {
                        let recorded = crate::watermark::read(staging, location)
                            .await
                            .map_err(LambdaFailure::from)?;
                        latest(parse_watermark(input.get("watermark"))?, recorded)
                    } else {
                        None
                    };
                    let run_id = crate::new_run_id(now());
                    home.preflight(&location.run_prefix(&run_id))
                        .await
                        .map_err(LambdaFailure::from)?;
                    let run = SyncRun::start(&run_id, self.config.spec.clone(), watermark, now())
                        .map_err(|e| LambdaFailure::state(e.to_string()))?;
                    tracing::info!(run_id = %run.run_id, "starting a new run");
                    run
                }
            },
        };
        let run = match cancel {
            Some(reason) => driver::cancel(&run, &mut store, reason, &SystemClock)
                .await
                .map_err(LambdaFailure::from)?
                .unwrap_or(run),
            None => run,
        };
        let executor = self.executors.for_spec(&run.spec).await?;
        executor.split_files(self.fan_out_range);
        let t = now();
        let budget = effective_budget(budget_until, t);
        // Cut what is in flight before Lambda's hard stop (files in flight count an unfinished
        // attempt), so that the answer still goes out.
        let options = DriveOptions::new(self.max_sleep, Some(budget)).with_cut_at(aws::cut_after(
            budget,
            t,
            DEADLINE_MARGIN,
        ));
        let sink = if self.event_log_on_stdout {
            Sink::Stdout
        } else {
            Sink::None
        };
        let log = EventLog::new(&run.run_id, executor.clone(), sink);
        if run.seq > 0 {
            log.record(&events::run_resumed(&run, false));
        }
        let log_key = event_log::staging_key(&run);
        let metrics = Emf::new(
            &self.metrics_namespace,
            "step-functions",
            &run.run_id,
            self.metrics.clone(),
        );
        let log_observer = LogObserver::default();
        let observers = All(&[&log_observer, &log, &metrics]);
        // What the Map's Lambdas staged goes into the run first.
        let run = match input.get("fanOut").filter(|v| !v.is_null()) {
            Some(fan_out) if cancel.is_none() => {
                let results = read_fan_out(executor.staging(), &run, fan_out).await?;
                driver::fold(run, results, &mut store, &observers, &SystemClock)
                    .await
                    .map_err(|e| LambdaFailure::transient(e.to_string()))?
            }
            _ => run,
        };
        // With fanning out on, the drive stops where a batch of files is due (the export
        // just finished, or a fan-out's results left files to retry) and hands it to the Map.
        let fan_out_at = self.fan_out_files.filter(|_| cancel.is_none());
        // A file split into ranges is only ever moved by its range items: it fans out
        // whatever the threshold.
        let (split, listed) = match (fan_out_at, self.fan_out_range) {
            (Some(_), Some(_)) => {
                let batch = run.fan_out_batch(now());
                let listed: std::collections::HashSet<String> =
                    batch.iter().map(|r| staged_key(r).to_owned()).collect();
                (splits(executor.staging(), &batch).await?, listed)
            }
            _ => (Splits::new(), Default::default()),
        };
        let fans_out = |run: &SyncRun| {
            fan_out_at.is_some_and(|threshold| {
                let batch = run.fan_out_batch(now());
                batch.len() >= threshold
                    || batch.iter().any(|r| {
                        split.contains_key(staged_key(r)) || executor.is_split(staged_key(r))
                    })
            })
        };
        let drove = if fans_out(&run) {
            Ok((run, Stopped::Interrupted))
        } else {
            driver::drive_until(
                run,
                executor.as_ref(),
                &mut store,
                &options,
                &observers,
                std::future::pending(),
                fans_out,
            )
            .await
        };
        metrics.flush();
        // The run's own copy of its event log (best effort: it is a record).
        if let Err(e) = log.flush(executor.staging(), &log_key).await {
            tracing::warn!("could not keep the event log next to the staged data: {e}");
        }
        let (run, stopped) = drove.map_err(|e| LambdaFailure::transient(e.to_string()))?;
        let fanned_out = if matches!(stopped, Stopped::Interrupted) && fans_out(&run) {
            // What was listed at the start still holds unless the drive split a file or
            // made others due: plans and range records change only in items.
            let batch = run.fan_out_batch(now());
            let known = batch.iter().all(|r| {
                let key = staged_key(r);
                listed.contains(key) && (split.contains_key(key) || !executor.is_split(key))
            });
            Some(
                self.fan_out(&run, batch, executor.staging(), known.then_some(&split))
                    .await?,
            )
        } else {
            None
        };
        if run.is_done() {
            clear_fan_outs(executor.staging(), &run, None).await;
            // A failed run that a retry continues keeps its plans: its split files go on
            // from the ranges stored.
            if self.fan_out_range.is_some() && run.resumable().is_none() {
                clear_splits(executor.staging(), &run).await;
            }
        }
        if let Stopped::Done(terminal) = &stopped {
            if let Terminal::Failed(f) = terminal.as_ref() {
                report::capture_failure(&run.run_id, "step-functions", f);
            }
            if let Some(w) = run.watermark.as_ref().filter(|w| w.run_id == run.run_id) {
                crate::watermark::record(executor.staging(), &run.spec.staging, w)
                    .await
                    .map_err(LambdaFailure::from)?;
            }
            // A run that can still be retried waits at `{prefix}sfn-resume.json` for the
            // next execution; any other end clears it.
            record_resume(executor.staging(), &run.spec.staging, &run).await?;
        }
        let output = match fanned_out {
            Some(output) => output,
            None => task_output(&run, &stopped, now()),
        };
        let bytes = serde_json::to_vec(&output).map(|v| v.len()).unwrap_or(0);
        if bytes > PAYLOAD_LIMIT {
            return Err(LambdaFailure::sync_failed(format!(
                "run {} in {}: the task's output is {} KiB, more than a Step Functions payload \
                 may carry (256 KiB); narrow the export (TYPES, EXPORT_LEVEL, PATIENTS) or use \
                 the single-Lambda runner, whose DynamoDB item holds up to 400 KB",
                run.run_id,
                run.state.name(),
                bytes / 1024
            )));
        }
        Ok(output)
    }
}

impl Task {
    /// Hands the due batch to the definition's Distributed Map and answers `fan_out`: the
    /// requests go to `{run prefix}fanout/{seq}/requests.json`, and the Map's items
    /// (`items.json`) only point into it, `{"fanOut": "<that folder>", "n": <position>}`, so
    /// that an item can only ever ask for a request this task wrote. The Map runs one Lambda
    /// per item ([`Task::stage_item`]), then calls the task again with the same payload, which
    /// folds their results into the run. `known`: the batch's split files, when the listing
    /// taken at the invocation's start still holds; otherwise they are listed again.
    async fn fan_out(
        &self,
        run: &SyncRun,
        batch: Vec<Request>,
        staging: &StagingStore,
        known: Option<&Splits>,
    ) -> Result<Value, LambdaFailure> {
        let StagingLocation::S3 { bucket, .. } = &run.spec.staging else {
            return Err(LambdaFailure::configuration(format!(
                "{FAN_OUT_FILES} needs an s3:// staging location"
            )));
        };
        let dir = fan_out_dir(run);
        let put = |key: String, value: Value| async move {
            let body =
                serde_json::to_vec(&value).map_err(|e| LambdaFailure::state(e.to_string()))?;
            staging
                .put_bytes(&key, bytes::Bytes::from(body))
                .await
                .map_err(|e| {
                    storage_failure(&format!("writing {key}"), &e, aws::ErrorType::Configuration)
                })
        };
        put(format!("{dir}requests.json"), json!(batch)).await?;
        let listed;
        let split = match (self.fan_out_range, known) {
            (Some(_), Some(known)) => known,
            (Some(_), None) => {
                listed = splits(staging, &batch).await?;
                &listed
            }
            (None, _) => &Splits::new(),
        };
        let mut items = Vec::new();
        for (n, request) in batch.iter().enumerate() {
            match split.get(staged_key(request)) {
                // One item per range still to store.
                Some((plan, done)) => items.extend(
                    (0..plan.ranges())
                        .filter(|i| !done.contains(i))
                        .map(|i| json!({"fanOut": dir, "n": n, "range": i})),
                ),
                None => items.push(json!({"fanOut": dir, "n": n})),
            }
        }
        let items_key = format!("{dir}items.json");
        let count = items.len();
        put(items_key.clone(), Value::Array(items)).await?;
        tracing::info!(
            run_id = %run.run_id,
            files = batch.len(),
            items = count,
            "handing {} file(s) to the Distributed Map as {count} item(s) ({items_key})",
            batch.len()
        );
        let mut output = task_output(run, &Stopped::OutOfBudget, now());
        if let Value::Object(out) = &mut output {
            out.insert("action".into(), json!("fan_out"));
            out.insert(
                "fanOut".into(),
                json!({
                    "bucket": bucket,
                    "itemsKey": items_key,
                    "items": count,
                    "maxConcurrency": self.fan_out_concurrency,
                }),
            );
        }
        Ok(output)
    }

    /// One item of a fan-out: stages its one file with the shared executor, within the
    /// invocation's budget (winding down at the budget's end and cut before the deadline,
    /// as the drive does), and writes the result where the task folds it from.
    async fn stage_item(
        &self,
        item: &Value,
        budget_until: Timestamp,
    ) -> Result<Value, LambdaFailure> {
        let dir = item
            .get("fanOut")
            .and_then(Value::as_str)
            .filter(|d| is_fan_out_dir(&self.config.spec.staging, d))
            .ok_or_else(|| {
                LambdaFailure::state("the fan-out item does not name a run's fan-out folder")
            })?;
        let n = item
            .get("n")
            .and_then(Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| LambdaFailure::state("the fan-out item has no position n"))?;
        let executor = self.executors.for_spec(&self.config.spec).await?;
        executor.split_files(self.fan_out_range);
        let requests = read_requests(executor.staging(), dir).await?;
        let request = requests.into_iter().nth(n).ok_or_else(|| {
            LambdaFailure::state(format!("{dir}requests.json has no request {n}"))
        })?;
        let (Effect::StageFile { key, .. }, EffectId::File { index, .. }) =
            (&request.effect, request.id)
        else {
            return Err(LambdaFailure::state(format!(
                "{dir}requests.json: request {n} stages no file"
            )));
        };
        let t = now();
        let budget = effective_budget(budget_until, t);
        let cut = aws::cut_after(budget, t, DEADLINE_MARGIN);
        let until = |at: Timestamp| tokio::time::sleep(Duration::from_millis(now().until(at)));
        if let Some(range) = item.get("range") {
            let i = range
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| LambdaFailure::state("the fan-out item's range is not a number"))?;
            let staged = tokio::select! {
                r = self.stage_range(&executor, dir, &request, i) => r?,
                () = until(cut) => {
                    // The Map's retry gives the range a fresh invocation.
                    return Err(LambdaFailure::transient(format!(
                        "the invocation ended in range {i} of {key}"
                    )));
                }
            };
            return match staged {
                Ok(()) => Ok(json!({"file": index, "key": key, "range": i, "outcome": "staged"})),
                Err(result) => {
                    let outcome = write_result(executor.staging(), dir, &request, &result).await?;
                    Ok(json!({"file": index, "key": key, "range": i, "outcome": outcome}))
                }
            };
        }
        executor.wind_down(false);
        let finished = {
            let execution = executor.execute(&request);
            tokio::pin!(execution);
            tokio::select! {
                r = &mut execution => Some(r),
                () = until(budget) => {
                    executor.wind_down(true);
                    tokio::select! {
                        r = &mut execution => Some(r),
                        () = until(cut) => None,
                    }
                }
            }
        };
        let result = finished.unwrap_or_else(|| {
            let kind = if executor.progressed(&request) {
                FailureKind::Paused
            } else {
                FailureKind::Unfinished
            };
            EffectResult::Failed(Failure::new(
                kind,
                format!("the invocation ended in the transfer of {key}"),
            ))
        });
        let outcome = write_result(executor.staging(), dir, &request, &result).await?;
        Ok(json!({"file": index, "key": key, "outcome": outcome}))
    }

    /// Range `i` of a split file: stored and recorded (`Ok(Ok)`), or the file's result when
    /// the range shows the file cannot go on as planned (`Ok(Err)`: the source changed it, or
    /// its lines are not what the manifest says). A failure that may pass is the item's error,
    /// for the Map's retry.
    async fn stage_range(
        &self,
        executor: &Executor,
        dir: &str,
        request: &Request,
        i: u32,
    ) -> Result<Result<(), EffectResult>, LambdaFailure> {
        let Effect::StageFile { key, .. } = &request.effect else {
            return Err(LambdaFailure::state(
                "a range item of a request that stages no file",
            ));
        };
        let StagingStore::S3(s3) = executor.staging() else {
            return Err(LambdaFailure::configuration(format!(
                "{FAN_OUT_RANGE_MB} needs an s3:// staging location"
            )));
        };
        let store_failure = |what: &str, e: &StagingError| {
            storage_failure(
                &format!("{what} of {key}"),
                e,
                aws::ErrorType::Configuration,
            )
        };
        let Some(plan) = s3
            .split_plan(key.as_str())
            .await
            .map_err(|e| store_failure("reading the split plan", &e))?
        else {
            // Voided by another range's item (the file changed), which wrote the result.
            tracing::warn!(key = %key, range = i, "no split plan any more: nothing to do");
            return Ok(Ok(()));
        };
        if s3
            .range_done(key.as_str(), &plan, i)
            .await
            .map_err(|e| store_failure("reading range records", &e))?
            .is_some()
        {
            return Ok(Ok(()));
        }
        let staged = executor.stage_range(request, &plan, i, dir).await;
        // Another range's item may have voided the plan meanwhile (aborting the upload under
        // this one): its verdict stands, and this range's failure says nothing of the file.
        let current = s3
            .split_plan(key.as_str())
            .await
            .map_err(|e| store_failure("reading the split plan", &e))?;
        if current.is_none_or(|c| c.upload_id != plan.upload_id) {
            tracing::info!(key = %key, range = i, "the split plan was voided meanwhile");
            return Ok(Ok(()));
        }
        let failure = match staged {
            Ok(done) => {
                s3.record_range(key.as_str(), i, &done)
                    .await
                    .map_err(|e| store_failure("recording a range", &e))?;
                return Ok(Ok(()));
            }
            Err(RangeFailure::Changed(f)) => f,
            Err(RangeFailure::Failed(f)) if classify(&f) == Verdict::Permanent => f,
            Err(RangeFailure::Failed(f)) => return Err(LambdaFailure::transient(f.to_string())),
        };
        s3.forget_split(key.as_str())
            .await
            .map_err(|e| store_failure("dropping the split plan", &e))?;
        Ok(Err(EffectResult::Failed(failure)))
    }
}

/// The key a request stages its file to (`""` for another effect).
fn staged_key(request: &Request) -> &str {
    match &request.effect {
        Effect::StageFile { key, .. } => key.as_str(),
        _ => "",
    }
}

/// Writes the result of a fan-out's file where the task folds it from; returns its outcome.
async fn write_result(
    staging: &StagingStore,
    dir: &str,
    request: &Request,
    result: &EffectResult,
) -> Result<&'static str, LambdaFailure> {
    let (Effect::StageFile { key, .. }, EffectId::File { index, .. }) =
        (&request.effect, request.id)
    else {
        return Err(LambdaFailure::state(
            "a fan-out result of a request that stages no file",
        ));
    };
    let outcome = match result {
        EffectResult::Failed(f) => f.kind.name(),
        _ => "staged",
    };
    let result_key = format!("{dir}results/{index}.json");
    let body = serde_json::to_vec(&json!({"id": request.id, "result": result}))
        .map_err(|e| LambdaFailure::state(e.to_string()))?;
    staging
        .put_bytes(&result_key, bytes::Bytes::from(body))
        .await
        .map_err(|e| {
            storage_failure(
                &format!("staging {key}: writing its result {result_key}"),
                &e,
                aws::ErrorType::Configuration,
            )
        })?;
    Ok(outcome)
}

/// The files of `batch` split into ranges ([`FAN_OUT_RANGE_MB`]): their plans, and the ranges
/// already stored. One listing per folder of the batch's files.
type Splits = std::collections::HashMap<String, (SplitPlan, std::collections::HashSet<u32>)>;

async fn splits(staging: &StagingStore, batch: &[Request]) -> Result<Splits, LambdaFailure> {
    let mut out = Splits::new();
    let StagingStore::S3(s3) = staging else {
        return Ok(out);
    };
    let mut listed: std::collections::HashMap<String, Vec<String>> = Default::default();
    for request in batch {
        let Effect::StageFile { key, .. } = &request.effect else {
            continue;
        };
        let (folder, name) = key.as_str().rsplit_once('/').unwrap_or(("", key.as_str()));
        let prefix = if folder.is_empty() {
            ".resume/".to_owned()
        } else {
            format!("{folder}/.resume/")
        };
        let names = match listed.get(&prefix) {
            Some(names) => names,
            None => {
                let keys = s3.list(&prefix).await.map_err(|e| {
                    storage_failure(
                        &format!("listing {prefix}"),
                        &e,
                        aws::ErrorType::Configuration,
                    )
                })?;
                let names = keys
                    .iter()
                    .filter_map(|k| k.strip_prefix(&prefix).map(str::to_owned))
                    .collect();
                listed.entry(prefix.clone()).or_insert(names)
            }
        };
        if !names.iter().any(|n| *n == format!("{name}.split.json")) {
            continue;
        }
        let Some(plan) = s3.split_plan(key.as_str()).await.map_err(|e| {
            storage_failure(
                &format!("reading the split plan of {key}"),
                &e,
                aws::ErrorType::Configuration,
            )
        })?
        else {
            continue;
        };
        let ranges = format!("{name}.range.");
        let listed = names
            .iter()
            .filter_map(|n| n.strip_prefix(&ranges)?.strip_suffix(".json")?.parse().ok())
            .filter(|i| *i < plan.ranges());
        // Only records of this plan's upload count.
        let done = range_records(s3, key.as_str(), &plan, listed)
            .await
            .map_err(|e| {
                storage_failure(
                    &format!("reading range records of {key}"),
                    &e,
                    aws::ErrorType::Configuration,
                )
            })?
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        out.insert(key.as_str().to_owned(), (plan, done));
    }
    Ok(out)
}

/// Where a run's fan-out of its current step keeps its requests, items and results.
fn fan_out_dir(run: &SyncRun) -> String {
    format!(
        "{}fanout/{}/",
        run.spec.staging.run_prefix(&run.run_id),
        run.seq
    )
}

/// Whether `dir` is `{staging prefix}{run id}/fanout/{seq}/`, as [`fan_out_dir`] makes them.
fn is_fan_out_dir(location: &StagingLocation, dir: &str) -> bool {
    let StagingLocation::S3 { prefix, .. } = location else {
        return false;
    };
    let Some(rest) = dir.strip_prefix(prefix.as_str()) else {
        return false;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let run_id_ok = |id: &str| {
        !id.is_empty()
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && id != "."
            && id != ".."
    };
    matches!(parts.as_slice(), [run, "fanout", seq, ""]
        if run_id_ok(run) && !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()))
}

async fn read_requests(staging: &StagingStore, dir: &str) -> Result<Vec<Request>, LambdaFailure> {
    let key = format!("{dir}requests.json");
    let bytes = staging
        .get_bytes(&key, crate::staging::MAX_STATE_OBJECT)
        .await
        .map_err(|e| storage_failure(&format!("reading {key}"), &e, aws::ErrorType::Configuration))?
        .ok_or_else(|| LambdaFailure::state(format!("{key} does not exist")))?;
    serde_json::from_slice(&bytes).map_err(|e| LambdaFailure::state(format!("{key}: {e}")))
}

/// The results a fan-out's Lambdas wrote, paired with the requests they answer. An item
/// without a result (its Lambda kept failing, which the Map tolerates) is an unfinished
/// attempt: the machine counts it and, after a few, fails the run naming the file. The
/// folders of earlier fan-outs of the run are removed; this one stays until the next (a
/// retried invocation, given the same payload, folds it again).
async fn read_fan_out(
    staging: &StagingStore,
    run: &SyncRun,
    fan_out: &Value,
) -> Result<Vec<(Request, EffectResult)>, LambdaFailure> {
    let dir = fan_out
        .get("itemsKey")
        .and_then(Value::as_str)
        .and_then(|k| k.strip_suffix("items.json"));
    let own = format!("{}fanout/", run.spec.staging.run_prefix(&run.run_id));
    let Some(dir) = dir.filter(|d| d.starts_with(&own) && is_fan_out_dir(&run.spec.staging, d))
    else {
        return Err(LambdaFailure::state(format!(
            "the task input's fanOut does not name a fan-out of run {}",
            run.run_id
        )));
    };
    let requests = read_requests(staging, dir).await?;
    let mut out = Vec::new();
    for request in requests {
        let EffectId::File { index, .. } = request.id else {
            continue;
        };
        let key = format!("{dir}results/{index}.json");
        let answer = staging
            .get_bytes(&key, crate::staging::MAX_STATE_OBJECT)
            .await
            .map_err(|e| {
                storage_failure(&format!("reading {key}"), &e, aws::ErrorType::Configuration)
            })?;
        let result = match answer {
            Some(bytes) => {
                let answer: Value = serde_json::from_slice(&bytes)
                    .map_err(|e| LambdaFailure::state(format!("{key}: {e}")))?;
                let id: EffectId = serde_json::from_value(answer["id"].clone())
                    .map_err(|e| LambdaFailure::state(format!("{key}: {e}")))?;
                if id != request.id {
                    tracing::warn!(run_id = %run.run_id, "{key} answers another request: left out");
                    continue;
                }
                serde_json::from_value(answer["result"].clone())
                    .map_err(|e| LambdaFailure::state(format!("{key}: {e}")))?
            }
            None => fold_split(staging, dir, &request).await?,
        };
        out.push((request, result));
    }
    clear_fan_outs(staging, run, Some(dir)).await;
    Ok(out)
}

/// The result of a fan-out's file that no item answered for: a split file whose ranges are all
/// stored is completed (staged), one whose ranges advanced in this fan-out has `paused`, and
/// any other is an unfinished attempt (its items' Lambdas kept failing, which the Map
/// tolerates): the machine counts it and, after a few, fails the run naming the file.
async fn fold_split(
    staging: &StagingStore,
    dir: &str,
    request: &Request,
) -> Result<EffectResult, LambdaFailure> {
    let key = staged_key(request);
    let unfinished = |why: &str| {
        EffectResult::Failed(Failure::new(
            FailureKind::Unfinished,
            format!("its fan-out item ended without a result ({why})"),
        ))
    };
    let StagingStore::S3(s3) = staging else {
        return Ok(unfinished("the item's Lambda failed"));
    };
    let failure = |what: &str, e: &StagingError| {
        storage_failure(
            &format!("{what} of {key}"),
            e,
            aws::ErrorType::Configuration,
        )
    };
    let Some(plan) = s3
        .split_plan(key)
        .await
        .map_err(|e| failure("reading the split plan", &e))?
    else {
        return Ok(unfinished("the item's Lambda failed"));
    };
    let done = range_records(s3, key, &plan, 0..plan.ranges())
        .await
        .map_err(|e| failure("reading range records", &e))?;
    let ranges = plan.ranges() as usize;
    if done.len() < ranges {
        let now_stored = done.iter().filter(|(_, d)| d.fan_out == dir).count();
        if now_stored == 0 {
            return Ok(unfinished(&format!(
                "{} of its {ranges} ranges are stored, none by this fan-out",
                done.len()
            )));
        }
        return Ok(EffectResult::Failed(Failure::new(
            FailureKind::Paused,
            format!(
                "{} of its {ranges} ranges are stored ({now_stored} by this fan-out)",
                done.len()
            ),
        )));
    }
    let done: Vec<_> = done.into_iter().map(|(_, d)| d).collect();
    match s3.complete_split(key, &plan, &done).await {
        Ok(report) => {
            tracing::info!(
                key,
                ranges,
                bytes = report.bytes,
                "{key} is complete from its {ranges} ranges"
            );
            let staged = EffectResult::FileStaged {
                bytes: report.bytes,
                resources: report.lines,
                newline_added: report.newline_added,
                outcomes: None,
            };
            // Recorded before the plan goes, so that a retried fold finds the file staged.
            write_result(staging, dir, request, &staged).await?;
            s3.forget_split(key)
                .await
                .map_err(|e| failure("dropping the split plan", &e))?;
            Ok(staged)
        }
        // Completing will never work (the upload is gone, a part is missing or too small):
        // the file starts over.
        Err(e) if e.code() == Some("ResumeMismatch") || !e.is_transient() => {
            s3.forget_split(key)
                .await
                .map_err(|e| failure("dropping the split plan", &e))?;
            Ok(EffectResult::Failed(Failure::new(
                FailureKind::Network,
                format!("staging {key}: {e}"),
            )))
        }
        Err(e) => Err(failure("completing the upload", &e)),
    }
}

/// The records of `plan`'s ranges among `ranges` that are stored, with their numbers, read a
/// few at a time.
async fn range_records(
    s3: &crate::staging::S3Store,
    key: &str,
    plan: &SplitPlan,
    ranges: impl Iterator<Item = u32>,
) -> Result<Vec<(u32, RangeDone)>, StagingError> {
    use futures::stream::{StreamExt, TryStreamExt};
    let read: Vec<Option<(u32, RangeDone)>> = futures::stream::iter(ranges)
        .map(|i| async move {
            Ok::<_, StagingError>(s3.range_done(key, plan, i).await?.map(|d| (i, d)))
        })
        .buffered(crate::staging::CONCURRENT_REQUESTS)
        .try_collect()
        .await?;
    Ok(read.into_iter().flatten().collect())
}

/// Drops the split plans left in a run's folders (best effort): a run that ended has no use
/// for them, and their uploads would otherwise wait for the bucket's lifecycle rule.
async fn clear_splits(staging: &StagingStore, run: &SyncRun) {
    let StagingStore::S3(s3) = staging else {
        return;
    };
    let run_prefix = run.spec.staging.run_prefix(&run.run_id);
    for kind in ["output", "deleted", "error"] {
        let prefix = format!("{run_prefix}{kind}/.resume/");
        let keys = match s3.list(&prefix).await {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!("could not list {prefix}: {e}");
                continue;
            }
        };
        for name in keys
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix)?.strip_suffix(".split.json"))
        {
            let key = format!("{run_prefix}{kind}/{name}");
            if let Err(e) = s3.forget_split(&key).await {
                tracing::warn!("could not drop the split plan of {key}: {e}");
            }
        }
    }
}

/// Removes the run's fan-out folders but `keep` (best effort: they are small records).
async fn clear_fan_outs(staging: &StagingStore, run: &SyncRun, keep: Option<&str>) {
    let StagingStore::S3(s3) = staging else {
        return;
    };
    let prefix = format!("{}fanout/", run.spec.staging.run_prefix(&run.run_id));
    let keys = match s3.list(&prefix).await {
        Ok(keys) => keys,
        Err(e) => {
            tracing::warn!("could not list {prefix}: {e}");
            return;
        }
    };
    for key in keys
        .iter()
        .filter(|k| keep.is_none_or(|d| !k.starts_with(d)))
    {
        if let Err(e) = staging.delete(key).await {
            tracing::warn!("could not remove {key}: {e}");
        }
    }
}

/// The payload is the store: it only keeps the latest run and checks that `seq` advances.
#[derive(Default)]
struct PayloadStore {
    seq: Option<u64>,
}

impl RunStore for PayloadStore {
    async fn save(&mut self, run: &SyncRun) -> Result<u64, StoreError> {
        if let Some(previous) = self.seq.filter(|previous| run.seq <= *previous) {
            return Err(StoreError::Conflict { expected: previous });
        }
        self.seq = Some(run.seq);
        // Nothing is written: the task's answer carries the run.
        Ok(0)
    }
}

/// `{prefix}sfn-resume.json`: a run that failed after its export was known, continued by the
/// next execution started without an envelope (as the CLI and the single Lambda continue
/// theirs).
pub fn resume_key(location: &StagingLocation) -> String {
    let prefix = match location {
        StagingLocation::S3 { prefix, .. } => prefix.as_str(),
        StagingLocation::Directory { .. } => "",
    };
    format!("{prefix}sfn-resume.json")
}

/// The staging store failed while doing `what`: a transient failure is worth the definition's
/// retry; another is `lasting`. For the Task that is the deployment's (`Configuration`: the
/// bucket, the role); the original definition's handlers ([`compat`]) have no other way to say
/// it than ending the transfer (`SyncFailed`).
pub(crate) fn storage_failure(
    what: &str,
    e: &StagingError,
    lasting: aws::ErrorType,
) -> LambdaFailure {
    LambdaFailure::transient_or(e.is_transient(), lasting, format!("{what}: {e}"))
}

async fn read_resume(
    staging: &StagingStore,
    location: &StagingLocation,
) -> Result<Option<SyncRun>, LambdaFailure> {
    let key = resume_key(location);
    let Some(bytes) = staging
        .get_bytes(&key, crate::staging::MAX_STATE_OBJECT)
        .await
        .map_err(|e| {
            storage_failure(&format!("reading {key}"), &e, aws::ErrorType::Configuration)
        })?
    else {
        return Ok(None);
    };
    let run = persist::decode(&bytes).map_err(|e| LambdaFailure::state(format!("{key}: {e}")))?;
    // Only a failed run that can be retried belongs there.
    Ok(run.resumable().is_some().then_some(run))
}

async fn record_resume(
    staging: &StagingStore,
    location: &StagingLocation,
    run: &SyncRun,
) -> Result<(), LambdaFailure> {
    let key = resume_key(location);
    if run.resumable().is_some() {
        return staging
            .put_bytes(&key, bytes::Bytes::from(persist::encode_string(run)))
            .await
            .map_err(|e| {
                storage_failure(&format!("writing {key}"), &e, aws::ErrorType::Configuration)
            });
    }
    // Clear it only when it is this run's (an overlapping execution may have left its own).
    let ours = read_resume(staging, location)
        .await?
        .is_some_and(|stored| stored.run_id == run.run_id);
    if ours {
        staging.delete(&key).await.map_err(|e| {
            storage_failure(
                &format!("deleting {key}"),
                &e,
                aws::ErrorType::Configuration,
            )
        })?;
    }
    Ok(())
}

fn parse_watermark(value: Option<&Value>) -> Result<Option<Watermark>, LambdaFailure> {
    let mark = match value {
        None | Some(Value::Null) => return Ok(None),
        // The previous execution's output `watermark`, or just its transactionTime.
        Some(Value::String(t)) => Watermark {
            transaction_time: t.clone(),
            run_id: String::new(),
        },
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            LambdaFailure::state(format!(
                "the task input's watermark must be {{\"transaction_time\", \"run_id\"}} or a FHIR instant: {e}"
            ))
        })?,
    };
    // It becomes `_since`: only a FHIR instant may.
    if parse_fhir_instant(&mark.transaction_time).is_none() {
        return Err(LambdaFailure::state(
            "the task input's watermark is not a FHIR instant (e.g. 2026-01-01T00:00:00Z)",
        ));
    }
    Ok(Some(mark))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `2026-01-01T00:00:30Z`: whole seconds, rounded up, as Step Functions' `TimestampPath`
/// wants it.
pub fn step_functions_timestamp(t: Timestamp) -> String {
    let secs = t.0.div_ceil(1000);
    let text = Timestamp(secs.saturating_mul(1000)).to_fhir_instant();
    match text.strip_suffix(".000Z") {
        Some(head) => format!("{head}Z"),
        None => text,
    }
}

/// The task's answer for a run that stopped as `stopped`.
pub fn task_output(run: &SyncRun, stopped: &Stopped, now: Timestamp) -> Value {
    let mut out = json!({
        "envelope": persist::encode(run),
        "runId": run.run_id,
        "phase": run.state.name(),
        "watermark": run.watermark,
        "status": status_line(run, stopped),
    });
    let extra = match stopped {
        Stopped::Done(terminal) => match terminal.as_ref() {
            Terminal::Succeeded(summary) => json!({"action": "succeed", "summary": summary}),
            Terminal::Failed(f) => json!({
                "action": "fail",
                "summary": f.summary,
                "error": {
                    "name": aws::ErrorType::SyncFailed.name(),
                    "cause": format!("failed in {}: {}", f.phase, f.reason),
                },
            }),
            Terminal::Cancelled(c) => json!({
                "action": "fail",
                "summary": c.summary,
                "error": {
                    "name": "SyncCancelledError",
                    "cause": format!("cancelled in {}: {}", c.phase, c.reason),
                },
            }),
        },
        Stopped::Sleeping { until } => json!({
            "action": "wait",
            "waitSeconds": now.until(*until).div_ceil(1000),
            "waitUntil": step_functions_timestamp(*until),
        }),
        Stopped::OutOfBudget | Stopped::Interrupted => json!({"action": "continue"}),
    };
    if let (Value::Object(out), Value::Object(extra)) = (&mut out, extra) {
        out.extend(extra);
    }
    out
}

/// One human line for the execution history.
fn status_line(run: &SyncRun, stopped: &Stopped) -> String {
    if let Stopped::Done(terminal) = stopped {
        return report::describe_terminal(terminal);
    }
    let phase = run.state.name();
    match &run.state {
        SyncState::StagingFiles(s) => {
            let files = &s.export.files;
            let staged = files.len() - files.count_of(None, FileStatus::Pending);
            format!("{phase}: {staged}/{} file(s) staged", files.len())
        }
        SyncState::PollingExport(p) => with_progress(phase, p.progress.as_deref()),
        SyncState::PollingImport(p) => with_progress(phase, p.progress.as_deref()),
        _ => phase.to_string(),
    }
}

fn with_progress(phase: &str, progress: Option<&str>) -> String {
    match progress {
        Some(p) => format!("{phase}: {p}"),
        None => phase.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn timestamps_are_whole_seconds_rounded_up() {
        assert_eq!(
            step_functions_timestamp(Timestamp(1_700_000_000_000)),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            step_functions_timestamp(Timestamp(1_700_000_000_001)),
            "2023-11-14T22:13:21Z"
        );
    }

    #[test]
    fn watermarks_are_read_in_both_forms() {
        assert_eq!(parse_watermark(None).unwrap(), None);
        let w = parse_watermark(Some(&json!("2024-01-01T00:00:00Z")))
            .unwrap()
            .unwrap();
        assert_eq!(w.transaction_time, "2024-01-01T00:00:00Z");
        let w = parse_watermark(Some(
            &json!({"transaction_time": "2024-01-01T00:00:00Z", "run_id": "r1"}),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(w.run_id, "r1");
        let e = parse_watermark(Some(&json!(42))).unwrap_err();
        assert_eq!(e.error_type, aws::ErrorType::State);
    }

    #[tokio::test]
    async fn range_splitting_is_refused_without_a_fan_out_or_with_a_bad_size() {
        let config = |extra: &[(&str, &str)]| {
            let mut vars: Vec<(String, String)> = [
                ("SOURCE_ENDPOINT", "http://127.0.0.1:9/fhir"),
                ("SOURCE_AUTHENTICATION_ENABLED", "false"),
                ("TARGET_ENDPOINT", "http://127.0.0.1:9/fhir"),
                ("TARGET_AUTHENTICATION_ENABLED", "false"),
                ("STAGING_URL", "s3://bucket/p/"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            let raw = pathling_import_core::config::RawConfig::from_env(vars, EXTRA_KEYS);
            pathling_import_core::config::parse(&raw, EXTRA_KEYS).unwrap()
        };
        let refused = |task: Result<Task, LambdaFailure>| match task {
            Ok(_) => panic!("the configuration was accepted"),
            Err(e) => e,
        };
        let e = refused(Task::new(config(&[(FAN_OUT_RANGE_MB, "64")])).await);
        assert_eq!(e.error_type, aws::ErrorType::Configuration);
        assert!(
            e.message.contains(FAN_OUT_RANGE_MB) && e.message.contains(FAN_OUT_FILES),
            "{}",
            e.message
        );
        let e =
            refused(Task::new(config(&[(FAN_OUT_FILES, "8"), (FAN_OUT_RANGE_MB, "a lot")])).await);
        assert!(
            e.message
                .contains("FAN_OUT_RANGE_MB: expected a whole number"),
            "{}",
            e.message
        );
    }

    #[test]
    fn the_budget_always_lets_the_first_effect_start() {
        let now = Timestamp(10_000);
        assert_eq!(effective_budget(Timestamp(0), now), Timestamp(10_100));
        assert_eq!(effective_budget(Timestamp(60_000), now), Timestamp(60_000));
    }
}
