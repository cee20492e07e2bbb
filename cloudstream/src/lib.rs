//! The cloud side of the stream tunnel: the tunnel listener edges dial, and
//! the kubelet-API front that kube-apiserver, metrics-server and Prometheus
//! talk to. Both share one [`SessionRegistry`].

mod authz;
pub mod egress;
mod front;
mod metrics;
pub mod nodes;
pub mod peer;
pub mod route;
pub mod sd;
mod serving;

use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::{Instrument, warn};

use tether_cloudhub::DenyList;
use tether_tunnel::{
    PreAuthGate, ServerTls, SessionRegistry, Shutdown, TunnelEvent, TunnelLimits, TunnelListener,
};

pub use authz::Authorizer;
pub use front::FrontLimits;
pub use metrics::CloudMetrics;

/// Finds the node a pod runs on: `(namespace, pod) -> node`. Cluster mode
/// backs it with a watch cache; it must answer from memory, because the front
/// asks it on every request that nothing else routes.
pub type PodLocator = Arc<dyn Fn(&str, &str) -> Option<String> + Send + Sync>;

/// Told about every tunnel session event (after the metrics). It runs on the
/// session's task, so it must hand work off rather than block.
pub type SessionHook = Arc<dyn Fn(&TunnelEvent<'_>) + Send + Sync>;

/// Everything the cloud needs, already loaded.
pub struct CloudOptions {
    /// Bound socket for edge tunnels (default port 10004).
    pub tunnel_listener: TcpListener,
    /// TLS for edges: requires node client certificates from the edge CA.
    /// Replaceable while running (certificate reload).
    pub tunnel_tls: ServerTls,
    /// Bound socket for the kubelet-API front (default port 10003).
    pub front_listener: TcpListener,
    /// TLS for the front: requires client certificates from the apiserver's
    /// kubelet-client CA. Replaceable while running.
    pub front_tls: ServerTls,
    /// When set, the front presents a certificate issued on the fly for the
    /// node each connection was meant for, signed by this kubelet-serving CA.
    pub serving_ca: Option<Arc<tether_pki::Ca>>,
    /// Revoked certificates: refused at the tunnel, and live sessions of a
    /// revoked node are terminated.
    pub deny: Option<Arc<DenyList>>,
    /// Who may use the front.
    pub authz: Authorizer,
    /// Tunnel bounds.
    pub limits: TunnelLimits,
    /// Front bounds.
    pub front_limits: FrontLimits,
    /// The process's budget of connections still handshaking (shared with
    /// the other listeners of the process).
    pub preauth: PreAuthGate,
    /// The session registry (shared with callers that inspect it).
    pub registry: SessionRegistry,
    /// Metric families, registered by the caller.
    pub metrics: CloudMetrics,
    /// Last-resort routing of pod-scoped kubelet paths (cluster mode).
    pub pod_locator: Option<PodLocator>,
    /// Session lifecycle observer (cluster mode patches node status with it).
    pub session_hook: Option<SessionHook>,
    /// Several replicas: ownership records and forwarding between replicas.
    pub peers: Option<peer::PeerOptions>,
    /// Networks a CONNECT that names no node may reach directly from the
    /// cloud (the apiserver's egress to webhooks and aggregated APIs).
    pub egress_passthrough: Vec<egress::Cidr>,
    /// Also accept KubeEdge edges on the tunnel port (ADR 0017); the
    /// tunnel TLS must then accept the KubeEdge CA's client certificates.
    pub kubeedge: Option<tether_tunnel::KubeEdgeAccept>,
    /// The message hub: serves the channel of each edge that asks for it
    /// inside its tunnel session (ADR 0022).
    pub hub: Option<tether_cloudhub::hub::CloudHub>,
}

/// Runs the tunnel listener and the front until shutdown, then drains both.
pub async fn run(opts: CloudOptions, shutdown: Shutdown) {
    let metrics = opts.metrics.clone();
    let hook = opts.session_hook.clone();
    let ownership = opts.peers.as_ref().map(|p| p.ownership.clone());
    let carry_hub = opts.hub.clone().map(|hub| {
        let (registry, shutdown) = (opts.registry.clone(), shutdown.clone());
        move |info: &tether_tunnel::SessionInfo| {
            // The registry holds the session before `Connected` is sent.
            if let Some(session) = registry.get(&info.node)
                && session.info().id == info.id
            {
                let (hub, shutdown) = (hub.clone(), shutdown.clone());
                let span = tracing::info_span!("hub", node = %info.node, session.id = info.id);
                tokio::spawn(
                    async move { hub.serve_tunnel_session(session, shutdown).await }
                        .instrument(span),
                );
            }
        }
    });
    tokio::spawn(measure_rtt(
        opts.registry.clone(),
        opts.metrics.clone(),
        opts.limits.keepalive_interval,
        shutdown.clone(),
    ));
    let mut tunnel = TunnelListener::new(
        opts.tunnel_listener,
        opts.tunnel_tls,
        opts.limits,
        opts.registry.clone(),
    )
    .preauth(opts.preauth.clone(), "tunnel")
    .window_metrics(opts.metrics.window())
    .on_event(move |ev| {
        metrics.tunnel_event(&ev);
        if let (TunnelEvent::Connected { info, .. }, Some(carry)) = (&ev, &carry_hub)
            && info.carries_hub
        {
            carry(info);
        }
        if let Some(o) = &ownership {
            match &ev {
                TunnelEvent::Connected { info, .. } => o.claim(info),
                // A replaced session's node is still here, in the newer one.
                TunnelEvent::Disconnected { info, reason } if *reason != "replaced" => {
                    o.release(&info.node)
                }
                _ => {}
            }
        }
        if let Some(hook) = &hook {
            hook(&ev);
        }
    });
    if let Some(ke) = opts.kubeedge.clone() {
        tunnel = tunnel.kubeedge(ke);
    }
    if let Some(deny) = opts.deny.clone() {
        tokio::spawn(terminate_revoked(
            deny.clone(),
            opts.registry.clone(),
            shutdown.clone(),
        ));
        tunnel = tunnel.admit(move |id| {
            if deny.denies(id) {
                Err(format!(
                    "certificate of node {:?} (serial {}) is revoked",
                    id.node_name().unwrap_or_default(),
                    id.serial
                ))
            } else {
                Ok(())
            }
        });
    }
    let forwarder = opts.peers.map(|p| {
        let peer_front = front::KubeletFront {
            tcp: Some(p.listener),
            gate: (opts.preauth.clone(), "peer"),
            tls: p.server_tls,
            node_certs: None,
            registry: opts.registry.clone(),
            authz: Authorizer {
                users: Vec::new(),
                groups: vec![peer::REPLICA_GROUP.to_owned()],
            },
            limits: opts.front_limits.clone(),
            // The origin replica counts the request; do not count it twice.
            metrics: CloudMetrics::default(),
            pod_locator: None,
            forwarder: None,
            peer_mode: true,
            hub_peer: p.hub,
            egress_passthrough: Vec::new(),
        };
        tokio::spawn(peer_front.run(shutdown.clone()));
        Arc::new(peer::Forwarder {
            replica: p.replica,
            client_tls: p.client_tls,
            ownership: p.ownership,
        })
    });
    let front = front::KubeletFront {
        tcp: Some(opts.front_listener),
        gate: (opts.preauth, "front"),
        tls: opts.front_tls,
        node_certs: opts
            .serving_ca
            .map(|ca| serving::NodeCerts::new(ca, opts.registry.clone())),
        registry: opts.registry,
        authz: opts.authz,
        limits: opts.front_limits,
        metrics: opts.metrics,
        pod_locator: opts.pod_locator,
        forwarder,
        peer_mode: false,
        hub_peer: None,
        egress_passthrough: opts.egress_passthrough,
    };
    let (t, ()) = tokio::join!(tunnel.run(shutdown.clone()), front.run(shutdown));
    if let Err(e) = t {
        tracing::warn!(error = %e, "tunnel listener ended with error");
    }
}

/// Ends the live sessions of revoked certificates as soon as the deny list changes.
pub async fn terminate_revoked(deny: Arc<DenyList>, registry: SessionRegistry, shutdown: Shutdown) {
    let mut changes = deny.subscribe();
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.triggered() => return,
        }
        let revoked = changes.borrow_and_update().clone();
        for s in registry.all() {
            if revoked.denies(&s.info().identity) {
                warn!(node = %s.info().node, serial = %s.info().identity.serial, "certificate revoked; terminating its session");
                s.terminate();
            }
        }
    }
}

/// Times a probe through every session each `every` (the keepalive
/// interval): the edge answers it itself, so this is the tunnel's round trip.
async fn measure_rtt(
    registry: SessionRegistry,
    metrics: CloudMetrics,
    every: std::time::Duration,
    shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.triggered() => return,
        }
        for s in registry.all() {
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let req = http::Request::get("/")
                    .body(tether_tunnel::body_empty())
                    .expect("static request");
                let started = std::time::Instant::now();
                let sent = s.send(req, tether_tunnel::wire::PING_TARGET);
                if let Ok(Ok(resp)) = tokio::time::timeout(every, sent).await
                    && resp.status() == http::StatusCode::NO_CONTENT
                {
                    let rtt = started.elapsed();
                    s.record_rtt(rtt);
                    metrics.rtt(rtt.as_secs_f64());
                }
            });
        }
    }
}
