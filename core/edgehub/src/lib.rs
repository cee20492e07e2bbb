//! The edge hub's certificate manager: enrols a fresh node with a bootstrap
//! token (pinning the cloud CA by the hash in the token), keeps the key and
//! certificates in the edge state directory, and renews the certificate at a
//! jittered 70-90% of its lifetime over mTLS, handing each new TLS
//! configuration to the tunnel dialer without dropping live streams.

pub mod api;
pub mod hub;
mod pinning;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::sync::watch;
use tracing::{info, warn};

use tether_pki::enrol::{CA_PATH, ENROL_PATH, EnrolRequest};
use tether_pki::{BACKDATE_SECS, BootstrapToken, Identity};
use tether_tunnel::Shutdown;

/// Enrolment and renewal failures.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    /// No usable credentials on disk and no token to enrol with.
    #[error("node is not enrolled: no certificate in {0} and no bootstrap token given")]
    NotEnrolled(String),
    /// The CA the cloud presented does not match the token's hash.
    #[error(
        "the cloud's CA does not match the bootstrap token (hash {got}, token says {want}); refusing to trust it"
    )]
    CaMismatch {
        /// Hash of the presented CA.
        got: String,
        /// Hash in the token.
        want: String,
    },
    /// The cloud refused the request.
    #[error("cloud refused the certificate request ({status}): {reason}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The cloud's reason.
        reason: String,
    },
    /// Network or TLS failure talking to the bootstrap server.
    #[error("bootstrap server {addr}: {reason}")]
    Transport {
        /// The server.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Local files or PKI.
    #[error("{0}")]
    Local(String),
}

/// The node's credentials: pinned CA, certificate, key.
#[derive(Clone)]
pub struct EdgeCredentials {
    /// The pinned cloud CA.
    pub ca: Vec<CertificateDer<'static>>,
    /// The node certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// The certificate's identity.
    pub identity: Identity,
}

impl std::fmt::Debug for EdgeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeCredentials")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl EdgeCredentials {
    fn new(ca: &[u8], chain: &[u8], key: &[u8]) -> Result<Self, EnrolError> {
        let local = |e: tether_pki::TlsError| EnrolError::Local(e.to_string());
        let chain = tether_pki::load_certs_pem(chain).map_err(local)?;
        let identity =
            Identity::from_der(&chain[0]).map_err(|e| EnrolError::Local(e.to_string()))?;
        let key = tether_pki::SecretPem::new(String::from_utf8_lossy(key).into_owned())
            .to_der()
            .map_err(|e| EnrolError::Local(e.to_string()))?;
        Ok(Self {
            ca: tether_pki::load_certs_pem(ca).map_err(local)?,
            chain,
            key: Arc::new(key),
            identity,
        })
    }

    /// The tunnel TLS configuration: pinned CA, this certificate.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, EnrolError> {
        tether_pki::client_config(
            &self.ca,
            Some((self.chain.clone(), self.key.clone_key())),
            &[b"http/1.1"],
        )
        .map(Arc::new)
        .map_err(|e| EnrolError::Local(e.to_string()))
    }

    /// When to renew: a jittered 70-90% into the certificate's lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let issued = self.identity.not_before + BACKDATE_SECS;
        let life = (self.identity.not_after - issued).max(1) as f64;
        let frac = 0.7 + 0.2 * (tether_pki::rand_u64() % 1000) as f64 / 1000.0;
        UNIX_EPOCH + Duration::from_secs_f64(issued.max(0) as f64 + life * frac)
    }

    fn expired(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        now >= self.identity.not_after
    }
}

/// Enrols and renews this node's certificate.
#[derive(Clone, Debug)]
pub struct CertManager {
    dir: PathBuf,
    bootstrap_addr: String,
    server_name: String,
    node: String,
    fallback: Option<Fallback>,
    next_renewal: RenewalSchedule,
}

/// When the rotation task will next try to renew the certificate, as it
/// scheduled it (the time is jittered once per certificate, so it is read
/// from here rather than recomputed). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct RenewalSchedule(Arc<std::sync::atomic::AtomicI64>);

impl RenewalSchedule {
    /// The next renewal attempt, once the rotation task runs.
    pub fn next(&self) -> Option<SystemTime> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            unix => Some(UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64)),
        }
    }

    fn set(&self, at: SystemTime) {
        let unix = at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
            .max(1);
        self.0.store(unix, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A token to re-enrol with when the cloud refuses the certificate as revoked.
#[derive(Clone, Debug)]
struct Fallback {
    token: BootstrapToken,
    revoked: watch::Receiver<u64>,
}

/// Reports the cloud's refusals of the node certificate to the
/// [`CertManager`] (see [`CertManager::with_token_fallback`]).
#[derive(Clone, Debug)]
pub struct RefusalSignal(Arc<watch::Sender<u64>>);

impl RefusalSignal {
    /// A refusal by the cloud (of a tunnel or hub dial); only one that says
    /// the certificate is revoked counts.
    pub fn refused(&self, status: u16, reason: &str) {
        if is_revocation(status, reason) {
            self.0.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// True when a refusal says the node certificate is revoked: the cloud
/// answers 403 naming the revocation (tunnel, hub and bootstrap alike).
pub fn is_revocation(status: u16, reason: &str) -> bool {
    status == 403 && reason.contains("revoked")
}

/// After switching to a certificate from the token, refusals reported in
/// this long came from dials with the old one.
const FALLBACK_QUIET: Duration = Duration::from_secs(5);

const TIMEOUT: Duration = Duration::from_secs(15);

impl CertManager {
    /// `dir` holds `ca.crt`, `node.crt`, `node.key`; `bootstrap_addr` is the
    /// cloud's bootstrap `host:port`; `server_name` the name its certificate carries.
    pub fn new(dir: &Path, bootstrap_addr: &str, server_name: &str, node: &str) -> Self {
        Self {
            dir: dir.to_owned(),
            bootstrap_addr: bootstrap_addr.to_owned(),
            server_name: server_name.to_owned(),
            node: node.to_owned(),
            fallback: None,
            next_renewal: RenewalSchedule::default(),
        }
    }

    /// When [`Self::run_rotation`] will next renew (for the admin `/status`).
    pub fn renewal_schedule(&self) -> RenewalSchedule {
        self.next_renewal.clone()
    }

    /// Falls back to `token` when the cloud refuses the current certificate
    /// as revoked (a node revoked, then given a new token by the operator):
    /// the rotation task enrols with it and hands the new certificate to the
    /// dialers. Feed the dialers' refusals to the returned signal.
    pub fn with_token_fallback(mut self, token: BootstrapToken) -> (Self, RefusalSignal) {
        let (tx, revoked) = watch::channel(0);
        self.fallback = Some(Fallback { token, revoked });
        (self, RefusalSignal(Arc::new(tx)))
    }

    fn paths(&self) -> (PathBuf, PathBuf, PathBuf) {
        (
            self.dir.join("ca.crt"),
            self.dir.join("node.crt"),
            self.dir.join("node.key"),
        )
    }

    /// Credentials from disk, if complete and not expired.
    pub fn load(&self) -> Option<EdgeCredentials> {
        let (ca, crt, key) = self.paths();
        let c = EdgeCredentials::new(
            &std::fs::read(ca).ok()?,
            &std::fs::read(crt).ok()?,
            &std::fs::read(key).ok()?,
        )
        .ok()?;
        (!c.expired() && c.identity.node_name() == Some(self.node.as_str())).then_some(c)
    }

    /// Usable credentials: from disk, or by enrolling with `token`.
    pub async fn ensure(
        &self,
        token: Option<&BootstrapToken>,
    ) -> Result<EdgeCredentials, EnrolError> {
        if let Some(c) = self.load() {
            return Ok(c);
        }
        match token {
            Some(t) => self.enrol(t).await,
            None => Err(EnrolError::NotEnrolled(self.dir.display().to_string())),
        }
    }

    /// First enrolment: fetch and pin the CA, send a CSR with the token.
    pub async fn enrol(&self, token: &BootstrapToken) -> Result<EdgeCredentials, EnrolError> {
        let (ca_pem, ca) = self.pinned_ca(token).await?;
        let pinned = tether_pki::client_config(&ca, None, &[b"http/1.1"])
            .map_err(|e| EnrolError::Local(e.to_string()))?;
        let creds = self.request(Arc::new(pinned), Some(token), &ca_pem).await?;
        info!(node = %self.node, serial = %creds.identity.serial, "enrolled with a bootstrap token");
        Ok(creds)
    }

    /// The cloud's CA from the bootstrap server's `/ca.crt`, trusted only
    /// because its hash is the one in `token` (what enrolment pins). Writes
    /// nothing; `tether edge --check` uses it before a node is enrolled.
    pub async fn fetch_ca(
        &self,
        token: &BootstrapToken,
    ) -> Result<Vec<CertificateDer<'static>>, EnrolError> {
        Ok(self.pinned_ca(token).await?.1)
    }

    async fn pinned_ca(
        &self,
        token: &BootstrapToken,
    ) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), EnrolError> {
        let ca_pem = self.get_ca().await?;
        let ca =
            tether_pki::load_certs_pem(&ca_pem).map_err(|e| EnrolError::Local(e.to_string()))?;
        let got = tether_pki::ca_hash(&ca[0]);
        if got != token.ca_hash {
            return Err(EnrolError::CaMismatch {
                got: tether_pki::hex(&got),
                want: tether_pki::hex(&token.ca_hash),
            });
        }
        Ok((ca_pem, ca))
    }

    /// Renewal over mTLS with the current certificate; no token.
    pub async fn renew(&self, current: &EdgeCredentials) -> Result<EdgeCredentials, EnrolError> {
        let ca_pem: Vec<u8> =
            std::fs::read(self.dir.join("ca.crt")).map_err(|e| EnrolError::Local(e.to_string()))?;
        let creds = self
            .request(current.client_config()?, None, &ca_pem)
            .await?;
        info!(node = %self.node, serial = %creds.identity.serial, "renewed the node certificate");
        Ok(creds)
    }

    async fn get_ca(&self) -> Result<Vec<u8>, EnrolError> {
        // Nothing is trusted yet: the TLS session is only a carrier, and the
        // CA it returns is checked against the token's hash before any use.
        let cfg = pinning::trust_on_hash_client();
        let req = Request::get(CA_PATH)
            .header(header::HOST, &self.bootstrap_addr)
            .body(Full::new(Bytes::new()))
            .expect("static request");
        let (status, body) = self.send(cfg, req).await?;
        if status != StatusCode::OK {
            return Err(EnrolError::Refused {
                status: status.as_u16(),
                reason: String::from_utf8_lossy(&body).trim().to_owned(),
            });
        }
        Ok(body.to_vec())
    }

    async fn request(
        &self,
        tls: Arc<rustls::ClientConfig>,
        token: Option<&BootstrapToken>,
        ca_pem: &[u8],
    ) -> Result<EdgeCredentials, EnrolError> {
        let (csr, key) =
            tether_pki::node_csr(&self.node).map_err(|e| EnrolError::Local(e.to_string()))?;
        let body = serde_json::to_vec(&EnrolRequest {
            node_name: self.node.clone(),
            csr,
        })
        .expect("serializes");
        let mut req = Request::post(ENROL_PATH)
            .header(header::HOST, &self.bootstrap_addr)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", t.expose()));
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .expect("valid request");
        let (status, cert) = self.send(tls, req).await?;
        if status != StatusCode::OK {
            return Err(EnrolError::Refused {
                status: status.as_u16(),
                reason: String::from_utf8_lossy(&cert).trim().to_owned(),
            });
        }
        let creds = EdgeCredentials::new(ca_pem, &cert, key.expose().as_bytes())?;
        if creds.identity.node_name() != Some(self.node.as_str()) {
            return Err(EnrolError::Local(
                "the cloud issued a certificate for another node".into(),
            ));
        }
        self.persist(ca_pem, &cert, key.expose().as_bytes())?;
        Ok(creds)
    }

    fn persist(&self, ca: &[u8], cert: &[u8], key: &[u8]) -> Result<(), EnrolError> {
        let local = |e: tether_pki::WriteError| EnrolError::Local(e.to_string());
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| EnrolError::Local(format!("{}: {e}", self.dir.display())))?;
        let (ca_p, crt_p, key_p) = self.paths();
        // Each file is replaced atomically. A crash between the key and the
        // certificate leaves a pair that does not match; the tunnel handshake
        // then fails and the node has to be enrolled again with a token.
        tether_pki::write_atomic(&key_p, key, 0o600).map_err(local)?;
        tether_pki::write_atomic(&crt_p, cert, 0o644).map_err(local)?;
        tether_pki::write_atomic(&ca_p, ca, 0o644).map_err(local)
    }

    async fn send(
        &self,
        tls: Arc<rustls::ClientConfig>,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), EnrolError> {
        let t = |reason: String| EnrolError::Transport {
            addr: self.bootstrap_addr.clone(),
            reason,
        };
        let name = ServerName::try_from(self.server_name.clone()).map_err(|e| t(e.to_string()))?;
        let work = async {
            let tcp = tokio::net::TcpStream::connect(&self.bootstrap_addr)
                .await
                .map_err(|e| t(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| t(format!("tls: {e}")))?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| t(e.to_string()))?;
            tokio::spawn(conn);
            let resp = send.send_request(req).await.map_err(|e| t(e.to_string()))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), 64 << 10)
                .collect()
                .await
                .map_err(|e| t(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(TIMEOUT, work)
            .await
            .map_err(|_| t("timed out".into()))?
    }

    /// Renews before expiry until shutdown, publishing each new TLS
    /// configuration on `tx`. Failed renewals retry with backoff. With a
    /// token fallback, a certificate refused as revoked is replaced by one
    /// enrolled with the token.
    pub async fn run_rotation(
        self,
        mut current: EdgeCredentials,
        tx: watch::Sender<Arc<rustls::ClientConfig>>,
        on_renewed: impl Fn(&EdgeCredentials) + Send,
        shutdown: Shutdown,
    ) {
        let mut backoff =
            tether_tunnel::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut revoked = self.fallback.as_ref().map(|f| f.revoked.clone());
        let mut quiet_until = tokio::time::Instant::now();
        loop {
            let at = current.renew_at();
            self.next_renewal.set(at);
            let wait = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            let via_token = tokio::select! {
                _ = tokio::time::sleep(wait) => false,
                _ = revocation(&mut revoked) => {
                    if tokio::time::Instant::now() < quiet_until {
                        continue;
                    }
                    true
                }
                _ = shutdown.triggered() => return,
            };
            loop {
                match self
                    .refresh(&current, via_token)
                    .await
                    .and_then(|c| c.client_config().map(|cfg| (c, cfg)))
                {
                    Ok((c, cfg)) => {
                        on_renewed(&c);
                        current = c;
                        tx.send_replace(cfg);
                        backoff.reset();
                        if via_token {
                            quiet_until = tokio::time::Instant::now() + FALLBACK_QUIET;
                        }
                        break;
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        self.next_renewal.set(SystemTime::now() + delay);
                        warn!(error = %e, retry_in = ?delay, via_token, "certificate renewal failed");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = shutdown.triggered() => return,
                        }
                        // A failed re-enrolment waits for the next refusal
                        // (the dialers report one per attempt), so a spent
                        // token is not retried in a loop of its own.
                        if via_token {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// A new certificate: by renewal over mTLS, or with the fallback token
    /// when `via_token` or when the renewal is refused as revoked.
    async fn refresh(
        &self,
        current: &EdgeCredentials,
        via_token: bool,
    ) -> Result<EdgeCredentials, EnrolError> {
        let token = self.fallback.as_ref().map(|f| &f.token);
        if !via_token {
            match self.renew(current).await {
                Err(EnrolError::Refused { status, reason }) if is_revocation(status, &reason) => {
                    if token.is_none() {
                        return Err(EnrolError::Refused { status, reason });
                    }
                }
                other => return other,
            }
        }
        let token = token.ok_or_else(|| EnrolError::NotEnrolled(self.dir.display().to_string()))?;
        warn!(node = %self.node, "the cloud refused this node's certificate as revoked; enrolling with the bootstrap token");
        self.enrol(token).await
    }
}

/// Resolves on the next reported revocation; never without a fallback.
async fn revocation(revoked: &mut Option<watch::Receiver<u64>>) {
    match revoked {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}
