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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

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
    control: WsControl,
}

/// Prefix of the WebSocket Ping by which a stopping cloud tells an edge how
/// long to wait before it reconnects (ADR 0023). A Ping, because every
/// WebSocket peer answers and otherwise ignores one, so an edge that does not
/// know it is unaffected, and because it travels ahead of the h2 GOAWAY that
/// ends the session, so the edge has it before the session is over.
const RECONNECT_PING: &[u8] = b"tether-reconnect-after-ms=";

/// The most a reconnect delay the peer announced may ask for; longer is
/// taken as this.
pub const MAX_RECONNECT_AFTER: Duration = Duration::from_secs(600);

/// A handle on a [`WsStream`] from outside, shared with it: aborts it (a
/// revoked node), announces a reconnect delay to the peer, and tells how the
/// peer closed it.
#[derive(Clone, Debug, Default)]
pub struct WsControl(std::sync::Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    killed: AtomicBool,
    reader: std::sync::Mutex<Option<std::task::Waker>>,
    /// The peer sent its WebSocket close: it ended the session.
    peer_closed: AtomicBool,
    /// A reconnect delay to announce before the next bytes sent, in ms + 1
    /// (0: none).
    announce: AtomicU64,
    /// The reconnect delay the peer announced, in ms + 1 (0: none).
    announced: AtomicU64,
}

impl WsControl {
    /// Fails the stream's I/O from now on and wakes its reader.
    pub fn kill(&self) {
        self.0.killed.store(true, Ordering::Release);
        if let Some(w) = self.0.reader.lock().expect("kill lock").take() {
            w.wake();
        }
    }

    /// True once [`WsControl::kill`] was called.
    pub fn is_killed(&self) -> bool {
        self.0.killed.load(Ordering::Acquire)
    }

    /// Tells the peer, ahead of anything sent from now on (a closing
    /// session's GOAWAY), to wait `after` before it reconnects.
    pub fn announce_reconnect(&self, after: Duration) {
        self.0
            .announce
            .store(millis_plus_one(after), Ordering::Release);
    }

    /// True from when the peer's WebSocket close arrived: the session ended
    /// by the peer's choice, whatever error the layers above report after.
    pub fn peer_closed(&self) -> bool {
        self.0.peer_closed.load(Ordering::Acquire)
    }

    /// The reconnect delay the peer announced, at most [`MAX_RECONNECT_AFTER`].
    pub fn reconnect_after(&self) -> Option<Duration> {
        match self.0.announced.load(Ordering::Acquire) {
            0 => None,
            n => Some(Duration::from_millis(n - 1).min(MAX_RECONNECT_AFTER)),
        }
    }

    fn check(&self, cx: Option<&Context<'_>>) -> io::Result<()> {
        if let Some(cx) = cx {
            *self.0.reader.lock().expect("kill lock") = Some(cx.waker().clone());
        }
        if self.0.killed.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "session terminated",
            ));
        }
        Ok(())
    }

    /// Records a Ping's payload if it is a reconnect announcement.
    fn on_ping(&self, payload: &[u8]) {
        let ms = payload
            .strip_prefix(RECONNECT_PING)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(ms) = ms {
            let after = Duration::from_millis(ms).min(MAX_RECONNECT_AFTER);
            self.0
                .announced
                .store(millis_plus_one(after), Ordering::Release);
        }
    }
}

fn millis_plus_one(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX - 1)
        .min(u64::MAX - 1)
        + 1
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
            control: WsControl::default(),
        }
    }

    /// The handle that aborts this stream, announces a reconnect delay to
    /// the peer and tells how the peer closed it.
    pub fn control(&self) -> WsControl {
        self.control.clone()
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
        ready!(self.poll_send_announcement(cx))?;
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

    /// Sends the reconnect announcement, if one is pending, ahead of the
    /// buffered bytes.
    fn poll_send_announcement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.control.0.announce.load(Ordering::Acquire) == 0 {
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(ws_io)?;
        let ms = self.control.0.announce.swap(0, Ordering::AcqRel);
        if ms == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut payload = RECONNECT_PING.to_vec();
        payload.extend_from_slice((ms - 1).to_string().as_bytes());
        Pin::new(&mut self.ws)
            .start_send(Message::Ping(payload.into()))
            .map_err(ws_io)?;
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
        this.control.check(Some(cx))?;
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
                Some(Ok(Message::Ping(p))) => this.control.on_ping(&p),
                Some(Ok(Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text message on a binary tunnel",
                    )));
                }
                Some(Ok(Message::Close(_))) => {
                    this.control.0.peer_closed.store(true, Ordering::Release);
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
        this.control.check(None)?;
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
    async fn an_announced_reconnect_arrives_ahead_of_the_next_bytes() {
        let (mut a, mut b) = pair(1024).await;
        assert_eq!(b.control().reconnect_after(), None);
        a.control().announce_reconnect(Duration::from_millis(1_500));
        a.write_all(b"goaway").await.unwrap();
        a.flush().await.unwrap();
        let mut buf = [0u8; 6];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"goaway");
        assert_eq!(
            b.control().reconnect_after(),
            Some(Duration::from_millis(1_500))
        );
    }

    /// A plain WebSocket client facing a tunnel stream, to send what a
    /// tunnel peer would not.
    async fn raw_and_tunnel() -> (
        WebSocketStream<tokio::io::DuplexStream>,
        WsStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(4096);
        let raw = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let b = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        (raw, WsStream::new(b, 1024))
    }

    #[tokio::test]
    async fn other_pings_are_ignored_and_a_huge_delay_is_capped() {
        use futures_util::SinkExt;
        let (mut raw, mut b) = raw_and_tunnel().await;
        let mut buf = [0u8; 1];
        let cases = [
            (&b"hello"[..], None),
            (b"tether-reconnect-after-ms=", None),
            (b"tether-reconnect-after-ms=-5", None),
            (
                b"tether-reconnect-after-ms=99999999999999999",
                Some(MAX_RECONNECT_AFTER),
            ),
        ];
        for (ping, want) in cases {
            raw.send(Message::Ping(ping.to_vec().into())).await.unwrap();
            raw.send(Message::binary(&b"x"[..])).await.unwrap();
            b.read_exact(&mut buf).await.unwrap();
            assert_eq!(b.control().reconnect_after(), want, "{ping:?}");
        }
    }

    #[tokio::test]
    async fn text_message_is_an_error() {
        use futures_util::SinkExt;
        let (mut raw, mut b) = raw_and_tunnel().await;
        raw.send(Message::text("hello")).await.unwrap();
        let mut buf = [0u8; 16];
        let err = b.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
