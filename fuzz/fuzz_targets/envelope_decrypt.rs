//! Any bytes as an envelope under a fixed key: the reader returns an error or
//! authenticated plaintext, never a panic, a hang or a huge allocation.
//!
//! Seeded (`.ci/fuzz`) with the envelope crate's stored vector
//! (`crates/envelope/tests/vectors/v1-s1024-2600.hex`: key 0x42 x 32, 2600
//! bytes of the pattern below, 1024-byte segments), so mutations reach the
//! segment reader. Nothing but that envelope's segments can authenticate
//! under the key, so every byte the reader releases is that plaintext at
//! that position, even when it fails later (a truncated or altered stream).
#![no_main]

use kluis_envelope::{DataKey, EnvelopeReader};
use std::io::Read;

/// The seed's plaintext (`common::data` in the envelope crate's tests).
fn expected(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 8)) as u8
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let key = DataKey::from_bytes([0x42; 32]);
    let _ = kluis_envelope::EnvelopeHeader::from_bytes(data);
    if let Ok(mut reader) = EnvelopeReader::new(data, &key) {
        let mut sink = [0u8; 4096];
        let mut position = 0usize;
        loop {
            match reader.read(&mut sink) {
                Ok(0) => {
                    assert_eq!(position, 2600, "a complete stream that is not the seed's");
                    break;
                }
                Ok(n) => {
                    for (offset, byte) in sink[..n].iter().enumerate() {
                        assert_eq!(*byte, expected(position + offset), "unauthenticated byte released at {}", position + offset);
                    }
                    position += n;
                }
                Err(_) => break,
            }
        }
    }
});
