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
/// the other generation — only for the answers each generation is known to give to the other
/// one's request shape (9.x: "The input may not be empty."; 7.x: "Missing 'source'
/// parameter"), so that a 400 about the data itself never suggests switching generations.
pub fn is_wrong_generation(sent: PathlingApi, status: u16, body: &str) -> bool {
    if status != 400 {
        return false;
    }
    let lower = body.to_ascii_lowercase();
    match sent {
        PathlingApi::V7 => lower.contains("input may not be empty"),
        PathlingApi::V9 => [
            "missing 'source'",
            "missing \"source\"",
            "missing source parameter",
        ]
        .iter()
        .any(|m| lower.contains(m)),
    }
}

/// The facts of a `200` answer from an `$import` job URL, as the executor read them. Only the
/// core judges them ([`judge_import_answer`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportAnswer {
    /// The body's `resourceType`, when it is a JSON object that has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<String>,
    /// The issues of an OperationOutcome body.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub issues: Vec<AnswerIssue>,
    /// Why the body is not a FHIR resource at all (empty, not JSON, an array, HTML).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undecodable: Option<String>,
    /// The origin the answer came from, when a redirect led away from the job URL's origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirected_to: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerIssue {
    pub severity: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<String>,
}

/// Reads a job answer's body into [`ImportAnswer`] facts (`redirected_to` is the caller's).
pub fn read_import_answer(body: &[u8]) -> ImportAnswer {
    let undecodable = |why: String| ImportAnswer {
        undecodable: Some(why),
        ..ImportAnswer::default()
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return undecodable("an empty body".into());
    }
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
            let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
            return undecodable(format!("not JSON: {:?}", crate::bulk::truncate(&flat, 80)));
        }
    };
    let Some(obj) = v.as_object() else {
        let kind = match v {
            Value::Array(_) => "a JSON array",
            Value::String(_) => "a JSON string",
            Value::Number(_) => "a JSON number",
            Value::Bool(_) => "a JSON boolean",
            _ => "JSON null",
        };
        return undecodable(format!("{kind}, not a FHIR resource"));
    };
    let resource_type = obj
        .get("resourceType")
        .and_then(Value::as_str)
        .map(|t| crate::bulk::truncate(t, 64));
    let issues = obj
        .get("issue")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .take(20)
                .map(|i| {
                    let text = |k: &str| i.get(k).and_then(Value::as_str).map(str::to_string);
                    AnswerIssue {
                        severity: text("severity").unwrap_or_default(),
                        code: text("code").unwrap_or_default(),
                        diagnostics: text("diagnostics")
                            .or_else(|| {
                                i.pointer("/details/text")
                                    .and_then(Value::as_str)
                                    .map(str::to_string)
                            })
                            .map(|d| crate::bulk::truncate(&d, 300)),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    ImportAnswer {
        resource_type,
        issues,
        undecodable: None,
        redirected_to: None,
    }
}

/// Whether a job's `200` answer means the import succeeded: a `Parameters` import result
/// (9.2+), or an OperationOutcome whose issues are all `information` or `warning` (7.x:
/// "Data import completed successfully"). Anything else — an error outcome, another
/// resource, a body that is not FHIR, an answer from another origin — is a failure, named.
pub fn judge_import_answer(answer: &ImportAnswer) -> Result<(), String> {
    if let Some(origin) = &answer.redirected_to {
        return Err(format!(
            "the job URL redirected to {origin} (a login page?); its answer is not Pathling's"
        ));
    }
    if let Some(why) = &answer.undecodable {
        return Err(format!("the finished job answered {why}"));
    }
    match answer.resource_type.as_deref() {
        Some("Parameters") => Ok(()),
        Some("OperationOutcome") => {
            if answer.issues.is_empty() {
                return Err("the finished job answered an OperationOutcome without issues".into());
            }
            let bad: Vec<String> = answer
                .issues
                .iter()
                .filter(|i| !matches!(i.severity.as_str(), "information" | "warning"))
                .map(|i| {
                    let text = i.diagnostics.as_deref().unwrap_or(i.code.as_str());
                    format!("{} ({}): {text}", i.severity, i.code)
                })
                .collect();
            if bad.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "Pathling reported the import as failed: {}",
                    bad.join("; ")
                ))
            }
        }
        Some(other) => Err(format!(
            "the finished job answered a {other}, not an import result"
        )),
        None => Err("the finished job answered JSON that is not a FHIR resource".into()),
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
        assert!(is_wrong_generation(
            PathlingApi::V9,
            400,
            "Missing 'source' parameter."
        ));
        // A 400 about the data mentions "source" too, but is no generation hint.
        assert!(!is_wrong_generation(
            PathlingApi::V9,
            400,
            "Error parsing source file s3a://b/k: unexpected token at line 3"
        ));
    }

    fn judged(body: &str) -> Result<(), String> {
        judge_import_answer(&read_import_answer(body.as_bytes()))
    }

    #[test]
    fn only_a_real_import_result_is_success() {
        assert_eq!(
            judged(
                r#"{"resourceType":"OperationOutcome","issue":[{"severity":"information","code":"informational","diagnostics":"Data import completed successfully"}]}"#
            ),
            Ok(())
        );
        assert_eq!(
            judged(
                r#"{"resourceType":"Parameters","parameter":[{"name":"transactionTime","valueInstant":"2026-01-01T00:00:00Z"}]}"#
            ),
            Ok(())
        );
        let failed = judged(r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception","diagnostics":"Import failed: disk full"}]}"#).unwrap_err();
        assert!(failed.contains("Import failed: disk full"), "{failed}");
        for body in [
            "",
            "   \n",
            "<html><body>Login</body></html>",
            "[]",
            r#"{"resourceType":"Patient","id":"1"}"#,
            r#"{"resourceType":"OperationOutcome","issue":[]}"#,
            r#"{"hello":"world"}"#,
            "null",
        ] {
            assert!(judged(body).is_err(), "{body:?} must not count as success");
        }
        let redirected = ImportAnswer {
            resource_type: Some("Parameters".into()),
            redirected_to: Some("https://login.example:443".into()),
            ..ImportAnswer::default()
        };
        assert!(judge_import_answer(&redirected).is_err());
    }
}
