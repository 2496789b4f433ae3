//! What job authorisations add to the audit log and to key policies: the
//! optional `job` field of a record (hashed only when present, so every
//! older log keeps verifying) and `require_authorisation` (default false,
//! so every older policy keeps its meaning and its stored text).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use attestation_verifier::audit::{
    verify_file, Actor, AuditError, AuditFilter, AuditLog, AuditRecord, Decision, JobContext,
    NewRecord,
};
use attestation_verifier::policy::KeyPolicy;

fn new_record(operation: &str) -> NewRecord {
    NewRecord {
        time_ms: 1_767_225_600_000,
        actor: Actor::System,
        operation: operation.to_owned(),
        key_id: Some("a/b/c".into()),
        key_version: Some(1),
        decision: Decision::Allowed,
        reason: None,
        attestation_document: None,
    }
}

fn context() -> JobContext {
    JobContext {
        authorisation: "ab".repeat(32),
        purpose: "benefit entitlement check".into(),
        case: "CASE-1".into(),
    }
}

#[test]
fn job_records_are_chained_and_verified_and_others_are_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path).unwrap();
    log.append(new_record("a")).unwrap();
    log.append_job(new_record("key.release.decrypt"), Some(context()))
        .unwrap();
    log.append_job(new_record("c"), None).unwrap();
    assert_eq!(verify_file(&path, None).unwrap().records, 3);
    let records = log.records(&AuditFilter::default()).unwrap();
    assert_eq!(records[0].job, None);
    assert_eq!(records[1].job, Some(context()));
    assert_eq!(records[2].job, None);

    // Only the job's line has the field.
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(!lines[0].contains("\"job\""));
    assert!(lines[1].contains("\"attestation_document\":null,\"job\":{\"authorisation\":\"abab"));
    assert!(!lines[2].contains("\"job\""));

    // Changing the purpose breaks the chain at that record.
    let changed = text.replace("benefit entitlement check", "benefit entitlement chuck");
    std::fs::write(&path, changed).unwrap();
    match verify_file(&path, None).unwrap_err() {
        AuditError::Broken { seq, .. } => assert_eq!(seq, 2),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_job_field_is_hashed_only_when_present_as_documented() {
    let mut record = AuditRecord {
        seq: 1,
        time_ms: 5,
        actor: Actor::System,
        operation: "op".into(),
        key_id: None,
        key_version: None,
        decision: Decision::Allowed,
        reason: None,
        attestation_document: None,
        job: None,
        prev_hash: [9; 48],
        hash: [0; 48],
    };
    let without = record.canonical_bytes();
    // Pinned: a record without a job encodes as before the field existed.
    let mut expected = Vec::new();
    let bytes = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u64).to_be_bytes());
        out.extend_from_slice(b);
    };
    bytes(&mut expected, b"kluis-audit-v1");
    expected.extend_from_slice(&1u64.to_be_bytes());
    expected.extend_from_slice(&5u64.to_be_bytes());
    expected.push(3);
    bytes(&mut expected, b"op");
    expected.extend_from_slice(&[0, 0, 1, 0, 0]);
    expected.extend_from_slice(&[9; 48]);
    assert_eq!(without, expected);

    record.job = Some(context());
    let with = record.canonical_bytes();
    let mut expected = without[..without.len() - 48].to_vec();
    expected.push(0x4a);
    bytes(&mut expected, "ab".repeat(32).as_bytes());
    bytes(&mut expected, b"benefit entitlement check");
    bytes(&mut expected, b"CASE-1");
    expected.extend_from_slice(&[9; 48]);
    assert_eq!(with, expected);
}

#[test]
fn bad_job_contexts_are_not_appended() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path().join("audit.log")).unwrap();
    for bad in [
        JobContext {
            authorisation: "AB".repeat(32),
            ..context()
        },
        JobContext {
            authorisation: "ab".into(),
            ..context()
        },
        JobContext {
            purpose: "p".repeat(2000),
            ..context()
        },
        JobContext {
            case: "c".repeat(300),
            ..context()
        },
    ] {
        assert!(matches!(
            log.append_job(new_record("x"), Some(bad)),
            Err(AuditError::InvalidRecord { .. })
        ));
    }
    assert_eq!(log.head().seq, 0);
}

const POLICY: &str = "operations = [\"decrypt\"]\nmax_document_age_seconds = 60\n\
    [[measurements]]\nname = \"a\"\npcr0 = \"abababababababababababababababababababababababababababababababababababababababababababababababab\"\n";

#[test]
fn require_authorisation_defaults_to_false_and_round_trips() {
    let old = KeyPolicy::from_toml_str(POLICY).unwrap();
    assert!(!old.require_authorisation());
    // An older policy's stored JSON does not change.
    let json = serde_json::to_string(&old).unwrap();
    assert!(!json.contains("require_authorisation"), "{json}");
    assert_eq!(KeyPolicy::from_json_str(&json).unwrap(), old);

    let text = format!("require_authorisation = true\n{POLICY}");
    let new = KeyPolicy::from_toml_str(&text).unwrap();
    assert!(new.require_authorisation());
    let json = serde_json::to_string(&new).unwrap();
    assert!(json.contains("\"require_authorisation\":true"), "{json}");
    assert_eq!(KeyPolicy::from_json_str(&json).unwrap(), new);
    assert_ne!(new, old);

    // Strict as every other field.
    assert!(
        KeyPolicy::from_toml_str(&format!("require_authorisation = \"yes\"\n{POLICY}")).is_err()
    );
    assert!(KeyPolicy::from_toml_str(&format!("require_authorization = true\n{POLICY}")).is_err());
}
