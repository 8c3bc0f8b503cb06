//! Test-only signing keys for SMART Backend Services (`private_key_jwt`) and a helper to sign
//! client assertions with them.
//!
//! RSA keys come from `tests/fixtures/keys/` because generating a 2048-bit RSA key in a debug
//! build takes seconds; P-384 keys are cheap and can also be generated fresh. Each [`TestKey`]
//! carries the private key as PKCS#8 PEM, the private key as a JWK (with `kid` and `alg`, the
//! form clients are usually configured with), and the public JWK a server registers.
//!
//! These keys protect nothing. Never use them outside tests.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p384::pkcs8::{EncodePrivateKey, LineEnding};
use rsa::pkcs8::DecodePrivateKey;
use rsa::traits::{PrivateKeyParts, PublicKeyParts};
use rsa::BigUint;
use serde_json::{json, Value};

const RSA_1: &str = include_str!("../fixtures/keys/rsa-test-1.pem");
const RSA_2: &str = include_str!("../fixtures/keys/rsa-test-2.pem");
const EC_1: &str = include_str!("../fixtures/keys/ec-p384-test-1.pem");

/// Errors from building or using a test key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The PEM could not be parsed or converted.
    #[error("invalid key: {0}")]
    Invalid(String),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// The two JWS algorithms SMART Backend Services clients must support.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// ECDSA P-384 with SHA-384.
    ES384,
}

impl KeyAlg {
    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlg::RS384 => "RS384",
            KeyAlg::ES384 => "ES384",
        }
    }

    fn jwt_alg(self) -> Algorithm {
        match self {
            KeyAlg::RS384 => Algorithm::RS384,
            KeyAlg::ES384 => Algorithm::ES384,
        }
    }
}

/// A private key with its identifiers, in the forms a client or a server needs.
#[derive(Clone, Debug)]
pub struct TestKey {
    /// Signing algorithm.
    pub alg: KeyAlg,
    /// Key id (`kid`), matched by the server against its JWKS.
    pub kid: String,
    /// The private key, PKCS#8 PEM.
    pub private_pem: String,
    /// The private key as a JWK including `kid` and `alg`.
    pub private_jwk: Value,
    /// The public key as a JWK including `kid`, `alg` and `use: sig` (register this).
    pub public_jwk: Value,
}

/// Makes sure `jsonwebtoken` has a crypto provider. When another crate of the workspace turns
/// on a second backend feature, the crate can no longer pick one by itself and would panic.
pub fn ensure_crypto_provider() {
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn b64_uint(n: &BigUint) -> String {
    b64(&n.to_bytes_be())
}

impl TestKey {
    /// The first fixed RS384 key (`kid` = `rsa-test-1`).
    pub fn rsa() -> Result<Self, KeyError> {
        Self::from_rsa_pem(RSA_1, "rsa-test-1")
    }

    /// A second fixed RS384 key (`kid` = `rsa-test-2`), e.g. as an unregistered key.
    pub fn rsa_alternate() -> Result<Self, KeyError> {
        Self::from_rsa_pem(RSA_2, "rsa-test-2")
    }

    /// The fixed ES384 key (`kid` = `ec-test-1`).
    pub fn ec() -> Result<Self, KeyError> {
        Self::from_ec_pem(EC_1, "ec-test-1")
    }

    /// A freshly generated ES384 key with a random `kid`.
    pub fn generate_ec() -> Result<Self, KeyError> {
        let secret = p384::SecretKey::random(&mut rand_core::OsRng);
        let pem = secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| KeyError::Invalid(e.to_string()))?;
        let kid = format!("ec-{}", uuid::Uuid::new_v4().simple());
        Self::from_ec_pem(pem.as_str(), &kid)
    }

    /// An RS384 key from a PKCS#8 PEM.
    pub fn from_rsa_pem(pem: &str, kid: &str) -> Result<Self, KeyError> {
        let key = rsa::RsaPrivateKey::from_pkcs8_pem(pem)
            .map_err(|e| KeyError::Invalid(e.to_string()))?;
        let primes = key.primes();
        let (p, q) = match primes {
            [p, q] => (p, q),
            _ => return Err(KeyError::Invalid("expected a two-prime RSA key".into())),
        };
        let one = BigUint::from(1u32);
        let d = key.d();
        // Fermat's little theorem gives q^-1 mod p, as p is prime; avoids signed big integers.
        let qi = q.modpow(&(p - BigUint::from(2u32)), p);
        let public_jwk = json!({
            "kty": "RSA", "kid": kid, "alg": "RS384", "use": "sig",
            "n": b64_uint(key.n()), "e": b64_uint(key.e()),
        });
        let mut private_jwk = public_jwk.clone();
        if let Some(obj) = private_jwk.as_object_mut() {
            obj.insert("d".into(), b64_uint(d).into());
            obj.insert("p".into(), b64_uint(p).into());
            obj.insert("q".into(), b64_uint(q).into());
            obj.insert("dp".into(), b64_uint(&(d % (p - &one))).into());
            obj.insert("dq".into(), b64_uint(&(d % (q - &one))).into());
            obj.insert("qi".into(), b64_uint(&qi).into());
        }
        Ok(Self {
            alg: KeyAlg::RS384,
            kid: kid.to_string(),
            private_pem: pem.to_string(),
            private_jwk,
            public_jwk,
        })
    }

    /// An ES384 key from a PKCS#8 PEM.
    pub fn from_ec_pem(pem: &str, kid: &str) -> Result<Self, KeyError> {
        use p384::pkcs8::DecodePrivateKey as _;
        let secret =
            p384::SecretKey::from_pkcs8_pem(pem).map_err(|e| KeyError::Invalid(e.to_string()))?;
        let mut private_jwk: Value = serde_json::from_str(secret.to_jwk_string().as_str())
            .map_err(|e| KeyError::Invalid(e.to_string()))?;
        let mut public_jwk: Value = serde_json::from_str(&secret.public_key().to_jwk_string())
            .map_err(|e| KeyError::Invalid(e.to_string()))?;
        for jwk in [&mut private_jwk, &mut public_jwk] {
            if let Some(obj) = jwk.as_object_mut() {
                obj.insert("kid".into(), kid.into());
                obj.insert("alg".into(), "ES384".into());
                obj.insert("use".into(), "sig".into());
            }
        }
        Ok(Self {
            alg: KeyAlg::ES384,
            kid: kid.to_string(),
            private_pem: pem.to_string(),
            private_jwk,
            public_jwk,
        })
    }

    /// The public key in `jsonwebtoken`'s JWK type.
    pub fn public_jwk_typed(&self) -> Result<Jwk, KeyError> {
        serde_json::from_value(self.public_jwk.clone())
            .map_err(|e| KeyError::Invalid(e.to_string()))
    }

    /// Signs arbitrary claims with this key (header `alg`, `kid`, `typ: JWT`). Use it to build
    /// deliberately broken assertions (wrong `aud`, far `exp`, reused `jti`).
    pub fn sign_claims(&self, claims: &Value) -> Result<String, KeyError> {
        ensure_crypto_provider();
        let key = match self.alg {
            KeyAlg::RS384 => EncodingKey::from_rsa_pem(self.private_pem.as_bytes())?,
            KeyAlg::ES384 => EncodingKey::from_ec_pem(self.private_pem.as_bytes())?,
        };
        let mut header = Header::new(self.alg.jwt_alg());
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        Ok(jsonwebtoken::encode(&header, claims, &key)?)
    }

    /// Signs a valid SMART Backend Services client assertion: `iss` = `sub` = client id,
    /// `aud` = token endpoint, `exp` four minutes ahead, a fresh `jti`.
    pub fn sign_client_assertion(
        &self,
        client_id: &str,
        token_endpoint: &str,
    ) -> Result<String, KeyError> {
        self.sign_claims(&assertion_claims(client_id, token_endpoint, 240))
    }
}

/// Claims of a client assertion expiring `exp_in_secs` from now, with a fresh `jti`.
pub fn assertion_claims(client_id: &str, token_endpoint: &str, exp_in_secs: i64) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    json!({
        "iss": client_id,
        "sub": client_id,
        "aud": token_endpoint,
        "exp": now + exp_in_secs,
        "iat": now,
        "jti": uuid::Uuid::new_v4().to_string(),
    })
}

/// A JWKS document (`{"keys": [...]}`) of the keys' public halves.
pub fn jwks(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.public_jwk.clone()).collect::<Vec<_>>()})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_keys_load_and_carry_their_kid() {
        let rsa = TestKey::rsa().unwrap();
        assert_eq!(rsa.public_jwk["kid"], "rsa-test-1");
        assert!(rsa.private_jwk.get("d").is_some());
        assert!(rsa.public_jwk.get("d").is_none());
        let ec = TestKey::ec().unwrap();
        assert_eq!(ec.public_jwk["crv"], "P-384");
        assert!(ec.public_jwk.get("d").is_none());
        let fresh = TestKey::generate_ec().unwrap();
        assert_ne!(fresh.kid, ec.kid);
    }
}
