//! HTTP/1.1 over mTLS to other replicas' peer listeners (the listener that
//! already carries forwarded kubelet requests, so the same replica
//! certificates and trust). Connections are kept for reuse, a few per
//! peer; every call has a deadline and a bounded answer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tracing::debug;

/// Time to connect and finish the TLS handshake with a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept per peer.
const MAX_IDLE_PER_PEER: usize = 4;
/// Peers with idle connections kept at most.
const MAX_PEERS: usize = 256;
/// Largest answer read from a peer (a sync response is one message).
pub(crate) const MAX_ANSWER: usize = 2 << 20;

/// A call to a peer that got no answer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// TCP connect failed.
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    /// TLS handshake failed (wrong CA, not a replica certificate).
    #[error("TLS with {0}: {1}")]
    Tls(SocketAddr, std::io::Error),
    /// The HTTP exchange failed.
    #[error("HTTP with {0}: {1}")]
    Http(SocketAddr, hyper::Error),
    /// The answer body failed or exceeded [`MAX_ANSWER`].
    #[error("answer from {0}: {1}")]
    Answer(SocketAddr, String),
    /// No answer within the call's deadline.
    #[error("no answer from {0} within {1:?}")]
    Deadline(SocketAddr, Duration),
}

type Sender = SendRequest<Full<Bytes>>;

/// Calls other replicas. Cheap to share.
pub(crate) struct PeerClient {
    tls: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    idle: Mutex<HashMap<SocketAddr, Vec<Sender>>>,
}

impl PeerClient {
    pub(crate) fn new(tls: Arc<rustls::ClientConfig>, server_name: ServerName<'static>) -> Self {
        Self {
            tls: tls.into(),
            server_name,
            idle: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `req` to `addr` and reads the answer, all within `deadline`.
    /// A `reuse` call may go over a kept connection and is retried once on
    /// a fresh one if that fails (the peer closes idle connections); only
    /// idempotent calls may reuse.
    pub(crate) async fn call(
        &self,
        addr: SocketAddr,
        req: Request<Full<Bytes>>,
        deadline: Duration,
        reuse: bool,
    ) -> Result<(StatusCode, Bytes), PeerError> {
        tokio::time::timeout(deadline, self.exchange(addr, req, reuse))
            .await
            .map_err(|_| PeerError::Deadline(addr, deadline))?
    }

    async fn exchange(
        &self,
        addr: SocketAddr,
        req: Request<Full<Bytes>>,
        reuse: bool,
    ) -> Result<(StatusCode, Bytes), PeerError> {
        let kept = if reuse { self.take_idle(addr) } else { None };
        let (mut sender, req) = match kept {
            Some(mut sender) => {
                let (parts, body) = req.into_parts();
                let again = Request::from_parts(parts.clone(), body.clone());
                match sender.send_request(Request::from_parts(parts, body)).await {
                    Ok(resp) => return self.finish(addr, sender, resp, reuse).await,
                    Err(e) => {
                        debug!(peer = %addr, error = %e, "kept peer connection failed; dialling");
                        (self.dial(addr).await?, again)
                    }
                }
            }
            None => (self.dial(addr).await?, req),
        };
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| PeerError::Http(addr, e))?;
        self.finish(addr, sender, resp, reuse).await
    }

    async fn finish(
        &self,
        addr: SocketAddr,
        sender: Sender,
        resp: http::Response<hyper::body::Incoming>,
        reuse: bool,
    ) -> Result<(StatusCode, Bytes), PeerError> {
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| PeerError::Answer(addr, e.to_string()))?
            .to_bytes();
        if reuse {
            self.keep(addr, sender);
        }
        Ok((status, body))
    }

    async fn dial(&self, addr: SocketAddr) -> Result<Sender, PeerError> {
        let connect = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| PeerError::Connect(addr, e))?;
            let _ = tcp.set_nodelay(true);
            self.tls
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| PeerError::Tls(addr, e))
        };
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| PeerError::Deadline(addr, CONNECT_TIMEOUT))??;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| PeerError::Http(addr, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "peer connection ended");
            }
        });
        Ok(sender)
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<Sender> {
        let mut idle = self.idle.lock().expect("idle lock");
        let list = idle.get_mut(&addr)?;
        while let Some(s) = list.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn keep(&self, addr: SocketAddr, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("idle lock");
        if idle.len() >= MAX_PEERS && !idle.contains_key(&addr) {
            idle.retain(|_, list| {
                list.retain(|s| !s.is_closed());
                !list.is_empty()
            });
            if idle.len() >= MAX_PEERS {
                return;
            }
        }
        let list = idle.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_PEER {
            list.push(sender);
        }
    }
}
