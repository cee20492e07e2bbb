//! Serves one tunnel stream: checks the target against the kubelet and the
//! allow-list (anything else is refused with 403 and counted), then proxies
//! the request, replays an upgrade, or opens a raw TCP stream.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{Instrument, debug, info_span, warn};

use tether_tunnel::wire::{self, Inbound, KUBELET_TARGET, status_response};
use tether_tunnel::{Body, BoxError, Shutdown, body_empty};

use crate::local::{self, KubeletEndpoint, LocalClient};
use crate::metrics::{EdgeMetrics, Kind, Phase};

/// Where a permitted stream goes.
enum Local {
    Kubelet,
    Endpoint(SocketAddr),
}

#[derive(Clone)]
pub(crate) struct StreamHandler {
    inner: Arc<Inner>,
}

struct Inner {
    kubelet: KubeletEndpoint,
    allow: Vec<SocketAddr>,
    hub: Option<crate::HubStream>,
    client: LocalClient,
    metrics: EdgeMetrics,
    shutdown: Shutdown,
}

impl StreamHandler {
    pub(crate) fn new(
        kubelet: KubeletEndpoint,
        allow: Vec<SocketAddr>,
        hub: Option<crate::HubStream>,
        metrics: EdgeMetrics,
        shutdown: Shutdown,
    ) -> Self {
        let client = local::client(&kubelet);
        Self {
            inner: Arc::new(Inner {
                kubelet,
                allow,
                hub,
                client,
                metrics,
                shutdown,
            }),
        }
    }

    pub(crate) async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let inbound = match wire::inbound(&req) {
            Ok(i) => i,
            Err(e) => {
                return status_response(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string());
            }
        };
        if matches!(&inbound, Inbound::Http { target } if target == wire::PING_TARGET) {
            return Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(tether_tunnel::body_empty())
                .expect("static response");
        }
        if let (Inbound::Connect { target }, Some(hub)) = (&inbound, &self.inner.hub)
            && target == hub.target
        {
            return (hub.serve)(req);
        }
        let (kind, target) = match &inbound {
            Inbound::Http { target } => (Kind::Http, target.clone()),
            Inbound::Upgrade { target, .. } => (Kind::Upgrade, target.clone()),
            Inbound::Connect { target } => (Kind::Connect, target.clone()),
        };
        let span = info_span!(target: tether_tunnel::trace::TARGET, "edge.stream",
            kind = ?kind, target = %target, path = %req.uri().path());
        // The cloud's tunnel.stream span is the parent (W3C traceparent).
        tether_tunnel::trace::adopt_parent(&span, req.headers());
        async move {
            let Some(local) = self.permit(&inbound) else {
                self.inner.metrics.refused(kind);
                warn!("refused target");
                return status_response(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    &format!("target {target:?} is neither the kubelet nor an allow-listed local endpoint"),
                );
            };
            self.inner.metrics.stream(kind.clone());
            let resp = match inbound {
                Inbound::Connect { .. } => self.connect(req, local).await,
                _ => self.forward(req, &inbound, local).await,
            };
            if resp.status() == StatusCode::BAD_GATEWAY || resp.status() == StatusCode::GATEWAY_TIMEOUT {
                self.inner.metrics.local_error(kind);
            }
            resp
        }
        .instrument(span)
        .await
    }

    /// The local destination for a stream, or None when it is not allowed.
    fn permit(&self, inbound: &Inbound) -> Option<Local> {
        let allow = |t: &str| {
            t.parse::<SocketAddr>()
                .ok()
                .filter(|a| self.inner.allow.contains(a))
                .map(Local::Endpoint)
        };
        match inbound {
            Inbound::Http { target } | Inbound::Upgrade { target, .. } => {
                if target == KUBELET_TARGET {
                    Some(Local::Kubelet)
                } else {
                    allow(target)
                }
            }
            Inbound::Connect { target } => {
                connect_local(self.inner.kubelet.addr, &self.inner.allow, target)
                    .map(Local::Endpoint)
            }
        }
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        inbound: &Inbound,
        local: Local,
    ) -> Response<Body> {
        let base = match &local {
            Local::Kubelet => self.inner.kubelet.base.clone(),
            Local::Endpoint(a) => Uri::builder()
                .scheme("http")
                .authority(a.to_string())
                .path_and_query("/")
                .build()
                .expect("socket address is a valid authority"),
        };
        let upgrade = matches!(inbound, Inbound::Upgrade { .. });
        let tunnel_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let body: Body = if upgrade {
            body_empty()
        } else {
            body.map_err(BoxError::from).boxed_unsync()
        };
        let host = base
            .authority()
            .map(|a| a.as_str())
            .unwrap_or("localhost")
            .to_owned();
        let local_req = match wire::local_request(Request::from_parts(parts, body), inbound, &host)
        {
            Ok(r) => r,
            Err(e) => {
                return status_response(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string());
            }
        };
        let (mut parts, body) = local_req.into_parts();
        let pq = parts.uri.path_and_query().cloned();
        let mut uri = base.into_parts();
        uri.path_and_query = pq;
        parts.uri = Uri::from_parts(uri).expect("base uri with a path is valid");
        // The kubelet traces too; its spans become children of this one.
        tether_tunnel::trace::inject(&tracing::Span::current(), &mut parts.headers);
        let progress = local::Progress::new();
        let body = progress.track(body);
        let sent = self.inner.client.request(Request::from_parts(parts, body));
        let kind = if upgrade { Kind::Upgrade } else { Kind::Http };
        let mut resp = match self.response_head(sent, &progress).await {
            Some(Ok(r)) => r,
            Some(Err(e)) if local::is_connect_timeout(&e) => {
                self.inner.metrics.local_timeout(kind, Phase::Connect);
                warn!(error = %e, "local connect timed out");
                return status_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Timeout",
                    &format!(
                        "edge could not connect to {host} within {:?} (edge setting kubelet_connect_timeout_secs)",
                        self.inner.kubelet.timeouts.connect
                    ),
                );
            }
            Some(Err(e)) => {
                debug!(error = %e, "local request failed");
                return status_response(
                    StatusCode::BAD_GATEWAY,
                    "ServiceUnavailable",
                    &format!("edge could not reach {host}: {e}"),
                );
            }
            None => {
                self.inner
                    .metrics
                    .local_timeout(kind, Phase::ResponseHeaders);
                warn!("local endpoint sent no response head in time");
                return status_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Timeout",
                    &format!(
                        "{host} sent no response headers within {:?} (edge setting kubelet_response_header_timeout_secs)",
                        self.inner.kubelet.timeouts.response_headers
                    ),
                );
            }
        };
        let Some(tunnel_side) = tunnel_side else {
            let (mut parts, body) = resp.into_parts();
            wire::strip_hop_by_hop(&mut parts.headers);
            let body = tether_tunnel::stall_metered(
                body.map_err(BoxError::from).boxed_unsync(),
                self.inner.metrics.stall_hook(Kind::Http),
            );
            return Response::from_parts(parts, body);
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            if resp.status().is_success() {
                return status_response(
                    StatusCode::BAD_GATEWAY,
                    "BadGateway",
                    &format!(
                        "{host} answered an upgrade request with {} instead of 101",
                        resp.status()
                    ),
                );
            }
            let (mut parts, body) = resp.into_parts();
            wire::strip_hop_by_hop(&mut parts.headers);
            return Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
        }
        let local_side = hyper::upgrade::on(&mut resp);
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(
            async move {
                let (t, l) = match tokio::join!(tunnel_side, local_side) {
                    (Ok(t), Ok(l)) => (t, l),
                    (t, l) => {
                        debug!(tunnel = ?t.err(), local = ?l.err(), "upgrade failed");
                        return;
                    }
                };
                let (mut t, mut l) = (TokioIo::new(t), TokioIo::new(l));
                match tether_tunnel::splice(&mut t, &mut l, &shutdown).await {
                    Ok((up, down)) => debug!(up, down, "upgraded stream closed"),
                    Err(e) => debug!(error = %e, "upgraded stream ended"),
                }
            }
            .in_current_span(),
        );
        let (parts, _) = resp.into_parts();
        wire::upgraded_to_tunnel(Response::from_parts(parts, body_empty()))
    }

    /// The response head, or None when the endpoint went longer than the
    /// response-header deadline without taking request body or answering.
    async fn response_head<F, E>(
        &self,
        sent: F,
        progress: &local::Progress,
    ) -> Option<Result<Response<Incoming>, E>>
    where
        F: std::future::Future<Output = Result<Response<Incoming>, E>>,
    {
        let limit = self.inner.kubelet.timeouts.response_headers;
        let mut sent = std::pin::pin!(sent);
        loop {
            let since = progress.idle_since().unwrap_or_else(Instant::now);
            tokio::select! {
                r = &mut sent => return Some(r),
                () = tokio::time::sleep_until(since + limit) => {
                    if progress.idle_since().is_some_and(|s| s + limit <= Instant::now()) {
                        return None;
                    }
                }
            }
        }
    }

    async fn connect(&self, mut req: Request<Incoming>, local: Local) -> Response<Body> {
        let Local::Endpoint(addr) = local else {
            unreachable!("connect targets are resolved to addresses")
        };
        let limit = self.inner.kubelet.timeouts.connect;
        let tcp = match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                return status_response(
                    StatusCode::BAD_GATEWAY,
                    "ServiceUnavailable",
                    &format!("edge could not connect to {addr}: {e}"),
                );
            }
            Err(_) => {
                self.inner
                    .metrics
                    .local_timeout(Kind::Connect, Phase::Connect);
                return status_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Timeout",
                    &format!(
                        "edge could not connect to {addr} within {limit:?} (edge setting kubelet_connect_timeout_secs)"
                    ),
                );
            }
        };
        let _ = tcp.set_nodelay(true);
        let tunnel_side = hyper::upgrade::on(&mut req);
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(
            async move {
                let Ok(t) = tunnel_side.await else { return };
                let (mut t, mut tcp) = (TokioIo::new(t), tcp);
                match tether_tunnel::splice(&mut t, &mut tcp, &shutdown).await {
                    Ok((up, down)) => debug!(up, down, "raw stream closed"),
                    Err(e) => debug!(error = %e, "raw stream ended"),
                }
            }
            .in_current_span(),
        );
        Response::new(body_empty())
    }
}

/// The local endpoint a raw `CONNECT host:port` goes to. The host is what the
/// client dialled (the node's InternalIP or name from the apiserver's egress
/// selector), not a local address, so the port selects: the kubelet's port
/// means the kubelet endpoint, any other port an allow-listed endpoint (the
/// one with exactly that address when several share the port). The edge
/// never dials anything else, whatever the cloud sends.
fn connect_local(kubelet: SocketAddr, allow: &[SocketAddr], target: &str) -> Option<SocketAddr> {
    let port = target.rsplit_once(':')?.1.parse::<u16>().ok()?;
    if port == kubelet.port() {
        return Some(kubelet);
    }
    let exact = target
        .parse::<SocketAddr>()
        .ok()
        .filter(|a| allow.contains(a));
    exact.or_else(|| allow.iter().find(|a| a.port() == port).copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn connect_targets_map_by_port_to_kubelet_or_allow_list_only() {
        let kubelet = sa("127.0.0.1:10250");
        let allow = [
            sa("127.0.0.1:9100"),
            sa("10.0.0.5:9100"),
            sa("127.0.0.1:8443"),
        ];
        let c = |t: &str| connect_local(kubelet, &allow, t);
        // The node IP or name the apiserver dialled selects by port.
        assert_eq!(c("192.168.100.6:10250"), Some(kubelet));
        assert_eq!(c("edge-1:10250"), Some(kubelet));
        assert_eq!(c("[fd00::6]:10250"), Some(kubelet));
        assert_eq!(c("192.168.100.6:8443"), Some(sa("127.0.0.1:8443")));
        // Several endpoints on one port: the exact address wins, else the first.
        assert_eq!(c("10.0.0.5:9100"), Some(sa("10.0.0.5:9100")));
        assert_eq!(c("192.168.100.6:9100"), Some(sa("127.0.0.1:9100")));
        // Anything else is refused.
        assert_eq!(c("192.168.100.6:22"), None);
        assert_eq!(c("8.8.8.8:53"), None);
        assert_eq!(c("192.168.100.6"), None);
        assert_eq!(c("192.168.100.6:http"), None);
        assert_eq!(c(""), None);
    }
}
