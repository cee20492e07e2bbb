//! The bounds and timers of a channel, with the defaults docs/hub.md
//! documents. Kept apart so the limits read in one place.

use std::time::Duration;

/// Bounds and timers of a channel.
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// Largest encoded message (default 1 MiB).
    pub max_message: usize,
    /// Messages accepted and not yet acknowledged, per peer (default 10,000).
    pub queue_capacity: usize,
    /// Messages sent and not yet acknowledged on one connection (default 256).
    pub window: usize,
    /// First ack timeout; doubles per attempt up to 8x (default 10 s).
    pub ack_timeout: Duration,
    /// Sends of one message before it is reported failed (default 10).
    pub max_attempts: u32,
    /// Keepalive period (default 10 s).
    pub keepalive_interval: Duration,
    /// Silence after which the peer is dead (default 30 s).
    pub keepalive_timeout: Duration,
    /// Received message ids remembered per peer (default 65,536).
    pub seen_limit: usize,
    /// Resources whose last resourceversion is remembered (default 65,536).
    pub version_limit: usize,
    /// Publishes per second per peer, and burst (default off).
    pub rate: Option<(f64, f64)>,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            max_message: 1 << 20,
            queue_capacity: 10_000,
            window: 256,
            ack_timeout: Duration::from_secs(10),
            max_attempts: 10,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(30),
            seen_limit: 65_536,
            version_limit: 65_536,
            rate: None,
        }
    }
}
