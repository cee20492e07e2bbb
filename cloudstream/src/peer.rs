//! Several cloud replicas: which replica holds which node's session, and
//! forwarding a request to that replica when it reaches another one.

use std::net::SocketAddr;

/// Where another replica serves its peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAddr {
    /// The replica's id (its pod name in cluster mode).
    pub replica: String,
    /// Its peer listener.
    pub addr: SocketAddr,
}

/// The ownership records: which replica holds each node's session. Cluster
/// mode keeps them in Kubernetes Leases; tests use an in-memory store.
/// Calls must not block: `claim` and `release` hand their writes to a
/// background task, and `owner` answers from memory.
pub trait Ownership: Send + Sync + 'static {
    /// This replica now holds `node`'s session (the newest session wins).
    fn claim(&self, node: &str);
    /// This replica's session of `node` ended; the record is removed only if
    /// it still names this replica.
    fn release(&self, node: &str);
    /// The live replica, other than this one, that holds `node`'s session.
    fn owner(&self, node: &str) -> Option<PeerAddr>;
}
