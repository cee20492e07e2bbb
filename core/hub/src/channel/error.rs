//! How a channel refuses or ends: a publish that was not accepted, a sync
//! request that got no response, and why a connection ended. Each maps to
//! an HTTP status or a log line in the hubs.

use std::time::Duration;

use crate::message::BadMessage;
use crate::store::StoreError;

/// A publish that was refused. Nothing was queued.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The message is invalid.
    #[error(transparent)]
    Bad(#[from] BadMessage),
    /// The peer's queue is full.
    #[error("queue full for {peer}: {capacity} messages await acknowledgement")]
    QueueFull {
        /// The peer.
        peer: String,
        /// The bound.
        capacity: usize,
    },
    /// More than the allowed publishes per second.
    #[error("rate limit exceeded for {peer}: {qps} messages/s, burst {burst}")]
    RateLimited {
        /// The peer.
        peer: String,
        /// Sustained rate.
        qps: f64,
        /// Burst.
        burst: f64,
    },
    /// The durable store failed; the message was not accepted.
    #[error("message store: {0}")]
    Store(#[from] StoreError),
}

/// A sync request that got no response.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Refused at publish.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// No response in time. The request may still be delivered.
    #[error("no response to {msg_id} within {timeout:?}")]
    Timeout {
        /// The request id.
        msg_id: String,
        /// The wait.
        timeout: Duration,
    },
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionEnd {
    /// The byte stream failed or closed.
    #[error("connection lost: {0}")]
    Io(#[from] std::io::Error),
    /// Nothing arrived within the keepalive timeout.
    #[error("peer silent for {0:?}; presumed dead")]
    PeerDead(Duration),
    /// The peer sent a frame length beyond any sane bound.
    #[error("peer sent a {0}-byte frame; protocol error")]
    Protocol(usize),
    /// A newer connection of the same peer took over.
    #[error("replaced by a newer connection")]
    Replaced,
    /// This side is shutting down.
    #[error("shutting down")]
    Shutdown,
    /// This side cut the connection on purpose (an operator or a test); the
    /// peer reconnects and nothing accepted is lost.
    #[error("cut on purpose")]
    Cut,
}
