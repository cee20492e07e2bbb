//! `tether edge status`: a running agent's own view, from its admin
//! endpoint's `/status`: tunnel state, last error, hub queue, certificate.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::admin_client::{get_json, human};

/// Output formats of `tether edge status`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum Output {
    /// The admin endpoint's JSON document, pretty-printed.
    Json,
}

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The agent's admin endpoint.
    #[arg(long, default_value = "http://127.0.0.1:10006")]
    admin: String,
    /// Output format: plain text by default, or `json` (the `/status`
    /// document, see the operator guide).
    #[arg(short = 'o', long = "output", value_enum)]
    output: Option<Output>,
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let doc = get_json("edge", &a.admin, "/status").await?;
    match a.output {
        Some(Output::Json) => println!("{}", serde_json::to_string_pretty(&doc)?),
        None => print!("{}", render(&doc)),
    }
    Ok(())
}

/// `when` (Unix seconds) relative to `now`: `12s ago`, `in 3d4h`.
fn relative(when: i64, now: i64) -> String {
    if when <= now {
        format!("{} ago", human((now - when) as u64))
    } else {
        format!("in {}", human((when - now) as u64))
    }
}

fn render(doc: &Value) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let at = |v: &Value| v.as_i64().map(|t| relative(t, now));
    let t = &doc["tunnel"];
    let state = t["state"].as_str().unwrap_or("unknown");
    let mut lines = vec![
        ("Node", doc["node"].as_str().unwrap_or("?").to_owned()),
        ("Cloud", doc["cloud"].as_str().unwrap_or("?").to_owned()),
    ];
    let described = match state {
        "connected" => match at(&t["connected_since"]) {
            Some(s) => format!("connected (since {s})"),
            None => "connected".into(),
        },
        "backoff" => match at(&t["retry_at"]) {
            Some(s) => format!("not connected: backing off, next dial {s}"),
            None => "not connected: backing off".into(),
        },
        "connecting" => "not connected: connecting".into(),
        other => other.to_owned(),
    };
    lines.push(("Tunnel", described));
    lines.push((
        "Last error",
        match &t["last_error"] {
            Value::Object(e) => format!(
                "{} ({})",
                e.get("message").and_then(Value::as_str).unwrap_or("?"),
                e.get("at").and_then(&at).unwrap_or_default()
            ),
            _ => "<none>".into(),
        },
    ));
    let hub = &doc["hub"];
    lines.push((
        "Hub",
        if hub["enabled"].as_bool() == Some(true) {
            format!(
                "{}, {} message(s) queued for the cloud",
                if hub["connected"].as_bool() == Some(true) {
                    "connected"
                } else {
                    "not connected"
                },
                hub["queue_depth"].as_i64().unwrap_or(0)
            )
        } else {
            "off".into()
        },
    ));
    let c = &doc["certificate"];
    let cert = match (c["not_after"].as_i64(), c["error"].as_str()) {
        (_, Some(e)) => format!("unreadable: {e}"),
        (Some(t), None) if t <= now => format!(
            "serial {}, EXPIRED {}",
            c["serial"].as_str().unwrap_or("?"),
            relative(t, now)
        ),
        (Some(t), None) => format!(
            "serial {}, expires {}",
            c["serial"].as_str().unwrap_or("?"),
            relative(t, now)
        ),
        (None, None) => "<unknown>".into(),
    };
    lines.push(("Certificate", cert));
    lines.push((
        "Next renewal",
        match (c["source"].as_str(), at(&c["next_renewal"])) {
            (_, Some(s)) => s,
            (Some("files"), None) => "not managed here (certificate files from the config)".into(),
            _ => "<not scheduled>".into(),
        },
    ));
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    lines
        .into_iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_shows_not_connected_and_the_error() {
        let doc = serde_json::json!({
            "version": 1, "node": "edge-1", "cloud": "127.0.0.1:1",
            "tunnel": {"state": "backoff", "since": 0, "connected_since": null, "retry_at": null,
                       "connects": 0, "last_error": {"message": "connection refused", "at": 0}},
            "hub": {"enabled": false},
            "certificate": {"source": "files", "serial": "a1", "not_after": 4102444800_i64, "next_renewal": null, "error": null},
        });
        let text = render(&doc);
        assert!(
            text.contains("Tunnel:       not connected: backing off"),
            "{text}"
        );
        assert!(text.contains("Last error:   connection refused"), "{text}");
        assert!(text.contains("not managed here"), "{text}");
    }
}
