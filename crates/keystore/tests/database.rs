//! The store in PostgreSQL (KLUIS_TEST_DATABASE_URL; SKIPPED without it,
//! a failure with KLUIS_REQUIRE_DATABASE=1 as in CI). Each test has a
//! database of its own.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kluis_keystore::pg::scratch::{self, ScratchDatabase};
use kluis_keystore::{Database, RootSecret, Store, StoreError};

fn scratch(test: &str) -> Option<ScratchDatabase> {
    let server = scratch::server(test).expect("PostgreSQL is required here")?;
    Some(ScratchDatabase::create(&server).expect("a scratch database"))
}

fn key() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root.key");
    drop(RootSecret::generate_key_file(&path).unwrap());
    (dir, path)
}

/// A new store in `db` under the key file `key` (a replica's first start).
fn init(db: &ScratchDatabase, key: &std::path::Path) -> Store {
    Store::init_database(
        Database::connect(db.url()).unwrap(),
        RootSecret::from_key_file(key).unwrap(),
    )
    .unwrap()
}

/// The store in `db` opened with the key file `key`.
fn open(db: &ScratchDatabase, key: &std::path::Path) -> Result<Store, StoreError> {
    Store::open_database(
        Database::connect(db.url()).unwrap(),
        RootSecret::from_key_file(key).unwrap(),
    )
}

fn sql(db: &ScratchDatabase) -> postgres::Client {
    postgres::Client::connect(db.url(), postgres::NoTls).unwrap()
}

#[test]
fn records_round_trip_and_the_database_sees_only_ciphertext() {
    let Some(db) = scratch("records_round_trip_and_the_database_sees_only_ciphertext") else {
        return;
    };
    let (_keys, key) = key();
    let store = init(&db, &key);
    let value = b"wrapped-material-do-not-leak-0123456789";
    {
        let guard = store.lock().unwrap();
        store
            .put(&guard, "cmk", "agency-a/app-x/prod", value)
            .unwrap();
        store
            .put(&guard, "cmk", "agency-b/app-y/test", b"other")
            .unwrap();
        store
            .put(&guard, "policy", "agency-a/app-x/prod", b"p")
            .unwrap();
    }
    assert_eq!(
        store
            .get("cmk", "agency-a/app-x/prod")
            .unwrap()
            .map(|v| v.to_vec()),
        Some(value.to_vec())
    );
    assert_eq!(
        store.list("cmk").unwrap(),
        vec!["agency-a/app-x/prod", "agency-b/app-y/test"]
    );
    assert_eq!(store.get("cmk", "nobody/none/x").unwrap(), None);

    // What a database administrator reads: kinds, name tags, ciphertext.
    let rows = sql(&db)
        .query("SELECT kind, tag, body FROM kluis_records", &[])
        .unwrap();
    assert_eq!(rows.len(), 3);
    for row in rows {
        let tag: Vec<u8> = row.get(1);
        let body: Vec<u8> = row.get(2);
        for haystack in [&tag, &body] {
            assert!(!haystack.windows(value.len()).any(|w| w == value.as_slice()));
            assert!(!haystack.windows(8).any(|w| w == b"agency-a"));
        }
    }

    // Another handle (another replica) sees the same records; a wrong
    // secret opens nothing.
    let other = open(&db, &key).unwrap();
    assert_eq!(other.list("policy").unwrap(), vec!["agency-a/app-x/prod"]);
    let (_k2, wrong) = self::key();
    let err = open(&db, &wrong).unwrap_err();
    assert!(matches!(err, StoreError::WrongRootSecret), "{err}");

    {
        let guard = other.lock().unwrap();
        assert!(other.delete(&guard, "cmk", "agency-b/app-y/test").unwrap());
        assert!(!other.delete(&guard, "cmk", "agency-b/app-y/test").unwrap());
    }
    assert_eq!(store.list("cmk").unwrap(), vec!["agency-a/app-x/prod"]);

    // A second init on the same database is refused and changes nothing.
    let err = Store::init_database(
        Database::connect(db.url()).unwrap(),
        RootSecret::from_key_file(&key).unwrap(),
    )
    .unwrap_err();
    assert!(matches!(err, StoreError::NotEmpty { .. }), "{err}");
    assert_eq!(store.list("cmk").unwrap(), vec!["agency-a/app-x/prod"]);
}

/// Several records read in one query give what reading them one by one
/// gives, in the order asked (absent ones as `None`), with the same checks:
/// a row moved under another record's tag is refused.
#[test]
fn records_read_together_are_the_records_read_one_by_one() {
    let Some(db) = scratch("records_read_together_are_the_records_read_one_by_one") else {
        return;
    };
    let (_keys, key) = key();
    let store = init(&db, &key);
    {
        let guard = store.lock().unwrap();
        store.put(&guard, "cmk", "a/b/c", b"one").unwrap();
        store.put(&guard, "policy", "a/b/c", b"two").unwrap();
        store.put(&guard, "system", "intent", b"three").unwrap();
    }
    let wanted = [
        ("policy", "a/b/c"),
        ("cmk", "a/b/missing"),
        ("system", "intent"),
        ("cmk", "a/b/c"),
    ];
    let together: Vec<Option<Vec<u8>>> = store
        .get_many(&wanted)
        .unwrap()
        .into_iter()
        .map(|v| v.map(|v| v.to_vec()))
        .collect();
    let one_by_one: Vec<Option<Vec<u8>>> = wanted
        .iter()
        .map(|(kind, id)| store.get(kind, id).unwrap().map(|v| v.to_vec()))
        .collect();
    assert_eq!(together, one_by_one);
    assert_eq!(
        together,
        vec![
            Some(b"two".to_vec()),
            None,
            Some(b"three".to_vec()),
            Some(b"one".to_vec())
        ]
    );
    let too_many = vec![("cmk", "a/b/c"); kluis_keystore::MAX_GET_MANY + 1];
    assert!(matches!(
        store.get_many(&too_many),
        Err(StoreError::TooLarge { .. })
    ));
    // The policy's body moved under the key record's row: refused, as by get.
    sql(&db)
        .batch_execute(
            "UPDATE kluis_records r SET body = o.body FROM kluis_records o \
             WHERE r.kind = 'cmk' AND o.kind = 'policy'",
        )
        .unwrap();
    let err = store.get_many(&wanted).unwrap_err();
    assert!(matches!(err, StoreError::CorruptRecord { .. }), "{err}");
}

#[test]
fn a_row_moved_or_altered_by_the_administrator_fails_to_open() {
    let Some(db) = scratch("a_row_moved_or_altered_by_the_administrator_fails_to_open") else {
        return;
    };
    let (_keys, key) = key();
    let store = init(&db, &key);
    {
        let guard = store.lock().unwrap();
        store.put(&guard, "cmk", "a/b/c", b"one").unwrap();
        store.put(&guard, "cmk", "a/b/d", b"two").unwrap();
    }
    let mut client = sql(&db);
    // Swap the two bodies: each now sits under the other's tag.
    client
        .batch_execute(
            "UPDATE kluis_records r SET body = o.body FROM kluis_records o \
             WHERE r.kind = 'cmk' AND o.kind = 'cmk' AND r.tag <> o.tag",
        )
        .unwrap();
    let err = store.get("cmk", "a/b/c").unwrap_err();
    assert!(matches!(err, StoreError::CorruptRecord { .. }), "{err}");
    assert!(store.list("cmk").is_err());
    // Moved to another kind.
    client
        .batch_execute("UPDATE kluis_records SET kind = 'policy'")
        .unwrap();
    // The name tag binds the kind: the row is not found under the new kind
    // by name, and listing that kind fails to open it.
    assert!(store.get("policy", "a/b/c").unwrap().is_none());
    let err = store.list("policy").unwrap_err();
    assert!(matches!(err, StoreError::CorruptRecord { .. }), "{err}");
    // A row far larger than a record is refused before it is decrypted.
    client
        .batch_execute("UPDATE kluis_records SET body = decode(repeat('00', 2100000), 'hex')")
        .unwrap();
    let err = store.list("policy").unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
}

#[test]
fn the_lock_excludes_other_replicas_and_dies_with_its_connection() {
    let Some(db) = scratch("the_lock_excludes_other_replicas_and_dies_with_its_connection") else {
        return;
    };
    let (_keys, key) = key();
    let a = init(&db, &key);
    let b = open(&db, &key).unwrap();
    let guard = a.lock().unwrap();
    let err = b.try_lock().unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    drop(guard);
    let guard_b = b.try_lock().unwrap();
    b.put(&guard_b, "cmk", "x/y/z", b"v").unwrap();

    // The server ends the lock's session (a replica cut off, or killed):
    // its writes fail, and another replica can take the lock.
    sql(&db)
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks \
             WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()",
        )
        .unwrap();
    let err = b.put(&guard_b, "cmk", "x/y/z", b"late").unwrap_err();
    assert!(matches!(err, StoreError::Database { .. }), "{err}");
    let guard_a = a.try_lock().unwrap();
    a.put(&guard_a, "cmk", "x/y/z", b"new").unwrap();
    drop(guard_a);
    drop(guard_b);
    assert_eq!(
        b.get("cmk", "x/y/z").unwrap().map(|v| v.to_vec()),
        Some(b"new".to_vec())
    );
}

#[test]
fn a_schema_the_build_does_not_know_is_refused() {
    let Some(db) = scratch("a_schema_the_build_does_not_know_is_refused") else {
        return;
    };
    let (_keys, key) = key();
    // No schema at all: not a store.
    let err = open(&db, &key).unwrap_err();
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");

    // Replicas migrating at once: one applies, the others find it done.
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let url = db.url().to_owned();
            std::thread::spawn(move || Database::connect(&url).unwrap().migrate().unwrap())
        })
        .collect();
    let applied: Vec<Vec<i32>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        applied.iter().filter(|a| !a.is_empty()).count(),
        1,
        "{applied:?}"
    );
    let database = Database::connect(db.url()).unwrap();
    assert_eq!(
        database.schema_version().unwrap(),
        Some(kluis_keystore::pg::SCHEMA_VERSION)
    );
    database.check_schema().unwrap();

    drop(init(&db, &key));
    // A newer replica migrated past this build.
    sql(&db)
        .batch_execute(
            "INSERT INTO kluis_schema (version, description) VALUES (99, 'from the future')",
        )
        .unwrap();
    let err = open(&db, &key).unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaVersion { found: 99, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade"), "{err}");
    let err = database.migrate().unwrap_err();
    assert!(matches!(err, StoreError::SchemaVersion { .. }), "{err}");
}

#[test]
fn an_unreachable_database_is_a_clear_error() {
    // Port 1 on loopback: nothing listens there.
    let err = Database::connect("postgresql://kluis:pw-secret@127.0.0.1:1/none").unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Database { .. }), "{text}");
    assert!(
        text.contains("postgresql://kluis@127.0.0.1:1/none"),
        "{text}"
    );
    assert!(!text.contains("pw-secret"), "{text}");
    // With the reason why, not only "error connecting to server".
    assert!(text.to_lowercase().contains("refused"), "{text}");
}

/// The server's certificate for the TLS tests: the one the local server
/// presents (Debian's default is the snakeoil certificate for
/// `localhost`), read from the server's own settings.
fn server_certificate(db: &ScratchDatabase) -> Option<(Vec<u8>, String)> {
    let mut client = sql(db);
    let ssl: String = client.query_one("SHOW ssl", &[]).unwrap().get(0);
    if ssl != "on" {
        eprintln!("SKIPPED: the test server does not offer TLS (ssl = {ssl})");
        return None;
    }
    let file: String = client.query_one("SHOW ssl_cert_file", &[]).unwrap().get(0);
    let Ok(pem) = std::fs::read(&file) else {
        eprintln!("SKIPPED: the server's certificate {file} is not readable here");
        return None;
    };
    // The name it is issued to: the first DNS name of its PEM, found by the
    // TLS stack below; the Debian default is localhost.
    Some((pem, "localhost".to_owned()))
}

#[test]
fn tls_to_the_database_is_verified_against_the_given_ca() {
    let Some(db) = scratch("tls_to_the_database_is_verified_against_the_given_ca") else {
        return;
    };
    let Some((pem, name)) = server_certificate(&db) else {
        return;
    };
    let url: postgres::Config = db.url().parse().unwrap();
    let user = url.get_user().unwrap().to_owned();
    let port = url.get_ports().first().copied().unwrap_or(5432);
    // The certificate's name as host, the loopback address to connect to.
    let tls_url = format!(
        "host={name} hostaddr=127.0.0.1 port={port} user={user} dbname={}",
        db.name()
    );
    let database = match Database::connect_tls(&tls_url, Some(&pem)) {
        Ok(database) => database,
        Err(e) if e.to_string().contains("NotValidForName") => {
            eprintln!("SKIPPED: the server's certificate does not name {name}: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let encrypted: bool = database
        .client()
        .unwrap()
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(encrypted, "the pooled connection is TLS");

    // The right CA but another name: refused.
    let wrong_name = format!(
        "host=127.0.0.1 port={port} user={user} dbname={}",
        db.name()
    );
    let err = Database::connect_tls(&wrong_name, Some(&pem)).unwrap_err();
    assert!(matches!(err, StoreError::Database { .. }), "{err}");

    // Another CA: refused.
    let other = another_self_signed_certificate();
    let err = Database::connect_tls(&tls_url, Some(other.as_bytes())).unwrap_err();
    assert!(matches!(err, StoreError::Database { .. }), "{err}");

    // A CA file and sslmode=disable contradict each other.
    let err = Database::connect_tls(&format!("{tls_url} sslmode=disable"), Some(&pem)).unwrap_err();
    assert!(err.to_string().contains("sslmode=disable"), "{err}");
    // A CA file that holds no certificate.
    let err = Database::connect_tls(&tls_url, Some(b"not a certificate")).unwrap_err();
    assert!(err.to_string().contains("no certificate"), "{err}");
}

/// A self-signed certificate for `localhost` that is not the server's.
fn another_self_signed_certificate() -> String {
    rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .unwrap()
        .cert
        .pem()
}

#[test]
fn a_remote_database_without_tls_is_refused_unless_asked_for() {
    // Nothing is sent: the decision is made before connecting.
    let err = Database::connect("postgresql://kluis@db.example:5432/state").unwrap_err();
    assert!(err.to_string().contains("--database-ca"), "{err}");
    let err =
        Database::connect("postgresql://kluis@db.example:5432/state?sslmode=require").unwrap_err();
    assert!(err.to_string().contains("--database-ca"), "{err}");
}
