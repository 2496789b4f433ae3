//! Kluis key store: the attestation verifier's encrypted-at-rest store
//! directory.
//!
//! - [`Store`]: records of `(kind, id) -> bytes`, each sealed with
//!   AES-256-GCM under a key derived from the [`RootSecret`] (a key file or an
//!   Argon2id-stretched passphrase) and bound to its kind and id; writes are
//!   atomic and durable (temporary file, fsync, rename, fsync of the
//!   directory); mutations happen under a cross-process [`StoreGuard`].
//! - [`KeyBackend`]: where the backing key material of customer master keys
//!   lives, with [`LocalBackend`] keeping it in the store (a PKCS#11 HSM
//!   backend can implement the same trait).
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use kluis_keystore::{KeyBackend, LocalBackend, RootSecret, Store};
//! # fn main() -> Result<(), kluis_keystore::StoreError> {
//! let secret = RootSecret::generate_key_file("/etc/kluis/root.key".as_ref())?;
//! let store = Arc::new(Store::init("/var/lib/kluis/store", secret)?);
//! let backend = LocalBackend::new(Arc::clone(&store));
//! {
//!     let guard = store.lock()?;
//!     backend.create_material(&guard, "agency-a/app-x/prod#1")?;
//! }
//! let wrapped = backend.wrap("agency-a/app-x/prod#1", &[0u8; 32], b"context")?;
//! let key = backend.unwrap("agency-a/app-x/prod#1", &wrapped, b"context")?;
//! # drop(key);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod backend;
mod crypto;
mod error;
mod fsutil;
mod meta;
mod secret;
mod store;

pub use backend::{KeyBackend, LocalBackend, MATERIAL_KIND, MAX_WRAP_PLAINTEXT};
pub use error::StoreError;
pub use secret::{Argon2Params, RootSecret, KEY_LEN};
pub use store::{Store, StoreGuard, MAX_ID_LEN, MAX_KIND_LEN, MAX_LIST_LEN, MAX_RECORD_LEN};
pub use zeroize::Zeroizing;
