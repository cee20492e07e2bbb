//! The writer of a connection: replies from the reader first, then the
//! pending messages in order within the window, a resend pass from the
//! oldest unacknowledged message when an ack is overdue, a message given up
//! (and reported failed) after its retry budget, and a keepalive every
//! `keepalive_interval`.

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::frame::write_frame;
use super::persist::Persist;
use super::state::Pending;
use super::{Channel, ConnectionEnd, Delivery};
use crate::message::{Content, Message};

impl Channel {
    pub(super) async fn write_loop<W: AsyncWrite + Unpin>(
        &self,
        mut wr: W,
        mut ctl: mpsc::Receiver<Box<Message>>,
        generation: u64,
    ) -> ConnectionEnd {
        let cfg = &self.inner.cfg;
        let mut keepalive = tokio::time::interval(cfg.keepalive_interval);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dirty = false;
        loop {
            // Register for wake-ups before looking, so none is missed.
            let woken = self.inner.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            while let Ok(c) = ctl.try_recv() {
                if let Err(e) = write_frame(&mut wr, &c.to_json()).await {
                    return e.into();
                }
                dirty = true;
            }
            let (next, retry_at) = match self.next_to_send(generation) {
                Ok(x) => x,
                Err(end) => return end,
            };
            if let Some(frame) = next {
                if let Err(e) = write_frame(&mut wr, &frame).await {
                    return e.into();
                }
                dirty = true;
                continue;
            }
            if dirty {
                if let Err(e) = wr.flush().await {
                    return e.into();
                }
                dirty = false;
            }
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                c = ctl.recv() => match c {
                    Some(c) => {
                        if let Err(e) = write_frame(&mut wr, &c.to_json()).await {
                            return e.into();
                        }
                        dirty = true;
                    }
                    None => return ConnectionEnd::Replaced,
                },
                _ = &mut woken => {}
                _ = retry => self.go_back(generation),
                _ = keepalive.tick() => {
                    let k = Message::control("keepalive", "", Content::None).to_json();
                    if let Err(e) = write_frame(&mut wr, &k).await {
                        return e.into();
                    }
                    dirty = true;
                }
            }
        }
    }

    /// The next frame to send on this connection, or the time the oldest
    /// in-flight message's ack is due. Gives up messages over budget.
    #[allow(clippy::type_complexity)]
    fn next_to_send(
        &self,
        generation: u64,
    ) -> Result<(Option<Bytes>, Option<Instant>), ConnectionEnd> {
        let cfg = &self.inner.cfg;
        let mut st = self.lock();
        if st.generation != generation {
            return Err(ConnectionEnd::Replaced);
        }
        if st.hold_until.is_some_and(|t| t > Instant::now()) {
            // Released (with a wake-up) once older queues are pulled in.
            return Ok((None, None));
        }
        loop {
            let i = st.in_flight;
            if i >= st.pending.len() || i >= cfg.window {
                break;
            }
            if i == 0 && st.rewind {
                // Tell the peer a new pass starts, so it lifts its barriers.
                st.rewind = false;
                let rewind = Message::control("rewind", "", Content::None);
                return Ok((Some(rewind.to_json().into()), None));
            }
            let p = &mut st.pending[i];
            p.attempts += 1;
            if p.attempts > cfg.max_attempts {
                let p = st.pending.remove(i).expect("index checked");
                drop(st);
                self.give_up(p);
                st = self.lock();
                continue;
            }
            if p.attempts > 1 {
                self.inner.metrics.redeliveries.inc();
            }
            let now = Instant::now();
            p.sent_at = Some(now);
            p.due = Some(now + cfg.ack_timeout * (1u32 << (p.attempts - 1).min(3)));
            let frame = p.frame.clone();
            st.in_flight += 1;
            return Ok((Some(frame), None));
        }
        let due = st
            .pending
            .front()
            .filter(|_| st.in_flight > 0)
            .and_then(|p| p.due);
        Ok((None, due))
    }

    /// The oldest message's ack is overdue: send everything unacknowledged
    /// again, in order (the peer drops what it already has).
    fn go_back(&self, generation: u64) {
        let mut st = self.lock();
        if st.generation == generation {
            debug!(peer = %self.inner.peer, in_flight = st.in_flight, "ack overdue; resending");
            st.in_flight = 0;
            st.rewind = true;
        }
    }

    fn give_up(&self, p: Pending) {
        let m = &self.inner.metrics;
        m.drop("failed");
        m.queue_depth.dec();
        warn!(peer = %self.inner.peer, id = %p.id, attempts = p.attempts - 1,
            "message not acknowledged within its retry budget; reported failed");
        let inner = self.inner.clone();
        tokio::spawn(async move {
            inner.persist(Persist::Acked(p.seq)).await;
            let _ = inner
                .deliver
                .send(Delivery::Failed {
                    peer: inner.peer.clone(),
                    msg_id: p.id,
                    route: p.route,
                    attempts: p.attempts - 1,
                })
                .await;
        });
    }
}
