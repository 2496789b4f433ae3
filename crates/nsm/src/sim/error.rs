//! Errors of the simulator.

use std::path::PathBuf;

use crate::NsmError;

/// An error from the simulated NSM, its root CA or its configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The request was refused the way the real module refuses it.
    #[error(transparent)]
    Nsm(#[from] NsmError),
    /// A cryptographic operation failed.
    #[error("cryptographic failure while {0}")]
    Crypto(&'static str),
    /// A certificate could not be built.
    #[error("cannot build the {which} certificate: {reason}")]
    Certificate {
        /// Which certificate of the chain.
        which: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// CBOR encoding failed.
    #[error("cannot encode CBOR: {0}")]
    Cbor(String),
    /// A time is outside what certificates can express.
    #[error("time {unix_ms} ms since the Unix epoch is out of range for a certificate")]
    TimeOutOfRange {
        /// The offending time.
        unix_ms: u64,
    },
    /// A file or directory of the simulator's state could not be used.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The persisted root key or certificate is unusable.
    #[error("invalid simulated root at {}: {reason}", path.display())]
    InvalidRoot {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The persisted root key is readable by other users.
    #[error(
        "refusing to use the simulated root key {}: its mode is {mode:04o}, \
         it must not be accessible to group or others (chmod 600)",
        path.display()
    )]
    InsecureKeyFile {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The simulator's configuration is invalid.
    #[error("invalid simulator configuration: {0}")]
    InvalidConfig(String),
}

impl SimError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn cert(which: &'static str) -> impl FnOnce(rcgen::Error) -> Self {
        move |err| Self::Certificate {
            which,
            reason: err.to_string(),
        }
    }
}
