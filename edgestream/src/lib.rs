//! The edge agent: dials the cloud over mTLS, verifies it against the pinned
//! CA, and serves each tunnel stream against the local kubelet or an
//! explicitly allow-listed local endpoint, nothing else. Reconnects with
//! jittered exponential backoff and survives cloud restarts.

mod local;
mod metrics;
mod status;
mod streams;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_tunnel::{Backoff, DialError, EdgeTransport, Shutdown, TunnelDialer};
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

pub use local::{KubeletEndpoint, KubeletTimeouts, LocalError};
pub use metrics::EdgeMetrics;
pub use status::{StatusSnapshot, TunnelState, TunnelStatus};

/// Everything the agent needs, already loaded (certificates parsed, etc.).
pub struct EdgeOptions {
    /// How to reach the cloud.
    pub dialer: TunnelDialer,
    /// The kubelet this agent serves.
    pub kubelet: KubeletEndpoint,
    /// Local endpoints (besides the kubelet) the cloud may reach, e.g. node_exporter.
    pub allow: Vec<SocketAddr>,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// Metric families, registered by the caller.
    pub metrics: EdgeMetrics,
    /// Where the agent reports its tunnel state (the admin `/status`).
    pub status: TunnelStatus,
    /// The message hub's channel, carried inside the tunnel (ADR 0022).
    pub hub: Option<HubStream>,
}

/// Serves the stream the cloud opens to carry the message hub's channel
/// (`CONNECT <target>`) inside the tunnel session, so an edge needs one
/// connection, not two.
#[derive(Clone)]
pub struct HubStream {
    /// The CONNECT target that names the hub stream.
    pub target: &'static str,
    /// Takes the request and answers it; the channel runs on its upgrade.
    pub serve: Arc<
        dyn Fn(http::Request<hyper::body::Incoming>) -> http::Response<tether_tunnel::Body>
            + Send
            + Sync,
    >,
}

/// The reconnecting client, as a state machine advanced by [`run`].
enum State {
    Connecting,
    Connected(Box<EdgeTransport>),
    Backoff(Duration),
}

/// Runs the agent until `shutdown`; then the current session sends GOAWAY and
/// drains in-flight streams until the drain deadline.
pub async fn run(opts: EdgeOptions, shutdown: Shutdown) {
    let EdgeOptions {
        mut dialer,
        kubelet,
        allow,
        mut backoff,
        metrics,
        status,
        hub,
    } = opts;
    dialer.advertise_endpoints(&allow);
    dialer.carry_hub(hub.is_some());
    let span = info_span!("edge", node = %dialer.node(), cloud = %dialer.addr());
    let handler =
        streams::StreamHandler::new(kubelet, allow, hub, metrics.clone(), shutdown.clone());
    let mut state = State::Connecting;
    async move {
        loop {
            state = match state {
                State::Connecting => {
                    let dialed = tokio::select! {
                        r = dialer.dial() => r,
                        _ = shutdown.triggered() => return,
                    };
                    match dialed {
                        Ok(t) => {
                            metrics.connected(true);
                            metrics.set_state("connected");
                            status.connected();
                            info!("tunnel connected");
                            State::Connected(Box::new(t))
                        }
                        Err(e) => {
                            metrics.dial_failed(&e);
                            metrics.set_state("backoff");
                            let delay = backoff.next_delay();
                            status.backoff(delay, Some(error_chain(&e)));
                            match &e {
                                DialError::Refused { .. } => {
                                    warn!(error = %e, retry_in = ?delay, "cloud refused tunnel")
                                }
                                _ => warn!(error = %e, retry_in = ?delay, "tunnel dial failed"),
                            }
                            State::Backoff(delay)
                        }
                    }
                }
                State::Connected(t) => {
                    let started = Instant::now();
                    let h = handler.clone();
                    let mut session = Box::pin(tether_tunnel::serve_edge_session(
                        *t,
                        dialer.limits().clone(),
                        move |req| {
                            let h = h.clone();
                            async move { h.handle(req).await }
                        },
                        shutdown.clone(),
                    ));
                    let result = tokio::select! {
                        r = &mut session => r,
                        _ = dialer.tls_changed() => {
                            // A renewed certificate: connect again with it. The
                            // cloud replaces the old session, whose in-flight
                            // streams finish in the background.
                            info!("certificate renewed; opening a session with it");
                            metrics.disconnected("certificate_renewed");
                            metrics.set_state("connecting");
                            status.connecting();
                            tokio::spawn(async move { let _ = session.await; }.in_current_span());
                            state = State::Connecting;
                            continue;
                        }
                    };
                    metrics.connected(false);
                    if shutdown.is_triggered() {
                        metrics.disconnected("shutdown");
                        info!("tunnel closed for shutdown");
                        return;
                    }
                    metrics.disconnected(if result.is_ok() {
                        "closed_by_cloud"
                    } else {
                        "lost"
                    });
                    metrics.set_state("backoff");
                    let asked = result.as_ref().ok().and_then(|end| end.reconnect_after);
                    let delay = backoff.after_session(started.elapsed(), asked);
                    status.backoff(
                        delay,
                        Some(match (&result, asked) {
                            (Ok(_), Some(after)) => format!(
                                "tunnel closed by the cloud, which asked for {:.1} s before reconnecting",
                                after.as_secs_f64()
                            ),
                            (Ok(_), None) => "tunnel closed by the cloud".to_owned(),
                            (Err(e), _) => format!("tunnel lost: {}", error_chain(e)),
                        }),
                    );
                    match result {
                        Ok(_) => {
                            info!(retry_in = ?delay, cloud_asked = ?asked, "tunnel closed by cloud")
                        }
                        Err(e) => warn!(error = %e, retry_in = ?delay, "tunnel lost"),
                    }
                    State::Backoff(delay)
                }
                State::Backoff(delay) => {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {
                            metrics.set_state("connecting");
                            status.connecting();
                            State::Connecting
                        }
                        _ = shutdown.triggered() => return,
                    }
                }
            };
        }
    }
    .instrument(span)
    .await
}

/// `e` and its sources on one line, for `/status`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Many errors repeat their source in their own message.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
