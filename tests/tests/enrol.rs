//! Enrolment, rotation, revocation and per-node serving certificates: the
//! cloud hub's bootstrap server and the edge hub's certificate manager,
//! through real TLS on loopback.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tether_edgehub::{CertManager, EnrolError};
use tether_pki::{BootstrapToken, Identity};
use tether_tests::bounded;
use tether_tests::fixture::{FixtureKubelet, LogVerifier};
use tether_tests::harness::{CLOUD_NAME, CloudHandle, CloudSpec, EdgeHandle, EdgeSpec, Pki};
use tether_tests::kubectl;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tether-enrol-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

async fn cloud_with_hub(
    pki: &Pki,
    name: &str,
    lifetime: Option<Duration>,
) -> anyhow::Result<CloudHandle> {
    CloudHandle::start(
        pki,
        CloudSpec {
            state_dir: Some(temp_dir(&format!("{name}-cloud"))),
            cert_lifetime: lifetime,
            ..CloudSpec::default()
        },
    )
    .await
}

fn token(
    cloud: &CloudHandle,
    ttl: Duration,
    single_use: bool,
    node: Option<&str>,
    ips: &[&str],
) -> anyhow::Result<BootstrapToken> {
    let state = cloud.state.as_ref().context("no hub")?;
    let ips = ips
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(state.tokens.create(
        state.ca().cert_der(),
        ttl,
        single_use,
        node.map(str::to_owned),
        ips,
    )?)
}

/// POSTs to the bootstrap server; returns (status, body).
async fn post_enrol(
    pki: &Pki,
    cloud: &CloudHandle,
    bearer: Option<&str>,
    body: Vec<u8>,
    client: Option<(
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    )>,
) -> anyhow::Result<(u16, String)> {
    let tls = tether_pki::client_config(
        std::slice::from_ref(pki.edge_ca.cert_der()),
        client,
        &[b"http/1.1"],
    )?;
    let tcp = tokio::net::TcpStream::connect(cloud.bootstrap_addr.context("no hub")?).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(rustls_pki_types::ServerName::try_from(CLOUD_NAME)?, tcp)
        .await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let mut req = http::Request::post("/edge.crt").header("host", "localhost");
    if let Some(b) = bearer {
        req = req.header("authorization", format!("Bearer {b}"));
    }
    let resp = send
        .send_request(req.body(Full::new(Bytes::from(body)))?)
        .await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn enrol_body(node: &str, csr: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "nodeName": node, "csr": csr })).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_edge_with_a_token_ends_up_serving_logs() {
    bounded(Duration::from_secs(60), async {
        let pki = Pki::generate()?;
        let fixture = FixtureKubelet::start(None).await?;
        let cloud = cloud_with_hub(&pki, "fresh", None).await?;
        let t = token(
            &cloud,
            Duration::from_secs(3600),
            true,
            Some("edge-new"),
            &["10.200.0.9"],
        )?;
        let dir = temp_dir("fresh-edge");
        let edge = EdgeHandle::enrol(
            &cloud,
            Some(&t),
            &dir,
            EdgeSpec::new("edge-new", fixture.addr),
        )
        .await?;
        let s = cloud
            .registry
            .wait_for_node("edge-new", None, Duration::from_secs(10))
            .await
            .context("no session")?;
        ensure!(
            s.info().ips == vec!["10.200.0.9".parse::<std::net::IpAddr>()?],
            "ips {:?}",
            s.info().ips
        );
        let (p, body) = kubectl::get(
            cloud.front_conn(pki.apiserver_tls()?).await?,
            "10.200.0.9",
            "/containerLogs/a/b/c?bytes=640",
        )
        .await?;
        ensure!(p.status == 200 && body.len() == 640);
        // The key is private, and a restart reuses the credentials without a token.
        use std::os::unix::fs::PermissionsExt;
        ensure!(
            std::fs::metadata(dir.join("node.key"))?
                .permissions()
                .mode()
                & 0o777
                == 0o600
        );
        edge.stop().await;
        let again =
            EdgeHandle::enrol(&cloud, None, &dir, EdgeSpec::new("edge-new", fixture.addr)).await?;
        cloud
            .registry
            .wait_for_node("edge-new", None, Duration::from_secs(10))
            .await
            .context("no session after restart")?;
        again.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_refuses_bad_requests() {
    bounded(Duration::from_secs(60), async {
        let pki = Pki::generate()?;
        let cloud = cloud_with_hub(&pki, "refuse", None).await?;
        let (csr_a, _) = tether_pki::node_csr("edge-a")?;
        let good = token(&cloud, Duration::from_secs(3600), true, None, &[])?;
        // Wrong token: right CA hash, unknown id and secret.
        let other_cloud_token =
            BootstrapToken::generate(cloud.state.as_ref().context("hub")?.ca().cert_der());
        let (s, body) = post_enrol(
            &pki,
            &cloud,
            Some(&other_cloud_token.expose()),
            enrol_body("edge-a", &csr_a),
            None,
        )
        .await?;
        ensure!(
            s == 401 && body.contains("invalid bootstrap token"),
            "wrong token: {s} {body}"
        );
        // Expired token.
        let expired = token(&cloud, Duration::ZERO, false, None, &[])?;
        let (s, _) = post_enrol(
            &pki,
            &cloud,
            Some(&expired.expose()),
            enrol_body("edge-a", &csr_a),
            None,
        )
        .await?;
        ensure!(s == 401, "expired token: {s}");
        // CSR for another node than requested.
        let (s, body) = post_enrol(
            &pki,
            &cloud,
            Some(&good.expose()),
            enrol_body("edge-b", &csr_a),
            None,
        )
        .await?;
        ensure!(
            s == 400 && body.contains("does not match"),
            "csr mismatch: {s} {body}"
        );
        // Garbage instead of a CSR.
        let (s, body) = post_enrol(
            &pki,
            &cloud,
            Some(&good.expose()),
            enrol_body("edge-a", "garbage"),
            None,
        )
        .await?;
        ensure!(s == 400 && body.contains("CSR"), "garbage: {s} {body}");
        // Oversized body.
        let (s, _) = post_enrol(
            &pki,
            &cloud,
            Some(&good.expose()),
            vec![b'x'; 70 << 10],
            None,
        )
        .await?;
        ensure!(s == 413, "oversized: {s}");
        // A single-use token works once (failed attempts above did not use it up)...
        let (s, pem) = post_enrol(
            &pki,
            &cloud,
            Some(&good.expose()),
            enrol_body("edge-a", &csr_a),
            None,
        )
        .await?;
        ensure!(s == 200, "good token: {s} {pem}");
        // ...and not twice.
        let (s, _) = post_enrol(
            &pki,
            &cloud,
            Some(&good.expose()),
            enrol_body("edge-a", &csr_a),
            None,
        )
        .await?;
        ensure!(s == 401, "reused single-use token: {s}");
        // Repeated failures from one source are rate limited.
        let mut limited = false;
        for _ in 0..12 {
            let (s, _) = post_enrol(
                &pki,
                &cloud,
                Some(&other_cloud_token.expose()),
                enrol_body("edge-a", &csr_a),
                None,
            )
            .await?;
            limited |= s == 429;
        }
        ensure!(limited, "no rate limit after repeated failures");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_csr_gets_a_plain_client_cert_for_the_token_node() {
    bounded(Duration::from_secs(60), async {
        let pki = Pki::generate()?;
        let cloud = cloud_with_hub(&pki, "greedy", None).await?;
        let t = token(
            &cloud,
            Duration::from_secs(3600),
            false,
            Some("edge-g"),
            &["10.200.0.7"],
        )?;
        let mut params = rcgen::CertificateParams::new(vec![
            "evil.example".to_string(),
            "10.9.9.9".to_string(),
        ])?;
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:masters");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "system:node:edge-g");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate()?;
        let csr = params.serialize_request(&key)?.pem()?;
        let (s, pem) = post_enrol(
            &pki,
            &cloud,
            Some(&t.expose()),
            enrol_body("edge-g", &csr),
            None,
        )
        .await?;
        ensure!(s == 200, "{s} {pem}");
        let der = tether_pki::load_certs_pem(pem.as_bytes())?.remove(0);
        let id = Identity::from_der(&der)?;
        ensure!(id.node_name() == Some("edge-g"));
        ensure!(
            id.organizations == vec!["system:nodes".to_string()],
            "orgs {:?}",
            id.organizations
        );
        ensure!(
            id.ips == vec!["10.200.0.7".parse::<std::net::IpAddr>()?],
            "ips {:?}",
            id.ips
        );
        // The token is bound to edge-g: another node's name is refused.
        let mut other = rcgen::CertificateParams::default();
        other
            .distinguished_name
            .push(rcgen::DnType::CommonName, "system:node:edge-h");
        let csr = other.serialize_request(&key)?.pem()?;
        let (s, _) = post_enrol(
            &pki,
            &cloud,
            Some(&t.expose()),
            enrol_body("edge-h", &csr),
            None,
        )
        .await?;
        ensure!(s == 401, "token for edge-g enrolled edge-h: {s}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_refuses_a_cloud_with_another_ca() {
    bounded(Duration::from_secs(60), async {
        let pki = Pki::generate()?;
        let cloud = cloud_with_hub(&pki, "mitm", None).await?;
        // A token made for a different CA: the cloud the edge reaches is not
        // the one the operator meant.
        let other = tether_pki::Ca::generate("other")?;
        let t = BootstrapToken::generate(other.cert_der());
        let m = CertManager::new(
            &temp_dir("mitm-edge"),
            &cloud.bootstrap_addr.context("hub")?.to_string(),
            CLOUD_NAME,
            "edge-m",
        );
        match m.enrol(&t).await {
            Err(EnrolError::CaMismatch { .. }) => Ok(()),
            other => anyhow::bail!("expected a CA mismatch, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_a_follow_stream_and_switches_certificates() {
    bounded(Duration::from_secs(120), async {
        let pki = Pki::generate()?;
        let fixture = FixtureKubelet::start(None).await?;
        let cloud = cloud_with_hub(&pki, "rotate", Some(Duration::from_secs(60))).await?;
        let t = token(&cloud, Duration::from_secs(3600), true, Some("edge-r"), &[])?;
        let edge = EdgeHandle::enrol(
            &cloud,
            Some(&t),
            &temp_dir("rotate-edge"),
            EdgeSpec::new("edge-r", fixture.addr),
        )
        .await?;
        let first = cloud
            .registry
            .wait_for_node("edge-r", None, Duration::from_secs(10))
            .await
            .context("no session")?;
        let first_serial = first.info().identity.serial.clone();
        let resp = kubectl::get_streaming(
            cloud.front_conn(pki.apiserver_tls()?).await?,
            "edge-r",
            "/containerLogs/a/b/c?follow=true&bytes=64",
        )
        .await?;
        ensure!(resp.status() == 200);
        let mut body = resp.into_body();
        let mut v = LogVerifier::new(0);
        // Renewal happens 42-54 s into the 60 s lifetime; read the follow
        // stream the whole time and watch for the largest gap between lines.
        let deadline = Instant::now() + Duration::from_secs(70);
        let (mut last, mut max_gap) = (Instant::now(), Duration::ZERO);
        let mut rotated = None;
        while Instant::now() < deadline {
            let chunk = kubectl::next_chunk(&mut body)
                .await?
                .context("follow stream ended")?;
            v.update(&chunk)?;
            max_gap = max_gap.max(last.elapsed());
            last = Instant::now();
            if rotated.is_none()
                && let Some(s) = cloud.registry.get("edge-r")
                && s.info().identity.serial != first_serial
            {
                rotated = Some(Instant::now());
            }
            if rotated.is_some_and(|at| at.elapsed() > Duration::from_secs(3)) {
                break;
            }
        }
        ensure!(
            rotated.is_some(),
            "no session with a renewed certificate within 70 s"
        );
        ensure!(
            max_gap < Duration::from_secs(2),
            "follow stream stalled for {max_gap:?}"
        );
        // New requests go over the new session with the new certificate.
        let (p, _) = kubectl::get(
            cloud.front_conn(pki.apiserver_tls()?).await?,
            "edge-r",
            "/healthz",
        )
        .await?;
        ensure!(p.status == 200);
        drop(body);
        edge.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_node_is_cut_off_within_5s_and_cannot_reconnect() {
    bounded(Duration::from_secs(60), async {
        let pki = Pki::generate()?;
        let fixture = FixtureKubelet::start(None).await?;
        let cloud = cloud_with_hub(&pki, "revoke", None).await?;
        let t = token(&cloud, Duration::from_secs(3600), true, Some("edge-x"), &[])?;
        let edge = EdgeHandle::enrol(
            &cloud,
            Some(&t),
            &temp_dir("revoke-edge"),
            EdgeSpec::new("edge-x", fixture.addr),
        )
        .await?;
        cloud
            .registry
            .wait_for_node("edge-x", None, Duration::from_secs(10))
            .await
            .context("no session")?;
        let follow = kubectl::get_streaming(
            cloud.front_conn(pki.apiserver_tls()?).await?,
            "edge-x",
            "/containerLogs/a/b/c?follow=true",
        )
        .await?;
        let mut body = follow.into_body();
        let started = Instant::now();
        cloud
            .state
            .as_ref()
            .context("hub")?
            .deny
            .revoke_node("edge-x")?;
        ensure!(
            cloud
                .registry
                .wait_until(Duration::from_secs(5), |r| r.get("edge-x").is_none())
                .await,
            "revoked session still live after 5 s"
        );
        // Its in-flight stream is cut too.
        let cut = async {
            loop {
                match kubectl::next_chunk(&mut body).await {
                    Ok(Some(_)) => continue,
                    _ => return,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), cut)
            .await
            .context("stream survived revocation")?;
        ensure!(started.elapsed() < Duration::from_secs(5));
        // The agent keeps retrying; none of its attempts is admitted.
        let refused_before = count(&cloud.metrics_text(), "refused_websocket");
        let mut refused = false;
        for _ in 0..100 {
            if count(&cloud.metrics_text(), "refused_websocket") > refused_before {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ensure!(refused, "no reconnect was refused");
        let mut counted = false;
        for _ in 0..100 {
            if count(&cloud.metrics_text(), "disconnected_revoked") == 1 {
                counted = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ensure!(
            counted,
            "revoked session not counted:\n{}",
            cloud.metrics_text()
        );
        ensure!(
            cloud.registry.get("edge-x").is_none(),
            "revoked node reconnected"
        );
        edge.stop().await;
        Ok(())
    })
    .await;
}

fn count(metrics: &str, event: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.contains(&format!("event=\"{event}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_presents_a_serving_certificate_for_the_node_dialled() {
    bounded(Duration::from_secs(60), async {
        let pki = Pki::generate()?;
        let fixture = FixtureKubelet::start(None).await?;
        let cloud = CloudHandle::start(
            &pki,
            CloudSpec {
                node_serving_certs: true,
                ..CloudSpec::default()
            },
        )
        .await?;
        let mut a = EdgeSpec::new("node-a", fixture.addr);
        a.ips = vec!["10.200.1.1".parse()?];
        let mut b = EdgeSpec::new("node-b", fixture.addr);
        b.ips = vec!["10.200.1.2".parse()?];
        let (ea, eb) = (
            EdgeHandle::start(&pki, cloud.tunnel_addr, a)?,
            EdgeHandle::start(&pki, cloud.tunnel_addr, b)?,
        );
        for n in ["node-a", "node-b"] {
            cloud
                .registry
                .wait_for_node(n, None, Duration::from_secs(10))
                .await
                .context("no session")?;
        }
        // A client that verifies kubelet serving certificates against the
        // kubelet-serving CA, dialling node-a by name.
        let tls = pki.apiserver_tls()?;
        let tcp = tokio::net::TcpStream::connect(cloud.front_addr).await?;
        let conn = tokio_rustls::TlsConnector::from(tls)
            .connect(rustls_pki_types::ServerName::try_from("node-a")?, tcp)
            .await
            .context("TLS verification for node-a failed")?;
        let id = Identity::from_peer(conn.get_ref().1.peer_certificates())?;
        ensure!(
            id.common_name == "node-a",
            "certificate for {:?}",
            id.common_name
        );
        ensure!(
            id.ips == vec!["10.200.1.1".parse::<std::net::IpAddr>()?],
            "ips {:?}",
            id.ips
        );
        let (p, _) = kubectl::get(conn, "node-a", "/healthz").await?;
        ensure!(p.status == 200);
        drop((ea, eb));
        Ok(())
    })
    .await;
}
