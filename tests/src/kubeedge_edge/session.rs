//! One session of the double, from dial to end, after
//! `edge/pkg/edgestream/edgestream.go` (`Start`, `TLSClientConnect`) and
//! `edge/pkg/edgestream/tunnel.go` (`Serve`, `startPing`): the redial
//! ticker, TCP + TLS + upgrade, the writer that owns the socket, the pinger
//! and the single read loop that dispatches messages.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::debug;

use super::wire::{self, FrameReader, Incoming, MessageType, opcode};
use super::{
    CONNECT_PATH, KubeEdgeSpec, MAX_CONNECTIONS, Outgoing, PING_PAYLOAD, SessionEnd, Shared, serve,
};

const WRITER_QUEUE: usize = 64;
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
const REMEMBERED_ENDS: usize = 1024;
/// gorilla's write deadline for control frames (pings, pongs, close).
const CONTROL_WRITE_DEADLINE: Duration = Duration::from_secs(1);
/// How long a graceful end waits for the TLS close_notify to be written.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// What a session's connection tasks share.
pub(crate) struct SessionCtx {
    pub(crate) out: mpsc::Sender<Outgoing>,
    pub(crate) kubelet: SocketAddr,
    pub(crate) shared: Arc<Shared>,
    conns: Mutex<HashMap<u64, mpsc::Sender<wire::Message>>>,
    /// Connections this session sent `REMOVE_CONNECT` for (the latest
    /// [`REMEMBERED_ENDS`]), to count the cloud's late messages.
    ended: Mutex<(VecDeque<u64>, HashSet<u64>)>,
}

impl SessionCtx {
    pub(crate) fn register(&self, id: u64, inbox: mpsc::Sender<wire::Message>) {
        self.conns.lock().expect("lock").insert(id, inbox);
        // A reused ID starts a new connection.
        self.ended.lock().expect("lock").1.remove(&id);
    }

    /// The edge sent `REMOVE_CONNECT` for `id`.
    pub(crate) fn ended(&self, id: u64) {
        let mut guard = self.ended.lock().expect("lock");
        let (order, set) = &mut *guard;
        if set.insert(id) {
            order.push_back(id);
            if order.len() > REMEMBERED_ENDS
                && let Some(old) = order.pop_front()
            {
                set.remove(&old);
            }
        }
    }

    fn was_ended(&self, id: u64) -> bool {
        self.ended.lock().expect("lock").1.contains(&id)
    }

    pub(crate) fn deregister(&self, id: u64) {
        self.conns.lock().expect("lock").remove(&id);
    }

    fn inbox(&self, id: u64) -> Option<mpsc::Sender<wire::Message>> {
        self.conns.lock().expect("lock").get(&id).cloned()
    }
}

/// The reconnect loop of `edgestream.go`, `Start`: a ticker, one session per
/// tick, each blocking for its life.
pub(super) async fn run(spec: KubeEdgeSpec, shared: Arc<Shared>) {
    let mut ticker = tokio::time::interval(spec.redial_every);
    // Go's ticker keeps one pending tick: after a long session the redial
    // is immediate, after a short one it waits for the next tick.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut kill = shared.kill.subscribe();
    loop {
        ticker.tick().await;
        kill.borrow_and_update();
        let end = session(&spec, &shared, &mut kill).await;
        shared.record_end(end);
        if !spec.reconnect {
            return;
        }
    }
}

/// One session from dial to end.
async fn session(
    spec: &KubeEdgeSpec,
    shared: &Arc<Shared>,
    kill: &mut watch::Receiver<u64>,
) -> SessionEnd {
    let dialed = tokio::select! {
        r = tokio::time::timeout(spec.handshake_timeout, dial(spec)) => match r {
            Ok(r) => r,
            Err(_) => Err(SessionEnd::DialFailed("handshake timed out".into())),
        },
        _ = kill.changed() => return SessionEnd::Killed,
    };
    let (tls, leftover) = match dialed {
        Ok(d) => d,
        Err(end) => return end,
    };
    let (rd, wr) = tokio::io::split(tls);
    let (out_tx, out_rx) = mpsc::channel(WRITER_QUEUE);
    // Aborted if this future is dropped (the handle went away mid-session).
    let mut writer = AbortOnDrop(tokio::spawn(write_loop(wr, out_rx)));
    let mut tasks = JoinSet::new();
    let (frames_tx, frames_rx) = mpsc::channel(1);
    tasks.spawn(read_frames(
        FrameReader::new(std::io::Cursor::new(leftover).chain(rd)),
        frames_tx,
    ));
    tasks.spawn(ping_loop(out_tx.clone(), spec.ping_every));
    *shared.writer.lock().expect("lock") = Some(out_tx.clone());
    // Counted once `inject` can reach the session.
    shared.sessions.send_modify(|n| *n += 1);
    let ctx = Arc::new(SessionCtx {
        out: out_tx.clone(),
        kubelet: spec.kubelet,
        shared: shared.clone(),
        conns: Mutex::new(HashMap::new()),
        ended: Mutex::new((VecDeque::new(), HashSet::new())),
    });
    let end = read_loop(&ctx, frames_rx, &mut tasks, kill).await;
    *shared.writer.lock().expect("lock") = None;
    // Every connection of the session dies with it.
    tasks.abort_all();
    drop(ctx);
    if end != SessionEnd::Killed {
        // Go's `Conn.Close` on every other way out: close_notify, then FIN.
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, out_tx.send(Outgoing::Shutdown)).await;
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, &mut writer.0).await;
    }
    // A killed session's socket is dropped as it is: no Close frame, no
    // close_notify, like a crashed process.
    drop(writer);
    end
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// TCP, TLS and the WebSocket upgrade; returns the stream and any bytes
/// read past the 101 response head.
async fn dial(
    spec: &KubeEdgeSpec,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>), SessionEnd> {
    let failed =
        |what: &str, e: &dyn std::fmt::Display| SessionEnd::DialFailed(format!("{what}: {e}"));
    let tcp = TcpStream::connect(spec.cloud)
        .await
        .map_err(|e| failed("tcp", &e))?;
    let _ = tcp.set_nodelay(true);
    let name =
        ServerName::try_from(spec.server_name.clone()).map_err(|e| failed("server name", &e))?;
    let mut tls = TlsConnector::from(spec.tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| failed("tls", &e))?;
    let key = generate_key();
    tls.write_all(&upgrade_request(spec, &key))
        .await
        .map_err(|e| failed("write upgrade", &e))?;
    let mut buf = Vec::with_capacity(1024);
    let head_len = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(SessionEnd::DialFailed(
                "upgrade response head too long".into(),
            ));
        }
        let mut chunk = [0u8; 1024];
        match tls.read(&mut chunk).await {
            Ok(0) => {
                return Err(SessionEnd::DialFailed(
                    "eof before the upgrade response".into(),
                ));
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(failed("read upgrade response", &e)),
        }
    };
    check_upgrade_response(&buf[..head_len], &key)?;
    Ok((tls, buf[head_len..].to_vec()))
}

/// The upgrade request as gorilla and Go's `Request.Write` put it on the
/// wire: Host and User-Agent first, then the header map in sorted key order.
pub(super) fn upgrade_request(spec: &KubeEdgeSpec, key: &str) -> Vec<u8> {
    format!(
        "GET {CONNECT_PATH} HTTP/1.1\r\n\
         Host: {}\r\n\
         User-Agent: Go-http-client/1.1\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Version: 13\r\n\
         Sessionhostnameoverride: {}\r\n\
         Sessioninternalip: {}\r\n\
         Upgrade: websocket\r\n\r\n",
        spec.cloud, spec.node, spec.internal_ip
    )
    .into_bytes()
}

/// gorilla's checks on the response (status 101, `Upgrade: websocket`,
/// `Connection: upgrade`, the accept key), plus no subprotocol and no
/// extension, which Tether's cloud must not answer with.
pub(super) fn check_upgrade_response(head: &[u8], key: &str) -> Result<(), SessionEnd> {
    let bad = |why: &str| SessionEnd::DialFailed(format!("bad handshake: {why}"));
    let text = std::str::from_utf8(head).map_err(|_| bad("response head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or_default(), parts.next());
    let code: u16 = match (
        version.starts_with("HTTP/1."),
        code.and_then(|c| c.parse().ok()),
    ) {
        (true, Some(c)) => c,
        _ => return Err(bad("malformed status line")),
    };
    if code != 101 {
        return Err(SessionEnd::Refused(code));
    }
    let mut headers: HashMap<String, Vec<String>> = HashMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad("malformed header"))?;
        headers
            .entry(name.trim().to_ascii_lowercase())
            .or_default()
            .push(value.trim().to_owned());
    }
    let has_token = |name: &str, token: &str| {
        headers.get(name).is_some_and(|values| {
            values
                .iter()
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(bad("missing Upgrade: websocket or Connection: upgrade"));
    }
    let accept = derive_accept_key(key.as_bytes());
    if headers.get("sec-websocket-accept").and_then(|v| v.first()) != Some(&accept) {
        return Err(bad("wrong Sec-WebSocket-Accept"));
    }
    for unexpected in ["sec-websocket-protocol", "sec-websocket-extensions"] {
        if headers.contains_key(unexpected) {
            return Err(bad(&format!("unexpected {unexpected}")));
        }
    }
    Ok(())
}

/// Owns the write half: frames every item, masks, flushes.
async fn write_loop<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Outgoing>) {
    let mut buf = Vec::new();
    while let Some(item) = rx.recv().await {
        buf.clear();
        match item {
            Outgoing::Message(p) => wire::put_message(&mut buf, opcode::TEXT, &p, wire::mask_key),
            Outgoing::Binary(p) => {
                wire::put_message(&mut buf, opcode::BINARY, &p, wire::mask_key);
            }
            Outgoing::Ping(p) => {
                wire::put_frame(&mut buf, true, opcode::PING, &p, wire::mask_key())
            }
            Outgoing::Pong(p) => {
                wire::put_frame(&mut buf, true, opcode::PONG, &p, wire::mask_key())
            }
            Outgoing::Close(p) => {
                wire::put_frame(&mut buf, true, opcode::CLOSE, &p, wire::mask_key());
            }
            Outgoing::Raw(b) => buf = b,
            Outgoing::Shutdown => {
                let _ = wr.shutdown().await;
                return;
            }
        }
        if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
            return;
        }
    }
}

/// Reads frames in a task of its own so that the read loop can stop taking
/// them ([`super::KubeEdgeEdge::stall`]) without cutting a frame in half.
async fn read_frames<R: AsyncRead + Unpin>(
    mut reader: FrameReader<R>,
    tx: mpsc::Sender<Result<Incoming, wire::WireError>>,
) {
    loop {
        let item = reader.next().await;
        let last = item.is_err();
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

/// `startPing`: `ping you` every period; a write that cannot go out within
/// a second stops the pinger, not the session.
async fn ping_loop(out: mpsc::Sender<Outgoing>, every: Duration) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        ticker.tick().await;
        let ping = out.send(Outgoing::Ping(PING_PAYLOAD.to_vec()));
        if !matches!(
            tokio::time::timeout(CONTROL_WRITE_DEADLINE, ping).await,
            Ok(Ok(()))
        ) {
            debug!("kubeedge double: ping write failed, pinger stops");
            return;
        }
    }
}

/// A control frame from the read loop, given up after gorilla's deadline so
/// a stuck socket cannot hold the loop (and `KubeEdgeEdge::kill`) forever.
async fn control(out: &mpsc::Sender<Outgoing>, frame: Outgoing) {
    let _ = tokio::time::timeout(CONTROL_WRITE_DEADLINE, out.send(frame)).await;
}

/// `TunnelSession.Serve`: the session's only read loop.
async fn read_loop(
    ctx: &Arc<SessionCtx>,
    mut frames: mpsc::Receiver<Result<Incoming, wire::WireError>>,
    tasks: &mut JoinSet<()>,
    kill: &mut watch::Receiver<u64>,
) -> SessionEnd {
    let mut stalled = ctx.shared.stalled.subscribe();
    loop {
        let next = async {
            let _ = stalled.wait_for(|s| !*s).await;
            frames.recv().await
        };
        let incoming = tokio::select! {
            biased;
            _ = kill.changed() => return SessionEnd::Killed,
            r = next => r,
        };
        let payload = match incoming {
            None => return SessionEnd::Disconnected("reader ended".into()),
            Some(Err(wire::WireError::Io(e))) => return SessionEnd::Disconnected(e),
            Some(Err(e)) => return SessionEnd::Protocol(e.to_string()),
            Some(Ok(Incoming::Pong)) => continue,
            Some(Ok(Incoming::Ping(p))) => {
                control(&ctx.out, Outgoing::Pong(p)).await;
                continue;
            }
            Some(Ok(Incoming::Close(p))) => {
                // gorilla's default close handler echoes the code only.
                let echo = p.get(..2).map(<[u8]>::to_vec).unwrap_or_default();
                control(&ctx.out, Outgoing::Close(echo)).await;
                let code = p.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                return SessionEnd::Disconnected(format!("close frame, code {code:?}"));
            }
            Some(Ok(Incoming::Message(p))) => p,
        };
        let msg = match wire::decode(&payload) {
            Ok(m) => m,
            Err(e) => return SessionEnd::Protocol(e.to_string()),
        };
        let Some(kind) = MessageType::from_u64(msg.kind) else {
            return SessionEnd::WouldPanic(format!("unknown message type {}", msg.kind));
        };
        match kind {
            MessageType::CloseConnect => {
                return SessionEnd::Closed(String::from_utf8_lossy(&msg.data).into_owned());
            }
            MessageType::LogsConnect
            | MessageType::ExecConnect
            | MessageType::MetricConnect
            | MessageType::AttachConnect => {
                while tasks.try_join_next().is_some() {}
                // Two tasks of the set are the frame reader and the pinger.
                if tasks.len() >= MAX_CONNECTIONS + 2 {
                    debug!(
                        id = msg.id,
                        "kubeedge double: too many connections, connect ignored"
                    );
                } else {
                    tasks.spawn(serve::serve_connection(ctx.clone(), msg.clone(), kind));
                }
            }
            MessageType::Data | MessageType::RemoveConnect => {}
        }
        // `WriteToLocalConnection`: every message goes to a registered
        // connection of that ID, CONNECTs included; a full inbox blocks here.
        let id = msg.id;
        match ctx.inbox(id) {
            Some(inbox) => {
                tokio::select! {
                    biased;
                    _ = kill.changed() => return SessionEnd::Killed,
                    sent = inbox.send(msg) => if sent.is_err() {
                        // The connection has ended but is not yet removed:
                        // the window where a real edge panics.
                        ctx.shared.late.fetch_add(1, Ordering::Relaxed);
                    },
                }
            }
            None => {
                if kind == MessageType::Data || kind == MessageType::RemoveConnect {
                    if ctx.was_ended(id) {
                        ctx.shared.late.fetch_add(1, Ordering::Relaxed);
                    }
                    debug!(
                        id,
                        ?kind,
                        "kubeedge double: message for unknown connection dropped"
                    );
                }
            }
        }
    }
}
