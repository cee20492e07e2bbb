//! Process-level tests of the `tether` binary: real cert files, real child
//! processes, SIGTERM. (Part of the root package, which owns the binary.)

mod process;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use process::{BIN, field, sigterm, write};
use tether_tests::fixture::FixtureKubelet;
use tether_tests::harness::Pki;
use tether_tests::kubectl;
use tokio::process::Command;

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

        let process::Role {
            child: mut cloud,
            started: line,
            ..
        } = process::spawn(
            &[],
            &[
                "cloud",
                "--hub-addr",
                "127.0.0.1:0",
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
            ],
            "started",
        )
        .await?;
        let (tunnel_addr, front_addr) = (field(&line, "tunnel")?, field(&line, "front")?);
        let kubelet = FixtureKubelet::start(None).await?;
        let kubelet_url = format!("http://{}", kubelet.addr);
        let process::Role {
            child: mut edge,
            started: line,
            ..
        } = process::spawn(
            &[],
            &[
                "edge",
                "--no-hub",
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
            ],
            "started",
        )
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificate_on_disk_is_used_without_restart() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = std::env::temp_dir().join(format!("tether-reload-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let pki = Pki::generate()?;
        let tunnel = pki.edge_ca.issue_server("tether-cloud", &["localhost"])?;
        let front = pki.front_ca.issue_server("front-one", &["localhost"])?;
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
        let cloud = process::spawn(
            &[],
            &[
                "cloud",
                "--hub-addr",
                "127.0.0.1:0",
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
            ],
            "started",
        )
        .await?;
        let front_addr = field(&cloud.started, "front")?;
        let presented = || async {
            let tcp = tokio::net::TcpStream::connect(&front_addr).await?;
            let tls = tokio_rustls::TlsConnector::from(pki.apiserver_tls()?)
                .connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp)
                .await?;
            let id = tether_pki::Identity::from_peer(tls.get_ref().1.peer_certificates())?;
            Ok::<_, anyhow::Error>(id.common_name)
        };
        ensure!(presented().await? == "front-one");
        // Replace the pair on disk (key first, then certificate).
        let next = pki.front_ca.issue_server("front-two", &["localhost"])?;
        f("front.key", next.key_pem.expose())?;
        f("front.crt", &next.cert_pem)?;
        let mut switched = false;
        for _ in 0..100 {
            if presented().await? == "front-two" {
                switched = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            switched,
            "the new certificate was not picked up within 10 s"
        );
        drop(cloud);
        let _ = std::fs::remove_dir_all(&dir);
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .expect("test failed");
}

/// The iptables-free steps of the operator guide: `tether certs issue-client`
/// makes the egress selector's client certificate from the front's client CA,
/// the cloud's `authz` names it, and the front then routes its CONNECTs
/// (here to an address no node has: 404) while the default apiserver
/// identity, no longer listed, is refused (403).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_egress_client_certificate_is_authorized_by_the_cloud() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = std::env::temp_dir().join(format!("tether-egress-cert-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let pki = Pki::generate()?;
        let tunnel = pki.edge_ca.issue_server("tether-cloud", &["localhost"])?;
        let front = pki.front_ca.issue_server("tether-cloud", &["localhost"])?;
        let f = |n: &str, pem: &str| write(&dir, n, pem);
        let edge_ca = f("edge-ca.crt", pki.edge_ca.cert_pem())?;
        let (ca_crt, ca_key) = (
            f("front-ca.crt", pki.front_ca.cert_pem())?,
            f("front-ca.key", pki.front_ca.key_pem().expose())?,
        );
        let (tc, tk) = (
            f("tunnel.crt", &tunnel.cert_pem)?,
            f("tunnel.key", tunnel.key_pem.expose())?,
        );
        let (fc, fk) = (
            f("front.crt", &front.cert_pem)?,
            f("front.key", front.key_pem.expose())?,
        );
        let config = f(
            "cloud.yaml",
            "authz:\n  users: [tether-egress]\n  groups: []\n",
        )?;
        let out = dir.join("egress").display().to_string();
        let issue = [
            "certs",
            "issue-client",
            "--ca-cert",
            &ca_crt,
            "--ca-key",
            &ca_key,
            "--common-name",
            "tether-egress",
            "--out",
            &out,
        ];
        let run = Command::new(BIN).args(issue).output().await?;
        ensure!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        ensure!(String::from_utf8_lossy(&run.stdout).contains("CN=tether-egress"));
        let key_mode = {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(dir.join("egress.key"))?
                .permissions()
                .mode()
                & 0o777
        };
        ensure!(key_mode == 0o600, "key mode {key_mode:o}");
        // A second run keeps the deployed pair.
        let again = Command::new(BIN).args(issue).output().await?;
        ensure!(!again.status.success());
        ensure!(String::from_utf8_lossy(&again.stderr).contains("not overwriting"));

        let cloud = process::spawn(
            &[],
            &[
                "cloud",
                "--hub-addr",
                "127.0.0.1:0",
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
                &ca_crt,
            ],
            "started",
        )
        .await?;
        let front_addr = field(&cloud.started, "front")?;
        let egress = Arc::new(tether_pki::client_config(
            std::slice::from_ref(pki.front_ca.cert_der()),
            Some((
                tether_pki::load_certs(&dir.join("egress.crt"))?,
                tether_pki::load_key(&dir.join("egress.key"))?,
            )),
            &[],
        )?);
        ensure!(connect_status(&front_addr, egress).await? == "404");
        ensure!(connect_status(&front_addr, pki.apiserver_tls()?).await? == "403");
        drop(cloud);
        let _ = std::fs::remove_dir_all(&dir);
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .expect("test failed");
}

/// The status code of kube-apiserver's egress CONNECT (its exact bytes) to
/// an address no node claims.
async fn connect_status(front: &str, tls: Arc<rustls::ClientConfig>) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(front).await?;
    let mut tls = tokio_rustls::TlsConnector::from(tls)
        .connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp)
        .await?;
    tls.write_all(b"CONNECT 127.0.0.99:10250 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(head.len() < 64 << 10, "answer head too long");
        head.push(tls.read_u8().await?);
    }
    let head = String::from_utf8(head)?;
    Ok(head.split(' ').nth(1).unwrap_or_default().to_owned())
}

/// `tether cloud --cluster` as a process against the api double (a scripted
/// stand-in for kube-apiserver, not a real one): the flags and kubeconfig
/// reach the cluster code, the port is claimed before "started", a
/// connecting edge gets its node patched, and SIGTERM frees the port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_cluster_mode_against_api_double_claims_patches_and_releases() {
    use tether_tests::api_double;
    tokio::time::timeout(Duration::from_secs(90), async {
        let double = api_double::start().await?;
        double.put("nodes", api_double::node("edge-cm"));
        let dir = std::env::temp_dir().join(format!("tether-cli-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let pki = Pki::generate()?;
        let tunnel = pki
            .edge_ca
            .issue_server("tether-cloud", &["localhost", "127.0.0.1"])?;
        let front = pki
            .front_ca
            .issue_server("tether-cloud", &["localhost", "127.0.0.1"])?;
        let node = pki.edge_ca.issue_node_client("edge-cm", &[])?;
        let f = |n: &str, pem: &str| write(&dir, n, pem);
        let kubeconfig = f(
            "kubeconfig",
            &format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: double\n\
                 clusters:\n- name: double\n  cluster:\n    server: http://{}\n\
                 contexts:\n- name: double\n  context:\n    cluster: double\n    user: nobody\n\
                 users:\n- name: nobody\n  user: {{}}\n",
                double.addr
            ),
        )?;
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
        let process::Role {
            child: cloud,
            started: line,
            ..
        } = process::spawn(
            &[],
            &[
                "cloud",
                "--cluster",
                "--kubeconfig",
                &kubeconfig,
                "--namespace",
                "edge-system",
                "--replica-id",
                "cloud-0",
                "--advertise-address",
                "127.0.0.1",
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
            ],
            "started",
        )
        .await?;
        let annotation = |d: &api_double::ApiDouble| {
            d.get("configmaps", "edge-system", "tunnelport")
                .map(|cm| cm["metadata"]["annotations"]["tunnelportrecord.kubeedge.io"].clone())
        };
        ensure!(
            annotation(&double)
                == Some(r#"{"ipTunnelPort":{"127.0.0.1":10350},"port":{"10350":true}}"#.into()),
            "claim: {:?}",
            annotation(&double)
        );
        let admin = field(&line, "admin")?;
        let published = Command::new("curl")
            .args(["-sf", &format!("http://{admin}/tunnelport")])
            .output()
            .await?;
        ensure!(
            String::from_utf8_lossy(&published.stdout).contains(r#""127.0.0.1":10350"#),
            "admin /tunnelport: {}",
            String::from_utf8_lossy(&published.stdout)
        );
        let kubelet = FixtureKubelet::start(None).await?;
        let process::Role {
            child: mut edge, ..
        } = process::spawn(
            &[],
            &[
                "edge",
                "--no-hub",
                "--node-name",
                "edge-cm",
                "--cloud-addr",
                &field(&line, "tunnel")?,
                "--cloud-server-name",
                "localhost",
                "--ca",
                &edge_ca,
                "--cert",
                &nc,
                "--key",
                &nk,
                "--kubelet-url",
                &format!("http://{}", kubelet.addr),
                "--admin-addr",
                "127.0.0.1:0",
            ],
            "started",
        )
        .await?;
        let patched = double
            .wait_for_objects(Duration::from_secs(20), |objects| {
                objects["nodes"][&(String::new(), "edge-cm".to_owned())]["status"]
                    ["daemonEndpoints"]["kubeletEndpoint"]["Port"]
                    == 10350
            })
            .await;
        ensure!(
            patched,
            "node edge-cm was not patched: {:#?}",
            double.requests()
        );
        sigterm(&edge).await?;
        let _ = tokio::time::timeout(Duration::from_secs(10), edge.wait()).await;
        let mut cloud = cloud;
        sigterm(&cloud).await?;
        let st = tokio::time::timeout(Duration::from_secs(20), cloud.wait())
            .await
            .context("cloud did not exit")??;
        ensure!(st.success(), "cloud exited with {st}");
        ensure!(
            annotation(&double) == Some(r#"{"ipTunnelPort":{},"port":{}}"#.into()),
            "release left {:?}",
            annotation(&double)
        );
        let _ = std::fs::remove_dir_all(&dir);
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .expect("test failed");
}

/// Two `tether cloud --cluster` replicas against the API double (their
/// ownership records are Leases there), an edge behind a stand-in Service:
/// a request to the replica without the session is forwarded over the
/// replicas' mTLS peer listener, and after the owner stops and the edge
/// moves, the survivor serves it itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cluster_replicas_forward_and_fail_over() {
    use tether_tests::api_double;
    tokio::time::timeout(Duration::from_secs(120), async {
        let double = api_double::start().await?;
        double.put("nodes", api_double::node("edge-ha"));
        let dir = std::env::temp_dir().join(format!("tether-cli-ha-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let pki = Pki::generate()?;
        let front = pki.front_ca.issue_server("tether-cloud", &["localhost"])?;
        let node = pki
            .edge_ca
            .issue_node_client("edge-ha", &["127.0.0.9".parse()?])?;
        let f = |n: &str, pem: &str| write(&dir, n, pem);
        let kubeconfig = f(
            "kubeconfig",
            &format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: double\n\
                 clusters:\n- name: double\n  cluster:\n    server: http://{}\n\
                 contexts:\n- name: double\n  context:\n    cluster: double\n    user: nobody\n\
                 users:\n- name: nobody\n  user: {{}}\n",
                double.addr
            ),
        )?;
        let edge_ca = f("edge-ca.crt", pki.edge_ca.cert_pem())?;
        let front_ca = f("front-ca.crt", pki.front_ca.cert_pem())?;
        let (fc, fk) = (
            f("front.crt", &front.cert_pem)?,
            f("front.key", front.key_pem.expose())?,
        );
        let (nc, nk) = (
            f("node.crt", &node.cert_pem)?,
            f("node.key", node.key_pem.expose())?,
        );
        // Both replicas hold the same CA (in a cluster: the Secret).
        let mut replicas = Vec::new();
        for (id, ip) in [("cloud-a", "127.0.0.1"), ("cloud-b", "127.0.0.2")] {
            let state = dir.join(id);
            std::fs::create_dir_all(&state)?;
            write(&state, "ca.crt", pki.edge_ca.cert_pem())?;
            write(&state, "ca.key", pki.edge_ca.key_pem().expose())?;
            let any = format!("{ip}:0");
            let role = process::spawn(
                &[],
                &[
                    "cloud", "--cluster", "--kubeconfig", &kubeconfig, "--namespace", "tether",
                    "--replica-id", id, "--advertise-address", ip, "--state-dir",
                    state.to_str().context("path")?, "--server-name", "localhost",
                    "--bootstrap-addr", &any, "--hub-addr", &any, "--peer-addr", &any,
                    "--tunnel-addr", &any, "--front-addr", &any, "--admin-addr", &any,
                    "--front-cert", &fc, "--front-key", &fk, "--front-client-ca", &front_ca,
                ],
                "cloud started",
            )
            .await?;
            replicas.push(role);
        }
        let tunnel_a: std::net::SocketAddr = field(&replicas[0].started, "tunnel")?.parse()?;
        let tunnel_b: std::net::SocketAddr = field(&replicas[1].started, "tunnel")?.parse()?;
        let front_b = field(&replicas[1].started, "front")?;
        // The Service in front of the replicas' tunnel ports.
        let svc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let svc_addr = svc.local_addr()?;
        let target = Arc::new(std::sync::Mutex::new(tunnel_a));
        {
            let target = target.clone();
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = svc.accept().await {
                    let to = *target.lock().expect("lock");
                    tokio::spawn(async move {
                        if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        }
                    });
                }
            });
        }
        let kubelet = FixtureKubelet::start(None).await?;
        let _edge = process::spawn(
            &[],
            &[
                "edge", "--no-hub", "--node-name", "edge-ha", "--cloud-addr", &svc_addr.to_string(),
                "--cloud-server-name", "localhost", "--ca", &edge_ca, "--cert", &nc, "--key", &nk,
                "--kubelet-url", &format!("http://{}", kubelet.addr), "--admin-addr", "127.0.0.1:0",
            ],
            "edge started",
        )
        .await?;
        let tls = pki.apiserver_tls()?;
        let logs = |front: String, tls: Arc<rustls::ClientConfig>| async move {
            front_get(&front, tls, "edge-ha", "/containerLogs/default/web/app?bytes=100000").await
        };
        // Replica b holds no session: it forwards to a, found via the Leases.
        let mut forwarded = false;
        for _ in 0..100 {
            if let Ok((p, body)) = logs(front_b.clone(), tls.clone()).await
                && p.status == 200
            {
                ensure!(body.len() == 100_000, "forwarded body of {} bytes", body.len());
                forwarded = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(forwarded, "replica b never forwarded: {:#?}", double.requests().len());
        let lease = double
            .get("leases", "tether", "tether-node-edge-ha")
            .context("no node lease")?;
        ensure!(
            lease["spec"]["holderIdentity"] == "cloud-a"
                && lease["metadata"]["annotations"]["tether.dev/node-ips"] == "127.0.0.9",
            "node lease: {lease}"
        );
        // Replica b's service discovery lists the node a holds, so one
        // Prometheus job through the Service finds every edge.
        let sd = Command::new("curl")
            .args(["-sf", &format!("http://{}/sd", field(&replicas[1].started, "admin")?)])
            .output()
            .await?;
        let sd = String::from_utf8_lossy(&sd.stdout);
        ensure!(sd.contains("/tether/v1/nodes/edge-ha/kubelet/metrics"), "b's /sd: {sd}");
        // `tether nodes` names the holding replica: a for its own session,
        // and b, from the lease, for the node a holds.
        for (i, local) in [(0, true), (1, false)] {
            let admin = format!("http://{}", field(&replicas[i].started, "admin")?);
            let out = process::ok(&[process::BIN, "nodes", "--admin", &admin, "-o", "json"]).await?;
            let doc: serde_json::Value = serde_json::from_str(&out)?;
            let n = &doc["nodes"][0];
            ensure!(
                doc["replica"] == ["cloud-a", "cloud-b"][i]
                    && n["node"] == "edge-ha"
                    && n["replica"] == "cloud-a"
                    && n["local"] == local
                    && n["ips"] == serde_json::json!(["127.0.0.9"]),
                "replica {i}'s /nodes: {doc:#}"
            );
            let wide = process::ok(&[process::BIN, "nodes", "--admin", &admin, "-o", "wide"]).await?;
            let row: Vec<&str> = wide.lines().nth(1).unwrap_or("").split_whitespace().collect();
            ensure!(row.first() == Some(&"edge-ha") && row.get(6) == Some(&"cloud-a"), "{wide}");
        }
        // Named only by address (as the apiserver's CONNECT does), it is
        // forwarded too, found through the lease's addresses.
        let (p, body) = front_get(&front_b, tls.clone(), "127.0.0.9:10250", "/containerLogs/default/web/app?bytes=4096").await?;
        ensure!(p.status == 200 && body.len() == 4096, "by address: {}", p.status);
        // Replica a stops; the Service now sends edges to b.
        *target.lock().expect("lock") = tunnel_b;
        let stopped = std::time::Instant::now();
        let mut a = replicas.remove(0);
        sigterm(&a.child).await?;
        let _ = tokio::time::timeout(Duration::from_secs(20), a.child.wait()).await;
        let mut recovered = None;
        for _ in 0..300 {
            if let Ok((p, _)) = logs(front_b.clone(), tls.clone()).await
                && p.status == 200
            {
                recovered = Some(stopped.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = recovered.context("requests through b did not succeed again within 30 s")?;
        eprintln!("failover (processes, API double): requests succeed again {took:?} after SIGTERM of the owner");
        let _ = std::fs::remove_dir_all(&dir);
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .expect("test failed");
}
