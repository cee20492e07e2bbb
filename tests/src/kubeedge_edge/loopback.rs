//! The double against a minimal in-test cloud on loopback (real TLS with the
//! KubeEdge CA, a hand-written 101, unmasked server frames) and the fixture
//! kubelet: what a Tether cloud will see from it.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::wire::{self, MessageType, opcode};
use super::*;
use crate::fixture::{self, FixtureKubelet, MetricsKind};

const STEP: Duration = Duration::from_secs(10);

struct Cloud {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    addr: SocketAddr,
}

impl Cloud {
    /// A cloud whose serving certificate comes from its own CA and which
    /// requires client certificates from the KubeEdge CA.
    async fn start(ke_ca: &KubeEdgeCa) -> (Cloud, rustls_pki_types::CertificateDer<'static>) {
        let ca = tether_pki::Ca::generate("test-cloud-ca").expect("ca");
        let leaf = ca.issue_server("cloud", &["127.0.0.1"]).expect("leaf");
        let config = tether_pki::server_config_client_auth(
            leaf.cert_chain().expect("chain"),
            leaf.key_pem.to_der().expect("key"),
            std::slice::from_ref(ke_ca.cert_der()),
            &[b"http/1.1"],
        )
        .expect("server config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cloud = Cloud {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            addr,
        };
        (cloud, ca.cert_der().clone())
    }

    /// Accepts one edge and answers its upgrade with `status`.
    async fn accept(&self, status: u16) -> (Conn, String) {
        let (tcp, _) = self.listener.accept().await.expect("accept");
        let mut io = self.acceptor.accept(tcp).await.expect("tls");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(io.read_u8().await.expect("request head"));
        }
        let head = String::from_utf8(head).expect("utf8");
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .expect("key");
        let response = if status == 101 {
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n\r\n",
                derive_accept_key(key.as_bytes())
            )
        } else {
            format!("HTTP/1.1 {status} Refused\r\nContent-Length: 0\r\n\r\n")
        };
        io.write_all(response.as_bytes()).await.expect("write");
        (Conn { io, pings: 0 }, head)
    }
}

/// What the edge sent, frames reassembled and unmasked.
#[derive(Debug, PartialEq, Eq)]
enum FromEdge {
    Message(Vec<u8>),
    Pong(Vec<u8>),
}

struct Conn {
    io: TlsStream<TcpStream>,
    pings: u64,
}

impl Conn {
    /// Sends one unmasked TEXT message, as a cloud does.
    async fn send(&mut self, message: &[u8]) {
        let mut frame = vec![0x80 | opcode::TEXT];
        match message.len() {
            n @ 0..=125 => frame.push(n as u8),
            n @ 126..=0xffff => {
                frame.push(126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(message);
        self.io.write_all(&frame).await.expect("send");
    }

    async fn send_ping(&mut self, payload: &[u8]) {
        let mut frame = vec![0x80 | opcode::PING, payload.len() as u8];
        frame.extend_from_slice(payload);
        self.io.write_all(&frame).await.expect("ping");
    }

    /// The next message or Pong (Pings are counted and skipped); None once
    /// the edge has gone.
    async fn recv(&mut self) -> Option<FromEdge> {
        let mut message = Vec::new();
        loop {
            let mut head = [0u8; 2];
            self.io.read_exact(&mut head).await.ok()?;
            assert_eq!(head[1] & 0x80, 0x80, "edge frames are masked");
            let len = match head[1] & 0x7f {
                126 => u64::from(self.io.read_u16().await.ok()?),
                127 => self.io.read_u64().await.ok()?,
                n => u64::from(n),
            };
            let mut mask = [0u8; 4];
            self.io.read_exact(&mut mask).await.ok()?;
            let mut payload = vec![0u8; len as usize];
            self.io.read_exact(&mut payload).await.ok()?;
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
            match head[0] & 0x0f {
                opcode::PING => {
                    assert_eq!(payload, PING_PAYLOAD);
                    self.pings += 1;
                }
                opcode::PONG => return Some(FromEdge::Pong(payload)),
                op => {
                    assert!(
                        op == opcode::TEXT || (op == opcode::CONTINUATION && !message.is_empty()),
                        "edge messages are TEXT, got opcode {op}"
                    );
                    message.extend(payload);
                    if head[0] & 0x80 != 0 {
                        return Some(FromEdge::Message(message));
                    }
                }
            }
        }
    }

    async fn recv_message(&mut self) -> wire::Message {
        loop {
            let next = tokio::time::timeout(STEP, self.recv())
                .await
                .expect("in time");
            match next.expect("edge still connected") {
                FromEdge::Message(m) => return wire::decode(&m).expect("decode"),
                FromEdge::Pong(_) => {}
            }
        }
    }

    /// The data of every DATA for `id` until its REMOVE_CONNECT.
    async fn collect(&mut self, id: u64) -> Vec<Vec<u8>> {
        let mut chunks = Vec::new();
        loop {
            let m = self.recv_message().await;
            assert_eq!(m.id, id, "one stream at a time in these tests");
            match MessageType::from_u64(m.kind) {
                Some(MessageType::Data) => chunks.push(m.data),
                Some(MessageType::RemoveConnect) => return chunks,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

fn connect_json(id: u64, path: &str, query: &str, method: &str, headers: &str) -> Vec<u8> {
    format!(
        r#"{{"MessID":{id},"url":{{"Scheme":"http","Host":"127.0.0.1:10350","Path":"{path}","RawQuery":"{query}"}},"header":{headers},"method":"{method}"}}"#
    )
    .into_bytes()
}

async fn setup() -> (FixtureKubelet, Cloud, KubeEdgeSpec) {
    let kubelet = FixtureKubelet::start(None).await.expect("kubelet");
    let ke_ca = KubeEdgeCa::generate().expect("ca");
    let (cloud, cloud_ca) = Cloud::start(&ke_ca).await;
    let cert = ke_ca.issue_edge("edge-1", &[]).expect("cert");
    let tls = edge_client_tls(&cert, CloudTrust::Verify(vec![cloud_ca])).expect("tls");
    let spec = KubeEdgeSpec::new("edge-1", cloud.addr, tls, kubelet.addr);
    (kubelet, cloud, spec)
}

#[tokio::test]
async fn serves_logs_metrics_and_exec_then_obeys_close() {
    let (kubelet, cloud, mut spec) = setup().await;
    spec.reconnect = false;
    spec.ping_every = Duration::from_millis(50);
    let edge = KubeEdgeEdge::start(spec);
    let (mut conn, head) = cloud.accept(101).await;
    assert!(
        head.starts_with("GET /v1/kubeedge/connect HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.contains("\r\nSessionhostnameoverride: edge-1\r\n"),
        "{head}"
    );
    assert!(edge.wait_sessions(1, STEP).await);

    // Logs: the body in chunks of at most 256 bytes, then REMOVE.
    let logs = connect_json(
        5,
        "/containerLogs/default/web-0/nginx",
        "bytes=1000",
        "",
        r#"{"Accept-Encoding":["identity"]}"#,
    );
    conn.send(&wire::encode(5, MessageType::LogsConnect, &logs))
        .await;
    let chunks = conn.collect(5).await;
    assert!(
        chunks
            .iter()
            .all(|c| !c.is_empty() && c.len() <= READ_CHUNK)
    );
    let expected: Vec<u8> = fixture::log_bytes(1000).flatten().collect();
    assert_eq!(chunks.concat(), expected);

    // A following log runs until the cloud's REMOVE, which the edge echoes
    // after closing the kubelet request.
    let follow = connect_json(
        9,
        "/containerLogs/default/web-0/nginx",
        "bytes=100\\u0026follow=true",
        "",
        "{}",
    );
    conn.send(&wire::encode(9, MessageType::LogsConnect, &follow))
        .await;
    let mut seen = 0;
    while seen < 100 {
        let m = conn.recv_message().await;
        assert_eq!((m.id, m.kind), (9, MessageType::Data as u64));
        seen += m.data.len();
    }
    conn.send(&wire::encode(9, MessageType::RemoveConnect, &[]))
        .await;
    let _late_data = conn.collect(9).await;
    assert!(kubelet.wait_follow_disconnect(0, STEP).await);

    // Metrics: one DATA per line, each ending in `\n`.
    let metrics = connect_json(6, "/metrics/resource", "bytes=3000", "", "{}");
    conn.send(&wire::encode(6, MessageType::MetricConnect, &metrics))
        .await;
    let lines = conn.collect(6).await;
    assert!(lines.len() > 1);
    assert!(
        lines
            .iter()
            .all(|l| l.ends_with(b"\n") && l.iter().filter(|b| **b == b'\n').count() == 1)
    );
    assert_eq!(
        lines.concat(),
        metrics_body_bytes(MetricsKind::Resource, 3000)
    );

    // A metrics line over 64 KiB ends the stream with nothing sent.
    let long = connect_json(7, "/metrics/single-line", "bytes=100000", "", "{}");
    conn.send(&wire::encode(7, MessageType::MetricConnect, &long))
        .await;
    assert!(conn.collect(7).await.is_empty());

    // Lines before an overlong one still go out; the stream ends there.
    let body = metrics_body_bytes(MetricsKind::Resource, 200_000);
    let cut = connect_json(10, "/metrics/resource", "bytes=200000", "", "{}");
    conn.send(&wire::encode(10, MessageType::MetricConnect, &cut))
        .await;
    let sent = conn.collect(10).await.concat();
    assert!(!sent.is_empty() && body.starts_with(&sent));
    let next_line = body[sent.len()..]
        .split(|b| *b == b'\n')
        .next()
        .expect("line");
    assert!(next_line.len() >= MAX_LINE_BUFFER, "{}", next_line.len());

    // DATA for an unknown connection is dropped without a word.
    conn.send(&wire::encode(99, MessageType::Data, b"lost"))
        .await;

    // An upgrade through the exec path: the kubelet's own 101 comes back as
    // DATA, then bytes both ways. (The fixture's raw SPDY echo is on its
    // port-forward path; its SPDY exec speaks the real protocol.)
    let exec = connect_json(
        8,
        "/portForward/default/web-0",
        "",
        "POST",
        r#"{"Connection":["Upgrade"],"Upgrade":["SPDY/3.1"]}"#,
    );
    conn.send(&wire::encode(8, MessageType::ExecConnect, &exec))
        .await;
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let m = conn.recv_message().await;
        assert_eq!((m.id, m.kind), (8, MessageType::Data as u64));
        assert!(m.data.len() <= READ_CHUNK);
        got.extend(m.data);
    }
    assert!(got.starts_with(b"HTTP/1.1 101 "), "{got:?}");
    conn.send(&wire::encode(8, MessageType::Data, b"echo me"))
        .await;
    let mut echoed = Vec::new();
    while echoed.len() < 7 {
        let m = conn.recv_message().await;
        assert_eq!((m.id, m.kind), (8, MessageType::Data as u64));
        echoed.extend(m.data);
    }
    assert_eq!(echoed, b"echo me");

    // Pings every period, Pongs for the cloud's Pings.
    conn.send_ping(b"cloud").await;
    let pong = tokio::time::timeout(STEP, conn.recv())
        .await
        .expect("in time");
    assert_eq!(pong, Some(FromEdge::Pong(b"cloud".to_vec())));
    while conn.pings == 0 {
        conn.send_ping(b"again").await;
        let _ = tokio::time::timeout(STEP, conn.recv())
            .await
            .expect("in time");
    }

    // The cloud must not send for a connection the edge has removed; the
    // double counts it (the Pong after it shows the read loop got that far).
    assert_eq!(edge.late_messages(), 0);
    conn.send(&wire::encode(5, MessageType::Data, b"too late"))
        .await;
    conn.send_ping(b"sync").await;
    let pong = tokio::time::timeout(STEP, conn.recv())
        .await
        .expect("in time");
    assert_eq!(pong, Some(FromEdge::Pong(b"sync".to_vec())));
    assert_eq!(edge.late_messages(), 1);

    // CLOSE_CONNECT ends the session with its reason; no redial.
    conn.send(&wire::encode(
        0,
        MessageType::CloseConnect,
        b"node not admitted",
    ))
    .await;
    assert_eq!(
        edge.wait_ended(1, STEP).await,
        Some(SessionEnd::Closed("node not admitted".into()))
    );
    assert_eq!(edge.close_reason().as_deref(), Some("node not admitted"));
    loop {
        match tokio::time::timeout(STEP, conn.recv())
            .await
            .expect("in time")
        {
            None => break,
            Some(FromEdge::Pong(_)) => {}
            Some(FromEdge::Message(m)) => panic!("message after close: {m:?}"),
        }
    }
    let kinds: Vec<_> = edge.connects().iter().map(|c| (c.id, c.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (5, MessageType::LogsConnect),
            (9, MessageType::LogsConnect),
            (6, MessageType::MetricConnect),
            (7, MessageType::MetricConnect),
            (10, MessageType::MetricConnect),
            (8, MessageType::ExecConnect),
        ]
    );
    assert_eq!(edge.connects()[5].method, "POST");
    assert_eq!(edge.sessions(), 1);
}

fn metrics_body_bytes(kind: MetricsKind, total: usize) -> Vec<u8> {
    fixture::metrics_body(kind, total).to_vec()
}

#[tokio::test]
async fn a_refused_upgrade_is_reported_with_its_status() {
    let (_kubelet, cloud, spec) = setup().await;
    let attempt = tokio::spawn(KubeEdgeEdge::connect_once(spec, STEP));
    let (_conn, _) = cloud.accept(403).await;
    assert_eq!(attempt.await.expect("join"), Some(SessionEnd::Refused(403)));
}

#[tokio::test]
async fn kill_redials_and_faults_reach_the_cloud() {
    let (_kubelet, cloud, mut spec) = setup().await;
    spec.redial_every = Duration::from_millis(50);
    let edge = KubeEdgeEdge::start(spec);
    let (mut first, _) = cloud.accept(101).await;
    assert!(edge.wait_sessions(1, STEP).await);

    assert!(edge.inject(Fault::truncated_uvarint()).await);
    assert_eq!(
        tokio::time::timeout(STEP, first.recv())
            .await
            .expect("in time"),
        Some(FromEdge::Message(vec![0x80]))
    );
    assert!(edge.inject(Fault::unknown_type(3, 9)).await);
    let m = first.recv_message().await;
    assert_eq!((m.id, m.kind), (3, 9));

    // Killed: the socket just goes; a new session follows.
    edge.kill();
    assert_eq!(
        tokio::time::timeout(STEP, first.recv())
            .await
            .expect("in time"),
        None
    );
    assert_eq!(edge.wait_ended(1, STEP).await, Some(SessionEnd::Killed));
    let (mut second, _) = cloud.accept(101).await;
    assert!(edge.wait_sessions(2, STEP).await);

    // A type above 6 would crash a v1.14-v1.23.1 edge.
    second.send(&wire::encode_raw(1, 7, b"")).await;
    assert!(matches!(
        edge.wait_ended(2, STEP).await,
        Some(SessionEnd::WouldPanic(_))
    ));
    // A truncated uvarint from the cloud ends the session too.
    let (mut third, _) = cloud.accept(101).await;
    third.send(&[0x80]).await;
    assert!(matches!(
        edge.wait_ended(3, STEP).await,
        Some(SessionEnd::Protocol(_))
    ));
    edge.stop();
}

#[tokio::test]
async fn sends_its_certificate_only_to_a_cloud_that_names_its_ca() {
    let ke_ca = KubeEdgeCa::generate().expect("ca");
    let other = tether_pki::Ca::generate("some-other-ca").expect("ca");
    let cloud_ca = tether_pki::Ca::generate("test-cloud-ca").expect("ca");
    let leaf = cloud_ca
        .issue_server("cloud", &["127.0.0.1"])
        .expect("leaf");
    let cert = ke_ca.issue_edge("edge-1", &[]).expect("cert");
    let tls =
        edge_client_tls(&cert, CloudTrust::Verify(vec![cloud_ca.cert_der().clone()])).expect("tls");
    for (hints, sent) in [
        (
            vec![other.cert_der().clone(), ke_ca.cert_der().clone()],
            true,
        ),
        (vec![other.cert_der().clone()], false),
    ] {
        // Client certificates optional, so the handshake completes either way
        // and the test sees what the edge presented.
        let config = tether_pki::server_config_optional_client_auth(
            leaf.cert_chain().expect("chain"),
            leaf.key_pem.to_der().expect("key"),
            &hints,
        )
        .expect("server config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let spec = KubeEdgeSpec::new(
            "edge-1",
            listener.local_addr().expect("addr"),
            tls.clone(),
            "127.0.0.1:1".parse().expect("addr"),
        );
        let edge = tokio::spawn(KubeEdgeEdge::connect_once(spec, STEP));
        let (tcp, _) = listener.accept().await.expect("accept");
        let io = TlsAcceptor::from(Arc::new(config))
            .accept(tcp)
            .await
            .expect("tls");
        assert_eq!(io.get_ref().1.peer_certificates().is_some(), sent);
        drop(io);
        assert!(edge.await.expect("join").is_some());
    }
}
