//! The incremental starting point kept next to the staged data: `{prefix}watermark.json`.
//!
//! Each runner's store holds the last run and its watermark, but a store can be lost (a
//! deleted or corrupt state file, a fresh DynamoDB table, a Step Functions execution started
//! with `{}`). Every successful run therefore also records its watermark in the staging
//! store, and a new run starts from the later of the two ([`pathling_import_core::plan::latest`]):
//! `SINCE=auto` never silently turns into a full export, and never moves back.
//!
//! Whoever can write the staging prefix can move this mark (and could corrupt the staged data
//! anyway); it is validated as a FHIR instant before it becomes `_since`.

use crate::staging::{StagingError, StagingStore};
use bytes::Bytes;
use pathling_import_core::staging::StagingLocation;
use pathling_import_core::time::parse_fhir_instant;
use pathling_import_core::Watermark;

const OBJECT: &str = "watermark.json";
/// Where the Step Functions task kept it before every runner did.
const LEGACY_OBJECT: &str = "sfn-watermark.json";

#[derive(Debug, thiserror::Error)]
pub enum WatermarkError {
    #[error("{key}: {source}")]
    Storage {
        key: String,
        #[source]
        source: StagingError,
    },
    #[error("{key} does not hold a watermark with a FHIR instant: {reason}")]
    Invalid { key: String, reason: String },
}

impl WatermarkError {
    pub fn is_transient(&self) -> bool {
        matches!(self, WatermarkError::Storage { source, .. } if source.is_transient())
    }
}

fn prefix(location: &StagingLocation) -> &str {
    match location {
        StagingLocation::S3 { prefix, .. } => prefix.as_str(),
        StagingLocation::Directory { .. } => "",
    }
}

/// `{prefix}watermark.json`.
pub fn key(location: &StagingLocation) -> String {
    format!("{}{OBJECT}", prefix(location))
}

async fn read_key(
    staging: &StagingStore,
    key: String,
) -> Result<Option<Watermark>, WatermarkError> {
    let Some(bytes) = staging
        .get_bytes(&key, crate::staging::MAX_STATE_OBJECT)
        .await
        .map_err(|source| WatermarkError::Storage {
            key: key.clone(),
            source,
        })?
    else {
        return Ok(None);
    };
    let mark: Watermark = serde_json::from_slice(&bytes).map_err(|e| WatermarkError::Invalid {
        key: key.clone(),
        reason: e.to_string(),
    })?;
    if parse_fhir_instant(&mark.transaction_time).is_none() {
        return Err(WatermarkError::Invalid {
            key,
            reason: "transaction_time is not a FHIR instant".into(),
        });
    }
    Ok(Some(mark))
}

/// The recorded watermark (the later of the current and the legacy object), if any.
pub async fn read(
    staging: &StagingStore,
    location: &StagingLocation,
) -> Result<Option<Watermark>, WatermarkError> {
    let current = read_key(staging, key(location)).await?;
    let legacy = read_key(staging, format!("{}{LEGACY_OBJECT}", prefix(location))).await?;
    Ok(pathling_import_core::plan::latest(current, legacy))
}

/// Records `mark` unless the recorded one is later (a late or repeated run must not move the
/// next incremental export back).
pub async fn record(
    staging: &StagingStore,
    location: &StagingLocation,
    mark: &Watermark,
) -> Result<(), WatermarkError> {
    let recorded = read(staging, location).await?;
    let latest = pathling_import_core::plan::latest(recorded.clone(), Some(mark.clone()));
    if latest == recorded {
        return Ok(());
    }
    let key = key(location);
    let body = serde_json::to_vec(mark).map_err(|e| WatermarkError::Invalid {
        key: key.clone(),
        reason: e.to_string(),
    })?;
    staging
        .put_bytes(&key, Bytes::from(body))
        .await
        .map_err(|source| WatermarkError::Storage { key, source })
}
