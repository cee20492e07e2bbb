//! Drives the cloud's h2 client connection: polls it, keeps it alive with
//! PINGs, and uses each PING's round trip as the window governor's tick,
//! announcing the window it decides as SETTINGS_INITIAL_WINDOW_SIZE (h2
//! takes one SETTINGS change at a time, so a change waits for the previous
//! one's acknowledgement).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use crate::flow::Flow;

/// While streams are open the governor ticks once per round trip, but no
/// more often than this: on a short link the window is not the limit, and a
/// PING per 100 µs would only cost CPU.
const MIN_TICK: Duration = Duration::from_millis(10);

/// Why the connection ended with an error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DriveError {
    /// The connection failed.
    #[error(transparent)]
    H2(#[from] h2::Error),
    /// A PING went unanswered for the keepalive timeout.
    #[error("keepalive ping not answered within {0:?}")]
    KeepaliveTimeout(Duration),
}

enum Ping {
    /// Waiting to send the next PING; `since` is when the last pong came.
    Idle {
        since: Instant,
        sleep: Pin<Box<Sleep>>,
    },
    InFlight {
        sent: Instant,
        deadline: Pin<Box<Sleep>>,
    },
}

/// The connection future: resolves when the connection ends.
pub(crate) struct Driver<T> {
    conn: h2::client::Connection<T, Bytes>,
    pings: Option<h2::PingPong>,
    ping: Ping,
    flow: Arc<Flow>,
    announced: u32,
    interval: Duration,
    timeout: Duration,
    rtt_micros: Arc<AtomicU64>,
}

impl<T> Driver<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    pub(crate) fn new(
        mut conn: h2::client::Connection<T, Bytes>,
        flow: Arc<Flow>,
        interval: Duration,
        timeout: Duration,
        rtt_micros: Arc<AtomicU64>,
    ) -> Self {
        let now = Instant::now();
        Self {
            pings: conn.ping_pong(),
            conn,
            ping: Ping::Idle {
                since: now,
                sleep: Box::pin(tokio::time::sleep_until(now + interval)),
            },
            announced: flow.floor(),
            flow,
            interval,
            timeout,
            rtt_micros,
        }
    }

    /// Queues the governor's window if it changed. False when there was
    /// nothing to queue or h2 still awaits the previous acknowledgement.
    fn announce(&mut self) -> bool {
        let want = self.flow.wanted();
        if want == self.announced || self.conn.set_initial_window_size(want).is_err() {
            return false;
        }
        self.announced = want;
        self.flow.announced(want);
        true
    }

    /// Ready(Ok) after a pong (the governor ticked), Pending otherwise.
    fn poll_ping(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), DriveError>> {
        let Some(pings) = self.pings.as_mut() else {
            return Poll::Pending;
        };
        loop {
            match &mut self.ping {
                Ping::Idle { since, sleep } => {
                    let gap = if self.flow.busy() {
                        MIN_TICK
                    } else {
                        self.interval
                    };
                    let due = *since + gap;
                    if sleep.deadline() != due {
                        sleep.as_mut().reset(due);
                    }
                    ready!(sleep.as_mut().poll(cx));
                    let now = Instant::now();
                    if pings.send_ping(h2::Ping::opaque()).is_err() {
                        // The connection is going away; its own poll says how.
                        *since = now;
                        continue;
                    }
                    self.ping = Ping::InFlight {
                        sent: now,
                        deadline: Box::pin(tokio::time::sleep_until(now + self.timeout)),
                    };
                }
                Ping::InFlight { sent, deadline } => match pings.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        let now = Instant::now();
                        let rtt = now - *sent;
                        let micros = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
                        self.rtt_micros.store(micros, Ordering::Relaxed);
                        self.flow.tick();
                        self.ping = Ping::Idle {
                            since: now,
                            sleep: Box::pin(tokio::time::sleep_until(now)),
                        };
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Pending => {
                        ready!(deadline.as_mut().poll(cx));
                        return Poll::Ready(Err(DriveError::KeepaliveTimeout(self.timeout)));
                    }
                },
            }
        }
    }
}

impl<T> Future for Driver<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    type Output = Result<(), DriveError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let me = &mut *self;
        me.flow.register(cx.waker());
        loop {
            me.announce();
            if let Poll::Ready(r) = Pin::new(&mut me.conn).poll(cx) {
                return Poll::Ready(r.map_err(DriveError::from));
            }
            // An acknowledgement read just now may free the next change.
            if me.announce() {
                continue;
            }
            match me.poll_ping(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
