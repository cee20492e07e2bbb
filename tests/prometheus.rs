//! A real Prometheus scrapes edge nodes through the tunnel, finding them with
//! the cloud's HTTP service discovery: the kubelet's metrics endpoints and a
//! real node_exporter allow-listed on the edge. Needs Debian's `prometheus`
//! and `prometheus-node-exporter` (scripts/test.sh installs them).

mod process;

use std::time::Duration;

use anyhow::{Context, ensure};
use process::{field, write};
use tether_tests::harness::Pki;

fn free_port() -> anyhow::Result<u16> {
    // External programs cannot take a pre-bound socket; bind, read, release.
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn get_json(url: &str) -> anyhow::Result<serde_json::Value> {
    let body = process::ok(&["curl", "-sf", "--max-time", "5", url]).await?;
    Ok(serde_json::from_str(&body)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_edges_found_by_service_discovery() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = std::env::temp_dir().join(format!("tether-prom-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let pki = Pki::generate()?;
        let f = |n: &str, pem: &str| write(&dir, n, pem);
        let tunnel = pki.edge_ca.issue_server("tether-cloud", &["localhost"])?;
        let front = pki.front_ca.issue_server("tether-cloud", &["localhost", "127.0.0.1"])?;
        let node = pki.edge_ca.issue_node_client("edge-prom", &[])?;
        let prom = pki.front_ca.issue_client("prometheus", &["system:masters"])?;
        let (edge_ca, front_ca) = (f("edge-ca.crt", pki.edge_ca.cert_pem())?, f("front-ca.crt", pki.front_ca.cert_pem())?);
        let (tc, tk) = (f("tunnel.crt", &tunnel.cert_pem)?, f("tunnel.key", tunnel.key_pem.expose())?);
        let (fc, fk) = (f("front.crt", &front.cert_pem)?, f("front.key", front.key_pem.expose())?);
        let (nc, nk) = (f("node.crt", &node.cert_pem)?, f("node.key", node.key_pem.expose())?);
        let (pc, pk) = (f("prom.crt", &prom.cert_pem)?, f("prom.key", prom.key_pem.expose())?);

        // A real node_exporter on the edge host.
        let ne_port = free_port()?;
        let ne_addr = format!("127.0.0.1:{ne_port}");
        let _node_exporter = tokio::process::Command::new("prometheus-node-exporter")
            .arg(format!("--web.listen-address={ne_addr}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start prometheus-node-exporter")?;
        let kubelet = process::spawn(&[], &["fixture-kubelet"], "listening on").await?;
        let kubelet_url = format!("http://{}", kubelet.started.trim_start_matches("listening on ").trim());
        let cloud = process::spawn(
            &[],
            &[
                "cloud", "--tunnel-addr", "127.0.0.1:0", "--front-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
                "--tunnel-cert", &tc, "--tunnel-key", &tk, "--edge-ca", &edge_ca, "--front-cert", &fc, "--front-key", &fk,
                "--front-client-ca", &front_ca,
            ],
            "cloud started",
        )
        .await?;
        let (tunnel_addr, admin) = (field(&cloud.started, "tunnel")?, field(&cloud.started, "admin")?);
        let _edge = process::spawn(
            &[],
            &[
                "edge", "--node-name", "edge-prom", "--cloud-addr", &tunnel_addr, "--cloud-server-name", "localhost",
                "--ca", &edge_ca, "--cert", &nc, "--key", &nk, "--kubelet-url", &kubelet_url, "--allow", &ne_addr,
                "--admin-addr", "127.0.0.1:0",
            ],
            "edge started",
        )
        .await?;
        // Service discovery lists the node's kubelet paths and its exporter.
        let sd_url = format!("http://{admin}/sd");
        let mut groups = serde_json::Value::Null;
        for _ in 0..100 {
            groups = get_json(&sd_url).await?;
            if groups.as_array().is_some_and(|g| g.len() == 4) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(groups.as_array().is_some_and(|g| g.len() == 4), "sd: {groups}");

        let prom_port = free_port()?;
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: tether-edges\n    scheme: https\n    params:\n      bytes: ['65536']\n    tls_config:\n      ca_file: {front_ca}\n      cert_file: {pc}\n      key_file: {pk}\n      server_name: localhost\n    http_sd_configs:\n      - url: {sd_url}\n        refresh_interval: 1s\n"
        );
        let config = f("prometheus.yml", &config)?;
        let _prometheus = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={config}"))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start prometheus")?;
        let api = format!("http://127.0.0.1:{prom_port}/api/v1");
        // Every discovered target is scraped successfully through the tunnel.
        let mut last = String::new();
        let mut all_up = false;
        for _ in 0..150 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let Ok(t) = get_json(&format!("{api}/targets")).await else { continue };
            let active = t["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
            last = active.iter().map(|a| format!("{} {} {}", a["labels"]["tether_target"], a["health"], a["lastError"])).collect::<Vec<_>>().join("; ");
            if active.len() == 4 && active.iter().all(|a| a["health"] == "up") {
                all_up = true;
                break;
            }
        }
        ensure!(all_up, "targets not all up: {last}");
        // The exporter's series arrive labelled with the node.
        let q = format!("{api}/query?query=node_load1%7Bnode%3D%22edge-prom%22%7D");
        let r = get_json(&q).await?;
        ensure!(r["data"]["result"].as_array().is_some_and(|a| !a.is_empty()), "no node_exporter series: {r}");
        let q = format!("{api}/query?query=up%7Btether_target%3D%22cadvisor%22%2Cnode%3D%22edge-prom%22%7D");
        let r = get_json(&q).await?;
        ensure!(r["data"]["result"][0]["value"][1] == "1", "cadvisor target not up: {r}");
        drop(cloud);
        let _ = std::fs::remove_dir_all(&dir);
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .expect("test failed");
}
