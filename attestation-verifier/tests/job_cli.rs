//! `attestation-verifier job`: authorisations issued, listed, shown and
//! revoked as an operator would, with the roles, exit codes and audit
//! records of the other administrative commands.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use std::path::Path;

use kluis_proto::{AuthorisationId, SignedAuthorisation};

mod support;
use support::CliStore as Env;

/// What the tests ask of the store beyond the shared harness.
trait EnvExt {
    /// The audit records of `operation`, as JSON.
    fn audit(&self, operation: &str) -> Vec<serde_json::Value>;
}

impl EnvExt for Env {
    fn audit(&self, operation: &str) -> Vec<serde_json::Value> {
        let out = self
            .command(
                Some(&self.cred("app-admin")),
                &["audit", "show", "--operation", operation, "--json"],
            )
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

const IN: &str = "agency-a/benefits/prod";
const OUT: &str = "agency-a/research/prod";

fn authorise_args<'a>(out: &'a str, expires: &'a str) -> Vec<&'a str> {
    vec![
        "job",
        "authorise",
        "--workload",
        "pseudonymise:column=0,header",
        "--input-key",
        IN,
        "--output-key",
        OUT,
        "--secret-key",
        IN,
        "--purpose",
        "benefit entitlement check",
        "--case",
        "CASE-2026-0042",
        "--expires",
        expires,
        "--max-runs",
        "3",
        "--out",
        out,
    ]
}

#[test]
fn authorise_list_show_and_revoke() {
    let env = Env::new();
    let key_admin = env.cred("key-admin");
    let app_admin = env.cred("app-admin");
    for key in [IN, OUT] {
        let (code, _, err) = env.run(Some(&key_admin), &["key", "create", key]);
        assert_eq!(code, 0, "{err}");
    }
    let auth_path = env.path("job.auth");

    // Authorising jobs is the application administrator's duty.
    let (code, out, _) = env.run(Some(&key_admin), &authorise_args(&auth_path, "2h"));
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("forbidden"))
    );
    assert!(!Path::new(&auth_path).exists());

    // Usage errors (exit 2) before anything is recorded.
    for expires in ["yesterday", "0h", "2000-01-01T00:00:00Z", "400d"] {
        let (code, _, err) = env.run(Some(&app_admin), &authorise_args(&auth_path, expires));
        assert_eq!(code, 2, "--expires {expires}: {err}");
    }
    let mut unknown_key = authorise_args(&auth_path, "2h");
    unknown_key[7] = "agency-a/nothing/prod";
    let (code, out, _) = env.run(Some(&app_admin), &unknown_key);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("key_not_found"))
    );
    assert!(!Path::new(&auth_path).exists());

    let (code, issued, err) = env.run(Some(&app_admin), &authorise_args(&auth_path, "2h"));
    assert_eq!(code, 0, "{err}");
    let bytes = std::fs::read(&auth_path).unwrap();
    let id = AuthorisationId::of(&bytes).to_hex();
    assert_eq!(issued["id"], id.as_str());
    assert_eq!(issued["purpose"], "benefit entitlement check");
    assert_eq!(issued["case"], "CASE-2026-0042");
    assert_eq!(issued["issuer"], "app-admin");
    assert_eq!(issued["max_runs"], 3);
    assert_eq!(issued["secret_keys"][0], IN);

    // Signed by the verifier's identity.
    let (_, identity, _) = env.run(Some(&app_admin), &["identity"]);
    let public = hex::decode(identity["verifier_public_key"].as_str().unwrap()).unwrap();
    let signed = SignedAuthorisation::verify(&bytes, &public).unwrap();
    assert_eq!(signed.authorisation().output_key, OUT);
    assert_eq!(signed.authorisation().input_key, IN);

    // Never over an existing file.
    let (code, _, _) = env.run(Some(&app_admin), &authorise_args(&auth_path, "2h"));
    assert_eq!(code, 2);
    assert_eq!(std::fs::read(&auth_path).unwrap(), bytes);

    let (code, list, err) = env.run(Some(&key_admin), &["job", "list"]);
    assert_eq!(code, 0, "{err}");
    let all = list["authorisations"].as_array().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["id"], id.as_str());
    assert_eq!(all[0]["runs"], 0);
    assert!(all[0]["revoked"].is_null());

    let (code, _, _) = env.run(Some(&app_admin), &["job", "show", "--id", "abc"]);
    assert_eq!(code, 2);
    let (code, shown, err) = env.run(Some(&app_admin), &["job", "show", "--id", &id]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(shown["case"], "CASE-2026-0042");

    let (code, out, _) = env.run(Some(&key_admin), &["job", "revoke", "--id", &id]);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("forbidden"))
    );
    let (code, _, err) = env.run(
        Some(&app_admin),
        &["job", "revoke", "--id", &id, "--reason", "case closed"],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = env.run(Some(&app_admin), &["job", "revoke", "--id", &id]);
    assert_eq!(code, 1, "revoked twice");
    let (_, shown, _) = env.run(Some(&app_admin), &["job", "show", "--id", &id]);
    assert_eq!(shown["revoked"]["reason"], "case closed");
    assert_eq!(shown["revoked"]["by"], "app-admin");

    // Every step is in the audit log, and the log verifies.
    let issued = env.audit("job.authorise");
    let allowed: Vec<_> = issued
        .iter()
        .filter(|r| r["decision"] == "allowed")
        .collect();
    assert_eq!(allowed.len(), 1, "{issued:?}");
    let reason = allowed[0]["reason"].as_str().unwrap();
    assert!(reason.contains(&id), "{reason}");
    assert!(reason.contains("CASE-2026-0042"), "{reason}");
    // The issue and the revocation carry the authorisation in the record's
    // hashed job field too, like every record of a job run under it.
    assert_eq!(allowed[0]["job"]["authorisation"], id.as_str());
    assert_eq!(allowed[0]["job"]["case"], "CASE-2026-0042");
    assert_eq!(allowed[0]["job"]["purpose"], "benefit entitlement check");
    assert!(issued.iter().any(|r| r["decision"] == "refused"));
    let revoked = env.audit("job.revoke");
    let revocation = revoked
        .iter()
        .find(|r| {
            r["decision"] == "allowed" && r["reason"].as_str().unwrap().contains("case closed")
        })
        .expect("the revocation is audited");
    assert_eq!(revocation["job"]["authorisation"], id.as_str());
    assert_eq!(revocation["job"]["case"], "CASE-2026-0042");
    assert!(revoked.iter().any(|r| r["decision"] == "refused"));
    let (code, _, err) = env.run(Some(&app_admin), &["audit", "verify"]);
    assert_eq!(code, 0, "{err}");
}
