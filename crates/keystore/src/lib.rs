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
pub mod pg;
mod secret;
mod store;

pub use backend::{
    check_wrap_input, material_aad, wrapped_body, KeyBackend, LocalBackend, MATERIAL_KIND,
    MAX_WRAP_PLAINTEXT,
};
pub use crypto::{AuditRowKey, AUDIT_TAG_LEN};
pub use error::StoreError;
pub use pg::Database;
pub use secret::{Argon2Params, RootSecret, KEY_LEN};
pub use store::{
    Store, StoreGuard, MAX_GET_MANY, MAX_ID_LEN, MAX_KIND_LEN, MAX_LIST_LEN, MAX_RECORD_LEN,
};
pub use zeroize::Zeroizing;

/// Writes `contents` to a new file `dir/name` (mode 0600) atomically and
/// durably — temporary file, fsync, link into place, fsync of `dir` — as the
/// store writes its own files. Returns `false`, leaving it untouched, if
/// `dir/name` exists. For files kept beside the store (`hsm.json`).
pub fn write_new_file(
    dir: &std::path::Path,
    name: &str,
    contents: &[u8],
) -> Result<bool, StoreError> {
    fsutil::write_atomic(dir, name, contents, fsutil::Existing::Keep)
}

/// Reads the regular file `path` of at most `limit` bytes (checked before
/// anything is read); `None` if it does not exist. Symbolic links, FIFOs and
/// devices are refused without being read.
pub fn read_small_file(path: &std::path::Path, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
    match fsutil::read_bounded(path, limit) {
        Ok(contents) => Ok(Some(contents)),
        Err(fsutil::ReadError::NotFound) => Ok(None),
        Err(fsutil::ReadError::NotRegular) => Err(StoreError::io(
            "read",
            path,
            std::io::Error::other("not a regular file"),
        )),
        Err(fsutil::ReadError::TooLarge(found)) => Err(StoreError::TooLarge {
            what: "file",
            limit,
            found,
        }),
        Err(fsutil::ReadError::Io(err)) => Err(StoreError::io("read", path, err)),
    }
}
