//! The `iptables_sync` figure: time for iptables-manager to sync 1,000
//! tunnel-port records onto an empty chain, then one changed record, and how
//! many netfilter execs each sync took. Runs in a network namespace created
//! and deleted here (needs root), through the real iptables-nft tools;
//! execs are counted by PATH shims that log and exec the real binaries.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Args;

use tether_iptables_manager::{
    Backend, BackendChoice, Manager, ManagerConfig, ManagerMetrics, Records, TunnelPortRecord,
};

use crate::report::Report;

/// The hidden child that runs inside the namespace.
#[derive(Args, Debug)]
pub(crate) struct SyncArgs {
    /// Records to sync.
    #[arg(long, default_value_t = 1000)]
    records: usize,
    /// File the exec-counting shims append to.
    #[arg(long)]
    count_file: std::path::PathBuf,
}

const TOOLS: [&str; 4] = [
    "iptables-nft-save",
    "iptables-nft-restore",
    "ip6tables-nft-save",
    "ip6tables-nft-restore",
];

fn records(n: usize, moved: Option<usize>) -> anyhow::Result<Records> {
    let mut raw = TunnelPortRecord::default();
    for i in 0..n {
        let ip = if Some(i) == moved {
            format!("10.98.{}.{}", i / 250, i % 250 + 1)
        } else {
            format!("10.99.{}.{}", i / 250, i % 250 + 1)
        };
        let port = 10_000 + i as u16;
        raw.ip_tunnel_port.insert(ip, port);
        raw.port.insert(port.to_string(), true);
    }
    Ok(Records::from_record(&raw, &(10_000..=20_000))?)
}

fn execs(count_file: &Path) -> usize {
    std::fs::read_to_string(count_file)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Child side: two syncs, timed, printed as one JSON line.
pub(crate) async fn run_sync(args: SyncArgs) -> anyhow::Result<()> {
    let cfg = ManagerConfig {
        backend: BackendChoice::Fixed(Backend::Nft),
        port_range: 10_000..=20_000,
        dst: tether_iptables_manager::DestMatch {
            cidrs: vec!["10.0.0.0/8".parse().map_err(anyhow::Error::msg)?],
            ..Default::default()
        },
        ..ManagerConfig::default()
    };
    let mut m = Manager::new(cfg, ManagerMetrics::default()).await?;
    let all = records(args.records, None)?;
    let before = execs(&args.count_file);
    let t = Instant::now();
    let rules = m.sync(&all).await?;
    let first = t.elapsed();
    let first_execs = execs(&args.count_file) - before;
    ensure!(
        rules == args.records,
        "synced {rules} rules, want {}",
        args.records
    );
    let changed = records(args.records, Some(args.records / 2))?;
    let before = execs(&args.count_file);
    let t = Instant::now();
    m.sync(&changed).await?;
    let one = t.elapsed();
    let one_execs = execs(&args.count_file) - before;
    println!(
        "{}",
        serde_json::json!({
            "sync_ms": first.as_secs_f64() * 1e3,
            "first_execs": first_execs,
            "one_change_ms": one.as_secs_f64() * 1e3,
            "one_change_execs": one_execs,
        })
    );
    Ok(())
}

/// Parent side: namespace, shims, child, report.
pub(crate) async fn figure(report: &mut Report) -> anyhow::Result<()> {
    if !std::fs::read_to_string("/proc/self/status")?
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    {
        println!("iptables_sync: skipped (needs root to create a network namespace)");
        return Ok(());
    }
    let n = 1000;
    let ns = format!("tether-bench-{}", std::process::id());
    let dir = std::env::temp_dir().join(&ns);
    std::fs::create_dir_all(&dir)?;
    let count = dir.join("execs");
    for tool in TOOLS {
        let real =
            which(tool).with_context(|| format!("{tool} not found (Debian package iptables)"))?;
        let shim = dir.join(tool);
        std::fs::write(
            &shim,
            format!(
                "#!/bin/sh\necho {tool} >> {}\nexec {real} \"$@\"\n",
                count.display()
            ),
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755))?;
    }
    let st = tokio::process::Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .await?;
    ensure!(st.success(), "ip netns add {ns} failed");
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(std::env::current_exe()?)
            .args(["iptables-sync", "--records", &n.to_string(), "--count-file"])
            .arg(&count)
            .env("PATH", path)
            .kill_on_drop(true)
            .output(),
    )
    .await;
    let _ = tokio::process::Command::new("ip")
        .args(["netns", "del", &ns])
        .status()
        .await;
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.context("iptables sync child took over 60 s")??;
    if !out.status.success() {
        bail!(
            "iptables sync child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim().lines().last().unwrap_or("{}"))?;
    let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "iptables_sync: {n} records onto an empty chain {:.1} ms ({} execs); one changed record {:.1} ms ({} execs)",
        num("sync_ms"),
        num("first_execs"),
        num("one_change_ms"),
        num("one_change_execs")
    );
    report.num("iptables_sync_1000_ms", num("sync_ms"));
    report.num("iptables_sync_one_change_ms", num("one_change_ms"));
    report.num("iptables_execs_first_sync", num("first_execs"));
    report.num("iptables_execs_one_change", num("one_change_execs"));
    Ok(())
}

fn which(tool: &str) -> Option<String> {
    std::env::var("PATH")
        .ok()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
        .map(|p| p.display().to_string())
}
