//! [`PipeIo`]: the byte stream hyper's HTTP/1 client runs over for one
//! connection of a KubeEdge session.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::PollSender;

use super::codec::{MessageType, encode_message};
use super::session::{MAX_DATA, REMOVE_GRACE};
use super::state::{Out, Shared};

/// The cloud-side byte stream of one connection: reads take the edge's
/// queued DATA (coalesced, as much as the reader's buffer holds); writes
/// after the request head become DATA messages. Dropping it ends the
/// connection.
pub(super) struct PipeIo {
    pub(super) shared: Arc<Shared>,
    pub(super) id: u64,
    pub(super) tx: PollSender<Out>,
    /// How many bytes of `\r\n\r\n` were matched at the end of the head.
    pub(super) head_end: u8,
    pub(super) head_seen: usize,
}

impl PipeIo {
    pub(super) fn head_done(&self) -> bool {
        self.head_end == 4
    }
}

impl AsyncRead for PipeIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut st = self.shared.lock();
        let st = &mut *st;
        let Some(c) = st.conns.get_mut(&self.id) else {
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        };
        // hyper reads an idle connection to notice it closing; the edge may
        // answer before hyper has even written the request, and hyper
        // refuses a response it did not ask for yet.
        if !self.head_done() {
            c.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if let Some(reason) = c.failed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("kubeedge stream ended: {reason}"),
            )));
        }
        if c.queue.is_empty() {
            if c.edge_removed {
                return Poll::Ready(Ok(()));
            }
            c.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut taken = 0;
        while buf.remaining() > 0
            && let Some(front) = c.queue.front_mut()
        {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.advance(n);
            taken += n;
            if front.is_empty() {
                c.queue.pop_front();
            }
        }
        c.queued -= taken;
        st.queued_total -= taken;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for PipeIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !self.head_done() {
            // hyper's request head: the EXEC_CONNECT JSON already carries it.
            let mut used = 0;
            for &b in data {
                used += 1;
                let want = b"\r\n\r\n"[self.head_end as usize];
                self.head_end = match (b == want, b == b'\r') {
                    (true, _) => self.head_end + 1,
                    (false, true) => 1,
                    (false, false) => 0,
                };
                if self.head_done() {
                    break;
                }
            }
            self.head_seen += used;
            if self.head_done()
                && let Some(c) = self.shared.lock().conns.get_mut(&self.id)
            {
                c.wake();
            }
            if self.head_seen > self.shared.opts.max_header_bytes + (64 << 10) {
                return Poll::Ready(Err(io::Error::other("request head too large")));
            }
            return Poll::Ready(Ok(used));
        }
        let this = &mut *self;
        if ready!(this.tx.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let st = this.shared.lock();
        let open = st
            .conns
            .get(&this.id)
            .is_some_and(|c| !c.silent() && c.failed.is_none());
        if !open {
            drop(st);
            this.tx.abort_send();
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = data.len().min(MAX_DATA);
        let msg = encode_message(this.id, MessageType::Data, &data[..n]);
        // Sent under the lock, so a REMOVE queued after this check is
        // written after this DATA, never before it.
        let sent = this.tx.send_item(Out::Data(this.id, msg));
        drop(st);
        match sent {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// No half-close exists: the connection ends when the pipe is dropped.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Drop for PipeIo {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        let st = &mut *st;
        let Some(c) = st.conns.get_mut(&self.id) else {
            return;
        };
        c.pipe_dropped = true;
        c.permit = None;
        st.queued_total -= c.queued;
        c.queue.clear();
        c.queued = 0;
        if c.edge_removed || c.remove_written || st.ended {
            st.conns.remove(&self.id);
        } else if !c.remove_queued {
            c.remove_queued = true;
            st.deferred
                .push_back((self.id, Instant::now() + REMOVE_GRACE));
        }
        // Also tells a closing session that a stream is done.
        self.shared.wake_writer.notify_one();
    }
}
