//! Prometheus HTTP service discovery (`http_sd_configs`) of connected edges.
//! Every target is the kubelet-API front itself; `__metrics_path__` uses the
//! explicit addressing of [`crate::route::EXPLICIT_PREFIX`] to reach the
//! node's kubelet (`/metrics`, `/metrics/cadvisor`, `/metrics/resource`) and
//! each allow-listed endpoint the edge announced. Prometheus authenticates
//! to the front with a client certificate like any other client.

use serde_json::{Value, json};
use tether_tunnel::SessionRegistry;

/// Kubelet metrics paths listed per node, with their `tether_target` label.
const KUBELET_PATHS: [(&str, &str); 3] = [
    ("/metrics", "kubelet"),
    ("/metrics/cadvisor", "cadvisor"),
    ("/metrics/resource", "resource"),
];

/// The target groups for every connected node: this replica's sessions and,
/// with several replicas, the nodes the others hold (their requests are
/// forwarded); `front` is the `host:port` Prometheus reaches the front at.
pub fn targets(
    registry: &SessionRegistry,
    others: Option<&dyn crate::peer::Ownership>,
    front: &str,
) -> Value {
    let mut nodes: Vec<(String, Vec<std::net::SocketAddr>)> = registry
        .sessions()
        .into_iter()
        .map(|s| (s.node, s.endpoints))
        .collect();
    if let Some(o) = others {
        for held in o.remote_nodes() {
            if !nodes.iter().any(|(n, _)| *n == held.node) {
                nodes.push((held.node, held.endpoints));
            }
        }
    }
    nodes.sort_by(|a, b| a.0.cmp(&b.0));
    let mut groups = Vec::new();
    for (node, endpoints) in nodes {
        let node = &node;
        for (path, kind) in KUBELET_PATHS {
            groups.push(json!({
                "targets": [front],
                "labels": {
                    "__metrics_path__": format!("{}{node}/kubelet{path}", crate::route::EXPLICIT_PREFIX),
                    "node": node,
                    "tether_target": kind,
                },
            }));
        }
        for ep in &endpoints {
            groups.push(json!({
                "targets": [front],
                "labels": {
                    "__metrics_path__": format!("{}{node}/endpoints/{ep}/metrics", crate::route::EXPLICIT_PREFIX),
                    "node": node,
                    "tether_target": "endpoint",
                    "endpoint": ep.to_string(),
                },
            }));
        }
    }
    Value::Array(groups)
}
