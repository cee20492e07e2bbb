//! The rig most figures run on: the fixture kubelet over HTTPS (like a real kubelet
//! on :10250), the cloud, and one edge agent reaching that kubelet over HTTPS (or a
//! second, plain-HTTP instance; and, for the KubeEdge figure, a KubeEdge-protocol
//! edge double beside it reaching that plain-HTTP instance); plus
//! [`Dial`], the two ways the same client code reaches the kubelet: directly, or
//! through the front, the tunnel and the edge.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::runtime::{Handle, Runtime};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use tether_tests::fixture::{self, FixtureKubelet};
use tether_tests::harness::{
    CLOUD_NAME, CloudHandle, CloudSpec, EdgeHandle, EdgeSpec, KubeEdgeCloud, Pki,
};
use tether_tests::kubectl::IO_TIMEOUT;
use tether_tests::kubeedge_edge::{
    CloudTrust, KubeEdgeCa, KubeEdgeEdge, KubeEdgeSpec, edge_client_tls,
};
use tether_tests::wan::{WanLink, WanSpec};
use tether_tunnel::TunnelLimits;

/// The node the rig's edge serves; requests pick it with `Host:`.
pub(crate) const NODE: &str = "bench-node";
/// The node the rig's KubeEdge-protocol edge double serves, if it has one.
pub(crate) const KUBEEDGE_NODE: &str = "bench-kubeedge-node";

/// How long the edge may take to register.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long stopping the edge and the cloud may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Which path a measurement takes to the kubelet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// Client → fixture kubelet over TLS.
    Direct,
    /// Client → front over TLS → tunnel → edge → fixture kubelet over TLS.
    Tunnel,
}

impl Side {
    pub(crate) const BOTH: [Side; 2] = [Side::Direct, Side::Tunnel];
}

/// A client connection, the same type on both sides.
pub(crate) type Conn = TlsStream<TcpStream>;

/// Opens client connections for either side; cheap to clone into tasks.
#[derive(Clone)]
pub(crate) struct Dial {
    front: SocketAddr,
    front_tls: Arc<rustls::ClientConfig>,
    kubelet: SocketAddr,
    kubelet_tls: Arc<rustls::ClientConfig>,
    /// The node requests name in `Host:` (the front routes by it).
    node: &'static str,
}

impl Dial {
    /// The node requests are for.
    pub(crate) fn node(&self) -> &'static str {
        self.node
    }

    /// The same dial, for requests to another node behind the same front.
    pub(crate) fn for_node(&self, node: &'static str) -> Self {
        Self {
            node,
            ..self.clone()
        }
    }

    /// The front's address.
    pub(crate) fn front(&self) -> SocketAddr {
        self.front
    }

    /// A TCP (no delay) + TLS connection to the front or to the kubelet.
    pub(crate) async fn connect(&self, side: Side) -> anyhow::Result<Conn> {
        let (addr, tls, name) = match side {
            Side::Direct => (self.kubelet, &self.kubelet_tls, "localhost"),
            Side::Tunnel => (self.front, &self.front_tls, CLOUD_NAME),
        };
        let connect = async {
            let tcp = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connect {addr}"))?;
            tcp.set_nodelay(true).context("set TCP_NODELAY")?;
            let name = ServerName::try_from(name)?;
            TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .with_context(|| format!("tls handshake with {addr}"))
        };
        tokio::time::timeout(IO_TIMEOUT, connect)
            .await
            .with_context(|| format!("{side:?} connection timed out"))?
    }
}

/// Where each role's tasks run. By default every role gets its own multi-thread
/// runtime with its own named threads, the way separate processes would share the
/// machine: one role's tasks cannot starve or serialise another's, and each
/// role's CPU time can be read per thread (see [`crate::stats::cpu_by_role`]).
/// `shared` puts everything on the bench's own runtime instead.
pub(crate) struct Runtimes {
    fixture: Handle,
    edge: Handle,
    cloud: Handle,
    link: Handle,
    owned: Vec<Runtime>,
}

impl Runtimes {
    pub(crate) fn new(shared: bool) -> anyhow::Result<Self> {
        if shared {
            let here = Handle::current();
            return Ok(Self {
                fixture: here.clone(),
                edge: here.clone(),
                cloud: here.clone(),
                link: here,
                owned: Vec::new(),
            });
        }
        let mut owned = Vec::with_capacity(4);
        // The emulated link's relays get threads of their own too: a relay
        // waiting behind a busy role would add delay the spec does not ask for.
        for role in ["fixture", "edge", "cloud", "wan"] {
            owned.push(
                tokio::runtime::Builder::new_multi_thread()
                    .thread_name(format!("tb-{role}"))
                    .enable_all()
                    .build()
                    .with_context(|| format!("build the {role} runtime"))?,
            );
        }
        Ok(Self {
            fixture: owned[0].handle().clone(),
            edge: owned[1].handle().clone(),
            cloud: owned[2].handle().clone(),
            link: owned[3].handle().clone(),
            owned,
        })
    }

    /// Whether roles run on their own threads (so per-role CPU means something).
    pub(crate) fn separate(&self) -> bool {
        !self.owned.is_empty()
    }

    /// Where the edge role's tasks run.
    pub(crate) fn edge(&self) -> &Handle {
        &self.edge
    }

    /// Where the cloud role's tasks run.
    pub(crate) fn cloud(&self) -> &Handle {
        &self.cloud
    }

    /// Stops the role runtimes without blocking this (async) thread.
    pub(crate) fn shutdown(self) {
        for runtime in self.owned {
            runtime.shutdown_background();
        }
    }
}

/// How a rig is put together.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RigOptions {
    /// The edge reaches a second fixture instance over plain HTTP (like edged on
    /// 127.0.0.1:10350) instead of the direct side's instance over HTTPS.
    pub(crate) edge_plain: bool,
    /// The cloud also accepts KubeEdge sessions, and a KubeEdge-protocol edge
    /// double serves [`KUBEEDGE_NODE`] from the plain-HTTP fixture (the double
    /// speaks plain HTTP to its kubelet only); implies `edge_plain`.
    pub(crate) kubeedge: bool,
    /// The edge reaches the cloud, and the direct side the kubelet, through
    /// emulated links of this shape.
    pub(crate) link: Option<WanSpec>,
}

/// The fixture kubelet, the cloud and one edge, all in this process.
pub(crate) struct Rig {
    pub(crate) dial: Dial,
    // Held for its lifetime: dropping the fixture stops it.
    fixture: FixtureKubelet,
    // The edge's plain-HTTP kubelet, with --edge-kubelet http or a KubeEdge edge.
    plain: Option<FixtureKubelet>,
    cloud: CloudHandle,
    edge: EdgeHandle,
    // The emulated links, with `link`: edge to cloud, and client to kubelet.
    links: Vec<WanLink>,
    kubeedge: Option<KubeEdgeEdge>,
    runtimes: Runtimes,
}

impl Rig {
    /// Starts everything with `limits` on both tunnel ends, each role on its
    /// runtime from `runtimes`, and waits for the edge (and the KubeEdge edge).
    /// With `edge_plain`, the edge reaches a second instance of the fixture
    /// over plain HTTP, like edged on 127.0.0.1:10350 (Tether's default);
    /// otherwise it uses HTTPS to the same instance the direct side uses,
    /// like a real kubelet on :10250.
    /// With `link`, the edge reaches the cloud through an emulated link of
    /// that shape and the direct side reaches the kubelet through another of
    /// the same shape, so both sides cross the same round trip.
    pub(crate) async fn start(
        limits: &TunnelLimits,
        runtimes: Runtimes,
        options: RigOptions,
    ) -> anyhow::Result<Self> {
        let edge_plain = options.edge_plain || options.kubeedge;
        let link = options.link;
        let pki = Arc::new(Pki::generate().context("generate pki")?);
        let (server_tls, root) = fixture::self_signed_tls().context("fixture tls")?;
        let fixture = runtimes
            .fixture
            .spawn(FixtureKubelet::start(Some(server_tls)))
            .await
            .context("fixture start task")?
            .context("start fixture kubelet")?;
        let kubelet_tls = fixture::client_tls(root).context("kubelet client tls")?;
        let ke_ca = if options.kubeedge {
            Some(KubeEdgeCa::generate().context("generate kubeedge ca")?)
        } else {
            None
        };
        let spec = CloudSpec {
            limits: Some(limits.clone()),
            kubeedge: ke_ca.as_ref().map(|ca| KubeEdgeCloud {
                ca: ca.cert_der().clone(),
                trust_legacy_certs: false,
                trust_internal_ip_header: false,
                options: None,
            }),
            ..CloudSpec::default()
        };
        let cloud_pki = pki.clone();
        let cloud = runtimes
            .cloud
            .spawn(async move { CloudHandle::start(&cloud_pki, spec).await })
            .await
            .context("cloud start task")?
            .context("start cloud")?;
        let plain = if edge_plain {
            Some(
                runtimes
                    .fixture
                    .spawn(FixtureKubelet::start(None))
                    .await
                    .context("fixture start task")?
                    .context("start plain fixture kubelet")?,
            )
        } else {
            None
        };
        let mut spec = EdgeSpec::new(NODE, fixture.addr);
        match &plain {
            Some(p) => spec.kubelet_url = format!("http://{}", p.addr),
            None => {
                spec.kubelet_url = format!("https://{}", fixture.addr);
                spec.kubelet_tls = Some(kubelet_tls.clone());
            }
        }
        spec.limits = Some(limits.clone());
        let mut links = Vec::new();
        let (tunnel_addr, kubelet_addr) = match link {
            None => (cloud.tunnel_addr, fixture.addr),
            Some(shape) => {
                let targets = [cloud.tunnel_addr, fixture.addr];
                for target in targets {
                    let relay = runtimes
                        .link
                        .spawn(WanLink::start(target, shape))
                        .await
                        .context("relay start task")?
                        .context("start emulated link")?;
                    links.push(relay);
                }
                (links[0].addr(), links[1].addr())
            }
        };
        let edge = {
            // EdgeHandle::start spawns the agent onto the runtime it is entered in.
            let _entered = runtimes.edge.enter();
            EdgeHandle::start(&pki, tunnel_addr, spec).context("start edge")?
        };
        cloud
            .registry
            .wait_for_node(NODE, None, CONNECT_TIMEOUT)
            .await
            .with_context(|| format!("edge did not connect within {CONNECT_TIMEOUT:?}"))?;
        let kubeedge = match (&ke_ca, &plain) {
            (Some(ca), Some(kubelet)) => {
                let cert = ca.issue_edge(KUBEEDGE_NODE, &[])?;
                let tls = edge_client_tls(
                    &cert,
                    CloudTrust::Verify(vec![pki.edge_ca.cert_der().clone()]),
                )?;
                let spec = KubeEdgeSpec::new(KUBEEDGE_NODE, cloud.tunnel_addr, tls, kubelet.addr);
                // The double spawns its session onto the runtime it is entered in.
                let edge = {
                    let _entered = runtimes.edge.enter();
                    KubeEdgeEdge::start(spec)
                };
                cloud
                    .registry
                    .wait_for_node(KUBEEDGE_NODE, None, CONNECT_TIMEOUT)
                    .await
                    .with_context(|| {
                        format!("the KubeEdge edge did not connect within {CONNECT_TIMEOUT:?}")
                    })?;
                Some(edge)
            }
            _ => None,
        };
        let dial = Dial {
            front: cloud.front_addr,
            front_tls: pki.apiserver_tls().context("apiserver client tls")?,
            kubelet: kubelet_addr,
            kubelet_tls,
            node: NODE,
        };
        Ok(Self {
            dial,
            fixture,
            plain,
            cloud,
            edge,
            links,
            kubeedge,
            runtimes,
        })
    }

    /// Requests through the front to the KubeEdge edge's node, if the rig has one.
    pub(crate) fn kubeedge_dial(&self) -> Option<Dial> {
        self.kubeedge
            .as_ref()
            .map(|_| self.dial.for_node(KUBEEDGE_NODE))
    }

    /// Whether per-role CPU times are meaningful for this rig.
    pub(crate) fn roles_separate(&self) -> bool {
        self.runtimes.separate()
    }

    /// Stops the edge, then the cloud, each within a deadline, then the fixture
    /// and the role runtimes.
    pub(crate) async fn stop(self) {
        if let Some(edge) = self.kubeedge {
            edge.stop();
        }
        let _ = tokio::time::timeout(STOP_TIMEOUT, self.edge.stop()).await;
        let _ = tokio::time::timeout(STOP_TIMEOUT, self.cloud.stop()).await;
        drop(self.links);
        drop(self.fixture);
        drop(self.plain);
        self.runtimes.shutdown();
    }
}
