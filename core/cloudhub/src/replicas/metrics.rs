//! Metric families of relaying between replicas, registered under
//! `tether_hub_relay_*` and `tether_hub_peer_requests_total`. Results are
//! a closed set of labels; peers and nodes are not labels.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// How a relay batch or a forwarded sync request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Taken whole.
    Ok,
    /// The peer took a prefix or nothing (its queue is full, the node moved
    /// on, its store failed): the rest waits here.
    Refused,
    /// The peer could not be reached or did not answer in time.
    Unreachable,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Refused => "refused",
            Self::Unreachable => "unreachable",
        }
    }
}

/// Relay counters. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct RelayMetrics {
    batches: Family<ResultLabel, Counter>,
    sent: Counter,
    received: Counter,
    requests: Family<ResultLabel, Counter>,
    pulls: Family<ResultLabel, Counter>,
}

impl RelayMetrics {
    /// Registers the families into `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "tether_hub_relay_batches",
            "Relay batches sent to the replica holding a node, by result",
            m.batches.clone(),
        );
        registry.register(
            "tether_hub_relay_sent_messages",
            "Queued messages handed to the replica holding their node",
            m.sent.clone(),
        );
        registry.register(
            "tether_hub_relay_received_messages",
            "Messages other replicas handed to this one (duplicates included)",
            m.received.clone(),
        );
        registry.register(
            "tether_hub_relay_pulls",
            "Hand-overs asked of other replicas when a node's hub session arrives, by result",
            m.pulls.clone(),
        );
        registry.register(
            "tether_hub_peer_requests",
            "Sync requests forwarded to the replica holding the node, by result",
            m.requests.clone(),
        );
        for o in [Outcome::Ok, Outcome::Refused, Outcome::Unreachable] {
            let _ = m.batches.get_or_create(&ResultLabel { result: o.label() });
            let _ = m.requests.get_or_create(&ResultLabel { result: o.label() });
            let _ = m.pulls.get_or_create(&ResultLabel { result: o.label() });
        }
        m
    }

    pub(crate) fn batch(&self, outcome: Outcome, sent: usize) {
        self.batches
            .get_or_create(&ResultLabel {
                result: outcome.label(),
            })
            .inc();
        self.sent.inc_by(sent as u64);
    }

    pub(crate) fn received(&self, n: usize) {
        self.received.inc_by(n as u64);
    }

    pub(crate) fn request(&self, outcome: Outcome) {
        self.requests
            .get_or_create(&ResultLabel {
                result: outcome.label(),
            })
            .inc();
    }

    pub(crate) fn pull(&self, outcome: Outcome) {
        self.pulls
            .get_or_create(&ResultLabel {
                result: outcome.label(),
            })
            .inc();
    }

    /// Messages handed over so far (tests and the bench read it).
    pub fn sent(&self) -> u64 {
        self.sent.get()
    }

    /// Hand-over pulls that ended with `outcome` so far.
    pub fn pulls(&self, outcome: Outcome) -> u64 {
        self.pulls
            .get_or_create(&ResultLabel {
                result: outcome.label(),
            })
            .get()
    }

    /// Batches that ended with `outcome` so far.
    pub fn batches(&self, outcome: Outcome) -> u64 {
        self.batches
            .get_or_create(&ResultLabel {
                result: outcome.label(),
            })
            .get()
    }
}
