//! One reliable, ordered, de-duplicated message channel to one peer, over
//! whatever byte stream the current connection provides.
//!
//! Sending: a published message is stored durably, queued, and sent; it
//! stays queued until the peer acknowledges it. Each new connection resends
//! every unacknowledged message in order, then continues. An ack that does
//! not come within the ack timeout (doubling per attempt) resends from the
//! oldest unacknowledged message. After `max_attempts` sends a message is
//! reported failed to the application, never dropped silently.
//!
//! Receiving: a message is acknowledged once handed to the application. Its
//! id is remembered (bounded, persisted), so a resend is acknowledged again
//! but not delivered twice. A message with an older numeric
//! `resourceversion` than one already delivered for the same resource is
//! dropped and counted. Since a connection is an ordered byte stream and
//! resends go out in order, the application sees each peer's messages once,
//! in publish order.
//!
//! Liveness: each side sends a keepalive every `keepalive_interval`; a
//! connection on which nothing arrives for `keepalive_timeout` is dead.
//!
//! The code is laid out by concern: `config` and `error` hold the public
//! bounds and refusals; `state` the per-peer state behind the lock;
//! `publish` the application's side of sending (publish, batches, sync
//! requests); `connection` serves one connection by running `receive` (the
//! reader: acks, defers, de-duplication, delivery) against `send` (the
//! writer: window, resends, keepalives); `persist` records acks and
//! delivered ids off the connection's path; `frame` is the wire framing;
//! `relay` hands the queue to another cloud replica that holds the peer.

mod config;
mod connection;
mod error;
mod frame;
mod persist;
mod publish;
mod receive;
mod relay;
mod send;
mod state;
#[cfg(test)]
mod tests;

pub use config::ChannelConfig;
pub use error::{ConnectionEnd, PublishError, RequestError};
pub use frame::{read_raw_frame, write_raw_frame};
pub use relay::Relayed;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::warn;

use crate::message::{Message, Route};
use crate::metrics::HubMetrics;
use crate::store::{Store, StoreError};

use persist::{Persist, persister};
use state::{Bounded, Bucket, Pending, State};

/// What the channel hands to the application.
#[derive(Debug)]
pub enum Delivery {
    /// A message from the peer.
    Message {
        /// The peer (node name on the cloud, `cloud` on the edge).
        peer: Arc<str>,
        /// The message.
        message: Message,
    },
    /// A message to the peer that was given up after its retry budget.
    Failed {
        /// The peer.
        peer: Arc<str>,
        /// The failed message's id.
        msg_id: String,
        /// Its route.
        route: Route,
        /// Sends attempted.
        attempts: u32,
    },
}

/// The channel to one peer. Cheap to clone.
#[derive(Clone)]
pub struct Channel {
    inner: Arc<Inner>,
}

struct Inner {
    peer: Arc<str>,
    queue: String,
    cfg: ChannelConfig,
    store: Store,
    metrics: HubMetrics,
    state: Mutex<State>,
    wake: Notify,
    deliver: mpsc::Sender<Delivery>,
    accepts: Accepts,
    /// The persister's queue while one runs: started by the first thing to
    /// record and ended after a quiet spell, so an idle channel (nearly all
    /// of them) holds neither a task nor a queue.
    persist: Mutex<Option<mpsc::Sender<Persist>>>,
    /// Called on every new connection, which holds its data frames for up
    /// to the duration until [`Channel::release_hold`] (several replicas).
    on_connect: std::sync::OnceLock<(ConnectHook, std::time::Duration)>,
}

/// Told when a new connection of the channel starts (see
/// [`Channel::on_connect`]).
pub type ConnectHook = Arc<dyn Fn(&Channel) + Send + Sync>;

/// Whether the application takes a message now (a subscriber matches).
pub type Accepts = Arc<dyn Fn(&Message) -> bool + Send + Sync>;

impl Channel {
    /// Opens the channel to `peer`, reloading its unacknowledged messages
    /// from queue `queue` of `store` and the ids it already delivered.
    /// Deliveries go to `deliver` (bounded: a slow application slows the
    /// peer down, it loses nothing).
    pub fn open(
        peer: &str,
        queue: &str,
        cfg: ChannelConfig,
        store: Store,
        metrics: HubMetrics,
        deliver: mpsc::Sender<Delivery>,
        accepts: Accepts,
    ) -> Result<Self, StoreError> {
        let mut pending = VecDeque::new();
        let mut next_seq = 1;
        for (seq, frame) in store.load(queue)? {
            next_seq = seq + 1;
            match Message::from_json(&frame, usize::MAX) {
                Ok(m) => pending.push_back(Pending {
                    seq,
                    id: m.header.msg_id,
                    route: m.route,
                    frame: frame.into(),
                    attempts: 0,
                    sent_at: None,
                    due: None,
                    relayed: false,
                }),
                Err(e) => warn!(peer, seq, error = %e, "unreadable stored message skipped"),
            }
        }
        let mut seen = Bounded::new(cfg.seen_limit);
        for id in store.load_seen(peer)? {
            seen.insert(id);
        }
        metrics.queue_depth.inc_by(pending.len() as i64);
        let bucket = cfg.rate.map(|(qps, burst)| Bucket {
            qps,
            burst,
            tokens: burst,
            at: Instant::now(),
        });
        let inner = Arc::new(Inner {
            peer: peer.into(),
            queue: queue.to_owned(),
            store: store.clone(),
            metrics,
            state: Mutex::new(State {
                pending,
                in_flight: 0,
                reserved: 0,
                next_seq,
                generation: 0,
                connected: false,
                seen,
                versions: HashMap::new(),
                version_order: VecDeque::new(),
                waiters: HashMap::new(),
                bucket,
                recently_acked: Bounded::new(4096),
                recently_relayed: Bounded::new(4096),
                barriers: HashSet::new(),
                rewind: false,
                hold_until: None,
            }),
            wake: Notify::new(),
            deliver,
            accepts,
            persist: Mutex::new(None),
            on_connect: std::sync::OnceLock::new(),
            cfg,
        });
        Ok(Self { inner })
    }

    /// The peer's name.
    pub fn peer(&self) -> &str {
        &self.inner.peer
    }

    /// Messages accepted and not yet acknowledged.
    pub fn queued(&self) -> usize {
        self.lock().pending.len()
    }

    /// True while a connection is being served.
    pub fn is_connected(&self) -> bool {
        self.lock().connected
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().expect("channel lock")
    }
}

impl Inner {
    /// Hands `p` to the persister, starting one if none runs. Waits while
    /// the persister's queue is full: bounded backpressure, no task pile.
    async fn persist(self: &Arc<Self>, mut p: Persist) {
        // A persister that ended its quiet spell just now refuses `p`; the
        // next one takes it. Two tries always suffice: a new persister
        // stays at least its idle period.
        for _ in 0..2 {
            let tx = self.persister();
            match tx.send(p).await {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => p = back,
            }
        }
        warn!(peer = %self.peer, "persister unavailable; a delivery record is lost (a resend is still dropped by the peer)");
    }

    fn persister(self: &Arc<Self>) -> mpsc::Sender<Persist> {
        let mut slot = self.persist.lock().expect("persist lock");
        if let Some(tx) = slot.as_ref().filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(4096);
        let run = persister(
            self.store.clone(),
            self.queue.clone(),
            self.peer.to_string(),
            self.cfg.seen_limit,
            rx,
        );
        let channel = Arc::downgrade(self);
        tokio::spawn(async move {
            run.await;
            // Ended after its quiet spell: let its queue go too, unless a
            // newer persister already took the slot.
            if let Some(inner) = channel.upgrade() {
                let mut slot = inner.persist.lock().expect("persist lock");
                if slot.as_ref().is_some_and(mpsc::Sender::is_closed) {
                    *slot = None;
                }
            }
        });
        *slot = Some(tx.clone());
        tx
    }
}
