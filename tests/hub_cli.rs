//! The message hub as operators run it: `tether cloud` and `tether edge`
//! processes, their HTTP APIs driven with real curl (the cloud's on the
//! admin port with a bearer token, the edge's on its unix socket), processes
//! killed with SIGKILL and restarted, and, as root, a veth link between two
//! network namespaces taken down 100 times.

mod process;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use process::{Role, write};
use tether_tests::harness::Pki;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

const NODE: &str = "edge-hub";
const TOKEN: &str = "hub-api-token-for-tests-0123456789";

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Certificates, keys and configs of one cloud and one edge, in `dir`.
struct Files {
    dir: PathBuf,
    edge_ca: String,
    tunnel: (String, String),
    front: (String, String),
    front_ca: String,
    node: (String, String),
    token: String,
    cloud_cfg: String,
    edge_cfg: String,
}

fn files(name: &str, cloud_ip: &str) -> anyhow::Result<Files> {
    let dir = std::env::temp_dir().join(format!(
        "tether-{name}-{}-{}",
        std::process::id(),
        tether_pki::rand_u64()
    ));
    std::fs::create_dir_all(dir.join("edge"))?;
    std::fs::create_dir_all(dir.join("cloud"))?;
    let pki = Pki::generate()?;
    let tunnel = pki
        .edge_ca
        .issue_server("tether-cloud", &["localhost", "127.0.0.1", cloud_ip])?;
    let front = pki.front_ca.issue_server("tether-cloud", &["localhost"])?;
    let node = pki.edge_ca.issue_node_client(NODE, &[])?;
    let f = |n: &str, pem: &str| write(&dir, n, pem);
    // Short keepalives so a dead link is noticed within about a second;
    // no publish rate limit, queues big enough for the whole run.
    let hub = "hub:\n  keepalive_interval_secs: 0.25\n  keepalive_timeout_secs: 0.8\n  queue_capacity: 20000\n";
    Ok(Files {
        edge_ca: f("edge-ca.crt", pki.edge_ca.cert_pem())?,
        tunnel: (
            f("tunnel.crt", &tunnel.cert_pem)?,
            f("tunnel.key", tunnel.key_pem.expose())?,
        ),
        front: (
            f("front.crt", &front.cert_pem)?,
            f("front.key", front.key_pem.expose())?,
        ),
        front_ca: f("front-ca.crt", pki.front_ca.cert_pem())?,
        node: (
            f("node.crt", &node.cert_pem)?,
            f("node.key", node.key_pem.expose())?,
        ),
        token: f("hub-token", &format!("{TOKEN}\n"))?,
        cloud_cfg: f(
            "cloud.yaml",
            &format!("{hub}  rate_qps: 0\n  ack_timeout_secs: 2\ndrain_timeout_secs: 1\n"),
        )?,
        edge_cfg: f(
            "edge.yaml",
            &format!(
                "{hub}backoff_base_ms: 50\nbackoff_max_secs: 1\ndrain_timeout_secs: 1\nlimits:\n  handshake_timeout: 2\n"
            ),
        )?,
        dir,
    })
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Fixed addresses, so restarted processes come back where peers look.
struct Addrs {
    ip: String,
    hub: u16,
    tunnel: u16,
    admin: u16,
    /// The edge's admin port (0: any).
    edge_admin: u16,
    /// The edge carries the hub inside its tunnel (the default, ADR 0022)
    /// rather than dialing the hub port.
    hub_in_tunnel: bool,
}

async fn cloud(prefix: &[&str], f: &Files, a: &Addrs) -> anyhow::Result<Role> {
    let state = f.dir.join("cloud");
    let (hub, tunnel) = (
        format!("{}:{}", a.ip, a.hub),
        format!("{}:{}", a.ip, a.tunnel),
    );
    let admin = format!("127.0.0.1:{}", a.admin);
    process::spawn(
        prefix,
        &[
            "cloud",
            "--config",
            &f.cloud_cfg,
            "--state-dir",
            state.to_str().context("path")?,
            "--bootstrap-addr",
            "127.0.0.1:0",
            "--hub-addr",
            &hub,
            "--tunnel-addr",
            &tunnel,
            "--front-addr",
            "127.0.0.1:0",
            "--admin-addr",
            &admin,
            "--tunnel-cert",
            &f.tunnel.0,
            "--tunnel-key",
            &f.tunnel.1,
            "--edge-ca",
            &f.edge_ca,
            "--front-cert",
            &f.front.0,
            "--front-key",
            &f.front.1,
            "--front-client-ca",
            &f.front_ca,
            "--hub-api-token-file",
            &f.token,
        ],
        "cloud started",
    )
    .await
}

async fn edge(prefix: &[&str], f: &Files, a: &Addrs) -> anyhow::Result<Role> {
    let state = f.dir.join("edge");
    let (hub, tunnel) = (
        format!("{}:{}", a.ip, a.hub),
        format!("{}:{}", a.ip, a.tunnel),
    );
    let admin = format!("127.0.0.1:{}", a.edge_admin);
    let hub_port: &[&str] = if a.hub_in_tunnel {
        &[]
    } else {
        &["--hub-addr", &hub]
    };
    process::spawn(
        prefix,
        &[
            &[
                "edge",
                "--config",
                &f.edge_cfg,
                "--node-name",
                NODE,
                "--cloud-addr",
                &tunnel,
            ],
            hub_port,
            &[
                "--cloud-server-name",
                "localhost",
                "--ca",
                &f.edge_ca,
                "--cert",
                &f.node.0,
                "--key",
                &f.node.1,
                "--state-dir",
                state.to_str().context("path")?,
                "--kubelet-url",
                "http://127.0.0.1:1",
                "--admin-addr",
                &admin,
            ],
        ]
        .concat(),
        "message hub started",
    )
    .await
}

/// Established TCP connections to `port` on this host (`ss`, iproute2).
async fn connections_to(port: u16) -> anyhow::Result<usize> {
    let out = tokio::process::Command::new("ss")
        .args([
            "-Htn",
            "state",
            "established",
            "dport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .await
        .context("ss (iproute2)")?;
    ensure!(
        out.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

fn socket(f: &Files) -> String {
    f.dir.join("edge/hub.sock").display().to_string()
}

/// Runs curl (inside `prefix`, e.g. `ip netns exec A`); returns the status
/// and body.
async fn curl(prefix: &[&str], args: &[&str]) -> anyhow::Result<(u16, String)> {
    let mut all: Vec<&str> = prefix.to_vec();
    all.extend(["curl", "-s", "-m", "30", "-w", "\n%{http_code}"]);
    all.extend_from_slice(args);
    let out = tokio::process::Command::new(all[0])
        .args(&all[1..])
        .output()
        .await
        .context("run curl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("curl output")?;
    Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
}

fn auth() -> String {
    format!("Authorization: Bearer {TOKEN}")
}

/// NDJSON of messages `from..to` about `resource`.
fn batch(dir: &Path, resource: &str, from: u64, to: u64) -> anyhow::Result<String> {
    let mut s = String::new();
    for n in from..to {
        s.push_str(&format!(
            r#"{{"header":{{}},"route":{{"source":"test","group":"app","operation":"update","resource":"{resource}"}},"content":{n}}}"#
        ));
        s.push('\n');
    }
    let path = dir.join(format!("batch-{resource}-{from}.ndjson"));
    std::fs::write(&path, s)?;
    Ok(path.display().to_string())
}

async fn publish_down(prefix: &[&str], a: &Addrs, file: &str) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{}/hub/v1/nodes/{NODE}/messages", a.admin);
    let data = format!("@{file}");
    let (code, body) = curl(
        prefix,
        &[
            "-H",
            &auth(),
            "-H",
            "content-type: application/x-ndjson",
            "--data-binary",
            &data,
            &url,
        ],
    )
    .await?;
    ensure!(code == 202, "cloud publish: {code} {body}");
    Ok(())
}

async fn publish_up(f: &Files, file: &str) -> anyhow::Result<()> {
    let data = format!("@{file}");
    let (code, body) = curl(
        &[],
        &[
            "--unix-socket",
            &socket(f),
            "-H",
            "content-type: application/x-ndjson",
            "--data-binary",
            &data,
            "http://edge/v1/messages",
        ],
    )
    .await?;
    ensure!(code == 202, "edge publish: {code} {body}");
    Ok(())
}

/// A streaming subscription read line by line from a curl process.
struct Subscription {
    _child: tokio::process::Child,
    lines: mpsc::Receiver<String>,
}

async fn subscribe(prefix: &[&str], args: &[&str]) -> anyhow::Result<Subscription> {
    let mut all: Vec<&str> = prefix.to_vec();
    all.extend(["curl", "-sN"]);
    all.extend_from_slice(args);
    let mut child = tokio::process::Command::new(all[0])
        .args(&all[1..])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = child.stdout.take().context("stdout")?;
    let (tx, lines) = mpsc::channel(100_000);
    tokio::spawn(async move {
        let mut r = BufReader::new(out).lines();
        while let Ok(Some(l)) = r.next_line().await {
            if tx.send(l).await.is_err() {
                return;
            }
        }
    });
    Ok(Subscription {
        _child: child,
        lines,
    })
}

async fn subscribe_cloud(prefix: &[&str], a: &Addrs) -> anyhow::Result<Subscription> {
    let url = format!("http://127.0.0.1:{}/hub/v1/subscribe?group=app", a.admin);
    subscribe(prefix, &["-H", &auth(), &url]).await
}

async fn subscribe_edge(f: &Files) -> anyhow::Result<Subscription> {
    subscribe(
        &[],
        &[
            "--unix-socket",
            &socket(f),
            "http://edge/v1/subscribe?group=app",
        ],
    )
    .await
}

/// Reads `total` messages; returns the numbers per resource in arrival order.
async fn collect(
    sub: &mut Subscription,
    total: usize,
    within: Duration,
) -> anyhow::Result<HashMap<String, Vec<u64>>> {
    let mut got: HashMap<String, Vec<u64>> = HashMap::new();
    let mut n = 0;
    let deadline = tokio::time::Instant::now() + within;
    while n < total {
        let line = tokio::time::timeout_at(deadline, sub.lines.recv())
            .await
            .with_context(|| format!("only {n} of {total} messages within {within:?}"))?
            .context("subscription ended")?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        let Some(m) = v.get("message") else { continue };
        got.entry(
            m["route"]["resource"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
        .or_default()
        .push(m["content"].as_u64().context("content")?);
        n += 1;
    }
    Ok(got)
}

fn exactly_once_in_order(
    got: &HashMap<String, Vec<u64>>,
    want: &[(&str, u64)],
) -> anyhow::Result<()> {
    ensure!(got.len() == want.len(), "resources {:?}", got.keys());
    for (r, count) in want {
        let ns = got.get(*r).with_context(|| format!("no {r}"))?;
        ensure!(
            ns.iter().copied().eq(0..*count),
            "{r}: not exactly 0..{count} in order (len {}, first wrong at {:?})",
            ns.len(),
            ns.iter().enumerate().find(|(i, n)| *i as u64 != **n)
        );
    }
    Ok(())
}

async fn edge_status(f: &Files) -> anyhow::Result<serde_json::Value> {
    let (code, body) = curl(&[], &["--unix-socket", &socket(f), "http://edge/v1/status"]).await?;
    ensure!(code == 200, "status {code} {body}");
    Ok(serde_json::from_str(&body)?)
}

async fn kill(role: &mut Role) -> anyhow::Result<()> {
    role.child.start_kill()?;
    tokio::time::timeout(Duration::from_secs(10), role.child.wait())
        .await
        .context("process did not die")??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_sigkill_of_edge_and_cloud() {
    sigkill(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_sigkill_of_edge_and_cloud_with_the_hub_in_the_tunnel() {
    sigkill(true).await;
}

async fn sigkill(hub_in_tunnel: bool) {
    tokio::time::timeout(Duration::from_secs(180), async {
        let f = files("hub-kill", "127.0.0.1")?;
        let a = Addrs {
            ip: "127.0.0.1".into(),
            hub: free_port()?,
            tunnel: free_port()?,
            admin: free_port()?,
            edge_admin: 0,
            hub_in_tunnel,
        };
        let mut c1 = cloud(&[], &f, &a).await?;
        let mut e1 = edge(&[], &f, &a).await?;
        e1.wait_line("hub channel up", Duration::from_secs(20)).await?;
        // One connection per edge when the hub rides in the tunnel, two
        // otherwise.
        let (tunnel, hub) = (connections_to(a.tunnel).await?, connections_to(a.hub).await?);
        ensure!(
            (tunnel, hub) == (1, usize::from(!hub_in_tunnel)),
            "edge connections: {tunnel} to the tunnel port, {hub} to the hub port"
        );

        // The cloud crashes; the edge queues upstream messages durably...
        kill(&mut c1).await?;
        publish_up(&f, &batch(&f.dir, "up", 0, 1000)?).await?;
        let st = edge_status(&f).await?;
        ensure!(st["queued"] == 1000, "edge status {st}");
        // ...and crashes too, with all 1,000 still queued.
        kill(&mut e1).await?;

        // A new cloud accepts downstream messages for the offline node,
        // then crashes.
        let mut c2 = cloud(&[], &f, &a).await?;
        publish_down(&[], &a, &batch(&f.dir, "down", 0, 600)?).await?;
        publish_down(&[], &a, &batch(&f.dir, "down", 600, 1000)?).await?;
        kill(&mut c2).await?;

        // Both come back: everything arrives exactly once, in order.
        let _c3 = cloud(&[], &f, &a).await?;
        let url = format!("http://127.0.0.1:{}/hub/v1/nodes/{NODE}", a.admin);
        let (code, body) = curl(&[], &["-H", &auth(), &url]).await?;
        ensure!(code == 200 && body.contains("\"queued\":1000"), "node status {code} {body}");
        let mut up = subscribe_cloud(&[], &a).await?;
        let _e2 = edge(&[], &f, &a).await?;
        // The edge application subscribes after the agent started: messages
        // that arrive first are deferred, not lost.
        let mut down = subscribe_edge(&f).await?;
        let (u, d) = tokio::try_join!(
            collect(&mut up, 1000, Duration::from_secs(60)),
            collect(&mut down, 1000, Duration::from_secs(60)),
        )?;
        exactly_once_in_order(&u, &[("up", 1000)])?;
        exactly_once_in_order(&d, &[("down", 1000)])?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        ensure!(up.lines.try_recv().map_or(true, |l| !l.contains("\"message\"")), "duplicate upstream");
        ensure!(down.lines.try_recv().map_or(true, |l| !l.contains("\"message\"")), "duplicate downstream");

        // Bad input gets a clear error and nothing is lost.
        let msgs = format!("http://127.0.0.1:{}/hub/v1/nodes/{NODE}/messages", a.admin);
        let (code, body) = curl(&[], &["--data-binary", "{}", &msgs]).await?;
        ensure!(code == 401 && body.contains("Bearer"), "no token: {code} {body}");
        for (data, want_code, want) in [
            ("{not json", 400, "malformed message"),
            (r#"{"header":{}}"#, 400, "no route"),
            (r#"{"header":{},"route":{"group":"tether.hub","operation":"x"}}"#, 400, "reserved"),
        ] {
            let (code, body) = curl(&[], &["-H", &auth(), "--data-binary", data, &msgs]).await?;
            ensure!(code == want_code && body.contains(want), "{data}: {code} {body}");
        }
        let big = f.dir.join("big.json");
        std::fs::write(&big, format!(
            r#"{{"header":{{}},"route":{{"group":"app","operation":"x"}},"content":"{}"}}"#,
            "x".repeat(2 << 20)
        ))?;
        let (code, body) = curl(&[], &["-H", &auth(), "--data-binary", &format!("@{}", big.display()), &msgs]).await?;
        ensure!(code == 413 && body.contains("limit"), "oversized: {code} {body}");
        let mixed = f.dir.join("mixed.ndjson");
        std::fs::write(&mixed, format!(
            "{}\n{{broken\n{}\n",
            r#"{"header":{},"route":{"group":"app","operation":"x","resource":"z"},"content":0}"#,
            r#"{"header":{},"route":{"group":"app","operation":"x","resource":"z"},"content":1}"#,
        ))?;
        let (code, body) = curl(&[], &[
            "-H", &auth(), "-H", "content-type: application/x-ndjson",
            "--data-binary", &format!("@{}", mixed.display()), &msgs,
        ]).await?;
        ensure!(code == 400 && body.contains("\"accepted\":1") && body.contains("message 1: malformed"), "mixed batch: {code} {body}");
        // The well-formed message before the bad line still arrives.
        let z = collect(&mut down, 1, Duration::from_secs(20)).await?;
        ensure!(z.get("z") == Some(&vec![0]), "{z:?}");
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .expect("test failed");
}

/// Two namespaces joined by a veth pair: the cloud in one, the edge in
/// the other.
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
            cloud: format!("tether-hc-{id}"),
            edge: format!("tether-he-{id}"),
        };
        for ns in [&p.cloud, &p.edge] {
            sh(&["ip", "netns", "add", ns]).await?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]).await?;
        }
        sh(&[
            "ip", "-n", &p.cloud, "link", "add", "hubc", "type", "veth", "peer", "name", "hube",
            "netns", &p.edge,
        ])
        .await?;
        sh(&[
            "ip",
            "-n",
            &p.cloud,
            "addr",
            "add",
            "10.77.0.1/24",
            "dev",
            "hubc",
        ])
        .await?;
        sh(&[
            "ip",
            "-n",
            &p.edge,
            "addr",
            "add",
            "10.77.0.2/24",
            "dev",
            "hube",
        ])
        .await?;
        sh(&["ip", "-n", &p.cloud, "link", "set", "hubc", "up"]).await?;
        sh(&["ip", "-n", &p.edge, "link", "set", "hube", "up"]).await?;
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
            "hubc",
            if up { "up" } else { "down" },
        ])
        .await
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

async fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = tokio::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .await?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn veth_downed_100_times_loses_and_duplicates_nothing() {
    if !process::is_root() {
        eprintln!("skipped: this test creates network namespaces and a veth pair and needs root");
        return;
    }
    tokio::time::timeout(Duration::from_secs(600), async {
        let pair = Pair::new().await?;
        let f = files("hub-veth", "10.77.0.1")?;
        let a = Addrs {
            ip: "10.77.0.1".into(),
            hub: 10000,
            tunnel: 10004,
            admin: 10005,
            edge_admin: 0,
            hub_in_tunnel: true,
        };
        let cx = pair.exec(&pair.cloud);
        let _cloud = cloud(&cx, &f, &a).await?;
        let mut edge_p = edge(&pair.exec(&pair.edge), &f, &a).await?;
        edge_p
            .wait_line("hub channel up", Duration::from_secs(20))
            .await?;
        let mut up = subscribe_cloud(&cx, &a).await?;
        let mut down = subscribe_edge(&f).await?;

        const PER: u64 = 2500; // 4 resources x 2,500 = 10,000 each way
        let resources = ["r0", "r1", "r2", "r3"];
        let mut files_down = Vec::new();
        let mut files_up = Vec::new();
        for r in resources {
            for from in (0..PER).step_by(500) {
                files_down.push(batch(&f.dir, &format!("d{r}"), from, from + 500)?);
                files_up.push(batch(&f.dir, &format!("u{r}"), from, from + 500)?);
            }
        }
        // Publishers and the link flapper run together.
        let publish = async {
            for (d, u) in files_down.iter().zip(&files_up) {
                publish_down(&cx, &a, d).await?;
                publish_up(&f, u).await?;
            }
            Ok::<_, anyhow::Error>(())
        };
        let flap = async {
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            for i in 0..100 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                pair.link(false).await?;
                // Every fourth outage outlasts the 0.8 s keepalive timeout
                // (the channel dies and reconnects); the others are stalls
                // TCP rides out.
                let long = i % 4 == 0;
                let outage = if long { 1500 } else { 50 + seed % 450 };
                tokio::time::sleep(Duration::from_millis(outage)).await;
                pair.link(true).await?;
                if long {
                    // Let the channel come back, so the next long outage
                    // cuts a live one.
                    let mut online = false;
                    for _ in 0..150 {
                        if edge_status(&f).await?["online"] == true {
                            online = true;
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    ensure!(
                        online,
                        "the channel did not come back within 15 s of the link"
                    );
                }
                tokio::time::sleep(Duration::from_millis(100 + (seed >> 20) % 300)).await;
            }
            Ok::<_, anyhow::Error>(())
        };
        let want_down: Vec<(String, u64)> =
            resources.iter().map(|r| (format!("d{r}"), PER)).collect();
        let want_up: Vec<(String, u64)> =
            resources.iter().map(|r| (format!("u{r}"), PER)).collect();
        let (_, _, d, u) = tokio::try_join!(
            publish,
            flap,
            collect(&mut down, 10_000, Duration::from_secs(400)),
            collect(&mut up, 10_000, Duration::from_secs(400)),
        )?;
        fn want(w: &[(String, u64)]) -> Vec<(&str, u64)> {
            w.iter().map(|(r, n)| (r.as_str(), *n)).collect()
        }
        exactly_once_in_order(&d, &want(&want_down))?;
        exactly_once_in_order(&u, &want(&want_up))?;
        let reconnects = {
            let mut n = 0;
            while let Ok(l) = edge_p.lines.try_recv() {
                if std::env::var("HUB_DEBUG").is_ok() && l.contains("hub") {
                    eprintln!("{l}");
                }
                if l.contains("hub channel up") {
                    n += 1;
                }
            }
            n
        };
        eprintln!("100 link outages, {reconnects} channel reconnects");
        ensure!(
            reconnects >= 25,
            "only {reconnects} reconnects: the outages did not cut the channel"
        );
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .expect("test failed");
}

/// A tmpfs mounted by the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the file system of `path` with a filler file; returns its path.
fn fill(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler)?;
    let chunk = vec![0u8; 64 << 10];
    for _ in 0..10_000 {
        if file
            .write_all(&chunk)
            .and_then(|()| file.sync_all())
            .is_err()
        {
            return Ok(filler);
        }
    }
    bail!("{} never filled up", dir.display())
}

/// NDJSON of `n` messages about `resource`, numbered from `from`, each
/// with 100 KiB of padding so that a few of them need new store pages.
fn big_batch(dir: &Path, resource: &str, from: u64, n: u64) -> anyhow::Result<String> {
    let pad = "x".repeat(100 << 10);
    let mut s = String::new();
    for k in from..from + n {
        s.push_str(&format!(
            r#"{{"header":{{}},"route":{{"source":"test","group":"app","operation":"update","resource":"{resource}"}},"content":{{"n":{k},"pad":"{pad}"}}}}"#
        ));
        s.push('\n');
    }
    let path = dir.join(format!("big-{resource}-{from}.ndjson"));
    std::fs::write(&path, s)?;
    Ok(path.display().to_string())
}

/// Publishes through the edge's socket; returns the status, the body and
/// the Retry-After header.
async fn publish_up_raw(f: &Files, file: &str) -> anyhow::Result<(u16, String)> {
    let data = format!("@{file}");
    curl(
        &[],
        &[
            "--unix-socket",
            &socket(f),
            "-D",
            "-",
            "-H",
            "content-type: application/x-ndjson",
            "--data-binary",
            &data,
            "http://edge/v1/messages",
        ],
    )
    .await
}

async fn edge_admin(a: &Addrs, path: &str) -> anyhow::Result<(u16, String)> {
    curl(&[], &[&format!("http://127.0.0.1:{}{path}", a.edge_admin)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item7_hub_store_recovers_after_disk_full() {
    if !process::is_root() {
        eprintln!("skipped: this test mounts a tmpfs and needs root");
        return;
    }
    tokio::time::timeout(Duration::from_secs(300), async {
        let f = files("hub-enospc", "127.0.0.1")?;
        let state = f.dir.join("edge");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tether-test"])
            .arg(&state)
            .status()?
            .success();
        ensure!(ok, "mount tmpfs on {}", state.display());
        let _mount = Tmpfs(state.clone());
        let a = Addrs {
            ip: "127.0.0.1".into(),
            hub: free_port()?,
            tunnel: free_port()?,
            admin: free_port()?,
            edge_admin: free_port()?,
            hub_in_tunnel: true,
        };
        let cloud_role = cloud(&[], &f, &a).await?;
        let cloud_pid = cloud_role.child.id().context("cloud pid")?.to_string();
        let mut e = edge(&[], &f, &a).await?;
        e.wait_line("hub channel up", Duration::from_secs(20))
            .await?;
        let mut up = subscribe_cloud(&[], &a).await?;
        let cycles = if std::env::var_os("TETHER_FAULTS_SOAK").is_some() {
            20
        } else {
            2
        };
        let mut accepted = 0u64;
        for cycle in 0..cycles {
            // The cloud stops taking messages, so the edge's queue (and its
            // store file) must grow into the full disk.
            process::ok(&["kill", "-STOP", &cloud_pid]).await?;
            let filler = fill(&state)?;
            // Publish until the store cannot grow: refused with 503 and a
            // Retry-After, never silently dropped.
            // Publish until the store cannot grow: refused with 503 and a
            // Retry-After (never silently dropped), with readiness red. A
            // refusal can be followed by a quick recovery while the file
            // still has free pages inside; then publishing goes on.
            let mut failing = None;
            let mut refusals = 0;
            for _ in 0..80 {
                let batch = big_batch(&f.dir, "r", accepted, 4)?;
                let (code, out) = publish_up_raw(&f, &batch).await?;
                match code {
                    202 => accepted += 4,
                    503 => {
                        refusals += 1;
                        ensure!(
                            out.contains("\"accepted\":0"),
                            "cycle {cycle}: a refused batch was partly accepted: {out}"
                        );
                        ensure!(
                            out.to_ascii_lowercase().contains("retry-after: 1"),
                            "no Retry-After: {out}"
                        );
                        // Failing now: the metric says so, and readiness.
                        let (_, metrics) = edge_admin(&a, "/metrics").await?;
                        if !metrics.contains("tether_hub_store_healthy{role=\"edge\"} 0") {
                            continue;
                        }
                        // (It may have recovered in between: a failed write
                        // is retried at once. Then publishing goes on.)
                        let (code, _) = edge_admin(&a, "/readyz").await?;
                        if code != 503 {
                            continue;
                        }
                        failing = Some(metrics);
                        break;
                    }
                    _ => bail!("cycle {cycle}: publish answered {code}: {out}"),
                }
            }
            let metrics = failing.with_context(|| {
                format!("cycle {cycle}: the full disk never made the store fail ({refusals} refusals)")
            })?;
            ensure!(
                !metrics.contains("tether_hub_store_errors_total{role=\"edge\",kind=\"enospc\"} 0"),
                "cycle {cycle}: ENOSPC not counted:\n{metrics}"
            );
            // Space returns: the store recovers by itself, without traffic.
            std::fs::remove_file(&filler)?;
            // (The cloud is still stopped, so the edge's tunnel may be down
            // too: the store's own health is read from its metric here.)
            let freed = tokio::time::Instant::now();
            loop {
                let (_, metrics) = edge_admin(&a, "/metrics").await?;
                if metrics.contains("tether_hub_store_healthy{role=\"edge\"} 1") {
                    break;
                }
                if freed.elapsed() >= Duration::from_secs(5) {
                    let ls = std::process::Command::new("ls").arg("-la").arg(&state).output()?;
                    let mut lines = Vec::new();
                    while let Ok(l) = e.lines.try_recv() {
                        lines.push(l);
                    }
                    bail!(
                        "cycle {cycle}: store not healthy 5 s after space returned; {}\nedge log tail: {:?}",
                        String::from_utf8_lossy(&ls.stdout),
                        &lines[lines.len().saturating_sub(8)..]
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let healthy_after = freed.elapsed();
            process::ok(&["kill", "-CONT", &cloud_pid]).await?;
            let resumed = tokio::time::Instant::now();
            loop {
                let (code, _) = edge_admin(&a, "/readyz").await?;
                if code == 200 {
                    break;
                }
                ensure!(
                    resumed.elapsed() < Duration::from_secs(30),
                    "cycle {cycle}: not ready 30 s after the store recovered and the cloud resumed"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            println!(
                "disk full cycle {cycle}: store healthy {healthy_after:?} after space returned, ready {:?} after the cloud resumed",
                resumed.elapsed()
            );
            let batch = big_batch(&f.dir, "r", accepted, 4)?;
            let (code, out) = publish_up_raw(&f, &batch).await?;
            ensure!(
                code == 202,
                "cycle {cycle}: publish after recovery answered {code}: {out}"
            );
            accepted += 4;
        }
        // Everything accepted arrives, once, in order; nothing refused does.
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while (got.len() as u64) < accepted {
            let line = tokio::time::timeout_at(deadline, up.lines.recv())
                .await
                .with_context(|| format!("only {} of {accepted} messages arrived", got.len()))?
                .context("subscription ended")?;
            let v: serde_json::Value = serde_json::from_str(&line)?;
            if let Some(m) = v.get("message") {
                got.push(m["content"]["n"].as_u64().context("content.n")?);
            }
        }
        ensure!(
            got.iter().copied().eq(0..accepted),
            "not exactly 0..{accepted} in order: {:?}",
            got.iter().enumerate().find(|(i, n)| *i as u64 != **n)
        );
        // And nothing more: no refused message and no resend shows up.
        tokio::time::sleep(Duration::from_secs(2)).await;
        if let Ok(line) = up.lines.try_recv() {
            ensure!(
                !line.contains("\"message\""),
                "unexpected message after all: {line:.200}"
            );
        }
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .expect("test failed");
}
