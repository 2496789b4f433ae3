//! Stores written once by this crate and committed (`tests/vectors/`): a
//! key-file store and a passphrase store. If these stop opening, the on-disk
//! format changed: bump its version (and keep reading the old one) rather
//! than regenerate them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use kluis_keystore::{RootSecret, Store, Zeroizing};

/// The key of `key-file-v1` (the committed vector, not a secret).
const KEY: [u8; 32] = [0x5a; 32];
/// The passphrase of `passphrase-v1`, made with the fast test KDF.
const PASSPHRASE: &str = "format vector passphrase";
const KIND: &str = "vector";
const RECORDS: [(&str, &[u8]); 2] = [
    ("first", b"the first record of the format vector"),
    ("second", b""),
];

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

/// Copies a committed store to a private temporary directory (a checkout
/// does not keep the 0700/0600 modes the store makes).
fn copy_store(name: &str) -> (tempfile::TempDir, PathBuf) {
    fn copy(from: &Path, to: &Path) {
        fs::create_dir(to).unwrap();
        fs::set_permissions(to, fs::Permissions::from_mode(0o700)).unwrap();
        let mut entries: Vec<_> = fs::read_dir(from).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                fs::copy(entry.path(), &target).unwrap();
                fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    copy(&vectors().join(name), &dir);
    (tmp, dir)
}

fn check(store: &Store) {
    let mut ids = store.list(KIND).unwrap();
    ids.sort();
    assert_eq!(ids, ["first", "second"]);
    for (id, value) in RECORDS {
        assert_eq!(
            store.get(KIND, id).unwrap().unwrap().as_slice(),
            value,
            "{id}"
        );
    }
}

#[test]
fn committed_key_file_store_v1_opens_and_reads() {
    let (_tmp, dir) = copy_store("key-file-v1");
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("store.meta")).unwrap()).unwrap();
    assert_eq!(meta["format"], "kluis-keystore");
    assert_eq!(meta["version"], 1);
    check(&Store::open(&dir, RootSecret::from_key_bytes(Zeroizing::new(KEY))).unwrap());
}

#[test]
fn committed_passphrase_store_v1_opens_and_reads() {
    let (_tmp, dir) = copy_store("passphrase-v1");
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("store.meta")).unwrap()).unwrap();
    assert_eq!(meta["version"], 1);
    assert_eq!(meta["secret"], "passphrase");
    let secret = RootSecret::dangerous_fast_kdf_for_tests(Zeroizing::new(PASSPHRASE.to_owned()));
    check(&Store::open(&dir, secret).unwrap());
    // And the wrong passphrase is refused on the committed bytes too.
    let wrong = RootSecret::dangerous_fast_kdf_for_tests(Zeroizing::new("wrong".to_owned()));
    assert!(Store::open(&dir, wrong).is_err());
}

/// Writes `tests/vectors/`: run by hand, only for a new format version.
#[test]
#[ignore = "writes tests/vectors; run by hand only when the format version changes"]
fn regenerate_format_vectors() {
    for (name, secret) in [
        (
            "key-file-v1",
            RootSecret::from_key_bytes(Zeroizing::new(KEY)),
        ),
        (
            "passphrase-v1",
            RootSecret::dangerous_fast_kdf_for_tests(Zeroizing::new(PASSPHRASE.to_owned())),
        ),
    ] {
        let dir = vectors().join(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(vectors()).unwrap();
        let store = Store::init(&dir, secret).unwrap();
        let guard = store.lock().unwrap();
        for (id, value) in RECORDS {
            store.put(&guard, KIND, id, value).unwrap();
        }
        drop(guard);
    }
}
