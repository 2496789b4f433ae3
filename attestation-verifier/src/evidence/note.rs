//! Signed checkpoints: the C2SP `signed-note` format carrying a C2SP
//! `tlog-checkpoint` body, signed by the verifier identity.
//!
//! ```text
//! kluis.audit/3f1c0a9e5b7d2c41        <- origin (also the key name)
//! 1234                                <- tree size, decimal
//! q2Jt...base64 of the 32-byte root...=
//!                                     <- blank line
//! — kluis.audit/3f1c0a9e5b7d2c41 base64(key ID || signature)
//! ```
//!
//! # Signature type (a documented deviation)
//!
//! The verifier identity is ECDSA P-384 with SHA-384 and fixed-length
//! `r || s` signatures. `signed-note` assigns type `0x02` to "ECDSA as
//! transparency-dev/witness implements it", whose key ID is derived from the
//! DER SubjectPublicKeyInfo and whose encoding Kluis does not reproduce, so
//! Kluis uses the type reserved for signatures without an assigned byte,
//! `0xff`, followed by the identifier `kluis-ecdsa-p384-sha384`:
//!
//! ```text
//! key ID    = SHA-256(key name || 0x0A || 0xff || "kluis-ecdsa-p384-sha384"
//!                     || SEC1 uncompressed public key)[:4]     (big-endian u32)
//! signature = ECDSA-P384-SHA384(note text), 96 bytes r || s
//! ```
//!
//! The note text starts with the origin line `kluis.audit/<16 hex>` (the
//! first 8 bytes of SHA-256 of the identity's SEC1 public key), which is the
//! domain label that keeps a checkpoint signature apart from every other use
//! of the identity key (the release transcript starts `kluis-proto/v1`).
//! Witnesses that only know Ed25519 ignore the signature (as the spec says
//! they must for unknown keys); a Kluis witness verifies it with
//! `evidence verify-consistency`.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use sha2::{Digest, Sha256};

use super::merkle::{TreeHash, TREE_HASH_LEN};

/// Largest note accepted.
pub const MAX_NOTE_LEN: usize = 16 * 1024;
/// Most signature lines accepted (the spec asks for at least 16).
pub const MAX_SIGNATURES: usize = 64;
/// The signature type byte of a Kluis checkpoint signature.
pub const SIGNATURE_TYPE: u8 = 0xff;
/// The identifier that follows [`SIGNATURE_TYPE`] in the key ID input.
pub const SIGNATURE_TYPE_ID: &[u8] = b"kluis-ecdsa-p384-sha384";
/// Length of a P-384 SEC1 uncompressed public key.
pub const P384_PUBLIC_KEY_LEN: usize = 97;

/// Why a note or checkpoint is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NoteError {
    /// The text is not a well-formed signed note.
    #[error("malformed signed note: {0}")]
    Malformed(String),
    /// The note body is not a well-formed checkpoint.
    #[error("malformed checkpoint: {0}")]
    Checkpoint(String),
    /// No signature by the expected key.
    #[error("the checkpoint carries no signature by {name} (key ID {key_id:08x})")]
    NotSigned {
        /// The expected key name.
        name: String,
        /// The expected key ID.
        key_id: u32,
    },
    /// The signature by the expected key does not verify.
    #[error("the checkpoint's signature by {0} does not verify")]
    BadSignature(String),
    /// The checkpoint is for another log.
    #[error("the checkpoint's origin is {found:?}, expected {expected:?}")]
    WrongOrigin {
        /// Expected origin.
        expected: String,
        /// Found origin.
        found: String,
    },
    /// The identity key cannot be used.
    #[error("the verifier public key is not a P-384 SEC1 uncompressed point")]
    BadKey,
    /// Signing failed.
    #[error("signing the checkpoint failed: {0}")]
    Sign(String),
}

/// One signature line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteSignature {
    /// The key name.
    pub name: String,
    /// The key ID (first four bytes of the decoded signature).
    pub key_id: u32,
    /// The signature bytes after the key ID.
    pub signature: Vec<u8>,
}

/// A parsed signed note (signatures not yet verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The text, including its final newline.
    pub text: String,
    /// The signature lines, in order.
    pub signatures: Vec<NoteSignature>,
}

/// Parses a signed note (C2SP `signed-note`): text ending in a newline, a
/// blank line, then one or more lines `— <name> <base64(key ID || sig)>`.
pub fn parse_note(note: &str) -> Result<Note, NoteError> {
    let bad = |m: &str| NoteError::Malformed(m.to_owned());
    if note.len() > MAX_NOTE_LEN {
        return Err(bad("longer than the maximum accepted"));
    }
    if note.chars().any(|c| c.is_control() && c != '\n') {
        return Err(bad("control characters other than newline"));
    }
    let split = note
        .rfind("\n\n")
        .ok_or_else(|| bad("no blank line before the signatures"))?;
    let text_end = split.saturating_add(1);
    let text = note.get(..text_end).ok_or_else(|| bad("no text"))?;
    let sigs = note
        .get(split.saturating_add(2)..)
        .ok_or_else(|| bad("no signatures"))?;
    if text.len() < 2 {
        return Err(bad("empty text"));
    }
    if sigs.is_empty() || !sigs.ends_with('\n') {
        return Err(bad("the signature block must be lines ending in a newline"));
    }
    let mut signatures = Vec::new();
    for line in sigs.lines() {
        if signatures.len() >= MAX_SIGNATURES {
            return Err(bad("too many signatures"));
        }
        let rest = line
            .strip_prefix("\u{2014} ")
            .ok_or_else(|| bad("a signature line must start with an em dash and a space"))?;
        let (name, b64) = rest
            .split_once(' ')
            .ok_or_else(|| bad("a signature line must be `— name signature`"))?;
        if name.is_empty() || name.contains('+') || name.chars().any(char::is_whitespace) {
            return Err(bad("a key name must be non-empty, without spaces or '+'"));
        }
        let raw = STANDARD
            .decode(b64)
            .map_err(|_| bad("a signature is not standard base64"))?;
        let (id, signature) = raw
            .split_first_chunk::<4>()
            .ok_or_else(|| bad("a signature is shorter than its key ID"))?;
        if signature.is_empty() {
            return Err(bad("a signature is empty"));
        }
        signatures.push(NoteSignature {
            name: name.to_owned(),
            key_id: u32::from_be_bytes(*id),
            signature: signature.to_vec(),
        });
    }
    Ok(Note {
        text: text.to_owned(),
        signatures,
    })
}

/// The key ID of a signed-note key: `SHA-256(name || 0x0A || type and key)[:4]`.
pub fn key_id(name: &str, type_and_key: &[u8]) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update(type_and_key);
    let digest: [u8; 32] = h.finalize().into();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// The key ID of a Kluis checkpoint key (see the module documentation).
pub fn kluis_key_id(name: &str, public_key: &[u8; P384_PUBLIC_KEY_LEN]) -> u32 {
    let mut type_and_key = Vec::with_capacity(
        1usize
            .saturating_add(SIGNATURE_TYPE_ID.len())
            .saturating_add(P384_PUBLIC_KEY_LEN),
    );
    type_and_key.push(SIGNATURE_TYPE);
    type_and_key.extend_from_slice(SIGNATURE_TYPE_ID);
    type_and_key.extend_from_slice(public_key);
    key_id(name, &type_and_key)
}

/// The origin (and key name) of the log of the verifier whose identity is
/// `public_key`.
pub fn origin_for(public_key: &[u8; P384_PUBLIC_KEY_LEN]) -> String {
    let digest = Sha256::digest(public_key);
    format!(
        "kluis.audit/{}",
        hex::encode(digest.get(..8).unwrap_or_default())
    )
}

/// A checkpoint body: origin, tree size and root hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's origin line.
    pub origin: String,
    /// Leaves in the tree (records in the log).
    pub size: u64,
    /// The tree's root hash.
    pub root: TreeHash,
}

impl Checkpoint {
    /// The note text: `origin\nsize\nbase64(root)\n`.
    pub fn text(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root)
        )
    }

    /// Parses a checkpoint body (extension lines after the root are
    /// refused: Kluis writes none).
    pub fn parse(text: &str) -> Result<Checkpoint, NoteError> {
        let bad = |m: &str| NoteError::Checkpoint(m.to_owned());
        let body = text
            .strip_suffix('\n')
            .ok_or_else(|| bad("must end with a newline"))?;
        let mut lines = body.split('\n');
        let (Some(origin), Some(size), Some(root), None) =
            (lines.next(), lines.next(), lines.next(), lines.next())
        else {
            return Err(bad("expected exactly three lines: origin, size, root hash"));
        };
        if origin.is_empty() {
            return Err(bad("empty origin"));
        }
        let canonical = !size.is_empty()
            && size.bytes().all(|b| b.is_ascii_digit())
            && (size == "0" || !size.starts_with('0'));
        let size: u64 = size
            .parse()
            .ok()
            .filter(|_| canonical)
            .ok_or_else(|| bad("the size is not a canonical decimal number"))?;
        let root: TreeHash = STANDARD
            .decode(root)
            .ok()
            .and_then(|r| <[u8; TREE_HASH_LEN]>::try_from(r.as_slice()).ok())
            .ok_or_else(|| bad("the root hash is not base64 of 32 bytes"))?;
        Ok(Checkpoint {
            origin: origin.to_owned(),
            size,
            root,
        })
    }

    /// Signs the checkpoint with the verifier identity: the signed note.
    pub fn sign(&self, identity: &kluis_proto::VerifierIdentity) -> Result<String, NoteError> {
        let text = self.text();
        let public = identity.public_key_sec1();
        let id = kluis_key_id(&self.origin, &public);
        let signature = identity
            .sign(text.as_bytes())
            .map_err(|e| NoteError::Sign(e.to_string()))?;
        let mut blob = Vec::with_capacity(4usize.saturating_add(signature.len()));
        blob.extend_from_slice(&id.to_be_bytes());
        blob.extend_from_slice(&signature);
        Ok(format!(
            "{text}\n\u{2014} {} {}\n",
            self.origin,
            STANDARD.encode(blob)
        ))
    }
}

/// A checkpoint whose signature by the verifier identity was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCheckpoint {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
}

/// Parses `note` and checks that it is a checkpoint of the log of the
/// verifier whose identity is `public_key`, signed by that identity.
/// Signatures by other keys are ignored, as the spec requires.
pub fn verify_checkpoint(
    note: &str,
    public_key: &[u8; P384_PUBLIC_KEY_LEN],
) -> Result<VerifiedCheckpoint, NoteError> {
    use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P384_SHA384_FIXED};
    if public_key.first() != Some(&0x04) {
        return Err(NoteError::BadKey);
    }
    let parsed = parse_note(note)?;
    let name = origin_for(public_key);
    let id = kluis_key_id(&name, public_key);
    let mut ours = parsed
        .signatures
        .iter()
        .filter(|s| s.name == name && s.key_id == id)
        .peekable();
    if ours.peek().is_none() {
        return Err(NoteError::NotSigned { name, key_id: id });
    }
    let key = UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, public_key);
    for s in ours {
        key.verify(parsed.text.as_bytes(), &s.signature)
            .map_err(|_| NoteError::BadSignature(name.clone()))?;
    }
    let checkpoint = Checkpoint::parse(&parsed.text)?;
    if checkpoint.origin != name {
        return Err(NoteError::WrongOrigin {
            expected: name,
            found: checkpoint.origin,
        });
    }
    Ok(VerifiedCheckpoint { checkpoint })
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::cast_possible_truncation
    )]
    use super::*;

    /// golang.org/x/mod/sumdb/note's example (also C2SP's): the verifier
    /// key `PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW`
    /// (type 0x01 Ed25519) and the note it signed.
    const PETER_KEY_B64: &str = "ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const PETER_NOTE: &str = "If you think cryptography is the answer to your problem,\n\
        then you don't know what your problem is.\n\
        \n\
        \u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

    /// The example checkpoint of C2SP `tlog-checkpoint`.
    const SOFA: &str = "example.com/behind-the-sofa\n\
        20852163\n\
        CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\
        \n\
        \u{2014} example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n";

    #[test]
    fn the_go_note_vector_parses_and_its_key_id_and_signature_check() {
        use aws_lc_rs::signature::{UnparsedPublicKey, ED25519};
        let note = parse_note(PETER_NOTE).unwrap();
        assert_eq!(
            note.text,
            "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
        );
        assert_eq!(note.signatures.len(), 1);
        let sig = &note.signatures[0];
        assert_eq!(sig.name, "PeterNeumann");
        let type_and_key = STANDARD.decode(PETER_KEY_B64).unwrap();
        assert_eq!(type_and_key[0], 0x01);
        // The key ID rule the Kluis type follows, on the published key.
        assert_eq!(key_id("PeterNeumann", &type_and_key), 0xc74f20a3);
        assert_eq!(sig.key_id, 0xc74f20a3);
        let key = UnparsedPublicKey::new(&ED25519, &type_and_key[1..]);
        key.verify(note.text.as_bytes(), &sig.signature).unwrap();
        // One changed character of the text and it fails.
        let changed = PETER_NOTE.replace("cryptography", "cryptographY");
        let changed = parse_note(&changed).unwrap();
        assert!(key.verify(changed.text.as_bytes(), &sig.signature).is_err());
    }

    #[test]
    fn the_c2sp_checkpoint_example_parses() {
        let note = parse_note(SOFA).unwrap();
        let cp = Checkpoint::parse(&note.text).unwrap();
        assert_eq!(cp.origin, "example.com/behind-the-sofa");
        assert_eq!(cp.size, 20_852_163);
        assert_eq!(
            STANDARD.encode(cp.root),
            "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="
        );
        assert_eq!(cp.text(), note.text);
        assert_eq!(note.signatures[0].name, "example.com/behind-the-sofa");
    }

    #[test]
    fn malformed_notes_and_checkpoints_are_refused() {
        for bad in [
            "",
            "text\n",
            "text\n\n",
            "text\n\n\u{2014} name\n",
            "text\n\n- name AAAAAAA=\n",
            "text\n\n\u{2014} na+me AAAAAAA=\n",
            "text\n\n\u{2014} name AAAA\n",
            "text\n\n\u{2014} name AAAAAAA=",
            "te\u{7}xt\n\n\u{2014} name AAAAAAA=\n",
        ] {
            assert!(parse_note(bad).is_err(), "{bad:?}");
        }
        for bad in [
            "o\n1\n",
            "o\n01\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n",
            "o\n-1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n",
            "o\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2=\n",
            "\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n",
            "o\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=",
            "o\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\next\n",
        ] {
            assert!(Checkpoint::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_prefix_and_scrambled_note_is_refused_without_a_panic() {
        let identity = kluis_proto::VerifierIdentity::generate().unwrap();
        let public = identity.public_key_sec1();
        let note = Checkpoint {
            origin: origin_for(&public),
            size: 7,
            root: [1; 32],
        }
        .sign(&identity)
        .unwrap();
        for end in 0..note.len() {
            if let Some(prefix) = note.get(..end) {
                assert!(verify_checkpoint(prefix, &public).is_err(), "prefix {end}");
            }
        }
        // Deterministic pseudo-random scrambles (xorshift): parse, never panic.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut bytes = note.as_bytes().to_vec();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = usize::try_from(x % bytes.len() as u64).unwrap();
                bytes[i] = (x >> 32) as u8;
            }
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = parse_note(text);
                assert!(text == note || verify_checkpoint(text, &public).is_err());
            }
        }
        assert!(parse_note(&"\n".repeat(MAX_NOTE_LEN + 1)).is_err());
    }

    #[test]
    fn a_kluis_checkpoint_round_trips_and_any_change_is_refused() {
        let identity = kluis_proto::VerifierIdentity::generate().unwrap();
        let public = identity.public_key_sec1();
        let cp = Checkpoint {
            origin: origin_for(&public),
            size: 42,
            root: [7; 32],
        };
        let note = cp.sign(&identity).unwrap();
        assert!(note.starts_with("kluis.audit/"));
        let verified = verify_checkpoint(&note, &public).unwrap();
        assert_eq!(verified.checkpoint, cp);
        // Another identity's key does not verify it.
        let other = kluis_proto::VerifierIdentity::generate().unwrap();
        assert!(verify_checkpoint(&note, &other.public_key_sec1()).is_err());
        // Every one-byte change is refused (or stops being UTF-8).
        let bytes = note.as_bytes();
        for i in 0..bytes.len() {
            let mut changed = bytes.to_vec();
            changed[i] ^= 1;
            if let Ok(text) = std::str::from_utf8(&changed) {
                assert!(verify_checkpoint(text, &public).is_err(), "byte {i}");
            }
        }
        // A foreign signature line added after ours is ignored.
        let extra = format!("{note}\u{2014} witness.example AAAAAAA=\n");
        assert_eq!(verify_checkpoint(&extra, &public).unwrap().checkpoint, cp);
    }
}
