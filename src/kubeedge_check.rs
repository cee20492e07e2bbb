//! `tether kubeedge check`: says whether a cloud with the given KubeEdge CA
//! would admit an edge certificate on `/v1/kubeedge/connect`, as which node,
//! and if not, why (the same decision the listener makes, ADR 0017).

use std::path::PathBuf;

use anyhow::Context;
use tether_tunnel::kubeedge::{KubeEdgeTrust, TrustConfig};

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Check an edge certificate against the KubeEdge CA; exit 1 if refused.
    Check(CheckArgs),
}

#[derive(clap::Args)]
struct CheckArgs {
    /// The KubeEdge CA (PEM), as in the cloud's `kubeedge.ca_file`.
    #[arg(long)]
    ca: PathBuf,
    /// The edge's certificate (PEM; leaf first, intermediates after), e.g.
    /// `/etc/kubeedge/certs/server.crt`.
    #[arg(long)]
    cert: PathBuf,
    /// The node name the edge claims (`edged.hostnameOverride`), if known.
    #[arg(long)]
    node: Option<String>,
    /// As the cloud's `kubeedge.trust_legacy_certs`.
    #[arg(long)]
    trust_legacy_certs: bool,
}

pub(crate) fn run(a: Args) -> anyhow::Result<bool> {
    let Command::Check(a) = a.command;
    let cas = tether_pki::load_certs(&a.ca).context("--ca")?;
    let chain = tether_pki::load_certs(&a.cert).context("--cert")?;
    let trust = KubeEdgeTrust::new(TrustConfig {
        kubeedge_cas: cas,
        tether_cas: Vec::new(),
        trust_legacy_certs: a.trust_legacy_certs,
        trust_internal_ip_header: false,
    })
    .context("--ca")?;
    let first = chain.first().context("--cert holds no certificate")?;
    let leaf = tether_pki::Identity::from_der(first).context("--cert")?;
    println!(
        "certificate: CN={} O={:?} serial {} not after {} (unix)",
        leaf.common_name, leaf.organizations, leaf.serial, leaf.not_after
    );
    match trust.admit(&chain, a.node.as_deref(), None) {
        Ok(ok) => {
            println!("accepted: node {}", ok.node);
            if ok.legacy {
                println!(
                    "  legacy certificate: admitted only because of --trust-legacy-certs; \
                     the node name comes from the edge's SessionHostNameOverride header"
                );
            }
            match ok.ips.is_empty() {
                true => println!(
                    "  addresses: none in the certificate; route by node name, or set \
                     kubeedge.trust_internal_ip_header (the edge may then claim any address)"
                ),
                false => println!("  addresses: {:?}", ok.ips),
            }
            println!(
                "  revocation: the cloud's deny list still applies (serial {})",
                ok.identity.serial
            );
            Ok(true)
        }
        Err(e) => {
            println!("refused ({}): {e}", e.label());
            Ok(false)
        }
    }
}
