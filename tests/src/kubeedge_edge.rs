//! A test double of an unmodified KubeEdge `edgecore`'s stream tunnel
//! (edgestream), for testing Tether's cloud against the KubeEdge protocol
//! without Go. It dials the cloud, upgrades to WebSocket, and serves the
//! cloud's LOGS/METRIC/EXEC/ATTACH requests from a [`crate::fixture`]
//! kubelet, as `docs/kubeedge-compat.md` describes the real edge. The framing
//! is its own (module `wire`); it shares no code with Tether's cloud side.
//!
//! # Use
//!
//! ```no_run
//! # async fn demo(cloud: std::net::SocketAddr, cloud_ca: rustls_pki_types::CertificateDer<'static>,
//! #               kubelet: std::net::SocketAddr) -> anyhow::Result<()> {
//! use std::time::Duration;
//! use tether_tests::kubeedge_edge::{CloudTrust, KubeEdgeCa, KubeEdgeEdge, KubeEdgeSpec, edge_client_tls};
//!
//! let ke_ca = KubeEdgeCa::generate()?;                 // the cloud must trust ke_ca.cert_der()
//! let cert = ke_ca.issue_edge("edge-1", &[])?;          // CN=system:node:edge-1, O=system:nodes
//! let tls = edge_client_tls(&cert, CloudTrust::Verify(vec![cloud_ca]))?;
//! let edge = KubeEdgeEdge::start(KubeEdgeSpec::new("edge-1", cloud, tls, kubelet));
//! assert!(edge.wait_sessions(1, Duration::from_secs(5)).await);
//! // ... drive kubectl-like requests through the cloud's front ...
//! edge.kill();                                          // socket dropped, redial in 2 s
//! # Ok(()) }
//! ```
//!
//! For a refusal, [`KubeEdgeEdge::connect_once`] returns how the one session
//! ended: [`SessionEnd::Closed`] with the `CLOSE_CONNECT` reason, or
//! [`SessionEnd::Refused`] with the upgrade's HTTP status. [`Fault`] puts bad
//! input on the wire on demand ([`KubeEdgeEdge::inject`]); [`KubeEdgeEdge::connects`]
//! shows every CONNECT the cloud sent, decoded.
//!
//! # What it copies from KubeEdge (files in `kubeedge/kubeedge`)
//!
//! - Dial (`edge/pkg/edgestream/edgestream.go`, `Start`, `TLSClientConnect`;
//!   gorilla `client.go`): TCP, TLS 1.2/1.3 with the edge's client
//!   certificate and no ALPN; no SNI when the cloud address is an IP; the
//!   certificate is sent only if the server's CertificateRequest names its
//!   issuer or names no CA, as Go's `crypto/tls` decides. Request
//!   `GET /v1/kubeedge/connect` with `Host`, `User-Agent: Go-http-client/1.1`,
//!   `Connection: Upgrade`, `Sec-WebSocket-Key`, `Sec-WebSocket-Version: 13`,
//!   `Sessionhostnameoverride`, `Sessioninternalip` (Go's canonical spelling
//!   and sorted order), `Upgrade: websocket`; no subprotocol, no extension.
//!   A non-101 answer ends the attempt; redial on a 2 s ticker, forever, no
//!   backoff, when `reconnect` is on (the default).
//! - Framing (`pkg/stream/tunnel.go`, `pkg/stream/message.go`, gorilla
//!   `conn.go`): every message a masked TEXT message, cut into 4096-byte
//!   frames (TEXT FIN=0, then CONTINUATION) when longer; TEXT or BINARY
//!   accepted; Pings answered with Pongs while the read loop runs; a Ping
//!   `ping you` every 5 s whose 1 s-bounded failure stops the pinger only;
//!   a Close frame answered with its code and the session ended. Messages
//!   are `uvarint ConnectID | uvarint type | data`; data beyond 1 MiB
//!   dropped silently; a bad uvarint ends the session.
//! - Dispatch (`edge/pkg/edgestream/tunnel.go`, `Serve`, `ServeConnection`):
//!   CONNECTs (0, 1, 2, 6) each served by a new task that decodes the JSON
//!   as Go's `encoding/json` would (keys case-insensitive, unknown keys
//!   ignored; bad JSON is not answered) and registers the connection under
//!   the header's ConnectID itself, so a `DATA` right behind its CONNECT can
//!   be dropped; everything the edge sends back carries the JSON's `MessID`;
//!   every message also offered to a registered connection of that ID;
//!   `DATA`/`REMOVE_CONNECT` for unknown IDs dropped silently; a 128-message
//!   inbox per connection whose fullness blocks the session's only read loop
//!   (no Pongs, no other stream moves); `CLOSE_CONNECT` ends the session with
//!   its reason; a type above 6 ends it as [`SessionEnd::WouldPanic`]
//!   (v1.14 to v1.23.1 edges panic there).
//! - Logs (`pkg/stream/edgedlogconnection.go`): `GET` of the JSON's URL with
//!   exactly its headers (plus `Host` and Go's default `User-Agent`); the body,
//!   whatever the status, as `DATA` of at most 256 bytes with `MessID` as the
//!   ID; then `REMOVE_CONNECT` (3 write attempts); a cloud `REMOVE_CONNECT`
//!   stops it the same way; cloud `DATA` ignored; status and headers never
//!   sent; a failed request answered with nothing at all.
//! - Metrics (`pkg/stream/edgedmetricsconnection.go`): the same with
//!   `Accept-Encoding: identity` forced and the body cut by a
//!   `bufio.Scanner`: one `DATA` per line with `\n` appended, `\r\n` becomes
//!   `\n`, a last line without newline gains one, a line over 65535 bytes
//!   ends the stream early ([`LineScanner`]).
//! - Exec and attach (`pkg/stream/edgedexecconnection.go`,
//!   `edgedattachconnection.go`, apimachinery `SpdyRoundTripper.Dial`): a TCP
//!   connection to the kubelet, the request head as Go's `Request.Write`
//!   writes it ([`ConnectRecord::request_head`]), the response never read;
//!   kubelet bytes as `DATA` of at most 256 bytes, cloud `DATA` written as
//!   is (write errors ignored). Kubelet EOF or error ends it with
//!   `REMOVE_CONNECT`. A cloud `REMOVE_CONNECT` stops draining the inbox and
//!   ends the stream only when the pending kubelet read returns: a quiet
//!   kubelet keeps it open, and one more `DATA` may follow. Like the real
//!   edge, the double never looks inside these bytes; behind it the fixture
//!   kubelet speaks exec and attach over SPDY/3.1 (remotecommand v5/v4,
//!   `crate::spdy`) and WebSocket, so tests prove the whole streaming
//!   protocol through it (stdin, stdout, stderr, exit status), not only a
//!   byte pipe.
//!
//! # What it changes or leaves out
//!
//! - **Kubelet address**: KubeEdge's cloud writes `127.0.0.1:10350` into
//!   every CONNECT; the double sends those requests to the fixture kubelet
//!   given in [`KubeEdgeSpec::kubelet`] (the `Host` header still says
//!   `127.0.0.1:10350`). Other hosts are dialled only if they are loopback
//!   addresses; `https` URLs and non-loopback hosts get no answer, like a
//!   failed request.
//! - Cloud verification is on by default ([`CloudTrust::Verify`]); real
//!   edges skip it ([`CloudTrust::SkipVerify`] does the same).
//! - The first dial happens at once, not after the first 2 s tick; the
//!   redial period, ping period and handshake timeout are configurable.
//! - Not copied: the inbox-close race that can panic `edgecore` (counted
//!   instead, see [`KubeEdgeEdge::late_messages`]); the last `DATA` a logs
//!   body reader can still send after its `REMOVE_CONNECT`; Go's
//!   transparent `Accept-Encoding: gzip` and redirect following in the logs
//!   client; the 2-slot stop channel; the master branch's "log and ignore"
//!   for unknown types; the wait for edgehub's certificates; proxies.
//! - Strict where gorilla is lax, to catch cloud bugs early: a 101 with a
//!   subprotocol or extension is a failed dial.
//! - Test hooks a real edge lacks: [`KubeEdgeEdge::kill`] (drop the socket
//!   as a crash does), [`KubeEdgeEdge::stall`] (stop the read loop, as a full
//!   inbox does, on demand), [`KubeEdgeEdge::inject`] ([`Fault`]), and the
//!   counters and records on [`KubeEdgeEdge`].
//! - Bounded: at most [`MAX_CONNECTIONS`] connections per session (beyond
//!   it a CONNECT is ignored), a 64-entry writer queue, 16 KiB of upgrade
//!   response head, and the last 256 CONNECTs recorded.

mod pki;
mod serve;
mod session;
pub mod wire;

#[cfg(test)]
mod loopback;
#[cfg(test)]
mod tests;

pub use pki::{CloudTrust, KubeEdgeCa, edge_client_tls};
pub use serve::{
    ConnectRecord, INBOX, KUBEEDGE_KUBELET_HOST, LineScanner, LineTooLong, MAX_LINE_BUFFER,
    READ_CHUNK,
};
pub use wire::MessageType;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::debug;

/// The path edgestream dials (`edgestream.go`, `Start`).
pub const CONNECT_PATH: &str = "/v1/kubeedge/connect";
/// The payload of the edge's Pings (`tunnel.go`, `startPing`).
pub const PING_PAYLOAD: &[u8] = b"ping you";
/// Connections one session serves at once; the real edge has no limit.
pub const MAX_CONNECTIONS: usize = 1024;
const RECORDED_CONNECTS: usize = 256;

/// Configuration of one double edge.
#[derive(Clone, Debug)]
pub struct KubeEdgeSpec {
    /// `Sessionhostnameoverride`: edged's `hostnameOverride`, the node name.
    pub node: String,
    /// `Sessioninternalip`: edged's `nodeIP` (may be empty). Default `127.0.0.1`.
    pub internal_ip: String,
    /// The cloud's tunnel address (edgestream's `server`).
    pub cloud: SocketAddr,
    /// Name checked against the cloud's certificate; an IP sends no SNI, as
    /// Go does for an IP literal. Default: the IP of `cloud`.
    pub server_name: String,
    /// TLS client configuration, usually from [`edge_client_tls`].
    pub tls: Arc<rustls::ClientConfig>,
    /// The fixture kubelet that stands in for edged's `127.0.0.1:10350`.
    pub kubelet: SocketAddr,
    /// Redial after a session ends, as edgecore does. Default true.
    pub reconnect: bool,
    /// Redial ticker period. Default 2 s.
    pub redial_every: Duration,
    /// Ping period. Default 5 s.
    pub ping_every: Duration,
    /// Bound on TCP + TLS + upgrade (`EdgeStream.handshakeTimeout`). Default 30 s.
    pub handshake_timeout: Duration,
}

impl KubeEdgeSpec {
    /// An edge named `node` dialing `cloud` with `tls`, serving from `kubelet`,
    /// with edgecore's defaults.
    pub fn new(
        node: &str,
        cloud: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        kubelet: SocketAddr,
    ) -> Self {
        Self {
            node: node.to_owned(),
            internal_ip: "127.0.0.1".to_owned(),
            cloud,
            server_name: cloud.ip().to_string(),
            tls,
            kubelet,
            reconnect: true,
            redial_every: Duration::from_secs(2),
            ping_every: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// How one session (or one attempt at one) ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// TCP, TLS or the upgrade failed, or timed out (gorilla: "bad handshake").
    DialFailed(String),
    /// The upgrade was answered with this status instead of 101.
    Refused(u16),
    /// The cloud sent `CLOSE_CONNECT` with this reason.
    Closed(String),
    /// The cloud sent something a v1.14 to v1.23.1 edge panics on.
    WouldPanic(String),
    /// A framing error: bad uvarint, or a frame gorilla refuses.
    Protocol(String),
    /// The connection ended: EOF, read error, or a Close frame.
    Disconnected(String),
    /// [`KubeEdgeEdge::kill`].
    Killed,
}

/// Bad input the double can put on the wire on demand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Bytes written on the TLS stream as they are, outside any frame.
    Raw(Vec<u8>),
    /// One (masked) TEXT message with this payload.
    Text(Vec<u8>),
    /// One (masked) BINARY message with this payload.
    Binary(Vec<u8>),
}

impl Fault {
    /// A message that ends inside its ConnectID uvarint.
    pub fn truncated_uvarint() -> Self {
        Self::Text(vec![0x80])
    }

    /// A ConnectID uvarint of 11 bytes (Go: overflow).
    pub fn overlong_uvarint() -> Self {
        Self::Text(vec![0xff; 11])
    }

    /// A message of type `kind` (7 and up are unknown) for connection `id`.
    pub fn unknown_type(id: u64, kind: u64) -> Self {
        Self::Text(wire::encode_raw(id, kind, &[]))
    }

    /// `DATA` for `id` (an unknown connection, or one already ended).
    pub fn data(id: u64, bytes: &[u8]) -> Self {
        Self::Text(wire::encode(id, MessageType::Data, bytes))
    }

    /// A `DATA` for `id` with `len` bytes of data (over 1 MiB to test the
    /// cloud's bound).
    pub fn oversized(id: u64, len: usize) -> Self {
        Self::Text(wire::encode(id, MessageType::Data, &vec![b'x'; len]))
    }
}

/// What the session's writer task puts on the socket.
pub(crate) enum Outgoing {
    Message(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Vec<u8>),
    Raw(Vec<u8>),
    /// TLS close_notify and TCP FIN, as Go's `Conn.Close` does.
    Shutdown,
}

/// A running double edge. Dropping it (or [`Self::stop`]) ends everything
/// abruptly, like a killed process.
pub struct KubeEdgeEdge {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for KubeEdgeEdge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubeEdgeEdge {
    /// Starts dialing now; redials per [`KubeEdgeSpec::reconnect`].
    pub fn start(spec: KubeEdgeSpec) -> Self {
        let shared = Arc::new(Shared::new());
        let task = tokio::spawn(session::run(spec, shared.clone()));
        Self { shared, task }
    }

    /// One session, no redial: returns how it ended, or `None` if it was
    /// still running after `timeout` (the double is then dropped).
    pub async fn connect_once(mut spec: KubeEdgeSpec, timeout: Duration) -> Option<SessionEnd> {
        spec.reconnect = false;
        let edge = Self::start(spec);
        edge.wait_ended(1, timeout).await
    }

    /// Sessions established (101 received) so far.
    pub fn sessions(&self) -> u64 {
        *self.shared.sessions.borrow()
    }

    /// Waits until at least `n` sessions were established; false on timeout.
    pub async fn wait_sessions(&self, n: u64, timeout: Duration) -> bool {
        let mut rx = self.shared.sessions.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|s| *s >= n)).await,
            Ok(Ok(_))
        )
    }

    /// Sessions and dial attempts that have ended so far.
    pub fn ended(&self) -> u64 {
        self.shared.ends.borrow().0
    }

    /// How the latest session or attempt ended.
    pub fn last_end(&self) -> Option<SessionEnd> {
        self.shared.ends.borrow().1.clone()
    }

    /// Waits until at least `n` sessions or attempts have ended and returns
    /// the latest end; `None` on timeout.
    pub async fn wait_ended(&self, n: u64, timeout: Duration) -> Option<SessionEnd> {
        let mut rx = self.shared.ends.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|(count, _)| *count >= n)).await {
            Ok(Ok(ends)) => ends.1.clone(),
            _ => None,
        }
    }

    /// The reason of the latest `CLOSE_CONNECT` the cloud sent.
    pub fn close_reason(&self) -> Option<String> {
        self.shared.close_reason.lock().expect("lock").clone()
    }

    /// Every CONNECT of the current and past sessions as the edge decoded
    /// it, oldest first (the last 256).
    pub fn connects(&self) -> Vec<ConnectRecord> {
        let recorded = self.shared.connects.lock().expect("lock");
        recorded.iter().cloned().collect()
    }

    /// Messages the cloud sent for a connection that had already ended on
    /// the edge: a logs or metrics connection whose kubelet body had ended
    /// (its inbox is closed then, and a real `edgecore` panics on the send,
    /// `docs/kubeedge-compat.md` section 8), or any connection after the
    /// edge's `REMOVE_CONNECT` for it. It can also happen honestly when both
    /// sides end a stream at once, so assert 0 only where the test controls
    /// the order.
    pub fn late_messages(&self) -> u64 {
        self.shared.late.load(Ordering::Relaxed)
    }

    /// Drops the current session's socket without a Close frame or TLS
    /// close_notify, as a crashed edge does. A reconnecting edge redials on
    /// its next tick.
    pub fn kill(&self) {
        self.shared.kill.send_modify(|n| *n += 1);
    }

    /// Stops the edge for good, abruptly.
    pub fn stop(self) {
        drop(self);
    }

    /// Stalls (true) or resumes the session's read loop, as a full inbox
    /// does on a real edge: no message is read, no Ping answered.
    pub fn stall(&self, stalled: bool) {
        self.shared.stalled.send_replace(stalled);
    }

    /// Writes `fault` on the current session; false if there is none.
    pub async fn inject(&self, fault: Fault) -> bool {
        let Some(out) = self.shared.writer.lock().expect("lock").clone() else {
            return false;
        };
        let item = match fault {
            Fault::Raw(b) => Outgoing::Raw(b),
            Fault::Text(b) => Outgoing::Message(b),
            Fault::Binary(b) => Outgoing::Binary(b),
        };
        out.send(item).await.is_ok()
    }
}

/// State the handle and the sessions share.
pub(crate) struct Shared {
    sessions: watch::Sender<u64>,
    ends: watch::Sender<(u64, Option<SessionEnd>)>,
    close_reason: Mutex<Option<String>>,
    writer: Mutex<Option<mpsc::Sender<Outgoing>>>,
    connects: Mutex<VecDeque<ConnectRecord>>,
    late: AtomicU64,
    kill: watch::Sender<u64>,
    stalled: watch::Sender<bool>,
}

impl Shared {
    fn new() -> Self {
        Self {
            sessions: watch::Sender::new(0),
            ends: watch::Sender::new((0, None)),
            close_reason: Mutex::new(None),
            writer: Mutex::new(None),
            connects: Mutex::new(VecDeque::new()),
            late: AtomicU64::new(0),
            kill: watch::Sender::new(0),
            stalled: watch::Sender::new(false),
        }
    }

    pub(crate) fn record_end(&self, end: SessionEnd) {
        debug!(?end, "kubeedge double: session ended");
        if let SessionEnd::Closed(reason) = &end {
            *self.close_reason.lock().expect("lock") = Some(reason.clone());
        }
        self.ends.send_modify(|(count, last)| {
            *count += 1;
            *last = Some(end);
        });
    }

    pub(crate) fn record_connect(&self, record: ConnectRecord) {
        let mut recorded = self.connects.lock().expect("lock");
        if recorded.len() == RECORDED_CONNECTS {
            recorded.pop_front();
        }
        recorded.push_back(record);
    }
}
