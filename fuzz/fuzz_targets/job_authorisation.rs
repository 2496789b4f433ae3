//! Any bytes as a signed job authorisation (the AUTH file a parent hands to
//! the enclave): a typed error or an authorisation that verifies, never a
//! panic or an allocation sized by the input's claims. What verifies is
//! canonical: its id is the SHA-256 of exactly the bytes given, and it
//! verifies again.
#![no_main]

use std::sync::OnceLock;

fn identity() -> &'static kluis_proto::VerifierIdentity {
    static IDENTITY: OnceLock<kluis_proto::VerifierIdentity> = OnceLock::new();
    IDENTITY.get_or_init(|| kluis_proto::VerifierIdentity::generate().expect("a key"))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let pinned = identity().public_key_sec1();
    let Ok(signed) = kluis_proto::SignedAuthorisation::verify(data, &pinned) else {
        return;
    };
    assert_eq!(signed.bytes(), data);
    assert_eq!(signed.id(), kluis_proto::AuthorisationId::of(data));
    assert!(signed.authorisation().validate().is_ok());
});
