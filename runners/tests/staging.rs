//! Tests of the staging stores: S3 against a real moto server, directories against a temp dir.
//!
//! The S3 tests need `MOTO_ENDPOINT` (e.g. `http://127.0.0.1:5055`) and fail without it:
//!
//! ```sh
//! "$(bash .ci/moto.sh)" -H 127.0.0.1 -p 5055 &
//! MOTO_ENDPOINT=http://127.0.0.1:5055 cargo test -p pathling-import-runners --test staging
//! ```
//!
//! Every S3 test uses its own bucket, so the tests run in parallel against one server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_s3::config::Credentials;
use aws_sdk_s3::Client;
use bytes::Bytes;
use futures::stream::{self, Stream, StreamExt, TryStreamExt};
use pathling_import_runners::staging::{BudgetStats, DEFAULT_TRANSFER_MEMORY};
use pathling_import_runners::staging::{
    DirStore, FailureSide, PutReport, S3Options, S3Store, StagingError, StagingStore, MIN_PART_SIZE,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// No limit on what `get_bytes` reads (the tests of the limit pass their own).
const ANY: u64 = u64::MAX;

fn moto_endpoint() -> String {
    match std::env::var("MOTO_ENDPOINT") {
        Ok(v) if !v.trim().is_empty() => v.trim().trim_end_matches('/').to_owned(),
        _ => panic!(
            "MOTO_ENDPOINT is not set: the S3 staging tests need a moto server. Run \
             `\"$(bash .ci/moto.sh)\" -H 127.0.0.1 -p 5055 &` and then \
             `MOTO_ENDPOINT=http://127.0.0.1:5055 cargo test -p pathling-import-runners --test staging`"
        ),
    }
}

async fn sdk_config(endpoint: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
        .load()
        .await
}

/// A fresh bucket name, unique across tests and runs.
fn bucket_name(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!(
        "st-{}-{}-{}-{nanos}",
        test.replace('_', "-"),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    name.chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches('-')
        .to_owned()
}

/// An S3 store on a new moto bucket, plus a plain client for checking what is really stored.
async fn s3_store(test: &str, part_size: usize) -> (StagingStore, Client, String) {
    s3_store_with_memory(test, part_size, DEFAULT_TRANSFER_MEMORY).await
}

async fn s3_store_with_memory(
    test: &str,
    part_size: usize,
    memory: usize,
) -> (StagingStore, Client, String) {
    let endpoint = moto_endpoint();
    let sdk = sdk_config(&endpoint).await;
    let bucket = bucket_name(test);
    let store = S3Store::from_sdk_config(
        &bucket,
        &sdk,
        S3Options {
            part_size,
            memory,
            force_path_style: None,
        },
    )
    .expect("store config");
    let client = store.client().clone();
    client
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "creating bucket {bucket} on moto at {endpoint} failed (is it running?): {}",
                aws_sdk_s3::error::DisplayErrorContext(e)
            )
        });
    (StagingStore::S3(store), client, bucket)
}

/// An S3 store with `options` on an existing moto bucket.
async fn s3_store_on(bucket: &str, options: S3Options) -> S3Store {
    S3Store::from_sdk_config(bucket, &sdk_config(&moto_endpoint()).await, options)
        .expect("store config")
}

/// The directory store's temp files under `root`, once a writer task has created one (or none
/// after two seconds).
async fn partial_files(root: &std::path::Path) -> Vec<String> {
    for _ in 0..100 {
        let partial: Vec<String> = files_under(root)
            .into_iter()
            .filter(|f| f.contains(".partial-"))
            .collect();
        if !partial.is_empty() {
            return partial;
        }
        // Polling interval: the writer task creates its temp file by itself.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Vec::new()
}

/// NDJSON-like content of exactly `len` bytes: lines of varying length, ending with `\n`.
fn ndjson(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while out.len() < len {
        let line = format!(
            "{{\"resourceType\":\"Patient\",\"id\":\"p{i}\",\"pad\":\"{}\"}}\n",
            "x".repeat((i % 97) as usize)
        );
        out.extend_from_slice(line.as_bytes());
        i += 1;
    }
    out.truncate(len);
    if let Some(last) = out.last_mut() {
        *last = b'\n';
    }
    out
}

fn count_lines(data: &[u8]) -> u64 {
    data.split(|&b| b == b'\n')
        .filter(|l| l.iter().any(|b| !b.is_ascii_whitespace()))
        .count() as u64
}

/// `data` as a body stream of odd-sized chunks (so chunk and part boundaries never line up).
fn chunked(
    data: &[u8],
    chunk: usize,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + Unpin {
    let chunks: Vec<Result<Bytes, std::io::Error>> = data
        .chunks(chunk)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    stream::iter(chunks)
}

/// `data` as chunks, then a download failure.
fn failing_after(
    data: &[u8],
    chunk: usize,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + Unpin {
    chunked(data, chunk).chain(stream::iter([Err(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "download connection reset",
    ))]))
}

async fn unfinished_uploads(client: &Client, bucket: &str) -> usize {
    client
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .expect("ListMultipartUploads")
        .uploads()
        .len()
}

async fn etag(client: &Client, bucket: &str, key: &str) -> String {
    client
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .expect("HeadObject")
        .e_tag()
        .unwrap_or_default()
        .trim_matches('"')
        .to_owned()
}

async fn read_all(store: &StagingStore, key: &str) -> Vec<u8> {
    let chunks: Vec<Bytes> = store
        .open_read(key)
        .await
        .expect("open_read")
        .try_collect()
        .await
        .expect("read stream");
    chunks.concat()
}

fn assert_body_failure(err: &StagingError) {
    assert_eq!(err.side(), FailureSide::Body, "{err}");
    assert!(!err.is_transient());
    let source = err.body_error().expect("body error kept");
    let io = source
        .downcast_ref::<std::io::Error>()
        .expect("the stream's own error type");
    assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset);
    // The download's message is available as the source, not in this error's Display.
    assert!(
        !err.to_string().contains("download connection reset"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// S3 (moto)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn s3_small_object_uses_put_object() {
    let (store, client, bucket) = s3_store("small", MIN_PART_SIZE).await;
    let data = ndjson(100_000);
    let key = "prefix/run-1/output/000001-Patient.ndjson";
    let report = store.put_stream(key, chunked(&data, 4093)).await.unwrap();
    assert_eq!(
        report,
        PutReport {
            bytes: data.len() as u64,
            lines: count_lines(&data),
            newline_added: false,
            resumed_at: 0,
        }
    );
    assert_eq!(store.get_bytes(key, ANY).await.unwrap().unwrap(), data);
    assert_eq!(read_all(&store, key).await, data);
    // A multipart object's ETag has a `-<parts>` suffix; a PutObject's does not.
    assert!(!etag(&client, &bucket, key).await.contains('-'));
    assert_eq!(unfinished_uploads(&client, &bucket).await, 0);
}

#[tokio::test]
async fn s3_multipart_round_trips_byte_exact() {
    let (store, client, bucket) = s3_store("multipart", MIN_PART_SIZE).await;
    let data = ndjson(MIN_PART_SIZE * 7 / 2); // 3.5 parts
    let key = "run/000002-Observation.ndjson";
    let report = store
        .put_stream(key, chunked(&data, 64 * 1024 + 7))
        .await
        .unwrap();
    assert_eq!(report.bytes, data.len() as u64);
    assert_eq!(report.lines, count_lines(&data));
    assert!(!report.newline_added);
    let stored = store.get_bytes(key, ANY).await.unwrap().unwrap();
    assert!(stored == data, "stored object differs from the body");
    assert!(read_all(&store, key).await == data);
    assert!(etag(&client, &bucket, key).await.ends_with("-4"));
    assert_eq!(unfinished_uploads(&client, &bucket).await, 0);
}

#[tokio::test]
async fn s3_one_huge_chunk_is_split_into_parts() {
    let (store, client, bucket) = s3_store("huge-chunk", MIN_PART_SIZE).await;
    let data = ndjson(MIN_PART_SIZE * 2 + 3);
    let report = store
        .put_stream("k", chunked(&data, data.len()))
        .await
        .unwrap();
    assert_eq!(report.bytes, data.len() as u64);
    assert!(store.get_bytes("k", ANY).await.unwrap().unwrap() == data);
    assert!(etag(&client, &bucket, "k").await.ends_with("-3"));
}

#[tokio::test]
async fn s3_exact_part_without_newline_gets_a_one_byte_last_part() {
    let (store, client, bucket) = s3_store("exact-part", MIN_PART_SIZE).await;
    let mut data = ndjson(MIN_PART_SIZE);
    data.pop(); // exactly one part minus the newline...
    data.push(b'}'); // ...and one more byte: exactly part_size, no trailing newline
    let report = store
        .put_stream("k", chunked(&data, 1 << 20))
        .await
        .unwrap();
    assert!(report.newline_added);
    assert_eq!(report.bytes, MIN_PART_SIZE as u64 + 1);
    let mut expected = data.clone();
    expected.push(b'\n');
    assert!(store.get_bytes("k", ANY).await.unwrap().unwrap() == expected);
    assert!(etag(&client, &bucket, "k").await.ends_with("-2"));
}

#[tokio::test]
async fn s3_exact_part_with_newline_is_one_put_object() {
    let (store, client, bucket) = s3_store("exact-put", MIN_PART_SIZE).await;
    let data = ndjson(MIN_PART_SIZE);
    let report = store
        .put_stream("k", chunked(&data, 1 << 20))
        .await
        .unwrap();
    assert!(!report.newline_added);
    assert!(store.get_bytes("k", ANY).await.unwrap().unwrap() == data);
    assert!(!etag(&client, &bucket, "k").await.contains('-'));
}

#[tokio::test]
async fn s3_empty_body_stays_empty() {
    let (store, client, bucket) = s3_store("empty", MIN_PART_SIZE).await;
    let report = store
        .put_stream("empty.ndjson", chunked(b"", 1))
        .await
        .unwrap();
    assert_eq!(report, PutReport::default());
    assert_eq!(
        store.get_bytes("empty.ndjson", ANY).await.unwrap(),
        Some(Bytes::new())
    );
    // Empty chunks do not make a body non-empty either.
    let empties = stream::iter((0..3).map(|_| Ok::<_, std::io::Error>(Bytes::new())));
    let report = store.put_stream("empty2.ndjson", empties).await.unwrap();
    assert_eq!(report, PutReport::default());
    assert_eq!(
        store.get_bytes("empty2.ndjson", ANY).await.unwrap(),
        Some(Bytes::new())
    );
    assert_eq!(unfinished_uploads(&client, &bucket).await, 0);
}

#[tokio::test]
async fn s3_missing_trailing_newline_is_added() {
    let (store, _client, _bucket) = s3_store("newline", MIN_PART_SIZE).await;
    let report = store
        .put_stream("k", chunked(b"{\"a\":1}\n\n{\"b\":2}", 3))
        .await
        .unwrap();
    assert_eq!(
        report,
        PutReport {
            bytes: 17,
            lines: 2,
            newline_added: true,
            resumed_at: 0,
        }
    );
    assert_eq!(
        store.get_bytes("k", ANY).await.unwrap().unwrap(),
        &b"{\"a\":1}\n\n{\"b\":2}\n"[..]
    );
}

#[tokio::test]
async fn s3_body_error_mid_multipart_leaves_nothing() {
    let (store, client, bucket) = s3_store("body-error", MIN_PART_SIZE).await;
    let data = ndjson(MIN_PART_SIZE * 5 / 2);
    let err = store
        .put_stream("k", failing_after(&data, 100_003))
        .await
        .unwrap_err();
    assert_body_failure(&err);
    assert!(
        matches!(err, StagingError::Body { bytes_read, .. } if bytes_read == data.len() as u64)
    );
    assert_eq!(store.get_bytes("k", ANY).await.unwrap(), None);
    assert_eq!(unfinished_uploads(&client, &bucket).await, 0);
}

#[tokio::test]
async fn s3_body_error_in_first_part_leaves_nothing() {
    let (store, client, bucket) = s3_store("body-error-small", MIN_PART_SIZE).await;
    let err = store
        .put_stream("k", failing_after(b"{\"a\":1}\n{\"b\"", 4))
        .await
        .unwrap_err();
    assert_body_failure(&err);
    assert_eq!(store.get_bytes("k", ANY).await.unwrap(), None);
    assert_eq!(unfinished_uploads(&client, &bucket).await, 0);
}

#[tokio::test]
async fn s3_failed_upload_keeps_the_previous_object() {
    let (store, _client, _bucket) = s3_store("keep-old", MIN_PART_SIZE).await;
    store
        .put_bytes("k", Bytes::from_static(b"old\n"))
        .await
        .unwrap();
    let data = ndjson(MIN_PART_SIZE * 3 / 2);
    store
        .put_stream("k", failing_after(&data, 1 << 20))
        .await
        .unwrap_err();
    assert_eq!(
        store.get_bytes("k", ANY).await.unwrap().unwrap(),
        &b"old\n"[..]
    );
}

/// A part upload failing in the store (here: the upload was aborted behind our back) is a store
/// failure, and nothing is left behind.
#[tokio::test]
async fn s3_part_failure_is_a_store_error() {
    let (store, client, bucket) = s3_store("part-failure", MIN_PART_SIZE).await;
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, std::io::Error>>();
    let task = {
        let store = store.clone();
        tokio::spawn(async move { store.put_stream("k", rx).await })
    };
    let data = ndjson(MIN_PART_SIZE * 3);
    // 1.5 parts: the multipart upload starts with part 1.
    tx.unbounded_send(Ok(Bytes::copy_from_slice(&data[..MIN_PART_SIZE * 3 / 2])))
        .unwrap();
    let mut upload_id = None;
    for _ in 0..100 {
        let listed = client
            .list_multipart_uploads()
            .bucket(&bucket)
            .send()
            .await
            .unwrap();
        if let Some(u) = listed.uploads().first() {
            upload_id = u.upload_id().map(str::to_owned);
            break;
        }
        // Polling interval: the upload task starts its multipart upload by itself.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let upload_id = upload_id.expect("multipart upload started");
    client
        .abort_multipart_upload()
        .bucket(&bucket)
        .key("k")
        .upload_id(&upload_id)
        .send()
        .await
        .unwrap();
    tx.unbounded_send(Ok(Bytes::copy_from_slice(&data[MIN_PART_SIZE * 3 / 2..])))
        .unwrap();
    drop(tx);
    let err = task.await.unwrap().unwrap_err();
    eprintln!("part failure reported as: {err}");
    assert_eq!(err.side(), FailureSide::Store, "{err:?}");
    // S3 answers 404 NoSuchUpload; moto 5.x answers a bare 500 here.
    assert!(matches!(err.status(), Some(404 | 500)), "{err:?}");
    assert!(
        !err.to_string().contains("headers"),
        "raw response in message: {err}"
    );
    assert!(
        !matches!(err, StagingError::CleanupFailed { .. }),
        "an upload that is already gone needs no cleanup: {err}"
    );
    assert_eq!(store.get_bytes("k", ANY).await.unwrap(), None);
    assert_eq!(unfinished_uploads(&client, &bucket).await, 0);
}

#[tokio::test]
async fn s3_part_limit_is_a_clear_error() {
    let endpoint = moto_endpoint();
    let (_, client, bucket) = s3_store("part-limit", MIN_PART_SIZE).await;
    let store = StagingStore::S3(
        S3Store::from_sdk_config(
            &bucket,
            &sdk_config(&endpoint).await,
            S3Options {
                part_size: MIN_PART_SIZE,
                ..S3Options::default()
            },
        )
        .unwrap()
        .with_max_parts_for_tests(2),
    );
    // Exactly two parts fit...
    let fits = ndjson(MIN_PART_SIZE * 2);
    store
        .put_stream("fits", chunked(&fits, 1 << 20))
        .await
        .unwrap();
    // ...one byte more does not.
    let data = ndjson(MIN_PART_SIZE * 2 + 1);
    let err = store
        .put_stream("k", chunked(&data, 1 << 20))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StagingError::TooManyParts { max_parts: 2, .. }),
        "{err:?}"
    );
    assert_eq!(err.side(), FailureSide::Store);
    assert!(err.to_string().contains("part size"), "{err}");
    assert_eq!(store.get_bytes("k", ANY).await.unwrap(), None);
    assert_eq!(unfinished_uploads(&client, &bucket).await, 0);
}

#[tokio::test]
async fn s3_cancelled_upload_is_aborted_in_background() {
    let (store, client, bucket) = s3_store("cancel", MIN_PART_SIZE).await;
    let data = ndjson(MIN_PART_SIZE * 3 / 2);
    // The download stalls after 1.5 parts. The store asks for more only once it has pushed
    // everything before, so when it asks, its multipart upload exists and is its own to abort
    // (an upload merely listed by S3 may still have its CreateMultipartUpload answer on the
    // way, which a drop cannot abort; the bucket's lifecycle rule removes such leftovers).
    let (asked_for_more, stalled) = tokio::sync::oneshot::channel::<()>();
    let stall = stream::once(async move {
        let _ = asked_for_more.send(());
        std::future::pending::<Result<Bytes, std::io::Error>>().await
    });
    let body = chunked(&data, 1 << 20).chain(Box::pin(stall));
    let task = {
        let store = store.clone();
        tokio::spawn(async move { store.put_stream("k", body).await })
    };
    stalled
        .await
        .expect("the store reads the body up to the stall");
    assert_eq!(
        unfinished_uploads(&client, &bucket).await,
        1,
        "the multipart upload has started"
    );
    // The caller gives up (e.g. its time budget ran out): the future is dropped.
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    let mut left = usize::MAX;
    for _ in 0..100 {
        left = unfinished_uploads(&client, &bucket).await;
        if left == 0 {
            break;
        }
        // Polling interval: the dropped upload is aborted in the background.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, 0, "the dropped upload was not aborted");
    assert_eq!(store.get_bytes("k", ANY).await.unwrap(), None);
}

#[tokio::test]
async fn s3_get_missing_key_is_none_and_open_read_is_not_found() {
    let (store, _client, _bucket) = s3_store("missing", MIN_PART_SIZE).await;
    assert_eq!(
        store.get_bytes("nothing/here.ndjson", ANY).await.unwrap(),
        None
    );
    let err = store.open_read("nothing/here.ndjson").await.err().unwrap();
    assert!(err.is_not_found(), "{err:?}");
    assert_eq!(err.status(), Some(404));
}

#[tokio::test]
async fn s3_missing_bucket_is_an_error_never_absent() {
    let endpoint = moto_endpoint();
    let store = StagingStore::S3(
        S3Store::from_sdk_config(
            "no-such-bucket-staging",
            &sdk_config(&endpoint).await,
            S3Options::default(),
        )
        .unwrap(),
    );
    let err = store.get_bytes("k", ANY).await.unwrap_err();
    assert_eq!(err.side(), FailureSide::Store);
    assert_eq!(err.status(), Some(404));
    assert_eq!(err.code(), Some("NoSuchBucket"));
    assert!(!err.is_transient());

    let err = store
        .put_stream("k", chunked(b"{}\n", 1))
        .await
        .unwrap_err();
    assert_eq!(err.side(), FailureSide::Store);
    assert_eq!(err.code(), Some("NoSuchBucket"));
    assert!(!err.is_transient());
    let shown = err.to_string();
    assert!(
        shown.contains("PutObject") && shown.contains("404"),
        "{shown}"
    );
    assert!(
        !shown.contains("testing"),
        "credentials in message: {shown}"
    );
}

#[tokio::test]
async fn s3_unreachable_endpoint_is_transient() {
    // Bind and drop a listener to get a loopback port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sdk = sdk_config(&format!("http://127.0.0.1:{port}")).await;
    let store =
        StagingStore::S3(S3Store::from_sdk_config("b", &sdk, S3Options::default()).unwrap());
    let err = store
        .put_stream("k", chunked(b"{}\n", 1))
        .await
        .unwrap_err();
    eprintln!("unreachable endpoint reported as: {err}");
    assert_eq!(err.side(), FailureSide::Store, "{err}");
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(err.status(), None);
}

#[tokio::test]
async fn s3_put_bytes_stores_as_is() {
    let (store, _client, _bucket) = s3_store("put-bytes", MIN_PART_SIZE).await;
    let manifest = Bytes::from_static(b"{\"files\":[]}");
    store
        .put_bytes("run/manifest.json", manifest.clone())
        .await
        .unwrap();
    assert_eq!(
        store.get_bytes("run/manifest.json", ANY).await.unwrap(),
        Some(manifest)
    );
}

/// What `get_bytes` reads into memory is bounded: an object larger than the limit is an
/// error naming it, whether its size was announced or not.
async fn get_bytes_is_capped(store: &StagingStore) {
    let data = Bytes::from(vec![b'x'; 10_000]);
    store
        .put_bytes("run/state.json", data.clone())
        .await
        .unwrap();
    assert_eq!(
        store.get_bytes("run/state.json", 10_000).await.unwrap(),
        Some(data)
    );
    let err = store.get_bytes("run/state.json", 9_999).await.unwrap_err();
    assert!(
        matches!(err, StagingError::TooLarge { limit: 9_999, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("run/state.json"), "{err}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn s3_get_bytes_is_capped() {
    let (store, _client, _bucket) = s3_store("capped", MIN_PART_SIZE).await;
    get_bytes_is_capped(&store).await;
}

#[tokio::test]
async fn dir_get_bytes_is_capped() {
    let (store, _tmp) = dir_store().await;
    get_bytes_is_capped(&store).await;
}

#[tokio::test]
async fn s3_has_no_leftovers_to_remove_and_touches_nothing() {
    let (store, client, bucket) = s3_store("leftovers", MIN_PART_SIZE).await;
    store
        .put_bytes("run/manifest.json", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    // An interrupted multipart upload: left to the bucket's lifecycle rule, not removed here
    // (it could be another writer's upload in flight).
    client
        .create_multipart_upload()
        .bucket(&bucket)
        .key("run/output/000001-Patient.ndjson")
        .send()
        .await
        .unwrap();
    assert_eq!(store.remove_leftovers("run/").await.unwrap(), 0);
    assert_eq!(store.remove_leftovers("").await.unwrap(), 0);
    assert!(store
        .get_bytes("run/manifest.json", ANY)
        .await
        .unwrap()
        .is_some());
    assert_eq!(unfinished_uploads(&client, &bucket).await, 1);
}

#[tokio::test]
async fn s3_rejects_unsafe_keys_and_bad_config() {
    let (store, _client, _bucket) = s3_store("keys", MIN_PART_SIZE).await;
    for key in ["../x", "a/../../b", "/abs", "a//b", ""] {
        let err = store
            .put_stream(key, chunked(b"{}\n", 1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StagingError::InvalidKey { .. }),
            "{key:?}: {err:?}"
        );
        assert!(store.get_bytes(key, ANY).await.is_err(), "{key:?}");
    }
    let sdk = sdk_config(&moto_endpoint()).await;
    let small = S3Options {
        part_size: MIN_PART_SIZE - 1,
        ..S3Options::default()
    };
    assert!(matches!(
        S3Store::from_sdk_config("b", &sdk, small),
        Err(StagingError::Config(_))
    ));
    // The budget must hold two parts: one filling while the other uploads.
    let one_part = S3Options {
        part_size: MIN_PART_SIZE,
        memory: 2 * MIN_PART_SIZE - 1,
        ..S3Options::default()
    };
    let err = S3Store::from_sdk_config("b", &sdk, one_part).unwrap_err();
    assert!(err.to_string().contains("cannot hold two parts"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The memory budget shared by concurrent uploads
// ---------------------------------------------------------------------------------------------

/// Streams each body into its key, all at once, as the executor does with
/// `TRANSFER_CONCURRENCY` files; fails instead of hanging if the uploads deadlock on the budget.
async fn put_all_at_once(store: &StagingStore, bodies: &[(String, Vec<u8>)]) -> Vec<PutReport> {
    let puts = bodies
        .iter()
        .map(|(key, data)| store.put_stream(key, chunked(data, 64 * 1024 + 11)));
    tokio::time::timeout(Duration::from_secs(300), futures::future::join_all(puts))
        .await
        .expect("the uploads finish (no deadlock on the memory budget)")
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .expect("every upload succeeds")
}

/// Eight bodies: four of 2.6 parts (each needs a second part to overlap filling and
/// uploading), an exact part, a small one, an empty one and one of 1.2 parts.
fn eight_bodies(part: usize) -> Vec<(String, Vec<u8>)> {
    let sizes = [
        part * 13 / 5,
        part * 13 / 5 + 1,
        part * 13 / 5 + 2,
        part * 13 / 5 + 3,
        part,
        100_000,
        0,
        part * 6 / 5,
    ];
    sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| (format!("run/output/{i:06}-Patient.ndjson"), ndjson(len)))
        .collect()
}

fn assert_budget_held(stats: BudgetStats, unit: usize) {
    assert!(
        stats.peak_allocated <= stats.limit,
        "buffers of {} bytes existed at once; the budget is {}: {stats:?}",
        stats.peak_allocated,
        stats.limit
    );
    assert!(stats.peak_in_use <= stats.limit, "{stats:?}");
    // The budget was the limit, not the number of transfers: some waited for it, and
    // all of it was used at once.
    assert!(stats.waits > 0, "no upload ever waited: {stats:?}");
    assert_eq!(stats.peak_allocated, stats.limit / unit * unit, "{stats:?}");
    assert!(stats.allocated <= stats.limit, "{stats:?}");
}

/// Waits (briefly) until everything drawn from the budget is back: a request's body may be
/// dropped a moment after the request completed.
async fn all_returned(store: &StagingStore) -> BudgetStats {
    for _ in 0..500 {
        let stats = store.budget().stats();
        if stats.in_use == 0 {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "budget still in use after the uploads: {:?}",
        store.budget().stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_concurrent_uploads_stay_within_the_memory_budget() {
    // Eight uploads at once with a budget of two parts: without the budget they would hold
    // up to sixteen. Two large uploads holding one part each and wanting a second is the case
    // that must not deadlock: each goes on by refilling its own part once it is uploaded.
    let part = MIN_PART_SIZE;
    let (store, client, bucket) = s3_store_with_memory("budget", part, 2 * part).await;
    let bodies = eight_bodies(part);
    let reports = put_all_at_once(&store, &bodies).await;
    for ((key, data), report) in bodies.iter().zip(&reports) {
        assert_eq!(report.bytes, data.len() as u64, "{key}");
        assert_eq!(report.lines, count_lines(data), "{key}");
        assert!(read_all(&store, key).await == *data, "{key} differs");
    }
    assert!(etag(&client, &bucket, &bodies[0].0).await.ends_with("-3"));
    assert_eq!(unfinished_uploads(&client, &bucket).await, 0);
    let stats = all_returned(&store).await;
    assert_budget_held(stats, part);
    // Buffers are reused, not allocated per part: at most the two the budget holds.
    assert!(stats.fresh_buffers <= 2, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_uploads_overlap_parts_when_the_budget_allows() {
    // Three parts for one large upload and a small one: the large one takes a second part
    // while its first uploads, and the small one still gets its own.
    let part = MIN_PART_SIZE;
    let (store, _client, _bucket) = s3_store_with_memory("budget-spare", part, 3 * part).await;
    let bodies = vec![
        ("big".to_owned(), ndjson(part * 4 + 17)),
        ("small".to_owned(), ndjson(1000)),
    ];
    put_all_at_once(&store, &bodies).await;
    for (key, data) in &bodies {
        assert!(read_all(&store, key).await == *data, "{key} differs");
    }
    let stats = store.budget().stats();
    assert!(
        stats.peak_in_use >= 2 * part,
        "no second part was taken: {stats:?}"
    );
    assert!(stats.peak_allocated <= stats.limit, "{stats:?}");
}

// ---------------------------------------------------------------------------------------------
// Directory
// ---------------------------------------------------------------------------------------------

async fn dir_store() -> (StagingStore, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::new(tmp.path().join("staging")).await.unwrap();
    (StagingStore::Dir(store), tmp)
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                out.push(path.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_concurrent_writes_stay_within_the_memory_budget() {
    use pathling_import_runners::staging::WRITE_BUFFER;
    let tmp = tempfile::tempdir().unwrap();
    // Two write buffers for eight writes at once.
    let store = StagingStore::Dir(
        DirStore::new(tmp.path().join("staging"))
            .await
            .unwrap()
            .with_memory(2 * WRITE_BUFFER)
            .unwrap(),
    );
    let bodies = eight_bodies(WRITE_BUFFER * 3);
    let reports = put_all_at_once(&store, &bodies).await;
    for ((key, data), report) in bodies.iter().zip(&reports) {
        assert_eq!(report.bytes, data.len() as u64, "{key}");
        assert!(read_all(&store, key).await == *data, "{key} differs");
    }
    assert_budget_held(all_returned(&store).await, WRITE_BUFFER);
}

#[tokio::test]
async fn dir_round_trip_newline_and_lines() {
    let (store, tmp) = dir_store().await;
    let data = ndjson(1_000_000);
    let key = "prefix/run-1/output/000001-Patient.ndjson";
    let report = store.put_stream(key, chunked(&data, 8191)).await.unwrap();
    assert_eq!(report.bytes, data.len() as u64);
    assert_eq!(report.lines, count_lines(&data));
    assert!(!report.newline_added);
    assert!(store.get_bytes(key, ANY).await.unwrap().unwrap() == data);
    assert!(read_all(&store, key).await == data);

    let report = store
        .put_stream("b.ndjson", chunked(b"{\"a\":1}\n  \n{\"b\":2}", 5))
        .await
        .unwrap();
    assert_eq!(
        report,
        PutReport {
            bytes: 19,
            lines: 2,
            newline_added: true,
            resumed_at: 0,
        }
    );
    assert_eq!(
        store.get_bytes("b.ndjson", ANY).await.unwrap().unwrap(),
        &b"{\"a\":1}\n  \n{\"b\":2}\n"[..]
    );

    let report = store
        .put_stream("empty.ndjson", chunked(b"", 1))
        .await
        .unwrap();
    assert_eq!(report, PutReport::default());
    assert_eq!(
        store.get_bytes("empty.ndjson", ANY).await.unwrap(),
        Some(Bytes::new())
    );

    // No temp files left over.
    assert_eq!(
        files_under(&tmp.path().join("staging")),
        vec![
            "b.ndjson",
            "empty.ndjson",
            "prefix/run-1/output/000001-Patient.ndjson"
        ]
    );
}

#[tokio::test]
async fn dir_write_is_atomic_when_the_stream_fails() {
    let (store, tmp) = dir_store().await;
    let root = tmp.path().join("staging");
    let key = "run/000001-Patient.ndjson";
    let final_path = root.join(key);
    store
        .put_bytes(key, Bytes::from_static(b"old\n"))
        .await
        .unwrap();

    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, std::io::Error>>();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move { store.put_stream(key, rx).await })
    };
    tx.unbounded_send(Ok(Bytes::from(ndjson(600_000)))).unwrap();
    // Wait until the data is being written to the temp file.
    let partial = partial_files(&root).await;
    assert_eq!(partial.len(), 1, "temp file beside the target: {partial:?}");
    assert!(partial[0].starts_with("run/.000001-Patient.ndjson.partial-"));
    // The final name still shows the old, complete object.
    assert_eq!(std::fs::read(&final_path).unwrap(), b"old\n");

    tx.unbounded_send(Err(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "download connection reset",
    )))
    .unwrap();
    let err = writer.await.unwrap().unwrap_err();
    assert_body_failure(&err);
    assert_eq!(std::fs::read(&final_path).unwrap(), b"old\n");
    assert_eq!(files_under(&root), vec![key.to_owned()]);

    // A failure on a new key leaves no file at all.
    let err = store
        .put_stream("run/new.ndjson", failing_after(b"{}\n{}", 2))
        .await
        .unwrap_err();
    assert_body_failure(&err);
    assert_eq!(store.get_bytes("run/new.ndjson", ANY).await.unwrap(), None);
    assert_eq!(files_under(&root), vec![key.to_owned()]);
}

#[tokio::test]
async fn dir_cancelled_write_removes_temp_file() {
    let (store, tmp) = dir_store().await;
    let body = chunked(b"{}\n", 1).chain(stream::pending());
    let result =
        tokio::time::timeout(Duration::from_millis(300), store.put_stream("k", body)).await;
    assert!(result.is_err());
    assert!(files_under(&tmp.path().join("staging")).is_empty());
}

#[tokio::test]
async fn dir_leftovers_of_killed_writes_are_removed_and_objects_kept() {
    let (store, tmp) = dir_store().await;
    let root = tmp.path().join("staging");
    let objects = [
        "run-1/manifest.json",
        "run-1/output/000001-Patient.ndjson",
        "run-2/output/000001-Patient.ndjson",
    ];
    for key in objects {
        store
            .put_stream(key, chunked(b"{\"resourceType\":\"Patient\"}\n", 7))
            .await
            .unwrap();
    }
    // What SIGKILLed writes leave: temp files named as the store names them.
    let leftovers = [
        "run-1/.manifest.json.partial-4242-0",
        "run-1/output/.000001-Patient.ndjson.partial-4242-17",
        "run-1/output/.000002-Observation.ndjson.partial-7-3",
        "run-2/output/.000002-Observation.ndjson.partial-7-4",
    ];
    // Files that only look similar: never removed.
    let others = [
        "run-1/output/.hidden",
        "run-1/output/000003-Patient.ndjson.partial-1-2",
        "run-1/output/.000004-Patient.ndjson.partial-x-2",
        "run-1/output/.000005-Patient.ndjson.partial-12",
        "run-1/output/..partial-1-2",
        "run-1/.partial-1-2",
    ];
    for name in leftovers.iter().chain(&others) {
        std::fs::write(root.join(name), b"{\"half\":").unwrap();
    }

    assert_eq!(store.remove_leftovers("run-1/").await.unwrap(), 3);
    let mut expected: Vec<String> = objects
        .iter()
        .chain(&others)
        .map(|s| s.to_string())
        .collect();
    expected.push(leftovers[3].to_string());
    expected.sort();
    assert_eq!(files_under(&root), expected);
    for key in objects {
        assert_eq!(
            store.get_bytes(key, ANY).await.unwrap().unwrap(),
            &b"{\"resourceType\":\"Patient\"}\n"[..]
        );
    }

    // The whole store; a prefix without objects; a prefix that is not a safe key.
    assert_eq!(store.remove_leftovers("").await.unwrap(), 1);
    assert_eq!(store.remove_leftovers("run-1").await.unwrap(), 0);
    assert_eq!(store.remove_leftovers("run-9/").await.unwrap(), 0);
    assert!(matches!(
        store.remove_leftovers("../").await,
        Err(StagingError::InvalidKey { .. })
    ));
    assert!(!files_under(&root)
        .iter()
        .any(|f| leftovers.contains(&f.as_str())));
}

#[tokio::test]
async fn dir_leftover_removal_spares_writes_in_flight() {
    let (store, tmp) = dir_store().await;
    let root = tmp.path().join("staging");
    let key = "run-1/output/000001-Patient.ndjson";
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, std::io::Error>>();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move { store.put_stream(key, rx).await })
    };
    tx.unbounded_send(Ok(Bytes::from(ndjson(100_000)))).unwrap();
    let partial = partial_files(&root).await;
    assert_eq!(partial.len(), 1, "{partial:?}");

    assert_eq!(store.remove_leftovers("run-1/").await.unwrap(), 0);
    assert!(
        root.join(&partial[0]).exists(),
        "the live temp file is kept"
    );

    tx.unbounded_send(Ok(Bytes::from_static(b"{}\n"))).unwrap();
    drop(tx);
    let report = writer.await.unwrap().unwrap();
    assert_eq!(report.bytes, 100_003);
    assert_eq!(files_under(&root), vec![key.to_owned()]);
    // Once finished (or abandoned), a same-named file is a leftover like any other.
    std::fs::write(root.join(&partial[0]), b"x").unwrap();
    assert_eq!(store.remove_leftovers("run-1/").await.unwrap(), 1);
}

#[tokio::test]
async fn dir_rejects_keys_that_escape_the_root() {
    let (store, tmp) = dir_store().await;
    for key in [
        "..",
        "../escape",
        "a/../../escape",
        "/tmp/escape",
        "a//b",
        "a/./b",
        "",
        "a/",
    ] {
        let err = store
            .put_stream(key, chunked(b"{}\n", 1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StagingError::InvalidKey { .. }),
            "{key:?}: {err:?}"
        );
        assert_eq!(err.side(), FailureSide::Store);
        assert!(
            store
                .put_bytes(key, Bytes::from_static(b"x"))
                .await
                .is_err(),
            "{key:?}"
        );
        assert!(store.get_bytes(key, ANY).await.is_err(), "{key:?}");
        assert!(store.open_read(key).await.is_err(), "{key:?}");
    }
    assert!(!tmp.path().join("escape").exists());
    assert!(files_under(tmp.path()).is_empty());
}

#[tokio::test]
async fn dir_missing_key_get_and_open_read() {
    let (store, _tmp) = dir_store().await;
    assert_eq!(store.get_bytes("no/such.ndjson", ANY).await.unwrap(), None);
    let err = store.open_read("no/such.ndjson").await.err().unwrap();
    assert!(err.is_not_found(), "{err:?}");
}

#[tokio::test]
async fn dir_file_url_root() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("with space");
    DirStore::new(&root).await.unwrap();
    let canonical = std::fs::canonicalize(&root).unwrap();
    let again =
        DirStore::from_file_url(url::Url::from_directory_path(&canonical).unwrap().as_str())
            .await
            .unwrap();
    assert_eq!(again.root(), canonical);
    assert!(DirStore::from_file_url("s3://bucket/prefix").await.is_err());
}

#[tokio::test]
async fn s3_parts_grow_so_the_part_limit_reaches_further() {
    let (_, client, bucket) = s3_store("part-growth", MIN_PART_SIZE).await;
    let store = s3_store_on(
        &bucket,
        S3Options {
            part_size: MIN_PART_SIZE,
            memory: 8 * MIN_PART_SIZE,
            ..S3Options::default()
        },
    )
    .await
    .with_max_parts_for_tests(3)
    .with_part_growth_for_tests(1);
    // The defaults (5 MiB parts, 32 MiB budget): 1,000 parts of 5 MiB, 1,000 of 10 MiB, then
    // 16 MiB (half the budget): 143,000 MiB, about 139.6 GiB (48.8 GiB without growth).
    const MIB: u64 = 1024 * 1024;
    let defaults = s3_store_on(
        &bucket,
        S3Options {
            part_size: MIN_PART_SIZE,
            ..S3Options::default()
        },
    )
    .await;
    assert_eq!(defaults.largest_object(), 143_000 * MIB);
    // A 1 GiB budget (8 MiB parts, growing to 512 MiB): about 2.4 TiB.
    let large = s3_store_on(
        &bucket,
        S3Options {
            part_size: 8 * MIB as usize,
            memory: 1024 * MIB as usize,
            ..S3Options::default()
        },
    )
    .await;
    assert_eq!(large.largest_object(), 2_552_000 * MIB);

    // Doubling every part, up to half the budget: 5, 10 and 20 MiB; 15 MiB without growth.
    assert_eq!(store.max_part_size(), 4 * MIN_PART_SIZE);
    assert_eq!(store.largest_object(), 7 * MIN_PART_SIZE as u64);
    let store = StagingStore::S3(store);

    let data = ndjson(7 * MIN_PART_SIZE);
    store
        .put_stream("grown", chunked(&data, 1 << 20))
        .await
        .unwrap();
    let back = store
        .get_bytes("grown", 8 * MIN_PART_SIZE as u64)
        .await
        .unwrap()
        .unwrap();
    assert!(back == data, "the object reads back as sent");
    let mut sizes = Vec::new();
    for part in 1..=3 {
        let head = client
            .head_object()
            .bucket(&bucket)
            .key("grown")
            .part_number(part)
            .send()
            .await
            .unwrap();
        sizes.push(head.content_length().unwrap() as usize / MIN_PART_SIZE);
    }
    assert_eq!(sizes, [1, 2, 4], "part sizes in units of 5 MiB");

    let err = store
        .put_stream("k", chunked(&ndjson(7 * MIN_PART_SIZE + 1), 1 << 20))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StagingError::TooManyParts { max_parts: 3, largest, .. } if largest == 7 * MIN_PART_SIZE as u64),
        "{err:?}"
    );
    assert_eq!(unfinished_uploads(&client, &bucket).await, 0);
}

// ---------------------------------------------------------------------------------------------
// Resuming an interrupted transfer
// ---------------------------------------------------------------------------------------------

use pathling_import_runners::staging::{ResumeFrom, SourceFacts};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

const IDENTITY: u64 = 42;

fn no_wind_down() -> Arc<std::sync::atomic::AtomicBool> {
    Arc::new(std::sync::atomic::AtomicBool::new(false))
}

fn facts() -> SourceFacts {
    SourceFacts {
        identity: IDENTITY,
        etag: Some("\"v1\"".into()),
        last_modified: None,
        length: None,
    }
}

/// Waits (up to 20 s) until `progress` holds `bytes`: the store's part uploads and checkpoint
/// writes run in tasks of their own.
async fn progress_reaches(progress: &AtomicU64, bytes: u64) {
    for _ in 0..2000 {
        if progress.load(Ordering::Relaxed) >= bytes {
            assert_eq!(
                progress.load(Ordering::Relaxed),
                bytes,
                "no checkpoint beyond"
            );
            return;
        }
        // Polling interval of a condition the store's own tasks bring about.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "no checkpoint of {bytes} bytes: {}",
        progress.load(Ordering::Relaxed)
    );
}

/// The attempt that continues `from` to the end of `data`, in chunks of `chunk` bytes.
async fn continue_to_end(
    store: &StagingStore,
    key: &str,
    data: &[u8],
    from: ResumeFrom,
    chunk: usize,
) -> Result<PutReport, StagingError> {
    let offset = from.offset() as usize;
    let body = Box::pin(chunked(&data[offset..], chunk));
    let progress = Arc::new(AtomicU64::new(0));
    store
        .put_resumable(key, body, facts(), Some(from), progress, no_wind_down())
        .await
}

/// One attempt that continues `from` (or starts) and is killed once the body has handed over
/// byte `kill_at` and the checkpoint of `checkpointed` bytes is written (the future is
/// dropped while the body waits for more): returns the bytes it read.
async fn killed_attempt(
    store: &StagingStore,
    key: &str,
    data: &[u8],
    from: Option<ResumeFrom>,
    kill_at: usize,
    checkpointed: u64,
) -> usize {
    let offset = from.as_ref().map_or(0, |f| f.offset() as usize);
    let body = chunked(&data[offset..kill_at], 100_003).chain(stream::pending());
    let progress = Arc::new(AtomicU64::new(0));
    let put = store.put_resumable(
        key,
        Box::pin(body),
        facts(),
        from,
        progress.clone(),
        no_wind_down(),
    );
    tokio::select! {
        r = put => panic!("the attempt ended: {r:?}"),
        () = progress_reaches(&progress, checkpointed) => {}
    }
    kill_at - offset
}

/// Kills a resumable upload at several offsets, each attempt continuing the previous one's
/// checkpoint, then lets the last run to the end: the object is byte-identical, each attempt
/// read again at most one part (plus the line it cut) of what an earlier one had read, and
/// nothing is left behind.
async fn kills_at_several_offsets_then_complete(store: &StagingStore, unit: usize) {
    let data = ndjson(5 * unit + unit / 3);
    let key = "run/output/000001-Patient.ndjson";
    assert!(store.resume_point(key, IDENTITY).await.unwrap().is_none());
    let mut from: Option<ResumeFrom> = None;
    let mut read = 0usize;
    // Killed inside part 2, just after part 3 starts, mid part 5: checkpoints of 1, 2, 4 parts.
    for (kill_at, checkpointed) in [
        (unit + unit / 2, unit),
        (2 * unit + 1, 2 * unit),
        (4 * unit + unit / 2, 4 * unit),
    ] {
        let before = from.as_ref().map_or(0, |f| f.offset() as usize);
        read += killed_attempt(store, key, &data, from, kill_at, checkpointed as u64).await;
        let point = store
            .resume_point(key, IDENTITY)
            .await
            .unwrap()
            .expect("a checkpoint after the kill");
        assert_eq!(point.stored(), checkpointed as u64);
        let offset = point.offset() as usize;
        assert_eq!(data[offset - 1], b'\n', "continues at a line's start");
        assert!(checkpointed - offset < 200, "within one line: {offset}");
        let newlines = data[..offset].iter().filter(|b| **b == b'\n').count();
        assert_eq!(point.newlines() as usize, newlines);
        assert_eq!(point.lines(), count_lines(&data[..offset]));
        // What the next attempt reads again: from this offset to where the kill came.
        assert!(
            kill_at - offset <= unit + 200,
            "{kill_at} - {offset} > one part"
        );
        assert!(offset > before);
        from = Some(point);
    }
    let from = from.expect("checkpoint");
    let offset = from.offset() as usize;
    read += data.len() - offset;
    let report = continue_to_end(store, key, &data, from, 65_537)
        .await
        .unwrap();
    assert_eq!(report.resumed_at, 4 * unit as u64);
    assert_eq!(report.bytes, data.len() as u64);
    assert_eq!(report.lines, count_lines(&data));
    assert!(!report.newline_added);
    assert_eq!(read_all(store, key).await, data, "byte-identical");
    // Three kills, each costing at most a part and a line read again.
    assert!(read - data.len() <= 3 * (unit + 200), "read {read}");
    assert!(store.resume_point(key, IDENTITY).await.unwrap().is_none());
}

async fn s3_keys(client: &Client, bucket: &str) -> Vec<String> {
    client
        .list_objects_v2()
        .bucket(bucket)
        .send()
        .await
        .expect("ListObjectsV2")
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_a_killed_upload_continues_from_its_last_part() {
    let (store, client, bucket) = s3_store("s3_resume", MIN_PART_SIZE).await;
    let StagingStore::S3(s3) = store else {
        unreachable!()
    };
    // Two ETags per segment: the chain of checkpoints crosses segments.
    let store = StagingStore::S3(s3.with_checkpoint_segment_for_tests(2));
    kills_at_several_offsets_then_complete(&store, MIN_PART_SIZE).await;
    assert_eq!(unfinished_uploads(&client, &bucket).await, 0);
    let keys = s3_keys(&client, &bucket).await;
    assert_eq!(
        keys,
        ["run/output/000001-Patient.ndjson"],
        "only the object"
    );
}

/// Where the directory store checkpoints an attempt fed `chunk`-byte chunks from `offset`, up
/// to `kill_at`: at the first chunk end at least `every` bytes past the last checkpoint.
fn dir_checkpoint(offset: usize, last: usize, every: usize, kill_at: usize, chunk: usize) -> u64 {
    (1..)
        .map(|k| (offset + k * chunk).min(kill_at))
        .find(|end| end - last >= every || *end == kill_at)
        .expect("a chunk end") as u64
}

/// A directory store that checkpoints every `every` bytes.
async fn checkpointing_dir(root: &std::path::Path, every: u64) -> StagingStore {
    StagingStore::Dir(
        DirStore::new(root)
            .await
            .unwrap()
            .with_checkpoint_every(every),
    )
}

#[tokio::test]
async fn dir_a_killed_write_continues_from_its_last_checkpoint() {
    const EVERY: usize = 300_000;
    let dir = tempfile::tempdir().unwrap();
    let store = checkpointing_dir(dir.path(), EVERY as u64).await;
    let data = ndjson(1_000_000);
    let key = "run/output/000002-Patient.ndjson";
    let c1 = dir_checkpoint(0, 0, EVERY, 450_000, 100_003);
    killed_attempt(&store, key, &data, None, 450_000, c1).await;
    let from = store
        .resume_point(key, IDENTITY)
        .await
        .unwrap()
        .expect("checkpoint");
    assert_eq!(from.stored(), c1);
    let offset = from.offset() as usize;
    assert_eq!(data[offset - 1], b'\n');
    let c2 = dir_checkpoint(offset, c1 as usize, EVERY, 700_000, 100_003);
    assert!(c2 < 700_000, "a checkpoint before the kill");
    killed_attempt(&store, key, &data, Some(from), 700_000, c2).await;
    let from = store
        .resume_point(key, IDENTITY)
        .await
        .unwrap()
        .expect("checkpoint");
    assert_eq!(from.stored(), c2);
    let report = continue_to_end(&store, key, &data, from, 70_001)
        .await
        .unwrap();
    assert_eq!(report.resumed_at, c2);
    assert_eq!(
        (report.bytes, report.lines),
        (data.len() as u64, count_lines(&data))
    );
    assert_eq!(read_all(&store, key).await, data, "byte-identical");
    let left: Vec<String> = files_under(dir.path())
        .into_iter()
        .filter(|f| f.contains(".resume"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The bytes before the checkpoint are read again; a source that serves others there (a
/// regenerated file) makes the attempt fail and start over instead of splicing two versions.
async fn other_bytes_on_the_second_read_start_over(store: &StagingStore, unit: usize) {
    let data = ndjson(3 * unit);
    let key = "run/output/000003-Patient.ndjson";
    killed_attempt(store, key, &data, None, unit + 10, unit as u64).await;
    let from = store
        .resume_point(key, IDENTITY)
        .await
        .unwrap()
        .expect("checkpoint");
    let offset = from.offset() as usize;
    let mut other = data.clone();
    other[unit - 2] = b'X';
    let err = store
        .put_resumable(
            key,
            Box::pin(chunked(&other[offset..], 4096)),
            facts(),
            Some(from),
            Arc::new(AtomicU64::new(0)),
            no_wind_down(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("ResumeMismatch"), "{err}");
    assert!(err.is_transient(), "the next attempt starts over: {err}");
    assert!(
        store.resume_point(key, IDENTITY).await.unwrap().is_none(),
        "forgotten"
    );
    assert!(
        matches!(store.get_bytes(key, ANY).await, Ok(None)),
        "nothing staged"
    );
}

#[tokio::test]
async fn s3_other_bytes_on_the_second_read_start_over() {
    let (store, client, bucket) = s3_store("s3_resume_mismatch", MIN_PART_SIZE).await;
    other_bytes_on_the_second_read_start_over(&store, MIN_PART_SIZE).await;
    assert_eq!(unfinished_uploads(&client, &bucket).await, 0, "aborted");
    assert!(s3_keys(&client, &bucket).await.is_empty());
}

#[tokio::test]
async fn dir_other_bytes_on_the_second_read_start_over() {
    let dir = tempfile::tempdir().unwrap();
    let store = checkpointing_dir(dir.path(), 100_003).await;
    other_bytes_on_the_second_read_start_over(&store, 100_003).await;
    let left = files_under(dir.path());
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A download that breaks keeps what was checkpointed (the next attempt continues); a store
/// configured with another part size cannot continue it and forgets it, and a checkpoint of
/// another file (URL) is not this one's.
#[tokio::test]
async fn s3_a_broken_download_keeps_its_upload_for_the_next_attempt() {
    let (store, client, bucket) = s3_store("s3_resume_broken", MIN_PART_SIZE).await;
    let data = ndjson(2 * MIN_PART_SIZE + 1000);
    let broken = || Box::pin(failing_after(&data[..MIN_PART_SIZE + 500], 65_536));
    let key = "run/output/000004-Patient.ndjson";
    let progress = Arc::new(AtomicU64::new(0));
    let err = store
        .put_resumable(
            key,
            broken(),
            facts(),
            None,
            progress.clone(),
            no_wind_down(),
        )
        .await
        .unwrap_err();
    assert_body_failure(&err);
    assert_eq!(progress.load(Ordering::Relaxed), MIN_PART_SIZE as u64);
    assert_eq!(unfinished_uploads(&client, &bucket).await, 1, "kept");
    let other = s3_store_on(
        &bucket,
        S3Options {
            part_size: 2 * MIN_PART_SIZE,
            memory: DEFAULT_TRANSFER_MEMORY,
            force_path_style: None,
        },
    )
    .await;
    let other = StagingStore::S3(other);
    assert!(other.resume_point(key, IDENTITY).await.unwrap().is_none());
    assert_eq!(unfinished_uploads(&client, &bucket).await, 0, "aborted");
    assert!(store.resume_point(key, IDENTITY).await.unwrap().is_none());

    let key = "run/output/000005-Patient.ndjson";
    let progress = Arc::new(AtomicU64::new(0));
    store
        .put_resumable(
            key,
            broken(),
            facts(),
            None,
            progress.clone(),
            no_wind_down(),
        )
        .await
        .unwrap_err();
    assert_eq!(unfinished_uploads(&client, &bucket).await, 1, "kept");
    assert!(store
        .resume_point(key, IDENTITY + 1)
        .await
        .unwrap()
        .is_none());
    assert_eq!(unfinished_uploads(&client, &bucket).await, 0, "aborted");
    assert!(
        s3_keys(&client, &bucket).await.is_empty(),
        "no checkpoint left"
    );
}

/// Asked to wind down (its invocation is about to end), a resumable put stops at its next part
/// boundary with the part stored and checkpointed, and the next attempt continues from there:
/// nothing beyond the line the boundary cut is read again.
async fn winds_down_at_a_part_boundary(store: &StagingStore, unit: usize) {
    let data = ndjson(3 * unit + 12_345);
    let key = "run/output/000006-Patient.ndjson";
    let progress = Arc::new(AtomicU64::new(0));
    let err = store
        .put_resumable(
            key,
            Box::pin(chunked(&data, 100_003)),
            facts(),
            None,
            progress.clone(),
            Arc::new(std::sync::atomic::AtomicBool::new(true)),
        )
        .await
        .unwrap_err();
    assert!(err.is_paused(), "{err}");
    let stored = progress.load(Ordering::Relaxed);
    assert!(stored > 0 && stored <= unit as u64, "{stored}");
    let from = store
        .resume_point(key, IDENTITY)
        .await
        .unwrap()
        .expect("checkpoint");
    assert_eq!(from.stored(), stored);
    let offset = from.offset() as usize;
    assert!(stored as usize - offset < 200, "read again: one line");
    let report = continue_to_end(store, key, &data, from, 65_537)
        .await
        .unwrap();
    assert_eq!(report.resumed_at, stored);
    assert_eq!(read_all(store, key).await, data, "byte-identical");
}

#[tokio::test]
async fn s3_a_put_winds_down_at_a_part_boundary() {
    let (store, client, bucket) = s3_store("s3_wind_down", MIN_PART_SIZE).await;
    winds_down_at_a_part_boundary(&store, MIN_PART_SIZE).await;
    assert_eq!(unfinished_uploads(&client, &bucket).await, 0);
    let keys = s3_keys(&client, &bucket).await;
    assert_eq!(
        keys,
        ["run/output/000006-Patient.ndjson"],
        "only the object"
    );
}

#[tokio::test]
async fn dir_a_put_winds_down_at_a_part_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let store = checkpointing_dir(dir.path(), 100_003).await;
    winds_down_at_a_part_boundary(&store, 100_003).await;
    assert_eq!(
        files_under(dir.path()),
        ["run/output/000006-Patient.ndjson"]
    );
}
