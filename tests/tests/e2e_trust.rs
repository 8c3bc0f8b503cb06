//! End-to-end: what the CLI trusts, against the fakes on 127.0.0.1.
//!
//! - A stored run is bound to the configured endpoints: a state file rewritten to send the run
//!   to another host is refused before any request (exit 2 naming the key); `--rebind` lists
//!   the difference and continues with the configured settings.
//! - Whether a download carries the source's bearer token is decided at use, from the URL: a
//!   stored manifest rewritten to ask for the token everywhere sends none to another origin.
//! - An oversized manifest fails the run naming `MANIFEST_MAX_SIZE`, with the CLI's memory
//!   bounded by the limit (measured: `VmHWM`).
//! - Server-supplied URLs to the cloud metadata service (a manifest file, a `Content-Location`)
//!   are refused before connecting, naming the host and not the path.
//! - A source on https with a private CA: refused at once (a TLS failure is permanent) without
//!   the CA, trusted with `SOURCE_CA_FILE` or with `SSL_CERT_FILE`; an unusable CA file is bad
//!   configuration.
//!
//! Every run uses distinctive secrets (the source's client secret, the target's client secret
//! and private key): the harness checks that none appears in the output, the state file or any
//! file under the sandbox (staged objects, manifests, the watermark).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::tls::private_ca;
use common::*;
use pathling_import_runners::net::AddressPolicy;
use pathling_import_tests::auth::AuthConfig;
use pathling_import_tests::data::DatasetConfig;
use pathling_import_tests::fake_pathling::{FakePathling, FakePathlingHandle, PathlingConfig};
use pathling_import_tests::fake_source::{
    FakeSource, FakeSourceHandle, FileRouting, OversizedManifest, SourceConfig,
};
use pathling_import_tests::fhir::RetryAfter;
use pathling_import_tests::keys::TestKey;
use pathling_import_tests::server::TlsIdentity;
use serde_json::{json, Value};

const TARGET_CLIENT: &str = "trust-importer";

struct World {
    sandbox: Sandbox,
    src: FakeSourceHandle,
    pathling: FakePathlingHandle,
}

/// The fake source (on https when `tls` is given) with `client_secret_post`, when `auth`; the
/// fake Pathling 9 with `private_key_jwt`; directory staging. The CLI's configuration holds a
/// target client secret too (unused by `private_key_jwt`, and so never to be seen anywhere).
async fn world_with(source: SourceConfig, auth: bool, tls: Option<&TlsIdentity>) -> World {
    let mut sandbox = Sandbox::new();
    let staging = Staging::Dir;
    let source_auth = SourceAuth::post();
    let source = SourceConfig {
        auth: auth.then(|| source_auth.fake.clone()),
        ..source
    };
    let src = match tls {
        Some(identity) => FakeSource::start_tls(source, identity).await.unwrap(),
        None => FakeSource::start(source).await.unwrap(),
    };
    let key = TestKey::generate_ec().unwrap();
    let allowed = staging.allowable_sources(&sandbox);
    let pathling = FakePathling::start(PathlingConfig {
        import_duration_polls: 0,
        auth: Some(AuthConfig::private_key_jwt(TARGET_CLIENT, &[&key])),
        ..PathlingConfig::v9(&[allowed[0].as_str()])
    })
    .await
    .unwrap();
    let target_secret = secret_value("target");
    sandbox
        .configure(&src.base_url(), &pathling.base_url(), &staging)
        .set("targetAuthenticationEnabled", true)
        .set("targetClientId", TARGET_CLIENT)
        .set("targetAuthMethod", "private_key_jwt")
        .set("targetPrivateKey", key.private_jwk.to_string())
        .set("targetClientSecret", target_secret.as_str())
        .secret(&target_secret)
        .secret(key.private_jwk["d"].as_str().unwrap());
    for line in key.private_pem.lines().filter(|l| l.len() >= 40) {
        sandbox.secret(line);
    }
    if auth {
        sandbox.source_auth(&source_auth);
    } else {
        // The secret is configured all the same (authentication off): it must not leak either.
        sandbox
            .set("sourceClientSecret", source_auth.secrets[0].as_str())
            .secret(&source_auth.secrets[0]);
    }
    World {
        sandbox,
        src,
        pathling,
    }
}

async fn world(source: SourceConfig) -> World {
    world_with(source, true, None).await
}

fn small_dataset() -> DatasetConfig {
    DatasetConfig::new(&[("Patient", 20, 2), ("Observation", 40, 2)])
}

fn write_state(sandbox: &Sandbox, state: &Value) {
    std::fs::write(
        sandbox.state_path(),
        serde_json::to_vec_pretty(state).unwrap(),
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// A stored run bound to the configured endpoints
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_pointing_at_a_foreign_source_is_refused_before_any_request() {
    let foreign = Recorder::start().await;
    let w = world(SourceConfig {
        dataset: small_dataset(),
        in_progress_polls: 1_000,
        progress_retry_after: RetryAfter::Seconds(1),
        ..SourceConfig::default()
    })
    .await;

    // An unfinished run: stopped (SIGTERM) while the export runs.
    let mut first = w.sandbox.spawn(&[]);
    w.sandbox
        .wait_for_state(
            &mut first,
            "the export to be polled",
            Duration::from_secs(30),
            |s| phase_of(s) == "polling_export",
        )
        .await;
    first.signal("TERM");
    first.wait(Duration::from_secs(30)).await.assert_code(130);
    let run_id = w.sandbox.run_id();

    // Whoever can write the state file sends the run (and so the configured client secret,
    // client_secret_post puts it in the token request's body) elsewhere.
    let mut state = w.sandbox.state().unwrap();
    assert_eq!(state["spec"]["source"]["endpoint"], json!(w.src.base_url()));
    let foreign_base = format!("{}/fhir", foreign.url());
    state["spec"]["source"]["endpoint"] = json!(foreign_base);
    write_state(&w.sandbox, &state);

    let out = w.sandbox.run(&[]).await;
    out.assert_code(2)
        .assert_stderr_contains(&format!("run {run_id} was started with other settings"))
        .assert_stderr_contains("SOURCE_ENDPOINT")
        .assert_stderr_contains("--rebind");
    assert!(
        foreign.requests().is_empty(),
        "the foreign host was contacted: {:?}",
        foreign.requests()
    );
    assert_eq!(
        w.sandbox.state().unwrap(),
        state,
        "a refused run is left as it was"
    );
    let kickoffs = w.src.stats().kickoffs;

    // The operator's explicit choice: continue with the configured endpoint.
    w.src.update(|c| c.in_progress_polls = 0);
    let out = w.sandbox.run(&["--rebind"]).await;
    out.assert_code(0)
        .assert_stderr_contains(&format!(
            "--rebind: run {run_id} continues with the configured settings:"
        ))
        .assert_stderr_contains(&format!(
            "SOURCE_ENDPOINT: the run has {foreign_base:?}, the configuration {:?}",
            w.src.base_url()
        ));
    assert!(foreign.requests().is_empty(), "{:?}", foreign.requests());
    assert_eq!(w.sandbox.run_id(), run_id, "the same run continued");
    assert_eq!(w.sandbox.phase(), "succeeded");
    assert_eq!(
        w.src.stats().kickoffs,
        kickoffs,
        "the export was not restarted"
    );
    assert_pathling_holds_export(&w.pathling, &w.src);
}

// ---------------------------------------------------------------------------------------------
// The bearer token's destination is decided at use
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_manifest_flipped_to_send_tokens_sends_none_to_another_origin() {
    let mut w = world(SourceConfig {
        dataset: DatasetConfig::new(&[("Patient", 40, 4), ("Observation", 160, 8)]),
        requires_access_token: true,
        // Every file URL in the manifest is a pre-signed URL of the storage origin.
        file_routing: FileRouting::Presigned,
        in_progress_polls: 0,
        latency: Duration::from_millis(150),
        ..SourceConfig::default()
    })
    .await;
    w.sandbox.set("transferConcurrency", 2);

    let mut first = w.sandbox.spawn(&[]);
    let at_kill = w
        .sandbox
        .wait_for_state(
            &mut first,
            "two downloaded files",
            Duration::from_secs(60),
            // The state file records staged files at most once a second: the source's
            // counter says sooner that the transfer is under way.
            |s| phase_of(s) == "staging_files" && w.src.stats().files_completed >= 2,
        )
        .await;
    first.kill().await;
    let run_id = w.sandbox.run_id();
    let staged_before = staged_indexes(&w.sandbox.state().unwrap()).len();
    assert!(staged_before < 12, "the transfer was not interrupted");
    assert_eq!(phase_of(&at_kill), "staging_files");

    // Whoever can write the staging prefix asks for the token on every download.
    let manifest_path = w.sandbox.staging_dir().join(&run_id).join("manifest.json");
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    assert_eq!(manifest["requires_access_token"], json!(true));
    let files = manifest["files"].as_array_mut().unwrap();
    assert_eq!(files.len(), 12);
    for file in files.iter_mut() {
        assert_eq!(file["send_token"], json!(false), "{file}");
        assert!(file["url"]
            .as_str()
            .unwrap()
            .starts_with(&w.src.storage_origin()));
        file["send_token"] = json!(true);
    }
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let storage_gets = w.src.stats().storage_gets;

    let out = w.sandbox.run(&[]).await;
    out.assert_code(0);
    assert_eq!(w.sandbox.run_id(), run_id);
    let stats = w.src.stats();
    assert!(
        stats.storage_gets > storage_gets,
        "the rerun downloaded nothing from the storage origin: {stats:?}"
    );
    assert_eq!(
        stats.storage_rejected_authorization, 0,
        "the source's bearer token was sent to the storage origin: {stats:?}"
    );
    assert_pathling_holds_export(&w.pathling, &w.src);
}

// ---------------------------------------------------------------------------------------------
// An oversized manifest
// ---------------------------------------------------------------------------------------------

/// `VmHWM` (peak resident memory) of a running process, in KiB.
fn peak_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Runs the CLI, polling its peak memory until it exits: (output, peak KiB).
async fn run_measured(sandbox: &Sandbox) -> (CliOutput, u64) {
    let mut running = sandbox.spawn(&[]);
    let pid = running.pid();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut peak = 0;
    while !running.exited() {
        if let Some(kib) = peak_kib(pid) {
            peak = peak.max(kib);
        }
        assert!(Instant::now() < deadline, "the CLI did not finish");
        // Sampling interval: the peak is read from /proc while the process still exists.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (running.wait(Duration::from_secs(10)).await, peak)
}

fn oversized(content_length: bool) -> SourceConfig {
    SourceConfig {
        in_progress_polls: 0,
        oversized_manifest: Some(OversizedManifest {
            bytes: 65 * 1024 * 1024,
            content_length,
        }),
        ..SourceConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_65_mib_manifest_fails_naming_manifest_max_size_with_memory_bounded() {
    // The base allowance, measured: the larger peak of a whole successful run with a small
    // manifest, and of the same 65 MiB answer refused at a 1 MiB limit (the same code path,
    // its HTTP buffers, and 1 MiB of body); plus 2 MiB for the allocator's noise.
    let small = world(SourceConfig {
        dataset: small_dataset(),
        in_progress_polls: 0,
        ..SourceConfig::default()
    })
    .await;
    let (out, successful_kib) = run_measured(&small.sandbox).await;
    out.assert_code(0);
    let mut at_1_mib = world(oversized(false)).await;
    at_1_mib.sandbox.set("manifestMaxSize", 1);
    let (out, at_1_mib_kib) = run_measured(&at_1_mib.sandbox).await;
    out.assert_code(1)
        .assert_stderr_contains("more than the 1 MiB pathling-import reads (MANIFEST_MAX_SIZE)");
    let base_kib = successful_kib.max(at_1_mib_kib) + 2 * 1024;
    let limit_kib = 64 * 1024 + base_kib;
    println!(
        "base allowance {base_kib} KiB (peak of a small successful run {successful_kib} KiB, \
         of a 1 MiB limit refusing the manifest {at_1_mib_kib} KiB, + 2 MiB)"
    );

    for content_length in [false, true] {
        let w = world(oversized(content_length)).await;
        let (out, kib) = run_measured(&w.sandbox).await;
        println!(
            "65 MiB manifest {}: peak {kib} KiB (limit {limit_kib} KiB)",
            if content_length {
                "with Content-Length"
            } else {
                "chunked"
            }
        );
        out.assert_code(1).assert_stderr_contains(
            "more than the 64 MiB pathling-import reads (MANIFEST_MAX_SIZE)",
        );
        assert_eq!(w.sandbox.phase(), "failed");
        assert_eq!(
            w.src.stats().manifests,
            1,
            "no retry of a permanent failure"
        );
        assert!(
            kib < limit_kib,
            "peak memory {kib} KiB is not below 64 MiB + the base allowance ({limit_kib} KiB)"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Server-supplied URLs to the metadata service
// ---------------------------------------------------------------------------------------------

const METADATA_URL: &str =
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/pathling-role";

/// A guard before any child runs: the address policy the CLI builds for these endpoints
/// refuses the URL (naming the host, not the path). Were it broken, the CLI below would try
/// to connect off this machine; this fails first.
fn assert_policy_refuses_metadata(w: &World) {
    let policy = AddressPolicy::new([w.src.base_url().as_str(), w.pathling.base_url().as_str()]);
    let refused = policy
        .check_url(METADATA_URL)
        .expect_err("the address policy must refuse the metadata service");
    assert!(refused.contains("169.254.169.254"), "{refused}");
    assert!(
        !refused.contains("meta-data") && !refused.contains("pathling-role"),
        "{refused}"
    );
}

/// Belt and braces: any plain-http request of the child that is not for 127.0.0.1 goes to
/// `proxy` (reqwest honours `HTTP_PROXY`), never off this machine.
fn contain(sandbox: &mut Sandbox, proxy: &Recorder) {
    for (k, v) in [
        ("HTTP_PROXY", proxy.url()),
        ("http_proxy", proxy.url()),
        ("NO_PROXY", "127.0.0.1,localhost".to_string()),
        ("no_proxy", "127.0.0.1,localhost".to_string()),
    ] {
        sandbox.env(k, &v);
    }
}

fn assert_refused_naming_the_host(out: &CliOutput, sandbox: &Sandbox) {
    out.assert_code(1).assert_stderr_contains(
        "169.254.169.254 is a link-local, metadata-service or unspecified address",
    );
    let reason = sandbox.state().unwrap()["state"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("169.254.169.254"), "{reason}");
    let last_line = out
        .stderr
        .lines()
        .rfind(|l| l.contains("169.254.169.254"))
        .unwrap();
    for text in [reason.as_str(), last_line] {
        assert!(
            !text.contains("meta-data") && !text.contains("pathling-role"),
            "the refusal shows the URL's path: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_file_url_to_the_metadata_service_is_refused_before_connecting() {
    let proxy = Recorder::start().await;
    let mut w = world(SourceConfig {
        dataset: small_dataset(),
        in_progress_polls: 0,
        extra_output: vec![("Patient".into(), METADATA_URL.into())],
        ..SourceConfig::default()
    })
    .await;
    assert_policy_refuses_metadata(&w);
    contain(&mut w.sandbox, &proxy);

    let out = w.sandbox.run(&[]).await;
    assert_refused_naming_the_host(&out, &w.sandbox);
    assert_eq!(w.sandbox.phase(), "failed");
    assert!(proxy.requests().is_empty(), "{:?}", proxy.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_location_to_the_metadata_service_is_refused_before_connecting() {
    let proxy = Recorder::start().await;
    let mut w = world(SourceConfig {
        dataset: small_dataset(),
        content_location: Some(METADATA_URL.into()),
        ..SourceConfig::default()
    })
    .await;
    assert_policy_refuses_metadata(&w);
    contain(&mut w.sandbox, &proxy);

    let out = w.sandbox.run(&[]).await;
    assert_refused_naming_the_host(&out, &w.sandbox);
    assert_eq!(w.src.stats().kickoffs_accepted, 1);
    assert_eq!(w.src.stats().polls, 0, "nothing was polled");
    assert!(proxy.requests().is_empty(), "{:?}", proxy.requests());
}

// ---------------------------------------------------------------------------------------------
// A private CA (enterprise TLS)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_source_with_an_unknown_ca_fails_at_once_as_a_certificate_problem() {
    let ca = private_ca();
    // Without authentication the export kick-off meets the certificate first; with it, SMART
    // discovery does.
    for (auth, first_request) in [(false, "export kick-off"), (true, "SMART discovery")] {
        let source = SourceConfig {
            dataset: small_dataset(),
            in_progress_polls: 0,
            ..SourceConfig::default()
        };
        let w = world_with(source, auth, Some(&ca.identity)).await;
        assert!(w.src.base_url().starts_with("https://127.0.0.1:"));
        let out = w.sandbox.run(&[]).await;
        out.assert_code(1)
            .assert_stderr_contains("TLS error: ")
            .assert_stderr_contains(first_request)
            .assert_stderr_contains("invalid peer certificate: UnknownIssuer");
        let tls = w.src.tls_stats().unwrap();
        assert_eq!(
            (tls.handshakes(), tls.handshake_failures()),
            (0, 1),
            "one attempt, no retry (auth {auth})"
        );
        assert!(
            out.elapsed < Duration::from_secs(15),
            "a TLS failure is permanent, yet the run took {:?}",
            out.elapsed
        );
        assert_eq!(w.src.stats().kickoffs, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_source_is_trusted_through_source_ca_file() {
    let ca = private_ca();
    let source = SourceConfig {
        dataset: small_dataset(),
        in_progress_polls: 0,
        ..SourceConfig::default()
    };
    let mut w = world_with(source, true, Some(&ca.identity)).await;
    let ca_file = w.sandbox.path().join("internal-ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    w.sandbox.set("sourceCaFile", ca_file.to_str().unwrap());
    w.sandbox.run(&[]).await.assert_code(0);
    assert!(w.src.tls_stats().unwrap().handshakes() > 0);
    assert_eq!(w.src.auth_stats().token_requests, 1);
    assert_pathling_holds_export(&w.pathling, &w.src);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_source_is_trusted_through_ssl_cert_file() {
    let ca = private_ca();
    let source = SourceConfig {
        dataset: small_dataset(),
        in_progress_polls: 0,
        ..SourceConfig::default()
    };
    let mut w = world_with(source, true, Some(&ca.identity)).await;
    let ca_file = w.sandbox.path().join("system-bundle.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    w.sandbox.env("SSL_CERT_FILE", ca_file.to_str().unwrap());
    w.sandbox.run(&[]).await.assert_code(0);
    assert!(w.src.tls_stats().unwrap().handshakes() > 0);
    assert_pathling_holds_export(&w.pathling, &w.src);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_source_ca_file_is_bad_configuration() {
    let ca = private_ca();
    let mut w = world_with(SourceConfig::default(), true, Some(&ca.identity)).await;
    let not_pem = w.sandbox.path().join("not-a-certificate.pem");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    let missing = w.sandbox.path().join("no-such-ca.pem");
    for path in [&not_pem, &missing] {
        w.sandbox.set("sourceCaFile", path.to_str().unwrap());
        let out = w.sandbox.run(&[]).await;
        out.assert_code(2)
            .assert_stderr_contains("SOURCE_CA_FILE")
            .assert_stderr_contains(path.to_str().unwrap());
        assert!(w.sandbox.state().is_none(), "no run may be started");
    }
    let tls = w.src.tls_stats().unwrap();
    assert_eq!(tls.handshakes() + tls.handshake_failures(), 0);
    assert_eq!(w.pathling.stats().import_kickoffs, 0);
}
