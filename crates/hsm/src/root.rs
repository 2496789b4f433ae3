//! `hsm.json`: how a store in HSM mode finds its token, its wrapped root key
//! and its identity key; and the identity as a signer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kluis_keystore::{Zeroizing, KEY_LEN};
use kluis_proto::{IdentityError, IdentitySigner, VerifierIdentity, SHA384_LEN};
use serde::{Deserialize, Serialize};

use crate::token::{Token, TokenConfig, P384_POINT_LEN, P384_SIGNATURE_LEN};
use crate::HsmError;

/// Name of the HSM configuration file in the store directory.
pub const HSM_CONFIG_FILE: &str = "hsm.json";
const FORMAT_NAME: &str = "kluis-hsm";
const FORMAT_VERSION: u64 = 1;
const MAX_CONFIG_LEN: u64 = 64 * 1024;
/// Domain label of the root key's wrap.
const ROOT_AAD_LABEL: &[u8] = b"kluis-store-root-v1\0";

/// The contents of `hsm.json` (plaintext; nothing in it is secret):
///
/// ```json
/// {"format": "kluis-hsm", "version": 1,
///  "module": "/usr/lib/softhsm/libsofthsm2.so", "token": "kluis-prod",
///  "root_key_id": "kluis-store-root:<16 hex>", "wrapped_root": "<hex>",
///  "identity_key_id": "kluis-identity:<16 hex>", "identity_public_key": "<194 hex>"}
/// ```
///
/// The store's root secret (32 random bytes from which the record keys are
/// derived) exists only wrapped by the token key `root_key_id`
/// (`iv || AES-256-GCM || tag`, associated data `"kluis-store-root-v1\0" ||
/// token label`); the identity key pair `identity_key_id` is generated in
/// the token, and its public key recorded here is checked against the token
/// at every start. Ids carry a random suffix so several stores can share a
/// token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmStoreConfig {
    format: String,
    version: u64,
    /// The PKCS#11 module.
    pub module: PathBuf,
    /// The token's label.
    pub token: String,
    /// `CKA_ID` of the AES key wrapping the store's root secret.
    pub root_key_id: String,
    wrapped_root: String,
    /// `CKA_ID` of the verifier identity key pair.
    pub identity_key_id: String,
    identity_public_key: String,
}

fn random_suffix() -> Result<String, HsmError> {
    let mut bytes = [0u8; 8];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| HsmError::Unexpected("no randomness"))?;
    Ok(hex::encode(bytes))
}

fn root_aad(token: &str) -> Vec<u8> {
    let mut aad = ROOT_AAD_LABEL.to_vec();
    aad.extend_from_slice(token.as_bytes());
    aad
}

impl HsmStoreConfig {
    /// Makes the token objects of a new store — the root-wrapping key and
    /// the identity key pair — and a fresh root secret, returned with the
    /// configuration that records its wrap.
    pub fn create(token: &Token) -> Result<(Self, Zeroizing<[u8; KEY_LEN]>), HsmError> {
        let suffix = random_suffix()?;
        let root_key_id = format!("kluis-store-root:{suffix}");
        let identity_key_id = format!("kluis-identity:{suffix}");
        token.generate_aes_key(
            root_key_id.as_bytes(),
            &format!("kluis:store-root:{suffix}"),
        )?;
        let mut root = Zeroizing::new([0u8; KEY_LEN]);
        aws_lc_rs::rand::fill(root.as_mut_slice())
            .map_err(|_| HsmError::Unexpected("no randomness"))?;
        let wrapped = token.encrypt_gcm(
            root_key_id.as_bytes(),
            root.as_slice(),
            &root_aad(&token.config().token),
        )?;
        let public = token.generate_p384(
            identity_key_id.as_bytes(),
            &format!("kluis:verifier-identity:{suffix}"),
        )?;
        let config = Self {
            format: FORMAT_NAME.to_owned(),
            version: FORMAT_VERSION,
            module: token.config().module.clone(),
            token: token.config().token.clone(),
            root_key_id,
            wrapped_root: hex::encode(wrapped),
            identity_key_id,
            identity_public_key: hex::encode(public),
        };
        Ok((config, root))
    }

    /// Where the token is.
    pub fn token_config(&self) -> TokenConfig {
        TokenConfig {
            module: self.module.clone(),
            token: self.token.clone(),
        }
    }

    /// Unwraps the store's root secret inside the token.
    pub fn unwrap_root(&self, token: &Token) -> Result<Zeroizing<[u8; KEY_LEN]>, HsmError> {
        let wrapped = hex::decode(&self.wrapped_root)
            .map_err(|_| HsmError::Config("wrapped_root is not hexadecimal".to_owned()))?;
        let plain = token
            .decrypt_gcm(
                self.root_key_id.as_bytes(),
                &wrapped,
                &root_aad(&self.token),
            )
            .map_err(|e| match e {
                HsmError::DoesNotAuthenticate => HsmError::Config(
                    "the wrapped store root does not authenticate under the token's root key \
                     (hsm.json altered, or another token)"
                        .to_owned(),
                ),
                other => other,
            })?;
        let mut root = Zeroizing::new([0u8; KEY_LEN]);
        if plain.len() != KEY_LEN {
            return Err(HsmError::Unexpected("the store root is not 32 bytes"));
        }
        root.copy_from_slice(&plain);
        Ok(root)
    }

    /// The verifier identity held by the token, checked against the public
    /// key recorded at `init` and by a test signature.
    pub fn identity(&self, token: Arc<Token>) -> Result<VerifierIdentity, HsmError> {
        let recorded: [u8; P384_POINT_LEN] = hex::decode(&self.identity_public_key)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| {
                HsmError::Config("identity_public_key is not a hex P-384 point".to_owned())
            })?;
        let in_token = token.p384_public(self.identity_key_id.as_bytes())?;
        if in_token != recorded {
            return Err(HsmError::Config(
                "the token's identity key is not the one recorded at init".to_owned(),
            ));
        }
        let signer = Arc::new(TokenSigner {
            token,
            id: self.identity_key_id.as_bytes().to_vec(),
        });
        VerifierIdentity::external(recorded, signer)
            .map_err(|e| HsmError::Config(format!("identity key: {e}")))
    }

    /// Reads `dir/hsm.json`; `None` when the store is not in HSM mode.
    pub fn read(dir: &Path) -> Result<Option<Self>, HsmError> {
        let path = dir.join(HSM_CONFIG_FILE);
        let Some(text) = kluis_keystore::read_small_file(&path, MAX_CONFIG_LEN)
            .map_err(|e| HsmError::Config(e.to_string()))?
        else {
            return Ok(None);
        };
        Self::parse(&text, &path.display().to_string()).map(Some)
    }

    /// The name under which a store in a database keeps this setting.
    pub const DATABASE_SETTING: &'static str = "hsm";

    /// Parses the JSON of `hsm.json` (from `source`, for messages).
    pub fn parse(text: &[u8], source: &str) -> Result<Self, HsmError> {
        if u64::try_from(text.len()).unwrap_or(u64::MAX) > MAX_CONFIG_LEN {
            return Err(HsmError::Config(format!("{source}: too large")));
        }
        let config: Self =
            serde_json::from_slice(text).map_err(|e| HsmError::Config(format!("{source}: {e}")))?;
        if config.format != FORMAT_NAME || config.version != FORMAT_VERSION {
            return Err(HsmError::Config(format!(
                "{source}: expected format {FORMAT_NAME:?} version {FORMAT_VERSION}, found {:?} version {}",
                config.format,
                config.version
            )));
        }
        Ok(config)
    }

    /// The JSON of `hsm.json`.
    pub fn to_json(&self) -> Result<Vec<u8>, HsmError> {
        let mut text = serde_json::to_vec_pretty(self)
            .map_err(|e| HsmError::Config(format!("encoding hsm.json: {e}")))?;
        text.push(b'\n');
        Ok(text)
    }

    /// Writes `dir/hsm.json` (mode 0600) atomically and durably; refuses to
    /// replace one.
    pub fn write_new(&self, dir: &Path) -> Result<(), HsmError> {
        let text = self.to_json()?;
        match kluis_keystore::write_new_file(dir, HSM_CONFIG_FILE, &text) {
            Ok(true) => Ok(()),
            Ok(false) => Err(HsmError::Config(format!(
                "{} exists",
                dir.join(HSM_CONFIG_FILE).display()
            ))),
            Err(e) => Err(HsmError::Config(e.to_string())),
        }
    }
}

/// The verifier identity key in a token, as an [`IdentitySigner`].
#[derive(Debug)]
pub struct TokenSigner {
    token: Arc<Token>,
    id: Vec<u8>,
}

impl IdentitySigner for TokenSigner {
    fn sign_sha384_digest(
        &self,
        digest: &[u8; SHA384_LEN],
    ) -> Result<[u8; P384_SIGNATURE_LEN], IdentityError> {
        self.token
            .sign_p384(&self.id, digest)
            .map_err(|e| IdentityError::External {
                detail: e.to_string(),
            })
    }
}
