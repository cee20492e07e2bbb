//! Issue 11 item 3: failed anonymous attempts on the bootstrap server never
//! lock out an mTLS renewal or a valid token from the same source address
//! (edges behind one NAT share it), and token guessing stays bounded. Real
//! TLS on loopback: every request below comes from 127.0.0.1.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tether_edgehub::{CertManager, EnrolError};
use tether_pki::BootstrapToken;
use tether_tests::harness::{CLOUD_NAME, CloudHandle, CloudSpec, Pki};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tether-lockout-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// POSTs an enrolment with `bearer` over a fresh anonymous TLS connection.
async fn post(pki: &Pki, cloud: &CloudHandle, bearer: &str, node: &str) -> anyhow::Result<u16> {
    let tls = tether_pki::client_config(
        std::slice::from_ref(pki.edge_ca.cert_der()),
        None,
        &[b"http/1.1"],
    )?;
    let tcp = tokio::net::TcpStream::connect(cloud.bootstrap_addr.context("no hub")?).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(rustls_pki_types::ServerName::try_from(CLOUD_NAME)?, tcp)
        .await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let (csr, _) = tether_pki::node_csr(node)?;
    let body = serde_json::to_vec(&serde_json::json!({ "nodeName": node, "csr": csr }))?;
    let req = http::Request::post("/edge.crt")
        .header("host", "localhost")
        .header("authorization", format!("Bearer {bearer}"))
        .body(Full::new(Bytes::from(body)))?;
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await?;
    Ok(status)
}

fn bound_token(cloud: &CloudHandle, node: &str) -> anyhow::Result<BootstrapToken> {
    let state = cloud.state.as_ref().context("no hub")?;
    Ok(state.tokens.create(
        state.ca().cert_der(),
        Duration::from_secs(3600),
        false,
        Some(node.to_owned()),
        vec![],
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_bad_tokens_never_lock_out_renewal_or_valid_token() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let pki = Pki::generate()?;
        let cloud = CloudHandle::start(
            &pki,
            CloudSpec {
                state_dir: Some(temp_dir("cloud")),
                ..CloudSpec::default()
            },
        )
        .await?;
        let bootstrap = cloud.bootstrap_addr.context("no hub")?.to_string();
        let ca = cloud
            .state
            .as_ref()
            .context("no hub")?
            .ca()
            .cert_der()
            .clone();
        // An enrolled edge, about to renew.
        let a = CertManager::new(&temp_dir("edge-a"), &bootstrap, CLOUD_NAME, "edge-a");
        let creds = a.enrol(&bound_token(&cloud, "edge-a")?).await?;

        // An attacker behind the same address: far more bad tokens than the
        // per-source budget allows.
        let mut statuses = Vec::new();
        for _ in 0..25 {
            let forged = BootstrapToken::generate(&ca).expose();
            statuses.push(post(&pki, &cloud, &forged, "edge-evil").await?);
        }
        ensure!(
            statuses.iter().all(|s| *s == 401 || *s == 429),
            "bad tokens answered {statuses:?}"
        );
        ensure!(
            statuses.last() == Some(&429),
            "failing attempts are no longer throttled: {statuses:?}"
        );

        // The renewal over mTLS from that address goes through...
        let renewed = a
            .renew(&creds)
            .await
            .context("renewal locked out by bad tokens")?;
        ensure!(renewed.identity.serial != creds.identity.serial);
        // ...and so does a new edge with a valid token.
        let b = CertManager::new(&temp_dir("edge-b"), &bootstrap, CLOUD_NAME, "edge-b");
        b.enrol(&bound_token(&cloud, "edge-b")?)
            .await
            .context("valid token locked out by bad tokens")?;

        // The bound on guessing: a token's secret is checked at most
        // MAX_SECRET_FAILURES (10) times a minute. Past that, even the right
        // secret is not evaluated, so an attacker who knows a token id gets
        // no further answers about its secret.
        let target = bound_token(&cloud, "edge-c")?;
        let text = target.expose();
        let (head, secret) = text.rsplit_once('.').context("token shape")?;
        let wrong = format!(
            "{head}.{}",
            if secret.starts_with('0') {
                "1".repeat(32)
            } else {
                "0".repeat(32)
            }
        );
        for _ in 0..10 {
            let s = post(&pki, &cloud, &wrong, "edge-c").await?;
            ensure!(s == 401 || s == 429, "wrong secret answered {s}");
        }
        let s = post(&pki, &cloud, &text, "edge-c").await?;
        ensure!(
            s == 429,
            "an 11th secret check in a minute was evaluated: {s}"
        );
        // Another token is unaffected.
        let d = CertManager::new(&temp_dir("edge-d"), &bootstrap, CLOUD_NAME, "edge-d");
        match d.enrol(&bound_token(&cloud, "edge-d")?).await {
            Ok(_) => {}
            Err(EnrolError::Refused { status, reason }) => {
                anyhow::bail!("edge-d refused {status}: {reason}")
            }
            Err(e) => return Err(e.into()),
        }
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .expect("test failed");
}
