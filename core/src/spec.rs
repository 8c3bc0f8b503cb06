//! The validated, serializable description of one sync run (`RunSpec`).
//!
//! A spec is snapshotted into the run when it starts, so a redeploy with new configuration
//! never changes an in-flight run. It holds no secret: credentials are *referenced*
//! ([`SecretRef`]) and their values travel separately in [`crate::config::Secrets`].

use crate::staging::StagingLocation;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub source: SourceSpec,
    pub export: ExportSpec,
    pub staging: StagingLocation,
    pub target: TargetSpec,
    pub retry: RetrySpec,
    pub transfer: TransferSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceSpec {
    /// Base URL of the FHIR server, without a trailing slash.
    pub endpoint: String,
    pub auth: AuthSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetSpec {
    /// Base URL of the Pathling server, without a trailing slash.
    pub endpoint: String,
    pub auth: AuthSpec,
    pub import_mode: ImportMode,
    pub api: PathlingApiChoice,
    /// Apply the manifest's `deleted[]` entries to the target after the import.
    pub apply_deletions: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuthSpec {
    pub enabled: bool,
    pub client_id: Option<String>,
    pub scopes: String,
    /// `None`: chosen from the server's `token_endpoint_auth_methods_supported`.
    pub method: Option<AuthMethod>,
    pub client_secret: Option<SecretRef>,
    pub private_key: Option<SecretRef>,
    /// The `kid` of the signing key; may instead come from a JWK's own `kid`.
    pub key_id: Option<String>,
    /// `None`: taken from the key (RSA → RS384, EC P-384 → ES384).
    pub signing_algorithm: Option<SigningAlgorithm>,
    /// Allow a token endpoint over plain http outside a loopback test setup. Absent (false)
    /// in runs persisted before it existed; not written when false, so their JSON is
    /// unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_insecure: bool,
}

impl AuthSpec {
    pub fn disabled() -> Self {
        AuthSpec {
            enabled: false,
            client_id: None,
            scopes: String::new(),
            method: None,
            client_secret: None,
            private_key: None,
            key_id: None,
            signing_algorithm: None,
            allow_insecure: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    ClientSecretBasic,
    ClientSecretPost,
    PrivateKeyJwt,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ClientSecretBasic => "client_secret_basic",
            AuthMethod::ClientSecretPost => "client_secret_post",
            AuthMethod::PrivateKeyJwt => "private_key_jwt",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SigningAlgorithm {
    RS384,
    ES384,
}

/// Where a secret's value comes from. The value itself never enters a spec or a state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum SecretRef {
    /// The configuration key (environment variable or JSON file key) that held the value.
    Config { key: String },
    /// An AWS Secrets Manager secret id or ARN, resolved by the runner.
    SecretsManager { id: String },
    /// An AWS SSM Parameter Store name (a SecureString), resolved by the runner.
    Ssm { name: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportSpec {
    pub level: ExportLevel,
    /// `_type`; empty means every type the server exports.
    pub types: Vec<String>,
    pub since: SinceSpec,
    /// `_outputFormat`.
    pub output_format: String,
    /// `_typeFilter` entries, each `Type?query`.
    pub type_filters: Vec<String>,
    /// `_elements`.
    pub elements: Vec<String>,
    /// `patient` references (`Patient/123`): the kick-off becomes a POST with `Parameters`.
    pub patients: Vec<String>,
    /// `includeAssociatedData`.
    pub include_associated_data: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "level", content = "id", rename_all = "snake_case")]
pub enum ExportLevel {
    System,
    Patient,
    Group(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "instant", rename_all = "snake_case")]
pub enum SinceSpec {
    /// A full export.
    None,
    /// A fixed FHIR instant.
    At(String),
    /// The `transactionTime` of the last successful run (a full export when there is none).
    LastSuccess,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportMode {
    Merge,
    Overwrite,
    Append,
    Ignore,
    Error,
}

impl ImportMode {
    /// The mode a code names (`merge`, `overwrite`, `append`, `ignore`, `error`).
    pub fn from_code(code: &str) -> Option<ImportMode> {
        Some(match code {
            "merge" => ImportMode::Merge,
            "overwrite" => ImportMode::Overwrite,
            "append" => ImportMode::Append,
            "ignore" => ImportMode::Ignore,
            "error" => ImportMode::Error,
            _ => return None,
        })
    }

    pub fn as_code(self) -> &'static str {
        match self {
            ImportMode::Merge => "merge",
            ImportMode::Overwrite => "overwrite",
            ImportMode::Append => "append",
            ImportMode::Ignore => "ignore",
            ImportMode::Error => "error",
        }
    }
    /// Pathling 7.x knows only `merge` and `overwrite`.
    pub fn supported_by_v7(self) -> bool {
        matches!(self, ImportMode::Merge | ImportMode::Overwrite)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathlingApiChoice {
    /// Detect from `GET /metadata`, falling back on the server's 400 answer.
    Auto,
    V7,
    V9,
}

/// The two incompatible `$import` request shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathlingApi {
    /// Pathling 7.x and earlier: `source` parts with `mode`.
    V7,
    /// Pathling 9.2 and later: `input` parts, `saveMode`, `inputFormat`.
    V9,
}

impl PathlingApi {
    pub fn other(self) -> PathlingApi {
        match self {
            PathlingApi::V7 => PathlingApi::V9,
            PathlingApi::V9 => PathlingApi::V7,
        }
    }

    /// The `PATHLING_API` value that selects it.
    pub fn setting(self) -> &'static str {
        match self {
            PathlingApi::V7 => "7",
            PathlingApi::V9 => "9",
        }
    }

    /// What a request of this shape means when it names no mode: 7.x imports with
    /// `overwrite` by default, 9.2+ with `merge`.
    pub fn default_mode(self) -> ImportMode {
        match self {
            PathlingApi::V7 => ImportMode::Overwrite,
            PathlingApi::V9 => ImportMode::Merge,
        }
    }
}

/// Retry and patience settings per phase, plus the clamp on server-requested waits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetrySpec {
    pub export: PhasePolicy,
    pub transfer: PhasePolicy,
    pub import: PhasePolicy,
    /// Upper bound on any wait a server asks for with `Retry-After`.
    pub retry_after_max_ms: u64,
}

/// The original's `{PHASE}_RETRY_{TIMES,WAIT,BACK_OFF}` plus an optional overall deadline.
///
/// - `times`: how many times an operation of this phase is retried (polls of a running job,
///   attempts of a transient failure, attempts per file); 0 means no retry at all.
/// - `wait_ms`, `back_off`: the `i`-th wait for a running job is `wait × back_off^i` unless
///   the server's `Retry-After` says otherwise; `wait_ms` also caps the exponential backoff
///   after transient failures.
/// - `timeout_ms`: the phase's overall deadline; `None` derives it from the original's total
///   patience, `Σ wait × back_off^i` for `i < times`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhasePolicy {
    pub times: u32,
    pub wait_ms: u64,
    pub back_off: f64,
    pub timeout_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferSpec {
    /// Files transferred at once (toward one source).
    pub concurrency: u32,
    /// S3 multipart part size in bytes: `TRANSFER_PART_SIZE` when set, otherwise derived from
    /// the memory budget ([`crate::config::effective_part_size_mib`]).
    pub part_size: u64,
    /// Bytes for the in-memory part buffers of all transfers together (`TRANSFER_MEMORY`).
    /// Absent in runs started before the setting existed: [`Self::memory_budget`] gives them
    /// the bound they had, two parts per transfer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    pub connect_timeout_ms: u64,
    /// A download or request with no progress for this long fails (and is retried).
    pub read_timeout_ms: u64,
    /// The largest export manifest read into memory.
    #[serde(default = "default_manifest_max_bytes")]
    pub manifest_max_bytes: u64,
    /// How each staged file's content is checked as it streams ([`crate::content`]).
    /// Absent in runs started before the setting existed: they check with the default.
    #[serde(default, skip_serializing_if = "Validation::is_default")]
    pub validate: Validation,
}

impl TransferSpec {
    /// The transfer memory budget in bytes, never less than two parts.
    pub fn memory_budget(&self) -> u64 {
        let two_parts = self.part_size.saturating_mul(2);
        self.memory
            .unwrap_or_else(|| two_parts.saturating_mul(u64::from(self.concurrency.max(1))))
            .max(two_parts)
    }
}

/// How much of each downloaded NDJSON file is checked while it streams to the staging store
/// (configuration key `VALIDATE`; see [`crate::content::NdjsonCheck`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Validation {
    /// Every non-blank line must look like a JSON object (`{` … `}`), and the first one is
    /// parsed: its `resourceType` must be the manifest's type for the file.
    #[default]
    Sample,
    /// As `Sample`, and every line is parsed as JSON and must have that `resourceType`.
    Full,
    /// No check at all: an escape hatch for sources that violate the format (the file is
    /// staged as sent and Pathling judges it).
    Off,
}

impl Validation {
    pub fn as_str(self) -> &'static str {
        match self {
            Validation::Sample => "sample",
            Validation::Full => "full",
            Validation::Off => "off",
        }
    }

    pub fn is_default(&self) -> bool {
        *self == Validation::default()
    }
}

fn default_manifest_max_bytes() -> u64 {
    64 * 1024 * 1024
}
