//! A small SPDY/3.1 codec for tests: enough of the protocol to run `kubectl exec`
//! the way kubectl and the kubelet run it over an `Upgrade: SPDY/3.1` connection.
//!
//! The wire follows the SPDY Protocol Draft 3.1
//! (<https://www.chromium.org/spdy/spdy-protocol/spdy-protocol-draft3-1/>): 8-byte
//! frame heads, control frames (`SYN_STREAM`, `SYN_REPLY`, `RST_STREAM`, `SETTINGS`,
//! `PING`, `GOAWAY`, `HEADERS`, `WINDOW_UPDATE`) and data frames with `FIN`, and
//! name/value header blocks compressed with zlib primed with the draft's dictionary
//! (section 2.6.10.1), one compression context per direction per connection. On top
//! of it, Kubernetes' remotecommand protocol (`k8s.io/apimachinery/pkg/util/remotecommand`,
//! `k8s.io/client-go/tools/remotecommand` v4, the kubelet's
//! `pkg/kubelet/cri/streaming/remotecommand`) opens one client stream per
//! `streamType` header (`error`, `stdin`, `stdout`, `stderr`, `resize`); see
//! [`crate::kubectl::exec_spdy`] and the fixture kubelet.
//!
//! Flow control: like the Go implementation both sides of Kubernetes use
//! (moby/spdystream), senders here do not hold back on the peer's window;
//! receivers still return `WINDOW_UPDATE`s for what they consumed. Memory stays
//! bounded because each frame is checked against [`MAX_DATA_LEN`] or
//! [`MAX_CONTROL_LEN`] before it is buffered and a decompressed header block
//! against [`MAX_HEADER_BLOCK`]; readers apply TCP backpressure.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

mod headers;
#[cfg(test)]
mod tests;

pub use headers::{DICTIONARY, DICTIONARY_LEN, HeaderDeflater, HeaderInflater};

/// The protocol version in every control frame.
pub const VERSION: u16 = 3;
/// Largest data frame payload accepted (the draft allows 2^24-1; kubectl and the
/// kubelet write 32 KiB).
pub const MAX_DATA_LEN: usize = 1 << 20;
/// Largest control frame payload accepted.
pub const MAX_CONTROL_LEN: usize = 64 * 1024;
/// Largest decompressed header block accepted.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Most name/value pairs accepted in one header block.
pub const MAX_HEADER_PAIRS: usize = 256;
/// Every stream's and the session's window at the start (draft 3.1, 2.6.8).
pub const INITIAL_WINDOW: u32 = 64 * 1024;
/// A stream ends in this direction with this frame (data, `SYN_STREAM`, `SYN_REPLY`,
/// `HEADERS`).
pub const FLAG_FIN: u8 = 0x01;

/// `RST_STREAM` status: the peer broke the protocol on this stream.
pub const RST_PROTOCOL_ERROR: u32 = 1;
/// `RST_STREAM` status: the stream was not accepted.
pub const RST_REFUSED_STREAM: u32 = 3;
/// `GOAWAY` status: a normal end.
pub const GOAWAY_OK: u32 = 0;
/// `GOAWAY` status: the peer broke the protocol.
pub const GOAWAY_PROTOCOL_ERROR: u32 = 1;
/// `GOAWAY` status: this side failed.
pub const GOAWAY_INTERNAL_ERROR: u32 = 2;

const HEAD_LEN: usize = 8;
const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// A header block: lowercase names, values as sent (several values of one name are
/// NUL-separated in one value, as the draft says).
pub type Headers = Vec<(String, String)>;

/// One SPDY frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Opens a stream (`FIN` half-closes it at once).
    SynStream {
        /// Odd when the client opens it, even when the server does.
        stream_id: u32,
        /// 0 unless server push.
        associated_id: u32,
        /// 0 (highest) to 7.
        priority: u8,
        /// [`FLAG_FIN`], and `0x02` for unidirectional.
        flags: u8,
        /// The stream's headers.
        headers: Headers,
    },
    /// Accepts a stream.
    SynReply {
        /// The stream accepted.
        stream_id: u32,
        /// [`FLAG_FIN`] or 0.
        flags: u8,
        /// The reply's headers.
        headers: Headers,
    },
    /// Ends a stream abnormally.
    RstStream {
        /// The stream ended.
        stream_id: u32,
        /// Why, e.g. [`RST_PROTOCOL_ERROR`].
        status: u32,
    },
    /// Session settings.
    Settings {
        /// `0x01` clears persisted settings.
        flags: u8,
        /// `(flags, 24-bit id, value)` entries.
        entries: Vec<(u8, u32, u32)>,
    },
    /// A liveness check the receiver echoes.
    Ping {
        /// Odd from the client, even from the server.
        id: u32,
    },
    /// The sender is done with the session.
    GoAway {
        /// The last stream the sender accepted.
        last_good_stream_id: u32,
        /// [`GOAWAY_OK`], [`GOAWAY_PROTOCOL_ERROR`] or [`GOAWAY_INTERNAL_ERROR`].
        status: u32,
    },
    /// More headers for a stream.
    Headers {
        /// The stream.
        stream_id: u32,
        /// [`FLAG_FIN`] or 0.
        flags: u8,
        /// The headers.
        headers: Headers,
    },
    /// The receiver consumed `delta` more bytes of a stream (or, on stream 0, the
    /// session).
    WindowUpdate {
        /// The stream, or 0 for the session window (3.1).
        stream_id: u32,
        /// 1 to 2^31-1.
        delta: u32,
    },
    /// Stream bytes.
    Data {
        /// The stream.
        stream_id: u32,
        /// [`FLAG_FIN`] or 0.
        flags: u8,
        /// The payload.
        data: Bytes,
    },
    /// A control frame of a type this codec does not know; the draft says to ignore it.
    Unknown {
        /// Its type field.
        kind: u16,
    },
}

impl Frame {
    /// True if the frame carries [`FLAG_FIN`].
    pub fn is_fin(&self) -> bool {
        match self {
            Frame::SynStream { flags, .. }
            | Frame::SynReply { flags, .. }
            | Frame::Headers { flags, .. }
            | Frame::Data { flags, .. } => flags & FLAG_FIN != 0,
            _ => false,
        }
    }
}

/// What went wrong reading or writing SPDY. Every variant but [`SpdyError::Io`] and
/// [`SpdyError::Timeout`] is the peer breaking the protocol (a `GOAWAY` with
/// [`GOAWAY_PROTOCOL_ERROR`] is the answer).
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    /// The connection failed.
    #[error("spdy connection: {0}")]
    Io(#[from] std::io::Error),
    /// A read or write took longer than allowed.
    #[error("spdy connection timed out")]
    Timeout,
    /// The connection ended inside a frame.
    #[error("spdy connection ended inside a frame ({have} of {want} bytes)")]
    Truncated {
        /// Bytes received of the frame.
        have: usize,
        /// Bytes the frame needs.
        want: usize,
    },
    /// A frame's length is over our limit; checked before buffering it.
    #[error("spdy frame of {len} bytes is over the {limit} byte limit")]
    FrameTooLarge {
        /// The length field.
        len: usize,
        /// The limit for this kind of frame.
        limit: usize,
    },
    /// A control frame of another version.
    #[error("spdy version {0} is not supported")]
    Version(u16),
    /// A control frame whose length does not fit its type.
    #[error("spdy frame type {kind} with bad length {len}")]
    BadLength {
        /// The frame type.
        kind: u16,
        /// Its length.
        len: usize,
    },
    /// Stream id 0 where a stream is required, or a zero window delta.
    #[error("spdy frame type {kind}: {what}")]
    BadField {
        /// The frame type (0 for data).
        kind: u16,
        /// What is wrong.
        what: &'static str,
    },
    /// The header block does not decompress.
    #[error("spdy header block does not decompress: {0}")]
    Compression(String),
    /// The decompressed header block is malformed or too large.
    #[error("spdy header block: {0}")]
    HeaderBlock(&'static str),
}

/// The value of header `name` (names compare case-insensitively).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------------------
// Frames

/// Decodes frames from bytes as they arrive; owns the inbound header context.
#[derive(Default)]
pub struct Decoder {
    inflater: HeaderInflater,
}

impl Decoder {
    /// The next whole frame at the front of `buf`, or `None` if more bytes are
    /// needed. The length is checked before the payload is awaited.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, SpdyError> {
        let Some(len) = Self::needed(buf)? else {
            return Ok(None);
        };
        if buf.len() < HEAD_LEN + len {
            return Ok(None);
        }
        let head = buf.split_to(HEAD_LEN);
        let payload = buf.split_to(len).freeze();
        self.frame(&head, payload).map(Some)
    }

    /// The payload length of the frame at the front of `buf`, once its head is there.
    fn needed(buf: &[u8]) -> Result<Option<usize>, SpdyError> {
        if buf.len() < HEAD_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
        let limit = if buf[0] & 0x80 != 0 {
            MAX_CONTROL_LEN
        } else {
            MAX_DATA_LEN
        };
        if len > limit {
            return Err(SpdyError::FrameTooLarge { len, limit });
        }
        Ok(Some(len))
    }

    fn frame(&mut self, head: &[u8], mut p: Bytes) -> Result<Frame, SpdyError> {
        let flags = head[4];
        let len = p.len();
        if head[0] & 0x80 == 0 {
            let stream_id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            if stream_id == 0 {
                return Err(SpdyError::BadField {
                    kind: 0,
                    what: "data on stream 0",
                });
            }
            return Ok(Frame::Data {
                stream_id,
                flags,
                data: p,
            });
        }
        let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
        if version != VERSION {
            return Err(SpdyError::Version(version));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let bad_len = SpdyError::BadLength { kind, len };
        let stream = |p: &mut Bytes| -> Result<u32, SpdyError> {
            match p.get_u32() & 0x7fff_ffff {
                0 => Err(SpdyError::BadField {
                    kind,
                    what: "stream id 0",
                }),
                id => Ok(id),
            }
        };
        let frame = match kind {
            TYPE_SYN_STREAM => {
                if len < 10 {
                    return Err(bad_len);
                }
                let stream_id = stream(&mut p)?;
                let associated_id = p.get_u32() & 0x7fff_ffff;
                let priority = p.get_u8() >> 5;
                let _slot = p.get_u8();
                Frame::SynStream {
                    stream_id,
                    associated_id,
                    priority,
                    flags,
                    headers: self.inflater.inflate(&p)?,
                }
            }
            TYPE_SYN_REPLY | TYPE_HEADERS => {
                if len < 4 {
                    return Err(bad_len);
                }
                let stream_id = stream(&mut p)?;
                let headers = self.inflater.inflate(&p)?;
                if kind == TYPE_SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        flags,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        flags,
                        headers,
                    }
                }
            }
            TYPE_RST_STREAM => {
                if len != 8 {
                    return Err(bad_len);
                }
                Frame::RstStream {
                    stream_id: stream(&mut p)?,
                    status: p.get_u32(),
                }
            }
            TYPE_SETTINGS => {
                if len < 4
                    || !(len - 4).is_multiple_of(8)
                    || p.clone().get_u32() as usize != (len - 4) / 8
                {
                    return Err(bad_len);
                }
                p.advance(4);
                let entries = (0..(len - 4) / 8)
                    .map(|_| {
                        let id = p.get_u32();
                        ((id >> 24) as u8, id & 0x00ff_ffff, p.get_u32())
                    })
                    .collect();
                Frame::Settings { flags, entries }
            }
            TYPE_PING => {
                if len != 4 {
                    return Err(bad_len);
                }
                Frame::Ping { id: p.get_u32() }
            }
            TYPE_GOAWAY => {
                if len != 8 {
                    return Err(bad_len);
                }
                Frame::GoAway {
                    last_good_stream_id: p.get_u32() & 0x7fff_ffff,
                    status: p.get_u32(),
                }
            }
            TYPE_WINDOW_UPDATE => {
                if len != 8 {
                    return Err(bad_len);
                }
                let stream_id = p.get_u32() & 0x7fff_ffff;
                match p.get_u32() & 0x7fff_ffff {
                    0 => {
                        return Err(SpdyError::BadField {
                            kind,
                            what: "window delta 0",
                        });
                    }
                    delta => Frame::WindowUpdate { stream_id, delta },
                }
            }
            kind => Frame::Unknown { kind },
        };
        Ok(frame)
    }
}

/// Encodes frames; owns the outbound header context.
pub struct Encoder {
    deflater: HeaderDeflater,
}

impl Encoder {
    /// A fresh encoder for one connection direction.
    pub fn new() -> Result<Self, SpdyError> {
        Ok(Self {
            deflater: HeaderDeflater::new()?,
        })
    }

    /// Appends `frame` to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut Vec<u8>) -> Result<(), SpdyError> {
        let mut payload = Vec::new();
        let (kind, flags) = match frame {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                check_len(data.len(), MAX_DATA_LEN)?;
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32(u32::from(*flags) << 24 | data.len() as u32);
                out.put_slice(data);
                return Ok(());
            }
            Frame::SynStream {
                stream_id,
                associated_id,
                priority,
                flags,
                headers,
            } => {
                payload.put_u32(*stream_id);
                payload.put_u32(*associated_id);
                payload.put_u8((priority & 7) << 5);
                payload.put_u8(0);
                self.deflater.deflate(headers, &mut payload)?;
                (TYPE_SYN_STREAM, *flags)
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            } => {
                payload.put_u32(*stream_id);
                self.deflater.deflate(headers, &mut payload)?;
                (TYPE_SYN_REPLY, *flags)
            }
            Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                payload.put_u32(*stream_id);
                self.deflater.deflate(headers, &mut payload)?;
                (TYPE_HEADERS, *flags)
            }
            Frame::RstStream { stream_id, status } => {
                payload.put_u32(*stream_id);
                payload.put_u32(*status);
                (TYPE_RST_STREAM, 0)
            }
            Frame::Settings { flags, entries } => {
                payload.put_u32(entries.len() as u32);
                for (flags, id, value) in entries {
                    payload.put_u32(u32::from(*flags) << 24 | (id & 0x00ff_ffff));
                    payload.put_u32(*value);
                }
                (TYPE_SETTINGS, *flags)
            }
            Frame::Ping { id } => {
                payload.put_u32(*id);
                (TYPE_PING, 0)
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                payload.put_u32(*last_good_stream_id);
                payload.put_u32(*status);
                (TYPE_GOAWAY, 0)
            }
            Frame::WindowUpdate { stream_id, delta } => {
                payload.put_u32(*stream_id);
                payload.put_u32(*delta);
                (TYPE_WINDOW_UPDATE, 0)
            }
            Frame::Unknown { kind } => (*kind, 0),
        };
        check_len(payload.len(), MAX_CONTROL_LEN)?;
        out.put_u16(0x8000 | VERSION);
        out.put_u16(kind);
        out.put_u32(u32::from(flags) << 24 | payload.len() as u32);
        out.put_slice(&payload);
        Ok(())
    }
}

fn check_len(len: usize, limit: usize) -> Result<(), SpdyError> {
    if len > limit {
        return Err(SpdyError::FrameTooLarge { len, limit });
    }
    Ok(())
}

/// Reads frames from one direction of a connection.
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    decoder: Decoder,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads frames from `io`.
    pub fn new(io: R) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(16 * 1024),
            decoder: Decoder::default(),
        }
    }

    /// The next frame, `None` on a clean end between frames. Buffers at most one
    /// frame (its length checked first) plus one read.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, SpdyError> {
        // Each read adds at least one byte and a frame is at most HEAD_LEN +
        // MAX_DATA_LEN bytes, so this loop ends.
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buf)? {
                return Ok(Some(frame));
            }
            let want = HEAD_LEN + Decoder::needed(&self.buf)?.unwrap_or(0);
            self.buf
                .reserve(want.saturating_sub(self.buf.len()).max(4096));
            if self.io.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(SpdyError::Truncated {
                    have: self.buf.len(),
                    want,
                });
            }
        }
    }

    /// [`Self::read_frame`] within `timeout`.
    pub async fn read_frame_within(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<Frame>, SpdyError> {
        tokio::time::timeout(timeout, self.read_frame())
            .await
            .map_err(|_| SpdyError::Timeout)?
    }
}

/// Writes frames to one direction of a connection.
pub struct FrameWriter<W> {
    io: W,
    encoder: Encoder,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Writes frames to `io`.
    pub fn new(io: W) -> Result<Self, SpdyError> {
        Ok(Self {
            io,
            encoder: Encoder::new()?,
            buf: Vec::new(),
        })
    }

    /// Encodes and writes `frame`, then flushes.
    pub async fn write_frame(&mut self, frame: &Frame) -> Result<(), SpdyError> {
        self.buf.clear();
        self.encoder.encode(frame, &mut self.buf)?;
        self.io.write_all(&self.buf).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Writes raw bytes (tests put bad input on the wire with it).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), SpdyError> {
        self.io.write_all(bytes).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Shuts the write side down.
    pub async fn shutdown(&mut self) -> Result<(), SpdyError> {
        self.io.shutdown().await?;
        Ok(())
    }
}

/// Writes the frames sent into `rx`, in order, each within `timeout`, until every
/// sender is gone (then shuts the write side down) or a write fails.
pub async fn write_frames<W>(
    mut writer: FrameWriter<W>,
    mut rx: mpsc::Receiver<Frame>,
    timeout: Duration,
) -> Result<(), SpdyError>
where
    W: AsyncWrite + Unpin,
{
    while let Some(frame) = rx.recv().await {
        tokio::time::timeout(timeout, writer.write_frame(&frame))
            .await
            .map_err(|_| SpdyError::Timeout)??;
    }
    let _ = tokio::time::timeout(timeout, writer.shutdown()).await;
    Ok(())
}

/// Counts consumed bytes and says when to send a `WINDOW_UPDATE`: after half a
/// window, as most implementations do, so the peer never sees a closed window.
#[derive(Debug, Default)]
pub struct WindowCredit {
    pending: u32,
}

impl WindowCredit {
    /// Records `n` consumed bytes; returns the delta to announce, if it is time.
    pub fn consume(&mut self, n: usize) -> Option<u32> {
        self.pending = self.pending.saturating_add(n as u32);
        if self.pending >= INITIAL_WINDOW / 2 {
            return Some(std::mem::take(&mut self.pending));
        }
        None
    }
}
