//! The cloud's list of edge nodes for operators (`GET /nodes` on the admin
//! port, read by `tether nodes`): this replica's sessions with what the
//! session knows (peer, age, open streams, the last probe round trip, the
//! certificate), and in cluster mode the nodes other replicas hold, with
//! what their ownership records say. The document is versioned; its fields
//! are listed in the operator guide and only ever added to.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tether_tunnel::SessionRegistry;

/// Version of the `/nodes` document; bumped only if a field changes meaning.
pub const NODES_VERSION: u32 = 1;

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// The `/nodes` document. `replica` is this replica's name in cluster mode
/// (`None` standalone); `others` answers for nodes other replicas hold.
pub fn document(
    registry: &SessionRegistry,
    others: Option<&dyn crate::peer::Ownership>,
    replica: Option<&str>,
) -> Value {
    let now = SystemTime::now();
    let mut nodes: Vec<Value> = registry
        .all()
        .iter()
        .map(|s| {
            let i = s.info();
            json!({
                "node": i.node,
                "kind": i.kind.label(),
                "local": true,
                "replica": replica,
                "peer": i.peer.to_string(),
                "ips": i.ips,
                "connected_at": unix(i.connected_at),
                "age_seconds": now.duration_since(i.connected_at).map(|d| d.as_secs()).unwrap_or(0),
                "open_streams": s.open_streams(),
                "rtt_ms": s.last_rtt().map(|d| d.as_secs_f64() * 1000.0),
                "certificate": {
                    "serial": i.identity.serial,
                    "not_after": i.identity.not_after,
                },
                "endpoints": i.endpoints,
            })
        })
        .collect();
    if let Some(o) = others {
        for held in o.remote_nodes() {
            if nodes.iter().any(|n| n["node"] == held.node.as_str()) {
                continue;
            }
            // Another replica's session: its record names the holder and
            // the addresses; the live figures are on that replica.
            nodes.push(json!({
                "node": held.node,
                "local": false,
                "replica": held.replica,
                "peer": null,
                "ips": held.ips,
                "connected_at": null,
                "age_seconds": null,
                "open_streams": null,
                "rtt_ms": null,
                "certificate": null,
                "endpoints": held.endpoints,
            }));
        }
    }
    nodes.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
    json!({
        "version": NODES_VERSION,
        "replica": replica,
        "generated_at": unix(now),
        "nodes": nodes,
    })
}
