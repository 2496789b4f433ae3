//! Any bytes as an envelope under a fixed key: the reader returns an error or
//! authenticated plaintext, never a panic, a hang or a huge allocation.
//!
//! Seeded (`.ci/fuzz`) with the envelope crate's stored vector
//! (`crates/envelope/tests/vectors/v1-s1024-2600.hex`: key 0x42 x 32, 2600
//! bytes of the pattern below, 1024-byte segments), so mutations reach the
//! segment reader. Nothing but that envelope's segments can authenticate
//! under the key, so every byte the reader releases is that plaintext at
//! that position, even when it fails later (a truncated or altered stream).
//! Both ways of reading (into the reader's buffer, and opening segments where
//! the input holds them) release the same bytes and end the same way.
#![no_main]

use kluis_envelope::{DataKey, EnvelopeReader};
use std::io::Read;

/// The seed's plaintext (`common::data` in the envelope crate's tests).
fn expected(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 8)) as u8
}

/// Reads `data` to its end or first error: (plaintext bytes released,
/// whether it ended cleanly).
fn read_all(data: &[u8], in_place: bool) -> Option<(usize, bool)> {
    let key = DataKey::from_bytes([0x42; 32]);
    let reader = EnvelopeReader::new(data, &key).ok()?;
    // `&[u8]` is a `BufRead`: in place, whole segments are opened where they lie.
    let mut reader = if in_place { reader.in_place() } else { reader };
    let mut sink = [0u8; 4096];
    let mut position = 0usize;
    loop {
        match reader.read(&mut sink) {
            Ok(0) => {
                assert_eq!(position, 2600, "a complete stream that is not the seed's");
                return Some((position, true));
            }
            Ok(n) => {
                for (offset, byte) in sink[..n].iter().enumerate() {
                    assert_eq!(*byte, expected(position + offset), "unauthenticated byte released at {}", position + offset);
                }
                position += n;
            }
            Err(_) => return Some((position, false)),
        }
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kluis_envelope::EnvelopeHeader::from_bytes(data);
    // Opening segments in place releases exactly what reading them into the
    // reader's buffer does, and ends the same way.
    assert_eq!(read_all(data, false), read_all(data, true));
});
