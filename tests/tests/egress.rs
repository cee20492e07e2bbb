//! Iptables-free mode end to end: the front as kube-apiserver's egress
//! selector proxy (`HTTPConnect` over mTLS). The "apiserver" here dials the
//! front exactly as `tunnelHTTPConnect` in k8s.io/apiserver's egress selector
//! does (`CONNECT <nodeIP>:<port>` with `Host: 127.0.0.1`), then speaks TLS
//! end to end to a server on the edge whose certificate comes from a CA that
//! Tether never sees. Real sockets and TLS, loopback only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use rustls_pki_types::ServerName;
use tether_pki::Ca;
use tether_tests::bounded;
use tether_tests::fixture::{FixtureKubelet, LogVerifier};
use tether_tests::harness::{CLOUD_NAME, CloudHandle, CloudSpec, EdgeHandle, EdgeSpec, Pki};
use tether_tests::kubectl;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

const NODE: &str = "edge-1";
/// The node's InternalIP. All of 127/8 is loopback on Linux, so the edge can
/// advertise (and a local service can bind) an address other than the
/// front's 127.0.0.1 while every packet stays on `lo`.
const NODE_IP: &str = "127.0.0.9";
/// An address no node certificate carries.
const UNKNOWN_IP: &str = "127.0.0.99";
/// The name on the echo server's certificate (issued by its own CA).
const ECHO_NAME: &str = "echo.edge-1.test";
const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Go's `http.DefaultMaxHeaderBytes`: the apiserver reads at most this much
/// of the proxy's answer.
const MAX_CONNECT_HEAD: usize = 1 << 20;

async fn io<T>(what: &str, f: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(IO_TIMEOUT, f)
        .await
        .with_context(|| format!("timed out waiting for {what}"))
}

fn node_ip() -> IpAddr {
    NODE_IP.parse().expect("static address")
}

/// A TLS echo server on the edge side, with a certificate from `ca` (not
/// Tether's). Stops when dropped.
struct TlsEcho {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TlsEcho {
    /// Connections served at most; the test makes a handful.
    const MAX_CONNS: usize = 64;

    async fn start(ca: &Ca, bind: IpAddr) -> anyhow::Result<Self> {
        let leaf = ca.issue_server(ECHO_NAME, &[ECHO_NAME])?;
        let cfg = tether_pki::server_config_no_client_auth(
            leaf.cert_chain()?,
            leaf.key_pem.to_der()?,
            &[],
        )?;
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind(SocketAddr::new(bind, 0)).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            for _ in 0..Self::MAX_CONNS {
                let Ok((tcp, _)) = listener.accept().await else {
                    break;
                };
                let acceptor = acceptor.clone();
                conns.spawn(async move {
                    let echo = async {
                        let tls = acceptor.accept(tcp).await?;
                        let (mut r, mut w) = tokio::io::split(tls);
                        tokio::io::copy(&mut r, &mut w).await?;
                        w.shutdown().await
                    };
                    let _ = tokio::time::timeout(TEST_TIMEOUT, echo).await;
                });
            }
            while conns.join_next().await.is_some() {}
        });
        Ok(Self { addr, task })
    }
}

impl Drop for TlsEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Env {
    pki: Pki,
    cloud: CloudHandle,
    edge: EdgeHandle,
}

impl Env {
    /// Cloud and one edge whose certificate carries [`NODE_IP`].
    async fn start(pki: Pki, spec: EdgeSpec) -> anyhow::Result<Self> {
        Self::start_with(pki, spec, CloudSpec::default()).await
    }

    async fn start_with(pki: Pki, spec: EdgeSpec, cloud: CloudSpec) -> anyhow::Result<Self> {
        let cloud = CloudHandle::start(&pki, cloud).await?;
        let edge = EdgeHandle::start(&pki, cloud.tunnel_addr, spec)?;
        cloud
            .registry
            .wait_for_node(NODE, None, Duration::from_secs(10))
            .await
            .context("edge never connected")?;
        Ok(Self { pki, cloud, edge })
    }

    /// The egress selector's `tlsConfig`: `caBundle` is the CA of the front's
    /// serving certificate, `clientCert` one the front's client CA signed
    /// (here the apiserver's kubelet client identity, allowed by default).
    /// Go offers no ALPN on this connection, so neither do we.
    fn egress_tls(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let client = self
            .pki
            .front_ca
            .issue_client("kube-apiserver-kubelet-client", &["system:masters"])?;
        Ok(Arc::new(tether_pki::client_config(
            std::slice::from_ref(self.pki.front_ca.cert_der()),
            Some((client.cert_chain()?, client.key_pem.to_der()?)),
            &[],
        )?))
    }

    async fn proxy_conn(
        &self,
    ) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = io("front connect", TcpStream::connect(self.cloud.front_addr)).await??;
        let name = ServerName::try_from(CLOUD_NAME)?;
        Ok(io(
            "front handshake",
            TlsConnector::from(self.egress_tls()?).connect(name, tcp),
        )
        .await??)
    }

    /// Dials `authority` through the front byte for byte as kube-apiserver's
    /// egress dialer does: its exact CONNECT request, the answer head read
    /// with Go's size limit, and nothing may follow a `200` head (the
    /// apiserver hands the raw connection to TLS and checks that).
    async fn apiserver_dial(
        &self,
        authority: &str,
    ) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let mut conn = self.proxy_conn().await?;
        let request = format!("CONNECT {authority} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        io("connect write", conn.write_all(request.as_bytes())).await??;
        // Byte by byte, so no byte after the head is consumed here.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            ensure!(
                head.len() < MAX_CONNECT_HEAD,
                "CONNECT answer head too long"
            );
            let b = io("connect answer", conn.read_u8()).await??;
            head.push(b);
        }
        let head = String::from_utf8(head)?;
        let status = head.split(' ').nth(1).unwrap_or_default();
        if status != "200" {
            bail!("CONNECT {authority}: {}", head.lines().next().unwrap_or(""));
        }
        Ok(conn)
    }

    /// Sends the apiserver's CONNECT and returns the refusal's status code
    /// and Kubernetes `Status` body; an accepted CONNECT is an error.
    async fn refused(&self, authority: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        let conn = self.proxy_conn().await?;
        let (mut sender, c) = io(
            "http handshake",
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(conn)),
        )
        .await??;
        tokio::spawn(c.with_upgrades());
        let req = http::Request::connect(authority)
            .header("host", "127.0.0.1")
            .body(http_body_util::Empty::<Bytes>::new())?;
        let resp = io("connect answer", sender.send_request(req)).await??;
        let status = resp.status().as_u16();
        ensure!(status != 200, "CONNECT {authority} was accepted");
        let body = kubectl::read_body(resp.into_body()).await?;
        let json: serde_json::Value = serde_json::from_slice(&body)
            .with_context(|| format!("not a Status: {}", String::from_utf8_lossy(&body)))?;
        Ok((status, json))
    }
}

/// TLS from the "apiserver" to a server behind the tunnel, verified with
/// `ca` only (never Tether's CAs): proof that the stream is end to end.
async fn end_to_end_tls<S>(
    stream: S,
    ca: &Ca,
    name: ServerName<'static>,
    client: Option<&Ca>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let client = match client {
        Some(c) => {
            let cert = c.issue_client("kube-apiserver-kubelet-client", &["system:masters"])?;
            Some((cert.cert_chain()?, cert.key_pem.to_der()?))
        }
        None => None,
    };
    let cfg = tether_pki::client_config(std::slice::from_ref(ca.cert_der()), client, &[])?;
    Ok(io(
        "end-to-end handshake",
        TlsConnector::from(Arc::new(cfg)).connect(name, stream),
    )
    .await??)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_node_ip_reaches_allow_listed_tls_server_end_to_end() {
    bounded(TEST_TIMEOUT, async {
        let echo_ca = Ca::generate("edge-local-services-ca")?;
        // Bound on the node IP, like a node-local service.
        let echo = TlsEcho::start(&echo_ca, node_ip()).await?;
        let fixture = FixtureKubelet::start(None).await?;
        let mut spec = EdgeSpec::new(NODE, fixture.addr);
        spec.ips = vec![node_ip()];
        spec.allow = vec![echo.addr];
        let env = Env::start(Pki::generate()?, spec).await?;

        let raw = env
            .apiserver_dial(&format!("{NODE_IP}:{}", echo.addr.port()))
            .await?;
        let tls = end_to_end_tls(raw, &echo_ca, ServerName::try_from(ECHO_NAME)?, None).await?;
        // The certificate the client verified is the echo server's own leaf.
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .context("no peer certificate")?;
        let leaf = tether_pki::Identity::from_der(peer)?;
        ensure!(
            leaf.common_name == ECHO_NAME,
            "peer is {:?}",
            leaf.common_name
        );
        let payload: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
        let back = kubectl::echo_through(tls, &payload).await?;
        ensure!(back == payload, "echo differs");
        ensure!(env.edge.metrics.refused_total() == 0);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_node_ip_is_refused_for_unlisted_ports_and_unknown_nodes() {
    bounded(TEST_TIMEOUT, async {
        let echo_ca = Ca::generate("edge-local-services-ca")?;
        let echo = TlsEcho::start(&echo_ca, node_ip()).await?;
        // Listening but not allow-listed: the edge must not dial it.
        let unlisted = TcpListener::bind(SocketAddr::new(node_ip(), 0)).await?;
        let unlisted_port = unlisted.local_addr()?.port();
        let fixture = FixtureKubelet::start(None).await?;
        let mut spec = EdgeSpec::new(NODE, fixture.addr);
        spec.ips = vec![node_ip()];
        spec.allow = vec![echo.addr];
        let env = Env::start(Pki::generate()?, spec).await?;

        let target = format!("{NODE_IP}:{unlisted_port}");
        let (code, status) = env.refused(&target).await?;
        ensure!(code == 403, "{code}: {status}");
        ensure!(
            status["kind"] == "Status" && status["reason"] == "Forbidden",
            "{status}"
        );
        let message = status["message"].as_str().unwrap_or_default();
        ensure!(
            message.contains(&target) && message.contains("allow-listed"),
            "{message}"
        );
        ensure!(env.edge.metrics.refused_total() == 1);
        // Nothing reached the unlisted listener. The edge answers only after
        // any dial it makes returns, and by then the kernel has queued the
        // connection, so asking the kernel directly (non-blocking) is exact.
        let unlisted = unlisted.into_std()?;
        match unlisted.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Ok((_, peer)) => bail!("the edge dialled an unlisted port (from {peer})"),
            Err(e) => return Err(e.into()),
        }

        let (code, status) = env
            .refused(&format!("{UNKNOWN_IP}:{}", echo.addr.port()))
            .await?;
        ensure!(code == 404, "{code}: {status}");
        ensure!(status["reason"] == "NotFound", "{status}");
        let message = status["message"].as_str().unwrap_or_default();
        ensure!(message.contains(UNKNOWN_IP), "{message}");
        // Refused at the front: the edge never saw it.
        ensure!(env.edge.metrics.refused_total() == 1);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_node_ip_kubelet_port_is_raw_tcp_to_an_https_kubelet() {
    bounded(TEST_TIMEOUT, async {
        // The kubelet's own PKI: a serving CA (the apiserver's
        // --kubelet-certificate-authority) and the CA of its client
        // certificates. Tether holds neither key.
        let kubelet_ca = Ca::generate("kubelet-serving-ca")?;
        let kubelet_client_ca = Ca::generate("kubelet-client-ca")?;
        let serving = kubelet_ca.issue_server(NODE, &[NODE, NODE_IP, "localhost"])?;
        let kubelet_tls = tether_pki::server_config_client_auth(
            serving.cert_chain()?,
            serving.key_pem.to_der()?,
            std::slice::from_ref(kubelet_client_ca.cert_der()),
            &[b"http/1.1"],
        )?;
        let fixture = FixtureKubelet::start(Some(Arc::new(kubelet_tls))).await?;
        let mut spec = EdgeSpec::new(NODE, fixture.addr);
        spec.ips = vec![node_ip()];
        spec.kubelet_url = format!("https://{}", fixture.addr);
        // The edge's own HTTPS client to the kubelet (unused by CONNECT,
        // which never terminates TLS).
        let edge_client =
            kubelet_client_ca.issue_client("system:node:edge-1", &["system:nodes"])?;
        spec.kubelet_tls = Some(Arc::new(tether_pki::client_config(
            std::slice::from_ref(kubelet_ca.cert_der()),
            Some((edge_client.cert_chain()?, edge_client.key_pem.to_der()?)),
            &[b"http/1.1"],
        )?));
        let env = Env::start(Pki::generate()?, spec).await?;
        let before = fixture.requests();

        // The apiserver dials InternalIP:kubeletEndpoint.Port and verifies
        // the kubelet's certificate for that IP.
        let raw = env
            .apiserver_dial(&format!("{NODE_IP}:{}", fixture.addr.port()))
            .await?;
        let tls = end_to_end_tls(
            raw,
            &kubelet_ca,
            ServerName::IpAddress(node_ip().into()),
            Some(&kubelet_client_ca),
        )
        .await?;
        const N: u64 = 256 << 10;
        let resp = kubectl::get_streaming(
            tls,
            &format!("{NODE_IP}:{}", fixture.addr.port()),
            &format!("/containerLogs/default/web/app?bytes={N}"),
        )
        .await?;
        ensure!(resp.status() == 200, "status {}", resp.status());
        ensure!(resp.headers()["x-fixture"] == "kubelet");
        let mut body = resp.into_body();
        let mut v = LogVerifier::new(0);
        while let Some(chunk) = kubectl::next_chunk(&mut body).await? {
            v.update(&chunk)?;
        }
        ensure!(v.offset() == N, "got {} bytes", v.offset());
        ensure!(fixture.requests() == before + 1);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_a_passthrough_network_is_dialled_from_the_cloud() {
    bounded(TEST_TIMEOUT, async {
        // A "webhook" in the cluster network (127.0.0.50), with its own CA.
        let webhook_ca = Ca::generate("webhook-ca")?;
        let webhook = TlsEcho::start(&webhook_ca, "127.0.0.50".parse()?).await?;
        let unlisted = TcpListener::bind(SocketAddr::new(node_ip(), 0)).await?;
        let fixture = FixtureKubelet::start(None).await?;
        let mut spec = EdgeSpec::new(NODE, fixture.addr);
        spec.ips = vec![node_ip()];
        // The passthrough network holds the webhook and, to show that nodes
        // win, the node's address too; 127.0.0.99 lies outside it.
        let cloud = CloudSpec {
            egress_passthrough: vec!["127.0.0.0/26".parse().map_err(anyhow::Error::msg)?],
            ..CloudSpec::default()
        };
        let env = Env::start_with(Pki::generate()?, spec, cloud).await?;

        let raw = env
            .apiserver_dial(&format!("127.0.0.50:{}", webhook.addr.port()))
            .await?;
        let tls = end_to_end_tls(raw, &webhook_ca, ServerName::try_from(ECHO_NAME)?, None).await?;
        let back = kubectl::echo_through(tls, b"admission review").await?;
        ensure!(back == b"admission review", "echo differs");

        // The node's own address still goes through its tunnel, where the
        // allow-list refuses an unlisted port (not dialled from the cloud).
        let target = format!("{NODE_IP}:{}", unlisted.local_addr()?.port());
        let (code, status) = env.refused(&target).await?;
        ensure!(code == 403, "{code}: {status}");
        ensure!(env.edge.metrics.refused_total() == 1);

        let (code, status) = env.refused(&format!("{UNKNOWN_IP}:443")).await?;
        ensure!(code == 404, "{code}: {status}");
        Ok(())
    })
    .await;
}
