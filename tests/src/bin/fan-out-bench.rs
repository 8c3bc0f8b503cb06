//! `fan-out-bench`: how much a Step Functions fan-out speeds up a transfer (a figure, not a
//! timed test). Run through `scripts/bench.sh fan-out`, which starts an s3s-fs server and
//! builds this in release mode.
//!
//! The same export — `--files` files of about `--file-mb` MB from a source that serves each
//! download at about `--stream-mbps` MB/s (64 KiB chunks, paced), as real Bulk Data servers
//! and their storage do per connection — is staged to S3 twice by the Step Functions task
//! (`pathling_import_runners::sfn::Task`, in this process):
//!
//! 1. without fan-out: the task's own invocations, `TRANSFER_CONCURRENCY` streams at once;
//! 2. with fan-out (`FAN_OUT_FILES`): the task hands batches to the Distributed Map, played
//!    here as `state-machine.json` describes it, each item a task invocation with its own
//!    executor — `--fan-out N` of them at once, as N warm Map children would run them (in one
//!    process here, so they share this machine's two cores and one S3 server).
//!
//! With `--range-mb N`, the source serves ranges (as an object store does) and the fan-out
//! splits files of at least two ranges into ranges of N MiB (`FAN_OUT_RANGE_MB`), one item
//! each: `--files 1 --file-mb 64 --range-mb 5` measures one large file moved by many items.
//!
//! Printed: the transfer phase's wall time (from the first task invocation until the source
//! has served every file) and its throughput, for both, and their ratio. The run is left at
//! its import kick-off: the import is the same either way.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pathling_import_core::config::{self, RawConfig};
use pathling_import_core::Timestamp;
use pathling_import_runners::emf::MetricsSink;
use pathling_import_runners::executor::now;
use pathling_import_runners::sfn::{Task, EXTRA_KEYS};
use pathling_import_tests::data::DatasetConfig;
use pathling_import_tests::fake_pathling::{FakePathling, PathlingConfig, S3Access};
use pathling_import_tests::fake_source::{FakeSource, FakeSourceHandle, SourceConfig};
use serde_json::{json, Value};

const USAGE: &str = "usage: fan-out-bench --s3-endpoint URL --access-key K --secret-key S \
[--files N] [--file-mb N] [--stream-mbps N] [--concurrency N] [--fan-out N] [--range-mb N]";

struct Options {
    endpoint: String,
    access_key: String,
    secret_key: String,
    files: u32,
    file_mb: u64,
    stream_mbps: f64,
    concurrency: u32,
    fan_out: usize,
    range_mb: Option<u64>,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        endpoint: String::new(),
        access_key: String::new(),
        secret_key: String::new(),
        files: 64,
        file_mb: 2,
        stream_mbps: 1.0,
        concurrency: 4,
        fan_out: 32,
        range_mb: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value:?}: {e}\n{USAGE}");
        match flag.as_str() {
            "--s3-endpoint" => o.endpoint = value.clone(),
            "--access-key" => o.access_key = value.clone(),
            "--secret-key" => o.secret_key = value.clone(),
            "--files" => o.files = value.parse().map_err(|e| bad(&e))?,
            "--file-mb" => o.file_mb = value.parse().map_err(|e| bad(&e))?,
            "--stream-mbps" => o.stream_mbps = value.parse().map_err(|e| bad(&e))?,
            "--concurrency" => o.concurrency = value.parse().map_err(|e| bad(&e))?,
            "--fan-out" => o.fan_out = value.parse().map_err(|e| bad(&e))?,
            "--range-mb" => o.range_mb = Some(value.parse().map_err(|e| bad(&e))?),
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    if o.endpoint.is_empty() || o.access_key.is_empty() || o.secret_key.is_empty() {
        return Err(format!(
            "--s3-endpoint, --access-key and --secret-key are required\n{USAGE}"
        ));
    }
    if o.files == 0
        || o.file_mb == 0
        || o.stream_mbps <= 0.0
        || o.fan_out == 0
        || o.range_mb == Some(0)
    {
        return Err(format!("sizes and rates must be positive\n{USAGE}"));
    }
    Ok(o)
}

fn main() -> std::process::ExitCode {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    // The task's S3 client reads these; set before any thread exists.
    for (k, v) in [
        ("AWS_ENDPOINT_URL", o.endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", o.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", o.secret_key.as_str()),
        ("AWS_REGION", "us-east-1"),
    ] {
        std::env::set_var(k, v);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fan-out-bench: no runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&o)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fan-out-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(o: &Options) -> Result<(), String> {
    println!(
        "fan-out-bench: {} files of about {} MB, each served at about {} MB/s{}",
        o.files,
        o.file_mb,
        o.stream_mbps,
        match o.range_mb {
            Some(n) => format!(", the fan-out splitting them into ranges of {n} MiB"),
            None => String::new(),
        }
    );
    let alone = measure(o, None).await?;
    let fanned = measure(o, Some(o.fan_out)).await?;
    let mb = |s: &Measured| s.bytes as f64 / 1e6;
    for (label, m) in [
        (
            format!("one task, TRANSFER_CONCURRENCY {}", o.concurrency),
            &alone,
        ),
        (
            format!(
                "fan-out{}, {} items at once",
                if o.range_mb.is_some() {
                    " in ranges"
                } else {
                    ""
                },
                o.fan_out
            ),
            &fanned,
        ),
    ] {
        println!(
            "{label:<40} {:>8.1} s {:>8.1} MB {:>8.2} MB/s  ({} fan-out(s))",
            m.secs,
            mb(m),
            mb(m) / m.secs,
            m.fan_outs
        );
    }
    println!(
        "fan-out throughput: {:.1}x one task's",
        alone.secs / fanned.secs
    );
    Ok(())
}

struct Measured {
    secs: f64,
    bytes: u64,
    fan_outs: u32,
}

/// One export staged by the task, with or without fan-out; the transfer phase's figures.
async fn measure(o: &Options, fan_out: Option<usize>) -> Result<Measured, String> {
    let bucket = create_bucket(o).await?;
    // About 400 bytes an Observation.
    let per_file = o.file_mb * 1_000_000 / 400;
    let chunk = 64 * 1024;
    let delay = Duration::from_secs_f64(chunk as f64 / (o.stream_mbps * 1e6));
    let src = FakeSource::start(SourceConfig {
        dataset: DatasetConfig::new(&[("Observation", per_file * u64::from(o.files), o.files)]),
        in_progress_polls: 0,
        gzip_when_asked: false,
        ranges: o.range_mb.is_some(),
        chunk_bytes: chunk,
        chunk_delay: delay,
        ..SourceConfig::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let staged = format!("s3://{bucket}/staged/");
    let s3a = format!("s3a://{bucket}/staged/");
    let mut pathling_config = PathlingConfig::v9(&[staged.as_str(), s3a.as_str()]);
    pathling_config.s3 = Some(S3Access::new(&o.endpoint, &o.access_key, &o.secret_key));
    let pathling = FakePathling::start(pathling_config)
        .await
        .map_err(|e| e.to_string())?;
    let mut vars: Vec<(String, String)> = vec![
        ("SOURCE_ENDPOINT".into(), src.base_url()),
        ("SOURCE_AUTHENTICATION_ENABLED".into(), "false".into()),
        ("TARGET_ENDPOINT".into(), pathling.base_url()),
        ("TARGET_AUTHENTICATION_ENABLED".into(), "false".into()),
        ("TRANSFER_CONCURRENCY".into(), o.concurrency.to_string()),
        ("EXPORT_RETRY_WAIT".into(), "1".into()),
        ("STAGING_URL".into(), staged),
        ("PATHLING_IMPORT_LOG".into(), "warn".into()),
    ];
    if let Some(n) = fan_out {
        vars.push(("FAN_OUT_FILES".into(), "1".into()));
        vars.push(("FAN_OUT_CONCURRENCY".into(), n.to_string()));
        if let Some(mb) = o.range_mb {
            vars.push(("FAN_OUT_RANGE_MB".into(), mb.to_string()));
        }
    }
    let raw = RawConfig::from_env(vars, EXTRA_KEYS);
    let config = config::parse(&raw, EXTRA_KEYS).map_err(|e| format!("{e:?}"))?;
    let task = Task::new(config)
        .await
        .map_err(|e| e.to_string())?
        .without_event_log_on_stdout()
        // Kept off stdout, where the figures go.
        .with_metrics_sink(MetricsSink::Memory(Default::default()));
    let started = Instant::now();
    let mut fan_outs = 0;
    let mut input = json!({});
    let mut secs = None;
    for _ in 0..10_000 {
        let out = invoke(&task, input).await?;
        // Checked between invocations: a split file's last range (the one read to the file's
        // end) may complete before its other ranges, but they are all in once the items
        // have returned.
        if secs.is_none() && all_served(&src, o.files) {
            secs = Some(started.elapsed().as_secs_f64());
        }
        // The transfer is what is measured: the import that follows is the same either way.
        if secs.is_some() && out["phase"] != "staging_files" {
            break;
        }
        match out["action"].as_str().unwrap_or_default() {
            "continue" => {}
            "wait" => tokio::time::sleep(Duration::from_millis(500)).await,
            "fan_out" => {
                fan_outs += 1;
                let items = read_items(o, &out["fanOut"]).await?;
                let limit = out["fanOut"]["maxConcurrency"].as_u64().unwrap_or(1) as usize;
                let answers: Vec<Result<Value, String>> = futures_util::stream::iter(items)
                    .map(|item| invoke(&task, json!({ "fanOutItem": item })))
                    .buffer_unordered(limit.max(1))
                    .collect()
                    .await;
                for a in answers {
                    a?;
                }
            }
            "succeed" => break,
            other => return Err(format!("the run ended {other}: {out}")),
        }
        input = out;
    }
    let secs = secs.ok_or("the source did not serve every file")?;
    Ok(Measured {
        secs,
        bytes: src.stats().file_bytes_sent,
        fan_outs,
    })
}

fn all_served(src: &FakeSourceHandle, files: u32) -> bool {
    src.stats().files_completed >= u64::from(files)
}

async fn invoke(task: &Task, input: Value) -> Result<Value, String> {
    let budget = Timestamp(now().0 + 60_000);
    task.invoke(input, budget)
        .await
        .map_err(|e| format!("{}: {}", e.error_type, e.message))
}

fn s3(o: &Options) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let credentials = Credentials::new(&o.access_key, &o.secret_key, None, None, "bench");
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(&o.endpoint)
        .credentials_provider(credentials)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

async fn create_bucket(o: &Options) -> Result<String, String> {
    let bucket = format!("fan-out-bench-{}", uuid::Uuid::new_v4().simple());
    s3(o)
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .map_err(|e| format!("creating bucket {bucket} at {}: {e:?}", o.endpoint))?;
    Ok(bucket)
}

/// What the Map's `ItemReader` reads: the items file, a JSON array.
async fn read_items(o: &Options, fan_out: &Value) -> Result<Vec<Value>, String> {
    let (Some(bucket), Some(key)) = (fan_out["bucket"].as_str(), fan_out["itemsKey"].as_str())
    else {
        return Err(format!(
            "a fan_out answer without bucket or itemsKey: {fan_out}"
        ));
    };
    let body = s3(o)
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| format!("reading {key}: {e:?}"))?
        .body
        .collect()
        .await
        .map_err(|e| format!("reading {key}: {e}"))?
        .into_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("{key}: {e}"))
}
