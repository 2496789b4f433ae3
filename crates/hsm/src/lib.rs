//! Kluis on a PKCS#11 token: customer master keys, the key store's root key
//! and the verifier's identity key generated inside an HSM and never leaving
//! it in readable form.
//!
//! - [`Token`]: the module, the token (found by label), the user login and a
//!   pool of sessions, with one reconnect on a dropped session.
//! - [`Pkcs11Backend`]: a [`kluis_keystore::KeyBackend`] whose material is
//!   AES-256 secret keys in the token (`CKA_SENSITIVE`, not
//!   `CKA_EXTRACTABLE`), labelled `kluis:<key name>:v<version>`; data keys
//!   are wrapped and unwrapped by `C_Encrypt`/`C_Decrypt` with `CKM_AES_GCM`
//!   inside the token.
//! - [`HsmStoreConfig`]: `hsm.json` in the store directory, naming the module,
//!   the token and the store-root key; the store's record-encryption root is
//!   random, wrapped by that token key, so the directory without the token
//!   and its PIN reveals nothing.
//! - [`TokenSigner`]: the verifier identity (P-384) as a
//!   [`kluis_proto::IdentitySigner`]: `CKM_ECDSA` over a host-computed
//!   SHA-384 digest.
//!
//! Why AES-GCM through `C_Encrypt` and not `C_WrapKey` (AES-KWP): the data
//! key must reach the verifier's memory anyway — it is sealed there to the
//! enclave's ephemeral key — so making it a token object first would only
//! add an object per request; GCM authenticates the wrap's context (the key
//! name, version and the caller's associated data), which AES-KWP cannot, and
//! SoftHSM2, Thales Luna and Utimaco all offer `CKM_AES_GCM`. The IV is drawn
//! by the host (96 random bits per wrap) because PKCS#11 2.40 tokens differ
//! on whether they generate it.

#![warn(missing_docs)]

mod backend;
mod root;
pub mod softhsm;
mod token;

use std::path::PathBuf;

pub use backend::{label_for, Pkcs11Backend, MATERIAL_KIND};
pub use root::{HsmStoreConfig, TokenSigner, HSM_CONFIG_FILE};
pub use token::{ObjectReport, Token, TokenConfig, MAX_PIN_LEN, MAX_TOKEN_LABEL_LEN};

/// A failure of the token or its module. Never carries key material or the
/// PIN.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The module is missing, unsafe to load, or not a PKCS#11 module.
    #[error("PKCS#11 module {}: {detail}", path.display())]
    Module {
        /// The module's path.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// No initialised token has this label.
    #[error("no token labelled {label:?} (tokens present: {present:?})")]
    TokenNotFound {
        /// The label asked for.
        label: String,
        /// The labels of the tokens present.
        present: Vec<String>,
    },
    /// The token refused the PIN. Not retried: tokens lock a PIN after a few
    /// failures.
    #[error("the token {token:?} refused the PIN (not retried: tokens lock the PIN after repeated failures)")]
    WrongPin {
        /// The token's label.
        token: String,
    },
    /// The token has locked the PIN.
    #[error("the token {token:?} has locked the user PIN; its security officer must reset it")]
    PinLocked {
        /// The token's label.
        token: String,
    },
    /// The token will lock the PIN at the next failure: Kluis does not try.
    #[error("the token {token:?} will lock the user PIN at the next failed login; Kluis does not try it (check the PIN, or have the security officer reset the counter)")]
    PinFinalTry {
        /// The token's label.
        token: String,
    },
    /// An object Kluis created is not in the token (deleted outside Kluis,
    /// or a token restored from an older backup).
    #[error(
        "the token has no object with id {id:?}: it was deleted outside Kluis or the token lost it"
    )]
    ObjectMissing {
        /// The object's `CKA_ID`.
        id: String,
    },
    /// More than one object has an id Kluis made unique.
    #[error("the token has {count} objects with id {id:?}; expected one")]
    ObjectDuplicated {
        /// The object's `CKA_ID`.
        id: String,
        /// How many.
        count: usize,
    },
    /// An object with a key's id lacks the protection every key Kluis
    /// makes has: it was made outside Kluis (planted in place of a
    /// destroyed one, say, with a value its maker knows) and is not used.
    #[error(
        "the token's object with id {id:?} is not a key Kluis made: {attribute} is not as Kluis \
         sets it, so the object was made outside Kluis and is not used"
    )]
    ObjectNotOurs {
        /// The object's `CKA_ID`.
        id: String,
        /// The first attribute found wrong.
        attribute: &'static str,
    },
    /// The session dropped and a fresh one failed too.
    #[error(
        "the token session was lost while {operation}, and a fresh session failed too: {detail}"
    )]
    SessionLost {
        /// What was being done.
        operation: &'static str,
        /// The token's last answer.
        detail: String,
    },
    /// A PKCS#11 call failed.
    #[error("PKCS#11 {operation} failed: {source}")]
    Pkcs11 {
        /// What was being done.
        operation: &'static str,
        /// The module's answer.
        source: cryptoki::error::Error,
    },
    /// A sealed blob did not authenticate under the key.
    #[error("the blob does not authenticate under the token key")]
    DoesNotAuthenticate,
    /// The token answered something impossible.
    #[error("the token answered unexpectedly: {0}")]
    Unexpected(&'static str),
    /// A bad configuration (label, PIN, `hsm.json`).
    #[error("HSM configuration: {0}")]
    Config(String),
    /// Reading or writing `hsm.json`.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl HsmError {
    pub(crate) fn op(operation: &'static str, source: cryptoki::error::Error) -> Self {
        Self::Pkcs11 { operation, source }
    }
}
