//! The upgrade request on the shared tunnel port: read (bounded) before the
//! path decides between `tether.v1` and KubeEdge, parsed for the KubeEdge
//! headers, and replayed into tungstenite for `tether.v1` (ADR 0017).

use tokio::io::AsyncReadExt;

use super::{HOSTNAME_HEADER, INTERNAL_IP_HEADER, KUBEEDGE_PATH};
use crate::AcceptError;

/// Largest upgrade request head read before dispatching on the path.
pub(crate) const MAX_HEAD: usize = 16 << 10;

/// Reads until the end of the request head (`\r\n\r\n`), bounded; the
/// result may hold bytes past it.
pub(crate) async fn read_head<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> Result<Vec<u8>, AcceptError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| AcceptError::Request(e.to_string()))?;
        if n == 0 {
            return Err(AcceptError::Request(
                "connection closed before the request head".into(),
            ));
        }
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if buf[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(buf);
        }
        if buf.len() > MAX_HEAD {
            return Err(AcceptError::Request(format!(
                "request head over {MAX_HEAD} bytes"
            )));
        }
    }
}

pub(crate) fn is_kubeedge_path(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 0];
    let mut req = httparse::Request::new(&mut headers);
    // Too few header slots is fine: the request line is parsed first.
    let _ = req.parse(head);
    req.path.is_some_and(|p| {
        let path = p.split('?').next().unwrap_or_default();
        path.trim_end_matches('/') == KUBEEDGE_PATH
    })
}

/// What the KubeEdge upgrade request says.
pub(crate) struct UpgradeHead {
    pub(crate) websocket: bool,
    pub(crate) ws_key: Option<String>,
    pub(crate) hostname: Option<String>,
    pub(crate) internal_ip: Option<String>,
    /// Bytes after the head (the first frames, if the edge was quick).
    pub(crate) rest: Vec<u8>,
}

pub(crate) fn parse_head(head: &[u8]) -> Result<UpgradeHead, AcceptError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(head) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(AcceptError::Request("incomplete request head".into()));
        }
        Err(e) => return Err(AcceptError::Request(e.to_string())),
    };
    let get = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::to_owned)
    };
    let has_token = |name: &str, token: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let websocket = req.method == Some("GET")
        && has_token("upgrade", "websocket")
        && has_token("connection", "upgrade")
        && get("sec-websocket-version").as_deref().map(str::trim) == Some("13");
    Ok(UpgradeHead {
        websocket,
        ws_key: get("sec-websocket-key").map(|k| k.trim().to_owned()),
        hostname: get(HOSTNAME_HEADER),
        internal_ip: get(INTERNAL_IP_HEADER),
        rest: head[len..].to_vec(),
    })
}

/// A stream that first replays bytes already read from it.
pub(crate) struct Replay<S> {
    pub(crate) inner: S,
    replay: Vec<u8>,
    at: usize,
}

impl<S> Replay<S> {
    pub(crate) fn new(inner: S, replay: Vec<u8>) -> Self {
        Self {
            inner,
            replay,
            at: 0,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Replay<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.at < self.replay.len() {
            let n = (self.replay.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.replay[at..at + n]);
            self.at += n;
            if self.at == self.replay.len() {
                self.replay = Vec::new();
                self.at = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn path_dispatch_tolerates_a_trailing_slash_and_a_query() {
        for (head, want) in [
            (
                &b"GET /v1/kubeedge/connect HTTP/1.1\r\nHost: x\r\n\r\n"[..],
                true,
            ),
            (b"GET /v1/kubeedge/connect/ HTTP/1.1\r\n\r\n", true),
            (b"GET /v1/kubeedge/connect?x=1 HTTP/1.1\r\n\r\n", true),
            (b"GET /v1/tunnel HTTP/1.1\r\n\r\n", false),
            (b"GET /v1/kubeedge/connectx HTTP/1.1\r\n\r\n", false),
            (b"garbage\r\n\r\n", false),
        ] {
            assert_eq!(
                is_kubeedge_path(head),
                want,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn upgrade_head_reads_the_edge_headers_case_insensitively() {
        let head = b"GET /v1/kubeedge/connect HTTP/1.1\r\nHost: c:10004\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Key: abc==\r\nSec-WebSocket-Version: 13\r\n\
            Sessionhostnameoverride: edge-1\r\nSessioninternalip: 10.0.0.5\r\n\r\n\x81\x80";
        let h = parse_head(head).unwrap();
        assert!(h.websocket);
        assert_eq!(h.ws_key.as_deref(), Some("abc=="));
        assert_eq!(h.hostname.as_deref(), Some("edge-1"));
        assert_eq!(h.internal_ip.as_deref(), Some("10.0.0.5"));
        assert_eq!(h.rest, b"\x81\x80");
        let plain = parse_head(b"GET /v1/kubeedge/connect HTTP/1.1\r\nHost: c\r\n\r\n").unwrap();
        assert!(!plain.websocket);
    }

    #[tokio::test]
    async fn replay_hands_out_the_bytes_already_read_first() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut r = Replay::new(b, b"hello".to_vec());
        let mut all = String::new();
        r.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }
}
