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

/// The target groups for every connected node; `front` is the `host:port`
/// Prometheus reaches the front at.
pub fn targets(registry: &SessionRegistry, front: &str) -> Value {
    let mut sessions = registry.sessions();
    sessions.sort_by(|a, b| a.node.cmp(&b.node));
    let mut groups = Vec::new();
    for s in sessions {
        let node = &s.node;
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
        for ep in &s.endpoints {
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
