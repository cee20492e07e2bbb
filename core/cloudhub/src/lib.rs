//! The cloud hub: the cloud's state directory (CA, bootstrap tokens, issued
//! certificates, deny list), the bootstrap HTTPS server that enrols and renews
//! edge nodes, and revocation.

pub mod api;
mod attempts;
mod bootstrap;
mod files;
pub mod hub;
pub mod replicas;
mod revocation;
mod tokens;

pub use bootstrap::BootstrapServer;
#[doc(hidden)]
pub use bootstrap::check_enrol_body;
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
    #[error(
        "{path}: {reason}; restore it from a backup, or move it away to start without what it held"
    )]
    Invalid {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The CA could not be created or loaded.
    #[error(transparent)]
    Pki(#[from] tether_pki::PkiError),
    /// The CA files could not be used.
    #[error("{path}: {reason}")]
    Ca {
        /// The file.
        path: String,
        /// Why, and what to do.
        reason: String,
    },
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

/// Which nodes hold a certificate from this cloud (`enrolled.json`): each
/// node's latest certificate, so that neither its name (ADR 0006) nor its
/// addresses (ADR 0001) can be given to another node while it is valid.
pub struct Enrolled {
    path: PathBuf,
    lock: std::sync::Mutex<()>,
}

/// A node's latest certificate in `enrolled.json`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Entry {
    Cert(IssuedCert),
    /// Files written before addresses were recorded hold only the expiry.
    Expiry(i64),
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuedCert {
    not_after: i64,
    /// Issuance time (`not_before` plus the backdating).
    issued_at: i64,
    serial: String,
    #[serde(default)]
    ips: Vec<std::net::IpAddr>,
}

type EnrolledMap = std::collections::BTreeMap<String, Entry>;

impl Enrolled {
    fn load(&self) -> Result<EnrolledMap, StateError> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StateError::Invalid {
                path: self.path.display().to_string(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(EnrolledMap::new()),
            Err(cause) => Err(StateError::Io {
                path: self.path.display().to_string(),
                cause,
            }),
        }
    }

    fn valid(node: &str, e: &Entry, deny: &Revoked, now: i64) -> bool {
        match e {
            Entry::Cert(c) => {
                let revoked = deny.serials.contains(&c.serial)
                    || deny.nodes.get(node).is_some_and(|&at| c.issued_at <= at);
                c.not_after > now && !revoked
            }
            Entry::Expiry(not_after) => *not_after > now && !deny.nodes.contains_key(node),
        }
    }

    /// True when `node` holds an unexpired certificate that is not revoked.
    pub fn holds_valid(&self, node: &str, deny: &DenyList, now: i64) -> Result<bool, StateError> {
        let _g = self.lock.lock().expect("enrolled lock");
        let deny = deny.subscribe().borrow().clone();
        Ok(self
            .load()?
            .get(node)
            .is_some_and(|e| Self::valid(node, e, &deny, now)))
    }

    /// The node other than `node` whose valid certificate carries `ip`.
    pub fn ip_holder(
        &self,
        ip: &std::net::IpAddr,
        node: &str,
        deny: &DenyList,
        now: i64,
    ) -> Result<Option<String>, StateError> {
        let _g = self.lock.lock().expect("enrolled lock");
        let deny = deny.subscribe().borrow().clone();
        Ok(self.load()?.into_iter().find_map(|(n, e)| {
            let holds = matches!(&e, Entry::Cert(c) if c.ips.contains(ip));
            (n != node && holds && Self::valid(&n, &e, &deny, now)).then_some(n)
        }))
    }

    /// Records the certificate `id` issued to `node`.
    pub fn record(&self, node: &str, id: &tether_pki::Identity) -> Result<(), StateError> {
        let _g = self.lock.lock().expect("enrolled lock");
        let mut m = self.load()?;
        m.insert(
            node.to_owned(),
            Entry::Cert(IssuedCert {
                not_after: id.not_after,
                issued_at: id.not_before + tether_pki::BACKDATE_SECS,
                serial: id.serial.clone(),
                ips: id.ips.clone(),
            }),
        );
        files::write_private(
            &self.path,
            &serde_json::to_vec_pretty(&m).expect("serializes"),
        )
    }
}

impl CloudState {
    /// Opens the state directory, creating it and the CA on first start.
    /// Every state file is read and checked before anything is written.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        let existing = if crt.exists() || key.exists() {
            let ca = Ca::from_pem(&files::read_string(&crt)?, &files::read_string(&key)?)
                .map_err(|e| StateError::Ca {
                    path: key.display().to_string(),
                    reason: match e {
                        tether_pki::PkiError::KeyMismatch => format!(
                            "does not match {}; put the key of that certificate there, or remove both files to create a new CA (every edge must then enrol again)",
                            crt.display()
                        ),
                        e => format!("{e} (with {}); fix the pair, or remove both files to create a new CA", crt.display()),
                    },
                })?;
            Some(ca)
        } else {
            None
        };
        Self::check_files(dir)?;
        files::create_dir(dir)?;
        let ca = if let Some(ca) = existing {
            ca
        } else {
            let ca = Ca::generate("tether-edge-ca")?;
            files::write_private(&key, ca.key_pem().expose().as_bytes())?;
            files::write_public(&crt, ca.cert_pem().as_bytes())?;
            tracing::info!(dir = %dir.display(), "created a new edge CA");
            ca
        };
        Self::with_ca(dir, ca)
    }

    /// Reads every state file besides the CA; a corrupt one is an error.
    fn check_files(dir: &Path) -> Result<(), StateError> {
        TokenStore::new(dir.join("tokens.json")).list()?;
        DenyList::open(dir.join("revoked.json"))?;
        Enrolled {
            path: dir.join("enrolled.json"),
            lock: std::sync::Mutex::new(()),
        }
        .load()?;
        Ok(())
    }

    /// Opens the state directory with a CA supplied by the operator.
    pub fn with_ca(dir: &Path, ca: Ca) -> Result<Self, StateError> {
        Self::check_files(dir)?;
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
