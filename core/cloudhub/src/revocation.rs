//! The deny list: revoked certificate serials and revoked nodes, persisted in
//! the state directory. Revoking a node denies every certificate issued to it
//! up to that moment; a later enrolment (new token) gets a fresh certificate.
//! The running cloud re-reads the file, so `tether certs revoke` from another
//! process takes effect within the poll interval.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tether_pki::{BACKDATE_SECS, Identity};
use tokio::sync::watch;

use crate::{StateError, files};

/// What is revoked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoked {
    /// Revoked serials (lowercase hex, no leading zeros).
    #[serde(default)]
    pub serials: BTreeSet<String>,
    /// Revoked nodes and when (Unix seconds).
    #[serde(default)]
    pub nodes: BTreeMap<String, i64>,
}

impl Revoked {
    /// True when `id` may not connect.
    pub fn denies(&self, id: &Identity) -> bool {
        if self.serials.contains(&id.serial) {
            return true;
        }
        // Our certificates start BACKDATE_SECS before they were issued.
        match id.node_name().and_then(|n| self.nodes.get(n)) {
            Some(&at) => id.not_before + BACKDATE_SECS <= at,
            None => false,
        }
    }
}

/// The persisted deny list, observable for changes.
pub struct DenyList {
    path: PathBuf,
    lock: Mutex<()>,
    current: watch::Sender<Arc<Revoked>>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl DenyList {
    pub(crate) fn open(path: PathBuf) -> Result<Self, StateError> {
        let list = Self {
            path,
            lock: Mutex::new(()),
            current: watch::Sender::new(Arc::default()),
        };
        list.reload()?;
        Ok(list)
    }

    fn load(&self) -> Result<Revoked, StateError> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StateError::Invalid {
                path: self.path.display().to_string(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Revoked::default()),
            Err(cause) => Err(StateError::Io {
                path: self.path.display().to_string(),
                cause,
            }),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Revoked)) -> Result<(), StateError> {
        let _g = self.lock.lock().expect("deny lock");
        let mut r = self.load()?;
        f(&mut r);
        files::write_private(
            &self.path,
            &serde_json::to_vec_pretty(&r).expect("serializes"),
        )?;
        self.current.send_replace(Arc::new(r));
        Ok(())
    }

    /// Denies every certificate issued to `node` until now.
    pub fn revoke_node(&self, node: &str) -> Result<(), StateError> {
        let at = now();
        self.update(|r| {
            r.nodes.insert(node.to_owned(), at);
        })
    }

    /// Denies one certificate by serial (hex, any case, colons allowed).
    pub fn revoke_serial(&self, serial: &str) -> Result<(), StateError> {
        let s = serial
            .replace(':', "")
            .to_ascii_lowercase()
            .trim_start_matches('0')
            .to_owned();
        self.update(|r| {
            r.serials.insert(s);
        })
    }

    /// True when `id` may not connect.
    pub fn denies(&self, id: &Identity) -> bool {
        self.current.borrow().denies(id)
    }

    /// Changes to the list.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Revoked>> {
        self.current.subscribe()
    }

    /// Re-reads the file; true when it changed.
    pub fn reload(&self) -> Result<bool, StateError> {
        let r = self.load()?;
        Ok(self.current.send_if_modified(|cur| {
            if **cur == r {
                false
            } else {
                *cur = Arc::new(r);
                true
            }
        }))
    }

    /// Re-reads the file every `every` until `shutdown`.
    pub async fn watch_file(self: Arc<Self>, every: Duration, shutdown: tether_tunnel::Shutdown) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.triggered() => return,
            }
            if let Err(e) = self.reload() {
                tracing::warn!(error = %e, "cannot re-read the deny list; keeping the last one");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(ca: &tether_pki::Ca, node: &str) -> Identity {
        let c = ca.issue_node_client(node, &[]).unwrap();
        Identity::from_der(&c.cert_chain().unwrap()[0]).unwrap()
    }

    #[test]
    fn revocation_persists_and_reaches_another_reader() {
        let dir = std::env::temp_dir().join(format!("tether-deny-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("revoked.json");
        let ca = tether_pki::Ca::generate("t").unwrap();
        let (a, b) = (identity(&ca, "edge-a"), identity(&ca, "edge-b"));
        // The running cloud and the `tether certs revoke` process.
        let cloud = DenyList::open(path.clone()).unwrap();
        let cli = DenyList::open(path.clone()).unwrap();
        let changes = cloud.subscribe();
        cli.revoke_node("edge-a").unwrap();
        cli.revoke_serial(&b.serial.to_uppercase()).unwrap();
        assert!(!cloud.denies(&a), "seen before the file was re-read");
        assert!(cloud.reload().unwrap());
        assert!(changes.has_changed().unwrap());
        assert!(cloud.denies(&a) && cloud.denies(&b));
        assert!(
            !cloud.reload().unwrap(),
            "unchanged file reported as a change"
        );
        // A certificate issued after the revocation is accepted; the clock
        // granularity is one second, so move the revocation into the past.
        cli.update(|r| {
            r.nodes.insert("edge-a".into(), now() - 10);
        })
        .unwrap();
        cloud.reload().unwrap();
        assert!(!cloud.denies(&identity(&ca, "edge-a")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
