//! Fuzzes the WebSocket-to-byte-stream adapter `tether_tunnel::WsStream` on
//! its read side, as the edge or cloud sees bytes arriving from the network.
//!
//! A `tokio::io::duplex` pair stands for the connection: the fuzz side writes
//! bytes into one end and then shuts its write half, the other end is
//! wrapped as a server-role `WebSocketStream` (the same `ws_config()` the
//! tunnel uses) inside `WsStream::new(ws, 64 KiB)`, and is read until EOF or
//! an error. The pipe is large enough for everything the WebSocket writes
//! back (pongs, the close reply), so nothing may block. The runtime's clock
//! is paused: if the reader ever waits with nothing left to wake it, time
//! auto-advances to the deadline and the target fails with "hung" instead of
//! stalling the fuzzer.
//!
//! The first byte selects the mode:
//! - even: the rest is written raw (arbitrary frames). Invariant: no panic,
//!   no hang, and the bytes read never exceed the input.
//! - odd: the rest is decoded into a script of well-formed masked frames
//!   (binary, fragmented binary, ping, pong, text, close). Invariant: the
//!   bytes read are exactly the binary payloads up to the first text or close
//!   frame; a text frame ends in `InvalidData`, a close frame in a clean EOF.
#![no_main]

use std::io;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tether_tunnel::{TunnelLimits, WsStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// How a scripted stream ends.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// A close frame: clean EOF.
    Close,
    /// A text frame: the adapter reports `InvalidData`.
    Text,
    /// The input ran out without a close: an error (reset without closing
    /// handshake), after all binary bytes were delivered.
    Reset,
}

/// Appends one masked (client-to-server) frame.
fn frame(out: &mut Vec<u8>, fin: bool, opcode: u8, mask: [u8; 4], payload: &[u8]) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// Small reader over the fuzz input; yields zeros once exhausted.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn mask(&mut self) -> [u8; 4] {
        let m = self.take(4);
        let mut out = [0u8; 4];
        out[..m.len()].copy_from_slice(m);
        out
    }
    /// A payload length: usually small, sometimes past the 7-bit form.
    fn len(&mut self, control: bool) -> usize {
        let b = self.byte().unwrap_or(0) as usize;
        if control {
            b % 126
        } else if b & 0x80 != 0 {
            // 16-bit extended length (up to ~8 KiB so runs stay fast).
            126 + ((b & 0x7f) << 6) + self.byte().unwrap_or(0) as usize % 64
        } else {
            b
        }
    }
}

/// Turns the input into well-formed frames; returns the wire bytes, the
/// binary bytes the adapter must yield, and how the stream ends.
fn script(data: &[u8]) -> (Vec<u8>, Vec<u8>, End) {
    let mut inp = Input(data);
    let mut wire = Vec::new();
    let mut expect = Vec::new();
    while let Some(op) = inp.byte() {
        let mask = inp.mask();
        match op % 8 {
            0 | 1 => {
                let n = inp.len(false);
                let p = inp.take(n);
                frame(&mut wire, true, OP_BINARY, mask, p);
                expect.extend_from_slice(p);
            }
            2 => {
                // A binary message in 2..=4 fragments, with a ping or pong
                // between fragments (allowed by RFC 6455 5.4).
                let parts = 2 + (op as usize >> 3) % 3;
                for i in 0..parts {
                    let n = inp.len(false);
                    let p = inp.take(n);
                    let opcode = if i == 0 { OP_BINARY } else { OP_CONT };
                    frame(&mut wire, i + 1 == parts, opcode, mask, p);
                    expect.extend_from_slice(p);
                    if i + 1 < parts && op & 0x40 != 0 {
                        let c = if op & 0x80 != 0 { OP_PING } else { OP_PONG };
                        frame(&mut wire, true, c, mask, b"ka");
                    }
                }
            }
            3 | 4 => {
                let n = inp.len(true);
                let p = inp.take(n);
                frame(&mut wire, true, OP_PING, mask, p);
            }
            5 => {
                let n = inp.len(true);
                let p = inp.take(n);
                frame(&mut wire, true, OP_PONG, mask, p);
            }
            6 => {
                let n = inp.len(true);
                let text: Vec<u8> = inp.take(n).iter().map(|b| b'a' + b % 26).collect();
                frame(&mut wire, true, OP_TEXT, mask, &text);
                // Whatever follows is never read.
                wire.extend_from_slice(inp.0);
                return (wire, expect, End::Text);
            }
            _ => {
                // Close: empty, or 1000 with an ASCII reason.
                let payload = if op & 0x80 != 0 {
                    let n = inp.len(true).min(123);
                    let mut p = 1000u16.to_be_bytes().to_vec();
                    p.extend(inp.take(n).iter().map(|b| b' ' + b % 95));
                    p
                } else {
                    Vec::new()
                };
                frame(&mut wire, true, OP_CLOSE, mask, &payload);
                wire.extend_from_slice(inp.0);
                return (wire, expect, End::Close);
            }
        }
    }
    (wire, expect, End::Reset)
}

/// Writes `wire` into a duplex, reads the other end through `WsStream`, and
/// returns the bytes read and how reading ended.
fn run(wire: &[u8]) -> (Vec<u8>, io::Result<()>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        // Room for the input one way and every reply the other way.
        let (mut net, io) = tokio::io::duplex(2 * wire.len() + 4096);
        net.write_all(wire).await.expect("duplex has room");
        net.shutdown().await.expect("shutdown write half");

        let limits = TunnelLimits::default();
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(limits.ws_config())).await;
        let mut stream = WsStream::new(ws, limits.ws_message_size);

        let mut got = Vec::new();
        let read = async {
            let mut buf = vec![0u8; 8192];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(e),
                }
            }
        };
        let end = match tokio::time::timeout(Duration::from_secs(60), read).await {
            Ok(end) => end,
            Err(_) => panic!("WsStream read hung on finite input ({} bytes)", wire.len()),
        };
        // `net` lives until here so replies (pong, close) have somewhere to go.
        drop(net);
        (got, end)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let (got, _) = run(rest);
        assert!(got.len() <= rest.len(), "read more bytes than were sent");
    } else {
        let (wire, expect, end) = script(rest);
        let (got, result) = run(&wire);
        assert!(
            got == expect,
            "binary payloads not delivered intact: got {} bytes, want {}",
            got.len(),
            expect.len()
        );
        match (end, result) {
            (End::Close, Ok(())) => {}
            (End::Text, Err(e)) if e.kind() == io::ErrorKind::InvalidData => {}
            (End::Reset, Err(_)) => {}
            (end, result) => panic!("stream ended {result:?}, expected {end:?}"),
        }
    }
});
