//! Bulk Data facts: the export manifest and the NDJSON lines the core must understand.
//!
//! These are pure helpers the executor calls while it holds the bytes (the core never sees a
//! file body): decoding a manifest, summarising `error[]` OperationOutcomes, reading the
//! resource references of `deleted[]` Bundles. Keeping them here keeps every judgement about
//! what the data means in the core.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which manifest array a file came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// `output[]`: resources to import.
    Output,
    /// `deleted[]`: Bundles of DELETE requests.
    Deleted,
    /// `error[]`: OperationOutcomes the server raised while exporting.
    Error,
}

impl FileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::Output => "output",
            FileKind::Deleted => "deleted",
            FileKind::Error => "error",
        }
    }
}

/// A decoded manifest, in the order files are indexed: `output[]`, then `deleted[]`, then
/// `error[]`. This is what the executor keeps in the staging store next to the data (the
/// envelope carries only a compact table of it, see [`crate::state::FileTable`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub transaction_time: String,
    pub requires_access_token: bool,
    pub files: Vec<ManifestFile>,
    /// Entries whose URL an earlier entry (of any array) already listed: left out of `files`,
    /// so that each file is staged and imported once.
    #[serde(default)]
    pub duplicates: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub kind: FileKind,
    #[serde(rename = "type")]
    pub type_name: String,
    pub url: String,
    /// Send the source's bearer token with the download: only when the manifest requires it
    /// and the URL is on the source's own origin (never to a pre-signed or foreign URL).
    pub send_token: bool,
}

/// The most files one manifest may list. The envelope does not grow with it (the file table
/// is stored as runs, measured in `tests/envelope_size.rs`); the decoded manifest in memory
/// and in the staging store does, by about 150 bytes a file.
pub const MAX_MANIFEST_FILES: usize = 1_000_000;

/// The most resource types one manifest may list (FHIR R5 defines about 160): the file
/// table stores a run per type, so this bounds the envelope too.
pub const MAX_MANIFEST_TYPES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("export manifest is not JSON: {0}")]
    NotJson(String),
    #[error("export manifest: {field}: {problem}")]
    Field { field: String, problem: String },
    #[error("export manifest lists {0} files; at most {MAX_MANIFEST_FILES} are supported per run (narrow the export with TYPES or EXPORT_LEVEL)")]
    TooManyFiles(usize),
    #[error(
        "export manifest lists more than {MAX_MANIFEST_TYPES} resource types; FHIR defines fewer"
    )]
    TooManyTypes,
}

fn field_err(field: impl Into<String>, problem: impl Into<String>) -> ManifestError {
    ManifestError::Field {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A FHIR resource type name: `[A-Z][A-Za-z]*`, at most 64 characters.
pub fn is_resource_type(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_uppercase())
        && s.len() <= 64
        && chars.all(|c| c.is_ascii_alphabetic())
}

/// A FHIR logical id: `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_resource_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// `scheme://host:port` of an absolute http(s) URL, with default ports made explicit.
pub fn origin_of(url: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    if !matches!(u.scheme(), "http" | "https") {
        return None;
    }
    Some(format!(
        "{}://{}:{}",
        u.scheme(),
        u.host_str()?.to_ascii_lowercase(),
        u.port_or_known_default()?
    ))
}

/// Decodes and validates a completed export's manifest (the 200 answer to a status poll),
/// when it is one page: a manifest that links a `next` page is refused (the executor reads
/// paged manifests with [`ManifestPages`]).
pub fn parse_manifest(body: &[u8], source_endpoint: &str) -> Result<Manifest, ManifestError> {
    let mut pages = ManifestPages::new(source_endpoint);
    if pages.add(body)?.is_some() {
        return Err(field_err(
            "link",
            "the manifest continues on another page (a paged manifest is read page by page)",
        ));
    }
    pages.finish()
}

/// The most pages a paged manifest may have (each page has at least one file, or links on:
/// an endless chain of empty pages is refused here).
pub const MAX_MANIFEST_PAGES: u32 = 10_000;

/// A manifest read page by page: the first page is the status poll's answer, each later one
/// the `link` (relation `next`) of the page before (Bulk Data's paged manifest).
///
/// Every problem names the offending field, e.g. `output[3].type` (`page 2: output[3].type`
/// after the first page). An entry whose URL (as written) an earlier entry already listed,
/// on any page and in any array, is skipped and counted in [`Manifest::duplicates`]: staging
/// it again would import its resources twice.
///
/// [`ManifestPages::finish`] groups each array by type, types in the order they first appear
/// (a stable sort: a manifest that already lists each type's files together, as servers do,
/// keeps its order). The per-file table then stores one run per type, whatever the manifest
/// ([`crate::file_table`]).
pub struct ManifestPages {
    source_origin: Option<String>,
    /// From the first page; every later page must agree.
    transaction_time: Option<String>,
    requires_access_token: bool,
    files: Vec<ManifestFile>,
    seen: std::collections::HashSet<String>,
    duplicates: u32,
    pages: u32,
    /// Entries listed so far, duplicates included (for the too-many-files message).
    listed: usize,
    /// The pages linked so far.
    linked: std::collections::HashSet<String>,
}

impl ManifestPages {
    pub fn new(source_endpoint: &str) -> Self {
        ManifestPages {
            source_origin: origin_of(source_endpoint),
            transaction_time: None,
            requires_access_token: true,
            files: Vec::new(),
            seen: std::collections::HashSet::new(),
            duplicates: 0,
            pages: 0,
            listed: 0,
            linked: std::collections::HashSet::new(),
        }
    }

    /// Pages read so far.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Adds the next page; answers the URL of the page after it, if it links one.
    pub fn add(&mut self, body: &[u8]) -> Result<Option<String>, ManifestError> {
        self.pages += 1;
        let page = self.pages;
        let named = |e: ManifestError| match e {
            ManifestError::Field { field, problem } if page > 1 => ManifestError::Field {
                field: format!("page {page}: {field}"),
                problem,
            },
            ManifestError::NotJson(m) if page > 1 => {
                ManifestError::NotJson(format!("page {page}: {m}"))
            }
            other => other,
        };
        self.add_page(body).map_err(named)
    }

    fn add_page(&mut self, body: &[u8]) -> Result<Option<String>, ManifestError> {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| ManifestError::NotJson(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| ManifestError::NotJson("not a JSON object".into()))?;
        let transaction_time = match obj.get("transactionTime") {
            Some(Value::String(s)) if crate::time::parse_fhir_instant(s).is_some() => s.clone(),
            Some(other) => {
                return Err(field_err(
                    "transactionTime",
                    format!("not a FHIR instant: {}", truncate(&other.to_string(), 80)),
                ))
            }
            None => return Err(field_err("transactionTime", "missing")),
        };
        let requires_access_token = match obj.get("requiresAccessToken") {
            Some(Value::Bool(b)) => *b,
            // Absent on a later page: as the first page said.
            None | Some(Value::Null) if self.transaction_time.is_some() => {
                self.requires_access_token
            }
            // Absent: assume the server wants its token; it still only goes to its own origin.
            None | Some(Value::Null) => true,
            Some(_) => return Err(field_err("requiresAccessToken", "not a boolean")),
        };
        match &self.transaction_time {
            None => {
                self.transaction_time = Some(transaction_time);
                self.requires_access_token = requires_access_token;
            }
            Some(first) if *first != transaction_time => {
                return Err(field_err(
                    "transactionTime",
                    format!("{transaction_time} differs from the first page's {first}"),
                ))
            }
            Some(_) if requires_access_token != self.requires_access_token => {
                return Err(field_err(
                    "requiresAccessToken",
                    "differs from the first page's",
                ))
            }
            Some(_) => {}
        }
        let next = next_link(obj.get("link"))?;
        for (name, kind, required) in [
            ("output", FileKind::Output, true),
            ("deleted", FileKind::Deleted, false),
            ("error", FileKind::Error, false),
        ] {
            let items = match obj.get(name) {
                Some(Value::Array(items)) => items.as_slice(),
                None | Some(Value::Null) if !required => &[],
                None => return Err(field_err(name, "missing (an empty array is allowed)")),
                Some(_) => return Err(field_err(name, "not an array")),
            };
            self.listed = self.listed.saturating_add(items.len());
            for (i, item) in items.iter().enumerate() {
                self.add_file(name, kind, i, item)?;
                if self.files.len() > MAX_MANIFEST_FILES {
                    return Err(ManifestError::TooManyFiles(self.listed));
                }
            }
        }
        if let Some(url) = &next {
            if self.pages >= MAX_MANIFEST_PAGES {
                return Err(field_err(
                    "link",
                    format!("more than {MAX_MANIFEST_PAGES} pages; the manifest does not end"),
                ));
            }
            if !self.linked.insert(url.clone()) {
                return Err(field_err(
                    "link",
                    format!(
                        "{:?} is a page already read (the pages form a loop)",
                        truncate(url, 120)
                    ),
                ));
            }
        }
        Ok(next)
    }

    fn add_file(
        &mut self,
        name: &str,
        kind: FileKind,
        i: usize,
        item: &Value,
    ) -> Result<(), ManifestError> {
        let at = |f: &str| format!("{name}[{i}].{f}");
        let type_name = item
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| field_err(at("type"), "missing or not a string"))?;
        if !is_resource_type(type_name) {
            return Err(field_err(
                at("type"),
                format!("{:?} is not a FHIR resource type", truncate(type_name, 80)),
            ));
        }
        let url = item
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| field_err(at("url"), "missing or not a string"))?;
        let origin = origin_of(url).ok_or_else(|| {
            field_err(
                at("url"),
                format!("{:?} is not an absolute http(s) URL", truncate(url, 120)),
            )
        })?;
        if !self.seen.insert(url.to_string()) {
            self.duplicates = self.duplicates.saturating_add(1);
            return Ok(());
        }
        self.files.push(ManifestFile {
            kind,
            type_name: type_name.to_string(),
            url: url.to_string(),
            send_token: self.requires_access_token
                && self.source_origin.as_deref() == Some(&origin),
        });
        Ok(())
    }

    /// The whole manifest, grouped by array and type.
    pub fn finish(self) -> Result<Manifest, ManifestError> {
        let Some(transaction_time) = self.transaction_time else {
            return Err(field_err("transactionTime", "missing"));
        };
        let mut files = self.files;
        let mut rank: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for f in &files {
            let next = rank.len();
            rank.entry(f.type_name.clone()).or_insert(next);
        }
        if rank.len() > MAX_MANIFEST_TYPES {
            return Err(ManifestError::TooManyTypes);
        }
        let array = |k: FileKind| match k {
            FileKind::Output => 0,
            FileKind::Deleted => 1,
            FileKind::Error => 2,
        };
        files.sort_by_key(|f| {
            (
                array(f.kind),
                rank.get(&f.type_name).copied().unwrap_or(usize::MAX),
            )
        });
        Ok(Manifest {
            transaction_time,
            requires_access_token: self.requires_access_token,
            files,
            duplicates: self.duplicates,
        })
    }
}

/// The `next` page of a manifest's `link` array (`[{"relation": "next", "url": ...}]`); other
/// relations are ignored.
fn next_link(link: Option<&Value>) -> Result<Option<String>, ManifestError> {
    let links = match link {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(links)) => links,
        Some(_) => return Err(field_err("link", "not an array")),
    };
    let mut next = None;
    for (i, l) in links.iter().enumerate() {
        if l.get("relation").and_then(Value::as_str) != Some("next") {
            continue;
        }
        let url = l
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| field_err(format!("link[{i}].url"), "missing or not a string"))?;
        if origin_of(url).is_none() {
            return Err(field_err(
                format!("link[{i}].url"),
                format!("{:?} is not an absolute http(s) URL", truncate(url, 120)),
            ));
        }
        if next.replace(url.to_string()).is_some() {
            return Err(field_err("link", "more than one next page"));
        }
    }
    Ok(next)
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

/// What the `error[]` files of an export said, folded line by line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeSummary {
    pub fatal: u64,
    pub error: u64,
    pub warning: u64,
    pub information: u64,
    /// Lines that were not an OperationOutcome.
    pub unreadable: u64,
    /// The first few diagnostics, for the run's outcome.
    pub samples: Vec<String>,
}

const MAX_SAMPLES: usize = 5;

impl OutcomeSummary {
    /// Folds one NDJSON line of an `error[]` file into the summary.
    pub fn add_line(&mut self, line: &[u8]) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            self.unreadable += 1;
            return;
        };
        let Some(issues) = v
            .get("issue")
            .and_then(Value::as_array)
            .filter(|_| v.get("resourceType").and_then(Value::as_str) == Some("OperationOutcome"))
        else {
            self.unreadable += 1;
            return;
        };
        for issue in issues {
            let severity = issue
                .get("severity")
                .and_then(Value::as_str)
                .unwrap_or("error");
            match severity {
                "fatal" => self.fatal += 1,
                "warning" => self.warning += 1,
                "information" => self.information += 1,
                _ => self.error += 1,
            }
            if self.samples.len() < MAX_SAMPLES {
                let text = issue
                    .get("diagnostics")
                    .and_then(Value::as_str)
                    .or_else(|| issue.pointer("/details/text").and_then(Value::as_str))
                    .or_else(|| issue.get("code").and_then(Value::as_str))
                    .unwrap_or("(no diagnostics)");
                self.samples
                    .push(format!("{severity}: {}", truncate(text, 200)));
            }
        }
    }

    pub fn merge(&mut self, other: &OutcomeSummary) {
        // Counts are reported by the executor: saturate rather than panic on absurd ones.
        self.fatal = self.fatal.saturating_add(other.fatal);
        self.error = self.error.saturating_add(other.error);
        self.warning = self.warning.saturating_add(other.warning);
        self.information = self.information.saturating_add(other.information);
        self.unreadable = self.unreadable.saturating_add(other.unreadable);
        for s in &other.samples {
            if self.samples.len() < MAX_SAMPLES {
                self.samples.push(s.clone());
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.fatal + self.error + self.warning + self.information + self.unreadable == 0
    }
}

/// A resource to delete, read from a `deleted[]` Bundle entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceRef {
    #[serde(rename = "type")]
    pub type_name: String,
    pub id: String,
}

/// Reads the `request.url = "Type/id"` of every DELETE entry of one `deleted[]` NDJSON line
/// (a Bundle). Blank lines yield nothing; anything malformed is an error naming what.
pub fn deleted_refs(line: &[u8]) -> Result<Vec<ResourceRef>, String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    if v.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err("not a Bundle".into());
    }
    let mut out = Vec::new();
    for (i, entry) in v
        .get("entry")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let method = entry.pointer("/request/method").and_then(Value::as_str);
        if method != Some("DELETE") {
            continue;
        }
        let url = entry
            .pointer("/request/url")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("entry[{i}].request.url missing"))?;
        let (t, id) = url.trim_start_matches('/').split_once('/').ok_or_else(|| {
            format!(
                "entry[{i}].request.url {:?} is not Type/id",
                truncate(url, 80)
            )
        })?;
        if !is_resource_type(t) || !is_resource_id(id) {
            return Err(format!(
                "entry[{i}].request.url {:?} is not Type/id",
                truncate(url, 80)
            ));
        }
        out.push(ResourceRef {
            type_name: t.to_string(),
            id: id.to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SRC: &str = "https://fhir.example.org/fhir";

    fn manifest(v: Value) -> Result<Manifest, ManifestError> {
        parse_manifest(v.to_string().as_bytes(), SRC)
    }

    #[test]
    fn manifest_files_are_indexed_output_deleted_error() {
        let m = manifest(json!({
            "transactionTime": "2026-11-26T10:00:00Z",
            "requiresAccessToken": true,
            "output": [
                {"type": "Patient", "url": "https://fhir.example.org/files/1"},
                {"type": "Observation", "url": "https://bucket.s3.example.com/o?X-Amz-Signature=1"}
            ],
            "deleted": [{"type": "Bundle", "url": "https://fhir.example.org:443/files/d"}],
            "error": [{"type": "OperationOutcome", "url": "https://fhir.example.org/files/e"}]
        }))
        .unwrap();
        let kinds: Vec<_> = m.files.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            [
                FileKind::Output,
                FileKind::Output,
                FileKind::Deleted,
                FileKind::Error
            ]
        );
        let tokens: Vec<_> = m.files.iter().map(|f| f.send_token).collect();
        assert_eq!(tokens, [true, false, true, true]);
    }

    #[test]
    fn token_is_never_sent_when_not_required() {
        let m = manifest(json!({
            "transactionTime": "2026-11-26T10:00:00Z",
            "requiresAccessToken": false,
            "output": [{"type": "Patient", "url": "https://fhir.example.org/files/1"}]
        }))
        .unwrap();
        assert!(!m.files[0].send_token);
    }

    #[test]
    fn manifest_errors_name_the_field() {
        let cases = [
            (json!({"output": []}), "transactionTime"),
            (json!({"transactionTime": "2026-11-26T10:00:00Z"}), "output"),
            (
                json!({"transactionTime": "2026-11-26T10:00:00Z", "output": [{"type": "../x", "url": "https://a/b"}]}),
                "output[0].type",
            ),
            (
                json!({"transactionTime": "2026-11-26T10:00:00Z", "output": [], "error": [{"type": "OperationOutcome", "url": "/relative"}]}),
                "error[0].url",
            ),
            (
                json!({"transactionTime": "2026-11-26T10:00:00Z", "output": [], "requiresAccessToken": "yes"}),
                "requiresAccessToken",
            ),
        ];
        for (v, field) in cases {
            let err = manifest(v).unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
        assert!(matches!(
            parse_manifest(b"<html>", SRC),
            Err(ManifestError::NotJson(_))
        ));
    }

    #[test]
    fn a_url_listed_twice_is_kept_once_and_counted() {
        let m = manifest(json!({
            "transactionTime": "2026-11-26T10:00:00Z",
            "output": [
                {"type": "Patient", "url": "https://fhir.example.org/files/1"},
                {"type": "Observation", "url": "https://fhir.example.org/files/2"},
                {"type": "Patient", "url": "https://fhir.example.org/files/1"}
            ],
            "deleted": [{"type": "Bundle", "url": "https://fhir.example.org/files/2"}],
            "error": [
                {"type": "OperationOutcome", "url": "https://fhir.example.org/files/e"},
                {"type": "OperationOutcome", "url": "https://fhir.example.org/files/e"}
            ]
        }))
        .unwrap();
        let urls: Vec<&str> = m.files.iter().map(|f| f.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "https://fhir.example.org/files/1",
                "https://fhir.example.org/files/2",
                "https://fhir.example.org/files/e"
            ]
        );
        assert_eq!(
            m.files[1].type_name, "Observation",
            "the first listing wins"
        );
        assert_eq!(m.duplicates, 3);
        assert_eq!(m.digest().duplicates, 3);
        assert_eq!(m.digest().files.len(), 3);
        // A stored manifest of an older version (no count) still decodes.
        let mut stored = serde_json::to_value(&m).unwrap();
        stored.as_object_mut().unwrap().remove("duplicates");
        let old: Manifest = serde_json::from_value(stored).unwrap();
        assert_eq!(old.duplicates, 0);
    }

    #[test]
    fn each_array_is_grouped_by_type_in_first_seen_order() {
        let item = |t: &str, i: u32| json!({"type": t, "url": format!("https://a/{i}")});
        let m = manifest(json!({
            "transactionTime": "2026-11-26T10:00:00Z",
            "output": [item("Observation", 0), item("Patient", 1), item("Observation", 2),
                       item("Encounter", 3), item("Patient", 4)],
            "deleted": [item("Bundle", 5)],
            "error": [item("OperationOutcome", 6), item("OperationOutcome", 7)]
        }))
        .unwrap();
        let order: Vec<(&str, &str)> = m
            .files
            .iter()
            .map(|f| (f.type_name.as_str(), &f.url[10..]))
            .collect();
        assert_eq!(
            order,
            [
                ("Observation", "0"),
                ("Observation", "2"),
                ("Patient", "1"),
                ("Patient", "4"),
                ("Encounter", "3"),
                ("Bundle", "5"),
                ("OperationOutcome", "6"),
                ("OperationOutcome", "7")
            ]
        );
        // A manifest already grouped keeps its order.
        let grouped: Vec<Value> = m
            .files
            .iter()
            .filter(|f| f.kind == FileKind::Output)
            .map(|f| json!({"type": f.type_name, "url": f.url}))
            .collect();
        let again = manifest(json!({"transactionTime": "2026-11-26T10:00:00Z", "output": grouped}))
            .unwrap();
        assert_eq!(again.files[..5], m.files[..5]);
    }

    #[test]
    fn a_paged_manifest_is_read_page_by_page() {
        let item = |t: &str, i: u32| json!({"type": t, "url": format!("{SRC}/files/{i}")});
        let page = |items: Vec<Value>, next: Option<&str>| {
            let mut p = json!({"transactionTime": "2026-11-26T10:00:00Z", "output": items});
            if let Some(n) = next {
                p["link"] = json!([{"relation": "self", "url": "https://x/1"},
                                   {"relation": "next", "url": n}]);
            }
            p.to_string()
        };
        let mut pages = ManifestPages::new(SRC);
        let next = pages
            .add(
                page(
                    vec![item("Patient", 0), item("Observation", 1)],
                    Some("https://a/p2"),
                )
                .as_bytes(),
            )
            .unwrap();
        assert_eq!(next.as_deref(), Some("https://a/p2"));
        // The second page repeats a URL of the first (kept once) and adds to both types.
        let next = pages
            .add(
                page(
                    vec![
                        item("Observation", 1),
                        item("Patient", 2),
                        item("Observation", 3),
                    ],
                    None,
                )
                .as_bytes(),
            )
            .unwrap();
        assert_eq!(next, None);
        assert_eq!(pages.pages(), 2);
        let m = pages.finish().unwrap();
        let urls: Vec<&str> = m.files.iter().map(|f| &f.url[SRC.len()..]).collect();
        assert_eq!(urls, ["/files/0", "/files/2", "/files/1", "/files/3"]);
        assert_eq!(m.duplicates, 1);
        assert!(m.files.iter().all(|f| f.send_token));

        // A later page may leave requiresAccessToken out: the first page's value holds.
        let mut pages = ManifestPages::new(SRC);
        let first = json!({"transactionTime": "2026-11-26T10:00:00Z", "requiresAccessToken": false,
                           "output": [item("Patient", 7)],
                           "link": [{"relation": "next", "url": "https://a/p2"}]});
        pages.add(first.to_string().as_bytes()).unwrap();
        pages
            .add(page(vec![item("Patient", 8)], None).as_bytes())
            .unwrap();
        assert!(pages.finish().unwrap().files.iter().all(|f| !f.send_token));

        // A single-page reader refuses a manifest that goes on.
        let err = parse_manifest(page(vec![], Some("https://a/p2")).as_bytes(), SRC).unwrap_err();
        assert!(err.to_string().contains("another page"), "{err}");
    }

    #[test]
    fn bad_pages_name_the_page_and_the_field() {
        let page = |tt: &str, link: Value| {
            json!({"transactionTime": tt, "output": [], "link": link}).to_string()
        };
        let first = page(
            "2026-11-26T10:00:00Z",
            json!([{"relation": "next", "url": "https://a/2"}]),
        );
        let mut pages = ManifestPages::new(SRC);
        pages.add(first.as_bytes()).unwrap();
        let err = pages
            .add(page("2026-11-27T10:00:00Z", Value::Null).as_bytes())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("page 2: transactionTime: 2026-11-27T10:00:00Z differs"),
            "{err}"
        );
        // Pages that link back to one already read would never end.
        let mut pages = ManifestPages::new(SRC);
        pages.add(first.as_bytes()).unwrap();
        let err = pages.add(first.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("page 2: link"), "{err}");
        assert!(err.to_string().contains("loop"), "{err}");
        // A next link must be an absolute http(s) URL, and there is one.
        let mut pages = ManifestPages::new(SRC);
        let err = pages
            .add(
                page(
                    "2026-11-26T10:00:00Z",
                    json!([{"relation": "next", "url": "file:///etc/passwd"}]),
                )
                .as_bytes(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("link[0].url"), "{err}");
        let err = ManifestPages::new(SRC)
            .add(
                page(
                    "2026-11-26T10:00:00Z",
                    json!([{"relation": "next", "url": "https://a/2"}, {"relation": "next", "url": "https://a/3"}]),
                )
                .as_bytes(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("more than one next page"), "{err}");
    }

    #[test]
    fn too_many_types_is_a_clear_error() {
        let name = |i: usize| -> String {
            let letters: String = format!("{i:03}")
                .bytes()
                .map(|d| char::from(b'a' + (d - b'0')))
                .collect();
            format!("Type{letters}")
        };
        let output: Vec<Value> = (0..=MAX_MANIFEST_TYPES)
            .map(|i| json!({"type": name(i), "url": format!("https://a/{i}")}))
            .collect();
        let err = manifest(json!({"transactionTime": "2026-11-26T10:00:00Z", "output": output}))
            .unwrap_err();
        assert_eq!(err, ManifestError::TooManyTypes);
        assert!(err.to_string().contains("more than 256 resource types"));
        let fits: Vec<Value> = (0..MAX_MANIFEST_TYPES)
            .map(|i| json!({"type": name(i), "url": format!("https://a/{i}")}))
            .collect();
        assert!(
            manifest(json!({"transactionTime": "2026-11-26T10:00:00Z", "output": fits})).is_ok()
        );
    }

    #[test]
    fn too_many_files_is_a_clear_error() {
        let output: Vec<Value> = (0..=MAX_MANIFEST_FILES)
            .map(|i| json!({"type": "Patient", "url": format!("https://a/{i}")}))
            .collect();
        let err = manifest(json!({"transactionTime": "2026-11-26T10:00:00Z", "output": output}))
            .unwrap_err();
        assert_eq!(err, ManifestError::TooManyFiles(MAX_MANIFEST_FILES + 1));
    }

    #[test]
    fn outcome_lines_are_summarised() {
        let mut s = OutcomeSummary::default();
        s.add_line(br#"{"resourceType":"OperationOutcome","issue":[{"severity":"fatal","code":"exception","diagnostics":"boom"},{"severity":"warning","code":"x"}]}"#);
        s.add_line(b"not json");
        s.add_line(b"   ");
        assert_eq!((s.fatal, s.warning, s.unreadable), (1, 1, 1));
        assert_eq!(s.samples[0], "fatal: boom");
    }

    #[test]
    fn deleted_bundles_yield_refs() {
        let line = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"request": {"method": "DELETE", "url": "Patient/123"}},
            {"request": {"method": "PUT", "url": "Patient/9"}},
            {"request": {"method": "DELETE", "url": "Observation/a.b-c"}}
        ]})
        .to_string();
        let refs = deleted_refs(line.as_bytes()).unwrap();
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[1].id, "a.b-c");
        assert!(deleted_refs(br#"{"resourceType":"Bundle","entry":[{"request":{"method":"DELETE","url":"../etc/passwd"}}]}"#).is_err());
        assert!(deleted_refs(b"").unwrap().is_empty());
    }
}
