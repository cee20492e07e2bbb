//! The cloud hub: the cloud's state directory (CA, bootstrap tokens, issued
//! certificates, deny list), the bootstrap HTTPS server that enrols and renews
//! edge nodes, and revocation.

pub mod api;
mod bootstrap;
mod files;
pub mod hub;

pub use files::write_atomic;
mod revocation;
mod tokens;

#[doc(hidden)]
pub use bootstrap::check_enrol_body;
pub use bootstrap::{BootstrapServer, CA_PATH, ENROL_PATH, EnrolRequest};
pub use revocation::{DenyList, Revoked};
pub use tokens::{TokenInfo, TokenRefusal, TokenStore};

use std::path::{Path, PathBuf};

use tether_pki::Ca;

/// Errors of the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing a file failed.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        cause: std::io::Error,
    },
    /// A file's content is invalid.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The CA could not be created or loaded.
    #[error(transparent)]
    Pki(#[from] tether_pki::PkiError),
}

/// The cloud's state directory: `ca.crt`, `ca.key` (0600), `tokens.json`,
/// `revoked.json`, `issued.json`.
pub struct CloudState {
    dir: PathBuf,
    ca: Ca,
    /// Bootstrap tokens.
    pub tokens: TokenStore,
    /// Revoked certificates and nodes.
    pub deny: std::sync::Arc<DenyList>,
    /// Nodes enrolled so far and their latest certificate's expiry.
    pub enrolled: Enrolled,
}

/// Which nodes hold a certificate from this cloud (`enrolled.json`).
pub struct Enrolled {
    path: PathBuf,
    lock: std::sync::Mutex<()>,
}

impl Enrolled {
    fn load(&self) -> std::collections::BTreeMap<String, i64> {
        std::fs::read(&self.path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// True when `node` holds an unexpired certificate that is not revoked.
    pub fn holds_valid(&self, node: &str, deny: &DenyList, now: i64) -> bool {
        let _g = self.lock.lock().expect("enrolled lock");
        let Some(&not_after) = self.load().get(node) else {
            return false;
        };
        let revoked = deny.subscribe().borrow().nodes.contains_key(node);
        not_after > now && !revoked
    }

    /// Records a certificate issued to `node`.
    pub fn record(&self, node: &str, not_after: i64) -> Result<(), StateError> {
        let _g = self.lock.lock().expect("enrolled lock");
        let mut m = self.load();
        m.insert(node.to_owned(), not_after);
        files::write_private(
            &self.path,
            &serde_json::to_vec_pretty(&m).expect("serializes"),
        )
    }
}

impl CloudState {
    /// Opens the state directory, creating it and the CA on first start.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        files::create_dir(dir)?;
        let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        let ca = if crt.exists() || key.exists() {
            Ca::from_pem(&files::read_string(&crt)?, &files::read_string(&key)?)?
        } else {
            let ca = Ca::generate("tether-edge-ca")?;
            files::write_private(&key, ca.key_pem().expose().as_bytes())?;
            files::write_public(&crt, ca.cert_pem().as_bytes())?;
            tracing::info!(dir = %dir.display(), "created a new edge CA");
            ca
        };
        Self::with_ca(dir, ca)
    }

    /// Opens the state directory with a CA supplied by the operator.
    pub fn with_ca(dir: &Path, ca: Ca) -> Result<Self, StateError> {
        files::create_dir(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            tokens: TokenStore::new(dir.join("tokens.json")),
            deny: std::sync::Arc::new(DenyList::open(dir.join("revoked.json"))?),
            enrolled: Enrolled {
                path: dir.join("enrolled.json"),
                lock: std::sync::Mutex::new(()),
            },
            ca,
        })
    }

    /// The edge CA.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
