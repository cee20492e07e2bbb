//! Bodies on a direct h2 stream of the cloud's session: the request body
//! piped into h2's send side under its flow control, and the response body
//! read from h2's receive side, releasing window only as the consumer pulls
//! data (so a stalled consumer holds no more than its window) and telling
//! the window governor what was taken.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::body::{Body as _, Frame, SizeHint};

use crate::flow::FlowTicket;
use crate::session::{Body, BoxError, StreamPermit};

/// A response body over an h2 stream. Holds the stream's slot and its place
/// in the governor until it ends or is dropped.
pub(crate) struct RecvBody {
    recv: h2::RecvStream,
    /// None for the round-trip probe, which the governor does not count.
    ticket: Option<FlowTicket>,
    _permit: StreamPermit,
    data_done: bool,
    done: bool,
}

impl RecvBody {
    pub(crate) fn new(
        recv: h2::RecvStream,
        ticket: Option<FlowTicket>,
        permit: StreamPermit,
    ) -> Self {
        Self {
            recv,
            ticket,
            _permit: permit,
            data_done: false,
            done: false,
        }
    }
}

impl hyper::body::Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let me = &mut *self;
        if me.done {
            return Poll::Ready(None);
        }
        if !me.data_done {
            match me.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let n = data.len();
                    // Only what the consumer took goes back to the sender.
                    if let Err(e) = me.recv.flow_control().release_capacity(n) {
                        me.done = true;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                    if let Some(t) = &me.ticket {
                        t.pulled(n);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => {
                    me.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(None) => me.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        let trailers = std::task::ready!(me.recv.poll_trailers(cx));
        me.done = true;
        Poll::Ready(match trailers {
            Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
            Ok(None) => None,
            Err(e) => Some(Err(e.into())),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Largest piece of a body chunk that waits for send capacity at once; h2
/// bounds what it buffers per stream anyway (`max_send_buffer_size`).
const MAX_PIECE: usize = 1 << 20;

/// Sends `body` on `send`: each chunk as send capacity allows, then the
/// trailers or the end of the stream. A body error resets the stream; a
/// reset from the peer stops reading the body.
pub(crate) async fn pipe(mut body: Body, mut send: h2::SendStream<Bytes>) {
    loop {
        let frame = poll_fn(|cx| {
            if let Poll::Ready(reason) = send.poll_reset(cx) {
                tracing::debug!(?reason, "request body stopped: stream reset");
                return Poll::Ready(None);
            }
            Pin::new(&mut body).poll_frame(cx).map(Some)
        })
        .await;
        let Some(frame) = frame else { return };
        match frame {
            None => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "request body failed; resetting the stream");
                send.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    while data.has_remaining() {
                        if send_piece(&mut send, &mut data).await.is_err() {
                            return;
                        }
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = send.send_trailers(trailers);
                        return;
                    }
                }
            },
        }
    }
}

/// Sends as much of `data` as the stream has capacity for, waiting for some.
async fn send_piece(send: &mut h2::SendStream<Bytes>, data: &mut Bytes) -> Result<(), ()> {
    send.reserve_capacity(data.len().min(MAX_PIECE));
    let cap = loop {
        let cap = send.capacity();
        if cap > 0 {
            break cap;
        }
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err(()),
        }
    };
    let piece = data.split_to(cap.min(data.len()));
    send.send_data(piece, false).map_err(|_| ())
}
