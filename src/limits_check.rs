//! Range checks of every numeric limit in the role configurations, each
//! refused with the field's full path and the range that works, and the
//! field path of a YAML type error (serde-saphyr names only the line).

use std::time::Duration;

use anyhow::bail;
#[cfg(feature = "cloud")]
use tether_cloudstream::FrontLimits;
use tether_tunnel::TunnelLimits;

/// `config field `<field>` must be within <range> (got <v>)` unless `ok`.
fn within<T: std::fmt::Display>(ok: bool, field: &str, range: &str, v: T) -> anyhow::Result<()> {
    if !ok {
        bail!("config field `{field}` must be within {range} (got {v})");
    }
    Ok(())
}

fn secs(d: Duration, lo: f64, hi: f64, field: &str) -> anyhow::Result<()> {
    let v = d.as_secs_f64();
    within(
        (lo..=hi).contains(&v),
        field,
        &format!("{lo}..={hi} seconds"),
        v,
    )
}

/// The tunnel limits (`limits.*`), both roles.
pub(crate) fn tunnel(l: &TunnelLimits) -> anyhow::Result<()> {
    let f = |name: &str| format!("limits.{name}");
    within(
        (1..=65_536).contains(&l.max_streams),
        &f("max_streams"),
        "1..=65536",
        l.max_streams,
    )?;
    within(
        (65_535..=i32::MAX as u32).contains(&l.stream_window),
        &f("stream_window"),
        "65535..=2147483647",
        l.stream_window,
    )?;
    // Each stream's share of the budget's receive half must be a whole h2
    // window (ADR 0015); the library check below says so with numbers.
    within(
        (128 << 10..=i32::MAX as u32).contains(&l.session_budget),
        &f("session_budget"),
        "131072..=2147483647, and at least limits.max_streams * 131072",
        l.session_budget,
    )?;
    within(
        (16_384..=16_777_215).contains(&l.max_frame_size),
        &f("max_frame_size"),
        "16384..=16777215",
        l.max_frame_size,
    )?;
    within(
        (1024..=16 << 20).contains(&l.max_header_list_size),
        &f("max_header_list_size"),
        "1024..=16777216",
        l.max_header_list_size,
    )?;
    within(
        (16 << 10..=256 << 20).contains(&l.max_send_buf),
        &f("max_send_buf"),
        "16384..=268435456",
        l.max_send_buf,
    )?;
    within(
        (1024..=64 << 20).contains(&l.ws_max_incoming),
        &f("ws_max_incoming"),
        "1024..=67108864",
        l.ws_max_incoming,
    )?;
    within(
        (1024..=l.ws_max_incoming).contains(&l.ws_message_size),
        &f("ws_message_size"),
        "1024..=limits.ws_max_incoming",
        l.ws_message_size,
    )?;
    secs(l.keepalive_interval, 0.05, 3600.0, &f("keepalive_interval"))?;
    secs(l.keepalive_timeout, 0.05, 3600.0, &f("keepalive_timeout"))?;
    secs(l.handshake_timeout, 0.1, 300.0, &f("handshake_timeout"))?;
    within(
        l.reconnect_rate <= 1_000_000,
        &f("reconnect_rate"),
        "0..=1000000 (0: no pacing)",
        l.reconnect_rate,
    )?;
    within(
        l.reconnect_burst <= 10_000_000,
        &f("reconnect_burst"),
        "0..=10000000",
        l.reconnect_burst,
    )?;
    // The library's own check, in case it knows more.
    l.validate()
        .map_err(|e| anyhow::anyhow!("config field `limits`: {e}"))
}

/// The front limits (`front_limits.*`).
#[cfg(feature = "cloud")]
pub(crate) fn front(l: &FrontLimits) -> anyhow::Result<()> {
    within(
        (1..=1_000_000).contains(&l.max_connections),
        "front_limits.max_connections",
        "1..=1000000",
        l.max_connections,
    )?;
    within(
        (1024..=16 << 20).contains(&l.max_header_bytes),
        "front_limits.max_header_bytes",
        "1024..=16777216",
        l.max_header_bytes,
    )?;
    within(
        (1..=3600).contains(&l.header_timeout_secs),
        "front_limits.header_timeout_secs",
        "1..=3600",
        l.header_timeout_secs,
    )
}

/// A drain deadline (`drain_timeout_secs`).
pub(crate) fn drain(v: u64) -> anyhow::Result<()> {
    within(v <= 3600, "drain_timeout_secs", "0..=3600", v)
}

/// The hub's fields beyond what `HubConfig::channel` checks.
pub(crate) fn hub(h: &crate::config::HubConfig) -> anyhow::Result<()> {
    within(
        (1024..=64 << 20).contains(&h.max_message_bytes),
        "hub.max_message_bytes",
        "1024..=67108864",
        h.max_message_bytes,
    )?;
    within(
        (1..=1_000_000).contains(&h.queue_capacity),
        "hub.queue_capacity",
        "1..=1000000",
        h.queue_capacity,
    )?;
    within(
        (1..=1000).contains(&h.max_attempts),
        "hub.max_attempts",
        "1..=1000",
        h.max_attempts,
    )?;
    within(
        h.rate_qps.is_finite() && (0.0..=1e6).contains(&h.rate_qps),
        "hub.rate_qps",
        "0..=1000000 (0 = unlimited)",
        h.rate_qps,
    )?;
    within(
        h.rate_burst.is_finite() && (0.0..=1e6).contains(&h.rate_burst),
        "hub.rate_burst",
        "0..=1000000",
        h.rate_burst,
    )?;
    for (v, name) in [
        (h.ack_timeout_secs, "hub.ack_timeout_secs"),
        (h.keepalive_interval_secs, "hub.keepalive_interval_secs"),
        (h.keepalive_timeout_secs, "hub.keepalive_timeout_secs"),
    ] {
        within(
            v.is_finite() && (0.05..=3600.0).contains(&v),
            name,
            "0.05..=3600 seconds",
            v,
        )?;
    }
    h.channel().map(|_| ())
}

/// The dotted path of the YAML key on `line` (1-based), from indentation:
/// good enough for block-style configuration files, which is what we ship.
pub(crate) fn yaml_path(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let key_of = |l: &str| -> Option<(usize, String)> {
        let body = l.trim_start();
        let indent = l.len() - body.len();
        let body = body.strip_prefix("- ").unwrap_or(body);
        let (key, _) = body.split_once(':')?;
        let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
        (!key.is_empty() && !key.starts_with('#') && !key.contains(' '))
            .then(|| (indent, key.to_owned()))
    };
    let (mut indent, key) = key_of(lines.get(line.checked_sub(1)?)?)?;
    let mut path = vec![key];
    for l in lines[..line - 1].iter().rev() {
        if indent == 0 {
            break;
        }
        if let Some((i, k)) = key_of(l)
            && i < indent
        {
            path.push(k);
            indent = i;
        }
    }
    path.reverse();
    Some(path.join("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_path_follows_indentation() {
        let text = "a: 1\nfront_limits:\n  # note\n  x: 2\n  max_connections: lots\nb: 3\n";
        assert_eq!(
            yaml_path(text, 5).as_deref(),
            Some("front_limits.max_connections")
        );
        assert_eq!(yaml_path(text, 1).as_deref(), Some("a"));
        assert_eq!(yaml_path(text, 9), None);
    }
}
