//! Fan-out of what channels deliver to the application's subscriptions,
//! filtered by peer, route group and resource prefix. Every subscription is
//! bounded; one that stops reading is dropped after a timeout instead of
//! stalling everyone else.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::warn;

use crate::channel::Delivery;
use crate::message::{Message, Route};
use crate::metrics::HubMetrics;

/// What subscribers receive.
#[derive(Debug, Clone)]
pub enum Event {
    /// A message from a peer.
    Message {
        /// The peer: the node on the cloud, `cloud` on the edge.
        peer: Arc<str>,
        /// The message.
        message: Message,
    },
    /// A message to a peer given up after its retry budget.
    Failed {
        /// The peer.
        peer: Arc<str>,
        /// The message id.
        msg_id: String,
        /// Its route.
        route: Route,
        /// Sends attempted.
        attempts: u32,
    },
    /// The peer's channel came up.
    Online {
        /// The peer.
        peer: Arc<str>,
    },
    /// The peer's channel went down.
    Offline {
        /// The peer.
        peer: Arc<str>,
    },
}

impl Event {
    /// The JSON object an HTTP subscription streams, one per line.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Self::Message { peer, message } => serde_json::json!({
                "peer": &**peer,
                "message": serde_json::from_slice::<serde_json::Value>(&message.to_json())
                    .expect("messages serialize to JSON"),
            }),
            Self::Failed {
                peer,
                msg_id,
                route,
                attempts,
            } => serde_json::json!({
                "peer": &**peer, "event": "failed", "msg_id": msg_id,
                "route": route, "attempts": attempts,
            }),
            Self::Online { peer } => serde_json::json!({"peer": &**peer, "event": "online"}),
            Self::Offline { peer } => serde_json::json!({"peer": &**peer, "event": "offline"}),
        }
    }
}

impl From<Delivery> for Event {
    fn from(d: Delivery) -> Self {
        match d {
            Delivery::Message { peer, message } => Self::Message { peer, message },
            Delivery::Failed {
                peer,
                msg_id,
                route,
                attempts,
            } => Self::Failed {
                peer,
                msg_id,
                route,
                attempts,
            },
        }
    }
}

/// Which events a subscription wants; unset fields match everything.
/// Online/offline events match on the peer only.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this peer.
    pub peer: Option<String>,
    /// Only this route group.
    pub group: Option<String>,
    /// Only resources starting with this.
    pub resource_prefix: Option<String>,
}

impl Filter {
    fn matches_message(&self, peer: &str, m: &Message) -> bool {
        self.peer.as_deref().is_none_or(|p| p == peer)
            && self.group.as_deref().is_none_or(|g| g == m.route.group)
            && self
                .resource_prefix
                .as_deref()
                .is_none_or(|p| m.route.resource.starts_with(p))
    }

    fn matches(&self, ev: &Event) -> bool {
        let (peer, route) = match ev {
            Event::Message { peer, message } => (peer, Some(&message.route)),
            Event::Failed { peer, route, .. } => (peer, Some(route)),
            Event::Online { peer } | Event::Offline { peer } => (peer, None),
        };
        if self.peer.as_deref().is_some_and(|p| p != &**peer) {
            return false;
        }
        route.is_none_or(|r| {
            self.group.as_deref().is_none_or(|g| g == r.group)
                && self
                    .resource_prefix
                    .as_deref()
                    .is_none_or(|p| r.resource.starts_with(p))
        })
    }
}

/// The subscription limit is reached.
#[derive(Debug, thiserror::Error)]
#[error("too many subscribers ({0})")]
pub struct TooManySubscribers(pub usize);

struct Subscriber {
    filter: Filter,
    tx: mpsc::Sender<Event>,
}

/// Subscriptions and the task feeding them. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
    max_subscribers: usize,
    events: mpsc::Sender<Event>,
}

/// Events a subscription buffers before it counts as not reading.
const SUBSCRIPTION_BUFFER: usize = 1024;

impl Dispatcher {
    /// Starts the dispatch task. Returns the dispatcher and the sender the
    /// channels deliver into (bounded: a slow fan-out slows the channels).
    pub fn start(
        max_subscribers: usize,
        subscriber_timeout: Duration,
        metrics: HubMetrics,
    ) -> (Self, mpsc::Sender<Delivery>) {
        let (deliveries, deliveries_rx) = mpsc::channel(1024);
        let (events, events_rx) = mpsc::channel(1024);
        let this = Self {
            subscribers: Arc::new(Mutex::new(Vec::new())),
            max_subscribers,
            events,
        };
        tokio::spawn(
            this.clone()
                .run(deliveries_rx, events_rx, subscriber_timeout, metrics),
        );
        (this, deliveries)
    }

    /// Publishes a peer event (online, offline) to subscribers.
    pub async fn announce(&self, ev: Event) {
        let _ = self.events.send(ev).await;
    }

    /// Whether a live subscription takes `message` from `peer`.
    pub fn accepts(&self, peer: &str, message: &Message) -> bool {
        let subs = self.subscribers.lock().expect("subscribers lock");
        subs.iter()
            .any(|s| !s.tx.is_closed() && s.filter.matches_message(peer, message))
    }

    /// A new subscription.
    pub fn subscribe(&self, filter: Filter) -> Result<mpsc::Receiver<Event>, TooManySubscribers> {
        let mut subs = self.subscribers.lock().expect("subscribers lock");
        subs.retain(|s| !s.tx.is_closed());
        if subs.len() >= self.max_subscribers {
            return Err(TooManySubscribers(self.max_subscribers));
        }
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_BUFFER);
        subs.push(Subscriber { filter, tx });
        Ok(rx)
    }

    async fn run(
        self,
        mut deliveries: mpsc::Receiver<Delivery>,
        mut events: mpsc::Receiver<Event>,
        timeout: Duration,
        metrics: HubMetrics,
    ) {
        loop {
            let ev: Event = tokio::select! {
                d = deliveries.recv() => match d {
                    Some(d) => d.into(),
                    None => return,
                },
                e = events.recv() => match e {
                    Some(e) => e,
                    None => return,
                },
            };
            let targets: Vec<mpsc::Sender<Event>> = {
                let subs = self.subscribers.lock().expect("subscribers lock");
                subs.iter()
                    .filter(|s| s.filter.matches(&ev))
                    .map(|s| s.tx.clone())
                    .collect()
            };
            if targets.is_empty() && matches!(ev, Event::Message { .. }) {
                metrics.drop("no_subscriber");
            }
            for tx in targets {
                if tokio::time::timeout(timeout, tx.send(ev.clone()))
                    .await
                    .is_err()
                {
                    warn!("hub subscriber not reading for {timeout:?}; dropping it");
                    let mut subs = self.subscribers.lock().expect("subscribers lock");
                    subs.retain(|s| !s.tx.same_channel(&tx));
                }
            }
        }
    }
}
