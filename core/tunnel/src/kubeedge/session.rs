//! The cloud end of one KubeEdge EdgeStream session, behind [`NodeSession`].
//!
//! Raw mode (ADR 0017): every request, plain or upgrade, goes to the edge as
//! one `EXEC_CONNECT` whose URL names the kubelet, so the edge replays the
//! request head and pipes the kubelet's raw HTTP/1.1 response back in `DATA`
//! messages. A hyper HTTP/1 client runs over an in-memory [`PipeIo`] per
//! connection: the head hyper writes is dropped (the JSON carries the
//! request), and the bytes the edge sends are hyper's to parse, so status,
//! headers, chunked/length/close-delimited bodies and `101` upgrades come out
//! exactly as the kubelet sent them.
//!
//! The protocol has no flow control, so the session's single read loop never
//! waits for a client: each connection has a bounded byte queue, and a
//! connection whose client falls behind by more than its bound is ended
//! (`REMOVE_CONNECT`) while the others go on.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::PollSender;
use tracing::{Instrument, debug, info_span, warn};

use super::codec::{
    CodecError, FrameReader, MAX_MESSAGE, MessageType, TunnelMessage, WsEvent, encode_frame,
    encode_message, opcode,
};
use crate::session::{BoxError, ResponseFuture};
use crate::wire::{self, KUBELET_TARGET, PING_TARGET, StreamKind, status_response};
use crate::{Body, NodeSession, SessionInfo, StreamError, TunnelLimits};

/// Largest `DATA` payload the cloud sends (edges drop data past 1 MiB).
const MAX_DATA: usize = 64 << 10;
/// Bytes the writer gathers into one socket write.
const WRITE_BATCH: usize = 256 << 10;
/// How long a REMOVE waits for the edge's own (see `State::deferred`).
const REMOVE_GRACE: Duration = Duration::from_millis(500);
/// Outstanding round-trip probes kept per session.
const MAX_PROBES: usize = 16;

/// How the cloud treats KubeEdge sessions; every field has a default.
#[derive(Clone, Debug)]
pub struct KubeEdgeOptions {
    /// `host:port` the edge sends every request to: edged's read-only
    /// kubelet port (default `127.0.0.1:10350`).
    pub kubelet_addr: String,
    /// How long the kubelet may take to send its response head (default
    /// 60 s, as the edge's `kubelet_response_header_timeout_secs`); then
    /// 504 and `REMOVE_CONNECT`. The edge is silent when it cannot reach
    /// the kubelet, so this is the only end of such a request.
    pub response_header_timeout: Duration,
    /// Bytes the cloud queues for one connection whose client is not
    /// reading (default 4 MiB); past it, that connection is ended.
    pub stream_buffer: usize,
    /// Bytes queued across all connections of a session (default: half of
    /// `session_budget`); past it, the connection with the most queued ends.
    pub session_buffer: usize,
    /// A socket write that does not finish within this ends the session
    /// (default 10 s): the edge's only read loop is stuck.
    pub write_timeout: Duration,
    /// No frame from the edge for this long ends the session (default 15 s,
    /// three of the edge's 5 s pings).
    pub idle_timeout: Duration,
    /// Interval of the cloud's own pings (default 5 s).
    pub ping_interval: Duration,
    /// Largest `EXEC_CONNECT` JSON and largest response head (default 64 KiB,
    /// the front's header bound).
    pub max_header_bytes: usize,
}

impl KubeEdgeOptions {
    /// Defaults, with the session bound taken from `limits`.
    pub fn new(limits: &TunnelLimits) -> Self {
        Self {
            kubelet_addr: "127.0.0.1:10350".into(),
            response_header_timeout: Duration::from_secs(60),
            stream_buffer: 4 << 20,
            session_buffer: (limits.session_budget / 2) as usize,
            write_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(15),
            ping_interval: Duration::from_secs(5),
            max_header_bytes: 64 << 10,
        }
    }
}

/// Told why a connection ended abnormally (`client_stalled`,
/// `session_budget`, `response_timeout`, `bad_input`, `unknown_connection`,
/// `unsupported`), for a metric.
pub type StreamEndHook = Arc<dyn Fn(&'static str) + Send + Sync>;

/// What the cloud sends, in order.
enum Out {
    /// A tunnel message that belongs to no connection's data (CONNECT).
    Msg(Bytes),
    /// `DATA` of connection `id`: dropped if its REMOVE went out meanwhile.
    Data(u64, Bytes),
    Ping(Bytes),
    Pong(Bytes),
}

/// One connection's state, guarded by the session lock.
struct Conn {
    queue: VecDeque<Bytes>,
    queued: usize,
    /// The edge sent REMOVE_CONNECT: nothing more is sent for it.
    edge_removed: bool,
    /// Ended by the cloud, with the reason; reads fail.
    failed: Option<&'static str>,
    /// Our REMOVE_CONNECT is queued for the writer.
    remove_queued: bool,
    /// ... and written: nothing more is sent for it.
    remove_written: bool,
    /// The cloud-side pipe (hyper's connection) is gone.
    pipe_dropped: bool,
    reader: Option<Waker>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Conn {
    fn silent(&self) -> bool {
        self.edge_removed || self.remove_queued || self.remove_written
    }

    fn wake(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }
}

#[derive(Default)]
struct State {
    next_id: u64,
    conns: HashMap<u64, Conn>,
    queued_total: usize,
    removes: Vec<u64>,
    /// REMOVEs held back briefly after the cloud side finished, in time
    /// order: the edge usually ends the connection itself right then, and
    /// a REMOVE racing its end can crash it (compat doc, section 8).
    deferred: VecDeque<(u64, Instant)>,
    probes: VecDeque<(u64, oneshot::Sender<()>)>,
    /// Readers to wake when the read loop next waits for the socket.
    wakes: Vec<Waker>,
    /// `close()` was called: no new streams; CLOSE_CONNECT once idle.
    closing: bool,
    /// The session is over: every connection fails.
    ended: bool,
}

struct Shared {
    state: Mutex<State>,
    out: mpsc::Sender<Out>,
    wake_writer: Notify,
    killed: AtomicBool,
    kill: Notify,
    opts: Arc<KubeEdgeOptions>,
    on_stream_end: Option<StreamEndHook>,
    started: Instant,
    rtt_micros: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("kubeedge session lock")
    }

    fn count(&self, reason: &'static str) {
        if let Some(h) = &self.on_stream_end {
            h(reason);
        }
    }

    /// Ends connection `id` from the cloud side: its reads fail, its slot
    /// is freed, and one REMOVE_CONNECT goes out unless the edge ended it.
    fn fail(&self, st: &mut State, id: u64, reason: &'static str) {
        let Some(c) = st.conns.get_mut(&id) else {
            return;
        };
        if c.failed.is_some() {
            return;
        }
        c.failed = Some(reason);
        st.queued_total -= c.queued;
        c.queue.clear();
        c.queued = 0;
        c.permit = None;
        c.wake();
        if !c.silent() {
            c.remove_queued = true;
            st.removes.push(id);
            self.wake_writer.notify_one();
        }
        self.count(reason);
    }

    /// One message from the edge.
    fn dispatch(&self, msg: TunnelMessage) {
        let mut st = self.lock();
        let known = st
            .conns
            .get(&msg.id)
            .is_some_and(|c| !c.edge_removed && c.failed.is_none() && !c.pipe_dropped);
        match MessageType::from_wire(msg.kind) {
            Some(MessageType::Data) if known => {
                let n = msg.data.len();
                if n == 0 {
                    return;
                }
                let c = st.conns.get_mut(&msg.id).expect("known");
                c.queue.push_back(msg.data);
                c.queued += n;
                // Woken once the socket's buffered frames are all queued
                // (`wake_readers`): the client then takes many 256-byte
                // pieces in one read instead of one at a time.
                let waker = c.reader.take();
                let over_stream = c.queued > self.opts.stream_buffer;
                st.queued_total += n;
                st.wakes.extend(waker);
                if over_stream {
                    debug!(stream.id = msg.id, "client stalled past the stream bound");
                    self.fail(&mut st, msg.id, "client_stalled");
                } else if st.queued_total > self.opts.session_buffer {
                    let biggest = st
                        .conns
                        .iter()
                        .filter(|(_, c)| c.failed.is_none())
                        .max_by_key(|(_, c)| c.queued)
                        .map(|(id, _)| *id);
                    if let Some(id) = biggest {
                        self.fail(&mut st, id, "session_budget");
                    }
                }
            }
            Some(MessageType::RemoveConnect) if st.conns.contains_key(&msg.id) => {
                let c = st.conns.get_mut(&msg.id).expect("present");
                c.edge_removed = true;
                c.wake();
                if c.pipe_dropped {
                    st.conns.remove(&msg.id);
                }
            }
            // Late DATA or REMOVE for an ended connection: expected, dropped.
            Some(MessageType::Data | MessageType::RemoveConnect) => {
                if !st.conns.contains_key(&msg.id) && msg.id >= st.next_id {
                    self.count("unknown_connection");
                }
            }
            // A type the edge never sends, or none at all: that stream ends.
            _ if known => {
                debug!(
                    stream.id = msg.id,
                    kind = msg.kind,
                    "unexpected message type"
                );
                self.fail(&mut st, msg.id, "bad_input");
            }
            _ => self.count("bad_input"),
        }
    }

    /// Wakes the readers that got data since the last call.
    fn wake_readers(&self) {
        let wakes = std::mem::take(&mut self.lock().wakes);
        for w in wakes {
            w.wake();
        }
    }

    /// The session is over: every connection fails at once.
    fn end(&self) {
        let mut st = self.lock();
        st.ended = true;
        st.removes.clear();
        for c in st.conns.values_mut() {
            if c.failed.is_none() && !c.edge_removed {
                c.failed = Some("session_ended");
            }
            c.remove_written = true;
            c.permit = None;
            c.wake();
        }
        st.probes.clear();
    }

    fn rtt(&self, payload: &[u8]) {
        let mut st = self.lock();
        match payload {
            [b't', b'p', t @ ..] if t.len() == 8 => {
                let sent = u64::from_be_bytes(t.try_into().expect("8 bytes"));
                let now = self.started.elapsed().as_micros() as u64;
                let rtt = now.saturating_sub(sent).max(1);
                self.rtt_micros.store(rtt, Ordering::Relaxed);
            }
            [b't', b'q', n @ ..] if n.len() == 8 => {
                let nonce = u64::from_be_bytes(n.try_into().expect("8 bytes"));
                if let Some(i) = st.probes.iter().position(|(k, _)| *k == nonce)
                    && let Some((_, tx)) = st.probes.remove(i)
                {
                    let _ = tx.send(());
                }
            }
            _ => {}
        }
    }
}

/// The cloud end of a KubeEdge EdgeStream session.
pub struct KubeEdgeSession {
    info: SessionInfo,
    shared: Arc<Shared>,
    streams: Arc<Semaphore>,
    max_streams: u32,
    done: watch::Receiver<Option<&'static str>>,
}

impl std::fmt::Debug for KubeEdgeSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeEdgeSession")
            .field("info", &self.info)
            .finish()
    }
}

impl KubeEdgeSession {
    /// Starts serving an upgraded connection; `initial` holds bytes read
    /// past the upgrade request.
    pub fn start<S>(
        io: S,
        initial: Bytes,
        info: SessionInfo,
        limits: &TunnelLimits,
        opts: Arc<KubeEdgeOptions>,
        on_stream_end: Option<StreamEndHook>,
    ) -> Arc<Self>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        // Room for a burst of DATA from every stream's client; a writer
        // that cannot drain it within `write_timeout` ends the session.
        let slots = (opts.session_buffer / MAX_DATA).clamp(64, 1024);
        let (out, rx) = mpsc::channel(slots);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_id: 1,
                ..State::default()
            }),
            out,
            wake_writer: Notify::new(),
            killed: AtomicBool::new(false),
            kill: Notify::new(),
            opts,
            on_stream_end,
            started: Instant::now(),
            rtt_micros: AtomicU64::new(0),
        });
        let (done_tx, done) = watch::channel(None);
        let span = info_span!("session", node = %info.node, session.id = info.id,
            peer.addr = %info.peer, kind = "kubeedge");
        tokio::spawn(drive(io, initial, shared.clone(), rx, done_tx).instrument(span));
        Arc::new(Self {
            info,
            shared,
            streams: Arc::new(Semaphore::new(limits.max_streams as usize)),
            max_streams: limits.max_streams,
            done,
        })
    }

    /// Why the session ended: `revoked`, `error` or `closed`; `None` while
    /// it runs.
    pub fn end_reason(&self) -> &'static str {
        self.done.borrow().unwrap_or("closed")
    }

    /// Resolves when the session is over.
    pub async fn closed(&self) {
        let mut done = self.done.clone();
        let _ = done.wait_for(Option::is_some).await;
    }

    /// Ends the session at once with a reason the edge logs (a refusal
    /// after the upgrade, e.g. revocation). Best effort.
    pub fn refuse(&self, reason: &str) {
        let _ = self.shared.out.try_send(Out::Msg(encode_message(
            0,
            MessageType::CloseConnect,
            reason.as_bytes(),
        )));
        self.terminate();
    }

    fn probe(&self) -> ResponseFuture {
        let shared = self.shared.clone();
        let node = self.info.node.clone();
        Box::pin(async move {
            let nonce = rand_nonce();
            let (tx, rx) = oneshot::channel();
            {
                let mut st = shared.lock();
                if st.ended {
                    return Err(StreamError::Closed(node));
                }
                if st.probes.len() >= MAX_PROBES {
                    st.probes.pop_front();
                }
                st.probes.push_back((nonce, tx));
            }
            let mut payload = b"tq".to_vec();
            payload.extend_from_slice(&nonce.to_be_bytes());
            shared
                .out
                .try_send(Out::Ping(payload.into()))
                .map_err(|_| StreamError::Closed(node.clone()))?;
            rx.await.map_err(|_| StreamError::Closed(node))?;
            Ok(Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(crate::body_empty())
                .expect("static response"))
        })
    }
}

fn rand_nonce() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A 501 for what a KubeEdge edge cannot carry, naming node and capability.
fn not_carried(node: &str, what: &str) -> Response<Body> {
    status_response(
        StatusCode::NOT_IMPLEMENTED,
        "NotImplemented",
        &format!("node {node} is a KubeEdge edge; its tunnel cannot carry {what}"),
    )
}

impl NodeSession for KubeEdgeSession {
    fn info(&self) -> &SessionInfo {
        &self.info
    }

    fn send(&self, req: Request<Body>, target: &str) -> ResponseFuture {
        if target == PING_TARGET {
            return self.probe();
        }
        let node = self.info.node.clone();
        let kind = wire::classify(&req);
        let refused = if target != KUBELET_TARGET {
            Some(format!(
                "requests to {target:?}: only the kubelet is reachable (no allow-listed endpoints)"
            ))
        } else if matches!(kind, StreamKind::Connect) {
            Some("raw TCP (CONNECT); use DNAT mode for this node".into())
        } else if req.uri().path().starts_with("/portForward") {
            Some("port-forward (not enabled for KubeEdge edges)".into())
        } else if has_body(&req) {
            Some("a request body (the edge replays the request head only)".into())
        } else if matches!(&kind, StreamKind::Upgrade(_))
            && req.method() != Method::GET
            && req.method() != Method::POST
        {
            Some(format!("an upgrade with method {}", req.method()))
        } else {
            None
        };
        if let Some(what) = refused {
            self.shared.count("unsupported");
            return Box::pin(async move { Ok(not_carried(&node, &what)) });
        }
        let permit = self.streams.clone().try_acquire_owned();
        let limit = self.max_streams;
        let shared = self.shared.clone();
        let span = info_span!(target: crate::trace::TARGET, "tunnel.stream",
            node = %node, session.id = self.info.id, tunnel.target = %target, stream.id = tracing::field::Empty);
        Box::pin(
            async move {
                let permit = permit.map_err(|_| StreamError::Busy {
                    node: node.clone(),
                    limit,
                })?;
                open(shared, req, kind, permit, node).await
            }
            .instrument(span),
        )
    }

    fn close(&self) {
        self.shared.lock().closing = true;
        self.shared.wake_writer.notify_one();
    }

    fn terminate(&self) {
        self.shared.lock().closing = true;
        self.shared.killed.store(true, Ordering::Release);
        self.shared.kill.notify_one();
    }

    fn open_streams(&self) -> usize {
        self.max_streams as usize - self.streams.available_permits()
    }

    fn is_closed(&self) -> bool {
        let st = self.shared.lock();
        st.closing || st.ended
    }

    fn record_rtt(&self, rtt: Duration) {
        let micros = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
        self.shared.rtt_micros.store(micros, Ordering::Relaxed);
    }

    fn last_rtt(&self) -> Option<Duration> {
        match self.shared.rtt_micros.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }
}

fn has_body<B: hyper::body::Body>(req: &Request<B>) -> bool {
    let declared = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0");
    declared || !(req.body().is_end_stream() || req.body().size_hint().exact() == Some(0))
}

/// Opens one connection: EXEC_CONNECT, then hyper's HTTP/1 client over the
/// pipe until the response head.
async fn open(
    shared: Arc<Shared>,
    req: Request<Body>,
    kind: StreamKind,
    permit: OwnedSemaphorePermit,
    node: String,
) -> Result<Response<Body>, StreamError> {
    let id = {
        let mut st = shared.lock();
        if st.closing || st.ended {
            return Err(StreamError::Closed(node));
        }
        let id = st.next_id;
        st.next_id += 1;
        id
    };
    tracing::Span::current().record("stream.id", id);
    let json = match connect_json(id, &req, &kind, &shared.opts.kubelet_addr) {
        Ok(j) => j,
        Err(msg) => return Ok(status_response(StatusCode::BAD_REQUEST, "BadRequest", &msg)),
    };
    if json.len() > shared.opts.max_header_bytes {
        return Ok(status_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "RequestHeaderFieldsTooLarge",
            &format!(
                "request head of {} bytes exceeds the {}-byte bound for KubeEdge edges",
                json.len(),
                shared.opts.max_header_bytes
            ),
        ));
    }
    {
        let mut st = shared.lock();
        if st.closing || st.ended {
            return Err(StreamError::Closed(node));
        }
        st.conns.insert(
            id,
            Conn {
                queue: VecDeque::new(),
                queued: 0,
                edge_removed: false,
                failed: None,
                remove_queued: false,
                remove_written: false,
                pipe_dropped: false,
                reader: None,
                permit: Some(permit),
            },
        );
    }
    let pipe = PipeIo {
        shared: shared.clone(),
        id,
        tx: PollSender::new(shared.out.clone()),
        head_end: 0,
        head_seen: 0,
    };
    // From here on the pipe owns the connection: dropping it sends REMOVE.
    let connect = encode_message(id, MessageType::ExecConnect, &json);
    if shared.out.send(Out::Msg(connect)).await.is_err() {
        return Err(StreamError::Closed(node));
    }
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size((shared.opts.max_header_bytes + (64 << 10)).max(8192))
        .handshake::<_, Body>(TokioIo::new(pipe))
        .await
        .map_err(StreamError::Tunnel)?;
    let task = tokio::spawn(
        async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "kubeedge stream ended");
            }
        }
        .in_current_span(),
    );
    let head = hyper_request(&req);
    let timeout = shared.opts.response_header_timeout;
    match tokio::time::timeout(timeout, sender.send_request(head)).await {
        Ok(Ok(resp)) => Ok(resp.map(|b| b.map_err(BoxError::from).boxed_unsync())),
        Ok(Err(e)) => {
            task.abort();
            let ended = shared.lock().ended;
            if ended {
                Err(StreamError::Closed(node))
            } else {
                Err(StreamError::Tunnel(e))
            }
        }
        Err(_) => {
            task.abort();
            shared.count("response_timeout");
            Ok(status_response(
                StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                &format!(
                    "the kubelet of KubeEdge node {node} sent no response headers within {timeout:?} (cloud setting kubeedge.response_header_timeout_secs)"
                ),
            ))
        }
    }
}

/// The request hyper writes into the pipe: only its method matters (hyper
/// reads a HEAD response without a body); the bytes themselves are dropped.
fn hyper_request(req: &Request<Body>) -> Request<Body> {
    Request::builder()
        .method(req.method().clone())
        .uri("/")
        .body(crate::body_empty())
        .expect("static request")
}

/// Go's `net/url.URL` as KubeEdge's JSON carries it (ADR 0017).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct GoUrl<'a> {
    scheme: &'static str,
    host: &'a str,
    path: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    raw_path: &'a str,
    raw_query: &'a str,
}

#[derive(Serialize)]
struct ConnectJson<'a> {
    #[serde(rename = "MessID")]
    mess_id: u64,
    url: GoUrl<'a>,
    header: std::collections::BTreeMap<String, Vec<&'a str>>,
    method: &'a str,
}

/// The EXEC_CONNECT payload for a request (docs/kubeedge-compat.md, 2).
fn connect_json<B>(
    id: u64,
    req: &Request<B>,
    kind: &StreamKind,
    kubelet: &str,
) -> Result<Vec<u8>, String> {
    let raw = req.uri().path();
    let path = percent_decode(raw).ok_or("the path is not valid percent-encoded UTF-8")?;
    let mut headers: HeaderMap = req.headers().clone();
    wire::strip_hop_by_hop(&mut headers);
    // Go's Request.Write adds these itself or must never see them.
    for h in [header::CONTENT_LENGTH, header::HOST] {
        headers.remove(h);
    }
    match kind {
        StreamKind::Upgrade(p) => {
            headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            headers.insert(
                header::UPGRADE,
                HeaderValue::from_str(p).map_err(|_| "invalid Upgrade header")?,
            );
        }
        // One request per edge connection: the kubelet's close ends it.
        _ => {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    let mut map: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
    for (name, value) in &headers {
        let v = value
            .to_str()
            .map_err(|_| format!("header {name} is not visible ASCII"))?;
        map.entry(canonical_key(name.as_str())).or_default().push(v);
    }
    let json = ConnectJson {
        mess_id: id,
        url: GoUrl {
            scheme: "http",
            host: kubelet,
            path,
            raw_path: if raw.contains('%') { raw } else { "" },
            raw_query: req.uri().query().unwrap_or(""),
        },
        header: map,
        method: req.method().as_str(),
    };
    serde_json::to_vec(&json).map_err(|e| e.to_string())
}

/// Go's canonical MIME header key: `x-stream-protocol-version` ->
/// `X-Stream-Protocol-Version`, so Go's `Request.Write` recognises the
/// headers it handles itself (`User-Agent`).
fn canonical_key(name: &str) -> String {
    let mut up = true;
    name.chars()
        .map(|c| {
            let out = if up {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            up = c == '-';
            out
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The cloud-side byte stream of one connection: reads take the edge's
/// queued DATA (coalesced, as much as the reader's buffer holds); writes
/// after the request head become DATA messages. Dropping it ends the
/// connection.
struct PipeIo {
    shared: Arc<Shared>,
    id: u64,
    tx: PollSender<Out>,
    /// How many bytes of `\r\n\r\n` were matched at the end of the head.
    head_end: u8,
    head_seen: usize,
}

impl PipeIo {
    fn head_done(&self) -> bool {
        self.head_end == 4
    }
}

impl AsyncRead for PipeIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut st = self.shared.lock();
        let st = &mut *st;
        let Some(c) = st.conns.get_mut(&self.id) else {
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        };
        // hyper reads an idle connection to notice it closing; the edge may
        // answer before hyper has even written the request, and hyper
        // refuses a response it did not ask for yet.
        if !self.head_done() {
            c.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if let Some(reason) = c.failed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("kubeedge stream ended: {reason}"),
            )));
        }
        if c.queue.is_empty() {
            if c.edge_removed {
                return Poll::Ready(Ok(()));
            }
            c.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut taken = 0;
        while buf.remaining() > 0
            && let Some(front) = c.queue.front_mut()
        {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.advance(n);
            taken += n;
            if front.is_empty() {
                c.queue.pop_front();
            }
        }
        c.queued -= taken;
        st.queued_total -= taken;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for PipeIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !self.head_done() {
            // hyper's request head: the EXEC_CONNECT JSON already carries it.
            let mut used = 0;
            for &b in data {
                used += 1;
                let want = b"\r\n\r\n"[self.head_end as usize];
                self.head_end = match (b == want, b == b'\r') {
                    (true, _) => self.head_end + 1,
                    (false, true) => 1,
                    (false, false) => 0,
                };
                if self.head_done() {
                    break;
                }
            }
            self.head_seen += used;
            if self.head_done()
                && let Some(c) = self.shared.lock().conns.get_mut(&self.id)
            {
                c.wake();
            }
            if self.head_seen > self.shared.opts.max_header_bytes + (64 << 10) {
                return Poll::Ready(Err(io::Error::other("request head too large")));
            }
            return Poll::Ready(Ok(used));
        }
        let this = &mut *self;
        if ready!(this.tx.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let st = this.shared.lock();
        let open = st
            .conns
            .get(&this.id)
            .is_some_and(|c| !c.silent() && c.failed.is_none());
        if !open {
            drop(st);
            this.tx.abort_send();
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = data.len().min(MAX_DATA);
        let msg = encode_message(this.id, MessageType::Data, &data[..n]);
        // Sent under the lock, so a REMOVE queued after this check is
        // written after this DATA, never before it.
        let sent = this.tx.send_item(Out::Data(this.id, msg));
        drop(st);
        match sent {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// No half-close exists: the connection ends when the pipe is dropped.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Drop for PipeIo {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        let st = &mut *st;
        let Some(c) = st.conns.get_mut(&self.id) else {
            return;
        };
        c.pipe_dropped = true;
        c.permit = None;
        st.queued_total -= c.queued;
        c.queue.clear();
        c.queued = 0;
        if c.edge_removed || c.remove_written || st.ended {
            st.conns.remove(&self.id);
        } else if !c.remove_queued {
            c.remove_queued = true;
            st.deferred
                .push_back((self.id, Instant::now() + REMOVE_GRACE));
        }
        // Also tells a closing session that a stream is done.
        self.shared.wake_writer.notify_one();
    }
}

/// Runs the session: the read loop, the writer, the kill switch; whichever
/// ends first ends it.
async fn drive<S>(
    io: S,
    initial: Bytes,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Out>,
    done: watch::Sender<Option<&'static str>>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(io);
    let reader = read_loop(rd, initial, shared.clone());
    let writer = write_loop(wr, shared.clone(), rx);
    tokio::pin!(reader, writer);
    let reason = tokio::select! {
        r = &mut reader => match r {
            Ok(()) => "closed",
            Err(e) => {
                debug!(error = %e, "kubeedge session read ended");
                "error"
            }
        },
        w = &mut writer => match w {
            // Graceful close sent: give the edge a moment to hang up.
            Ok(()) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut reader).await;
                "closed"
            }
            Err(e) => {
                warn!(error = %e, "kubeedge session write failed");
                "error"
            }
        },
        _ = shared.kill.notified() => "revoked",
    };
    // A terminate() that raced the others still counts as revoked.
    let reason = if shared.killed.load(Ordering::Acquire) {
        "revoked"
    } else {
        reason
    };
    shared.end();
    debug!(reason, "kubeedge session ended");
    let _ = done.send(Some(reason));
}

/// Why the session's read loop ended.
#[derive(Debug, thiserror::Error)]
enum ReadEnd {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("no frame from the edge for {0:?}")]
    Idle(Duration),
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    initial: Bytes,
    shared: Arc<Shared>,
) -> Result<(), ReadEnd> {
    let mut frames = FrameReader::new(&initial, MAX_MESSAGE);
    let idle = shared.opts.idle_timeout;
    loop {
        let ev = match frames.decode()? {
            Some(ev) => Some(ev),
            None => {
                shared.wake_readers();
                let more = tokio::time::timeout(idle, frames.fill(&mut rd))
                    .await
                    .map_err(|_| ReadEnd::Idle(idle))??;
                if more {
                    continue;
                }
                None
            }
        };
        match ev {
            None | Some(WsEvent::Close) => return Ok(()),
            // Dropped when the writer is full: the edge ignores pongs.
            Some(WsEvent::Ping(p)) => {
                let _ = shared.out.try_send(Out::Pong(p));
            }
            Some(WsEvent::Pong(p)) => shared.rtt(&p),
            Some(WsEvent::Message(m)) => shared.dispatch(TunnelMessage::decode(m)?),
        }
    }
}

/// Why the writer ended the session.
#[derive(Debug, thiserror::Error)]
enum WriteEnd {
    #[error("tunnel write failed: {0}")]
    Io(#[from] io::Error),
    #[error("tunnel write did not finish within {0:?}")]
    Timeout(Duration),
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Out>,
) -> Result<(), WriteEnd> {
    let mut buf = BytesMut::with_capacity(16 << 10);
    let mut tick = tokio::time::interval(shared.opts.ping_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let deadline = shared.opts.write_timeout;
    loop {
        let mut closing = false;
        let next_deferred = shared.lock().deferred.front().map(|d| d.1);
        tokio::select! {
            biased;
            _ = shared.wake_writer.notified() => {}
            _ = tokio::time::sleep_until(next_deferred.unwrap_or_else(Instant::now).into()), if next_deferred.is_some() => {}
            m = rx.recv() => match m {
                Some(o) => encode(&shared, o, &mut buf),
                None => return Ok(()),
            },
            _ = tick.tick() => {
                let mut p = b"tp".to_vec();
                p.extend_from_slice(&(shared.started.elapsed().as_micros() as u64).to_be_bytes());
                encode_frame(&mut buf, opcode::PING, &p);
            }
        }
        // Everything already queued goes first, so a connection's DATA
        // precedes its REMOVE.
        while buf.len() < WRITE_BATCH
            && let Ok(o) = rx.try_recv()
        {
            encode(&shared, o, &mut buf);
        }
        {
            let mut st = shared.lock();
            let now = Instant::now();
            while let Some(&(id, at)) = st.deferred.front()
                && at <= now
            {
                st.deferred.pop_front();
                if st.conns.get(&id).is_some_and(|c| !c.edge_removed) {
                    st.removes.push(id);
                }
            }
            let removes = std::mem::take(&mut st.removes);
            for id in removes {
                // The edge may have ended it since the REMOVE was queued:
                // then nothing more may be sent for it.
                let Some(c) = st.conns.get_mut(&id).filter(|c| !c.edge_removed) else {
                    continue;
                };
                c.remove_written = true;
                let drop_entry = c.pipe_dropped;
                let frame = encode_message(id, MessageType::RemoveConnect, b"");
                encode_frame(&mut buf, opcode::TEXT, &frame);
                if drop_entry {
                    st.conns.remove(&id);
                }
            }
            if st.closing && st.conns.values().all(|c| c.pipe_dropped) && rx.is_empty() {
                let reason = "tether cloud closed the session (replaced or shutting down); redial";
                encode_frame(
                    &mut buf,
                    opcode::TEXT,
                    &encode_message(0, MessageType::CloseConnect, reason.as_bytes()),
                );
                encode_frame(&mut buf, opcode::CLOSE, &1000u16.to_be_bytes());
                closing = true;
            }
        }
        if !buf.is_empty() {
            let write = async {
                wr.write_all(&buf).await?;
                wr.flush().await
            };
            tokio::time::timeout(deadline, write)
                .await
                .map_err(|_| WriteEnd::Timeout(deadline))??;
            buf.clear();
            if buf.capacity() > 1 << 20 {
                buf = BytesMut::with_capacity(16 << 10);
            }
        }
        if closing {
            let _ = tokio::time::timeout(deadline, wr.shutdown()).await;
            return Ok(());
        }
    }
}

fn encode(shared: &Shared, o: Out, buf: &mut BytesMut) {
    match o {
        Out::Msg(m) => encode_frame(buf, opcode::TEXT, &m),
        Out::Data(id, m) => {
            let st = shared.lock();
            // Never after either side's REMOVE (an edge race can crash it).
            let live = st
                .conns
                .get(&id)
                .is_some_and(|c| !c.edge_removed && !c.remove_written);
            if live {
                encode_frame(buf, opcode::TEXT, &m);
            }
        }
        Out::Ping(p) => encode_frame(buf, opcode::PING, &p),
        Out::Pong(p) => encode_frame(buf, opcode::PONG, &p),
    }
}

#[cfg(test)]
mod tests;
