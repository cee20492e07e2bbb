//! Fuzzes the pure node-routing parsers of the kubelet-API front:
//! `host_key` (Host header / original destination) and `forwarded_uri_node`
//! (the apiserver's node-proxy path in `X-Forwarded-Uri`).
//!
//! Invariants (beyond "no panic"):
//! - a `NodeKey::Name` from `host_key` and any name from
//!   `forwarded_uri_node` is a valid RFC 1123 node name;
//! - `host_key` is idempotent on names: `host_key(name)` of a returned name
//!   returns that same name; with a port appended it still does;
//! - a forwarded name is the exact segment after `/api/v1/nodes/` (minus an
//!   optional `:port`) and the path continues with `/proxy`;
//! - `pod_path` returns valid names that are the second and third segments.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_cloudstream::route::{NodeKey, forwarded_uri_node, host_key, pod_path, valid_node_name};

fn check_host(s: &str) {
    match host_key(s) {
        Some(NodeKey::Name(n)) => {
            assert!(
                valid_node_name(&n),
                "host_key({s:?}) gave invalid name {n:?}"
            );
            assert_eq!(
                host_key(&n),
                Some(NodeKey::Name(n.clone())),
                "host_key not idempotent on {n:?} (from {s:?})"
            );
            assert_eq!(
                host_key(&format!("{n}:10250")),
                Some(NodeKey::Name(n.clone())),
                "host_key({n:?}:10250) differs (from {s:?})"
            );
            // The name is the host part, lowercased.
            assert!(
                s.to_ascii_lowercase().contains(n.as_str()),
                "host_key({s:?}) gave {n:?}, not part of the input"
            );
        }
        Some(NodeKey::Ip(ip)) => {
            // An address renders back to something host_key maps to itself.
            let shown = NodeKey::Ip(ip).to_string();
            assert_eq!(
                host_key(&shown),
                Some(NodeKey::Ip(ip)),
                "ip {shown:?} from {s:?}"
            );
        }
        None => {}
    }
}

fn check_forwarded(s: &str) {
    if let Some(n) = forwarded_uri_node(s) {
        assert!(
            valid_node_name(&n),
            "forwarded_uri_node({s:?}) gave invalid name {n:?}"
        );
        let rest = s
            .strip_prefix("/api/v1/nodes/")
            .expect("a forwarded name needs the node-proxy prefix");
        let rest = rest
            .strip_prefix(n.as_str())
            .expect("name is the next segment");
        let rest = match rest.strip_prefix(':') {
            Some(r) => {
                let (port, r) = r.split_once('/').expect("a segment ends with /");
                assert!(
                    port.is_empty()
                        || (port.bytes().all(|b| b.is_ascii_digit())
                            && port.parse::<u16>().is_ok()),
                    "port {port:?} in {s:?}"
                );
                r
            }
            None => rest
                .strip_prefix('/')
                .expect("segment ends right after the name"),
        };
        assert!(
            rest == "proxy" || rest.starts_with("proxy/") || rest.starts_with("proxy?"),
            "forwarded_uri_node({s:?}) accepted a non-proxy path"
        );
    }
}

fn check_pod_path(s: &str) {
    if let Some((ns, pod)) = pod_path(s) {
        assert!(valid_node_name(ns) && valid_node_name(pod), "{s:?}");
        let segs: Vec<&str> = s.split('?').next().unwrap().split('/').collect();
        assert_eq!((segs[2], segs[3]), (ns, pod), "pod_path({s:?})");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        // Headers arrive as bytes; Tether only looks at valid UTF-8 (to_str),
        // so feed the lossy form to still exercise the parsers.
        let s = String::from_utf8_lossy(data);
        check_host(&s);
        check_forwarded(&s);
        return;
    };
    check_host(s);
    check_forwarded(s);
    check_pod_path(s);
    check_pod_path(&format!("/containerLogs/{s}"));
    // The same bytes as a node-proxy path, so names reach the check often.
    let uri = format!("/api/v1/nodes/{s}");
    check_forwarded(&uri);
    check_host(&format!("[{s}]"));
});
