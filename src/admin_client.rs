//! A small HTTP/1.1 client for the admin endpoints (`tether nodes`, `tether
//! edge status`): one GET with a deadline, a bounded body, and errors that
//! name the address, so an operator sees at once which port did not answer.

use std::time::Duration;

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Deadline for connecting and for the whole answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Admin documents are small; a cloud with 20,000 nodes stays well under this.
const MAX_BODY: usize = 64 << 20;

/// `http://HOST:PORT` (or bare `HOST:PORT`) of an admin endpoint, as the
/// `host:port` to dial; anything else is refused with the reason.
pub(crate) fn authority(admin: &str) -> anyhow::Result<String> {
    let rest = match admin.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => bail!(
            "--admin {admin}: the admin endpoint speaks plain http, not {scheme} (use http://HOST:PORT)"
        ),
        None => admin,
    };
    let host_port = rest.trim_end_matches('/');
    if host_port.is_empty() || host_port.contains('/') || !host_port.contains(':') {
        bail!("--admin {admin}: expected http://HOST:PORT");
    }
    Ok(host_port.to_owned())
}

/// GETs `path` from the admin endpoint at `admin` of `role` (`cloud`,
/// `edge`) and parses the JSON answer.
pub(crate) async fn get_json(
    role: &str,
    admin: &str,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    let authority = authority(admin)?;
    let url = format!("http://{authority}{path}");
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect(&authority)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the {role}'s admin endpoint at http://{authority} \
                     (is the {role} running there? --admin names its admin_addr)"
                )
            })?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .with_context(|| format!("{url}: HTTP handshake failed"))?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, &authority)
            .body(Empty::<Bytes>::new())?;
        let resp = send
            .send_request(req)
            .await
            .with_context(|| format!("{url}: request failed"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("{url}: reading the answer failed: {e}"))?
            .to_bytes();
        if status == http::StatusCode::NOT_FOUND {
            bail!(
                "{url} answered 404: is this the right role's admin port, and a tether that serves {path}?"
            );
        }
        if !status.is_success() {
            bail!(
                "{url} answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        serde_json::from_slice(&body).with_context(|| format!("{url}: the answer is not JSON"))
    };
    tokio::time::timeout(TIMEOUT, fetch)
        .await
        .with_context(|| format!("http://{authority}{path} did not answer within {TIMEOUT:?}"))?
}

/// A duration the way `kubectl get` prints ages: `45s`, `3m12s`, `47m`,
/// `5h3m`, `20h`, `3d4h`, `364d`, `2y10d`.
pub(crate) fn human(secs: u64) -> String {
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{m}m{}s", s % 60),
        s if s < 3 * 3600 => format!("{m}m"),
        s if s < 8 * 3600 => format!("{h}h{}m", m % 60),
        s if s < 48 * 3600 => format!("{h}h"),
        s if s < 8 * 86400 => format!("{d}d{}h", h % 24),
        s if s < 2 * 365 * 86400 => format!("{d}d"),
        _ => format!("{}y{}d", d / 365, d % 365),
    }
}

#[cfg(feature = "cloud")]
/// Rows as aligned columns, three spaces apart, like `kubectl get`.
pub(crate) fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 < r.len() {
                line.push_str(&format!("{cell:<w$}   ", w = widths[c]));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human(5), "5s");
        assert_eq!(human(200), "3m20s");
        assert_eq!(human(3000), "50m");
        assert_eq!(human(5 * 3600 + 180), "5h3m");
        assert_eq!(human(20 * 3600), "20h");
        assert_eq!(human(3 * 86400 + 4 * 3600), "3d4h");
        assert_eq!(human(364 * 86400), "364d");
        assert_eq!(human(800 * 86400), "2y70d");
    }

    #[test]
    fn admin_addresses() {
        assert_eq!(
            authority("http://10.0.0.5:10005").unwrap(),
            "10.0.0.5:10005"
        );
        assert_eq!(authority("127.0.0.1:10006/").unwrap(), "127.0.0.1:10006");
        assert_eq!(authority("http://[::1]:10005").unwrap(), "[::1]:10005");
        assert!(authority("https://h:1").is_err());
        assert!(authority("http://h").is_err());
        assert!(authority("http://h:1/metrics").is_err());
    }

    #[cfg(feature = "cloud")]
    #[test]
    fn columns_align() {
        let t = table(&[
            vec!["NODE".into(), "AGE".into()],
            vec!["edge-long-name".into(), "5s".into()],
        ]);
        assert_eq!(t, "NODE             AGE\nedge-long-name   5s\n");
    }
}
