//! `pathling-import-lambda`: the single-Lambda runner (a schedule or a direct invocation drives
//! the sync's current run, kept in DynamoDB). All logic is in
//! `pathling_import_runners::single_lambda`; see the README's "Deploying to AWS".

use lambda_runtime::{service_fn, LambdaEvent};
use pathling_import_runners::aws::{self, LambdaFailure};
use pathling_import_runners::single_lambda::{SingleLambda, Summary};
use serde_json::Value;
use std::sync::Arc;
use tokio::sync::OnceCell;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    aws::init_logging();
    // Built on the first invocation rather than before the runtime starts, so that a bad
    // configuration is reported as a named `ConfigurationError` (not a bare init crash), and a
    // failed start-up (e.g. Secrets Manager throttled) is retried by the next invocation.
    let container: Arc<OnceCell<SingleLambda>> = Arc::new(OnceCell::new());
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let container = container.clone();
        async move {
            let lambda = container.get_or_try_init(SingleLambda::from_env).await?;
            let summary: Summary = lambda.handle(&event.payload, &event.context).await?;
            Ok::<Summary, LambdaFailure>(summary)
        }
    }))
    .await
}
