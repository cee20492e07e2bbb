//! Several cloud replicas in one process, with their message hubs linked
//! over the peer listeners (ADR 0021), and an edge whose tunnel and hub
//! sessions reach them through a steerable stand-in for the Service in
//! front of the replicas. Used by tests/tests/ha.rs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tether_cloudhub::hub::{CloudHub, CloudHubConfig};
use tether_cloudhub::replicas::{RelayMetrics, ReplicaLinks, ServerName};
use tether_edgehub::hub::{EdgeHub, EdgeHubConfig};
use tether_hub::{ChannelConfig, HubMetrics, Store};
use tether_tunnel::{Backoff, ServerTls, Shutdown, ShutdownTrigger, TunnelDialer, TunnelLimits};

use crate::harness::{CLOUD_NAME, CloudHandle, CloudSpec, Pki};
use crate::ownership::OwnershipBoard;

/// A stand-in for the Kubernetes Service in front of the replicas: TCP
/// connections go to whichever address is current. Connections already
/// made stay where they are until cut.
#[derive(Clone)]
pub struct Service {
    /// Where clients connect.
    pub addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
}

impl Service {
    /// A Service sending new connections to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let svc = Self {
            addr: listener.local_addr()?,
            target: Arc::new(Mutex::new(target)),
        };
        let target = svc.target.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let to = *target.lock().expect("lock");
                tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Ok(svc)
    }

    /// New connections go to `to` from now on.
    pub fn point_to(&self, to: SocketAddr) {
        *self.target.lock().expect("lock") = to;
    }
}

/// Channel bounds for tests: no rate limit, room for every message, fast
/// dead-peer detection.
pub fn hub_channel_cfg() -> ChannelConfig {
    ChannelConfig {
        queue_capacity: 20_000,
        rate: None,
        keepalive_interval: Duration::from_secs(1),
        keepalive_timeout: Duration::from_secs(5),
        ..ChannelConfig::default()
    }
}

/// One replica: the stream tunnel and front with a peer listener, and a
/// message hub on its own port whose routes the peer listener serves.
pub struct HubReplica {
    /// The stream side (tunnel, front, peer listener, ownership claims).
    pub cloud: CloudHandle,
    /// The message hub.
    pub hub: CloudHub,
    /// Where edges dial the hub.
    pub hub_addr: SocketAddr,
    /// The hub's relay counters.
    pub relay: RelayMetrics,
    hub_stop: ShutdownTrigger,
}

impl HubReplica {
    /// Starts replica `id`, registers its peer listener on `board`, and
    /// keeps its hub store under `dir`.
    pub async fn start(
        pki: &Pki,
        board: &OwnershipBoard,
        id: &str,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let store = Store::open(&dir.join(format!("{id}.redb")))?;
        let cfg = CloudHubConfig {
            channel: hub_channel_cfg(),
            ..CloudHubConfig::default()
        };
        let hub = CloudHub::new(cfg, store, HubMetrics::default())?;
        let (hub_stop, shutdown) = Shutdown::new(Duration::from_secs(1));
        let relay = RelayMetrics::default();
        hub.link_replicas(
            ReplicaLinks {
                replica: id.to_owned(),
                directory: tether_cloudstream::peer::hub_directory(board.view(id)),
                client_tls: pki.peer_tls(id)?.1,
                server_name: ServerName::try_from(tether_cloudstream::peer::PEER_SERVER_NAME)?,
                metrics: relay.clone(),
            },
            shutdown.clone(),
        );
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let hub_addr = tcp.local_addr()?;
        let listener = hub.listener(
            tcp,
            ServerTls::new(pki.tunnel_server_tls()?),
            TunnelLimits::default(),
            shutdown.clone(),
        );
        tokio::spawn(listener.run(shutdown));
        let cloud = CloudHandle::start(
            pki,
            CloudSpec {
                replica: Some((id.to_owned(), board.view(id))),
                peer_hub: Some(tether_cloudhub::replicas::peer_handler(
                    hub.clone(),
                    1 << 20,
                )),
                ..CloudSpec::default()
            },
        )
        .await?;
        board.register(id, cloud.peer_addr.context("peer listener")?);
        Ok(Self {
            cloud,
            hub,
            hub_addr,
            relay,
            hub_stop,
        })
    }

    /// Cuts the node's tunnel and hub sessions here (its edge reconnects
    /// through the Services).
    pub fn cut(&self, node: &str) {
        if let Some(s) = self.cloud.registry.get(node) {
            s.terminate();
        }
        self.hub.disconnect(node);
    }

    /// Stops the replica as `tether cloud` does at SIGTERM: the hub's
    /// listener and relay stop, the stream side drains, then what is still
    /// queued here is handed to the other replicas.
    pub async fn stop(self) -> tether_cloudhub::replicas::HandOver {
        self.hub_stop.trigger();
        self.cloud.stop().await;
        self.hub
            .hand_over(Duration::from_secs(5))
            .await
            .unwrap_or_default()
    }
}

/// An edge with both sessions: the stream agent and the hub client, each
/// through its own Service.
pub struct HubEdge {
    /// The edge hub (subscribe, publish).
    pub hub: EdgeHub,
    _agent: crate::harness::EdgeHandle,
    _stop: ShutdownTrigger,
}

impl HubEdge {
    /// Starts node `node` against the Services (the kubelet fixture at
    /// `kubelet`); its hub store lives under `dir`.
    pub async fn start(
        pki: &Pki,
        node: &str,
        kubelet: SocketAddr,
        tunnel: &Service,
        hub: &Service,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let agent = crate::harness::EdgeHandle::start(
            pki,
            tunnel.addr,
            crate::harness::EdgeSpec::new(node, kubelet),
        )?;
        let store = Store::open(&dir.join(format!("{node}.redb")))?;
        let edge = EdgeHub::new(
            EdgeHubConfig {
                channel: hub_channel_cfg(),
                ..EdgeHubConfig::default()
            },
            store,
            HubMetrics::default(),
        )?;
        let cert = pki.edge_ca.issue_node_client(node, &[])?;
        let dialer = TunnelDialer::new(
            hub.addr.to_string(),
            CLOUD_NAME,
            pki.edge_client_tls(&cert)?,
            node.to_owned(),
            TunnelLimits::default(),
        )?;
        let (stop, shutdown) = Shutdown::new(Duration::from_secs(1));
        let run = edge.clone();
        tokio::spawn(async move {
            run.run(
                dialer,
                Backoff::new(Duration::from_millis(5), Duration::from_millis(50)),
                shutdown,
            )
            .await
        });
        Ok(Self {
            hub: edge,
            _agent: agent,
            _stop: stop,
        })
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory named after `name`.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "tether-{name}-{}-{}",
            std::process::id(),
            tether_pki::rand_u64()
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two replicas with hubs (`cloud-a`, `cloud-b`), and an edge whose tunnel
/// and hub sessions reach replica b through two Services.
pub struct HubPair {
    /// The ownership records both replicas share.
    pub board: OwnershipBoard,
    /// Replica `cloud-a`.
    pub a: HubReplica,
    /// Replica `cloud-b` (taken when a test stops it).
    pub b: Option<HubReplica>,
    /// The Service in front of the tunnel ports.
    pub tunnel: Service,
    /// The Service in front of the hub ports.
    pub hub: Service,
    /// The edge.
    pub edge: HubEdge,
    node: String,
    _kubelet: crate::fixture::FixtureKubelet,
    _dir: TempDir,
}

impl HubPair {
    /// Starts both replicas and the edge `node`, held by b.
    pub async fn start(name: &str, node: &str) -> anyhow::Result<Self> {
        let pki = Pki::generate()?;
        let dir = TempDir::new(name)?;
        let kubelet = crate::fixture::FixtureKubelet::start(None).await?;
        let board = OwnershipBoard::default();
        let a = HubReplica::start(&pki, &board, "cloud-a", &dir.0).await?;
        let b = HubReplica::start(&pki, &board, "cloud-b", &dir.0).await?;
        let tunnel = Service::start(b.cloud.tunnel_addr).await?;
        let hub = Service::start(b.hub_addr).await?;
        let edge = HubEdge::start(&pki, node, kubelet.addr, &tunnel, &hub, &dir.0).await?;
        let pair = Self {
            board,
            a,
            b: Some(b),
            tunnel,
            hub,
            edge,
            node: node.to_owned(),
            _kubelet: kubelet,
            _dir: dir,
        };
        pair.wait_held_by("cloud-b").await?;
        Ok(pair)
    }

    /// Replica b, while it runs.
    pub fn b(&self) -> &HubReplica {
        self.b.as_ref().expect("replica b runs")
    }

    fn replica(&self, id: &str) -> &HubReplica {
        if id == "cloud-a" { &self.a } else { self.b() }
    }

    /// Waits (bounded) until replica `id` holds the node's record and its
    /// hub channel.
    pub async fn wait_held_by(&self, id: &str) -> anyhow::Result<()> {
        let hub = &self.replica(id).hub;
        // Bounded, with room for a loaded machine (debug builds, 2 cores).
        for _ in 0..800 {
            if self.board.holder(&self.node).as_deref() == Some(id)
                && self.edge.hub.is_online()
                && hub.node(&self.node).is_some_and(|s| s.online)
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!(
            "{} never held by {id}: record {:?}, hub online {:?}",
            self.node,
            self.board.holder(&self.node),
            hub.node(&self.node).map(|s| s.online)
        )
    }

    /// New sessions go to replica `id`; the node's sessions on the other
    /// one are cut, so the edge reconnects to `id`.
    pub async fn move_to(&self, id: &str) -> anyhow::Result<()> {
        let (to, from) = if id == "cloud-a" {
            (&self.a, self.b())
        } else {
            (self.b(), &self.a)
        };
        self.tunnel.point_to(to.cloud.tunnel_addr);
        self.hub.point_to(to.hub_addr);
        from.cut(&self.node);
        self.wait_held_by(id).await
    }
}
