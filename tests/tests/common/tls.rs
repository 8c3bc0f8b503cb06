//! A private CA made at test time, and a server certificate it signed for `127.0.0.1` and
//! `localhost`: what an enterprise network's internal CA looks like to pathling-import.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use pathling_import_tests::server::TlsIdentity;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// The CA's certificate (PEM, what `*_CA_FILE` or `SSL_CERT_FILE` names) and the identity a
/// fake serves https with.
pub struct PrivateCa {
    pub ca_pem: String,
    pub identity: TlsIdentity,
}

pub fn private_ca() -> PrivateCa {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "pathling-import test internal CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();

    let leaf_key = KeyPair::generate().unwrap();
    // `new` reads "127.0.0.1" as an IP address subject alternative name.
    let mut leaf =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "fhir.internal.test");
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();

    PrivateCa {
        ca_pem: ca_cert.pem(),
        identity: TlsIdentity {
            cert_chain: vec![leaf_cert.der().to_vec()],
            key_pkcs8: leaf_key.serialize_der(),
        },
    }
}
