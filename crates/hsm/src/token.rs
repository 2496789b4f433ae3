//! One PKCS#11 token: the module, the slot, the user login and a pool of
//! sessions; the few operations Kluis needs, each by object id.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{
    Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::HsmError;

/// Length of the AES-GCM nonce Kluis draws for every encryption.
pub const GCM_IV_LEN: usize = 12;
/// Length of the AES-GCM tag.
pub const GCM_TAG_LEN: usize = 16;
/// Length of an uncompressed P-384 point.
pub const P384_POINT_LEN: usize = 97;
/// Length of a raw P-384 ECDSA signature (`r || s`).
pub const P384_SIGNATURE_LEN: usize = 96;
/// Most idle sessions kept open for reuse.
const MAX_IDLE_SESSIONS: usize = 16;
/// DER of the secp384r1 object identifier (1.3.132.0.34): `CKA_EC_PARAMS`.
const SECP384R1_OID_DER: [u8; 7] = [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
/// Longest token label (PKCS#11 pads token labels to 32 bytes).
pub const MAX_TOKEN_LABEL_LEN: usize = 32;
/// Longest PIN read.
pub const MAX_PIN_LEN: usize = 256;

/// Where the token is: the module (shared library) and the token's label.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenConfig {
    /// Path of the PKCS#11 module (`libsofthsm2.so`, a vendor's library).
    pub module: PathBuf,
    /// The token's label (`CKA_LABEL` of the token, up to 32 bytes).
    pub token: String,
}

/// An open, logged-in token.
///
/// Sessions are pooled: an operation takes an idle session (or opens one),
/// and gives it back when it succeeded. A session the token dropped (closed,
/// invalid handle, logged out, device error) is replaced once — the
/// operation is retried on a fresh, logged-in session — and a second
/// failure is returned: nothing loops. A PIN the token refused is never
/// presented again by this handle, so a changed PIN cannot lock the token
/// out through retries.
pub struct Token {
    ctx: Pkcs11,
    slot: Mutex<Slot>,
    config: TokenConfig,
    pin: AuthPin,
    pin_digest: [u8; 32],
    pool: Mutex<Vec<Session>>,
    pin_refused: Mutex<bool>,
    /// Object handles found by `CKA_ID` (handles are valid in every session
    /// of the application). An entry is dropped when this handle destroys
    /// the object, and when the token says the handle is no longer valid
    /// (destroyed by another process), which sends the lookup back to the
    /// token.
    handles: Mutex<HandleCache>,
}

/// Object handles by (class, `CKA_ID`), tagged with the generation of the
/// module's sessions they were found under. A reconnect starts a new
/// generation (a restarted module may give old numbers to other objects),
/// and a handle found under an older one is never cached.
#[derive(Default)]
struct HandleCache {
    generation: u64,
    map: HashMap<(u8, Vec<u8>), ObjectHandle>,
}

impl HandleCache {
    fn forget_all(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.map.clear();
    }
}

/// Classes of the objects looked up by id, as cache keys.
#[derive(Clone, Copy)]
enum Class {
    Secret = 1,
    Private = 2,
    Public = 3,
}

impl Class {
    fn object_class(self) -> ObjectClass {
        match self {
            Class::Secret => ObjectClass::SECRET_KEY,
            Class::Private => ObjectClass::PRIVATE_KEY,
            Class::Public => ObjectClass::PUBLIC_KEY,
        }
    }
}

/// Whether `e` says an object handle is not (or no longer) valid.
fn handle_invalid(e: &HsmError) -> bool {
    matches!(
        e,
        HsmError::Pkcs11 {
            source: CkError::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _),
            ..
        }
    )
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("module", &self.config.module)
            .field("token", &self.config.token)
            .field("pin", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Modules loaded by this process: `C_Initialize` may be called once per
/// module and process, so every [`Token`] on the same module shares it.
fn modules() -> &'static Mutex<HashMap<PathBuf, Pkcs11>> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    MODULES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Digests of login PINs by (module path, token label).
type Logins = HashMap<(PathBuf, String), [u8; 32]>;

/// SHA-256 of the PIN each (module, token) was logged in with by this
/// process. PKCS#11 login is per application: once one handle logged in,
/// `C_Login` says "already logged in" whatever PIN a second handle gives,
/// so a second handle's PIN is compared with the first's instead.
fn logins() -> &'static Mutex<Logins> {
    static LOGINS: OnceLock<Mutex<Logins>> = OnceLock::new();
    LOGINS.get_or_init(|| Mutex::new(HashMap::new()))
}

fn pin_digest(pin: &str) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, pin.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn load_module(path: &Path) -> Result<Pkcs11, HsmError> {
    let missing = |detail: String| HsmError::Module {
        path: path.to_owned(),
        detail,
    };
    let canonical = std::fs::canonicalize(path).map_err(|e| missing(e.to_string()))?;
    let meta = std::fs::metadata(&canonical).map_err(|e| missing(e.to_string()))?;
    if !meta.is_file() {
        return Err(missing("not a regular file".to_owned()));
    }
    {
        use std::os::unix::fs::MetadataExt as _;
        // The module runs with the verifier's rights and sees the PIN: a
        // library someone else may rewrite or replace would hand them the
        // keys. It and its directory must belong to root or to this user,
        // and be writable by no one else.
        let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
        let trusted_owner = |uid: u32| uid == 0 || Some(uid) == me;
        if !trusted_owner(meta.uid()) {
            return Err(missing(format!(
                "it belongs to uid {}, not to root or this user",
                meta.uid()
            )));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(missing(format!(
                "mode {:04o} lets group or others write it",
                meta.mode() & 0o7777
            )));
        }
        if let Some(parent) = canonical.parent() {
            let dir = std::fs::metadata(parent).map_err(|e| missing(e.to_string()))?;
            if !trusted_owner(dir.uid()) || dir.mode() & 0o022 != 0 {
                return Err(missing(format!(
                    "its directory {} may be written by others (owner uid {}, mode {:04o})",
                    parent.display(),
                    dir.uid(),
                    dir.mode() & 0o7777
                )));
            }
        }
    }
    let mut modules = lock(modules());
    if let Some(ctx) = modules.get(&canonical) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(&canonical).map_err(|e| missing(format!("cannot load it: {e}")))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(missing(format!("C_Initialize failed: {e}"))),
    }
    modules.insert(canonical, ctx.clone());
    Ok(ctx)
}

/// Whether `e` means the session is gone (and a fresh one may succeed).
fn session_lost(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::UserNotLoggedIn
                | RvError::CryptokiNotInitialized,
            _
        )
    )
}

/// The label of the token in `slot`, trimmed of its padding.
fn token_label(ctx: &Pkcs11, slot: Slot) -> Option<String> {
    ctx.get_token_info(slot)
        .ok()
        .map(|info| info.label().trim_end().to_owned())
}

/// The slot holding the initialised token labelled `label`.
fn find_slot(ctx: &Pkcs11, label: &str) -> Result<Slot, HsmError> {
    let slots = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| HsmError::op("listing slots", e))?;
    let mut present = Vec::new();
    for slot in slots {
        if let Some(found) = token_label(ctx, slot) {
            if found == label {
                return Ok(slot);
            }
            present.push(found);
        }
    }
    Err(HsmError::TokenNotFound {
        label: label.to_owned(),
        present,
    })
}

impl Token {
    /// Loads the module, finds the token by label and logs in with `pin`.
    ///
    /// Errors: [`HsmError::Module`] (missing, unsafe or not a PKCS#11
    /// module), [`HsmError::TokenNotFound`] (listing the labels present),
    /// [`HsmError::WrongPin`] and [`HsmError::PinLocked`].
    pub fn open(config: &TokenConfig, pin: Zeroizing<String>) -> Result<Self, HsmError> {
        if config.token.is_empty() || config.token.len() > MAX_TOKEN_LABEL_LEN {
            return Err(HsmError::Config(format!(
                "token label must be 1 to {MAX_TOKEN_LABEL_LEN} bytes"
            )));
        }
        if pin.is_empty() || pin.len() > MAX_PIN_LEN {
            return Err(HsmError::Config(format!(
                "the PIN must be 1 to {MAX_PIN_LEN} bytes"
            )));
        }
        let ctx = load_module(&config.module)?;
        let slot = find_slot(&ctx, &config.token)?;
        let token = Self {
            ctx,
            slot: Mutex::new(slot),
            config: config.clone(),
            pin_digest: pin_digest(&pin),
            pin: AuthPin::from(pin.as_str()),
            pool: Mutex::new(Vec::new()),
            pin_refused: Mutex::new(false),
            handles: Mutex::new(HandleCache::default()),
        };
        // Log in now, so a wrong PIN is reported by `open`.
        let session = token.open_session()?;
        token.give_back(session);
        Ok(token)
    }

    /// Where the token is.
    pub fn config(&self) -> &TokenConfig {
        &self.config
    }

    fn open_session(&self) -> Result<Session, HsmError> {
        if *lock(&self.pin_refused) {
            return Err(HsmError::WrongPin {
                token: self.config.token.clone(),
            });
        }
        let slot = *lock(&self.slot);
        let login_key = (self.config.module.clone(), self.config.token.clone());
        let session = self
            .ctx
            .open_rw_session(slot)
            .map_err(|e| HsmError::op("opening a session", e))?;
        let refused = || {
            *lock(&self.pin_refused) = true;
            HsmError::WrongPin {
                token: self.config.token.clone(),
            }
        };
        // Never spend the token's last attempts: a PIN the token is about
        // to lock is refused here, with the reason.
        if let Ok(info) = self.ctx.get_token_info(slot) {
            if info.user_pin_locked() {
                return Err(HsmError::PinLocked {
                    token: self.config.token.clone(),
                });
            }
            if info.user_pin_final_try() {
                return Err(HsmError::PinFinalTry {
                    token: self.config.token.clone(),
                });
            }
        }
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) => {
                lock(logins()).insert(login_key, self.pin_digest);
                Ok(session)
            }
            Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                match lock(logins()).get(&login_key) {
                    Some(digest) if *digest == self.pin_digest => Ok(session),
                    _ => Err(refused()),
                }
            }
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => Err(refused()),
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(HsmError::PinLocked {
                token: self.config.token.clone(),
            }),
            Err(e) => Err(HsmError::op("logging in", e)),
        }
    }

    fn give_back(&self, session: Session) {
        let mut pool = lock(&self.pool);
        if pool.len() < MAX_IDLE_SESSIONS {
            pool.push(session);
        }
    }

    /// Runs `op` on a pooled session; on a lost session, once more on a
    /// fresh one (dropping every idle session, which share its fate).
    fn with_session<T>(
        &self,
        what: &'static str,
        op: impl Fn(&Session) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        self.with_session_retry(what, true, op)
    }

    /// As [`Token::with_session`], but an operation that creates objects is
    /// not retried: the lost session may have created the object already,
    /// and a second one under the same id would make it ambiguous. It fails
    /// with [`HsmError::SessionLost`] instead (the caller's next attempt uses
    /// a new id).
    fn with_session_once<T>(
        &self,
        what: &'static str,
        op: impl Fn(&Session) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        self.with_session_retry(what, false, op)
    }

    fn with_session_retry<T>(
        &self,
        what: &'static str,
        retry: bool,
        op: impl Fn(&Session) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let idle = lock(&self.pool).pop();
        let session = match idle {
            Some(session) => session,
            None => self.open_session()?,
        };
        match op(&session) {
            Ok(value) => {
                self.give_back(session);
                Ok(value)
            }
            Err(HsmError::Pkcs11 { ref source, .. }) if session_lost(source) => {
                drop(session);
                lock(&self.pool).clear();
                // A module that restarted may give old handle numbers to
                // other objects: forget them all.
                lock(&self.handles).forget_all();
                if !retry {
                    return Err(HsmError::SessionLost {
                        operation: what,
                        detail: "the session was lost; object-creating operations are not retried"
                            .to_owned(),
                    });
                }
                // The token may come back in another slot (a module that
                // restarted renumbers them): find it by label again.
                *lock(&self.slot) = find_slot(&self.ctx, &self.config.token)?;
                let fresh = self.open_session()?;
                let value = op(&fresh).map_err(|e| match e {
                    HsmError::Pkcs11 { source, .. } if session_lost(&source) => {
                        HsmError::SessionLost {
                            operation: what,
                            detail: source.to_string(),
                        }
                    }
                    other => other,
                })?;
                self.give_back(fresh);
                Ok(value)
            }
            Err(e) => {
                self.give_back(session);
                Err(e)
            }
        }
    }

    /// Restarts the module under this process (`C_Finalize`, then
    /// `C_Initialize`), as a token reset or a network HSM's dropped
    /// connection would: every open session and the login are gone. For
    /// tests of the reconnect path; it affects every token of the module in
    /// this process.
    #[doc(hidden)]
    pub fn restart_module_for_test(&self) -> Result<(), HsmError> {
        self.ctx
            .clone()
            .finalize()
            .map_err(|e| HsmError::op("finalizing the module", e))?;
        self.ctx
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| HsmError::op("initializing the module", e))
    }

    /// Runs `op` with the handle of the one object of `class` whose
    /// `CKA_ID` is `id`: a cached handle, or one found in the token (and
    /// found again once if the token no longer knows the cached one).
    fn with_object<T>(
        &self,
        session: &Session,
        class: Class,
        id: &[u8],
        op: impl Fn(ObjectHandle) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let key = (class as u8, id.to_vec());
        let (generation, cached) = {
            let cache = lock(&self.handles);
            (cache.generation, cache.map.get(&key).copied())
        };
        if let Some(handle) = cached {
            match op(handle) {
                Err(e) if handle_invalid(&e) => {
                    lock(&self.handles).map.remove(&key);
                }
                other => return other,
            }
        }
        let handle = Self::find(session, class.object_class(), id)?;
        {
            let mut cache = lock(&self.handles);
            if cache.generation == generation {
                cache.map.insert(key, handle);
            }
        }
        op(handle)
    }

    /// The one object of `class` whose `CKA_ID` is `id`.
    fn find(session: &Session, class: ObjectClass, id: &[u8]) -> Result<ObjectHandle, HsmError> {
        let handles = session
            .find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])
            .map_err(|e| HsmError::op("finding an object", e))?;
        match handles.as_slice() {
            [one] => {
                if class != ObjectClass::PUBLIC_KEY {
                    Self::check_ours(session, *one, class, id)?;
                }
                Ok(*one)
            }
            [] => Err(HsmError::ObjectMissing {
                id: String::from_utf8_lossy(id).into_owned(),
            }),
            _ => Err(HsmError::ObjectDuplicated {
                id: String::from_utf8_lossy(id).into_owned(),
                count: handles.len(),
            }),
        }
    }

    /// Refuses a secret or private key that lacks what every key Kluis
    /// generates has: made in the token (`CKA_LOCAL`), kept there, private
    /// (usable only after login), sensitive and never extractable since it
    /// was made, neither copyable, changeable nor usable to derive keys, of
    /// the key type Kluis makes. Anyone logged in to the token can destroy a
    /// key and create another with its id and a value they know; without
    /// this check, data keys would then be wrapped under that value. A
    /// created object cannot claim `CKA_LOCAL` or `CKA_NEVER_EXTRACTABLE`
    /// (the token sets them), so a planted key fails here; a key generated
    /// in its place with weaker attributes (public, say) fails on those.
    fn check_ours(
        session: &Session,
        handle: ObjectHandle,
        class: ObjectClass,
        id: &[u8],
    ) -> Result<(), HsmError> {
        let attributes = session
            .get_attributes(
                handle,
                &[
                    AttributeType::Token,
                    AttributeType::Local,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::AlwaysSensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                    AttributeType::Copyable,
                    AttributeType::Modifiable,
                    AttributeType::Derive,
                    AttributeType::KeyType,
                ],
            )
            .map_err(|e| HsmError::op("reading attributes", e))?;
        let key_type = if class == ObjectClass::SECRET_KEY {
            KeyType::AES
        } else {
            KeyType::EC
        };
        for (name, expected) in [
            ("CKA_KEY_TYPE", Attribute::KeyType(key_type)),
            ("CKA_TOKEN", Attribute::Token(true)),
            ("CKA_LOCAL", Attribute::Local(true)),
            ("CKA_PRIVATE", Attribute::Private(true)),
            ("CKA_COPYABLE", Attribute::Copyable(false)),
            ("CKA_MODIFIABLE", Attribute::Modifiable(false)),
            ("CKA_DERIVE", Attribute::Derive(false)),
            ("CKA_SENSITIVE", Attribute::Sensitive(true)),
            ("CKA_ALWAYS_SENSITIVE", Attribute::AlwaysSensitive(true)),
            ("CKA_EXTRACTABLE", Attribute::Extractable(false)),
            ("CKA_NEVER_EXTRACTABLE", Attribute::NeverExtractable(true)),
        ] {
            // An attribute the token did not return counts as wrong.
            if !attributes.contains(&expected) {
                return Err(HsmError::ObjectNotOurs {
                    id: String::from_utf8_lossy(id).into_owned(),
                    attribute: name,
                });
            }
        }
        Ok(())
    }

    /// Whether any object has `CKA_ID` `id`.
    pub fn exists(&self, id: &[u8]) -> Result<bool, HsmError> {
        self.with_session("finding an object", |session| {
            session
                .find_objects(&[Attribute::Id(id.to_vec())])
                .map(|handles| !handles.is_empty())
                .map_err(|e| HsmError::op("finding an object", e))
        })
    }

    /// Generates an AES-256 key in the token: a token object, private,
    /// sensitive, never extractable, usable only to encrypt and decrypt.
    pub fn generate_aes_key(&self, id: &[u8], label: &str) -> Result<(), HsmError> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
            Attribute::Copyable(false),
            Attribute::Modifiable(false),
            Attribute::Destroyable(true),
            Attribute::Id(id.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        self.with_session_once("generating an AES key", |session| {
            session
                .generate_key(&Mechanism::AesKeyGen, &template)
                .map(drop)
                .map_err(|e| HsmError::op("generating an AES key", e))
        })
    }

    /// Generates a P-384 key pair in the token (the private half sensitive,
    /// never extractable, sign-only) and returns the public point.
    pub fn generate_p384(&self, id: &[u8], label: &str) -> Result<[u8; P384_POINT_LEN], HsmError> {
        let public_template = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::Modifiable(false),
            Attribute::EcParams(SECP384R1_OID_DER.to_vec()),
            Attribute::Id(id.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        let private_template = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::Derive(false),
            Attribute::Copyable(false),
            Attribute::Modifiable(false),
            Attribute::Destroyable(true),
            Attribute::Id(id.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        self.with_session_once("generating a P-384 key pair", |session| {
            session
                .generate_key_pair(
                    &Mechanism::EccKeyPairGen,
                    &public_template,
                    &private_template,
                )
                .map(drop)
                .map_err(|e| HsmError::op("generating a P-384 key pair", e))
        })?;
        self.p384_public(id)
    }

    /// The public point of the P-384 key pair `id` (uncompressed SEC1).
    pub fn p384_public(&self, id: &[u8]) -> Result<[u8; P384_POINT_LEN], HsmError> {
        self.with_session("reading a public key", |session| {
            let attributes = self.with_object(session, Class::Public, id, |handle| {
                session
                    .get_attributes(handle, &[AttributeType::EcPoint])
                    .map_err(|e| HsmError::op("reading a public key", e))
            })?;
            let point = attributes.into_iter().find_map(|a| match a {
                Attribute::EcPoint(point) => Some(point),
                _ => None,
            });
            point
                .as_deref()
                .and_then(parse_ec_point)
                .ok_or(HsmError::Unexpected(
                    "CKA_EC_POINT is not an uncompressed P-384 point",
                ))
        })
    }

    /// ECDSA P-384 over a SHA-384 digest with the private key `id`: raw
    /// `r || s`.
    pub fn sign_p384(
        &self,
        id: &[u8],
        digest: &[u8; 48],
    ) -> Result<[u8; P384_SIGNATURE_LEN], HsmError> {
        self.with_session("signing", |session| {
            let signature = self.with_object(session, Class::Private, id, |handle| {
                session
                    .sign(&Mechanism::Ecdsa, handle, digest)
                    .map_err(|e| HsmError::op("signing", e))
            })?;
            signature
                .as_slice()
                .try_into()
                .map_err(|_| HsmError::Unexpected("the ECDSA signature is not 96 bytes"))
        })
    }

    /// AES-256-GCM encryption inside the token under the secret key `id`,
    /// with a fresh random 96-bit IV: returns `iv || ciphertext || tag`.
    pub fn encrypt_gcm(
        &self,
        id: &[u8],
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let mut iv = [0u8; GCM_IV_LEN];
        aws_lc_rs::rand::fill(&mut iv).map_err(|_| HsmError::Unexpected("no randomness"))?;
        let (used_iv, sealed) = self.with_session("encrypting", |session| {
            self.with_object(session, Class::Secret, id, |handle| {
                let mut iv_param = iv;
                let params = GcmParams::new(&mut iv_param, aad, 128.into())
                    .map_err(|e| HsmError::op("encrypting", e))?;
                let sealed = session
                    .encrypt(&Mechanism::AesGcm(params), handle, plaintext)
                    .map_err(|e| HsmError::op("encrypting", e))?;
                // A token in FIPS mode writes the IV it chose back into the
                // parameters: keep that one.
                Ok((iv_param, sealed))
            })
        })?;
        if sealed.len() != plaintext.len().saturating_add(GCM_TAG_LEN) {
            return Err(HsmError::Unexpected(
                "AES-GCM output of an unexpected length",
            ));
        }
        let mut out = Vec::with_capacity(GCM_IV_LEN.saturating_add(sealed.len()));
        out.extend_from_slice(&used_iv);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Decrypts what [`Token::encrypt_gcm`] returned under the same key and
    /// `aad`. A blob that does not authenticate is
    /// [`HsmError::DoesNotAuthenticate`].
    pub fn decrypt_gcm(
        &self,
        id: &[u8],
        sealed: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let Some((iv, body)) = sealed.split_first_chunk::<GCM_IV_LEN>() else {
            return Err(HsmError::DoesNotAuthenticate);
        };
        if body.len() < GCM_TAG_LEN {
            return Err(HsmError::DoesNotAuthenticate);
        }
        self.with_session("decrypting", |session| {
            self.with_object(session, Class::Secret, id, |handle| {
                let mut iv_param = *iv;
                let params = GcmParams::new(&mut iv_param, aad, 128.into())
                    .map_err(|e| HsmError::op("decrypting", e))?;
                match session.decrypt(&Mechanism::AesGcm(params), handle, body) {
                    Ok(plain) if plain.len().saturating_add(GCM_TAG_LEN) == body.len() => {
                        Ok(Zeroizing::new(plain))
                    }
                    Ok(plain) => {
                        drop(Zeroizing::new(plain));
                        Err(HsmError::Unexpected(
                            "AES-GCM decryption of an unexpected length",
                        ))
                    }
                    // Tokens report a failed tag as CKR_ENCRYPTED_DATA_INVALID,
                    // CKR_ENCRYPTED_DATA_LEN_RANGE, CKR_FUNCTION_FAILED or
                    // (SoftHSM2) CKR_GENERAL_ERROR; anything else — a lost
                    // session or handle, a key not permitted to decrypt —
                    // is the token's failure, not the blob's.
                    Err(CkError::Pkcs11(
                        RvError::EncryptedDataInvalid
                        | RvError::EncryptedDataLenRange
                        | RvError::FunctionFailed
                        | RvError::GeneralError,
                        _,
                    )) => Err(HsmError::DoesNotAuthenticate),
                    Err(e) => Err(HsmError::op("decrypting", e)),
                }
            })
        })
    }

    /// Destroys every object whose `CKA_ID` is `id`; returns how many.
    pub fn destroy(&self, id: &[u8]) -> Result<usize, HsmError> {
        lock(&self.handles)
            .map
            .retain(|(_, cached), _| cached.as_slice() != id);
        self.with_session("destroying objects", |session| {
            let handles = session
                .find_objects(&[Attribute::Id(id.to_vec())])
                .map_err(|e| HsmError::op("finding objects to destroy", e))?;
            for handle in &handles {
                session
                    .destroy_object(*handle)
                    .map_err(|e| HsmError::op("destroying an object", e))?;
            }
            Ok(handles.len())
        })
    }

    /// What the token says of the objects with `CKA_ID` `id`: for each, its
    /// class, `CKA_SENSITIVE`, `CKA_EXTRACTABLE`, `CKA_NEVER_EXTRACTABLE`,
    /// and whether `CKA_VALUE` is readable. For tests and `hsm check`.
    pub fn inspect(&self, id: &[u8]) -> Result<Vec<ObjectReport>, HsmError> {
        self.with_session("reading attributes", |session| {
            let handles = session
                .find_objects(&[Attribute::Id(id.to_vec())])
                .map_err(|e| HsmError::op("finding objects", e))?;
            let mut out = Vec::with_capacity(handles.len());
            for handle in handles {
                let attributes = session
                    .get_attributes(
                        handle,
                        &[
                            AttributeType::Class,
                            AttributeType::Sensitive,
                            AttributeType::Extractable,
                            AttributeType::NeverExtractable,
                            AttributeType::AlwaysSensitive,
                            AttributeType::Label,
                            AttributeType::Token,
                            AttributeType::Private,
                            AttributeType::Copyable,
                            AttributeType::Modifiable,
                        ],
                    )
                    .map_err(|e| HsmError::op("reading attributes", e))?;
                let mut report = ObjectReport::default();
                for attribute in attributes {
                    match attribute {
                        Attribute::Class(class) => report.class = class.to_string(),
                        Attribute::Sensitive(v) => report.sensitive = Some(v),
                        Attribute::Extractable(v) => report.extractable = Some(v),
                        Attribute::NeverExtractable(v) => report.never_extractable = Some(v),
                        Attribute::AlwaysSensitive(v) => report.always_sensitive = Some(v),
                        Attribute::Token(v) => report.token = Some(v),
                        Attribute::Private(v) => report.private = Some(v),
                        Attribute::Copyable(v) => report.copyable = Some(v),
                        Attribute::Modifiable(v) => report.modifiable = Some(v),
                        Attribute::Label(v) => report.label = String::from_utf8_lossy(&v).into(),
                        _ => {}
                    }
                }
                let info = session
                    .get_attribute_info(handle, &[AttributeType::Value])
                    .map_err(|e| HsmError::op("reading attribute information", e))?;
                report.value_readable = matches!(info.first(), Some(AttributeInfo::Available(_)));
                // Ask for the value itself too: a token must refuse.
                report.value_returned = session
                    .get_attributes(handle, &[AttributeType::Value])
                    .map(|values| values.iter().any(|v| matches!(v, Attribute::Value(_))))
                    .unwrap_or(false);
                out.push(report);
            }
            Ok(out)
        })
    }
}

/// One object's protection attributes, as the token reports them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ObjectReport {
    /// `CKA_CLASS`.
    pub class: String,
    /// `CKA_LABEL`.
    pub label: String,
    /// `CKA_SENSITIVE` (absent for public keys).
    pub sensitive: Option<bool>,
    /// `CKA_EXTRACTABLE`.
    pub extractable: Option<bool>,
    /// `CKA_NEVER_EXTRACTABLE`.
    pub never_extractable: Option<bool>,
    /// `CKA_ALWAYS_SENSITIVE`.
    pub always_sensitive: Option<bool>,
    /// `CKA_TOKEN`.
    pub token: Option<bool>,
    /// `CKA_PRIVATE`.
    pub private: Option<bool>,
    /// `CKA_COPYABLE`.
    pub copyable: Option<bool>,
    /// `CKA_MODIFIABLE`.
    pub modifiable: Option<bool>,
    /// Whether `C_GetAttributeInfo` says `CKA_VALUE` can be read.
    pub value_readable: bool,
    /// Whether `C_GetAttributeValue` returned `CKA_VALUE`.
    pub value_returned: bool,
}

/// `CKA_EC_POINT`: a DER OCTET STRING holding the point (PKCS#11 2.40), or
/// the bare point (some older tokens).
fn parse_ec_point(value: &[u8]) -> Option<[u8; P384_POINT_LEN]> {
    let point = match value {
        [0x04, 0x61, rest @ ..] if rest.len() == P384_POINT_LEN => rest,
        bare if bare.len() == P384_POINT_LEN => bare,
        _ => return None,
    };
    if point.first() != Some(&0x04) {
        return None;
    }
    point.try_into().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn ec_point_forms() {
        let mut point = [7u8; P384_POINT_LEN];
        point[0] = 0x04;
        let mut der = vec![0x04, 0x61];
        der.extend_from_slice(&point);
        assert_eq!(parse_ec_point(&der), Some(point));
        assert_eq!(parse_ec_point(&point), Some(point));
        assert_eq!(parse_ec_point(&der[..der.len() - 1]), None);
        let mut compressed = point;
        compressed[0] = 0x02;
        assert_eq!(parse_ec_point(&compressed), None);
    }
}
