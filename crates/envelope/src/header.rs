//! The envelope header: encoding, strict bounded parsing, and its
//! authentication under the data key.

use crate::crypto::{self, SegmentCipher, StreamSecrets};
use crate::error::{DecryptError, EncryptError, HeaderError};
use crate::key::DataKey;
use std::fmt;
use std::io::{self, Read};

/// The eight bytes every envelope starts with.
pub const MAGIC: &[u8; 8] = b"KLUISENV";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Algorithm id 1: AES-256-GCM in the STREAM construction, with HKDF-SHA256
/// per-stream keys and an HMAC-SHA256 header tag.
pub const ALGORITHM_AES256GCM_STREAM: u8 = 1;
/// Smallest allowed segment size (plaintext bytes per segment): 1 KiB.
pub const MIN_SEGMENT_SIZE: u32 = 1024;
/// Largest allowed segment size: 16 MiB.
pub const MAX_SEGMENT_SIZE: u32 = 16 * 1024 * 1024;
/// Default segment size: 64 KiB.
pub const DEFAULT_SEGMENT_SIZE: u32 = 64 * 1024;
/// Longest CMK id, in bytes of UTF-8.
pub const MAX_CMK_ID_LEN: usize = 255;
/// Longest wrapped data key, in bytes.
pub const MAX_WRAPPED_KEY_LEN: usize = 1024;
/// Length of the random per-stream salt.
pub const SALT_LEN: usize = 32;
/// Length of the key commitment.
pub const COMMITMENT_LEN: usize = 32;
/// Length of the header's authentication tag.
pub const HEADER_TAG_LEN: usize = 32;

/// Bytes of the fixed part: magic, version, algorithm, segment size, the two
/// variable lengths.
const FIXED_LEN: usize = 8 + 1 + 1 + 4 + 1 + 2;
/// Bytes after the variable fields: salt, commitment, tag.
const TAIL_LEN: usize = SALT_LEN + COMMITMENT_LEN + HEADER_TAG_LEN;
/// The smallest header (1-byte CMK id, 1-byte wrapped key).
pub const MIN_HEADER_LEN: usize = FIXED_LEN + 1 + 4 + 1 + TAIL_LEN;
/// The largest header. Every header is read into memory whole; this bounds it.
pub const MAX_HEADER_LEN: usize = FIXED_LEN + MAX_CMK_ID_LEN + 4 + MAX_WRAPPED_KEY_LEN + TAIL_LEN;

/// The wrapped data key an envelope carries, with the customer master key
/// (id and version) that wrapped it. The envelope treats the wrapped bytes as
/// opaque; the id and version route them to the key broker for unwrapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    cmk_id: String,
    cmk_version: u32,
    wrapped: Vec<u8>,
}

impl WrappedKey {
    /// Checks the bounds: a CMK id of 1..=255 bytes without control
    /// characters, and 1..=1024 wrapped bytes.
    ///
    /// # Errors
    /// [`HeaderError::CmkIdLength`], [`HeaderError::CmkIdControlCharacter`] or
    /// [`HeaderError::WrappedKeyLength`].
    pub fn new(
        cmk_id: impl Into<String>,
        cmk_version: u32,
        wrapped: impl Into<Vec<u8>>,
    ) -> Result<Self, HeaderError> {
        let cmk_id = cmk_id.into();
        let wrapped = wrapped.into();
        check_cmk_id(&cmk_id)?;
        check_wrapped_len(wrapped.len())?;
        Ok(Self {
            cmk_id,
            cmk_version,
            wrapped,
        })
    }

    /// The customer master key's id, e.g. `agency-a/app-x/prod`.
    pub fn cmk_id(&self) -> &str {
        &self.cmk_id
    }

    /// The CMK version that wrapped the data key.
    pub fn cmk_version(&self) -> u32 {
        self.cmk_version
    }

    /// The wrapped data key (opaque to the envelope).
    pub fn wrapped_bytes(&self) -> &[u8] {
        &self.wrapped
    }
}

fn check_cmk_id(id: &str) -> Result<(), HeaderError> {
    if id.is_empty() || id.len() > MAX_CMK_ID_LEN {
        return Err(HeaderError::CmkIdLength { found: id.len() });
    }
    match id.char_indices().find(|(_, c)| c.is_control()) {
        Some((offset, c)) => Err(HeaderError::CmkIdControlCharacter {
            code: u32::from(c),
            offset,
        }),
        None => Ok(()),
    }
}

fn check_wrapped_len(len: usize) -> Result<(), HeaderError> {
    if len == 0 || len > MAX_WRAPPED_KEY_LEN {
        return Err(HeaderError::WrappedKeyLength { found: len });
    }
    Ok(())
}

fn check_segment_size(size: u32) -> Result<(), HeaderError> {
    if (MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(HeaderError::SegmentSize { found: size })
    }
}

/// A parsed (and, on the writer's side, freshly made) envelope header.
///
/// Parsing needs no key: [`EnvelopeHeader::read_from`] gives the key broker
/// what it needs to unwrap the data key. The header is *not* authenticated
/// until a reader checks it under that key ([`crate::EnvelopeReader::with_header`]);
/// until then, treat its fields as claims.
#[derive(Clone, PartialEq, Eq)]
pub struct EnvelopeHeader {
    key: WrappedKey,
    segment_size: u32,
    salt: [u8; SALT_LEN],
    commitment: [u8; COMMITMENT_LEN],
    /// The exact encoding, tag included.
    raw: Vec<u8>,
}

impl fmt::Debug for EnvelopeHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvelopeHeader")
            .field("cmk_id", &self.key.cmk_id)
            .field("cmk_version", &self.key.cmk_version)
            .field("wrapped_key_len", &self.key.wrapped.len())
            .field("segment_size", &self.segment_size)
            .field("header_len", &self.raw.len())
            .finish_non_exhaustive()
    }
}

/// The fixed part, parsed.
struct Fixed {
    segment_size: u32,
    cmk_id_len: usize,
    wrapped_len: usize,
}

impl Fixed {
    fn parse(bytes: &[u8; FIXED_LEN]) -> Result<Self, HeaderError> {
        let mut c = Cursor(bytes);
        let magic: [u8; 8] = c.array().ok_or(SHORT)?;
        if &magic != MAGIC {
            return Err(HeaderError::BadMagic { found: magic });
        }
        let [version] = c.array().ok_or(SHORT)?;
        if version != FORMAT_VERSION {
            return Err(HeaderError::UnsupportedVersion { found: version });
        }
        let [algorithm] = c.array().ok_or(SHORT)?;
        if algorithm != ALGORITHM_AES256GCM_STREAM {
            return Err(HeaderError::UnsupportedAlgorithm { found: algorithm });
        }
        let segment_size = u32::from_be_bytes(c.array().ok_or(SHORT)?);
        check_segment_size(segment_size)?;
        let [cmk_id_len] = c.array().ok_or(SHORT)?;
        let cmk_id_len = usize::from(cmk_id_len);
        if cmk_id_len == 0 {
            return Err(HeaderError::CmkIdLength { found: 0 });
        }
        let wrapped_len = usize::from(u16::from_be_bytes(c.array().ok_or(SHORT)?));
        check_wrapped_len(wrapped_len)?;
        Ok(Self {
            segment_size,
            cmk_id_len,
            wrapped_len,
        })
    }

    /// Bytes after the fixed part (at most `MAX_HEADER_LEN - FIXED_LEN`).
    fn rest_len(&self) -> usize {
        // Both lengths are bounded above (255 and 1024): no overflow.
        self.cmk_id_len
            .saturating_add(4)
            .saturating_add(self.wrapped_len)
            .saturating_add(TAIL_LEN)
    }
}

/// Stands in for "the cursor ran out", which the callers' length checks rule out.
const SHORT: HeaderError = HeaderError::Truncated {
    part: "header",
    expected: MIN_HEADER_LEN,
    found: 0,
};

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
}

impl EnvelopeHeader {
    /// Makes a new header with a fresh random salt, and the segment cipher
    /// bound to it.
    pub(crate) fn create(
        key: &DataKey,
        wrapped: WrappedKey,
        segment_size: u32,
    ) -> Result<(Self, SegmentCipher), EncryptError> {
        check_segment_size(segment_size)?;
        let salt = crypto::random_salt().map_err(|_| EncryptError::Random)?;
        let secrets = StreamSecrets::new(key, &salt);
        let commitment = secrets.commitment().map_err(|_| EncryptError::Crypto)?;
        let cmk_id_len =
            u8::try_from(wrapped.cmk_id.len()).map_err(|_| HeaderError::CmkIdLength {
                found: wrapped.cmk_id.len(),
            })?;
        let wrapped_len =
            u16::try_from(wrapped.wrapped.len()).map_err(|_| HeaderError::WrappedKeyLength {
                found: wrapped.wrapped.len(),
            })?;

        let mut raw = Vec::with_capacity(MAX_HEADER_LEN);
        raw.extend_from_slice(MAGIC);
        raw.push(FORMAT_VERSION);
        raw.push(ALGORITHM_AES256GCM_STREAM);
        raw.extend_from_slice(&segment_size.to_be_bytes());
        raw.push(cmk_id_len);
        raw.extend_from_slice(&wrapped_len.to_be_bytes());
        raw.extend_from_slice(wrapped.cmk_id.as_bytes());
        raw.extend_from_slice(&wrapped.cmk_version.to_be_bytes());
        raw.extend_from_slice(&wrapped.wrapped);
        raw.extend_from_slice(&salt);
        raw.extend_from_slice(&commitment);
        let tag = secrets.header_tag(&raw).map_err(|_| EncryptError::Crypto)?;
        raw.extend_from_slice(&tag);

        let cipher = secrets
            .segment_cipher(&raw)
            .map_err(|_| EncryptError::Crypto)?;
        let header = Self {
            key: wrapped,
            segment_size,
            salt,
            commitment,
            raw,
        };
        Ok((header, cipher))
    }

    /// Checks the header under the data key: first the key commitment
    /// ([`DecryptError::WrongKey`]), then the tag over every header byte
    /// ([`DecryptError::HeaderTampered`]); returns the segment cipher.
    pub(crate) fn authenticate(&self, key: &DataKey) -> Result<SegmentCipher, DecryptError> {
        let secrets = StreamSecrets::new(key, &self.salt);
        let commitment = secrets.commitment().map_err(|_| DecryptError::Crypto)?;
        if !crypto::constant_time_eq(&commitment, &self.commitment) {
            return Err(DecryptError::WrongKey);
        }
        let (untagged, tag) = self
            .raw
            .split_at_checked(self.raw.len().saturating_sub(HEADER_TAG_LEN))
            .ok_or(DecryptError::HeaderTampered)?;
        if !secrets
            .header_tag_matches(untagged, tag)
            .map_err(|_| DecryptError::Crypto)?
        {
            return Err(DecryptError::HeaderTampered);
        }
        secrets
            .segment_cipher(&self.raw)
            .map_err(|_| DecryptError::Crypto)
    }

    /// Reads exactly one header from `reader` (never more bytes than the
    /// header has), checking every field's bounds before allocating. Needs no
    /// key and does not authenticate the header.
    ///
    /// # Errors
    /// [`HeaderError`]: malformed or out-of-bounds fields, the input ending
    /// inside the header, or an I/O error.
    pub fn read_from<R: Read + ?Sized>(reader: &mut R) -> Result<Self, HeaderError> {
        let mut fixed = [0; FIXED_LEN];
        read_part(reader, &mut fixed, "fixed part")?;
        let parsed = Fixed::parse(&fixed)?;
        let mut rest = vec![0; parsed.rest_len()];
        read_part(reader, &mut rest, "variable part")?;
        Self::assemble(&fixed, &parsed, &rest)
    }

    /// Parses a header at the start of `bytes`; returns it and its length in
    /// bytes (where the first segment starts).
    ///
    /// # Errors
    /// As [`EnvelopeHeader::read_from`].
    pub fn from_bytes(bytes: &[u8]) -> Result<(Self, usize), HeaderError> {
        let fixed: [u8; FIXED_LEN] = bytes
            .get(..FIXED_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(HeaderError::Truncated {
                part: "fixed part",
                expected: FIXED_LEN,
                found: bytes.len(),
            })?;
        let parsed = Fixed::parse(&fixed)?;
        let rest_len = parsed.rest_len();
        let available = bytes.len().saturating_sub(FIXED_LEN);
        let rest = bytes
            .get(FIXED_LEN..)
            .and_then(|b| b.get(..rest_len))
            .ok_or(HeaderError::Truncated {
                part: "variable part",
                expected: rest_len,
                found: available,
            })?;
        let header = Self::assemble(&fixed, &parsed, rest)?;
        let len = header.raw.len();
        Ok((header, len))
    }

    /// Reads one header from an async source; see [`EnvelopeHeader::read_from`].
    ///
    /// # Errors
    /// As [`EnvelopeHeader::read_from`].
    #[cfg(feature = "tokio")]
    pub async fn read_from_async<R>(reader: &mut R) -> Result<Self, HeaderError>
    where
        R: tokio::io::AsyncRead + Unpin + ?Sized,
    {
        let mut fixed = [0; FIXED_LEN];
        read_part_async(reader, &mut fixed, "fixed part").await?;
        let parsed = Fixed::parse(&fixed)?;
        let mut rest = vec![0; parsed.rest_len()];
        read_part_async(reader, &mut rest, "variable part").await?;
        Self::assemble(&fixed, &parsed, &rest)
    }

    fn assemble(fixed: &[u8; FIXED_LEN], parsed: &Fixed, rest: &[u8]) -> Result<Self, HeaderError> {
        let mut c = Cursor(rest);
        let cmk_id = c.take(parsed.cmk_id_len).ok_or(SHORT)?;
        let cmk_id = std::str::from_utf8(cmk_id)
            .map_err(|e| HeaderError::CmkIdNotUtf8 {
                offset: e.valid_up_to(),
            })?
            .to_owned();
        check_cmk_id(&cmk_id)?;
        let cmk_version = u32::from_be_bytes(c.array().ok_or(SHORT)?);
        let wrapped = c.take(parsed.wrapped_len).ok_or(SHORT)?.to_vec();
        let salt: [u8; SALT_LEN] = c.array().ok_or(SHORT)?;
        let commitment: [u8; COMMITMENT_LEN] = c.array().ok_or(SHORT)?;
        let _tag: [u8; HEADER_TAG_LEN] = c.array().ok_or(SHORT)?;
        if !c.0.is_empty() {
            return Err(SHORT);
        }
        let mut raw = Vec::with_capacity(FIXED_LEN.saturating_add(rest.len()));
        raw.extend_from_slice(fixed);
        raw.extend_from_slice(rest);
        Ok(Self {
            key: WrappedKey {
                cmk_id,
                cmk_version,
                wrapped,
            },
            segment_size: parsed.segment_size,
            salt,
            commitment,
            raw,
        })
    }

    /// The wrapped data key and the CMK (id, version) it names.
    pub fn wrapped_key(&self) -> &WrappedKey {
        &self.key
    }

    /// The CMK id the wrapped data key names.
    pub fn cmk_id(&self) -> &str {
        &self.key.cmk_id
    }

    /// The CMK version the wrapped data key names.
    pub fn cmk_version(&self) -> u32 {
        self.key.cmk_version
    }

    /// Plaintext bytes per (non-final) segment.
    pub fn segment_size(&self) -> u32 {
        self.segment_size
    }

    /// The random per-stream salt.
    pub fn salt(&self) -> &[u8; SALT_LEN] {
        &self.salt
    }

    /// The header's exact encoding, tag included.
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    /// The header's length in bytes.
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// Always false (a header is at least [`MIN_HEADER_LEN`] bytes); here
    /// because `len` is.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }
}

/// `read_exact` that reports how far it got.
fn read_part<R: Read + ?Sized>(
    reader: &mut R,
    buf: &mut [u8],
    part: &'static str,
) -> Result<(), HeaderError> {
    let mut filled = 0;
    while let Some(dst) = buf.get_mut(filled..).filter(|d| !d.is_empty()) {
        match reader.read(dst) {
            Ok(0) => {
                return Err(HeaderError::Truncated {
                    part,
                    expected: buf.len(),
                    found: filled,
                })
            }
            Ok(n) => filled = filled.saturating_add(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HeaderError::Io(e)),
        }
    }
    Ok(())
}

#[cfg(feature = "tokio")]
async fn read_part_async<R>(
    reader: &mut R,
    buf: &mut [u8],
    part: &'static str,
) -> Result<(), HeaderError>
where
    R: tokio::io::AsyncRead + Unpin + ?Sized,
{
    use tokio::io::AsyncReadExt;
    let mut filled = 0;
    while let Some(dst) = buf.get_mut(filled..).filter(|d| !d.is_empty()) {
        match reader.read(dst).await {
            Ok(0) => {
                return Err(HeaderError::Truncated {
                    part,
                    expected: buf.len(),
                    found: filled,
                })
            }
            Ok(n) => filled = filled.saturating_add(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HeaderError::Io(e)),
        }
    }
    Ok(())
}
