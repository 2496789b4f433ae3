//! Several verifier replicas on one PostgreSQL database (issue 10): a
//! challenge redeemed once anywhere, one audit chain, rotation once, and
//! outages that fail closed as `unavailable` and then resume.
//!
//! Needs KLUIS_TEST_DATABASE_URL (SKIPPED without it; a failure with
//! KLUIS_REQUIRE_DATABASE=1, as in CI). Each test has a database of its own.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

mod support;

use attestation_verifier::audit::{Actor, AuditFilter, AuditLog, Decision, NewRecord};
use attestation_verifier::broker::{Broker, BrokerConfig};
use attestation_verifier::keys::KeyName;
use attestation_verifier::kms::{Kms, StoredPolicy};
use kluis_attestation::{TrustAnchor, Verifier};
use kluis_keystore::pg::scratch::{self, ScratchDatabase};
use kluis_keystore::{Database, RootSecret};
use kluis_nsm::sim::{FixedClock, SimConfig, SimRoot, SimulatedNsm};
use kluis_proto::{ErrorCode, KeyRequest, Request, Response};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const T0: u64 = 1_767_225_600_000;
const DAY: u64 = 86_400_000;
const KEY: &str = "agency-a/app-x/prod";
const IMAGE: &[u8] = b"replicated-v1";

fn scratch(test: &str) -> Option<ScratchDatabase> {
    let server = scratch::server(test).expect("PostgreSQL is required here")?;
    Some(ScratchDatabase::create(&server).expect("a scratch database"))
}

fn secret() -> RootSecret {
    RootSecret::from_key_bytes(zeroize::Zeroizing::new([7u8; 32]))
}

/// A replica: the store opened from the database, its own audit handle.
fn open_replica(url: &str) -> (Kms, Arc<AuditLog>) {
    let mut kms = Kms::open_database(Database::connect(url).unwrap(), secret()).unwrap();
    let anchor = kms.audit_anchor().unwrap();
    let audit = Arc::new(AuditLog::open_database(kms.store(), anchor.as_ref()).unwrap());
    kms.bind_audit(Arc::clone(&audit), Actor::System);
    (kms, audit)
}

/// A system record to append.
fn test_record() -> NewRecord {
    NewRecord {
        time_ms: T0,
        actor: Actor::System,
        operation: "test.append".to_owned(),
        key_id: None,
        key_version: None,
        decision: Decision::Allowed,
        reason: None,
        attestation_document: None,
    }
}

/// A store with one key under a policy admitting [`IMAGE`].
fn init_store(url: &str, rotation_days: u32) {
    let mut kms = Kms::init_database(Database::connect(url).unwrap(), secret()).unwrap();
    let audit = Arc::new(AuditLog::open_database(kms.store(), None).unwrap());
    kms.bind_audit(audit, Actor::System);
    let identity = kluis_proto::VerifierIdentity::generate().unwrap();
    kms.set_identity_pkcs8(&identity.to_pkcs8_der().unwrap())
        .unwrap();
    let name = KeyName::parse(KEY).unwrap();
    kms.create_key(&name, rotation_days, T0).unwrap();
    let pcr0 = SimConfig::default()
        .with_image(IMAGE.to_vec(), None)
        .boot_pcr_values()[0];
    let text = format!(
        "operations = [\"generate\", \"decrypt\"]\nmax_document_age_seconds = 120\n\
         [[measurements]]\nname = \"v1\"\npcr0 = \"{}\"\n",
        hex::encode(pcr0)
    );
    let policy = attestation_verifier::policy::KeyPolicy::from_toml_str(&text).unwrap();
    kms.set_policy(
        &name,
        &StoredPolicy {
            format: "json".into(),
            text: serde_json::to_string(&policy).unwrap(),
            set_by: "test".into(),
            set_ms: T0,
        },
    )
    .unwrap();
}

fn broker(url: &str, root: &SimRoot) -> Broker {
    let (kms, audit) = open_replica(url);
    let identity = kms.identity().unwrap().unwrap();
    let verifier = Verifier::new(TrustAnchor::dangerous_from_der(root.root_der()).unwrap());
    Broker::new(kms, verifier, identity, audit, BrokerConfig::default())
}

fn nsm(root: &Arc<SimRoot>) -> SimulatedNsm {
    SimulatedNsm::new(
        SimConfig::default()
            .with_root(root.clone())
            .with_clock(Arc::new(FixedClock::new(T0)))
            .with_image(IMAGE.to_vec(), None),
    )
    .unwrap()
}

fn challenge(broker: &Broker, seed: u8, now: u64) -> Result<[u8; 32], Response> {
    match broker.handle(Request::Challenge, now, &|| Some([seed; 32])) {
        Response::Challenge { nonce, .. } => Ok(nonce),
        other => Err(other),
    }
}

/// A release request and the document that carries its nonce.
fn attested(nsm: &SimulatedNsm, nonce: [u8; 32]) -> (Vec<u8>, KeyRequest) {
    support::attested_generate(nsm, KEY, nonce)
}

fn unavailable(answer: &Response) -> bool {
    matches!(
        answer,
        Response::Error {
            code: ErrorCode::Unavailable
        }
    )
}

fn allowed_releases(audit: &AuditLog) -> usize {
    audit
        .records(&AuditFilter {
            decision: Some(Decision::Allowed),
            ..AuditFilter::default()
        })
        .unwrap()
        .iter()
        .filter(|r| r.operation == "key.release.generate")
        .count()
}

#[test]
fn a_challenge_from_one_replica_is_redeemed_once_at_any() {
    let Some(db) = scratch("a_challenge_from_one_replica_is_redeemed_once_at_any") else {
        return;
    };
    init_store(db.url(), 365);
    let root = Arc::new(SimRoot::generate_at(T0 - DAY).unwrap());
    let a = Arc::new(broker(db.url(), &root));
    let b = Arc::new(broker(db.url(), &root));
    let nsm = nsm(&root);

    // Issued by A, redeemed at B; then replayed at both.
    let nonce = challenge(&a, 1, T0).unwrap();
    let (document, request) = attested(&nsm, nonce);
    let answer = b.release(&document, &request, T0 + 1_000);
    assert!(matches!(answer, Response::KeyRelease(_)), "{answer:?}");
    for replica in [&a, &b] {
        let answer = replica.release(&document, &request, T0 + 2_000);
        assert!(
            matches!(
                answer,
                Response::Error {
                    code: ErrorCode::Denied
                }
            ),
            "{answer:?}"
        );
    }

    // The same document at both replicas at once, many times: one release.
    let nonce = challenge(&b, 2, T0).unwrap();
    let (document, request) = attested(&nsm, nonce);
    let document = Arc::new(document);
    let request = Arc::new(request);
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let replica = Arc::clone(if i % 2 == 0 { &a } else { &b });
            let (document, request) = (Arc::clone(&document), Arc::clone(&request));
            std::thread::spawn(move || {
                matches!(
                    replica.release(&document, &request, T0 + 1_000),
                    Response::KeyRelease(_)
                )
            })
        })
        .collect();
    let released = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|ok| *ok)
        .count();
    assert_eq!(released, 1);

    // One chain, holding exactly the two releases, read from either handle.
    assert_eq!(allowed_releases(a.audit()), 2);
    let report_a = a.audit().verify(None).unwrap();
    let report_b = b.audit().verify(None).unwrap();
    assert_eq!(report_a.head, report_b.head);

    // A nonce nobody issued is unknown everywhere.
    let (document, request) = attested(&nsm, [9; 32]);
    assert!(matches!(
        a.release(&document, &request, T0 + 1_000),
        Response::Error {
            code: ErrorCode::Denied
        }
    ));
}

#[test]
fn the_records_of_every_replica_form_one_chain() {
    let Some(db) = scratch("the_records_of_every_replica_form_one_chain") else {
        return;
    };
    init_store(db.url(), 365);
    let (_, first) = open_replica(db.url());
    let (_, second) = open_replica(db.url());
    let before = first.verify(None).unwrap().records;
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let log = Arc::clone(if i % 2 == 0 { &first } else { &second });
            std::thread::spawn(move || {
                (0..50)
                    .map(|n| {
                        log.append(NewRecord {
                            time_ms: T0 + n,
                            actor: Actor::System,
                            operation: "test.append".to_owned(),
                            key_id: None,
                            key_version: None,
                            decision: Decision::Allowed,
                            reason: Some(format!("thread {i} record {n}")),
                            attestation_document: None,
                        })
                        .unwrap()
                        .seq
                    })
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    seqs.sort_unstable();
    let expected: Vec<u64> = (before + 1..=before + 400).collect();
    assert_eq!(
        seqs, expected,
        "every append has its own place in one order"
    );
    let report = second.verify(None).unwrap();
    assert_eq!(report.records, before + 400);
    assert_eq!(first.verify(Some(&report.head)).unwrap().head, report.head);

    // A row removed from the middle (by someone who first drops the
    // append-only trigger) breaks the chain where it was.
    let mut sql = postgres::Client::connect(db.url(), postgres::NoTls).unwrap();
    let refused = sql.batch_execute("DELETE FROM kluis_audit WHERE seq = 3");
    assert!(refused.is_err(), "the rows are append-only");
    sql.batch_execute(
        "ALTER TABLE kluis_audit DISABLE TRIGGER kluis_audit_no_update; \
         DELETE FROM kluis_audit WHERE seq = 3",
    )
    .unwrap();
    assert!(first.verify(None).is_err());
}

#[test]
fn rotation_that_falls_due_happens_once_across_replicas() {
    let Some(db) = scratch("rotation_that_falls_due_happens_once_across_replicas") else {
        return;
    };
    init_store(db.url(), 1);
    let replicas: Vec<Arc<Kms>> = (0..3).map(|_| Arc::new(open_replica(db.url()).0)).collect();
    let threads: Vec<_> = replicas
        .iter()
        .map(|kms| {
            let kms = Arc::clone(kms);
            std::thread::spawn(move || kms.rotate_due(T0 + 2 * DAY).unwrap().len())
        })
        .collect();
    let rotations: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(rotations, 1);
    let key = replicas[0].key(&KeyName::parse(KEY).unwrap()).unwrap();
    assert_eq!(key.current().map(|v| v.version), Some(2));
    assert_eq!(key.versions.len(), 2);
    let audit = replicas[1].audit_log().unwrap();
    let rotate_records = audit
        .records(&AuditFilter::default())
        .unwrap()
        .iter()
        .filter(|r| r.operation == "key.rotate")
        .count();
    assert_eq!(rotate_records, 1);
}

/// A TCP proxy in front of the database that can cut every connection
/// and refuse new ones, as a network partition or a database restart does.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    /// Silent partition: bytes are read and dropped, both ways, and the
    /// connections stay open (the proxy's kernel still acknowledges them).
    frozen: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let frozen = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Mutex::new(Vec::new()));
        let (up2, live2, frozen2) = (Arc::clone(&up), Arc::clone(&live), Arc::clone(&frozen));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let mut live = live2.lock().unwrap();
                live.push(client.try_clone().unwrap());
                live.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let frozen = Arc::clone(&frozen2);
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if frozen.load(Ordering::SeqCst) {
                                continue;
                            }
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Proxy {
            port,
            up,
            frozen,
            live,
        }
    }

    fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for stream in self.live.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[test]
fn an_outage_fails_closed_as_unavailable_then_releases_resume() {
    let Some(db) = scratch("an_outage_fails_closed_as_unavailable_then_releases_resume") else {
        return;
    };
    init_store(db.url(), 365);
    let server: postgres::Config = db.url().parse().unwrap();
    let user = server.get_user().unwrap_or("postgres").to_owned();
    let upstream = match (server.get_hosts().first(), server.get_ports().first()) {
        (Some(postgres::config::Host::Tcp(host)), port) => {
            format!("{host}:{}", port.copied().unwrap_or(5432))
        }
        _ => {
            eprintln!("SKIPPED: the test server is not reached over TCP");
            return;
        }
    };
    let proxy = Proxy::start(upstream);
    let via_proxy = format!("postgresql://{user}@127.0.0.1:{}/{}", proxy.port, db.name());
    let root = Arc::new(SimRoot::generate_at(T0 - DAY).unwrap());
    let replica = Arc::new(broker(&via_proxy, &root));
    let nsm = nsm(&root);
    // Load all along: four clients releasing keys (fresh challenge each
    // time) before, during and after the outage.
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..4u8)
        .map(|c| {
            let (replica, root, stop) =
                (Arc::clone(&replica), Arc::clone(&root), Arc::clone(&stop));
            std::thread::spawn(move || {
                let nsm = self::nsm(&root);
                let mut outcomes = Vec::new();
                let mut count = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    // Distinct from every other nonce of the test (theirs
                    // repeat one byte; these never do).
                    count += 1;
                    let mut fresh = [0xA5u8; 32];
                    fresh[0] = c;
                    fresh[1..5].copy_from_slice(&count.to_be_bytes());
                    let issued = match replica.handle(Request::Challenge, T0, &|| Some(fresh)) {
                        Response::Challenge { nonce, .. } => Ok(nonce),
                        other => Err(other),
                    };
                    let nonce = match issued {
                        Ok(nonce) => nonce,
                        Err(answer) => {
                            outcomes.push((answer, Vec::new()));
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    };
                    let (document, request) = attested(&nsm, nonce);
                    let answer = replica.release(&document, &request, T0 + 1_000);
                    outcomes.push((answer, document));
                }
                outcomes
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    let nonce = challenge(&replica, 1, T0).unwrap();
    let (document, request) = attested(&nsm, nonce);
    assert!(matches!(
        replica.release(&document, &request, T0 + 1_000),
        Response::KeyRelease(_)
    ));
    // A challenge issued before the outage, redeemed during it.
    let pending = challenge(&replica, 2, T0).unwrap();
    let (pending_doc, pending_req) = attested(&nsm, pending);

    proxy.cut();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let answer = replica.release(&pending_doc, &pending_req, T0 + 1_000);
    assert!(unavailable(&answer), "{answer:?}");
    let answer = replica.handle(Request::Challenge, T0, &|| Some([3; 32]));
    assert!(unavailable(&answer), "{answer:?}");
    eprintln!("refused during the outage after {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "refused within a bounded time, took {:?}",
        started.elapsed()
    );

    proxy.restore();
    // The request the outage refused was never answered: it can be made
    // again, and is released once.
    let mut resumed = None;
    for _ in 0..20 {
        match replica.release(&pending_doc, &pending_req, T0 + 2_000) {
            Response::KeyRelease(_) => {
                resumed = Some(true);
                break;
            }
            Response::Error {
                code: ErrorCode::Unavailable,
            } => std::thread::sleep(Duration::from_millis(250)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        resumed,
        Some(true),
        "releases resume once the database is back"
    );
    assert!(matches!(
        replica.release(&pending_doc, &pending_req, T0 + 3_000),
        Response::Error {
            code: ErrorCode::Denied
        }
    ));
    let fresh = challenge(&replica, 4, T0 + 3_000).unwrap();
    let (document, request) = attested(&nsm, fresh);
    assert!(matches!(
        replica.release(&document, &request, T0 + 4_000),
        Response::KeyRelease(_)
    ));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let outcomes: Vec<(Response, Vec<u8>)> =
        load.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let loaded: Vec<&Vec<u8>> = outcomes
        .iter()
        .filter(|(answer, _)| matches!(answer, Response::KeyRelease(_)))
        .map(|(_, document)| document)
        .collect();
    let unavailable = outcomes
        .iter()
        .filter(|(answer, _)| unavailable(answer))
        .count();
    // The load saw both: releases, and the outage as `unavailable` only.
    assert!(!loaded.is_empty());
    assert!(unavailable > 0, "the load ran into the outage");
    let other: Vec<&Response> = outcomes
        .iter()
        .map(|(answer, _)| answer)
        .filter(|answer| {
            !matches!(
                answer,
                Response::KeyRelease(_)
                    | Response::Error {
                        code: ErrorCode::Unavailable
                    }
            )
        })
        .collect();
    assert!(other.is_empty(), "nothing else: {other:?}");
    // Every release answered (three here, the load's) has exactly one
    // record; nothing answered is missing, nothing duplicated; one chain.
    let records = replica
        .audit()
        .records(&AuditFilter {
            decision: Some(Decision::Allowed),
            ..AuditFilter::default()
        })
        .unwrap();
    for document in &loaded {
        let count = records
            .iter()
            .filter(|r| r.attestation_document.as_deref() == Some(document.as_slice()))
            .count();
        assert_eq!(count, 1);
    }
    // A release whose commit reached the database as the connection was
    // cut is recorded but answered `unavailable` (the acknowledgement was
    // lost): records may exceed deliveries, never the other way round.
    let recorded = allowed_releases(replica.audit());
    assert!(
        recorded >= 3 + loaded.len() && recorded <= 3 + loaded.len() + unavailable,
        "{recorded} records, {} delivered, {unavailable} unavailable",
        3 + loaded.len()
    );
    replica.audit().verify(None).unwrap();
}

#[test]
fn a_replica_silently_cut_off_from_the_database_stops_releasing_in_bounded_time() {
    let Some(db) =
        scratch("a_replica_silently_cut_off_from_the_database_stops_releasing_in_bounded_time")
    else {
        return;
    };
    init_store(db.url(), 365);
    let server: postgres::Config = db.url().parse().unwrap();
    let user = server.get_user().unwrap_or("postgres").to_owned();
    let Some(postgres::config::Host::Tcp(host)) = server.get_hosts().first() else {
        eprintln!("SKIPPED: the test server is not reached over TCP");
        return;
    };
    let proxy = Proxy::start(format!(
        "{host}:{}",
        server.get_ports().first().copied().unwrap_or(5432)
    ));
    let via_proxy = format!("postgresql://{user}@127.0.0.1:{}/{}", proxy.port, db.name());
    let root = Arc::new(SimRoot::generate().unwrap());
    let replica = Arc::new(broker(&via_proxy, &root));
    let decision_timeout = Duration::from_secs(2);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = runtime.spawn(attestation_verifier::service::run(
        listener,
        Arc::clone(&replica),
        attestation_verifier::service::ServiceConfig {
            decision_timeout,
            ..Default::default()
        },
        None,
        async {
            let _ = stopped.await;
        },
    ));
    let ask = |request: &Request| -> Response {
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        kluis_proto::message::write_message_sync(&mut stream, request, 1 << 20).unwrap();
        kluis_proto::message::read_message_sync(&mut stream, 1 << 20).unwrap()
    };
    assert!(matches!(
        ask(&Request::Challenge),
        Response::Challenge { .. }
    ));

    // The proxy keeps every connection open and acknowledges every byte,
    // and nothing reaches the database or comes back.
    proxy.freeze(true);
    let started = Instant::now();
    let answer = ask(&Request::Challenge);
    let took = started.elapsed();
    assert!(unavailable(&answer), "{answer:?}");
    assert!(
        took >= decision_timeout && took < decision_timeout + Duration::from_secs(3),
        "answered unavailable after {took:?}"
    );

    // The partition heals (the hung connections are reset): service resumes.
    proxy.freeze(false);
    proxy.cut();
    proxy.restore();
    let mut resumed = false;
    for _ in 0..40 {
        if matches!(ask(&Request::Challenge), Response::Challenge { .. }) {
            resumed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        resumed,
        "challenges are issued again once the database is back"
    );
    let _ = stop.send(());
    runtime.block_on(service).unwrap().unwrap();
    drop(runtime);
}

#[test]
fn a_store_that_cannot_be_read_answers_unavailable_not_denied() {
    let Some(db) = scratch("a_store_that_cannot_be_read_answers_unavailable_not_denied") else {
        return;
    };
    init_store(db.url(), 365);
    let root = Arc::new(SimRoot::generate_at(T0 - DAY).unwrap());
    let replica = broker(db.url(), &root);
    let nsm = nsm(&root);
    let mut sql = postgres::Client::connect(db.url(), postgres::NoTls).unwrap();
    // The nonces and the audit log still work; the records (keys,
    // policies) cannot be read: a failure of the store, not a decision.
    let nonce = challenge(&replica, 1, T0).unwrap();
    let (document, request) = attested(&nsm, nonce);
    sql.batch_execute("ALTER TABLE kluis_records RENAME TO kluis_records_away")
        .unwrap();
    let answer = replica.release(&document, &request, T0 + 1_000);
    sql.batch_execute("ALTER TABLE kluis_records_away RENAME TO kluis_records")
        .unwrap();
    assert!(unavailable(&answer), "{answer:?}");
    let refused = replica
        .audit()
        .records(&AuditFilter {
            decision: Some(Decision::Refused),
            ..AuditFilter::default()
        })
        .unwrap();
    assert!(
        refused.iter().any(|r| r
            .reason
            .as_deref()
            .is_some_and(|x| x.starts_with("store_error"))),
        "the refusal is recorded with its rule"
    );
    // Back: a fresh challenge is released.
    let nonce = challenge(&replica, 2, T0).unwrap();
    let (document, request) = attested(&nsm, nonce);
    assert!(matches!(
        replica.release(&document, &request, T0 + 1_000),
        Response::KeyRelease(_)
    ));
}

/// Records are chained onto the last record, not onto whatever the head row
/// says: a hash written into the head row (by someone holding the
/// database's credentials) stops appends instead of starting a second chain
/// that the anchor would then follow.
#[test]
fn a_forged_head_row_stops_appends_instead_of_breaking_the_chain() {
    let Some(db) = scratch("a_forged_head_row_stops_appends_instead_of_breaking_the_chain") else {
        return;
    };
    init_store(db.url(), 365);
    let (_, log) = open_replica(db.url());
    let record = test_record;
    log.append(record()).unwrap();
    let before = log.verify(None).unwrap();
    let mut sql = postgres::Client::connect(db.url(), postgres::NoTls).unwrap();
    let real: Vec<u8> = sql
        .query_one("SELECT hash FROM kluis_audit_head", &[])
        .unwrap()
        .get(0);
    sql.execute(
        "UPDATE kluis_audit_head SET hash = $1",
        &[&vec![0xabu8; 48]],
    )
    .unwrap();
    let err = log.append(record()).unwrap_err();
    assert!(
        matches!(
            err,
            attestation_verifier::audit::AuditError::HeadMismatch { .. }
        ),
        "{err}"
    );
    let rows: i64 = sql
        .query_one("SELECT count(*) FROM kluis_audit", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        u64::try_from(rows).unwrap(),
        before.records,
        "nothing appended"
    );

    // The head row put back: appends go on, on the one chain.
    sql.execute("UPDATE kluis_audit_head SET hash = $1", &[&real])
        .unwrap();
    log.append(record()).unwrap();
    assert_eq!(log.verify(None).unwrap().records, before.records + 1);
}

/// Someone who can write the database but does not hold the store's root
/// appends a record with a valid hash and chain (here: an administrator
/// destroying a key) and moves the head row to it. No replica builds on it,
/// and no reader takes it: verification, reading and appends all name it
/// as unauthenticated. A row copied from elsewhere in the log, with its own
/// authenticator, is refused the same way.
#[test]
fn a_record_added_to_the_database_without_the_root_is_refused() {
    let Some(db) = scratch("a_record_added_to_the_database_without_the_root_is_refused") else {
        return;
    };
    init_store(db.url(), 365);
    let (_, log) = open_replica(db.url());
    let record = test_record;
    log.append(record()).unwrap();
    let before = log.verify(None).unwrap();

    // The forgery, from what the database shows.
    let last = log.records(&AuditFilter::default()).unwrap().pop().unwrap();
    let mut forged = last.clone();
    forged.seq = last.seq + 1;
    forged.operation = "key.destroy".to_owned();
    forged.key_id = Some(KEY.to_owned());
    forged.actor = Actor::Admin {
        name: "alice".to_owned(),
        role: "key-admin".to_owned(),
    };
    forged.prev_hash = last.hash;
    forged.hash = forged.compute_hash();
    let line = serde_json::to_vec(&forged).unwrap();
    let seq = i64::try_from(forged.seq).unwrap();
    let mut sql = postgres::Client::connect(db.url(), postgres::NoTls).unwrap();
    let insert_and_move = |sql: &mut postgres::Client, mac: Option<Vec<u8>>| {
        let mut tx = sql.transaction().unwrap();
        tx.execute(
            "INSERT INTO kluis_audit (seq, line, mac) VALUES ($1, $2, $3)",
            &[&seq, &line, &mac],
        )
        .unwrap();
        tx.execute(
            "UPDATE kluis_audit_head SET seq = $1, hash = $2",
            &[&seq, &forged.hash.as_slice()],
        )
        .unwrap();
        tx.commit().unwrap();
    };
    // A real authenticator, of another record.
    let borrowed: Vec<u8> = sql
        .query_one("SELECT mac FROM kluis_audit WHERE seq = $1", &[&(seq - 1)])
        .unwrap()
        .get(0);
    insert_and_move(&mut sql, Some(borrowed));

    let unauthenticated = |err: attestation_verifier::audit::AuditError| {
        assert!(
            err.to_string().contains(&format!(
                "audit record {} in the database has no valid authenticator",
                forged.seq
            )),
            "{err}"
        );
    };
    // This handle, and a replica opened afresh.
    unauthenticated(log.append(record()).unwrap_err());
    unauthenticated(log.verify(None).unwrap_err());
    unauthenticated(log.records(&AuditFilter::default()).unwrap_err());
    let (_, fresh) = open_replica(db.url());
    unauthenticated(fresh.append(record()).unwrap_err());
    unauthenticated(fresh.verify(None).unwrap_err());
    let rows: i64 = sql
        .query_one("SELECT count(*) FROM kluis_audit", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        u64::try_from(rows).unwrap(),
        before.records + 1,
        "nothing built on it"
    );

    // The forged row removed, as the tables' owner could (triggers off).
    let remove_last = |sql: &mut postgres::Client| {
        sql.batch_execute(
            "ALTER TABLE kluis_audit DISABLE TRIGGER kluis_audit_no_update; \
             DELETE FROM kluis_audit WHERE seq = (SELECT max(seq) FROM kluis_audit); \
             ALTER TABLE kluis_audit ENABLE TRIGGER kluis_audit_no_update;",
        )
        .unwrap();
    };
    remove_last(&mut sql);
    // Without any authenticator the database refuses the row (an older
    // replica still running after the migration cannot write one either),
    // and refuses to move the legacy boundary.
    let refused = sql
        .execute(
            "INSERT INTO kluis_audit (seq, line) VALUES ($1, $2)",
            &[&seq, &line],
        )
        .unwrap_err();
    assert!(
        refused.to_string().contains("has no authenticator")
            || format!("{refused:?}").contains("has no authenticator"),
        "{refused:?}"
    );
    sql.execute("UPDATE kluis_audit_legacy SET through = $1", &[&seq])
        .unwrap_err();
    // The owner can drop the triggers; the replicas still refuse the row,
    // even with the boundary moved past it: records after the first
    // authenticated one need theirs.
    sql.batch_execute(
        "ALTER TABLE kluis_audit DISABLE TRIGGER kluis_audit_needs_mac; \
         ALTER TABLE kluis_audit_legacy DISABLE TRIGGER kluis_audit_legacy_fixed;",
    )
    .unwrap();
    insert_and_move(&mut sql, None);
    unauthenticated(fresh.verify(None).unwrap_err());
    unauthenticated(fresh.append(record()).unwrap_err());
    sql.execute("UPDATE kluis_audit_legacy SET through = $1", &[&seq])
        .unwrap();
    let (_, reopened) = open_replica(db.url());
    unauthenticated(reopened.verify(None).unwrap_err());

    // One row holding two records (each chained, the second where the head
    // row points): not read as two.
    remove_last(&mut sql);
    let mut second = forged.clone();
    second.seq = forged.seq + 1;
    second.prev_hash = forged.hash;
    second.hash = second.compute_hash();
    let mut two = line.clone();
    two.push(b'\n');
    two.extend_from_slice(&serde_json::to_vec(&second).unwrap());
    sql.execute(
        "INSERT INTO kluis_audit (seq, line) VALUES ($1, $2)",
        &[&seq, &two],
    )
    .unwrap();
    sql.execute(
        "UPDATE kluis_audit_head SET seq = $1, hash = $2",
        &[&(seq + 1), &second.hash.as_slice()],
    )
    .unwrap();
    let err = reopened.verify(None).unwrap_err();
    assert!(err.to_string().contains("spans several lines"), "{err}");
}

/// A log from before authenticators (its rows have none; migration 2
/// recorded its head as `through`) still opens, verifies and takes
/// appends, which carry authenticators from then on.
#[test]
fn records_from_before_authenticators_are_still_read() {
    let Some(db) = scratch("records_from_before_authenticators_are_still_read") else {
        return;
    };
    init_store(db.url(), 365);
    let (_, log) = open_replica(db.url());
    let before = log.verify(None).unwrap();
    assert!(before.records > 0);
    // As a log of schema 1 is after migration 2.
    let mut sql = postgres::Client::connect(db.url(), postgres::NoTls).unwrap();
    sql.batch_execute(
        "ALTER TABLE kluis_audit DISABLE TRIGGER kluis_audit_no_update; \
         UPDATE kluis_audit SET mac = NULL; \
         ALTER TABLE kluis_audit ENABLE TRIGGER kluis_audit_no_update; \
         ALTER TABLE kluis_audit_legacy DISABLE TRIGGER kluis_audit_legacy_fixed; \
         UPDATE kluis_audit_legacy SET through = (SELECT seq FROM kluis_audit_head); \
         ALTER TABLE kluis_audit_legacy ENABLE TRIGGER kluis_audit_legacy_fixed;",
    )
    .unwrap();
    let (_, upgraded) = open_replica(db.url());
    assert_eq!(upgraded.verify(None).unwrap(), before);
    upgraded.append(test_record()).unwrap();
    assert_eq!(upgraded.verify(None).unwrap().records, before.records + 1);
    let unauthenticated: i64 = sql
        .query_one("SELECT count(*) FROM kluis_audit WHERE mac IS NULL", &[])
        .unwrap()
        .get(0);
    assert_eq!(u64::try_from(unauthenticated).unwrap(), before.records);
}

/// An administrator's change whose `allowed` record fails to commit (here a
/// constraint checked at COMMIT refuses it; a commit whose answer is lost
/// looks the same to the replica, though the record may then be there) does
/// not take effect, and the log says at once that the record allowing it,
/// if it is there, is void.
#[test]
fn a_change_whose_record_may_not_have_committed_is_voided() {
    let Some(db) = scratch("a_change_whose_record_may_not_have_committed_is_voided") else {
        return;
    };
    init_store(db.url(), 365);
    let (kms, log) = open_replica(db.url());
    let name = KeyName::parse(KEY).unwrap();
    let mut sql = postgres::Client::connect(db.url(), postgres::NoTls).unwrap();
    sql.batch_execute(
        r#"CREATE FUNCTION refuse_disable() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               IF convert_from(NEW.line, 'UTF8') LIKE '%"operation":"key.disable"%"decision":"allowed"%' THEN
                   RAISE EXCEPTION 'refused at commit';
               END IF;
               RETURN NULL;
           END; $$;
           CREATE CONSTRAINT TRIGGER refuse_disable AFTER INSERT ON kluis_audit
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_disable();"#,
    )
    .unwrap();
    let before = log.verify(None).unwrap();
    kms.disable_key(&name).unwrap_err();
    assert_eq!(
        kms.key(&name).unwrap().state,
        attestation_verifier::keys::KeyState::Enabled,
        "the change took effect"
    );
    let records = log.records(&AuditFilter::default()).unwrap();
    assert_eq!(records.len() as u64, before.records + 1, "{records:?}");
    let last = records.last().unwrap();
    assert_eq!(last.operation, "key.disable");
    assert_eq!(last.decision, Decision::Refused);
    assert!(
        last.reason
            .as_deref()
            .unwrap_or_default()
            .contains("the record allowing it is void"),
        "{last:?}"
    );
    // Once the database takes records again, the change goes through.
    sql.batch_execute("DROP TRIGGER refuse_disable ON kluis_audit")
        .unwrap();
    kms.disable_key(&name).unwrap();
}
