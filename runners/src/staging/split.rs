//! One large file moved as byte ranges by many workers at once (the Step Functions fan-out's
//! range items): the ranges are runs of parts of one S3 multipart upload, each written by its
//! own worker, and the upload is completed once every range is in.
//!
//! The first worker to see the file (a whole-file item) learns its length, its validator and
//! that it serves ranges, and instead of moving it starts the upload and writes the plan,
//! `.resume/{name}.split.json` beside the file ([`SplitPlan`]). Every range is then asked for
//! with `Range`/`If-Range` by a worker that stores exactly its bytes as its parts and records
//! what it stored in `.resume/{name}.range.{i}.json` ([`RangeDone`]). Whoever folds the results
//! completes the upload from the ranges' ETags in order.
//!
//! # Lines across range boundaries
//!
//! A range's bytes are stored exactly, but its lines are not cut at the range's edges: a range
//! checks (and counts) the lines that *start* inside it ([`RangeCut`]). It asks for its bytes
//! from the byte before its start, so it knows whether its first byte starts a line; if not,
//! the bytes up to the first newline belong to the line its predecessor checks. At its end it
//! reads on past the range, storing nothing, until the line it started is complete. Every line
//! is so checked by exactly one range, and the lines the ranges count add up to the file's,
//! without any range knowing another's bytes. The cost is one line read twice per boundary.

use serde::{Deserialize, Serialize};
use std::ops::Range;

use super::resume::{self, SourceFacts};

pub(crate) const VERSION: u32 = 1;

/// How a file is split: stored as `.resume/{name}.split.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitPlan {
    pub v: u32,
    /// The file as its first answer described it (the length is always known).
    pub facts: SourceFacts,
    pub length: u64,
    /// The multipart upload every range writes its parts into.
    pub upload_id: String,
    /// Every part but the file's last has this size.
    pub part_size: u64,
    /// Every range but the last has this size, a whole number of parts.
    pub range_bytes: u64,
}

impl SplitPlan {
    pub fn ranges(&self) -> u32 {
        u32::try_from(self.length.div_ceil(self.range_bytes.max(1))).unwrap_or(u32::MAX)
    }

    /// The bytes of range `i`, when it exists.
    pub fn range(&self, i: u32) -> Option<Range<u64>> {
        let start = u64::from(i).checked_mul(self.range_bytes)?;
        (start < self.length).then(|| start..(start + self.range_bytes).min(self.length))
    }

    /// The number of range `i`'s first part.
    pub fn first_part(&self, i: u32) -> i32 {
        let per = self.range_bytes / self.part_size.max(1);
        i32::try_from(u64::from(i) * per + 1).unwrap_or(i32::MAX)
    }

    /// Whether the plan is one this code can carry out (the stored plan may be anything).
    pub(crate) fn is_sound(&self, max_parts: u32) -> bool {
        self.v == VERSION
            && self.part_size > 0
            && self.range_bytes >= self.part_size
            && self.range_bytes.is_multiple_of(self.part_size)
            && self.length >= self.range_bytes
            // One part is kept for the newline a file without a final one gets.
            && self.length.div_ceil(self.part_size) < u64::from(max_parts)
            && self.facts.length == Some(self.length)
    }
}

/// What a range's worker stored: `.resume/{name}.range.{i}.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeDone {
    pub v: u32,
    /// The upload the parts belong to (a result of an older plan is not used).
    pub upload_id: String,
    /// The ETags of the range's parts, in order.
    pub etags: Vec<String>,
    /// Bytes stored (with the newline added to the file's last range when it lacked one).
    pub bytes: u64,
    /// Non-blank lines that start in the range.
    pub lines: u64,
    pub newline_added: bool,
    /// The fan-out folder whose item wrote it: progress of that fan-out.
    pub fan_out: String,
}

/// `.resume/{name}.split.json` for the file `key`.
pub(crate) fn plan_key(key: &str) -> String {
    let (dir, name) = resume::split(key);
    format!("{dir}.resume/{name}.split.json")
}

/// The prefix of every range record of the file `key`.
pub(crate) fn range_prefix(key: &str) -> String {
    let (dir, name) = resume::split(key);
    format!("{dir}.resume/{name}.range.")
}

/// `.resume/{name}.range.{i}.json` for the file `key`.
pub(crate) fn range_key(key: &str, i: u32) -> String {
    let (dir, name) = resume::split(key);
    format!("{dir}.resume/{name}.range.{i}.json")
}

/// Which bytes of a range's download are stored, and which are checked as lines.
#[derive(Debug, Clone)]
pub struct RangeCut {
    start: u64,
    end: u64,
    /// The offset of the next byte to come.
    pos: u64,
    /// Where the first line starting in the range starts, once known.
    check_from: Option<u64>,
    /// The line that crosses the range's end is complete.
    check_done: bool,
}

/// What to do with one chunk of a range's download (offsets into the chunk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub store: Range<usize>,
    pub check: Range<usize>,
    /// Nothing after this chunk is needed.
    pub done: bool,
}

impl RangeCut {
    pub fn new(range: Range<u64>) -> Self {
        let from_start = range.start == 0;
        RangeCut {
            start: range.start,
            end: range.end,
            pos: range.start.saturating_sub(1),
            check_from: from_start.then_some(0),
            check_done: false,
        }
    }

    /// The first byte to ask for: the one before the range, to tell whether the range starts a
    /// line.
    pub fn request_from(&self) -> u64 {
        self.start.saturating_sub(1)
    }

    /// Whether the range has seen all it needs.
    pub fn is_done(&self) -> bool {
        self.pos >= self.end
            && (self.check_done || self.check_from.is_none_or(|from| from >= self.end))
    }

    /// The offset after the last byte fed.
    pub fn reached(&self) -> u64 {
        self.pos
    }

    pub fn feed(&mut self, chunk: &[u8]) -> Cut {
        let p = self.pos;
        let n = chunk.len() as u64;
        let rel = |abs: u64| usize::try_from(abs.saturating_sub(p).min(n)).unwrap_or(chunk.len());
        let store = rel(self.start.max(p))..rel(self.end);
        let store = if store.start < store.end { store } else { 0..0 };
        if self.check_from.is_none() {
            if let Some(at) = memchr::memchr(b'\n', chunk) {
                self.check_from = Some(p + at as u64 + 1);
            }
        }
        let mut check = 0..0;
        if let Some(from) = self
            .check_from
            .filter(|f| *f < self.end && !self.check_done)
        {
            let begin = from.max(p);
            if begin < p + n {
                // The line that crosses the end ends at the first newline from the range's
                // last byte on.
                let search = rel(begin.max(self.end.saturating_sub(1)));
                let stop = match memchr::memchr(b'\n', &chunk[search..]) {
                    Some(at) => {
                        self.check_done = true;
                        search + at + 1
                    }
                    None => chunk.len(),
                };
                check = rel(begin)..stop;
            }
        }
        self.pos = p + n;
        Cut {
            store,
            check,
            done: self.is_done(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn plan(length: u64, part: u64, range: u64) -> SplitPlan {
        SplitPlan {
            v: VERSION,
            facts: SourceFacts {
                length: Some(length),
                ..SourceFacts::default()
            },
            length,
            upload_id: "u".into(),
            part_size: part,
            range_bytes: range,
        }
    }

    #[test]
    fn ranges_are_runs_of_parts() {
        let p = plan(25, 2, 6);
        assert_eq!(p.ranges(), 5);
        assert_eq!(p.range(0), Some(0..6));
        assert_eq!(p.range(4), Some(24..25));
        assert_eq!(p.range(5), None);
        assert_eq!(p.first_part(0), 1);
        assert_eq!(p.first_part(2), 7);
        assert!(p.is_sound(14));
        assert!(
            !p.is_sound(13),
            "13 parts and one for a newline do not fit 13"
        );
        assert!(!plan(25, 4, 6).is_sound(100), "a range is whole parts");
        assert_eq!(
            plan_key("p/r/output/1.ndjson"),
            "p/r/output/.resume/1.ndjson.split.json"
        );
        assert_eq!(range_key("a", 3), ".resume/a.range.3.json");
    }

    /// Feeds the file from each range's first byte in chunks of `chunk`, as its worker would.
    fn cut(file: &[u8], range: u64, chunk: usize) -> (Vec<u8>, Vec<u8>) {
        let (mut stored, mut checked) = (Vec::new(), Vec::new());
        let mut start = 0;
        while start < file.len() as u64 {
            let end = (start + range).min(file.len() as u64);
            let mut c = RangeCut::new(start..end);
            let mut at = c.request_from() as usize;
            while at < file.len() {
                let piece = &file[at..(at + chunk).min(file.len())];
                let cut = c.feed(piece);
                stored.extend_from_slice(&piece[cut.store]);
                checked.extend_from_slice(&piece[cut.check]);
                at += piece.len();
                if cut.done {
                    break;
                }
            }
            assert!(c.is_done() || at == file.len());
            start = end;
        }
        (stored, checked)
    }

    #[test]
    fn a_line_crossing_a_boundary_is_checked_by_the_range_it_starts_in() {
        let file = b"{a}\n{bbbbbb}\n{c}\n";
        // Range 0..6 checks "{a}\n{bbbbbb}\n", range 6..12 nothing, 12..17 "{c}\n".
        let mut r1 = RangeCut::new(6..12);
        assert_eq!(r1.request_from(), 5);
        let cut = r1.feed(&file[5..]);
        assert_eq!(cut.store, 1..7);
        assert_eq!(cut.check, 0..0);
        assert!(cut.done);
        let mut r2 = RangeCut::new(12..17);
        let cut = r2.feed(&file[11..]);
        assert_eq!((cut.store, cut.check.clone()), (1..6, 2..6));
        assert_eq!(&file[11..][cut.check], b"{c}\n");
        let mut r0 = RangeCut::new(0..6);
        let cut = r0.feed(file);
        assert_eq!(&file[cut.check], b"{a}\n{bbbbbb}\n");
        assert!(cut.done);
    }

    proptest! {
        #[test]
        fn every_byte_is_stored_and_checked_once(
            lines in proptest::collection::vec("[ {}ab]{0,12}", 0..40),
            trailing in any::<bool>(),
            range in 1u64..30,
            chunk in 1usize..20,
        ) {
            let mut file = lines.join("\n").into_bytes();
            if trailing && !file.is_empty() {
                file.push(b'\n');
            }
            let (stored, checked) = cut(&file, range, chunk);
            prop_assert_eq!(&stored, &file);
            prop_assert_eq!(&checked, &file);
        }
    }
}
