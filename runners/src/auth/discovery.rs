//! SMART discovery (`GET {base}/.well-known/smart-configuration`).

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
) -> Result<Discovery, Failure> {
    let url = discovery_url(base_url);
    let what = format!("{} SMART discovery ({url})", side.word());
    let request = http.get(&url).header(ACCEPT, "application/json");
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

pub(super) fn is_http_url(text: &str) -> bool {
    url::Url::parse(text).is_ok_and(|u| {
        matches!(u.scheme(), "http" | "https") && u.host().is_some() && !u.cannot_be_a_base()
    })
}
