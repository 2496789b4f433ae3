//! Confidential jobs end to end through the parent, with the simulated NSM:
//! results for many sizes, a recording parent that must see no plaintext and
//! no key, a hostile parent (alter, drop, duplicate, reorder, replay,
//! impostor verifier), faults (verifier down, restarted, enclave killed) and
//! an enclave the policy does not admit.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

use std::sync::Arc;
use std::time::Duration;

use attestation_verifier::audit::{AuditFilter, Decision};
use kluis_parent::hook::{Channel, Direction, FrameHook, Recorder};
use kluis_parent::job::RunError;
use kluis_proto::job::{FailureKind, WorkloadSpec};
use kluis_tests::world::*;

/// The whole deployment: verifier, relay (with `hook`), enclave.
struct Deployment {
    world: World,
    verifier: Running,
    relay: Running,
    enclave: Running,
}

async fn deploy(hook: Arc<dyn FrameHook>) -> Deployment {
    let world = World::new();
    let verifier = world.start_verifier(None).await;
    let relay = start_relay(&verifier.address, hook).await;
    let enclave = world.start_enclave(GOOD_IMAGE, &relay.address).await;
    Deployment {
        world,
        verifier,
        relay,
        enclave,
    }
}

fn pseudonymise() -> WorkloadSpec {
    WorkloadSpec::Pseudonymise {
        column: 0,
        delimiter: b',',
        secret: 0,
        header: false,
        check_national_number: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_jobs_are_exact_for_many_sizes() {
    let d = deploy(Arc::new(kluis_parent::hook::PassThrough)).await;
    // 0 bytes, inside one segment, on and around segment boundaries, many
    // segments, and more than one 256 KiB input chunk.
    for (size, segment) in [
        (0usize, 1024u32),
        (1, 1024),
        (1023, 1024),
        (1024, 1024),
        (1025, 1024),
        (10 * 1024 + 7, 1024),
        (600 * 1024 + 3, 1024),
        (3 * 1024 * 1024 + 11, 65_536),
    ] {
        let plain: Vec<u8> = records(size / 20 + 1)
            .into_iter()
            .cycle()
            .take(size)
            .collect();
        let input = d.world.encrypt(INPUT_KEY, &plain, segment);
        let out = d.world.path(&format!("out-{size}.kenv"));
        let report = run(
            &job(&d.enclave.address, WorkloadSpec::Identity, vec![]),
            input.clone(),
            &out,
        )
        .await
        .unwrap_or_else(|e| panic!("size {size}: {e}"));
        let envelope = std::fs::read(&out).unwrap();
        assert_eq!(d.world.decrypt(&envelope).unwrap(), plain, "size {size}");
        assert_eq!(report.counts.bytes_in, size as u64);
        assert_eq!(report.counts.bytes_out, size as u64);
        assert_eq!(report.input_bytes, input.len() as u64);
        assert_eq!(report.output_bytes, envelope.len() as u64);
        let expected_records = plain.iter().filter(|b| **b == b'\n').count() as u64
            + u64::from(!plain.is_empty() && plain.last() != Some(&b'\n'));
        assert_eq!(report.counts.records_in, expected_records, "size {size}");
        // The output is under a fresh data key of the output master key.
        assert_eq!(report.output_key.as_ref().unwrap().0, OUTPUT_KEY);
        assert_ne!(
            d.world.data_key_of(&envelope).unwrap().expose_secret(),
            d.world.data_key_of(&input).unwrap().expose_secret()
        );
    }
}

/// A file is read from its position (sent with `sendfile` when no hook
/// looks at the frames, read like a reader otherwise); a reader and a pipe
/// give the same job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_input_gives_the_same_job() {
    use kluis_parent::job::{run_job, JobInput};
    use std::io::{Seek, SeekFrom, Write};
    for hook in [
        Arc::new(kluis_parent::hook::PassThrough) as Arc<dyn FrameHook>,
        Arc::new(Recorder::default()),
    ] {
        let d = deploy(hook).await;
        let plain = records(40_000);
        let input = d.world.encrypt(INPUT_KEY, &plain, 65_536);
        let spec = job(&d.enclave.address, WorkloadSpec::Identity, vec![]);
        let check = |name: &str, report: kluis_parent::job::JobReport| {
            let envelope = std::fs::read(d.world.path(name)).unwrap();
            assert_eq!(d.world.decrypt(&envelope).unwrap(), plain, "{name}");
            assert_eq!(report.input_bytes, input.len() as u64, "{name}");
        };

        // A file whose first bytes are not the input, positioned past them.
        let junk = b"not part of the input";
        let path = d.world.path("positioned.input");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(junk).unwrap();
        file.write_all(&input).unwrap();
        drop(file);
        let mut file = std::fs::File::open(&path).unwrap();
        file.seek(SeekFrom::Start(junk.len() as u64)).unwrap();
        let out = d.world.path("from-file.kenv");
        check(
            "from-file.kenv",
            run_job(&spec, file, &out, |_| {}).await.unwrap(),
        );

        let out = d.world.path("from-reader.kenv");
        let reader = JobInput::reader(std::io::Cursor::new(input.clone()));
        check(
            "from-reader.kenv",
            run_job(&spec, reader, &out, |_| {}).await.unwrap(),
        );

        // A pipe is a file that is not a regular file.
        let (read_end, mut write_end) = std::io::pipe().unwrap();
        let feeder = std::thread::spawn({
            let input = input.clone();
            move || write_end.write_all(&input).unwrap()
        });
        let out = d.world.path("from-pipe.kenv");
        let pipe = std::fs::File::from(std::os::fd::OwnedFd::from(read_end));
        check(
            "from-pipe.kenv",
            run_job(&spec, pipe, &out, |_| {}).await.unwrap(),
        );
        feeder.join().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pseudonymise_aggregate_and_reencrypt_give_the_right_results() {
    let d = deploy(Arc::new(kluis_parent::hook::PassThrough)).await;
    let plain = records(2000);
    let input = d.world.encrypt(INPUT_KEY, &plain, 1024);

    // Pseudonymise with a secret only the enclave sees.
    let (secret, secret_key) = d.world.new_secret();
    let out = d.world.path("pseudo.kenv");
    run(
        &job(&d.enclave.address, pseudonymise(), vec![secret]),
        input.clone(),
        &out,
    )
    .await
    .unwrap();
    let result = d.world.decrypt(&std::fs::read(&out).unwrap()).unwrap();
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret_key.expose_secret());
    let expected: Vec<u8> = plain
        .split_inclusive(|b| *b == b'\n')
        .flat_map(|line| {
            let text = std::str::from_utf8(line).unwrap();
            let (nrn, rest) = text.split_once(',').unwrap();
            let tag = aws_lc_rs::hmac::sign(&key, nrn.as_bytes());
            format!("{},{rest}", hex::encode(tag.as_ref())).into_bytes()
        })
        .collect();
    assert_eq!(result, expected);

    // Aggregate: counts and sums per town.
    let out = d.world.path("agg.kenv");
    let spec = WorkloadSpec::Aggregate {
        by: 1,
        sum: Some(2),
        delimiter: b',',
        header: false,
    };
    run(&job(&d.enclave.address, spec, vec![]), input.clone(), &out)
        .await
        .unwrap();
    let result =
        String::from_utf8(d.world.decrypt(&std::fs::read(&out).unwrap()).unwrap()).unwrap();
    let mut expected = std::collections::BTreeMap::<String, (u64, i64)>::new();
    for line in std::str::from_utf8(&plain).unwrap().lines() {
        let f: Vec<&str> = line.split(',').collect();
        let e = expected.entry(f[1].to_owned()).or_default();
        e.0 += 1;
        e.1 += f[2].parse::<i64>().unwrap();
    }
    let mut text = String::from("group,count,sum_of_column_2\n");
    for (town, (n, sum)) in expected {
        text.push_str(&format!("{town},{n},{sum}\n"));
    }
    assert_eq!(result, text);

    // Re-encrypt (data-key rotation): same bytes, new data key.
    let out = d.world.path("rotated.kenv");
    run(
        &job(&d.enclave.address, WorkloadSpec::Reencrypt, vec![]),
        input.clone(),
        &out,
    )
    .await
    .unwrap();
    let rotated = std::fs::read(&out).unwrap();
    assert_eq!(d.world.decrypt(&rotated).unwrap(), plain);
    assert_ne!(
        d.world.data_key_of(&rotated).unwrap().expose_secret(),
        d.world.data_key_of(&input).unwrap().expose_secret()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parent_sees_no_plaintext_and_no_key() {
    let recorder = Arc::new(Recorder::new());
    let d = deploy(recorder.clone()).await;
    let plain = records(3000);
    let input = d.world.encrypt(INPUT_KEY, &plain, 4096);
    let (secret, secret_key) = d.world.new_secret();
    let out = d.world.path("out.kenv");
    let mut job = job(&d.enclave.address, pseudonymise(), vec![secret]);
    job.hook = recorder.clone();
    run(&job, input.clone(), &out).await.unwrap();
    let output = std::fs::read(&out).unwrap();
    let result = d.world.decrypt(&output).unwrap();

    let seen: Vec<u8> = [
        recorder.bytes(Channel::Job),
        recorder.bytes(Channel::Verifier),
    ]
    .concat();
    assert!(
        recorder.bytes(Channel::Verifier).len() > 1000,
        "the key release went through the relay"
    );
    assert!(
        seen.len() > input.len() + output.len() - 1,
        "everything was recorded"
    );
    // No plaintext record, in or out.
    for line in plain.split_inclusive(|b| *b == b'\n') {
        assert!(
            !contains(&seen, &line[..line.len() - 1]),
            "an input record crossed the parent"
        );
        assert!(
            !contains(&seen, &line[..11]),
            "a national register number crossed the parent"
        );
    }
    for line in result
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .take(200)
    {
        assert!(
            !contains(&seen, &line[..64]),
            "a pseudonym crossed the parent"
        );
    }
    // No data key, no secret, no verifier private key (any 16-byte window of it).
    let input_key = d.world.data_key_of(&input).unwrap();
    let output_key = d.world.data_key_of(&output).unwrap();
    for key in [
        input_key.expose_secret(),
        output_key.expose_secret(),
        secret_key.expose_secret(),
    ] {
        for window in key.windows(16) {
            assert!(!contains(&seen, window), "key material crossed the parent");
        }
    }
    let scalar = d.world.identity_private_scalar();
    for window in scalar.windows(16) {
        assert!(
            !contains(&seen, window),
            "the verifier's private key crossed the parent"
        );
    }
}

/// Run one pseudonymisation job through a hostile parent; it must fail,
/// with the enclave saying why, and leave no output.
async fn hostile_job(hostile: Arc<Hostile>, expected_kinds: &[FailureKind]) -> FailureKind {
    let d = deploy(hostile.clone()).await;
    let input = d.world.encrypt(INPUT_KEY, &records(5000), 1024);
    let (secret, _) = d.world.new_secret();
    let out = d.world.path("out.kenv");
    let mut job = job(&d.enclave.address, pseudonymise(), vec![secret]);
    job.hook = hostile.clone();
    let err = run(&job, input, &out)
        .await
        .expect_err("a hostile parent's job must fail");
    assert!(hostile.acted(), "the hostile parent never acted");
    assert!(!out.exists(), "an output was presented");
    let kind = err
        .enclave_kind()
        .unwrap_or_else(|| panic!("the enclave did not say why: {err}"));
    assert!(
        expected_kinds.contains(&kind),
        "kind {kind} ({err}), expected one of {expected_kinds:?}"
    );
    kind
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_parent_on_the_key_release_fails_the_job_closed() {
    use Direction::*;
    let v = Channel::Verifier;
    // The sealed answer altered: the signature or the box fails.
    hostile_job(
        Arc::new(Hostile::new(v, ToEnclave, 1, Tamper::Flip(-10))),
        &[FailureKind::KeyReleaseInvalid],
    )
    .await;
    hostile_job(
        Arc::new(Hostile::new(v, ToEnclave, 1, Tamper::Flip(200))),
        &[FailureKind::KeyReleaseInvalid],
    )
    .await;
    // The challenge's nonce altered (`{"challenge": {"nonce": h'…32…',
    // "expires_at_ms": u64}}`: 30 bytes from the end is in the nonce): the
    // document carries a nonce the verifier never issued.
    hostile_job(
        Arc::new(Hostile::new(v, ToEnclave, 0, Tamper::Flip(-30))),
        &[FailureKind::KeyReleaseRefused],
    )
    .await;
    // The challenge's field name altered: a malformed answer.
    hostile_job(
        Arc::new(Hostile::new(v, ToEnclave, 0, Tamper::Flip(-20))),
        &[FailureKind::KeyReleaseInvalid],
    )
    .await;
    // The request altered on its way: the verifier refuses it.
    hostile_job(
        Arc::new(Hostile::new(v, FromEnclave, 1, Tamper::Flip(-30))),
        &[FailureKind::KeyReleaseRefused],
    )
    .await;
    // Dropped: nothing comes back in time.
    hostile_job(
        Arc::new(Hostile::new(v, FromEnclave, 1, Tamper::Drop)),
        &[FailureKind::VerifierUnavailable],
    )
    .await;
    hostile_job(
        Arc::new(Hostile::new(v, ToEnclave, 1, Tamper::Drop)),
        &[FailureKind::VerifierUnavailable],
    )
    .await;
    // Duplicated answer: the second challenge answer arrives where the keys should.
    hostile_job(
        Arc::new(Hostile::new(v, ToEnclave, 0, Tamper::Duplicate)),
        &[FailureKind::KeyReleaseInvalid],
    )
    .await;
    // A forged length prefix (over the enclave's limit).
    hostile_job(
        Arc::new(Hostile::new(v, ToEnclave, 1, Tamper::Flip(0))),
        &[FailureKind::VerifierUnavailable],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_key_release_answer_is_refused() {
    // Record a genuine answer from one job...
    let recorder = Arc::new(Recorder::new());
    let d = deploy(recorder.clone()).await;
    let input = d.world.encrypt(INPUT_KEY, &records(100), 1024);
    let out = d.world.path("first.kenv");
    run(
        &job(&d.enclave.address, WorkloadSpec::Identity, vec![]),
        input.clone(),
        &out,
    )
    .await
    .unwrap();
    let answers = recorder.frames_of(Channel::Verifier, Direction::ToEnclave);
    assert_eq!(answers.len(), 2, "challenge and key release");
    // ...and play it back in the next job (same enclave, same keys asked for).
    let hostile = Arc::new(Hostile::new(
        Channel::Verifier,
        Direction::ToEnclave,
        1,
        Tamper::Replace(answers[1].clone()),
    ));
    let relay = start_relay(&d.verifier.address, hostile.clone()).await;
    let enclave = d.world.start_enclave(GOOD_IMAGE, &relay.address).await;
    let out2 = d.world.path("second.kenv");
    let err = run(
        &job(&enclave.address, WorkloadSpec::Identity, vec![]),
        input,
        &out2,
    )
    .await
    .unwrap_err();
    assert!(hostile.acted());
    assert_eq!(
        err.enclave_kind(),
        Some(FailureKind::KeyReleaseInvalid),
        "{err}"
    );
    assert!(!out2.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_answering_as_the_verifier_gets_no_key_accepted() {
    // The parent runs its own broker that admits the enclave and releases keys
    // of its own, signed with its own identity key.
    let honest = World::new();
    let impostor = World::new();
    let impostor_service = World::serve_broker(Arc::clone(&impostor.broker), None).await;
    let relay = start_relay(
        &impostor_service.address,
        Arc::new(kluis_parent::hook::PassThrough),
    )
    .await;
    // The enclave pins the honest verifier's key, and shares the impostor's
    // NSM root so that the impostor accepts its documents.
    let nsm = kluis_nsm::sim::SimulatedNsm::new(
        kluis_nsm::sim::SimConfig::default()
            .with_root(Arc::clone(&impostor.root))
            .with_image(GOOD_IMAGE.to_vec(), None),
    )
    .unwrap();
    let ctx =
        kluis_enclave::EnclaveContext::new(Arc::new(nsm), relay.address.clone(), honest.pinned);
    let enclave = start_enclave_with(ctx).await;
    // Input the impostor can open (its own key): it would love to see the output.
    let input = impostor.encrypt(INPUT_KEY, &records(100), 1024);
    let out = impostor.path("stolen.kenv");
    let err = run(
        &job(&enclave.address, WorkloadSpec::Identity, vec![]),
        input,
        &out,
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.enclave_kind(),
        Some(FailureKind::KeyReleaseInvalid),
        "{err}"
    );
    assert!(err.to_string().contains("signature"), "{err}");
    assert!(!out.exists());
}

/// An input whose header names one master key while its wrapped data key is
/// under another (made here by someone holding the data key, so that even
/// the header's tag is right): the key the verifier releases says which
/// master key it is really under, and the enclave uses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_whose_header_names_another_master_key_is_refused() {
    use std::io::Write as _;
    let d = deploy(Arc::new(kluis_parent::hook::PassThrough)).await;
    let plain = records(100);
    let honest = d.world.encrypt(INPUT_KEY, &plain, 1024);
    let data_key = d.world.data_key_of(&honest).unwrap();
    let (header, _) = kluis_envelope::EnvelopeHeader::from_bytes(&honest).unwrap();
    let renamed = kluis_envelope::WrappedKey::new(
        OUTPUT_KEY,
        header.wrapped_key().cmk_version(),
        header.wrapped_key().wrapped_bytes().to_vec(),
    )
    .unwrap();
    let mut w =
        kluis_envelope::EnvelopeWriter::with_segment_size(Vec::new(), &data_key, renamed, 1024)
            .unwrap();
    w.write_all(&plain).unwrap();
    let forged = w.finish().unwrap();
    let out = d.world.path("renamed.kenv");
    let err = run(
        &job(&d.enclave.address, WorkloadSpec::Identity, vec![]),
        forged,
        &out,
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.enclave_kind(),
        Some(FailureKind::InputTampered),
        "{err}"
    );
    assert!(err.to_string().contains(INPUT_KEY), "{err}");
    assert!(!out.exists());
    // The honest input runs.
    run(
        &job(&d.enclave.address, WorkloadSpec::Identity, vec![]),
        honest,
        &out,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_parent_on_the_data_fails_the_job_or_the_decryption() {
    use Direction::*;
    let j = Channel::Job;
    // Input frames: 0 = Start, 1.. = Data (INPUT_CHUNK each), last = End.
    let d = deploy(Arc::new(kluis_parent::hook::PassThrough)).await;
    let plain = records(120_000); // ~3 MiB: several Data frames
    let input = d.world.encrypt(INPUT_KEY, &plain, 1024);
    // Each outcome is deterministic: frame 1 starts with the envelope's
    // header, frames 2.. are whole 1 MiB chunks from the middle.
    let frames = input.len().div_ceil(kluis_parent::job::INPUT_CHUNK);
    for (tamper, index, kinds) in [
        (Tamper::Flip(-100), 2, &[FailureKind::InputTampered][..]),
        // A middle chunk missing: the segments after it are misaligned
        // (truncation is only a missing end).
        (Tamper::Drop, 2, &[FailureKind::InputTampered][..]),
        (Tamper::Duplicate, 2, &[FailureKind::InputTampered][..]),
        // The header's frame after the next one: ciphertext read as a header.
        (Tamper::SwapWithNext, 1, &[FailureKind::InputHeader][..]),
        (Tamper::SwapWithNext, 2, &[FailureKind::InputTampered][..]),
        // The header's frame missing: likewise.
        (Tamper::Drop, 1, &[FailureKind::InputHeader][..]),
        // The last data frame missing, End sent: the envelope has no end.
        (Tamper::Drop, frames, &[FailureKind::InputTruncated][..]),
    ] {
        let hostile = Arc::new(Hostile::new(j, ToEnclave, index, tamper.clone()));
        let mut job = job(&d.enclave.address, WorkloadSpec::Identity, vec![]);
        job.hook = hostile.clone();
        let out = d.world.path("out.kenv");
        let err = run(&job, input.clone(), &out)
            .await
            .expect_err("tampered input must fail");
        assert!(hostile.acted(), "{tamper:?}");
        let kind = err
            .enclave_kind()
            .unwrap_or_else(|| panic!("{tamper:?}: {err}"));
        assert!(kinds.contains(&kind), "{tamper:?}: {kind} ({err})");
        assert!(!out.exists(), "{tamper:?}: an output was presented");
    }
    // Dropping End: the enclave waits for it and never says Done.
    let hostile = Arc::new(Hostile::new(j, ToEnclave, frames + 1, Tamper::Drop));
    let mut job_no_end = job(&d.enclave.address, WorkloadSpec::Identity, vec![]);
    job_no_end.hook = hostile.clone();
    job_no_end.idle_timeout = Duration::from_secs(30);
    let out = d.world.path("no-end.kenv");
    let err = run(&job_no_end, input.clone(), &out).await.unwrap_err();
    assert!(hostile.acted());
    assert!(!out.exists());
    assert_eq!(err.enclave_kind(), Some(FailureKind::IdleTimeout), "{err}");

    // On the way out the parent can damage the output, but the controller's
    // decryption catches it: a changed byte, a dropped final frame.
    for (tamper, what) in [(Tamper::Flip(-40), "forged"), (Tamper::Drop, "truncated")] {
        // Frames from the enclave: 0 = Started, 1 = the only Data (small job), 2 = Done.
        let hostile = Arc::new(Hostile::new(j, FromEnclave, 1, tamper));
        let mut job = job(&d.enclave.address, WorkloadSpec::Identity, vec![]);
        job.hook = hostile.clone();
        let small = d.world.encrypt(INPUT_KEY, &records(100), 1024);
        let out = d.world.path("damaged.kenv");
        // The parent cannot tell (it holds no key), so the job "succeeds"...
        run(&job, small, &out).await.unwrap();
        assert!(hostile.acted());
        // ...and the controller refuses the result.
        let envelope = std::fs::read(&out).unwrap();
        let err = d.world.decrypt(&envelope).unwrap_err();
        assert!(err.contains(what), "{what}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enclave_the_policy_does_not_admit_gets_no_key() {
    let d = deploy(Arc::new(kluis_parent::hook::PassThrough)).await;
    let rogue = d
        .world
        .start_enclave(b"a modified enclave image", &d.relay.address)
        .await;
    let input = d.world.encrypt(INPUT_KEY, &records(10), 1024);
    let out = d.world.path("rogue.kenv");
    let err = run(
        &job(&rogue.address, WorkloadSpec::Identity, vec![]),
        input,
        &out,
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.enclave_kind(),
        Some(FailureKind::KeyReleaseRefused),
        "{err}"
    );
    assert!(!out.exists());
    // The operator sees which rule refused it.
    let refused = d
        .world
        .broker
        .audit()
        .records(&AuditFilter {
            decision: Some(Decision::Refused),
            ..AuditFilter::default()
        })
        .unwrap();
    let reasons: Vec<String> = refused.iter().filter_map(|r| r.reason.clone()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("pcr0") || r.contains("PCR0") || r.contains("measurement")),
        "{reasons:?}"
    );
    // The enclave was told only "refused".
    assert!(!err.to_string().to_lowercase().contains("pcr"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifier_down_at_start_then_up_the_job_runs_again() {
    let world = World::new();
    // A port with nothing behind it.
    let verifier = world.start_verifier(None).await;
    let address = verifier.address.clone();
    verifier.stop().await;
    let relay = start_relay(&address, Arc::new(kluis_parent::hook::PassThrough)).await;
    let enclave = world.start_enclave(GOOD_IMAGE, &relay.address).await;
    let plain = records(500);
    let input = world.encrypt(INPUT_KEY, &plain, 1024);
    let out = world.path("out.kenv");
    let err = run(
        &job(&enclave.address, WorkloadSpec::Identity, vec![]),
        input.clone(),
        &out,
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.enclave_kind(),
        Some(FailureKind::VerifierUnavailable),
        "{err}"
    );
    assert!(!out.exists());
    // The verifier comes up on its address; the same job runs.
    let _verifier = world.start_verifier(Some(&address)).await;
    run(
        &job(&enclave.address, WorkloadSpec::Identity, vec![]),
        input,
        &out,
    )
    .await
    .unwrap();
    assert_eq!(world.decrypt(&std::fs::read(&out).unwrap()).unwrap(), plain);
}

/// Hands input out slowly (20 ms per read), so that things can happen
/// mid-job.
struct SlowInput {
    data: Vec<u8>,
    pos: usize,
    chunk: usize,
}

impl std::io::Read for SlowInput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::thread::sleep(Duration::from_millis(20));
        let end = (self.pos + self.chunk)
            .min(self.data.len())
            .min(self.pos + buf.len());
        buf[..end - self.pos].copy_from_slice(&self.data[self.pos..end]);
        let n = end - self.pos;
        self.pos = end;
        Ok(n)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifier_restarted_mid_job() {
    let d = deploy(Arc::new(kluis_parent::hook::PassThrough)).await;
    let plain = records(20_000);
    let input = d.world.encrypt(INPUT_KEY, &plain, 1024);
    let out = d.world.path("out.kenv");
    let mut job = job(&d.enclave.address, WorkloadSpec::Identity, vec![]);
    let started = Arc::new(StartedSignal::default());
    job.hook = started.clone();
    let slow = SlowInput {
        data: input.clone(),
        pos: 0,
        chunk: 16 * 1024,
    };
    // The keys are released at the start of the job; a restart of the
    // verifier afterwards does not disturb it.
    let running = tokio::spawn({
        let job = job.clone();
        let out = out.clone();
        async move { run_reader(&job, slow, &out).await }
    });
    started.wait(Duration::from_secs(10)).await;
    let address = d.verifier.address.clone();
    d.verifier.stop().await;
    let _restarted = d.world.start_verifier(Some(&address)).await;
    running.await.unwrap().unwrap();
    assert_eq!(
        d.world.decrypt(&std::fs::read(&out).unwrap()).unwrap(),
        plain
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifier_gone_between_challenge_and_release_then_the_job_runs_again() {
    // Hold the key request back, stop the verifier meanwhile.
    let hostile = Arc::new(Hostile::new(
        Channel::Verifier,
        Direction::FromEnclave,
        1,
        Tamper::Drop,
    ));
    let d = deploy(hostile.clone()).await;
    let input = d.world.encrypt(INPUT_KEY, &records(200), 1024);
    let out = d.world.path("out.kenv");
    let job = job(&d.enclave.address, WorkloadSpec::Identity, vec![]);
    let running = tokio::spawn({
        let job = job.clone();
        let input = input.clone();
        let out = out.clone();
        async move { run(&job, input, &out).await }
    });
    while !hostile.acted() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let address = d.verifier.address.clone();
    d.verifier.stop().await;
    let err = running.await.unwrap().unwrap_err();
    assert_eq!(
        err.enclave_kind(),
        Some(FailureKind::VerifierUnavailable),
        "{err}"
    );
    assert!(!out.exists());
    // Back up (its challenges are gone with it): the job runs again.
    let _verifier = d.world.start_verifier(Some(&address)).await;
    let relay = start_relay(&address, Arc::new(kluis_parent::hook::PassThrough)).await;
    let enclave = d.world.start_enclave(GOOD_IMAGE, &relay.address).await;
    run(
        &kluis_tests::world::job(&enclave.address, WorkloadSpec::Identity, vec![]),
        input,
        &out,
    )
    .await
    .unwrap();
    assert!(out.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enclave_killed_mid_job_leaves_no_output_and_the_job_runs_again() {
    let d = deploy(Arc::new(kluis_parent::hook::PassThrough)).await;
    let plain = records(20_000);
    let input = d.world.encrypt(INPUT_KEY, &plain, 1024);
    let out = d.world.path("out.kenv");
    std::fs::write(&out, b"an earlier result").unwrap();
    let slow = SlowInput {
        data: input.clone(),
        pos: 0,
        chunk: 16 * 1024,
    };
    let mut job1 = job(&d.enclave.address, WorkloadSpec::Identity, vec![]);
    let started = Arc::new(StartedSignal::default());
    job1.hook = started.clone();
    let running = tokio::spawn({
        let out = out.clone();
        async move { run_reader(&job1, slow, &out).await }
    });
    // Killed mid-job: after its keys were released, before its input ended.
    started.wait(Duration::from_secs(10)).await;
    d.enclave.kill();
    let err = running.await.unwrap().unwrap_err();
    assert!(
        matches!(err, RunError::Incomplete | RunError::Io { .. }),
        "{err}"
    );
    // The earlier file is untouched, and no partial file is left beside it.
    assert_eq!(std::fs::read(&out).unwrap(), b"an earlier result");
    let leftovers = std::fs::read_dir(d.world.dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".kluis-partial")
        })
        .count();
    assert_eq!(leftovers, 0);
    // A new enclave, the same job.
    let enclave = d.world.start_enclave(GOOD_IMAGE, &d.relay.address).await;
    run(
        &job(&enclave.address, WorkloadSpec::Identity, vec![]),
        input,
        &out,
    )
    .await
    .unwrap();
    assert_eq!(
        d.world.decrypt(&std::fs::read(&out).unwrap()).unwrap(),
        plain
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_only_programs_of_the_image_on_plaintext_inside() {
    let d = deploy(Arc::new(kluis_parent::hook::PassThrough)).await;
    let workloads = d.world.path("workloads");
    std::fs::create_dir(&workloads).unwrap();
    let script = workloads.join("upper");
    std::fs::write(&script, "#!/bin/sh\nexec tr a-z A-Z\n").unwrap();
    let failing = workloads.join("fails");
    std::fs::write(&failing, "#!/bin/sh\ncat >/dev/null; exit 3\n").unwrap();
    // Reads everything, then hangs with a child holding its stdout open.
    let hangs = workloads.join("hangs");
    std::fs::write(
        &hangs,
        "#!/bin/sh\ncat >/dev/null\nsleep 300 &\nsleep 300\n",
    )
    .unwrap();
    // Reads everything, closes its output, and runs on.
    let lingers = workloads.join("lingers");
    std::fs::write(&lingers, "#!/bin/sh\ncat >/dev/null\nexec >&-\nsleep 300\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    for p in [&script, &failing, &hangs, &lingers] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut ctx = d.world.enclave_context(GOOD_IMAGE, &d.relay.address);
    ctx.exec_dir = Some(workloads.clone());
    ctx.exec_timeout = Duration::from_secs(2);
    let enclave = start_enclave_with(ctx).await;

    let plain = records(30_000);
    let input = d.world.encrypt(INPUT_KEY, &plain, 4096);
    let exec = |program: &str| WorkloadSpec::Exec {
        program: program.into(),
        args: vec![],
    };
    let out = d.world.path("upper.kenv");
    let report = run(
        &job(&enclave.address, exec("upper"), vec![]),
        input.clone(),
        &out,
    )
    .await
    .unwrap();
    assert_eq!(
        d.world.decrypt(&std::fs::read(&out).unwrap()).unwrap(),
        plain.to_ascii_uppercase()
    );
    assert_eq!(report.counts.records_in, 30_000);
    assert_eq!(report.counts.records_out, 30_000);

    // A program that fails, one outside the directory, and exec on an
    // enclave without a workload directory: refused, no output.
    for (enclave, program, kind) in [
        (&enclave.address, "fails", FailureKind::Exec),
        (&enclave.address, "hangs", FailureKind::ExecTimeout),
        (&enclave.address, "lingers", FailureKind::ExecTimeout),
        (&enclave.address, "../../bin/sh", FailureKind::ExecRefused),
        (&d.enclave.address, "upper", FailureKind::ExecRefused),
    ] {
        let out = d.world.path("refused.kenv");
        // `hangs` would hold the job for 300 s: its kind shows the deadline
        // killed it (no wall-clock bound needed).
        let err = run(&job(enclave, exec(program), vec![]), input.clone(), &out)
            .await
            .unwrap_err();
        assert_eq!(err.enclave_kind(), Some(kind), "{program}: {err}");
        assert!(!out.exists());
    }
}

/// A parent that cuts the input short (or alters it) must not get an
/// `exec` program to run on the prefix it chose as if it were the whole
/// input: the program is killed while its standard input is still open, so
/// it never reaches its end-of-input step (here: leaving a mark, and
/// writing output).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_program_never_sees_a_cut_input_end() {
    let d = deploy(Arc::new(kluis_parent::hook::PassThrough)).await;
    let workloads = d.world.path("workloads");
    std::fs::create_dir(&workloads).unwrap();
    let mark = d.world.path("reached-the-end");
    let script = workloads.join("summarise");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncat >/dev/null\ntouch {}\nhead -c 3000000 /dev/zero\n",
            mark.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut ctx = d.world.enclave_context(GOOD_IMAGE, &d.relay.address);
    ctx.exec_dir = Some(workloads.clone());
    let enclave = start_enclave_with(ctx).await;
    let exec = WorkloadSpec::Exec {
        program: "summarise".into(),
        args: vec![],
    };
    let input = d.world.encrypt(INPUT_KEY, &records(30_000), 4096);

    // The whole input: the program reaches its end (the control).
    let out = d.world.path("whole.kenv");
    run(
        &job(&enclave.address, exec.clone(), vec![]),
        input.clone(),
        &out,
    )
    .await
    .unwrap();
    assert!(mark.exists(), "the control run never reached the end");
    std::fs::remove_file(&mark).unwrap();

    // Cut mid-segment, and a byte altered in the middle.
    let cut = input[..input.len() / 2].to_vec();
    let mut altered = input.clone();
    let middle = altered.len() / 2;
    altered[middle] ^= 1;
    for (what, bad, kind) in [
        ("cut", cut, FailureKind::InputTruncated),
        ("altered", altered, FailureKind::InputTampered),
    ] {
        let out = d.world.path("bad.kenv");
        let err = run(&job(&enclave.address, exec.clone(), vec![]), bad, &out)
            .await
            .unwrap_err();
        assert_eq!(err.enclave_kind(), Some(kind), "{what}: {err}");
        assert!(!out.exists());
        assert!(
            !mark.exists(),
            "{what}: the program ran past the end of its input"
        );
    }
}

/// An enclave service that stops while an `exec` job runs abandons the job
/// and leaves no program behind: the job is cancelled, and its program's
/// group killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enclave_that_stops_leaves_no_exec_program_running() {
    let d = deploy(Arc::new(kluis_parent::hook::PassThrough)).await;
    let workloads = d.world.path("workloads");
    std::fs::create_dir(&workloads).unwrap();
    let pid_file = d.world.path("program.pid");
    let script = workloads.join("lingers");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho $$ > {}\nexec sleep 300\n",
            pid_file.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut ctx = d.world.enclave_context(GOOD_IMAGE, &d.relay.address);
    ctx.exec_dir = Some(workloads.clone());
    ctx.exec_timeout = Duration::from_secs(600);
    let enclave = start_enclave_with(ctx).await;
    let exec = WorkloadSpec::Exec {
        program: "lingers".into(),
        args: vec![],
    };
    let input = d.world.encrypt(INPUT_KEY, &records(10), 4096);
    let job = job(&enclave.address, exec, vec![]);
    let out = d.world.path("abandoned.kenv");
    let running = tokio::spawn(async move { run(&job, input, &out).await });
    let mut pid = None;
    for _ in 0..200 {
        if let Some(p) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
        {
            pid = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = pid.expect("the program never started");
    let alive = |pid: u32| {
        // Gone, or a zombie nobody has reaped yet: not running either way.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                let state = stat.rsplit(") ").next().unwrap_or("").chars().next();
                state != Some('Z')
            })
            .unwrap_or(false)
    };
    assert!(alive(pid));
    enclave.stop().await;
    let mut waited = 0;
    while alive(pid) && waited < 100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    assert!(!alive(pid), "the program outlived its enclave service");
    assert!(running.await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_runs_only_its_allowed_jobs() {
    let d = deploy(Arc::new(kluis_parent::hook::PassThrough)).await;
    let allowed = kluis_enclave::AllowedJob {
        workload: pseudonymise(),
        output_key: OUTPUT_KEY.into(),
        secret_keys: vec![SECRET_KEY.into()],
        input_keys: vec![INPUT_KEY.into()],
    };
    let mut ctx = d.world.enclave_context(GOOD_IMAGE, &d.relay.address);
    ctx.allowed_jobs = Some(vec![allowed]);
    let enclave = start_enclave_with(ctx).await;
    let plain = records(200);
    let input = d.world.encrypt(INPUT_KEY, &plain, 1024);
    let (secret, _) = d.world.new_secret();
    let releases = |w: &World| {
        w.broker
            .audit()
            .records(&AuditFilter {
                decision: Some(Decision::Allowed),
                ..AuditFilter::default()
            })
            .unwrap()
            .len()
    };
    let before = releases(&d.world);

    // The parent asks the pseudonymising image for `identity`: refused before
    // any key is asked for.
    let out = d.world.path("identity.kenv");
    let err = run(
        &job(&enclave.address, WorkloadSpec::Identity, vec![]),
        input.clone(),
        &out,
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.enclave_kind(),
        Some(FailureKind::JobNotAllowed),
        "{err}"
    );
    assert!(!out.exists());
    // Another column: refused too.
    let other_column = WorkloadSpec::Pseudonymise {
        column: 1,
        delimiter: b',',
        secret: 0,
        header: false,
        check_national_number: false,
    };
    let err = run(
        &job(&enclave.address, other_column, vec![secret.clone()]),
        input.clone(),
        &out,
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.enclave_kind(),
        Some(FailureKind::JobNotAllowed),
        "{err}"
    );
    assert_eq!(releases(&d.world), before, "no key was asked for");

    // The right job with a "secret" that is really a data key of the input's
    // master key: the released answer names the key, and the job stops there.
    let (header, _) = kluis_envelope::EnvelopeHeader::from_bytes(&input).unwrap();
    let fake_secret =
        kluis_proto::job::WrappedSecret(header.wrapped_key().wrapped_bytes().to_vec());
    let err = run(
        &job(&enclave.address, pseudonymise(), vec![fake_secret]),
        input.clone(),
        &out,
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.enclave_kind(),
        Some(FailureKind::JobNotAllowed),
        "{err}"
    );
    assert!(!out.exists());

    // The allowed job runs.
    run(
        &job(&enclave.address, pseudonymise(), vec![secret]),
        input,
        &out,
    )
    .await
    .unwrap();
    assert_eq!(
        d.world
            .decrypt(&std::fs::read(&out).unwrap())
            .unwrap()
            .len(),
        plain.len() + 200 * (64 - 11)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_failures_tell_the_parent_nothing_about_the_data() {
    let d = deploy(Arc::new(kluis_parent::hook::PassThrough)).await;
    let input = d.world.encrypt(INPUT_KEY, &records(50), 1024);
    // Column 1000 does not exist: the record's column count must not leak.
    let spec = WorkloadSpec::Aggregate {
        by: 1000,
        sum: None,
        delimiter: b'1',
        header: true,
    };
    let out = d.world.path("probe.kenv");
    let err = run(&job(&d.enclave.address, spec, vec![]), input, &out)
        .await
        .unwrap_err();
    assert_eq!(err.enclave_kind(), Some(FailureKind::Workload), "{err}");
    let text = err.to_string();
    assert!(!text.chars().any(|c| c.is_ascii_digit()), "{text}");
    assert!(!out.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_reaches_a_tls_verifier() {
    let world = World::new();
    // A TLS certificate for the verifier service, from the controller's CA.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.clone().self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["verifier.test".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = kluis_transport::Address::Tcp(listener.local_addr().unwrap().to_string());
    let broker = Arc::clone(&world.broker);
    tokio::spawn(async move {
        let _ = attestation_verifier::service::run(
            listener,
            broker,
            attestation_verifier::service::ServiceConfig::default(),
            Some(acceptor),
            std::future::pending(),
        )
        .await;
    });
    let target = kluis_parent::relay::VerifierTarget::tls(
        address.clone(),
        ca.pem().as_bytes(),
        "verifier.test",
    )
    .unwrap();
    let relay = start_relay_to(target, Arc::new(kluis_parent::hook::PassThrough)).await;
    let enclave = world.start_enclave(GOOD_IMAGE, &relay.address).await;
    let plain = records(100);
    let input = world.encrypt(INPUT_KEY, &plain, 1024);
    let out = world.path("tls.kenv");
    run(
        &job(&enclave.address, WorkloadSpec::Identity, vec![]),
        input.clone(),
        &out,
    )
    .await
    .unwrap();
    assert_eq!(world.decrypt(&std::fs::read(&out).unwrap()).unwrap(), plain);

    // Expecting another name: the relay refuses the verifier, the job fails.
    let wrong =
        kluis_parent::relay::VerifierTarget::tls(address, ca.pem().as_bytes(), "other.test")
            .unwrap();
    let relay = start_relay_to(wrong, Arc::new(kluis_parent::hook::PassThrough)).await;
    let enclave = world.start_enclave(GOOD_IMAGE, &relay.address).await;
    let out = world.path("tls-wrong.kenv");
    let err = run(
        &job(&enclave.address, WorkloadSpec::Identity, vec![]),
        input,
        &out,
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.enclave_kind(),
        Some(FailureKind::VerifierUnavailable),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_parent_meets_the_job_deadline() {
    let d = deploy(Arc::new(kluis_parent::hook::PassThrough)).await;
    let mut ctx = d.world.enclave_context(GOOD_IMAGE, &d.relay.address);
    ctx.job_timeout = Duration::from_secs(2);
    let enclave = start_enclave_with(ctx).await;
    let input = d.world.encrypt(INPUT_KEY, &records(20_000), 1024);
    // 1 KiB every 20 ms: each frame resets the idle timeout, never the deadline.
    let slow = SlowInput {
        data: input,
        pos: 0,
        chunk: 1024,
    };
    let out = d.world.path("slow.kenv");
    let err = run_reader(
        &job(&enclave.address, WorkloadSpec::Identity, vec![]),
        slow,
        &out,
    )
    .await
    .unwrap_err();
    // The input takes about 8 s to trickle: the job ended at its deadline
    // (job_lifecycle.rs checks that nothing of it outlives that).
    assert_eq!(err.enclave_kind(), Some(FailureKind::JobTimeout), "{err}");
    assert!(!out.exists());
}
