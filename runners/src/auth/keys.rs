//! Private keys for `private_key_jwt`: a JWK, a JWKS, or a PEM (PKCS#8 RSA or EC P-384,
//! PKCS#1 RSA, SEC1 EC P-384), turned into aws-lc-rs key pairs.
//!
//! aws-lc-rs does the parsing that matters (it checks that the RSA members are consistent and
//! that an EC public point belongs to its scalar); the outer structure is read here first only
//! to say precisely what is wrong (a curve other than P-384, a short modulus, an RSA-PSS key),
//! since aws-lc-rs reports every refusal alike. A JWK is assembled into the DER aws-lc-rs
//! takes ([`super::der`]).
//!
//! Messages follow the configuration key (`SOURCE_PRIVATE_KEY: is not …`) and never contain
//! key material: base64 and DER errors are described, never quoted, and JSON errors give a
//! position only.

use std::fmt;

use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair as _, RsaKeyPair, ECDSA_P384_SHA384_FIXED_SIGNING,
};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use pathling_import_core::spec::SigningAlgorithm;
use serde_json::{Map, Value};

use super::der::{self, oids, Reader};
use super::{clip, json_position, AuthSetupError, KeyNames};

/// RSA keys shorter than this are refused (NIST SP 800-131A; aws-lc-rs refuses them too).
const MIN_RSA_BITS: usize = 2048;
/// aws-lc-rs signs with RSA keys of at most this size.
const MAX_RSA_BITS: usize = 8192;
/// A P-384 scalar or coordinate: 384 bits.
const P384_BYTES: usize = 48;

const ENCRYPTED_HINT: &str = "is an encrypted private key; provide it unencrypted \
                              (openssl pkcs8 -topk8 -nocrypt)";

/// A parsed private key ready to sign client assertions. `Debug` shows only `alg` and `kid`.
pub(super) struct SigningKey {
    pub(super) alg: SigningAlgorithm,
    pub(super) kid: String,
    pub(super) material: KeyMaterial,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The key pair itself. aws-lc-rs's RSA is constant time with blinding, which the `rsa` crate
/// used before this was not (RUSTSEC-2023-0071).
pub(super) enum KeyMaterial {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
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

    /// The public key as aws-lc-rs's verifiers take it (PKCS#1 `RSAPublicKey` for RSA, the
    /// uncompressed point for EC).
    #[cfg(test)]
    pub(super) fn public_key_bytes(&self) -> Vec<u8> {
        match self {
            KeyMaterial::Rsa(k) => k.public_key().as_ref().to_vec(),
            KeyMaterial::Ec(k) => k.public_key().as_ref().to_vec(),
        }
    }
}

pub(super) fn alg_name(alg: SigningAlgorithm) -> &'static str {
    match alg {
        SigningAlgorithm::RS384 => "RS384",
        SigningAlgorithm::ES384 => "ES384",
    }
}

/// What a private key's text yields before kid and alg are settled.
struct ParsedKey {
    material: KeyMaterial,
    jwk_kid: Option<String>,
    jwk_alg: Option<String>,
}

/// Parses the key and settles its algorithm and kid. The key is parsed first, so a key that
/// cannot work is reported as such whatever the kid settings are.
pub(super) fn parse_private_key(
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

// ---------------------------------------------------------------------------------------------
// JWK and JWKS
// ---------------------------------------------------------------------------------------------

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
        "RSA" => rsa_from_jwk(jwk)?,
        "EC" => ec_from_jwk(jwk)?,
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

/// A base64url member of a JWK (padding tolerated), or `None` when absent.
fn member(jwk: &Map<String, Value>, kind: &str, name: &str) -> Result<Option<Vec<u8>>, String> {
    match jwk.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_str()
            .and_then(|s| URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok())
            .map(Some)
            .ok_or_else(|| format!("is an {kind} JWK whose {name} is not base64url")),
    }
}

/// RFC 7518 §6.3.2: the private key with its CRT members, as a PKCS#1 `RSAPrivateKey`.
fn rsa_from_jwk(jwk: &Map<String, Value>) -> Result<KeyMaterial, String> {
    if jwk.contains_key("oth") {
        return Err("is a multi-prime RSA JWK (oth); a two-prime key is needed".into());
    }
    let mut values = Vec::with_capacity(8);
    for name in ["n", "e", "d"] {
        values.push(
            member(jwk, "RSA", name)?.ok_or_else(|| format!("is an RSA JWK without {name}"))?,
        );
    }
    let crt = ["p", "q", "dp", "dq", "qi"];
    let missing: Vec<&str> = crt
        .iter()
        .copied()
        .filter(|m| !jwk.contains_key(*m))
        .collect();
    if !missing.is_empty() {
        // Recovering the primes from n, e and d is possible but is big-number code of our own
        // in the signing path; every JWK exporter writes them anyway.
        return Err(format!(
            "is an RSA JWK without its CRT members ({}); export the full private key \
             (with p, q, dp, dq and qi)",
            missing.join(", ")
        ));
    }
    for name in crt {
        values.push(member(jwk, "RSA", name)?.unwrap_or_default());
    }
    let version = der::integer(&[0]);
    let integers: Vec<Vec<u8>> = values.iter().map(|v| der::integer(v)).collect();
    let mut elements: Vec<&[u8]> = vec![&version];
    elements.extend(integers.iter().map(Vec::as_slice));
    rsa_from_pkcs1(&der::sequence(&elements))
}

/// RFC 7518 §6.2.2: `d`, with `x` and `y` when present, as a SEC1 `ECPrivateKey`. Without
/// `x` and `y` the public point is computed from `d`.
fn ec_from_jwk(jwk: &Map<String, Value>) -> Result<KeyMaterial, String> {
    let crv = jwk.get("crv").and_then(Value::as_str).unwrap_or("(none)");
    if crv != "P-384" {
        return Err(format!(
            "is an EC JWK on curve {:?}; ES384 needs P-384",
            clip(crv)
        ));
    }
    let fixed = |name: &str, bytes: Vec<u8>| -> Result<Vec<u8>, String> {
        // Some encoders drop leading zero bytes; RFC 7518 wants the full length.
        let bytes = der::unsigned(&bytes).to_vec();
        if bytes.len() > P384_BYTES {
            return Err(format!("is an EC JWK whose {name} is not a P-384 value"));
        }
        let mut out = vec![0; P384_BYTES - bytes.len()];
        out.extend_from_slice(&bytes);
        Ok(out)
    };
    let d = member(jwk, "EC", "d")?.ok_or_else(|| "is an EC JWK without d".to_string())?;
    let d = fixed("d", d)?;
    let point = match (member(jwk, "EC", "x")?, member(jwk, "EC", "y")?) {
        (Some(x), Some(y)) => {
            let mut point = vec![0x04];
            point.extend(fixed("x", x)?);
            point.extend(fixed("y", y)?);
            Some(point)
        }
        (None, None) => None,
        _ => return Err("is an EC JWK with only one of x and y".into()),
    };
    let version = der::integer(&[1]);
    let scalar = der::tlv(der::OCTET_STRING, &d);
    let params = der::tlv(der::CONTEXT_0, &der::tlv(der::OID, oids::SECP384R1));
    let public = point
        .as_ref()
        .map(|p| der::tlv(der::CONTEXT_1, &der::bit_string(p)));
    let mut elements: Vec<&[u8]> = vec![&version, &scalar, &params];
    if let Some(p) = &public {
        elements.push(p);
    }
    let material = EcdsaKeyPair::from_private_key_der(
        &ECDSA_P384_SHA384_FIXED_SIGNING,
        &der::sequence(&elements),
    )
    .map_err(|_| {
        "is an EC JWK whose d is not a P-384 private key, or whose x and y do not belong to it"
            .to_string()
    })?;
    // aws-lc checks the point against d when it is given; this says so in our own words too.
    if let Some(p) = point {
        if material.public_key().as_ref() != p.as_slice() {
            return Err("is an EC JWK whose x and y do not belong to its d".into());
        }
    }
    Ok(KeyMaterial::Ec(material))
}

// ---------------------------------------------------------------------------------------------
// PEM and DER
// ---------------------------------------------------------------------------------------------

/// The first private key block of a PEM text (surrounding text, such as OpenSSL's bag
/// attributes, EC parameters or a certificate, is skipped).
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
            return Err(format!(
                "has a PEM block {:?} without its END line",
                clip(label)
            ));
        };
        let body = &after[label_end + "-----".len()..end];
        match label {
            "PRIVATE KEY" => return parse_pkcs8(&pem_body(label, body)?),
            "RSA PRIVATE KEY" => return rsa_from_pkcs1(&pem_body(label, body)?),
            "EC PRIVATE KEY" => return ec_from_sec1(&pem_body(label, body)?),
            "ENCRYPTED PRIVATE KEY" => return Err(ENCRYPTED_HINT.into()),
            _ => labels.push(clip(label)),
        }
        let block_len = "-----BEGIN ".len() + end + end_marker.len();
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

/// The DER inside a PEM block. OpenSSL's traditional format may carry RFC 1421 headers; the
/// only ones that occur (`Proc-Type: 4,ENCRYPTED`, `DEK-Info`) mean an encrypted key.
fn pem_body(label: &str, body: &str) -> Result<Vec<u8>, String> {
    if body.lines().any(|l| l.contains(':')) {
        return if body.contains("ENCRYPTED") {
            Err(ENCRYPTED_HINT.into())
        } else {
            Err(format!(
                "has a PEM block {label:?} with headers; a plain key is needed"
            ))
        };
    }
    let compact: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    STANDARD
        .decode(compact)
        .map_err(|_| format!("has a PEM block {label:?} whose body is not base64"))
}

/// PKCS#8 `PrivateKeyInfo` (RFC 5208, or its RFC 5958 successor): the algorithm decides.
fn parse_pkcs8(der: &[u8]) -> Result<KeyMaterial, String> {
    let invalid = || "is not a valid PKCS#8 private key".to_string();
    let info = der::single(der, der::SEQUENCE).ok_or_else(invalid)?;
    let mut r = Reader::new(info);
    r.expect(der::INTEGER).ok_or_else(invalid)?;
    let algorithm = r.expect(der::SEQUENCE).ok_or_else(invalid)?;
    let private = r.expect(der::OCTET_STRING).ok_or_else(invalid)?;
    let mut a = Reader::new(algorithm);
    let oid = a.expect(der::OID).ok_or_else(invalid)?;
    match oid {
        oids::RSA_ENCRYPTION => rsa_from_pkcs1(private),
        oids::RSASSA_PSS => Err(
            "is an RSA-PSS key (1.2.840.113549.1.1.10); RS384 needs a plain RSA key \
             (rsaEncryption)"
                .into(),
        ),
        oids::EC_PUBLIC_KEY => {
            let curve = a.expect(der::OID);
            if curve != Some(oids::SECP384R1) {
                return Err(format!(
                    "is an EC key on curve {}; ES384 needs P-384 (1.3.132.0.34)",
                    curve.map_or_else(|| "(unnamed)".to_string(), der::oid_text)
                ));
            }
            // The inner ECPrivateKey usually leaves out the curve; the expected one is given.
            ec_from_sec1(private)
        }
        other => Err(format!(
            "is a PKCS#8 key of algorithm {}; RSA or EC P-384 is needed",
            der::oid_text(other)
        )),
    }
}

/// PKCS#1 `RSAPrivateKey` (RFC 8017 A.1.2). The modulus is measured first so that a short
/// key is refused as such.
fn rsa_from_pkcs1(der: &[u8]) -> Result<KeyMaterial, String> {
    let invalid = || "is not a valid RSA private key".to_string();
    let key = der::single(der, der::SEQUENCE).ok_or_else(invalid)?;
    let mut r = Reader::new(key);
    r.expect(der::INTEGER).ok_or_else(invalid)?;
    let modulus = r.expect(der::INTEGER).ok_or_else(invalid)?;
    let bits = der::bit_length(modulus);
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "RSA keys must have at least {MIN_RSA_BITS} bits (this one has {bits})"
        ));
    }
    if bits > MAX_RSA_BITS {
        return Err(format!(
            "RSA keys of more than {MAX_RSA_BITS} bits are not supported (this one has {bits})"
        ));
    }
    // aws-lc checks the key (RSA_check_key): n = p·q, d, and the CRT members agree.
    RsaKeyPair::from_der(der)
        .map(KeyMaterial::Rsa)
        .map_err(|e| format!("is not a valid RSA private key ({e})"))
}

/// SEC1 `ECPrivateKey` (RFC 5915); the curve, when named, must be P-384.
fn ec_from_sec1(der: &[u8]) -> Result<KeyMaterial, String> {
    let invalid = || "is not a valid EC private key".to_string();
    let key = der::single(der, der::SEQUENCE).ok_or_else(invalid)?;
    let mut r = Reader::new(key);
    r.expect(der::INTEGER).ok_or_else(invalid)?;
    r.expect(der::OCTET_STRING).ok_or_else(invalid)?;
    if let Some(params) = r.optional(der::CONTEXT_0) {
        let curve = der::single(params, der::OID);
        if curve != Some(oids::SECP384R1) {
            return Err(format!(
                "is an EC key on curve {}; ES384 needs P-384 (1.3.132.0.34)",
                curve.map_or_else(|| "(unnamed)".to_string(), der::oid_text)
            ));
        }
    }
    EcdsaKeyPair::from_private_key_der(&ECDSA_P384_SHA384_FIXED_SIGNING, der)
        .map(KeyMaterial::Ec)
        .map_err(|e| format!("is not a valid EC P-384 private key ({e})"))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::auth::Side;
    use pathling_import_core::spec::{AuthSpec, SecretRef};

    /// Test keys shared with the integration tests (`tests/fixtures/keys`, see its README).
    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/fixtures/keys/",
                $name
            ))
        };
    }
    pub(in crate::auth) const RSA_PKCS8: &str = fixture!("rsa-test-1.pem");
    pub(in crate::auth) const RSA_PKCS1: &str = fixture!("rsa-test-1.pkcs1.pem");
    pub(in crate::auth) const RSA_JWK: &str = fixture!("rsa-test-1.jwk.json");
    pub(in crate::auth) const RSA_2_JWK: &str = fixture!("rsa-test-2.jwk.json");
    pub(in crate::auth) const EC_PKCS8: &str = fixture!("ec-p384-test-1.pem");
    pub(in crate::auth) const EC_SEC1: &str = fixture!("ec-p384-test-1.sec1.pem");
    pub(in crate::auth) const EC_JWK: &str = fixture!("ec-p384-test-1.jwk.json");
    const EC_ENCRYPTED: &str = fixture!("ec-p384-test-1.encrypted.pem");
    const RSA_1024: &str = fixture!("rsa-1024-test.pem");
    const RSA_1024_LEGACY_ENCRYPTED: &str = fixture!("rsa-1024-test.legacy-encrypted.pem");
    const EC_P256: &str = fixture!("ec-p256-test.pem");

    pub(in crate::auth) fn names() -> KeyNames {
        let spec = AuthSpec {
            private_key: Some(SecretRef::Config {
                key: "SOURCE_PRIVATE_KEY".into(),
            }),
            ..AuthSpec::disabled()
        };
        KeyNames::new(Side::Source, &spec)
    }

    pub(in crate::auth) fn parse(
        text: &str,
        kid: Option<&str>,
    ) -> Result<SigningKey, AuthSetupError> {
        parse_private_key(text, kid, None, &names())
    }

    /// Parses a fixture with kid `k` when it does not bring its own (a PEM).
    pub(in crate::auth) fn parse_fixture(text: &str) -> SigningKey {
        let kid = (!text.trim_start().starts_with('{')).then_some("k");
        parse(text, kid).unwrap_or_else(|e| panic!("{e}"))
    }

    const CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----";

    fn jwk(text: &str) -> Map<String, Value> {
        serde_json::from_str(text).unwrap()
    }

    fn without(text: &str, members: &[&str]) -> String {
        let mut j = jwk(text);
        for m in members {
            j.remove(*m);
        }
        Value::Object(j).to_string()
    }

    /// Every secret member of the fixture JWKs, to look for in messages.
    fn secret_parts() -> Vec<String> {
        let mut out = Vec::new();
        for text in [RSA_JWK, EC_JWK] {
            let j = jwk(text);
            for m in ["d", "p", "q", "dp", "dq", "qi"] {
                if let Some(v) = j.get(m).and_then(Value::as_str) {
                    out.push(v[..16].to_string());
                }
            }
        }
        for pem in [RSA_PKCS8, RSA_PKCS1, EC_PKCS8, EC_SEC1] {
            // A line from the middle of each PEM body.
            out.push(pem.lines().nth(2).unwrap_or_default()[..20].to_string());
        }
        out
    }

    fn assert_no_key_material(text: &str) {
        for part in secret_parts() {
            assert!(!text.contains(&part), "key material in {text:?}");
        }
    }

    #[test]
    fn every_accepted_format_parses_with_its_algorithm_and_kid() {
        let one_line = EC_PKCS8.trim().replace('\n', "\\n");
        let rsa_one_line = RSA_PKCS1.trim().replace('\n', "\\n");
        let jwks = format!(
            "{{\"keys\":[{},{},{}]}}",
            without(RSA_2_JWK, &["d", "p", "q", "dp", "dq", "qi"]),
            RSA_JWK,
            without(EC_JWK, &["d"])
        );
        let two_private = format!("{{\"keys\":[{RSA_JWK},{EC_JWK}]}}");
        let cases: Vec<(&str, String, Option<&str>, SigningAlgorithm, &str)> = vec![
            (
                "RSA JWK",
                RSA_JWK.into(),
                None,
                SigningAlgorithm::RS384,
                "rsa-test-1",
            ),
            (
                "EC JWK",
                EC_JWK.into(),
                None,
                SigningAlgorithm::ES384,
                "ec-test-1",
            ),
            (
                "EC JWK with d alone",
                without(EC_JWK, &["x", "y"]),
                None,
                SigningAlgorithm::ES384,
                "ec-test-1",
            ),
            (
                "JWK without kid, kid configured",
                without(EC_JWK, &["kid", "alg", "use"]),
                Some("configured"),
                SigningAlgorithm::ES384,
                "configured",
            ),
            (
                "JWKS, its only private key",
                jwks.clone(),
                None,
                SigningAlgorithm::RS384,
                "rsa-test-1",
            ),
            (
                "JWKS chosen by kid",
                two_private,
                Some("ec-test-1"),
                SigningAlgorithm::ES384,
                "ec-test-1",
            ),
            (
                "RSA PKCS#8 PEM",
                RSA_PKCS8.into(),
                Some("k"),
                SigningAlgorithm::RS384,
                "k",
            ),
            (
                "RSA PKCS#1 PEM",
                RSA_PKCS1.into(),
                Some("k"),
                SigningAlgorithm::RS384,
                "k",
            ),
            (
                "EC PKCS#8 PEM",
                EC_PKCS8.into(),
                Some("k"),
                SigningAlgorithm::ES384,
                "k",
            ),
            (
                "EC SEC1 PEM",
                EC_SEC1.into(),
                Some("k"),
                SigningAlgorithm::ES384,
                "k",
            ),
            (
                "EC PEM on one line",
                one_line,
                Some("k"),
                SigningAlgorithm::ES384,
                "k",
            ),
            (
                "RSA PEM on one line",
                rsa_one_line,
                Some("k"),
                SigningAlgorithm::RS384,
                "k",
            ),
            (
                "PEM after a certificate and bag attributes",
                format!("Bag Attributes\n    localKeyID: 01\n{CERTIFICATE}\n{EC_PKCS8}"),
                Some("k"),
                SigningAlgorithm::ES384,
                "k",
            ),
        ];
        for (what, text, kid, alg, expected_kid) in cases {
            let key = parse(&text, kid).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(key.alg, alg, "{what}");
            assert_eq!(key.kid, expected_kid, "{what}");
        }
    }

    #[test]
    fn the_same_key_in_every_form_is_the_same_key() {
        let public = |text: &str| parse_fixture(text).material.public_key_bytes();
        let rsa = public(RSA_PKCS8);
        assert_eq!(public(RSA_PKCS1), rsa);
        assert_eq!(public(RSA_JWK), rsa);
        let ec = public(EC_PKCS8);
        assert_eq!(ec.len(), 1 + 2 * P384_BYTES);
        assert_eq!(public(EC_SEC1), ec);
        assert_eq!(public(EC_JWK), ec);
        assert_eq!(public(&without(EC_JWK, &["x", "y"])), ec);
    }

    #[test]
    fn rsa_keys_under_2048_bits_are_refused() {
        let e = parse(RSA_1024, Some("k")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "SOURCE_PRIVATE_KEY: RSA keys must have at least 2048 bits (this one has 1024)"
        );
    }

    #[test]
    fn refusals_say_why_and_never_echo_the_key() {
        let rsa_jwk_no_crt = without(RSA_JWK, &["p", "q", "dp", "dq", "qi"]);
        let mut wrong_point = jwk(EC_JWK);
        wrong_point.insert("y".into(), jwk(EC_JWK)["x"].clone());
        let mut inconsistent_rsa = jwk(RSA_JWK);
        inconsistent_rsa.insert("d".into(), jwk(RSA_2_JWK)["d"].clone());
        let two_private = format!("{{\"keys\":[{RSA_JWK},{EC_JWK}]}}");
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "RSA JWK without CRT",
                rsa_jwk_no_crt,
                "export the full private key",
            ),
            (
                "EC point of another key",
                Value::Object(wrong_point).to_string(),
                "x and y",
            ),
            (
                "RSA members that do not agree",
                Value::Object(inconsistent_rsa).to_string(),
                "not a valid RSA private key",
            ),
            ("public JWK", without(EC_JWK, &["d"]), "public JWK"),
            ("EC JWK on P-256", EC_JWK.replace("P-384", "P-256"), "P-384"),
            (
                "EC PKCS#8 on P-256",
                EC_P256.into(),
                "curve 1.2.840.10045.3.1.7",
            ),
            (
                "encrypted PKCS#8",
                EC_ENCRYPTED.into(),
                "openssl pkcs8 -topk8 -nocrypt",
            ),
            (
                "legacy encrypted PKCS#1",
                RSA_1024_LEGACY_ENCRYPTED.into(),
                "openssl pkcs8 -topk8 -nocrypt",
            ),
            ("JWKS with two private keys", two_private, "set the key id"),
            (
                "truncated PEM",
                EC_PKCS8.replace("-----END PRIVATE KEY-----", ""),
                "without its END line",
            ),
            (
                "PEM body damaged",
                EC_PKCS8.replacen('M', "!", 1),
                "not base64",
            ),
            (
                "PEM body cut short",
                {
                    let lines: Vec<&str> = EC_PKCS8.lines().collect();
                    format!("{}\n{}\n{}", lines[0], lines[1], lines[lines.len() - 1])
                },
                "not a valid PKCS#8 private key",
            ),
            (
                "JSON syntax",
                RSA_JWK.replacen(',', ";", 1),
                "syntax error at line",
            ),
            (
                "a certificate only",
                CERTIFICATE.into(),
                "holds no private key",
            ),
        ];
        for (what, text, expected) in cases {
            let e = parse(&text, None)
                .err()
                .unwrap_or_else(|| panic!("{what}: accepted"));
            let shown = format!("{e} {e:?}");
            assert_eq!(e.key, "SOURCE_PRIVATE_KEY", "{what}: {e}");
            assert!(e.message.contains(expected), "{what}: {e}");
            assert_no_key_material(&shown);
        }
    }

    #[test]
    fn a_broken_key_without_a_kid_reports_the_key() {
        for text in [
            "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----",
            RSA_1024,
            EC_ENCRYPTED,
        ] {
            let e = parse(text, None).unwrap_err();
            assert_eq!(e.key, "SOURCE_PRIVATE_KEY", "{e}");
        }
        // A good key without any kid is what the kid is needed for.
        assert_eq!(parse(EC_PKCS8, None).unwrap_err().key, "SOURCE_KEY_ID");
    }

    #[test]
    fn signing_algorithm_and_jwk_alg_must_fit_the_key() {
        let e = parse_private_key(
            RSA_PKCS8,
            Some("k"),
            Some(SigningAlgorithm::ES384),
            &names(),
        )
        .unwrap_err();
        assert_eq!(e.key, "SOURCE_SIGNING_ALGORITHM");
        let e = parse(&EC_JWK.replace("ES384", "RS384"), None).unwrap_err();
        assert!(e.message.contains("does not fit an EC P-384 key"), "{e}");
        let e = parse(RSA_JWK, Some("other")).unwrap_err();
        assert_eq!(e.key, "SOURCE_KEY_ID");
    }

    #[test]
    fn debug_shows_alg_and_kid_only() {
        let key = parse(RSA_JWK, None).unwrap();
        let shown = format!("{key:?}");
        assert!(
            shown.contains("RS384") && shown.contains("rsa-test-1"),
            "{shown}"
        );
        assert_no_key_material(&shown);
    }
}
