//! The master-key backend over a PKCS#11 token.

use std::fmt;
use std::sync::Arc;

use kluis_keystore::{KeyBackend, Store, StoreError, StoreGuard, Zeroizing};

use crate::token::Token;
use crate::HsmError;

/// Record kind under which [`Pkcs11Backend`] keeps the state of each
/// material id in the store: the token holds the key, the store remembers
/// that it existed and whether Kluis destroyed it.
pub const MATERIAL_KIND: &str = "pkcs11-material";

const BACKEND_NAME: &str = "pkcs11";
/// Version byte of the wrapped format.
const WRAP_VERSION: u8 = 2;
/// Domain label of the wrap's associated data.
const WRAP_AAD_LABEL: &[u8] = b"kluis-pkcs11-wrap-v1\0";
/// Material record: version 1, state.
const RECORD_VERSION: u8 = 1;
const STATE_DESTROYED: u8 = 0;
const STATE_ACTIVE: u8 = 1;

/// Customer-master-key material as AES-256 secret keys in a PKCS#11 token.
///
/// Each material id is one token object: `CKA_ID` the material id,
/// `CKA_LABEL` from [`label_for`], sensitive, never extractable,
/// encrypt/decrypt only. A record of kind [`MATERIAL_KIND`] in the store
/// says the id exists (`0x01 0x01`) or was destroyed by Kluis (`0x01 0x00`),
/// so that an object missing from the token is told apart from a shredded
/// one.
///
/// Wrapped format: `0x02 || 12-byte IV || AES-256-GCM ciphertext || tag`,
/// computed inside the token, with associated data
/// `"kluis-pkcs11-wrap-v1\0" || u16 length of the material id || material
/// id || aad`.
///
/// Destroying destroys the token objects first and then writes the
/// tombstone: a crash in between leaves an active record whose object is
/// gone (reported as lost until `destroy` is run again, which then finds
/// nothing to destroy and writes the tombstone), never a tombstone over a
/// key that still exists.
pub struct Pkcs11Backend {
    token: Arc<Token>,
    store: Arc<Store>,
}

impl fmt::Debug for Pkcs11Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Backend")
            .field("token", &self.token)
            .field("store", &self.store)
            .finish()
    }
}

/// The token label of a material id: `kluis:<key name>:v<version>` for the
/// key hierarchy's ids (`cmk:<name>:v<version>:<16 hex digits>`), otherwise
/// `kluis:<id>`. Labels are for operators; objects are found by `CKA_ID`.
pub fn label_for(material_id: &str) -> String {
    let trimmed = material_id
        .strip_prefix("cmk:")
        .and_then(|rest| {
            let (head, tail) = rest.rsplit_once(':')?;
            (tail.len() == 16 && tail.bytes().all(|b| b.is_ascii_hexdigit())).then_some(head)
        })
        .unwrap_or(material_id);
    format!("kluis:{trimmed}")
}

enum State {
    Active,
    Destroyed,
}

fn backend_error(e: HsmError) -> StoreError {
    StoreError::Backend {
        backend: BACKEND_NAME,
        reason: e.to_string(),
    }
}

impl Pkcs11Backend {
    /// A backend keeping material in `token` and its state in `store`.
    pub fn new(token: Arc<Token>, store: Arc<Store>) -> Self {
        Self { token, store }
    }

    /// The token.
    pub fn token(&self) -> &Arc<Token> {
        &self.token
    }

    fn check_guard(&self, guard: &StoreGuard<'_>) -> Result<(), StoreError> {
        guard.check_locks(&self.store)
    }

    fn state(&self, material_id: &str) -> Result<Option<State>, StoreError> {
        let Some(record) = self.store.get(MATERIAL_KIND, material_id)? else {
            return Ok(None);
        };
        match record.as_slice() {
            [RECORD_VERSION, STATE_ACTIVE] => Ok(Some(State::Active)),
            [RECORD_VERSION, STATE_DESTROYED] => Ok(Some(State::Destroyed)),
            _ => Err(StoreError::CorruptRecord {
                path: self.store.path().join("records").join(MATERIAL_KIND),
                reason: "pkcs11 material record: unknown version or state",
            }),
        }
    }

    fn require_active(&self, material_id: &str) -> Result<(), StoreError> {
        match self.state(material_id)? {
            Some(State::Active) => Ok(()),
            Some(State::Destroyed) => Err(StoreError::MaterialDestroyed {
                id: material_id.to_owned(),
            }),
            None => Err(StoreError::MaterialNotFound {
                id: material_id.to_owned(),
            }),
        }
    }
}

fn wrap_aad(material_id: &str, aad: &[u8]) -> Result<Vec<u8>, StoreError> {
    kluis_keystore::material_aad(WRAP_AAD_LABEL, material_id, aad)
}

impl KeyBackend for Pkcs11Backend {
    fn name(&self) -> &'static str {
        BACKEND_NAME
    }

    fn create_material(&self, guard: &StoreGuard<'_>, material_id: &str) -> Result<(), StoreError> {
        self.check_guard(guard)?;
        match self.state(material_id)? {
            Some(State::Active) => {
                return Err(StoreError::MaterialExists {
                    id: material_id.to_owned(),
                })
            }
            Some(State::Destroyed) => {
                return Err(StoreError::MaterialDestroyed {
                    id: material_id.to_owned(),
                })
            }
            None => {}
        }
        // An object left by an attempt that failed before its record was
        // written would make the id ambiguous: refuse rather than guess.
        if self
            .token
            .exists(material_id.as_bytes())
            .map_err(backend_error)?
        {
            return Err(StoreError::MaterialExists {
                id: material_id.to_owned(),
            });
        }
        self.token
            .generate_aes_key(material_id.as_bytes(), &label_for(material_id))
            .map_err(backend_error)?;
        self.store.put(
            guard,
            MATERIAL_KIND,
            material_id,
            &[RECORD_VERSION, STATE_ACTIVE],
        )
    }

    fn wrap(&self, material_id: &str, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, StoreError> {
        kluis_keystore::check_wrap_input(material_id, plaintext)?;
        self.require_active(material_id)?;
        let sealed = self
            .token
            .encrypt_gcm(
                material_id.as_bytes(),
                plaintext,
                &wrap_aad(material_id, aad)?,
            )
            .map_err(backend_error)?;
        let mut out = Vec::with_capacity(sealed.len().saturating_add(1));
        out.push(WRAP_VERSION);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn unwrap(
        &self,
        material_id: &str,
        wrapped: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        let sealed = kluis_keystore::wrapped_body(material_id, wrapped, WRAP_VERSION)?;
        let failed = |reason: &'static str| StoreError::UnwrapFailed {
            id: material_id.to_owned(),
            reason,
        };
        self.require_active(material_id)?;
        match self
            .token
            .decrypt_gcm(material_id.as_bytes(), sealed, &wrap_aad(material_id, aad)?)
        {
            Ok(plain) => Ok(plain),
            Err(HsmError::DoesNotAuthenticate) => Err(failed(
                "does not authenticate (altered, truncated, other associated data, \
                 or wrapped under other material)",
            )),
            Err(e) => Err(backend_error(e)),
        }
    }

    fn destroy_material(
        &self,
        guard: &StoreGuard<'_>,
        material_id: &str,
    ) -> Result<(), StoreError> {
        self.check_guard(guard)?;
        match self.state(material_id)? {
            None => Err(StoreError::MaterialNotFound {
                id: material_id.to_owned(),
            }),
            Some(State::Destroyed) => Ok(()),
            Some(State::Active) => {
                self.token
                    .destroy(material_id.as_bytes())
                    .map_err(backend_error)?;
                self.store.put(
                    guard,
                    MATERIAL_KIND,
                    material_id,
                    &[RECORD_VERSION, STATE_DESTROYED],
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(
            label_for("cmk:agency-a/app-x/prod:v3:0123456789abcdef"),
            "kluis:agency-a/app-x/prod:v3"
        );
        assert_eq!(label_for("cmk:a:v1:short"), "kluis:cmk:a:v1:short");
        assert_eq!(label_for("store-root"), "kluis:store-root");
    }
}
