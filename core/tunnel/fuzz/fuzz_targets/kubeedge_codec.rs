//! Fuzzes the KubeEdge EdgeStream wire reader (`tether_tunnel::kubeedge::codec`)
//! as the cloud meets it: arbitrary bytes from an edge after the upgrade.
//!
//! The first byte picks the chunk size the rest is fed in (so frame
//! boundaries fall everywhere) and the message bound (1 MiB + 20 or 300
//! bytes, so the oversize branches are reached). Every complete message is
//! decoded as a tunnel message. Invariants:
//! - no panic; after the first error the reader is not used again;
//! - messages are within the bound, ping/pong payloads within 125 bytes, and
//!   the bytes handed out never exceed the bytes fed;
//! - a message of one of the seven known types re-encodes to the same bytes
//!   when its uvarints were minimal (the re-encoding has the same length).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tether_tunnel::kubeedge::codec::{
    FrameReader, MAX_MESSAGE, MessageType, TunnelMessage, WsEvent, encode_message,
};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(first % 64) + 1;
    let max = if first & 0x80 == 0 { MAX_MESSAGE } else { 300 };
    let mut reader = FrameReader::new(&[], max);
    let mut out = 0usize;
    let mut fed = 0usize;
    'feed: for chunk in rest.chunks(step) {
        reader.push(chunk);
        fed += chunk.len();
        loop {
            match reader.decode() {
                Ok(Some(WsEvent::Message(m))) => {
                    assert!(m.len() <= max);
                    out += m.len();
                    check_message(m);
                }
                Ok(Some(WsEvent::Ping(p) | WsEvent::Pong(p))) => {
                    assert!(p.len() <= 125);
                    out += p.len();
                }
                Ok(Some(WsEvent::Close)) => {}
                Ok(None) => break,
                Err(_) => break 'feed,
            }
            assert!(out <= fed);
        }
    }
});

fn check_message(m: Bytes) {
    let Ok(msg) = TunnelMessage::decode(m.clone()) else {
        return;
    };
    let Some(kind) = MessageType::from_wire(msg.kind) else {
        return;
    };
    let again = encode_message(msg.id, kind, &msg.data);
    if again.len() == m.len() {
        assert_eq!(&again[..], &m[..]);
    }
}
