//! The command line on a store in PostgreSQL (`--database URL`): init,
//! two "replicas" (separate invocations) seeing each other's changes,
//! migrations, and the errors an operator meets.
//!
//! Needs KLUIS_TEST_DATABASE_URL (SKIPPED without it; a failure with
//! KLUIS_REQUIRE_DATABASE=1, as in CI).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

use kluis_keystore::pg::scratch::{self, ScratchDatabase};
use std::process::Command;
use support::{run, verifier_command};

struct Env {
    db: ScratchDatabase,
    dir: tempfile::TempDir,
}

impl Env {
    fn new(test: &str) -> Option<Env> {
        let server = scratch::server(test).expect("PostgreSQL is required here")?;
        Some(Env {
            db: ScratchDatabase::create(&server).unwrap(),
            dir: tempfile::tempdir().unwrap(),
        })
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn command(&self, role: Option<&str>, args: &[&str]) -> Command {
        let mut cmd = verifier_command();
        cmd.env("KLUIS_DATABASE_URL", self.db.url())
            .env("KLUIS_ROOT_KEY_FILE", self.path("root.key"));
        if let Some(role) = role {
            cmd.env(
                "KLUIS_CREDENTIAL_FILE",
                self.path(&format!("creds/{role}.credential")),
            );
        }
        cmd.args(args);
        cmd
    }

    fn run(&self, role: Option<&str>, args: &[&str]) -> (i32, serde_json::Value, String) {
        run(&mut self.command(role, args))
    }

    fn init(&self) -> serde_json::Value {
        let (code, out, err) = self.run(
            None,
            &[
                "init",
                "--generate-root-key",
                "--credentials-out",
                &self.path("creds"),
            ],
        );
        assert_eq!(code, 0, "{out} {err}");
        out
    }
}

#[test]
fn a_store_in_a_database_is_shared_by_every_invocation() {
    let Some(env) = Env::new("a_store_in_a_database_is_shared_by_every_invocation") else {
        return;
    };
    let init = env.init();
    let store = init["store"].as_str().unwrap();
    assert!(store.starts_with("postgresql://"), "{init}");
    assert!(store.ends_with(env.db.name()), "{init}");
    assert!(std::path::Path::new(&env.path("root.key")).is_file());

    // "Replica" one creates, "replica" two sees it (separate processes).
    let (code, out, err) = env.run(Some("key-admin"), &["key", "create", "a/b/prod"]);
    assert_eq!(code, 0, "{out} {err}");
    let (code, out, err) = env.run(Some("key-admin"), &["key", "list"]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.to_string().contains("a/b/prod"), "{out}");
    let (code, out, err) = env.run(Some("key-admin"), &["audit", "verify"]);
    assert_eq!(
        (code, out["status"].as_str()),
        (0, Some("intact")),
        "{out} {err}"
    );

    // A second init on the same database changes nothing.
    let (code, out, _) = env.run(None, &["init", "--credentials-out", &env.path("creds2")]);
    assert_eq!(code, 2, "{out}");
    let (code, out, _) = env.run(Some("key-admin"), &["key", "list"]);
    assert_eq!(code, 0);
    assert!(out.to_string().contains("a/b/prod"), "{out}");

    // Migrations: nothing left to apply.
    let (code, out, err) = env.run(None, &["migrate"]);
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(out["applied"], serde_json::json!([]), "{out}");
    assert_eq!(out["schema_version"], kluis_keystore::pg::SCHEMA_VERSION);

    // Another root key: refused as a decision, exit 1.
    let other = env.path("other.key");
    drop(kluis_keystore::RootSecret::generate_key_file(std::path::Path::new(&other)).unwrap());
    let (code, out, _) = run(env
        .command(Some("key-admin"), &["key", "list"])
        .env("KLUIS_ROOT_KEY_FILE", &other));
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("root_secret_rejected")),
        "{out}"
    );

    // Recovering a damaged log file has no meaning here: said clearly.
    let (code, out, _) = env.run(Some("key-admin"), &["audit", "recover", "--reason", "test"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("database"),
        "{out}"
    );
}

#[test]
fn database_errors_are_clear_and_never_show_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("root.key");
    drop(kluis_keystore::RootSecret::generate_key_file(&key).unwrap());
    // Nothing listens on port 1.
    let (code, out, err) = run(verifier_command().env("KLUIS_ROOT_KEY_FILE", &key).args([
        "--database",
        "postgresql://kluis:pa55-w0rd@127.0.0.1:1/state",
        "key",
        "list",
    ]));
    assert_eq!(code, 2, "{out} {err}");
    let message = out["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("postgresql://kluis@127.0.0.1:1/state"),
        "{out}"
    );
    assert!(!out.to_string().contains("pa55-w0rd"), "{out}");
    assert!(!err.contains("pa55-w0rd"), "{err}");

    // A store directory and a database at once: a usage error.
    let (code, out, _) = run(verifier_command().args([
        "--store",
        "/tmp/x",
        "--database",
        "postgresql://kluis@127.0.0.1:1/state",
        "key",
        "list",
    ]));
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (2, Some("usage")),
        "{out}"
    );
    // The store from the environment (as a quick start exports it): the
    // message names the variable.
    let (code, out, _) = run(verifier_command().env("KLUIS_STORE", "/tmp/x").args([
        "--database",
        "postgresql://kluis@127.0.0.1:1/state",
        "key",
        "list",
    ]));
    assert_eq!(code, 2, "{out}");
    assert!(
        out["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unset KLUIS_STORE"),
        "{out}"
    );

    // migrate needs a database.
    let (code, out, _) = run(verifier_command().args(["migrate"]));
    assert_eq!(code, 2, "{out}");
}

#[test]
fn the_command_line_reaches_the_database_over_verified_tls() {
    let Some(env) = Env::new("the_command_line_reaches_the_database_over_verified_tls") else {
        return;
    };
    let mut sql = postgres::Client::connect(env.db.url(), postgres::NoTls).unwrap();
    let ssl: String = sql.query_one("SHOW ssl", &[]).unwrap().get(0);
    let cert: String = sql.query_one("SHOW ssl_cert_file", &[]).unwrap().get(0);
    if ssl != "on" || std::fs::metadata(&cert).is_err() {
        eprintln!("SKIPPED: the test server offers no TLS with a readable certificate");
        return;
    }
    let url: postgres::Config = env.db.url().parse().unwrap();
    let tls_url = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user={} dbname={}",
        url.get_ports().first().copied().unwrap_or(5432),
        url.get_user().unwrap(),
        env.db.name()
    );
    let (code, out, err) =
        run(verifier_command().args(["--database", &tls_url, "--database-ca", &cert, "migrate"]));
    if code != 0 && out.to_string().contains("NotValidForName") {
        eprintln!("SKIPPED: the server's certificate does not name localhost");
        return;
    }
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(out["applied"], serde_json::json!([1, 2]), "{out}");
    // The same server with an unrelated CA: refused, nothing done.
    let other = env.path("other-ca.pem");
    std::fs::write(
        &other,
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .unwrap()
            .cert
            .pem(),
    )
    .unwrap();
    let (code, out, _) =
        run(verifier_command().args(["--database", &tls_url, "--database-ca", &other, "migrate"]));
    assert_eq!(code, 2, "{out}");
}

#[test]
fn administrative_commands_on_several_replicas_serialise() {
    let Some(env) = Env::new("administrative_commands_on_several_replicas_serialise") else {
        return;
    };
    env.init();
    // Twelve processes at once: six create distinct keys, six race to
    // create the same one.
    let children: Vec<(String, std::process::Child)> = (0..12)
        .map(|i| {
            let name = if i % 2 == 0 {
                format!("t/app/k{i}")
            } else {
                "t/app/contended".to_owned()
            };
            let child = env
                .command(Some("key-admin"), &["key", "create", &name])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (name, child)
        })
        .collect();
    let mut contended_wins = 0;
    for (name, child) in children {
        let out = child.wait_with_output().unwrap();
        let code = out.status.code().unwrap();
        if name == "t/app/contended" {
            if code == 0 {
                contended_wins += 1;
            } else {
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert!(stdout.contains("key_exists"), "{stdout}");
            }
        } else {
            assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    assert_eq!(contended_wins, 1, "the same key is created once");
    let (code, out, _) = env.run(Some("key-admin"), &["key", "list"]);
    assert_eq!(code, 0);
    let listed = out.to_string();
    for i in (0..12).step_by(2) {
        assert!(listed.contains(&format!("t/app/k{i}")), "{listed}");
    }
    // One chain holding one key.create per key made, in one order.
    let (code, out, err) = env.run(Some("key-admin"), &["audit", "verify"]);
    assert_eq!(
        (code, out["status"].as_str()),
        (0, Some("intact")),
        "{out} {err}"
    );
    let db = kluis_keystore::Database::connect(env.db.url()).unwrap();
    let secret =
        kluis_keystore::RootSecret::from_key_file(std::path::Path::new(&env.path("root.key")))
            .unwrap();
    let store = kluis_keystore::Store::open_database(db, secret).unwrap();
    let log = attestation_verifier::audit::AuditLog::open_database(&store, None).unwrap();
    let creates = log
        .records(&attestation_verifier::audit::AuditFilter::default())
        .unwrap()
        .iter()
        .filter(|r| {
            r.operation == "key.create"
                && r.decision == attestation_verifier::audit::Decision::Allowed
        })
        .count();
    assert_eq!(creates, 7);
}
