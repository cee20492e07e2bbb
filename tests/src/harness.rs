//! Starts real Tether roles in-process for tests, the benchmark and the demo:
//! a throwaway PKI, the cloud (tunnel listener + kubelet-API front) and edge
//! agents, all on loopback port 0 with real TLS.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use tether_cloudhub::{BootstrapServer, CloudState};
use tether_cloudstream::{Authorizer, CloudMetrics, CloudOptions, FrontLimits};
use tether_edgehub::CertManager;
use tether_edgestream::{EdgeMetrics, EdgeOptions, KubeletEndpoint, KubeletTimeouts};
use tether_pki::BootstrapToken;
use tether_pki::{Ca, CertifiedKey};
use tether_tunnel::{
    Backoff, ServerTls, SessionRegistry, Shutdown, ShutdownTrigger, TunnelDialer, TunnelLimits,
};

/// The name the cloud's serving certificates carry.
pub const CLOUD_NAME: &str = "localhost";

/// A throwaway PKI: one CA for the tunnel (edges and cloud), one standing in
/// for the cluster CA that signs the apiserver's kubelet client certificate.
pub struct Pki {
    /// Signs node client certificates and the tunnel serving certificate.
    pub edge_ca: Ca,
    /// Signs the front's serving certificate and its clients' certificates.
    pub front_ca: Ca,
}

impl Pki {
    /// Generates both CAs.
    pub fn generate() -> anyhow::Result<Self> {
        Ok(Self {
            edge_ca: Ca::generate("tether-edge-ca")?,
            front_ca: Ca::generate("tether-cluster-ca")?,
        })
    }

    fn serving(ca: &Ca) -> anyhow::Result<CertifiedKey> {
        Ok(ca.issue_server("tether-cloud", &[CLOUD_NAME, "127.0.0.1", "::1"])?)
    }

    /// TLS for the tunnel listener: node client certificates required.
    pub fn tunnel_server_tls(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let leaf = Self::serving(&self.edge_ca)?;
        Ok(Arc::new(tether_pki::server_config_client_auth(
            leaf.cert_chain()?,
            leaf.key_pem.to_der()?,
            std::slice::from_ref(self.edge_ca.cert_der()),
            &[b"http/1.1"],
        )?))
    }

    /// TLS for the front: client certificates from the cluster CA required.
    pub fn front_server_tls(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let leaf = Self::serving(&self.front_ca)?;
        Ok(Arc::new(tether_pki::server_config_client_auth(
            leaf.cert_chain()?,
            leaf.key_pem.to_der()?,
            std::slice::from_ref(self.front_ca.cert_der()),
            &[b"http/1.1"],
        )?))
    }

    /// TLS for an edge: pins the edge CA, presents `cert`.
    pub fn edge_client_tls(
        &self,
        cert: &CertifiedKey,
    ) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        Ok(Arc::new(tether_pki::client_config(
            std::slice::from_ref(self.edge_ca.cert_der()),
            Some((cert.cert_chain()?, cert.key_pem.to_der()?)),
            &[b"http/1.1"],
        )?))
    }

    /// TLS for a front client (the apiserver's role) with the given subject,
    /// signed by `ca` (the cluster CA, or another one to test refusal).
    pub fn front_client_tls(
        &self,
        ca: Option<&Ca>,
        user: &str,
        groups: &[&str],
    ) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let client = match ca {
            Some(ca) => Some(ca.issue_client(user, groups)?),
            None => None,
        };
        let client = match &client {
            Some(c) => Some((c.cert_chain()?, c.key_pem.to_der()?)),
            None => None,
        };
        Ok(Arc::new(tether_pki::client_config(
            std::slice::from_ref(self.front_ca.cert_der()),
            client,
            &[b"http/1.1"],
        )?))
    }

    /// TLS of a replica's peer listener and of its client toward other
    /// replicas: both from the edge CA (the replicas' shared CA), the client
    /// in the replicas' group.
    pub fn peer_tls(
        &self,
        replica: &str,
    ) -> anyhow::Result<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>)> {
        use tether_cloudstream::peer::{PEER_SERVER_NAME, REPLICA_GROUP};
        let server = self
            .edge_ca
            .issue_server("tether-peer", &[PEER_SERVER_NAME])?;
        let client = self
            .edge_ca
            .issue_client(&format!("tether-replica:{replica}"), &[REPLICA_GROUP])?;
        let roots = std::slice::from_ref(self.edge_ca.cert_der());
        Ok((
            Arc::new(tether_pki::server_config_client_auth(
                server.cert_chain()?,
                server.key_pem.to_der()?,
                roots,
                &[b"http/1.1"],
            )?),
            Arc::new(tether_pki::client_config(
                roots,
                Some((client.cert_chain()?, client.key_pem.to_der()?)),
                &[b"http/1.1"],
            )?),
        ))
    }

    /// The usual apiserver kubelet client.
    pub fn apiserver_tls(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        self.front_client_tls(
            Some(&self.front_ca),
            "kube-apiserver-kubelet-client",
            &["system:masters"],
        )
    }
}

/// A running cloud.
pub struct CloudHandle {
    /// Where edges dial.
    pub tunnel_addr: SocketAddr,
    /// Where the apiserver's role connects.
    pub front_addr: SocketAddr,
    /// The peer listener, when this is one of several replicas.
    pub peer_addr: Option<SocketAddr>,
    /// The bootstrap server, when the cloud hub runs.
    pub bootstrap_addr: Option<SocketAddr>,
    /// The cloud hub's state, when it runs.
    pub state: Option<Arc<CloudState>>,
    /// The tunnel's TLS configuration (replaceable: reload tests).
    pub tunnel_tls: ServerTls,
    /// The front's TLS configuration (replaceable: reload tests).
    pub front_tls: ServerTls,
    /// Live sessions.
    pub registry: SessionRegistry,
    /// The cloud's metrics registry.
    pub metrics: Arc<std::sync::Mutex<Registry>>,
    trigger: ShutdownTrigger,
    task: JoinHandle<()>,
}

/// Options for [`CloudHandle::start`].
#[derive(Clone, Default)]
pub struct CloudSpec {
    /// Bind the tunnel here (to restart on the same port); port 0 if None.
    pub tunnel_addr: Option<SocketAddr>,
    /// Bind the front here; port 0 if None.
    pub front_addr: Option<SocketAddr>,
    /// Tunnel bounds; defaults if None.
    pub limits: Option<TunnelLimits>,
    /// Drain deadline after shutdown (default 2 s).
    pub drain: Option<Duration>,
    /// Run the cloud hub too: a state directory (tokens, deny list) holding
    /// the PKI's edge CA, and the bootstrap server on port 0.
    pub state_dir: Option<PathBuf>,
    /// Lifetime of certificates the bootstrap server issues (default 1 day).
    pub cert_lifetime: Option<Duration>,
    /// Issue per-node serving certificates on the front from the PKI's
    /// cluster CA (the kubelet-serving CA).
    pub node_serving_certs: bool,
    /// Last-resort routing of pod-scoped paths (cluster mode's pod cache).
    pub pod_locator: Option<tether_cloudstream::PodLocator>,
    /// Session lifecycle observer (cluster mode's node status patches).
    pub session_hook: Option<tether_cloudstream::SessionHook>,
    /// Run as one of several replicas: this replica's id and its view of
    /// the ownership records. A peer listener starts on loopback.
    pub replica: Option<(String, Arc<dyn tether_cloudstream::peer::Ownership>)>,
    /// With `replica`: the message hub's routes on the peer listener
    /// (`tether_cloudhub::replicas::peer_handler`).
    pub peer_hub: Option<tether_cloudhub::api::Handler>,
    /// Networks the front's CONNECT may reach directly (egress passthrough).
    pub egress_passthrough: Vec<tether_cloudstream::egress::Cidr>,
    /// Bounds of connections still handshaking; defaults if None.
    pub preauth: Option<tether_tunnel::PreAuthLimits>,
    /// Accept KubeEdge edges on the tunnel port too (ADR 0017).
    pub kubeedge: Option<KubeEdgeCloud>,
    /// Serve this hub's channels inside tunnel sessions (ADR 0022).
    pub hub: Option<tether_cloudhub::hub::CloudHub>,
}

/// How a cloud accepts KubeEdge edges in tests.
#[derive(Clone)]
pub struct KubeEdgeCloud {
    /// The KubeEdge CA's certificate (trusted on `/v1/kubeedge/connect` only).
    pub ca: rustls_pki_types::CertificateDer<'static>,
    /// `kubeedge.trust_legacy_certs`.
    pub trust_legacy_certs: bool,
    /// `kubeedge.trust_internal_ip_header`.
    pub trust_internal_ip_header: bool,
    /// Session options; defaults from the tunnel limits if None.
    pub options: Option<tether_tunnel::kubeedge::KubeEdgeOptions>,
}

impl CloudHandle {
    /// Starts a cloud in this process.
    pub async fn start(pki: &Pki, spec: CloudSpec) -> anyhow::Result<Self> {
        let loopback: SocketAddr = "127.0.0.1:0".parse()?;
        let tunnel_listener = bind_retry(spec.tunnel_addr.unwrap_or(loopback)).await?;
        let front_listener = bind_retry(spec.front_addr.unwrap_or(loopback)).await?;
        let tunnel_addr = tunnel_listener.local_addr()?;
        let front_addr = front_listener.local_addr()?;
        let mut registry_m = Registry::default();
        let metrics = CloudMetrics::register(&mut registry_m);
        let preauth_metrics = tether_tunnel::PreAuthMetrics::default();
        preauth_metrics.register(&mut registry_m);
        let preauth =
            tether_tunnel::PreAuthGate::new(spec.preauth.unwrap_or_default(), preauth_metrics);
        let registry = SessionRegistry::new();
        let (trigger, shutdown) = Shutdown::new(spec.drain.unwrap_or(Duration::from_secs(2)));
        let (state, bootstrap_addr) = match &spec.state_dir {
            Some(dir) => {
                let ca = Ca::from_pem(pki.edge_ca.cert_pem(), pki.edge_ca.key_pem().expose())?;
                let state = Arc::new(CloudState::with_ca(dir, ca)?);
                let listener = tether_tunnel::bind_listener(loopback)?;
                let addr = listener.local_addr()?;
                let serving = pki
                    .edge_ca
                    .issue_server("tether-bootstrap", &[CLOUD_NAME, "127.0.0.1"])?;
                let tls = tether_pki::server_config_optional_client_auth(
                    serving.cert_chain()?,
                    serving.key_pem.to_der()?,
                    std::slice::from_ref(pki.edge_ca.cert_der()),
                )?;
                let server = BootstrapServer::new(
                    state.clone(),
                    Arc::new(tls),
                    spec.cert_lifetime.unwrap_or(Duration::from_secs(24 * 3600)),
                )
                .preauth(preauth.clone());
                tokio::spawn(server.run(listener, shutdown.clone()));
                (Some(state), Some(addr))
            }
            None => (None, None),
        };
        let limits = spec.limits.unwrap_or_default();
        let (tunnel_tls, kubeedge) = match &spec.kubeedge {
            None => (ServerTls::new(pki.tunnel_server_tls()?), None),
            Some(ke) => {
                let leaf = Pki::serving(&pki.edge_ca)?;
                let roots = [pki.edge_ca.cert_der().clone(), ke.ca.clone()];
                let tls = tether_pki::server_config_client_auth(
                    leaf.cert_chain()?,
                    leaf.key_pem.to_der()?,
                    &roots,
                    &[b"http/1.1"],
                )?;
                let trust = tether_tunnel::kubeedge::KubeEdgeTrust::new(
                    tether_tunnel::kubeedge::TrustConfig {
                        kubeedge_cas: vec![ke.ca.clone()],
                        tether_cas: vec![pki.edge_ca.cert_der().clone()],
                        trust_legacy_certs: ke.trust_legacy_certs,
                        trust_internal_ip_header: ke.trust_internal_ip_header,
                    },
                )?;
                let options = ke
                    .options
                    .clone()
                    .unwrap_or_else(|| tether_tunnel::kubeedge::KubeEdgeOptions::new(&limits));
                (
                    ServerTls::new(Arc::new(tls)),
                    Some(tether_tunnel::KubeEdgeAccept {
                        trust,
                        options: Arc::new(options),
                    }),
                )
            }
        };
        let front_tls = ServerTls::new(pki.front_server_tls()?);
        let serving_ca = if spec.node_serving_certs {
            Some(Arc::new(Ca::from_pem(
                pki.front_ca.cert_pem(),
                pki.front_ca.key_pem().expose(),
            )?))
        } else {
            None
        };
        let (peers, peer_addr) = match spec.replica {
            Some((replica, ownership)) => {
                let listener = tether_tunnel::bind_listener(loopback)?;
                let addr = listener.local_addr()?;
                let (server_tls, client_tls) = pki.peer_tls(&replica)?;
                (
                    Some(tether_cloudstream::peer::PeerOptions {
                        replica,
                        listener,
                        server_tls: ServerTls::new(server_tls),
                        client_tls,
                        ownership,
                        hub: spec.peer_hub.clone(),
                    }),
                    Some(addr),
                )
            }
            None => (None, None),
        };
        let opts = CloudOptions {
            tunnel_listener,
            tunnel_tls: tunnel_tls.clone(),
            front_listener,
            front_tls: front_tls.clone(),
            serving_ca,
            deny: state.as_ref().map(|s| s.deny.clone()),
            authz: Authorizer::default(),
            limits,
            front_limits: FrontLimits::default(),
            preauth,
            registry: registry.clone(),
            metrics,
            pod_locator: spec.pod_locator,
            session_hook: spec.session_hook,
            peers,
            egress_passthrough: spec.egress_passthrough,
            hub: spec.hub,
            kubeedge,
        };
        let task = tokio::spawn(tether_cloudstream::run(opts, shutdown));
        Ok(Self {
            tunnel_addr,
            front_addr,
            peer_addr,
            bootstrap_addr,
            state,
            tunnel_tls,
            front_tls,
            registry,
            metrics: Arc::new(std::sync::Mutex::new(registry_m)),
            trigger,
            task,
        })
    }

    /// Starts shutdown (the drain) without waiting for it.
    pub fn begin_stop(&self) {
        self.trigger.trigger();
    }

    /// Starts shutdown and waits for the cloud to finish draining.
    pub async fn stop(self) {
        self.trigger.trigger();
        let _ = self.task.await;
    }

    /// Opens a TLS connection to the front with `tls`.
    pub async fn front_conn(
        &self,
        tls: Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.front_addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(CLOUD_NAME)?;
        Ok(TlsConnector::from(tls).connect(name, tcp).await?)
    }

    /// The cloud's metrics in text form.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        let reg = self.metrics.lock().expect("metrics lock");
        prometheus_client::encoding::text::encode(&mut out, &reg).expect("encode metrics");
        out
    }
}

/// Binding a port just released by a stopped cloud may briefly fail.
async fn bind_retry(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let mut last = None;
    for _ in 0..50 {
        match tether_tunnel::bind_listener(addr) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.expect("tried")).with_context(|| format!("bind {addr}"))
}

/// A running edge agent.
pub struct EdgeHandle {
    /// The node name.
    pub node: String,
    /// The agent's metrics.
    pub metrics: EdgeMetrics,
    trigger: ShutdownTrigger,
    task: JoinHandle<()>,
    rotation: Option<JoinHandle<()>>,
}

/// Options for [`EdgeHandle::start`].
#[derive(Clone)]
pub struct EdgeSpec {
    /// Node name in the certificate.
    pub node: String,
    /// Node name the agent claims on connect (normally the same).
    pub claimed_node: Option<String>,
    /// IP SANs of the node certificate.
    pub ips: Vec<IpAddr>,
    /// Kubelet URL (`http://` like edged, or `https://` like a real kubelet).
    pub kubelet_url: String,
    /// TLS to an `https://` kubelet (trust and optional client certificate).
    pub kubelet_tls: Option<Arc<rustls::ClientConfig>>,
    /// Allow-listed local endpoints.
    pub allow: Vec<SocketAddr>,
    /// Tunnel bounds; defaults if None.
    pub limits: Option<TunnelLimits>,
    /// Deadlines towards the kubelet.
    pub kubelet_timeouts: KubeletTimeouts,
    /// Carry this hub's channel inside the tunnel (ADR 0022).
    pub hub: Option<tether_edgehub::hub::EdgeHub>,
    /// Reconnect backoff, base and cap (default 50 ms and 1 s, quick for
    /// tests; the agent's defaults are 500 ms and 30 s).
    pub backoff: Option<(Duration, Duration)>,
}

impl EdgeSpec {
    /// A node named `node` serving the kubelet at `kubelet`.
    pub fn new(node: &str, kubelet: SocketAddr) -> Self {
        Self {
            node: node.to_owned(),
            claimed_node: None,
            ips: Vec::new(),
            kubelet_url: format!("http://{kubelet}"),
            kubelet_tls: None,
            allow: Vec::new(),
            limits: None,
            kubelet_timeouts: KubeletTimeouts::default(),
            hub: None,
            backoff: None,
        }
    }
}

impl EdgeHandle {
    /// Starts an edge agent dialing `tunnel_addr` with a certificate made by
    /// the PKI (file-based credentials).
    pub fn start(pki: &Pki, tunnel_addr: SocketAddr, spec: EdgeSpec) -> anyhow::Result<Self> {
        let cert = pki.edge_ca.issue_node_client(&spec.node, &spec.ips)?;
        let tls = pki.edge_client_tls(&cert)?;
        let dialer = TunnelDialer::new(
            tunnel_addr.to_string(),
            CLOUD_NAME,
            tls,
            spec.claimed_node
                .clone()
                .unwrap_or_else(|| spec.node.clone()),
            spec.limits.clone().unwrap_or_default(),
        )?;
        let (trigger, shutdown) = Shutdown::new(Duration::from_secs(2));
        Self::launch(spec, dialer, trigger, shutdown, None)
    }

    /// Enrols with a bootstrap token (or reuses credentials already in
    /// `dir`), then starts the agent with certificate rotation.
    pub async fn enrol(
        cloud: &CloudHandle,
        token: Option<&BootstrapToken>,
        dir: &Path,
        spec: EdgeSpec,
    ) -> anyhow::Result<Self> {
        let bootstrap = cloud
            .bootstrap_addr
            .context("the cloud runs no bootstrap server")?;
        let manager = CertManager::new(dir, &bootstrap.to_string(), CLOUD_NAME, &spec.node);
        let creds = manager.ensure(token).await?;
        let (tx, rx) = tokio::sync::watch::channel(creds.client_config()?);
        let dialer = TunnelDialer::rotating(
            cloud.tunnel_addr.to_string(),
            CLOUD_NAME,
            rx,
            spec.node.clone(),
            spec.limits.clone().unwrap_or_default(),
        )?;
        let (trigger, shutdown) = Shutdown::new(Duration::from_secs(2));
        let rotation = tokio::spawn(manager.run_rotation(creds, tx, |_| {}, shutdown.clone()));
        Self::launch(spec, dialer, trigger, shutdown, Some(rotation))
    }

    fn launch(
        spec: EdgeSpec,
        dialer: TunnelDialer,
        trigger: ShutdownTrigger,
        shutdown: Shutdown,
        rotation: Option<JoinHandle<()>>,
    ) -> anyhow::Result<Self> {
        let metrics = EdgeMetrics::register(&mut Registry::default());
        let opts = EdgeOptions {
            dialer,
            kubelet: KubeletEndpoint::new(
                &spec.kubelet_url,
                spec.kubelet_tls.clone(),
                Some("localhost"),
            )?
            .with_timeouts(spec.kubelet_timeouts),
            allow: spec.allow.clone(),
            backoff: {
                let (base, max) = spec
                    .backoff
                    .unwrap_or((Duration::from_millis(50), Duration::from_secs(1)));
                Backoff::new(base, max)
            },
            metrics: metrics.clone(),
            status: Default::default(),
            hub: spec.hub.clone().map(|hub| {
                let shutdown = shutdown.clone();
                tether_edgestream::HubStream {
                    target: tether_hub::HUB_TARGET,
                    serve: Arc::new(move |req| hub.accept(req, shutdown.clone())),
                }
            }),
        };
        let task = tokio::spawn(tether_edgestream::run(opts, shutdown));
        Ok(Self {
            node: spec.node,
            metrics,
            trigger,
            task,
            rotation,
        })
    }

    /// Graceful stop: GOAWAY, drain, close.
    pub async fn stop(self) {
        self.trigger.trigger();
        let _ = self.task.await;
    }

    /// Abrupt stop, like a crashed process: the socket just closes.
    pub fn kill(self) {
        self.task.abort();
        if let Some(r) = &self.rotation {
            r.abort();
        }
    }
}
