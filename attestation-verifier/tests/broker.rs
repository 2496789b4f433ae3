//! The key broker end to end, with documents from the simulated NSM: the
//! policy matrix (each refusal with its precise reason in the audit log),
//! lifecycle through release, and the service over loopback TCP.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use attestation_verifier::audit::{Actor, AuditFilter, AuditLog, Decision};
use attestation_verifier::broker::Broker;
use attestation_verifier::keys::{KeyName, WrappedDataKey};
use attestation_verifier::kms::StoredPolicy;
use attestation_verifier::service::{self, ServiceConfig};
use kluis_nsm::sim::{FixedClock, SimConfig, SimRoot, SimulatedNsm};
use kluis_proto::{
    open_keys_for_request, request_hash, EphemeralKeyPair, ErrorCode, KeyOperation, KeyRequest,
    Request, Response, VerifierIdentity,
};
use kluis_testkit::{Backend, BrokerWorld as World, T0};
use std::sync::Arc;

const KEY: &str = "agency-a/app-x/prod";

fn policy_toml(pcr0_sets: &[[u8; 48]], extra: &str) -> String {
    let mut s = format!(
        "operations = [\"generate\", \"decrypt\"]\nmax_document_age_seconds = 120\n{extra}\n"
    );
    for (i, pcr0) in pcr0_sets.iter().enumerate() {
        s.push_str(&format!(
            "[[measurements]]\nname = \"set-{i}\"\npcr0 = \"{}\"\n",
            hex::encode(pcr0)
        ));
    }
    s
}

fn image_pcr0(image: &[u8]) -> [u8; 48] {
    kluis_testkit::image_pcrs(image)[0]
}

/// Runs `test` on both backends (the token one is skipped, loudly, when
/// SoftHSM2 is not installed and not required).
fn on_both_backends(test: fn(Backend)) {
    test(Backend::Store);
    test(Backend::Token);
}

/// The broker under test: key [`KEY`], unauthenticated refusals summarised
/// one by one (so each is visible).
fn world_builder() -> kluis_testkit::Builder {
    World::builder(T0)
        .key(KEY)
        .noise_summary_interval(std::time::Duration::ZERO)
}

fn new_world() -> World {
    world_builder().build()
}

/// As the service runs: changes audited first, the anchor kept.
fn bound_world() -> World {
    world_builder().audit_first().build()
}

/// The world with its keys in `backend`; `None` when that is a token and
/// SoftHSM2 is absent.
fn world_on(backend: Backend) -> Option<World> {
    world_builder().build_on(backend)
}

fn generate() -> Vec<KeyOperation> {
    vec![KeyOperation::GenerateDataKey {
        key_id: KEY.to_owned(),
    }]
}

fn last_refusal_reason(world: &World) -> String {
    let records = world
        .broker
        .audit()
        .records(&AuditFilter {
            decision: Some(Decision::Refused),
            ..AuditFilter::default()
        })
        .unwrap();
    // Unauthenticated refusals (bad documents, stale nonces) come in
    // summaries; with a zero interval, one per refusal, naming it first.
    records
        .last()
        .and_then(|r| {
            let reason = r.reason.clone()?;
            if r.operation == "key.release.unauthenticated" {
                reason
                    .split_once("first: ")
                    .map(|(_, first)| first.to_owned())
            } else {
                Some(reason)
            }
        })
        .unwrap_or_default()
}

#[test]
fn release_round_trip_generate_then_decrypt() {
    on_both_backends(release_round_trip_on);
}

fn release_round_trip_on(backend: Backend) {
    let Some(world) = world_on(backend) else {
        return;
    };
    world.set_policy(KEY, &policy_toml(&[image_pcr0(b"v1")], ""));
    let nsm = world.nsm(b"v1", false, T0);
    let nonce = world.challenge(T0);
    let a = world.attempt(&nsm, Some(nonce), generate(), T0 + 1_000, false);
    let Response::KeyRelease(sealed) = &a.response else {
        panic!("{:?}", a.response)
    };
    // With the identity in a token, answers are signed by a release key it
    // certified (one token signature an hour), audited when made.
    assert_eq!(sealed.delegation.is_some(), backend == Backend::Token);
    let keys = open_keys_for_request(
        sealed,
        &a.ephemeral,
        &world.pinned,
        &kluis_attestation::sha384(&a.document),
        &a.request,
    )
    .unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].version, 1);
    let delegations = world
        .broker
        .audit()
        .records(&AuditFilter::default())
        .unwrap()
        .iter()
        .filter(|r| r.operation == "identity.delegate")
        .count();
    assert_eq!(delegations, usize::from(backend == Backend::Token));
    let wrapped = WrappedDataKey::from_bytes(&keys[0].wrapped).unwrap();
    assert_eq!(wrapped.key.as_str(), KEY);

    // The same data key comes back through DecryptDataKey.
    let nonce = world.challenge(T0 + 2_000);
    let b = world.attempt(
        &nsm,
        Some(nonce),
        vec![KeyOperation::DecryptDataKey {
            wrapped: keys[0].wrapped.clone(),
        }],
        T0 + 3_000,
        false,
    );
    let Response::KeyRelease(sealed) = &b.response else {
        panic!("{:?}", b.response)
    };
    let again = open_keys_for_request(
        sealed,
        &b.ephemeral,
        &world.pinned,
        &kluis_attestation::sha384(&b.document),
        &b.request,
    )
    .unwrap();
    assert_eq!(
        again[0].plaintext.expose_secret(),
        keys[0].plaintext.expose_secret()
    );

    // Both releases are in the audit log with the enclave and its document.
    let allowed = world
        .broker
        .audit()
        .records(&AuditFilter {
            decision: Some(Decision::Allowed),
            ..AuditFilter::default()
        })
        .unwrap()
        .into_iter()
        .filter(|r| r.operation.starts_with("key.release"))
        .collect::<Vec<_>>();
    assert_eq!(allowed.len(), 2);
    assert!(allowed
        .iter()
        .all(|r| r.attestation_document.is_some() && r.key_id.as_deref() == Some(KEY)));
    world.broker.audit().verify(None).unwrap();
}

#[test]
fn a_parent_pinning_its_own_key_cannot_read_the_answer_and_a_wrong_pin_fails() {
    let world = new_world();
    world.set_policy(KEY, &policy_toml(&[image_pcr0(b"v1")], ""));
    let nsm = world.nsm(b"v1", false, T0);
    let nonce = world.challenge(T0);
    let a = world.attempt(&nsm, Some(nonce), generate(), T0 + 1_000, false);
    let Response::KeyRelease(sealed) = &a.response else {
        panic!()
    };
    let impostor = VerifierIdentity::generate().unwrap().public_key_sec1();
    let err = open_keys_for_request(
        sealed,
        &a.ephemeral,
        &impostor,
        &kluis_attestation::sha384(&a.document),
        &a.request,
    )
    .unwrap_err();
    assert!(format!("{err:?}").contains("BadSignature"), "{err:?}");
    // Another session's ephemeral key cannot open it either.
    let other = EphemeralKeyPair::generate().unwrap();
    assert!(open_keys_for_request(
        sealed,
        &other,
        &world.pinned,
        &kluis_attestation::sha384(&a.document),
        &a.request
    )
    .is_err());
}

/// The policy matrix: each case is refused with a coarse code, and the audit
/// log names the precise rule.
#[test]
fn policy_matrix() {
    on_both_backends(policy_matrix_on);
}

fn policy_matrix_on(backend: Backend) {
    struct Case {
        name: &'static str,
        image: &'static [u8],
        debug: bool,
        doc_time: u64,
        now: u64,
        nonce: NonceChoice,
        policy: Option<String>,
        tamper_hash: bool,
        expect: Result<(), &'static str>,
    }
    enum NonceChoice {
        Fresh,
        Wrong,
        Reused,
        Expired,
    }
    let v1 = image_pcr0(b"v1");
    let v2 = image_pcr0(b"v2");
    let base = || Case {
        name: "",
        image: b"v1",
        debug: false,
        doc_time: T0,
        now: T0 + 1_000,
        nonce: NonceChoice::Fresh,
        policy: Some(policy_toml(&[v1], "")),
        tamper_hash: false,
        expect: Ok(()),
    };
    let cases = vec![
        Case {
            name: "admitted enclave",
            ..base()
        },
        Case {
            name: "wrong PCR0",
            image: b"v3",
            expect: Err("measurements_not_allowed"),
            ..base()
        },
        Case {
            name: "second allowed set (roll-out)",
            image: b"v2",
            policy: Some(policy_toml(&[v1, v2], "")),
            ..base()
        },
        Case {
            name: "debug enclave",
            debug: true,
            expect: Err("debug_enclave"),
            ..base()
        },
        Case {
            name: "debug enclave explicitly allowed",
            debug: true,
            policy: Some(policy_toml(&[[0u8; 48]], "dangerous_allow_debug = true")),
            ..base()
        },
        Case {
            name: "stale document (policy max age 30 s)",
            now: T0 + 45_000,
            policy: Some(policy_toml(&[v1], "").replace("= 120", "= 30")),
            expect: Err("document_too_old"),
            ..base()
        },
        Case {
            name: "stale document (service max age 300 s)",
            now: T0 + 301_000,
            expect: Err("attestation_rejected: document_too_old"),
            ..base()
        },
        Case {
            name: "wrong nonce",
            nonce: NonceChoice::Wrong,
            expect: Err("nonce_unknown"),
            ..base()
        },
        Case {
            name: "reused nonce",
            nonce: NonceChoice::Reused,
            expect: Err("nonce_reused"),
            ..base()
        },
        Case {
            name: "expired nonce",
            nonce: NonceChoice::Expired,
            now: T0 + 61_000,
            expect: Err("nonce_expired"),
            ..base()
        },
        Case {
            name: "missing policy",
            policy: None,
            expect: Err("no_policy"),
            ..base()
        },
        Case {
            name: "request does not match its hash",
            tamper_hash: true,
            expect: Err("request_hash_mismatch"),
            ..base()
        },
    ];
    let mut failures = Vec::new();
    for case in cases {
        let Some(world) = world_on(backend) else {
            return;
        };
        if let Some(p) = &case.policy {
            world.set_policy(KEY, p);
        }
        let nsm = world.nsm(case.image, case.debug, case.doc_time);
        let nonce = match case.nonce {
            NonceChoice::Fresh => Some(world.challenge(case.doc_time)),
            NonceChoice::Wrong => Some([0xee; 32]),
            NonceChoice::Expired => Some(world.challenge(case.doc_time)),
            NonceChoice::Reused => {
                let n = world.challenge(case.doc_time);
                let first = world.attempt(&nsm, Some(n), generate(), case.now, false);
                assert!(
                    matches!(first.response, Response::KeyRelease(_)),
                    "{}: first use must succeed",
                    case.name
                );
                Some(n)
            }
        };
        let a = world.attempt(&nsm, nonce, generate(), case.now, case.tamper_hash);
        let outcome = match (&a.response, case.expect) {
            (Response::KeyRelease(_), Ok(())) => Ok(()),
            (Response::Error { code }, Err(rule)) => {
                let reason = last_refusal_reason(&world);
                if *code != ErrorCode::Denied {
                    Err(format!("code {code:?}, reason {reason}"))
                } else if reason.starts_with(rule) {
                    Ok(())
                } else {
                    Err(format!("audit reason {reason:?}"))
                }
            }
            (other, expect) => Err(format!("expected {expect:?}, got {other:?}")),
        };
        if let Err(e) = outcome {
            failures.push(format!("{}: {e}", case.name));
        }
        world.broker.audit().verify(None).unwrap();
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A release is re-checked once its allowed records are written: a change
/// to what it was decided on (the key's state, its policy, a change still
/// under way) withdraws it; a rotation does not.
#[test]
fn a_change_made_while_a_release_was_decided_withdraws_it() {
    let world = new_world();
    world.set_policy(KEY, &policy_toml(&[image_pcr0(b"v1")], ""));
    let kms = world.broker.kms();
    let name = KeyName::parse(KEY).unwrap();
    let digest =
        attestation_verifier::kms::policy_sha256(&kms.policy(&name).unwrap().unwrap().text);
    let withdrawn = |decrypted| {
        kms.release_withdrawn(&name, decrypted, &digest, None)
            .unwrap()
    };
    assert_eq!(withdrawn(None), None);
    assert_eq!(withdrawn(Some(1)), None);
    assert!(
        withdrawn(Some(9)).is_some(),
        "a version the key does not have"
    );

    // A change begun (its intent and record written, the change not yet in
    // force) withdraws a release of its key; a rotation under way does not.
    // An intent names the digest of the record it changes, as it was.
    // A leftover intent of a change already in force (the record is no
    // longer as the intent saw it) withdraws nothing: the record speaks.
    world.pending_change(KEY, "key.disable", Some(&"0".repeat(64)));
    assert_eq!(withdrawn(None), None);
    world.pending_change(KEY, "key.disable", None);
    let why = withdrawn(None).unwrap();
    assert!(why.contains("key.disable"), "{why}");
    // Through the broker: the release is decided (the key is still enabled),
    // recorded as allowed, then withdrawn; no key is sent.
    let nsm = world.nsm(b"v1", false, T0);
    let n = world.challenge(T0);
    let a = world.attempt(&nsm, Some(n), generate(), T0 + 1_000, false);
    assert!(
        matches!(
            a.response,
            Response::Error {
                code: ErrorCode::Denied
            }
        ),
        "{:?}",
        a.response
    );
    let reason = last_refusal_reason(&world);
    assert!(reason.starts_with("changed_during_release"), "{reason}");
    let records = world
        .broker
        .audit()
        .records(&AuditFilter::default())
        .unwrap();
    let [.., allowed, withdrawal] = records.as_slice() else {
        panic!("{records:?}")
    };
    assert_eq!(
        (allowed.operation.as_str(), allowed.decision),
        ("key.release.generate", Decision::Allowed)
    );
    assert_eq!(withdrawal.decision, Decision::Refused);
    world.pending_change(KEY, "key.rotate", None);
    assert_eq!(withdrawn(None), None);
    {
        let guard = kms.lock().unwrap();
        kms.store().delete(&guard, "system", "intent").unwrap();
    }

    let n = world.challenge(T0);
    let a = world.attempt(&nsm, Some(n), generate(), T0 + 2_000, false);
    assert!(
        matches!(a.response, Response::KeyRelease(_)),
        "{:?}",
        a.response
    );

    // The change in force.
    kms.disable_key(&name).unwrap();
    assert!(withdrawn(None).unwrap().contains("disabled"));
    kms.enable_key(&name).unwrap();
    assert_eq!(withdrawn(None), None);
    world.set_policy(KEY, &policy_toml(&[image_pcr0(b"v2")], ""));
    assert!(withdrawn(None).unwrap().contains("policy changed"));
}

#[test]
fn key_lifecycle_through_release() {
    on_both_backends(key_lifecycle_through_release_on);
}

fn key_lifecycle_through_release_on(backend: Backend) {
    let Some(world) = world_on(backend) else {
        return;
    };
    world.set_policy(KEY, &policy_toml(&[image_pcr0(b"v1")], ""));
    let nsm = world.nsm(b"v1", false, T0);
    let kms = world.broker.kms();
    let name = KeyName::parse(KEY).unwrap();

    // Wrap under v1, rotate, wrap under v2; both unwrap; rewrap moves v1 to v2.
    let (k1, w1) = kms.generate_data_key(&name, T0).unwrap();
    assert_eq!(kms.rotate_key(&name, T0 + 1).unwrap(), 2);
    let (_, w2) = kms.generate_data_key(&name, T0 + 2).unwrap();
    assert_eq!((w1.version, w2.version), (1, 2));
    assert_eq!(
        kms.decrypt_data_key(&w1).unwrap().expose_secret(),
        k1.expose_secret()
    );
    let moved = kms.rewrap(&w1).unwrap();
    assert_eq!(moved.version, 2);
    assert_eq!(
        kms.decrypt_data_key(&moved).unwrap().expose_secret(),
        k1.expose_secret()
    );

    // Automatic rotation when used after the period.
    let year = 365 * 86_400_000;
    let (_, w3) = kms.generate_data_key(&name, T0 + year + 10).unwrap();
    assert_eq!(w3.version, 3);

    // Disabled: no release; enabled again: release.
    kms.disable_key(&name).unwrap();
    let n = world.challenge(T0);
    let a = world.attempt(&nsm, Some(n), generate(), T0 + 1_000, false);
    assert!(matches!(
        a.response,
        Response::Error {
            code: ErrorCode::Denied
        }
    ));
    assert!(
        last_refusal_reason(&world).starts_with("key_unusable"),
        "{}",
        last_refusal_reason(&world)
    );
    kms.enable_key(&name).unwrap();

    // Shredding: after the waiting period, nothing under the key can be read.
    let after = kms.schedule_deletion(&name, 7, T0).unwrap();
    assert!(
        kms.destroy_key(&name, after - 1).is_err(),
        "waiting period enforced"
    );
    let material: Vec<String> = kms
        .key(&name)
        .unwrap()
        .versions
        .iter()
        .map(|v| v.material_id.clone())
        .collect();
    assert_eq!(material.len(), 3);
    if let Some(token) = kms.token() {
        for id in &material {
            assert_eq!(token.inspect(id.as_bytes()).unwrap().len(), 1, "{id}");
        }
    }
    kms.destroy_key(&name, after).unwrap();
    // In the token, the objects of every version are gone.
    if let Some(token) = kms.token() {
        for id in &material {
            assert!(token.inspect(id.as_bytes()).unwrap().is_empty(), "{id}");
        }
    }
    let err = kms.decrypt_data_key(&w1).unwrap_err().to_string();
    assert!(err.contains("destroyed") && err.contains(KEY), "{err}");
    let n = world.challenge(T0);
    let b = world.attempt(
        &nsm,
        Some(n),
        vec![KeyOperation::DecryptDataKey {
            wrapped: w2.to_bytes(),
        }],
        T0 + 1_000,
        false,
    );
    assert!(matches!(
        b.response,
        Response::Error {
            code: ErrorCode::Denied
        }
    ));
}

/// A simulated NSM dating documents now: the service checks ages against the real clock.
fn nsm_now(root: Arc<SimRoot>) -> SimulatedNsm {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    SimulatedNsm::new(
        SimConfig::default()
            .with_root(root)
            .with_clock(Arc::new(FixedClock::new(u64::try_from(now).unwrap())))
            .with_image(b"v1".to_vec(), None),
    )
    .unwrap()
}

/// One whole release over `stream`, as the enclave's client does it.
async fn release_over<S>(stream: &mut S, nsm: &SimulatedNsm, pinned: &[u8; 97]) -> usize
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let max = 128 * 1024;
    let challenge = kluis_proto::client::request_challenge(stream, max)
        .await
        .unwrap();
    let request = KeyRequest::new(generate()).unwrap();
    let ephemeral = EphemeralKeyPair::generate().unwrap();
    let doc = kluis_nsm::attest(
        nsm,
        Some(&request_hash(&request)),
        Some(&challenge.nonce),
        Some(&ephemeral.public_key_sec1()),
    )
    .unwrap();
    kluis_proto::client::request_keys(stream, max, &doc, &request, &ephemeral, pinned)
        .await
        .unwrap()
        .len()
}

#[test]
fn service_over_loopback() {
    let world = new_world();
    world.set_policy(KEY, &policy_toml(&[image_pcr0(b"v1")], ""));
    let pinned = world.pinned;
    let root = world.root.clone();
    let broker = Arc::clone(&world.broker);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(service::run(
            listener,
            Arc::clone(&broker),
            ServiceConfig::default(),
            None,
            async {
                let _ = stop_rx.await;
            },
        ));
        let nsm = nsm_now(root);
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let max = 128 * 1024;
        for _ in 0..3 {
            assert_eq!(release_over(&mut stream, &nsm, &pinned).await, 1);
        }
        // One connection can hold only a few challenges open at once.
        let mut greedy = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut answers = Vec::new();
        for _ in 0..=service::MAX_OPEN_CHALLENGES_PER_CONNECTION {
            kluis_proto::write_message(&mut greedy, &Request::Challenge, max)
                .await
                .unwrap();
            let answer: Response = kluis_proto::read_message(&mut greedy, max).await.unwrap();
            answers.push(matches!(answer, Response::Challenge { .. }));
        }
        let mut expected = vec![true; service::MAX_OPEN_CHALLENGES_PER_CONNECTION];
        expected.push(false);
        assert_eq!(answers, expected);
        drop(greedy);

        // Garbage on another connection gets an error answer, not a crash.
        let mut bad = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::AsyncWriteExt;
        bad.write_all(&[0, 0, 0, 3, 1, 0xff, 0xff]).await.unwrap();
        let answer: Response = kluis_proto::read_message(&mut bad, max).await.unwrap();
        assert!(matches!(
            answer,
            Response::Error {
                code: ErrorCode::BadRequest
            }
        ));
        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
        broker.audit().verify(None).unwrap();
    });
}

#[test]
fn service_over_tls() {
    let world = new_world();
    world.set_policy(KEY, &policy_toml(&[image_pcr0(b"v1")], ""));
    let pinned = world.pinned;
    let root = world.root.clone();
    let broker = Arc::clone(&world.broker);

    // A server certificate for "localhost", trusted by the test client only.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let server_config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client_config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(service::run(
            listener,
            Arc::clone(&broker),
            ServiceConfig::default(),
            Some(acceptor),
            async {
                let _ = stop_rx.await;
            },
        ));
        let nsm = nsm_now(root);
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let server_name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut stream = connector.connect(server_name, tcp).await.unwrap();
        let max = 128 * 1024;
        assert_eq!(release_over(&mut stream, &nsm, &pinned).await, 1);

        // A plaintext client cannot talk to the TLS listener.
        let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(kluis_proto::client::request_challenge(&mut plain, max)
            .await
            .is_err());
        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    });
}

// ------------------------------------------------------------------ issue 7

/// A frame that decodes as a key release but carries no valid document.
fn garbage_release() -> Request {
    Request::KeyRelease {
        attestation_document: vec![0xa5; 64],
        request: KeyRequest::new(generate()).unwrap(),
    }
}

/// Serve `broker` on `addr` with `config` until the returned sender fires.
async fn start_service(
    broker: Arc<Broker>,
    config: ServiceConfig,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    // As `serve` binds: a deep accept queue.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(4096).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(service::run(listener, broker, config, None, async {
        let _ = stop_rx.await;
    }));
    (addr, stop_tx, server)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A release attempt does not free a challenge slot unless it used that
/// connection's own nonce; garbage releases cost no audit record each, only
/// a summary with their count.
#[test]
fn challenge_slots_are_freed_only_by_their_own_nonce_and_noise_is_summarised() {
    let world = World::builder(T0).key(KEY).build();
    let broker = Arc::clone(&world.broker);
    runtime().block_on(async move {
        let (addr, stop, server) =
            start_service(Arc::clone(&broker), ServiceConfig::default()).await;
        let max = 128 * 1024;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut granted = 0;
        for _ in 0..50 {
            kluis_proto::write_message(&mut stream, &garbage_release(), max)
                .await
                .unwrap();
            let answer: Response = kluis_proto::read_message(&mut stream, max).await.unwrap();
            assert!(matches!(
                answer,
                Response::Error {
                    code: ErrorCode::Denied
                }
            ));
            kluis_proto::write_message(&mut stream, &Request::Challenge, max)
                .await
                .unwrap();
            let answer: Response = kluis_proto::read_message(&mut stream, max).await.unwrap();
            if matches!(answer, Response::Challenge { .. }) {
                granted += 1;
            }
        }
        assert_eq!(granted, service::MAX_OPEN_CHALLENGES_PER_CONNECTION);
        // No record per garbage request (the summary interval is 10 s).
        let release_records = |broker: &Broker| {
            broker
                .audit()
                .records(&AuditFilter::default())
                .unwrap()
                .into_iter()
                .filter(|r| r.operation.starts_with("key.release"))
                .collect::<Vec<_>>()
        };
        assert!(release_records(&broker).len() <= 1, "one summary at most");
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        broker.flush_noise(T0, true);
        let records = release_records(&broker);
        let total: u64 = records
            .iter()
            .map(|r| {
                assert_eq!(r.operation, "key.release.unauthenticated");
                let reason = r.reason.as_deref().unwrap();
                reason.split(' ').next().unwrap().parse::<u64>().unwrap()
            })
            .sum();
        assert_eq!(total, 50, "{records:?}");
    });
}

/// One address holding hundreds of idle connections (reopened as they are
/// closed) does not keep another address's releases out (p99 under 1 s);
/// an idle new connection is closed at the first-frame deadline. Bounded:
/// at most 3000 connections, loopback only.
#[test]
fn one_peer_cannot_starve_the_others() {
    let world = new_world();
    world.set_policy(KEY, &policy_toml(&[image_pcr0(b"v1")], ""));
    let pinned = world.pinned;
    let root = world.root.clone();
    let broker = Arc::clone(&world.broker);
    let config = ServiceConfig {
        max_connections: 64,
        max_connections_per_peer: 8,
        reserved_connections: 8,
        first_frame_timeout: std::time::Duration::from_millis(500),
        ..ServiceConfig::default()
    };
    runtime().block_on(async move {
        let (addr, stop, server) = start_service(Arc::clone(&broker), config).await;

        // An idle connection is dropped at the first-frame deadline.
        let started = std::time::Instant::now();
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        use tokio::io::AsyncReadExt;
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), idle.read(&mut byte))
            .await
            .expect("closed by the server")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(started.elapsed() < std::time::Duration::from_secs(3));

        // The flood: 127.0.0.2 keeps up to 400 connections open, reopening
        // each one the server closes, until told to stop.
        let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut flood = tokio::task::JoinSet::new();
        for _ in 0..400 {
            let flooding = Arc::clone(&flooding);
            let opened = Arc::clone(&opened);
            flood.spawn(async move {
                while flooding.load(std::sync::atomic::Ordering::Relaxed)
                    && opened.load(std::sync::atomic::Ordering::Relaxed) < 3000
                {
                    let socket = tokio::net::TcpSocket::new_v4().unwrap();
                    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                    let Ok(mut s) = socket.connect(addr).await else {
                        continue;
                    };
                    opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let mut b = [0u8; 1];
                    // Hold it until the server closes it, then reopen it
                    // shortly after (a tighter loop is a SYN flood, which
                    // the kernel's listen backlog meets before the service).
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        s.read(&mut b),
                    )
                    .await;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            });
        }
        // Let the flood take what it can.
        while opened.load(std::sync::atomic::Ordering::Relaxed) < 400 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let nsm = nsm_now(root);
        let mut latencies = Vec::new();
        for _ in 0..20 {
            let t = std::time::Instant::now();
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let connected = t.elapsed();
            if connected > std::time::Duration::from_millis(200) {
                eprintln!("slow connect: {connected:?}");
            }
            let released = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                release_over(&mut stream, &nsm, &pinned),
            )
            .await
            .expect("a legitimate release completes");
            assert_eq!(released, 1);
            latencies.push(t.elapsed());
        }
        flooding.store(false, std::sync::atomic::Ordering::Relaxed);
        flood.abort_all();
        latencies.sort();
        let p99 = latencies[latencies.len() * 99 / 100 - 1].max(latencies[latencies.len() - 1]);
        eprintln!(
            "legitimate releases under a flood of {} connections from one address: p50 {:?}, p99 {:?}",
            opened.load(std::sync::atomic::Ordering::Relaxed),
            latencies[latencies.len() / 2],
            p99
        );
        assert!(p99 < std::time::Duration::from_secs(1), "p99 {p99:?}");
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    });
}

/// `rm audit.log` while the broker runs: no key is released into the
/// unlinked file.
#[test]
fn no_release_after_the_audit_log_is_deleted() {
    let world = new_world();
    world.set_policy(KEY, &policy_toml(&[image_pcr0(b"v1")], ""));
    let nsm = world.nsm(b"v1", false, T0);
    let n = world.challenge(T0);
    let first = world.attempt(&nsm, Some(n), generate(), T0, false);
    assert!(matches!(first.response, Response::KeyRelease(_)));
    std::fs::remove_file(world.broker.audit().path()).unwrap();
    let n = world.challenge(T0);
    let second = world.attempt(&nsm, Some(n), generate(), T0, false);
    assert!(
        matches!(second.response, Response::Error { .. }),
        "{:?}",
        second.response
    );
    // Replaced by another file: refused too.
    std::fs::write(world.broker.audit().path(), b"").unwrap();
    let n = world.challenge(T0);
    let third = world.attempt(&nsm, Some(n), generate(), T0, false);
    assert!(matches!(third.response, Response::Error { .. }));
}

/// Records removed from the log's end while the service runs: it stops
/// releasing keys, and the anchor does not move past the gap.
#[test]
fn the_broker_stops_when_the_log_no_longer_continues_from_the_anchor() {
    let world = bound_world();
    world.set_policy(KEY, &policy_toml(&[image_pcr0(b"v1")], ""));
    let nsm = world.nsm(b"v1", false, T0);
    for _ in 0..3 {
        let n = world.challenge(T0);
        let a = world.attempt(&nsm, Some(n), generate(), T0, false);
        assert!(matches!(a.response, Response::KeyRelease(_)));
    }
    world.broker.anchor_audit_head();
    assert_eq!(world.broker.halted(), None);
    let anchored = world.broker.kms().audit_anchor().unwrap().unwrap();
    // Cut the last record, then let another handle write a valid record
    // past the gap (what a restarted process or a failed login did).
    let path = world.broker.audit().path().to_owned();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&path, lines[..lines.len() - 1].join("\n") + "\n").unwrap();
    let other = AuditLog::open(&path).unwrap();
    for _ in 0..2 {
        other
            .append(attestation_verifier::audit::NewRecord {
                time_ms: T0,
                actor: Actor::System,
                operation: "noise".into(),
                key_id: None,
                key_version: None,
                decision: Decision::Refused,
                reason: None,
                attestation_document: None,
            })
            .unwrap();
    }
    // Nobody can move the anchor along the new chain.
    assert!(world.broker.kms().anchor_audit(&other).is_err());
    world.broker.anchor_audit_head();
    assert!(world.broker.halted().is_some());
    assert_eq!(world.broker.kms().audit_anchor().unwrap(), Some(anchored));
    assert!(matches!(
        world
            .broker
            .handle(Request::Challenge, T0, &|| Some([9; 32])),
        Response::Error {
            code: ErrorCode::Unavailable
        }
    ));
    // And a process starting now refuses the log.
    assert!(AuditLog::open_anchored(&path, Some(&anchored)).is_err());
}

/// A change whose audit record cannot be written does not happen.
#[test]
fn no_change_without_its_audit_record() {
    let world = bound_world();
    let kms = world.broker.kms();
    let name = KeyName::parse(KEY).unwrap();
    let other = KeyName::parse("agency-a/app-x/test").unwrap();
    let policy = StoredPolicy {
        format: "json".into(),
        text: "{}".into(),
        set_by: "test".into(),
        set_ms: T0,
    };
    // The log is gone (or full): every change is refused, nothing changes.
    std::fs::remove_file(world.broker.audit().path()).unwrap();
    assert!(kms.set_policy(&name, &policy).is_err());
    assert_eq!(kms.policy(&name).unwrap(), None);
    assert!(kms.rotate_key(&name, T0).is_err());
    assert_eq!(kms.key(&name).unwrap().current().unwrap().version, 1);
    assert!(kms.create_key(&other, 365, T0).is_err());
    assert!(kms.key(&other).is_err());
    assert!(kms.disable_key(&name).is_err());
    assert_eq!(
        kms.key(&name).unwrap().state,
        attestation_verifier::keys::KeyState::Enabled
    );
}

/// A change interrupted after its audit record is recorded as void.
#[test]
fn an_interrupted_change_is_audited_as_void() {
    let world = bound_world();
    let kms = world.broker.kms();
    let (record, _credential) = attestation_verifier::auth::new_admin(
        "alice",
        attestation_verifier::auth::Role::KeyAdmin,
        T0,
    )
    .unwrap();
    // The step between the audit record and the stored change fails.
    let failed = kms.add_admin_then(&record, "test", || {
        Err(attestation_verifier::keys::KeyError::InvalidArgument(
            "disk full".into(),
        ))
    });
    assert!(failed.is_err());
    assert!(kms.admin("alice").unwrap().is_none());
    let records = world
        .broker
        .audit()
        .records(&AuditFilter::default())
        .unwrap();
    let admin_records: Vec<_> = records
        .iter()
        .filter(|r| r.operation == "admin.create")
        .collect();
    assert_eq!(admin_records.len(), 2, "{admin_records:?}");
    assert_eq!(admin_records[0].decision, Decision::Allowed);
    assert_eq!(admin_records[1].decision, Decision::Refused);
    assert!(admin_records[1]
        .reason
        .as_deref()
        .unwrap()
        .contains("did not take effect"));
    // The name stays free.
    kms.add_admin(&record).unwrap();
}

/// A key object lost from the token (deleted outside Kluis) is the token's
/// failure, not a decision about the enclave: the release fails closed as
/// `unavailable`, and the audit log names the backend.
#[test]
fn a_key_lost_from_the_token_fails_closed_as_unavailable() {
    let Some(world) = world_on(Backend::Token) else {
        return;
    };
    world.set_policy(KEY, &policy_toml(&[image_pcr0(b"v1")], ""));
    let nsm = world.nsm(b"v1", false, T0);
    let kms = world.broker.kms();
    let record = kms.key(&KeyName::parse(KEY).unwrap()).unwrap();
    let token = kms.token().unwrap();
    for version in &record.versions {
        assert_eq!(token.destroy(version.material_id.as_bytes()).unwrap(), 1);
    }
    let nonce = world.challenge(T0);
    let a = world.attempt(&nsm, Some(nonce), generate(), T0 + 1_000, false);
    assert!(
        matches!(
            a.response,
            Response::Error {
                code: ErrorCode::Unavailable
            }
        ),
        "{:?}",
        a.response
    );
    let reason = last_refusal_reason(&world);
    assert!(
        reason.starts_with("key_backend_unavailable") && reason.contains("no object"),
        "{reason}"
    );
}
