//! `tether cloud`: flags and config, then the cloud hub, the tunnel listener
//! and the kubelet-API front, plus the admin endpoint and TLS reload.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use tether_cloudhub::{BootstrapServer, CloudState};
use tether_cloudstream::{CloudMetrics, CloudOptions};
use tether_cluster::{
    ClaimSpec, Cluster, KubeletPortPatcher, PodCache, PodCacheOptions, RetryPolicy, TunnelPortClaim,
};
use tether_tunnel::{ServerTls, SessionRegistry, Shutdown, TunnelEvent};

use crate::config::{self, CloudConfig};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// YAML config file; flags and environment override its fields.
    #[arg(long, env = "TETHER_CONFIG")]
    config: Option<PathBuf>,
    /// Load and check the configuration (with flags and environment): every
    /// field's type and range. Prints OK and exits; nothing is read from disk
    /// besides the file, nothing listens. A start also reads every file the
    /// configuration names and the state directory before writing anything.
    #[arg(long)]
    check_config: bool,
    /// State directory: CA, tokens, deny list; enables the bootstrap server.
    #[arg(long, env = "TETHER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Bootstrap listen address [default 0.0.0.0:10002].
    #[arg(long, env = "TETHER_BOOTSTRAP_ADDR")]
    bootstrap_addr: Option<SocketAddr>,
    /// Name or address edges use to reach this cloud (repeatable).
    #[arg(
        long = "server-name",
        env = "TETHER_SERVER_NAMES",
        value_delimiter = ','
    )]
    server_names: Vec<String>,
    /// Tunnel listen address [default 0.0.0.0:10004].
    #[arg(long, env = "TETHER_TUNNEL_ADDR")]
    tunnel_addr: Option<SocketAddr>,
    /// Kubelet-API front listen address [default 0.0.0.0:10003].
    #[arg(long, env = "TETHER_FRONT_ADDR")]
    front_addr: Option<SocketAddr>,
    /// Admin (metrics, probes) listen address [default 127.0.0.1:10005].
    #[arg(long, env = "TETHER_ADMIN_ADDR")]
    admin_addr: Option<SocketAddr>,
    /// Tunnel serving certificate (PEM) [default: issued from the state CA].
    #[arg(long, env = "TETHER_TUNNEL_CERT")]
    tunnel_cert: Option<PathBuf>,
    /// Tunnel serving key (PEM).
    #[arg(long, env = "TETHER_TUNNEL_KEY")]
    tunnel_key: Option<PathBuf>,
    /// CA that signs edge node certificates (PEM) [default: the state CA].
    #[arg(long, env = "TETHER_EDGE_CA")]
    edge_ca: Option<PathBuf>,
    /// Front serving certificate (PEM).
    #[arg(long, env = "TETHER_FRONT_CERT")]
    front_cert: Option<PathBuf>,
    /// Front serving key (PEM).
    #[arg(long, env = "TETHER_FRONT_KEY")]
    front_key: Option<PathBuf>,
    /// CA of the apiserver's kubelet client certificate (PEM).
    #[arg(long, env = "TETHER_FRONT_CLIENT_CA")]
    front_client_ca: Option<PathBuf>,
    /// Kubelet-serving CA certificate, for per-node front certificates.
    #[arg(long, env = "TETHER_SERVING_CA_CERT")]
    serving_ca_cert: Option<PathBuf>,
    /// Key of --serving-ca-cert.
    #[arg(long, env = "TETHER_SERVING_CA_KEY")]
    serving_ca_key: Option<PathBuf>,
    /// This replica's address as control-plane hosts reach it (for
    /// /tunnelport, and its key in the `tunnelport` ConfigMap in cluster mode).
    #[arg(long, env = "TETHER_ADVERTISE_ADDRESS")]
    advertise_address: Option<IpAddr>,
    /// This replica's tunnel port, e.g. 10351 (for /tunnelport). In cluster
    /// mode it is claimed from the range when not given.
    #[arg(long, env = "TETHER_TUNNEL_PORT")]
    tunnel_port: Option<u16>,
    /// Lifetime of issued node certificates, in hours [default 8760].
    #[arg(long, env = "TETHER_CERT_LIFETIME_HOURS")]
    cert_lifetime_hours: Option<f64>,
    /// host:port Prometheus reaches the front at, for /sd [default: the front address].
    #[arg(long, env = "TETHER_SD_FRONT_ADDRESS")]
    sd_front_address: Option<String>,
    /// Cluster mode: patch connected nodes' kubelet port to this replica's
    /// tunnel port, claim that port in the `tunnelport` ConfigMap (unless
    /// --tunnel-port is given), route pod requests by a pod watch cache.
    /// Needs --advertise-address.
    #[arg(long, env = "TETHER_CLUSTER", value_parser = clap::builder::BoolishValueParser::new())]
    cluster: bool,
    /// Kubeconfig for cluster mode [default: the in-cluster service account].
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the `tunnelport` ConfigMap [default tether].
    #[arg(long, env = "TETHER_NAMESPACE")]
    namespace: Option<String>,
    /// This replica's name in the cluster [default: the host name].
    #[arg(long, env = "TETHER_REPLICA_ID")]
    replica_id: Option<String>,
    /// Tunnel ports a replica may claim in cluster mode, MIN-MAX [default 10350-10999].
    #[arg(long, env = "TETHER_TUNNEL_PORT_RANGE")]
    tunnel_port_range: Option<String>,
    /// In cluster mode, patch connecting nodes' kubelet port (true/false)
    /// [default true]; false in iptables-free (egress) mode.
    #[arg(long, env = "TETHER_PATCH_KUBELET_PORT", value_parser = clap::builder::BoolishValueParser::new())]
    patch_kubelet_port: Option<bool>,
    /// Message hub listen address [default 0.0.0.0:10000].
    #[arg(long, env = "TETHER_HUB_ADDR")]
    hub_addr: Option<SocketAddr>,
    /// Cluster mode: listener for requests other replicas forward [default 0.0.0.0:10001].
    #[arg(long, env = "TETHER_PEER_ADDR")]
    peer_addr: Option<SocketAddr>,
    /// File with the bearer token of the hub API (admin port, /hub/v1/); off without it.
    #[arg(long, env = "TETHER_HUB_API_TOKEN_FILE")]
    hub_api_token_file: Option<PathBuf>,
}

fn apply(a: Args, cfg: &mut CloudConfig) {
    macro_rules! set { ($($f:ident),*) => { $( if let Some(v) = a.$f { cfg.$f = v; } )* } }
    macro_rules! set_opt { ($($f:ident),*) => { $( if a.$f.is_some() { cfg.$f = a.$f; } )* } }
    set!(
        bootstrap_addr,
        tunnel_addr,
        front_addr,
        admin_addr,
        cert_lifetime_hours,
        namespace,
        tunnel_port_range,
        patch_kubelet_port,
        hub_addr,
        peer_addr
    );
    set_opt!(
        state_dir,
        tunnel_cert,
        tunnel_key,
        edge_ca,
        front_cert,
        front_key,
        front_client_ca,
        serving_ca_cert,
        serving_ca_key,
        advertise_address,
        tunnel_port,
        sd_front_address,
        kubeconfig,
        replica_id,
        hub_api_token_file
    );
    // A flag can only turn cluster mode on; the file may have done so too.
    cfg.cluster |= a.cluster;
    if !a.server_names.is_empty() {
        cfg.server_names = a.server_names;
    }
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let mut cfg: CloudConfig = config::load(a.config.as_deref())?;
    let check_only = a.check_config;
    let source = config::source(a.config.as_deref());
    apply(a, &mut cfg);
    cfg.check().context(source.clone())?;
    if check_only {
        println!("OK");
        return Ok(());
    }
    // Every named file is read before the state directory is touched: a
    // configuration that cannot start writes nothing (no CA either).
    cfg.check_files().context(source)?;
    let state = match &cfg.state_dir {
        Some(dir) => Some(Arc::new(CloudState::open(dir).with_context(|| {
            format!("config field `state_dir` ({})", dir.display())
        })?)),
        None => None,
    };
    let (tunnel_cfg, front_cfg) = cfg.tls(state.as_ref().map(|s| s.ca()))?;
    let serving_ca = match (&cfg.serving_ca_cert, &cfg.serving_ca_key) {
        (Some(c), Some(k)) => Some(Arc::new(
            tether_pki::Ca::from_pem(&std::fs::read_to_string(c)?, &std::fs::read_to_string(k)?)
                .context("config fields `serving_ca_cert`/`serving_ca_key`")?,
        )),
        (None, None) => None,
        _ => anyhow::bail!("config fields `serving_ca_cert` and `serving_ca_key` go together"),
    };
    let (tunnel_tls, front_tls) = (ServerTls::new(tunnel_cfg), ServerTls::new(front_cfg));
    let kubeedge = match cfg.kubeedge_trust(state.as_ref().map(|s| s.ca()))? {
        Some(trust) => Some(tether_tunnel::KubeEdgeAccept {
            trust: tether_tunnel::kubeedge::KubeEdgeTrust::new(trust)
                .context("config field `kubeedge.ca_file`")?,
            options: Arc::new(cfg.kubeedge.options(&cfg.limits)),
        }),
        None => None,
    };
    let tunnel_listener = crate::bind(cfg.tunnel_addr, "the edge tunnel").await?;
    let front_listener = crate::bind(cfg.front_addr, "the kubelet-API front").await?;
    let admin_listener = crate::bind(cfg.admin_addr, "the admin endpoint").await?;
    let admin_addr = admin_listener.local_addr()?;
    // Claim after binding: a replica that cannot start writes nothing.
    let cluster = match cfg.cluster {
        true => Some(ClusterMode::start(&cfg).await?),
        false => None,
    };
    if let Some(c) = &cluster {
        cfg.tunnel_port = Some(c.claim.port());
    }
    let tunnelport = match (cfg.advertise_address, cfg.tunnel_port) {
        (Some(ip), Some(port)) => Some(
            serde_json::to_vec(&tether_iptables_manager::TunnelPortRecord::single(ip, port))?
                .into(),
        ),
        _ => None,
    };
    let mut registry = Registry::default();
    tether_metrics_adapter::register_build_info(&mut registry, "cloud");
    tether_metrics_adapter::register_process(&mut registry);
    tether_metrics_adapter::spawn_heap_trimmer();
    let metrics = CloudMetrics::register(&mut registry);
    let sessions = SessionRegistry::new();
    let front_local = front_listener.local_addr()?;
    let sd_front = match (&cfg.sd_front_address, front_local.ip().is_unspecified()) {
        (Some(a), _) => a.clone(),
        (None, false) => front_local.to_string(),
        (None, true) => {
            let ip = cfg
                .advertise_address
                .unwrap_or(IpAddr::from([127, 0, 0, 1]));
            SocketAddr::new(ip, front_local.port()).to_string()
        }
    };
    // Set once the ownership records run (cluster mode): then every
    // replica's /sd lists the nodes the others hold too.
    let sd_others: Arc<std::sync::OnceLock<Arc<dyn tether_cloudstream::peer::Ownership>>> =
        Arc::default();
    let sd = {
        let sessions = sessions.clone();
        let others = sd_others.clone();
        Arc::new(move || {
            hyper::body::Bytes::from(
                tether_cloudstream::sd::targets(&sessions, others.get().map(|o| &**o), &sd_front)
                    .to_string(),
            )
        }) as Arc<dyn Fn() -> hyper::body::Bytes + Send + Sync>
    };
    let debug_sessions = {
        let sessions = sessions.clone();
        Arc::new(move || {
            let now = SystemTime::now();
            let mut list: Vec<serde_json::Value> = sessions
                .all()
                .iter()
                .map(|s| {
                    let i = s.info();
                    serde_json::json!({
                        "node": i.node,
                        "kind": i.kind.label(),
                        "session": i.id,
                        "peer": i.peer.to_string(),
                        "ips": i.ips,
                        "age_seconds": now.duration_since(i.connected_at).map(|d| d.as_secs()).unwrap_or(0),
                        "open_streams": s.open_streams(),
                        "rtt_ms": s.last_rtt().map(|d| d.as_secs_f64() * 1000.0),
                        "certificate_serial": i.identity.serial,
                        "certificate_not_after": i.identity.not_after,
                        "endpoints": i.endpoints,
                    })
                })
                .collect();
            list.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
            hyper::body::Bytes::from(serde_json::Value::Array(list).to_string())
        }) as tether_metrics_adapter::Json
    };
    let nodes_doc = {
        let sessions = sessions.clone();
        let others = sd_others.clone();
        let replica = match cfg.cluster {
            true => Some(cfg.replica_id()?),
            false => None,
        };
        Arc::new(move || {
            hyper::body::Bytes::from(
                tether_cloudstream::nodes::document(
                    &sessions,
                    others.get().map(|o| &**o),
                    replica.as_deref(),
                )
                .to_string(),
            )
        }) as tether_metrics_adapter::Json
    };
    let drain = cfg.drain();
    let (trigger, shutdown) = Shutdown::new(drain);
    let hub_store = match &cfg.state_dir {
        Some(dir) => tether_hub::Store::open(&dir.join("hub.redb"))
            .context("the message hub's store in `state_dir`")?,
        None => {
            warn!("no state_dir: hub messages accepted for nodes do not survive a restart");
            tether_hub::Store::in_memory()
        }
    };
    hub_store.health().register(&mut registry, "cloud");
    let store_health = hub_store.health();
    let hub_cfg = tether_cloudhub::hub::CloudHubConfig {
        channel: cfg.hub.channel()?,
        ..Default::default()
    };
    let hub = tether_cloudhub::hub::CloudHub::new(
        hub_cfg,
        hub_store,
        tether_hub::HubMetrics::register(&mut registry, "cloud"),
    )?;
    let relay_metrics = tether_cloudhub::replicas::RelayMetrics::register(&mut registry);
    let hub_tcp = crate::bind(cfg.hub_addr, "the message hub").await?;
    let hub_addr = hub_tcp.local_addr()?;
    let mut hub_listener = hub.listener(
        hub_tcp,
        tunnel_tls.clone(),
        cfg.limits.clone(),
        shutdown.clone(),
    );
    if let Some(state) = &state {
        let deny = state.deny.clone();
        tokio::spawn(tether_cloudstream::terminate_revoked(
            deny.clone(),
            hub.sessions(),
            shutdown.clone(),
        ));
        hub_listener = hub_listener.admit(move |id| {
            if deny.denies(id) {
                Err(format!("certificate serial {} is revoked", id.serial))
            } else {
                Ok(())
            }
        });
    }
    let preauth_metrics = tether_tunnel::PreAuthMetrics::default();
    preauth_metrics.register(&mut registry);
    let preauth = tether_tunnel::PreAuthGate::new(cfg.preauth.clone(), preauth_metrics);
    let hub_listener = hub_listener.preauth(preauth.clone(), "hub");
    let (hub_listener, hub_shutdown) = (Some(hub_listener), shutdown.clone());
    let hub_api = match &cfg.hub_api_token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path).with_context(|| {
                format!("config field `hub_api_token_file` ({})", path.display())
            })?;
            let token = token.trim();
            if token.len() < 16 {
                anyhow::bail!(
                    "the hub API token in {} is shorter than 16 characters",
                    path.display()
                );
            }
            Some(tether_cloudhub::api::cloud_handler(
                hub.clone(),
                token.into(),
                cfg.hub.max_message_bytes,
            ))
        }
        None => None,
    };
    tokio::spawn(tether_metrics_adapter::serve(
        admin_listener,
        tether_metrics_adapter::Admin {
            registry: Arc::new(Mutex::new(registry)),
            // Not ready while the hub's store cannot write (disk full, I/O
            // errors): it recovers by itself within a second of space.
            ready: Arc::new(move || store_health.is_healthy()),
            tunnelport,
            sd: Some(sd),
            sessions: Some(debug_sessions),
            hub_api,
            documents: vec![("/nodes", nodes_doc)],
            preauth: preauth.clone(),
        },
        shutdown.clone(),
    ));
    let mut bootstrap_addr = None;
    if let Some(state) = &state {
        let listener = crate::bind(cfg.bootstrap_addr, "the bootstrap server").await?;
        bootstrap_addr = Some(listener.local_addr()?);
        let sans = cfg.sans();
        let refs: Vec<&str> = sans.iter().map(String::as_str).collect();
        let leaf = state.ca().issue_server("tether-bootstrap", &refs)?;
        let tls = tether_pki::server_config_optional_client_auth(
            leaf.cert_chain()?,
            leaf.key_pem.to_der()?,
            std::slice::from_ref(state.ca().cert_der()),
        )?;
        let server = BootstrapServer::new(state.clone(), Arc::new(tls), cfg.cert_lifetime()?)
            .preauth(preauth.clone());
        tokio::spawn(server.run(listener, shutdown.clone()));
        tokio::spawn(
            state
                .deny
                .clone()
                .watch_file(Duration::from_secs(1), shutdown.clone()),
        );
    }
    tokio::spawn(reload_tls(
        cfg_reloader(&cfg, state.clone()),
        tunnel_tls.clone(),
        front_tls.clone(),
        kubeedge.as_ref().map(|k| k.trust.clone()),
        shutdown.clone(),
    ));
    let (pod_locator, session_hook) = match &cluster {
        Some(c) => c.hooks(cfg.patch_kubelet_port, shutdown.clone()),
        None => (None, None),
    };
    let (peers, ownership) = match (&cluster, &state) {
        (Some(c), Some(state)) => {
            let (mut p, o) = c.peers(&cfg, state.ca(), shutdown.clone()).await?;
            let _ = sd_others.set(o.clone());
            // Hub messages reach nodes held by other replicas (ADR 0021).
            hub.link_replicas(
                tether_cloudhub::replicas::ReplicaLinks {
                    replica: p.replica.clone(),
                    directory: tether_cloudstream::peer::hub_directory(o.clone()),
                    client_tls: p.client_tls.clone(),
                    server_name: tether_cloudhub::replicas::ServerName::try_from(
                        tether_cloudstream::peer::PEER_SERVER_NAME,
                    )?,
                    metrics: relay_metrics,
                },
                shutdown.clone(),
            );
            p.hub = Some(tether_cloudhub::replicas::peer_handler(
                hub.clone(),
                cfg.hub.max_message_bytes,
            ));
            (Some(p), Some(o))
        }
        (Some(_), None) => {
            warn!(
                "cluster mode without state_dir: replicas cannot forward to each other (they need the shared CA)"
            );
            (None, None)
        }
        _ => (None, None),
    };
    let opts = CloudOptions {
        tunnel_listener,
        tunnel_tls,
        front_listener,
        front_tls,
        serving_ca,
        deny: state.as_ref().map(|s| s.deny.clone()),
        authz: cfg.authz,
        limits: cfg.limits,
        front_limits: cfg.front_limits,
        preauth,
        registry: sessions,
        metrics,
        pod_locator,
        session_hook,
        peers,
        egress_passthrough: cfg.egress_passthrough.clone(),
        kubeedge,
        hub: Some(hub.clone()),
    };
    info!(
        tunnel = %opts.tunnel_listener.local_addr()?,
        front = %opts.front_listener.local_addr()?,
        bootstrap = %bootstrap_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        admin = %admin_addr,
        hub = %hub_addr,
        "cloud started"
    );
    let run = tokio::spawn(tether_cloudstream::run(opts, shutdown));
    if let Some(hub_listener) = hub_listener {
        tokio::spawn(hub_listener.run(hub_shutdown));
    }
    crate::stop_signal().await;
    info!(?drain, "shutting down");
    trigger.trigger();
    run.await?;
    // The hub store is pod-local: hand what waits here to the other
    // replicas before leaving (ADR 0021).
    if let Some(h) = hub.hand_over(HAND_OVER_TIMEOUT).await {
        match h.left {
            0 => info!(handed = h.handed, "hub queues handed to other replicas"),
            left => warn!(
                handed = h.handed,
                left, "hub messages left in this replica's store"
            ),
        }
    }
    if let Some(o) = ownership {
        // Lease cleanup (node records, this replica's Lease) before the port.
        if !o.wait_stopped(Duration::from_secs(6)).await {
            warn!("ownership records were not cleaned up in time; they expire on their own");
        }
    }
    if let Some(c) = cluster {
        c.release().await;
    }
    info!("cloud stopped");
    Ok(())
}

/// How long shutdown spends handing hub queues to other replicas.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long shutdown waits for the tunnel-port release before leaving the
/// entry behind (the same IP reclaims it on restart).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// What cluster mode holds while the cloud runs.
struct ClusterMode {
    cluster: Cluster,
    claim: TunnelPortClaim,
}

impl ClusterMode {
    /// Connects and claims this replica's tunnel port (`tunnel_port` if set).
    async fn start(cfg: &CloudConfig) -> anyhow::Result<Self> {
        let ip = cfg.advertise_address.context(
            "cluster mode needs config field `advertise_address` (--advertise-address): \
             this replica's address in the tunnel-port record",
        )?;
        let replica = cfg.replica_id()?;
        let cluster = Cluster::connect(cfg.kubeconfig.as_deref(), &cfg.namespace, &replica)
            .await
            .context("cluster mode")?;
        let mut spec = ClaimSpec::new(ip);
        spec.range = cfg.port_range()?;
        spec.fixed = cfg.tunnel_port;
        let claim = TunnelPortClaim::claim(&cluster, &spec)
            .await
            .context("claiming this replica's tunnel port")?;
        info!(
            replica = %replica,
            namespace = %cfg.namespace,
            address = %ip,
            tunnel_port = claim.port(),
            "cluster mode"
        );
        Ok(Self { cluster, claim })
    }

    /// The front's pod locator (a pod watch cache) and, when `patch`, the
    /// session hook that patches each connecting node's kubelet port.
    fn hooks(
        &self,
        patch: bool,
        shutdown: Shutdown,
    ) -> (
        Option<tether_cloudstream::PodLocator>,
        Option<tether_cloudstream::SessionHook>,
    ) {
        let pods = PodCache::start(&self.cluster, PodCacheOptions::default(), shutdown.clone());
        let hook = patch.then(|| {
            let patcher = KubeletPortPatcher::new(&self.cluster, RetryPolicy::default(), shutdown);
            let port = self.claim.port();
            Arc::new(move |ev: &TunnelEvent<'_>| {
                if let TunnelEvent::Connected { info, .. } = ev {
                    patcher.request(&info.node, port);
                }
            }) as tether_cloudstream::SessionHook
        });
        (Some(pods.locator()), hook)
    }

    /// Forwarding between replicas: the peer listener (TLS from the
    /// replicas' shared state CA, replica client certificates only) and the
    /// ownership records in Leases, published with this replica's address.
    async fn peers(
        &self,
        cfg: &CloudConfig,
        ca: &tether_pki::Ca,
        shutdown: Shutdown,
    ) -> anyhow::Result<(
        tether_cloudstream::peer::PeerOptions,
        Arc<tether_cluster::LeaseOwnership>,
    )> {
        use tether_cloudstream::peer::{PEER_SERVER_NAME, REPLICA_GROUP};
        let listener = crate::bind(cfg.peer_addr, "the replica peer listener").await?;
        let ip = cfg
            .advertise_address
            .context("cluster mode needs advertise_address")?;
        let addr = SocketAddr::new(ip, listener.local_addr()?.port());
        let replica = cfg.replica_id()?;
        let server = ca.issue_server("tether-peer", &[PEER_SERVER_NAME])?;
        let client = ca.issue_client(&format!("tether-replica:{replica}"), &[REPLICA_GROUP])?;
        let roots = std::slice::from_ref(ca.cert_der());
        let server_tls = tether_pki::server_config_client_auth(
            server.cert_chain()?,
            server.key_pem.to_der()?,
            roots,
            &[b"http/1.1"],
        )?;
        let client_tls = tether_pki::client_config(
            roots,
            Some((client.cert_chain()?, client.key_pem.to_der()?)),
            &[b"http/1.1"],
        )?;
        let ownership = tether_cluster::LeaseOwnership::start(
            &self.cluster,
            addr,
            tether_cluster::LeaseOptions::default(),
            shutdown,
        )
        .context("ownership records (Leases)")?;
        info!(peer = %addr, "forwarding between replicas");
        Ok((
            tether_cloudstream::peer::PeerOptions {
                replica,
                listener,
                server_tls: ServerTls::new(Arc::new(server_tls)),
                client_tls: Arc::new(client_tls),
                ownership: ownership.clone(),
                hub: None,
            },
            ownership,
        ))
    }

    /// Frees the tunnel port, bounded by [`RELEASE_TIMEOUT`].
    async fn release(self) {
        match tokio::time::timeout(RELEASE_TIMEOUT, self.claim.release()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "could not release the tunnel port"),
            Err(_) => warn!("releasing the tunnel port timed out"),
        }
    }
}

/// What the reload task needs to rebuild TLS: a copy of the file-related
/// config fields and the state CA.
struct Reloader {
    cfg: CloudConfig,
    state: Option<Arc<CloudState>>,
}

fn cfg_reloader(cfg: &CloudConfig, state: Option<Arc<CloudState>>) -> Reloader {
    let copy = CloudConfig {
        tunnel_cert: cfg.tunnel_cert.clone(),
        tunnel_key: cfg.tunnel_key.clone(),
        edge_ca: cfg.edge_ca.clone(),
        front_cert: cfg.front_cert.clone(),
        front_key: cfg.front_key.clone(),
        front_client_ca: cfg.front_client_ca.clone(),
        server_names: cfg.server_names.clone(),
        advertise_address: cfg.advertise_address,
        limits: cfg.limits.clone(),
        kubeedge: cfg.kubeedge.clone(),
        ..CloudConfig::default()
    };
    Reloader { cfg: copy, state }
}

fn mtimes(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

/// Re-reads certificates and CA bundles when their files change; new
/// connections use the new ones, live ones keep theirs.
async fn reload_tls(
    r: Reloader,
    tunnel: ServerTls,
    front: ServerTls,
    kubeedge: Option<tether_tunnel::kubeedge::KubeEdgeTrust>,
    shutdown: Shutdown,
) {
    let files = r.cfg.watched_files();
    let mut seen = mtimes(&files);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.triggered() => return,
        }
        let now = mtimes(&files);
        if now == seen {
            continue;
        }
        let state_ca = r.state.as_ref().map(|s| s.ca());
        let trust = match (&kubeedge, r.cfg.kubeedge_trust(state_ca)) {
            (Some(k), Ok(Some(cfg))) => k.reload(cfg).map_err(anyhow::Error::from),
            (_, Err(e)) => Err(e),
            _ => Ok(()),
        };
        match trust.and_then(|()| r.cfg.tls(state_ca)) {
            Ok((t, f)) => {
                tunnel.replace(t);
                front.replace(f);
                seen = now;
                info!("reloaded TLS certificates from disk");
            }
            // Often a half-written pair: try again on the next tick.
            Err(e) => {
                warn!(error = %e, "TLS files changed but do not load; keeping the current ones")
            }
        }
    }
}
