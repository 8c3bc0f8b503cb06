//! Pathling facts: the two `$import` request shapes, telling the generations apart, and the
//! `batch` Bundle that applies deletions.

use crate::bulk::ResourceRef;
use crate::spec::{ImportMode, PathlingApi};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// One staged file offered to `$import`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportInput {
    #[serde(rename = "type")]
    pub type_name: String,
    pub url: String,
}

/// The `$import` Parameters body for the given generation (see `protocols.md` §3).
pub fn import_parameters(api: PathlingApi, mode: ImportMode, inputs: &[ImportInput]) -> Value {
    let mut parameter: Vec<Value> = Vec::with_capacity(inputs.len() + 2);
    match api {
        PathlingApi::V7 => {
            for input in inputs {
                parameter.push(json!({"name": "source", "part": [
                    {"name": "resourceType", "valueCode": input.type_name},
                    {"name": "url", "valueUrl": input.url},
                    {"name": "mode", "valueCode": mode.as_code()},
                ]}));
            }
        }
        PathlingApi::V9 => {
            parameter.push(json!({"name": "inputFormat", "valueCode": "application/fhir+ndjson"}));
            parameter.push(json!({"name": "saveMode", "valueCode": mode.as_code()}));
            for input in inputs {
                parameter.push(json!({"name": "input", "part": [
                    {"name": "resourceType", "valueCode": input.type_name},
                    {"name": "url", "valueUrl": input.url},
                ]}));
            }
        }
    }
    json!({"resourceType": "Parameters", "parameter": parameter})
}

/// Reads the generation from a CapabilityStatement's `software.version` (`7.2.0+sha`,
/// `9.8.0+sha`). `None` when it cannot tell (e.g. the version is `UNKNOWN`): the caller then
/// tries the 9.x shape and falls back on the server's 400 answer.
pub fn api_from_capability(capability: &Value) -> Option<PathlingApi> {
    let version = capability.pointer("/software/version")?.as_str()?;
    let mut nums = version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().ok());
    let major = nums.next()??;
    let minor = nums.next().flatten().unwrap_or(0);
    // The `input`/`saveMode` shape arrived in 9.2; everything before it takes `source`.
    Some(if (major, minor) >= (9, 2) {
        PathlingApi::V9
    } else {
        PathlingApi::V7
    })
}

/// Given a 400 answer to an `$import` kick-off in `sent` shape, says whether the server is
/// the other generation. 9.x answers the 7.x shape with "The input may not be empty."; 7.x
/// answers the 9.x shape by complaining about the missing `source` parameter.
pub fn is_wrong_generation(sent: PathlingApi, status: u16, body: &str) -> bool {
    if status != 400 {
        return false;
    }
    let lower = body.to_ascii_lowercase();
    match sent {
        PathlingApi::V7 => lower.contains("input may not be empty"),
        PathlingApi::V9 => lower.contains("source") && !lower.contains("allowed"),
    }
}

/// A `batch` Bundle deleting the given resources (Pathling 9.x; 7.x cannot delete).
pub fn delete_batch_bundle(refs: &[ResourceRef]) -> Value {
    let entry: Vec<Value> = refs
        .iter()
        .map(|r| {
            json!({"request": {"method": "DELETE", "url": format!("{}/{}", r.type_name, r.id)}})
        })
        .collect();
    json!({"resourceType": "Bundle", "type": "batch", "entry": entry})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Vec<ImportInput> {
        vec![ImportInput {
            type_name: "Patient".into(),
            url: "s3a://b/k".into(),
        }]
    }

    #[test]
    fn v7_shape_uses_source_parts() {
        let p = import_parameters(PathlingApi::V7, ImportMode::Merge, &inputs());
        assert_eq!(
            p,
            json!({"resourceType": "Parameters", "parameter": [{"name": "source", "part": [
                {"name": "resourceType", "valueCode": "Patient"},
                {"name": "url", "valueUrl": "s3a://b/k"},
                {"name": "mode", "valueCode": "merge"}]}]})
        );
    }

    #[test]
    fn v9_shape_uses_input_parts() {
        let p = import_parameters(PathlingApi::V9, ImportMode::Overwrite, &inputs());
        assert_eq!(
            p,
            json!({"resourceType": "Parameters", "parameter": [
                {"name": "inputFormat", "valueCode": "application/fhir+ndjson"},
                {"name": "saveMode", "valueCode": "overwrite"},
                {"name": "input", "part": [
                    {"name": "resourceType", "valueCode": "Patient"},
                    {"name": "url", "valueUrl": "s3a://b/k"}]}]})
        );
    }

    #[test]
    fn generation_from_capability() {
        let cap = |v: &str| json!({"software": {"name": "Pathling", "version": v}});
        assert_eq!(
            api_from_capability(&cap("7.2.0+abc")),
            Some(PathlingApi::V7)
        );
        assert_eq!(
            api_from_capability(&cap("9.8.0+abc")),
            Some(PathlingApi::V9)
        );
        assert_eq!(api_from_capability(&cap("9.1.3")), Some(PathlingApi::V7));
        assert_eq!(api_from_capability(&cap("UNKNOWN")), None);
        assert_eq!(api_from_capability(&json!({})), None);
    }

    #[test]
    fn wrong_generation_is_recognised_from_400() {
        assert!(is_wrong_generation(
            PathlingApi::V7,
            400,
            "The input may not be empty."
        ));
        assert!(!is_wrong_generation(
            PathlingApi::V7,
            403,
            "The input may not be empty."
        ));
        assert!(!is_wrong_generation(
            PathlingApi::V9,
            400,
            "s3a://x is not an allowed source for import."
        ));
    }
}
