//! A simulated Nitro Secure Module for tests and local runs.
//!
//! [`SimulatedNsm`] answers the same requests as the real module, with the
//! same rules and error codes:
//!
//! - 32 PCRs of 48 bytes (SHA-384). PCRs 0–15 are locked from boot; 16–31
//!   start at zero and can be extended (`PCR = SHA-384(PCR || data)`) until
//!   locked with `LockPCR` or `LockPCRs { range }` (which locks `0..range`).
//! - `ReadOnlyIndex` for extending a locked PCR, `InvalidIndex` for an index
//!   ≥ 32 (or a range > 32), `InputTooLarge` for more than 1024 bytes of
//!   extension data or of `user_data`, `nonce` or `public_key`.
//! - `GetRandom` returns 256 random bytes.
//! - `Attestation` returns an untagged COSE_Sign1 (ES384) over a CBOR payload
//!   with the real module's fields in the real module's order, absent
//!   optional fields as CBOR null, PCRs 0–15, a fresh leaf certificate valid
//!   for three hours from the document's time, and the `cabundle`
//!   `[root, regional, zonal, instance]`.
//!
//! The certificate chain is rooted in a [`SimRoot`], never in AWS's root, and
//! every certificate name says "Kluis Simulated NSM". Time comes from an
//! injectable [`Clock`], so tests can produce documents at any time; the CA
//! certificates below the root are re-issued whenever the clock leaves the
//! period they cover.
//!
//! # Test tooling
//!
//! For negative tests of a verifier, [`SimulatedNsm::dangerous_attest_with_key`],
//! [`SimulatedNsm::dangerous_issue_leaf`] and
//! [`SimulatedNsm::dangerous_sign_payload`] hand out the per-document leaf key
//! so that a test can sign arbitrary (mutated) payloads under the simulator's
//! chain. They exist to build invalid documents on purpose and have no use in
//! an enclave.
//!
//! ```
//! use std::sync::Arc;
//! use kluis_nsm::sim::{FixedClock, SimConfig, SimulatedNsm};
//!
//! let clock = Arc::new(FixedClock::new(1_700_000_000_000));
//! let nsm = SimulatedNsm::new(SimConfig::default().with_clock(clock.clone()))?;
//! let signed = nsm.dangerous_attest_with_key(None, Some(b"nonce"), None)?;
//! assert_eq!(signed.timestamp_ms, 1_700_000_000_000);
//!
//! // Re-sign a mutated payload with the same leaf: the signature is valid,
//! // the content is whatever the test wants a verifier to reject.
//! let mut payload = signed.payload.clone();
//! if let Some(last) = payload.last_mut() {
//!     *last ^= 1;
//! }
//! let forged = signed.leaf.dangerous_sign_payload(&payload)?;
//! # let _ = forged;
//! # Ok::<(), kluis_nsm::sim::SimError>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ciborium::Value;
use zeroize::Zeroizing;

use crate::{Digest, ErrorCode, NsmError, Request, Response, MAX_INPUT_LEN, MAX_PCRS, PCR_LEN};

mod chain;
mod clock;
pub mod cose;
mod error;
mod key;
pub mod measure;
mod root;

pub use clock::{Clock, FixedClock, SystemClock};
pub use error::SimError;
pub use root::{RootOrigin, SimRoot, ROOT_CERT_FILE, ROOT_KEY_FILE};

use chain::{Intermediates, Validity, LEAF_VALIDITY_S};
use key::P384Key;
use measure::ZERO_PCR;

/// Module id the simulator reports unless configured otherwise. It has the
/// shape of a real one (`i-<instance>-enc<enclave>`) and says it is simulated.
pub const DEFAULT_MODULE_ID: &str = "i-0000000000000000-enc0000000000000000-sim";

/// Number of PCRs locked from boot (0–15), and included in documents.
pub const BOOT_LOCKED_PCRS: u16 = 16;

/// Version the simulator reports in `DescribeNSM`.
pub const SIM_VERSION: (u16, u16, u16) = (1, 0, 0);

/// Number of random bytes `GetRandom` returns.
pub const RANDOM_LEN: usize = 256;

/// Largest module id the simulator accepts.
const MAX_MODULE_ID_LEN: usize = 128;

/// An enclave "image" the simulator measures into PCR0/1/2 (and PCR8).
#[derive(Clone, PartialEq, Eq)]
pub struct ImageMeasurement {
    /// The image: any bytes (an EIF, a binary, a label).
    pub image: Vec<u8>,
    /// DER of the certificate the image was signed with; sets PCR8.
    pub signing_certificate: Option<Vec<u8>>,
}

impl fmt::Debug for ImageMeasurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageMeasurement")
            .field("image_len", &self.image.len())
            .field(
                "signing_certificate_len",
                &self.signing_certificate.as_ref().map(Vec::len),
            )
            .finish()
    }
}

/// Configuration of a [`SimulatedNsm`].
///
/// Boot PCRs are computed in this order: all of 0–15 start at zero; an
/// [`ImageMeasurement`] sets PCR0/1/2 (see [`measure::image_pcrs`]) and, with a
/// signing certificate, PCR8 (see [`measure::signer_pcr`]); `boot_pcrs` then
/// sets (or overrides) any of 0–15; finally `debug` zeroes PCR0/1/2, as in a
/// real debug-mode enclave (PCR3, PCR4 and the others keep their values).
#[derive(Clone)]
pub struct SimConfig {
    /// The module id reported by `DescribeNSM` and in documents.
    pub module_id: String,
    /// Explicit boot values of PCRs among 0–15.
    pub boot_pcrs: BTreeMap<u16, [u8; PCR_LEN]>,
    /// The enclave image to measure into PCR0/1/2 (and PCR8).
    pub image: Option<ImageMeasurement>,
    /// Simulate a debug-mode enclave: PCR0/1/2 read as zeros.
    pub debug: bool,
    /// Source of the time for documents and certificates.
    pub clock: Arc<dyn Clock>,
    /// The root CA; `None` generates an in-memory root at the clock's time.
    pub root: Option<Arc<SimRoot>>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            module_id: DEFAULT_MODULE_ID.to_owned(),
            boot_pcrs: BTreeMap::new(),
            image: None,
            debug: false,
            clock: Arc::new(SystemClock),
            root: None,
        }
    }
}

impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("module_id", &self.module_id)
            .field("boot_pcrs", &self.boot_pcrs.keys().collect::<Vec<_>>())
            .field("image", &self.image)
            .field("debug", &self.debug)
            .field("clock", &self.clock)
            .field("root", &self.root)
            .finish()
    }
}

impl SimConfig {
    /// Uses `clock` for documents and certificates.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Uses `root` as the root CA.
    #[must_use]
    pub fn with_root(mut self, root: Arc<SimRoot>) -> Self {
        self.root = Some(root);
        self
    }

    /// Reports `module_id`.
    #[must_use]
    pub fn with_module_id(mut self, module_id: impl Into<String>) -> Self {
        self.module_id = module_id.into();
        self
    }

    /// Sets the boot value of PCR `index` (0–15).
    #[must_use]
    pub fn with_boot_pcr(mut self, index: u16, value: [u8; PCR_LEN]) -> Self {
        self.boot_pcrs.insert(index, value);
        self
    }

    /// Measures `image` (and optionally its signing certificate) into PCR0/1/2 (and PCR8).
    #[must_use]
    pub fn with_image(mut self, image: impl Into<Vec<u8>>, signing_cert: Option<Vec<u8>>) -> Self {
        self.image = Some(ImageMeasurement {
            image: image.into(),
            signing_certificate: signing_cert,
        });
        self
    }

    /// Simulates a debug-mode enclave (PCR0/1/2 read as zeros).
    #[must_use]
    pub fn with_debug(mut self, debug: bool) -> Self {
        self.debug = debug;
        self
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.module_id.is_empty() {
            return Err(SimError::InvalidConfig("the module id is empty".to_owned()));
        }
        if self.module_id.len() > MAX_MODULE_ID_LEN {
            return Err(SimError::InvalidConfig(format!(
                "the module id is {} bytes long, at most {MAX_MODULE_ID_LEN} are allowed",
                self.module_id.len()
            )));
        }
        if self.module_id.chars().any(char::is_control) {
            return Err(SimError::InvalidConfig(
                "the module id contains control characters".to_owned(),
            ));
        }
        if let Some(index) = self.boot_pcrs.keys().find(|i| **i >= BOOT_LOCKED_PCRS) {
            return Err(SimError::InvalidConfig(format!(
                "boot PCR {index} is not one of 0..=15 (PCRs 16..=31 start at zero)"
            )));
        }
        Ok(())
    }

    /// The boot values of PCRs 0–15 this configuration describes.
    pub fn boot_pcr_values(&self) -> [[u8; PCR_LEN]; 16] {
        let mut pcrs = [ZERO_PCR; 16];
        if let Some(image) = &self.image {
            for (slot, value) in pcrs.iter_mut().zip(measure::image_pcrs(&image.image)) {
                *slot = value;
            }
            if let (Some(cert), Some(slot)) = (&image.signing_certificate, pcrs.get_mut(8)) {
                *slot = measure::signer_pcr(cert);
            }
        }
        for (index, value) in &self.boot_pcrs {
            if let Some(slot) = pcrs.get_mut(usize::from(*index)) {
                *slot = *value;
            }
        }
        if self.debug {
            for slot in pcrs.iter_mut().take(3) {
                *slot = ZERO_PCR;
            }
        }
        pcrs
    }
}

#[derive(Debug, Clone, Copy)]
struct Pcr {
    value: [u8; PCR_LEN],
    locked: bool,
}

#[derive(Debug)]
struct State {
    pcrs: [Pcr; 32],
    chain: Intermediates,
}

/// A simulated Nitro Secure Module. See the [module documentation](self).
pub struct SimulatedNsm {
    module_id: String,
    instance_id: String,
    clock: Arc<dyn Clock>,
    root: Arc<SimRoot>,
    state: Mutex<State>,
}

impl fmt::Debug for SimulatedNsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatedNsm")
            .field("module_id", &self.module_id)
            .field("clock", &self.clock)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl SimulatedNsm {
    /// Boots a simulated module: sets the boot PCRs, locks PCRs 0–15, and
    /// issues the regional, zonal and instance CAs at the clock's time.
    pub fn new(config: SimConfig) -> Result<Self, SimError> {
        config.validate()?;
        let now_ms = config.clock.now_unix_ms();
        let root = match &config.root {
            Some(root) => Arc::clone(root),
            None => Arc::new(SimRoot::generate_at(now_ms)?),
        };
        let instance_id = config
            .module_id
            .split("-enc")
            .next()
            .unwrap_or(&config.module_id)
            .to_owned();
        let chain = Intermediates::issue(root.ca(), &instance_id, chain::unix_seconds(now_ms)?)?;

        let mut pcrs = [Pcr {
            value: ZERO_PCR,
            locked: false,
        }; 32];
        for (pcr, value) in pcrs.iter_mut().zip(config.boot_pcr_values()) {
            *pcr = Pcr {
                value,
                locked: true,
            };
        }
        Ok(Self {
            module_id: config.module_id,
            instance_id,
            clock: config.clock,
            root,
            state: Mutex::new(State { pcrs, chain }),
        })
    }

    /// The root CA documents chain up to.
    pub fn root(&self) -> &Arc<SimRoot> {
        &self.root
    }

    /// The module id.
    pub fn module_id(&self) -> &str {
        &self.module_id
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The `cabundle` the next document would carry, `[root, regional, zonal,
    /// instance]` (DER), if the clock does not leave the CAs' validity first.
    pub fn cabundle(&self) -> Vec<Vec<u8>> {
        self.lock().chain.cabundle(self.root.root_der())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic in another thread: every
        // update is a single assignment.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Issues a fresh leaf at the clock's time, re-issuing the CAs below the
    /// root first if they do not cover the leaf's three hours.
    fn issue_leaf_now(&self) -> Result<(SimLeaf, [[u8; PCR_LEN]; 16]), SimError> {
        let now_ms = self.clock.now_unix_ms();
        let validity = Validity::starting(chain::unix_seconds(now_ms)?, LEAF_VALIDITY_S)?;
        let mut state = self.lock();
        if !state.chain.covers(&validity) {
            state.chain =
                Intermediates::issue(self.root.ca(), &self.instance_id, validity.not_before)?;
        }
        let (certificate, key) =
            chain::issue_leaf(&state.chain.instance, &self.module_id, validity)?;
        let cabundle = state.chain.cabundle(self.root.root_der());
        let mut pcrs = [ZERO_PCR; 16];
        for (out, pcr) in pcrs.iter_mut().zip(state.pcrs.iter()) {
            *out = pcr.value;
        }
        drop(state);
        Ok((
            SimLeaf {
                certificate,
                cabundle,
                key,
                timestamp_ms: now_ms,
            },
            pcrs,
        ))
    }

    /// Produces an attestation document as the `Attestation` request does,
    /// and also returns the payload and the leaf (with its private key).
    ///
    /// Test tooling: use it to take a valid document apart and re-sign
    /// mutated payloads with [`SimLeaf::dangerous_sign_payload`].
    pub fn dangerous_attest_with_key(
        &self,
        user_data: Option<&[u8]>,
        nonce: Option<&[u8]>,
        public_key: Option<&[u8]>,
    ) -> Result<SignedDocument, SimError> {
        for field in [user_data, nonce, public_key].into_iter().flatten() {
            if field.len() > MAX_INPUT_LEN {
                return Err(NsmError::InputTooLarge.into());
            }
        }
        let (leaf, pcrs) = self.issue_leaf_now()?;
        let payload = encode_payload(&PayloadFields {
            module_id: &self.module_id,
            timestamp_ms: leaf.timestamp_ms,
            pcrs: &pcrs,
            certificate: &leaf.certificate,
            cabundle: &leaf.cabundle,
            public_key,
            user_data,
            nonce,
        })?;
        let document = leaf.dangerous_sign_payload(&payload)?;
        Ok(SignedDocument {
            document,
            payload,
            timestamp_ms: leaf.timestamp_ms,
            leaf,
        })
    }

    /// Issues a fresh leaf certificate and key under the current chain, at
    /// the clock's time, without building a document.
    ///
    /// Test tooling: build any payload around [`SimLeaf::certificate_der`] and
    /// [`SimLeaf::cabundle`], then sign it with [`SimLeaf::dangerous_sign_payload`].
    pub fn dangerous_issue_leaf(&self) -> Result<SimLeaf, SimError> {
        Ok(self.issue_leaf_now()?.0)
    }

    /// Wraps an arbitrary `payload` into a COSE_Sign1 signed by a fresh leaf
    /// under the simulator's current chain.
    ///
    /// Test tooling: the payload is signed as given, so it names whatever
    /// certificate the caller put in it (usually not this leaf).
    pub fn dangerous_sign_payload(&self, payload: &[u8]) -> Result<SignedDocument, SimError> {
        let leaf = self.dangerous_issue_leaf()?;
        let document = leaf.dangerous_sign_payload(payload)?;
        Ok(SignedDocument {
            document,
            payload: payload.to_vec(),
            timestamp_ms: leaf.timestamp_ms,
            leaf,
        })
    }

    fn describe(&self) -> Response {
        let state = self.lock();
        let locked_pcrs: BTreeSet<u16> = (0..MAX_PCRS)
            .zip(state.pcrs.iter())
            .filter(|(_, pcr)| pcr.locked)
            .map(|(index, _)| index)
            .collect();
        Response::DescribeNSM {
            version_major: SIM_VERSION.0,
            version_minor: SIM_VERSION.1,
            version_patch: SIM_VERSION.2,
            module_id: self.module_id.clone(),
            max_pcrs: MAX_PCRS,
            locked_pcrs,
            digest: Digest::SHA384,
        }
    }

    fn attestation(
        &self,
        user_data: Option<&[u8]>,
        nonce: Option<&[u8]>,
        public_key: Option<&[u8]>,
    ) -> Response {
        match self.dangerous_attest_with_key(user_data, nonce, public_key) {
            Ok(signed) => Response::Attestation {
                document: signed.document,
            },
            Err(SimError::Nsm(err)) => {
                Response::Error(err.code().unwrap_or(ErrorCode::InternalError))
            }
            Err(_) => Response::Error(ErrorCode::InternalError),
        }
    }
}

impl crate::Nsm for SimulatedNsm {
    fn process(&self, request: Request) -> Response {
        match request {
            Request::DescribePCR { index } => match self.lock().pcrs.get(usize::from(index)) {
                Some(pcr) => Response::DescribePCR {
                    lock: pcr.locked,
                    data: pcr.value.to_vec(),
                },
                None => Response::Error(ErrorCode::InvalidIndex),
            },
            Request::ExtendPCR { index, data } => {
                let mut state = self.lock();
                let Some(pcr) = state.pcrs.get_mut(usize::from(index)) else {
                    return Response::Error(ErrorCode::InvalidIndex);
                };
                if data.len() > MAX_INPUT_LEN {
                    return Response::Error(ErrorCode::InputTooLarge);
                }
                if pcr.locked {
                    return Response::Error(ErrorCode::ReadOnlyIndex);
                }
                pcr.value = measure::extend(&pcr.value, &data);
                Response::ExtendPCR {
                    data: pcr.value.to_vec(),
                }
            }
            Request::LockPCR { index } => match self.lock().pcrs.get_mut(usize::from(index)) {
                Some(pcr) => {
                    pcr.locked = true;
                    Response::LockPCR
                }
                None => Response::Error(ErrorCode::InvalidIndex),
            },
            Request::LockPCRs { range } => {
                if range > MAX_PCRS {
                    return Response::Error(ErrorCode::InvalidIndex);
                }
                let mut state = self.lock();
                for pcr in state.pcrs.iter_mut().take(usize::from(range)) {
                    pcr.locked = true;
                }
                Response::LockPCRs
            }
            Request::DescribeNSM => self.describe(),
            Request::Attestation {
                user_data,
                nonce,
                public_key,
            } => self.attestation(
                user_data.as_deref().map(|b| b.as_slice()),
                nonce.as_deref().map(|b| b.as_slice()),
                public_key.as_deref().map(|b| b.as_slice()),
            ),
            Request::GetRandom => {
                let mut random = Zeroizing::new(vec![0u8; RANDOM_LEN]);
                match aws_lc_rs::rand::fill(&mut random) {
                    Ok(()) => Response::GetRandom {
                        random: random.to_vec(),
                    },
                    Err(_) => Response::Error(ErrorCode::InternalError),
                }
            }
            _ => Response::Error(ErrorCode::InvalidOperation),
        }
    }
}

/// A leaf certificate of the simulated chain and its private key.
///
/// Test tooling: it can sign anything, so it exists to build documents a
/// verifier must reject.
pub struct SimLeaf {
    certificate: Vec<u8>,
    cabundle: Vec<Vec<u8>>,
    key: P384Key,
    timestamp_ms: u64,
}

impl fmt::Debug for SimLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimLeaf")
            .field("certificate_len", &self.certificate.len())
            .field("cabundle_len", &self.cabundle.len())
            .field("key", &self.key)
            .field("timestamp_ms", &self.timestamp_ms)
            .finish()
    }
}

impl SimLeaf {
    /// The leaf certificate, DER (valid for three hours from [`Self::timestamp_ms`]).
    pub fn certificate_der(&self) -> &[u8] {
        &self.certificate
    }

    /// The CA certificates, DER, `[root, regional, zonal, instance]`.
    pub fn cabundle(&self) -> &[Vec<u8>] {
        &self.cabundle
    }

    /// The clock's time when the leaf was issued, ms since the Unix epoch.
    pub fn timestamp_ms(&self) -> u64 {
        self.timestamp_ms
    }

    /// The leaf's public key as an uncompressed P-384 point (97 bytes).
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key()
    }

    /// The leaf's private key, PKCS#8 DER, in a zeroizing buffer.
    pub fn dangerous_private_key_pkcs8(&self) -> Zeroizing<Vec<u8>> {
        self.key.pkcs8().clone()
    }

    /// Signs `message` with ECDSA P-384 SHA-384, returning the raw 96-byte
    /// `r || s` (for tests that build their own `Sig_structure`).
    pub fn dangerous_sign(&self, message: &[u8]) -> Result<Vec<u8>, SimError> {
        self.key.sign_fixed(message)
    }

    /// Wraps `payload` into an untagged COSE_Sign1 (protected header
    /// `{1: -35}`, empty unprotected header) signed by this leaf.
    pub fn dangerous_sign_payload(&self, payload: &[u8]) -> Result<Vec<u8>, SimError> {
        let to_sign = cose::sig_structure(&cose::PROTECTED_ES384, payload)?;
        let signature = self.key.sign_fixed(&to_sign)?;
        cose::encode_sign1(&cose::PROTECTED_ES384, payload, &signature)
    }
}

/// A signed document with the material that made it (test tooling).
pub struct SignedDocument {
    /// The COSE_Sign1 bytes.
    pub document: Vec<u8>,
    /// The payload that was signed, as encoded in the document.
    pub payload: Vec<u8>,
    /// The document's time (the clock's), ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// The leaf that signed it, with its key and chain.
    pub leaf: SimLeaf,
}

impl fmt::Debug for SignedDocument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedDocument")
            .field("document_len", &self.document.len())
            .field("payload_len", &self.payload.len())
            .field("timestamp_ms", &self.timestamp_ms)
            .field("leaf", &self.leaf)
            .finish()
    }
}

struct PayloadFields<'a> {
    module_id: &'a str,
    timestamp_ms: u64,
    pcrs: &'a [[u8; PCR_LEN]],
    certificate: &'a [u8],
    cabundle: &'a [Vec<u8>],
    public_key: Option<&'a [u8]>,
    user_data: Option<&'a [u8]>,
    nonce: Option<&'a [u8]>,
}

fn optional_bytes(field: Option<&[u8]>) -> Value {
    field.map_or(Value::Null, |bytes| Value::Bytes(bytes.to_vec()))
}

/// The payload map, definite length, keys in the real module's order.
fn encode_payload(fields: &PayloadFields<'_>) -> Result<Vec<u8>, SimError> {
    let text = |key: &str| Value::Text(key.to_owned());
    let pcrs = (0u64..)
        .zip(fields.pcrs)
        .map(|(index, value)| (Value::Integer(index.into()), Value::Bytes(value.to_vec())))
        .collect();
    let map = Value::Map(vec![
        (text("module_id"), text(fields.module_id)),
        (text("digest"), text("SHA384")),
        (
            text("timestamp"),
            Value::Integer(fields.timestamp_ms.into()),
        ),
        (text("pcrs"), Value::Map(pcrs)),
        (
            text("certificate"),
            Value::Bytes(fields.certificate.to_vec()),
        ),
        (
            text("cabundle"),
            Value::Array(fields.cabundle.iter().cloned().map(Value::Bytes).collect()),
        ),
        (text("public_key"), optional_bytes(fields.public_key)),
        (text("user_data"), optional_bytes(fields.user_data)),
        (text("nonce"), optional_bytes(fields.nonce)),
    ]);
    let mut out = Vec::new();
    ciborium::into_writer(&map, &mut out).map_err(|err| SimError::Cbor(err.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests;
