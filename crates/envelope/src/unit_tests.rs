//! Tests that need the crate's internals: the segment limit (2^32 segments
//! cannot be written in a test, so the limit is lowered) and buffer sizes.
#![allow(clippy::arithmetic_side_effects)]

use crate::{
    DataKey, DecryptError, EncryptError, EnvelopeReader, EnvelopeWriter, WrappedKey,
    SEGMENT_OVERHEAD,
};
use std::io::{Read, Write};

const S: usize = 1024;
const S32: u32 = 1024;

fn key() -> DataKey {
    DataKey::from_bytes([0x42; 32])
}

fn wrapped() -> WrappedKey {
    WrappedKey::new("tenant/app/test", 1, vec![0xAA; 40]).unwrap()
}

fn writer_with_limit(limit: u64) -> EnvelopeWriter<Vec<u8>> {
    let mut writer = EnvelopeWriter::with_segment_size(Vec::new(), &key(), wrapped(), S32).unwrap();
    writer.core_mut().set_max_segments(limit);
    writer
}

#[test]
fn writer_fills_exactly_the_segment_limit() {
    let mut writer = writer_with_limit(3);
    writer.write_all(&vec![7; 3 * S]).unwrap();
    let envelope = writer.finish().unwrap();
    let mut reader = EnvelopeReader::new(envelope.as_slice(), &key()).unwrap();
    reader.core_mut().set_max_segments(3);
    let mut out = Vec::new();
    reader.read_to_end(&mut out).unwrap();
    assert_eq!(out, vec![7; 3 * S]);
}

#[test]
fn writer_refuses_to_exceed_the_segment_limit() {
    let mut writer = writer_with_limit(3);
    let err = writer.write_all(&vec![7; 3 * S + 1]).unwrap_err();
    assert!(
        matches!(
            EncryptError::from_io(&err),
            Some(EncryptError::TooManySegments { max_segments: 3 })
        ),
        "{err:?}"
    );
    // The writer stays failed: it can never produce a complete envelope.
    assert!(writer.write(b"x").is_err());
    assert!(matches!(writer.finish(), Err(EncryptError::Failed)));
}

#[test]
fn reader_refuses_a_stream_longer_than_the_limit() {
    let mut writer = EnvelopeWriter::with_segment_size(Vec::new(), &key(), wrapped(), S32).unwrap();
    writer.write_all(&vec![1; 4 * S]).unwrap();
    let envelope = writer.finish().unwrap();
    let mut reader = EnvelopeReader::new(envelope.as_slice(), &key()).unwrap();
    reader.core_mut().set_max_segments(3);
    let mut out = Vec::new();
    let err = reader.read_to_end(&mut out).unwrap_err();
    assert!(
        matches!(
            DecryptError::from_io(&err),
            Some(DecryptError::TooManySegments { max_segments: 3 })
        ),
        "{err:?}"
    );
    assert_eq!(
        out.len(),
        2 * S,
        "segments 0 and 1 authenticated before the limit"
    );
}

#[test]
fn the_production_limit_is_the_counter_range() {
    assert_eq!(crate::MAX_SEGMENTS, u64::from(u32::MAX) + 1);
}

#[test]
fn buffers_stay_one_segment_whatever_the_length() {
    let data = vec![3u8; 40 * S + 17];
    let mut writer = EnvelopeWriter::with_segment_size(Vec::new(), &key(), wrapped(), S32).unwrap();
    for chunk in data.chunks(333) {
        writer.write_all(chunk).unwrap();
        assert_eq!(writer.core_mut().buffer_capacity(), S + SEGMENT_OVERHEAD);
    }
    let envelope = writer.finish().unwrap();

    // Large reads: plaintext goes straight to the caller; one ciphertext buffer.
    let mut reader = EnvelopeReader::new(envelope.as_slice(), &key()).unwrap();
    let mut buf = vec![0; 4 * S];
    let mut total = 0;
    loop {
        let n = reader.read(&mut buf).unwrap();
        assert_eq!(reader.core_mut().buffer_capacity(), S + SEGMENT_OVERHEAD);
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, data.len());

    // Small reads: plus one plaintext segment buffer, never more.
    let mut reader = EnvelopeReader::new(envelope.as_slice(), &key()).unwrap();
    let mut buf = [0; 100];
    let mut total = 0;
    loop {
        let n = reader.read(&mut buf).unwrap();
        assert!(reader.core_mut().buffer_capacity() <= 2 * S + SEGMENT_OVERHEAD);
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, data.len());
}
