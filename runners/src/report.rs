//! Reporting how a run ended: Sentry capture (with context, never a secret) and the
//! one-paragraph human summary.

use pathling_import_core::config::SentryConfig;
use pathling_import_core::state::{FailedRun, Summary};
use pathling_import_core::Terminal;

/// Starts Sentry when a DSN is configured. Keep the guard alive until exit: dropping it
/// flushes queued events.
///
/// The DSN is parsed here rather than by `sentry::init`, which panics on a malformed one; the
/// configuration already refuses such a DSN, so this only guards the runners' own paths.
pub fn init_sentry(config: &SentryConfig) -> Option<sentry::ClientInitGuard> {
    let dsn = config.dsn.as_ref()?;
    crate::redact::secret(dsn.expose());
    let dsn: sentry::types::Dsn = match dsn.expose().parse() {
        Ok(dsn) => dsn,
        Err(_) => {
            tracing::error!("SENTRY_DSN is not a valid DSN; failures are not reported to Sentry");
            return None;
        }
    };
    let mut options = sentry::ClientOptions::default();
    options.dsn = Some(dsn);
    options.release = config.release.clone().map(Into::into);
    options.environment = config.environment.clone().map(Into::into);
    // Bodies, headers and URLs with signatures must never leave the process.
    options.send_default_pii = false;
    Some(sentry::init(options))
}

/// Sends a failed run to Sentry (no-op without a client) and flushes.
pub fn capture_failure(run_id: &str, runner: &str, failed: &FailedRun) {
    if sentry::Hub::current().client().is_none() {
        return;
    }
    sentry::with_scope(
        |scope| {
            scope.set_tag("run_id", run_id);
            scope.set_tag("phase", failed.phase);
            scope.set_tag("runner", runner);
            // From the structured cause, never parsed out of the message.
            if let Some(cause) = &failed.cause {
                scope.set_tag("failure_kind", cause.kind.name());
                if let Some(status) = cause.status() {
                    scope.set_tag("http_status", status);
                }
            }
            scope.set_fingerprint(Some(&["pathling-import", failed.phase.as_str()]));
        },
        || {
            sentry::capture_message(
                &format!("sync failed in {}: {}", failed.phase, failed.reason),
                sentry::Level::Error,
            )
        },
    );
    if let Some(client) = sentry::Hub::current().client() {
        client.flush(Some(std::time::Duration::from_secs(5)));
    }
}

/// Sends any other error (bad configuration, store failures) to Sentry.
pub fn capture_error(runner: &str, message: &str) {
    if sentry::Hub::current().client().is_none() {
        return;
    }
    sentry::with_scope(
        |scope| scope.set_tag("runner", runner),
        || sentry::capture_message(message, sentry::Level::Error),
    );
    if let Some(client) = sentry::Hub::current().client() {
        client.flush(Some(std::time::Duration::from_secs(5)));
    }
}

pub fn describe_summary(s: &Summary) -> String {
    let mut out = format!(
        "{} file(s) staged, {} resource(s), {:.1} MB",
        s.files_staged,
        s.resources,
        s.bytes as f64 / 1e6
    );
    if s.nothing_to_import {
        out.push_str("; nothing to import");
    } else if s.imported_files > 0 {
        out.push_str(&format!("; {} file(s) imported", s.imported_files));
    }
    if s.deleted + s.already_absent > 0 {
        out.push_str(&format!(
            "; {} deleted ({} already absent)",
            s.deleted, s.already_absent
        ));
    }
    if !s.source_errors.is_empty() {
        out.push_str(&format!(
            "; the source reported {} error(s), {} warning(s)",
            s.source_errors.error + s.source_errors.fatal,
            s.source_errors.warning
        ));
    }
    if s.duplicate_urls > 0 {
        out.push_str(&format!(
            "; {} duplicate file URL(s) in the manifest staged once",
            s.duplicate_urls
        ));
    }
    if let Some(tt) = &s.transaction_time {
        out.push_str(&format!("; transactionTime {tt}"));
    }
    out
}

pub fn describe_terminal(t: &Terminal) -> String {
    match t {
        Terminal::Succeeded(s) => format!("succeeded: {}", describe_summary(s)),
        Terminal::Failed(f) => format!(
            "failed in {}: {} ({})",
            f.phase,
            f.reason,
            describe_summary(&f.summary)
        ),
        Terminal::Cancelled(c) => format!("cancelled in {}: {}", c.phase, c.reason),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn duplicate_manifest_urls_are_reported() {
        let mut s = super::Summary {
            files_staged: 2,
            ..Default::default()
        };
        assert!(!super::describe_summary(&s).contains("duplicate"));
        s.duplicate_urls = 3;
        assert!(
            super::describe_summary(&s)
                .contains("; 3 duplicate file URL(s) in the manifest staged once"),
            "{}",
            super::describe_summary(&s)
        );
    }
}
