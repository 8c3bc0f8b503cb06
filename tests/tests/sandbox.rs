//! The sandbox servers (`sandbox-servers --state FILE`) come back on the same ports with the
//! export and import jobs they had, so that a sandbox interrupted with Ctrl-C resumes its run.
//! Drives the real binary: start, create jobs over HTTP, stop (stdin closed), start again.

// Test helpers outside `#[test]` functions panic on purpose: a failure is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

struct Servers {
    child: Child,
    endpoints: Value,
}

impl Servers {
    fn start(state: &Path) -> Servers {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sandbox-servers"))
            .args(["--no-source-auth", "--state"])
            .arg(state)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let endpoints =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("endpoints line {line:?}: {e}"));
        Servers { child, endpoints }
    }

    fn url(&self, key: &str) -> String {
        self.endpoints[key].as_str().unwrap().to_owned()
    }

    /// Closes stdin, the servers' signal to save their state and stop.
    fn stop(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "sandbox-servers exited with {status}");
    }
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Polls until the answer is no longer 202.
async fn until_done(c: &Client, url: &str) -> (StatusCode, Value) {
    for _ in 0..100 {
        let resp = c
            .get(url)
            .header("accept", "application/fhir+json")
            .send()
            .await
            .unwrap();
        if resp.status() != StatusCode::ACCEPTED {
            let status = resp.status();
            return (status, resp.json().await.unwrap_or(Value::Null));
        }
        // Polling interval: the source answers 202 with Retry-After: 1 twice by design.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{url} never finished");
}

#[tokio::test]
async fn the_sandbox_servers_keep_their_ports_and_jobs_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("servers.json");
    let c = client();

    let first = Servers::start(&state);
    let (source, target) = (first.url("source"), first.url("target"));
    let kickoff = c
        .get(format!("{source}/$export"))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(kickoff.status(), StatusCode::ACCEPTED);
    let status_url = kickoff.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_owned();
    // An import of a file Pathling has not read yet when the servers stop.
    let file = dir.path().join("Patient.ndjson");
    std::fs::write(
        &file,
        "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n{\"resourceType\":\"Patient\",\"id\":\"p2\"}\n",
    )
    .unwrap();
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "inputFormat", "valueCode": "application/fhir+ndjson"},
        {"name": "saveMode", "valueCode": "merge"},
        {"name": "input", "part": [
            {"name": "resourceType", "valueCode": "Patient"},
            {"name": "url", "valueUrl": format!("file://{}", file.display())}]}]});
    let import = c
        .post(format!("{target}/$import"))
        .header("content-type", "application/fhir+json")
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(import.status(), StatusCode::ACCEPTED);
    let job_url = import.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_owned();
    first.stop();

    let saved: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(saved["source_jobs"].as_array().unwrap().len(), 1, "{saved}");
    assert_eq!(saved["target_jobs"].as_array().unwrap().len(), 1, "{saved}");

    // A new client, as a resumed run has: pooled connections went with the old servers.
    let c = client();
    let second = Servers::start(&state);
    assert_eq!(second.url("source"), source, "the source keeps its port");
    assert_eq!(second.url("target"), target, "Pathling keeps its port");
    let (status, manifest) = until_done(&c, &status_url).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the export job survived: {manifest}"
    );
    let output = manifest["output"].as_array().unwrap();
    assert!(!output.is_empty(), "{manifest}");
    let file_url = output[0]["url"].as_str().unwrap();
    let download = c.get(file_url).send().await.unwrap();
    assert_eq!(download.status(), StatusCode::OK, "its files are served");
    assert!(download.text().await.unwrap().lines().count() > 0);

    let (status, result) = until_done(&c, &job_url).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the import job survived and finished: {result}"
    );
    assert_eq!(result["resourceType"], "Parameters", "{result}");
    second.stop();
}

#[tokio::test]
async fn an_unreadable_state_file_is_named_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("servers.json");
    std::fs::write(&state, "not json").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sandbox-servers"))
        .args(["--no-source-auth", "--state"])
        .arg(&state)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("servers.json is not a sandbox servers' state"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "not json");
}
