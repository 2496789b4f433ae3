//! Simulated NSM → verifier round trips: what the enclave asks for is what the
//! verifier reports, under the simulator's root and only under it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use kluis_attestation::{TrustAnchor, UnixMillis, Verifier, VerifyOptions};
use kluis_nsm::sim::{FixedClock, SimConfig, SimulatedNsm};
use kluis_nsm::{attest, extend_pcr};
use std::sync::Arc;
use std::time::Duration;

const T0: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

fn sim(config: SimConfig) -> (SimulatedNsm, Arc<FixedClock>, Verifier) {
    let clock = Arc::new(FixedClock::new(T0));
    let nsm = SimulatedNsm::new(config.with_clock(clock.clone())).unwrap();
    let verifier = Verifier::new(TrustAnchor::dangerous_from_der(nsm.root().root_der()).unwrap());
    (nsm, clock, verifier)
}

#[test]
fn fields_survive_the_round_trip() {
    let (nsm, _clock, verifier) =
        sim(SimConfig::default().with_image(b"enclave image v1".to_vec(), None));
    let public_key = vec![0x04; 97];
    let user_data = b"sha384 of the request".to_vec();
    let nonce = vec![0xab; 32];
    let doc = attest(&nsm, Some(&user_data), Some(&nonce), Some(&public_key)).unwrap();

    let options = VerifyOptions::at(UnixMillis(T0 + 1_000))
        .expect_nonce(nonce.clone())
        .max_age(Duration::from_secs(60));
    let verified = verifier.verify(&doc, &options).unwrap();
    let d = verified.document();
    assert_eq!(d.module_id, nsm.module_id());
    assert_eq!(d.timestamp_ms, T0);
    assert_eq!(d.public_key.as_deref(), Some(public_key.as_slice()));
    assert_eq!(d.user_data.as_deref(), Some(user_data.as_slice()));
    assert_eq!(d.nonce.as_deref(), Some(nonce.as_slice()));
    assert!(!d.is_debug_mode());
    let expected = SimConfig::default()
        .with_image(b"enclave image v1".to_vec(), None)
        .boot_pcr_values();
    for (i, value) in expected.iter().enumerate() {
        assert_eq!(
            d.pcr(u8::try_from(i).unwrap()),
            Some(value.as_slice()),
            "PCR{i}"
        );
    }
    assert_eq!(verified.document_sha384(), &kluis_attestation::sha384(&doc));
}

#[test]
fn absent_fields_come_back_absent() {
    let (nsm, _clock, verifier) = sim(SimConfig::default());
    let doc = attest(&nsm, None, None, None).unwrap();
    let verified = verifier
        .verify(&doc, &VerifyOptions::at(UnixMillis(T0)))
        .unwrap();
    assert_eq!(verified.document().public_key, None);
    assert_eq!(verified.document().user_data, None);
    assert_eq!(verified.document().nonce, None);
    let err = verifier
        .verify(
            &doc,
            &VerifyOptions::at(UnixMillis(T0)).expect_nonce(vec![1]),
        )
        .unwrap_err();
    assert_eq!(err.kind(), "nonce_missing");
}

#[test]
fn debug_mode_zeroes_pcr0_to_2_but_not_pcr3() {
    let (nsm, _clock, verifier) = sim(SimConfig::default()
        .with_image(b"img".to_vec(), None)
        .with_boot_pcr(3, [7u8; 48])
        .with_debug(true));
    let doc = attest(&nsm, None, None, None).unwrap();
    let verified = verifier
        .verify(&doc, &VerifyOptions::at(UnixMillis(T0)))
        .unwrap();
    assert!(verified.document().is_debug_mode());
    assert_eq!(verified.document().pcr(3), Some([7u8; 48].as_slice()));
}

#[test]
fn extended_pcrs_do_not_change_boot_measurements_in_the_document() {
    let (nsm, _clock, verifier) = sim(SimConfig::default().with_image(b"img".to_vec(), None));
    let before = attest(&nsm, None, None, None).unwrap();
    extend_pcr(&nsm, 16, b"runtime measurement").unwrap();
    let after = attest(&nsm, None, None, None).unwrap();
    let at = VerifyOptions::at(UnixMillis(T0));
    let b = verifier.verify(&before, &at).unwrap().into_document();
    let a = verifier.verify(&after, &at).unwrap().into_document();
    assert_eq!(a.pcr(0), b.pcr(0));
    assert_ne!(
        before, after,
        "each document has its own leaf and signature"
    );
}

#[test]
fn simulated_documents_are_not_aws_documents() {
    let (nsm, _clock, _) = sim(SimConfig::default());
    let doc = attest(&nsm, None, None, None).unwrap();
    let aws = Verifier::new(TrustAnchor::aws_nitro_root_g1().unwrap());
    let err = aws
        .verify(&doc, &VerifyOptions::at(UnixMillis(T0)))
        .unwrap_err();
    assert_eq!(err.kind(), "chain_untrusted_root");
}

#[test]
fn leaf_lives_three_hours() {
    let (nsm, clock, verifier) = sim(SimConfig::default());
    let doc = attest(&nsm, None, None, None).unwrap();
    let three_hours = 3 * 3_600_000;
    assert!(verifier
        .verify(&doc, &VerifyOptions::at(UnixMillis(T0 + three_hours)))
        .is_ok());
    let err = verifier
        .verify(
            &doc,
            &VerifyOptions::at(UnixMillis(T0 + three_hours + 1_000)),
        )
        .unwrap_err();
    assert_eq!(err.kind(), "chain_expired");
    // A document made later by the same module verifies then.
    clock.advance(three_hours);
    let later = attest(&nsm, None, None, None).unwrap();
    assert!(verifier
        .verify(
            &later,
            &VerifyOptions::at(UnixMillis(T0 + three_hours + 1_000))
        )
        .is_ok());
}

#[test]
fn verifier_is_usable_from_many_threads() {
    let (nsm, _clock, verifier) = sim(SimConfig::default());
    let docs: Vec<Vec<u8>> = (0..8u8)
        .map(|i| attest(&nsm, None, Some(&[i]), None).unwrap())
        .collect();
    let verifier = Arc::new(verifier);
    let handles: Vec<_> = docs
        .into_iter()
        .enumerate()
        .map(|(i, doc)| {
            let v = verifier.clone();
            std::thread::spawn(move || {
                let opts =
                    VerifyOptions::at(UnixMillis(T0)).expect_nonce(vec![u8::try_from(i).unwrap()]);
                v.verify(&doc, &opts).map(|_| ())
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), Ok(()));
    }
}
