//! # pathling-import-core: the sync as a pure state machine
//!
//! Everything pathling-import decides lives here; nothing here performs I/O, reads a clock or
//! draws randomness. Runners (the CLI, the single Lambda, the Step Functions task) own the
//! world and drive this machine through one contract.
//!
//! ## Layout
//!
//! - [`time`]: `Timestamp` (Unix ms, passed in), FHIR instants, HTTP-dates, `Retry-After`.
//! - [`config`]: environment / JSON configuration → validated [`spec::RunSpec`] + secrets.
//! - [`spec`]: the run's snapshotted settings (no secret values, only references).
//! - [`binding`]: which of them a stored run must share with the configuration to be driven.
//! - [`staging`]: staging locations and deterministic, safe object keys.
//! - [`bulk`]: manifest decoding, `error[]` summaries, `deleted[]` references.
//! - [`content`]: the incremental check that a downloaded file is NDJSON of the manifest's
//!   resource type ([`content::NdjsonCheck`]), run by the executor on the bytes as they stream.
//! - [`pathling`]: both `$import` request shapes, generation detection, delete Bundles.
//! - [`retry`]: failure facts, classification, backoff, polling schedule, deadlines.
//! - [`state`]: the closed enum of phases.
//! - [`file_table`]: the per-file table, stored as runs so that it stays small.
//! - [`effect`]: `Next`, `Request`, `Effect`, `Input`, `EffectResult`, `Rejected`.
//! - [`machine`]: `SyncRun::{start, next, step}`.
//! - [`events`]: the operator's event log (the bulk-data-client format), derived from steps.
//! - [`persist`]: the versioned envelope and its upcasters.
//! - [`plan`]: what a runner does with the run it finds stored (continue, retry, start, idle)
//!   and how watermarks combine.
//!
//! ## The driver contract
//!
//! ```text
//! run = SyncRun::start(run_id, spec, previous_watermark, now)     (or persist::decode)
//! loop {
//!     match run.next(now()) {
//!         Done { terminal }          => return terminal,
//!         SleepUntil { until, .. }   => sleep until `until` (or persist and return, to be
//!                                       woken later: the state already holds the time),
//!         Run { requests }           => perform them, at most spec.transfer.concurrency at
//!                                       once; for each finished one:
//!                                         run = run.step(Completed { id, result }, now())?
//!                                         persist run (conditional on the previous seq)
//!     }
//! }
//! ```
//!
//! 1. `next` is pure: a crashed driver reloads the envelope and asks again, getting the same
//!    requests with the same ids. Effects must therefore be idempotent (staging keys are
//!    deterministic; a repeated kick-off only happens if its answer was never recorded).
//! 2. A result must echo its request's [`effect::EffectId`]. `step` refuses a result the run
//!    no longer expects (`Rejected::Stale`), one that does not fit the phase
//!    (`Rejected::Mismatch`) and anything after the end (`Rejected::Ended`); a refused input
//!    changes nothing, so the driver may simply drop it.
//! 3. Results from one `Run` batch may be stepped in any order; each is persisted before the
//!    next is stepped, so a crash repeats at most the effects in flight.
//! 4. `PollExport`: the executor stores the decoded manifest at `manifest_key` *before*
//!    answering `ExportCompleted`; file URLs live there, not in the envelope.
//! 5. Runners report facts (`Failure` with status, `Retry-After`, message); the core alone
//!    classifies and schedules. `now` may go backwards; nothing panics.
//!
//! ## Phases
//!
//! ```text
//!  KickingOffExport ──202──▶ PollingExport ──200 manifest──▶ StagingFiles ──all staged──┐
//!        │                     │  ▲ 202/429/5xx                 │ ▲ per file, retried    │
//!        │                     └──┘ (Retry-After, backoff)      └─┘                      │
//!        │                                         ┌──────── output[] empty ◀────────────┤
//!        │                                         │                                     ▼
//!        │          ApplyingDeletions ◀── done ── PollingImport ◀──202── KickingOffImport
//!        │                 │                       (if APPLY_DELETIONS     (DetectPathling
//!        │                 ▼                        and deleted[])          first on auto)
//!        │            CleaningUp (DELETE export job, best effort) ──▶ Succeeded
//!        └── permanent failure / deadline / Cancel ──▶ CleaningUp ──▶ Failed | Cancelled
//! ```
//! Terminal phases absorb every input (`Rejected::Ended`).

//!
//! ## Adding a phase or an effect
//!
//! 1. The state: a struct named for what the phase does or awaits in [`state`], a variant of
//!    [`state::SyncState`] and of [`state::Phase`] (with its `as_str`); every `match` on them
//!    is exhaustive, so the compiler lists the places to decide.
//! 2. The effect: a variant of [`effect::Effect`] (an imperative noun, with everything the
//!    executor needs and nothing secret) and its name; the facts it yields as
//!    [`effect::EffectResult`] variants (past tense, no judgement: the executor reports, the
//!    core classifies).
//! 3. `next` asks for it with an id the state can check (`EffectId::Run { seq }` for one at a
//!    time, per-file ids for fan-out); `step` accepts exactly the results it expects and
//!    refuses stale, ill-fitting and post-terminal ones without changing anything.
//! 4. Failures: a permanent one after the manifest is known keeps a [`state::ResumePoint`];
//!    decide whether the phase holds an export job to clean up.
//! 5. Persistence: a new field is `#[serde(default)]` (with `skip_serializing_if` when absent
//!    means default), so older envelopes keep decoding. Bump [`persist::SCHEMA_VERSION`] when a
//!    stored envelope changes meaning or gains a field an older binary must not silently drop
//!    (it would ignore an unknown field); add an upcaster for the step (identity when every
//!    new field is optional), bless the new version's fixtures with `BLESS_FIXTURES=1`, and
//!    never edit a released version's fixtures.
//! 6. Tests: a transition test per (phase, result) pair in `tests/transitions.rs`, the
//!    fixture generator in `tests/fixtures.rs`, and the simulation's fake world (the runners'
//!    `tests/simulation.rs`) so the properties cover the new path.

pub mod binding;
pub mod bulk;
pub mod config;
pub mod content;
pub mod effect;
pub mod events;
pub mod file_table;
pub mod machine;
pub mod metrics;
pub mod pathling;
pub mod persist;
pub mod plan;
pub mod retry;
pub mod spec;
pub mod staging;
pub mod state;
pub mod time;

pub use content::{ContentError, NdjsonCheck, Validation};
pub use effect::{Effect, EffectId, EffectResult, Input, Next, Rejected, Request};
pub use machine::{SyncRun, Watermark};
pub use state::{SyncState, Terminal};
pub use time::Timestamp;
