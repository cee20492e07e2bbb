//! Serving one connection: a new generation replaces the previous
//! connection, the reader and the writer run side by side until either
//! ends, and a guard marks the channel offline when the connection goes.
//! Liveness is split between them: the reader declares the peer dead after
//! `keepalive_timeout` of silence, the writer sends keepalives.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Channel, ConnectionEnd};

impl Channel {
    /// Serves one connection until it fails, the peer goes silent, or a
    /// newer connection takes over. Unacknowledged messages are resent
    /// first, in order.
    pub async fn serve<IO>(&self, io: IO) -> ConnectionEnd
    where
        IO: AsyncRead + AsyncWrite,
    {
        let hook = self.inner.on_connect.get().cloned();
        let generation = {
            let mut st = self.lock();
            st.generation += 1;
            st.in_flight = 0;
            st.connected = true;
            st.barriers.clear();
            st.rewind = false;
            st.hold_until = hook.as_ref().map(|(_, hold)| Instant::now() + *hold);
            st.generation
        };
        // Wake a previous connection's writer so it sees it was replaced.
        self.inner.wake.notify_waiters();
        if let Some((hook, _)) = hook {
            hook(self);
        }
        self.inner.metrics.online.inc();
        let _guard = ConnectionGuard {
            channel: self,
            generation,
        };
        let (rd, wr) = tokio::io::split(io);
        // Acks, defers and errors the reader hands the writer. The peer has
        // at most `window` messages unacknowledged, so with room for several
        // windows of acks the reader never waits on the writer: otherwise two
        // writers blocked on each other's full sockets, each with its reader
        // waiting for room here, would deadlock.
        let (ctl_tx, ctl_rx) = mpsc::channel(self.inner.cfg.window.max(64) * 4);
        tokio::select! {
            // No read buffer: the stream is an h2 stream (a tunnel's or the
            // hub session's) whose reads are copies from memory already,
            // and an idle channel would hold 8 KiB for nothing.
            end = self.read_loop(rd, ctl_tx) => end,
            end = self.write_loop(Batched::new(wr), ctl_rx, generation) => end,
        }
    }
}

/// The writer's batch: enough to put a few acks or small messages in one
/// write (one h2 DATA frame); larger frames bypass it.
const WRITE_BUFFER: usize = 2048;

/// Batches small writes until a flush, like `BufWriter`, but holds no
/// memory between flushes: every connected edge has a writer, and nearly
/// all of them are idle (a resident 2 KiB buffer each costs 36 MiB at
/// 18,000 edges).
struct Batched<W> {
    inner: W,
    buf: Vec<u8>,
    /// How much of `buf` is written.
    done: usize,
}

impl<W: AsyncWrite + Unpin> Batched<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            done: 0,
        }
    }

    /// Writes out the whole batch, then frees it.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.done < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.done += n;
        }
        self.buf = Vec::new();
        self.done = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Batched<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.buf.len() + data.len() > WRITE_BUFFER {
            ready!(this.poll_drain(cx))?;
        }
        if data.len() >= WRITE_BUFFER {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        if this.buf.capacity() == 0 {
            this.buf.reserve_exact(WRITE_BUFFER);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct ConnectionGuard<'a> {
    channel: &'a Channel,
    generation: u64,
}

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.channel.lock();
        if st.generation == self.generation {
            st.connected = false;
            st.in_flight = 0;
        }
        drop(st);
        self.channel.inner.metrics.online.dec();
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn batched_writes_arrive_whole_and_in_order_and_nothing_is_held_after_a_flush() {
        let (a, mut b) = tokio::io::duplex(64 << 10);
        let mut w = Batched::new(a);
        let small: Vec<u8> = (0..100u8).collect();
        let large = vec![7u8; 3 * WRITE_BUFFER];
        w.write_all(&small).await.unwrap();
        assert_eq!(w.buf.len(), 100, "small writes wait for the flush");
        w.write_all(&large).await.unwrap();
        w.write_all(&small).await.unwrap();
        w.flush().await.unwrap();
        assert_eq!(w.buf.capacity(), 0, "an idle writer holds no buffer");
        let mut got = vec![0u8; 200 + large.len()];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..100], &small[..]);
        assert_eq!(&got[100..100 + large.len()], &large[..]);
        assert_eq!(&got[100 + large.len()..], &small[..]);
    }
}
