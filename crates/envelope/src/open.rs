//! The sans-IO decoder: reads one segment at a time from a source the caller
//! supplies, authenticates it, and only then releases its plaintext.

use crate::crypto::{SegmentCipher, TAG_LEN};
use crate::error::DecryptError;
use crate::header::EnvelopeHeader;
use crate::key::DataKey;
use crate::{FINAL_FLAG, MAX_SEGMENTS, SEGMENT_WORD_LEN};
use std::io;
use std::task::{ready, Poll};
use zeroize::{Zeroize, Zeroizing};

/// How far from its own position a failed segment is tried as another segment
/// of the stream, to tell reordering and duplication from forgery.
pub(crate) const DIAGNOSIS_WINDOW: u64 = 8;

#[derive(Debug, Clone, Copy)]
enum State {
    /// Reading the 4-byte segment word into `ct[..filled]`.
    Word,
    /// Reading `ct[WORD..WORD + len + TAG]`.
    Body { len: usize, is_final: bool },
    /// Serving `pt[pos..len]`, plaintext of an authenticated segment.
    Plain {
        pos: usize,
        len: usize,
        is_final: bool,
    },
    /// The final segment authenticated; the end-of-input check is next.
    AtEnd,
    /// Complete.
    Done,
    /// An error ended the stream.
    Failed,
}

/// Where ciphertext comes from: it fills some of a buffer, `Ok(0)` at end of
/// input. A source may also show input it already holds, for a whole
/// segment there to be opened in place instead of copied into the decoder's
/// buffer first.
pub(crate) trait Source {
    /// Fills some of `buf`.
    fn read(&mut self, buf: &mut [u8]) -> Poll<io::Result<usize>>;

    /// Input already held, to be read in place and then
    /// [`consume`](Self::consume)d; empty when there is none (or at the
    /// end, or on an error, which `read` then reports).
    fn buffered(&mut self) -> &[u8] {
        &[]
    }

    /// The first `n` bytes [`buffered`](Self::buffered) showed are used.
    fn consume(&mut self, _n: usize) {}
}

impl<F: FnMut(&mut [u8]) -> Poll<io::Result<usize>>> Source for F {
    fn read(&mut self, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        self(buf)
    }
}

pub(crate) struct Decoder {
    header: EnvelopeHeader,
    cipher: SegmentCipher,
    segment_size: usize,
    /// `word || ciphertext || tag` of the current segment.
    ct: Vec<u8>,
    filled: usize,
    /// Plaintext of the current segment, used only when the caller's buffer is
    /// smaller than the segment. Allocated on first use.
    pt: Zeroizing<Vec<u8>>,
    state: State,
    index: u64,
    max_segments: u64,
    require_eof: bool,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("header", &self.header)
            .field("state", &self.state)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Decoder {
    pub(crate) fn new(header: EnvelopeHeader, key: &DataKey) -> Result<Self, DecryptError> {
        let cipher = header.authenticate(key)?;
        let segment_size =
            usize::try_from(header.segment_size()).map_err(|_| DecryptError::Crypto)?;
        let ct_len = SEGMENT_WORD_LEN
            .checked_add(segment_size)
            .and_then(|n| n.checked_add(TAG_LEN))
            .ok_or(DecryptError::Crypto)?;
        Ok(Self {
            header,
            cipher,
            segment_size,
            ct: vec![0; ct_len],
            filled: 0,
            pt: Zeroizing::new(Vec::new()),
            state: State::Word,
            index: 0,
            max_segments: MAX_SEGMENTS,
            require_eof: true,
        })
    }

    #[cfg(test)]
    pub(crate) fn set_max_segments(&mut self, max: u64) {
        self.max_segments = max;
    }

    /// Bytes held in buffers (ciphertext plus plaintext), for the
    /// constant-memory tests.
    #[cfg(test)]
    pub(crate) fn buffer_capacity(&self) -> usize {
        self.ct.capacity().saturating_add(self.pt.capacity())
    }

    pub(crate) fn header(&self) -> &EnvelopeHeader {
        &self.header
    }

    pub(crate) fn set_require_eof(&mut self, require: bool) {
        self.require_eof = require;
    }

    pub(crate) fn is_complete(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn fail(&mut self, error: DecryptError) -> Poll<Result<usize, DecryptError>> {
        self.state = State::Failed;
        self.pt.zeroize();
        Poll::Ready(Err(error))
    }

    /// After segment `index` is consumed.
    fn advance(&mut self, is_final: bool) {
        self.filled = 0;
        if is_final {
            self.state = State::AtEnd;
        } else {
            self.index = self.index.saturating_add(1);
            self.state = State::Word;
        }
    }

    /// Reads into `ct[filled..need]`; `Ok(true)` once full.
    fn fill(&mut self, need: usize, source: &mut impl Source) -> Poll<Result<bool, DecryptError>> {
        let Some(dst) = self.ct.get_mut(self.filled..need) else {
            return Poll::Ready(Err(DecryptError::Failed));
        };
        if dst.is_empty() {
            return Poll::Ready(Ok(true));
        }
        let room = dst.len();
        match ready!(source.read(dst)) {
            Ok(0) => Poll::Ready(Err(DecryptError::Truncated {
                complete_segments: self.index,
            })),
            Ok(n) => {
                self.filled = self.filled.saturating_add(n.min(room));
                Poll::Ready(Ok(self.filled >= need))
            }
            Err(e) => Poll::Ready(Err(DecryptError::Io(e))),
        }
    }

    /// The state after the word that starts `bytes`: the segment's body.
    fn parse_word(&self, bytes: &[u8]) -> Result<State, DecryptError> {
        let word: [u8; SEGMENT_WORD_LEN] = bytes
            .get(..SEGMENT_WORD_LEN)
            .and_then(|w| w.try_into().ok())
            .ok_or(DecryptError::Failed)?;
        let word = u32::from_be_bytes(word);
        let is_final = word & FINAL_FLAG != 0;
        let len = word & !FINAL_FLAG;
        let segment_size = self.header.segment_size();
        if len > segment_size || (!is_final && len != segment_size) {
            return Err(DecryptError::SegmentLength {
                index: self.index,
                is_final,
                found: len,
                segment_size,
            });
        }
        let limit_ok = if is_final {
            self.index < self.max_segments
        } else {
            self.index.saturating_add(1) < self.max_segments
        };
        if !limit_ok {
            return Err(DecryptError::TooManySegments {
                max_segments: self.max_segments,
            });
        }
        let len = usize::try_from(len).map_err(|_| DecryptError::Failed)?;
        Ok(State::Body { len, is_final })
    }

    /// Authenticates and decrypts `segment` (word, body, tag: the decoder's
    /// buffer, or the source's) into `out` (exactly the body length). On
    /// failure `out` is zeroed and the error classified.
    fn open_into(
        &self,
        segment: &[u8],
        len: usize,
        is_final: bool,
        out: &mut [u8],
    ) -> Result<(), DecryptError> {
        let (word, rest) = segment
            .split_at_checked(SEGMENT_WORD_LEN)
            .ok_or(DecryptError::Failed)?;
        let word: [u8; SEGMENT_WORD_LEN] = word.try_into().map_err(|_| DecryptError::Failed)?;
        let (body, rest) = rest.split_at_checked(len).ok_or(DecryptError::Failed)?;
        let tag = rest.get(..TAG_LEN).ok_or(DecryptError::Failed)?;
        let counter = u32::try_from(self.index).map_err(|_| DecryptError::TooManySegments {
            max_segments: self.max_segments,
        })?;
        if self
            .cipher
            .open(counter, is_final, word, body, tag, out)
            .is_ok()
        {
            return Ok(());
        }
        let error = self.diagnose(is_final, word, body, tag, out);
        out.zeroize();
        Err(error)
    }

    /// Segment `index` failed to authenticate as itself. Tries it as the
    /// other end-state and as nearby segments, to report what happened. Uses
    /// `scratch` for trial plaintext; the caller zeroizes it.
    fn diagnose(
        &self,
        is_final: bool,
        word: [u8; SEGMENT_WORD_LEN],
        body: &[u8],
        tag: &[u8],
        scratch: &mut [u8],
    ) -> DecryptError {
        let index = self.index;
        let Ok(counter) = u32::try_from(index) else {
            return DecryptError::Forged { index };
        };
        // The final flag flipped (in the word and in the nonce together).
        let flipped = (u32::from_be_bytes(word) ^ FINAL_FLAG).to_be_bytes();
        if self
            .cipher
            .open(counter, !is_final, flipped, body, tag, scratch)
            .is_ok()
        {
            return if is_final {
                // Sealed as non-final, presented as final: the rest was cut off.
                DecryptError::Truncated {
                    complete_segments: index,
                }
            } else {
                // Sealed as final, presented as non-final: data was appended.
                DecryptError::TrailingData { final_index: index }
            };
        }
        let low = index.saturating_sub(DIAGNOSIS_WINDOW);
        let high = index
            .saturating_add(DIAGNOSIS_WINDOW)
            .min(self.max_segments.saturating_sub(1));
        for other in (low..=high).filter(|&j| j != index) {
            let Ok(other_counter) = u32::try_from(other) else {
                continue;
            };
            if self
                .cipher
                .open(other_counter, is_final, word, body, tag, scratch)
                .is_ok()
            {
                return if other < index {
                    DecryptError::Duplicated {
                        index,
                        copy_of: other,
                    }
                } else {
                    DecryptError::Reordered {
                        index,
                        found: other,
                    }
                };
            }
        }
        DecryptError::Forged { index }
    }

    /// At a segment's start: if the source holds the whole segment and `out`
    /// has room for its plaintext, authenticates and decrypts it from there
    /// into `out` and consumes it: `Some(plaintext length)`. `None` when it
    /// cannot (the segment is then read into the buffer as usual).
    fn open_in_place(
        &mut self,
        out: &mut [u8],
        source: &mut impl Source,
    ) -> Result<Option<usize>, DecryptError> {
        let held = source.buffered();
        if held.len() < SEGMENT_WORD_LEN {
            return Ok(None);
        }
        let State::Body { len, is_final } = self.parse_word(held)? else {
            return Err(DecryptError::Failed);
        };
        // word + len + tag: at most 16 MiB + 20, no overflow.
        let need = SEGMENT_WORD_LEN.saturating_add(len).saturating_add(TAG_LEN);
        let (Some(segment), Some(dst)) = (held.get(..need), out.get_mut(..len)) else {
            return Ok(None);
        };
        self.open_into(segment, len, is_final, dst)?;
        source.consume(need);
        self.advance(is_final);
        Ok(Some(len))
    }

    /// Fills `out` with authenticated plaintext; `Ok(0)` only at the verified
    /// end of the envelope (or for an empty `out`).
    pub(crate) fn poll_read(
        &mut self,
        out: &mut [u8],
        mut source: impl Source,
    ) -> Poll<Result<usize, DecryptError>> {
        if out.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            match self.state {
                State::Failed => return Poll::Ready(Err(DecryptError::Failed)),
                State::Done => return Poll::Ready(Ok(0)),
                State::AtEnd => {
                    if self.require_eof {
                        let mut probe = [0u8; 1];
                        match ready!(source.read(&mut probe)) {
                            Ok(0) => {}
                            Ok(_) => {
                                return self.fail(DecryptError::TrailingData {
                                    final_index: self.index,
                                })
                            }
                            Err(e) => return Poll::Ready(Err(DecryptError::Io(e))),
                        }
                    }
                    self.state = State::Done;
                }
                State::Plain { pos, len, is_final } => {
                    let available = self.pt.get(pos..len).unwrap_or_default();
                    if available.is_empty() {
                        self.advance(is_final);
                        continue;
                    }
                    let n = available.len().min(out.len());
                    let (Some(dst), Some(src)) = (out.get_mut(..n), available.get(..n)) else {
                        return self.fail(DecryptError::Failed);
                    };
                    dst.copy_from_slice(src);
                    let pos = pos.saturating_add(n);
                    if pos >= len {
                        if let Some(used) = self.pt.get_mut(..len) {
                            used.zeroize();
                        }
                        self.advance(is_final);
                    } else {
                        self.state = State::Plain { pos, len, is_final };
                    }
                    return Poll::Ready(Ok(n));
                }
                State::Word => {
                    if self.filled == 0 {
                        // A whole segment already in the source, and room for
                        // its plaintext: opened where it lies.
                        match self.open_in_place(out, &mut source) {
                            Ok(Some(0)) => continue,
                            Ok(Some(n)) => return Poll::Ready(Ok(n)),
                            Ok(None) => {}
                            Err(e) => return self.fail(e),
                        }
                    }
                    match ready!(self.fill(SEGMENT_WORD_LEN, &mut source)) {
                        Ok(true) => match self.parse_word(&self.ct) {
                            Ok(next) => self.state = next,
                            Err(e) => return self.fail(e),
                        },
                        Ok(false) => {}
                        Err(e @ DecryptError::Io(_)) => return Poll::Ready(Err(e)),
                        Err(e) => return self.fail(e),
                    }
                }
                State::Body { len, is_final } => {
                    // word + len + tag: at most 16 MiB + 20, no overflow.
                    let need = SEGMENT_WORD_LEN.saturating_add(len).saturating_add(TAG_LEN);
                    match ready!(self.fill(need, &mut source)) {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e @ DecryptError::Io(_)) => return Poll::Ready(Err(e)),
                        Err(e) => return self.fail(e),
                    }
                    if let Some(direct) = out.get_mut(..len) {
                        // The caller's buffer holds the whole segment: decrypt
                        // straight into it (AWS-LC zeroes it if the tag fails).
                        if let Err(e) = self.open_into(&self.ct, len, is_final, direct) {
                            return self.fail(e);
                        }
                        self.advance(is_final);
                        if len > 0 {
                            return Poll::Ready(Ok(len));
                        }
                    } else {
                        let mut pt = std::mem::take(&mut self.pt);
                        if pt.len() < self.segment_size {
                            pt.resize(self.segment_size, 0);
                        }
                        let result = match pt.get_mut(..len) {
                            Some(dst) => self.open_into(&self.ct, len, is_final, dst),
                            None => Err(DecryptError::Failed),
                        };
                        self.pt = pt;
                        if let Err(e) = result {
                            return self.fail(e);
                        }
                        self.state = State::Plain {
                            pos: 0,
                            len,
                            is_final,
                        };
                    }
                }
            }
        }
    }
}
