//! Length-delimited postcard frames with a magic number and a version.

use super::MAX_FRAME_BYTES;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
    let mut header = [0u8; HEADER];
    let mut filled = 0;
    while filled < HEADER {
        let n = reader.read(&mut header[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
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
    let mut body = vec![0u8; len];
    reader
        .read_exact(&mut body)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
            _ => FrameError::Io(e),
        })?;
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
}
