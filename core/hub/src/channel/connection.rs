//! Serving one connection: a new generation replaces the previous
//! connection, the reader and the writer run side by side until either
//! ends, and a guard marks the channel offline when the connection goes.
//! Liveness is split between them: the reader declares the peer dead after
//! `keepalive_timeout` of silence, the writer sends keepalives.

use tokio::io::{AsyncRead, AsyncWrite, BufWriter};
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
            end = self.write_loop(BufWriter::with_capacity(WRITE_BUFFER, wr), ctl_rx, generation) => end,
        }
    }
}

/// The writer's buffer: enough to put a few acks or small messages in one
/// write; larger frames bypass it. Every connected edge holds one.
const WRITE_BUFFER: usize = 2048;

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
