//! This replica's own Lease: created (or taken over from an earlier run under
//! the same id) at start, renewed every third of its duration so that two
//! renewals may fail before peers count it dead, and deleted at graceful
//! shutdown together with the node Leases it still holds, so that peers stop
//! forwarding here at once instead of after the duration.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;
use tracing::{debug, info, warn};

use tether_tunnel::Backoff;

use super::node::{Outcome, delete_at, post_params};
use super::{Inner, MAX_CONCURRENT_WRITES, PEER_ADDRESS_ANNOTATION, holder, labels, node_of};
use crate::retry;

impl Inner {
    /// Keeps this replica's Lease until shutdown, then resigns.
    pub(super) async fn keep_replica_lease(self: Arc<Self>) {
        let every = self.opts.lease_duration / 3;
        // Failed renewals retry sooner than the period, never later.
        let mut backoff = Backoff::new(Duration::from_millis(50), every);
        let mut last: Option<Lease> = None;
        let mut held = false;
        while !self.shutdown.is_triggered() {
            let renewed = tokio::select! {
                r = tokio::time::timeout(every, self.renew(&mut last)) => r,
                _ = self.shutdown.triggered() => break,
            };
            let delay = match renewed {
                Ok(Ok(())) => {
                    if !held {
                        info!(
                            lease = %self.replica_lease,
                            seconds = self.lease_seconds,
                            "replica lease held"
                        );
                        held = true;
                    }
                    backoff.reset();
                    every
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "could not renew this replica's lease; retrying");
                    backoff.next_delay()
                }
                Err(_) => {
                    warn!("renewing this replica's lease timed out; retrying");
                    backoff.next_delay()
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.triggered() => break,
            }
        }
        if tokio::time::timeout(self.opts.resign_timeout, self.resign())
            .await
            .is_err()
        {
            warn!("removing this replica's leases timed out; peers wait for them to expire");
        }
        self.stopped.send_replace(true);
    }

    /// One renewal: a replace from the last version written, or else a
    /// fresh read and a create or replace.
    async fn renew(&self, last: &mut Option<Lease>) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let mut conflicted = false;
        if let Some(mut lease) = last.take() {
            lease.spec.get_or_insert_with(LeaseSpec::default).renew_time = Some(MicroTime(now));
            match self
                .api
                .replace(&self.replica_lease, &post_params(), &lease)
                .await
            {
                Ok(written) => {
                    *last = Some(written);
                    return Ok(());
                }
                // Changed or deleted by someone else: read it again below.
                Err(e) if matches!(retry::status_code(&e), Some(404 | 409)) => {
                    debug!(error = %e, "replica lease changed under us; reading it again");
                    conflicted = true;
                }
                Err(e) => {
                    *last = Some(lease);
                    return Err(e);
                }
            }
        }
        let written = match self.api.get_opt(&self.replica_lease).await? {
            None => {
                let mut lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.replica_lease.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: None,
                };
                self.fill(&mut lease, now);
                self.api.create(&post_params(), &lease).await?
            }
            Some(mut lease) => {
                let theirs = lease
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(PEER_ADDRESS_ANNOTATION));
                let ours = self.peer_addr.to_string();
                if conflicted && theirs.is_some_and(|a| *a != ours) {
                    // Peers would forward this replica's nodes to either.
                    warn!(
                        other = theirs.map(String::as_str).unwrap_or(""),
                        "another process renews this replica's lease; do two replicas share an id?"
                    );
                }
                self.fill(&mut lease, now);
                self.api
                    .replace(&self.replica_lease, &post_params(), &lease)
                    .await?
            }
        };
        *last = Some(written);
        Ok(())
    }

    /// Makes `lease` this replica's, renewed at `now`.
    fn fill(&self, lease: &mut Lease, now: Timestamp) {
        lease
            .metadata
            .labels
            .get_or_insert_default()
            .extend(labels("replica"));
        lease.metadata.annotations.get_or_insert_default().insert(
            PEER_ADDRESS_ANNOTATION.to_owned(),
            self.peer_addr.to_string(),
        );
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.replica.as_str()) {
            if spec.holder_identity.is_some() {
                spec.lease_transitions =
                    Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            }
            spec.acquire_time = Some(MicroTime(now));
        }
        spec.acquire_time.get_or_insert(MicroTime(now));
        spec.lease_transitions.get_or_insert(0);
        spec.holder_identity = Some(self.replica.clone());
        spec.lease_duration_seconds = Some(self.lease_seconds);
        spec.renew_time = Some(MicroTime(now));
    }

    /// Deletes this replica's Lease, then the node Leases the cache says it
    /// holds (each only if unchanged since: one taken over meanwhile stays).
    async fn resign(&self) {
        let mut backoff = self.opts.retry.backoff();
        for attempt in 1..=self.opts.retry.attempts {
            match self.delete_if_held(&self.replica_lease).await {
                Outcome::Done | Outcome::Stop => break,
                Outcome::Retry(e) if attempt == self.opts.retry.attempts => {
                    warn!(error = %e, "could not delete this replica's lease");
                }
                Outcome::Retry(e) => {
                    debug!(error = %e, "deleting this replica's lease failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        let mine: Vec<(String, Option<String>)> = self
            .store
            .state()
            .iter()
            .filter(|l| node_of(l).is_some() && holder(l) == Some(self.replica.as_str()))
            .filter_map(|l| {
                let name = l.metadata.name.clone()?;
                Some((name, l.metadata.resource_version.clone()))
            })
            .collect();
        let nodes = mine.len();
        futures_util::stream::iter(mine)
            .for_each_concurrent(MAX_CONCURRENT_WRITES, |(name, rv)| async move {
                if let Err(e) = self.api.delete(&name, &delete_at(rv)).await {
                    debug!(lease = %name, error = %e, "node lease left behind");
                }
            })
            .await;
        info!(nodes, "this replica's leases removed");
    }
}
