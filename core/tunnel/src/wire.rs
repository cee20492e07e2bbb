//! How an HTTP/1.1 kubelet request is carried on an h2 stream and back.
//!
//! - A plain request keeps its method, path, query, headers and body; the
//!   `:authority` names the edge-side target (`kubelet` or an allow-listed
//!   `host:port`). Hop-by-hop headers are dropped as HTTP/2 requires.
//! - An upgrade (`Connection: Upgrade` + `Upgrade: X`) becomes an extended
//!   CONNECT with `:protocol` = X; the original method travels in
//!   `tether-method`. The edge replays it as an HTTP/1.1 upgrade; a `101`
//!   answer comes back as `200` with the kubelet's headers, which the cloud
//!   turns back into the `101` the client expects.
//! - A plain CONNECT `host:port` is a raw byte stream to that edge target.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};

/// Carries the original method of an upgrade request across extended CONNECT.
pub const METHOD_HEADER: &str = "tether-method";
/// Marks a tunnel response that stands for the kubelet's `101 Switching Protocols`.
pub const UPGRADED_HEADER: &str = "tether-upgraded";
/// The `:authority` that names the edge's kubelet endpoint.
pub const KUBELET_TARGET: &str = "kubelet";
/// The `:authority` of the cloud's round-trip probe; the edge answers `204`
/// itself, so the time measures the tunnel alone.
pub const PING_TARGET: &str = "tether-ping";

/// Input that cannot be mapped onto the tunnel.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The target is not a valid authority.
    #[error("invalid tunnel target {0:?}")]
    Target(String),
    /// The request path or query is not valid.
    #[error("invalid request target: {0}")]
    Path(String),
    /// The upgrade protocol token is not valid.
    #[error("invalid upgrade protocol {0:?}")]
    Protocol(String),
    /// An upgrade carried a method other than GET or POST.
    #[error("method {0:?} is not allowed for an upgrade")]
    UpgradeMethod(String),
}

/// What kind of stream a request is.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// An ordinary request/response.
    Http,
    /// An HTTP upgrade to the given protocol token (`SPDY/3.1`, `websocket`).
    Upgrade(String),
    /// A raw byte stream to `host:port`.
    Connect,
}

/// Classifies an HTTP/1.1 request as the front received it.
pub fn classify<B>(req: &Request<B>) -> StreamKind {
    if req.method() == Method::CONNECT {
        return StreamKind::Connect;
    }
    let wants_upgrade = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    match req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
    {
        Some(p) if wants_upgrade && !p.trim().is_empty() => {
            StreamKind::Upgrade(p.trim().to_owned())
        }
        _ => StreamKind::Http,
    }
}

/// Removes connection-specific headers (RFC 9110 7.6.1), including any the
/// `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::UPGRADE,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::HOST,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// The origin-form request target for a path-and-query: `/` when there is
/// none, and `/?q` for an absolute-form request with a query but an empty
/// path (`http://node?q`), which `http` reads as the path-and-query `?q` and
/// which is no valid request target on its own (fuzzing finding W2,
/// docs/fuzzing.md).
fn origin_form(path_and_query: Option<&str>) -> std::borrow::Cow<'_, str> {
    match path_and_query {
        None => "/".into(),
        Some(pq) if pq.starts_with('?') => format!("/{pq}").into(),
        Some(pq) => pq.into(),
    }
}

fn tunnel_uri(target: &str, path_and_query: Option<&str>) -> Result<Uri, WireError> {
    // Check the target on its own so a bad one is reported as such, not as a
    // bad path (fuzzing finding W1, docs/fuzzing.md).
    let authority = target
        .parse::<http::uri::Authority>()
        .ok()
        .filter(|a| !a.as_str().is_empty() && !a.as_str().contains('@'))
        .ok_or_else(|| WireError::Target(target.to_owned()))?;
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(origin_form(path_and_query).as_ref())
        .build()
        .map_err(|e| WireError::Path(e.to_string()))
}

/// Cloud side: rewrites a request the front received so it can be sent on the
/// tunnel to `target` (`kubelet` or `host:port`).
pub fn request_to_tunnel<B>(mut req: Request<B>, target: &str) -> Result<Request<B>, WireError> {
    let kind = classify(&req);
    let pq = req.uri().path_and_query().map(|p| p.as_str().to_owned());
    match kind {
        StreamKind::Connect => {
            let uri = Uri::builder()
                .authority(target)
                .build()
                .map_err(|_| WireError::Target(target.to_owned()))?;
            *req.uri_mut() = uri;
            strip_hop_by_hop(req.headers_mut());
        }
        StreamKind::Upgrade(protocol) => {
            let method = req.method().clone();
            if method != Method::GET && method != Method::POST {
                return Err(WireError::UpgradeMethod(method.to_string()));
            }
            if !protocol.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(WireError::Protocol(protocol));
            }
            *req.uri_mut() = tunnel_uri(target, pq.as_deref())?;
            *req.method_mut() = Method::CONNECT;
            strip_hop_by_hop(req.headers_mut());
            req.headers_mut().insert(
                METHOD_HEADER,
                HeaderValue::from_str(method.as_str()).expect("method is a valid header"),
            );
            req.extensions_mut()
                .insert(hyper::ext::Protocol::from(protocol.as_str()));
        }
        StreamKind::Http => {
            *req.uri_mut() = tunnel_uri(target, pq.as_deref())?;
            strip_hop_by_hop(req.headers_mut());
        }
    }
    *req.version_mut() = http::Version::HTTP_2;
    Ok(req)
}

/// What the edge should do with a stream it received.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// Forward as an ordinary request to the target.
    Http {
        /// `kubelet` or `host:port`.
        target: String,
    },
    /// Replay as an HTTP/1.1 upgrade to the target.
    Upgrade {
        /// `kubelet` or `host:port`.
        target: String,
        /// The upgrade token.
        protocol: String,
        /// The original method.
        method: Method,
    },
    /// Open a raw stream to `host:port`.
    Connect {
        /// The requested `host:port`.
        target: String,
    },
}

/// Edge side: reads what a tunnel stream asks for.
pub fn inbound<B>(req: &Request<B>) -> Result<Inbound, WireError> {
    let target = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .ok_or_else(|| WireError::Target(String::new()))?;
    if req.method() != Method::CONNECT {
        return Ok(Inbound::Http { target });
    }
    match req.extensions().get::<hyper::ext::Protocol>() {
        None => Ok(Inbound::Connect { target }),
        Some(p) => {
            let method = match req.headers().get(METHOD_HEADER).map(|v| v.as_bytes()) {
                None | Some(b"GET") => Method::GET,
                Some(b"POST") => Method::POST,
                Some(other) => {
                    return Err(WireError::UpgradeMethod(
                        String::from_utf8_lossy(other).into_owned(),
                    ));
                }
            };
            Ok(Inbound::Upgrade {
                target,
                protocol: p.as_str().to_owned(),
                method,
            })
        }
    }
}

/// Edge side: the HTTP/1.1 request to replay locally for a tunnel stream.
/// `host` is the local endpoint's authority.
pub fn local_request<B>(
    mut req: Request<B>,
    inbound: &Inbound,
    host: &str,
) -> Result<Request<B>, WireError> {
    let pq = origin_form(req.uri().path_and_query().map(|p| p.as_str())).into_owned();
    *req.uri_mut() = pq
        .parse()
        .map_err(|e: http::uri::InvalidUri| WireError::Path(e.to_string()))?;
    *req.version_mut() = http::Version::HTTP_11;
    strip_hop_by_hop(req.headers_mut());
    req.headers_mut().remove(METHOD_HEADER);
    let host = HeaderValue::from_str(host).map_err(|_| WireError::Target(host.to_owned()))?;
    req.headers_mut().insert(header::HOST, host);
    if let Inbound::Upgrade {
        protocol, method, ..
    } = inbound
    {
        *req.method_mut() = method.clone();
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        req.headers_mut().insert(
            header::UPGRADE,
            HeaderValue::from_str(protocol).map_err(|_| WireError::Protocol(protocol.clone()))?,
        );
    }
    Ok(req)
}

/// Edge side: the tunnel answer for a local `101` response.
pub fn upgraded_to_tunnel<B>(mut resp: Response<B>) -> Response<B> {
    strip_hop_by_hop(resp.headers_mut());
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut()
        .insert(UPGRADED_HEADER, HeaderValue::from_static("101"));
    *resp.version_mut() = http::Version::HTTP_2;
    resp
}

/// Cloud side: turns the tunnel answer to an upgrade back into what the
/// client expects: `101` with `Connection: Upgrade` and `Upgrade: protocol`
/// when the edge upgraded, else the kubelet's own answer unchanged.
pub fn upgraded_from_tunnel<B>(mut resp: Response<B>, protocol: &str) -> (Response<B>, bool) {
    let upgraded = resp.status() == StatusCode::OK && resp.headers().contains_key(UPGRADED_HEADER);
    resp.headers_mut().remove(UPGRADED_HEADER);
    *resp.version_mut() = http::Version::HTTP_11;
    if upgraded {
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Ok(v) = HeaderValue::from_str(protocol) {
            resp.headers_mut().insert(header::UPGRADE, v);
        }
    }
    (resp, upgraded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade_req(method: Method) -> Request<()> {
        Request::builder()
            .method(method)
            .uri("/exec/ns/pod/c?command=sh&stdin=1")
            .header("host", "10.0.0.5:10250")
            .header("connection", "Upgrade")
            .header("upgrade", "SPDY/3.1")
            .header("x-stream-protocol-version", "v4.channel.k8s.io")
            .body(())
            .unwrap()
    }

    #[test]
    fn upgrade_round_trips_through_extended_connect() {
        let req = request_to_tunnel(upgrade_req(Method::POST), KUBELET_TARGET).unwrap();
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().authority().unwrap().as_str(), "kubelet");
        assert_eq!(
            req.uri().path_and_query().unwrap().as_str(),
            "/exec/ns/pod/c?command=sh&stdin=1"
        );
        assert!(req.headers().get("connection").is_none());
        assert!(req.headers().get("host").is_none());
        assert_eq!(
            req.headers()["x-stream-protocol-version"],
            "v4.channel.k8s.io"
        );
        let inb = inbound(&req).unwrap();
        assert_eq!(
            inb,
            Inbound::Upgrade {
                target: "kubelet".into(),
                protocol: "SPDY/3.1".into(),
                method: Method::POST
            }
        );
        let local = local_request(req, &inb, "127.0.0.1:10350").unwrap();
        assert_eq!(local.method(), Method::POST);
        assert_eq!(local.uri(), "/exec/ns/pod/c?command=sh&stdin=1");
        assert_eq!(local.headers()["upgrade"], "SPDY/3.1");
        assert_eq!(local.headers()["connection"], "Upgrade");
        assert_eq!(local.headers()["host"], "127.0.0.1:10350");
        assert!(local.headers().get(METHOD_HEADER).is_none());
    }

    #[test]
    fn plain_request_keeps_path_and_drops_hop_by_hop() {
        let req = Request::builder()
            .uri("/containerLogs/ns/p/c?follow=true")
            .header("connection", "keep-alive, x-secret")
            .header("x-secret", "1")
            .header("keep-alive", "timeout=5")
            .header("accept", "*/*")
            .body(())
            .unwrap();
        assert_eq!(classify(&req), StreamKind::Http);
        let req = request_to_tunnel(req, KUBELET_TARGET).unwrap();
        assert_eq!(req.headers().len(), 1);
        assert_eq!(
            inbound(&req).unwrap(),
            Inbound::Http {
                target: "kubelet".into()
            }
        );
    }

    /// Fuzzing finding W2: an absolute-form target with a query and no path
    /// reached the edge as `?q`, which it could not replay.
    #[test]
    fn fuzz_w2_query_without_path_is_replayable() {
        for (uri, want) in [
            ("http://node?follow=true", "/?follow=true"),
            ("http://node?", "/?"),
        ] {
            let req = Request::get(uri).body(()).unwrap();
            let tunnel = request_to_tunnel(req, KUBELET_TARGET).unwrap();
            let inb = inbound(&tunnel).unwrap();
            let local = local_request(tunnel, &inb, "127.0.0.1:10350").unwrap();
            assert_eq!(local.uri(), want, "{uri}");
        }
    }

    #[test]
    fn connect_and_bad_targets() {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.5:9100")
            .body(())
            .unwrap();
        let req = request_to_tunnel(req, "127.0.0.1:9100").unwrap();
        assert_eq!(
            inbound(&req).unwrap(),
            Inbound::Connect {
                target: "127.0.0.1:9100".into()
            }
        );
        let bad = Request::builder().uri("/x").body(()).unwrap();
        assert!(request_to_tunnel(bad, "a/b").is_err());
        // Fuzzing finding W1: a bad target is reported as a bad target.
        let bad = Request::builder().uri("/x").body(()).unwrap();
        assert_eq!(
            request_to_tunnel(bad, "\0").unwrap_err(),
            WireError::Target("\0".into())
        );
        let put = upgrade_req(Method::PUT);
        assert_eq!(
            request_to_tunnel(put, KUBELET_TARGET).unwrap_err(),
            WireError::UpgradeMethod("PUT".into())
        );
    }

    #[test]
    fn only_marked_ok_becomes_101() {
        let r = Response::builder().status(200).body(()).unwrap();
        let (r, up) = upgraded_from_tunnel(r, "websocket");
        assert!(!up);
        assert_eq!(r.status(), 200);
        let r = upgraded_to_tunnel(
            Response::builder()
                .status(101)
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", "abc")
                .body(())
                .unwrap(),
        );
        let (r, up) = upgraded_from_tunnel(r, "websocket");
        assert!(up);
        assert_eq!(r.status(), 101);
        assert_eq!(r.headers()["upgrade"], "websocket");
        assert_eq!(r.headers()["sec-websocket-accept"], "abc");
    }
}

/// A Kubernetes `Status` failure body, which kubectl prints as the error
/// message. Both the front and the edge answer failures with it.
pub fn status_json(code: StatusCode, reason: &str, message: &str) -> bytes::Bytes {
    let body = format!(
        r#"{{"kind":"Status","apiVersion":"v1","metadata":{{}},"status":"Failure","message":{},"reason":{},"code":{}}}"#,
        json_string(message),
        json_string(reason),
        code.as_u16()
    );
    bytes::Bytes::from(body)
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A `Status` response with `application/json`.
pub fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<crate::Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(crate::body_from(status_json(code, reason, message)))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod status_tests {
    use super::*;

    #[test]
    fn status_json_escapes() {
        let b = status_json(StatusCode::NOT_FOUND, "NotFound", "node \"x\"\n gone");
        let s = std::str::from_utf8(&b).unwrap();
        assert!(s.contains(r#""message":"node \"x\"\u000a gone""#), "{s}");
        assert!(s.contains(r#""code":404"#));
    }
}
