//! tokio `AsyncRead` / `AsyncWrite` adapters over the same sans-IO encoder and
//! decoder as the blocking ones (identical format, checks and errors).
//!
//! Sealing and opening run inline in `poll_*` (tens of microseconds per 64 KiB
//! segment), which is fine on a runtime worker.

use crate::error::{DecryptError, EncryptError};
use crate::header::{EnvelopeHeader, WrappedKey, DEFAULT_SEGMENT_SIZE};
use crate::key::DataKey;
use crate::open::Decoder;
use crate::seal::Encoder;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

fn poll_write_to<W: AsyncWrite + Unpin>(
    inner: &mut W,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    Pin::new(inner).poll_write(cx, buf)
}

fn poll_read_from<R: AsyncRead + Unpin>(
    inner: &mut R,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Poll<io::Result<usize>> {
    let mut read_buf = ReadBuf::new(buf);
    ready!(Pin::new(inner).poll_read(cx, &mut read_buf))?;
    Poll::Ready(Ok(read_buf.filled().len()))
}

/// The async counterpart of [`EnvelopeWriter`](crate::EnvelopeWriter).
///
/// `poll_shutdown` seals and writes the final segment, then shuts `W` down;
/// [`finish`](Self::finish) does the same but flushes instead of shutting down
/// and returns `W`. Dropping the writer before either leaves a truncated
/// envelope, which readers reject.
#[derive(Debug)]
pub struct AsyncEnvelopeWriter<W: AsyncWrite + Unpin> {
    inner: W,
    core: Encoder,
}

impl<W: AsyncWrite + Unpin> AsyncEnvelopeWriter<W> {
    /// A writer with the default 64 KiB segments. Writes nothing yet.
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
        })
    }

    /// The envelope's header.
    pub fn header(&self) -> &EnvelopeHeader {
        self.core.header()
    }

    /// Seals and writes the final segment, flushes `W`, and returns it.
    ///
    /// # Errors
    /// [`EncryptError::Io`] from `W`; [`EncryptError::Failed`] after an
    /// earlier error.
    pub async fn finish(mut self) -> Result<W, EncryptError> {
        std::future::poll_fn(|cx| {
            let Self { inner, core } = &mut self;
            core.poll_finish(|b: &[u8]| poll_write_to(inner, cx, b))
        })
        .await?;
        tokio::io::AsyncWriteExt::flush(&mut self.inner)
            .await
            .map_err(EncryptError::Io)?;
        Ok(self.inner)
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for AsyncEnvelopeWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Self { inner, core } = self.get_mut();
        core.poll_write(buf, |b: &[u8]| poll_write_to(inner, cx, b))
            .map_err(io::Error::from)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Self { inner, core } = self.get_mut();
        ready!(core.poll_flush(|b: &[u8]| poll_write_to(inner, cx, b))).map_err(io::Error::from)?;
        Pin::new(inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Self { inner, core } = self.get_mut();
        ready!(core.poll_finish(|b: &[u8]| poll_write_to(inner, cx, b)))
            .map_err(io::Error::from)?;
        Pin::new(inner).poll_shutdown(cx)
    }
}

/// The async counterpart of [`EnvelopeReader`](crate::EnvelopeReader): the
/// same guarantees (plaintext only from authenticated segments, a clean end
/// only for a complete envelope, errors wrapping [`DecryptError`]).
#[derive(Debug)]
pub struct AsyncEnvelopeReader<R: AsyncRead + Unpin> {
    inner: R,
    core: Decoder,
}

impl<R: AsyncRead + Unpin> AsyncEnvelopeReader<R> {
    /// Reads the header and authenticates it under `key`.
    ///
    /// # Errors
    /// [`DecryptError::Header`], [`DecryptError::WrongKey`],
    /// [`DecryptError::HeaderTampered`].
    pub async fn new(mut inner: R, key: &DataKey) -> Result<Self, DecryptError> {
        let header = EnvelopeHeader::read_from_async(&mut inner).await?;
        Self::with_header(inner, header, key)
    }

    /// Continues after [`EnvelopeHeader::read_from_async`]; see
    /// [`EnvelopeReader::with_header`](crate::EnvelopeReader::with_header).
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
        })
    }

    /// See [`EnvelopeReader::stop_at_end`](crate::EnvelopeReader::stop_at_end).
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

    /// Reads and verifies the rest (its plaintext is discarded and zeroized),
    /// then returns `R`.
    ///
    /// # Errors
    /// The first [`DecryptError`] met.
    pub async fn finish(mut self) -> Result<R, DecryptError> {
        let mut scratch = zeroize::Zeroizing::new(vec![0u8; 4096]);
        loop {
            let n = std::future::poll_fn(|cx| {
                let Self { inner, core } = &mut self;
                core.poll_read(&mut scratch, |b: &mut [u8]| poll_read_from(inner, cx, b))
            })
            .await;
            match n {
                Ok(0) => return Ok(self.inner),
                Ok(_) => {}
                Err(DecryptError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for AsyncEnvelopeReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Self { inner, core } = self.get_mut();
        let out = buf.initialize_unfilled();
        let n = ready!(core.poll_read(out, |b: &mut [u8]| poll_read_from(inner, cx, b)))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}
