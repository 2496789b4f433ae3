//! The store directory: round trips, secrets, tampering, bounds, leftovers.

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
use std::sync::Arc;

use kluis_keystore::{
    Argon2Params, KeyBackend as _, LocalBackend, RootSecret, Store, StoreError, Zeroizing,
    MATERIAL_KIND, MAX_RECORD_LEN,
};

const KEY: [u8; 32] = [0x5a; 32];

fn key() -> RootSecret {
    RootSecret::from_key_bytes(Zeroizing::new(KEY))
}

fn fast(passphrase: &str) -> RootSecret {
    RootSecret::dangerous_fast_kdf_for_tests(Zeroizing::new(passphrase.to_owned()))
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The record files of `kind`.
fn record_files(store: &Store, kind: &str) -> Vec<PathBuf> {
    let dir = store.path().join("records").join(kind);
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "rec"))
        .collect();
    files.sort();
    files
}

/// The record file `put` creates for (kind, id): the one new file.
fn put_and_find(store: &Store, kind: &str, id: &str, value: &[u8]) -> PathBuf {
    let kind_dir = store.path().join("records").join(kind);
    let before: Vec<PathBuf> = if kind_dir.exists() {
        record_files(store, kind)
    } else {
        Vec::new()
    };
    let guard = store.lock().unwrap();
    store.put(&guard, kind, id, value).unwrap();
    let after = record_files(store, kind);
    let new: Vec<_> = after.into_iter().filter(|p| !before.contains(p)).collect();
    assert_eq!(new.len(), 1, "expected one new record file for {id}");
    new.into_iter().next().unwrap()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[test]
fn put_get_list_delete_and_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let store = Store::init(&dir, key()).unwrap();
    assert_eq!(store.get("cmk", "a").unwrap(), None);
    assert!(store.list("cmk").unwrap().is_empty());
    {
        let guard = store.lock().unwrap();
        store.put(&guard, "cmk", "b", b"value b").unwrap();
        store.put(&guard, "cmk", "a", b"value a").unwrap();
        store
            .put(&guard, "cmk", "../../etc/passwd", b"odd id")
            .unwrap();
        store.put(&guard, "cmk", "é/ü", b"").unwrap();
        store.put(&guard, "policy", "a", b"other kind").unwrap();
        store.put(&guard, "cmk", "a", b"value a, second").unwrap();
    }
    assert_eq!(
        store.get("cmk", "a").unwrap().unwrap().as_slice(),
        b"value a, second"
    );
    assert_eq!(store.get("cmk", "é/ü").unwrap().unwrap().as_slice(), b"");
    assert_eq!(
        store.get("policy", "a").unwrap().unwrap().as_slice(),
        b"other kind"
    );
    assert_eq!(
        store.list("cmk").unwrap(),
        ["../../etc/passwd", "a", "b", "é/ü"]
    );
    assert_eq!(store.list("policy").unwrap(), ["a"]);
    assert!(store.list("nothing").unwrap().is_empty());

    {
        let guard = store.lock().unwrap();
        assert!(store.delete(&guard, "cmk", "b").unwrap());
        assert!(!store.delete(&guard, "cmk", "b").unwrap());
        assert!(!store.delete(&guard, "cmk", "never").unwrap());
    }
    assert_eq!(store.get("cmk", "b").unwrap(), None);
    drop(store);

    let store = Store::open(&dir, key()).unwrap();
    assert_eq!(store.list("cmk").unwrap(), ["../../etc/passwd", "a", "é/ü"]);
    assert_eq!(
        store.get("cmk", "a").unwrap().unwrap().as_slice(),
        b"value a, second"
    );
    // Only record files, the meta and the lock: nothing left over.
    for path in files_under(&dir) {
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(
            name == "store.meta" || name == "lock" || name.ends_with(".rec"),
            "{name}"
        );
    }
}

#[test]
fn init_makes_private_files_and_refuses_a_non_empty_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("new/store");
    fs::create_dir_all(dir.parent().unwrap()).unwrap();
    let store = Store::init(&dir, key()).unwrap();
    let guard = store.lock().unwrap();
    store.put(&guard, "k", "x", b"v").unwrap();
    drop(guard);
    let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("records")), 0o700);
    assert_eq!(mode(&dir.join("records/k")), 0o700);
    assert_eq!(mode(&dir.join("store.meta")), 0o600);
    assert_eq!(mode(&dir.join("lock")), 0o600);
    for file in record_files(&store, "k") {
        assert_eq!(mode(&file), 0o600);
    }
    drop(store);

    // The store itself, and any other non-empty directory.
    let err = Store::init(&dir, key()).unwrap_err();
    assert!(matches!(err, StoreError::NotEmpty { .. }), "{err}");
    let other = tmp.path().join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("something"), b"x").unwrap();
    let err = Store::init(&other, key()).unwrap_err();
    assert!(matches!(err, StoreError::NotEmpty { .. }), "{err}");
    assert_eq!(fs::read(other.join("something")).unwrap(), b"x");

    // An empty existing directory is fine.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    Store::init(&empty, key()).unwrap();

    // A directory that is not a store.
    let err = Store::open(&other, key()).unwrap_err();
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
}

#[test]
fn an_interrupted_init_can_be_redone() {
    // init writes store.meta last; a crash before leaves lock, records/ and
    // perhaps a temporary meta file, which a second init accepts.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("lock"), b"").unwrap();
    fs::create_dir(dir.join("records")).unwrap();
    fs::write(dir.join(".store.meta.0123456789abcdef.tmp"), b"{").unwrap();
    let err = Store::open(&dir, key()).unwrap_err();
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
    Store::init(&dir, key()).unwrap();
    assert!(!dir.join(".store.meta.0123456789abcdef.tmp").exists());
    Store::open(&dir, key()).unwrap();
}

#[test]
fn a_wrong_secret_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let key_store = tmp.path().join("k");
    Store::init(&key_store, key()).unwrap();
    let wrong = RootSecret::from_key_bytes(Zeroizing::new([0x5b; 32]));
    let err = Store::open(&key_store, wrong).unwrap_err();
    assert!(matches!(err, StoreError::WrongRootSecret), "{err}");
    assert!(err.to_string().contains("wrong root secret"), "{err}");
    let err = Store::open(&key_store, fast("pw")).unwrap_err();
    assert!(
        matches!(err, StoreError::SecretKindMismatch { .. }),
        "{err}"
    );

    let pw_store = tmp.path().join("p");
    Store::init(&pw_store, fast("correct horse")).unwrap();
    Store::open(&pw_store, fast("correct horse")).unwrap();
    let err = Store::open(&pw_store, fast("correct horsf")).unwrap_err();
    assert!(matches!(err, StoreError::WrongRootSecret), "{err}");
    let err = Store::open(&pw_store, key()).unwrap_err();
    assert!(
        matches!(err, StoreError::SecretKindMismatch { .. }),
        "{err}"
    );
    // A store made with the fast test KDF is refused to a production secret.
    let production = RootSecret::from_passphrase(Zeroizing::new("correct horse".into())).unwrap();
    let err = Store::open(&pw_store, production).unwrap_err();
    assert!(matches!(err, StoreError::WeakKdfParams { .. }), "{err}");
}

#[test]
#[ignore = "Argon2id at 64 MiB x 3 passes takes ~6 s per derivation in a debug build; run with --ignored (or --release)"]
fn production_argon2id_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let secret = RootSecret::from_passphrase(Zeroizing::new("a long passphrase".into())).unwrap();
    let store = Store::init(&dir, secret).unwrap();
    let guard = store.lock().unwrap();
    store.put(&guard, "k", "x", b"v").unwrap();
    drop(guard);
    drop(store);
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("store.meta")).unwrap()).unwrap();
    // The production floor, as numbers: 64 MiB and 3 passes.
    assert_eq!(meta["kdf"]["m_cost_kib"], 65_536);
    assert_eq!(meta["kdf"]["t_cost"], 3);
    let secret = RootSecret::from_passphrase(Zeroizing::new("a long passphrase".into())).unwrap();
    let store = Store::open(&dir, secret).unwrap();
    assert_eq!(store.get("k", "x").unwrap().unwrap().as_slice(), b"v");
}

#[test]
fn meta_records_the_kdf_and_no_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    Store::init(&dir, fast("hunter2-passphrase")).unwrap();
    let text = fs::read_to_string(dir.join("store.meta")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(meta["format"], "kluis-keystore");
    assert_eq!(meta["version"], 1);
    assert_eq!(meta["secret"], "passphrase");
    assert_eq!(meta["kdf"]["algorithm"], "argon2id");
    assert_eq!(meta["kdf"]["version"], 19);
    assert_eq!(
        meta["kdf"]["m_cost_kib"],
        Argon2Params::DANGEROUS_FAST_FOR_TESTS.m_cost_kib
    );
    assert_eq!(meta["salt"].as_str().unwrap().len(), 64);
    assert_eq!(meta["key_check"].as_str().unwrap().len(), 120);
    assert!(!text.contains("hunter2"));

    let dir = tmp.path().join("k");
    Store::init(&dir, key()).unwrap();
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("store.meta")).unwrap()).unwrap();
    assert_eq!(meta["secret"], "key");
    assert!(meta["kdf"].is_null());
}

#[test]
fn a_copy_of_the_directory_reveals_nothing_without_the_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let store = Arc::new(Store::init(&dir, key()).unwrap());
    let plaintext = b"PLAINTEXT-MARKER: citizen 85.07.30-033.61 has diagnosis X";
    let record_id = "citizen-record-id-marker";
    let material_id = "agency-a/app-x/prod#1";
    let backend = LocalBackend::new(Arc::clone(&store));
    {
        let guard = store.lock().unwrap();
        store.put(&guard, "data", record_id, plaintext).unwrap();
        backend.create_material(&guard, material_id).unwrap();
    }
    let data_key = [0x42u8; 32];
    let wrapped = backend.wrap(material_id, &data_key, b"aad").unwrap();
    let material = store.get(MATERIAL_KIND, material_id).unwrap().unwrap();
    let material_key = material[2..].to_vec();
    assert_eq!(material_key.len(), 32);
    drop(backend);
    drop(store);

    // What an attacker with a copy of the directory (and the wrapped key) sees.
    let mut needles: Vec<(&str, Vec<u8>)> = vec![
        ("record plaintext", plaintext.to_vec()),
        ("record plaintext prefix", plaintext[..16].to_vec()),
        ("record id", record_id.as_bytes().to_vec()),
        ("material id", material_id.as_bytes().to_vec()),
        ("material key", material_key.clone()),
        (
            "material key (hex)",
            hex::encode(&material_key).into_bytes(),
        ),
        ("root key", KEY.to_vec()),
        ("root key (hex)", hex::encode(KEY).into_bytes()),
        ("data key", data_key.to_vec()),
    ];
    needles.push(("record id (in names)", b"citizen".to_vec()));
    let files = files_under(&dir);
    assert!(files.len() >= 4, "{files:?}");
    for file in &files {
        let bytes = fs::read(file).unwrap();
        let name = file
            .strip_prefix(&dir)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        for (what, needle) in &needles {
            assert!(!contains(&bytes, needle), "{what} found in {name}");
            assert!(
                !contains(name.as_bytes(), needle),
                "{what} found in the name {name}"
            );
        }
    }
    assert!(!contains(&wrapped, &data_key));

    // And the copy does not open with another secret.
    let copy = tmp.path().join("copy");
    fs::create_dir(&copy).unwrap();
    for file in &files {
        let target = copy.join(file.strip_prefix(&dir).unwrap());
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        fs::copy(file, &target).unwrap();
    }
    let err = Store::open(&copy, RootSecret::from_key_bytes(Zeroizing::new([0; 32]))).unwrap_err();
    assert!(matches!(err, StoreError::WrongRootSecret), "{err}");
    // With the secret, the copy is the store.
    let store = Store::open(&copy, key()).unwrap();
    assert_eq!(
        store.get("data", record_id).unwrap().unwrap().as_slice(),
        plaintext
    );
}

#[test]
fn a_record_moved_to_another_id_or_kind_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(tmp.path().join("s"), key()).unwrap();
    let a = put_and_find(&store, "cmk", "a", b"value of a");
    let b = put_and_find(&store, "cmk", "b", b"value of b");

    // a's record copied over b's: b no longer opens.
    fs::copy(&a, &b).unwrap();
    let err = store.get("cmk", "b").unwrap_err();
    assert!(matches!(err, StoreError::CorruptRecord { .. }), "{err}");
    assert!(err.to_string().contains("does not authenticate"), "{err}");
    assert!(store.list("cmk").is_err());
    assert_eq!(
        store.get("cmk", "a").unwrap().unwrap().as_slice(),
        b"value of a"
    );

    // a's record moved into another kind, under the name "a" has there.
    let c = put_and_find(&store, "other", "a", b"other a");
    fs::copy(&a, &c).unwrap();
    let err = store.get("other", "a").unwrap_err();
    assert!(matches!(err, StoreError::CorruptRecord { .. }), "{err}");

    // A record of another store with the same root key (different salt).
    let other = Store::init(tmp.path().join("t"), key()).unwrap();
    let foreign = put_and_find(&other, "cmk", "a", b"foreign a");
    fs::copy(&foreign, &a).unwrap();
    let err = store.get("cmk", "a").unwrap_err();
    assert!(matches!(err, StoreError::CorruptRecord { .. }), "{err}");
}

#[test]
fn tampered_truncated_and_oversized_records_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(tmp.path().join("s"), key()).unwrap();
    let path = put_and_find(&store, "k", "x", b"some value here");
    let good = fs::read(&path).unwrap();
    assert_eq!(good.len(), 1 + 12 + 2 + 1 + 15 + 16);
    assert_eq!(good[0], 1, "version byte");

    // Every single-byte change is detected.
    for index in 0..good.len() {
        let mut bad = good.clone();
        bad[index] ^= 0x01;
        fs::write(&path, &bad).unwrap();
        let err = store.get("k", "x").unwrap_err();
        assert!(
            matches!(err, StoreError::CorruptRecord { .. }),
            "byte {index}: {err}"
        );
    }
    // Every truncation, and trailing bytes.
    for len in 0..good.len() {
        fs::write(&path, &good[..len]).unwrap();
        let err = store.get("k", "x").unwrap_err();
        assert!(
            matches!(err, StoreError::CorruptRecord { .. }),
            "length {len}: {err}"
        );
    }
    let mut longer = good.clone();
    longer.push(0);
    fs::write(&path, &longer).unwrap();
    assert!(store.get("k", "x").is_err());

    // A symbolic link in place of a record is not followed.
    let elsewhere = tmp.path().join("elsewhere");
    fs::write(&elsewhere, &good).unwrap();
    fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
    let err = store.get("k", "x").unwrap_err();
    assert!(matches!(err, StoreError::CorruptRecord { .. }), "{err}");
    fs::remove_file(&path).unwrap();

    // A (sparse) 64 GiB record file is refused from its size, without reading:
    // the error reports the file's length, which only the size check (before
    // any read) sees; a refusal while reading reports limit + 1 bytes. (The
    // byte counts themselves are checked by `fsutil`'s unit tests.)
    fs::write(&path, &good).unwrap();
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(64 << 30)
        .unwrap();
    let err = store.get("k", "x").unwrap_err();
    assert!(
        matches!(err, StoreError::TooLarge { found, .. } if found == 64 << 30),
        "{err}"
    );
    let err = store.list("k").unwrap_err();
    assert!(
        matches!(err, StoreError::TooLarge { found, .. } if found == 64 << 30),
        "{err}"
    );
    fs::write(&path, &good).unwrap();
    assert_eq!(
        store.get("k", "x").unwrap().unwrap().as_slice(),
        b"some value here"
    );
}

#[test]
fn value_and_name_bounds() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(tmp.path().join("s"), key()).unwrap();
    let guard = store.lock().unwrap();
    let max = vec![7u8; MAX_RECORD_LEN];
    store.put(&guard, "k", "max", &max).unwrap();
    assert_eq!(store.get("k", "max").unwrap().unwrap().as_slice(), &max[..]);
    let err = store
        .put(&guard, "k", "over", &vec![7u8; MAX_RECORD_LEN + 1])
        .unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
    let long_id = "i".repeat(1024);
    store.put(&guard, "k", &long_id, &max).unwrap();
    assert_eq!(store.get("k", &long_id).unwrap().unwrap().len(), max.len());
    for (kind, id) in [
        ("K", "x"),
        ("../x", "x"),
        ("", "x"),
        ("k", ""),
        ("k", "a\nb"),
        ("k", &"i".repeat(1025)),
    ] {
        assert!(
            store.put(&guard, kind, id, b"v").is_err(),
            "{kind:?} {id:?}"
        );
        assert!(store.get(kind, id).is_err(), "{kind:?} {id:?}");
    }
    assert!(store.list("../records").is_err());
}

/// A store holding record `k/x` = `value`, closed: its temporary
/// directory, the store's directory and the record's file.
fn closed_store_with_record() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let store = Store::init(&dir, key()).unwrap();
    let path = put_and_find(&store, "k", "x", b"value");
    (tmp, dir, path)
}

#[test]
fn leftovers_of_interrupted_writes_are_cleaned_on_open() {
    let (_tmp, dir, path) = closed_store_with_record();
    let kind_dir = path.parent().unwrap();
    let name = path.file_name().unwrap().to_str().unwrap();
    let temp = kind_dir.join(format!(".{name}.00112233aabbccdd.tmp"));
    let doomed = kind_dir.join(format!(".{name}.8899aabbccddeeff.del"));
    fs::write(&temp, b"half a record").unwrap();
    fs::write(&doomed, b"a record being deleted").unwrap();
    let meta_temp = dir.join(".store.meta.0011223344556677.tmp");
    fs::write(&meta_temp, b"{").unwrap();

    // While another handle holds the lock, open leaves them alone.
    let holder = Store::open(&dir, key()).unwrap();
    assert!(!temp.exists() && !doomed.exists() && !meta_temp.exists());
    fs::write(&temp, b"half a record").unwrap();
    let guard = holder.lock().unwrap();
    let store = Store::open(&dir, key()).unwrap();
    assert!(temp.exists(), "cleaned while another handle held the lock");
    // They never show up as records.
    assert_eq!(store.list("k").unwrap(), ["x"]);
    drop(guard);
    drop(store);
    Store::open(&dir, key()).unwrap();
    assert!(!temp.exists());
}

/// A replacement keeps the old record under a second name to wipe it once
/// the new one is in place. A crash before the replacement leaves that
/// name on the record still in place: open removes the name and leaves the
/// record whole. A crash after it leaves the old bytes under that name
/// alone: open wipes them.
#[test]
fn a_replacement_a_crash_interrupted_is_finished_without_losing_the_record() {
    let (tmp, dir, path) = closed_store_with_record();
    let kind_dir = path.parent().unwrap();
    let name = path.file_name().unwrap().to_str().unwrap();
    let before_replacing = kind_dir.join(format!(".{name}.0123456789abcdef.del"));
    fs::hard_link(&path, &before_replacing).unwrap();
    let witness = tmp.path().join("witness");
    fs::hard_link(&path, &witness).unwrap();
    let store = Store::open(&dir, key()).unwrap();
    assert!(!before_replacing.exists());
    assert_eq!(store.get("k", "x").unwrap().unwrap().as_slice(), b"value");
    assert!(fs::read(&witness).unwrap().iter().any(|&b| b != 0));
    drop(store);

    // After the replacement: the second name holds the old inode alone.
    let after_replacing = kind_dir.join(format!(".{name}.fedcba9876543210.del"));
    fs::rename(&witness, &after_replacing).unwrap();
    let old_copy = tmp.path().join("old-copy");
    fs::hard_link(&after_replacing, &old_copy).unwrap();
    {
        let store = Store::open(&dir, key()).unwrap();
        let guard = store.lock().unwrap();
        store.put(&guard, "k", "x", b"new value").unwrap();
    }
    // (The put wiped the record it replaced, which shares the inode; make
    // the leftover's bytes non-zero again to see open wipe them.)
    fs::write(&after_replacing, b"old record bytes").unwrap();
    let store = Store::open(&dir, key()).unwrap();
    assert!(!after_replacing.exists());
    assert!(fs::read(&old_copy).unwrap().iter().all(|&b| b == 0));
    assert_eq!(
        store.get("k", "x").unwrap().unwrap().as_slice(),
        b"new value"
    );
}

#[test]
fn replaced_and_deleted_records_are_overwritten() {
    // Keep a hard link to a record file: after the record is replaced or
    // deleted, the old inode's contents must be zeros.
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::init(tmp.path().join("s"), key()).unwrap();
    let path = put_and_find(&store, "k", "x", b"first value");
    let old = tmp.path().join("old-version");
    fs::hard_link(&path, &old).unwrap();
    let old_len = fs::metadata(&old).unwrap().len();
    {
        let guard = store.lock().unwrap();
        store.put(&guard, "k", "x", b"second value").unwrap();
    }
    let bytes = fs::read(&old).unwrap();
    assert_eq!(bytes.len() as u64, old_len);
    assert!(bytes.iter().all(|&b| b == 0), "old version not overwritten");
    assert_eq!(
        store.get("k", "x").unwrap().unwrap().as_slice(),
        b"second value"
    );

    let current = tmp.path().join("current-version");
    fs::hard_link(&path, &current).unwrap();
    {
        let guard = store.lock().unwrap();
        assert!(store.delete(&guard, "k", "x").unwrap());
    }
    assert!(!path.exists());
    let bytes = fs::read(&current).unwrap();
    assert!(!bytes.is_empty());
    assert!(
        bytes.iter().all(|&b| b == 0),
        "deleted record not overwritten"
    );
}

#[test]
fn try_lock_reports_a_held_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let store = Store::init(&dir, key()).unwrap();
    let other = Store::open(&dir, key()).unwrap();
    let guard = store.try_lock().unwrap();
    let err = other.try_lock().unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("locked"), "{err}");
    // Not re-entrant either, even on the same handle.
    assert!(matches!(store.try_lock(), Err(StoreError::Locked { .. })));
    drop(guard);
    let guard = other.try_lock().unwrap();
    drop(guard);

    // A blocked lock() waits for the holder in another thread: the waiter
    // starts only while the lock is held, and when it gets the lock it must
    // find the holder's release already recorded (a lock() that did not wait
    // would see it unset, and would write "w" while the holder reads).
    let store = Arc::new(store);
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let guard = store.lock().unwrap();
    let (trying_tx, trying_rx) = std::sync::mpsc::channel();
    let waiter = {
        let store = Arc::clone(&store);
        let released = Arc::clone(&released);
        std::thread::spawn(move || {
            trying_tx.send(()).unwrap();
            let guard = store.lock().unwrap();
            let saw_release = released.load(std::sync::atomic::Ordering::SeqCst);
            store.put(&guard, "k", "w", b"waited").unwrap();
            saw_release
        })
    };
    trying_rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .unwrap();
    assert_eq!(store.get("k", "w").unwrap(), None);
    released.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(guard);
    assert!(
        waiter.join().unwrap(),
        "lock() returned while another handle held the lock"
    );
    assert_eq!(store.get("k", "w").unwrap().unwrap().as_slice(), b"waited");
}

#[test]
fn key_files() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("root.key");
    let secret = RootSecret::generate_key_file(&path).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.len(), 65);
    assert!(text.ends_with('\n'));
    let key_bytes = hex::decode(text.trim()).unwrap();
    assert_eq!(key_bytes.len(), 32);
    // Only the key file itself in the directory: the temporary file is gone.
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);

    let dir = tmp.path().join("store");
    Store::init(&dir, secret).unwrap();
    Store::open(&dir, RootSecret::from_key_file(&path).unwrap()).unwrap();

    // Never overwrites.
    let err = RootSecret::generate_key_file(&path).unwrap_err();
    assert!(matches!(err, StoreError::KeyFileExists { .. }), "{err}");
    assert_eq!(fs::read_to_string(&path).unwrap(), text);

    // Readable by group or others: refused. 0400: fine.
    for mode in [0o644, 0o640, 0o604, 0o660, 0o700 | 0o001] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let err = RootSecret::from_key_file(&path).unwrap_err();
        assert!(
            matches!(err, StoreError::InsecureKeyFile { mode: m, .. } if m == mode),
            "{mode:o}: {err}"
        );
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    Store::open(&dir, RootSecret::from_key_file(&path).unwrap()).unwrap();

    // The same key as 32 raw bytes.
    let raw = tmp.path().join("raw.key");
    fs::write(&raw, &key_bytes).unwrap();
    fs::set_permissions(&raw, fs::Permissions::from_mode(0o600)).unwrap();
    Store::open(&dir, RootSecret::from_key_file(&raw).unwrap()).unwrap();

    // Upper-case hex with surrounding whitespace.
    let upper = tmp.path().join("upper.key");
    fs::write(&upper, format!("  {}\r\n", hex::encode_upper(&key_bytes))).unwrap();
    fs::set_permissions(&upper, fs::Permissions::from_mode(0o600)).unwrap();
    Store::open(&dir, RootSecret::from_key_file(&upper).unwrap()).unwrap();

    // Not a key: refused, and the error does not echo the contents.
    let bad = tmp.path().join("bad.key");
    for contents in [
        b"SECRETSECRETSECRET".to_vec(),
        b"zz".repeat(32),
        vec![b'a'; 63],
        vec![0u8; 31],
        vec![0u8; 33],
        vec![b'0'; 5000],
    ] {
        fs::write(&bad, &contents).unwrap();
        fs::set_permissions(&bad, fs::Permissions::from_mode(0o600)).unwrap();
        let err = RootSecret::from_key_file(&bad).unwrap_err();
        assert!(matches!(err, StoreError::InvalidKeyFile { .. }), "{err}");
        assert!(!err.to_string().contains("SECRET"), "{err}");
        assert!(!format!("{err:?}").contains("SECRET"), "{err:?}");
    }
    let err = RootSecret::from_key_file(&tmp.path().join("missing.key")).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    let err = RootSecret::from_key_file(tmp.path()).unwrap_err();
    assert!(matches!(err, StoreError::InvalidKeyFile { .. }), "{err}");
}

#[test]
fn debug_output_is_redacted() {
    let tmp = tempfile::tempdir().unwrap();
    let key_path = tmp.path().join("root.key");
    let secret = RootSecret::generate_key_file(&key_path).unwrap();
    let key_hex = fs::read_to_string(&key_path).unwrap().trim().to_owned();
    let key_bytes = hex::decode(&key_hex).unwrap();
    let key_debug = format!("{key_bytes:?}");
    let secret_debug = format!("{secret:?}");
    let store = Arc::new(Store::init(tmp.path().join("s"), secret).unwrap());
    let backend = LocalBackend::new(Arc::clone(&store));
    let guard = store.lock().unwrap();
    backend.create_material(&guard, "m").unwrap();
    let material = store.get(MATERIAL_KIND, "m").unwrap().unwrap();
    let material_debug = format!("{:?}", &material[2..]);
    let passphrase = fast("hunter2-passphrase");
    for text in [
        secret_debug,
        format!("{store:?}"),
        format!("{guard:?}"),
        format!("{backend:?}"),
        format!("{passphrase:?}"),
        format!("{:?}", StoreError::WrongRootSecret),
    ] {
        assert!(!text.contains(&key_hex), "{text}");
        assert!(!text.contains(&key_debug[1..20]), "{text}");
        assert!(!text.contains(&material_debug[1..20]), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}
