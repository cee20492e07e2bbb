//! The multiplexed session: HTTP/2 over the WebSocket byte stream. The cloud
//! holds an [`H2Session`] (h2's client, driven directly so its receive window
//! can follow the link, ADR 0020) per node and sees it only through the
//! [`NodeSession`] trait, so other session kinds can share the registry; the
//! edge runs [`serve_edge_session`] (hyper's h2 server, fixed windows).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{Instrument, debug, info_span};

use crate::flow::{Flow, WindowMetrics};
use crate::h2body::RecvBody;
use crate::h2conn::Driver;
use crate::upgrade::{H2Io, H2Upgrade};
use crate::wire::{self, StreamKind, WireError};
use crate::{Shutdown, TunnelLimits, WsStream};

/// Boxed error carried by bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type used on both sides of the tunnel.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// An empty body.
pub fn body_empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body from bytes.
pub fn body_from(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Why a stream could not be opened or failed. Each variant names the side
/// that failed so the front can map it to a status code and metric label.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The node already has `max_streams` streams open.
    #[error("node {node} has {limit} streams open; try again later")]
    Busy {
        /// The node.
        node: String,
        /// The configured bound.
        limit: u32,
    },
    /// The session is closing or gone.
    #[error("tunnel session to node {0} is closed")]
    Closed(String),
    /// The request cannot be carried (client side fault).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The edge reset an upgrade stream, e.g. because it does not enable
    /// extended CONNECT.
    #[error("edge of node {0} refused the upgrade stream (extended CONNECT unsupported?): {1}")]
    UpgradeRefused(String, #[source] BoxError),
    /// The tunnel failed while carrying the stream (an h2 error on Tether
    /// sessions, a hyper error on KubeEdge sessions and replica forwarding).
    #[error("tunnel stream failed: {0}")]
    Tunnel(#[source] BoxError),
}

/// Which protocol a session speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SessionKind {
    /// Tether's own `tether.v1` (HTTP/2 over WebSocket).
    #[default]
    Tether,
    /// KubeEdge's EdgeStream (an unmodified `edgecore`).
    KubeEdge,
}

impl SessionKind {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Tether => "tether",
            Self::KubeEdge => "kubeedge",
        }
    }
}

/// Facts about a live session.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    /// The protocol of the session.
    pub kind: SessionKind,
    /// Node name, from the certificate.
    pub node: String,
    /// Unique id of this session within the process.
    pub id: u64,
    /// The edge's address as the cloud sees it.
    pub peer: SocketAddr,
    /// Node addresses bound to the certificate (IP SANs).
    pub ips: Vec<IpAddr>,
    /// When the session was established.
    pub connected_at: SystemTime,
    /// The edge certificate's subject, serial and validity.
    pub identity: tether_pki::Identity,
    /// Allow-listed local endpoints the edge announced (service discovery).
    pub endpoints: Vec<std::net::SocketAddr>,
    /// The edge asked for its hub channel inside this session
    /// ([`crate::HUB_HEADER`]); the cloud then opens the hub stream in it.
    pub carries_hub: bool,
}

/// Holds one of the node's stream slots; dropped when the stream ends.
/// For upgraded and CONNECT responses it is left in the response extensions
/// and the caller keeps it for the life of the byte stream.
#[derive(Debug, Clone)]
pub struct StreamPermit(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

pub(crate) type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<Body>, StreamError>> + Send>>;

/// What the kubelet-API front needs from a node session, and nothing more.
pub trait NodeSession: Send + Sync + 'static {
    /// Who and where.
    fn info(&self) -> &SessionInfo;
    /// Opens one stream carrying `req` to `target` on the edge (`kubelet` or an
    /// allow-listed `host:port`). Upgrades and CONNECT come back with a `101`
    /// or `200` whose [`crate::upgrade::on`] yields the byte stream.
    fn send(&self, req: Request<Body>, target: &str) -> ResponseFuture;
    /// Stops new streams; in-flight ones finish, then the session closes.
    fn close(&self);
    /// Asks the edge, ahead of the close that follows, to wait `after`
    /// before it reconnects (ADR 0023). Edges of protocols without the
    /// announcement reconnect on their own schedule.
    fn announce_reconnect(&self, _after: std::time::Duration) {}
    /// Ends the session now, failing every stream (revocation).
    fn terminate(&self);
    /// Streams open right now.
    fn open_streams(&self) -> usize;
    /// True once closed or gone.
    fn is_closed(&self) -> bool;
    /// Records a measured round trip through this session.
    fn record_rtt(&self, _rtt: std::time::Duration) {}
    /// The last measured round trip, if any.
    fn last_rtt(&self) -> Option<std::time::Duration> {
        None
    }
}

/// The cloud end of an HTTP/2 tunnel session: h2's client driven directly,
/// so the stream window can follow the link (ADR 0020).
pub struct H2Session {
    info: SessionInfo,
    send: Mutex<Option<h2::client::SendRequest<Bytes>>>,
    flow: Arc<Flow>,
    streams: Arc<Semaphore>,
    max_streams: u32,
    /// Bounds the wait for a lowered window to be queued before a stream.
    settle: std::time::Duration,
    done: watch::Receiver<bool>,
    io_dropped: watch::Receiver<bool>,
    control: crate::WsControl,
    failed: Arc<std::sync::atomic::AtomicBool>,
    /// Last measured round trip in microseconds; 0 = not measured yet.
    rtt_micros: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for H2Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Session")
            .field("info", &self.info)
            .finish()
    }
}

impl H2Session {
    /// Runs the h2 client handshake over an accepted tunnel and spawns the
    /// connection task. The task ends when the peer goes away, keepalive
    /// fails, or after [`NodeSession::close`] once streams drain.
    pub async fn start<S>(
        io: WsStream<S>,
        info: SessionInfo,
        limits: &TunnelLimits,
    ) -> Result<Arc<Self>, h2::Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Self::start_with_metrics(io, info, limits, WindowMetrics::default()).await
    }

    /// [`H2Session::start`], exporting the window to `metrics`.
    pub async fn start_with_metrics<S>(
        io: WsStream<S>,
        info: SessionInfo,
        limits: &TunnelLimits,
        metrics: WindowMetrics,
    ) -> Result<Arc<Self>, h2::Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (session, run) = Self::handshake(io, info, limits, metrics).await?;
        tokio::spawn(run);
        Ok(session)
    }

    /// The h2 client handshake; the caller runs the returned connection
    /// future (the listener, inside the task that already waits for the
    /// session, so an edge costs one task and not two).
    pub(crate) async fn handshake<S>(
        mut io: WsStream<S>,
        info: SessionInfo,
        limits: &TunnelLimits,
        metrics: WindowMetrics,
    ) -> Result<(Arc<Self>, SessionRun<WsStream<S>>), h2::Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io_dropped = io.watch_drop();
        let control = io.control();
        let flow = Flow::new(limits, metrics);
        // The stream window starts at the governor's floor and follows it;
        // the connection window is the whole receive budget, which the
        // governor's invariant keeps every stream's window within.
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(flow.floor())
            .initial_connection_window_size(limits.connection_window())
            .max_frame_size(limits.max_frame_size)
            .max_header_list_size(limits.max_header_list_size)
            .max_send_buffer_size(limits.effective_send_buf())
            .max_concurrent_streams(limits.max_streams)
            .handshake::<_, Bytes>(io)
            .await?;
        let rtt_micros = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let driver = Driver::new(
            conn,
            flow.clone(),
            limits.keepalive_interval,
            limits.keepalive_timeout,
            rtt_micros.clone(),
        );
        let (done_tx, done) = watch::channel(false);
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let run = SessionRun {
            driver,
            span: info_span!("session", node = %info.node, session.id = info.id, peer.addr = %info.peer),
            failed: failed.clone(),
            flow: flow.clone(),
            done: Some(done_tx),
        };
        let session = Arc::new(Self {
            info,
            send: Mutex::new(Some(send)),
            flow,
            streams: Arc::new(Semaphore::new(limits.max_streams as usize)),
            max_streams: limits.max_streams,
            settle: limits.keepalive_timeout,
            done,
            io_dropped,
            control,
            failed,
            rtt_micros,
        });
        Ok((session, run))
    }

    /// Why the connection ended: `revoked` (terminated), `error` (transport
    /// failure or keepalive timeout) or `closed`.
    pub fn end_reason(&self) -> &'static str {
        if self.control.is_killed() {
            "revoked"
        } else if self.failed.load(std::sync::atomic::Ordering::Acquire) {
            "error"
        } else {
            "closed"
        }
    }

    /// The stream window the session wants announced now (ADR 0020).
    pub fn window(&self) -> u32 {
        self.flow.wanted()
    }

    /// Resolves when the session is over and its transport released: after
    /// a graceful close, h2 GOAWAY, WebSocket close and TLS close_notify
    /// have been sent.
    pub async fn closed(&self) {
        let mut done = self.done.clone();
        let _ = done.wait_for(|d| *d).await;
        let mut io = self.io_dropped.clone();
        let _ = io.wait_for(|d| *d).await;
    }
}

/// The connection of an [`H2Session`]: resolves when the connection ends,
/// and then marks the session done (with why) and takes its window out of
/// the metrics. Dropping it unfinished also ends the session: the
/// connection goes with it, and [`H2Session::closed`] resolves.
pub(crate) struct SessionRun<T> {
    driver: Driver<T>,
    span: tracing::Span,
    failed: Arc<std::sync::atomic::AtomicBool>,
    flow: Arc<Flow>,
    done: Option<watch::Sender<bool>>,
}

impl<T> Future for SessionRun<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if this.done.is_none() {
            return Poll::Ready(());
        }
        let entered = this.span.enter();
        let end = ready!(Pin::new(&mut this.driver).poll(cx));
        match end {
            Ok(()) => debug!("session closed"),
            Err(e) => {
                this.failed
                    .store(true, std::sync::atomic::Ordering::Release);
                debug!(error = %e, "session ended");
            }
        }
        drop(entered);
        this.finish();
        Poll::Ready(())
    }
}

impl<T> SessionRun<T> {
    /// Marks the session done, once.
    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            self.flow.retire();
            let _ = done.send(true);
        }
    }
}

impl<T> Drop for SessionRun<T> {
    fn drop(&mut self) {
        // Dropped before the connection ended (the listener's drain
        // deadline): the session is over all the same.
        self.finish();
    }
}

/// Maps a failure to open or carry a stream to the side that failed.
fn stream_error(e: h2::Error, node: &str, kind: &StreamKind, gone: bool) -> StreamError {
    if gone || e.is_go_away() || e.is_io() {
        StreamError::Closed(node.to_owned())
    } else if matches!(kind, StreamKind::Upgrade(_)) {
        // h2 does not check the peer's SETTINGS_ENABLE_CONNECT_PROTOCOL
        // before sending; a peer without it resets the stream.
        StreamError::UpgradeRefused(node.to_owned(), e.into())
    } else {
        StreamError::Tunnel(e.into())
    }
}

/// What opening one stream needs from its session, owned so that the
/// stream's future does not borrow the session.
struct Opener {
    node: String,
    flow: Arc<Flow>,
    max_streams: u32,
    settle: std::time::Duration,
    done: watch::Receiver<bool>,
}

impl Opener {
    async fn open_stream(
        self,
        req: Request<Body>,
        target: String,
        sender: Option<h2::client::SendRequest<Bytes>>,
        permit: Result<OwnedSemaphorePermit, tokio::sync::TryAcquireError>,
    ) -> Result<Response<Body>, StreamError> {
        let node = &self.node;
        let sender = sender.ok_or_else(|| StreamError::Closed(node.clone()))?;
        let permit = permit.map_err(|_| StreamError::Busy {
            node: node.clone(),
            limit: self.max_streams,
        })?;
        let kind = wire::classify(&req);
        let req = wire::request_to_tunnel(req, &target)?;
        let (mut parts, body) = req.into_parts();
        let protocol = parts
            .extensions
            .remove::<hyper::ext::Protocol>()
            .map(|p| h2::ext::Protocol::from(p.as_str()));
        let mut head = Request::from_parts(parts, ());
        if let Some(p) = protocol {
            head.extensions_mut().insert(p);
        }
        let gone = || *self.done.borrow();
        // The round-trip probe's answer is a bodiless 204 from the edge
        // itself that its caller drops at once, so it cannot hold window;
        // admitting it would drop a grown window to the floor every
        // keepalive interval (ADR 0020).
        let probe = target == wire::PING_TARGET && kind == StreamKind::Http;
        let ticket = if probe {
            None
        } else {
            let open = tokio::time::timeout(self.settle, self.flow.open())
                .await
                .map_err(|_| StreamError::Closed(node.clone()))?
                .map_err(|_| StreamError::Busy {
                    node: node.clone(),
                    limit: self.max_streams,
                })?;
            Some(open)
        };
        let mut sender = sender
            .ready()
            .await
            .map_err(|e| stream_error(e, node, &kind, gone()))?;
        let streaming = !matches!(kind, StreamKind::Http);
        let end = !streaming && body.is_end_stream();
        let (resp, send) = sender
            .send_request(head, end)
            .map_err(|e| stream_error(e, node, &kind, gone()))?;
        let send = if streaming || end {
            Some(send)
        } else {
            tokio::spawn(crate::h2body::pipe(body, send).in_current_span());
            None
        };
        let resp = resp
            .await
            .map_err(|e| stream_error(e, node, &kind, gone()))?;
        let permit = StreamPermit(Arc::new(permit));
        let (resp, holds_stream) = match &kind {
            StreamKind::Upgrade(p) => wire::upgraded_from_tunnel(resp, p),
            StreamKind::Connect => {
                let ok = resp.status().is_success();
                (resp, ok)
            }
            StreamKind::Http => (resp, false),
        };
        let (mut parts, mut recv) = resp.into_parts();
        if let Some(t) = &ticket {
            t.attach(recv.flow_control().clone());
        }
        let body = match (send, ticket) {
            (Some(send), Some(ticket)) if holds_stream => {
                parts.extensions.insert(permit);
                parts
                    .extensions
                    .insert(H2Upgrade::new(H2Io::new(send, recv, ticket)));
                body_empty()
            }
            (send, ticket) => {
                // A refused upgrade: nothing more to send on it.
                if let Some(mut send) = send.filter(|_| streaming) {
                    let _ = send.send_data(Bytes::new(), true);
                }
                RecvBody::new(recv, ticket, permit).boxed_unsync()
            }
        };
        Ok(Response::from_parts(parts, body))
    }
}

impl NodeSession for H2Session {
    fn info(&self) -> &SessionInfo {
        &self.info
    }

    fn send(&self, req: Request<Body>, target: &str) -> ResponseFuture {
        let sender = self.send.lock().expect("session lock").clone();
        let permit = self.streams.clone().try_acquire_owned();
        let target = target.to_owned();
        // One span per tunnel stream, child of the caller's request span; the
        // edge's span becomes its child through the injected traceparent.
        // Round-trip probes are not traced.
        let span = if target == wire::PING_TARGET {
            tracing::Span::none()
        } else {
            info_span!(target: crate::trace::TARGET, "tunnel.stream",
                node = %self.info.node, session.id = self.info.id, tunnel.target = %target)
        };
        let mut req = req;
        crate::trace::inject(&span, req.headers_mut());
        let me = Opener {
            node: self.info.node.clone(),
            flow: self.flow.clone(),
            max_streams: self.max_streams,
            settle: self.settle,
            done: self.done.clone(),
        };
        Box::pin(async move { me.open_stream(req, target, sender, permit).await }.instrument(span))
    }

    fn close(&self) {
        // Dropping the last SendRequest lets h2 send GOAWAY once in-flight
        // streams end, then shut down the WebSocket and TLS in order.
        self.send.lock().expect("session lock").take();
    }

    fn terminate(&self) {
        self.close();
        self.control.kill();
    }

    fn announce_reconnect(&self, after: std::time::Duration) {
        self.control.announce_reconnect(after);
    }

    fn open_streams(&self) -> usize {
        self.max_streams as usize - self.streams.available_permits()
    }

    fn is_closed(&self) -> bool {
        *self.done.borrow() || self.send.lock().expect("session lock").is_none()
    }

    fn record_rtt(&self, rtt: std::time::Duration) {
        let micros = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
        self.rtt_micros
            .store(micros, std::sync::atomic::Ordering::Relaxed);
    }

    fn last_rtt(&self) -> Option<std::time::Duration> {
        match self.rtt_micros.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            us => Some(std::time::Duration::from_micros(us)),
        }
    }
}

/// How an edge session ended without a fault.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdgeSessionEnd {
    /// The cloud, as it closed the session, asked the edge to wait this long
    /// before it reconnects (ADR 0023).
    pub reconnect_after: Option<std::time::Duration>,
}

/// Edge side: serves tunnel streams with `handler` until the cloud closes the
/// session, keepalive fails, or shutdown (then GOAWAY and drain).
pub async fn serve_edge_session<S, F, Fut>(
    io: WsStream<S>,
    limits: TunnelLimits,
    handler: F,
    shutdown: Shutdown,
) -> Result<EdgeSessionEnd, hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, std::convert::Infallible>(handler(req).await) }
    });
    let control = io.control();
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .initial_stream_window_size(limits.effective_stream_window())
        .initial_connection_window_size(limits.connection_window())
        .max_frame_size(limits.max_frame_size)
        .max_header_list_size(limits.max_header_list_size)
        .max_send_buf_size(limits.effective_send_buf())
        .max_concurrent_streams(limits.max_streams)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            // An announced reconnect says the cloud closes on purpose, even
            // when its close overtakes the edge's reply (a broken pipe).
            let reconnect_after = control.reconnect_after();
            closed_by_peer_is_ok(r, control.peer_closed() || reconnect_after.is_some())?;
            return Ok(EdgeSessionEnd { reconnect_after });
        }
        _ = shutdown.triggered() => {}
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        r = conn => r.map(|()| EdgeSessionEnd::default()),
        _ = shutdown.drained() => Ok(EdgeSessionEnd::default()),
    }
}

/// hyper reports a connection the cloud ended with GOAWAY(NO_ERROR) as
/// failed, or as a broken pipe when the edge's own GOAWAY found the
/// transport already closed. That is how a cloud closes its sessions when it
/// stops (a rolling update): a clean close, not a lost tunnel to warn about.
/// `by_cloud`: the cloud's WebSocket close or its reconnect announcement arrived.
fn closed_by_peer_is_ok(r: Result<(), hyper::Error>, by_cloud: bool) -> Result<(), hyper::Error> {
    use std::error::Error as _;
    let Err(e) = r else { return r };
    let h2 = e.source().and_then(|s| s.downcast_ref::<h2::Error>());
    let clean = match h2.and_then(h2::Error::reason) {
        // A GOAWAY or reset with an error code is a fault, whoever sent it.
        Some(reason) if reason != h2::Reason::NO_ERROR => false,
        Some(_) => h2.is_some_and(|h| h.is_go_away() && h.is_remote()) || by_cloud,
        // An I/O error (the edge's GOAWAY after the cloud's close).
        None => by_cloud,
    };
    if clean { Ok(()) } else { Err(e) }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
