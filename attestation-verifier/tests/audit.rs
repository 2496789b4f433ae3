//! Audit log: appends, the chain, and every kind of tampering the verifier
//! must name; durability and concurrency properties.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use attestation_verifier::audit::{
    read_records, verify_file, verify_reader, Actor, ActorKind, AuditError, AuditFilter, AuditHead,
    AuditLog, AuditRecord, Decision, NewRecord, Problem, MAX_LINE_LEN,
};
use base64::Engine as _;
use kluis_attestation::{TrustAnchor, UnixMillis, VerifiedAttestation, Verifier, VerifyOptions};
use kluis_nsm::sim::{FixedClock, SimConfig, SimulatedNsm};
use sha2::{Digest, Sha384};
use std::collections::BTreeMap;
use std::io::{Cursor, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const T0: u64 = 1_767_225_600_000;

fn admin(i: u64) -> NewRecord {
    NewRecord {
        time_ms: T0 + i,
        actor: Actor::Admin {
            name: "alice".to_owned(),
            role: "key-admin".to_owned(),
        },
        operation: "key.rotate".to_owned(),
        key_id: Some("agency-a/app-x/prod".to_owned()),
        key_version: Some(u32::try_from(i).unwrap()),
        decision: Decision::Allowed,
        reason: None,
        attestation_document: None,
    }
}

fn system(i: u64) -> NewRecord {
    NewRecord {
        time_ms: T0 + i,
        actor: Actor::System,
        operation: "service.start".to_owned(),
        key_id: None,
        key_version: None,
        decision: Decision::Allowed,
        reason: Some("line\nbreak, \"quotes\" and ünïcode".to_owned()),
        attestation_document: None,
    }
}

/// A document from the simulated NSM and its verification.
fn enclave_document() -> (Vec<u8>, VerifiedAttestation, Verifier) {
    let clock = Arc::new(FixedClock::new(T0));
    let nsm = SimulatedNsm::new(
        SimConfig::default()
            .with_image(b"enclave image".to_vec(), Some(b"signer".to_vec()))
            .with_clock(clock),
    )
    .unwrap();
    let verifier = Verifier::new(TrustAnchor::dangerous_from_der(nsm.root().root_der()).unwrap());
    let doc = kluis_nsm::attest(&nsm, Some(&[1; 48]), Some(&[2; 32]), Some(&[4; 97])).unwrap();
    let verified = verifier
        .verify(&doc, &VerifyOptions::at(UnixMillis(T0)))
        .unwrap();
    (doc, verified, verifier)
}

fn enclave(i: u64, doc: &[u8], verified: &VerifiedAttestation, decision: Decision) -> NewRecord {
    NewRecord {
        time_ms: T0 + i,
        actor: Actor::enclave(verified),
        operation: "key.generate".to_owned(),
        key_id: Some("agency-a/app-x/prod".to_owned()),
        key_version: Some(3),
        decision,
        reason: (decision == Decision::Refused)
            .then(|| "measurements_not_allowed: set \"v1\": PCR0 expected …".to_owned()),
        attestation_document: Some(doc.to_vec()),
    }
}

fn tmp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    (dir, path)
}

/// A log of `n` small records (alternating admin and system actors).
fn small_log(n: u64) -> (tempfile::TempDir, PathBuf, Vec<AuditHead>) {
    let (dir, path) = tmp();
    let log = AuditLog::open(&path).unwrap();
    let heads = (1..=n)
        .map(|i| {
            log.append(if i % 2 == 0 { system(i) } else { admin(i) })
                .unwrap()
        })
        .collect();
    (dir, path, heads)
}

fn lines(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let mut out: Vec<Vec<u8>> = bytes
        .split_inclusive(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect();
    out.iter_mut()
        .for_each(|l| assert_eq!(l.pop(), Some(b'\n')));
    out
}

fn join(lines: &[Vec<u8>]) -> Vec<u8> {
    lines
        .iter()
        .flat_map(|l| l.iter().copied().chain([b'\n']))
        .collect()
}

fn verify_bytes(bytes: &[u8], expected: Option<&AuditHead>) -> Result<u64, AuditError> {
    verify_reader(Cursor::new(bytes), expected).map(|r| r.records)
}

fn broken(err: &AuditError) -> (u64, u64, &Problem) {
    match err {
        AuditError::Broken { line, seq, problem } => (*line, *seq, problem),
        other => panic!("expected a broken record, got {other:?}"),
    }
}

// ------------------------------------------------------------------ basics

#[test]
fn append_verify_and_reopen() {
    let (_dir, path) = tmp();
    let (doc, verified, _) = enclave_document();
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(log.head(), AuditHead::GENESIS);
    assert_eq!(log.verify(None).unwrap().records, 0);
    let mut heads = vec![
        log.append(admin(1)).unwrap(),
        log.append(enclave(2, &doc, &verified, Decision::Allowed))
            .unwrap(),
        log.append(enclave(3, &doc, &verified, Decision::Refused))
            .unwrap(),
        log.append(system(4)).unwrap(),
    ];
    assert_eq!(
        heads.iter().map(|h| h.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(log.head(), heads[3]);
    let report = log.verify(Some(&heads[3])).unwrap();
    assert_eq!((report.records, report.head), (4, heads[3]));
    // An older head is still part of the chain.
    assert_eq!(log.verify(Some(&heads[1])).unwrap().head, heads[3]);
    drop(log);

    let log = AuditLog::open(&path).unwrap();
    assert_eq!(log.recovered_tail_bytes(), 0);
    assert_eq!(log.head(), heads[3]);
    heads.push(log.append(admin(5)).unwrap());
    assert_eq!(heads[4].seq, 5);
    assert_eq!(verify_file(&path, Some(&heads[4])).unwrap().head, heads[4]);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn records_keep_the_document_for_re_verification() {
    let (_dir, path) = tmp();
    let (doc, verified, verifier) = enclave_document();
    let log = AuditLog::open(&path).unwrap();
    log.append(enclave(1, &doc, &verified, Decision::Allowed))
        .unwrap();
    let records = log.records(&AuditFilter::default()).unwrap();
    let record = &records[0];
    let kept = record.attestation_document.as_ref().unwrap();
    // A third party re-verifies the kept document and finds the same enclave.
    let again = verifier
        .verify(kept, &VerifyOptions::at(UnixMillis(T0)))
        .unwrap();
    let Actor::Enclave {
        module_id,
        pcrs,
        document_sha384,
    } = &record.actor
    else {
        panic!("not an enclave actor")
    };
    assert_eq!(document_sha384, again.document_sha384());
    assert_eq!(module_id, &again.document().module_id);
    assert_eq!(pcrs.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3, 4, 8]);
    for (i, v) in pcrs {
        assert_eq!(Some(v.as_slice()), again.document().pcr(*i));
    }
}

/// The documented line format and hash canonicalisation, recomputed here
/// independently of the implementation.
#[test]
fn line_format_and_hash_follow_the_documented_encoding() {
    let (_dir, path) = tmp();
    let (doc, verified, _) = enclave_document();
    let log = AuditLog::open(&path).unwrap();
    log.append(admin(1)).unwrap();
    log.append(enclave(2, &doc, &verified, Decision::Refused))
        .unwrap();
    log.append(system(3)).unwrap();
    let lines = lines(&path);
    assert_eq!(lines.len(), 3);

    let mut prev = vec![0u8; 48];
    for line in &lines {
        let text = std::str::from_utf8(line).unwrap();
        assert!(
            !text.contains(' ') || text.contains("\"reason\""),
            "compact JSON"
        );
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        // Field order on disk.
        let keys: Vec<&str> = field_order(text);
        assert_eq!(
            keys,
            [
                "seq",
                "time_ms",
                "actor",
                "operation",
                "key_id",
                "key_version",
                "decision",
                "reason",
                "attestation_document",
                "prev_hash",
                "hash"
            ]
        );
        let hex = |s: &serde_json::Value| hex::decode(s.as_str().unwrap()).unwrap();
        assert_eq!(hex(&v["prev_hash"]), prev);

        // The spec: SHA-384 over the length-prefixed encoding.
        let mut e = Vec::new();
        let u64_ = |e: &mut Vec<u8>, x: u64| e.extend_from_slice(&x.to_be_bytes());
        let bytes = |e: &mut Vec<u8>, b: &[u8]| {
            e.extend_from_slice(&(b.len() as u64).to_be_bytes());
            e.extend_from_slice(b);
        };
        bytes(&mut e, b"kluis-audit-v1");
        u64_(&mut e, v["seq"].as_u64().unwrap());
        u64_(&mut e, v["time_ms"].as_u64().unwrap());
        let actor = &v["actor"];
        match actor["kind"].as_str().unwrap() {
            "admin" => {
                e.push(1);
                bytes(&mut e, actor["name"].as_str().unwrap().as_bytes());
                bytes(&mut e, actor["role"].as_str().unwrap().as_bytes());
            }
            "enclave" => {
                e.push(2);
                bytes(&mut e, actor["module_id"].as_str().unwrap().as_bytes());
                let pcrs = actor["pcrs"].as_object().unwrap();
                u64_(&mut e, pcrs.len() as u64);
                let mut sorted: Vec<(u8, Vec<u8>)> = pcrs
                    .iter()
                    .map(|(k, v)| (k.parse().unwrap(), hex(v)))
                    .collect();
                sorted.sort();
                for (i, value) in sorted {
                    e.push(i);
                    bytes(&mut e, &value);
                }
                e.extend_from_slice(&hex(&actor["document_sha384"]));
            }
            "system" => e.push(3),
            other => panic!("{other}"),
        }
        bytes(&mut e, v["operation"].as_str().unwrap().as_bytes());
        match v["key_id"].as_str() {
            None => e.push(0),
            Some(k) => {
                e.push(1);
                bytes(&mut e, k.as_bytes());
            }
        }
        match v["key_version"].as_u64() {
            None => e.push(0),
            Some(k) => {
                e.push(1);
                e.extend_from_slice(&u32::try_from(k).unwrap().to_be_bytes());
            }
        }
        e.push(match v["decision"].as_str().unwrap() {
            "allowed" => 1,
            "refused" => 2,
            other => panic!("{other}"),
        });
        match v["reason"].as_str() {
            None => e.push(0),
            Some(r) => {
                e.push(1);
                bytes(&mut e, r.as_bytes());
            }
        }
        match v["attestation_document"].as_str() {
            None => e.push(0),
            Some(b) => {
                e.push(1);
                let raw = base64::engine::general_purpose::STANDARD.decode(b).unwrap();
                bytes(&mut e, &raw);
            }
        }
        e.extend_from_slice(&prev);
        let hash = Sha384::digest(&e).to_vec();
        assert_eq!(hex(&v["hash"]), hash, "{text}");

        let record: AuditRecord = serde_json::from_str(text).unwrap();
        assert_eq!(record.canonical_bytes(), e);
        prev = hash;
    }
    let enclave_line: serde_json::Value = serde_json::from_slice(&lines[1]).unwrap();
    assert_eq!(enclave_line["actor"]["kind"], "enclave");
    assert_eq!(enclave_line["decision"], "refused");
    assert!(enclave_line["actor"]["pcrs"]["0"].is_string());
    let system_line: serde_json::Value = serde_json::from_slice(&lines[2]).unwrap();
    assert_eq!(system_line["key_id"], serde_json::Value::Null);
    assert_eq!(system_line["actor"], serde_json::json!({"kind": "system"}));
}

/// Top-level keys of a JSON object, in the order they appear.
fn field_order(text: &str) -> Vec<&str> {
    let mut keys = Vec::new();
    let mut depth = 0;
    let mut in_string = false;
    let mut escaped = false;
    let mut start = 0;
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
                if depth == 1 && bytes.get(i + 1) == Some(&b':') {
                    keys.push(&text[start..i]);
                }
            }
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                start = i + 1;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth -= 1,
            _ => {}
        }
    }
    keys
}

#[test]
fn filters_select_records() {
    let (_dir, path) = tmp();
    let (doc, verified, _) = enclave_document();
    let log = AuditLog::open(&path).unwrap();
    log.append(admin(1)).unwrap();
    log.append(enclave(2, &doc, &verified, Decision::Allowed))
        .unwrap();
    log.append(enclave(3, &doc, &verified, Decision::Refused))
        .unwrap();
    log.append(system(4)).unwrap();
    let seqs = |f: AuditFilter| {
        log.records(&f)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect::<Vec<_>>()
    };
    assert_eq!(seqs(AuditFilter::default()), [1, 2, 3, 4]);
    assert_eq!(
        seqs(AuditFilter {
            decision: Some(Decision::Refused),
            ..AuditFilter::default()
        }),
        [3]
    );
    assert_eq!(
        seqs(AuditFilter {
            actor_kind: Some(ActorKind::Enclave),
            ..AuditFilter::default()
        }),
        [2, 3]
    );
    assert_eq!(
        seqs(AuditFilter {
            key_id: Some("agency-a/app-x/prod".to_owned()),
            ..AuditFilter::default()
        }),
        [1, 2, 3]
    );
    assert_eq!(
        seqs(AuditFilter {
            operation: Some("key.rotate".to_owned()),
            ..AuditFilter::default()
        }),
        [1]
    );
    assert_eq!(
        seqs(AuditFilter {
            since_ms: Some(T0 + 2),
            until_ms: Some(T0 + 4),
            ..AuditFilter::default()
        }),
        [2, 3]
    );
    let from_file = read_records(
        &path,
        &AuditFilter {
            actor_kind: Some(ActorKind::System),
            ..AuditFilter::default()
        },
    )
    .unwrap();
    assert_eq!(from_file.len(), 1);
    assert_eq!(from_file[0].reason.as_deref(), system(4).reason.as_deref());
}

#[test]
fn invalid_records_are_refused_and_not_written() {
    let (_dir, path) = tmp();
    let (doc, verified, _) = enclave_document();
    let log = AuditLog::open(&path).unwrap();
    log.append(admin(1)).unwrap();
    let mut wrong_doc = enclave(2, &doc, &verified, Decision::Allowed);
    wrong_doc.attestation_document = Some(b"another document".to_vec());
    let mut long_reason = admin(2);
    long_reason.reason = Some("x".repeat(16 * 1024 + 1));
    let mut empty_op = admin(2);
    empty_op.operation.clear();
    let mut big_doc = system(2);
    big_doc.attestation_document = Some(vec![0; 32 * 1024 + 1]);
    for (record, field) in [
        (wrong_doc, "attestation_document"),
        (long_reason, "reason"),
        (empty_op, "operation"),
        (big_doc, "attestation_document"),
    ] {
        match log.append(record).unwrap_err() {
            AuditError::InvalidRecord { field: f, .. } => assert_eq!(f, field),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(log.head().seq, 1);
    assert_eq!(log.verify(None).unwrap().records, 1);
}

// ---------------------------------------------------------------- tampering

#[test]
fn every_single_byte_change_is_detected_at_its_record() {
    let (_dir, path) = tmp();
    let (_, verified, _) = enclave_document();
    // A short stand-in for the document keeps this exhaustive test quick in
    // debug builds; the base64 field is exercised all the same.
    let doc = b"COSE_Sign1 bytes of an attestation document".to_vec();
    let Actor::Enclave {
        module_id, pcrs, ..
    } = Actor::enclave(&verified)
    else {
        unreachable!()
    };
    let actor = Actor::Enclave {
        module_id,
        pcrs,
        document_sha384: Sha384::digest(&doc).into(),
    };
    let log = AuditLog::open(&path).unwrap();
    log.append(admin(1)).unwrap();
    log.append(NewRecord {
        actor,
        ..enclave(2, &doc, &verified, Decision::Refused)
    })
    .unwrap();
    log.append(system(3)).unwrap();
    let head = log.head();
    drop(log);
    let original = std::fs::read(&path).unwrap();
    assert_eq!(verify_bytes(&original, Some(&head)).unwrap(), 3);

    // Line (1-based) of each byte, the newline counting with its line.
    let mut line_of = Vec::with_capacity(original.len());
    let mut line = 1u64;
    for &b in &original {
        line_of.push(line);
        if b == b'\n' {
            line += 1;
        }
    }
    let mut checked = 0;
    for (pos, &byte) in original.iter().enumerate() {
        for replacement in [byte ^ 0x01, byte ^ 0x20, b'\n', b' ', b'0'] {
            if replacement == byte {
                continue;
            }
            let mut tampered = original.clone();
            tampered[pos] = replacement;
            let err = verify_bytes(&tampered, None).expect_err(&format!(
                "byte {pos} {byte:#x} -> {replacement:#x} undetected"
            ));
            let (line, seq, _) = broken(&err);
            assert_eq!(
                (line, seq),
                (line_of[pos], line_of[pos]),
                "byte {pos} -> {replacement:#x}: {err}"
            );
            checked += 1;
        }
    }
    assert!(checked > 4 * original.len(), "{checked}");
}

#[test]
fn deletion_duplication_reordering_insertion() {
    let (_dir, path, heads) = small_log(5);
    let l = lines(&path);
    let seq_problem = |bytes: Vec<u8>| {
        let err = verify_bytes(&bytes, None).unwrap_err();
        let (line, seq, problem) = broken(&err);
        assert_eq!(line, seq);
        match problem {
            Problem::SeqMismatch { expected, found } => {
                assert_eq!(*expected, seq);
                (seq, *found)
            }
            other => panic!("{other:?}"),
        }
    };
    // Deleted record 3: line 3 carries seq 4.
    let mut v = l.clone();
    v.remove(2);
    assert_eq!(seq_problem(join(&v)), (3, 4));
    // Deleted first record.
    assert_eq!(seq_problem(join(&l[1..])), (1, 2));
    // Record 2 duplicated.
    let mut v = l.clone();
    v.insert(2, l[1].clone());
    assert_eq!(seq_problem(join(&v)), (3, 2));
    // Records 2 and 3 swapped.
    let mut v = l.clone();
    v.swap(1, 2);
    assert_eq!(seq_problem(join(&v)), (2, 3));
    // Last two swapped.
    let mut v = l.clone();
    v.swap(3, 4);
    assert_eq!(seq_problem(join(&v)), (4, 5));
    // A forged record inserted after 2, correctly chained: the original
    // record 3 that follows is the first broken one.
    let prev: AuditRecord = serde_json::from_slice(&l[1]).unwrap();
    let forged = forge(3, prev.hash, "key.destroy");
    let mut v = l.clone();
    v.insert(2, forged);
    assert_eq!(seq_problem(join(&v)), (4, 3));

    // A record with the right seq and a valid own hash but another
    // predecessor: prev_hash mismatch.
    let mut v = l.clone();
    v[2] = forge(3, [0x42; 48], "key.destroy");
    let err = verify_bytes(&join(&v), None).unwrap_err();
    assert!(
        matches!(broken(&err), (3, 3, Problem::PrevHashMismatch { .. })),
        "{err}"
    );

    // Rewriting the tail consistently from record 3 keeps a valid chain; only
    // the head kept elsewhere reveals it.
    let mut v = l[..2].to_vec();
    let mut prev_hash = prev.hash;
    for seq in 3..=5 {
        let line = forge(seq, prev_hash, "rewritten");
        prev_hash = serde_json::from_slice::<AuditRecord>(&line).unwrap().hash;
        v.push(line);
    }
    assert_eq!(verify_bytes(&join(&v), None).unwrap(), 5);
    match verify_bytes(&join(&v), Some(&heads[4])).unwrap_err() {
        AuditError::HeadMismatch { expected, found } => {
            assert_eq!(expected, heads[4]);
            assert_eq!(found.seq, 5);
        }
        other => panic!("{other:?}"),
    }
    // Even against an older kept head.
    assert!(matches!(
        verify_bytes(&join(&v), Some(&heads[2])).unwrap_err(),
        AuditError::HeadMismatch { .. }
    ));
    assert_eq!(verify_bytes(&join(&v), Some(&heads[1])).unwrap(), 5);
}

/// A well-formed record (valid own hash) with the given seq and prev_hash.
fn forge(seq: u64, prev_hash: [u8; 48], operation: &str) -> Vec<u8> {
    let mut record = AuditRecord {
        seq,
        time_ms: T0,
        actor: Actor::System,
        operation: operation.to_owned(),
        key_id: None,
        key_version: None,
        decision: Decision::Allowed,
        reason: None,
        attestation_document: None,
        job: None,
        prev_hash,
        hash: [0; 48],
    };
    record.hash = record.compute_hash();
    serde_json::to_vec(&record).unwrap()
}

#[test]
fn non_canonical_lines_are_refused() {
    let (_dir, path, _) = small_log(2);
    let l = lines(&path);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            String::from_utf8(l[1].clone())
                .unwrap()
                .replacen(",\"time_ms\"", ", \"time_ms\"", 1)
                .into_bytes(),
            "not_canonical",
        ),
        (
            {
                // Fields reordered: same values, same hash.
                let v: serde_json::Value = serde_json::from_slice(&l[1]).unwrap();
                let mut m = serde_json::Map::new();
                m.insert("hash".to_owned(), v["hash"].clone());
                for (k, val) in v.as_object().unwrap() {
                    m.insert(k.clone(), val.clone());
                }
                serde_json::to_vec(&m).unwrap()
            },
            "not_canonical",
        ),
        (
            String::from_utf8(l[1].clone())
                .unwrap()
                .replacen(",\"key_id\":null", "", 1)
                .into_bytes(),
            "not_canonical",
        ),
        (
            {
                let r: AuditRecord = serde_json::from_slice(&l[1]).unwrap();
                String::from_utf8(l[1].clone())
                    .unwrap()
                    .replace(
                        &hex::encode(r.prev_hash),
                        &hex::encode(r.prev_hash).to_uppercase(),
                    )
                    .into_bytes()
            },
            "unparseable",
        ),
        (
            // serde ignores unknown fields beside the tag of a unit variant;
            // the canonical form does not.
            String::from_utf8(l[1].clone())
                .unwrap()
                .replacen(
                    "\"kind\":\"system\"}",
                    "\"kind\":\"system\",\"extra\":1}",
                    1,
                )
                .into_bytes(),
            "not_canonical",
        ),
        (
            {
                let mut line = l[1].clone();
                line.pop();
                line.extend_from_slice(b",\"extra\":1}");
                line
            },
            "unparseable",
        ),
    ];
    for (changed, want) in cases {
        let bytes = join(&[l[0].clone(), changed.clone()]);
        let err = verify_bytes(&bytes, None).unwrap_err();
        let (line, seq, problem) = broken(&err);
        assert_eq!((line, seq), (2, 2), "{err}");
        let got = match problem {
            Problem::NotCanonical => "not_canonical",
            Problem::Unparseable(_) => "unparseable",
            _ => "other",
        };
        assert_eq!(got, want, "{err}\n{}", String::from_utf8_lossy(&changed));
    }
}

#[test]
fn truncated_tail_is_detected_with_the_head() {
    let (_dir, path, heads) = small_log(5);
    let l = lines(&path);
    let short = join(&l[..3]);
    // Without the head, a shorter chain is a valid chain.
    assert_eq!(verify_bytes(&short, None).unwrap(), 3);
    match verify_bytes(&short, Some(&heads[4])).unwrap_err() {
        AuditError::TruncatedTail { expected, last } => {
            assert_eq!(expected, heads[4]);
            assert_eq!(last, heads[2]);
        }
        other => panic!("{other:?}"),
    }
    match verify_bytes(b"", Some(&heads[0])).unwrap_err() {
        AuditError::TruncatedTail { last, .. } => assert_eq!(last, AuditHead::GENESIS),
        other => panic!("{other:?}"),
    }
    assert_eq!(verify_bytes(b"", Some(&AuditHead::GENESIS)).unwrap(), 0);
    let not_genesis = AuditHead {
        seq: 0,
        hash: [1; 48],
    };
    assert!(matches!(
        verify_bytes(b"", Some(&not_genesis)),
        Err(AuditError::HeadMismatch { .. })
    ));

    // Truncated while open: the handle notices, and refuses to append.
    let log = AuditLog::open(&path).unwrap();
    let full = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let cut = u64::try_from(short.len()).unwrap();
    file.set_len(cut).unwrap();
    match log.verify(None).unwrap_err() {
        AuditError::FileShrank { known, found, .. } => assert_eq!((known, found), (full, cut)),
        other => panic!("{other:?}"),
    }
    // And keeps refusing: a damaged file is not appended to again.
    match log.append(admin(6)).unwrap_err() {
        AuditError::Failed(reason) => assert!(reason.contains("shrank"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::metadata(&path).unwrap().len(), cut);
    drop(log);

    // Rewritten in place while open (same length): the file no longer ends
    // with the head the handle knows.
    let (_dir, path, heads) = small_log(3);
    let log = AuditLog::open(&path).unwrap();
    let mut l = lines(&path);
    let r2: AuditRecord = serde_json::from_slice(&l[1]).unwrap();
    // Same length: pad the operation of the forged record.
    let pad = l[2].len() - forge(3, r2.hash, "forged").len();
    let forged = forge(3, r2.hash, &format!("forged{}", "x".repeat(pad)));
    assert_eq!(forged.len(), l[2].len());
    l[2] = forged;
    std::fs::write(&path, join(&l)).unwrap();
    match log.verify(None).unwrap_err() {
        AuditError::ChangedOnDisk { in_memory, on_disk } => {
            assert_eq!(in_memory, heads[2]);
            assert_eq!(on_disk.seq, 3);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn tail_rewritten_while_closed_is_caught_by_the_kept_head() {
    let (_dir, path, heads) = small_log(3);
    let mut l = lines(&path);
    let r2: AuditRecord = serde_json::from_slice(&l[1]).unwrap();
    l[2] = forge(3, r2.hash, "forged");
    std::fs::write(&path, join(&l)).unwrap();
    let log = AuditLog::open(&path).unwrap();
    assert_ne!(log.head(), heads[2]);
    assert!(matches!(
        log.verify(Some(&heads[2])).unwrap_err(),
        AuditError::HeadMismatch { .. }
    ));
}

// ------------------------------------------------------- bounds and crashes

#[test]
fn a_huge_line_is_refused_without_reading_it_whole() {
    let (_dir, path, _) = small_log(1);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    let huge = vec![b'a'; 2 * 1024 * 1024];
    file.write_all(&huge).unwrap();
    file.write_all(b"\n").unwrap();
    drop(file);
    let err = verify_file(&path, None).unwrap_err();
    assert!(
        matches!(
            broken(&err),
            (2, 2, Problem::LineTooLong { max }) if *max == MAX_LINE_LEN
        ),
        "{err}"
    );
    // Opening refuses it too (the last line is not a record), naming it.
    let err = AuditLog::open(&path).unwrap_err();
    assert!(
        matches!(broken(&err), (2, 2, Problem::LineTooLong { .. })),
        "{err}"
    );
    // A line of exactly the maximum length is read (and is not a record).
    let mut at_max = vec![b'x'; MAX_LINE_LEN];
    at_max.push(b'\n');
    let err = verify_bytes(&at_max, None).unwrap_err();
    assert!(
        matches!(broken(&err), (1, 1, Problem::Unparseable(_))),
        "{err}"
    );
    let mut over = vec![b'x'; MAX_LINE_LEN + 1];
    over.push(b'\n');
    let err = verify_bytes(&over, None).unwrap_err();
    assert!(
        matches!(broken(&err), (1, 1, Problem::LineTooLong { .. })),
        "{err}"
    );
}

#[test]
fn an_unfinished_last_line_is_reported_then_recovered_on_open() {
    let (_dir, path, heads) = small_log(3);
    let next = forge(4, heads[2].hash, "interrupted");
    let torn = &next[..next.len() / 2];
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    file.write_all(torn).unwrap();
    drop(file);
    let err = verify_file(&path, None).unwrap_err();
    match broken(&err) {
        (4, 4, Problem::TornLine { bytes }) => {
            assert_eq!(*bytes, u64::try_from(torn.len()).unwrap());
        }
        other => panic!("{other:?}"),
    }
    let log = AuditLog::open(&path).unwrap();
    assert_eq!(
        log.recovered_tail_bytes(),
        u64::try_from(torn.len()).unwrap()
    );
    assert_eq!(log.head(), heads[2]);
    let h4 = log.append(admin(4)).unwrap();
    assert_eq!(h4.seq, 4);
    assert_eq!(log.verify(Some(&h4)).unwrap().records, 4);
}

#[test]
fn open_does_not_cut_a_tail_that_is_not_an_interrupted_record() {
    let (_dir, path, _) = small_log(2);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    file.write_all(b"not a record").unwrap();
    drop(file);
    let before = std::fs::read(&path).unwrap();
    let err = AuditLog::open(&path).unwrap_err();
    assert!(
        matches!(broken(&err), (3, 3, Problem::TornLine { .. })),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file is untouched"
    );

    // Nor one longer than a line can be, even if it starts like a record.
    let (_dir, path, _) = small_log(2);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    file.write_all(b"{\"seq\":3,").unwrap();
    file.write_all(&vec![b'a'; MAX_LINE_LEN]).unwrap();
    drop(file);
    let before = std::fs::read(&path).unwrap();
    let err = AuditLog::open(&path).unwrap_err();
    assert!(
        matches!(broken(&err), (3, 3, Problem::LineTooLong { .. })),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn open_names_the_first_broken_record_when_the_tail_is_bad() {
    let (_dir, path, _) = small_log(4);
    let mut l = lines(&path);
    let last = l.len() - 1;
    l[last][10] ^= 1;
    std::fs::write(&path, join(&l)).unwrap();
    let err = AuditLog::open(&path).unwrap_err();
    assert_eq!(err.broken_seq(), Some(4), "{err}");
}

#[test]
fn several_handles_append_to_one_chain() {
    // Two handles on one file lock it like two processes would (flock is
    // per open file description): the service and an administrator's command.
    let (_dir, path) = tmp();
    let service = Arc::new(AuditLog::open(&path).unwrap());
    let admin_cmd = AuditLog::open(&path).unwrap();
    assert_eq!(service.append(admin(1)).unwrap().seq, 1);
    assert_eq!(admin_cmd.append(admin(2)).unwrap().seq, 2);
    assert_eq!(admin_cmd.append(admin(3)).unwrap().seq, 3);
    // The service picks up the administrator's records and chains onto them.
    let h4 = service.append(system(4)).unwrap();
    assert_eq!(h4.seq, 4);
    assert_eq!(admin_cmd.verify(Some(&h4)).unwrap().records, 4);
    assert_eq!(admin_cmd.head(), h4);

    // Interleaved from threads through both handles.
    let other = Arc::new(AuditLog::open(&path).unwrap());
    let threads: Vec<_> = [Arc::clone(&service), other]
        .into_iter()
        .flat_map(|log| {
            (0..3).map(move |t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for i in 0..30 {
                        log.append(admin(t * 100 + i)).unwrap();
                    }
                })
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let report = service.verify(None).unwrap();
    assert_eq!(report.records, 4 + 6 * 30);
    assert_eq!(verify_file(&path, Some(&report.head)).unwrap(), report);
}

#[test]
fn records_another_handle_appended_must_chain() {
    let (_dir, path, _) = small_log(2);
    let log = AuditLog::open(&path).unwrap();
    // A line appended behind the handles' backs that does not chain.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    file.write_all(&forge(3, [0x42; 48], "forged")).unwrap();
    file.write_all(b"\n").unwrap();
    drop(file);
    let err = log.append(admin(3)).unwrap_err();
    assert!(
        matches!(broken(&err), (3, 3, Problem::PrevHashMismatch { .. })),
        "{err}"
    );
}

#[test]
fn an_unfinished_line_of_a_crashed_writer_is_removed_by_the_next_append() {
    let (_dir, path, heads) = small_log(2);
    let log = AuditLog::open(&path).unwrap();
    let next = forge(3, heads[1].hash, "interrupted");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    file.write_all(&next[..40]).unwrap();
    drop(file);
    let h3 = log.append(admin(3)).unwrap();
    assert_eq!(h3.seq, 3);
    assert_eq!(log.recovered_tail_bytes(), 40);
    assert_eq!(verify_file(&path, Some(&h3)).unwrap().records, 3);
}

#[test]
fn a_file_others_may_write_is_refused() {
    let (_dir, path) = tmp();
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert!(matches!(
        AuditLog::open(&path).unwrap_err(),
        AuditError::InsecureFile { .. }
    ));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    AuditLog::open(&path).unwrap();
}

// -------------------------------------------------------------- concurrency

#[test]
fn concurrent_appends_make_one_valid_chain() {
    let (_dir, path) = tmp();
    let log = Arc::new(AuditLog::open(&path).unwrap());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                (0..50u64)
                    .map(|i| log.append(admin(t * 1000 + i)).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut heads: Vec<AuditHead> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    heads.sort_by_key(|h| h.seq);
    assert_eq!(
        heads.iter().map(|h| h.seq).collect::<Vec<_>>(),
        (1..=400).collect::<Vec<_>>()
    );
    let report = log.verify(Some(heads.last().unwrap())).unwrap();
    assert_eq!(report.records, 400);
    // Every returned head is in the chain.
    let records = log.records(&AuditFilter::default()).unwrap();
    let by_seq: BTreeMap<u64, [u8; 48]> = records.iter().map(|r| (r.seq, r.hash)).collect();
    for h in &heads {
        assert_eq!(by_seq[&h.seq], h.hash);
    }
}

#[test]
fn verify_while_appending() {
    let (_dir, path) = tmp();
    let log = Arc::new(AuditLog::open(&path).unwrap());
    let writer = {
        let log = Arc::clone(&log);
        std::thread::spawn(move || {
            for i in 0..200 {
                log.append(system(i)).unwrap();
            }
        })
    };
    for _ in 0..20 {
        log.verify(None).unwrap();
    }
    writer.join().unwrap();
    assert_eq!(log.verify(None).unwrap().records, 200);
}

#[test]
fn a_symlinked_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.log");
    AuditLog::open(&real).unwrap().append(admin(1)).unwrap();
    let link = dir.path().join("audit.log");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    assert!(matches!(
        AuditLog::open(&link),
        Err(AuditError::Symlink { .. })
    ));
}
