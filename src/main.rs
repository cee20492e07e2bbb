//! `tether`: the cloud, edge and demo roles of the Tether stream tunnel.
//! This file only parses flags and calls each role's `run`.

mod admin;
mod config;
mod demo;
mod iptables;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::info;

use tether_cloudstream::{CloudMetrics, CloudOptions};
use tether_edgestream::{EdgeMetrics, EdgeOptions, KubeletEndpoint};
use tether_tunnel::{Backoff, SessionRegistry, Shutdown, TunnelDialer};

use crate::config::{CloudConfig, EdgeConfig};

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "Cloud-edge stream tunnel for Kubernetes kubelet traffic"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the cloud side: tunnel listener for edges and the kubelet-API front.
    Cloud(CloudArgs),
    /// Run the edge agent next to a kubelet.
    Edge(EdgeArgs),
    /// Start cloud, edge and a sample kubelet on loopback and show the tunnel at work.
    Demo(DemoArgs),
    /// Keep the TUNNEL-PORT DNAT rules in step with the replicas' tunnel ports.
    IptablesManager(iptables::Args),
    /// Serve the sample kubelet alone (used by tests inside network namespaces).
    #[command(hide = true)]
    FixtureKubelet {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

#[derive(clap::Args)]
struct CloudArgs {
    /// YAML config file; flags and environment override its fields.
    #[arg(long, env = "TETHER_CONFIG")]
    config: Option<PathBuf>,
    /// Tunnel listen address [default 0.0.0.0:10004].
    #[arg(long, env = "TETHER_TUNNEL_ADDR")]
    tunnel_addr: Option<SocketAddr>,
    /// Kubelet-API front listen address [default 0.0.0.0:10003].
    #[arg(long, env = "TETHER_FRONT_ADDR")]
    front_addr: Option<SocketAddr>,
    /// Admin (metrics, probes) listen address [default 127.0.0.1:10005].
    #[arg(long, env = "TETHER_ADMIN_ADDR")]
    admin_addr: Option<SocketAddr>,
    /// Tunnel serving certificate (PEM).
    #[arg(long, env = "TETHER_TUNNEL_CERT")]
    tunnel_cert: Option<PathBuf>,
    /// Tunnel serving key (PEM).
    #[arg(long, env = "TETHER_TUNNEL_KEY")]
    tunnel_key: Option<PathBuf>,
    /// CA that signs edge node certificates (PEM).
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
    /// This replica's address as control-plane hosts reach it (for /tunnelport).
    #[arg(long, env = "TETHER_ADVERTISE_ADDRESS")]
    advertise_address: Option<std::net::IpAddr>,
    /// This replica's tunnel port, e.g. 10351 (for /tunnelport).
    #[arg(long, env = "TETHER_TUNNEL_PORT")]
    tunnel_port: Option<u16>,
}

#[derive(clap::Args)]
struct EdgeArgs {
    /// YAML config file; flags and environment override its fields.
    #[arg(long, env = "TETHER_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name (must match its certificate).
    #[arg(long, env = "TETHER_NODE_NAME")]
    node_name: Option<String>,
    /// The cloud's tunnel address, host:port.
    #[arg(long, env = "TETHER_CLOUD_ADDR")]
    cloud_addr: Option<String>,
    /// Name the cloud's certificate must carry [default: host of --cloud-addr].
    #[arg(long, env = "TETHER_CLOUD_SERVER_NAME")]
    cloud_server_name: Option<String>,
    /// Pinned CA of the cloud (PEM).
    #[arg(long, env = "TETHER_CA")]
    ca: Option<PathBuf>,
    /// Node client certificate (PEM).
    #[arg(long, env = "TETHER_CERT")]
    cert: Option<PathBuf>,
    /// Node client key (PEM).
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
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Run the checks, drain, and exit 0 only if every check passed.
    #[arg(long)]
    self_test: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TETHER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log(&cli.cmd))),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::Cloud(a) => run_cloud(a).await,
            Cmd::Edge(a) => run_edge(a).await,
            Cmd::Demo(a) => {
                if demo::run(a.self_test).await? {
                    Ok(())
                } else {
                    anyhow::bail!("demo self-test failed")
                }
            }
            Cmd::IptablesManager(a) => iptables::run(a).await,
            Cmd::FixtureKubelet { listen } => {
                let k = tether_tests::fixture::FixtureKubelet::start_on(listen, None).await?;
                println!("listening on {}", k.addr);
                stop_signal().await;
                Ok(())
            }
        }
    })
}

fn default_log(cmd: &Cmd) -> &'static str {
    match cmd {
        Cmd::Demo(_) => "warn",
        _ => "info",
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for {what}"))
}

async fn run_cloud(a: CloudArgs) -> anyhow::Result<()> {
    let mut cfg: CloudConfig = config::load(a.config.as_deref())?;
    macro_rules! set { ($($f:ident),*) => { $( if let Some(v) = a.$f { cfg.$f = v.into(); } )* } }
    set!(
        tunnel_addr,
        front_addr,
        admin_addr,
        tunnel_cert,
        tunnel_key,
        edge_ca,
        front_cert,
        front_key,
        front_client_ca
    );
    if a.advertise_address.is_some() {
        cfg.advertise_address = a.advertise_address;
    }
    if a.tunnel_port.is_some() {
        cfg.tunnel_port = a.tunnel_port;
    }
    let tunnelport = match (cfg.advertise_address, cfg.tunnel_port) {
        (Some(ip), Some(port)) => Some(
            serde_json::to_vec(&tether_iptables_manager::TunnelPortRecord::single(ip, port))?
                .into(),
        ),
        (None, None) => None,
        _ => anyhow::bail!("config fields `advertise_address` and `tunnel_port` go together"),
    };
    let (tunnel_tls, front_tls) = cfg.tls()?;
    let tunnel_listener = bind(cfg.tunnel_addr, "the edge tunnel").await?;
    let front_listener = bind(cfg.front_addr, "the kubelet-API front").await?;
    let admin_listener = bind(cfg.admin_addr, "the admin endpoint").await?;
    let admin_addr = admin_listener.local_addr()?;
    let mut registry = Registry::default();
    let metrics = CloudMetrics::register(&mut registry);
    let sessions = SessionRegistry::new();
    let drain = cfg.drain();
    let (trigger, shutdown) = Shutdown::new(drain);
    tokio::spawn(admin::serve(
        admin_listener,
        admin::Admin {
            registry: Arc::new(Mutex::new(registry)),
            ready: Arc::new(|| true),
            tunnelport,
        },
        shutdown.clone(),
    ));
    let opts = CloudOptions {
        tunnel_listener,
        tunnel_tls,
        front_listener,
        front_tls,
        authz: cfg.authz,
        limits: cfg.limits,
        front_limits: cfg.front_limits,
        registry: sessions,
        metrics,
    };
    info!(
        tunnel = %opts.tunnel_listener.local_addr()?,
        front = %opts.front_listener.local_addr()?,
        admin = %admin_addr,
        "cloud started"
    );
    let run = tokio::spawn(tether_cloudstream::run(opts, shutdown));
    stop_signal().await;
    info!(?drain, "shutting down");
    trigger.trigger();
    run.await?;
    info!("cloud stopped");
    Ok(())
}

async fn run_edge(a: EdgeArgs) -> anyhow::Result<()> {
    let mut cfg: EdgeConfig = config::load(a.config.as_deref())?;
    macro_rules! set_opt { ($($f:ident),*) => { $( if a.$f.is_some() { cfg.$f = a.$f; } )* } }
    set_opt!(node_name, cloud_addr, cloud_server_name, ca, cert, key);
    if let Some(u) = a.kubelet_url {
        cfg.kubelet_url = u;
    }
    if let Some(v) = a.admin_addr {
        cfg.admin_addr = v;
    }
    if !a.allow.is_empty() {
        cfg.allow = a.allow;
    }
    let dialer = TunnelDialer::new(
        cfg.cloud_addr()?,
        &cfg.cloud_server_name()?,
        cfg.tunnel_tls()?,
        cfg.node_name()?,
        cfg.limits.clone(),
    )?;
    let kubelet = KubeletEndpoint::new(
        &cfg.kubelet_url,
        cfg.kubelet_tls()?,
        cfg.kubelet_server_name.as_deref(),
    )
    .context("config field `kubelet_url`")?;
    let admin_listener = bind(cfg.admin_addr, "the admin endpoint").await?;
    let admin_addr = admin_listener.local_addr()?;
    let mut registry = Registry::default();
    let metrics = EdgeMetrics::register(&mut registry);
    let (trigger, shutdown) = Shutdown::new(cfg.drain());
    let ready = {
        let m = metrics.clone();
        Arc::new(move || m.is_connected())
    };
    tokio::spawn(admin::serve(
        admin_listener,
        admin::Admin {
            registry: Arc::new(Mutex::new(registry)),
            ready,
            tunnelport: None,
        },
        shutdown.clone(),
    ));
    let opts = EdgeOptions {
        dialer,
        kubelet,
        allow: cfg.allow.clone(),
        backoff: Backoff::new(
            Duration::from_millis(cfg.backoff_base_ms),
            Duration::from_secs(cfg.backoff_max_secs),
        ),
        metrics,
    };
    info!(node = cfg.node_name()?, cloud = cfg.cloud_addr()?, kubelet = %cfg.kubelet_url, admin = %admin_addr, "edge started");
    let run = tokio::spawn(tether_edgestream::run(opts, shutdown));
    stop_signal().await;
    info!(drain = ?cfg.drain(), "shutting down");
    trigger.trigger();
    run.await?;
    info!("edge stopped");
    Ok(())
}
