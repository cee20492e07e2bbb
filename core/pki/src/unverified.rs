//! A server-certificate verifier that does not judge the certificate, for
//! the few places that decide trust another way: the bootstrap's `GET
//! /ca.crt`, trusted only once its hash matches the token; `tether edge
//! --check`, which reports the chain it saw; and the KubeEdge test edge,
//! which copies Go's `InsecureSkipVerify`. The handshake signatures are
//! still checked, so the server does hold the key of what it presented.

use std::sync::{Arc, Mutex};

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// The chain a server presented, leaf first.
pub type Chain = Vec<CertificateDer<'static>>;

/// Accepts any server certificate, checks the handshake signatures, and
/// keeps the last chain presented ([`UnverifiedServer::seen`]).
#[derive(Debug)]
pub struct UnverifiedServer {
    provider: Arc<CryptoProvider>,
    seen: Mutex<Option<Chain>>,
}

impl UnverifiedServer {
    /// A verifier on `provider`'s signature algorithms.
    pub fn new(provider: Arc<CryptoProvider>) -> Arc<Self> {
        Arc::new(Self {
            provider,
            seen: Mutex::new(None),
        })
    }

    /// The chain of the last handshake, if any.
    pub fn seen(&self) -> Option<Chain> {
        self.seen.lock().expect("verifier lock").clone()
    }
}

impl ServerCertVerifier for UnverifiedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        *self.seen.lock().expect("verifier lock") = Some(chain);
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
