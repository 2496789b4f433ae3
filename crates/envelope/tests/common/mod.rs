//! Shared helpers for the envelope integration tests.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use kluis_envelope::{
    DataKey, DecryptError, EnvelopeHeader, EnvelopeReader, EnvelopeWriter, WrappedKey, FINAL_FLAG,
    SEGMENT_OVERHEAD, SEGMENT_WORD_LEN,
};
use std::io::{Read, Write};
use std::ops::Range;

pub const S: usize = 1024;
pub const S32: u32 = 1024;

pub fn key() -> DataKey {
    DataKey::from_bytes([0x42; 32])
}

pub fn other_key() -> DataKey {
    DataKey::from_bytes([0x43; 32])
}

pub fn wrapped() -> WrappedKey {
    WrappedKey::new("agency-a/app-x/prod", 7, vec![0xAA; 60]).unwrap()
}

/// Deterministic, non-repeating-looking test data.
pub fn data(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

pub fn seal(plaintext: &[u8], segment_size: u32) -> Vec<u8> {
    seal_with(&key(), plaintext, segment_size)
}

pub fn seal_with(key: &DataKey, plaintext: &[u8], segment_size: u32) -> Vec<u8> {
    let mut writer =
        EnvelopeWriter::with_segment_size(Vec::new(), key, wrapped(), segment_size).unwrap();
    writer.write_all(plaintext).unwrap();
    writer.finish().unwrap()
}

/// Decrypts with `read_to_end`; on failure also returns what was read.
pub fn open(envelope: &[u8]) -> Result<Vec<u8>, (DecryptError, Vec<u8>)> {
    open_with(&key(), envelope)
}

pub fn open_with(key: &DataKey, envelope: &[u8]) -> Result<Vec<u8>, (DecryptError, Vec<u8>)> {
    let mut reader = match EnvelopeReader::new(envelope, key) {
        Ok(r) => r,
        Err(e) => return Err((e, Vec::new())),
    };
    let mut out = Vec::new();
    match reader.read_to_end(&mut out) {
        Ok(_) => {
            assert!(
                reader.is_complete(),
                "a clean end must mean a complete envelope"
            );
            Ok(out)
        }
        Err(e) => {
            let inner = e
                .get_ref()
                .and_then(|r| r.downcast_ref::<DecryptError>())
                .is_some();
            assert!(inner, "read errors wrap a DecryptError: {e:?}");
            let e = *e.into_inner().unwrap().downcast::<DecryptError>().unwrap();
            Err((e, out))
        }
    }
}

/// The header length and the byte ranges of each segment (word included).
pub fn layout(envelope: &[u8]) -> (usize, Vec<Range<usize>>) {
    let (_, header_len) = EnvelopeHeader::from_bytes(envelope).unwrap();
    let mut segments = Vec::new();
    let mut pos = header_len;
    while pos < envelope.len() {
        let word = u32::from_be_bytes(envelope[pos..pos + SEGMENT_WORD_LEN].try_into().unwrap());
        let len = (word & !FINAL_FLAG) as usize;
        let end = pos + len + SEGMENT_OVERHEAD;
        segments.push(pos..end);
        pos = end;
    }
    assert_eq!(pos, envelope.len());
    (header_len, segments)
}

/// Rebuilds an envelope from a header and a list of segment byte strings.
pub fn assemble(header: &[u8], segments: &[&[u8]]) -> Vec<u8> {
    let mut out = header.to_vec();
    for s in segments {
        out.extend_from_slice(s);
    }
    out
}

/// Flips the final flag of the segment at `range`.
pub fn flip_final(envelope: &mut [u8], range: &Range<usize>) {
    envelope[range.start] ^= 0x80;
}
