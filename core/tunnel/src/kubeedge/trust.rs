//! Which KubeEdge certificates are admitted, and as which node (ADR 0017).
//!
//! The tunnel port's TLS verifier accepts leaves from Tether's edge CA and
//! from the configured KubeEdge CA. After the handshake the listener asks
//! this module which of the two the leaf chains to, so each CA is trusted
//! only for its own path. The node comes from the certificate
//! (`CN=system:node:<name>, O=system:nodes`); the edge's
//! `SessionHostNameOverride` header must agree. Legacy `CN=kubeedge.io`
//! certificates name no node and are refused unless the operator opted in.

use std::net::IpAddr;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};
use tether_pki::{Identity, valid_node_name};

/// Common name of KubeEdge edge certificates issued before v1.16.
pub const LEGACY_CN: &str = "kubeedge.io";

/// What the operator configured.
#[derive(Clone, Debug, Default)]
pub struct TrustConfig {
    /// The KubeEdge CA certificates (cloudhub's CA).
    pub kubeedge_cas: Vec<CertificateDer<'static>>,
    /// Tether's own edge CA certificates: the only roots `/v1/tunnel`
    /// accepts once a KubeEdge CA is trusted on the same port.
    pub tether_cas: Vec<CertificateDer<'static>>,
    /// Admit `CN=kubeedge.io` certificates under the node name their
    /// header claims (default false): then any holder of any certificate
    /// of the KubeEdge CA may claim any node.
    pub trust_legacy_certs: bool,
    /// Take the node address from the `SessionInternalIP` header when the
    /// certificate has no IP SANs (default false): the edge may then claim
    /// any address, and requests routed by that address reach it.
    pub trust_internal_ip_header: bool,
}

/// Why a KubeEdge edge was refused. The message reaches the edge's log in
/// `CLOSE_CONNECT`; the label is a metric value.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// The leaf does not verify against the KubeEdge CA (other issuer,
    /// expired, wrong key usage), with the verifier's reason.
    #[error(
        "403 Forbidden: the client certificate is not accepted by the KubeEdge CA this cloud trusts: {0}"
    )]
    UntrustedCa(String),
    /// The leaf names no node (and is not a legacy certificate).
    #[error(
        "403 Forbidden: certificate subject {0:?} is not a node identity (want CN=system:node:<name>, O=system:nodes)"
    )]
    NotANode(String),
    /// A legacy `CN=kubeedge.io` certificate, not trusted.
    #[error(
        "403 Forbidden: legacy certificate CN=kubeedge.io names no node; re-issue the edge certificate (keadm) or set kubeedge.trust_legacy_certs on the cloud"
    )]
    Legacy,
    /// The header names another node than the certificate.
    #[error(
        "403 Forbidden: SessionHostNameOverride {claimed:?} does not match the certificate's node {node:?}"
    )]
    NodeMismatch {
        /// The header's value.
        claimed: String,
        /// The certificate's node.
        node: String,
    },
    /// A trusted legacy certificate whose header names no valid node.
    #[error("400 Bad Request: SessionHostNameOverride {0:?} is not a valid node name")]
    BadNodeName(String),
    /// The certificate is on the deny list.
    #[error("403 Forbidden: {0}")]
    Revoked(String),
    /// The upgrade request is not a WebSocket upgrade.
    #[error("400 Bad Request: {0}")]
    BadUpgrade(&'static str),
}

impl Refusal {
    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::UntrustedCa(_) => "untrusted_ca",
            Self::NotANode(_) => "not_a_node",
            Self::Legacy => "legacy_cert",
            Self::NodeMismatch { .. } => "node_mismatch",
            Self::BadNodeName(_) => "bad_node_name",
            Self::Revoked(_) => "revoked",
            Self::BadUpgrade(_) => "bad_upgrade",
        }
    }
}

/// An admitted KubeEdge edge.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// The node name.
    pub node: String,
    /// Its addresses (IP SANs, or the header when opted in).
    pub ips: Vec<IpAddr>,
    /// The certificate's identity.
    pub identity: Identity,
    /// True for a legacy certificate admitted by opt-in.
    pub legacy: bool,
}

/// Decides over KubeEdge and Tether certificates on the shared port.
/// Cheap to clone; [`KubeEdgeTrust::reload`] replaces the CAs for every
/// clone (the tunnel TLS reload does it with the same files).
#[derive(Clone)]
pub struct KubeEdgeTrust(Arc<std::sync::RwLock<Arc<Verifiers>>>);

struct Verifiers {
    kubeedge: Arc<dyn ClientCertVerifier>,
    tether: Option<Arc<dyn ClientCertVerifier>>,
    cfg: TrustConfig,
}

impl std::fmt::Debug for KubeEdgeTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.current();
        f.debug_struct("KubeEdgeTrust")
            .field("trust_legacy_certs", &v.cfg.trust_legacy_certs)
            .field("trust_internal_ip_header", &v.cfg.trust_internal_ip_header)
            .finish()
    }
}

impl Verifiers {
    fn new(cfg: TrustConfig) -> Result<Self, tether_pki::TlsError> {
        let kubeedge = verifier(&cfg.kubeedge_cas)?;
        let tether = match cfg.tether_cas.is_empty() {
            true => None,
            false => Some(verifier(&cfg.tether_cas)?),
        };
        Ok(Self {
            kubeedge,
            tether,
            cfg,
        })
    }
}

fn verifier(
    cas: &[CertificateDer<'static>],
) -> Result<Arc<dyn ClientCertVerifier>, tether_pki::TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone())?;
    }
    Ok(
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), tether_pki::provider())
            .build()?,
    )
}

impl KubeEdgeTrust {
    /// Builds the two verifiers; fails on an empty or unusable CA.
    pub fn new(cfg: TrustConfig) -> Result<Self, tether_pki::TlsError> {
        Ok(Self(Arc::new(std::sync::RwLock::new(Arc::new(
            Verifiers::new(cfg)?,
        )))))
    }

    /// Replaces the configuration for connections accepted from now on.
    pub fn reload(&self, cfg: TrustConfig) -> Result<(), tether_pki::TlsError> {
        let v = Arc::new(Verifiers::new(cfg)?);
        *self.0.write().expect("trust lock") = v;
        Ok(())
    }

    fn current(&self) -> Arc<Verifiers> {
        self.0.read().expect("trust lock").clone()
    }

    /// True when the chain verifies against Tether's edge CA (or no
    /// Tether CA was given to tell them apart).
    pub fn is_tether(&self, chain: &[CertificateDer<'_>]) -> bool {
        match &self.current().tether {
            Some(v) => chains(v.as_ref(), chain),
            None => true,
        }
    }

    /// Admits a KubeEdge edge, or says why not. `claimed` and `claimed_ip`
    /// are the `SessionHostNameOverride` and `SessionInternalIP` headers.
    pub fn admit(
        &self,
        chain: &[CertificateDer<'_>],
        claimed: Option<&str>,
        claimed_ip: Option<&str>,
    ) -> Result<Admitted, Refusal> {
        let v = self.current();
        verify(v.kubeedge.as_ref(), chain).map_err(Refusal::UntrustedCa)?;
        let leaf = chain
            .first()
            .ok_or_else(|| Refusal::UntrustedCa("no certificate".into()))?;
        let identity = Identity::from_der(leaf).map_err(|e| Refusal::NotANode(e.to_string()))?;
        let claimed = claimed.map(str::trim).filter(|c| !c.is_empty());
        let (node, legacy) = match identity.node_name() {
            Some(node) => {
                if let Some(c) = claimed
                    && c != node
                {
                    return Err(Refusal::NodeMismatch {
                        claimed: c.to_owned(),
                        node: node.to_owned(),
                    });
                }
                (node.to_owned(), false)
            }
            None if identity.common_name == LEGACY_CN => {
                if !v.cfg.trust_legacy_certs {
                    return Err(Refusal::Legacy);
                }
                let c = claimed.unwrap_or_default();
                if !valid_node_name(c) {
                    return Err(Refusal::BadNodeName(c.to_owned()));
                }
                (c.to_owned(), true)
            }
            None => return Err(Refusal::NotANode(identity.common_name.clone())),
        };
        let mut ips = identity.ips.clone();
        if ips.is_empty()
            && v.cfg.trust_internal_ip_header
            && let Some(ip) = claimed_ip.and_then(|v| v.trim().parse::<IpAddr>().ok())
        {
            ips.push(ip);
        }
        Ok(Admitted {
            node,
            ips,
            identity,
            legacy,
        })
    }
}

fn chains(v: &dyn ClientCertVerifier, chain: &[CertificateDer<'_>]) -> bool {
    verify(v, chain).is_ok()
}

fn verify(v: &dyn ClientCertVerifier, chain: &[CertificateDer<'_>]) -> Result<(), String> {
    let Some((leaf, rest)) = chain.split_first() else {
        return Err("no certificate".into());
    };
    v.verify_client_cert(leaf, rest, UnixTime::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pki {
        kubeedge: tether_pki::Ca,
        tether: tether_pki::Ca,
    }

    fn pki() -> Pki {
        Pki {
            kubeedge: tether_pki::Ca::generate("KubeEdge").unwrap(),
            tether: tether_pki::Ca::generate("tether").unwrap(),
        }
    }

    fn trust(p: &Pki, legacy: bool, ip_header: bool) -> KubeEdgeTrust {
        KubeEdgeTrust::new(TrustConfig {
            kubeedge_cas: vec![p.kubeedge.cert_der().clone()],
            tether_cas: vec![p.tether.cert_der().clone()],
            trust_legacy_certs: legacy,
            trust_internal_ip_header: ip_header,
        })
        .unwrap()
    }

    fn leaf(ca: &tether_pki::Ca, cn: &str, orgs: &[&str]) -> Vec<CertificateDer<'static>> {
        ca.issue_client(cn, orgs).unwrap().cert_chain().unwrap()
    }

    #[test]
    fn node_comes_from_the_certificate_and_the_header_must_agree() {
        let p = pki();
        let t = trust(&p, false, false);
        let c = leaf(&p.kubeedge, "system:node:edge-1", &["system:nodes"]);
        let a = t.admit(&c, Some("edge-1"), Some("10.0.0.9")).unwrap();
        assert_eq!(a.node, "edge-1");
        assert!(a.ips.is_empty(), "header IP not trusted by default");
        assert_eq!(t.admit(&c, None, None).unwrap().node, "edge-1");
        let e = t.admit(&c, Some("edge-2"), None).unwrap_err();
        assert_eq!(e.label(), "node_mismatch");
        assert!(e.to_string().contains("edge-2"), "{e}");
        // Opt-in: the header's address when the certificate has none.
        let t = trust(&p, false, true);
        let a = t.admit(&c, Some("edge-1"), Some("10.0.0.9")).unwrap();
        assert_eq!(a.ips, vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn each_ca_only_for_its_own_path() {
        let p = pki();
        let t = trust(&p, false, false);
        let tether_leaf = leaf(&p.tether, "system:node:edge-1", &["system:nodes"]);
        let ke_leaf = leaf(&p.kubeedge, "system:node:edge-1", &["system:nodes"]);
        assert_eq!(
            t.admit(&tether_leaf, None, None).unwrap_err().label(),
            "untrusted_ca"
        );
        assert!(t.is_tether(&tether_leaf));
        assert!(!t.is_tether(&ke_leaf));
    }

    #[test]
    fn legacy_certificates_only_by_opt_in() {
        let p = pki();
        let c = leaf(&p.kubeedge, "kubeedge.io", &["KubeEdge"]);
        let e = trust(&p, false, false)
            .admit(&c, Some("edge-1"), None)
            .unwrap_err();
        assert_eq!(e.label(), "legacy_cert");
        let t = trust(&p, true, false);
        let a = t.admit(&c, Some("edge-1"), None).unwrap();
        assert!(a.legacy);
        assert_eq!(a.node, "edge-1");
        assert_eq!(
            t.admit(&c, Some("Bad/Name"), None).unwrap_err().label(),
            "bad_node_name"
        );
        let other = leaf(&p.kubeedge, "admin", &["system:masters"]);
        assert_eq!(
            t.admit(&other, Some("edge-1"), None).unwrap_err().label(),
            "not_a_node"
        );
    }
}
