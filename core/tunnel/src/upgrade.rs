//! The byte stream of an upgraded or CONNECT response from a node session.
//! The cloud's Tether sessions drive h2 directly, so hyper's
//! `hyper::upgrade::on` knows nothing of their responses: the session leaves
//! the stream's h2 halves in the response extensions and [`on`] takes them
//! out. Responses hyper built (KubeEdge sessions, forwarding between
//! replicas) fall back to hyper's upgrade.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http::Response;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::flow::FlowTicket;

/// Why a response yields no byte stream.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Someone already took this response's byte stream.
    #[error("the upgraded stream was already taken")]
    Taken,
    /// hyper's upgrade failed (a response hyper built).
    #[error("upgrade failed: {0}")]
    Hyper(#[from] hyper::Error),
}

/// Largest write handed to h2 at once; h2 bounds its per-stream buffer too.
const MAX_WRITE: usize = 1 << 20;

/// An h2 stream used as a bidirectional byte stream. Reading releases
/// window as bytes are copied out and tells the window governor.
pub struct H2Io {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    /// Received and not yet copied out: one DATA frame at most.
    buf: Bytes,
    ticket: FlowTicket,
    shut: bool,
}

impl std::fmt::Debug for H2Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Io")
            .field("stream", &self.recv.stream_id())
            .finish()
    }
}

impl H2Io {
    pub(crate) fn new(
        send: h2::SendStream<Bytes>,
        recv: h2::RecvStream,
        ticket: FlowTicket,
    ) -> Self {
        Self {
            send,
            recv,
            buf: Bytes::new(),
            ticket,
            shut: false,
        }
    }
}

fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2 i/o"));
    }
    match e.reason() {
        // The peer ended the stream without error.
        Some(h2::Reason::NO_ERROR) | Some(h2::Reason::CANCEL) => {
            io::Error::new(io::ErrorKind::BrokenPipe, e)
        }
        _ => io::Error::other(e),
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = &mut *self;
        while me.buf.is_empty() {
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(data)) => me.buf = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = me.buf.len().min(out.remaining());
        out.put_slice(&me.buf[..n]);
        me.buf.advance(n);
        me.recv
            .flow_control()
            .release_capacity(n)
            .map_err(h2_io_error)?;
        me.ticket.pulled(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        let cap = loop {
            let cap = send.capacity();
            if cap > 0 {
                break cap;
            }
            send.reserve_capacity(buf.len().min(MAX_WRITE));
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        };
        let n = cap.min(buf.len());
        send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes as the connection task runs; nothing waits here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            self.send
                .send_data(Bytes::new(), true)
                .map_err(h2_io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Where a session leaves an upgraded stream for [`on`]. Extensions must be
/// `Clone + Sync`; the first [`on`] takes the stream.
#[derive(Clone)]
pub(crate) struct H2Upgrade(Arc<Mutex<Option<H2Io>>>);

impl H2Upgrade {
    pub(crate) fn new(io: H2Io) -> Self {
        Self(Arc::new(Mutex::new(Some(io))))
    }

    fn take(&self) -> Option<H2Io> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The byte stream of an upgraded (`101`) or CONNECT (`2xx`) response.
#[derive(Debug)]
pub enum TunnelIo {
    /// A stream of a Tether session (direct h2).
    H2(H2Io),
    /// A stream hyper upgraded.
    Hyper(TokioIo<hyper::upgrade::Upgraded>),
}

/// Takes the byte stream of `resp`, a response from a node session: the h2
/// stream a Tether session left in it, or hyper's upgrade otherwise.
pub fn on<B>(
    resp: &mut Response<B>,
) -> impl Future<Output = Result<TunnelIo, UpgradeError>> + Send + 'static {
    let direct = resp
        .extensions_mut()
        .remove::<H2Upgrade>()
        .map(|u| u.take().ok_or(UpgradeError::Taken));
    let fallback = direct.is_none().then(|| hyper::upgrade::on(resp));
    async move {
        match (direct, fallback) {
            (Some(io), _) => io.map(TunnelIo::H2),
            (None, Some(up)) => Ok(TunnelIo::Hyper(TokioIo::new(up.await?))),
            (None, None) => Err(UpgradeError::Taken),
        }
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::H2(io) => Pin::new(io).poll_read(cx, buf),
            Self::Hyper(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::H2(io) => Pin::new(io).poll_write(cx, buf),
            Self::Hyper(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::H2(io) => Pin::new(io).poll_flush(cx),
            Self::Hyper(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::H2(io) => Pin::new(io).poll_shutdown(cx),
            Self::Hyper(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}
