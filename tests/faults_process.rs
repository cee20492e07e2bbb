//! Fault suite with real processes: a `tether cloud` and a `tether edge`
//! child, the fixture kubelet in this process, and clients on loopback.
//!
//! | fault                                  | cycles in CI | with `TETHER_FAULTS_SOAK` |
//! |----------------------------------------|--------------|---------------------------|
//! | edge kill -9 mid-stream                | 20           | 1,000                     |
//! | cloud restart under load               | 5            | 100                       |
//! | edge SIGSTOP past the keepalive timeout| 3            | 50                        |
//! | client hang-up mid-stream              | 200          | 10,000                    |
//!
//! (kubelet SIGSTOP: `faults_deadlines`; pre-auth starvation:
//! `faults_starvation`; link down: `faults_netns`; disk full: `hub_cli`.)
//!
//! After every cycle the invariants hold: each stream was byte-exact or
//! failed cleanly within its deadline; the cloud's session registry holds
//! exactly the edge; the open descriptors, resident memory and live tokio
//! tasks of both processes are back near their values before the first
//! cycle.

mod process;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use hyper::body::Incoming;
use tokio::process::Child;
use tokio::time::Instant;

use process::write;
use tether_tests::fixture::{FixtureKubelet, LogVerifier};
use tether_tests::harness::Pki;
use tether_tests::kubectl;

const NODE: &str = "edge-faults";
/// Deadline of one request or stream read in these tests; a stream that is
/// neither done nor failed by then is a hang.
const DEADLINE: Duration = Duration::from_secs(15);

fn cycles(ci: usize, soak: usize) -> usize {
    if std::env::var_os("TETHER_FAULTS_SOAK").is_some() {
        soak
    } else {
        ci
    }
}

/// A free loopback port (bound, then released: the processes bind it again
/// at each restart, so the port must stay the same).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// What a process holds, read from its admin `/metrics`.
#[derive(Clone, Copy, Debug)]
struct Usage {
    fds: f64,
    rss_mib: f64,
    tasks: f64,
}

/// Sum of the samples of `name` (any labels) in a text exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let v: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        *found.get_or_insert(0.0) += v;
    }
    found
}

struct Stack {
    dir: PathBuf,
    tls: Arc<rustls::ClientConfig>,
    kubelet: FixtureKubelet,
    tunnel: SocketAddr,
    front: SocketAddr,
    cloud_admin: SocketAddr,
    edge_admin: SocketAddr,
    files: Vec<String>,
    cloud: Option<Child>,
    edge: Option<Child>,
}

impl Stack {
    async fn start() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "tether-faults-{}-{}",
            std::process::id(),
            tether_pki::rand_u64()
        ));
        std::fs::create_dir_all(&dir)?;
        let pki = Pki::generate()?;
        let tunnel = pki
            .edge_ca
            .issue_server("tether-cloud", &["localhost", "127.0.0.1"])?;
        let front = pki
            .front_ca
            .issue_server("tether-cloud", &["localhost", "127.0.0.1"])?;
        let node = pki.edge_ca.issue_node_client(NODE, &[])?;
        let f = |n: &str, pem: &str| write(&dir, n, pem);
        let files = vec![
            f("edge-ca.crt", pki.edge_ca.cert_pem())?,
            f("front-ca.crt", pki.front_ca.cert_pem())?,
            f("tunnel.crt", &tunnel.cert_pem)?,
            f("tunnel.key", tunnel.key_pem.expose())?,
            f("front.crt", &front.cert_pem)?,
            f("front.key", front.key_pem.expose())?,
            f("node.crt", &node.cert_pem)?,
            f("node.key", node.key_pem.expose())?,
            // Keepalives fast enough that a stopped peer is noticed in seconds.
            f(
                "cloud.yaml",
                "drain_timeout_secs: 2\nlimits:\n  keepalive_interval: 1\n  keepalive_timeout: 3\n",
            )?,
            f(
                "edge.yaml",
                "drain_timeout_secs: 2\nbackoff_base_ms: 50\nbackoff_max_secs: 1\nlimits:\n  keepalive_interval: 1\n  keepalive_timeout: 3\n",
            )?,
        ];
        let mut stack = Self {
            dir,
            tls: pki.apiserver_tls()?,
            kubelet: FixtureKubelet::start(None).await?,
            tunnel: ([127, 0, 0, 1], free_port()?).into(),
            front: ([127, 0, 0, 1], free_port()?).into(),
            cloud_admin: ([127, 0, 0, 1], free_port()?).into(),
            edge_admin: ([127, 0, 0, 1], free_port()?).into(),
            files,
            cloud: None,
            edge: None,
        };
        stack.start_cloud().await?;
        stack.start_edge().await?;
        stack.wait_served().await?;
        Ok(stack)
    }

    async fn start_cloud(&mut self) -> anyhow::Result<()> {
        let f = &self.files;
        let (tunnel, front, admin) = (
            self.tunnel.to_string(),
            self.front.to_string(),
            self.cloud_admin.to_string(),
        );
        let role = process::spawn(
            &[],
            &[
                "cloud",
                "--config",
                &f[8],
                "--hub-addr",
                "127.0.0.1:0",
                "--tunnel-addr",
                &tunnel,
                "--front-addr",
                &front,
                "--admin-addr",
                &admin,
                "--tunnel-cert",
                &f[2],
                "--tunnel-key",
                &f[3],
                "--edge-ca",
                &f[0],
                "--front-cert",
                &f[4],
                "--front-key",
                &f[5],
                "--front-client-ca",
                &f[1],
            ],
            "cloud started",
        )
        .await?;
        self.cloud = Some(role.child);
        Ok(())
    }

    async fn start_edge(&mut self) -> anyhow::Result<()> {
        let f = &self.files;
        let (tunnel, admin, kubelet) = (
            self.tunnel.to_string(),
            self.edge_admin.to_string(),
            format!("http://{}", self.kubelet.addr),
        );
        let role = process::spawn(
            &[],
            &[
                "edge",
                "--config",
                &f[9],
                "--no-hub",
                "--node-name",
                NODE,
                "--cloud-addr",
                &tunnel,
                "--cloud-server-name",
                "localhost",
                "--ca",
                &f[0],
                "--cert",
                &f[6],
                "--key",
                &f[7],
                "--kubelet-url",
                &kubelet,
                "--admin-addr",
                &admin,
            ],
            "started",
        )
        .await?;
        self.edge = Some(role.child);
        Ok(())
    }

    fn signal(child: &Option<Child>, sig: &str) -> anyhow::Result<()> {
        let pid = child
            .as_ref()
            .and_then(Child::id)
            .context("process not running")?;
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?
            .success();
        ensure!(ok, "kill {sig} {pid} failed");
        Ok(())
    }

    /// Waits for a process that was signalled to end.
    async fn reap(child: &mut Option<Child>) -> anyhow::Result<()> {
        if let Some(mut c) = child.take() {
            tokio::time::timeout(Duration::from_secs(10), c.wait())
                .await
                .context("process did not exit")??;
        }
        Ok(())
    }

    /// Opens a front connection and sends `GET path`, streaming.
    async fn get(&self, path: &str) -> anyhow::Result<http::Response<Incoming>> {
        let tcp = tokio::net::TcpStream::connect(self.front).await?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp)
            .await?;
        kubectl::get_streaming(tls, NODE, path).await
    }

    /// `bytes` of log, checked byte by byte; Err when the stream failed.
    async fn logs_exact(&self, bytes: u64) -> anyhow::Result<()> {
        let mut resp = tokio::time::timeout(
            DEADLINE,
            self.get(&format!("/containerLogs/default/web/app?bytes={bytes}")),
        )
        .await
        .context("request hung")??;
        ensure!(resp.status() == 200, "status {}", resp.status());
        let mut check = LogVerifier::new(0);
        while let Some(chunk) = kubectl::next_chunk(resp.body_mut()).await? {
            check.update(&chunk)?;
        }
        ensure!(
            check.offset() == bytes,
            "short body: {} of {bytes}",
            check.offset()
        );
        Ok(())
    }

    /// Waits (bounded) until a request goes through end to end.
    async fn wait_served(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if self.logs_exact(4096).await.is_ok() {
                return Ok(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("no request went through within 20 s")
    }

    async fn metrics(&self, admin: SocketAddr) -> anyhow::Result<String> {
        let tcp = tokio::net::TcpStream::connect(admin).await?;
        let (parts, body) = kubectl::get(tcp, "admin", "/metrics").await?;
        ensure!(parts.status == 200, "/metrics answered {}", parts.status);
        Ok(String::from_utf8(body.to_vec())?)
    }

    async fn usage(&self, admin: SocketAddr) -> anyhow::Result<Usage> {
        let text = self.metrics(admin).await?;
        let get = |n| metric(&text, n).with_context(|| format!("no {n} at {admin}"));
        Ok(Usage {
            fds: get("process_open_fds")?,
            rss_mib: get("process_resident_memory_bytes")? / f64::from(1 << 20),
            tasks: get("tether_runtime_alive_tasks")?,
        })
    }

    async fn sessions(&self) -> anyhow::Result<f64> {
        let text = self.metrics(self.cloud_admin).await?;
        metric(&text, "tether_cloud_sessions").context("no tether_cloud_sessions")
    }

    /// The invariants after a cycle, waited for (bounded) since closing
    /// connections and ending tasks take a moment: one session, and both
    /// roles near their baselines.
    async fn settled(&self, base: &[(SocketAddr, Usage)], what: &str) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < Duration::from_secs(20) {
            match self.check(base).await {
                Ok(()) => return Ok(()),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{what}: invariants did not settle in 20 s: {last}")
    }

    async fn check(&self, base: &[(SocketAddr, Usage)]) -> anyhow::Result<()> {
        let sessions = self.sessions().await?;
        ensure!(sessions == 1.0, "{sessions} sessions registered, want 1");
        for (admin, b) in base {
            let u = self.usage(*admin).await?;
            ensure!(
                u.fds <= b.fds + 16.0,
                "{admin}: {} fds, {} before",
                u.fds,
                b.fds
            );
            ensure!(
                u.tasks <= b.tasks + 16.0,
                "{admin}: {} tasks, {} before",
                u.tasks,
                b.tasks
            );
            ensure!(
                u.rss_mib <= 2.0 * b.rss_mib + 32.0,
                "{admin}: {:.1} MiB resident, {:.1} before",
                u.rss_mib,
                b.rss_mib
            );
        }
        Ok(())
    }

    async fn baseline(&self, admins: &[SocketAddr]) -> anyhow::Result<Vec<(SocketAddr, Usage)>> {
        // Warm both roles first, so that pools and lazy state count as idle.
        for _ in 0..4 {
            self.logs_exact(256 << 10).await?;
        }
        let mut out = Vec::new();
        for a in admins {
            out.push((*a, self.usage(*a).await?));
        }
        println!("baseline: {out:?}");
        Ok(out)
    }

    async fn stop(mut self) {
        let _ = Self::signal(&self.edge, "-TERM");
        let _ = Self::signal(&self.cloud, "-TERM");
        let _ = Self::reap(&mut self.edge).await;
        let _ = Self::reap(&mut self.cloud).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads `resp` to its end, checking each byte; Ok(bytes) when it ended
/// cleanly, Err when it failed. Either way within [`DEADLINE`].
async fn drain_checked(
    mut resp: http::Response<Incoming>,
    mut check: LogVerifier,
) -> anyhow::Result<u64> {
    tokio::time::timeout(DEADLINE, async {
        while let Some(chunk) = kubectl::next_chunk(resp.body_mut()).await? {
            check
                .update(&chunk)
                .map_err(|e| anyhow::anyhow!("CORRUPT: {e}"))?;
        }
        anyhow::Ok(check.offset())
    })
    .await
    .context("HUNG: stream neither ended nor failed")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_edge_kill9_mid_stream() {
    process::bounded(Duration::from_secs(600), async {
        let mut s = Stack::start().await?;
        let base = s.baseline(&[s.cloud_admin]).await?;
        let n = cycles(20, 1000);
        let mut worst = Duration::ZERO;
        for cycle in 0..n {
            let total = 64u64 << 20;
            let mut resp = s
                .get(&format!("/containerLogs/default/web/app?bytes={total}"))
                .await?;
            ensure!(resp.status() == 200, "status {}", resp.status());
            let first = kubectl::next_chunk(resp.body_mut())
                .await?
                .context("no first chunk")?;
            Stack::signal(&s.edge, "-KILL")?;
            Stack::reap(&mut s.edge).await?;
            let mut check = LogVerifier::new(0);
            check.update(&first)?;
            let rest = drain_checked(resp, check).await;
            match rest {
                Err(e)
                    if format!("{e:#}").contains("CORRUPT")
                        || format!("{e:#}").contains("HUNG") =>
                {
                    bail!("cycle {cycle}: {e:#}")
                }
                Ok(got) if got == total => {
                    bail!("cycle {cycle}: the whole 64 MiB arrived although the edge was killed")
                }
                _ => {}
            }
            s.start_edge().await?;
            worst = worst.max(s.wait_served().await?);
            s.logs_exact(1 << 20).await?;
            s.settled(&base, &format!("edge kill cycle {cycle}"))
                .await?;
        }
        println!("edge kill -9: {n} cycles, slowest return to service {worst:?}");
        s.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_cloud_restart_under_load() {
    process::bounded(Duration::from_secs(900), async {
        let mut s = Stack::start().await?;
        let base = s.baseline(&[s.edge_admin]).await?;
        let n = cycles(5, 100);
        for cycle in 0..n {
            // Load: 8 clients downloading 1 MiB logs back to back.
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let mut load = Vec::new();
            for _ in 0..8 {
                let (tls, front) = (s.tls.clone(), s.front);
                let mut stop = stop_rx.clone();
                load.push(tokio::spawn(async move {
                    let (mut ok, mut failed) = (0u32, 0u32);
                    while !*stop.borrow_and_update() {
                        let r = async {
                            let tcp = tokio::net::TcpStream::connect(front).await?;
                            let tls = tokio_rustls::TlsConnector::from(tls.clone())
                                .connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp)
                                .await?;
                            let resp = tokio::time::timeout(
                                DEADLINE,
                                kubectl::get_streaming(tls, NODE, "/containerLogs/default/web/app?bytes=1048576"),
                            )
                            .await
                            .context("HUNG: no response head")??;
                            if resp.status() != 200 {
                                // No session during the restart: a clean refusal.
                                bail!("status {}", resp.status());
                            }
                            let got = drain_checked(resp, LogVerifier::new(0)).await?;
                            ensure!(got == 1 << 20, "short: {got}");
                            anyhow::Ok(())
                        }
                        .await;
                        match r {
                            Ok(()) => ok += 1,
                            Err(e) => {
                                let e = format!("{e:#}");
                                if e.contains("CORRUPT") || e.contains("HUNG") {
                                    return Err(anyhow::anyhow!(e));
                                }
                                failed += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                    Ok((ok, failed))
                }));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            // Alternate a graceful restart and a crash.
            let sig = if cycle % 2 == 0 { "-TERM" } else { "-KILL" };
            Stack::signal(&s.cloud, sig)?;
            Stack::reap(&mut s.cloud).await?;
            s.start_cloud().await?;
            let back = s.wait_served().await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            stop_tx.send(true)?;
            let (mut ok, mut failed) = (0, 0);
            for l in load {
                let (o, f) = l.await??;
                ok += o;
                failed += f;
            }
            println!("cloud restart {cycle} ({sig}): edge back in {back:?}; requests ok {ok}, cleanly failed {failed}");
            s.settled(&base, &format!("cloud restart cycle {cycle}")).await?;
        }
        s.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_edge_sigstop_past_keepalive() {
    process::bounded(Duration::from_secs(600), async {
        let s = Stack::start().await?;
        let base = s.baseline(&[s.cloud_admin, s.edge_admin]).await?;
        let n = cycles(3, 50);
        for cycle in 0..n {
            Stack::signal(&s.edge, "-STOP")?;
            let stopped = Instant::now();
            // The cloud notices the silent edge after its keepalive timeout (3 s).
            let mut gone = None;
            while stopped.elapsed() < Duration::from_secs(15) {
                if s.sessions().await? == 0.0 {
                    gone = Some(stopped.elapsed());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let gone = gone.with_context(|| format!("cycle {cycle}: the stopped edge's session stayed registered"))?;
            // A request meanwhile is refused at once, not left waiting.
            let asked = Instant::now();
            let resp = tokio::time::timeout(Duration::from_secs(5), s.get("/healthz"))
                .await
                .context("request to a stopped edge hung")??;
            ensure!(resp.status().is_client_error() || resp.status().is_server_error(), "stopped edge answered {}", resp.status());
            let refused = asked.elapsed();
            Stack::signal(&s.edge, "-CONT")?;
            let back = s.wait_served().await?;
            println!("edge SIGSTOP {cycle}: session dropped after {gone:?}, refusal in {refused:?}, back {back:?} after SIGCONT");
            s.settled(&base, &format!("edge SIGSTOP cycle {cycle}")).await?;
        }
        s.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_client_hangup_mid_stream() {
    process::bounded(Duration::from_secs(900), async {
        let s = Stack::start().await?;
        let base = s.baseline(&[s.cloud_admin, s.edge_admin]).await?;
        let n = cycles(200, 10_000);
        let before = s.kubelet.follow_disconnects();
        for cycle in 0..n {
            // Alternate a `follow` stream and a large download; hang up
            // after the first chunk.
            let path = if cycle % 2 == 0 {
                "/containerLogs/default/web/app?follow=true&bytes=1024"
            } else {
                "/containerLogs/default/web/app?bytes=67108864"
            };
            let mut resp = s.get(path).await?;
            ensure!(
                resp.status() == 200,
                "cycle {cycle}: status {}",
                resp.status()
            );
            kubectl::next_chunk(resp.body_mut())
                .await?
                .context("no first chunk")?;
            drop(resp);
        }
        // Every follow stream's hang-up reached the kubelet.
        let follows = (n as u64).div_ceil(2);
        let started = Instant::now();
        while s.kubelet.follow_disconnects() - before < follows {
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "{} of {follows} hang-ups reached the kubelet",
                s.kubelet.follow_disconnects() - before
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s.settled(&base, "client hang-ups").await?;
        s.logs_exact(1 << 20).await?;
        println!("client hang-up: {n} streams, all ended at the kubelet");
        s.stop().await;
        Ok(())
    })
    .await;
}
