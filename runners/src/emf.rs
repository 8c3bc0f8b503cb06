//! The Lambda runners' metrics, as CloudWatch Embedded Metric Format (EMF) log lines: a JSON
//! object per line on stdout, which CloudWatch Logs turns into metrics without an API call
//! (no extra permission, no latency, nothing lost when the invocation ends).
//!
//! What is published ([`pathling_import_core::metrics`] derives it from each step):
//! - per invocation, one line of totals (`FilesStaged`, `BytesStaged`, `ResourcesStaged`,
//!   `Retries`, and `StateWrites` / `StateBytes` where the state is written to DynamoDB) with
//!   the dimension `Runner`;
//! - as they happen, `PhaseDuration` when a phase ends, and `RunsSucceeded` / `RunsFailed` /
//!   `RunsCancelled` with `RunDuration` when a run ends, with the dimensions `Runner` and
//!   `Phase` (the phase that ended; the phase a run failed or was cancelled in), and again
//!   with `Runner` alone (what the template's alarm on `RunsFailed` watches).
//!
//! Every line carries the run id as the property `RunId` (searchable in Logs Insights, not a
//! dimension: a dimension per run would make a metric per run). The namespace is
//! `METRICS_NAMESPACE` (default `PathlingImport`).
//!
//! The structure follows the EMF specification: a root `_aws` object with `Timestamp`
//! (epoch milliseconds) and `CloudWatchMetrics`, a list of directives each with `Namespace`,
//! `Dimensions` (lists of dimension names, each a string member of the root) and `Metrics`
//! (`Name` and `Unit`, each name a numeric member of the root).

use crate::aws::LambdaFailure;
use crate::driver::Observer;
use crate::executor::now;
use pathling_import_core::config::Config;
use pathling_import_core::effect::{EffectResult, Request};
use pathling_import_core::metrics::{self, Metric, Sample};
use pathling_import_core::state::Phase;
use pathling_import_core::{SyncRun, Timestamp};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// The configuration key naming the CloudWatch namespace.
pub const METRICS_NAMESPACE: &str = "METRICS_NAMESPACE";
pub const DEFAULT_NAMESPACE: &str = "PathlingImport";

/// `METRICS_NAMESPACE`, checked as CloudWatch checks it: 1 to 255 characters of letters,
/// digits and `.-_/#: `, not starting with `AWS/` (reserved for AWS services).
pub fn namespace(config: &Config) -> Result<String, LambdaFailure> {
    let Some(text) = config.extras.get(METRICS_NAMESPACE) else {
        return Ok(DEFAULT_NAMESPACE.to_string());
    };
    let ok = !text.is_empty()
        && text.len() <= 255
        && !text.starts_with("AWS/")
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_/#: ".contains(c));
    if ok {
        Ok(text.clone())
    } else {
        Err(LambdaFailure::configuration(format!(
            "{METRICS_NAMESPACE}: a CloudWatch namespace is 1 to 255 characters of letters, \
             digits and . - _ / # : or space, not starting with AWS/; got {:?}",
            text.chars().take(80).collect::<String>()
        )))
    }
}

/// Where the lines go.
#[derive(Clone)]
pub enum MetricsSink {
    /// Lambda's stdout, which CloudWatch Logs reads.
    Stdout,
    /// Kept in memory (tests).
    Memory(Arc<Mutex<Vec<String>>>),
}

impl MetricsSink {
    fn write(&self, line: &str) {
        match self {
            // Metrics are a record, not a control path: a failing stdout must not stop a run.
            MetricsSink::Stdout => {
                let _ = writeln!(std::io::stdout(), "{line}");
            }
            MetricsSink::Memory(lines) => lines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(line.to_string()),
        }
    }
}

/// An observer publishing the metrics of one run's drive.
pub struct Emf {
    namespace: String,
    runner: &'static str,
    run_id: String,
    sink: MetricsSink,
    totals: Mutex<BTreeMap<Metric, u64>>,
}

impl Emf {
    /// `runner` is the `Runner` dimension: `single-lambda` or `step-functions`.
    pub fn new(namespace: &str, runner: &'static str, run_id: &str, sink: MetricsSink) -> Emf {
        Emf {
            namespace: namespace.to_string(),
            runner,
            run_id: run_id.to_string(),
            sink,
            totals: Mutex::new(BTreeMap::new()),
        }
    }

    /// Publishes the invocation's totals (nothing when nothing was counted).
    pub fn flush(&self) {
        let totals = std::mem::take(&mut *self.totals.lock().unwrap_or_else(|p| p.into_inner()));
        if totals.is_empty() {
            return;
        }
        let figures: Vec<(Metric, u64)> = totals.into_iter().collect();
        self.sink.write(
            &line(
                &self.namespace,
                self.runner,
                &self.run_id,
                None,
                &figures,
                now(),
            )
            .to_string(),
        );
    }

    fn publish(&self, samples: Vec<Sample>, at: Timestamp) {
        let mut by_phase: BTreeMap<Phase, Vec<(Metric, u64)>> = BTreeMap::new();
        {
            let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
            for s in samples {
                match s.phase {
                    None => {
                        let total = totals.entry(s.metric).or_default();
                        *total = total.saturating_add(s.value);
                    }
                    Some(phase) => by_phase.entry(phase).or_default().push((s.metric, s.value)),
                }
            }
        }
        for (phase, figures) in by_phase {
            self.sink.write(
                &line(
                    &self.namespace,
                    self.runner,
                    &self.run_id,
                    Some(phase),
                    &figures,
                    at,
                )
                .to_string(),
            );
        }
    }
}

impl Observer for Emf {
    fn stepped(&self, before: &SyncRun, after: &SyncRun, request: &Request, result: &EffectResult) {
        let at = now();
        self.publish(metrics::stepped(before, request, result, after, at), at);
    }

    fn saved(&self, _run: &SyncRun, bytes: u64) {
        self.publish(metrics::saved(bytes), now());
    }
}

/// One EMF line: `figures` (each metric once) in `namespace`, with the dimension `Runner`, and
/// `Phase` when the figures are about one.
pub fn line(
    namespace: &str,
    runner: &str,
    run_id: &str,
    phase: Option<Phase>,
    figures: &[(Metric, u64)],
    at: Timestamp,
) -> Value {
    // Phase figures are also published per runner alone, so that an alarm can watch one
    // metric (`RunsFailed` of a runner) whatever the phase.
    let dimensions: Vec<Vec<&str>> = match phase {
        Some(_) => vec![vec!["Runner", "Phase"], vec!["Runner"]],
        None => vec![vec!["Runner"]],
    };
    let definitions: Vec<Value> = figures
        .iter()
        .map(|(m, _)| json!({"Name": m.name(), "Unit": m.unit().as_str()}))
        .collect();
    let mut root = Map::new();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": at.0,
            "CloudWatchMetrics": [{
                "Namespace": namespace,
                "Dimensions": dimensions,
                "Metrics": definitions,
            }],
        }),
    );
    root.insert("Runner".into(), json!(runner));
    if let Some(phase) = phase {
        root.insert("Phase".into(), json!(phase.as_str()));
    }
    root.insert("RunId".into(), json!(run_id));
    for (metric, value) in figures {
        root.insert(metric.name().into(), json!(value));
    }
    Value::Object(root)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_line_names_each_figure_and_dimension_in_its_root() {
        let v = line(
            "PathlingImport",
            "single-lambda",
            "r1",
            Some(Phase::StagingFiles),
            &[(Metric::PhaseDuration, 1500)],
            Timestamp(1_700_000_000_000),
        );
        assert_eq!(v["_aws"]["Timestamp"], 1_700_000_000_000u64);
        let directive = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "PathlingImport");
        assert_eq!(
            directive["Dimensions"],
            json!([["Runner", "Phase"], ["Runner"]])
        );
        assert_eq!(
            directive["Metrics"],
            json!([{"Name": "PhaseDuration", "Unit": "Milliseconds"}])
        );
        assert_eq!(v["Phase"], "staging_files");
        assert_eq!(v["Runner"], "single-lambda");
        assert_eq!(v["RunId"], "r1");
        assert_eq!(v["PhaseDuration"], 1500);
    }

    #[test]
    fn the_namespace_is_checked_as_cloudwatch_does() {
        let config = |ns: Option<&str>| {
            let mut pairs = vec![
                (
                    "SOURCE_ENDPOINT".to_string(),
                    "https://s.example/fhir".to_string(),
                ),
                (
                    "TARGET_ENDPOINT".to_string(),
                    "https://t.example/fhir".to_string(),
                ),
                (
                    "STAGING_URL".to_string(),
                    "s3://staging-bucket/p/".to_string(),
                ),
                (
                    "SOURCE_AUTHENTICATION_ENABLED".to_string(),
                    "false".to_string(),
                ),
                (
                    "TARGET_AUTHENTICATION_ENABLED".to_string(),
                    "false".to_string(),
                ),
            ];
            if let Some(ns) = ns {
                pairs.push((METRICS_NAMESPACE.to_string(), ns.to_string()));
            }
            let raw =
                pathling_import_core::config::RawConfig::from_env(pairs, &[METRICS_NAMESPACE]);
            pathling_import_core::config::parse(&raw, &[METRICS_NAMESPACE]).unwrap()
        };
        assert_eq!(namespace(&config(None)).unwrap(), DEFAULT_NAMESPACE);
        assert_eq!(
            namespace(&config(Some("Team/FHIR sync"))).unwrap(),
            "Team/FHIR sync"
        );
        for bad in ["AWS/Lambda", "bad{ns}", &"x".repeat(256)] {
            let e = namespace(&config(Some(bad))).unwrap_err();
            assert!(e.message.contains(METRICS_NAMESPACE), "{e}");
        }
    }
}
