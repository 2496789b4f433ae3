//! HPKE (RFC 9180) base mode for exactly one cipher suite, on AWS-LC:
//! DHKEM(P-384, HKDF-SHA384) (KEM `0x0011`), HKDF-SHA384 (KDF `0x0002`),
//! AES-256-GCM (AEAD `0x0002`); single-shot seal and open of one message
//! (sequence number 0).
//!
//! # Why this is hand-written
//!
//! No maintained crate offers HPKE over AWS-LC, and the `hpke` crate's
//! pure-Rust P-384 arithmetic was the bottleneck of key release (about 2.5 ms
//! of each seal and each open on the target machine). AWS-LC does the same
//! P-384 ECDH several times faster. This module is the RFC's pseudocode for
//! the one suite the protocol uses, over `aws-lc-rs` primitives, and nothing
//! more: no other modes, suites, sequence numbers or exporters.
//!
//! | RFC 9180 | here |
//! |---|---|
//! | §4 `LabeledExtract`, `LabeledExpand` | [`labeled_extract`], [`labeled_expand`] |
//! | §4.1 DHKEM `Encap` / `Decap`, `ExtractAndExpand` | [`seal`], [`open`], [`shared_secret`] |
//! | §5.1 `KeySchedule` (`mode_base`, `psk` = `psk_id` = `""`) | [`key_schedule_base`] |
//! | §5.2 `Seal` / `Open`, first message (`nonce = base_nonce XOR 0`) | [`seal`], [`open`] |
//! | §7.1 P-384: `Nsecret` = `Nenc` = `Npk`, `Nsk` 48; `SerializePublicKey` = uncompressed SEC1 | [`NENC`], [`NPK`] |
//! | §7.1.3 `DeriveKeyPair` (bitmask `0xff`) | `KeyPair::derive`, tests only |
//! | §7.1.4 validation of public keys | [`PublicKey::from_bytes`] |
//! | §7.2 HKDF-SHA384 (`Nh` = 48) | HMAC-SHA384 / `hkdf::Prk` |
//! | §7.3 AES-256-GCM (`Nk` 32, `Nn` 12, `Nt` 16) | `aead::AES_256_GCM` |
//!
//! HKDF-Extract(salt, ikm) is HMAC-SHA384(salt, ikm), an empty salt meaning
//! `Nh` zero bytes (RFC 5869 §2.2); it is computed with HMAC because
//! `aws-lc-rs`'s `hkdf::Prk` is opaque and `psk_id_hash`, `info_hash` and
//! `secret` are needed as bytes. HKDF-Expand is `hkdf::Prk::new_less_safe` +
//! `expand`. The tests check this module against the `hpke` crate in both
//! directions, byte for byte with fixed randomness, and against an
//! independent transcription of the RFC.
//!
//! # Secrets
//!
//! The DH output is handed over by `aws-lc-rs` in a buffer it zeroizes; the
//! PRKs, `shared_secret`, `secret`, `key` and `base_nonce` live in
//! [`Zeroizing`] buffers (HMAC output is written straight into them, and
//! `hkdf::Prk` zeroizes its copy on drop), and so does the plaintext. Private
//! keys are AWS-LC objects, cleansed when freed, and never exported.

use aws_lc_rs::agreement::{self, ParsedPublicKey, ParsedPublicKeyFormat, ECDH_P384};
use aws_lc_rs::error::Unspecified;
use aws_lc_rs::{aead, hkdf, hmac};
use std::fmt;
use zeroize::Zeroizing;

/// `Npk`: a serialised P-384 public key, uncompressed SEC1 `0x04 || x || y`.
pub(crate) const NPK: usize = 97;
/// `Nenc`: the encapsulated key is the ephemeral public key.
pub(crate) const NENC: usize = NPK;
/// `Nt`: the AES-GCM tag.
pub(crate) const NT: usize = 16;
/// `Nsecret` of the KEM.
const NSECRET: usize = 48;
/// `Nh` of HKDF-SHA384.
const NH: usize = 48;
/// `Nk` of AES-256-GCM.
const NK: usize = 32;
/// `Nn` of AES-256-GCM.
const NN: usize = 12;
/// `Nsk` of P-384 (the input keying material of `DeriveKeyPair` in tests).
#[cfg(test)]
pub(crate) const NSK: usize = 48;

/// `suite_id` of the KEM: `"KEM" || I2OSP(kem_id, 2)` (§4.1).
const KEM_SUITE_ID: &[u8] = b"KEM\x00\x11";
/// `suite_id` of the rest: `"HPKE" || I2OSP(kem_id, 2) || I2OSP(kdf_id, 2) ||
/// I2OSP(aead_id, 2)` (§5.1).
const HPKE_SUITE_ID: &[u8] = b"HPKE\x00\x11\x00\x02\x00\x02";
/// The version label of `LabeledExtract` and `LabeledExpand` (§4).
const VERSION_LABEL: &[u8] = b"HPKE-v1";
/// `mode_base` (§5).
const MODE_BASE: u8 = 0x00;
/// SEC1 tag of an uncompressed point.
const SEC1_UNCOMPRESSED: u8 = 0x04;
/// `kem_context = enc || pkRm` (§4.1).
const KEM_CONTEXT_LEN: usize = NENC + NPK;
/// `key_schedule_context = mode || psk_id_hash || info_hash` (§5.1).
const KEY_SCHEDULE_CONTEXT_LEN: usize = 1 + NH + NH;

/// Copy `parts` one after another into `out`, which they must fill exactly.
fn concat_into(out: &mut [u8], parts: &[&[u8]]) -> Result<(), Unspecified> {
    let mut rest = out;
    for part in parts {
        let (head, tail) = std::mem::take(&mut rest)
            .split_at_mut_checked(part.len())
            .ok_or(Unspecified)?;
        head.copy_from_slice(part);
        rest = tail;
    }
    if rest.is_empty() {
        Ok(())
    } else {
        Err(Unspecified)
    }
}

/// §4 `LabeledExtract(salt, label, ikm) = Extract(salt, "HPKE-v1" || suite_id
/// || label || ikm)`, with `Extract` = HMAC-SHA384(salt, ·) and an empty salt
/// meaning `Nh` zero bytes.
fn labeled_extract(
    suite_id: &[u8],
    salt: &[u8],
    label: &[u8],
    ikm: &[u8],
) -> Result<Zeroizing<[u8; NH]>, Unspecified> {
    let len = [VERSION_LABEL.len(), suite_id.len(), label.len(), ikm.len()]
        .iter()
        .try_fold(0usize, |acc, n| acc.checked_add(*n))
        .ok_or(Unspecified)?;
    // Holds `ikm`, which may be secret (the DH output).
    let mut labeled_ikm = Zeroizing::new(vec![0u8; len]);
    concat_into(&mut labeled_ikm, &[VERSION_LABEL, suite_id, label, ikm])?;

    let zero_salt = [0u8; NH];
    let salt = if salt.is_empty() {
        &zero_salt[..]
    } else {
        salt
    };
    let key = hmac::Key::new(hmac::HMAC_SHA384, salt);
    let mut prk = Zeroizing::new([0u8; NH]);
    let written = hmac::sign_to_buffer(&key, &labeled_ikm, &mut prk[..])?.len();
    if written != NH {
        return Err(Unspecified);
    }
    Ok(prk)
}

/// An HKDF output length.
struct OkmLen(usize);

impl hkdf::KeyType for OkmLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// §4 `LabeledExpand(prk, label, info, L) = Expand(prk, I2OSP(L, 2) ||
/// "HPKE-v1" || suite_id || label || info, L)`, with `L = out.len()`.
fn labeled_expand(
    suite_id: &[u8],
    prk: &[u8; NH],
    label: &[u8],
    info: &[u8],
    out: &mut [u8],
) -> Result<(), Unspecified> {
    let length = u16::try_from(out.len())
        .map_err(|_| Unspecified)?
        .to_be_bytes();
    // Zeroizes its copy of the PRK on drop.
    let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA384, prk);
    let labeled_info: [&[u8]; 5] = [&length, VERSION_LABEL, suite_id, label, info];
    prk.expand(&labeled_info, OkmLen(out.len()))?.fill(out)
}

/// A DHKEM(P-384) key pair. The private key is an AWS-LC object: it cannot be
/// exported, is cleansed when freed, and is never shown by `Debug`.
pub(crate) struct KeyPair {
    private: agreement::PrivateKey,
    public: [u8; NPK],
}

impl KeyPair {
    /// §4 `GenerateKeyPair()`, from AWS-LC's DRBG.
    pub(crate) fn generate() -> Result<Self, Unspecified> {
        Self::from_private(agreement::PrivateKey::generate(&ECDH_P384)?)
    }

    fn from_private(private: agreement::PrivateKey) -> Result<Self, Unspecified> {
        let public: [u8; NPK] = private
            .compute_public_key()?
            .as_ref()
            .try_into()
            .map_err(|_| Unspecified)?;
        if public.first() != Some(&SEC1_UNCOMPRESSED) {
            return Err(Unspecified);
        }
        Ok(KeyPair { private, public })
    }

    /// §7.1.3 `DeriveKeyPair(ikm)` for P-384 (bitmask `0xff`): fixed test
    /// vectors only; production keys always come from [`KeyPair::generate`].
    #[cfg(test)]
    pub(crate) fn derive(ikm: &[u8]) -> Result<Self, Unspecified> {
        let dkp_prk = labeled_extract(KEM_SUITE_ID, b"", b"dkp_prk", ikm)?;
        for counter in 0u8..=255 {
            let mut candidate = Zeroizing::new([0u8; NSK]);
            labeled_expand(
                KEM_SUITE_ID,
                &dkp_prk,
                b"candidate",
                &[counter],
                &mut candidate[..],
            )?;
            // AWS-LC refuses 0 and anything not below the group order.
            if let Ok(private) = agreement::PrivateKey::from_private_key(&ECDH_P384, &candidate[..])
            {
                return Self::from_private(private);
            }
        }
        Err(Unspecified)
    }

    /// §7.1.1 `SerializePublicKey(pk)`: uncompressed SEC1.
    pub(crate) fn public_key(&self) -> &[u8; NPK] {
        &self.public
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public_key", &crate::error::hex(&self.public))
            .field("private_key", &"<redacted>")
            .finish()
    }
}

/// A P-384 public key that passed §7.1.4 validation.
pub(crate) struct PublicKey {
    parsed: ParsedPublicKey,
    bytes: [u8; NPK],
}

impl PublicKey {
    /// §7.1.1 `DeserializePublicKey` with §7.1.4 validation: exactly 97 bytes,
    /// uncompressed SEC1 (no compressed, hybrid or DER forms), a point on the
    /// curve (AWS-LC checks it, and the identity has no 97-byte encoding).
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let bytes: [u8; NPK] = bytes.try_into().ok()?;
        if bytes.first() != Some(&SEC1_UNCOMPRESSED) {
            return None;
        }
        let parsed =
            ParsedPublicKey::try_from(agreement::UnparsedPublicKey::new(&ECDH_P384, &bytes[..]))
                .ok()?;
        if parsed.format() != ParsedPublicKeyFormat::Uncompressed || parsed.alg() != &ECDH_P384 {
            return None;
        }
        Some(PublicKey { parsed, bytes })
    }

    /// The key as it was given (uncompressed SEC1).
    pub(crate) fn as_bytes(&self) -> &[u8; NPK] {
        &self.bytes
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PublicKey")
            .field(&crate::error::hex(&self.bytes))
            .finish()
    }
}

/// §4.1 `DH(sk, pk)` then `ExtractAndExpand(dh, kem_context)`:
/// `eae_prk = LabeledExtract("", "eae_prk", dh)`, `shared_secret =
/// LabeledExpand(eae_prk, "shared_secret", kem_context, Nsecret)`. AWS-LC
/// refuses a peer key that is not a valid point of the private key's curve.
fn shared_secret(
    private: &agreement::PrivateKey,
    peer: &PublicKey,
    kem_context: &[u8; KEM_CONTEXT_LEN],
) -> Result<Zeroizing<[u8; NSECRET]>, Unspecified> {
    agreement::agree(private, peer.parsed.clone(), Unspecified, |dh| {
        let eae_prk = labeled_extract(KEM_SUITE_ID, b"", b"eae_prk", dh)?;
        let mut shared_secret = Zeroizing::new([0u8; NSECRET]);
        labeled_expand(
            KEM_SUITE_ID,
            &eae_prk,
            b"shared_secret",
            kem_context,
            &mut shared_secret[..],
        )?;
        Ok(shared_secret)
    })
}

/// §4.1 `kem_context = enc || pkRm`.
fn kem_context(
    enc: &[u8; NENC],
    recipient: &[u8; NPK],
) -> Result<[u8; KEM_CONTEXT_LEN], Unspecified> {
    let mut context = [0u8; KEM_CONTEXT_LEN];
    concat_into(&mut context, &[enc, recipient])?;
    Ok(context)
}

/// §5.1 `KeySchedule(mode_base, shared_secret, info, psk = "", psk_id = "")`:
/// the AEAD key and `base_nonce` (the exporter secret is not needed).
fn key_schedule_base(
    shared_secret: &[u8; NSECRET],
    info: &[u8],
) -> Result<(aead::LessSafeKey, Zeroizing<[u8; NN]>), Unspecified> {
    let psk_id_hash = labeled_extract(HPKE_SUITE_ID, b"", b"psk_id_hash", b"")?;
    let info_hash = labeled_extract(HPKE_SUITE_ID, b"", b"info_hash", info)?;
    let mut context = [0u8; KEY_SCHEDULE_CONTEXT_LEN];
    concat_into(
        &mut context,
        &[&[MODE_BASE], &psk_id_hash[..], &info_hash[..]],
    )?;

    let secret = labeled_extract(HPKE_SUITE_ID, &shared_secret[..], b"secret", b"")?;
    let mut key = Zeroizing::new([0u8; NK]);
    labeled_expand(HPKE_SUITE_ID, &secret, b"key", &context, &mut key[..])?;
    let mut base_nonce = Zeroizing::new([0u8; NN]);
    labeled_expand(
        HPKE_SUITE_ID,
        &secret,
        b"base_nonce",
        &context,
        &mut base_nonce[..],
    )?;
    let key = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &key[..])?);
    Ok((key, base_nonce))
}

/// §5.2 `SealBase(pkR, info, aad, pt)` as one single-shot message: §4.1
/// `Encap(pkR)` with the ephemeral key pair `ephemeral` (consumed: one key,
/// one message), the key schedule, then AES-256-GCM with `nonce =
/// base_nonce` (sequence number 0). Returns `enc` and `ct` (ciphertext ||
/// tag).
pub(crate) fn seal(
    ephemeral: KeyPair,
    recipient: &PublicKey,
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<([u8; NENC], Vec<u8>), Unspecified> {
    let enc = ephemeral.public;
    let context = kem_context(&enc, &recipient.bytes)?;
    let shared_secret = shared_secret(&ephemeral.private, recipient, &context)?;
    drop(ephemeral);
    let (key, base_nonce) = key_schedule_base(&shared_secret, info)?;

    // Sized so the tag fits without reallocating (which would leave a copy
    // of the plaintext behind); sealed in place, so the buffer then holds
    // only ciphertext.
    let mut buffer = Zeroizing::new(Vec::with_capacity(
        plaintext.len().checked_add(NT).ok_or(Unspecified)?,
    ));
    buffer.extend_from_slice(plaintext);
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key(*base_nonce),
        aead::Aad::from(aad),
        &mut *buffer,
    )?;
    Ok((enc, std::mem::take(&mut *buffer)))
}

/// §5.2 `OpenBase(enc, skR, info, aad, ct)` of a single-shot message: §4.1
/// `Decap(enc, skR)` (refusing an `enc` that fails §7.1.4 validation), the
/// key schedule, then AES-256-GCM with `nonce = base_nonce`. The plaintext
/// comes back in a zeroizing buffer.
pub(crate) fn open(
    recipient: &KeyPair,
    enc: &[u8],
    info: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Unspecified> {
    if ciphertext.len() < NT {
        return Err(Unspecified);
    }
    let ephemeral = PublicKey::from_bytes(enc).ok_or(Unspecified)?;
    let context = kem_context(&ephemeral.bytes, &recipient.public)?;
    let shared_secret = shared_secret(&recipient.private, &ephemeral, &context)?;
    let (key, base_nonce) = key_schedule_base(&shared_secret, info)?;

    let mut buffer = Zeroizing::new(ciphertext.to_vec());
    let plaintext_len = key
        .open_in_place(
            aead::Nonce::assume_unique_for_key(*base_nonce),
            aead::Aad::from(aad),
            &mut buffer[..],
        )?
        .len();
    // `Zeroizing<Vec<u8>>` clears the whole capacity on drop, tag included.
    buffer.truncate(plaintext_len);
    Ok(buffer)
}

#[cfg(test)]
mod tests {
    //! Interoperability with the `hpke` crate (pure Rust, RustCrypto P-384) in
    //! both directions, and byte-for-byte agreement with fixed randomness.
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::arithmetic_side_effects,
        clippy::indexing_slicing
    )]

    use super::*;
    use hpke::aead::AesGcm256;
    use hpke::kdf::HkdfSha384;
    use hpke::kem::DhP384HkdfSha384;
    use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
    use proptest::prelude::*;
    use rand_core::{OsRng, RngCore as _};

    type Kem = DhP384HkdfSha384;

    /// The `hpke` crate takes an RNG of its own `rand_core` generation; this
    /// hands it the bytes it is given (fixed or from the OS) and panics if it
    /// asks for more than RFC 9180 specifies.
    struct GivenRng(Vec<u8>);

    impl hpke::rand_core::RngCore for GivenRng {
        fn next_u32(&mut self) -> u32 {
            let mut b = [0u8; 4];
            self.fill_bytes(&mut b);
            u32::from_le_bytes(b)
        }
        fn next_u64(&mut self) -> u64 {
            let mut b = [0u8; 8];
            self.fill_bytes(&mut b);
            u64::from_le_bytes(b)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            assert!(dest.len() <= self.0.len(), "hpke drew more randomness");
            let rest = self.0.split_off(dest.len());
            dest.copy_from_slice(&self.0);
            self.0 = rest;
        }
    }

    impl hpke::rand_core::CryptoRng for GivenRng {}

    fn random_ikm() -> [u8; NSK] {
        let mut ikm = [0u8; NSK];
        OsRng.fill_bytes(&mut ikm);
        ikm
    }

    /// A recipient key pair in the `hpke` crate.
    fn their_key_pair() -> (
        <Kem as hpke::Kem>::PrivateKey,
        <Kem as hpke::Kem>::PublicKey,
    ) {
        Kem::derive_keypair(&random_ikm())
    }

    fn their_open(
        sk: &<Kem as hpke::Kem>::PrivateKey,
        enc: &[u8],
        info: &[u8],
        aad: &[u8],
        ct: &[u8],
    ) -> Result<Vec<u8>, hpke::HpkeError> {
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(enc)?;
        hpke::single_shot_open::<AesGcm256, HkdfSha384, Kem>(
            &OpModeR::Base,
            sk,
            &enc,
            info,
            ct,
            aad,
        )
    }

    fn their_seal(
        pk: &<Kem as hpke::Kem>::PublicKey,
        info: &[u8],
        aad: &[u8],
        pt: &[u8],
        ikm_e: &[u8; NSK],
    ) -> (Vec<u8>, Vec<u8>) {
        let mut rng = GivenRng(ikm_e.to_vec());
        let (enc, ct) = hpke::single_shot_seal::<AesGcm256, HkdfSha384, Kem, _>(
            &OpModeS::Base,
            pk,
            info,
            pt,
            aad,
            &mut rng,
        )
        .unwrap();
        assert!(rng.0.is_empty(), "hpke drew less randomness than Nsk");
        (enc.to_bytes().to_vec(), ct)
    }

    fn check_we_seal_they_open(info: &[u8], aad: &[u8], pt: &[u8]) {
        let (sk, pk) = their_key_pair();
        let recipient = PublicKey::from_bytes(&pk.to_bytes()).unwrap();
        let (enc, ct) = seal(KeyPair::generate().unwrap(), &recipient, info, aad, pt).unwrap();
        assert_eq!(ct.len(), pt.len() + NT);
        assert_eq!(their_open(&sk, &enc, info, aad, &ct).unwrap(), pt);
        // And only with the same info and aad.
        let mut other = info.to_vec();
        other.push(0);
        assert!(their_open(&sk, &enc, &other, aad, &ct).is_err());
        let mut other = aad.to_vec();
        other.push(0);
        assert!(their_open(&sk, &enc, info, &other, &ct).is_err());
    }

    fn check_they_seal_we_open(info: &[u8], aad: &[u8], pt: &[u8]) {
        let recipient = KeyPair::generate().unwrap();
        let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(recipient.public_key()).unwrap();
        let (enc, ct) = their_seal(&pk, info, aad, pt, &random_ikm());
        assert_eq!(&open(&recipient, &enc, info, aad, &ct).unwrap()[..], pt);
        let mut other = info.to_vec();
        other.push(0);
        assert!(open(&recipient, &enc, &other, aad, &ct).is_err());
        let mut other = aad.to_vec();
        other.push(0);
        assert!(open(&recipient, &enc, info, &other, &ct).is_err());
        // Every tampered ciphertext byte is refused.
        for i in [0, ct.len() / 2, ct.len() - 1] {
            let mut bad = ct.clone();
            bad[i] ^= 1;
            assert!(open(&recipient, &enc, info, aad, &bad).is_err());
        }
    }

    /// With the same recipient key and the same ephemeral input keying
    /// material, both implementations produce the same bytes.
    fn check_same_bytes(ikm_r: &[u8; NSK], ikm_e: &[u8; NSK], info: &[u8], aad: &[u8], pt: &[u8]) {
        let ours_r = KeyPair::derive(ikm_r).unwrap();
        let (_, theirs_r) = Kem::derive_keypair(ikm_r);
        assert_eq!(ours_r.public_key()[..], theirs_r.to_bytes()[..]);
        let ours_e = KeyPair::derive(ikm_e).unwrap();
        let (_, theirs_e) = Kem::derive_keypair(ikm_e);
        assert_eq!(ours_e.public_key()[..], theirs_e.to_bytes()[..]);

        let recipient = PublicKey::from_bytes(ours_r.public_key()).unwrap();
        let (enc, ct) = seal(ours_e, &recipient, info, aad, pt).unwrap();
        let (their_enc, their_ct) = their_seal(&theirs_r, info, aad, pt, ikm_e);
        assert_eq!(enc[..], their_enc[..]);
        assert_eq!(ct, their_ct);
    }

    #[test]
    fn we_seal_they_open() {
        for n in [0usize, 1, 15, 16, 17, 100, 1000] {
            check_we_seal_they_open(b"info", b"", &vec![0xa5; n]);
        }
        check_we_seal_they_open(b"", b"aad", b"plaintext");
        check_we_seal_they_open(&[7; 300], &[8; 300], &[9; 3000]);
    }

    #[test]
    fn they_seal_we_open() {
        for n in [0usize, 1, 15, 16, 17, 100, 1000] {
            check_they_seal_we_open(b"info", b"", &vec![0x5a; n]);
        }
        check_they_seal_we_open(b"", b"aad", b"plaintext");
        check_they_seal_we_open(&[7; 300], &[8; 300], &[9; 3000]);
    }

    #[test]
    fn same_bytes_as_the_hpke_crate_with_fixed_randomness() {
        check_same_bytes(&[0x11; NSK], &[0x33; NSK], b"info", b"", b"hello");
        check_same_bytes(&[0; NSK], &[0xff; NSK], b"", b"", b"");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn interop_random(
            info in proptest::collection::vec(any::<u8>(), 0..200),
            aad in proptest::collection::vec(any::<u8>(), 0..64),
            pt in proptest::collection::vec(any::<u8>(), 0..2000),
        ) {
            check_we_seal_they_open(&info, &aad, &pt);
            check_they_seal_we_open(&info, &aad, &pt);
        }

        #[test]
        fn same_bytes_random(
            ikm_r in any::<[u8; NSK]>(),
            ikm_e in any::<[u8; NSK]>(),
            info in proptest::collection::vec(any::<u8>(), 0..200),
            pt in proptest::collection::vec(any::<u8>(), 0..500),
        ) {
            check_same_bytes(&ikm_r, &ikm_e, &info, b"", &pt);
        }
    }

    #[test]
    fn derive_key_pair_handles_any_ikm_length() {
        for len in [0usize, 1, 32, 48, 64, 200] {
            let ikm = vec![0x42; len];
            let ours = KeyPair::derive(&ikm).unwrap();
            let (_, theirs) = Kem::derive_keypair(&ikm);
            assert_eq!(ours.public_key()[..], theirs.to_bytes()[..], "{len}");
        }
    }

    #[test]
    fn public_keys_are_validated() {
        let good = *KeyPair::generate().unwrap().public_key();
        assert!(PublicKey::from_bytes(&good).is_some());
        let mut off_curve = good;
        off_curve[96] ^= 1;
        let mut hybrid = good;
        hybrid[0] = 0x06 | (good[96] & 1);
        let compressed = {
            let mut c = good[..49].to_vec();
            c[0] = 0x02 | (good[96] & 1);
            c
        };
        let mut long = good.to_vec();
        long.push(0);
        for bad in [
            &[][..],
            &good[..96],
            &long[..],
            &compressed[..],
            &hybrid[..],
            &off_curve[..],
            &[0u8; 97][..],
            &[0x04; 97][..],
        ] {
            assert!(PublicKey::from_bytes(bad).is_none(), "{}", bad.len());
        }
        // An X.509 SubjectPublicKeyInfo of the same key is not SEC1.
        let spki = p384::PublicKey::from_sec1_bytes(&good).unwrap();
        let der = p384::pkcs8::EncodePublicKey::to_public_key_der(&spki).unwrap();
        assert!(PublicKey::from_bytes(der.as_bytes()).is_none());
    }

    #[test]
    fn open_refuses_bad_enc_and_short_ciphertext() {
        let recipient = KeyPair::generate().unwrap();
        let pk = PublicKey::from_bytes(recipient.public_key()).unwrap();
        let (enc, ct) = seal(KeyPair::generate().unwrap(), &pk, b"i", b"", b"pt").unwrap();
        assert_eq!(&open(&recipient, &enc, b"i", b"", &ct).unwrap()[..], b"pt");
        assert!(open(&recipient, &enc, b"i", b"", &ct[..NT - 1]).is_err());
        assert!(open(&recipient, &enc[..96], b"i", b"", &ct).is_err());
        let mut bad = enc;
        bad[50] ^= 1;
        assert!(open(&recipient, &bad, b"i", b"", &ct).is_err());
        // Another recipient cannot open it.
        assert!(open(&KeyPair::generate().unwrap(), &enc, b"i", b"", &ct).is_err());
    }

    #[test]
    fn key_pairs_are_fresh_and_redacted() {
        let a = KeyPair::generate().unwrap();
        let b = KeyPair::generate().unwrap();
        assert_ne!(a.public_key(), b.public_key());
        let s = format!("{a:?}");
        assert!(s.contains("<redacted>"));
    }
}
