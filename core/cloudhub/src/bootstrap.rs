//! The bootstrap HTTPS server (default port 10002).
//!
//! - `GET /ca.crt`: the edge CA, which a fresh edge checks against the hash
//!   in its token before trusting anything.
//! - `POST /edge.crt` with `{"nodeName": "...", "csr": "<PEM>"}`: signs a
//!   client certificate for `system:node:<nodeName>`. Authorized by a
//!   bootstrap token (`Authorization: Bearer tether1....`), or, for renewal,
//!   by the node's current certificate over mTLS.
//!
//! Bodies are capped at 64 KiB; failed attempts are bounded per source
//! address and per token id without ever refusing valid credentials
//! (`attempts`, ADR 0014); every issuance and refusal is an audit log line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use tether_pki::enrol::{CA_PATH, ENROL_PATH, EnrolRequest};
use tether_pki::{BootstrapToken, Identity, valid_node_name};
use tether_tunnel::{PreAuthGate, PreAuthLimits, PreAuthMetrics, Shutdown};

use crate::CloudState;
use crate::attempts::FailureBudgets;

const MAX_BODY: usize = 64 << 10;
/// Whole-connection deadline of a client without a certificate: enough for
/// `/ca.crt` and one enrolment, never long enough to hold a pre-auth slot by
/// trickling a request body.
const ANONYMOUS_CONN_DEADLINE: Duration = Duration::from_secs(30);

/// Parses an enrolment body and checks everything in it that needs no
/// state: the JSON shape, the node name and the CSR's subject. Refusals are
/// (status, node, reason) as `enrol` reports them. Public for the fuzz target
/// (`core/cloudhub/fuzz`): this is what anonymous clients reach.
#[doc(hidden)]
pub fn check_enrol_body(body: &[u8]) -> Result<EnrolRequest, (StatusCode, String, String)> {
    let r: EnrolRequest = serde_json::from_slice(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            String::new(),
            format!("malformed request: {e}"),
        )
    })?;
    let fail = |reason: String| (StatusCode::BAD_REQUEST, r.node_name.clone(), reason);
    if !valid_node_name(&r.node_name) {
        return Err(fail(format!("invalid node name {:?}", r.node_name)));
    }
    tether_pki::check_node_csr(&r.csr, &r.node_name).map_err(|e| fail(e.to_string()))?;
    Ok(r)
}

/// Serves enrolment and renewal.
pub struct BootstrapServer {
    state: Arc<CloudState>,
    tls: Arc<rustls::ServerConfig>,
    gate: PreAuthGate,
    lifetime: Duration,
    budgets: FailureBudgets,
}

type Answer = Response<Full<Bytes>>;

fn answer(code: StatusCode, body: impl Into<Bytes>) -> Answer {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

impl BootstrapServer {
    /// `tls` must accept optional client certificates from the edge CA
    /// (`tether_pki::server_config_optional_client_auth`). Issued
    /// certificates live for `lifetime`.
    pub fn new(state: Arc<CloudState>, tls: Arc<rustls::ServerConfig>, lifetime: Duration) -> Self {
        Self {
            state,
            tls,
            gate: PreAuthGate::new(PreAuthLimits::default(), PreAuthMetrics::default()),
            lifetime,
            budgets: FailureBudgets::new(),
        }
    }

    /// Uses `gate` (the process's) as the budget of connections that have not proven who
    /// they are: all of them until the TLS handshake ends, and anonymous
    /// (token) clients until their connection closes.
    pub fn preauth(mut self, gate: PreAuthGate) -> Self {
        self.gate = gate;
        self
    }

    /// Serves until shutdown; the listening socket closes when it starts.
    pub async fn run(self, listener: TcpListener, shutdown: Shutdown) {
        let this = Arc::new(self);
        // Connections of edges that renew over mTLS.
        let conns = Arc::new(Semaphore::new(1024));
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "bootstrap accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.triggered() => return,
            };
            let Some(ticket) = this.gate.admit("bootstrap", peer.ip()) else {
                continue;
            };
            let this = this.clone();
            let shutdown = shutdown.clone();
            let conns = conns.clone();
            tokio::spawn(async move {
                let tls = match ticket.accept_tls(tcp, |_| this.tls.clone()).await {
                    Ok(t) => t,
                    Err(e) => return debug!(error = %e, %peer, "bootstrap tls failed"),
                };
                let client = Identity::from_peer(tls.get_ref().1.peer_certificates()).ok();
                // A node renewing with its certificate leaves the anonymous
                // budget; a token client stays in it while connected.
                let (_ticket, _slot, deadline) = if client.is_some() {
                    drop(ticket);
                    match conns.try_acquire_owned() {
                        Ok(slot) => (None, Some(slot), None),
                        Err(_) => return debug!(%peer, "bootstrap busy"),
                    }
                } else {
                    let deadline = tokio::time::Instant::now() + ANONYMOUS_CONN_DEADLINE;
                    (Some(ticket), None, Some(deadline))
                };
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    let client = client.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            this.handle(req, peer, client.as_ref()).await,
                        )
                    }
                });
                // The header deadline is also the idle timeout between requests.
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(tls), svc);
                let expired = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = conn => {}
                    _ = expired => debug!(%peer, "anonymous bootstrap connection past its deadline"),
                    _ = shutdown.triggered() => {}
                }
            });
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        client: Option<&Identity>,
    ) -> Answer {
        match (req.method(), req.uri().path()) {
            (&Method::GET, CA_PATH) => Response::builder()
                .header(header::CONTENT_TYPE, "application/x-pem-file")
                .body(Full::new(Bytes::from(
                    self.state.ca().cert_pem().to_owned(),
                )))
                .expect("valid response"),
            (&Method::POST, ENROL_PATH) => {
                // Credentials are checked before any budget: a renewal or a
                // valid token from a source that others made fail still works.
                let renewal = client.is_some_and(|c| c.node_name().is_some());
                match self.enrol(req, client).await {
                    Ok((node, pem, via, serial)) => {
                        info!(target: "tether::audit", event = "issue", node, source = %peer, via, serial, "issued a node certificate");
                        Response::builder()
                            .header(header::CONTENT_TYPE, "application/x-pem-file")
                            .body(Full::new(Bytes::from(pem)))
                            .expect("valid response")
                    }
                    Err((code, node, reason)) => {
                        let over = !renewal && self.budgets.source_failed(peer.ip());
                        // Token details stay in the audit log.
                        let public = match code {
                            StatusCode::UNAUTHORIZED => "invalid bootstrap token".to_owned(),
                            _ => reason.clone(),
                        };
                        if !over {
                            warn!(target: "tether::audit", event = "refuse", node, source = %peer, reason, "refused a certificate request");
                            return answer(code, format!("{public}\n"));
                        }
                        // Past the source's budget: the log line is debug (a
                        // flood must not flood the audit log), the answer 429,
                        // and the connection closes so each further guess
                        // costs a handshake.
                        debug!(target: "tether::audit", event = "refuse", node, source = %peer, reason, "refused a certificate request (source over its failure budget)");
                        let mut resp = answer(
                            StatusCode::TOO_MANY_REQUESTS,
                            format!(
                                "too many failed attempts from this address; try again later ({public})\n"
                            ),
                        );
                        let h = resp.headers_mut();
                        h.insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
                        h.insert(
                            header::CONNECTION,
                            header::HeaderValue::from_static("close"),
                        );
                        resp
                    }
                }
            }
            _ => answer(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// Returns (node, certificate PEM, how, serial) or (status, node, reason).
    async fn enrol(
        &self,
        req: Request<Incoming>,
        client: Option<&Identity>,
    ) -> Result<(String, String, &'static str, String), (StatusCode, String, String)> {
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    String::new(),
                    format!("body over {MAX_BODY} bytes"),
                ));
            }
            Err(e) => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    String::new(),
                    format!("reading body: {e}"),
                ));
            }
        };
        // Check the CSR before a single-use token is spent on it.
        let r = check_enrol_body(&body)?;
        let node = r.node_name.clone();
        let fail = |code, reason: String| (code, node.clone(), reason);
        let (ips, via) = match (client.filter(|c| c.node_name().is_some()), bearer) {
            // Renewal: the current certificate (verified against our CA by
            // TLS) authorizes the same node, with the same addresses.
            (Some(id), _) => {
                if self.state.deny.denies(id) {
                    return Err(fail(StatusCode::FORBIDDEN, "certificate is revoked".into()));
                }
                if id.node_name() != Some(node.as_str()) {
                    return Err(fail(
                        StatusCode::FORBIDDEN,
                        format!(
                            "certificate of node {:?} cannot renew for {node:?}",
                            id.node_name().unwrap_or_default()
                        ),
                    ));
                }
                (id.ips.clone(), "renewal")
            }
            (None, Some(bearer)) => {
                let token: BootstrapToken = bearer
                    .parse()
                    .map_err(|_| fail(StatusCode::UNAUTHORIZED, "malformed token".into()))?;
                if token.ca_hash != tether_pki::ca_hash(self.state.ca().cert_der()) {
                    return Err(fail(
                        StatusCode::UNAUTHORIZED,
                        "token was made for another CA".into(),
                    ));
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                let state_failed =
                    |e: crate::StateError| fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
                let enrolled = self
                    .state
                    .enrolled
                    .holds_valid(&node, &self.state.deny, now)
                    .map_err(state_failed)?;
                let holder = |ip: &std::net::IpAddr| {
                    self.state
                        .enrolled
                        .ip_holder(ip, &node, &self.state.deny, now)
                };
                // The bound on guessing a known id's secret (ADR 0014).
                let redeemed = self
                    .budgets
                    .check_secret(&token.id, || {
                        self.state.tokens.redeem(&token, &node, enrolled, holder)
                    })
                    .ok_or_else(|| {
                        fail(
                            StatusCode::TOO_MANY_REQUESTS,
                            format!(
                                "token {}: too many wrong secrets in the last minute; try again later",
                                token.id
                            ),
                        )
                    })?;
                let ips = redeemed.map_err(|e| match e {
                    // Not secret, and the operator needs to know.
                    crate::TokenRefusal::Enrolled(_) | crate::TokenRefusal::AddressHeld { .. } => {
                        fail(StatusCode::CONFLICT, e.to_string())
                    }
                    _ => fail(StatusCode::UNAUTHORIZED, format!("token {}: {e}", token.id)),
                })?;
                (ips, "token")
            }
            (None, None) => {
                return Err(fail(
                    StatusCode::UNAUTHORIZED,
                    "no token and no client certificate".into(),
                ));
            }
        };
        let pem = self
            .state
            .ca()
            .sign_node_csr(&r.csr, &node, &ips, self.lifetime)
            .map_err(|e| fail(StatusCode::BAD_REQUEST, e.to_string()))?;
        let issued = tether_pki::load_certs_pem(pem.as_bytes())
            .ok()
            .and_then(|c| c.first().and_then(|d| Identity::from_der(d).ok()));
        if let Some(id) = &issued
            && let Err(e) = self.state.enrolled.record(&node, id)
        {
            warn!(error = %e, node, "cannot record the enrolment");
        }
        Ok((node, pem, via, issued.map(|i| i.serial).unwrap_or_default()))
    }
}
