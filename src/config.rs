//! Configuration files of the roles (YAML, unknown fields refused) and their
//! conversion into the options the role crates run with. Command-line flags
//! and `TETHER_*` environment variables override file values.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use tether_cloudstream::{Authorizer, FrontLimits};
use tether_tunnel::TunnelLimits;

/// `tether cloud` configuration.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct CloudConfig {
    /// Where edges dial (default `0.0.0.0:10004`).
    pub(crate) tunnel_addr: SocketAddr,
    /// The kubelet-API front (default `0.0.0.0:10003`).
    pub(crate) front_addr: SocketAddr,
    /// Metrics and probes (default `127.0.0.1:10005`).
    pub(crate) admin_addr: SocketAddr,
    /// Tunnel serving certificate and key (PEM); must chain to a CA edges pin.
    pub(crate) tunnel_cert: Option<PathBuf>,
    /// Key of `tunnel_cert`.
    pub(crate) tunnel_key: Option<PathBuf>,
    /// CA that signs edge node certificates.
    pub(crate) edge_ca: Option<PathBuf>,
    /// Front serving certificate and key (PEM).
    pub(crate) front_cert: Option<PathBuf>,
    /// Key of `front_cert`.
    pub(crate) front_key: Option<PathBuf>,
    /// CA of the apiserver's kubelet client certificate (e.g. the cluster CA).
    pub(crate) front_client_ca: Option<PathBuf>,
    /// Who may use the front.
    pub(crate) authz: Authorizer,
    /// Tunnel bounds and timers.
    pub(crate) limits: TunnelLimits,
    /// Front bounds.
    pub(crate) front_limits: FrontLimits,
    /// Drain deadline after SIGTERM, in seconds (default 10).
    pub(crate) drain_timeout_secs: u64,
    /// This replica's address as the control-plane hosts reach it; with
    /// `tunnel_port`, published at the admin `/tunnelport` for iptables-manager.
    pub(crate) advertise_address: Option<std::net::IpAddr>,
    /// This replica's tunnel port (10351, 10352, ... one per replica).
    pub(crate) tunnel_port: Option<u16>,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            tunnel_addr: ([0, 0, 0, 0], 10004).into(),
            front_addr: ([0, 0, 0, 0], 10003).into(),
            admin_addr: ([127, 0, 0, 1], 10005).into(),
            tunnel_cert: None,
            tunnel_key: None,
            edge_ca: None,
            front_cert: None,
            front_key: None,
            front_client_ca: None,
            authz: Authorizer::default(),
            limits: TunnelLimits::default(),
            front_limits: FrontLimits::default(),
            drain_timeout_secs: 10,
            advertise_address: None,
            tunnel_port: None,
        }
    }
}

/// `tether edge` configuration.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct EdgeConfig {
    /// This node's name; must match the certificate's `system:node:<name>`.
    pub(crate) node_name: Option<String>,
    /// The cloud's tunnel address, `host:port`.
    pub(crate) cloud_addr: Option<String>,
    /// Name the cloud certificate must carry (default: host of `cloud_addr`).
    pub(crate) cloud_server_name: Option<String>,
    /// CA that the cloud's certificate must chain to (pinned).
    pub(crate) ca: Option<PathBuf>,
    /// This node's client certificate (PEM).
    pub(crate) cert: Option<PathBuf>,
    /// Key of `cert`.
    pub(crate) key: Option<PathBuf>,
    /// Kubelet endpoint (default `http://127.0.0.1:10350`, edged's).
    pub(crate) kubelet_url: String,
    /// CA of an `https://` kubelet's serving certificate.
    pub(crate) kubelet_ca: Option<PathBuf>,
    /// Client certificate for an `https://` kubelet.
    pub(crate) kubelet_cert: Option<PathBuf>,
    /// Key of `kubelet_cert`.
    pub(crate) kubelet_key: Option<PathBuf>,
    /// Name the kubelet's certificate must carry (default: its IP).
    pub(crate) kubelet_server_name: Option<String>,
    /// Local endpoints the cloud may reach besides the kubelet, `ip:port`.
    pub(crate) allow: Vec<SocketAddr>,
    /// Metrics and probes (default `127.0.0.1:10006`).
    pub(crate) admin_addr: SocketAddr,
    /// Tunnel bounds and timers.
    pub(crate) limits: TunnelLimits,
    /// First reconnect delay in milliseconds (default 500).
    pub(crate) backoff_base_ms: u64,
    /// Longest reconnect delay in seconds (default 30).
    pub(crate) backoff_max_secs: u64,
    /// Drain deadline after SIGTERM, in seconds (default 10).
    pub(crate) drain_timeout_secs: u64,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            node_name: None,
            cloud_addr: None,
            cloud_server_name: None,
            ca: None,
            cert: None,
            key: None,
            kubelet_url: "http://127.0.0.1:10350".into(),
            kubelet_ca: None,
            kubelet_cert: None,
            kubelet_key: None,
            kubelet_server_name: None,
            allow: Vec::new(),
            admin_addr: ([127, 0, 0, 1], 10006).into(),
            limits: TunnelLimits::default(),
            backoff_base_ms: 500,
            backoff_max_secs: 30,
            drain_timeout_secs: 10,
        }
    }
}

/// Reads a YAML config file, naming the file and field on error.
pub(crate) fn load<T: for<'de> Deserialize<'de> + Default>(
    path: Option<&Path>,
) -> anyhow::Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    serde_saphyr::from_str(&text).with_context(|| format!("invalid config {}", path.display()))
}

fn need<'a>(v: &'a Option<PathBuf>, field: &str) -> anyhow::Result<&'a Path> {
    v.as_deref()
        .with_context(|| format!("config field `{field}` (or its flag) is required"))
}

impl CloudConfig {
    pub(crate) fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    /// TLS for the tunnel listener and the front.
    pub(crate) fn tls(
        &self,
    ) -> anyhow::Result<(Arc<rustls::ServerConfig>, Arc<rustls::ServerConfig>)> {
        self.limits
            .validate()
            .map_err(|e| anyhow::anyhow!("config field `limits`: {e}"))?;
        let tunnel = tether_pki::server_config_client_auth(
            tether_pki::load_certs(need(&self.tunnel_cert, "tunnel_cert")?)?,
            tether_pki::load_key(need(&self.tunnel_key, "tunnel_key")?)?,
            &tether_pki::load_certs(need(&self.edge_ca, "edge_ca")?)?,
            &[b"http/1.1"],
        )
        .context("tunnel TLS")?;
        let front = tether_pki::server_config_client_auth(
            tether_pki::load_certs(need(&self.front_cert, "front_cert")?)?,
            tether_pki::load_key(need(&self.front_key, "front_key")?)?,
            &tether_pki::load_certs(need(&self.front_client_ca, "front_client_ca")?)?,
            &[b"http/1.1"],
        )
        .context("front TLS")?;
        Ok((Arc::new(tunnel), Arc::new(front)))
    }
}

impl EdgeConfig {
    pub(crate) fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    pub(crate) fn node_name(&self) -> anyhow::Result<&str> {
        self.node_name
            .as_deref()
            .context("config field `node_name` (or --node-name) is required")
    }

    pub(crate) fn cloud_addr(&self) -> anyhow::Result<&str> {
        self.cloud_addr
            .as_deref()
            .context("config field `cloud_addr` (or --cloud-addr) is required")
    }

    pub(crate) fn cloud_server_name(&self) -> anyhow::Result<String> {
        if let Some(n) = &self.cloud_server_name {
            return Ok(n.clone());
        }
        let addr = self.cloud_addr()?;
        let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
        Ok(host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned())
    }

    /// TLS for the tunnel: pinned cloud CA and the node certificate.
    pub(crate) fn tunnel_tls(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        self.limits
            .validate()
            .map_err(|e| anyhow::anyhow!("config field `limits`: {e}"))?;
        let cfg = tether_pki::client_config(
            &tether_pki::load_certs(need(&self.ca, "ca")?)?,
            Some((
                tether_pki::load_certs(need(&self.cert, "cert")?)?,
                tether_pki::load_key(need(&self.key, "key")?)?,
            )),
            &[b"http/1.1"],
        )?;
        Ok(Arc::new(cfg))
    }

    /// TLS for an `https://` kubelet, if configured.
    pub(crate) fn kubelet_tls(&self) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
        if !self.kubelet_url.starts_with("https://") {
            return Ok(None);
        }
        let ca = tether_pki::load_certs(need(&self.kubelet_ca, "kubelet_ca")?)?;
        let client = match (&self.kubelet_cert, &self.kubelet_key) {
            (Some(c), Some(k)) => Some((tether_pki::load_certs(c)?, tether_pki::load_key(k)?)),
            (None, None) => None,
            _ => bail!("config fields `kubelet_cert` and `kubelet_key` go together"),
        };
        Ok(Some(Arc::new(tether_pki::client_config(
            &ca,
            client,
            &[b"http/1.1"],
        )?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_is_refused_with_its_name() {
        let err = serde_saphyr::from_str::<EdgeConfig>("node_name: a\nnode_nmae: b\n").unwrap_err();
        assert!(err.to_string().contains("node_nmae"), "{err}");
    }

    #[test]
    fn files_parse_with_defaults() {
        let c: CloudConfig =
            serde_saphyr::from_str("front_addr: 127.0.0.1:9443\nlimits:\n  max_streams: 64\n")
                .unwrap();
        assert_eq!(c.front_addr.port(), 9443);
        assert_eq!(c.limits.max_streams, 64);
        assert_eq!(c.tunnel_addr.port(), 10004);
        let e: EdgeConfig = serde_saphyr::from_str("cloud_addr: cloud.example:10004\n").unwrap();
        assert_eq!(e.cloud_server_name().unwrap(), "cloud.example");
        assert_eq!(e.kubelet_url, "http://127.0.0.1:10350");
    }
}
