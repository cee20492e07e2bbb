//! Per-node serving certificates for the kubelet-API front. The apiserver
//! dials a node address and, when it verifies kubelet serving certificates,
//! expects one valid for that node. The front picks the node from the
//! connection's original destination (else the TLS server name), issues a
//! certificate from the kubelet-serving CA with SANs for that node's name and
//! addresses, and caches it. No hand-maintained SAN lists.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tether_pki::Ca;
use tether_tunnel::{IpLookup, SessionRegistry};
use tracing::{debug, warn};

/// Issues and caches node serving certificates.
pub(crate) struct NodeCerts {
    ca: Arc<Ca>,
    registry: SessionRegistry,
    cache: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

/// Cached certificates kept at most; the cache is cleared beyond this.
const MAX_CACHED: usize = 4096;

impl NodeCerts {
    pub(crate) fn new(ca: Arc<Ca>, registry: SessionRegistry) -> Arc<Self> {
        Arc::new(Self {
            ca,
            registry,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The server config for one connection whose original destination is `dst`.
    pub(crate) fn config_for(
        self: &Arc<Self>,
        base: Arc<rustls::ServerConfig>,
        dst: Option<IpAddr>,
    ) -> Arc<rustls::ServerConfig> {
        let mut cfg = (*base).clone();
        cfg.cert_resolver = Arc::new(NodeResolver {
            certs: self.clone(),
            dst,
            fallback: base.cert_resolver.clone(),
        });
        Arc::new(cfg)
    }

    fn issue(&self, sans: Vec<String>) -> Option<Arc<CertifiedKey>> {
        let key = sans.join(",");
        if let Some(c) = self.cache.lock().expect("cert cache").get(&key) {
            return Some(c.clone());
        }
        let refs: Vec<&str> = sans.iter().map(String::as_str).collect();
        let issued = self.ca.issue_server(&sans[0], &refs).ok()?;
        let chain = issued.cert_chain().ok()?;
        let signer = tether_pki::provider()
            .key_provider
            .load_private_key(issued.key_pem.to_der().ok()?)
            .ok()?;
        let ck = Arc::new(CertifiedKey::new(chain, signer));
        let mut cache = self.cache.lock().expect("cert cache");
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(key, ck.clone());
        debug!(sans = ?sans, "issued a node serving certificate");
        Some(ck)
    }
}

struct NodeResolver {
    certs: Arc<NodeCerts>,
    dst: Option<IpAddr>,
    fallback: Arc<dyn ResolvesServerCert>,
}

impl std::fmt::Debug for NodeResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeResolver")
            .field("dst", &self.dst)
            .finish()
    }
}

impl ResolvesServerCert for NodeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let registry = &self.certs.registry;
        let session = match self.dst {
            Some(ip) => match registry.by_ip(ip) {
                IpLookup::One(s) => Some(s),
                _ => None,
            },
            None => hello.server_name().and_then(|n| registry.get(n)),
        };
        let mut sans: Vec<String> = Vec::new();
        if let Some(s) = &session {
            sans.push(s.info().node.clone());
            sans.extend(s.info().ips.iter().map(IpAddr::to_string));
        }
        if let Some(ip) = self.dst
            && !sans.contains(&ip.to_string())
        {
            // Valid for the address dialled even when the node is offline, so
            // the client gets the front's 404 Status instead of a TLS error.
            sans.push(ip.to_string());
        }
        if sans.is_empty() {
            return self.fallback.resolve(hello);
        }
        sans[1..].sort();
        match self.certs.issue(sans) {
            Some(c) => Some(c),
            None => {
                warn!("could not issue a node serving certificate; using the default");
                self.fallback.resolve(hello)
            }
        }
    }
}
