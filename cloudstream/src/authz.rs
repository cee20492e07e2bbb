//! Who may use the kubelet-API front: the client certificate (already
//! verified against the configured CA) must name an allowed user or group.

use serde::{Deserialize, Serialize};
use tether_pki::Identity;

/// Allowed subjects. Defaults fit a kubeadm apiserver's kubelet client cert.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Authorizer {
    /// Allowed certificate common names (default `kube-apiserver-kubelet-client`).
    pub users: Vec<String>,
    /// Allowed certificate organizations (default `system:masters`).
    pub groups: Vec<String>,
}

impl Default for Authorizer {
    fn default() -> Self {
        Self {
            users: vec!["kube-apiserver-kubelet-client".into()],
            groups: vec!["system:masters".into()],
        }
    }
}

impl Authorizer {
    /// True when `id` may use the front.
    pub fn allows(&self, id: &Identity) -> bool {
        self.users.contains(&id.common_name)
            || id.organizations.iter().any(|o| self.groups.contains(o))
    }
}
