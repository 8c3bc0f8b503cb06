//! Shared harness of the end-to-end tests: they run the real `pathling-import` binary as a
//! child process against the fakes of this crate (all on 127.0.0.1).
//!
//! - [`cli_binary`] finds `<target dir>/<profile>/pathling-import` next to the test binary and
//!   builds it (once per test process) when it is missing or older than the sources of `core`
//!   and `runners`. `PATHLING_IMPORT_BIN` overrides the path.
//! - [`Sandbox`]: one temp dir per test holding the JSON configuration file, the state file,
//!   the directory staging root and the child's captured output. Every run checks that no
//!   secret registered with [`Sandbox::secret`] shows up in stdout, stderr, the state file,
//!   or any other file under the sandbox (staged objects, manifests, the watermark, leftovers)
//!   but the configuration file ([`Sandbox::not_scanned`] exempts more).
//! - [`Staging`]: a staging directory or a fresh bucket on the moto server at `MOTO_ENDPOINT`
//!   (tests that need it fail, never pass, when it is not set).
//! - [`Recorder`]: a catch-all HTTP server that records every request (for Sentry envelopes
//!   and for proving that no network call was made); [`Recorder::assert_no_secrets`].
//! - [`leaks`]: the secret checks themselves; [`tls`]: a private CA for https fakes.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod leaks;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use pathling_import_tests::auth::{AuthConfig, AuthMethod};
use pathling_import_tests::data::ExportFilter;
use pathling_import_tests::fake_pathling::{FakePathlingHandle, S3Access};
use pathling_import_tests::fake_source::FakeSourceHandle;
use pathling_import_tests::keys::TestKey;
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

/// The newest modification time of the files the CLI is built from.
fn newest_source(dir: &Path, newest: &mut SystemTime) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            newest_source(&path, newest);
        } else if let Ok(modified) = entry.metadata().and_then(|m| m.modified()) {
            *newest = (*newest).max(modified);
        }
    }
}

fn is_stale(bin: &Path) -> bool {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return true;
    };
    let root = workspace_root();
    let mut newest = SystemTime::UNIX_EPOCH;
    for dir in ["core/src", "runners/src"] {
        newest_source(&root.join(dir), &mut newest);
    }
    for file in ["core/Cargo.toml", "runners/Cargo.toml", "Cargo.lock"] {
        if let Ok(m) = std::fs::metadata(root.join(file)).and_then(|m| m.modified()) {
            newest = newest.max(m);
        }
    }
    newest > built
}

/// `<target dir>/<profile>/pathling-import`, built if missing or stale.
pub fn cli_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("PATHLING_IMPORT_BIN") {
            return PathBuf::from(path);
        }
        // .../target/debug/deps/e2e_x-hash → .../target/debug
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binaries live in <target>/<profile>/deps");
        let bin = profile_dir.join(format!("pathling-import{}", std::env::consts::EXE_SUFFIX));
        if is_stale(&bin) {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = std::process::Command::new(cargo);
            cmd.current_dir(workspace_root()).args([
                "build",
                "-p",
                "pathling-import-runners",
                "--bin",
                "pathling-import",
            ]);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            if let Some(target) = profile_dir.parent() {
                cmd.env("CARGO_TARGET_DIR", target);
            }
            let status = cmd.status().expect("running cargo build");
            assert!(status.success(), "building pathling-import failed");
        }
        assert!(bin.exists(), "{} does not exist", bin.display());
        bin
    })
}

// ---------------------------------------------------------------------------------------------
// A run of the CLI
// ---------------------------------------------------------------------------------------------

/// What a finished child process left behind.
#[derive(Debug)]
pub struct CliOutput {
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CliOutput {
    /// Asserts the exit code, showing the output otherwise.
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "unexpected exit code\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn assert_stderr_contains(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "stderr does not contain {needle:?}\n--- stderr ---\n{}",
            self.stderr
        );
        self
    }
}

/// A running child.
pub struct Running {
    pub child: tokio::process::Child,
    stdout: PathBuf,
    stderr: PathBuf,
    started: Instant,
    secrets: Vec<String>,
    state_file: PathBuf,
    /// The sandbox directory, scanned for secrets when the child has exited.
    root: PathBuf,
    unscanned: Vec<PathBuf>,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the child is still running")
    }

    /// Whether the child has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_some()
    }

    fn output_so_far(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Waits for the child to exit (killing it after `timeout`), then checks for secrets.
    pub async fn wait(mut self, timeout: Duration) -> CliOutput {
        let status = match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("waiting for the child"),
            Err(_) => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                panic!(
                    "pathling-import did not finish within {timeout:?}\n{}",
                    self.output_so_far()
                );
            }
        };
        let out = CliOutput {
            code: status.code(),
            stdout: std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap_or_default(),
            elapsed: self.started.elapsed(),
        };
        let state = std::fs::read_to_string(&self.state_file).unwrap_or_default();
        for (what, text) in [
            ("stdout", &out.stdout),
            ("stderr", &out.stderr),
            ("the state file", &state),
        ] {
            leaks::assert_absent(what, text, &self.secrets);
        }
        // Everything else the run left: staged objects, the stored manifest, the watermark,
        // temp files of a killed write.
        leaks::scan_dir(&self.root, &self.secrets, &self.unscanned);
        out
    }

    /// SIGKILL, then wait.
    pub async fn kill(mut self) -> CliOutput {
        self.child.start_kill().expect("SIGKILL");
        self.wait(Duration::from_secs(10)).await
    }

    /// Sends a signal by name (`INT`, `TERM`) with `kill(1)` (no unsafe code needed).
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} failed");
    }
}

static OUTPUT_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// One test's world on disk: config file, state file, staging dir, captured output.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub config: Map<String, Value>,
    env: Vec<(String, String)>,
    secrets: Vec<String>,
    /// Files under the sandbox that hold secrets on purpose (the configuration file).
    unscanned: Vec<PathBuf>,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pi-e2e-")
            .tempdir()
            .expect("tempdir");
        let mut sandbox = Sandbox {
            dir,
            config: Map::new(),
            env: Vec::new(),
            secrets: Vec::new(),
            unscanned: Vec::new(),
        };
        sandbox.unscanned.push(sandbox.config_path());
        let state = sandbox.state_path();
        sandbox.set("stateFile", state.to_str().unwrap());
        sandbox
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("pathling-import.test-config.json")
    }

    pub fn state_path(&self) -> PathBuf {
        self.path().join("state").join("pathling-import.state.json")
    }

    /// The directory staging root (`<tmp>/staging/`).
    pub fn staging_dir(&self) -> PathBuf {
        self.path().join("staging")
    }

    /// Sets a configuration key (lowerCamelCase).
    pub fn set(&mut self, key: &str, value: impl Into<Value>) -> &mut Self {
        self.config.insert(key.to_string(), value.into());
        self
    }

    pub fn unset(&mut self, key: &str) -> &mut Self {
        self.config.remove(key);
        self
    }

    /// Sets an environment variable of the child.
    pub fn env(&mut self, key: &str, value: &str) -> &mut Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Text that must never appear in output or in the state file.
    pub fn secret(&mut self, text: &str) -> &mut Self {
        assert!(text.len() >= 8, "secret markers must be specific: {text:?}");
        self.secrets.push(text.to_string());
        self
    }

    /// A file under the sandbox that holds secrets on purpose (like the configuration file):
    /// not scanned after each run.
    pub fn not_scanned(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.unscanned.push(path.into());
        self
    }

    /// The registered secrets.
    pub fn secrets(&self) -> &[String] {
        &self.secrets
    }

    /// The usual settings: endpoints, staging, fast retries, no auth.
    pub fn configure(&mut self, source: &str, target: &str, staging: &Staging) -> &mut Self {
        let staging_url = staging.url(self);
        self.set("sourceEndpoint", source)
            .set("targetEndpoint", target)
            .set("stagingUrl", staging_url)
            .set("sourceAuthenticationEnabled", false)
            .set("targetAuthenticationEnabled", false)
            .set("exportRetryWait", 1)
            .set("importRetryWait", 1)
            .set("transferRetryWait", 1);
        for (k, v) in staging.env() {
            self.env(&k, &v);
        }
        self
    }

    /// Adds the settings and secrets of a source auth method.
    pub fn source_auth(&mut self, auth: &SourceAuth) -> &mut Self {
        self.set("sourceAuthenticationEnabled", true);
        for (k, v) in &auth.config {
            self.set(k, v.clone());
        }
        for s in &auth.secrets {
            self.secret(s);
        }
        self
    }

    pub fn write_config(&self) {
        std::fs::write(
            self.config_path(),
            serde_json::to_string_pretty(&Value::Object(self.config.clone())).unwrap(),
        )
        .unwrap();
    }

    fn command(&self, args: &[&str]) -> (tokio::process::Command, PathBuf, PathBuf) {
        let n = OUTPUT_COUNTER.fetch_add(1, Ordering::Relaxed);
        let stdout = self.path().join(format!("stdout-{n}.txt"));
        let stderr = self.path().join(format!("stderr-{n}.txt"));
        let mut cmd = tokio::process::Command::new(cli_binary());
        cmd.args(args)
            .current_dir(self.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            // Nothing from the developer's machine: no AWS profile, no instance metadata.
            .env("HOME", self.path())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", self.path().join("no-aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                self.path().join("no-aws-credentials"),
            )
            .env(
                "PATHLING_IMPORT_LOG",
                "info,pathling_import=debug,pathling_import_runners=debug",
            )
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        (cmd, stdout, stderr)
    }

    /// Starts `pathling-import <args>` (no config file argument added).
    pub fn spawn_args(&self, args: &[&str]) -> Running {
        let (mut cmd, stdout, stderr) = self.command(args);
        let child = cmd.spawn().expect("spawning pathling-import");
        Running {
            child,
            stdout,
            stderr,
            started: Instant::now(),
            secrets: self.secrets.clone(),
            state_file: self.state_path(),
            root: self.path().to_path_buf(),
            unscanned: self.unscanned.clone(),
        }
    }

    /// Writes the config file and starts `pathling-import <config> --no-progress <extra>`.
    pub fn spawn(&self, extra: &[&str]) -> Running {
        self.write_config();
        let config = self.config_path();
        let mut args = vec![config.to_str().unwrap(), "--no-progress"];
        args.extend_from_slice(extra);
        self.spawn_args(&args)
    }

    /// Runs the sync to its end (60 s at most).
    pub async fn run(&self, extra: &[&str]) -> CliOutput {
        self.spawn(extra).wait(Duration::from_secs(60)).await
    }

    /// Runs with the configuration passed as environment variables (CONSTANT_CASE) instead of
    /// a file.
    pub async fn run_with_env_config(&self) -> CliOutput {
        let mut env_sandbox_args = Vec::new();
        for (k, v) in &self.config {
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().unwrap_or_default().to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            env_sandbox_args.push((constant_case(k), text));
        }
        let (mut cmd, stdout, stderr) = self.command(&["--no-progress"]);
        for (k, v) in env_sandbox_args {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawning pathling-import");
        Running {
            child,
            stdout,
            stderr,
            started: Instant::now(),
            secrets: self.secrets.clone(),
            state_file: self.state_path(),
            root: self.path().to_path_buf(),
            unscanned: self.unscanned.clone(),
        }
        .wait(Duration::from_secs(60))
        .await
    }

    /// The state file's envelope, if there is one.
    pub fn state(&self) -> Option<Value> {
        let bytes = std::fs::read(self.state_path()).ok()?;
        Some(serde_json::from_slice(&bytes).expect("the state file is valid JSON"))
    }

    pub fn phase(&self) -> String {
        let state = self.state().expect("a state file");
        state["state"]["phase"].as_str().unwrap().to_string()
    }

    pub fn run_id(&self) -> String {
        let state = self.state().expect("a state file");
        state["run_id"].as_str().unwrap().to_string()
    }

    /// Polls the state file until `pred` holds; panics if the child exits first or after
    /// `timeout`.
    pub async fn wait_for_state(
        &self,
        running: &mut Running,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(state) = self.state() {
                if pred(&state) {
                    return state;
                }
            }
            if running.exited() {
                panic!(
                    "pathling-import exited before {what}; state: {:?}\n{}",
                    self.state().map(|s| s["state"].clone()),
                    running.output_so_far()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; state: {:?}\n{}",
                    self.state().map(|s| s["state"].clone()),
                    running.output_so_far()
                );
            }
            // Polling interval: the CLI process moves on by itself.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// `stagingUrl` → `STAGING_URL`.
pub fn constant_case(camel: &str) -> String {
    let mut out = String::new();
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The phase in an envelope.
pub fn phase_of(state: &Value) -> &str {
    state["state"]["phase"].as_str().unwrap_or("")
}

/// A file table's status, one character per file (`"sspp"`), decoded from the stored runs.
pub fn statuses(files: &Value) -> Option<String> {
    use pathling_import_core::state::{FileStatus, FileTable};
    let table: FileTable = serde_json::from_value(files.clone()).ok()?;
    Some(
        table
            .iter()
            .map(|r| match r.status {
                FileStatus::Pending => 'p',
                FileStatus::Staged => 's',
                FileStatus::Applied => 'a',
                FileStatus::Failed => 'f',
            })
            .collect(),
    )
}

/// The state's file table status (see [`statuses`]), when the state has one.
pub fn file_status(state: &Value) -> Option<String> {
    statuses(&state["state"]["export"]["files"])
}

/// Indexes of files staged according to an envelope.
pub fn staged_indexes(state: &Value) -> BTreeSet<usize> {
    file_status(state)
        .unwrap_or_default()
        .chars()
        .enumerate()
        .filter(|(_, c)| *c == 's' || *c == 'a')
        .map(|(i, _)| i)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Source authentication
// ---------------------------------------------------------------------------------------------

pub const CLIENT_ID: &str = "e2e-client";

/// A source auth method: the fake's side, the CLI's settings, and the secret texts.
pub struct SourceAuth {
    pub fake: AuthConfig,
    pub method: AuthMethod,
    pub config: Vec<(String, Value)>,
    pub secrets: Vec<String>,
}

/// Distinctive secret values, so that a leak is unambiguous.
pub fn secret_value(tag: &str) -> String {
    format!("S3cr3t+{tag}:{}%x", uuid::Uuid::new_v4().simple())
}

/// The lines of a PEM's base64 body: any of them showing up is a leak.
fn pem_body_markers(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 40)
        .map(str::to_string)
        .collect()
}

impl SourceAuth {
    pub fn basic() -> Self {
        let secret = secret_value("basic");
        SourceAuth {
            fake: AuthConfig::client_secret_basic(CLIENT_ID, &secret),
            method: AuthMethod::ClientSecretBasic,
            config: vec![
                ("sourceClientId".into(), json!(CLIENT_ID)),
                ("sourceClientSecret".into(), json!(secret)),
            ],
            secrets: vec![secret],
        }
    }

    /// `client_secret_post`, left to discovery to choose (the fake advertises only it).
    pub fn post() -> Self {
        let secret = secret_value("post");
        SourceAuth {
            fake: AuthConfig::client_secret_post(CLIENT_ID, &secret),
            method: AuthMethod::ClientSecretPost,
            config: vec![
                ("sourceClientId".into(), json!(CLIENT_ID)),
                ("sourceClientSecret".into(), json!(secret)),
            ],
            secrets: vec![secret],
        }
    }

    /// `private_key_jwt` with the key given as a JWK (its own kid and alg).
    pub fn jwt_jwk(key: &TestKey) -> Self {
        let mut secrets = pem_body_markers(&key.private_pem);
        secrets.push(key.private_jwk["d"].as_str().unwrap().to_string());
        SourceAuth {
            fake: AuthConfig::private_key_jwt(CLIENT_ID, &[key]),
            method: AuthMethod::PrivateKeyJwt,
            config: vec![
                ("sourceClientId".into(), json!(CLIENT_ID)),
                ("sourceAuthMethod".into(), json!("private_key_jwt")),
                (
                    "sourcePrivateKey".into(),
                    json!(key.private_jwk.to_string()),
                ),
            ],
            secrets,
        }
    }

    /// `private_key_jwt` with a PEM plus key id and algorithm.
    pub fn jwt_pem(key: &TestKey) -> Self {
        let mut secrets = pem_body_markers(&key.private_pem);
        secrets.push(key.private_jwk["d"].as_str().unwrap().to_string());
        SourceAuth {
            fake: AuthConfig::private_key_jwt(CLIENT_ID, &[key]),
            method: AuthMethod::PrivateKeyJwt,
            config: vec![
                ("sourceClientId".into(), json!(CLIENT_ID)),
                ("sourcePrivateKey".into(), json!(key.private_pem)),
                ("sourceKeyId".into(), json!(key.kid)),
                ("sourceSigningAlgorithm".into(), json!(key.alg.as_str())),
            ],
            secrets,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Staging
// ---------------------------------------------------------------------------------------------

/// A fresh bucket on moto.
pub struct S3Bucket {
    pub endpoint: String,
    pub bucket: String,
    pub client: aws_sdk_s3::Client,
}

/// The moto endpoint; fails the test (never skips it) when it is not configured.
pub fn moto_endpoint() -> String {
    std::env::var("MOTO_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "MOTO_ENDPOINT is not set: the S3 staging tests need a moto server. Run \
             scripts/test.sh, or start one with `\"$(bash .ci/moto.sh)\" -H 127.0.0.1 -p 5055 &` \
             and set MOTO_ENDPOINT=http://127.0.0.1:5055"
        )
    })
}

impl S3Bucket {
    pub async fn create() -> Self {
        use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
        let endpoint = moto_endpoint();
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(&endpoint)
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .force_path_style(true)
            .build();
        let client = aws_sdk_s3::Client::from_conf(conf);
        let bucket = format!("e2e-{}", uuid::Uuid::new_v4().simple());
        client
            .create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .unwrap_or_else(|e| panic!("cannot create a bucket on moto at {endpoint}: {e:?}"));
        S3Bucket {
            endpoint,
            bucket,
            client,
        }
    }

    pub async fn objects(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut token = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .set_continuation_token(token)
                .send()
                .await
                .unwrap();
            for obj in page.contents() {
                let key = obj.key().unwrap().to_string();
                let body = self
                    .client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .send()
                    .await
                    .unwrap()
                    .body
                    .collect()
                    .await
                    .unwrap()
                    .into_bytes()
                    .to_vec();
                out.insert(key, body);
            }
            match page.next_continuation_token() {
                Some(t) => token = Some(t.to_string()),
                None => break,
            }
        }
        out
    }
}

pub enum Staging {
    /// `<sandbox>/staging/`.
    Dir,
    S3(S3Bucket),
}

impl Staging {
    pub async fn s3() -> Self {
        Staging::S3(S3Bucket::create().await)
    }

    pub fn url(&self, sandbox: &Sandbox) -> String {
        match self {
            Staging::Dir => format!("file://{}/", sandbox.staging_dir().display()),
            Staging::S3(b) => format!("s3://{}/staged/", b.bucket),
        }
    }

    /// What the fake Pathling must allow.
    pub fn allowable_sources(&self, sandbox: &Sandbox) -> Vec<String> {
        match self {
            Staging::Dir => vec![self.url(sandbox)],
            Staging::S3(b) => vec![
                format!("s3://{}/staged/", b.bucket),
                format!("s3a://{}/staged/", b.bucket),
            ],
        }
    }

    pub fn pathling_s3(&self) -> Option<S3Access> {
        match self {
            Staging::Dir => None,
            Staging::S3(b) => Some(S3Access::new(&b.endpoint, "test", "test")),
        }
    }

    /// Environment the CLI needs for this store.
    pub fn env(&self) -> Vec<(String, String)> {
        match self {
            Staging::Dir => Vec::new(),
            Staging::S3(b) => vec![
                ("AWS_ENDPOINT_URL".into(), b.endpoint.clone()),
                ("AWS_ACCESS_KEY_ID".into(), "test".into()),
                ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
                ("AWS_REGION".into(), "us-east-1".into()),
            ],
        }
    }

    /// Every stored object by key relative to the run prefixes' parent (`{run}/output/...`),
    /// leaving out unfinished temp files of the directory store.
    pub async fn objects(&self, sandbox: &Sandbox) -> BTreeMap<String, Vec<u8>> {
        match self {
            Staging::Dir => {
                let mut out = BTreeMap::new();
                walk(&sandbox.staging_dir(), "", &mut out);
                out
            }
            Staging::S3(b) => b
                .objects()
                .await
                .into_iter()
                .filter_map(|(k, v)| k.strip_prefix("staged/").map(|k| (k.to_string(), v)))
                .collect(),
        }
    }
}

fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Vec<u8>>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if path.is_dir() {
            walk(&path, &format!("{prefix}{name}/"), out);
        } else if !name.starts_with('.') {
            out.insert(format!("{prefix}{name}"), std::fs::read(&path).unwrap());
        }
    }
}

/// Staged `output[]` objects of a run: key → (resource type from the key, lines).
pub fn staged_outputs(
    objects: &BTreeMap<String, Vec<u8>>,
    run_id: &str,
) -> BTreeMap<String, (String, Vec<Value>)> {
    let prefix = format!("{run_id}/output/");
    objects
        .iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix(&prefix)?;
            let type_name = name.strip_suffix(".ndjson")?.split_once('-')?.1.to_string();
            let text = std::str::from_utf8(v).expect("staged NDJSON is UTF-8");
            assert!(
                text.is_empty() || text.ends_with('\n'),
                "staged object {k} does not end with a newline"
            );
            let lines = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    serde_json::from_str(l).unwrap_or_else(|e| {
                        panic!("line of {k} is not one JSON resource: {e}: {l}")
                    })
                })
                .collect();
            Some((k.clone(), (type_name, lines)))
        })
        .collect()
}

/// Asserts the staged `output[]` objects of the run hold exactly the expected resources, each
/// once, in `files` objects.
pub async fn assert_staged(
    staging: &Staging,
    sandbox: &Sandbox,
    run_id: &str,
    files: usize,
    expected: &BTreeMap<(String, String), Value>,
) {
    let objects = staging.objects(sandbox).await;
    assert!(
        objects.contains_key(&format!("{run_id}/manifest.json")),
        "the manifest of run {run_id} is not staged; objects: {:?}",
        objects.keys().collect::<Vec<_>>()
    );
    let outputs = staged_outputs(&objects, run_id);
    assert_eq!(
        outputs.len(),
        files,
        "staged output objects: {:?}",
        outputs.keys().collect::<Vec<_>>()
    );
    let mut seen: BTreeMap<(String, String), Value> = BTreeMap::new();
    for (key, (type_name, lines)) in outputs {
        for r in lines {
            assert_eq!(r["resourceType"], json!(type_name), "in {key}");
            let id = r["id"].as_str().unwrap().to_string();
            let dup = seen.insert((type_name.clone(), id.clone()), r);
            assert!(dup.is_none(), "{type_name}/{id} staged twice (in {key})");
        }
    }
    assert_same_resources("staged", &seen, expected);
}

// ---------------------------------------------------------------------------------------------
// Pathling content
// ---------------------------------------------------------------------------------------------

pub fn pathling_content(p: &FakePathlingHandle) -> BTreeMap<(String, String), Value> {
    p.resources()
        .into_iter()
        .flat_map(|(t, m)| m.into_iter().map(move |(id, r)| ((t.clone(), id), r)))
        .collect()
}

/// Compares two resource maps with a readable difference.
pub fn assert_same_resources(
    what: &str,
    got: &BTreeMap<(String, String), Value>,
    expected: &BTreeMap<(String, String), Value>,
) {
    let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: {} missing (first {:?}), {} unexpected (first {:?})",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        extra.len(),
        extra.iter().take(5).collect::<Vec<_>>()
    );
    for (k, v) in expected {
        assert_eq!(&got[k], v, "{what}: {k:?} differs");
    }
}

/// Asserts the fake Pathling holds exactly what a full export of the source delivers.
pub fn assert_pathling_holds_export(p: &FakePathlingHandle, src: &FakeSourceHandle) {
    let expected = src.expected_resources(&ExportFilter::default());
    assert!(!expected.is_empty());
    assert_same_resources("Pathling", &pathling_content(p), &expected);
}

/// `output[]` files of a full export of the source's dataset (types with resources).
pub fn output_files(src: &FakeSourceHandle) -> usize {
    src.config()
        .dataset
        .types
        .iter()
        .filter(|t| t.count > 0)
        .map(|t| t.files as usize)
        .sum()
}

/// File name (`Observation.1.ndjson`) of each manifest row, from the staged manifest.
pub async fn manifest_file_names(
    staging: &Staging,
    sandbox: &Sandbox,
    run_id: &str,
) -> Vec<String> {
    let objects = staging.objects(sandbox).await;
    let manifest: Value = serde_json::from_slice(
        objects
            .get(&format!("{run_id}/manifest.json"))
            .expect("staged manifest"),
    )
    .unwrap();
    manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let url = f["url"].as_str().unwrap();
            let path = url.split('?').next().unwrap();
            path.rsplit('/').next().unwrap().to_string()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A recording HTTP server
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The body, gunzipped when it was sent compressed.
    pub fn body_text(&self) -> String {
        let gzip = self
            .headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("content-encoding") && v.contains("gzip"));
        if gzip || self.body.starts_with(&[0x1f, 0x8b]) {
            use std::io::Read as _;
            let mut out = String::new();
            flate2::read::GzDecoder::new(&self.body[..])
                .read_to_string(&mut out)
                .expect("gzip body");
            out
        } else {
            String::from_utf8_lossy(&self.body).into_owned()
        }
    }
}

/// Records every request and answers `200 {}`.
pub struct Recorder {
    pub addr: std::net::SocketAddr,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Recorder {
    pub async fn start() -> Self {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, Method, Uri};
        let requests: Arc<Mutex<Vec<RecordedRequest>>> = Arc::default();
        let rec = requests.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let rec = rec.clone();
                async move {
                    rec.lock().unwrap().push(RecordedRequest {
                        method: method.to_string(),
                        uri: uri.to_string(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| {
                                (k.to_string(), v.to_str().unwrap_or_default().to_string())
                            })
                            .collect(),
                        body: body.to_vec(),
                    });
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        "{}",
                    )
                }
            },
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Recorder {
            addr,
            requests,
            _stop: tx,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// No recorded request (a Sentry event, say) carries one of `secrets`: not in its URI,
    /// its headers or its (gunzipped) body.
    pub fn assert_no_secrets(&self, secrets: &[&str]) {
        let secrets: Vec<String> = secrets.iter().map(|s| s.to_string()).collect();
        for r in self.requests() {
            let headers: String = r
                .headers
                .iter()
                .map(|(k, v)| format!("{k}: {v}\n"))
                .collect();
            let what = format!("a request {} {} received by the recorder", r.method, r.uri);
            leaks::assert_absent(&what, &r.uri, &secrets);
            leaks::assert_absent(&what, &headers, &secrets);
            leaks::assert_absent(&what, &r.body_text(), &secrets);
        }
    }
}
