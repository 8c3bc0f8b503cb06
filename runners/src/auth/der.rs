//! Just enough ASN.1 DER to read the outer structure of private keys and to write the ones a
//! JWK describes.
//!
//! aws-lc-rs parses and checks the keys themselves; this module exists because it cannot tell
//! *why* a key was refused (a 1024-bit modulus, a P-256 curve, an RSA-PSS key all come back as
//! "rejected") and because it takes no JWK. So the reader only walks tags and lengths to find
//! the algorithm, the curve and the modulus size, and the writer only assembles PKCS#1 and
//! SEC1 structures from JWK members. Nothing here validates key mathematics.
//!
//! Only definite, minimal lengths are accepted (DER); anything else is an error, never a panic.

/// Universal tags used by private key structures.
pub(super) const INTEGER: u8 = 0x02;
pub(super) const BIT_STRING: u8 = 0x03;
pub(super) const OCTET_STRING: u8 = 0x04;
pub(super) const OID: u8 = 0x06;
pub(super) const SEQUENCE: u8 = 0x30;

/// Context-specific constructed tags `[0]` and `[1]` (SEC1's parameters and public key).
pub(super) const CONTEXT_0: u8 = 0xa0;
pub(super) const CONTEXT_1: u8 = 0xa1;

/// Object identifier contents (without tag and length).
pub(super) mod oids {
    /// rsaEncryption, 1.2.840.113549.1.1.1.
    pub const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    /// id-RSASSA-PSS, 1.2.840.113549.1.1.10.
    pub const RSASSA_PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
    /// id-ecPublicKey, 1.2.840.10045.2.1.
    pub const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    /// secp384r1 (P-384), 1.3.132.0.34.
    pub const SECP384R1: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
}

/// One element: its tag and its contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tlv<'a> {
    pub tag: u8,
    pub contents: &'a [u8],
}

/// Reads consecutive elements from a byte string.
pub(super) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The next element, whatever its tag.
    pub fn any(&mut self) -> Option<Tlv<'a>> {
        let (&tag, after_tag) = self.rest.split_first()?;
        // Multi-byte tags (low bits all set) never occur in key structures.
        if tag & 0x1f == 0x1f {
            return None;
        }
        let (&first, after_len) = after_tag.split_first()?;
        let (len, body) = if first < 0x80 {
            (usize::from(first), after_len)
        } else {
            let n = usize::from(first & 0x7f);
            // 0x80 is BER's indefinite length; more than four length bytes is no key.
            if n == 0 || n > 4 || after_len.len() < n {
                return None;
            }
            let (len_bytes, body) = after_len.split_at(n);
            if len_bytes[0] == 0 {
                return None;
            }
            let len = len_bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            if len < 0x80 {
                return None;
            }
            (len, body)
        };
        if body.len() < len {
            return None;
        }
        let (contents, rest) = body.split_at(len);
        self.rest = rest;
        Some(Tlv { tag, contents })
    }

    /// The next element if it has `tag`.
    pub fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
        let saved = self.rest;
        match self.any() {
            Some(t) if t.tag == tag => Some(t.contents),
            _ => {
                self.rest = saved;
                None
            }
        }
    }

    /// The next element if it has `tag`, leaving the reader unchanged otherwise (for OPTIONAL
    /// fields).
    pub fn optional(&mut self, tag: u8) -> Option<&'a [u8]> {
        if self.rest.first() == Some(&tag) {
            self.expect(tag)
        } else {
            None
        }
    }
}

/// The contents of a DER text that is exactly one element with `tag`.
pub(super) fn single(bytes: &[u8], tag: u8) -> Option<&[u8]> {
    let mut r = Reader::new(bytes);
    let contents = r.expect(tag)?;
    r.is_empty().then_some(contents)
}

/// The magnitude of a non-negative INTEGER's contents, without leading zero bytes.
pub(super) fn unsigned(contents: &[u8]) -> &[u8] {
    let start = contents
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(contents.len());
    &contents[start..]
}

/// The number of significant bits of a big-endian magnitude.
pub(super) fn bit_length(magnitude: &[u8]) -> usize {
    let m = unsigned(magnitude);
    match m.first() {
        None => 0,
        Some(first) => (m.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
    }
}

/// Dotted form of an OID's contents, for messages (`1.3.132.0.34`).
pub(super) fn oid_text(contents: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    for b in contents {
        value = (value << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        }
        // A malformed OID is still shown as something; it only ever ends up in a message.
        if value > u64::MAX >> 8 {
            return "(malformed)".into();
        }
    }
    if arcs.is_empty() {
        return "(empty)".into();
    }
    arcs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// One element with `tag` around `contents`.
pub(super) fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
    let len = contents.len();
    let mut out = Vec::with_capacity(contents.len() + 6);
    out.push(tag);
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(contents);
    out
}

/// A non-negative INTEGER from a big-endian magnitude (leading zeros dropped, a zero byte
/// prepended when the top bit is set so that it stays positive).
pub(super) fn integer(magnitude: &[u8]) -> Vec<u8> {
    let m = unsigned(magnitude);
    let mut contents = Vec::with_capacity(m.len() + 1);
    if m.first().is_none_or(|b| b & 0x80 != 0) {
        contents.push(0);
    }
    contents.extend_from_slice(m);
    tlv(INTEGER, &contents)
}

/// A SEQUENCE of already-encoded elements.
pub(super) fn sequence(elements: &[&[u8]]) -> Vec<u8> {
    tlv(SEQUENCE, &elements.concat())
}

/// A BIT STRING of whole bytes.
pub(super) fn bit_string(bytes: &[u8]) -> Vec<u8> {
    let mut contents = Vec::with_capacity(bytes.len() + 1);
    contents.push(0);
    contents.extend_from_slice(bytes);
    tlv(BIT_STRING, &contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_trip_in_short_and_long_form() {
        for len in [0usize, 1, 127, 128, 255, 256, 65_535, 70_000] {
            let contents = vec![0x5a; len];
            let encoded = tlv(OCTET_STRING, &contents);
            assert_eq!(single(&encoded, OCTET_STRING), Some(contents.as_slice()));
        }
        assert_eq!(tlv(OCTET_STRING, &[0; 200])[..3], [0x04, 0x81, 200]);
        assert_eq!(tlv(OCTET_STRING, &[0; 300])[..4], [0x04, 0x82, 0x01, 0x2c]);
    }

    #[test]
    fn integers_are_minimal_and_positive() {
        assert_eq!(integer(&[]), [0x02, 0x01, 0x00]);
        assert_eq!(integer(&[0, 0, 1]), [0x02, 0x01, 0x01]);
        assert_eq!(integer(&[0x80]), [0x02, 0x02, 0x00, 0x80]);
        assert_eq!(integer(&[0x01, 0x00, 0x01]), [0x02, 0x03, 0x01, 0x00, 0x01]);
        assert_eq!(bit_length(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(bit_length(&[0x01]), 1);
        assert_eq!(bit_length(&[0x00]), 0);
    }

    #[test]
    fn non_der_and_truncated_input_is_refused() {
        // Indefinite length, a length in long form that fits the short one, a leading zero
        // length byte, a length past the end, a multi-byte tag.
        for bad in [
            &[0x30, 0x80, 0x00, 0x00][..],
            &[0x04, 0x81, 0x05, 1, 2, 3, 4, 5],
            &[0x04, 0x82, 0x00, 0x81],
            &[0x04, 0x05, 1, 2],
            &[0x1f, 0x01, 0x00],
            &[],
        ] {
            assert_eq!(Reader::new(bad).any(), None, "{bad:?}");
        }
        // Trailing bytes after the one element.
        assert_eq!(single(&[0x04, 0x00, 0x00], OCTET_STRING), None);
    }

    #[test]
    fn optional_fields_leave_the_reader_alone() {
        let text = [sequence(&[]), integer(&[7])].concat();
        let mut r = Reader::new(&text);
        assert_eq!(r.optional(CONTEXT_0), None);
        assert_eq!(r.expect(INTEGER), None);
        assert_eq!(r.expect(SEQUENCE), Some(&[][..]));
        assert_eq!(r.expect(INTEGER), Some(&[7][..]));
        assert!(r.is_empty());
    }

    #[test]
    fn oids_print_dotted() {
        assert_eq!(oid_text(oids::SECP384R1), "1.3.132.0.34");
        assert_eq!(oid_text(oids::RSA_ENCRYPTION), "1.2.840.113549.1.1.1");
        assert_eq!(oid_text(oids::EC_PUBLIC_KEY), "1.2.840.10045.2.1");
        assert_eq!(oid_text(&[0x2b, 0x65, 0x70]), "1.3.101.112");
        assert_eq!(oid_text(&[]), "(empty)");
    }
}
