//! `bench`: throughput and memory figures for `pathling-import` (figures, not a timed test).
//!
//! Normally run through `scripts/bench.sh`, which installs and starts an s3s-fs server, builds
//! the release binaries and passes their locations here.
//!
//! For each of two export sizes that differ only in the size of the one large file (the full
//! `--large-gb`, and that divided by `--scale-down`; the same `--files` small files of
//! `--small-mb` in both, so the same pattern of concurrent transfers), in this order:
//!
//! 1. starts the fake Bulk Data source (no auth, no `Retry-After` delays, gzip off unless
//!    `--gzip`, no per-request latency unless `--source-latency-ms`) serving the export, all
//!    generated on the fly, and a fake Pathling 9 that reads `s3a://BUCKET/` from the S3
//!    server;
//! 2. baseline (a): a plain download of every file of the export (reqwest streaming GETs, the
//!    same number at once as pathling-import, bytes discarded);
//! 3. baseline (b): a plain upload of objects of exactly the same sizes to the S3 server
//!    (aws-sdk-s3: `PutObject` up to one part, else a multipart upload of parts of the same
//!    size, one part after the other), the same number of objects at once;
//! 4. baseline (c): the smallest streaming copy from the source into S3 (no line counting,
//!    no state file, no retries), one part uploading while the next fills, as pathling-import
//!    does: what the pipeline costs on this machine, where the source, the S3 server and the
//!    copier share two cores;
//! 5. the real `pathling-import` binary (and every `--compare LABEL=PATH` binary, runs
//!    interleaved, `--repeat` times) as a child process under `/usr/bin/time -v` (when
//!    present) with /proc sampling of its VmRSS/VmHWM and of everyone's CPU time, staging to
//!    `s3://BUCKET/...`: wall time end to end, the transfer phase alone (from its
//!    `staging_files` log line to its `kicking_off_import` line), the Pathling import phase,
//!    peak RSS, and who used the CPUs; then checks that the fake Pathling holds every resource
//!    and that the staged bytes equal the downloaded ones.
//!
//! The end-to-end wall time includes the fake Pathling reading every staged byte back from S3
//! and parsing it into JSON (in this process, competing for the same two cores), which says
//! little about pathling-import; the throughput target is therefore judged on the transfer
//! phase, and the end-to-end figures are printed beside it. The machine is shared: the
//! "other" CPU column shows how much of it other processes took during each measurement.
//!
//! Every loop is bounded: export polls (200), the child (`--timeout` seconds, then killed),
//! the /proc sampler (ends with the child).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, RequestChecksumCalculation};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use pathling_import_tests::data::DatasetConfig;
use pathling_import_tests::fake_pathling::{FakePathling, PathlingConfig, S3Access};
use pathling_import_tests::fake_source::{FakeSource, SourceConfig};
use pathling_import_tests::fhir::RetryAfter;
use serde_json::Value;
use tokio::io::AsyncBufReadExt as _;

const MB: f64 = 1e6;
const LARGE_TYPE: &str = "Observation";
const SMALL_TYPE: &str = "Condition";
const USAGE: &str = "usage: bench --pathling-import PATH [--label NAME] [--compare LABEL=PATH]... --s3-endpoint URL --access-key K \
--secret-key S [--bucket NAME] [--work-dir DIR] [--large-gb N] [--small-mb N] [--files N] \
[--scale-down N] [--padding BYTES] [--concurrency N] [--part-mib N] [--memory-mib N] [--compare-memory LABEL=MIB] [--chunk-kib N] [--gzip] \
[--repeat N] [--s3-server-pid PID] [--wrap 'CMD ARGS'] [--log LEVEL] [--source-latency-ms N] [--timeout SECONDS] [--skip-baselines]";

type Res<T> = Result<T, String>;

fn err<E: std::fmt::Display>(context: &str) -> impl Fn(E) -> String + '_ {
    move |e| format!("{context}: {e}")
}

#[derive(Clone, Debug)]
struct Options {
    /// The pathling-import binaries to measure, `(label, path)`: `--pathling-import` first,
    /// then every `--compare LABEL=PATH`; their runs are interleaved.
    binaries: Vec<(String, PathBuf)>,
    s3_endpoint: String,
    access_key: String,
    secret_key: String,
    bucket: String,
    work_dir: PathBuf,
    large_gb: f64,
    small_mb: f64,
    files: u32,
    scale_down: u32,
    padding: usize,
    concurrency: u32,
    /// `TRANSFER_PART_SIZE` for pathling-import (unset: its default, derived from the memory
    /// budget); the baselines use it too, 8 MiB when unset.
    part_mib: Option<u64>,
    /// `TRANSFER_MEMORY` for pathling-import (unset: its default).
    memory_mib: Option<u64>,
    /// `TRANSFER_MEMORY` of variants added with `--compare-memory`, by label.
    variant_memory: Vec<(String, u64)>,
    chunk_kib: usize,
    gzip: bool,
    repeat: u32,
    s3_server_pid: Option<u32>,
    timeout: Duration,
    /// Words put before the pathling-import command (e.g. `strace -f -o FILE`), for profiling.
    wrap: Vec<String>,
    /// `PATHLING_IMPORT_LOG` (e.g. `debug` adds a line per staged file to the kept log).
    log: String,
    /// Delay before the fake source answers any request (loopback has none; real servers and
    /// object stores have tens of milliseconds).
    source_latency: Duration,
    /// Skip baselines (b) and (c); (a) always runs, it gives the export's exact size.
    skip_baselines: bool,
}

/// The part size of baselines (b) and (c) unless `--part-mib` is given.
const BASELINE_PART_MIB: u64 = 8;
/// pathling-import's `TRANSFER_MEMORY` default, in MiB.
const DEFAULT_MEMORY_MIB: u64 = 32;
/// Peak RSS of a transfer with the default settings, whatever the export's size.
const TARGET_PEAK_MIB: f64 = 48.0;

fn parse_args() -> Res<Options> {
    let mut o = Options {
        binaries: Vec::new(),
        s3_endpoint: String::new(),
        access_key: String::new(),
        secret_key: String::new(),
        bucket: "bench-bucket".into(),
        work_dir: std::env::temp_dir()
            .join(format!("pathling-import-bench-{}", std::process::id())),
        large_gb: 1.0,
        small_mb: 1.0,
        files: 200,
        scale_down: 10,
        padding: 1000,
        concurrency: 4,
        part_mib: None,
        memory_mib: None,
        variant_memory: Vec::new(),
        chunk_kib: 16,
        gzip: false,
        repeat: 1,
        s3_server_pid: None,
        wrap: Vec::new(),
        log: "info".into(),
        source_latency: Duration::ZERO,
        timeout: Duration::from_secs(1800),
        skip_baselines: false,
    };
    let mut args = std::env::args().skip(1);
    let mut label = String::from("pathling-import");
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))
        };
        let num = |v: String| -> Res<f64> {
            v.parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .ok_or_else(|| format!("{arg}: not a non-negative number: {v}"))
        };
        match arg.as_str() {
            "--pathling-import" => o
                .binaries
                .insert(0, (String::new(), PathBuf::from(value()?))),
            "--label" => label = value()?,
            "--compare" => {
                let v = value()?;
                let (l, path) = v
                    .split_once('=')
                    .ok_or_else(|| format!("--compare takes LABEL=PATH, got {v}"))?;
                o.binaries.push((l.to_string(), PathBuf::from(path)));
            }
            "--compare-memory" => {
                let v = value()?;
                let (l, mib) = v
                    .split_once('=')
                    .ok_or_else(|| format!("--compare-memory takes LABEL=MIB, got {v}"))?;
                let mib = num(mib.to_string())? as u64;
                o.variant_memory
                    .push((l.to_string(), mib.clamp(10, 16_384)));
            }
            "--s3-endpoint" => o.s3_endpoint = value()?,
            "--access-key" => o.access_key = value()?,
            "--secret-key" => o.secret_key = value()?,
            "--bucket" => o.bucket = value()?,
            "--work-dir" => o.work_dir = PathBuf::from(value()?),
            "--large-gb" => o.large_gb = num(value()?)?,
            "--small-mb" => o.small_mb = num(value()?)?,
            "--files" => o.files = num(value()?)? as u32,
            "--scale-down" => o.scale_down = num(value()?)? as u32,
            "--padding" => o.padding = num(value()?)? as usize,
            "--concurrency" => o.concurrency = (num(value()?)? as u32).clamp(1, 32),
            "--part-mib" => o.part_mib = Some((num(value()?)? as u64).clamp(5, 512)),
            "--memory-mib" => o.memory_mib = Some((num(value()?)? as u64).clamp(10, 16_384)),
            "--chunk-kib" => o.chunk_kib = (num(value()?)? as usize).max(1),
            "--gzip" => o.gzip = true,
            "--repeat" => o.repeat = (num(value()?)? as u32).clamp(1, 10),
            "--s3-server-pid" => o.s3_server_pid = Some(num(value()?)? as u32),
            "--wrap" => o.wrap = value()?.split_whitespace().map(str::to_string).collect(),
            "--timeout" => o.timeout = Duration::from_secs_f64(num(value()?)?),
            "--log" => o.log = value()?,
            "--source-latency-ms" => {
                o.source_latency = Duration::from_secs_f64(num(value()?)? / 1000.0)
            }
            "--skip-baselines" => o.skip_baselines = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    let main = match o.binaries.first_mut() {
        Some((l, path)) if l.is_empty() => {
            *l = label;
            path.clone()
        }
        _ => return Err(format!("--pathling-import is required\n{USAGE}")),
    };
    // The main binary again, with another transfer memory budget.
    for (l, _) in &o.variant_memory {
        o.binaries.push((l.clone(), main.clone()));
    }
    if o.s3_endpoint.is_empty() || o.access_key.is_empty() || o.secret_key.is_empty() {
        return Err(format!(
            "--s3-endpoint, --access-key and --secret-key are required\n{USAGE}"
        ));
    }
    Ok(o)
}

/// The shape of one synthetic export.
#[derive(Clone, Debug)]
struct Layout {
    label: String,
    /// Resources in the one large file (0 = no large file).
    large_count: u64,
    /// Resources in each small file.
    small_per_file: u64,
    small_files: u32,
    padding: usize,
}

impl Layout {
    /// An export of about `large_bytes` in one file plus `files` files of about `small_bytes`.
    fn new(label: &str, large_bytes: f64, small_bytes: f64, files: u32, padding: usize) -> Self {
        let mut probe = DatasetConfig::new(&[]);
        probe.padding_bytes = padding;
        let line = |t: &str| {
            let mut v = Vec::new();
            probe.write_resource(t, 123_456, &mut v);
            v.len() as f64 + 1.0
        };
        let large_count = (large_bytes / line(LARGE_TYPE)).round() as u64;
        let small_per_file = if files == 0 {
            0
        } else {
            (small_bytes / line(SMALL_TYPE)).round().max(1.0) as u64
        };
        Layout {
            label: label.into(),
            large_count,
            small_per_file,
            small_files: if small_per_file == 0 { 0 } else { files },
            padding,
        }
    }

    fn dataset(&self) -> DatasetConfig {
        let mut types = Vec::new();
        if self.large_count > 0 {
            types.push((LARGE_TYPE, self.large_count, 1));
        }
        if self.small_files > 0 {
            types.push((
                SMALL_TYPE,
                self.small_per_file * u64::from(self.small_files),
                self.small_files,
            ));
        }
        let mut d = DatasetConfig::new(&types);
        d.padding_bytes = self.padding;
        d
    }

    fn resources(&self) -> u64 {
        self.large_count + self.small_per_file * u64::from(self.small_files)
    }

    fn files(&self) -> u32 {
        u32::from(self.large_count > 0) + self.small_files
    }
}

/// What one pathling-import run measured.
#[derive(Clone, Debug, Default)]
struct RunFigures {
    /// Index into [`Options::binaries`].
    variant: usize,
    wall: f64,
    /// `staging_files` → `kicking_off_import`.
    transfer: Option<f64>,
    /// `kicking_off_import` → the end of the import (`cleaning_up` / `succeeded`).
    import: Option<f64>,
    /// From `/usr/bin/time -v`.
    time_max_rss_kib: Option<u64>,
    /// Highest VmHWM read from /proc while it ran.
    sampled_hwm_kib: u64,
    /// Highest VmRSS sampled inside the transfer phase.
    transfer_rss_kib: u64,
    /// Highest VmRSS of the transfer's second half minus that of its first half: memory that
    /// grew with the bytes moved.
    transfer_rss_growth_kib: Option<i64>,
    rss_samples: usize,
    /// Who used the CPUs during the transfer phase.
    transfer_cpu: Option<CpuShare>,
    user_s: Option<f64>,
    sys_s: Option<f64>,
    staged_bytes: u64,
    staged_files: usize,
    imported_resources: usize,
}

impl RunFigures {
    fn peak_rss_kib(&self) -> u64 {
        self.time_max_rss_kib.unwrap_or(0).max(self.sampled_hwm_kib)
    }
}

#[derive(Clone, Debug, Default)]
struct SizeFigures {
    label: String,
    files: usize,
    bytes: u64,
    resources: u64,
    download: Option<f64>,
    upload: Option<f64>,
    /// Baseline (c), the plain streaming copy.
    copy: Option<f64>,
    download_cpu: Option<CpuShare>,
    upload_cpu: Option<CpuShare>,
    copy_cpu: Option<CpuShare>,
    runs: Vec<RunFigures>,
}

impl SizeFigures {
    /// The run of a binary with the shortest transfer phase (the least disturbed by other
    /// load).
    fn best(&self, variant: usize) -> Option<&RunFigures> {
        self.runs
            .iter()
            .filter(|r| r.variant == variant)
            .min_by(|a, b| {
                let key = |r: &RunFigures| r.transfer.unwrap_or(r.wall);
                key(a).total_cmp(&key(b))
            })
    }
}

fn s3_client(o: &Options) -> aws_sdk_s3::Client {
    let creds = Credentials::new(&o.access_key, &o.secret_key, None, None, "bench");
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(&o.s3_endpoint)
        .credentials_provider(creds)
        .force_path_style(true)
        // As the staging store does: no checksum trailers computed on every part.
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

async fn ensure_bucket(s3: &aws_sdk_s3::Client, bucket: &str) -> Res<()> {
    if s3.head_bucket().bucket(bucket).send().await.is_ok() {
        return Ok(());
    }
    s3.create_bucket()
        .bucket(bucket)
        .send()
        .await
        .map_err(|e| {
            format!(
                "creating bucket {bucket}: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            )
        })?;
    Ok(())
}

/// `(key, size)` of every object under `prefix` (bounded: 1000 pages).
async fn list_objects(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
) -> Res<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..1000 {
        let resp = s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_continuation_token(token.clone())
            .send()
            .await
            .map_err(|e| {
                format!(
                    "listing {prefix}: {}",
                    aws_sdk_s3::error::DisplayErrorContext(&e)
                )
            })?;
        for o in resp.contents() {
            if let Some(k) = o.key() {
                out.push((k.to_string(), o.size().unwrap_or(0).max(0) as u64));
            }
        }
        token = resp.next_continuation_token().map(str::to_string);
        if token.is_none() || resp.is_truncated() != Some(true) {
            break;
        }
    }
    Ok(out)
}

async fn delete_prefix(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Res<()> {
    let keys = list_objects(s3, bucket, prefix).await?;
    stream::iter(keys)
        .map(|(k, _)| async move {
            s3.delete_object()
                .bucket(bucket)
                .key(&k)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| {
                    format!(
                        "deleting {k}: {}",
                        aws_sdk_s3::error::DisplayErrorContext(&e)
                    )
                })
        })
        .buffer_unordered(8)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Kicks off an export at the fake source and waits for its manifest: the status URL and the
/// output file URLs in manifest order.
async fn export_files(http: &reqwest::Client, base: &str) -> Res<(String, Vec<String>)> {
    let resp = http
        .get(format!("{base}/$export"))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .send()
        .await
        .map_err(|e| format!("export kick-off: {e}"))?;
    if resp.status().as_u16() != 202 {
        return Err(format!("export kick-off answered {}", resp.status()));
    }
    let status_url = resp
        .headers()
        .get("content-location")
        .and_then(|v| v.to_str().ok())
        .ok_or("export kick-off without Content-Location")?
        .to_string();
    let mut manifest: Option<Value> = None;
    for _ in 0..200 {
        let r = http
            .get(&status_url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| format!("export poll: {e}"))?;
        match r.status().as_u16() {
            200 => {
                manifest = Some(r.json().await.map_err(|e| format!("manifest: {e}"))?);
                break;
            }
            // Polling interval: the fake export job finishes on its own time.
            202 => tokio::time::sleep(Duration::from_millis(20)).await,
            s => return Err(format!("export poll answered {s}")),
        }
    }
    let manifest = manifest.ok_or("the export did not complete within 200 polls")?;
    let urls = manifest
        .get("output")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|f| f.get("url")?.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok((status_url, urls))
}

async fn get_file(http: &reqwest::Client, i: usize, url: &str) -> Res<reqwest::Response> {
    let resp = http
        .get(url)
        .header("accept", "application/fhir+ndjson")
        .send()
        .await
        .map_err(|e| format!("GET file {i}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET file {i} answered {}", resp.status()));
    }
    Ok(resp)
}

/// Baseline (a): kick off an export at the fake source, then GET every output file with
/// `concurrency` downloads at once, discarding the bytes. Returns the sizes in manifest order
/// and the time from the first GET to the last byte.
async fn baseline_download(
    http: &reqwest::Client,
    base: &str,
    concurrency: usize,
) -> Res<(Vec<u64>, f64)> {
    let (status_url, urls) = export_files(http, base).await?;
    let started = Instant::now();
    let mut sizes: Vec<(usize, u64)> = stream::iter(urls.into_iter().enumerate())
        .map(|(i, url)| async move {
            let mut body = get_file(http, i, &url).await?.bytes_stream();
            let mut n = 0u64;
            while let Some(chunk) = body.next().await {
                n += chunk.map_err(|e| format!("body of file {i}: {e}"))?.len() as u64;
            }
            Ok::<_, String>((i, n))
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let elapsed = started.elapsed().as_secs_f64();
    let _ = http.delete(&status_url).send().await;
    sizes.sort_unstable();
    Ok((sizes.into_iter().map(|(_, n)| n).collect(), elapsed))
}

/// Baseline (c): the smallest streaming copy — each file downloaded straight into S3 with the
/// same part size and number of files at once as pathling-import, one part uploading while the
/// next fills (`PutObject` for a file of at most one part). No line counting, no state file,
/// no retries. Returns the bytes stored and the time from the first GET to the last upload.
async fn baseline_copy(
    http: &reqwest::Client,
    base: &str,
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    part_size: usize,
    concurrency: usize,
) -> Res<(u64, f64)> {
    let (status_url, urls) = export_files(http, base).await?;
    let started = Instant::now();
    let sizes: Vec<u64> = stream::iter(urls.into_iter().enumerate())
        .map(|(i, url)| async move {
            let key = format!("{prefix}{i:06}.ndjson");
            copy_one(http, s3, bucket, &key, i, &url, part_size).await
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let elapsed = started.elapsed().as_secs_f64();
    let _ = http.delete(&status_url).send().await;
    Ok((sizes.iter().sum(), elapsed))
}

async fn copy_one(
    http: &reqwest::Client,
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    i: usize,
    url: &str,
    part_size: usize,
) -> Res<u64> {
    let mut body = get_file(http, i, url).await?.bytes_stream();
    let mut buf: Vec<u8> = Vec::with_capacity(part_size);
    let mut upload_id: Option<String> = None;
    let mut parts: Vec<CompletedPart> = Vec::new();
    let mut in_flight: Option<tokio::task::JoinHandle<Res<CompletedPart>>> = None;
    let mut total = 0u64;
    loop {
        let chunk = match body.next().await {
            Some(c) => c.map_err(|e| format!("body of file {i}: {e}"))?,
            None => break,
        };
        total += chunk.len() as u64;
        let mut data = &chunk[..];
        while !data.is_empty() {
            if buf.len() == part_size {
                let id = match &upload_id {
                    Some(id) => id.clone(),
                    None => {
                        let id = s3
                            .create_multipart_upload()
                            .bucket(bucket)
                            .key(key)
                            .send()
                            .await
                            .map_err(|e| {
                                format!(
                                    "CreateMultipartUpload {key}: {}",
                                    aws_sdk_s3::error::DisplayErrorContext(&e)
                                )
                            })?
                            .upload_id
                            .ok_or("no UploadId")?;
                        upload_id.insert(id).clone()
                    }
                };
                if let Some(h) = in_flight.take() {
                    parts.push(h.await.map_err(err("part task"))??);
                }
                let full = Bytes::from(std::mem::replace(&mut buf, Vec::with_capacity(part_size)));
                let number = parts.len() as i32 + 1;
                let (s3, bucket, key) = (s3.clone(), bucket.to_string(), key.to_string());
                in_flight = Some(tokio::spawn(async move {
                    upload_part(&s3, &bucket, &key, &id, number, full).await
                }));
            }
            let take = (part_size - buf.len()).min(data.len());
            buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
    }
    let Some(id) = upload_id else {
        let len = buf.len() as i64;
        s3.put_object()
            .bucket(bucket)
            .key(key)
            .content_length(len)
            .body(ByteStream::from(Bytes::from(buf)))
            .send()
            .await
            .map_err(|e| {
                format!(
                    "PutObject {key}: {}",
                    aws_sdk_s3::error::DisplayErrorContext(&e)
                )
            })?;
        return Ok(total);
    };
    if let Some(h) = in_flight.take() {
        parts.push(h.await.map_err(err("part task"))??);
    }
    let number = parts.len() as i32 + 1;
    parts.push(upload_part(s3, bucket, key, &id, number, Bytes::from(buf)).await?);
    s3.complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(&id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .map_err(|e| {
            format!(
                "CompleteMultipartUpload {key}: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            )
        })?;
    Ok(total)
}

async fn upload_part(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    upload_id: &str,
    number: i32,
    body: Bytes,
) -> Res<CompletedPart> {
    let len = body.len() as i64;
    let resp = s3
        .upload_part()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .part_number(number)
        .content_length(len)
        .body(ByteStream::from(body))
        .send()
        .await
        .map_err(|e| {
            format!(
                "UploadPart {key}: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            )
        })?;
    Ok(CompletedPart::builder()
        .set_e_tag(resp.e_tag)
        .part_number(number)
        .build())
}

/// NDJSON-looking bytes to upload: resource lines of the export's own shape, repeated.
fn filler(layout: &Layout, len: usize) -> Bytes {
    let d = layout.dataset();
    let mut out = Vec::with_capacity(len + 64 * 1024);
    let mut i = 0u64;
    while out.len() < len {
        d.write_resource(SMALL_TYPE, i, &mut out);
        out.push(b'\n');
        i += 1;
    }
    out.truncate(len);
    Bytes::from(out)
}

/// Baseline (b): upload objects of the given sizes, `concurrency` at once: one `PutObject` for
/// an object of at most one part, else a multipart upload with parts sent one after the other.
async fn baseline_upload(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    sizes: &[u64],
    part_size: usize,
    data: Bytes,
    concurrency: usize,
) -> Res<f64> {
    let started = Instant::now();
    stream::iter(sizes.iter().copied().enumerate())
        .map(|(i, size)| {
            let data = data.clone();
            let key = format!("{prefix}{i:06}.ndjson");
            async move { upload_one(s3, bucket, &key, size as usize, part_size, data).await }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(started.elapsed().as_secs_f64())
}

async fn upload_one(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    size: usize,
    part_size: usize,
    data: Bytes,
) -> Res<()> {
    let ctx = |op: &str, e: &dyn std::fmt::Display| format!("{op} {key}: {e}");
    if size <= part_size {
        s3.put_object()
            .bucket(bucket)
            .key(key)
            .content_length(size as i64)
            .body(ByteStream::from(data.slice(..size)))
            .send()
            .await
            .map_err(|e| ctx("PutObject", &aws_sdk_s3::error::DisplayErrorContext(&e)))?;
        return Ok(());
    }
    let upload_id = s3
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| {
            ctx(
                "CreateMultipartUpload",
                &aws_sdk_s3::error::DisplayErrorContext(&e),
            )
        })?
        .upload_id
        .ok_or("no UploadId")?;
    let mut parts = Vec::new();
    let mut offset = 0;
    let mut number = 1;
    while offset < size {
        let len = part_size.min(size - offset);
        parts.push(upload_part(s3, bucket, key, &upload_id, number, data.slice(..len)).await?);
        offset += len;
        number += 1;
    }
    s3.complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(&upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .map_err(|e| {
            ctx(
                "CompleteMultipartUpload",
                &aws_sdk_s3::error::DisplayErrorContext(&e),
            )
        })?;
    Ok(())
}

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// Cumulative CPU time (clock ticks) of the machine and of the processes taking part.
#[derive(Clone, Copy, Debug, Default)]
struct CpuTicks {
    /// All CPUs, every state but idle and iowait.
    machine: u64,
    /// This process: the fake source, the fake Pathling, the baseline clients.
    bench: u64,
    /// The S3 server.
    s3: u64,
    /// pathling-import (0 when not running).
    child: u64,
}

impl CpuTicks {
    fn now(s3_pid: Option<u32>, child: Option<u32>) -> Self {
        CpuTicks {
            machine: machine_busy_ticks().unwrap_or(0),
            bench: process_ticks("self").unwrap_or(0),
            s3: s3_pid
                .and_then(|p| process_ticks(&p.to_string()))
                .unwrap_or(0),
            child: child
                .and_then(|p| process_ticks(&p.to_string()))
                .unwrap_or(0),
        }
    }
}

/// Average cores used during a phase, by whom.
#[derive(Clone, Copy, Debug, Default)]
struct CpuShare {
    pathling_import: f64,
    bench: f64,
    s3: f64,
    /// Everything else on the machine (other users' builds and tests): noise.
    other: f64,
}

impl CpuShare {
    fn between(a: CpuTicks, b: CpuTicks, secs: f64) -> Self {
        let cores = |t: u64| t as f64 / TICKS / secs.max(1e-3);
        let ours = b.bench.saturating_sub(a.bench)
            + b.s3.saturating_sub(a.s3)
            + b.child.saturating_sub(a.child);
        CpuShare {
            pathling_import: cores(b.child.saturating_sub(a.child)),
            bench: cores(b.bench.saturating_sub(a.bench)),
            s3: cores(b.s3.saturating_sub(a.s3)),
            other: cores(b.machine.saturating_sub(a.machine).saturating_sub(ours)),
        }
    }
}

fn machine_busy_ticks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = v.iter().take(8).sum();
    Some(total - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0))
}

/// utime + stime of a process (all its threads) from /proc/PID/stat.
fn process_ticks(pid: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state(0) ... utime(11) stime(12).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// `Key: value` of a /proc status file, in kB.
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The first child of `pid` (pathling-import under /usr/bin/time).
fn first_child(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn time_v_field(text: &str, label: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label)?.trim().strip_prefix(':'))?
        .trim()
        .parse()
        .ok()
}

/// Runs the real pathling-import once against the fakes and measures it.
async fn run_import(
    o: &Options,
    label: &str,
    binary: &Path,
    source: &str,
    target: &str,
    prefix: &str,
    run_dir: &Path,
) -> Res<RunFigures> {
    std::fs::create_dir_all(run_dir).map_err(err("creating the run directory"))?;
    let time_file = run_dir.join("time-v.txt");
    let use_time = Path::new("/usr/bin/time").exists();
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    if use_time {
        argv.extend([
            "/usr/bin/time".into(),
            "-v".into(),
            "-o".into(),
            time_file.clone().into_os_string(),
        ]);
    }
    argv.extend(o.wrap.iter().map(Into::into));
    argv.push(binary.as_os_str().to_owned());
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    // The process to sample: pathling-import itself, or its wrapper when there is one.
    let wrapped = use_time || !o.wrap.is_empty();
    let state_file = run_dir.join("state.json");
    let staging_url = format!("s3://{}/{prefix}", o.bucket);
    let part_mib = o.part_mib.map(|m| m.to_string());
    let memory_mib = o
        .variant_memory
        .iter()
        .find(|(l, _)| l == label)
        .map(|(_, m)| *m)
        .or(o.memory_mib)
        .map(|m| m.to_string());
    let concurrency = o.concurrency.to_string();
    let nowhere = Path::new("/dev/null");
    let mut env: Vec<(&str, &std::ffi::OsStr)> = vec![
        ("PATH", std::ffi::OsStr::new("/usr/bin:/bin")),
        ("HOME", run_dir.as_os_str()),
        ("PATHLING_IMPORT_LOG", o.log.as_ref()),
        ("SOURCE_ENDPOINT", source.as_ref()),
        ("SOURCE_AUTHENTICATION_ENABLED", "false".as_ref()),
        ("TARGET_ENDPOINT", target.as_ref()),
        ("TARGET_AUTHENTICATION_ENABLED", "false".as_ref()),
        ("STAGING_URL", staging_url.as_ref()),
        ("STATE_FILE", state_file.as_os_str()),
        ("EXPORT_RETRY_WAIT", "0".as_ref()),
        ("IMPORT_RETRY_WAIT", "0.2".as_ref()),
        ("IMPORT_RETRY_TIMES", "3000".as_ref()),
        ("TRANSFER_RETRY_TIMES", "2".as_ref()),
        ("TRANSFER_RETRY_WAIT", "1".as_ref()),
        ("TRANSFER_CONCURRENCY", concurrency.as_ref()),
        ("AWS_ENDPOINT_URL", o.s3_endpoint.as_ref()),
        ("AWS_ACCESS_KEY_ID", o.access_key.as_ref()),
        ("AWS_SECRET_ACCESS_KEY", o.secret_key.as_ref()),
        ("AWS_REGION", "us-east-1".as_ref()),
        ("AWS_EC2_METADATA_DISABLED", "true".as_ref()),
        ("AWS_CONFIG_FILE", nowhere.as_os_str()),
        ("AWS_SHARED_CREDENTIALS_FILE", nowhere.as_os_str()),
        ("NO_COLOR", "1".as_ref()),
        ("RUST_BACKTRACE", "1".as_ref()),
    ];
    if let Some(part) = &part_mib {
        env.push(("TRANSFER_PART_SIZE", part.as_ref()));
    }
    if let Some(memory) = &memory_mib {
        env.push(("TRANSFER_MEMORY", memory.as_ref()));
    }
    cmd.args(["--no-progress", "--log-format", "json"])
        .env_clear()
        .envs(env)
        .current_dir(run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(err("starting pathling-import"))?;
    let pid = child.id().ok_or("pathling-import has no pid")?;
    let stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let reader = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut out = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            out.push((started.elapsed().as_secs_f64(), line));
        }
        out
    });
    let mut figures = RunFigures::default();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut cpu_samples: Vec<(f64, CpuTicks)> = Vec::new();
    let mut target_pid = (!wrapped).then_some(pid);
    let status = loop {
        tokio::select! {
            s = child.wait() => break s.map_err(err("waiting for pathling-import"))?,
            // Sampling interval for memory and CPU figures while the run goes on.
            _ = tokio::time::sleep(Duration::from_millis(25)) => {
                if target_pid.is_none() {
                    target_pid = first_child(pid);
                }
                cpu_samples.push((started.elapsed().as_secs_f64(), CpuTicks::now(o.s3_server_pid, target_pid)));
                if let Some(p) = target_pid {
                    if let Some(hwm) = proc_status_kib(p, "VmHWM") {
                        figures.sampled_hwm_kib = figures.sampled_hwm_kib.max(hwm);
                    }
                    if let Some(rss) = proc_status_kib(p, "VmRSS") {
                        samples.push((started.elapsed().as_secs_f64(), rss));
                    }
                }
                if started.elapsed() > o.timeout {
                    let _ = child.kill().await;
                    return Err(format!("pathling-import ran longer than {:?}; killed", o.timeout));
                }
            }
        }
    };
    figures.wall = started.elapsed().as_secs_f64();
    let lines = reader.await.map_err(err("stderr reader"))?;
    let log: String = lines
        .iter()
        .map(|(t, l)| format!("{t:9.3} {l}\n"))
        .collect();
    let _ = std::fs::write(run_dir.join("pathling-import.log"), &log);
    if !status.success() {
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "pathling-import exited with {status}; last lines:\n{}",
            tail.join("\n")
        ));
    }
    let mut phases: BTreeMap<String, f64> = BTreeMap::new();
    for (t, line) in &lines {
        if let Some(phase) = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|v| v.get("phase").and_then(Value::as_str).map(str::to_string))
        {
            phases.entry(phase).or_insert(*t);
        }
    }
    let at = |p: &str| phases.get(p).copied();
    if let (Some(a), Some(b)) = (at("staging_files"), at("kicking_off_import")) {
        figures.transfer = Some(b - a);
        figures.transfer_rss_kib = samples
            .iter()
            .filter(|(t, _)| *t >= a && *t <= b)
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(0);
        let mid = (a + b) / 2.0;
        let half_max = |lo: f64, hi: f64| {
            samples
                .iter()
                .filter(|(t, _)| *t >= lo && *t <= hi)
                .map(|(_, r)| *r as i64)
                .max()
        };
        figures.transfer_rss_growth_kib = half_max(mid, b)
            .zip(half_max(a, mid))
            .map(|(second, first)| second - first);
        // The samples closest inside the phase (25 ms apart).
        let first = cpu_samples.iter().find(|(t, _)| *t >= a);
        let last = cpu_samples.iter().rev().find(|(t, _)| *t <= b);
        if let (Some((ta, ca)), Some((tb, cb))) = (first, last) {
            if tb > ta {
                figures.transfer_cpu = Some(CpuShare::between(*ca, *cb, tb - ta));
            }
        }
    }
    if let Some(a) = at("kicking_off_import") {
        let end = at("cleaning_up")
            .or(at("succeeded"))
            .unwrap_or(figures.wall);
        figures.import = Some(end - a);
    }
    figures.rss_samples = samples.len();
    if use_time {
        let text = std::fs::read_to_string(&time_file).unwrap_or_default();
        figures.time_max_rss_kib =
            time_v_field(&text, "Maximum resident set size (kbytes)").map(|k| k as u64);
        figures.user_s = time_v_field(&text, "User time (seconds)");
        figures.sys_s = time_v_field(&text, "System time (seconds)");
    }
    let rss_csv: String = samples
        .iter()
        .map(|(t, r)| format!("{t:.3},{r}\n"))
        .collect();
    let _ = std::fs::write(
        run_dir.join("rss-kib.csv"),
        format!("seconds,vmrss_kib\n{rss_csv}"),
    );
    Ok(figures)
}

async fn measure_size(
    o: &Options,
    layout: &Layout,
    s3: &aws_sdk_s3::Client,
    http: &reqwest::Client,
) -> Res<SizeFigures> {
    eprintln!(
        "bench [{}]: {} file(s): {} {LARGE_TYPE} resource(s) in one file + {} file(s) of {} {SMALL_TYPE} resource(s)",
        layout.label,
        layout.files(),
        layout.large_count,
        layout.small_files,
        layout.small_per_file
    );
    let source = FakeSource::start(SourceConfig {
        dataset: layout.dataset(),
        auth: None,
        requires_access_token: false,
        in_progress_polls: 0,
        progress_retry_after: RetryAfter::Seconds(0),
        throttle_retry_after: RetryAfter::Seconds(0),
        gzip_when_asked: o.gzip,
        chunk_bytes: o.chunk_kib * 1024,
        latency: o.source_latency,
        ..SourceConfig::default()
    })
    .await
    .map_err(err("starting the fake source"))?;
    let allowed = format!("s3a://{}/", o.bucket);
    let target = FakePathling::start(PathlingConfig {
        s3: Some(S3Access::new(&o.s3_endpoint, &o.access_key, &o.secret_key)),
        import_duration_polls: 0,
        ..PathlingConfig::v9(&[&allowed])
    })
    .await
    .map_err(err("starting the fake Pathling"))?;
    let part_size = (o.part_mib.unwrap_or(BASELINE_PART_MIB) * 1024 * 1024) as usize;
    let concurrency = o.concurrency as usize;
    let mut figures = SizeFigures {
        label: layout.label.clone(),
        files: layout.files() as usize,
        resources: layout.resources(),
        ..SizeFigures::default()
    };

    // Baseline (a). Its sizes are the export's exact bytes, which the upload baseline mirrors.
    let before = CpuTicks::now(o.s3_server_pid, None);
    let (sizes, download_s) = baseline_download(http, &source.base_url(), concurrency).await?;
    figures.download_cpu = Some(CpuShare::between(
        before,
        CpuTicks::now(o.s3_server_pid, None),
        download_s,
    ));
    figures.bytes = sizes.iter().sum();
    eprintln!(
        "bench [{}]: plain download {:.1} MB in {download_s:.2} s = {:.1} MB/s",
        layout.label,
        figures.bytes as f64 / MB,
        figures.bytes as f64 / MB / download_s
    );
    figures.download = Some(download_s);
    if !o.skip_baselines {
        // Baseline (b).
        let data = filler(layout, part_size);
        let prefix = format!("baseline-{}/", layout.label);
        delete_prefix(s3, &o.bucket, &prefix).await?;
        let before = CpuTicks::now(o.s3_server_pid, None);
        let upload_s =
            baseline_upload(s3, &o.bucket, &prefix, &sizes, part_size, data, concurrency).await?;
        let stored: u64 = list_objects(s3, &o.bucket, &prefix)
            .await?
            .iter()
            .map(|(_, n)| n)
            .sum();
        if stored != figures.bytes {
            return Err(format!(
                "upload baseline stored {stored} bytes, expected {}",
                figures.bytes
            ));
        }
        delete_prefix(s3, &o.bucket, &prefix).await?;
        figures.upload = Some(upload_s);
        figures.upload_cpu = Some(CpuShare::between(
            before,
            CpuTicks::now(o.s3_server_pid, None),
            upload_s,
        ));
        eprintln!(
            "bench [{}]: plain S3 upload {:.1} MB in {upload_s:.2} s = {:.1} MB/s",
            layout.label,
            figures.bytes as f64 / MB,
            figures.bytes as f64 / MB / upload_s
        );
        // Baseline (c).
        let prefix = format!("copy-{}/", layout.label);
        delete_prefix(s3, &o.bucket, &prefix).await?;
        let before = CpuTicks::now(o.s3_server_pid, None);
        let (copied, copy_s) = baseline_copy(
            http,
            &source.base_url(),
            s3,
            &o.bucket,
            &prefix,
            part_size,
            concurrency,
        )
        .await?;
        figures.copy_cpu = Some(CpuShare::between(
            before,
            CpuTicks::now(o.s3_server_pid, None),
            copy_s,
        ));
        let stored: u64 = list_objects(s3, &o.bucket, &prefix)
            .await?
            .iter()
            .map(|(_, n)| n)
            .sum();
        if stored != figures.bytes || copied != figures.bytes {
            return Err(format!(
                "copy baseline moved {copied} and stored {stored} bytes, expected {}",
                figures.bytes
            ));
        }
        delete_prefix(s3, &o.bucket, &prefix).await?;
        figures.copy = Some(copy_s);
        eprintln!(
            "bench [{}]: plain streaming copy {:.1} MB in {copy_s:.2} s = {:.1} MB/s",
            layout.label,
            figures.bytes as f64 / MB,
            figures.bytes as f64 / MB / copy_s
        );
    }

    for (rep, (variant, (label, binary))) in
        (0..o.repeat).flat_map(|rep| o.binaries.iter().enumerate().map(move |b| (rep, b)))
    {
        let prefix = format!("e2e-{variant}-{rep}/");
        delete_prefix(s3, &o.bucket, &prefix).await?;
        target.clear_store();
        let run_dir = o.work_dir.join(format!(
            "run-{}-{label}-{rep}",
            layout.label.replace(' ', "")
        ));
        let _ = std::fs::remove_dir_all(&run_dir);
        let mut run = run_import(
            o,
            label,
            binary,
            &source.base_url(),
            &target.base_url(),
            &prefix,
            &run_dir,
        )
        .await?;
        run.variant = variant;
        let staged: Vec<(String, u64)> = list_objects(s3, &o.bucket, &prefix)
            .await?
            .into_iter()
            // Output files only: the run's event log (`log.ndjson`) sits beside them.
            .filter(|(k, _)| k.contains("/output/") && k.ends_with(".ndjson"))
            .collect();
        run.staged_files = staged.len();
        run.staged_bytes = staged.iter().map(|(_, n)| n).sum();
        run.imported_resources = target.total_resources();
        target.clear_store();
        delete_prefix(s3, &o.bucket, &prefix).await?;
        if run.staged_bytes != figures.bytes || run.staged_files != figures.files {
            return Err(format!(
                "pathling-import staged {} bytes in {} files; the export has {} bytes in {} files",
                run.staged_bytes, run.staged_files, figures.bytes, figures.files
            ));
        }
        if run.imported_resources as u64 != figures.resources {
            return Err(format!(
                "the fake Pathling holds {} resources; the export has {}",
                run.imported_resources, figures.resources
            ));
        }
        eprintln!(
            "bench [{}] {label} run {}: wall {:.2} s, transfer {}, import {}, peak RSS {:.1} MiB (logs in {})",
            layout.label,
            rep + 1,
            run.wall,
            run.transfer.map(|t| format!("{t:.2} s")).unwrap_or("?".into()),
            run.import.map(|t| format!("{t:.2} s")).unwrap_or("?".into()),
            run.peak_rss_kib() as f64 / 1024.0,
            run_dir.display()
        );
        figures.runs.push(run);
    }
    source.shutdown().await;
    target.shutdown().await;
    Ok(figures)
}

fn rate(amount: f64, secs: Option<f64>) -> Option<f64> {
    secs.filter(|s| *s > 0.0).map(|s| amount / s)
}

fn print_table(o: &Options, sizes: &[SizeFigures]) {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let f1 = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "–".into());
    let f2 = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "–".into());
    let f0 = |v: Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "–".into());
    let pct = |v: Option<f64>| {
        v.map(|x| format!("{:.0} %", x * 100.0))
            .unwrap_or_else(|| "–".into())
    };
    let share = |c: Option<CpuShare>, with_child: bool| {
        c.map(|c| {
            if with_child {
                format!(
                    "{:.2} / {:.2} / {:.2} / {:.2}",
                    c.pathling_import, c.bench, c.s3, c.other
                )
            } else {
                format!("– / {:.2} / {:.2} / {:.2}", c.bench, c.s3, c.other)
            }
        })
        .unwrap_or_else(|| "–".into())
    };
    let mb = |s: &SizeFigures| s.bytes as f64 / MB;
    let slower = |s: &SizeFigures| -> Option<f64> {
        let d = rate(mb(s), s.download);
        let u = rate(mb(s), s.upload);
        match (d, u) {
            (Some(d), Some(u)) => Some(d.min(u)),
            (d, u) => d.or(u),
        }
    };
    let mut add = |name: &str, f: &dyn Fn(&SizeFigures) -> String| {
        rows.push((name.to_string(), sizes.iter().map(f).collect()));
    };
    add("files (1 large + small)", &|s| s.files.to_string());
    add("export size (MB)", &|s| format!("{:.1}", mb(s)));
    add("resources", &|s| s.resources.to_string());
    add("(a) plain download, MB/s", &|s| f1(rate(mb(s), s.download)));
    add("(b) plain S3 upload, MB/s", &|s| f1(rate(mb(s), s.upload)));
    add("(c) plain streaming copy, MB/s", &|s| {
        f1(rate(mb(s), s.copy))
    });
    add("cores during (a): p-i / bench / S3 / other", &|s| {
        share(s.download_cpu, false)
    });
    add("cores during (b): p-i / bench / S3 / other", &|s| {
        share(s.upload_cpu, false)
    });
    add("cores during (c): p-i / bench / S3 / other", &|s| {
        share(s.copy_cpu, false)
    });
    for (v, (label, _)) in o.binaries.iter().enumerate() {
        let name = |n: &str| {
            if o.binaries.len() > 1 {
                format!("[{label}] {n}")
            } else {
                n.to_string()
            }
        };
        let transfer_rate = |s: &SizeFigures| s.best(v).and_then(|r| rate(mb(s), r.transfer));
        add(&name("transfer phase, s"), &|s| {
            f2(s.best(v).and_then(|r| r.transfer))
        });
        add(&name("transfer phase, MB/s"), &|s| f1(transfer_rate(s)));
        add(&name("transfer phase, resources/s"), &|s| {
            f0(s.best(v).and_then(|r| rate(s.resources as f64, r.transfer)))
        });
        add(&name("transfer ÷ slower of (a), (b)"), &|s| {
            pct(transfer_rate(s).zip(slower(s)).map(|(a, b)| a / b))
        });
        add(&name("transfer ÷ (c) plain copy"), &|s| {
            pct(transfer_rate(s)
                .zip(rate(mb(s), s.copy))
                .map(|(a, b)| a / b))
        });
        add(&name("cores in transfer: p-i / bench / S3 / other"), &|s| {
            share(s.best(v).and_then(|r| r.transfer_cpu), true)
        });
        add(&name("end to end (wall), s"), &|s| {
            f2(s.best(v).map(|r| r.wall))
        });
        add(&name("end to end, MB/s"), &|s| {
            f1(s.best(v).and_then(|r| rate(mb(s), Some(r.wall))))
        });
        add(&name("end to end, resources/s"), &|s| {
            f0(s.best(v)
                .and_then(|r| rate(s.resources as f64, Some(r.wall))))
        });
        add(&name("end to end ÷ slower of (a), (b)"), &|s| {
            pct(s
                .best(v)
                .and_then(|r| rate(mb(s), Some(r.wall)))
                .zip(slower(s))
                .map(|(a, b)| a / b))
        });
        add(&name("  of which Pathling import, s"), &|s| {
            f2(s.best(v).and_then(|r| r.import))
        });
        add(&name("peak RSS (VmHWM) per run, MiB"), &|s| {
            let v: Vec<String> = s
                .runs
                .iter()
                .filter(|r| r.variant == v)
                .map(|r| format!("{:.1}", r.peak_rss_kib() as f64 / 1024.0))
                .collect();
            v.join(" / ")
        });
        add(&name("RSS growth within the transfer, MiB"), &|s| {
            let v: Vec<String> = s
                .runs
                .iter()
                .filter(|r| r.variant == v)
                .map(|r| {
                    r.transfer_rss_growth_kib
                        .map(|g| format!("{:+.1}", g as f64 / 1024.0))
                        .unwrap_or_else(|| "–".into())
                })
                .collect();
            v.join(" / ")
        });
        add(&name("pathling-import CPU user+sys, s"), &|s| {
            f2(s.best(v)
                .and_then(|r| r.user_s.zip(r.sys_s))
                .map(|(u, y)| u + y))
        });
    }
    let label_width = rows
        .iter()
        .map(|(n, _)| n.chars().count())
        .max()
        .unwrap_or(10);
    let col_width: Vec<usize> = (0..sizes.len())
        .map(|i| {
            rows.iter()
                .map(|(_, v)| v.get(i).map_or(0, |s| s.chars().count()))
                .chain(std::iter::once(sizes[i].label.chars().count()))
                .max()
                .unwrap_or(8)
        })
        .collect();
    let pad = |s: &str, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(s.chars().count())));
    let mut out = String::new();
    out.push_str(&format!("| {} |", pad("metric", label_width)));
    for (i, s) in sizes.iter().enumerate() {
        out.push_str(&format!(" {} |", pad(&s.label, col_width[i])));
    }
    out.push('\n');
    out.push_str(&format!("|{}|", "-".repeat(label_width + 2)));
    for w in &col_width {
        out.push_str(&format!("{}|", "-".repeat(w + 2)));
    }
    out.push('\n');
    for (name, values) in &rows {
        out.push_str(&format!("| {} |", pad(name, label_width)));
        for (i, v) in values.iter().enumerate() {
            out.push_str(&format!(" {} |", pad(v, col_width[i])));
        }
        out.push('\n');
    }
    println!();
    println!(
        "pathling-import bench: part size {}, transfer memory {}, {} transfer(s) at once, gzip {}, {} B padding/resource, \
         fake-source chunk {} KiB, source latency {} ms; MB = 10^6 bytes; best of {} run(s) per binary and size",
        o.part_mib.map_or("default".to_string(), |m| format!("{m} MiB")),
        o.memory_mib.map_or("default".to_string(), |m| format!("{m} MiB")),
        o.concurrency,
        if o.gzip { "on" } else { "off" },
        o.padding,
        o.chunk_kib,
        o.source_latency.as_millis(),
        o.repeat
    );
    print!("{out}");
    println!(
        "cores: average CPUs busy in that phase for pathling-import (p-i), this process (the fake source and Pathling, \
         the baseline clients), the S3 server, and other processes on the machine (noise)"
    );
    println!(
        "RSS growth: highest RSS in the second half of the transfer minus that in the first half \
         (about 0 when memory does not grow with the bytes moved)"
    );

    // Verdicts on the targets.
    println!();
    // What this project's budget allows for part buffers (TRANSFER_MEMORY); binaries from
    // before the budget hold transfers × 2 parts instead.
    for (v, (label, _)) in o.binaries.iter().enumerate() {
        let budget = o
            .variant_memory
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, m)| *m)
            .or(o.memory_mib)
            .unwrap_or(DEFAULT_MEMORY_MIB);
        let peaks: Vec<(usize, f64)> = sizes
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                s.runs
                    .iter()
                    .filter(move |r| r.variant == v)
                    .map(move |r| (i, r.peak_rss_kib() as f64 / 1024.0))
            })
            .collect();
        let max_peak = peaks.iter().map(|p| p.1).fold(0.0, f64::max);
        println!(
            "[{label}] target peak RSS <= {TARGET_PEAK_MIB} MiB: {} (highest {max_peak:.1} MiB; part buffers are \
             bounded by TRANSFER_MEMORY = {budget} MiB in binaries that have it)",
            if max_peak <= TARGET_PEAK_MIB { "met" } else { "MISSED" },
        );
        if sizes.len() >= 2 {
            let peak_of = |i: usize| {
                peaks
                    .iter()
                    .filter(|p| p.0 == i)
                    .map(|p| p.1)
                    .fold(0.0, f64::max)
            };
            let (first, last) = (peak_of(0), peak_of(sizes.len() - 1));
            let (a, b) = (&sizes[0], &sizes[sizes.len() - 1]);
            println!(
                "[{label}] peak RSS vs export size: {:.0} MB → {:.0} MB ({:.1}×): {first:.1} → {last:.1} MiB ({:+.1} MiB)",
                mb(a),
                mb(b),
                mb(b) / mb(a).max(1e-9),
                last - first,
            );
        }
        // Memory that grows with the bytes moved shows as RSS rising through a transfer; a
        // bounded pipeline plateaus once its buffers exist (at a height that depends on how many
        // transfers overlap, not on how much data passes).
        if let Some(largest) = sizes.last() {
            let growth: Vec<f64> = largest
                .runs
                .iter()
                .filter(|r| r.variant == v)
                .filter_map(|r| r.transfer_rss_growth_kib)
                .map(|g| g as f64 / 1024.0)
                .collect();
            let worst = growth.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if !growth.is_empty() {
                println!(
                    "[{label}] RSS vs bytes moved: from the first to the second half of each {} transfer RSS rose \
                     by at most {worst:+.1} MiB: {}",
                    largest.label,
                    if worst <= 4.0 && max_peak < budget as f64 + 40.0 {
                        "flat, independent of export size"
                    } else {
                        "GROWS with the data moved"
                    }
                );
            }
        }
        for s in sizes {
            let ratio = s
                .best(v)
                .and_then(|r| rate(mb(s), r.transfer))
                .zip(slower(s))
                .map(|(a, b)| a / b);
            println!(
                "[{label}] target transfer ≥ 80 % of the slower baseline [{}]: {}",
                s.label,
                match ratio {
                    Some(r) if r >= 0.8 => format!("met ({:.0} %)", r * 100.0),
                    Some(r) => format!("MISSED ({:.0} %)", r * 100.0),
                    None => "not measured".into(),
                }
            );
        }
    }
    if let Some(pid) = o.s3_server_pid {
        if let Some(hwm) = proc_status_kib(pid, "VmHWM") {
            println!(
                "S3 server (pid {pid}) peak RSS so far: {:.1} MiB",
                hwm as f64 / 1024.0
            );
        }
    }
}

async fn run(o: Options) -> Res<()> {
    std::fs::create_dir_all(&o.work_dir).map_err(err("creating the work directory"))?;
    let s3 = s3_client(&o);
    ensure_bucket(&s3, &o.bucket).await?;
    let http = reqwest::Client::builder()
        .gzip(true)
        .build()
        .map_err(err("HTTP client"))?;
    let large = o.large_gb * 1e9;
    let small = o.small_mb * 1e6;
    // Two exports that differ only in the size of the large file: the same small files, so
    // the same pattern of concurrent transfers.
    let label = |large: f64| format!("{:.0} MB", large / 1e6 + small * f64::from(o.files) / 1e6);
    let mut layouts = Vec::new();
    if o.scale_down > 1 {
        let large = large / f64::from(o.scale_down);
        layouts.push(Layout::new(&label(large), large, small, o.files, o.padding));
    }
    layouts.push(Layout::new(&label(large), large, small, o.files, o.padding));
    let mut figures = Vec::new();
    for layout in &layouts {
        figures.push(measure_size(&o, layout, &s3, &http).await?);
    }
    print_table(&o, &figures);
    Ok(())
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(opts));
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}
