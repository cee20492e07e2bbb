//! Bootstrap tokens on the cloud side: created by the operator, redeemed by
//! an edge exactly as their options allow. Only a hash of each secret is
//! stored; the file is 0600 and replaced atomically.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tether_pki::BootstrapToken;

use crate::{StateError, files};

/// A stored token (no secret).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenInfo {
    /// Public id.
    pub id: String,
    /// SHA-256 of the secret.
    pub secret_sha256: String,
    /// Expiry, Unix seconds.
    pub expires_at: u64,
    /// Redeemable once.
    pub single_use: bool,
    /// When it was redeemed, if ever.
    pub used_at: Option<u64>,
    /// Node it is bound to, if any.
    pub node: Option<String>,
    /// Addresses the node certificate gets (IP SANs); empty means none.
    pub ips: Vec<IpAddr>,
}

#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tokens: Vec<TokenInfo>,
}

/// Why a token was refused. The text goes to the audit log; the edge only
/// learns "invalid token".
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No such token id.
    #[error("unknown token")]
    Unknown,
    /// The id exists but the secret does not match: a guess at a known id,
    /// which the bootstrap server bounds per id.
    #[error("wrong secret")]
    WrongSecret,
    /// Past its expiry.
    #[error("token expired")]
    Expired,
    /// Single-use and already used.
    #[error("single-use token already used")]
    Used,
    /// Bound to another node.
    #[error("token is bound to node {0:?}")]
    WrongNode(String),
    /// An unbound token for a node name that is already enrolled.
    #[error(
        "node {0:?} is already enrolled; re-enrol it with a token bound to it (tether token create --node)"
    )]
    Enrolled(String),
    /// An address the token gives is on another node's valid certificate:
    /// routing by that address would reach the wrong node.
    #[error(
        "address {ip} is held by the valid certificate of node {node:?}; revoke that node first (tether certs revoke) or give this token another address"
    )]
    AddressHeld {
        /// The address.
        ip: IpAddr,
        /// The node holding it.
        node: String,
    },
    /// The store could not be read or written.
    #[error("token store: {0}")]
    Store(String),
}

/// The token file.
pub struct TokenStore {
    path: PathBuf,
    // Serializes read-modify-write of the file within this process.
    lock: Mutex<()>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Equality without an early exit.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl TokenStore {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            lock: Mutex::new(()),
        }
    }

    fn load(&self) -> Result<File, StateError> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StateError::Invalid {
                path: self.path.display().to_string(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(File::default()),
            Err(cause) => Err(StateError::Io {
                path: self.path.display().to_string(),
                cause,
            }),
        }
    }

    fn save(&self, f: &File) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(f).expect("token file serializes");
        files::write_private(&self.path, &json)
    }

    /// Creates a token for the CA `ca`. Expired tokens are pruned.
    pub fn create(
        &self,
        ca: &CertificateDer<'_>,
        ttl: Duration,
        single_use: bool,
        node: Option<String>,
        ips: Vec<IpAddr>,
    ) -> Result<BootstrapToken, StateError> {
        let _g = self.lock.lock().expect("token lock");
        let mut f = self.load()?;
        let t = now();
        f.tokens.retain(|k| k.expires_at > t);
        let token = BootstrapToken::generate(ca);
        f.tokens.push(TokenInfo {
            id: token.id.clone(),
            secret_sha256: token.secret_hash(),
            expires_at: t + ttl.as_secs(),
            single_use,
            used_at: None,
            node,
            ips,
        });
        self.save(&f)?;
        Ok(token)
    }

    /// Every stored token.
    pub fn list(&self) -> Result<Vec<TokenInfo>, StateError> {
        let _g = self.lock.lock().expect("token lock");
        Ok(self.load()?.tokens)
    }

    /// Deletes a token; false if there was none.
    pub fn revoke(&self, id: &str) -> Result<bool, StateError> {
        let _g = self.lock.lock().expect("token lock");
        let mut f = self.load()?;
        let before = f.tokens.len();
        f.tokens.retain(|k| k.id != id);
        let removed = f.tokens.len() != before;
        if removed {
            self.save(&f)?;
        }
        Ok(removed)
    }

    /// Checks `token` for `node` and, when it may be used, records the use.
    /// Returns the addresses the certificate gets. `enrolled` says whether
    /// `node` already holds a valid certificate: only a token bound to that
    /// node may enrol it again, so an unbound token cannot take over a live
    /// node's name (its session would replace the real node's).
    /// `holder` names the other node whose valid certificate carries an
    /// address, if any: such an address is not given again.
    pub fn redeem(
        &self,
        token: &BootstrapToken,
        node: &str,
        enrolled: bool,
        holder: impl Fn(&IpAddr) -> Result<Option<String>, StateError>,
    ) -> Result<Vec<IpAddr>, TokenRefusal> {
        let _g = self.lock.lock().expect("token lock");
        let store = |e: StateError| TokenRefusal::Store(e.to_string());
        let mut f = self.load().map_err(store)?;
        let t = now();
        // Every entry is compared, in constant time and without stopping at
        // a match, so the answer's timing says nothing about which ids exist.
        let (mut found, mut id_known) = (None, false);
        for (i, k) in f.tokens.iter().enumerate() {
            let id = ct_eq(k.id.as_bytes(), token.id.as_bytes());
            let secret = token.secret_matches(&k.secret_sha256);
            id_known |= id;
            if id & secret {
                found = Some(i);
            }
        }
        let k = match found {
            Some(i) => &mut f.tokens[i],
            None if id_known => return Err(TokenRefusal::WrongSecret),
            None => return Err(TokenRefusal::Unknown),
        };
        if k.expires_at <= t {
            return Err(TokenRefusal::Expired);
        }
        if k.single_use && k.used_at.is_some() {
            return Err(TokenRefusal::Used);
        }
        match &k.node {
            Some(bound) if bound != node => return Err(TokenRefusal::WrongNode(bound.clone())),
            None if enrolled => return Err(TokenRefusal::Enrolled(node.to_owned())),
            _ => {}
        }
        for ip in &k.ips {
            if let Some(node) = holder(ip).map_err(store)? {
                return Err(TokenRefusal::AddressHeld { ip: *ip, node });
            }
        }
        k.used_at = Some(t);
        let ips = k.ips.clone();
        self.save(&f).map_err(store)?;
        Ok(ips)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: &IpAddr) -> Result<Option<String>, StateError> {
        Ok(None)
    }

    #[test]
    fn redeem_checks_every_option() {
        let dir = std::env::temp_dir().join(format!("tether-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = TokenStore::new(dir.join("tokens.json"));
        let ca = tether_pki::Ca::generate("t").unwrap();
        let ca = ca.cert_der();
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let once = store
            .create(ca, Duration::from_secs(60), true, None, vec![ip])
            .unwrap();
        assert_eq!(store.redeem(&once, "edge-1", false, none), Ok(vec![ip]));
        assert_eq!(
            store.redeem(&once, "edge-1", false, none),
            Err(TokenRefusal::Used)
        );
        let bound = store
            .create(
                ca,
                Duration::from_secs(60),
                false,
                Some("edge-2".into()),
                vec![],
            )
            .unwrap();
        assert_eq!(
            store.redeem(&bound, "edge-3", false, none),
            Err(TokenRefusal::WrongNode("edge-2".into()))
        );
        assert!(store.redeem(&bound, "edge-2", true, none).is_ok());
        assert!(store.redeem(&bound, "edge-2", true, none).is_ok());
        let open = store
            .create(ca, Duration::from_secs(60), false, None, vec![])
            .unwrap();
        assert_eq!(
            store.redeem(&open, "edge-1", true, none),
            Err(TokenRefusal::Enrolled("edge-1".into()))
        );
        assert!(store.redeem(&open, "edge-9", false, none).is_ok());
        let expired = store
            .create(ca, Duration::ZERO, false, None, vec![])
            .unwrap();
        assert_eq!(
            store.redeem(&expired, "edge-1", false, none),
            Err(TokenRefusal::Expired)
        );
        let forged: BootstrapToken = once
            .expose()
            .replace(&once.id, "0000000000000000")
            .parse()
            .unwrap();
        assert_eq!(
            store.redeem(&forged, "edge-1", false, none),
            Err(TokenRefusal::Unknown)
        );
        assert!(store.revoke(&bound.id).unwrap());
        assert_eq!(
            store.redeem(&bound, "edge-2", true, none),
            Err(TokenRefusal::Unknown)
        );
        let text = std::fs::read_to_string(dir.join("tokens.json")).unwrap();
        assert!(
            !text.contains(&once.expose()[90..]),
            "secret stored in clear"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("tokens.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
