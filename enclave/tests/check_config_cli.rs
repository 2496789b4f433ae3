//! `enclave check-config FILE`: exit 0 and a one-line summary on stdout for a
//! configuration `run` accepts; exit 1 and the reason on stderr otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn check(text: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("enclave.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_enclave"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_good_configuration_exits_0_and_a_bad_one_exits_1() {
    let key = hex::encode(
        kluis_proto::VerifierIdentity::generate()
            .unwrap()
            .public_key_sec1(),
    );
    let good = format!(
        "listen = \"vsock:any:5000\"\nverifier = \"vsock:3:8001\"\nverifier_public_key = \"{key}\"\n\n\
         [[allowed_jobs]]\nworkload = \"reencrypt\"\noutput_key = \"a/b/prod\"\n"
    );
    let (code, stdout, stderr) = check(&good);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(": ok: listen vsock:any:5000"), "{stdout}");
    assert!(stdout.contains("1 allowed job(s)"), "{stdout}");

    let bad = good.replace("reencrypt", "pseudonymise:column=0");
    let (code, stdout, stderr) = check(&bad);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("allowed_jobs[0]"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
}
