//! Pathling facts: the two `$import` request shapes, telling the generations apart, and the
//! `batch` Bundle that applies deletions.

use crate::bulk::ResourceRef;
use crate::retry::Failure;
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

/// The `$import` Parameters body for the given generation (see `docs/protocols.md`, §3
/// "Pathling `$import`", "The request").
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

/// `$import` Parameters as someone wrote them (the original tool's `transferToS3` output,
/// for its `pathlingImport` step), in either generation's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct GivenParameters {
    /// The shape they are in.
    pub api: PathlingApi,
    pub inputs: Vec<ImportInput>,
    /// Per input (7.x `mode`) or for all (9.x `saveMode`); `None` when not given.
    pub modes: Vec<Option<String>>,
}

/// Reads the inputs of `$import` Parameters: 7.x `source` parts (`resourceType`, `url`,
/// `mode`) or 9.2+ `input` parts with `saveMode`.
pub fn read_parameters(parameters: &Value) -> Result<GivenParameters, String> {
    let list = match parameters.get("parameter") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.clone(),
        Some(_) => return Err("parameters: \"parameter\" must be an array".into()),
    };
    let named = |p: &Value, name: &str| p.get("name").and_then(Value::as_str) == Some(name);
    let part_value = |p: &Value, name: &str| -> Option<String> {
        p.get("part")?
            .as_array()?
            .iter()
            .find(|q| named(q, name))
            .and_then(|q| {
                ["valueCode", "valueUrl", "valueUri", "valueString"]
                    .iter()
                    .find_map(|k| q.get(*k).and_then(Value::as_str))
                    .map(str::to_string)
            })
    };
    let sources: Vec<&Value> = list.iter().filter(|p| named(p, "source")).collect();
    let inputs9: Vec<&Value> = list.iter().filter(|p| named(p, "input")).collect();
    let (api, parts) = match (sources.is_empty(), inputs9.is_empty()) {
        (false, true) => (PathlingApi::V7, sources),
        (true, false) => (PathlingApi::V9, inputs9),
        (true, true) => (PathlingApi::V7, Vec::new()),
        (false, false) => return Err("parameters mix 7.x `source` and 9.x `input` entries".into()),
    };
    let save_mode = list
        .iter()
        .find(|p| named(p, "saveMode"))
        .and_then(|p| p.get("valueCode").and_then(Value::as_str))
        .map(str::to_string);
    let mut inputs = Vec::with_capacity(parts.len());
    let mut modes = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        let type_name = part_value(p, "resourceType")
            .ok_or(format!("parameters: entry {i} has no resourceType"))?;
        let url = part_value(p, "url").ok_or(format!("parameters: entry {i} has no url"))?;
        inputs.push(ImportInput { type_name, url });
        modes.push(match api {
            PathlingApi::V7 => part_value(p, "mode"),
            PathlingApi::V9 => save_mode.clone(),
        });
    }
    Ok(GivenParameters { api, inputs, modes })
}

impl GivenParameters {
    /// The Parameters to send to a target of generation `api`: the given ones unchanged when
    /// they already are in its shape, else converted (`s3://` becomes `s3a://` for 9.x). A
    /// missing mode means what the given shape's generation does without one (9.2+:
    /// `merge`; 7.x: `overwrite`), so the conversion never changes what the import does.
    pub fn for_api(&self, api: PathlingApi, original: &Value) -> Result<Value, String> {
        if api == self.api {
            return Ok(original.clone());
        }
        let mut distinct: Vec<&Option<String>> = Vec::new();
        for m in &self.modes {
            if !distinct.contains(&m) {
                distinct.push(m);
            }
        }
        let mode =
            match distinct.as_slice() {
                [] | [None] => self.api.default_mode(),
                [Some(code)] => ImportMode::from_code(code)
                    .ok_or_else(|| format!("unknown import mode {code:?}"))?,
                _ => return Err(
                    "the 7.x parameters use different modes per source, which the 9.2+ request \
                     cannot express"
                        .into(),
                ),
            };
        if api == PathlingApi::V7 && !mode.supported_by_v7() {
            return Err(format!(
                "import mode {} needs Pathling 9.2+",
                mode.as_code()
            ));
        }
        let inputs: Vec<ImportInput> = self
            .inputs
            .iter()
            .map(|i| ImportInput {
                type_name: i.type_name.clone(),
                url: match (api, i.url.strip_prefix("s3://")) {
                    (PathlingApi::V9, Some(rest)) => format!("s3a://{rest}"),
                    _ => i.url.clone(),
                },
            })
            .collect();
        Ok(import_parameters(api, mode, &inputs))
    }
}

/// What one entry of a delete `batch` answer says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteEntry {
    Deleted,
    /// 404 or 410: the resource was not there (deleted before, or never imported) — done.
    AlreadyAbsent,
}

/// Judges an entry's `response.status` (`"204 No Content"`). Anything but 2xx, 404 and 410
/// fails the whole file, which is retried (deleting twice is harmless); an entry without a
/// status is a broken answer treated like a gateway error, i.e. retried too.
pub fn judge_delete_entry(status: Option<&str>, what: &str) -> Result<DeleteEntry, Failure> {
    let code = status
        .and_then(|s| s.split_whitespace().next())
        .and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(200..=299) => Ok(DeleteEntry::Deleted),
        Some(404 | 410) => Ok(DeleteEntry::AlreadyAbsent),
        Some(code) => Err(Failure::http(
            code,
            format!("{what} answered {:?}", status.unwrap_or_default()),
        )),
        None => Err(Failure::http(
            502,
            format!("{what}: the batch answer has no status for it"),
        )),
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

    fn modes_of(p: &Value) -> Vec<String> {
        let mut out = Vec::new();
        for entry in p["parameter"].as_array().unwrap() {
            if entry["name"] == "saveMode" {
                out.push(entry["valueCode"].as_str().unwrap().to_string());
            }
            for part in entry["part"].as_array().into_iter().flatten() {
                if part["name"] == "mode" {
                    out.push(part["valueCode"].as_str().unwrap().to_string());
                }
            }
        }
        out
    }

    fn strip_modes(mut p: Value) -> Value {
        let list = p["parameter"].as_array_mut().unwrap();
        list.retain(|e| e["name"] != "saveMode");
        for entry in list.iter_mut() {
            if let Some(parts) = entry.get_mut("part").and_then(Value::as_array_mut) {
                parts.retain(|q| q["name"] != "mode");
            }
        }
        p
    }

    #[test]
    fn given_parameters_convert_in_both_directions_with_and_without_a_mode() {
        let s3 = || {
            vec![ImportInput {
                type_name: "Patient".into(),
                url: "s3://bucket/run/output/000000-Patient.ndjson".into(),
            }]
        };
        for mode in [ImportMode::Merge, ImportMode::Overwrite] {
            // 7 -> 9: the mode carries over, s3:// becomes s3a://.
            let p7 = import_parameters(PathlingApi::V7, mode, &s3());
            let given = read_parameters(&p7).unwrap();
            assert_eq!(given.api, PathlingApi::V7);
            assert_eq!(given.for_api(PathlingApi::V7, &p7).unwrap(), p7);
            let p9 = given.for_api(PathlingApi::V9, &p7).unwrap();
            assert_eq!(modes_of(&p9), [mode.as_code()]);
            assert!(p9.to_string().contains("s3a://bucket/run/output"));
            // 9 -> 7: the same mode back.
            let back = read_parameters(&p9).unwrap();
            assert_eq!(back.api, PathlingApi::V9);
            let p7_again = back.for_api(PathlingApi::V7, &p9).unwrap();
            assert_eq!(modes_of(&p7_again), [mode.as_code()]);
        }
        // Without a mode, each shape means its own generation's default: a 9.x request
        // without saveMode merges, and must not become an overwrite for 7.x.
        let p9 = strip_modes(import_parameters(PathlingApi::V9, ImportMode::Merge, &s3()));
        let p7 = read_parameters(&p9)
            .unwrap()
            .for_api(PathlingApi::V7, &p9)
            .unwrap();
        assert_eq!(modes_of(&p7), ["merge"]);
        let p7 = strip_modes(import_parameters(PathlingApi::V7, ImportMode::Merge, &s3()));
        let p9 = read_parameters(&p7)
            .unwrap()
            .for_api(PathlingApi::V9, &p7)
            .unwrap();
        assert_eq!(modes_of(&p9), ["overwrite"]);
        // 9.x-only modes cannot go to 7.x.
        let append = import_parameters(PathlingApi::V9, ImportMode::Append, &s3());
        assert!(read_parameters(&append)
            .unwrap()
            .for_api(PathlingApi::V7, &append)
            .is_err());
    }

    #[test]
    fn malformed_given_parameters_are_refused() {
        let empty = json!({"resourceType": "Parameters", "parameter": []});
        assert!(read_parameters(&empty).unwrap().inputs.is_empty());
        let bad = json!({"parameter": [{"name": "source", "part": [{"name": "url", "valueUrl": "s3://b/k"}]}]});
        assert!(read_parameters(&bad).unwrap_err().contains("resourceType"));
        let mixed = json!({"parameter": [
            {"name": "source", "part": []}, {"name": "input", "part": []}]});
        assert!(read_parameters(&mixed).is_err());
        let modes = json!({"parameter": [
            {"name": "source", "part": [{"name": "resourceType", "valueCode": "Patient"}, {"name": "url", "valueUrl": "s3://b/1"}, {"name": "mode", "valueCode": "merge"}]},
            {"name": "source", "part": [{"name": "resourceType", "valueCode": "Patient"}, {"name": "url", "valueUrl": "s3://b/2"}, {"name": "mode", "valueCode": "overwrite"}]}]});
        let given = read_parameters(&modes).unwrap();
        assert!(given.for_api(PathlingApi::V9, &modes).is_err());
        assert_eq!(given.for_api(PathlingApi::V7, &modes).unwrap(), modes);
    }

    #[test]
    fn delete_entries_are_judged_in_the_core() {
        assert_eq!(
            judge_delete_entry(Some("204 No Content"), "x"),
            Ok(DeleteEntry::Deleted)
        );
        assert_eq!(
            judge_delete_entry(Some("200"), "x"),
            Ok(DeleteEntry::Deleted)
        );
        assert_eq!(
            judge_delete_entry(Some("404 Not Found"), "x"),
            Ok(DeleteEntry::AlreadyAbsent)
        );
        assert_eq!(
            judge_delete_entry(Some("410"), "x"),
            Ok(DeleteEntry::AlreadyAbsent)
        );
        let f = judge_delete_entry(Some("409 Conflict"), "deleting Patient/1").unwrap_err();
        assert_eq!(f.status(), Some(409));
        assert!(f.message.contains("Patient/1"));
        let f = judge_delete_entry(None, "deleting Patient/1").unwrap_err();
        assert_eq!(crate::retry::classify(&f), crate::retry::Verdict::Transient);
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
