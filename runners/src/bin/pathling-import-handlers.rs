//! `pathling-import-handlers`: the original pathling-import's five Lambda handlers
//! (`fhirExport`, `checkExportStatus`, `transferToS3`, `pathlingImport`, `checkImportStatus`)
//! in one binary, for its Step Functions definition. Which one runs is the Lambda function's
//! `Handler` setting (`_HANDLER` in a custom runtime; `handlers.fhirExport` works too), or the
//! first argument when run by hand. The logic is in `pathling_import_runners::sfn::compat`.

use lambda_runtime::{service_fn, LambdaEvent};
use pathling_import_runners::aws::{self, LambdaFailure};
use pathling_import_runners::executor::now;
use pathling_import_runners::report;
use pathling_import_runners::sfn::compat::{Handler, Handlers};
use pathling_import_runners::sfn::{self, EXTRA_KEYS};
use serde_json::Value;
use std::sync::Arc;

fn handler_from_environment() -> Result<Handler, LambdaFailure> {
    let setting = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("_HANDLER").ok())
        .unwrap_or_default();
    Handler::from_setting(&setting).ok_or_else(|| {
        let names: Vec<&str> = Handler::ALL.iter().map(|h| h.name()).collect();
        LambdaFailure::configuration(format!(
            "the function's Handler setting {setting:?} names none of the handlers {}",
            names.join(", ")
        ))
    })
}

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    aws::init_logging();
    let handler = handler_from_environment();
    let config = aws::load_config(EXTRA_KEYS).await;
    let _sentry = config
        .as_ref()
        .ok()
        .and_then(|c| report::init_sentry(&c.sentry));
    let handlers: Result<Handlers, LambdaFailure> = match (handler, config) {
        (Ok(handler), Ok(config)) => Handlers::new(handler, config).await,
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    match &handlers {
        Ok(h) => tracing::info!(handler = %h.handler(), "ready"),
        Err(e) => {
            tracing::error!(error_type = %e.error_type, "start-up failed: {}", e.message);
            report::capture_error("handlers", &e.to_string());
        }
    }
    let handlers = Arc::new(handlers);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let handlers = handlers.clone();
        async move {
            let handlers = handlers.as_ref().as_ref().map_err(Clone::clone)?;
            let budget = aws::budget_until(
                &event.context,
                now(),
                handlers.configured_budget(),
                sfn::DEADLINE_MARGIN,
            );
            let result = handlers.invoke(event.payload, budget).await;
            if let Err(e) = &result {
                tracing::info!(handler = %handlers.handler(), error_type = %e.error_type, "{}", e.message);
            }
            result
        }
    }))
    .await
}
