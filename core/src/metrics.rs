//! The figures the Lambda runners publish as metrics (CloudWatch Embedded Metric Format, see
//! the runners' `emf` module): derived here, purely, from the step the loop just took, like
//! the event log ([`crate::events`]).
//!
//! Two kinds of sample:
//! - *totals* (files, bytes and resources staged, retries) carry no phase; a runner adds them
//!   up over an invocation and publishes one figure each;
//! - *phase samples* (how long a phase took, how a run ended) name the phase they are about and
//!   are published as they happen, with the phase as a dimension.

use crate::effect::{EffectResult, Request};
use crate::state::{Phase, Terminal};
use crate::time::Timestamp;
use crate::SyncRun;

/// The unit of a sample, as CloudWatch names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Count,
    Bytes,
    Milliseconds,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Count => "Count",
            Unit::Bytes => "Bytes",
            Unit::Milliseconds => "Milliseconds",
        }
    }
}

/// The metrics, by name: every one the runners may publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// Files staged (one per file, when its transfer completes).
    FilesStaged,
    /// Bytes staged.
    BytesStaged,
    /// FHIR resources staged (lines of the staged NDJSON files).
    ResourcesStaged,
    /// Requests that failed and will be tried again (polls, kick-offs, transfers, deletions).
    Retries,
    /// How long a phase took, from entering it to leaving it (across invocations).
    PhaseDuration,
    /// A run succeeded.
    RunsSucceeded,
    /// A run failed, in the sample's phase.
    RunsFailed,
    /// A run was cancelled, in the sample's phase.
    RunsCancelled,
    /// How long a run took, from its start to its end.
    RunDuration,
    /// Writes of the run's state (a DynamoDB item or the state file; what DynamoDB bills).
    StateWrites,
    /// Bytes of those writes.
    StateBytes,
}

impl Metric {
    pub const ALL: [Metric; 11] = [
        Metric::FilesStaged,
        Metric::BytesStaged,
        Metric::ResourcesStaged,
        Metric::Retries,
        Metric::PhaseDuration,
        Metric::RunsSucceeded,
        Metric::RunsFailed,
        Metric::RunsCancelled,
        Metric::RunDuration,
        Metric::StateWrites,
        Metric::StateBytes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::FilesStaged => "FilesStaged",
            Metric::BytesStaged => "BytesStaged",
            Metric::ResourcesStaged => "ResourcesStaged",
            Metric::Retries => "Retries",
            Metric::PhaseDuration => "PhaseDuration",
            Metric::RunsSucceeded => "RunsSucceeded",
            Metric::RunsFailed => "RunsFailed",
            Metric::RunsCancelled => "RunsCancelled",
            Metric::RunDuration => "RunDuration",
            Metric::StateWrites => "StateWrites",
            Metric::StateBytes => "StateBytes",
        }
    }

    pub fn unit(self) -> Unit {
        match self {
            Metric::BytesStaged | Metric::StateBytes => Unit::Bytes,
            Metric::PhaseDuration | Metric::RunDuration => Unit::Milliseconds,
            _ => Unit::Count,
        }
    }
}

/// One figure.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub metric: Metric,
    pub value: u64,
    /// The phase the sample is about; `None` for totals.
    pub phase: Option<Phase>,
}

impl Sample {
    fn total(metric: Metric, value: u64) -> Sample {
        Sample {
            metric,
            value,
            phase: None,
        }
    }

    fn of(metric: Metric, value: u64, phase: Phase) -> Sample {
        Sample {
            metric,
            value,
            phase: Some(phase),
        }
    }
}

/// The samples of a save of the run that wrote `bytes` (none when nothing was written).
pub fn saved(bytes: u64) -> Vec<Sample> {
    if bytes == 0 {
        return Vec::new();
    }
    vec![
        Sample::total(Metric::StateWrites, 1),
        Sample::total(Metric::StateBytes, bytes),
    ]
}

/// The samples of an accepted result at `now`: `before` is the run the request was made from,
/// `after` the run the result produced.
pub fn stepped(
    before: &SyncRun,
    _request: &Request,
    result: &EffectResult,
    after: &SyncRun,
    now: Timestamp,
) -> Vec<Sample> {
    let mut out = Vec::new();
    match result {
        EffectResult::FileStaged {
            bytes, resources, ..
        } => {
            out.push(Sample::total(Metric::FilesStaged, 1));
            out.push(Sample::total(Metric::BytesStaged, *bytes));
            out.push(Sample::total(Metric::ResourcesStaged, *resources));
        }
        // A failure that did not end the run is tried again.
        EffectResult::Failed(_) if !after.failing() && after.state.terminal().is_none() => {
            out.push(Sample::total(Metric::Retries, 1));
        }
        _ => {}
    }
    out.extend(transition(before, after, now));
    out
}

/// The samples of `before` becoming `after` at `now`, whatever caused it (a result, a cancel,
/// a retry): the end of a phase, the end of the run.
pub fn transition(before: &SyncRun, after: &SyncRun, now: Timestamp) -> Vec<Sample> {
    let mut out = Vec::new();
    let phase = before.state.phase();
    if after.state.phase() != phase {
        // Runs stored before the phase's start was kept have no duration to report.
        if let Some(since) = before.phase_since {
            out.push(Sample::of(Metric::PhaseDuration, since.until(now), phase));
        }
    }
    if before.state.terminal().is_none() {
        if let Some(terminal) = after.state.terminal() {
            let (metric, phase) = match &terminal {
                Terminal::Succeeded(_) => (Metric::RunsSucceeded, Phase::Succeeded),
                Terminal::Failed(f) => (Metric::RunsFailed, f.phase),
                Terminal::Cancelled(c) => (Metric::RunsCancelled, c.phase),
            };
            out.push(Sample::of(metric, 1, phase));
            out.push(Sample::of(
                Metric::RunDuration,
                after.started_at.until(now),
                phase,
            ));
        }
    }
    out
}
