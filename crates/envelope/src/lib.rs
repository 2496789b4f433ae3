//! Kluis streaming envelope: segmented AES-256-GCM with an authenticated header.
//!
//! Every byte of customer data that Kluis stores or moves through the
//! (untrusted) parent travels in this format. The enclave writes and reads it,
//! the parent only moves it, and the controller's tools
//! (`attestation-verifier data encrypt|decrypt`) produce and consume it on the
//! controller's premises. The byte layout below is that shared contract;
//! `FORMAT.md` next to this crate's `Cargo.toml` says the same for
//! implementers elsewhere, and `tests/spec.rs` is an independent decoder
//! written from it.
//!
//! # Use
//!
//! ```
//! use kluis_envelope::{DataKey, EnvelopeHeader, EnvelopeReader, EnvelopeWriter, WrappedKey};
//! use std::io::{Read, Write};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The data key and its wrapped form come from the key broker.
//! let key = DataKey::generate()?;
//! let wrapped = WrappedKey::new("agency-a/app-x/prod", 3, vec![0xAA; 60])?;
//!
//! let mut writer = EnvelopeWriter::new(Vec::new(), &key, wrapped)?;
//! writer.write_all(b"personal data")?;
//! let envelope = writer.finish()?; // without finish the envelope is truncated
//!
//! // Whoever holds only the envelope learns which key to ask for...
//! let mut input = envelope.as_slice();
//! let header = EnvelopeHeader::read_from(&mut input)?;
//! assert_eq!((header.cmk_id(), header.cmk_version()), ("agency-a/app-x/prod", 3));
//! // ...and, given the unwrapped key, reads authenticated plaintext.
//! let mut reader = EnvelopeReader::with_header(input, header, &key)?;
//! let mut plaintext = Vec::new();
//! reader.read_to_end(&mut plaintext)?; // Ok only for a complete, intact envelope
//! assert_eq!(plaintext, b"personal data");
//! # Ok(()) }
//! ```
//!
//! [`AsyncEnvelopeWriter`] and [`AsyncEnvelopeReader`] (feature `tokio`, on by
//! default) do the same over tokio's `AsyncWrite`/`AsyncRead`. Both pairs drive
//! one sans-IO encoder/decoder, so the checks are identical.
//!
//! Where the output goes into a buffer anyway (a frame),
//! [`EnvelopeWriter::in_place`] seals each segment straight into room the
//! writer lends ([`WriteInPlace`]); where the input already sits in one
//! ([`std::io::BufRead`]), [`EnvelopeReader::in_place`] opens each segment
//! that lies whole in it where it lies. The envelope and the checks are the
//! same; a copy of every byte is saved.
//!
//! # Format, version 1
//!
//! All integers are unsigned big-endian. An envelope is a header followed by
//! one or more segments, and nothing else.
//!
//! ## Header
//!
//! | offset        | size | field                                                        |
//! |---------------|------|--------------------------------------------------------------|
//! | 0             | 8    | magic `KLUISENV` (`4b 4c 55 49 53 45 4e 56`)                 |
//! | 8             | 1    | format version: `0x01`                                       |
//! | 9             | 1    | algorithm: `0x01` = AES-256-GCM STREAM, HKDF-SHA256, HMAC-SHA256 |
//! | 10            | 4    | segment size *S*: plaintext bytes per segment, 1024..=16 777 216 (default 65 536) |
//! | 14            | 1    | *n* = CMK id length, 1..=255                                  |
//! | 15            | 2    | *m* = wrapped data key length, 1..=1024                       |
//! | 17            | *n*  | CMK id, UTF-8 without control characters (e.g. `agency-a/app-x/prod`) |
//! | 17+*n*        | 4    | CMK version                                                  |
//! | 21+*n*        | *m*  | wrapped data key (opaque to the envelope)                    |
//! | 21+*n*+*m*    | 32   | salt: 32 random bytes, fresh for every stream                |
//! | 53+*n*+*m*    | 32   | key commitment (below)                                       |
//! | 85+*n*+*m*    | 32   | header tag (below)                                           |
//!
//! The header is 117+*n*+*m* bytes: at least [`MIN_HEADER_LEN`] (119), at most
//! [`MAX_HEADER_LEN`] (1396). A reader validates the 17-byte fixed part
//! (magic, version, algorithm, *S*, *n*, *m*) before reading the rest, so it
//! never allocates more than 1396 bytes for a header. Unknown versions and
//! algorithms are refused, never guessed at.
//!
//! ## Keys
//!
//! From the 32-byte data key *DK* and the header (SHA-256 throughout):
//!
//! ```text
//! PRK        = HKDF-Extract(salt = header salt, IKM = DK)
//! commitment = HKDF-Expand(PRK, "kluis-envelope/v1 key commitment", 32)
//! Kh         = HKDF-Expand(PRK, "kluis-envelope/v1 header tag key", 32)
//! header tag = HMAC-SHA256(Kh, header bytes 0 .. 85+n+m)        (everything before the tag)
//! H          = SHA-256(header bytes 0 .. 117+n+m)               (the whole header, tag included)
//! Ks || P    = HKDF-Expand(PRK, "kluis-envelope/v1 segment key" || H, 39)
//!              Ks = first 32 bytes (the AES-256-GCM key), P = last 7 bytes (nonce prefix)
//! ```
//!
//! Labels are ASCII without a terminator. A reader checks, in order: the
//! commitment (constant time; a mismatch is [`DecryptError::WrongKey`]), the
//! header tag ([`DecryptError::HeaderTampered`]), then each segment under *Ks*.
//! Because *Ks* depends on *H*, the exact header bytes are also bound into
//! every segment: change any header byte and no segment authenticates.
//!
//! ## Segments
//!
//! Segment *i* (*i* = 0, 1, …) is
//!
//! | size | field                                                                 |
//! |------|-----------------------------------------------------------------------|
//! | 4    | word: bit 31 = final flag *f*; bits 0..=30 = plaintext length *L*      |
//! | *L*  | AES-256-GCM ciphertext                                                |
//! | 16   | GCM tag                                                               |
//!
//! sealed with key *Ks*, nonce `P (7) || i as u32 (4) || f as one byte (0x00 or
//! 0x01)`, and the 4-byte word as associated data. A non-final segment has
//! *L* = *S* exactly; the final segment has 0 ≤ *L* ≤ *S* (an empty plaintext
//! is one empty final segment; a writer ends with an empty final segment after
//! others only when a `write` accepted a full segment and it was then finished
//! without more data). Exactly
//! one segment, the last, has *f* = 1, and the envelope ends with it: the
//! format is self-delimiting, so a reader never needs to read past it.
//!
//! This is the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár,
//! *Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance*,
//! CRYPTO 2015) with the counter and last-segment flag in the nonce. Each
//! segment authenticates only at its own position, with its own finality, in
//! its own stream; hence:
//!
//! | tampering                                       | error                                  |
//! |-------------------------------------------------|----------------------------------------|
//! | wrong data key (or altered salt/commitment)     | [`DecryptError::WrongKey`]             |
//! | any other header byte changed                   | [`DecryptError::HeaderTampered`]       |
//! | stream cut after any segment before the final, or inside one, or a non-final segment relabelled final | [`DecryptError::Truncated`] |
//! | bytes after the final segment, or the final segment relabelled non-final | [`DecryptError::TrailingData`] |
//! | a later segment moved earlier, or segments removed | [`DecryptError::Reordered`]         |
//! | an earlier segment repeated                     | [`DecryptError::Duplicated`]           |
//! | a segment modified, or spliced from another stream (even under the same data key) | [`DecryptError::Forged`] |
//! | a length word impossible for *S*                | [`DecryptError::SegmentLength`]        |
//!
//! The distinctions between `Reordered`, `Duplicated` and `Forged` are
//! diagnostics: after a segment fails, the reader tries it as the other
//! finality and as the segments within ±8 positions (only then, and at most 17
//! trial decryptions into a zeroized scratch buffer) to say what happened. A
//! segment from farther away is reported as `Forged`. Every case is an error;
//! none yields its plaintext.
//!
//! # Security notes
//!
//! - **Nonces never repeat under one key.** *Ks* is unique to the stream (it is
//!   derived from a fresh 256-bit random salt; two streams under one data key
//!   share *Ks* with probability about 2^-256 per pair), and within a stream
//!   each (counter, flag) pair is used once: counters are consecutive and only
//!   the last segment carries flag 1. The counter is 32 bits, so a stream holds
//!   at most [`MAX_SEGMENTS`] = 2^32 segments (256 TiB at 64 KiB segments, at
//!   most 64 PiB at 16 MiB); the writer refuses to seal more
//!   ([`EncryptError::TooManySegments`]) rather than wrap the counter, and the
//!   reader refuses a stream that claims more.
//! - **Per-stream subkeys (the choice made).** Deriving *Ks* with HKDF from the
//!   data key, the salt and the header hash means one data key can safely
//!   encrypt any number of streams: no random-nonce birthday bound (the 2^32
//!   messages per key limit of GCM with random 96-bit nonces) applies to the
//!   data key, each AES key sees at most 2^32 segments under structured
//!   nonces, and the header is bound into every segment. The 7-byte prefix *P*
//!   is derived too, so no nonce material is stored.
//! - **Key commitment.** AES-GCM alone is not key-committing: a crafted
//!   ciphertext can decrypt under two keys. The 256-bit commitment binds the
//!   stream to one data key (and is what tells a wrong key from tampering).
//!   It is a PRF output and reveals nothing about the key.
//! - **No plaintext before authentication.** A segment is decrypted out of
//!   place, and only after its tag verified is any of it returned. A reader
//!   yields `Ok(0)` (end of data) only after the final segment authenticated,
//!   so a truncated stream never looks complete; after any error the reader
//!   returns errors only.
//! - **Secrets in memory.** [`DataKey`] zeroizes on drop and its `Debug` is
//!   redacted; the PRK, *Kh* and *Ks* bytes live in zeroizing buffers or in
//!   AWS-LC objects that cleanse on free; plaintext buffers (the writer's
//!   segment buffer, the reader's plaintext buffer, the scratch used by
//!   diagnosis and `finish`, [`decrypt_to_vec`]'s result) are zeroized when
//!   dropped, the reader's after each segment, and the writer's as soon as
//!   its plaintext is sealed into lent room. Buffers a caller passes in
//!   are the caller's to zeroize.
//! - **Bounded memory.** Header fields are bounded before any allocation; a
//!   writer holds one segment buffer (*S* + 20 bytes), a reader one ciphertext
//!   segment buffer plus, only when reading into buffers smaller than *S*, one
//!   plaintext segment buffer, whatever the stream length. The largest segment
//!   size (16 MiB) bounds both.
//! - **Not hidden.** The plaintext length (to the byte), the CMK id and version
//!   and the wrapped key are visible to whoever holds the envelope.
//! - **Crypto.** AWS-LC via `aws-lc-rs` (AES-GCM, HKDF, HMAC, SHA-256, and the
//!   system random generator for salts and keys). GCM with caller-built nonces,
//!   as STREAM needs, is outside AWS-LC's FIPS-approved service indicator.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod crypto;
mod error;
mod header;
mod key;
mod open;
mod seal;
mod sync;
#[cfg(feature = "tokio")]
mod tokio_io;

pub use error::{DecryptError, EncryptError, HeaderError, KeyError};
pub use header::{
    EnvelopeHeader, WrappedKey, ALGORITHM_AES256GCM_STREAM, COMMITMENT_LEN, DEFAULT_SEGMENT_SIZE,
    FORMAT_VERSION, HEADER_TAG_LEN, MAGIC, MAX_CMK_ID_LEN, MAX_HEADER_LEN, MAX_SEGMENT_SIZE,
    MAX_WRAPPED_KEY_LEN, MIN_HEADER_LEN, MIN_SEGMENT_SIZE, SALT_LEN,
};
pub use key::DataKey;
pub use sync::{decrypt_to_vec, encrypt_to_vec, EnvelopeReader, EnvelopeWriter, WriteInPlace};
#[cfg(feature = "tokio")]
pub use tokio_io::{AsyncEnvelopeReader, AsyncEnvelopeWriter};

/// Length of the word that starts every segment.
pub const SEGMENT_WORD_LEN: usize = 4;
/// Bit 31 of a segment word: set on the final segment only.
pub const FINAL_FLAG: u32 = 1 << 31;
/// Length of the AES-GCM tag that ends every segment.
pub const SEGMENT_TAG_LEN: usize = crypto::TAG_LEN;
/// Bytes a segment adds to its plaintext: the word and the tag.
pub const SEGMENT_OVERHEAD: usize = SEGMENT_WORD_LEN + SEGMENT_TAG_LEN;
/// Most segments one stream may have: the 32-bit counter's range.
pub const MAX_SEGMENTS: u64 = 1 << 32;

/// The exact envelope length for a plaintext of `plaintext_len` bytes, given
/// the header length and segment size; `None` on overflow or a zero segment
/// size.
pub fn envelope_len(header_len: usize, segment_size: u32, plaintext_len: u64) -> Option<u64> {
    let size = u64::from(segment_size);
    // Segments: full ones, plus the final (possibly partial or empty) one.
    let segments = plaintext_len.checked_div(size)?.checked_add(u64::from(
        plaintext_len.checked_rem(size)? != 0 || plaintext_len == 0,
    ))?;
    let overhead = u64::try_from(SEGMENT_OVERHEAD)
        .ok()?
        .checked_mul(segments)?;
    u64::try_from(header_len)
        .ok()?
        .checked_add(overhead)?
        .checked_add(plaintext_len)
}

#[cfg(test)]
mod unit_tests;
