//! Configuration: the original's environment variables (CONSTANT_CASE) or its JSON file (the
//! same names in lowerCamelCase), parsed into one validated [`RunSpec`] plus [`Secrets`].
//!
//! Every problem is collected and reported together, each naming its key, before any network
//! call. Values that the original took only as strings (`"false"`, `"24"`) are accepted as
//! strings, and JSON booleans and numbers are accepted too. An explicit `0` is honoured.

use crate::bulk::is_resource_type;
use crate::spec::*;
use crate::staging::StagingLocation;
use std::collections::BTreeMap;
use std::fmt;

/// A secret value. Its `Debug` and `Display` never show it; it is not `Serialize`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The only way to read the value: the call site says what it is doing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The credentials a spec refers to, resolved to values. Lives only in the executor.
#[derive(Clone, Debug, Default)]
pub struct Secrets {
    pub source_client_secret: Option<Secret>,
    pub source_private_key: Option<Secret>,
    pub target_client_secret: Option<Secret>,
    pub target_private_key: Option<Secret>,
}

/// Error reporting settings (not part of a run).
#[derive(Clone, Debug, Default)]
pub struct SentryConfig {
    pub dsn: Option<Secret>,
    pub environment: Option<String>,
    pub release: Option<String>,
}

/// Trust settings of this process (not part of a run: a new CA applies at once).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// A PEM file of extra root certificates trusted for the source (and its file URLs).
    pub source_ca_file: Option<String>,
    /// The same for the target.
    pub target_ca_file: Option<String>,
}

/// Everything configuration yields.
#[derive(Clone, Debug)]
pub struct Config {
    pub spec: RunSpec,
    pub secrets: Secrets,
    pub tls: TlsConfig,
    pub sentry: SentryConfig,
    /// Runner-specific keys the caller asked for (by CONSTANT_CASE name), as given.
    pub extras: BTreeMap<String, String>,
}

/// One configuration value as given: environment variables are always strings; a JSON file
/// may also give numbers, booleans and arrays of strings.
#[derive(Clone, Debug, PartialEq)]
pub enum RawValue {
    Str(String),
    Num(f64),
    Bool(bool),
    List(Vec<String>),
}

/// Where the values came from, for error messages (`SOURCE_ENDPOINT` or `sourceEndpoint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Environment,
    File,
}

/// One problem with one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The key as the user wrote it (or would write it, for a missing key).
    pub key: String,
    pub message: String,
}

/// All problems found, reported together.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem(s)):",
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  {}: {}", p.key, p.message)?;
        }
        Ok(())
    }
}

/// Every key the core understands: (CONSTANT_CASE name, is it new compared with the original,
/// default, description). The README's configuration table is generated from the same facts.
pub const KEYS: &[(&str, bool, &str, &str)] = &[
    ("SOURCE_ENDPOINT", false, "(required)", "Base URL of the source FHIR server."),
    ("TYPES", false, "(all)", "Comma-separated resource types to export (`_type`)."),
    ("SINCE", false, "(full export)", "FHIR instant for `_since`, or `auto` for the last successful run's transactionTime."),
    ("EXPORT_LEVEL", true, "system", "`system`, `patient`, or `group/<id>`."),
    ("TYPE_FILTERS", true, "", "`_typeFilter` values, each `Type?query` as written or URL-encoded as in a query string (`Type%3Fquery`); in the environment separated by spaces."),
    ("ELEMENTS", true, "", "Comma-separated `_elements`."),
    ("OUTPUT_FORMAT", true, "application/fhir+ndjson", "`_outputFormat`."),
    ("PATIENTS", true, "", "Comma-separated `Patient/id` references; the kick-off becomes a POST with `patient` parameters (patient or group level)."),
    ("INCLUDE_ASSOCIATED_DATA", true, "", "Comma-separated `includeAssociatedData` values."),
    ("SOURCE_AUTHENTICATION_ENABLED", false, "true", "`false` disables authentication to the source."),
    ("SOURCE_CLIENT_ID", false, "", "Client id for the source token grant."),
    ("SOURCE_CLIENT_SECRET", false, "", "Client secret (`client_secret_basic` / `client_secret_post`); a value `secretsmanager:<id>` or `ssm:<name>` is resolved by the AWS runners."),
    ("SOURCE_SCOPES", false, "system/*.read", "Scopes requested from the source."),
    ("SOURCE_AUTH_METHOD", true, "(from discovery)", "`client_secret_basic`, `client_secret_post` or `private_key_jwt`."),
    ("SOURCE_PRIVATE_KEY", true, "", "Signing key for `private_key_jwt`: a JWK (JSON) or a PEM; `secretsmanager:`/`ssm:` references allowed."),
    ("SOURCE_KEY_ID", true, "(the JWK's kid)", "The `kid` of the source signing key."),
    ("SOURCE_SIGNING_ALGORITHM", true, "(from the key)", "`RS384` or `ES384`."),
    ("SOURCE_ALLOW_INSECURE_AUTH", true, "false", "Allow the SMART token endpoint over plain http (never do this outside a test network)."),
    ("SOURCE_CA_FILE", true, "", "A PEM file of extra root certificates to trust for the source (an internal CA); the system's trust store (honouring SSL_CERT_FILE/SSL_CERT_DIR) is always used too."),
    ("STAGING_URL", false, "(required; the CLI defaults to ./pathling-import-staging)", "`s3://bucket/prefix/` or `file:///absolute/dir/`."),
    ("TARGET_ENDPOINT", false, "(required)", "Base URL of the target Pathling server."),
    ("TARGET_AUTHENTICATION_ENABLED", false, "true", "`false` disables authentication to the target."),
    ("TARGET_CLIENT_ID", false, "", "Client id for the target token grant."),
    ("TARGET_CLIENT_SECRET", false, "", "Client secret for the target."),
    ("TARGET_SCOPES", false, "user/*.write", "Scopes requested from the target."),
    ("TARGET_AUTH_METHOD", true, "(from discovery)", "As SOURCE_AUTH_METHOD."),
    ("TARGET_PRIVATE_KEY", true, "", "As SOURCE_PRIVATE_KEY."),
    ("TARGET_KEY_ID", true, "(the JWK's kid)", "As SOURCE_KEY_ID."),
    ("TARGET_SIGNING_ALGORITHM", true, "(from the key)", "As SOURCE_SIGNING_ALGORITHM."),
    ("TARGET_ALLOW_INSECURE_AUTH", true, "false", "As SOURCE_ALLOW_INSECURE_AUTH."),
    ("TARGET_CA_FILE", true, "", "As SOURCE_CA_FILE, for the target."),
    ("IMPORT_MODE", false, "merge", "`merge` or `overwrite`; on Pathling 9.2+ also `append`, `ignore`, `error`."),
    ("PATHLING_API", true, "auto", "`auto` (detect), `7` (7.x `source` shape) or `9` (9.2+ `input` shape)."),
    ("APPLY_DELETIONS", true, "false", "Apply the export's `deleted[]` entries to Pathling (9.x only)."),
    ("EXPORT_RETRY_TIMES", false, "24", "Retries while the export runs or fails transiently."),
    ("EXPORT_RETRY_WAIT", false, "900", "Seconds between export polls (a server's Retry-After wins); caps transient backoff."),
    ("EXPORT_RETRY_BACK_OFF", false, "1.0", "Factor applied to the wait on each poll (1.0 to 10)."),
    ("EXPORT_TIMEOUT", true, "(Σ of the waits)", "Seconds the export phase may take in all."),
    ("TRANSFER_RETRY_TIMES", false, "24", "Retries per file after a transient failure."),
    ("TRANSFER_RETRY_WAIT", false, "900", "Cap in seconds of the backoff between a file's retries."),
    ("TRANSFER_RETRY_BACK_OFF", false, "1.0", "Kept for compatibility (the transfer backoff doubles up to the wait)."),
    ("TRANSFER_TIMEOUT", true, "(Σ of the waits)", "Seconds the transfer phase may spend waiting to retry."),
    ("IMPORT_RETRY_TIMES", false, "24", "Retries while the import runs or fails transiently."),
    ("IMPORT_RETRY_WAIT", false, "900", "Seconds between import polls."),
    ("IMPORT_RETRY_BACK_OFF", false, "1.0", "Factor applied to the wait on each poll."),
    ("IMPORT_TIMEOUT", true, "(Σ of the waits)", "Seconds the import phase may take in all."),
    ("RETRY_AFTER_MAX", true, "3600", "Longest wait in seconds honoured from a server's Retry-After."),
    ("TRANSFER_CONCURRENCY", true, "4", "Files downloaded at once (1 to 32)."),
    ("TRANSFER_PART_SIZE", true, "(from TRANSFER_MEMORY)", "S3 multipart part size in MiB (5 to 512). Unset: TRANSFER_MEMORY ÷ (2 × TRANSFER_CONCURRENCY) in whole MiB, at least 5 and at most 8 (5 with the defaults), so that every transfer can fill one part while uploading another. Parts double every 1,000 parts, up to half of TRANSFER_MEMORY, within S3's 10,000 parts: the largest file is about 139.6 GiB with the defaults, 2.4 TiB with TRANSFER_MEMORY 1024."),
    ("TRANSFER_MEMORY", true, "32", "Memory in MiB for the in-memory part buffers of all transfers together (10 to 16384): however many files transfer at once, their buffers stay within it, and a transfer waits for memory rather than exceed it. It must hold two parts of TRANSFER_PART_SIZE."),
    ("HTTP_CONNECT_TIMEOUT", true, "10", "Seconds to establish a connection."),
    ("HTTP_READ_TIMEOUT", true, "60", "Seconds without any progress before a request fails."),
    ("MANIFEST_MAX_SIZE", true, "64", "Largest export manifest read, in MiB (a larger answer fails the run clearly instead of exhausting memory)."),
    ("VALIDATE", true, "sample", "How downloaded files are checked while they stream: `sample` (every non-blank line must look like a JSON object, and the first one's `resourceType` must be the manifest's type for the file), `full` (every line is also parsed as JSON and its `resourceType` checked) or `off` (no check: an escape hatch for a source that violates the NDJSON format; Pathling then judges the files). A file that fails the check fails the run, naming the file and line."),
    ("SENTRY_DSN", false, "", "Report failures to Sentry."),
    ("SENTRY_ENVIRONMENT", false, "", "Sentry environment."),
    ("SENTRY_RELEASE", false, "", "Sentry release."),
];

/// `TRANSFER_MEMORY` bounds and default, in MiB. The least holds two parts of S3's 5 MiB minimum.
pub const MIN_TRANSFER_MEMORY_MIB: u64 = 10;
pub const MAX_TRANSFER_MEMORY_MIB: u64 = 16_384;
pub const DEFAULT_TRANSFER_MEMORY_MIB: u64 = 32;

/// The part size in MiB when `TRANSFER_PART_SIZE` is not set: two parts for every concurrent
/// transfer (one filling while one uploads) out of the budget, in whole MiB, no less than S3's
/// 5 MiB minimum and no more than 8 MiB (the part size before the budget existed). Below 5 MiB the budget cannot give every transfer two parts; the
/// transfers then share it, some filling and sending one part at a time.
pub fn effective_part_size_mib(memory_mib: u64, concurrency: u32) -> u64 {
    (memory_mib / (2 * u64::from(concurrency.max(1)))).clamp(5, 8)
}

/// `SOURCE_ENDPOINT` → `sourceEndpoint`.
pub fn camel_case(constant: &str) -> String {
    let mut out = String::new();
    for (i, word) in constant.split('_').enumerate() {
        let lower = word.to_ascii_lowercase();
        if i == 0 {
            out.push_str(&lower);
        } else {
            let mut c = lower.chars();
            if let Some(first) = c.next() {
                out.push(first.to_ascii_uppercase());
                out.extend(c);
            }
        }
    }
    out
}

/// The raw key/value pairs, keyed by CONSTANT_CASE name.
#[derive(Clone, Debug)]
pub struct RawConfig {
    origin: Origin,
    values: BTreeMap<String, RawValue>,
    problems: Vec<Problem>,
}

impl RawConfig {
    /// From environment variables; unrelated variables are ignored.
    pub fn from_env<I: IntoIterator<Item = (String, String)>>(
        vars: I,
        extra_keys: &[&str],
    ) -> Self {
        let values = vars
            .into_iter()
            .filter(|(k, _)| known(k, extra_keys))
            .map(|(k, v)| (k, RawValue::Str(v)))
            .collect();
        RawConfig {
            origin: Origin::Environment,
            values,
            problems: Vec::new(),
        }
    }

    /// From a JSON configuration file's text. Unknown keys are problems (a typo would
    /// otherwise silently fall back to a default); so is a file that is not a JSON object.
    pub fn from_json(text: &str, extra_keys: &[&str]) -> Self {
        let mut raw = RawConfig {
            origin: Origin::File,
            values: BTreeMap::new(),
            problems: Vec::new(),
        };
        let obj = match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(obj)) => obj,
            Ok(_) => {
                raw.problem(
                    "(file)",
                    "the configuration file must contain a JSON object",
                );
                return raw;
            }
            Err(e) => {
                raw.problem("(file)", format!("not valid JSON: {e}"));
                return raw;
            }
        };
        let by_camel: BTreeMap<String, &str> = KEYS
            .iter()
            .map(|k| k.0)
            .chain(extra_keys.iter().copied())
            .map(|k| (camel_case(k), k))
            .collect();
        for (key, value) in obj {
            let Some(constant) = by_camel.get(&key) else {
                let hint = closest(&key, by_camel.keys().map(String::as_str))
                    .map(|c| format!(" (did you mean {c}?)"))
                    .unwrap_or_default();
                raw.problem(&key, format!("unknown key{hint}"));
                continue;
            };
            let v = match value {
                serde_json::Value::String(s) => RawValue::Str(s),
                serde_json::Value::Bool(b) => RawValue::Bool(b),
                serde_json::Value::Number(n) => match n.as_f64() {
                    Some(f) => RawValue::Num(f),
                    None => {
                        raw.problem(&key, "number out of range");
                        continue;
                    }
                },
                serde_json::Value::Null => continue,
                serde_json::Value::Array(items) => {
                    let mut list = Vec::new();
                    for item in items {
                        match item {
                            serde_json::Value::String(s) => list.push(s),
                            _ => {
                                raw.problem(&key, "arrays may only contain strings");
                                break;
                            }
                        }
                    }
                    RawValue::List(list)
                }
                serde_json::Value::Object(_) => {
                    raw.problem(&key, "objects are not allowed here");
                    continue;
                }
            };
            raw.values.insert((*constant).to_string(), v);
        }
        raw
    }

    /// Sets a value unless one was given (runners use this for their local defaults).
    pub fn set_default(&mut self, key: &str, value: &str) {
        self.values
            .entry(key.to_string())
            .or_insert_with(|| RawValue::Str(value.to_string()));
    }

    fn display_key(&self, constant: &str) -> String {
        match self.origin {
            Origin::Environment => constant.to_string(),
            Origin::File => camel_case(constant),
        }
    }

    fn problem(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.to_string(),
            message: message.into(),
        });
    }
}

/// Whether a URL's text names a user (`scheme://user[:password]@host`). Judged on the text,
/// so that even an unparseable URL's credentials are never echoed.
fn has_userinfo(text: &str) -> bool {
    let Some((_, rest)) = text.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority.contains('@')
}

/// A Sentry DSN: `http(s)://<public key>@<host>/<project id>`. Checked here so that a typo is
/// reported with the rest of the configuration instead of crashing the program later.
fn dsn_problem(dsn: &str) -> Option<&'static str> {
    let Ok(u) = url::Url::parse(dsn) else {
        return Some("is not a URL (expected https://<public key>@<host>/<project id>)");
    };
    if !matches!(u.scheme(), "http" | "https") {
        return Some("must be an http(s) URL (https://<public key>@<host>/<project id>)");
    }
    if u.username().is_empty() {
        return Some("has no public key (https://<public key>@<host>/<project id>)");
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Some("has no host (https://<public key>@<host>/<project id>)");
    }
    let project = u
        .path()
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("");
    if project.is_empty() {
        return Some("has no project id (https://<public key>@<host>/<project id>)");
    }
    None
}

/// `Type%3Fquery` (the `_typeFilter` value as it appears URL-encoded in a query string, the
/// form the Bulk Data specification's examples use) becomes `Type?query`; a filter that
/// already has its `?` is kept as written (its search values may be encoded on purpose).
fn decode_type_filter(filter: &str) -> String {
    if filter.contains('?') || !filter.to_ascii_lowercase().contains("%3f") {
        return filter.to_string();
    }
    let bytes = filter.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn known(key: &str, extra: &[&str]) -> bool {
    KEYS.iter().any(|k| k.0 == key) || extra.contains(&key)
}

/// The known key nearest to a misspelt one (edit distance ≤ 3).
fn closest<'a>(key: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| {
            (
                edit_distance(&key.to_ascii_lowercase(), &c.to_ascii_lowercase()),
                c,
            )
        })
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Reads typed values, recording a problem (and returning `None`) for each bad one.
struct Reader<'a> {
    raw: &'a RawConfig,
    problems: Vec<Problem>,
}

impl Reader<'_> {
    fn bad(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            key: self.raw.display_key(key),
            message: message.into(),
        });
    }

    /// A non-empty string value (empty strings count as unset, as in the original).
    fn string(&mut self, key: &str) -> Option<String> {
        match self.raw.values.get(key)? {
            RawValue::Str(s) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
            RawValue::Num(n) => Some(format_num(*n)),
            RawValue::Bool(b) => Some(b.to_string()),
            RawValue::List(_) => {
                self.bad(key, "expected a single value, not a list");
                None
            }
        }
    }

    fn required(&mut self, key: &str) -> Option<String> {
        let v = self.string(key);
        if v.is_none() && !matches!(self.raw.values.get(key), Some(RawValue::List(_))) {
            self.bad(key, "required but not set");
        }
        v
    }

    /// A list: a JSON array, or a string split on `sep`.
    fn list(&mut self, key: &str, sep: char) -> Vec<String> {
        match self.raw.values.get(key) {
            Some(RawValue::List(items)) => items
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            Some(_) => self
                .string(key)
                .map(|s| {
                    s.split(sep)
                        .map(|p| p.trim().to_string())
                        .filter(|p| !p.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            None => Vec::new(),
        }
    }

    fn boolean(&mut self, key: &str, default: bool) -> bool {
        match self.raw.values.get(key) {
            None => default,
            Some(RawValue::Bool(b)) => *b,
            Some(_) => match self.string(key).map(|s| s.to_ascii_lowercase()).as_deref() {
                None => default,
                Some("true" | "yes" | "1") => true,
                Some("false" | "no" | "0") => false,
                Some(other) => {
                    self.bad(key, format!("expected true or false, got {other:?}"));
                    default
                }
            },
        }
    }

    fn number(&mut self, key: &str, min: f64, max: f64) -> Option<f64> {
        let n = match self.raw.values.get(key)? {
            RawValue::Num(n) => *n,
            _ => {
                let s = self.string(key)?;
                match s.parse::<f64>() {
                    Ok(n) if n.is_finite() => n,
                    _ => {
                        self.bad(key, format!("expected a number, got {s:?}"));
                        return None;
                    }
                }
            }
        };
        if n < min || n > max {
            self.bad(
                key,
                format!(
                    "{} is out of range ({} to {})",
                    format_num(n),
                    format_num(min),
                    format_num(max)
                ),
            );
            return None;
        }
        Some(n)
    }

    fn integer(&mut self, key: &str, min: u64, max: u64) -> Option<u64> {
        let n = self.number(key, min as f64, max as f64)?;
        if n.fract() != 0.0 {
            self.bad(
                key,
                format!("expected a whole number, got {}", format_num(n)),
            );
            return None;
        }
        Some(n as u64)
    }

    fn endpoint(&mut self, key: &str) -> Option<String> {
        let s = self.required(key)?;
        if has_userinfo(&s) {
            let side = key.split('_').next().unwrap_or("SOURCE");
            self.bad(
                key,
                format!(
                    "must not carry credentials (user:password@ in the URL would be stored with \
                     the run and sent as Basic auth); use {} and {}",
                    self.raw.display_key(&format!("{side}_CLIENT_ID")),
                    self.raw.display_key(&format!("{side}_CLIENT_SECRET"))
                ),
            );
            return None;
        }
        match url::Url::parse(&s) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
                if u.query().is_some() || u.fragment().is_some() {
                    self.bad(key, "must not have a query string or fragment");
                    return None;
                }
                Some(s.trim_end_matches('/').to_string())
            }
            _ => {
                self.bad(key, format!("{s:?} is not an absolute http(s) URL"));
                None
            }
        }
    }

    fn secret(&mut self, key: &str) -> (Option<SecretRef>, Option<Secret>) {
        match self.string(key) {
            None => (None, None),
            Some(v) => {
                if let Some(id) = v.strip_prefix("secretsmanager:") {
                    (Some(SecretRef::SecretsManager { id: id.to_string() }), None)
                } else if let Some(name) = v.strip_prefix("ssm:") {
                    (
                        Some(SecretRef::Ssm {
                            name: name.to_string(),
                        }),
                        None,
                    )
                } else {
                    (
                        Some(SecretRef::Config {
                            key: self.raw.display_key(key),
                        }),
                        Some(Secret::new(v)),
                    )
                }
            }
        }
    }

    fn auth(
        &mut self,
        side: &str,
        default_scopes: &str,
    ) -> (AuthSpec, Option<Secret>, Option<Secret>) {
        let k = |name: &str| format!("{side}_{name}");
        let enabled = self.boolean(&k("AUTHENTICATION_ENABLED"), true);
        let client_id = self.string(&k("CLIENT_ID"));
        let scopes = self
            .string(&k("SCOPES"))
            .unwrap_or_else(|| default_scopes.to_string());
        let method = match self.string(&k("AUTH_METHOD")).as_deref() {
            None => None,
            Some("client_secret_basic") => Some(AuthMethod::ClientSecretBasic),
            Some("client_secret_post") => Some(AuthMethod::ClientSecretPost),
            Some("private_key_jwt") => Some(AuthMethod::PrivateKeyJwt),
            Some(other) => {
                self.bad(
                    &k("AUTH_METHOD"),
                    format!("{other:?} is not one of client_secret_basic, client_secret_post, private_key_jwt"),
                );
                None
            }
        };
        let (client_secret, secret_value) = self.secret(&k("CLIENT_SECRET"));
        let (private_key, key_value) = self.secret(&k("PRIVATE_KEY"));
        let key_id = self.string(&k("KEY_ID"));
        let signing_algorithm = match self.string(&k("SIGNING_ALGORITHM")).as_deref() {
            None => None,
            Some("RS384") => Some(SigningAlgorithm::RS384),
            Some("ES384") => Some(SigningAlgorithm::ES384),
            Some(other) => {
                self.bad(
                    &k("SIGNING_ALGORITHM"),
                    format!("{other:?} is not RS384 or ES384"),
                );
                None
            }
        };
        let allow_insecure = self.boolean(&k("ALLOW_INSECURE_AUTH"), false);
        if enabled {
            if client_id.is_none() {
                self.bad(&k("CLIENT_ID"), "required when authentication is enabled");
            }
            let needs_secret = matches!(
                method,
                Some(AuthMethod::ClientSecretBasic | AuthMethod::ClientSecretPost)
            );
            if needs_secret && client_secret.is_none() {
                self.bad(
                    &k("CLIENT_SECRET"),
                    format!(
                        "required by {}",
                        method.map(AuthMethod::as_str).unwrap_or_default()
                    ),
                );
            }
            if method == Some(AuthMethod::PrivateKeyJwt) && private_key.is_none() {
                self.bad(&k("PRIVATE_KEY"), "required by private_key_jwt");
            }
            if method.is_none() && client_secret.is_none() && private_key.is_none() {
                self.bad(
                    &k("CLIENT_SECRET"),
                    format!(
                        "a client secret or {} is required when authentication is enabled",
                        self.raw.display_key(&k("PRIVATE_KEY"))
                    ),
                );
            }
        }
        (
            AuthSpec {
                enabled,
                client_id,
                scopes,
                method,
                client_secret,
                private_key,
                key_id,
                signing_algorithm,
                allow_insecure,
            },
            secret_value,
            key_value,
        )
    }

    fn policy(&mut self, phase: &str) -> PhasePolicy {
        let times = self
            .integer(&format!("{phase}_RETRY_TIMES"), 0, 100_000)
            .unwrap_or(24) as u32;
        let wait_s = self
            .number(&format!("{phase}_RETRY_WAIT"), 0.0, 7.0 * 86_400.0)
            .unwrap_or(900.0);
        let back_off = self
            .number(&format!("{phase}_RETRY_BACK_OFF"), 1.0, 10.0)
            .unwrap_or(1.0);
        let timeout_ms = self
            .number(&format!("{phase}_TIMEOUT"), 0.0, 365.0 * 86_400.0)
            .map(|s| (s * 1000.0) as u64);
        PhasePolicy {
            times,
            wait_ms: (wait_s * 1000.0) as u64,
            back_off,
            timeout_ms,
        }
    }
}

fn format_num(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// Parses and validates everything, reporting every problem at once.
pub fn parse(raw: &RawConfig, extra_keys: &[&str]) -> Result<Config, ConfigError> {
    let mut r = Reader {
        raw,
        problems: raw.problems.clone(),
    };

    let source_endpoint = r.endpoint("SOURCE_ENDPOINT");
    let target_endpoint = r.endpoint("TARGET_ENDPOINT");

    let types = r.list("TYPES", ',');
    for t in &types {
        if !is_resource_type(t) {
            r.bad("TYPES", format!("{t:?} is not a FHIR resource type"));
        }
    }
    let since = match r.string("SINCE") {
        None => SinceSpec::None,
        Some(s) if s.eq_ignore_ascii_case("auto") => SinceSpec::LastSuccess,
        Some(s) => {
            if crate::time::parse_fhir_instant(&s).is_none() {
                r.bad(
                    "SINCE",
                    format!("{s:?} is not a FHIR instant (e.g. 2024-01-31T00:00:00Z) or `auto`"),
                );
            }
            SinceSpec::At(s)
        }
    };
    let level = match r.string("EXPORT_LEVEL") {
        None => ExportLevel::System,
        Some(s) => {
            let lower = s.to_ascii_lowercase();
            if lower == "system" {
                ExportLevel::System
            } else if lower == "patient" {
                ExportLevel::Patient
            } else if let Some(id) = lower.strip_prefix("group/").map(|_| &s[6..]) {
                if !crate::bulk::is_resource_id(id) {
                    r.bad("EXPORT_LEVEL", format!("{id:?} is not a valid Group id"));
                }
                ExportLevel::Group(id.to_string())
            } else {
                r.bad(
                    "EXPORT_LEVEL",
                    format!("{s:?} is not `system`, `patient` or `group/<id>`"),
                );
                ExportLevel::System
            }
        }
    };
    let patients = r.list("PATIENTS", ',');
    for p in &patients {
        let ok = p
            .strip_prefix("Patient/")
            .is_some_and(crate::bulk::is_resource_id);
        if !ok {
            r.bad("PATIENTS", format!("{p:?} is not a Patient/id reference"));
        }
    }
    if !patients.is_empty() && level == ExportLevel::System {
        r.bad("PATIENTS", "needs EXPORT_LEVEL patient or group/<id>");
    }
    let type_filters: Vec<String> = r
        .list("TYPE_FILTERS", ' ')
        .iter()
        .map(|f| decode_type_filter(f))
        .collect();
    for f in &type_filters {
        let ok = f
            .split_once('?')
            .is_some_and(|(t, q)| is_resource_type(t) && !q.is_empty());
        if !ok {
            r.bad(
                "TYPE_FILTERS",
                format!("{f:?} is not of the form Type?query"),
            );
        }
    }
    let export = ExportSpec {
        level,
        types,
        since,
        output_format: r
            .string("OUTPUT_FORMAT")
            .unwrap_or_else(|| "application/fhir+ndjson".into()),
        type_filters,
        elements: r.list("ELEMENTS", ','),
        patients,
        include_associated_data: r.list("INCLUDE_ASSOCIATED_DATA", ','),
    };

    let (source_auth, source_client_secret, source_private_key) = r.auth("SOURCE", "system/*.read");
    let (target_auth, target_client_secret, target_private_key) = r.auth("TARGET", "user/*.write");

    let staging = r.required("STAGING_URL").and_then(|s| {
        if has_userinfo(&s) {
            r.bad(
                "STAGING_URL",
                "must not carry credentials (user:password@); S3 credentials come from the AWS \
                 environment (AWS_PROFILE, AWS_ACCESS_KEY_ID, an instance or Lambda role)",
            );
            return None;
        }
        StagingLocation::parse(&s)
            .map_err(|e| r.bad("STAGING_URL", format!("{s:?}: {e}")))
            .ok()
    });

    let api = match r.string("PATHLING_API").as_deref() {
        None | Some("auto") => PathlingApiChoice::Auto,
        Some("7" | "v7") => PathlingApiChoice::V7,
        Some("9" | "v9") => PathlingApiChoice::V9,
        Some(other) => {
            r.bad("PATHLING_API", format!("{other:?} is not auto, 7 or 9"));
            PathlingApiChoice::Auto
        }
    };
    let import_mode = match r.string("IMPORT_MODE").map(|s| s.to_ascii_lowercase()) {
        None => ImportMode::Merge,
        Some(code) => ImportMode::from_code(&code).unwrap_or_else(|| {
            r.bad(
                "IMPORT_MODE",
                format!("{code:?} is not merge, overwrite, append, ignore or error"),
            );
            ImportMode::Merge
        }),
    };
    if api == PathlingApiChoice::V7 && !import_mode.supported_by_v7() {
        r.bad(
            "IMPORT_MODE",
            format!(
                "{} needs Pathling 9.2+ (PATHLING_API is 7)",
                import_mode.as_code()
            ),
        );
    }
    let apply_deletions = r.boolean("APPLY_DELETIONS", false);
    if apply_deletions && api == PathlingApiChoice::V7 {
        r.bad(
            "APPLY_DELETIONS",
            "Pathling 7.x cannot delete resources (PATHLING_API is 7)",
        );
    }

    let retry = RetrySpec {
        export: r.policy("EXPORT"),
        transfer: r.policy("TRANSFER"),
        import: r.policy("IMPORT"),
        retry_after_max_ms: r.integer("RETRY_AFTER_MAX", 1, 7 * 86_400).unwrap_or(3600) * 1000,
    };
    let concurrency = r.integer("TRANSFER_CONCURRENCY", 1, 32).unwrap_or(4) as u32;
    let memory_mib = r
        .integer(
            "TRANSFER_MEMORY",
            MIN_TRANSFER_MEMORY_MIB,
            MAX_TRANSFER_MEMORY_MIB,
        )
        .unwrap_or(DEFAULT_TRANSFER_MEMORY_MIB);
    let part_mib = match r.integer("TRANSFER_PART_SIZE", 5, 512) {
        Some(part_mib) => {
            if part_mib * 2 > memory_mib {
                let (memory_key, part_key) = (
                    r.raw.display_key("TRANSFER_MEMORY"),
                    r.raw.display_key("TRANSFER_PART_SIZE"),
                );
                r.bad(
                    "TRANSFER_MEMORY",
                    format!(
                        "{memory_mib} MiB cannot hold two parts of {part_key} {part_mib} MiB \
                         (one filling while one uploads); set {memory_key} to at least {} or \
                         lower {part_key}",
                        part_mib * 2
                    ),
                );
            }
            part_mib
        }
        None => effective_part_size_mib(memory_mib, concurrency),
    };
    let transfer = TransferSpec {
        concurrency,
        part_size: part_mib * 1024 * 1024,
        memory: Some(memory_mib * 1024 * 1024),
        connect_timeout_ms: r.integer("HTTP_CONNECT_TIMEOUT", 1, 600).unwrap_or(10) * 1000,
        read_timeout_ms: r.integer("HTTP_READ_TIMEOUT", 1, 3600).unwrap_or(60) * 1000,
        validate: match r
            .string("VALIDATE")
            .map(|s| s.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("sample") => Validation::Sample,
            Some("full") => Validation::Full,
            Some("off") => Validation::Off,
            Some(other) => {
                r.bad("VALIDATE", format!("{other:?} is not sample, full or off"));
                Validation::Sample
            }
        },
        manifest_max_bytes: r.integer("MANIFEST_MAX_SIZE", 1, 4096).unwrap_or(64) * 1024 * 1024,
    };
    let tls = TlsConfig {
        source_ca_file: r.string("SOURCE_CA_FILE"),
        target_ca_file: r.string("TARGET_CA_FILE"),
    };
    let (_, dsn) = r.secret("SENTRY_DSN");
    if let Some(problem) = dsn.as_ref().and_then(|d| dsn_problem(d.expose())) {
        r.bad("SENTRY_DSN", problem);
    }
    let sentry = SentryConfig {
        dsn,
        environment: r.string("SENTRY_ENVIRONMENT"),
        release: r.string("SENTRY_RELEASE"),
    };
    let mut extras = BTreeMap::new();
    for key in extra_keys {
        if let Some(v) = r.string(key) {
            extras.insert((*key).to_string(), v);
        }
    }

    match (source_endpoint, target_endpoint, staging) {
        (Some(source), Some(target), Some(staging)) if r.problems.is_empty() => Ok(Config {
            spec: RunSpec {
                source: SourceSpec {
                    endpoint: source,
                    auth: source_auth,
                },
                export,
                staging,
                target: TargetSpec {
                    endpoint: target,
                    auth: target_auth,
                    import_mode,
                    api,
                    apply_deletions,
                },
                retry,
                transfer,
            },
            secrets: Secrets {
                source_client_secret,
                source_private_key,
                target_client_secret,
                target_private_key,
            },
            tls,
            sentry,
            extras,
        }),
        _ => Err(ConfigError {
            problems: r.problems,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> RawConfig {
        RawConfig::from_env(
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            &[],
        )
    }

    const MINIMAL: &[(&str, &str)] = &[
        ("SOURCE_ENDPOINT", "https://fhir.example.org/fhir/"),
        ("SOURCE_CLIENT_ID", "id"),
        ("SOURCE_CLIENT_SECRET", "s3cr3t-value"),
        ("STAGING_URL", "s3://bucket/prefix"),
        ("TARGET_ENDPOINT", "https://pathling.example.org/fhir"),
        ("TARGET_AUTHENTICATION_ENABLED", "false"),
    ];

    #[test]
    fn minimal_environment_parses_with_seed_defaults() {
        let c = parse(&env(MINIMAL), &[]).unwrap();
        assert_eq!(c.spec.source.endpoint, "https://fhir.example.org/fhir");
        assert_eq!(c.spec.export.since, SinceSpec::None, "SINCE is optional");
        assert_eq!(c.spec.target.auth.scopes, "user/*.write");
        assert_eq!(c.spec.target.import_mode, ImportMode::Merge);
        assert_eq!(c.spec.retry.export.times, 24);
        assert_eq!(c.spec.retry.export.wait_ms, 900_000);
        assert_eq!(c.spec.retry.export.back_off, 1.0);
        assert!(!c.spec.target.auth.enabled);
    }

    #[test]
    fn secrets_never_reach_spec_or_debug() {
        let c = parse(&env(MINIMAL), &[]).unwrap();
        let spec_json = serde_json::to_string(&c.spec).unwrap();
        assert!(!spec_json.contains("s3cr3t-value"));
        assert!(!format!("{c:?}").contains("s3cr3t-value"));
        assert_eq!(
            c.secrets.source_client_secret.as_ref().map(Secret::expose),
            Some("s3cr3t-value")
        );
        assert_eq!(
            c.spec.source.auth.client_secret,
            Some(SecretRef::Config {
                key: "SOURCE_CLIENT_SECRET".into()
            })
        );
    }

    #[test]
    fn explicit_zero_is_honoured() {
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("EXPORT_RETRY_TIMES", "0"));
        pairs.push(("IMPORT_RETRY_WAIT", "0"));
        let c = parse(&env(&pairs), &[]).unwrap();
        assert_eq!(c.spec.retry.export.times, 0);
        assert_eq!(c.spec.retry.import.wait_ms, 0);
    }

    #[test]
    fn every_problem_is_reported_together_naming_keys() {
        let err = parse(
            &env(&[
                ("SOURCE_ENDPOINT", "not a url"),
                ("SINCE", "yesterday"),
                ("IMPORT_MODE", "replace"),
                ("EXPORT_RETRY_TIMES", "-1"),
                ("SOURCE_AUTHENTICATION_ENABLED", "nope"),
                ("STAGING_URL", "http://bucket"),
            ]),
            &[],
        )
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "SOURCE_ENDPOINT",
            "SINCE",
            "IMPORT_MODE",
            "EXPORT_RETRY_TIMES",
            "SOURCE_AUTHENTICATION_ENABLED",
            "STAGING_URL",
            "TARGET_ENDPOINT",
            "TARGET_CLIENT_ID",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn json_file_uses_camel_case_and_native_types() {
        let raw = RawConfig::from_json(
            r#"{"sourceEndpoint": "https://s/fhir", "sourceAuthenticationEnabled": false,
                "stagingUrl": "file:///tmp/x", "targetEndpoint": "https://t/fhir",
                "targetAuthenticationEnabled": "false", "exportRetryTimes": 3,
                "exportRetryBackOff": 1.5, "types": ["Patient", "Observation"], "since": "auto"}"#,
            &[],
        );
        let c = parse(&raw, &[]).unwrap();
        assert_eq!(c.spec.retry.export.times, 3);
        assert_eq!(c.spec.retry.export.back_off, 1.5);
        assert_eq!(c.spec.export.types, ["Patient", "Observation"]);
        assert_eq!(c.spec.export.since, SinceSpec::LastSuccess);
    }

    #[test]
    fn json_file_problems_use_file_key_names() {
        let raw = RawConfig::from_json(r#"{"sourceEndpont": "x", "importMode": "bad"}"#, &[]);
        let err = parse(&raw, &[]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("sourceEndpont: unknown key (did you mean sourceEndpoint?)"),
            "{text}"
        );
        assert!(text.contains("importMode:"), "{text}");
        assert!(text.contains("sourceEndpoint: required"), "{text}");
        let broken = parse(&RawConfig::from_json("{not json", &[]), &[]).unwrap_err();
        assert!(broken.to_string().contains("not valid JSON"));
    }

    #[test]
    fn v7_constraints_are_checked_up_front() {
        let mut pairs = MINIMAL.to_vec();
        pairs.extend([
            ("PATHLING_API", "7"),
            ("IMPORT_MODE", "append"),
            ("APPLY_DELETIONS", "true"),
        ]);
        let err = parse(&env(&pairs), &[]).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["IMPORT_MODE", "APPLY_DELETIONS"]);
    }

    #[test]
    fn export_levels_and_private_key_rules() {
        let mut pairs = MINIMAL.to_vec();
        pairs.retain(|(k, _)| *k != "SOURCE_CLIENT_SECRET");
        pairs.extend([
            ("EXPORT_LEVEL", "Group/abc-1"),
            ("PATIENTS", "Patient/1,Patient/2"),
            ("SOURCE_AUTH_METHOD", "private_key_jwt"),
            ("SOURCE_PRIVATE_KEY", "-----BEGIN PRIVATE KEY-----"),
        ]);
        // The key and its kid are the authenticator's to judge, after parsing the key: a
        // broken key must be reported as such, not as a missing SOURCE_KEY_ID.
        let c = parse(&env(&pairs), &[]).unwrap();
        assert_eq!(c.spec.export.level, ExportLevel::Group("abc-1".into()));
        assert_eq!(c.spec.export.patients.len(), 2);
        assert_eq!(c.spec.source.auth.key_id, None);
        assert!(c.secrets.source_private_key.is_some());
    }

    #[test]
    fn insecure_auth_is_off_unless_asked_for() {
        let c = parse(&env(MINIMAL), &[]).unwrap();
        assert!(!c.spec.source.auth.allow_insecure);
        assert!(!c.spec.target.auth.allow_insecure);
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("TARGET_ALLOW_INSECURE_AUTH", "true"));
        let c = parse(&env(&pairs), &[]).unwrap();
        assert!(!c.spec.source.auth.allow_insecure);
        assert!(c.spec.target.auth.allow_insecure);
        pairs.push(("SOURCE_ALLOW_INSECURE_AUTH", "maybe"));
        let err = parse(&env(&pairs), &[]).unwrap_err();
        assert_eq!(err.problems[0].key, "SOURCE_ALLOW_INSECURE_AUTH");
    }

    #[test]
    fn aws_secret_references_are_kept_as_references() {
        let mut pairs = MINIMAL.to_vec();
        pairs.retain(|(k, _)| *k != "SOURCE_CLIENT_SECRET");
        pairs.push((
            "SOURCE_CLIENT_SECRET",
            "secretsmanager:arn:aws:secretsmanager:x",
        ));
        let c = parse(&env(&pairs), &[]).unwrap();
        assert!(c.secrets.source_client_secret.is_none());
        assert_eq!(
            c.spec.source.auth.client_secret,
            Some(SecretRef::SecretsManager {
                id: "arn:aws:secretsmanager:x".into()
            })
        );
    }

    #[test]
    fn credentials_in_urls_are_refused_without_echo() {
        let mut pairs = MINIMAL.to_vec();
        pairs.retain(|(k, _)| !matches!(*k, "SOURCE_ENDPOINT" | "STAGING_URL"));
        pairs.push((
            "SOURCE_ENDPOINT",
            "https://alice:pa55-w0rd@fhir.example.org/fhir",
        ));
        pairs.push(("STAGING_URL", "s3://key:s3-pa55@bucket/prefix"));
        let err = parse(&env(&pairs), &[]).unwrap_err();
        let text = err.to_string();
        assert!(!text.contains("pa55"), "{text}");
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["SOURCE_ENDPOINT", "STAGING_URL"], "{text}");
        assert!(text.contains("SOURCE_CLIENT_SECRET"), "{text}");
    }

    #[test]
    fn a_malformed_sentry_dsn_is_a_configuration_problem() {
        for bad in [
            "not a dsn",
            "https://sentry.example/42",
            "ftp://k@s.example/1",
            "https://k@s.example/",
        ] {
            let mut pairs = MINIMAL.to_vec();
            pairs.push(("SENTRY_DSN", bad));
            let err = parse(&env(&pairs), &[]).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{bad}: {err}");
            assert_eq!(err.problems[0].key, "SENTRY_DSN");
            assert!(!err.to_string().contains(bad), "the DSN is a secret: {err}");
        }
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("SENTRY_DSN", "https://abc123@o1.ingest.sentry.io/4506"));
        assert!(parse(&env(&pairs), &[]).is_ok());
    }

    #[test]
    fn type_filters_accept_the_raw_and_the_url_encoded_form() {
        let mut pairs = MINIMAL.to_vec();
        pairs.push((
            "TYPE_FILTERS",
            "MedicationRequest%3Fstatus%3Dactive Observation?code=http%3A%2F%2Floinc.org%7C1234 Condition%3fcode%3Dhttp%253A%252F%252Fsnomed.info%252Fsct%257C1",
        ));
        let c = parse(&env(&pairs), &[]).unwrap();
        assert_eq!(
            c.spec.export.type_filters,
            [
                "MedicationRequest?status=active",
                "Observation?code=http%3A%2F%2Floinc.org%7C1234",
                "Condition?code=http%3A%2F%2Fsnomed.info%2Fsct%7C1",
            ]
        );
    }

    #[test]
    fn validate_defaults_to_sample_and_accepts_full_and_off() {
        let c = parse(&env(MINIMAL), &[]).unwrap();
        assert_eq!(c.spec.transfer.validate, Validation::Sample);
        for (given, want) in [
            ("full", Validation::Full),
            ("OFF", Validation::Off),
            ("sample", Validation::Sample),
        ] {
            let mut pairs = MINIMAL.to_vec();
            pairs.push(("VALIDATE", given));
            assert_eq!(
                parse(&env(&pairs), &[]).unwrap().spec.transfer.validate,
                want
            );
        }
        let raw = RawConfig::from_json(
            r#"{"sourceEndpoint": "https://s/fhir", "sourceAuthenticationEnabled": false,
                "stagingUrl": "file:///tmp/x", "targetEndpoint": "https://t/fhir",
                "targetAuthenticationEnabled": false, "validate": "strict"}"#,
            &[],
        );
        let err = parse(&raw, &[]).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "validate");
        assert!(
            err.problems[0].message.contains("sample, full or off"),
            "{err}"
        );
    }

    #[test]
    fn transfer_memory_derives_the_part_size_unless_one_is_set() {
        const MIB: u64 = 1024 * 1024;
        let transfer = |extra: &[(&'static str, &'static str)]| {
            let mut pairs = MINIMAL.to_vec();
            pairs.extend_from_slice(extra);
            let t = parse(&env(&pairs), &[]).unwrap().spec.transfer;
            (
                t.part_size / MIB,
                t.memory.map(|m| m / MIB),
                t.memory_budget() / MIB,
            )
        };
        // 32 MiB for 4 transfers cannot give each two 8 MiB parts: S3's minimum, 5 MiB.
        assert_eq!(transfer(&[]), (5, Some(32), 32));
        assert_eq!(
            transfer(&[("TRANSFER_MEMORY", "1024")]),
            (8, Some(1024), 1024)
        );
        assert_eq!(transfer(&[("TRANSFER_MEMORY", "48")]), (6, Some(48), 48));
        assert_eq!(
            transfer(&[("TRANSFER_MEMORY", "48"), ("TRANSFER_CONCURRENCY", "1")]),
            (8, Some(48), 48)
        );
        assert_eq!(
            transfer(&[("TRANSFER_MEMORY", "10"), ("TRANSFER_CONCURRENCY", "32")]),
            (5, Some(10), 10)
        );
        // A part size that is set is kept (it bounds the largest file); two must fit.
        assert_eq!(
            transfer(&[("TRANSFER_PART_SIZE", "16")]),
            (16, Some(32), 32)
        );
        assert_eq!(
            transfer(&[("TRANSFER_PART_SIZE", "512"), ("TRANSFER_MEMORY", "1024")]),
            (512, Some(1024), 1024)
        );
    }

    #[test]
    fn transfer_memory_is_bounded_and_must_hold_two_parts() {
        for bad in ["9", "16385", "-1", "12.5", "lots"] {
            let mut pairs = MINIMAL.to_vec();
            pairs.push(("TRANSFER_MEMORY", bad));
            let err = parse(&env(&pairs), &[]).unwrap_err();
            let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
            assert_eq!(keys, ["TRANSFER_MEMORY"], "{bad}: {err}");
        }
        let mut pairs = MINIMAL.to_vec();
        pairs.extend([("TRANSFER_PART_SIZE", "20"), ("TRANSFER_MEMORY", "32")]);
        let err = parse(&env(&pairs), &[]).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "TRANSFER_MEMORY");
        assert_eq!(
            err.problems[0].message,
            "32 MiB cannot hold two parts of TRANSFER_PART_SIZE 20 MiB (one filling while one \
             uploads); set TRANSFER_MEMORY to at least 40 or lower TRANSFER_PART_SIZE"
        );
        // A configuration file names both keys as it spells them.
        let raw = RawConfig::from_json(
            r#"{"sourceEndpoint": "https://s/fhir", "sourceAuthenticationEnabled": false,
                "stagingUrl": "file:///tmp/x", "targetEndpoint": "https://t/fhir",
                "targetAuthenticationEnabled": false, "transferPartSize": 64,
                "transferMemory": 100}"#,
            &[],
        );
        let err = parse(&raw, &[]).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "transferMemory");
        assert!(
            err.problems[0]
                .message
                .contains("two parts of transferPartSize 64 MiB")
                && err.problems[0]
                    .message
                    .contains("set transferMemory to at least 128"),
            "{err}"
        );
        // Exactly two parts is enough.
        let mut pairs = MINIMAL.to_vec();
        pairs.extend([("TRANSFER_PART_SIZE", "16"), ("TRANSFER_MEMORY", "32")]);
        assert!(parse(&env(&pairs), &[]).is_ok());
    }

    #[test]
    fn runs_recorded_before_transfer_memory_keep_two_parts_per_transfer() {
        let mut c = parse(&env(MINIMAL), &[]).unwrap();
        c.spec.transfer.memory = None;
        c.spec.transfer.part_size = 8 * 1024 * 1024;
        let json = serde_json::to_value(&c.spec.transfer).unwrap();
        assert!(json.get("memory").is_none(), "absent stays absent: {json}");
        assert_eq!(c.spec.transfer.memory_budget(), 64 * 1024 * 1024);
    }

    #[test]
    fn camel_case_matches_the_original() {
        assert_eq!(camel_case("EXPORT_RETRY_BACK_OFF"), "exportRetryBackOff");
        assert_eq!(camel_case("STAGING_URL"), "stagingUrl");
    }
}
