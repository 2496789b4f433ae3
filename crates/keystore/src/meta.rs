//! `store.meta`: the store's plaintext description and key-check value.
//!
//! ```json
//! {
//!   "format": "kluis-keystore",
//!   "version": 1,
//!   "secret": "passphrase",
//!   "kdf": {"algorithm": "argon2id", "version": 19,
//!           "m_cost_kib": 65536, "t_cost": 3, "p_cost": 1},
//!   "salt": "<32 bytes, hex>",
//!   "key_check": "<nonce 12 || AES-256-GCM(check key, constant) 32 || tag 16, hex>"
//! }
//! ```
//!
//! `secret` is `"key"` (key file or key bytes; then `kdf` is `null`) or
//! `"passphrase"`. The key check seals a constant under a key derived from the
//! root secret, with every other field of the file (canonically encoded) as
//! associated data: a wrong secret, or an altered field, gives
//! [`StoreError::WrongRootSecret`] instead of garbage. The file is read with a
//! 64 KiB bound, unknown fields are refused, and the KDF parameters are
//! range-checked before Argon2 allocates anything.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::crypto::{StoreKeys, TAG_LEN};
use crate::fsutil::{self, ReadError};
use crate::secret::{Argon2Params, RootSecret, SecretKind};
use crate::StoreError;

/// Name of the metadata file in the store directory.
pub(crate) const META_FILE: &str = "store.meta";
/// The `format` field.
const FORMAT_NAME: &str = "kluis-keystore";
/// The store format version this build reads and writes.
pub(crate) const FORMAT_VERSION: u32 = 1;
/// Largest `store.meta` read, bytes.
const MAX_META_LEN: u64 = 64 * 1024;
/// Length of the per-store salt, bytes.
const SALT_LEN: usize = 32;
/// Length of the key-check value: nonce, sealed constant, tag.
const KEY_CHECK_LEN: usize = 12 + 32 + TAG_LEN;
/// Argon2 version 0x13.
const ARGON2_VERSION: u32 = 0x13;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetaJson {
    format: String,
    version: u64,
    secret: String,
    kdf: Option<KdfJson>,
    salt: String,
    key_check: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KdfJson {
    algorithm: String,
    version: u64,
    m_cost_kib: u64,
    t_cost: u64,
    p_cost: u64,
}

/// The parsed, validated metadata.
#[derive(Debug)]
pub(crate) struct Meta {
    kind: SecretKind,
    kdf: Option<Argon2Params>,
    salt: [u8; SALT_LEN],
    key_check: [u8; KEY_CHECK_LEN],
}

impl Meta {
    /// New metadata for `secret`: a fresh salt, the secret's KDF parameters,
    /// and the key-check value. Returns the store keys too.
    pub(crate) fn create(secret: &RootSecret) -> Result<(Self, StoreKeys), StoreError> {
        let mut salt = [0u8; SALT_LEN];
        aws_lc_rs::rand::fill(&mut salt).map_err(|_| StoreError::Crypto("drawing a salt"))?;
        let mut meta = Self {
            kind: secret.kind(),
            kdf: secret.init_params(),
            salt,
            key_check: [0u8; KEY_CHECK_LEN],
        };
        let ikm = secret.input_key(meta.kdf.as_ref(), &meta.salt)?;
        let keys = StoreKeys::derive(&ikm, &meta.salt)?;
        let mut constant = *crate::crypto::KEY_CHECK_PLAINTEXT;
        let sealed = keys.check().seal(&[], &meta.aad(), &mut constant)?;
        if sealed.len() != KEY_CHECK_LEN {
            return Err(StoreError::Crypto("sealing the key-check value"));
        }
        meta.key_check.copy_from_slice(&sealed);
        Ok((meta, keys))
    }

    /// Derives the store keys from `secret` and checks them against the
    /// key-check value.
    pub(crate) fn unlock(&self, secret: &RootSecret) -> Result<StoreKeys, StoreError> {
        if secret.kind() != self.kind {
            return Err(StoreError::SecretKindMismatch {
                expected: self.kind.describe(),
                found: secret.kind().describe(),
            });
        }
        let ikm = secret.input_key(self.kdf.as_ref(), &self.salt)?;
        let keys = StoreKeys::derive(&ikm, &self.salt)?;
        match keys.check().open(&self.aad(), &self.key_check) {
            Some(plain) if plain.as_slice() == crate::crypto::KEY_CHECK_PLAINTEXT => Ok(keys),
            _ => Err(StoreError::WrongRootSecret),
        }
    }

    /// The canonical encoding of every field but the key check, bound into it.
    fn aad(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        out.extend_from_slice(b"kluis-store-v1 meta\0");
        out.extend_from_slice(FORMAT_NAME.as_bytes());
        out.push(0);
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        match (self.kind, &self.kdf) {
            (SecretKind::Key, _) => out.push(1),
            (SecretKind::Passphrase, None) => out.push(2),
            (SecretKind::Passphrase, Some(params)) => {
                out.push(2);
                out.extend_from_slice(&ARGON2_VERSION.to_be_bytes());
                out.extend_from_slice(&params.m_cost_kib.to_be_bytes());
                out.extend_from_slice(&params.t_cost.to_be_bytes());
                out.extend_from_slice(&params.p_cost.to_be_bytes());
            }
        }
        out.extend_from_slice(&self.salt);
        out
    }

    /// The JSON text of `store.meta`.
    pub(crate) fn to_json(&self) -> Result<Vec<u8>, StoreError> {
        let json = MetaJson {
            format: FORMAT_NAME.to_owned(),
            version: FORMAT_VERSION.into(),
            secret: match self.kind {
                SecretKind::Key => "key",
                SecretKind::Passphrase => "passphrase",
            }
            .to_owned(),
            kdf: self.kdf.map(|params| KdfJson {
                algorithm: "argon2id".to_owned(),
                version: ARGON2_VERSION.into(),
                m_cost_kib: params.m_cost_kib.into(),
                t_cost: params.t_cost.into(),
                p_cost: params.p_cost.into(),
            }),
            salt: hex::encode(self.salt),
            key_check: hex::encode(self.key_check),
        };
        let mut text = serde_json::to_vec_pretty(&json)
            .map_err(|_| StoreError::Crypto("encoding the store metadata"))?;
        text.push(b'\n');
        Ok(text)
    }

    /// Reads and validates `dir/store.meta`.
    pub(crate) fn read(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(META_FILE);
        let invalid = |reason: String| StoreError::InvalidMeta {
            path: path.clone(),
            reason,
        };
        let text = match fsutil::read_bounded(&path, MAX_META_LEN) {
            Ok(text) => text,
            Err(ReadError::NotFound) => {
                return Err(StoreError::NotAStore {
                    path: dir.to_owned(),
                    reason: "store.meta is missing",
                })
            }
            Err(ReadError::NotRegular) => {
                return Err(invalid("not a regular file".to_owned()));
            }
            Err(ReadError::TooLarge(found)) => {
                return Err(StoreError::TooLarge {
                    what: "store.meta",
                    limit: MAX_META_LEN,
                    found,
                })
            }
            Err(ReadError::Io(err)) => return Err(StoreError::io("read", &path, err)),
        };
        Self::parse(&text, &path)
    }

    /// Parses and validates the text of `store.meta` (kept at `path`, a file
    /// or, for a database store, the database's name in messages).
    pub(crate) fn parse(text: &[u8], path: &Path) -> Result<Self, StoreError> {
        let invalid = |reason: String| StoreError::InvalidMeta {
            path: path.to_owned(),
            reason,
        };
        if u64::try_from(text.len()).unwrap_or(u64::MAX) > MAX_META_LEN {
            return Err(StoreError::TooLarge {
                what: "store.meta",
                limit: MAX_META_LEN,
                found: u64::try_from(text.len()).unwrap_or(u64::MAX),
            });
        }
        let json: MetaJson = serde_json::from_slice(text)
            .map_err(|err| invalid(format!("not the expected JSON: {err}")))?;
        Self::from_json(json).map_err(|err| match err {
            MetaFieldError::Store(err) => err,
            MetaFieldError::Invalid(reason) => invalid(reason),
        })
    }

    fn from_json(json: MetaJson) -> Result<Self, MetaFieldError> {
        if json.format != FORMAT_NAME {
            return Err(MetaFieldError::Invalid(format!(
                "format: expected {FORMAT_NAME:?}, found {:?}",
                json.format
            )));
        }
        if json.version != u64::from(FORMAT_VERSION) {
            return Err(StoreError::UnsupportedVersion {
                expected: FORMAT_VERSION,
                found: json.version,
            }
            .into());
        }
        let kind = match json.secret.as_str() {
            "key" => SecretKind::Key,
            "passphrase" => SecretKind::Passphrase,
            other => {
                return Err(MetaFieldError::Invalid(format!(
                    "secret: expected \"key\" or \"passphrase\", found {other:?}"
                )))
            }
        };
        let kdf = match (kind, json.kdf) {
            (SecretKind::Key, None) => None,
            (SecretKind::Key, Some(_)) => {
                return Err(MetaFieldError::Invalid(
                    "kdf: expected null for a key secret".to_owned(),
                ))
            }
            (SecretKind::Passphrase, None) => {
                return Err(MetaFieldError::Invalid(
                    "kdf: expected Argon2id parameters for a passphrase secret".to_owned(),
                ))
            }
            (SecretKind::Passphrase, Some(kdf)) => Some(parse_kdf(&kdf)?),
        };
        let salt = decode_fixed::<SALT_LEN>("salt", &json.salt)?;
        let key_check = decode_fixed::<KEY_CHECK_LEN>("key_check", &json.key_check)?;
        Ok(Self {
            kind,
            kdf,
            salt,
            key_check,
        })
    }
}

enum MetaFieldError {
    Store(StoreError),
    Invalid(String),
}

impl From<StoreError> for MetaFieldError {
    fn from(err: StoreError) -> Self {
        Self::Store(err)
    }
}

fn parse_kdf(kdf: &KdfJson) -> Result<Argon2Params, MetaFieldError> {
    if kdf.algorithm != "argon2id" {
        return Err(MetaFieldError::Invalid(format!(
            "kdf.algorithm: expected \"argon2id\", found {:?}",
            kdf.algorithm
        )));
    }
    if kdf.version != u64::from(ARGON2_VERSION) {
        return Err(MetaFieldError::Invalid(format!(
            "kdf.version: expected {ARGON2_VERSION}, found {}",
            kdf.version
        )));
    }
    let (min, max) = (Argon2Params::ABSOLUTE_MIN, Argon2Params::MAX);
    let narrow = |param: &'static str, value: u64, min: u32, max: u32| {
        u32::try_from(value).map_err(|_| StoreError::KdfParamOutOfRange {
            param,
            min: min.into(),
            max: max.into(),
            found: value,
        })
    };
    let params = Argon2Params {
        m_cost_kib: narrow("m_cost_kib", kdf.m_cost_kib, min.m_cost_kib, max.m_cost_kib)?,
        t_cost: narrow("t_cost", kdf.t_cost, min.t_cost, max.t_cost)?,
        p_cost: narrow("p_cost", kdf.p_cost, min.p_cost, max.p_cost)?,
    };
    params.check_range(&Argon2Params::ABSOLUTE_MIN)?;
    Ok(params)
}

fn decode_fixed<const N: usize>(field: &str, text: &str) -> Result<[u8; N], MetaFieldError> {
    let mut out = [0u8; N];
    if text.len() != N.saturating_mul(2) {
        return Err(MetaFieldError::Invalid(format!(
            "{field}: expected {} hex digits, found {} characters",
            N.saturating_mul(2),
            text.len()
        )));
    }
    hex::decode_to_slice(text, &mut out)
        .map_err(|_| MetaFieldError::Invalid(format!("{field}: not hexadecimal")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use zeroize::Zeroizing;

    fn write_meta(dir: &Path, json: &serde_json::Value) {
        std::fs::write(dir.join(META_FILE), serde_json::to_vec(json).unwrap()).unwrap();
    }

    fn fast() -> RootSecret {
        RootSecret::dangerous_fast_kdf_for_tests(Zeroizing::new("pw".to_owned()))
    }

    #[test]
    fn round_trip_and_wrong_secret() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, _keys) = Meta::create(&fast()).unwrap();
        std::fs::write(dir.path().join(META_FILE), meta.to_json().unwrap()).unwrap();
        let read = Meta::read(dir.path()).unwrap();
        read.unlock(&fast()).unwrap();
        let wrong = RootSecret::dangerous_fast_kdf_for_tests(Zeroizing::new("px".to_owned()));
        assert!(matches!(
            read.unlock(&wrong),
            Err(StoreError::WrongRootSecret)
        ));
        let key = RootSecret::from_key_bytes(Zeroizing::new([1u8; 32]));
        assert!(matches!(
            read.unlock(&key),
            Err(StoreError::SecretKindMismatch { .. })
        ));
    }

    #[test]
    fn altered_fields_are_a_wrong_secret_not_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, _keys) = Meta::create(&fast()).unwrap();
        let good: serde_json::Value = serde_json::from_slice(&meta.to_json().unwrap()).unwrap();
        // A higher t_cost (still within bounds) changes the derived key.
        let mut json = good.clone();
        json["kdf"]["t_cost"] = 2.into();
        write_meta(dir.path(), &json);
        let read = Meta::read(dir.path()).unwrap();
        assert!(matches!(
            read.unlock(&fast()),
            Err(StoreError::WrongRootSecret)
        ));
        // A different key-check value.
        let mut json = good;
        let check = json["key_check"].as_str().unwrap().to_owned();
        let flipped = format!(
            "{}{}",
            &check[..10],
            if &check[10..11] == "0" { "1" } else { "0" }
        );
        json["key_check"] = format!("{flipped}{}", &check[11..]).into();
        write_meta(dir.path(), &json);
        let read = Meta::read(dir.path()).unwrap();
        assert!(matches!(
            read.unlock(&fast()),
            Err(StoreError::WrongRootSecret)
        ));
    }

    #[test]
    fn hostile_meta_is_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, _keys) = Meta::create(&fast()).unwrap();
        let good: serde_json::Value = serde_json::from_slice(&meta.to_json().unwrap()).unwrap();
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            ("m_cost_kib", (100u64 << 20).into(), "m_cost_kib"),
            ("m_cost_kib", u64::MAX.into(), "m_cost_kib"),
            ("t_cost", 1_000_000.into(), "t_cost"),
            ("p_cost", 0xFF_FFFF.into(), "p_cost"),
            ("t_cost", 0.into(), "t_cost"),
        ];
        for (field, value, param) in cases {
            let mut json = good.clone();
            json["kdf"][field] = value;
            write_meta(dir.path(), &json);
            let err = Meta::read(dir.path()).unwrap_err();
            assert!(
                matches!(err, StoreError::KdfParamOutOfRange { param: p, .. } if p == param),
                "{field}: {err}"
            );
        }
        let mut json = good.clone();
        json["extra"] = 1.into();
        write_meta(dir.path(), &json);
        assert!(matches!(
            Meta::read(dir.path()),
            Err(StoreError::InvalidMeta { .. })
        ));
        let mut json = good.clone();
        json["version"] = 2.into();
        write_meta(dir.path(), &json);
        assert!(matches!(
            Meta::read(dir.path()),
            Err(StoreError::UnsupportedVersion { found: 2, .. })
        ));
        let mut json = good.clone();
        json["salt"] = "00".into();
        write_meta(dir.path(), &json);
        assert!(matches!(
            Meta::read(dir.path()),
            Err(StoreError::InvalidMeta { .. })
        ));
        let mut json = good;
        json["kdf"]["algorithm"] = "argon2i".into();
        write_meta(dir.path(), &json);
        assert!(matches!(
            Meta::read(dir.path()),
            Err(StoreError::InvalidMeta { .. })
        ));
        // A sparse 10 GiB store.meta is refused without being read.
        let file = std::fs::File::create(dir.path().join(META_FILE)).unwrap();
        file.set_len(10 << 30).unwrap();
        assert!(matches!(
            Meta::read(dir.path()),
            Err(StoreError::TooLarge { .. })
        ));
        std::fs::remove_file(dir.path().join(META_FILE)).unwrap();
        assert!(matches!(
            Meta::read(dir.path()),
            Err(StoreError::NotAStore { .. })
        ));
    }
}
