//! Round trips: sizes around segment boundaries, many segments, a few MB,
//! odd write and read chunkings, the parse-only header, concatenated
//! envelopes, and the sync/async adapters against each other.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

mod common;
use common::*;
use kluis_envelope::{
    decrypt_to_vec, encrypt_to_vec, envelope_len, DataKey, EncryptError, EnvelopeHeader,
    EnvelopeReader, EnvelopeWriter, HeaderError, WrappedKey, DEFAULT_SEGMENT_SIZE, FINAL_FLAG,
    MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE, SEGMENT_OVERHEAD,
};
use std::io::{Read, Write};

fn round_trip(len: usize, segment_size: u32) {
    let plaintext = data(len);
    let envelope = seal(&plaintext, segment_size);
    let (header_len, segments) = layout(&envelope);
    assert_eq!(
        envelope.len() as u64,
        envelope_len(header_len, segment_size, len as u64).unwrap(),
        "length formula, {len} bytes"
    );
    let s = segment_size as usize;
    let expected_segments = if len == 0 { 1 } else { len.div_ceil(s) };
    assert_eq!(segments.len(), expected_segments, "{len} bytes");
    // Exactly the last segment is final.
    for (i, r) in segments.iter().enumerate() {
        let word = u32::from_be_bytes(envelope[r.start..r.start + 4].try_into().unwrap());
        assert_eq!(word & FINAL_FLAG != 0, i + 1 == segments.len());
    }
    assert_eq!(
        open(&envelope).unwrap(),
        plaintext,
        "{len} bytes, read_to_end"
    );

    // Small reads go through the reader's plaintext buffer.
    let mut reader = EnvelopeReader::new(envelope.as_slice(), &key()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 7];
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    assert_eq!(out, plaintext, "{len} bytes, 7-byte reads");
    assert!(reader.is_complete());
}

#[test]
fn boundary_sizes() {
    for len in [
        0,
        1,
        S - 1,
        S,
        S + 1,
        2 * S - 1,
        2 * S,
        2 * S + 1,
        10 * S + 7,
    ] {
        round_trip(len, S32);
    }
}

#[test]
fn boundary_sizes_default_segment() {
    let s = DEFAULT_SEGMENT_SIZE as usize;
    for len in [0, 1, s - 1, s, s + 1] {
        round_trip(len, DEFAULT_SEGMENT_SIZE);
    }
}

#[test]
fn many_segments() {
    round_trip(5000 * S + 3, S32);
}

#[test]
fn a_few_megabytes() {
    round_trip(3 * 1024 * 1024 + 5, DEFAULT_SEGMENT_SIZE);
}

#[test]
fn largest_segment_size() {
    round_trip(MAX_SEGMENT_SIZE as usize + 1, MAX_SEGMENT_SIZE);
}

#[test]
fn segment_size_bounds() {
    for bad in [0, 1, MIN_SEGMENT_SIZE - 1, MAX_SEGMENT_SIZE + 1, u32::MAX] {
        let err =
            EnvelopeWriter::with_segment_size(Vec::new(), &key(), wrapped(), bad).unwrap_err();
        assert!(
            matches!(err, EncryptError::Header(HeaderError::SegmentSize { found }) if found == bad),
            "{bad}: {err:?}"
        );
    }
    round_trip(3000, MIN_SEGMENT_SIZE);
}

#[test]
fn empty_plaintext_is_one_empty_final_segment() {
    let envelope = seal(b"", S32);
    let (header_len, segments) = layout(&envelope);
    assert_eq!(segments.len(), 1);
    assert_eq!(
        envelope[header_len..header_len + 4],
        FINAL_FLAG.to_be_bytes()
    );
    assert_eq!(envelope.len(), header_len + SEGMENT_OVERHEAD);
    assert!(open(&envelope).unwrap().is_empty());
}

#[test]
fn byte_at_a_time_writes_and_reads() {
    let plaintext = data(3 * S + 100);
    let mut writer = EnvelopeWriter::with_segment_size(Vec::new(), &key(), wrapped(), S32).unwrap();
    for b in &plaintext {
        assert_eq!(writer.write(std::slice::from_ref(b)).unwrap(), 1);
    }
    writer.flush().unwrap();
    let envelope = writer.finish().unwrap();
    let mut reader = EnvelopeReader::new(envelope.as_slice(), &key()).unwrap();
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while reader.read(&mut byte).unwrap() == 1 {
        out.push(byte[0]);
    }
    assert_eq!(out, plaintext);
}

#[test]
fn a_source_that_returns_one_byte_at_a_time() {
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() || buf.is_empty() {
                return Ok(0);
            }
            buf[0] = self.0[0];
            self.0 = &self.0[1..];
            Ok(1)
        }
    }
    let plaintext = data(2 * S + 5);
    let envelope = seal(&plaintext, S32);
    let mut reader = EnvelopeReader::new(Trickle(&envelope), &key()).unwrap();
    let mut out = Vec::new();
    reader.read_to_end(&mut out).unwrap();
    assert_eq!(out, plaintext);
}

#[test]
fn same_plaintext_and_key_give_unrelated_envelopes() {
    let a = seal(b"same", S32);
    let b = seal(b"same", S32);
    let (ha, _) = EnvelopeHeader::from_bytes(&a).unwrap();
    let (hb, _) = EnvelopeHeader::from_bytes(&b).unwrap();
    assert_ne!(ha.salt(), hb.salt());
    assert_ne!(a[a.len() - 20..], b[b.len() - 20..]);
}

#[test]
fn header_is_readable_without_the_key() {
    let envelope = seal(&data(5000), S32);
    let mut input = envelope.as_slice();
    let header = EnvelopeHeader::read_from(&mut input).unwrap();
    assert_eq!(header.cmk_id(), "agency-a/app-x/prod");
    assert_eq!(header.cmk_version(), 7);
    assert_eq!(header.wrapped_key().wrapped_bytes(), &[0xAA; 60][..]);
    assert_eq!(header.wrapped_key(), &wrapped());
    assert_eq!(header.segment_size(), S32);
    assert_eq!(header.len(), 117 + "agency-a/app-x/prod".len() + 60);
    assert_eq!(header.as_bytes(), &envelope[..header.len()]);
    // read_from consumed exactly the header.
    assert_eq!(input.len(), envelope.len() - header.len());
    let (parsed, consumed) = EnvelopeHeader::from_bytes(&envelope).unwrap();
    assert_eq!(parsed, header);
    assert_eq!(consumed, header.len());
    // Then the key broker unwraps the key and reading continues.
    let mut reader = EnvelopeReader::with_header(input, header, &key()).unwrap();
    let mut out = Vec::new();
    reader.read_to_end(&mut out).unwrap();
    assert_eq!(out, data(5000));
}

#[test]
fn header_debug_shows_routing_not_bytes() {
    let envelope = seal(b"x", S32);
    let (header, _) = EnvelopeHeader::from_bytes(&envelope).unwrap();
    let shown = format!("{header:?}");
    assert!(shown.contains("agency-a/app-x/prod"), "{shown}");
    assert!(!shown.contains("170"), "no wrapped key bytes: {shown}");
}

#[test]
fn wrapped_key_bounds() {
    assert!(matches!(
        WrappedKey::new("", 1, vec![1]),
        Err(HeaderError::CmkIdLength { found: 0 })
    ));
    assert!(matches!(
        WrappedKey::new("a".repeat(256), 1, vec![1]),
        Err(HeaderError::CmkIdLength { found: 256 })
    ));
    assert!(WrappedKey::new("a".repeat(255), 1, vec![1]).is_ok());
    assert!(matches!(
        WrappedKey::new("a\nb", 1, vec![1]),
        Err(HeaderError::CmkIdControlCharacter {
            code: 10,
            offset: 1
        })
    ));
    assert!(matches!(
        WrappedKey::new("a", 1, Vec::new()),
        Err(HeaderError::WrappedKeyLength { found: 0 })
    ));
    assert!(matches!(
        WrappedKey::new("a", 1, vec![0; 1025]),
        Err(HeaderError::WrappedKeyLength { found: 1025 })
    ));
    // The largest header round-trips.
    let big = WrappedKey::new("é".repeat(127), u32::MAX, vec![9; 1024]).unwrap();
    let key = key();
    let mut writer = EnvelopeWriter::new(Vec::new(), &key, big.clone()).unwrap();
    writer.write_all(b"payload").unwrap();
    let envelope = writer.finish().unwrap();
    let (header, len) = EnvelopeHeader::from_bytes(&envelope).unwrap();
    assert_eq!(header.wrapped_key(), &big);
    assert_eq!(len, 117 + 254 + 1024);
    assert_eq!(open(&envelope).unwrap(), b"payload");
}

#[test]
fn in_memory_helpers() {
    for len in [0, 1, 70_000, 200_000] {
        let plaintext = data(len);
        let envelope = encrypt_to_vec(&key(), wrapped(), &plaintext).unwrap();
        let out = decrypt_to_vec(&key(), &envelope).unwrap();
        assert_eq!(out.as_slice(), plaintext.as_slice());
    }
}

#[test]
fn envelopes_back_to_back_on_one_stream() {
    let first = seal(b"first envelope", S32);
    let second = seal(&data(3 * S), S32);
    let stream = [first.as_slice(), second.as_slice()].concat();

    let mut reader = EnvelopeReader::new(stream.as_slice(), &key())
        .unwrap()
        .stop_at_end();
    let mut out = Vec::new();
    reader.read_to_end(&mut out).unwrap();
    assert_eq!(out, b"first envelope");
    let rest = reader.finish().unwrap();
    assert_eq!(
        rest,
        second.as_slice(),
        "the reader read nothing past its envelope"
    );

    let mut reader = EnvelopeReader::new(rest, &key()).unwrap();
    let mut out = Vec::new();
    reader.read_to_end(&mut out).unwrap();
    assert_eq!(out, data(3 * S));
}

#[test]
fn reader_finish_verifies_the_unread_rest() {
    let envelope = seal(&data(5 * S), S32);
    let mut reader = EnvelopeReader::new(envelope.as_slice(), &key()).unwrap();
    let mut first = [0u8; 10];
    reader.read_exact(&mut first).unwrap();
    assert!(!reader.is_complete());
    reader.finish().unwrap();
}

#[test]
fn generated_key_round_trip() {
    let key = DataKey::generate().unwrap();
    let envelope = seal_with(&key, &data(4000), S32);
    assert_eq!(open_with(&key, &envelope).unwrap(), data(4000));
}

#[test]
fn writer_header_matches_the_written_bytes() {
    let mut writer = EnvelopeWriter::with_segment_size(Vec::new(), &key(), wrapped(), S32).unwrap();
    let header = writer.header().clone();
    writer.write_all(b"abc").unwrap();
    let envelope = writer.finish().unwrap();
    assert_eq!(&envelope[..header.len()], header.as_bytes());
}

#[test]
fn finish_without_data_writes_header_and_empty_final_segment() {
    let writer = EnvelopeWriter::with_segment_size(Vec::new(), &key(), wrapped(), S32).unwrap();
    let header_len = writer.header().len();
    let envelope = writer.finish().unwrap();
    assert_eq!(envelope.len(), header_len + SEGMENT_OVERHEAD);
    assert!(open(&envelope).unwrap().is_empty());
}

#[test]
fn partial_write_then_finish_ends_with_an_empty_final_segment() {
    // `write` may accept only a full segment of a longer buffer; if the caller
    // then finishes without writing the rest, the envelope holds exactly the
    // accepted bytes, closed by an empty final segment.
    let plaintext = data(S + 1);
    let mut writer = EnvelopeWriter::with_segment_size(Vec::new(), &key(), wrapped(), S32).unwrap();
    assert_eq!(writer.write(&plaintext).unwrap(), S);
    let envelope = writer.finish().unwrap();
    let (_, segments) = layout(&envelope);
    assert_eq!(segments.len(), 2);
    assert_eq!(segments[1].len(), SEGMENT_OVERHEAD);
    assert_eq!(open(&envelope).unwrap(), plaintext[..S]);
}
