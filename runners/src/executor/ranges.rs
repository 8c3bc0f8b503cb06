//! A large file moved as byte ranges by a fan-out's items (see
//! [`staging::split`](crate::staging::split) for the plan, the records and why every line is
//! checked exactly once).

use super::{body_failure_of, header, staging_failure, url_identity, Executor, NDJSON};
use crate::staging::split::{RangeCut, RangeDone, SplitPlan, VERSION};
use crate::staging::{BodyStats, SourceFacts, StagingStore};
use futures::StreamExt;
use pathling_import_core::effect::{Effect, Request};
use pathling_import_core::retry::{Failure, FailureKind};
use pathling_import_core::staging::StagingKey;
use pathling_import_core::NdjsonCheck;
use reqwest::{Response, StatusCode};
use std::sync::atomic::Ordering;

/// Why a range was not stored.
#[derive(Debug)]
pub enum RangeFailure {
    /// The source no longer serves the planned file (another version, or no ranges): the plan
    /// is void and the file starts over.
    Changed(Failure),
    /// This attempt failed; another may succeed.
    Failed(Failure),
}

impl Executor {
    /// Splits the file `resp` is the first answer for, when it is worth it and the source can
    /// serve ranges of this very version (a strong `ETag` or a date, the length known, no
    /// content encoding): starts the plan, and returns the `paused` failure the attempt ends
    /// with.
    pub(super) async fn split(
        &self,
        ctx: &str,
        key: &StagingKey,
        resp: &Response,
        facts: &SourceFacts,
        range_bytes: u64,
    ) -> Result<Option<Failure>, Failure> {
        let StagingStore::S3(s3) = &self.staging else {
            return Ok(None);
        };
        let serves_ranges = header(resp.headers(), "accept-ranges")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("bytes")));
        let encoded = header(resp.headers(), "content-encoding")
            .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"));
        let Some(length) = facts.length else {
            return Ok(None);
        };
        if !serves_ranges || encoded || facts.if_range().is_none() {
            return Ok(None);
        }
        let plan = s3
            .start_split(key.as_str(), facts.clone(), length, range_bytes)
            .await
            .map_err(|e| staging_failure(&format!("staging {key}"), &e))?;
        if plan.is_some() {
            self.split_keys
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.as_str().to_owned());
        }
        Ok(plan.map(|plan| {
            tracing::info!(
                key = %key,
                length,
                ranges = plan.ranges(),
                "{key} ({length} bytes) moves as {} ranges",
                plan.ranges()
            );
            Failure::new(
                FailureKind::Paused,
                format!(
                    "{ctx}: {length} bytes, split into {} ranges for the fan-out",
                    plan.ranges()
                ),
            )
        }))
    }

    /// Stores range `i` of `plan` for `request`'s file: asks the source for it (from the byte
    /// before, to find its first line; on past its end, to finish its last), stores exactly
    /// its bytes as its parts, and checks and counts the lines that start in it.
    pub async fn stage_range(
        &self,
        request: &Request,
        plan: &SplitPlan,
        i: u32,
        fan_out: &str,
    ) -> Result<RangeDone, RangeFailure> {
        use RangeFailure::{Changed, Failed};
        let local = |m: String| Failed(Failure::new(FailureKind::Local, m));
        let Effect::StageFile {
            manifest_key,
            index,
            kind,
            type_name,
            key,
            validate,
        } = &request.effect
        else {
            return Err(local("a range of a request that stages no file".into()));
        };
        let StagingStore::S3(s3) = &self.staging else {
            return Err(local("ranges are staged to S3 only".into()));
        };
        let Some(range) = plan.range(i) else {
            return Err(local(format!("the plan of {key} has no range {i}")));
        };
        let (url, send_token, ctx) = self
            .file_of(manifest_key, *index, *kind, type_name)
            .await
            .map_err(Failed)?;
        let ctx = format!("{ctx}, bytes {}..{}", range.start, range.end);
        let changed = |why: &str| {
            Changed(Failure::new(
                FailureKind::Network,
                format!("{ctx}: {why}; the file starts over"),
            ))
        };
        if url_identity(&url) != plan.facts.identity {
            return Err(changed("the manifest names another file than the plan's"));
        }
        let mut cut = RangeCut::new(range.clone());
        let from = cut.request_from();
        let resp = self
            .send(super::Side::Source, send_token, &ctx, || {
                let req = self
                    .source_http
                    .get(&url)
                    .header("accept", NDJSON)
                    .header(reqwest::header::ACCEPT_ENCODING, "identity")
                    .header(reqwest::header::RANGE, format!("bytes={from}-"));
                match plan.facts.if_range() {
                    Some(v) => req.header(reqwest::header::IF_RANGE, v),
                    None => req,
                }
            })
            .await
            .map_err(Failed)?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {}
            // `If-Range` did not match: the file is another now.
            StatusCode::OK => return Err(changed("the source sent the whole file, not the range")),
            StatusCode::RANGE_NOT_SATISFIABLE => return Err(changed("the file is shorter now")),
            _ => return Err(Failed(super::unexpected(&ctx, resp, "206").await)),
        }
        let answered =
            header(resp.headers(), "content-range").and_then(|r| super::parse_content_range(&r));
        let facts = SourceFacts {
            identity: plan.facts.identity,
            etag: header(resp.headers(), "etag").filter(|e| !e.starts_with("W/")),
            last_modified: header(resp.headers(), "last-modified"),
            length: answered.and_then(|(_, total)| total),
        };
        if answered.map(|(start, _)| start) != Some(from) || facts.length != Some(plan.length) {
            return Err(changed("the source answered with another range"));
        }
        if !plan.facts.agrees_with(&facts) {
            return Err(changed("the source's file changed"));
        }
        let key_str = key.as_str();
        let mut writer = s3.range_writer(key_str, plan, i);
        // Lines are numbered from the range's first; the first line of the file, which Sample
        // mode parses, is range 0's.
        let mut check = if i == 0 {
            NdjsonCheck::new(type_name, *validate)
        } else {
            NdjsonCheck::resume_at(type_name, *validate, 0, 1)
        };
        let mut stats = BodyStats::default();
        let mut last_stored = None;
        let store_failure = |e: crate::staging::StagingError| {
            let failure = staging_failure(&format!("staging {key}"), &e);
            if e.code() == Some("NoSuchUpload") {
                // The planned upload is gone (a lifecycle rule, or a voided plan).
                Changed(Failure::new(
                    FailureKind::Network,
                    format!("{failure}; the split upload is gone, the file starts over"),
                ))
            } else {
                Failed(failure)
            }
        };
        let content = |e| {
            Failed(Failure::new(
                FailureKind::Undecodable,
                format!("{ctx}: {e} (counting from the first line that starts in the range)"),
            ))
        };
        let mut body = resp.bytes_stream();
        while !cut.is_done() {
            let Some(chunk) = body.next().await else {
                break;
            };
            let chunk = chunk.map_err(|e| Failed(body_failure_of(&ctx, &e)))?;
            self.counters
                .bytes_downloaded
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            let c = cut.feed(&chunk);
            let checked = &chunk[c.check];
            check.push(checked).map_err(content)?;
            stats.observe(checked);
            let stored = &chunk[c.store];
            if let Some(&b) = stored.last() {
                last_stored = Some(b);
            }
            writer.push(stored).await.map_err(store_failure)?;
        }
        // The file's end also ends its last line.
        if !cut.is_done() && cut.reached() < plan.length {
            return Err(Failed(Failure::new(
                FailureKind::Network,
                format!("{ctx}: the download ended at byte {}", cut.reached()),
            )));
        }
        check.finish().map_err(content)?;
        // A last line without a newline counts where it starts (possibly an earlier range).
        if cut.reached() >= plan.length && stats.needs_newline() {
            stats.observe(b"\n");
        }
        let last = range.end == plan.length;
        let newline_added = last && last_stored.is_some_and(|b| b != b'\n');
        if newline_added {
            writer.push(b"\n").await.map_err(store_failure)?;
        }
        let etags = writer.finish().await.map_err(store_failure)?;
        Ok(RangeDone {
            v: VERSION,
            upload_id: plan.upload_id.clone(),
            etags,
            bytes: range.end - range.start + u64::from(newline_added),
            lines: stats.report(false).lines,
            newline_added,
            fan_out: fan_out.to_owned(),
        })
    }
}
