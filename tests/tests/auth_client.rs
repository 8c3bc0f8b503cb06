//! The SMART Backend Services client (`pathling_import_runners::auth`) against the fake Bulk
//! Data source's token endpoint, and against a small recording server for what the fake cannot
//! show (the exact wire form of assertions and Basic credentials, absent discovery fields,
//! error answers, timeouts).

// Test helpers panic on purpose: a failure is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/tls.rs"]
mod tls;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use pathling_import_core::config::Secret;
use pathling_import_core::retry::FailureKind;
use pathling_import_core::spec::{AuthMethod, AuthSpec, SecretRef, SigningAlgorithm};
use pathling_import_runners::auth::{Authenticator, BearerToken, Side, JWT_BEARER};
use pathling_import_tests::auth::{AuthConfig, AuthMethod as FakeMethod};
use pathling_import_tests::fake_source::{FakeSource, FakeSourceHandle, SourceConfig};
use pathling_import_tests::keys::{TestKey, EC_1_SEC1_PEM, RSA_1_PKCS1_PEM};
use pathling_import_tests::server::{TlsIdentity, TlsListener};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const CLIENT: &str = "bulk client";
const SCOPES: &str = "system/*.read";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn http() -> reqwest::Client {
    builder().build().unwrap()
}

/// What a runner hands an authenticator: its client settings, not a client.
fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().timeout(Duration::from_secs(30))
}

fn config_ref(key: &str) -> Option<SecretRef> {
    Some(SecretRef::Config { key: key.into() })
}

/// An enabled spec; the secret and key references are set when the values are given.
fn spec(method: Option<AuthMethod>, secret: bool, key: bool) -> AuthSpec {
    AuthSpec {
        enabled: true,
        client_id: Some(CLIENT.into()),
        scopes: SCOPES.into(),
        method,
        client_secret: if secret {
            config_ref("SOURCE_CLIENT_SECRET")
        } else {
            None
        },
        private_key: if key {
            config_ref("SOURCE_PRIVATE_KEY")
        } else {
            None
        },
        key_id: None,
        signing_algorithm: None,
        allow_insecure: false,
    }
}

fn with_key_id(mut s: AuthSpec, kid: &str) -> AuthSpec {
    s.key_id = Some(kid.into());
    s
}

fn auth(base: &str, spec: &AuthSpec, secret: Option<&str>, key: Option<&str>) -> Authenticator {
    Authenticator::new(
        builder(),
        base,
        spec,
        secret.map(Secret::new),
        key.map(Secret::new),
        Side::Source,
    )
    .unwrap()
}

async fn fake(auth: AuthConfig) -> FakeSourceHandle {
    FakeSource::start(SourceConfig {
        auth: Some(auth),
        ..SourceConfig::default()
    })
    .await
    .unwrap()
}

/// A protected request: a system-level kick-off with the token. 202 means the fake accepted it.
async fn kickoff_status(source: &FakeSourceHandle, token: &BearerToken) -> u16 {
    http()
        .get(format!("{}/$export", source.base_url()))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .header("authorization", token.header())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn token(a: &Authenticator) -> BearerToken {
    a.token(now_ms()).await.unwrap().expect("auth is enabled")
}

fn pem_one_line(pem: &str) -> String {
    pem.trim().replace('\n', "\\n")
}

fn decode_part(part: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// A recording token server
// ---------------------------------------------------------------------------------------------

/// One token request as received: the `Authorization` header and the form fields.
type TokenRequest = (Option<String>, Vec<(String, String)>);

/// What the recording server answers to token requests.
#[derive(Clone)]
enum TokenAnswer {
    /// 200 with a fresh `tok-N`; `expires_in` left out when `None`.
    Token { expires_in: Option<Value> },
    /// A fixed status, body and optional `Retry-After`.
    Fixed {
        status: u16,
        body: String,
        retry_after: Option<String>,
    },
}

struct Recorder {
    origin: String,
    /// `token_endpoint_auth_methods_supported`; `None` leaves the field out.
    methods: Option<Vec<String>>,
    answer: TokenAnswer,
    discovery_delay: Duration,
    discovery_paths: Vec<String>,
    /// `(Authorization header, form body)` of each token request.
    token_requests: Vec<TokenRequest>,
    /// `METHOD path?query` of every request, whatever it was for.
    seen: Vec<String>,
    /// `(status, Location)` answered to discovery instead of the document.
    discovery_redirect: Option<(u16, String)>,
    /// The `token_endpoint` discovery names; `None` names this server's `/auth/token`.
    token_endpoint: Option<String>,
}

#[derive(Clone)]
struct RecorderHandle(Arc<Mutex<Recorder>>);

impl RecorderHandle {
    async fn start(methods: Option<&[&str]>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let handle = Self::new(origin, methods);
        let app = axum::Router::new()
            .fallback(record)
            .with_state(handle.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        handle
    }

    /// The same server on https, with a certificate of a private CA.
    async fn start_tls(methods: Option<&[&str]>, identity: &TlsIdentity) -> Self {
        let (listener, _stats) = TlsListener::bind(identity).await.unwrap();
        let origin = format!(
            "https://{}",
            axum::serve::Listener::local_addr(&listener).unwrap()
        );
        let handle = Self::new(origin, methods);
        let app = axum::Router::new()
            .fallback(record)
            .with_state(handle.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        handle
    }

    fn new(origin: String, methods: Option<&[&str]>) -> Self {
        RecorderHandle(Arc::new(Mutex::new(Recorder {
            origin,
            methods: methods.map(|m| m.iter().map(|s| s.to_string()).collect()),
            answer: TokenAnswer::Token {
                expires_in: Some(json!(300)),
            },
            discovery_delay: Duration::ZERO,
            discovery_paths: Vec::new(),
            token_requests: Vec::new(),
            seen: Vec::new(),
            discovery_redirect: None,
            token_endpoint: None,
        })))
    }

    fn base(&self) -> String {
        format!("{}/fhir", self.0.lock().unwrap().origin)
    }

    fn token_url(&self) -> String {
        format!("{}/auth/token", self.0.lock().unwrap().origin)
    }

    fn set(&self, change: impl FnOnce(&mut Recorder)) {
        change(&mut self.0.lock().unwrap());
    }

    fn requests(&self) -> Vec<TokenRequest> {
        self.0.lock().unwrap().token_requests.clone()
    }

    fn seen(&self) -> Vec<String> {
        self.0.lock().unwrap().seen.clone()
    }

    fn port(&self) -> u16 {
        url::Url::parse(&self.0.lock().unwrap().origin)
            .unwrap()
            .port()
            .unwrap()
    }

    fn assertions(&self) -> Vec<String> {
        self.requests()
            .iter()
            .filter_map(|(_, form)| {
                form.iter()
                    .find(|(k, _)| k == "client_assertion")
                    .map(|(_, v)| v.clone())
            })
            .collect()
    }
}

async fn record(
    State(h): State<RecorderHandle>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    h.0.lock().unwrap().seen.push(format!("{method} {uri}"));
    if method == Method::GET && path.ends_with("/.well-known/smart-configuration") {
        let (delay, doc) = {
            let mut r = h.0.lock().unwrap();
            r.discovery_paths.push(path);
            if let Some((status, location)) = r.discovery_redirect.clone() {
                let mut resp = StatusCode::from_u16(status).unwrap().into_response();
                resp.headers_mut()
                    .insert("location", location.parse().unwrap());
                return resp;
            }
            let token_endpoint = r
                .token_endpoint
                .clone()
                .unwrap_or_else(|| format!("{}/auth/token", r.origin));
            let mut doc = json!({
                "token_endpoint": token_endpoint,
                "grant_types_supported": ["client_credentials"],
            });
            if let Some(m) = &r.methods {
                doc["token_endpoint_auth_methods_supported"] = json!(m);
            }
            (r.discovery_delay, doc)
        };
        // The scenario's own wait: a discovery endpoint configured to answer slowly.
        tokio::time::sleep(delay).await;
        return axum::Json(doc).into_response();
    }
    if method == Method::POST && path == "/auth/token" {
        let mut r = h.0.lock().unwrap();
        let authorization = headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string());
        let form = url::form_urlencoded::parse(&body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        r.token_requests.push((authorization, form));
        let n = r.token_requests.len();
        return match r.answer.clone() {
            TokenAnswer::Token { expires_in } => {
                let mut answer =
                    json!({"access_token": format!("tok-{n}"), "token_type": "Bearer"});
                if let Some(e) = expires_in {
                    answer["expires_in"] = e;
                }
                axum::Json(answer).into_response()
            }
            TokenAnswer::Fixed {
                status,
                body,
                retry_after,
            } => {
                let mut resp = (StatusCode::from_u16(status).unwrap(), body).into_response();
                if let Some(ra) = retry_after {
                    resp.headers_mut()
                        .insert("retry-after", ra.parse().unwrap());
                }
                resp
            }
        };
    }
    StatusCode::NOT_FOUND.into_response()
}

// ---------------------------------------------------------------------------------------------
// The three methods against the fake source
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn client_secret_basic_token_is_accepted() {
    // Characters RFC 6749 §2.3.1 form-encodes before base64: a client that skips that fails.
    let secret = "s3:cr+et%/ü &x";
    let source = fake(AuthConfig::client_secret_basic(CLIENT, secret)).await;
    let a = auth(
        &source.base_url(),
        &spec(Some(AuthMethod::ClientSecretBasic), true, false),
        Some(secret),
        None,
    );
    let t = token(&a).await;
    assert_eq!(kickoff_status(&source, &t).await, 202);
    let stats = source.auth_stats();
    assert_eq!(stats.methods_used, vec![FakeMethod::ClientSecretBasic]);
    assert_eq!(stats.last_requested_scope.as_deref(), Some(SCOPES));
    assert_eq!(t.granted_scope(), Some(SCOPES));
    assert!(t.header_value().starts_with("Bearer "));
}

#[tokio::test]
async fn client_secret_post_token_is_accepted() {
    let secret = "post secret & more=";
    let source = fake(AuthConfig::client_secret_post(CLIENT, secret)).await;
    let a = auth(
        &source.base_url(),
        &spec(Some(AuthMethod::ClientSecretPost), true, false),
        Some(secret),
        None,
    );
    let t = token(&a).await;
    assert_eq!(kickoff_status(&source, &t).await, 202);
    assert_eq!(
        source.auth_stats().methods_used,
        vec![FakeMethod::ClientSecretPost]
    );
}

#[tokio::test]
async fn private_key_jwt_with_rsa_and_ec_keys_in_jwk_and_pem_forms() {
    let rsa = TestKey::rsa().unwrap();
    let ec = TestKey::ec().unwrap();
    let source = fake(AuthConfig::private_key_jwt(CLIENT, &[&rsa, &ec])).await;
    let jwt = spec(Some(AuthMethod::PrivateKeyJwt), false, true);
    let jwks = json!({"keys": [rsa.public_jwk, rsa.private_jwk, ec.public_jwk]}).to_string();
    let cases: Vec<(&str, AuthSpec, String)> = vec![
        ("RSA JWK", jwt.clone(), rsa.private_jwk.to_string()),
        ("EC JWK", jwt.clone(), ec.private_jwk.to_string()),
        ("RSA JWKS (only private key)", jwt.clone(), jwks.clone()),
        (
            "RSA PKCS#8 PEM",
            with_key_id(jwt.clone(), &rsa.kid),
            rsa.private_pem.clone(),
        ),
        (
            "RSA PKCS#1 PEM",
            with_key_id(jwt.clone(), &rsa.kid),
            RSA_1_PKCS1_PEM.to_string(),
        ),
        (
            "EC PKCS#8 PEM",
            with_key_id(jwt.clone(), &ec.kid),
            ec.private_pem.clone(),
        ),
        (
            "EC SEC1 PEM",
            with_key_id(jwt.clone(), &ec.kid),
            EC_1_SEC1_PEM.to_string(),
        ),
        (
            "EC PEM on one line with \\n escapes",
            with_key_id(jwt.clone(), &ec.kid),
            pem_one_line(&ec.private_pem),
        ),
        (
            "RSA PEM with an explicit RS384",
            AuthSpec {
                signing_algorithm: Some(SigningAlgorithm::RS384),
                ..with_key_id(jwt.clone(), &rsa.kid)
            },
            rsa.private_pem.clone(),
        ),
    ];
    for (i, (what, s, key)) in cases.iter().enumerate() {
        let a = auth(&source.base_url(), s, None, Some(key));
        let t = a
            .token(now_ms())
            .await
            .unwrap_or_else(|f| panic!("{what}: {f}"))
            .unwrap();
        assert_eq!(kickoff_status(&source, &t).await, 202, "{what}");
        let stats = source.auth_stats();
        assert_eq!(stats.tokens_issued, i as u64 + 1, "{what}");
        assert_eq!(stats.methods_used.last(), Some(&FakeMethod::PrivateKeyJwt));
    }
}

#[tokio::test]
async fn assertion_has_the_smart_header_and_claims() {
    let rec = RecorderHandle::start(Some(&["private_key_jwt"])).await;
    for key in [TestKey::rsa().unwrap(), TestKey::ec().unwrap()] {
        let a = auth(
            &rec.base(),
            &spec(None, false, true),
            None,
            Some(&key.private_jwk.to_string()),
        );
        let now = 1_800_000_000_123;
        a.token(now).await.unwrap().unwrap();
        let (authorization, form) = rec.requests().pop().unwrap();
        assert_eq!(authorization, None);
        let field = |k: &str| {
            form.iter()
                .find(|(name, _)| name == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(field("grant_type").as_deref(), Some("client_credentials"));
        assert_eq!(field("scope").as_deref(), Some(SCOPES));
        assert_eq!(field("client_assertion_type").as_deref(), Some(JWT_BEARER));
        assert_eq!(field("client_secret"), None);
        let assertion = field("client_assertion").unwrap();
        let parts: Vec<&str> = assertion.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = decode_part(parts[0]);
        assert_eq!(header["alg"], key.alg.as_str());
        assert_eq!(header["kid"], key.kid.as_str());
        assert_eq!(header["typ"], "JWT");
        let claims = decode_part(parts[1]);
        assert_eq!(claims["iss"], CLIENT);
        assert_eq!(claims["sub"], CLIENT);
        assert_eq!(claims["aud"], rec.token_url().as_str());
        assert_eq!(claims["iat"], 1_800_000_000u64);
        let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
        assert!(lifetime > 0 && lifetime <= 300, "exp {lifetime} s ahead");
        assert!(!claims["jti"].as_str().unwrap().is_empty());
        // The signature verifies with the registered public key.
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.public_jwk.clone()).unwrap();
        pathling_import_tests::keys::ensure_crypto_provider();
        let mut validation = jsonwebtoken::Validation::new(match key.alg.as_str() {
            "RS384" => jsonwebtoken::Algorithm::RS384,
            _ => jsonwebtoken::Algorithm::ES384,
        });
        validation.set_audience(&[rec.token_url()]);
        validation.validate_exp = false;
        jsonwebtoken::decode::<Value>(
            &assertion,
            &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
            &validation,
        )
        .unwrap();
    }
}

#[tokio::test]
async fn two_assertions_never_share_a_jti() {
    // Wire level: the same clock reading must still give distinct jtis.
    let rec = RecorderHandle::start(Some(&["private_key_jwt"])).await;
    let ec = TestKey::ec().unwrap();
    let a = auth(
        &rec.base(),
        &spec(None, false, true),
        None,
        Some(&ec.private_jwk.to_string()),
    );
    let now = now_ms();
    for _ in 0..20 {
        let t = a.token(now).await.unwrap().unwrap();
        a.invalidate(&t).await;
    }
    let jtis: HashSet<String> = rec
        .assertions()
        .iter()
        .map(|a| {
            decode_part(a.split('.').nth(1).unwrap())["jti"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(jtis.len(), 20);

    // Server level: the fake refuses a replayed jti, so repeated authentication must succeed.
    let rsa = TestKey::rsa().unwrap();
    let source = fake(AuthConfig::private_key_jwt(CLIENT, &[&rsa])).await;
    let a = auth(
        &source.base_url(),
        &spec(None, false, true),
        None,
        Some(&rsa.private_jwk.to_string()),
    );
    for _ in 0..3 {
        let t = a.token(now).await.unwrap().unwrap();
        a.invalidate(&t).await;
    }
    assert_eq!(source.auth_stats().tokens_issued, 3);
    assert_eq!(source.auth_stats().token_failures, 0);
}

#[tokio::test]
async fn unregistered_key_is_refused_with_the_servers_reason() {
    let rsa = TestKey::rsa().unwrap();
    let other = TestKey::rsa_alternate().unwrap();
    let source = fake(AuthConfig::private_key_jwt(CLIENT, &[&rsa])).await;
    let a = auth(
        &source.base_url(),
        &spec(None, false, true),
        None,
        Some(&other.private_jwk.to_string()),
    );
    let f = a.token(now_ms()).await.unwrap_err();
    assert_eq!(f.status(), Some(400));
    assert!(f.message.starts_with("source token endpoint:"), "{f}");
    assert!(f.message.contains("invalid_client"), "{f}");
    assert!(f.message.contains("unknown kid"), "{f}");
}

// ---------------------------------------------------------------------------------------------
// Method choice
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn method_is_chosen_from_discovery_when_unset() {
    let rsa = TestKey::rsa().unwrap();
    let secret = "the secret";

    // Key and secret configured, server offers private_key_jwt: the key wins.
    let source = fake(
        AuthConfig::private_key_jwt(CLIENT, &[&rsa])
            .with_secret(secret)
            .with_methods(&[FakeMethod::ClientSecretBasic, FakeMethod::PrivateKeyJwt]),
    )
    .await;
    let a = auth(
        &source.base_url(),
        &spec(None, true, true),
        Some(secret),
        Some(&rsa.private_jwk.to_string()),
    );
    let t = token(&a).await;
    assert_eq!(kickoff_status(&source, &t).await, 202);
    assert_eq!(
        source.auth_stats().methods_used,
        vec![FakeMethod::PrivateKeyJwt]
    );

    // Only a secret, server offers both secret methods: Basic, the original's default.
    let source = fake(
        AuthConfig::client_secret_basic(CLIENT, secret)
            .with_methods(&[FakeMethod::ClientSecretPost, FakeMethod::ClientSecretBasic]),
    )
    .await;
    let a = auth(
        &source.base_url(),
        &spec(None, true, false),
        Some(secret),
        None,
    );
    token(&a).await;
    assert_eq!(
        source.auth_stats().methods_used,
        vec![FakeMethod::ClientSecretBasic]
    );

    // Only a secret, server offers only post.
    let source = fake(AuthConfig::client_secret_post(CLIENT, secret)).await;
    let a = auth(
        &source.base_url(),
        &spec(None, true, false),
        Some(secret),
        None,
    );
    let t = token(&a).await;
    assert_eq!(kickoff_status(&source, &t).await, 202);
    assert_eq!(
        source.auth_stats().methods_used,
        vec![FakeMethod::ClientSecretPost]
    );

    // Only a secret, server offers only private_key_jwt: a clear, permanent error and no
    // token request.
    let source = fake(AuthConfig::private_key_jwt(CLIENT, &[&rsa])).await;
    let a = auth(
        &source.base_url(),
        &spec(None, true, false),
        Some(secret),
        None,
    );
    let f = a.token(now_ms()).await.unwrap_err();
    assert_eq!(f.kind, FailureKind::Local);
    assert!(f.message.contains("private_key_jwt"), "{f}");
    assert!(f.message.contains("only a client secret"), "{f}");
    assert_eq!(source.auth_stats().token_requests, 0);
}

#[tokio::test]
async fn without_a_methods_list_a_secret_uses_form_encoded_basic() {
    let rec = RecorderHandle::start(None).await;
    let a = Authenticator::new(
        builder(),
        &format!("{}/", rec.base()),
        &AuthSpec {
            client_id: Some("client:id".into()),
            ..spec(None, true, false)
        },
        Some(Secret::new("p@ss word+")),
        None,
        Side::Target,
    )
    .unwrap();
    a.token(now_ms()).await.unwrap().unwrap();
    let (authorization, form) = rec.requests().pop().unwrap();
    let expected = format!("Basic {}", STANDARD.encode("client%3Aid:p%40ss+word%2B"));
    assert_eq!(authorization.as_deref(), Some(expected.as_str()));
    assert!(form
        .iter()
        .all(|(k, _)| k != "client_secret" && k != "client_id"));
    // A base URL ending in `/` gives no double slash.
    assert_eq!(
        rec.0.lock().unwrap().discovery_paths,
        vec!["/fhir/.well-known/smart-configuration".to_string()]
    );
}

// ---------------------------------------------------------------------------------------------
// Caching, refresh, invalidation
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn token_is_cached_and_concurrent_callers_share_one_request() {
    let secret = "cache";
    let source = fake(AuthConfig::client_secret_basic(CLIENT, secret)).await;
    let a = Arc::new(auth(
        &source.base_url(),
        &spec(None, true, false),
        Some(secret),
        None,
    ));
    let first = token(&a).await;
    for _ in 0..20 {
        assert_eq!(token(&a).await, first);
    }
    assert_eq!(source.auth_stats().token_requests, 1);

    // A slow token endpoint and many callers at once after an invalidation: still one request.
    source.update(|c| c.latency = Duration::from_millis(200));
    a.invalidate(&first).await;
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let a = a.clone();
            tokio::spawn(async move { token(&a).await })
        })
        .collect();
    let mut tokens = Vec::new();
    for c in calls {
        tokens.push(c.await.unwrap());
    }
    assert!(tokens.iter().all(|t| *t == tokens[0] && *t != first));
    assert_eq!(source.auth_stats().token_requests, 2);
}

#[tokio::test]
async fn token_is_refreshed_near_expiry() {
    let secret = "refresh";
    let source = fake(
        AuthConfig::client_secret_basic(CLIENT, secret)
            .with_token_lifetime(Duration::from_secs(10)),
    )
    .await;
    let a = auth(
        &source.base_url(),
        &spec(None, true, false),
        Some(secret),
        None,
    );
    let t0 = now_ms();
    let first = a.token(t0).await.unwrap().unwrap();
    assert_eq!(first.expires_at_unix_ms(), t0 + 10_000);
    // A fifth of a 10 s lifetime is the margin: reused until 8 s, replaced after.
    assert_eq!(a.token(t0 + 7_900).await.unwrap().unwrap(), first);
    assert_eq!(source.auth_stats().token_requests, 1);
    let second = a.token(t0 + 8_100).await.unwrap().unwrap();
    assert_ne!(second, first);
    assert_eq!(source.auth_stats().token_requests, 2);
    assert_eq!(kickoff_status(&source, &second).await, 202);

    // With the real clock: a 2 s token is replaced before the server would refuse it.
    source.update(|c| {
        if let Some(auth) = c.auth.as_mut() {
            auth.token_lifetime = Duration::from_secs(2);
        }
    });
    a.invalidate(&second).await;
    let short = token(&a).await;
    // The scenario's own wait: the token's real lifetime (2 s) passes.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let fresh = token(&a).await;
    assert_ne!(fresh, short);
    assert_eq!(kickoff_status(&source, &fresh).await, 202);
    assert_eq!(source.auth_stats().expired_tokens_presented, 0);
}

#[tokio::test]
async fn long_tokens_are_refreshed_thirty_seconds_early_and_expires_in_defaults_to_300() {
    let rec = RecorderHandle::start(Some(&["client_secret_post"])).await;
    rec.set(|r| r.answer = TokenAnswer::Token { expires_in: None });
    let a = auth(&rec.base(), &spec(None, true, false), Some("x"), None);
    let t0 = 1_800_000_000_000;
    let first = a.token(t0).await.unwrap().unwrap();
    assert_eq!(first.expires_at_unix_ms(), t0 + 300_000);
    assert_eq!(a.token(t0 + 269_000).await.unwrap().unwrap(), first);
    assert_ne!(a.token(t0 + 271_000).await.unwrap().unwrap(), first);

    // A quoted expires_in, as some servers send it.
    rec.set(|r| {
        r.answer = TokenAnswer::Token {
            expires_in: Some(json!("3600")),
        }
    });
    let t = a.token(t0 + 600_000).await.unwrap().unwrap();
    assert_eq!(t.expires_at_unix_ms(), t0 + 600_000 + 3_600_000);
}

#[tokio::test]
async fn a_failed_early_refresh_keeps_the_unexpired_token() {
    let rec = RecorderHandle::start(Some(&["client_secret_basic"])).await;
    let a = auth(&rec.base(), &spec(None, true, false), Some("x"), None);
    let t0 = 1_800_000_000_000;
    let first = a.token(t0).await.unwrap().unwrap();
    rec.set(|r| {
        r.answer = TokenAnswer::Fixed {
            status: 503,
            body: String::new(),
            retry_after: None,
        }
    });
    // Inside the refresh margin: the refresh fails, the old token still works.
    assert_eq!(a.token(t0 + 280_000).await.unwrap().unwrap(), first);
    assert_eq!(rec.requests().len(), 2);
    // Past its expiry there is nothing to fall back on.
    let f = a.token(t0 + 300_000).await.unwrap_err();
    assert_eq!(f.status(), Some(503));
    rec.set(|r| r.answer = TokenAnswer::Token { expires_in: None });
    assert_ne!(a.token(t0 + 301_000).await.unwrap().unwrap(), first);
}

#[tokio::test]
async fn invalidate_triggers_reauthentication() {
    let secret = "inv";
    let source = fake(AuthConfig::client_secret_post(CLIENT, secret)).await;
    let a = auth(
        &source.base_url(),
        &spec(None, true, false),
        Some(secret),
        None,
    );
    let first = token(&a).await;
    source.revoke_tokens();
    assert_eq!(kickoff_status(&source, &first).await, 401);
    a.invalidate(&first).await;
    let second = token(&a).await;
    assert_ne!(second, first);
    assert_eq!(kickoff_status(&source, &second).await, 202);
    assert_eq!(source.auth_stats().token_requests, 2);

    // A late 401 for the old token does not throw away the new one.
    a.invalidate(&first).await;
    assert_eq!(token(&a).await, second);
    assert_eq!(source.auth_stats().token_requests, 2);
}

// ---------------------------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn wrong_secret_fails_with_the_servers_error_and_never_the_secret() {
    let source = fake(
        AuthConfig::client_secret_basic(CLIENT, "right")
            .with_methods(&[FakeMethod::ClientSecretBasic, FakeMethod::ClientSecretPost]),
    )
    .await;
    let wrong = "wr0ng-s3cret";
    for (method, status) in [
        (AuthMethod::ClientSecretBasic, 401),
        (AuthMethod::ClientSecretPost, 400),
    ] {
        let a = auth(
            &source.base_url(),
            &spec(Some(method), true, false),
            Some(wrong),
            None,
        );
        let f = a.token(now_ms()).await.unwrap_err();
        assert_eq!(f.status(), Some(status), "{f}");
        assert!(f.message.starts_with("source token endpoint:"), "{f}");
        assert!(f.message.contains("invalid_client"), "{f}");
        assert!(f.message.contains("wrong secret"), "{f}");
        for shown in [f.to_string(), format!("{f:?}")] {
            assert!(!shown.contains(wrong), "{shown}");
        }
    }
}

#[tokio::test]
async fn error_answers_become_failure_facts() {
    let rec = RecorderHandle::start(Some(&["client_secret_post"])).await;
    let secret = "echo-me-not";
    let a = Authenticator::new(
        builder(),
        &rec.base(),
        &spec(None, true, false),
        Some(Secret::new(secret)),
        None,
        Side::Target,
    )
    .unwrap();

    // A server that echoes the secret in its description: scrubbed.
    rec.set(|r| {
        r.answer = TokenAnswer::Fixed {
            status: 400,
            body: json!({"error": "invalid_client", "error_description": format!("bad secret {secret}")})
                .to_string(),
            retry_after: None,
        }
    });
    let f = a.token(now_ms()).await.unwrap_err();
    assert_eq!(f.status(), Some(400));
    assert!(f.message.starts_with("target token endpoint:"), "{f}");
    assert!(f.message.contains("invalid_client: bad secret ***"), "{f}");
    assert!(!f.message.contains(secret));

    // Overloaded: status and Retry-After are kept for the core's retry decision.
    rec.set(|r| {
        r.answer = TokenAnswer::Fixed {
            status: 503,
            body: "<html>busy</html>".into(),
            retry_after: Some("7".into()),
        }
    });
    let f = a.token(now_ms()).await.unwrap_err();
    assert_eq!(f.status(), Some(503));
    assert_eq!(f.retry_after.as_deref(), Some("7"));

    // A success that is not JSON, or has no token.
    for body in ["<html>login</html>", "{\"token_type\":\"bearer\"}"] {
        rec.set(|r| {
            r.answer = TokenAnswer::Fixed {
                status: 200,
                body: body.into(),
                retry_after: None,
            }
        });
        let f = a.token(now_ms()).await.unwrap_err();
        assert_eq!(f.kind, FailureKind::Undecodable, "{f}");
    }

    // Nothing listening: a refused connection (retried only a few times, then the cause).
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let a = auth(
        &format!("http://{closed}/fhir"),
        &spec(None, true, false),
        Some(secret),
        None,
    );
    let f = a.token(now_ms()).await.unwrap_err();
    assert_eq!(f.kind, FailureKind::Refused, "{f}");

    // A server that does not answer in time: a timeout.
    rec.set(|r| r.discovery_delay = Duration::from_secs(3));
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300));
    let a = Authenticator::new(
        impatient,
        &rec.base(),
        &spec(None, true, false),
        Some(Secret::new(secret)),
        None,
        Side::Source,
    )
    .unwrap();
    let f = a.token(now_ms()).await.unwrap_err();
    assert_eq!(f.kind, FailureKind::Timeout, "{f}");
}

#[tokio::test]
async fn discovery_without_smart_support_is_explained() {
    let source = FakeSource::start(SourceConfig::default()).await.unwrap();
    let a = auth(
        &source.base_url(),
        &spec(None, true, false),
        Some("x"),
        None,
    );
    let f = a.token(now_ms()).await.unwrap_err();
    assert_eq!(f.status(), Some(404), "{f}");
    assert!(f.message.contains("smart-configuration"), "{f}");
}

// ---------------------------------------------------------------------------------------------
// Setup and redaction
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn disabled_auth_gives_no_token() {
    let a = Authenticator::new(
        builder(),
        "http://127.0.0.1:9/fhir",
        &AuthSpec::disabled(),
        None,
        None,
        Side::Source,
    )
    .unwrap();
    assert!(!a.enabled());
    assert!(a.token(now_ms()).await.unwrap().is_none());
}

#[test]
fn setup_errors_name_the_config_key_and_hide_the_value() {
    let rsa = TestKey::rsa().unwrap();
    let ec = TestKey::ec().unwrap();
    let base = "https://fhir.example.org/fhir";
    let new = |s: &AuthSpec, secret: Option<&str>, key: Option<&str>| {
        Authenticator::new(
            builder(),
            base,
            s,
            secret.map(Secret::new),
            key.map(Secret::new),
            Side::Source,
        )
        .unwrap_err()
    };
    let jwt = spec(None, false, true);

    let e = new(&jwt, None, Some("not-a-key-but-secret-text"));
    assert_eq!(e.key, "SOURCE_PRIVATE_KEY");
    assert!(!e.to_string().contains("secret-text"));

    let e = new(&jwt, None, Some(&rsa.private_pem));
    assert_eq!(e.key, "SOURCE_KEY_ID", "{e}");

    // A key that does not parse is reported as such, kid or no kid.
    let damaged = rsa.private_pem.replacen("MII", "MIX", 1);
    for s in [&jwt, &with_key_id(jwt.clone(), &rsa.kid)] {
        let e = new(s, None, Some(&damaged));
        assert_eq!(e.key, "SOURCE_PRIVATE_KEY", "{e}");
    }

    let e = new(&jwt, None, Some(&rsa.public_jwk.to_string()));
    assert_eq!(e.key, "SOURCE_PRIVATE_KEY");
    assert!(e.message.contains("public"), "{e}");

    let es_with_rsa = AuthSpec {
        signing_algorithm: Some(SigningAlgorithm::ES384),
        ..with_key_id(jwt.clone(), "k")
    };
    let e = new(&es_with_rsa, None, Some(&rsa.private_pem));
    assert_eq!(e.key, "SOURCE_SIGNING_ALGORITHM", "{e}");

    let e = new(
        &with_key_id(jwt.clone(), "other"),
        None,
        Some(&ec.private_jwk.to_string()),
    );
    assert_eq!(e.key, "SOURCE_KEY_ID", "{e}");

    let e = new(
        &spec(Some(AuthMethod::ClientSecretBasic), false, false),
        None,
        None,
    );
    assert_eq!(e.key, "SOURCE_CLIENT_SECRET");

    let e = new(
        &spec(Some(AuthMethod::PrivateKeyJwt), true, false),
        Some("s"),
        None,
    );
    assert_eq!(e.key, "SOURCE_PRIVATE_KEY");

    // A JSON configuration file's key names are echoed in its own style.
    let camel = AuthSpec {
        private_key: config_ref("sourcePrivateKey"),
        ..jwt.clone()
    };
    let e = new(&camel, None, Some(&ec.private_pem));
    assert_eq!(e.key, "sourceKeyId");

    // Every message, whatever the failure, stays free of key material.
    let d = ec.private_jwk["d"].as_str().unwrap();
    let broken = ec.private_jwk.to_string().replace("P-384", "P-256");
    let e = new(&jwt, None, Some(&broken));
    assert!(!e.to_string().contains(d), "{e}");
    assert!(e.message.contains("P-384"), "{e}");
}

#[tokio::test]
async fn debug_output_never_shows_secrets_keys_or_tokens() {
    let rsa = TestKey::rsa().unwrap();
    let secret = "debug-secret-value";
    let source = fake(
        AuthConfig::private_key_jwt(CLIENT, &[&rsa])
            .with_secret(secret)
            .with_methods(&[FakeMethod::ClientSecretBasic]),
    )
    .await;
    let a = auth(
        &source.base_url(),
        &spec(None, true, true),
        Some(secret),
        Some(&rsa.private_jwk.to_string()),
    );
    let t = token(&a).await;
    let raw = t.header_value()["Bearer ".len()..].to_string();
    let shown = format!("{a:?} {t:?} {:#?}", a);
    assert!(!shown.contains(secret), "{shown}");
    assert!(!shown.contains(&raw), "{shown}");
    for part in ["d", "p", "q", "dp", "dq", "qi"] {
        let v = rsa.private_jwk[part].as_str().unwrap();
        assert!(!shown.contains(&v[..16]), "{part} leaked");
    }
    assert!(shown.contains(CLIENT) && shown.contains(&rsa.kid));
}

// ---------------------------------------------------------------------------------------------
// Redirects and plain http
// ---------------------------------------------------------------------------------------------

/// Messages and `Debug` output that must not show `secrets`.
fn assert_hidden(shown: &[String], secrets: &[&str]) {
    for text in shown {
        for secret in secrets {
            assert!(!text.contains(secret), "{secret:?} in {text}");
        }
    }
}

#[tokio::test]
async fn token_endpoint_redirects_are_never_followed() {
    // A 307 or 308 would have the client re-send its form body (secret or assertion) to the
    // Location; the recording server there must see nothing.
    let elsewhere = RecorderHandle::start(Some(&["client_secret_post", "private_key_jwt"])).await;
    let secret = "s3cr3t-redirect-7Qx";
    let rsa = TestKey::rsa().unwrap();
    let location = format!("{}/steal/token?keep=private-query", elsewhere.base());
    for status in [307u16, 308] {
        let cases = [
            (
                AuthConfig::client_secret_post(CLIENT, secret),
                spec(None, true, false),
                Some(secret),
                None,
            ),
            (
                AuthConfig::private_key_jwt(CLIENT, &[&rsa]),
                spec(None, false, true),
                None,
                Some(rsa.private_jwk.to_string()),
            ),
        ];
        for (config, s, secret_value, key) in cases {
            let source = fake(config.with_token_redirect(status, &location)).await;
            // Even a caller whose settings ask for redirects gets none.
            let a = Authenticator::new(
                builder().redirect(reqwest::redirect::Policy::limited(10)),
                &source.base_url(),
                &s,
                secret_value.map(Secret::new),
                key.clone().map(Secret::new),
                Side::Source,
            )
            .unwrap();
            let f = a.token(now_ms()).await.unwrap_err();
            assert_eq!(f.status(), Some(status), "{f}");
            assert_eq!(
                f.message,
                format!(
                    "source token endpoint: answered {status} redirect to http://127.0.0.1:{}; \
                     redirects are never followed for token requests",
                    elsewhere.port()
                )
            );
            assert_eq!(
                pathling_import_core::retry::classify(&f),
                pathling_import_core::retry::Verdict::Permanent
            );
            assert_eq!(source.auth_stats().token_requests, 1);
            let d = rsa.private_jwk["d"].as_str().unwrap();
            assert_hidden(
                &[f.to_string(), format!("{f:?}"), format!("{a:?}")],
                &[secret, &d[..16], "steal", "private-query"],
            );
        }
    }
    assert_eq!(elsewhere.seen(), Vec::<String>::new());
}

#[tokio::test]
async fn discovery_redirects_are_never_followed() {
    let rec = RecorderHandle::start(Some(&["client_secret_basic"])).await;
    let elsewhere = RecorderHandle::start(Some(&["client_secret_basic"])).await;
    let secret = "s3cr3t-discovery-9Wv";
    rec.set(|r| {
        r.discovery_redirect = Some((
            302,
            format!("{}/.well-known/smart-configuration", elsewhere.base()),
        ))
    });
    let a = auth(&rec.base(), &spec(None, true, false), Some(secret), None);
    let f = a.token(now_ms()).await.unwrap_err();
    assert_eq!(f.status(), Some(302), "{f}");
    assert!(
        f.message.ends_with(&format!(
            "answered 302 redirect to http://127.0.0.1:{}; redirects are never followed for SMART \
             discovery",
            elsewhere.port()
        )),
        "{f}"
    );
    assert!(elsewhere.seen().is_empty());
    assert!(rec.requests().is_empty());

    // A relative Location is resolved, and still only its origin is named.
    rec.set(|r| r.discovery_redirect = Some((301, "/moved/here?ticket=abc".into())));
    let f = a.token(now_ms()).await.unwrap_err();
    assert_eq!(f.status(), Some(301), "{f}");
    assert!(
        f.message
            .contains(&format!("redirect to http://127.0.0.1:{};", rec.port())),
        "{f}"
    );
    assert!(
        !f.message.contains("moved") && !f.message.contains("ticket"),
        "{f}"
    );
    assert_hidden(
        &[f.to_string(), format!("{f:?}"), format!("{a:?}")],
        &[secret],
    );
    assert_eq!(rec.seen().len(), 2);
}

#[tokio::test]
async fn a_plain_http_token_endpoint_off_this_machine_needs_allow_insecure() {
    let rec = RecorderHandle::start(Some(&["client_secret_post"])).await;
    // A name that is not loopback, resolved to the recorder so that an allowed request lands
    // there (and a refused one provably did not).
    let endpoint = format!("http://token.invalid:{}/auth/token", rec.port());
    rec.set(|r| r.token_endpoint = Some(endpoint.clone()));
    let resolving = || builder().resolve("token.invalid", "127.0.0.1:0".parse().unwrap());
    let secret = "s3cr3t-insecure-4Jd";
    for side in [Side::Source, Side::Target] {
        let a = Authenticator::new(
            resolving(),
            &rec.base(),
            &spec(None, true, false),
            Some(Secret::new(secret)),
            None,
            side,
        )
        .unwrap();
        let f = a.token(now_ms()).await.unwrap_err();
        assert_eq!(f.kind, FailureKind::Local, "{f}");
        let (word, prefix) = match side {
            Side::Source => ("source", "SOURCE"),
            Side::Target => ("target", "TARGET"),
        };
        assert_eq!(
            f.message,
            format!(
                "{word} SMART discovery: token_endpoint {endpoint} is not https; set \
                 {prefix}_ALLOW_INSECURE_AUTH=true to allow it"
            )
        );
        assert_hidden(
            &[f.to_string(), format!("{f:?}"), format!("{a:?}")],
            &[secret],
        );
    }
    // Refused before any token request: the server saw discovery only.
    assert!(rec.requests().is_empty());
    assert!(rec
        .seen()
        .iter()
        .all(|r| r == "GET /fhir/.well-known/smart-configuration"));

    let allowed = Authenticator::new(
        resolving(),
        &rec.base(),
        &AuthSpec {
            allow_insecure: true,
            ..spec(None, true, false)
        },
        Some(Secret::new(secret)),
        None,
        Side::Source,
    )
    .unwrap();
    allowed.token(now_ms()).await.unwrap().unwrap();
    assert_eq!(rec.requests().len(), 1);
    assert!(format!("{allowed:?}").contains("allow_insecure: true"));
}

#[tokio::test]
async fn an_https_base_naming_an_http_token_endpoint_is_refused_before_any_token_request() {
    let ca = tls::private_ca();
    let rec = RecorderHandle::start_tls(Some(&["client_secret_post"]), &ca.identity).await;
    // Where the downgraded document sends the secret: plain http, on this machine (so the
    // loopback exception for test machines would let it through).
    let plain = RecorderHandle::start(Some(&["client_secret_post"])).await;
    rec.set(|r| r.token_endpoint = Some(plain.token_url()));
    let trusting = || {
        builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.ca_pem.as_bytes()).unwrap())
    };
    let secret = "s3cr3t-downgrade-8Tz";
    let a = Authenticator::new(
        trusting(),
        &rec.base(),
        &spec(None, true, false),
        Some(Secret::new(secret)),
        None,
        Side::Source,
    )
    .unwrap();
    assert!(rec.base().starts_with("https://127.0.0.1:"));
    let f = a.token(now_ms()).await.unwrap_err();
    assert_eq!(f.kind, FailureKind::Local, "{f}");
    assert_eq!(
        f.message,
        format!(
            "source SMART discovery: token_endpoint {} is not https although the server's base \
             URL is (a downgrade); set SOURCE_ALLOW_INSECURE_AUTH=true to allow it",
            plain.token_url()
        )
    );
    assert_eq!(
        rec.seen(),
        ["GET /fhir/.well-known/smart-configuration"],
        "discovery over https, and nothing else"
    );
    assert!(plain.seen().is_empty(), "{:?}", plain.seen());
    assert_hidden(
        &[f.to_string(), format!("{f:?}"), format!("{a:?}")],
        &[secret],
    );

    // The same server naming its own https token endpoint: the secret goes there.
    rec.set(|r| r.token_endpoint = None);
    let a = Authenticator::new(
        trusting(),
        &rec.base(),
        &spec(None, true, false),
        Some(Secret::new(secret)),
        None,
        Side::Source,
    )
    .unwrap();
    token(&a).await;
    assert_eq!(rec.requests().len(), 1);
    assert!(plain.seen().is_empty());
}
