//! The cloud side of the stream tunnel: the tunnel listener edges dial, and
//! the kubelet-API front that kube-apiserver, metrics-server and Prometheus
//! talk to. Both share one [`SessionRegistry`].

mod authz;
mod front;
mod metrics;
pub mod route;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use tether_tunnel::{SessionRegistry, Shutdown, TunnelLimits, TunnelListener};

pub use authz::Authorizer;
pub use front::FrontLimits;
pub use metrics::CloudMetrics;

/// Everything the cloud needs, already loaded.
pub struct CloudOptions {
    /// Bound socket for edge tunnels (default port 10004).
    pub tunnel_listener: TcpListener,
    /// TLS for edges: requires node client certificates from the edge CA.
    pub tunnel_tls: Arc<rustls::ServerConfig>,
    /// Bound socket for the kubelet-API front (default port 10003).
    pub front_listener: TcpListener,
    /// TLS for the front: requires client certificates from the apiserver's
    /// kubelet-client CA.
    pub front_tls: Arc<rustls::ServerConfig>,
    /// Who may use the front.
    pub authz: Authorizer,
    /// Tunnel bounds.
    pub limits: TunnelLimits,
    /// Front bounds.
    pub front_limits: FrontLimits,
    /// The session registry (shared with callers that inspect it).
    pub registry: SessionRegistry,
    /// Metric families, registered by the caller.
    pub metrics: CloudMetrics,
}

/// Runs the tunnel listener and the front until shutdown, then drains both.
pub async fn run(opts: CloudOptions, shutdown: Shutdown) {
    let metrics = opts.metrics.clone();
    let tunnel = TunnelListener::new(
        opts.tunnel_listener,
        opts.tunnel_tls,
        opts.limits,
        opts.registry.clone(),
    )
    .on_event(move |ev| metrics.tunnel_event(&ev));
    let front = front::KubeletFront {
        tcp: opts.front_listener,
        tls: TlsAcceptor::from(opts.front_tls),
        registry: opts.registry,
        authz: opts.authz,
        limits: opts.front_limits,
        metrics: opts.metrics,
    };
    let (t, ()) = tokio::join!(tunnel.run(shutdown.clone()), front.run(shutdown));
    if let Err(e) = t {
        tracing::warn!(error = %e, "tunnel listener ended with error");
    }
}
