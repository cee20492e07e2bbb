//! Connections from the edge agent to local endpoints: the kubelet (plain HTTP
//! to edged on 127.0.0.1:10350, or HTTPS with a client certificate to a real
//! kubelet on :10250) and allow-listed plain-HTTP endpoints. Connections are
//! pooled per endpoint; upgrades take their connection out of the pool.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use tether_tunnel::Body;

/// Failure reaching a local endpoint.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The endpoint URL is unusable.
    #[error("invalid kubelet endpoint {0:?}: want http://host:port or https://host:port")]
    Url(String),
    /// HTTPS was asked for without a TLS configuration.
    #[error("kubelet endpoint {0} is https but no kubelet TLS configuration was given")]
    NoTls(String),
}

/// Deadlines towards the kubelet and allow-listed endpoints. A request that
/// passes one is answered 504 with a Status naming it, and counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KubeletTimeouts {
    /// TCP connect, plus the TLS handshake to an `https://` kubelet.
    pub connect: Duration,
    /// How long the endpoint may go without taking request body or sending
    /// the response head. Once the head has arrived nothing is cut: logs
    /// `follow`, exec, attach and port-forward stream for as long as they last.
    pub response_headers: Duration,
}

impl Default for KubeletTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            response_headers: Duration::from_secs(60),
        }
    }
}

/// The kubelet endpoint and how to talk to it.
#[derive(Clone)]
pub struct KubeletEndpoint {
    pub(crate) base: Uri,
    pub(crate) addr: SocketAddr,
    pub(crate) tls: Option<(TlsConnector, ServerName<'static>)>,
    pub(crate) timeouts: KubeletTimeouts,
}

impl std::fmt::Debug for KubeletEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletEndpoint")
            .field("base", &self.base)
            .finish()
    }
}

impl KubeletEndpoint {
    /// `url` is `http://ip:port` or `https://ip:port`; `tls` (required for
    /// https) verifies the kubelet and may carry a client certificate;
    /// `server_name` is the name the kubelet certificate must carry
    /// (defaults to the URL's host).
    pub fn new(
        url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        server_name: Option<&str>,
    ) -> Result<Self, LocalError> {
        let base: Uri = url.parse().map_err(|_| LocalError::Url(url.to_owned()))?;
        let addr: SocketAddr = base
            .authority()
            .ok_or_else(|| LocalError::Url(url.to_owned()))?
            .as_str()
            .parse()
            .map_err(|_| LocalError::Url(url.to_owned()))?;
        let tls = match base.scheme_str() {
            Some("http") => None,
            Some("https") => {
                let cfg = tls.ok_or_else(|| LocalError::NoTls(url.to_owned()))?;
                let name = server_name
                    .map(str::to_owned)
                    .unwrap_or_else(|| addr.ip().to_string());
                let name =
                    ServerName::try_from(name).map_err(|_| LocalError::Url(url.to_owned()))?;
                Some((TlsConnector::from(cfg), name))
            }
            _ => return Err(LocalError::Url(url.to_owned())),
        };
        Ok(Self {
            base,
            addr,
            tls,
            timeouts: KubeletTimeouts::default(),
        })
    }

    /// Replaces the default deadlines.
    pub fn with_timeouts(mut self, timeouts: KubeletTimeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The kubelet's socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A pooled HTTP/1.1 client for local endpoints.
pub(crate) type LocalClient = hyper_util::client::legacy::Client<LocalConnector, Body>;

/// Largest read buffer, hence body chunk, per local connection.
const LOCAL_READ_BUF: usize = 64 << 10;

pub(crate) fn client(kubelet: &KubeletEndpoint) -> LocalClient {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        // Caps each body chunk read from the kubelet (hyper's default grows
        // to ~400 KiB). Every stream holds up to two chunks beyond its h2 send
        // buffer, so this bounds the edge's memory per stream (ADR 0015).
        .http1_max_buf_size(LOCAL_READ_BUF)
        .build(LocalConnector {
            tls: kubelet.tls.clone(),
            timeout: kubelet.timeouts.connect,
        })
}

/// True when `e` (a client error) is the connector's deadline passing.
pub(crate) fn is_connect_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Connects to local endpoints; `https` URIs get TLS with the kubelet config.
#[derive(Clone)]
pub(crate) struct LocalConnector {
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timeout: Duration,
}

impl tower_service::Service<Uri> for LocalConnector {
    type Response = TokioIo<LocalStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let limit = self.timeout;
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "uri has no authority"))?
                .to_string();
            // One deadline for TCP and TLS together.
            let deadline = tokio::time::Instant::now() + limit;
            let tcp = tokio::time::timeout_at(deadline, TcpStream::connect(&authority))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "local connect timed out")
                })??;
            let _ = tcp.set_nodelay(true);
            match (uri.scheme_str(), tls) {
                (Some("https"), Some((connector, name))) => {
                    let s = tokio::time::timeout_at(deadline, connector.connect(name, tcp))
                        .await
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::TimedOut, "kubelet tls timed out")
                        })??;
                    Ok(TokioIo::new(LocalStream::Tls(Box::new(s))))
                }
                (Some("https"), None) => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "https endpoint without tls configuration",
                )),
                _ => Ok(TokioIo::new(LocalStream::Plain(tcp))),
            }
        })
    }
}

/// A connection to a local endpoint.
pub(crate) enum LocalStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for LocalStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for LocalStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for LocalStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// When the local endpoint last made progress on a request: took a chunk of
/// the request body, or finished taking it. The response-header deadline
/// counts from there, so a long upload to a live kubelet is never cut, while
/// a kubelet that stops taking the body or answering is.
#[derive(Clone)]
pub(crate) struct Progress {
    start: tokio::time::Instant,
    /// Milliseconds after `start`, or [`WAITING_ON_CLIENT`].
    last_ms: Arc<AtomicU64>,
}

/// The body is waiting for the client's next chunk: the endpoint is not late.
const WAITING_ON_CLIENT: u64 = u64::MAX;

impl Progress {
    pub(crate) fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Since when the endpoint owes us progress; None while the request body
    /// waits for the client.
    pub(crate) fn idle_since(&self) -> Option<tokio::time::Instant> {
        match self.last_ms.load(Ordering::Relaxed) {
            WAITING_ON_CLIENT => None,
            ms => Some(self.start + Duration::from_millis(ms)),
        }
    }

    /// `body`, reporting each chunk the endpoint takes.
    pub(crate) fn track(&self, body: Body) -> Body {
        use http_body_util::BodyExt;
        ProgressBody {
            inner: body,
            progress: self.clone(),
        }
        .boxed_unsync()
    }
}

struct ProgressBody {
    inner: Body,
    progress: Progress,
}

impl http_body::Body for ProgressBody {
    type Data = bytes::Bytes;
    type Error = tether_tunnel::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let ms = match polled {
            Poll::Pending => WAITING_ON_CLIENT,
            Poll::Ready(_) => {
                u64::try_from(self.progress.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
            }
        };
        self.progress.last_ms.store(ms, Ordering::Relaxed);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
