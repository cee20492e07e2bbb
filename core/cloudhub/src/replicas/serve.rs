//! The hub's routes on the peer listener, for other replicas only (the
//! listener admits replica certificates alone):
//!
//! - `POST /hub/v1/peer/nodes/<node>/messages`: an NDJSON batch relayed
//!   from another replica's queue. Stored durably with the same ids, then
//!   `200 {"accepted": n}`; a refusal says how many were taken, like a
//!   publish batch. `409` when this replica holds no session of the node
//!   and knows who does (relay there instead; this avoids ping-pong while
//!   the ownership records settle), unless the sender is leaving
//!   (`tether-hand-over`): then this replica keeps them and relays later.
//! - `POST /hub/v1/peer/nodes/<node>/hand-over`: the node's hub session
//!   arrived at the calling replica (`tether-relayed-by`); a stale session
//!   of it here is cut and this replica's queue for it is relayed there
//!   now, so it goes out before anything newer. `200 {"handed": n,
//!   "left": m}` (`left`: not handed over within the deadline).
//! - `POST /hub/v1/peer/nodes/<node>/request?timeout_ms=N`: a sync request
//!   forwarded by another replica, answered here (never forwarded again).

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tether_hub::Message;
use tether_hub::api::{error, json, message_response, parse_query, read_one};
use tether_tunnel::Body;

use super::PEER_PATH;
use super::client::MAX_ANSWER;
use crate::api::{Handler, hub_error};
use crate::hub::CloudHub;

/// Longest wait a forwarded sync request may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The handler the peer listener calls for paths under [`PEER_PATH`].
pub fn peer_handler(hub: CloudHub, max_message: usize) -> Handler {
    Arc::new(move |req| {
        let hub = hub.clone();
        Box::pin(async move { route(hub, req, max_message).await })
    })
}

async fn route(hub: CloudHub, req: Request<Incoming>, max_message: usize) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let rest = path.strip_prefix(PEER_PATH).unwrap_or_default();
    let segs: Vec<&str> = rest.split('/').collect();
    match (req.method().clone(), segs.as_slice()) {
        (Method::POST, ["nodes", node, "messages"]) => {
            let node = (*node).to_owned();
            relayed(hub, req, &node, max_message).await
        }
        (Method::POST, ["nodes", node, "hand-over"]) => {
            let from = req
                .headers()
                .get(super::FROM_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            match hub.hand_to(node, &from).await {
                Ok((handed, left)) => json(
                    StatusCode::OK,
                    serde_json::json!({"handed": handed, "left": left}),
                ),
                Err(e) => error(StatusCode::NOT_FOUND, &e),
            }
        }
        (Method::POST, ["nodes", node, "request"]) => {
            let node = (*node).to_owned();
            let wait = parse_query(req.uri().query())
                .get("timeout_ms")
                .and_then(|t| t.parse().ok())
                .map_or(Duration::from_secs(10), Duration::from_millis)
                .min(MAX_WAIT);
            let msg = match read_one(req, max_message.min(MAX_ANSWER)).await {
                Ok(m) => m,
                Err(resp) => return resp,
            };
            match hub.request_here(&node, msg, wait).await {
                Ok(resp) => message_response(&resp),
                Err(e) => hub_error(&e),
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            &format!("no hub peer route at {} {path}", req.method()),
        ),
    }
}

async fn relayed(
    hub: CloudHub,
    req: Request<Incoming>,
    node: &str,
    max_message: usize,
) -> Response<Body> {
    let leaving = req.headers().contains_key(super::HAND_OVER_HEADER);
    if let Some(holder) = hub.relays_elsewhere(node).filter(|_| !leaving) {
        return json(
            StatusCode::CONFLICT,
            serde_json::json!({"accepted": 0, "error": format!(
                "node {node} is held by replica {}, not this one", holder.replica)}),
        );
    }
    // A relay batch is about 2 MiB, or one message when that is larger.
    let limit = (4 << 20usize).max(max_message * 2);
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("reading a relayed batch: {e}"),
            );
        }
    };
    let mut messages = Vec::new();
    for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        // Parsed like the edge parses frames: the size bound applies when
        // the message is admitted.
        match Message::from_json(line, usize::MAX) {
            Ok(m) => messages.push(m),
            Err(e) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"accepted": 0, "error": format!("relayed message: {e}")}),
                );
            }
        }
    }
    let total = messages.len();
    let (taken, refused) = hub.accept_relayed(node, messages).await;
    match refused {
        None if taken == total => json(StatusCode::OK, serde_json::json!({"accepted": taken})),
        None => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"accepted": taken, "error": "batch cut short"}),
        ),
        Some(e) => json(
            hub_error(&e).status(),
            serde_json::json!({"accepted": taken, "error": e.to_string()}),
        ),
    }
}
