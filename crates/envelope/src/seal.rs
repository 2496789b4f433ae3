//! The sans-IO encoder: buffers one segment of plaintext, seals it, and hands
//! the bytes to a sink the caller supplies (a blocking `Write` or a polled
//! `AsyncWrite`).

use crate::crypto::{SegmentCipher, TAG_LEN};
use crate::error::EncryptError;
use crate::header::{EnvelopeHeader, WrappedKey};
use crate::key::DataKey;
use crate::{FINAL_FLAG, MAX_SEGMENTS, SEGMENT_WORD_LEN};
use std::io;
use std::task::{ready, Poll};
use zeroize::{Zeroize, Zeroizing};

#[derive(Debug, Clone, Copy)]
enum State {
    /// Writing `header[pos..]`.
    Header { pos: usize },
    /// `filled` plaintext bytes sit at `buf[WORD..]`.
    Filling { filled: usize },
    /// `buf[pos..end]` is sealed output not yet written.
    Draining {
        pos: usize,
        end: usize,
        is_final: bool,
    },
    /// The final segment is written.
    Done,
    /// A sealing error ended the stream.
    Failed,
}

/// One segment buffer: `word || plaintext-then-ciphertext || tag`.
pub(crate) struct Encoder {
    header: EnvelopeHeader,
    cipher: SegmentCipher,
    segment_size: usize,
    buf: Zeroizing<Vec<u8>>,
    state: State,
    next_index: u64,
    max_segments: u64,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("header", &self.header)
            .field("state", &self.state)
            .field("next_index", &self.next_index)
            .finish_non_exhaustive()
    }
}

/// Where sealed bytes go: offered bytes, it writes some of them. A sink may
/// also lend room at the end of its own buffer, for a segment to be sealed
/// straight into it instead of into the encoder's buffer and then copied.
pub(crate) trait Sink {
    /// Writes some of `bytes`.
    fn write(&mut self, bytes: &[u8]) -> Poll<io::Result<usize>>;

    /// Exactly `len` bytes to seal a segment into, or `None` (the segment
    /// then goes through [`write`](Self::write)).
    fn room(&mut self, _len: usize) -> io::Result<Option<&mut [u8]>> {
        Ok(None)
    }

    /// The room last lent now holds a sealed segment.
    fn commit(&mut self, _len: usize) -> io::Result<()> {
        Ok(())
    }
}

impl<F: FnMut(&[u8]) -> Poll<io::Result<usize>>> Sink for F {
    fn write(&mut self, bytes: &[u8]) -> Poll<io::Result<usize>> {
        self(bytes)
    }
}

/// Where a sealed segment went.
enum Sealed {
    /// Into the sink's own room: nothing to write.
    Lent,
    /// Into `buf[..end]`, to be written.
    Buffered { end: usize },
}

/// Seals `plaintext` as segment `counter` into `out`, which must be exactly
/// `word || ciphertext || tag` long; the plaintext is left as it was.
fn seal_out_of_place(
    cipher: &SegmentCipher,
    counter: u32,
    is_final: bool,
    plaintext: &[u8],
    out: &mut [u8],
) -> Result<(), EncryptError> {
    let word = segment_word(is_final, plaintext.len())?;
    let (word_slot, rest) = out
        .split_at_mut_checked(SEGMENT_WORD_LEN)
        .ok_or(EncryptError::Crypto)?;
    let (body, tag_slot) = rest
        .split_at_mut_checked(plaintext.len())
        .ok_or(EncryptError::Crypto)?;
    if tag_slot.len() != TAG_LEN {
        return Err(EncryptError::Crypto);
    }
    cipher
        .seal_into(counter, is_final, word, plaintext, body, tag_slot)
        .map_err(|_| EncryptError::Crypto)?;
    word_slot.copy_from_slice(&word);
    Ok(())
}

/// The word of a segment of `len` plaintext bytes.
fn segment_word(is_final: bool, len: usize) -> Result<[u8; SEGMENT_WORD_LEN], EncryptError> {
    let len32 = u32::try_from(len).map_err(|_| EncryptError::Crypto)?;
    Ok((if is_final { FINAL_FLAG } else { 0 } | len32).to_be_bytes())
}

impl Encoder {
    pub(crate) fn new(
        key: &DataKey,
        wrapped: WrappedKey,
        segment_size: u32,
    ) -> Result<Self, EncryptError> {
        let (header, cipher) = EnvelopeHeader::create(key, wrapped, segment_size)?;
        let segment_size = usize::try_from(segment_size).map_err(|_| EncryptError::Crypto)?;
        let buf_len = SEGMENT_WORD_LEN
            .checked_add(segment_size)
            .and_then(|n| n.checked_add(TAG_LEN))
            .ok_or(EncryptError::Crypto)?;
        Ok(Self {
            header,
            cipher,
            segment_size,
            buf: Zeroizing::new(vec![0; buf_len]),
            state: State::Header { pos: 0 },
            next_index: 0,
            max_segments: MAX_SEGMENTS,
        })
    }

    #[cfg(test)]
    pub(crate) fn set_max_segments(&mut self, max: u64) {
        self.max_segments = max;
    }

    pub(crate) fn header(&self) -> &EnvelopeHeader {
        &self.header
    }

    #[cfg(test)]
    pub(crate) fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Writes pending output (header or a sealed segment) until none is left.
    fn drain(&mut self, sink: &mut impl Sink) -> Poll<Result<(), EncryptError>> {
        loop {
            let pending: &[u8] = match self.state {
                State::Header { pos } => self.header.as_bytes().get(pos..).unwrap_or_default(),
                State::Draining { pos, end, .. } => self.buf.get(pos..end).unwrap_or_default(),
                State::Filling { .. } | State::Done => return Poll::Ready(Ok(())),
                State::Failed => return Poll::Ready(Err(EncryptError::Failed)),
            };
            if pending.is_empty() {
                self.state = match self.state {
                    State::Draining { is_final: true, .. } => State::Done,
                    _ => State::Filling { filled: 0 },
                };
                continue;
            }
            let offered = pending.len();
            let written = match ready!(sink.write(pending)) {
                Ok(0) => {
                    return Poll::Ready(Err(EncryptError::Io(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the sink accepted no bytes",
                    ))))
                }
                Ok(n) => n.min(offered),
                Err(e) => return Poll::Ready(Err(EncryptError::Io(e))),
            };
            match &mut self.state {
                State::Header { pos } | State::Draining { pos, .. } => {
                    *pos = pos.saturating_add(written)
                }
                _ => {}
            }
        }
    }

    /// Seals the buffered plaintext (or, with `direct`, a full segment of the
    /// caller's input, saving a copy) as segment `next_index`: into room the
    /// sink lends, if it does, or else into the buffer, to be written.
    fn seal(
        &mut self,
        is_final: bool,
        direct: Option<&[u8]>,
        sink: &mut impl Sink,
    ) -> Result<(), EncryptError> {
        let State::Filling { filled } = self.state else {
            return Err(EncryptError::Failed);
        };
        let index = self.next_index;
        // A non-final segment needs room for at least the final one after it.
        let limit_ok = if is_final {
            index < self.max_segments
        } else {
            index.saturating_add(1) < self.max_segments
        };
        if !limit_ok {
            self.state = State::Failed;
            return Err(EncryptError::TooManySegments {
                max_segments: self.max_segments,
            });
        }
        let len = direct.map_or(filled, <[u8]>::len);
        match self.seal_segment(index, len, is_final, direct, sink) {
            Ok(sealed) => {
                self.state = match sealed {
                    Sealed::Lent if is_final => State::Done,
                    Sealed::Lent => State::Filling { filled: 0 },
                    Sealed::Buffered { end } => State::Draining {
                        pos: 0,
                        end,
                        is_final,
                    },
                };
                self.next_index = index.saturating_add(1);
                Ok(())
            }
            Err(e) => {
                self.state = State::Failed;
                Err(e)
            }
        }
    }

    fn seal_segment(
        &mut self,
        index: u64,
        len: usize,
        is_final: bool,
        direct: Option<&[u8]>,
        sink: &mut impl Sink,
    ) -> Result<Sealed, EncryptError> {
        let counter = u32::try_from(index).map_err(|_| EncryptError::TooManySegments {
            max_segments: self.max_segments,
        })?;
        // word + len + tag: at most 16 MiB + 20, no overflow.
        let total = SEGMENT_WORD_LEN.saturating_add(len).saturating_add(TAG_LEN);
        let buffered = SEGMENT_WORD_LEN..SEGMENT_WORD_LEN.saturating_add(len);
        if let Some(room) = sink.room(total).map_err(EncryptError::Io)? {
            if room.len() != total {
                return Err(EncryptError::Io(io::Error::other(
                    "the sink lent room of the wrong length",
                )));
            }
            let plaintext = match direct {
                Some(plaintext) => plaintext,
                None => self.buf.get(buffered.clone()).ok_or(EncryptError::Crypto)?,
            };
            seal_out_of_place(&self.cipher, counter, is_final, plaintext, room)?;
            sink.commit(total).map_err(EncryptError::Io)?;
            if direct.is_none() {
                // Sealed out of place: the plaintext is still here.
                if let Some(used) = self.buf.get_mut(buffered) {
                    used.zeroize();
                }
            }
            return Ok(Sealed::Lent);
        }
        let out = self.buf.get_mut(..total).ok_or(EncryptError::Crypto)?;
        match direct {
            Some(plaintext) => seal_out_of_place(&self.cipher, counter, is_final, plaintext, out)?,
            None => {
                let word = segment_word(is_final, len)?;
                let (word_slot, rest) = out
                    .split_at_mut_checked(SEGMENT_WORD_LEN)
                    .ok_or(EncryptError::Crypto)?;
                let (body, tag_slot) =
                    rest.split_at_mut_checked(len).ok_or(EncryptError::Crypto)?;
                let tag = self
                    .cipher
                    .seal(counter, is_final, word, body)
                    .map_err(|_| EncryptError::Crypto)?;
                tag_slot.copy_from_slice(&tag);
                word_slot.copy_from_slice(&word);
            }
        }
        Ok(Sealed::Buffered { end: total })
    }

    /// Accepts a prefix of `input` (at least one byte unless it is empty or
    /// the call is pending), sealing and writing full segments as needed.
    pub(crate) fn poll_write(
        &mut self,
        input: &[u8],
        mut sink: impl Sink,
    ) -> Poll<Result<usize, EncryptError>> {
        if input.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            match self.state {
                State::Failed => return Poll::Ready(Err(EncryptError::Failed)),
                State::Done => return Poll::Ready(Err(EncryptError::Finished)),
                State::Header { .. } | State::Draining { .. } => ready!(self.drain(&mut sink))?,
                State::Filling { filled } if filled >= self.segment_size => {
                    // More input follows a full segment: it is not the last.
                    self.seal(false, None, &mut sink)?;
                }
                State::Filling { filled: 0 } if input.len() > self.segment_size => {
                    // A whole segment with more input after it: seal it
                    // straight from the caller's buffer, as non-final.
                    let Some(segment) = input.get(..self.segment_size) else {
                        self.state = State::Failed;
                        return Poll::Ready(Err(EncryptError::Failed));
                    };
                    self.seal(false, Some(segment), &mut sink)?;
                    return Poll::Ready(Ok(self.segment_size));
                }
                State::Filling { filled } => {
                    let room = self.segment_size.saturating_sub(filled);
                    let n = room.min(input.len());
                    let end = filled.saturating_add(n);
                    let dst = self.buf.get_mut(
                        SEGMENT_WORD_LEN.saturating_add(filled)
                            ..SEGMENT_WORD_LEN.saturating_add(end),
                    );
                    let src = input.get(..n);
                    let (Some(dst), Some(src)) = (dst, src) else {
                        self.state = State::Failed;
                        return Poll::Ready(Err(EncryptError::Failed));
                    };
                    dst.copy_from_slice(src);
                    self.state = State::Filling { filled: end };
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    /// Writes any sealed output still pending. Buffered plaintext of an
    /// incomplete segment stays buffered: a segment is sealed only when full
    /// or final.
    pub(crate) fn poll_flush(&mut self, mut sink: impl Sink) -> Poll<Result<(), EncryptError>> {
        self.drain(&mut sink)
    }

    /// Seals the buffered plaintext as the final segment and writes it.
    /// Idempotent once done.
    pub(crate) fn poll_finish(&mut self, mut sink: impl Sink) -> Poll<Result<(), EncryptError>> {
        loop {
            match self.state {
                State::Failed => return Poll::Ready(Err(EncryptError::Failed)),
                State::Done => return Poll::Ready(Ok(())),
                State::Header { .. } | State::Draining { .. } => ready!(self.drain(&mut sink))?,
                State::Filling { .. } => self.seal(true, None, &mut sink)?,
            }
        }
    }
}
