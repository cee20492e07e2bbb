//! Cluster mode of the Tether cloud: what a replica does with the Kubernetes
//! API. It patches the kubelet port of the nodes whose edges connect to it
//! ([`KubeletPortPatcher`]), claims and frees its tunnel port in the
//! KubeEdge-compatible `tunnelport` ConfigMap ([`TunnelPortClaim`]), keeps a
//! pod-to-node watch cache for the front ([`PodCache`]), and feeds
//! iptables-manager from that ConfigMap ([`ConfigMapSource`]). With several
//! replicas, it records which replica holds each node's session in Leases
//! ([`LeaseOwnership`], cloudstream's `Ownership`).
//!
//! Everything starts from one [`Cluster`] handle: the client, the namespace
//! Tether's own objects live in, and this replica's identity.

mod leases;
mod pods;
mod retry;
mod source;
mod status;
mod tunnelport;

use std::path::Path;

pub use leases::{
    APP_LABEL, LEASE_KIND_LABEL, LeaseError, LeaseOptions, LeaseOwnership,
    NODE_ENDPOINTS_ANNOTATION, NODE_IPS_ANNOTATION, NODE_LABEL, NODE_LEASE_PREFIX, NameError,
    PEER_ADDRESS_ANNOTATION, REPLICA_LEASE_PREFIX, node_lease_name, replica_lease_name,
};
pub use pods::{PodCache, PodCacheOptions, PodLocatorFn};
pub use retry::RetryPolicy;
pub use source::{ConfigMapSource, configmap_url};
pub use status::{KubeletPortPatcher, kubelet_port_patch};
pub use tunnelport::{
    ClaimError, ClaimSpec, RECORD_ANNOTATION, RECORD_CONFIGMAP, TunnelPortClaim, assign, unassign,
};

/// The field manager Tether's writes are recorded under (`managedFields`).
pub const FIELD_MANAGER: &str = "tether-cloud";

/// Why the cluster could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The kubeconfig file could not be read or used.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file (or KUBECONFIG list).
        path: String,
        /// Why.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No kubeconfig was given and the in-cluster service account is not usable.
    #[error("no --kubeconfig and no in-cluster configuration: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    /// The client could not be built from the configuration.
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// A replica's view of its cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
    namespace: String,
    replica_id: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("namespace", &self.namespace)
            .field("replica_id", &self.replica_id)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A handle over a client built from `config` (tests point one at an
    /// API double). kube's own retry of 429/503/504 is turned off: it waits
    /// up to minutes, unseen and unlogged, beneath Tether's bounded retries,
    /// so each call site's [`RetryPolicy`] is the only retry layer.
    pub fn from_config(
        mut config: kube::Config,
        namespace: &str,
        replica_id: &str,
    ) -> Result<Self, ClusterError> {
        config.default_retry = false;
        let client = kube::Client::try_from(config).map_err(ClusterError::Client)?;
        Ok(Self {
            client,
            namespace: namespace.to_owned(),
            replica_id: replica_id.to_owned(),
        })
    }

    /// Connects with `kubeconfig` (a path, or a `:`-separated list like
    /// `KUBECONFIG`), or else the in-cluster service account.
    pub async fn connect(
        kubeconfig: Option<&Path>,
        namespace: &str,
        replica_id: &str,
    ) -> Result<Self, ClusterError> {
        let config = match kubeconfig {
            Some(path) => {
                let shown = path.display().to_string();
                let bad = |source| ClusterError::Kubeconfig {
                    path: shown.clone(),
                    source,
                };
                let mut merged: Option<kube::config::Kubeconfig> = None;
                for part in std::env::split_paths(path) {
                    let file = kube::config::Kubeconfig::read_from(&part).map_err(bad)?;
                    merged = Some(match merged {
                        Some(m) => m.merge(file).map_err(bad)?,
                        None => file,
                    });
                }
                let merged = merged.ok_or_else(|| bad(kube::config::KubeconfigError::FindPath))?;
                kube::Config::from_custom_kubeconfig(merged, &Default::default())
                    .await
                    .map_err(bad)?
            }
            None => kube::Config::incluster().map_err(ClusterError::InCluster)?,
        };
        Self::from_config(config, namespace, replica_id)
    }

    /// The client.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// The namespace of Tether's own objects (the `tunnelport` ConfigMap, Leases).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// This replica's identity (the holder of its Leases).
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }
}
