//! The relay: hands the queues of nodes held by other replicas to them.
//! A publish for such a node, and a sweep every [`SWEEP_EVERY`] (which
//! catches sessions that moved away and ownership that changed), start at
//! most one relay task per node, at most [`MAX_RELAYS`] at a time. A task
//! sends the queue's oldest messages in batches, in order, and stops when
//! the queue is empty, the node has no remote holder, or the holder fails;
//! a failing peer (or a node it refuses) then waits a jittered, doubling
//! backoff before the sweep tries again. Nothing is removed here before the
//! holder has stored it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{Request, StatusCode, header};
use http_body_util::Full;
use tether_hub::{Channel, Message, Relayed};
use tether_tunnel::Shutdown;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::client::PeerClient;
use super::metrics::Outcome;
use super::{FROM_HEADER, HAND_OVER_HEADER, HandOver, PEER_PATH, PeerReplica, ReplicaLinks};
use crate::hub::{CloudHub, HubError, WeakHub};

/// How often every queue is checked for a remote holder.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// Relay tasks at most, across nodes (each holds one batch in memory).
const MAX_RELAYS: usize = 8;
/// Messages per relay batch at most.
const RELAY_BATCH: usize = 256;
/// Bytes per relay batch, about (at least one message).
const RELAY_BATCH_BYTES: usize = 2 << 20;
/// A relay batch's deadline, connect included.
const RELAY_DEADLINE: Duration = Duration::from_secs(10);
/// Extra time a forwarded sync request gets over its own wait.
const REQUEST_SLACK: Duration = Duration::from_secs(5);
/// Backoff after a failure: first wait and most.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Backoff entries kept at most (peers and refusing nodes).
const MAX_BACKOFFS: usize = 16_384;
/// Node hints queued for the relay loop at most; the sweep covers drops.
const HINTS: usize = 1024;
/// How long a new hub connection holds its sends while older queues of
/// its node are pulled from the other replicas.
const PULL_HOLD: Duration = Duration::from_secs(1);
/// Pulls at a time (a reconnect storm waits, then sends unordered).
const MAX_PULLS: usize = 16;

/// What waits after a failure: a peer that could not be reached, or one
/// node a peer refused (its queue there is full, or it moved on).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Key {
    Peer(SocketAddr),
    Node(String),
}

struct Backoff {
    wait: Duration,
    until: Instant,
}

/// The relay of one hub.
pub(crate) struct Relayer {
    links: ReplicaLinks,
    client: PeerClient,
    hints: mpsc::Sender<String>,
    busy: Mutex<HashSet<String>>,
    backoff: Mutex<HashMap<Key, Backoff>>,
    slots: Arc<Semaphore>,
    pulls: Arc<Semaphore>,
}

impl Relayer {
    /// Starts the relay loop for `hub`; it ends at shutdown or when the hub
    /// is gone.
    pub(crate) fn start(hub: &CloudHub, links: ReplicaLinks, shutdown: Shutdown) -> Arc<Self> {
        let (hints, rx) = mpsc::channel(HINTS);
        let this = Arc::new(Self {
            client: PeerClient::new(links.client_tls.clone(), links.server_name.clone()),
            links,
            hints,
            busy: Mutex::new(HashSet::new()),
            backoff: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(MAX_RELAYS)),
            pulls: Arc::new(Semaphore::new(MAX_PULLS)),
        });
        tokio::spawn(this.clone().run(hub.downgrade(), rx, shutdown));
        this
    }

    /// The live replica, other than this one, holding `node`.
    pub(crate) fn owner_of(&self, node: &str) -> Option<PeerReplica> {
        self.links.directory.owner_of(node)
    }

    pub(crate) fn metrics(&self) -> &super::RelayMetrics {
        &self.links.metrics
    }

    /// Makes every new connection of `channel` pull its node's older
    /// queues from the other replicas before it sends (see
    /// [`Channel::on_connect`]).
    pub(crate) fn install(self: &Arc<Self>, channel: &Channel) {
        let relay = Arc::downgrade(self);
        channel.on_connect(
            Arc::new(move |ch: &Channel| match relay.upgrade() {
                Some(relay) => relay.pull(ch.clone()),
                None => ch.release_hold(),
            }),
            PULL_HOLD,
        );
    }

    /// Asks every other live replica to hand over what it holds for the
    /// channel's node, then lets the channel send; all within
    /// [`PULL_HOLD`], so a dead peer delays a reconnect by that at most.
    fn pull(self: Arc<Self>, channel: Channel) {
        tokio::spawn(async move {
            let _release = ReleaseHold(channel.clone());
            let node = channel.peer().to_owned();
            let deadline = Instant::now() + PULL_HOLD;
            let slot = tokio::time::timeout_at(deadline, self.pulls.clone().acquire_owned()).await;
            let Ok(Ok(_slot)) = slot else {
                self.links.metrics.pull(Outcome::Refused);
                return;
            };
            // A batch this replica is still relaying to the old holder
            // must land there before that holder hands the node over.
            while self.busy.lock().expect("busy lock").contains(&node) && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut asks = tokio::task::JoinSet::new();
            for peer in self.links.directory.live_replicas() {
                let (this, node) = (self.clone(), node.clone());
                asks.spawn(async move { this.ask_hand_over(&peer, &node, deadline).await });
            }
            let all = async { while asks.join_next().await.is_some() {} };
            if tokio::time::timeout_at(deadline, all).await.is_err() {
                self.links.metrics.pull(Outcome::Unreachable);
            }
        });
    }

    async fn ask_hand_over(&self, peer: &PeerReplica, node: &str, deadline: Instant) {
        let req = Request::post(format!("{PEER_PATH}nodes/{node}/hand-over"))
            .header(header::HOST, "tether-peer")
            .header(FROM_HEADER, &self.links.replica)
            .body(Full::new(Bytes::new()));
        let Ok(req) = req else { return };
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.client.call(peer.addr, req, wait, true).await {
            Ok((status, body)) if status.is_success() => {
                // `left`: what the peer could not hand over in time.
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                match v["left"].as_u64() {
                    Some(left) if left > 0 => {
                        self.links.metrics.pull(Outcome::Unreachable);
                        debug!(node, replica = %peer.replica, left, "hand-over cut short");
                    }
                    _ => self.links.metrics.pull(Outcome::Ok),
                }
            }
            Ok((status, body)) => {
                self.links.metrics.pull(Outcome::Refused);
                debug!(node, replica = %peer.replica, %status,
                    answer = %String::from_utf8_lossy(&body), "hand-over refused");
            }
            Err(e) => {
                self.links.metrics.pull(Outcome::Unreachable);
                debug!(node, replica = %peer.replica, error = %e, "hand-over not asked");
            }
        }
    }

    /// Replica `to` holds `node` now and asks for what waits here: a stale
    /// session of the node here is cut, then the queue is relayed to `to`
    /// (with the hand-over mark: `to` takes it whatever its records say).
    /// Returns how many messages `to` took, and how many are left here
    /// (the deadline passed or `to` refused; the sweep relays them later).
    pub(crate) async fn hand_to(
        &self,
        hub: &CloudHub,
        node: &str,
        to: &str,
    ) -> Result<(usize, usize), String> {
        let deadline = Instant::now() + PULL_HOLD;
        let Some(peer) = self
            .links
            .directory
            .live_replicas()
            .into_iter()
            .find(|p| p.replica == to)
        else {
            return Err(format!(
                "replica {to:?} is not live in this replica's records"
            ));
        };
        let Some(channel) = hub.existing_channel(node) else {
            return Ok((0, 0));
        };
        if channel.is_connected() {
            // The node's hub session is on `to` now; this one is stale.
            // Its queue goes now, whether or not it has wound down yet.
            hub.disconnect(node);
        }
        let mut handed = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let batch = channel.hand_over_batch(RELAY_BATCH, RELAY_BATCH_BYTES);
            if batch.is_empty() || left.is_zero() {
                return Ok((handed, channel.queued()));
            }
            let (taken, refused) = self.post(&peer, node, &batch, true, left).await;
            let seqs: Vec<u64> = batch.iter().take(taken).map(|r| r.seq).collect();
            channel.relayed(&seqs).await;
            handed += taken;
            let outcome = match &refused {
                None => Outcome::Ok,
                Some(RelayFailure::Refused(..)) => Outcome::Refused,
                Some(RelayFailure::Unreachable(_)) => Outcome::Unreachable,
            };
            self.links.metrics.batch(outcome, taken);
            if refused.is_some() {
                return Ok((handed, channel.queued()));
            }
        }
    }

    /// A message was queued for `node` while no session of it is here.
    pub(crate) fn hint(&self, node: &str) {
        let _ = self.hints.try_send(node.to_owned());
    }

    async fn run(self: Arc<Self>, hub: WeakHub, mut hints: mpsc::Receiver<String>, sd: Shutdown) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let only = tokio::select! {
                h = hints.recv() => match h {
                    Some(node) => Some(node),
                    None => return,
                },
                _ = sweep.tick() => None,
                _ = sd.triggered() => return,
            };
            let Some(hub) = hub.upgrade() else { return };
            let nodes = match only {
                Some(node) => vec![node],
                None => hub.relay_candidates(),
            };
            for node in nodes {
                self.start_node(&hub, node, &sd);
            }
        }
    }

    /// Starts a relay task for `node` if its queue waits here for a remote
    /// holder that is not backing off, and none runs yet.
    fn start_node(self: &Arc<Self>, hub: &CloudHub, node: String, sd: &Shutdown) {
        let Some(channel) = hub.existing_channel(&node) else {
            return;
        };
        if channel.is_connected() || channel.queued() == 0 {
            return;
        }
        let Some(peer) = self.owner_of(&node) else {
            return;
        };
        if self.waiting(&Key::Peer(peer.addr)) || self.waiting(&Key::Node(node.clone())) {
            return;
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return; // the sweep comes back
        };
        if !self.busy.lock().expect("busy lock").insert(node.clone()) {
            return;
        }
        let this = self.clone();
        let hub = hub.clone();
        let sd = sd.clone();
        tokio::spawn(async move {
            this.relay_node(&channel, &node, &sd).await;
            this.busy.lock().expect("busy lock").remove(&node);
            drop(slot);
            // A publish whose hint came while this task was finishing.
            if !sd.is_triggered() && !channel.relay_batch(1, 0).is_empty() {
                this.start_node(&hub, node, &sd);
            }
        });
    }

    async fn relay_node(&self, channel: &Channel, node: &str, sd: &Shutdown) {
        while !sd.is_triggered() {
            let batch = channel.relay_batch(RELAY_BATCH, RELAY_BATCH_BYTES);
            if batch.is_empty() {
                return;
            }
            let Some(peer) = self.owner_of(node) else {
                return;
            };
            let (taken, refused) = self.post(&peer, node, &batch, false, RELAY_DEADLINE).await;
            let seqs: Vec<u64> = batch.iter().take(taken).map(|r| r.seq).collect();
            channel.relayed(&seqs).await;
            match refused {
                None => {
                    self.links.metrics.batch(Outcome::Ok, taken);
                    self.clear(&Key::Peer(peer.addr));
                    self.clear(&Key::Node(node.to_owned()));
                    debug!(node, replica = %peer.replica, taken, "relayed");
                }
                Some(RelayFailure::Refused(status, text)) => {
                    self.links.metrics.batch(Outcome::Refused, taken);
                    let wait = self.fail(Key::Node(node.to_owned()));
                    info!(node, replica = %peer.replica, taken, %status, reason = %text, ?wait,
                        "holder refused relayed messages; retrying later");
                    return;
                }
                Some(RelayFailure::Unreachable(e)) => {
                    self.links.metrics.batch(Outcome::Unreachable, 0);
                    let wait = self.fail(Key::Peer(peer.addr));
                    warn!(node, replica = %peer.replica, error = %e, ?wait,
                        "holder unreachable; messages stay queued here");
                    return;
                }
            }
        }
    }

    /// Sends `batch` to `peer`: how many it took, from the front, and why
    /// not the rest.
    async fn post(
        &self,
        peer: &PeerReplica,
        node: &str,
        batch: &[Relayed],
        hand_over: bool,
        deadline: Duration,
    ) -> (usize, Option<RelayFailure>) {
        let mut body = BytesMut::with_capacity(batch.iter().map(|r| r.frame.len() + 1).sum());
        for r in batch {
            body.put_slice(&r.frame);
            body.put_u8(b'\n');
        }
        let mut req = Request::post(format!("{PEER_PATH}nodes/{node}/messages"))
            .header(header::HOST, "tether-peer")
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .header(FROM_HEADER, &self.links.replica);
        if hand_over {
            req = req.header(HAND_OVER_HEADER, "1");
        }
        let req = req.body(Full::new(body.freeze()));
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                return (
                    0,
                    Some(RelayFailure::Refused(
                        StatusCode::BAD_REQUEST,
                        e.to_string(),
                    )),
                );
            }
        };
        match self.client.call(peer.addr, req, deadline, true).await {
            Err(e) => (0, Some(RelayFailure::Unreachable(e.to_string()))),
            Ok((status, answer)) => {
                let v: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
                let taken = v["accepted"].as_u64().unwrap_or(0) as usize;
                let taken = taken.min(batch.len());
                if status.is_success() && taken == batch.len() {
                    (taken, None)
                } else {
                    let text = v["error"].as_str().unwrap_or("no reason given").to_owned();
                    (taken, Some(RelayFailure::Refused(status, text)))
                }
            }
        }
    }

    /// Forwards a sync request to the replica holding `node` and returns
    /// its answer: the edge's response, or the holder's refusal.
    pub(crate) async fn request(
        &self,
        peer: &PeerReplica,
        node: &str,
        message: &Message,
        wait: Duration,
    ) -> Result<Message, HubError> {
        let failed = |status: Option<StatusCode>, reason: String| HubError::Peer {
            node: node.to_owned(),
            replica: peer.replica.clone(),
            status,
            reason,
        };
        let req = Request::post(format!(
            "{PEER_PATH}nodes/{node}/request?timeout_ms={}",
            wait.as_millis()
        ))
        .header(header::HOST, "tether-peer")
        .header(header::CONTENT_TYPE, "application/json")
        .header(FROM_HEADER, &self.links.replica)
        .body(Full::new(Bytes::from(message.to_json())))
        .map_err(|e| failed(Some(StatusCode::BAD_REQUEST), e.to_string()))?;
        // A fresh connection: a sync request is not resent blindly.
        let answer = self
            .client
            .call(peer.addr, req, wait + REQUEST_SLACK, false)
            .await;
        let (status, body) = match answer {
            Ok(a) => a,
            Err(e) => {
                self.links.metrics.request(Outcome::Unreachable);
                return Err(failed(None, e.to_string()));
            }
        };
        if status.is_success() {
            self.links.metrics.request(Outcome::Ok);
            return Message::from_json(&body, super::client::MAX_ANSWER)
                .map_err(|e| failed(Some(StatusCode::BAD_GATEWAY), e.to_string()));
        }
        self.links.metrics.request(Outcome::Refused);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let reason = v["error"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        Err(failed(Some(status), reason))
    }

    /// This replica is leaving (its sessions are closed): hands every
    /// queue to the node's holder, or else to any live replica, which
    /// keeps it until the node shows up somewhere. Bounded by `within`.
    pub(crate) async fn hand_over(&self, hub: &CloudHub, within: Duration) -> HandOver {
        let deadline = Instant::now() + within;
        let replicas = self.links.directory.live_replicas();
        let mut dead: HashSet<SocketAddr> = HashSet::new();
        let mut out = HandOver::default();
        for node in hub.relay_candidates() {
            let Some(channel) = hub.existing_channel(&node) else {
                continue;
            };
            loop {
                let batch = channel.relay_batch(RELAY_BATCH, RELAY_BATCH_BYTES);
                if batch.is_empty() {
                    break;
                }
                let mut progress = false;
                let targets: Vec<PeerReplica> = self
                    .owner_of(&node)
                    .into_iter()
                    .chain(replicas.clone())
                    .collect();
                for peer in targets {
                    if dead.contains(&peer.addr) {
                        continue;
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    let wait = left.min(RELAY_DEADLINE);
                    let (taken, refused) = self.post(&peer, &node, &batch, true, wait).await;
                    let seqs: Vec<u64> = batch.iter().take(taken).map(|r| r.seq).collect();
                    channel.relayed(&seqs).await;
                    out.handed += taken;
                    match refused {
                        None => self.links.metrics.batch(Outcome::Ok, taken),
                        Some(RelayFailure::Refused(..)) => {
                            self.links.metrics.batch(Outcome::Refused, taken)
                        }
                        Some(RelayFailure::Unreachable(_)) => {
                            self.links.metrics.batch(Outcome::Unreachable, 0);
                            dead.insert(peer.addr);
                        }
                    }
                    if taken > 0 {
                        progress = true;
                        break;
                    }
                }
                if !progress {
                    break;
                }
            }
        }
        out.left = hub
            .relay_candidates()
            .iter()
            .filter_map(|n| hub.existing_channel(n))
            .map(|c| c.queued())
            .sum();
        out
    }

    fn waiting(&self, key: &Key) -> bool {
        let backoff = self.backoff.lock().expect("backoff lock");
        backoff.get(key).is_some_and(|b| b.until > Instant::now())
    }

    fn clear(&self, key: &Key) {
        self.backoff.lock().expect("backoff lock").remove(key);
    }

    /// Records a failure of `key`; returns how long it now waits.
    fn fail(&self, key: Key) -> Duration {
        let mut backoff = self.backoff.lock().expect("backoff lock");
        let now = Instant::now();
        if backoff.len() >= MAX_BACKOFFS {
            backoff.retain(|_, b| b.until > now);
        }
        let wait = backoff
            .get(&key)
            .map_or(BACKOFF_FIRST, |b| (b.wait * 2).min(BACKOFF_MAX));
        // Up to a quarter less, so replicas retrying one peer spread out.
        let jitter = wait.mul_f64((tether_pki::rand_u64() % 1000) as f64 / 4000.0);
        if backoff.len() < MAX_BACKOFFS {
            backoff.insert(
                key,
                Backoff {
                    wait,
                    until: now + wait - jitter,
                },
            );
        }
        wait - jitter
    }
}

/// Lets the channel send when the pull ends, however it ends.
struct ReleaseHold(Channel);

impl Drop for ReleaseHold {
    fn drop(&mut self) {
        self.0.release_hold();
    }
}

/// Why a relay batch was not taken whole.
enum RelayFailure {
    /// The holder answered but took only a prefix.
    Refused(StatusCode, String),
    /// No answer.
    Unreachable(String),
}
