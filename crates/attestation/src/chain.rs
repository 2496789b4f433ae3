//! X.509 certificate chain validation for Nitro documents.
//!
//! The chain is `cabundle[0] → cabundle[1] → … → cabundle[n-1] → certificate`,
//! where `cabundle[0]` must be byte-for-byte the pinned root. Each certificate is
//! checked for: DER X.509 v3 with nothing trailing, ecdsa-with-SHA384, a P-384
//! key, no critical extension other than basicConstraints and keyUsage, issuer
//! name equal to its issuer's subject, a signature that verifies under its
//! issuer's key, CA/path-length/keyCertSign for CAs, non-CA with
//! digitalSignature for the leaf, and validity at the verification time.
//!
//! `x509-parser` does the DER parsing; nothing here trusts its optional
//! `verify` feature, so every signature goes through [`crate::crypto`].

use crate::crypto;
use crate::error::ChainError;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{
    OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_SIG_ECDSA_WITH_SHA384,
    OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_KEY_USAGE,
};
use x509_parser::prelude::FromDer;

/// Most certificates in a chain, root and leaf included. AWS chains have five.
pub const MAX_CHAIN_LEN: usize = 8;

/// What the chain checks need from one certificate, extracted once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertInfo {
    pub subject: String,
    pub subject_raw: Vec<u8>,
    pub issuer: String,
    pub issuer_raw: Vec<u8>,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub is_ca: bool,
    pub basic_constraints_present: bool,
    pub path_len: Option<u32>,
    pub key_usage_present: bool,
    pub key_cert_sign: bool,
    pub digital_signature: bool,
    /// Uncompressed SEC1 P-384 point.
    pub public_key: Vec<u8>,
}

/// A parsed certificate: its facts plus what is needed to check its signature.
pub(crate) struct ParsedCert {
    pub info: CertInfo,
    pub tbs: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Parse and check the per-certificate rules (encoding, algorithms, extensions).
/// `label` names the certificate in errors (`cabundle[2]`, `certificate`).
pub(crate) fn parse_cert(der: &[u8], label: &str) -> Result<ParsedCert, ChainError> {
    let cert_err = |detail: String| ChainError::Parse {
        cert: label.to_owned(),
        detail,
    };
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| cert_err(e.to_string()))?;
    if !rest.is_empty() {
        return Err(cert_err(format!("{} trailing byte(s)", rest.len())));
    }
    if cert.version().0 != 2 {
        return Err(cert_err(format!(
            "version must be v3, found v{}",
            cert.version().0.saturating_add(1)
        )));
    }
    if cert.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA384
        || cert.tbs_certificate.signature.algorithm != OID_SIG_ECDSA_WITH_SHA384
    {
        return Err(ChainError::SignatureAlgorithm {
            cert: label.to_owned(),
            found: cert.signature_algorithm.algorithm.to_id_string(),
        });
    }
    if cert.signature_algorithm.parameters.is_some() {
        return Err(cert_err(
            "ecdsa-with-SHA384 must have absent parameters".to_owned(),
        ));
    }

    let spki = cert.public_key();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY
        || curve.as_ref() != Some(&OID_NIST_EC_P384)
    {
        return Err(ChainError::KeyType {
            cert: label.to_owned(),
            found: match curve {
                Some(c) => format!(
                    "{} on curve {}",
                    spki.algorithm.algorithm.to_id_string(),
                    c.to_id_string()
                ),
                None => spki.algorithm.algorithm.to_id_string(),
            },
        });
    }
    let public_key = spki.subject_public_key.data.to_vec();
    if public_key.len() != crypto::P384_UNCOMPRESSED_POINT_LEN || public_key.first() != Some(&0x04)
    {
        return Err(ChainError::KeyType {
            cert: label.to_owned(),
            found: format!(
                "a {}-byte point that is not uncompressed P-384",
                public_key.len()
            ),
        });
    }

    for ext in cert.extensions() {
        if ext.critical
            && ext.oid != OID_X509_EXT_BASIC_CONSTRAINTS
            && ext.oid != OID_X509_EXT_KEY_USAGE
        {
            return Err(ChainError::CriticalExtension {
                cert: label.to_owned(),
                oid: ext.oid.to_id_string(),
            });
        }
    }
    let bc = cert
        .basic_constraints()
        .map_err(|e| cert_err(format!("basicConstraints: {e}")))?;
    let ku = cert
        .key_usage()
        .map_err(|e| cert_err(format!("keyUsage: {e}")))?;

    let validity = cert.validity();
    let info = CertInfo {
        subject: cert.subject().to_string(),
        subject_raw: cert.subject().as_raw().to_vec(),
        issuer: cert.issuer().to_string(),
        issuer_raw: cert.issuer().as_raw().to_vec(),
        serial: cert.raw_serial_as_string(),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        is_ca: bc.as_ref().is_some_and(|b| b.value.ca),
        basic_constraints_present: bc.is_some(),
        path_len: bc.as_ref().and_then(|b| b.value.path_len_constraint),
        key_usage_present: ku.is_some(),
        key_cert_sign: ku.as_ref().is_some_and(|k| k.value.key_cert_sign()),
        digital_signature: ku.as_ref().is_some_and(|k| k.value.digital_signature()),
        public_key,
    };
    Ok(ParsedCert {
        info,
        tbs: cert.tbs_certificate.as_ref().to_vec(),
        signature: cert.signature_value.data.to_vec(),
    })
}

impl CertInfo {
    /// Checks that make a certificate usable as a CA at `position` with
    /// `cas_below` CA certificates between it and the leaf.
    pub(crate) fn check_ca(&self, label: &str, cas_below: usize) -> Result<(), ChainError> {
        if !self.is_ca {
            return Err(ChainError::NotACa {
                cert: label.to_owned(),
                found: if self.basic_constraints_present {
                    "cA=false".to_owned()
                } else {
                    "no basicConstraints".to_owned()
                },
            });
        }
        if let Some(limit) = self.path_len {
            if usize::try_from(limit).is_ok_and(|l| cas_below > l) {
                return Err(ChainError::PathLength {
                    cert: label.to_owned(),
                    limit,
                    found: cas_below,
                });
            }
        }
        if !self.key_cert_sign {
            return Err(ChainError::KeyUsage {
                cert: label.to_owned(),
                expected: "keyCertSign",
            });
        }
        Ok(())
    }

    /// Checks that make a certificate usable as the document signer.
    pub(crate) fn check_leaf(&self, label: &str) -> Result<(), ChainError> {
        if self.is_ca {
            return Err(ChainError::LeafIsCa {
                cert: label.to_owned(),
            });
        }
        if !self.digital_signature {
            return Err(ChainError::KeyUsage {
                cert: label.to_owned(),
                expected: "digitalSignature",
            });
        }
        Ok(())
    }

    /// Validity at `at` (Unix seconds), both bounds inclusive as RFC 5280 says.
    pub(crate) fn check_validity(&self, label: &str, at: i64) -> Result<(), ChainError> {
        if at < self.not_before {
            return Err(ChainError::NotYetValid {
                cert: label.to_owned(),
                not_before: self.not_before,
                at,
            });
        }
        if at > self.not_after {
            return Err(ChainError::Expired {
                cert: label.to_owned(),
                not_after: self.not_after,
                at,
            });
        }
        Ok(())
    }
}

/// Check one link: `subject_der` was issued and signed by `issuer`.
/// Returns the subject's facts. Pure: no cache.
pub(crate) fn verify_link(
    issuer: &CertInfo,
    subject_der: &[u8],
    label: &str,
) -> Result<CertInfo, ChainError> {
    let parsed = parse_cert(subject_der, label)?;
    if parsed.info.issuer_raw != issuer.subject_raw {
        return Err(ChainError::IssuerMismatch {
            cert: label.to_owned(),
            expected: issuer.subject.clone(),
            found: parsed.info.issuer.clone(),
        });
    }
    crypto::verify_p384_sha384_der(&issuer.public_key, &parsed.tbs, &parsed.signature).map_err(
        |_| ChainError::BadSignature {
            cert: label.to_owned(),
        },
    )?;
    Ok(parsed.info)
}

/// A bounded cache of CA links already verified: (issuer DER, subject DER) → the
/// subject's facts.
///
/// The regional, zonal and instance certificates of a host are the same in every
/// document it produces for hours, so most signature checks on a busy verifier
/// are repeats. A hit saves a parse and an ECDSA verification; it never saves a
/// policy check: validity at the verification time, CA and path-length rules are
/// evaluated on every document from the cached facts. Keys are the exact bytes, so
/// a hit means the very same signed bytes were verified before.
#[derive(Debug)]
pub(crate) struct LinkCache {
    capacity: usize,
    inner: Mutex<CacheInner>,
}

#[derive(Debug, Default)]
struct CacheInner {
    map: HashMap<(Vec<u8>, Vec<u8>), CertInfo>,
    order: VecDeque<(Vec<u8>, Vec<u8>)>,
}

impl LinkCache {
    pub(crate) fn new(capacity: usize) -> Self {
        LinkCache {
            capacity,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    /// Verify the link, consulting and filling the cache.
    pub(crate) fn verify_link(
        &self,
        issuer_der: &[u8],
        issuer: &CertInfo,
        subject_der: &[u8],
        label: &str,
    ) -> Result<CertInfo, ChainError> {
        if self.capacity == 0 {
            return verify_link(issuer, subject_der, label);
        }
        let key = (issuer_der.to_vec(), subject_der.to_vec());
        if let Ok(inner) = self.inner.lock() {
            if let Some(info) = inner.map.get(&key) {
                return Ok(info.clone());
            }
        }
        // Verify outside the lock so concurrent verifications do not serialise.
        let info = verify_link(issuer, subject_der, label)?;
        // Leaf certificates are fresh in every document: caching them would only
        // evict the CA links that do repeat.
        if !info.is_ca {
            return Ok(info);
        }
        if let Ok(mut inner) = self.inner.lock() {
            if !inner.map.contains_key(&key) {
                while inner.map.len() >= self.capacity {
                    match inner.order.pop_front() {
                        Some(old) => {
                            inner.map.remove(&old);
                        }
                        None => break,
                    }
                }
                inner.order.push_back(key.clone());
                inner.map.insert(key, info.clone());
            }
        }
        Ok(info)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().map(|i| i.map.len()).unwrap_or(0)
    }
}
