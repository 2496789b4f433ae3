//! Verification of AWS Nitro Enclaves attestation documents.
//!
//! This crate is the verification core of Kluis. It is *sans-IO*: it takes the
//! document bytes, a [`TrustAnchor`] and the time as arguments, and touches no
//! socket, file, clock or runtime. That is what makes it testable with any
//! clock, usable from a synchronous CLI and an async server alike, and fuzzable.
//!
//! The procedure is AWS's, made strict:
//!
//! 1. COSE_Sign1 (untagged or CBOR tag 18), strict CBOR (no trailing bytes, no
//!    duplicate map keys, bounded depth and size), a protected header that is
//!    exactly `{alg: ES384}`, a 96-byte signature.
//! 2. The payload map with every field rule AWS documents, widened to what real
//!    documents carry (null or empty optional fields up to 1024 bytes).
//! 3. The chain `cabundle[0] → … → certificate`, `cabundle[0]` equal to the
//!    pinned root, every link and constraint checked at the given time.
//! 4. The COSE signature over the protected header and payload bytes as received.
//! 5. Optional freshness: an expected nonce and a maximum age.
//!
//! Success is a [`VerifiedAttestation`], which nothing else can construct.
//!
//! ```no_run
//! use kluis_attestation::{TrustAnchor, UnixMillis, Verifier, VerifyOptions};
//! # fn demo(doc: &[u8], now_ms: u64, nonce: &[u8]) -> Result<(), Box<dyn std::error::Error>> {
//! let verifier = Verifier::new(TrustAnchor::aws_nitro_root_g1()?);
//! let options = VerifyOptions::at(UnixMillis(now_ms))
//!     .expect_nonce(nonce)
//!     .max_age(std::time::Duration::from_secs(300));
//! let verified = verifier.verify(doc, &options)?;
//! println!("{}", verified.document().module_id);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cbor;
mod chain;
mod crypto;
mod document;
mod error;
mod root;
mod verifier;

pub use chain::MAX_CHAIN_LEN;
pub use document::{
    AttestationDocument, MAX_CERT_LEN, MAX_MODULE_ID_LEN, MAX_OPTIONAL_FIELD_LEN, PCR_COUNT,
};
pub use error::{
    ChainError, CoseError, EncodingError, FreshnessError, PayloadError, RootError, VerifyError,
};
pub use root::{TrustAnchor, AWS_NITRO_ROOT_G1_SHA256};
pub use verifier::{
    check_certificate, describe_certificate, parse_unverified, CertificateSummary, UnixMillis,
    UnverifiedDocument, VerifiedAttestation, Verifier, VerifyOptions, DEFAULT_CACHE_CAPACITY,
    MAX_DOCUMENT_LEN,
};

/// SHA-384, exposed so callers hash exactly as the verifier does (request
/// bindings, document identities).
pub fn sha384(data: &[u8]) -> [u8; 48] {
    crypto::sha384(data)
}
