//! A job's life as a hostile parent sees it, speaking the job protocol by
//! hand on loopback: the deadline stops every part of a job and nothing
//! follows `Failed`; slots are held only by jobs, only until they are gone;
//! stalled starts take no slot; a legitimate job gets through while hostile
//! connections are held open; a workload failure is told only after the
//! whole input and progress carries no record counts; an image without an
//! allowed-jobs list refuses parent-chosen data-dependent workloads.
//!
//! Every test is bounded (a few connections, a few seconds of trickling)
//! and waits on events (frames, the service's own counters), not on sleeps.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::Duration;

use kluis_enclave::server::ServiceStats;
use kluis_proto::job::{FailureKind, JobEvent, JobRequest, JobSpec, WorkloadSpec};
use kluis_tests::world::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Verifier, relay, and an enclave with `max_jobs`, adjusted by `tune`.
struct Setup {
    world: World,
    _verifier: Running,
    _relay: Running,
    enclave: Running,
    stats: Arc<ServiceStats>,
}

async fn setup(max_jobs: usize, tune: impl FnOnce(&mut kluis_enclave::EnclaveContext)) -> Setup {
    let world = World::new();
    let verifier = world.start_verifier(None).await;
    let relay = start_relay(&verifier.address, Arc::new(kluis_parent::hook::PassThrough)).await;
    let mut ctx = world.enclave_context(GOOD_IMAGE, &relay.address);
    tune(&mut ctx);
    let stats = Arc::clone(&ctx.stats);
    let enclave = start_enclave_limited(ctx, max_jobs).await;
    Setup {
        world,
        _verifier: verifier,
        _relay: relay,
        enclave,
        stats,
    }
}

fn tcp_address(address: &kluis_transport::Address) -> String {
    match address {
        kluis_transport::Address::Tcp(a) => a.clone(),
        other => panic!("not TCP: {other}"),
    }
}

fn frame(request: &JobRequest) -> Vec<u8> {
    kluis_proto::job::encode_job_frame(request).unwrap()
}

fn start(workload: WorkloadSpec, secrets: Vec<kluis_proto::job::WrappedSecret>) -> Vec<u8> {
    frame(&JobRequest::Start(JobSpec {
        job_id: "hostile".into(),
        workload,
        output_key: OUTPUT_KEY.into(),
        secrets,
        authorisation: None,
    }))
}

fn data(bytes: &[u8]) -> Vec<u8> {
    frame(&JobRequest::Data(bytes.to_vec()))
}

/// Everything the enclave sends on one connection, until it closes it (at
/// most `limit`).
async fn read_events(mut reader: tokio::net::tcp::OwnedReadHalf, limit: Duration) -> Vec<JobEvent> {
    let mut events = Vec::new();
    let read_all = async {
        while let Ok(e) = kluis_proto::job::read_job_message::<JobEvent, _>(&mut reader).await {
            events.push(e);
        }
    };
    tokio::time::timeout(limit, read_all)
        .await
        .expect("the enclave closed the connection in time");
    events
}

/// The output bytes among `events`.
fn output(events: &[JobEvent]) -> Vec<u8> {
    events
        .iter()
        .filter_map(|e| match e {
            JobEvent::Data(d) => Some(d.as_slice()),
            _ => None,
        })
        .flatten()
        .copied()
        .collect()
}

fn failed_kind(event: &JobEvent) -> Option<FailureKind> {
    match event {
        JobEvent::Failed { kind, .. } => Some(*kind),
        _ => None,
    }
}

/// Wait until `check` holds on `stats` (polling the service's counters),
/// at most `limit`.
async fn until(stats: &ServiceStats, limit: Duration, check: impl Fn(&ServiceStats) -> bool) {
    let waited = tokio::time::timeout(limit, async {
        while !check(stats) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "within {limit:?}: connections {}, jobs {}, threads {}",
        stats.connections(),
        stats.jobs(),
        stats.threads()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_deadline_a_job_fails_sends_nothing_after_and_frees_its_slot() {
    let s = setup(2, |ctx| ctx.job_timeout = Duration::from_secs(2)).await;
    // Over 1 MiB, so that output frames stream before the deadline.
    let plain = records(80_000);
    let input = s.world.encrypt(INPUT_KEY, &plain, 64 * 1024);
    let (head, tail) = input.split_at(input.len() - 300);
    let tail = tail.to_vec();
    let stream = TcpStream::connect(tcp_address(&s.enclave.address))
        .await
        .unwrap();
    let (reader, mut writer) = stream.into_split();
    let events = tokio::spawn(read_events(reader, Duration::from_secs(30)));
    writer
        .write_all(&start(WorkloadSpec::Identity, vec![]))
        .await
        .unwrap();
    for chunk in head.chunks(256 * 1024) {
        writer.write_all(&data(chunk)).await.unwrap();
    }
    // The rest, a byte every 20 ms (6 s: well past the deadline), then End.
    // Each frame resets the idle timeout, never the deadline. Writes fail
    // once the enclave has closed the connection; the parent goes on.
    let trickle = tokio::spawn(async move {
        for byte in tail {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if writer.write_all(&data(&[byte])).await.is_err() {
                return false;
            }
        }
        writer.write_all(&frame(&JobRequest::End)).await.is_ok()
    });
    let events = events.await.unwrap();
    // Failed, and it is the last thing the enclave sent.
    let last = events.last().expect("some events");
    assert_eq!(
        failed_kind(last),
        Some(FailureKind::JobTimeout),
        "{events:?}"
    );
    assert_eq!(
        events.iter().filter(|e| failed_kind(e).is_some()).count(),
        1
    );
    assert!(!events.iter().any(|e| matches!(e, JobEvent::Done(_))));
    // The job's parts are gone by the time Failed arrives: no thread, no
    // slot (the counters drop as the connection task returns).
    until(&s.stats, Duration::from_secs(1), |st| {
        st.jobs() == 0 && st.threads() == 0 && st.connections() == 0
    })
    .await;
    // What the parent got never decrypts as complete.
    let out = output(&events);
    assert!(
        !out.is_empty(),
        "some output was streamed before the deadline"
    );
    assert!(s.world.decrypt(&out).is_err());
    // The enclave stopped reading: the trickler could not finish.
    assert!(
        !trickle.await.unwrap(),
        "the enclave kept reading after Failed"
    );
    // And the enclave serves the next job normally.
    let out_path = s.world.path("after.kenv");
    run(
        &job(&s.enclave.address, WorkloadSpec::Identity, vec![]),
        input.clone(),
        &out_path,
    )
    .await
    .unwrap();
    assert_eq!(
        s.world.decrypt(&std::fs::read(&out_path).unwrap()).unwrap(),
        plain
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_tricklers_never_hold_more_than_max_jobs() {
    const MAX_JOBS: usize = 2;
    const HOSTILE: usize = 8;
    let s = setup(MAX_JOBS, |ctx| ctx.job_timeout = Duration::from_secs(2)).await;
    let input = s.world.encrypt(INPUT_KEY, &records(10), 1024);
    let mut tricklers = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..HOSTILE {
        let stream = TcpStream::connect(tcp_address(&s.enclave.address))
            .await
            .unwrap();
        let (reader, mut writer) = stream.into_split();
        readers.push(tokio::spawn(read_events(reader, Duration::from_secs(30))));
        let header = input[..40].to_vec();
        tricklers.push(tokio::spawn(async move {
            if writer
                .write_all(&start(WorkloadSpec::Identity, vec![]))
                .await
                .is_err()
            {
                return;
            }
            // One byte of the envelope header every 100 ms (4 s).
            for byte in header {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if writer.write_all(&data(&[byte])).await.is_err() {
                    return;
                }
            }
        }));
    }
    // While they trickle: never more than MAX_JOBS jobs, never more than a
    // header reader's thread per job.
    let watch = {
        let stats = Arc::clone(&s.stats);
        tokio::spawn(async move {
            let mut most = (0, 0, 0);
            for _ in 0..400 {
                most.0 = most.0.max(stats.jobs());
                most.1 = most.1.max(stats.threads());
                most.2 = most.2.max(stats.connections());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            most
        })
    };
    let mut kinds = Vec::new();
    for r in readers {
        let events = r.await.unwrap();
        kinds.push(events.last().and_then(failed_kind));
    }
    let (jobs, threads, connections) = watch.await.unwrap();
    assert!(jobs <= MAX_JOBS, "{jobs} jobs at once");
    assert!(jobs >= 1, "the watch saw the jobs");
    assert!(threads <= MAX_JOBS, "{threads} job threads at once");
    assert!(connections <= HOSTILE);
    // Every connection ended with the deadline (those that never got a
    // slot too: the deadline runs from accept).
    assert!(
        kinds.iter().all(|k| *k == Some(FailureKind::JobTimeout)),
        "{kinds:?}"
    );
    until(&s.stats, Duration::from_secs(1), |st| {
        st.jobs() == 0 && st.threads() == 0 && st.connections() == 0
    })
    .await;
    for t in tricklers {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_start_is_closed_without_a_slot() {
    let s = setup(1, |ctx| ctx.start_timeout = Duration::from_secs(1)).await;
    let start_frame = start(WorkloadSpec::Identity, vec![]);
    let stream = TcpStream::connect(tcp_address(&s.enclave.address))
        .await
        .unwrap();
    let (reader, mut writer) = stream.into_split();
    // Half a Start, then nothing.
    writer
        .write_all(&start_frame[..start_frame.len() / 2])
        .await
        .unwrap();
    until(&s.stats, Duration::from_secs(5), |st| st.connections() == 1).await;
    // Meanwhile the only slot is free: a real job runs.
    let plain = records(100);
    let input = s.world.encrypt(INPUT_KEY, &plain, 1024);
    let out = s.world.path("out.kenv");
    run(
        &job(&s.enclave.address, WorkloadSpec::Identity, vec![]),
        input,
        &out,
    )
    .await
    .unwrap();
    assert_eq!(
        s.world.decrypt(&std::fs::read(&out).unwrap()).unwrap(),
        plain
    );
    // The stalled connection is closed, with nothing said, and never held
    // a slot.
    let events = read_events(reader, Duration::from_secs(5)).await;
    assert!(events.is_empty(), "{events:?}");
    until(&s.stats, Duration::from_secs(1), |st| {
        st.connections() == 0 && st.jobs() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legitimate_job_gets_through_while_hostile_connections_are_held() {
    let s = setup(2, |ctx| {
        ctx.job_timeout = Duration::from_secs(20);
        ctx.start_timeout = Duration::from_secs(20);
    })
    .await;
    let input = s.world.encrypt(INPUT_KEY, &records(10), 1024);
    let start_frame = start(WorkloadSpec::Identity, vec![]);
    let mut held = Vec::new();
    // Five connections that never finish their Start, and one job stuck in
    // its header: they hold one slot of two, and the start stage.
    for _ in 0..5 {
        let mut stream = TcpStream::connect(tcp_address(&s.enclave.address))
            .await
            .unwrap();
        stream.write_all(&start_frame[..3]).await.unwrap();
        held.push(stream);
    }
    let mut stuck = TcpStream::connect(tcp_address(&s.enclave.address))
        .await
        .unwrap();
    stuck.write_all(&start_frame).await.unwrap();
    stuck.write_all(&data(&input[..10])).await.unwrap();
    until(&s.stats, Duration::from_secs(5), |st| {
        st.connections() == 6 && st.jobs() == 1
    })
    .await;
    let plain = records(2_000);
    let input = s.world.encrypt(INPUT_KEY, &plain, 1024);
    let out = s.world.path("legit.kenv");
    run(
        &job(&s.enclave.address, WorkloadSpec::Identity, vec![]),
        input,
        &out,
    )
    .await
    .unwrap();
    assert_eq!(
        s.world.decrypt(&std::fs::read(&out).unwrap()).unwrap(),
        plain
    );
    // The hostile ones are still held.
    assert_eq!(s.stats.connections(), 6);
    drop(held);
    drop(stuck);
    until(&s.stats, Duration::from_secs(5), |st| {
        st.connections() == 0 && st.jobs() == 0 && st.threads() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_failure_is_told_only_after_the_whole_input_and_progress_has_no_records() {
    let s = setup(2, |_| {}).await;
    // A bad national register number in the first record, then ~3 MiB of
    // good ones.
    let mut plain = b"12345678901,Gent,1\n".to_vec();
    plain.extend_from_slice(&records(180_000));
    assert!(plain.len() > 3 * 1024 * 1024);
    let input = s.world.encrypt(INPUT_KEY, &plain, 64 * 1024);
    let (secret, _) = s.world.new_secret();
    let spec = WorkloadSpec::Pseudonymise {
        column: 0,
        delimiter: b',',
        secret: 0,
        header: false,
        check_national_number: true,
    };
    let stream = TcpStream::connect(tcp_address(&s.enclave.address))
        .await
        .unwrap();
    let (reader, mut writer) = stream.into_split();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<JobEvent>();
    let reading = tokio::spawn(async move {
        let mut reader = reader;
        while let Ok(e) = kluis_proto::job::read_job_message::<JobEvent, _>(&mut reader).await {
            if seen_tx.send(e).is_err() {
                break;
            }
        }
    });
    writer.write_all(&start(spec, vec![secret])).await.unwrap();
    // The input in 64 KiB frames, one every 50 ms (about 2.5 s): the bad
    // record is in the first frame.
    let mut before_end = Vec::new();
    for chunk in input.chunks(64 * 1024) {
        writer.write_all(&data(chunk)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(e) = seen_rx.try_recv() {
            before_end.push(e);
        }
    }
    // Nothing failed before the parent ended the input.
    assert!(
        !before_end.iter().any(|e| failed_kind(e).is_some()),
        "{before_end:?}"
    );
    // Progress went on, coarse, with no record counts.
    let progress: Vec<_> = before_end
        .iter()
        .filter_map(|e| match e {
            JobEvent::Progress(c) => Some(*c),
            _ => None,
        })
        .collect();
    assert!(!progress.is_empty(), "{before_end:?}");
    for p in &progress {
        assert_eq!((p.records_in, p.records_out), (0, 0), "{p:?}");
        assert_eq!(p.bytes_in % (1024 * 1024), 0, "{p:?}");
    }
    assert!(progress.iter().any(|p| p.bytes_in >= 1024 * 1024));
    writer.write_all(&frame(&JobRequest::End)).await.unwrap();
    let mut after = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = seen_rx.recv().await {
            after.push(e);
        }
    })
    .await
    .unwrap();
    reading.await.unwrap();
    assert_eq!(
        after.last().and_then(failed_kind),
        Some(FailureKind::Workload),
        "{after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_allowed_jobs_list_data_dependent_workloads_are_refused() {
    let s = setup(2, |ctx| {
        ctx.unlisted_jobs = kluis_enclave::UnlistedJobs::DataIndependent
    })
    .await;
    let plain = records(50);
    let input = s.world.encrypt(INPUT_KEY, &plain, 1024);
    let (secret, _) = s.world.new_secret();
    let refused = [
        (
            WorkloadSpec::Aggregate {
                by: 1,
                sum: None,
                delimiter: b',',
                header: false,
            },
            vec![],
        ),
        (
            WorkloadSpec::Pseudonymise {
                column: 0,
                delimiter: b',',
                secret: 0,
                header: false,
                check_national_number: false,
            },
            vec![secret],
        ),
        (
            WorkloadSpec::Exec {
                program: "anything".into(),
                args: vec![],
            },
            vec![],
        ),
    ];
    let audited = || {
        s.world
            .broker
            .audit()
            .records(&attestation_verifier::audit::AuditFilter::default())
            .map(|records| records.len())
            .unwrap()
    };
    let before = audited();
    for (spec, secrets) in refused {
        let out = s.world.path("refused.kenv");
        let err = run(
            &job(&s.enclave.address, spec.clone(), secrets),
            input.clone(),
            &out,
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.enclave_kind(),
            Some(FailureKind::JobNotAllowed),
            "{spec:?}: {err}"
        );
        assert!(!out.exists());
    }
    // Refused before any key was asked for: nothing reached the verifier.
    assert_eq!(audited(), before);
    // Data-independent workloads still run.
    for spec in [WorkloadSpec::Identity, WorkloadSpec::Reencrypt] {
        let out = s.world.path("ok.kenv");
        run(&job(&s.enclave.address, spec, vec![]), input.clone(), &out)
            .await
            .unwrap();
        assert_eq!(
            s.world.decrypt(&std::fs::read(&out).unwrap()).unwrap(),
            plain
        );
    }
}
