//! SMART Backend Services machinery shared by both fakes: the discovery document, a client
//! credentials token endpoint and bearer-token checks.
//!
//! Contract (see `docs/protocols.md`, §1 "SMART Backend Services"):
//! - `client_secret_basic`: `Authorization: Basic base64(urlencode(id) ":" urlencode(secret))`.
//!   Both halves are form-url-decoded before comparison (RFC 6749 §2.3.1), so a client that
//!   forgets to encode a secret containing `+`, `%` or `:` fails here as it would against a
//!   strict server.
//! - `client_secret_post`: `client_id` and `client_secret` in the form body.
//! - `private_key_jwt`: `client_assertion_type` = jwt-bearer and a `client_assertion` signed with
//!   RS384 or ES384 by a key whose `kid` is in the configured JWKS; `iss` = `sub` = client id,
//!   `aud` = the token endpoint URL exactly, `exp` in the future and at most
//!   [`AuthConfig::max_assertion_lifetime`] ahead, and a `jti` never seen before (a replay gets
//!   `400 invalid_client`).
//! - Using two methods at once is `invalid_request` (RFC 6749 §2.3), a method that is not enabled
//!   for the client is `invalid_client`. Failures of Basic answer 401 with
//!   `WWW-Authenticate: Basic`, the others 400, with an RFC 6749 §5.2 JSON body.
//! - Tokens are opaque, live [`AuthConfig::token_lifetime`] (set it to 2 s to exercise refresh),
//!   and are checked on every protected request: missing, unknown or expired tokens get 401.
//!
//! - [`AuthConfig::token_redirect`] makes the token endpoint answer every request with that
//!   redirect status and `Location` instead (to check that clients do not follow it: a 307 or
//!   308 would have them re-send their credentials to the `Location`).
//!
//! Knobs live in [`AuthConfig`] and can be changed while a fake runs (through the fake's
//! `update` method); [`AuthStats`] counts what happened.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};

use crate::fhir::{header_str, json_response, media_type_of, outcome_response, set_header};
use crate::keys::{ensure_crypto_provider, TestKey};

/// The client authentication methods of SMART / OAuth 2.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    /// HTTP Basic with form-encoded id and secret.
    ClientSecretBasic,
    /// Id and secret in the form body.
    ClientSecretPost,
    /// A signed JWT client assertion (SMART Backend Services).
    PrivateKeyJwt,
}

impl AuthMethod {
    /// The name used in `token_endpoint_auth_methods_supported`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ClientSecretBasic => "client_secret_basic",
            AuthMethod::ClientSecretPost => "client_secret_post",
            AuthMethod::PrivateKeyJwt => "private_key_jwt",
        }
    }
}

/// The assertion type SMART requires for `private_key_jwt`.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// One registered client and how the fake's token endpoint treats it.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// The registered client id.
    pub client_id: String,
    /// The client secret for the two secret methods.
    pub client_secret: Option<String>,
    /// Methods the token endpoint accepts for this client.
    pub methods: Vec<AuthMethod>,
    /// What discovery advertises in `token_endpoint_auth_methods_supported`; `None` advertises
    /// [`Self::methods`]. Lets a test make discovery and reality disagree.
    pub advertised_methods: Option<Vec<String>>,
    /// Registered public keys (JWKs with `kid`) for `private_key_jwt`.
    pub jwks: Vec<Value>,
    /// Lifetime of issued tokens (`expires_in`, rounded down to whole seconds in the answer).
    pub token_lifetime: Duration,
    /// `scope` in the token answer; `None` echoes the requested scope.
    pub granted_scope: Option<String>,
    /// The furthest `exp` of a client assertion accepted (SMART: five minutes).
    pub max_assertion_lifetime: Duration,
    /// `(status, Location)`: answer every token request with this redirect instead.
    pub token_redirect: Option<(u16, String)>,
}

impl AuthConfig {
    /// A client that authenticates with `client_secret_basic` only.
    pub fn client_secret_basic(client_id: &str, secret: &str) -> Self {
        Self {
            client_id: client_id.into(),
            client_secret: Some(secret.into()),
            methods: vec![AuthMethod::ClientSecretBasic],
            advertised_methods: None,
            jwks: Vec::new(),
            token_lifetime: Duration::from_secs(300),
            granted_scope: None,
            max_assertion_lifetime: Duration::from_secs(300),
            token_redirect: None,
        }
    }

    /// A client that authenticates with `client_secret_post` only.
    pub fn client_secret_post(client_id: &str, secret: &str) -> Self {
        Self {
            methods: vec![AuthMethod::ClientSecretPost],
            ..Self::client_secret_basic(client_id, secret)
        }
    }

    /// A client that authenticates with `private_key_jwt` using any of the given keys.
    pub fn private_key_jwt(client_id: &str, keys: &[&TestKey]) -> Self {
        Self {
            client_secret: None,
            methods: vec![AuthMethod::PrivateKeyJwt],
            jwks: keys.iter().map(|k| k.public_jwk.clone()).collect(),
            ..Self::client_secret_basic(client_id, "")
        }
    }

    /// Replaces the accepted methods.
    pub fn with_methods(mut self, methods: &[AuthMethod]) -> Self {
        self.methods = methods.to_vec();
        self
    }

    /// Replaces the token lifetime.
    pub fn with_token_lifetime(mut self, lifetime: Duration) -> Self {
        self.token_lifetime = lifetime;
        self
    }

    /// Answers every token request with `status` (a 3xx) and `Location: location`.
    pub fn with_token_redirect(mut self, status: u16, location: &str) -> Self {
        self.token_redirect = Some((status, location.into()));
        self
    }

    /// Adds a secret (for configurations accepting both secrets and keys).
    pub fn with_secret(mut self, secret: &str) -> Self {
        self.client_secret = Some(secret.into());
        self
    }
}

/// What a token endpoint and bearer checks saw.
#[derive(Clone, Debug, Default)]
pub struct AuthStats {
    /// Requests to the token endpoint.
    pub token_requests: u64,
    /// Tokens issued.
    pub tokens_issued: u64,
    /// Token requests refused.
    pub token_failures: u64,
    /// `error` and description of the last refusal.
    pub last_token_error: Option<String>,
    /// The method of each successful token request, in order.
    pub methods_used: Vec<AuthMethod>,
    /// `scope` of the last token request.
    pub last_requested_scope: Option<String>,
    /// Protected requests let through.
    pub bearer_accepted: u64,
    /// Protected requests refused (missing, unknown or expired token).
    pub bearer_rejected: u64,
    /// Of those, how many carried a token that had expired.
    pub expired_tokens_presented: u64,
}

/// Mutable token state of one fake.
#[derive(Debug, Default)]
pub(crate) struct AuthRuntime {
    tokens: HashMap<String, Instant>,
    used_jtis: HashSet<String>,
    pub(crate) stats: AuthStats,
}

/// The SMART configuration document for a server whose token endpoint is `token_url`.
pub(crate) fn smart_configuration(cfg: &AuthConfig, token_url: &str) -> Value {
    let methods: Vec<String> = cfg
        .advertised_methods
        .clone()
        .unwrap_or_else(|| cfg.methods.iter().map(|m| m.as_str().to_string()).collect());
    json!({
        "token_endpoint": token_url,
        "token_endpoint_auth_methods_supported": methods,
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": ["system/*.read", "system/*.rs", "user/*.write", "system/*.write"],
        "capabilities": ["client-confidential-asymmetric", "client-confidential-symmetric",
                          "permission-v1", "permission-v2"],
    })
}

struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
    basic_challenge: bool,
}

fn oauth_error(error: &'static str, description: impl Into<String>) -> OAuthError {
    OAuthError {
        status: StatusCode::BAD_REQUEST,
        error,
        description: description.into(),
        basic_challenge: false,
    }
}

fn basic_failure(description: impl Into<String>) -> OAuthError {
    OAuthError {
        status: StatusCode::UNAUTHORIZED,
        error: "invalid_client",
        description: description.into(),
        basic_challenge: true,
    }
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a space).
fn form_decode(text: &str) -> Option<String> {
    let spaced = text.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// The credentials after an authentication scheme (`"basic "`, matched case-insensitively).
fn strip_scheme<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let head = value.get(..scheme.len())?;
    head.eq_ignore_ascii_case(scheme)
        .then(|| value.get(scheme.len()..))
        .flatten()
        .map(str::trim)
}

fn now_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl AuthRuntime {
    /// Invalidates every issued token, as a server restart or key rotation would.
    pub(crate) fn revoke_all(&mut self) {
        self.tokens.clear();
    }

    /// Handles `POST token_endpoint`.
    pub(crate) fn token_endpoint(
        &mut self,
        cfg: &AuthConfig,
        token_url: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Response {
        self.stats.token_requests += 1;
        if let Some((status, location)) = &cfg.token_redirect {
            self.stats.token_failures += 1;
            let mut resp = Response::new(axum::body::Body::empty());
            *resp.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND);
            set_header(&mut resp, header::LOCATION, location);
            return resp;
        }
        match self.issue(cfg, token_url, headers, body) {
            Ok((method, answer)) => {
                self.stats.tokens_issued += 1;
                self.stats.methods_used.push(method);
                let mut resp = json_response(StatusCode::OK, &answer);
                set_header(&mut resp, header::CACHE_CONTROL, "no-store");
                set_header(&mut resp, header::PRAGMA, "no-cache");
                resp
            }
            Err(e) => {
                self.stats.token_failures += 1;
                self.stats.last_token_error = Some(format!("{}: {}", e.error, e.description));
                let mut resp = json_response(
                    e.status,
                    &json!({"error": e.error, "error_description": e.description}),
                );
                if e.basic_challenge {
                    set_header(&mut resp, header::WWW_AUTHENTICATE, "Basic realm=\"token\"");
                }
                resp
            }
        }
    }

    fn issue(
        &mut self,
        cfg: &AuthConfig,
        token_url: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(AuthMethod, Value), OAuthError> {
        let content_type = header_str(headers, "content-type").map(media_type_of);
        if !content_type
            .is_some_and(|c| c.eq_ignore_ascii_case("application/x-www-form-urlencoded"))
        {
            return Err(oauth_error(
                "invalid_request",
                "the token request must be application/x-www-form-urlencoded",
            ));
        }
        let mut form: HashMap<String, String> = HashMap::new();
        for (k, v) in form_urlencoded::parse(body) {
            if form.insert(k.to_string(), v.to_string()).is_some() {
                return Err(oauth_error(
                    "invalid_request",
                    format!("parameter {k} is repeated"),
                ));
            }
        }
        match form.get("grant_type").map(String::as_str) {
            Some("client_credentials") => {}
            Some(other) => {
                return Err(oauth_error(
                    "unsupported_grant_type",
                    format!("grant_type {other} is not supported"),
                ))
            }
            None => return Err(oauth_error("invalid_request", "grant_type is missing")),
        }
        self.stats.last_requested_scope = form.get("scope").cloned();

        let basic = header_str(headers, "authorization").and_then(|v| strip_scheme(v, "basic "));
        let post = form.contains_key("client_secret");
        let jwt =
            form.contains_key("client_assertion") || form.contains_key("client_assertion_type");
        let presented = [basic.is_some(), post, jwt].iter().filter(|b| **b).count();
        if presented > 1 {
            return Err(oauth_error(
                "invalid_request",
                "more than one client authentication method was used",
            ));
        }
        let method = if basic.is_some() {
            AuthMethod::ClientSecretBasic
        } else if post {
            AuthMethod::ClientSecretPost
        } else if jwt {
            AuthMethod::PrivateKeyJwt
        } else {
            return Err(OAuthError {
                status: StatusCode::UNAUTHORIZED,
                error: "invalid_client",
                description: "no client authentication was sent".into(),
                basic_challenge: cfg.methods.contains(&AuthMethod::ClientSecretBasic),
            });
        };
        if !cfg.methods.contains(&method) {
            let msg = format!("{} is not enabled for this client", method.as_str());
            return Err(if method == AuthMethod::ClientSecretBasic {
                basic_failure(msg)
            } else {
                oauth_error("invalid_client", msg)
            });
        }
        match method {
            AuthMethod::ClientSecretBasic => {
                let encoded = basic.unwrap_or("");
                let decoded = STANDARD
                    .decode(encoded)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| basic_failure("malformed Basic credentials"))?;
                let (id, secret) = decoded
                    .split_once(':')
                    .ok_or_else(|| basic_failure("Basic credentials lack a ':'"))?;
                let id = form_decode(id).ok_or_else(|| basic_failure("bad encoding of id"))?;
                let secret =
                    form_decode(secret).ok_or_else(|| basic_failure("bad encoding of secret"))?;
                if id != cfg.client_id || Some(&secret) != cfg.client_secret.as_ref() {
                    return Err(basic_failure("unknown client or wrong secret"));
                }
            }
            AuthMethod::ClientSecretPost => {
                if form.get("client_id") != Some(&cfg.client_id)
                    || form.get("client_secret") != cfg.client_secret.as_ref()
                {
                    return Err(oauth_error(
                        "invalid_client",
                        "unknown client or wrong secret",
                    ));
                }
            }
            AuthMethod::PrivateKeyJwt => self.verify_assertion(cfg, token_url, &form)?,
        }
        let token = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        self.tokens
            .insert(token.clone(), Instant::now() + cfg.token_lifetime);
        let scope = cfg
            .granted_scope
            .clone()
            .or_else(|| form.get("scope").cloned())
            .unwrap_or_else(|| "system/*.read".into());
        Ok((
            method,
            json!({
                "access_token": token,
                "token_type": "bearer",
                "expires_in": cfg.token_lifetime.as_secs(),
                "scope": scope,
            }),
        ))
    }

    fn verify_assertion(
        &mut self,
        cfg: &AuthConfig,
        token_url: &str,
        form: &HashMap<String, String>,
    ) -> Result<(), OAuthError> {
        ensure_crypto_provider();
        if form.get("client_assertion_type").map(String::as_str) != Some(JWT_BEARER) {
            return Err(oauth_error(
                "invalid_request",
                format!("client_assertion_type must be {JWT_BEARER}"),
            ));
        }
        if let Some(id) = form.get("client_id") {
            if id != &cfg.client_id {
                return Err(oauth_error("invalid_client", "client_id does not match"));
            }
        }
        let assertion = form
            .get("client_assertion")
            .ok_or_else(|| oauth_error("invalid_request", "client_assertion is missing"))?;
        let header = jsonwebtoken::decode_header(assertion)
            .map_err(|e| oauth_error("invalid_client", format!("malformed assertion: {e}")))?;
        if !matches!(header.alg, Algorithm::RS384 | Algorithm::ES384) {
            return Err(oauth_error(
                "invalid_client",
                format!("alg {:?} is not RS384 or ES384", header.alg),
            ));
        }
        let kid = header
            .kid
            .ok_or_else(|| oauth_error("invalid_client", "the assertion header has no kid"))?;
        let jwk_value = cfg
            .jwks
            .iter()
            .find(|k| k.get("kid").and_then(Value::as_str) == Some(kid.as_str()))
            .ok_or_else(|| oauth_error("invalid_client", format!("unknown kid {kid}")))?;
        if let Some(alg) = jwk_value.get("alg").and_then(Value::as_str) {
            let header_alg = format!("{:?}", header.alg);
            if alg != header_alg {
                return Err(oauth_error(
                    "invalid_client",
                    format!("key {kid} is registered for {alg}, not {header_alg}"),
                ));
            }
        }
        let jwk: Jwk = serde_json::from_value(jwk_value.clone())
            .map_err(|e| oauth_error("invalid_client", format!("unusable JWK: {e}")))?;
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|e| oauth_error("invalid_client", format!("unusable JWK: {e}")))?;
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[token_url]);
        validation.set_issuer(&[cfg.client_id.as_str()]);
        validation.sub = Some(cfg.client_id.clone());
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        validation.leeway = 5;
        let data = jsonwebtoken::decode::<Value>(assertion, &key, &validation)
            .map_err(|e| oauth_error("invalid_client", format!("assertion rejected: {e}")))?;
        let exp = data.claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
        if exp > now_epoch() + cfg.max_assertion_lifetime.as_secs() + 5 {
            return Err(oauth_error(
                "invalid_client",
                "exp is too far in the future (at most five minutes)",
            ));
        }
        let jti = data
            .claims
            .get("jti")
            .and_then(Value::as_str)
            .filter(|j| !j.is_empty())
            .ok_or_else(|| oauth_error("invalid_client", "the assertion has no jti"))?;
        if !self.used_jtis.insert(jti.to_string()) {
            return Err(oauth_error(
                "invalid_client",
                format!("jti {jti} was already used"),
            ));
        }
        Ok(())
    }

    /// Checks `Authorization: Bearer` on a protected request.
    #[allow(clippy::result_large_err)]
    pub(crate) fn check_bearer(&mut self, headers: &HeaderMap) -> Result<(), Response> {
        let token = header_str(headers, "authorization")
            .and_then(|v| strip_scheme(v, "bearer "))
            .filter(|t| !t.is_empty());
        let verdict = match token {
            None => Err("missing bearer token"),
            Some(t) => match self.tokens.get(t) {
                None => Err("unknown bearer token"),
                Some(expiry) if *expiry <= Instant::now() => {
                    self.stats.expired_tokens_presented += 1;
                    Err("expired bearer token")
                }
                Some(_) => Ok(()),
            },
        };
        match verdict {
            Ok(()) => {
                self.stats.bearer_accepted += 1;
                Ok(())
            }
            Err(why) => {
                self.stats.bearer_rejected += 1;
                let mut resp = outcome_response(StatusCode::UNAUTHORIZED, "login", why);
                set_header(
                    &mut resp,
                    header::WWW_AUTHENTICATE,
                    &format!("Bearer error=\"invalid_token\", error_description=\"{why}\""),
                );
                Err(resp)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding_follows_rfc6749() {
        assert_eq!(form_decode("a%3Ab+c%25").as_deref(), Some("a:b c%"));
    }
}
