//! The cloud's metric families, updated by the front and the tunnel listener.
//! Every label comes from a small closed set, so series stay bounded however
//! many pods, paths or clients there are.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use tether_tunnel::TunnelEvent;

/// What a front request is for, a closed set.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum Kind {
    Logs,
    Exec,
    Attach,
    PortForward,
    Metrics,
    Stats,
    Connect,
    Other,
}

impl Kind {
    /// Classifies by the kubelet path (after any explicit `/tether/v1/nodes/`
    /// prefix) and method.
    pub(crate) fn of(method: &http::Method, path: &str) -> Self {
        if method == http::Method::CONNECT {
            return Self::Connect;
        }
        let path = crate::route::explicit_path(path)
            .map(|(_, _, p)| p)
            .unwrap_or_else(|| path.to_owned());
        let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
        match first {
            "containerLogs" => Self::Logs,
            "exec" | "run" => Self::Exec,
            "attach" => Self::Attach,
            "portForward" => Self::PortForward,
            "metrics" => Self::Metrics,
            "stats" => Self::Stats,
            _ => Self::Other,
        }
    }
}

impl EncodeLabelValue for Kind {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = match self {
            Self::Logs => "logs",
            Self::Exec => "exec",
            Self::Attach => "attach",
            Self::PortForward => "portforward",
            Self::Metrics => "metrics",
            Self::Stats => "stats",
            Self::Connect => "connect",
            Self::Other => "other",
        };
        EncodeLabelValue::encode(&s, encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kind: Kind,
    code_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: Kind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    kind: Kind,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Metric families of the cloud. Cheap to clone.
#[derive(Clone, Debug)]
pub struct CloudMetrics {
    sessions: Family<StateLabel, Gauge>,
    session_events: Family<EventLabel, Counter>,
    requests: Family<RequestLabels, Counter>,
    duration: Family<KindLabel, Histogram>,
    bytes: Family<BytesLabels, Counter>,
    auth_failures: Family<ReasonLabel, Counter>,
    rtt: Histogram,
    stalls: Family<KindLabel, Counter>,
    stall_seconds: Family<KindLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
    sessions_by_kind: Family<SessionKindLabel, Gauge>,
    kubeedge_refusals: Family<ReasonLabel, Counter>,
    kubeedge_streams_ended: Family<ReasonLabel, Counter>,
    window: tether_tunnel::WindowMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionKindLabel {
    kind: &'static str,
}

impl Default for CloudMetrics {
    fn default() -> Self {
        Self {
            sessions: Family::default(),
            session_events: Family::default(),
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 4.0, 10))
            }),
            bytes: Family::default(),
            auth_failures: Family::default(),
            rtt: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            stalls: Family::default(),
            stall_seconds: Family::default(),
            sessions_by_kind: Family::default(),
            kubeedge_refusals: Family::default(),
            kubeedge_streams_ended: Family::default(),
            window: tether_tunnel::WindowMetrics::default(),
        }
    }
}

impl CloudMetrics {
    /// Creates the families and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("tether_cloud");
        r.register(
            "sessions",
            "Edge tunnel sessions by state: active (serving new streams), draining (replaced, finishing its streams)",
            m.sessions.clone(),
        );
        for state in ["active", "draining"] {
            let _ = m.sessions.get_or_create(&StateLabel { state });
        }
        r.register(
            "session_events",
            "Tunnel session events: connected, replaced, disconnected_<reason> (closed, error, replaced, revoked, shutdown), refused_<reason> (refused_kubeedge: see kubeedge_refusals)",
            m.session_events.clone(),
        );
        r.register(
            "requests",
            "Front requests by kind and status code class",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from front request to response headers, by kind",
            m.duration.clone(),
        );
        r.register(
            "bytes",
            "Bytes carried by the front, by kind and direction (to_client, from_client)",
            m.bytes.clone(),
        );
        r.register(
            "auth_failures",
            "Front clients refused: tls (no or foreign certificate), forbidden (subject not allowed), busy (max_connections authenticated connections open)",
            m.auth_failures.clone(),
        );
        r.register(
            "tunnel_rtt_seconds",
            "Round trip of a probe through each tunnel session (cloud -> edge -> cloud)",
            m.rtt.clone(),
        );
        r.register(
            "flow_control_stalls",
            "Waits of 50 ms or more for a client to take the next chunk of a response body, by kind",
            m.stalls.clone(),
        );
        r.register(
            "flow_control_stall_seconds",
            "Time response bodies spent waiting for slow clients, by kind",
            m.stall_seconds.clone(),
        );
        r.register(
            "sessions_by_kind",
            "Registered edge sessions by protocol: tether (tether.v1) or kubeedge (EdgeStream)",
            m.sessions_by_kind.clone(),
        );
        for kind in ["tether", "kubeedge"] {
            let _ = m.sessions_by_kind.get_or_create(&SessionKindLabel { kind });
        }
        r.register(
            "kubeedge_refusals",
            "KubeEdge edges refused after the upgrade, by reason: node_mismatch, legacy_cert, not_a_node, untrusted_ca, revoked, bad_node_name, bad_upgrade",
            m.kubeedge_refusals.clone(),
        );
        r.register(
            "kubeedge_streams_ended",
            "KubeEdge streams the cloud ended or refused, by reason: client_stalled, session_budget, response_timeout, bad_input, unknown_connection, unsupported",
            m.kubeedge_streams_ended.clone(),
        );
        m.window.register(r);
        m
    }

    /// The stream-window families of the tunnel sessions (ADR 0020).
    pub fn window(&self) -> tether_tunnel::WindowMetrics {
        self.window.clone()
    }

    /// Counts a stream's flow-control stalls under `kind`.
    pub(crate) fn stall_hook(&self, kind: Kind) -> tether_tunnel::StallHook {
        let count = self.stalls.get_or_create(&KindLabel { kind }).clone();
        let seconds = self
            .stall_seconds
            .get_or_create(&KindLabel { kind })
            .clone();
        std::sync::Arc::new(move |d: std::time::Duration| {
            count.inc();
            seconds.inc_by(d.as_secs_f64());
        })
    }

    pub(crate) fn rtt(&self, seconds: f64) {
        self.rtt.observe(seconds);
    }

    pub(crate) fn tunnel_event(&self, ev: &TunnelEvent<'_>) {
        let event = match ev {
            TunnelEvent::Connected { replaced, info } => {
                self.sessions_by_kind
                    .get_or_create(&SessionKindLabel {
                        kind: info.kind.label(),
                    })
                    .inc();
                self.session_state("active").inc();
                if *replaced {
                    // The old session drains; it emits its own Disconnected
                    // (reason "replaced") when its streams are done.
                    self.session_state("active").dec();
                    self.session_state("draining").inc();
                    "replaced"
                } else {
                    "connected"
                }
            }
            TunnelEvent::Disconnected { reason, info } => {
                self.sessions_by_kind
                    .get_or_create(&SessionKindLabel {
                        kind: info.kind.label(),
                    })
                    .dec();
                let state = if *reason == "replaced" {
                    "draining"
                } else {
                    "active"
                };
                self.session_state(state).dec();
                match *reason {
                    "closed" => "disconnected_closed",
                    "replaced" => "disconnected_replaced",
                    "revoked" => "disconnected_revoked",
                    "shutdown" => "disconnected_shutdown",
                    _ => "disconnected_error",
                }
            }
            TunnelEvent::StreamEnded { reason, .. } => {
                self.kubeedge_streams_ended
                    .get_or_create(&ReasonLabel { reason })
                    .inc();
                return;
            }
            TunnelEvent::Refused(tether_tunnel::AcceptError::KubeEdge(r)) => {
                self.kubeedge_refusals
                    .get_or_create(&ReasonLabel { reason: r.label() })
                    .inc();
                "refused_kubeedge"
            }
            TunnelEvent::Refused(e) => match e.label() {
                "timeout" => "refused_timeout",
                "tls" => "refused_tls",
                "identity" => "refused_identity",
                "websocket" => "refused_websocket",
                _ => "refused_session",
            },
        };
        self.session_events
            .get_or_create(&EventLabel { event })
            .inc();
    }

    fn session_state(&self, state: &'static str) -> Gauge {
        self.sessions.get_or_create(&StateLabel { state }).clone()
    }

    pub(crate) fn request(&self, kind: Kind, code: u16, seconds: f64) {
        let code_class = match code / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        };
        self.requests
            .get_or_create(&RequestLabels { kind, code_class })
            .inc();
        self.duration
            .get_or_create(&KindLabel { kind })
            .observe(seconds);
    }

    /// A counter for bytes of `kind` in `direction`, to hand to a body or splice.
    pub(crate) fn bytes(&self, kind: Kind, direction: &'static str) -> Counter {
        self.bytes
            .get_or_create(&BytesLabels { kind, direction })
            .clone()
    }

    pub(crate) fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_from_paths() {
        let get = http::Method::GET;
        assert_eq!(Kind::of(&get, "/containerLogs/ns/p/c"), Kind::Logs);
        assert_eq!(Kind::of(&http::Method::POST, "/exec/ns/p/c"), Kind::Exec);
        assert_eq!(Kind::of(&get, "/portForward/ns/p"), Kind::PortForward);
        assert_eq!(
            Kind::of(&get, "/tether/v1/nodes/n/kubelet/metrics/cadvisor"),
            Kind::Metrics
        );
        assert_eq!(Kind::of(&get, "/stats/summary"), Kind::Stats);
        assert_eq!(Kind::of(&get, "/pods"), Kind::Other);
        assert_eq!(
            Kind::of(&http::Method::CONNECT, "10.0.0.1:10250"),
            Kind::Connect
        );
    }
}
