//! Three `attestation-verifier serve --database` processes on one
//! PostgreSQL database, under concurrent key releases; one is killed with
//! SIGKILL mid-load. Every release a client saw succeed has exactly one
//! audit record, the chain verifies, and no nonce is accepted twice: every
//! request that was answered is replayed to every surviving replica and
//! refused.
//!
//! Needs KLUIS_TEST_DATABASE_URL (SKIPPED without it; a failure with
//! KLUIS_REQUIRE_DATABASE=1, as in CI). Bounded: three replicas, four
//! clients, a few seconds of load, loopback only.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

mod support;

use attestation_verifier::audit::{AuditFilter, AuditLog, Decision};
use kluis_keystore::pg::scratch::{self, ScratchDatabase};
use kluis_nsm::sim::{SimConfig, SimRoot, SimulatedNsm};
use kluis_proto::message::{read_message_sync, write_message_sync, Request, Response};
use kluis_proto::{ErrorCode, KeyRequest};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{run, verifier_command, write_private};

const KEY: &str = "agency-a/app-x/prod";
const IMAGE: &[u8] = b"replicated-v1";
const MAX_FRAME: usize = 1 << 20;

struct Replica {
    child: Option<Child>,
    address: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Setup {
    _db: ScratchDatabase,
    dir: tempfile::TempDir,
    url: String,
}

impl Setup {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn command(&self, credential: Option<&str>, args: &[&str]) -> Command {
        let mut cmd = verifier_command();
        cmd.env("KLUIS_DATABASE_URL", &self.url)
            .env("KLUIS_ROOT_KEY_FILE", self.path("root.key"));
        if let Some(role) = credential {
            cmd.env(
                "KLUIS_CREDENTIAL_FILE",
                self.path(&format!("creds/{role}.credential")),
            );
        }
        cmd.args(args);
        cmd
    }

    fn ok(&self, credential: Option<&str>, args: &[&str]) -> serde_json::Value {
        let (code, out, err) = run(&mut self.command(credential, args));
        assert_eq!(code, 0, "{args:?}: {out} {err}");
        out
    }

    fn serve(&self, root_pem: &str) -> Replica {
        let mut child = self
            .command(
                Some("app-admin"),
                &[
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--dangerous-nsm-root",
                    root_pem,
                ],
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let announced: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        let address = announced["listening"]
            .as_str()
            .unwrap()
            .trim_start_matches("tcp:")
            .to_owned();
        Replica {
            child: Some(child),
            address,
        }
    }
}

/// One exchange on a fresh connection: a challenge, then a release with a
/// document carrying its nonce. `None` when the replica is unreachable or
/// went away; otherwise the answer and the request, for replays.
fn release(address: &str, nsm: &SimulatedNsm) -> Option<(Response, Vec<u8>, KeyRequest)> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .ok()?;
    write_message_sync(&mut stream, &Request::Challenge, MAX_FRAME).ok()?;
    let Response::Challenge { nonce, .. } = read_message_sync(&mut stream, MAX_FRAME).ok()? else {
        return None;
    };
    let (document, request) = support::attested_generate(nsm, KEY, nonce);
    write_message_sync(
        &mut stream,
        &Request::KeyRelease {
            attestation_document: document.clone(),
            request: request.clone(),
        },
        MAX_FRAME,
    )
    .ok()?;
    let answer: Response = read_message_sync(&mut stream, MAX_FRAME).ok()?;
    Some((answer, document, request))
}

#[test]
fn a_replica_killed_under_load_loses_and_duplicates_nothing() {
    let Some(server) = scratch::server("a_replica_killed_under_load_loses_and_duplicates_nothing")
        .expect("PostgreSQL is required here")
    else {
        return;
    };
    let db = ScratchDatabase::create(&server).unwrap();
    let setup = Setup {
        url: db.url().to_owned(),
        _db: db,
        dir: tempfile::tempdir().unwrap(),
    };
    setup.ok(
        None,
        &[
            "init",
            "--generate-root-key",
            "--credentials-out",
            &setup.path("creds"),
        ],
    );
    setup.ok(Some("key-admin"), &["key", "create", KEY]);
    let pcr0 = SimConfig::default()
        .with_image(IMAGE.to_vec(), None)
        .boot_pcr_values()[0];
    let policy = setup.path("policy.toml");
    write_private(
        &policy,
        &format!(
            "operations = [\"generate\"]\nmax_document_age_seconds = 300\n\
             [[measurements]]\nname = \"v1\"\npcr0 = \"{}\"\n",
            hex::encode(pcr0)
        ),
    );
    setup.ok(Some("app-admin"), &["policy", "set", KEY, &policy]);
    let root = Arc::new(SimRoot::generate().unwrap());
    let root_pem = setup.path("root.pem");
    write_private(&root_pem, &root.root_pem());
    let nsm = Arc::new(
        SimulatedNsm::new(
            SimConfig::default()
                .with_root(Arc::clone(&root))
                .with_image(IMAGE.to_vec(), None),
        )
        .unwrap(),
    );

    let replicas: Vec<Arc<Mutex<Replica>>> = (0..3)
        .map(|_| Arc::new(Mutex::new(setup.serve(&root_pem))))
        .collect();
    let addresses: Vec<String> = replicas
        .iter()
        .map(|r| r.lock().unwrap().address.clone())
        .collect();

    // Four clients, round-robin over the replicas, for a bounded time.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (addresses, nsm, stop) = (addresses.clone(), Arc::clone(&nsm), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut answered = Vec::new();
                let mut i = c;
                while !stop.load(Ordering::SeqCst) && answered.len() < 5_000 {
                    let address = &addresses[i % addresses.len()];
                    i += 1;
                    if let Some(exchange) = release(address, &nsm) {
                        answered.push(exchange);
                    }
                }
                answered
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    let killed_at = Instant::now();
    {
        let mut victim = replicas[0].lock().unwrap();
        let mut child = victim.child.take().unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::SeqCst);
    let answered: Vec<(Response, Vec<u8>, KeyRequest)> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(killed_at.elapsed() < Duration::from_secs(60));

    let released: Vec<&(Response, Vec<u8>, KeyRequest)> = answered
        .iter()
        .filter(|(r, _, _)| matches!(r, Response::KeyRelease(_)))
        .collect();
    eprintln!(
        "{} exchanges answered, {} keys released, replica 1 killed mid-load",
        answered.len(),
        released.len()
    );
    assert!(
        released.len() >= 4,
        "the load released keys: {} of {} answered",
        released.len(),
        answered.len()
    );
    // Nothing but releases or an outage refusal: no replica refused a
    // genuine request for a wrong reason while another was killed.
    for (answer, _, _) in &answered {
        assert!(
            matches!(
                answer,
                Response::KeyRelease(_)
                    | Response::Error {
                        code: ErrorCode::Unavailable
                    }
            ),
            "{answer:?}"
        );
    }

    // Every release a client saw has exactly one allowed record, naming
    // its document; the chain is intact.
    let store = kluis_keystore::Store::open_database(
        kluis_keystore::Database::connect(&setup.url).unwrap(),
        kluis_keystore::RootSecret::from_key_file(std::path::Path::new(&setup.path("root.key")))
            .unwrap(),
    )
    .unwrap();
    let log = AuditLog::open_database(&store, None).unwrap();
    log.verify(None).unwrap();
    let allowed = log
        .records(&AuditFilter {
            decision: Some(Decision::Allowed),
            ..AuditFilter::default()
        })
        .unwrap();
    let mut per_document: std::collections::HashMap<&[u8], usize> =
        std::collections::HashMap::new();
    for record in allowed
        .iter()
        .filter(|r| r.operation == "key.release.generate")
    {
        *per_document
            .entry(record.attestation_document.as_deref().unwrap())
            .or_default() += 1;
    }
    for (_, document, _) in &released {
        assert_eq!(
            per_document.get(document.as_slice()),
            Some(&1),
            "one record per release a client saw"
        );
    }

    // Replayed to every surviving replica: refused, never a second key.
    for (_, document, request) in released.iter().take(20) {
        for address in &addresses[1..] {
            let mut stream = TcpStream::connect(address).unwrap();
            write_message_sync(
                &mut stream,
                &Request::KeyRelease {
                    attestation_document: document.clone(),
                    request: request.clone(),
                },
                MAX_FRAME,
            )
            .unwrap();
            let answer: Response = read_message_sync(&mut stream, MAX_FRAME).unwrap();
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
    }

    // A challenge its connection never used is withdrawn when the
    // connection closes: its row leaves the shared table.
    let nonce = {
        let mut stream = TcpStream::connect(&addresses[1]).unwrap();
        write_message_sync(&mut stream, &Request::Challenge, MAX_FRAME).unwrap();
        match read_message_sync(&mut stream, MAX_FRAME).unwrap() {
            Response::Challenge { nonce, .. } => nonce,
            other => panic!("{other:?}"),
        }
    };
    let mut sql = postgres::Client::connect(&setup.url, postgres::NoTls).unwrap();
    let rows = |sql: &mut postgres::Client| -> i64 {
        sql.query_one(
            "SELECT count(*) FROM kluis_nonces WHERE nonce = $1",
            &[&nonce.as_slice()],
        )
        .unwrap()
        .get(0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while rows(&mut sql) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(rows(&mut sql), 0, "the unused challenge was withdrawn");
    // And the replica still serves.
    assert!(matches!(
        release(&addresses[1], &nsm),
        Some((Response::KeyRelease(_), _, _))
    ));
}
