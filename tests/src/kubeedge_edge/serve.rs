//! How the edge serves one connection, after `pkg/stream/edgedlogconnection.go`,
//! `edgedmetricsconnection.go`, `edgedexecconnection.go` and
//! `edgedattachconnection.go` (the last two are identical): the CONNECT JSON,
//! the request the edge makes to the kubelet, and the pumps between kubelet
//! and tunnel with their chunk sizes and ways to end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming as Body;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::debug;

use super::Outgoing;
use super::session::SessionCtx;
use super::wire::{self, Message, MessageType};

/// The kubelet address KubeEdge's cloud writes into every CONNECT
/// (`apiserverconnection.go`, `defaultServerHost`); the double sends these
/// requests to the fixture kubelet instead.
pub const KUBEEDGE_KUBELET_HOST: &str = "127.0.0.1:10350";
/// Read size of the log and exec pumps (`var data [256]byte`).
pub const READ_CHUNK: usize = 256;
/// `bufio.MaxScanTokenSize`: the metrics scanner's buffer.
pub const MAX_LINE_BUFFER: usize = 64 * 1024;
/// Inbox of each connection (`ReadChan: make(chan *stream.Message, 128)`).
pub const INBOX: usize = 128;
/// Go's default `User-Agent` in `Request.Write`.
const GO_USER_AGENT: &str = "Go-http-client/1.1";
/// Bound on the kubelet dial; Go's default dialer waits 30 s.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// A CONNECT message as the edge decoded it. Tests read these through
/// [`super::KubeEdgeEdge::connects`] to check what the cloud asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRecord {
    /// The message header's ConnectID (the edge's key for the connection).
    pub id: u64,
    /// LOGS, EXEC, METRIC or ATTACH.
    pub kind: MessageType,
    /// The JSON's `MessID` (the ID the edge writes on everything it sends back).
    pub mess_id: u64,
    /// The JSON's `method` (empty for logs and metrics, which always GET).
    pub method: String,
    /// `url.Scheme`.
    pub scheme: String,
    /// `url.Host`.
    pub host: String,
    /// `url.Path`.
    pub path: String,
    /// `url.RawQuery`.
    pub raw_query: String,
    /// `header`, keys verbatim; sorted as Go writes them.
    pub headers: BTreeMap<String, Vec<String>>,
    raw_path: String,
    opaque: String,
}

impl ConnectRecord {
    /// Decodes the JSON of a CONNECT the way Go's `encoding/json` does for
    /// the `Edged*Connection` structs: keys matched exactly first, then
    /// case-insensitively; unknown keys ignored; missing ones zero.
    pub fn parse(id: u64, kind: MessageType, data: &[u8]) -> Result<Self, String> {
        let root: Value = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        let obj = root.as_object().ok_or("not a JSON object")?;
        let mess_id = match field(obj, "MessID") {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_u64().ok_or("MessID is not a u64")?,
        };
        let method = string(field(obj, "method"), "method")?;
        let url = match field(obj, "url") {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err("url is not an object".into()),
        };
        let mut headers = BTreeMap::new();
        match field(obj, "header") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (name, values) in m {
                    let values = match values {
                        Value::Null => Vec::new(),
                        Value::Array(a) => a
                            .iter()
                            .map(|v| v.as_str().map(str::to_owned))
                            .collect::<Option<Vec<_>>>()
                            .ok_or("header value is not a string")?,
                        _ => return Err("header values are not a list".into()),
                    };
                    headers.insert(name.clone(), values);
                }
            }
            Some(_) => return Err("header is not an object".into()),
        }
        Ok(Self {
            id,
            kind,
            mess_id,
            method,
            scheme: string(field(&url, "Scheme"), "url.Scheme")?,
            host: string(field(&url, "Host"), "url.Host")?,
            path: string(field(&url, "Path"), "url.Path")?,
            raw_query: string(field(&url, "RawQuery"), "url.RawQuery")?,
            headers,
            raw_path: string(field(&url, "RawPath"), "url.RawPath")?,
            opaque: string(field(&url, "Opaque"), "url.Opaque")?,
        })
    }

    /// The request target as Go's `URL.RequestURI` builds it.
    pub fn request_uri(&self) -> String {
        let mut uri = if !self.opaque.is_empty() {
            self.opaque.clone()
        } else if !self.raw_path.is_empty() && unescape(&self.raw_path) == Some(self.path.clone()) {
            // Go keeps RawPath when it is a valid encoding of Path.
            self.raw_path.clone()
        } else {
            escape_path(&self.path)
        };
        if uri.is_empty() {
            uri.push('/');
        }
        if !self.raw_query.is_empty() {
            uri.push('?');
            uri.push_str(&self.raw_query);
        }
        uri
    }

    /// The HTTP/1.1 request head Go's `Request.Write` puts on the wire for
    /// this request with no body: Host from the URL, `User-Agent` (the
    /// header's, else Go's default), `Content-Length: 0` for POST, PUT and
    /// PATCH, then the JSON headers in key order except those Go writes
    /// itself or drops (`Host`, `User-Agent`, `Content-Length`,
    /// `Transfer-Encoding`, `Trailer`, matched on the exact key as Go does).
    pub fn request_head(&self, method: &str) -> Vec<u8> {
        let mut head = format!(
            "{method} {} HTTP/1.1\r\nHost: {}\r\n",
            self.request_uri(),
            self.host
        );
        let agent = self.user_agent();
        if !agent.is_empty() {
            head.push_str(&format!("User-Agent: {agent}\r\n"));
        }
        if matches!(method, "POST" | "PUT" | "PATCH") {
            head.push_str("Content-Length: 0\r\n");
        }
        for (name, value) in self.other_headers() {
            head.push_str(&format!("{name}: {}\r\n", clean(value)));
        }
        head.push_str("\r\n");
        head.into_bytes()
    }

    /// Go's `User-Agent`: the header's first value (empty means none), else
    /// `Go-http-client/1.1`.
    fn user_agent(&self) -> String {
        match self.headers.get("User-Agent") {
            Some(values) => clean(values.first().map_or("", String::as_str)),
            None => GO_USER_AGENT.to_owned(),
        }
    }

    /// The JSON headers Go writes after its own, in key order: all but
    /// `Host`, `User-Agent`, `Content-Length`, `Transfer-Encoding` and
    /// `Trailer` (matched on the exact key, as Go's map lookup does).
    fn other_headers(&self) -> impl Iterator<Item = (&str, &str)> {
        const GO_WRITES_ITSELF: [&str; 5] = [
            "Host",
            "User-Agent",
            "Content-Length",
            "Transfer-Encoding",
            "Trailer",
        ];
        self.headers
            .iter()
            .filter(|(name, _)| !GO_WRITES_ITSELF.contains(&name.as_str()))
            .flat_map(|(name, values)| values.iter().map(move |v| (name.as_str(), v.as_str())))
    }

    /// Where the edge would connect, mapped for the double: KubeEdge's fixed
    /// kubelet host goes to the fixture kubelet; any other host only if it is
    /// a loopback address (tests never reach beyond loopback).
    fn target(&self, kubelet: SocketAddr) -> Result<SocketAddr, String> {
        if self.scheme != "http" {
            // A real edge would try TLS against the system roots.
            return Err(format!(
                "scheme {:?} is not served by the double",
                self.scheme
            ));
        }
        if self.host == KUBEEDGE_KUBELET_HOST {
            return Ok(kubelet);
        }
        let addr: SocketAddr = self
            .host
            .parse()
            .or_else(|_| format!("{}:80", self.host).parse())
            .map_err(|_| format!("host {:?} is not an address", self.host))?;
        if addr.ip().is_loopback() {
            Ok(addr)
        } else {
            Err(format!("host {addr} is not loopback"))
        }
    }
}

fn field<'a>(obj: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

fn string(v: Option<&Value>, what: &str) -> Result<String, String> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("{what} is not a string")),
    }
}

/// RFC 9110 `tchar`, what Go's `validMethod` accepts.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Go writes header values with newlines turned into spaces and trimmed.
fn clean(value: &str) -> String {
    value.replace(['\r', '\n'], " ").trim().to_owned()
}

/// Go's path escaping (`shouldEscape` in `encodePath` mode).
fn escape_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'_'
                    | b'.'
                    | b'~'
                    | b'$'
                    | b'&'
                    | b'+'
                    | b','
                    | b'/'
                    | b':'
                    | b';'
                    | b'='
                    | b'@'
            );
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unescape(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `bufio.Scanner` with `ScanLines`, fed in pieces: complete lines come out
/// without their `\n` and without one trailing `\r`; a line that does not
/// fit the 64 KiB buffer (more than 65535 bytes before its `\n`) is
/// `ErrTooLong`, after which the scanner yields nothing more.
#[derive(Debug, Default)]
pub struct LineScanner {
    pending: Vec<u8>,
}

/// The metrics stream ends here: a line is longer than the scanner's buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct LineTooLong;

impl LineScanner {
    /// Adds body bytes and appends the lines they complete to `lines`. On
    /// `Err` the lines before the overlong one are in `lines` (Go sends
    /// them) and the scanner is done.
    pub fn push(&mut self, mut bytes: &[u8], lines: &mut Vec<Vec<u8>>) -> Result<(), LineTooLong> {
        while let Some(pos) = bytes.iter().position(|b| *b == b'\n') {
            if self.pending.len() + pos >= MAX_LINE_BUFFER {
                return Err(LineTooLong);
            }
            self.pending.extend_from_slice(&bytes[..pos]);
            lines.push(drop_cr(std::mem::take(&mut self.pending)));
            bytes = &bytes[pos + 1..];
        }
        if self.pending.len() + bytes.len() >= MAX_LINE_BUFFER {
            return Err(LineTooLong);
        }
        self.pending.extend_from_slice(bytes);
        Ok(())
    }

    /// At EOF: the last line if it had no `\n` (an empty rest is no line).
    pub fn finish(self) -> Option<Vec<u8>> {
        (!self.pending.is_empty()).then(|| drop_cr(self.pending))
    }
}

fn drop_cr(mut line: Vec<u8>) -> Vec<u8> {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    line
}

/// Serves one CONNECT to its end, as `TunnelSession.ServeConnection` does:
/// decode the JSON, register the connection (here, in this task, so a DATA
/// right behind the CONNECT can miss it, as on a real edge), serve, remove.
pub(super) async fn serve_connection(ctx: Arc<SessionCtx>, msg: Message, kind: MessageType) {
    let record = match ConnectRecord::parse(msg.id, kind, &msg.data) {
        Ok(r) => r,
        Err(error) => {
            debug!(id = msg.id, %error, "kubeedge double: bad connect json, not answered");
            return;
        }
    };
    ctx.shared.record_connect(record.clone());
    let (tx, inbox) = mpsc::channel(INBOX);
    ctx.register(msg.id, tx);
    let sent_remove = match kind {
        MessageType::LogsConnect => serve_get(&ctx, &record, inbox, false).await,
        MessageType::MetricConnect => serve_get(&ctx, &record, inbox, true).await,
        _ => serve_pipe(&ctx, &record, inbox).await,
    };
    if sent_remove {
        ctx.ended(record.id);
    }
    ctx.deregister(msg.id);
}

/// Sends one message; false once the session's writer is gone.
async fn send(ctx: &SessionCtx, id: u64, kind: MessageType, data: &[u8]) -> bool {
    ctx.out
        .send(Outgoing::Message(wire::encode(id, kind, data)))
        .await
        .is_ok()
}

/// The edge's deferred REMOVE_CONNECT: up to three write attempts.
async fn send_remove(ctx: &SessionCtx, id: u64) -> bool {
    for _ in 0..3 {
        if send(ctx, id, MessageType::RemoveConnect, &[]).await {
            return true;
        }
    }
    false
}

/// Consumes the inbox until a REMOVE_CONNECT, ignoring DATA, as the logs and
/// metrics connections' reader goroutine does.
async fn until_remove(inbox: &mut mpsc::Receiver<Message>) {
    while let Some(m) = inbox.recv().await {
        if m.kind == MessageType::RemoveConnect as u64 {
            return;
        }
    }
}

/// Logs (`metrics == false`) and metrics: GET, body to DATA, then REMOVE.
/// Returns whether REMOVE_CONNECT went out.
async fn serve_get(
    ctx: &SessionCtx,
    record: &ConnectRecord,
    mut inbox: mpsc::Receiver<Message>,
    metrics: bool,
) -> bool {
    let body = match get(ctx.kubelet, record, metrics).await {
        Ok(b) => b,
        Err(error) => {
            // `client.Do` failed: the edge returns without sending anything.
            debug!(id = record.id, %error, "kubeedge double: kubelet request failed");
            return false;
        }
    };
    let id = record.mess_id;
    let pump = async {
        if metrics {
            pump_lines(ctx, id, body).await;
        } else {
            pump_chunks(ctx, id, body).await;
        }
    };
    tokio::select! {
        () = pump => {}
        () = until_remove(&mut inbox) => {}
    }
    // The body reader closes `ReadChan` when it stops, before the REMOVE
    // goes out and before the connection is deleted: a message for it from
    // now on would panic a real edge. Closing the inbox makes the read loop
    // count it as late instead.
    inbox.close();
    send_remove(ctx, id).await
}

/// Logs: every piece of the body as DATA of at most 256 bytes.
async fn pump_chunks(ctx: &SessionCtx, id: u64, mut body: Body) {
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        for chunk in data.chunks(READ_CHUNK) {
            if !send(ctx, id, MessageType::Data, chunk).await {
                return;
            }
        }
    }
}

/// Metrics: every line as one DATA with `\n` appended, until EOF, a read
/// error or a line too long for the scanner. Only EOF flushes a last line
/// without newline (`Scanner.Scan` drops it on a read error).
async fn pump_lines(ctx: &SessionCtx, id: u64, mut body: Body) {
    let mut scanner = LineScanner::default();
    let mut lines = Vec::new();
    loop {
        let data = match body.frame().await {
            None => break,
            Some(Err(_)) => return,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
        };
        let scanned = scanner.push(&data, &mut lines);
        for mut line in lines.drain(..) {
            line.push(b'\n');
            if !send(ctx, id, MessageType::Data, &line).await {
                return;
            }
        }
        if scanned.is_err() {
            debug!(id, "kubeedge double: metrics line over 64 KiB, stream ends");
            return;
        }
    }
    if let Some(mut line) = scanner.finish() {
        line.push(b'\n');
        send(ctx, id, MessageType::Data, &line).await;
    }
}

/// The GET Go's `http.Client` makes: exactly the JSON headers plus Host and
/// the default User-Agent; `accept-encoding: identity` forced for metrics.
async fn get(kubelet: SocketAddr, record: &ConnectRecord, metrics: bool) -> Result<Body, String> {
    let target = record.target(kubelet)?;
    let mut req = http::Request::builder()
        .method(http::Method::GET)
        .uri(record.request_uri())
        .header(http::header::HOST, &record.host);
    let agent = record.user_agent();
    if !agent.is_empty() {
        req = req.header(http::header::USER_AGENT, agent);
    }
    for (name, value) in record.other_headers() {
        if metrics && name.eq_ignore_ascii_case("accept-encoding") {
            continue;
        }
        req = req.header(name, value);
    }
    if metrics {
        req = req.header(http::header::ACCEPT_ENCODING, "identity");
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let tcp = dial(target).await?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .title_case_headers(true)
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    // The connection task ends with the body (or the session's JoinSet).
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.into_body())
}

async fn dial(target: SocketAddr) -> Result<TcpStream, String> {
    match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Ok(tcp)
        }
        Ok(Err(e)) => Err(format!("dial {target}: {e}")),
        Err(_) => Err(format!("dial {target}: timed out")),
    }
}

/// Exec and attach: write the request head, never read the response, and
/// pipe bytes both ways. Returns whether REMOVE_CONNECT went out.
async fn serve_pipe(
    ctx: &SessionCtx,
    record: &ConnectRecord,
    mut inbox: mpsc::Receiver<Message>,
) -> bool {
    let method = if record.method.is_empty() {
        "GET"
    } else {
        record.method.as_str()
    };
    let conn = async {
        // `http.NewRequest` refuses a method that is not an HTTP token.
        if !method.bytes().all(is_token_char) {
            return Err(format!("invalid method {method:?}"));
        }
        let mut tcp = dial(record.target(ctx.kubelet)?).await?;
        tcp.write_all(&record.request_head(method))
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(tcp)
    };
    let tcp = match conn.await {
        Ok(tcp) => tcp,
        Err(error) => {
            debug!(id = record.id, %error, "kubeedge double: kubelet dial failed");
            return false;
        }
    };
    let (mut from_kubelet, mut to_kubelet) = tcp.into_split();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The inbox goroutine: DATA written as is (errors only logged), REMOVE
    // closes `stop` and ends the goroutine, so the inbox is no longer
    // drained: later messages pile up in it, as on the real edge.
    let cloud_to_kubelet = async {
        while let Some(m) = inbox.recv().await {
            if m.kind == MessageType::RemoveConnect as u64 {
                let _ = stop_tx.send(true);
                break;
            }
            if m.kind == MessageType::Data as u64
                && let Err(error) = to_kubelet.write_all(&m.data).await
            {
                debug!(id = record.id, %error, "kubeedge double: kubelet write failed");
            }
        }
        std::future::pending::<()>().await;
    };
    // The main loop looks at `stop` only between reads: after a REMOVE it
    // ends when its current read returns (so a quiet kubelet keeps it open,
    // and at most one more DATA follows the cloud's REMOVE).
    let id = record.mess_id;
    let kubelet_to_cloud = async {
        let mut buf = [0u8; READ_CHUNK];
        while !*stop_rx.borrow() {
            match from_kubelet.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !send(ctx, id, MessageType::Data, &buf[..n]).await {
                        break;
                    }
                }
            }
        }
    };
    tokio::select! {
        () = kubelet_to_cloud => {}
        () = cloud_to_kubelet => {}
    }
    // Go's deferred REMOVE runs on every way out of `Serve`.
    send_remove(ctx, id).await
}
