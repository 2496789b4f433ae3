//! The root secret: a key file, raw key bytes, or a passphrase stretched with
//! Argon2id.

use std::fmt;
use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use zeroize::Zeroizing;

use crate::fsutil::{self, Existing};
use crate::StoreError;

/// Length of the root key and of every derived key, bytes.
pub const KEY_LEN: usize = 32;

/// Largest key file read, bytes (a key file is 32 raw bytes or 64 hex digits).
const MAX_KEY_FILE_LEN: u64 = 4096;

/// Argon2id cost parameters, as stored in `store.meta`.
///
/// [`Argon2Params::DEFAULT`] (64 MiB, 3 passes, 1 lane) is also the floor a
/// store opened with a production [`RootSecret`] must meet. Every value read
/// from a file is checked against [`Argon2Params::MAX`] before anything is
/// allocated, so a hostile `store.meta` cannot make the store allocate more
/// than 2 GiB or run more than 32 passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    /// Memory cost, KiB.
    pub m_cost_kib: u32,
    /// Number of passes.
    pub t_cost: u32,
    /// Degree of parallelism (lanes).
    pub p_cost: u32,
}

impl Argon2Params {
    /// The parameters new passphrase stores get, and the production floor:
    /// m = 64 MiB, t = 3, p = 1.
    pub const DEFAULT: Self = Self {
        m_cost_kib: 64 * 1024,
        t_cost: 3,
        p_cost: 1,
    };

    /// The largest parameters accepted anywhere: m = 2 GiB, t = 32, p = 16.
    pub const MAX: Self = Self {
        m_cost_kib: 2 * 1024 * 1024,
        t_cost: 32,
        p_cost: 16,
    };

    /// The smallest parameters Argon2 itself accepts (for the
    /// `dangerous_fast_kdf_for_tests` stores only).
    pub const ABSOLUTE_MIN: Self = Self {
        m_cost_kib: 8,
        t_cost: 1,
        p_cost: 1,
    };

    /// The parameters of [`RootSecret::dangerous_fast_kdf_for_tests`]:
    /// m = 256 KiB, t = 1, p = 1. Never for real data.
    pub const DANGEROUS_FAST_FOR_TESTS: Self = Self {
        m_cost_kib: 256,
        t_cost: 1,
        p_cost: 1,
    };

    /// Checks each parameter against `min..=MAX` (and Argon2's own rule
    /// m ≥ 8·p), without allocating.
    pub(crate) fn check_range(&self, min: &Self) -> Result<(), StoreError> {
        let check = |param: &'static str, found: u32, min: u32, max: u32| {
            if (min..=max).contains(&found) {
                Ok(())
            } else {
                Err(StoreError::KdfParamOutOfRange {
                    param,
                    min: min.into(),
                    max: max.into(),
                    found: found.into(),
                })
            }
        };
        check("t_cost", self.t_cost, min.t_cost, Self::MAX.t_cost)?;
        check("p_cost", self.p_cost, min.p_cost, Self::MAX.p_cost)?;
        let m_min = min.m_cost_kib.max(self.p_cost.saturating_mul(8));
        check("m_cost_kib", self.m_cost_kib, m_min, Self::MAX.m_cost_kib)
    }

    /// Whether these parameters meet the production floor.
    pub(crate) fn meets_floor(&self) -> bool {
        self.m_cost_kib >= Self::DEFAULT.m_cost_kib && self.t_cost >= Self::DEFAULT.t_cost
    }
}

/// Whether weak Argon2id parameters in `store.meta` are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Floor {
    Production,
    DangerousNone,
}

enum Inner {
    Key(Zeroizing<[u8; KEY_LEN]>),
    Passphrase {
        passphrase: Zeroizing<String>,
        /// Parameters for a new store (`Store::init`); `open` uses the
        /// store's own, within bounds.
        params: Argon2Params,
        floor: Floor,
    },
}

/// The secret a store is opened with. The store key is derived from it
/// (HKDF-SHA256, salted per store) and never written anywhere.
///
/// Either 32 random bytes (a key file, or bytes from elsewhere), or a
/// passphrase stretched with Argon2id under the parameters and salt recorded
/// in the store's `store.meta`. Its `Debug` output never shows the secret,
/// and the secret is zeroized on drop.
pub struct RootSecret {
    inner: Inner,
}

impl fmt::Debug for RootSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Key(_) => f
                .debug_struct("RootSecret")
                .field("kind", &"key")
                .field("key", &"<redacted>")
                .finish(),
            Inner::Passphrase { params, floor, .. } => f
                .debug_struct("RootSecret")
                .field("kind", &"passphrase")
                .field("passphrase", &"<redacted>")
                .field("params", params)
                .field("dangerous_fast_kdf", &(*floor == Floor::DangerousNone))
                .finish(),
        }
    }
}

/// Which kind of root secret a store was made with (recorded in `store.meta`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SecretKind {
    Key,
    Passphrase,
}

impl SecretKind {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::Key => "key (file or bytes)",
            Self::Passphrase => "passphrase",
        }
    }
}

impl RootSecret {
    /// A root secret from 32 key bytes (for instance from a secrets manager).
    pub fn from_key_bytes(key: Zeroizing<[u8; KEY_LEN]>) -> Self {
        Self {
            inner: Inner::Key(key),
        }
    }

    /// Reads a key file: exactly 32 raw bytes, or 64 hex digits (surrounding
    /// whitespace, such as a final newline, is allowed).
    ///
    /// The file must be a regular file (symbolic links are followed) that
    /// neither group nor others can access (mode 0600 or 0400), or it is
    /// refused with [`StoreError::InsecureKeyFile`]. Errors never quote the
    /// file's contents.
    pub fn from_key_file(path: &Path) -> Result<Self, StoreError> {
        let invalid = |reason: &'static str| StoreError::InvalidKeyFile {
            path: path.to_owned(),
            reason,
        };
        // Checked before opening too: opening a FIFO would block.
        match std::fs::metadata(path) {
            Ok(meta) if !meta.is_file() => return Err(invalid("not a regular file")),
            Ok(_) => {}
            Err(err) => return Err(StoreError::io("inspect the key file", path, err)),
        }
        let file =
            File::open(path).map_err(|err| StoreError::io("open the key file", path, err))?;
        let meta = file
            .metadata()
            .map_err(|err| StoreError::io("inspect the key file", path, err))?;
        if !meta.is_file() {
            return Err(invalid("not a regular file"));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(StoreError::InsecureKeyFile {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() > MAX_KEY_FILE_LEN {
            return Err(invalid("longer than 4096 bytes"));
        }
        let mut contents = Zeroizing::new(Vec::with_capacity(
            usize::try_from(MAX_KEY_FILE_LEN.saturating_add(1)).unwrap_or(4097),
        ));
        file.take(MAX_KEY_FILE_LEN.saturating_add(1))
            .read_to_end(&mut contents)
            .map_err(|err| StoreError::io("read the key file", path, err))?;
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        if contents.len() == KEY_LEN {
            key.copy_from_slice(&contents);
        } else {
            let text = contents.trim_ascii();
            if text.len() != KEY_LEN.saturating_mul(2) {
                return Err(invalid("expected 32 raw bytes or 64 hexadecimal digits"));
            }
            hex::decode_to_slice(text, key.as_mut_slice())
                .map_err(|_| invalid("expected 32 raw bytes or 64 hexadecimal digits"))?;
        }
        Ok(Self::from_key_bytes(key))
    }

    /// Generates 32 random bytes and writes them as hex (one line) to a new
    /// key file at `path`, mode 0600, atomically and durably (a temporary file
    /// in the same directory, fsync, link into place, fsync of the directory).
    /// Never overwrites: an existing file gives [`StoreError::KeyFileExists`].
    pub fn generate_key_file(path: &Path) -> Result<Self, StoreError> {
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .ok_or_else(|| StoreError::InvalidKeyFile {
                path: path.to_owned(),
                reason: "the path has no UTF-8 file name",
            })?;
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        aws_lc_rs::rand::fill(key.as_mut_slice())
            .map_err(|_| StoreError::Crypto("generating a root key"))?;
        let mut text = Zeroizing::new([b'\n'; KEY_LEN * 2 + 1]);
        let (digits, _newline) = text.split_at_mut(KEY_LEN.saturating_mul(2));
        hex::encode_to_slice(key.as_slice(), digits)
            .map_err(|_| StoreError::Crypto("encoding a root key"))?;
        if !fsutil::write_atomic(dir, name, text.as_slice(), Existing::Keep)? {
            return Err(StoreError::KeyFileExists {
                path: path.to_owned(),
            });
        }
        Ok(Self::from_key_bytes(key))
    }

    /// A passphrase, stretched with Argon2id. A new store gets
    /// [`Argon2Params::DEFAULT`]; opening a store whose `store.meta` records
    /// weaker parameters than that is refused ([`StoreError::WeakKdfParams`]).
    /// An empty passphrase is refused.
    pub fn from_passphrase(passphrase: Zeroizing<String>) -> Result<Self, StoreError> {
        Self::from_passphrase_with_params(passphrase, Argon2Params::DEFAULT)
    }

    /// Like [`RootSecret::from_passphrase`], with stronger parameters for a
    /// new store (each must be between [`Argon2Params::DEFAULT`] and
    /// [`Argon2Params::MAX`]).
    pub fn from_passphrase_with_params(
        passphrase: Zeroizing<String>,
        params: Argon2Params,
    ) -> Result<Self, StoreError> {
        params.check_range(&Argon2Params::DEFAULT)?;
        if passphrase.is_empty() {
            return Err(StoreError::EmptyPassphrase);
        }
        Ok(Self {
            inner: Inner::Passphrase {
                passphrase,
                params,
                floor: Floor::Production,
            },
        })
    }

    /// **Tests only.** A passphrase stretched with
    /// [`Argon2Params::DANGEROUS_FAST_FOR_TESTS`] (256 KiB, one pass) for a new
    /// store, and accepting any parameters (within [`Argon2Params::MAX`]) when
    /// opening. Such a store offers no real protection against guessing.
    pub fn dangerous_fast_kdf_for_tests(passphrase: Zeroizing<String>) -> Self {
        Self {
            inner: Inner::Passphrase {
                passphrase,
                params: Argon2Params::DANGEROUS_FAST_FOR_TESTS,
                floor: Floor::DangerousNone,
            },
        }
    }

    pub(crate) fn kind(&self) -> SecretKind {
        match self.inner {
            Inner::Key(_) => SecretKind::Key,
            Inner::Passphrase { .. } => SecretKind::Passphrase,
        }
    }

    /// The Argon2id parameters for a new store (`None` for a key).
    pub(crate) fn init_params(&self) -> Option<Argon2Params> {
        match &self.inner {
            Inner::Key(_) => None,
            Inner::Passphrase { params, .. } => Some(*params),
        }
    }

    /// The input keying material for the store key: the key itself, or the
    /// Argon2id output over the passphrase with `params` (from `store.meta`,
    /// checked against the bounds here before Argon2 allocates) and `salt`.
    pub(crate) fn input_key(
        &self,
        params: Option<&Argon2Params>,
        salt: &[u8],
    ) -> Result<Zeroizing<[u8; KEY_LEN]>, StoreError> {
        match (&self.inner, params) {
            (Inner::Key(key), None) => Ok(key.clone()),
            (
                Inner::Passphrase {
                    passphrase, floor, ..
                },
                Some(params),
            ) => {
                params.check_range(&Argon2Params::ABSOLUTE_MIN)?;
                if *floor == Floor::Production && !params.meets_floor() {
                    return Err(StoreError::WeakKdfParams {
                        min_m_cost_kib: Argon2Params::DEFAULT.m_cost_kib,
                        min_t_cost: Argon2Params::DEFAULT.t_cost,
                        m_cost_kib: params.m_cost_kib,
                        t_cost: params.t_cost,
                    });
                }
                argon2id(passphrase.as_bytes(), salt, params)
            }
            (Inner::Key(_), Some(_)) => Err(StoreError::SecretKindMismatch {
                expected: SecretKind::Passphrase.describe(),
                found: SecretKind::Key.describe(),
            }),
            (Inner::Passphrase { .. }, None) => Err(StoreError::SecretKindMismatch {
                expected: SecretKind::Key.describe(),
                found: SecretKind::Passphrase.describe(),
            }),
        }
    }
}

/// Argon2id (version 0x13) of `passphrase` with `salt`, 32 bytes out. The
/// parameters must already have been range-checked.
fn argon2id(
    passphrase: &[u8],
    salt: &[u8],
    params: &Argon2Params,
) -> Result<Zeroizing<[u8; KEY_LEN]>, StoreError> {
    let argon_params = argon2::Params::new(
        params.m_cost_kib,
        params.t_cost,
        params.p_cost,
        Some(KEY_LEN),
    )
    .map_err(|_| StoreError::Crypto("checking the Argon2id parameters"))?;
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon_params,
    );
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    argon
        .hash_password_into(passphrase, salt, out.as_mut_slice())
        .map_err(|_| StoreError::Crypto("stretching the passphrase with Argon2id"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn param_bounds_are_checked_without_allocating() {
        let hostile = Argon2Params {
            m_cost_kib: 100 * 1024 * 1024,
            t_cost: 1,
            p_cost: 1,
        };
        let err = hostile
            .check_range(&Argon2Params::ABSOLUTE_MIN)
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::KdfParamOutOfRange {
                    param: "m_cost_kib",
                    ..
                }
            ),
            "{err}"
        );
        for (t, p) in [(33, 1), (u32::MAX, 1), (1, 17), (0, 1), (1, 0)] {
            let params = Argon2Params {
                m_cost_kib: 1024,
                t_cost: t,
                p_cost: p,
            };
            assert!(params.check_range(&Argon2Params::ABSOLUTE_MIN).is_err());
        }
        // Argon2's own rule: at least 8 KiB per lane.
        let params = Argon2Params {
            m_cost_kib: 16,
            t_cost: 1,
            p_cost: 4,
        };
        assert!(params.check_range(&Argon2Params::ABSOLUTE_MIN).is_err());
        Argon2Params::DEFAULT
            .check_range(&Argon2Params::DEFAULT)
            .unwrap();
        Argon2Params::MAX
            .check_range(&Argon2Params::DEFAULT)
            .unwrap();
    }

    /// The floor as numbers, not as the constant compared with itself:
    /// 64 MiB (65 536 KiB) and 3 passes, the figures the docs give.
    #[test]
    fn production_floor_is_64_mib_and_3_passes() {
        assert_eq!(
            Argon2Params::DEFAULT,
            Argon2Params {
                m_cost_kib: 65_536,
                t_cost: 3,
                p_cost: 1
            }
        );
        let at = |m_cost_kib, t_cost| Argon2Params {
            m_cost_kib,
            t_cost,
            p_cost: 1,
        };
        assert!(at(65_536, 3).meets_floor());
        assert!(at(1 << 20, 4).meets_floor());
        assert!(!at(65_535, 3).meets_floor());
        assert!(!at(65_536, 2).meets_floor());
        assert!(at(65_535, 3).check_range(&Argon2Params::DEFAULT).is_err());
        assert!(at(65_536, 2).check_range(&Argon2Params::DEFAULT).is_err());
    }

    #[test]
    fn weak_params_refused_for_production_secrets() {
        let secret = RootSecret::from_passphrase(Zeroizing::new("pw".to_owned())).unwrap();
        let err = secret
            .input_key(Some(&Argon2Params::DANGEROUS_FAST_FOR_TESTS), &[0u8; 32])
            .unwrap_err();
        assert!(matches!(err, StoreError::WeakKdfParams { .. }), "{err}");
        let fast = RootSecret::dangerous_fast_kdf_for_tests(Zeroizing::new("pw".to_owned()));
        fast.input_key(Some(&Argon2Params::DANGEROUS_FAST_FOR_TESTS), &[0u8; 32])
            .unwrap();
        assert!(RootSecret::from_passphrase(Zeroizing::new(String::new())).is_err());
        assert!(RootSecret::from_passphrase_with_params(
            Zeroizing::new("pw".to_owned()),
            Argon2Params::DANGEROUS_FAST_FOR_TESTS
        )
        .is_err());
    }

    #[test]
    fn argon2id_known_answers() {
        // Computed with the reference implementation (libargon2 20171227,
        // argon2id_hash_raw), so the parameters reach Argon2 in the right order.
        let salt: Vec<u8> = (0u8..32).collect();
        let pwd = b"correct horse battery staple";
        let cases = [
            (
                Argon2Params {
                    m_cost_kib: 256,
                    t_cost: 2,
                    p_cost: 1,
                },
                "4bbc77ab31fbde3a64cdc8081548f7f0b7ae57bfaf6029cf0276031718811bda",
            ),
            (
                Argon2Params {
                    m_cost_kib: 64,
                    t_cost: 1,
                    p_cost: 2,
                },
                "dc33c8b07d3a763ed843d8da4e030282cfe08514d72d66d0c9d52161f6e8e940",
            ),
        ];
        for (params, expected) in cases {
            let out = argon2id(pwd, &salt, &params).unwrap();
            assert_eq!(hex::encode(out.as_slice()), expected, "{params:?}");
        }
    }

    #[test]
    fn debug_is_redacted() {
        let secret = RootSecret::from_key_bytes(Zeroizing::new([0xab; KEY_LEN]));
        let text = format!("{secret:?}");
        assert!(!text.contains("ab, ") && !text.contains("171"), "{text}");
        assert!(text.contains("redacted"));
        let secret =
            RootSecret::dangerous_fast_kdf_for_tests(Zeroizing::new("hunter2-xyz".to_owned()));
        let text = format!("{secret:?}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}
