//! Key policy: parsing and validation, and evaluation against attestation
//! documents from the simulated NSM, verified by the real verifier.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use attestation_verifier::audit::rfc3339_millis;
use attestation_verifier::policy::{
    KeyPolicy, MeasurementSet, Operation, PolicyError, PolicyMatch, RefusalRule, MAX_POLICY_LEN,
};
use kluis_attestation::{TrustAnchor, UnixMillis, VerifiedAttestation, Verifier, VerifyOptions};
use kluis_nsm::sim::{FixedClock, SimConfig, SimRoot, SimulatedNsm};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

const T0: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const SIGNER: &[u8] = b"DER of the image signing certificate";

// ---------------------------------------------------------------- enclaves

fn root() -> &'static (Arc<SimRoot>, Verifier) {
    static ROOT: OnceLock<(Arc<SimRoot>, Verifier)> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = Arc::new(SimRoot::generate_at(T0 - 86_400_000).unwrap());
        let verifier = Verifier::new(TrustAnchor::dangerous_from_der(root.root_der()).unwrap());
        (root, verifier)
    })
}

fn config(image: &[u8]) -> SimConfig {
    SimConfig::default()
        .with_module_id(format!(
            "i-0123456789abcdef0-enc{}",
            hex::encode(&image[..2])
        ))
        .with_image(image.to_vec(), Some(SIGNER.to_vec()))
}

fn v1() -> SimConfig {
    config(b"enclave image v1")
}

fn v2() -> SimConfig {
    config(b"enclave image v2")
}

/// Boots a simulated enclave at T0 and returns its verified attestation.
fn attest(config: SimConfig) -> VerifiedAttestation {
    let (root, verifier) = root();
    let clock = Arc::new(FixedClock::new(T0));
    let nsm = SimulatedNsm::new(config.with_clock(clock).with_root(root.clone())).unwrap();
    let doc = kluis_nsm::attest(&nsm, Some(b"request hash"), Some(&[9; 32]), None).unwrap();
    verifier
        .verify(&doc, &VerifyOptions::at(UnixMillis(T0)))
        .unwrap()
}

fn pcr(config: &SimConfig, index: usize) -> String {
    hex::encode(config.boot_pcr_values()[index])
}

fn image_set(name: &str, config: &SimConfig) -> String {
    format!(
        "[[measurements]]\nname = \"{name}\"\npcr0 = \"{}\"\npcr1 = \"{}\"\npcr2 = \"{}\"\n",
        pcr(config, 0),
        pcr(config, 1),
        pcr(config, 2)
    )
}

fn signer_set(name: &str) -> String {
    format!(
        "[[measurements]]\nname = \"{name}\"\npcr8 = \"{}\"\n",
        pcr(&v1(), 8)
    )
}

fn header(ops: &str, age: u64, allow_debug: bool) -> String {
    format!(
        "operations = [{ops}]\nmax_document_age_seconds = {age}\ndangerous_allow_debug = {allow_debug}\n"
    )
}

fn policy(text: &str) -> KeyPolicy {
    KeyPolicy::from_toml_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

// -------------------------------------------------------------- evaluation

enum Expect {
    Match(&'static str),
    Refuse(RefusalRule, String),
}

struct Case {
    name: &'static str,
    policy: String,
    enclave: SimConfig,
    op: Operation,
    now: u64,
    expect: Expect,
}

fn mismatch(set: &str, index: u8, expected: &str, found: &str) -> String {
    format!("set \"{set}\": PCR{index} expected {expected} found {found}")
}

fn no_match(module: &SimConfig, parts: &[String]) -> String {
    format!(
        "no measurement set matches module {}: {}",
        module.module_id,
        parts.join("; ")
    )
}

#[test]
fn evaluation_table() {
    let zeros = "00".repeat(48);
    let ops = "\"generate\", \"decrypt\"";
    let v1_policy = header(ops, 300, false) + &image_set("enclave-v1", &v1());
    let rollout = v1_policy.clone() + &image_set("enclave-v2", &v2());
    let debug_v1 = v1().with_debug(true);
    let with_role = format!("{}pcr3 = \"{}\"\n", v1_policy, hex::encode([7u8; 48]));

    let cases = vec![
        Case {
            name: "the pinned image matches",
            policy: v1_policy.clone(),
            enclave: v1(),
            op: Operation::Generate,
            now: T0 + 1_000,
            expect: Expect::Match("enclave-v1"),
        },
        Case {
            name: "wrong PCR0: another image",
            policy: v1_policy.clone(),
            enclave: v2(),
            op: Operation::Generate,
            now: T0,
            expect: Expect::Refuse(
                RefusalRule::MeasurementsNotAllowed,
                no_match(
                    &v2(),
                    &[mismatch("enclave-v1", 0, &pcr(&v1(), 0), &pcr(&v2(), 0))],
                ),
            ),
        },
        Case {
            name: "roll-out: the new image matches the second set",
            policy: rollout.clone(),
            enclave: v2(),
            op: Operation::Decrypt,
            now: T0,
            expect: Expect::Match("enclave-v2"),
        },
        Case {
            name: "roll-out: the old image still matches the first set",
            policy: rollout.clone(),
            enclave: v1(),
            op: Operation::Decrypt,
            now: T0,
            expect: Expect::Match("enclave-v1"),
        },
        Case {
            name: "roll-out: a third image matches neither, each set reported",
            policy: rollout.clone(),
            enclave: config(b"enclave image v3"),
            op: Operation::Decrypt,
            now: T0,
            expect: Expect::Refuse(
                RefusalRule::MeasurementsNotAllowed,
                no_match(
                    &config(b"enclave image v3"),
                    &[
                        mismatch(
                            "enclave-v1",
                            0,
                            &pcr(&v1(), 0),
                            &pcr(&config(b"enclave image v3"), 0),
                        ),
                        mismatch(
                            "enclave-v2",
                            0,
                            &pcr(&v2(), 0),
                            &pcr(&config(b"enclave image v3"), 0),
                        ),
                    ],
                ),
            ),
        },
        Case {
            name: "a pinned PCR3 (role) that differs",
            policy: with_role.clone(),
            enclave: v1(),
            op: Operation::Generate,
            now: T0,
            expect: Expect::Refuse(
                RefusalRule::MeasurementsNotAllowed,
                no_match(
                    &v1(),
                    &[mismatch("enclave-v1", 3, &hex::encode([7u8; 48]), &zeros)],
                ),
            ),
        },
        Case {
            name: "a pinned PCR3 (role) that matches",
            policy: with_role,
            enclave: v1().with_boot_pcr(3, [7u8; 48]),
            op: Operation::Generate,
            now: T0,
            expect: Expect::Match("enclave-v1"),
        },
        Case {
            name: "signer-pinned set matches any image of that signer",
            policy: header(ops, 300, false) + &signer_set("signed"),
            enclave: v2(),
            op: Operation::Generate,
            now: T0,
            expect: Expect::Match("signed"),
        },
        Case {
            name: "debug enclave refused by default",
            policy: header(ops, 300, false) + &signer_set("signed"),
            enclave: debug_v1.clone(),
            op: Operation::Generate,
            now: T0,
            expect: Expect::Refuse(
                RefusalRule::DebugEnclave,
                format!(
                    "module {} runs in debug mode (PCR0, PCR1 and PCR2 are zero) and the policy \
                     does not set dangerous_allow_debug",
                    debug_v1.module_id
                ),
            ),
        },
        Case {
            name: "debug enclave allowed with dangerous_allow_debug",
            policy: header(ops, 300, true) + &signer_set("signed-debug"),
            enclave: debug_v1.clone(),
            op: Operation::Generate,
            now: T0,
            expect: Expect::Match("signed-debug"),
        },
        Case {
            name: "dangerous_allow_debug does not let a debug enclave match an image set",
            policy: header(ops, 300, true) + &image_set("enclave-v1", &v1()),
            enclave: debug_v1.clone(),
            op: Operation::Generate,
            now: T0,
            expect: Expect::Refuse(
                RefusalRule::MeasurementsNotAllowed,
                no_match(
                    &debug_v1,
                    &[mismatch("enclave-v1", 0, &pcr(&v1(), 0), &zeros)],
                ),
            ),
        },
        Case {
            name: "stale document",
            policy: v1_policy.clone(),
            enclave: v1(),
            op: Operation::Generate,
            now: T0 + 300_001,
            expect: Expect::Refuse(
                RefusalRule::DocumentTooOld,
                format!(
                    "the document is 300001 ms old (timestamp {}, now {}); the policy allows \
                     at most 300 s",
                    rfc3339_millis(T0),
                    rfc3339_millis(T0 + 300_001)
                ),
            ),
        },
        Case {
            name: "exactly the maximum age is accepted",
            policy: v1_policy.clone(),
            enclave: v1(),
            op: Operation::Generate,
            now: T0 + 300_000,
            expect: Expect::Match("enclave-v1"),
        },
        Case {
            name: "a document dated beyond the clock skew allowance",
            policy: v1_policy.clone(),
            enclave: v1(),
            op: Operation::Generate,
            now: T0 - 60_001,
            expect: Expect::Refuse(
                RefusalRule::DocumentTooOld,
                format!(
                    "the document is dated 60001 ms after the verification time (timestamp {}, \
                     now {}); at most 60000 ms of clock skew is allowed",
                    rfc3339_millis(T0),
                    rfc3339_millis(T0 - 60_001)
                ),
            ),
        },
        Case {
            name: "a document dated within the clock skew allowance",
            policy: v1_policy.clone(),
            enclave: v1(),
            op: Operation::Generate,
            now: T0 - 60_000,
            expect: Expect::Match("enclave-v1"),
        },
        Case {
            name: "operation not allowed",
            policy: header("\"decrypt\"", 300, false) + &image_set("enclave-v1", &v1()),
            enclave: v1(),
            op: Operation::Generate,
            now: T0,
            expect: Expect::Refuse(
                RefusalRule::OperationNotAllowed,
                "operation generate is not allowed; the policy allows: decrypt".to_owned(),
            ),
        },
        Case {
            name: "derive-secret allowed when listed",
            policy: header("\"derive-secret\"", 300, false) + &image_set("enclave-v1", &v1()),
            enclave: v1(),
            op: Operation::DeriveSecret,
            now: T0,
            expect: Expect::Match("enclave-v1"),
        },
        Case {
            name: "empty operations allow nothing",
            policy: header("", 300, false) + &image_set("enclave-v1", &v1()),
            enclave: v1(),
            op: Operation::Decrypt,
            now: T0,
            expect: Expect::Refuse(
                RefusalRule::OperationNotAllowed,
                "operation decrypt is not allowed; the policy allows: none".to_owned(),
            ),
        },
        Case {
            name: "no measurement sets allow nothing",
            policy: header(ops, 300, false) + "measurements = []\n",
            enclave: v1(),
            op: Operation::Decrypt,
            now: T0,
            expect: Expect::Refuse(
                RefusalRule::MeasurementsNotAllowed,
                "the policy has no measurement sets, so no enclave may use the key".to_owned(),
            ),
        },
        Case {
            name: "order: the operation is checked before debug mode",
            policy: header("\"decrypt\"", 300, false) + &signer_set("signed"),
            enclave: debug_v1.clone(),
            op: Operation::Generate,
            now: T0 + 3_600_000,
            expect: Expect::Refuse(
                RefusalRule::OperationNotAllowed,
                "operation generate is not allowed; the policy allows: decrypt".to_owned(),
            ),
        },
        Case {
            name: "order: debug mode is checked before age",
            policy: header(ops, 300, false) + &signer_set("signed"),
            enclave: debug_v1.clone(),
            op: Operation::Generate,
            now: T0 + 3_600_000,
            expect: Expect::Refuse(
                RefusalRule::DebugEnclave,
                format!(
                    "module {} runs in debug mode (PCR0, PCR1 and PCR2 are zero) and the policy \
                     does not set dangerous_allow_debug",
                    debug_v1.module_id
                ),
            ),
        },
        Case {
            name: "order: age is checked before measurements",
            policy: v1_policy,
            enclave: v2(),
            op: Operation::Generate,
            now: T0 + 3_600_000,
            expect: Expect::Refuse(
                RefusalRule::DocumentTooOld,
                format!(
                    "the document is 3600000 ms old (timestamp {}, now {}); the policy allows \
                     at most 300 s",
                    rfc3339_millis(T0),
                    rfc3339_millis(T0 + 3_600_000)
                ),
            ),
        },
    ];

    for case in cases {
        let policy = policy(&case.policy);
        let attestation = attest(case.enclave);
        let got = policy.evaluate(&attestation, case.op, UnixMillis(case.now));
        match (&case.expect, got) {
            (Expect::Match(set), Ok(m)) => assert_eq!(
                m,
                PolicyMatch {
                    set_name: (*set).to_owned()
                },
                "{}",
                case.name
            ),
            (Expect::Refuse(rule, detail), Err(refusal)) => {
                assert_eq!(refusal.rule, *rule, "{}: {}", case.name, refusal.detail);
                assert_eq!(&refusal.detail, detail, "{}", case.name);
                assert_eq!(
                    refusal.to_string(),
                    format!("policy refused ({}): {detail}", rule.as_str()),
                    "{}",
                    case.name
                );
            }
            (Expect::Match(set), Err(refusal)) => {
                panic!(
                    "{}: expected a match with {set}, refused: {refusal}",
                    case.name
                )
            }
            (Expect::Refuse(rule, _), Ok(m)) => panic!(
                "{}: expected a {} refusal, matched {}",
                case.name,
                rule.as_str(),
                m.set_name
            ),
        }
    }
}

#[test]
fn missing_policy_refuses() {
    let refusal = KeyPolicy::evaluate_missing();
    assert_eq!(refusal.rule, RefusalRule::NoPolicy);
    assert_eq!(refusal.rule.as_str(), "no_policy");
    assert_eq!(
        refusal.detail,
        "the key has no policy, so no enclave may use it"
    );
    let attestation = attest(v1());
    let refusal =
        KeyPolicy::evaluate_optional(None, &attestation, Operation::Generate, UnixMillis(T0))
            .unwrap_err();
    assert_eq!(refusal, KeyPolicy::evaluate_missing());
}

#[test]
fn refusal_rule_names_are_stable() {
    let names = [
        (RefusalRule::NoPolicy, "no_policy"),
        (RefusalRule::OperationNotAllowed, "operation_not_allowed"),
        (RefusalRule::DebugEnclave, "debug_enclave"),
        (RefusalRule::DocumentTooOld, "document_too_old"),
        (
            RefusalRule::MeasurementsNotAllowed,
            "measurements_not_allowed",
        ),
    ];
    for (rule, name) in names {
        assert_eq!(rule.as_str(), name);
        assert_eq!(rule.to_string(), name);
    }
    for (op, name) in [
        (Operation::Generate, "generate"),
        (Operation::Decrypt, "decrypt"),
        (Operation::DeriveSecret, "derive-secret"),
    ] {
        assert_eq!(op.as_str(), name);
        assert_eq!(serde_json::to_string(&op).unwrap(), format!("\"{name}\""));
    }
}

// -------------------------------------------------------------- validation

#[test]
fn validation_table() {
    let good_pcr = pcr(&v1(), 0);
    let ops = "operations = [\"generate\"]\n";
    let age = "max_document_age_seconds = 300\n";
    let set = |body: &str| format!("{ops}{age}[[measurements]]\nname = \"s\"\n{body}");
    let zeros = "00".repeat(48);

    // (case, policy text, error kind, a fragment of the message)
    let cases: Vec<(&str, String, &str, String)> = vec![
        (
            "unknown top-level field",
            format!("{ops}{age}allow_debug = true\nmeasurements = []\n"),
            "syntax",
            "unknown field `allow_debug`".to_owned(),
        ),
        (
            "unknown field in a set",
            set(&format!("pcr0 = \"{good_pcr}\"\npcr5 = \"{good_pcr}\"\n")),
            "syntax",
            "unknown field `pcr5`".to_owned(),
        ),
        (
            "unknown operation",
            format!("operations = [\"encrypt\"]\n{age}measurements = []\n"),
            "syntax",
            "unknown variant `encrypt`".to_owned(),
        ),
        (
            "missing max_document_age_seconds",
            format!("{ops}measurements = []\n"),
            "syntax",
            "missing field `max_document_age_seconds`".to_owned(),
        ),
        (
            "missing measurements",
            format!("{ops}{age}"),
            "syntax",
            "missing field `measurements`".to_owned(),
        ),
        (
            "missing operations",
            format!("{age}measurements = []\n"),
            "syntax",
            "missing field `operations`".to_owned(),
        ),
        (
            "negative age",
            format!("{ops}max_document_age_seconds = -1\nmeasurements = []\n"),
            "syntax",
            "max_document_age_seconds".to_owned(),
        ),
        (
            "bad hex",
            set(&format!("pcr0 = \"zz{}\"\n", &good_pcr[2..])),
            "bad_hex",
            "set \"s\": pcr0 is not hexadecimal (Invalid character 'z' at position 0)".to_owned(),
        ),
        (
            "odd number of hex digits",
            set(&format!("pcr0 = \"{}\"\n", &good_pcr[1..])),
            "bad_hex",
            "set \"s\": pcr0 is not hexadecimal (Odd number of digits)".to_owned(),
        ),
        (
            "47-byte PCR",
            set(&format!("pcr0 = \"{}\"\n", &good_pcr[2..])),
            "bad_pcr_length",
            "set \"s\": pcr0 is 47 bytes, a PCR is 48 bytes (SHA-384, 96 hex digits)".to_owned(),
        ),
        (
            "32-byte PCR8",
            set(&format!("pcr8 = \"{}\"\n", "ab".repeat(32))),
            "bad_pcr_length",
            "set \"s\": pcr8 is 32 bytes".to_owned(),
        ),
        (
            "a set pinning neither PCR0 nor PCR8",
            set(&format!("pcr1 = \"{good_pcr}\"\npcr2 = \"{good_pcr}\"\n")),
            "pins_no_image",
            "set \"s\" pins neither PCR0 nor PCR8 (neither is set); it would admit any enclave image"
                .to_owned(),
        ),
        (
            "a set pinning nothing",
            set(""),
            "pins_no_image",
            "(neither is set)".to_owned(),
        ),
        (
            "PCR0 of zeros without dangerous_allow_debug",
            set(&format!("pcr0 = \"{zeros}\"\n")),
            "pins_no_image",
            "its PCR0 is all zeros, which only debug enclaves report, and dangerous_allow_debug is false"
                .to_owned(),
        ),
        (
            "PCR8 of zeros",
            format!(
                "{ops}{age}dangerous_allow_debug = true\n[[measurements]]\nname = \"s\"\npcr8 = \"{zeros}\"\n"
            ),
            "pins_no_image",
            "its PCR8 is all zeros, which every unsigned image reports".to_owned(),
        ),
        (
            "zero max age",
            format!("{ops}max_document_age_seconds = 0\nmeasurements = []\n"),
            "max_age_out_of_range",
            "max_document_age_seconds is 0, it must be 1..=3600".to_owned(),
        ),
        (
            "max age over an hour",
            format!("{ops}max_document_age_seconds = 3601\nmeasurements = []\n"),
            "max_age_out_of_range",
            "max_document_age_seconds is 3601, it must be 1..=3600".to_owned(),
        ),
        (
            "duplicate operation",
            format!("operations = [\"decrypt\", \"decrypt\"]\n{age}measurements = []\n"),
            "duplicate_operation",
            "operation decrypt is listed more than once".to_owned(),
        ),
        (
            "duplicate set name",
            format!(
                "{ops}{age}[[measurements]]\nname = \"s\"\npcr0 = \"{good_pcr}\"\n\
                 [[measurements]]\nname = \"s\"\npcr8 = \"{good_pcr}\"\n"
            ),
            "duplicate_set_name",
            "two measurement sets are named \"s\"".to_owned(),
        ),
        (
            "empty set name",
            format!("{ops}{age}[[measurements]]\nname = \"\"\npcr0 = \"{good_pcr}\"\n"),
            "bad_set_name",
            "measurement set #1 has an invalid name: it is empty".to_owned(),
        ),
        (
            "set name with a control character",
            format!("{ops}{age}[[measurements]]\nname = \"a\\nb\"\npcr0 = \"{good_pcr}\"\n"),
            "bad_set_name",
            "it contains control characters".to_owned(),
        ),
        (
            "too many sets",
            format!(
                "{ops}{age}{}",
                (0..17)
                    .map(|i| format!("[[measurements]]\nname = \"s{i}\"\npcr0 = \"{good_pcr}\"\n"))
                    .collect::<String>()
            ),
            "too_many_sets",
            "the policy lists 17 measurement sets, at most 16 are allowed".to_owned(),
        ),
        (
            "too large",
            format!("{ops}{age}measurements = []\n#{}\n", "x".repeat(MAX_POLICY_LEN)),
            "too_large",
            format!("at most {MAX_POLICY_LEN} are allowed"),
        ),
    ];
    for (name, text, kind, fragment) in cases {
        let err = KeyPolicy::from_toml_str(&text).unwrap_err();
        assert_eq!(err.kind(), kind, "{name}: {err}");
        assert!(
            err.to_string().contains(&fragment),
            "{name}: {err:?} does not mention {fragment:?}"
        );
    }
}

#[test]
fn validation_accepts_edges() {
    let good_pcr = pcr(&v1(), 0);
    let zeros = "00".repeat(48);
    for text in [
        // Bounds of the age.
        "operations = []\nmax_document_age_seconds = 1\nmeasurements = []\n".to_owned(),
        "operations = []\nmax_document_age_seconds = 3600\nmeasurements = []\n".to_owned(),
        // Upper-case hex.
        format!(
            "operations = [\"generate\"]\nmax_document_age_seconds = 60\n\
             [[measurements]]\nname = \"s\"\npcr0 = \"{}\"\n",
            good_pcr.to_uppercase()
        ),
        // PCR0 of zeros counts with dangerous_allow_debug.
        format!(
            "operations = [\"generate\"]\nmax_document_age_seconds = 60\ndangerous_allow_debug = true\n\
             [[measurements]]\nname = \"any debug enclave\"\npcr0 = \"{zeros}\"\n"
        ),
        // PCR8 of zeros is fine beside a real PCR0.
        format!(
            "operations = [\"generate\"]\nmax_document_age_seconds = 60\n\
             [[measurements]]\nname = \"s\"\npcr0 = \"{good_pcr}\"\npcr8 = \"{zeros}\"\n"
        ),
    ] {
        let policy = KeyPolicy::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        policy.validate().unwrap();
    }
    let upper = policy(&format!(
        "operations = [\"generate\"]\nmax_document_age_seconds = 60\n\
         [[measurements]]\nname = \"s\"\npcr0 = \"{}\"\n",
        good_pcr.to_uppercase()
    ));
    assert_eq!(
        upper.measurements()[0].pcr0.map(hex::encode),
        Some(good_pcr)
    );
}

#[test]
fn json_is_parsed_as_strictly_as_toml() {
    let good_pcr = pcr(&v1(), 0);
    let ok = format!(
        r#"{{"operations":["decrypt"],"max_document_age_seconds":120,
            "measurements":[{{"name":"v1","pcr0":"{good_pcr}"}}]}}"#
    );
    let p = KeyPolicy::from_json_str(&ok).unwrap();
    assert_eq!(p.operations(), &[Operation::Decrypt]);
    assert_eq!(p.max_document_age_seconds(), 120);
    assert!(!p.dangerous_allow_debug());

    let unknown = ok.replace("\"operations\"", "\"debug\":true,\"operations\"");
    let err = KeyPolicy::from_json_str(&unknown).unwrap_err();
    assert_eq!(err.kind(), "syntax");
    assert!(err.to_string().contains("unknown field `debug`"), "{err}");

    let short = ok.replace(&good_pcr, &good_pcr[2..]);
    assert_eq!(
        KeyPolicy::from_json_str(&short).unwrap_err().kind(),
        "bad_pcr_length"
    );
}

#[test]
fn any_deserialiser_validates_and_serialisation_round_trips() {
    let text = header("\"generate\", \"derive-secret\"", 90, false)
        + &image_set("enclave-v1", &v1())
        + &signer_set("signed");
    let p = policy(&text);
    // Through serde directly (as when a policy is embedded in another record).
    let direct: KeyPolicy = toml::from_str(&text).unwrap();
    assert_eq!(direct, p);
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(serde_json::from_str::<KeyPolicy>(&json).unwrap(), p);
    let toml_text = toml::to_string(&p).unwrap();
    assert_eq!(KeyPolicy::from_toml_str(&toml_text).unwrap(), p);
    // An invalid policy does not deserialise by any route.
    let bad = text.replace(
        "max_document_age_seconds = 90",
        "max_document_age_seconds = 0",
    );
    assert!(toml::from_str::<KeyPolicy>(&bad).is_err());
}

#[test]
fn programmatic_policies_are_validated() {
    let mut set = MeasurementSet::new("v1");
    set.pcr1 = Some([1; 48]);
    let err = KeyPolicy::new(vec![Operation::Generate], 60, false, vec![set.clone()]).unwrap_err();
    assert!(matches!(err, PolicyError::PinsNoImage { .. }), "{err}");
    set.pcr0 = Some([2; 48]);
    let p = KeyPolicy::new(vec![Operation::Generate], 60, false, vec![set]).unwrap();
    assert_eq!(p.measurements()[0].pcr(0), Some(&[2; 48]));
    assert_eq!(p.measurements()[0].pcr(5), None);
}

// ---------------------------------------------------------------- examples

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

#[test]
fn example_policies_parse() {
    let toml_policy = KeyPolicy::from_file(&example("policy.toml")).unwrap();
    assert_eq!(
        toml_policy.operations(),
        &[Operation::Generate, Operation::Decrypt]
    );
    assert_eq!(toml_policy.max_document_age_seconds(), 300);
    assert!(!toml_policy.dangerous_allow_debug());
    let names: Vec<_> = toml_policy
        .measurements()
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["enclave-v1", "enclave-v2"]);
    assert!(toml_policy.measurements()[0].pcr8.is_some());

    let json_policy = KeyPolicy::from_file(&example("policy.json")).unwrap();
    assert_eq!(json_policy, toml_policy, "the two examples say the same");

    let debug = KeyPolicy::from_file(&example("policy-debug.toml")).unwrap();
    assert!(debug.dangerous_allow_debug());
}

#[test]
fn policy_files_need_a_known_extension_and_a_bounded_size() {
    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("policy.txt");
    std::fs::write(&txt, "operations = []").unwrap();
    assert_eq!(
        KeyPolicy::from_file(&txt).unwrap_err().kind(),
        "unknown_format"
    );
    let big = dir.path().join("big.toml");
    std::fs::write(&big, vec![b'#'; MAX_POLICY_LEN + 10]).unwrap();
    let err = KeyPolicy::from_file(&big).unwrap_err();
    assert_eq!(err.kind(), "too_large");
    // The file's size, not what a bounded read took.
    assert!(
        err.to_string()
            .contains(&format!("is {} bytes long", MAX_POLICY_LEN + 10)),
        "{err}"
    );
    let missing = dir.path().join("missing.json");
    assert_eq!(KeyPolicy::from_file(&missing).unwrap_err().kind(), "io");
}
