//! Which settings a run is bound to.
//!
//! A run's spec is snapshotted when it starts, and every runner later rebuilds its executor
//! from that snapshot — but with the secrets of the *current* configuration. Whoever can
//! write a stored run (a Step Functions execution input, the single Lambda's DynamoDB item,
//! the staging bucket, the CLI's state file) could otherwise pair the configured client
//! secret with an endpoint of their choosing. So a stored run is only driven when the
//! settings that decide *where credentials and data go* are the same in the run and in the
//! configuration: the endpoints, everything about authentication (method, client ids, key
//! ids, signing algorithm, the secret references — never their values — and whether an
//! insecure token endpoint is allowed), and the staging location.
//!
//! Secret *values* are not part of a run: rotating a secret behind the same reference
//! (`secretsmanager:`, `ssm:`, or the same configuration key) is allowed; changing the
//! reference is a difference.

use crate::machine::SyncRun;
use crate::spec::{AuthSpec, RunSpec, SecretRef, SigningAlgorithm};
use crate::state::SyncState;

/// One bound setting that differs between a stored run and the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    /// The configuration key (CONSTANT_CASE).
    pub key: &'static str,
    /// What the run recorded, shown safely (secret references, never values).
    pub recorded: String,
    /// What the configuration says now.
    pub configured: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: the run has {}, the configuration {}",
            self.key, self.recorded, self.configured
        )
    }
}

/// The keys whose recorded and configured values differ, in configuration-table order.
pub fn differences(recorded: &RunSpec, configured: &RunSpec) -> Vec<Difference> {
    let mut out = Vec::new();
    let mut check = |key: &'static str, a: String, b: String| {
        if a != b {
            out.push(Difference {
                key,
                recorded: a,
                configured: b,
            });
        }
    };
    check(
        "SOURCE_ENDPOINT",
        shown(&recorded.source.endpoint),
        shown(&configured.source.endpoint),
    );
    auth_differences(
        &mut check,
        &recorded.source.auth,
        &configured.source.auth,
        SOURCE_KEYS,
    );
    check(
        "STAGING_URL",
        shown(&recorded.staging.to_string()),
        shown(&configured.staging.to_string()),
    );
    check(
        "TARGET_ENDPOINT",
        shown(&recorded.target.endpoint),
        shown(&configured.target.endpoint),
    );
    auth_differences(
        &mut check,
        &recorded.target.auth,
        &configured.target.auth,
        TARGET_KEYS,
    );
    out
}

/// The configuration keys of one side's authentication settings.
struct AuthKeys {
    enabled: &'static str,
    client_id: &'static str,
    method: &'static str,
    client_secret: &'static str,
    private_key: &'static str,
    key_id: &'static str,
    algorithm: &'static str,
    insecure: &'static str,
}

const SOURCE_KEYS: AuthKeys = AuthKeys {
    enabled: "SOURCE_AUTHENTICATION_ENABLED",
    client_id: "SOURCE_CLIENT_ID",
    method: "SOURCE_AUTH_METHOD",
    client_secret: "SOURCE_CLIENT_SECRET",
    private_key: "SOURCE_PRIVATE_KEY",
    key_id: "SOURCE_KEY_ID",
    algorithm: "SOURCE_SIGNING_ALGORITHM",
    insecure: "SOURCE_ALLOW_INSECURE_AUTH",
};

const TARGET_KEYS: AuthKeys = AuthKeys {
    enabled: "TARGET_AUTHENTICATION_ENABLED",
    client_id: "TARGET_CLIENT_ID",
    method: "TARGET_AUTH_METHOD",
    client_secret: "TARGET_CLIENT_SECRET",
    private_key: "TARGET_PRIVATE_KEY",
    key_id: "TARGET_KEY_ID",
    algorithm: "TARGET_SIGNING_ALGORITHM",
    insecure: "TARGET_ALLOW_INSECURE_AUTH",
};

fn auth_differences(
    check: &mut impl FnMut(&'static str, String, String),
    a: &AuthSpec,
    b: &AuthSpec,
    keys: AuthKeys,
) {
    check(keys.enabled, a.enabled.to_string(), b.enabled.to_string());
    if !a.enabled && !b.enabled {
        // Nothing else of a disabled side is ever used.
        return;
    }
    check(
        keys.client_id,
        optional(a.client_id.as_deref()),
        optional(b.client_id.as_deref()),
    );
    check(
        keys.method,
        optional(a.method.map(|m| m.as_str())),
        optional(b.method.map(|m| m.as_str())),
    );
    check(
        keys.client_secret,
        reference(a.client_secret.as_ref()),
        reference(b.client_secret.as_ref()),
    );
    check(
        keys.private_key,
        reference(a.private_key.as_ref()),
        reference(b.private_key.as_ref()),
    );
    check(
        keys.key_id,
        optional(a.key_id.as_deref()),
        optional(b.key_id.as_deref()),
    );
    check(
        keys.algorithm,
        optional(a.signing_algorithm.map(algorithm)),
        optional(b.signing_algorithm.map(algorithm)),
    );
    check(
        keys.insecure,
        a.allow_insecure.to_string(),
        b.allow_insecure.to_string(),
    );
}

fn algorithm(a: SigningAlgorithm) -> &'static str {
    match a {
        SigningAlgorithm::RS384 => "RS384",
        SigningAlgorithm::ES384 => "ES384",
    }
}

/// A value safe to print: control characters dropped, at most 200 characters, quoted.
fn shown(text: &str) -> String {
    let clean: String = text.chars().filter(|c| !c.is_control()).collect();
    format!("{:?}", crate::bulk::truncate(&clean, 200))
}

fn optional(v: Option<&str>) -> String {
    v.map_or_else(|| "(unset)".to_string(), shown)
}

/// Where a secret comes from — never its value. Configuration-held values are one reference
/// whatever their key's spelling (environment or file): the value may change (rotation).
fn reference(r: Option<&SecretRef>) -> String {
    match r {
        None => "(unset)".into(),
        Some(SecretRef::Config { .. }) => "a value in the configuration".into(),
        Some(SecretRef::SecretsManager { id }) => format!("secretsmanager:{}", shown(id)),
        Some(SecretRef::Ssm { name }) => format!("ssm:{}", shown(name)),
    }
}

/// Why a run cannot take the configuration's bound settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RebindError {
    #[error("STAGING_URL cannot change for a run whose files are already staged (they live at the old location); finish the run with the old settings, or start anew with --fresh")]
    StagingHasFiles,
}

impl SyncRun {
    /// The run bound to `configured`'s settings instead of its own (an operator's explicit
    /// choice, e.g. to correct a wrong target endpoint and resume a failed import without
    /// exporting again). The staging location may only change before anything was staged.
    /// Counts as a step (`seq` moves on) so that stores persist it like any other.
    pub fn rebind(&self, configured: &RunSpec) -> Result<SyncRun, RebindError> {
        let has_files = !matches!(
            self.state,
            SyncState::KickingOffExport(_) | SyncState::PollingExport(_)
        );
        if has_files && self.spec.staging != configured.staging {
            return Err(RebindError::StagingHasFiles);
        }
        let mut next = self.clone();
        next.spec.source.endpoint = configured.source.endpoint.clone();
        next.spec.source.auth = configured.source.auth.clone();
        next.spec.target.endpoint = configured.target.endpoint.clone();
        next.spec.target.auth = configured.target.auth.clone();
        next.spec.staging = configured.staging.clone();
        next.seq = self.seq.saturating_add(1);
        next.upgraded_from = None;
        Ok(next)
    }
}
