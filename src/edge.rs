//! `tether edge`: flags and config, enrolment (a bootstrap token, or
//! certificate files), then the edge agent with certificate rotation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use tether_edgehub::CertManager;
use tether_edgehub::hub::{EdgeHub, EdgeHubConfig};
use tether_edgestream::{EdgeMetrics, EdgeOptions, KubeletEndpoint, TunnelStatus};
use tether_pki::BootstrapToken;
use tether_tunnel::{Backoff, Shutdown, TunnelDialer};

use crate::config::{self, EdgeConfig};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Without a subcommand, `tether edge` runs the agent.
    #[command(subcommand)]
    pub(crate) command: Option<EdgeCmd>,
    /// YAML config file; flags and environment override its fields.
    #[arg(long, env = "TETHER_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name (must match its certificate).
    #[arg(long, env = "TETHER_NODE_NAME")]
    node_name: Option<String>,
    /// The cloud host: tunnel at HOST:10004, bootstrap at HOST:10002.
    #[arg(long, env = "TETHER_CLOUD")]
    cloud: Option<String>,
    /// The cloud's tunnel address, host:port (overrides --cloud).
    #[arg(long, env = "TETHER_CLOUD_ADDR")]
    cloud_addr: Option<String>,
    /// The cloud's bootstrap address, host:port (overrides --cloud).
    #[arg(long, env = "TETHER_BOOTSTRAP_ADDR")]
    bootstrap_addr: Option<String>,
    /// Name the cloud's certificate must carry [default: the cloud host].
    #[arg(long, env = "TETHER_CLOUD_SERVER_NAME")]
    cloud_server_name: Option<String>,
    /// Bootstrap token for the first start (from `tether token create`).
    #[arg(long, env = "TETHER_TOKEN", hide_env_values = true)]
    token: Option<BootstrapToken>,
    /// Where enrolled credentials live [default /var/lib/tether-edge].
    #[arg(long, env = "TETHER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Pinned CA of the cloud (PEM), for file-based credentials.
    #[arg(long, env = "TETHER_CA")]
    ca: Option<PathBuf>,
    /// Node client certificate (PEM), for file-based credentials.
    #[arg(long, env = "TETHER_CERT")]
    cert: Option<PathBuf>,
    /// Node client key (PEM), for file-based credentials.
    #[arg(long, env = "TETHER_KEY")]
    key: Option<PathBuf>,
    /// Kubelet endpoint [default http://127.0.0.1:10350].
    #[arg(long, env = "TETHER_KUBELET_URL")]
    kubelet_url: Option<String>,
    /// Allow-listed local endpoint ip:port (repeatable).
    #[arg(long = "allow", env = "TETHER_ALLOW", value_delimiter = ',')]
    allow: Vec<SocketAddr>,
    /// Admin (metrics, probes) listen address [default 127.0.0.1:10006].
    #[arg(long, env = "TETHER_ADMIN_ADDR")]
    admin_addr: Option<SocketAddr>,
    /// Dial the cloud message hub on its own port, host:port, as edges before
    /// 0.2 did [default: the hub rides inside the tunnel, one connection].
    #[arg(long, env = "TETHER_HUB_ADDR")]
    hub_addr: Option<String>,
    /// The local hub API socket [default: <state-dir>/hub.sock].
    #[arg(long, env = "TETHER_HUB_SOCKET")]
    hub_socket: Option<PathBuf>,
    /// Do not run the message hub.
    #[arg(long, env = "TETHER_NO_HUB")]
    no_hub: bool,
    /// Load and check the configuration (with flags and environment): every
    /// field's type and range. Prints OK and exits; nothing listens.
    #[arg(long)]
    check_config: bool,
    /// Diagnose this edge's connection step by step (config, DNS, TCP, TLS,
    /// the cloud's certificate, the node certificate and its revocation, the
    /// kubelet); one plain line per step, exits non-zero at the first
    /// failure, naming the fix. Writes nothing and opens no session.
    #[arg(long, conflicts_with = "check_config")]
    check: bool,
}

impl Args {
    /// True for the one-shot checks, which print their own plain report.
    pub(crate) fn is_check(&self) -> bool {
        self.check || self.check_config
    }
}

#[derive(clap::Subcommand)]
pub(crate) enum EdgeCmd {
    /// Show a running agent's tunnel state, last error, hub queue and
    /// certificate renewal, read from its admin endpoint.
    Status(crate::edge_status::Args),
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    if let Some(EdgeCmd::Status(s)) = a.command {
        return crate::edge_status::run(s).await;
    }
    let mut cfg: EdgeConfig = match config::load(a.config.as_deref()) {
        Ok(c) => c,
        Err(e) if a.check => return crate::edge_check::config_failed(e),
        Err(e) => return Err(e),
    };
    if let Some(host) = &a.cloud {
        cfg.cloud_addr = Some(format!("{host}:10004"));
        cfg.bootstrap_addr = Some(format!("{host}:10002"));
    }
    macro_rules! set_opt { ($($f:ident),*) => { $( if a.$f.is_some() { cfg.$f = a.$f; } )* } }
    set_opt!(
        node_name,
        cloud_addr,
        bootstrap_addr,
        cloud_server_name,
        ca,
        cert,
        key,
        hub_addr,
        hub_socket
    );
    if a.no_hub {
        cfg.hub_enabled = false;
    }
    if let Some(u) = a.kubelet_url {
        cfg.kubelet_url = u;
    }
    if let Some(v) = a.admin_addr {
        cfg.admin_addr = v;
    }
    if let Some(d) = a.state_dir {
        cfg.state_dir = d;
    }
    if !a.allow.is_empty() {
        cfg.allow = a.allow;
    }
    if a.check {
        let source = config::source(a.config.as_deref());
        let checked = cfg.check().context(source.clone());
        return crate::edge_check::run(&cfg, &source, checked, a.token.as_ref()).await;
    }
    cfg.check().context(config::source(a.config.as_deref()))?;
    if a.check_config {
        println!("OK");
        return Ok(());
    }
    let node = cfg.node_name()?.to_owned();
    let server_name = cfg.cloud_server_name()?;
    let kubelet = KubeletEndpoint::new(
        &cfg.kubelet_url,
        cfg.kubelet_tls()?,
        cfg.kubelet_server_name.as_deref(),
    )
    .context("config field `kubelet_url`")?
    .with_timeouts(cfg.kubelet_timeouts()?);
    let (trigger, shutdown) = Shutdown::new(cfg.drain());
    let mut registry = Registry::default();
    tether_metrics_adapter::register_build_info(&mut registry, "edge");
    tether_metrics_adapter::register_process(&mut registry);
    tether_metrics_adapter::spawn_heap_trimmer();
    let metrics = EdgeMetrics::register(&mut registry);
    // Without `hub_addr` the hub's channel rides inside the tunnel session,
    // one connection per edge (ADR 0022); with it, the edge dials the hub
    // port as edges before 0.2 did.
    let hub_port = cfg.hub_addr.clone();
    let cert_source;
    let (dialer, hub_dialer) = if cfg.file_credentials() {
        cert_source = CertSource::Files(cfg.cert.clone().context("config field `cert`")?);
        let tls = cfg.tunnel_tls()?;
        (
            TunnelDialer::new(
                cfg.cloud_addr()?,
                &server_name,
                tls.clone(),
                &node,
                cfg.limits.clone(),
            )?,
            hub_port
                .as_ref()
                .map(|a| TunnelDialer::new(a, &server_name, tls, &node, cfg.limits.clone()))
                .transpose()?,
        )
    } else {
        let manager = CertManager::new(&cfg.state_dir, &cfg.bootstrap_addr()?, &server_name, &node);
        let creds = manager.ensure(a.token.as_ref()).await?;
        // With a token, a certificate refused as revoked (the operator
        // revoked the node and gave it a new token) is replaced by enrolling
        // with the token, instead of being refused forever.
        let (manager, refused) = match a.token.clone() {
            Some(t) => {
                let (m, signal) = manager.with_token_fallback(t);
                let hook: tether_tunnel::RefusalHook =
                    Arc::new(move |status, reason: &str| signal.refused(status, reason));
                (m, Some(hook))
            }
            None => (manager, None),
        };
        info!(node, serial = %creds.identity.serial, renew_at = ?creds.renew_at(), "credentials ready");
        let (tx, rx) = tokio::sync::watch::channel(creds.client_config()?);
        metrics.certificate_expires(creds.identity.not_after);
        let m = metrics.clone();
        let identity = Arc::new(Mutex::new(creds.identity.clone()));
        cert_source = CertSource::Enrolled {
            identity: identity.clone(),
            schedule: manager.renewal_schedule(),
        };
        tokio::spawn(manager.run_rotation(
            creds,
            tx,
            move |c| {
                m.certificate_expires(c.identity.not_after);
                *identity.lock().expect("identity lock") = c.identity.clone();
            },
            shutdown.clone(),
        ));
        let mut tunnel = TunnelDialer::rotating(
            cfg.cloud_addr()?,
            &server_name,
            rx.clone(),
            &node,
            cfg.limits.clone(),
        )?;
        let mut hub = hub_port
            .as_ref()
            .map(|a| TunnelDialer::rotating(a, &server_name, rx, &node, cfg.limits.clone()))
            .transpose()?;
        if let Some(hook) = refused {
            tunnel.on_refused(hook.clone());
            if let Some(hub) = &mut hub {
                hub.on_refused(hook);
            }
        }
        (tunnel, hub)
    };
    let backoff = Backoff::new(
        Duration::from_millis(cfg.backoff_base_ms),
        Duration::from_secs(cfg.backoff_max_secs),
    );
    let mut store_health = None;
    let mut hub_metrics = None;
    let mut hub_stream = None;
    if cfg.hub_enabled {
        std::fs::create_dir_all(&cfg.state_dir)
            .with_context(|| format!("config field `state_dir` ({})", cfg.state_dir.display()))?;
        let store = tether_hub::Store::open(&cfg.state_dir.join("hub.redb"))
            .context("the message hub's queue in `state_dir`")?;
        store.health().register(&mut registry, "edge");
        store_health = Some(store.health());
        let mut channel = cfg.hub.channel()?;
        // Only the cloud limits publish rates (per node).
        channel.rate = None;
        let hub = EdgeHub::new(
            EdgeHubConfig {
                channel,
                ..EdgeHubConfig::default()
            },
            store,
            {
                let m = tether_hub::HubMetrics::register(&mut registry, "edge");
                hub_metrics = Some(m.clone());
                m
            },
        )?;
        let socket = cfg
            .hub_socket
            .clone()
            .unwrap_or_else(|| cfg.state_dir.join("hub.sock"));
        let api = tether_edgehub::api::bind(&socket)
            .with_context(|| format!("the hub API socket {}", socket.display()))?;
        tokio::spawn(tether_edgehub::api::serve(
            api,
            hub.clone(),
            cfg.hub.max_message_bytes,
            shutdown.clone(),
        ));
        match hub_dialer {
            Some(dialer) => {
                let (hub_backoff, hub_shutdown) = (backoff.clone(), shutdown.clone());
                let run = hub.clone();
                tokio::spawn(async move { run.run(dialer, hub_backoff, hub_shutdown).await });
            }
            None => {
                tokio::spawn(warn_without_hub(
                    hub.clone(),
                    metrics.clone(),
                    shutdown.clone(),
                ));
                let shutdown = shutdown.clone();
                hub_stream = Some(tether_edgestream::HubStream {
                    target: tether_hub::HUB_TARGET,
                    serve: Arc::new(move |req| hub.accept(req, shutdown.clone())),
                });
            }
        }
        let via = hub_port.as_deref().unwrap_or("the tunnel");
        info!(hub = %via, socket = %socket.display(), "message hub started");
    }
    let admin_listener = crate::bind(cfg.admin_addr, "the admin endpoint").await?;
    let admin_addr = admin_listener.local_addr()?;
    // Ready while the tunnel is up and the hub's store can write (a full
    // disk refuses publishes until it recovers by itself).
    let ready = {
        let m = metrics.clone();
        Arc::new(move || m.is_connected() && store_health.as_ref().is_none_or(|h| h.is_healthy()))
    };
    let preauth = tether_tunnel::PreAuthMetrics::default();
    preauth.register(&mut registry);
    let status = TunnelStatus::default();
    let status_doc = {
        let view = StatusView {
            node: node.clone(),
            cloud: cfg.cloud_addr()?.to_owned(),
            tunnel: status.clone(),
            hub: hub_metrics,
            hub_addr: hub_port.clone(),
            cert: cert_source,
        };
        Arc::new(move || hyper::body::Bytes::from(view.document().to_string()))
            as tether_metrics_adapter::Json
    };
    tokio::spawn(tether_metrics_adapter::serve(
        admin_listener,
        tether_metrics_adapter::Admin {
            registry: Arc::new(Mutex::new(registry)),
            ready,
            tunnelport: None,
            sd: None,
            sessions: None,
            hub_api: None,
            documents: vec![("/status", status_doc)],
            preauth: tether_tunnel::PreAuthGate::new(Default::default(), preauth),
        },
        shutdown.clone(),
    ));
    let opts = EdgeOptions {
        dialer,
        kubelet,
        allow: cfg.allow.clone(),
        backoff,
        metrics,
        status,
        hub: hub_stream,
    };
    info!(node, cloud = cfg.cloud_addr()?, kubelet = %cfg.kubelet_url, admin = %admin_addr, "edge started");
    let run = tokio::spawn(tether_edgestream::run(opts, shutdown));
    crate::stop_signal().await;
    info!(drain = ?cfg.drain(), "shutting down");
    trigger.trigger();
    run.await?;
    info!("edge stopped");
    Ok(())
}

/// Says so when the tunnel has been up for a minute without the cloud
/// opening the hub stream in it: a cloud older than 0.2 never does.
async fn warn_without_hub(hub: EdgeHub, metrics: EdgeMetrics, shutdown: Shutdown) {
    const CHECK: Duration = Duration::from_secs(30);
    let mut missing = 0u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECK) => {}
            _ = shutdown.triggered() => return,
        }
        missing = if metrics.is_connected() && !hub.is_online() {
            missing + 1
        } else {
            0
        };
        // Once, after a minute of it, then every ten minutes.
        if missing == 2 || (missing > 2 && missing % 20 == 2) {
            warn!(
                "the tunnel is up but the cloud has opened no hub stream in it; a cloud older \
                 than 0.2 does not carry the hub in the tunnel: upgrade it, or set hub_addr \
                 to its hub port meanwhile"
            );
        }
    }
}

/// Where the node certificate comes from, for `/status`.
enum CertSource {
    /// Files named in the config, replaced by whoever manages them; read at
    /// each request, so a replaced file shows.
    Files(PathBuf),
    /// Enrolled with a token and renewed by the rotation task.
    Enrolled {
        identity: Arc<Mutex<tether_pki::Identity>>,
        schedule: tether_edgehub::RenewalSchedule,
    },
}

/// What the edge admin endpoint's `/status` reports (see the operator
/// guide, "tether edge status", for the fields).
struct StatusView {
    node: String,
    cloud: String,
    tunnel: TunnelStatus,
    hub: Option<tether_hub::HubMetrics>,
    hub_addr: Option<String>,
    cert: CertSource,
}

/// Version of the edge `/status` document; bumped only if a field changes meaning.
const STATUS_VERSION: u32 = 1;

fn unix(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl StatusView {
    fn document(&self) -> serde_json::Value {
        use serde_json::json;
        let t = self.tunnel.snapshot();
        let hub = match &self.hub {
            Some(m) => json!({
                "enabled": true,
                "transport": if self.hub_addr.is_some() { "port" } else { "tunnel" },
                "cloud": self.hub_addr.as_deref().unwrap_or(&self.cloud),
                "connected": m.online() > 0,
                "queue_depth": m.queue_depth(),
            }),
            None => json!({ "enabled": false }),
        };
        let certificate = match &self.cert {
            CertSource::Enrolled { identity, schedule } => {
                let id = identity.lock().expect("identity lock").clone();
                json!({
                    "source": "enrolled",
                    "serial": id.serial,
                    "not_after": id.not_after,
                    "next_renewal": schedule.next().map(unix),
                    "error": null,
                })
            }
            CertSource::Files(path) => {
                let id = std::fs::read(path)
                    .map_err(|e| e.to_string())
                    .and_then(|pem| {
                        let certs = tether_pki::load_certs_pem(&pem).map_err(|e| e.to_string())?;
                        let first = certs.first().ok_or("no certificate in the file")?;
                        tether_pki::Identity::from_der(first).map_err(|e| e.to_string())
                    });
                match id {
                    Ok(id) => json!({
                        "source": "files",
                        "serial": id.serial,
                        "not_after": id.not_after,
                        "next_renewal": null,
                        "error": null,
                    }),
                    Err(e) => json!({
                        "source": "files",
                        "serial": null,
                        "not_after": null,
                        "next_renewal": null,
                        "error": format!("{}: {e}", path.display()),
                    }),
                }
            }
        };
        json!({
            "version": STATUS_VERSION,
            "node": self.node,
            "cloud": self.cloud,
            "tunnel": {
                "state": t.state.as_str(),
                "since": unix(t.since),
                "connected_since": t.connected_since.map(unix),
                "retry_at": t.retry_at.map(unix),
                "connects": t.connects,
                "last_error": t.last_error.as_ref().map(|(e, at)| json!({
                    "message": e,
                    "at": unix(*at),
                })),
            },
            "hub": hub,
            "certificate": certificate,
            "generated_at": unix(std::time::SystemTime::now()),
        })
    }
}
