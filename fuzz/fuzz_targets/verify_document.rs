//! Full verification of any bytes against the AWS root never panics, and
//! accepts nothing but a genuinely signed document.
#![no_main]

use kluis_attestation::{TrustAnchor, UnixMillis, Verifier, VerifyOptions};
use std::sync::OnceLock;

static VERIFIER: OnceLock<Verifier> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let verifier = VERIFIER.get_or_init(|| {
        Verifier::new(TrustAnchor::aws_nitro_root_g1().expect("built-in root"))
    });
    // 2025-01-06T16:07:05.472Z: inside the validity of one seed's chain, so
    // mutations of that seed reach the signature checks.
    let _ = verifier.verify(data, &VerifyOptions::at(UnixMillis(1_736_179_625_472)));
});
