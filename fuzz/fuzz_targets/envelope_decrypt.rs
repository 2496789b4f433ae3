//! Any bytes as an envelope under a fixed key: the reader returns an error or
//! authenticated plaintext, never a panic, a hang or a huge allocation.
#![no_main]

use kluis_envelope::{DataKey, EnvelopeReader};
use std::io::Read;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let key = DataKey::from_bytes([7u8; 32]);
    let _ = kluis_envelope::EnvelopeHeader::from_bytes(data);
    if let Ok(mut reader) = EnvelopeReader::new(data, &key) {
        let mut sink = [0u8; 4096];
        while let Ok(n) = reader.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
    }
});
