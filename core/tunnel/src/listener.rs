//! The cloud's tunnel listener: accepts edges over mTLS, reads the node name
//! from the client certificate, checks the WebSocket upgrade (path, protocol
//! version, claimed node), starts an [`H2Session`] and registers it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tracing::{Instrument, debug, info, info_span, warn};

use tether_pki::{Identity, IdentityError};

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
    Session(#[source] hyper::Error),
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
        }
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
        this.registry.close_all();
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
        let session = self.handshake(tcp, peer, ticket).await;
        let session = match session {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "edge refused");
                self.emit(TunnelEvent::Refused(&e));
                return;
            }
        };
        let info = session.info().clone();
        let replaced = self.registry.insert(session.clone()).is_some();
        info!(node = %info.node, session.id = info.id, replaced, "edge connected");
        self.emit(TunnelEvent::Connected {
            info: &info,
            replaced,
        });
        tokio::select! {
            _ = session.closed() => {}
            _ = shutdown.drained() => {}
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
        self.emit(TunnelEvent::Disconnected {
            info: &info,
            reason,
        });
    }

    #[allow(clippy::result_large_err)] // tungstenite's upgrade callback signature
    async fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        ticket: crate::PreAuthTicket,
    ) -> Result<Arc<H2Session>, AcceptError> {
        let timeout = self.limits.handshake_timeout;
        let _ = tcp.set_nodelay(true);
        let tls = ticket.accept_tls(tcp, |_| self.tls.current()).await?;
        // Authenticated from here on: the edge leaves the pre-auth budget.
        drop(ticket);
        let identity = Identity::from_peer(tls.get_ref().1.peer_certificates())?;
        let node = identity.require_node()?.to_owned();
        // Admission is answered before the upgrade itself is checked:
        // `tether edge --check` relies on it to learn whether a certificate
        // is revoked without opening a session (tests/edge_check.rs).
        let denied = self.admission.as_ref().and_then(|a| a(&identity).err());
        #[allow(clippy::result_large_err)] // tungstenite's callback signature
        let announced = Arc::new(std::sync::Mutex::new(Vec::new()));
        let check = {
            let node = node.clone();
            let announced = announced.clone();
            move |req: &Request, resp: Response| match denied {
                Some(reason) => Err(refuse(StatusCode::FORBIDDEN, reason)),
                None => {
                    *announced.lock().expect("endpoints lock") = endpoints(req);
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
        let info = SessionInfo {
            node,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            ips: identity.ips.clone(),
            connected_at: SystemTime::now(),
            identity,
            endpoints: std::mem::take(&mut *announced.lock().expect("endpoints lock")),
        };
        let io = WsStream::new(ws, self.limits.ws_message_size);
        tokio::time::timeout(timeout, H2Session::start(io, info, &self.limits))
            .await
            .map_err(|_| AcceptError::Timeout("session"))?
            .map_err(AcceptError::Session)
    }
}

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
