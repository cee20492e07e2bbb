//! The session against a scripted edge on an in-memory socket: the edge side
//! here speaks the wire by hand (masked frames out, unmasked frames in).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::kubeedge::codec::{
    self, MessageType, TunnelMessage, encode_message, opcode, put_uvarint,
};
use crate::kubeedge::request::{canonical_key, connect_json};

const T: Duration = Duration::from_secs(10);

struct Edge {
    io: DuplexStream,
    buf: Vec<u8>,
}

/// One frame the cloud sent: (opcode, payload).
type Frame = (u8, Vec<u8>);

impl Edge {
    async fn send_raw(&mut self, op: u8, payload: &[u8]) {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut out = vec![0x80 | op];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        self.io.write_all(&out).await.unwrap();
    }

    async fn send(&mut self, id: u64, kind: MessageType, data: &[u8]) {
        self.send_raw(opcode::TEXT, &encode_message(id, kind, data))
            .await;
    }

    /// Sends `data` as DATA in 256-byte pieces, as edges do.
    async fn send_data(&mut self, id: u64, data: &[u8]) {
        for piece in data.chunks(256) {
            self.send(id, MessageType::Data, piece).await;
        }
    }

    async fn frame(&mut self) -> Frame {
        loop {
            if self.buf.len() >= 2 {
                let (op, len7) = (self.buf[0] & 0x0f, self.buf[1] & 0x7f);
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are unmasked");
                assert_ne!(self.buf[0] & 0x80, 0, "server frames are unfragmented");
                let (len, at) = match len7 {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return (op, payload);
                }
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(T, self.io.read(&mut chunk))
                .await
                .expect("cloud frame in time")
                .unwrap();
            assert!(n > 0, "cloud closed the socket");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next tunnel message, skipping pings.
    async fn message(&mut self) -> TunnelMessage {
        loop {
            let (op, payload) = self.frame().await;
            match op {
                opcode::TEXT => return TunnelMessage::decode(payload.into()).unwrap(),
                opcode::PING => {}
                other => panic!("unexpected opcode {other}"),
            }
        }
    }

    async fn connect(&mut self) -> (u64, serde_json::Value) {
        let m = self.message().await;
        assert_eq!(m.kind, MessageType::ExecConnect as u64);
        let json: serde_json::Value = serde_json::from_slice(&m.data).unwrap();
        assert_eq!(json["MessID"], m.id);
        (m.id, json)
    }
}

fn session(opts: KubeEdgeOptions) -> (Arc<KubeEdgeSession>, Edge, Arc<Mutex<Vec<&'static str>>>) {
    let (cloud, edge) = tokio::io::duplex(64 << 10);
    let ends = Arc::new(Mutex::new(Vec::new()));
    let hook = {
        let ends = ends.clone();
        Arc::new(move |r: &'static str| ends.lock().unwrap().push(r)) as StreamEndHook
    };
    let info = SessionInfo {
        kind: crate::SessionKind::KubeEdge,
        node: "ke-1".into(),
        id: 1,
        peer: "127.0.0.1:1".parse().unwrap(),
        ips: Vec::new(),
        connected_at: std::time::SystemTime::now(),
        identity: tether_pki::Identity {
            common_name: "system:node:ke-1".into(),
            organizations: vec!["system:nodes".into()],
            ips: Vec::new(),
            serial: "1".into(),
            not_before: 0,
            not_after: 0,
        },
        endpoints: Vec::new(),
        carries_hub: false,
    };
    let s = KubeEdgeSession::start(
        cloud,
        Bytes::new(),
        info,
        &TunnelLimits::default(),
        Arc::new(opts),
        Some(hook),
    );
    (
        s,
        Edge {
            io: edge,
            buf: Vec::new(),
        },
        ends,
    )
}

fn opts() -> KubeEdgeOptions {
    KubeEdgeOptions::new(&TunnelLimits::default())
}

fn get(path: &str) -> Request<Body> {
    Request::get(path)
        .header("accept", "*/*")
        .body(crate::body_empty())
        .unwrap()
}

fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for c in body.chunks(3000) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[tokio::test]
async fn plain_request_round_trip_is_byte_exact() {
    let (s, mut edge, _) = session(opts());
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let want = body.clone();
    let client = tokio::spawn({
        let s = s.clone();
        async move {
            let resp = s
                .send(
                    get("/containerLogs/ns/pod/c?follow=true&tailLines=10"),
                    "kubelet",
                )
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.headers()["content-type"], "text/plain");
            resp.into_body().collect().await.unwrap().to_bytes()
        }
    });
    let (id, json) = edge.connect().await;
    assert_eq!(id, 1, "connection ids start at 1");
    assert_eq!(json["method"], "GET");
    assert_eq!(json["url"]["Scheme"], "http");
    assert_eq!(json["url"]["Host"], "127.0.0.1:10350");
    assert_eq!(json["url"]["Path"], "/containerLogs/ns/pod/c");
    assert_eq!(json["url"]["RawQuery"], "follow=true&tailLines=10");
    assert_eq!(json["header"]["Connection"][0], "close");
    assert_eq!(json["header"]["Accept"][0], "*/*");
    edge.send_data(id, &chunked(&body)).await;
    edge.send(id, MessageType::RemoveConnect, b"").await;
    let got = tokio::time::timeout(T, client).await.unwrap().unwrap();
    assert_eq!(&got[..], &want[..]);
    // The edge ended it: the cloud never sends a REMOVE of its own. The next
    // stream gets a fresh id.
    let next = tokio::spawn({
        let s = s.clone();
        async move { s.send(get("/healthz"), "kubelet").await.map(|r| r.status()) }
    });
    let (id2, _) = edge.connect().await;
    assert_eq!(id2, 2);
    edge.send_data(
        id2,
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno",
    )
    .await;
    assert_eq!(
        tokio::time::timeout(T, next)
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        StatusCode::NOT_FOUND
    );
    // After that body ends the cloud closes its side; the edge ends too
    // late, so the cloud's REMOVE is the next message (after the grace).
    let m = edge.message().await;
    assert_eq!((m.id, m.kind), (2, MessageType::RemoveConnect as u64));
    assert_eq!(s.open_streams(), 0);
}

#[tokio::test]
async fn upgrade_yields_the_pipe_both_ways() {
    let (s, mut edge, _) = session(opts());
    let client = tokio::spawn({
        let s = s.clone();
        async move {
            let req = Request::post("/exec/ns/pod/c?command=sh&input=1&output=1")
                .header("connection", "Upgrade")
                .header("upgrade", "SPDY/3.1")
                .header("x-stream-protocol-version", "v4.channel.k8s.io")
                .body(crate::body_empty())
                .unwrap();
            let mut resp = s.send(req, "kubelet").await.unwrap();
            assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
            let up = hyper::upgrade::on(&mut resp).await.unwrap();
            let mut io = TokioIo::new(up);
            let mut first = [0u8; 5];
            io.read_exact(&mut first).await.unwrap();
            assert_eq!(&first, b"early");
            io.write_all(b"stdin bytes").await.unwrap();
            let mut rest = Vec::new();
            io.read_to_end(&mut rest).await.unwrap();
            rest
        }
    });
    let (id, json) = edge.connect().await;
    assert_eq!(json["method"], "POST");
    assert_eq!(json["header"]["Connection"][0], "Upgrade");
    assert_eq!(json["header"]["Upgrade"][0], "SPDY/3.1");
    assert_eq!(
        json["header"]["X-Stream-Protocol-Version"][0],
        "v4.channel.k8s.io"
    );
    // The 101 and the first stream bytes in one piece, as the kubelet may.
    edge.send(
        id,
        MessageType::Data,
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\nearly",
    )
    .await;
    let m = edge.message().await;
    assert_eq!((m.id, m.kind, &m.data[..]), (id, 3, &b"stdin bytes"[..]));
    edge.send_data(id, b"stdout and exit").await;
    edge.send(id, MessageType::RemoveConnect, b"").await;
    let rest = tokio::time::timeout(T, client).await.unwrap().unwrap();
    assert_eq!(rest, b"stdout and exit");
}

#[tokio::test]
async fn stalled_stream_is_removed_and_the_other_goes_on() {
    let mut o = opts();
    o.stream_buffer = 256 << 10;
    let (s, mut edge, ends) = session(o);
    // Stream 1: the client takes the head and then stops reading.
    let stalled = tokio::spawn(s.send(get("/containerLogs/a/b/c?follow=true"), "kubelet"));
    let (id1, _) = edge.connect().await;
    let head1 = chunked(b"first line\n");
    edge.send_data(id1, &head1[..head1.len() - 5]).await;
    let resp1 = tokio::time::timeout(T, stalled)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let mut body1 = resp1.into_body();
    // Stream 2 on the same session.
    let live = tokio::spawn({
        let s = s.clone();
        async move {
            let r = s.send(get("/metrics"), "kubelet").await.unwrap();
            r.into_body().collect().await.unwrap().to_bytes().len()
        }
    });
    let (id2, _) = edge.connect().await;
    // Far more than the bound for stream 1, interleaved with stream 2.
    let big = vec![b'x'; 2 << 20];
    let mut head2 = b"HTTP/1.1 200 OK\r\nContent-Length: 2097152\r\n\r\n".to_vec();
    edge.send_data(id2, &std::mem::take(&mut head2)).await;
    for (a, b) in big.chunks(64 << 10).zip(big.chunks(64 << 10)) {
        edge.send(id1, MessageType::Data, a).await;
        edge.send(id2, MessageType::Data, b).await;
    }
    assert_eq!(
        tokio::time::timeout(T, live).await.unwrap().unwrap(),
        2 << 20
    );
    // Stream 1 got its REMOVE and its body fails instead of hanging.
    let m = edge.message().await;
    assert_eq!((m.id, m.kind), (id1, MessageType::RemoveConnect as u64));
    assert!(ends.lock().unwrap().contains(&"client_stalled"));
    let mut failed = false;
    while let Some(f) = tokio::time::timeout(T, body1.frame()).await.unwrap() {
        if f.is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "the stalled stream's body ends in an error");
    assert!(!s.is_closed());
}

#[tokio::test(start_paused = true)]
async fn silent_kubelet_gets_504_and_remove() {
    let mut o = opts();
    o.response_header_timeout = Duration::from_secs(3);
    o.idle_timeout = Duration::from_secs(3600);
    let (s, mut edge, ends) = session(o);
    let resp = tokio::spawn({
        let s = s.clone();
        async move { s.send(get("/stats/summary"), "kubelet").await.unwrap() }
    });
    let (id, _) = edge.connect().await;
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    let m = edge.message().await;
    assert_eq!((m.id, m.kind), (id, MessageType::RemoveConnect as u64));
    assert_eq!(*ends.lock().unwrap(), vec!["response_timeout"]);
    assert_eq!(s.open_streams(), 0);
}

#[tokio::test]
async fn what_the_edge_cannot_carry_is_501_at_once() {
    let (s, _edge, ends) = session(opts());
    let cases = [
        (get("/containerLogs/a/b/c"), "10.0.0.1:9100"),
        (
            Request::connect("10.0.0.1:10250")
                .body(crate::body_empty())
                .unwrap(),
            "10.0.0.1:10250",
        ),
        (
            Request::post("/portForward/ns/pod")
                .header("connection", "Upgrade")
                .header("upgrade", "SPDY/3.1")
                .body(crate::body_empty())
                .unwrap(),
            "kubelet",
        ),
        (
            Request::post("/run/ns/pod/c")
                .header("content-length", "3")
                .body(crate::body_from("abc"))
                .unwrap(),
            "kubelet",
        ),
    ];
    for (req, target) in cases {
        let resp = s.send(req, target).await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_IMPLEMENTED);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("node ke-1 is a KubeEdge edge"), "{text}");
    }
    assert_eq!(ends.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn bad_input_ends_only_the_bad_stream_or_the_session() {
    let (s, mut edge, ends) = session(opts());
    let a = tokio::spawn({
        let s = s.clone();
        async move { s.send(get("/a"), "kubelet").await.map(|r| r.status()) }
    });
    let (id_a, _) = edge.connect().await;
    let b = tokio::spawn({
        let s = s.clone();
        async move { s.send(get("/b"), "kubelet").await.map(|r| r.status()) }
    });
    let (id_b, _) = edge.connect().await;
    // Unknown type for stream a, data for a connection that never existed.
    let mut m = BytesMut::new();
    put_uvarint(&mut m, id_a);
    put_uvarint(&mut m, 99);
    edge.send_raw(opcode::TEXT, &m).await;
    edge.send(4242, MessageType::Data, b"stray").await;
    let m = edge.message().await;
    assert_eq!((m.id, m.kind), (id_a, MessageType::RemoveConnect as u64));
    assert!(tokio::time::timeout(T, a).await.unwrap().unwrap().is_err());
    // Stream b is untouched.
    edge.send_data(id_b, b"HTTP/1.1 204 No Content\r\n\r\n")
        .await;
    assert_eq!(
        tokio::time::timeout(T, b).await.unwrap().unwrap().unwrap(),
        StatusCode::NO_CONTENT
    );
    assert!(ends.lock().unwrap().contains(&"bad_input"));
    assert!(ends.lock().unwrap().contains(&"unknown_connection"));
    assert!(!s.is_closed());
    // A truncated uvarint is a framing error: the session ends.
    edge.send_raw(opcode::TEXT, &[0x80]).await;
    tokio::time::timeout(T, s.closed()).await.unwrap();
    assert_eq!(s.end_reason(), "error");
}

#[tokio::test]
async fn pings_are_answered_and_close_sends_close_connect() {
    let (s, mut edge, _) = session(opts());
    edge.send_raw(opcode::PING, b"ping you").await;
    let (op, payload) = edge.frame().await;
    assert_eq!((op, &payload[..]), (opcode::PONG, &b"ping you"[..]));
    // A probe is a ping the edge answers.
    let probe = tokio::spawn({
        let s = s.clone();
        async move { s.send(get("/"), PING_TARGET).await.map(|r| r.status()) }
    });
    let (op, payload) = edge.frame().await;
    assert_eq!(op, opcode::PING);
    edge.send_raw(opcode::PONG, &payload).await;
    assert_eq!(
        tokio::time::timeout(T, probe)
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        StatusCode::NO_CONTENT
    );
    s.close();
    assert!(s.is_closed());
    let m = edge.message().await;
    assert_eq!((m.id, m.kind), (0, MessageType::CloseConnect as u64));
    let (op, _) = edge.frame().await;
    assert_eq!(op, opcode::CLOSE);
    drop(edge);
    tokio::time::timeout(T, s.closed()).await.unwrap();
    assert_eq!(s.end_reason(), "closed");
    assert!(matches!(
        s.send(get("/x"), "kubelet").await,
        Err(StreamError::Closed(_))
    ));
}

#[test]
fn request_json_details() {
    let req = Request::get("/containerLogs/ns/p%20od/c?x=1")
        .header("user-agent", "kube-apiserver")
        .header("host", "10.0.0.1:10250")
        .header("x-forwarded-for", "a")
        .header("x-forwarded-for", "b")
        .body(())
        .unwrap();
    let j = connect_json(7, &req, &StreamKind::Http, "127.0.0.1:10350").unwrap();
    let j: serde_json::Value = serde_json::from_slice(&j).unwrap();
    assert_eq!(j["MessID"], 7);
    assert_eq!(j["url"]["Path"], "/containerLogs/ns/p od/c");
    assert_eq!(j["url"]["RawPath"], "/containerLogs/ns/p%20od/c");
    assert_eq!(j["header"]["User-Agent"][0], "kube-apiserver");
    assert_eq!(
        j["header"]["X-Forwarded-For"],
        serde_json::json!(["a", "b"])
    );
    assert!(j["header"].get("Host").is_none());
    assert_eq!(canonical_key("sec-websocket-key"), "Sec-Websocket-Key");
    let _ = codec::MAX_MESSAGE;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_bound_ends_the_stream_with_the_most_queued() {
    let mut o = opts();
    o.stream_buffer = 256 << 10;
    o.session_buffer = 300 << 10;
    let (s, mut edge, ends) = session(o);
    let mut ids = Vec::new();
    let mut bodies = Vec::new();
    for path in [
        "/containerLogs/a/a/a?follow=true",
        "/containerLogs/b/b/b?follow=true",
    ] {
        let pending = tokio::spawn(s.send(get(path), "kubelet"));
        let (id, _) = edge.connect().await;
        let head = chunked(b"x");
        edge.send_data(id, &head[..head.len() - 5]).await;
        let resp = tokio::time::timeout(T, pending)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        bodies.push(resp.into_body());
        ids.push(id);
    }
    // Nobody reads: 200 KiB for the first, then 120 KiB for the second
    // passes the session bound (each stays under its own).
    edge.send(ids[0], MessageType::Data, &vec![b'a'; 200 << 10])
        .await;
    edge.send(ids[1], MessageType::Data, &vec![b'b'; 120 << 10])
        .await;
    let m = edge.message().await;
    assert_eq!((m.id, m.kind), (ids[0], MessageType::RemoveConnect as u64));
    assert_eq!(*ends.lock().unwrap(), vec!["session_budget"]);
    assert_eq!(s.open_streams(), 1);
    assert!(!s.is_closed());
}
