//! The cloud end of the message channel: one [`Channel`] per node, carried
//! by a `tether-hub` stream inside the node's hub session (same mTLS and
//! certificate-bound identity as the stream tunnel, own listener), per-node
//! bounded queues with rate limits, and subscriptions to what edges send up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tether_hub::dispatch::{Dispatcher, Event, Filter, TooManySubscribers};
use tether_hub::{
    Channel, ChannelConfig, ConnectionEnd, Delivery, HUB_TARGET, HubMetrics, Message, PublishError,
    RequestError, Store, StoreError,
};
use tether_tunnel::{
    NodeSession, ServerTls, SessionRegistry, Shutdown, TunnelEvent, TunnelLimits, TunnelListener,
};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

/// Store queue holding messages for `node`.
fn queue_of(node: &str) -> String {
    format!("down/{node}")
}

/// Hub bounds beyond the per-channel ones.
#[derive(Clone, Debug)]
pub struct CloudHubConfig {
    /// Per-node channel bounds; `rate` is the per-node publish limit.
    pub channel: ChannelConfig,
    /// Nodes with a queue at most (publishing to more is refused).
    pub max_nodes: usize,
    /// Subscriptions at most.
    pub max_subscribers: usize,
    /// A subscriber that does not take an event for this long is dropped,
    /// so it cannot stall delivery for everyone else.
    pub subscriber_timeout: Duration,
}

impl Default for CloudHubConfig {
    fn default() -> Self {
        Self {
            channel: ChannelConfig {
                queue_capacity: 1024,
                rate: Some((100.0, 200.0)),
                ..ChannelConfig::default()
            },
            max_nodes: 10_000,
            // Subscriptions hold admin-port connections (64 at most), so
            // scrapes and probes always have room.
            max_subscribers: 32,
            subscriber_timeout: Duration::from_secs(5),
        }
    }
}

/// Refusals of the hub API.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Refused by the node's channel.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// A sync request failed.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// Not a node name.
    #[error("invalid node name {0:?}")]
    BadNode(String),
    /// The node limit is reached.
    #[error("too many nodes with queues ({0}); refusing a queue for {1:?}")]
    TooManyNodes(usize, String),
    /// The subscription limit is reached.
    #[error(transparent)]
    TooManySubscribers(#[from] TooManySubscribers),
    /// The store failed.
    #[error("message store: {0}")]
    Store(#[from] StoreError),
    /// The replica holding the node refused a forwarded sync request, or
    /// could not be reached (`status` None).
    #[error("node {node} is held by replica {replica}: {reason}")]
    Peer {
        /// The node.
        node: String,
        /// The replica holding it.
        replica: String,
        /// Its answer's status, if it answered.
        status: Option<http::StatusCode>,
        /// What it said, or why it could not be reached.
        reason: String,
    },
}

/// One node's state, for the API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStatus {
    /// Node name.
    pub node: String,
    /// Channel connected.
    pub online: bool,
    /// Messages accepted and not yet acknowledged.
    pub queued: usize,
}

/// The cloud hub. Cheap to clone.
#[derive(Clone)]
pub struct CloudHub {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: CloudHubConfig,
    store: Store,
    metrics: HubMetrics,
    channels: Mutex<HashMap<String, Channel>>,
    deliveries: mpsc::Sender<Delivery>,
    dispatcher: Dispatcher,
    /// Live hub sessions, one per node.
    sessions: SessionRegistry,
    /// Hub streams carried in stream-tunnel sessions: session id and the
    /// signal that cuts the stream ([`CloudHub::disconnect`]).
    carried: Mutex<HashMap<String, (u64, Arc<tokio::sync::Notify>)>>,
    /// Relaying to the replica holding a node (several replicas).
    relay: OnceLock<Arc<crate::replicas::Relayer>>,
}

/// A hub reference that does not keep the hub alive (its relay loop).
pub(crate) struct WeakHub(Weak<Inner>);

impl WeakHub {
    pub(crate) fn upgrade(&self) -> Option<CloudHub> {
        self.0.upgrade().map(|inner| CloudHub { inner })
    }
}

impl CloudHub {
    /// A hub over `store`, reloading every node queue found there (messages
    /// accepted before a restart are delivered once the node is back).
    pub fn new(cfg: CloudHubConfig, store: Store, metrics: HubMetrics) -> Result<Self, StoreError> {
        let (dispatcher, deliveries) =
            Dispatcher::start(cfg.max_subscribers, cfg.subscriber_timeout, metrics.clone());
        let hub = Self {
            inner: Arc::new(Inner {
                cfg,
                store: store.clone(),
                metrics,
                channels: Mutex::new(HashMap::new()),
                deliveries,
                dispatcher,
                sessions: SessionRegistry::default(),
                carried: Mutex::new(HashMap::new()),
                relay: OnceLock::new(),
            }),
        };
        for q in store.queues()? {
            if let Some(node) = q.strip_prefix("down/") {
                hub.channel(node)?;
            }
        }
        Ok(hub)
    }

    fn channel(&self, node: &str) -> Result<Channel, StoreError> {
        let mut channels = self.inner.channels.lock().expect("hub lock");
        if let Some(c) = channels.get(node) {
            return Ok(c.clone());
        }
        let c = Channel::open(
            node,
            &queue_of(node),
            self.inner.cfg.channel.clone(),
            self.inner.store.clone(),
            self.inner.metrics.clone(),
            self.inner.deliveries.clone(),
            {
                let d = self.inner.dispatcher.clone();
                let peer = node.to_owned();
                Arc::new(move |m: &Message| d.accepts(&peer, m))
            },
        )?;
        if let Some(relay) = self.inner.relay.get() {
            relay.install(&c);
        }
        channels.insert(node.to_owned(), c.clone());
        Ok(c)
    }

    fn channel_for_publish(&self, node: &str) -> Result<Channel, HubError> {
        if !tether_pki::valid_node_name(node) {
            return Err(HubError::BadNode(node.to_owned()));
        }
        {
            let channels = self.inner.channels.lock().expect("hub lock");
            if let Some(c) = channels.get(node) {
                return Ok(c.clone());
            }
            if channels.len() >= self.inner.cfg.max_nodes {
                return Err(HubError::TooManyNodes(
                    self.inner.cfg.max_nodes,
                    node.to_owned(),
                ));
            }
        }
        Ok(self.channel(node)?)
    }

    /// Reaches nodes whose sessions other replicas hold (ADR 0021): what
    /// is queued here for them is relayed to their holder, and sync
    /// requests are forwarded. Call once; later calls are ignored.
    pub fn link_replicas(&self, links: crate::replicas::ReplicaLinks, shutdown: Shutdown) {
        if self.inner.relay.get().is_none() {
            let relay = crate::replicas::Relayer::start(self, links, shutdown);
            if self.inner.relay.set(relay.clone()).is_ok() {
                let channels = self.inner.channels.lock().expect("hub lock");
                for c in channels.values() {
                    relay.install(c);
                }
            }
        }
    }

    /// At shutdown, after this replica's sessions closed: hands what is
    /// queued here to the replicas holding the nodes, or else to any live
    /// replica, within `within`. None when no replicas are linked.
    pub async fn hand_over(&self, within: Duration) -> Option<crate::replicas::HandOver> {
        let relay = self.inner.relay.get()?.clone();
        Some(relay.hand_over(self, within).await)
    }

    pub(crate) fn downgrade(&self) -> WeakHub {
        WeakHub(Arc::downgrade(&self.inner))
    }

    /// Queues `message` for `node` (online or not) and returns its id once
    /// stored. Errors: bad message, queue full, rate limited, store failure.
    /// With several replicas, a node held by another one gets it relayed.
    pub async fn publish(&self, node: &str, message: Message) -> Result<String, HubError> {
        let channel = self.channel_for_publish(node)?;
        let id = channel.publish(message).await?;
        self.hint_relay(node, &channel);
        Ok(id)
    }

    fn hint_relay(&self, node: &str, channel: &Channel) {
        if let Some(relay) = self.inner.relay.get()
            && !channel.is_connected()
        {
            relay.hint(node);
        }
    }

    /// The channel of `node`, if it has one.
    pub(crate) fn existing_channel(&self, node: &str) -> Option<Channel> {
        self.inner
            .channels
            .lock()
            .expect("hub lock")
            .get(node)
            .cloned()
    }

    /// Nodes with messages queued here and no session here.
    pub(crate) fn relay_candidates(&self) -> Vec<String> {
        let channels = self.inner.channels.lock().expect("hub lock");
        channels
            .iter()
            .filter(|(_, c)| !c.is_connected() && c.queued() > 0)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The replica a relayed message for `node` should go to instead of
    /// this one: set when no session of the node is here and another live
    /// replica holds it.
    pub(crate) fn relays_elsewhere(&self, node: &str) -> Option<crate::replicas::PeerReplica> {
        let relay = self.inner.relay.get()?;
        if self
            .existing_channel(node)
            .is_some_and(|c| c.is_connected())
        {
            return None;
        }
        relay.owner_of(node)
    }

    /// Another replica now holds `node`'s hub session and asks for what
    /// waits here (see `replicas::serve`).
    pub(crate) async fn hand_to(&self, node: &str, to: &str) -> Result<(usize, usize), String> {
        match self.inner.relay.get() {
            Some(relay) => relay.clone().hand_to(self, node, to).await,
            None => Err("this replica is not linked to others".to_owned()),
        }
    }

    /// Admits messages another replica relays for `node` (ids kept; ids
    /// already queued skipped); how many were taken, from the front.
    pub(crate) async fn accept_relayed(
        &self,
        node: &str,
        batch: Vec<Message>,
    ) -> (usize, Option<HubError>) {
        if let Some(relay) = self.inner.relay.get() {
            relay.metrics().received(batch.len());
        }
        match self.channel_for_publish(node) {
            Ok(c) => {
                let (taken, e) = c.accept_relayed(batch).await;
                (taken, e.map(HubError::from))
            }
            Err(e) => (0, Some(e)),
        }
    }

    /// Queues the longest acceptable prefix of `batch` for `node` in one
    /// store transaction; returns the ids and why the rest was refused.
    pub async fn publish_batch(
        &self,
        node: &str,
        batch: Vec<Message>,
    ) -> (Vec<String>, Option<HubError>) {
        match self.channel_for_publish(node) {
            Ok(c) => {
                let (ids, e) = c.publish_batch(batch).await;
                if !ids.is_empty() {
                    self.hint_relay(node, &c);
                }
                (ids, e.map(HubError::from))
            }
            Err(e) => (Vec::new(), Some(e)),
        }
    }

    /// Sends a sync request to `node` and waits for its response. When
    /// another replica holds the node, the request is forwarded there and
    /// its answer returned; if that replica cannot be reached, the request
    /// fails ([`HubError::Peer`]) and nothing is queued.
    pub async fn request(
        &self,
        node: &str,
        message: Message,
        timeout: Duration,
    ) -> Result<Message, HubError> {
        if let Some(relay) = self.inner.relay.get()
            && let Some(peer) = self.relays_elsewhere(node)
        {
            let mut message = message;
            message.prepare().map_err(tether_hub::PublishError::from)?;
            return relay.request(&peer, node, &message, timeout).await;
        }
        self.request_here(node, message, timeout).await
    }

    /// A sync request through this replica's own channel of `node`.
    pub(crate) async fn request_here(
        &self,
        node: &str,
        message: Message,
        timeout: Duration,
    ) -> Result<Message, HubError> {
        Ok(self
            .channel_for_publish(node)?
            .request(message, timeout)
            .await?)
    }

    /// The state of one node, if it has a channel.
    pub fn node(&self, node: &str) -> Option<NodeStatus> {
        let channels = self.inner.channels.lock().expect("hub lock");
        channels.get(node).map(|c| status(node, c))
    }

    /// Every node with a channel, by name.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        let channels = self.inner.channels.lock().expect("hub lock");
        let mut v: Vec<_> = channels.iter().map(|(n, c)| status(n, c)).collect();
        v.sort_by(|a, b| a.node.cmp(&b.node));
        v
    }

    /// Subscribes to upstream messages, failures and node events (the
    /// filter's `peer` is the node).
    pub fn subscribe(&self, filter: Filter) -> Result<mpsc::Receiver<Event>, HubError> {
        Ok(self.inner.dispatcher.subscribe(filter)?)
    }

    /// The hub's listener on `tcp`: edges authenticate as for the stream
    /// tunnel (`tls` requires certificates from the edge CA); each session
    /// carries its node's channel. Add admission checks (the deny list) on
    /// the returned listener, then run it.
    pub fn listener(
        &self,
        tcp: tokio::net::TcpListener,
        tls: impl Into<ServerTls>,
        limits: TunnelLimits,
        shutdown: Shutdown,
    ) -> TunnelListener {
        let registry = self.inner.sessions.clone();
        TunnelListener::new(tcp, tls, limits, registry.clone())
            .on_event(self.session_hook(registry, shutdown))
    }

    /// The live hub sessions (to terminate revoked nodes).
    pub fn sessions(&self) -> SessionRegistry {
        self.inner.sessions.clone()
    }

    /// Cuts `node`'s hub session now (it reconnects on its own; nothing
    /// accepted is lost). False if it had none.
    pub fn disconnect(&self, node: &str) -> bool {
        if let Some(s) = self.inner.sessions.get(node) {
            s.terminate();
            return true;
        }
        match self.inner.carried.lock().expect("hub lock").get(node) {
            Some((_, cut)) => {
                cut.notify_one();
                true
            }
            None => false,
        }
    }

    /// Serves the hub sessions registered in `registry` (fed by the hub's
    /// own [`tether_tunnel::TunnelListener`]): returns the event hook to
    /// install on that listener.
    fn session_hook(
        &self,
        registry: SessionRegistry,
        shutdown: Shutdown,
    ) -> impl Fn(TunnelEvent<'_>) + Send + Sync + 'static {
        let hub = self.clone();
        move |ev| {
            if let TunnelEvent::Connected { info, .. } = ev
                && let Some(session) = registry.get(&info.node)
                && session.info().id == info.id
            {
                let hub = hub.clone();
                let shutdown = shutdown.clone();
                let span = info_span!("hub", node = %info.node, session.id = info.id);
                tokio::spawn(
                    async move { hub.serve_session(session, shutdown).await }.instrument(span),
                );
            }
        }
    }

    async fn serve_session(&self, session: Arc<dyn NodeSession>, shutdown: Shutdown) {
        let node: Arc<str> = session.info().node.as_str().into();
        let channel = match self.channel(&node) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot open the node's channel; closing its hub session");
                session.close();
                return;
            }
        };
        let io = match open_hub_stream(&session).await {
            Ok(io) => io,
            Err(HubStreamError::Refused(status)) => {
                warn!(%status, "edge refused the hub stream");
                session.close();
                return;
            }
            Err(e) => {
                debug!(error = %e, "hub stream failed to open");
                return;
            }
        };
        let end = self.run_channel(&node, &channel, io, &shutdown, None).await;
        // A replaced connection is not an outage: the newer one is up.
        if !matches!(end, ConnectionEnd::Replaced) {
            session.close();
        }
    }

    /// Serves `node`'s channel inside its stream-tunnel session, for edges
    /// that asked for it ([`SessionInfo::carries_hub`], ADR 0022): one
    /// connection per edge. A hub stream that ends while the session lives
    /// (keepalive, bad frames, [`CloudHub::disconnect`]) is opened again
    /// after a pause; a hub fault never closes the tunnel, whose kubelet
    /// streams are not the hub's to end.
    pub async fn serve_tunnel_session(&self, session: Arc<dyn NodeSession>, shutdown: Shutdown) {
        let id = session.info().id;
        let node: Arc<str> = session.info().node.as_str().into();
        let channel = match self.channel(&node) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot open the node's hub channel; the tunnel stays up without it");
                return;
            }
        };
        let cut = Arc::new(tokio::sync::Notify::new());
        self.inner
            .carried
            .lock()
            .expect("hub lock")
            .insert(node.to_string(), (id, cut.clone()));
        let mut pause = REOPEN_MIN;
        while !session.is_closed() && !shutdown.is_triggered() {
            // Boxed: opening is transient; the task lives as long as the session.
            let end = match Box::pin(open_hub_stream(&session)).await {
                Ok(io) => {
                    let end = self
                        .run_channel(&node, &channel, io, &shutdown, Some(&cut))
                        .await;
                    if matches!(end, ConnectionEnd::Replaced | ConnectionEnd::Shutdown) {
                        break;
                    }
                    pause = REOPEN_MIN;
                    end.to_string()
                }
                Err(e) => {
                    if matches!(e, HubStreamError::Refused(_)) {
                        warn!(error = %e, "edge refused the hub stream in its tunnel");
                    }
                    e.to_string()
                }
            };
            debug!(reason = %end, retry_in = ?pause, "hub stream in the tunnel ended; opening it again");
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.triggered() => break,
            }
            pause = (pause * 2).min(REOPEN_MAX);
        }
        let mut carried = self.inner.carried.lock().expect("hub lock");
        if carried.get(&*node).is_some_and(|(held, _)| *held == id) {
            carried.remove(&*node);
        }
    }

    /// Runs `channel` on one hub stream until it ends, announcing the node
    /// online and offline around it.
    async fn run_channel(
        &self,
        node: &Arc<str>,
        channel: &Channel,
        io: HubIo,
        shutdown: &Shutdown,
        cut: Option<&tokio::sync::Notify>,
    ) -> ConnectionEnd {
        info!("hub channel up");
        self.inner
            .dispatcher
            .announce(Event::Online { peer: node.clone() })
            .await;
        // The channel stream lives as long as the session: end it at
        // shutdown so the session can close instead of draining forever.
        let end = tokio::select! {
            end = channel.serve(io) => end,
            _ = shutdown.triggered() => ConnectionEnd::Shutdown,
            // Only a hub stream inside a tunnel is cut on its own.
            _ = async {
                match cut {
                    Some(cut) => cut.notified().await,
                    None => std::future::pending().await,
                }
            } => ConnectionEnd::Cut,
        };
        info!(reason = %end, "hub channel down");
        // A replaced connection is not an outage: the newer one is up.
        if !matches!(end, ConnectionEnd::Replaced) {
            self.inner
                .dispatcher
                .announce(Event::Offline { peer: node.clone() })
                .await;
        }
        end
    }
}

/// Pauses before a hub stream is opened again inside a live tunnel.
const REOPEN_MIN: Duration = Duration::from_millis(100);
const REOPEN_MAX: Duration = Duration::from_secs(10);

type HubIo = tether_tunnel::upgrade::TunnelIo;

/// Why a hub stream could not be opened.
#[derive(Debug, thiserror::Error)]
enum HubStreamError {
    #[error("edge answered the hub stream with {0}")]
    Refused(http::StatusCode),
    #[error("hub stream failed to open: {0}")]
    Stream(#[from] tether_tunnel::StreamError),
    #[error("hub stream upgrade failed: {0}")]
    Upgrade(#[from] tether_tunnel::upgrade::UpgradeError),
    #[error("edge did not answer the hub stream within {0:?}")]
    Timeout(Duration),
}

/// Opens the `tether-hub` stream in `session`.
async fn open_hub_stream(session: &Arc<dyn NodeSession>) -> Result<HubIo, HubStreamError> {
    let req = http::Request::connect(HUB_TARGET)
        .body(tether_tunnel::body_empty())
        .expect("static request");
    // An edge that never answers must not hold the stream slot forever.
    let open = async {
        let mut resp = session.send(req, HUB_TARGET).await?;
        if !resp.status().is_success() {
            return Err(HubStreamError::Refused(resp.status()));
        }
        Ok(tether_tunnel::upgrade::on(&mut resp).await?)
    };
    tokio::time::timeout(HUB_OPEN_TIMEOUT, open)
        .await
        .map_err(|_| HubStreamError::Timeout(HUB_OPEN_TIMEOUT))?
}

/// How long the edge has to answer the hub stream.
const HUB_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

fn status(node: &str, c: &Channel) -> NodeStatus {
    NodeStatus {
        node: node.to_owned(),
        online: c.is_connected(),
        queued: c.queued(),
    }
}
