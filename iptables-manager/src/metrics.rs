//! The iptables-manager's metric families.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Metric families of the manager. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct ManagerMetrics {
    syncs: Family<ResultLabel, Counter>,
    rules: Gauge,
    drift_repairs: Counter,
    record_errors: Counter,
}

impl ManagerMetrics {
    /// Creates the families and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("tether_iptables");
        r.register(
            "syncs",
            "Sync transactions by result (ok, or the failure cause)",
            m.syncs.clone(),
        );
        r.register("rules", "DNAT rules Tether currently owns", m.rules.clone());
        r.register(
            "drift_repairs",
            "Syncs that restored rules changed or deleted by someone else",
            m.drift_repairs.clone(),
        );
        r.register(
            "record_errors",
            "Record versions refused as malformed, conflicting or unreadable",
            m.record_errors.clone(),
        );
        m
    }

    pub(crate) fn sync(&self, result: &'static str) {
        self.syncs.get_or_create(&ResultLabel { result }).inc();
    }

    pub(crate) fn rules(&self, n: usize) {
        self.rules.set(n as i64);
    }

    pub(crate) fn drift_repaired(&self) {
        self.drift_repairs.inc();
    }

    pub(crate) fn record_error(&self) {
        self.record_errors.inc();
    }
}
