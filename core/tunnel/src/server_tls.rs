//! A server TLS configuration that can be replaced while serving: new
//! connections use the newest one (certificate or CA reload from disk);
//! established connections keep theirs.

use std::sync::{Arc, RwLock};

/// Shared, replaceable server TLS configuration. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ServerTls(Arc<RwLock<Arc<rustls::ServerConfig>>>);

impl ServerTls {
    /// Wraps a configuration.
    pub fn new(cfg: Arc<rustls::ServerConfig>) -> Self {
        Self(Arc::new(RwLock::new(cfg)))
    }

    /// The configuration new connections use.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.0.read().expect("tls lock").clone()
    }

    /// Replaces it for connections accepted from now on.
    pub fn replace(&self, cfg: Arc<rustls::ServerConfig>) {
        *self.0.write().expect("tls lock") = cfg;
    }
}

impl From<Arc<rustls::ServerConfig>> for ServerTls {
    fn from(cfg: Arc<rustls::ServerConfig>) -> Self {
        Self::new(cfg)
    }
}
