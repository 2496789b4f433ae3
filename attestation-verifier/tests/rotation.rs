//! Dynamic key rotation as the controller's requirements state it: a
//! master key rotates by itself after its period (a year by default), on
//! use or by the scheduled sweep, each rotation audited; the old versions
//! stay to decrypt what they wrapped, and rewrap moves a wrapped key to the
//! current version.

#![allow(clippy::unwrap_used, clippy::arithmetic_side_effects)]

use attestation_verifier::audit::{Actor, AuditFilter, AuditLog, Decision};
use attestation_verifier::keys::KeyName;
use attestation_verifier::kms::Kms;
use kluis_keystore::RootSecret;
use std::sync::Arc;

const T0: u64 = 1_767_225_600_000;
const DAY_MS: u64 = 86_400_000;

#[test]
fn yearly_rotation_is_automatic_audited_and_keeps_old_versions_for_decryption() {
    let dir = tempfile::tempdir().unwrap();
    let mut kms = Kms::init(
        &dir.path().join("store"),
        RootSecret::from_key_bytes(zeroize::Zeroizing::new([9u8; 32])),
    )
    .unwrap();
    let log = Arc::new(AuditLog::open(dir.path().join("audit.log")).unwrap());
    kms.bind_audit(Arc::clone(&log), Actor::System);
    let name = KeyName::parse("agency-a/app-x/prod").unwrap();
    kms.create_key(&name, 365, T0).unwrap();

    let (dk1, w1) = kms.generate_data_key(&name, T0 + DAY_MS).unwrap();
    assert_eq!(w1.version, 1);
    // Not due after 364 days; due (and rotated on use) after 366.
    assert!(kms.rotate_due(T0 + 364 * DAY_MS).unwrap().is_empty());
    let (_, w2) = kms.generate_data_key(&name, T0 + 366 * DAY_MS).unwrap();
    assert_eq!(w2.version, 2);
    // The scheduled sweep rotates it again a year later.
    let swept = kms.rotate_due(T0 + 2 * 366 * DAY_MS).unwrap();
    assert_eq!(swept, vec![(name.clone(), 3)]);

    // Version 1 still decrypts what it wrapped; rewrap moves it to the
    // current version without changing the data key.
    let again = kms.decrypt_data_key(&w1).unwrap();
    assert_eq!(again.expose_secret(), dk1.expose_secret());
    let moved = kms.rewrap(&w1).unwrap();
    assert_eq!(moved.version, 3);
    let moved_back = kms.decrypt_data_key(&moved).unwrap();
    assert_eq!(moved_back.expose_secret(), dk1.expose_secret());
    let record = kms.key(&name).unwrap();
    assert_eq!(
        record
            .versions
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );

    // Each rotation is in the audit log, with its reason, before it took effect.
    let rotations = log
        .records(&AuditFilter {
            operation: Some("key.rotate".to_owned()),
            decision: Some(Decision::Allowed),
            ..AuditFilter::default()
        })
        .unwrap();
    assert_eq!(rotations.len(), 2, "{rotations:?}");
    assert!(rotations.iter().all(|r| r
        .reason
        .as_deref()
        .unwrap_or("")
        .contains("rotation period elapsed")));
    assert_eq!(log.verify(None).unwrap().records, log.head().seq);
}
