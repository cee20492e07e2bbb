//! A fake kubelet that Tether's integration tests and benchmark run against.
//!
//! [`FixtureKubelet`] serves the kubelet endpoints Tether has to carry (container logs
//! with `follow`, exec/attach over WebSocket and over SPDY/3.1 as the kubelet speaks
//! them, port-forward over WebSocket, a raw echo for SPDY port-forward and
//! `Upgrade: tether-echo`, multi-megabyte metrics, small JSON endpoints and error
//! pages) over plain HTTP/1.1 or
//! HTTPS on `127.0.0.1:0`. Every body is deterministic and has a public generator
//! ([`log_fill`], [`LogVerifier`], [`metrics_body`]) so a test can check what came out
//! of the tunnel byte for byte without the fixture ever buffering a large log.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, stream};
use http::header::{
    CONNECTION, CONTENT_TYPE, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_PROTOCOL, UPGRADE,
};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{ChildStdin, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::debug;

mod exec_spdy;

/// Size of each chunk a streamed body is cut into.
pub const CHUNK_SIZE: usize = 1024 * 1024;
/// Length of every generated log line, newline included.
pub const LOG_LINE_LEN: u64 = 64;
/// Log bytes served when the request has no `bytes=` query.
pub const DEFAULT_LOG_BYTES: u64 = 4096;
/// How often a `follow=true` log stream emits a line once the initial bytes are out.
pub const FOLLOW_TICK: Duration = Duration::from_millis(50);

/// Chunks in flight per streamed body: bounds memory and lets a stalled reader stall
/// only its own stream.
const BODY_CHANNEL_CAPACITY: usize = 4;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an exec waits for the client's half of the WebSocket close handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
const MAX_CACHED_METRICS: usize = 16;

type FixtureBody = UnsyncBoxBody<Bytes, Infallible>;

/// A fake kubelet listening on `addr`; its accept loop and every connection, stream and
/// child process it started stop when it is dropped.
pub struct FixtureKubelet {
    /// Where the fixture listens (always `127.0.0.1`).
    pub addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
    // Dropping the sender wakes every task guarded by `State::shutdown`.
    _shutdown: watch::Sender<()>,
}

struct State {
    tls: Option<TlsAcceptor>,
    requests: AtomicU64,
    follow_disconnects: watch::Sender<u64>,
    shutdown: watch::Receiver<()>,
    metrics_cache: Mutex<HashMap<(MetricsKind, usize), Bytes>>,
}

impl FixtureKubelet {
    /// Binds `127.0.0.1:0` and serves plain HTTP/1.1, or HTTPS when `tls` is given.
    pub async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> std::io::Result<FixtureKubelet> {
        Self::start_on("127.0.0.1:0".parse().expect("static address"), tls).await
    }

    /// Like [`FixtureKubelet::start`] on a given address (tests inside
    /// network namespaces bind the namespace's loopback).
    pub async fn start_on(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<FixtureKubelet> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (shutdown_tx, shutdown_rx) = watch::channel(());
        let state = Arc::new(State {
            tls: tls.map(TlsAcceptor::from),
            requests: AtomicU64::new(0),
            follow_disconnects: watch::Sender::new(0),
            shutdown: shutdown_rx,
            metrics_cache: Mutex::new(HashMap::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(FixtureKubelet {
            addr,
            state,
            accept,
            _shutdown: shutdown_tx,
        })
    }

    /// Number of `follow=true` log streams whose client went away.
    pub fn follow_disconnects(&self) -> u64 {
        *self.state.follow_disconnects.borrow()
    }

    /// Waits until [`Self::follow_disconnects`] exceeds `since`; false on timeout.
    pub async fn wait_follow_disconnect(&self, since: u64, timeout: Duration) -> bool {
        let mut rx = self.state.follow_disconnects.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|n| *n > since)).await,
            Ok(Ok(_))
        )
    }

    /// Total requests served, upgrades included.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }
}

impl Drop for FixtureKubelet {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl State {
    /// Spawns `fut` so that it is cancelled when the fixture is dropped.
    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.changed() => {}
                () = fut => {}
            }
        });
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                state.spawn(serve_tcp(state.clone(), tcp, peer));
            }
            Err(error) => {
                // Usually EMFILE: back off instead of spinning.
                debug!(%error, "fixture accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve_tcp(state: Arc<State>, tcp: TcpStream, peer: SocketAddr) {
    let Some(acceptor) = state.tls.clone() else {
        return serve_io(state, tcp).await;
    };
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => serve_io(state, tls).await,
        Ok(Err(error)) => debug!(%peer, %error, "fixture tls handshake failed"),
        Err(_) => debug!(%peer, "fixture tls handshake timed out"),
    }
}

async fn serve_io<I>(state: Arc<State>, io: I)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        async move {
            state.requests.fetch_add(1, Ordering::Relaxed);
            // A real kubelet continues the caller's trace; echo what arrived.
            let traceparent = req.headers().get("traceparent").cloned();
            let mut resp = route(&state, req).await;
            resp.headers_mut()
                .insert("x-fixture", HeaderValue::from_static("kubelet"));
            if let Some(tp) = traceparent {
                resp.headers_mut().insert("x-fixture-traceparent", tp);
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(io), service);
    if let Err(error) = conn.with_upgrades().await {
        debug!(%error, "fixture connection ended");
    }
}

/// Like the kubelet (Go's net/http), a request body no handler reads is
/// still read for a moment after the answer (Go's 500 ms "RST avoidance"
/// delay), then the connection closes with whatever is left unread. A large
/// upload is therefore cut with a reset, as the real kubelet cuts it, and
/// its sender must keep the answer it already has.
async fn drain_body(mut body: Incoming) {
    use http_body_util::BodyExt;
    let drain = async { while let Some(Ok(_)) = body.frame().await {} };
    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
}

async fn route(state: &Arc<State>, req: Request<Incoming>) -> Response<FixtureBody> {
    // No route reads a request body; upgrades use only the head.
    let (parts, body) = req.into_parts();
    tokio::spawn(drain_body(body));
    let req = Request::from_parts(parts, ());
    let query = parse_query(req.uri().query());
    let upgrade = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if upgrade == "tether-echo" {
        return raw_echo(state, req, "tether-echo");
    }
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["containerLogs", ns, pod, container] => {
            let target = format!("{ns}/{pod}/{container}");
            container_logs(state, &query, &target)
        }
        ["exec" | "attach", _ns, _pod, .., _container] if segments.len() <= 5 => {
            let attach = segments[0] == "attach";
            match upgrade.as_str() {
                "websocket" => exec_ws(state, req, &query, attach),
                "spdy/3.1" => exec_spdy::exec_spdy(state, req, &query, attach),
                _ => text(StatusCode::BAD_REQUEST, "Upgrade request required\n"),
            }
        }
        ["portForward", _ns, _pod] | ["portForward", _ns, _pod, _] => match upgrade.as_str() {
            "websocket" => port_forward_ws(state, req, &query),
            "spdy/3.1" => raw_echo(state, req, "SPDY/3.1"),
            _ => text(StatusCode::BAD_REQUEST, "Upgrade request required\n"),
        },
        ["metrics", ..] => match MetricsKind::from_path(&path) {
            Some(kind) => metrics(state, kind, &query),
            None => not_found(),
        },
        ["stats", "summary"] => json(STATS_SUMMARY),
        ["pods"] => json(&pods_json()),
        ["healthz"] => text(StatusCode::OK, "ok"),
        ["error500"] => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "fixture internal error\n",
        ),
        ["slow"] => {
            let ms = query_u64(&query, "ms").unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            text(StatusCode::OK, "slow ok\n")
        }
        _ => not_found(),
    }
}

// ---------------------------------------------------------------------------------------
// Logs

const LOG_TEXT: &[u8; 48] = b" fixture log line abcdefghijklmnopqrstuvwxyz012\n";
const _: () = assert!(16 + LOG_TEXT.len() as u64 == LOG_LINE_LEN);
const HEX: &[u8; 16] = b"0123456789abcdef";

/// The log byte at `offset`: lines of [`LOG_LINE_LEN`] bytes, each starting with its own
/// byte offset as 16 lowercase hex digits.
pub fn log_pattern_byte(offset: u64) -> u8 {
    let line_start = offset - offset % LOG_LINE_LEN;
    let col = (offset % LOG_LINE_LEN) as usize;
    if col < 16 {
        HEX[((line_start >> (4 * (15 - col))) & 0xf) as usize]
    } else {
        LOG_TEXT[col - 16]
    }
}

/// Fills `buf` with the log bytes starting at `offset`.
pub fn log_fill(offset: u64, buf: &mut [u8]) {
    let mut pos = 0;
    while pos < buf.len() {
        let at = offset + pos as u64;
        let line_start = at - at % LOG_LINE_LEN;
        let mut line = [0u8; LOG_LINE_LEN as usize];
        for (i, digit) in line[..16].iter_mut().enumerate() {
            *digit = HEX[((line_start >> (4 * (15 - i))) & 0xf) as usize];
        }
        line[16..].copy_from_slice(LOG_TEXT);
        let col = (at - line_start) as usize;
        let n = (line.len() - col).min(buf.len() - pos);
        buf[pos..pos + n].copy_from_slice(&line[col..col + n]);
        pos += n;
    }
}

/// The log bytes in `start..end`, in chunks of at most [`CHUNK_SIZE`].
pub fn log_range(start: u64, end: u64) -> impl Iterator<Item = Bytes> {
    let mut offset = start;
    std::iter::from_fn(move || {
        if offset >= end {
            return None;
        }
        let len = (end - offset).min(CHUNK_SIZE as u64) as usize;
        let mut chunk = vec![0; len];
        log_fill(offset, &mut chunk);
        offset += len as u64;
        Some(Bytes::from(chunk))
    })
}

/// The first `total` log bytes (what `?bytes=total` serves), in chunks.
pub fn log_bytes(total: u64) -> impl Iterator<Item = Bytes> {
    log_range(0, total)
}

/// Offset of the first byte served for `tailLines=tail_lines` out of `total` log bytes.
pub fn log_tail_start(total: u64, tail_lines: u64) -> u64 {
    let lines = total.div_ceil(LOG_LINE_LEN);
    lines.saturating_sub(tail_lines) * LOG_LINE_LEN
}

/// Checks a log body chunk by chunk while it streams, without holding it.
#[derive(Debug, Default)]
pub struct LogVerifier {
    offset: u64,
    expected: Vec<u8>,
}

impl LogVerifier {
    /// A verifier for a body whose first byte is the log byte at `start`.
    pub fn new(start: u64) -> Self {
        LogVerifier {
            offset: start,
            expected: Vec::new(),
        }
    }

    /// Checks the next `chunk` of the body; the error names the first wrong offset.
    pub fn update(&mut self, chunk: &[u8]) -> anyhow::Result<()> {
        self.expected.resize(chunk.len(), 0);
        log_fill(self.offset, &mut self.expected);
        // Slice equality is a memcmp; only look for the culprit when it fails.
        if chunk != self.expected.as_slice()
            && let Some(i) = chunk.iter().zip(&self.expected).position(|(a, b)| a != b)
        {
            anyhow::bail!(
                "log mismatch at offset {}: got {:#04x}, want {:#04x}",
                self.offset + i as u64,
                chunk[i],
                self.expected[i]
            );
        }
        self.offset += chunk.len() as u64;
        Ok(())
    }

    /// Offset of the next byte expected.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

fn container_logs(
    state: &Arc<State>,
    query: &[(String, String)],
    target: &str,
) -> Response<FixtureBody> {
    let total = query_u64(query, "bytes").unwrap_or(DEFAULT_LOG_BYTES);
    let follow = query_bool(query, "follow");
    let start = query_u64(query, "tailLines").map_or(0, |n| log_tail_start(total, n));
    let limit_end = query_u64(query, "limitBytes").map(|n| start.saturating_add(n));
    let burst_end = limit_end.map_or(total, |end| end.min(total));

    let (tx, rx) = mpsc::channel(BODY_CHANNEL_CAPACITY);
    let counter = state.clone();
    state.spawn(async move {
        let gone = produce_log(tx, start, burst_end, limit_end, follow).await;
        if follow && gone {
            counter.follow_disconnects.send_modify(|n| *n += 1);
        }
    });
    let mut resp = Response::new(channel_body(rx));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let Ok(value) = HeaderValue::from_str(target) {
        resp.headers_mut().insert("x-fixture-target", value);
    }
    resp
}

/// Sends log bytes into `tx`; returns true if the receiver (the client) went away.
async fn produce_log(
    tx: mpsc::Sender<Bytes>,
    start: u64,
    burst_end: u64,
    limit_end: Option<u64>,
    follow: bool,
) -> bool {
    for chunk in log_range(start, burst_end) {
        if tx.send(chunk).await.is_err() {
            return true;
        }
    }
    if !follow {
        return false;
    }
    let mut offset = burst_end;
    let mut ticker = tokio::time::interval(FOLLOW_TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        let end = offset + (LOG_LINE_LEN - offset % LOG_LINE_LEN);
        let end = limit_end.map_or(end, |limit| end.min(limit));
        if end <= offset {
            return false;
        }
        // Watching `closed` notices a dropped body at once rather than at the next tick.
        tokio::select! {
            () = tx.closed() => return true,
            _ = ticker.tick() => {}
        }
        for chunk in log_range(offset, end) {
            if tx.send(chunk).await.is_err() {
                return true;
            }
        }
        offset = end;
    }
}

fn channel_body(mut rx: mpsc::Receiver<Bytes>) -> FixtureBody {
    let frames = stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok::<_, Infallible>(Frame::data(b))))
    });
    StreamBody::new(frames).boxed_unsync()
}

// ---------------------------------------------------------------------------------------
// Metrics

/// Which metrics endpoint a body belongs to; each has its own deterministic content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricsKind {
    /// `/metrics`
    Kubelet,
    /// `/metrics/cadvisor`
    Cadvisor,
    /// `/metrics/resource`
    Resource,
    /// `/metrics/probes`
    Probes,
    /// `/metrics/single-line`: one line of the whole body's length.
    SingleLine,
}

impl MetricsKind {
    /// The kind served at `path`, if any.
    pub fn from_path(path: &str) -> Option<Self> {
        match path {
            "/metrics" => Some(Self::Kubelet),
            "/metrics/cadvisor" => Some(Self::Cadvisor),
            "/metrics/resource" => Some(Self::Resource),
            "/metrics/probes" => Some(Self::Probes),
            "/metrics/single-line" => Some(Self::SingleLine),
            _ => None,
        }
    }

    /// Body size served when the request has no `bytes=` query.
    pub fn default_bytes(self) -> usize {
        match self {
            Self::SingleLine => 5 * 1024 * 1024,
            _ => 4 * 1024 * 1024,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Kubelet => "kubelet",
            Self::Cadvisor => "cadvisor",
            Self::Resource => "resource",
            Self::Probes => "probes",
            Self::SingleLine => "single_line",
        }
    }
}

/// Bytes between two label values longer than 64 KiB in a multi-line metrics body.
const BIG_LINE_EVERY: usize = 512 * 1024;
const BIG_LABEL_LEN: usize = 96 * 1024;

/// The exact body served for `kind` with `?bytes=total`: valid Prometheus text, `total`
/// bytes long, ending in `\n`. Multi-line kinds carry a label value longer than 64 KiB
/// every 512 KiB (the first at 64 KiB).
pub fn metrics_body(kind: MetricsKind, total: usize) -> Bytes {
    let mut out = Vec::with_capacity(total);
    let name = kind.name();
    if kind == MetricsKind::SingleLine {
        let head = format!("fixture_{name}{{blob=\"");
        let tail = "\"} 1\n";
        if total < head.len() + tail.len() {
            fill_blob(&mut out, 7, total.saturating_sub(1));
            out.extend(b"\n".iter().take(total));
        } else {
            out.extend_from_slice(head.as_bytes());
            fill_blob(&mut out, 7, total - head.len() - tail.len());
            out.extend_from_slice(tail.as_bytes());
        }
    } else {
        let mut line = format!(
            "# HELP fixture_{name}_series Deterministic fixture series.\n# TYPE fixture_{name}_series gauge\n"
        );
        let mut next_big = 64 * 1024;
        let mut series = 0u64;
        while out.len() + line.len() <= total {
            out.extend_from_slice(line.as_bytes());
            series += 1;
            if out.len() >= next_big {
                next_big += BIG_LINE_EVERY;
                let mut big = format!("fixture_{name}_big_label{{series=\"{series}\",blob=\"");
                let mut blob = Vec::new();
                fill_blob(
                    &mut blob,
                    series,
                    BIG_LABEL_LEN + (series as usize % 7) * 1000,
                );
                big.push_str(std::str::from_utf8(&blob).unwrap_or_default());
                big.push_str(&format!("\"}} {series}\n"));
                line = big;
            } else {
                let value = series.wrapping_mul(7919) % 1_000_003;
                line = format!(
                    "fixture_{name}_series{{node=\"fixture-node\",pod=\"pod-{}\",series=\"{series:08}\"}} {value}\n",
                    series % 97
                );
            }
        }
        // Pad to the exact size with a comment line (or a bare newline).
        let rest = total - out.len();
        if rest >= 2 {
            out.push(b'#');
            fill_blob(&mut out, series, rest - 2);
        }
        if rest >= 1 {
            out.push(b'\n');
        }
    }
    debug_assert_eq!(out.len(), total);
    Bytes::from(out)
}

/// Appends `len` pseudo-random alphanumerics, so shifted or reordered chunks show.
fn fill_blob(out: &mut Vec<u8>, seed: u64, len: usize) {
    const ALNUM: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    out.extend((0..len).map(|_| {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ALNUM[(x % 62) as usize]
    }));
}

fn metrics(state: &State, kind: MetricsKind, query: &[(String, String)]) -> Response<FixtureBody> {
    let total = query_u64(query, "bytes").map_or(kind.default_bytes(), |n| n as usize);
    // Generating 4 MiB per scrape would cost more than carrying it, so bodies are built
    // once (outside the lock) and served from a small cache.
    let cache = || {
        state
            .metrics_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    };
    let cached = cache().get(&(kind, total)).cloned();
    let body = cached.unwrap_or_else(|| {
        let body = metrics_body(kind, total);
        let mut cache = cache();
        if cache.len() < MAX_CACHED_METRICS {
            cache.insert((kind, total), body.clone());
        }
        body
    });
    // Zero-copy slices of the cached body; hyper pulls them one by one.
    let chunks = (0..body.len()).step_by(CHUNK_SIZE).map(move |at| {
        Ok::<_, Infallible>(Frame::data(
            body.slice(at..(at + CHUNK_SIZE).min(body.len())),
        ))
    });
    let mut resp = Response::new(StreamBody::new(stream::iter(chunks)).boxed_unsync());
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

// ---------------------------------------------------------------------------------------
// Upgrades: raw echo, exec and port-forward over WebSocket

/// Answers `101` for an opaque upgrade protocol and echoes every byte until EOF.
fn raw_echo(state: &State, mut req: Request<()>, protocol: &'static str) -> Response<FixtureBody> {
    let on_upgrade = hyper::upgrade::on(&mut req);
    state.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let (reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
                let mut reader = tokio::io::BufReader::with_capacity(64 * 1024, reader);
                let _ = tokio::io::copy_buf(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            }
            Err(error) => debug!(%error, "fixture echo upgrade failed"),
        }
    });
    let mut resp = switching_protocols(protocol);
    if let Some(version) = req.headers().get("x-stream-protocol-version") {
        resp.headers_mut()
            .insert("x-stream-protocol-version", version.clone());
    }
    resp
}

const EXEC_PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
const PORT_FORWARD_PROTOCOLS: &[&str] = &[
    "v4.portforward.k8s.io",
    "portforward.k8s.io",
    "v4.channel.k8s.io",
    "channel.k8s.io",
];

/// Validates a WebSocket upgrade and picks the subprotocol: the first one offered that
/// is in `supported`, or none if the client offered none. The error is a 400 message.
fn websocket_handshake(
    req: &mut Request<()>,
    supported: &[&str],
) -> Result<(Response<FixtureBody>, Option<String>, OnUpgrade), String> {
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY) else {
        return Err("missing Sec-WebSocket-Key\n".to_owned());
    };
    let accept = derive_accept_key(key.as_bytes());
    let offered = offered_protocols(req.headers());
    let protocol = offered
        .iter()
        .find(|p| supported.contains(&p.as_str()))
        .cloned();
    if protocol.is_none() && !offered.is_empty() {
        let msg = format!("requested protocol(s) are not supported: {offered:?}\n");
        return Err(msg);
    }
    let mut resp = switching_protocols("websocket");
    let headers = resp.headers_mut();
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64"),
    );
    if let Some(p) = &protocol {
        headers.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(p).expect("known protocol"),
        );
    }
    Ok((resp, protocol, hyper::upgrade::on(req)))
}

fn offered_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

struct ExecRequest {
    argv: Vec<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    /// v5 lets the client close a channel with `[255, channel]`.
    v5: bool,
}

/// The command and streams an exec or attach asks for; the error is the kubelet's 400
/// message.
fn exec_request(query: &[(String, String)], attach: bool) -> Result<ExecRequest, &'static str> {
    let argv: Vec<String> = if attach {
        vec!["cat".to_owned()]
    } else {
        query
            .iter()
            .filter(|(k, _)| k == "command")
            .map(|(_, v)| v.clone())
            .collect()
    };
    if argv.is_empty() {
        return Err("you must specify at least 1 command\n");
    }
    let (mut stdin, mut stdout, mut stderr) = (
        query_bool(query, "stdin"),
        query_bool(query, "stdout"),
        query_bool(query, "stderr"),
    );
    if !(stdin || stdout || stderr) {
        (stdin, stdout, stderr) = (false, true, true);
    }
    Ok(ExecRequest {
        argv,
        stdin,
        stdout,
        stderr,
        v5: false,
    })
}

fn exec_ws(
    state: &State,
    mut req: Request<()>,
    query: &[(String, String)],
    attach: bool,
) -> Response<FixtureBody> {
    let mut exec = match exec_request(query, attach) {
        Ok(exec) => exec,
        Err(msg) => return text(StatusCode::BAD_REQUEST, msg),
    };
    let (resp, protocol, on_upgrade) = match websocket_handshake(&mut req, EXEC_PROTOCOLS) {
        Ok(parts) => parts,
        Err(msg) => return text(StatusCode::BAD_REQUEST, &msg),
    };
    exec.v5 = protocol.as_deref() == Some("v5.channel.k8s.io");
    state.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => run_exec(upgraded, exec).await,
            Err(error) => debug!(%error, "fixture exec upgrade failed"),
        }
    });
    resp
}

async fn run_exec(upgraded: Upgraded, exec: ExecRequest) {
    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    let (mut sink, source) = ws.split();
    let mut child = match spawn_exec(&exec) {
        Ok(child) => child,
        Err(error) => {
            let status = internal_error_status(&error.to_string());
            let _ = sink.send(channel_message(3, status.as_bytes())).await;
            if let Ok(ws) = sink.reunite(source) {
                close_gracefully(ws).await;
            }
            return;
        }
    };
    // Like the kubelet: an empty frame on the lowest writable channel says "ready".
    let ready = if exec.stdout {
        1
    } else if exec.stderr {
        2
    } else {
        3
    };
    if sink.send(channel_message(ready, &[])).await.is_err() {
        return;
    }
    let mut input = AbortOnDrop(tokio::spawn(forward_stdin(
        source,
        child.stdin.take(),
        exec.v5,
    )));

    let (out_tx, mut out_rx) = mpsc::channel::<Message>(BODY_CHANNEL_CAPACITY);
    let stdout = pump_output(child.stdout.take(), out_tx.clone(), |d| {
        channel_message(1, d)
    });
    let stderr = pump_output(child.stderr.take(), out_tx, |d| channel_message(2, d));
    let relay = async {
        while let Some(msg) = out_rx.recv().await {
            sink.send(msg).await?;
        }
        Ok::<_, tokio_tungstenite::tungstenite::Error>(())
    };
    let session = async {
        let ((), (), relayed) = tokio::join!(stdout, stderr, relay);
        relayed.ok()?;
        Some(child.wait().await.map_or(-1, exit_code))
    };
    // The reader only ends early if the client closed or vanished; either way the
    // session is over and dropping `child` kills the process.
    let status = tokio::select! {
        status = session => status,
        _ = &mut input.0 => None,
    };
    let Some(status) = status else { return };
    let status = exit_status(status);
    if sink
        .send(channel_message(3, status.as_bytes()))
        .await
        .is_err()
        || sink.send(Message::Close(None)).await.is_err()
    {
        return;
    }
    // The reader ends when the client answers our close; then shut the socket down
    // cleanly (a TLS close_notify, as Go's kubelet sends).
    if let Ok(Ok(source)) = tokio::time::timeout(CLOSE_GRACE, &mut input.0).await
        && let Ok(mut ws) = sink.reunite(source)
    {
        let _ = ws.get_mut().shutdown().await;
    }
}

/// Finishes the close handshake the server started (or the client did) and shuts the
/// socket down.
async fn close_gracefully<S>(mut ws: WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = ws.send(Message::Close(None)).await;
    let drain = async { while let Some(Ok(_)) = ws.next().await {} };
    let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
    let _ = ws.get_mut().shutdown().await;
}

/// Starts the exec's command with a pipe for each stream it asked for; the child is
/// killed when dropped.
fn spawn_exec(exec: &ExecRequest) -> std::io::Result<tokio::process::Child> {
    let piped = |on: bool| {
        if on {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        }
    };
    Command::new(&exec.argv[0])
        .args(&exec.argv[1..])
        .stdin(piped(exec.stdin))
        .stdout(piped(exec.stdout))
        .stderr(piped(exec.stderr))
        .kill_on_drop(true)
        .spawn()
}

/// The `Status` the kubelet reports for an exit code (v4 and later).
fn exit_status(code: i32) -> String {
    if code == 0 {
        r#"{"metadata":{},"status":"Success"}"#.to_owned()
    } else {
        format!(
            r#"{{"metadata":{{}},"status":"Failure","message":"command terminated with non-zero exit code: exit status {code}","reason":"NonZeroExitCode","details":{{"causes":[{{"reason":"ExitCode","message":"{code}"}}]}}}}"#
        )
    }
}

/// The `Status` the kubelet reports when the command could not run.
fn internal_error_status(message: &str) -> String {
    let message = serde_json::to_string(message).unwrap_or_default();
    format!(
        r#"{{"metadata":{{}},"status":"Failure","message":{message},"reason":"InternalError","code":500}}"#
    )
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Sends what `reader` produces into `tx`, each read wrapped by `wrap`, until EOF or
/// until the receiver is gone.
async fn pump_output<R, M>(reader: Option<R>, tx: mpsc::Sender<M>, wrap: impl Fn(&[u8]) -> M)
where
    R: AsyncRead + Unpin,
{
    let Some(mut reader) = reader else { return };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if tx.send(wrap(&buf[..n])).await.is_err() {
            return;
        }
    }
}

/// Reads client frames: channel 0 goes to the child's stdin, v5 `[255, 0]` closes it,
/// resize (4) and anything else is ignored.
async fn forward_stdin<S>(mut source: S, mut stdin: Option<ChildStdin>, v5: bool) -> S
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    while let Some(Ok(msg)) = source.next().await {
        let Message::Binary(data) = msg else { continue };
        match data.first() {
            Some(0) => {
                if let Some(pipe) = stdin.as_mut()
                    && pipe.write_all(&data[1..]).await.is_err()
                {
                    stdin = None;
                }
            }
            Some(255) if v5 && data.get(1) == Some(&0) => stdin = None,
            _ => {}
        }
    }
    source
}

fn port_forward_ws(
    state: &State,
    mut req: Request<()>,
    query: &[(String, String)],
) -> Response<FixtureBody> {
    let ports: Result<Vec<u16>, _> = query
        .iter()
        .filter(|(k, _)| k == "ports" || k == "port")
        .flat_map(|(_, v)| v.split(','))
        .map(|p| p.trim().parse::<u16>())
        .collect();
    let ports = match ports {
        Ok(ports) if !ports.is_empty() => ports,
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                "query parameter \"port\" is required\n",
            );
        }
    };
    let (resp, _protocol, on_upgrade) = match websocket_handshake(&mut req, PORT_FORWARD_PROTOCOLS)
    {
        Ok(parts) => parts,
        Err(msg) => return text(StatusCode::BAD_REQUEST, &msg),
    };
    state.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => run_port_forward(upgraded, ports).await,
            Err(error) => debug!(%error, "fixture port-forward upgrade failed"),
        }
    });
    resp
}

/// Announces each port on its data (2i) and error (2i+1) channel, then echoes data.
async fn run_port_forward(upgraded: Upgraded, ports: Vec<u16>) {
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    for (i, port) in ports.iter().enumerate() {
        let [lo, hi] = port.to_le_bytes();
        for channel in [2 * i as u8, 2 * i as u8 + 1] {
            if ws
                .send(Message::binary(vec![channel, lo, hi]))
                .await
                .is_err()
            {
                return;
            }
        }
    }
    while let Some(Ok(msg)) = ws.next().await {
        let data = match msg {
            Message::Binary(data) => data,
            Message::Close(_) => break,
            _ => continue,
        };
        let is_data = data
            .first()
            .is_some_and(|c| c % 2 == 0 && usize::from(c / 2) < ports.len());
        if is_data && data.len() > 1 && ws.send(Message::Binary(data)).await.is_err() {
            return;
        }
    }
    close_gracefully(ws).await;
}

fn channel_message(channel: u8, data: &[u8]) -> Message {
    let mut frame = Vec::with_capacity(data.len() + 1);
    frame.push(channel);
    frame.extend_from_slice(data);
    Message::binary(frame)
}

/// Aborts the task when dropped, so an exec's reader dies with the exec.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---------------------------------------------------------------------------------------
// Small bodies and helpers

const STATS_SUMMARY: &str = r#"{"node":{"nodeName":"fixture-node","startTime":"2024-01-01T00:00:00Z","cpu":{"time":"2024-01-01T00:00:00Z","usageNanoCores":125000000,"usageCoreNanoSeconds":987654321000},"memory":{"time":"2024-01-01T00:00:00Z","workingSetBytes":536870912,"rssBytes":268435456}},"pods":[]}"#;

/// A PodList-like body of about 1 KiB.
fn pods_json() -> String {
    let items: Vec<serde_json::Value> = (0..4)
        .map(|i| {
            serde_json::json!({
                "metadata": {"name": format!("fixture-pod-{i}"), "namespace": "default", "uid": format!("00000000-0000-0000-0000-00000000000{i}")},
                "spec": {"nodeName": "fixture-node", "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
                "status": {"phase": "Running", "podIP": format!("10.244.0.{}", 10 + i)}
            })
        })
        .collect();
    serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
        .to_string()
}

fn switching_protocols(upgrade: &'static str) -> Response<FixtureBody> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    resp.headers_mut()
        .insert(UPGRADE, HeaderValue::from_static(upgrade));
    resp
}

fn empty() -> FixtureBody {
    Full::new(Bytes::new()).boxed_unsync()
}

fn text(status: StatusCode, body: &str) -> Response<FixtureBody> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())).boxed_unsync());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json(body: &str) -> Response<FixtureBody> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())).boxed_unsync());
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Exactly what Go's `http.NotFound` answers.
fn not_found() -> Response<FixtureBody> {
    let mut resp = text(StatusCode::NOT_FOUND, "404 page not found\n");
    resp.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

fn parse_query(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_value<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn query_u64(query: &[(String, String)], key: &str) -> Option<u64> {
    query_value(query, key).and_then(|v| v.parse().ok())
}

fn query_bool(query: &[(String, String)], key: &str) -> bool {
    matches!(
        query_value(query, key),
        Some("1" | "true" | "True" | "TRUE")
    )
}

// ---------------------------------------------------------------------------------------
// TLS for tests

/// A self-signed serving certificate for `localhost` and `127.0.0.1` (like a kubelet's
/// default), as a server config and the certificate a client should trust.
pub fn self_signed_tls() -> anyhow::Result<(
    Arc<rustls::ServerConfig>,
    rustls_pki_types::CertificateDer<'static>,
)> {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    let cert = certified.cert.der().clone();
    let key = rustls_pki_types::PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![cert.clone()], key.into())?;
    Ok((Arc::new(config), cert))
}

/// A client config that trusts only `root`.
pub fn client_tls(
    root: rustls_pki_types::CertificateDer<'static>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}
