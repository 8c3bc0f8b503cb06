//! # pathling-import-runners: everything that touches the world
//!
//! The core ([`pathling_import_core`]) decides; this crate performs. Every runner — the
//! `pathling-import` CLI today, the AWS Lambda runners next — shares one executor and one
//! driver loop, and differs only in where the run is stored and how it waits.
//!
//! ## Layout
//!
//! - [`executor`]: performs a core `Request` (Bulk Data kick-off, polling, downloads,
//!   Pathling detection, `$import`, deletions, export clean-up) and reports facts.
//! - [`http`]: the translation of HTTP answers into `Failure` facts, and capped body reads.
//! - [`net`]: the clients' trust (system roots, `*_CA_FILE`) and address policy (no
//!   server-supplied URL reaches metadata, link-local or internal addresses unless a
//!   configured endpoint is on such a network).
//! - [`auth`]: SMART discovery and client-credentials tokens (`client_secret_basic`,
//!   `client_secret_post`, `private_key_jwt` with RS384/ES384), cached and refreshed.
//! - [`staging`]: S3 streaming multipart uploads and atomic directory writes.
//! - [`driver`]: the loop (`next` → execute → `step` → save), with in-process sleeps, time
//!   budgets and interruption.
//! - [`local`]: the local runner behind the `pathling-import` CLI (what to do with the stored
//!   run, preflight, driving, what the user is told); the binary only parses arguments.
//! - [`event_log`]: writes the operator's event log (bulk-data-client format) to the runner's
//!   sink and to `{prefix}{run id}/log.ndjson` next to the staged data.
//! - [`file_store`]: the CLI's locked, atomically replaced state file.
//! - [`dynamo_store`]: the single Lambda's store: one DynamoDB item per sync, conditional
//!   writes on `seq`, a lease so overlapping invocations never both perform effects.
//! - [`redact`]: the one path that masks every secret value in text a server sent.
//! - [`report`]: Sentry capture and human summaries.
//! - [`resume`]: admitting a stored run: its bound settings must match the configuration's.
//! - [`sfn`]: the Step Functions task (`pathling-import-sfn`, driven by `state-machine.json`)
//!   and the original's five handlers ([`sfn::compat`], `pathling-import-handlers`).
//! - [`single_lambda`]: the `pathling-import-lambda` runner: lease, load, drive within the
//!   invocation's budget, save, release, summary.
//! - [`watermark`]: the incremental starting point kept next to the staged data.
//! - [`aws`]: shared Lambda plumbing: stable `errorType` names ([`aws::ErrorType`]),
//!   configuration with `secretsmanager:`/`ssm:` references resolved, the invocation's time
//!   budget, run ids, JSON logs.
//!
//! ## Contracts
//!
//! - Secrets live only in [`auth::Authenticator`]; no result, log line, error or persisted
//!   byte carries one.
//! - A store's `save` is conditional on the previous `seq`; on a conflict the driver stops,
//!   because another worker owns the run.
//! - The executor never retries on its own (except one re-authentication after a 401): the
//!   core schedules every retry, so waits survive restarts.
pub mod auth;
pub mod aws;
pub mod driver;
pub mod dynamo_store;
pub mod emf;
pub mod event_log;
pub mod executor;
pub mod file_store;
pub mod http;
pub mod local;
pub mod net;
pub mod redact;
pub mod report;
pub mod resume;
pub mod sfn;
pub mod single_lambda;
pub mod staging;
pub mod watermark;

/// `err: cause: cause…`, from the errors' `Display` only (never `Debug`, which for the AWS
/// SDK dumps raw responses), skipping a cause whose text the message already holds (reqwest's
/// own message alone is often just "error sending request"; smithy errors repeat their
/// cause's).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// A new run id, `YYYYMMDDTHHMMSSZ-xxxxxx`: sortable by start time, with 24 random bits so that
/// runs started within the same second (by several containers) differ. Every runner takes
/// its run ids from here.
pub fn new_run_id(now: pathling_import_core::Timestamp) -> String {
    let stamp = now.to_fhir_instant().replace(['-', ':'], "");
    let stamp = stamp.split('.').next().unwrap_or("run");
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{stamp}Z-{}", &random[..6])
}

#[cfg(test)]
mod tests {
    #[test]
    fn run_ids_are_valid_for_the_machine_and_distinct() {
        let now = pathling_import_core::Timestamp(1_750_000_000_000);
        let id = super::new_run_id(now);
        assert!(id.starts_with("20250615T150640Z-"), "{id}");
        assert!(id.len() <= 64);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let ids: std::collections::BTreeSet<String> =
            (0..100).map(|_| super::new_run_id(now)).collect();
        assert!(ids.len() > 95, "{} distinct of 100", ids.len());
    }
}
