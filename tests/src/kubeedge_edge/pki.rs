//! Certificates as a KubeEdge cluster has them, separate from Tether's PKI: a
//! CA like cloudhub's (`pkg/security/certs/x509_certs.go`,
//! `NewSelfSignedCACertDERBytes`: `CN=KubeEdge`, ECDSA P-256) and edge client
//! certificates as cloudhub signs them for edgehub
//! (`edge/pkg/edgehub/certificate/certmanager.go`, `GetEdgeCert`), plus the
//! rustls client configuration edgestream dials with, including Go's rule
//! for when a client certificate is sent at all.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls_pki_types::CertificateDer;
use tether_pki::{CertifiedKey, SecretPem};
use time::OffsetDateTime;

/// Lifetime of the test CA and its leaves; KubeEdge's defaults are 100 years
/// and 365 days, neither matters in a test.
const LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// A KubeEdge-style CA (`CN=KubeEdge`), the one a Tether cloud must trust on
/// its KubeEdge path only.
pub struct KubeEdgeCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for KubeEdgeCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeEdgeCa").finish_non_exhaustive()
    }
}

impl KubeEdgeCa {
    /// A fresh CA: `CN=KubeEdge`, ECDSA P-256, key usages and EKUs as
    /// cloudhub's.
    pub fn generate() -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "KubeEdge");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut params);
        // rcgen's default algorithm is ECDSA P-256 with SHA-256, as KubeEdge's.
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER (what `kubeedge/casecret` holds as `cadata`).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// An edge certificate as KubeEdge >= v1.16 issues it:
    /// `C=CN, ST=Zhejiang, L=Hangzhou, O=system:nodes, CN=system:node:<node>`,
    /// no SANs unless `ips` are given (real edges have none), client auth.
    pub fn issue_edge(&self, node: &str, ips: &[IpAddr]) -> anyhow::Result<CertifiedKey> {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, "CN");
        dn.push(DnType::StateOrProvinceName, "Zhejiang");
        dn.push(DnType::LocalityName, "Hangzhou");
        dn.push(DnType::OrganizationName, "system:nodes");
        dn.push(DnType::CommonName, format!("system:node:{node}"));
        let sans = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        self.issue(dn, sans)
    }

    /// A certificate as edges enrolled before v1.16 still hold:
    /// `CN=kubeedge.io, O=KubeEdge`, which names no node.
    pub fn issue_legacy(&self) -> anyhow::Result<CertifiedKey> {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "KubeEdge");
        dn.push(DnType::CommonName, "kubeedge.io");
        self.issue(dn, Vec::new())
    }

    fn issue(&self, dn: DistinguishedName, sans: Vec<SanType>) -> anyhow::Result<CertifiedKey> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        // `SignCerts`: DigitalSignature|KeyEncipherment, clientAuth.
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: SecretPem::new(key.serialize_pem()),
        })
    }
}

fn validity(params: &mut CertificateParams) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + LIFETIME;
    let mut serial = tether_pki::rand_u64().to_be_bytes();
    serial[0] &= 0x7f;
    params.serial_number = Some(serial.to_vec().into());
}

/// How the edge double checks the cloud's certificate.
#[derive(Clone, Debug)]
pub enum CloudTrust {
    /// Verify the chain and the name against these roots (the default in
    /// tests, so a test cannot pass against the wrong server).
    Verify(Vec<CertificateDer<'static>>),
    /// Accept any certificate, as edgestream does (`InsecureSkipVerify: true`).
    SkipVerify,
}

/// The TLS client configuration of edgestream: the edge certificate, no
/// ALPN, TLS 1.2 or 1.3, and the cloud checked per `trust`. Like Go's
/// client, it presents the certificate only if the server names no CAs in
/// its CertificateRequest or names the certificate's issuer; otherwise it
/// sends no certificate (`crypto/tls`, `getClientCertificate` and
/// `CertificateRequestInfo.SupportsCertificate`).
pub fn edge_client_tls(
    cert: &CertifiedKey,
    trust: CloudTrust,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let chain = cert.cert_chain().context("edge certificate")?;
    let key = cert.key_pem.to_der().context("edge key")?;
    let issuer = {
        let leaf = chain.first().context("empty edge certificate chain")?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(leaf).context("parse edge certificate")?;
        parsed.issuer().as_raw().to_vec()
    };
    let provider = tether_pki::provider();
    let signer = provider
        .key_provider
        .load_private_key(key)
        .context("load edge key")?;
    let resolver = Arc::new(GoClientCert {
        issuer,
        key: Arc::new(rustls::sign::CertifiedKey::new(chain, signer)),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let config = match trust {
        CloudTrust::Verify(roots) => {
            let mut store = rustls::RootCertStore::empty();
            for root in roots {
                store.add(root)?;
            }
            builder
                .with_root_certificates(store)
                .with_client_cert_resolver(resolver)
        }
        CloudTrust::SkipVerify => builder
            .dangerous()
            // What Go does with `InsecureSkipVerify`.
            .with_custom_certificate_verifier(tether_pki::UnverifiedServer::new(provider))
            .with_client_cert_resolver(resolver),
    };
    Ok(Arc::new(config))
}

/// The single-certificate choice of Go's TLS client.
struct GoClientCert {
    /// The leaf's issuer Name, DER, as CertificateRequest hints carry it.
    issuer: Vec<u8>,
    key: Arc<rustls::sign::CertifiedKey>,
}

// Never prints the key.
impl std::fmt::Debug for GoClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoClientCert").finish_non_exhaustive()
    }
}

impl ResolvesClientCert for GoClientCert {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        // rustls itself sends no certificate when the key fits none of the
        // server's signature schemes, as Go does.
        let named =
            root_hint_subjects.is_empty() || root_hint_subjects.contains(&self.issuer.as_slice());
        named.then(|| self.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
