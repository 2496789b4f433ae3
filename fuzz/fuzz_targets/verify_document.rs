//! Full verification of any bytes against the AWS root never panics, and
//! accepts nothing but a genuinely signed document: whatever verifies has the
//! payload and signature of one of the seeds (the real documents), since no
//! mutation can make a new signature under AWS's keys.
#![no_main]

use kluis_attestation::{
    parse_unverified, AttestationDocument, TrustAnchor, UnixMillis, Verifier, VerifyOptions,
};
use std::path::PathBuf;
use std::sync::OnceLock;

static VERIFIER: OnceLock<Verifier> = OnceLock::new();
static SEEDS: OnceLock<Vec<(AttestationDocument, Vec<u8>)>> = OnceLock::new();

/// The parsed real documents (`KLUIS_NITRO_VECTORS`, or
/// `../shared/vectors/nitro-real` beside the workspace). With none, nothing
/// may verify at all.
fn seeds() -> Vec<(AttestationDocument, Vec<u8>)> {
    let dir = std::env::var_os("KLUIS_NITRO_VECTORS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors/nitro-real"),
        PathBuf::from,
    );
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "cbor"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|bytes| parse_unverified(&bytes).ok())
        .map(|u| (u.document, u.signature))
        .collect()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let verifier = VERIFIER.get_or_init(|| {
        Verifier::new(TrustAnchor::aws_nitro_root_g1().expect("built-in root"))
    });
    let seeds = SEEDS.get_or_init(seeds);
    // 2025-01-06T16:07:05.472Z: inside the validity of one seed's chain, so
    // mutations of that seed reach the signature checks.
    if let Ok(verified) = verifier.verify(data, &VerifyOptions::at(UnixMillis(1_736_179_625_472))) {
        let parsed = parse_unverified(data).expect("a verified document parses");
        assert_eq!(&parsed.document, verified.document());
        assert!(
            seeds
                .iter()
                .any(|(doc, sig)| doc == verified.document() && *sig == parsed.signature),
            "a document that is not one of the seeds verified ({} seeds loaded)",
            seeds.len()
        );
    }
});
