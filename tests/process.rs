//! Helpers for tests that run the `tether` binary as child processes.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_tether");

/// A running child and the log lines it prints after its start line.
pub(crate) struct Role {
    pub(crate) child: Child,
    pub(crate) started: String,
    pub(crate) lines: mpsc::Receiver<String>,
}

/// Spawns `prefix + [tether] + args` and waits for a line containing
/// `marker` on stdout or stderr.
pub(crate) async fn spawn(prefix: &[&str], args: &[&str], marker: &str) -> anyhow::Result<Role> {
    let cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    spawn_command(cmd, args, marker).await
}

/// Spawns another build of the binary (e.g. the shipped, static one).
pub(crate) async fn spawn_program(
    program: &Path,
    args: &[&str],
    marker: &str,
) -> anyhow::Result<Role> {
    spawn_command(Command::new(program), args, marker).await
}

async fn spawn_command(mut cmd: Command, args: &[&str], marker: &str) -> anyhow::Result<Role> {
    let mut child = cmd
        .args(args)
        .env("TETHER_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let (tx, mut rx) = mpsc::channel::<String>(4096);
    for pipe in [
        Box::new(child.stdout.take().context("stdout")?)
            as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(child.stderr.take().context("stderr")?),
    ] {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.try_send(line);
            }
        });
    }
    drop(tx);
    let started = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = rx.recv().await {
            if line.contains(marker) {
                return Ok(line);
            }
        }
        bail!("{args:?} exited before printing {marker:?}")
    })
    .await
    .with_context(|| format!("{args:?} did not print {marker:?} in 20 s"))??;
    Ok(Role {
        child,
        started,
        lines: rx,
    })
}

impl Role {
    /// Waits (bounded) for a later line containing `marker`.
    pub(crate) async fn wait_line(
        &mut self,
        marker: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        tokio::time::timeout(timeout, async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(marker) {
                    return Ok(line);
                }
            }
            bail!("exited before printing {marker:?}")
        })
        .await
        .with_context(|| format!("no {marker:?} within {timeout:?}"))?
    }
}

/// The value of `key=value` in a log line.
pub(crate) fn field(line: &str, key: &str) -> anyhow::Result<String> {
    let at = line
        .find(&format!("{key}="))
        .with_context(|| format!("no {key}= in {line:?}"))?;
    let rest = &line[at + key.len() + 1..];
    Ok(rest
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .trim_matches('"')
        .to_owned())
}

pub(crate) fn write(dir: &Path, name: &str, content: &str) -> anyhow::Result<String> {
    let p = dir.join(name);
    std::fs::write(&p, content)?;
    Ok(p.display().to_string())
}

pub(crate) async fn sigterm(child: &Child) -> anyhow::Result<()> {
    let pid = child.id().context("child already gone")?;
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    ensure!(st.success(), "kill -TERM failed");
    Ok(())
}

/// Runs a command to completion (bounded) and returns (success, stdout, stderr).
pub(crate) async fn run(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let (first, rest) = args.split_first().context("empty command")?;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(first).args(rest).kill_on_drop(true).output(),
    )
    .await
    .with_context(|| format!("{args:?} took over 30 s"))??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs a command that must succeed; returns stdout.
pub(crate) async fn ok(args: &[&str]) -> anyhow::Result<String> {
    let (success, out, err) = run(args).await?;
    ensure!(success, "{args:?} failed: {err}");
    Ok(out)
}

/// True when this test runs as root (network namespaces, netfilter).
pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs a test body under a deadline: a timeout or an error fails the test.
pub(crate) async fn bounded(limit: Duration, f: impl Future<Output = anyhow::Result<()>>) {
    tokio::time::timeout(limit, f)
        .await
        .expect("test timed out")
        .expect("test failed");
}

/// A fresh directory `<tmp>/tether-<prefix>-<pid>-<name>`.
pub(crate) fn temp_dir(prefix: &str, name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tether-{prefix}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}
