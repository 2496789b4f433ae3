//! The Kluis enclave application, as a library.
//!
//! Inside a Nitro Enclave the `enclave` program listens for jobs from the
//! parent (vsock), asks the verifier for keys through the parent's relay
//! (vsock to CID 3), and turns an encrypted input envelope into an encrypted
//! output envelope without any plaintext or key leaving the enclave. See
//! [`job`] for one job's life, [`workload`] for what runs on the plaintext,
//! and [`release`] for the attested key request.
//!
//! The NSM is the real `/dev/nsm` unless the program is started with an
//! explicit simulation flag, which it then announces loudly.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub mod cli;
pub mod exec;
pub mod job;
mod nsm_sim;
pub mod release;
pub mod server;
pub mod workload;

/// What every job of one enclave shares.
pub struct EnclaveContext {
    /// The NSM (device or simulator).
    pub nsm: Arc<dyn kluis_nsm::Nsm>,
    /// Where the verifier is reached (the parent's relay).
    pub verifier: kluis_transport::Address,
    /// The verifier's identity key, built into the image (SEC1, uncompressed).
    pub verifier_public_key: [u8; kluis_proto::message::P384_PUBLIC_KEY_LEN],
    /// The image's workload directory for `exec` jobs (`None`: exec is off).
    pub exec_dir: Option<PathBuf>,
    /// A job whose parent sends or reads nothing this long fails.
    pub idle_timeout: Duration,
    /// The whole key exchange must finish within this.
    pub key_release_timeout: Duration,
}

impl std::fmt::Debug for EnclaveContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnclaveContext")
            .field("verifier", &self.verifier)
            .field(
                "verifier_public_key",
                &hex::encode(self.verifier_public_key),
            )
            .field("exec_dir", &self.exec_dir)
            .finish_non_exhaustive()
    }
}

impl EnclaveContext {
    /// A context with default timeouts (idle 60 s, key release 30 s).
    pub fn new(
        nsm: Arc<dyn kluis_nsm::Nsm>,
        verifier: kluis_transport::Address,
        verifier_public_key: [u8; kluis_proto::message::P384_PUBLIC_KEY_LEN],
    ) -> Self {
        EnclaveContext {
            nsm,
            verifier,
            verifier_public_key,
            exec_dir: None,
            idle_timeout: Duration::from_secs(60),
            key_release_timeout: Duration::from_secs(30),
        }
    }
}
