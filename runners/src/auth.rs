//! SMART Backend Services client authentication: discovery, the client credentials grant and a
//! cached bearer token (`docs/protocols.md` §1).
//!
//! Contract
//! - [`Authenticator::new`] validates and parses every credential before any network call. The
//!   private key may be a JWK (with `kid` and `alg`), a JWKS (the key is chosen by `key_id`, or
//!   is its only private key), or a PEM: PKCS#8 (RSA or EC P-384), PKCS#1 RSA or SEC1 EC P-384,
//!   plus `key_id`. The algorithm is `signing_algorithm`, else the JWK's `alg`, else the key
//!   type's (RSA → RS384, EC P-384 → ES384); any disagreement is an error. Errors
//!   ([`AuthSetupError`]) name the configuration key and never echo a secret.
//! - Discovery is `GET {base}/.well-known/smart-configuration`; `token_endpoint` must be an
//!   absolute http(s) URL. It is cached, and dropped after a failed token request so that a
//!   retry picks up a moved endpoint or a changed list of methods.
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

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use p384::ecdsa::signature::Signer as _;
use pathling_import_core::config::Secret;
use pathling_import_core::retry::{Failure, FailureKind};
use pathling_import_core::spec::{AuthMethod, AuthSpec, SecretRef, SigningAlgorithm};
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use rsa::pkcs1::DecodeRsaPrivateKey as _;
use rsa::pkcs8::der::Decode as _;
use rsa::pkcs8::DecodePrivateKey as _;
use rsa::signature::{RandomizedSigner as _, SignatureEncoding as _};
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;

/// The assertion type SMART Backend Services requires for `private_key_jwt`.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// `expires_in` when the server leaves it out (SMART's typical and maximum lifetime).
pub const DEFAULT_EXPIRES_IN_SECS: u64 = 300;

/// Client assertions live four minutes: SMART allows at most five, and the margin absorbs
/// clock skew between us and the server.
const ASSERTION_LIFETIME_SECS: u64 = 240;

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
    /// configuration came from a JSON file).
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
    http: reqwest::Client,
    side: Side,
    base_url: String,
    /// `None` when authentication is disabled.
    client: Option<Client>,
    cache: Mutex<Cache>,
}

/// The validated credentials of an enabled authenticator.
struct Client {
    id: String,
    scopes: String,
    method: Option<AuthMethod>,
    secret: Option<Secret>,
    key: Option<SigningKey>,
}

#[derive(Default)]
struct Cache {
    discovery: Option<Discovery>,
    token: Option<BearerToken>,
}

#[derive(Clone, Debug)]
struct Discovery {
    token_endpoint: String,
    /// `None` when the document has no `token_endpoint_auth_methods_supported`.
    methods: Option<Vec<String>>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Authenticator");
        d.field("side", &self.side)
            .field("base_url", &self.base_url);
        match &self.client {
            None => d.field("enabled", &false),
            Some(c) => d
                .field("client_id", &c.id)
                .field("scopes", &c.scopes)
                .field("method", &c.method)
                .field("client_secret", &c.secret.as_ref().map(|_| "***"))
                .field("private_key", &c.key),
        };
        d.finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Validates the spec and parses the credentials; no network call is made.
    ///
    /// `client_secret` and `private_key` are the resolved values of the spec's references.
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        spec: &AuthSpec,
        client_secret: Option<Secret>,
        private_key: Option<Secret>,
        side: Side,
    ) -> Result<Self, AuthSetupError> {
        let base_url = base_url.trim_end_matches('/').to_string();
        let disabled = Authenticator {
            http,
            side,
            base_url,
            client: None,
            cache: Mutex::new(Cache::default()),
        };
        if !spec.enabled {
            return Ok(disabled);
        }
        let names = KeyNames::new(side, spec);
        if !is_http_url(&disabled.base_url) {
            return Err(AuthSetupError::new(
                &names.plain("ENDPOINT"),
                "is not an absolute http(s) URL",
            ));
        }
        let id = spec
            .client_id
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                AuthSetupError::new(
                    &names.plain("CLIENT_ID"),
                    "required when authentication is enabled",
                )
            })?
            .to_string();
        let secret = match client_secret {
            Some(s) if s.expose().is_empty() => {
                return Err(AuthSetupError::new(&names.client_secret, "is empty"))
            }
            Some(s) => Some(s),
            None if spec.client_secret.is_some() => {
                return Err(AuthSetupError::new(
                    &names.client_secret,
                    "is configured but its value was not resolved",
                ))
            }
            None => None,
        };
        let key = match private_key {
            Some(k) => Some(parse_private_key(
                k.expose(),
                spec.key_id.as_deref(),
                spec.signing_algorithm,
                &names,
            )?),
            None if spec.private_key.is_some() => {
                return Err(AuthSetupError::new(
                    &names.private_key,
                    "is configured but its value was not resolved",
                ))
            }
            None => None,
        };
        match spec.method {
            Some(m @ (AuthMethod::ClientSecretBasic | AuthMethod::ClientSecretPost))
                if secret.is_none() =>
            {
                return Err(AuthSetupError::new(
                    &names.client_secret,
                    format!("required by {}", m.as_str()),
                ));
            }
            Some(AuthMethod::PrivateKeyJwt) if key.is_none() => {
                return Err(AuthSetupError::new(
                    &names.private_key,
                    "required by private_key_jwt",
                ));
            }
            _ => {}
        }
        if secret.is_none() && key.is_none() {
            return Err(AuthSetupError::new(
                &names.client_secret,
                format!(
                    "a client secret or {} is required when authentication is enabled",
                    names.private_key
                ),
            ));
        }
        Ok(Authenticator {
            client: Some(Client {
                id,
                scopes: spec.scopes.trim().to_string(),
                method: spec.method,
                secret,
                key,
            }),
            ..disabled
        })
    }

    /// Whether requests need a token at all.
    pub fn enabled(&self) -> bool {
        self.client.is_some()
    }

    /// A usable access token, or `None` when authentication is disabled.
    ///
    /// The lock is held across the fetch on purpose: concurrent callers then share one token
    /// request rather than each authenticating (servers rate-limit token endpoints, and every
    /// `private_key_jwt` request burns a `jti`).
    pub async fn token(&self, now_unix_ms: u64) -> Result<Option<BearerToken>, Failure> {
        let Some(client) = &self.client else {
            return Ok(None);
        };
        let mut cache = self.cache.lock().await;
        if let Some(token) = &cache.token {
            if !token.needs_refresh(now_unix_ms) {
                return Ok(Some(token.clone()));
            }
        }
        match self.fetch(client, &mut cache, now_unix_ms).await {
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
        client: &Client,
        cache: &mut Cache,
        now_ms: u64,
    ) -> Result<BearerToken, Failure> {
        let discovery = match &cache.discovery {
            Some(d) => d.clone(),
            None => {
                let d = self.discover().await?;
                cache.discovery = Some(d.clone());
                d
            }
        };
        self.request_token(client, &discovery, now_ms).await
    }

    /// Forgets `token` after a protected resource refused it (401), so the next
    /// [`Self::token`] authenticates again. A token other than the cached one is ignored.
    pub async fn invalidate(&self, token: &BearerToken) {
        let mut cache = self.cache.lock().await;
        if cache.token.as_ref() == Some(token) {
            cache.token = None;
        }
    }

    fn discovery_url(&self) -> String {
        format!("{}/.well-known/smart-configuration", self.base_url)
    }

    async fn discover(&self) -> Result<Discovery, Failure> {
        let url = self.discovery_url();
        let what = format!("{} SMART discovery ({url})", self.side.word());
        let request = self.http.get(&url).header(ACCEPT, "application/json");
        let (status, retry_after, body) = exchange(request, &what).await?;
        if !status.is_success() {
            let hint = if status.as_u16() == 404 {
                " (authentication is enabled: does the server support SMART Backend Services?)"
            } else {
                ""
            };
            return Err(Failure::http(
                status.as_u16(),
                format!("{what}: {}{hint}", quote_body(&body, &[])),
            )
            .with_retry_after(retry_after));
        }
        let doc: Value = serde_json::from_slice(&body).map_err(|_| {
            Failure::new(
                FailureKind::Undecodable,
                format!("{what}: the answer is not JSON"),
            )
        })?;
        let token_endpoint = doc
            .get("token_endpoint")
            .and_then(Value::as_str)
            .map(str::trim)
            .ok_or_else(|| {
                Failure::new(
                    FailureKind::Undecodable,
                    format!("{what}: no token_endpoint"),
                )
            })?;
        if !is_http_url(token_endpoint) {
            return Err(Failure::new(
                FailureKind::Undecodable,
                format!(
                    "{what}: token_endpoint {:?} is not an absolute http(s) URL",
                    clip(token_endpoint)
                ),
            ));
        }
        // A malformed list is treated as absent: the fallback (client_secret_basic) is what a
        // client without discovery would try anyway.
        let methods = doc
            .get("token_endpoint_auth_methods_supported")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            });
        Ok(Discovery {
            token_endpoint: token_endpoint.to_string(),
            methods,
        })
    }

    async fn request_token(
        &self,
        client: &Client,
        discovery: &Discovery,
        now_ms: u64,
    ) -> Result<BearerToken, Failure> {
        let what = format!("{} token endpoint", self.side.word());
        let method = choose_method(
            client.method,
            client.secret.is_some(),
            client.key.is_some(),
            discovery.methods.as_deref(),
        )
        .map_err(|m| Failure::new(FailureKind::Local, format!("{what}: {m}")))?;

        // Plain pairs, encoded at the end: the encoder is not `Send`, and this future must be.
        let mut form: Vec<(&str, String)> = vec![("grant_type", "client_credentials".into())];
        if !client.scopes.is_empty() {
            form.push(("scope", client.scopes.clone()));
        }
        let mut request = self
            .http
            .post(&discovery.token_endpoint)
            .header(ACCEPT, "application/json")
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded");
        // Everything secret this request carries, to scrub from anything the server echoes.
        let mut sensitive: Vec<String> = Vec::new();
        let missing = |what_cred: &str| {
            Failure::new(
                FailureKind::Local,
                format!("{what}: {} needs {what_cred}", method.as_str()),
            )
        };
        match method {
            AuthMethod::ClientSecretBasic => {
                let secret = client.secret.as_ref().ok_or_else(|| missing("a secret"))?;
                let encoded_secret = form_encode(secret.expose());
                let credentials =
                    STANDARD.encode(format!("{}:{encoded_secret}", form_encode(&client.id)));
                let mut value = HeaderValue::from_str(&format!("Basic {credentials}"))
                    .map_err(|_| missing("credentials usable in a header"))?;
                value.set_sensitive(true);
                request = request.header(AUTHORIZATION, value);
                sensitive.extend([secret.expose().to_string(), encoded_secret, credentials]);
            }
            AuthMethod::ClientSecretPost => {
                let secret = client.secret.as_ref().ok_or_else(|| missing("a secret"))?;
                form.push(("client_id", client.id.clone()));
                form.push(("client_secret", secret.expose().to_string()));
                sensitive.extend([secret.expose().to_string(), form_encode(secret.expose())]);
            }
            AuthMethod::PrivateKeyJwt => {
                let key = client
                    .key
                    .as_ref()
                    .ok_or_else(|| missing("a private key"))?;
                let assertion = key
                    .client_assertion(&client.id, &discovery.token_endpoint, now_ms)
                    .map_err(|m| Failure::new(FailureKind::Local, format!("{what}: {m}")))?;
                form.push(("client_assertion_type", JWT_BEARER.into()));
                form.push(("client_assertion", assertion.clone()));
                sensitive.push(assertion);
            }
        }
        let (status, retry_after, body) = exchange(request.body(form_body(&form)), &what).await?;
        if !status.is_success() {
            let detail = oauth_error_text(&body, &sensitive);
            return Err(Failure::http(
                status.as_u16(),
                format!(
                    "{what}: {detail} ({} as client {:?})",
                    method.as_str(),
                    clip(&client.id)
                ),
            )
            .with_retry_after(retry_after));
        }
        let undecodable = |m: &str| Failure::new(FailureKind::Undecodable, format!("{what}: {m}"));
        let answer: Value = serde_json::from_slice(&body)
            .map_err(|_| undecodable("the token answer is not JSON"))?;
        let access_token = answer
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| undecodable("the token answer has no access_token"))?;
        if let Some(kind) = answer.get("token_type").and_then(Value::as_str) {
            if !kind.eq_ignore_ascii_case("bearer") {
                return Err(undecodable(&format!(
                    "token_type {:?} is not bearer",
                    clip(kind)
                )));
            }
        }
        let expires_in = answer
            .get("expires_in")
            .and_then(seconds)
            .unwrap_or(DEFAULT_EXPIRES_IN_SECS);
        let scope = answer
            .get("scope")
            .and_then(Value::as_str)
            .map(str::to_string);
        // RFC 6750 tokens are visible ASCII; anything else cannot be sent in a header.
        if !access_token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(undecodable(
                "the access_token has characters a header cannot carry",
            ));
        }
        BearerToken::new(access_token.to_string(), now_ms, expires_in, scope)
            .ok_or_else(|| undecodable("the access_token cannot be sent in a header"))
    }
}

/// Picks the client authentication method (see the module contract).
fn choose_method(
    explicit: Option<AuthMethod>,
    has_secret: bool,
    has_key: bool,
    supported: Option<&[String]>,
) -> Result<AuthMethod, String> {
    if let Some(m) = explicit {
        return Ok(m);
    }
    let offers = |m: AuthMethod| supported.is_none_or(|list| list.iter().any(|s| s == m.as_str()));
    let listed = |m: AuthMethod| supported.is_some_and(|list| list.iter().any(|s| s == m.as_str()));
    if has_key && (listed(AuthMethod::PrivateKeyJwt) || (supported.is_none() && !has_secret)) {
        return Ok(AuthMethod::PrivateKeyJwt);
    }
    if has_secret {
        if offers(AuthMethod::ClientSecretBasic) {
            return Ok(AuthMethod::ClientSecretBasic);
        }
        if listed(AuthMethod::ClientSecretPost) {
            return Ok(AuthMethod::ClientSecretPost);
        }
    }
    let configured = match (has_secret, has_key) {
        (true, true) => "a client secret and a private key are",
        (true, false) => "only a client secret is",
        _ => "only a private key is",
    };
    let offered = supported
        .map(|l| {
            if l.is_empty() {
                "none".to_string()
            } else {
                l.iter().map(|s| clip(s)).collect::<Vec<_>>().join(", ")
            }
        })
        .unwrap_or_default();
    Err(format!(
        "no usable client authentication method: the server supports {offered}, but {configured} \
         configured (set the auth method explicitly to override discovery)"
    ))
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

/// A parsed private key ready to sign client assertions. `Debug` shows only `alg` and `kid`.
struct SigningKey {
    alg: SigningAlgorithm,
    kid: String,
    material: KeyMaterial,
}

enum KeyMaterial {
    Rsa(Box<rsa::pkcs1v15::SigningKey<rsa::sha2::Sha384>>),
    Ec(Box<p384::ecdsa::SigningKey>),
}

impl KeyMaterial {
    fn natural_alg(&self) -> SigningAlgorithm {
        match self {
            KeyMaterial::Rsa(_) => SigningAlgorithm::RS384,
            KeyMaterial::Ec(_) => SigningAlgorithm::ES384,
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            KeyMaterial::Rsa(_) => "an RSA key",
            KeyMaterial::Ec(_) => "an EC P-384 key",
        }
    }

    fn from_rsa(key: rsa::RsaPrivateKey) -> Self {
        KeyMaterial::Rsa(Box::new(rsa::pkcs1v15::SigningKey::new(key)))
    }

    fn from_ec(key: &p384::SecretKey) -> Self {
        KeyMaterial::Ec(Box::new(p384::ecdsa::SigningKey::from(key)))
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A compact JWS client assertion for `aud` (the token endpoint), valid from `now_ms`.
    fn client_assertion(&self, client_id: &str, aud: &str, now_ms: u64) -> Result<String, String> {
        let alg = match self.alg {
            SigningAlgorithm::RS384 => "RS384",
            SigningAlgorithm::ES384 => "ES384",
        };
        let header = json!({"alg": alg, "kid": self.kid, "typ": "JWT"});
        let iat = now_ms / 1000;
        let claims = json!({
            "iss": client_id,
            "sub": client_id,
            "aud": aud,
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME_SECS,
            // Random, so no two assertions share one even across processes and restarts.
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = match &self.material {
            // Randomised (blinded) signing: RSA without blinding leaks timing.
            KeyMaterial::Rsa(key) => key
                .try_sign_with_rng(&mut rsa::rand_core::OsRng, signing_input.as_bytes())
                .map_err(|_| "signing the client assertion failed".to_string())?
                .to_vec(),
            // RFC 6979 deterministic ECDSA; JWS wants the fixed-size r‖s form.
            KeyMaterial::Ec(key) => {
                let sig: p384::ecdsa::Signature = key
                    .try_sign(signing_input.as_bytes())
                    .map_err(|_| "signing the client assertion failed".to_string())?;
                sig.to_bytes().to_vec()
            }
        };
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}

/// What a private key's text yields before kid and alg are settled.
struct ParsedKey {
    material: KeyMaterial,
    jwk_kid: Option<String>,
    jwk_alg: Option<String>,
}

fn parse_private_key(
    text: &str,
    key_id: Option<&str>,
    configured_alg: Option<SigningAlgorithm>,
    names: &KeyNames,
) -> Result<SigningKey, AuthSetupError> {
    let bad = |m: String| AuthSetupError::new(&names.private_key, m);
    let key_id = key_id.map(str::trim).filter(|k| !k.is_empty());
    let mut text = text.trim().to_string();
    // Environment variables often hold a PEM on one line with literal `\n` escapes.
    if !text.contains('\n') && text.contains("\\n") {
        text = text.replace("\\n", "\n");
    }
    let parsed = if text.starts_with('{') {
        parse_jwk_text(&text, key_id).map_err(bad)?
    } else if text.contains("-----BEGIN ") {
        ParsedKey {
            material: parse_pem(&text).map_err(bad)?,
            jwk_kid: None,
            jwk_alg: None,
        }
    } else {
        return Err(bad(
            "is neither a JWK (JSON) nor a PEM private key (-----BEGIN PRIVATE KEY-----)".into(),
        ));
    };

    let natural = parsed.material.natural_alg();
    let alg_name = |a: SigningAlgorithm| match a {
        SigningAlgorithm::RS384 => "RS384",
        SigningAlgorithm::ES384 => "ES384",
    };
    if let Some(jwk_alg) = &parsed.jwk_alg {
        if jwk_alg != alg_name(natural) {
            return Err(bad(format!(
                "the JWK's alg {:?} does not fit {} (SMART uses RS384 for RSA and ES384 for EC \
                 P-384)",
                clip(jwk_alg),
                parsed.material.describe()
            )));
        }
    }
    if let Some(alg) = configured_alg {
        if alg != natural {
            return Err(AuthSetupError::new(
                &names.plain("SIGNING_ALGORITHM"),
                format!(
                    "{} needs {}, but {} holds {}",
                    alg_name(alg),
                    match alg {
                        SigningAlgorithm::RS384 => "an RSA key",
                        SigningAlgorithm::ES384 => "an EC P-384 key",
                    },
                    names.private_key,
                    parsed.material.describe()
                ),
            ));
        }
    }
    let kid = match (key_id, parsed.jwk_kid.as_deref()) {
        (Some(configured), Some(own)) if configured != own => {
            return Err(AuthSetupError::new(
                &names.plain("KEY_ID"),
                format!(
                    "{:?} differs from the JWK's own kid {:?}; the kid must name the registered \
                     public key",
                    clip(configured),
                    clip(own)
                ),
            ))
        }
        (Some(k), _) | (None, Some(k)) => k.to_string(),
        (None, None) => {
            return Err(AuthSetupError::new(
                &names.plain("KEY_ID"),
                format!(
                    "required with a PEM private key or a JWK without kid (set it to the kid \
                     registered for {})",
                    names.private_key
                ),
            ))
        }
    };
    Ok(SigningKey {
        alg: natural,
        kid,
        material: parsed.material,
    })
}

/// A JWK, or a JWKS from which `key_id` (or its only private key) is taken.
fn parse_jwk_text(text: &str, key_id: Option<&str>) -> Result<ParsedKey, String> {
    // Parse into a `Value` and read fields by hand: typed deserialisation errors quote the
    // offending value, which could be key material.
    let value: Value = serde_json::from_str(text).map_err(|e| {
        format!(
            "is not valid JSON (a JWK was expected): {}",
            json_position(&e)
        )
    })?;
    let object = value
        .as_object()
        .ok_or_else(|| "is not a JSON object (a JWK was expected)".to_string())?;
    if let Some(keys) = object.get("keys") {
        let keys = keys
            .as_array()
            .ok_or_else(|| "is a JWKS whose \"keys\" is not an array".to_string())?;
        let private: Vec<&Map<String, Value>> = keys
            .iter()
            .filter_map(Value::as_object)
            .filter(|k| k.contains_key("d"))
            .collect();
        let chosen = match key_id {
            Some(kid) => private
                .iter()
                .find(|k| k.get("kid").and_then(Value::as_str) == Some(kid))
                .ok_or_else(|| format!("is a JWKS without a private key of kid {:?}", clip(kid)))?,
            None => match private.as_slice() {
                [only] => only,
                [] => return Err("is a JWKS without any private key".into()),
                _ => {
                    return Err(format!(
                        "is a JWKS with {} private keys; set the key id to choose one",
                        private.len()
                    ))
                }
            },
        };
        return parse_jwk(chosen);
    }
    parse_jwk(object)
}

fn parse_jwk(jwk: &Map<String, Value>) -> Result<ParsedKey, String> {
    let field = |name: &str| jwk.get(name).and_then(Value::as_str);
    let kty = field("kty").ok_or_else(|| "is a JWK without kty".to_string())?;
    if !jwk.contains_key("d") {
        return Err(
            "is a public JWK; the private key (with \"d\") is needed to sign assertions".into(),
        );
    }
    let material = match kty {
        "RSA" => {
            let big = |name: &str| -> Result<rsa::BigUint, String> {
                let text = field(name).ok_or_else(|| format!("is an RSA JWK without {name}"))?;
                let bytes = URL_SAFE_NO_PAD
                    .decode(text.trim_end_matches('='))
                    .map_err(|_| format!("is an RSA JWK whose {name} is not base64url"))?;
                Ok(rsa::BigUint::from_bytes_be(&bytes))
            };
            let primes = match (field("p"), field("q")) {
                (Some(_), Some(_)) => vec![big("p")?, big("q")?],
                // Without the primes the library recovers them from n, e and d.
                _ => Vec::new(),
            };
            let key = rsa::RsaPrivateKey::from_components(big("n")?, big("e")?, big("d")?, primes)
                .map_err(|e| format!("is not a valid RSA private key: {e}"))?;
            KeyMaterial::from_rsa(key)
        }
        "EC" => {
            let crv = field("crv").unwrap_or("(none)");
            if crv != "P-384" {
                return Err(format!(
                    "is an EC JWK on curve {:?}; ES384 needs P-384",
                    clip(crv)
                ));
            }
            let secret = if jwk.contains_key("x") && jwk.contains_key("y") {
                // The library checks that x and y belong to d, but refuses members it does not
                // know (kid, alg, use), so hand it only the key itself.
                let key_only: Map<String, Value> = ["kty", "crv", "x", "y", "d"]
                    .into_iter()
                    .filter_map(|k| jwk.get(k).map(|v| (k.to_string(), v.clone())))
                    .collect();
                p384::SecretKey::from_jwk_str(&Value::Object(key_only).to_string())
                    .map_err(|_| "is not a valid EC P-384 private JWK".to_string())?
            } else {
                let d = field("d")
                    .and_then(|d| URL_SAFE_NO_PAD.decode(d.trim_end_matches('=')).ok())
                    .ok_or_else(|| "is an EC JWK whose d is not base64url".to_string())?;
                p384::SecretKey::from_slice(&d)
                    .map_err(|_| "is an EC JWK whose d is not a P-384 scalar".to_string())?
            };
            KeyMaterial::from_ec(&secret)
        }
        "oct" => return Err("is a symmetric JWK; private_key_jwt needs an RSA or EC key".into()),
        other => {
            return Err(format!(
                "is a JWK of kty {:?}; RSA or EC P-384 is needed",
                clip(other)
            ))
        }
    };
    Ok(ParsedKey {
        material,
        jwk_kid: field("kid")
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_string),
        jwk_alg: field("alg").map(str::to_string),
    })
}

/// The first private key block of a PEM text (surrounding text, such as OpenSSL's bag
/// attributes or a certificate, is skipped).
fn parse_pem(text: &str) -> Result<KeyMaterial, String> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + "-----BEGIN ".len()..];
        let Some(label_end) = after.find("-----") else {
            break;
        };
        let label = &after[..label_end];
        let end_marker = format!("-----END {label}-----");
        let Some(end) = after.find(&end_marker) else {
            return Err(format!("has a PEM block {label:?} without its END line"));
        };
        let block_len = "-----BEGIN ".len() + end + end_marker.len();
        let block = &rest[start..start + block_len];
        match label {
            "PRIVATE KEY" => return parse_pkcs8(block),
            "RSA PRIVATE KEY" => {
                return rsa::RsaPrivateKey::from_pkcs1_pem(block)
                    .map(KeyMaterial::from_rsa)
                    .map_err(|e| format!("is not a valid PKCS#1 RSA private key: {e}"))
            }
            "EC PRIVATE KEY" => {
                return p384::SecretKey::from_sec1_pem(block)
                    .map(|k| KeyMaterial::from_ec(&k))
                    .map_err(|_| {
                        "is not a valid SEC1 EC private key on P-384 (ES384 needs P-384)".into()
                    })
            }
            "ENCRYPTED PRIVATE KEY" => {
                return Err("is an encrypted private key; provide it unencrypted \
                            (openssl pkcs8 -topk8 -nocrypt)"
                    .into())
            }
            _ => labels.push(label.to_string()),
        }
        rest = &rest[start + block_len..];
    }
    if labels.is_empty() {
        Err("is not a complete PEM block".into())
    } else {
        Err(format!(
            "holds no private key (found PEM {}); the private key is needed to sign assertions",
            labels.join(", ")
        ))
    }
}

fn parse_pkcs8(block: &str) -> Result<KeyMaterial, String> {
    use p384::elliptic_curve::pkcs8::AssociatedOid as _;
    let (_, document) = rsa::pkcs8::SecretDocument::from_pem(block)
        .map_err(|e| format!("is not a valid PKCS#8 PEM: {e}"))?;
    let info = rsa::pkcs8::PrivateKeyInfo::from_der(document.as_bytes())
        .map_err(|e| format!("is not a valid PKCS#8 private key: {e}"))?;
    let oid = info.algorithm.oid;
    if oid == rsa::pkcs1::ALGORITHM_OID {
        rsa::RsaPrivateKey::from_pkcs8_der(document.as_bytes())
            .map(KeyMaterial::from_rsa)
            .map_err(|e| format!("is not a valid RSA private key: {e}"))
    } else if oid == p384::elliptic_curve::ALGORITHM_OID {
        let curve = info.algorithm.parameters_oid().ok();
        if curve != Some(p384::NistP384::OID) {
            return Err(format!(
                "is an EC key on curve {}; ES384 needs P-384 (1.3.132.0.34)",
                curve.map_or_else(|| "(unknown)".to_string(), |c| c.to_string())
            ));
        }
        p384::SecretKey::from_pkcs8_der(document.as_bytes())
            .map(|k| KeyMaterial::from_ec(&k))
            .map_err(|e| format!("is not a valid EC P-384 private key: {e}"))
    } else {
        Err(format!(
            "is a PKCS#8 key of algorithm {oid}; RSA or EC P-384 is needed"
        ))
    }
}

fn form_body(pairs: &[(&str, String)]) -> String {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        form.append_pair(name, value);
    }
    form.finish()
}

/// `application/x-www-form-urlencoded` encoding of one value (RFC 6749 §2.3.1, Appendix B).
fn form_encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

fn is_http_url(text: &str) -> bool {
    url::Url::parse(text).is_ok_and(|u| {
        matches!(u.scheme(), "http" | "https") && u.host().is_some() && !u.cannot_be_a_base()
    })
}

/// A non-negative number of seconds, as a JSON number or a numeric string (some servers quote
/// it).
fn seconds(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite())
                    .map(|f| f.max(0.0) as u64)
            })
            .or(Some(0)),
        Value::String(s) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(|f| f.max(0.0) as u64),
        _ => None,
    }
}

/// Sends a request and reads its whole answer: status, `Retry-After` and body.
///
/// The deadline wraps the client's own timeouts rather than replacing them (a per-request
/// reqwest timeout would override a shorter one the caller configured).
async fn exchange(
    request: reqwest::RequestBuilder,
    what: &str,
) -> Result<(reqwest::StatusCode, Option<String>, Vec<u8>), Failure> {
    let attempt = async {
        let response = request
            .send()
            .await
            .map_err(|e| transport_failure(what, &e))?;
        let status = response.status();
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
        .map_err(|e| transport_failure(what, &e))?
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

/// Maps a transport error to a failure kind. reqwest's messages name the URL and the cause,
/// never request headers or bodies.
fn transport_failure(what: &str, e: &reqwest::Error) -> Failure {
    let kind = if e.is_timeout() {
        FailureKind::Timeout
    } else {
        FailureKind::Network
    };
    let mut message = format!("{what}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    Failure::new(kind, message)
}

/// `error: error_description` of an RFC 6749 §5.2 answer, else a quote of the body.
fn oauth_error_text(body: &[u8], sensitive: &[String]) -> String {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let error = parsed
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(Value::as_str);
    match error {
        Some(error) => {
            let description = parsed
                .as_ref()
                .and_then(|v| v.get("error_description"))
                .and_then(Value::as_str);
            let text = match description {
                Some(d) if !d.is_empty() => format!("{error}: {d}"),
                _ => error.to_string(),
            };
            scrub(&text, sensitive)
        }
        None => quote_body(body, sensitive),
    }
}

fn quote_body(body: &[u8], sensitive: &[String]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(empty answer)".to_string()
    } else {
        scrub(text, sensitive)
    }
}

/// Server text made safe to quote: secrets the request carried replaced, control characters
/// flattened, length capped.
fn scrub(text: &str, sensitive: &[String]) -> String {
    let mut text = text.to_string();
    for s in sensitive.iter().filter(|s| !s.is_empty()) {
        text = text.replace(s.as_str(), "***");
    }
    clip(&text)
}

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

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// Callers spawn token requests onto a multi-threaded runtime.
    #[test]
    fn futures_are_send_and_the_authenticator_is_shareable() {
        fn send<T: Send>(_: &T) {}
        fn sync<T: Send + Sync>() {}
        sync::<Authenticator>();
        sync::<BearerToken>();
        let a = Authenticator::new(
            reqwest::Client::new(),
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
    fn method_choice_follows_discovery() {
        use AuthMethod::*;
        let both = list(&["client_secret_basic", "private_key_jwt"]);
        assert_eq!(
            choose_method(None, true, true, Some(&both)),
            Ok(PrivateKeyJwt)
        );
        assert_eq!(
            choose_method(None, true, false, Some(&both)),
            Ok(ClientSecretBasic)
        );
        assert_eq!(choose_method(None, true, true, None), Ok(ClientSecretBasic));
        assert_eq!(choose_method(None, false, true, None), Ok(PrivateKeyJwt));
        let post = list(&["client_secret_post"]);
        assert_eq!(
            choose_method(None, true, true, Some(&post)),
            Ok(ClientSecretPost)
        );
        let jwt = list(&["private_key_jwt"]);
        let err = choose_method(None, true, false, Some(&jwt)).unwrap_err();
        assert!(err.contains("private_key_jwt") && err.contains("only a client secret"));
        assert!(choose_method(None, false, true, Some(&post)).is_err());
        assert_eq!(
            choose_method(Some(ClientSecretPost), true, true, Some(&jwt)),
            Ok(ClientSecretPost)
        );
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
    fn expires_in_forms() {
        assert_eq!(seconds(&json!(300)), Some(300));
        assert_eq!(seconds(&json!("3600")), Some(3600));
        assert_eq!(seconds(&json!(59.9)), Some(59));
        assert_eq!(seconds(&json!(-5)), Some(0));
        assert_eq!(seconds(&json!(null)), None);
    }

    #[test]
    fn scrub_hides_sensitive_values() {
        let s = scrub("bad secret s3cr3t\nagain s3cr3t", &list(&["s3cr3t"]));
        assert_eq!(s, "bad secret *** again ***");
    }

    #[test]
    fn basic_credentials_are_form_encoded() {
        assert_eq!(form_encode("a b+c:d%"), "a+b%2Bc%3Ad%25");
    }

    #[test]
    fn non_key_text_is_refused_without_echo() {
        let spec = AuthSpec {
            enabled: true,
            client_id: Some("c".into()),
            scopes: "system/*.read".into(),
            method: None,
            client_secret: None,
            private_key: Some(SecretRef::Config {
                key: "SOURCE_PRIVATE_KEY".into(),
            }),
            key_id: Some("k".into()),
            signing_algorithm: None,
            allow_insecure: false,
        };
        for text in [
            "hunter2-not-a-key",
            "{\"kty\":\"RSA\",\"d\":\"hunter2\"}",
            "-----BEGIN PRIVATE KEY-----\nhunter2\n-----END PRIVATE KEY-----",
        ] {
            let err = Authenticator::new(
                reqwest::Client::new(),
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
}
