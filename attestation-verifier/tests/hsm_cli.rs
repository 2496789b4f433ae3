//! The command line on a store whose keys live in a PKCS#11 token
//! (SoftHSM2): `init --hsm-module`, later commands with only the PIN, data
//! round trips through the token, and clear refusals for a wrong or missing
//! PIN, a root secret given to an HSM store, and a missing token.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kluis_hsm::softhsm;

mod support;
use support::write_private;

const KEY: &str = "agency-a/app-x/prod";

struct Env {
    dir: tempfile::TempDir,
    config: kluis_hsm::TokenConfig,
}

impl Env {
    fn new() -> Option<Env> {
        let config = softhsm::throwaway_token("cli").unwrap()?;
        let env = Env {
            dir: tempfile::tempdir().unwrap(),
            config,
        };
        write_private(&env.path("pin"), &format!("{}\n", softhsm::THROWAWAY_PIN));
        write_private(&env.path("wrong-pin"), "0000\n");
        Some(env)
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn cred(&self, role: &str) -> PathBuf {
        self.dir
            .path()
            .join("creds")
            .join(format!("{role}.credential"))
    }

    fn command(&self) -> Command {
        let mut cmd = support::verifier_command();
        cmd.env("KLUIS_STORE", self.dir.path().join("store"));
        cmd
    }

    fn run(&self, cmd: &mut Command) -> (i32, serde_json::Value, String) {
        support::run(cmd)
    }

    /// A command with the PIN file and, if given, a credential.
    fn with_pin(
        &self,
        credential: Option<&Path>,
        args: &[&str],
    ) -> (i32, serde_json::Value, String) {
        let mut cmd = self.command();
        cmd.env("KLUIS_HSM_PIN_FILE", self.path("pin")).args(args);
        if let Some(c) = credential {
            cmd.env("KLUIS_CREDENTIAL_FILE", c);
        }
        self.run(&mut cmd)
    }
}

#[test]
fn a_store_in_the_token_end_to_end() {
    let Some(env) = Env::new() else { return };
    let module = env.config.module.display().to_string();
    let (code, init, err) = env.with_pin(
        None,
        &[
            "init",
            "--hsm-module",
            &module,
            "--hsm-token",
            &env.config.token,
            "--credentials-out",
            &env.path("creds"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(init["key_backend"], "pkcs11");
    let public = init["verifier_public_key"].as_str().unwrap().to_owned();
    assert_eq!(public.len(), 194);
    // The store remembers the token; there is no root key anywhere.
    let store = env.dir.path().join("store");
    assert!(store.join("hsm.json").is_file());
    let names: Vec<String> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains("root")), "{names:?}");

    // Later commands need only the PIN; the identity is the token's.
    let key_admin = env.cred("key-admin");
    let app_admin = env.cred("app-admin");
    let (code, shown, err) = env.with_pin(Some(&key_admin), &["identity"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(shown["verifier_public_key"].as_str().unwrap(), public);

    let (code, _, err) = env.with_pin(Some(&key_admin), &["key", "create", KEY]);
    assert_eq!(code, 0, "{err}");
    let plain: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(env.path("plain"), &plain).unwrap();
    let encrypt = |out: &str| {
        env.with_pin(
            Some(&app_admin),
            &[
                "data",
                "encrypt",
                "--key",
                KEY,
                &env.path("plain"),
                &env.path(out),
            ],
        )
    };
    let decrypt = |input: &str, out: &str| {
        env.with_pin(
            Some(&app_admin),
            &["data", "decrypt", &env.path(input), &env.path(out)],
        )
    };
    let (code, _, err) = encrypt("v1.env");
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = env.with_pin(Some(&key_admin), &["key", "rotate", KEY]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = encrypt("v2.env");
    assert_eq!(code, 0, "{err}");
    for (input, out) in [("v1.env", "back1"), ("v2.env", "back2")] {
        let (code, _, err) = decrypt(input, out);
        assert_eq!(code, 0, "{err}");
        assert_eq!(std::fs::read(env.path(out)).unwrap(), plain);
    }

    let (_, shown, _) = env.with_pin(Some(&key_admin), &["key", "show", KEY]);
    assert_eq!(shown["versions"].as_array().unwrap().len(), 2);

    // A wrong PIN is a refusal (exit 1), said once; no PIN is a usage error.
    let mut cmd = env.command();
    cmd.env("KLUIS_HSM_PIN_FILE", env.path("wrong-pin"))
        .env("KLUIS_CREDENTIAL_FILE", &key_admin)
        .args(["key", "list"]);
    let (code, out, _) = env.run(&mut cmd);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("hsm_pin_rejected"))
    );
    assert!(!out.to_string().contains("0000"));
    let mut cmd = env.command();
    cmd.env("KLUIS_CREDENTIAL_FILE", &key_admin)
        .args(["key", "list"]);
    let (code, out, _) = env.run(&mut cmd);
    assert_eq!(code, 2);
    assert!(out["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--hsm-pin-file"));
    // A root secret does not open an HSM store, and says why.
    write_private(&env.path("some.key"), &"k".repeat(32));
    let mut cmd = env.command();
    cmd.env("KLUIS_ROOT_KEY_FILE", env.path("some.key"))
        .env("KLUIS_CREDENTIAL_FILE", &key_admin)
        .args(["key", "list"]);
    let (code, out, _) = env.run(&mut cmd);
    assert_eq!(code, 2);
    assert!(
        out["error"]["message"].as_str().unwrap().contains("HSM"),
        "{out}"
    );
    // The PIN is never a command-line value.
    let (code, _, _) = env.with_pin(None, &["--hsm-pin", "1234", "identity"]);
    assert_eq!(code, 2);

    // The store directory alone (another machine, no token) opens nothing.
    let mut cmd = env.command();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(
        elsewhere.path().join("softhsm2.conf"),
        format!("directories.tokendir = {}\n", elsewhere.path().display()),
    )
    .unwrap();
    cmd.env("SOFTHSM2_CONF", elsewhere.path().join("softhsm2.conf"))
        .env("KLUIS_HSM_PIN_FILE", env.path("pin"))
        .env("KLUIS_CREDENTIAL_FILE", &key_admin)
        .args(["identity"]);
    let (code, out, _) = env.run(&mut cmd);
    assert_eq!(code, 2);
    assert!(
        out["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no token labelled"),
        "{out}"
    );
}

/// A store in PostgreSQL whose keys are in the token: replicas reach the
/// same token and the same database (KLUIS_TEST_DATABASE_URL; SKIPPED
/// without it or without SoftHSM2).
#[test]
fn a_store_in_a_database_with_its_keys_in_the_token() {
    let Some(server) =
        kluis_keystore::pg::scratch::server("a_store_in_a_database_with_its_keys_in_the_token")
            .expect("PostgreSQL is required here")
    else {
        return;
    };
    let Some(env) = Env::new() else { return };
    let db = kluis_keystore::pg::scratch::ScratchDatabase::create(&server).unwrap();
    let module = env.config.module.display().to_string();
    let with_db = |credential: Option<&Path>, args: &[&str]| {
        let mut cmd = support::verifier_command();
        cmd.env("KLUIS_DATABASE_URL", db.url())
            .env("KLUIS_HSM_PIN_FILE", env.path("pin"))
            .args(args);
        if let Some(c) = credential {
            cmd.env("KLUIS_CREDENTIAL_FILE", c);
        }
        support::run(&mut cmd)
    };
    let (code, init, err) = with_db(
        None,
        &[
            "init",
            "--hsm-module",
            &module,
            "--hsm-token",
            &env.config.token,
            "--credentials-out",
            &env.path("creds"),
        ],
    );
    assert_eq!(code, 0, "{init} {err}");
    assert_eq!(init["key_backend"], "pkcs11");
    let key_admin = env.cred("key-admin");
    let app_admin = env.cred("app-admin");
    let (code, out, err) = with_db(Some(&key_admin), &["key", "create", KEY]);
    assert_eq!(code, 0, "{out} {err}");
    let plain = b"a record of personal data".repeat(100);
    std::fs::write(env.path("plain"), &plain).unwrap();
    let (code, out, err) = with_db(
        Some(&app_admin),
        &[
            "data",
            "encrypt",
            "--key",
            KEY,
            &env.path("plain"),
            &env.path("sealed"),
        ],
    );
    assert_eq!(code, 0, "{out} {err}");
    let (code, out, err) = with_db(
        Some(&app_admin),
        &["data", "decrypt", &env.path("sealed"), &env.path("back")],
    );
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(std::fs::read(env.path("back")).unwrap(), plain);
    let (code, shown, _) = with_db(Some(&key_admin), &["identity"]);
    assert_eq!(code, 0);
    assert_eq!(shown["verifier_public_key"], init["verifier_public_key"]);

    // The database holds the token's settings and no key: the store root
    // there is wrapped by a token key, the master keys are token objects.
    let mut sql = postgres::Client::connect(db.url(), postgres::NoTls).unwrap();
    let setting: Vec<u8> = sql
        .query_one(
            "SELECT value FROM kluis_store_config WHERE name = 'hsm'",
            &[],
        )
        .unwrap()
        .get(0);
    let setting: serde_json::Value = serde_json::from_slice(&setting).unwrap();
    assert_eq!(setting["token"], env.config.token.as_str());
    let kinds: Vec<String> = sql
        .query("SELECT DISTINCT kind FROM kluis_records ORDER BY kind", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(kinds.contains(&"pkcs11-material".to_owned()), "{kinds:?}");
    assert!(!kinds.contains(&"material".to_owned()), "{kinds:?}");

    // A root secret does not open it, and says why.
    write_private(&env.path("some.key"), &"k".repeat(32));
    let mut cmd = support::verifier_command();
    cmd.env("KLUIS_DATABASE_URL", db.url())
        .env("KLUIS_ROOT_KEY_FILE", env.path("some.key"))
        .env("KLUIS_CREDENTIAL_FILE", &key_admin)
        .args(["key", "list"]);
    let (code, out, _) = support::run(&mut cmd);
    assert_eq!(code, 2, "{out}");
    assert!(out.to_string().contains("PIN"), "{out}");
}
