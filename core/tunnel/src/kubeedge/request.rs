//! The `EXEC_CONNECT` JSON for a front request: Go's `net/url.URL` and
//! `http.Header` as KubeEdge's edge decodes them (docs/kubeedge-compat.md,
//! section 2).

use http::{HeaderMap, HeaderValue, Request, header};
use serde::Serialize;

use crate::wire::{self, StreamKind};

/// Go's `net/url.URL` as KubeEdge's JSON carries it (ADR 0017).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct GoUrl<'a> {
    pub(super) scheme: &'static str,
    pub(super) host: &'a str,
    pub(super) path: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub(super) raw_path: &'a str,
    pub(super) raw_query: &'a str,
}

#[derive(Serialize)]
pub(super) struct ConnectJson<'a> {
    #[serde(rename = "MessID")]
    pub(super) mess_id: u64,
    pub(super) url: GoUrl<'a>,
    pub(super) header: std::collections::BTreeMap<String, Vec<&'a str>>,
    pub(super) method: &'a str,
}

/// The EXEC_CONNECT payload for a request (docs/kubeedge-compat.md, 2).
pub(super) fn connect_json<B>(
    id: u64,
    req: &Request<B>,
    kind: &StreamKind,
    kubelet: &str,
) -> Result<Vec<u8>, String> {
    let raw = req.uri().path();
    let path = percent_decode(raw).ok_or("the path is not valid percent-encoded UTF-8")?;
    let mut headers: HeaderMap = req.headers().clone();
    wire::strip_hop_by_hop(&mut headers);
    // Go's Request.Write adds these itself or must never see them.
    for h in [header::CONTENT_LENGTH, header::HOST] {
        headers.remove(h);
    }
    match kind {
        StreamKind::Upgrade(p) => {
            headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            headers.insert(
                header::UPGRADE,
                HeaderValue::from_str(p).map_err(|_| "invalid Upgrade header")?,
            );
        }
        // One request per edge connection: the kubelet's close ends it.
        _ => {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    let mut map: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
    for (name, value) in &headers {
        let v = value
            .to_str()
            .map_err(|_| format!("header {name} is not visible ASCII"))?;
        map.entry(canonical_key(name.as_str())).or_default().push(v);
    }
    let json = ConnectJson {
        mess_id: id,
        url: GoUrl {
            scheme: "http",
            host: kubelet,
            path,
            raw_path: if raw.contains('%') { raw } else { "" },
            raw_query: req.uri().query().unwrap_or(""),
        },
        header: map,
        method: req.method().as_str(),
    };
    serde_json::to_vec(&json).map_err(|e| e.to_string())
}

/// Go's canonical MIME header key: `x-stream-protocol-version` ->
/// `X-Stream-Protocol-Version`, so Go's `Request.Write` recognises the
/// headers it handles itself (`User-Agent`).
pub(super) fn canonical_key(name: &str) -> String {
    let mut up = true;
    name.chars()
        .map(|c| {
            let out = if up {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            up = c == '-';
            out
        })
        .collect()
}

pub(super) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
