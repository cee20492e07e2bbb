//! Idle session memory (figure 6). A fresh cloud runs in this process; a child
//! process (this binary again, hidden `edges` subcommand) runs the idle edge agents,
//! so only the cloud's side of each session shows in this process's RSS. The child
//! measures its own RSS too, which gives the edge side's cost per session.
//!
//! Control protocol with the child: it prints `base <KiB>` before starting any edge;
//! each `rss` line on its stdin is answered with `rss <KiB>`; EOF on stdin ends it.

use std::io::{BufRead as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use tether_edgehub::hub::{EdgeHub, EdgeHubConfig};
use tether_hub::{HubMetrics, Store};
use tether_pki::Ca;
use tether_tests::fixture::FixtureKubelet;
use tether_tests::harness::{CloudHandle, CloudSpec, EdgeHandle, EdgeSpec, Pki};
use tether_tunnel::TunnelLimits;

use crate::stats::rss_kib;

/// Edges started per batch in the child, and the pause between batches, so a
/// thousand TLS handshakes do not all land at once.
const BATCH: usize = 50;
const BATCH_PAUSE: Duration = Duration::from_millis(20);
/// How long the allocator and the sessions' first keepalives get to settle.
const SETTLE_MAX: Duration = Duration::from_secs(3);
const SETTLE_STEP: Duration = Duration::from_millis(250);
/// Deadline for each exchange with the child and for stopping it.
const CHILD_TIMEOUT: Duration = Duration::from_secs(10);

/// Arguments of the hidden `edges` subcommand.
#[derive(clap::Args, Debug)]
pub(crate) struct EdgesArgs {
    /// Number of idle edge agents (`idle-0` ...).
    #[arg(long)]
    count: usize,
    /// The cloud's tunnel address.
    #[arg(long)]
    tunnel: SocketAddr,
    /// Edge CA certificate (PEM).
    #[arg(long)]
    ca_cert: PathBuf,
    /// Edge CA key (PEM).
    #[arg(long)]
    ca_key: PathBuf,
    /// Tunnel limits as JSON.
    #[arg(long)]
    limits_json: String,
    /// Each edge also runs a message hub, carried in its tunnel.
    #[arg(long)]
    hub: bool,
    /// Reconnect with the agent's backoff (500 ms to 30 s) instead of the
    /// test harness's quick one.
    #[arg(long)]
    agent_backoff: bool,
}

/// What the child's edges run besides the tunnel.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ChildOptions {
    /// A message hub per edge, in its tunnel (complete edges).
    pub(crate) hub: bool,
    /// The agent's own reconnect backoff.
    pub(crate) agent_backoff: bool,
}

/// What figure 6 measured.
#[derive(Debug)]
pub(crate) struct IdleReport {
    pub(crate) wanted: usize,
    pub(crate) connected: usize,
    pub(crate) cloud_before_kib: u64,
    pub(crate) cloud_after_kib: u64,
    pub(crate) edge_before_kib: u64,
    pub(crate) edge_after_kib: u64,
}

impl IdleReport {
    /// Cloud-side ΔRSS per connected session, KiB.
    pub(crate) fn cloud_per_session_kib(&self) -> f64 {
        per_session(self.cloud_before_kib, self.cloud_after_kib, self.connected)
    }

    /// Edge-side ΔRSS per connected session, KiB.
    pub(crate) fn edge_per_session_kib(&self) -> f64 {
        per_session(self.edge_before_kib, self.edge_after_kib, self.connected)
    }
}

fn per_session(before: u64, after: u64, sessions: usize) -> f64 {
    if sessions == 0 {
        return 0.0;
    }
    after.saturating_sub(before) as f64 / sessions as f64
}

/// Removes the directory (the CA key here, the hub's stores in
/// [`crate::hub`]) when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

/// The child and its stdout; dropping it kills the child.
pub(crate) struct EdgeChild {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    _dir: TempDir,
}

impl EdgeChild {
    /// Waits for the next `<tag> <KiB>` line.
    pub(crate) async fn read_kib(&mut self, tag: &str) -> anyhow::Result<u64> {
        let line = tokio::time::timeout(CHILD_TIMEOUT, self.lines.next_line())
            .await
            .with_context(|| format!("edge child silent, waiting for {tag:?}"))?
            .context("read edge child stdout")?
            .with_context(|| format!("edge child exited before {tag:?}"))?;
        line.strip_prefix(tag)
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("unexpected line from edge child: {line:?}"))
    }

    pub(crate) async fn rss(&mut self) -> anyhow::Result<u64> {
        let stdin = self.child.stdin.as_mut().context("edge child stdin")?;
        stdin.write_all(b"rss\n").await.context("ask edge child")?;
        stdin.flush().await.context("ask edge child")?;
        self.read_kib("rss").await
    }

    /// Closes its stdin (it exits on EOF) and kills it if it lingers.
    pub(crate) async fn stop(mut self) {
        drop(self.child.stdin.take());
        if tokio::time::timeout(CHILD_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Polls this process's RSS until two readings agree within 1% (bounded).
pub(crate) async fn settled_rss() -> anyhow::Result<u64> {
    let mut last = rss_kib()?;
    let mut waited = Duration::ZERO;
    while waited < SETTLE_MAX {
        tokio::time::sleep(SETTLE_STEP).await;
        waited += SETTLE_STEP;
        let now = rss_kib()?;
        if now.abs_diff(last) * 100 <= last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

/// Runs figure 6: `count` idle sessions against a fresh cloud.
pub(crate) async fn idle_memory(
    count: usize,
    limits: &TunnelLimits,
    register_timeout: Duration,
) -> anyhow::Result<IdleReport> {
    ensure!(count > 0, "idle session count must be at least 1");
    let pki = Pki::generate().context("generate pki")?;
    let cloud = CloudHandle::start(
        &pki,
        CloudSpec {
            limits: Some(limits.clone()),
            ..CloudSpec::default()
        },
    )
    .await
    .context("start cloud")?;
    let result = measure(&pki, &cloud, count, limits, register_timeout).await;
    let _ = tokio::time::timeout(CHILD_TIMEOUT, cloud.stop()).await;
    result
}

async fn measure(
    pki: &Pki,
    cloud: &CloudHandle,
    count: usize,
    limits: &TunnelLimits,
    register_timeout: Duration,
) -> anyhow::Result<IdleReport> {
    // Warm-up: one session in this process initialises everything lazy on the
    // cloud's session path; then back to zero sessions before the baseline.
    let fixture = FixtureKubelet::start(None)
        .await
        .context("start fixture kubelet")?;
    let mut spec = EdgeSpec::new("idle-warmup", fixture.addr);
    spec.limits = Some(limits.clone());
    let warm = EdgeHandle::start(pki, cloud.tunnel_addr, spec).context("start warm-up edge")?;
    cloud
        .registry
        .wait_for_node("idle-warmup", None, CHILD_TIMEOUT)
        .await
        .context("warm-up edge did not connect")?;
    tokio::time::timeout(CHILD_TIMEOUT, warm.stop())
        .await
        .context("warm-up edge did not stop")?;
    ensure!(
        cloud
            .registry
            .wait_until(CHILD_TIMEOUT, |r| r.is_empty())
            .await,
        "warm-up session never left the registry"
    );
    drop(fixture);
    let cloud_before_kib = settled_rss().await?;
    let mut child = spawn_child(
        pki,
        count,
        cloud.tunnel_addr,
        limits,
        ChildOptions::default(),
    )
    .await?;

    let result = async {
        let edge_before_kib = child.read_kib("base").await?;
        cloud
            .registry
            .wait_until(register_timeout, |r| r.len() >= count)
            .await;
        let connected = cloud.registry.len();
        if connected == 0 {
            bail!("no idle edge connected within {register_timeout:?}");
        }
        let cloud_after_kib = settled_rss().await?;
        let edge_after_kib = child.rss().await?;
        Ok(IdleReport {
            wanted: count,
            connected,
            cloud_before_kib,
            cloud_after_kib,
            edge_before_kib,
            edge_after_kib,
        })
    }
    .await;
    child.stop().await;
    result
}

/// Starts the child with `count` edges dialing `tunnel`, signed by the
/// PKI's edge CA (handed over in a private temporary directory).
pub(crate) async fn spawn_child(
    pki: &Pki,
    count: usize,
    tunnel: SocketAddr,
    limits: &TunnelLimits,
    opts: ChildOptions,
) -> anyhow::Result<EdgeChild> {
    let dir = TempDir(std::env::temp_dir().join(format!(
        "tether-bench-{}-{}",
        std::process::id(),
        tether_pki::rand_u64()
    )));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("create {}", dir.0.display()))?;
    let ca_cert = dir.0.join("edge-ca.pem");
    let ca_key = dir.0.join("edge-ca-key.pem");
    write_private(&ca_cert, pki.edge_ca.cert_pem())?;
    write_private(&ca_key, pki.edge_ca.key_pem().expose())?;
    let exe = std::env::current_exe().context("locate own executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("edges")
        .arg("--count")
        .arg(count.to_string())
        .arg("--tunnel")
        .arg(tunnel.to_string())
        .arg("--ca-cert")
        .arg(&ca_cert)
        .arg("--ca-key")
        .arg(&ca_key)
        .arg("--limits-json")
        .arg(serde_json::to_string(limits)?);
    if opts.hub {
        cmd.arg("--hub");
    }
    if opts.agent_backoff {
        cmd.arg("--agent-backoff");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("spawn edge child")?;
    let stdout = child.stdout.take().context("edge child stdout")?;
    Ok(EdgeChild {
        child,
        lines: BufReader::new(stdout).lines(),
        _dir: dir,
    })
}

/// The child: runs `count` idle edge agents until its stdin closes.
pub(crate) async fn run_edges(args: EdgesArgs) -> anyhow::Result<()> {
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()));
    let edge_ca =
        Ca::from_pem(&read(&args.ca_cert)?, &read(&args.ca_key)?).context("load edge CA")?;
    let pki = Pki {
        edge_ca,
        // Unused by edges; only the field has to exist.
        front_ca: Ca::generate("unused").context("generate placeholder CA")?,
    };
    let limits: TunnelLimits =
        serde_json::from_str(&args.limits_json).context("parse --limits-json")?;
    // Idle edges never call their kubelet; it only has to exist.
    let fixture = FixtureKubelet::start(None)
        .await
        .context("start fixture kubelet")?;
    println!("base {}", rss_kib()?);

    // One store for every edge's hub here: a store has a writer thread, and
    // 18,000 of them exceed the process's thread limit. These edges send
    // no messages, so sharing changes nothing the cloud sees; a real edge
    // keeps its own store on its own machine.
    let store = args.hub.then(Store::in_memory);
    let mut edges = Vec::with_capacity(args.count);
    for i in 0..args.count {
        let mut spec = EdgeSpec::new(&format!("idle-{i}"), fixture.addr);
        spec.limits = Some(limits.clone());
        if let Some(store) = &store {
            spec.hub = Some(EdgeHub::new(
                EdgeHubConfig::default(),
                store.clone(),
                HubMetrics::default(),
            )?);
        }
        if args.agent_backoff {
            spec.backoff = Some((Duration::from_millis(500), Duration::from_secs(30)));
        }
        edges.push(EdgeHandle::start(&pki, args.tunnel, spec).context("start edge")?);
        if i % BATCH == BATCH - 1 {
            tokio::time::sleep(BATCH_PAUSE).await;
        }
    }

    // std's stdin on a blocking thread: the runtime keeps driving the edges.
    tokio::task::spawn_blocking(|| -> anyhow::Result<()> {
        for line in std::io::stdin().lock().lines() {
            if line.context("read stdin")?.trim() == "rss" {
                println!("rss {}", rss_kib()?);
            }
        }
        Ok(())
    })
    .await
    .context("stdin task")??;
    drop(edges);
    Ok(())
}
