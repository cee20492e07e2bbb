//! `tether token ...` and `tether certs ...`: operator commands on the
//! cloud's state directory. A running cloud picks up changes by itself.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use tether_cloudhub::CloudState;
use tether_pki::Identity;

#[derive(clap::Args)]
pub(crate) struct TokenArgs {
    /// The cloud's state directory.
    #[arg(
        long,
        global = true,
        env = "TETHER_STATE_DIR",
        default_value = "/var/lib/tether"
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    cmd: TokenCmd,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token and print it (it is shown only once).
    Create {
        /// Hours until the token expires.
        #[arg(long, default_value_t = 24.0)]
        ttl_hours: f64,
        /// The token can enrol one node only once.
        #[arg(long)]
        single_use: bool,
        /// Only this node may use the token.
        #[arg(long)]
        node: Option<String>,
        /// Let the token enrol any node name not yet enrolled, instead of
        /// one `--node`. Whoever holds it picks the name, and with `--ip`
        /// every node enrolled with it gets the same addresses: keep it
        /// single-use and short-lived.
        #[arg(long, conflicts_with = "node")]
        any_node: bool,
        /// Address the node's certificate carries (repeatable); routing by
        /// node IP trusts only these.
        #[arg(long = "ip", value_delimiter = ',')]
        ips: Vec<IpAddr>,
    },
    /// List tokens (ids and options, never secrets).
    List,
    /// Delete a token by id.
    Revoke {
        /// The token id.
        id: String,
    },
}

#[derive(clap::Args)]
pub(crate) struct CertsArgs {
    #[command(subcommand)]
    cmd: CertsCmd,
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Show a certificate's subject, addresses, serial and validity.
    Inspect {
        /// PEM file.
        file: PathBuf,
    },
    /// Revoke a node (every certificate issued to it so far) or one serial.
    /// Live sessions close within seconds and reconnects are refused.
    Revoke {
        /// The cloud's state directory.
        #[arg(long, env = "TETHER_STATE_DIR", default_value = "/var/lib/tether")]
        state_dir: PathBuf,
        /// The node to revoke.
        #[arg(required_unless_present = "serial")]
        node: Option<String>,
        /// Revoke this serial (hex) instead.
        #[arg(long)]
        serial: Option<String>,
    },
    /// Issue a client certificate for the kubelet-API front, e.g. the one
    /// kube-apiserver's egress selector presents (iptables-free mode). Sign
    /// it with the front's client CA (`front_client_ca`) and allow its
    /// subject in the cloud's `authz`.
    IssueClient {
        /// CA certificate (PEM) that signs it.
        #[arg(long)]
        ca_cert: PathBuf,
        /// Key of --ca-cert (PEM).
        #[arg(long)]
        ca_key: PathBuf,
        /// Subject common name: the user the front authorizes.
        #[arg(long)]
        common_name: String,
        /// Subject organization: a group the front authorizes (repeatable).
        #[arg(long = "group", value_delimiter = ',')]
        groups: Vec<String>,
        /// Writes `<out>.crt` and `<out>.key` (0600); existing files are kept.
        #[arg(long)]
        out: PathBuf,
    },
}

pub(crate) fn token(a: TokenArgs) -> anyhow::Result<()> {
    // Checked before the state directory is opened (and, on first use, created).
    if let TokenCmd::Create { node, any_node, .. } = &a.cmd {
        anyhow::ensure!(
            node.is_some() || *any_node,
            "give --node <name> (only that node may use the token) or --any-node (whoever holds it picks any node name not yet enrolled)"
        );
    }
    let state = CloudState::open(&a.state_dir).context("opening the state directory")?;
    match a.cmd {
        TokenCmd::Create {
            ttl_hours,
            single_use,
            node,
            any_node: _,
            ips,
        } => {
            let ttl = Duration::try_from_secs_f64(ttl_hours * 3600.0).context("--ttl-hours")?;
            if let Some(n) = &node {
                anyhow::ensure!(tether_pki::valid_node_name(n), "invalid node name {n:?}");
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs() as i64;
            for ip in &ips {
                let holder = state.enrolled.ip_holder(
                    ip,
                    node.as_deref().unwrap_or_default(),
                    &state.deny,
                    now,
                )?;
                if let Some(other) = holder {
                    anyhow::bail!(
                        "--ip {ip}: node {other:?} holds a valid certificate with this address; revoke it first (tether certs revoke {other}) or choose another address"
                    );
                }
            }
            let t = state
                .tokens
                .create(state.ca().cert_der(), ttl, single_use, node, ips)?;
            println!("{}", t.expose());
        }
        TokenCmd::List => {
            println!(
                "{:<18} {:<12} {:<8} {:<20} IPS",
                "ID", "EXPIRES", "USE", "NODE"
            );
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            for t in state.tokens.list()? {
                let left = t.expires_at.saturating_sub(now);
                let expires = if left == 0 {
                    "expired".to_owned()
                } else {
                    format!("{}h{}m", left / 3600, left % 3600 / 60)
                };
                let usage = match (t.single_use, t.used_at) {
                    (true, Some(_)) => "used",
                    (true, None) => "once",
                    (false, _) => "many",
                };
                let ips: Vec<String> = t.ips.iter().map(IpAddr::to_string).collect();
                println!(
                    "{:<18} {:<12} {:<8} {:<20} {}",
                    t.id,
                    expires,
                    usage,
                    t.node.unwrap_or_else(|| "*".into()),
                    ips.join(",")
                );
            }
        }
        TokenCmd::Revoke { id } => {
            anyhow::ensure!(state.tokens.revoke(&id)?, "no token with id {id}");
            println!("token {id} revoked");
        }
    }
    Ok(())
}

pub(crate) fn certs(a: CertsArgs) -> anyhow::Result<()> {
    match a.cmd {
        CertsCmd::Inspect { file } => {
            for der in tether_pki::load_certs(&file)? {
                let id = Identity::from_der(&der)?;
                println!(
                    "subject:    CN={} O={}",
                    id.common_name,
                    id.organizations.join(",")
                );
                println!("node:       {}", id.node_name().unwrap_or("-"));
                let ips: Vec<String> = id.ips.iter().map(IpAddr::to_string).collect();
                println!("ips:        {}", ips.join(","));
                println!("serial:     {}", id.serial);
                println!("not before: {} (unix)", id.not_before);
                println!("not after:  {} (unix)", id.not_after);
            }
        }
        CertsCmd::Revoke {
            state_dir,
            node,
            serial,
        } => {
            let state = CloudState::open(&state_dir).context("opening the state directory")?;
            match (node, serial) {
                (_, Some(s)) => {
                    state.deny.revoke_serial(&s)?;
                    println!("serial {s} revoked");
                }
                (Some(n), None) => {
                    state.deny.revoke_node(&n)?;
                    println!("node {n} revoked: its certificates so far are refused");
                }
                (None, None) => unreachable!("clap requires one"),
            }
        }
        CertsCmd::IssueClient {
            ca_cert,
            ca_key,
            common_name,
            groups,
            out,
        } => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            let ca = tether_pki::Ca::from_pem(&read(&ca_cert)?, &read(&ca_key)?)
                .context("--ca-cert/--ca-key")?;
            let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
            let issued = ca.issue_client(&common_name, &groups)?;
            let with = |ext: &str| {
                let mut p = out.clone().into_os_string();
                p.push(ext);
                PathBuf::from(p)
            };
            let (crt, key) = (with(".crt"), with(".key"));
            for p in [&crt, &key] {
                // A second run must not silently replace a deployed identity.
                anyhow::ensure!(!p.exists(), "{} exists; not overwriting it", p.display());
            }
            tether_pki::write_atomic(&key, issued.key_pem.expose().as_bytes(), 0o600)?;
            tether_pki::write_atomic(&crt, issued.cert_pem.as_bytes(), 0o644)?;
            let id = Identity::from_der(&issued.cert_chain()?[0])?;
            println!(
                "wrote {} and {}: CN={} O={} serial {} not after {} (unix)",
                crt.display(),
                key.display(),
                id.common_name,
                id.organizations.join(","),
                id.serial,
                id.not_after
            );
        }
    }
    Ok(())
}
