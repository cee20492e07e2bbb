//! Fuzzes the hub's wire: the 4-byte length framing (`read_raw_frame`,
//! `write_raw_frame`), the message decoder (`Message::from_json`) and
//! encoder (`to_json`), and a `Channel` reading a peer's frames.
//!
//! The first byte selects the mode (modulo 3):
//! - 0, frames: the rest is a byte stream read frame by frame with a fuzzed
//!   `max`, as a peer's connection. Each frame is at most `max` bytes, and
//!   each one is decoded; a decoded message re-encodes and decodes to itself.
//! - 1, round trip: messages built from the input (ids, routes, versions,
//!   JSON or byte content) are encoded, framed into one buffer, and read
//!   back. Frames come back byte-exact (or skipped when over `max`), and a
//!   message with a group and an operation decodes to exactly itself.
//!   `prepare` refuses exactly the reserved group, an empty route and a bad
//!   id, and otherwise leaves a valid id.
//! - 2, peer: a `Channel` (in-memory store) serves a duplex pipe into which
//!   the input wrote up to 64 frames (messages, acks, defers, rewinds,
//!   unknown channel operations, raw bytes, oversized lengths) and EOF. It
//!   must end with the EOF, or with `Protocol` for a length past 16x `max`,
//!   never hang (paused clock, 60 s deadline); it delivers each message id at
//!   most once, never a control message, and per resource never an older
//!   numeric `resourceversion` after a newer one.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tether_hub::channel::{read_raw_frame, write_raw_frame};
use tether_hub::dispatch::Event;
use tether_hub::message::HUB_GROUP;
use tether_hub::{
    BadMessage, Channel, ChannelConfig, ConnectionEnd, Content, Delivery, Header, HubMetrics,
    Message, Route, Store,
};
use tokio::io::AsyncWriteExt;

/// Small reader over the fuzz input; yields zeros once exhausted.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&{
            let t = self.take(8);
            let mut v = [0u8; 8];
            v[..t.len()].copy_from_slice(t);
            v
        });
        u64::from_le_bytes(b)
    }
    fn string(&mut self, max: usize) -> String {
        let n = self.byte() as usize % (max + 1);
        String::from_utf8_lossy(self.take(n)).into_owned()
    }
    /// One of `picks`, or (for the last choice) an arbitrary string.
    fn pick(&mut self, picks: &[&str], max: usize) -> String {
        let i = self.byte() as usize % (picks.len() + 1);
        match picks.get(i) {
            Some(p) => (*p).to_owned(),
            None => self.string(max),
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
}

/// JSON without floats (integers and strings compare exactly).
fn json(inp: &mut Input<'_>, depth: u32) -> Value {
    match inp.byte() % if depth == 0 { 5 } else { 7 } {
        0 => Value::Null,
        1 => Value::Bool(inp.byte() % 2 == 0),
        2 => Value::from(inp.u64() as i64),
        3 => Value::from(inp.u64()),
        4 => Value::String(inp.string(40)),
        5 => Value::Array((0..inp.byte() % 4).map(|_| json(inp, depth - 1)).collect()),
        _ => Value::Object(
            (0..inp.byte() % 4)
                .map(|_| (inp.string(12), json(inp, depth - 1)))
                .collect(),
        ),
    }
}

fn message(inp: &mut Input<'_>, parents: &[String]) -> Message {
    let mut header = Header::default();
    header.msg_id = inp.pick(&["", "m1", "m2", "m3", "m4"], 140);
    header.parent_msg_id = match inp.byte() % 3 {
        0 => String::new(),
        1 if !parents.is_empty() => parents[inp.byte() as usize % parents.len()].clone(),
        _ => inp.string(20),
    };
    header.timestamp = inp.u64() as i64;
    header.resourceversion = inp.pick(&["", "1", "2", "3", "10"], 24);
    header.sync = inp.byte() % 2 == 0;
    let route = Route {
        source: inp.pick(&["app", ""], 20),
        group: inp.pick(&["app", "", HUB_GROUP], 20),
        operation: inp.pick(
            &["update", "", "ack", "keepalive", "defer", "rewind", "error"],
            20,
        ),
        resource: inp.pick(&["r1", "r2", ""], 30),
    };
    let content = match inp.byte() % 3 {
        0 => Content::None,
        1 => match json(inp, 3) {
            Value::Null => Content::None,
            v => Content::Json(v),
        },
        _ => {
            let n = inp.byte() as usize * 2;
            Content::Bytes(Bytes::copy_from_slice(inp.take(n)))
        }
    };
    Message {
        header,
        route,
        content,
    }
}

/// What every decoded message satisfies.
fn check_decoded(json: &[u8], m: &Message) {
    assert!(!m.route.group.is_empty() && !m.route.operation.is_empty());
    assert_ne!(m.content, Content::Json(Value::Null));
    if let Content::Bytes(b) = &m.content {
        assert!(b.len() <= json.len(), "base64 content grew");
    }
    let again = m.to_json();
    let back = Message::from_json(&again, usize::MAX).expect("an encoded message decodes");
    // Floats may move by an ulp through serde_json's parser; the rest is exact.
    if !has_float(&m.content) {
        assert_eq!(&back, m);
    } else {
        assert_eq!((&back.header, &back.route), (&m.header, &m.route));
    }
    // What subscriptions stream must build.
    let _ = Event::Message {
        peer: Arc::from("p"),
        message: m.clone(),
    }
    .to_json();
}

fn has_float(c: &Content) -> bool {
    fn f(v: &Value) -> bool {
        match v {
            Value::Number(n) => n.is_f64(),
            Value::Array(a) => a.iter().any(f),
            Value::Object(o) => o.values().any(f),
            _ => false,
        }
    }
    matches!(c, Content::Json(v) if f(v))
}

fn decode(json: &[u8], max: usize) {
    match Message::from_json(json, max) {
        Ok(m) => {
            assert!(json.len() <= max);
            check_decoded(json, &m);
        }
        Err(BadMessage::TooLarge { size, max: m }) => assert!(size > m && m == max),
        Err(_) => assert!(json.len() <= max),
    }
}

fn frames(inp: &mut Input<'_>) {
    let max = 64 + inp.byte() as usize * 16;
    let mut rd = inp.0;
    runtime().block_on(async {
        while rd.len() >= 4 {
            let before = rd.len();
            let len = u32::from_be_bytes(rd[..4].try_into().expect("4 bytes")) as usize;
            match read_raw_frame(&mut rd, max).await {
                Ok(Some(f)) => {
                    assert!(f.len() <= max && f.len() == len);
                    assert_eq!(before - rd.len(), 4 + len);
                    decode(&f, max);
                }
                Ok(None) => {
                    assert!(len > max);
                    if len > max * 16 {
                        // The channel ends the connection here.
                        return;
                    }
                    assert_eq!(before - rd.len(), 4 + len);
                }
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
                    assert!(len > rd.len());
                    return;
                }
            }
        }
    });
}

fn round_trip(inp: &mut Input<'_>) {
    let max = 64 + inp.byte() as usize * 4;
    let mut msgs = Vec::new();
    for _ in 0..1 + inp.byte() % 8 {
        msgs.push(message(inp, &[]));
    }
    runtime().block_on(async {
        let mut wire = Vec::new();
        let encoded: Vec<Vec<u8>> = msgs.iter().map(Message::to_json).collect();
        for e in &encoded {
            write_raw_frame(&mut wire, e).await.expect("vec write");
        }
        let mut rd = &wire[..];
        for (m, e) in msgs.iter().zip(&encoded) {
            match read_raw_frame(&mut rd, max).await.expect("complete frames") {
                Some(f) => assert_eq!(&f, e),
                None if e.len() > max * 16 => break,
                None => {
                    assert!(e.len() > max);
                    continue;
                }
            }
            match Message::from_json(e, max) {
                Ok(back) => {
                    assert_eq!(&back, m);
                    check_decoded(e, &back);
                }
                Err(BadMessage::NoRoute) => {
                    assert!(m.route.group.is_empty() || m.route.operation.is_empty())
                }
                Err(err) => panic!("{err} for an encoded message"),
            }
        }
    });
    for mut m in msgs {
        let before = m.clone();
        let ok_id =
            |id: &str| (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic());
        match m.prepare() {
            Ok(()) => {
                assert!(!before.route.group.is_empty() && !before.route.operation.is_empty());
                assert_ne!(before.route.group, HUB_GROUP);
                assert!(ok_id(&m.header.msg_id));
                assert!(before.header.msg_id.is_empty() || m.header.msg_id == before.header.msg_id);
                assert_ne!(m.header.timestamp, 0);
            }
            Err(BadMessage::NoRoute) => {
                assert!(before.route.group.is_empty() || before.route.operation.is_empty())
            }
            Err(BadMessage::Reserved) => assert_eq!(before.route.group, HUB_GROUP),
            Err(BadMessage::BadId) => assert!(!ok_id(&before.header.msg_id)),
            Err(e) => panic!("prepare: {e}"),
        }
    }
}

/// A store shared by many runs (each opening makes a database and a writer
/// thread), renewed every 2,000 runs so it stays small. Each run uses its own
/// peer and queue names in it.
fn store() -> (Store, u64) {
    static S: std::sync::Mutex<Option<(Store, u64)>> = std::sync::Mutex::new(None);
    let mut s = S.lock().expect("store lock");
    let n = s.as_ref().map_or(0, |(_, n)| n + 1);
    if n % 2000 == 0 {
        *s = Some((Store::in_memory(), n));
    }
    let (store, used) = s.as_mut().expect("just set");
    *used = n;
    (store.clone(), n)
}

fn peer(inp: &mut Input<'_>) {
    let max = 4096;
    let accept_all = inp.byte() % 4 != 0;
    let publish = inp.byte() % 4;
    runtime().block_on(async {
        let cfg = ChannelConfig {
            max_message: max,
            ..ChannelConfig::default()
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(256);
        let accepts: tether_hub::Accepts = if accept_all {
            Arc::new(|_| true)
        } else {
            Arc::new(|m: &Message| m.route.resource != "r2")
        };
        let (store, run) = store();
        let ch = Channel::open(
            &format!("edge{run}"),
            &format!("q{run}"),
            cfg,
            store,
            HubMetrics::default(),
            tx,
            accepts,
        )
        .expect("in-memory channel");
        let mut published = Vec::new();
        for i in 0..publish {
            let m = Message::new(
                Route {
                    source: "cloud".into(),
                    group: "app".into(),
                    operation: "update".into(),
                    resource: format!("out{i}"),
                },
                Content::None,
            );
            published.push(ch.publish(m).await.expect("publish"));
        }
        // Everything is written before the channel reads, so the script
        // stays within the pipe (a full pipe would block the writer forever).
        const PIPE: usize = 1 << 20;
        let (mut fuzz, io) = tokio::io::duplex(PIPE);
        let mut written = 0;
        let mut protocol = None;
        let mut sent_ids = HashSet::new();
        for _ in 0..inp.byte() % 64 {
            if inp.0.is_empty() {
                break;
            }
            match inp.byte() % 8 {
                0 => {
                    let raw = inp.string(200);
                    written += 4 + raw.len();
                    write_raw_frame(&mut fuzz, raw.as_bytes())
                        .await
                        .expect("pipe");
                }
                1 => {
                    // A length past `max`: skipped up to 16x, else fatal.
                    let len = max as u32 + (inp.u64() % (max as u64 * 20)) as u32;
                    if len as usize > max * 16 {
                        fuzz.write_all(&len.to_be_bytes()).await.expect("pipe");
                        protocol = Some(len as usize);
                        break;
                    }
                    if written + 4 + len as usize > PIPE {
                        break;
                    }
                    written += 4 + len as usize;
                    fuzz.write_all(&len.to_be_bytes()).await.expect("pipe");
                    fuzz.write_all(&vec![b' '; len as usize])
                        .await
                        .expect("pipe");
                }
                _ => {
                    // At most a few KiB each: 64 of them always fit.
                    let m = message(inp, &published);
                    let json = m.to_json();
                    written += 4 + json.len();
                    if !m.is_control() {
                        sent_ids.insert(m.header.msg_id.clone());
                    }
                    write_raw_frame(&mut fuzz, &json).await.expect("pipe");
                }
            }
        }
        fuzz.shutdown().await.expect("pipe");
        let end = tokio::time::timeout(Duration::from_secs(60), ch.serve(io))
            .await
            .expect("hung: the channel did not end at EOF");
        match (end, protocol) {
            (ConnectionEnd::Protocol(n), Some(p)) => assert_eq!(n, p),
            (ConnectionEnd::Io(e), None) => {
                assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}")
            }
            (end, p) => panic!("ended with {end} (oversized frame {p:?})"),
        }
        drop(ch);
        let mut delivered = HashSet::new();
        let mut versions: HashMap<String, u64> = HashMap::new();
        while let Ok(d) = rx.try_recv() {
            let Delivery::Message { message: m, .. } = d else {
                continue;
            };
            assert!(!m.is_control(), "control message delivered");
            assert!(sent_ids.contains(&m.header.msg_id));
            assert!(delivered.insert(m.header.msg_id.clone()), "delivered twice");
            if let Ok(rv) = m.header.resourceversion.parse::<u64>()
                && !m.route.resource.is_empty()
            {
                let last = versions.entry(m.route.resource.clone()).or_insert(rv);
                assert!(*last <= rv, "older version delivered after a newer one");
                *last = rv;
            }
        }
    });
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut inp = Input(rest);
    match mode % 3 {
        0 => frames(&mut inp),
        1 => round_trip(&mut inp),
        _ => peer(&mut inp),
    }
});
