//! The cloud hub's HTTP API for applications, served on the admin port
//! under `/hub/v1/` behind a bearer token: publish to a node (JSON or an
//! NDJSON batch, or a sync request), node status, and subscriptions. The
//! pieces it shares with the edge's API are in `tether_hub::api`. See
//! docs/hub.md.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tether_hub::api::{
    error, filter_of, json, message_response, parse_query, publish_body, publish_status, read_one,
    refusal, stream, sync_wait,
};
use tether_hub::{Message, RequestError};
use tether_tunnel::Body;

use crate::hub::{CloudHub, HubError};

/// An HTTP handler.
pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

/// The cloud hub API, authenticated by `token` (compared in constant time).
pub fn cloud_handler(hub: CloudHub, token: Arc<str>, max_message: usize) -> Handler {
    Arc::new(move |req| {
        let hub = hub.clone();
        let token = token.clone();
        Box::pin(async move {
            if !authorized(&req, &token) {
                return json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": "hub API needs Authorization: Bearer <token>"}),
                );
            }
            cloud_route(hub, req, max_message).await
        })
    })
}

async fn cloud_route(hub: CloudHub, req: Request<Incoming>, max_message: usize) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = parse_query(req.uri().query());
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), segs.as_slice()) {
        (Method::GET, ["hub", "v1", "nodes"]) => {
            json(StatusCode::OK, serde_json::json!(hub.nodes()))
        }
        (Method::GET, ["hub", "v1", "nodes", node]) => match hub.node(node) {
            Some(s) => json(StatusCode::OK, serde_json::json!(s)),
            None => error(
                StatusCode::NOT_FOUND,
                &format!("no channel for node {node:?}"),
            ),
        },
        (Method::POST, ["hub", "v1", "nodes", node, "messages"]) => {
            let node = (*node).to_owned();
            let publish = {
                let hub = hub.clone();
                let node = node.clone();
                move |batch: Vec<Message>| {
                    let hub = hub.clone();
                    let node = node.clone();
                    async move { hub.publish_batch(&node, batch).await }
                }
            };
            if let Some(wait) = sync_wait(&query) {
                let msg = match read_one(req, max_message).await {
                    Ok(m) => m,
                    Err(resp) => return resp,
                };
                return match hub.request(&node, msg, wait).await {
                    Ok(resp) => message_response(&resp),
                    Err(e) => hub_error(&e),
                };
            }
            publish_body(req, max_message, publish, hub_error).await
        }
        (Method::GET, ["hub", "v1", "subscribe"]) => {
            let filter = filter_of(&query, query.get("node").cloned());
            match hub.subscribe(filter) {
                Ok(rx) => stream(rx),
                Err(e) => hub_error(&e),
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            &format!("no hub API at {} {path}", req.method()),
        ),
    }
}

/// The status and text of a hub refusal.
pub fn hub_error(e: &HubError) -> Response<Body> {
    let status = match e {
        HubError::Publish(p) | HubError::Request(RequestError::Publish(p)) => publish_status(p),
        HubError::Request(RequestError::Timeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
        HubError::BadNode(_) => StatusCode::BAD_REQUEST,
        HubError::TooManyNodes(..) | HubError::TooManySubscribers(_) => {
            StatusCode::TOO_MANY_REQUESTS
        }
        HubError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        // The holder's own answer, or 502 when it could not be reached.
        HubError::Peer { status, .. } => status.unwrap_or(StatusCode::BAD_GATEWAY),
    };
    refusal(status, &e.to_string())
}

fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Constant time in the token's content.
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}
