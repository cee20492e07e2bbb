//! The edge's tunnel dialer: TCP, then TLS verifying the cloud against the
//! pinned CA while presenting the node certificate, then the WebSocket
//! upgrade naming the protocol version. Every stage has a deadline.

use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, http::HeaderValue};

use crate::{NODE_HEADER, PROTOCOL_VERSION, TUNNEL_PATH, TunnelLimits, WsStream};

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// A stage did not finish in time.
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// TCP connect failed.
    #[error("connect to {addr} failed: {cause}")]
    Connect {
        /// The cloud address.
        addr: String,
        /// The error.
        cause: std::io::Error,
    },
    /// TLS failed (e.g. the cloud's certificate does not verify).
    #[error("tls handshake failed: {0}")]
    Tls(#[source] std::io::Error),
    /// The cloud refused the upgrade, with its reason.
    #[error("cloud refused the tunnel ({status}): {reason}")]
    Refused {
        /// HTTP status of the refusal.
        status: u16,
        /// The cloud's explanation.
        reason: String,
    },
    /// The WebSocket handshake failed otherwise.
    #[error("websocket handshake failed: {0}")]
    WebSocket(#[source] WsError),
    /// Configuration is unusable.
    #[error("invalid dialer configuration: {0}")]
    Config(String),
}

/// Dials the cloud's tunnel listener.
#[derive(Clone)]
pub struct TunnelDialer {
    addr: String,
    server_name: ServerName<'static>,
    tls: watch::Receiver<Arc<rustls::ClientConfig>>,
    // Keeps a fixed configuration's channel open so `tls_changed` never fires.
    _fixed: Option<Arc<watch::Sender<Arc<rustls::ClientConfig>>>>,
    node: String,
    limits: TunnelLimits,
    endpoints: Vec<std::net::SocketAddr>,
    carry_hub: bool,
    on_refused: Option<RefusalHook>,
}

/// Called with the status and reason of each refused upgrade.
pub type RefusalHook = Arc<dyn Fn(u16, &str) + Send + Sync>;

impl std::fmt::Debug for TunnelDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelDialer")
            .field("addr", &self.addr)
            .field("node", &self.node)
            .finish()
    }
}

/// The edge's tunnel transport.
pub type EdgeTransport = WsStream<TlsStream<TcpStream>>;

impl TunnelDialer {
    /// `addr` is the cloud's `host:port`; `server_name` the name its
    /// certificate must carry; `tls` holds the pinned CA and the node
    /// certificate; `node` is sent so a mismatch fails loudly.
    pub fn new(
        addr: impl Into<String>,
        server_name: &str,
        tls: Arc<rustls::ClientConfig>,
        node: impl Into<String>,
        limits: TunnelLimits,
    ) -> Result<Self, DialError> {
        let (tx, rx) = watch::channel(tls);
        let mut d = Self::rotating(addr, server_name, rx, node, limits)?;
        d._fixed = Some(Arc::new(tx));
        Ok(d)
    }

    /// Like [`TunnelDialer::new`], with a TLS configuration that changes when
    /// the node certificate is renewed. Each dial uses the newest one.
    pub fn rotating(
        addr: impl Into<String>,
        server_name: &str,
        tls: watch::Receiver<Arc<rustls::ClientConfig>>,
        node: impl Into<String>,
        limits: TunnelLimits,
    ) -> Result<Self, DialError> {
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| DialError::Config(format!("server name {server_name:?}: {e}")))?;
        Ok(Self {
            addr: addr.into(),
            server_name,
            tls,
            _fixed: None,
            node: node.into(),
            limits,
            endpoints: Vec::new(),
            carry_hub: false,
            on_refused: None,
        })
    }

    /// Announces the edge's allow-listed local endpoints to the cloud (for
    /// Prometheus service discovery). The edge still enforces the list.
    pub fn advertise_endpoints(&mut self, endpoints: &[std::net::SocketAddr]) {
        self.endpoints = endpoints.to_vec();
    }

    /// Asks the cloud to carry the edge's hub channel inside each session,
    /// instead of a second connection to the hub port.
    pub fn carry_hub(&mut self, yes: bool) {
        self.carry_hub = yes;
    }

    /// Calls `hook` whenever the cloud refuses the upgrade, so the agent can
    /// act on it (re-enrol with its token when the certificate is revoked).
    pub fn on_refused(&mut self, hook: RefusalHook) {
        self.on_refused = Some(hook);
    }

    /// Resolves when a new TLS configuration (a renewed certificate) is
    /// available; never for a fixed one.
    pub async fn tls_changed(&mut self) {
        if self.tls.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The tunnel limits in use.
    pub fn limits(&self) -> &TunnelLimits {
        &self.limits
    }

    /// The node name this dialer claims.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The cloud address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Opens one tunnel with the newest TLS configuration.
    pub async fn dial(&mut self) -> Result<EdgeTransport, DialError> {
        let timeout = self.limits.handshake_timeout;
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| DialError::Timeout("connect"))?
            .map_err(|cause| DialError::Connect {
                addr: self.addr.clone(),
                cause,
            })?;
        let _ = tcp.set_nodelay(true);
        let connector = TlsConnector::from(self.tls.borrow_and_update().clone());
        let tls = tokio::time::timeout(timeout, connector.connect(self.server_name.clone(), tcp))
            .await
            .map_err(|_| DialError::Timeout("tls handshake"))?
            .map_err(DialError::Tls)?;
        let mut req = format!("wss://{}{}", self.addr, TUNNEL_PATH)
            .into_client_request()
            .map_err(|e| DialError::Config(e.to_string()))?;
        req.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(PROTOCOL_VERSION),
        );
        if !self.endpoints.is_empty() {
            let list: Vec<String> = self.endpoints.iter().map(ToString::to_string).collect();
            req.headers_mut().insert(
                crate::ENDPOINTS_HEADER,
                HeaderValue::from_str(&list.join(","))
                    .map_err(|e| DialError::Config(e.to_string()))?,
            );
        }
        if self.carry_hub {
            req.headers_mut()
                .insert(crate::HUB_HEADER, HeaderValue::from_static("1"));
        }
        req.headers_mut().insert(
            NODE_HEADER,
            HeaderValue::from_str(&self.node).map_err(|e| DialError::Config(e.to_string()))?,
        );
        let upgraded = tokio::time::timeout(
            timeout,
            tokio_tungstenite::client_async_with_config(req, tls, Some(self.limits.ws_config())),
        )
        .await
        .map_err(|_| DialError::Timeout("websocket handshake"))?
        .map_err(|e| match e {
            WsError::Http(resp) => DialError::Refused {
                status: resp.status().as_u16(),
                reason: resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            },
            other => DialError::WebSocket(other),
        });
        if let (Err(DialError::Refused { status, reason }), Some(hook)) =
            (&upgraded, &self.on_refused)
        {
            hook(*status, reason);
        }
        let (ws, _resp) = upgraded?;
        Ok(WsStream::new(ws, self.limits.ws_message_size))
    }
}
