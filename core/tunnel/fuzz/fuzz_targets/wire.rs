//! Fuzzes how a kubelet request is carried across the tunnel
//! (`tether_tunnel::wire`): `classify`, `request_to_tunnel` (cloud side),
//! `inbound` and `local_request` (edge side), and the `status_json` error
//! body.
//!
//! The input drives a small structure: a method (mostly from a fixed set), a
//! request target, up to eight headers (names biased towards the ones the
//! wire code cares about), the tunnel target (`kubelet` or arbitrary), and a
//! status code / reason / message for `status_json`. Requests that `http`
//! refuses to build are skipped.
//!
//! Invariants checked:
//! - no hop-by-hop header (nor one the `Connection` header names) survives
//!   `request_to_tunnel`; every other header survives unchanged;
//! - the tunnel request is HTTP/2 with `:authority` = the target, and
//!   `inbound` reads the same target back;
//! - a plain request keeps its method; an upgrade becomes extended CONNECT
//!   whose protocol token and original method (GET/POST) `inbound` recovers
//!   and `local_request` replays as `Connection: Upgrade` + `Upgrade: token`;
//! - the path-and-query is preserved end to end (client -> tunnel -> local);
//! - a request the cloud put on the tunnel is one the edge can replay
//!   (`local_request` does not fail for it);
//! - `status_json` is valid JSON whose fields equal the inputs.
#![no_main]

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Version};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tether_tunnel::wire::{self, Inbound, KUBELET_TARGET, METHOD_HEADER, StreamKind, WireError};

const LOCAL_HOST: &str = "127.0.0.1:10350";

/// Headers `request_to_tunnel` must remove whatever else happens.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "upgrade",
    "transfer-encoding",
    "te",
    "keep-alive",
    "proxy-connection",
    "host",
    "trailer",
    "proxy-authorization",
    "proxy-authenticate",
];

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "CONNECT", "DELETE", "HEAD", "OPTIONS", "PATCH",
];

const NAMES: &[&str] = &[
    "connection",
    "upgrade",
    "host",
    "tether-method",
    "keep-alive",
    "transfer-encoding",
    "te",
    "proxy-connection",
    "x-stream-protocol-version",
    "x-secret",
    "accept",
];

const VALUES: &[&str] = &[
    "Upgrade",
    "upgrade",
    "keep-alive, Upgrade",
    "close, x-secret",
    "Upgrade, tether-method",
    "websocket",
    "SPDY/3.1",
    " SPDY/3.1 ",
    "GET",
    "POST",
    "PUT",
    "10.0.0.5:10250",
    "v4.channel.k8s.io",
];

const PATHS: &[&str] = &[
    "/exec/ns/pod/c?command=sh&stdin=1",
    "/containerLogs/ns/p/c?follow=true",
    "/metrics",
    "*",
    "10.0.0.5:9100",
    "http://10.0.0.5:10250/pods?x=1",
    "/",
];

fn pick<'a>(u: &mut Unstructured<'_>, fixed: &[&'a str]) -> Result<std::borrow::Cow<'a, str>> {
    // Mostly a known value, sometimes anything.
    let i = u.int_in_range(0..=fixed.len() + 1)?;
    Ok(match fixed.get(i) {
        Some(s) => (*s).into(),
        None => String::from(u.arbitrary::<&str>()?).into(),
    })
}

struct Case {
    req: Request<()>,
    target: String,
}

fn build(u: &mut Unstructured<'_>) -> Result<Option<Case>> {
    let method = pick(u, METHODS)?;
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Ok(None);
    };
    let path = pick(u, PATHS)?;
    let mut b = Request::builder().method(method).uri(path.as_ref());
    let n = u.int_in_range(0..=8u8)?;
    for _ in 0..n {
        let name = pick(u, NAMES)?;
        let value: Vec<u8> = if u.arbitrary()? {
            pick(u, VALUES)?.as_bytes().to_vec()
        } else {
            u.arbitrary::<&[u8]>()?.to_vec()
        };
        b = b.header(name.as_ref(), value);
    }
    let target = if u.arbitrary()? {
        KUBELET_TARGET.to_owned()
    } else {
        u.arbitrary::<&str>()?.to_owned()
    };
    Ok(b.body(()).ok().map(|req| Case { req, target }))
}

/// Lowercased header names the `Connection` header lists.
fn connection_named(h: &HeaderMap) -> Vec<HeaderName> {
    h.get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

fn values(h: &HeaderMap, name: &HeaderName) -> Vec<HeaderValue> {
    h.get_all(name).iter().cloned().collect()
}

fn check_request(case: Case) {
    let Case { req, target } = case;
    let kind = wire::classify(&req);
    let orig_method = req.method().clone();
    let orig_headers = req.headers().clone();
    let orig_pq = req.uri().path_and_query().map(|p| p.as_str().to_owned());
    if orig_method == Method::CONNECT {
        assert_eq!(kind, StreamKind::Connect);
    }
    if let StreamKind::Upgrade(p) = &kind {
        assert!(!p.is_empty() && p.trim() == p, "untrimmed protocol {p:?}");
    }

    let tunnel = match wire::request_to_tunnel(req, &target) {
        Ok(t) => t,
        Err(e) => {
            // The only reasons a request may not be put on the tunnel.
            match (&kind, &e) {
                (StreamKind::Upgrade(_), WireError::UpgradeMethod(m)) => {
                    assert!(orig_method != Method::GET && orig_method != Method::POST);
                    assert_eq!(m, orig_method.as_str());
                }
                (StreamKind::Upgrade(p), WireError::Protocol(q)) => {
                    assert_eq!(p, q);
                    assert!(!p.bytes().all(|b| b.is_ascii_graphic()));
                }
                (_, WireError::Target(t)) => {
                    assert_eq!(t, &target);
                    assert_ne!(target, KUBELET_TARGET, "kubelet refused as a target");
                }
                (StreamKind::Http | StreamKind::Upgrade(_), WireError::Path(msg)) => {
                    panic!("request target {orig_pq:?} refused on the tunnel to {target:?}: {msg}");
                }
                _ => panic!("unexpected error {e:?} for {kind:?}"),
            }
            return;
        }
    };

    // Hop-by-hop headers are gone; everything else is untouched.
    let th = tunnel.headers();
    for name in HOP_BY_HOP {
        assert!(
            !th.contains_key(*name),
            "hop-by-hop {name} survived: {th:?}"
        );
    }
    let named = connection_named(&orig_headers);
    for name in &named {
        if name.as_str() == METHOD_HEADER && matches!(kind, StreamKind::Upgrade(_)) {
            continue; // re-inserted by the upgrade mapping
        }
        assert!(!th.contains_key(name), "connection-named {name} survived");
    }
    for name in orig_headers.keys() {
        let dropped = HOP_BY_HOP.contains(&name.as_str()) || named.contains(name);
        let replaced = name == METHOD_HEADER && matches!(kind, StreamKind::Upgrade(_));
        if !dropped && !replaced {
            assert_eq!(
                values(th, name),
                values(&orig_headers, name),
                "header {name} changed"
            );
        }
    }
    assert_eq!(tunnel.version(), Version::HTTP_2);
    assert_eq!(
        tunnel.uri().authority().map(|a| a.as_str()),
        Some(target.as_str()),
        "tunnel authority differs from the target"
    );

    let inb = wire::inbound(&tunnel).expect("edge refuses what the cloud sent");
    let tunnel_pq = tunnel.uri().path_and_query().map(|p| p.as_str().to_owned());
    // `/` when there was none, and `?q` (absolute form, empty path) as `/?q` (W2).
    let expect_pq = match orig_pq.clone() {
        None => "/".to_owned(),
        Some(pq) if pq.starts_with('?') => format!("/{pq}"),
        Some(pq) => pq,
    };
    match &kind {
        StreamKind::Http => {
            assert_eq!(tunnel.method(), orig_method);
            assert_eq!(
                inb,
                Inbound::Http {
                    target: target.clone()
                }
            );
            assert_eq!(
                tunnel_pq.as_deref(),
                Some(expect_pq.as_str()),
                "tunnel path"
            );
        }
        StreamKind::Upgrade(p) => {
            assert!(orig_method == Method::GET || orig_method == Method::POST);
            assert_eq!(tunnel.method(), Method::CONNECT);
            assert_eq!(
                tunnel
                    .extensions()
                    .get::<hyper::ext::Protocol>()
                    .map(|x| x.as_str()),
                Some(p.as_str())
            );
            assert_eq!(th.get(METHOD_HEADER).unwrap(), orig_method.as_str());
            assert_eq!(
                inb,
                Inbound::Upgrade {
                    target: target.clone(),
                    protocol: p.clone(),
                    method: orig_method.clone(),
                }
            );
            assert_eq!(
                tunnel_pq.as_deref(),
                Some(expect_pq.as_str()),
                "tunnel path"
            );
        }
        StreamKind::Connect => {
            assert_eq!(tunnel.method(), Method::CONNECT);
            assert_eq!(
                inb,
                Inbound::Connect {
                    target: target.clone()
                }
            );
        }
    }

    let local = wire::local_request(tunnel, &inb, LOCAL_HOST);
    if matches!(kind, StreamKind::Connect) {
        // The edge opens a raw stream for CONNECT and never replays it; only
        // require that this does not panic.
        return;
    }
    let local = match local {
        Ok(l) => l,
        Err(e) => panic!("edge cannot replay {expect_pq:?} ({kind:?}): {e}"),
    };
    assert_eq!(local.version(), Version::HTTP_11);
    assert_eq!(local.method(), orig_method, "method not replayed");
    assert_eq!(
        local.uri().path_and_query().map(|p| p.as_str()),
        Some(expect_pq.as_str()),
        "path-and-query not preserved end to end"
    );
    assert!(
        local.uri().authority().is_none(),
        "local request is not origin-form"
    );
    let lh = local.headers();
    assert_eq!(
        values(lh, &http::header::HOST),
        [HeaderValue::from_static(LOCAL_HOST)]
    );
    assert!(!lh.contains_key(METHOD_HEADER));
    match &kind {
        StreamKind::Upgrade(p) => {
            assert_eq!(values(lh, &http::header::CONNECTION), ["Upgrade"]);
            assert_eq!(values(lh, &http::header::UPGRADE), [p.as_str()]);
        }
        _ => {
            assert!(!lh.contains_key(http::header::CONNECTION));
            assert!(!lh.contains_key(http::header::UPGRADE));
        }
    }
}

fn check_status(mut u: Unstructured<'_>) -> Result<()> {
    let code = u.int_in_range(100..=999u16)?;
    let code = StatusCode::from_u16(code).expect("100..=999 is a status code");
    let reason: &str = u.arbitrary()?;
    let message = String::from_utf8_lossy(u.take_rest());
    let message: &str = &message;
    let body = wire::status_json(code, reason, message);
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => panic!(
            "status_json is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&body)
        ),
    };
    assert_eq!(v["kind"], "Status");
    assert_eq!(v["apiVersion"], "v1");
    assert_eq!(v["status"], "Failure");
    assert_eq!(v["message"].as_str(), Some(message), "message mangled");
    assert_eq!(v["reason"].as_str(), Some(reason), "reason mangled");
    assert_eq!(v["code"].as_u64(), Some(u64::from(code.as_u16())));
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(status_first) = u.arbitrary::<bool>() else {
        return;
    };
    if status_first {
        let _ = check_status(u);
        return;
    }
    if let Ok(Some(case)) = build(&mut u) {
        check_request(case);
    }
});
