//! iptables-manager through real netfilter: each test creates its own network
//! namespace (deleted on drop), runs `tether cloud`, `tether edge`, the
//! fixture kubelet and `tether iptables-manager` inside it, and talks to them
//! with real curl. Needs root; skips (saying why) otherwise.

mod process;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use process::{Role, field, ok, run, write};
use tether_tests::bounded;
use tether_tests::harness::Pki;

const NODE_IP: &str = "10.0.0.5";
const NODE_CIDR: &str = "10.0.0.0/24";
const REPLICA_A: &str = "10.99.0.1";
const NODE_IP6: &str = "fd00:e::5";
const NODE_CIDR6: &str = "fd00:e::/64";
const REPLICA_A6: &str = "fd00:99::1";
const REPLICA_B: &str = "10.99.0.2";
const TUNNEL_PORT: u16 = 10351;

macro_rules! require_root {
    () => {
        if !process::is_root() {
            eprintln!(
                "skipped: this test creates network namespaces and netfilter rules and needs root"
            );
            return;
        }
    };
}

/// A network namespace that exists for the life of the value.
struct Netns {
    name: String,
    dir: PathBuf,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Netns {
    /// A namespace with loopback up, a veth pair (both ends inside) holding
    /// the replica addresses, and a route to the edge-node network (so that
    /// connects to node addresses reach netfilter instead of failing with
    /// ENETUNREACH). veth rather than dummy: not every kernel has dummy.
    async fn new() -> anyhow::Result<Self> {
        let name = format!(
            "tether-t{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ok(&["ip", "netns", "add", &name]).await?;
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir)?;
        let ns = Self { name, dir };
        for cmd in [
            "link set lo up",
            "link add tether0 type veth peer name tether1",
            "link set tether0 up",
            "link set tether1 up",
            &format!("addr add {REPLICA_A}/32 dev tether0"),
            &format!("addr add {REPLICA_B}/32 dev tether0"),
            &format!("route add {NODE_CIDR} dev tether0"),
            &format!("addr add {REPLICA_A6}/128 dev tether0 nodad"),
            &format!("route add {NODE_CIDR6} dev tether0"),
        ] {
            let mut args = vec!["ip", "-n", &ns.name];
            args.extend(cmd.split(' '));
            ok(&args).await?;
        }
        Ok(ns)
    }

    fn prefix(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// Runs a command inside the namespace; must succeed.
    async fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all: Vec<&str> = self.prefix().to_vec();
        all.extend_from_slice(args);
        ok(&all).await
    }

    async fn run(&self, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        let mut all: Vec<&str> = self.prefix().to_vec();
        all.extend_from_slice(args);
        run(&all).await
    }

    /// Starts `tether args` inside the namespace.
    async fn tether(&self, args: &[&str], marker: &str) -> anyhow::Result<Role> {
        process::spawn(&self.prefix(), args, marker).await
    }

    async fn manager_once(
        &self,
        backend: &str,
        records: &str,
    ) -> anyhow::Result<(bool, String, String)> {
        self.run(&[
            process::BIN,
            "iptables-manager",
            "--once",
            "--records",
            records,
            "--backend",
            backend,
            "--node-cidr",
            NODE_CIDR,
            "--node-cidr",
            NODE_CIDR6,
        ])
        .await
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Certificates on disk for the roles and curl.
struct Files {
    edge_ca: String,
    front_ca: String,
    tunnel: (String, String),
    front: (String, String),
    node: (String, String),
    client: (String, String),
    serving_ca: (String, String),
}

fn files(ns: &Netns) -> anyhow::Result<Files> {
    let pki = Pki::generate()?;
    let d = &ns.dir;
    let pair = |name: &str, c: &tether_pki::CertifiedKey| -> anyhow::Result<(String, String)> {
        Ok((
            write(d, &format!("{name}.crt"), &c.cert_pem)?,
            write(d, &format!("{name}.key"), c.key_pem.expose())?,
        ))
    };
    // The front's default certificate knows no node address: curl verifying
    // https://<node-ip>:<tunnel-port> succeeds only through the per-node
    // serving certificate chosen by the connection's original destination.
    let front = pki.front_ca.issue_server("tether-cloud", &["localhost"])?;
    let tunnel = pki
        .edge_ca
        .issue_server("tether-cloud", &["localhost", "127.0.0.1"])?;
    let node = pki
        .edge_ca
        .issue_node_client("edge-a", &[NODE_IP.parse()?, NODE_IP6.parse()?])?;
    let client = pki
        .front_ca
        .issue_client("kube-apiserver-kubelet-client", &["system:masters"])?;
    Ok(Files {
        edge_ca: write(d, "edge-ca.crt", pki.edge_ca.cert_pem())?,
        front_ca: write(d, "front-ca.crt", pki.front_ca.cert_pem())?,
        tunnel: pair("tunnel", &tunnel)?,
        front: pair("front", &front)?,
        node: pair("node", &node)?,
        client: pair("client", &client)?,
        serving_ca: (
            write(d, "serving-ca.crt", pki.front_ca.cert_pem())?,
            write(d, "serving-ca.key", pki.front_ca.key_pem().expose())?,
        ),
    })
}

/// A cloud replica with its front on `replica:10003` and an edge for node
/// `edge-a` connected to it, serving the fixture kubelet.
struct Stack {
    _kubelet: Role,
    _clouds: Vec<Role>,
    _edges: Vec<Role>,
}

async fn stack(ns: &Netns, f: &Files, replicas: &[&str]) -> anyhow::Result<Stack> {
    let kubelet = ns
        .tether(
            &["fixture-kubelet", "--listen", "127.0.0.1:0"],
            "listening on",
        )
        .await?;
    let kubelet_url = format!(
        "http://{}",
        kubelet.started.trim_start_matches("listening on ").trim()
    );
    let (mut clouds, mut edges) = (Vec::new(), Vec::new());
    for replica in replicas {
        let front_addr = match replica.parse::<std::net::IpAddr>()? {
            std::net::IpAddr::V4(ip) => format!("{ip}:10003"),
            std::net::IpAddr::V6(ip) => format!("[{ip}]:10003"),
        };
        let cloud = ns
            .tether(
                &[
                    "cloud",
                    "--hub-addr",
                    "127.0.0.1:0",
                    "--tunnel-addr",
                    "127.0.0.1:0",
                    "--front-addr",
                    &front_addr,
                    "--admin-addr",
                    "127.0.0.1:0",
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
                    "--serving-ca-cert",
                    &f.serving_ca.0,
                    "--serving-ca-key",
                    &f.serving_ca.1,
                ],
                "cloud started",
            )
            .await?;
        let tunnel = field(&cloud.started, "tunnel")?;
        let edge = ns
            .tether(
                &[
                    "edge",
                    "--no-hub",
                    "--node-name",
                    "edge-a",
                    "--cloud-addr",
                    &tunnel,
                    "--cloud-server-name",
                    "localhost",
                    "--ca",
                    &f.edge_ca,
                    "--cert",
                    &f.node.0,
                    "--key",
                    &f.node.1,
                    "--kubelet-url",
                    &kubelet_url,
                    "--admin-addr",
                    "127.0.0.1:0",
                ],
                "edge started",
            )
            .await?;
        clouds.push(cloud);
        edges.push(edge);
    }
    Ok(Stack {
        _kubelet: kubelet,
        _clouds: clouds,
        _edges: edges,
    })
}

/// curl as the apiserver would: dial the node address and tunnel port.
/// The Host header names no node, so only SO_ORIGINAL_DST can route it.
fn curl_args<'a>(f: &'a Files, url: &'a str) -> Vec<&'a str> {
    vec![
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--cacert",
        &f.front_ca,
        "--cert",
        &f.client.0,
        "--key",
        &f.client.1,
        "-H",
        "Host: not-a-node.example",
        url,
    ]
}

/// Retries (bounded) until curl succeeds: the edge may still be connecting.
async fn curl_until_ok(ns: &Netns, f: &Files, url: &str) -> anyhow::Result<String> {
    let mut last = String::new();
    for _ in 0..50 {
        let (success, out, err) = ns.run(&curl_args(f, url)).await?;
        if success && !out.contains("\"kind\":\"Status\"") {
            return Ok(out);
        }
        last = format!("{out}{err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("curl {url} never succeeded: {last}")
}

fn records(replica: &str) -> String {
    format!(r#"{{"ipTunnelPort":{{"{replica}":{TUNNEL_PORT}}},"port":{{"{TUNNEL_PORT}":true}}}}"#)
}

fn iptables(backend: &str) -> &'static str {
    match backend {
        "legacy" => "iptables-legacy",
        _ => "iptables-nft",
    }
}

/// Each network-namespace test, set-up and teardown included.
const NETNS_TEST_TIMEOUT: Duration = Duration::from_secs(120);

async fn dnat_through_real_stack(backend: &str, v6: bool) -> anyhow::Result<()> {
    let (node_ip, node_cidr, replica) = if v6 {
        (format!("[{NODE_IP6}]"), NODE_CIDR6, REPLICA_A6)
    } else {
        (NODE_IP.to_owned(), NODE_CIDR, REPLICA_A)
    };
    let ns = Netns::new().await?;
    let f = files(&ns)?;
    let _stack = stack(&ns, &f, &[replica]).await?;
    let recs = write(&ns.dir, "records.json", &records(replica))?;
    let (success, _, err) = ns.manager_once(backend, &recs).await?;
    ensure!(success, "iptables-manager --once failed: {err}");
    if backend != "nftables" {
        let tool = match (backend, v6) {
            ("legacy", false) => "iptables-legacy",
            ("legacy", true) => "ip6tables-legacy",
            (_, false) => "iptables-nft",
            (_, true) => "ip6tables-nft",
        };
        let rules = ns.ok(&[tool, "-t", "nat", "-S", "TUNNEL-PORT"]).await?;
        let to = if v6 {
            format!("[{replica}]")
        } else {
            replica.to_owned()
        };
        let want = format!(
            "-N TUNNEL-PORT\n-A TUNNEL-PORT -d {node_cidr} -p tcp -m tcp --dport {TUNNEL_PORT} -m comment --comment \"tether tunnel port {TUNNEL_PORT}\" -j DNAT --to-destination {to}:10003\n"
        );
        let got: String = rules
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        ensure!(
            got == want,
            "{tool} -t nat -S TUNNEL-PORT:\n{got}\nwant:\n{want}"
        );
    }
    let url = format!("https://{node_ip}:{TUNNEL_PORT}/containerLogs/default/web/app?bytes=640");
    let body = curl_until_ok(&ns, &f, &url).await?;
    ensure!(
        body.len() == 640 && body.starts_with("0000000000000000 fixture log line"),
        "body {body:?}"
    );
    // Without the rules the same connection has nowhere to go.
    let (success, _, err) = ns
        .run(&[
            process::BIN,
            "iptables-manager",
            "--cleanup",
            "--backend",
            backend,
        ])
        .await?;
    ensure!(success, "cleanup failed: {err}");
    let (success, _, _) = ns.run(&curl_args(&f, &url)).await?;
    ensure!(!success, "request still reached the front after cleanup");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnat_through_real_stack_iptables_legacy() {
    require_root!();
    bounded(NETNS_TEST_TIMEOUT, dnat_through_real_stack("legacy", false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnat_through_real_stack_iptables_nft() {
    require_root!();
    bounded(NETNS_TEST_TIMEOUT, dnat_through_real_stack("nft", false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnat_through_real_stack_nftables() {
    require_root!();
    bounded(
        NETNS_TEST_TIMEOUT,
        dnat_through_real_stack("nftables", false),
    )
    .await;
}

/// A long-running manager inside `ns`.
async fn manager(ns: &Netns, backend: &str, recs: &str) -> anyhow::Result<Role> {
    let mut m = ns
        .tether(
            &[
                "iptables-manager",
                "--records",
                recs,
                "--backend",
                backend,
                "--node-cidr",
                NODE_CIDR,
                "--resync-secs",
                "0.3",
                "--poll-ms",
                "50",
                "--admin-addr",
                "127.0.0.1:0",
            ],
            "iptables-manager started",
        )
        .await?;
    m.wait_line("synced", Duration::from_secs(10)).await?;
    Ok(m)
}

async fn hot_update(backend: &str) -> anyhow::Result<()> {
    let ns = Netns::new().await?;
    let f = files(&ns)?;
    let _stack = stack(&ns, &f, &[REPLICA_A, REPLICA_B]).await?;
    let recs = write(&ns.dir, "records.json", &records(REPLICA_A))?;
    let mut m = manager(&ns, backend, &recs).await?;
    let url = format!("https://{NODE_IP}:{TUNNEL_PORT}/healthz");
    curl_until_ok(&ns, &f, &url).await?;
    // A client loop that connects continuously; one line per attempt.
    let script = format!(
        "for i in $(seq 120); do curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 5 --cacert {} --cert {} --key {} -H 'Host: not-a-node.example' {url} || echo FAIL; done",
        f.front_ca, f.client.0, f.client.1
    );
    let mut prefix = ns.prefix().to_vec();
    prefix.extend(["bash", "-c"]);
    let mut loop_ = process_loop(&prefix, &script).await?;
    let mut codes = Vec::new();
    while codes.len() < 40 {
        codes.push(loop_.recv().await.context("client loop ended early")?);
    }
    // Move the port to replica B while the loop runs.
    write(&ns.dir, "records.json", &records(REPLICA_B))?;
    m.wait_line("synced", Duration::from_secs(10)).await?;
    while let Some(code) = loop_.recv().await {
        codes.push(code);
    }
    ensure!(codes.len() == 120, "loop ran {} times", codes.len());
    let failed: Vec<_> = codes.iter().filter(|c| *c != "200").collect();
    ensure!(
        failed.is_empty(),
        "{} failed connections during the update: {failed:?}",
        failed.len()
    );
    let table = match backend {
        "nftables" => {
            ns.ok(&["nft", "list", "table", "inet", "tether_tunnel"])
                .await?
        }
        b => {
            ns.ok(&[iptables(b), "-t", "nat", "-S", "TUNNEL-PORT"])
                .await?
        }
    };
    ensure!(
        table.contains(&format!("{REPLICA_B}:10003")),
        "rules did not move: {table}"
    );
    Ok(())
}

/// Runs `prefix script` and streams its stdout lines.
async fn process_loop(
    prefix: &[&str],
    script: &str,
) -> anyhow::Result<tokio::sync::mpsc::Receiver<String>> {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(prefix[0])
        .args(&prefix[1..])
        .arg(script)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = child.stdout.take().context("stdout")?;
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(out).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if tx.send(l).await.is_err() {
                break;
            }
        }
        let _ = child.wait().await;
    });
    Ok(rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_update_loses_no_connection_iptables_legacy() {
    require_root!();
    bounded(NETNS_TEST_TIMEOUT, hot_update("legacy")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_update_loses_no_connection_iptables_nft() {
    require_root!();
    bounded(NETNS_TEST_TIMEOUT, hot_update("nft")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_update_loses_no_connection_nftables() {
    require_root!();
    bounded(NETNS_TEST_TIMEOUT, hot_update("nftables")).await;
}

/// Polls `check` (bounded) until it holds.
async fn eventually<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    // 15 s: repairs take one resync (0.3 s) and one exec; the margin is for
    // a loaded CI machine.
    for _ in 0..300 {
        if check().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{what} did not happen within 15 s")
}

/// A freshly synced manager must see no drift in its own rules: what it
/// expects has to match what the kernel reports, or it would loop repairing.
async fn no_spurious_repair(m: &mut Role) -> anyhow::Result<()> {
    // Several resync intervals (0.3 s each).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    while let Ok(line) = m.lines.try_recv() {
        ensure!(
            !line.contains("restoring them"),
            "repair without damage: {line}"
        );
    }
    Ok(())
}

async fn drift_repair(backend: &str) -> anyhow::Result<()> {
    let ns = Netns::new().await?;
    let recs = write(&ns.dir, "records.json", &records(REPLICA_A))?;
    if backend == "nftables" {
        let foreign = write(
            &ns.dir,
            "foreign.nft",
            "table inet foreign {\n\tchain c {\n\t\ttype nat hook output priority -50;\n\t\ttcp dport 9999 accept\n\t}\n}\n",
        )?;
        ns.ok(&["nft", "-f", &foreign]).await?;
        let mut m = manager(&ns, backend, &recs).await?;
        no_spurious_repair(&mut m).await?;
        let listing = || async {
            ns.ok(&["nft", "list", "table", "inet", "tether_tunnel"])
                .await
        };
        let good = listing().await?;
        ns.ok(&[
            "nft",
            "flush",
            "chain",
            "inet",
            "tether_tunnel",
            "tunnel_port",
        ])
        .await?;
        eventually("restoring the flushed chain", || async {
            Ok(listing().await? == good)
        })
        .await
        .with_context(|| format!("want:\n{good}"))?;
        ns.ok(&["nft", "delete", "table", "inet", "tether_tunnel"])
            .await?;
        eventually("restoring the deleted table", || async {
            Ok(ns
                .run(&["nft", "list", "table", "inet", "tether_tunnel"])
                .await?
                .1
                == good)
        })
        .await
        .with_context(|| format!("want:\n{good}"))?;
        let other = ns.ok(&["nft", "list", "table", "inet", "foreign"]).await?;
        ensure!(
            other.contains("tcp dport 9999 accept"),
            "foreign table changed: {other}"
        );
        return Ok(());
    }
    let ipt = iptables(backend);
    ns.ok(&[ipt, "-t", "nat", "-N", "FOREIGN"]).await?;
    ns.ok(&[
        ipt, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9999", "-j", "FOREIGN",
    ])
    .await?;
    let mut m = manager(&ns, backend, &recs).await?;
    no_spurious_repair(&mut m).await?;
    let save = || async {
        let s = ns.ok(&[&format!("{ipt}-save"), "-t", "nat"]).await?;
        Ok::<_, anyhow::Error>(
            s.lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n"),
        )
    };
    let good = save().await?;
    ensure!(good.contains("-j TUNNEL-PORT") && good.contains("-j FOREIGN"));
    // Delete one owned rule, then flush the chain, then remove a jump.
    for damage in [
        vec!["-t", "nat", "-D", "TUNNEL-PORT", "1"],
        vec!["-t", "nat", "-F", "TUNNEL-PORT"],
        vec![
            "-t",
            "nat",
            "-D",
            "OUTPUT",
            "-p",
            "tcp",
            "-m",
            "comment",
            "--comment",
            "tether tunnel ports",
            "-j",
            "TUNNEL-PORT",
        ],
    ] {
        let mut args = vec![ipt];
        args.extend(damage.iter().copied());
        ns.ok(&args).await?;
        ensure!(save().await? != good, "damage {damage:?} changed nothing");
        eventually(&format!("repair of {damage:?}"), || async {
            Ok(save().await? == good)
        })
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_repaired_and_foreign_rules_kept_iptables_legacy() {
    require_root!();
    bounded(NETNS_TEST_TIMEOUT, drift_repair("legacy")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_repaired_and_foreign_rules_kept_iptables_nft() {
    require_root!();
    bounded(NETNS_TEST_TIMEOUT, drift_repair("nft")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_repaired_and_foreign_rules_kept_nftables() {
    require_root!();
    bounded(NETNS_TEST_TIMEOUT, drift_repair("nftables")).await;
}

async fn cleanup_restores_tables(backend: &str) -> anyhow::Result<()> {
    let ns = Netns::new().await?;
    let dump: Vec<&str> = match backend {
        "nftables" => vec!["nft", "list", "ruleset"],
        "legacy" => vec!["iptables-legacy-save"],
        _ => vec!["iptables-nft-save"],
    };
    // Someone else's rules exist before Tether runs.
    match backend {
        "nftables" => {
            let foreign = write(
                &ns.dir,
                "foreign.nft",
                "table inet foreign {\n\tchain c {\n\t\ttype nat hook prerouting priority -100;\n\t\ttcp dport 9999 accept\n\t}\n}\n",
            )?;
            ns.ok(&["nft", "-f", &foreign]).await?;
        }
        b => {
            ns.ok(&[
                iptables(b),
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "--dport",
                "9999",
                "-j",
                "ACCEPT",
            ])
            .await?;
            ns.ok(&[
                iptables(b),
                "-t",
                "filter",
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--dport",
                "9999",
                "-j",
                "ACCEPT",
            ])
            .await?;
        }
    }
    let strip = |s: String| {
        s.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    };
    let before = strip(ns.ok(&dump).await?);
    let recs = write(&ns.dir, "records.json", &records(REPLICA_A))?;
    let (success, _, err) = ns.manager_once(backend, &recs).await?;
    ensure!(success, "sync failed: {err}");
    ensure!(strip(ns.ok(&dump).await?) != before, "sync changed nothing");
    let (success, _, err) = ns
        .run(&[
            process::BIN,
            "iptables-manager",
            "--cleanup",
            "--backend",
            backend,
        ])
        .await?;
    ensure!(success, "cleanup failed: {err}");
    let after = strip(ns.ok(&dump).await?);
    ensure!(
        after == before,
        "tables differ after cleanup:\nbefore:\n{before}\nafter:\n{after}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_leaves_tables_as_before_iptables_legacy() {
    require_root!();
    bounded(NETNS_TEST_TIMEOUT, cleanup_restores_tables("legacy")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_leaves_tables_as_before_iptables_nft() {
    require_root!();
    bounded(NETNS_TEST_TIMEOUT, cleanup_restores_tables("nft")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_leaves_tables_as_before_nftables() {
    require_root!();
    bounded(NETNS_TEST_TIMEOUT, cleanup_restores_tables("nftables")).await;
}

async fn bad_input_keeps_rules(backend: &str) -> anyhow::Result<()> {
    let ns = Netns::new().await?;
    let listing = || async {
        match backend {
            "nftables" => {
                ns.ok(&["nft", "list", "table", "inet", "tether_tunnel"])
                    .await
            }
            b => {
                ns.ok(&[iptables(b), "-t", "nat", "-S", "TUNNEL-PORT"])
                    .await
            }
        }
    };
    let recs = write(&ns.dir, "records.json", &records(REPLICA_A))?;
    let mut m = manager(&ns, backend, &recs).await?;
    let good = listing().await?;
    for (content, cause) in [
        ("{\"ipTunnelPort\": {\"10.99.0.1\": ", "malformed"),
        (
            r#"{"ipTunnelPort":{"10.99.0.1":10351,"10.99.0.2":10351}}"#,
            "claimed by both 10.99.0.1 and 10.99.0.2",
        ),
        (
            r#"{"ipTunnelPort":{"10.99.0.1":22}}"#,
            "outside the allowed range",
        ),
    ] {
        // The running manager refuses it and keeps its rules...
        write(&ns.dir, "records.json", content)?;
        let line = m
            .wait_line("records refused", Duration::from_secs(10))
            .await?;
        ensure!(
            line.contains(cause),
            "log does not name the cause {cause:?}: {line}"
        );
        ensure!(listing().await? == good, "rules changed after bad input");
        // ...and a one-shot run fails with the cause, applying nothing.
        let bad = write(&ns.dir, "bad.json", content)?;
        let (success, _, err) = ns.manager_once(backend, &bad).await?;
        ensure!(
            !success && err.contains(cause),
            "--once with bad input: {err}"
        );
        ensure!(
            listing().await? == good,
            "rules changed after a failed --once"
        );
    }
    // A missing netfilter binary is named, and nothing changes.
    let recs = write(&ns.dir, "good.json", &records(REPLICA_B))?;
    let (success, _, err) = ns
        .run(&[
            "env",
            "PATH=/nonexistent",
            process::BIN,
            "iptables-manager",
            "--once",
            "--records",
            &recs,
            "--backend",
            backend,
        ])
        .await?;
    ensure!(
        !success && err.contains("not found in PATH"),
        "missing binary: {err}"
    );
    ensure!(listing().await? == good);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_keeps_last_good_rules_iptables_legacy() {
    require_root!();
    bounded(NETNS_TEST_TIMEOUT, bad_input_keeps_rules("legacy")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_keeps_last_good_rules_iptables_nft() {
    require_root!();
    bounded(NETNS_TEST_TIMEOUT, bad_input_keeps_rules("nft")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_keeps_last_good_rules_nftables() {
    require_root!();
    bounded(NETNS_TEST_TIMEOUT, bad_input_keeps_rules("nftables")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_backend_follows_the_rules_the_host_has() {
    require_root!();
    bounded(NETNS_TEST_TIMEOUT, async {
        let ns = Netns::new().await?;
        // The host's rules live in iptables-legacy, so auto must pick it.
        ns.ok(&[
            "iptables-legacy",
            "-t",
            "filter",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            "9999",
            "-j",
            "ACCEPT",
        ])
        .await?;
        let recs = write(&ns.dir, "records.json", &records(REPLICA_A))?;
        let (success, _, err) = ns.manager_once("auto", &recs).await?;
        ensure!(success, "{err}");
        ensure!(
            err.contains("using iptables-legacy"),
            "auto did not explain picking legacy: {err}"
        );
        let rules = ns
            .ok(&["iptables-legacy", "-t", "nat", "-S", "TUNNEL-PORT"])
            .await?;
        ensure!(rules.contains("--to-destination 10.99.0.1:10003"));
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnat_through_real_stack_ipv6_iptables_legacy() {
    require_root!();
    bounded(NETNS_TEST_TIMEOUT, dnat_through_real_stack("legacy", true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnat_through_real_stack_ipv6_iptables_nft() {
    require_root!();
    bounded(NETNS_TEST_TIMEOUT, dnat_through_real_stack("nft", true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnat_through_real_stack_ipv6_nftables() {
    require_root!();
    bounded(
        NETNS_TEST_TIMEOUT,
        dnat_through_real_stack("nftables", true),
    )
    .await;
}
