//! Tether's tunnel core: the mTLS WebSocket listener and dialer, the
//! WebSocket-to-byte-stream adapter, the HTTP/2 session that multiplexes kubelet
//! requests over it, the session registry, keepalive, reconnect backoff and the
//! shutdown signal every long-running task selects on.
//!
//! The cloud is the HTTP/2 client and the edge the HTTP/2 server: each kubelet
//! request is one h2 stream, so status codes, headers, trailers, per-stream flow
//! control, resets, PING and GOAWAY come from h2. See `docs/protocol.md`.

mod backoff;
mod cidr;
mod dialer;
mod flow;
mod h2body;
mod h2conn;
pub mod kubeedge;
mod limits;
mod listener;
mod preauth;
mod registry;
mod server_tls;
mod session;
mod shutdown;
mod splice;
mod stall;
pub mod trace;
pub mod upgrade;
mod window;
pub mod wire;
mod ws;

pub use backoff::Backoff;
pub use cidr::Cidr;
pub use dialer::{DialError, EdgeTransport, RefusalHook, TunnelDialer};
pub use flow::WindowMetrics;
pub use limits::TunnelLimits;
pub use listener::{AcceptError, KubeEdgeAccept, TunnelEvent, TunnelListener};
pub use preauth::{
    LISTEN_BACKLOG, PreAuthError, PreAuthGate, PreAuthLimits, PreAuthMetrics, PreAuthTicket,
    bind_listener,
};
pub use registry::{IpLookup, SessionRegistry};
pub use server_tls::ServerTls;
pub use session::{
    Body, BoxError, EdgeSessionEnd, H2Session, NodeSession, SessionInfo, SessionKind, StreamError,
    StreamPermit, body_empty, body_from, serve_edge_session,
};
pub use shutdown::{Shutdown, ShutdownTrigger};
pub use splice::splice;
pub use stall::{STALL_THRESHOLD, StallHook, stall_metered};
pub use window::{WindowError, WindowGovernor};
pub use ws::{MAX_RECONNECT_AFTER, WsControl, WsStream};

/// The WebSocket subprotocol naming the protocol version this build speaks.
pub const PROTOCOL_VERSION: &str = "tether.v1";
/// The HTTP path edges upgrade on.
pub const TUNNEL_PATH: &str = "/v1/tunnel";
/// Header in which an edge states the node name it believes it is. It must
/// match the certificate; it exists so a misconfigured edge fails loudly.
pub const NODE_HEADER: &str = "tether-node";
/// Header in which an edge lists its allow-listed local endpoints
/// (`ip:port,...`), for service discovery. At most 64 are kept.
pub const ENDPOINTS_HEADER: &str = "tether-endpoints";
/// Upgrade header by which an edge asks the cloud to carry its message-hub
/// channel inside this tunnel session (ADR 0022): one connection per edge.
pub const HUB_HEADER: &str = "tether-hub";
