//! The simulated certificate chain, shaped like AWS's:
//! root -> regional CA (pathlen 2) -> zonal CA (pathlen 1) -> instance CA
//! (pathlen 0) -> per-document leaf (not a CA). All keys P-384, all
//! signatures ecdsa-with-SHA384, every name marked as simulated.

use aws_lc_rs::rand;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyUsagePurpose,
    SerialNumber,
};
use time::OffsetDateTime;

use super::key::P384Key;
use super::SimError;

/// Organisation of every simulated certificate: never mistaken for AWS's.
pub(crate) const ORGANIZATION: &str = "Kluis Simulated NSM";
const ORGANIZATIONAL_UNIT: &str = "Simulated";
const COUNTRY: &str = "BE";
/// Common name of the simulated root.
pub(crate) const ROOT_COMMON_NAME: &str = "kluis-simulated-root";
/// DNS-like suffix of the simulated CAs (AWS uses `<region>.aws.nitro-enclaves`).
const CA_SUFFIX: &str = "sim-region-1.kluis-simulated-nitro";
/// Suffix of the simulated leaf (AWS uses `<region>.aws`).
const LEAF_SUFFIX: &str = "sim.kluis";

/// Root validity: 30 years of 365 days.
pub(crate) const ROOT_VALIDITY_S: i64 = 946_080_000;
/// Regional CA validity: 30 days.
pub(crate) const REGIONAL_VALIDITY_S: i64 = 2_592_000;
/// Zonal CA validity: 7 days.
pub(crate) const ZONAL_VALIDITY_S: i64 = 604_800;
/// Instance CA validity: 3 days.
pub(crate) const INSTANCE_VALIDITY_S: i64 = 259_200;
/// Leaf validity: 3 hours from the document's time, like the real NSM.
pub(crate) const LEAF_VALIDITY_S: i64 = 10_800;

/// A validity period in whole seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Validity {
    pub(crate) not_before: i64,
    pub(crate) not_after: i64,
}

impl Validity {
    /// `duration_s` seconds from `start_s`.
    pub(crate) fn starting(start_s: i64, duration_s: i64) -> Result<Self, SimError> {
        let not_after = start_s
            .checked_add(duration_s)
            .ok_or(SimError::TimeOutOfRange {
                unix_ms: u64::try_from(start_s).unwrap_or(0),
            })?;
        Ok(Self {
            not_before: start_s,
            not_after,
        })
    }

    pub(crate) fn contains(&self, other: &Validity) -> bool {
        self.not_before <= other.not_before && other.not_after <= self.not_after
    }
}

/// Whole seconds of a Unix time in milliseconds.
pub(crate) fn unix_seconds(unix_ms: u64) -> Result<i64, SimError> {
    i64::try_from(unix_ms / 1000).map_err(|_| SimError::TimeOutOfRange { unix_ms })
}

fn datetime(unix_s: i64) -> Result<OffsetDateTime, SimError> {
    OffsetDateTime::from_unix_timestamp(unix_s).map_err(|_| SimError::TimeOutOfRange {
        unix_ms: u64::try_from(unix_s).unwrap_or(0).saturating_mul(1000),
    })
}

/// `n` random bytes as lowercase hex.
fn random_hex(n: usize) -> Result<String, SimError> {
    let mut bytes = vec![0u8; n];
    rand::fill(&mut bytes).map_err(|_| SimError::Crypto("drawing random bytes"))?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// A random positive 16-byte serial number.
fn random_serial() -> Result<SerialNumber, SimError> {
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes).map_err(|_| SimError::Crypto("drawing a serial number"))?;
    if let Some(first) = bytes.first_mut() {
        // Positive, and 16 bytes long in DER.
        *first = (*first & 0x7f) | 0x40;
    }
    Ok(SerialNumber::from_slice(&bytes))
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CountryName, COUNTRY);
    name.push(DnType::OrganizationName, ORGANIZATION);
    name.push(DnType::OrganizationalUnitName, ORGANIZATIONAL_UNIT);
    name.push(DnType::CommonName, common_name);
    name
}

fn params(
    common_name: &str,
    is_ca: IsCa,
    key_usages: Vec<KeyUsagePurpose>,
    validity: Validity,
    authority_key_id: bool,
) -> Result<CertificateParams, SimError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(common_name);
    params.is_ca = is_ca;
    params.key_usages = key_usages;
    params.not_before = datetime(validity.not_before)?;
    params.not_after = datetime(validity.not_after)?;
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = authority_key_id;
    Ok(params)
}

fn ca_key_usages() -> Vec<KeyUsagePurpose> {
    vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ]
}

/// A certificate authority: its certificate and the issuer that signs with its key.
pub(crate) struct Ca {
    pub(crate) der: Vec<u8>,
    pub(crate) issuer: Issuer<'static, P384Key>,
    pub(crate) validity: Validity,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("der_len", &self.der.len())
            .field("key", self.issuer.key())
            .field("validity", &self.validity)
            .finish()
    }
}

/// Creates the self-signed simulated root with a fresh key.
pub(crate) fn issue_root(validity: Validity) -> Result<Ca, SimError> {
    issue_root_with_key(validity, P384Key::generate()?)
}

/// Creates the self-signed simulated root for an existing key.
pub(crate) fn issue_root_with_key(validity: Validity, key: P384Key) -> Result<Ca, SimError> {
    let params = params(
        ROOT_COMMON_NAME,
        IsCa::Ca(BasicConstraints::Unconstrained),
        ca_key_usages(),
        validity,
        false,
    )?;
    let der = params
        .self_signed(&key)
        .map_err(SimError::cert("root"))?
        .der()
        .to_vec();
    Ok(Ca {
        der,
        issuer: Issuer::new(params, key),
        validity,
    })
}

fn issue_ca(
    parent: &Ca,
    which: &'static str,
    common_name: &str,
    constraint: BasicConstraints,
    key_usages: Vec<KeyUsagePurpose>,
    validity: Validity,
    authority_key_id: bool,
) -> Result<Ca, SimError> {
    let key = P384Key::generate()?;
    let params = params(
        common_name,
        IsCa::Ca(constraint),
        key_usages,
        validity,
        authority_key_id,
    )?;
    let der = params
        .signed_by(&key, &parent.issuer)
        .map_err(SimError::cert(which))?
        .der()
        .to_vec();
    Ok(Ca {
        der,
        issuer: Issuer::new(params, key),
        validity,
    })
}

/// The regional, zonal and instance CAs below the root.
#[derive(Debug)]
pub(crate) struct Intermediates {
    pub(crate) regional: Ca,
    pub(crate) zonal: Ca,
    pub(crate) instance: Ca,
}

impl Intermediates {
    /// Issues a fresh regional/zonal/instance chain valid from `now_s`.
    pub(crate) fn issue(root: &Ca, instance_id: &str, now_s: i64) -> Result<Self, SimError> {
        let regional = issue_ca(
            root,
            "regional CA",
            &format!("{}.{CA_SUFFIX}", random_hex(8)?),
            BasicConstraints::Constrained(2),
            ca_key_usages(),
            Validity::starting(now_s, REGIONAL_VALIDITY_S)?,
            true,
        )?;
        let zonal = issue_ca(
            &regional,
            "zonal CA",
            &format!("{}.zonal.{CA_SUFFIX}", random_hex(8)?),
            BasicConstraints::Constrained(1),
            ca_key_usages(),
            Validity::starting(now_s, ZONAL_VALIDITY_S)?,
            true,
        )?;
        let instance = issue_ca(
            &zonal,
            "instance CA",
            &format!("{instance_id}.{CA_SUFFIX}"),
            BasicConstraints::Constrained(0),
            vec![KeyUsagePurpose::KeyCertSign],
            Validity::starting(now_s, INSTANCE_VALIDITY_S)?,
            false,
        )?;
        Ok(Self {
            regional,
            zonal,
            instance,
        })
    }

    /// Whether every CA of the chain is valid throughout `period`.
    pub(crate) fn covers(&self, period: &Validity) -> bool {
        [&self.regional, &self.zonal, &self.instance]
            .iter()
            .all(|ca| ca.validity.contains(period))
    }

    /// The `cabundle` of a document: `[root, regional, zonal, instance]`.
    pub(crate) fn cabundle(&self, root_der: &[u8]) -> Vec<Vec<u8>> {
        vec![
            root_der.to_vec(),
            self.regional.der.clone(),
            self.zonal.der.clone(),
            self.instance.der.clone(),
        ]
    }
}

/// Issues a leaf certificate (not a CA, digitalSignature) with a fresh key.
pub(crate) fn issue_leaf(
    instance: &Ca,
    module_id: &str,
    validity: Validity,
) -> Result<(Vec<u8>, P384Key), SimError> {
    let key = P384Key::generate()?;
    let params = params(
        &format!("{module_id}.{LEAF_SUFFIX}"),
        IsCa::ExplicitNoCa,
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::ContentCommitment,
        ],
        validity,
        false,
    )?;
    let der = params
        .signed_by(&key, &instance.issuer)
        .map_err(SimError::cert("leaf"))?
        .der()
        .to_vec();
    Ok((der, key))
}
