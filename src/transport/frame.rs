//! Length-delimited postcard frames with a magic number and a version.

use super::MAX_FRAME_BYTES;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub const MAGIC: &[u8; 3] = b"GKV";
pub const VERSION: u8 = 1;
const HEADER: usize = 8;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a gossipkv frame (magic {0:02x?})")]
    BadMagic([u8; 3]),
    #[error("frame protocol version {0} is not supported (this build speaks {VERSION})")]
    Version(u8),
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("undecodable frame: {0}")]
    Decode(String),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("frame of {len} bytes exceeds this stream's limit of {limit}")]
    OverLimit { len: usize, limit: usize },
    #[error("frame stalled: not complete within {0:?} of its first byte")]
    Stalled(Duration),
}

/// Encodes one frame.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let body = postcard::to_allocvec(message).map_err(|e| FrameError::Decode(e.to_string()))?;
    if body.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

pub async fn write<T: Serialize, W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &T,
) -> Result<(), FrameError> {
    writer.write_all(&encode(message)?).await?;
    Ok(())
}

/// Reads one frame; `Ok(None)` at a clean end of stream between frames.
pub async fn read<T: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<T>, FrameError> {
    Ok(read_sized(reader).await?.map(|(message, _)| message))
}

/// Like [`read`], also returning the frame's size in bytes.
pub async fn read_sized<T: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<(T, usize)>, FrameError> {
    read_limited(reader, &ReadLimits::default()).await
}

/// Bytes read from the stream per step: the body buffer grows by at most
/// this much (or doubles) at a time, never to the announced length at once.
const CHUNK: usize = 64 * 1024;

/// Bounds on reading one frame (see [`read_limited`]).
#[derive(Clone, Debug)]
pub struct ReadLimits {
    /// The largest body accepted (at most [`MAX_FRAME_BYTES`]).
    pub max_len: usize,
    /// Time allowed from the frame's first byte to its last, not counting
    /// waits for `budget`.
    pub timeout: Option<Duration>,
    /// Bytes of frames being read: a frame reserves its announced length
    /// here before its body is read, and gives it back when read.
    pub budget: Option<Arc<Semaphore>>,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_len: MAX_FRAME_BYTES,
            timeout: None,
            budget: None,
        }
    }
}

/// Runs `f` until `deadline` (none: unbounded, and no timer is needed).
async fn until<F: Future>(
    deadline: Option<(Instant, Duration)>,
    f: F,
) -> Result<F::Output, FrameError> {
    match deadline {
        None => Ok(f.await),
        Some((at, timeout)) => tokio::time::timeout_at(at, f)
            .await
            .map_err(|_| FrameError::Stalled(timeout)),
    }
}

/// Reads one frame within `limits`; `Ok(None)` at a clean end of stream
/// between frames. Waiting for a frame's first byte is not bounded (an idle
/// stream is fine); from then on the frame must be complete within the
/// timeout. Memory held is at most the bytes that arrived (plus one
/// 64 KiB step), and a body is read only once its whole length is reserved
/// in the budget, waiting for it while holding none of it.
pub async fn read_limited<T: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
    limits: &ReadLimits,
) -> Result<Option<(T, usize)>, FrameError> {
    let mut header = [0u8; HEADER];
    let first = reader.read(&mut header).await?;
    if first == 0 {
        return Ok(None);
    }
    let mut deadline = limits
        .timeout
        .map(|timeout| (Instant::now() + timeout, timeout));
    let mut filled = first;
    while filled < HEADER {
        let n = until(deadline, reader.read(&mut header[filled..])).await??;
        if n == 0 {
            return Err(FrameError::Truncated);
        }
        filled += n;
    }
    let magic = [header[0], header[1], header[2]];
    if &magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if header[3] != VERSION {
        return Err(FrameError::Version(header[3]));
    }
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    if len > limits.max_len {
        return Err(FrameError::OverLimit {
            len,
            limit: limits.max_len,
        });
    }
    let _reserved = match &limits.budget {
        Some(budget) => {
            let waiting = Instant::now();
            // len <= MAX_FRAME_BYTES, so it fits a u32.
            let permit = budget
                .clone()
                .acquire_many_owned(len as u32)
                .await
                .map_err(|_| FrameError::Io(std::io::ErrorKind::BrokenPipe.into()))?;
            // The wait was for other frames, not this sender: not counted.
            if let Some((at, _)) = &mut deadline {
                *at += waiting.elapsed();
            }
            Some(permit)
        }
        None => None,
    };
    let mut body: Vec<u8> = Vec::new();
    while body.len() < len {
        let start = body.len();
        let step = (len - start).min(CHUNK);
        if body.capacity() < start + step {
            // Double (amortised), but never past the announced length.
            let target = (start * 2).max(start + step).min(len);
            body.reserve_exact(target - start);
        }
        body.resize(start + step, 0);
        let n = until(deadline, reader.read(&mut body[start..])).await??;
        body.truncate(start + n);
        if n == 0 {
            return Err(FrameError::Truncated);
        }
    }
    let message = postcard::from_bytes(&body).map_err(|e| FrameError::Decode(e.to_string()))?;
    Ok(Some((message, HEADER + len)))
}

/// Reads one frame from bytes in memory, as [`read_sized`] reads a stream
/// (reading a slice never waits, so this needs no runtime).
pub fn read_from_slice<T: DeserializeOwned>(
    bytes: &mut &[u8],
) -> Result<Option<(T, usize)>, FrameError> {
    let read = std::pin::pin!(read_sized(bytes));
    match read.poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(result) => result,
        // Unreachable: `&[u8]` is always ready.
        std::task::Poll::Pending => Err(FrameError::Truncated),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(bytes: &[u8]) -> Result<Option<(u32, String)>, FrameError> {
        let mut reader = bytes;
        read(&mut reader).await
    }

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_named() {
        let frame = encode(&(7u32, "hello".to_string())).unwrap();
        assert_eq!(
            read_all(&frame).await.unwrap(),
            Some((7, "hello".to_string()))
        );
        assert!(read_all(&[]).await.unwrap().is_none());
        assert!(matches!(
            read_all(b"XYZ\x01\0\0\0\0").await,
            Err(FrameError::BadMagic(_))
        ));
        assert!(matches!(
            read_all(b"GKV\x09\0\0\0\0").await,
            Err(FrameError::Version(9))
        ));
        assert!(matches!(
            read_all(b"GKV\x01\xff\xff\xff\xff").await,
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            read_all(&frame[..frame.len() - 1]).await,
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read_all(&frame[..5]).await,
            Err(FrameError::Truncated)
        ));
        let mut garbage = frame.clone();
        garbage[8] = 0xff;
        garbage[9] = 0xff;
        assert!(read_all(&garbage).await.is_err());
    }

    /// A reader that hands out `data` and then stalls (never ends), and
    /// records the largest buffer it was asked to fill.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        largest_ask: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.largest_ask = self.largest_ask.max(buf.remaining());
            if self.at == self.data.len() {
                return std::task::Poll::Pending;
            }
            let n = buf.remaining().min(self.data.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn announcing(len: u32, sent: usize) -> Trickle {
        let mut data = b"GKV\x01".to_vec();
        data.extend_from_slice(&len.to_be_bytes());
        data.resize(HEADER + sent, 7);
        Trickle {
            data,
            at: 0,
            largest_ask: 0,
        }
    }

    #[tokio::test]
    async fn a_stalled_frame_times_out_and_its_buffer_grows_only_as_bytes_arrive() {
        let budget = Arc::new(Semaphore::new(MAX_FRAME_BYTES));
        let limits = ReadLimits {
            timeout: Some(Duration::from_millis(200)),
            budget: Some(budget.clone()),
            ..ReadLimits::default()
        };
        let mut stalled = announcing(16 * 1024 * 1024, 300_000);
        let result = read_limited::<Vec<u8>, _>(&mut stalled, &limits).await;
        assert!(matches!(result, Err(FrameError::Stalled(_))), "{result:?}");
        assert_eq!(stalled.at, stalled.data.len(), "read what arrived");
        // Never asked for the announced 16 MiB at once: chunks.
        assert!(stalled.largest_ask <= CHUNK, "{}", stalled.largest_ask);
        // The reservation was given back with the frame.
        assert_eq!(budget.available_permits(), MAX_FRAME_BYTES);

        // A header that never completes stalls too; a silent stream does not.
        let mut half_header = announcing(10, 0);
        half_header.data.truncate(3);
        let result = read_limited::<Vec<u8>, _>(&mut half_header, &limits).await;
        assert!(matches!(result, Err(FrameError::Stalled(_))), "{result:?}");
        let mut silent = announcing(10, 0);
        silent.data.clear();
        let idle = tokio::time::timeout(
            Duration::from_millis(400),
            read_limited::<Vec<u8>, _>(&mut silent, &limits),
        )
        .await;
        assert!(
            idle.is_err(),
            "an idle stream between frames is not a stall"
        );
    }

    #[tokio::test]
    async fn a_frame_waits_for_budget_without_holding_any_and_limits_apply() {
        let frame = encode(&vec![1u8; 100_000]).unwrap();
        let budget = Arc::new(Semaphore::new(150_000));
        let limits = ReadLimits {
            timeout: Some(Duration::from_secs(30)),
            budget: Some(budget.clone()),
            ..ReadLimits::default()
        };
        let held = budget.clone().acquire_many_owned(100_000).await.unwrap();
        let mut reader = frame.as_slice();
        let read = tokio::spawn({
            let limits = limits.clone();
            let frame = frame.clone();
            async move {
                let mut reader = frame.as_slice();
                read_limited::<Vec<u8>, _>(&mut reader, &limits).await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !read.is_finished(),
            "read past a budget that cannot hold it"
        );
        drop(held);
        let (value, size) = read.await.unwrap().unwrap().unwrap();
        assert_eq!((value.len(), size), (100_000, frame.len()));
        assert_eq!(budget.available_permits(), 150_000);
        let small = ReadLimits {
            max_len: 1000,
            ..ReadLimits::default()
        };
        assert!(matches!(
            read_limited::<Vec<u8>, _>(&mut reader, &small).await,
            Err(FrameError::OverLimit { limit: 1000, .. })
        ));
    }
}
