//! The client credentials grant (RFC 6749 §4.4) with one of the three client authentication
//! methods, the reading of its answer, and the scrubbing of what the server echoes.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use pathling_import_core::retry::{Failure, FailureKind};
use pathling_import_core::spec::AuthMethod;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde_json::Value;

use super::discovery::Discovery;
use super::{clip, exchange, BearerToken, Credentials, Side, DEFAULT_EXPIRES_IN_SECS, JWT_BEARER};

/// `POST token_endpoint` and the token it answers.
pub(super) async fn request_token(
    http: &reqwest::Client,
    side: Side,
    client: &Credentials,
    discovery: &Discovery,
    now_ms: u64,
) -> Result<BearerToken, Failure> {
    let what = format!("{} token endpoint", side.word());
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
    let mut request = http
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
            crate::redact::token(&assertion);
            sensitive.push(assertion);
        }
    }
    let (status, retry_after, body) =
        exchange(request.body(form_body(&form)), &what, "token requests").await?;
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
    let answer: Value =
        serde_json::from_slice(&body).map_err(|_| undecodable("the token answer is not JSON"))?;
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

/// Picks the client authentication method (see the module contract).
pub(super) fn choose_method(
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

/// The body as quotable text, scrubbed of `sensitive`.
pub(super) fn quote_body(body: &[u8], sensitive: &[String]) -> String {
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
    let mut text = crate::redact::scrub(text);
    for s in sensitive.iter().filter(|s| !s.is_empty()) {
        text = text.replace(s.as_str(), "***");
    }
    clip(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
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
        let body = br#"{"error":"invalid_client","error_description":"got s3cr3t"}"#;
        assert_eq!(
            oauth_error_text(body, &list(&["s3cr3t"])),
            "invalid_client: got ***"
        );
        assert_eq!(quote_body(b"  s3cr3t  ", &list(&["s3cr3t"])), "***");
    }

    #[test]
    fn basic_credentials_are_form_encoded() {
        assert_eq!(form_encode("a b+c:d%"), "a+b%2Bc%3Ad%25");
    }
}
