//! Key-material backends: the seam between the key hierarchy and where the
//! backing keys of customer master keys live.

use std::fmt;
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::crypto::{SealingKey, TAG_LEN};
use crate::secret::KEY_LEN;
use crate::store::{check_id, Store, StoreGuard};
use crate::StoreError;

/// Where backing key material lives and is used.
///
/// A material id names one key (for instance one version of a customer
/// master key); the hierarchy chooses ids and keeps its own records of them.
/// The key itself never leaves the backend: callers only wrap and unwrap.
/// `LocalBackend` keeps AES-256-GCM keys in the encrypted store; a PKCS#11
/// HSM backend implements the same trait with keys that never leave the HSM.
///
/// Administrative operations take the store's [`StoreGuard`], so creating
/// and destroying material is serialised with the rest of the hierarchy's
/// changes, whatever the backend.
pub trait KeyBackend: Send + Sync {
    /// A short, stable name for logs and audit records (`"local"`, `"pkcs11"`).
    fn name(&self) -> &'static str;

    /// Creates new random material under `material_id`.
    ///
    /// Fails with [`StoreError::MaterialExists`] if the id exists, and with
    /// [`StoreError::MaterialDestroyed`] if it was destroyed: an id is never
    /// reused.
    fn create_material(&self, guard: &StoreGuard<'_>, material_id: &str) -> Result<(), StoreError>;

    /// Encrypts `plaintext` (at most [`MAX_WRAP_PLAINTEXT`] bytes) under the
    /// material, authenticating `aad` (which the caller must present again to
    /// unwrap). The result is opaque and self-contained.
    fn wrap(&self, material_id: &str, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, StoreError>;

    /// Decrypts what [`KeyBackend::wrap`] returned for the same material and
    /// `aad`. Anything else fails with [`StoreError::UnwrapFailed`]; destroyed
    /// material fails with [`StoreError::MaterialDestroyed`].
    fn unwrap(
        &self,
        material_id: &str,
        wrapped: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError>;

    /// Destroys the material, so that nothing wrapped under it can be
    /// unwrapped again (crypto-shredding). Destroying destroyed material
    /// succeeds; unknown material is [`StoreError::MaterialNotFound`].
    fn destroy_material(&self, guard: &StoreGuard<'_>, material_id: &str)
        -> Result<(), StoreError>;
}

/// Record kind under which [`LocalBackend`] keeps its material.
pub const MATERIAL_KIND: &str = "material";

/// Largest plaintext [`KeyBackend::wrap`] accepts, bytes.
pub const MAX_WRAP_PLAINTEXT: usize = 64 * 1024;

/// Version byte of [`LocalBackend`]'s wrapped format.
const WRAP_VERSION: u8 = 1;
/// Largest wrapped blob a backend looks at: version byte, 12-byte nonce,
/// the largest plaintext, tag.
const MAX_WRAPPED_LEN: usize = 1 + 12 + MAX_WRAP_PLAINTEXT + TAG_LEN;

/// The checks every backend makes before wrapping: a valid material id and
/// at most [`MAX_WRAP_PLAINTEXT`] bytes.
pub fn check_wrap_input(material_id: &str, plaintext: &[u8]) -> Result<(), StoreError> {
    check_id(material_id)?;
    if plaintext.len() > MAX_WRAP_PLAINTEXT {
        return Err(StoreError::TooLarge {
            what: "plaintext to wrap",
            limit: MAX_WRAP_PLAINTEXT as u64,
            found: u64::try_from(plaintext.len()).unwrap_or(u64::MAX),
        });
    }
    Ok(())
}

/// The sealed part of a blob a backend wrapped under `material_id` in its
/// format `version` (`version || sealed`, at most one nonce, the largest
/// plaintext and a tag long), after checking the id, the length and the
/// version byte.
pub fn wrapped_body<'a>(
    material_id: &str,
    wrapped: &'a [u8],
    version: u8,
) -> Result<&'a [u8], StoreError> {
    check_id(material_id)?;
    if wrapped.len() > MAX_WRAPPED_LEN {
        return Err(StoreError::TooLarge {
            what: "wrapped key",
            limit: MAX_WRAPPED_LEN as u64,
            found: u64::try_from(wrapped.len()).unwrap_or(u64::MAX),
        });
    }
    let failed = |reason: &'static str| StoreError::UnwrapFailed {
        id: material_id.to_owned(),
        reason,
    };
    match wrapped.split_first() {
        None => Err(failed("empty")),
        Some((&found, sealed)) if found == version => Ok(sealed),
        Some(_) => Err(failed(
            "unknown format version byte (wrapped by another backend or format)",
        )),
    }
}
/// Domain label of the wrap's associated data.
const WRAP_AAD_LABEL: &[u8] = b"kluis-local-wrap-v1\0";

/// Material record: version 1, state.
const MATERIAL_VERSION: u8 = 1;
const STATE_DESTROYED: u8 = 0;
const STATE_ACTIVE_AES256GCM: u8 = 1;

/// A backend keeping AES-256-GCM keys as records of kind
/// [`MATERIAL_KIND`] in the encrypted [`Store`].
///
/// Material record (inside the store's encryption): `0x01 || 0x01 || 32-byte
/// key` while active; `0x01 || 0x00` once destroyed. Destroying replaces the
/// record atomically with the tombstone and overwrites the old file's blocks
/// with zeros (best effort on journaling or copy-on-write file systems and
/// SSDs). The key is read from the store on every call (no cache), so
/// destruction by another process takes effect at once.
///
/// Wrapped format: `0x01 || 12-byte random nonce || AES-256-GCM ciphertext ||
/// tag`, with associated data `"kluis-local-wrap-v1\0" || u16 length of the
/// material id || material id || aad`.
pub struct LocalBackend {
    store: Arc<Store>,
}

impl fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalBackend")
            .field("store", &self.store)
            .finish()
    }
}

/// The state of one material record.
enum Material {
    Active(Zeroizing<[u8; KEY_LEN]>),
    Destroyed,
}

impl LocalBackend {
    /// A backend over `store`.
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    /// The store the material lives in.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn check_guard(&self, guard: &StoreGuard<'_>) -> Result<(), StoreError> {
        guard.check_locks(&self.store)
    }

    fn load(&self, material_id: &str) -> Result<Option<Material>, StoreError> {
        let Some(record) = self.store.get(MATERIAL_KIND, material_id)? else {
            return Ok(None);
        };
        let corrupt = |reason: &'static str| StoreError::CorruptRecord {
            path: self.store.path().join("records").join(MATERIAL_KIND),
            reason,
        };
        match record.as_slice() {
            [MATERIAL_VERSION, STATE_DESTROYED] => Ok(Some(Material::Destroyed)),
            [MATERIAL_VERSION, STATE_ACTIVE_AES256GCM, key @ ..] => {
                let mut out = Zeroizing::new([0u8; KEY_LEN]);
                if key.len() != KEY_LEN {
                    return Err(corrupt("material record: wrong key length"));
                }
                out.copy_from_slice(key);
                Ok(Some(Material::Active(out)))
            }
            _ => Err(corrupt("material record: unknown version or state")),
        }
    }

    fn active_key(&self, material_id: &str) -> Result<SealingKey, StoreError> {
        match self.load(material_id)? {
            Some(Material::Active(key)) => SealingKey::new(&key),
            Some(Material::Destroyed) => Err(StoreError::MaterialDestroyed {
                id: material_id.to_owned(),
            }),
            None => Err(StoreError::MaterialNotFound {
                id: material_id.to_owned(),
            }),
        }
    }
}

/// The associated data a backend binds into a wrap: `label ||
/// u16 length of the material id || material id || aad`, so that a blob
/// wrapped for one material id, or by one backend, never unwraps as
/// another's.
pub fn material_aad(label: &[u8], material_id: &str, aad: &[u8]) -> Result<Vec<u8>, StoreError> {
    let id_len = u16::try_from(material_id.len()).map_err(|_| StoreError::InvalidId {
        id: material_id.chars().take(64).collect(),
        reason: "too long",
    })?;
    let mut out = Vec::with_capacity(
        label
            .len()
            .saturating_add(2)
            .saturating_add(material_id.len())
            .saturating_add(aad.len()),
    );
    out.extend_from_slice(label);
    out.extend_from_slice(&id_len.to_be_bytes());
    out.extend_from_slice(material_id.as_bytes());
    out.extend_from_slice(aad);
    Ok(out)
}

fn wrap_aad(material_id: &str, aad: &[u8]) -> Result<Vec<u8>, StoreError> {
    material_aad(WRAP_AAD_LABEL, material_id, aad)
}

impl KeyBackend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn create_material(&self, guard: &StoreGuard<'_>, material_id: &str) -> Result<(), StoreError> {
        self.check_guard(guard)?;
        check_id(material_id)?;
        match self.load(material_id)? {
            Some(Material::Active(_)) => {
                return Err(StoreError::MaterialExists {
                    id: material_id.to_owned(),
                })
            }
            Some(Material::Destroyed) => {
                return Err(StoreError::MaterialDestroyed {
                    id: material_id.to_owned(),
                })
            }
            None => {}
        }
        let mut record = Zeroizing::new([0u8; 2 + KEY_LEN]);
        let (header, key) = record.split_at_mut(2);
        header.copy_from_slice(&[MATERIAL_VERSION, STATE_ACTIVE_AES256GCM]);
        aws_lc_rs::rand::fill(key).map_err(|_| StoreError::Crypto("generating key material"))?;
        self.store
            .put(guard, MATERIAL_KIND, material_id, record.as_slice())
    }

    fn wrap(&self, material_id: &str, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, StoreError> {
        check_wrap_input(material_id, plaintext)?;
        let key = self.active_key(material_id)?;
        let mut buffer = Zeroizing::new(plaintext.to_vec());
        key.seal(&[WRAP_VERSION], &wrap_aad(material_id, aad)?, &mut buffer)
    }

    fn unwrap(
        &self,
        material_id: &str,
        wrapped: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        let sealed = wrapped_body(material_id, wrapped, WRAP_VERSION)?;
        let failed = |reason: &'static str| StoreError::UnwrapFailed {
            id: material_id.to_owned(),
            reason,
        };
        let key = self.active_key(material_id)?;
        key.open(&wrap_aad(material_id, aad)?, sealed)
            .ok_or_else(|| {
                failed(
                    "does not authenticate (altered, truncated, other associated data, \
                 or wrapped under other material)",
                )
            })
    }

    fn destroy_material(
        &self,
        guard: &StoreGuard<'_>,
        material_id: &str,
    ) -> Result<(), StoreError> {
        self.check_guard(guard)?;
        check_id(material_id)?;
        match self.load(material_id)? {
            None => Err(StoreError::MaterialNotFound {
                id: material_id.to_owned(),
            }),
            Some(Material::Destroyed) => Ok(()),
            Some(Material::Active(_)) => self.store.put(
                guard,
                MATERIAL_KIND,
                material_id,
                &[MATERIAL_VERSION, STATE_DESTROYED],
            ),
        }
    }
}
