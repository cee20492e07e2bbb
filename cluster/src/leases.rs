//! Which replica holds each node's session, recorded in Kubernetes Leases
//! (`coordination.k8s.io/v1`) in Tether's namespace, so that a request that
//! reaches the wrong cloud replica can be forwarded to the right one.
//!
//! Two kinds of Lease, both labelled `app.kubernetes.io/name=tether`:
//! - `tether-replica-<replica id>` (`tether.dev/lease=replica`): this replica
//!   is alive. Its holder is the replica, it is renewed every third of
//!   `leaseDurationSeconds`, and the `tether.dev/peer-address` annotation says
//!   where peers reach it. Graceful shutdown deletes it.
//! - `tether-node-<node>` (`tether.dev/lease=node`, `tether.dev/node=<node>`):
//!   its holder is the replica that holds the node's session. It has no
//!   duration of its own: it counts only while its holder's replica Lease does.
//!
//! `claim` and `release` never block: they record the latest wish per node and
//! a worker per node writes it ([`node`]), like the kubelet-port patcher.
//! `owner` never calls the API: it reads a reflector store fed by a
//! list+watch of both kinds, which kube-runtime restarts after a watch ends
//! and relists after `410 Gone`.

mod node;
mod replica;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{Semaphore, watch};
use tracing::{Instrument, info, info_span, warn};

use tether_cloudstream::peer::{Ownership, PeerAddr};
use tether_tunnel::Shutdown;

use crate::Cluster;
use crate::retry::{RetryPolicy, WatchBackoff};

/// The label every Tether Lease carries; the cache watches this selector.
pub const APP_LABEL: &str = "app.kubernetes.io/name";
/// The label that tells replica Leases (`replica`) from node Leases (`node`).
pub const LEASE_KIND_LABEL: &str = "tether.dev/lease";
/// The label naming a node Lease's node (left out for names over 63
/// characters, the limit of a label value; the Lease name still has it).
pub const NODE_LABEL: &str = "tether.dev/node";
/// The annotation of a replica Lease with the replica's peer address (`ip:port`).
pub const PEER_ADDRESS_ANNOTATION: &str = "tether.dev/peer-address";
/// The annotation of a node Lease with the node's addresses
/// (comma-separated, from its certificate), for routing by address.
pub const NODE_IPS_ANNOTATION: &str = "tether.dev/node-ips";
/// The annotation of a node Lease with the endpoints its edge announced
/// (comma-separated `ip:port`), for every replica's service discovery.
pub const NODE_ENDPOINTS_ANNOTATION: &str = "tether.dev/endpoints";
/// Name prefix of replica Leases.
pub const REPLICA_LEASE_PREFIX: &str = "tether-replica-";
/// Name prefix of node Leases.
pub const NODE_LEASE_PREFIX: &str = "tether-node-";

const APP: &str = "tether";
const SELECTOR: &str = "app.kubernetes.io/name=tether";
/// The longest object name Kubernetes takes (a DNS-1123 subdomain).
const MAX_OBJECT_NAME: usize = 253;
/// The longest label value.
const MAX_LABEL_VALUE: usize = 63;
/// Nodes with a write pending at once. A fleet reconnecting after a replica
/// died fits many times over; past it, a claim is dropped with a warning
/// rather than growing without bound.
const MAX_PENDING_NODES: usize = 65_536;
/// Lease writes in flight at once across all nodes.
const MAX_CONCURRENT_WRITES: usize = 16;

/// Why the ownership records cannot start.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// This replica's id cannot be part of a Lease name.
    #[error("replica id {id:?} cannot name its Lease ({REPLICA_LEASE_PREFIX}<id>): {reason}")]
    ReplicaId {
        /// The replica id.
        id: String,
        /// Why.
        #[source]
        reason: NameError,
    },
    /// `leaseDurationSeconds` is a whole number of seconds.
    #[error("lease duration {0:?} must be a whole number of seconds from 1 s to 1 h")]
    Duration(Duration),
}

/// Why a node or replica name cannot be part of a Lease name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Object names are DNS-1123 subdomains, so the name must be one too.
    #[error(
        "not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', \
         each dot-separated part starting and ending with a letter or digit)"
    )]
    NotDns1123,
    /// With its prefix, the name passes the 253 characters of an object name.
    #[error(
        "the Lease name would be {len} characters, over the {MAX_OBJECT_NAME} Kubernetes allows"
    )]
    TooLong {
        /// Length of the Lease name.
        len: usize,
    },
}

/// The Lease recording who holds `node`'s session.
pub fn node_lease_name(node: &str) -> Result<String, NameError> {
    lease_name(NODE_LEASE_PREFIX, node)
}

/// The Lease saying replica `replica` is alive.
pub fn replica_lease_name(replica: &str) -> Result<String, NameError> {
    lease_name(REPLICA_LEASE_PREFIX, replica)
}

fn lease_name(prefix: &str, name: &str) -> Result<String, NameError> {
    if !is_dns1123_subdomain(name) {
        return Err(NameError::NotDns1123);
    }
    let full = format!("{prefix}{name}");
    match full.len() {
        len if len > MAX_OBJECT_NAME => Err(NameError::TooLong { len }),
        _ => Ok(full),
    }
}

fn is_dns1123_subdomain(s: &str) -> bool {
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !s.is_empty()
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            b.first().is_some_and(alnum)
                && b.last().is_some_and(alnum)
                && b.iter().all(|c| alnum(c) || *c == b'-')
        })
}

/// Tuning of the ownership records.
#[derive(Clone, Debug)]
pub struct LeaseOptions {
    /// `leaseDurationSeconds` of this replica's Lease, whole seconds
    /// (default 15 s): how long peers keep forwarding to a replica that
    /// stopped renewing without shutting down cleanly. Renewed every third.
    pub lease_duration: Duration,
    /// Retry schedule of each node Lease write (default 50 ms doubling to
    /// 5 s, 10 attempts): conflicts between replicas clear fast.
    pub retry: RetryPolicy,
    /// First delay before re-listing or re-watching after a watch error
    /// (default 500 ms).
    pub watch_backoff_base: Duration,
    /// Longest such delay (default 5 s: while the watch is down, lookups
    /// answer from an aging cache).
    pub watch_backoff_max: Duration,
    /// Longest time graceful shutdown spends removing this replica's Leases
    /// (default 5 s); what is left expires with the replica Lease.
    pub resign_timeout: Duration,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            retry: RetryPolicy {
                base: Duration::from_millis(50),
                max: Duration::from_secs(5),
                attempts: 10,
            },
            watch_backoff_base: Duration::from_millis(500),
            watch_backoff_max: Duration::from_secs(5),
            resign_timeout: Duration::from_secs(5),
        }
    }
}

fn lease_seconds(d: Duration) -> Result<i32, LeaseError> {
    match (d.as_secs(), d.subsec_nanos()) {
        (s @ 1..=3600, 0) => Ok(s as i32),
        _ => Err(LeaseError::Duration(d)),
    }
}

/// What a node's worker is to write next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// Hold the node; the time of the claim decides between replicas.
    Claim(Timestamp),
    /// Let it go if this replica still holds it.
    Release,
}

struct Intent {
    want: Want,
    /// Bumped by every request, so a worker knows a new one came in.
    generation: u64,
}

#[derive(Default)]
struct Local {
    /// Nodes whose last call here was `claim`.
    held: HashSet<String>,
    /// The latest wish for each node whose worker runs.
    intents: HashMap<String, Intent>,
    /// Addresses and announced endpoints of the nodes held here, written
    /// into their Leases.
    ips: HashMap<String, (Vec<std::net::IpAddr>, Vec<SocketAddr>)>,
}

struct Inner {
    replica: String,
    replica_lease: String,
    namespace: String,
    peer_addr: SocketAddr,
    lease_seconds: i32,
    opts: LeaseOptions,
    api: Api<Lease>,
    store: Store<Lease>,
    local: Mutex<Local>,
    /// Mirrors `local.intents.len()`, for waiting until every write is done.
    pending: watch::Sender<usize>,
    in_flight: Semaphore,
    /// Bumped on every watch event.
    cache_version: watch::Sender<u64>,
    /// True once shutdown has removed (or given up removing) our Leases.
    stopped: watch::Sender<bool>,
    shutdown: Shutdown,
}

/// The ownership records of this replica, in Leases. Implements cloudstream's
/// [`Ownership`].
///
/// Its tasks end at shutdown, not when the handle is dropped: the graceful
/// removal of this replica's Leases must finish after the front that held the
/// handle has stopped. Wait for it with [`LeaseOwnership::wait_stopped`].
pub struct LeaseOwnership {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LeaseOwnership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseOwnership")
            .field("replica", &self.inner.replica)
            .field("namespace", &self.inner.namespace)
            .field("peer_addr", &self.inner.peer_addr)
            .finish_non_exhaustive()
    }
}

impl LeaseOwnership {
    /// Starts keeping this replica's Lease (naming `peer_addr`, where peers
    /// reach its peer listener) and the cache of all Tether Leases in
    /// `cluster`'s namespace. Refuses a replica id that cannot name a Lease
    /// and a duration that is not whole seconds.
    pub fn start(
        cluster: &Cluster,
        peer_addr: SocketAddr,
        opts: LeaseOptions,
        shutdown: Shutdown,
    ) -> Result<Arc<Self>, LeaseError> {
        let replica = cluster.replica_id().to_owned();
        let replica_lease =
            replica_lease_name(&replica).map_err(|reason| LeaseError::ReplicaId {
                id: replica.clone(),
                reason,
            })?;
        let lease_seconds = lease_seconds(opts.lease_duration)?;
        let api: Api<Lease> = Api::namespaced(cluster.client().clone(), cluster.namespace());
        let (store, writer) = reflector::store();
        // Default list semantics: consistent reads, so a relist after 410
        // Gone never goes back in time.
        let events = reflector::reflector(
            writer,
            watcher::watcher(api.clone(), watcher::Config::default().labels(SELECTOR)).backoff(
                WatchBackoff::new(opts.watch_backoff_base, opts.watch_backoff_max),
            ),
        );
        let inner = Arc::new(Inner {
            replica,
            replica_lease,
            namespace: cluster.namespace().to_owned(),
            peer_addr,
            lease_seconds,
            opts,
            api,
            store,
            local: Mutex::new(Local::default()),
            pending: watch::channel(0).0,
            in_flight: Semaphore::new(MAX_CONCURRENT_WRITES),
            cache_version: watch::channel(0).0,
            stopped: watch::channel(false).0,
            shutdown,
        });
        let span = info_span!("leases", replica = %inner.replica, peer.addr = %peer_addr);
        tokio::spawn(inner.clone().follow(events).instrument(span.clone()));
        tokio::spawn(inner.clone().keep_replica_lease().instrument(span));
        Ok(Arc::new(Self { inner }))
    }

    /// This replica's id, the holder it writes.
    pub fn replica(&self) -> &str {
        &self.inner.replica
    }

    /// Nodes with a Lease write pending or in progress.
    pub fn pending(&self) -> usize {
        *self.inner.pending.borrow()
    }

    /// Waits until no node Lease write is pending, or `timeout` passes.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.pending.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits until the first list of Leases is in the cache, or `timeout` passes.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.inner.store.wait_until_ready())
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits until `pred` holds, checked after every watch event, or
    /// `timeout` passes.
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&Self) -> bool) -> bool {
        let mut rx = self.inner.cache_version.subscribe();
        tokio::time::timeout(timeout, async {
            loop {
                if pred(self) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok()
    }

    /// Waits until shutdown has removed this replica's Leases (or given up
    /// after [`LeaseOptions::resign_timeout`]), or `timeout` passes.
    pub async fn wait_stopped(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.stopped.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl Ownership for LeaseOwnership {
    fn claim(&self, session: &tether_tunnel::SessionInfo) {
        let node = session.node.as_str();
        {
            let mut local = self.inner.local.lock().expect("lease lock");
            // Bounded like the held set: one entry per node held here.
            local.ips.insert(
                node.to_owned(),
                (session.ips.clone(), session.endpoints.clone()),
            );
        }
        self.inner.request(node, Want::Claim(Timestamp::now()));
    }

    fn remote_nodes(&self) -> Vec<tether_cloudstream::peer::HeldNode> {
        let now = Timestamp::now();
        self.inner
            .store
            .state()
            .into_iter()
            .filter_map(|lease| {
                let node = lease
                    .metadata
                    .name
                    .as_deref()?
                    .strip_prefix(NODE_LEASE_PREFIX)?
                    .to_owned();
                let peer = self.inner.owner_at(&node, now)?;
                let list = |key: &str| -> String {
                    lease
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(key))
                        .cloned()
                        .unwrap_or_default()
                };
                Some(tether_cloudstream::peer::HeldNode {
                    node,
                    replica: peer.replica,
                    ips: list(NODE_IPS_ANNOTATION)
                        .split(',')
                        .filter_map(|a| a.parse().ok())
                        .collect(),
                    endpoints: list(NODE_ENDPOINTS_ANNOTATION)
                        .split(',')
                        .filter_map(|a| a.parse().ok())
                        .take(64)
                        .collect(),
                })
            })
            .collect()
    }

    fn release(&self, node: &str) {
        self.inner
            .local
            .lock()
            .expect("lease lock")
            .ips
            .remove(node);
        self.inner.request(node, Want::Release);
    }

    fn owner_of_ip(&self, ip: std::net::IpAddr) -> Option<(String, PeerAddr)> {
        // A scan of the cached node Leases: this path serves only requests
        // that reached a replica without the session, and a fleet's Leases
        // are a few thousand small objects in memory.
        let want = ip.to_string();
        let node = self.inner.store.state().into_iter().find_map(|lease| {
            let ips = lease
                .metadata
                .annotations
                .as_ref()?
                .get(NODE_IPS_ANNOTATION)?;
            if !ips.split(',').any(|a| a == want) {
                return None;
            }
            lease
                .metadata
                .name
                .as_deref()?
                .strip_prefix(NODE_LEASE_PREFIX)
                .map(str::to_owned)
        })?;
        let peer = self.inner.owner_at(&node, Timestamp::now())?;
        Some((node, peer))
    }

    fn owner(&self, node: &str) -> Option<PeerAddr> {
        self.inner.owner_at(node, Timestamp::now())
    }

    fn live_replicas(&self) -> Vec<PeerAddr> {
        let now = Timestamp::now();
        self.inner
            .store
            .state()
            .into_iter()
            .filter_map(|lease| {
                let id = lease
                    .metadata
                    .name
                    .as_deref()?
                    .strip_prefix(REPLICA_LEASE_PREFIX)?;
                if id == self.inner.replica {
                    return None;
                }
                self.inner.replica_at(id, now)
            })
            .collect()
    }
}

impl Inner {
    fn cached(&self, name: &str) -> Option<Arc<Lease>> {
        self.store
            .get(&ObjectRef::new(name).within(&self.namespace))
    }

    /// The live replica other than this one that holds `node`, as of `now`.
    fn owner_at(&self, node: &str, now: Timestamp) -> Option<PeerAddr> {
        let lease = self.cached(&node_lease_name(node).ok()?)?;
        let holder = holder(&lease)?;
        if holder == self.replica {
            return None;
        }
        self.replica_at(holder, now)
    }

    /// Replica `id`'s peer listener, if its replica Lease is live at `now`.
    fn replica_at(&self, id: &str, now: Timestamp) -> Option<PeerAddr> {
        let replica = self.cached(&replica_lease_name(id).ok()?)?;
        let spec = replica.spec.as_ref()?;
        if spec.holder_identity.as_deref() != Some(id) || expired(spec, now) {
            return None;
        }
        let addr = replica
            .metadata
            .annotations
            .as_ref()?
            .get(PEER_ADDRESS_ANNOTATION)?
            .parse()
            .ok()?;
        Some(PeerAddr {
            replica: id.to_owned(),
            addr,
        })
    }

    /// Feeds the store (the reflector does) until shutdown, and after every
    /// complete list lets go of node Leases left by an earlier run.
    async fn follow<S>(self: Arc<Self>, events: S)
    where
        S: futures_util::Stream<Item = Result<watcher::Event<Lease>, watcher::Error>> + Send,
    {
        futures_util::pin_mut!(events);
        loop {
            let event = tokio::select! {
                e = events.next() => e,
                _ = self.shutdown.triggered() => return,
            };
            match event {
                // The watcher stream never ends by itself; be loud if it does.
                None => {
                    warn!("lease watch ended; the ownership cache is frozen");
                    return;
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    info!(leases = self.store.len(), "lease cache loaded");
                    self.release_stale();
                }
                Some(Ok(_)) => {}
                // The watcher restarts (or relists after 410 Gone) by itself
                // on the next poll, after the backoff delay.
                Some(Err(e)) => warn!(error = %e, "lease watch failed; retrying"),
            }
            self.cache_version.send_modify(|v| *v += 1);
        }
    }

    /// Node Leases that name this replica for nodes it holds no session of
    /// were left by an earlier run under the same id (a crash, a container
    /// restart). Peers would forward to it in vain, so they are released.
    fn release_stale(self: &Arc<Self>) {
        let stale: Vec<String> = self
            .store
            .state()
            .iter()
            .filter(|l| holder(l) == Some(self.replica.as_str()))
            .filter_map(|l| node_of(l).map(str::to_owned))
            .collect();
        if stale.is_empty() {
            return;
        }
        let mut local = self.local.lock().expect("lease lock");
        for node in stale {
            if !local.held.contains(&node) && !local.intents.contains_key(&node) {
                info!(node = %node, "releasing a node lease left by an earlier run");
                self.enqueue(&mut local, &node, Want::Release);
            }
        }
    }
}

/// The holder of a Lease, if any.
fn holder(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()?
        .holder_identity
        .as_deref()
        .filter(|h| !h.is_empty())
}

/// The node of a node Lease.
fn node_of(lease: &Lease) -> Option<&str> {
    let kind = lease.metadata.labels.as_ref()?.get(LEASE_KIND_LABEL)?;
    if kind != "node" {
        return None;
    }
    lease
        .metadata
        .name
        .as_deref()?
        .strip_prefix(NODE_LEASE_PREFIX)
}

/// True when the Lease was not renewed within its duration before `now`
/// (or never says when it was). Replicas compare their own clocks with the
/// writer's: clock skew shortens or lengthens the grace by as much.
fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let (Some(renewed), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return true;
    };
    if secs <= 0 {
        return true;
    }
    // Past the end of time: not a renewal anyone wrote in earnest.
    renewed
        .0
        .checked_add(SignedDuration::from_secs(i64::from(secs)))
        .ok()
        .is_none_or(|until| until < now)
}

/// The labels of a Tether Lease of `kind`.
fn labels(kind: &str) -> BTreeMap<String, String> {
    [(APP_LABEL, APP), (LEASE_KIND_LABEL, kind)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    #[test]
    fn lease_names_are_dns_subdomains_within_253_characters() {
        assert_eq!(node_lease_name("edge-1").unwrap(), "tether-node-edge-1");
        assert_eq!(
            replica_lease_name("tether-cloud-5d9c7-x2z").unwrap(),
            "tether-replica-tether-cloud-5d9c7-x2z"
        );
        assert_eq!(
            node_lease_name("edge-1.site-a.example").unwrap(),
            "tether-node-edge-1.site-a.example"
        );
        // 253 minus the 12 characters of the prefix.
        let longest = "a".repeat(MAX_OBJECT_NAME - NODE_LEASE_PREFIX.len());
        assert_eq!(node_lease_name(&longest).unwrap().len(), MAX_OBJECT_NAME);
        let over = format!("{longest}b");
        assert_eq!(
            node_lease_name(&over),
            Err(NameError::TooLong {
                len: MAX_OBJECT_NAME + 1
            })
        );
        for bad in [
            "", "Edge-1", "-edge", "edge-", "edge..1", "edge_1", "edge/1", ".a",
        ] {
            assert_eq!(node_lease_name(bad), Err(NameError::NotDns1123), "{bad:?}");
        }
    }

    #[test]
    fn lease_duration_is_whole_seconds() {
        assert_eq!(lease_seconds(Duration::from_secs(15)).unwrap(), 15);
        assert_eq!(lease_seconds(Duration::from_secs(1)).unwrap(), 1);
        for bad in [
            Duration::ZERO,
            Duration::from_millis(1500),
            Duration::from_secs(3601),
        ] {
            assert!(lease_seconds(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_lease_expires_after_its_duration_from_the_last_renewal() {
        let now: Timestamp = "2026-11-26T12:00:00Z".parse().unwrap();
        let spec = |renewed: &str, secs| LeaseSpec {
            renew_time: Some(MicroTime(renewed.parse().unwrap())),
            lease_duration_seconds: Some(secs),
            ..LeaseSpec::default()
        };
        assert!(!expired(&spec("2026-11-26T11:59:50Z", 15), now));
        assert!(!expired(&spec("2026-11-26T11:59:45Z", 15), now));
        assert!(expired(&spec("2026-11-26T11:59:44.999Z", 15), now));
        assert!(expired(&spec("2026-11-26T11:59:59Z", 0), now));
        assert!(expired(&LeaseSpec::default(), now));
    }

    #[test]
    fn node_of_reads_only_node_leases() {
        let lease = |name: &str, kind: &str| Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(labels(kind)),
                ..Default::default()
            },
            spec: None,
        };
        assert_eq!(
            node_of(&lease("tether-node-edge-1", "node")),
            Some("edge-1")
        );
        assert_eq!(node_of(&lease("tether-replica-r1", "replica")), None);
        assert_eq!(node_of(&lease("other", "node")), None);
    }
}
