//! The README's first command: `kluis-demo` runs the whole system (verifier,
//! enclave on the simulated NSM, parent) as separate processes and exits 0
//! only when every step behaved as it must.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

/// Processes whose command line names `dir` (the demo's children name its
/// directory).
fn survivors(dir: &std::path::Path) -> usize {
    let dir = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|cmd| String::from_utf8_lossy(cmd).contains(&dir))
        .count()
}

#[test]
fn the_demo_runs_end_to_end_and_cleans_up() {
    let keep = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kluis-demo"))
        .args(["--records", "300", "--keep"])
        .arg(keep.path())
        // An operator's own settings in the environment do not leak into
        // the demo's commands (it names its own store on each).
        .env("KLUIS_STORE", "/nonexistent/kluis-store")
        .env("KLUIS_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for expected in [
        "300 records",
        "what it saw: ciphertext only",
        "refused: the verifier released no key",
        "valid offline: allowed",
        "receipt valid offline:",
        "demo OK",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    // The result it checked is there, and pseudonymised.
    let result = std::fs::read_to_string(keep.path().join("pseudonymised.csv")).unwrap();
    let input = std::fs::read_to_string(keep.path().join("benefits.csv")).unwrap();
    assert_eq!(result.lines().count(), input.lines().count());
    let first_nrn = input.lines().nth(1).unwrap().split(',').next().unwrap();
    assert!(!result.contains(first_nrn));
    // No process it started is left: its children's logs are closed and no
    // `kluis-demo enclave run` or `kluis-demo verifier serve` of this demo survives.
    assert_eq!(survivors(keep.path()), 0, "the demo left processes behind");
}

/// `--hsm-module`: the same run with the master keys, store root and
/// identity in a throw-away SoftHSM2 token; no root key file is made.
#[test]
fn the_demo_runs_on_a_pkcs11_token() {
    let Some(module) = kluis_hsm::softhsm::find_module() else {
        assert_ne!(
            std::env::var("KLUIS_REQUIRE_SOFTHSM").as_deref(),
            Ok("1"),
            "KLUIS_REQUIRE_SOFTHSM=1 but SoftHSM2 is not installed"
        );
        eprintln!("SKIPPED: SoftHSM2 is not installed (apt install softhsm2)");
        return;
    };
    let keep = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kluis-demo"))
        .args(["--records", "100", "--hsm-module"])
        .arg(&module)
        .arg("--keep")
        .arg(keep.path())
        .env_remove("SOFTHSM2_CONF")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for expected in ["key backend: pkcs11", "100 records", "demo OK"] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    assert!(!keep.path().join("root.key").exists());
    assert!(keep
        .path()
        .join("verifier-store")
        .join("hsm.json")
        .is_file());
}

/// `--replicas 3 --database URL`: three verifier processes on one
/// PostgreSQL database, the first killed with SIGKILL after the first key
/// release; the job completes, the others serve the rest, the audit
/// verifies, and the demo's database is dropped at the end.
#[test]
fn the_demo_survives_a_replica_killed_mid_run() {
    let Some(server) =
        kluis_keystore::pg::scratch::server("the_demo_survives_a_replica_killed_mid_run")
            .expect("PostgreSQL is required here")
    else {
        return;
    };
    let databases = |server: &str| -> Vec<String> {
        let mut client = postgres::Client::connect(server, postgres::NoTls).unwrap();
        client
            .query(
                "SELECT datname::text FROM pg_database WHERE datname LIKE 'kluis\\_t\\_%'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    };
    let before = databases(&server);
    let out = Command::new(env!("CARGO_BIN_EXE_kluis-demo"))
        .args(["--records", "100", "--replicas", "3", "--database", &server])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for expected in [
        "verifier-1 was killed with SIGKILL right after the first key release; the job completed",
        "verifier-1: 1 key request(s)",
        "intact:",
        "demo OK",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    // The database the demo made is gone (no other test of this binary
    // makes one, and cargo runs test binaries one at a time).
    let after = databases(&server);
    assert!(
        after.iter().all(|d| before.contains(d)),
        "left behind: {after:?}"
    );
}

/// Several replicas without a database, or a nonsense count: refused at
/// once with a clear message, nothing started.
#[test]
fn replicas_without_a_database_are_refused() {
    for args in [
        &["--replicas", "2"][..],
        &[
            "--replicas",
            "0",
            "--database",
            "postgresql://nobody@127.0.0.1:1/x",
        ][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kluis-demo"))
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("--database") || stderr.contains("1 to 8"),
            "{stderr}"
        );
    }
}

/// Standard output that cannot be written (`kluis-demo > /dev/full`, or a
/// pipe whose reader left): the demo stops at the end of the phase under
/// way with a clear error, not a panic, and leaves no process behind.
#[test]
fn the_demo_stops_cleanly_when_its_output_cannot_be_written() {
    let keep = tempfile::tempdir().unwrap();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kluis-demo"))
        .args(["--records", "10", "--keep"])
        .arg(keep.path())
        .stdout(full)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("standard output could not be written"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // It stopped before the job: no output dataset was written.
    assert!(!keep.path().join("pseudonymised.csv").exists());
    assert_eq!(survivors(keep.path()), 0, "the demo left processes behind");
}
