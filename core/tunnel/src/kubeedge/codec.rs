//! The two layers of KubeEdge's EdgeStream wire (docs/kubeedge-compat.md,
//! section 2): RFC 6455 frames on the TLS stream after the upgrade, and in
//! each WebSocket message one tunnel message `uvarint ConnectID | uvarint
//! type | data`. Edges send TEXT messages that are not UTF-8, which
//! tungstenite's message API refuses, so frames are read here: TEXT, BINARY
//! and CONTINUATION are reassembled and unmasked, control frames are handed
//! out between fragments. Every size is bounded before it is buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The largest tunnel message accepted: KubeEdge's 1 MiB data bound plus
/// two 10-byte uvarints. Edges never send more than ~64 KiB.
pub const MAX_MESSAGE: usize = (1 << 20) + 20;

/// Largest payload of a control frame (RFC 6455, 5.5).
const MAX_CONTROL: usize = 125;

/// Why the wire could not be read. Every variant ends the session.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The socket failed.
    #[error("tunnel read failed: {0}")]
    Io(#[from] std::io::Error),
    /// A frame or message broke RFC 6455.
    #[error("websocket protocol violation: {0}")]
    Protocol(&'static str),
    /// A message larger than the bound.
    #[error("message of {size} bytes or more exceeds the {max}-byte bound")]
    Oversized {
        /// The size seen so far (at least).
        size: u64,
        /// The bound.
        max: usize,
    },
    /// A uvarint ran past 10 bytes or overflowed 64 bits.
    #[error("uvarint overflows 64 bits")]
    VarintOverflow,
    /// The message ended inside a uvarint.
    #[error("message truncated inside a uvarint")]
    VarintTruncated,
}

impl CodecError {
    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Io(_) => "io",
            Self::Protocol(_) => "protocol",
            Self::Oversized { .. } => "oversized",
            Self::VarintOverflow | Self::VarintTruncated => "varint",
        }
    }
}

/// RFC 6455 opcodes.
pub mod opcode {
    /// Continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// Text data (KubeEdge's choice for binary payloads).
    pub const TEXT: u8 = 0x1;
    /// Binary data.
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// What one read off the wire yields.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEvent {
    /// A complete data message (TEXT or BINARY, reassembled).
    Message(Bytes),
    /// A ping; the caller answers with a pong carrying the same payload.
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// A close frame (its payload is ignored).
    Close,
}

/// Reads frames from a client (masked frames, as RFC 6455 requires).
#[derive(Debug)]
pub struct FrameReader {
    buf: BytesMut,
    /// The message being reassembled, if a fragmented one is open.
    partial: Option<BytesMut>,
    max_message: usize,
}

impl FrameReader {
    /// A reader that starts with `initial` (bytes read past the upgrade
    /// request) and refuses messages over `max_message`.
    pub fn new(initial: &[u8], max_message: usize) -> Self {
        let mut buf = BytesMut::with_capacity(initial.len().max(4096));
        buf.extend_from_slice(initial);
        Self {
            buf,
            partial: None,
            max_message,
        }
    }

    /// Appends bytes read elsewhere (tests, fuzzing).
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next event; `None` at a clean EOF between frames.
    pub async fn next<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<WsEvent>, CodecError> {
        loop {
            if let Some(ev) = self.decode()? {
                return Ok(Some(ev));
            }
            if !self.fill(r).await? {
                return Ok(None);
            }
        }
    }

    /// Reads more bytes from `r`; false at a clean EOF between frames.
    /// Call it when [`FrameReader::decode`] says it needs more.
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<bool, CodecError> {
        // Read in bounded steps; a frame's size was checked by decode.
        self.buf.reserve(16 << 10);
        if r.read_buf(&mut self.buf).await? == 0 {
            return if self.buf.is_empty() && self.partial.is_none() {
                Ok(false)
            } else {
                Err(CodecError::Io(std::io::ErrorKind::UnexpectedEof.into()))
            };
        }
        Ok(true)
    }

    /// Takes one event out of the buffered bytes, or `None` if more bytes
    /// are needed.
    pub fn decode(&mut self) -> Result<Option<WsEvent>, CodecError> {
        loop {
            let Some((fin, op, payload)) = self.frame()? else {
                return Ok(None);
            };
            match op {
                opcode::PING => return Ok(Some(WsEvent::Ping(payload))),
                opcode::PONG => return Ok(Some(WsEvent::Pong(payload))),
                opcode::CLOSE => return Ok(Some(WsEvent::Close)),
                opcode::TEXT | opcode::BINARY => {
                    if self.partial.is_some() {
                        return Err(CodecError::Protocol("new message inside a fragmented one"));
                    }
                    if fin {
                        return Ok(Some(WsEvent::Message(payload)));
                    }
                    self.partial = Some(BytesMut::from(&payload[..]));
                }
                opcode::CONTINUATION => {
                    let Some(partial) = self.partial.as_mut() else {
                        return Err(CodecError::Protocol("continuation without a message"));
                    };
                    partial.extend_from_slice(&payload);
                    if fin {
                        let whole = self.partial.take().expect("present").freeze();
                        return Ok(Some(WsEvent::Message(whole)));
                    }
                }
                _ => return Err(CodecError::Protocol("reserved opcode")),
            }
        }
    }

    /// One whole frame from the buffer, unmasked: `(fin, opcode, payload)`.
    fn frame(&mut self) -> Result<Option<(bool, u8, Bytes)>, CodecError> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        let (fin, rsv, op) = (b[0] & 0x80 != 0, b[0] & 0x70, b[0] & 0x0f);
        if rsv != 0 {
            return Err(CodecError::Protocol(
                "reserved bits set (no extension was agreed)",
            ));
        }
        if b[1] & 0x80 == 0 {
            return Err(CodecError::Protocol("unmasked frame from the edge"));
        }
        let (len, at) = match b[1] & 0x7f {
            126 if b.len() < 4 => return Ok(None),
            126 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() < 10 => return Ok(None),
            127 => (
                u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")),
                10,
            ),
            n => (u64::from(n), 2),
        };
        let control = op & 0x08 != 0;
        if control && (!fin || len > MAX_CONTROL as u64) {
            return Err(CodecError::Protocol(
                "fragmented or oversized control frame",
            ));
        }
        // Refuse before buffering: the message so far plus this frame.
        let so_far = if control {
            0
        } else {
            self.partial.as_ref().map_or(0, |p| p.len() as u64)
        };
        if so_far.saturating_add(len) > self.max_message as u64 {
            return Err(CodecError::Oversized {
                size: so_far.saturating_add(len),
                max: self.max_message,
            });
        }
        let len = len as usize;
        let head = at + 4;
        if b.len() < head + len {
            return Ok(None);
        }
        let mask: [u8; 4] = b[at..head].try_into().expect("4 bytes");
        self.buf.advance(head);
        let mut payload = self.buf.split_to(len);
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[i & 3];
        }
        Ok(Some((fin, op, payload.freeze())))
    }
}

/// Appends one unmasked server frame with FIN set.
pub fn encode_frame(out: &mut BytesMut, op: u8, payload: &[u8]) {
    out.reserve(payload.len() + 10);
    out.put_u8(0x80 | op);
    match payload.len() {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.extend_from_slice(payload);
}

/// Tunnel message types (KubeEdge `pkg/stream/constants.go`). Tether only
/// ever sends these seven: edges v1.14-v1.23.1 crash on any other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    /// Plain GET, body streamed back in 256-byte pieces.
    LogsConnect = 0,
    /// Request head replayed to the kubelet, raw bytes piped both ways.
    ExecConnect = 1,
    /// Plain GET, body streamed back line by line.
    MetricConnect = 2,
    /// Bytes of one connection.
    Data = 3,
    /// Ends one connection.
    RemoveConnect = 4,
    /// Ends the session (ConnectID 0, reason as data).
    CloseConnect = 5,
    /// Like `ExecConnect` (edges >= v1.14).
    AttachConnect = 6,
}

impl MessageType {
    /// The type for a wire value, if it is one of the seven.
    pub fn from_wire(v: u64) -> Option<Self> {
        Some(match v {
            0 => Self::LogsConnect,
            1 => Self::ExecConnect,
            2 => Self::MetricConnect,
            3 => Self::Data,
            4 => Self::RemoveConnect,
            5 => Self::CloseConnect,
            6 => Self::AttachConnect,
            _ => return None,
        })
    }
}

/// One decoded tunnel message. `kind` is the raw wire value, so an unknown
/// type can be reported with its connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelMessage {
    /// The connection (request) it belongs to; 0 for the session.
    pub id: u64,
    /// The wire type value.
    pub kind: u64,
    /// The rest of the message.
    pub data: Bytes,
}

impl TunnelMessage {
    /// Splits a WebSocket message into its two uvarints and the data.
    pub fn decode(mut msg: Bytes) -> Result<Self, CodecError> {
        if msg.len() > MAX_MESSAGE {
            return Err(CodecError::Oversized {
                size: msg.len() as u64,
                max: MAX_MESSAGE,
            });
        }
        let (id, n) = uvarint(&msg)?;
        msg.advance(n);
        let (kind, n) = uvarint(&msg)?;
        msg.advance(n);
        Ok(Self {
            id,
            kind,
            data: msg,
        })
    }
}

/// Encodes a tunnel message (the WebSocket payload).
pub fn encode_message(id: u64, kind: MessageType, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 11);
    put_uvarint(&mut out, id);
    put_uvarint(&mut out, kind as u64);
    out.extend_from_slice(data);
    out.freeze()
}

/// Reads a Go uvarint (unsigned LEB128, at most 10 bytes): `(value, length)`.
pub fn uvarint(b: &[u8]) -> Result<(u64, usize), CodecError> {
    let mut value = 0u64;
    for (i, &byte) in b.iter().enumerate() {
        if i == 9 && byte > 1 {
            return Err(CodecError::VarintOverflow);
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
        if i == 9 {
            return Err(CodecError::VarintOverflow);
        }
    }
    Err(CodecError::VarintTruncated)
}

/// Appends a Go uvarint.
pub fn put_uvarint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

#[cfg(test)]
mod tests;
