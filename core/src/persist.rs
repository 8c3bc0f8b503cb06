//! The versioned envelope every store keeps: `{schema_version, run_id, seq, started_at, spec,
//! watermark, state}` — one JSON document, identical in a local file, a DynamoDB item and a
//! Step Functions payload.
//!
//! Compatibility rules: a newer `schema_version` is refused with a clear error (an old binary
//! must not guess at a new format); an older one is upgraded by pure JSON upcasters, one per
//! version step; `core/tests/fixtures/v{N}/` holds golden envelopes per released version that
//! are never edited, and every one of them must keep decoding.

use crate::machine::SyncRun;
use serde_json::Value;

/// The version this build writes.
///
/// - 1: the first release.
/// - 2: failed runs keep a resume point and their cause, a kick-off that must not be repeated
///   records when it was sent, polls remember a `429`. Every new field is optional, so a v1
///   envelope reads as v2 unchanged; the version still moved on so that a v1 binary refuses
///   a v2 envelope instead of silently dropping what it does not know.
/// - 3: the per-file table is stored as runs (`layout`, `status`) instead of one column entry
///   per file, so that it stays a few KiB at a million files ([`crate::file_table`]).
pub const SCHEMA_VERSION: u64 = 3;

/// Upgrades an envelope from version `i + 1` to `i + 2` (index 0 upgrades v1 to v2).
pub type Upcaster = fn(Value) -> Result<Value, String>;
pub const UPCASTERS: &[Upcaster] = &[v1_to_v2, v2_to_v3];

/// v1 → v2: nothing to rewrite (see [`SCHEMA_VERSION`]).
fn v1_to_v2(v: Value) -> Result<Value, String> {
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    Ok(v)
}

/// v2 → v3: every file table (in the state, a resume point or a failed run's retry) is
/// rewritten from columns into runs.
fn v2_to_v3(mut v: Value) -> Result<Value, String> {
    fn walk(v: &mut Value) -> Result<(), String> {
        match v {
            Value::Object(map) => {
                if map.contains_key("type_of") && map.contains_key("types") {
                    *v = crate::file_table::upcast_v2_table(v)?;
                    return Ok(());
                }
                map.values_mut().try_for_each(walk)
            }
            Value::Array(items) => items.iter_mut().try_for_each(walk),
            _ => Ok(()),
        }
    }
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    if let Some(state) = v.get_mut("state") {
        walk(state)?;
    }
    Ok(v)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PersistError {
    #[error("stored run is not valid JSON: {0}")]
    NotJson(String),
    #[error("stored run has no numeric schema_version")]
    NoVersion,
    #[error("stored run has schema_version {found}, newer than this build understands ({SCHEMA_VERSION}); upgrade pathling-import")]
    TooNew { found: u64 },
    #[error("stored run (schema_version {version}) could not be upgraded: {reason}")]
    Upcast { version: u64, reason: String },
    #[error("stored run is malformed: {0}")]
    Malformed(String),
}

/// Serializes a run into its envelope.
pub fn encode(run: &SyncRun) -> Value {
    let mut v = serde_json::to_value(run).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("schema_version".into(), Value::from(SCHEMA_VERSION));
    }
    v
}

pub fn encode_string(run: &SyncRun) -> String {
    encode(run).to_string()
}

/// Reads an envelope, upgrading older versions.
pub fn decode(text: &[u8]) -> Result<SyncRun, PersistError> {
    let v: Value =
        serde_json::from_slice(text).map_err(|e| PersistError::NotJson(e.to_string()))?;
    decode_value(v, UPCASTERS)
}

/// Reads an envelope with an explicit upcaster chain (tests exercise the mechanism with
/// their own chain).
pub fn decode_value(mut v: Value, upcasters: &[Upcaster]) -> Result<SyncRun, PersistError> {
    let current = upcasters.len() as u64 + 1;
    let mut version = v
        .get("schema_version")
        .and_then(Value::as_u64)
        .ok_or(PersistError::NoVersion)?;
    if version > current {
        return Err(PersistError::TooNew { found: version });
    }
    if version == 0 {
        return Err(PersistError::NoVersion);
    }
    let found = version;
    while version < current {
        let up = upcasters[(version - 1) as usize];
        v = up(v).map_err(|reason| PersistError::Upcast { version, reason })?;
        version += 1;
    }
    if let Value::Object(map) = &mut v {
        map.remove("schema_version");
        if found < current {
            map.insert("upgraded_from".into(), Value::from(found));
        }
    }
    serde_json::from_value(v).map_err(|e| PersistError::Malformed(e.to_string()))
}
