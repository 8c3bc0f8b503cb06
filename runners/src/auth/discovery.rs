//! SMART discovery (`GET {base}/.well-known/smart-configuration`) and the rule for which token
//! endpoints a client secret or assertion may be sent to.

use pathling_import_core::retry::{Failure, FailureKind};
use reqwest::header::ACCEPT;
use serde_json::Value;

use super::token::quote_body;
use super::{clip, exchange, Side};

/// What discovery yields.
#[derive(Clone, Debug)]
pub(super) struct Discovery {
    pub(super) token_endpoint: String,
    /// `None` when the document has no `token_endpoint_auth_methods_supported`.
    pub(super) methods: Option<Vec<String>>,
}

pub(super) fn discovery_url(base_url: &str) -> String {
    format!("{base_url}/.well-known/smart-configuration")
}

/// Fetches and checks the discovery document of `base_url` (no trailing slash).
pub(super) async fn discover(
    http: &reqwest::Client,
    base_url: &str,
    side: Side,
    allow_insecure: bool,
    allow_insecure_key: &str,
) -> Result<Discovery, Failure> {
    let url = discovery_url(base_url);
    let what = format!("{} SMART discovery ({url})", side.word());
    let request = http.get(&url).header(ACCEPT, "application/json");
    let (status, retry_after, body) = exchange(request, &what, "SMART discovery").await?;
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
    check_token_endpoint(base_url, token_endpoint, allow_insecure).map_err(|why| {
        Failure::new(
            FailureKind::Local,
            format!(
                "{} SMART discovery: token_endpoint {} {why}; set {allow_insecure_key}=true to \
                 allow it",
                side.word(),
                clip(token_endpoint),
            ),
        )
    })?;
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

/// Whether a client secret or assertion may be sent to `token_endpoint`, found through
/// `base_url`. `Err` says why not (completing "token_endpoint … ").
///
/// Plain http is allowed only on a test machine: both the base and the token endpoint on a
/// loopback address (the fakes and a local sandbox), or when the operator says so. In
/// particular, an https base whose discovery names an http endpoint (a downgrade, by a
/// misconfigured or tampered document) is refused.
pub(super) fn check_token_endpoint(
    base_url: &str,
    token_endpoint: &str,
    allow_insecure: bool,
) -> Result<(), &'static str> {
    let Ok(endpoint) = url::Url::parse(token_endpoint) else {
        return Err("is not a URL");
    };
    if endpoint.scheme() == "https" || allow_insecure {
        return Ok(());
    }
    let base = url::Url::parse(base_url).ok();
    if base.as_ref().is_some_and(|b| b.scheme() == "https") {
        return Err("is not https although the server's base URL is (a downgrade)");
    }
    if base.as_ref().is_some_and(is_loopback) && is_loopback(&endpoint) {
        return Ok(());
    }
    Err("is not https")
}

/// Whether the URL's host is this machine: `localhost`, 127.0.0.0/8 or `::1`.
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.trim_end_matches('.').eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

pub(super) fn is_http_url(text: &str) -> bool {
    url::Url::parse(text).is_ok_and(|u| {
        matches!(u.scheme(), "http" | "https") && u.host().is_some() && !u.cannot_be_a_base()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_endpoint_policy() {
        let loopback_bases = [
            "http://127.0.0.1:8080/fhir",
            "http://127.10.20.30/fhir",
            "http://localhost:9/fhir",
            "http://LOCALHOST./fhir",
            "http://[::1]:8080/fhir",
        ];
        let loopback_endpoints = [
            "http://127.0.0.1:8080/token",
            "http://127.0.0.2/token",
            "http://localhost/token",
            "http://[::1]/token",
        ];
        let remote_http_endpoints = [
            "http://token.invalid/token",
            "http://10.0.0.1/token",
            "http://[::2]/token",
            "http://localhost.example.org/token",
            "http://[::ffff:127.0.0.1]/token",
            "http://128.0.0.1/token",
        ];
        let remote_bases = [
            "http://fhir.example.org/fhir",
            "http://192.168.1.1/fhir",
            "https://fhir.example.org/fhir",
            "https://127.0.0.1/fhir",
        ];
        // https is always fine, from any base.
        for base in loopback_bases.iter().chain(&remote_bases) {
            assert_eq!(
                check_token_endpoint(base, "https://auth.example.org/token", false),
                Ok(()),
                "{base}"
            );
        }
        // http loopback to http loopback: a test machine.
        for base in loopback_bases {
            for endpoint in loopback_endpoints {
                assert_eq!(
                    check_token_endpoint(base, endpoint, false),
                    Ok(()),
                    "{base} {endpoint}"
                );
            }
            for endpoint in remote_http_endpoints {
                assert_eq!(
                    check_token_endpoint(base, endpoint, false),
                    Err("is not https"),
                    "{base} {endpoint}"
                );
            }
        }
        // A remote http base never makes http acceptable; an https base that points to http
        // is a downgrade.
        for base in remote_bases {
            for endpoint in loopback_endpoints.iter().chain(&remote_http_endpoints) {
                let verdict = check_token_endpoint(base, endpoint, false);
                assert!(verdict.is_err(), "{base} {endpoint}");
                assert_eq!(
                    verdict.is_err_and(|m| m.contains("downgrade")),
                    base.starts_with("https:"),
                    "{base} {endpoint}"
                );
                // The explicit setting allows all of them.
                assert_eq!(check_token_endpoint(base, endpoint, true), Ok(()));
            }
        }
    }
}
