//! `tether`: the cloud, edge and demo roles of the Tether stream tunnel, and
//! the operator commands around them. This file only parses flags and calls
//! each role's `run`.
//!
//! Without the `cloud` feature only the edge agent is built (`tether edge`),
//! with none of the cloud's crates linked.

mod admin_client;
#[cfg(feature = "cloud")]
mod cloud;
mod config;
#[cfg(feature = "cloud")]
mod demo;
mod edge;
mod edge_check;
mod edge_status;
#[cfg(feature = "cloud")]
mod iptables;
#[cfg(feature = "cloud")]
mod kubeedge_check;
mod limits_check;
#[cfg(feature = "cloud")]
mod nodes;
#[cfg(feature = "cloud")]
mod pki_cmds;

use std::io::IsTerminal;
use std::net::SocketAddr;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "Cloud-edge stream tunnel for Kubernetes kubelet traffic"
)]
struct Cli {
    /// Export request traces (cloud front and tunnel, edge forward) over
    /// OTLP/gRPC to this collector, e.g. http://otel-collector:4317. Off when unset.
    #[arg(long, global = true, env = "TETHER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Log lines on stderr: `text` (colours only when stderr is a terminal)
    /// or `json` (one JSON object per line, with the fields of the spans it
    /// happened in, such as node and session).
    #[arg(
        long,
        global = true,
        env = "TETHER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    #[cfg(feature = "cloud")]
    /// Run the cloud side: bootstrap server, tunnel listener for edges and the kubelet-API front.
    Cloud(cloud::Args),
    /// Run the edge agent next to a kubelet (`tether edge status`: ask a
    /// running agent how its tunnel is).
    Edge(edge::Args),
    #[cfg(feature = "cloud")]
    /// List the edge nodes a cloud holds, from its admin endpoint.
    Nodes(nodes::Args),
    #[cfg(feature = "cloud")]
    /// Start cloud, edge and a sample kubelet on loopback and show the tunnel at work.
    Demo(DemoArgs),
    #[cfg(feature = "cloud")]
    /// Keep the TUNNEL-PORT DNAT rules in step with the replicas' tunnel ports.
    IptablesManager(iptables::Args),
    #[cfg(feature = "cloud")]
    /// Create, list and revoke bootstrap tokens.
    Token(pki_cmds::TokenArgs),
    #[cfg(feature = "cloud")]
    /// Inspect, revoke and issue certificates.
    Certs(pki_cmds::CertsArgs),
    #[cfg(feature = "cloud")]
    /// KubeEdge edges: `tether kubeedge check --ca <file> --cert <edge.crt>`
    /// says whether the cloud would admit a certificate, and why not.
    Kubeedge(kubeedge_check::Args),
    #[cfg(feature = "cloud")]
    /// The command the demo's exec runs (no shell needed).
    #[command(hide = true)]
    DemoGreeter,
    #[cfg(feature = "cloud")]
    /// Serve the sample kubelet alone (used by tests inside network namespaces).
    #[command(hide = true)]
    FixtureKubelet {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[cfg(feature = "cloud")]
#[derive(clap::Args)]
struct DemoArgs {
    /// Run the checks, drain, and exit 0 only if every check passed.
    #[arg(long)]
    self_test: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    #[cfg(feature = "cloud")]
    if let Cmd::DemoGreeter = cli.cmd {
        return demo::greeter();
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line; no backtrace for operators.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let default_log = match &cli.cmd {
        #[cfg(feature = "cloud")]
        Cmd::Demo(_) | Cmd::Token(_) | Cmd::Certs(_) | Cmd::Nodes(_) | Cmd::Kubeedge(_) => "warn",
        // The checks' report and the status are their output; only warnings beside them.
        Cmd::Edge(a) if a.command.is_some() || a.is_check() => "warn",
        _ => "info",
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let service = match cli.cmd {
        #[cfg(feature = "cloud")]
        Cmd::Cloud(_) => "tether-cloud",
        Cmd::Edge(_) => "tether-edge",
        #[cfg(feature = "cloud")]
        Cmd::IptablesManager(_) => "tether-iptables-manager",
        #[cfg(feature = "cloud")]
        _ => "tether",
    };
    // The OTLP client lives on the runtime, so build it inside.
    let provider = {
        let _rt = rt.enter();
        cli.otlp_endpoint
            .as_deref()
            .map(|e| tether_metrics_adapter::traces::otlp_provider(e, service))
            .transpose()?
    };
    {
        use tracing_subscriber::Layer;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let filter = tracing_subscriber::EnvFilter::try_from_env("TETHER_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log));
        // Colours only for a person at a terminal: journald, files and
        // container logs get plain text (NO_COLOR is honoured as well).
        let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        let fmt = match cli.log_format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(true)
                .with_writer(std::io::stderr)
                .boxed(),
        };
        tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .with(provider.as_ref().map(tether_metrics_adapter::traces::layer))
            .init();
    }
    let result = run_role(cli.cmd, &rt);
    if let Some(p) = provider {
        // Flush the spans still batched.
        let _rt = rt.enter();
        if let Err(e) = p.shutdown() {
            eprintln!("warning: flushing traces failed: {e}");
        }
    }
    result
}

fn run_role(cmd: Cmd, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    rt.block_on(async {
        match cmd {
            Cmd::Edge(a) => edge::run(a).await,
            #[cfg(feature = "cloud")]
            Cmd::Cloud(a) => cloud::run(a).await,
            #[cfg(feature = "cloud")]
            Cmd::Nodes(a) => nodes::run(a).await,
            #[cfg(feature = "cloud")]
            Cmd::Demo(a) => {
                if demo::run(a.self_test).await? {
                    Ok(())
                } else {
                    anyhow::bail!("demo self-test failed")
                }
            }
            #[cfg(feature = "cloud")]
            Cmd::IptablesManager(a) => iptables::run(a).await,
            #[cfg(feature = "cloud")]
            Cmd::Token(a) => pki_cmds::token(a),
            #[cfg(feature = "cloud")]
            Cmd::Certs(a) => pki_cmds::certs(a),
            #[cfg(feature = "cloud")]
            Cmd::Kubeedge(a) => match kubeedge_check::run(a)? {
                true => Ok(()),
                false => anyhow::bail!("the cloud would refuse this certificate"),
            },
            #[cfg(feature = "cloud")]
            Cmd::DemoGreeter => Ok(()),
            #[cfg(feature = "cloud")]
            Cmd::FixtureKubelet { listen } => {
                let k = tether_tests::fixture::FixtureKubelet::start_on(listen, None).await?;
                println!("listening on {}", k.addr);
                stop_signal().await;
                Ok(())
            }
        }
    })
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
    tether_tunnel::bind_listener(addr)
        .with_context(|| format!("cannot listen on {addr} for {what}"))
}
