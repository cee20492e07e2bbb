//! Process-level tests of the `tether` binary: real cert files, real child
//! processes, SIGTERM. (Part of the root package, which owns the binary.)

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use tether_tests::fixture::FixtureKubelet;
use tether_tests::harness::Pki;
use tether_tests::kubectl;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_tether");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_self_test_passes() {
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        Command::new(BIN)
            .args(["demo", "--self-test"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("demo --self-test took over 90 s")
    .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("0 failed"), "{stdout}");
}

/// Spawns a role and waits for its "started" log line; returns the child and
/// the `key=value` fields of that line.
async fn spawn_role(args: &[&str]) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(BIN)
        .args(args)
        .env("TETHER_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let started = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("started") {
                return Ok(line);
            }
        }
        bail!("{args:?} exited before starting")
    })
    .await
    .context("role did not start in 20 s")??;
    // Keep draining stderr so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, started))
}

fn field(line: &str, key: &str) -> anyhow::Result<String> {
    let plain: String = line.chars().filter(|c| !c.is_control()).collect();
    let at = plain
        .find(&format!("{key}="))
        .with_context(|| format!("no {key}= in {plain:?}"))?;
    let rest = &plain[at + key.len() + 1..];
    Ok(rest
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .trim_matches('"')
        .to_owned())
}

fn write(dir: &Path, name: &str, pem: &str) -> anyhow::Result<String> {
    let p = dir.join(name);
    std::fs::write(&p, pem)?;
    Ok(p.display().to_string())
}

async fn sigterm(child: &Child) -> anyhow::Result<()> {
    let pid = child.id().context("child already gone")?;
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    ensure!(st.success(), "kill -TERM failed");
    Ok(())
}

async fn front_get(
    front: &str,
    tls: Arc<rustls::ClientConfig>,
    host: &str,
    path: &str,
) -> anyhow::Result<(http::response::Parts, bytes::Bytes)> {
    let tcp = tokio::net::TcpStream::connect(front).await?;
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp)
        .await?;
    kubectl::get(tls, host, path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_and_edge_processes_serve_and_drain_on_sigterm() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let dir = std::env::temp_dir().join(format!("tether-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let pki = Pki::generate()?;
        let tunnel = pki
            .edge_ca
            .issue_server("tether-cloud", &["localhost", "127.0.0.1"])?;
        let front = pki
            .front_ca
            .issue_server("tether-cloud", &["localhost", "127.0.0.1"])?;
        let node = pki.edge_ca.issue_node_client("edge-cli", &[])?;
        let f = |n: &str, pem: &str| write(&dir, n, pem);
        let (edge_ca, front_ca) = (
            f("edge-ca.crt", pki.edge_ca.cert_pem())?,
            f("front-ca.crt", pki.front_ca.cert_pem())?,
        );
        let (tc, tk) = (
            f("tunnel.crt", &tunnel.cert_pem)?,
            f("tunnel.key", tunnel.key_pem.expose())?,
        );
        let (fc, fk) = (
            f("front.crt", &front.cert_pem)?,
            f("front.key", front.key_pem.expose())?,
        );
        let (nc, nk) = (
            f("node.crt", &node.cert_pem)?,
            f("node.key", node.key_pem.expose())?,
        );
        let config = f(
            "cloud.yaml",
            "drain_timeout_secs: 5\nlimits:\n  max_streams: 64\n",
        )?;

        let (mut cloud, line) = spawn_role(&[
            "cloud",
            "--config",
            &config,
            "--tunnel-addr",
            "127.0.0.1:0",
            "--front-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--tunnel-cert",
            &tc,
            "--tunnel-key",
            &tk,
            "--edge-ca",
            &edge_ca,
            "--front-cert",
            &fc,
            "--front-key",
            &fk,
            "--front-client-ca",
            &front_ca,
        ])
        .await?;
        let (tunnel_addr, front_addr) = (field(&line, "tunnel")?, field(&line, "front")?);
        let kubelet = FixtureKubelet::start(None).await?;
        let kubelet_url = format!("http://{}", kubelet.addr);
        let (mut edge, line) = spawn_role(&[
            "edge",
            "--node-name",
            "edge-cli",
            "--cloud-addr",
            &tunnel_addr,
            "--cloud-server-name",
            "localhost",
            "--ca",
            &edge_ca,
            "--cert",
            &nc,
            "--key",
            &nk,
            "--kubelet-url",
            &kubelet_url,
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .await?;
        let edge_admin = field(&line, "admin")?;

        // Wait (bounded) until the edge is ready, then go through the tunnel.
        let tls = pki.apiserver_tls()?;
        let mut served = false;
        for _ in 0..100 {
            if let Ok((p, _)) = front_get(&front_addr, tls.clone(), "edge-cli", "/healthz").await
                && p.status == 200
            {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            served,
            "request through the cloud/edge processes never succeeded"
        );
        let ready = tokio::process::Command::new("curl")
            .args(["-sf", &format!("http://{edge_admin}/readyz")])
            .status()
            .await?;
        ensure!(ready.success(), "edge /readyz not ready while connected");

        // SIGTERM the cloud while a request is in flight: it completes, the process exits 0.
        let slow = {
            let (front_addr, tls) = (front_addr.clone(), tls.clone());
            tokio::spawn(
                async move { front_get(&front_addr, tls, "edge-cli", "/slow?ms=1000").await },
            )
        };
        for _ in 0..100 {
            if kubelet.requests() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sigterm(&cloud).await?;
        let (p, _) = slow.await??;
        ensure!(
            p.status == 200,
            "in-flight request cut by SIGTERM: {}",
            p.status
        );
        let st = tokio::time::timeout(Duration::from_secs(10), cloud.wait())
            .await
            .context("cloud did not exit")??;
        ensure!(st.success(), "cloud exited with {st}");
        ensure!(
            front_get(&front_addr, tls, "edge-cli", "/healthz")
                .await
                .is_err(),
            "served after exit"
        );

        sigterm(&edge).await?;
        let st = tokio::time::timeout(Duration::from_secs(10), edge.wait())
            .await
            .context("edge did not exit")??;
        ensure!(st.success(), "edge exited with {st}");
        let _ = std::fs::remove_dir_all(&dir);
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .expect("test failed");
}
