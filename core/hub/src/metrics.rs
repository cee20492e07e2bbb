//! The hub's metric families, registered under `tether_hub_` with a `role`
//! label (cloud or edge). Labels are closed sets; nodes are not a label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Why a message was not handed to the application.
pub(crate) const DROP_REASONS: [&str; 5] =
    ["duplicate", "stale", "deferred", "no_subscriber", "failed"];

/// Metric families of one hub. Cheap to clone.
#[derive(Clone, Debug)]
pub struct HubMetrics {
    pub(crate) queue_depth: Gauge,
    pub(crate) deliveries: Counter,
    pub(crate) redeliveries: Counter,
    drops: Family<ReasonLabel, Counter>,
    errors: Family<ReasonLabel, Counter>,
    pub(crate) ack_latency: Histogram,
    pub(crate) online: Gauge,
    refused: Family<ReasonLabel, Counter>,
}

impl Default for HubMetrics {
    fn default() -> Self {
        Self {
            queue_depth: Gauge::default(),
            deliveries: Counter::default(),
            redeliveries: Counter::default(),
            drops: Family::default(),
            errors: Family::default(),
            ack_latency: Histogram::new(exponential_buckets(0.0005, 4.0, 10)),
            online: Gauge::default(),
            refused: Family::default(),
        }
    }
}

impl HubMetrics {
    /// Messages accepted and not yet acknowledged by the peer, right now
    /// (`tether_hub_queue_depth`).
    pub fn queue_depth(&self) -> i64 {
        self.queue_depth.get()
    }

    /// The `tether_hub_online_peers` gauge: connected peers (on an edge, 1 while
    /// its hub channel to the cloud is up).
    pub fn online(&self) -> i64 {
        self.online.get()
    }

    /// Creates the families and registers them; `role` is `cloud` or `edge`.
    pub fn register(registry: &mut Registry, role: &'static str) -> Self {
        let m = Self::default();
        let r = registry
            .sub_registry_with_prefix("tether_hub")
            .sub_registry_with_label(("role".into(), role.into()));
        r.register(
            "queue_depth",
            "Messages accepted and not yet acknowledged by the peer",
            m.queue_depth.clone(),
        );
        r.register(
            "deliveries",
            "Messages handed to the local application",
            m.deliveries.clone(),
        );
        r.register(
            "redeliveries",
            "Messages sent again (after a reconnect or an ack timeout)",
            m.redeliveries.clone(),
        );
        r.register(
            "drops",
            "Received messages not handed to the application, by reason: duplicate, stale (older resourceversion), deferred (no subscriber yet; the sender offers it again), no_subscriber (the subscriber left meanwhile); and sent messages given up: failed",
            m.drops.clone(),
        );
        r.register(
            "errors",
            "Bad input from the peer, by reason: malformed, no_route, too_large, bad_id, unknown_ack, peer_error",
            m.errors.clone(),
        );
        r.register(
            "ack_latency_seconds",
            "Time from sending a message to its acknowledgement",
            m.ack_latency.clone(),
        );
        r.register(
            "online_peers",
            "Peers with a live channel (nodes on the cloud; 0 or 1 on the edge)",
            m.online.clone(),
        );
        r.register(
            "publish_refusals",
            "Publishes refused, by reason: queue_full, rate_limited, too_large, invalid",
            m.refused.clone(),
        );
        for reason in DROP_REASONS {
            let _ = m.drops.get_or_create(&ReasonLabel { reason });
        }
        for reason in [
            "queue_full",
            "rate_limited",
            "too_large",
            "invalid",
            "store",
        ] {
            let _ = m.refused.get_or_create(&ReasonLabel { reason });
        }
        m
    }

    /// Counts a message not handed on, by reason.
    pub fn drop(&self, reason: &'static str) {
        self.drops.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub(crate) fn error(&self, reason: &'static str) {
        self.errors.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub(crate) fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }
}
