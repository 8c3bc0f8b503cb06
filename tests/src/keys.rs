//! Test-only signing keys for SMART Backend Services (`private_key_jwt`) and a helper to sign
//! client assertions with them.
//!
//! RSA keys come from `tests/fixtures/keys/` because generating a 2048-bit RSA key in a debug
//! build takes seconds; their JWK forms were written once with openssl next to them (see the
//! README there), since no RSA library in this workspace exposes a private key's components.
//! P-384 keys are cheap and can also be generated fresh. Each [`TestKey`] carries the private
//! key as PKCS#8 PEM, the private key as a JWK (with `kid` and `alg`, the form clients are
//! usually configured with), and the public JWK a server registers.
//!
//! These keys protect nothing. Never use them outside tests.

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsBigEndian;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, RsaKeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const RSA_1: &str = include_str!("../fixtures/keys/rsa-test-1.pem");
const RSA_1_JWK: &str = include_str!("../fixtures/keys/rsa-test-1.jwk.json");
const RSA_2: &str = include_str!("../fixtures/keys/rsa-test-2.pem");
const RSA_2_JWK: &str = include_str!("../fixtures/keys/rsa-test-2.jwk.json");
const EC_1: &str = include_str!("../fixtures/keys/ec-p384-test-1.pem");

/// The first fixed RSA key as PKCS#1 (`RSA PRIVATE KEY`), written by openssl.
pub const RSA_1_PKCS1_PEM: &str = include_str!("../fixtures/keys/rsa-test-1.pkcs1.pem");
/// The fixed EC key as SEC1 (`EC PRIVATE KEY`, with its curve named), written by openssl.
pub const EC_1_SEC1_PEM: &str = include_str!("../fixtures/keys/ec-p384-test-1.sec1.pem");

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
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn invalid(e: impl std::fmt::Display) -> KeyError {
    KeyError::Invalid(e.to_string())
}

/// The DER inside the first PEM block of `pem`.
fn pem_der(pem: &str) -> Result<Vec<u8>, KeyError> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("-----BEGIN "))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END "))
        .collect();
    STANDARD.decode(body).map_err(invalid)
}

/// A PEM block of `der` under `label`, 64 characters a line.
fn to_pem(label: &str, der: &[u8]) -> String {
    let text = STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for chunk in text.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

impl TestKey {
    /// The first fixed RS384 key (`kid` = `rsa-test-1`).
    pub fn rsa() -> Result<Self, KeyError> {
        Self::from_rsa_fixture(RSA_1, RSA_1_JWK, "rsa-test-1")
    }

    /// A second fixed RS384 key (`kid` = `rsa-test-2`), e.g. as an unregistered key.
    pub fn rsa_alternate() -> Result<Self, KeyError> {
        Self::from_rsa_fixture(RSA_2, RSA_2_JWK, "rsa-test-2")
    }

    /// The fixed ES384 key (`kid` = `ec-test-1`).
    pub fn ec() -> Result<Self, KeyError> {
        Self::from_ec_pem(EC_1, "ec-test-1")
    }

    /// A freshly generated ES384 key with a random `kid`.
    pub fn generate_ec() -> Result<Self, KeyError> {
        let pair = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).map_err(invalid)?;
        let pkcs8 = pair.to_pkcs8v1().map_err(invalid)?;
        let kid = format!("ec-{}", uuid::Uuid::new_v4().simple());
        Self::from_ec_pem(&to_pem("PRIVATE KEY", pkcs8.as_ref()), &kid)
    }

    /// An RS384 key from a PKCS#8 PEM and the private JWK of the same key (as written by
    /// openssl into `tests/fixtures/keys`). The JWK gets `kid` and must match the PEM.
    pub fn from_rsa_fixture(pem: &str, private_jwk: &str, kid: &str) -> Result<Self, KeyError> {
        let pair = RsaKeyPair::from_pkcs8(&pem_der(pem)?).map_err(invalid)?;
        let mut private_jwk: Value = serde_json::from_str(private_jwk).map_err(invalid)?;
        let n = b64(pair
            .public_key()
            .modulus()
            .big_endian_without_leading_zero());
        if private_jwk["n"].as_str() != Some(n.as_str()) {
            return Err(KeyError::Invalid("the JWK is not the PEM's key".into()));
        }
        let obj = private_jwk
            .as_object_mut()
            .ok_or_else(|| KeyError::Invalid("the JWK is not an object".into()))?;
        obj.insert("kid".into(), kid.into());
        obj.insert("alg".into(), "RS384".into());
        obj.insert("use".into(), "sig".into());
        let mut public_jwk = private_jwk.clone();
        if let Some(obj) = public_jwk.as_object_mut() {
            for private in ["d", "p", "q", "dp", "dq", "qi"] {
                obj.remove(private);
            }
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
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &pem_der(pem)?)
            .map_err(invalid)?;
        let d = pair.private_key().as_be_bytes().map_err(invalid)?;
        // The uncompressed point: 0x04, then x and y of 48 bytes each.
        let point = pair.public_key().as_ref();
        if point.len() != 97 || point[0] != 4 {
            return Err(KeyError::Invalid(
                "unexpected EC public key encoding".into(),
            ));
        }
        let public_jwk = json!({
            "kty": "EC", "crv": "P-384", "kid": kid, "alg": "ES384", "use": "sig",
            "x": b64(&point[1..49]), "y": b64(&point[49..]),
        });
        let mut private_jwk = public_jwk.clone();
        if let Some(obj) = private_jwk.as_object_mut() {
            obj.insert("d".into(), b64(d.as_ref()).into());
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
        // The openssl-written JWK is the same key as the PEM (checked on load) and the EC JWK
        // derived here agrees with openssl's.
        let openssl_ec: Value =
            serde_json::from_str(include_str!("../fixtures/keys/ec-p384-test-1.jwk.json")).unwrap();
        for member in ["x", "y", "d"] {
            assert_eq!(ec.private_jwk[member], openssl_ec[member], "{member}");
        }
        assert!(TestKey::from_rsa_fixture(RSA_1, RSA_2_JWK, "x").is_err());
    }

    #[test]
    fn both_algorithms_sign_assertions_jsonwebtoken_accepts() {
        for key in [TestKey::rsa().unwrap(), TestKey::generate_ec().unwrap()] {
            let jws = key.sign_client_assertion("c", "http://t/token").unwrap();
            let jwk = key.public_jwk_typed().unwrap();
            let mut v = jsonwebtoken::Validation::new(key.alg.jwt_alg());
            v.set_audience(&["http://t/token"]);
            jsonwebtoken::decode::<Value>(
                &jws,
                &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
                &v,
            )
            .unwrap();
        }
    }
}
