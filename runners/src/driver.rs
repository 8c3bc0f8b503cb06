//! The one driver loop every runner uses: ask the machine what to do, do it through the
//! [`Effects`] (the production [`crate::executor::Executor`]), step each result, persist
//! after every accepted step.
//!
//! Runners differ only in the [`RunStore`] (a local file, a DynamoDB item, a Step Functions
//! payload) and in [`DriveOptions`]: how long they may sleep in-process, how much time they
//! have in all, and the [`Clock`] — the wall clock in production, a virtual one in the
//! simulation tests, which run this very loop.

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use pathling_import_core::effect::{EffectId, EffectResult, Input, Next, Request};
use pathling_import_core::retry::{Failure, FailureKind};
use pathling_import_core::{SyncRun, Terminal, Timestamp};
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Where a run is kept. `save` must be conditional on the stored run being the one this store
/// last read or wrote (same run, same `seq`), so that two workers can never both advance the
/// same run. `run.seq` is greater than that one's, not necessarily by one: the driver leaves
/// out saves of intermediate per-file steps (see [`DriveOptions::save_interval`]).
///
/// A save answers how many bytes it wrote to durable storage (0 when the store keeps the run
/// elsewhere, as the Step Functions payload does): observers count them
/// ([`Observer::saved`]), so that what a run costs in writes can be seen and tested.
pub trait RunStore {
    fn save(&mut self, run: &SyncRun) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Someone else advanced or replaced the run: stop, they own it now.
    #[error("the stored run changed underneath this worker (expected seq {expected}); another worker owns it")]
    Conflict { expected: u64 },
    #[error("saving the run failed: {0}")]
    Io(String),
}

/// Performs the machine's effects and reports what happened as facts.
pub trait Effects: Sync {
    fn execute(&self, request: &Request) -> impl Future<Output = EffectResult> + Send;

    /// Whether `request`, whose execution was just cut short, stored part of its file that a
    /// later attempt continues from (see the staging stores' checkpoints).
    fn progressed(&self, _request: &Request) -> bool {
        false
    }

    /// With `true`, the invocation is about to end: transfers in flight stop at their next
    /// part boundary (answering `paused`) instead of being cut mid-part; `false` undoes it.
    fn wind_down(&self, _on: bool) {}
}

impl Effects for crate::executor::Executor {
    fn execute(&self, request: &Request) -> impl Future<Output = EffectResult> + Send {
        crate::executor::Executor::execute(self, request)
    }

    fn progressed(&self, request: &Request) -> bool {
        crate::executor::Executor::progressed(self, request)
    }

    fn wind_down(&self, on: bool) {
        crate::executor::Executor::wind_down(self, on)
    }
}

/// The loop's sense of time: what `now` is handed to the machine, and how it waits.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()>;
    /// Completes once the time has reached `at`, without moving it: the loop sets one while
    /// effects are in flight (to save steps left unsaved), so a clock whose `sleep` moves
    /// time on must answer it only when time has moved on by itself.
    fn alarm(&self, at: Timestamp) -> BoxFuture<'static, ()> {
        self.sleep(Duration::from_millis(self.now().until(at)))
    }
}

/// The wall clock and tokio's timer.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        crate::executor::now()
    }
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// Observes the loop, for progress displays, logs, the event log and tests.
pub trait Observer: Send + Sync {
    fn next(&self, _run: &SyncRun, _next: &Next) {}
    /// An effect is about to be performed for `run`.
    fn started(&self, _run: &SyncRun, _request: &Request) {}
    /// A result was accepted: `before` is the run it answered, `after` the run it produced
    /// (persisted, or for a per-file step within the save interval, saved with a later one).
    fn stepped(
        &self,
        _before: &SyncRun,
        _after: &SyncRun,
        _request: &Request,
        _result: &EffectResult,
    ) {
    }
    fn rejected(&self, _request: &Request, _why: &str) {}
    /// The driver saved `run`, writing `bytes` bytes.
    fn saved(&self, _run: &SyncRun, _bytes: u64) {}
}

/// Several observers as one (the progress display, the log observer, the event log, the
/// metrics), called in order.
pub struct All<'a>(pub &'a [&'a dyn Observer]);

impl Observer for All<'_> {
    fn next(&self, run: &SyncRun, next: &Next) {
        self.0.iter().for_each(|o| o.next(run, next));
    }
    fn started(&self, run: &SyncRun, request: &Request) {
        self.0.iter().for_each(|o| o.started(run, request));
    }
    fn stepped(&self, before: &SyncRun, after: &SyncRun, request: &Request, result: &EffectResult) {
        self.0
            .iter()
            .for_each(|o| o.stepped(before, after, request, result));
    }
    fn rejected(&self, request: &Request, why: &str) {
        self.0.iter().for_each(|o| o.rejected(request, why));
    }
    fn saved(&self, run: &SyncRun, bytes: u64) {
        self.0.iter().for_each(|o| o.saved(run, bytes));
    }
}

/// Counts a drive's saves: how often the run was written, how many bytes in all, and the
/// largest write (what the CLI reports and the tests check; the Lambda runners publish the
/// same as metrics).
#[derive(Default)]
pub struct SaveCount {
    writes: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
    largest: std::sync::atomic::AtomicU64,
}

/// What a drive wrote to its store (see [`SaveCount`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StateWrites {
    pub writes: u64,
    pub bytes: u64,
    /// The largest single write.
    pub largest: u64,
}

impl SaveCount {
    /// The figures so far.
    pub fn figures(&self) -> StateWrites {
        use std::sync::atomic::Ordering::Relaxed;
        StateWrites {
            writes: self.writes.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            largest: self.largest.load(Relaxed),
        }
    }
}

impl Observer for SaveCount {
    fn saved(&self, _run: &SyncRun, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        if bytes > 0 {
            self.writes.fetch_add(1, Relaxed);
            self.bytes.fetch_add(bytes, Relaxed);
            self.largest.fetch_max(bytes, Relaxed);
        }
    }
}

/// An observer that sees nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// The one log observer of every runner: a line per phase change and per wait (with its
/// reason, which names the cause of a retry); refused results at debug level. (Each failed
/// effect is logged by the loop itself.)
#[derive(Default)]
pub struct LogObserver {
    last_phase: std::sync::Mutex<&'static str>,
}

impl Observer for LogObserver {
    fn next(&self, run: &SyncRun, next: &Next) {
        let phase = run.state.name();
        let mut last = self.last_phase.lock().unwrap_or_else(|p| p.into_inner());
        if *last != phase {
            tracing::info!(run_id = %run.run_id, phase, "phase");
            *last = phase;
        }
        if let Next::SleepUntil { until, reason } = next {
            tracing::info!(run_id = %run.run_id, phase, until = %until.to_fhir_instant(), "{reason}");
        }
    }

    fn rejected(&self, request: &Request, why: &str) {
        tracing::debug!(id = ?request.id, "result not applied: {why}");
    }
}

#[derive(Clone)]
pub struct DriveOptions {
    /// Sleep in-process for waits up to this long; a longer wait ends the drive with
    /// [`Stopped::Sleeping`] (the wake-up time is in the persisted state).
    pub max_sleep: Duration,
    /// Stop starting new effects after this moment (on `clock`); effects in flight finish.
    pub budget_until: Option<Timestamp>,
    pub clock: Arc<dyn Clock>,
    /// Per-file steps (a file staged, a deletions batch sent) within one phase are saved at most
    /// this often (default [`SAVE_INTERVAL`]); every other step, a phase change and every
    /// return from the drive are saved at once. A crash then repeats at most the files of the
    /// last interval, and staging or deleting a file again is idempotent; writes are bounded
    /// by time as well as by count (10,000 small files would otherwise mean 10,000 envelope
    /// writes). `Duration::ZERO` saves every step.
    pub save_interval: Duration,
    /// Cut what is still in flight at this moment (on `clock`), after the budget, before
    /// whoever runs the drive is stopped (a Lambda's deadline): each effect in flight is
    /// stepped as [`FailureKind::Unfinished`], so that a file (or a paged manifest's reading)
    /// too slow for one invocation fails after a few tries instead of starting over in every
    /// invocation; an effect that must not be repeated blindly (an append kick-off) is only
    /// dropped, its recorded sending holding the run. The drive then returns
    /// [`Stopped::OutOfBudget`] (or [`Stopped::Done`], when a cut ended the run).
    pub cut_at: Option<Timestamp>,
}

/// The default of [`DriveOptions::save_interval`].
pub const SAVE_INTERVAL: Duration = Duration::from_secs(1);

impl DriveOptions {
    /// Options on the wall clock.
    pub fn new(max_sleep: Duration, budget_until: Option<Timestamp>) -> Self {
        DriveOptions {
            max_sleep,
            budget_until,
            clock: Arc::new(SystemClock),
            save_interval: SAVE_INTERVAL,
            cut_at: None,
        }
    }

    pub fn with_cut_at(mut self, at: Timestamp) -> Self {
        self.cut_at = Some(at);
        self
    }

    pub fn with_save_interval(mut self, interval: Duration) -> Self {
        self.save_interval = interval;
        self
    }

    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
}

impl std::fmt::Debug for DriveOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriveOptions")
            .field("max_sleep", &self.max_sleep)
            .field("budget_until", &self.budget_until)
            .field("save_interval", &self.save_interval)
            .field("cut_at", &self.cut_at)
            .finish_non_exhaustive()
    }
}

/// Why a drive returned.
#[derive(Debug, Clone, PartialEq)]
pub enum Stopped {
    Done(Box<Terminal>),
    /// The run waits until then; call again (or let a scheduler) after that.
    Sleeping {
        until: Timestamp,
    },
    /// The time budget ran out; the run continues in the next drive.
    OutOfBudget,
    /// `interrupt` fired (or, with [`drive_until`], the stop condition held); what completed
    /// is persisted.
    Interrupted,
}

#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Drives `run` until it ends, must wait longer than allowed, runs out of budget, or
/// `interrupt` completes. Returns the latest run (as persisted) and why it stopped.
pub async fn drive<S: RunStore, E: Effects>(
    run: SyncRun,
    executor: &E,
    store: &mut S,
    options: &DriveOptions,
    observer: &dyn Observer,
    interrupt: impl Future<Output = ()>,
) -> Result<(SyncRun, Stopped), DriveError> {
    drive_until(run, executor, store, options, observer, interrupt, |_| {
        false
    })
    .await
}

/// [`drive`] that also stops, as [`Stopped::Interrupted`], as soon as `stop` holds for the
/// latest run: no effect is started after that (effects already in flight in the same batch
/// finish and are stepped). The Step Functions compatibility handlers use it to stage files
/// and stop before the machine moves on to the import, which another handler performs.
pub async fn drive_until<S: RunStore, E: Effects>(
    mut run: SyncRun,
    executor: &E,
    store: &mut S,
    options: &DriveOptions,
    observer: &dyn Observer,
    interrupt: impl Future<Output = ()>,
    stop: impl Fn(&SyncRun) -> bool,
) -> Result<(SyncRun, Stopped), DriveError> {
    let clock = options.clock.as_ref();
    let mut interrupt = std::pin::pin!(interrupt);
    let mut saves = Saves::new(clock.now(), observer);
    let interval_ms = u64::try_from(options.save_interval.as_millis()).unwrap_or(u64::MAX);
    // A cached executor (a warm Lambda container) may still be winding down from the last
    // invocation.
    executor.wind_down(false);
    let mut wound_down = false;
    loop {
        if stop(&run) {
            return saves.flushed(store, run, Stopped::Interrupted).await;
        }
        let t = clock.now();
        if options.budget_until.is_some_and(|b| t >= b) && !run.is_done() {
            return saves.flushed(store, run, Stopped::OutOfBudget).await;
        }
        let next = run.next(t);
        observer.next(&run, &next);
        match next {
            Next::Done { terminal } => {
                return saves
                    .flushed(store, run, Stopped::Done(Box::new(terminal)))
                    .await
            }
            Next::SleepUntil { until, .. } => {
                let wait = Duration::from_millis(t.until(until));
                let over_budget = options.budget_until.is_some_and(|b| until > b);
                if wait > options.max_sleep || over_budget {
                    return saves.flushed(store, run, Stopped::Sleeping { until }).await;
                }
                // Nothing unsaved while waiting: a kill during a long wait repeats nothing.
                saves.flush(store, &run, t).await?;
                tokio::select! {
                    _ = clock.sleep(wait) => {}
                    _ = &mut interrupt => return saves.flushed(store, run, Stopped::Interrupted).await,
                }
            }
            Next::Run { requests } => {
                let concurrency = run.spec.transfer.concurrency.max(1) as usize;
                // Per-file effects (staging, deletions) are refilled from the machine as slots
                // free up, instead of waiting for the batch's slowest file: one large file in
                // a batch would otherwise leave every other slot idle until it ends. Run-level
                // effects are never refilled (their ids change with every step).
                let refillable = requests.iter().all(per_file);
                let mut queue: VecDeque<Request> = requests.into();
                let mut in_flight_requests: Vec<Request> = Vec::new();
                let mut in_flight = FuturesUnordered::new();
                let mut out_of_budget = false;
                // Once a result moves the run to another phase (a file failed for good, a
                // cancel), the rest of the batch is no longer wanted: finish what is in flight
                // and ask the machine again.
                let phase = run.state.name();
                loop {
                    while in_flight.len() < concurrency
                        && !out_of_budget
                        && run.state.name() == phase
                        && !stop(&run)
                    {
                        if options.budget_until.is_some_and(|b| clock.now() >= b) {
                            out_of_budget = true;
                            break;
                        }
                        if queue.is_empty() && refillable {
                            // The machine hands out the files due now, in-flight ones
                            // included (they are still pending): start only the others.
                            if let Next::Run { requests } = run.next(clock.now()) {
                                queue.extend(requests.into_iter().filter(|r| {
                                    per_file(r) && !in_flight_requests.iter().any(|q| q.id == r.id)
                                }));
                            }
                        }
                        let Some(mut request) = queue.pop_front() else {
                            break;
                        };
                        if run.record_before(&request) {
                            // An effect that must not be repeated blindly: persist that it
                            // is going out before it does, so a lost answer is recognised.
                            match run.sending(&request, clock.now()) {
                                Ok((recorded, still)) => {
                                    saves.save(store, &recorded, clock.now()).await?;
                                    run = recorded;
                                    match still {
                                        Some(r) => request = r,
                                        None => continue,
                                    }
                                }
                                Err(why) => {
                                    observer.rejected(&request, &why.to_string());
                                    continue;
                                }
                            }
                        }
                        in_flight_requests.push(request.clone());
                        observer.started(&run, &request);
                        in_flight.push(async move {
                            let result = executor.execute(&request).await;
                            (request, result)
                        });
                    }
                    // Steps left unsaved are saved once the interval is over even when no
                    // effect ends for a long while (one large file): a crash then repeats
                    // only the files of the last interval.
                    let flush_at = saves.pending.then(|| saves.last.plus_ms(interval_ms));
                    let flush_due = async {
                        match flush_at {
                            Some(at) => clock.alarm(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    let cut_due = async {
                        match options.cut_at {
                            Some(at) => clock.alarm(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    // Where effects will be cut, the budget's end asks the transfers in flight
                    // to stop at their next part boundary, their checkpoints written, so that
                    // the cut finds little or nothing left to lose.
                    let wind_down_due = async {
                        match (options.cut_at, options.budget_until) {
                            (Some(_), Some(at)) if !wound_down => clock.alarm(at).await,
                            _ => std::future::pending().await,
                        }
                    };
                    let completed = tokio::select! {
                        biased;
                        c = in_flight.next() => c,
                        _ = &mut interrupt => return saves.flushed(store, run, Stopped::Interrupted).await,
                        _ = cut_due => {
                            // Dropping the transfers aborts them (see the staging stores).
                            drop(in_flight);
                            // A cut effect counts as an unfinished attempt, so that one too
                            // slow for any invocation ends its phase after a few (a file,
                            // a paged manifest's reading), except one that must not be
                            // repeated blindly: its recorded sending holds the run instead.
                            let cut: Vec<Request> = in_flight_requests
                                .into_iter()
                                .filter(|r| per_file(r) || !run.record_before(r))
                                .collect();
                            for request in cut {
                                // One that stored more of its file continues next time; one
                                // that did not would only start over.
                                let failure = if executor.progressed(&request) {
                                    Failure::new(
                                        FailureKind::Paused,
                                        "the invocation ended in this file's transfer, which \
                                         continues from its last checkpoint",
                                    )
                                } else {
                                    Failure::new(
                                        FailureKind::Unfinished,
                                        "the invocation ended before this file's transfer \
                                         stored any more of it (each part of a file must move \
                                         within one invocation's time budget)",
                                    )
                                };
                                let result = EffectResult::Failed(failure);
                                run = apply(&run, &request, result, &mut saves, store, clock, interval_ms)
                                    .await?;
                            }
                            // The last cut may have ended the run (a file given up on).
                            let stopped = match run.state.terminal() {
                                Some(terminal) => Stopped::Done(Box::new(terminal)),
                                None => Stopped::OutOfBudget,
                            };
                            return saves.flushed(store, run, stopped).await;
                        }
                        _ = wind_down_due => {
                            executor.wind_down(true);
                            wound_down = true;
                            continue;
                        }
                        _ = flush_due => {
                            saves.flush(store, &run, clock.now()).await?;
                            continue;
                        }
                    };
                    let Some((request, result)) = completed else {
                        break;
                    };
                    in_flight_requests.retain(|q| q.id != request.id);
                    run = apply(
                        &run,
                        &request,
                        result,
                        &mut saves,
                        store,
                        clock,
                        interval_ms,
                    )
                    .await?;
                }
                if out_of_budget {
                    return saves.flushed(store, run, Stopped::OutOfBudget).await;
                }
            }
        }
    }
}

/// Steps one result into the run (saving it now, or within the save interval for a routine
/// per-file step) and tells the observers; a refused result changes nothing.
async fn apply<S: RunStore>(
    run: &SyncRun,
    request: &Request,
    result: EffectResult,
    saves: &mut Saves<'_>,
    store: &mut S,
    clock: &dyn Clock,
    interval_ms: u64,
) -> Result<SyncRun, StoreError> {
    let observer = saves.observer;
    if let EffectResult::Failed(f) = &result {
        // Every failure is logged with its cause as it happens; the machine decides (and the
        // next wait line says) whether it is retried.
        tracing::warn!(
            run_id = %run.run_id,
            phase = run.state.name(),
            effect = request.effect.name(),
            status = f.status().unwrap_or(0),
            kind = f.kind.name(),
            "{f}"
        );
    }
    match run.step(
        Input::Completed {
            id: request.id,
            result: result.clone(),
        },
        clock.now(),
    ) {
        Ok(stepped) => {
            let now = clock.now();
            let routine = per_file(request)
                && stepped.state.name() == run.state.name()
                && now.0 < saves.last.0.saturating_add(interval_ms);
            if routine {
                saves.pending = true;
            } else {
                saves.save(store, &stepped, now).await?;
            }
            observer.stepped(run, &stepped, request, &result);
            Ok(stepped)
        }
        // A refused result changes nothing (e.g. a file result after the run already failed
        // on another file).
        Err(why) => {
            observer.rejected(request, &why.to_string());
            Ok(run.clone())
        }
    }
}

/// Steps results that other workers produced (a Step Functions fan-out) into `run`, as the
/// drive steps its own: a stale or repeated result is refused and logged, and the run is
/// saved once at the end.
pub async fn fold<S: RunStore>(
    mut run: SyncRun,
    results: Vec<(Request, EffectResult)>,
    store: &mut S,
    observer: &dyn Observer,
    clock: &dyn Clock,
) -> Result<SyncRun, DriveError> {
    let mut saves = Saves::new(clock.now(), observer);
    for (request, result) in results {
        run = apply(&run, &request, result, &mut saves, store, clock, u64::MAX).await?;
    }
    if saves.pending {
        saves.save(store, &run, clock.now()).await?;
    }
    Ok(run)
}

/// Which steps of a drive are not yet saved (see [`DriveOptions::save_interval`]).
struct Saves<'a> {
    /// When the run was last saved.
    last: Timestamp,
    /// A stepped run has not been saved yet.
    pending: bool,
    observer: &'a dyn Observer,
}

impl<'a> Saves<'a> {
    fn new(now: Timestamp, observer: &'a dyn Observer) -> Self {
        Saves {
            last: now,
            pending: false,
            observer,
        }
    }

    async fn save<S: RunStore>(
        &mut self,
        store: &mut S,
        run: &SyncRun,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let bytes = store.save(run).await?;
        self.observer.saved(run, bytes);
        self.last = now;
        self.pending = false;
        Ok(())
    }

    async fn flush<S: RunStore>(
        &mut self,
        store: &mut S,
        run: &SyncRun,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        if self.pending {
            self.save(store, run, now).await?;
        }
        Ok(())
    }

    /// Saves what is pending and returns the drive's result: whoever called the drive finds
    /// the run persisted as returned.
    async fn flushed<S: RunStore>(
        &mut self,
        store: &mut S,
        run: SyncRun,
        stopped: Stopped,
    ) -> Result<(SyncRun, Stopped), DriveError> {
        let now = self.last;
        self.flush(store, &run, now).await?;
        Ok((run, stopped))
    }
}

/// A staging or deletions effect of one file (see the refill in [`drive_until`]).
fn per_file(request: &Request) -> bool {
    matches!(
        request.id,
        EffectId::File { .. } | EffectId::Deletions { .. }
    )
}

/// Applies a cancel to the run and persists it.
pub async fn cancel<S: RunStore>(
    run: &SyncRun,
    store: &mut S,
    reason: &str,
    clock: &dyn Clock,
) -> Result<Option<SyncRun>, StoreError> {
    match run.step(
        Input::Cancel {
            reason: reason.to_string(),
        },
        clock.now(),
    ) {
        Ok(cancelled) => {
            store.save(&cancelled).await?;
            Ok(Some(cancelled))
        }
        Err(_) => Ok(None),
    }
}
