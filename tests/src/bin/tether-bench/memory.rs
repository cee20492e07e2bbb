//! Memory under load and given back (figure 7, issue 11 item 10). The cloud and
//! the edge each run in a child process (this binary again, hidden `role`
//! subcommand) so each role's RSS is its own; the fixture kubelet and the
//! client stay in this process.
//!
//! Sequence: both roles idle (settled RSS = the idle baseline); 100 concurrent
//! 4 MiB log streams through the tunnel (the edge's VmHWM afterwards is its
//! peak); then `max_streams` stalled log streams held until the roles' RSS
//! settles (the cloud's VmHWM is its peak); then every connection closes, and
//! 30 s later both roles' RSS is read again. `rss_after_load_ratio` is the worse
//! of the two roles' after/idle quotients.
//!
//! Control protocol with a child: it prints `ready [tunnel front]` once serving;
//! each `rss` line on its stdin is answered with `rss <VmRSS KiB> <VmHWM KiB>`;
//! EOF on stdin ends it.

use std::io::{BufRead as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;

use tether_pki::Ca;
use tether_tests::fixture::FixtureKubelet;
use tether_tests::harness::{CLOUD_NAME, CloudHandle, CloudSpec, EdgeHandle, EdgeSpec, Pki};
use tether_tests::kubectl;
use tether_tunnel::TunnelLimits;

use crate::idle::TempDir;

/// The node the edge child serves.
const NODE: &str = "mem-node";
/// Deadline for each exchange with a child.
const CHILD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after the load the RSS is read again (the bound).
pub(crate) const AFTER_LOAD: Duration = Duration::from_secs(30);
/// How long stalled streams get to fill every buffer on their way.
const STALL_FILL_MAX: Duration = Duration::from_secs(8);
const STEP: Duration = Duration::from_millis(250);

/// Arguments of the hidden `role` subcommand.
#[derive(clap::Args, Debug)]
pub(crate) struct RoleArgs {
    /// `cloud` or `edge`.
    #[arg(long)]
    role: String,
    /// Directory holding the CA PEM files.
    #[arg(long)]
    pki_dir: PathBuf,
    /// Edge only: the cloud's tunnel address.
    #[arg(long)]
    tunnel: Option<SocketAddr>,
    /// Edge only: the fixture kubelet (plain HTTP).
    #[arg(long)]
    kubelet: Option<SocketAddr>,
    /// Tunnel limits as JSON.
    #[arg(long)]
    limits_json: String,
}

/// What figure 7 measured, in KiB.
#[derive(Debug, Default)]
pub(crate) struct MemoryReport {
    pub(crate) streams: usize,
    pub(crate) streams_ok: usize,
    pub(crate) stream_bytes: u64,
    pub(crate) stalled: usize,
    pub(crate) edge_idle: u64,
    pub(crate) cloud_idle: u64,
    pub(crate) edge_peak: u64,
    pub(crate) cloud_peak: u64,
    pub(crate) edge_after: u64,
    pub(crate) cloud_after: u64,
}

/// VmRSS and VmHWM of this process, KiB.
fn rss_hwm_kib() -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} line in /proc/self/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// A child role; dropping it kills the child.
struct RoleChild {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl RoleChild {
    async fn spawn(args: &[String]) -> anyhow::Result<(Self, String)> {
        let exe = std::env::current_exe().context("locate own executable")?;
        let mut child = Command::new(exe)
            .arg("role")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("spawn role child")?;
        let stdout = child.stdout.take().context("role child stdout")?;
        let mut me = Self {
            child,
            lines: BufReader::new(stdout).lines(),
        };
        let ready = me.line("ready").await?;
        Ok((me, ready))
    }

    async fn line(&mut self, tag: &str) -> anyhow::Result<String> {
        let line = tokio::time::timeout(CHILD_TIMEOUT * 2, self.lines.next_line())
            .await
            .with_context(|| format!("role child silent, waiting for {tag:?}"))?
            .context("read role child stdout")?
            .with_context(|| format!("role child exited before {tag:?}"))?;
        line.strip_prefix(tag)
            .map(|rest| rest.trim().to_owned())
            .with_context(|| format!("unexpected line from role child: {line:?}"))
    }

    /// (VmRSS, VmHWM) in KiB.
    async fn rss(&mut self) -> anyhow::Result<(u64, u64)> {
        let stdin = self.child.stdin.as_mut().context("role child stdin")?;
        stdin.write_all(b"rss\n").await.context("ask role child")?;
        stdin.flush().await.context("ask role child")?;
        let line = self.line("rss").await?;
        let mut it = line.split_whitespace().map(str::parse::<u64>);
        match (it.next(), it.next()) {
            (Some(Ok(rss)), Some(Ok(hwm))) => Ok((rss, hwm)),
            _ => bail!("bad rss line {line:?}"),
        }
    }

    /// RSS once two readings `STEP` apart agree within 1% (at most `max`).
    async fn settled(&mut self, max: Duration) -> anyhow::Result<u64> {
        let (mut last, _) = self.rss().await?;
        let deadline = Instant::now() + max;
        while Instant::now() < deadline {
            tokio::time::sleep(STEP).await;
            let (now, _) = self.rss().await?;
            if now.abs_diff(last) * 100 <= last {
                return Ok(now);
            }
            last = now;
        }
        Ok(last)
    }

    async fn stop(mut self) {
        drop(self.child.stdin.take());
        if tokio::time::timeout(CHILD_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

fn write_pem(dir: &Path, name: &str, pem: &str) -> anyhow::Result<()> {
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(pem.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

fn load_pki(dir: &Path) -> anyhow::Result<Pki> {
    let read = |n: &str| {
        let p = dir.join(n);
        std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))
    };
    Ok(Pki {
        edge_ca: Ca::from_pem(&read("edge.pem")?, &read("edge-key.pem")?)?,
        front_ca: Ca::from_pem(&read("front.pem")?, &read("front-key.pem")?)?,
    })
}

/// Runs figure 7 with `streams` concurrent streams of `bytes` each.
pub(crate) async fn memory_figure(
    limits: &TunnelLimits,
    streams: usize,
    bytes: u64,
) -> anyhow::Result<MemoryReport> {
    let pki = Pki::generate().context("generate pki")?;
    let dir =
        TempDir(std::env::temp_dir().join(format!("tether-bench-mem-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("create {}", dir.0.display()))?;
    write_pem(&dir.0, "edge.pem", pki.edge_ca.cert_pem())?;
    write_pem(&dir.0, "edge-key.pem", pki.edge_ca.key_pem().expose())?;
    write_pem(&dir.0, "front.pem", pki.front_ca.cert_pem())?;
    write_pem(&dir.0, "front-key.pem", pki.front_ca.key_pem().expose())?;
    let fixture = FixtureKubelet::start(None)
        .await
        .context("start fixture kubelet")?;
    let limits_json = serde_json::to_string(limits)?;
    let common = |role: &str| {
        vec![
            "--role".to_owned(),
            role.to_owned(),
            "--pki-dir".to_owned(),
            dir.0.display().to_string(),
            "--limits-json".to_owned(),
            limits_json.clone(),
        ]
    };
    let (mut cloud, ready) = RoleChild::spawn(&common("cloud")).await?;
    let mut addrs = ready.split_whitespace().map(str::parse::<SocketAddr>);
    let (Some(Ok(tunnel)), Some(Ok(front))) = (addrs.next(), addrs.next()) else {
        bail!("bad ready line from cloud child: {ready:?}");
    };
    let mut args = common("edge");
    args.extend([
        "--tunnel".to_owned(),
        tunnel.to_string(),
        "--kubelet".to_owned(),
        fixture.addr.to_string(),
    ]);
    let (mut edge, _) = RoleChild::spawn(&args).await?;
    let client = Client {
        front,
        tls: pki.apiserver_tls()?,
    };
    let result = measure(&client, &mut cloud, &mut edge, limits, streams, bytes).await;
    edge.stop().await;
    cloud.stop().await;
    drop(fixture);
    result
}

/// Opens client connections to the front.
struct Client {
    front: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
}

impl Client {
    async fn connect(&self) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.front)
            .await
            .context("connect front")?;
        tcp.set_nodelay(true)?;
        let io = TlsConnector::from(self.tls.clone())
            .connect(ServerName::try_from(CLOUD_NAME)?, tcp)
            .await
            .context("tls with front")?;
        Ok(io)
    }

    /// One log stream of `bytes`, drained; Ok(true) if every byte arrived.
    async fn logs(&self, pod: &str, bytes: u64) -> anyhow::Result<bool> {
        let io = self.connect().await?;
        let path = format!("/containerLogs/default/{pod}/app?bytes={bytes}");
        let resp = kubectl::get_streaming(io, NODE, &path).await?;
        if resp.status() != 200 {
            return Ok(false);
        }
        let mut body = resp.into_body();
        let mut n = 0u64;
        while let Some(c) = kubectl::next_chunk(&mut body).await? {
            n += c.len() as u64;
        }
        Ok(n == bytes)
    }
}

async fn measure(
    client: &Client,
    cloud: &mut RoleChild,
    edge: &mut RoleChild,
    limits: &TunnelLimits,
    streams: usize,
    bytes: u64,
) -> anyhow::Result<MemoryReport> {
    // The edge connects on its own; a small stream through it proves it has.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if matches!(client.logs("warm", 4096).await, Ok(true)) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "edge child never served a stream"
        );
        tokio::time::sleep(STEP).await;
    }
    // Warm every lazy path once (pools, TLS sessions), then the baseline.
    for _ in 0..4 {
        client.logs("warm", 1 << 20).await?;
    }
    let mut r = MemoryReport {
        streams,
        stream_bytes: bytes,
        edge_idle: edge.settled(Duration::from_secs(3)).await?,
        cloud_idle: cloud.settled(Duration::from_secs(3)).await?,
        ..MemoryReport::default()
    };

    // Load 1: concurrent streams; connections first, then every request at once.
    let mut set = JoinSet::new();
    let client = Arc::new(Client {
        front: client.front,
        tls: client.tls.clone(),
    });
    for i in 0..streams {
        let c = client.clone();
        set.spawn(async move { c.logs(&format!("c{i}"), bytes).await });
    }
    while let Some(done) = set.join_next().await {
        if matches!(done, Ok(Ok(true))) {
            r.streams_ok += 1;
        }
    }
    r.edge_peak = edge.rss().await?.1;

    // Load 2: stalled streams, one chunk read each, then never again.
    let mut held = Vec::new();
    for i in 0..limits.max_streams as usize {
        let io = client.connect().await?;
        let path = format!("/containerLogs/default/s{i}/app?bytes={}", 4u64 << 30);
        let resp = kubectl::get_streaming(io, NODE, &path).await?;
        if resp.status() != 200 {
            break;
        }
        let mut body = resp.into_body();
        if kubectl::next_chunk(&mut body).await?.is_none() {
            break;
        }
        held.push(body);
    }
    r.stalled = held.len();
    cloud.settled(STALL_FILL_MAX).await?;
    edge.settled(STEP * 4).await?;
    r.cloud_peak = cloud.rss().await?.1;
    r.edge_peak = r.edge_peak.max(edge.rss().await?.1);
    drop(held);

    // Load over: every connection is closed; wait, then read both roles.
    tokio::time::sleep(AFTER_LOAD).await;
    r.edge_after = edge.rss().await?.0;
    r.cloud_after = cloud.rss().await?.0;
    Ok(r)
}

/// The child: runs one role until its stdin closes.
pub(crate) async fn run_role(args: RoleArgs) -> anyhow::Result<()> {
    let pki = load_pki(&args.pki_dir)?;
    let limits: TunnelLimits =
        serde_json::from_str(&args.limits_json).context("parse --limits-json")?;
    let mut keep: (Option<CloudHandle>, Option<EdgeHandle>) = (None, None);
    // As `tether cloud` and `tether edge` do (ADR 0015).
    tether_metrics_adapter::spawn_heap_trimmer();
    match args.role.as_str() {
        "cloud" => {
            let cloud = CloudHandle::start(
                &pki,
                CloudSpec {
                    limits: Some(limits),
                    ..CloudSpec::default()
                },
            )
            .await
            .context("start cloud")?;
            println!("ready {} {}", cloud.tunnel_addr, cloud.front_addr);
            keep.0 = Some(cloud);
        }
        "edge" => {
            let kubelet = args.kubelet.context("--kubelet")?;
            let tunnel = args.tunnel.context("--tunnel")?;
            let mut spec = EdgeSpec::new(NODE, kubelet);
            spec.kubelet_url = format!("http://{kubelet}");
            spec.limits = Some(limits);
            keep.1 = Some(EdgeHandle::start(&pki, tunnel, spec).context("start edge")?);
            println!("ready");
        }
        other => bail!("unknown role {other:?}"),
    }
    std::io::stdout().flush()?;
    tokio::task::spawn_blocking(|| -> anyhow::Result<()> {
        for line in std::io::stdin().lock().lines() {
            if line.context("read stdin")?.trim() == "rss" {
                let (rss, hwm) = rss_hwm_kib()?;
                println!("rss {rss} {hwm}");
            }
        }
        Ok(())
    })
    .await
    .context("stdin task")??;
    drop(keep);
    Ok(())
}
