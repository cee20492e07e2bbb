//! Client helpers that speak the kubelet's streaming protocols the way kubectl does.
//!
//! Each helper takes an already connected stream (a plain `TcpStream` to the fixture
//! kubelet, or a TLS stream to Tether's front) so the same test can run with and
//! without the tunnel in between. Every wait is bounded by [`IO_TIMEOUT`], so a broken
//! tunnel fails a test instead of hanging it.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{CONNECTION, HOST, UPGRADE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::ClientRequestBuilder;

use crate::spdy::{self, FLAG_FIN, Frame, FrameReader, FrameWriter, WindowCredit};

/// Longest any single wait (handshake, next frame, next chunk) may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest stdin or port-forward frame sent in one WebSocket message.
const FRAME_LIMIT: usize = 32 * 1024;

/// What an exec returned.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    /// Bytes received on channel 1.
    pub stdout: Vec<u8>,
    /// Bytes received on channel 2.
    pub stderr: Vec<u8>,
    /// The Kubernetes `Status` received on channel 3.
    pub status: serde_json::Value,
    /// 0 on `Success`, the `ExitCode` cause on `NonZeroExitCode`, else -1.
    pub exit_code: i32,
}

async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(IO_TIMEOUT, fut)
        .await
        .with_context(|| format!("timed out after {IO_TIMEOUT:?} waiting for {what}"))
}

/// Builds an exec path like kubectl's, percent-encoding each command argument.
pub fn exec_path(ns: &str, pod: &str, container: &str, command: &[&str], stdin: bool) -> String {
    let mut path = format!("/exec/{ns}/{pod}/{container}?");
    for arg in command {
        path.push_str("command=");
        path.push_str(&percent_encode(arg));
        path.push('&');
    }
    if stdin {
        path.push_str("stdin=1&");
    }
    path.push_str("stdout=1&stderr=1");
    path
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs an exec over WebSocket (`v5.channel.k8s.io`, falling back to v4 if that is what
/// the server picks): sends `stdin` on channel 0, closes stdin (v5 `[255, 0]`), and
/// collects stdout, stderr and the status until the server closes.
pub async fn exec_ws<S>(
    stream: S,
    host: &str,
    path_and_query: &str,
    stdin: &[u8],
) -> anyhow::Result<ExecOutput>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let request = ClientRequestBuilder::new(format!("ws://{host}{path_and_query}").parse()?)
        .with_sub_protocol("v5.channel.k8s.io")
        .with_sub_protocol("v4.channel.k8s.io");
    let (ws, resp) = bounded(
        "exec handshake",
        tokio_tungstenite::client_async(request, stream),
    )
    .await?
    .context("exec handshake")?;
    let v5 = resp
        .headers()
        .get("sec-websocket-protocol")
        .is_some_and(|p| p == "v5.channel.k8s.io");
    let (mut sink, mut source) = ws.split();

    // Like kubectl, a failed stdin copy is not an error: the command may exit without
    // reading it, and what counts is the output and the status.
    let send_stdin = async {
        let frames = stdin.chunks(FRAME_LIMIT).map(|chunk| {
            let mut frame = Vec::with_capacity(chunk.len() + 1);
            frame.push(0);
            frame.extend_from_slice(chunk);
            frame
        });
        let close = v5.then(|| vec![255, 0]);
        for frame in frames.chain(close) {
            if !matches!(
                bounded("stdin", sink.send(Message::binary(frame))).await,
                Ok(Ok(()))
            ) {
                break;
            }
        }
        anyhow::Ok(())
    };
    let collect = async {
        let (mut stdout, mut stderr, mut status) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(msg) = bounded("exec output", source.next()).await? {
            match msg {
                Ok(Message::Binary(data)) => match data.split_first() {
                    Some((1, rest)) => stdout.extend_from_slice(rest),
                    Some((2, rest)) => stderr.extend_from_slice(rest),
                    Some((3, rest)) => status.extend_from_slice(rest),
                    _ => {}
                },
                Ok(Message::Close(_)) => {}
                Ok(_) => {}
                // Everything before the status arrived in order; like kubectl, an
                // unclean close after it does not matter.
                Err(_) if !status.is_empty() => break,
                Err(e) => return Err(e).context("exec stream"),
            }
        }
        anyhow::Ok((stdout, stderr, status))
    };
    let ((), (stdout, stderr, status)) = tokio::try_join!(send_stdin, collect)?;
    ensure!(
        !status.is_empty(),
        "exec stream closed without a status on channel 3"
    );
    let status: serde_json::Value =
        serde_json::from_slice(&status).context("status on channel 3 is not JSON")?;
    let exit_code = exit_code(&status);
    Ok(ExecOutput {
        stdout,
        stderr,
        status,
        exit_code,
    })
}

/// Runs an exec over SPDY/3.1 as kubectl does (client-go `tools/remotecommand`,
/// protocol v5 or v4): `POST` with `Upgrade: SPDY/3.1`; then, one at a time and each
/// awaiting its `SYN_REPLY`, a stream per `streamType`: `error` (whose write half is
/// closed at once), `stdin` if the query asks for it, `stdout`, `stderr`. Sends
/// `stdin` and a `FIN`, collects stdout and stderr until their `FIN` and parses the
/// `Status` the error stream carries. Also ends at the server's `GOAWAY` or EOF.
pub async fn exec_spdy<S>(
    stream: S,
    host: &str,
    path_and_query: &str,
    stdin: &[u8],
) -> anyhow::Result<ExecOutput>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (parts, io) = upgrade_with(
        stream,
        Method::POST,
        host,
        path_and_query,
        "SPDY/3.1",
        &[
            ("X-Stream-Protocol-Version", "v5.channel.k8s.io"),
            ("X-Stream-Protocol-Version", "v4.channel.k8s.io"),
        ],
    )
    .await?;
    let protocol = parts
        .headers
        .get("x-stream-protocol-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    ensure!(
        protocol == "v5.channel.k8s.io" || protocol == "v4.channel.k8s.io",
        "server chose stream protocol {protocol:?}"
    );
    let (read, write) = tokio::io::split(io);
    let mut reader = FrameReader::new(read);
    let (tx, rx) = mpsc::channel(16);
    let writer = tokio::spawn(spdy::write_frames(FrameWriter::new(write)?, rx, IO_TIMEOUT));

    let query = path_and_query.split_once('?').map_or("", |(_, q)| q);
    let asked = |key: &str| {
        query
            .split('&')
            .any(|kv| matches!(kv.split_once('='), Some((k, "1" | "true" | "True")) if k == key))
    };
    let (want_out, want_err) = match (asked("stdout"), asked("stderr")) {
        (false, false) if !asked("stdin") => (true, true),
        other => other,
    };
    let kinds = [
        ("error", true),
        ("stdin", asked("stdin")),
        ("stdout", want_out),
        ("stderr", want_err),
    ];
    let mut exec = SpdyExec::default();
    for (kind, _) in kinds.iter().filter(|(_, on)| *on) {
        let stream_id = 2 * exec.streams.len() as u32 + 1;
        let headers = vec![("streamtype".to_owned(), (*kind).to_owned())];
        let frame = Frame::SynStream {
            stream_id,
            associated_id: 0,
            priority: 0,
            flags: 0,
            headers,
        };
        bounded("SYN_STREAM", tx.send(frame)).await??;
        exec.streams.push(SpdyStream {
            id: stream_id,
            kind,
            open: true,
            credit: WindowCredit::default(),
        });
        // Like client-go's CreateStream: the next stream waits for this reply.
        loop {
            let frame = bounded("SYN_REPLY", reader.read_frame())
                .await??
                .context("connection closed before SYN_REPLY")?;
            if matches!(frame, Frame::SynReply { stream_id: id, .. } if id == stream_id) {
                break;
            }
            ensure!(
                exec.handle(frame, &tx).await?,
                "session ended while opening the {kind} stream"
            );
        }
    }
    let stream_of = |kind: &str| exec.streams.iter().find(|s| s.kind == kind).map(|s| s.id);
    let (error_id, stdin_id) = (stream_of("error"), stream_of("stdin"));
    // Nothing is ever written to the error stream: close our half now.
    if let Some(stream_id) = error_id {
        let fin = Frame::Data {
            stream_id,
            flags: FLAG_FIN,
            data: Bytes::new(),
        };
        bounded("error stream FIN", tx.send(fin)).await??;
    }

    // Like kubectl, a failed stdin copy is not an error: what counts is the output
    // and the status.
    let send_stdin = async {
        let Some(stream_id) = stdin_id else {
            return anyhow::Ok(());
        };
        let frames = stdin.chunks(FRAME_LIMIT).map(|chunk| (0, chunk));
        for (flags, chunk) in frames.chain([(FLAG_FIN, &[][..])]) {
            let frame = Frame::Data {
                stream_id,
                flags,
                data: Bytes::copy_from_slice(chunk),
            };
            if !matches!(bounded("stdin", tx.send(frame)).await, Ok(Ok(()))) {
                break;
            }
        }
        anyhow::Ok(())
    };
    let collect = async {
        while !exec.done() {
            match bounded("exec output", reader.read_frame()).await? {
                Ok(Some(frame)) => {
                    if !exec.handle(frame, &tx).await? {
                        break;
                    }
                }
                Ok(None) => break,
                // Like kubectl, a broken connection after the status does not matter.
                Err(_) if !exec.status.is_empty() => break,
                Err(e) => return Err(e).context("spdy exec stream"),
            }
        }
        anyhow::Ok(())
    };
    tokio::try_join!(send_stdin, collect)?;
    drop(tx);
    let _ = bounded("spdy writer", writer).await;
    ensure!(
        !exec.status.is_empty(),
        "spdy exec ended without a status on the error stream"
    );
    let status: serde_json::Value =
        serde_json::from_slice(&exec.status).context("status on the error stream is not JSON")?;
    let exit_code = exit_code(&status);
    Ok(ExecOutput {
        stdout: exec.stdout,
        stderr: exec.stderr,
        status,
        exit_code,
    })
}

/// Most stdout, stderr and status bytes one SPDY exec collects.
const MAX_EXEC_OUTPUT: usize = 64 << 20;

/// One client stream of a SPDY exec.
struct SpdyStream {
    id: u32,
    kind: &'static str,
    /// The server has not ended its half yet.
    open: bool,
    credit: WindowCredit,
}

/// What a SPDY exec has received so far.
#[derive(Default)]
struct SpdyExec {
    streams: Vec<SpdyStream>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: Vec<u8>,
    session_credit: WindowCredit,
}

impl SpdyExec {
    /// True once the server ended every stream it writes to.
    fn done(&self) -> bool {
        self.streams.iter().all(|s| !s.open || s.kind == "stdin")
    }

    /// Takes in one frame from the server; false when the session is over.
    async fn handle(&mut self, frame: Frame, tx: &mpsc::Sender<Frame>) -> anyhow::Result<bool> {
        match frame {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                let stream = self
                    .streams
                    .iter_mut()
                    .find(|s| s.id == stream_id)
                    .with_context(|| format!("data on unknown stream {stream_id}"))?;
                let sink = match stream.kind {
                    "stdout" => &mut self.stdout,
                    "stderr" => &mut self.stderr,
                    "error" => &mut self.status,
                    _ => bail!("data on the {} stream", stream.kind),
                };
                ensure!(
                    sink.len() + data.len() <= MAX_EXEC_OUTPUT,
                    "over {MAX_EXEC_OUTPUT} bytes on the {} stream",
                    stream.kind
                );
                sink.extend_from_slice(&data);
                if flags & FLAG_FIN != 0 {
                    stream.open = false;
                }
                let updates = [
                    stream.credit.consume(data.len()).map(|d| (stream_id, d)),
                    self.session_credit.consume(data.len()).map(|d| (0, d)),
                ];
                for (stream_id, delta) in updates.into_iter().flatten() {
                    let update = Frame::WindowUpdate { stream_id, delta };
                    bounded("WINDOW_UPDATE", tx.send(update)).await??;
                }
            }
            Frame::RstStream { stream_id, status } => {
                if let Some(stream) = self.streams.iter_mut().find(|s| s.id == stream_id) {
                    ensure!(
                        stream.kind != "error" || !self.status.is_empty(),
                        "error stream reset with status {status}"
                    );
                    stream.open = false;
                }
            }
            Frame::Ping { id } => bounded("PING", tx.send(Frame::Ping { id })).await??,
            Frame::GoAway { .. } => return Ok(false),
            _ => {}
        }
        Ok(true)
    }
}

fn exit_code(status: &serde_json::Value) -> i32 {
    if status["status"] == "Success" {
        return 0;
    }
    if status["reason"] == "NonZeroExitCode"
        && let Some(causes) = status["details"]["causes"].as_array()
    {
        for cause in causes {
            if cause["reason"] == "ExitCode"
                && let Some(code) = cause["message"].as_str().and_then(|m| m.parse().ok())
            {
                return code;
            }
        }
    }
    -1
}

/// Port-forwards over WebSocket (`v4.portforward.k8s.io`): checks the two port
/// announcements, sends `payload` on data channel 0 and returns what comes back on it
/// once `payload.len()` bytes have arrived.
pub async fn port_forward_ws<S>(
    stream: S,
    host: &str,
    path_and_query: &str,
    payload: &[u8],
) -> anyhow::Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let request = ClientRequestBuilder::new(format!("ws://{host}{path_and_query}").parse()?)
        .with_sub_protocol("v4.portforward.k8s.io");
    let (ws, _resp) = bounded(
        "port-forward handshake",
        tokio_tungstenite::client_async(request, stream),
    )
    .await?
    .context("port-forward handshake")?;
    let (mut sink, mut source) = ws.split();

    let mut announced = Vec::new();
    while announced.len() < 2 {
        match bounded("port announcement", source.next()).await? {
            Some(Ok(Message::Binary(data))) => announced.push(data),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).context("port announcement"),
            None => bail!("port-forward closed before both ports were announced"),
        }
    }
    for (channel, frame) in announced.iter().enumerate() {
        ensure!(
            frame.len() == 3 && usize::from(frame[0]) == channel,
            "bad port announcement on channel {channel}: {frame:?}"
        );
    }

    let send = async {
        for chunk in payload.chunks(FRAME_LIMIT) {
            let mut frame = Vec::with_capacity(chunk.len() + 1);
            frame.push(0);
            frame.extend_from_slice(chunk);
            bounded("port-forward send", sink.send(Message::binary(frame))).await??;
        }
        anyhow::Ok(())
    };
    let receive = async {
        let mut echoed = Vec::with_capacity(payload.len());
        while echoed.len() < payload.len() {
            match bounded("port-forward echo", source.next()).await? {
                Some(Ok(Message::Binary(data))) => match data.split_first() {
                    Some((0, rest)) => echoed.extend_from_slice(rest),
                    Some((1, rest)) => {
                        bail!("port-forward error: {}", String::from_utf8_lossy(rest))
                    }
                    _ => {}
                },
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("port-forward stream"),
                None => bail!("port-forward closed after {} bytes", echoed.len()),
            }
        }
        anyhow::Ok(echoed)
    };
    let ((), echoed) = tokio::try_join!(send, receive)?;
    let _ = bounded("port-forward close", sink.send(Message::Close(None))).await;
    Ok(echoed)
}

/// Performs an HTTP/1.1 upgrade (`Upgrade: {upgrade}`) and returns the `101` response
/// head and the upgraded byte stream.
pub async fn raw_upgrade<S>(
    stream: S,
    host: &str,
    path: &str,
    upgrade: &str,
    extra_headers: &[(&str, &str)],
) -> anyhow::Result<(http::response::Parts, TokioIo<Upgraded>)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    upgrade_with(stream, Method::GET, host, path, upgrade, extra_headers).await
}

/// [`raw_upgrade`] with another method (kubectl upgrades exec to SPDY with `POST`).
pub async fn upgrade_with<S>(
    stream: S,
    method: Method,
    host: &str,
    path: &str,
    upgrade: &str,
    extra_headers: &[(&str, &str)],
) -> anyhow::Result<(http::response::Parts, TokioIo<Upgraded>)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, host)
        .header(CONNECTION, "Upgrade")
        .header(UPGRADE, upgrade);
    for (name, value) in extra_headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Empty::<Bytes>::new())?;

    let (mut sender, conn) = bounded(
        "http handshake",
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await??;
    tokio::spawn(conn.with_upgrades());
    let mut resp = bounded("upgrade response", sender.send_request(request)).await??;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let body = read_body(resp.into_body()).await.unwrap_or_default();
        bail!(
            "upgrade refused with {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let upgraded = bounded("upgrade", hyper::upgrade::on(&mut resp)).await??;
    let (parts, _body) = resp.into_parts();
    Ok((parts, TokioIo::new(upgraded)))
}

/// Writes `payload` into an echoing stream while reading the echo back concurrently
/// (so large payloads cannot deadlock on full buffers); returns what came back.
pub async fn echo_through<I>(io: I, payload: &[u8]) -> anyhow::Result<Vec<u8>>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let (mut reader, mut writer) = tokio::io::split(io);
    let write = async {
        for chunk in payload.chunks(FRAME_LIMIT) {
            bounded("echo write", writer.write_all(chunk)).await??;
        }
        bounded("echo flush", writer.flush()).await??;
        anyhow::Ok(())
    };
    let read = async {
        let mut echoed = vec![0; payload.len()];
        let mut filled = 0;
        while filled < echoed.len() {
            let n = bounded("echo read", reader.read(&mut echoed[filled..])).await??;
            ensure!(
                n > 0,
                "echo closed after {filled} of {} bytes",
                payload.len()
            );
            filled += n;
        }
        anyhow::Ok(echoed)
    };
    let ((), echoed) = tokio::try_join!(write, read)?;
    Ok(echoed)
}

/// Sends `GET path_and_query` and returns the response with its body still streaming.
/// The connection lives in a task that ends when the body is dropped.
pub async fn get_streaming<S>(
    stream: S,
    host: &str,
    path_and_query: &str,
) -> anyhow::Result<Response<Incoming>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let request = Request::get(path_and_query)
        .header(HOST, host)
        .body(Empty::<Bytes>::new())?;
    let (mut sender, conn) = bounded(
        "http handshake",
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await??;
    tokio::spawn(conn);
    Ok(bounded("response head", sender.send_request(request)).await??)
}

/// Sends `GET path_and_query` and returns the response head and the whole body.
pub async fn get<S>(
    stream: S,
    host: &str,
    path_and_query: &str,
) -> anyhow::Result<(http::response::Parts, Bytes)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (parts, body) = get_streaming(stream, host, path_and_query)
        .await?
        .into_parts();
    Ok((parts, read_body(body).await?))
}

/// Reads a fixture log stream into `verifier` until it has checked `limit`
/// bytes or the body ends.
pub async fn read_log(
    body: &mut Incoming,
    verifier: &mut crate::fixture::LogVerifier,
    limit: u64,
) -> anyhow::Result<()> {
    while verifier.offset() < limit {
        let Some(chunk) = next_chunk(body).await? else {
            break;
        };
        verifier.update(&chunk)?;
    }
    Ok(())
}

/// The next data chunk of `body`, or `None` at its end.
pub async fn next_chunk(body: &mut Incoming) -> anyhow::Result<Option<Bytes>> {
    loop {
        match bounded("body chunk", body.frame()).await? {
            None => return Ok(None),
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// Reads `body` to its end (each chunk within [`IO_TIMEOUT`]).
pub async fn read_body(mut body: Incoming) -> anyhow::Result<Bytes> {
    let mut all = Vec::new();
    while let Some(chunk) = next_chunk(&mut body).await? {
        all.extend_from_slice(&chunk);
    }
    Ok(all.into())
}
