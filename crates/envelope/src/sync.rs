//! Blocking `std::io` adapters over the sans-IO encoder and decoder.

use crate::error::{DecryptError, EncryptError};
use crate::header::{EnvelopeHeader, WrappedKey, DEFAULT_SEGMENT_SIZE};
use crate::key::DataKey;
use crate::open::{Decoder, Source};
use crate::seal::{Encoder, Sink};
use std::io::{self, BufRead, Read, Write};
use std::task::Poll;

/// A blocking call never returns `Pending`; should one (a bug), it becomes an
/// error, never a panic.
fn pending_error() -> io::Error {
    io::Error::other("a blocking envelope operation reported Pending")
}

/// A writer that can lend the end of its own buffer, so that
/// [`EnvelopeWriter::in_place`] seals segments straight into it rather
/// than into its segment buffer and then `write`s them: one copy of every
/// byte saved, where the output goes to a buffer anyway (a frame, a
/// message).
pub trait WriteInPlace: Write {
    /// Exactly `len` bytes that follow everything written so far, to be
    /// filled with the next output; or `None`, and the output comes through
    /// `write` instead.
    ///
    /// # Errors
    /// Whatever ends the writer (the output is then failed).
    fn room(&mut self, len: usize) -> io::Result<Option<&mut [u8]>>;

    /// The `len` bytes last lent by [`room`](Self::room) now hold output:
    /// they count as written.
    ///
    /// # Errors
    /// Whatever ends the writer (the output is then failed).
    fn commit(&mut self, len: usize) -> io::Result<()>;
}

/// `W`'s [`WriteInPlace`] methods, kept by a writer made with
/// [`EnvelopeWriter::in_place`].
struct Lend<W> {
    room: fn(&mut W, usize) -> io::Result<Option<&mut [u8]>>,
    commit: fn(&mut W, usize) -> io::Result<()>,
}

/// The encoder's sink over `W`: `write`, and room when `W` lends it.
struct Output<'a, W> {
    inner: &'a mut W,
    lend: Option<&'a Lend<W>>,
}

impl<W: Write> Sink for Output<'_, W> {
    fn write(&mut self, bytes: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(self.inner.write(bytes))
    }

    fn room(&mut self, len: usize) -> io::Result<Option<&mut [u8]>> {
        match self.lend {
            Some(lend) => (lend.room)(self.inner, len),
            None => Ok(None),
        }
    }

    fn commit(&mut self, len: usize) -> io::Result<()> {
        match self.lend {
            Some(lend) => (lend.commit)(self.inner, len),
            None => Ok(()),
        }
    }
}

/// Encrypts everything written to it into an envelope on `W`.
///
/// Memory is one segment buffer, whatever the stream length. The header is
/// written with the first data (or by [`finish`](Self::finish)). Full segments
/// are sealed and written as later data arrives; the last segment only by
/// [`finish`](Self::finish). **Dropping the writer without `finish` leaves a
/// truncated envelope**, which every reader rejects: an interrupted producer
/// can never yield a stream that looks complete.
///
/// `flush` writes sealed segments and flushes `W`, but cannot emit a partial
/// segment (segments are sealed only when full or final).
pub struct EnvelopeWriter<W: Write> {
    inner: W,
    core: Encoder,
    lend: Option<Lend<W>>,
}

impl<W: Write + std::fmt::Debug> std::fmt::Debug for EnvelopeWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvelopeWriter")
            .field("inner", &self.inner)
            .field("core", &self.core)
            .field("in_place", &self.lend.is_some())
            .finish()
    }
}

impl<W: Write> EnvelopeWriter<W> {
    /// A writer with the default 64 KiB segments and a fresh random salt.
    ///
    /// # Errors
    /// [`EncryptError::Random`] if the system generator fails.
    pub fn new(inner: W, key: &DataKey, wrapped: WrappedKey) -> Result<Self, EncryptError> {
        Self::with_segment_size(inner, key, wrapped, DEFAULT_SEGMENT_SIZE)
    }

    /// A writer with the given segment size (1 KiB..=16 MiB).
    ///
    /// # Errors
    /// [`EncryptError::Header`] for a segment size out of bounds,
    /// [`EncryptError::Random`] if the system generator fails.
    pub fn with_segment_size(
        inner: W,
        key: &DataKey,
        wrapped: WrappedKey,
        segment_size: u32,
    ) -> Result<Self, EncryptError> {
        Ok(Self {
            inner,
            core: Encoder::new(key, wrapped, segment_size)?,
            lend: None,
        })
    }

    /// From now on, seal each segment straight into room `W` lends
    /// ([`WriteInPlace`]), when it does. The envelope is the same.
    #[must_use]
    pub fn in_place(mut self) -> Self
    where
        W: WriteInPlace,
    {
        self.lend = Some(Lend {
            room: W::room,
            commit: W::commit,
        });
        self
    }

    /// The encoder's sink over `W`.
    fn output(&mut self) -> (&mut Encoder, Output<'_, W>) {
        (
            &mut self.core,
            Output {
                inner: &mut self.inner,
                lend: self.lend.as_ref(),
            },
        )
    }

    /// The envelope's header (already fixed, though perhaps not yet written).
    pub fn header(&self) -> &EnvelopeHeader {
        self.core.header()
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Seals and writes the final segment, flushes `W`, and returns it.
    ///
    /// # Errors
    /// [`EncryptError::Io`] from `W`; [`EncryptError::Failed`] after an earlier
    /// error.
    pub fn finish(mut self) -> Result<W, EncryptError> {
        loop {
            let (core, output) = self.output();
            match core.poll_finish(output) {
                Poll::Ready(Ok(())) => break,
                Poll::Ready(Err(EncryptError::Io(e))) if e.kind() == io::ErrorKind::Interrupted => {
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Err(EncryptError::Io(pending_error())),
            }
        }
        self.inner.flush().map_err(EncryptError::Io)?;
        Ok(self.inner)
    }

    #[cfg(test)]
    pub(crate) fn core_mut(&mut self) -> &mut Encoder {
        &mut self.core
    }
}

impl<W: Write> Write for EnvelopeWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (core, output) = self.output();
        match core.poll_write(buf, output) {
            Poll::Ready(result) => result.map_err(io::Error::from),
            Poll::Pending => Err(pending_error()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let (core, output) = self.output();
        match core.poll_flush(output) {
            Poll::Ready(result) => result.map_err(io::Error::from)?,
            Poll::Pending => return Err(pending_error()),
        }
        self.inner.flush()
    }
}

/// `R`'s [`BufRead`] methods, kept by a reader made with
/// [`EnvelopeReader::in_place`].
struct Peek<R> {
    fill_buf: fn(&mut R) -> io::Result<&[u8]>,
    consume: fn(&mut R, usize),
}

/// The decoder's source over `R`: `read`, and what `R` holds when it shows it.
struct Input<'a, R> {
    inner: &'a mut R,
    peek: Option<&'a Peek<R>>,
}

impl<R: Read> Source for Input<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(self.inner.read(buf))
    }

    fn buffered(&mut self) -> &[u8] {
        match self.peek {
            // An error here comes back from `read`.
            Some(peek) => (peek.fill_buf)(self.inner).unwrap_or_default(),
            None => &[],
        }
    }

    fn consume(&mut self, n: usize) {
        if let Some(peek) = self.peek {
            (peek.consume)(self.inner, n);
        }
    }
}

/// Decrypts an envelope read from `R`, yielding plaintext only for segments
/// that authenticated.
///
/// `read` returns `Ok(0)` only after the final segment authenticated and (by
/// default) `R` reached its end: a truncated, reordered, spliced or extended
/// stream ends in an error, never in an early clean EOF. After an error every
/// further call fails. Memory is one ciphertext segment buffer, plus one
/// plaintext segment buffer only if the caller reads into buffers smaller than
/// a segment (a buffer of at least the segment size receives the plaintext
/// directly); plaintext buffers are zeroized after use and on drop.
///
/// Errors from `read` are `io::Error`s wrapping a [`DecryptError`]
/// ([`DecryptError::from_io`] gets it back), of kind `UnexpectedEof` for
/// truncation and `InvalidData` for the rest; errors of `R` pass through.
pub struct EnvelopeReader<R: Read> {
    inner: R,
    core: Decoder,
    peek: Option<Peek<R>>,
}

impl<R: Read + std::fmt::Debug> std::fmt::Debug for EnvelopeReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvelopeReader")
            .field("inner", &self.inner)
            .field("core", &self.core)
            .field("in_place", &self.peek.is_some())
            .finish()
    }
}

impl<R: Read> EnvelopeReader<R> {
    /// Reads the header from `inner` and authenticates it under `key`.
    ///
    /// # Errors
    /// [`DecryptError::Header`] for a malformed header,
    /// [`DecryptError::WrongKey`], [`DecryptError::HeaderTampered`].
    pub fn new(mut inner: R, key: &DataKey) -> Result<Self, DecryptError> {
        let header = EnvelopeHeader::read_from(&mut inner)?;
        Self::with_header(inner, header, key)
    }

    /// Continues after [`EnvelopeHeader::read_from`] (the key broker needed
    /// the header to unwrap the key): authenticates `header` under `key`;
    /// `inner` must be positioned at the first segment.
    ///
    /// # Errors
    /// [`DecryptError::WrongKey`], [`DecryptError::HeaderTampered`].
    pub fn with_header(
        inner: R,
        header: EnvelopeHeader,
        key: &DataKey,
    ) -> Result<Self, DecryptError> {
        Ok(Self {
            inner,
            core: Decoder::new(header, key)?,
            peek: None,
        })
    }

    /// From now on, open each segment that `R` holds whole in its buffer
    /// ([`BufRead`]) where it lies, instead of copying it into the reader's
    /// buffer first (when the caller's buffer takes its whole plaintext).
    /// The checks and the plaintext are the same.
    #[must_use]
    pub fn in_place(mut self) -> Self
    where
        R: BufRead,
    {
        self.peek = Some(Peek {
            fill_buf: R::fill_buf,
            consume: R::consume,
        });
        self
    }

    /// The decoder's source over `R`.
    fn input(&mut self) -> (&mut Decoder, Input<'_, R>) {
        (
            &mut self.core,
            Input {
                inner: &mut self.inner,
                peek: self.peek.as_ref(),
            },
        )
    }

    /// Stops at the end of the envelope instead of requiring `R` to end there,
    /// for an envelope followed by other data on the same stream. The bytes
    /// after the envelope stay unread in `R` (see [`finish`](Self::finish)).
    pub fn stop_at_end(mut self) -> Self {
        self.core.set_require_eof(false);
        self
    }

    /// The authenticated header.
    pub fn header(&self) -> &EnvelopeHeader {
        self.core.header()
    }

    /// Whether the whole envelope has been read and verified.
    pub fn is_complete(&self) -> bool {
        self.core.is_complete()
    }

    /// Reads and verifies whatever is left (discarding its plaintext, which is
    /// zeroized), then returns `R`. Succeeds only for a complete, intact
    /// envelope.
    ///
    /// # Errors
    /// The first [`DecryptError`] met.
    pub fn finish(mut self) -> Result<R, DecryptError> {
        let mut scratch = zeroize::Zeroizing::new(vec![0u8; 4096]);
        loop {
            let (core, input) = self.input();
            match core.poll_read(&mut scratch, input) {
                Poll::Ready(Ok(0)) => return Ok(self.inner),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(DecryptError::Io(e))) if e.kind() == io::ErrorKind::Interrupted => {
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Err(DecryptError::Io(pending_error())),
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn core_mut(&mut self) -> &mut Decoder {
        &mut self.core
    }
}

impl<R: Read> Read for EnvelopeReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (core, input) = self.input();
        match core.poll_read(buf, input) {
            Poll::Ready(result) => result.map_err(io::Error::from),
            Poll::Pending => Err(pending_error()),
        }
    }
}

/// Encrypts `plaintext` into a new envelope in memory (default segment size).
///
/// # Errors
/// As [`EnvelopeWriter`].
pub fn encrypt_to_vec(
    key: &DataKey,
    wrapped: WrappedKey,
    plaintext: &[u8],
) -> Result<Vec<u8>, EncryptError> {
    let mut writer = EnvelopeWriter::new(Vec::new(), key, wrapped)?;
    writer.write_all(plaintext).map_err(into_encrypt_error)?;
    writer.finish()
}

/// Decrypts a whole envelope held in memory. The plaintext buffer is sized
/// once (never reallocated, so no unzeroized copy is left behind) and zeroized
/// when dropped.
///
/// # Errors
/// As [`EnvelopeReader`].
pub fn decrypt_to_vec(
    key: &DataKey,
    envelope: &[u8],
) -> Result<zeroize::Zeroizing<Vec<u8>>, DecryptError> {
    let mut reader = EnvelopeReader::new(envelope, key)?;
    // The plaintext is shorter than the envelope.
    let mut out = zeroize::Zeroizing::new(vec![0u8; envelope.len()]);
    let mut filled = 0;
    loop {
        let Some(dst) = out.get_mut(filled..) else {
            return Err(DecryptError::Failed);
        };
        match reader.read(dst) {
            Ok(0) if reader.is_complete() => break,
            Ok(0) => return Err(DecryptError::Failed),
            Ok(n) => filled = filled.saturating_add(n),
            Err(e) => return Err(into_decrypt_error(e)),
        }
    }
    out.truncate(filled);
    Ok(out)
}

fn into_encrypt_error(error: io::Error) -> EncryptError {
    if !error.get_ref().is_some_and(|e| e.is::<EncryptError>()) {
        return EncryptError::Io(error);
    }
    match error.into_inner().map(|e| e.downcast::<EncryptError>()) {
        Some(Ok(e)) => *e,
        _ => EncryptError::Failed,
    }
}

fn into_decrypt_error(error: io::Error) -> DecryptError {
    if !error.get_ref().is_some_and(|e| e.is::<DecryptError>()) {
        return DecryptError::Io(error);
    }
    match error.into_inner().map(|e| e.downcast::<DecryptError>()) {
        Some(Ok(e)) => *e,
        _ => DecryptError::Failed,
    }
}
