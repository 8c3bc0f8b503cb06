//! One path for text that came from a server: before it reaches a result, a log line, a
//! persisted run or Sentry, every secret value the process holds is replaced by `***`.
//!
//! Servers echo what they were sent — a token endpoint quoting the client secret in its error,
//! a FHIR server quoting the bearer token in an OperationOutcome. Each secret is registered
//! once where it enters the process (configuration secrets, tokens as they are obtained), and
//! [`scrub`] is applied where facts leave the executor (`Executor::execute`, the preflight).

use std::sync::{OnceLock, RwLock};

/// Values shorter than this are not registered: replacing every "abc" in a message would
/// garble it, and such a value would not be a credential worth the name.
const MIN_LEN: usize = 6;
/// Tokens are short-lived; the most recent ones are enough to recognise an echo.
const MAX_TOKENS: usize = 64;

#[derive(Default)]
struct Registry {
    secrets: Vec<String>,
    tokens: std::collections::VecDeque<String>,
}

fn registry() -> &'static RwLock<Registry> {
    static REGISTRY: OnceLock<RwLock<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(|| RwLock::new(Registry::default()))
}

/// Registers a long-lived secret (a client secret, a private key, a DSN) and the forms it is
/// sent in.
pub fn secret(value: &str) {
    let value = value.trim();
    if value.len() < MIN_LEN {
        return;
    }
    let mut forms = vec![value.to_string()];
    let encoded: String = url::form_urlencoded::byte_serialize(value.as_bytes()).collect();
    if encoded != value {
        forms.push(encoded);
    }
    let mut r = registry().write().unwrap_or_else(|p| p.into_inner());
    for form in forms {
        if !r.secrets.contains(&form) {
            r.secrets.push(form);
        }
    }
}

/// Registers a short-lived credential (an access token, a client assertion).
pub fn token(value: &str) {
    if value.len() < MIN_LEN {
        return;
    }
    let mut r = registry().write().unwrap_or_else(|p| p.into_inner());
    if r.tokens.iter().any(|t| t == value) {
        return;
    }
    if r.tokens.len() >= MAX_TOKENS {
        r.tokens.pop_front();
    }
    r.tokens.push_back(value.to_string());
}

/// `text` with every registered value replaced by `***`.
pub fn scrub(text: &str) -> String {
    let r = registry().read().unwrap_or_else(|p| p.into_inner());
    let mut out = text.to_string();
    for value in r.secrets.iter().chain(r.tokens.iter()) {
        if out.contains(value.as_str()) {
            out = out.replace(value.as_str(), "***");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_values_and_their_encodings_are_replaced() {
        secret("redact-test s3cr3t+value");
        token("redact-test-token-abcdef");
        secret("abc");
        let text = scrub(
            "echo redact-test s3cr3t+value, redact-test+s3cr3t%2Bvalue and \
             Bearer redact-test-token-abcdef; abc stays",
        );
        assert_eq!(text, "echo ***, *** and Bearer ***; abc stays");
    }
}
