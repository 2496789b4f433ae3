//! Decoding any bytes as a Nitro document returns a value or an error, never a
//! panic, a hang or an unbounded allocation.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kluis_attestation::parse_unverified(data);
});
