//! A token whose sessions vanish (module restart) is reconnected once.
//! Its own test binary: restarting the module affects the whole process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use kluis_hsm::{Pkcs11Backend, Token};
use kluis_keystore::{KeyBackend, RootSecret, Store, Zeroizing};

#[test]
fn a_dropped_session_is_replaced_once() {
    let Some(config) = common::token("recon") else {
        return;
    };
    let token = Arc::new(Token::open(&config, Zeroizing::new(common::PIN.to_owned())).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        Store::init(
            dir.path().join("s"),
            RootSecret::from_key_bytes(Zeroizing::new([3u8; 32])),
        )
        .unwrap(),
    );
    let backend = Pkcs11Backend::new(Arc::clone(&token), Arc::clone(&store));
    let id = "cmk:a/b/c:v1:00112233445566aa";
    backend.create_material(&store.lock().unwrap(), id).unwrap();
    let wrapped = backend.wrap(id, b"data key", b"aad").unwrap();
    // Every session and the login vanish; the next operation reconnects,
    // logs in again and succeeds.
    token.restart_module_for_test().unwrap();
    assert_eq!(
        backend.unwrap(id, &wrapped, b"aad").unwrap().as_slice(),
        b"data key"
    );
    token.restart_module_for_test().unwrap();
    let again = backend.wrap(id, b"other", b"").unwrap();
    assert_eq!(
        backend.unwrap(id, &again, b"").unwrap().as_slice(),
        b"other"
    );
}
