//! Moving a job's bulk bytes without copying them through the parent.
//!
//! The parent never needs the ciphertext it carries. On a job whose frames
//! no hook inspects (production: [`crate::hook::PassThrough`]) and whose
//! connection is a socket (TCP, Unix or vsock), the input goes from its
//! file to the socket with `sendfile(2)`, and the output from the socket to
//! its file with `splice(2)` through a pipe; only the frames' six-byte
//! headers and the enclave's small message frames pass through user
//! memory. Otherwise `job.rs` reads and writes whole frames.
//!
//! The socket is used through a second descriptor of its own
//! ([`Socket::duplicate`]), registered with the runtime like any socket:
//! readiness comes from the reactor, and the system calls are `rustix`'s
//! safe wrappers (no `unsafe` here; the crate forbids it). While the job's
//! bytes flow this way, nothing else reads or writes the stream.
//!
//! Writing to the output file (`splice` from the pipe) happens on the
//! runtime's thread: a regular file takes page-cache writes without
//! waiting on the device (flushing and allocating it run on a thread of
//! their own, [`crate::writebehind`]).

use std::fs::File;
use std::io::{self, ErrorKind};
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::pipe::SpliceFlags;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Most bytes a pipe is asked to hold (Linux's default `pipe-max-size`).
const PIPE_SIZE: usize = 1024 * 1024;

/// A job connection's socket, for sending from and receiving into files.
pub(crate) struct Socket {
    fd: AsyncFd<OwnedFd>,
}

impl Socket {
    /// A second descriptor of `socket` (already non-blocking, as the
    /// runtime's sockets are), registered with the runtime on its own.
    pub(crate) fn duplicate(socket: BorrowedFd<'_>) -> io::Result<Socket> {
        let fd = socket.try_clone_to_owned()?;
        // tokio 1.54 deprecated this safe constructor for the unsafe
        // `register_with_interest`, because an arbitrary `AsRawFd` type may
        // change or close its descriptor while registered. An `OwnedFd`
        // cannot: it owns the descriptor, keeps it open until it is
        // dropped, and always returns the same one, which is the whole
        // safety contract; this crate forbids `unsafe`.
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(fd, Interest::READABLE | Interest::WRITABLE)?;
        Ok(Socket { fd })
    }

    /// Write all of `bytes`.
    pub(crate) async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = self
                .fd
                .async_io(Interest::WRITABLE, |fd| {
                    rustix::net::send(fd, bytes, rustix::net::SendFlags::NOSIGNAL)
                        .map_err(io::Error::from)
                })
                .await?;
            if n == 0 {
                return Err(ErrorKind::WriteZero.into());
            }
            bytes = bytes.get(n..).unwrap_or_default();
        }
        Ok(())
    }

    /// Fill `buf` exactly; the peer closing first is `UnexpectedEof`.
    pub(crate) async fn read_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        let mut filled = 0usize;
        while filled < buf.len() {
            let into = buf.get_mut(filled..).unwrap_or_default();
            let n = self
                .fd
                .async_io(Interest::READABLE, |fd| {
                    rustix::net::recv(fd, &mut *into, rustix::net::RecvFlags::empty())
                        .map(|(n, _)| n)
                        .map_err(io::Error::from)
                })
                .await?;
            if n == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
            filled = filled.saturating_add(n);
        }
        Ok(())
    }

    /// Send `len` bytes of `file` from `*offset` (advanced as they go).
    /// A file that ends first is an error: the frame announcing them has
    /// been sent.
    pub(crate) async fn send_file(
        &self,
        file: &File,
        offset: &mut u64,
        len: usize,
    ) -> io::Result<()> {
        let mut left = len;
        while left > 0 {
            let n = self
                .fd
                .async_io(Interest::WRITABLE, |fd| {
                    rustix::fs::sendfile(fd, file, Some(&mut *offset), left)
                        .map_err(io::Error::from)
                })
                .await?;
            if n == 0 {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the input file became shorter while it was sent",
                ));
            }
            left = left.saturating_sub(n);
        }
        Ok(())
    }

    /// Move exactly `len` bytes from the socket to `file` (at its position)
    /// through `pipe`.
    pub(crate) async fn splice_to_file(
        &self,
        pipe: &Pipe,
        file: &File,
        len: usize,
    ) -> io::Result<()> {
        let mut left = len;
        while left > 0 {
            let want = left.min(pipe.capacity);
            let n = self
                .fd
                .async_io(Interest::READABLE, |fd| {
                    rustix::pipe::splice(
                        fd,
                        None,
                        &pipe.write,
                        None,
                        want,
                        SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
                    )
                    .map_err(io::Error::from)
                })
                .await?;
            if n == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
            // The pipe was empty and now holds exactly `n` bytes: drain them
            // all, so the next splice finds it empty again.
            let mut in_pipe = n;
            while in_pipe > 0 {
                let m =
                    rustix::pipe::splice(&pipe.read, None, file, None, in_pipe, SpliceFlags::MOVE)
                        .map_err(io::Error::from)?;
                if m == 0 {
                    return Err(ErrorKind::WriteZero.into());
                }
                in_pipe = in_pipe.saturating_sub(m);
            }
            left = left.saturating_sub(n);
        }
        Ok(())
    }
}

/// A pipe between the socket and the output file.
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// A pipe of up to [`PIPE_SIZE`] bytes (less if the system allows less).
    pub(crate) fn new() -> io::Result<Pipe> {
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let capacity = match rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE) {
            Ok(size) => size,
            Err(_) => rustix::pipe::fcntl_getpipe_size(&write)?,
        };
        Ok(Pipe {
            read,
            write,
            capacity: capacity.max(1),
        })
    }
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
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 253) as u8).collect()
    }

    fn file_with(data: &[u8]) -> File {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(data).unwrap();
        file.rewind().unwrap();
        file
    }

    #[tokio::test]
    async fn a_file_is_sent_whole_from_its_offset_and_a_short_one_is_an_error() {
        let (ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        let socket = Socket::duplicate(ours.as_fd()).unwrap();
        let data = bytes(3 * 1024 * 1024 + 17);
        let file = file_with(&data);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            theirs.read_to_end(&mut got).await.unwrap();
            got
        });
        socket.write_all(b"head").await.unwrap();
        let mut offset = 5u64;
        socket
            .send_file(&file, &mut offset, data.len() - 5)
            .await
            .unwrap();
        assert_eq!(offset, data.len() as u64);
        // The file has no more: asking for more is an error, not a hang.
        let err = socket.send_file(&file, &mut offset, 1).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
        drop(socket);
        drop(ours);
        let got = reader.await.unwrap();
        assert_eq!(&got[..4], b"head");
        assert_eq!(&got[4..], &data[5..]);
    }

    #[tokio::test]
    async fn spliced_bytes_land_in_the_file_and_the_rest_stays_on_the_socket() {
        let (ours, mut theirs) = tokio::net::UnixStream::pair().unwrap();
        let socket = Socket::duplicate(ours.as_fd()).unwrap();
        let data = bytes(5 * 1024 * 1024 / 2);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            theirs.write_all(&sent).await.unwrap();
            theirs.write_all(b"tail").await.unwrap();
            theirs
        });
        let pipe = Pipe::new().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        socket
            .splice_to_file(&pipe, &file, data.len())
            .await
            .unwrap();
        // Exactly the bytes asked for were taken: the next ones are there.
        let mut tail = [0u8; 4];
        socket.read_exact(&mut tail).await.unwrap();
        assert_eq!(&tail, b"tail");
        file.rewind().unwrap();
        let mut written = Vec::new();
        file.read_to_end(&mut written).unwrap();
        assert_eq!(written, data);

        // A peer that closes before the announced length is UnexpectedEof.
        let theirs = writer.await.unwrap();
        drop(theirs);
        let err = socket.splice_to_file(&pipe, &file, 10).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
        let err = socket.read_exact(&mut tail).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
    }
}
