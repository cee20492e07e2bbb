//! Process-level tests of `tether kubeedge check` and of the cloud's
//! `kubeedge:` configuration checks (ADR 0017).

mod process;

use std::time::Duration;

use anyhow::ensure;
use process::BIN;
use tether_tests::kubeedge_edge::KubeEdgeCa;

async fn run(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let mut all = vec![BIN];
    all.extend_from_slice(args);
    process::run(&all).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_whether_a_certificate_is_accepted_and_why_not() {
    process::bounded(Duration::from_secs(60), async {
        let dir = process::temp_dir("kubeedge-cli", "check");
        let ca = KubeEdgeCa::generate()?;
        let ca_file = process::write(&dir, "ca.crt", ca.cert_pem())?;
        let modern = process::write(&dir, "edge.crt", &ca.issue_edge("edge-7", &[])?.cert_pem)?;
        let legacy = process::write(&dir, "legacy.crt", &ca.issue_legacy()?.cert_pem)?;
        let other = tether_pki::Ca::generate("other")?;
        let foreign = process::write(
            &dir,
            "foreign.crt",
            &other.issue_node_client("edge-7", &[])?.cert_pem,
        )?;
        let check = |cert: &str| {
            vec![
                "kubeedge".to_owned(),
                "check".to_owned(),
                "--ca".to_owned(),
                ca_file.clone(),
                "--cert".to_owned(),
                cert.to_owned(),
            ]
        };
        let args = check(&modern);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out, err) = run(&refs).await?;
        ensure!(ok && out.contains("accepted: node edge-7"), "{out}{err}");
        let mut args = check(&modern);
        args.extend(["--node".to_owned(), "edge-8".to_owned()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out, _) = run(&refs).await?;
        ensure!(!ok && out.contains("refused (node_mismatch)"), "{out}");
        let args = check(&legacy);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out, _) = run(&refs).await?;
        ensure!(!ok && out.contains("refused (legacy_cert)"), "{out}");
        let mut args = check(&legacy);
        args.extend([
            "--node".to_owned(),
            "old-1".to_owned(),
            "--trust-legacy-certs".to_owned(),
        ]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out, _) = run(&refs).await?;
        ensure!(ok && out.contains("accepted: node old-1"), "{out}");
        let args = check(&foreign);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out, _) = run(&refs).await?;
        ensure!(!ok && out.contains("refused (untrusted_ca)"), "{out}");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_refuses_unusable_kubeedge_settings_naming_the_field() {
    process::bounded(Duration::from_secs(60), async {
        let dir = process::temp_dir("kubeedge-cli", "config");
        for (i, (yaml, field)) in [
            (
                "kubeedge:\n  kubelet_addr: nowhere\n",
                "kubeedge.kubelet_addr",
            ),
            (
                "kubeedge:\n  response_header_timeout_secs: 0\n",
                "kubeedge.response_header_timeout_secs",
            ),
            (
                "kubeedge:\n  stream_buffer_bytes: 10\n",
                "kubeedge.stream_buffer_bytes",
            ),
            ("kubeedge:\n  trust_legacy_certs: true\n", "kubeedge.trust_"),
            ("kubeedge:\n  no_such_field: 1\n", "no_such_field"),
        ]
        .iter()
        .enumerate()
        {
            let path = process::write(&dir, &format!("c{i}.yaml"), yaml)?;
            let (ok, _, err) = run(&["cloud", "--config", &path, "--check-config"]).await?;
            ensure!(!ok && err.contains(field), "{yaml:?}: {err}");
        }
        Ok(())
    })
    .await;
}
