//! Fault suite: waits that must end, and answers that must arrive.
//!
//! - item 4: a kubelet stopped with SIGSTOP (a real fixture-kubelet process)
//!   gets requests answered 504 with a Status naming the deadline, counted,
//!   while streams whose headers already arrived (logs `follow`, a raw
//!   upgrade) are not cut and go on once it resumes. A kubelet that accepts
//!   no connection gets the connect deadline.
//! - item 5: when the kubelet answers before reading a large request body,
//!   the answer reaches real curl through the tunnel, for bodies up to
//!   64 MiB, as it does directly.
//!
//! Cycles: `kubelet SIGSTOP` 3 in CI, 50 with `TETHER_FAULTS_SOAK` set;
//! item 5: 5 rounds per body size in CI, 50 soaked.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;

use tether_edgestream::KubeletTimeouts;
use tether_tests::bounded;
use tether_tests::fixture::FixtureKubelet;
use tether_tests::harness::{CloudHandle, CloudSpec, EdgeHandle, EdgeSpec, Pki};
use tether_tests::kubectl;

const NODE: &str = "edge-1";
const NODE_IP: &str = "10.200.0.5";

fn cycles(ci: usize, soak: usize) -> usize {
    if std::env::var_os("TETHER_FAULTS_SOAK").is_some() {
        soak
    } else {
        ci
    }
}

fn host() -> String {
    format!("{NODE_IP}:10250")
}

/// A `tether fixture-kubelet` process, killed on drop.
struct KubeletProcess {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl KubeletProcess {
    async fn start() -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["fixture-kubelet", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("spawn tether fixture-kubelet")?;
        let out = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(10),
            BufReader::new(out).read_line(&mut line),
        )
        .await
        .context("fixture kubelet did not start")??;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line {line:?}"))?
            .parse()?;
        Ok(Self { child, addr })
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self.child.id().context("fixture kubelet exited")?;
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?
            .success();
        ensure!(ok, "kill {sig} {pid} failed");
        // kill returns once the signal is sent, not once every thread has
        // stopped or resumed: wait for the state, or a request sent right
        // after STOP may still be answered.
        let want_stopped = sig == "-STOP";
        for _ in 0..200 {
            if threads_stopped(pid)? == want_stopped {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!("fixture kubelet {pid} did not reach the state of {sig} within 1 s")
    }
}

/// Whether every thread of `pid` is stopped (state `T` in its stat line).
fn threads_stopped(pid: u32) -> anyhow::Result<bool> {
    let mut all = true;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("stat")).unwrap_or_default();
        // The state follows the parenthesised command name.
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        all &= state == Some('T');
    }
    Ok(all)
}

async fn start(
    kubelet: SocketAddr,
    timeouts: KubeletTimeouts,
) -> anyhow::Result<(Pki, CloudHandle, EdgeHandle)> {
    let pki = Pki::generate()?;
    let cloud = CloudHandle::start(&pki, CloudSpec::default()).await?;
    let mut spec = EdgeSpec::new(NODE, kubelet);
    spec.ips = vec![NODE_IP.parse()?];
    spec.kubelet_timeouts = timeouts;
    let edge = EdgeHandle::start(&pki, cloud.tunnel_addr, spec)?;
    // Wait for the session: a log request goes through.
    for _ in 0..100 {
        let conn = cloud.front_conn(pki.apiserver_tls()?).await?;
        let (parts, _) = kubectl::get(conn, &host(), "/healthz").await?;
        if parts.status == 200 {
            return Ok((pki, cloud, edge));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("edge never connected")
}

/// The Status body of a 504, checked for the deadline it names.
fn expect_timeout(status: u16, body: &[u8], setting: &str) -> anyhow::Result<()> {
    ensure!(
        status == 504,
        "want 504, got {status}: {}",
        String::from_utf8_lossy(body)
    );
    let v: serde_json::Value = serde_json::from_slice(body).context("504 body is not a Status")?;
    ensure!(
        v["kind"] == "Status" && v["code"] == 504,
        "not a 504 Status: {v}"
    );
    ensure!(v["reason"] == "Timeout", "reason: {v}");
    let msg = v["message"].as_str().unwrap_or_default();
    ensure!(
        msg.contains(setting),
        "message does not name `{setting}`: {msg}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_hung_kubelet_gets_504_and_streams_survive() {
    let n = cycles(3, 50);
    // A cycle takes about 3 s: two 1 s deadlines and a 1.5 s stop.
    bounded(Duration::from_secs(60 + 10 * n as u64), async {
        let kubelet = KubeletProcess::start().await?;
        let timeouts = KubeletTimeouts {
            connect: Duration::from_secs(1),
            response_headers: Duration::from_secs(1),
        };
        let (pki, cloud, edge) = start(kubelet.addr, timeouts).await?;
        for cycle in 0..n {
            // Streams whose headers arrived before the kubelet stops.
            let conn = cloud.front_conn(pki.apiserver_tls()?).await?;
            let mut follow = kubectl::get_streaming(
                conn,
                &host(),
                "/containerLogs/default/web/app?follow=true&bytes=1024",
            )
            .await?;
            ensure!(
                follow.status() == 200,
                "follow answered {}",
                follow.status()
            );
            let conn = cloud.front_conn(pki.apiserver_tls()?).await?;
            let (_, mut echo) =
                kubectl::raw_upgrade(conn, &host(), "/portForward/default/web", "SPDY/3.1", &[])
                    .await?;
            ensure!(kubectl::echo_through(&mut echo, b"before").await? == b"before");

            let before = edge.metrics.local_timeouts_total();
            kubelet.signal("-STOP")?;
            // Requests while it is stopped: 504 after the deadline, each counted.
            let mut waits = Vec::new();
            for _ in 0..8 {
                let conn = cloud.front_conn(pki.apiserver_tls()?).await?;
                waits.push(tokio::spawn(async move {
                    kubectl::get(conn, &host(), "/pods").await
                }));
            }
            for w in waits {
                let (parts, body) = w.await??;
                expect_timeout(
                    parts.status.as_u16(),
                    &body,
                    "kubelet_response_header_timeout_secs",
                )
                .with_context(|| format!("cycle {cycle}, kubelet stopped"))?;
            }
            let counted = edge.metrics.local_timeouts_total() - before;
            ensure!(
                counted == 8,
                "cycle {cycle}: {counted} timeouts counted, want 8"
            );
            // Stay stopped past the deadline once more, then resume: the
            // streams opened before go on.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            kubelet.signal("-CONT")?;
            let body = follow.body_mut();
            let mut got = 0;
            while got < 1024 + 64 {
                got += kubectl::next_chunk(body)
                    .await?
                    .context("follow stream was cut while the kubelet was stopped")?
                    .len();
            }
            ensure!(
                kubectl::echo_through(&mut echo, b"after").await? == b"after",
                "port-forward stream was cut while the kubelet was stopped"
            );
            let conn = cloud.front_conn(pki.apiserver_tls()?).await?;
            let (parts, _) = kubectl::get(conn, &host(), "/pods").await?;
            ensure!(
                parts.status == 200,
                "after resume /pods answered {}",
                parts.status
            );
        }
        edge.stop().await;
        cloud.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_unreachable_kubelet_gets_504_on_connect_deadline() {
    bounded(Duration::from_secs(60), async {
        // A listener with a full accept queue: the kernel drops further SYNs,
        // so a connect hangs as it does to a host that went away.
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.1:0".parse()?)?;
        let listener = socket.listen(0)?;
        let addr = listener.local_addr()?;
        let mut queued = Vec::new();
        for _ in 0..2 {
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await
            {
                queued.push(s);
            }
        }
        let timeouts = KubeletTimeouts {
            connect: Duration::from_secs(1),
            response_headers: Duration::from_secs(30),
        };
        let pki = Pki::generate()?;
        let cloud = CloudHandle::start(&pki, CloudSpec::default()).await?;
        let mut spec = EdgeSpec::new(NODE, addr);
        spec.ips = vec![NODE_IP.parse()?];
        spec.kubelet_timeouts = timeouts;
        let edge = EdgeHandle::start(&pki, cloud.tunnel_addr, spec)?;
        let mut last = None;
        for _ in 0..100 {
            let conn = cloud.front_conn(pki.apiserver_tls()?).await?;
            let started = tokio::time::Instant::now();
            let (parts, body) = kubectl::get(conn, &host(), "/pods").await?;
            if parts.status == 404 || parts.status == 503 {
                // No session yet.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            expect_timeout(parts.status.as_u16(), &body, "kubelet_connect_timeout_secs")?;
            ensure!(
                started.elapsed() < Duration::from_secs(10),
                "the connect deadline did not end the wait"
            );
            last = Some(edge.metrics.local_timeouts_total());
            break;
        }
        ensure!(last == Some(1), "timeouts counted: {last:?}");
        drop(listener);
        edge.stop().await;
        cloud.stop().await;
        Ok(())
    })
    .await;
}

/// Real curl with the apiserver's kubelet-client certificate.
struct Curl {
    dir: std::path::PathBuf,
}

impl Curl {
    fn new(pki: &Pki) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "tether-deadlines-{}-{}",
            std::process::id(),
            tether_pki::rand_u64()
        ));
        std::fs::create_dir_all(&dir)?;
        let client = pki
            .front_ca
            .issue_client("kube-apiserver-kubelet-client", &["system:masters"])?;
        std::fs::write(dir.join("ca.crt"), pki.front_ca.cert_pem())?;
        std::fs::write(dir.join("client.crt"), &client.cert_pem)?;
        std::fs::write(dir.join("client.key"), client.key_pem.expose())?;
        Ok(Self { dir })
    }

    fn body(&self, len: usize) -> anyhow::Result<std::path::PathBuf> {
        let path = self.dir.join(format!("body-{len}"));
        if !path.exists() {
            std::fs::write(&path, vec![b'x'; len])?;
        }
        Ok(path)
    }

    /// POSTs the file `body` to `url`; returns curl's exit code and its
    /// output: the body, a newline, the status, `|` and stderr.
    async fn post(
        &self,
        url: &str,
        host: Option<&str>,
        body: &std::path::Path,
    ) -> anyhow::Result<(i32, String)> {
        let d = |f: &str| self.dir.join(f).display().to_string();
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args([
            "-sS",
            "-m",
            "60",
            "--cacert",
            &d("ca.crt"),
            "--cert",
            &d("client.crt"),
            "--key",
            &d("client.key"),
        ]);
        if let Some(h) = host {
            cmd.args(["-H", &format!("Host: {h}")]);
        }
        cmd.args([
            "--data-binary",
            &format!("@{}", body.display()),
            "-w",
            "\n%{http_code}",
            url,
        ]);
        let out = cmd
            .output()
            .await
            .context("run curl (Debian package curl)")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + "|"
            + &String::from_utf8_lossy(&out.stderr);
        Ok((out.status.code().unwrap_or(-1), text))
    }
}

impl Drop for Curl {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item5_early_answer_to_a_large_body_reaches_the_client() {
    bounded(Duration::from_secs(300), async {
        let fixture = FixtureKubelet::start(None).await?;
        let (pki, cloud, edge) = start(fixture.addr, KubeletTimeouts::default()).await?;
        let curl = Curl::new(&pki)?;
        let front = format!("https://localhost:{}/healthz", cloud.front_addr.port());
        let direct = format!("http://{}/healthz", fixture.addr);
        let rounds = cycles(5, 50);
        for mib in [1usize, 4, 16, 64] {
            let body = curl.body(mib << 20)?;
            let mut direct_ok = 0;
            for round in 0..rounds {
                // The fixture answers /healthz without reading the body, then
                // resets the connection 500 ms later, as the kubelet does.
                let (code, out) = curl.post(&front, Some(&host()), &body).await?;
                ensure!(
                    code == 0 && out == "ok\n200|",
                    "{mib} MiB, round {round}: curl exited {code}: {out:?}"
                );
                // Directly: the baseline the tunnel must match.
                let (code, out) = curl.post(&direct, None, &body).await?;
                direct_ok += usize::from(code == 0 && out == "ok\n200|");
            }
            println!("{mib} MiB: tunnel {rounds}/{rounds}, direct {direct_ok}/{rounds}");
            ensure!(
                direct_ok == rounds,
                "the fixture itself lost answers: {direct_ok}/{rounds}"
            );
        }
        edge.stop().await;
        cloud.stop().await;
        Ok(())
    })
    .await;
}
