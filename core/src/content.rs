//! The streaming check of a downloaded file's content: NDJSON of FHIR resources of one type.
//!
//! A Bulk Data server (or a proxy, or a misconfigured bucket) can answer a file URL with
//! `200 OK` and an HTML login page, a CSV or a file of another resource type. Staged as is,
//! such a body would be counted as resources and only fail (or worse, not fail) inside
//! Pathling. [`NdjsonCheck`] judges the bytes incrementally, chunk by chunk, as the executor
//! streams them to the staging store, so a bad file is refused before the store commits it.
//!
//! The rules depend on the [`Validation`] mode (configuration key `VALIDATE`):
//!
//! - [`Validation::Sample`] (the default): every non-blank line must look like a JSON object:
//!   its first non-whitespace byte is `{` and its last (a trailing `\r` is whitespace) is `}`.
//!   The first non-blank line is parsed in full: it must be JSON, and its `resourceType` must
//!   be the manifest's type for the file.
//! - [`Validation::Full`]: as `Sample`, and every non-blank line is parsed and type-checked.
//! - [`Validation::Off`]: nothing is checked.
//!
//! A line is parsed only up to [`MAX_PARSED_LINE`] bytes: a longer one keeps the object check
//! but is not parsed (its type is not checked). An empty or blank body passes.
//!
//! # Cost
//!
//! The object check looks at each line's boundaries only: one `memchr` for the newline, the
//! first non-whitespace byte after it and the last before it. Nothing is copied except the
//! last few hundred bytes of a line that spans two chunks (kept to quote it in an error) and
//! the lines that are parsed (the first one in `Sample` mode; in `Full` mode only those that
//! span chunks, the others are parsed in place).
//!
//! # Errors
//!
//! A [`ContentError`] names the line (1-based, blank lines counted) and what was wrong,
//! quoting at most 80 characters of the offending text with control characters removed.
//! After an error the check stays failed: every later call returns the same error.

pub use crate::spec::Validation;
use serde::Deserialize;

/// The longest line that is parsed (and buffered across chunks to be parsed): 64 MiB.
pub const MAX_PARSED_LINE: usize = 64 * 1024 * 1024;

/// Characters of offending text an error quotes at most.
const QUOTE_CHARS: usize = 80;
/// Bytes kept to quote from: UTF-8 needs at most 4 per character, and control characters
/// are dropped from the quote.
const QUOTE_BYTES: usize = 4 * QUOTE_CHARS + 64;
/// A parse buffer larger than this is freed after its line rather than kept for the next.
const KEEP_BUFFER: usize = 1024 * 1024;

/// Why a file is not NDJSON of the expected resource type.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContentError {
    /// The line's first non-whitespace byte is not `{` (HTML, CSV, a JSON array...).
    #[error("line {line} is not a JSON object: \"{text}\"")]
    NotAnObject { line: u64, text: String },
    /// The line starts with `{` but its last non-whitespace byte is not `}` (a truncated or
    /// concatenated line); `text` quotes the line's end.
    #[error("line {line} is not a JSON object (it does not end with '}}'): \"{text}\"")]
    Unclosed { line: u64, text: String },
    /// The line was parsed and is not JSON.
    #[error("line {line} is not valid JSON: {detail}")]
    NotJson { line: u64, detail: String },
    /// The line is a JSON object of another (or no) resource type.
    #[error("line {line} has {found}, but the manifest lists this file as {expected}")]
    WrongType {
        line: u64,
        /// `resourceType "Observation"`, `no resourceType`, or why it is unusable.
        found: String,
        expected: String,
    },
}

impl ContentError {
    /// The 1-based number of the offending line.
    pub fn line(&self) -> u64 {
        match self {
            ContentError::NotAnObject { line, .. }
            | ContentError::Unclosed { line, .. }
            | ContentError::NotJson { line, .. }
            | ContentError::WrongType { line, .. } => *line,
        }
    }
}

/// Only what the check needs of a parsed line; every other field is skipped (but still
/// parsed, so that the line's JSON syntax is checked in full).
#[derive(Deserialize)]
struct Head {
    #[serde(rename = "resourceType")]
    resource_type: Option<String>,
}

/// The incremental check of one file: [`push`](Self::push) each chunk as it arrives, then
/// [`finish`](Self::finish) at the end of the body.
#[derive(Debug)]
pub struct NdjsonCheck {
    expected: String,
    mode: Validation,
    /// 1-based number of the current (unfinished) line.
    line: u64,
    /// The current line has its first non-whitespace byte, and it was `{`.
    started: bool,
    /// The last non-whitespace byte of the current line so far.
    last: u8,
    /// The current line is to be parsed.
    parse: bool,
    /// The current line continues a previous chunk.
    spanned: bool,
    /// The bytes of a parsed line that spans chunks, from its `{`.
    buf: Vec<u8>,
    /// The current line outgrew [`MAX_PARSED_LINE`]: it is not parsed.
    too_long: bool,
    /// The last bytes of the current line before the current chunk, to quote its end.
    tail: Vec<u8>,
    /// The text (so far) of a line whose first byte is not `{`, collected to quote it.
    bad_start: Option<Vec<u8>>,
    /// `Sample`: the first non-blank line has been checked.
    head_done: bool,
    failed: Option<ContentError>,
}

impl NdjsonCheck {
    /// A check of a file the manifest lists with type `expected_type` (the resource type of an
    /// `output[]` file, `Bundle` for `deleted[]`, `OperationOutcome` for `error[]`).
    pub fn new(expected_type: &str, mode: Validation) -> Self {
        NdjsonCheck {
            expected: expected_type.to_string(),
            mode,
            line: 1,
            started: false,
            last: 0,
            parse: false,
            spanned: false,
            buf: Vec::new(),
            too_long: false,
            tail: Vec::new(),
            bad_start: None,
            head_done: false,
            failed: None,
        }
    }

    /// The check of a file's rest, continuing at the start of a line after `newlines` lines of
    /// which `resources` were non-blank (and passed this check before): an interrupted
    /// transfer resumes at a line boundary, where the check holds nothing else.
    pub fn resume_at(expected_type: &str, mode: Validation, newlines: u64, resources: u64) -> Self {
        let mut check = NdjsonCheck::new(expected_type, mode);
        check.line = newlines.saturating_add(1);
        check.head_done = resources > 0;
        check
    }

    /// Checks the next chunk of the body (of any size, cut anywhere).
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), ContentError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.mode == Validation::Off {
            return Ok(());
        }
        let mut rest = chunk;
        loop {
            let newline = memchr::memchr(b'\n', rest);
            let segment = &rest[..newline.unwrap_or(rest.len())];
            if let Err(e) = self.segment(segment, newline.is_some()) {
                self.failed = Some(e.clone());
                return Err(e);
            }
            match newline {
                Some(at) => rest = &rest[at + 1..],
                None => return Ok(()),
            }
        }
    }

    /// The body has ended: checks its last line when it had no newline.
    pub fn finish(&mut self) -> Result<(), ContentError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.mode == Validation::Off || (!self.started && self.bad_start.is_none()) {
            return Ok(());
        }
        self.segment(&[], true)
            .inspect_err(|e| self.failed = Some(e.clone()))
    }

    /// One piece of the current line: all of it up to its newline (`ends`) or up to the end
    /// of the chunk.
    fn segment(&mut self, segment: &[u8], ends: bool) -> Result<(), ContentError> {
        if let Some(text) = &mut self.bad_start {
            let room = QUOTE_BYTES.saturating_sub(text.len());
            text.extend_from_slice(&segment[..segment.len().min(room)]);
            if ends || text.len() >= QUOTE_BYTES {
                let more = !ends || segment.len() > room;
                return Err(ContentError::NotAnObject {
                    line: self.line,
                    text: quote_start(text, more),
                });
            }
            return Ok(());
        }
        let mut body = segment;
        if !self.started {
            let Some(first) = segment.iter().position(|b| !b.is_ascii_whitespace()) else {
                // Blank so far.
                if ends {
                    self.next_line();
                }
                return Ok(());
            };
            body = &segment[first..];
            if body[0] != b'{' {
                self.bad_start = Some(Vec::new());
                return self.segment(body, ends);
            }
            self.started = true;
            self.parse = self.mode == Validation::Full || !self.head_done;
        }
        if let Some(last) = body.iter().rposition(|b| !b.is_ascii_whitespace()) {
            self.last = body[last];
        }
        if !ends {
            self.carry(body);
            return Ok(());
        }
        if self.last != b'}' {
            let mut text = std::mem::take(&mut self.tail);
            text.extend_from_slice(&body[body.len().saturating_sub(QUOTE_BYTES)..]);
            return Err(ContentError::Unclosed {
                line: self.line,
                text: quote_end(&text),
            });
        }
        if self.parse {
            if !self.spanned {
                self.check_parsed(body)?;
            } else if !self.too_long && self.buf.len() + body.len() <= MAX_PARSED_LINE {
                self.buf.extend_from_slice(body);
                let buf = std::mem::take(&mut self.buf);
                let checked = self.check_parsed(&buf);
                self.buf = buf;
                checked?;
            }
            self.head_done = true;
        }
        self.next_line();
        Ok(())
    }

    /// Keeps what the rest of an unfinished line needs: its bytes when it is parsed, and its
    /// last bytes to quote.
    fn carry(&mut self, body: &[u8]) {
        self.spanned = true;
        if self.parse && !self.too_long {
            if self.buf.len() + body.len() > MAX_PARSED_LINE {
                self.too_long = true;
                self.buf = Vec::new();
            } else {
                self.buf.extend_from_slice(body);
            }
        }
        if body.len() >= QUOTE_BYTES {
            self.tail.clear();
            self.tail
                .extend_from_slice(&body[body.len() - QUOTE_BYTES..]);
        } else {
            self.tail.extend_from_slice(body);
            let excess = self.tail.len().saturating_sub(QUOTE_BYTES);
            self.tail.drain(..excess);
        }
    }

    fn next_line(&mut self) {
        self.line += 1;
        self.started = false;
        self.last = 0;
        self.parse = false;
        self.spanned = false;
        self.too_long = false;
        self.tail.clear();
        if self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
    }

    fn check_parsed(&self, line: &[u8]) -> Result<(), ContentError> {
        let found = match serde_json::from_slice::<Head>(line) {
            Ok(Head {
                resource_type: Some(t),
            }) if t == self.expected => return Ok(()),
            Ok(Head {
                resource_type: Some(t),
            }) => format!("resourceType \"{}\"", clean(&t, QUOTE_CHARS)),
            Ok(Head {
                resource_type: None,
            }) => "no resourceType".to_string(),
            // Only `resourceType` is read: a data error is about it (not a string, twice).
            Err(e) if e.classify() == serde_json::error::Category::Data => {
                format!("an unusable resourceType ({})", without_position(&e))
            }
            Err(e) => {
                return Err(ContentError::NotJson {
                    line: self.line,
                    detail: format!(
                        "{} at column {}: \"{}\"",
                        without_position(&e),
                        e.column(),
                        quote_around(line, e.column())
                    ),
                })
            }
        };
        Err(ContentError::WrongType {
            line: self.line,
            found,
            expected: self.expected.clone(),
        })
    }
}

/// serde_json's message without its ` at line 1 column N` (the line is always 1 here).
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rsplit_once(" at line ") {
        Some((message, _)) => message.to_string(),
        None => text,
    }
}

/// Up to `max` characters of `s` without control characters, `…` marking a cut.
fn clean(s: &str, max: usize) -> String {
    let mut out = String::new();
    let mut chars = s.chars().filter(|c| !c.is_control());
    for c in chars.by_ref().take(max) {
        out.push(c);
    }
    if chars.next().is_some() {
        out.push('…');
    }
    out
}

/// The beginning of a line; `more`: the line went on beyond `bytes`.
fn quote_start(bytes: &[u8], more: bool) -> String {
    let mut text = clean(&String::from_utf8_lossy(bytes), QUOTE_CHARS);
    if more && !text.ends_with('…') {
        text.push('…');
    }
    text
}

/// The end of a line (its last characters, `…` first when cut).
fn quote_end(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let chars: Vec<char> = text.chars().filter(|c| !c.is_control()).collect();
    let from = chars.len().saturating_sub(QUOTE_CHARS);
    let mut out: String = if from > 0 {
        "…".into()
    } else {
        String::new()
    };
    out.extend(&chars[from..]);
    out
}

/// The text around a 1-based byte column of a line.
fn quote_around(line: &[u8], column: usize) -> String {
    let at = column.saturating_sub(1).min(line.len());
    let from = at.saturating_sub(QUOTE_CHARS / 2);
    let to = (from + QUOTE_BYTES).min(line.len());
    let mut text = if from > 0 {
        "…".to_string()
    } else {
        String::new()
    };
    text.push_str(&quote_start(&line[from..to], to < line.len()));
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(body: &[u8], chunk: usize, mode: Validation) -> Result<(), ContentError> {
        let mut c = NdjsonCheck::new("Patient", mode);
        for piece in body.chunks(chunk.max(1)) {
            c.push(piece)?;
        }
        c.finish()
    }

    fn sample(body: &[u8]) -> Result<(), ContentError> {
        run(body, 16 * 1024, Validation::Sample)
    }

    fn patient(id: &str) -> String {
        format!(r#"{{"resourceType":"Patient","id":"{id}","active":true}}"#)
    }

    #[test]
    fn valid_ndjson_passes_in_every_mode() {
        let body = format!("{}\n{}\n", patient("a"), patient("b"));
        for mode in [Validation::Sample, Validation::Full, Validation::Off] {
            for chunk in [1, 2, 7, 1 << 20] {
                assert_eq!(
                    run(body.as_bytes(), chunk, mode),
                    Ok(()),
                    "{mode:?} {chunk}"
                );
            }
        }
    }

    #[test]
    fn html_is_not_a_json_object() {
        let body = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Please sign in to continue to the portal of the hospital</body></html>\n";
        let err = sample(body).unwrap_err();
        assert_eq!(err.line(), 1);
        let text = err.to_string();
        assert!(
            text.starts_with(r#"line 1 is not a JSON object: "<!DOCTYPE html><html><head>"#),
            "{text}"
        );
        assert!(text.ends_with("…\""), "cut to 80 characters: {text}");
        let quoted = text.split_once(": \"").unwrap().1;
        assert_eq!(quoted.chars().count(), QUOTE_CHARS + 2, "{quoted}");
    }

    #[test]
    fn csv_is_not_a_json_object() {
        let err = sample(b"id,name\r\n1,Alice\r\n").unwrap_err();
        assert_eq!(
            err,
            ContentError::NotAnObject {
                line: 1,
                text: "id,name".into()
            }
        );
        assert_eq!(err.to_string(), r#"line 1 is not a JSON object: "id,name""#);
    }

    #[test]
    fn a_json_array_line_is_not_an_object() {
        let body = format!("{}\n[{}]\n", patient("a"), patient("b"));
        let err = sample(body.as_bytes()).unwrap_err();
        assert!(
            matches!(err, ContentError::NotAnObject { line: 2, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains(r#""[{"resourceType":"Patient""#),
            "{err}"
        );
    }

    #[test]
    fn empty_and_blank_bodies_pass() {
        for body in [&b""[..], b"\n", b"\n\n  \n\t\r\n", b"   "] {
            for mode in [Validation::Sample, Validation::Full] {
                for chunk in [1, 3, 100] {
                    assert_eq!(run(body, chunk, mode), Ok(()), "{body:?}");
                }
            }
        }
    }

    #[test]
    fn crlf_line_endings_and_blank_lines_are_fine() {
        let body = format!("\r\n  {} \r\n\r\n{}\r\n", patient("a"), patient("b"));
        for mode in [Validation::Sample, Validation::Full] {
            for chunk in [1, 5, 1000] {
                assert_eq!(run(body.as_bytes(), chunk, mode), Ok(()));
            }
        }
    }

    #[test]
    fn a_line_split_into_one_byte_chunks_is_checked_like_a_whole_one() {
        let good = format!("{}\n{}", patient("a"), patient("b"));
        assert_eq!(run(good.as_bytes(), 1, Validation::Sample), Ok(()));
        let cut = format!(
            "{}\n{}\n",
            patient("a"),
            r#"{"resourceType":"Patient","id":"b""#
        );
        let whole = run(cut.as_bytes(), 1 << 20, Validation::Sample).unwrap_err();
        let bytewise = run(cut.as_bytes(), 1, Validation::Sample).unwrap_err();
        assert_eq!(whole, bytewise);
        assert_eq!(
            bytewise.to_string(),
            r#"line 2 is not a JSON object (it does not end with '}'): "{"resourceType":"Patient","id":"b"""#
        );
        let html = run(b"\n<html>\n", 1, Validation::Sample).unwrap_err();
        assert_eq!(html.to_string(), r#"line 2 is not a JSON object: "<html>""#);
    }

    #[test]
    fn a_first_line_split_across_chunks_is_parsed_whole() {
        let body = format!("{}\n", r#"{"resourceType":"Observation","id":"1"}"#);
        for at in 1..body.len() {
            let mut c = NdjsonCheck::new("Observation", Validation::Sample);
            c.push(&body.as_bytes()[..at]).unwrap();
            c.push(&body.as_bytes()[at..]).unwrap();
            c.finish().unwrap();
            let mut c = NdjsonCheck::new("Patient", Validation::Sample);
            let first = c.push(&body.as_bytes()[..at]);
            let err = first
                .and_then(|()| c.push(&body.as_bytes()[at..]))
                .unwrap_err();
            assert!(
                matches!(err, ContentError::WrongType { line: 1, .. }),
                "{at}: {err}"
            );
        }
    }

    #[test]
    fn the_wrong_resource_type_is_named() {
        let body = br#"{"resourceType":"Observation","id":"1"}"#;
        assert_eq!(
            sample(body).unwrap_err().to_string(),
            r#"line 1 has resourceType "Observation", but the manifest lists this file as Patient"#
        );
        assert_eq!(
            sample(b"\n{\"id\":\"1\"}\n").unwrap_err().to_string(),
            "line 2 has no resourceType, but the manifest lists this file as Patient"
        );
        let err = sample(br#"{"resourceType":5}"#).unwrap_err();
        assert!(
            matches!(err, ContentError::WrongType { line: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("unusable resourceType"), "{err}");
        // A hostile type name is cut and cleaned.
        let long = format!(r#"{{"resourceType":"A\u0007{}"}}"#, "B".repeat(500));
        let text = sample(long.as_bytes()).unwrap_err().to_string();
        assert!(text.len() < 200 && !text.contains('\u{7}'), "{text}");
        // Sample mode parses only the first line; full mode every line.
        let body = format!(
            "{}\n{}\n",
            patient("a"),
            r#"{"resourceType":"Observation"}"#
        );
        assert_eq!(sample(body.as_bytes()), Ok(()));
        let err = run(body.as_bytes(), 10, Validation::Full).unwrap_err();
        assert!(
            matches!(err, ContentError::WrongType { line: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_huge_first_line_keeps_the_object_check_but_is_not_parsed() {
        let mut line = br#"{"resourceType":"Observation","x":""#.to_vec();
        line.resize(MAX_PARSED_LINE + 10, b'a');
        line.extend_from_slice(b"\"}\n");
        let mut c = NdjsonCheck::new("Patient", Validation::Sample);
        for piece in line.chunks(1 << 20) {
            c.push(piece).unwrap();
        }
        assert!(c.buf.capacity() <= KEEP_BUFFER, "the buffer was freed");
        // The second line is not parsed either in sample mode (the first one was the sample).
        c.push(br#"{"resourceType":"Observation"}"#).unwrap();
        c.push(b"\n").unwrap();
        c.finish().unwrap();
        // The object check still applies to it.
        let mut c = NdjsonCheck::new("Patient", Validation::Sample);
        for piece in line[..line.len() - 3].chunks(1 << 20) {
            c.push(piece).unwrap();
        }
        let err = c.push(b"\n").unwrap_err();
        assert!(
            matches!(err, ContentError::Unclosed { line: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn full_mode_catches_a_broken_seventh_line_that_sample_mode_lets_through() {
        let mut lines: Vec<String> = (0..10).map(|i| patient(&i.to_string())).collect();
        lines[6] = r#"{"resourceType":"Patient","id":"6",,"active":true}"#.into();
        let body = lines.join("\n");
        assert_eq!(run(body.as_bytes(), 7, Validation::Sample), Ok(()));
        for chunk in [1, 7, 1 << 20] {
            let err = run(body.as_bytes(), chunk, Validation::Full).unwrap_err();
            assert!(
                matches!(err, ContentError::NotJson { line: 7, .. }),
                "{err}"
            );
            let text = err.to_string();
            assert!(text.starts_with("line 7 is not valid JSON: "), "{text}");
            assert!(text.contains("column 36"), "{text}");
            assert!(text.contains(r#""id":"6",,"#), "{text}");
        }
    }

    #[test]
    fn a_resumed_check_numbers_lines_on_and_samples_only_a_fresh_file() {
        let mut c = NdjsonCheck::resume_at("Patient", Validation::Sample, 41, 40);
        // The sample was the file's first line: a later one of another type passes.
        c.push(b"{\"resourceType\":\"Observation\"}\n").unwrap();
        let err = c.push(b"<html>\n").unwrap_err();
        assert_eq!(err.line(), 43);
        let mut c = NdjsonCheck::resume_at("Patient", Validation::Sample, 3, 0);
        let err = c.push(b"{\"resourceType\":\"Observation\"}\n").unwrap_err();
        assert!(
            matches!(err, ContentError::WrongType { line: 4, .. }),
            "{err}"
        );
    }

    #[test]
    fn the_check_stays_failed_and_off_checks_nothing() {
        let mut c = NdjsonCheck::new("Patient", Validation::Sample);
        let err = c.push(b"<html>\n").unwrap_err();
        assert_eq!(c.push(&patient("a").into_bytes()), Err(err.clone()));
        assert_eq!(c.finish(), Err(err));
        assert_eq!(run(b"<html>\n", 3, Validation::Off), Ok(()));
        assert_eq!(run(b"{\"resourceType\":\"X\"", 3, Validation::Off), Ok(()));
    }

    #[test]
    fn an_unterminated_last_line_is_checked_at_finish() {
        let mut c = NdjsonCheck::new("Patient", Validation::Sample);
        c.push(patient("a").as_bytes()).unwrap();
        c.push(b"\n<htm").unwrap();
        assert_eq!(
            c.finish().unwrap_err().to_string(),
            r#"line 2 is not a JSON object: "<htm""#
        );
        let mut c = NdjsonCheck::new("Patient", Validation::Sample);
        c.push(br#"{"resourceType":"Patient""#).unwrap();
        assert!(matches!(
            c.finish(),
            Err(ContentError::Unclosed { line: 1, .. })
        ));
    }

    /// A JSON object of type `Patient` with some other fields, serialized on one line.
    fn resource() -> impl Strategy<Value = String> {
        (
            "[a-z0-9.-]{1,20}",
            prop::collection::vec(("[a-z]{1,8}", "[ -~\u{e9}\u{1F600}\n\t]{0,30}"), 0..4),
        )
            .prop_map(|(id, fields)| {
                let mut o = serde_json::Map::new();
                o.insert("resourceType".into(), "Patient".into());
                o.insert("id".into(), id.into());
                for (k, v) in fields {
                    o.insert(format!("x{k}"), v.into());
                }
                serde_json::Value::Object(o).to_string()
            })
    }

    /// A line as a source may write it: the object, maybe padded, maybe with a `\r`; or a
    /// blank line.
    fn line() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => resource(),
            1 => (resource(), " {0,2}", " {0,2}", any::<bool>())
                .prop_map(|(r, a, b, cr)| format!("{a}{r}{b}{}", if cr { "\r" } else { "" })),
            1 => "[ \t\r]{0,3}",
        ]
    }

    fn cut(body: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        cuts.sort_unstable();
        let mut out = Vec::new();
        let mut from = 0;
        for at in cuts.into_iter().chain([body.len()]) {
            out.push(body[from..at].to_vec());
            from = at;
        }
        out
    }

    fn check(chunks: &[Vec<u8>], mode: Validation) -> Result<(), ContentError> {
        let mut c = NdjsonCheck::new("Patient", mode);
        for chunk in chunks {
            c.push(chunk)?;
        }
        c.finish()
    }

    proptest! {
        /// Valid NDJSON of the right type passes however it is cut into chunks.
        #[test]
        fn valid_ndjson_passes_in_any_chunks(
            lines in prop::collection::vec(line(), 0..12),
            final_newline in any::<bool>(),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut body = lines.join("\n");
            if final_newline {
                body.push('\n');
            }
            let chunks = cut(body.as_bytes(), &cuts);
            prop_assert_eq!(check(&chunks, Validation::Sample), Ok(()));
            prop_assert_eq!(check(&chunks, Validation::Full), Ok(()));
        }

        /// A line that does not start with `{` fails the check, naming that line.
        #[test]
        fn a_line_not_starting_with_a_brace_is_named(
            lines in prop::collection::vec(line(), 1..12),
            bad_at in any::<prop::sample::Index>(),
            bad in "[ \t]{0,2}[^{ \t\r\n\u{b}\u{c}][^\n]{0,200}",
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut lines = lines;
            let at = bad_at.index(lines.len());
            lines[at] = bad;
            let body = lines.join("\n");
            let chunks = cut(body.as_bytes(), &cuts);
            for mode in [Validation::Sample, Validation::Full] {
                let err = check(&chunks, mode);
                prop_assert!(
                    matches!(err, Err(ContentError::NotAnObject { line, .. }) if line == at as u64 + 1),
                    "{:?}: {:?}", mode, err
                );
            }
        }
    }
}
