//! Issue 11 items 8 and 9 through the real `tether` binary: start-up
//! validation (one line naming the file, the field and the fix; nothing
//! written to the state dir first) and enrolment edge cases (a revoked edge
//! falls back to its new token; an address is never issued twice; tokens
//! without a node need `--any-node`).

mod process;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use process::{BIN, run, spawn};
use tether_cloudhub::CloudState;
use tether_edgehub::{CertManager, EnrolError};
use tether_pki::BootstrapToken;
use tether_tests::fixture::FixtureKubelet;
use tether_tests::harness::{CLOUD_NAME, CloudHandle, CloudSpec, Pki};

async fn cloud(pki: &Pki, name: &str) -> anyhow::Result<CloudHandle> {
    CloudHandle::start(
        pki,
        CloudSpec {
            state_dir: Some(process::temp_dir("auth-cli", name)),
            ..CloudSpec::default()
        },
    )
    .await
}

fn token(
    state: &CloudState,
    single_use: bool,
    node: Option<&str>,
    ips: &[&str],
) -> anyhow::Result<BootstrapToken> {
    let ips = ips
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(state.tokens.create(
        state.ca().cert_der(),
        Duration::from_secs(3600),
        single_use,
        node.map(str::to_owned),
        ips,
    )?)
}

fn state(cloud: &CloudHandle) -> anyhow::Result<&CloudState> {
    cloud.state.as_deref().context("no state dir")
}

fn manager(cloud: &CloudHandle, dir: &Path, node: &str) -> anyhow::Result<CertManager> {
    let bootstrap = cloud.bootstrap_addr.context("no bootstrap")?;
    Ok(CertManager::new(
        dir,
        &bootstrap.to_string(),
        CLOUD_NAME,
        node,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item9_revoked_edge_falls_back_to_its_new_token() {
    process::bounded(Duration::from_secs(40), async {
        let pki = Pki::generate()?;
        let fixture = FixtureKubelet::start(None).await?;
        let cloud = cloud(&pki, "fallback-cloud").await?;
        let st = state(&cloud)?;
        // The edge enrolled once; then the operator revoked it.
        let edge_dir = process::temp_dir("auth-cli", "fallback-edge");
        let old = manager(&cloud, &edge_dir, "edge-r")?
            .enrol(&token(st, true, Some("edge-r"), &[])?)
            .await?;
        st.deny.revoke_node("edge-r")?;
        // Revocation has one-second resolution: a certificate issued in the
        // same second as the revocation counts as revoked, so step past it.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // Restarted with a new bound token, its revoked certificate still on disk.
        let fresh = token(st, true, Some("edge-r"), &[])?;
        let tunnel = cloud.tunnel_addr.to_string();
        let bootstrap = cloud.bootstrap_addr.context("bootstrap")?.to_string();
        let kubelet = format!("http://{}", fixture.addr);
        let edge_dir_s = edge_dir.display().to_string();
        let fresh_s = fresh.expose();
        let mut edge = spawn(
            &[],
            &[
                "edge",
                "--node-name",
                "edge-r",
                "--cloud-addr",
                &tunnel,
                "--bootstrap-addr",
                &bootstrap,
                "--cloud-server-name",
                CLOUD_NAME,
                "--token",
                &fresh_s,
                "--state-dir",
                &edge_dir_s,
                "--kubelet-url",
                &kubelet,
                "--no-hub",
                "--admin-addr",
                "127.0.0.1:0",
            ],
            "edge started",
        )
        .await?;
        let s = cloud
            .registry
            .wait_for_node("edge-r", None, Duration::from_secs(15))
            .await
            .context("the revoked edge never came back with its new token")?;
        ensure!(
            s.info().identity.serial != old.identity.serial,
            "connected with the revoked certificate"
        );
        // The new certificate replaced the revoked one on disk.
        let on_disk = tether_pki::load_certs(&edge_dir.join("node.crt"))?;
        let id = tether_pki::Identity::from_der(&on_disk[0])?;
        ensure!(
            id.serial == s.info().identity.serial,
            "certificate on disk not replaced"
        );
        let _ = edge.child.start_kill();
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item9_address_of_a_live_node_is_not_issued_again() {
    process::bounded(Duration::from_secs(30), async {
        let pki = Pki::generate()?;
        let cloud = cloud(&pki, "ip-cloud").await?;
        let st = state(&cloud)?;
        let ip = "10.9.0.1";
        manager(&cloud, &process::temp_dir("auth-cli", "ip-a"), "edge-a")?
            .enrol(&token(st, true, Some("edge-a"), &[ip])?)
            .await?;
        // Another node's token with the same address: 409, token not spent.
        let for_b = token(st, true, Some("edge-b"), &[ip])?;
        let b = manager(&cloud, &process::temp_dir("auth-cli", "ip-b"), "edge-b")?;
        match b.enrol(&for_b).await {
            Err(EnrolError::Refused {
                status: 409,
                reason,
            }) => ensure!(
                reason.contains(ip) && reason.contains("edge-a"),
                "409 without a clear reason: {reason}"
            ),
            Ok(c) => anyhow::bail!("{ip} issued again to edge-b: {:?}", c.identity.ips),
            Err(e) => anyhow::bail!("edge-b: {e}"),
        }
        // An unbound token with that address: 409 as well.
        let any = token(st, false, None, &[ip])?;
        match manager(&cloud, &process::temp_dir("auth-cli", "ip-c"), "edge-c")?
            .enrol(&any)
            .await
        {
            Err(EnrolError::Refused { status: 409, .. }) => {}
            other => anyhow::bail!("unbound token for a held address: {other:?}"),
        }
        // The operator command refuses to make such a token at all.
        let dir = st.dir().display().to_string();
        let (ok, _, err) = run(&[
            BIN,
            "token",
            "create",
            "--state-dir",
            &dir,
            "--node",
            "edge-z",
            "--ip",
            ip,
        ])
        .await?;
        ensure!(
            !ok && err.trim().lines().count() == 1
                && err.contains("edge-a")
                && err.contains("revoke"),
            "token create for a held address: {err}"
        );
        // Once edge-a is revoked, the address is free and edge-b's token
        // (unspent by the 409) enrols it.
        st.deny.revoke_node("edge-a")?;
        let c = b
            .enrol(&for_b)
            .await
            .context("edge-b after edge-a was revoked")?;
        ensure!(c.identity.ips == vec![ip.parse::<std::net::IpAddr>()?]);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item9_token_without_node_needs_any_node() {
    process::bounded(Duration::from_secs(20), async {
        let dir = process::temp_dir("auth-cli", "any-node");
        let d = dir.display().to_string();
        let (ok, out, err) = run(&[
            BIN,
            "token",
            "create",
            "--state-dir",
            &d,
            "--ip",
            "10.9.0.2",
        ])
        .await?;
        ensure!(
            !ok && !out.contains("tether1.") && err.contains("--any-node"),
            "a token without --node was created: {out} {err}"
        );
        ensure!(
            entries(&dir).is_empty(),
            "state dir written: {:?}",
            entries(&dir)
        );
        let (ok, _, err) = run(&[
            BIN,
            "token",
            "create",
            "--state-dir",
            &d,
            "--node",
            "n1",
            "--any-node",
        ])
        .await?;
        ensure!(!ok, "--node with --any-node accepted: {err}");
        let (ok, out, err) = run(&[
            BIN,
            "token",
            "create",
            "--state-dir",
            &d,
            "--any-node",
            "--single-use",
        ])
        .await?;
        ensure!(ok && out.starts_with("tether1."), "--any-node: {out} {err}");
        let (ok, list, _) = run(&[BIN, "token", "list", "--state-dir", &d]).await?;
        ensure!(ok && list.lines().count() == 2, "{list}");
        Ok(())
    })
    .await;
}

/// Entries of `dir` (names), sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The front's files (every start needs them), written under `dir`.
fn front_files(pki: &Pki, dir: &Path) -> anyhow::Result<Vec<String>> {
    let front = pki.front_ca.issue_server("tether-cloud", &["localhost"])?;
    let w = |n: &str, pem: &str| process::write(dir, n, pem);
    Ok(vec![
        "--front-cert".into(),
        w("front.crt", &front.cert_pem)?,
        "--front-key".into(),
        w("front.key", front.key_pem.expose())?,
        "--front-client-ca".into(),
        w("front-ca.crt", pki.front_ca.cert_pem())?,
    ])
}

/// Runs `tether cloud` on loopback ports 0 with `extra` arguments; it must
/// fail. Returns its one stderr line.
async fn cloud_refuses(extra: &[&str]) -> anyhow::Result<String> {
    let mut args = vec![
        BIN,
        "cloud",
        "--tunnel-addr",
        "127.0.0.1:0",
        "--front-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--bootstrap-addr",
        "127.0.0.1:0",
        "--hub-addr",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = run(&args).await?;
    ensure!(!ok, "started or passed: {out}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(lines.len() == 1, "want one line, got:\n{err}");
    Ok(lines[0].to_owned())
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_state_dir_with_a_foreign_ca_key_is_refused() {
    process::bounded(Duration::from_secs(20), async {
        let pki = Pki::generate()?;
        let dir = process::temp_dir("auth-cli", "foreign-key");
        let state = dir.join("state");
        std::fs::create_dir_all(&state)?;
        let other = tether_pki::Ca::generate("other")?;
        std::fs::write(state.join("ca.crt"), pki.edge_ca.cert_pem())?;
        std::fs::write(state.join("ca.key"), other.key_pem().expose())?;
        let files = front_files(&pki, &dir)?;
        let s = state.display().to_string();
        let mut a = args(&files);
        a.extend(["--state-dir", &s]);
        let line = cloud_refuses(&a).await?;
        ensure!(
            line.contains("state_dir")
                && line.contains("ca.key")
                && line.contains("does not match")
                && line.contains("remove both"),
            "{line}"
        );
        ensure!(
            entries(&state) == ["ca.crt", "ca.key"],
            "{:?}",
            entries(&state)
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_corrupt_state_files_are_refused() {
    process::bounded(Duration::from_secs(30), async {
        let pki = Pki::generate()?;
        let dir = process::temp_dir("auth-cli", "corrupt");
        let files = front_files(&pki, &dir)?;
        for file in ["tokens.json", "enrolled.json", "revoked.json"] {
            let state = dir.join(file.replace('.', "-"));
            std::fs::create_dir_all(&state)?;
            std::fs::write(state.join("ca.crt"), pki.edge_ca.cert_pem())?;
            std::fs::write(state.join("ca.key"), pki.edge_ca.key_pem().expose())?;
            std::fs::write(state.join(file), "{\"tokens\": [ truncated")?;
            let s = state.display().to_string();
            let mut a = args(&files);
            a.extend(["--state-dir", &s]);
            let line = cloud_refuses(&a).await?;
            ensure!(
                line.contains(&state.join(file).display().to_string())
                    && line.contains("state_dir")
                    && line.contains("restore"),
                "{file}: {line}"
            );
            ensure!(
                entries(&state) == ["ca.crt", "ca.key", file],
                "{file}: {:?}",
                entries(&state)
            );
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_check_config_refuses_every_unusable_limit() {
    process::bounded(Duration::from_secs(60), async {
        let dir = process::temp_dir("auth-cli", "limits");
        let cases = [
            (
                "front_limits:\n  max_connections: 0\n",
                "front_limits.max_connections",
            ),
            (
                "front_limits:\n  header_timeout_secs: 0\n",
                "front_limits.header_timeout_secs",
            ),
            (
                "limits:\n  keepalive_interval: 0\n",
                "limits.keepalive_interval",
            ),
            (
                "limits:\n  handshake_timeout: 0\n",
                "limits.handshake_timeout",
            ),
            (
                "hub:\n  keepalive_interval_secs: 10\n  keepalive_timeout_secs: 5\n",
                "hub.keepalive_timeout_secs",
            ),
            ("limits:\n  max_streams: 4e9\n", "limits.max_streams"),
            ("limits:\n  max_streams: 4000000000\n", "limits.max_streams"),
            (
                "hub:\n  keepalive_timeout_secs: 0\n",
                "hub.keepalive_timeout_secs",
            ),
            ("drain_timeout_secs: 100000\n", "drain_timeout_secs"),
            (
                "limits:\n  reconnect_rate: 2000000\n",
                "limits.reconnect_rate",
            ),
            ("limits:\n  reconnect_burst: -1\n", "limits.reconnect_burst"),
        ];
        for (i, (yaml, field)) in cases.iter().enumerate() {
            let path = process::write(&dir, &format!("c{i}.yaml"), yaml)?;
            let line = cloud_refuses(&["--config", &path, "--check-config"]).await?;
            ensure!(
                line.contains(&path) && line.contains(&format!("`{field}`")),
                "{yaml:?}: {line}"
            );
        }
        // The edge has the same checks.
        let path = process::write(&dir, "edge.yaml", "limits:\n  max_streams: 0\n")?;
        let (ok, _, err) = run(&[BIN, "edge", "--config", &path, "--check-config"]).await?;
        ensure!(
            !ok && err.trim().lines().count() == 1 && err.contains("`limits.max_streams`"),
            "edge: {err}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_wrong_type_names_the_field() {
    process::bounded(Duration::from_secs(20), async {
        let dir = process::temp_dir("auth-cli", "wrong-type");
        let path = process::write(
            &dir,
            "c.yaml",
            "front_addr: 127.0.0.1:9443\nfront_limits:\n  max_connections: lots\n",
        )?;
        let line = cloud_refuses(&["--config", &path, "--check-config"]).await?;
        ensure!(
            line.contains(&path)
                && line.contains("`front_limits.max_connections`")
                && line.contains("line 3"),
            "{line}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_encrypted_key_is_named_and_nothing_is_written() {
    process::bounded(Duration::from_secs(20), async {
        let pki = Pki::generate()?;
        let dir = process::temp_dir("auth-cli", "encrypted");
        let state = dir.join("state");
        std::fs::create_dir_all(&state)?;
        let mut files = front_files(&pki, &dir)?;
        let key = process::write(
            &dir,
            "enc.key",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0wSjApBgkqhkiG9w0BBQwwHAQI\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )?;
        files[3] = key.clone();
        let s = state.display().to_string();
        let mut a = args(&files);
        a.extend(["--state-dir", &s]);
        let line = cloud_refuses(&a).await?;
        ensure!(
            line.contains(&key)
                && line.contains("front_key")
                && line.contains("encrypted")
                && line.contains("decrypt"),
            "{line}"
        );
        ensure!(entries(&state).is_empty(), "state dir written: {:?}", entries(&state));
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_invalid_config_writes_nothing_to_the_state_dir() {
    process::bounded(Duration::from_secs(20), async {
        let pki = Pki::generate()?;
        let dir = process::temp_dir("auth-cli", "nothing-written");
        let state = dir.join("state");
        std::fs::create_dir_all(&state)?;
        let files = front_files(&pki, &dir)?;
        let s = state.display().to_string();
        for bad in [
            "cert_lifetime_hours: 0.001\n",
            "preauth:\n  max_pending: 0\n",
            "hub:\n  max_attempts: 0\n",
        ] {
            let path = process::write(&dir, "c.yaml", bad)?;
            let mut a = args(&files);
            a.extend(["--state-dir", &s, "--config", &path]);
            let line = cloud_refuses(&a).await?;
            ensure!(line.contains("config field"), "{bad:?}: {line}");
            ensure!(
                entries(&state).is_empty(),
                "{bad:?}: state dir written: {:?}",
                entries(&state)
            );
        }
        Ok(())
    })
    .await;
}
