//! The PKCS#11 backend, store root and identity against a real SoftHSM2
//! token.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;

use kluis_hsm::{HsmError, HsmStoreConfig, Pkcs11Backend, Token, TokenConfig};
use kluis_keystore::{KeyBackend, RootSecret, Store, StoreError, Zeroizing};

fn open(config: &TokenConfig) -> Arc<Token> {
    Arc::new(Token::open(config, Zeroizing::new(common::PIN.to_owned())).unwrap())
}

fn store() -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(
        dir.path().join("s"),
        RootSecret::from_key_bytes(Zeroizing::new([9u8; 32])),
    )
    .unwrap();
    (dir, Arc::new(store))
}

const ID: &str = "cmk:agency-a/app-x/prod:v1:0123456789abcdef";

#[test]
fn material_lifecycle_in_the_token() {
    let Some(config) = common::token("life") else {
        return;
    };
    let token = open(&config);
    let (_dir, store) = store();
    let backend = Pkcs11Backend::new(Arc::clone(&token), Arc::clone(&store));
    assert_eq!(backend.name(), "pkcs11");
    {
        let guard = store.lock().unwrap();
        backend.create_material(&guard, ID).unwrap();
        assert!(matches!(
            backend.create_material(&guard, ID),
            Err(StoreError::MaterialExists { .. })
        ));
    }
    let wrapped = backend.wrap(ID, &[0x5a; 32], b"context").unwrap();
    assert_eq!(wrapped.len(), 1 + 12 + 32 + 16);
    assert_eq!(
        backend.unwrap(ID, &wrapped, b"context").unwrap().as_slice(),
        &[0x5a; 32]
    );
    // Other associated data, and every altered byte, fail to unwrap.
    assert!(matches!(
        backend.unwrap(ID, &wrapped, b"contexT"),
        Err(StoreError::UnwrapFailed { .. })
    ));
    for i in 0..wrapped.len() {
        let mut bad = wrapped.clone();
        bad[i] ^= 0x01;
        assert!(
            matches!(
                backend.unwrap(ID, &bad, b"context"),
                Err(StoreError::UnwrapFailed { .. })
            ),
            "byte {i}"
        );
    }
    // The operator can find the key under its documented label.
    let report = token.inspect(ID.as_bytes()).unwrap();
    assert_eq!(report.len(), 1);
    assert_eq!(report[0].label, "kluis:agency-a/app-x/prod:v1");

    // Shredding: the object is gone from the token and the material reads
    // as destroyed, not as missing; its id is never reused.
    {
        let guard = store.lock().unwrap();
        backend.destroy_material(&guard, ID).unwrap();
        backend.destroy_material(&guard, ID).unwrap();
        assert!(matches!(
            backend.create_material(&guard, ID),
            Err(StoreError::MaterialDestroyed { .. })
        ));
    }
    assert!(token.inspect(ID.as_bytes()).unwrap().is_empty());
    assert!(matches!(
        backend.unwrap(ID, &wrapped, b"context"),
        Err(StoreError::MaterialDestroyed { .. })
    ));
}

#[test]
fn keys_are_sensitive_and_never_extractable() {
    let Some(config) = common::token("attr") else {
        return;
    };
    let token = open(&config);
    let (_dir, store) = store();
    let backend = Pkcs11Backend::new(Arc::clone(&token), Arc::clone(&store));
    backend.create_material(&store.lock().unwrap(), ID).unwrap();
    let (hsm, _root) = HsmStoreConfig::create(&token).unwrap();
    let ids = [
        ID.to_owned(),
        hsm.root_key_id.clone(),
        hsm.identity_key_id.clone(),
    ];
    let mut secret_objects = 0;
    for id in &ids {
        for object in token.inspect(id.as_bytes()).unwrap() {
            assert!(!object.value_returned, "{id}: CKA_VALUE was returned");
            if object.class == "CKO_PUBLIC_KEY" {
                continue;
            }
            secret_objects += 1;
            assert_eq!(object.sensitive, Some(true), "{id} {object:?}");
            assert_eq!(object.extractable, Some(false), "{id} {object:?}");
            assert_eq!(object.never_extractable, Some(true), "{id} {object:?}");
            assert_eq!(object.always_sensitive, Some(true), "{id} {object:?}");
            assert_eq!(object.token, Some(true), "{id} {object:?}");
            assert_eq!(object.private, Some(true), "{id} {object:?}");
            // Neither copied (a copy would survive destruction) nor changed
            // (a new CKA_ID would hide it from destruction).
            assert_eq!(object.copyable, Some(false), "{id} {object:?}");
            assert_eq!(object.modifiable, Some(false), "{id} {object:?}");
            assert!(!object.value_readable, "{id}: CKA_VALUE is readable");
        }
    }
    // Two AES keys and one private key.
    assert_eq!(secret_objects, 3);
}

#[test]
fn store_root_and_identity_live_in_the_token() {
    let Some(config) = common::token("root") else {
        return;
    };
    let token = open(&config);
    let dir = tempfile::tempdir().unwrap();
    let (hsm, root) = HsmStoreConfig::create(&token).unwrap();
    hsm.write_new(dir.path()).unwrap();
    assert!(
        hsm.write_new(dir.path()).is_err(),
        "hsm.json is never replaced"
    );
    let read = HsmStoreConfig::read(dir.path()).unwrap().unwrap();
    assert_eq!(read, hsm);
    assert_eq!(read.token_config(), config);
    assert_eq!(
        read.unwrap_root(&token).unwrap().as_slice(),
        root.as_slice()
    );

    // The identity signs in the token; the signature verifies under the
    // recorded public key.
    let identity = read.identity(Arc::clone(&token)).unwrap();
    assert!(identity.is_external());
    assert!(identity.to_pkcs8_der().is_err());
    let signature = identity.sign(b"kluis-test\0message").unwrap();
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED,
        identity.public_key_sec1(),
    )
    .verify(b"kluis-test\0message", &signature)
    .unwrap();

    // An altered wrapped root is refused, with a clear error.
    let text = std::fs::read_to_string(dir.path().join("hsm.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let wrapped = value["wrapped_root"].as_str().unwrap();
    let flipped = format!(
        "{}{}",
        &wrapped[..20],
        if &wrapped[20..21] == "0" { "1" } else { "0" }
    );
    let altered = text.replacen(wrapped, &format!("{flipped}{}", &wrapped[21..]), 1);
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("hsm.json"), altered).unwrap();
    let err = HsmStoreConfig::read(other.path())
        .unwrap()
        .unwrap()
        .unwrap_root(&token)
        .unwrap_err();
    assert!(err.to_string().contains("does not authenticate"), "{err}");
    // A store directory without hsm.json is not in HSM mode.
    assert!(HsmStoreConfig::read(tempfile::tempdir().unwrap().path())
        .unwrap()
        .is_none());
}

#[test]
fn clear_errors_for_module_token_pin_and_lost_objects() {
    let Some(config) = common::token("errs") else {
        return;
    };
    // A missing module.
    let missing = TokenConfig {
        module: "/nonexistent/libpkcs11.so".into(),
        token: config.token.clone(),
    };
    let err = Token::open(&missing, Zeroizing::new(common::PIN.to_owned())).unwrap_err();
    assert!(matches!(err, HsmError::Module { .. }), "{err}");
    // A token that is not there: the error lists what is.
    let absent = TokenConfig {
        module: config.module.clone(),
        token: "no-such-token".into(),
    };
    match Token::open(&absent, Zeroizing::new(common::PIN.to_owned())).unwrap_err() {
        HsmError::TokenNotFound { present, .. } => assert!(present.contains(&config.token)),
        other => panic!("{other}"),
    }
    // A wrong PIN is refused once and never retried by the handle.
    let err = Token::open(&config, Zeroizing::new("0000-wrong".to_owned())).unwrap_err();
    assert!(matches!(err, HsmError::WrongPin { .. }), "{err}");
    let message = err.to_string();
    assert!(!message.contains("0000-wrong"), "the PIN leaked: {message}");
    // The right PIN still works (one failure does not lock SoftHSM2).
    let token = open(&config);
    // Once the process is logged in, a second handle with a wrong PIN is
    // still refused (PKCS#11 would only say "already logged in").
    let err = Token::open(&config, Zeroizing::new("0000-wrong".to_owned())).unwrap_err();
    assert!(matches!(err, HsmError::WrongPin { .. }), "{err}");
    // A module in a directory others may write is not loaded.
    let unsafe_dir = tempfile::tempdir().unwrap();
    std::fs::copy(&config.module, unsafe_dir.path().join("lib.so")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(unsafe_dir.path(), std::fs::Permissions::from_mode(0o777))
            .unwrap();
    }
    let writable = TokenConfig {
        module: unsafe_dir.path().join("lib.so"),
        token: config.token.clone(),
    };
    let err = Token::open(&writable, Zeroizing::new(common::PIN.to_owned())).unwrap_err();
    assert!(
        matches!(&err, HsmError::Module { detail, .. } if detail.contains("written by others")),
        "{err}"
    );
    // An object deleted behind Kluis's back (here by another handle on the
    // token, after this one cached the object's handle) is reported as lost.
    let (_dir, store) = store();
    let backend = Pkcs11Backend::new(Arc::clone(&token), Arc::clone(&store));
    backend.create_material(&store.lock().unwrap(), ID).unwrap();
    let wrapped = backend.wrap(ID, b"k", b"").unwrap();
    backend.unwrap(ID, &wrapped, b"").unwrap();
    let other = open(&config);
    assert_eq!(other.destroy(ID.as_bytes()).unwrap(), 1);
    assert!(matches!(
        backend.wrap(ID, b"k", b""),
        Err(StoreError::Backend { .. })
    ));
    let err = backend.unwrap(ID, &wrapped, b"").unwrap_err();
    assert!(
        matches!(&err, StoreError::Backend { reason, .. } if reason.contains("no object")),
        "{err}"
    );
    // The Debug form of a token shows no PIN.
    assert!(!format!("{token:?}").contains(common::PIN));
}

/// Someone logged in to the token (the PIN holder, or code in the
/// verifier's process) destroys a master key's object and creates one
/// with the same id and a value they know. Kluis then neither wraps a
/// data key under it nor unwraps with it: the object was not generated in
/// the token, and was extractable when made.
#[test]
fn a_key_planted_under_a_kluis_id_is_not_used() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::error::{Error as CkError, RvError};
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;

    let Some(config) = common::token("plant") else {
        return;
    };
    let token = open(&config);
    let (_dir, store) = store();
    let backend = Pkcs11Backend::new(Arc::clone(&token), Arc::clone(&store));
    backend.create_material(&store.lock().unwrap(), ID).unwrap();
    let wrapped = backend.wrap(ID, b"k", b"").unwrap();

    // The planting, through the module directly.
    let pkcs11 = Pkcs11::new(&config.module).unwrap();
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("{e}"),
    }
    let slot = pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|slot| pkcs11.get_token_info(*slot).unwrap().label() == config.token)
        .unwrap();
    let session = pkcs11.open_rw_session(slot).unwrap();
    match session.login(UserType::User, Some(&AuthPin::from(common::PIN))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("{e}"),
    }
    assert_eq!(token.destroy(ID.as_bytes()).unwrap(), 1);
    let known = [0x42u8; 32];
    session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Value(known.to_vec()),
            Attribute::Token(true),
            Attribute::Private(true),
            // As protected as it can claim to be once made.
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Id(ID.as_bytes().to_vec()),
        ])
        .unwrap();

    let refused = |err: StoreError| {
        assert!(
            matches!(&err, StoreError::Backend { reason, .. }
                if reason.contains("not a key Kluis made") && reason.contains("CKA_LOCAL")),
            "{err}"
        );
    };
    refused(backend.wrap(ID, b"a data key", b"").unwrap_err());
    refused(backend.unwrap(ID, &wrapped, b"").unwrap_err());

    // A key generated in the token in its place, as protected as Kluis's
    // but public (usable by any session, without the PIN): refused too.
    assert_eq!(token.destroy(ID.as_bytes()).unwrap(), 1);
    session
        .generate_key(
            &cryptoki::mechanism::Mechanism::AesKeyGen,
            &[
                Attribute::ValueLen(32.into()),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Copyable(false),
                Attribute::Modifiable(false),
                Attribute::Derive(false),
                Attribute::Id(ID.as_bytes().to_vec()),
            ],
        )
        .unwrap();
    let err = backend.wrap(ID, b"a data key", b"").unwrap_err();
    assert!(
        matches!(&err, StoreError::Backend { reason, .. } if reason.contains("CKA_PRIVATE")),
        "{err}"
    );
}
