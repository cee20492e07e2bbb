//! Configuration files of the roles (YAML, unknown fields refused) and their
//! conversion into the options the role crates run with. Command-line flags
//! and `TETHER_*` environment variables override file values.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
#[cfg(feature = "cloud")]
use tether_cloudstream::{Authorizer, FrontLimits};
use tether_tunnel::TunnelLimits;

/// `tether cloud` configuration.
#[cfg(feature = "cloud")]
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
    /// Bounds of connections that have not finished their handshake, per
    /// listener (front, tunnel, hub, bootstrap, peer): ADR 0013.
    pub(crate) preauth: tether_tunnel::PreAuthLimits,
    /// Drain deadline after SIGTERM, in seconds (default 10).
    pub(crate) drain_timeout_secs: u64,
    /// This replica's address as the control-plane hosts reach it; with
    /// `tunnel_port`, published at the admin `/tunnelport` for iptables-manager.
    pub(crate) advertise_address: Option<std::net::IpAddr>,
    /// This replica's tunnel port (10351, 10352, ... one per replica). In
    /// cluster mode it is claimed from `tunnel_port_range` when not given.
    pub(crate) tunnel_port: Option<u16>,
    /// State directory (CA, tokens, deny list). When set, the CA in it signs
    /// node certificates, the bootstrap server runs, and the tunnel's serving
    /// certificate is issued from it unless `tunnel_cert` is given. To use an
    /// existing CA, put its `ca.crt` and `ca.key` there before the first start.
    pub(crate) state_dir: Option<PathBuf>,
    /// Bootstrap HTTPS server (default `0.0.0.0:10002`); needs `state_dir`.
    pub(crate) bootstrap_addr: SocketAddr,
    /// Names and addresses edges use to reach this cloud; SANs of the
    /// certificates issued from the state CA (default: localhost, 127.0.0.1
    /// and `advertise_address`).
    pub(crate) server_names: Vec<String>,
    /// Lifetime of node certificates the bootstrap server issues, in hours
    /// (default 8760, one year).
    pub(crate) cert_lifetime_hours: f64,
    /// Kubelet-serving CA certificate: when set with `serving_ca_key`, the
    /// front presents a certificate issued for the node each connection was
    /// meant for.
    pub(crate) serving_ca_cert: Option<PathBuf>,
    /// Key of `serving_ca_cert`.
    pub(crate) serving_ca_key: Option<PathBuf>,
    /// `host:port` Prometheus reaches the front at, used in `/sd` targets
    /// (default: the front's address; for 0.0.0.0, `advertise_address` or 127.0.0.1).
    pub(crate) sd_front_address: Option<String>,
    /// Cluster mode (default false): patch connected nodes' kubelet port,
    /// claim `tunnel_port` in the `tunnelport` ConfigMap (unless given), and
    /// route pod-scoped requests by a pod watch cache. Needs `advertise_address`.
    pub(crate) cluster: bool,
    /// Kubeconfig for cluster mode (default: the in-cluster service account).
    pub(crate) kubeconfig: Option<PathBuf>,
    /// Namespace of the `tunnelport` ConfigMap (default `tether`).
    pub(crate) namespace: String,
    /// This replica's name in the cluster (default: the host name, which is
    /// the pod name in Kubernetes).
    pub(crate) replica_id: Option<String>,
    /// Ports a replica may claim in cluster mode, `MIN-MAX` (default
    /// `10350-10999`, iptables-manager's default too).
    pub(crate) tunnel_port_range: String,
    /// In cluster mode, patch each connecting node's kubelet port to the
    /// tunnel port (default true). Turn off in iptables-free (egress) mode,
    /// where the apiserver must keep dialling the real kubelet port.
    pub(crate) patch_kubelet_port: bool,
    /// The message hub's listener for edges (default `0.0.0.0:10000`).
    pub(crate) hub_addr: SocketAddr,
    /// Networks the front's CONNECT may dial directly when no node claims
    /// the address: the pod and service CIDRs, so the apiserver's `cluster`
    /// egress reaches webhooks and aggregated APIs (ADR 0012). Never list
    /// edge node addresses. Default: none.
    pub(crate) egress_passthrough: Vec<tether_cloudstream::egress::Cidr>,
    /// Cluster mode: the listener other replicas forward requests to
    /// (default `0.0.0.0:10001`; replicas only, never a NodePort).
    pub(crate) peer_addr: SocketAddr,
    /// File holding the bearer token of the hub API on the admin port; the
    /// API is off without it.
    pub(crate) hub_api_token_file: Option<PathBuf>,
    /// Message hub bounds and timers (per node).
    pub(crate) hub: HubConfig,
    /// Unmodified KubeEdge edges on the tunnel port (ADR 0017); off unless
    /// `kubeedge.ca_file` is set.
    pub(crate) kubeedge: KubeEdgeConfig,
}

#[cfg(feature = "cloud")]
/// The cloud's `kubeedge:` section: KubeEdge EdgeStream edges dial
/// `wss://<cloud>:<tunnel port>/v1/kubeedge/connect` with their own
/// certificates (docs/kubeedge-compat.md, ADR 0017).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct KubeEdgeConfig {
    /// The KubeEdge CA (PEM), cloudhub's `rootCA.crt`. Setting it enables
    /// KubeEdge edges; its certificates are trusted on the KubeEdge path
    /// only. Default: none (off).
    pub(crate) ca_file: Option<PathBuf>,
    /// Admit `CN=kubeedge.io` certificates (KubeEdge before v1.16) as the
    /// node their `SessionHostNameOverride` header names (default false).
    /// Any holder of any certificate of the KubeEdge CA may then claim any
    /// node: re-issue old edge certificates instead where you can.
    pub(crate) trust_legacy_certs: bool,
    /// Use the `SessionInternalIP` header as the node's address when its
    /// certificate has no IP SANs (KubeEdge certificates have none)
    /// (default false). An edge may then claim any address, and requests
    /// routed by that address (DNAT, Host) reach it.
    pub(crate) trust_internal_ip_header: bool,
    /// `host:port` the edge sends every request to (default
    /// `127.0.0.1:10350`, edged's read-only port).
    pub(crate) kubelet_addr: String,
    /// Seconds the kubelet may take to send its response head before the
    /// front answers 504 (default 60).
    pub(crate) response_header_timeout_secs: u64,
    /// Bytes queued for one stream whose client does not read before that
    /// stream is ended (default 4 MiB); within 64 KiB..=limits.session_budget/2.
    pub(crate) stream_buffer_bytes: usize,
    /// Seconds a write to the edge may take before the session is ended
    /// (default 10).
    pub(crate) write_timeout_secs: u64,
    /// Seconds without any frame from the edge before the session is
    /// declared dead (default 15; the edge pings every 5 s).
    pub(crate) idle_timeout_secs: u64,
}

#[cfg(feature = "cloud")]
impl Default for KubeEdgeConfig {
    fn default() -> Self {
        Self {
            ca_file: None,
            trust_legacy_certs: false,
            trust_internal_ip_header: false,
            kubelet_addr: "127.0.0.1:10350".into(),
            response_header_timeout_secs: 60,
            stream_buffer_bytes: 4 << 20,
            write_timeout_secs: 10,
            idle_timeout_secs: 15,
        }
    }
}

#[cfg(feature = "cloud")]
impl KubeEdgeConfig {
    /// Checks what needs no files, naming the field.
    pub(crate) fn check(&self, limits: &TunnelLimits) -> anyhow::Result<()> {
        let addr_ok = self
            .kubelet_addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| {
                !host.is_empty()
                    && port.parse::<u16>().is_ok_and(|p| p > 0)
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-[]:".contains(&b))
            });
        if !addr_ok {
            bail!(
                "config field `kubeedge.kubelet_addr` must be host:port (got {:?})",
                self.kubelet_addr
            );
        }
        for (v, field, lo, hi) in [
            (
                self.response_header_timeout_secs,
                "response_header_timeout_secs",
                1,
                3600,
            ),
            (self.write_timeout_secs, "write_timeout_secs", 1, 600),
            (self.idle_timeout_secs, "idle_timeout_secs", 6, 3600),
        ] {
            if !(lo..=hi).contains(&v) {
                bail!("config field `kubeedge.{field}` must be within {lo}..={hi} (got {v})");
            }
        }
        let max = (limits.session_budget / 2) as usize;
        if !(64 << 10..=max).contains(&self.stream_buffer_bytes) {
            bail!(
                "config field `kubeedge.stream_buffer_bytes` must be within 65536..={max} (limits.session_budget/2; got {})",
                self.stream_buffer_bytes
            );
        }
        if self.ca_file.is_none() && (self.trust_legacy_certs || self.trust_internal_ip_header) {
            bail!(
                "config fields `kubeedge.trust_*` need `kubeedge.ca_file` (KubeEdge edges are off without it)"
            );
        }
        Ok(())
    }

    /// The session options.
    pub(crate) fn options(
        &self,
        limits: &TunnelLimits,
    ) -> tether_tunnel::kubeedge::KubeEdgeOptions {
        let mut o = tether_tunnel::kubeedge::KubeEdgeOptions::new(limits);
        o.kubelet_addr = self.kubelet_addr.clone();
        o.response_header_timeout = Duration::from_secs(self.response_header_timeout_secs);
        o.stream_buffer = self.stream_buffer_bytes;
        o.write_timeout = Duration::from_secs(self.write_timeout_secs);
        o.idle_timeout = Duration::from_secs(self.idle_timeout_secs);
        o
    }
}

#[cfg(feature = "cloud")]
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
            preauth: tether_tunnel::PreAuthLimits::default(),
            drain_timeout_secs: 10,
            advertise_address: None,
            tunnel_port: None,
            state_dir: None,
            bootstrap_addr: ([0, 0, 0, 0], 10002).into(),
            server_names: Vec::new(),
            cert_lifetime_hours: 8760.0,
            serving_ca_cert: None,
            serving_ca_key: None,
            sd_front_address: None,
            cluster: false,
            kubeconfig: None,
            namespace: "tether".into(),
            replica_id: None,
            tunnel_port_range: "10350-10999".into(),
            patch_kubelet_port: true,
            hub_addr: ([0, 0, 0, 0], 10000).into(),
            peer_addr: ([0, 0, 0, 0], 10001).into(),
            egress_passthrough: Vec::new(),
            hub_api_token_file: None,
            hub: HubConfig::cloud(),
            kubeedge: KubeEdgeConfig::default(),
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
    /// Deadline to connect to the kubelet (and TLS), seconds (default 5).
    pub(crate) kubelet_connect_timeout_secs: u64,
    /// How long the kubelet may go without taking request body or sending
    /// its response head, seconds (default 60); then 504.
    pub(crate) kubelet_response_header_timeout_secs: u64,
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
    /// The cloud's bootstrap `host:port` (default: host of `cloud_addr`, port 10002).
    pub(crate) bootstrap_addr: Option<String>,
    /// Where enrolled credentials live (default `/var/lib/tether-edge`); used
    /// when `cert`/`key` are not given. The hub's queue is kept here too.
    pub(crate) state_dir: PathBuf,
    /// The cloud hub's own port, `host:port`, for a second connection as
    /// edges before 0.2 used (default: none; the hub rides inside the
    /// tunnel session, ADR 0022).
    pub(crate) hub_addr: Option<String>,
    /// Run the message hub (default true).
    pub(crate) hub_enabled: bool,
    /// The local hub API socket (default `<state_dir>/hub.sock`).
    pub(crate) hub_socket: Option<PathBuf>,
    /// Message hub bounds and timers.
    pub(crate) hub: HubConfig,
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
            kubelet_connect_timeout_secs: 5,
            kubelet_response_header_timeout_secs: 60,
            allow: Vec::new(),
            admin_addr: ([127, 0, 0, 1], 10006).into(),
            limits: TunnelLimits::default(),
            backoff_base_ms: 500,
            backoff_max_secs: 30,
            drain_timeout_secs: 10,
            bootstrap_addr: None,
            state_dir: PathBuf::from("/var/lib/tether-edge"),
            hub_addr: None,
            hub_enabled: true,
            hub_socket: None,
            hub: HubConfig::edge(),
        }
    }
}

/// Message hub bounds and timers (`hub:` in either role's config).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct HubConfig {
    /// Largest message, bytes (default 1 MiB).
    pub(crate) max_message_bytes: usize,
    /// Messages accepted and not yet acknowledged, per node on the cloud
    /// (default 1024) and upstream on the edge (default 10000).
    pub(crate) queue_capacity: usize,
    /// Publishes per second per node (cloud; 0 = unlimited; default 100).
    pub(crate) rate_qps: f64,
    /// Publish burst per node (cloud; default 200).
    pub(crate) rate_burst: f64,
    /// First ack timeout, seconds; doubles per attempt up to 8x (default 10).
    pub(crate) ack_timeout_secs: f64,
    /// Sends of one message before it is reported failed (default 10).
    pub(crate) max_attempts: u32,
    /// Keepalive period, seconds (default 10).
    pub(crate) keepalive_interval_secs: f64,
    /// Silence after which the peer is dead, seconds (default 30).
    pub(crate) keepalive_timeout_secs: f64,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self::cloud()
    }
}

impl HubConfig {
    fn cloud() -> Self {
        Self {
            max_message_bytes: 1 << 20,
            queue_capacity: 1024,
            rate_qps: 100.0,
            rate_burst: 200.0,
            ack_timeout_secs: 10.0,
            max_attempts: 10,
            keepalive_interval_secs: 10.0,
            keepalive_timeout_secs: 30.0,
        }
    }

    fn edge() -> Self {
        Self {
            queue_capacity: 10_000,
            rate_qps: 0.0,
            ..Self::cloud()
        }
    }

    /// The channel bounds, checked.
    pub(crate) fn channel(&self) -> anyhow::Result<tether_hub::ChannelConfig> {
        let secs = |v: f64, field: &str| {
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| {
                    format!("config field `hub.{field}` must be a positive number of seconds")
                })
        };
        let keepalive_interval = secs(self.keepalive_interval_secs, "keepalive_interval_secs")?;
        let keepalive_timeout = secs(self.keepalive_timeout_secs, "keepalive_timeout_secs")?;
        if keepalive_timeout <= keepalive_interval {
            bail!(
                "config field `hub.keepalive_timeout_secs` must exceed `hub.keepalive_interval_secs`"
            );
        }
        if self.queue_capacity == 0 || self.max_attempts == 0 || self.max_message_bytes < 1024 {
            bail!(
                "config fields `hub.queue_capacity` and `hub.max_attempts` must be positive and `hub.max_message_bytes` at least 1024"
            );
        }
        Ok(tether_hub::ChannelConfig {
            max_message: self.max_message_bytes,
            queue_capacity: self.queue_capacity,
            ack_timeout: secs(self.ack_timeout_secs, "ack_timeout_secs")?,
            max_attempts: self.max_attempts,
            keepalive_interval,
            keepalive_timeout,
            rate: (self.rate_qps > 0.0).then_some((self.rate_qps, self.rate_burst.max(1.0))),
            ..tether_hub::ChannelConfig::default()
        })
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
    serde_saphyr::from_str(&text).map_err(|e| {
        // One line: the parser's message without its source snippet, and the
        // field's dotted path, which the parser does not give.
        let at = e.location().map(|l| (l.line() as usize, l.column() as usize));
        let field = at.and_then(|(line, _)| crate::limits_check::yaml_path(&text, line));
        let msg = e.without_snippet().to_string().replace('\n', " ");
        match (field, at) {
            (Some(field), Some((line, col))) => anyhow::anyhow!(
                "invalid config {}: field `{field}` (line {line}, column {col}): {msg}; give it a value of the documented type",
                path.display()
            ),
            _ => anyhow::anyhow!("invalid config {}: {msg}", path.display()),
        }
    })
}

/// Names where a configuration came from, for errors.
pub(crate) fn source(path: Option<&Path>) -> String {
    match path {
        Some(p) => format!("config {}", p.display()),
        None => "configuration from flags and environment".to_owned(),
    }
}

#[cfg(feature = "cloud")]
/// Reads a certificate file named by config field `field`.
fn check_certs(p: &Option<PathBuf>, field: &str) -> anyhow::Result<()> {
    if let Some(p) = p {
        tether_pki::load_certs(p).with_context(|| format!("config field `{field}`"))?;
    }
    Ok(())
}

#[cfg(feature = "cloud")]
/// Reads a key file named by config field `field`.
fn check_key(p: &Option<PathBuf>, field: &str) -> anyhow::Result<()> {
    if let Some(p) = p {
        tether_pki::load_key(p).with_context(|| format!("config field `{field}`"))?;
    }
    Ok(())
}

fn need<'a>(v: &'a Option<PathBuf>, field: &str) -> anyhow::Result<&'a Path> {
    v.as_deref()
        .with_context(|| format!("config field `{field}` (or its flag) is required"))
}

#[cfg(feature = "cloud")]
/// Parses `MIN-MAX` port ranges.
pub(crate) fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or("want MIN-MAX, e.g. 10350-10999")?;
    let (a, b) = (
        a.trim().parse::<u16>().map_err(|e| e.to_string())?,
        b.trim().parse::<u16>().map_err(|e| e.to_string())?,
    );
    if a > b {
        return Err(format!("range {a}-{b} is empty"));
    }
    Ok((a, b))
}

#[cfg(feature = "cloud")]
impl CloudConfig {
    /// The tunnel-port range, checked.
    pub(crate) fn port_range(&self) -> anyhow::Result<std::ops::RangeInclusive<u16>> {
        let (a, b) = parse_port_range(&self.tunnel_port_range)
            .map_err(|e| anyhow::anyhow!("config field `tunnel_port_range`: {e}"))?;
        Ok(a..=b)
    }

    /// This replica's identity: `replica_id`, else the host name.
    pub(crate) fn replica_id(&self) -> anyhow::Result<String> {
        if let Some(id) = &self.replica_id {
            anyhow::ensure!(!id.trim().is_empty(), "config field `replica_id` is empty");
            return Ok(id.trim().to_owned());
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .context("cannot read the host name; set config field `replica_id` (--replica-id)")
    }

    pub(crate) fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    /// Checks what needs no files: limits, lifetimes and fields that go in pairs.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        crate::limits_check::tunnel(&self.limits)?;
        crate::limits_check::front(&self.front_limits)?;
        crate::limits_check::drain(self.drain_timeout_secs)?;
        crate::limits_check::hub(&self.hub)?;
        self.preauth
            .validate()
            .map_err(|e| anyhow::anyhow!("config field `preauth.{e}`"))?;
        self.cert_lifetime()?;
        self.kubeedge.check(&self.limits)?;
        for (cert, key, p) in [
            (&self.tunnel_cert, &self.tunnel_key, "tunnel"),
            (&self.front_cert, &self.front_key, "front"),
            (&self.serving_ca_cert, &self.serving_ca_key, "serving_ca"),
        ] {
            if cert.is_some() != key.is_some() {
                bail!("config fields `{p}_cert` and `{p}_key` go together");
            }
        }
        self.check_cluster()
    }

    /// The standalone/cluster-mode rules for the replica's address and port.
    pub(crate) fn check_cluster(&self) -> anyhow::Result<()> {
        if self.cluster {
            self.port_range()?;
            self.replica_id()?;
            if self.advertise_address.is_none() {
                bail!(
                    "cluster mode needs config field `advertise_address` (--advertise-address): \
                     this replica's address in the tunnel-port record"
                );
            }
        } else if self.tunnel_port.is_some() != self.advertise_address.is_some() {
            bail!("config fields `advertise_address` and `tunnel_port` go together");
        }
        Ok(())
    }

    pub(crate) fn cert_lifetime(&self) -> anyhow::Result<Duration> {
        // Not past the state CA's own ten years.
        Duration::try_from_secs_f64(self.cert_lifetime_hours * 3600.0)
            .ok()
            .filter(|d| *d >= Duration::from_secs(60) && *d <= Duration::from_secs(87_600 * 3600))
            .with_context(|| {
                format!(
                    "config field `cert_lifetime_hours` must be within 0.017..=87600 hours (got {})",
                    self.cert_lifetime_hours
                )
            })
    }

    /// Reads every file the configuration names, writing nothing, so a bad
    /// one is refused before the state directory is touched.
    pub(crate) fn check_files(&self) -> anyhow::Result<()> {
        check_certs(&self.tunnel_cert, "tunnel_cert")?;
        check_key(&self.tunnel_key, "tunnel_key")?;
        check_certs(&self.edge_ca, "edge_ca")?;
        check_certs(&self.kubeedge.ca_file, "kubeedge.ca_file")?;
        check_certs(
            &Some(need(&self.front_cert, "front_cert")?.to_owned()),
            "front_cert",
        )?;
        check_key(
            &Some(need(&self.front_key, "front_key")?.to_owned()),
            "front_key",
        )?;
        check_certs(
            &Some(need(&self.front_client_ca, "front_client_ca")?.to_owned()),
            "front_client_ca",
        )?;
        if self.state_dir.is_none() {
            need(&self.edge_ca, "edge_ca").context("or `state_dir`")?;
            need(&self.tunnel_cert, "tunnel_cert").context("or `state_dir`")?;
        }
        check_certs(&self.serving_ca_cert, "serving_ca_cert")?;
        check_key(&self.serving_ca_key, "serving_ca_key")?;
        if let Some(path) = &self.hub_api_token_file {
            let token = std::fs::read_to_string(path).with_context(|| {
                format!("config field `hub_api_token_file` ({})", path.display())
            })?;
            if token.trim().len() < 16 {
                bail!(
                    "config field `hub_api_token_file`: the token in {} is shorter than 16 characters; write a longer random one",
                    path.display()
                );
            }
        }
        Ok(())
    }

    /// SANs for certificates issued from the state CA.
    pub(crate) fn sans(&self) -> Vec<String> {
        let mut names = if self.server_names.is_empty() {
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
        } else {
            self.server_names.clone()
        };
        if let Some(ip) = self.advertise_address {
            names.push(ip.to_string());
        }
        names.sort();
        names.dedup();
        names
    }

    /// Files whose change triggers a TLS reload.
    pub(crate) fn watched_files(&self) -> Vec<PathBuf> {
        [
            &self.tunnel_cert,
            &self.tunnel_key,
            &self.edge_ca,
            &self.front_cert,
            &self.front_key,
            &self.front_client_ca,
            &self.kubeedge.ca_file,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }

    /// The KubeEdge CA certificates, when KubeEdge edges are on.
    pub(crate) fn kubeedge_cas(
        &self,
    ) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
        match &self.kubeedge.ca_file {
            Some(path) => tether_pki::load_certs(path).context("config field `kubeedge.ca_file`"),
            None => Ok(Vec::new()),
        }
    }

    /// Who may connect on the KubeEdge path, or `None` when it is off.
    /// Tether's edge CA is named so each CA is trusted on its own path only.
    pub(crate) fn kubeedge_trust(
        &self,
        state_ca: Option<&tether_pki::Ca>,
    ) -> anyhow::Result<Option<tether_tunnel::kubeedge::TrustConfig>> {
        if self.kubeedge.ca_file.is_none() {
            return Ok(None);
        }
        let tether_cas = match (state_ca, &self.edge_ca) {
            (_, Some(path)) => tether_pki::load_certs(path)?,
            (Some(ca), None) => vec![ca.cert_der().clone()],
            (None, None) => Vec::new(),
        };
        Ok(Some(tether_tunnel::kubeedge::TrustConfig {
            kubeedge_cas: self.kubeedge_cas()?,
            tether_cas,
            trust_legacy_certs: self.kubeedge.trust_legacy_certs,
            trust_internal_ip_header: self.kubeedge.trust_internal_ip_header,
        }))
    }

    /// TLS for the tunnel listener and the front; `state_ca` (from the state
    /// directory) stands in for `edge_ca` and issues the tunnel certificate
    /// when no files are given.
    pub(crate) fn tls(
        &self,
        state_ca: Option<&tether_pki::Ca>,
    ) -> anyhow::Result<(Arc<rustls::ServerConfig>, Arc<rustls::ServerConfig>)> {
        self.limits
            .validate()
            .map_err(|e| anyhow::anyhow!("config field `limits`: {e}"))?;
        let edge_cas = match (state_ca, &self.edge_ca) {
            (_, Some(path)) => tether_pki::load_certs(path)?,
            (Some(ca), None) => vec![ca.cert_der().clone()],
            (None, None) => bail!("config field `edge_ca` (or `state_dir`) is required"),
        };
        let (chain, key) = match (&self.tunnel_cert, state_ca) {
            (Some(cert), _) => (
                tether_pki::load_certs(cert)?,
                tether_pki::load_key(need(&self.tunnel_key, "tunnel_key")?)?,
            ),
            (None, Some(ca)) => {
                let sans = self.sans();
                let refs: Vec<&str> = sans.iter().map(String::as_str).collect();
                let leaf = ca.issue_server("tether-cloud", &refs)?;
                (leaf.cert_chain()?, leaf.key_pem.to_der()?)
            }
            (None, None) => bail!("config field `tunnel_cert` (or `state_dir`) is required"),
        };
        // KubeEdge edges send a client certificate only when its issuer is
        // among the CA names the server offers: both roots go in the hints.
        let mut roots = edge_cas;
        roots.extend(self.kubeedge_cas()?);
        let tunnel = tether_pki::server_config_client_auth(chain, key, &roots, &[b"http/1.1"])
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
    /// Checks what needs no files: limits, timers and fields that go in pairs.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        crate::limits_check::tunnel(&self.limits)?;
        crate::limits_check::drain(self.drain_timeout_secs)?;
        crate::limits_check::hub(&self.hub)?;
        self.kubelet_timeouts()?;
        if !(1..=60_000).contains(&self.backoff_base_ms) {
            bail!(
                "config field `backoff_base_ms` must be within 1..=60000 (got {})",
                self.backoff_base_ms
            );
        }
        if !(1..=3600).contains(&self.backoff_max_secs)
            || self.backoff_max_secs * 1000 < self.backoff_base_ms
        {
            bail!(
                "config field `backoff_max_secs` must be within 1..=3600 and not below `backoff_base_ms` (got {})",
                self.backoff_max_secs
            );
        }
        for (a, b, p) in [
            (&self.cert, &self.key, "cert` and `key"),
            (
                &self.kubelet_cert,
                &self.kubelet_key,
                "kubelet_cert` and `kubelet_key",
            ),
        ] {
            if a.is_some() != b.is_some() {
                bail!("config fields `{p}` go together");
            }
        }
        Ok(())
    }

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

    /// The bootstrap server's `host:port`.
    pub(crate) fn bootstrap_addr(&self) -> anyhow::Result<String> {
        if let Some(a) = &self.bootstrap_addr {
            return Ok(a.clone());
        }
        let addr = self.cloud_addr()?;
        let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
        Ok(format!("{host}:10002"))
    }

    /// True when credentials come from files rather than enrolment.
    pub(crate) fn file_credentials(&self) -> bool {
        self.cert.is_some() || self.key.is_some()
    }

    /// TLS for the tunnel: pinned cloud CA and the node certificate.
    pub(crate) fn tunnel_tls(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        self.limits
            .validate()
            .map_err(|e| anyhow::anyhow!("config field `limits`: {e}"))?;
        let cfg = tether_pki::client_config(
            &tether_pki::load_certs(need(&self.ca, "ca")?).context("config field `ca`")?,
            Some((
                tether_pki::load_certs(need(&self.cert, "cert")?).context("config field `cert`")?,
                tether_pki::load_key(need(&self.key, "key")?).context("config field `key`")?,
            )),
            &[b"http/1.1"],
        )?;
        Ok(Arc::new(cfg))
    }

    /// Deadlines towards the kubelet, checked.
    pub(crate) fn kubelet_timeouts(&self) -> anyhow::Result<tether_edgestream::KubeletTimeouts> {
        let secs = |v: u64, field: &str| {
            anyhow::ensure!(
                (1..=3600).contains(&v),
                "config field `{field}` must be within 1..=3600 seconds (got {v})"
            );
            Ok(Duration::from_secs(v))
        };
        Ok(tether_edgestream::KubeletTimeouts {
            connect: secs(
                self.kubelet_connect_timeout_secs,
                "kubelet_connect_timeout_secs",
            )?,
            response_headers: secs(
                self.kubelet_response_header_timeout_secs,
                "kubelet_response_header_timeout_secs",
            )?,
        })
    }

    /// TLS for an `https://` kubelet, if configured.
    pub(crate) fn kubelet_tls(&self) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
        if !self.kubelet_url.starts_with("https://") {
            return Ok(None);
        }
        let ca = tether_pki::load_certs(need(&self.kubelet_ca, "kubelet_ca")?)?;
        let client = match (&self.kubelet_cert, &self.kubelet_key) {
            (Some(c), Some(k)) => Some((
                tether_pki::load_certs(c).context("config field `kubelet_cert`")?,
                tether_pki::load_key(k).context("config field `kubelet_key`")?,
            )),
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

    #[cfg(feature = "cloud")]
    #[test]
    fn files_parse_with_defaults() {
        let c: CloudConfig =
            serde_saphyr::from_str("front_addr: 127.0.0.1:9443\nlimits:\n  max_streams: 64\n")
                .unwrap();
        assert_eq!(c.front_addr.port(), 9443);
        assert_eq!(c.limits.max_streams, 64);
        assert_eq!(c.tunnel_addr.port(), 10004);
        assert!(!c.cluster);
        assert_eq!(c.namespace, "tether");
        assert_eq!(c.port_range().unwrap(), 10350..=10999);
        let e: EdgeConfig = serde_saphyr::from_str("cloud_addr: cloud.example:10004\n").unwrap();
        assert_eq!(e.cloud_server_name().unwrap(), "cloud.example");
        assert_eq!(e.kubelet_url, "http://127.0.0.1:10350");
    }

    #[cfg(feature = "cloud")]
    #[test]
    fn cluster_fields_parse_and_are_checked() {
        let c: CloudConfig = serde_saphyr::from_str(
            "cluster: true\nnamespace: kubeedge\nreplica_id: cloud-0\ntunnel_port_range: 10351-10360\n",
        )
        .unwrap();
        assert!(c.cluster);
        assert_eq!(c.namespace, "kubeedge");
        assert_eq!(c.replica_id().unwrap(), "cloud-0");
        assert_eq!(c.port_range().unwrap(), 10351..=10360);
        let bad: CloudConfig = serde_saphyr::from_str("tunnel_port_range: 10360-10351\n").unwrap();
        let err = bad.port_range().unwrap_err().to_string();
        assert!(err.contains("tunnel_port_range"), "{err}");
        // Cluster mode claims the port for the replica's address, so it
        // needs the address but not the port; standalone needs both or none.
        let err = c.check_cluster().unwrap_err().to_string();
        assert!(err.contains("advertise_address"), "{err}");
        let c: CloudConfig =
            serde_saphyr::from_str("cluster: true\nadvertise_address: 10.0.0.5\nreplica_id: r\n")
                .unwrap();
        c.check_cluster().unwrap();
        let c: CloudConfig = serde_saphyr::from_str("tunnel_port: 10351\n").unwrap();
        let err = c.check_cluster().unwrap_err().to_string();
        assert!(err.contains("go together"), "{err}");
    }
}
