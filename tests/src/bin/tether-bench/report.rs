//! The report: one human-readable line per figure as it is measured, and at the
//! end a single JSON object with every number and whether each target was met.

use serde_json::{Map, Value, json};

use crate::stats::round3;

/// How a target compares its figure.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Rule {
    AtLeast(f64),
    AtMost(f64),
    Equals(f64),
}

impl Rule {
    fn holds(self, x: f64) -> bool {
        match self {
            Rule::AtLeast(t) => x >= t,
            Rule::AtMost(t) => x <= t,
            Rule::Equals(t) => x == t,
        }
    }

    fn describe(self) -> String {
        match self {
            Rule::AtLeast(t) => format!(">= {t}"),
            Rule::AtMost(t) => format!("<= {t}"),
            Rule::Equals(t) => format!("== {t}"),
        }
    }
}

/// The targets the project holds the tunnel to.
pub(crate) const TARGETS: [(&str, Rule); 18] = [
    ("logs_throughput_ratio", Rule::AtLeast(0.6)),
    ("small_get_ratio_c64", Rule::AtLeast(0.5)),
    ("exec_rtt_p99_added_ms", Rule::AtMost(1.0)),
    ("stalled_reader_ratio", Rule::AtLeast(0.95)),
    ("concurrent_streams_ok", Rule::Equals(100.0)),
    ("front_p99_under_slowloris_ms", Rule::AtMost(1000.0)),
    ("idle_session_kib", Rule::AtMost(64.0)),
    ("iptables_sync_1000_ms", Rule::AtMost(500.0)),
    ("iptables_execs_one_change", Rule::AtMost(1.0)),
    ("edge_peak_rss_mib_100_streams", Rule::AtMost(64.0)),
    ("rss_after_load_ratio", Rule::AtMost(2.0)),
    ("wan_logs_ratio", Rule::AtLeast(0.8)),
    ("kubeedge_logs_ratio", Rule::AtLeast(0.5)),
    ("kubeedge_small_get_ratio_c64", Rule::AtLeast(0.5)),
    ("complete_edge_kib", Rule::AtMost(48.0)),
    ("storm_reconnect_s", Rule::AtMost(60.0)),
    ("storm_request_p99_ms", Rule::AtMost(1000.0)),
    ("hub_cross_replica_ok", Rule::Equals(1.0)),
];

/// Every number measured so far, by key.
#[derive(Default)]
pub(crate) struct Report {
    fields: Map<String, Value>,
}

impl Report {
    /// Stores a value as is.
    pub(crate) fn put(&mut self, key: &str, value: impl Into<Value>) {
        self.fields.insert(key.to_owned(), value.into());
    }

    /// Stores a measurement, rounded to three decimals.
    pub(crate) fn num(&mut self, key: &str, value: f64) {
        self.put(key, round3(value));
    }

    /// "met"/"missed" for `key` if it is a target and was measured, for the
    /// human-readable line.
    pub(crate) fn verdict(&self, key: &str) -> String {
        let Some((_, rule)) = TARGETS.iter().find(|(k, _)| *k == key) else {
            return String::new();
        };
        match self.fields.get(key).and_then(Value::as_f64) {
            Some(x) => format!(
                "target {}: {}",
                rule.describe(),
                if rule.holds(x) { "met" } else { "MISSED" }
            ),
            None => String::new(),
        }
    }

    /// The targets that were measured: (key, rule, value, met).
    pub(crate) fn targets(&self) -> Vec<(&'static str, String, f64, bool)> {
        TARGETS
            .iter()
            .filter_map(|(key, rule)| {
                let x = self.fields.get(*key)?.as_f64()?;
                Some((*key, rule.describe(), x, rule.holds(x)))
            })
            .collect()
    }

    /// All fields plus `targets: {key: {rule, met}}`.
    pub(crate) fn to_json(&self) -> Value {
        let mut all = self.fields.clone();
        let targets: Map<String, Value> = self
            .targets()
            .into_iter()
            .map(|(key, rule, _, met)| (key.to_owned(), json!({ "rule": rule, "met": met })))
            .collect();
        all.insert("targets".to_owned(), Value::Object(targets));
        Value::Object(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_only_for_measured_figures() {
        let mut r = Report::default();
        r.num("logs_throughput_ratio", 0.61234);
        r.put("concurrent_streams_ok", 99);
        let t = r.targets();
        assert_eq!(t.len(), 2);
        assert!(t[0].3, "0.612 >= 0.6");
        assert!(!t[1].3, "99 != 100");
        let j = r.to_json();
        assert_eq!(j["logs_throughput_ratio"], 0.612);
        assert_eq!(j["targets"]["concurrent_streams_ok"]["met"], false);
    }
}
