//! `tether edge --check`: diagnoses a new edge's way to the cloud and to its
//! kubelet, one step at a time, with the configuration `tether edge` would
//! run with. Each step prints one plain line, `ok   <step>: <detail>` or
//! `FAIL <step>: <what happened>. Fix: <the fix>`, and the check stops at the
//! first failure. Nothing is written: no enrolment, no session is opened.

mod probe;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tether_edgehub::{CertManager, EdgeCredentials, EnrolError};
use tether_pki::{BootstrapToken, Identity};

use crate::config::EdgeConfig;
use probe::{Admission, ChainError};

/// No network step waits longer than this, whatever the configured deadlines.
const STEP_TIMEOUT_CAP: Duration = Duration::from_secs(5);

/// A failed step: what happened and what to do about it.
struct Fail {
    what: String,
    fix: String,
}

fn fail(what: impl Into<String>, fix: impl Into<String>) -> Fail {
    Fail {
        what: what.into(),
        fix: fix.into(),
    }
}

type Step<T> = Result<T, Fail>;

/// Prints one step's line; on failure returns the step's name as the error.
fn report<T>(step: &'static str, r: Step<(T, String)>) -> Result<T, &'static str> {
    use std::io::Write;
    let line = match &r {
        Ok((_, detail)) => format!("ok   {step}: {detail}"),
        Err(f) => format!(
            "FAIL {step}: {}. Fix: {}",
            f.what.trim_end_matches('.'),
            f.fix
        ),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    r.map(|(v, _)| v).map_err(|_| step)
}

/// Where the node's credentials come from.
enum Creds {
    /// `ca`, `cert` and `key` files named in the configuration.
    Files,
    /// Enrolled into `state_dir` (or to be enrolled with a token).
    Enrolled(CertManager),
}

/// Runs the check. `config_check` is the configuration validation `tether
/// edge --check-config` does; its error becomes the first step's failure.
pub(crate) async fn run(
    cfg: &EdgeConfig,
    config_source: &str,
    config_check: anyhow::Result<()>,
    token: Option<&BootstrapToken>,
) -> anyhow::Result<()> {
    match steps(cfg, config_source, config_check, token).await {
        Ok(()) => Ok(()),
        Err(step) => anyhow::bail!("the edge check failed at the {step} step"),
    }
}

/// The configuration could not even be read: the check's only line.
pub(crate) fn config_failed(e: anyhow::Error) -> anyhow::Result<()> {
    let fix = "correct the file named above; `tether edge --help` lists the fields' flags";
    match report::<()>("config", Err(fail(format!("{e:#}"), fix))) {
        Ok(()) => Ok(()),
        Err(step) => anyhow::bail!("the edge check failed at the {step} step"),
    }
}

async fn steps(
    cfg: &EdgeConfig,
    source: &str,
    config_check: anyhow::Result<()>,
    token: Option<&BootstrapToken>,
) -> Result<(), &'static str> {
    let c = report("config", config(cfg, source, config_check, token))?;
    let timeout = cfg.limits.handshake_timeout.min(STEP_TIMEOUT_CAP);
    let mut targets = vec![("tunnel", "cloud_addr", c.tunnel.clone())];
    if let Creds::Enrolled(_) = c.creds {
        targets.push(("bootstrap", "bootstrap_addr", c.bootstrap.clone()));
    }
    let resolved = report("dns", dns(&targets, timeout).await)?;
    report("tcp", tcp(&targets, &resolved, timeout).await)?;
    let tunnel_addrs = &resolved[0];
    let chain = report("tls", tls(&c, tunnel_addrs, timeout).await)?;
    let (cas, usable) = report(
        "server-certificate",
        server_cert(cfg, &c, &chain, token).await,
    )?;
    report(
        "node-certificate",
        node_cert(cfg, &c, usable, &cas, token, tunnel_addrs, timeout).await,
    )?;
    report("kubelet", kubelet(cfg).await)?;
    Ok(())
}

/// The settings the network steps use, read and checked.
struct Checked {
    node: String,
    tunnel: String,
    bootstrap: String,
    server_name: ServerName<'static>,
    creds: Creds,
}

fn config(
    cfg: &EdgeConfig,
    source: &str,
    check: anyhow::Result<()>,
    token: Option<&BootstrapToken>,
) -> Step<(Checked, String)> {
    let fix = format!("correct the field named above in {source}, or the flag that overrides it");
    let bad = |e: anyhow::Error| fail(format!("{e:#}"), fix.clone());
    check.map_err(bad)?;
    let node = cfg.node_name().map_err(bad)?.to_owned();
    let tunnel = cfg.cloud_addr().map_err(bad)?.to_owned();
    let bootstrap = cfg.bootstrap_addr().map_err(bad)?;
    let name = cfg.cloud_server_name().map_err(bad)?;
    let server_name = ServerName::try_from(name.clone()).map_err(|e| {
        fail(
            format!("config field `cloud_server_name` {name:?} is not a host name or address: {e}"),
            fix.clone(),
        )
    })?;
    tether_edgestream::KubeletEndpoint::new(
        &cfg.kubelet_url,
        cfg.kubelet_tls().map_err(bad)?,
        cfg.kubelet_server_name.as_deref(),
    )
    .map_err(|e| fail(format!("config field `kubelet_url`: {e}"), fix.clone()))?;
    let (creds, how) = if cfg.file_credentials() {
        (Creds::Files, "certificate files".to_owned())
    } else {
        let how = match token {
            Some(_) => format!(
                "state dir {} with a bootstrap token",
                cfg.state_dir.display()
            ),
            None => format!("state dir {}", cfg.state_dir.display()),
        };
        let manager = CertManager::new(&cfg.state_dir, &bootstrap, &name, &node);
        (Creds::Enrolled(manager), how)
    };
    let detail = format!("{source} is valid; node {node}, tunnel {tunnel}, credentials from {how}");
    Ok((
        Checked {
            node,
            tunnel,
            bootstrap,
            server_name,
            creds,
        },
        detail,
    ))
}

type Target = (&'static str, &'static str, String);

async fn dns(targets: &[Target], timeout: Duration) -> Step<(Vec<Vec<SocketAddr>>, String)> {
    let mut all = Vec::new();
    let mut detail = Vec::new();
    for (what, field, addr) in targets {
        let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
        let fix = format!(
            "check the host in `{field}` (--{}) and this node's resolver (/etc/resolv.conf, /etc/hosts)",
            field.replace('_', "-")
        );
        let found = tokio::time::timeout(timeout, tokio::net::lookup_host(addr.as_str()))
            .await
            .map_err(|_| {
                fail(
                    format!(
                        "resolving {host} ({what} address {addr}) took over {} s",
                        timeout.as_secs_f64()
                    ),
                    fix.clone(),
                )
            })?
            .map_err(|e| {
                fail(
                    format!("cannot resolve {host} ({what} address {addr}): {e}"),
                    fix.clone(),
                )
            })?;
        let mut addrs: Vec<SocketAddr> = found.collect();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(fail(format!("{host} resolves to no address"), fix));
        }
        let ips: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
        detail.push(format!("{what} {host} -> {}", ips.join(", ")));
        all.push(addrs);
    }
    Ok((all, detail.join("; ")))
}

async fn tcp(
    targets: &[Target],
    resolved: &[Vec<SocketAddr>],
    timeout: Duration,
) -> Step<((), String)> {
    let mut detail = Vec::new();
    for ((what, field, addr), addrs) in targets.iter().zip(resolved) {
        let tcp = probe::connect(addrs, timeout).await.map_err(|e| {
            let port = match *what {
                "tunnel" => "tunnel port (10004, NodePort 30004 in the shipped manifests)",
                _ => "bootstrap port (10002)",
            };
            fail(
                format!("cannot connect to the {what} address {addr}: {e}"),
                format!(
                    "make `{field}` (--{}) point at the cloud's {port}, check that the cloud runs, and that firewalls between this node and the cloud let the port through",
                    field.replace('_', "-")
                ),
            )
        })?;
        let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        detail.push(format!("{what} {peer} accepts connections"));
    }
    Ok(((), detail.join("; ")))
}

async fn tls(c: &Checked, addrs: &[SocketAddr], timeout: Duration) -> Step<(probe::Chain, String)> {
    let tcp = probe::connect(addrs, timeout).await.map_err(|e| {
        fail(
            format!("reconnecting to {}: {e}", c.tunnel),
            "run the check again",
        )
    })?;
    let (chain, version) = probe::handshake(tcp, &c.server_name, timeout)
        .await
        .map_err(|e| {
            fail(
                format!("no TLS handshake with the tunnel address {}: {e}", c.tunnel),
                "make `cloud_addr` point at the cloud's tunnel port (10004), which speaks TLS, not at its hub, bootstrap or front port or at a proxy",
            )
        })?;
    let subject = Identity::from_der(&chain[0])
        .map(|i| i.common_name)
        .unwrap_or_default();
    Ok((
        chain,
        format!("{version} with {}, certificate {subject:?}", c.tunnel),
    ))
}

/// The CAs the cloud's certificate must chain to, and the credentials the
/// agent would start with (enrolled mode, when usable).
async fn server_cert(
    cfg: &EdgeConfig,
    c: &Checked,
    chain: &probe::Chain,
    token: Option<&BootstrapToken>,
) -> Step<(
    (Vec<CertificateDer<'static>>, Option<EdgeCredentials>),
    String,
)> {
    let (cas, usable, ca_name, wrong_ca_fix) = match &c.creds {
        Creds::Files => {
            let path = cfg.ca.as_ref().ok_or_else(|| {
                fail(
                    "no pinned CA: `cert` and `key` are set but `ca` is not",
                    "set `ca` (--ca) to the CA file that signs the cloud's tunnel certificate",
                )
            })?;
            let cas = tether_pki::load_certs(path).map_err(|e| {
                fail(
                    format!("config field `ca`: {e}"),
                    format!("put the cloud's CA certificate (PEM) in {}", path.display()),
                )
            })?;
            let name = format!("the CA file {}", path.display());
            let fix = format!(
                "replace {} (config field `ca`, --ca) with the CA that signs the cloud's tunnel certificate (on the cloud: `edge_ca`, or ca.crt in its state directory)",
                path.display()
            );
            (cas, None, name, fix)
        }
        Creds::Enrolled(manager) => {
            let dir = cfg.state_dir.display();
            match (manager.load(), token) {
                (Some(creds), _) => {
                    let fix = format!(
                        "this node was enrolled with another cloud: remove {dir}/ca.crt, node.crt and node.key and start the edge with a bootstrap token from this cloud (`tether token create --node {}`)",
                        c.node
                    );
                    (
                        creds.ca.clone(),
                        Some(creds),
                        format!("the pinned CA {dir}/ca.crt"),
                        fix,
                    )
                }
                (None, Some(token)) => {
                    let cas = manager.fetch_ca(token).await.map_err(|e| match e {
                        EnrolError::CaMismatch { .. } => fail(
                            format!("the bootstrap server {} answers /ca.crt with a CA other than the one the token names: {e}", c.bootstrap),
                            "use a token created on this cloud (`tether token create`), or point `bootstrap_addr` at this cloud's bootstrap port",
                        ),
                        other => fail(
                            format!("cannot fetch the cloud's CA from the bootstrap server {}: {other}", c.bootstrap),
                            "make `bootstrap_addr` (--bootstrap-addr) point at the cloud's bootstrap port (10002) and check that the cloud runs with a state directory",
                        ),
                    })?;
                    let fix = "`cloud_addr` and `bootstrap_addr` lead to different clouds: point both at the same one".to_owned();
                    (
                        cas,
                        None,
                        format!(
                            "the CA the bootstrap token names (from {}/ca.crt)",
                            c.bootstrap
                        ),
                        fix,
                    )
                }
                (None, None) => {
                    let path = cfg.state_dir.join("ca.crt");
                    let cas = tether_pki::load_certs(&path).map_err(|_| {
                        fail(
                            format!("no pinned CA: {} is missing and no bootstrap token is given", path.display()),
                            format!(
                                "create a token on the cloud (`tether token create --node {}`) and pass it with --token or TETHER_TOKEN; the edge enrols and pins the cloud's CA",
                                c.node
                            ),
                        )
                    })?;
                    let fix = format!(
                        "remove {dir}/ca.crt, node.crt and node.key and enrol again with a bootstrap token from this cloud"
                    );
                    (cas, None, format!("the pinned CA {}", path.display()), fix)
                }
            }
        }
    };
    let name = server_name_text(&c.server_name);
    match probe::verify_chain(chain, &cas, &c.server_name) {
        Ok(()) => Ok((
            (cas, usable),
            format!("valid for {name}, signed by {ca_name}"),
        )),
        Err(ChainError::UnknownIssuer) => Err(fail(
            format!(
                "the cloud's certificate is not signed by {ca_name} (unknown issuer: wrong CA pin)"
            ),
            wrong_ca_fix,
        )),
        Err(ChainError::WrongName(e)) => Err(fail(
            format!("the cloud's certificate is signed by {ca_name} but not valid for {name}: {e}"),
            format!(
                "set `cloud_server_name` (--cloud-server-name) to a name the certificate carries, or add {name} to the cloud's `server_names`"
            ),
        )),
        Err(ChainError::Expired) => Err(fail(
            "the cloud's certificate has expired (or this node's clock is ahead)",
            "check this node's clock (timedatectl), then renew the cloud's tunnel certificate",
        )),
        Err(ChainError::NotYetValid) => Err(fail(
            "the cloud's certificate is not valid yet (this node's clock is behind)",
            "set this node's clock right (timedatectl, NTP)",
        )),
        Err(ChainError::Other(e)) => Err(fail(
            format!("the cloud's certificate does not verify against {ca_name}: {e}"),
            wrong_ca_fix,
        )),
    }
}

fn server_name_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_owned(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Why the certificate at `path` is not one the agent can use for `node`,
/// or `None` when it looks usable.
fn unusable(path: &Path, id: &Identity, node: &str) -> Option<(String, String)> {
    let now = now();
    let shown = path.display();
    match id.node_name() {
        None => {
            return Some((
                format!(
                    "{shown} is not a node certificate (subject CN {:?}; a node's is system:node:<name> in O system:nodes)",
                    id.common_name
                ),
                "use the certificate issued to this node at enrolment".into(),
            ));
        }
        Some(n) if n != node => {
            return Some((
                format!("{shown} is issued to node {n:?} but `node_name` is {node:?}"),
                format!(
                    "set `node_name` (--node-name) to {n:?}, or enrol this node again under the name {node:?}"
                ),
            ));
        }
        Some(_) => {}
    }
    if now < id.not_before {
        return Some((
            format!("{shown} is not valid until {}", probe::utc(id.not_before)),
            "set this node's clock right (timedatectl, NTP)".into(),
        ));
    }
    if now >= id.not_after {
        return Some((
            format!("{shown} expired at {}", probe::utc(id.not_after)),
            "enrol again: start the edge with a new bootstrap token (`tether token create` on the cloud, then --token)".into(),
        ));
    }
    None
}

#[allow(clippy::too_many_arguments)]
async fn node_cert(
    cfg: &EdgeConfig,
    c: &Checked,
    usable: Option<EdgeCredentials>,
    cas: &[CertificateDer<'static>],
    token: Option<&BootstrapToken>,
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Step<((), String)> {
    let (tls, id, path): (Arc<rustls::ClientConfig>, Identity, PathBuf) = match (&c.creds, usable) {
        (Creds::Files, _) => {
            let path = cfg.cert.clone().unwrap_or_default();
            let key = cfg.key.clone().unwrap_or_default();
            let load = |e: tether_pki::TlsError, field: &str| {
                fail(
                    format!("config field `{field}`: {e}"),
                    format!("point `{field}` at this node's PEM file"),
                )
            };
            let chain = tether_pki::load_certs(&path).map_err(|e| load(e, "cert"))?;
            let key_der = tether_pki::load_key(&key).map_err(|e| load(e, "key"))?;
            let id = Identity::from_der(&chain[0])
                .map_err(|e| fail(format!("{}: {e}", path.display()), "use a PEM certificate"))?;
            let tls = tether_pki::client_config(cas, Some((chain, key_der)), &[b"http/1.1"])
                .map_err(|e| {
                    fail(
                        format!(
                            "`cert` {} and `key` {} do not go together: {e}",
                            path.display(),
                            key.display()
                        ),
                        "use the key the certificate was issued for",
                    )
                })?;
            (Arc::new(tls), id, path)
        }
        (Creds::Enrolled(_), Some(creds)) => {
            let tls = creds.client_config().map_err(|e| {
                fail(
                    format!(
                        "the credentials in {} are unusable: {e}",
                        cfg.state_dir.display()
                    ),
                    "enrol again with a bootstrap token",
                )
            })?;
            (tls, creds.identity.clone(), cfg.state_dir.join("node.crt"))
        }
        (Creds::Enrolled(_), None) => return enrolment(cfg, c, token),
    };
    if let Some((what, fix)) = unusable(&path, &id, &c.node) {
        return Err(fail(what, fix));
    }
    let tcp = probe::connect(addrs, timeout).await.map_err(|e| {
        fail(
            format!("reconnecting to {}: {e}", c.tunnel),
            "run the check again",
        )
    })?;
    let answer = probe::admission(tcp, tls, &c.server_name, &c.tunnel, &c.node, timeout).await;
    let serial = &id.serial;
    let revoked_fix = match &c.creds {
        Creds::Files => format!(
            "issue this node a new certificate, or enrol it with a bootstrap token (`tether token create --node {}` on the cloud, then --token with `state_dir` instead of `cert`/`key`)",
            c.node
        ),
        Creds::Enrolled(_) => format!(
            "create a new bootstrap token on the cloud (`tether token create --node {}`) and start the edge with --token: it enrols again in place of the revoked certificate",
            c.node
        ),
    };
    match answer {
        Ok(Admission::Admitted) => Ok((
            (),
            format!(
                "{} for node {}, serial {serial}, valid until {}, accepted by the cloud (not revoked)",
                path.display(),
                c.node,
                probe::utc(id.not_after)
            ),
        )),
        Ok(Admission::Refused(status, reason))
            if tether_edgehub::is_revocation(status, &reason) =>
        {
            Err(fail(
                format!(
                    "the cloud refuses {} (serial {serial}) as revoked: {reason}",
                    path.display()
                ),
                revoked_fix,
            ))
        }
        Ok(Admission::Refused(status, reason)) => Err(fail(
            format!("the cloud refused the tunnel for this certificate ({status}): {reason}"),
            "read the reason above; the cloud's log says more (`edge refused`)",
        )),
        Err(e) => Err(fail(
            format!("the cloud did not accept {} ({e})", path.display()),
            format!(
                "the cloud trusts node certificates from its edge CA only: enrol this node with a bootstrap token from this cloud (`tether token create --node {}`)",
                c.node
            ),
        )),
    }
}

/// No usable certificate in the state directory: the agent enrols with its
/// token at start (the server-certificate step fetched and checked the CA
/// from `/ca.crt` already), or cannot start at all.
fn enrolment(cfg: &EdgeConfig, c: &Checked, token: Option<&BootstrapToken>) -> Step<((), String)> {
    let path = cfg.state_dir.join("node.crt");
    let why = match tether_pki::load_certs(&path) {
        Err(_) if !path.exists() => format!("no certificate in {} yet", cfg.state_dir.display()),
        Err(e) => format!("{} is unreadable ({e})", path.display()),
        Ok(chain) => match Identity::from_der(&chain[0]) {
            Err(e) => format!("{} is unreadable ({e})", path.display()),
            Ok(id) => match unusable(&path, &id, &c.node) {
                Some((what, _)) => what,
                None => format!("{} or its key is unusable", path.display()),
            },
        },
    };
    match token {
        Some(_) => Ok((
            (),
            format!(
                "{why}; the edge enrols with its bootstrap token at start (the bootstrap server {} answered /ca.crt with the CA the token names)",
                c.bootstrap
            ),
        )),
        None => Err(fail(
            format!("{why}, and no bootstrap token is given"),
            format!(
                "create a token on the cloud (`tether token create --node {}`) and pass it with --token or TETHER_TOKEN",
                c.node
            ),
        )),
    }
}

async fn kubelet(cfg: &EdgeConfig) -> Step<((), String)> {
    let url = &cfg.kubelet_url;
    let fix = |what: &str| {
        format!(
            "start the kubelet (KubeEdge's edged listens on 127.0.0.1:10350), or set `kubelet_url` (--kubelet-url) to where it listens{what}"
        )
    };
    let kubelet_tls = cfg.kubelet_tls().map_err(|e| {
        fail(
            format!("{e:#}"),
            "check `kubelet_ca`, `kubelet_cert` and `kubelet_key`",
        )
    })?;
    let endpoint = tether_edgestream::KubeletEndpoint::new(url, kubelet_tls.clone(), None)
        .map_err(|e| fail(format!("config field `kubelet_url`: {e}"), fix("")))?;
    let addr = endpoint.addr();
    let connect = Duration::from_secs(cfg.kubelet_connect_timeout_secs).min(STEP_TIMEOUT_CAP);
    let tcp = probe::connect(&[addr], connect).await.map_err(|e| {
        fail(
            format!("cannot connect to the kubelet at {url}: {e}"),
            fix(""),
        )
    })?;
    let tls = match kubelet_tls {
        Some(cfg_tls) => {
            let name = cfg
                .kubelet_server_name
                .clone()
                .unwrap_or_else(|| addr.ip().to_string());
            let name = ServerName::try_from(name).map_err(|e| {
                fail(
                    format!("config field `kubelet_server_name`: {e}"),
                    "set a host name or address",
                )
            })?;
            Some((cfg_tls, name))
        }
        None => None,
    };
    let headers =
        Duration::from_secs(cfg.kubelet_response_header_timeout_secs).min(STEP_TIMEOUT_CAP);
    let https = tls.is_some();
    let status = probe::kubelet_get(tcp, tls, &addr.to_string(), headers)
        .await
        .map_err(|e| {
            let more = if https {
                "; for an https kubelet check `kubelet_ca`, `kubelet_server_name`, `kubelet_cert` and `kubelet_key`"
            } else {
                " (an https kubelet needs an https:// URL)"
            };
            fail(format!("the kubelet at {url} accepted a connection but did not answer GET /healthz: {e}"), fix(more))
        })?;
    Ok(((), format!("{url} answered GET /healthz with {status}")))
}
