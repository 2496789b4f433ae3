//! Controller-signed job authorisations (purpose binding).
//!
//! An application administrator issues an authorisation for one job: the
//! workload with its parameters, the master keys of its input, output and
//! secrets, a purpose and a case reference, an expiry and optionally a
//! number of runs. The verifier signs it with its identity key. The parent
//! hands it to the enclave with the job; the enclave checks the signature
//! against the verifier key pinned in its image, checks that the job it was
//! asked to run is exactly the authorised one, and binds the authorisation's
//! [`AuthorisationId`] into its key request ([`crate::request_hash`]), so the
//! verifier knows which authorisation the attested enclave acts under and the
//! parent cannot swap it.
//!
//! # Encoding (version 1)
//!
//! The file is CBOR (RFC 8949), a map of exactly two fields, in this order:
//!
//! ```text
//! signed_authorisation = { "payload": bstr, "signature": bstr .size 96 }
//! payload = CBOR of {
//!     "version": 1, "nonce": bstr .size 16, "issuer": tstr,
//!     "issued_at_ms": uint, "expires_at_ms": uint,
//!     "workload": <WorkloadSpec as in the job protocol>,
//!     "input_key": tstr, "output_key": tstr, "secret_keys": [* tstr],
//!     "purpose": tstr, "case": tstr, "max_runs": uint / null }
//! signature = ECDSA-P384-SHA384(verifier identity,
//!                               lp("kluis-proto/v1 job-authorisation") || payload)
//! id = SHA-256(the whole file)        (lowercase hex in the verifier's store)
//! ```
//!
//! with `lp(x) = u32-be(len(x)) || x` as in [`crate::binding`]. Fields are in
//! the order shown, definite lengths, shortest integer forms (what ciborium
//! writes). Decoding is strict: a file that does not re-encode to exactly its
//! own bytes (another field order, a longer integer form, trailing bytes) is
//! refused, so one authorisation has one encoding; the whole file is at most
//! [`MAX_AUTHORISATION_LEN`] bytes, and every field is bounded while it is
//! decoded. The nonce makes two authorisations with the same content
//! different.

use crate::binding::{put_lp, Sink as _};
use crate::bounded::{self, ser_bytes};
use crate::job::{JobSpec, WorkloadSpec, MAX_SECRETS};
use crate::message::{decode_cbor, encode_cbor, MAX_KEY_ID_LEN, SIGNATURE_LEN};
use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P384_SHA384_FIXED};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Domain-separation label of the signed authorisation message.
pub const AUTHORISATION_LABEL: &[u8] = b"kluis-proto/v1 job-authorisation";
/// The encoding version this build writes and reads.
pub const AUTHORISATION_VERSION: u32 = 1;
/// Largest signed authorisation file, in bytes.
pub const MAX_AUTHORISATION_LEN: usize = 16 * 1024;
/// Longest purpose, in bytes.
pub const MAX_PURPOSE_LEN: usize = 1024;
/// Longest case reference or issuer name, in bytes.
pub const MAX_CASE_LEN: usize = 256;
/// Length of an authorisation id (SHA-256).
pub const AUTHORISATION_ID_LEN: usize = 32;
/// Length of the nonce that makes each authorisation unique.
pub const AUTHORISATION_NONCE_LEN: usize = 16;

/// Why an authorisation is unusable. Says what was expected and found; the
/// authorisation holds no secret, so its fields may be named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorisationError {
    /// Not a well-formed (canonical, bounded) signed authorisation.
    #[error("malformed authorisation: {0}")]
    Malformed(String),
    /// A version this build does not read.
    #[error("authorisation version {found}, this build reads version {AUTHORISATION_VERSION}")]
    Version {
        /// The version found.
        found: u32,
    },
    /// A field out of bounds.
    #[error("authorisation field `{field}`: {reason}")]
    Field {
        /// Which.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The signature does not verify under the pinned verifier key.
    #[error("the authorisation's signature does not verify under the pinned verifier key")]
    BadSignature,
    /// The pinned verifier key is unusable.
    #[error("the pinned verifier key is not an uncompressed P-384 point")]
    PinnedKey,
    /// Signing failed.
    #[error("signing the authorisation failed: {0}")]
    Sign(String),
    /// The job is not the authorised one.
    #[error("the job is not the authorised one: {0}")]
    JobMismatch(String),
}

/// The id of a signed authorisation: SHA-256 of its bytes. This is what the
/// enclave binds into its key request and what the verifier's store keys it
/// by.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuthorisationId(pub [u8; AUTHORISATION_ID_LEN]);

impl AuthorisationId {
    /// The id of `signed` (the whole file).
    pub fn of(signed: &[u8]) -> Self {
        AuthorisationId(Sha256::digest(signed).into())
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        crate::error::hex(&self.0)
    }

    /// Parse 64 lowercase hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() != AUTHORISATION_ID_LEN.saturating_mul(2)
            || !text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        let mut out = [0u8; AUTHORISATION_ID_LEN];
        for (i, byte) in out.iter_mut().enumerate() {
            let pair = text.get(i.saturating_mul(2)..i.saturating_mul(2).saturating_add(2))?;
            *byte = u8::from_str_radix(pair, 16).ok()?;
        }
        Some(AuthorisationId(out))
    }
}

impl std::fmt::Debug for AuthorisationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthorisationId({})", self.to_hex())
    }
}

impl std::fmt::Display for AuthorisationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for AuthorisationId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for AuthorisationId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        bounded::array::<_, AUTHORISATION_ID_LEN>(d).map(AuthorisationId)
    }
}

/// What an authorisation allows: one job, for a purpose, until it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobAuthorisation {
    /// [`AUTHORISATION_VERSION`].
    pub version: u32,
    /// Random, so that every authorisation is unique.
    #[serde(
        serialize_with = "ser_bytes",
        deserialize_with = "bounded::array::<_, AUTHORISATION_NONCE_LEN>"
    )]
    pub nonce: [u8; AUTHORISATION_NONCE_LEN],
    /// The administrator who issued it.
    #[serde(deserialize_with = "bounded::string::<_, MAX_CASE_LEN>")]
    pub issuer: String,
    /// When, Unix ms (the verifier's clock).
    pub issued_at_ms: u64,
    /// Not valid from this instant on, Unix ms (the verifier's clock).
    pub expires_at_ms: u64,
    /// The workload, parameters included.
    pub workload: WorkloadSpec,
    /// The master key the input's data key is wrapped under.
    #[serde(deserialize_with = "bounded::string::<_, MAX_KEY_ID_LEN>")]
    pub input_key: String,
    /// The master key the output's fresh data key is generated under.
    #[serde(deserialize_with = "bounded::string::<_, MAX_KEY_ID_LEN>")]
    pub output_key: String,
    /// The master keys of the job's secrets, in the job's order.
    #[serde(deserialize_with = "bounded::vec::<_, String, MAX_SECRETS>")]
    pub secret_keys: Vec<String>,
    /// Why the data is processed (recorded in every audit record of the job).
    #[serde(deserialize_with = "bounded::string::<_, MAX_PURPOSE_LEN>")]
    pub purpose: String,
    /// The controller's case reference (recorded likewise).
    #[serde(deserialize_with = "bounded::string::<_, MAX_CASE_LEN>")]
    pub case: String,
    /// How many runs (key requests) it allows; `None`: any number until it
    /// expires.
    pub max_runs: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedWire {
    #[serde(
        serialize_with = "ser_bytes",
        deserialize_with = "bounded::bytes::<_, MAX_AUTHORISATION_LEN>"
    )]
    payload: Vec<u8>,
    #[serde(
        serialize_with = "ser_bytes",
        deserialize_with = "bounded::array::<_, SIGNATURE_LEN>"
    )]
    signature: [u8; SIGNATURE_LEN],
}

fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), AuthorisationError> {
    if value.is_empty() || value.len() > max {
        return Err(AuthorisationError::Field {
            field,
            reason: format!("1..={max} bytes, found {}", value.len()),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(AuthorisationError::Field {
            field,
            reason: "control characters".to_owned(),
        });
    }
    Ok(())
}

/// The message the verifier identity signs for `payload`.
fn signed_message(payload: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(
        payload
            .len()
            .saturating_add(AUTHORISATION_LABEL.len())
            .saturating_add(8),
    );
    put_lp(&mut message, AUTHORISATION_LABEL);
    message.put(payload);
    message
}

impl JobAuthorisation {
    /// Check every field's bounds (done before signing and after decoding).
    pub fn validate(&self) -> Result<(), AuthorisationError> {
        if self.version != AUTHORISATION_VERSION {
            return Err(AuthorisationError::Version {
                found: self.version,
            });
        }
        check_text("issuer", &self.issuer, MAX_CASE_LEN)?;
        check_text("purpose", &self.purpose, MAX_PURPOSE_LEN)?;
        check_text("case", &self.case, MAX_CASE_LEN)?;
        check_text("input_key", &self.input_key, MAX_KEY_ID_LEN)?;
        check_text("output_key", &self.output_key, MAX_KEY_ID_LEN)?;
        if self.secret_keys.len() > MAX_SECRETS {
            return Err(AuthorisationError::Field {
                field: "secret_keys",
                reason: format!("at most {MAX_SECRETS}, found {}", self.secret_keys.len()),
            });
        }
        for key in &self.secret_keys {
            check_text("secret_keys", key, MAX_KEY_ID_LEN)?;
        }
        if self.expires_at_ms <= self.issued_at_ms {
            return Err(AuthorisationError::Field {
                field: "expires_at_ms",
                reason: "must be after issued_at_ms".to_owned(),
            });
        }
        if self.max_runs == Some(0) {
            return Err(AuthorisationError::Field {
                field: "max_runs",
                reason: "at least 1 when given".to_owned(),
            });
        }
        Ok(())
    }

    /// Validate, encode and sign: the signed authorisation file.
    pub fn sign(
        &self,
        identity: &crate::VerifierIdentity,
    ) -> Result<SignedAuthorisation, AuthorisationError> {
        self.validate()?;
        let payload = encode_cbor(self, "authorisation")
            .map_err(|e| AuthorisationError::Malformed(e.to_string()))?;
        let signature = identity
            .sign(&signed_message(&payload))
            .map_err(|e| AuthorisationError::Sign(e.to_string()))?;
        let bytes = encode_cbor(&SignedWire { payload, signature }, "signed authorisation")
            .map_err(|e| AuthorisationError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_AUTHORISATION_LEN {
            return Err(AuthorisationError::Malformed(format!(
                "{} bytes, at most {MAX_AUTHORISATION_LEN}",
                bytes.len()
            )));
        }
        Ok(SignedAuthorisation {
            id: AuthorisationId::of(&bytes),
            bytes,
            authorisation: self.clone(),
        })
    }

    /// Whether `spec` is the authorised job, as far as the enclave can tell
    /// before key release: the same workload (parameters included), the
    /// same output key and as many secrets as authorised. The input's key
    /// is checked against [`JobAuthorisation::input_key`] once the envelope
    /// header is read, the secrets' keys once released, and the verifier
    /// releases only the keys the authorisation names.
    pub fn check_job(&self, spec: &JobSpec) -> Result<(), AuthorisationError> {
        if spec.workload != self.workload {
            return Err(AuthorisationError::JobMismatch(format!(
                "workload {} with other parameters than authorised ({})",
                spec.workload.name(),
                self.workload.name()
            )));
        }
        if spec.output_key != self.output_key {
            return Err(AuthorisationError::JobMismatch(format!(
                "output key {:?}, authorised {:?}",
                spec.output_key, self.output_key
            )));
        }
        if spec.secrets.len() != self.secret_keys.len() {
            return Err(AuthorisationError::JobMismatch(format!(
                "{} secret(s), authorised {}",
                spec.secrets.len(),
                self.secret_keys.len()
            )));
        }
        Ok(())
    }
}

/// A decoded signed authorisation: its bytes, id and content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedAuthorisation {
    bytes: Vec<u8>,
    id: AuthorisationId,
    authorisation: JobAuthorisation,
}

impl SignedAuthorisation {
    /// Decode `bytes` and check the signature against
    /// `pinned_verifier_public_key_sec1` (from the enclave image, or the
    /// verifier's own identity): structure, bounds, canonical encoding,
    /// version, field rules, then the signature.
    pub fn verify(
        bytes: &[u8],
        pinned_verifier_public_key_sec1: &[u8],
    ) -> Result<Self, AuthorisationError> {
        if bytes.len() > MAX_AUTHORISATION_LEN {
            return Err(AuthorisationError::Malformed(format!(
                "{} bytes, at most {MAX_AUTHORISATION_LEN}",
                bytes.len()
            )));
        }
        let malformed = |e: crate::MessageError| AuthorisationError::Malformed(e.to_string());
        let wire: SignedWire = decode_cbor(bytes, "signed authorisation").map_err(malformed)?;
        let authorisation: JobAuthorisation =
            decode_cbor(&wire.payload, "authorisation").map_err(malformed)?;
        // One encoding per authorisation: it must re-encode to its bytes.
        if encode_cbor(&authorisation, "authorisation").map_err(malformed)? != wire.payload
            || encode_cbor(&wire, "signed authorisation").map_err(malformed)? != bytes
        {
            return Err(AuthorisationError::Malformed(
                "not in the canonical encoding".to_owned(),
            ));
        }
        authorisation.validate()?;
        let sec1 = pinned_verifier_public_key_sec1.len() == crate::message::P384_PUBLIC_KEY_LEN
            && pinned_verifier_public_key_sec1.first() == Some(&0x04);
        if !sec1 {
            return Err(AuthorisationError::PinnedKey);
        }
        let key = UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, pinned_verifier_public_key_sec1)
            .parse()
            .map_err(|_| AuthorisationError::PinnedKey)?;
        key.verify_sig(&signed_message(&wire.payload), &wire.signature)
            .map_err(|_| AuthorisationError::BadSignature)?;
        Ok(SignedAuthorisation {
            id: AuthorisationId::of(bytes),
            bytes: bytes.to_vec(),
            authorisation,
        })
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// SHA-256 of the bytes.
    pub fn id(&self) -> AuthorisationId {
        self.id
    }

    /// What it authorises.
    pub fn authorisation(&self) -> &JobAuthorisation {
        &self.authorisation
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use crate::job::WrappedSecret;
    use crate::VerifierIdentity;

    fn sample() -> JobAuthorisation {
        JobAuthorisation {
            version: AUTHORISATION_VERSION,
            nonce: [7; AUTHORISATION_NONCE_LEN],
            issuer: "alice".into(),
            issued_at_ms: 1_000,
            expires_at_ms: 2_000,
            workload: WorkloadSpec::Identity,
            input_key: "a/b/in".into(),
            output_key: "a/b/out".into(),
            secret_keys: vec![],
            purpose: "benefit check".into(),
            case: "CASE-1".into(),
            max_runs: Some(2),
        }
    }

    #[test]
    fn sign_verify_round_trip_and_id() {
        let identity = VerifierIdentity::generate().unwrap();
        let signed = sample().sign(&identity).unwrap();
        let back =
            SignedAuthorisation::verify(signed.bytes(), &identity.public_key_sec1()).unwrap();
        assert_eq!(back, signed);
        assert_eq!(
            back.id().0,
            <[u8; 32]>::from(Sha256::digest(signed.bytes()))
        );
        assert_eq!(
            AuthorisationId::from_hex(&back.id().to_hex()),
            Some(back.id())
        );
        assert_eq!(AuthorisationId::from_hex(&"A".repeat(64)), None);
    }

    #[test]
    fn any_changed_byte_or_other_key_is_refused() {
        let identity = VerifierIdentity::generate().unwrap();
        let other = VerifierIdentity::generate().unwrap();
        let signed = sample().sign(&identity).unwrap();
        let pinned = identity.public_key_sec1();
        assert_eq!(
            SignedAuthorisation::verify(signed.bytes(), &other.public_key_sec1()),
            Err(AuthorisationError::BadSignature)
        );
        for i in 0..signed.bytes().len() {
            let mut altered = signed.bytes().to_vec();
            altered[i] ^= 0x01;
            assert!(
                SignedAuthorisation::verify(&altered, &pinned).is_err(),
                "byte {i}"
            );
        }
        let mut longer = signed.bytes().to_vec();
        longer.push(0);
        assert!(SignedAuthorisation::verify(&longer, &pinned).is_err());
        assert!(SignedAuthorisation::verify(&signed.bytes()[..10], &pinned).is_err());
        assert!(
            SignedAuthorisation::verify(&vec![0u8; MAX_AUTHORISATION_LEN + 1], &pinned).is_err()
        );
    }

    #[test]
    fn the_label_separates_it_from_other_signatures() {
        // A signature over the bare payload (no label) does not verify.
        let identity = VerifierIdentity::generate().unwrap();
        let payload = encode_cbor(&sample(), "a").unwrap();
        let signature = identity.sign(&payload).unwrap();
        let bytes = encode_cbor(&SignedWire { payload, signature }, "s").unwrap();
        assert_eq!(
            SignedAuthorisation::verify(&bytes, &identity.public_key_sec1()),
            Err(AuthorisationError::BadSignature)
        );
    }

    #[test]
    fn invalid_fields_are_not_signed() {
        let identity = VerifierIdentity::generate().unwrap();
        type Change = Box<dyn Fn(&mut JobAuthorisation)>;
        let cases: Vec<(&str, Change)> = vec![
            ("version", Box::new(|a| a.version = 2)),
            ("purpose", Box::new(|a| a.purpose.clear())),
            ("case", Box::new(|a| a.case = "x".repeat(MAX_CASE_LEN + 1))),
            ("control", Box::new(|a| a.purpose = "a\nb".into())),
            ("expiry", Box::new(|a| a.expires_at_ms = a.issued_at_ms)),
            ("runs", Box::new(|a| a.max_runs = Some(0))),
            (
                "secrets",
                Box::new(|a| a.secret_keys = vec!["k".into(); MAX_SECRETS + 1]),
            ),
        ];
        for (name, change) in cases {
            let mut a = sample();
            change(&mut a);
            assert!(a.sign(&identity).is_err(), "{name}");
        }
    }

    #[test]
    fn key_requests_carry_the_id_only_when_there_is_one() {
        use crate::{KeyOperation, KeyRequest, Message, Request};
        let ops = vec![KeyOperation::GenerateDataKey { key_id: "k".into() }];
        let plain = Request::KeyRelease {
            attestation_document: vec![1],
            request: KeyRequest::new(ops.clone()).unwrap(),
        };
        let bytes = plain.encode().unwrap();
        assert!(!bytes.windows(13).any(|w| w == b"authorisation"));
        let under = Request::KeyRelease {
            attestation_document: vec![1],
            request: KeyRequest::new(ops)
                .unwrap()
                .with_authorisation(Some(AuthorisationId([5; 32]))),
        };
        let bytes = under.encode().unwrap();
        assert_eq!(Request::decode(&bytes).unwrap(), under);
        // A shorter id is refused while decoding.
        let at = bytes.windows(32).position(|w| w == [5; 32]).unwrap();
        assert_eq!(&bytes[at - 2..at], &[0x58, 32]);
        let mut short = bytes[..at - 2].to_vec();
        short.extend_from_slice(&[0x58, 31]);
        short.extend_from_slice(&[5; 31]);
        short.extend_from_slice(&bytes[at + 32..]);
        assert!(Request::decode(&short).is_err());
        short[at - 1] = 32;
        short.insert(at, 5);
        assert_eq!(Request::decode(&short).unwrap(), under);
    }

    #[test]
    fn check_job_compares_workload_keys_and_secrets() {
        let a = sample();
        let mut spec = JobSpec {
            job_id: "j".into(),
            workload: WorkloadSpec::Identity,
            output_key: "a/b/out".into(),
            secrets: vec![],
            authorisation: None,
        };
        assert!(a.check_job(&spec).is_ok());
        spec.workload = WorkloadSpec::Reencrypt;
        assert!(a.check_job(&spec).is_err());
        spec.workload = WorkloadSpec::Identity;
        spec.output_key = "a/b/other".into();
        assert!(a.check_job(&spec).is_err());
        spec.output_key = "a/b/out".into();
        spec.secrets = vec![WrappedSecret(vec![1])];
        assert!(a.check_job(&spec).is_err());
    }
}
