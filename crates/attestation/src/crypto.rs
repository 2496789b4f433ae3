//! The only place where cryptographic primitives are called.
//!
//! Everything the verification core needs from a crypto library is here: ECDSA
//! P-384/SHA-384 verification (raw `r||s` for COSE, DER for X.509), SHA-384 and
//! SHA-256. Two backends implement the same four functions:
//!
//! - `aws-lc` (default): AWS-LC through `aws-lc-rs`. About 4x faster than the
//!   pure-Rust backend for P-384 verification on this project's reference machine,
//!   which is what lets a verifier sustain well over a thousand documents a second.
//! - `rustcrypto`: the pure-Rust `p384` and `sha2` crates, for builds that cannot
//!   link C.
//!
//! Adding another backend (an HSM, a FIPS module) means adding one `mod` here.

/// A signature or key did not verify. Deliberately carries no detail: the caller
/// knows which signature it was checking and reports that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CryptoFailure;

/// Length of a raw (IEEE P1363, `r || s`) P-384 signature, as COSE uses.
pub(crate) const P384_RAW_SIGNATURE_LEN: usize = 96;
/// Length of an uncompressed SEC1 P-384 public key.
pub(crate) const P384_UNCOMPRESSED_POINT_LEN: usize = 97;

#[cfg(feature = "aws-lc")]
mod backend {
    use super::CryptoFailure;
    use aws_lc_rs::{digest, signature};

    pub(crate) fn verify_p384_sha384_raw(
        public_key_sec1: &[u8],
        message: &[u8],
        signature_rs: &[u8],
    ) -> Result<(), CryptoFailure> {
        signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, public_key_sec1)
            .verify(message, signature_rs)
            .map_err(|_| CryptoFailure)
    }

    pub(crate) fn verify_p384_sha384_der(
        public_key_sec1: &[u8],
        message: &[u8],
        signature_der: &[u8],
    ) -> Result<(), CryptoFailure> {
        signature::UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_ASN1, public_key_sec1)
            .verify(message, signature_der)
            .map_err(|_| CryptoFailure)
    }

    pub(crate) fn sha384(data: &[u8]) -> [u8; 48] {
        let d = digest::digest(&digest::SHA384, data);
        let mut out = [0u8; 48];
        out.copy_from_slice(d.as_ref());
        out
    }

    pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
        let d = digest::digest(&digest::SHA256, data);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

#[cfg(all(feature = "rustcrypto", not(feature = "aws-lc")))]
mod backend {
    use super::CryptoFailure;
    use p384::ecdsa::{signature::Verifier, Signature, VerifyingKey};
    use sha2::Digest;

    pub(crate) fn verify_p384_sha384_raw(
        public_key_sec1: &[u8],
        message: &[u8],
        signature_rs: &[u8],
    ) -> Result<(), CryptoFailure> {
        let key = VerifyingKey::from_sec1_bytes(public_key_sec1).map_err(|_| CryptoFailure)?;
        let sig = Signature::from_slice(signature_rs).map_err(|_| CryptoFailure)?;
        key.verify(message, &sig).map_err(|_| CryptoFailure)
    }

    pub(crate) fn verify_p384_sha384_der(
        public_key_sec1: &[u8],
        message: &[u8],
        signature_der: &[u8],
    ) -> Result<(), CryptoFailure> {
        let key = VerifyingKey::from_sec1_bytes(public_key_sec1).map_err(|_| CryptoFailure)?;
        let sig = Signature::from_der(signature_der).map_err(|_| CryptoFailure)?;
        key.verify(message, &sig).map_err(|_| CryptoFailure)
    }

    pub(crate) fn sha384(data: &[u8]) -> [u8; 48] {
        sha2::Sha384::digest(data).into()
    }

    pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
        sha2::Sha256::digest(data).into()
    }
}

#[cfg(not(any(feature = "aws-lc", feature = "rustcrypto")))]
compile_error!("kluis-attestation needs a crypto backend: enable `aws-lc` or `rustcrypto`");

pub(crate) use backend::{sha256, sha384, verify_p384_sha384_der, verify_p384_sha384_raw};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha384_known_answer() {
        // FIPS 180-2 example "abc".
        assert_eq!(
            hex::encode(sha384(b"abc")),
            "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed\
             8086072ba1e7cc2358baeca134c825a7"
        );
    }

    #[test]
    fn sha256_known_answer() {
        assert_eq!(
            hex::encode(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn garbage_key_and_signature_fail_closed() {
        assert_eq!(
            verify_p384_sha384_raw(&[4u8; 97], b"m", &[1u8; 96]),
            Err(CryptoFailure)
        );
        assert_eq!(
            verify_p384_sha384_der(&[], b"m", &[0x30, 0x00]),
            Err(CryptoFailure)
        );
    }
}
