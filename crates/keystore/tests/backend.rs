//! `LocalBackend` through the `KeyBackend` trait.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use std::fs;
use std::sync::Arc;

use kluis_keystore::{
    KeyBackend, LocalBackend, RootSecret, Store, StoreError, Zeroizing, MATERIAL_KIND,
    MAX_WRAP_PLAINTEXT,
};

fn setup() -> (tempfile::TempDir, Arc<Store>, Box<dyn KeyBackend>) {
    let tmp = tempfile::tempdir().unwrap();
    let secret = RootSecret::from_key_bytes(Zeroizing::new([3u8; 32]));
    let store = Arc::new(Store::init(tmp.path().join("s"), secret).unwrap());
    let backend: Box<dyn KeyBackend> = Box::new(LocalBackend::new(Arc::clone(&store)));
    (tmp, store, backend)
}

#[test]
fn wrap_unwrap_round_trip() {
    let (_tmp, store, backend) = setup();
    assert_eq!(backend.name(), "local");
    {
        let guard = store.lock().unwrap();
        backend.create_material(&guard, "cmk-1/v1").unwrap();
        backend.create_material(&guard, "cmk-1/v2").unwrap();
    }
    let dk = [0x11u8; 32];
    let wrapped = backend.wrap("cmk-1/v1", &dk, b"context").unwrap();
    assert_eq!(wrapped.len(), 1 + 12 + 32 + 16);
    assert_eq!(wrapped[0], 1);
    let unwrapped = backend.unwrap("cmk-1/v1", &wrapped, b"context").unwrap();
    assert_eq!(unwrapped.as_slice(), &dk);
    // Random nonces: wrapping twice gives different blobs.
    assert_ne!(wrapped, backend.wrap("cmk-1/v1", &dk, b"context").unwrap());
    // Empty plaintext and the largest one.
    let empty = backend.wrap("cmk-1/v1", b"", b"").unwrap();
    assert!(backend.unwrap("cmk-1/v1", &empty, b"").unwrap().is_empty());
    let big = vec![9u8; MAX_WRAP_PLAINTEXT];
    let wrapped_big = backend.wrap("cmk-1/v1", &big, b"").unwrap();
    assert_eq!(
        backend
            .unwrap("cmk-1/v1", &wrapped_big, b"")
            .unwrap()
            .as_slice(),
        &big[..]
    );
    let err = backend
        .wrap("cmk-1/v1", &vec![9u8; MAX_WRAP_PLAINTEXT + 1], b"")
        .unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
    let mut too_long = wrapped_big.clone();
    too_long.push(0);
    let err = backend.unwrap("cmk-1/v1", &too_long, b"").unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");

    // Material persists across reopening.
    let dir = store.path().to_owned();
    drop(backend);
    drop(store);
    let store =
        Arc::new(Store::open(&dir, RootSecret::from_key_bytes(Zeroizing::new([3u8; 32]))).unwrap());
    let backend = LocalBackend::new(store);
    assert_eq!(
        backend
            .unwrap("cmk-1/v1", &wrapped, b"context")
            .unwrap()
            .as_slice(),
        &dk
    );
}

#[test]
fn unwrap_refuses_anything_else() {
    let (_tmp, store, backend) = setup();
    {
        let guard = store.lock().unwrap();
        backend.create_material(&guard, "a").unwrap();
        backend.create_material(&guard, "b").unwrap();
    }
    let wrapped = backend.wrap("a", &[5u8; 32], b"aad").unwrap();
    let unwrap_failed = |result: Result<Zeroizing<Vec<u8>>, StoreError>| {
        let err = result.unwrap_err();
        assert!(matches!(err, StoreError::UnwrapFailed { .. }), "{err}");
    };
    unwrap_failed(backend.unwrap("a", &wrapped, b"aae"));
    unwrap_failed(backend.unwrap("a", &wrapped, b""));
    unwrap_failed(backend.unwrap("b", &wrapped, b"aad"));
    unwrap_failed(backend.unwrap("a", &[], b"aad"));
    unwrap_failed(backend.unwrap("a", &wrapped[..wrapped.len() - 1], b"aad"));
    unwrap_failed(backend.unwrap("a", &wrapped[..13], b"aad"));
    for index in 0..wrapped.len() {
        let mut bad = wrapped.clone();
        bad[index] ^= 0x80;
        unwrap_failed(backend.unwrap("a", &bad, b"aad"));
    }
    let err = backend.unwrap("missing", &wrapped, b"aad").unwrap_err();
    assert!(matches!(err, StoreError::MaterialNotFound { .. }), "{err}");
    let err = backend.wrap("missing", b"x", b"").unwrap_err();
    assert!(matches!(err, StoreError::MaterialNotFound { .. }), "{err}");
    let err = backend.unwrap("bad\nid", &wrapped, b"aad").unwrap_err();
    assert!(matches!(err, StoreError::InvalidId { .. }), "{err}");
}

#[test]
fn create_refuses_existing_material() {
    let (_tmp, store, backend) = setup();
    let guard = store.lock().unwrap();
    backend.create_material(&guard, "m").unwrap();
    let wrapped = backend.wrap("m", b"dk", b"").unwrap();
    let err = backend.create_material(&guard, "m").unwrap_err();
    assert!(matches!(err, StoreError::MaterialExists { .. }), "{err}");
    // The existing material was not replaced.
    assert_eq!(
        backend.unwrap("m", &wrapped, b"").unwrap().as_slice(),
        b"dk"
    );
}

#[test]
fn destroyed_material_is_gone() {
    let (tmp, store, backend) = setup();
    {
        let guard = store.lock().unwrap();
        backend.create_material(&guard, "doomed").unwrap();
        backend.create_material(&guard, "kept").unwrap();
    }
    let wrapped = backend.wrap("doomed", &[7u8; 32], b"").unwrap();
    let kept = backend.wrap("kept", &[8u8; 32], b"").unwrap();
    let before = store.get(MATERIAL_KIND, "doomed").unwrap().unwrap();
    let key = before[2..].to_vec();
    assert_eq!(key.len(), 32);

    // Keep a hard link to the material's record file, to check its old
    // contents are overwritten.
    let kind_dir = store.path().join("records").join(MATERIAL_KIND);
    let files: Vec<_> = fs::read_dir(&kind_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let links: Vec<_> = files
        .iter()
        .enumerate()
        .map(|(i, file)| {
            let link = tmp.path().join(format!("link-{i}"));
            fs::hard_link(file, &link).unwrap();
            link
        })
        .collect();

    {
        let guard = store.lock().unwrap();
        backend.destroy_material(&guard, "doomed").unwrap();
        // Idempotent.
        backend.destroy_material(&guard, "doomed").unwrap();
        let err = backend.destroy_material(&guard, "never").unwrap_err();
        assert!(matches!(err, StoreError::MaterialNotFound { .. }), "{err}");
        // An id is never reused.
        let err = backend.create_material(&guard, "doomed").unwrap_err();
        assert!(matches!(err, StoreError::MaterialDestroyed { .. }), "{err}");
    }
    let err = backend.unwrap("doomed", &wrapped, b"").unwrap_err();
    assert!(matches!(err, StoreError::MaterialDestroyed { .. }), "{err}");
    let err = backend.wrap("doomed", b"x", b"").unwrap_err();
    assert!(matches!(err, StoreError::MaterialDestroyed { .. }), "{err}");
    assert_eq!(
        backend.unwrap("kept", &kept, b"").unwrap().as_slice(),
        &[8u8; 32]
    );

    // The record now holds no key; the old file's blocks were zeroed.
    let after = store.get(MATERIAL_KIND, "doomed").unwrap().unwrap();
    assert_eq!(after.as_slice(), &[1, 0]);
    let zeroed = links
        .iter()
        .filter(|link| fs::read(link).unwrap().iter().all(|&b| b == 0))
        .count();
    assert_eq!(
        zeroed, 1,
        "exactly the destroyed material's old file is zeroed"
    );
    for file in fs::read_dir(&kind_dir).unwrap() {
        let bytes = fs::read(file.unwrap().path()).unwrap();
        assert!(!bytes.windows(32).any(|w| w == key.as_slice()));
    }

    // Destruction by another handle (another process) takes effect at once.
    let dir = store.path().to_owned();
    let other =
        Arc::new(Store::open(&dir, RootSecret::from_key_bytes(Zeroizing::new([3u8; 32]))).unwrap());
    let other_backend = LocalBackend::new(Arc::clone(&other));
    {
        let guard = other.lock().unwrap();
        other_backend.destroy_material(&guard, "kept").unwrap();
    }
    let err = backend.unwrap("kept", &kept, b"").unwrap_err();
    assert!(matches!(err, StoreError::MaterialDestroyed { .. }), "{err}");
}

#[test]
fn a_guard_of_another_store_is_refused() {
    let (_tmp, _store, backend) = setup();
    let (_tmp2, other, _other_backend) = setup();
    let guard = other.lock().unwrap();
    let err = backend.create_material(&guard, "m").unwrap_err();
    assert!(matches!(err, StoreError::ForeignGuard { .. }), "{err}");
    let err = backend.destroy_material(&guard, "m").unwrap_err();
    assert!(matches!(err, StoreError::ForeignGuard { .. }), "{err}");
}

#[test]
fn backend_is_usable_across_threads() {
    let (_tmp, store, backend) = setup();
    {
        let guard = store.lock().unwrap();
        backend.create_material(&guard, "m").unwrap();
    }
    let backend: Arc<dyn KeyBackend> = Arc::from(backend);
    let handles: Vec<_> = (0u8..4)
        .map(|i| {
            let backend = Arc::clone(&backend);
            std::thread::spawn(move || {
                for j in 0u8..20 {
                    let dk = [i, j, 0, 0];
                    let wrapped = backend.wrap("m", &dk, &[i]).unwrap();
                    assert_eq!(backend.unwrap("m", &wrapped, &[i]).unwrap().as_slice(), &dk);
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
}
