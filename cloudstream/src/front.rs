//! The kubelet-API front: what kube-apiserver, metrics-server and Prometheus
//! talk to instead of the edge kubelet. TLS with a REQUIRED client
//! certificate from the configured CA, subject authorized per connection;
//! every request is routed to its node's session and proxied as a stream,
//! upgrades and CONNECT included. No body is ever buffered whole.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info_span, warn};

use tether_pki::Identity;
use tether_tunnel::wire::{self, KUBELET_TARGET, StreamKind, status_response};
use tether_tunnel::{
    Body, BoxError, IpLookup, NodeSession, PreAuthGate, PreAuthTicket, ServerTls, SessionRegistry,
    Shutdown, StreamError, StreamPermit, body_empty,
};

use crate::authz::Authorizer;
use crate::metrics::{CloudMetrics, Kind};
use crate::route::{self, NodeKey};

/// Bounds of the front.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FrontLimits {
    /// Concurrent authenticated client connections (default 4096); a client
    /// that finishes its handshake beyond this is closed at once.
    /// Connections still handshaking are bounded separately (`preauth`).
    pub max_connections: usize,
    /// Largest request header block in bytes (default 64 KiB).
    pub max_header_bytes: usize,
    /// Request-header deadline in seconds (default 10), also the idle
    /// timeout of a kept-alive connection between requests.
    pub header_timeout_secs: u64,
}

impl Default for FrontLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_header_bytes: 64 << 10,
            header_timeout_secs: 10,
        }
    }
}

pub(crate) struct KubeletFront {
    /// Taken by `run`, which closes it when shutdown starts.
    pub(crate) tcp: Option<TcpListener>,
    /// The process's budget of connections still handshaking, and this
    /// listener's name in it.
    pub(crate) gate: (PreAuthGate, &'static str),
    pub(crate) tls: ServerTls,
    pub(crate) node_certs: Option<Arc<crate::serving::NodeCerts>>,
    pub(crate) registry: SessionRegistry,
    pub(crate) authz: Authorizer,
    pub(crate) limits: FrontLimits,
    pub(crate) metrics: CloudMetrics,
    pub(crate) pod_locator: Option<crate::PodLocator>,
    /// Forwarding to the replica that holds a node (several replicas).
    pub(crate) forwarder: Option<Arc<crate::peer::Forwarder>>,
    /// This is a peer listener: requests come from other replicas, name
    /// their node and target in headers, and are served from local
    /// sessions only (never forwarded again).
    pub(crate) peer_mode: bool,
    /// The hub's routes on a peer listener (messages relayed between
    /// replicas, ADR 0021).
    pub(crate) hub_peer: Option<tether_cloudhub::api::Handler>,
    /// Networks a CONNECT naming no node is dialled to directly.
    pub(crate) egress_passthrough: Vec<crate::egress::Cidr>,
}

/// Facts about one client connection, fixed at accept.
struct Conn {
    identity: Identity,
    authorized: bool,
    local: SocketAddr,
    original_dst: Option<SocketAddr>,
}

impl KubeletFront {
    pub(crate) async fn run(mut self, shutdown: Shutdown) {
        let Some(tcp) = self.tcp.take() else { return };
        let this = Arc::new(self);
        let conns = Arc::new(Semaphore::new(this.limits.max_connections));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            // Accept at once; the pre-auth gate bounds what is handshaking.
            let (tcp, peer) = tokio::select! {
                r = tcp.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "front accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.triggered() => break,
            };
            let Some(ticket) = this.gate.0.admit(this.gate.1, peer.ip()) else {
                continue;
            };
            while tasks.try_join_next().is_some() {}
            let this = this.clone();
            let shutdown = shutdown.clone();
            let conns = conns.clone();
            tasks.spawn(
                async move {
                    if let Err(e) = this.serve_conn(tcp, ticket, conns, shutdown).await {
                        debug!(error = %e, "front connection ended");
                    }
                }
                .instrument(info_span!("front", peer.addr = %peer)),
            );
        }
        // Refuse new connections at once while in-flight requests drain, so
        // clients retry elsewhere instead of waiting in a dead backlog.
        drop(tcp);
        let drain = async { while tasks.join_next().await.is_some() {} };
        tokio::select! {
            _ = drain => {}
            _ = shutdown.drained() => tasks.abort_all(),
        }
    }

    async fn serve_conn(
        self: Arc<Self>,
        tcp: TcpStream,
        ticket: PreAuthTicket,
        conns: Arc<Semaphore>,
        shutdown: Shutdown,
    ) -> Result<(), BoxError> {
        let local = tcp.local_addr()?;
        let original_dst = original_dst(&tcp, local);
        let _ = tcp.set_nodelay(true);
        let timeout = Duration::from_secs(self.limits.header_timeout_secs);
        let config = |_: &rustls::server::ClientHello<'_>| match &self.node_certs {
            Some(certs) => certs.config_for(self.tls.current(), original_dst.map(|d| d.ip())),
            None => self.tls.current(),
        };
        let tls = match ticket.accept_tls(tcp, config).await {
            Ok(t) => t,
            Err(e) => {
                if matches!(e, tether_tunnel::PreAuthError::Tls(_)) {
                    self.metrics.auth_failure("tls");
                }
                return Err(e.into());
            }
        };
        drop(ticket);
        let Ok(_slot) = conns.try_acquire_owned() else {
            self.metrics.auth_failure("busy");
            return Err("max_connections authenticated connections open; closed".into());
        };
        let identity = Identity::from_peer(tls.get_ref().1.peer_certificates())?;
        let authorized = self.authz.allows(&identity);
        if !authorized {
            warn!(subject = %identity.common_name, "front client not authorized");
        }
        let conn = Arc::new(Conn {
            identity,
            authorized,
            local,
            original_dst,
        });
        let front = self.clone();
        let sd = shutdown.clone();
        let service = hyper::service::service_fn(move |req| {
            let front = front.clone();
            let conn = conn.clone();
            let sd = sd.clone();
            async move { Ok::<_, std::convert::Infallible>(front.handle(req, &conn, &sd).await) }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(timeout)
            .max_buf_size(self.limits.max_header_bytes.max(8192));
        let http = builder
            .serve_connection(TokioIo::new(tls), service)
            .with_upgrades();
        tokio::pin!(http);
        tokio::select! {
            r = http.as_mut() => return r.map_err(Into::into),
            _ = shutdown.triggered() => {}
        }
        // Finish the in-flight request, then close; bounded by the drain deadline.
        http.as_mut().graceful_shutdown();
        tokio::select! {
            r = http => r.map_err(Into::into),
            _ = shutdown.drained() => Ok(()),
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        conn: &Conn,
        shutdown: &Shutdown,
    ) -> Response<Body> {
        let started = Instant::now();
        let kind = Kind::of(req.method(), req.uri().path());
        let span = info_span!(
            target: tether_tunnel::trace::TARGET,
            "front.request",
            method = %req.method(),
            path = %req.uri().path(),
            node = tracing::field::Empty,
            user = %conn.identity.common_name,
            client.traceparent = tracing::field::Empty,
        );
        // The apiserver's trace, when it sent one, is this span's parent.
        if let Some(tp) = tether_tunnel::trace::adopt_parent(&span, req.headers()) {
            span.record("client.traceparent", tp.as_str());
        }
        let resp = self.proxy(req, conn, kind, shutdown).instrument(span).await;
        // Count what reaches the client as it streams.
        let to_client = self.metrics.bytes(kind, "to_client");
        let stalls = self.metrics.stall_hook(kind);
        let resp = resp.map(|b| {
            let counted = CountingBody {
                inner: b,
                counter: to_client,
                drain: false,
            }
            .boxed_unsync();
            tether_tunnel::stall_metered(counted, stalls)
        });
        self.metrics.request(
            kind,
            resp.status().as_u16(),
            started.elapsed().as_secs_f64(),
        );
        resp
    }

    async fn proxy(
        &self,
        mut req: Request<Incoming>,
        conn: &Conn,
        kind_label: Kind,
        shutdown: &Shutdown,
    ) -> Response<Body> {
        if !conn.authorized {
            self.metrics.auth_failure("forbidden");
            return status_response(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!(
                    "user {:?} (groups {:?}) may not use the kubelet API",
                    conn.identity.common_name, conn.identity.organizations
                ),
            );
        }
        if shutdown.is_triggered() {
            return status_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "tether cloud is shutting down",
            );
        }
        if self.peer_mode
            && req
                .uri()
                .path()
                .starts_with(tether_cloudhub::replicas::PEER_PATH)
        {
            return match &self.hub_peer {
                Some(hub) => hub(req).await,
                None => status_response(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "this replica runs no message hub",
                ),
            };
        }
        // A request another replica forwarded names its node and target.
        let forwarded = if self.peer_mode {
            match self.forwarded(&mut req) {
                Ok(f) => Some(f),
                Err(resp) => return resp,
            }
        } else {
            None
        };
        // Explicit addressing (Prometheus via service discovery) names the
        // node and the edge-side target in the path.
        let explicit = if forwarded.is_some() {
            None
        } else {
            route::explicit_path(req.uri().path())
        };
        let session = match (&forwarded, &explicit) {
            (Some((s, _)), _) => s.clone(),
            (None, Some((node, _, _))) => match self.by_name(node) {
                Some(s) => s,
                None => {
                    return status_response(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        &format!("no tunnel session for node {node} (unknown or disconnected)"),
                    );
                }
            },
            (None, None) => match self.route(&req, conn) {
                Ok(s) => s,
                Err(resp) => match self.passthrough_target(&req) {
                    // Only for addresses no node claims (not for ambiguous ones).
                    Some(to) if resp.status() == StatusCode::NOT_FOUND => {
                        return self.passthrough(req, to, kind_label, shutdown).await;
                    }
                    _ => return resp,
                },
            },
        };
        tracing::Span::current().record("node", session.info().node.as_str());
        let kind = wire::classify(&req);
        if let Some((_, target, path)) = explicit {
            if !matches!(kind, StreamKind::Http) {
                return status_response(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "explicit /tether/v1/nodes/ paths carry plain requests only",
                );
            }
            let pq = match req.uri().query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            match pq.parse() {
                Ok(uri) => *req.uri_mut() = uri,
                Err(_) => {
                    return status_response(StatusCode::BAD_REQUEST, "BadRequest", "invalid path");
                }
            }
            let target = match target {
                route::ExplicitTarget::Kubelet => KUBELET_TARGET.to_owned(),
                route::ExplicitTarget::Endpoint(a) => a.to_string(),
            };
            let req = self.counted(req, kind_label);
            return match session.send(req, &target).await {
                Ok(r) => r,
                Err(e) => stream_error(&e),
            };
        }
        let target = match &kind {
            _ if forwarded.is_some() => forwarded.map(|(_, t)| t).unwrap_or_default(),
            StreamKind::Connect => match req.uri().authority() {
                Some(a) => a.to_string(),
                None => {
                    return status_response(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "CONNECT needs host:port",
                    );
                }
            },
            _ => KUBELET_TARGET.to_owned(),
        };
        let client_side = (!matches!(kind, StreamKind::Http)).then(|| hyper::upgrade::on(&mut req));
        let req = self.counted(req, kind_label);
        let mut resp = match session.send(req, &target).await {
            Ok(r) => r,
            Err(e) => return stream_error(&e),
        };
        let Some(client_side) = client_side else {
            return resp;
        };
        let switched = match kind {
            StreamKind::Connect => resp.status().is_success(),
            _ => resp.status() == StatusCode::SWITCHING_PROTOCOLS,
        };
        if !switched {
            return resp;
        }
        let tunnel_side = tether_tunnel::upgrade::on(&mut resp);
        let permit = resp.extensions_mut().remove::<StreamPermit>();
        let shutdown = shutdown.clone();
        let (up_bytes, down_bytes) = (
            self.metrics.bytes(kind_label, "from_client"),
            self.metrics.bytes(kind_label, "to_client"),
        );
        tokio::spawn(
            async move {
                let _permit = permit;
                let (c, t) = match tokio::join!(client_side, tunnel_side) {
                    (Ok(c), Ok(t)) => (c, t),
                    (c, t) => {
                        debug!(client = ?c.err(), tunnel = ?t.err(), "upgrade failed");
                        return;
                    }
                };
                let (mut c, mut t) = (TokioIo::new(c), t);
                match tether_tunnel::splice(&mut c, &mut t, &shutdown).await {
                    Ok((up, down)) => {
                        up_bytes.inc_by(up);
                        down_bytes.inc_by(down);
                        debug!(up, down, "upgraded stream closed")
                    }
                    Err(e) => debug!(error = %e, "upgraded stream ended"),
                }
            }
            .in_current_span(),
        );
        let (parts, _) = resp.into_parts();
        Response::from_parts(parts, body_empty())
    }

    /// The destination of a CONNECT that no node claims, when it lies in a
    /// passthrough network.
    fn passthrough_target(&self, req: &Request<Incoming>) -> Option<SocketAddr> {
        if req.method() != http::Method::CONNECT || self.egress_passthrough.is_empty() {
            return None;
        }
        let to: SocketAddr = req.uri().authority()?.as_str().parse().ok()?;
        self.egress_passthrough
            .iter()
            .any(|c| c.contains(to.ip()))
            .then_some(to)
    }

    /// Dials `to` from the cloud and splices the client's CONNECT onto it
    /// (ADR 0012): the apiserver's TLS to a webhook or aggregated API stays
    /// end to end, as it does to a kubelet.
    async fn passthrough(
        &self,
        mut req: Request<Incoming>,
        to: SocketAddr,
        kind: Kind,
        shutdown: &Shutdown,
    ) -> Response<Body> {
        let tcp = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(to)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                return status_response(
                    StatusCode::BAD_GATEWAY,
                    "ServiceUnavailable",
                    &format!("passthrough to {to} failed: {e}"),
                );
            }
            Err(_) => {
                return status_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Timeout",
                    &format!("passthrough to {to} timed out"),
                );
            }
        };
        let _ = tcp.set_nodelay(true);
        debug!(%to, "egress passthrough");
        let client_side = hyper::upgrade::on(&mut req);
        let shutdown = shutdown.clone();
        let (up_bytes, down_bytes) = (
            self.metrics.bytes(kind, "from_client"),
            self.metrics.bytes(kind, "to_client"),
        );
        tokio::spawn(
            async move {
                let Ok(c) = client_side.await else { return };
                let (mut c, mut tcp) = (TokioIo::new(c), tcp);
                match tether_tunnel::splice(&mut c, &mut tcp, &shutdown).await {
                    Ok((up, down)) => {
                        up_bytes.inc_by(up);
                        down_bytes.inc_by(down);
                    }
                    Err(e) => debug!(error = %e, "passthrough stream ended"),
                }
            }
            .in_current_span(),
        );
        Response::new(body_empty())
    }

    /// The request with its body counted into `from_client` bytes as it streams.
    fn counted(&self, req: Request<Incoming>, kind: Kind) -> Request<Body> {
        let counter = self.metrics.bytes(kind, "from_client");
        req.map(|b| {
            CountingBody {
                inner: b.map_err(BoxError::from).boxed_unsync(),
                counter,
                drain: true,
            }
            .boxed_unsync()
        })
    }

    /// The node's session here, or a forwarding session to the live replica
    /// that holds it.
    fn by_name(&self, node: &str) -> Option<Arc<dyn NodeSession>> {
        self.registry.get(node).or_else(|| {
            self.forwarder
                .as_ref()
                .filter(|_| !self.peer_mode)
                .and_then(|f| f.session_for(node))
        })
    }

    /// The local session and target a forwarding replica named.
    #[allow(clippy::result_large_err)]
    fn forwarded(
        &self,
        req: &mut Request<Incoming>,
    ) -> Result<(Arc<dyn NodeSession>, String), Response<Body>> {
        let mut take = |name: &str| {
            req.headers_mut()
                .remove(name)
                .and_then(|v| v.to_str().ok().map(str::to_owned))
        };
        let (Some(node), Some(target)) = (
            take(crate::peer::NODE_HEADER),
            take(crate::peer::TARGET_HEADER),
        ) else {
            return Err(status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "a forwarded request names its node and target",
            ));
        };
        let from = take(crate::peer::FROM_HEADER).unwrap_or_default();
        tracing::Span::current().record("user", format!("replica {from}").as_str());
        match self.registry.get(&node) {
            Some(s) => Ok((s, target)),
            None => Err(status_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!(
                    "node {node} has no tunnel session on this replica (it moved or disconnected)"
                ),
            )),
        }
    }

    /// Resolves the node, in order: original destination of a DNAT'd
    /// connection, Host header (for CONNECT: the request target),
    /// X-Forwarded-Uri, and last the pod cache for pod-scoped paths (cluster
    /// mode). Keys that name no live session are reported in the error.
    #[allow(clippy::result_large_err)]
    fn route(
        &self,
        req: &Request<Incoming>,
        conn: &Conn,
    ) -> Result<Arc<dyn NodeSession>, Response<Body>> {
        let mut keys: Vec<(&'static str, NodeKey)> = Vec::new();
        if let Some(dst) = conn.original_dst {
            keys.push(("original destination", NodeKey::Ip(dst.ip())));
        }
        // A CONNECT names its destination in the request target; its Host
        // says nothing (kube-apiserver's egress dialer always sends
        // `Host: 127.0.0.1`), so only the target counts.
        let (source, host) = if req.method() == http::Method::CONNECT {
            (
                "connect target",
                req.uri().authority().map(|a| a.to_string()),
            )
        } else {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
                .or_else(|| req.uri().authority().map(|a| a.to_string()));
            ("host", host)
        };
        if let Some(key) = host.as_deref().and_then(route::host_key)
            && !is_front_itself(&key, conn.local)
        {
            keys.push((source, key));
        }
        if let Some(name) = req
            .headers()
            .get("x-forwarded-uri")
            .and_then(|v| v.to_str().ok())
            .and_then(route::forwarded_uri_node)
        {
            keys.push(("x-forwarded-uri", NodeKey::Name(name)));
        }
        for (_, key) in &keys {
            let found = match key {
                NodeKey::Name(n) => self.by_name(n),
                NodeKey::Ip(ip) => match self.registry.by_ip(*ip) {
                    IpLookup::One(s) => Some(s),
                    IpLookup::None => self
                        .forwarder
                        .as_ref()
                        .filter(|_| !self.peer_mode)
                        .and_then(|f| f.session_for_ip(*ip)),
                    IpLookup::Ambiguous(nodes) => {
                        return Err(status_response(
                            StatusCode::BAD_GATEWAY,
                            "BadGateway",
                            &format!(
                                "address {ip} is claimed by several nodes {nodes:?}; refusing to guess"
                            ),
                        ));
                    }
                },
            };
            if let Some(s) = found {
                return Ok(s);
            }
        }
        let mut tried: Vec<String> = keys.iter().map(|(src, k)| format!("{src} {k}")).collect();
        // Last resort, and only from memory: the watch cache of pod placement.
        let pod = if req.method() == http::Method::CONNECT {
            None
        } else {
            self.pod_locator
                .as_ref()
                .zip(route::pod_path(req.uri().path()))
        };
        if let Some((locate, (ns, name))) = pod {
            match locate(ns, name) {
                Some(node) => {
                    if let Some(s) = self.by_name(&node) {
                        return Ok(s);
                    }
                    tried.push(format!("pod {ns}/{name} on node {node}"));
                }
                None => tried.push(format!("pod {ns}/{name} (not in the pod cache)")),
            }
        }
        if tried.is_empty() {
            return Err(status_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                "cannot tell which node this request is for: no DNAT'd destination, no node in Host (or CONNECT target), no X-Forwarded-Uri /api/v1/nodes/<name>/proxy/...",
            ));
        }
        Err(status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!(
                "no tunnel session for node (unknown or disconnected); tried {}",
                tried.join(", ")
            ),
        ))
    }
}

/// Host names that are the front itself, not a node.
fn is_front_itself(key: &NodeKey, local: SocketAddr) -> bool {
    match key {
        NodeKey::Ip(ip) => *ip == local.ip() || ip.is_unspecified(),
        NodeKey::Name(n) => n == "localhost",
    }
}

/// The pre-DNAT destination, when the connection was redirected here.
fn original_dst(tcp: &TcpStream, local: SocketAddr) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let addr = match local.ip() {
        IpAddr::V4(_) => sock.original_dst_v4(),
        IpAddr::V6(_) => sock.original_dst_v6(),
    }
    .ok()?
    .as_socket()?;
    (addr != local).then_some(addr)
}

fn stream_error(e: &StreamError) -> Response<Body> {
    let (code, reason) = match e {
        StreamError::Busy { .. } => (StatusCode::TOO_MANY_REQUESTS, "TooManyRequests"),
        StreamError::Closed(_) => (StatusCode::BAD_GATEWAY, "ServiceUnavailable"),
        StreamError::Wire(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
        StreamError::UpgradeRefused(..) => (StatusCode::BAD_GATEWAY, "BadGateway"),
        StreamError::Tunnel(_) => (StatusCode::BAD_GATEWAY, "BadGateway"),
    };
    status_response(code, reason, &e.to_string())
}

/// A body that counts the bytes of its data frames as they pass.
struct CountingBody {
    inner: Body,
    counter: prometheus_client::metrics::counter::Counter,
    /// A request body: drained when dropped early (see the Drop impl).
    drain: bool,
}

/// How much of a request body the front still reads, and for how long, once
/// the edge has answered without taking it all.
const DRAIN_BYTES: u64 = 256 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(60);

/// A request body (`drain`) dropped before its end (the kubelet answered early, or the
/// stream failed) is read to its end in the background, within
/// [`DRAIN_BYTES`] and [`DRAIN_TIME`], and thrown away. Dropping it instead
/// makes hyper close the connection under a client that is still sending:
/// the client's next write fails (curl: "Send failure: Broken pipe") and it
/// reports an error although the response is already there.
impl Drop for CountingBody {
    fn drop(&mut self) {
        if !self.drain || hyper::body::Body::is_end_stream(&self.inner) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut body = std::mem::replace(&mut self.inner, body_empty());
        rt.spawn(async move {
            let drain = async {
                let mut left = DRAIN_BYTES;
                while let Some(Ok(frame)) = body.frame().await {
                    let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                    left = left.checked_sub(n)?;
                }
                Some(())
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
        });
    }
}

impl hyper::body::Body for CountingBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.counter.inc_by(data.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
