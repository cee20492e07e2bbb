//! The cloud-edge message channel shared by cloudhub and edgehub: the
//! KubeEdge-shaped message model, its framing, acknowledged and
//! de-duplicated delivery, the durable queues behind it, and the HTTP
//! pieces both sides' application APIs share. Whatever both sides need lives
//! here, so that the edge links no cloud code.

pub mod api;
pub mod channel;
pub mod dispatch;
pub mod message;
mod metrics;
pub mod store;

pub use channel::{
    Accepts, Channel, ChannelConfig, ConnectHook, ConnectionEnd, Delivery, PublishError, Relayed,
    RequestError,
};
pub use message::{BadMessage, Content, Header, Message, Route};
pub use metrics::HubMetrics;
pub use store::{Store, StoreError, StoreHealth};

/// The stream target that carries a node's channel inside its hub session:
/// the cloud opens a CONNECT stream to it, the edge accepts only that.
pub const HUB_TARGET: &str = "tether-hub";
