//! The admin HTTP endpoint of every role: `/metrics` (OpenMetrics text),
//! `/healthz` (the process runs) and `/readyz` (the role can do its job).
//! Plain HTTP, meant for loopback or a pod network with a NetworkPolicy.

use std::sync::{Arc, Mutex};

use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tether_tunnel::Shutdown;
use tokio::net::TcpListener;
use tracing::warn;

pub(crate) type Ready = Arc<dyn Fn() -> bool + Send + Sync>;

/// Serves the admin endpoint until shutdown.
pub(crate) async fn serve(
    listener: TcpListener,
    registry: Arc<Mutex<Registry>>,
    ready: Ready,
    shutdown: Shutdown,
) {
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.triggered() => return,
        };
        let registry = registry.clone();
        let ready = ready.clone();
        let service = hyper::service::service_fn(move |req| {
            let registry = registry.clone();
            let ready = ready.clone();
            async move {
                let (status, ctype, body) = match req.uri().path() {
                    "/metrics" => {
                        let mut out = String::new();
                        let reg = registry.lock().expect("metrics lock");
                        match prometheus_client::encoding::text::encode(&mut out, &reg) {
                            Ok(()) => (
                                StatusCode::OK,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                out,
                            ),
                            Err(e) => (
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "text/plain",
                                e.to_string(),
                            ),
                        }
                    }
                    "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
                    "/readyz" if ready() => (StatusCode::OK, "text/plain", "ready\n".into()),
                    "/readyz" => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready\n".into(),
                    ),
                    _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
                };
                Response::builder()
                    .status(status)
                    .header("content-type", ctype)
                    .body(Full::new(Bytes::from(body)))
            }
        });
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.triggered() => {}
            }
        });
    }
}
