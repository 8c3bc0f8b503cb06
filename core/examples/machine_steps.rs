//! Benchmark: the machine's own cost per step for an export of N files (no I/O: every file is
//! staged at once), to show that it does not grow with the manifest.
//!
//! `cargo run --release -p pathling-import-core --example machine_steps -- 1000000`
//!
//! Each step asks `next` (a batch of file requests) and applies one result, as the driver
//! does; the figure is wall time per step.

use pathling_import_core::bulk::FileKind;
use pathling_import_core::config::{self, RawConfig};
use pathling_import_core::effect::{Effect, EffectResult, Input, ManifestDigest, Next};
use pathling_import_core::{SyncRun, Timestamp};
use std::process::ExitCode;

fn main() -> ExitCode {
    let n: usize = match std::env::args().nth(1).map(|a| a.parse()) {
        Some(Ok(n)) if n > 0 => n,
        _ => {
            eprintln!("usage: machine_steps FILES (a positive number)");
            return ExitCode::from(2);
        }
    };
    let vars = [
        ("SOURCE_ENDPOINT", "https://source.example/fhir"),
        ("SOURCE_AUTHENTICATION_ENABLED", "false"),
        ("STAGING_URL", "file:///tmp/staging/"),
        ("TARGET_ENDPOINT", "https://pathling.example/fhir"),
        ("TARGET_AUTHENTICATION_ENABLED", "false"),
        ("TRANSFER_CONCURRENCY", "8"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let spec = match config::parse(&RawConfig::from_env(vars, &[]), &[]) {
        Ok(c) => c.spec,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let t0 = Timestamp(1_800_000_000_000);
    let Ok(mut run) = SyncRun::start("bench", spec, None, t0) else {
        eprintln!("the run did not start");
        return ExitCode::FAILURE;
    };
    let digest = ManifestDigest {
        transaction_time: "2026-01-01T00:00:00Z".into(),
        files: (0..n)
            .map(|_| (FileKind::Output, "Patient".into()))
            .collect(),
        duplicates: 0,
        files_hash: None,
    };
    let started = std::time::Instant::now();
    let mut steps = 0u64;
    while let Next::Run { requests } = run.next(t0) {
        let Some(request) = requests.first() else {
            break;
        };
        let result = match &request.effect {
            Effect::KickoffExport(_) => EffectResult::ExportAccepted {
                status_url: "https://source.example/fhir/status/1".into(),
            },
            Effect::PollExport { .. } => EffectResult::ExportCompleted {
                digest: digest.clone(),
            },
            Effect::StageFile { .. } => EffectResult::FileStaged {
                bytes: 1,
                resources: 1,
                newline_added: false,
                outcomes: None,
            },
            _ => break,
        };
        match run.step(
            Input::Completed {
                id: request.id,
                result,
            },
            t0,
        ) {
            Ok(next) => run = next,
            Err(e) => {
                eprintln!("refused: {e}");
                return ExitCode::FAILURE;
            }
        }
        steps += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{n} files: {steps} steps in {secs:.2} s, {:.1} us a step (ended in {})",
        secs * 1e6 / steps.max(1) as f64,
        run.state.name()
    );
    ExitCode::SUCCESS
}
