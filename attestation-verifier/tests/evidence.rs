//! Evidence a third party checks offline: signed checkpoints and the
//! witness's consistency check (a rolled-back or rewritten log is caught),
//! inclusion proofs, evidence bundles of key releases, and shredding
//! receipts — each verified by the `evidence` commands with no store, and
//! each refused after any changed byte.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use attestation_verifier::audit::{Actor, AuditAnchor, AuditLog, AuditRecord};
use attestation_verifier::evidence::{self, merkle, note};
use attestation_verifier::keys::KeyName;
use attestation_verifier::kms::{Kms, StoredPolicy};
use kluis_attestation::TrustAnchor;
use kluis_keystore::RootSecret;
use kluis_proto::{KeyOperation, Response, VerifierIdentity};
use kluis_testkit::{BrokerWorld as World, T0};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const KEY: &str = "agency-a/app-x/prod";
const DAY_MS: u64 = 86_400_000;

mod support;
use support::{run_with_stdout as run, verifier_command as bin, CliStore};

/// Output that does not reach its reader whole is a failure (exit 2), never
/// a success with a truncated checkpoint or listing (standard output on
/// `/dev/full`: every write fails with ENOSPC).
#[test]
fn output_that_cannot_be_written_fails_the_command() {
    let env = Env::new();
    assert_eq!(env.admin(&["key", "create", "a/b/one"]).0, 0);
    for args in [
        &["audit", "checkpoint"][..],
        &["audit", "show"][..],
        &["audit", "show", "--json"][..],
        &["identity"][..],
    ] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let status = bin()
            .env("KLUIS_STORE", env.store())
            .env("KLUIS_ROOT_KEY_FILE", env.dir.path().join("root.key"))
            .env("KLUIS_CREDENTIAL_FILE", env.key_admin())
            .args(args)
            .stdout(full)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(2), "{args:?}");
        // The same command with a working output succeeds.
        assert_eq!(env.admin(args).0, 0, "{args:?}");
    }
}

/// A store made by `init`, driven as an operator would.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: CliStore::new().dir,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn key_admin(&self) -> PathBuf {
        self.dir.path().join("creds").join("key-admin.credential")
    }

    fn cli(&self, credential: Option<&Path>, args: &[&str]) -> (i32, String, serde_json::Value) {
        let mut cmd = bin();
        cmd.env("KLUIS_STORE", self.store())
            .env("KLUIS_ROOT_KEY_FILE", self.dir.path().join("root.key"))
            .args(args);
        if let Some(c) = credential {
            cmd.env("KLUIS_CREDENTIAL_FILE", c);
        }
        run(&mut cmd)
    }

    fn admin(&self, args: &[&str]) -> (i32, String, serde_json::Value) {
        self.cli(Some(&self.key_admin()), args)
    }

    fn identity_hex(&self) -> String {
        let (code, _, out) = self.admin(&["identity"]);
        assert_eq!(code, 0);
        out["verifier_public_key"].as_str().unwrap().to_owned()
    }

    fn checkpoint(&self, file: &str) -> String {
        let (code, note, _) = self.admin(&["audit", "checkpoint"]);
        assert_eq!(code, 0, "{note}");
        std::fs::write(self.path(file), &note).unwrap();
        note
    }

    /// The store and audit log opened by the library, bound as the
    /// commands bind them.
    fn open_kms(&self) -> Kms {
        let secret = RootSecret::from_key_file(&self.dir.path().join("root.key")).unwrap();
        let mut kms = Kms::open(&self.store(), secret).unwrap();
        let anchor = kms.audit_anchor().unwrap();
        let log = AuditLog::open_anchored(self.store().join("audit.log"), anchor.as_ref()).unwrap();
        kms.bind_audit(Arc::new(log), Actor::System);
        kms
    }
}

fn size_of(note_text: &str) -> u64 {
    note_text.lines().nth(1).unwrap().parse().unwrap()
}

fn offline(args: &[&str]) -> (i32, serde_json::Value) {
    let (code, _, json) = run(bin().args(args));
    (code, json)
}

/// `evidence verify --identity IDENTITY --root ROOT FILE`.
fn verify_offline(identity: &str, root: &str, file: &Path) -> (i32, serde_json::Value) {
    offline(&[
        "evidence",
        "verify",
        "--identity",
        identity,
        "--root",
        root,
        &file.display().to_string(),
    ])
}

/// Flips one bit of bytes spread over the whole file (at most `max`
/// positions, always including the first and the last) and checks that
/// `evidence verify` refuses every one with exit 1.
fn every_changed_byte_is_refused(file: &Path, extra: &[&str], max: usize) {
    let original = std::fs::read(file).unwrap();
    let tampered = file.with_extension("tampered");
    let step = (original.len() / max).max(1);
    let mut positions: Vec<usize> = (0..original.len()).step_by(step).collect();
    positions.push(original.len() - 1);
    for i in positions {
        let mut bytes = original.clone();
        bytes[i] ^= 0x01;
        std::fs::write(&tampered, &bytes).unwrap();
        let mut args = vec!["evidence", "verify"];
        args.extend_from_slice(extra);
        let path = tampered.display().to_string();
        args.push(&path);
        let (code, out) = offline(&args);
        assert_eq!(code, 1, "byte {i} changed and still accepted: {out}");
        assert!(out["error"]["kind"].is_string(), "{out}");
    }
}

#[test]
fn checkpoints_and_consistency_proofs_catch_a_rolled_back_log() {
    let env = Env::new();
    let identity = env.identity_hex();
    for k in ["a/b/one", "a/b/two"] {
        assert_eq!(env.admin(&["key", "create", k]).0, 0);
    }
    let c0 = env.checkpoint("c0.note");
    let origin = c0.lines().next().unwrap().to_owned();
    assert!(origin.starts_with("kluis.audit/"), "{c0}");
    assert!(c0.contains(&format!("\n\n\u{2014} {origin} ")), "{c0}");
    let n0 = size_of(&c0);
    assert!(n0 >= 2);

    // A backup of the whole store at this point.
    let backup = env.dir.path().join("store.bak");
    assert!(Command::new("cp")
        .args([
            "-a",
            &env.store().display().to_string(),
            &backup.display().to_string()
        ])
        .status()
        .unwrap()
        .success());

    for _ in 0..3 {
        assert_eq!(env.admin(&["key", "rotate", "a/b/one"]).0, 0);
    }
    let c1 = env.checkpoint("c1.note");
    let n1 = size_of(&c1);
    assert!(n1 >= n0 + 3);

    // The witness: a consistency proof from c0, checked offline.
    let (code, text, doc) = env.admin(&["audit", "consistency", "--from", &env.path("c0.note")]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        (doc["old_size"].as_u64(), doc["new_size"].as_u64()),
        (Some(n0), Some(n1))
    );
    std::fs::write(env.path("c0-c1.json"), &text).unwrap();
    let (code, out) = offline(&[
        "evidence",
        "verify-consistency",
        "--identity",
        &identity,
        &env.path("c0.note"),
        &env.path("c0-c1.json"),
    ]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["status"], "consistent");
    assert_eq!(out["new_size"].as_u64(), Some(n1));
    // c1 was computed from the frontier kept at c0 (only the new records
    // read); the proof's checkpoint from the whole log: the same tree.
    let body = |note: &str| note.split("\n\n").next().unwrap().to_owned();
    assert_eq!(body(doc["checkpoint"].as_str().unwrap()), body(&c1));

    // The same with the new checkpoint as the witness keeps it (a note) and
    // the proof beside it; a note of another size is refused.
    let (code, out) = offline(&[
        "evidence",
        "verify-consistency",
        "--identity",
        &identity,
        &env.path("c0.note"),
        &env.path("c1.note"),
        "--proof",
        &env.path("c0-c1.json"),
    ]);
    assert_eq!((code, out["new_size"].as_u64()), (0, Some(n1)), "{out}");
    // Two checkpoints and no proof: refused, saying how to give the proof.
    let (code, out) = offline(&[
        "evidence",
        "verify-consistency",
        "--identity",
        &identity,
        &env.path("c0.note"),
        &env.path("c1.note"),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out["error"]["message"]
            .as_str()
            .unwrap()
            .contains("this is a checkpoint"),
        "{out}"
    );
    let (code, out) = offline(&[
        "evidence",
        "verify-consistency",
        "--identity",
        &identity,
        &env.path("c0.note"),
        &env.path("c0.note"),
        "--proof",
        &env.path("c0-c1.json"),
    ]);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("evidence_invalid")),
        "{out}"
    );

    // A changed proof hash, or a checkpoint by another identity, is refused.
    let mut forged = doc.clone();
    let first = forged["proof"][0].as_str().unwrap().to_owned();
    let flipped = if first.starts_with('0') { "1" } else { "0" };
    forged["proof"][0] = serde_json::json!(format!("{flipped}{}", &first[1..]));
    std::fs::write(env.path("forged.json"), forged.to_string()).unwrap();
    let (code, out) = offline(&[
        "evidence",
        "verify-consistency",
        "--identity",
        &identity,
        &env.path("c0.note"),
        &env.path("forged.json"),
    ]);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("proof_invalid")),
        "{out}"
    );
    let stranger = hex::encode(VerifierIdentity::generate().unwrap().public_key_sec1());
    let (code, out) = offline(&[
        "evidence",
        "verify-consistency",
        "--identity",
        &stranger,
        &env.path("c0.note"),
        &env.path("c0-c1.json"),
    ]);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("checkpoint_invalid")),
        "{out}"
    );
    // Usage: a missing file is exit 2.
    let (code, _) = offline(&[
        "evidence",
        "verify-consistency",
        "--identity",
        &identity,
        &env.path("missing.note"),
        &env.path("c0-c1.json"),
    ]);
    assert_eq!(code, 2);

    // An inclusion proof checks against its checkpoint with the library alone.
    let (code, _, proof) = env.admin(&["audit", "prove", "--seq", "2"]);
    assert_eq!(code, 0, "{proof}");
    let public: [u8; 97] = hex::decode(&identity).unwrap().try_into().unwrap();
    let cp = note::verify_checkpoint(proof["checkpoint"].as_str().unwrap(), &public)
        .unwrap()
        .checkpoint;
    assert_eq!(proof["tree_size"].as_u64(), Some(cp.size));
    let hashes: Vec<merkle::TreeHash> = proof["proof"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            hex::decode(h.as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap()
        })
        .collect();
    let leaf = merkle::leaf_hash(&hex::decode(proof["record_hash"].as_str().unwrap()).unwrap());
    merkle::verify_inclusion(1, cp.size, &leaf, &hashes, &cp.root).unwrap();
    assert!(merkle::verify_inclusion(2, cp.size, &leaf, &hashes, &cp.root).is_err());
    let (code, _, out) = env.admin(&["audit", "prove", "--seq", "100000"]);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("no_such_record"))
    );

    // The store is restored from the backup: the log is smaller than the
    // checkpoint the witness holds.
    std::fs::remove_dir_all(env.store()).unwrap();
    std::fs::rename(&backup, env.store()).unwrap();
    let (code, _, out) = env.admin(&["audit", "consistency", "--from", &env.path("c1.note")]);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("log_rolled_back")),
        "{out}"
    );
    assert!(out["error"]["message"]
        .as_str()
        .unwrap()
        .contains(&format!("covers {n1} records")));

    // ... and regrown past it with other records: the same size no longer
    // has the same root.
    let mut i = 0;
    while size_of(&env.checkpoint("now.note")) <= n1 {
        assert_eq!(env.admin(&["key", "create", &format!("a/b/new{i}")]).0, 0);
        i += 1;
    }
    let (code, _, out) = env.admin(&["audit", "consistency", "--from", &env.path("c1.note")]);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("log_rewritten")),
        "{out}"
    );
    // c0 is still a prefix of the restored log.
    let (code, _, _) = env.admin(&["audit", "consistency", "--from", &env.path("c0.note")]);
    assert_eq!(code, 0);
}

#[test]
fn an_old_record_changed_rechained_and_reanchored_is_caught_by_a_witness() {
    let env = Env::new();
    for k in ["a/b/one", "a/b/two", "a/b/three"] {
        assert_eq!(env.admin(&["key", "create", k]).0, 0);
    }
    let c1 = env.checkpoint("c1.note");

    // An insider with the root secret changes record 2, recomputes the
    // chain after it, and moves the anchor in the store to the new head.
    let path = env.store().join("audit.log");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut records: Vec<AuditRecord> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    records[1].key_id = Some("a/b/forged".to_owned());
    let mut prev = [0u8; 48];
    let mut out = String::new();
    for r in &mut records {
        r.prev_hash = prev;
        r.hash = r.compute_hash();
        prev = r.hash;
        out.push_str(&serde_json::to_string(r).unwrap());
        out.push('\n');
    }
    std::fs::write(&path, &out).unwrap();
    {
        let secret = RootSecret::from_key_file(&env.dir.path().join("root.key")).unwrap();
        let kms = Kms::open(&env.store(), secret).unwrap();
        let guard = kms.lock().unwrap();
        let last = records.last().unwrap();
        kms.reset_audit_anchor(
            &guard,
            &AuditAnchor {
                seq: last.seq,
                hash: last.hash,
                len: Some(out.len() as u64),
            },
        )
        .unwrap();
    }
    // The chain and the anchor agree: the store alone cannot tell.
    let (code, _, verified) = env.admin(&["audit", "verify"]);
    assert_eq!(
        (code, verified["status"].as_str()),
        (0, Some("intact")),
        "{verified}"
    );
    // The witness's checkpoint can.
    let (code, _, err) = env.admin(&["audit", "consistency", "--from", &env.path("c1.note")]);
    assert_eq!(
        (code, err["error"]["kind"].as_str()),
        (1, Some("log_rewritten")),
        "{err}"
    );
    assert_eq!(size_of(&c1), records.len() as u64);
    // A new checkpoint does not reuse the frontier kept for the old log: it
    // is the rewritten log's tree (as a full read computes it), not c1's.
    let c2 = env.checkpoint("c2.note");
    let (code, _, proof) = env.admin(&["audit", "prove", "--seq", "1"]);
    assert_eq!(code, 0);
    let root = |note: &str| note.lines().nth(2).unwrap().to_owned();
    assert_eq!(size_of(&c2), size_of(&c1));
    assert_eq!(root(&c2), root(proof["checkpoint"].as_str().unwrap()));
    assert_ne!(root(&c2), root(&c1));
}

#[test]
fn a_shredding_receipt_verifies_offline_and_the_key_stays_a_tombstone() {
    let env = Env::new();
    let identity = env.identity_hex();
    assert_eq!(env.admin(&["key", "create", KEY]).0, 0);
    assert_eq!(env.admin(&["key", "rotate", KEY]).0, 0);

    // Not destroyable yet: the receipt is not written, nothing changes.
    let (code, _, out) = env.admin(&["key", "destroy", KEY, "--receipt", &env.path("r.json")]);
    assert_eq!(code, 1, "{out}");
    assert!(!Path::new(&env.path("r.json")).exists());
    let (code, _, out) = env.admin(&["key", "receipt", KEY, "--out", &env.path("r.json")]);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("evidence_unavailable"))
    );

    // Deletion scheduled eight days ago (through the library, audited), so
    // the waiting period is over.
    {
        let kms = env.open_kms();
        let now: u64 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            .try_into()
            .unwrap();
        kms.schedule_deletion(&KeyName::parse(KEY).unwrap(), 7, now - 8 * DAY_MS)
            .unwrap();
    }
    // An existing output is refused before anything changes.
    std::fs::write(env.path("exists.json"), "x").unwrap();
    let (code, _, _) = env.admin(&["key", "destroy", KEY, "--receipt", &env.path("exists.json")]);
    assert_eq!(code, 2);
    let (_, _, shown) = env.admin(&["key", "show", KEY]);
    assert_eq!(shown["state"], "pending_deletion");

    let (code, _, out) = env.admin(&["key", "destroy", KEY, "--receipt", &env.path("r.json")]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["state"], "destroyed");

    let (code, report) = offline(&[
        "evidence",
        "verify",
        "--identity",
        &identity,
        &env.path("r.json"),
    ]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["kind"], "shredding_receipt");
    assert_eq!(report["key"], KEY);
    assert_eq!(report["versions_destroyed"], serde_json::json!([1, 2]));
    assert_eq!(report["actor"]["name"], "key-admin");

    // The identity may also be given as the file `identity` prints.
    std::fs::write(
        env.path("identity.json"),
        serde_json::json!({ "verifier_public_key": identity }).to_string(),
    )
    .unwrap();
    let (code, _) = offline(&[
        "evidence",
        "verify",
        "--identity",
        &env.path("identity.json"),
        &env.path("r.json"),
    ]);
    assert_eq!(code, 0);
    let stranger = hex::encode(VerifierIdentity::generate().unwrap().public_key_sec1());
    let (code, _) = offline(&[
        "evidence",
        "verify",
        "--identity",
        &stranger,
        &env.path("r.json"),
    ]);
    assert_eq!(code, 1);
    let (code, _) = offline(&[
        "evidence",
        "verify",
        "--identity",
        "zz",
        &env.path("r.json"),
    ]);
    assert_eq!(code, 2);

    every_changed_byte_is_refused(
        Path::new(&env.path("r.json")),
        &["--identity", &identity],
        250,
    );

    // The key stays, as a tombstone: shown and listed as destroyed, and a
    // receipt can be issued again later, against a later checkpoint.
    let (_, _, shown) = env.admin(&["key", "show", KEY]);
    assert_eq!(shown["state"], "destroyed");
    assert!(shown["versions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["state"] == "destroyed"));
    let (_, _, listed) = env.admin(&["key", "list"]);
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["name"] == KEY && k["state"] == "destroyed"));
    let (code, _, _) = env.admin(&["key", "receipt", KEY, "--out", &env.path("r2.json")]);
    assert_eq!(code, 0);
    let (code, again) = offline(&[
        "evidence",
        "verify",
        "--identity",
        &identity,
        &env.path("r2.json"),
    ]);
    assert_eq!(code, 0, "{again}");
    assert_eq!(again["seq"], report["seq"]);
}

// ------------------------------------------------------------------ bundles

/// The broker under test, as `serve` runs it (changes audited first), with
/// key [`KEY`].
fn new_world() -> World {
    World::builder(T0).key(KEY).audit_first().build()
}

/// [`new_world`], with the verifier identity (hex) and the simulated root
/// (a PEM path) that `evidence verify` is given.
fn world_for_bundles() -> (World, String, String) {
    let world = new_world();
    let identity = hex::encode(world.identity().public_key_sec1());
    let root = world.dir().join("root.pem").display().to_string();
    (world, identity, root)
}

/// Set [`KEY`]'s policy: generate and decrypt for an image with `pcr0`.
fn set_policy(world: &World, pcr0: &[u8; 48]) {
    let text = format!(
        "operations = [\"generate\", \"decrypt\"]\nmax_document_age_seconds = 120\n\
         [[measurements]]\nname = \"v1\"\npcr0 = \"{}\"\n",
        hex::encode(pcr0)
    );
    world.set_policy(KEY, &text);
}

/// One attested generate request from an enclave booted from `image`.
fn release(world: &World, image: &[u8], now: u64) -> Response {
    let ops = vec![KeyOperation::GenerateDataKey {
        key_id: KEY.to_owned(),
    }];
    world.release(image, ops, now).response
}

/// The evidence bundle of record `seq`, written to `name` in the world's
/// directory.
fn write_bundle(world: &World, seq: u64, name: &str) -> PathBuf {
    let bundle = evidence::build_bundle(
        world.broker.kms(),
        world.broker.audit(),
        &world.identity(),
        seq,
    )
    .unwrap();
    let path = world.path(name);
    let mut text = serde_json::to_string(&bundle).unwrap();
    text.push('\n');
    std::fs::write(&path, text).unwrap();
    path
}

/// The sequence numbers of the records of `operation`.
fn seq_of(world: &World, operation: &str) -> Vec<u64> {
    world
        .broker
        .audit()
        .records(&Default::default())
        .unwrap()
        .iter()
        .filter(|r| r.operation == operation)
        .map(|r| r.seq)
        .collect()
}

fn image_pcr0(image: &[u8]) -> [u8; 48] {
    kluis_testkit::image_pcrs(image)[0]
}

#[test]
fn an_evidence_bundle_verifies_offline_under_the_policy_then_in_force() {
    let (world, identity, root) = world_for_bundles();
    set_policy(&world, &image_pcr0(b"v1"));
    assert!(matches!(
        release(&world, b"v1", T0 + 1_000),
        Response::KeyRelease(_)
    ));
    // A refused release (another image), then a new policy that would
    // refuse the first enclave.
    assert!(matches!(
        release(&world, b"v2", T0 + 2_000),
        Response::Error { .. }
    ));
    set_policy(&world, &image_pcr0(b"v2"));

    let allowed = seq_of(&world, "key.release.generate");
    assert_eq!(allowed.len(), 1);
    let path = write_bundle(&world, allowed[0], "allowed.json");
    let (code, report) = verify_offline(&identity, &root, &path);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["decision"], "allowed");
    assert_eq!(report["recomputed_decision"], "allowed");
    assert_eq!(report["key"], KEY);
    assert_eq!(report["seq"].as_u64(), Some(allowed[0]));
    assert_eq!(report["pcrs"]["0"], hex::encode(image_pcr0(b"v1")));
    assert!(report["module_id"].as_str().unwrap().len() > 3);
    assert!(report["document_time"]
        .as_str()
        .unwrap()
        .starts_with("2026-01-01T00:00:00"));
    assert!(report["authorisation"].is_null() && report["purpose"].is_null());
    // The policy is the first one (in force then), not the current one.
    let bundle: evidence::EvidenceBundle =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let bundled_policy = bundle.policy.as_ref().unwrap();
    assert!(bundled_policy
        .text
        .contains(&hex::encode(image_pcr0(b"v1"))));
    // The release record itself names the policy that decided.
    assert_eq!(report["policy_named_by_record"], true);
    assert!(report["reason"]
        .as_str()
        .unwrap()
        .starts_with("measurement set v1; policy sha256 "));
    assert_eq!(
        report["policy_set_seq"].as_u64(),
        seq_of(&world, "policy.set").first().copied()
    );
    assert_eq!(
        report["policy_sha256"],
        attestation_verifier::kms::policy_sha256(&bundled_policy.text)
    );

    // Without --root the simulated chain does not lead to the AWS root.
    let (code, out) = offline(&[
        "evidence",
        "verify",
        "--identity",
        &identity,
        &path.display().to_string(),
    ]);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("evidence_invalid")),
        "{out}"
    );

    // Swapping in the later policy (a valid policy.set of the same key, in
    // the same log) is refused: it does not allow the recorded release.
    let sets = seq_of(&world, "policy.set");
    let later = write_bundle(&world, *sets.last().unwrap(), "later-set.json");
    let later: evidence::EvidenceBundle =
        serde_json::from_slice(&std::fs::read(&later).unwrap()).unwrap();
    assert!(later.policy.is_none());
    let mut swapped = bundle.clone();
    let policy = swapped.policy.as_mut().unwrap();
    policy.set_record = later.record.clone();
    policy.set_proof = later.proof.clone();
    policy.text = world
        .broker
        .kms()
        .policy(&KeyName::parse(KEY).unwrap())
        .unwrap()
        .unwrap()
        .text;
    let swapped_path = world.dir().join("swapped.json");
    std::fs::write(&swapped_path, serde_json::to_string(&swapped).unwrap()).unwrap();
    let (code, out) = verify_offline(&identity, &root, &swapped_path);
    assert_eq!(code, 1, "{out}");

    // The refused request's record verifies too (its document re-checked).
    let refused = seq_of(&world, "key.release");
    let path_refused = write_bundle(&world, *refused.last().unwrap(), "refused.json");
    let (code, report) = verify_offline(&identity, &root, &path_refused);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["decision"], "refused");
    assert_eq!(report["pcrs"]["0"], hex::encode(image_pcr0(b"v2")));

    every_changed_byte_is_refused(&path, &["--identity", &identity, "--root", &root], 300);
}

/// The policy hash is read from the end of a release record's reason: a
/// measurement set whose name holds `; policy sha256 <hash of another
/// policy>` cannot make the bundle carry that other policy, and a name with
/// `;` in it is compared whole.
#[test]
fn a_set_name_cannot_stand_in_for_the_policy_hash() {
    let (world, identity, root) = world_for_bundles();
    let policy = |name: &str| {
        format!(
            "operations = [\"generate\"]\nmax_document_age_seconds = 120\n\
             [[measurements]]\nname = \"{name}\"\npcr0 = \"{}\"\n",
            hex::encode(image_pcr0(b"v1"))
        )
    };
    // A decoy set first (it allows the same image), then the policy in
    // force, whose set's name names the decoy's hash.
    let decoy = policy("a");
    world.set_policy(KEY, &decoy);
    let decoy_sha = attestation_verifier::kms::policy_sha256(&decoy);
    for name in [
        format!("a; policy sha256 {decoy_sha}"),
        "prod; v2".to_owned(),
    ] {
        let real = policy(&name);
        world.set_policy(KEY, &real);
        let now = T0 + 1_000;
        assert!(matches!(
            release(&world, b"v1", now),
            Response::KeyRelease(_)
        ));
        let seq = *seq_of(&world, "key.release.generate").last().unwrap();
        let path = write_bundle(&world, seq, "named.json");
        let (code, report) = verify_offline(&identity, &root, &path);
        assert_eq!(code, 0, "{name}: {report}");
        assert_eq!(
            report["policy_sha256"],
            attestation_verifier::kms::policy_sha256(&real),
            "{name}"
        );
        assert_eq!(report["policy_named_by_record"], true);
    }
}

/// A release recorded as allowed and then withdrawn (a change was under
/// way while it was recorded; no key was sent): its bundle carries the
/// withdrawal, and `evidence verify` reports it. A withdrawal is accepted
/// only from the record's own request.
#[test]
fn a_withdrawn_release_s_bundle_carries_its_withdrawal() {
    let (world, identity, root) = world_for_bundles();
    set_policy(&world, &image_pcr0(b"v1"));
    assert!(matches!(
        release(&world, b"v1", T0 + 1_000),
        Response::KeyRelease(_)
    ));
    world.pending_change(KEY, "key.disable", None);
    assert!(matches!(
        release(&world, b"v1", T0 + 2_000),
        Response::Error { .. }
    ));
    let allowed = seq_of(&world, "key.release.generate");
    let refusals = seq_of(&world, "key.release");
    let ([kept, withdrawn], [withdrawal]) = (allowed.as_slice(), refusals.as_slice()) else {
        panic!("allowed {allowed:?}, refused {refusals:?}")
    };
    let verify = |path: &Path| verify_offline(&identity, &root, path);

    let withdrawn = write_bundle(&world, *withdrawn, "withdrawn.json");
    let (code, report) = verify(&withdrawn);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["decision"], "allowed");
    assert_eq!(report["withdrawn_by"]["seq"].as_u64(), Some(*withdrawal));
    assert!(report["withdrawn_by"]["reason"]
        .as_str()
        .unwrap()
        .starts_with("changed_during_release: "));

    let kept = write_bundle(&world, *kept, "kept.json");
    let (code, report) = verify(&kept);
    assert_eq!(code, 0, "{report}");
    assert!(report["withdrawn_by"].is_null(), "{report}");
    // No withdrawal, no field: the file is as an older version wrote it.
    let text = std::fs::read_to_string(&kept).unwrap();
    assert!(!text.contains("\"withdrawal\""), "{text}");

    // Another request's withdrawal (a valid, later record in the same tree,
    // of the same key) does not withdraw this release.
    let read = |path: &Path| -> evidence::EvidenceBundle {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let mut borrowed = read(&kept);
    borrowed.withdrawal = read(&withdrawn).withdrawal;
    assert!(borrowed.withdrawal.is_some());
    let borrowed_path = world.path("borrowed.json");
    std::fs::write(
        &borrowed_path,
        evidence::encode_evidence(&borrowed).unwrap(),
    )
    .unwrap();
    let (code, out) = verify(&borrowed_path);
    assert_eq!(
        (code, out["error"]["kind"].as_str()),
        (1, Some("evidence_invalid")),
        "{out}"
    );
    assert!(
        out["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a later refusal of the record's own request"),
        "{out}"
    );

    every_changed_byte_is_refused(&withdrawn, &["--identity", &identity, "--root", &root], 150);
}

/// The cost of a checkpoint and a proof on a large log (run by hand:
/// `cargo test -p attestation-verifier --test evidence -- --ignored --nocapture`;
/// `KLUIS_EVIDENCE_RECORDS` sets the size, 100 000 by default).
#[test]
#[ignore = "a measurement, not a check"]
fn checkpoint_cost_on_a_large_log() {
    let n: u64 = std::env::var("KLUIS_EVIDENCE_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut prev = [0u8; 48];
    for seq in 1..=n {
        let mut r = AuditRecord {
            seq,
            time_ms: T0 + seq,
            actor: Actor::Admin {
                name: "key-admin".into(),
                role: "key_admin".into(),
            },
            operation: "key.rotate".into(),
            key_id: Some(KEY.into()),
            key_version: Some(2),
            decision: attestation_verifier::audit::Decision::Allowed,
            reason: None,
            attestation_document: None,
            job: None,
            prev_hash: prev,
            hash: [0; 48],
        };
        r.hash = r.compute_hash();
        prev = r.hash;
        use std::io::Write;
        serde_json::to_writer(&mut out, &r).unwrap();
        out.write_all(b"\n").unwrap();
    }
    drop(out);
    let bytes = std::fs::metadata(&path).unwrap().len();
    let mut kms = Kms::init(
        &dir.path().join("store"),
        RootSecret::from_key_bytes(zeroize::Zeroizing::new([7u8; 32])),
    )
    .unwrap();
    let log = Arc::new(AuditLog::open(&path).unwrap());
    kms.bind_audit(Arc::clone(&log), Actor::System);
    let identity = VerifierIdentity::generate().unwrap();
    let started = std::time::Instant::now();
    let signed = evidence::checkpoint(&log, &identity).unwrap();
    let checkpoint = started.elapsed();
    // The first incremental checkpoint reads everything and keeps the
    // frontier; after ten more records the next reads only those.
    let first = evidence::checkpoint_incremental(&kms, &log, &identity).unwrap();
    assert_eq!(first.checkpoint, signed.checkpoint);
    kms.create_key(&KeyName::parse(KEY).unwrap(), 365, T0)
        .unwrap();
    for _ in 0..9 {
        kms.rotate_key(&KeyName::parse(KEY).unwrap(), T0).unwrap();
    }
    let started = std::time::Instant::now();
    let next = evidence::checkpoint_incremental(&kms, &log, &identity).unwrap();
    let incremental = started.elapsed();
    assert_eq!(next.checkpoint.size, n + 10);
    assert_eq!(
        next.checkpoint,
        evidence::checkpoint(&log, &identity).unwrap().checkpoint
    );
    let started = std::time::Instant::now();
    let proof = evidence::prove(&log, &identity, n / 3).unwrap();
    let prove = started.elapsed();
    assert_eq!(signed.checkpoint.size, n);
    assert_eq!(proof.tree_size, n + 10);
    println!(
        "{n} records, {bytes} bytes: full checkpoint {checkpoint:?}, \
         incremental checkpoint after 10 more {incremental:?}, \
         inclusion proof {prove:?} ({} hashes)",
        proof.proof.len()
    );
}

#[test]
fn a_bundle_carries_the_authorisation_its_record_names() {
    use attestation_verifier::audit::{Decision, JobContext, NewRecord};
    let world = new_world();
    let kms = world.broker.kms();
    let issue = |case: &str| {
        let mut nonce = [0u8; kluis_proto::authorisation::AUTHORISATION_NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).unwrap();
        kluis_proto::JobAuthorisation {
            version: kluis_proto::authorisation::AUTHORISATION_VERSION,
            nonce,
            issuer: "app-admin".into(),
            issued_at_ms: T0,
            expires_at_ms: T0 + 86_400_000,
            workload: kluis_proto::job::WorkloadSpec::Identity,
            input_key: KEY.into(),
            output_key: KEY.into(),
            secret_keys: Vec::new(),
            purpose: "benefit entitlement check".into(),
            case: case.into(),
            max_runs: Some(1),
        }
        .sign(&world.identity())
        .unwrap()
    };
    let signed = issue("CASE-1");
    kms.store_authorisation(&signed, "test".into()).unwrap();
    let id = signed.id().to_hex();
    let job = JobContext {
        authorisation: id.clone(),
        purpose: "benefit entitlement check".into(),
        case: "CASE-1".into(),
    };
    let anchor = world
        .broker
        .audit()
        .append_job(
            NewRecord {
                time_ms: T0 + 5_000,
                actor: Actor::System,
                operation: "job.run".into(),
                key_id: None,
                key_version: None,
                decision: Decision::Allowed,
                reason: Some("a record of a job under an authorisation".into()),
                attestation_document: None,
            },
            Some(job),
        )
        .unwrap();
    let public = world.identity().public_key_sec1();
    let anchor_root = || TrustAnchor::dangerous_from_der(world.root.root_der()).unwrap();
    let bundle =
        evidence::build_bundle(kms, world.broker.audit(), &world.identity(), anchor.seq).unwrap();
    let carried = bundle.authorisation.clone().unwrap();
    assert_eq!(carried.id, id);
    let bytes = evidence::encode_evidence(&bundle).unwrap();
    let report = evidence::verify_evidence(&bytes, &public, anchor_root()).unwrap();
    assert_eq!(report["authorisation"], id);
    assert_eq!(report["purpose"], "benefit entitlement check");
    assert_eq!(report["case"], "CASE-1");
    assert!(report["module_id"].is_null());

    // Another authorisation in its place — even one this verifier signed —
    // or none at all is refused.
    let other = issue("CASE-2");
    let mut swapped = bundle.clone();
    swapped.authorisation = Some(evidence::BundledAuthorisation {
        id: other.id().to_hex(),
        signed: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, other.bytes()),
    });
    let bytes = evidence::encode_evidence(&swapped).unwrap();
    assert!(evidence::verify_evidence(&bytes, &public, anchor_root()).is_err());
    let mut without = bundle;
    without.authorisation = None;
    let bytes = evidence::encode_evidence(&without).unwrap();
    let err = evidence::verify_evidence(&bytes, &public, anchor_root()).unwrap_err();
    assert!(err.to_string().contains("does not carry"), "{err}");
    // Whitespace added to the file is a change too.
    let mut spaced = evidence::encode_evidence(&bundle_again(&world, anchor.seq)).unwrap();
    spaced.insert(1, b' ');
    assert!(evidence::verify_evidence(&spaced, &public, anchor_root()).is_err());
}

fn bundle_again(world: &World, seq: u64) -> evidence::EvidenceBundle {
    evidence::build_bundle(
        world.broker.kms(),
        world.broker.audit(),
        &world.identity(),
        seq,
    )
    .unwrap()
}

/// A release the bundled policy forbade — allowed under a policy that
/// requires a job authorisation, by a record that names none (what someone
/// holding the root secret could write) — is refused by the offline check,
/// which recomputes the decision with the authorisation rule too.
#[test]
fn a_release_without_the_authorisation_its_policy_requires_is_invalid_offline() {
    use attestation_verifier::audit::{Decision, NewRecord};
    let world = new_world();
    set_policy(&world, &image_pcr0(b"v1"));
    assert!(matches!(
        release(&world, b"v1", T0 + 1_000),
        Response::KeyRelease(_)
    ));
    let released = seq_of(&world, "key.release.generate");
    let genuine = world
        .broker
        .audit()
        .records(&Default::default())
        .unwrap()
        .into_iter()
        .find(|r| r.seq == released[0])
        .unwrap();
    // The same policy, now requiring an authorisation.
    let text = format!(
        "operations = [\"generate\", \"decrypt\"]\nmax_document_age_seconds = 120\n\
         require_authorisation = true\n\
         [[measurements]]\nname = \"v1\"\npcr0 = \"{}\"\n",
        hex::encode(image_pcr0(b"v1"))
    );
    let kms = world.broker.kms();
    kms.set_policy(
        &KeyName::parse(KEY).unwrap(),
        &StoredPolicy {
            format: "toml".into(),
            text: text.clone(),
            set_by: "test".into(),
            set_ms: T0 + 1_100,
        },
    )
    .unwrap();
    let forged = kms
        .append_audit(NewRecord {
            time_ms: T0 + 1_200,
            actor: genuine.actor.clone(),
            operation: genuine.operation.clone(),
            key_id: genuine.key_id.clone(),
            key_version: genuine.key_version,
            decision: Decision::Allowed,
            reason: Some(format!(
                "measurement set v1; {}{}",
                attestation_verifier::kms::POLICY_REASON_PREFIX,
                attestation_verifier::kms::policy_sha256(&text)
            )),
            attestation_document: genuine.attestation_document.clone(),
        })
        .unwrap();
    let anchor = TrustAnchor::dangerous_from_der(world.root.root_der()).unwrap();
    let public = world.identity().public_key_sec1();
    // The genuine release still verifies; the forged one is refused, naming
    // the rule.
    let genuine_bundle = evidence::encode_evidence(
        &evidence::build_bundle(kms, world.broker.audit(), &world.identity(), released[0]).unwrap(),
    )
    .unwrap();
    evidence::verify_evidence(&genuine_bundle, &public, anchor.clone()).unwrap();
    let forged_bundle = evidence::encode_evidence(
        &evidence::build_bundle(kms, world.broker.audit(), &world.identity(), forged.seq).unwrap(),
    )
    .unwrap();
    let err = evidence::verify_evidence(&forged_bundle, &public, anchor)
        .unwrap_err()
        .to_string();
    assert!(err.contains("authorisation_required"), "{err}");
}

/// A release record that names an authorisation for other keys — or one
/// that expired before the record — is refused offline, even though the
/// authorisation itself is genuine.
#[test]
fn an_authorisation_that_does_not_cover_the_release_is_invalid_offline() {
    use attestation_verifier::audit::{Decision, JobContext, NewRecord};
    let world = new_world();
    set_policy(&world, &image_pcr0(b"v1"));
    assert!(matches!(
        release(&world, b"v1", T0 + 1_000),
        Response::KeyRelease(_)
    ));
    let released = seq_of(&world, "key.release.generate");
    let genuine = world
        .broker
        .audit()
        .records(&Default::default())
        .unwrap()
        .into_iter()
        .find(|r| r.seq == released[0])
        .unwrap();
    let kms = world.broker.kms();
    let issue = |output_key: &str, expires_at_ms: u64| {
        let mut nonce = [0u8; kluis_proto::authorisation::AUTHORISATION_NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).unwrap();
        let signed = kluis_proto::JobAuthorisation {
            version: kluis_proto::authorisation::AUTHORISATION_VERSION,
            nonce,
            issuer: "app-admin".into(),
            issued_at_ms: T0,
            expires_at_ms,
            workload: kluis_proto::job::WorkloadSpec::Identity,
            input_key: KEY.into(),
            output_key: output_key.into(),
            secret_keys: Vec::new(),
            purpose: "benefit entitlement check".into(),
            case: "CASE-9".into(),
            max_runs: None,
        }
        .sign(&world.identity())
        .unwrap();
        kms.store_authorisation(&signed, "test".into()).unwrap();
        signed
    };
    let anchor = TrustAnchor::dangerous_from_der(world.root.root_der()).unwrap();
    let public = world.identity().public_key_sec1();
    // The genuine release as if made under `signed` (what someone holding
    // the root secret could append).
    let verify_under = |signed: &kluis_proto::SignedAuthorisation| {
        let forged = world
            .broker
            .audit()
            .append_job(
                NewRecord {
                    time_ms: T0 + 1_200,
                    actor: genuine.actor.clone(),
                    operation: genuine.operation.clone(),
                    key_id: genuine.key_id.clone(),
                    key_version: genuine.key_version,
                    decision: Decision::Allowed,
                    reason: genuine.reason.clone(),
                    attestation_document: genuine.attestation_document.clone(),
                },
                Some(JobContext {
                    authorisation: signed.id().to_hex(),
                    purpose: "benefit entitlement check".into(),
                    case: "CASE-9".into(),
                }),
            )
            .unwrap();
        let bundle = evidence::encode_evidence(
            &evidence::build_bundle(kms, world.broker.audit(), &world.identity(), forged.seq)
                .unwrap(),
        )
        .unwrap();
        evidence::verify_evidence(&bundle, &public, anchor.clone()).map_err(|e| e.to_string())
    };
    // Covering the key, in its role, in time: valid.
    verify_under(&issue(KEY, T0 + DAY_MS)).unwrap();
    // Another output key: the generate is not this authorisation's.
    let err = verify_under(&issue("agency-a/other/prod", T0 + DAY_MS)).unwrap_err();
    assert!(err.contains("does not name key"), "{err}");
    // Expired before the record.
    let err = verify_under(&issue(KEY, T0 + 1_100)).unwrap_err();
    assert!(err.contains("expiry"), "{err}");
}

/// Standard error that cannot be written (`2>/dev/full`, or `2>&1 | head`
/// whose reader left) never turns a command into a panic (exit 101): each
/// exits as it does with a working standard error.
#[test]
fn standard_error_that_cannot_be_written_is_no_panic() {
    let env = Env::new();
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let command = |args: &[&str]| {
        let mut cmd = bin();
        cmd.env("KLUIS_STORE", env.store())
            .env("KLUIS_ROOT_KEY_FILE", env.dir.path().join("root.key"))
            .env("KLUIS_CREDENTIAL_FILE", env.key_admin())
            .args(args);
        cmd
    };
    for args in [
        &["verify", "/dev/null"][..],
        &["key", "show", "no/such/key"][..],
        &["key", "list"][..],
        &["no-such-command"][..],
    ] {
        let expected = command(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .code();
        assert_ne!(expected, Some(101), "{args:?}");
        // Standard error full, standard output full or working.
        for stdout_full in [true, false] {
            let mut cmd = command(args);
            cmd.stderr(full());
            if stdout_full {
                cmd.stdout(full());
            } else {
                cmd.stdout(std::process::Stdio::null());
            }
            let code = cmd.status().unwrap().code();
            assert_ne!(code, Some(101), "{args:?} panicked");
            if !stdout_full {
                assert_eq!(code, expected, "{args:?}");
            }
        }
        // Standard error a pipe nobody reads any more.
        let mut child = command(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stderr.take());
        assert_eq!(child.wait().unwrap().code(), expected, "{args:?}");
    }
}
