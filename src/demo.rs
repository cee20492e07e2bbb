//! `tether demo`: cloud, edge and a sample kubelet on loopback with a
//! throwaway PKI. Sends logs, exec and metrics requests through the real
//! mTLS tunnel, and a message each way through the hub channel in the same
//! session, prints what happened and the curl commands to try by hand,
//! then serves until Ctrl-C (or, with `--self-test`, drains and exits).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use tokio::net::TcpListener;

use tether_cloudhub::hub::{CloudHub, CloudHubConfig};
use tether_edgehub::hub::{EdgeHub, EdgeHubConfig};
use tether_hub::dispatch::{Event, Filter};
use tether_hub::{Content, HubMetrics, Message, Route, Store};
use tether_tests::fixture::{FixtureKubelet, LogVerifier};
use tether_tests::harness::{CloudHandle, CloudSpec, EdgeHandle, EdgeSpec, Pki};
use tether_tests::kubectl;
use tether_tunnel::Shutdown;

const NODE: &str = "demo-edge";
const NODE_IP: &str = "10.77.0.2";
const SELF_TEST_BUDGET: Duration = Duration::from_secs(60);

/// Runs the demo; returns whether every check passed.
pub(crate) async fn run(self_test: bool) -> anyhow::Result<bool> {
    let started = Instant::now();
    let pki = Pki::generate()?;
    let kubelet = FixtureKubelet::start(None)
        .await
        .context("start sample kubelet")?;
    let work = std::env::temp_dir().join(format!("tether-demo-state-{}", std::process::id()));
    // The message hub on both sides, carried inside the tunnel session.
    let cloud_hub = CloudHub::new(
        CloudHubConfig::default(),
        Store::in_memory(),
        HubMetrics::default(),
    )?;
    let edge_hub = EdgeHub::new(
        EdgeHubConfig::default(),
        Store::in_memory(),
        HubMetrics::default(),
    )?;
    let spec = CloudSpec {
        tunnel_addr: Some(free_or_any("127.0.0.1:10004").await),
        front_addr: Some(free_or_any("127.0.0.1:10003").await),
        state_dir: Some(work.join("cloud")),
        hub: Some(cloud_hub.clone()),
        ..CloudSpec::default()
    };
    let cloud = CloudHandle::start(&pki, spec).await?;
    // Enrol the edge the way an operator would: a single-use token bound to
    // the node and its address; the edge starts with nothing but the token.
    let state = cloud
        .state
        .as_ref()
        .context("the demo cloud runs the hub")?;
    let token = state.tokens.create(
        state.ca().cert_der(),
        Duration::from_secs(600),
        true,
        Some(NODE.to_owned()),
        vec![NODE_IP.parse()?],
    )?;
    let mut edge_spec = EdgeSpec::new(NODE, kubelet.addr);
    edge_spec.ips = vec![NODE_IP.parse()?];
    edge_spec.hub = Some(edge_hub.clone());
    let edge = EdgeHandle::enrol(&cloud, Some(&token), &work.join("edge"), edge_spec)
        .await
        .context("enrol the demo edge with its bootstrap token")?;
    let admin = TcpListener::bind("127.0.0.1:0").await?;
    let admin_addr = admin.local_addr()?;
    let (admin_stop, admin_shutdown) = Shutdown::new(Duration::ZERO);
    let registry = cloud.registry.clone();
    tokio::spawn(tether_metrics_adapter::serve(
        admin,
        tether_metrics_adapter::Admin {
            registry: cloud.metrics.clone(),
            ready: Arc::new(move || !registry.is_empty()),
            tunnelport: None,
            sd: None,
            sessions: None,
            hub_api: None,
            documents: Vec::new(),
            preauth: tether_tunnel::PreAuthGate::new(Default::default(), Default::default()),
        },
        admin_shutdown,
    ));

    say(&format!(
        "sample kubelet  http://{}  (stands in for edged on 127.0.0.1:10350)",
        kubelet.addr
    ));
    say(&format!(
        "cloud tunnel    {}  (edges dial here, mTLS + WebSocket tether.v1)",
        cloud.tunnel_addr
    ));
    say(&format!(
        "kubelet front   https://{}  (what the apiserver talks to; client cert required)",
        cloud.front_addr
    ));
    say(&format!(
        "bootstrap       https://{}  (the edge enrolled with single-use token {}...)",
        cloud
            .bootstrap_addr
            .map(|a| a.to_string())
            .unwrap_or_default(),
        &token.expose()[..24]
    ));
    say(&format!("admin           http://{admin_addr}/metrics"));
    let session = cloud
        .registry
        .wait_for_node(NODE, None, Duration::from_secs(10))
        .await
        .context("the edge did not connect within 10 s")?;
    say(&format!(
        "edge {NODE} connected from {} (identity from its certificate, IP SANs {:?})\n",
        session.info().peer,
        session.info().ips
    ));

    let mut passed = 0;
    let mut failed = 0;
    for (name, result) in [
        ("logs", check_logs(&cloud, &pki).await),
        ("logs --follow", check_follow(&cloud, &pki, &kubelet).await),
        ("exec", check_exec(&cloud, &pki).await),
        ("metrics", check_metrics(&cloud, &pki).await),
        ("hub", check_hub(&cloud_hub, &edge_hub).await),
        ("unknown node", check_unknown(&cloud, &pki).await),
        ("no client cert", check_anonymous(&cloud, &pki).await),
    ] {
        match result {
            Ok(what) => {
                passed += 1;
                say(&format!("  ok    {name:<15} {what}"));
            }
            Err(e) => {
                failed += 1;
                say(&format!("  FAIL  {name:<15} {e:#}"));
            }
        }
    }
    say(&format!("\n{passed} checks passed, {failed} failed"));

    let dir = write_client_files(&pki).context("write demo client certificates")?;
    print_try_it(&dir, cloud.front_addr, admin_addr);

    if !self_test {
        say("\nserving until Ctrl-C ...");
        tokio::signal::ctrl_c().await?;
    }
    // Drain every role the way SIGTERM does.
    let drain_started = Instant::now();
    tokio::join!(edge.stop(), cloud.stop());
    admin_stop.trigger();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&work);
    say(&format!(
        "drained and stopped in {:?}",
        drain_started.elapsed()
    ));
    let in_budget = started.elapsed() < SELF_TEST_BUDGET;
    if self_test && !in_budget {
        say(&format!(
            "FAIL  self-test took {:?} (budget {SELF_TEST_BUDGET:?})",
            started.elapsed()
        ));
    }
    Ok(failed == 0 && (!self_test || in_budget))
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

/// The well-known port when free, else any free port.
async fn free_or_any(addr: &str) -> SocketAddr {
    let want: SocketAddr = addr.parse().expect("static address");
    match TcpListener::bind(want).await {
        Ok(l) => {
            drop(l);
            want
        }
        Err(_) => SocketAddr::new(want.ip(), 0),
    }
}

async fn check_logs(cloud: &CloudHandle, pki: &Pki) -> anyhow::Result<String> {
    const N: u64 = 8 << 20;
    let conn = cloud.front_conn(pki.apiserver_tls()?).await?;
    let started = Instant::now();
    let resp = kubectl::get_streaming(
        conn,
        NODE,
        &format!("/containerLogs/default/demo/app?bytes={N}"),
    )
    .await?;
    ensure!(resp.status() == 200, "status {}", resp.status());
    let mut body = resp.into_body();
    let mut v = LogVerifier::new(0);
    let mut first = None;
    while let Some(chunk) = kubectl::next_chunk(&mut body).await? {
        if first.is_none() {
            first = Some(
                String::from_utf8_lossy(&chunk[..64.min(chunk.len())])
                    .trim_end()
                    .to_owned(),
            );
        }
        v.update(&chunk)?;
    }
    ensure!(v.offset() == N, "got {} of {N} bytes", v.offset());
    Ok(format!(
        "GET /containerLogs/default/demo/app: 8 MiB byte-exact in {:?}; first line {:?}",
        started.elapsed(),
        first.unwrap_or_default()
    ))
}

async fn check_follow(
    cloud: &CloudHandle,
    pki: &Pki,
    kubelet: &FixtureKubelet,
) -> anyhow::Result<String> {
    let before = kubelet.follow_disconnects();
    let conn = cloud.front_conn(pki.apiserver_tls()?).await?;
    let resp = kubectl::get_streaming(
        conn,
        NODE,
        "/containerLogs/default/demo/app?follow=true&bytes=256",
    )
    .await?;
    let mut body = resp.into_body();
    let mut got = 0;
    while got < 256 + 3 * 64 {
        got += kubectl::next_chunk(&mut body)
            .await?
            .context("follow stream ended")?
            .len();
    }
    drop(body);
    ensure!(
        kubelet
            .wait_follow_disconnect(before, Duration::from_secs(1))
            .await,
        "the kubelet did not see the client go away"
    );
    Ok("follow=true streamed new lines; closing the client reached the kubelet".into())
}

async fn check_exec(cloud: &CloudHandle, pki: &Pki) -> anyhow::Result<String> {
    let conn = cloud.front_conn(pki.apiserver_tls()?).await?;
    // The command is this binary's hidden `demo-greeter`, not `sh`, so the
    // demo also runs where there is no shell, e.g. inside the image.
    let exe = std::env::current_exe().context("path of this binary")?;
    let exe = exe.to_str().context("path of this binary is not UTF-8")?;
    let path = kubectl::exec_path("default", "demo", "app", &[exe, "demo-greeter"], true);
    let out = kubectl::exec_ws(conn, NODE, &path, b"tether\n").await?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
    ensure!(stdout.starts_with("hello tether from"), "stdout {stdout:?}");
    ensure!(
        out.stderr == b"warning\n",
        "stderr {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.exit_code == 7, "exit code {}", out.exit_code);
    Ok(format!(
        "exec over WebSocket v5.channel.k8s.io: stdin \"tether\", stdout {stdout:?}, stderr \"warning\", exit code 7"
    ))
}

/// A message to the edge and one back, through the hub channel that rides
/// in the same tunnel session as the kubelet streams.
async fn check_hub(cloud: &CloudHub, edge: &EdgeHub) -> anyhow::Result<String> {
    let started = Instant::now();
    while !(edge.is_online() && cloud.node(NODE).is_some_and(|n| n.online)) {
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the hub channel did not come up in the tunnel"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let message = |op: &str, text: &str| {
        Message::new(
            Route {
                source: "demo".into(),
                group: "demo".into(),
                operation: op.into(),
                resource: "greeting".into(),
            },
            Content::Json(serde_json::json!(text)),
        )
    };
    let filter = Filter {
        group: Some("demo".into()),
        ..Filter::default()
    };
    let (mut down, mut up) = (edge.subscribe(filter.clone())?, cloud.subscribe(filter)?);
    let started = Instant::now();
    cloud
        .publish(NODE, message("hello", "from the cloud"))
        .await?;
    next_message(&mut down).await?;
    edge.publish(message("reply", "from the edge")).await?;
    next_message(&mut up).await?;
    Ok(format!(
        "a message to the edge and one back, acknowledged, in {:?}; one connection carries tunnel and hub",
        started.elapsed()
    ))
}

async fn next_message(rx: &mut tokio::sync::mpsc::Receiver<Event>) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => anyhow::bail!("no message within 5 s"),
            Ok(None) => anyhow::bail!("subscription ended"),
            Ok(Some(Event::Message { .. })) => return Ok(()),
            Ok(Some(_)) => {}
        }
    }
}

async fn check_metrics(cloud: &CloudHandle, pki: &Pki) -> anyhow::Result<String> {
    let conn = cloud.front_conn(pki.apiserver_tls()?).await?;
    let (parts, body) = kubectl::get(conn, NODE_IP, "/metrics/cadvisor").await?;
    ensure!(parts.status == 200, "status {}", parts.status);
    let longest = body
        .split(|b| *b == b'\n')
        .map(<[u8]>::len)
        .max()
        .unwrap_or(0);
    Ok(format!(
        "GET /metrics/cadvisor (routed by node IP {NODE_IP}): {} KiB, longest line {} KiB, untruncated",
        body.len() / 1024,
        longest / 1024
    ))
}

async fn check_unknown(cloud: &CloudHandle, pki: &Pki) -> anyhow::Result<String> {
    let conn = cloud.front_conn(pki.apiserver_tls()?).await?;
    let (parts, body) =
        kubectl::get(conn, "no-such-node", "/containerLogs/default/demo/app").await?;
    ensure!(parts.status == 404, "status {}", parts.status);
    let status: serde_json::Value = serde_json::from_slice(&body)?;
    Ok(format!(
        "404 Status: {}",
        status["message"].as_str().unwrap_or_default()
    ))
}

async fn check_anonymous(cloud: &CloudHandle, pki: &Pki) -> anyhow::Result<String> {
    let refused = async {
        let conn = cloud
            .front_conn(pki.front_client_tls(None, "", &[])?)
            .await?;
        kubectl::get(conn, NODE, "/healthz").await
    }
    .await;
    ensure!(refused.is_err(), "an anonymous client was served");
    Ok("a client without a certificate is refused during TLS".into())
}

fn write_client_files(pki: &Pki) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::env::temp_dir().join(format!("tether-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let client = pki
        .front_ca
        .issue_client("kube-apiserver-kubelet-client", &["system:masters"])?;
    std::fs::write(dir.join("ca.crt"), pki.front_ca.cert_pem())?;
    std::fs::write(dir.join("client.crt"), &client.cert_pem)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join("client.key"))?
        .write_all(client.key_pem.expose().as_bytes())?;
    Ok(dir)
}

fn print_try_it(dir: &Path, front: SocketAddr, admin: SocketAddr) {
    let d = dir.display();
    let c = format!("curl -sS --cacert {d}/ca.crt --cert {d}/client.crt --key {d}/client.key");
    say("\ntry it by hand (files are removed when the demo stops):");
    say(&format!(
        "  {c} -H 'Host: {NODE}' 'https://{front}/containerLogs/default/demo/app?bytes=640'"
    ));
    say(&format!(
        "  {c} -H 'Host: {NODE}' -N 'https://{front}/containerLogs/default/demo/app?follow=true'"
    ));
    say(&format!(
        "  {c} -H 'Host: {NODE_IP}' 'https://{front}/metrics/cadvisor' | head -c 600"
    ));
    say(&format!(
        "  {c} -H 'Host: no-such-node' 'https://{front}/healthz'"
    ));
    say(&format!("  curl -sS http://{admin}/metrics"));
}

/// The process the demo's exec runs: reads a name on stdin, greets it on
/// stdout, warns on stderr and exits 7, so one exec shows all three streams
/// and the exit status crossing the tunnel.
pub(crate) fn greeter() -> std::process::ExitCode {
    let mut name = String::new();
    let _ = std::io::stdin().read_line(&mut name);
    println!("hello {} from {}", name.trim(), std::env::consts::OS);
    eprintln!("warning");
    std::process::ExitCode::from(7)
}
