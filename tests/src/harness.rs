//! Starts real Tether roles in-process for tests, the benchmark and the demo:
//! a throwaway PKI, the cloud (tunnel listener + kubelet-API front) and edge
//! agents, all on loopback port 0 with real TLS.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use tether_cloudstream::{Authorizer, CloudMetrics, CloudOptions, FrontLimits};
use tether_edgestream::{EdgeMetrics, EdgeOptions, KubeletEndpoint};
use tether_pki::{Ca, CertifiedKey};
use tether_tunnel::{
    Backoff, SessionRegistry, Shutdown, ShutdownTrigger, TunnelDialer, TunnelLimits,
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
        let registry = SessionRegistry::new();
        let (trigger, shutdown) = Shutdown::new(spec.drain.unwrap_or(Duration::from_secs(2)));
        let opts = CloudOptions {
            tunnel_listener,
            tunnel_tls: pki.tunnel_server_tls()?,
            front_listener,
            front_tls: pki.front_server_tls()?,
            authz: Authorizer::default(),
            limits: spec.limits.unwrap_or_default(),
            front_limits: FrontLimits::default(),
            registry: registry.clone(),
            metrics,
        };
        let task = tokio::spawn(tether_cloudstream::run(opts, shutdown));
        Ok(Self {
            tunnel_addr,
            front_addr,
            registry,
            metrics: Arc::new(std::sync::Mutex::new(registry_m)),
            trigger,
            task,
        })
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
        match TcpListener::bind(addr).await {
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
        }
    }
}

impl EdgeHandle {
    /// Starts an edge agent dialing `tunnel_addr`.
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
        let metrics = EdgeMetrics::register(&mut Registry::default());
        let (trigger, shutdown) = Shutdown::new(Duration::from_secs(2));
        let opts = EdgeOptions {
            dialer,
            kubelet: KubeletEndpoint::new(&spec.kubelet_url, spec.kubelet_tls.clone(), Some("localhost"))?,
            allow: spec.allow.clone(),
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(1)),
            metrics: metrics.clone(),
        };
        let task = tokio::spawn(tether_edgestream::run(opts, shutdown));
        Ok(Self {
            node: spec.node,
            metrics,
            trigger,
            task,
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
    }
}
