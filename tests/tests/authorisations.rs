//! Controller-signed job authorisations end to end: a job runs under its
//! authorisation and every audit record of it names the purpose and case;
//! a parent that swaps, alters, replays past `max_runs`, or uses an
//! expired, revoked or unknown authorisation gets no key, and the verifier
//! records why; a policy with `require_authorisation` refuses a request
//! without one, and an enclave that asks for keys its authorisation does not
//! name gets none.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use attestation_verifier::audit::{AuditFilter, AuditRecord, Decision};
use attestation_verifier::keys::KeyName;
use kluis_parent::hook::{Channel, Direction, FrameHook, PassThrough};
use kluis_parent::job::RunError;
use kluis_proto::job::{FailureKind, WorkloadSpec};
use kluis_proto::{
    AuthorisationId, EphemeralKeyPair, ErrorCode, KeyOperation, KeyRequest, Request, Response,
};
use kluis_tests::world::*;

struct Deployment {
    world: World,
    _verifier: Running,
    _relay: Running,
    enclave: Running,
}

async fn deploy(hook: Arc<dyn FrameHook>) -> Deployment {
    let world = World::new();
    let verifier = world.start_verifier(None).await;
    let relay = start_relay(&verifier.address, hook).await;
    let enclave = world.start_enclave(GOOD_IMAGE, &relay.address).await;
    Deployment {
        world,
        _verifier: verifier,
        _relay: relay,
        enclave,
    }
}

const HOUR: u64 = 3_600_000;

/// Run an identity job under `authorisation` (`None`: without one).
async fn run_identity(
    d: &Deployment,
    authorisation: Option<Vec<u8>>,
    name: &str,
) -> Result<Vec<u8>, RunError> {
    let plain = records(50);
    let input = d.world.encrypt(INPUT_KEY, &plain, 1024);
    let out = d.world.path(name);
    let mut j = job(&d.enclave.address, WorkloadSpec::Identity, vec![]);
    j.spec.authorisation = authorisation;
    run(&j, input, &out).await?;
    let output = std::fs::read(&out).unwrap();
    assert_eq!(d.world.decrypt(&output).unwrap(), plain);
    Ok(output)
}

fn records_of(d: &Deployment, decision: Decision) -> Vec<AuditRecord> {
    d.world
        .broker
        .audit()
        .records(&AuditFilter {
            decision: Some(decision),
            ..AuditFilter::default()
        })
        .unwrap()
        .into_iter()
        .filter(|r| r.operation.starts_with("key.release"))
        .collect()
}

/// The job failed because the verifier refused the key request, and the
/// latest refusal names `rule` (with the authorisation's purpose and case
/// when `auth` is given).
fn assert_refused(d: &Deployment, err: &RunError, rule: &str, auth: Option<&[u8]>) {
    assert_eq!(
        err.enclave_kind(),
        Some(FailureKind::KeyReleaseRefused),
        "{err}"
    );
    let refused = records_of(d, Decision::Refused);
    let last = refused.last().expect("the refusal was audited");
    let reason = last.reason.clone().unwrap_or_default();
    assert!(reason.starts_with(rule), "{reason}");
    // The enclave (and so the parent) is told only "refused".
    assert!(!err.to_string().contains(rule), "{err}");
    if let Some(auth) = auth {
        let job = last.job.as_ref().expect("the refusal names the job");
        assert_eq!(job.authorisation, AuthorisationId::of(auth).to_hex());
        assert_eq!(job.purpose, "benefit entitlement check");
        assert!(job.case.starts_with("CASE-"));
    }
}

fn runs_of(d: &Deployment, auth: &[u8]) -> u64 {
    d.world
        .broker
        .kms()
        .authorisation(&AuthorisationId::of(auth))
        .unwrap()
        .unwrap()
        .runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorised_job_runs_and_every_record_names_its_purpose_and_case() {
    let d = deploy(Arc::new(PassThrough)).await;
    let auth = d
        .world
        .authorise(WorkloadSpec::Identity, &[], now_ms() + HOUR, Some(2));
    run_identity(&d, Some(auth.clone()), "ok.kenv")
        .await
        .unwrap();
    let allowed = records_of(&d, Decision::Allowed);
    assert_eq!(allowed.len(), 2, "decrypt the input, generate the output");
    for record in &allowed {
        let job = record.job.as_ref().expect("every record names the job");
        assert_eq!(job.authorisation, AuthorisationId::of(&auth).to_hex());
        assert_eq!(job.purpose, "benefit entitlement check");
        assert!(job.case.starts_with("CASE-"));
    }
    assert_eq!(runs_of(&d, &auth), 1);
    // The log with such records still verifies from end to end.
    d.world.broker.audit().verify(None).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_past_max_runs_get_no_key() {
    let d = deploy(Arc::new(PassThrough)).await;
    let auth = d
        .world
        .authorise(WorkloadSpec::Identity, &[], now_ms() + HOUR, Some(2));
    run_identity(&d, Some(auth.clone()), "1.kenv")
        .await
        .unwrap();
    run_identity(&d, Some(auth.clone()), "2.kenv")
        .await
        .unwrap();
    let err = run_identity(&d, Some(auth.clone()), "3.kenv")
        .await
        .unwrap_err();
    assert_refused(&d, &err, "authorisation_exhausted", Some(&auth));
    assert!(!d.world.path("3.kenv").exists());
    assert_eq!(runs_of(&d, &auth), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_authorisation_gets_no_key() {
    let d = deploy(Arc::new(PassThrough)).await;
    let auth = d
        .world
        .authorise(WorkloadSpec::Identity, &[], now_ms() + 1_500, None);
    tokio::time::sleep(std::time::Duration::from_millis(1_600)).await;
    let err = run_identity(&d, Some(auth.clone()), "x.kenv")
        .await
        .unwrap_err();
    assert_refused(&d, &err, "authorisation_expired", Some(&auth));
    assert_eq!(runs_of(&d, &auth), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_authorisation_gets_no_key() {
    let d = deploy(Arc::new(PassThrough)).await;
    let auth = d
        .world
        .authorise(WorkloadSpec::Identity, &[], now_ms() + HOUR, None);
    run_identity(&d, Some(auth.clone()), "before.kenv")
        .await
        .unwrap();
    d.world
        .broker
        .kms()
        .revoke_authorisation(
            &AuthorisationId::of(&auth),
            "app-admin",
            "case closed",
            now_ms(),
        )
        .unwrap();
    let err = run_identity(&d, Some(auth.clone()), "after.kenv")
        .await
        .unwrap_err();
    assert_refused(&d, &err, "authorisation_revoked", Some(&auth));
    assert_eq!(runs_of(&d, &auth), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorisation_this_verifier_did_not_issue_gets_no_key() {
    let d = deploy(Arc::new(PassThrough)).await;
    // Validly signed by the verifier's key, but not in its store (as one
    // from another store, or a re-encoded signature, would be).
    let other = World::new();
    let foreign = other.authorise(WorkloadSpec::Identity, &[], now_ms() + HOUR, None);
    // The enclave refuses it first: another verifier key signed it.
    let err = run_identity(&d, Some(foreign), "foreign.kenv")
        .await
        .unwrap_err();
    assert_eq!(
        err.enclave_kind(),
        Some(FailureKind::AuthorisationInvalid),
        "{err}"
    );
    // One signed by this verifier's key but never stored.
    let unknown = d
        .world
        .sign_authorisation(WorkloadSpec::Identity, &[], now_ms() + HOUR, None);
    let err = run_identity(&d, Some(unknown.bytes().to_vec()), "unknown.kenv")
        .await
        .unwrap_err();
    assert_refused(&d, &err, "authorisation_unknown", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_altered_authorisation_is_refused_by_the_enclave() {
    let d = deploy(Arc::new(PassThrough)).await;
    let auth = d
        .world
        .authorise(WorkloadSpec::Identity, &[], now_ms() + HOUR, None);
    for at in [0, auth.len() / 3, auth.len() / 2, auth.len() - 1] {
        let mut altered = auth.clone();
        altered[at] ^= 0x20;
        let err = run_identity(&d, Some(altered), &format!("alt-{at}.kenv"))
            .await
            .unwrap_err();
        assert_eq!(
            err.enclave_kind(),
            Some(FailureKind::AuthorisationInvalid),
            "byte {at}: {err}"
        );
    }
    // Nothing reached the verifier: no key request was made.
    assert!(records_of(&d, Decision::Allowed).is_empty());
    assert!(records_of(&d, Decision::Refused).is_empty());
    assert_eq!(runs_of(&d, &auth), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorisation_for_another_job_is_refused_by_the_enclave() {
    let d = deploy(Arc::new(PassThrough)).await;
    // Valid, but for a re-encryption job, or for a job with a secret.
    let reencrypt = d
        .world
        .authorise(WorkloadSpec::Reencrypt, &[], now_ms() + HOUR, None);
    let with_secret =
        d.world
            .authorise(WorkloadSpec::Identity, &[SECRET_KEY], now_ms() + HOUR, None);
    for (name, auth) in [("reencrypt", reencrypt), ("secret", with_secret)] {
        let err = run_identity(&d, Some(auth.clone()), &format!("{name}.kenv"))
            .await
            .unwrap_err();
        assert_eq!(
            err.enclave_kind(),
            Some(FailureKind::AuthorisationInvalid),
            "{name}: {err}"
        );
        assert_eq!(runs_of(&d, &auth), 0);
    }
}

/// A parent that, on the key-release channel, replaces one authorisation
/// id by another (both valid, for the same job).
struct SwapId {
    from: [u8; 32],
    to: [u8; 32],
    acted: AtomicBool,
}

impl FrameHook for SwapId {
    fn on_frame(&self, channel: Channel, direction: Direction, mut frame: Vec<u8>) -> Vec<Vec<u8>> {
        if channel == Channel::Verifier && direction == Direction::FromEnclave {
            if let Some(at) = frame.windows(32).position(|w| w == self.from) {
                frame[at..at + 32].copy_from_slice(&self.to);
                self.acted.store(true, Ordering::SeqCst);
            }
        }
        vec![frame]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_that_swaps_the_authorisation_in_the_key_request_gets_no_key() {
    let world = World::new();
    let a = world.authorise(WorkloadSpec::Identity, &[], now_ms() + HOUR, Some(1));
    let b = world.authorise(WorkloadSpec::Identity, &[], now_ms() + HOUR, Some(5));
    let hook = Arc::new(SwapId {
        from: AuthorisationId::of(&a).0,
        to: AuthorisationId::of(&b).0,
        acted: AtomicBool::new(false),
    });
    let verifier = world.start_verifier(None).await;
    let relay = start_relay(&verifier.address, hook.clone()).await;
    let enclave = world.start_enclave(GOOD_IMAGE, &relay.address).await;
    let d = Deployment {
        world,
        _verifier: verifier,
        _relay: relay,
        enclave,
    };
    let err = run_identity(&d, Some(a.clone()), "swap.kenv")
        .await
        .unwrap_err();
    assert!(
        hook.acted.load(Ordering::SeqCst),
        "the parent never swapped"
    );
    // The request no longer matches the attested request hash.
    assert_refused(&d, &err, "request_hash_mismatch", None);
    assert_eq!(runs_of(&d, &a), 0);
    assert_eq!(runs_of(&d, &b), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_requires_an_authorisation_refuses_a_request_without_one() {
    let d = deploy(Arc::new(PassThrough)).await;
    // Without the requirement, no authorisation is needed.
    run_identity(&d, None, "free.kenv").await.unwrap();
    let pcrs = kluis_nsm::sim::SimConfig::default()
        .with_image(GOOD_IMAGE.to_vec(), None)
        .boot_pcr_values();
    d.world.set_policy(
        INPUT_KEY,
        &format!(
            "operations = [\"decrypt\"]\nmax_document_age_seconds = 300\nrequire_authorisation = true\n\
             [[measurements]]\nname = \"enclave\"\npcr0 = \"{}\"\n",
            hex::encode(pcrs[0])
        ),
    );
    let err = run_identity(&d, None, "required.kenv").await.unwrap_err();
    assert_refused(&d, &err, "authorisation_required", None);
    let auth = d
        .world
        .authorise(WorkloadSpec::Identity, &[], now_ms() + HOUR, None);
    run_identity(&d, Some(auth.clone()), "authorised.kenv")
        .await
        .unwrap();
    assert_eq!(runs_of(&d, &auth), 1);
}

/// An enclave of an admitted image that asks, under an authorisation, for
/// keys the authorisation does not name (a direct key request, as a
/// compromised or badly built enclave would make it): refused, not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_keys_the_authorisation_does_not_name_gets_none() {
    let world = World::new();
    let auth = world.authorise(WorkloadSpec::Identity, &[], now_ms() + HOUR, Some(3));
    let id = AuthorisationId::of(&auth);
    // The policies alone would release every key asked for below.
    let pcrs = kluis_nsm::sim::SimConfig::default()
        .with_image(GOOD_IMAGE.to_vec(), None)
        .boot_pcr_values();
    world.set_policy(
        SECRET_KEY,
        &format!(
            "operations = [\"decrypt\", \"generate\"]\nmax_document_age_seconds = 300\n\
             [[measurements]]\nname = \"enclave\"\npcr0 = \"{}\"\n",
            hex::encode(pcrs[0])
        ),
    );
    let nsm = kluis_nsm::sim::SimulatedNsm::new(
        kluis_nsm::sim::SimConfig::default()
            .with_root(Arc::clone(&world.root))
            .with_image(GOOD_IMAGE.to_vec(), None),
    )
    .unwrap();
    let (_, wrapped_input) = world
        .broker
        .kms()
        .generate_data_key(&KeyName::parse(INPUT_KEY).unwrap(), now_ms())
        .unwrap();
    let (_, wrapped_secret) = world
        .broker
        .kms()
        .generate_data_key(&KeyName::parse(SECRET_KEY).unwrap(), now_ms())
        .unwrap();
    let ask = |ops: Vec<KeyOperation>, n: u8| {
        let now = now_ms();
        let nonce = match world
            .broker
            .handle(Request::Challenge, now, &|| Some([n; 32]))
        {
            Response::Challenge { nonce, .. } => nonce,
            other => panic!("{other:?}"),
        };
        let request = KeyRequest::new(ops).unwrap().with_authorisation(Some(id));
        let ephemeral = EphemeralKeyPair::generate().unwrap();
        let document = kluis_nsm::attest(
            &nsm,
            Some(&kluis_proto::request_hash(&request)),
            Some(&nonce),
            Some(&ephemeral.public_key_sec1()),
        )
        .unwrap();
        world.broker.handle(
            Request::KeyRelease {
                attestation_document: document,
                request,
            },
            now,
            &|| None,
        )
    };
    let decrypt = |w: &attestation_verifier::keys::WrappedDataKey| KeyOperation::DecryptDataKey {
        wrapped: w.to_bytes(),
    };
    let generate = |k: &str| KeyOperation::GenerateDataKey { key_id: k.into() };
    for (i, (what, ops)) in [
        (
            "an extra secret",
            vec![
                decrypt(&wrapped_input),
                decrypt(&wrapped_secret),
                generate(OUTPUT_KEY),
            ],
        ),
        (
            "the output under another key",
            vec![decrypt(&wrapped_input), generate(SECRET_KEY)],
        ),
        (
            "another input key",
            vec![decrypt(&wrapped_secret), generate(OUTPUT_KEY)],
        ),
        ("no output", vec![decrypt(&wrapped_input)]),
    ]
    .into_iter()
    .enumerate()
    {
        let response = ask(ops, u8::try_from(i).unwrap() + 1);
        assert!(
            matches!(
                response,
                Response::Error {
                    code: ErrorCode::Denied
                }
            ),
            "{what}: {response:?}"
        );
        let refused = world
            .broker
            .audit()
            .records(&AuditFilter {
                decision: Some(Decision::Refused),
                ..AuditFilter::default()
            })
            .unwrap();
        let last = refused.last().unwrap();
        assert!(
            last.reason
                .as_deref()
                .unwrap_or_default()
                .starts_with("authorisation_keys_mismatch"),
            "{what}: {:?}",
            last.reason
        );
        assert_eq!(last.job.as_ref().unwrap().authorisation, id.to_hex());
    }
    assert_eq!(
        world.broker.kms().authorisation(&id).unwrap().unwrap().runs,
        0
    );
    // The named keys in their roles are released, and counted.
    let response = ask(vec![decrypt(&wrapped_input), generate(OUTPUT_KEY)], 9);
    assert!(matches!(response, Response::KeyRelease(_)), "{response:?}");
    assert_eq!(
        world.broker.kms().authorisation(&id).unwrap().unwrap().runs,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_requires_authorisations_runs_no_job_without_one() {
    let world = World::new();
    let verifier = world.start_verifier(None).await;
    let relay = start_relay(&verifier.address, Arc::new(PassThrough)).await;
    let mut ctx = world.enclave_context(GOOD_IMAGE, &relay.address);
    ctx.require_authorisation = true;
    let enclave = start_enclave_with(ctx).await;
    let d = Deployment {
        world,
        _verifier: verifier,
        _relay: relay,
        enclave,
    };
    let err = run_identity(&d, None, "none.kenv").await.unwrap_err();
    assert_eq!(
        err.enclave_kind(),
        Some(FailureKind::AuthorisationInvalid),
        "{err}"
    );
    // Refused before any key was asked for.
    assert!(records_of(&d, Decision::Allowed).is_empty());
    assert!(records_of(&d, Decision::Refused).is_empty());
    let auth = d
        .world
        .authorise(WorkloadSpec::Identity, &[], now_ms() + HOUR, None);
    run_identity(&d, Some(auth), "with.kenv").await.unwrap();
}
