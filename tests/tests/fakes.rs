//! Integration tests of the fake servers themselves, driven with a plain HTTP client, so that
//! the project's own tests can trust the fakes to behave like the real servers
//! (`docs/protocols.md`, §1 to §3).
//!
//! The S3 test reads from a moto server and fails with instructions unless `MOTO_ENDPOINT` is
//! set (`"$(bash .ci/moto.sh)" -H 127.0.0.1 -p 5055 &`, then
//! `MOTO_ENDPOINT=http://127.0.0.1:5055`).

// Test helpers outside `#[test]` functions panic on purpose: a failure is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use pathling_import_tests::auth::{AuthConfig, AuthMethod, JWT_BEARER};
use pathling_import_tests::data::{DatasetConfig, ExportFilter};
use pathling_import_tests::fake_pathling::{
    FakePathling, FakePathlingHandle, Generation, ImportFailure, JobStatus, PathlingConfig,
    S3Access,
};
use pathling_import_tests::fake_source::{
    expected_deleted, expected_ids, expected_resources, ErrorEntry, FakeSource, FakeSourceHandle,
    FileRouting, HttpFailure, PollFailure, RateLimit, ResetKnob, SourceConfig,
};
use pathling_import_tests::fhir::{parse_instant, RetryAfter};
use pathling_import_tests::keys::{assertion_claims, TestKey};
use reqwest::header::HeaderMap;
use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A client that neither follows redirects nor decompresses, so tests see the wire.
fn client() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_gzip()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn header(resp: &Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

fn bulk_headers(token: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("accept", "application/fhir+json".parse().unwrap());
    h.insert("prefer", "respond-async".parse().unwrap());
    if let Some(t) = token {
        h.insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    h
}

async fn kickoff(c: &Client, url: &str, token: Option<&str>) -> Response {
    c.get(url)
        .headers(bulk_headers(token))
        .send()
        .await
        .unwrap()
}

async fn poll(c: &Client, url: &str, token: Option<&str>) -> Response {
    let mut req = c.get(url).header("accept", "application/json");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

/// Kicks off an export and polls until the manifest arrives.
async fn export(c: &Client, url: &str, token: Option<&str>) -> (String, Value) {
    let resp = kickoff(c, url, token).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "{url}");
    let status_url = header(&resp, "content-location").unwrap();
    for _ in 0..50 {
        let resp = poll(c, &status_url, token).await;
        match resp.status() {
            StatusCode::OK => return (status_url, resp.json().await.unwrap()),
            StatusCode::ACCEPTED => continue,
            other => panic!("unexpected poll status {other}"),
        }
    }
    panic!("export never completed");
}

async fn download(c: &Client, url: &str, token: Option<&str>) -> String {
    let mut req = c.get(url).header("accept", "application/fhir+ndjson");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{url}");
    resp.text().await.unwrap()
}

fn ndjson(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn outputs(manifest: &Value, key: &str) -> Vec<(String, String)> {
    manifest[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["type"].as_str().unwrap().to_string(),
                o["url"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Downloads every output file and keys the resources by `(type, id)`.
async fn download_all(
    c: &Client,
    manifest: &Value,
    token: Option<&str>,
) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for (t, url) in outputs(manifest, "output") {
        for r in ndjson(&download(c, &url, token).await) {
            assert_eq!(r["resourceType"], t.as_str());
            let id = r["id"].as_str().unwrap().to_string();
            assert!(out.insert((t.clone(), id), r).is_none(), "duplicate");
        }
    }
    out
}

fn basic_header(id: &str, secret: &str) -> String {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let raw = format!("{}:{}", enc(id), enc(secret));
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

async fn token_request(
    c: &Client,
    url: &str,
    form: &[(&str, &str)],
    authorization: Option<&str>,
) -> (StatusCode, Value, HeaderMap) {
    let mut req = c.post(url).form(form);
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    (status, resp.json().await.unwrap(), headers)
}

async fn basic_token(c: &Client, token_url: &str, id: &str, secret: &str) -> String {
    let (status, body, _) = token_request(
        c,
        token_url,
        &[
            ("grant_type", "client_credentials"),
            ("scope", "system/*.read"),
        ],
        Some(&basic_header(id, secret)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["access_token"].as_str().unwrap().to_string()
}

async fn start_source(config: SourceConfig) -> FakeSourceHandle {
    FakeSource::start(config).await.unwrap()
}

/// A directory under the system temp dir, removed on drop.
fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fakes-test-")
        .tempdir()
        .unwrap()
}

/// Writing files into a [`scratch_dir`] and naming them as the fake Pathling reads them.
trait ScratchDir {
    /// Writes `content` to `name` (parents created) and returns its `file://` URL.
    fn write(&self, name: &str, content: &str) -> String;
    /// The directory's `file://` URL, with a trailing slash.
    fn url(&self) -> String;
}

impl ScratchDir for tempfile::TempDir {
    fn write(&self, name: &str, content: &str) -> String {
        let path = self.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, content).unwrap();
        format!("file://{}", path.display())
    }

    fn url(&self) -> String {
        format!("file://{}/", self.path().display())
    }
}

fn patients_ndjson(ids: &[&str], family: &str) -> String {
    ids.iter()
        .map(|id| {
            json!({"resourceType": "Patient", "id": id, "name": [{"family": family}]}).to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn v9_body(save_mode: &str, inputs: &[(&str, &str)]) -> Value {
    let mut params = vec![
        json!({"name": "inputFormat", "valueCode": "application/fhir+ndjson"}),
        json!({"name": "saveMode", "valueCode": save_mode}),
    ];
    for (t, u) in inputs {
        params.push(json!({"name": "input", "part": [
            {"name": "resourceType", "valueCode": t},
            {"name": "url", "valueUrl": u}]}));
    }
    json!({"resourceType": "Parameters", "parameter": params})
}

fn v7_body(sources: &[(&str, &str, &str)]) -> Value {
    let params: Vec<Value> = sources
        .iter()
        .map(|(t, u, m)| {
            json!({"name": "source", "part": [
                {"name": "resourceType", "valueCode": t},
                {"name": "url", "valueUrl": u},
                {"name": "mode", "valueCode": m}]})
        })
        .collect();
    json!({"resourceType": "Parameters", "parameter": params})
}

async fn post_import(c: &Client, p: &FakePathlingHandle, body: &Value) -> Response {
    c.post(format!("{}/$import", p.base_url()))
        .header("content-type", "application/fhir+json")
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// Polls a Pathling job until it leaves 202; returns the final status and body.
async fn finish_job(c: &Client, job_url: &str) -> (StatusCode, Value) {
    for _ in 0..200 {
        let resp = c
            .get(job_url)
            .header("accept", "application/fhir+json")
            .send()
            .await
            .unwrap();
        if resp.status() != StatusCode::ACCEPTED {
            let status = resp.status();
            return (status, resp.json().await.unwrap());
        }
        // Polling interval: the fake job finishes on its own time.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("job never finished");
}

async fn import_and_wait(c: &Client, p: &FakePathlingHandle, body: &Value) -> (StatusCode, Value) {
    let resp = post_import(c, p, body).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let job = header(&resp, "content-location").unwrap();
    finish_job(c, &job).await
}

fn diagnostics(body: &Value) -> String {
    body["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Source: SMART discovery and tokens
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn discovery_advertises_configured_methods_and_algorithms() {
    let mut auth = AuthConfig::client_secret_basic("c", "s")
        .with_methods(&[AuthMethod::ClientSecretBasic, AuthMethod::PrivateKeyJwt]);
    auth.advertised_methods = Some(vec!["private_key_jwt".into()]);
    let src = start_source(SourceConfig {
        auth: Some(auth),
        ..Default::default()
    })
    .await;
    let c = client();
    // A trailing slash on the base must not be needed: the path is appended to it.
    let doc: Value = c
        .get(format!(
            "{}/.well-known/smart-configuration",
            src.base_url()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["token_endpoint"], src.token_url().as_str());
    assert_eq!(
        doc["token_endpoint_auth_methods_supported"],
        json!(["private_key_jwt"])
    );
    assert_eq!(
        doc["token_endpoint_auth_signing_alg_values_supported"],
        json!(["RS384", "ES384"])
    );
    src.update(|c| c.auth = None);
    let resp = c
        .get(format!(
            "{}/.well-known/smart-configuration",
            src.base_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn client_secret_basic_requires_form_encoded_credentials() {
    let secret = "p@ss:w+rd%/ü";
    let src = start_source(SourceConfig {
        auth: Some(AuthConfig::client_secret_basic("my client", secret)),
        ..Default::default()
    })
    .await;
    let c = client();
    let token = basic_token(&c, &src.token_url(), "my client", secret).await;
    assert!(!token.is_empty());

    // Without the RFC 6749 §2.3.1 encoding, '+' decodes to a space and the secret is wrong.
    let raw = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("my client:{secret}"))
    );
    let (status, body, headers) = token_request(
        &c,
        &src.token_url(),
        &[("grant_type", "client_credentials")],
        Some(&raw),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "invalid_client");
    assert!(headers
        .get("www-authenticate")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    let (status, body, _) = token_request(
        &c,
        &src.token_url(),
        &[("grant_type", "password")],
        Some(&basic_header("my client", secret)),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "unsupported_grant_type");
    let stats = src.auth_stats();
    assert_eq!(stats.tokens_issued, 1);
    assert_eq!(stats.token_failures, 2);
    assert_eq!(stats.methods_used, vec![AuthMethod::ClientSecretBasic]);
}

#[tokio::test]
async fn client_secret_post_and_method_rules() {
    let src = start_source(SourceConfig {
        auth: Some(AuthConfig::client_secret_post("cid", "sec")),
        ..Default::default()
    })
    .await;
    let c = client();
    let url = src.token_url();
    let (status, body, _) = token_request(
        &c,
        &url,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "cid"),
            ("client_secret", "sec"),
            ("scope", "system/*.rs"),
        ],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["expires_in"], 300);
    assert_eq!(body["scope"], "system/*.rs");

    // Two methods at once is invalid_request (RFC 6749 §2.3).
    let (status, body, _) = token_request(
        &c,
        &url,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "cid"),
            ("client_secret", "sec"),
        ],
        Some(&basic_header("cid", "sec")),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_request");

    // Basic is not enabled for this client.
    let (status, body, _) = token_request(
        &c,
        &url,
        &[("grant_type", "client_credentials")],
        Some(&basic_header("cid", "sec")),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "invalid_client");

    let (status, body, _) = token_request(
        &c,
        &url,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "cid"),
            ("client_secret", "wrong"),
        ],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_client");
}

async fn jwt_token(c: &Client, url: &str, assertion: &str) -> (StatusCode, Value) {
    let (status, body, _) = token_request(
        c,
        url,
        &[
            ("grant_type", "client_credentials"),
            ("scope", "system/*.read"),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion),
        ],
        None,
    )
    .await;
    (status, body)
}

#[tokio::test]
async fn private_key_jwt_verifies_signature_claims_and_jti() {
    let rsa = TestKey::rsa().unwrap();
    let ec = TestKey::generate_ec().unwrap();
    let unregistered = TestKey::rsa_alternate().unwrap();
    let src = start_source(SourceConfig {
        auth: Some(AuthConfig::private_key_jwt("bulk-client", &[&rsa, &ec])),
        ..Default::default()
    })
    .await;
    let c = client();
    let url = src.token_url();

    for key in [&rsa, &ec] {
        let assertion = key.sign_client_assertion("bulk-client", &url).unwrap();
        let (status, body) = jwt_token(&c, &url, &assertion).await;
        assert_eq!(status, StatusCode::OK, "{:?}: {body}", key.alg);
        // The same assertion again is a replay.
        let (status, body) = jwt_token(&c, &url, &assertion).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid_client");
        assert!(body["error_description"].as_str().unwrap().contains("jti"));
    }

    let mut bad_cases: Vec<(&str, String)> = Vec::new();
    let mut claims = assertion_claims("bulk-client", &format!("{url}/"), 240);
    bad_cases.push((
        "aud not exactly the token URL",
        ec.sign_claims(&claims).unwrap(),
    ));
    claims = assertion_claims("bulk-client", &url, 3600);
    bad_cases.push((
        "exp more than five minutes ahead",
        ec.sign_claims(&claims).unwrap(),
    ));
    claims = assertion_claims("bulk-client", &url, -120);
    bad_cases.push(("expired", ec.sign_claims(&claims).unwrap()));
    claims = assertion_claims("bulk-client", &url, 240);
    claims["sub"] = json!("someone-else");
    bad_cases.push(("sub differs from iss", ec.sign_claims(&claims).unwrap()));
    claims = assertion_claims("other-client", &url, 240);
    bad_cases.push(("unknown issuer", ec.sign_claims(&claims).unwrap()));
    claims = assertion_claims("bulk-client", &url, 240);
    claims.as_object_mut().unwrap().remove("jti");
    bad_cases.push(("no jti", ec.sign_claims(&claims).unwrap()));
    bad_cases.push((
        "unregistered key",
        unregistered
            .sign_client_assertion("bulk-client", &url)
            .unwrap(),
    ));
    // A key registered under one kid but signing with another key's material.
    let mut impostor = unregistered.clone();
    impostor.kid = rsa.kid.clone();
    bad_cases.push((
        "bad signature",
        impostor.sign_client_assertion("bulk-client", &url).unwrap(),
    ));
    for (why, assertion) in bad_cases {
        let (status, body) = jwt_token(&c, &url, &assertion).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{why}: {body}");
        assert_eq!(body["error"], "invalid_client", "{why}");
    }

    // Wrong assertion type.
    let assertion = ec.sign_client_assertion("bulk-client", &url).unwrap();
    let (status, body, _) = token_request(
        &c,
        &url,
        &[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", "urn:other"),
            ("client_assertion", &assertion),
        ],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_request");
    assert_eq!(
        src.auth_stats().methods_used,
        vec![AuthMethod::PrivateKeyJwt, AuthMethod::PrivateKeyJwt]
    );
}

#[tokio::test]
async fn bearer_tokens_are_required_and_expire() {
    let src = start_source(SourceConfig {
        auth: Some(
            AuthConfig::client_secret_basic("c", "s").with_token_lifetime(Duration::from_secs(1)),
        ),
        ..Default::default()
    })
    .await;
    let c = client();
    let url = format!("{}/$export", src.base_url());
    assert_eq!(
        kickoff(&c, &url, None).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        kickoff(&c, &url, Some("made-up")).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let token = basic_token(&c, &src.token_url(), "c", "s").await;
    let resp = kickoff(&c, &url, Some(&token)).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let status_url = header(&resp, "content-location").unwrap();
    assert_eq!(
        poll(&c, &status_url, None).await.status(),
        StatusCode::UNAUTHORIZED
    );
    // The scenario's own wait: the token's real lifetime (1 s) passes.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resp = poll(&c, &status_url, Some(&token)).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(header(&resp, "www-authenticate")
        .unwrap()
        .starts_with("Bearer"));
    assert_eq!(src.auth_stats().expired_tokens_presented, 1);
    // A fresh token works again; revoking invalidates it.
    let token = basic_token(&c, &src.token_url(), "c", "s").await;
    assert_eq!(
        poll(&c, &status_url, Some(&token)).await.status(),
        StatusCode::ACCEPTED
    );
    src.revoke_tokens();
    assert_eq!(
        poll(&c, &status_url, Some(&token)).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

// ---------------------------------------------------------------------------------------------
// Source: kick-off
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn kickoff_validates_headers_and_parameters() {
    let src = start_source(SourceConfig::default()).await;
    let c = client();
    let base = src.base_url();
    let resp = c
        .get(format!("{base}/$export"))
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = c
        .get(format!("{base}/$export"))
        .header("accept", "application/fhir+json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = kickoff(&c, &format!("{base}/$export?_outputFormat=text/csv"), None).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let oo: Value = resp.json().await.unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");
    assert!(diagnostics(&oo).contains("_outputFormat"));
    let resp = kickoff(&c, &format!("{base}/$export?_since=yesterday"), None).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = kickoff(&c, &format!("{base}/$export?_type=..%2Fx"), None).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = kickoff(&c, &format!("{base}/Group/nope/$export"), None).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = kickoff(
        &c,
        &format!("{base}/Patient/$export?patient=Patient/patient-1"),
        None,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "patient needs POST");

    let url = format!(
        "{base}/$export?_outputFormat=application%2Ffhir%2Bndjson&_type=Patient,Observation\
         &_type=Condition&_typeFilter=Observation%3Fstatus%3Dfinal&_elements=id,meta\
         &_since=2024-01-01T00:10:00Z"
    );
    let resp = kickoff(&c, &url, None).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let location = header(&resp, "content-location").unwrap();
    assert!(
        location.starts_with(&format!("{base}/bulkstatus/")),
        "{location}"
    );
    let last = src.last_kickoff().unwrap();
    assert_eq!(
        last.param_values("_type"),
        vec!["Patient,Observation", "Condition"]
    );
    assert_eq!(
        last.param_values("_typeFilter"),
        vec!["Observation?status=final"]
    );
    assert_eq!(last.accept.as_deref(), Some("application/fhir+json"));
    let job = src.jobs().pop().unwrap();
    assert_eq!(
        job.filter.types,
        Some(vec![
            "Patient".into(),
            "Observation".into(),
            "Condition".into()
        ])
    );
    assert_eq!(job.elements, vec!["id", "meta"]);
    assert_eq!(job.filter.since, parse_instant("2024-01-01T00:10:00Z"));
    let stats = src.stats();
    assert_eq!(stats.kickoffs, 8);
    assert_eq!(stats.kickoffs_accepted, 1);
}

#[tokio::test]
async fn kickoff_failure_knobs() {
    let src = start_source(SourceConfig {
        kickoff_transient_failures: 1,
        throttle_retry_after: RetryAfter::Seconds(7),
        reject_concurrent_exports: true,
        ..Default::default()
    })
    .await;
    let c = client();
    let url = format!("{}/$export", src.base_url());
    let resp = kickoff(&c, &url, None).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&resp, "retry-after").as_deref(), Some("7"));
    let oo: Value = resp.json().await.unwrap();
    assert_eq!(oo["issue"][0]["code"], "transient");
    assert_eq!(kickoff(&c, &url, None).await.status(), StatusCode::ACCEPTED);
    // A second export while the first is unfinished.
    let resp = kickoff(&c, &url, None).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&resp, "retry-after").as_deref(), Some("7"));
    src.update(|c| {
        c.kickoff_error = Some(HttpFailure::new(403, "forbidden", "no exports for you"))
    });
    let resp = kickoff(&c, &url, None).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let statuses: Vec<u16> = src.kickoffs().iter().map(|k| k.status).collect();
    assert_eq!(statuses, vec![503, 202, 429, 403]);
}

#[tokio::test]
async fn patient_and_group_level_exports_filter_by_patient() {
    let src = start_source(SourceConfig {
        dataset: DatasetConfig::new(&[
            ("Patient", 20, 1),
            ("Observation", 60, 2),
            ("Organization", 5, 1),
        ]),
        ..Default::default()
    })
    .await;
    let c = client();
    let base = src.base_url();
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient,Observation,Organization"},
        {"name": "patient", "valueReference": {"reference": "Patient/patient-3"}},
        {"name": "patient", "valueReference": {"reference": "Patient/patient-4"}},
    ]});
    let resp = c
        .post(format!("{base}/Patient/$export"))
        .headers(bulk_headers(None))
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let status_url = header(&resp, "content-location").unwrap();
    let manifest = loop {
        let resp = poll(&c, &status_url, None).await;
        if resp.status() == StatusCode::OK {
            break resp.json::<Value>().await.unwrap();
        }
    };
    let got = download_all(&c, &manifest, None).await;
    let filter = ExportFilter {
        types: Some(vec![
            "Patient".into(),
            "Observation".into(),
            "Organization".into(),
        ]),
        patients: Some(BTreeSet::from(["patient-3".into(), "patient-4".into()])),
        compartment_only: true,
        ..Default::default()
    };
    assert_eq!(got, expected_resources(&src.config(), &filter));
    // 2 patients + 60/20*2 observations; Organization is outside the compartment.
    assert_eq!(got.len(), 8);
    assert_eq!(src.last_kickoff().unwrap().param_values("patient").len(), 2);

    let (_, manifest) = export(&c, &format!("{base}/Group/example-group/$export"), None).await;
    let got = download_all(&c, &manifest, None).await;
    let ids = expected_ids(
        &src.config(),
        &ExportFilter {
            patients: Some((0..10).map(|i| format!("patient-{i}")).collect()),
            compartment_only: true,
            ..Default::default()
        },
    );
    assert_eq!(got.len(), ids.values().map(BTreeSet::len).sum::<usize>());
    assert_eq!(ids["Patient"].len(), 10);
}

// ---------------------------------------------------------------------------------------------
// Source: status polling
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn polling_reports_progress_then_manifest() {
    let src = start_source(SourceConfig {
        in_progress_polls: 2,
        progress_retry_after: RetryAfter::Seconds(3),
        manifest_expires: Some(Duration::from_secs(3600)),
        ..Default::default()
    })
    .await;
    let c = client();
    let resp = kickoff(&c, &format!("{}/$export", src.base_url()), None).await;
    let status_url = header(&resp, "content-location").unwrap();
    for expected in ["33% complete", "66% complete"] {
        let resp = poll(&c, &status_url, None).await;
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        assert_eq!(header(&resp, "x-progress").as_deref(), Some(expected));
        assert_eq!(header(&resp, "retry-after").as_deref(), Some("3"));
    }
    let resp = poll(&c, &status_url, None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let expires = header(&resp, "expires").unwrap();
    assert!(httpdate::parse_http_date(&expires).unwrap() > SystemTime::now());
    let manifest: Value = resp.json().await.unwrap();
    assert!(parse_instant(manifest["transactionTime"].as_str().unwrap()).is_some());
    assert_eq!(
        manifest["request"],
        format!("{}/$export", src.base_url()).as_str()
    );
    assert_eq!(manifest["requiresAccessToken"], false);
    assert_eq!(manifest["error"], json!([]));
    assert!(
        manifest.get("deleted").is_none(),
        "no deleted[] without _since"
    );
    let types: Vec<(String, u64)> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["type"].as_str().unwrap().into(),
                o["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        types,
        vec![
            ("Patient".into(), 50),
            ("Observation".into(), 60),
            ("Observation".into(), 60),
            ("Condition".into(), 60)
        ]
    );
    assert_eq!(src.stats().manifests, 1);
    let job = src.jobs().pop().unwrap();
    assert_eq!((job.polls, job.progress_polls, job.completed), (3, 3, true));
}

#[tokio::test]
async fn retry_after_forms() {
    let src = start_source(SourceConfig {
        in_progress_polls: 10,
        ..Default::default()
    })
    .await;
    let c = client();
    let resp = kickoff(&c, &format!("{}/$export", src.base_url()), None).await;
    let status_url = header(&resp, "content-location").unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();

    src.update(|c| c.progress_retry_after = RetryAfter::HttpDate(120));
    let v = header(&poll(&c, &status_url, None).await, "retry-after").unwrap();
    let at = httpdate::parse_http_date(&v).unwrap();
    let ahead = at.duration_since(SystemTime::now()).unwrap().as_secs();
    assert!((110..=121).contains(&ahead), "{v}");

    src.update(|c| c.progress_retry_after = RetryAfter::EpochSeconds(600));
    let v: u64 = header(&poll(&c, &status_url, None).await, "retry-after")
        .unwrap()
        .parse()
        .unwrap();
    assert!(v >= now + 599 && v <= now + 610, "{v}");

    src.update(|c| c.progress_retry_after = RetryAfter::Omit);
    assert!(header(&poll(&c, &status_url, None).await, "retry-after").is_none());
}

#[tokio::test]
async fn polling_throttles_and_fails_on_request() {
    let src = start_source(SourceConfig {
        in_progress_polls: 1,
        throttle_polls: BTreeSet::from([1]),
        transient_error_polls: BTreeSet::from([2]),
        transient_error_status: 500,
        throttle_retry_after: RetryAfter::Seconds(2),
        ..Default::default()
    })
    .await;
    let c = client();
    let url = format!("{}/$export", src.base_url());
    let status_url = header(&kickoff(&c, &url, None).await, "content-location").unwrap();
    let resp = poll(&c, &status_url, None).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&resp, "retry-after").as_deref(), Some("2"));
    let resp = poll(&c, &status_url, None).await;
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let oo: Value = resp.json().await.unwrap();
    assert_eq!(oo["issue"][0]["code"], "transient");
    // 429 and 5xx polls do not use up the in-progress polls.
    assert_eq!(
        poll(&c, &status_url, None).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(poll(&c, &status_url, None).await.status(), StatusCode::OK);
    let stats = src.stats();
    assert_eq!(
        (stats.throttled, stats.transient_errors, stats.polls),
        (1, 1, 4)
    );

    // A permanent failure from the second poll on.
    src.update(|c| {
        c.throttle_polls.clear();
        c.transient_error_polls.clear();
        c.permanent_error = Some(PollFailure {
            from_poll: 2,
            failure: HttpFailure::new(400, "processing", "export failed for good"),
        });
    });
    let status_url = header(&kickoff(&c, &url, None).await, "content-location").unwrap();
    assert_eq!(
        poll(&c, &status_url, None).await.status(),
        StatusCode::ACCEPTED
    );
    let resp = poll(&c, &status_url, None).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        diagnostics(&resp.json().await.unwrap()),
        "export failed for good"
    );
}

#[tokio::test]
async fn sliding_window_rate_limit() {
    let src = start_source(SourceConfig {
        in_progress_polls: 100,
        poll_rate_limit: Some(RateLimit {
            max_requests: 3,
            window: Duration::from_secs(60),
        }),
        throttle_retry_after: RetryAfter::EpochSeconds(300),
        ..Default::default()
    })
    .await;
    let c = client();
    let url = format!("{}/$export", src.base_url());
    let status_url = header(&kickoff(&c, &url, None).await, "content-location").unwrap();
    for _ in 0..3 {
        assert_eq!(
            poll(&c, &status_url, None).await.status(),
            StatusCode::ACCEPTED
        );
    }
    let resp = poll(&c, &status_url, None).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let epoch: u64 = header(&resp, "retry-after").unwrap().parse().unwrap();
    assert!(epoch > 1_700_000_000);
    assert_eq!(src.stats().throttled, 1);
}

#[tokio::test]
async fn delete_cancels_job_and_frees_files() {
    let src = start_source(SourceConfig::default()).await;
    let c = client();
    let (status_url, manifest) = export(&c, &format!("{}/$export", src.base_url()), None).await;
    let file = outputs(&manifest, "output")[0].1.clone();
    let resp = c.delete(&status_url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(
        poll(&c, &status_url, None).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.get(&file).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.delete(&status_url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(src.stats().job_deletes, 1);
    assert!(src.jobs()[0].deleted);
}

// ---------------------------------------------------------------------------------------------
// Source: manifest content and files
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn since_filters_output_and_lists_deletions() {
    let src = start_source(SourceConfig {
        deleted: vec![
            ("Patient".into(), "patient-45".into()),
            ("Observation".into(), "observation-200".into()),
            ("Observation".into(), "observation-201".into()),
            ("Condition".into(), "condition-7".into()),
        ],
        deleted_per_bundle: 2,
        errors: vec![
            ErrorEntry::new("fatal", "Observation/observation-3 could not be exported"),
            ErrorEntry::new("warning", "something odd"),
        ],
        ..Default::default()
    })
    .await;
    let c = client();
    let since = "2024-01-01T00:40:00Z";
    let url = format!(
        "{}/$export?_type=Patient,Observation&_since={}",
        src.base_url(),
        since.replace(':', "%3A")
    );
    let (_, manifest) = export(&c, &url, None).await;
    let filter = ExportFilter {
        types: Some(vec!["Patient".into(), "Observation".into()]),
        since: parse_instant(since),
        ..Default::default()
    };
    let got = download_all(&c, &manifest, None).await;
    assert_eq!(got, expected_resources(&src.config(), &filter));
    // Patients 40..49 minus the deleted 45; Observations 40..119.
    assert_eq!(got.keys().filter(|(t, _)| t == "Patient").count(), 9);
    assert_eq!(got.keys().filter(|(t, _)| t == "Observation").count(), 80);
    for r in got.values() {
        let lu = parse_instant(r["meta"]["lastUpdated"].as_str().unwrap()).unwrap();
        assert!(lu >= parse_instant(since).unwrap());
    }

    let deleted = outputs(&manifest, "deleted");
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0].0, "Bundle");
    assert_eq!(manifest["deleted"][0]["count"], 2);
    let bundles = ndjson(&download(&c, &deleted[0].1, None).await);
    let mut listed = BTreeSet::new();
    for b in &bundles {
        assert_eq!(b["resourceType"], "Bundle");
        assert_eq!(b["type"], "transaction");
        for e in b["entry"].as_array().unwrap() {
            assert_eq!(e["request"]["method"], "DELETE");
            let (t, id) = e["request"]["url"]
                .as_str()
                .unwrap()
                .split_once('/')
                .unwrap();
            listed.insert((t.to_string(), id.to_string()));
        }
    }
    assert_eq!(listed, expected_deleted(&src.config(), &filter));
    assert_eq!(
        listed.len(),
        3,
        "Condition is not among the requested types"
    );

    let errors = outputs(&manifest, "error");
    assert_eq!(errors[0].0, "OperationOutcome");
    let oos = ndjson(&download(&c, &errors[0].1, None).await);
    assert_eq!(oos[0]["issue"][0]["severity"], "fatal");
    assert_eq!(oos[1]["issue"][0]["severity"], "warning");

    // deleted_always lists deletions without _since; empty files can be listed.
    src.update(|c| {
        c.deleted_always = true;
        c.emit_empty_files = true;
    });
    let url = format!("{}/$export?_since=2030-01-01T00:00:00Z", src.base_url());
    let (_, manifest) = export(&c, &url, None).await;
    let counts: Vec<u64> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, vec![0, 0, 0, 0]);
    assert_eq!(
        download(&c, &outputs(&manifest, "output")[0].1, None).await,
        ""
    );
    let (_, manifest) = export(&c, &format!("{}/$export", src.base_url()), None).await;
    assert_eq!(
        manifest["deleted"][0]["count"], 2,
        "4 deletions, 2 per bundle"
    );
}

#[tokio::test]
async fn files_stream_chunked_and_gzip_only_when_asked() {
    let src = start_source(SourceConfig {
        dataset: DatasetConfig::new(&[("Patient", 2000, 1)]),
        chunk_bytes: 4096,
        ..Default::default()
    })
    .await;
    let c = client();
    let (_, manifest) = export(&c, &format!("{}/$export", src.base_url()), None).await;
    let url = outputs(&manifest, "output")[0].1.clone();

    let plain = c.get(&url).send().await.unwrap();
    assert_eq!(plain.status(), StatusCode::OK);
    assert!(header(&plain, "content-encoding").is_none());
    assert!(header(&plain, "content-length").is_none());
    assert_eq!(
        header(&plain, "transfer-encoding").as_deref(),
        Some("chunked")
    );
    assert_eq!(
        header(&plain, "content-type").as_deref(),
        Some("application/fhir+ndjson")
    );
    let plain = plain.text().await.unwrap();
    assert!(plain.ends_with('\n'));
    assert_eq!(ndjson(&plain).len(), 2000);

    let zipped = c
        .get(&url)
        .header("accept-encoding", "gzip, deflate")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&zipped, "content-encoding").as_deref(), Some("gzip"));
    assert!(header(&zipped, "content-length").is_none());
    assert_eq!(
        header(&zipped, "transfer-encoding").as_deref(),
        Some("chunked")
    );
    let bytes = zipped.bytes().await.unwrap();
    assert!(
        bytes.len() * 5 < plain.len(),
        "gzip should shrink synthetic data"
    );
    let mut unzipped = String::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_string(&mut unzipped)
        .unwrap();
    assert_eq!(unzipped, plain);

    // gzip can be turned off entirely.
    src.update(|c| c.gzip_when_asked = false);
    let resp = c
        .get(&url)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(header(&resp, "content-encoding").is_none());

    // No trailing newline: byte-wise concatenation of two such files would join two lines.
    src.update(|c| c.no_trailing_newline = true);
    let text = download(&c, &url, None).await;
    assert!(!text.ends_with('\n'));
    assert_eq!(ndjson(&text).len(), 2000);
    assert_eq!(src.stats().files_completed, 4);
}

#[tokio::test]
async fn requires_access_token_governs_file_downloads() {
    let src = start_source(SourceConfig {
        auth: Some(AuthConfig::client_secret_basic("c", "s")),
        requires_access_token: true,
        ..Default::default()
    })
    .await;
    let c = client();
    let token = basic_token(&c, &src.token_url(), "c", "s").await;
    let (_, manifest) = export(&c, &format!("{}/$export", src.base_url()), Some(&token)).await;
    assert_eq!(manifest["requiresAccessToken"], true);
    let url = outputs(&manifest, "output")[0].1.clone();
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(!download(&c, &url, Some(&token)).await.is_empty());

    src.update(|c| c.requires_access_token = false);
    let (_, manifest) = export(&c, &format!("{}/$export", src.base_url()), Some(&token)).await;
    assert_eq!(manifest["requiresAccessToken"], false);
    let url = outputs(&manifest, "output")[0].1.clone();
    assert!(!download(&c, &url, None).await.is_empty());
    let stats = src.stats();
    assert_eq!(stats.file_gets, 3);
    assert_eq!(stats.file_gets_with_authorization, 1);
}

#[tokio::test]
async fn redirects_to_presigned_urls_on_another_origin() {
    let src = start_source(SourceConfig {
        auth: Some(AuthConfig::client_secret_basic("c", "s")),
        requires_access_token: true,
        file_routing: FileRouting::Redirect,
        routed_types: Some(BTreeSet::from(["Observation".to_string()])),
        ..Default::default()
    })
    .await;
    let c = client();
    let token = basic_token(&c, &src.token_url(), "c", "s").await;
    let (_, manifest) = export(&c, &format!("{}/$export", src.base_url()), Some(&token)).await;
    let files = outputs(&manifest, "output");
    let (_, patient_url) = files.iter().find(|(t, _)| t == "Patient").unwrap();
    let (_, obs_url) = files.iter().find(|(t, _)| t == "Observation").unwrap();
    // Unrouted types are served directly.
    assert!(!download(&c, patient_url, Some(&token)).await.is_empty());

    let resp = c.get(obs_url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TEMPORARY_REDIRECT);
    let location = header(&resp, "location").unwrap();
    assert!(location.starts_with(&src.storage_origin()));
    assert_ne!(src.storage_origin(), src.origin());
    assert!(location.contains("X-Amz-Signature="));

    // Forwarding the token to the pre-signed URL fails like S3 does.
    let resp = c.get(&location).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(resp.text().await.unwrap().contains("InvalidArgument"));
    let tampered = location.replace("X-Amz-Signature=", "X-Amz-Signature=0");
    assert_eq!(
        c.get(&tampered).send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let resp = c
        .get(&location)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        header(&resp, "content-encoding").is_none(),
        "storage never gzips"
    );
    assert_eq!(ndjson(&resp.text().await.unwrap()).len(), 60);

    // A client that follows redirects the default way (reqwest strips Authorization on a
    // cross-origin redirect) gets the file.
    let following = Client::new();
    let text = following
        .get(obs_url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(ndjson(&text).len(), 60);
    let stats = src.stats();
    assert_eq!(stats.redirects, 2);
    assert_eq!(stats.storage_rejected_authorization, 1);
    assert_eq!(stats.storage_bad_signature, 1);
    assert_eq!(stats.storage_gets, 4);

    // Pre-signed URLs straight in the manifest.
    src.update(|c| {
        c.file_routing = FileRouting::Presigned;
        c.routed_types = None;
    });
    let (_, manifest) = export(&c, &format!("{}/$export", src.base_url()), Some(&token)).await;
    for (_, url) in outputs(&manifest, "output") {
        assert!(url.starts_with(&src.storage_origin()), "{url}");
    }
    let got = download_all(&c, &manifest, None).await;
    assert_eq!(got.len(), 50 + 120 + 60);
}

#[tokio::test]
async fn connection_resets_mid_file_for_the_first_attempts() {
    let src = start_source(SourceConfig {
        dataset: DatasetConfig::new(&[("Patient", 500, 1)]),
        reset: Some(ResetKnob {
            after_bytes: 10_000,
            first_attempts: 2,
        }),
        chunk_bytes: 2048,
        ..Default::default()
    })
    .await;
    let c = client();
    let (_, manifest) = export(&c, &format!("{}/$export", src.base_url()), None).await;
    let url = outputs(&manifest, "output")[0].1.clone();
    for _ in 0..2 {
        let resp = c.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.bytes().await.is_err(), "the body must break");
    }
    let text = download(&c, &url, None).await;
    assert_eq!(ndjson(&text).len(), 500);
    let stats = src.stats();
    assert_eq!(stats.resets_injected, 2);
    assert_eq!(src.file_attempts().get("Patient.0.ndjson"), Some(&3));
}

#[tokio::test]
async fn concurrent_download_cap_and_latency() {
    let src = start_source(SourceConfig {
        // Big enough that the body cannot fit in socket buffers, so the first download stays
        // open while the second one starts.
        dataset: DatasetConfig {
            padding_bytes: 400,
            ..DatasetConfig::new(&[("Patient", 100_000, 2)])
        },
        max_concurrent_downloads: Some(1),
        throttle_retry_after: RetryAfter::Seconds(1),
        ..Default::default()
    })
    .await;
    let c = client();
    let (_, manifest) = export(&c, &format!("{}/$export", src.base_url()), None).await;
    let files = outputs(&manifest, "output");
    let first = c.get(&files[0].1).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let second = c.get(&files[1].1).send().await.unwrap();
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&second, "retry-after").as_deref(), Some("1"));
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = c.get(&files[1].1).send().await.unwrap();
        if resp.status() == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never released");
        // Polling interval: the server releases the slot on its own time.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(src.stats().downloads_rejected_concurrency >= 1);
    assert_eq!(src.stats().max_concurrent_downloads_seen, 1);

    src.update(|c| c.latency = Duration::from_millis(300));
    let started = Instant::now();
    let _ = c
        .get(format!("{}/metadata", src.base_url()))
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn ten_thousand_tiny_files() {
    let src = start_source(SourceConfig {
        dataset: DatasetConfig::new(&[("Observation", 10_000, 10_000)]),
        ..Default::default()
    })
    .await;
    let c = client();
    let (_, manifest) = export(&c, &format!("{}/$export", src.base_url()), None).await;
    let files = outputs(&manifest, "output");
    assert_eq!(files.len(), 10_000);
    let text = download(&c, &files[9_999].1, None).await;
    let lines = ndjson(&text);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["id"], "observation-9999");
}

#[tokio::test]
async fn large_file_streams_without_buffering() {
    // ~40 MB here; the same code path serves multi-gigabyte files (see the ignored test).
    let src = start_source(SourceConfig {
        dataset: DatasetConfig {
            padding_bytes: 1000,
            ..DatasetConfig::new(&[("Patient", 30_000, 1)])
        },
        chunk_bytes: 256 * 1024,
        ..Default::default()
    })
    .await;
    let c = client();
    let (_, manifest) = export(&c, &format!("{}/$export", src.base_url()), None).await;
    let url = outputs(&manifest, "output")[0].1.clone();
    let mut resp = c.get(&url).send().await.unwrap();
    let (mut bytes, mut newlines) = (0usize, 0usize);
    while let Some(chunk) = resp.chunk().await.unwrap() {
        bytes += chunk.len();
        newlines += chunk.iter().filter(|b| **b == b'\n').count();
    }
    assert_eq!(newlines, 30_000);
    assert!(bytes > 30_000_000);
}

// ---------------------------------------------------------------------------------------------
// Pathling: detection and request validation
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn metadata_identifies_the_generation() {
    let c = client();
    for (config, name, version) in [
        (PathlingConfig::v7(&[]), "Pathling", "7.2.0+abc"),
        (PathlingConfig::v9(&[]), "Pathling Server", "9.8.0+abc"),
    ] {
        let p = FakePathling::start(config).await.unwrap();
        let cs: Value = c
            .get(format!("{}/metadata", p.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(cs["resourceType"], "CapabilityStatement");
        assert_eq!(cs["software"]["name"], name);
        assert_eq!(cs["software"]["version"], version);
        p.update(|c| c.version_override = Some("UNKNOWN".into()));
        let cs: Value = c
            .get(format!("{}/metadata", p.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(cs["software"]["version"], "UNKNOWN");
    }
}

#[tokio::test]
async fn import_requires_its_headers() {
    let p = FakePathling::start(PathlingConfig::v9(&["file:///"]))
        .await
        .unwrap();
    let c = client();
    let body = v9_body("merge", &[("Patient", "file:///tmp/x.ndjson")]).to_string();
    let url = format!("{}/$import", p.base_url());
    let resp = c
        .post(&url)
        .header("content-type", "text/plain")
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let resp = c
        .post(&url)
        .header("content-type", "application/fhir+json")
        .header("prefer", "respond-async")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_ACCEPTABLE);
    let resp = c
        .post(&url)
        .header("content-type", "application/fhir+json")
        .header("accept", "application/fhir+json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "9.x is async only");
    let statuses: Vec<u16> = p.import_requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![415, 406, 400]);
    assert_eq!(p.stats().imports_accepted, 0);
}

#[tokio::test]
async fn each_generation_rejects_the_other_request_shape() {
    let c = client();
    let v9 = FakePathling::start(PathlingConfig::v9(&["file:///"]))
        .await
        .unwrap();
    let resp = post_import(&c, &v9, &v7_body(&[("Patient", "file:///x", "merge")])).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        diagnostics(&resp.json().await.unwrap()),
        "The input may not be empty."
    );

    let v7 = FakePathling::start(PathlingConfig::v7(&["file:///"]))
        .await
        .unwrap();
    let resp = post_import(&c, &v7, &v9_body("merge", &[("Patient", "file:///x")])).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let msg = diagnostics(&resp.json().await.unwrap());
    assert!(msg.contains("'source'") && msg.contains("9.2"), "{msg}");

    // 9.x takes valueCode only.
    let mut body = v9_body("merge", &[("Patient", "file:///x")]);
    body["parameter"][1] = json!({"name": "saveMode", "valueCoding": {"code": "merge"}});
    let resp = post_import(&c, &v9, &body).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = post_import(&c, &v9, &v9_body("upsert", &[("Patient", "file:///x")])).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = post_import(&c, &v7, &v7_body(&[("Patient", "file:///x", "append")])).await;
    assert_eq!(
        resp.status(),
        StatusCode::BAD_REQUEST,
        "7.x knows merge/overwrite only"
    );
}

#[tokio::test]
async fn allow_list_uses_plain_prefixes() {
    let c = client();
    let v7 = FakePathling::start(PathlingConfig::v7(&["s3a://staging/"]))
        .await
        .unwrap();
    let resp = post_import(
        &c,
        &v7,
        &v7_body(&[("Patient", "s3://other/x.ndjson", "merge")]),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(diagnostics(&resp.json().await.unwrap()).starts_with("Not allowed to import from URL"));
    // s3:// is rewritten to s3a:// and then allowed; reading fails (no S3 configured).
    let resp = post_import(
        &c,
        &v7,
        &v7_body(&[("Patient", "s3://staging/x.ndjson", "merge")]),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let (status, body) = finish_job(&c, &header(&resp, "content-location").unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(diagnostics(&body).contains("no S3 access"));
    let job = &v7.jobs()[0];
    assert_eq!(job.inputs[0].url, "s3a://staging/x.ndjson");
    assert_eq!(job.status, JobStatus::Failed);

    let v9 = FakePathling::start(PathlingConfig::v9(&["s3a://staging"]))
        .await
        .unwrap();
    let resp = post_import(
        &c,
        &v9,
        &v9_body("merge", &[("Patient", "s3a://elsewhere/x")]),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        diagnostics(&resp.json().await.unwrap()),
        "s3a://elsewhere/x is not an allowed source for import."
    );
    // Plain startsWith: without a trailing slash, a sibling bucket passes.
    let resp = post_import(
        &c,
        &v9,
        &v9_body("merge", &[("Patient", "s3a://staging-evil/x")]),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
}

// ---------------------------------------------------------------------------------------------
// Pathling: jobs and data
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn v9_merge_then_overwrite_from_files() {
    let dir = scratch_dir();
    let a = dir.write("a/Patient.ndjson", &patients_ndjson(&["p1", "p2"], "First"));
    let b = dir.write(
        "b/Patient.ndjson",
        &patients_ndjson(&["p2", "p3"], "Second"),
    );
    let p = FakePathling::start(PathlingConfig {
        import_duration_polls: 2,
        ..PathlingConfig::v9(&[&dir.url()])
    })
    .await
    .unwrap();
    let c = client();
    let resp = post_import(
        &c,
        &p,
        &v9_body("merge", &[("Patient", &a), ("Patient", &b)]),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let job_url = header(&resp, "content-location").unwrap();
    assert!(
        job_url.starts_with(&format!("{}/$job?id=", p.base_url())),
        "{job_url}"
    );
    for pct in ["33%", "66%"] {
        let resp = c.get(&job_url).send().await.unwrap();
        if resp.status() == StatusCode::ACCEPTED
            && header(&resp, "x-progress").as_deref() == Some(pct)
        {
            continue;
        }
        panic!(
            "expected 202 {pct}, got {} {:?}",
            resp.status(),
            header(&resp, "x-progress")
        );
    }
    assert_eq!(
        p.resource_count("Patient"),
        0,
        "not applied before completion"
    );
    let (status, body) = finish_job(&c, &job_url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["resourceType"], "Parameters");
    let names: Vec<&str> = body["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["transactionTime", "request", "output", "output"]
    );
    assert_eq!(body["parameter"][2]["part"][0]["name"], "inputUrl");
    assert_eq!(body["parameter"][2]["part"][0]["valueUrl"], a.as_str());
    assert_eq!(
        p.resource_ids("Patient"),
        BTreeSet::from(["p1".into(), "p2".into(), "p3".into()])
    );
    assert_eq!(
        p.resource("Patient", "p2").unwrap()["name"][0]["family"],
        "Second"
    );

    let (status, _) = import_and_wait(&c, &p, &v9_body("overwrite", &[("Patient", &a)])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        p.resource_ids("Patient"),
        BTreeSet::from(["p1".into(), "p2".into()])
    );
    assert_eq!(p.stats().jobs_completed, 2);
}

#[tokio::test]
async fn v9_append_ignore_and_error_modes() {
    let dir = scratch_dir();
    let a = dir.write("Patient.ndjson", &patients_ndjson(&["p1"], "A"));
    let b = dir.write("Patient2.ndjson", &patients_ndjson(&["p2"], "B"));
    let obs = dir.write(
        "Observation.ndjson",
        &json!({"resourceType": "Observation", "id": "o1"}).to_string(),
    );
    let p = FakePathling::start(PathlingConfig {
        import_duration_polls: 0,
        ..PathlingConfig::v9(&[&dir.url()])
    })
    .await
    .unwrap();
    let c = client();
    assert_eq!(
        import_and_wait(&c, &p, &v9_body("append", &[("Patient", &a)]))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        import_and_wait(&c, &p, &v9_body("append", &[("Patient", &b)]))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(p.resource_count("Patient"), 2);
    // ignore: Patient has data and is skipped, Observation is new and imported.
    let body = v9_body("ignore", &[("Patient", &a), ("Observation", &obs)]);
    let mut body = body;
    body["parameter"][2]["part"][1]["valueUrl"] = json!(b.replace("Patient2", "Patient"));
    assert_eq!(import_and_wait(&c, &p, &body).await.0, StatusCode::OK);
    assert_eq!(p.resource_count("Patient"), 2);
    assert_eq!(p.resource_count("Observation"), 1);
    let (status, body) = import_and_wait(&c, &p, &v9_body("error", &[("Observation", &obs)])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(diagnostics(&body).contains("already exists"));
    assert_eq!(p.stats().jobs_failed, 1);
}

#[tokio::test]
async fn v7_applies_sources_in_order_and_reports_success() {
    let dir = scratch_dir();
    let a = dir.write("a.ndjson", &patients_ndjson(&["p1", "p2"], "A"));
    let b = dir.write("b.ndjson", &patients_ndjson(&["p3"], "B"));
    let p = FakePathling::start(PathlingConfig::v7(&["file:///"]))
        .await
        .unwrap();
    let c = client();
    let (status, body) = import_and_wait(
        &c,
        &p,
        &v7_body(&[("Patient", &a, "overwrite"), ("Patient", &b, "overwrite")]),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert_eq!(diagnostics(&body), "Data import completed successfully");
    // Each overwrite source replaces the type: only the last file's data remains.
    assert_eq!(p.resource_ids("Patient"), BTreeSet::from(["p3".into()]));
    let (status, _) = import_and_wait(&c, &p, &v7_body(&[("Patient", &a, "merge")])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(p.resource_count("Patient"), 3);

    // Without Prefer, 7.x runs the import inside the request.
    let resp = c
        .post(format!("{}/$import", p.base_url()))
        .header("content-type", "application/fhir+json")
        .header("accept", "application/fhir+json")
        .body(v7_body(&[("Patient", &b, "overwrite")]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(p.resource_count("Patient"), 1);
    assert_eq!(p.stats().sync_imports, 1);

    // 7.x has no delete interaction.
    let resp = c
        .delete(format!("{}/Patient/p3", p.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn one_import_at_a_time_and_v9_dedupes_identical_requests() {
    let dir = scratch_dir();
    let a = dir.write("a.ndjson", &patients_ndjson(&["p1"], "A"));
    let b = dir.write("b.ndjson", &patients_ndjson(&["p2"], "B"));
    let p = FakePathling::start(PathlingConfig {
        import_duration_polls: 3,
        ..PathlingConfig::v9(&["file:///"])
    })
    .await
    .unwrap();
    let c = client();
    let first = post_import(&c, &p, &v9_body("merge", &[("Patient", &a)])).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first_url = header(&first, "content-location").unwrap();
    let busy = post_import(&c, &p, &v9_body("merge", &[("Patient", &b)])).await;
    assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        diagnostics(&busy.json().await.unwrap()),
        "Another import operation is currently in progress"
    );
    // The identical request gets the running job back instead of a 503.
    let again = post_import(&c, &p, &v9_body("merge", &[("Patient", &a)])).await;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&again, "content-location").unwrap(), first_url);
    assert_eq!(finish_job(&c, &first_url).await.0, StatusCode::OK);
    // ... and, once done, still the same job (even if the data changed since).
    let again = post_import(&c, &p, &v9_body("merge", &[("Patient", &a)])).await;
    assert_eq!(header(&again, "content-location").unwrap(), first_url);
    // DELETE the job to force a rerun.
    assert_eq!(
        c.delete(&first_url).send().await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        c.get(&first_url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let rerun = post_import(&c, &p, &v9_body("merge", &[("Patient", &a)])).await;
    assert_eq!(rerun.status(), StatusCode::ACCEPTED);
    assert_ne!(header(&rerun, "content-location").unwrap(), first_url);
    let stats = p.stats();
    assert_eq!(
        (
            stats.rejected_busy,
            stats.deduplicated,
            stats.imports_accepted
        ),
        (1, 2, 2)
    );

    p.update(|c| c.external_import_running = true);
    let busy = post_import(&c, &p, &v9_body("merge", &[("Patient", &b)])).await;
    assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        c.get(format!("{}/$job?id=nope", p.base_url()))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn bad_data_fails_the_job() {
    let dir = scratch_dir();
    let wrong_type = dir.write(
        "w.ndjson",
        &json!({"resourceType": "Observation", "id": "o1"}).to_string(),
    );
    let no_id = dir.write("n.ndjson", &json!({"resourceType": "Patient"}).to_string());
    let not_json = dir.write(
        "j.ndjson",
        "{\"resourceType\":\"Patient\",\"id\":\"a\"}{oops}\n",
    );
    let p = FakePathling::start(PathlingConfig {
        import_duration_polls: 0,
        ..PathlingConfig::v9(&["file:///"])
    })
    .await
    .unwrap();
    let c = client();
    for (url, needle) in [
        (&wrong_type, "does not match"),
        (&no_id, "no id"),
        (&not_json, "invalid JSON"),
        (&format!("{}missing.ndjson", dir.url()), "Unable to read"),
    ] {
        let (status, body) = import_and_wait(&c, &p, &v9_body("merge", &[("Patient", url)])).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}");
        assert_eq!(body["resourceType"], "OperationOutcome");
        assert!(
            diagnostics(&body).contains(needle),
            "{}",
            diagnostics(&body)
        );
    }
    assert_eq!(p.total_resources(), 0);
    p.update(|c| c.fail_imports = Some(ImportFailure::new(500, "exception", "disk full")));
    let good = dir.write("g.ndjson", &patients_ndjson(&["p1"], "G"));
    let (status, body) = import_and_wait(&c, &p, &v9_body("merge", &[("Patient", &good)])).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(diagnostics(&body), "disk full");
}

#[tokio::test]
async fn reads_directories_gzip_and_json_manifests() {
    let dir = scratch_dir();
    dir.write(
        "patients/part-1.ndjson",
        &patients_ndjson(&["p1", "p2"], "A"),
    );
    dir.write("patients/_SUCCESS", "");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, patients_ndjson(&["p3"], "Z").as_bytes()).unwrap();
    std::fs::write(
        dir.path().join("patients/part-2.ndjson.gz"),
        gz.finish().unwrap(),
    )
    .unwrap();
    let p = FakePathling::start(PathlingConfig {
        import_duration_polls: 0,
        ..PathlingConfig::v9(&["file:///"])
    })
    .await
    .unwrap();
    let c = client();
    let manifest = json!({
        "inputFormat": "application/fhir+ndjson",
        "input": [{"type": "Patient", "url": format!("{}patients", dir.url())}],
        "saveMode": "merge",
    });
    let resp = c
        .post(format!("{}/$import", p.base_url()))
        .header("content-type", "application/json")
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .body(manifest.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let (status, _) = finish_job(&c, &header(&resp, "content-location").unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(p.resource_count("Patient"), 3);
    assert_eq!(p.last_import_request().unwrap().body.unwrap(), manifest);
}

#[tokio::test]
async fn v9_deletes_single_and_batch() {
    let p = FakePathling::start(PathlingConfig::v9(&["file:///"]))
        .await
        .unwrap();
    p.seed(
        "Patient",
        ["p1", "p2", "p3"].map(|id| json!({"resourceType": "Patient", "id": id})),
    );
    let c = client();
    let url = format!("{}/Patient/p1", p.base_url());
    assert_eq!(c.get(&url).send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        c.delete(&url).send().await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        c.delete(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "DELETE", "url": "Patient/p2"}},
        {"request": {"method": "DELETE", "url": "Patient/p1"}},
        {"request": {"method": "DELETE", "url": "not a reference"}},
    ]});
    let resp = c
        .post(p.base_url())
        .header("content-type", "application/fhir+json")
        .header("accept", "application/fhir+json")
        .body(bundle.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let out: Value = resp.json().await.unwrap();
    assert_eq!(out["type"], "batch-response");
    let statuses: Vec<&str> = out["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        vec!["204 No Content", "404 Not Found", "400 Bad Request"]
    );
    assert_eq!(p.resource_ids("Patient"), BTreeSet::from(["p3".into()]));
    assert_eq!(
        p.deletes_applied(),
        vec![
            ("Patient".into(), "p1".into()),
            ("Patient".into(), "p2".into())
        ]
    );
    assert_eq!(p.stats().deletes_not_found, 2);
}

#[tokio::test]
async fn pathling_auth_serves_its_own_discovery() {
    let p = FakePathling::start(PathlingConfig {
        auth: Some(AuthConfig::client_secret_post("target", "pw")),
        ..PathlingConfig::v9(&["file:///"])
    })
    .await
    .unwrap();
    let c = client();
    let doc: Value = c
        .get(format!("{}/.well-known/smart-configuration", p.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["token_endpoint"], p.token_url().as_str());
    let dir = scratch_dir();
    let a = dir.write("a.ndjson", &patients_ndjson(&["p1"], "A"));
    let body = v9_body("merge", &[("Patient", &a)]);
    assert_eq!(
        post_import(&c, &p, &body).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let (status, tok, _) = token_request(
        &c,
        &p.token_url(),
        &[
            ("grant_type", "client_credentials"),
            ("scope", "user/*.write"),
            ("client_id", "target"),
            ("client_secret", "pw"),
        ],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let token = tok["access_token"].as_str().unwrap();
    let resp = c
        .post(format!("{}/$import", p.base_url()))
        .bearer_auth(token)
        .header("content-type", "application/fhir+json")
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let job = header(&resp, "content-location").unwrap();
    assert_eq!(
        c.get(&job).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        c.get(&job)
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::ACCEPTED
    );
    // metadata stays open, as on real servers.
    assert_eq!(
        c.get(format!("{}/metadata", p.base_url()))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}

// ---------------------------------------------------------------------------------------------
// End to end: fake source → files → fake Pathling, and S3
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn exported_files_import_into_pathling() {
    let src = start_source(SourceConfig {
        no_trailing_newline: true,
        ..Default::default()
    })
    .await;
    let c = client();
    let (_, manifest) = export(&c, &format!("{}/$export", src.base_url()), None).await;
    let dir = scratch_dir();
    let mut inputs = Vec::new();
    for (i, (t, url)) in outputs(&manifest, "output").into_iter().enumerate() {
        let file = dir.write(&format!("{t}-{i}.ndjson"), &download(&c, &url, None).await);
        inputs.push((t, file));
    }
    let p = FakePathling::start(PathlingConfig {
        import_duration_polls: 0,
        ..PathlingConfig::v9(&[&dir.url()])
    })
    .await
    .unwrap();
    let refs: Vec<(&str, &str)> = inputs
        .iter()
        .map(|(t, u)| (t.as_str(), u.as_str()))
        .collect();
    let (status, _) = import_and_wait(&c, &p, &v9_body("merge", &refs)).await;
    assert_eq!(status, StatusCode::OK);
    let expected = expected_resources(&src.config(), &ExportFilter::default());
    let stored: BTreeMap<(String, String), Value> = p
        .resources()
        .into_iter()
        .flat_map(|(t, m)| m.into_iter().map(move |(id, r)| ((t.clone(), id), r)))
        .collect();
    assert_eq!(stored, expected);
}

#[tokio::test]
async fn pathling_reads_s3_through_moto() {
    let endpoint = std::env::var("MOTO_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "MOTO_ENDPOINT is not set: this test reads staged files from a moto S3 server. Run \
             `\"$(bash .ci/moto.sh)\" -H 127.0.0.1 -p 5055 &` and set \
             MOTO_ENDPOINT=http://127.0.0.1:5055"
        )
    });
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(&endpoint)
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .force_path_style(true)
        .build();
    let s3 = aws_sdk_s3::Client::from_conf(conf);
    let bucket = format!("fakes-{}", uuid::Uuid::new_v4().simple());
    s3.create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .unwrap_or_else(|e| panic!("cannot reach moto at {endpoint}: {e:?}"));
    for (key, ids) in [
        ("stage/Patient/a.ndjson", ["p1", "p2"]),
        ("stage/Patient/b.ndjson", ["p3", "p4"]),
    ] {
        s3.put_object()
            .bucket(&bucket)
            .key(key)
            .body(patients_ndjson(&ids, "S3").into_bytes().into())
            .send()
            .await
            .unwrap();
    }
    let access = S3Access::new(&endpoint, "test", "test");
    let prefix = format!("s3a://{bucket}/stage/");
    let v7 = FakePathling::start(PathlingConfig {
        s3: Some(access.clone()),
        import_duration_polls: 0,
        ..PathlingConfig::v7(&[&prefix])
    })
    .await
    .unwrap();
    let c = client();
    let object = format!("s3://{bucket}/stage/Patient/a.ndjson");
    let (status, body) = import_and_wait(&c, &v7, &v7_body(&[("Patient", &object, "merge")])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        v7.resource_ids("Patient"),
        BTreeSet::from(["p1".into(), "p2".into()])
    );

    let v9 = FakePathling::start(PathlingConfig {
        s3: Some(access),
        import_duration_polls: 0,
        generation: Generation::V9,
        ..PathlingConfig::v9(&[&prefix])
    })
    .await
    .unwrap();
    // A prefix without an object reads every object under it.
    let dir_url = format!("s3a://{bucket}/stage/Patient");
    let (status, body) =
        import_and_wait(&c, &v9, &v9_body("merge", &[("Patient", &dir_url)])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(v9.resource_count("Patient"), 4);
    let missing = format!("s3a://{bucket}/stage/none.ndjson");
    let (status, _) =
        import_and_wait(&c, &v9, &v9_body("overwrite", &[("Patient", &missing)])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn remaining_knobs() {
    let c = client();
    // Source: the granted scope may differ from the requested one.
    let mut auth = AuthConfig::client_secret_basic("c", "s");
    auth.granted_scope = Some("system/Patient.rs".into());
    let src = start_source(SourceConfig {
        auth: Some(auth),
        ..Default::default()
    })
    .await;
    let (status, body, headers) = token_request(
        &c,
        &src.token_url(),
        &[
            ("grant_type", "client_credentials"),
            ("scope", "system/*.rs"),
        ],
        Some(&basic_header("c", "s")),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["scope"], "system/Patient.rs");
    assert_eq!(headers.get("cache-control").unwrap(), "no-store");
    assert_eq!(
        src.auth_stats().last_requested_scope.as_deref(),
        Some("system/*.rs")
    );
    let token = body["access_token"].as_str().unwrap().to_string();
    // A POST kick-off needs a FHIR JSON body.
    let resp = c
        .post(format!("{}/Patient/$export", src.base_url()))
        .headers(bulk_headers(Some(&token)))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Only the configured output formats are accepted.
    src.update(|c| c.supported_output_formats = vec!["application/fhir+ndjson".into()]);
    let resp = kickoff(
        &c,
        &format!("{}/$export?_outputFormat=ndjson", src.base_url()),
        Some(&token),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // Pathling: formats the fake cannot read fail the job, not the kick-off.
    let p = FakePathling::start(PathlingConfig {
        import_duration_polls: 0,
        dedupe_identical_requests: false,
        ..PathlingConfig::v9(&["file:///"])
    })
    .await
    .unwrap();
    let mut body = v9_body("merge", &[("Patient", "file:///tmp/x.parquet")]);
    body["parameter"][0]["valueCode"] = json!("application/vnd.apache.parquet");
    let (status, out) = import_and_wait(&c, &p, &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(diagnostics(&out).contains("only NDJSON"));
    // Without deduplication the identical request makes a new job.
    let (status, _) = import_and_wait(&c, &p, &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(p.jobs().len(), 2);
    assert_eq!(p.stats().deduplicated, 0);
    p.seed("Patient", [json!({"resourceType": "Patient", "id": "x"})]);
    p.clear_store();
    assert_eq!(p.total_resources(), 0);
    p.update(|c| c.latency = Duration::from_millis(200));
    let started = Instant::now();
    c.get(format!("{}/metadata", p.base_url()))
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
}
