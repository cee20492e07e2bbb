//! The channel's framing on the byte stream: a 4-byte big-endian length,
//! then the JSON message. Oversized frames are read past and reported, so
//! one bad message does not end the connection; absurd lengths do.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Frames beyond this many times `max_message` end the connection instead
/// of being skipped.
pub(super) const SKIP_LIMIT_FACTOR: usize = 16;

pub(super) enum Frame {
    Data(Vec<u8>),
    Skipped(usize),
}

/// Reads one length-prefixed frame; frames over `max` are read past and
/// reported by size, so the connection survives them.
pub(super) async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    max: usize,
) -> std::io::Result<Frame> {
    let len = rd.read_u32().await? as usize;
    if len > max {
        if len <= max * SKIP_LIMIT_FACTOR {
            let skipped = tokio::io::copy(&mut rd.take(len as u64), &mut tokio::io::sink()).await?;
            if skipped < len as u64 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        return Ok(Frame::Skipped(len));
    }
    let mut buf = vec![0; len];
    rd.read_exact(&mut buf).await?;
    Ok(Frame::Data(buf))
}

pub(super) async fn write_frame<W: AsyncWrite + Unpin>(
    wr: &mut W,
    frame: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(frame.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    wr.write_u32(len).await?;
    wr.write_all(frame).await
}

/// Writes one raw frame (tests and tools that speak the framing directly).
pub async fn write_raw_frame<W: AsyncWrite + Unpin>(
    wr: &mut W,
    frame: &[u8],
) -> std::io::Result<()> {
    write_frame(wr, frame).await?;
    wr.flush().await
}

/// Reads one raw frame of at most `max` bytes.
pub async fn read_raw_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    match read_frame(rd, max).await? {
        Frame::Data(d) => Ok(Some(d)),
        Frame::Skipped(_) => Ok(None),
    }
}
