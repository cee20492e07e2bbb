//! Tether's PKI: a certificate authority, serving and client certificates, PEM
//! loading and atomic writing of key and certificate files, node identity
//! taken from a peer certificate, bootstrap tokens and the enrolment wire,
//! and the rustls configurations every hop uses. One crypto provider (ring) for the whole
//! workspace: every rustls config is built through [`provider`].

pub mod enrol;
mod files;
mod identity;
mod tls;
mod token;
mod unverified;

pub use files::{WriteError, write_atomic};
pub use identity::{Identity, IdentityError, NODE_CN_PREFIX, NODES_GROUP, valid_node_name};
pub use tls::{
    TlsError, client_config, load_certs, load_certs_pem, load_key, provider,
    server_config_client_auth, server_config_no_client_auth, server_config_optional_client_auth,
};
pub use token::{BootstrapToken, TokenError, ca_hash, hex};
pub use unverified::{Chain, UnverifiedServer};

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use time::OffsetDateTime;

/// Errors from creating or using the certificate authority.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or could not sign.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM input did not hold what was expected.
    #[error("invalid PEM for {what}: {reason}")]
    Pem {
        /// Which input was being read.
        what: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// A SAN was neither an IP address nor a valid DNS name.
    #[error("invalid subject alternative name {0:?}")]
    San(String),
    /// A certificate signing request was refused.
    #[error("certificate signing request refused: {0}")]
    Csr(String),
    /// The CA key is not the key of the CA certificate.
    #[error("the CA key does not match the CA certificate")]
    KeyMismatch,
}

/// Why a PEM private key cannot be read, when the reason is that it is
/// encrypted: rustls and rcgen read only unencrypted keys.
pub(crate) fn encrypted_key(pem: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(pem);
    (text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED")).then(|| {
        "the key is encrypted (passphrase-protected), which is not supported; decrypt it (openssl pkey -in KEY -out KEY.plain) and point to the decrypted file, mode 0600".to_owned()
    })
}

/// A private key in PEM form. Debug never prints the key.
#[derive(Clone)]
pub struct SecretPem(String);

impl SecretPem {
    /// Wraps PEM text that holds a private key.
    pub fn new(pem: String) -> Self {
        Self(pem)
    }
    /// The PEM text, for writing to a 0600 file or parsing.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Parses the key for rustls.
    pub fn to_der(&self) -> Result<PrivateKeyDer<'static>, PkiError> {
        PrivateKeyDer::from_pem_slice(self.0.as_bytes()).map_err(|e| PkiError::Pem {
            what: "private key",
            reason: encrypted_key(self.0.as_bytes()).unwrap_or_else(|| e.to_string()),
        })
    }
}

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretPem(<redacted>)")
    }
}

/// A certificate with its private key.
#[derive(Clone, Debug)]
pub struct CertifiedKey {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM.
    pub key_pem: SecretPem,
}

impl CertifiedKey {
    /// The certificate chain (leaf only) in DER for rustls.
    pub fn cert_chain(&self) -> Result<Vec<CertificateDer<'static>>, PkiError> {
        parse_certs(self.cert_pem.as_bytes(), "certificate")
    }
}

/// A certificate authority that signs Tether's certificates.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: SecretPem,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// Default lifetime of issued leaf certificates.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Tolerate clocks a little behind the issuer's: certificates start this
/// many seconds before they are issued.
pub const BACKDATE_SECS: i64 = 3600;
const BACKDATE: Duration = Duration::from_secs(BACKDATE_SECS as u64);

impl Ca {
    /// Creates a new self-signed CA with the given common name.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(common_name, &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_LIFETIME);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let key_pem = SecretPem(key.serialize_pem());
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads an existing CA from its certificate and key in PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let (key, key_pem) = ca_key(key_pem)?;
        let key_pem = key_pem.as_str();
        let cert_der = parse_certs(cert_pem.as_bytes(), "CA certificate")?
            .into_iter()
            .next()
            .ok_or(PkiError::Pem {
                what: "CA certificate",
                reason: "no certificate".into(),
            })?;
        // A key of another CA would sign certificates no edge can verify.
        let (_, cert) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|e| PkiError::Pem {
                what: "CA certificate",
                reason: e.to_string(),
            })?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            key_pem: SecretPem(key_pem.to_owned()),
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA key, PEM.
    pub fn key_pem(&self) -> &SecretPem {
        &self.key_pem
    }

    /// Issues a TLS serving certificate valid for `sans` (DNS names or IPs).
    pub fn issue_server(&self, common_name: &str, sans: &[&str]) -> Result<CertifiedKey, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name, &[]);
        params.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.sign(params)
    }

    /// Issues a client certificate for an edge node: CN `system:node:<name>`,
    /// O `system:nodes`, client-auth only, with the node's addresses as IP
    /// SANs (the cloud routes by IP only to addresses the certificate binds).
    pub fn issue_node_client(&self, node: &str, ips: &[IpAddr]) -> Result<CertifiedKey, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&format!("{NODE_CN_PREFIX}{node}"), &[NODES_GROUP]);
        params.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.sign(params)
    }

    /// Issues a client certificate with the given subject, client-auth only.
    pub fn issue_client(
        &self,
        common_name: &str,
        organizations: &[&str],
    ) -> Result<CertifiedKey, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name, organizations);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.sign(params)
    }

    /// Signs a node's CSR. Only the CSR's public key is used: subject, SANs,
    /// key usages, EKUs, basic constraints and validity are set here, because
    /// rcgen copies all of a CSR's extensions (including CA:true and extra
    /// SANs) into its params. The CSR must name `system:node:<node>`.
    pub fn sign_node_csr(
        &self,
        csr_pem: &str,
        node: &str,
        ips: &[IpAddr],
        lifetime: Duration,
    ) -> Result<String, PkiError> {
        let csr = check_node_csr(csr_pem, node)?;
        let want = format!("{NODE_CN_PREFIX}{node}");
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&want, &[NODES_GROUP]);
        params.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, lifetime);
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.pem())
    }

    fn sign(&self, mut params: CertificateParams) -> Result<CertifiedKey, PkiError> {
        set_validity(&mut params, DEFAULT_LEAF_LIFETIME);
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: SecretPem(key.serialize_pem()),
        })
    }
}

fn dn_text(v: &rcgen::DnValue) -> String {
    match v {
        rcgen::DnValue::Utf8String(s) => s.clone(),
        rcgen::DnValue::PrintableString(s) => s.as_str().to_owned(),
        rcgen::DnValue::Ia5String(s) => s.as_str().to_owned(),
        rcgen::DnValue::TeletexString(s) => s.as_str().to_owned(),
        _ => String::new(),
    }
}

/// Parses a CSR, checks its signature and that it names `system:node:<node>`.
/// Signers call this before spending anything (a single-use token) on it.
pub fn check_node_csr(
    csr_pem: &str,
    node: &str,
) -> Result<rcgen::CertificateSigningRequestParams, PkiError> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| PkiError::Csr(format!("not a valid signed CSR: {e}")))?;
    let want = format!("{NODE_CN_PREFIX}{node}");
    let cn = csr
        .params
        .distinguished_name
        .get(&DnType::CommonName)
        .map(dn_text)
        .unwrap_or_default();
    if cn != want {
        return Err(PkiError::Csr(format!(
            "CSR subject {cn:?} does not match node {want:?}"
        )));
    }
    Ok(csr)
}

/// A key and a CSR for `system:node:<node>` (the edge side of enrolment).
pub fn node_csr(node: &str) -> Result<(String, SecretPem), PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(&format!("{NODE_CN_PREFIX}{node}"), &[NODES_GROUP]);
    let key = KeyPair::generate()?;
    let csr = params.serialize_request(&key)?;
    let pem = csr
        .pem()
        .map_err(|e| PkiError::Csr(format!("cannot encode CSR: {e}")))?;
    Ok((pem, SecretPem(key.serialize_pem())))
}

fn dn(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for o in organizations {
        dn.push(DnType::OrganizationName, *o);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn san(s: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    // rcgen accepts any IA5 string; insist on a real DNS name.
    rustls_pki_types::DnsName::try_from(s).map_err(|_| PkiError::San(s.to_owned()))?;
    s.to_owned()
        .try_into()
        .map(SanType::DnsName)
        .map_err(|_| PkiError::San(s.to_owned()))
}

fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
    // A random serial so that reissued certificates never collide.
    let mut serial = [0u8; 16];
    serial[..8].copy_from_slice(&rand_u64().to_be_bytes());
    serial[8..].copy_from_slice(&rand_u64().to_be_bytes());
    serial[0] &= 0x7f;
    params.serial_number = Some(serial.to_vec().into());
}

/// A random u64 from the process's hash seed source; good enough for serials
/// and jitter, and it keeps `rand` out of the dependency tree.
pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

pub(crate) fn parse_certs(
    pem: &[u8],
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::Pem {
            what,
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// A CA key from PEM: PKCS#8 (`PRIVATE KEY`) as rcgen reads it, or an RSA
/// key in PKCS#1 (`RSA PRIVATE KEY`, what kubeadm writes for its CAs),
/// rewrapped as PKCS#8. Returns the key and its PKCS#8 PEM.
fn ca_key(key_pem: &str) -> Result<(KeyPair, String), PkiError> {
    let bad = |reason: String| PkiError::Pem {
        what: "CA key",
        reason,
    };
    let der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
        bad(crate::encrypted_key(key_pem.as_bytes()).unwrap_or_else(|| e.to_string()))
    })?;
    match der {
        PrivateKeyDer::Pkcs8(_) => {
            let key = KeyPair::from_pem(key_pem)?;
            Ok((key, key_pem.to_owned()))
        }
        PrivateKeyDer::Pkcs1(rsa) => {
            let pkcs8 = pkcs1_to_pkcs8(rsa.secret_pkcs1_der());
            let key = KeyPair::try_from(pkcs8.as_slice())?;
            let pem = key.serialize_pem();
            Ok((key, pem))
        }
        PrivateKeyDer::Sec1(_) => Err(bad(
            "EC keys in SEC1 form (BEGIN EC PRIVATE KEY) are not read; convert with `openssl pkcs8 -topk8 -nocrypt`".into(),
        )),
        _ => Err(bad("unsupported key type".into())),
    }
}

/// Wraps a PKCS#1 RSAPrivateKey in a PKCS#8 PrivateKeyInfo (RFC 5208):
/// SEQUENCE { INTEGER 0, SEQUENCE { rsaEncryption, NULL }, OCTET STRING key }.
fn pkcs1_to_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    fn der_len(out: &mut Vec<u8>, len: usize) {
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
    }
    const VERSION: [u8; 3] = [0x02, 0x01, 0x00];
    // rsaEncryption (1.2.840.113549.1.1.1) with NULL parameters.
    const ALGORITHM: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut octets = vec![0x04];
    der_len(&mut octets, pkcs1.len());
    octets.extend_from_slice(pkcs1);
    let body_len = VERSION.len() + ALGORITHM.len() + octets.len();
    let mut out = vec![0x30];
    der_len(&mut out, body_len);
    out.extend_from_slice(&VERSION);
    out.extend_from_slice(&ALGORITHM);
    out.extend_from_slice(&octets);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_kubeadm_rsa_ca_in_pkcs1_signs_node_certificates() {
        let ca = Ca::from_pem(
            include_str!("../testdata/kubeadm-ca.crt"),
            include_str!("../testdata/kubeadm-ca.key"),
        )
        .unwrap();
        assert!(
            ca.key_pem()
                .expose()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        let node = ca.issue_node_client("edge-1", &[]).unwrap();
        let der = node.cert_chain().unwrap().remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(cert.issuer().to_string(), "CN=test-kubeadm-ca");
        // sha256WithRSAEncryption
        assert_eq!(
            cert.signature_algorithm.algorithm.to_id_string(),
            "1.2.840.113549.1.1.11"
        );
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        // The converted key loads again (the state directory stores it).
        Ca::from_pem(ca.cert_pem(), ca.key_pem().expose()).unwrap();
    }

    #[test]
    fn an_ec_key_in_sec1_form_gets_a_clear_error() {
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIDXs\n-----END EC PRIVATE KEY-----\n";
        let e = ca_key(sec1)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("SEC1") || e.contains("invalid PEM"), "{e}");
    }

    use super::*;

    #[test]
    fn node_certificate_carries_identity() {
        let ca = Ca::generate("tether-test-ca").unwrap();
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let node = ca.issue_node_client("edge-1", &[ip]).unwrap();
        let der = node.cert_chain().unwrap().remove(0);
        let id = Identity::from_der(&der).unwrap();
        assert_eq!(id.ips, vec![ip]);
        assert_eq!(id.common_name, "system:node:edge-1");
        assert_eq!(id.node_name(), Some("edge-1"));
    }

    #[test]
    fn ca_round_trips_through_pem() {
        let ca = Ca::generate("tether-test-ca").unwrap();
        let again = Ca::from_pem(ca.cert_pem(), ca.key_pem().expose()).unwrap();
        let leaf = again
            .issue_server("cloud", &["localhost", "127.0.0.1"])
            .unwrap();
        assert!(leaf.cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(!format!("{:?}", leaf.key_pem).contains("PRIVATE"));
    }

    #[test]
    fn csr_cannot_ask_for_more_than_a_node_client_cert() {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let ca = Ca::generate("tether-test-ca").unwrap();
        // A greedy CSR: CA:true, server auth, extra SANs.
        let mut params =
            CertificateParams::new(vec!["evil.example".to_string(), "10.9.9.9".to_string()])
                .unwrap();
        params.distinguished_name = dn("system:node:edge-1", &[NODES_GROUP, "system:masters"]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let key = KeyPair::generate().unwrap();
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let pem = ca
            .sign_node_csr(&csr, "edge-1", &[ip], Duration::from_secs(60))
            .unwrap();
        let der = parse_certs(pem.as_bytes(), "c").unwrap().remove(0);
        let id = Identity::from_der(&der).unwrap();
        assert_eq!(id.node_name(), Some("edge-1"));
        assert_eq!(id.organizations, vec![NODES_GROUP.to_string()]);
        assert_eq!(id.ips, vec![ip]);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(!ku.key_cert_sign());
        // Another node's name is refused; garbage is refused.
        let (other, _) = node_csr("edge-2").unwrap();
        assert!(matches!(
            ca.sign_node_csr(&other, "edge-1", &[], Duration::from_secs(60)),
            Err(PkiError::Csr(_))
        ));
        assert!(matches!(
            ca.sign_node_csr("garbage", "edge-1", &[], Duration::from_secs(60)),
            Err(PkiError::Csr(_))
        ));
    }

    #[test]
    fn bad_san_is_refused() {
        let ca = Ca::generate("tether-test-ca").unwrap();
        assert!(matches!(
            ca.issue_server("x", &["not a name"]),
            Err(PkiError::San(_))
        ));
    }
}
