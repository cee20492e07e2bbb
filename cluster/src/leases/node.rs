//! Node Leases: `claim` and `release` record the latest wish per node, and a
//! worker per node writes it with optimistic concurrency (read, then write
//! with the resourceVersion read; a 409 means another replica wrote first, so
//! read again), retrying on a bounded, jittered schedule.
//!
//! Between replicas the newest claim wins: a claim carries the time it was
//! made as `acquireTime`, and a worker never replaces a holder whose claim is
//! newer than its own. So a claim delayed by retries cannot take a node back
//! from the replica its edge reconnected to since. A release deletes the
//! Lease only while it still names this replica (a resourceVersion
//! precondition on the delete).

use std::collections::hash_map::Entry;
use std::sync::Arc;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ObjectMeta, PostParams, Preconditions};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{
    Inner, Intent, Local, MAX_LABEL_VALUE, MAX_PENDING_NODES, NODE_LABEL, Want, holder, labels,
    node_lease_name,
};
use crate::FIELD_MANAGER;
use crate::retry;

/// How one write attempt ended.
pub(super) enum Outcome {
    Done,
    Retry(kube::Error),
    Stop,
}

pub(super) fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    }
}

/// A delete that happens only if the object is still at `rv`.
pub(super) fn delete_at(rv: Option<String>) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: rv,
            uid: None,
        }),
        ..DeleteParams::default()
    }
}

/// Retries what may pass later; logs and stops on the rest (403, 422, ...).
fn failed(e: kube::Error, what: &str) -> Outcome {
    if retry::retriable(&e) {
        Outcome::Retry(e)
    } else {
        warn!(error = %e, "{what} refused");
        Outcome::Stop
    }
}

impl Inner {
    /// Records `want` for `node` and starts its worker if none runs. Never
    /// blocks.
    pub(super) fn request(self: &Arc<Self>, node: &str, want: Want) {
        if self.shutdown.is_triggered() {
            return;
        }
        if let Err(e) = node_lease_name(node) {
            warn!(
                node,
                error = %e,
                "node name cannot name a Lease; other replicas will not find this node's session"
            );
            return;
        }
        let mut local = self.local.lock().expect("lease lock");
        match want {
            Want::Claim(_) => local.held.insert(node.to_owned()),
            Want::Release => local.held.remove(node),
        };
        self.enqueue(&mut local, node, want);
    }

    /// Coalesces `want` into the node's pending wish, or starts a worker.
    pub(super) fn enqueue(self: &Arc<Self>, local: &mut Local, node: &str, want: Want) {
        let pending = local.intents.len();
        match local.intents.entry(node.to_owned()) {
            Entry::Occupied(mut e) => {
                let i = e.get_mut();
                i.want = want;
                i.generation += 1;
            }
            Entry::Vacant(_) if pending >= MAX_PENDING_NODES => {
                warn!(
                    node,
                    pending, "too many node lease writes pending; this one is dropped"
                );
            }
            Entry::Vacant(e) => {
                e.insert(Intent {
                    want,
                    generation: 0,
                });
                self.pending.send_replace(local.intents.len());
                let inner = self.clone();
                let span = info_span!("node_lease", node = %node);
                let node = node.to_owned();
                tokio::spawn(async move { inner.work(&node).await }.instrument(span));
            }
        }
    }

    /// Writes the node's latest wish until it sticks, proves moot, or the
    /// attempts run out; then exits unless a newer wish came in meanwhile.
    async fn work(&self, node: &str) {
        let name = node_lease_name(node).expect("checked by request");
        let mut backoff = self.opts.retry.backoff();
        let mut attempts = 0u32;
        loop {
            let Some((want, generation)) = self.current(node) else {
                return;
            };
            attempts += 1;
            let outcome = tokio::select! {
                o = self.write(node, &name, want) => o,
                _ = self.shutdown.triggered() => return self.forget(node),
            };
            let finished = match outcome {
                Outcome::Done | Outcome::Stop => true,
                Outcome::Retry(e) if attempts >= self.opts.retry.attempts => {
                    warn!(error = %e, attempts, ?want, "giving up writing the node lease");
                    true
                }
                Outcome::Retry(e) => {
                    let delay = backoff.next_delay();
                    debug!(error = %e, ?delay, attempts, "node lease write failed; retrying");
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
                // A newer wish arrived: serve it with a fresh budget.
                backoff = self.opts.retry.backoff();
                attempts = 0;
            }
        }
    }

    fn current(&self, node: &str) -> Option<(Want, u64)> {
        let local = self.local.lock().expect("lease lock");
        local.intents.get(node).map(|i| (i.want, i.generation))
    }

    /// Ends the worker if no wish came after `generation`.
    fn finish(&self, node: &str, generation: u64) -> bool {
        let mut local = self.local.lock().expect("lease lock");
        match local.intents.get(node) {
            Some(i) if i.generation != generation => false,
            _ => {
                local.intents.remove(node);
                self.pending.send_replace(local.intents.len());
                true
            }
        }
    }

    fn forget(&self, node: &str) {
        let mut local = self.local.lock().expect("lease lock");
        local.intents.remove(node);
        self.pending.send_replace(local.intents.len());
    }

    async fn write(&self, node: &str, name: &str, want: Want) -> Outcome {
        let _slot = self.in_flight.acquire().await.expect("never closed");
        match want {
            Want::Claim(at) => self.claim_round(node, name, at).await,
            Want::Release => self.delete_if_held(name).await,
        }
    }

    /// One read-modify-write making this replica the holder, unless a newer
    /// claim by another replica is there.
    async fn claim_round(&self, node: &str, name: &str, at: Timestamp) -> Outcome {
        let current = match self.api.get_opt(name).await {
            Ok(c) => c,
            Err(e) => return failed(e, "reading the node lease"),
        };
        let Some(mut lease) = current else {
            let mut lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: None,
            };
            self.hold(&mut lease, node, at);
            return match self.api.create(&post_params(), &lease).await {
                Ok(_) => {
                    info!("node lease created");
                    Outcome::Done
                }
                // Another replica created it first: read theirs.
                Err(e) => failed(e, "creating the node lease"),
            };
        };
        let spec = lease.spec.as_ref();
        let theirs = spec.and_then(|s| s.acquire_time.as_ref()).map(|t| t.0);
        match holder(&lease) {
            Some(h) if h == self.replica && theirs == Some(at) => return Outcome::Done,
            Some(h) if h != self.replica && theirs.is_some_and(|t| t > at) => {
                info!(
                    holder = h,
                    "a newer claim by another replica holds the node"
                );
                return Outcome::Done;
            }
            _ => {}
        }
        let previous = holder(&lease).map(str::to_owned);
        self.hold(&mut lease, node, at);
        // `lease` carries the resourceVersion read: a write in between is a 409.
        match self.api.replace(name, &post_params(), &lease).await {
            Ok(_) => {
                info!(
                    previous = previous.as_deref().unwrap_or(""),
                    "node lease claimed"
                );
                Outcome::Done
            }
            // Deleted since the read: the next round creates it.
            Err(e) if retry::status_code(&e) == Some(404) => Outcome::Retry(e),
            Err(e) => failed(e, "claiming the node lease"),
        }
    }

    /// Makes `lease` name this replica as `node`'s holder since `at`.
    fn hold(&self, lease: &mut Lease, node: &str, at: Timestamp) {
        let labels_now = lease.metadata.labels.get_or_insert_default();
        labels_now.extend(labels("node"));
        if node.len() <= MAX_LABEL_VALUE {
            labels_now.insert(NODE_LABEL.to_owned(), node.to_owned());
        }
        let (ips, endpoints) = {
            let local = self.local.lock().expect("lease lock");
            let join = |v: Vec<String>| v.join(",");
            local
                .ips
                .get(node)
                .map(|(ips, eps)| {
                    (
                        join(ips.iter().map(|ip| ip.to_string()).collect()),
                        join(eps.iter().map(|ep| ep.to_string()).collect()),
                    )
                })
                .unwrap_or_default()
        };
        let annotations = lease.metadata.annotations.get_or_insert_default();
        for (key, value) in [
            (super::NODE_IPS_ANNOTATION, ips),
            (super::NODE_ENDPOINTS_ANNOTATION, endpoints),
        ] {
            if value.is_empty() {
                annotations.remove(key);
            } else {
                annotations.insert(key.to_owned(), value);
            }
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let changed = spec.holder_identity.as_deref() != Some(self.replica.as_str());
        if changed && spec.holder_identity.is_some() {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.lease_transitions.get_or_insert(0);
        spec.holder_identity = Some(self.replica.clone());
        spec.acquire_time = Some(MicroTime(at));
        // When the record was last written; liveness is the holder's
        // replica Lease, so a node Lease has no duration of its own.
        spec.renew_time = Some(MicroTime(Timestamp::now()));
    }

    /// Deletes Lease `name` if it still names this replica.
    pub(super) async fn delete_if_held(&self, name: &str) -> Outcome {
        let lease = match self.api.get_opt(name).await {
            Ok(Some(l)) => l,
            Ok(None) => return Outcome::Done,
            Err(e) => return failed(e, "reading the lease"),
        };
        if let Some(h) = holder(&lease).filter(|h| *h != self.replica) {
            debug!(
                holder = h,
                lease = name,
                "held by another replica; left alone"
            );
            return Outcome::Done;
        }
        let rv = lease.metadata.resource_version.clone();
        match self.api.delete(name, &delete_at(rv)).await {
            Ok(_) => {
                info!(lease = name, "lease released");
                Outcome::Done
            }
            Err(e) if retry::status_code(&e) == Some(404) => Outcome::Done,
            // Written since the read (409): read again, it may be another's now.
            Err(e) => failed(e, "deleting the lease"),
        }
    }
}
