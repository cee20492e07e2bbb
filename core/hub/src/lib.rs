//! The cloud-edge message channel shared by cloudhub and edgehub: the
//! KubeEdge-shaped message model, its framing, acknowledged and
//! de-duplicated delivery, and the durable queues behind it.

pub mod channel;
pub mod dispatch;
pub mod message;
mod metrics;
pub mod store;

pub use channel::{
    Accepts, Channel, ChannelConfig, ConnectionEnd, Delivery, PublishError, RequestError,
};
pub use message::{BadMessage, Content, Header, Message, Route};
pub use metrics::HubMetrics;
pub use store::{Store, StoreError, StoreHealth};
