//! Hub messages across cloud replicas (ADR 0021). A node's queue belongs
//! to the replica holding its session, as the ownership records say. A
//! replica that accepts a message for a node held elsewhere stores it as
//! usual and then relays it to the holder over the peer listener; the
//! holder stores it (same id) and only then is it removed here. The same
//! relay hands a queue over when the node's session moves away. Sync
//! requests are forwarded and answered by the holder.
//!
//! `relay` runs the hand-over, `client` calls peers, `serve` answers them,
//! `metrics` counts it all.

mod client;
mod metrics;
mod relay;
mod serve;

pub use client::PeerError;
pub use metrics::{Outcome, RelayMetrics};
pub use rustls_pki_types::ServerName;
pub use serve::peer_handler;

pub(crate) use relay::Relayer;

use std::net::SocketAddr;
use std::sync::Arc;

/// Path prefix of the hub's routes on the peer listener.
pub const PEER_PATH: &str = "/hub/v1/peer/";
/// Header naming the replica that relayed or forwarded (logs).
pub const FROM_HEADER: &str = "tether-relayed-by";
/// Header of a relay from a replica that is leaving: the receiver takes
/// the messages even if it would relay them on (it will, later).
pub const HAND_OVER_HEADER: &str = "tether-hand-over";

/// What a leaving replica did with its queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandOver {
    /// Messages another replica took.
    pub handed: usize,
    /// Messages still queued here (no replica took them in time).
    pub left: usize,
}

/// Another replica's peer listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerReplica {
    /// The replica's id.
    pub replica: String,
    /// Its peer listener.
    pub addr: SocketAddr,
}

/// What the hub reads from the ownership records. Answers from memory; it
/// is asked on every relay and publish.
pub trait ReplicaDirectory: Send + Sync + 'static {
    /// The live replica, other than this one, that holds `node`'s session.
    /// None when this replica holds it or no live replica does.
    fn owner_of(&self, node: &str) -> Option<PeerReplica>;
    /// Every other live replica (where a leaving replica hands its queues).
    fn live_replicas(&self) -> Vec<PeerReplica>;
}

/// What a hub needs to reach the other replicas.
pub struct ReplicaLinks {
    /// This replica's id.
    pub replica: String,
    /// Who holds which node, and which replicas live.
    pub directory: Arc<dyn ReplicaDirectory>,
    /// TLS toward peer listeners: this replica's client certificate.
    pub client_tls: Arc<rustls::ClientConfig>,
    /// The server name every peer listener's certificate carries.
    pub server_name: rustls_pki_types::ServerName<'static>,
    /// Relay metrics, registered by the caller.
    pub metrics: RelayMetrics,
}
