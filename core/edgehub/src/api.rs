//! The edge hub's local API: HTTP on a unix socket (mode 0600, so only the
//! agent's user and root reach it). `POST /v1/messages` publishes upstream
//! (JSON, or an NDJSON batch; `?sync=true` waits for the cloud's response),
//! `GET /v1/subscribe` streams downstream messages as NDJSON, filtered by
//! `group` and `resource_prefix`, and `GET /v1/status` tells whether the
//! link is up and how many messages wait.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tether_hub::api::{
    error, filter_of, json, message_response, parse_query, publish_body, publish_status, read_one,
    refusal, stream, sync_wait,
};
use tether_hub::{PublishError, RequestError};
use tether_tunnel::{Body, Shutdown};
use tokio::net::UnixListener;
use tracing::warn;

use crate::hub::EdgeHub;

/// Local API connections at once (subscriptions hold one each).
const MAX_CONNECTIONS: usize = 128;

/// Binds `path` (replacing a stale socket) and serves until shutdown.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the local API on `listener` until shutdown.
pub async fn serve(listener: UnixListener, hub: EdgeHub, max_message: usize, shutdown: Shutdown) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("never closed"),
            _ = shutdown.triggered() => return,
        };
        let (conn, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "hub API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.triggered() => return,
        };
        let hub = hub.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let hub = hub.clone();
                async move { Ok::<_, std::convert::Infallible>(route(hub, req, max_message).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(conn), service);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.triggered() => {}
            }
        });
    }
}

async fn route(hub: EdgeHub, req: Request<Incoming>, max_message: usize) -> Response<Body> {
    let query = parse_query(req.uri().query());
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/v1/status") => json(
            StatusCode::OK,
            serde_json::json!({"online": hub.is_online(), "queued": hub.queued()}),
        ),
        (Method::POST, "/v1/messages") => {
            if let Some(wait) = sync_wait(&query) {
                let msg = match read_one(req, max_message).await {
                    Ok(m) => m,
                    Err(resp) => return resp,
                };
                return match hub.request(msg, wait).await {
                    Ok(resp) => message_response(&resp),
                    Err(RequestError::Publish(e)) => publish_error(&e),
                    Err(e) => error(StatusCode::GATEWAY_TIMEOUT, &e.to_string()),
                };
            }
            let publish = |batch| {
                let hub = hub.clone();
                async move { hub.publish_batch(batch).await }
            };
            publish_body(req, max_message, publish, publish_error).await
        }
        (Method::GET, "/v1/subscribe") => match hub.subscribe(filter_of(&query, None)) {
            Ok(rx) => stream(rx),
            Err(e) => error(StatusCode::TOO_MANY_REQUESTS, &e.to_string()),
        },
        (m, p) => error(StatusCode::NOT_FOUND, &format!("no hub API at {m} {p}")),
    }
}

fn publish_error(e: &PublishError) -> Response<Body> {
    refusal(publish_status(e), &e.to_string())
}
