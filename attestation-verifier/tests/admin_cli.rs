//! The administrative command line, driven as an operator would: separation of
//! duties, exit codes, the data envelope tools, and audit verification.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::Command;

mod support;
use support::{write_private, CliStore as Env};

const KEY: &str = "agency-a/app-x/prod";

#[test]
fn separation_of_duties_and_authentication() {
    let env = Env::new();
    let key_admin = env.cred("key-admin");
    let app_admin = env.cred("app-admin");

    let (code, out, err) = env.run(Some(&key_admin), &["key", "create", KEY]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out["current_version"], 1);

    // The application administrator cannot manage keys; the key administrator
    // cannot set policy or use data.
    let (code, out, _) = env.run(Some(&app_admin), &["key", "rotate", KEY]);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("forbidden"))
    );
    std::fs::write(env.path("p.toml"), "operations = [\"generate\"]\nmax_document_age_seconds = 60\n[[measurements]]\nname = \"a\"\npcr0 = \"".to_owned() + &"ab".repeat(48) + "\"\n").unwrap();
    let (code, _, _) = env.run(
        Some(&key_admin),
        &["policy", "set", KEY, &env.path("p.toml")],
    );
    assert_eq!(code, 1);
    let (code, _, err) = env.run(
        Some(&app_admin),
        &["policy", "set", KEY, &env.path("p.toml")],
    );
    assert_eq!(code, 0, "{err}");

    // No credential, a forged one, one from another store: refused.
    let (code, out, _) = env.run(None, &["key", "list"]);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("credential_missing"))
    );
    write_private(
        &env.path("forged"),
        "kluis1.key-admin.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n",
    );
    let (code, out, _) = env.run(Some(Path::new(&env.path("forged"))), &["key", "list"]);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("credential_rejected"))
    );
    let other = Env::new();
    let (code, _, _) = env.run(Some(&other.cred("key-admin")), &["key", "list"]);
    assert_eq!(code, 1);

    // A key administrator can add key administrators only.
    let (code, _, _) = env.run(
        Some(&key_admin),
        &[
            "admin",
            "add",
            "--role",
            "app-admin",
            "--name",
            "mallory",
            "--out",
            &env.path("m.cred"),
        ],
    );
    assert_eq!(code, 1);
    let (code, _, err) = env.run(
        Some(&key_admin),
        &[
            "admin",
            "add",
            "--role",
            "key-admin",
            "--name",
            "bob",
            "--out",
            &env.path("bob.cred"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = env.run(
        Some(Path::new(&env.path("bob.cred"))),
        &["key", "rotate", KEY],
    );
    assert_eq!(code, 0, "{err}");

    // Every refusal is in the audit log, which verifies.
    let (code, out, err) = env.run(Some(&app_admin), &["audit", "verify"]);
    assert_eq!(code, 0, "{err}");
    assert!(out["records"].as_u64().unwrap() >= 9);
    let (_, _, _) = env.run(
        Some(&app_admin),
        &["audit", "show", "--decision", "refused", "--json"],
    );
    let shown = Command::new(env!("CARGO_BIN_EXE_attestation-verifier"))
        .env("KLUIS_STORE", env.dir.path().join("store"))
        .env("KLUIS_ROOT_KEY_FILE", env.dir.path().join("root.key"))
        .env("KLUIS_CREDENTIAL_FILE", &app_admin)
        .args(["audit", "show", "--decision", "refused", "--json"])
        .output()
        .unwrap();
    let refused: Vec<serde_json::Value> = String::from_utf8_lossy(&shown.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(refused.len() >= 5, "{refused:?}");
    assert!(refused
        .iter()
        .all(|r| r["decision"] == "refused" && r["reason"].is_string()));

    // Credentials and keys never reach the audit log or the store in the clear.
    let secret = std::fs::read_to_string(&key_admin).unwrap();
    let secret = secret.trim().rsplit('.').next().unwrap();
    for entry in walk(env.dir.path().join("store").as_path()) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{} holds a credential",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn data_envelope_round_trip_tamper_and_shredding() {
    let env = Env::new();
    let key_admin = env.cred("key-admin");
    let app_admin = env.cred("app-admin");
    assert_eq!(env.run(Some(&key_admin), &["key", "create", KEY]).0, 0);

    for size in [0usize, 1, 65_536, 65_537, 300_000] {
        let plain: Vec<u8> = (0..size)
            .map(|i| u8::try_from(i * 31 % 251).unwrap())
            .collect();
        std::fs::write(env.path("plain"), &plain).unwrap();
        let (code, out, err) = env.run(
            Some(&app_admin),
            &[
                "data",
                "encrypt",
                "--force",
                "--key",
                KEY,
                &env.path("plain"),
                &env.path("env"),
            ],
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(out["plaintext_bytes"], size);
        let (code, _, err) = env.run(
            Some(&app_admin),
            &[
                "data",
                "decrypt",
                "--force",
                &env.path("env"),
                &env.path("back"),
            ],
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(std::fs::read(env.path("back")).unwrap(), plain);
    }

    // A flipped byte: refused, and no output file appears.
    let mut env_bytes = std::fs::read(env.path("env")).unwrap();
    let i = env_bytes.len() / 2;
    env_bytes[i] ^= 1;
    std::fs::write(env.path("tampered"), &env_bytes).unwrap();
    let (code, out, _) = env.run(
        Some(&app_admin),
        &["data", "decrypt", &env.path("tampered"), &env.path("never")],
    );
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("envelope_rejected"))
    );
    assert!(!Path::new(&env.path("never")).exists());
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".kluis-partial")
        })
        .collect();
    assert!(leftovers.is_empty());

    // Rotation keeps old envelopes readable.
    assert_eq!(env.run(Some(&key_admin), &["key", "rotate", KEY]).0, 0);
    assert_eq!(
        env.run(
            Some(&app_admin),
            &["data", "decrypt", &env.path("env"), &env.path("back2")]
        )
        .0,
        0
    );

    // Shredding: schedule (waiting period enforced), then nothing decrypts —
    // already while pending, and the error names the key.
    let (code, out, _) = env.run(
        Some(&key_admin),
        &["key", "schedule-deletion", KEY, "--days", "6"],
    );
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("invalid_argument"))
    );
    assert_eq!(
        env.run(
            Some(&key_admin),
            &["key", "schedule-deletion", KEY, "--days", "7"]
        )
        .0,
        0
    );
    let (code, out, _) = env.run(Some(&key_admin), &["key", "destroy", KEY]);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("waiting_period"))
    );
    // Times in messages are RFC 3339, as in `key show`.
    let message = out["error"]["message"].as_str().unwrap();
    let destroy_after = {
        let (_, shown, _) = env.run(Some(&key_admin), &["key", "show", KEY]);
        shown["state_detail"]["destroy_after"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(
        message.contains(&destroy_after),
        "{message} / {destroy_after}"
    );
    let (code, out, _) = env.run(
        Some(&app_admin),
        &["data", "decrypt", &env.path("env"), &env.path("no")],
    );
    assert_eq!(code, 1);
    assert!(out["error"]["message"].as_str().unwrap().contains(KEY));
}

#[test]
fn audit_tampering_is_detected_by_the_command() {
    let env = Env::new();
    let key_admin = env.cred("key-admin");
    for i in 0..5 {
        assert_eq!(
            env.run(Some(&key_admin), &["key", "create", &format!("t/a/e{i}")])
                .0,
            0
        );
    }
    let log = env.dir.path().join("store").join("audit.log");
    let original = std::fs::read(&log).unwrap();
    assert_eq!(env.run(Some(&key_admin), &["audit", "verify"]).0, 0);

    // Change one byte inside the first key.create record's operation name.
    let text = String::from_utf8(original.clone()).unwrap();
    let (index, line) = text
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains("\"key.create\""))
        .unwrap();
    let changed = text.replacen(line, &line.replacen("key.create", "key.crEate", 1), 1);
    std::fs::write(&log, changed).unwrap();
    let (code, out, _) = env.run(Some(&key_admin), &["audit", "verify"]);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("audit_broken"))
    );
    assert!(
        out["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("seq {}", index + 1)),
        "{out}"
    );

    // Drop the last record: the head anchored in the store catches it.
    let lines: Vec<&str> = std::str::from_utf8(&original).unwrap().lines().collect();
    std::fs::write(&log, lines[..lines.len() - 1].join("\n") + "\n").unwrap();
    let (code, out, _) = env.run(Some(&key_admin), &["audit", "verify"]);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("audit_broken")),
        "{out}"
    );
}

/// Records removed from the log's end while nothing runs stay detected: no
/// command (not even a failed login) appends past the gap, `serve` refuses
/// to start, and only a key administrator's audited `audit recover` starts
/// a new log.
#[test]
fn a_truncated_audit_tail_never_heals_until_an_audited_recovery() {
    let env = Env::new();
    let key_admin = env.cred("key-admin");
    let app_admin = env.cred("app-admin");
    for i in 0..3 {
        assert_eq!(
            env.run(Some(&key_admin), &["key", "create", &format!("t/a/e{i}")])
                .0,
            0
        );
    }
    let log = env.dir.path().join("store").join("audit.log");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let cut = lines[..lines.len() - 2].join("\n") + "\n";
    std::fs::write(&log, &cut).unwrap();

    let bogus = env.dir.path().join("bogus.credential");
    std::fs::write(&bogus, "kluis-admin:nobody:00").unwrap();
    let broken = |(code, out, err): (i32, serde_json::Value, String)| {
        assert_eq!(
            (code, out["error"]["kind"].as_str()),
            (1, Some("audit_broken")),
            "{out} {err}"
        );
        out["error"]["message"].as_str().unwrap().to_owned()
    };
    // Failed logins, reads, changes and the service: all refused, and
    // nothing is appended.
    broken(env.run(Some(&bogus), &["key", "list"]));
    broken(env.run(Some(&key_admin), &["key", "create", "t/a/x"]));
    broken(env.run(Some(&app_admin), &["serve", "--listen", "127.0.0.1:0"]));
    let message = broken(env.run(Some(&key_admin), &["audit", "verify"]));
    assert!(message.contains("removed"), "{message}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), cut);

    // Recovery is a key administrator's, and says why.
    let (code, out, _) = env.run(Some(&app_admin), &["audit", "recover", "--reason", "x"]);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("forbidden"))
    );
    let (code, out, err) = env.run(
        Some(&key_admin),
        &["audit", "recover", "--reason", "ticket 7: tail lost"],
    );
    assert_eq!(code, 0, "{out} {err}");
    let damaged: Vec<_> = std::fs::read_dir(env.dir.path().join("store"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("audit.log.damaged-"))
        .collect();
    assert_eq!(damaged.len(), 1);
    assert_eq!(
        std::fs::read_to_string(env.dir.path().join("store").join(&damaged[0])).unwrap(),
        cut
    );
    let (code, out, _) = env.run(Some(&key_admin), &["audit", "verify"]);
    assert_eq!((code, out["status"].as_str()), (0, Some("intact")), "{out}");
    let (_, _, _) = env.run(Some(&key_admin), &["key", "list"]);
    let records = std::fs::read_to_string(&log).unwrap();
    let first: serde_json::Value = serde_json::from_str(records.lines().next().unwrap()).unwrap();
    assert_eq!(first["operation"], "audit.recover");
    assert!(first["reason"].as_str().unwrap().contains("ticket 7"));
    let (code, out, _) = env.run(Some(&key_admin), &["audit", "recover", "--reason", "again"]);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("audit_intact"))
    );
}

/// Every administrative change has its audit record before it, even when a
/// command is killed at any moment: each key version beyond the first has
/// an allowed `key.rotate` record naming it.
#[test]
fn killed_rotations_never_leave_an_unaudited_version() {
    let env = Env::new();
    let key_admin = env.cred("key-admin");
    assert_eq!(env.run(Some(&key_admin), &["key", "create", KEY]).0, 0);
    for i in 0..12u64 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_attestation-verifier"))
            .env("KLUIS_STORE", env.dir.path().join("store"))
            .env("KLUIS_ROOT_KEY_FILE", env.dir.path().join("root.key"))
            .env("KLUIS_CREDENTIAL_FILE", &key_admin)
            .args(["key", "rotate", KEY])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill at staggered points of the command's run.
        std::thread::sleep(std::time::Duration::from_millis(2 + i * 3));
        let _ = child.kill();
        let _ = child.wait();
    }
    // The next command resolves an interrupted change first.
    let (code, out, err) = env.run(Some(&key_admin), &["key", "show", KEY]);
    assert_eq!(code, 0, "{err}");
    let versions: Vec<u64> = out["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    let (code, _, _) = env.run(Some(&key_admin), &["audit", "verify"]);
    assert_eq!(code, 0);
    let log = std::fs::read_to_string(env.dir.path().join("store").join("audit.log")).unwrap();
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for v in versions.iter().filter(|v| **v > 1) {
        assert!(
            records.iter().any(|r| r["operation"] == "key.rotate"
                && r["decision"] == "allowed"
                && r["key_version"] == *v),
            "version {v} has no key.rotate record"
        );
    }
    // Every allowed rotation either made its version or was voided.
    for r in records
        .iter()
        .filter(|r| r["operation"] == "key.rotate" && r["decision"] == "allowed")
    {
        let v = r["key_version"].as_u64().unwrap();
        let voided = records.iter().any(|x| {
            x["operation"] == "key.rotate"
                && x["decision"] == "refused"
                && x["key_version"] == v
                && x["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("did not take effect")
        });
        assert!(
            versions.contains(&v) || voided,
            "record of version {v} is neither in force nor void"
        );
    }
}

/// Runs the verifier with `envs`, killed (and the test failed) if it does
/// not finish within 20 s: a command must never block on its input.
fn run_bounded(envs: &[(&str, &Path)], args: &[&str]) -> (i32, serde_json::Value) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_attestation-verifier"));
    cmd.env_remove("KLUIS_CREDENTIAL_FILE")
        .env_remove("KLUIS_STORE_PASSPHRASE")
        .env_remove("KLUIS_STORE")
        .env_remove("KLUIS_ROOT_KEY_FILE")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?} did not finish");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    let json = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(serde_json::Value::Null);
    (status.code().expect("killed by a signal"), json)
}

/// One rule for every command: 0 done, 1 refused (a decision, or something
/// checked is not intact), 2 usage or I/O; every failure prints a JSON error.
#[test]
fn exit_codes_follow_one_rule() {
    let env = Env::new();
    let store = env.dir.path().join("store");
    let root = env.dir.path().join("root.key");
    let key_admin = env.cred("key-admin");
    let app_admin = env.cred("app-admin");
    assert_eq!(env.run(Some(&key_admin), &["key", "create", KEY]).0, 0);
    write_private(
        &env.path("forged"),
        "kluis1.key-admin.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n",
    );
    std::fs::write(
        env.path("open.credential"),
        std::fs::read(&key_admin).unwrap(),
    )
    .unwrap();
    std::fs::write(env.path("bad.toml"), "operations = [\"frobnicate\"]\n").unwrap();
    std::fs::write(env.path("exists"), "x").unwrap();
    write_private(&env.path("wrong.key"), &"ab".repeat(32));
    let fifo = env.dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let path = |name: &str| env.dir.path().join(name);
    let forged = path("forged");
    let open_cred = path("open.credential");
    let wrong_key = path("wrong.key");
    let base: Vec<(&str, &Path)> = vec![("KLUIS_STORE", &store), ("KLUIS_ROOT_KEY_FILE", &root)];
    fn combine<'a>(
        base: &[(&'static str, &'a Path)],
        extra: &[(&'static str, &'a Path)],
    ) -> Vec<(&'static str, &'a Path)> {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        v
    }
    let bad_toml = env.path("bad.toml");
    let missing = env.path("missing.toml");
    let exists = env.path("exists");
    let plain = env.path("exists");
    let fifo_policy = path("fifo.toml").display().to_string();
    // (name, environment, arguments, exit code, error kind)
    type Case<'a> = (
        &'a str,
        Vec<(&'a str, &'a Path)>,
        Vec<&'a str>,
        i32,
        Option<&'a str>,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "unknown subcommand",
            combine(&base, &[]),
            vec!["key", "frobnicate"],
            2,
            Some("usage"),
        ),
        (
            "missing argument",
            combine(&base, &[]),
            vec!["key", "create"],
            2,
            Some("usage"),
        ),
        (
            "no credential",
            combine(&base, &[]),
            vec!["key", "list"],
            1,
            Some("credential_missing"),
        ),
        (
            "forged credential",
            combine(&base, &[("KLUIS_CREDENTIAL_FILE", &forged)]),
            vec!["key", "list"],
            1,
            Some("credential_rejected"),
        ),
        (
            "credential readable by others",
            combine(&base, &[("KLUIS_CREDENTIAL_FILE", &open_cred)]),
            vec!["key", "list"],
            2,
            Some("usage"),
        ),
        (
            "credential is a FIFO",
            combine(&base, &[("KLUIS_CREDENTIAL_FILE", &fifo)]),
            vec!["key", "list"],
            2,
            Some("io"),
        ),
        (
            "root key is a FIFO",
            vec![
                ("KLUIS_STORE", &store),
                ("KLUIS_ROOT_KEY_FILE", &fifo),
                ("KLUIS_CREDENTIAL_FILE", &key_admin),
            ],
            vec!["key", "list"],
            2,
            Some("usage"),
        ),
        (
            "wrong root secret",
            vec![
                ("KLUIS_STORE", &store),
                ("KLUIS_ROOT_KEY_FILE", &wrong_key),
                ("KLUIS_CREDENTIAL_FILE", &key_admin),
            ],
            vec!["key", "list"],
            1,
            Some("root_secret_rejected"),
        ),
        (
            "wrong role",
            combine(&base, &[("KLUIS_CREDENTIAL_FILE", &app_admin)]),
            vec!["key", "create", "t/a/b"],
            1,
            Some("forbidden"),
        ),
        (
            "no such key",
            combine(&base, &[("KLUIS_CREDENTIAL_FILE", &key_admin)]),
            vec!["key", "show", "t/a/none"],
            1,
            Some("key_not_found"),
        ),
        (
            "policy file missing",
            combine(&base, &[("KLUIS_CREDENTIAL_FILE", &app_admin)]),
            vec!["policy", "set", KEY, &missing],
            2,
            Some("io"),
        ),
        (
            "policy file is a FIFO",
            combine(&base, &[("KLUIS_CREDENTIAL_FILE", &app_admin)]),
            vec!["policy", "set", KEY, &fifo_policy],
            2,
            Some("io"),
        ),
        (
            "policy invalid",
            combine(&base, &[("KLUIS_CREDENTIAL_FILE", &app_admin)]),
            vec!["policy", "set", KEY, &bad_toml],
            1,
            Some("policy_syntax"),
        ),
        (
            "output exists",
            combine(&base, &[("KLUIS_CREDENTIAL_FILE", &app_admin)]),
            vec!["data", "encrypt", "--key", KEY, &plain, &exists],
            2,
            Some("usage"),
        ),
        (
            "done",
            combine(&base, &[("KLUIS_CREDENTIAL_FILE", &key_admin)]),
            vec!["key", "list"],
            0,
            None,
        ),
    ];
    // A FIFO named like a policy file.
    assert!(Command::new("mkfifo")
        .arg(path("fifo.toml"))
        .status()
        .unwrap()
        .success());
    let mut failures = Vec::new();
    for (name, envs, args, code, kind) in &cases {
        let (got_code, out) = run_bounded(envs, args);
        let got_kind = out["error"]["kind"].as_str();
        if (got_code, got_kind) != (*code, *kind) {
            failures.push(format!(
                "{name}: expected ({code}, {kind:?}), got ({got_code}, {got_kind:?}) {out}"
            ));
        }
    }
    // A garbage line at the end of the log: audit_broken for every command.
    let log = store.join("audit.log");
    let mut text = std::fs::read(&log).unwrap();
    text.extend_from_slice(b"garbage\n");
    std::fs::write(&log, text).unwrap();
    for args in [vec!["key", "list"], vec!["audit", "verify"]] {
        let (code, out) = run_bounded(
            &combine(&base, &[("KLUIS_CREDENTIAL_FILE", &key_admin)]),
            &args,
        );
        if (code, out["error"]["kind"].as_str()) != (1, Some("audit_broken")) {
            failures.push(format!("garbage line, {args:?}: got ({code}, {out})"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `data encrypt|decrypt` never replace an existing output without
/// --force, never replace anything but a regular file, and remove the
/// partial file a killed run left.
#[test]
fn data_outputs_are_checked_before_any_key_is_used() {
    let env = Env::new();
    let key_admin = env.cred("key-admin");
    let app_admin = env.cred("app-admin");
    assert_eq!(env.run(Some(&key_admin), &["key", "create", KEY]).0, 0);
    std::fs::write(env.path("plain"), b"hello").unwrap();
    std::fs::write(env.path("taken"), b"keep me").unwrap();
    std::fs::write(env.path("target"), b"keep me too").unwrap();
    std::os::unix::fs::symlink(env.path("target"), env.path("link")).unwrap();
    assert!(Command::new("mkfifo")
        .arg(env.path("fifo"))
        .status()
        .unwrap()
        .success());
    let log = env.dir.path().join("store").join("audit.log");
    let uses = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .matches("\"data.encrypt\"")
            .count()
    };
    for (out, force) in [("taken", false), ("link", true), ("fifo", true)] {
        let mut args = vec!["data", "encrypt", "--key", KEY];
        if force {
            args.push("--force");
        }
        let plain = env.path("plain");
        let target = env.path(out);
        args.push(&plain);
        args.push(&target);
        let (code, out_json, _) = env.run(Some(&app_admin), &args);
        assert_eq!(code, 2, "{out}: {out_json}");
    }
    assert_eq!(uses(), 0, "no key was used for a refused output");
    assert_eq!(std::fs::read(env.path("taken")).unwrap(), b"keep me");
    assert_eq!(std::fs::read(env.path("target")).unwrap(), b"keep me too");
    assert!(std::fs::symlink_metadata(env.path("link"))
        .unwrap()
        .file_type()
        .is_symlink());
    // --force replaces a regular file.
    let (code, _, err) = env.run(
        Some(&app_admin),
        &[
            "data",
            "encrypt",
            "--force",
            "--key",
            KEY,
            &env.path("plain"),
            &env.path("taken"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    // A partial file left by a killed decryption is removed by the next run.
    let stale = env.dir.path().join(".kluis-partial-back-XXXXXX");
    std::fs::write(&stale, b"plaintext prefix").unwrap();
    let (code, _, err) = env.run(
        Some(&app_admin),
        &["data", "decrypt", &env.path("taken"), &env.path("back")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!stale.exists());
    assert_eq!(std::fs::read(env.path("back")).unwrap(), b"hello");
}

/// `admin add --out EXISTING` and `init` over existing credentials change
/// nothing; `init` makes missing folders, accepts a bare relative store
/// name, and leaves nothing behind when it fails.
#[test]
fn outputs_are_checked_before_anything_changes() {
    let env = Env::new();
    let key_admin = env.cred("key-admin");
    std::fs::write(env.path("existing"), b"x").unwrap();
    let (code, _, _) = env.run(
        Some(&key_admin),
        &[
            "admin",
            "add",
            "--role",
            "key-admin",
            "--name",
            "bob",
            "--out",
            &env.path("existing"),
        ],
    );
    assert_eq!(code, 2);
    // The name is still free, and nothing was recorded.
    let log = std::fs::read_to_string(env.dir.path().join("store").join("audit.log")).unwrap();
    assert!(!log.contains("bob"));
    let (code, _, err) = env.run(
        Some(&key_admin),
        &[
            "admin",
            "add",
            "--role",
            "key-admin",
            "--name",
            "bob",
            "--out",
            &env.path("bob.cred"),
        ],
    );
    assert_eq!(code, 0, "{err}");

    // init: missing parent folders are made; existing credentials refused
    // before anything is made.
    let fresh = tempfile::tempdir().unwrap();
    std::fs::create_dir(fresh.path().join("creds")).unwrap();
    std::fs::write(fresh.path().join("creds/app-admin.credential"), b"x").unwrap();
    let envs_store = fresh.path().join("var/lib/kluis/store");
    let envs_root = fresh.path().join("etc/kluis/root.key");
    let creds = fresh.path().join("creds").display().to_string();
    let envs: Vec<(&str, &Path)> = vec![
        ("KLUIS_STORE", &envs_store),
        ("KLUIS_ROOT_KEY_FILE", &envs_root),
    ];
    let (code, _) = run_bounded(
        &envs,
        &["init", "--generate-root-key", "--credentials-out", &creds],
    );
    assert_eq!(code, 2);
    assert!(
        !envs_store.exists() && !envs_root.exists(),
        "a failed init leaves nothing"
    );
    // A failure after the root key was generated (the credentials folder
    // cannot be made) removes the root key and the store it made.
    std::fs::write(fresh.path().join("not-a-dir"), b"x").unwrap();
    let not_a_dir = fresh.path().join("not-a-dir").display().to_string();
    let (code, _) = run_bounded(
        &envs,
        &[
            "init",
            "--generate-root-key",
            "--credentials-out",
            &not_a_dir,
        ],
    );
    assert_eq!(code, 2);
    assert!(
        !envs_store.exists() && !envs_root.exists(),
        "a failed init leaves nothing"
    );
    std::fs::remove_file(fresh.path().join("creds/app-admin.credential")).unwrap();
    let (code, out) = run_bounded(
        &envs,
        &["init", "--generate-root-key", "--credentials-out", &creds],
    );
    assert_eq!(code, 0, "{out}");

    // A bare relative store name, from its parent directory.
    let status = Command::new(env!("CARGO_BIN_EXE_attestation-verifier"))
        .current_dir(fresh.path())
        .env_remove("KLUIS_STORE")
        .env_remove("KLUIS_ROOT_KEY_FILE")
        .args([
            "--store",
            "plainname",
            "--root-key-file",
            "plain.key",
            "init",
            "--generate-root-key",
            "--credentials-out",
            "c2",
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
}

/// The store passphrase from a file (mode 0600) or a file descriptor,
/// instead of the environment.
#[test]
fn passphrase_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("pass");
    write_private(
        &pass.display().to_string(),
        "correct horse battery staple\n",
    );
    let store = dir.path().join("store");
    let creds = dir.path().join("creds").display().to_string();
    let envs: Vec<(&str, &Path)> = vec![
        ("KLUIS_STORE", &store),
        ("KLUIS_STORE_PASSPHRASE_FILE", &pass),
    ];
    let (code, out) = run_bounded(&envs, &["init", "--credentials-out", &creds]);
    assert_eq!(code, 0, "{out}");
    let cred = dir.path().join("creds/key-admin.credential");
    let mut with_cred = envs.clone();
    with_cred.push(("KLUIS_CREDENTIAL_FILE", &cred));
    assert_eq!(run_bounded(&with_cred, &["key", "list"]).0, 0);
    // Readable by others: refused.
    std::fs::set_permissions(&pass, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    assert_eq!(run_bounded(&with_cred, &["key", "list"]).0, 2);
}

/// An unfinished last line (an append interrupted by a crash) is removed by
/// the next command, and the removal is itself recorded.
#[test]
fn a_torn_last_line_is_removed_and_recorded() {
    let env = Env::new();
    let key_admin = env.cred("key-admin");
    let log = env.dir.path().join("store").join("audit.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let before = bytes.len();
    bytes.extend_from_slice(b"{\"seq\":");
    std::fs::write(&log, &bytes).unwrap();
    let (code, _, err) = env.run(Some(&key_admin), &["key", "list"]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text[before..].starts_with("{\"seq\":}"));
    let recorded: serde_json::Value =
        serde_json::from_str(text[before..].lines().next().unwrap()).unwrap();
    assert_eq!(recorded["operation"], "audit.tail_recovered");
    assert!(recorded["reason"].as_str().unwrap().contains("7 bytes"));
    assert_eq!(env.run(Some(&key_admin), &["audit", "verify"]).0, 0);
}

/// A decryption killed part way (SIGKILL: nothing runs after it) leaves no
/// file behind: its output had no name until it was whole.
#[test]
fn a_killed_decryption_leaves_no_plaintext_behind() {
    let env = Env::new();
    let key_admin = env.cred("key-admin");
    let app_admin = env.cred("app-admin");
    assert_eq!(env.run(Some(&key_admin), &["key", "create", KEY]).0, 0);
    let plain: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(env.path("plain"), &plain).unwrap();
    let (code, _, err) = env.run(
        Some(&app_admin),
        &[
            "data",
            "encrypt",
            "--key",
            KEY,
            &env.path("plain"),
            &env.path("env"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    std::fs::remove_file(env.path("plain")).unwrap();
    let names = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(env.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = names();
    let mut child = env
        .command(
            Some(&app_admin),
            &["data", "decrypt", &env.path("env"), &env.path("back")],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed once its output is open (a descriptor on a file of the
    // directory itself, other than the input: named or not), while it
    // writes.
    let input = std::path::PathBuf::from(env.path("env"));
    let writing = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| {
                fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                    .any(|target| target.parent() == Some(env.dir.path()) && target != input)
            })
            .unwrap_or(false)
    };
    let started = std::time::Instant::now();
    while !writing(child.id()) && child.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    let finished = child.try_wait().unwrap().is_some();
    child.kill().unwrap();
    child.wait().unwrap();
    let mut after = names();
    if finished {
        // Too fast to catch part way: the whole output, nothing else.
        after.retain(|n| n != "back");
    }
    assert_eq!(after, before, "left behind");
}

/// An error's causes are each said once (a cause that the error's own
/// message already quotes is not repeated after it).
#[test]
fn an_error_says_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_attestation-verifier"))
        .env_remove("KLUIS_ROOT_KEY_FILE")
        .env_remove("KLUIS_STORE")
        .env_remove("KLUIS_CREDENTIAL_FILE")
        .args(["--store"])
        .arg(dir.path().join("s"))
        .arg("--root-key-file")
        .arg(dir.path().join("missing.key"))
        .args(["key", "list"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stdout} {stderr}");
    for text in [&stdout, &stderr] {
        assert_eq!(text.matches("(os error 2)").count(), 1, "{text}");
    }
}
