//! Any bytes as an enclave image file: measurements or a typed error, never a
//! panic, a hang or an allocation sized by the input's claims.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kluis_eif::measure(std::io::Cursor::new(data));
});
