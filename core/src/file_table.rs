//! The per-file table of a run: what the envelope knows about every manifest file.
//!
//! Two costs must not grow with the manifest:
//!
//! - **Stored size.** The table is serialized as runs, not rows: `layout` lists runs of
//!   (array, type) and `status` runs of one status (`s499000p3s5p500992`). The manifest is
//!   grouped by array and type when it is decoded ([`crate::bulk::parse_manifest`]), so
//!   `layout` has one run per (array, type); `status` has one run per hole, and holes are
//!   files in flight, files waiting to retry and files that failed for good, each of which
//!   the machine bounds. The last errors are kept for a few files only ([`MAX_ERRORS`]); the
//!   event log has every one. 1,000,000 files fit in a few KiB (`tests/envelope_size.rs`).
//! - **Work per step.** The machine copies the run on every step and looks for the next
//!   files to hand out. Rows live in shared chunks of [`CHUNK`] rows that are copied only when
//!   written, and every chunk counts its rows per (array, status), so that copying the table,
//!   counting files of a status and finding the next pending file cost about
//!   `files / CHUNK + CHUNK` instead of `files`.

use crate::bulk::FileKind;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Rows per shared chunk (see the module docs).
const CHUNK: usize = 1024;

/// The most files whose last error text the table keeps (the lowest indexes: the ones a
/// failure message names). Errors are for people; the event log has every one of them.
pub const MAX_ERRORS: usize = 8;

/// The longest error text kept per file.
pub const MAX_ERROR_CHARS: usize = 300;

/// Status of one manifest file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileStatus {
    /// Not staged yet (maybe waiting to retry).
    Pending,
    Staged,
    /// Deletions applied (`deleted[]` files only).
    Applied,
    /// Gave up; the run fails naming it.
    Failed,
}

impl FileStatus {
    const ALL: [FileStatus; 4] = [
        FileStatus::Pending,
        FileStatus::Staged,
        FileStatus::Applied,
        FileStatus::Failed,
    ];

    fn slot(self) -> usize {
        self as usize
    }

    fn code(self) -> char {
        match self {
            FileStatus::Pending => 'p',
            FileStatus::Staged => 's',
            FileStatus::Applied => 'a',
            FileStatus::Failed => 'f',
        }
    }

    fn from_code(c: char) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.code() == c)
    }
}

const KINDS: [FileKind; 3] = [FileKind::Output, FileKind::Deleted, FileKind::Error];

fn kind_slot(k: FileKind) -> usize {
    match k {
        FileKind::Output => 0,
        FileKind::Deleted => 1,
        FileKind::Error => 2,
    }
}

fn kind_code(k: FileKind) -> char {
    match k {
        FileKind::Output => 'o',
        FileKind::Deleted => 'd',
        FileKind::Error => 'e',
    }
}

fn kind_from_code(c: char) -> Option<FileKind> {
    KINDS.into_iter().find(|k| kind_code(*k) == c)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRow {
    pub kind: FileKind,
    pub type_idx: u16,
    pub status: FileStatus,
    /// Transient failures so far; the attempt number of the next try.
    pub failures: u32,
    pub not_before: Timestamp,
}

impl FileRow {
    fn fresh(kind: FileKind, type_idx: u16) -> Self {
        FileRow {
            kind,
            type_idx,
            status: FileStatus::Pending,
            failures: 0,
            not_before: Timestamp::ZERO,
        }
    }
}

/// Rows per (array, status).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts([[u32; 4]; 3]);

impl Counts {
    fn add(&mut self, r: &FileRow) {
        let n = &mut self.0[kind_slot(r.kind)][r.status.slot()];
        *n = n.saturating_add(1);
    }

    fn remove(&mut self, r: &FileRow) {
        let n = &mut self.0[kind_slot(r.kind)][r.status.slot()];
        *n = n.saturating_sub(1);
    }

    fn get(&self, kind: Option<FileKind>, status: FileStatus) -> u32 {
        match kind {
            Some(k) => self.0[kind_slot(k)][status.slot()],
            None => self.0.iter().map(|by| by[status.slot()]).sum(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Chunk {
    rows: Vec<FileRow>,
    counts: Counts,
}

/// Per-file progress (see the module docs for its shape and costs).
#[derive(Clone, PartialEq)]
pub struct FileTable {
    pub types: Vec<String>,
    chunks: Vec<Arc<Chunk>>,
    len: usize,
    totals: Counts,
    /// Files with at least one failure: waiting to retry, or failed for good.
    failing: BTreeSet<u32>,
    /// The last error of a few failing files ([`MAX_ERRORS`]).
    errors: BTreeMap<u32, String>,
    pub bytes: u64,
    pub resources_by_type: Vec<u64>,
}

/// A summary, not a million rows: a table may end up in a panic message or a log line.
impl std::fmt::Debug for FileTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let by_status: Vec<(FileStatus, usize)> = FileStatus::ALL
            .iter()
            .map(|s| (*s, self.count_of(None, *s)))
            .filter(|(_, n)| *n > 0)
            .collect();
        f.debug_struct("FileTable")
            .field("files", &self.len)
            .field("types", &self.types)
            .field("by_status", &by_status)
            .field("failing", &self.failing().collect::<Vec<_>>())
            .field("errors", &self.errors)
            .field("bytes", &self.bytes)
            .field("resources_by_type", &self.resources_by_type)
            .finish()
    }
}

impl FileTable {
    /// One pending row per manifest file, in manifest order.
    pub fn from_digest(files: &[(FileKind, String)]) -> Self {
        let mut types: Vec<String> = Vec::new();
        let rows = files.iter().map(|(kind, type_name)| {
            let idx = match types.iter().position(|t| t == type_name) {
                Some(i) => i,
                None => {
                    types.push(type_name.clone());
                    types.len() - 1
                }
            };
            FileRow::fresh(*kind, u16::try_from(idx).unwrap_or(u16::MAX))
        });
        let rows: Vec<FileRow> = rows.collect();
        let n = types.len();
        Self::from_rows(types, rows, vec![0; n])
    }

    fn from_rows(types: Vec<String>, rows: Vec<FileRow>, resources_by_type: Vec<u64>) -> Self {
        let mut totals = Counts::default();
        let mut failing = BTreeSet::new();
        let len = rows.len();
        let chunks = rows
            .chunks(CHUNK)
            .enumerate()
            .map(|(c, rows)| {
                let mut counts = Counts::default();
                for (o, r) in rows.iter().enumerate() {
                    counts.add(r);
                    totals.add(r);
                    if r.failures > 0 {
                        failing.insert((c * CHUNK + o) as u32);
                    }
                }
                Arc::new(Chunk {
                    rows: rows.to_vec(),
                    counts,
                })
            })
            .collect();
        FileTable {
            types,
            chunks,
            len,
            totals,
            failing,
            errors: BTreeMap::new(),
            bytes: 0,
            resources_by_type,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn row(&self, index: u32) -> Option<FileRow> {
        let i = index as usize;
        self.chunks.get(i / CHUNK)?.rows.get(i % CHUNK).copied()
    }

    /// Every row in index order (a walk over the whole table: for phase ends, not for steps).
    pub fn iter(&self) -> impl Iterator<Item = FileRow> + '_ {
        self.chunks.iter().flat_map(|c| c.rows.iter().copied())
    }

    /// Changes one row, keeping the counts. Unknown indexes change nothing.
    pub fn update(&mut self, index: u32, change: impl FnOnce(&mut FileRow)) {
        let i = index as usize;
        let Some(chunk) = self.chunks.get_mut(i / CHUNK) else {
            return;
        };
        let chunk = Arc::make_mut(chunk);
        let Some(row) = chunk.rows.get_mut(i % CHUNK) else {
            return;
        };
        let before = *row;
        change(row);
        let after = *row;
        chunk.counts.remove(&before);
        chunk.counts.add(&after);
        self.totals.remove(&before);
        self.totals.add(&after);
        if after.failures > 0 {
            self.failing.insert(index);
        } else {
            self.failing.remove(&index);
        }
    }

    /// Files of this status (of this array, if given).
    pub fn count_of(&self, kind: Option<FileKind>, status: FileStatus) -> usize {
        self.totals.get(kind, status) as usize
    }

    /// Files of this array.
    pub fn count(&self, kind: FileKind) -> usize {
        FileStatus::ALL
            .iter()
            .map(|s| self.count_of(Some(kind), *s))
            .sum()
    }

    /// The rows of this status (and array), in index order from `from`, skipping whole
    /// chunks that hold none.
    pub fn with_status(
        &self,
        from: u32,
        kind: Option<FileKind>,
        status: FileStatus,
    ) -> impl Iterator<Item = (u32, FileRow)> + '_ {
        let from = from as usize;
        self.chunks
            .iter()
            .enumerate()
            .skip(from / CHUNK)
            .filter(move |(_, c)| c.counts.get(kind, status) > 0)
            .flat_map(move |(ci, c)| {
                c.rows
                    .iter()
                    .enumerate()
                    .map(move |(o, r)| ((ci * CHUNK + o) as u32, *r))
            })
            .filter(move |(i, r)| {
                *i as usize >= from && r.status == status && kind.is_none_or(|k| k == r.kind)
            })
    }

    /// Files that failed at least once (waiting to retry, or failed for good), by index.
    pub fn failing(&self) -> impl Iterator<Item = (u32, FileRow)> + '_ {
        self.failing
            .iter()
            .filter_map(|i| self.row(*i).map(|r| (*i, r)))
    }

    /// The last error of a file, when the table kept it ([`MAX_ERRORS`]).
    pub fn error(&self, index: u32) -> Option<&str> {
        self.errors.get(&index).map(String::as_str)
    }

    /// Keeps `text` as the file's last error (cut to [`MAX_ERROR_CHARS`]), while it is one of
    /// the [`MAX_ERRORS`] lowest-indexed files with an error.
    pub fn note_error(&mut self, index: u32, text: &str) {
        self.errors
            .insert(index, crate::bulk::truncate(text, MAX_ERROR_CHARS));
        self.prune_errors();
    }

    fn prune_errors(&mut self) {
        // Over the bound, the highest-indexed error goes, sparing files that failed for good
        // (the run's failure names the first of them).
        while self.errors.len() > MAX_ERRORS {
            let failed = |i: &u32| self.row(*i).is_some_and(|r| r.status == FileStatus::Failed);
            let victim = self
                .errors
                .keys()
                .rev()
                .find(|i| !failed(i))
                .or_else(|| self.errors.keys().next_back())
                .copied();
            match victim {
                Some(i) => self.errors.remove(&i),
                None => break,
            };
        }
    }

    pub fn forget_error(&mut self, index: u32) {
        self.errors.remove(&index);
    }

    pub fn forget_errors(&mut self) {
        self.errors.clear();
    }

    pub fn type_name(&self, row: &FileRow) -> &str {
        self.types
            .get(usize::from(row.type_idx))
            .map(String::as_str)
            .unwrap_or("")
    }

    /// `output[2] Patient`: how a file is named in messages (its manifest array and its
    /// position there, after the grouping by type of [`crate::bulk::parse_manifest`]).
    pub fn describe(&self, index: u32) -> String {
        let Some(row) = self.row(index) else {
            return format!("file #{index}");
        };
        // Arrays are contiguous (output, deleted, error): the position is the distance from
        // the array's first row.
        let before: usize = KINDS
            .iter()
            .take_while(|k| **k != row.kind)
            .map(|k| self.count(*k))
            .sum();
        let pos = (index as usize).saturating_sub(before);
        format!("{}[{pos}] {}", row.kind.as_str(), self.type_name(&row))
    }
}

/// How the table is stored: runs instead of rows (see the module docs).
///
/// `{"types": ["Patient", "Bundle"], "layout": "o0*3,d1*1", "status": "s2p2",
///   "retries": {"2": [1, 1750000000000, "502 Bad Gateway"]}, ...}`
#[derive(Clone, Debug, Serialize, Deserialize)]
struct FileTableWire {
    types: Vec<String>,
    /// Runs of rows of one array and type: `{kind}{type index}*{rows}`, comma-separated.
    layout: String,
    /// Runs of rows of one status: `{status}{rows}`.
    status: String,
    /// index → [failures, not_before, last error]. The index is kept as the string it is in
    /// JSON: an integer map key does not survive serde's buffering of the internally tagged
    /// `SyncState`, so it is parsed explicitly.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    retries: BTreeMap<String, (u32, Timestamp, String)>,
    bytes: u64,
    resources_by_type: Vec<u64>,
}

/// Appends runs of equal items as `render(item, count)`.
fn runs<T: PartialEq + Copy>(
    items: impl Iterator<Item = T>,
    mut render: impl FnMut(&mut String, T, usize),
) -> String {
    let mut out = String::new();
    let mut current: Option<(T, usize)> = None;
    for item in items {
        current = match current {
            Some((c, n)) if c == item => Some((c, n + 1)),
            Some((c, n)) => {
                render(&mut out, c, n);
                Some((item, 1))
            }
            None => Some((item, 1)),
        };
    }
    if let Some((c, n)) = current {
        render(&mut out, c, n);
    }
    out
}

impl From<&FileTable> for FileTableWire {
    fn from(t: &FileTable) -> Self {
        use std::fmt::Write;
        let layout = runs(t.iter().map(|r| (r.kind, r.type_idx)), |out, (k, ty), n| {
            if !out.is_empty() {
                out.push(',');
            }
            let _ = write!(out, "{}{ty}*{n}", kind_code(k));
        });
        let status = runs(t.iter().map(|r| r.status), |out, s, n| {
            let _ = write!(out, "{}{n}", s.code());
        });
        let indexes: BTreeSet<u32> = t.failing.iter().chain(t.errors.keys()).copied().collect();
        let retries = indexes
            .into_iter()
            .filter_map(|i| {
                let row = t.row(i)?;
                let error = t.errors.get(&i).cloned().unwrap_or_default();
                Some((i.to_string(), (row.failures, row.not_before, error)))
            })
            .collect();
        FileTableWire {
            types: t.types.clone(),
            layout,
            status,
            retries,
            bytes: t.bytes,
            resources_by_type: t.resources_by_type.clone(),
        }
    }
}

impl Serialize for FileTable {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        FileTableWire::from(self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for FileTable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        FileTable::try_from(FileTableWire::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Rows a stored table may describe: far above any accepted manifest, far below what would
/// exhaust memory when a corrupt run count is expanded.
const MAX_ROWS: usize = 2 * crate::bulk::MAX_MANIFEST_FILES;

fn parse_count(digits: &str, what: &str) -> Result<usize, String> {
    match digits.parse::<usize>() {
        Ok(n) if n > 0 && n <= MAX_ROWS => Ok(n),
        _ => Err(format!("file table: {what}: bad run length {digits:?}")),
    }
}

/// `s3p1` → `[(s, 3), (p, 1)]`.
fn status_runs(text: &str) -> Result<Vec<(FileStatus, usize)>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let status =
            FileStatus::from_code(c).ok_or_else(|| format!("file table: unknown status {c:?}"))?;
        rest = &rest[c.len_utf8()..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        out.push((status, parse_count(&rest[..end], "status")?));
        rest = &rest[end..];
    }
    Ok(out)
}

impl TryFrom<FileTableWire> for FileTable {
    type Error = String;
    fn try_from(w: FileTableWire) -> Result<Self, String> {
        if w.resources_by_type.len() != w.types.len() {
            return Err("file table: resources_by_type does not match types".into());
        }
        let mut rows: Vec<FileRow> = Vec::new();
        for run in w.layout.split(',').filter(|r| !r.is_empty()) {
            let bad = || format!("file table: layout run {run:?} is not {{kind}}{{type}}*{{rows}}");
            let mut chars = run.chars();
            let kind = chars.next().and_then(kind_from_code).ok_or_else(bad)?;
            let (ty, n) = chars.as_str().split_once('*').ok_or_else(bad)?;
            let ty: u16 = ty.parse().map_err(|_| bad())?;
            if usize::from(ty) >= w.types.len() {
                return Err(format!("file table: type index {ty} out of range"));
            }
            let n = parse_count(n, "layout")?;
            if rows.len() + n > MAX_ROWS {
                return Err("file table: too many rows".into());
            }
            rows.extend(std::iter::repeat_n(FileRow::fresh(kind, ty), n));
        }
        let mut at = 0usize;
        for (status, n) in status_runs(&w.status)? {
            let Some(slice) = rows.get_mut(at..at + n) else {
                return Err("file table: status and layout differ in length".into());
            };
            slice.iter_mut().for_each(|r| r.status = status);
            at += n;
        }
        if at != rows.len() {
            return Err("file table: status and layout differ in length".into());
        }
        let mut errors = BTreeMap::new();
        for (key, (failures, not_before, error)) in w.retries {
            let i: u32 = key
                .parse()
                .map_err(|_| format!("file table: retry key {key:?} is not a file index"))?;
            let row = rows
                .get_mut(i as usize)
                .ok_or_else(|| format!("file table: retry for unknown file {i}"))?;
            row.failures = failures;
            row.not_before = not_before;
            if !error.is_empty() {
                errors.insert(i, error);
            }
        }
        let mut table = FileTable::from_rows(w.types, rows, w.resources_by_type);
        table.errors = errors;
        // A table stored by an older version may hold more errors than are kept now.
        table.prune_errors();
        table.bytes = w.bytes;
        Ok(table)
    }
}

/// The schema v2 shape of a table (a column per field, one character or number per row),
/// rewritten into the current one by the v2 → v3 upcaster.
pub(crate) fn upcast_v2_table(v: &serde_json::Value) -> Result<serde_json::Value, String> {
    use serde_json::Value;
    let obj = v.as_object().ok_or("file table: not an object")?;
    let type_of: Vec<u64> = obj
        .get("type_of")
        .and_then(Value::as_array)
        .ok_or("file table: type_of missing")?
        .iter()
        .map(|t| t.as_u64().ok_or("file table: type_of holds a non-integer"))
        .collect::<Result<_, _>>()?;
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    let status = obj
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if kind.chars().count() != type_of.len() || status.chars().count() != type_of.len() {
        return Err("file table columns differ in length".into());
    }
    use std::fmt::Write;
    let layout = runs(
        kind.chars().zip(type_of.iter().copied()),
        |out, (k, t), n| {
            if !out.is_empty() {
                out.push(',');
            }
            let _ = write!(out, "{k}{t}*{n}");
        },
    );
    let status = runs(status.chars(), |out, s, n| {
        let _ = write!(out, "{s}{n}");
    });
    let mut out = obj.clone();
    out.remove("type_of");
    out.remove("kind");
    out.insert("layout".into(), Value::String(layout));
    out.insert("status".into(), Value::String(status));
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn table(n: usize) -> FileTable {
        let files: Vec<(FileKind, String)> = (0..n)
            .map(|i| match i % 10 {
                8 => (FileKind::Deleted, "Bundle".to_string()),
                9 => (FileKind::Error, "OperationOutcome".to_string()),
                _ => (FileKind::Output, "Patient".to_string()),
            })
            .collect();
        FileTable::from_digest(&files)
    }

    proptest! {
        /// Whatever the updates, the counts, the chunk-skipping search and the stored runs
        /// agree with a plain walk over the rows.
        #[test]
        fn counts_search_and_runs_agree_with_the_rows(
            n in 1usize..3_000,
            updates in prop::collection::vec((0usize..3_000, 0usize..4, 0u32..3), 0..200),
            from in 0u32..3_000,
        ) {
            let mut t = table(n);
            for (i, s, failures) in updates {
                t.update((i % n) as u32, |r| {
                    r.status = FileStatus::ALL[s];
                    r.failures = failures;
                });
            }
            let rows: Vec<FileRow> = t.iter().collect();
            prop_assert_eq!(rows.len(), t.len());
            for kind in [None, Some(FileKind::Output), Some(FileKind::Deleted)] {
                for status in FileStatus::ALL {
                    let plain: Vec<u32> = rows
                        .iter()
                        .enumerate()
                        .filter(|(i, r)| {
                            *i as u32 >= from && r.status == status && kind.is_none_or(|k| k == r.kind)
                        })
                        .map(|(i, _)| i as u32)
                        .collect();
                    let found: Vec<u32> = t.with_status(from, kind, status).map(|(i, _)| i).collect();
                    prop_assert_eq!(&found, &plain);
                    let all = rows
                        .iter()
                        .filter(|r| r.status == status && kind.is_none_or(|k| k == r.kind))
                        .count();
                    prop_assert_eq!(t.count_of(kind, status), all);
                }
            }
            let failing: Vec<u32> = t.failing().map(|(i, _)| i).collect();
            let plain: Vec<u32> = (0..n as u32).filter(|i| rows[*i as usize].failures > 0).collect();
            prop_assert_eq!(failing, plain);
            let text = serde_json::to_string(&t).unwrap();
            let back: FileTable = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(back, t);
        }
    }

    #[test]
    fn a_million_rows_debug_as_a_summary() {
        let mut t = table(1_000_000);
        t.update(7, |r| r.status = FileStatus::Staged);
        let text = format!("{t:?}");
        assert!(text.len() < 400, "{text}");
        assert!(text.contains("files: 1000000"), "{text}");
        assert!(text.contains("(Staged, 1)"), "{text}");
    }

    #[test]
    fn a_stored_table_with_more_errors_keeps_those_of_the_failed_and_lowest_files() {
        let mut t = table(100);
        t.update(90, |r| {
            r.status = FileStatus::Failed;
            r.failures = 1;
        });
        let mut wire = FileTableWire::from(&t);
        for i in 0..40u32 {
            wire.retries
                .insert(i.to_string(), (1, Timestamp::ZERO, format!("error {i}")));
        }
        wire.retries
            .insert("90".into(), (1, Timestamp::ZERO, "gone for good".into()));
        let back = FileTable::try_from(wire).unwrap();
        let kept: Vec<u32> = (0..100).filter(|i| back.error(*i).is_some()).collect();
        assert_eq!(kept, [0, 1, 2, 3, 4, 5, 6, 90]);
    }
}
