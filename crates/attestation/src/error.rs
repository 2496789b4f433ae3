//! Errors, one enum per verification stage.
//!
//! Every error says what was expected and what was found, never includes secret
//! material (there is none in an attestation document, but the rule holds), and has
//! a stable machine-readable [`VerifyError::kind`] that the CLI and audit log use.
//! Network peers get a coarse answer; operators get this detail.

use thiserror::Error;

/// Unix seconds as RFC 3339 UTC, for messages; the number when out of range.
fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} (Unix seconds)"))
}

/// RFC 3339 UTC with milliseconds for Unix milliseconds.
fn rfc3339_ms(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms).saturating_mul(1_000_000))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} (Unix ms)"))
}

/// A failure to decode CBOR strictly.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EncodingError {
    /// The bytes are not well-formed CBOR.
    #[error("{context}: malformed CBOR ({detail})")]
    Malformed {
        /// Which structure was being decoded.
        context: &'static str,
        /// What the decoder reported.
        detail: String,
    },
    /// A complete CBOR item was followed by more bytes.
    #[error("{context}: {count} trailing byte(s) after the CBOR item")]
    TrailingBytes {
        /// Which structure was being decoded.
        context: &'static str,
        /// How many bytes followed.
        count: usize,
    },
    /// Nesting deeper than the decoder allows.
    #[error("{context}: CBOR nested deeper than {limit} levels")]
    TooDeep {
        /// Which structure was being decoded.
        context: &'static str,
        /// The limit.
        limit: usize,
    },
    /// A map holds the same key twice.
    #[error("{context}: duplicate map key {key}")]
    DuplicateKey {
        /// Which structure was being decoded.
        context: &'static str,
        /// The repeated key, rendered for humans.
        key: String,
    },
    /// A map or array has more entries than any valid document needs.
    #[error("{context}: a CBOR container has {found} entries, more than the limit of {limit}")]
    TooManyEntries {
        /// Which structure was being decoded.
        context: &'static str,
        /// Entries found.
        found: usize,
        /// The limit.
        limit: usize,
    },
}

/// A failure in the COSE_Sign1 envelope.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CoseError {
    /// Tagged with something other than COSE_Sign1 (18).
    #[error("expected an untagged COSE_Sign1 or CBOR tag 18, found tag {found}")]
    UnexpectedTag {
        /// The tag found.
        found: u64,
    },
    /// Not a 4-element array of the right types.
    #[error("not a COSE_Sign1 structure: {detail}")]
    Structure {
        /// What was wrong.
        detail: String,
    },
    /// The protected header does not say ES384, or says more than that.
    #[error("protected header must be exactly {{alg: ES384}}, found {found}")]
    Algorithm {
        /// What the protected header holds.
        found: String,
    },
    /// The unprotected header carries something. Nitro documents leave it
    /// empty, and anything in it is not covered by the signature.
    #[error("unprotected header must be empty, found {entries} entr(y/ies)")]
    UnprotectedHeader {
        /// How many entries it has.
        entries: usize,
    },
    /// The payload is detached (nil); Nitro documents always carry it.
    #[error("COSE_Sign1 payload is detached (nil); expected the attestation document")]
    DetachedPayload,
    /// The signature is not a 96-byte raw P-384 signature.
    #[error("signature must be {expected} bytes (raw P-384 r||s), found {found}")]
    SignatureLength {
        /// 96.
        expected: usize,
        /// What was found.
        found: usize,
    },
}

/// A failure in the attestation document (the COSE payload).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// The payload is not a CBOR map.
    #[error("attestation document must be a CBOR map, found {found}")]
    NotAMap {
        /// The CBOR type found.
        found: &'static str,
    },
    /// A required field is absent.
    #[error("attestation document lacks required field `{field}`")]
    MissingField {
        /// The field.
        field: &'static str,
    },
    /// A field that the AWS format does not define.
    #[error("attestation document has unknown field {field}")]
    UnknownField {
        /// The key, rendered for humans.
        field: String,
    },
    /// A field has the wrong CBOR type.
    #[error("field `{field}`: expected {expected}, found {found}")]
    WrongType {
        /// The field.
        field: &'static str,
        /// The expected type.
        expected: &'static str,
        /// The CBOR type found.
        found: &'static str,
    },
    /// A field's length is outside its bounds.
    #[error("field `{field}`: length must be {min}..={max}, found {found}")]
    Length {
        /// The field.
        field: &'static str,
        /// Minimum length.
        min: usize,
        /// Maximum length.
        max: usize,
        /// The length found.
        found: usize,
    },
    /// The digest is not SHA384.
    #[error("field `digest`: expected \"SHA384\", found {found:?}")]
    UnsupportedDigest {
        /// What was found.
        found: String,
    },
    /// Timestamp zero or not representable.
    #[error("field `timestamp`: expected milliseconds since the epoch > 0, found {found}")]
    Timestamp {
        /// What was found, rendered.
        found: String,
    },
    /// A PCR index outside 0..=31.
    #[error("field `pcrs`: index must be 0..=31, found {found}")]
    PcrIndex {
        /// What was found, rendered.
        found: String,
    },
    /// A PCR value not 32, 48 or 64 bytes.
    #[error("field `pcrs`: PCR{index} must be 32, 48 or 64 bytes, found {found}")]
    PcrLength {
        /// The PCR index.
        index: u8,
        /// The length found.
        found: usize,
    },
}

/// A failure in the certificate chain.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ChainError {
    /// `cabundle[0]` is not the pinned root.
    #[error("cabundle[0] is not the pinned root (expected SHA-256 {expected}, found {found})")]
    UntrustedRoot {
        /// Fingerprint of the pinned root.
        expected: String,
        /// Fingerprint of what the document presents.
        found: String,
    },
    /// More certificates than any Nitro chain has.
    #[error("certificate chain has {found} certificates, more than the limit of {limit}")]
    TooLong {
        /// Certificates found.
        found: usize,
        /// The limit.
        limit: usize,
    },
    /// A certificate is not valid DER X.509 v3.
    #[error("{cert}: not a valid X.509 v3 certificate ({detail})")]
    Parse {
        /// Which certificate.
        cert: String,
        /// What was wrong.
        detail: String,
    },
    /// A certificate is signed with something other than ecdsa-with-SHA384.
    #[error("{cert}: signature algorithm must be ecdsa-with-SHA384, found {found}")]
    SignatureAlgorithm {
        /// Which certificate.
        cert: String,
        /// The OID found.
        found: String,
    },
    /// A key that is not P-384.
    #[error("{cert}: public key must be EC P-384, found {found}")]
    KeyType {
        /// Which certificate.
        cert: String,
        /// What was found.
        found: String,
    },
    /// Issuer name does not match the previous certificate's subject.
    #[error("{cert}: issuer {found:?} does not match the subject of its issuer {expected:?}")]
    IssuerMismatch {
        /// Which certificate.
        cert: String,
        /// Subject of the issuing certificate.
        expected: String,
        /// Issuer field of this certificate.
        found: String,
    },
    /// The signature on a certificate does not verify under its issuer's key.
    #[error("{cert}: signature does not verify with the issuer's key")]
    BadSignature {
        /// Which certificate.
        cert: String,
    },
    /// A CA position holds a certificate without basicConstraints CA=true.
    #[error("{cert}: must be a CA (basicConstraints cA=true), found {found}")]
    NotACa {
        /// Which certificate.
        cert: String,
        /// What was found.
        found: String,
    },
    /// A path length constraint is exceeded.
    #[error("{cert}: pathLenConstraint {limit} but {found} CA certificate(s) follow it")]
    PathLength {
        /// Which certificate.
        cert: String,
        /// The constraint.
        limit: u32,
        /// Intermediate CAs below it.
        found: usize,
    },
    /// A required key usage bit is missing.
    #[error("{cert}: keyUsage must include {expected}")]
    KeyUsage {
        /// Which certificate.
        cert: String,
        /// The usage required.
        expected: &'static str,
    },
    /// The leaf is a CA.
    #[error("{cert}: the signing certificate must not be a CA")]
    LeafIsCa {
        /// Which certificate.
        cert: String,
    },
    /// A critical extension this verifier does not process.
    #[error("{cert}: unsupported critical extension {oid}")]
    CriticalExtension {
        /// Which certificate.
        cert: String,
        /// Its OID.
        oid: String,
    },
    /// A certificate has expired at the verification time.
    #[error("{cert}: expired at {} (verification time {})", rfc3339(*not_after), rfc3339(*at))]
    Expired {
        /// Which certificate.
        cert: String,
        /// notAfter, Unix seconds.
        not_after: i64,
        /// Verification time, Unix seconds.
        at: i64,
    },
    /// A certificate is not yet valid at the verification time.
    #[error("{cert}: not valid before {} (verification time {})", rfc3339(*not_before), rfc3339(*at))]
    NotYetValid {
        /// Which certificate.
        cert: String,
        /// notBefore, Unix seconds.
        not_before: i64,
        /// Verification time, Unix seconds.
        at: i64,
    },
}

/// A failure of the freshness checks (nonce, age), separate from certificate validity.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FreshnessError {
    /// A nonce was expected but the document has none.
    #[error("expected nonce {expected}, document has none")]
    NonceMissing {
        /// Expected nonce, hex.
        expected: String,
    },
    /// The document's nonce differs from the expected one.
    #[error("expected nonce {expected}, found {found}")]
    NonceMismatch {
        /// Expected nonce, hex.
        expected: String,
        /// Found nonce, hex.
        found: String,
    },
    /// The document is older than allowed.
    #[error("document is {age_ms} ms old, more than the maximum of {max_age_ms} ms")]
    TooOld {
        /// Age at the verification time.
        age_ms: u64,
        /// The maximum.
        max_age_ms: u64,
    },
    /// The document's timestamp is later than the verification time (beyond skew).
    #[error("document timestamp {} is {ahead_ms} ms after the verification time", rfc3339_ms(*timestamp_ms))]
    FromTheFuture {
        /// The document's timestamp.
        timestamp_ms: u64,
        /// How far ahead.
        ahead_ms: u64,
    },
}

/// Why a document was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The document is larger than any real one can be.
    #[error("document is {found} bytes, more than the limit of {limit}")]
    TooLarge {
        /// Size found.
        found: usize,
        /// The limit.
        limit: usize,
    },
    /// CBOR decoding failed.
    #[error(transparent)]
    Encoding(#[from] EncodingError),
    /// The COSE envelope is wrong.
    #[error(transparent)]
    Cose(#[from] CoseError),
    /// The payload is wrong.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// The certificate chain is wrong.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The COSE signature does not verify under the leaf certificate's key.
    #[error("document signature does not verify with the leaf certificate's key")]
    BadSignature,
    /// Nonce or age.
    #[error(transparent)]
    Freshness(#[from] FreshnessError),
}

impl VerifyError {
    /// A stable, machine-readable name for this error, e.g. `chain_expired`.
    ///
    /// These names are part of the CLI contract and the audit log format: never
    /// rename one, only add.
    pub fn kind(&self) -> &'static str {
        match self {
            VerifyError::TooLarge { .. } => "document_too_large",
            VerifyError::Encoding(e) => match e {
                EncodingError::Malformed { .. } => "cbor_malformed",
                EncodingError::TrailingBytes { .. } => "cbor_trailing_bytes",
                EncodingError::TooDeep { .. } => "cbor_too_deep",
                EncodingError::DuplicateKey { .. } => "cbor_duplicate_key",
                EncodingError::TooManyEntries { .. } => "cbor_too_many_entries",
            },
            VerifyError::Cose(e) => match e {
                CoseError::UnexpectedTag { .. } => "cose_unexpected_tag",
                CoseError::Structure { .. } => "cose_structure",
                CoseError::Algorithm { .. } => "cose_algorithm",
                CoseError::DetachedPayload => "cose_detached_payload",
                CoseError::UnprotectedHeader { .. } => "cose_unprotected_header",
                CoseError::SignatureLength { .. } => "cose_signature_length",
            },
            VerifyError::Payload(e) => match e {
                PayloadError::NotAMap { .. } => "payload_not_a_map",
                PayloadError::MissingField { .. } => "payload_missing_field",
                PayloadError::UnknownField { .. } => "payload_unknown_field",
                PayloadError::WrongType { .. } => "payload_wrong_type",
                PayloadError::Length { .. } => "payload_field_length",
                PayloadError::UnsupportedDigest { .. } => "payload_unsupported_digest",
                PayloadError::Timestamp { .. } => "payload_timestamp",
                PayloadError::PcrIndex { .. } => "payload_pcr_index",
                PayloadError::PcrLength { .. } => "payload_pcr_length",
            },
            VerifyError::Chain(e) => match e {
                ChainError::UntrustedRoot { .. } => "chain_untrusted_root",
                ChainError::TooLong { .. } => "chain_too_long",
                ChainError::Parse { .. } => "chain_certificate_malformed",
                ChainError::SignatureAlgorithm { .. } => "chain_signature_algorithm",
                ChainError::KeyType { .. } => "chain_key_type",
                ChainError::IssuerMismatch { .. } => "chain_issuer_mismatch",
                ChainError::BadSignature { .. } => "chain_bad_signature",
                ChainError::NotACa { .. } => "chain_not_a_ca",
                ChainError::PathLength { .. } => "chain_path_length",
                ChainError::KeyUsage { .. } => "chain_key_usage",
                ChainError::LeafIsCa { .. } => "chain_leaf_is_ca",
                ChainError::CriticalExtension { .. } => "chain_critical_extension",
                ChainError::Expired { .. } => "chain_expired",
                ChainError::NotYetValid { .. } => "chain_not_yet_valid",
            },
            VerifyError::BadSignature => "signature_invalid",
            VerifyError::Freshness(e) => match e {
                FreshnessError::NonceMissing { .. } => "nonce_missing",
                FreshnessError::NonceMismatch { .. } => "nonce_mismatch",
                FreshnessError::TooOld { .. } => "document_too_old",
                FreshnessError::FromTheFuture { .. } => "document_from_future",
            },
        }
    }
}

/// A problem with a trust anchor (the pinned root).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RootError {
    /// The built-in root does not hash to its published fingerprint.
    #[error("built-in AWS Nitro root fingerprint mismatch: expected {expected}, computed {found}")]
    FingerprintMismatch {
        /// The published fingerprint.
        expected: &'static str,
        /// What the embedded bytes hash to.
        found: String,
    },
    /// The PEM could not be read.
    #[error("root certificate PEM is not valid: {detail}")]
    Pem {
        /// What was wrong.
        detail: String,
    },
    /// The certificate is not usable as a Nitro root.
    #[error("root certificate is not usable: {0}")]
    Certificate(ChainError),
}
