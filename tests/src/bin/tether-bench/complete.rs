//! Complete edges and the reconnect storm (issue 13, ADR 0022). A complete
//! edge holds its stream tunnel and its message hub's channel; since ADR 0022
//! both ride one connection. A fresh cloud with a hub runs in this process; a
//! child process (this binary again, hidden `edges --hub`) runs the edge
//! agents, each with its own hub, with the agent's real reconnect backoff.
//!
//! 1. `complete_edges`, `complete_edge_kib`: every edge's tunnel is up and its
//!    hub channel online; the cloud's RSS growth per edge.
//! 2. `storm_reconnect_s`: the cloud stops (graceful, as a rolling update
//!    does) and a new one starts on the same port; the time from the stop
//!    until every edge is complete again. Meanwhile one client sends small
//!    GETs through the front to edges already back, one at a time:
//!    `storm_request_p99_ms` and how many failed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use http::Request;
use http::header::HOST;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use tether_cloudhub::hub::{CloudHub, CloudHubConfig};
use tether_edgehub::hub::{EdgeHub, EdgeHubConfig};
use tether_hub::{HubMetrics, Store};
use tether_tests::harness::{CloudHandle, CloudSpec, EdgeHandle, EdgeSpec, Pki};
use tether_tunnel::TunnelLimits;
use tokio::sync::watch;

use crate::idle::{self, ChildOptions, settled_rss};

/// What the figure measured.
#[derive(Debug)]
pub(crate) struct CompleteReport {
    pub(crate) wanted: usize,
    pub(crate) complete: usize,
    pub(crate) cloud_before_kib: u64,
    pub(crate) cloud_after_kib: u64,
    pub(crate) edge_per_edge_kib: f64,
    pub(crate) storm: Option<StormReport>,
}

impl CompleteReport {
    /// Cloud-side ΔRSS per complete edge, KiB.
    pub(crate) fn cloud_per_edge_kib(&self) -> f64 {
        if self.complete == 0 {
            return 0.0;
        }
        self.cloud_after_kib.saturating_sub(self.cloud_before_kib) as f64 / self.complete as f64
    }
}

/// The reconnect storm.
#[derive(Debug)]
pub(crate) struct StormReport {
    /// From the old cloud's stop until every edge was complete again; None
    /// if they were not all back within the deadline.
    pub(crate) reconnect: Option<Duration>,
    /// Edges complete at the end.
    pub(crate) back: usize,
    pub(crate) requests: usize,
    pub(crate) request_errors: usize,
    pub(crate) request_p99: Option<Duration>,
}

/// How long the storm may take before it counts as not done.
const STORM_DEADLINE: Duration = Duration::from_secs(120);

/// Edges whose tunnel is registered and whose hub channel is online.
fn complete(cloud: &CloudHandle, hub: &CloudHub) -> usize {
    hub.nodes()
        .iter()
        .filter(|n| n.online && cloud.registry.get(&n.node).is_some())
        .count()
}

async fn start_cloud(
    pki: &Pki,
    limits: &TunnelLimits,
    at: Option<SocketAddr>,
) -> anyhow::Result<(CloudHandle, CloudHub)> {
    let hub = CloudHub::new(
        CloudHubConfig {
            max_nodes: 100_000,
            ..CloudHubConfig::default()
        },
        Store::in_memory(),
        HubMetrics::default(),
    )?;
    let cloud = CloudHandle::start(
        pki,
        CloudSpec {
            tunnel_addr: at,
            limits: Some(limits.clone()),
            hub: Some(hub.clone()),
            // `tether cloud`'s default drain deadline: within it a stopping
            // cloud closes every session itself, announcing when to return.
            drain: Some(Duration::from_secs(10)),
            ..CloudSpec::default()
        },
    )
    .await
    .context("start cloud")?;
    Ok((cloud, hub))
}

/// The cloud's settled RSS after one pass of the heap trimmer that `tether
/// cloud` runs every 5 s (ADR 0015) and the cloud in this process lacks.
/// Without it the figure would count heap that the connect burst freed
/// and glibc kept (at 18,000 edges, thousands of handshakes that timed out
/// and were retried), which the shipped process gives back.
async fn trimmed_rss() -> anyhow::Result<u64> {
    tokio::task::spawn_blocking(tether_metrics_adapter::trim_if_worth_it)
        .await
        .context("trim task")?;
    settled_rss().await
}

/// Polls until `count` edges are complete or `limit` passes; returns how
/// many were.
async fn wait_complete(
    cloud: &CloudHandle,
    hub: &CloudHub,
    count: usize,
    limit: Duration,
) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let n = complete(cloud, hub);
        if n >= count || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the figure: `count` complete edges, then (if `storm`) a restart.
pub(crate) async fn complete_edges(
    count: usize,
    limits: &TunnelLimits,
    register_timeout: Duration,
    storm: bool,
) -> anyhow::Result<CompleteReport> {
    ensure!(count > 0, "edge count must be at least 1");
    let pki = Pki::generate().context("generate pki")?;
    let (cloud, hub) = start_cloud(&pki, limits, None).await?;
    let addr = cloud.tunnel_addr;
    // Warm-up: one complete edge in this process initialises everything
    // lazy on the cloud's path; then back to none before the baseline.
    let mut spec = EdgeSpec::new("complete-warmup", ([127, 0, 0, 1], 9).into());
    spec.limits = Some(limits.clone());
    spec.hub = Some(EdgeHub::new(
        EdgeHubConfig::default(),
        Store::in_memory(),
        HubMetrics::default(),
    )?);
    let warm = EdgeHandle::start(&pki, addr, spec).context("start warm-up edge")?;
    ensure!(
        wait_complete(&cloud, &hub, 1, Duration::from_secs(10)).await == 1,
        "warm-up edge never became complete"
    );
    warm.stop().await;
    ensure!(
        cloud
            .registry
            .wait_until(Duration::from_secs(10), |r| r.is_empty())
            .await,
        "warm-up session never left the registry"
    );
    let cloud_before_kib = trimmed_rss().await?;
    let mut child = idle::spawn_child(
        &pki,
        count,
        addr,
        limits,
        ChildOptions {
            hub: true,
            agent_backoff: true,
        },
    )
    .await?;
    let result = async {
        let edge_before_kib = child.read_kib("base").await?;
        let n = wait_complete(&cloud, &hub, count, register_timeout).await;
        if n == 0 {
            bail!("no edge became complete within {register_timeout:?}");
        }
        let cloud_after_kib = trimmed_rss().await?;
        let edge_after_kib = child.rss().await?;
        let mut report = CompleteReport {
            wanted: count,
            complete: n,
            cloud_before_kib,
            cloud_after_kib,
            edge_per_edge_kib: edge_after_kib.saturating_sub(edge_before_kib) as f64 / n as f64,
            storm: None,
        };
        if storm {
            report.storm = Some(restart(&pki, limits, cloud, hub, addr, n).await?);
        } else {
            cloud.stop().await;
        }
        Ok(report)
    }
    .await;
    child.stop().await;
    result
}

/// Stops `cloud`, starts a new one on `addr`, and times the way back to
/// `count` complete edges while probing the ones already back.
async fn restart(
    pki: &Pki,
    limits: &TunnelLimits,
    cloud: CloudHandle,
    hub: CloudHub,
    addr: SocketAddr,
    count: usize,
) -> anyhow::Result<StormReport> {
    let stopped = Instant::now();
    cloud.stop().await;
    drop(hub);
    let (cloud, hub) = start_cloud(pki, limits, Some(addr)).await?;
    let (done_tx, done) = watch::channel(false);
    let prober = tokio::spawn(probe(
        pki.front_client_tls(Some(&pki.front_ca), "kube-apiserver-kubelet-client", &[])?,
        cloud.front_addr,
        cloud.registry.clone(),
        done,
    ));
    let back = wait_complete(&cloud, &hub, count, STORM_DEADLINE).await;
    let reconnect = (back >= count).then(|| stopped.elapsed());
    let _ = done_tx.send(true);
    let (mut samples, request_errors) = prober.await.context("prober task")?;
    cloud.stop().await;
    samples.sort();
    let request_p99 =
        (!samples.is_empty()).then(|| samples[(samples.len() * 99 / 100).min(samples.len() - 1)]);
    Ok(StormReport {
        reconnect,
        back,
        requests: samples.len(),
        request_errors,
        request_p99,
    })
}

/// Distinct edges the prober calls. Each call leaves a pooled kubelet
/// connection in its edge for 30 s, and here every edge's kubelet is one
/// fixture in the child process, so each distinct edge called costs the
/// child two fds next to its 18,000 tunnels (the hard limit is 20,000).
const PROBE_SPREAD: usize = 256;

/// One client, one request at a time, each to the next edge already back
/// (by the registry, the first [`PROBE_SPREAD`] of them, then round robin);
/// a new connection after any failure. Returns the latencies of the
/// requests that succeeded and how many failed.
async fn probe(
    tls: std::sync::Arc<rustls::ClientConfig>,
    front: SocketAddr,
    registry: tether_tunnel::SessionRegistry,
    done: watch::Receiver<bool>,
) -> (Vec<Duration>, usize) {
    let (mut samples, mut errors) = (Vec::new(), 0);
    let mut sender = None;
    let mut next = 0usize;
    let mut nodes: Vec<String> = Vec::with_capacity(PROBE_SPREAD);
    // Bounded: the storm's deadline ends it, and each request has its own.
    while !*done.borrow() {
        if nodes.len() < PROBE_SPREAD {
            for s in registry.all() {
                if nodes.len() == PROBE_SPREAD {
                    break;
                }
                if !nodes.contains(&s.info().node) {
                    nodes.push(s.info().node.clone());
                }
            }
        }
        if nodes.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        next = (next + 1) % nodes.len();
        let node = &nodes[next];
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(5), async {
            if sender.is_none() {
                sender = Some(connect(&tls, front).await?);
            }
            let s = sender.as_mut().context("sender")?;
            s.ready().await?;
            let req = Request::get("/pods")
                .header(HOST, node.as_str())
                .body(Empty::<Bytes>::new())?;
            let resp = s.send_request(req).await?;
            let status = resp.status();
            resp.into_body().collect().await?;
            ensure!(status == 200, "status {status}");
            Ok::<_, anyhow::Error>(())
        })
        .await;
        match r {
            Ok(Ok(())) => samples.push(started.elapsed()),
            _ => {
                errors += 1;
                sender = None;
            }
        }
    }
    (samples, errors)
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(
    tls: &std::sync::Arc<rustls::ClientConfig>,
    front: SocketAddr,
) -> anyhow::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(front).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from(tether_tests::harness::CLOUD_NAME)?;
    let io = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}
