//! A real Prometheus scrapes edge nodes through the tunnel, finding them with
//! the cloud's HTTP service discovery: the kubelet's metrics endpoints and a
//! real node_exporter allow-listed on the edge. Needs Debian's `prometheus`
//! and `prometheus-node-exporter` (scripts/test.sh installs them).

mod process;

use std::time::Duration;

use anyhow::{Context, ensure};
use process::{field, write};
use tether_tests::harness::Pki;
use tether_tests::kubectl;

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
        // Probe the tunnel every second so the round-trip panel has data soon.
        let cloud_config = f("cloud.yaml", "limits:\n  keepalive_interval: 1\n")?;
        let kubelet = process::spawn(&[], &["fixture-kubelet"], "listening on").await?;
        let kubelet_url = format!("http://{}", kubelet.started.trim_start_matches("listening on ").trim());
        let cloud = process::spawn(
            &[],
            &[
                "cloud", "--hub-addr", "127.0.0.1:0", "--config", &cloud_config, "--tunnel-addr", "127.0.0.1:0", "--front-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
                "--tunnel-cert", &tc, "--tunnel-key", &tk, "--edge-ca", &edge_ca, "--front-cert", &fc, "--front-key", &fk,
                "--front-client-ca", &front_ca,
            ],
            "cloud started",
        )
        .await?;
        let (tunnel_addr, admin) = (field(&cloud.started, "tunnel")?, field(&cloud.started, "admin")?);
        let front_addr = field(&cloud.started, "front")?;
        let edge = process::spawn(
            &[],
            &[
                "edge", "--no-hub", "--node-name", "edge-prom", "--cloud-addr", &tunnel_addr, "--cloud-server-name", "localhost",
                "--ca", &edge_ca, "--cert", &nc, "--key", &nk, "--kubelet-url", &kubelet_url, "--allow", &ne_addr,
                "--admin-addr", "127.0.0.1:0",
            ],
            "edge started",
        )
        .await?;
        let edge_admin = field(&edge.started, "admin")?;
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
        // /debug/sessions shows the node, its age, streams and announced endpoints.
        let sessions = get_json(&format!("http://{admin}/debug/sessions")).await?;
        ensure!(sessions[0]["node"] == "edge-prom", "{sessions}");
        ensure!(sessions[0]["endpoints"][0] == ne_addr.as_str(), "{sessions}");
        ensure!(sessions[0]["open_streams"].is_u64() && sessions[0]["age_seconds"].is_u64(), "{sessions}");

        let prom_port = free_port()?;
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: tether-edges\n    scheme: https\n    params:\n      bytes: ['65536']\n    tls_config:\n      ca_file: {front_ca}\n      cert_file: {pc}\n      key_file: {pk}\n      server_name: localhost\n    http_sd_configs:\n      - url: {sd_url}\n        refresh_interval: 1s\n  - job_name: tether\n    static_configs:\n      - targets: ['{admin}', '{edge_admin}']\n"
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
            if active.len() == 6 && active.iter().all(|a| a["health"] == "up") {
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

        // Traffic of every kind the dashboard shows.
        let tls = pki.apiserver_tls()?;
        let conn = || async {
            let tcp = tokio::net::TcpStream::connect(&front_addr).await?;
            Ok::<_, anyhow::Error>(
                tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp)
                    .await?,
            )
        };
        for (path, want) in [
            ("/containerLogs/default/web/app?bytes=65536", 200),
            ("/stats/summary", 200),
            ("/no/such/path", 404),
            ("/error500", 500),
            (&*format!("/tether/v1/nodes/edge-prom/endpoints/127.0.0.1:{}/metrics", ne_port + 1), 403),
        ] {
            let (p, _) = kubectl::get(conn().await?, "edge-prom", path).await?;
            ensure!(p.status == want, "{path}: {}", p.status);
        }
        let path = kubectl::exec_path("default", "web", "app", &["echo", "hi"], false);
        kubectl::exec_ws(conn().await?, "edge-prom", &path, b"").await?;
        // A slow reader: the front waits for it and the edge waits for
        // tunnel window. Both count a flow-control stall.
        {
            let resp = kubectl::get_streaming(conn().await?, "edge-prom", "/containerLogs/default/web/app?bytes=33554432").await?;
            let mut body = resp.into_body();
            kubectl::next_chunk(&mut body).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut n = 0;
            while kubectl::next_chunk(&mut body).await?.is_some() {
                n += 1;
                ensure!(n < 100_000, "endless body");
            }
        }
        let cloud_text = process::ok(&["curl", "-sf", &format!("http://{admin}/metrics")]).await?;
        let edge_text = process::ok(&["curl", "-sf", &format!("http://{edge_admin}/metrics")]).await?;
        ensure!(sample(&cloud_text, "tether_cloud_flow_control_stalls_total{kind=\"logs\"}") >= 1.0, "no front stall counted");
        ensure!(sample(&edge_text, "tether_edge_flow_control_stalls_total{kind=\"http\"}") >= 1.0, "no edge stall counted");
        ensure!(sample(&edge_text, "tether_edge_session_state{state=\"connected\"}") == 1.0, "edge state");
        ensure!(sample(&cloud_text, "tether_cloud_sessions{state=\"active\"}") == 1.0, "cloud sessions");
        // A client without a certificate is refused (an auth failure).
        let anonymous = tether_pki::client_config(std::slice::from_ref(pki.front_ca.cert_der()), None, &[b"http/1.1"])?;
        let tcp = tokio::net::TcpStream::connect(&front_addr).await?;
        if let Ok(t) = tokio_rustls::TlsConnector::from(std::sync::Arc::new(anonymous))
            .connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp)
            .await
        {
            ensure!(kubectl::get(t, "edge-prom", "/healthz").await.is_err(), "anonymous client served");
        }

        // Bounded cardinality: 1,000 requests to distinct pods add no series.
        let series = |text: &str| text.lines().filter(|l| !l.starts_with('#')).count();
        let before = series(&process::ok(&["curl", "-sf", &format!("http://{admin}/metrics")]).await?);
        {
            let (mut send, c) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(conn().await?)).await?;
            tokio::spawn(c);
            for i in 0..1000 {
                let req = http::Request::get(format!("/containerLogs/ns-{i}/pod-{i}/c?bytes=64"))
                    .header("host", "edge-prom")
                    .body(http_body_util::Empty::<bytes::Bytes>::new())?;
                send.ready().await?;
                let resp = send.send_request(req).await?;
                ensure!(resp.status() == 200);
                http_body_util::BodyExt::collect(resp.into_body()).await?;
            }
        }
        let after = series(&process::ok(&["curl", "-sf", &format!("http://{admin}/metrics")]).await?);
        ensure!(after == before, "1,000 distinct pods changed the series count {before} -> {after}");

        // promtool finds no naming problems in a live scrape of each role.
        for target in [&admin, &edge_admin] {
            let scrape = process::ok(&["curl", "-sf", &format!("http://{target}/metrics")]).await?;
            let path = f("scrape.txt", &scrape)?;
            let (_, out, err) = process::run(&["sh", "-c", &format!("promtool check metrics < {path}")]).await?;
            // promtool 2.42 reads the OpenMetrics counter family `x` (HELP on
            // `x`, samples `x_total`) as classic text and reports "x_total no
            // help text". That, for a family that does have HELP, is the only
            // finding allowed (docs/operator-guide.md, "Metrics").
            let problems: Vec<&str> = out
                .lines()
                .chain(err.lines())
                .filter(|l| !l.trim().is_empty())
                .filter(|l| {
                    let quirk = l
                        .strip_suffix(" no help text")
                        .and_then(|m| m.strip_suffix("_total"))
                        .is_some_and(|family| scrape.contains(&format!("# HELP {family} ")));
                    !quirk
                })
                .collect();
            ensure!(problems.is_empty(), "promtool on {target}: {problems:?}");
        }
        let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yaml");
        let (ok, out, err) = process::run(&["promtool", "check", "rules", rules]).await?;
        ensure!(ok, "promtool check rules: {out}{err}");

        // Every panel of the shipped dashboard has data, except those listed.
        let excluded = [
            ("iptables syncs", "iptables-manager needs a network namespace; tests/netns.rs covers it"),
            ("iptables drift repairs", "as above"),
            ("DNAT rules", "as above"),
            ("Edge certificate expiry (days)", "this edge uses file-based certificates (the gauge is 0); enrol.rs covers token enrolment"),
        ];
        let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/tether.json"
        ))?)?;
        let mut checked = 0;
        for panel in dash["panels"].as_array().context("panels")? {
            let title = panel["title"].as_str().unwrap_or_default();
            if excluded.iter().any(|(t, _)| *t == title) {
                continue;
            }
            for target in panel["targets"].as_array().context("targets")? {
                let expr = target["expr"].as_str().context("expr")?
                    .replace("$__rate_interval", "1m")
                    .replace("$kind", ".*")
                    .replace("$node", ".*");
                let mut last = serde_json::Value::Null;
                let mut has_data = false;
                for _ in 0..40 {
                    last = get_json(&format!("{api}/query?query={}", kubectl::percent_encode(&expr))).await?;
                    if last["data"]["result"].as_array().is_some_and(|r| !r.is_empty()) {
                        has_data = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                ensure!(has_data, "panel {title:?} has no data: {expr} -> {last}");
                checked += 1;
            }
        }
        ensure!(checked >= 10, "only {checked} panel queries checked");
        // The RTT panel has data, so the probe ran: /debug/sessions shows it.
        let sessions = get_json(&format!("http://{admin}/debug/sessions")).await?;
        ensure!(sessions[0]["rtt_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{sessions}");
        drop(edge);
        drop(cloud);
        let _ = std::fs::remove_dir_all(&dir);
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .expect("test failed");
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}
