//! Trust anchors: the pinned root a chain must start from.

use crate::chain::{parse_cert, CertInfo};
use crate::crypto;
use crate::error::RootError;

/// AWS Nitro Enclaves root G1, as published by AWS.
const AWS_NITRO_ROOT_G1_PEM: &str = include_str!("../roots/aws-nitro-root-g1.pem");

/// SHA-256 of the DER of AWS Nitro Enclaves root G1, as AWS publishes it. The
/// embedded certificate is checked against it every time it is loaded.
pub const AWS_NITRO_ROOT_G1_SHA256: &str =
    "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b";

/// A root certificate that chains must start from, byte for byte.
#[derive(Debug, Clone)]
pub struct TrustAnchor {
    der: Vec<u8>,
    info: CertInfo,
    sha256: [u8; 32],
}

impl TrustAnchor {
    /// The built-in AWS Nitro Enclaves root G1, checked against its published
    /// SHA-256 fingerprint.
    pub fn aws_nitro_root_g1() -> Result<Self, RootError> {
        let anchor = Self::from_pem_unchecked(AWS_NITRO_ROOT_G1_PEM.as_bytes())?;
        let found = hex::encode(anchor.sha256);
        if found != AWS_NITRO_ROOT_G1_SHA256 {
            return Err(RootError::FingerprintMismatch {
                expected: AWS_NITRO_ROOT_G1_SHA256,
                found,
            });
        }
        Ok(anchor)
    }

    /// Trust a root other than AWS's: a simulator's root in tests, or a root an
    /// operator configured explicitly. Documents signed under it are accepted
    /// as genuine Nitro documents, hence the name.
    pub fn dangerous_from_pem(pem: &[u8]) -> Result<Self, RootError> {
        Self::from_pem_unchecked(pem)
    }

    /// As [`TrustAnchor::dangerous_from_pem`], from DER.
    pub fn dangerous_from_der(der: &[u8]) -> Result<Self, RootError> {
        Self::from_der(der.to_vec())
    }

    fn from_pem_unchecked(pem: &[u8]) -> Result<Self, RootError> {
        let (rest, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| RootError::Pem {
            detail: e.to_string(),
        })?;
        if pem.label != "CERTIFICATE" {
            return Err(RootError::Pem {
                detail: format!("expected a CERTIFICATE block, found {:?}", pem.label),
            });
        }
        if rest.iter().any(|b| !b.is_ascii_whitespace()) {
            return Err(RootError::Pem {
                detail: "more than one PEM block; a root file holds exactly one certificate"
                    .to_owned(),
            });
        }
        Self::from_der(pem.contents)
    }

    fn from_der(der: Vec<u8>) -> Result<Self, RootError> {
        let info = parse_cert(&der, "root")
            .map_err(RootError::Certificate)?
            .info;
        // A root must be able to sign the regional CA below it. Path length is
        // checked per chain.
        info.check_ca("root", 0).map_err(RootError::Certificate)?;
        let sha256 = crypto::sha256(&der);
        Ok(TrustAnchor { der, info, sha256 })
    }

    /// The root's DER encoding.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// SHA-256 of the DER encoding.
    pub fn sha256_fingerprint(&self) -> [u8; 32] {
        self.sha256
    }

    /// The root's subject name.
    pub fn subject(&self) -> &str {
        &self.info.subject
    }

    pub(crate) fn info(&self) -> &CertInfo {
        &self.info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_root_matches_published_fingerprint() {
        let root = TrustAnchor::aws_nitro_root_g1().unwrap();
        assert_eq!(
            hex::encode(root.sha256_fingerprint()),
            AWS_NITRO_ROOT_G1_SHA256
        );
        assert!(root.subject().contains("aws.nitro-enclaves"));
        assert_eq!(root.info().not_after, 2_519_044_085); // 2049-10-28T14:28:05Z
    }

    #[test]
    fn pem_with_two_blocks_is_refused() {
        let two = format!("{AWS_NITRO_ROOT_G1_PEM}{AWS_NITRO_ROOT_G1_PEM}");
        assert!(matches!(
            TrustAnchor::dangerous_from_pem(two.as_bytes()),
            Err(RootError::Pem { .. })
        ));
    }

    #[test]
    fn garbage_pem_is_refused() {
        assert!(matches!(
            TrustAnchor::dangerous_from_pem(b"not a pem"),
            Err(RootError::Pem { .. })
        ));
        assert!(matches!(
            TrustAnchor::dangerous_from_der(&[0x30, 0x03, 0x02, 0x01, 0x00]),
            Err(RootError::Certificate(_))
        ));
    }
}
