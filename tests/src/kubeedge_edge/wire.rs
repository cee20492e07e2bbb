//! KubeEdge's tunnel wire as an edge sees it, written from
//! `docs/kubeedge-compat.md` section 2: Go uvarints, the
//! `ConnectID | MessageType | Data` message (`pkg/stream/message.go`), and the
//! client half of RFC 6455 framing as gorilla/websocket does it (masked
//! frames, TEXT messages cut into 4096-byte frames). Deliberately shares no
//! code with Tether's cloud side, so a symmetric bug cannot hide in both;
//! it is public so tests can build payloads for [`super::Fault::Text`], not
//! for the cloud to reuse.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Data kept from one tunnel message; the rest is dropped silently, as
/// `ReadMessageFromTunnel` reads through `io.LimitReader(.., 1 << 20)`.
pub const MAX_DATA: usize = 1 << 20;
/// Payload bytes per frame gorilla writes (its default write buffer).
pub const FRAGMENT: usize = 4096;
/// The longest Go uvarint (`binary.MaxVarintLen64`).
pub const MAX_UVARINT_LEN: usize = 10;
/// Longest message the reader keeps: the two uvarints plus [`MAX_DATA`].
const MAX_KEPT: usize = 2 * MAX_UVARINT_LEN + MAX_DATA;

/// The message types of `pkg/stream/constants.go` (an `iota`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// 0, cloud to edge: a logs request (JSON).
    LogsConnect = 0,
    /// 1, cloud to edge: an exec request (JSON with `method`).
    ExecConnect = 1,
    /// 2, cloud to edge: a metrics or stats request (JSON).
    MetricConnect = 2,
    /// 3, both ways: bytes of one connection.
    Data = 3,
    /// 4, both ways: ends one connection.
    RemoveConnect = 4,
    /// 5, cloud to edge: ends the session; the data is the reason.
    CloseConnect = 5,
    /// 6, cloud to edge: an attach request (JSON with `method`).
    AttachConnect = 6,
}

impl MessageType {
    /// The type with this wire value, if it is one of the seven.
    pub fn from_u64(value: u64) -> Option<Self> {
        Some(match value {
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

/// Why bytes could not be read as a tunnel message or a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// A uvarint ran past the end of the message (Go: `EOF` or `ErrUnexpectedEOF`).
    #[error("truncated uvarint")]
    TruncatedUvarint,
    /// A uvarint longer than 10 bytes or above `u64::MAX` (Go: `errOverflow`).
    #[error("uvarint overflows a 64-bit integer")]
    UvarintOverflow,
    /// The cloud broke RFC 6455 as gorilla's reader checks it.
    #[error("websocket protocol error: {0}")]
    Frame(&'static str),
    /// The socket failed or ended in the middle of a frame.
    #[error("read failed: {0}")]
    Io(String),
}

/// Appends `value` as a Go uvarint (unsigned LEB128).
pub fn put_uvarint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads a Go uvarint at the start of `buf`: the value and the bytes used.
/// Same rules as `binary.ReadUvarint`: at most 10 bytes, and the tenth may
/// only be 0 or 1.
pub fn read_uvarint(buf: &[u8]) -> Result<(u64, usize), WireError> {
    let mut value = 0u64;
    for i in 0..MAX_UVARINT_LEN {
        let Some(&byte) = buf.get(i) else {
            return Err(WireError::TruncatedUvarint);
        };
        if byte < 0x80 {
            if i == MAX_UVARINT_LEN - 1 && byte > 1 {
                return Err(WireError::UvarintOverflow);
            }
            return Ok((value | u64::from(byte) << (7 * i), i + 1));
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
    }
    Err(WireError::UvarintOverflow)
}

/// One tunnel message. `kind` stays a number: an edge must see what the
/// cloud really sent, unknown types included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The connection (`ConnectID`); 0 for `CLOSE_CONNECT`.
    pub id: u64,
    /// The raw `MessageType`.
    pub kind: u64,
    /// The rest of the message, cut at [`MAX_DATA`].
    pub data: Vec<u8>,
}

/// The bytes of one tunnel message, as `Message.Bytes` writes them.
pub fn encode(id: u64, kind: MessageType, data: &[u8]) -> Vec<u8> {
    encode_raw(id, kind as u64, data)
}

/// Like [`encode`] with any type number (fault injection).
pub fn encode_raw(id: u64, kind: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 * MAX_UVARINT_LEN + data.len());
    put_uvarint(&mut out, id);
    put_uvarint(&mut out, kind);
    out.extend_from_slice(data);
    out
}

/// Parses one WebSocket message as `ReadMessageFromTunnel` does: two
/// uvarints, then the data, of which only the first [`MAX_DATA`] bytes count.
pub fn decode(payload: &[u8]) -> Result<Message, WireError> {
    let (id, used_id) = read_uvarint(payload)?;
    let (kind, used_kind) = read_uvarint(&payload[used_id..])?;
    let data = &payload[used_id + used_kind..];
    Ok(Message {
        id,
        kind,
        data: data[..data.len().min(MAX_DATA)].to_vec(),
    })
}

/// RFC 6455 opcodes the edge uses.
pub mod opcode {
    /// Continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// Text message (what KubeEdge sends, although the payload is binary).
    pub const TEXT: u8 = 0x1;
    /// Binary message.
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xa;
}

/// Appends one masked client frame.
pub fn put_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    // Client frames always carry the MASK bit (RFC 6455 5.3).
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// Appends a whole data message the way gorilla's `messageWriter` cuts it:
/// frames of [`FRAGMENT`] payload bytes, the first with `opcode` and FIN=0,
/// the rest CONTINUATION, the last with FIN=1. A message of at most
/// [`FRAGMENT`] bytes (the empty one included) is a single frame.
pub fn put_message(
    out: &mut Vec<u8>,
    opcode: u8,
    payload: &[u8],
    mut mask: impl FnMut() -> [u8; 4],
) {
    if payload.len() <= FRAGMENT {
        put_frame(out, true, opcode, payload, mask());
        return;
    }
    let count = payload.len().div_ceil(FRAGMENT);
    for (i, chunk) in payload.chunks(FRAGMENT).enumerate() {
        let op = if i == 0 { opcode } else { opcode::CONTINUATION };
        put_frame(out, i + 1 == count, op, chunk, mask());
    }
}

/// A fresh masking key. RFC 6455 wants it unpredictable to third parties on
/// the path; a test edge on loopback only needs it to vary.
pub fn mask_key() -> [u8; 4] {
    (tether_pki::rand_u64() as u32).to_ne_bytes()
}

/// What the reader hands up: whole messages and control frames.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A reassembled TEXT or BINARY message (the type does not matter to the
    /// edge), cut at the tunnel's 1 MiB limit plus its header.
    Message(Vec<u8>),
    /// A Ping with its payload, to be answered with a Pong.
    Ping(Vec<u8>),
    /// A Pong (the edge ignores them).
    Pong,
    /// A Close frame with its payload (status code and reason, if any).
    Close(Vec<u8>),
}

/// Reads the cloud's (unmasked) frames and reassembles messages. Memory is
/// bounded: a message keeps at most the two uvarints and [`MAX_DATA`] bytes,
/// the rest is read and thrown away, as the edge does.
pub struct FrameReader<R> {
    io: R,
    /// A fragmented message being reassembled; control frames may arrive
    /// between its fragments (RFC 6455 5.4), so it outlives one `next`.
    partial: Option<Vec<u8>>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads frames from `io` (bytes already read past the upgrade response
    /// must be chained in front of it).
    pub fn new(io: R) -> Self {
        Self { io, partial: None }
    }

    /// The next message or control frame.
    pub async fn next(&mut self) -> Result<Incoming, WireError> {
        loop {
            let mut head = [0u8; 2];
            self.read_exact(&mut head).await?;
            let fin = head[0] & 0x80 != 0;
            if head[0] & 0x70 != 0 {
                // No extension was negotiated, so no RSV bit may be set.
                return Err(WireError::Frame("reserved bits set"));
            }
            let op = head[0] & 0x0f;
            if head[1] & 0x80 != 0 {
                return Err(WireError::Frame("masked frame from the server"));
            }
            let len = match head[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    self.read_exact(&mut b).await?;
                    u64::from(u16::from_be_bytes(b))
                }
                127 => {
                    let mut b = [0u8; 8];
                    self.read_exact(&mut b).await?;
                    let n = u64::from_be_bytes(b);
                    if n >> 63 != 0 {
                        return Err(WireError::Frame("64-bit length with the high bit set"));
                    }
                    n
                }
                n => u64::from(n),
            };
            match op {
                opcode::CLOSE | opcode::PING | opcode::PONG => {
                    if !fin || len > 125 {
                        return Err(WireError::Frame("bad control frame"));
                    }
                    let mut payload = vec![0u8; len as usize];
                    self.read_exact(&mut payload).await?;
                    return Ok(match op {
                        opcode::PING => Incoming::Ping(payload),
                        opcode::PONG => Incoming::Pong,
                        _ => Incoming::Close(payload),
                    });
                }
                opcode::TEXT | opcode::BINARY => {
                    if self.partial.is_some() {
                        return Err(WireError::Frame("new message inside a fragmented one"));
                    }
                    self.partial = Some(Vec::new());
                }
                opcode::CONTINUATION => {
                    if self.partial.is_none() {
                        return Err(WireError::Frame("continuation without a message"));
                    }
                }
                _ => return Err(WireError::Frame("unknown opcode")),
            }
            let mut buf = self.partial.take().expect("set above");
            self.read_payload(&mut buf, len).await?;
            if fin {
                return Ok(Incoming::Message(buf));
            }
            self.partial = Some(buf);
        }
    }

    async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), WireError> {
        self.io
            .read_exact(buf)
            .await
            .map(drop)
            .map_err(|e| WireError::Io(e.to_string()))
    }

    /// Appends `len` payload bytes to `buf` while it is under the limit and
    /// discards the rest.
    async fn read_payload(&mut self, buf: &mut Vec<u8>, mut len: u64) -> Result<(), WireError> {
        let mut scratch = [0u8; 8192];
        while len > 0 {
            let want = len.min(scratch.len() as u64) as usize;
            let chunk = &mut scratch[..want];
            self.read_exact(chunk).await?;
            let room = MAX_KEPT.saturating_sub(buf.len());
            buf.extend_from_slice(&chunk[..room.min(want)]);
            len -= want as u64;
        }
        Ok(())
    }
}
