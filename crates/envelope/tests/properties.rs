//! Property tests: random sizes, segment sizes and chunkings round-trip; any
//! single change or truncation is rejected.
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
    DecryptError, EnvelopeHeader, EnvelopeReader, EnvelopeWriter, MIN_SEGMENT_SIZE,
};
use proptest::prelude::*;
use std::io::{Read, Write};

fn sealed_in_chunks(plaintext: &[u8], segment_size: u32, chunk: usize) -> Vec<u8> {
    let mut writer =
        EnvelopeWriter::with_segment_size(Vec::new(), &key(), wrapped(), segment_size).unwrap();
    for piece in plaintext.chunks(chunk.max(1)) {
        writer.write_all(piece).unwrap();
    }
    writer.finish().unwrap()
}

fn read_in_chunks(envelope: &[u8], chunk: usize) -> Result<Vec<u8>, DecryptError> {
    let mut reader = EnvelopeReader::new(envelope, &key())?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk.max(1)];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return Err(*e.into_inner().unwrap().downcast::<DecryptError>().unwrap()),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip(
        len in 0usize..40_000,
        segment_size in MIN_SEGMENT_SIZE..=8192,
        write_chunk in 1usize..10_000,
        read_chunk in 1usize..10_000,
    ) {
        let plaintext = data(len);
        let envelope = sealed_in_chunks(&plaintext, segment_size, write_chunk);
        let (header, header_len) = EnvelopeHeader::from_bytes(&envelope).unwrap();
        prop_assert_eq!(header.segment_size(), segment_size);
        prop_assert_eq!(
            envelope.len() as u64,
            kluis_envelope::envelope_len(header_len, segment_size, len as u64).unwrap()
        );
        prop_assert_eq!(read_in_chunks(&envelope, read_chunk).unwrap(), plaintext);
    }

    #[test]
    fn any_byte_change_is_rejected(
        len in 0usize..6_000,
        position in any::<prop::sample::Index>(),
        delta in 1u8..=255,
    ) {
        let mut envelope = seal(&data(len), S32);
        let at = position.index(envelope.len());
        envelope[at] = envelope[at].wrapping_add(delta);
        prop_assert!(read_in_chunks(&envelope, 4096).is_err());
    }

    #[test]
    fn any_truncation_or_extension_is_rejected(
        len in 0usize..6_000,
        cut in any::<prop::sample::Index>(),
        extra in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let envelope = seal(&data(len), S32);
        let at = cut.index(envelope.len());
        prop_assert!(read_in_chunks(&envelope[..at], 4096).is_err());
        let mut longer = envelope.clone();
        longer.extend_from_slice(&extra);
        prop_assert!(
            matches!(read_in_chunks(&longer, 4096), Err(DecryptError::TrailingData { .. })),
            "extension"
        );
    }
}
