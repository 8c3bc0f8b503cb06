//! Plumbing shared by the AWS Lambda runners (the single Lambda with DynamoDB and the Step
//! Functions task): stable Lambda error names, configuration with secrets resolved from
//! Secrets Manager / SSM, the invocation's time budget, run ids and logging.
//!
//! ## Contracts
//!
//! - A Lambda error's `errorType` is one of [`ErrorType`]'s names, never a Rust type path:
//!   Step Functions definitions match them (`JobInProgressError` is the original's name and is
//!   retried by its definition). Messages never carry a secret value.
//! - Configuration is read from the environment once per container (cold start), validated in
//!   full ([`ErrorType::Configuration`] lists every problem, naming each key), and every
//!   `secretsmanager:<id>` / `ssm:<name>` reference is resolved then. A failed resolution is
//!   not cached by callers, so a later invocation tries again.
//! - [`budget_until`] never trusts an implausible deadline: cargo-lambda's emulator sends a
//!   duration where Lambda sends an epoch time, so `Context::deadline` may lie in 1970.

use crate::driver::StoreError;
use aws_config::SdkConfig;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use lambda_runtime::{Context, Diagnostic};
use pathling_import_core::config::{self, Config, RawConfig, Secret};
use pathling_import_core::spec::SecretRef;
use pathling_import_core::Timestamp;
use std::fmt;
use std::future::Future;
use std::time::Duration;

/// Seconds an invocation may work when the runtime reports no usable deadline; also the cap
/// applied to a real deadline when set. (Environment variable, read as an extra key.)
pub const LAMBDA_TIME_BUDGET: &str = "LAMBDA_TIME_BUDGET";
/// The budget when neither a usable deadline nor `LAMBDA_TIME_BUDGET` is given: 14 minutes, a
/// minute below Lambda's 15-minute maximum.
pub const DEFAULT_TIME_BUDGET: Duration = Duration::from_secs(840);
/// Lambda's maximum invocation time; a deadline further away than this (plus slack) is bogus.
const LAMBDA_MAX: Duration = Duration::from_secs(15 * 60);

/// The stable `errorType` names of the AWS runners' Lambda errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorType {
    /// The job is not finished yet; call again later (the original's name; Step Functions
    /// definitions retry on it).
    JobInProgress,
    /// The run failed permanently (the message says in which phase and why).
    SyncFailed,
    /// The configuration is invalid or a referenced secret cannot be read.
    Configuration,
    /// The stored run is corrupt, from a newer version, or was changed by another worker.
    State,
    /// An infrastructure hiccup (DynamoDB, S3, Secrets Manager throttling or network): worth
    /// a retry.
    Transient,
}

impl ErrorType {
    /// Every variant, for tests and documentation.
    pub const ALL: [ErrorType; 5] = [
        ErrorType::JobInProgress,
        ErrorType::SyncFailed,
        ErrorType::Configuration,
        ErrorType::State,
        ErrorType::Transient,
    ];

    /// The `errorType` a Lambda error reports.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorType::JobInProgress => "JobInProgressError",
            ErrorType::SyncFailed => "SyncFailedError",
            ErrorType::Configuration => "ConfigurationError",
            ErrorType::State => "StateError",
            ErrorType::Transient => "TransientError",
        }
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Lambda function error with a stable name. Build messages from facts only (keys, ids,
/// phases, statuses) — never from a secret value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LambdaFailure {
    pub error_type: ErrorType,
    pub message: String,
}

impl LambdaFailure {
    pub fn new(error_type: ErrorType, message: impl Into<String>) -> Self {
        LambdaFailure {
            error_type,
            message: message.into(),
        }
    }
    pub fn job_in_progress(message: impl Into<String>) -> Self {
        Self::new(ErrorType::JobInProgress, message)
    }
    pub fn sync_failed(message: impl Into<String>) -> Self {
        Self::new(ErrorType::SyncFailed, message)
    }
    pub fn configuration(message: impl Into<String>) -> Self {
        Self::new(ErrorType::Configuration, message)
    }
    pub fn state(message: impl Into<String>) -> Self {
        Self::new(ErrorType::State, message)
    }
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorType::Transient, message)
    }
    /// A `TransientError` (worth the caller's retry) when the cause may heal by itself,
    /// otherwise `otherwise`.
    pub fn transient_or(transient: bool, otherwise: ErrorType, message: impl Into<String>) -> Self {
        Self::new(
            if transient {
                ErrorType::Transient
            } else {
                otherwise
            },
            message,
        )
    }
}

impl From<crate::executor::PreflightError> for LambdaFailure {
    /// A staging location or target credentials that do not work are configuration.
    fn from(e: crate::executor::PreflightError) -> Self {
        Self::transient_or(
            e.is_transient(),
            ErrorType::Configuration,
            format!("preflight: {e}"),
        )
    }
}

impl From<crate::watermark::WatermarkError> for LambdaFailure {
    fn from(e: crate::watermark::WatermarkError) -> Self {
        Self::transient_or(e.is_transient(), ErrorType::State, e.to_string())
    }
}

impl fmt::Display for LambdaFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.error_type, self.message)
    }
}

impl std::error::Error for LambdaFailure {}

impl From<LambdaFailure> for Diagnostic {
    fn from(failure: LambdaFailure) -> Diagnostic {
        Diagnostic {
            error_type: failure.error_type.name().to_string(),
            error_message: failure.message,
        }
    }
}

impl From<StoreError> for LambdaFailure {
    fn from(e: StoreError) -> Self {
        match e {
            // Another worker advanced the run: this invocation's view is stale.
            StoreError::Conflict { .. } => LambdaFailure::state(e.to_string()),
            StoreError::Io(_) => LambdaFailure::transient(e.to_string()),
        }
    }
}

/// Loads the AWS SDK configuration (region, credentials, endpoint overrides such as
/// `AWS_ENDPOINT_URL`) from the environment. Once per container.
pub async fn sdk_config() -> SdkConfig {
    aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await
}

/// Resolves `secretsmanager:` / `ssm:` references to values.
pub trait SecretResolver {
    /// `key` is the configuration key that held the reference, for error messages.
    fn resolve(
        &self,
        key: &str,
        reference: &SecretRef,
    ) -> impl Future<Output = Result<Secret, LambdaFailure>> + Send;
}

/// Reads secrets from AWS Secrets Manager (`GetSecretValue`, the string or UTF-8 binary
/// value) and SSM Parameter Store (`GetParameter` with decryption).
#[derive(Clone, Debug)]
pub struct AwsSecrets {
    secrets_manager: aws_sdk_secretsmanager::Client,
    ssm: aws_sdk_ssm::Client,
}

impl AwsSecrets {
    pub fn new(sdk: &SdkConfig) -> Self {
        AwsSecrets {
            secrets_manager: aws_sdk_secretsmanager::Client::new(sdk),
            ssm: aws_sdk_ssm::Client::new(sdk),
        }
    }
}

impl SecretResolver for AwsSecrets {
    async fn resolve(&self, key: &str, reference: &SecretRef) -> Result<Secret, LambdaFailure> {
        match reference {
            SecretRef::SecretsManager { id } => {
                let out = self
                    .secrets_manager
                    .get_secret_value()
                    .secret_id(id)
                    .send()
                    .await
                    .map_err(|e| {
                        let transient = is_transient_sdk_error(&e);
                        let msg = format!(
                            "{key}: Secrets Manager secret {id:?} could not be read: {}",
                            crate::error_chain(&e)
                        );
                        sdk_failure(transient, msg)
                    })?;
                if let Some(s) = out.secret_string() {
                    return Ok(Secret::new(s));
                }
                let binary = out.secret_binary().ok_or_else(|| {
                    LambdaFailure::configuration(format!(
                        "{key}: Secrets Manager secret {id:?} has no value"
                    ))
                })?;
                String::from_utf8(binary.as_ref().to_vec())
                    .map(Secret::new)
                    .map_err(|_| {
                        LambdaFailure::configuration(format!(
                            "{key}: Secrets Manager secret {id:?} is binary, not UTF-8 text"
                        ))
                    })
            }
            SecretRef::Ssm { name } => {
                let out = self
                    .ssm
                    .get_parameter()
                    .name(name)
                    .with_decryption(true)
                    .send()
                    .await
                    .map_err(|e| {
                        let transient = is_transient_sdk_error(&e);
                        let msg = format!(
                            "{key}: SSM parameter {name:?} could not be read: {}",
                            crate::error_chain(&e)
                        );
                        sdk_failure(transient, msg)
                    })?;
                out.parameter()
                    .and_then(|p| p.value())
                    .map(Secret::new)
                    .ok_or_else(|| {
                        LambdaFailure::configuration(format!(
                            "{key}: SSM parameter {name:?} has no value"
                        ))
                    })
            }
            SecretRef::Config { key: held_by } => Err(LambdaFailure::configuration(format!(
                "{key}: internal: a plain value ({held_by}) is not a reference"
            ))),
        }
    }
}

fn sdk_failure(transient: bool, message: String) -> LambdaFailure {
    if transient {
        LambdaFailure::transient(message)
    } else {
        LambdaFailure::configuration(message)
    }
}

/// Throttling, timeouts, dispatch (network) failures and 5xx are worth retrying; a missing
/// secret or a denied access is a configuration problem. (Every AWS SDK crate re-exports the
/// same `SdkError`, so this serves DynamoDB, S3, Secrets Manager and SSM alike.)
pub fn is_transient_sdk_error<E: ProvideErrorMetadata>(e: &SdkError<E>) -> bool {
    match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => true,
        SdkError::ResponseError(r) => r.raw().status().as_u16() >= 500,
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            let code = s.err().code().unwrap_or_default();
            status >= 500
                || status == 429
                || code.contains("Throttl")
                || matches!(
                    code,
                    "RequestLimitExceeded"
                        | "InternalServerError"
                        | "InternalServiceError"
                        | "ServiceUnavailable"
                )
        }
        _ => false,
    }
}

/// Reads the configuration from the environment and resolves every AWS secret reference
/// through AWS. Call once per container.
pub async fn load_config(extra_keys: &[&str]) -> Result<Config, LambdaFailure> {
    let sdk = sdk_config().await;
    load_config_from(std::env::vars(), extra_keys, &AwsSecrets::new(&sdk)).await
}

/// [`load_config`] with the variables and the resolver given (tests use their own).
///
/// Besides the four client credentials, `SENTRY_DSN` may also be a `secretsmanager:` or
/// `ssm:` reference.
pub async fn load_config_from<I, R>(
    vars: I,
    extra_keys: &[&str],
    resolver: &R,
) -> Result<Config, LambdaFailure>
where
    I: IntoIterator<Item = (String, String)>,
    R: SecretResolver,
{
    let vars: Vec<(String, String)> = vars.into_iter().collect();
    let raw = RawConfig::from_env(vars.iter().cloned(), extra_keys);
    let mut config = config::parse(&raw, extra_keys)
        .map_err(|e| LambdaFailure::configuration(e.to_string().trim_end().to_string()))?;

    let wanted = [
        (
            "SOURCE_CLIENT_SECRET",
            config.spec.source.auth.client_secret.clone(),
        ),
        (
            "SOURCE_PRIVATE_KEY",
            config.spec.source.auth.private_key.clone(),
        ),
        (
            "TARGET_CLIENT_SECRET",
            config.spec.target.auth.client_secret.clone(),
        ),
        (
            "TARGET_PRIVATE_KEY",
            config.spec.target.auth.private_key.clone(),
        ),
    ];
    for (key, reference) in wanted {
        let Some(reference) = reference.filter(is_aws_reference) else {
            continue;
        };
        let value = resolver.resolve(key, &reference).await?;
        let slot = match key {
            "SOURCE_CLIENT_SECRET" => &mut config.secrets.source_client_secret,
            "SOURCE_PRIVATE_KEY" => &mut config.secrets.source_private_key,
            "TARGET_CLIENT_SECRET" => &mut config.secrets.target_client_secret,
            _ => &mut config.secrets.target_private_key,
        };
        *slot = Some(value);
    }
    // The core keeps no reference for the DSN (it is not part of a run); read it here.
    if config.sentry.dsn.is_none() {
        let dsn = vars
            .iter()
            .find(|(k, _)| k == "SENTRY_DSN")
            .map(|(_, v)| v.trim());
        if let Some(reference) = dsn.and_then(parse_aws_reference) {
            config.sentry.dsn = Some(resolver.resolve("SENTRY_DSN", &reference).await?);
        }
    }
    Ok(config)
}

fn is_aws_reference(r: &SecretRef) -> bool {
    matches!(r, SecretRef::SecretsManager { .. } | SecretRef::Ssm { .. })
}

fn parse_aws_reference(value: &str) -> Option<SecretRef> {
    if let Some(id) = value.strip_prefix("secretsmanager:") {
        Some(SecretRef::SecretsManager { id: id.to_string() })
    } else {
        value.strip_prefix("ssm:").map(|name| SecretRef::Ssm {
            name: name.to_string(),
        })
    }
}

/// A runner key holding a number of seconds (from the configuration's extras), if set:
/// every Lambda setting in seconds is read by this one function, with its range.
pub fn seconds_setting(
    config: &Config,
    key: &str,
    range: std::ops::RangeInclusive<f64>,
) -> Result<Option<Duration>, LambdaFailure> {
    let Some(text) = config.extras.get(key) else {
        return Ok(None);
    };
    match text.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && range.contains(&s) => Ok(Some(Duration::from_secs_f64(s))),
        _ => Err(LambdaFailure::configuration(format!(
            "{key}: expected seconds from {} to {}, got {text:?}",
            range.start(),
            range.end()
        ))),
    }
}

/// `LAMBDA_TIME_BUDGET` (seconds, from the configuration's extras), if set.
pub fn configured_budget(config: &Config) -> Result<Option<Duration>, LambdaFailure> {
    seconds_setting(config, LAMBDA_TIME_BUDGET, 0.001..=86_400.0)
}

/// `LAMBDA_MAX_SLEEP`: waits up to this long are slept inside the invocation (0: never).
pub const LAMBDA_MAX_SLEEP: &str = "LAMBDA_MAX_SLEEP";

/// `LAMBDA_MAX_SLEEP`, or `default`. At most 900 s: longer than an invocation can last.
pub fn max_sleep(config: &Config, default: Duration) -> Result<Duration, LambdaFailure> {
    Ok(seconds_setting(config, LAMBDA_MAX_SLEEP, 0.0..=900.0)?.unwrap_or(default))
}

/// The moment an invocation must stop starting work: its deadline minus `margin`, but no later
/// than `now + configured`. When the deadline is unusable — in the past (cargo-lambda's
/// emulator sends a duration, so the deadline lies in 1970) or further away than Lambda's
/// 15 minutes — the configured budget (default [`DEFAULT_TIME_BUDGET`]) is used instead.
/// When to cut transfers still in flight after a budget that ends at `budget` (with `margin`
/// left before the Lambda's deadline): two thirds into the margin, so that the last save and
/// the answer still happen, or sooner after a short budget (as long after it as the budget
/// lasted, at least 5 s: tests run with budgets of a second, and must not cut small files).
pub fn cut_after(budget: Timestamp, now: Timestamp, margin: Duration) -> Timestamp {
    let margin_ms = u64::try_from(margin.as_millis()).unwrap_or(u64::MAX);
    let span = budget.0.saturating_sub(now.0).max(5_000);
    budget.plus_ms((margin_ms / 3 * 2).min(span))
}

pub fn budget_until(
    ctx: &Context,
    now: Timestamp,
    configured: Option<Duration>,
    margin: Duration,
) -> Timestamp {
    budget_from_deadline(ctx.deadline, now, configured, margin)
}

fn budget_from_deadline(
    deadline_ms: u64,
    now: Timestamp,
    configured: Option<Duration>,
    margin: Duration,
) -> Timestamp {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let by_config = now.plus_ms(ms(configured.unwrap_or(DEFAULT_TIME_BUDGET)));
    let plausible =
        deadline_ms > now.0 && deadline_ms <= now.0.saturating_add(ms(LAMBDA_MAX) + 60_000);
    if !plausible {
        return by_config;
    }
    let by_deadline = Timestamp(deadline_ms.saturating_sub(ms(margin)).max(now.0));
    match configured {
        Some(_) => by_deadline.min(by_config),
        None => by_deadline,
    }
}

/// JSON log lines on stdout for CloudWatch (`PATHLING_IMPORT_LOG` filters, default `info`);
/// no timestamps or colours, CloudWatch adds its own.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PATHLING_IMPORT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_env_filter(filter)
        .with_ansi(false)
        .without_time()
        .with_current_span(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    const NOW: Timestamp = Timestamp(1_750_000_000_000);
    const MARGIN: Duration = Duration::from_secs(30);

    #[test]
    fn budget_is_the_deadline_minus_the_margin() {
        let deadline = NOW.0 + 600_000;
        let b = budget_from_deadline(deadline, NOW, None, MARGIN);
        assert_eq!(b, Timestamp(deadline - 30_000));
    }

    #[test]
    fn a_configured_budget_clamps_a_real_deadline() {
        let deadline = NOW.0 + 600_000;
        let b = budget_from_deadline(deadline, NOW, Some(Duration::from_secs(60)), MARGIN);
        assert_eq!(b, NOW.plus_ms(60_000));
        // A configured budget longer than the deadline allows does not extend it.
        let b = budget_from_deadline(deadline, NOW, Some(Duration::from_secs(3600)), MARGIN);
        assert_eq!(b, Timestamp(deadline - 30_000));
    }

    #[test]
    fn an_emulator_deadline_in_1970_falls_back_to_the_configured_budget() {
        // cargo-lambda sends the remaining duration (e.g. 900000 ms) as the "deadline".
        let b = budget_from_deadline(900_000, NOW, Some(Duration::from_secs(5)), MARGIN);
        assert_eq!(b, NOW.plus_ms(5_000));
        let b = budget_from_deadline(0, NOW, None, MARGIN);
        assert_eq!(b, NOW.plus_ms(840_000), "default budget");
    }

    #[test]
    fn an_absurdly_distant_deadline_is_ignored() {
        let b = budget_from_deadline(NOW.0 + 86_400_000, NOW, None, MARGIN);
        assert_eq!(b, NOW.plus_ms(840_000));
        let b = budget_from_deadline(u64::MAX, NOW, Some(Duration::from_secs(7)), MARGIN);
        assert_eq!(b, NOW.plus_ms(7_000));
    }

    #[test]
    fn a_deadline_within_the_margin_leaves_no_budget() {
        let b = budget_from_deadline(NOW.0 + 10_000, NOW, None, MARGIN);
        assert_eq!(b, NOW, "never before now, never negative");
    }

    #[test]
    fn transfers_are_cut_two_thirds_into_the_margin_or_soon_after_a_short_budget() {
        // A real budget: 14 min, then 20 s of the 30 s margin.
        let budget = NOW.plus_ms(840_000);
        assert_eq!(cut_after(budget, NOW, MARGIN), budget.plus_ms(20_000));
        // A test's budget of a second: cut 5 s after it.
        let budget = NOW.plus_ms(1_000);
        assert_eq!(cut_after(budget, NOW, MARGIN), budget.plus_ms(5_000));
    }

    #[test]
    fn budget_until_reads_the_context_deadline() {
        let mut ctx = Context::default();
        ctx.deadline = NOW.0 + 120_000;
        assert_eq!(
            budget_until(&ctx, NOW, None, MARGIN),
            Timestamp(NOW.0 + 90_000)
        );
    }

    #[test]
    fn error_names_are_stable_and_reach_the_diagnostic() {
        let names: Vec<&str> = ErrorType::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(
            names,
            [
                "JobInProgressError",
                "SyncFailedError",
                "ConfigurationError",
                "StateError",
                "TransientError"
            ]
        );
        let d: Diagnostic = LambdaFailure::job_in_progress("export running").into();
        assert_eq!(d.error_type, "JobInProgressError");
        assert_eq!(d.error_message, "export running");
    }

    #[test]
    fn store_errors_map_to_state_and_transient() {
        let c: LambdaFailure = StoreError::Conflict { expected: 3 }.into();
        assert_eq!(c.error_type, ErrorType::State);
        let io: LambdaFailure = StoreError::Io("throttled".into()).into();
        assert_eq!(io.error_type, ErrorType::Transient);
    }

    struct FakeResolver {
        values: HashMap<String, String>,
        asked: Mutex<Vec<String>>,
    }

    impl SecretResolver for FakeResolver {
        async fn resolve(&self, key: &str, r: &SecretRef) -> Result<Secret, LambdaFailure> {
            let id = match r {
                SecretRef::SecretsManager { id } => format!("sm:{id}"),
                SecretRef::Ssm { name } => format!("ssm:{name}"),
                SecretRef::Config { key } => format!("config:{key}"),
            };
            self.asked.lock().unwrap().push(format!("{key}={id}"));
            self.values
                .get(&id)
                .map(|v| Secret::new(v.clone()))
                .ok_or_else(|| LambdaFailure::configuration(format!("{key}: {id} not found")))
        }
    }

    fn vars(extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = [
            ("SOURCE_ENDPOINT", "https://fhir.example.org/fhir"),
            ("SOURCE_CLIENT_ID", "id"),
            ("STAGING_URL", "s3://bucket/prefix/"),
            ("TARGET_ENDPOINT", "https://pathling.example.org/fhir"),
            ("TARGET_CLIENT_ID", "importer"),
            ("TARGET_CLIENT_SECRET", "plain-target-secret"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        v.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        v
    }

    #[tokio::test]
    async fn references_are_resolved_and_plain_values_kept() {
        let resolver = FakeResolver {
            values: HashMap::from([
                ("sm:arn:src".to_string(), "source-secret-value".to_string()),
                (
                    "ssm:/dsn".to_string(),
                    "https://k@sentry.example/1".to_string(),
                ),
            ]),
            asked: Mutex::new(Vec::new()),
        };
        let c = load_config_from(
            vars(&[
                ("SOURCE_CLIENT_SECRET", "secretsmanager:arn:src"),
                ("SENTRY_DSN", "ssm:/dsn"),
                (LAMBDA_TIME_BUDGET, "12.5"),
            ]),
            &[LAMBDA_TIME_BUDGET],
            &resolver,
        )
        .await
        .unwrap();
        assert_eq!(
            c.secrets.source_client_secret.as_ref().map(Secret::expose),
            Some("source-secret-value")
        );
        assert_eq!(
            c.secrets.target_client_secret.as_ref().map(Secret::expose),
            Some("plain-target-secret")
        );
        assert_eq!(
            c.sentry.dsn.as_ref().map(Secret::expose),
            Some("https://k@sentry.example/1")
        );
        assert_eq!(
            configured_budget(&c).unwrap(),
            Some(Duration::from_millis(12_500))
        );
        assert_eq!(
            *resolver.asked.lock().unwrap(),
            ["SOURCE_CLIENT_SECRET=sm:arn:src", "SENTRY_DSN=ssm:/dsn"]
        );
        let spec = serde_json::to_string(&c.spec).unwrap();
        assert!(!spec.contains("source-secret-value"));
    }

    #[tokio::test]
    async fn a_missing_secret_names_the_key_and_bad_config_lists_problems() {
        let resolver = FakeResolver {
            values: HashMap::new(),
            asked: Mutex::new(Vec::new()),
        };
        let e = load_config_from(
            vars(&[("SOURCE_PRIVATE_KEY", "ssm:/keys/source")]),
            &[],
            &resolver,
        )
        .await
        .unwrap_err();
        assert_eq!(e.error_type, ErrorType::Configuration);
        assert!(e.message.starts_with("SOURCE_PRIVATE_KEY"), "{e}");

        let e = load_config_from(
            vec![("SOURCE_ENDPOINT".to_string(), "nope".to_string())],
            &[],
            &resolver,
        )
        .await
        .unwrap_err();
        assert_eq!(e.error_type, ErrorType::Configuration);
        assert!(e.message.contains("SOURCE_ENDPOINT"), "{e}");
        assert!(e.message.contains("TARGET_ENDPOINT"), "{e}");
    }

    #[test]
    fn a_bad_time_budget_is_a_configuration_error() {
        let raw = RawConfig::from_env(
            vars(&[
                (LAMBDA_TIME_BUDGET, "soon"),
                ("SOURCE_AUTHENTICATION_ENABLED", "false"),
            ]),
            &[LAMBDA_TIME_BUDGET],
        );
        let c = config::parse(&raw, &[LAMBDA_TIME_BUDGET]).unwrap();
        let e = configured_budget(&c).unwrap_err();
        assert_eq!(e.error_type, ErrorType::Configuration);
        assert!(e.message.contains(LAMBDA_TIME_BUDGET));
    }
}
