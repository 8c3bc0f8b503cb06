//! Proptest strategies: fault plans (the sim's plan generator), every valid spec, and specs
//! whose every budget is generous.
#![allow(dead_code)]

use super::sim::{Fault, Hiccup, Hint, Plan, PlanFile};
use super::spec_with;
use pathling_import_core::bulk::FileKind;
use pathling_import_core::spec::{PathlingApi, RunSpec};
use proptest::prelude::*;

pub fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        14 => Just(Fault::None),
        6 => (1u32..4).prop_map(Fault::Transient),
        1 => Just(Fault::Permanent),
    ]
}

pub fn hint() -> impl Strategy<Value = Hint> {
    prop_oneof![
        3 => Just(Hint::None),
        3 => (0u64..60).prop_map(Hint::Delta),
        2 => (0u64..60).prop_map(Hint::HttpDate),
        2 => (0u64..60).prop_map(Hint::Epoch),
        1 => (60u64..3_600).prop_map(Hint::Delta),
        // Far beyond any clamp.
        1 => Just(Hint::Epoch(50_000_000_000)),
    ]
}

pub fn hiccup() -> impl Strategy<Value = Hiccup> {
    prop_oneof![
        4 => hint().prop_map(Hiccup::InProgress),
        1 => hint().prop_map(Hiccup::TooMany),
        1 => Just(Hiccup::Transient5xx),
        1 => Just(Hiccup::Network),
    ]
}

pub fn files(
    kind: FileKind,
    types: &'static [&'static str],
    max: usize,
) -> impl Strategy<Value = Vec<PlanFile>> {
    prop::collection::vec(
        (
            prop::sample::select(types),
            fault(),
            fault(),
            prop::bool::weighted(0.2),
            any::<bool>(),
        )
            .prop_map(move |(t, stage, delete, fatal, no_nl)| PlanFile {
                kind,
                type_name: t.to_string(),
                stage,
                delete,
                fatal: fatal && kind == FileKind::Error,
                no_final_newline: no_nl,
                slow_ms: None,
                part_ms: None,
            }),
        0..=max,
    )
}

pub fn plan() -> impl Strategy<Value = Plan> {
    let export = (
        prop_oneof![8 => Just(Fault::None), 4 => (1u32..4).prop_map(Fault::Transient), 1 => Just(Fault::Permanent)],
        prop::collection::vec(hiccup(), 0..5),
        prop::bool::weighted(0.05),
    );
    let manifest = (
        files(
            FileKind::Output,
            &["Patient", "Observation", "Encounter"],
            8,
        ),
        files(FileKind::Deleted, &["Bundle"], 2),
        files(FileKind::Error, &["OperationOutcome"], 1),
    );
    let pathling = (
        prop_oneof![Just(PathlingApi::V9), Just(PathlingApi::V7)],
        prop::bool::weighted(0.7),
        prop_oneof![4 => Just(Fault::None), 1 => (1u32..3).prop_map(Fault::Transient), 1 => Just(Fault::Permanent)],
        0u32..3,
        prop::collection::vec(hint(), 0..4),
        prop::bool::weighted(0.05),
        prop::bool::weighted(0.2),
    );
    (export, manifest, pathling, 0u64..3_000, any::<u64>()).prop_map(
        |((kickoff, hiccups, export_gone), (o, d, e), p, max_latency_ms, seed)| {
            let (
                generation,
                reports_version,
                detect,
                busy,
                import_polls,
                import_fails,
                cleanup_fails,
            ) = p;
            Plan {
                kickoff,
                hiccups,
                export_gone,
                files: Plan::grouped(o.into_iter().chain(d).chain(e).collect()),
                generation,
                reports_version,
                detect,
                busy,
                import_polls,
                import_fails,
                cleanup_fails,
                max_latency_ms,
                slow_manifest_ms: None,
                seed,
            }
        },
    )
}

/// One phase's `{PHASE}_RETRY_*` and `{PHASE}_TIMEOUT` settings.
pub fn phase_policy(phase: &'static str) -> impl Strategy<Value = Vec<(String, String)>> {
    (
        prop_oneof![1 => Just(0u32), 5 => 1u32..10],
        0u32..60,
        prop::sample::select(&["1", "1.5", "2"][..]),
        prop::option::weighted(0.3, prop_oneof![1 => 0u32..60, 3 => 60u32..7_200]),
    )
        .prop_map(move |(times, wait, back_off, timeout)| {
            let mut v = vec![
                (format!("{phase}_RETRY_TIMES"), times.to_string()),
                (format!("{phase}_RETRY_WAIT"), wait.to_string()),
                (format!("{phase}_RETRY_BACK_OFF"), back_off.to_string()),
            ];
            if let Some(t) = timeout {
                v.push((format!("{phase}_TIMEOUT"), t.to_string()));
            }
            v
        })
}

/// A valid configuration (as `config::parse` would accept) over every knob the machine reads.
pub fn run_spec() -> impl Strategy<Value = RunSpec> {
    (
        phase_policy("EXPORT"),
        phase_policy("TRANSFER"),
        phase_policy("IMPORT"),
        1u32..600,
        1u32..5,
        prop::sample::select(&["auto", "7", "9"][..]),
        any::<bool>(),
        prop::sample::select(&["merge", "overwrite", "append", "ignore"][..]),
        prop::sample::select(&["", "auto", "2026-01-01T00:00:00Z"][..]),
        prop::sample::select(&["system", "patient", "group/g-1"][..]),
    )
        .prop_map(
            |(e, t, i, ra_max, concurrency, api, deletions, mode, since, level)| {
                let mut pairs: Vec<(String, String)> = e.into_iter().chain(t).chain(i).collect();
                pairs.push(("RETRY_AFTER_MAX".into(), ra_max.to_string()));
                pairs.push(("TRANSFER_CONCURRENCY".into(), concurrency.to_string()));
                pairs.push(("PATHLING_API".into(), api.into()));
                // PATHLING_API=7 refuses the 9.x-only settings up front.
                let v7 = api == "7";
                pairs.push(("APPLY_DELETIONS".into(), (deletions && !v7).to_string()));
                pairs.push((
                    "IMPORT_MODE".into(),
                    if v7 && mode != "overwrite" {
                        "merge"
                    } else {
                        mode
                    }
                    .into(),
                ));
                pairs.push(("SINCE".into(), since.into()));
                pairs.push(("EXPORT_LEVEL".into(), level.into()));
                let refs: Vec<(&str, &str)> = pairs
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                spec_with(&refs)
            },
        )
}

/// Plans and specs whose every budget is generous: such runs must succeed unless the plan
/// holds a permanent fault (checked by `Plan::must_succeed`).
pub fn generous_spec() -> impl Strategy<Value = RunSpec> {
    (prop::sample::select(&["auto", "9"][..]), any::<bool>()).prop_map(|(api, deletions)| {
        spec_with(&[
            ("EXPORT_RETRY_TIMES", "10"),
            ("EXPORT_RETRY_WAIT", "30"),
            ("EXPORT_TIMEOUT", "86400"),
            ("TRANSFER_RETRY_TIMES", "10"),
            ("TRANSFER_RETRY_WAIT", "30"),
            ("TRANSFER_TIMEOUT", "86400"),
            ("IMPORT_RETRY_TIMES", "10"),
            ("IMPORT_RETRY_WAIT", "30"),
            ("IMPORT_TIMEOUT", "86400"),
            ("RETRY_AFTER_MAX", "300"),
            ("PATHLING_API", api),
            ("APPLY_DELETIONS", if deletions { "true" } else { "false" }),
        ])
    })
}

/// Generous budgets (no deadline or retry limit is reached by any generated plan: the only
/// failures are the plan's permanent faults), over every knob that changes what the driver
/// does — transfer concurrency, the target's generation, deletions, the import mode (append:
/// the `Sending` record before the kick-off) — and the export's shape.
pub fn parity_spec() -> impl Strategy<Value = RunSpec> {
    (
        prop::sample::select(&["auto", "auto", "9", "7"][..]),
        any::<bool>(),
        1u32..5,
        prop::sample::select(&["merge", "overwrite", "append", "ignore"][..]),
        prop::sample::select(&["", "auto", "2026-01-01T00:00:00Z"][..]),
        prop::sample::select(&["system", "patient", "group/g-1"][..]),
    )
        .prop_map(|(api, deletions, concurrency, mode, since, level)| {
            let v7 = api == "7";
            let concurrency = concurrency.to_string();
            spec_with(&[
                ("EXPORT_RETRY_TIMES", "10"),
                ("EXPORT_RETRY_WAIT", "30"),
                ("EXPORT_TIMEOUT", "86400"),
                ("TRANSFER_RETRY_TIMES", "10"),
                ("TRANSFER_RETRY_WAIT", "30"),
                ("TRANSFER_TIMEOUT", "86400"),
                ("IMPORT_RETRY_TIMES", "10"),
                ("IMPORT_RETRY_WAIT", "30"),
                ("IMPORT_TIMEOUT", "86400"),
                ("RETRY_AFTER_MAX", "300"),
                ("TRANSFER_CONCURRENCY", &concurrency),
                ("PATHLING_API", api),
                // PATHLING_API=7 refuses the 9.x-only settings up front.
                (
                    "APPLY_DELETIONS",
                    if deletions && !v7 { "true" } else { "false" },
                ),
                (
                    "IMPORT_MODE",
                    if v7 && mode != "overwrite" {
                        "merge"
                    } else {
                        mode
                    },
                ),
                ("SINCE", since),
                ("EXPORT_LEVEL", level),
            ])
        })
}

/// The plan with every transient file fault removed (staging and deletions never retried):
/// then the order the driver hands files out in cannot depend on when it was stopped.
pub fn without_file_retries(mut plan: Plan) -> Plan {
    for f in &mut plan.files {
        if let Fault::Transient(_) = f.stage {
            f.stage = Fault::None;
        }
        if let Fault::Transient(_) = f.delete {
            f.delete = Fault::None;
        }
    }
    plan
}

/// `cases` unless `PROPTEST_CASES` asks for another number (for a longer hunt).
pub fn config(cases: u32) -> ProptestConfig {
    let default = ProptestConfig::default();
    ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            default.cases
        } else {
            cases
        },
        max_shrink_iters: 2_000,
        ..default
    }
}
