//! Identity of a TLS peer, read from its certificate. The node name comes from
//! the certificate and nothing else: CN `system:node:<name>` with O `system:nodes`.

use std::net::IpAddr;

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Common-name prefix of node certificates.
pub const NODE_CN_PREFIX: &str = "system:node:";
/// Organization that node certificates carry.
pub const NODES_GROUP: &str = "system:nodes";

/// Errors reading an identity from a certificate.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The peer presented no certificate.
    #[error("peer presented no certificate")]
    NoCertificate,
    /// The certificate could not be parsed.
    #[error("unparsable peer certificate: {0}")]
    Parse(String),
    /// The certificate is not a node certificate.
    #[error(
        "certificate subject {0:?} is not a node identity (want CN system:node:<name>, O system:nodes)"
    )]
    NotANode(String),
}

/// The subject of a verified peer certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Subject common name.
    pub common_name: String,
    /// Subject organizations (Kubernetes groups).
    pub organizations: Vec<String>,
    /// IP addresses in the subjectAltName: for a node, the addresses the
    /// node may be reached at (routing by IP trusts only these).
    pub ips: Vec<IpAddr>,
    /// Serial number, lowercase hex without leading zeros.
    pub serial: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

impl Identity {
    /// Reads the subject of a DER certificate.
    pub fn from_der(der: &CertificateDer<'_>) -> Result<Self, IdentityError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
        let subject = cert.subject();
        let common_name = subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_owned();
        let organizations = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok().map(str::to_owned))
            .collect();
        let ips = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => Some(IpAddr::from(<[u8; 4]>::try_from(*b).ok()?)),
                        16 => Some(IpAddr::from(<[u8; 16]>::try_from(*b).ok()?)),
                        _ => None,
                    },
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(IdentityError::Parse(e.to_string())),
        };
        Ok(Self {
            common_name,
            organizations,
            ips,
            serial: cert
                .tbs_certificate
                .raw_serial_as_string()
                .replace(':', "")
                .trim_start_matches('0')
                .to_owned(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// Reads the identity of the first certificate of a verified peer chain.
    pub fn from_peer(chain: Option<&[CertificateDer<'_>]>) -> Result<Self, IdentityError> {
        let leaf = chain
            .and_then(|c| c.first())
            .ok_or(IdentityError::NoCertificate)?;
        Self::from_der(leaf)
    }

    /// The node name, when this is a node identity.
    pub fn node_name(&self) -> Option<&str> {
        let name = self.common_name.strip_prefix(NODE_CN_PREFIX)?;
        (valid_node_name(name) && self.organizations.iter().any(|o| o == NODES_GROUP))
            .then_some(name)
    }

    /// The node name, or an error saying why this is not a node.
    pub fn require_node(&self) -> Result<&str, IdentityError> {
        self.node_name()
            .ok_or_else(|| IdentityError::NotANode(self.common_name.clone()))
    }
}

/// True for a valid Kubernetes node name (an RFC 1123 subdomain).
pub fn valid_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_name_needs_group_and_valid_name() {
        let id = |cn: &str, o: &[&str]| Identity {
            common_name: cn.into(),
            organizations: o.iter().map(|s| s.to_string()).collect(),
            ips: Vec::new(),
            serial: String::new(),
            not_before: 0,
            not_after: 0,
        };
        assert_eq!(
            id("system:node:a-1", &[NODES_GROUP]).node_name(),
            Some("a-1")
        );
        assert_eq!(id("system:node:a-1", &["other"]).node_name(), None);
        assert_eq!(id("system:node:", &[NODES_GROUP]).node_name(), None);
        assert_eq!(id("system:node:A/B", &[NODES_GROUP]).node_name(), None);
        assert_eq!(id("admin", &[NODES_GROUP]).node_name(), None);
    }
}
