//! The edge agent's metric families.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use tether_tunnel::DialError;

/// Stream kinds, a closed set.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) enum Kind {
    Http,
    Upgrade,
    Connect,
}

impl EncodeLabelValue for Kind {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = match self {
            Self::Http => "http",
            Self::Upgrade => "upgrade",
            Self::Connect => "connect",
        };
        EncodeLabelValue::encode(&s, encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabel {
    pub(crate) kind: Kind,
}

/// Which deadline towards a local endpoint passed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum Phase {
    /// TCP connect (and TLS to an `https://` kubelet).
    Connect,
    /// Waiting for the response head while the request was sent.
    ResponseHeaders,
}

impl EncodeLabelValue for Phase {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = match self {
            Self::Connect => "connect",
            Self::ResponseHeaders => "response_headers",
        };
        EncodeLabelValue::encode(&s, encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TimeoutLabel {
    kind: Kind,
    phase: Phase,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// The agent's session states, for `tether_edge_session_state`.
pub(crate) const STATES: [&str; 3] = ["connecting", "connected", "backoff"];

/// Metric families of the edge agent. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct EdgeMetrics {
    streams: Family<KindLabel, Counter>,
    refused: Family<KindLabel, Counter>,
    local_errors: Family<KindLabel, Counter>,
    local_timeouts: Family<TimeoutLabel, Counter>,
    dial_failures: Family<ReasonLabel, Counter>,
    connected: Gauge,
    cert_expiry: Gauge,
    state: Family<StateLabel, Gauge>,
    disconnects: Family<ReasonLabel, Counter>,
    stalls: Family<KindLabel, Counter>,
    stall_seconds: Family<KindLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
}

impl EdgeMetrics {
    /// Creates the families and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("tether_edge");
        r.register(
            "streams",
            "Tunnel streams served, by kind",
            m.streams.clone(),
        );
        r.register(
            "refused_targets",
            "Streams refused because the target is not the kubelet or allow-listed",
            m.refused.clone(),
        );
        r.register(
            "local_errors",
            "Streams that failed reaching the local kubelet or endpoint",
            m.local_errors.clone(),
        );
        r.register(
            "local_timeouts",
            "Streams answered 504 because the local kubelet or endpoint passed a deadline, by kind and phase (connect, response_headers)",
            m.local_timeouts.clone(),
        );
        r.register(
            "dial_failures",
            "Failed tunnel dials, by reason",
            m.dial_failures.clone(),
        );
        r.register(
            "connected",
            "1 while the tunnel to the cloud is up",
            m.connected.clone(),
        );
        r.register(
            "certificate_expiry_timestamp_seconds",
            "When the node certificate in use expires (Unix time; 0 for file-based certificates)",
            m.cert_expiry.clone(),
        );
        r.register(
            "session_state",
            "1 for the state the tunnel session is in: connecting, connected, backoff",
            m.state.clone(),
        );
        r.register(
            "disconnects",
            "Tunnel sessions ended, by reason: closed_by_cloud, lost, certificate_renewed, shutdown",
            m.disconnects.clone(),
        );
        r.register(
            "flow_control_stalls",
            "Waits of 50 ms or more for tunnel window to send the next chunk of a response, by kind",
            m.stalls.clone(),
        );
        r.register(
            "flow_control_stall_seconds",
            "Time response bodies waited for tunnel window, by kind",
            m.stall_seconds.clone(),
        );
        m.set_state("connecting");
        for reason in ["closed_by_cloud", "lost", "certificate_renewed", "shutdown"] {
            let _ = m.disconnects.get_or_create(&ReasonLabel { reason });
        }
        m
    }

    /// Marks `state` (one of [`STATES`]) as the current one.
    pub(crate) fn set_state(&self, state: &'static str) {
        for s in STATES {
            self.state
                .get_or_create(&StateLabel { state: s })
                .set(i64::from(s == state));
        }
    }

    pub(crate) fn disconnected(&self, reason: &'static str) {
        self.disconnects
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a stream's flow-control stalls under `kind`.
    pub(crate) fn stall_hook(&self, kind: Kind) -> tether_tunnel::StallHook {
        let count = self
            .stalls
            .get_or_create(&KindLabel { kind: kind.clone() })
            .clone();
        let seconds = self
            .stall_seconds
            .get_or_create(&KindLabel { kind })
            .clone();
        std::sync::Arc::new(move |d: std::time::Duration| {
            count.inc();
            seconds.inc_by(d.as_secs_f64());
        })
    }

    pub(crate) fn stream(&self, kind: Kind) {
        self.streams.get_or_create(&KindLabel { kind }).inc();
    }

    pub(crate) fn refused(&self, kind: Kind) {
        self.refused.get_or_create(&KindLabel { kind }).inc();
    }

    pub(crate) fn local_error(&self, kind: Kind) {
        self.local_errors.get_or_create(&KindLabel { kind }).inc();
    }

    pub(crate) fn local_timeout(&self, kind: Kind, phase: Phase) {
        self.local_timeouts
            .get_or_create(&TimeoutLabel { kind, phase })
            .inc();
    }

    /// Streams answered 504 for a local deadline so far (all kinds and phases).
    pub fn local_timeouts_total(&self) -> u64 {
        let mut n = 0;
        for kind in [Kind::Http, Kind::Upgrade, Kind::Connect] {
            for phase in [Phase::Connect, Phase::ResponseHeaders] {
                n += self
                    .local_timeouts
                    .get_or_create(&TimeoutLabel {
                        kind: kind.clone(),
                        phase,
                    })
                    .get();
            }
        }
        n
    }

    /// Refused targets so far (all kinds).
    pub fn refused_total(&self) -> u64 {
        [Kind::Http, Kind::Upgrade, Kind::Connect]
            .into_iter()
            .map(|kind| self.refused.get_or_create(&KindLabel { kind }).get())
            .sum()
    }

    pub(crate) fn dial_failed(&self, e: &DialError) {
        let reason = match e {
            DialError::Timeout(_) => "timeout",
            DialError::Connect { .. } => "connect",
            DialError::Tls(_) => "tls",
            DialError::Refused { .. } => "refused",
            DialError::WebSocket(_) => "websocket",
            DialError::Config(_) => "config",
        };
        self.dial_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Records the expiry of the certificate in use (Unix seconds).
    pub fn certificate_expires(&self, unix: i64) {
        self.cert_expiry.set(unix);
    }

    /// True while the tunnel is up (readiness).
    pub fn is_connected(&self) -> bool {
        self.connected.get() == 1
    }

    pub(crate) fn connected(&self, up: bool) {
        self.connected.set(i64::from(up));
    }
}
