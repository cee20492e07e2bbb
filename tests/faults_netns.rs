//! Fault suite: the link between cloud and edge goes down, inside two
//! network namespaces this test creates (cloud in one, edge and its fixture
//! kubelet in the other, joined by a veth pair). Clients are real curl in
//! the cloud's namespace. Needs root; skips, saying why, otherwise.
//!
//! Cycles alternate a short outage (300 ms, which TCP rides out) and one
//! past the keepalive timeout (4 s against 3 s, which ends the session):
//! 10 in CI, 500 with `TETHER_FAULTS_SOAK` set. During each outage a log
//! `follow` stream is in flight: a short outage must not cut it, a long one
//! must end it cleanly (never hang it); every byte it got must be right. After each cycle a
//! new request is byte-exact, the cloud holds one session, and both
//! processes' descriptors, memory and tasks are back near their baselines.

mod process;

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use process::{Role, write};
use tether_tests::fixture::LogVerifier;
use tether_tests::harness::Pki;

const NODE: &str = "edge-netns";
const CLOUD_IP: &str = "10.78.0.1";
const EDGE_IP: &str = "10.78.0.2";

fn cycles(ci: usize, soak: usize) -> usize {
    if std::env::var_os("TETHER_FAULTS_SOAK").is_some() {
        soak
    } else {
        ci
    }
}

async fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(args[0])
        .args(&args[1..])
        .kill_on_drop(true)
        .output()
        .await?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Two namespaces joined by a veth pair, deleted on drop.
struct Pair {
    cloud: String,
    edge: String,
}

impl Pair {
    async fn new() -> anyhow::Result<Self> {
        let id = format!(
            "{}-{}",
            std::process::id(),
            tether_pki::rand_u64() % 100_000
        );
        let p = Self {
            cloud: format!("tether-fc-{id}"),
            edge: format!("tether-fe-{id}"),
        };
        for ns in [&p.cloud, &p.edge] {
            sh(&["ip", "netns", "add", ns]).await?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]).await?;
        }
        sh(&[
            "ip", "-n", &p.cloud, "link", "add", "fltc", "type", "veth", "peer", "name", "flte",
            "netns", &p.edge,
        ])
        .await?;
        sh(&[
            "ip",
            "-n",
            &p.cloud,
            "addr",
            "add",
            &format!("{CLOUD_IP}/24"),
            "dev",
            "fltc",
        ])
        .await?;
        sh(&[
            "ip",
            "-n",
            &p.edge,
            "addr",
            "add",
            &format!("{EDGE_IP}/24"),
            "dev",
            "flte",
        ])
        .await?;
        sh(&["ip", "-n", &p.cloud, "link", "set", "fltc", "up"]).await?;
        sh(&["ip", "-n", &p.edge, "link", "set", "flte", "up"]).await?;
        Ok(p)
    }

    fn exec<'a>(&'a self, ns: &'a str) -> [&'a str; 4] {
        ["ip", "netns", "exec", ns]
    }

    async fn link(&self, up: bool) -> anyhow::Result<()> {
        sh(&[
            "ip",
            "-n",
            &self.cloud,
            "link",
            "set",
            "fltc",
            if up { "up" } else { "down" },
        ])
        .await
        .map(drop)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.cloud, &self.edge] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

/// What a process holds, from its admin `/metrics`.
#[derive(Clone, Copy, Debug)]
struct Usage {
    fds: f64,
    rss_mib: f64,
    tasks: f64,
}

fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if rest.starts_with(' ') || rest.starts_with('{') {
            *found.get_or_insert(0.0) += rest.rsplit(' ').next()?.parse::<f64>().ok()?;
        }
    }
    found
}

struct Stack {
    pair: Pair,
    dir: std::path::PathBuf,
    files: Vec<String>,
    _cloud: Role,
    _edge: Role,
    _kubelet: Role,
}

impl Stack {
    async fn start() -> anyhow::Result<Self> {
        let pair = Pair::new().await?;
        let dir = std::env::temp_dir().join(format!(
            "tether-faults-netns-{}-{}",
            std::process::id(),
            tether_pki::rand_u64()
        ));
        std::fs::create_dir_all(&dir)?;
        let pki = Pki::generate()?;
        let tunnel = pki
            .edge_ca
            .issue_server("tether-cloud", &["localhost", CLOUD_IP])?;
        let front = pki
            .front_ca
            .issue_server("tether-cloud", &["localhost", "127.0.0.1"])?;
        let node = pki.edge_ca.issue_node_client(NODE, &[])?;
        let client = pki
            .front_ca
            .issue_client("kube-apiserver-kubelet-client", &["system:masters"])?;
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
            f("client.crt", &client.cert_pem)?,
            f("client.key", client.key_pem.expose())?,
            f(
                "cloud.yaml",
                "drain_timeout_secs: 2\nlimits:\n  keepalive_interval: 1\n  keepalive_timeout: 3\n",
            )?,
            f(
                "edge.yaml",
                "drain_timeout_secs: 2\nbackoff_base_ms: 100\nbackoff_max_secs: 1\nlimits:\n  keepalive_interval: 1\n  keepalive_timeout: 3\n",
            )?,
        ];
        let tunnel_addr = format!("{CLOUD_IP}:10004");
        let cloud = process::spawn(
            &pair.exec(&pair.cloud),
            &[
                "cloud",
                "--config",
                &files[10],
                "--hub-addr",
                "127.0.0.1:0",
                "--tunnel-addr",
                &tunnel_addr,
                "--front-addr",
                "127.0.0.1:10003",
                "--admin-addr",
                "127.0.0.1:10005",
                "--tunnel-cert",
                &files[2],
                "--tunnel-key",
                &files[3],
                "--edge-ca",
                &files[0],
                "--front-cert",
                &files[4],
                "--front-key",
                &files[5],
                "--front-client-ca",
                &files[1],
            ],
            "cloud started",
        )
        .await?;
        let kubelet = process::spawn(
            &pair.exec(&pair.edge),
            &["fixture-kubelet", "--listen", "127.0.0.1:10350"],
            "listening on",
        )
        .await?;
        let edge = process::spawn(
            &pair.exec(&pair.edge),
            &[
                "edge",
                "--config",
                &files[11],
                "--no-hub",
                "--node-name",
                NODE,
                "--cloud-addr",
                &tunnel_addr,
                "--cloud-server-name",
                "localhost",
                "--ca",
                &files[0],
                "--cert",
                &files[6],
                "--key",
                &files[7],
                "--kubelet-url",
                "http://127.0.0.1:10350",
                "--admin-addr",
                "127.0.0.1:10006",
            ],
            "started",
        )
        .await?;
        let s = Self {
            pair,
            dir,
            files,
            _cloud: cloud,
            _edge: edge,
            _kubelet: kubelet,
        };
        s.wait_served().await?;
        Ok(s)
    }

    /// curl in the cloud's namespace: the log with `query` into `out`,
    /// within `max_secs`. Returns curl's exit code.
    async fn download(
        &self,
        out: &std::path::Path,
        query: &str,
        max_secs: u32,
    ) -> anyhow::Result<i32> {
        let f = &self.files;
        let url = format!("https://localhost:10003/containerLogs/default/web/app?{query}");
        let (max, o) = (max_secs.to_string(), out.display().to_string());
        let mut args: Vec<&str> = self.pair.exec(&self.pair.cloud).to_vec();
        args.extend([
            "curl",
            "-sS",
            "-f",
            "-m",
            &max,
            "--cacert",
            &f[1],
            "--cert",
            &f[8],
            "--key",
            &f[9],
            "-H",
            "Host: edge-netns",
            "-o",
            &o,
            &url,
        ]);
        let st = tokio::process::Command::new(args[0])
            .args(&args[1..])
            .kill_on_drop(true)
            .stderr(std::process::Stdio::null())
            .status()
            .await?;
        Ok(st.code().unwrap_or(-1))
    }

    /// How many bytes of `out` are correct log bytes; Err if any is wrong.
    fn verify(out: &std::path::Path) -> anyhow::Result<u64> {
        let body = std::fs::read(out).unwrap_or_default();
        let mut v = LogVerifier::new(0);
        v.update(&body)?;
        Ok(v.offset())
    }

    async fn exact(&self, bytes: u64) -> anyhow::Result<()> {
        let out = self.dir.join("exact.log");
        let code = self.download(&out, &format!("bytes={bytes}"), 20).await?;
        ensure!(code == 0, "curl exited {code}");
        let got = Self::verify(&out)?;
        ensure!(got == bytes, "short body: {got} of {bytes}");
        Ok(())
    }

    async fn wait_served(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if self.exact(4096).await.is_ok() {
                return Ok(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("no request went through within 30 s")
    }

    async fn metrics(&self, ns: &str, port: u16) -> anyhow::Result<String> {
        let mut args: Vec<&str> = self.pair.exec(ns).to_vec();
        let url = format!("http://127.0.0.1:{port}/metrics");
        args.extend(["curl", "-sSf", "-m", "5", &url]);
        sh(&args).await
    }

    async fn usage(&self, ns: &str, port: u16) -> anyhow::Result<Usage> {
        let t = self.metrics(ns, port).await?;
        let g = |n| metric(&t, n).with_context(|| format!("no {n}"));
        Ok(Usage {
            fds: g("process_open_fds")?,
            rss_mib: g("process_resident_memory_bytes")? / f64::from(1 << 20),
            tasks: g("tether_runtime_alive_tasks")?,
        })
    }

    fn roles(&self) -> [(&str, u16); 2] {
        [(&self.pair.cloud, 10005), (&self.pair.edge, 10006)]
    }

    async fn baseline(&self) -> anyhow::Result<Vec<Usage>> {
        for _ in 0..3 {
            self.exact(1 << 20).await?;
        }
        let mut out = Vec::new();
        for (ns, port) in self.roles() {
            out.push(self.usage(ns, port).await?);
        }
        println!("baseline: {out:?}");
        Ok(out)
    }

    async fn check(&self, base: &[Usage]) -> anyhow::Result<()> {
        let sessions = metric(
            &self.metrics(&self.pair.cloud, 10005).await?,
            "tether_cloud_sessions",
        );
        ensure!(sessions == Some(1.0), "{sessions:?} sessions, want 1");
        for ((ns, port), b) in self.roles().into_iter().zip(base) {
            let u = self.usage(ns, port).await?;
            ensure!(
                u.fds <= b.fds + 16.0,
                "{ns}: {} fds, {} before",
                u.fds,
                b.fds
            );
            ensure!(
                u.tasks <= b.tasks + 16.0,
                "{ns}: {} tasks, {} before",
                u.tasks,
                b.tasks
            );
            ensure!(
                u.rss_mib <= 2.0 * b.rss_mib + 32.0,
                "{ns}: {:.1} MiB, {:.1} before",
                u.rss_mib,
                b.rss_mib
            );
        }
        Ok(())
    }

    async fn settled(&self, base: &[Usage], what: &str) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < Duration::from_secs(20) {
            match self.check(base).await {
                Ok(()) => return Ok(()),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("{what}: invariants did not settle in 20 s: {last}")
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_link_down_short_and_past_keepalive() {
    if !process::is_root() {
        eprintln!("skipped: this test creates network namespaces and a veth pair and needs root");
        return;
    }
    let n = cycles(10, 500);
    // A cycle takes about 6.5 s (a 4 s outage, then service again).
    let limit = Duration::from_secs(120 + 20 * n as u64);
    tokio::time::timeout(limit, async {
        let s = Stack::start().await?;
        let base = s.baseline().await?;
        for cycle in 0..n {
            let long = cycle % 2 == 1;
            // A `follow` stream in flight across the outage, which curl ends
            // itself after 8 s; the fixture appends 64 bytes every 50 ms.
            let out = s.dir.join("inflight.log");
            let _ = std::fs::remove_file(&out);
            let inflight = s.download(&out, "follow=true&bytes=1024", 8);
            let outage = async {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                s.pair.link(false).await?;
                tokio::time::sleep(Duration::from_millis(if long { 4000 } else { 300 })).await;
                s.pair.link(true).await?;
                anyhow::Ok(())
            };
            let started = Instant::now();
            let (code, ()) = tokio::try_join!(inflight, outage)?;
            let took = started.elapsed();
            let got = Stack::verify(&out).with_context(|| format!("cycle {cycle}: CORRUPT"))?;
            if long {
                // The session ended, and the stream with it, cleanly and
                // before curl's own deadline (exit 28).
                ensure!(
                    code != 0 && code != 28,
                    "cycle {cycle}: curl exited {code} after a 4 s outage ({got} bytes)"
                );
            } else {
                // Still streaming at curl's deadline, with lines from after
                // the outage.
                ensure!(
                    code == 28 && got >= 1024 + 64 * 100,
                    "cycle {cycle}: a 300 ms outage cut the stream (curl {code}, {got} bytes)"
                );
            }
            let back = s.wait_served().await?;
            s.exact(1 << 20).await?;
            s.settled(&base, &format!("link cycle {cycle}")).await?;
            println!(
                "link down {} ms, cycle {cycle}: in-flight curl {code} after {took:?} with {got} bytes; served again {back:?} after",
                if long { 4000 } else { 300 }
            );
        }
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .expect("test failed");
}
