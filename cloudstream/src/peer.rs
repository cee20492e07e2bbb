//! Several cloud replicas: which replica holds which node's session, and
//! forwarding a request to that replica when it reaches another one.
//!
//! Replicas trust each other through client certificates of the
//! [`REPLICA_GROUP`] from the replicas' CA, on a listener of their own, so
//! no apiserver or user certificate can pose as a replica.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Request};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tether_tunnel::{Body, BoxError, NodeSession, ServerTls, SessionInfo, StreamError};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

/// Where another replica serves its peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAddr {
    /// The replica's id (its pod name in cluster mode).
    pub replica: String,
    /// Its peer listener.
    pub addr: SocketAddr,
}

/// A node whose session another live replica holds, as its record says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldNode {
    /// Node name.
    pub node: String,
    /// The replica holding it.
    pub replica: String,
    /// The node's addresses (certificate IP SANs).
    pub ips: Vec<IpAddr>,
    /// Allow-listed endpoints the edge announced (service discovery).
    pub endpoints: Vec<SocketAddr>,
}

/// The ownership records: which replica holds each node's session. Cluster
/// mode keeps them in Kubernetes Leases; tests use an in-memory store.
/// Calls must not block: `claim` and `release` hand their writes to a
/// background task, and `owner` answers from memory.
pub trait Ownership: Send + Sync + 'static {
    /// This replica now holds the node's session (the newest session
    /// wins). The record keeps the node's addresses, so other replicas can
    /// route by address, and its announced endpoints, so every replica's
    /// service discovery lists it.
    fn claim(&self, session: &SessionInfo);
    /// This replica's session of `node` ended; the record is removed only if
    /// it still names this replica.
    fn release(&self, node: &str);
    /// The live replica, other than this one, that holds `node`'s session.
    fn owner(&self, node: &str) -> Option<PeerAddr>;
    /// The node with address `ip` and the live replica, other than this one,
    /// that holds its session (an apiserver CONNECT names a node by IP).
    fn owner_of_ip(&self, ip: IpAddr) -> Option<(String, PeerAddr)>;
    /// Every node held by another live replica.
    fn remote_nodes(&self) -> Vec<HeldNode>;
    /// Every other live replica. The default finds those holding a node;
    /// record stores that know replicas without nodes say so.
    fn live_replicas(&self) -> Vec<PeerAddr> {
        let mut peers: Vec<PeerAddr> = Vec::new();
        for held in self.remote_nodes() {
            if let Some(p) = self.owner(&held.node)
                && !peers.contains(&p)
            {
                peers.push(p);
            }
        }
        peers
    }
}

/// Header naming the node a forwarded request is for.
pub const NODE_HEADER: &str = "tether-forwarded-node";
/// Header naming the edge-side target (`kubelet` or `ip:port`).
pub const TARGET_HEADER: &str = "tether-forwarded-target";
/// Header naming the replica that forwarded (for logs and audit).
pub const FROM_HEADER: &str = "tether-forwarded-by";
/// Organization of replica client certificates; the peer listener admits
/// no one else.
pub const REPLICA_GROUP: &str = "tether:replicas";
/// Server name every peer listener certificate carries.
pub const PEER_SERVER_NAME: &str = "tether-peer";

/// Forwarding between replicas.
pub struct PeerOptions {
    /// This replica's id.
    pub replica: String,
    /// The peer listener (requests forwarded by other replicas).
    pub listener: TcpListener,
    /// Its TLS: client certificates of [`REPLICA_GROUP`] from the replicas' CA.
    pub server_tls: ServerTls,
    /// TLS toward other replicas' peer listeners (this replica's client
    /// certificate; server name [`PEER_SERVER_NAME`]).
    pub client_tls: Arc<rustls::ClientConfig>,
    /// Who holds which node.
    pub ownership: Arc<dyn Ownership>,
    /// The message hub's routes on the peer listener (relayed messages and
    /// forwarded sync requests, ADR 0021); None when no hub runs.
    pub hub: Option<tether_cloudhub::api::Handler>,
}

/// The hub's view of the ownership records (ADR 0021).
pub fn hub_directory(
    ownership: Arc<dyn Ownership>,
) -> Arc<dyn tether_cloudhub::replicas::ReplicaDirectory> {
    Arc::new(HubDirectory(ownership))
}

struct HubDirectory(Arc<dyn Ownership>);

fn hub_peer(p: PeerAddr) -> tether_cloudhub::replicas::PeerReplica {
    tether_cloudhub::replicas::PeerReplica {
        replica: p.replica,
        addr: p.addr,
    }
}

impl tether_cloudhub::replicas::ReplicaDirectory for HubDirectory {
    fn owner_of(&self, node: &str) -> Option<tether_cloudhub::replicas::PeerReplica> {
        self.0.owner(node).map(hub_peer)
    }

    fn live_replicas(&self) -> Vec<tether_cloudhub::replicas::PeerReplica> {
        self.0.live_replicas().into_iter().map(hub_peer).collect()
    }
}

/// What the front needs to forward.
pub(crate) struct Forwarder {
    pub(crate) replica: String,
    pub(crate) client_tls: Arc<rustls::ClientConfig>,
    pub(crate) ownership: Arc<dyn Ownership>,
}

impl Forwarder {
    /// A session that forwards to the replica holding `node`, if another
    /// live replica holds it.
    pub(crate) fn session_for(&self, node: &str) -> Option<Arc<dyn NodeSession>> {
        let peer = self.ownership.owner(node)?;
        Some(self.session(node, peer))
    }

    /// Like [`Self::session_for`], for a node known by one of its addresses.
    pub(crate) fn session_for_ip(&self, ip: IpAddr) -> Option<Arc<dyn NodeSession>> {
        let (node, peer) = self.ownership.owner_of_ip(ip)?;
        Some(self.session(&node, peer))
    }

    fn session(&self, node: &str, peer: PeerAddr) -> Arc<dyn NodeSession> {
        Arc::new(PeerSession {
            info: SessionInfo {
                kind: tether_tunnel::SessionKind::default(),
                node: node.to_owned(),
                id: 0,
                peer: peer.addr,
                ips: Vec::new(),
                connected_at: SystemTime::now(),
                identity: tether_pki::Identity {
                    common_name: format!("replica {}", peer.replica),
                    organizations: Vec::new(),
                    ips: Vec::new(),
                    serial: String::new(),
                    not_before: 0,
                    not_after: 0,
                },
                endpoints: Vec::new(),
                carries_hub: false,
            },
            peer,
            from: self.replica.clone(),
            tls: self.client_tls.clone(),
        })
    }
}

/// A node session held by another replica: each stream is one HTTP/1.1
/// request over mTLS to that replica's peer listener, upgrades and CONNECT
/// included, so bytes stream end to end.
struct PeerSession {
    info: SessionInfo,
    peer: PeerAddr,
    from: String,
    tls: Arc<rustls::ClientConfig>,
}

/// Time to reach a peer replica before the request fails.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

type ResponseFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<http::Response<Body>, StreamError>> + Send>>;

impl NodeSession for PeerSession {
    fn info(&self) -> &SessionInfo {
        &self.info
    }

    fn send(&self, mut req: Request<Body>, target: &str) -> ResponseFuture {
        let node = self.info.node.clone();
        let peer = self.peer.clone();
        let tls = self.tls.clone();
        let headers = [
            (NODE_HEADER, HeaderValue::from_str(&node)),
            (TARGET_HEADER, HeaderValue::from_str(target)),
            (FROM_HEADER, HeaderValue::from_str(&self.from)),
        ];
        Box::pin(async move {
            for (name, value) in headers {
                let value = value.map_err(|_| StreamError::Closed(node.clone()))?;
                req.headers_mut().insert(name, value);
            }
            let failed = |what: String| {
                debug!(replica = %peer.replica, addr = %peer.addr, "{what}");
                StreamError::Closed(format!("{node} (held by replica {}: {what})", peer.replica))
            };
            let tcp = tokio::time::timeout(PEER_CONNECT_TIMEOUT, TcpStream::connect(peer.addr))
                .await
                .map_err(|_| failed("connect timed out".into()))?
                .map_err(|e| failed(format!("connect: {e}")))?;
            let _ = tcp.set_nodelay(true);
            let name = rustls_pki_types::ServerName::try_from(PEER_SERVER_NAME)
                .expect("static server name");
            let tls = tokio::time::timeout(
                PEER_CONNECT_TIMEOUT,
                tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
            )
            .await
            .map_err(|_| failed("TLS timed out".into()))?
            .map_err(|e| failed(format!("TLS: {e}")))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| StreamError::Tunnel(e.into()))?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!(error = %e, "peer connection ended");
                }
            });
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| StreamError::Tunnel(e.into()))?;
            Ok(resp.map(|b| b.map_err(BoxError::from).boxed_unsync()))
        })
    }

    fn close(&self) {}

    fn terminate(&self) {}

    fn open_streams(&self) -> usize {
        0
    }

    fn is_closed(&self) -> bool {
        false
    }
}
