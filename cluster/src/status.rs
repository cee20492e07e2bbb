//! Points each connected node's kubelet port at this replica: when an edge
//! connects, its Node's `status.daemonEndpoints.kubeletEndpoint.Port` becomes
//! this replica's tunnel port, so the apiserver dials `<node-ip>:<tunnel-port>`
//! and iptables DNAT brings it here.
//!
//! A JSON merge patch on the status subresource touches that one field and
//! nothing the kubelet reports, and needs no read first. Each node has at most
//! one worker; requests that arrive while it works only replace the port it
//! will write next, so a reconnect storm of one node costs at most one extra
//! patch, and a node whose patches keep failing never delays another node's.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams};
use tokio::sync::{Semaphore, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use tether_tunnel::Shutdown;

use crate::retry::{self, RetryPolicy};
use crate::{Cluster, FIELD_MANAGER};

/// Patches in flight at once across all nodes: enough to keep up with a fleet
/// reconnecting after a cloud restart, few enough not to flood the apiserver.
const MAX_CONCURRENT_PATCHES: usize = 16;

/// The merge patch that sets a node's kubelet port.
pub fn kubelet_port_patch(port: u16) -> serde_json::Value {
    serde_json::json!({"status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}})
}

/// The latest port requested for a node whose worker is running.
struct Wanted {
    port: u16,
    /// Bumped by every request, so a worker knows a new one came in even
    /// when the port is the same (the status may have been reset meanwhile).
    generation: u64,
}

struct Inner {
    nodes: Api<Node>,
    wanted: Mutex<HashMap<String, Wanted>>,
    /// Mirrors `wanted.len()`, for waiting until every patch is done.
    pending: watch::Sender<usize>,
    in_flight: Semaphore,
    retry: RetryPolicy,
    shutdown: Shutdown,
}

/// Patches nodes' kubelet ports in the background. Cheap to clone.
#[derive(Clone)]
pub struct KubeletPortPatcher {
    inner: Arc<Inner>,
}

impl KubeletPortPatcher {
    /// A patcher that gives up on a node after `retry.attempts` retriable
    /// failures, and stops its workers at `shutdown`.
    pub fn new(cluster: &Cluster, retry: RetryPolicy, shutdown: Shutdown) -> Self {
        Self {
            inner: Arc::new(Inner {
                nodes: Api::all(cluster.client().clone()),
                wanted: Mutex::new(HashMap::new()),
                pending: watch::channel(0).0,
                in_flight: Semaphore::new(MAX_CONCURRENT_PATCHES),
                retry,
                shutdown,
            }),
        }
    }

    /// Asks for `node`'s kubelet port to become `port`. Never blocks: the
    /// patch happens on the node's worker, started here if none runs.
    pub fn request(&self, node: &str, port: u16) {
        if self.inner.shutdown.is_triggered() {
            return;
        }
        let mut wanted = self.inner.wanted.lock().expect("patcher lock");
        match wanted.entry(node.to_owned()) {
            Entry::Occupied(mut e) => {
                let w = e.get_mut();
                w.port = port;
                w.generation += 1;
            }
            Entry::Vacant(e) => {
                e.insert(Wanted {
                    port,
                    generation: 0,
                });
                self.inner.pending.send_replace(wanted.len());
                let inner = self.inner.clone();
                let span = info_span!("node_status", node = %node);
                let node = node.to_owned();
                tokio::spawn(async move { inner.work(&node).await }.instrument(span));
            }
        }
    }

    /// Nodes with a patch pending or in progress.
    pub fn pending(&self) -> usize {
        *self.inner.pending.borrow()
    }

    /// Waits until no patch is pending or in progress, or `timeout` passes.
    pub async fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let mut rx = self.inner.pending.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// How one patch attempt ended.
enum Outcome {
    Done,
    Retry(kube::Error),
    Stop,
}

impl Inner {
    /// Writes the node's latest wanted port until it sticks, the node proves
    /// not to exist, or the attempts run out; then exits unless a newer
    /// request came in meanwhile.
    async fn work(&self, node: &str) {
        let mut backoff = self.retry.backoff();
        let mut attempts = 0u32;
        loop {
            let Some((port, generation)) = self.current(node) else {
                return;
            };
            attempts += 1;
            let outcome = tokio::select! {
                o = self.patch(node, port) => o,
                _ = self.shutdown.triggered() => return self.forget(node),
            };
            let finished = match outcome {
                Outcome::Done | Outcome::Stop => true,
                Outcome::Retry(e) if attempts >= self.retry.attempts => {
                    warn!(error = %e, attempts, port, "giving up patching the kubelet port");
                    true
                }
                Outcome::Retry(e) => {
                    let delay = backoff.next_delay();
                    debug!(error = %e, ?delay, attempts, "kubelet port patch failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.triggered() => return self.forget(node),
                    }
                    false
                }
            };
            if finished {
                if self.finish(node, generation) {
                    return;
                }
                // A newer request arrived: serve it with a fresh budget.
                backoff = self.retry.backoff();
                attempts = 0;
            }
        }
    }

    fn current(&self, node: &str) -> Option<(u16, u64)> {
        let wanted = self.wanted.lock().expect("patcher lock");
        wanted.get(node).map(|w| (w.port, w.generation))
    }

    /// Ends the worker if no request came after `generation`.
    fn finish(&self, node: &str, generation: u64) -> bool {
        let mut wanted = self.wanted.lock().expect("patcher lock");
        match wanted.get(node) {
            Some(w) if w.generation != generation => false,
            _ => {
                wanted.remove(node);
                self.pending.send_replace(wanted.len());
                true
            }
        }
    }

    fn forget(&self, node: &str) {
        let mut wanted = self.wanted.lock().expect("patcher lock");
        wanted.remove(node);
        self.pending.send_replace(wanted.len());
    }

    async fn patch(&self, node: &str, port: u16) -> Outcome {
        let _slot = self.in_flight.acquire().await.expect("never closed");
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        let body = kubelet_port_patch(port);
        match self
            .nodes
            .patch_status(node, &params, &Patch::Merge(&body))
            .await
        {
            Ok(_) => {
                info!(port, "kubelet port patched");
                Outcome::Done
            }
            Err(e) if retry::status_code(&e) == Some(404) => {
                warn!(
                    port,
                    "node {node} does not exist in the cluster; its kubelet port was not patched \
                     (the edge certificate names a node the apiserver does not know)"
                );
                Outcome::Stop
            }
            Err(e) if retry::retriable(&e) => Outcome::Retry(e),
            Err(e) => {
                warn!(error = %e, port, "kubelet port patch refused");
                Outcome::Stop
            }
        }
    }
}
