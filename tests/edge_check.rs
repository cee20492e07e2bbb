//! Issue 14 item 4: `tether edge --check` against a real `tether cloud`
//! process on loopback. One test per failure kind (wrong CA pin, revoked
//! certificate, closed tunnel port, kubelet down) and one where every step
//! passes; each asserts the step that failed, that the check stopped there,
//! the exit status and that the report is plain text.

mod process;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use process::{BIN, Role, field, run, spawn, write};
use tether_edgehub::CertManager;
use tether_pki::BootstrapToken;
use tether_tests::fixture::FixtureKubelet;
use tether_tests::harness::Pki;

const STEPS: [&str; 7] = [
    "config",
    "dns",
    "tcp",
    "tls",
    "server-certificate",
    "node-certificate",
    "kubelet",
];

/// A `tether cloud` process with a state directory (its CA signs the tunnel
/// certificate and enrols edges), everything on loopback port 0.
struct Cloud {
    _role: Role,
    state: PathBuf,
    tunnel: String,
    bootstrap: String,
}

async fn cloud(dir: &Path) -> anyhow::Result<Cloud> {
    let pki = Pki::generate()?;
    let front = pki
        .front_ca
        .issue_server("tether-front", &["localhost", "127.0.0.1"])?;
    let state = dir.join("cloud");
    let s = |p: &Path| p.display().to_string();
    let role = spawn(
        &[],
        &[
            "cloud",
            "--state-dir",
            &s(&state),
            "--tunnel-addr",
            "127.0.0.1:0",
            "--bootstrap-addr",
            "127.0.0.1:0",
            "--front-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--hub-addr",
            "127.0.0.1:0",
            "--front-cert",
            &write(dir, "front.crt", &front.cert_pem)?,
            "--front-key",
            &write(dir, "front.key", front.key_pem.expose())?,
            "--front-client-ca",
            &write(dir, "front-ca.crt", pki.front_ca.cert_pem())?,
        ],
        "cloud started",
    )
    .await?;
    Ok(Cloud {
        tunnel: field(&role.started, "tunnel")?,
        bootstrap: field(&role.started, "bootstrap")?,
        _role: role,
        state,
    })
}

impl Cloud {
    /// A bootstrap token for `node`, from `tether token create`.
    async fn token(&self, node: &str) -> anyhow::Result<String> {
        let state = self.state.display().to_string();
        let out = process::ok(&[
            BIN,
            "token",
            "create",
            "--state-dir",
            &state,
            "--node",
            node,
        ])
        .await?;
        Ok(out.trim().to_owned())
    }

    /// Enrols `node` into `edge_dir` as the agent would at its first start.
    async fn enrol(&self, node: &str, edge_dir: &Path) -> anyhow::Result<()> {
        let token: BootstrapToken = self.token(node).await?.parse()?;
        CertManager::new(edge_dir, &self.bootstrap, "127.0.0.1", node)
            .enrol(&token)
            .await?;
        Ok(())
    }
}

/// The edge's config file, the one `tether edge` would run with.
fn edge_config(dir: &Path, node: &str, tunnel: &str, bootstrap: &str, kubelet: &str) -> String {
    let yaml = format!(
        "node_name: {node}\ncloud_addr: {tunnel}\nbootstrap_addr: {bootstrap}\n\
         state_dir: {}\nkubelet_url: {kubelet}\nhub_enabled: false\n\
         limits:\n  handshake_timeout: 2\n",
        dir.join("edge").display()
    );
    write(dir, "edge.yaml", &yaml).expect("edge config")
}

/// Runs `tether edge --check --config <cfg> <extra>`: (success, stdout lines).
async fn check(cfg: &str, extra: &[&str]) -> anyhow::Result<(bool, Vec<String>)> {
    let mut args = vec![BIN, "edge", "--check", "--config", cfg];
    args.extend_from_slice(extra);
    let (ok, out, err) = run(&args).await?;
    ensure!(
        !out.contains('\x1b') && !err.contains('\x1b'),
        "ANSI codes in the report: {out:?} {err:?}"
    );
    Ok((ok, out.lines().map(str::to_owned).collect()))
}

/// Asserts the report passed every step before `step`, failed at `step` and
/// stopped there; returns the failure line.
fn failed_at(ok: bool, lines: &[String], step: &str) -> anyhow::Result<String> {
    ensure!(!ok, "exit 0 although {step} should fail: {lines:#?}");
    let at = STEPS.iter().position(|s| *s == step).context("step")?;
    ensure!(lines.len() == at + 1, "not stopped at {step}: {lines:#?}");
    for (line, s) in lines.iter().zip(&STEPS[..at]) {
        ensure!(line.starts_with(&format!("ok   {s}: ")), "{lines:#?}");
    }
    let last = lines[at].clone();
    ensure!(
        last.starts_with(&format!("FAIL {step}: ")) && last.contains(". Fix: "),
        "{lines:#?}"
    );
    Ok(last)
}

fn all_ok(ok: bool, lines: &[String]) -> anyhow::Result<()> {
    ensure!(ok, "exit non-zero: {lines:#?}");
    ensure!(lines.len() == STEPS.len(), "{lines:#?}");
    for (line, s) in lines.iter().zip(STEPS) {
        ensure!(line.starts_with(&format!("ok   {s}: ")), "{lines:#?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_passes_before_and_after_enrolment() {
    process::bounded(Duration::from_secs(60), async {
        let dir = process::temp_dir("edge-check", "ok");
        let cloud = cloud(&dir).await?;
        let kubelet = FixtureKubelet::start(None).await?;
        let cfg = edge_config(
            &dir,
            "edge-ok",
            &cloud.tunnel,
            &cloud.bootstrap,
            &format!("http://{}", kubelet.addr),
        );
        // A new edge with only its token: enrolment will happen.
        let token = cloud.token("edge-ok").await?;
        let (ok, lines) = check(&cfg, &["--token", &token]).await?;
        all_ok(ok, &lines)?;
        ensure!(
            lines[5].contains("enrols with its bootstrap token") && lines[5].contains("/ca.crt"),
            "{lines:#?}"
        );
        // The check wrote nothing: the node is still not enrolled.
        ensure!(!dir.join("edge/node.crt").exists(), "the check enrolled");
        // Enrolled: the cloud is asked about the certificate itself.
        cloud.enrol("edge-ok", &dir.join("edge")).await?;
        let (ok, lines) = check(&cfg, &[]).await?;
        all_ok(ok, &lines)?;
        ensure!(lines[5].contains("not revoked"), "{lines:#?}");
        ensure!(lines[6].contains("200"), "{lines:#?}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_pin_fails_at_the_server_certificate() {
    process::bounded(Duration::from_secs(60), async {
        let dir = process::temp_dir("edge-check", "wrong-ca");
        let cloud = cloud(&dir).await?;
        let kubelet = FixtureKubelet::start(None).await?;
        let edge = dir.join("edge");
        cloud.enrol("edge-ca", &edge).await?;
        // File credentials: the cloud's node certificate, another CA pinned.
        let other = Pki::generate()?;
        let wrong = write(&dir, "other-ca.crt", other.edge_ca.cert_pem())?;
        let cfg = edge_config(
            &dir,
            "edge-ca",
            &cloud.tunnel,
            &cloud.bootstrap,
            &format!("http://{}", kubelet.addr),
        );
        let s = |p: PathBuf| p.display().to_string();
        let (ok, lines) = check(
            &cfg,
            &[
                "--ca",
                &wrong,
                "--cert",
                &s(edge.join("node.crt")),
                "--key",
                &s(edge.join("node.key")),
            ],
        )
        .await?;
        let line = failed_at(ok, &lines, "server-certificate")?;
        ensure!(
            line.contains("unknown issuer") && line.contains(&wrong),
            "{line}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_certificate_fails_at_the_node_certificate() {
    process::bounded(Duration::from_secs(60), async {
        let dir = process::temp_dir("edge-check", "revoked");
        let cloud = cloud(&dir).await?;
        let kubelet = FixtureKubelet::start(None).await?;
        cloud.enrol("edge-rv", &dir.join("edge")).await?;
        let cfg = edge_config(
            &dir,
            "edge-rv",
            &cloud.tunnel,
            &cloud.bootstrap,
            &format!("http://{}", kubelet.addr),
        );
        let (ok, lines) = check(&cfg, &[]).await?;
        all_ok(ok, &lines)?;
        let state = cloud.state.display().to_string();
        process::ok(&[BIN, "certs", "revoke", "--state-dir", &state, "edge-rv"]).await?;
        // The running cloud re-reads its deny list about once a second.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let (ok, lines) = loop {
            let (ok, lines) = check(&cfg, &[]).await?;
            if !ok || tokio::time::Instant::now() > deadline {
                break (ok, lines);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let line = failed_at(ok, &lines, "node-certificate")?;
        ensure!(
            line.contains("revoked") && line.contains("tether token create"),
            "{line}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_tunnel_port_fails_at_tcp() {
    process::bounded(Duration::from_secs(30), async {
        let dir = process::temp_dir("edge-check", "closed");
        // A port nothing listens on: bound, then closed.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let cfg = edge_config(
            &dir,
            "edge-tcp",
            &closed.to_string(),
            &closed.to_string(),
            "http://127.0.0.1:10350",
        );
        let (ok, lines) = check(&cfg, &[]).await?;
        let line = failed_at(ok, &lines, "tcp")?;
        ensure!(
            line.contains("connection refused") && line.contains("`cloud_addr`"),
            "{line}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_down_fails_at_kubelet() {
    process::bounded(Duration::from_secs(60), async {
        let dir = process::temp_dir("edge-check", "kubelet");
        let cloud = cloud(&dir).await?;
        cloud.enrol("edge-kl", &dir.join("edge")).await?;
        let down = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let cfg = edge_config(
            &dir,
            "edge-kl",
            &cloud.tunnel,
            &cloud.bootstrap,
            &format!("http://{down}"),
        );
        let (ok, lines) = check(&cfg, &[]).await?;
        let line = failed_at(ok, &lines, "kubelet")?;
        ensure!(
            line.contains("connection refused") && line.contains("`kubelet_url`"),
            "{line}"
        );
        Ok(())
    })
    .await;
}
