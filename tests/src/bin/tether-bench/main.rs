//! `tether-bench`: measures Tether's stream tunnel against the same fixture kubelet
//! reached directly, in the same run, with the same client code, and reports each
//! figure as direct, tunnel and their ratio. The fixture serves HTTPS and the edge
//! reaches it over HTTPS, like a real kubelet on :10250.
//!
//! Figures: single log stream throughput, small GET rate at concurrency 1/8/64,
//! exec round trip, 100 concurrent 4 MiB streams, throughput beside a stalled reader,
//! front latency under a pre-TLS flood, one logs stream across an emulated
//! 50 ms link, and the memory of idle sessions (edges in a child process).
//! The KubeEdge figure compares Tether's edge with a KubeEdge-protocol edge double
//! on one cloud (logs and small GETs; both edges reach a plain-HTTP kubelet). The message hub's
//! figures (messages per second, delivery latency, fan-out to many nodes) have no
//! direct baseline and are reported as absolute numbers. `--json` ends stdout
//! with one JSON object; `docs/PERFORMANCE.md` explains the figures and targets.
//! The exit status is non-zero only when the harness itself fails, never for a
//! missed target.

mod complete;
mod exec;
mod figures;
mod hub;
mod hub_load;
mod hub_replicas;
mod idle;
mod iptables;
mod kubeedge;
mod memory;
mod report;
mod requests;
mod rig;
mod slowloris;
mod stats;
mod streams;
mod wan;

use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use tether_tunnel::TunnelLimits;

use crate::figures::phase;
use crate::report::Report;
use crate::rig::{Rig, RigOptions, Runtimes, Side};
use crate::stats::Machine;

/// Benchmarks the Tether tunnel against direct kubelet access.
#[derive(Parser, Debug)]
#[command(name = "tether-bench", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Child process of the idle-session figure: runs idle edge agents.
    #[command(hide = true)]
    Edges(idle::EdgesArgs),
    /// Child process of the iptables figure: runs inside its network namespace.
    #[command(hide = true)]
    IptablesSync(iptables::SyncArgs),
    /// Child process of the memory figure: runs the cloud or the edge.
    #[command(hide = true)]
    Role(memory::RoleArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Smaller sizes and shorter windows; finishes well under two minutes.
    #[arg(long)]
    quick: bool,
    /// End stdout with one JSON object holding every figure.
    #[arg(long)]
    json: bool,
    /// Run only these figures (comma-separated); default all.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Figure>,
    /// Tunnel limits for the cloud and every edge, as JSON; missing fields keep
    /// their defaults (e.g. '{"stream_window": 1048576}'). For tuning experiments.
    #[arg(long, value_name = "JSON")]
    limits_json: Option<String>,
    /// How the edge reaches the kubelet: https (like a real kubelet on
    /// :10250, the same fixture instance the direct side uses) or http (like
    /// edged on 127.0.0.1:10350, Tether's default; a second fixture instance).
    #[arg(long, value_enum, default_value = "https")]
    edge_kubelet: EdgeKubelet,
    /// Idle sessions for the memory figure (default 1000, 200 with --quick).
    #[arg(long)]
    edges: Option<usize>,
    /// Edge hubs for the hub fan-out figure (default 1000).
    #[arg(long)]
    hub_nodes: Option<usize>,
    /// Messages per run of the hub batch figure (default 50000, 20000 with --quick).
    #[arg(long)]
    hub_msgs: Option<u64>,
    /// Streams held stalled during the stalled-reader figure.
    #[arg(long, default_value_t = 1)]
    stalled: usize,
    /// Round trip of the emulated long link, in milliseconds (wan figure).
    #[arg(long, default_value_t = 50)]
    wan_rtt_ms: u64,
    /// Bandwidth cap of the emulated long link per direction, in MB/s (10^6
    /// bytes); both sides are held to it, so the ratio measures windows, not
    /// which side this 2-core machine can encrypt faster (wan figure).
    #[arg(long, default_value_t = 100)]
    wan_rate_mbps: u64,
    /// Run the fixture, the edge and the cloud on the bench's own runtime instead
    /// of one runtime each (no per-role CPU split then).
    #[arg(long, hide = true)]
    shared_runtime: bool,
    /// Measure one side only, for profiling one path (logs, small GETs and
    /// concurrent streams; the other side reads as zero).
    #[arg(long, value_enum, hide = true)]
    side: Option<SideArg>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SideArg {
    Direct,
    Tunnel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum EdgeKubelet {
    Https,
    Http,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Figure {
    Logs,
    SmallGet,
    Exec,
    Concurrent,
    Stalled,
    Slowloris,
    Idle,
    /// Complete edges (tunnel and hub on one connection) and the reconnect storm.
    Complete,
    Iptables,
    Hub,
    Memory,
    Wan,
    /// Tether's edge against a KubeEdge-protocol edge, on one cloud.
    #[value(name = "kubeedge")]
    KubeEdge,
}

/// The long-link figure's link and transfer.
struct WanPlan {
    link: tether_tests::wan::WanSpec,
    /// Size of the logs stream asked for.
    bytes: u64,
    /// Streams per side; the best counts.
    runs: usize,
    /// A stream still running after this is cut off and rated on what it moved.
    limit: Duration,
}

/// Sizes, counts and deadlines of one run.
struct Plan {
    quick: bool,
    only: Vec<Figure>,
    log_bytes: u64,
    log_runs: usize,
    get_concurrency: [usize; 3],
    get_warmup: Duration,
    get_window: Duration,
    get_reps: usize,
    exec_trips: usize,
    concurrent_streams: usize,
    concurrent_reps: usize,
    concurrent_bytes: u64,
    stalled: usize,
    stalled_bytes: u64,
    wan: WanPlan,
    edges: usize,
    edges_register: Duration,
    sides: Vec<Side>,
    shared_runtime: bool,
    hub: hub::HubPlan,
}

impl Plan {
    fn new(args: &RunArgs) -> Self {
        let quick = args.quick;
        Self {
            quick,
            only: args.only.clone(),
            log_bytes: if quick { 32 << 20 } else { 256 << 20 },
            log_runs: if quick { 2 } else { 3 },
            get_concurrency: [1, 8, 64],
            get_warmup: Duration::from_millis(if quick { 250 } else { 500 }),
            get_window: Duration::from_secs(if quick { 1 } else { 2 }),
            get_reps: if quick { 2 } else { 3 },
            exec_trips: if quick { 500 } else { 2000 },
            concurrent_streams: 100,
            concurrent_reps: 2,
            concurrent_bytes: 4 << 20,
            stalled: args.stalled,
            stalled_bytes: 4 << 30,
            wan: WanPlan {
                link: tether_tests::wan::WanSpec::new(
                    Duration::from_millis(args.wan_rtt_ms),
                    args.wan_rate_mbps.saturating_mul(1_000_000),
                ),
                bytes: if quick { 32 << 20 } else { 256 << 20 },
                runs: if quick { 1 } else { 2 },
                limit: Duration::from_secs(if quick { 20 } else { 60 }),
            },
            edges: args.edges.unwrap_or(if quick { 200 } else { 1000 }),
            // About 100 edges a second at worst, so the recorded 18,000-edge
            // run gets three minutes.
            edges_register: Duration::from_secs(
                (if quick { 45 } else { 90 }).max(args.edges.unwrap_or(0) as u64 / 100),
            ),
            sides: match args.side {
                None => Side::BOTH.to_vec(),
                Some(SideArg::Direct) => vec![Side::Direct],
                Some(SideArg::Tunnel) => vec![Side::Tunnel],
            },
            shared_runtime: args.shared_runtime,
            hub: hub::HubPlan::new(quick, args.hub_nodes, args.hub_msgs),
        }
    }

    fn wants(&self, figure: Figure) -> bool {
        self.only.is_empty() || self.only.contains(&figure)
    }

    fn measures(&self, side: Side) -> bool {
        self.sides.contains(&side)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("tb-main")
        .enable_all()
        .build()
        .context("build tokio runtime")?;
    let result = match cli.command {
        Some(Command::Edges(args)) => runtime.block_on(idle::run_edges(args)),
        Some(Command::IptablesSync(args)) => runtime.block_on(iptables::run_sync(args)),
        Some(Command::Role(args)) => runtime.block_on(memory::run_role(args)),
        None => runtime.block_on(run(cli.run)),
    };
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let limits = match &args.limits_json {
        Some(j) => serde_json::from_str::<TunnelLimits>(j).context("parse --limits-json")?,
        None => TunnelLimits::default(),
    };
    limits
        .validate()
        .map_err(|e| anyhow!("--limits-json: {e}"))?;
    let plan = Plan::new(&args);
    let machine = Machine::probe();
    let mut report = Report::default();
    report.put("quick", plan.quick);
    report.put("nproc", machine.nproc);
    report.put("cpu_model", machine.cpu_model.clone());
    report.put("kernel", machine.kernel.clone());
    report.num("mem_total_gib", machine.mem_total_gib);
    report.put("limits", serde_json::to_value(&limits)?);
    report.num("loadavg_1m_start", stats::loadavg());
    println!(
        "tether-bench ({} run): {} cpus ({}), kernel {}, {:.1} GiB, load {:.2}",
        if plan.quick { "quick" } else { "full" },
        machine.nproc,
        machine.cpu_model,
        machine.kernel,
        machine.mem_total_gib,
        stats::loadavg()
    );

    // First, while the heap is fresh: the memory figure runs its own cloud.
    if plan.wants(Figure::Idle) {
        figures::idle_sessions(&plan, &limits, &mut report).await?;
    }
    if plan.wants(Figure::Complete) {
        figures::complete_edges(&plan, &limits, &mut report).await?;
    }
    let rig_figures = [
        Figure::Logs,
        Figure::Stalled,
        Figure::SmallGet,
        Figure::Exec,
        Figure::Concurrent,
        Figure::Slowloris,
    ];
    if rig_figures.iter().any(|f| plan.wants(*f)) {
        let runtimes = Runtimes::new(args.shared_runtime)?;
        report.put("separate_runtimes", runtimes.separate());
        let edge_plain = args.edge_kubelet == EdgeKubelet::Http;
        report.put("edge_kubelet", if edge_plain { "http" } else { "https" });
        let rig = phase(
            "rig start",
            Duration::from_secs(30),
            Rig::start(
                &limits,
                runtimes,
                RigOptions {
                    edge_plain,
                    ..RigOptions::default()
                },
            ),
        )
        .await?;
        let result = figures::on_rig(&rig, &plan, &mut report).await;
        rig.stop().await;
        result?;
    }

    if plan.wants(Figure::Wan) {
        let runtimes = Runtimes::new(args.shared_runtime)?;
        let edge_plain = args.edge_kubelet == EdgeKubelet::Http;
        let rig = phase(
            "wan rig start",
            Duration::from_secs(30),
            Rig::start(
                &limits,
                runtimes,
                RigOptions {
                    edge_plain,
                    link: Some(plan.wan.link),
                    ..RigOptions::default()
                },
            ),
        )
        .await?;
        let result = figures::wan(&rig, &plan, &mut report).await;
        rig.stop().await;
        result?;
    }

    if plan.wants(Figure::KubeEdge) {
        kubeedge::figure(&plan, &limits, &mut report).await?;
    }

    if plan.wants(Figure::Memory) {
        figures::memory(&plan, &limits, &mut report).await?;
    }

    if plan.wants(Figure::Hub) {
        hub::figures(&plan, &mut report).await?;
        hub_replicas::figure(&plan, &mut report).await?;
    }

    if plan.wants(Figure::Iptables) {
        iptables::figure(&mut report).await?;
    }

    report.num("elapsed_s", started.elapsed().as_secs_f64());
    report.num("loadavg_1m_end", stats::loadavg());
    let targets = report.targets();
    let met = targets.iter().filter(|t| t.3).count();
    println!(
        "targets: {met} of {} met{}",
        targets.len(),
        targets
            .iter()
            .filter(|t| !t.3)
            .map(|(key, rule, x, _)| format!("; missed {key} = {x} (want {rule})"))
            .collect::<String>()
    );
    if args.json {
        println!("{}", serde_json::to_string(&report.to_json())?);
    }
    Ok(())
}
