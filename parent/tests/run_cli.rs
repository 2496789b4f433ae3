//! `parent run` against an enclave that is not (yet) listening: it keeps
//! trying for `--enclave-wait` seconds, says so, and then fails with a
//! message that says what to check, leaving no output.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn run_waits_for_the_enclave_then_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.kenv");
    std::fs::write(&input, b"not read: the enclave is never reached").unwrap();
    let output = dir.path().join("output.kenv");
    let socket = dir.path().join("enclave.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_parent"))
        .args(["run", "--enclave"])
        .arg(format!("unix:{}", socket.display()))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(["--output-key", "a/b/c", "--enclave-wait", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("waiting for the enclave at unix:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("did not accept a connection within"),
        "{stderr}"
    );
    assert!(stderr.contains("nitro-cli describe-enclaves"), "{stderr}");
    assert!(!output.exists());
}
