//! Finding the node a front request is meant for, from what the request and
//! its connection carry: the original destination of a DNAT'd connection,
//! the Host header (node IP or name), the apiserver's node-proxy path in
//! `X-Forwarded-Uri`, and (cluster mode) the pod a kubelet path names.
//! Parsing here is pure and fuzzed.

use std::net::{IpAddr, SocketAddr};

/// A way to name a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKey {
    /// A node address (matched against certificate IP SANs).
    Ip(IpAddr),
    /// A node name.
    Name(String),
}

impl std::fmt::Display for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Name(n) => f.write_str(n),
        }
    }
}

pub use tether_pki::valid_node_name;

/// The node a Host header value names, if any: `ip`, `ip:port`, `[v6]:port`,
/// `name` or `name:port`.
pub fn host_key(host: &str) -> Option<NodeKey> {
    let host = host.trim();
    if let Ok(sa) = host.parse::<SocketAddr>() {
        return Some(NodeKey::Ip(sa.ip()));
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Some(NodeKey::Ip(ip));
    }
    let name = match host.rsplit_once(':') {
        Some((n, port)) if is_port(port) => n,
        Some(_) => return None,
        None => host,
    };
    let name = name.to_ascii_lowercase();
    valid_node_name(&name).then_some(NodeKey::Name(name))
}

/// A decimal port. Digits only: `u16::from_str` also takes a leading `+`, and
/// `10.0.0.5:+1` then read as the node name `10.0.0.5` instead of an address.
fn is_port(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u16>().is_ok()
}

/// The node named by an apiserver node-proxy path:
/// `/api/v1/nodes/<name>[:port]/proxy/...`.
pub fn forwarded_uri_node(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("/api/v1/nodes/")?;
    let (segment, tail) = rest.split_once('/')?;
    if !(tail == "proxy" || tail.starts_with("proxy/") || tail.starts_with("proxy?")) {
        return None;
    }
    let name = match segment.split_once(':') {
        Some((n, port)) if is_port(port) || port.is_empty() => n,
        Some(_) => return None,
        None => segment,
    };
    valid_node_name(name).then(|| name.to_owned())
}

/// The `(namespace, pod)` a pod-scoped kubelet path names:
/// `/containerLogs/<ns>/<pod>/...`, `/exec|attach|run/<ns>/<pod>/...` and
/// `/portForward/<ns>/<pod>`. Both must be valid Kubernetes names, so a
/// crafted path never reaches the pod cache as anything else.
pub fn pod_path(path: &str) -> Option<(&str, &str)> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let mut segments = path.strip_prefix('/')?.split('/');
    let verb = segments.next()?;
    if !matches!(
        verb,
        "containerLogs" | "exec" | "attach" | "run" | "portForward"
    ) {
        return None;
    }
    let (ns, pod) = (segments.next()?, segments.next()?);
    (valid_node_name(ns) && valid_node_name(pod)).then_some((ns, pod))
}

/// Prefix of Tether's explicit addressing, used by Prometheus service
/// discovery: `/tether/v1/nodes/<node>/kubelet/<path>` reaches the node's
/// kubelet, `/tether/v1/nodes/<node>/endpoints/<ip:port>/<path>` one of its
/// allow-listed local endpoints.
pub const EXPLICIT_PREFIX: &str = "/tether/v1/nodes/";

/// Where an explicitly addressed request goes on the edge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExplicitTarget {
    /// The kubelet.
    Kubelet,
    /// An allow-listed endpoint.
    Endpoint(SocketAddr),
}

/// Parses an explicit path into (node, target, the path to request there).
pub fn explicit_path(path: &str) -> Option<(String, ExplicitTarget, String)> {
    let rest = path.strip_prefix(EXPLICIT_PREFIX)?;
    let (node, rest) = rest.split_once('/')?;
    if !valid_node_name(node) {
        return None;
    }
    let (target, rest) = if let Some(r) = rest.strip_prefix("kubelet") {
        (ExplicitTarget::Kubelet, r)
    } else {
        let r = rest.strip_prefix("endpoints/")?;
        let (addr, r) = r.split_once('/').unwrap_or((r, ""));
        let r = if r.is_empty() {
            ""
        } else {
            &rest[rest.len() - r.len() - 1..]
        };
        (ExplicitTarget::Endpoint(addr.parse().ok()?), r)
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let rest = if rest.is_empty() { "/" } else { rest };
    Some((node.to_owned(), target, rest.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `route` fuzz target (issue 11, fault suite): a `+` port
    /// made an address a node name.
    #[test]
    fn fuzz_r1_signed_port_is_not_a_port() {
        assert_eq!(host_key("3.1.3.1:+2"), None);
        assert_eq!(host_key("edge-1:+10250"), None);
        assert_eq!(forwarded_uri_node("/api/v1/nodes/edge-1:+1/proxy"), None);
        assert_eq!(
            host_key("edge-1:10250"),
            Some(NodeKey::Name("edge-1".into()))
        );
    }

    #[test]
    fn hosts() {
        assert_eq!(
            host_key("10.0.0.5:10250"),
            Some(NodeKey::Ip("10.0.0.5".parse().unwrap()))
        );
        assert_eq!(
            host_key("10.0.0.5"),
            Some(NodeKey::Ip("10.0.0.5".parse().unwrap()))
        );
        assert_eq!(
            host_key("[fd00::5]:10250"),
            Some(NodeKey::Ip("fd00::5".parse().unwrap()))
        );
        assert_eq!(
            host_key("fd00::5"),
            Some(NodeKey::Ip("fd00::5".parse().unwrap()))
        );
        assert_eq!(
            host_key("Edge-1:10250"),
            Some(NodeKey::Name("edge-1".into()))
        );
        assert_eq!(host_key("edge-1"), Some(NodeKey::Name("edge-1".into())));
        assert_eq!(host_key("edge_1"), None);
        assert_eq!(host_key("edge:port"), None);
        assert_eq!(host_key(""), None);
    }

    #[test]
    fn explicit_paths() {
        assert_eq!(
            explicit_path("/tether/v1/nodes/edge-1/kubelet/metrics/cadvisor"),
            Some((
                "edge-1".into(),
                ExplicitTarget::Kubelet,
                "/metrics/cadvisor".into()
            ))
        );
        assert_eq!(
            explicit_path("/tether/v1/nodes/edge-1/kubelet"),
            Some(("edge-1".into(), ExplicitTarget::Kubelet, "/".into()))
        );
        assert_eq!(
            explicit_path("/tether/v1/nodes/edge-1/endpoints/127.0.0.1:9100/metrics"),
            Some((
                "edge-1".into(),
                ExplicitTarget::Endpoint("127.0.0.1:9100".parse().unwrap()),
                "/metrics".into()
            ))
        );
        assert_eq!(explicit_path("/tether/v1/nodes/edge-1/kubeletx"), None);
        assert_eq!(explicit_path("/tether/v1/nodes/Edge/kubelet/"), None);
        assert_eq!(
            explicit_path("/tether/v1/nodes/edge-1/endpoints/nope/metrics"),
            None
        );
        assert_eq!(explicit_path("/metrics"), None);
    }

    #[test]
    fn pod_paths() {
        assert_eq!(
            pod_path("/containerLogs/default/web-0/app?follow=true"),
            Some(("default", "web-0"))
        );
        assert_eq!(
            pod_path("/exec/kube-system/dns/uid/c?command=sh"),
            Some(("kube-system", "dns"))
        );
        assert_eq!(pod_path("/attach/ns/p/c"), Some(("ns", "p")));
        assert_eq!(pod_path("/run/ns/p/c"), Some(("ns", "p")));
        assert_eq!(pod_path("/portForward/ns/p"), Some(("ns", "p")));
        assert_eq!(pod_path("/portForward/ns"), None);
        assert_eq!(pod_path("/portForward/ns/"), None);
        assert_eq!(pod_path("/containerLogs/NS/p/c"), None);
        assert_eq!(pod_path("/containerLogs/../p/c"), None);
        assert_eq!(pod_path("/metrics/cadvisor"), None);
        assert_eq!(pod_path("/stats/summary"), None);
        assert_eq!(pod_path("containerLogs/ns/p/c"), None);
    }

    #[test]
    fn forwarded_uris() {
        assert_eq!(
            forwarded_uri_node("/api/v1/nodes/edge-1/proxy/metrics"),
            Some("edge-1".into())
        );
        assert_eq!(
            forwarded_uri_node("/api/v1/nodes/edge-1:10250/proxy/stats/summary"),
            Some("edge-1".into())
        );
        assert_eq!(
            forwarded_uri_node("/api/v1/nodes/edge-1/proxy"),
            Some("edge-1".into())
        );
        assert_eq!(forwarded_uri_node("/api/v1/nodes/edge-1/status"), None);
        assert_eq!(forwarded_uri_node("/api/v1/nodes/../proxy/x"), None);
        assert_eq!(forwarded_uri_node("/api/v1/pods"), None);
    }
}
