//! The per-peer state every part of a channel shares under one lock: the
//! queue of unacknowledged messages and how much of it is in flight, the
//! delivered ids and resource versions that de-duplicate and order what
//! arrives, sync-request waiters, the publish rate bucket and the deferral
//! barriers. Plus the two small containers it is built from.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::message::{Message, Route};

/// A message accepted and not yet acknowledged by the peer.
pub(super) struct Pending {
    pub(super) seq: u64,
    pub(super) id: String,
    pub(super) route: Route,
    pub(super) frame: Bytes,
    pub(super) attempts: u32,
    pub(super) sent_at: Option<Instant>,
    /// When to resend if not acknowledged.
    pub(super) due: Option<Instant>,
    /// Handed over by another cloud replica: it was accepted there before
    /// anything queued here and not yet sent, so it goes out first.
    pub(super) relayed: bool,
}

/// Everything about the peer that changes, behind the channel's lock.
pub(super) struct State {
    pub(super) pending: VecDeque<Pending>,
    /// `pending[..in_flight]` went out on the current connection.
    pub(super) in_flight: usize,
    pub(super) reserved: usize,
    pub(super) next_seq: u64,
    pub(super) generation: u64,
    pub(super) connected: bool,
    pub(super) seen: Bounded<String>,
    pub(super) versions: HashMap<String, u64>,
    pub(super) version_order: VecDeque<String>,
    pub(super) waiters: HashMap<String, oneshot::Sender<Message>>,
    pub(super) bucket: Option<Bucket>,
    /// Ids acknowledged lately: a resend makes the peer ack again.
    pub(super) recently_acked: Bounded<String>,
    /// Ids lately handed to another replica: a connection's late ack of
    /// one is no error. Kept apart from `recently_acked`, which a relay
    /// coming back must not match (the message was not delivered here).
    pub(super) recently_relayed: Bounded<String>,
    /// Resources with a deferred message in the peer's current pass: later
    /// messages of theirs are deferred too, so that nothing overtakes the
    /// deferred one. Cleared when the peer rewinds (resends from its oldest
    /// unacknowledged message) and on every new connection. At most one
    /// entry per message in flight, so bounded by the peer's window.
    pub(super) barriers: HashSet<String>,
    /// Send a `rewind` before the next data frame (after a go-back).
    pub(super) rewind: bool,
    /// No data frames before this (a new connection waits while older
    /// queues are pulled from other replicas); None when not held.
    pub(super) hold_until: Option<Instant>,
}

/// A set remembering the newest `cap` items.
pub(super) struct Bounded<T> {
    pub(super) set: HashSet<T>,
    order: VecDeque<T>,
    cap: usize,
}

impl<T: std::hash::Hash + Eq + Clone> Bounded<T> {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    pub(super) fn insert(&mut self, t: T) {
        if self.set.insert(t.clone()) {
            self.order.push_back(t);
            if self.order.len() > self.cap
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }
}

/// The token bucket of the publish rate limit.
pub(super) struct Bucket {
    pub(super) qps: f64,
    pub(super) burst: f64,
    pub(super) tokens: f64,
    pub(super) at: Instant,
}

impl Bucket {
    pub(super) fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.qps).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
