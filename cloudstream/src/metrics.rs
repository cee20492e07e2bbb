//! The cloud's metric families, updated by the front and the tunnel listener.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use tether_tunnel::TunnelEvent;

/// Request kinds, a closed set.
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
struct RequestLabels {
    kind: Kind,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: Kind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

/// Metric families of the cloud. Cheap to clone.
#[derive(Clone, Debug)]
pub struct CloudMetrics {
    sessions: Gauge,
    session_events: Family<EventLabel, Counter>,
    requests: Family<RequestLabels, Counter>,
    duration: Family<KindLabel, Histogram>,
}

impl Default for CloudMetrics {
    fn default() -> Self {
        Self {
            sessions: Gauge::default(),
            session_events: Family::default(),
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 4.0, 10))
            }),
        }
    }
}

impl CloudMetrics {
    /// Creates the families and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("tether_cloud");
        r.register("sessions", "Live edge tunnel sessions", m.sessions.clone());
        r.register(
            "session_events",
            "Tunnel session events: connected, replaced, disconnected, refused_<reason>",
            m.session_events.clone(),
        );
        r.register(
            "requests",
            "Front requests by kind and status code (codes come from a small fixed set)",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from front request to response headers",
            m.duration.clone(),
        );
        m
    }

    pub(crate) fn tunnel_event(&self, ev: &TunnelEvent<'_>) {
        let event = match ev {
            TunnelEvent::Connected { replaced, .. } => {
                // A replaced session still emits its own Disconnected later.
                self.sessions.inc();
                if *replaced { "replaced" } else { "connected" }
            }
            TunnelEvent::Disconnected(_) => {
                self.sessions.dec();
                "disconnected"
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

    pub(crate) fn request(&self, kind: Kind, code: u16, seconds: f64) {
        // Bound the label set: unusual codes fold into their class's x00.
        let code = match code {
            101 | 200 | 201 | 204 | 206 | 301 | 302 | 304 | 400 | 401 | 403 | 404 | 409 | 429
            | 500 | 502 | 503 | 504 => code,
            c => c / 100 * 100,
        };
        self.requests
            .get_or_create(&RequestLabels {
                kind: kind.clone(),
                code,
            })
            .inc();
        self.duration
            .get_or_create(&KindLabel { kind })
            .observe(seconds);
    }
}
