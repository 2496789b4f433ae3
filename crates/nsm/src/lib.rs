//! The Nitro Secure Module (NSM) seam of Kluis.
//!
//! An enclave asks the NSM for attestation documents, random bytes and PCR
//! operations. This crate puts one trait, [`Nsm`], between the enclave and the
//! module, speaking the request and response types of the
//! [`aws_nitro_enclaves_nsm_api`] crate, with two implementations:
//!
//! - [`NsmDevice`] (feature `device`, on by default): the real module behind
//!   `/dev/nsm`. It owns the file descriptor and closes it when dropped. The
//!   ioctl itself lives in the nsm-api crate's driver; this crate stays free of
//!   `unsafe`.
//! - [`sim::SimulatedNsm`]: a simulator for tests and local runs that behaves
//!   like the real module (32 PCRs, locking rules, real error codes and size
//!   limits) and signs real ES384 COSE_Sign1 attestation documents under a
//!   certificate chain shaped like AWS's, rooted in a *simulated* root
//!   ([`sim::SimRoot`]) that a verifier trusts only when explicitly told to.
//!
//! Which one an enclave uses is a matter of configuration; nothing here falls
//! back from the device to the simulator.
//!
//! The free functions ([`attest`], [`describe_nsm`], [`describe_pcr`],
//! [`extend_pcr`], [`lock_pcr`], [`lock_pcrs`], [`get_random`]) wrap the
//! request/response exchange and turn `Response::Error(code)` into a typed
//! [`NsmError`].
//!
//! ```
//! use kluis_nsm::sim::{SimConfig, SimulatedNsm};
//!
//! let nsm = SimulatedNsm::new(SimConfig::default())?;
//! let document = kluis_nsm::attest(&nsm, Some(b"request hash"), Some(b"nonce"), None)?;
//! assert_eq!(document.first(), Some(&0x84)); // an untagged COSE_Sign1 array
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

use std::collections::BTreeSet;
use std::sync::Arc;

pub use aws_nitro_enclaves_nsm_api::api::{Digest, ErrorCode, Request, Response};
use serde_bytes::ByteBuf;
use zeroize::Zeroizing;

#[cfg(feature = "device")]
mod device;
#[cfg(feature = "sim")]
pub mod sim;

#[cfg(feature = "device")]
pub use device::NsmDevice;

/// Number of PCRs the Nitro Secure Module provides.
pub const MAX_PCRS: u16 = 32;

/// Length in bytes of a PCR value (the module's digest is SHA-384).
pub const PCR_LEN: usize = 48;

/// Largest `user_data`, `nonce` or `public_key` the module accepts in an
/// attestation request, and the largest `data` it accepts in `ExtendPCR`.
pub const MAX_INPUT_LEN: usize = 1024;

/// A Nitro Secure Module: the real device or a simulator.
///
/// The module answers every request with a response; errors are answered as
/// `Response::Error(code)`, never by panicking. Use the free functions of
/// this crate for typed results.
pub trait Nsm: Send + Sync {
    /// Sends one request to the module and returns its response.
    fn process(&self, request: Request) -> Response;
}

impl<T: Nsm + ?Sized> Nsm for &T {
    fn process(&self, request: Request) -> Response {
        (**self).process(request)
    }
}

impl<T: Nsm + ?Sized> Nsm for Box<T> {
    fn process(&self, request: Request) -> Response {
        (**self).process(request)
    }
}

impl<T: Nsm + ?Sized> Nsm for Arc<T> {
    fn process(&self, request: Request) -> Response {
        (**self).process(request)
    }
}

/// An error from the Nitro Secure Module or from reaching it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NsmError {
    /// The module rejected an argument of the request.
    #[error("NSM error: invalid argument")]
    InvalidArgument,
    /// The PCR index (or range) is outside the module's 32 PCRs.
    #[error("NSM error: invalid PCR index")]
    InvalidIndex,
    /// The module reported an invalid response.
    #[error("NSM error: invalid response")]
    InvalidResponse,
    /// The PCR is locked and cannot be extended.
    #[error("NSM error: PCR is locked (read-only index)")]
    ReadOnlyIndex,
    /// The module does not support this operation.
    #[error("NSM error: invalid operation")]
    InvalidOperation,
    /// The module's buffer was too small for the answer.
    #[error("NSM error: buffer too small")]
    BufferTooSmall,
    /// An input exceeded the module's limit (1024 bytes for user data, nonce,
    /// public key and PCR extension data).
    #[error("NSM error: input too large (at most {MAX_INPUT_LEN} bytes per field)")]
    InputTooLarge,
    /// The module failed internally.
    #[error("NSM error: internal error")]
    InternalError,
    /// The module answered with a response of the wrong kind.
    #[error("NSM answered {request} with an unexpected response ({found})")]
    UnexpectedResponse {
        /// The request that was sent.
        request: &'static str,
        /// The kind of response that came back.
        found: &'static str,
    },
    /// The module's answer was malformed (for example a PCR of the wrong length).
    #[error("NSM answered {request} with a malformed response: {reason}")]
    MalformedResponse {
        /// The request that was sent.
        request: &'static str,
        /// What was wrong with it.
        reason: &'static str,
    },
    /// The NSM device could not be opened.
    #[error(
        "cannot open the NSM device {path}: {source} (is this running inside a Nitro Enclave?)"
    )]
    DeviceUnavailable {
        /// The device path.
        path: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

impl NsmError {
    /// Maps an NSM error code to the corresponding error.
    ///
    /// `ErrorCode::Success` inside an error response is itself a protocol
    /// violation and maps to [`NsmError::InvalidResponse`].
    pub fn from_code(code: &ErrorCode) -> Self {
        match code {
            ErrorCode::InvalidArgument => Self::InvalidArgument,
            ErrorCode::InvalidIndex => Self::InvalidIndex,
            ErrorCode::InvalidResponse | ErrorCode::Success => Self::InvalidResponse,
            ErrorCode::ReadOnlyIndex => Self::ReadOnlyIndex,
            ErrorCode::InvalidOperation => Self::InvalidOperation,
            ErrorCode::BufferTooSmall => Self::BufferTooSmall,
            ErrorCode::InputTooLarge => Self::InputTooLarge,
            ErrorCode::InternalError => Self::InternalError,
        }
    }

    /// The NSM error code this error stands for, if it came from the module.
    pub fn code(&self) -> Option<ErrorCode> {
        Some(match self {
            Self::InvalidArgument => ErrorCode::InvalidArgument,
            Self::InvalidIndex => ErrorCode::InvalidIndex,
            Self::InvalidResponse => ErrorCode::InvalidResponse,
            Self::ReadOnlyIndex => ErrorCode::ReadOnlyIndex,
            Self::InvalidOperation => ErrorCode::InvalidOperation,
            Self::BufferTooSmall => ErrorCode::BufferTooSmall,
            Self::InputTooLarge => ErrorCode::InputTooLarge,
            Self::InternalError => ErrorCode::InternalError,
            Self::UnexpectedResponse { .. }
            | Self::MalformedResponse { .. }
            | Self::DeviceUnavailable { .. } => return None,
        })
    }
}

/// What `DescribeNSM` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct NsmDescription {
    /// Module version as (major, minor, patch).
    pub version: (u16, u16, u16),
    /// The module id (the enclave's id, `i-...-enc...`).
    pub module_id: String,
    /// Number of PCRs.
    pub max_pcrs: u16,
    /// PCRs that are currently locked.
    pub locked_pcrs: BTreeSet<u16>,
    /// The PCR digest algorithm.
    pub digest: Digest,
}

/// A PCR as `DescribePCR` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrDescription {
    /// Whether the PCR is locked (can no longer be extended).
    pub locked: bool,
    /// The PCR's current value.
    pub value: [u8; PCR_LEN],
}

fn response_kind(response: &Response) -> &'static str {
    match response {
        Response::DescribePCR { .. } => "DescribePCR",
        Response::ExtendPCR { .. } => "ExtendPCR",
        Response::LockPCR => "LockPCR",
        Response::LockPCRs => "LockPCRs",
        Response::DescribeNSM { .. } => "DescribeNSM",
        Response::Attestation { .. } => "Attestation",
        Response::GetRandom { .. } => "GetRandom",
        Response::Error(_) => "Error",
        _ => "unknown",
    }
}

fn unexpected(request: &'static str, response: &Response) -> NsmError {
    match response {
        Response::Error(code) => NsmError::from_code(code),
        other => NsmError::UnexpectedResponse {
            request,
            found: response_kind(other),
        },
    }
}

fn pcr_value(request: &'static str, data: &[u8]) -> Result<[u8; PCR_LEN], NsmError> {
    <[u8; PCR_LEN]>::try_from(data).map_err(|_| NsmError::MalformedResponse {
        request,
        reason: "PCR value is not 48 bytes",
    })
}

/// Asks the module for an attestation document carrying the given fields.
///
/// Returns the raw COSE_Sign1 bytes exactly as the module produced them.
/// Each field may be at most [`MAX_INPUT_LEN`] bytes.
pub fn attest<N: Nsm + ?Sized>(
    nsm: &N,
    user_data: Option<&[u8]>,
    nonce: Option<&[u8]>,
    public_key: Option<&[u8]>,
) -> Result<Vec<u8>, NsmError> {
    let request = Request::Attestation {
        user_data: user_data.map(ByteBuf::from),
        nonce: nonce.map(ByteBuf::from),
        public_key: public_key.map(ByteBuf::from),
    };
    match nsm.process(request) {
        Response::Attestation { document } => Ok(document),
        other => Err(unexpected("Attestation", &other)),
    }
}

/// Asks the module to describe itself.
pub fn describe_nsm<N: Nsm + ?Sized>(nsm: &N) -> Result<NsmDescription, NsmError> {
    match nsm.process(Request::DescribeNSM) {
        Response::DescribeNSM {
            version_major,
            version_minor,
            version_patch,
            module_id,
            max_pcrs,
            locked_pcrs,
            digest,
        } => Ok(NsmDescription {
            version: (version_major, version_minor, version_patch),
            module_id,
            max_pcrs,
            locked_pcrs,
            digest,
        }),
        other => Err(unexpected("DescribeNSM", &other)),
    }
}

/// Reads a PCR and whether it is locked.
pub fn describe_pcr<N: Nsm + ?Sized>(nsm: &N, index: u16) -> Result<PcrDescription, NsmError> {
    match nsm.process(Request::DescribePCR { index }) {
        Response::DescribePCR { lock, data } => Ok(PcrDescription {
            locked: lock,
            value: pcr_value("DescribePCR", &data)?,
        }),
        other => Err(unexpected("DescribePCR", &other)),
    }
}

/// Extends a PCR with `data` (`PCR = SHA-384(PCR || data)`) and returns the new value.
pub fn extend_pcr<N: Nsm + ?Sized>(
    nsm: &N,
    index: u16,
    data: &[u8],
) -> Result<[u8; PCR_LEN], NsmError> {
    let request = Request::ExtendPCR {
        index,
        data: data.to_vec(),
    };
    match nsm.process(request) {
        Response::ExtendPCR { data } => pcr_value("ExtendPCR", &data),
        other => Err(unexpected("ExtendPCR", &other)),
    }
}

/// Locks one PCR so it can no longer be extended.
pub fn lock_pcr<N: Nsm + ?Sized>(nsm: &N, index: u16) -> Result<(), NsmError> {
    match nsm.process(Request::LockPCR { index }) {
        Response::LockPCR => Ok(()),
        other => Err(unexpected("LockPCR", &other)),
    }
}

/// Locks PCRs `0..range`.
pub fn lock_pcrs<N: Nsm + ?Sized>(nsm: &N, range: u16) -> Result<(), NsmError> {
    match nsm.process(Request::LockPCRs { range }) {
        Response::LockPCRs => Ok(()),
        other => Err(unexpected("LockPCRs", &other)),
    }
}

/// Asks the module for random bytes (256 bytes from the real module).
pub fn get_random<N: Nsm + ?Sized>(nsm: &N) -> Result<Zeroizing<Vec<u8>>, NsmError> {
    match nsm.process(Request::GetRandom) {
        Response::GetRandom { random } => Ok(Zeroizing::new(random)),
        other => Err(unexpected("GetRandom", &other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module that answers every request with the same canned response.
    struct Canned(fn() -> Response);

    impl Nsm for Canned {
        fn process(&self, _request: Request) -> Response {
            (self.0)()
        }
    }

    #[test]
    fn error_codes_map_to_typed_errors_and_back() {
        let codes = [
            (ErrorCode::InvalidArgument, "InvalidArgument"),
            (ErrorCode::InvalidIndex, "InvalidIndex"),
            (ErrorCode::InvalidResponse, "InvalidResponse"),
            (ErrorCode::ReadOnlyIndex, "ReadOnlyIndex"),
            (ErrorCode::InvalidOperation, "InvalidOperation"),
            (ErrorCode::BufferTooSmall, "BufferTooSmall"),
            (ErrorCode::InputTooLarge, "InputTooLarge"),
            (ErrorCode::InternalError, "InternalError"),
        ];
        for (code, name) in codes {
            let err = NsmError::from_code(&code);
            assert_eq!(format!("{err:?}"), name);
            assert_eq!(format!("{:?}", err.code().unwrap()), name);
        }
        assert!(matches!(
            NsmError::from_code(&ErrorCode::Success),
            NsmError::InvalidResponse
        ));
    }

    #[test]
    fn error_response_becomes_typed_error() {
        let nsm = Canned(|| Response::Error(ErrorCode::ReadOnlyIndex));
        assert!(matches!(
            extend_pcr(&nsm, 3, b"x"),
            Err(NsmError::ReadOnlyIndex)
        ));
        assert!(matches!(
            attest(&nsm, None, None, None),
            Err(NsmError::ReadOnlyIndex)
        ));
    }

    #[test]
    fn wrong_response_kind_is_reported() {
        let nsm = Canned(|| Response::LockPCR);
        let err = attest(&nsm, None, None, None).unwrap_err();
        assert!(matches!(
            err,
            NsmError::UnexpectedResponse {
                request: "Attestation",
                found: "LockPCR"
            }
        ));
        assert!(err.code().is_none());
    }

    #[test]
    fn short_pcr_is_malformed() {
        let nsm = Canned(|| Response::DescribePCR {
            lock: false,
            data: vec![0; 32],
        });
        assert!(matches!(
            describe_pcr(&nsm, 0),
            Err(NsmError::MalformedResponse { .. })
        ));
    }

    #[test]
    fn trait_objects_and_smart_pointers_are_modules() {
        let nsm: Arc<dyn Nsm> = Arc::new(Canned(|| Response::GetRandom {
            random: vec![7; 256],
        }));
        assert_eq!(get_random(&nsm).unwrap().len(), 256);
        assert_eq!(get_random(nsm.as_ref()).unwrap().len(), 256);
    }
}
