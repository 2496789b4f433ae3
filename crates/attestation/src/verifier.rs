//! The verification procedure and its proof type.

use crate::cbor::decode_strict;
use crate::chain::{parse_cert, CertInfo, LinkCache, MAX_CHAIN_LEN};
use crate::crypto;
use crate::document::AttestationDocument;
use crate::error::{ChainError, CoseError, FreshnessError, VerifyError};
use crate::root::TrustAnchor;
use ciborium::value::Value;
use coset::{AsCborValue, CoseSign1};
use std::time::Duration;

/// Largest COSE document accepted, in bytes. Real documents are about 4.5 KiB; the
/// largest the format allows (8 certificates of 1 KiB, three 1 KiB optional fields,
/// 32 PCRs of 64 bytes) stays under 16 KiB.
pub const MAX_DOCUMENT_LEN: usize = 32 * 1024;

/// Default number of verified CA links kept (three per Nitro host).
pub const DEFAULT_CACHE_CAPACITY: usize = 1024;

/// COSE_Sign1's CBOR tag.
const COSE_SIGN1_TAG: u64 = 18;

/// A point in time, in milliseconds since the Unix epoch. The verification core
/// never reads a clock; callers pass this in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    fn seconds(self) -> i64 {
        i64::try_from(self.0 / 1000).unwrap_or(i64::MAX)
    }
}

/// What a verification is checked against besides the trust anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOptions {
    now: UnixMillis,
    expected_nonce: Option<Vec<u8>>,
    max_age: Option<Duration>,
    max_clock_skew: Duration,
}

impl VerifyOptions {
    /// Verify as of `now`: certificate validity is checked at this instant.
    /// Freshness is not checked unless asked for.
    pub fn at(now: UnixMillis) -> Self {
        VerifyOptions {
            now,
            expected_nonce: None,
            max_age: None,
            max_clock_skew: Duration::from_secs(60),
        }
    }

    /// Require the document's `nonce` to equal `nonce`.
    pub fn expect_nonce(mut self, nonce: impl Into<Vec<u8>>) -> Self {
        self.expected_nonce = Some(nonce.into());
        self
    }

    /// Require the document to be at most `max_age` old at `now`, and not dated
    /// more than the clock skew allowance (default 60 s) after `now`.
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = Some(max_age);
        self
    }

    /// How far the document's timestamp may be ahead of `now` when `max_age`
    /// is checked.
    pub fn max_clock_skew(mut self, skew: Duration) -> Self {
        self.max_clock_skew = skew;
        self
    }

    /// The verification time.
    pub fn now(&self) -> UnixMillis {
        self.now
    }
}

/// Facts about one certificate, for reports. Carries no judgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    /// Subject DN, RFC 4514 style.
    pub subject: String,
    /// Issuer DN, RFC 4514 style.
    pub issuer: String,
    /// Serial number, hex with colons.
    pub serial: String,
    /// notBefore, Unix seconds.
    pub not_before: i64,
    /// notAfter, Unix seconds.
    pub not_after: i64,
    /// basicConstraints cA.
    pub is_ca: bool,
    /// basicConstraints pathLenConstraint.
    pub path_len: Option<u32>,
}

impl From<&CertInfo> for CertificateSummary {
    fn from(info: &CertInfo) -> Self {
        CertificateSummary {
            subject: info.subject.clone(),
            issuer: info.issuer.clone(),
            serial: info.serial.clone(),
            not_before: info.not_before,
            not_after: info.not_after,
            is_ca: info.is_ca,
            path_len: info.path_len,
        }
    }
}

/// Proof that a document was verified: signature, chain to the pinned root,
/// payload rules and the requested freshness checks all passed.
///
/// Only [`Verifier::verify`] constructs one; key release takes it by value.
#[derive(Debug)]
pub struct VerifiedAttestation {
    document: AttestationDocument,
    document_sha384: [u8; 48],
    leaf: CertificateSummary,
    root_sha256: [u8; 32],
    verified_at: UnixMillis,
}

impl VerifiedAttestation {
    /// The verified document.
    pub fn document(&self) -> &AttestationDocument {
        &self.document
    }

    /// SHA-384 of the complete COSE bytes as received: the identity of this
    /// document in audit records and in key-release bindings.
    pub fn document_sha384(&self) -> &[u8; 48] {
        &self.document_sha384
    }

    /// The certificate whose key signed the document.
    pub fn leaf(&self) -> &CertificateSummary {
        &self.leaf
    }

    /// SHA-256 of the root the chain ended in.
    pub fn root_sha256(&self) -> &[u8; 32] {
        &self.root_sha256
    }

    /// The time the verification was done as of.
    pub fn verified_at(&self) -> UnixMillis {
        self.verified_at
    }

    /// Give up the proof for the document.
    pub fn into_document(self) -> AttestationDocument {
        self.document
    }
}

/// A document decoded without any judgement, for operators' inspection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnverifiedDocument {
    /// The payload.
    pub document: AttestationDocument,
    /// SHA-384 of the COSE bytes.
    pub document_sha384: [u8; 48],
    /// The raw COSE signature.
    pub signature: Vec<u8>,
}

/// Verifies Nitro attestation documents against one pinned root.
///
/// Cheap to share across threads (`&self`); holds a bounded cache of CA links it
/// has verified.
#[derive(Debug)]
pub struct Verifier {
    anchor: TrustAnchor,
    cache: LinkCache,
}

impl Verifier {
    /// A verifier for `anchor` with the default cache.
    pub fn new(anchor: TrustAnchor) -> Self {
        Self::with_cache_capacity(anchor, DEFAULT_CACHE_CAPACITY)
    }

    /// A verifier whose cache holds at most `capacity` CA links (0 disables it).
    pub fn with_cache_capacity(anchor: TrustAnchor, capacity: usize) -> Self {
        Verifier {
            anchor,
            cache: LinkCache::new(capacity),
        }
    }

    /// The pinned root.
    pub fn anchor(&self) -> &TrustAnchor {
        &self.anchor
    }

    /// Verify `cose` (raw COSE_Sign1 bytes as the NSM returned them).
    pub fn verify(
        &self,
        cose: &[u8],
        options: &VerifyOptions,
    ) -> Result<VerifiedAttestation, VerifyError> {
        let envelope = decode_envelope(cose)?;
        let document = decode_payload(&envelope.payload)?;

        let leaf = self.verify_chain(&document, options.now)?;

        crypto::verify_p384_sha384_raw(&leaf.public_key, &envelope.tbs, &envelope.signature)
            .map_err(|_| VerifyError::BadSignature)?;

        check_freshness(&document, options)?;

        Ok(VerifiedAttestation {
            document,
            document_sha384: crypto::sha384(cose),
            leaf: CertificateSummary::from(&leaf),
            root_sha256: self.anchor.sha256_fingerprint(),
            verified_at: options.now,
        })
    }

    fn verify_chain(
        &self,
        document: &AttestationDocument,
        now: UnixMillis,
    ) -> Result<CertInfo, VerifyError> {
        let bundle = &document.cabundle;
        let total = bundle.len().saturating_add(1);
        if total > MAX_CHAIN_LEN {
            return Err(ChainError::TooLong {
                found: total,
                limit: MAX_CHAIN_LEN,
            }
            .into());
        }
        let Some((root_der, intermediates)) = bundle.split_first() else {
            // Unreachable after payload checks (cabundle is non-empty), kept total.
            return Err(ChainError::TooLong {
                found: 0,
                limit: MAX_CHAIN_LEN,
            }
            .into());
        };
        if root_der.as_slice() != self.anchor.der() {
            return Err(ChainError::UntrustedRoot {
                expected: hex::encode(self.anchor.sha256_fingerprint()),
                found: hex::encode(crypto::sha256(root_der)),
            }
            .into());
        }

        let at = now.seconds();
        let root = self.anchor.info();
        // CA certificates strictly between this one and the leaf.
        let mut cas_below = intermediates.len();
        root.check_ca("cabundle[0]", cas_below)?;
        root.check_validity("cabundle[0]", at)?;

        let mut issuer_der: &[u8] = root_der;
        let mut issuer: CertInfo = root.clone();
        for (i, der) in intermediates.iter().enumerate() {
            let label = format!("cabundle[{}]", i.saturating_add(1));
            let info = self.cache.verify_link(issuer_der, &issuer, der, &label)?;
            cas_below = cas_below.saturating_sub(1);
            info.check_ca(&label, cas_below)?;
            info.check_validity(&label, at)?;
            issuer_der = der;
            issuer = info;
        }

        let leaf =
            self.cache
                .verify_link(issuer_der, &issuer, &document.certificate, "certificate")?;
        leaf.check_leaf("certificate")?;
        leaf.check_validity("certificate", at)?;
        Ok(leaf)
    }
}

struct Envelope {
    payload: Vec<u8>,
    signature: Vec<u8>,
    /// The COSE Sig_structure the signature covers, built from the protected
    /// header and payload bytes exactly as received.
    tbs: Vec<u8>,
}

fn decode_envelope(cose: &[u8]) -> Result<Envelope, VerifyError> {
    if cose.len() > MAX_DOCUMENT_LEN {
        return Err(VerifyError::TooLarge {
            found: cose.len(),
            limit: MAX_DOCUMENT_LEN,
        });
    }
    let value = match decode_strict(cose, "COSE_Sign1")? {
        Value::Tag(COSE_SIGN1_TAG, inner) => *inner,
        Value::Tag(found, _) => return Err(CoseError::UnexpectedTag { found }.into()),
        other => other,
    };
    // The protected header is a byte string holding CBOR: decode it strictly too
    // before coset interprets it. The unprotected header must be empty: what it
    // holds is not signed, and would give one signed document many encodings.
    if let Value::Array(items) = &value {
        if let Some(Value::Bytes(protected)) = items.first() {
            decode_strict(protected, "protected header")?;
        }
        if let Some(Value::Map(unprotected)) = items.get(1) {
            if !unprotected.is_empty() {
                return Err(CoseError::UnprotectedHeader {
                    entries: unprotected.len(),
                }
                .into());
            }
        }
    }
    let sign1 = CoseSign1::from_cbor_value(value).map_err(|e| CoseError::Structure {
        detail: e.to_string(),
    })?;

    let protected = &sign1.protected.header;
    let es384 = coset::Algorithm::Assigned(coset::iana::Algorithm::ES384);
    let only_alg = coset::Header {
        alg: Some(es384.clone()),
        ..Default::default()
    };
    if *protected != only_alg {
        return Err(CoseError::Algorithm {
            found: match &protected.alg {
                Some(alg) if *alg == es384 => "ES384 with other parameters".to_owned(),
                Some(alg) => format!("{alg:?}"),
                None => "no alg".to_owned(),
            },
        }
        .into());
    }
    if sign1.signature.len() != crypto::P384_RAW_SIGNATURE_LEN {
        return Err(CoseError::SignatureLength {
            expected: crypto::P384_RAW_SIGNATURE_LEN,
            found: sign1.signature.len(),
        }
        .into());
    }
    if sign1.payload.is_none() {
        return Err(CoseError::DetachedPayload.into());
    }
    let tbs = sign1.tbs_data(b"");
    let CoseSign1 {
        payload, signature, ..
    } = sign1;
    Ok(Envelope {
        payload: payload.unwrap_or_default(),
        signature,
        tbs,
    })
}

fn decode_payload(payload: &[u8]) -> Result<AttestationDocument, VerifyError> {
    let value = decode_strict(payload, "attestation document")?;
    Ok(AttestationDocument::from_value(value)?)
}

fn check_freshness(
    document: &AttestationDocument,
    options: &VerifyOptions,
) -> Result<(), FreshnessError> {
    if let Some(expected) = &options.expected_nonce {
        match &document.nonce {
            None => {
                return Err(FreshnessError::NonceMissing {
                    expected: hex::encode(expected),
                })
            }
            Some(found) if found != expected => {
                return Err(FreshnessError::NonceMismatch {
                    expected: hex::encode(expected),
                    found: hex::encode(found),
                })
            }
            Some(_) => {}
        }
    }
    if let Some(max_age) = options.max_age {
        let now = options.now.0;
        let ts = document.timestamp_ms;
        let skew = duration_ms(options.max_clock_skew);
        if ts > now {
            let ahead_ms = ts.saturating_sub(now);
            if ahead_ms > skew {
                return Err(FreshnessError::FromTheFuture {
                    timestamp_ms: ts,
                    ahead_ms,
                });
            }
        }
        let age_ms = now.saturating_sub(ts);
        let max_age_ms = duration_ms(max_age);
        if age_ms > max_age_ms {
            return Err(FreshnessError::TooOld { age_ms, max_age_ms });
        }
    }
    Ok(())
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Decode a document and report what it says, without verifying anything but its
/// encoding. For operators' inspection only: nothing here may feed a trust
/// decision.
pub fn parse_unverified(cose: &[u8]) -> Result<UnverifiedDocument, VerifyError> {
    let envelope = decode_envelope(cose)?;
    let document = decode_payload(&envelope.payload)?;
    Ok(UnverifiedDocument {
        document,
        document_sha384: crypto::sha384(cose),
        signature: envelope.signature,
    })
}

/// Summarise one DER certificate without judging it (for inspection).
pub fn describe_certificate(der: &[u8]) -> Result<CertificateSummary, ChainError> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| {
        ChainError::Parse {
            cert: "certificate".to_owned(),
            detail: e.to_string(),
        }
    })?;
    let bc = cert.basic_constraints().ok().flatten();
    Ok(CertificateSummary {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        is_ca: bc.as_ref().is_some_and(|b| b.value.ca),
        path_len: bc.and_then(|b| b.value.path_len_constraint),
    })
}

/// Parse one certificate under the verifier's rules (used by tests and tools that
/// want the verifier's opinion of a single certificate).
#[doc(hidden)]
pub fn check_certificate(der: &[u8]) -> Result<CertificateSummary, ChainError> {
    parse_cert(der, "certificate").map(|p| CertificateSummary::from(&p.info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kluis_nsm::sim::{FixedClock, SimConfig, SimulatedNsm};
    use std::sync::Arc;

    const T0: u64 = 1_767_225_600_000;

    fn sim() -> (SimulatedNsm, TrustAnchor) {
        let nsm = SimulatedNsm::new(SimConfig::default().with_clock(Arc::new(FixedClock::new(T0))))
            .unwrap();
        let anchor = TrustAnchor::dangerous_from_der(nsm.root().root_der()).unwrap();
        (nsm, anchor)
    }

    #[test]
    fn cache_holds_ca_links_only_and_changes_no_outcome() {
        let (nsm, anchor) = sim();
        let cached = Verifier::new(anchor.clone());
        let uncached = Verifier::with_cache_capacity(anchor, 0);
        let at = VerifyOptions::at(UnixMillis(T0));
        for _ in 0..3 {
            let doc = kluis_nsm::attest(&nsm, None, None, None).unwrap();
            let a = cached.verify(&doc, &at).unwrap();
            let b = uncached.verify(&doc, &at).unwrap();
            assert_eq!(a.document(), b.document());
        }
        // regional, zonal, instance; three fresh leaves were not cached.
        assert_eq!(cached.cache.len(), 3);
        assert_eq!(uncached.cache.len(), 0);
    }

    #[test]
    fn cache_is_bounded() {
        let (nsm, anchor) = sim();
        let verifier = Verifier::with_cache_capacity(anchor, 2);
        let doc = kluis_nsm::attest(&nsm, None, None, None).unwrap();
        verifier
            .verify(&doc, &VerifyOptions::at(UnixMillis(T0)))
            .unwrap();
        assert_eq!(verifier.cache.len(), 2);
        // Still verifies with evictions happening.
        verifier
            .verify(&doc, &VerifyOptions::at(UnixMillis(T0)))
            .unwrap();
    }

    #[test]
    fn cached_links_are_still_checked_for_validity() {
        let (nsm, anchor) = sim();
        let verifier = Verifier::new(anchor);
        let doc = kluis_nsm::attest(&nsm, None, None, None).unwrap();
        verifier
            .verify(&doc, &VerifyOptions::at(UnixMillis(T0)))
            .unwrap();
        // Before the instance CA's notBefore: the cached link must not help.
        let err = verifier
            .verify(&doc, &VerifyOptions::at(UnixMillis(T0 - 10_000_000)))
            .unwrap_err();
        assert_eq!(err.kind(), "chain_not_yet_valid");
    }

    #[test]
    fn freshness_is_separate_from_validity() {
        let (nsm, anchor) = sim();
        let verifier = Verifier::new(anchor);
        let doc = kluis_nsm::attest(&nsm, None, Some(b"n"), None).unwrap();
        let ok = VerifyOptions::at(UnixMillis(T0 + 60_000)).max_age(Duration::from_secs(60));
        assert!(verifier.verify(&doc, &ok).is_ok());
        let stale = VerifyOptions::at(UnixMillis(T0 + 60_001)).max_age(Duration::from_secs(60));
        assert_eq!(
            verifier.verify(&doc, &stale).unwrap_err().kind(),
            "document_too_old"
        );
    }
}
