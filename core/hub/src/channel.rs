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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::message::{BadMessage, Content, Message, Route};
use crate::metrics::HubMetrics;
use crate::store::{Store, StoreError};

/// Bounds and timers of a channel.
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// Largest encoded message (default 1 MiB).
    pub max_message: usize,
    /// Messages accepted and not yet acknowledged, per peer (default 10,000).
    pub queue_capacity: usize,
    /// Messages sent and not yet acknowledged on one connection (default 256).
    pub window: usize,
    /// First ack timeout; doubles per attempt up to 8x (default 10 s).
    pub ack_timeout: Duration,
    /// Sends of one message before it is reported failed (default 10).
    pub max_attempts: u32,
    /// Keepalive period (default 10 s).
    pub keepalive_interval: Duration,
    /// Silence after which the peer is dead (default 30 s).
    pub keepalive_timeout: Duration,
    /// Received message ids remembered per peer (default 65,536).
    pub seen_limit: usize,
    /// Resources whose last resourceversion is remembered (default 65,536).
    pub version_limit: usize,
    /// Publishes per second per peer, and burst (default off).
    pub rate: Option<(f64, f64)>,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            max_message: 1 << 20,
            queue_capacity: 10_000,
            window: 256,
            ack_timeout: Duration::from_secs(10),
            max_attempts: 10,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(30),
            seen_limit: 65_536,
            version_limit: 65_536,
            rate: None,
        }
    }
}

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

/// A publish that was refused. Nothing was queued.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The message is invalid.
    #[error(transparent)]
    Bad(#[from] BadMessage),
    /// The peer's queue is full.
    #[error("queue full for {peer}: {capacity} messages await acknowledgement")]
    QueueFull {
        /// The peer.
        peer: String,
        /// The bound.
        capacity: usize,
    },
    /// More than the allowed publishes per second.
    #[error("rate limit exceeded for {peer}: {qps} messages/s, burst {burst}")]
    RateLimited {
        /// The peer.
        peer: String,
        /// Sustained rate.
        qps: f64,
        /// Burst.
        burst: f64,
    },
    /// The durable store failed; the message was not accepted.
    #[error("message store: {0}")]
    Store(#[from] StoreError),
}

/// A sync request that got no response.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Refused at publish.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// No response in time. The request may still be delivered.
    #[error("no response to {msg_id} within {timeout:?}")]
    Timeout {
        /// The request id.
        msg_id: String,
        /// The wait.
        timeout: Duration,
    },
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionEnd {
    /// The byte stream failed or closed.
    #[error("connection lost: {0}")]
    Io(#[from] std::io::Error),
    /// Nothing arrived within the keepalive timeout.
    #[error("peer silent for {0:?}; presumed dead")]
    PeerDead(Duration),
    /// The peer sent a frame length beyond any sane bound.
    #[error("peer sent a {0}-byte frame; protocol error")]
    Protocol(usize),
    /// A newer connection of the same peer took over.
    #[error("replaced by a newer connection")]
    Replaced,
    /// This side is shutting down.
    #[error("shutting down")]
    Shutdown,
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
    persist: mpsc::Sender<Persist>,
}

/// Whether the application takes a message now (a subscriber matches).
pub type Accepts = Arc<dyn Fn(&Message) -> bool + Send + Sync>;

struct Pending {
    seq: u64,
    id: String,
    route: Route,
    frame: Bytes,
    attempts: u32,
    sent_at: Option<Instant>,
    /// When to resend if not acknowledged.
    due: Option<Instant>,
}

struct State {
    pending: VecDeque<Pending>,
    /// `pending[..in_flight]` went out on the current connection.
    in_flight: usize,
    reserved: usize,
    next_seq: u64,
    generation: u64,
    connected: bool,
    seen: Bounded<String>,
    versions: HashMap<String, u64>,
    version_order: VecDeque<String>,
    waiters: HashMap<String, oneshot::Sender<Message>>,
    bucket: Option<Bucket>,
    /// Ids acknowledged lately: a resend makes the peer ack again.
    recently_acked: Bounded<String>,
    /// Resources with a deferred message in the peer's current pass: later
    /// messages of theirs are deferred too, so that nothing overtakes the
    /// deferred one. Cleared when the peer rewinds (resends from its oldest
    /// unacknowledged message) and on every new connection. At most one
    /// entry per message in flight, so bounded by the peer's window.
    barriers: HashSet<String>,
    /// Send a `rewind` before the next data frame (after a go-back).
    rewind: bool,
}

enum Persist {
    Seen(String),
    Acked(u64),
}

/// A set remembering the newest `cap` items.
struct Bounded<T> {
    set: HashSet<T>,
    order: VecDeque<T>,
    cap: usize,
}

impl<T: std::hash::Hash + Eq + Clone> Bounded<T> {
    fn new(cap: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    fn insert(&mut self, t: T) {
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

struct Bucket {
    qps: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
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

/// First wait before offering a deferred message again.
const DEFER_WAIT: Duration = Duration::from_millis(250);

/// Frames beyond this many times `max_message` end the connection instead
/// of being skipped.
const SKIP_LIMIT_FACTOR: usize = 16;

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
                }),
                Err(e) => warn!(peer, seq, error = %e, "unreadable stored message skipped"),
            }
        }
        let mut seen = Bounded::new(cfg.seen_limit);
        for id in store.load_seen(peer)? {
            seen.insert(id);
        }
        metrics.queue_depth.inc_by(pending.len() as i64);
        let (persist, persist_rx) = mpsc::channel(4096);
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
                barriers: HashSet::new(),
                rewind: false,
            }),
            wake: Notify::new(),
            deliver,
            accepts,
            persist,
            cfg,
        });
        tokio::spawn(persister(
            store,
            queue.to_owned(),
            peer.to_owned(),
            inner.cfg.seen_limit,
            persist_rx,
        ));
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

    /// Accepts `message` for delivery and returns its id once it is stored
    /// durably. Fails fast when the queue is full or the rate is exceeded.
    pub async fn publish(&self, message: Message) -> Result<String, PublishError> {
        let (mut ids, refused) = self.publish_batch(vec![message]).await;
        match refused {
            Some(e) => Err(e),
            None => Ok(ids.pop().expect("one message accepted")),
        }
    }

    /// Accepts the longest prefix of `messages` that is valid and fits the
    /// queue and the rate limit, stored in one transaction. Returns the ids
    /// accepted and why the next one was refused; nothing after a refused
    /// message is accepted, so per-resource order survives a resend.
    pub async fn publish_batch(
        &self,
        messages: Vec<Message>,
    ) -> (Vec<String>, Option<PublishError>) {
        let m = &self.inner.metrics;
        let mut ready = Vec::with_capacity(messages.len());
        let mut refused = None;
        for mut message in messages {
            if let Err(e) = message.prepare() {
                m.refused("invalid");
                refused = Some(e.into());
                break;
            }
            let frame = message.to_json();
            if frame.len() > self.inner.cfg.max_message {
                m.refused("too_large");
                refused = Some(
                    BadMessage::TooLarge {
                        size: frame.len(),
                        max: self.inner.cfg.max_message,
                    }
                    .into(),
                );
                break;
            }
            ready.push((message, frame));
        }
        let first_seq = {
            let mut st = self.lock();
            let room = self
                .inner
                .cfg
                .queue_capacity
                .saturating_sub(st.pending.len() + st.reserved);
            if ready.len() > room {
                ready.truncate(room);
                m.refused("queue_full");
                refused = Some(PublishError::QueueFull {
                    peer: self.inner.peer.to_string(),
                    capacity: self.inner.cfg.queue_capacity,
                });
            }
            if let Some(b) = st.bucket.as_mut() {
                let allowed = (0..ready.len()).take_while(|_| b.take()).count();
                if allowed < ready.len() {
                    ready.truncate(allowed);
                    m.refused("rate_limited");
                    refused = Some(PublishError::RateLimited {
                        peer: self.inner.peer.to_string(),
                        qps: b.qps,
                        burst: b.burst,
                    });
                }
            }
            st.reserved += ready.len();
            st.next_seq += ready.len() as u64;
            st.next_seq - ready.len() as u64
        };
        if ready.is_empty() {
            return (Vec::new(), refused);
        }
        let entries = ready
            .iter()
            .zip(first_seq..)
            .map(|((_, frame), seq)| (seq, frame.clone()))
            .collect();
        let stored = self.inner.store.append(&self.inner.queue, entries).await;
        let mut st = self.lock();
        st.reserved -= ready.len();
        if let Err(e) = stored {
            self.inner.metrics.refused("store");
            return (Vec::new(), Some(e.into()));
        }
        let mut ids = Vec::with_capacity(ready.len());
        for ((message, frame), seq) in ready.into_iter().zip(first_seq..) {
            // Concurrent publishers may finish storing out of seq order; keep
            // the queue sorted, but never ahead of what was already sent.
            let mut at = st.pending.len();
            while at > st.in_flight && st.pending[at - 1].seq > seq {
                at -= 1;
            }
            ids.push(message.header.msg_id.clone());
            st.pending.insert(
                at,
                Pending {
                    seq,
                    id: message.header.msg_id,
                    route: message.route,
                    frame: frame.into(),
                    attempts: 0,
                    sent_at: None,
                    due: None,
                },
            );
        }
        drop(st);
        m.queue_depth.inc_by(ids.len() as i64);
        self.inner.wake.notify_one();
        (ids, refused)
    }

    /// Sends `message` as a sync request and waits for the peer
    /// application's response (a message whose `parent_msg_id` is the
    /// request's id).
    pub async fn request(
        &self,
        mut message: Message,
        timeout: Duration,
    ) -> Result<Message, RequestError> {
        message.header.sync = true;
        message.prepare().map_err(PublishError::from)?;
        let id = message.header.msg_id.clone();
        let (tx, rx) = oneshot::channel();
        self.lock().waiters.insert(id.clone(), tx);
        if let Err(e) = self.publish(message).await {
            self.lock().waiters.remove(&id);
            return Err(e.into());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(resp)) => Ok(resp),
            _ => {
                self.lock().waiters.remove(&id);
                Err(RequestError::Timeout {
                    msg_id: id,
                    timeout,
                })
            }
        }
    }

    /// Serves one connection until it fails, the peer goes silent, or a
    /// newer connection takes over. Unacknowledged messages are resent
    /// first, in order.
    pub async fn serve<IO>(&self, io: IO) -> ConnectionEnd
    where
        IO: AsyncRead + AsyncWrite,
    {
        let generation = {
            let mut st = self.lock();
            st.generation += 1;
            st.in_flight = 0;
            st.connected = true;
            st.barriers.clear();
            st.rewind = false;
            st.generation
        };
        // Wake a previous connection's writer so it sees it was replaced.
        self.inner.wake.notify_waiters();
        self.inner.metrics.online.inc();
        let _guard = ConnectionGuard {
            channel: self,
            generation,
        };
        let (rd, wr) = tokio::io::split(io);
        // Acks, defers and errors the reader hands the writer. The peer has
        // at most `window` messages unacknowledged, so with room for several
        // windows of acks the reader never waits on the writer: otherwise two
        // writers blocked on each other's full sockets, each with its reader
        // waiting for room here, would deadlock.
        let (ctl_tx, ctl_rx) = mpsc::channel(self.inner.cfg.window.max(64) * 4);
        tokio::select! {
            end = self.read_loop(BufReader::new(rd), ctl_tx) => end,
            end = self.write_loop(BufWriter::new(wr), ctl_rx, generation) => end,
        }
    }

    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        mut rd: R,
        ctl: mpsc::Sender<Message>,
    ) -> ConnectionEnd {
        let cfg = &self.inner.cfg;
        let m = &self.inner.metrics;
        loop {
            let frame = match tokio::time::timeout(
                cfg.keepalive_timeout,
                read_frame(&mut rd, cfg.max_message),
            )
            .await
            {
                Err(_) => return ConnectionEnd::PeerDead(cfg.keepalive_timeout),
                Ok(Err(e)) => return ConnectionEnd::Io(e),
                Ok(Ok(Frame::Data(f))) => f,
                Ok(Ok(Frame::Skipped(size))) => {
                    if size > cfg.max_message * SKIP_LIMIT_FACTOR {
                        return ConnectionEnd::Protocol(size);
                    }
                    m.error("too_large");
                    let e = BadMessage::TooLarge {
                        size,
                        max: cfg.max_message,
                    };
                    if self.reply_error(&ctl, "", &e.to_string()).await.is_err() {
                        return ConnectionEnd::Replaced;
                    }
                    continue;
                }
            };
            let msg = match Message::from_json(&frame, cfg.max_message) {
                Ok(msg) => msg,
                Err(e) => {
                    m.error(match e {
                        BadMessage::NoRoute => "no_route",
                        _ => "malformed",
                    });
                    warn!(peer = %self.inner.peer, error = %e, "bad message from peer");
                    if self.reply_error(&ctl, "", &e.to_string()).await.is_err() {
                        return ConnectionEnd::Replaced;
                    }
                    continue;
                }
            };
            let sent = if msg.is_control() {
                self.on_control(msg, &ctl).await
            } else {
                self.on_message(msg, &ctl).await
            };
            if sent.is_err() {
                // The writer is gone: the connection is ending anyway.
                return ConnectionEnd::Replaced;
            }
        }
    }

    async fn reply_error(
        &self,
        ctl: &mpsc::Sender<Message>,
        parent: &str,
        text: &str,
    ) -> Result<(), mpsc::error::SendError<Message>> {
        ctl.send(Message::control(
            "error",
            parent,
            Content::Json(serde_json::json!({ "error": text })),
        ))
        .await
    }

    async fn on_control(
        &self,
        msg: Message,
        ctl: &mpsc::Sender<Message>,
    ) -> Result<(), mpsc::error::SendError<Message>> {
        match msg.route.operation.as_str() {
            "ack" => {
                let parent = &msg.header.parent_msg_id;
                if !self.acked(parent).await {
                    self.inner.metrics.error("unknown_ack");
                    debug!(peer = %self.inner.peer, id = %parent, "ack for an unknown message id");
                    return self
                        .reply_error(
                            ctl,
                            parent,
                            &format!("ack for unknown message id {parent:?}"),
                        )
                        .await;
                }
                Ok(())
            }
            "keepalive" => Ok(()),
            "defer" => {
                self.deferred(&msg.header.parent_msg_id);
                Ok(())
            }
            "rewind" => {
                self.lock().barriers.clear();
                Ok(())
            }
            "error" => {
                self.inner.metrics.error("peer_error");
                warn!(peer = %self.inner.peer, parent = %msg.header.parent_msg_id,
                    content = ?msg.content, "peer reported an error");
                Ok(())
            }
            op => {
                self.reply_error(
                    ctl,
                    &msg.header.msg_id,
                    &format!("unknown channel operation {op:?}"),
                )
                .await
            }
        }
    }

    /// The peer has no subscriber for `id` yet: offer it again after a
    /// short wait (doubling per attempt, at most the ack timeout).
    fn deferred(&self, id: &str) {
        let mut st = self.lock();
        if let Some(p) = st.pending.iter_mut().find(|p| p.id == id) {
            let wait = (DEFER_WAIT * (1u32 << p.attempts.saturating_sub(1).min(5)))
                .min(self.inner.cfg.ack_timeout);
            p.due = Some(Instant::now() + wait);
        }
        drop(st);
        self.inner.wake.notify_one();
    }

    /// Removes an acknowledged message; false if the id was never pending
    /// (or so long ago that it is forgotten).
    async fn acked(&self, id: &str) -> bool {
        let p = {
            let mut st = self.lock();
            // Acks come in send order, so the front almost always matches.
            let Some(i) = st.pending.iter().position(|p| p.id == id) else {
                return st.recently_acked.set.contains(id);
            };
            let p = st.pending.remove(i).expect("index from position");
            st.recently_acked.insert(p.id.clone());
            if i < st.in_flight {
                st.in_flight -= 1;
            }
            p
        };
        if let Some(at) = p.sent_at {
            self.inner
                .metrics
                .ack_latency
                .observe(at.elapsed().as_secs_f64());
        }
        self.inner.metrics.queue_depth.dec();
        self.inner.wake.notify_one();
        // A persister behind by its whole queue slows this reader down, as
        // recording delivered ids does: bounded backpressure, no task pile.
        let _ = self.inner.persist.send(Persist::Acked(p.seq)).await;
        true
    }

    async fn on_message(
        &self,
        msg: Message,
        ctl: &mpsc::Sender<Message>,
    ) -> Result<(), mpsc::error::SendError<Message>> {
        let m = &self.inner.metrics;
        let id = msg.header.msg_id.clone();
        if id.is_empty() || id.len() > 128 {
            m.error("bad_id");
            return self
                .reply_error(ctl, "", &BadMessage::BadId.to_string())
                .await;
        }
        enum Verdict {
            Duplicate,
            Stale,
            Respond(oneshot::Sender<Message>),
            Deliver,
            Defer,
        }
        let verdict = {
            let mut st = self.lock();
            if st.seen.set.contains(&id) {
                Verdict::Duplicate
            } else if st.barriers.contains(&msg.route.resource) {
                // An earlier message of this resource was deferred in this
                // pass: this one waits for it, to keep per-resource order.
                Verdict::Defer
            } else if self.is_stale(&mut st, &msg) {
                st.seen.insert(id.clone());
                Verdict::Stale
            } else if let Some(w) = st.waiters.remove(&msg.header.parent_msg_id) {
                Verdict::Respond(w)
            } else if (self.inner.accepts)(&msg) {
                Verdict::Deliver
            } else {
                st.barriers.insert(msg.route.resource.clone());
                Verdict::Defer
            }
        };
        match verdict {
            Verdict::Defer => {
                // Nobody subscribes to it yet: the sender keeps it and
                // offers it again soon (an application starting up).
                m.drop("deferred");
                return ctl
                    .send(Message::control("defer", &id, Content::None))
                    .await;
            }
            Verdict::Duplicate => m.drop("duplicate"),
            Verdict::Stale => {
                m.drop("stale");
                let _ = self.inner.persist.send(Persist::Seen(id.clone())).await;
            }
            Verdict::Respond(w) => {
                let _ = w.send(msg);
                m.deliveries.inc();
                self.remember(&id).await;
            }
            Verdict::Deliver => {
                let delivered = self
                    .inner
                    .deliver
                    .send(Delivery::Message {
                        peer: self.inner.peer.clone(),
                        message: msg,
                    })
                    .await;
                if delivered.is_err() {
                    // No application is listening: do not ack, so the
                    // message is resent once one is.
                    m.drop("no_subscriber");
                    return Ok(());
                }
                m.deliveries.inc();
                self.remember(&id).await;
            }
        }
        ctl.send(Message::control("ack", &id, Content::None)).await
    }

    async fn remember(&self, id: &str) {
        self.lock().seen.insert(id.to_owned());
        let _ = self.inner.persist.send(Persist::Seen(id.to_owned())).await;
    }

    /// A numeric resourceversion older than the newest delivered one for the
    /// same resource; records the version otherwise.
    fn is_stale(&self, st: &mut State, msg: &Message) -> bool {
        let Ok(rv) = msg.header.resourceversion.parse::<u64>() else {
            return false;
        };
        if msg.route.resource.is_empty() {
            return false;
        }
        match st.versions.get_mut(&msg.route.resource) {
            Some(last) if *last > rv => true,
            Some(last) => {
                *last = rv;
                false
            }
            None => {
                st.versions.insert(msg.route.resource.clone(), rv);
                st.version_order.push_back(msg.route.resource.clone());
                if st.version_order.len() > self.inner.cfg.version_limit
                    && let Some(old) = st.version_order.pop_front()
                {
                    st.versions.remove(&old);
                }
                false
            }
        }
    }

    async fn write_loop<W: AsyncWrite + Unpin>(
        &self,
        mut wr: W,
        mut ctl: mpsc::Receiver<Message>,
        generation: u64,
    ) -> ConnectionEnd {
        let cfg = &self.inner.cfg;
        let mut keepalive = tokio::time::interval(cfg.keepalive_interval);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dirty = false;
        loop {
            // Register for wake-ups before looking, so none is missed.
            let woken = self.inner.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            while let Ok(c) = ctl.try_recv() {
                if let Err(e) = write_frame(&mut wr, &c.to_json()).await {
                    return e.into();
                }
                dirty = true;
            }
            let (next, retry_at) = match self.next_to_send(generation) {
                Ok(x) => x,
                Err(end) => return end,
            };
            if let Some(frame) = next {
                if let Err(e) = write_frame(&mut wr, &frame).await {
                    return e.into();
                }
                dirty = true;
                continue;
            }
            if dirty {
                if let Err(e) = wr.flush().await {
                    return e.into();
                }
                dirty = false;
            }
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                c = ctl.recv() => match c {
                    Some(c) => {
                        if let Err(e) = write_frame(&mut wr, &c.to_json()).await {
                            return e.into();
                        }
                        dirty = true;
                    }
                    None => return ConnectionEnd::Replaced,
                },
                _ = &mut woken => {}
                _ = retry => self.go_back(generation),
                _ = keepalive.tick() => {
                    let k = Message::control("keepalive", "", Content::None);
                    if let Err(e) = write_frame(&mut wr, &k.to_json()).await {
                        return e.into();
                    }
                    dirty = true;
                }
            }
        }
    }

    /// The next frame to send on this connection, or the time the oldest
    /// in-flight message's ack is due. Gives up messages over budget.
    #[allow(clippy::type_complexity)]
    fn next_to_send(
        &self,
        generation: u64,
    ) -> Result<(Option<Bytes>, Option<Instant>), ConnectionEnd> {
        let cfg = &self.inner.cfg;
        let mut st = self.lock();
        if st.generation != generation {
            return Err(ConnectionEnd::Replaced);
        }
        loop {
            let i = st.in_flight;
            if i >= st.pending.len() || i >= cfg.window {
                break;
            }
            if i == 0 && st.rewind {
                // Tell the peer a new pass starts, so it lifts its barriers.
                st.rewind = false;
                let rewind = Message::control("rewind", "", Content::None);
                return Ok((Some(rewind.to_json().into()), None));
            }
            let p = &mut st.pending[i];
            p.attempts += 1;
            if p.attempts > cfg.max_attempts {
                let p = st.pending.remove(i).expect("index checked");
                drop(st);
                self.give_up(p);
                st = self.lock();
                continue;
            }
            if p.attempts > 1 {
                self.inner.metrics.redeliveries.inc();
            }
            let now = Instant::now();
            p.sent_at = Some(now);
            p.due = Some(now + cfg.ack_timeout * (1u32 << (p.attempts - 1).min(3)));
            let frame = p.frame.clone();
            st.in_flight += 1;
            return Ok((Some(frame), None));
        }
        let due = st
            .pending
            .front()
            .filter(|_| st.in_flight > 0)
            .and_then(|p| p.due);
        Ok((None, due))
    }

    /// The oldest message's ack is overdue: send everything unacknowledged
    /// again, in order (the peer drops what it already has).
    fn go_back(&self, generation: u64) {
        let mut st = self.lock();
        if st.generation == generation {
            debug!(peer = %self.inner.peer, in_flight = st.in_flight, "ack overdue; resending");
            st.in_flight = 0;
            st.rewind = true;
        }
    }

    fn give_up(&self, p: Pending) {
        let m = &self.inner.metrics;
        m.drop("failed");
        m.queue_depth.dec();
        warn!(peer = %self.inner.peer, id = %p.id, attempts = p.attempts - 1,
            "message not acknowledged within its retry budget; reported failed");
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let _ = inner.persist.send(Persist::Acked(p.seq)).await;
            let _ = inner
                .deliver
                .send(Delivery::Failed {
                    peer: inner.peer.clone(),
                    msg_id: p.id,
                    route: p.route,
                    attempts: p.attempts - 1,
                })
                .await;
        });
    }
}

struct ConnectionGuard<'a> {
    channel: &'a Channel,
    generation: u64,
}

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.channel.lock();
        if st.generation == self.generation {
            st.connected = false;
            st.in_flight = 0;
        }
        drop(st);
        self.channel.inner.metrics.online.dec();
    }
}

/// Writes what the channel learns to the store in batches, off the
/// connection's path.
async fn persister(
    store: Store,
    queue: String,
    peer: String,
    seen_limit: usize,
    mut rx: mpsc::Receiver<Persist>,
) {
    let mut batch = Vec::with_capacity(256);
    // What a failed write could not record is kept and written again (a
    // full disk recovers by itself), so a message acknowledged before the
    // failure is not sent again after a restart. Bounded: beyond it the
    // oldest are given up (the peer's seen set still drops a resend).
    let (mut seen, mut acked): (Vec<String>, Vec<u64>) = (Vec::new(), Vec::new());
    loop {
        let got = if seen.is_empty() && acked.is_empty() {
            rx.recv_many(&mut batch, 256).await
        } else {
            tokio::select! {
                n = rx.recv_many(&mut batch, 256) => n,
                () = tokio::time::sleep(PERSIST_RETRY) => usize::MAX,
            }
        };
        if got == 0 {
            break;
        }
        for p in batch.drain(..) {
            match p {
                Persist::Seen(id) => seen.push(id),
                Persist::Acked(seq) => acked.push(seq),
            }
        }
        for (kept, what) in [(seen.len(), "seen ids"), (acked.len(), "acknowledgements")] {
            if kept > MAX_UNPERSISTED {
                warn!(%peer, kept, "giving up the oldest unpersisted {what}");
            }
        }
        if seen.len() > MAX_UNPERSISTED {
            seen.drain(..seen.len() - MAX_UNPERSISTED);
        }
        if acked.len() > MAX_UNPERSISTED {
            acked.drain(..acked.len() - MAX_UNPERSISTED);
        }
        if !acked.is_empty() {
            match store.remove(&queue, acked.clone()).await {
                Ok(()) => acked.clear(),
                Err(e) => {
                    debug!(%peer, error = %e, "acknowledged messages not removed yet; will retry")
                }
            }
        }
        if !seen.is_empty() {
            match store.mark_seen(&peer, seen.clone(), seen_limit).await {
                Ok(()) => seen.clear(),
                Err(StoreError::IdTooLong { .. }) => seen.clear(),
                Err(e) => debug!(%peer, error = %e, "delivered ids not recorded yet; will retry"),
            }
        }
    }
}

/// How often the persister writes again what a failed write left.
const PERSIST_RETRY: Duration = Duration::from_millis(500);
/// Most acknowledgements (and seen ids) kept for writing again.
const MAX_UNPERSISTED: usize = 65_536;

enum Frame {
    Data(Vec<u8>),
    Skipped(usize),
}

/// Reads one length-prefixed frame; frames over `max` are read past and
/// reported by size, so the connection survives them.
async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R, max: usize) -> std::io::Result<Frame> {
    let len = rd.read_u32().await? as usize;
    if len > max {
        if len <= max * SKIP_LIMIT_FACTOR {
            let skipped = tokio::io::copy(&mut rd.take(len as u64), &mut tokio::io::sink()).await?;
            if skipped < len as u64 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        return Ok(Frame::Skipped(len));
    }
    let mut buf = vec![0; len];
    rd.read_exact(&mut buf).await?;
    Ok(Frame::Data(buf))
}

async fn write_frame<W: AsyncWrite + Unpin>(wr: &mut W, frame: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(frame.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    wr.write_u32(len).await?;
    wr.write_all(frame).await
}

/// Writes one raw frame (tests and tools that speak the framing directly).
pub async fn write_raw_frame<W: AsyncWrite + Unpin>(
    wr: &mut W,
    frame: &[u8],
) -> std::io::Result<()> {
    write_frame(wr, frame).await?;
    wr.flush().await
}

/// Reads one raw frame of at most `max` bytes.
pub async fn read_raw_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    match read_frame(rd, max).await? {
        Frame::Data(d) => Ok(Some(d)),
        Frame::Skipped(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::HUB_GROUP;

    fn route(resource: &str) -> Route {
        Route {
            source: "test".into(),
            group: "app".into(),
            operation: "update".into(),
            resource: resource.into(),
        }
    }

    fn yes() -> Accepts {
        Arc::new(|_| true)
    }

    fn msg(resource: &str, n: u64) -> Message {
        Message::new(route(resource), Content::Json(serde_json::json!(n)))
    }

    fn pair(
        cfg: ChannelConfig,
    ) -> (
        Channel,
        mpsc::Receiver<Delivery>,
        Channel,
        mpsc::Receiver<Delivery>,
    ) {
        let (atx, arx) = mpsc::channel(64);
        let (btx, brx) = mpsc::channel(64);
        let m = HubMetrics::default();
        let a = Channel::open(
            "b",
            "to-b",
            cfg.clone(),
            Store::in_memory(),
            m.clone(),
            atx,
            yes(),
        )
        .unwrap();
        let b = Channel::open("a", "to-a", cfg, Store::in_memory(), m, btx, yes()).unwrap();
        (a, arx, b, brx)
    }

    fn value(d: Delivery) -> (String, u64) {
        match d {
            Delivery::Message { message, .. } => match message.content {
                Content::Json(v) => (message.route.resource, v.as_u64().unwrap()),
                c => panic!("content {c:?}"),
            },
            d => panic!("unexpected {d:?}"),
        }
    }

    /// Connects `a` and `b` until `cut` resolves.
    async fn link(a: &Channel, b: &Channel, cut: impl std::future::Future<Output = ()>) {
        let (x, y) = tokio::io::duplex(4096);
        tokio::select! {
            _ = a.serve(x) => {}
            _ = b.serve(y) => {}
            _ = cut => {}
        }
    }

    #[tokio::test]
    async fn each_message_arrives_once_in_order_across_many_cuts() {
        let (a, _arx, b, mut brx) = pair(ChannelConfig::default());
        const N: u64 = 2000;
        let publisher = {
            let a = a.clone();
            tokio::spawn(async move {
                for n in 0..N {
                    a.publish(msg(&format!("r{}", n % 3), n)).await.unwrap();
                }
            })
        };
        let mut got: HashMap<String, Vec<u64>> = HashMap::new();
        let mut received = 0;
        let mut rounds = 0;
        for round in 0..200u64 {
            rounds += 1;
            let cut = tokio::time::sleep(Duration::from_micros(500 + round * 37 % 3000));
            let recv = async {
                while let Some(d) = brx.recv().await {
                    let (r, n) = value(d);
                    got.entry(r).or_default().push(n);
                    received += 1;
                    if received == N {
                        break;
                    }
                }
            };
            tokio::select! {
                _ = link(&a, &b, cut) => {}
                _ = recv => {}
            }
            if received == N {
                break;
            }
        }
        // The last round may end by cut; finish on a stable link.
        if received < N {
            let (x, y) = tokio::io::duplex(4096);
            let serve = async { tokio::join!(a.serve(x), b.serve(y)) };
            let recv = async {
                while received < N {
                    let (r, n) = value(brx.recv().await.unwrap());
                    got.entry(r).or_default().push(n);
                    received += 1;
                }
            };
            tokio::select! {
                _ = serve => panic!("link ended"),
                _ = tokio::time::timeout(Duration::from_secs(20), recv) => {}
            }
        }
        publisher.await.unwrap();
        assert_eq!(received, N);
        assert!(
            rounds >= 20,
            "only {rounds} links: the cuts did not interleave"
        );
        for (r, ns) in got {
            assert!(
                ns.windows(2).all(|w| w[0] < w[1]),
                "{r} out of order or duplicated"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_dead_after_the_keepalive_timeout() {
        let cfg = ChannelConfig {
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(15),
            ..ChannelConfig::default()
        };
        let (a, _arx, _b, _brx) = pair(cfg);
        let (x, _silent) = tokio::io::duplex(1 << 20);
        let started = Instant::now();
        let end = a.serve(x).await;
        assert!(matches!(end, ConnectionEnd::PeerDead(_)), "{end}");
        assert_eq!(started.elapsed(), Duration::from_secs(15));
        assert!(!a.is_connected());
    }

    #[tokio::test(start_paused = true)]
    async fn keepalives_keep_an_idle_link_up() {
        let cfg = ChannelConfig {
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(15),
            ..ChannelConfig::default()
        };
        let (a, _arx, b, _brx) = pair(cfg);
        let (x, y) = tokio::io::duplex(4096);
        tokio::select! {
            _ = a.serve(x) => panic!("a ended"),
            _ = b.serve(y) => panic!("b ended"),
            _ = tokio::time::sleep(Duration::from_secs(120)) => {}
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unacknowledged_messages_are_retried_then_reported_failed() {
        let cfg = ChannelConfig {
            ack_timeout: Duration::from_secs(1),
            max_attempts: 3,
            keepalive_timeout: Duration::from_secs(3600),
            ..ChannelConfig::default()
        };
        let (a, mut arx, _b, _brx) = pair(cfg);
        let id = a.publish(msg("r", 1)).await.unwrap();
        // A peer that reads and never acks.
        let (x, mut y) = tokio::io::duplex(1 << 20);
        let reader = async {
            let mut frames = 0;
            while let Ok(Some(f)) = read_raw_frame(&mut y, 1 << 20).await {
                let m = Message::from_json(&f, 1 << 20).unwrap();
                if !m.is_control() {
                    frames += 1;
                }
            }
            frames
        };
        let failed = tokio::select! {
            _ = a.serve(x) => panic!("serve ended"),
            _ = reader => panic!("reader ended"),
            d = arx.recv() => d.unwrap(),
        };
        match failed {
            Delivery::Failed {
                msg_id, attempts, ..
            } => {
                assert_eq!(msg_id, id);
                assert_eq!(attempts, 3);
            }
            d => panic!("unexpected {d:?}"),
        }
        assert_eq!(a.queued(), 0);
    }

    #[tokio::test]
    async fn bad_input_gets_clear_errors_and_the_session_stays_up() {
        let cfg = ChannelConfig {
            max_message: 1024,
            ..ChannelConfig::default()
        };
        let (_a, _arx, b, mut brx) = pair(cfg);
        let (x, mut y) = tokio::io::duplex(1 << 20);
        let serve = tokio::spawn(async move { b.serve(x).await });
        let mut errors = Vec::new();
        let good = msg("r", 7);
        let mut good = good;
        good.prepare().unwrap();
        for frame in [
            b"{not json".to_vec(),
            br#"{"header":{"msg_id":"1"}}"#.to_vec(),
            vec![b' '; 2048],
            Message::control("ack", "no-such-id", Content::None).to_json(),
            good.to_json(),
        ] {
            write_raw_frame(&mut y, &frame).await.unwrap();
        }
        let mut acked = false;
        while errors.len() < 4 || !acked {
            let f = tokio::time::timeout(Duration::from_secs(5), read_raw_frame(&mut y, 1 << 20))
                .await
                .expect("reply")
                .unwrap()
                .unwrap();
            let m = Message::from_json(&f, 1 << 20).unwrap();
            assert_eq!(m.route.group, HUB_GROUP);
            match m.route.operation.as_str() {
                "error" => errors.push(format!("{:?}", m.content)),
                "ack" => {
                    assert_eq!(m.header.parent_msg_id, good.header.msg_id);
                    acked = true;
                }
                _ => {}
            }
        }
        assert!(errors[0].contains("malformed message"), "{errors:?}");
        assert!(errors[1].contains("no route"), "{errors:?}");
        assert!(
            errors[2].contains("exceeds the 1024-byte limit"),
            "{errors:?}"
        );
        assert!(errors[3].contains("unknown message id"), "{errors:?}");
        assert_eq!(value(brx.recv().await.unwrap()), ("r".into(), 7));
        assert!(!serve.is_finished());
        serve.abort();
    }

    #[tokio::test]
    async fn full_queue_and_rate_limit_are_clear_errors() {
        let cfg = ChannelConfig {
            queue_capacity: 3,
            ..ChannelConfig::default()
        };
        let (a, _arx, _b, _brx) = pair(cfg);
        for n in 0..3 {
            a.publish(msg("r", n)).await.unwrap();
        }
        let e = a.publish(msg("r", 3)).await.unwrap_err();
        assert!(
            matches!(e, PublishError::QueueFull { capacity: 3, .. }),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "queue full for b: 3 messages await acknowledgement"
        );

        let cfg = ChannelConfig {
            rate: Some((1.0, 2.0)),
            ..ChannelConfig::default()
        };
        let (a, _arx, _b, _brx) = pair(cfg);
        a.publish(msg("r", 0)).await.unwrap();
        a.publish(msg("r", 1)).await.unwrap();
        let e = a.publish(msg("r", 2)).await.unwrap_err();
        assert!(
            e.to_string().starts_with("rate limit exceeded for b"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn older_resource_versions_are_dropped() {
        let (a, _arx, b, mut brx) = pair(ChannelConfig::default());
        for rv in ["5", "3", "6"] {
            let mut m = msg("ns/pod/x", rv.parse().unwrap());
            m.header.resourceversion = rv.into();
            a.publish(m).await.unwrap();
        }
        a.publish(msg("other", 1)).await.unwrap();
        let recv = async {
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(value(brx.recv().await.unwrap()));
            }
            got
        };
        let got = tokio::select! {
            _ = link(&a, &b, std::future::pending()) => panic!("link ended"),
            g = recv => g,
        };
        assert_eq!(
            got,
            vec![
                ("ns/pod/x".into(), 5),
                ("ns/pod/x".into(), 6),
                ("other".into(), 1)
            ]
        );
    }

    #[tokio::test]
    async fn sync_request_gets_the_peer_response() {
        let (a, _arx, b, mut brx) = pair(ChannelConfig::default());
        let responder = {
            let b = b.clone();
            async move {
                let Some(Delivery::Message { message, .. }) = brx.recv().await else {
                    panic!("no request")
                };
                assert!(message.header.sync);
                let mut resp = msg("r", 42);
                resp.route.operation = "response".into();
                resp.header.parent_msg_id = message.header.msg_id;
                b.publish(resp).await.unwrap();
                std::future::pending::<()>().await;
            }
        };
        let resp = tokio::select! {
            _ = link(&a, &b, std::future::pending()) => panic!("link ended"),
            _ = responder => unreachable!(),
            r = a.request(msg("r", 1), Duration::from_secs(5)) => r.unwrap(),
        };
        assert_eq!(resp.content, Content::Json(serde_json::json!(42)));
        let e = a
            .request(msg("r", 2), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(e, RequestError::Timeout { .. }));
    }

    #[tokio::test]
    async fn a_message_nobody_takes_yet_waits_for_a_subscriber() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let open = Arc::new(AtomicBool::new(false));
        let (atx, _arx) = mpsc::channel(64);
        let (btx, mut brx) = mpsc::channel(64);
        let m = HubMetrics::default();
        let cfg = ChannelConfig::default();
        let a = Channel::open(
            "b",
            "q",
            cfg.clone(),
            Store::in_memory(),
            m.clone(),
            atx,
            yes(),
        )
        .unwrap();
        let gate = open.clone();
        let b = Channel::open(
            "a",
            "q",
            cfg,
            Store::in_memory(),
            m,
            btx,
            Arc::new(move |_| gate.load(Ordering::SeqCst)),
        )
        .unwrap();
        a.publish(msg("r", 1)).await.unwrap();
        a.publish(msg("r", 2)).await.unwrap();
        let got = async {
            tokio::time::sleep(Duration::from_millis(600)).await;
            assert!(brx.try_recv().is_err(), "delivered without a subscriber");
            open.store(true, Ordering::SeqCst);
            let first = value(brx.recv().await.unwrap());
            let second = value(brx.recv().await.unwrap());
            while a.queued() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (first, second)
        };
        let (first, second) = tokio::select! {
            _ = link(&a, &b, std::future::pending()) => panic!("link ended"),
            g = tokio::time::timeout(Duration::from_secs(10), got) => g.expect("never delivered"),
        };
        assert_eq!((first, second), (("r".into(), 1), ("r".into(), 2)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscriber_arriving_mid_stream_sees_every_message_in_order() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let open = Arc::new(AtomicBool::new(false));
        let (atx, _arx) = mpsc::channel(64);
        let (btx, mut brx) = mpsc::channel(64);
        let m = HubMetrics::default();
        let a = Channel::open(
            "b",
            "q",
            ChannelConfig::default(),
            Store::in_memory(),
            m.clone(),
            atx,
            yes(),
        )
        .unwrap();
        let gate = open.clone();
        let b = Channel::open(
            "a",
            "q",
            ChannelConfig::default(),
            Store::in_memory(),
            m,
            btx,
            Arc::new(move |_| gate.load(Ordering::SeqCst)),
        )
        .unwrap();
        const N: u64 = 300;
        let publisher = {
            let a = a.clone();
            tokio::spawn(async move {
                for n in 0..N {
                    a.publish(msg("r", n)).await.unwrap();
                    if n % 10 == 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        };
        let got = async {
            // The application subscribes while messages are in flight.
            tokio::time::sleep(Duration::from_millis(60)).await;
            open.store(true, Ordering::SeqCst);
            let mut got = Vec::new();
            while got.len() < N as usize {
                got.push(value(brx.recv().await.unwrap()).1);
            }
            got
        };
        let got = tokio::select! {
            _ = link(&a, &b, std::future::pending()) => panic!("link ended"),
            g = tokio::time::timeout(Duration::from_secs(30), got) => g.expect("not all delivered"),
        };
        publisher.await.unwrap();
        assert!(
            got.iter().copied().eq(0..N),
            "out of order: {:?}",
            &got[..20]
        );
    }
}
