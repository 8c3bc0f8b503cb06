//! What a runner does with the run it finds stored: continue it, retry it, start the next
//! one, or nothing. One pure decision for every runner (the CLI's state file, the single
//! Lambda's item, the Step Functions task), so they cannot drift apart.

use crate::machine::{SyncRun, Watermark};
use crate::time::parse_fhir_instant;

/// The decision of [`next_run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextRun {
    /// The stored run is unfinished: drive it.
    Continue,
    /// The stored run failed after its export was known: step
    /// [`crate::effect::Input::Retry`] and drive it (its staged files are reused).
    Retry,
    /// The stored run failed where a retry may repeat what already happened
    /// ([`crate::state::ResumePoint::check_first`]): nothing runs until someone checks and
    /// asks for the retry, or abandons the run. Starting a new run instead would lose the
    /// staged export without anyone having looked.
    Held,
    /// Start a new run; `watermark` is where an incremental one (`SINCE=auto`) starts.
    Start { watermark: Option<Watermark> },
    /// Nothing to do (the last run ended and no new one was asked for).
    Idle,
}

/// What the caller asks for when nothing is unfinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Only progress (a direct invocation with no request): an unfinished run is continued.
    Nothing,
    /// Work: retry a failed run that can be retried, otherwise start the next one (a
    /// schedule, the CLI's plain run).
    Start,
    /// An explicit retry of the failed run, also one that waits for a check.
    Retry,
}

pub fn next_run(previous: Option<&SyncRun>, ask: Ask) -> NextRun {
    let Some(run) = previous else {
        return match ask {
            Ask::Start => NextRun::Start { watermark: None },
            Ask::Nothing | Ask::Retry => NextRun::Idle,
        };
    };
    if !run.is_done() {
        return NextRun::Continue;
    }
    match (ask, run.resumable()) {
        (Ask::Retry, Some(_)) => NextRun::Retry,
        (Ask::Start, Some(point)) if point.check_first => NextRun::Held,
        (Ask::Start, Some(_)) => NextRun::Retry,
        (Ask::Start, None) => NextRun::Start {
            watermark: run.watermark.clone(),
        },
        (Ask::Nothing | Ask::Retry, _) => NextRun::Idle,
    }
}

/// The later of two watermarks: a late or repeated run never moves the next incremental
/// export back. An unreadable instant loses to a readable one.
pub fn latest(a: Option<Watermark>, b: Option<Watermark>) -> Option<Watermark> {
    match (a, b) {
        (Some(a), Some(b)) => {
            let (ta, tb) = (
                parse_fhir_instant(&a.transaction_time),
                parse_fhir_instant(&b.transaction_time),
            );
            Some(if tb > ta { b } else { a })
        }
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(t: &str) -> Option<Watermark> {
        Some(Watermark {
            transaction_time: t.into(),
            run_id: t.into(),
        })
    }

    #[test]
    fn the_later_watermark_wins_and_never_moves_back() {
        let early = mark("2026-01-01T00:00:00Z");
        let late = mark("2026-06-01T00:00:00+02:00");
        assert_eq!(latest(early.clone(), late.clone()), late);
        assert_eq!(latest(late.clone(), early.clone()), late);
        assert_eq!(latest(None, early.clone()), early);
        assert_eq!(latest(mark("garbage"), early.clone()), early);
        assert_eq!(latest(None, None), None);
    }
}
