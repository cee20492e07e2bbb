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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::PollSender;
use tracing::{Instrument, debug, info_span};

use super::codec::{MessageType, encode_message};
use super::driver::drive;
use super::pipe::PipeIo;
use super::request::connect_json;
use super::state::{Conn, Out, Shared, State};
use crate::session::{BoxError, ResponseFuture};
use crate::wire::{self, KUBELET_TARGET, PING_TARGET, StreamKind, status_response};
use crate::{Body, NodeSession, SessionInfo, StreamError, TunnelLimits};

/// Largest `DATA` payload the cloud sends (edges drop data past 1 MiB).
pub(super) const MAX_DATA: usize = 64 << 10;
/// Bytes the writer gathers into one socket write.
pub(super) const WRITE_BATCH: usize = 256 << 10;
/// How long a REMOVE waits for the edge's own (see `State::deferred`).
pub(super) const REMOVE_GRACE: Duration = Duration::from_millis(500);
/// Outstanding round-trip probes kept per session.
pub(super) const MAX_PROBES: usize = 16;

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
        .map_err(|e| StreamError::Tunnel(e.into()))?;
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
        Ok(Ok(mut resp)) => {
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                // The edge-side connection closes after each request (one
                // request per EXEC_CONNECT); that is this hop's business, not
                // the client's, whose front connection stays open.
                strip_hop_by_hop(resp.headers_mut());
            }
            Ok(resp.map(|b| b.map_err(BoxError::from).boxed_unsync()))
        }
        Ok(Err(e)) => {
            task.abort();
            let ended = shared.lock().ended;
            if ended {
                Err(StreamError::Closed(node))
            } else {
                Err(StreamError::Tunnel(e.into()))
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

#[cfg(test)]
mod tests;

/// Removes the headers that describe one HTTP/1.1 connection (RFC 9110
/// 7.6.1), including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<http::HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| http::HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in ["connection", "keep-alive", "proxy-connection", "upgrade"] {
        headers.remove(n);
    }
}
