//! Frame hooks: the parent's view of the traffic it carries.
//!
//! The parent moves whole frames and understands none of them. A hook sees
//! each frame (length prefix included) and returns the frames to pass on.
//! Production uses [`PassThrough`]; tests use [`Recorder`] to prove that
//! nothing readable crosses the parent, and their own hooks to play a
//! hostile parent (alter, drop, duplicate, reorder, replay).

use std::sync::{Arc, Mutex};

/// Which connection a frame travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Parent ↔ enclave: the job (input and output envelopes).
    Job,
    /// Enclave ↔ verifier, relayed by the parent: key release.
    Verifier,
}

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Towards the enclave (from the parent, or from the verifier).
    ToEnclave,
    /// From the enclave (to the parent, or to the verifier).
    FromEnclave,
}

/// Sees every frame the parent carries.
pub trait FrameHook: Send + Sync {
    /// `frame` is one whole frame (prefix, version, message); the frames
    /// returned are sent on in its place, in order.
    fn on_frame(&self, channel: Channel, direction: Direction, frame: Vec<u8>) -> Vec<Vec<u8>>;

    /// True only for a hook that passes every frame on unchanged: then the
    /// job's bulk bytes need not be shown to it, and move between files
    /// and the socket in the kernel (`sendfile`, `splice`).
    fn passes_through(&self) -> bool {
        false
    }
}

/// Passes every frame on unchanged.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThrough;

impl FrameHook for PassThrough {
    fn on_frame(&self, _: Channel, _: Direction, frame: Vec<u8>) -> Vec<Vec<u8>> {
        vec![frame]
    }

    fn passes_through(&self) -> bool {
        true
    }
}

/// Records every byte carried, then hands the frame to an inner hook.
pub struct Recorder {
    inner: Arc<dyn FrameHook>,
    log: Mutex<Vec<(Channel, Direction, Vec<u8>)>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("frames", &self.frames())
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// A recorder that passes frames on unchanged.
    pub fn new() -> Self {
        Recorder::wrapping(Arc::new(PassThrough))
    }

    /// A recorder in front of `inner`.
    pub fn wrapping(inner: Arc<dyn FrameHook>) -> Self {
        Recorder {
            inner,
            log: Mutex::new(Vec::new()),
        }
    }

    /// How many frames were recorded.
    pub fn frames(&self) -> usize {
        self.log.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Every recorded frame's bytes, concatenated, per channel.
    pub fn bytes(&self, channel: Channel) -> Vec<u8> {
        let Ok(log) = self.log.lock() else {
            return Vec::new();
        };
        log.iter()
            .filter(|(c, _, _)| *c == channel)
            .flat_map(|(_, _, f)| f.iter().copied())
            .collect()
    }

    /// Every recorded frame, in order.
    pub fn frames_of(&self, channel: Channel, direction: Direction) -> Vec<Vec<u8>> {
        let Ok(log) = self.log.lock() else {
            return Vec::new();
        };
        log.iter()
            .filter(|(c, d, _)| *c == channel && *d == direction)
            .map(|(_, _, f)| f.clone())
            .collect()
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl FrameHook for Recorder {
    fn on_frame(&self, channel: Channel, direction: Direction, frame: Vec<u8>) -> Vec<Vec<u8>> {
        if let Ok(mut log) = self.log.lock() {
            log.push((channel, direction, frame.clone()));
        }
        self.inner.on_frame(channel, direction, frame)
    }
}

/// Read one whole frame (header included, checked by the protocol's one
/// frame codec), or `None` at a clean end of stream.
pub(crate) async fn read_raw_frame<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    max_frame_len: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut frame = Vec::new();
    Ok(read_raw_frame_into(reader, max_frame_len, &mut frame)
        .await?
        .then_some(frame))
}

/// [`read_raw_frame`] into `frame`, reusing its allocation; `false` at a
/// clean end of stream.
pub(crate) async fn read_raw_frame_into<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    max_frame_len: usize,
    frame: &mut Vec<u8>,
) -> std::io::Result<bool> {
    match kluis_proto::read_raw_frame_into(reader, max_frame_len, frame).await {
        Ok(()) => Ok(true),
        Err(kluis_proto::FrameError::Closed) => Ok(false),
        Err(kluis_proto::FrameError::Io(e)) => Err(e),
        Err(kluis_proto::FrameError::Truncated { .. }) => {
            Err(std::io::ErrorKind::UnexpectedEof.into())
        }
        Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
    }
}
