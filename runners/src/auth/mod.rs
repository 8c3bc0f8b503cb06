//! SMART Backend Services client authentication: discovery, the client credentials grant and a
//! cached bearer token (`docs/protocols.md`, §1 "SMART Backend Services").
//!
//! Contract
//! - [`Authenticator::new`] validates and parses every credential before any network call, and
//!   [`check_credentials`] does the same for both sides of a run, returning every problem so a
//!   runner can list them with the configuration's own. The private key may be a JWK (with
//!   `kid` and `alg`; an RSA JWK must carry its CRT members), a JWKS (the key is chosen by
//!   `key_id`, or is its only private key), or a PEM: PKCS#8 (RSA or EC P-384), PKCS#1 RSA or
//!   SEC1 EC P-384, plus `key_id`. RSA keys have 2048 to 8192 bits. The key is parsed before
//!   its kid is looked for, so a broken key is reported as such whether or not a kid is set.
//!   The algorithm is `signing_algorithm`, else the JWK's `alg`, else the key type's (RSA →
//!   RS384, EC P-384 → ES384); any disagreement is an error. Errors ([`AuthSetupError`]) name
//!   the configuration key and never echo a secret.
//! - Signing uses aws-lc-rs (constant-time, blinded RSA; the `rsa` crate is open to the Marvin
//!   timing attack, RUSTSEC-2023-0071). ES384 signatures are in JWS's fixed-size r‖s form.
//! - The authenticator builds its own HTTP client from the caller's `reqwest::ClientBuilder`
//!   (timeouts, user agent, trusted roots) with redirects turned off: a token request
//!   followed through a 307/308 would re-send the secret or assertion to wherever the
//!   `Location` points. A 3xx answer to discovery or a token request is a permanent failure
//!   naming only the status and the target's origin.
//! - Discovery is `GET {base}/.well-known/smart-configuration`; `token_endpoint` must be an
//!   absolute http(s) URL, and https unless both the base and the endpoint are on a loopback
//!   address with an http base (a test machine) or `allow_insecure` is set (an https base that
//!   names an http endpoint is refused as a downgrade). Refusal is a permanent
//!   [`FailureKind::Local`] failure naming `*_ALLOW_INSECURE_AUTH`, before any token request.
//!   The document is cached, and dropped after a failed token request so that a retry picks
//!   up a moved endpoint or a changed list of methods.
//! - The method is the spec's `method` when set. Otherwise it is chosen from the server's
//!   `token_endpoint_auth_methods_supported`: `private_key_jwt` when a key is configured and the
//!   server lists it (or lists nothing and no secret is configured); else, with a secret,
//!   `client_secret_basic` when listed or when the list is absent (the original tool's
//!   default), else `client_secret_post` when listed. Anything else is a permanent
//!   [`FailureKind::Local`] failure saying what the server offers and what is configured.
//! - The grant is `POST token_endpoint` with `grant_type=client_credentials&scope=…`, plus
//!   Basic credentials (RFC 6749 §2.3.1: both halves form-url-encoded before base64), or
//!   `client_id`/`client_secret` in the body, or a signed client assertion (header `alg`,
//!   `kid`, `typ: JWT`; claims `iss` = `sub` = client id, `aud` = the token endpoint exactly,
//!   `iat`, `exp` = `iat` + 4 min, a random `jti`).
//! - [`Authenticator::token`] returns `None` when auth is disabled. A token is reused until less
//!   than `min(30 s, 20 % of its lifetime)` remains; `expires_in` defaults to 300 s. Callers
//!   that arrive while a token is being fetched wait for that fetch instead of starting their
//!   own. If an early refresh fails while the old token has not expired, the old token is
//!   returned (and the refresh is tried again on the next call). [`Authenticator::invalidate`]
//!   forgets a token the server refused (only if it is still the cached one, so a late 401
//!   for an old token does not discard a fresh one).
//! - Failures are [`Failure`] facts: HTTP statuses (RFC 6749 `error` and `error_description`
//!   in the message, prefixed `source token endpoint:` or `target token endpoint:`, with
//!   `Retry-After` kept), network and timeout kinds from the transport, `Undecodable` for an
//!   answer that is not the expected JSON. No secret, assertion or token ever appears in a
//!   message or a `Debug` output; server text is scrubbed of them before it is quoted.
//! - Time is passed in (`now_unix_ms`) for expiry decisions and assertion times, so tests can
//!   move the clock.
//!
//! Layout: [`discovery`] (the document and the token endpoint rule), [`token`] (the grant,
//! method choice, answers, scrubbing), [`keys`] (key formats), [`jws`] (assertions), [`der`]
//! (the little ASN.1 the key formats need).

mod der;
mod discovery;
mod jws;
mod keys;
mod token;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use pathling_import_core::config::{Secret, Secrets};
use pathling_import_core::retry::{Failure, FailureKind};
use pathling_import_core::spec::{AuthMethod, AuthSpec, RunSpec, SecretRef};
use reqwest::header::{HeaderValue, LOCATION, RETRY_AFTER};
use tokio::sync::Mutex;

use discovery::Discovery;
use keys::SigningKey;

/// The assertion type SMART Backend Services requires for `private_key_jwt`.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// `expires_in` when the server leaves it out (SMART's typical and maximum lifetime).
pub const DEFAULT_EXPIRES_IN_SECS: u64 = 300;

/// Refresh when less than this remains (capped at a fifth of the lifetime, so a short-lived
/// token is still reused for most of its life instead of being fetched for every request).
const REFRESH_MARGIN_MS: u64 = 30_000;

/// Discovery and token requests are small; a server that takes longer is stuck, and waiting on
/// it forever would also block every caller queued behind the token lock.
const AUTH_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Discovery documents and token answers are a few hundred bytes; refuse to buffer a runaway
/// body.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Longest piece of server text quoted in a failure message.
const MAX_QUOTED_CHARS: usize = 500;

/// Which server an authenticator talks to; used in messages and configuration key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The Bulk Data source.
    Source,
    /// The Pathling target.
    Target,
}

impl Side {
    fn word(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Target => "target",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Side::Source => "SOURCE",
            Side::Target => "TARGET",
        }
    }
}

/// A credential or setting that cannot work, found before any network call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct AuthSetupError {
    /// The configuration key at fault (`SOURCE_PRIVATE_KEY`, or `sourcePrivateKey` when the
    /// configuration came from a JSON file); `source HTTP client` when the caller's client
    /// settings cannot be built.
    pub key: String,
    /// What is wrong with it. Never contains the value.
    pub message: String,
}

impl AuthSetupError {
    fn new(key: &str, message: impl Into<String>) -> Self {
        AuthSetupError {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

impl From<AuthSetupError> for Failure {
    fn from(e: AuthSetupError) -> Self {
        Failure::new(FailureKind::Local, e.to_string())
    }
}

/// Every problem with the authentication settings of both sides of `spec`, without any
/// network call. Secrets held in AWS (Secrets Manager, SSM) that `secrets` does not carry yet
/// count as present; their values are checked when the runner has resolved them and builds
/// the [`Authenticator`].
pub fn check_credentials(spec: &RunSpec, secrets: &Secrets) -> Vec<AuthSetupError> {
    let sides = [
        (
            &spec.source.endpoint,
            &spec.source.auth,
            &secrets.source_client_secret,
            &secrets.source_private_key,
            Side::Source,
        ),
        (
            &spec.target.endpoint,
            &spec.target.auth,
            &secrets.target_client_secret,
            &secrets.target_private_key,
            Side::Target,
        ),
    ];
    let mut problems = Vec::new();
    for (base_url, auth, secret, key, side) in sides {
        let base_url = base_url.trim_end_matches('/');
        if let Err(p) = validate(
            base_url,
            auth,
            secret.clone(),
            key.clone(),
            side,
            Unresolved::AwsPending,
        ) {
            problems.extend(p);
        }
    }
    problems
}

/// An access token and when it stops being usable. `Debug` never shows the token.
#[derive(Clone)]
pub struct BearerToken(Arc<TokenInner>);

struct TokenInner {
    value: String,
    header: HeaderValue,
    obtained_at_ms: u64,
    expires_at_ms: u64,
    scope: Option<String>,
}

impl BearerToken {
    fn new(
        value: String,
        obtained_at_ms: u64,
        expires_in_secs: u64,
        scope: Option<String>,
    ) -> Option<Self> {
        let mut header = HeaderValue::from_str(&format!("Bearer {value}")).ok()?;
        crate::redact::token(&value);
        // Keeps the token out of HTTP-level debug logging (hyper/h2 honour the flag).
        header.set_sensitive(true);
        Some(BearerToken(Arc::new(TokenInner {
            value,
            header,
            obtained_at_ms,
            expires_at_ms: obtained_at_ms.saturating_add(expires_in_secs.saturating_mul(1000)),
            scope,
        })))
    }

    /// `Bearer <token>`, the value of an `Authorization` header.
    pub fn header_value(&self) -> String {
        format!("Bearer {}", self.0.value)
    }

    /// The `Authorization` header value, marked sensitive.
    pub fn header(&self) -> HeaderValue {
        self.0.header.clone()
    }

    /// When the server said the token expires (Unix milliseconds, measured from the request).
    pub fn expires_at_unix_ms(&self) -> u64 {
        self.0.expires_at_ms
    }

    /// The `scope` the server granted, when it said (it may differ from the request).
    pub fn granted_scope(&self) -> Option<&str> {
        self.0.scope.as_deref()
    }

    /// Whether the token should be replaced before use at `now_ms`.
    fn needs_refresh(&self, now_ms: u64) -> bool {
        let lifetime = self.0.expires_at_ms.saturating_sub(self.0.obtained_at_ms);
        let margin = REFRESH_MARGIN_MS.min(lifetime / 5);
        now_ms.saturating_add(margin) >= self.0.expires_at_ms
    }
}

impl PartialEq for BearerToken {
    fn eq(&self, other: &Self) -> bool {
        self.0.value == other.0.value
    }
}

impl Eq for BearerToken {}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerToken")
            .field("value", &"***")
            .field("expires_at_unix_ms", &self.0.expires_at_ms)
            .field("scope", &self.0.scope)
            .finish()
    }
}

/// Obtains and caches SMART Backend Services access tokens for one server.
pub struct Authenticator {
    side: Side,
    base_url: String,
    /// `None` when authentication is disabled.
    enabled: Option<Enabled>,
    cache: Mutex<Cache>,
}

/// What an enabled authenticator holds.
struct Enabled {
    /// Built here from the caller's builder, with redirects off.
    http: reqwest::Client,
    credentials: Credentials,
}

/// The validated credentials and settings of an enabled authenticator.
struct Credentials {
    id: String,
    scopes: String,
    method: Option<AuthMethod>,
    secret: Option<Secret>,
    key: Option<SigningKey>,
    allow_insecure: bool,
    /// `SOURCE_ALLOW_INSECURE_AUTH` (or its camelCase), for the refusal message.
    allow_insecure_key: String,
}

#[derive(Default)]
struct Cache {
    discovery: Option<Discovery>,
    token: Option<BearerToken>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Authenticator");
        d.field("side", &self.side)
            .field("base_url", &self.base_url);
        match &self.enabled {
            None => d.field("enabled", &false),
            Some(Enabled { credentials: c, .. }) => d
                .field("client_id", &c.id)
                .field("scopes", &c.scopes)
                .field("method", &c.method)
                .field("client_secret", &c.secret.as_ref().map(|_| "***"))
                .field("private_key", &c.key)
                .field("allow_insecure", &c.allow_insecure),
        };
        d.finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Validates the spec and parses the credentials; no network call is made.
    ///
    /// `http` carries the caller's client settings (timeouts, user agent, trusted roots); the
    /// authenticator builds its own client from it with redirects turned off, whatever the
    /// builder said. `client_secret` and `private_key` are the resolved values of the spec's
    /// references. The first problem found is returned; [`check_credentials`] lists them all.
    pub fn new(
        http: reqwest::ClientBuilder,
        base_url: &str,
        spec: &AuthSpec,
        client_secret: Option<Secret>,
        private_key: Option<Secret>,
        side: Side,
    ) -> Result<Self, AuthSetupError> {
        let base_url = base_url.trim_end_matches('/').to_string();
        // Whatever a server echoes of these is masked on its way out (crate::redact).
        for value in [&client_secret, &private_key].into_iter().flatten() {
            crate::redact::secret(value.expose());
        }
        let credentials = validate(
            &base_url,
            spec,
            client_secret,
            private_key,
            side,
            Unresolved::Error,
        )
        .map_err(|problems| {
            problems.into_iter().next().unwrap_or_else(|| {
                AuthSetupError::new(&format!("{} authentication", side.word()), "is invalid")
            })
        })?;
        let enabled = match credentials {
            None => None,
            Some(credentials) => {
                let http = http
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|e| {
                        AuthSetupError::new(
                            &format!("{} HTTP client", side.word()),
                            format!("cannot be built: {}", crate::error_chain(&e)),
                        )
                    })?;
                Some(Enabled { http, credentials })
            }
        };
        Ok(Authenticator {
            side,
            base_url,
            enabled,
            cache: Mutex::new(Cache::default()),
        })
    }

    /// Whether requests need a token at all.
    pub fn enabled(&self) -> bool {
        self.enabled.is_some()
    }

    /// A usable access token, or `None` when authentication is disabled.
    ///
    /// The lock is held across the fetch on purpose: concurrent callers then share one token
    /// request rather than each authenticating (servers rate-limit token endpoints, and every
    /// `private_key_jwt` request burns a `jti`).
    pub async fn token(&self, now_unix_ms: u64) -> Result<Option<BearerToken>, Failure> {
        let Some(enabled) = &self.enabled else {
            return Ok(None);
        };
        let mut cache = self.cache.lock().await;
        if let Some(token) = &cache.token {
            if !token.needs_refresh(now_unix_ms) {
                return Ok(Some(token.clone()));
            }
        }
        match self.fetch(enabled, &mut cache, now_unix_ms).await {
            Ok(token) => {
                cache.token = Some(token.clone());
                Ok(Some(token))
            }
            Err(e) => {
                // The endpoint may have moved or the server's methods changed: rediscover on
                // the next attempt rather than repeat a request that cannot work.
                cache.discovery = None;
                // An early refresh that failed is no reason to stop using a token the server
                // still honours; the next call tries again.
                match cache.token.take() {
                    Some(old) if now_unix_ms < old.expires_at_unix_ms() => {
                        cache.token = Some(old.clone());
                        Ok(Some(old))
                    }
                    _ => Err(e),
                }
            }
        }
    }

    async fn fetch(
        &self,
        enabled: &Enabled,
        cache: &mut Cache,
        now_ms: u64,
    ) -> Result<BearerToken, Failure> {
        let c = &enabled.credentials;
        let discovery = match &cache.discovery {
            Some(d) => d.clone(),
            None => {
                let d = discovery::discover(
                    &enabled.http,
                    &self.base_url,
                    self.side,
                    c.allow_insecure,
                    &c.allow_insecure_key,
                )
                .await?;
                cache.discovery = Some(d.clone());
                d
            }
        };
        token::request_token(&enabled.http, self.side, c, &discovery, now_ms).await
    }

    /// Forgets `token` after a protected resource refused it (401), so the next
    /// [`Self::token`] authenticates again. A token other than the cached one is ignored.
    pub async fn invalidate(&self, token: &BearerToken) {
        let mut cache = self.cache.lock().await;
        if cache.token.as_ref() == Some(token) {
            cache.token = None;
        }
    }
}

/// What to make of a secret reference whose value was not handed over.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unresolved {
    /// Building an authenticator: the runner should have resolved it.
    Error,
    /// Checking a configuration: values in AWS are fetched later, so they count as present.
    AwsPending,
}

/// Every problem with one side's settings, or its credentials (`None` when disabled).
fn validate(
    base_url: &str,
    spec: &AuthSpec,
    client_secret: Option<Secret>,
    private_key: Option<Secret>,
    side: Side,
    unresolved: Unresolved,
) -> Result<Option<Credentials>, Vec<AuthSetupError>> {
    if !spec.enabled {
        return Ok(None);
    }
    let names = KeyNames::new(side, spec);
    let mut problems = Vec::new();
    if !discovery::is_http_url(base_url) {
        problems.push(AuthSetupError::new(
            &names.plain("ENDPOINT"),
            "is not an absolute http(s) URL",
        ));
    }
    let id = spec
        .client_id
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty());
    if id.is_none() {
        problems.push(AuthSetupError::new(
            &names.plain("CLIENT_ID"),
            "required when authentication is enabled",
        ));
    }
    let pending = |reference: &Option<SecretRef>| {
        unresolved == Unresolved::AwsPending
            && matches!(
                reference,
                Some(SecretRef::SecretsManager { .. } | SecretRef::Ssm { .. })
            )
    };
    let unresolved_problem =
        |key: &str| AuthSetupError::new(key, "is configured but its value was not resolved");

    // Each credential is present (usable), pending (in AWS, not fetched yet), or already
    // reported as a problem; only the first two satisfy a method.
    let mut secret_reported = false;
    let secret_pending = client_secret.is_none() && pending(&spec.client_secret);
    let secret = match client_secret {
        Some(s) if s.expose().is_empty() => {
            problems.push(AuthSetupError::new(&names.client_secret, "is empty"));
            secret_reported = true;
            None
        }
        Some(s) => Some(s),
        None if spec.client_secret.is_some() && !secret_pending => {
            problems.push(unresolved_problem(&names.client_secret));
            secret_reported = true;
            None
        }
        None => None,
    };
    let mut key_reported = false;
    let key_pending = private_key.is_none() && pending(&spec.private_key);
    let key = match private_key {
        Some(k) => match keys::parse_private_key(
            k.expose(),
            spec.key_id.as_deref(),
            spec.signing_algorithm,
            &names,
        ) {
            Ok(key) => Some(key),
            Err(e) => {
                problems.push(e);
                key_reported = true;
                None
            }
        },
        None if spec.private_key.is_some() && !key_pending => {
            problems.push(unresolved_problem(&names.private_key));
            key_reported = true;
            None
        }
        None => None,
    };
    let has_secret = secret.is_some() || secret_pending;
    let has_key = key.is_some() || key_pending;
    match spec.method {
        Some(m @ (AuthMethod::ClientSecretBasic | AuthMethod::ClientSecretPost))
            if !has_secret && !secret_reported =>
        {
            problems.push(AuthSetupError::new(
                &names.client_secret,
                format!("required by {}", m.as_str()),
            ));
        }
        Some(AuthMethod::PrivateKeyJwt) if !has_key && !key_reported => {
            problems.push(AuthSetupError::new(
                &names.private_key,
                "required by private_key_jwt",
            ));
        }
        None if !has_secret && !has_key && !secret_reported && !key_reported => {
            problems.push(AuthSetupError::new(
                &names.client_secret,
                format!(
                    "a client secret or {} is required when authentication is enabled",
                    names.private_key
                ),
            ));
        }
        _ => {}
    }
    match id {
        Some(id) if problems.is_empty() => Ok(Some(Credentials {
            id: id.to_string(),
            scopes: spec.scopes.trim().to_string(),
            method: spec.method,
            secret,
            key,
            allow_insecure: spec.allow_insecure,
            allow_insecure_key: names.plain("ALLOW_INSECURE_AUTH"),
        })),
        _ => Err(problems),
    }
}

/// Configuration key names for messages, in the style the configuration used.
struct KeyNames {
    side: Side,
    camel: bool,
    client_secret: String,
    private_key: String,
}

impl KeyNames {
    fn new(side: Side, spec: &AuthSpec) -> Self {
        // A JSON configuration file spells keys in lowerCamelCase; the spec only reveals that
        // through the key a config-held secret came from.
        let camel = [&spec.client_secret, &spec.private_key]
            .into_iter()
            .flatten()
            .any(|r| {
                matches!(r, SecretRef::Config { key }
                    if key.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
            });
        let mut names = KeyNames {
            side,
            camel,
            client_secret: String::new(),
            private_key: String::new(),
        };
        names.client_secret = names.secret(spec.client_secret.as_ref(), "CLIENT_SECRET");
        names.private_key = names.secret(spec.private_key.as_ref(), "PRIVATE_KEY");
        names
    }

    fn plain(&self, name: &str) -> String {
        let constant = format!("{}_{name}", self.side.prefix());
        if self.camel {
            pathling_import_core::config::camel_case(&constant)
        } else {
            constant
        }
    }

    fn secret(&self, reference: Option<&SecretRef>, name: &str) -> String {
        let plain = self.plain(name);
        match reference {
            Some(SecretRef::Config { key }) => key.clone(),
            Some(SecretRef::SecretsManager { id }) => {
                format!("{plain} (Secrets Manager secret {id})")
            }
            Some(SecretRef::Ssm { name }) => format!("{plain} (SSM parameter {name})"),
            None => plain,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transport shared by discovery and the token request
// ---------------------------------------------------------------------------------------------

/// Sends a request and reads its whole answer: status, `Retry-After` and body. A redirect is
/// refused here (`purpose` completes "redirects are never followed for …").
///
/// The deadline wraps the client's own timeouts rather than replacing them (a per-request
/// reqwest timeout would override a shorter one the caller configured).
async fn exchange(
    request: reqwest::RequestBuilder,
    what: &str,
    purpose: &str,
) -> Result<(reqwest::StatusCode, Option<String>, Vec<u8>), Failure> {
    let attempt = async {
        let response = request
            .send()
            .await
            .map_err(|e| crate::http::transport_failure(what, e))?;
        let status = response.status();
        if status.is_redirection() {
            // Only the origin: a Location's path or query may carry anything.
            let target = header_string(&response, LOCATION)
                .and_then(|l| response.url().join(&l).ok())
                .and_then(|u| origin(&u))
                .unwrap_or_else(|| "(no usable Location)".into());
            return Err(Failure::http(
                status.as_u16(),
                format!(
                    "{what}: answered {} redirect to {target}; redirects are never followed for \
                     {purpose}",
                    status.as_u16()
                ),
            ));
        }
        let retry_after = header_string(&response, RETRY_AFTER);
        let body = read_body(response, what).await?;
        Ok((status, retry_after, body))
    };
    tokio::time::timeout(AUTH_REQUEST_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(Failure::new(
                FailureKind::Timeout,
                format!(
                    "{what}: no complete answer within {} s",
                    AUTH_REQUEST_TIMEOUT.as_secs()
                ),
            ))
        })
}

/// `scheme://host:port`, the port always written.
fn origin(url: &url::Url) -> Option<String> {
    let host = url.host_str()?;
    let port = url.port_or_known_default()?;
    Some(format!("{}://{host}:{port}", url.scheme()))
}

fn header_string(
    response: &reqwest::Response,
    name: reqwest::header::HeaderName,
) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn read_body(mut response: reqwest::Response, what: &str) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| crate::http::transport_failure(what, e))?
    {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(Failure::new(
                FailureKind::Undecodable,
                format!("{what}: the answer is larger than {MAX_ANSWER_BYTES} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Text for a message: control characters flattened, length capped.
fn clip(text: &str) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > MAX_QUOTED_CHARS {
        let cut: String = flat.chars().take(MAX_QUOTED_CHARS).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

/// Position only: serde_json's syntax messages carry no input today, but a key's text must
/// never reach a message even if that changes.
fn json_position(e: &serde_json::Error) -> String {
    format!("syntax error at line {} column {}", e.line(), e.column())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pathling_import_core::spec::SigningAlgorithm;

    fn builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder()
    }

    /// Callers spawn token requests onto a multi-threaded runtime.
    #[test]
    fn futures_are_send_and_the_authenticator_is_shareable() {
        fn send<T: Send>(_: &T) {}
        fn sync<T: Send + Sync>() {}
        sync::<Authenticator>();
        sync::<BearerToken>();
        let a = Authenticator::new(
            builder(),
            "https://fhir.example.org",
            &AuthSpec::disabled(),
            None,
            None,
            Side::Source,
        )
        .unwrap();
        send(&a.token(0));
        let t = BearerToken::new("t".into(), 0, 300, None).unwrap();
        send(&a.invalidate(&t));
    }

    #[test]
    fn refresh_margin_is_thirty_seconds_or_a_fifth() {
        let long = BearerToken::new("t".into(), 0, 300, None).unwrap();
        assert!(!long.needs_refresh(269_000));
        assert!(long.needs_refresh(270_000));
        let short = BearerToken::new("t".into(), 0, 10, None).unwrap();
        assert!(!short.needs_refresh(7_999));
        assert!(short.needs_refresh(8_000));
    }

    #[test]
    fn redirect_targets_are_reduced_to_their_origin() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        assert_eq!(
            origin(&u("https://other.example/steal?secret=x")).as_deref(),
            Some("https://other.example:443")
        );
        assert_eq!(
            origin(&u("http://[::1]:8080/a")).as_deref(),
            Some("http://[::1]:8080")
        );
        assert_eq!(origin(&u("data:text/plain,x")), None);
    }

    fn key_spec(key: &str) -> AuthSpec {
        AuthSpec {
            enabled: true,
            client_id: Some("c".into()),
            scopes: "system/*.read".into(),
            private_key: Some(SecretRef::Config { key: key.into() }),
            ..AuthSpec::disabled()
        }
    }

    #[test]
    fn non_key_text_is_refused_without_echo() {
        let spec = AuthSpec {
            key_id: Some("k".into()),
            ..key_spec("SOURCE_PRIVATE_KEY")
        };
        for text in [
            "hunter2-not-a-key",
            "{\"kty\":\"RSA\",\"d\":\"hunter2\"}",
            "-----BEGIN PRIVATE KEY-----\nhunter2\n-----END PRIVATE KEY-----",
        ] {
            let err = Authenticator::new(
                builder(),
                "https://fhir.example.org/fhir",
                &spec,
                None,
                Some(Secret::new(text)),
                Side::Source,
            )
            .unwrap_err();
            assert_eq!(err.key, "SOURCE_PRIVATE_KEY");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn a_broken_pem_without_key_id_is_reported_as_a_broken_key() {
        let err = Authenticator::new(
            builder(),
            "https://fhir.example.org/fhir",
            &key_spec("SOURCE_PRIVATE_KEY"),
            None,
            Some(Secret::new(
                "-----BEGIN PRIVATE KEY-----\nZmFrZS1rZXktbWF0ZXJpYWw=\n-----END PRIVATE KEY-----",
            )),
            Side::Source,
        )
        .unwrap_err();
        assert_eq!(err.key, "SOURCE_PRIVATE_KEY", "{err}");
        assert!(err.message.contains("not a valid PKCS#8"), "{err}");
    }

    fn run_spec(source: AuthSpec, target: AuthSpec) -> RunSpec {
        let raw = pathling_import_core::config::RawConfig::from_env(
            [
                ("SOURCE_ENDPOINT", "https://fhir.example.org/fhir"),
                ("TARGET_ENDPOINT", "https://pathling.example.org/fhir"),
                ("STAGING_URL", "file:///tmp/staging/"),
                ("SOURCE_AUTHENTICATION_ENABLED", "false"),
                ("TARGET_AUTHENTICATION_ENABLED", "false"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
            &[],
        );
        let mut spec = pathling_import_core::config::parse(&raw, &[]).unwrap().spec;
        spec.source.auth = source;
        spec.target.auth = target;
        spec
    }

    #[test]
    fn check_credentials_lists_every_problem_of_both_sides() {
        let broken_key = "-----BEGIN PRIVATE KEY-----\nZmFrZQ==\n-----END PRIVATE KEY-----";
        let source = AuthSpec {
            client_id: None,
            signing_algorithm: Some(SigningAlgorithm::ES384),
            ..key_spec("SOURCE_PRIVATE_KEY")
        };
        let target = AuthSpec {
            method: Some(AuthMethod::ClientSecretPost),
            ..key_spec("TARGET_PRIVATE_KEY")
        };
        let secrets = Secrets {
            source_private_key: Some(Secret::new(broken_key)),
            target_private_key: Some(Secret::new(broken_key.replace("ZmFrZQ==", "bm9wZQ=="))),
            ..Secrets::default()
        };
        let problems = check_credentials(&run_spec(source, target), &secrets);
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "SOURCE_CLIENT_ID",
                "SOURCE_PRIVATE_KEY",
                "TARGET_PRIVATE_KEY",
                "TARGET_CLIENT_SECRET"
            ],
            "{problems:?}"
        );
        assert!(problems.iter().all(|p| !p.to_string().contains("ZmFrZQ")));
        assert!(problems[3]
            .message
            .contains("required by client_secret_post"));

        // Disabled sides and secrets still in AWS are no problem yet.
        let aws = AuthSpec {
            client_secret: Some(SecretRef::SecretsManager { id: "arn:x".into() }),
            private_key: Some(SecretRef::Ssm { name: "/k".into() }),
            method: Some(AuthMethod::PrivateKeyJwt),
            ..key_spec("unused")
        };
        let problems = check_credentials(
            &run_spec(aws.clone(), AuthSpec::disabled()),
            &Secrets::default(),
        );
        assert_eq!(problems, []);
        // An authenticator, though, needs the values.
        let err = Authenticator::new(
            builder(),
            "https://a.example",
            &aws,
            None,
            None,
            Side::Source,
        )
        .unwrap_err();
        assert!(err.message.contains("not resolved"), "{err}");
    }
}
