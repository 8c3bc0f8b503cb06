//! SMART Backend Services client assertions: a compact JWS (RFC 7515) over the claims SMART
//! requires, signed with RS384 (RSASSA-PKCS1-v1_5, SHA-384) or ES384 (ECDSA P-384, SHA-384,
//! in the fixed-size r‖s form JWS uses rather than DER).

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::RSA_PKCS1_SHA384;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::json;

use super::keys::{alg_name, KeyMaterial, SigningKey};

/// Client assertions live four minutes: SMART allows at most five, and the margin absorbs
/// clock skew between us and the server.
pub(super) const ASSERTION_LIFETIME_SECS: u64 = 240;

impl SigningKey {
    /// A compact JWS client assertion for `aud` (the token endpoint), valid from `now_ms`.
    pub(super) fn client_assertion(
        &self,
        client_id: &str,
        aud: &str,
        now_ms: u64,
    ) -> Result<String, String> {
        let header = json!({"alg": alg_name(self.alg), "kid": self.kid, "typ": "JWT"});
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
        let signature = sign(&self.material, signing_input.as_bytes())
            .map_err(|()| "signing the client assertion failed".to_string())?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}

/// The JWS signature of `input`. The algorithm follows from the key: a key is only ever
/// accepted together with the one algorithm it fits.
fn sign(material: &KeyMaterial, input: &[u8]) -> Result<Vec<u8>, ()> {
    let rng = SystemRandom::new();
    match material {
        KeyMaterial::Rsa(key) => {
            let mut signature = vec![0; key.public_modulus_len()];
            key.sign(&RSA_PKCS1_SHA384, &rng, input, &mut signature)
                .map_err(|_| ())?;
            Ok(signature)
        }
        KeyMaterial::Ec(key) => key
            .sign(&rng, input)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::keys::tests::{
        parse_fixture, EC_JWK, EC_PKCS8, EC_SEC1, RSA_JWK, RSA_PKCS1, RSA_PKCS8,
    };
    use aws_lc_rs::signature::{
        UnparsedPublicKey, VerificationAlgorithm, ECDSA_P384_SHA384_FIXED,
        RSA_PKCS1_2048_8192_SHA384,
    };
    use pathling_import_core::spec::SigningAlgorithm;
    use serde_json::Value;

    fn part(p: &str) -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
    }

    fn verifier(alg: SigningAlgorithm) -> &'static dyn VerificationAlgorithm {
        match alg {
            SigningAlgorithm::RS384 => &RSA_PKCS1_2048_8192_SHA384,
            SigningAlgorithm::ES384 => &ECDSA_P384_SHA384_FIXED,
        }
    }

    #[test]
    fn assertions_from_every_key_form_verify() {
        for (what, text) in [
            ("RSA PKCS#8", RSA_PKCS8),
            ("RSA PKCS#1", RSA_PKCS1),
            ("RSA JWK", RSA_JWK),
            ("EC PKCS#8", EC_PKCS8),
            ("EC SEC1", EC_SEC1),
            ("EC JWK", EC_JWK),
        ] {
            let key = parse_fixture(text);
            let jws = key
                .client_assertion("client", "https://auth.example/token", 1_800_000_000_999)
                .unwrap();
            let parts: Vec<&str> = jws.split('.').collect();
            assert_eq!(parts.len(), 3, "{what}");
            let header = part(parts[0]);
            assert_eq!(header["alg"], alg_name(key.alg), "{what}");
            assert_eq!(header["typ"], "JWT");
            assert_eq!(header["kid"], key.kid.as_str());
            let claims = part(parts[1]);
            assert_eq!(claims["aud"], "https://auth.example/token");
            assert_eq!(claims["iat"], 1_800_000_000u64);
            assert_eq!(claims["exp"], 1_800_000_000u64 + ASSERTION_LIFETIME_SECS);
            let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
            match key.alg {
                // JWS ES384 is r‖s, 48 bytes each, never DER.
                SigningAlgorithm::ES384 => assert_eq!(signature.len(), 96, "{what}"),
                SigningAlgorithm::RS384 => assert_eq!(signature.len(), 256, "{what}"),
            }
            let public = key.material.public_key_bytes();
            let signed = format!("{}.{}", parts[0], parts[1]);
            UnparsedPublicKey::new(verifier(key.alg), &public)
                .verify(signed.as_bytes(), &signature)
                .unwrap_or_else(|_| panic!("{what}: the signature does not verify"));
            // And it covers the input: a changed claim no longer verifies.
            let tampered = format!("{}.{}", parts[0], URL_SAFE_NO_PAD.encode("{}"));
            assert!(UnparsedPublicKey::new(verifier(key.alg), &public)
                .verify(tampered.as_bytes(), &signature)
                .is_err());
        }
    }
}
