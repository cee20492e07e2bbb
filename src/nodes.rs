//! `tether nodes`: the edges a cloud holds, from its admin endpoint's
//! `/nodes`, as a table like `kubectl get nodes`, or the document itself.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::admin_client::{get_json, human, table};

/// Output formats of the read commands.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum Output {
    /// More columns.
    Wide,
    /// The admin endpoint's JSON document, pretty-printed.
    Json,
}

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The cloud's admin endpoint (a remote cloud's admin port is fine).
    #[arg(long, default_value = "http://127.0.0.1:10005")]
    admin: String,
    /// Output format: the default table, `wide` (replica, peer address,
    /// node IPs, session kind: `tether` or `kubeedge`) or `json` (the `/nodes` document, see the operator guide).
    #[arg(short = 'o', long = "output", value_enum)]
    output: Option<Output>,
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let doc = get_json("cloud", &a.admin, "/nodes").await?;
    match a.output {
        Some(Output::Json) => println!("{}", serde_json::to_string_pretty(&doc)?),
        wide => print!("{}", render(&doc, matches!(wide, Some(Output::Wide)))?),
    }
    Ok(())
}

/// The table; `<unknown>` for what only the holding replica knows,
/// `<none>` for what does not exist.
fn render(doc: &Value, wide: bool) -> anyhow::Result<String> {
    let nodes = doc["nodes"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("the /nodes answer has no `nodes` list"))?;
    if nodes.is_empty() {
        return Ok("No edge nodes connected.\n".into());
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut header = vec!["NODE", "ADDRESS", "AGE", "RTT", "STREAMS", "CERT-EXPIRES"];
    if wide {
        header.extend(["REPLICA", "PEER", "IPS", "KIND"]);
    }
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    for n in nodes {
        let local = n["local"].as_bool().unwrap_or(false);
        let unknown = || "<unknown>".to_owned();
        let ips: Vec<&str> = n["ips"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let address = ips.first().map_or("<none>".to_owned(), |s| s.to_string());
        let age = n["age_seconds"].as_u64().map_or_else(unknown, human);
        let rtt = match n["rtt_ms"].as_f64() {
            Some(ms) if ms < 10.0 => format!("{ms:.2}ms"),
            Some(ms) => format!("{ms:.0}ms"),
            None if local => "<pending>".into(),
            None => unknown(),
        };
        let streams = n["open_streams"]
            .as_u64()
            .map_or_else(unknown, |s| s.to_string());
        let expires = match n["certificate"]["not_after"].as_i64() {
            Some(t) if t <= now => "expired".into(),
            Some(t) => human((t - now) as u64),
            None => unknown(),
        };
        let mut row = vec![
            n["node"].as_str().unwrap_or("?").to_owned(),
            address,
            age,
            rtt,
            streams,
            expires,
        ];
        if wide {
            row.push(n["replica"].as_str().unwrap_or("<none>").to_owned());
            row.push(n["peer"].as_str().map_or_else(unknown, str::to_owned));
            row.push(if ips.is_empty() {
                "<none>".into()
            } else {
                ips.join(",")
            });
            row.push(n["kind"].as_str().map_or_else(unknown, str::to_owned));
        }
        rows.push(row);
    }
    Ok(table(&rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_and_remote_rows() {
        let doc = serde_json::json!({
            "version": 1,
            "replica": "cloud-a",
            "nodes": [
                {"node": "edge-1", "local": true, "replica": "cloud-a", "peer": "10.0.0.9:40000",
                 "ips": ["10.1.0.1"], "kind": "kubeedge", "age_seconds": 65, "open_streams": 2, "rtt_ms": 0.4,
                 "certificate": {"serial": "1f", "not_after": 0}},
                {"node": "edge-2", "local": false, "replica": "cloud-b", "peer": null,
                 "ips": [], "age_seconds": null, "open_streams": null, "rtt_ms": null,
                 "certificate": null},
            ],
        });
        let t = render(&doc, true).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NODE "), "{t}");
        let one: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            one,
            [
                "edge-1",
                "10.1.0.1",
                "65s",
                "0.40ms",
                "2",
                "expired",
                "cloud-a",
                "10.0.0.9:40000",
                "10.1.0.1",
                "kubeedge"
            ]
        );
        let two: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            two,
            [
                "edge-2",
                "<none>",
                "<unknown>",
                "<unknown>",
                "<unknown>",
                "<unknown>",
                "cloud-b",
                "<unknown>",
                "<none>",
                "<unknown>"
            ]
        );
    }
}
