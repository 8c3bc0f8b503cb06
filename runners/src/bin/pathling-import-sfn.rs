//! `pathling-import-sfn`: the Step Functions task Lambda that `state-machine.json` calls in a
//! loop. The logic (input, output, actions) is in `pathling_import_runners::sfn`.
//!
//! Configuration comes from the environment (the CLI's keys, `secretsmanager:`/`ssm:`
//! references resolved once per container), plus `LAMBDA_TIME_BUDGET` and `LAMBDA_MAX_SLEEP`.
//! A configuration problem is reported at start-up in the log and then as the
//! `ConfigurationError` of every invocation.

use lambda_runtime::{service_fn, LambdaEvent};
use pathling_import_runners::aws::{self, LambdaFailure};
use pathling_import_runners::executor::now;
use pathling_import_runners::report;
use pathling_import_runners::sfn::{self, Task};
use serde_json::Value;
use std::sync::Arc;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    aws::init_logging();
    let config = aws::load_config(sfn::EXTRA_KEYS).await;
    let _sentry = config
        .as_ref()
        .ok()
        .and_then(|c| report::init_sentry(&c.sentry));
    let task: Result<Task, LambdaFailure> = match config {
        Ok(config) => Task::new(config).await,
        Err(e) => Err(e),
    };
    if let Err(e) = &task {
        tracing::error!(error_type = %e.error_type, "start-up failed: {}", e.message);
        report::capture_error("step-functions", &e.to_string());
    }
    let task = Arc::new(task);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let task = task.clone();
        async move {
            let task = task.as_ref().as_ref().map_err(Clone::clone)?;
            let budget = aws::budget_until(
                &event.context,
                now(),
                task.configured_budget(),
                sfn::DEADLINE_MARGIN,
            );
            task.invoke(event.payload, budget).await
        }
    }))
    .await
}
