//! What the command-line tests share: the binary with a clean environment,
//! running it, a store made by `init`, and private files.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The verifier's binary, with none of its `KLUIS_*` variables inherited.
pub fn verifier_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_attestation-verifier"));
    for var in [
        "KLUIS_STORE",
        "KLUIS_ROOT_KEY_FILE",
        "KLUIS_CREDENTIAL_FILE",
        "KLUIS_STORE_PASSPHRASE",
        "KLUIS_STORE_PASSPHRASE_FILE",
        "KLUIS_HSM_PIN",
        "KLUIS_HSM_PIN_FILE",
        "KLUIS_DATABASE_URL",
        "KLUIS_DATABASE_CA_FILE",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs `cmd`: its exit code (a signal is a test failure), the last line
/// of its stdout as JSON (`Null` if it is not), and its stderr.
pub fn run(cmd: &mut Command) -> (i32, serde_json::Value, String) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {stderr}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(serde_json::Value::Null);
    (code, json, stderr)
}

/// A new file of mode 0600, as credentials, PINs and passphrases must be.
pub fn write_private(path: &str, contents: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap()
        .write_all(contents.as_bytes())
        .unwrap();
}

/// A store with a root key file, made by `init --generate-root-key` in a
/// temporary directory, driven as an operator would.
pub struct CliStore {
    pub dir: tempfile::TempDir,
    /// What `init` printed.
    pub init: serde_json::Value,
}

impl CliStore {
    pub fn new() -> CliStore {
        let mut env = CliStore {
            dir: tempfile::tempdir().unwrap(),
            init: serde_json::Value::Null,
        };
        let (code, out, err) = env.run(
            None,
            &[
                "init",
                "--generate-root-key",
                "--credentials-out",
                &env.path("creds"),
            ],
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(out["verifier_public_key"].as_str().map(str::len), Some(194));
        env.init = out;
        env
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    pub fn cred(&self, role: &str) -> PathBuf {
        self.dir
            .path()
            .join("creds")
            .join(format!("{role}.credential"))
    }

    /// The command for `args`, on this store, as `credential`'s holder.
    pub fn command(&self, credential: Option<&Path>, args: &[&str]) -> Command {
        let mut cmd = verifier_command();
        cmd.env("KLUIS_STORE", self.dir.path().join("store"))
            .env("KLUIS_ROOT_KEY_FILE", self.dir.path().join("root.key"))
            .args(args);
        if let Some(c) = credential {
            cmd.env("KLUIS_CREDENTIAL_FILE", c);
        }
        cmd
    }

    pub fn run(
        &self,
        credential: Option<&Path>,
        args: &[&str],
    ) -> (i32, serde_json::Value, String) {
        run(&mut self.command(credential, args))
    }
}

/// [`run`], keeping stdout whole (for commands that print text, such as a
/// checkpoint note): exit code, stdout, its last line as JSON.
pub fn run_with_stdout(cmd: &mut Command) -> (i32, String, serde_json::Value) {
    let out = cmd.output().unwrap();
    let code = out.status.code().unwrap_or_else(|| {
        panic!(
            "killed by a signal: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(serde_json::Value::Null);
    (code, stdout, json)
}

/// An attested request for a data key of `key` on the challenge `nonce`,
/// signed by the simulated NSM `nsm`: the document and the request (the
/// enclave's ephemeral key is thrown away: these tests do not open the keys).
pub fn attested_generate(
    nsm: &kluis_nsm::sim::SimulatedNsm,
    key: &str,
    nonce: [u8; 32],
) -> (Vec<u8>, kluis_proto::KeyRequest) {
    let request = kluis_proto::KeyRequest::new(vec![kluis_proto::KeyOperation::GenerateDataKey {
        key_id: key.to_owned(),
    }])
    .unwrap();
    let ephemeral = kluis_proto::EphemeralKeyPair::generate().unwrap();
    let document = kluis_nsm::attest(
        nsm,
        Some(&kluis_proto::request_hash(&request)),
        Some(&nonce),
        Some(&ephemeral.public_key_sec1()),
    )
    .unwrap();
    (document, request)
}
