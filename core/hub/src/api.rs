//! The HTTP pieces that both hub APIs share: the cloud's (admin port,
//! `/hub/v1/`, bearer token; in tether-cloudhub) and the edge's (a local
//! unix socket, `/v1/`; in tether-edgehub). Both publish single messages
//! (JSON) or batches (NDJSON, stopping at the first refusal so nothing
//! after a gap is accepted), answer sync requests, and stream subscriptions
//! as NDJSON. They live here so that neither side links the other's code.
//! See docs/hub.md.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use tether_tunnel::{Body, body_from};
use tokio::sync::mpsc;

use crate::dispatch::{Event, Filter};
use crate::{BadMessage, Message, PublishError};

/// Most messages in one NDJSON batch.
pub const MAX_BATCH: usize = 1000;
/// Largest NDJSON batch body. Bodies are read whole to publish them in one
/// transaction, so this times the API's connection limit bounds its memory.
pub const MAX_BATCH_BYTES: usize = 8 << 20;
/// Longest sync wait a caller may ask for.
const MAX_SYNC_WAIT: Duration = Duration::from_secs(60);

/// Publishes a JSON message or an NDJSON batch with `publish` (which
/// accepts a prefix of the batch and says why it stopped).
pub async fn publish_body<F, Fut, E>(
    req: Request<Incoming>,
    max_message: usize,
    publish: F,
    to_response: fn(&E) -> Response<Body>,
) -> Response<Body>
where
    F: Fn(Vec<Message>) -> Fut,
    Fut: Future<Output = (Vec<String>, Option<E>)>,
    E: std::fmt::Display,
{
    let ndjson = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-ndjson"));
    if !ndjson {
        let msg = match read_one(req, max_message).await {
            Ok(m) => m,
            Err(resp) => return resp,
        };
        return match publish(vec![msg]).await {
            (ids, None) => json(StatusCode::ACCEPTED, serde_json::json!({"msg_id": ids[0]})),
            (_, Some(e)) => to_response(&e),
        };
    }
    let body = match read_body(
        req,
        max_message.saturating_mul(MAX_BATCH).min(MAX_BATCH_BYTES),
    )
    .await
    {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let lines: Vec<&[u8]> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .collect();
    if lines.len() > MAX_BATCH {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("batch of {} messages; at most {MAX_BATCH}", lines.len()),
        );
    }
    // Parse up to the first bad line; the good prefix is still published,
    // so nothing after a gap is accepted and per-resource order holds when
    // the caller resends from `accepted`.
    let mut messages = Vec::with_capacity(lines.len());
    let mut bad = None;
    for (i, line) in lines.iter().enumerate() {
        match Message::from_json(line, max_message) {
            Ok(m) => messages.push(m),
            Err(e) => {
                bad = Some((i, e));
                break;
            }
        }
    }
    let (ids, refused) = publish(messages).await;
    let accepted = ids.len();
    let failure = match (refused, bad) {
        (Some(e), _) => Some((to_response(&e).status(), e.to_string())),
        (None, Some((_, e))) => Some((StatusCode::BAD_REQUEST, e.to_string())),
        (None, None) => None,
    };
    match failure {
        None => json(
            StatusCode::ACCEPTED,
            serde_json::json!({"accepted": accepted, "msg_ids": ids}),
        ),
        Some((status, e)) => retry_later(json(
            status,
            serde_json::json!({"accepted": accepted, "msg_ids": ids, "error": format!("message {accepted}: {e}")}),
        )),
    }
}

/// Reads and validates one JSON message.
pub async fn read_one(req: Request<Incoming>, max: usize) -> Result<Message, Response<Body>> {
    let body = read_body(req, max).await?;
    Message::from_json(&body, max).map_err(|e| error(StatusCode::BAD_REQUEST, &e.to_string()))
}

async fn read_body(req: Request<Incoming>, max: usize) -> Result<Bytes, Response<Body>> {
    match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body exceeds the {max}-byte limit"),
        )),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("reading body: {e}"),
        )),
    }
}

/// `?sync=true[&timeout_ms=N]` asks for a sync request (default 10 s).
pub fn sync_wait(query: &std::collections::HashMap<String, String>) -> Option<Duration> {
    (query.get("sync").map(String::as_str) == Some("true")).then(|| {
        query
            .get("timeout_ms")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(10))
            .min(MAX_SYNC_WAIT)
    })
}

/// The subscription filter of a query.
pub fn filter_of(
    query: &std::collections::HashMap<String, String>,
    peer: Option<String>,
) -> Filter {
    Filter {
        peer,
        group: query.get("group").cloned(),
        resource_prefix: query.get("resource_prefix").cloned(),
    }
}

/// Streams events as NDJSON until the client goes away.
pub fn stream(mut rx: mpsc::Receiver<Event>) -> Response<Body> {
    let (tx, body_rx) = mpsc::channel::<Result<Frame<Bytes>, tether_tunnel::BoxError>>(16);
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            let mut line = ev.to_json().to_string().into_bytes();
            line.push(b'\n');
            if tx.send(Ok(Frame::data(line.into()))).await.is_err() {
                return;
            }
        }
    });
    let body = StreamBody::new(tokio_stream_from(body_rx));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(BodyExt::boxed_unsync(body))
        .expect("static response")
}

fn tokio_stream_from<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) })
}

/// A message as the response body.
pub fn message_response(m: &Message) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body_from(m.to_json()))
        .expect("static response")
}

/// The status of a publish refusal.
pub fn publish_status(e: &PublishError) -> StatusCode {
    match e {
        PublishError::Bad(BadMessage::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
        PublishError::Bad(_) => StatusCode::BAD_REQUEST,
        PublishError::QueueFull { .. } | PublishError::RateLimited { .. } => {
            StatusCode::TOO_MANY_REQUESTS
        }
        PublishError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// A JSON error body for a refusal, which for a 503 also says when to try
/// again.
pub fn refusal(status: StatusCode, text: &str) -> Response<Body> {
    retry_later(error(status, text))
}

/// A failing store (full disk) recovers by itself: a 503 says when to try
/// again.
fn retry_later(mut resp: Response<Body>) -> Response<Body> {
    if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    resp
}

/// A JSON error body `{"error": text}`.
pub fn error(status: StatusCode, text: &str) -> Response<Body> {
    json(status, serde_json::json!({ "error": text }))
}

/// A JSON body.
pub fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut body = v.to_string().into_bytes();
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body_from(body))
        .expect("static response")
}

/// Decoded `k=v` pairs of a query string.
pub fn parse_query(q: Option<&str>) -> std::collections::HashMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
            (b'+', ..) => out.push(b' '),
            (c, ..) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
