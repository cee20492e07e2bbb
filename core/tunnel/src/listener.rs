//! The cloud's tunnel listener: accepts edges over mTLS, reads the node name
//! from the client certificate, checks the WebSocket upgrade (path, protocol
//! version, claimed node), starts an [`H2Session`] and registers it. With a
//! KubeEdge CA configured, the same port also accepts unmodified KubeEdge
//! edges on `/v1/kubeedge/connect` ([`crate::kubeedge`], ADR 0017).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tracing::{Instrument, debug, info, info_span, warn};

use tether_pki::{Identity, IdentityError};

use crate::kubeedge::upgrade::{Replay, is_kubeedge_path, parse_head, read_head};
use crate::kubeedge::{KUBEEDGE_PATH, KubeEdgeOptions, KubeEdgeSession, KubeEdgeTrust, Refusal};
use crate::session::SessionRun;
use crate::{
    H2Session, NODE_HEADER, NodeSession, PROTOCOL_VERSION, PreAuthError, PreAuthGate,
    PreAuthLimits, PreAuthMetrics, ServerTls, SessionInfo, SessionRegistry, Shutdown, TUNNEL_PATH,
    TunnelLimits, WsStream,
};

/// Why an edge connection was not turned into a session.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// A handshake stage did not finish in time.
    #[error("{0} handshake timed out")]
    Timeout(&'static str),
    /// The TLS handshake did not finish: timed out, shed for a newer
    /// connection, or failed (bad or missing client certificate, garbage).
    #[error(transparent)]
    PreAuth(#[from] PreAuthError),
    /// The certificate is not a node identity.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The WebSocket upgrade failed or was refused.
    #[error("websocket upgrade failed: {0}")]
    WebSocket(#[source] tokio_tungstenite::tungstenite::Error),
    /// The h2 session could not start.
    #[error("session handshake failed: {0}")]
    Session(#[source] h2::Error),
    /// The upgrade request could not be read.
    #[error("upgrade request: {0}")]
    Request(String),
    /// A KubeEdge edge was refused after the upgrade (CLOSE_CONNECT sent).
    #[error("kubeedge edge refused: {0}")]
    KubeEdge(Refusal),
}

impl AcceptError {
    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::PreAuth(e) => e.label(),
            Self::Identity(_) => "identity",
            Self::WebSocket(_) => "websocket",
            Self::Session(_) => "session",
            Self::Request(_) => "websocket",
            Self::KubeEdge(_) => "kubeedge",
        }
    }
}

/// Accepts edge tunnels and registers their sessions.
pub struct TunnelListener {
    tcp: Option<TcpListener>,
    tls: ServerTls,
    limits: TunnelLimits,
    registry: SessionRegistry,
    gate: PreAuthGate,
    gate_name: &'static str,
    next_id: Arc<AtomicU64>,
    on_event: Option<EventHook>,
    admission: Option<Admission>,
    kubeedge: Option<KubeEdgeAccept>,
    refusal_log: RefusalLog,
    window_metrics: crate::WindowMetrics,
}

/// What the listener needs to accept KubeEdge edges.
#[derive(Clone, Debug)]
pub struct KubeEdgeAccept {
    /// Which certificates are admitted, as which node.
    pub trust: KubeEdgeTrust,
    /// How their sessions behave.
    pub options: Arc<KubeEdgeOptions>,
}

/// KubeEdge edges redial every 2 s forever: one log line per reason a minute.
#[derive(Default)]
struct RefusalLog(std::sync::Mutex<std::collections::HashMap<&'static str, std::time::Instant>>);

impl RefusalLog {
    fn should_log(&self, reason: &'static str) -> bool {
        let mut seen = self.0.lock().expect("refusal log lock");
        let now = std::time::Instant::now();
        match seen.get(reason) {
            Some(t) if now.duration_since(*t) < Duration::from_secs(60) => false,
            _ => {
                seen.insert(reason, now);
                true
            }
        }
    }
}

type EventHook = Arc<dyn Fn(TunnelEvent<'_>) + Send + Sync>;
type Admission = Arc<dyn Fn(&Identity) -> Result<(), String> + Send + Sync>;

/// Lifecycle events, for metrics and logs.
#[derive(Debug)]
pub enum TunnelEvent<'a> {
    /// A session was registered; `replaced` if it displaced an older one.
    Connected {
        /// The session.
        info: &'a SessionInfo,
        /// Whether an older session of the node was replaced.
        replaced: bool,
    },
    /// A session ended, and why: `closed` (the edge or the cloud closed it
    /// cleanly), `error` (transport failure or keepalive timeout), `replaced`
    /// (a newer session of the node took over), `revoked`, or `shutdown`.
    Disconnected {
        /// The session.
        info: &'a SessionInfo,
        /// Why it ended.
        reason: &'static str,
    },
    /// A connection was refused.
    Refused(&'a AcceptError),
    /// A stream of a KubeEdge session ended abnormally, and why
    /// (`client_stalled`, `session_budget`, `response_timeout`, `bad_input`,
    /// `unknown_connection`, `unsupported`).
    StreamEnded {
        /// The node.
        node: &'a str,
        /// Why.
        reason: &'static str,
    },
}

/// The transport under an accepted Tether session.
type TetherIo = WsStream<Replay<tokio_rustls::server::TlsStream<TcpStream>>>;

/// A Tether session's connection, run by the listener's task for that edge
/// rather than a task of its own: one task per edge fewer (ADR 0022's
/// memory budget). KubeEdge sessions run their own tasks.
/// Boxed: moved out of the handshake's result into the wait below, a
/// connection inline would take two slots of this task's state.
type Run = Option<Box<SessionRun<TetherIo>>>;

/// A session the listener accepted, of either kind.
enum Accepted {
    H2(Arc<H2Session>),
    KubeEdge(Arc<KubeEdgeSession>),
}

impl Accepted {
    fn node_session(&self) -> Arc<dyn NodeSession> {
        match self {
            Self::H2(s) => s.clone(),
            Self::KubeEdge(s) => s.clone(),
        }
    }

    async fn closed(&self) {
        match self {
            Self::H2(s) => s.closed().await,
            Self::KubeEdge(s) => s.closed().await,
        }
    }

    fn end_reason(&self) -> &'static str {
        match self {
            Self::H2(s) => s.end_reason(),
            Self::KubeEdge(s) => s.end_reason(),
        }
    }
}

impl TunnelListener {
    /// A listener on an already bound socket. `tls` must require client
    /// certificates from the edge CA.
    pub fn new(
        tcp: TcpListener,
        tls: impl Into<ServerTls>,
        limits: TunnelLimits,
        registry: SessionRegistry,
    ) -> Self {
        Self {
            tcp: Some(tcp),
            tls: tls.into(),
            limits,
            registry,
            gate: PreAuthGate::new(PreAuthLimits::default(), PreAuthMetrics::default()),
            gate_name: "tunnel",
            next_id: Arc::new(AtomicU64::new(1)),
            on_event: None,
            admission: None,
            kubeedge: None,
            refusal_log: RefusalLog::default(),
            window_metrics: crate::WindowMetrics::default(),
        }
    }

    /// Exports the stream windows of Tether sessions to `metrics` (ADR 0020).
    pub fn window_metrics(mut self, metrics: crate::WindowMetrics) -> Self {
        self.window_metrics = metrics;
        self
    }

    /// Also accepts KubeEdge edges on `/v1/kubeedge/connect`. The TLS
    /// configuration must accept client certificates of the KubeEdge CA too.
    pub fn kubeedge(mut self, accept: KubeEdgeAccept) -> Self {
        self.kubeedge = Some(accept);
        self
    }

    /// Checks every authenticated edge with `f` (e.g. the deny list); an
    /// `Err(reason)` refuses the upgrade with 403 and that reason.
    pub fn admit(
        mut self,
        f: impl Fn(&Identity) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.admission = Some(Arc::new(f));
        self
    }

    /// Uses `gate` (the process's) as the budget of connections that have
    /// not finished their TLS handshake, counted under `name` (default: a
    /// gate of its own with [`PreAuthLimits::default`], unmetered).
    pub fn preauth(mut self, gate: PreAuthGate, name: &'static str) -> Self {
        self.gate = gate;
        self.gate_name = name;
        self
    }

    /// Calls `f` on every session event.
    pub fn on_event(mut self, f: impl Fn(TunnelEvent<'_>) + Send + Sync + 'static) -> Self {
        self.on_event = Some(Arc::new(f));
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.tcp {
            Some(tcp) => tcp.local_addr(),
            None => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    /// Accepts until shutdown, then closes every session and waits for them
    /// to drain (bounded by the shutdown's drain deadline).
    pub async fn run(mut self, shutdown: Shutdown) -> std::io::Result<()> {
        let tcp = self.tcp.take().ok_or(std::io::ErrorKind::NotConnected)?;
        let this = Arc::new(self);
        let mut sessions = tokio::task::JoinSet::new();
        loop {
            // Accept at once: a flood is bounded by the pre-auth gate, not by
            // the kernel backlog where legitimate edges would wait behind it.
            let (tcp, peer) = tokio::select! {
                r = tcp.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "tunnel accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.triggered() => break,
            };
            let Some(ticket) = this.gate.admit(this.gate_name, peer.ip()) else {
                continue;
            };
            while sessions.try_join_next().is_some() {}
            let this = this.clone();
            let shutdown = shutdown.clone();
            sessions.spawn(
                async move { this.serve(tcp, peer, ticket, shutdown).await }
                    .instrument(info_span!("tunnel", peer.addr = %peer)),
            );
        }
        // Close the listening socket now: new edges are refused at once and
        // try again (another replica, or this one after its restart).
        drop(tcp);
        let closed = this.registry.close_all(&this.limits);
        if closed > 0 {
            let last = this.limits.reconnect_after(closed - 1);
            info!(sessions = closed, edges_back_within = ?last, "closing every session; edges are asked back at limits.reconnect_rate");
        }
        let drain = async { while sessions.join_next().await.is_some() {} };
        tokio::select! {
            _ = drain => {}
            _ = shutdown.drained() => {
                // The drain deadline: end what still runs (long streams).
                for s in this.registry.all() {
                    s.terminate();
                }
                sessions.abort_all();
            }
        }
        Ok(())
    }

    fn emit(&self, ev: TunnelEvent<'_>) {
        if let Some(f) = &self.on_event {
            f(ev);
        }
    }

    async fn serve(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        ticket: crate::PreAuthTicket,
        shutdown: Shutdown,
    ) {
        // Boxed: the handshake's state (TLS, WebSocket, h2 preface) is large
        // and done with once the session runs; inline it would stay in this
        // task for the session's whole life (about 12 KiB per edge).
        let session = Box::pin(self.handshake(tcp, peer, ticket)).await;
        let (session, run) = match session {
            Ok(s) => s,
            Err(e) => {
                match &e {
                    AcceptError::KubeEdge(r) if self.refusal_log.should_log(r.label()) => {
                        warn!(reason = r.label(), error = %r, "kubeedge edge refused (logged once a minute per reason)")
                    }
                    _ => debug!(error = %e, "edge refused"),
                }
                self.emit(TunnelEvent::Refused(&e));
                return;
            }
        };
        // Borrowed, not cloned: this task waits for the session's whole life,
        // and a copy of the info would be held by every edge's task.
        let node_session = session.node_session();
        let info = node_session.info();
        let old = self.registry.insert(node_session.clone());
        let replaced = old.is_some();
        // KubeEdge edges redial every 2 s: two edges configured with one node
        // name replace each other forever. Say so (once a minute).
        if let Some(old) = old
            && let Ok(age) = SystemTime::now().duration_since(old.info().connected_at)
            && age < FLAP_WINDOW
            && self.refusal_log.should_log("flapping")
        {
            warn!(node = %info.node, kind = info.kind.label(), age_ms = age.as_millis() as u64,
                old.peer = %old.info().peer, new.peer = %info.peer,
                "a new session replaced one that had just connected; two edges may share this node name (logged once a minute)");
        }
        info!(node = %info.node, session.id = info.id, kind = info.kind.label(), replaced, "edge connected");
        self.emit(TunnelEvent::Connected { info, replaced });
        match run {
            // Dropped at the drain deadline: the connection goes with it.
            Some(run) => tokio::select! {
                () = run => {}
                _ = shutdown.drained() => {}
            },
            None => tokio::select! {
                _ = session.closed() => {}
                _ = shutdown.drained() => {}
            },
        }
        let removed = self.registry.remove(&info.node, info.id);
        let reason = if shutdown.is_triggered() {
            "shutdown"
        } else if !removed {
            "replaced"
        } else {
            session.end_reason()
        };
        info!(node = %info.node, session.id = info.id, reason, "edge disconnected");
        self.emit(TunnelEvent::Disconnected { info, reason });
    }

    #[allow(clippy::result_large_err)] // tungstenite's upgrade callback signature
    async fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        ticket: crate::PreAuthTicket,
    ) -> Result<(Accepted, Run), AcceptError> {
        let timeout = self.limits.handshake_timeout;
        let _ = tcp.set_nodelay(true);
        let mut tls = ticket.accept_tls(tcp, |_| self.tls.current()).await?;
        // Authenticated from here on: the edge leaves the pre-auth budget.
        drop(ticket);
        // With KubeEdge edges on the port, the path decides before anything
        // tether.v1-specific is checked; the bytes read are replayed.
        let mut replay = Vec::new();
        let mut denied = None;
        if let Some(ke) = &self.kubeedge {
            let head = tokio::time::timeout(timeout, read_head(&mut tls))
                .await
                .map_err(|_| AcceptError::Timeout("upgrade request"))??;
            if is_kubeedge_path(&head) {
                let session = self.kubeedge_handshake(tls, head, ke, peer).await?;
                return Ok((session, None));
            }
            let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
            if !ke.trust.is_tether(chain) {
                denied = Some(
                    "the client certificate is not issued by the Tether edge CA; \
                     KubeEdge certificates are accepted on /v1/kubeedge/connect only"
                        .to_owned(),
                );
            }
            replay = head;
        }
        let tls = Replay::new(tls, replay);
        let identity = Identity::from_peer(tls.inner.get_ref().1.peer_certificates())?;
        let node = identity.require_node()?.to_owned();
        // Admission is answered before the upgrade itself is checked:
        // `tether edge --check` relies on it to learn whether a certificate
        // is revoked without opening a session (tests/edge_check.rs).
        let denied = denied.or_else(|| self.admission.as_ref().and_then(|a| a(&identity).err()));
        #[allow(clippy::result_large_err)] // tungstenite's callback signature
        let announced = Arc::new(std::sync::Mutex::new((Vec::new(), false)));
        let check = {
            let node = node.clone();
            let announced = announced.clone();
            move |req: &Request, resp: Response| match denied {
                Some(reason) => Err(refuse(StatusCode::FORBIDDEN, reason)),
                None => {
                    *announced.lock().expect("endpoints lock") = (
                        endpoints(req),
                        req.headers()
                            .get(crate::HUB_HEADER)
                            .is_some_and(|v| v == "1"),
                    );
                    check_upgrade(req, resp, &node)
                }
            }
        };
        let ws = tokio::time::timeout(
            timeout,
            tokio_tungstenite::accept_hdr_async_with_config(
                tls,
                check,
                Some(self.limits.ws_config()),
            ),
        )
        .await
        .map_err(|_| AcceptError::Timeout("websocket"))?
        .map_err(AcceptError::WebSocket)?;
        let (endpoints, carries_hub) =
            std::mem::take(&mut *announced.lock().expect("endpoints lock"));
        let info = SessionInfo {
            kind: crate::SessionKind::Tether,
            node,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            ips: identity.ips.clone(),
            connected_at: SystemTime::now(),
            identity,
            endpoints,
            carries_hub,
        };
        let io = WsStream::new(ws, self.limits.ws_message_size);
        let metrics = self.window_metrics.clone();
        tokio::time::timeout(
            timeout,
            H2Session::handshake(io, info, &self.limits, metrics),
        )
        .await
        .map_err(|_| AcceptError::Timeout("session"))?
        .map_err(AcceptError::Session)
        .map(|(session, run)| (Accepted::H2(session), Some(Box::new(run))))
    }

    /// A KubeEdge edge: admit by certificate (ADR 0017), answer the upgrade,
    /// and either start the session or send CLOSE_CONNECT with the reason.
    /// Refusals happen after the upgrade because an edge only logs "bad
    /// handshake" for any non-101, and never shows a response body.
    async fn kubeedge_handshake(
        &self,
        mut tls: tokio_rustls::server::TlsStream<TcpStream>,
        head: Vec<u8>,
        ke: &KubeEdgeAccept,
        peer: SocketAddr,
    ) -> Result<Accepted, AcceptError> {
        let timeout = self.limits.handshake_timeout;
        let req = parse_head(&head)?;
        let Some(key) = req.ws_key.filter(|_| req.websocket) else {
            let _ = tokio::time::timeout(
                timeout,
                tls.write_all(
                    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                ),
            )
            .await;
            return Err(AcceptError::KubeEdge(Refusal::BadUpgrade(
                "not a WebSocket upgrade (want Upgrade: websocket, Sec-WebSocket-Key, version 13)",
            )));
        };
        let chain: Vec<_> = tls
            .get_ref()
            .1
            .peer_certificates()
            .unwrap_or_default()
            .iter()
            .map(|c| c.clone().into_owned())
            .collect();
        let admitted = ke
            .trust
            .admit(&chain, req.hostname.as_deref(), req.internal_ip.as_deref())
            .and_then(|a| match self.admission.as_ref().map(|f| f(&a.identity)) {
                Some(Err(reason)) => Err(Refusal::Revoked(reason)),
                _ => Ok(a),
            });
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        let mut out = response.into_bytes();
        if let Err(refusal) = &admitted {
            let msg = crate::kubeedge::codec::encode_message(
                0,
                crate::kubeedge::codec::MessageType::CloseConnect,
                refusal.to_string().as_bytes(),
            );
            let mut frames = bytes::BytesMut::new();
            crate::kubeedge::codec::encode_frame(
                &mut frames,
                crate::kubeedge::codec::opcode::TEXT,
                &msg,
            );
            crate::kubeedge::codec::encode_frame(
                &mut frames,
                crate::kubeedge::codec::opcode::CLOSE,
                &1008u16.to_be_bytes(),
            );
            out.extend_from_slice(&frames);
        }
        let written = async {
            tls.write_all(&out).await?;
            tls.flush().await
        };
        tokio::time::timeout(timeout, written)
            .await
            .map_err(|_| AcceptError::Timeout("websocket"))?
            .map_err(|e| AcceptError::Request(e.to_string()))?;
        let admitted = match admitted {
            Ok(a) => a,
            Err(refusal) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
                return Err(AcceptError::KubeEdge(refusal));
            }
        };
        let info = SessionInfo {
            kind: crate::SessionKind::KubeEdge,
            node: admitted.node.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            ips: admitted.ips,
            connected_at: SystemTime::now(),
            identity: admitted.identity,
            endpoints: Vec::new(),
            carries_hub: false,
        };
        let hook = self.on_event.clone().map(|f| {
            let node = admitted.node;
            Arc::new(move |reason: &'static str| {
                f(TunnelEvent::StreamEnded {
                    node: &node,
                    reason,
                })
            }) as crate::kubeedge::StreamEndHook
        });
        let session = KubeEdgeSession::start(
            tls,
            bytes::Bytes::from(req.rest),
            info,
            &self.limits,
            ke.options.clone(),
            hook,
        );
        Ok(Accepted::KubeEdge(session))
    }
}

/// A session replaced younger than this counts as flapping.
const FLAP_WINDOW: Duration = Duration::from_secs(10);

/// The endpoints an edge announced; malformed entries are ignored.
fn endpoints(req: &Request) -> Vec<SocketAddr> {
    req.headers()
        .get(crate::ENDPOINTS_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .filter_map(|a| a.trim().parse().ok())
                .take(64)
                .collect()
        })
        .unwrap_or_default()
}

fn refuse(status: StatusCode, reason: String) -> ErrorResponse {
    let mut resp = ErrorResponse::new(Some(reason));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "tether-supported-versions",
        http::HeaderValue::from_static(PROTOCOL_VERSION),
    );
    resp
}

/// Validates the upgrade request; the reason text reaches the edge's log.
#[allow(clippy::result_large_err)] // the signature is tungstenite's callback
fn check_upgrade(req: &Request, mut resp: Response, node: &str) -> Result<Response, ErrorResponse> {
    if req.uri().path().trim_end_matches('/') == KUBEEDGE_PATH {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            "KubeEdge edges are not enabled on this cloud (config kubeedge.ca_file)".into(),
        ));
    }
    if req.uri().path() != TUNNEL_PATH {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            format!(
                "no tunnel at {}; edges connect to {TUNNEL_PATH}",
                req.uri().path()
            ),
        ));
    }
    let offered: Vec<&str> = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    if !offered.contains(&PROTOCOL_VERSION) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "unsupported tunnel protocol version(s) {offered:?}; this cloud speaks {PROTOCOL_VERSION}"
            ),
        ));
    }
    if let Some(claimed) = req.headers().get(NODE_HEADER)
        && claimed.as_bytes() != node.as_bytes()
    {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            format!(
                "edge claims node {:?} but its certificate is for node {node:?}",
                String::from_utf8_lossy(claimed.as_bytes())
            ),
        ));
    }
    resp.headers_mut().insert(
        "sec-websocket-protocol",
        http::HeaderValue::from_static(PROTOCOL_VERSION),
    );
    Ok(resp)
}
