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

/// Another replica's peer listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerReplica {
    /// The replica's id.
    pub replica: String,
    /// Its peer listener.
    pub addr: SocketAddr,
}

/// The live replica, other than this one, that holds a node's session (the
/// ownership records; answered from memory). None when this replica holds
/// it or no live replica does.
pub type OwnerOf = Arc<dyn Fn(&str) -> Option<PeerReplica> + Send + Sync>;

/// What a hub needs to reach the other replicas.
pub struct ReplicaLinks {
    /// This replica's id.
    pub replica: String,
    /// Who holds which node.
    pub owner_of: OwnerOf,
    /// TLS toward peer listeners: this replica's client certificate.
    pub client_tls: Arc<rustls::ClientConfig>,
    /// The server name every peer listener's certificate carries.
    pub server_name: rustls_pki_types::ServerName<'static>,
    /// Relay metrics, registered by the caller.
    pub metrics: RelayMetrics,
}
