//! Seal/open tests: round trips, a fixed test vector cross-checked against an
//! independent RFC 9180 implementation, every distinct failure, and the client
//! exchange over an in-memory stream.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]

use crate::binding::{hpke_info, request_hash, response_transcript};
use crate::client::{request_challenge, request_keys};
use crate::keys::{encode_payload, PlaintextKey, ReleasedKey};
use crate::message::{KeyOperation, KeyRequest, Message, Request, Response, SealedKeys};
use crate::seal::{
    open_keys, open_keys_for_request, seal_keys, seal_keys_with_ikm, seal_payload_with_ikm,
    EphemeralKeyPair,
};
use crate::{ClientError, ErrorCode, OpenError, SealError, VerifierIdentity};
use sha2::{Digest, Sha384};
use zeroize::Zeroizing;

const KEY_ID: &str = "agency-a/app-x/prod";

fn request() -> KeyRequest {
    KeyRequest::new(vec![
        KeyOperation::GenerateDataKey {
            key_id: KEY_ID.into(),
        },
        KeyOperation::DecryptDataKey {
            wrapped: vec![0x55; 40],
        },
    ])
    .unwrap()
}

fn released() -> Vec<ReleasedKey> {
    vec![
        ReleasedKey {
            key_id: KEY_ID.into(),
            version: 2,
            wrapped: vec![0x66; 40],
            plaintext: PlaintextKey::from_bytes(&[0x77; 32]),
        },
        ReleasedKey {
            key_id: KEY_ID.into(),
            version: 1,
            wrapped: vec![0x55; 40],
            plaintext: PlaintextKey::from_bytes(&[0x88; 32]),
        },
    ]
}

fn doc_hash() -> [u8; 48] {
    Sha384::digest(b"attestation document").into()
}

/// Everything a test needs: the enclave's key, the verifier's identity, and a
/// response sealed with fixed randomness.
struct Fixture {
    ephemeral: EphemeralKeyPair,
    identity: VerifierIdentity,
    pinned: [u8; 97],
    request_hash: [u8; 48],
    sealed: SealedKeys,
}

fn fixture() -> Fixture {
    let ephemeral = EphemeralKeyPair::derive(&[0x11; 48]);
    let identity = VerifierIdentity::from_scalar(&[0x22; 48]).unwrap();
    let rh = request_hash(&request());
    let sealed = seal_keys_with_ikm(
        &ephemeral.public_key_sec1(),
        &doc_hash(),
        &rh,
        &released(),
        &identity,
        &[0x33; 48],
    )
    .unwrap();
    Fixture {
        pinned: identity.public_key_sec1(),
        ephemeral,
        identity,
        request_hash: rh,
        sealed,
    }
}

impl Fixture {
    fn open(&self, sealed: &SealedKeys) -> Result<Vec<ReleasedKey>, OpenError> {
        open_keys(
            sealed,
            &self.ephemeral,
            &self.pinned,
            &doc_hash(),
            &self.request_hash,
        )
    }

    /// Re-sign `sealed` as it stands with `identity` (what a verifier that
    /// made these bytes would have signed).
    fn resign(&self, sealed: &mut SealedKeys, identity: &VerifierIdentity) {
        let transcript = response_transcript(
            &sealed.document_sha384,
            &sealed.request_hash,
            &self.ephemeral.public_key_sec1(),
            &sealed.enc,
            &sealed.ciphertext,
        );
        sealed.signature = identity.sign(&transcript).unwrap();
    }

    /// Seal arbitrary payload bytes to this enclave, signed by the real
    /// verifier.
    fn seal_raw(&self, payload: &[u8]) -> SealedKeys {
        seal_payload_with_ikm(
            &self.ephemeral.public_key_sec1(),
            &doc_hash(),
            &self.request_hash,
            Zeroizing::new(payload.to_vec()),
            &self.identity,
            &[0x33; 48],
        )
        .unwrap()
    }
}

fn assert_released_ok(keys: &[ReleasedKey]) {
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0].key_id, KEY_ID);
    assert_eq!(keys[0].version, 2);
    assert_eq!(keys[0].wrapped, vec![0x66; 40]);
    assert_eq!(keys[0].plaintext.expose_secret(), &[0x77; 32]);
    assert_eq!(keys[1].version, 1);
    assert_eq!(keys[1].wrapped, vec![0x55; 40]);
    assert_eq!(keys[1].plaintext.expose_secret(), &[0x88; 32]);
}

#[test]
fn round_trip_with_fresh_randomness() {
    let ephemeral = EphemeralKeyPair::generate().unwrap();
    let identity = VerifierIdentity::generate().unwrap();
    let req = request();
    let sealed = seal_keys(
        &ephemeral.public_key_sec1(),
        &doc_hash(),
        &request_hash(&req),
        &released(),
        &identity,
    )
    .unwrap();
    let keys = open_keys_for_request(
        &sealed,
        &ephemeral,
        &identity.public_key_sec1(),
        &doc_hash(),
        &req,
    )
    .unwrap();
    assert_released_ok(&keys);

    // Fresh randomness: sealing again gives a different box.
    let again = seal_keys(
        &ephemeral.public_key_sec1(),
        &doc_hash(),
        &request_hash(&req),
        &released(),
        &identity,
    )
    .unwrap();
    assert_ne!(again.enc, sealed.enc);
    assert_ne!(again.ciphertext, sealed.ciphertext);
}

#[test]
fn sealed_keys_travel_in_a_response_frame() {
    let f = fixture();
    let bytes = Response::KeyRelease(Box::new(f.sealed.clone()))
        .encode()
        .unwrap();
    let Response::KeyRelease(back) = Response::decode(&bytes).unwrap() else {
        panic!("variant")
    };
    assert_eq!(*back, f.sealed);
    assert_released_ok(&f.open(&back).unwrap());
}

/// The fixed vector: every HPKE input is fixed (enclave key and the KEM's
/// ephemeral key by RFC 9180 `DeriveKeyPair`, identity key), so `enc` and the
/// ciphertext are too. ECDSA signatures are randomized (AWS-LC), so the
/// signature is verified rather than pinned; the one the vector was first
/// made with (RFC 6979, by the `p384` crate) still verifies. Any change to an
/// encoding, label or algorithm changes these values.
#[test]
fn test_vector() {
    let f = fixture();
    assert_eq!(
        crate::error::hex(&f.ephemeral.public_key_sec1()),
        VECTOR_RECIPIENT
    );
    assert_eq!(crate::error::hex(&f.pinned), VECTOR_VERIFIER);
    assert_eq!(crate::error::hex(&f.request_hash), VECTOR_REQUEST_HASH);
    assert_eq!(crate::error::hex(&f.sealed.enc), VECTOR_ENC);
    assert_eq!(crate::error::hex(&f.sealed.ciphertext), VECTOR_CIPHERTEXT);
    assert_eq!(f.sealed.document_sha384, doc_hash());
    assert_eq!(f.sealed.request_hash, f.request_hash);
    // Deterministic given the inputs, except the signature.
    let again = fixture().sealed;
    assert_eq!(again.enc, f.sealed.enc);
    assert_eq!(again.ciphertext, f.sealed.ciphertext);
    assert_ne!(again.signature, f.sealed.signature);
    assert_released_ok(&f.open(&f.sealed).unwrap());
    assert_released_ok(&f.open(&again).unwrap());

    // The signature verifies under the pinned key over the documented
    // transcript, with AWS-LC and with the `p384` crate.
    let transcript = response_transcript(
        &f.sealed.document_sha384,
        &f.sealed.request_hash,
        &f.ephemeral.public_key_sec1(),
        &f.sealed.enc,
        &f.sealed.ciphertext,
    );
    for sealed in [&f.sealed, &again] {
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED,
            hex::decode(VECTOR_VERIFIER).unwrap(),
        )
        .verify(&transcript, &sealed.signature)
        .unwrap();
        use p384::ecdsa::signature::Verifier;
        p384::ecdsa::VerifyingKey::from_sec1_bytes(&hex::decode(VECTOR_VERIFIER).unwrap())
            .unwrap()
            .verify(
                &transcript,
                &p384::ecdsa::Signature::from_slice(&sealed.signature).unwrap(),
            )
            .unwrap();
    }

    // The complete response as the `p384`/`hpke` implementation made it,
    // signature included, still opens.
    let mut original = f.sealed.clone();
    original
        .signature
        .copy_from_slice(&hex::decode(VECTOR_SIGNATURE).unwrap());
    assert_released_ok(&f.open(&original).unwrap());
}

const VECTOR_RECIPIENT: &str = "\
    0404b4090807d33a3d6b838c1c4dbf1d3f2f0ccab4eb8f7ccd61615761d02ba9\
    ae25366e44121fcc26d3063c4bb270ce21fc20649035e0c7823aa83db3bbddb0\
    f8a03968cee905b47570cf5b04d7440c8282485d4b3e286ad1ae2208552d069b\
    27";
const VECTOR_VERIFIER: &str = "\
    044f2bda7fd2105f8467e21f45223ad58863ffa4c084832d9f6c64ffc47fdd51\
    9727ab53cb71f9c40de24b64acde61f02fc7dce130b612fa5dbcac94573a2354\
    fd005d8e9caefdc5fde48304474708bbd82f77e1fd2c630bea236f6f8dccc167\
    8e";
const VECTOR_REQUEST_HASH: &str = "\
    1bb7a5d17d4798a2790918a829d1e63bcb04a56d08d59b3cf64745484f958b50\
    3fc6b500492adbd26082fd6ce16e2d39";
const VECTOR_ENC: &str = "\
    0457d1c2bd118d99255223d837b757161875c887309bb73403e7c2d72e68f053\
    688ae5afc4006e0aa17e619d1c8a8a460bfa42bf7718a65a119148983bcb8b52\
    e5317cbba2b73532f9c1a004a94ff3e786c0365ccce6f236c6260d090ce7c020\
    9c";
const VECTOR_CIPHERTEXT: &str = "\
    d85d1b2859e65ed151f9b5f0754eec02e1f62abce2262243497ee165eaf5d4bb\
    bc098aa27c0d2f3a0703bb277b94b0d80026676bcf0b9b0a1165eb8a5cc94291\
    6c684aafd8d08a3aafbf7a8d39ce90027bcc77db1456a3b8faade7496a174813\
    3c0b02d6ec22639126b76559ec04442bd4cf65b371a4d721d62486302835b567\
    0088638ecfb61e525c2f996f04607b5502115a1c471fb15f14b6f9fb066a8ddf\
    8db7d003a1edbf1e6905847de1bf1417124b7a1cc39d507af30036253fb83fd5\
    1269a5fb3e77c7b078d720e7f12aae87af13bd9243767b6d08ffc3ee5d384c59\
    2c17a723c0be7047ef943e53e98ae3688737ffc9c1f87a7029a4bcda033cffa8\
    e7b5884e111e5740cf6487bf6ebec30b8905a5b7083fa24384";
/// The RFC 6979 signature the `p384` crate made for this vector.
const VECTOR_SIGNATURE: &str = "\
    dfc808719f358f0074d0f860fbe276f1bb5fbcbb7e296e3ceec402fd622fc6e6\
    d5289097db0eb8640220ce5c3d1aab76ed15b57809d7983ee835e20399a9a391\
    a3369f120b49c8b8e4dae579b5fe788e86dcef6a637ac9c814e68998d2cfdff5";

/// RFC 9180 written out from the specification with `p384`, `hkdf` and
/// `aes-gcm`, independently of the `hpke` crate, for the one suite this
/// protocol uses: DHKEM(P-384, HKDF-SHA384), HKDF-SHA384, AES-256-GCM.
mod rfc9180 {
    use hkdf::Hkdf;
    use sha2::Sha384;

    const KEM_SUITE: &[u8] = b"KEM\x00\x11";
    const HPKE_SUITE: &[u8] = b"HPKE\x00\x11\x00\x02\x00\x02";

    fn labeled_extract(suite: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> Vec<u8> {
        let input = [b"HPKE-v1".as_slice(), suite, label, ikm].concat();
        let (prk, _) = Hkdf::<Sha384>::extract(Some(salt), &input);
        prk.to_vec()
    }

    fn labeled_expand(suite: &[u8], prk: &[u8], label: &[u8], info: &[u8], len: u16) -> Vec<u8> {
        let input = [&len.to_be_bytes()[..], b"HPKE-v1", suite, label, info].concat();
        let mut out = vec![0u8; usize::from(len)];
        Hkdf::<Sha384>::from_prk(prk)
            .unwrap()
            .expand(&input, &mut out)
            .unwrap();
        out
    }

    /// §7.1.3 DeriveKeyPair for P-384 (bitmask 0xff).
    pub fn derive_key_pair(ikm: &[u8]) -> (p384::SecretKey, [u8; 97]) {
        let dkp_prk = labeled_extract(KEM_SUITE, b"", b"dkp_prk", ikm);
        for counter in 0u8..=255 {
            let bytes = labeled_expand(KEM_SUITE, &dkp_prk, b"candidate", &[counter], 48);
            if let Ok(sk) = p384::SecretKey::from_slice(&bytes) {
                let pk = sk.public_key().to_sec1_bytes();
                return (sk, pk.as_ref().try_into().unwrap());
            }
        }
        panic!("DeriveKeyPairError")
    }

    /// §4.1 Decap, §5.1 KeySchedule (mode_base), §5.2 Open (first message).
    pub fn open(
        sk_r: &p384::SecretKey,
        enc: &[u8],
        info: &[u8],
        aad: &[u8],
        ct: &[u8],
    ) -> Option<Vec<u8>> {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let pk_e = p384::PublicKey::from_sec1_bytes(enc).ok()?;
        let dh = p384::ecdh::diffie_hellman(sk_r.to_nonzero_scalar(), pk_e.as_affine());
        let pk_rm = sk_r.public_key().to_sec1_bytes();
        let kem_context = [enc, &pk_rm[..]].concat();
        let eae_prk = labeled_extract(KEM_SUITE, b"", b"eae_prk", dh.raw_secret_bytes());
        let shared_secret = labeled_expand(KEM_SUITE, &eae_prk, b"shared_secret", &kem_context, 48);

        let psk_id_hash = labeled_extract(HPKE_SUITE, b"", b"psk_id_hash", b"");
        let info_hash = labeled_extract(HPKE_SUITE, b"", b"info_hash", info);
        let context = [&[0u8][..], &psk_id_hash, &info_hash].concat();
        let secret = labeled_extract(HPKE_SUITE, &shared_secret, b"secret", b"");
        let key = labeled_expand(HPKE_SUITE, &secret, b"key", &context, 32);
        let nonce = labeled_expand(HPKE_SUITE, &secret, b"base_nonce", &context, 12);
        aes_gcm::Aes256Gcm::new_from_slice(&key)
            .ok()?
            .decrypt(
                &aes_gcm::Nonce::from(<[u8; 12]>::try_from(&nonce[..]).unwrap()),
                Payload { msg: ct, aad },
            )
            .ok()
    }
}

#[test]
fn vector_matches_an_independent_rfc9180_implementation() {
    let f = fixture();
    // The enclave key is DeriveKeyPair(ikm) of the RFC.
    let (sk_r, pk_r) = rfc9180::derive_key_pair(&[0x11; 48]);
    assert_eq!(pk_r, f.ephemeral.public_key_sec1());
    // The KEM's ephemeral key is DeriveKeyPair of the fixture's 48 bytes.
    let (_, pk_e) = rfc9180::derive_key_pair(&[0x33; 48]);
    assert_eq!(pk_e, f.sealed.enc);
    // The ciphertext opens under the documented info and empty AAD, and is
    // exactly the documented payload.
    let info = hpke_info(&doc_hash(), &f.request_hash);
    let plaintext = rfc9180::open(&sk_r, &f.sealed.enc, &info, b"", &f.sealed.ciphertext)
        .expect("independent open");
    assert_eq!(plaintext, encode_payload(&released()).unwrap().to_vec());
    // Another info does not open it.
    let other = hpke_info(&doc_hash(), &[0u8; 48]);
    assert!(rfc9180::open(&sk_r, &f.sealed.enc, &other, b"", &f.sealed.ciphertext).is_none());
}

#[test]
fn signature_is_ecdsa_p384_sha384_over_the_documented_transcript() {
    use p384::ecdsa::signature::Verifier;
    let f = fixture();
    let transcript = response_transcript(
        &f.sealed.document_sha384,
        &f.sealed.request_hash,
        &f.ephemeral.public_key_sec1(),
        &f.sealed.enc,
        &f.sealed.ciphertext,
    );
    let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(&f.pinned).unwrap();
    let sig = p384::ecdsa::Signature::from_slice(&f.sealed.signature).unwrap();
    key.verify(&transcript, &sig).unwrap();
}

#[test]
fn parent_substituting_its_own_identity_fails() {
    let f = fixture();
    let parent = VerifierIdentity::generate().unwrap();

    // Re-signing the genuine box with its own key.
    let mut resigned = f.sealed.clone();
    f.resign(&mut resigned, &parent);
    assert_eq!(f.open(&resigned).unwrap_err(), OpenError::BadSignature);

    // Sealing keys it knows to the enclave's (public) key, bound to the right
    // document and request, signed with its own key.
    let forged = seal_keys(
        &f.ephemeral.public_key_sec1(),
        &doc_hash(),
        &f.request_hash,
        &released(),
        &parent,
    )
    .unwrap();
    assert_eq!(f.open(&forged).unwrap_err(), OpenError::BadSignature);

    // The same forgery opens if the enclave pinned the parent's key: the
    // pinned key is the whole defence, which is why it is in the image.
    assert!(open_keys(
        &forged,
        &f.ephemeral,
        &parent.public_key_sec1(),
        &doc_hash(),
        &f.request_hash
    )
    .is_ok());
}

#[test]
fn any_altered_field_fails_the_signature() {
    let f = fixture();
    let s = &f.sealed;
    let mut cases: Vec<SealedKeys> = Vec::new();
    for i in [0usize, 1, 47] {
        let mut m = s.clone();
        m.document_sha384[i] ^= 1;
        cases.push(m);
        let mut m = s.clone();
        m.request_hash[i] ^= 1;
        cases.push(m);
    }
    for i in [0usize, 1, 48, 96] {
        let mut m = s.clone();
        m.enc[i] ^= 1;
        cases.push(m);
    }
    let n = s.ciphertext.len();
    for i in [0, 1, n / 2, n - 17, n - 16, n - 1] {
        let mut m = s.clone();
        m.ciphertext[i] ^= 0x80;
        cases.push(m);
    }
    let mut m = s.clone();
    m.ciphertext.pop();
    cases.push(m);
    let mut m = s.clone();
    m.ciphertext.push(0);
    cases.push(m);
    for i in [0usize, 47, 48, 95] {
        let mut m = s.clone();
        m.signature[i] ^= 1;
        cases.push(m);
    }
    let mut m = s.clone();
    m.signature = [0u8; 96];
    cases.push(m);
    let mut m = s.clone();
    m.signature = [0xff; 96];
    cases.push(m);
    for (i, case) in cases.iter().enumerate() {
        assert_eq!(
            f.open(case).unwrap_err(),
            OpenError::BadSignature,
            "case {i}"
        );
    }
}

#[test]
fn response_for_another_session_key_fails_the_signature() {
    // A genuine response to another enclave (or an earlier session) replayed.
    let f = fixture();
    let other = EphemeralKeyPair::derive(&[0x12; 48]);
    let sealed = seal_keys(
        &other.public_key_sec1(),
        &doc_hash(),
        &f.request_hash,
        &released(),
        &f.identity,
    )
    .unwrap();
    assert_eq!(f.open(&sealed).unwrap_err(), OpenError::BadSignature);
}

#[test]
fn wrong_document_hash_is_reported() {
    // Validly signed for this key, but for another document (for example a
    // retry that reused the key pair with a fresh nonce).
    let f = fixture();
    let other_doc: [u8; 48] = Sha384::digest(b"another document").into();
    let sealed = seal_keys(
        &f.ephemeral.public_key_sec1(),
        &other_doc,
        &f.request_hash,
        &released(),
        &f.identity,
    )
    .unwrap();
    assert!(matches!(
        f.open(&sealed).unwrap_err(),
        OpenError::DocumentMismatch { expected, found }
            if expected == crate::error::hex(&doc_hash()) && found == crate::error::hex(&other_doc)
    ));
}

#[test]
fn wrong_request_hash_is_reported() {
    let f = fixture();
    let other = KeyRequest::new(vec![KeyOperation::GenerateDataKey {
        key_id: "other".into(),
    }])
    .unwrap();
    let sealed = seal_keys(
        &f.ephemeral.public_key_sec1(),
        &doc_hash(),
        &request_hash(&other),
        &released(),
        &f.identity,
    )
    .unwrap();
    assert!(matches!(
        f.open(&sealed).unwrap_err(),
        OpenError::RequestMismatch { .. }
    ));
}

#[test]
fn tampered_ciphertext_under_a_valid_signature_fails_to_decrypt() {
    // Only the verifier could produce this (a bug, or a box sealed to another
    // key that it then signed for this one); the HPKE layer still refuses.
    let f = fixture();
    let n = f.sealed.ciphertext.len();
    for i in [0, n / 2, n - 1] {
        let mut m = f.sealed.clone();
        m.ciphertext[i] ^= 1;
        f.resign(&mut m, &f.identity);
        assert_eq!(f.open(&m).unwrap_err(), OpenError::Decrypt, "byte {i}");
    }
    // enc replaced by another valid point.
    let mut m = f.sealed.clone();
    m.enc = EphemeralKeyPair::derive(&[0x99; 48]).public_key_sec1();
    f.resign(&mut m, &f.identity);
    assert_eq!(f.open(&m).unwrap_err(), OpenError::Decrypt);
    // enc that is not a point at all.
    let mut m = f.sealed.clone();
    m.enc = [0x04; 97];
    f.resign(&mut m, &f.identity);
    assert_eq!(f.open(&m).unwrap_err(), OpenError::Decrypt);
}

#[test]
fn malformed_ciphertext_lengths() {
    let f = fixture();
    let mut m = f.sealed.clone();
    m.ciphertext.truncate(15);
    assert!(matches!(
        f.open(&m).unwrap_err(),
        OpenError::Malformed {
            field: "ciphertext",
            found: 15,
            ..
        }
    ));
    let mut m = f.sealed.clone();
    m.ciphertext = vec![0; crate::message::MAX_SEALED_CIPHERTEXT_LEN + 1];
    assert!(matches!(
        f.open(&m).unwrap_err(),
        OpenError::Malformed { .. }
    ));
}

#[test]
fn bad_pinned_key_is_a_configuration_error() {
    let f = fixture();
    // Other encodings of the right key are not SEC1: the X.509
    // SubjectPublicKeyInfo (which AWS-LC alone would accept), the hybrid form.
    let spki = p384::pkcs8::EncodePublicKey::to_public_key_der(
        &p384::PublicKey::from_sec1_bytes(&f.pinned).unwrap(),
    )
    .unwrap();
    let mut hybrid = f.pinned;
    hybrid[0] = 0x06 | (f.pinned[96] & 1);
    let mut off_curve = f.pinned;
    off_curve[96] ^= 1;
    for pinned in [
        &[][..],
        &[0x04; 97][..],
        &f.pinned[..96],
        &[0u8][..],
        spki.as_bytes(),
        &hybrid[..],
        &off_curve[..],
    ] {
        assert_eq!(
            open_keys(
                &f.sealed,
                &f.ephemeral,
                pinned,
                &doc_hash(),
                &f.request_hash
            )
            .unwrap_err(),
            OpenError::PinnedKey
        );
    }
    // The compressed form of the right key is the same key.
    let compressed = p384::ecdsa::VerifyingKey::from_sec1_bytes(&f.pinned)
        .unwrap()
        .to_encoded_point(true);
    assert!(open_keys(
        &f.sealed,
        &f.ephemeral,
        compressed.as_bytes(),
        &doc_hash(),
        &f.request_hash
    )
    .is_ok());
}

#[test]
fn payload_version_and_shape_are_checked_after_decryption() {
    let f = fixture();
    let mut v2 = Vec::new();
    ciborium::ser::into_writer(&(2u64, Vec::<u8>::new()), &mut v2).unwrap();
    assert_eq!(
        f.open(&f.seal_raw(&v2)).unwrap_err(),
        OpenError::PayloadVersion {
            expected: 1,
            found: 2
        }
    );
    for garbage in [&b""[..], b"\xff", b"\x82\x01\x80", b"\x82\x01"] {
        assert!(
            matches!(
                f.open(&f.seal_raw(garbage)).unwrap_err(),
                OpenError::Payload { .. }
            ),
            "{garbage:?}"
        );
    }
    let mut trailing = encode_payload(&released()).unwrap().to_vec();
    trailing.push(0);
    assert!(matches!(
        f.open(&f.seal_raw(&trailing)).unwrap_err(),
        OpenError::Payload { .. }
    ));
    // A payload error never shows key bytes.
    let e = f.open(&f.seal_raw(&trailing)).unwrap_err().to_string();
    assert!(!e.contains("77") && !e.contains("119"), "{e}");
}

#[test]
fn keys_must_answer_the_request() {
    let f = fixture();
    let reversed = {
        let mut k = released();
        k.reverse();
        k
    };
    let sealed = seal_keys(
        &f.ephemeral.public_key_sec1(),
        &doc_hash(),
        &f.request_hash,
        &reversed,
        &f.identity,
    )
    .unwrap();
    // open_keys alone cannot know; open_keys_for_request does.
    assert!(f.open(&sealed).is_ok());
    assert!(matches!(
        open_keys_for_request(&sealed, &f.ephemeral, &f.pinned, &doc_hash(), &request())
            .unwrap_err(),
        OpenError::ResponseMismatch { .. }
    ));
    assert_released_ok(
        &open_keys_for_request(&f.sealed, &f.ephemeral, &f.pinned, &doc_hash(), &request())
            .unwrap(),
    );
}

#[test]
fn seal_refuses_bad_inputs() {
    let f = fixture();
    let id = &f.identity;
    let pk = f.ephemeral.public_key_sec1();
    let seal =
        |pk: &[u8], keys: &[ReleasedKey]| seal_keys(pk, &doc_hash(), &f.request_hash, keys, id);

    // Recipient keys: wrong length, compressed, not on the curve, identity.
    use p384::elliptic_curve::sec1::ToEncodedPoint;
    let compressed_point = p384::PublicKey::from_sec1_bytes(&pk)
        .unwrap()
        .to_encoded_point(true);
    let mut off_curve = pk;
    off_curve[96] ^= 1;
    for bad in [
        &[][..],
        &pk[..96],
        compressed_point.as_bytes(),
        &off_curve[..],
        &[0u8; 97][..],
    ] {
        assert!(
            matches!(seal(bad, &released()), Err(SealError::RecipientKey { .. })),
            "{}",
            bad.len()
        );
    }

    assert!(matches!(
        seal(&pk, &[]),
        Err(SealError::KeyCount { found: 0, .. })
    ));
    let many: Vec<ReleasedKey> = (0..65)
        .map(|_| ReleasedKey {
            key_id: "k".into(),
            version: 1,
            wrapped: vec![],
            plaintext: PlaintextKey::from_bytes(&[0; 32]),
        })
        .collect();
    assert!(matches!(
        seal(&pk, &many),
        Err(SealError::KeyCount { found: 65, .. })
    ));

    let mut k = released();
    k[1].key_id.clear();
    assert!(matches!(
        seal(&pk, &k),
        Err(SealError::KeyField {
            index: 1,
            field: "key_id",
            ..
        })
    ));
    let mut k = released();
    k[0].key_id = "x".repeat(256);
    assert!(matches!(seal(&pk, &k), Err(SealError::KeyField { .. })));
    let mut k = released();
    k[0].wrapped = vec![0; 1025];
    assert!(matches!(
        seal(&pk, &k),
        Err(SealError::KeyField {
            field: "wrapped",
            ..
        })
    ));
}

#[test]
fn ephemeral_keys_are_fresh_and_redacted() {
    let a = EphemeralKeyPair::generate().unwrap();
    let b = EphemeralKeyPair::generate().unwrap();
    assert_ne!(a.public_key_sec1(), b.public_key_sec1());
    assert_eq!(a.public_key_sec1()[0], 0x04);
    let s = format!("{a:?}");
    assert!(s.contains("<redacted>"));
    assert!(s.contains(&crate::error::hex(&a.public_key_sec1())));
}

#[test]
fn errors_carry_no_key_material() {
    let f = fixture();
    let key_hex = crate::error::hex(&[0x77; 32]);
    let mut m = f.sealed.clone();
    m.ciphertext[0] ^= 1;
    f.resign(&mut m, &f.identity);
    for e in [
        f.open(&m).unwrap_err(),
        OpenError::BadSignature,
        f.open(&f.seal_raw(b"\xff")).unwrap_err(),
    ] {
        let s = format!("{e} {e:?}");
        assert!(!s.contains(&key_hex), "{s}");
    }
}

// --- the client exchange over an in-memory stream -------------------------

/// A stand-in verifier: answers one challenge and one key release. It does
/// not verify attestation (that is the verifier's job, not this crate's); it
/// takes the recipient key from the last 97 bytes of the "document".
async fn fake_verifier(
    mut stream: tokio::io::DuplexStream,
    identity: VerifierIdentity,
    refuse: Option<ErrorCode>,
) {
    use crate::message::{read_message, write_message};
    let max = crate::DEFAULT_MAX_FRAME_LEN;
    let Request::Challenge = read_message::<Request, _>(&mut stream, max).await.unwrap() else {
        panic!("expected a challenge request")
    };
    let challenge = Response::Challenge {
        nonce: [9; 32],
        expires_at_ms: 1_700_000_000_000,
    };
    write_message(&mut stream, &challenge, max).await.unwrap();
    let Request::KeyRelease {
        attestation_document,
        request,
    } = read_message::<Request, _>(&mut stream, max).await.unwrap()
    else {
        panic!("expected a key release request")
    };
    if let Some(code) = refuse {
        write_message(&mut stream, &Response::Error { code }, max)
            .await
            .unwrap();
        return;
    }
    let pk = &attestation_document[attestation_document.len() - 97..];
    let doc_hash: [u8; 48] = Sha384::digest(&attestation_document).into();
    assert_eq!(request, self::request());
    let sealed = seal_keys(
        pk,
        &doc_hash,
        &request_hash(&request),
        &released(),
        &identity,
    )
    .unwrap();
    write_message(&mut stream, &Response::KeyRelease(Box::new(sealed)), max)
        .await
        .unwrap();
}

async fn run_client(
    refuse: Option<ErrorCode>,
    pin_other: bool,
) -> Result<Vec<ReleasedKey>, ClientError> {
    let identity = VerifierIdentity::generate().unwrap();
    let pinned = if pin_other {
        VerifierIdentity::generate().unwrap().public_key_sec1()
    } else {
        identity.public_key_sec1()
    };
    let (mut client, server) = tokio::io::duplex(4096);
    let verifier = tokio::spawn(fake_verifier(server, identity, refuse));
    let max = crate::DEFAULT_MAX_FRAME_LEN;
    let challenge = request_challenge(&mut client, max).await.unwrap();
    assert_eq!(challenge.nonce, [9; 32]);
    let ephemeral = EphemeralKeyPair::generate().unwrap();
    let mut document = b"a document naming nonce and user data, then the key: ".to_vec();
    document.extend_from_slice(&ephemeral.public_key_sec1());
    let result = request_keys(&mut client, max, &document, &request(), &ephemeral, &pinned).await;
    verifier.await.unwrap();
    result
}

#[tokio::test]
async fn client_exchange_releases_keys() {
    assert_released_ok(&run_client(None, false).await.unwrap());
}

#[tokio::test]
async fn client_reports_a_refusal() {
    assert!(matches!(
        run_client(Some(ErrorCode::Denied), false).await,
        Err(ClientError::Refused(ErrorCode::Denied))
    ));
}

#[tokio::test]
async fn client_refuses_a_verifier_it_did_not_pin() {
    assert!(matches!(
        run_client(None, true).await,
        Err(ClientError::Open(OpenError::BadSignature))
    ));
}

#[tokio::test]
async fn client_refuses_an_unexpected_response() {
    use crate::message::write_message;
    let (mut client, mut server) = tokio::io::duplex(4096);
    let max = crate::DEFAULT_MAX_FRAME_LEN;
    write_message(
        &mut server,
        &Response::Error {
            code: ErrorCode::Internal,
        },
        max,
    )
    .await
    .unwrap();
    write_message(
        &mut server,
        &Response::Challenge {
            nonce: [0; 32],
            expires_at_ms: 0,
        },
        max,
    )
    .await
    .unwrap();
    assert!(matches!(
        request_challenge(&mut client, max).await,
        Err(ClientError::Refused(ErrorCode::Internal))
    ));
    let ephemeral = EphemeralKeyPair::generate().unwrap();
    assert!(matches!(
        request_keys(&mut client, max, b"doc", &request(), &ephemeral, &[4; 97]).await,
        Err(ClientError::UnexpectedResponse {
            expected: "key_release",
            found: "challenge"
        })
    ));
}

/// A verifier whose identity is in an HSM signs answers with a release key
/// the identity certified: the enclave opens them under its pinned identity,
/// and refuses a certificate by another key, an altered or stripped one, and
/// an expired one.
#[test]
fn answers_signed_by_a_certified_release_key() {
    use crate::{seal_keys_delegated, DelegatedKey, ReleaseDelegation, DELEGATION_CLOCK_SKEW_MS};
    let ephemeral = EphemeralKeyPair::generate().unwrap();
    let identity = VerifierIdentity::generate().unwrap();
    let pinned = identity.public_key_sec1();
    let req = request();
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let seal = |key: &DelegatedKey| {
        seal_keys_delegated(
            &ephemeral.public_key_sec1(),
            &doc_hash(),
            &request_hash(&req),
            &released(),
            key,
        )
        .unwrap()
    };
    let open =
        |sealed: &SealedKeys| open_keys_for_request(sealed, &ephemeral, &pinned, &doc_hash(), &req);
    let key = DelegatedKey::issue(&identity, now + 3_600_000).unwrap();
    let sealed = seal(&key);
    assert_eq!(sealed.delegation.as_ref(), Some(key.delegation()));
    assert_released_ok(&open(&sealed).unwrap());
    // The release key's signature alone, without the certificate, is not the
    // identity's.
    let mut stripped = sealed.clone();
    stripped.delegation = None;
    assert_eq!(open(&stripped).unwrap_err(), OpenError::BadSignature);
    // A certificate by another identity (a parent's own key), or with any
    // field changed, does not verify.
    let other = VerifierIdentity::generate().unwrap();
    let forged = seal(&DelegatedKey::issue(&other, now + 3_600_000).unwrap());
    assert_eq!(open(&forged).unwrap_err(), OpenError::BadDelegation);
    let mut later = sealed.clone();
    if let Some(d) = later.delegation.as_mut() {
        d.not_after_ms += 86_400_000;
    }
    assert_eq!(open(&later).unwrap_err(), OpenError::BadDelegation);
    let mut swapped: SealedKeys = sealed.clone();
    let another = DelegatedKey::issue(&identity, now + 3_600_000).unwrap();
    swapped.delegation = Some(ReleaseDelegation {
        public_key: another.delegation().public_key,
        ..key.delegation().clone()
    });
    assert_eq!(open(&swapped).unwrap_err(), OpenError::BadDelegation);
    // A certified key of the right identity whose certificate is for another
    // key does not sign this answer.
    let mut mixed = seal(&another);
    mixed.delegation = Some(key.delegation().clone());
    assert_eq!(open(&mixed).unwrap_err(), OpenError::BadSignature);
    // Expired beyond the allowed clock skew: refused; within it: accepted.
    let expired =
        seal(&DelegatedKey::issue(&identity, now - DELEGATION_CLOCK_SKEW_MS - 60_000).unwrap());
    assert!(matches!(
        open(&expired).unwrap_err(),
        OpenError::DelegationExpired { .. }
    ));
    let just = seal(&DelegatedKey::issue(&identity, now - 1_000).unwrap());
    assert_released_ok(&open(&just).unwrap());
    // The release key never shows its private half.
    assert!(format!("{key:?}").contains("<redacted>"));
}
