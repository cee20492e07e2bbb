//! A TLS client for the one request made before the cloud CA is known:
//! `GET /ca.crt`. It accepts any server certificate (the handshake signature
//! is still checked); what it fetches is trusted only after its SHA-256
//! matches the hash in the bootstrap token.

use std::sync::Arc;

pub(crate) fn trust_on_hash_client() -> Arc<rustls::ClientConfig> {
    let provider = tether_pki::provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported")
        .dangerous()
        .with_custom_certificate_verifier(tether_pki::UnverifiedServer::new(provider))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}
