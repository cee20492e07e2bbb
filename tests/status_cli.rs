//! The operator's read commands against real processes on loopback:
//! `tether nodes` against a cloud holding two edges, `tether edge status`
//! against a connected edge and one whose cloud is down, and the log
//! formats (no escape bytes off a terminal; `--log-format json` is one JSON
//! object per line).

mod process;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use process::{BIN, Role, write};
use serde_json::Value;
use tether_tests::harness::Pki;

const NODES: [&str; 2] = ["edge-a", "edge-b"];

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Certificates and configs of one cloud and two edges.
struct Files {
    dir: PathBuf,
    edge_ca: String,
    tunnel: (String, String),
    front: (String, String),
    front_ca: String,
    nodes: Vec<(String, String)>,
    cloud_cfg: String,
    edge_cfg: String,
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn files(name: &str) -> anyhow::Result<Files> {
    let dir = std::env::temp_dir().join(format!(
        "tether-{name}-{}-{}",
        std::process::id(),
        tether_pki::rand_u64()
    ));
    std::fs::create_dir_all(&dir)?;
    let pki = Pki::generate()?;
    let tunnel = pki
        .edge_ca
        .issue_server("tether-cloud", &["localhost", "127.0.0.1"])?;
    let front = pki.front_ca.issue_server("tether-cloud", &["localhost"])?;
    let f = |n: &str, pem: &str| write(&dir, n, pem);
    let mut nodes = Vec::new();
    for (i, node) in NODES.iter().enumerate() {
        let ip: std::net::IpAddr = format!("10.77.0.{}", i + 1).parse()?;
        let c = pki.edge_ca.issue_node_client(node, &[ip])?;
        nodes.push((
            f(&format!("{node}.crt"), &c.cert_pem)?,
            f(&format!("{node}.key"), c.key_pem.expose())?,
        ));
    }
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
        nodes,
        // The RTT probe runs every keepalive interval: 1 s here.
        cloud_cfg: f(
            "cloud.yaml",
            "drain_timeout_secs: 1\nlimits:\n  keepalive_interval: 1\n  keepalive_timeout: 3\n",
        )?,
        edge_cfg: f(
            "edge.yaml",
            "backoff_base_ms: 50\nbackoff_max_secs: 1\ndrain_timeout_secs: 1\nlimits:\n  handshake_timeout: 2\n",
        )?,
        dir,
    })
}

struct Addrs {
    tunnel: u16,
    hub: u16,
    admin: u16,
}

async fn cloud(f: &Files, a: &Addrs) -> anyhow::Result<Role> {
    let (tunnel, hub, admin) = (
        format!("127.0.0.1:{}", a.tunnel),
        format!("127.0.0.1:{}", a.hub),
        format!("127.0.0.1:{}", a.admin),
    );
    process::spawn(
        &[],
        &[
            "cloud",
            "--config",
            &f.cloud_cfg,
            "--tunnel-addr",
            &tunnel,
            "--hub-addr",
            &hub,
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
        ],
        "cloud started",
    )
    .await
}

/// The arguments of edge `i`, its admin endpoint on `admin`.
fn edge_args(f: &Files, a: &Addrs, i: usize, admin: u16) -> Vec<String> {
    let state = f.dir.join(NODES[i]);
    [
        "edge",
        "--config",
        &f.edge_cfg,
        "--node-name",
        NODES[i],
        "--cloud-addr",
        &format!("127.0.0.1:{}", a.tunnel),
        "--hub-addr",
        &format!("127.0.0.1:{}", a.hub),
        "--cloud-server-name",
        "localhost",
        "--ca",
        &f.edge_ca,
        "--cert",
        &f.nodes[i].0,
        "--key",
        &f.nodes[i].1,
        "--state-dir",
        &state.display().to_string(),
        "--kubelet-url",
        "http://127.0.0.1:1",
        "--admin-addr",
        &format!("127.0.0.1:{admin}"),
    ]
    .map(String::from)
    .to_vec()
}

async fn edge(f: &Files, a: &Addrs, i: usize, admin: u16) -> anyhow::Result<Role> {
    let args = edge_args(f, a, i, admin);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    process::spawn(&[], &refs, "edge started").await
}

/// Runs `tether args...`; (success, stdout, stderr).
async fn tether(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let mut all = vec![BIN];
    all.extend_from_slice(args);
    process::run(&all).await
}

/// Polls `tether nodes -o json` until `check` accepts the document (bounded).
async fn nodes_until(admin: &str, check: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out, err) = tether(&["nodes", "--admin", admin, "-o", "json"]).await?;
        ensure!(ok, "tether nodes -o json failed: {err}");
        let doc: Value = serde_json::from_str(&out).context("tether nodes -o json")?;
        if check(&doc) {
            return Ok(doc);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the /nodes document never passed the check: {doc:#}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_lists_both_edges_as_table_and_json() -> anyhow::Result<()> {
    let f = files("nodes")?;
    let a = Addrs {
        tunnel: free_port()?,
        hub: free_port()?,
        admin: free_port()?,
    };
    let _cloud = cloud(&f, &a).await?;
    let _e0 = edge(&f, &a, 0, 0).await?;
    let _e1 = edge(&f, &a, 1, 0).await?;
    let admin = format!("http://127.0.0.1:{}", a.admin);

    // Both connected and probed at least once (the RTT is measured, not
    // made up, so it appears after the first probe).
    let doc = nodes_until(&admin, |d| {
        d["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 2 && n.iter().all(|n| n["rtt_ms"].as_f64().is_some()))
    })
    .await?;
    ensure!(doc["version"] == 1, "{doc:#}");
    ensure!(
        doc["replica"].is_null(),
        "standalone has no replica name: {doc:#}"
    );
    let nodes = doc["nodes"].as_array().context("nodes")?;
    for (i, n) in nodes.iter().enumerate() {
        ensure!(n["node"] == NODES[i], "sorted by name: {doc:#}");
        ensure!(n["local"] == true, "{n}");
        ensure!(
            n["ips"] == serde_json::json!([format!("10.77.0.{}", i + 1)]),
            "{n}"
        );
        let peer: std::net::SocketAddr = n["peer"].as_str().context("peer")?.parse()?;
        ensure!(peer.ip().is_loopback(), "{n}");
        ensure!(
            n["connected_at"]
                .as_i64()
                .is_some_and(|t| t > 1_600_000_000),
            "{n}"
        );
        ensure!(n["age_seconds"].as_u64().is_some_and(|s| s < 60), "{n}");
        ensure!(n["open_streams"].as_u64().is_some_and(|s| s < 3), "{n}");
        let rtt = n["rtt_ms"].as_f64().context("rtt_ms")?;
        ensure!(rtt > 0.0 && rtt < 1000.0, "loopback RTT {rtt} ms");
        ensure!(
            n["certificate"]["serial"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{n}"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64;
        let not_after = n["certificate"]["not_after"]
            .as_i64()
            .context("not_after")?;
        ensure!(not_after > now, "{n}");
        ensure!(n["endpoints"].is_array(), "{n}");
    }

    // The table: header and one row per node with sane columns.
    let (ok, out, err) = tether(&["nodes", "--admin", &admin]).await?;
    ensure!(ok, "tether nodes failed: {err}");
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.len() == 3, "{out}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    ensure!(
        header == ["NODE", "ADDRESS", "AGE", "RTT", "STREAMS", "CERT-EXPIRES"],
        "{out}"
    );
    for (i, line) in lines[1..].iter().enumerate() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        ensure!(cols.len() == 6, "{out}");
        ensure!(cols[0] == NODES[i], "{out}");
        ensure!(cols[1] == format!("10.77.0.{}", i + 1), "{out}");
        ensure!(
            cols[2].ends_with('s') || cols[2].ends_with('m'),
            "age: {out}"
        );
        ensure!(cols[3].ends_with("ms"), "rtt: {out}");
        ensure!(cols[4].parse::<u32>().is_ok(), "streams: {out}");
        // Pki::generate issues for about a year.
        ensure!(cols[5].ends_with('d'), "cert expiry: {out}");
    }
    let (ok, out, err) = tether(&["nodes", "--admin", &admin, "-o", "wide"]).await?;
    ensure!(ok, "tether nodes -o wide failed: {err}");
    ensure!(
        out.lines().next().unwrap_or("").contains("REPLICA"),
        "{out}"
    );
    let row: Vec<&str> = out
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    ensure!(
        row.len() == 10
            && row[6] == "<none>"
            && row[7].starts_with("127.0.0.1:")
            && row[9] == "tether",
        "{out}"
    );
    Ok(())
}

#[tokio::test]
async fn nodes_names_an_unreachable_admin_address_and_fails() -> anyhow::Result<()> {
    let port = free_port()?;
    let admin = format!("http://127.0.0.1:{port}");
    let (ok, out, err) = tether(&["nodes", "--admin", &admin]).await?;
    ensure!(!ok, "succeeded against a closed port: {out}");
    ensure!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    ensure!(out.is_empty(), "{out}");
    Ok(())
}

async fn status(admin: u16, json: bool) -> anyhow::Result<String> {
    let url = format!("http://127.0.0.1:{admin}");
    let mut args = vec!["edge", "status", "--admin", &url];
    if json {
        args.extend(["-o", "json"]);
    }
    let (ok, out, err) = tether(&args).await?;
    ensure!(ok, "tether edge status failed: {err}");
    Ok(out)
}

/// Polls `tether edge status -o json` until `check` accepts it (bounded).
async fn status_until(admin: u16, check: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let doc: Value = serde_json::from_str(&status(admin, true).await?)?;
        if check(&doc) {
            return Ok(doc);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the /status document never passed the check: {doc:#}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_status_connected_and_with_the_cloud_down() -> anyhow::Result<()> {
    let f = files("edge-status")?;
    let a = Addrs {
        tunnel: free_port()?,
        hub: free_port()?,
        admin: free_port()?,
    };
    let mut cloud = cloud(&f, &a).await?;
    let edge_admin = free_port()?;
    let _edge = edge(&f, &a, 0, edge_admin).await?;

    let doc = status_until(edge_admin, |d| d["tunnel"]["state"] == "connected").await?;
    ensure!(doc["version"] == 1 && doc["node"] == NODES[0], "{doc:#}");
    ensure!(doc["cloud"] == format!("127.0.0.1:{}", a.tunnel), "{doc:#}");
    ensure!(doc["tunnel"]["connected_since"].is_i64(), "{doc:#}");
    ensure!(doc["hub"]["enabled"] == true, "{doc:#}");
    ensure!(doc["hub"]["queue_depth"].is_i64(), "{doc:#}");
    ensure!(doc["certificate"]["source"] == "files", "{doc:#}");
    ensure!(doc["certificate"]["not_after"].is_i64(), "{doc:#}");
    let text = status(edge_admin, false).await?;
    ensure!(
        text.contains("Tunnel:") && text.contains("connected (since"),
        "{text}"
    );
    ensure!(!text.contains("not connected: "), "{text}");

    // The cloud goes away: the edge backs off and says why.
    cloud.child.kill().await?;
    let doc = status_until(edge_admin, |d| {
        d["tunnel"]["state"] != "connected" && d["tunnel"]["last_error"].is_object()
    })
    .await?;
    let message = doc["tunnel"]["last_error"]["message"]
        .as_str()
        .context("message")?;
    ensure!(!message.is_empty(), "{doc:#}");
    ensure!(doc["tunnel"]["connected_since"].is_null(), "{doc:#}");
    let text = status_until_text(edge_admin).await?;
    ensure!(text.contains("not connected"), "{text}");
    ensure!(last_error_line(&text).is_some(), "{text}");
    Ok(())
}

/// The text form once it shows the edge not connected with an error (the
/// state moves between backoff and connecting while the cloud is down).
async fn status_until_text(admin: u16) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = status(admin, false).await?;
        if text.contains("not connected") && last_error_line(&text).is_some() {
            return Ok(text);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("edge status never showed the lost tunnel: {text}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The text form's last error, unless it is `<none>`.
fn last_error_line(text: &str) -> Option<&str> {
    let line = text.lines().find(|l| l.starts_with("Last error:"))?;
    let value = line.trim_start_matches("Last error:").trim();
    (value != "<none>" && !value.is_empty()).then_some(value)
}

/// Starts an edge whose cloud is not there (it logs a dial failure at once,
/// inside its `edge` span), stderr to a file, with `extra` arguments
/// before the subcommand; returns the log once it shows the failure twice.
async fn edge_log_to_file(extra: &[&str], name: &str) -> anyhow::Result<Vec<u8>> {
    let f = files(name)?;
    let a = Addrs {
        tunnel: free_port()?,
        hub: free_port()?,
        admin: free_port()?,
    };
    let log = f.dir.join("stderr.log");
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    args.extend(edge_args(&f, &a, 0, 0));
    args.push("--no-hub".into());
    let mut child = tokio::process::Command::new(BIN)
        .args(&args)
        .env("TETHER_LOG", "info")
        // Nothing here turns colours off but stderr not being a terminal.
        .env_remove("NO_COLOR")
        .env_remove("TETHER_LOG_FORMAT")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true)
        .spawn()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let bytes = loop {
        let bytes = std::fs::read(&log)?;
        if String::from_utf8_lossy(&bytes)
            .matches("tunnel dial failed")
            .count()
            >= 2
        {
            break bytes;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "no dial failure logged: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    child.kill().await?;
    Ok(bytes)
}

#[tokio::test]
async fn logs_to_a_file_are_plain_text_or_json_lines() -> anyhow::Result<()> {
    let text = edge_log_to_file(&[], "log-text").await?;
    ensure!(
        !text.contains(&0x1b),
        "escape bytes in a log file: {:?}",
        String::from_utf8_lossy(&text)
    );
    let text = String::from_utf8(text)?;
    ensure!(
        text.contains("edge started") && text.contains("node=edge-a"),
        "{text}"
    );

    let json = edge_log_to_file(&["--log-format", "json"], "log-json").await?;
    ensure!(!json.contains(&0x1b), "escape bytes in JSON logs");
    let json = String::from_utf8(json)?;
    let mut dial_failures = 0;
    for line in json.lines() {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("a log line is not JSON: {line:?}"))?;
        ensure!(v.is_object(), "{line}");
        ensure!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if v["message"] == "tunnel dial failed" {
            dial_failures += 1;
            // The span it happened in carries the node.
            let spans = v["spans"].as_array().context("spans")?;
            ensure!(spans.iter().any(|s| s["node"] == NODES[0]), "{line}");
            ensure!(v["error"].is_string(), "{line}");
        }
    }
    ensure!(dial_failures >= 2, "{json}");
    Ok(())
}
