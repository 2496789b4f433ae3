//! The parent's relay with several verifier replicas: a replica that refuses
//! connections is skipped, a replica that goes away mid-run is left for the
//! next one, a replica that fails before answering has the enclave's
//! challenge request re-sent elsewhere, and a replica that answered a
//! challenge is never followed by a second request on that challenge
//! anywhere: the job runs again from a fresh challenge only when no key
//! request reached any replica, and not at all when one did.
//!
//! The two real replicas here serve one broker (one store, one audit log):
//! that makes the audit log the one place to count releases. The failover
//! rules themselves never rely on shared nonces.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use attestation_verifier::audit::{AuditFilter, Decision};
use kluis_parent::failover::run_job_failing_over;
use kluis_parent::hook::{Channel, Direction, PassThrough, Recorder};
use kluis_parent::job::RunError;
use kluis_parent::relay::{VerifierTarget, Verifiers};
use kluis_proto::job::{FailureKind, WorkloadSpec};
use kluis_proto::message::{read_message, write_message, Request, Response};
use kluis_tests::world::*;
use kluis_transport::Address;

fn replicas(addresses: &[&Address]) -> Verifiers {
    Verifiers::new(
        addresses
            .iter()
            .map(|a| VerifierTarget::plain((*a).clone()))
            .collect(),
    )
    .unwrap()
    .with_connect_timeout(Duration::from_secs(2))
    .with_answer_timeout(Duration::from_secs(2))
}

/// An address with nothing listening behind it (connections are refused).
async fn dead_address(world: &World) -> Address {
    let verifier = world.start_verifier(None).await;
    let address = verifier.address.clone();
    verifier.stop().await;
    address
}

/// Key requests the verifier allowed: distinct attestation documents among
/// the allowed release records (one record per key of a request).
fn allowed_releases(world: &World) -> usize {
    world
        .broker
        .audit()
        .records(&AuditFilter {
            decision: Some(Decision::Allowed),
            ..AuditFilter::default()
        })
        .unwrap()
        .into_iter()
        .filter(|r| r.operation.starts_with("key.release"))
        .map(|r| {
            r.attestation_document
                .expect("a release names its document")
        })
        .collect::<std::collections::HashSet<_>>()
        .len()
}

async fn identity_job(world: &World, enclave: &Address, name: &str) -> Result<(), RunError> {
    let plain = records(300);
    let input = world.encrypt(INPUT_KEY, &plain, 1024);
    let out = world.path(name);
    run(&job(enclave, WorkloadSpec::Identity, vec![]), input, &out).await?;
    assert_eq!(world.decrypt(&std::fs::read(&out).unwrap()).unwrap(), plain);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_replica_that_refuses_connections_is_skipped() {
    let world = World::new();
    let dead = dead_address(&world).await;
    let live = world.start_verifier(None).await;
    let verifiers = replicas(&[&dead, &live.address]);
    let relay = start_relay_to(verifiers.clone(), Arc::new(PassThrough)).await;
    let enclave = world.start_enclave(GOOD_IMAGE, &relay.address).await;

    identity_job(&world, &enclave.address, "one.kenv")
        .await
        .unwrap();
    let stats = verifiers.stats();
    assert_eq!(stats[0].connect_failures, 1, "{stats:?}");
    assert_eq!(stats[0].answered, 0, "{stats:?}");
    assert_eq!(stats[1].answered, 1, "{stats:?}");
    assert_eq!(stats[1].key_requests, 1, "{stats:?}");

    // The next exchange starts with the replica that answered: the dead one
    // is not tried again.
    identity_job(&world, &enclave.address, "two.kenv")
        .await
        .unwrap();
    let stats = verifiers.stats();
    assert_eq!(stats[0].connect_failures, 1, "{stats:?}");
    assert_eq!(stats[1].answered, 2, "{stats:?}");
    assert_eq!(allowed_releases(&world), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_exchanges_go_to_the_second_replica_once_the_first_is_gone() {
    let world = World::new();
    let first = world.start_verifier(None).await;
    let second = world.start_verifier(None).await;
    let verifiers = replicas(&[&first.address, &second.address]);
    let relay = start_relay_to(verifiers.clone(), Arc::new(PassThrough)).await;
    let enclave = world.start_enclave(GOOD_IMAGE, &relay.address).await;

    identity_job(&world, &enclave.address, "one.kenv")
        .await
        .unwrap();
    let stats = verifiers.stats();
    assert_eq!((stats[0].answered, stats[1].answered), (1, 0), "{stats:?}");

    // The first replica's listener goes away mid-run.
    first.stop().await;
    identity_job(&world, &enclave.address, "two.kenv")
        .await
        .unwrap();
    identity_job(&world, &enclave.address, "three.kenv")
        .await
        .unwrap();
    let stats = verifiers.stats();
    assert_eq!(stats[0].answered, 1, "{stats:?}");
    assert_eq!(
        stats[0].connect_failures, 1,
        "tried once, then avoided: {stats:?}"
    );
    assert_eq!(stats[1].answered, 2, "{stats:?}");
    assert_eq!(stats[1].key_requests, 2, "{stats:?}");
    assert_eq!(allowed_releases(&world), 3);
}

/// What a misbehaving replica does on each connection.
#[derive(Clone, Copy)]
enum Fake {
    /// Read the first request, then close without a word.
    CloseBeforeAnswering,
    /// Read requests and never answer.
    Silent,
    /// Answer the challenge, read the key request, then close.
    CloseAfterTheKeyRequest,
}

struct FakeReplica {
    address: Address,
    challenges: Arc<AtomicUsize>,
    key_requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeReplica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake_replica(mode: Fake) -> FakeReplica {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = Address::Tcp(listener.local_addr().unwrap().to_string());
    let challenges = Arc::new(AtomicUsize::new(0));
    let key_requests = Arc::new(AtomicUsize::new(0));
    let (c, k) = (Arc::clone(&challenges), Arc::clone(&key_requests));
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let (c, k) = (Arc::clone(&c), Arc::clone(&k));
            tokio::spawn(async move {
                loop {
                    let Ok(request) = read_message::<Request, _>(&mut stream, 128 * 1024).await
                    else {
                        return;
                    };
                    match request {
                        Request::Challenge => {
                            c.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => {
                            k.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    match mode {
                        Fake::CloseBeforeAnswering => return,
                        Fake::Silent => {}
                        Fake::CloseAfterTheKeyRequest => {
                            if k.load(Ordering::SeqCst) > 0 {
                                return;
                            }
                            let answer = Response::Challenge {
                                nonce: [9u8; 32],
                                expires_at_ms: now_ms() + 60_000,
                            };
                            write_message(&mut stream, &answer, 128 * 1024)
                                .await
                                .unwrap();
                        }
                    }
                }
            });
        }
    });
    FakeReplica {
        address,
        challenges,
        key_requests,
        task,
    }
}

/// A replica that fails before answering (closing, or staying silent past
/// the answer timeout): the enclave's challenge request, and only that, is
/// sent again to the next replica, within the same exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_fails_before_answering_has_the_challenge_request_sent_on() {
    for mode in [Fake::CloseBeforeAnswering, Fake::Silent] {
        let world = World::new();
        let fake = fake_replica(mode).await;
        let live = world.start_verifier(None).await;
        let verifiers = replicas(&[&fake.address, &live.address])
            .with_answer_timeout(Duration::from_millis(300));
        let recorder = Arc::new(Recorder::new());
        let relay = start_relay_to(verifiers.clone(), recorder.clone()).await;
        let enclave = world.start_enclave(GOOD_IMAGE, &relay.address).await;

        identity_job(&world, &enclave.address, "out.kenv")
            .await
            .unwrap();
        let stats = verifiers.stats();
        assert_eq!(stats[0].failed_before_answer, 1, "{stats:?}");
        assert_eq!(stats[0].answered, 0, "{stats:?}");
        assert_eq!(stats[0].key_requests, 0, "{stats:?}");
        assert_eq!(stats[1].replayed, 1, "{stats:?}");
        assert_eq!(stats[1].answered, 1, "{stats:?}");
        assert_eq!(fake.challenges.load(Ordering::SeqCst), 1);
        assert_eq!(fake.key_requests.load(Ordering::SeqCst), 0);
        // The enclave sent one challenge request and one key request: the
        // relay re-sent the first, never the second.
        assert_eq!(
            recorder
                .frames_of(Channel::Verifier, Direction::FromEnclave)
                .len(),
            2
        );
        assert_eq!(allowed_releases(&world), 1);
    }
}

/// The first replica answers the challenge and goes away before any key
/// request reaches it (the parent holds the request back meanwhile): the
/// enclave's exchange fails, no request is sent on that challenge anywhere,
/// and the whole job runs again from a fresh challenge on the second
/// replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_lost_after_the_challenge_restarts_the_whole_exchange_on_the_next() {
    let world = World::new();
    let first = world.start_verifier(None).await;
    let second = world.start_verifier(None).await;
    let verifiers = replicas(&[&first.address, &second.address]);
    // Frame 1 from the enclave is the first exchange's key request.
    let hostile = Arc::new(Hostile::new(
        Channel::Verifier,
        Direction::FromEnclave,
        1,
        Tamper::Drop,
    ));
    let recorder = Arc::new(Recorder::wrapping(hostile.clone()));
    let relay = start_relay_to(verifiers.clone(), recorder.clone()).await;
    let enclave = world.start_enclave(GOOD_IMAGE, &relay.address).await;

    let plain = records(300);
    let input = world.encrypt(INPUT_KEY, &plain, 1024);
    let out = world.path("out.kenv");
    let job = job(&enclave.address, WorkloadSpec::Identity, vec![]);
    let running = tokio::spawn({
        let verifiers = verifiers.clone();
        let out = out.clone();
        async move {
            run_job_failing_over(
                &job,
                &verifiers,
                None,
                || {
                    Ok(kluis_parent::job::JobInput::reader(std::io::Cursor::new(
                        input.clone(),
                    )))
                },
                &out,
                |_| {},
            )
            .await
        }
    });
    while !hostile.acted() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.stop().await;
    running.await.unwrap().unwrap();
    assert_eq!(world.decrypt(&std::fs::read(&out).unwrap()).unwrap(), plain);

    let stats = verifiers.stats();
    assert_eq!(stats[0].answered, 1, "{stats:?}");
    assert_eq!(stats[0].failed_after_answer, 1, "{stats:?}");
    assert_eq!(
        stats[0].key_requests, 0,
        "no request on its challenge: {stats:?}"
    );
    assert_eq!(stats[1].answered, 1, "{stats:?}");
    assert_eq!(stats[1].key_requests, 1, "{stats:?}");
    assert_eq!(
        stats[1].replayed, 0,
        "a fresh exchange, not a replay: {stats:?}"
    );
    // Two challenge requests (one per exchange), two key requests seen by
    // the parent (the first held back), one release decided.
    assert_eq!(
        recorder
            .frames_of(Channel::Verifier, Direction::FromEnclave)
            .len(),
        4
    );
    assert_eq!(allowed_releases(&world), 1);
}

/// The key request reached a replica that then went away without an answer:
/// it may have been decided there, so nothing is sent to the next replica
/// and the job is not run again; the error says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_request_whose_answer_was_lost_is_never_sent_again() {
    let world = World::new();
    let fake = fake_replica(Fake::CloseAfterTheKeyRequest).await;
    let live = world.start_verifier(None).await;
    let verifiers = replicas(&[&fake.address, &live.address]);
    let relay = start_relay_to(verifiers.clone(), Arc::new(PassThrough)).await;
    let enclave = world.start_enclave(GOOD_IMAGE, &relay.address).await;

    let input = world.encrypt(INPUT_KEY, &records(50), 1024);
    let out = world.path("out.kenv");
    let job = job(&enclave.address, WorkloadSpec::Identity, vec![]);
    let err = run_job_failing_over(
        &job,
        &verifiers,
        None,
        || {
            Ok(kluis_parent::job::JobInput::reader(std::io::Cursor::new(
                input.clone(),
            )))
        },
        &out,
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RunError::AnswerLost(_)), "{err}");
    assert_eq!(
        err.enclave_kind(),
        Some(FailureKind::VerifierUnavailable),
        "{err}"
    );
    assert!(err.to_string().contains("audit log"), "{err}");
    assert!(!out.exists());
    assert_eq!(fake.challenges.load(Ordering::SeqCst), 1);
    assert_eq!(fake.key_requests.load(Ordering::SeqCst), 1);
    let stats = verifiers.stats();
    assert_eq!(stats[0].key_requests, 1, "{stats:?}");
    assert_eq!(stats[0].failed_after_answer, 1, "{stats:?}");
    assert_eq!(stats[1].answered, 0, "{stats:?}");
    assert_eq!(stats[1].key_requests, 0, "{stats:?}");
    assert_eq!(allowed_releases(&world), 0);
}
