//! Adapts a binary WebSocket to a byte stream for h2.
//!
//! Writes are buffered until h2 flushes or the buffer reaches the message cap,
//! so an h2 frame header and its payload travel in one message; h2's flush is
//! passed through so small control frames never wait. Reads hand out each
//! binary message in turn. Ping/pong are answered by tungstenite; a text
//! message is a protocol violation. Shutdown closes every layer in order:
//! WebSocket close frame, then TLS close_notify.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// A WebSocket carrying the tunnel's bytes in binary messages.
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    read_buf: Bytes,
    read_eof: bool,
    write_buf: BytesMut,
    message_cap: usize,
    closed: bool,
    on_drop: Option<tokio::sync::watch::Sender<bool>>,
    kill: KillSwitch,
    /// Set when the peer sent its WebSocket close: it ended the session.
    peer_closed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Aborts a [`WsStream`] from outside: its reads and writes fail at once,
/// so everything on top of it (h2, every stream) fails fast. Used when a
/// node's certificate is revoked.
#[derive(Clone, Debug, Default)]
pub struct KillSwitch(std::sync::Arc<KillInner>);

#[derive(Debug, Default)]
struct KillInner {
    killed: std::sync::atomic::AtomicBool,
    reader: std::sync::Mutex<Option<std::task::Waker>>,
}

impl KillSwitch {
    /// Fails the stream's I/O from now on and wakes its reader.
    pub fn kill(&self) {
        self.0
            .killed
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(w) = self.0.reader.lock().expect("kill lock").take() {
            w.wake();
        }
    }

    /// True once [`KillSwitch::kill`] was called.
    pub fn is_killed(&self) -> bool {
        self.0.killed.load(std::sync::atomic::Ordering::Acquire)
    }

    fn check(&self, cx: Option<&Context<'_>>) -> io::Result<()> {
        if let Some(cx) = cx {
            *self.0.reader.lock().expect("kill lock") = Some(cx.waker().clone());
        }
        if self.0.killed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "session terminated",
            ));
        }
        Ok(())
    }
}

impl<S> Drop for WsStream<S> {
    fn drop(&mut self) {
        if let Some(tx) = self.on_drop.take() {
            tx.send_replace(true);
        }
    }
}

impl<S> std::fmt::Debug for WsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsStream")
            .field("buffered_read", &self.read_buf.len())
            .field("buffered_write", &self.write_buf.len())
            .finish()
    }
}

impl<S> WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Wraps an established WebSocket. Outgoing messages carry at most
    /// `message_cap` bytes plus a little slack, so a full-size h2 frame with
    /// its 9-byte header is not split.
    pub fn new(ws: WebSocketStream<S>, message_cap: usize) -> Self {
        Self {
            ws,
            read_buf: Bytes::new(),
            read_eof: false,
            write_buf: BytesMut::new(),
            message_cap: message_cap + 64,
            closed: false,
            on_drop: None,
            kill: KillSwitch::default(),
            peer_closed: Default::default(),
        }
    }

    /// True from when the peer's WebSocket close arrives: the session ended
    /// by the peer's choice, whatever error the layers above report after.
    pub fn peer_closed(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let flag = self.peer_closed.clone();
        move || flag.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A handle that aborts this stream.
    pub fn kill_switch(&self) -> KillSwitch {
        self.kill.clone()
    }

    /// Sets `true` on the returned channel when the stream is dropped, i.e.
    /// when its owner has finished closing (or abandoned) every layer.
    pub fn watch_drop(&mut self) -> tokio::sync::watch::Receiver<bool> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        self.on_drop = Some(tx);
        rx
    }

    /// The underlying transport (e.g. to read the peer certificate).
    pub fn get_ref(&self) -> &S {
        self.ws.get_ref()
    }

    fn poll_send_buffered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_buf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(ws_io)?;
        // Take the buffer whole: `split()` would keep the spare capacity of a
        // full message allocated for the life of an idle session.
        let msg = Message::Binary(std::mem::take(&mut self.write_buf).freeze());
        Pin::new(&mut self.ws).start_send(msg).map_err(ws_io)?;
        Poll::Ready(Ok(()))
    }

    fn buffer(&mut self, bufs: &[io::IoSlice<'_>]) -> usize {
        // Grow once for everything this write brings, up to a whole message:
        // a PING costs tens of bytes, not a message-sized allocation (64 KiB
        // per keepalive per session made malloc the top cost of a reconnect
        // storm). Nothing is held while idle: the buffer is taken when sent.
        let wanted: usize = bufs.iter().map(|b| b.len()).sum();
        let room = self.message_cap - self.write_buf.len();
        self.write_buf.reserve(wanted.min(room));
        let mut n = 0;
        for b in bufs {
            let room = self.message_cap - self.write_buf.len();
            if room == 0 {
                break;
            }
            let take = room.min(b.len());
            self.write_buf.extend_from_slice(&b[..take]);
            n += take;
        }
        n
    }
}

fn ws_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed")
        }
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S> AsyncRead for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.kill.check(Some(cx))?;
        loop {
            if !this.read_buf.is_empty() {
                let n = this.read_buf.len().min(buf.remaining());
                buf.put_slice(&this.read_buf[..n]);
                this.read_buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => this.read_buf = b,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text message on a binary tunnel",
                    )));
                }
                Some(Ok(Message::Close(_))) => {
                    this.peer_closed
                        .store(true, std::sync::atomic::Ordering::Release);
                    this.read_eof = true
                }
                None => this.read_eof = true,
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                    this.read_eof = true
                }
                Some(Err(e)) => return Poll::Ready(Err(ws_io(e))),
            }
        }
    }
}

impl<S> AsyncWrite for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.kill.check(None)?;
        if this.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if this.write_buf.len() >= this.message_cap {
            ready!(this.poll_send_buffered(cx))?;
        }
        Poll::Ready(Ok(this.buffer(bufs)))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_buffered(cx))?;
        Pin::new(&mut this.ws).poll_flush(cx).map_err(ws_io)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closed {
            ready!(this.poll_send_buffered(cx))?;
            // Sends the close frame and flushes it.
            match ready!(Pin::new(&mut this.ws).poll_close(cx)) {
                Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {}
                Err(e) => return Poll::Ready(Err(ws_io(e))),
            }
            this.closed = true;
        }
        // Then TLS close_notify and TCP FIN.
        Pin::new(this.ws.get_mut()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    async fn pair(
        cap: usize,
    ) -> (
        WsStream<tokio::io::DuplexStream>,
        WsStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let a = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let b = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        (WsStream::new(a, cap), WsStream::new(b, cap))
    }

    #[tokio::test]
    async fn bytes_cross_in_order_across_message_boundaries() {
        let (mut a, mut b) = pair(1024).await;
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let expect = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in data.chunks(777) {
                a.write_all(chunk).await.unwrap();
            }
            a.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, expect);
    }

    #[tokio::test]
    async fn text_message_is_an_error() {
        use futures_util::SinkExt;
        let (a, b) = tokio::io::duplex(4096);
        let mut raw = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let b = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        let mut b = WsStream::new(b, 1024);
        raw.send(Message::text("hello")).await.unwrap();
        let mut buf = [0u8; 16];
        let err = b.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
