//! The reader of a connection: frames in, each data message de-duplicated
//! by id, dropped when its resource version is stale, held back behind a
//! deferred message of its resource, then handed to the application (or to
//! a waiting sync request) and acknowledged; control messages (acks,
//! defers, rewinds, errors, keepalives) update the sending side. Replies go
//! to the writer through a bounded channel.

use std::time::Duration;

use tokio::io::AsyncRead;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::frame::{Frame, SKIP_LIMIT_FACTOR, read_frame};
use super::persist::Persist;
use super::state::State;
use super::{Channel, ConnectionEnd, Delivery};
use crate::message::{BadMessage, Content, Message};

/// Acks, defers and errors the reader hands the writer. Boxed, so a
/// channel's first queue block is 32 pointers rather than 32 messages (about
/// 8 KiB per connected edge).
pub(super) type Ctl = mpsc::Sender<Box<Message>>;

/// First wait before offering a deferred message again.
const DEFER_WAIT: Duration = Duration::from_millis(250);

impl Channel {
    pub(super) async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        mut rd: R,
        ctl: Ctl,
    ) -> ConnectionEnd {
        let cfg = &self.inner.cfg;
        let m = &self.inner.metrics;
        loop {
            let frame = match tokio::time::timeout(
                cfg.keepalive_timeout,
                read_frame(&mut rd, cfg.max_message),
            )
            .await
            {
                Err(_) => return ConnectionEnd::PeerDead(cfg.keepalive_timeout),
                Ok(Err(e)) => return ConnectionEnd::Io(e),
                Ok(Ok(Frame::Data(f))) => f,
                Ok(Ok(Frame::Skipped(size))) => {
                    if size > cfg.max_message * SKIP_LIMIT_FACTOR {
                        return ConnectionEnd::Protocol(size);
                    }
                    m.error("too_large");
                    let e = BadMessage::TooLarge {
                        size,
                        max: cfg.max_message,
                    };
                    if self.reply_error(&ctl, "", &e.to_string()).await.is_err() {
                        return ConnectionEnd::Replaced;
                    }
                    continue;
                }
            };
            let msg = match Message::from_json(&frame, cfg.max_message) {
                Ok(msg) => msg,
                Err(e) => {
                    m.error(match e {
                        BadMessage::NoRoute => "no_route",
                        _ => "malformed",
                    });
                    warn!(peer = %self.inner.peer, error = %e, "bad message from peer");
                    if self.reply_error(&ctl, "", &e.to_string()).await.is_err() {
                        return ConnectionEnd::Replaced;
                    }
                    continue;
                }
            };
            // Boxed: handling a message is brief, and inline its state would
            // triple the size of every idle channel's reader (about 1 KiB
            // per edge held for nothing).
            let sent = if msg.is_control() {
                Box::pin(self.on_control(msg, &ctl)).await
            } else {
                Box::pin(self.on_message(msg, &ctl)).await
            };
            if sent.is_err() {
                // The writer is gone: the connection is ending anyway.
                return ConnectionEnd::Replaced;
            }
        }
    }

    async fn reply_error(
        &self,
        ctl: &Ctl,
        parent: &str,
        text: &str,
    ) -> Result<(), mpsc::error::SendError<Box<Message>>> {
        ctl.send(Box::new(Message::control(
            "error",
            parent,
            Content::Json(serde_json::json!({ "error": text })),
        )))
        .await
    }

    async fn on_control(
        &self,
        msg: Message,
        ctl: &Ctl,
    ) -> Result<(), mpsc::error::SendError<Box<Message>>> {
        match msg.route.operation.as_str() {
            "ack" => {
                let parent = &msg.header.parent_msg_id;
                if !self.acked(parent).await {
                    self.inner.metrics.error("unknown_ack");
                    debug!(peer = %self.inner.peer, id = %parent, "ack for an unknown message id");
                    return self
                        .reply_error(
                            ctl,
                            parent,
                            &format!("ack for unknown message id {parent:?}"),
                        )
                        .await;
                }
                Ok(())
            }
            "keepalive" => Ok(()),
            "defer" => {
                self.deferred(&msg.header.parent_msg_id);
                Ok(())
            }
            "rewind" => {
                self.lock().barriers.clear();
                Ok(())
            }
            "error" => {
                self.inner.metrics.error("peer_error");
                warn!(peer = %self.inner.peer, parent = %msg.header.parent_msg_id,
                    content = ?msg.content, "peer reported an error");
                Ok(())
            }
            op => {
                self.reply_error(
                    ctl,
                    &msg.header.msg_id,
                    &format!("unknown channel operation {op:?}"),
                )
                .await
            }
        }
    }

    /// The peer has no subscriber for `id` yet: offer it again after a
    /// short wait (doubling per attempt, at most the ack timeout).
    fn deferred(&self, id: &str) {
        let mut st = self.lock();
        if let Some(p) = st.pending.iter_mut().find(|p| p.id == id) {
            let wait = (DEFER_WAIT * (1u32 << p.attempts.saturating_sub(1).min(5)))
                .min(self.inner.cfg.ack_timeout);
            p.due = Some(Instant::now() + wait);
        }
        drop(st);
        self.inner.wake.notify_one();
    }

    /// Removes an acknowledged message; false if the id was never pending
    /// (or so long ago that it is forgotten).
    async fn acked(&self, id: &str) -> bool {
        let p = {
            let mut st = self.lock();
            // Acks come in send order, so the front almost always matches.
            let Some(i) = st.pending.iter().position(|p| p.id == id) else {
                return st.recently_acked.set.contains(id) || st.recently_relayed.set.contains(id);
            };
            let p = st.pending.remove(i).expect("index from position");
            st.recently_acked.insert(p.id.clone());
            if i < st.in_flight {
                st.in_flight -= 1;
            }
            p
        };
        if let Some(at) = p.sent_at {
            self.inner
                .metrics
                .ack_latency
                .observe(at.elapsed().as_secs_f64());
        }
        self.inner.metrics.queue_depth.dec();
        self.inner.wake.notify_one();
        // A persister behind by its whole queue slows this reader down, as
        // recording delivered ids does: bounded backpressure, no task pile.
        self.inner.persist(Persist::Acked(p.seq)).await;
        true
    }

    async fn on_message(
        &self,
        msg: Message,
        ctl: &Ctl,
    ) -> Result<(), mpsc::error::SendError<Box<Message>>> {
        let m = &self.inner.metrics;
        let id = msg.header.msg_id.clone();
        if id.is_empty() || id.len() > 128 {
            m.error("bad_id");
            return self
                .reply_error(ctl, "", &BadMessage::BadId.to_string())
                .await;
        }
        enum Verdict {
            Duplicate,
            Stale,
            Respond(oneshot::Sender<Message>),
            Deliver,
            Defer,
        }
        let verdict = {
            let mut st = self.lock();
            if st.seen.set.contains(&id) {
                Verdict::Duplicate
            } else if st.barriers.contains(&msg.route.resource) {
                // An earlier message of this resource was deferred in this
                // pass: this one waits for it, to keep per-resource order.
                Verdict::Defer
            } else if self.is_stale(&mut st, &msg) {
                st.seen.insert(id.clone());
                Verdict::Stale
            } else if let Some(w) = st.waiters.remove(&msg.header.parent_msg_id) {
                Verdict::Respond(w)
            } else if (self.inner.accepts)(&msg) {
                Verdict::Deliver
            } else {
                st.barriers.insert(msg.route.resource.clone());
                Verdict::Defer
            }
        };
        match verdict {
            Verdict::Defer => {
                // Nobody subscribes to it yet: the sender keeps it and
                // offers it again soon (an application starting up).
                m.drop("deferred");
                return ctl
                    .send(Box::new(Message::control("defer", &id, Content::None)))
                    .await;
            }
            Verdict::Duplicate => m.drop("duplicate"),
            Verdict::Stale => {
                m.drop("stale");
                self.inner.persist(Persist::Seen(id.clone())).await;
            }
            Verdict::Respond(w) => {
                let _ = w.send(msg);
                m.deliveries.inc();
                self.remember(&id).await;
            }
            Verdict::Deliver => {
                let delivered = self
                    .inner
                    .deliver
                    .send(Delivery::Message {
                        peer: self.inner.peer.clone(),
                        message: msg,
                    })
                    .await;
                if delivered.is_err() {
                    // No application is listening: do not ack, so the
                    // message is resent once one is.
                    m.drop("no_subscriber");
                    return Ok(());
                }
                m.deliveries.inc();
                self.remember(&id).await;
            }
        }
        ctl.send(Box::new(Message::control("ack", &id, Content::None)))
            .await
    }

    async fn remember(&self, id: &str) {
        self.lock().seen.insert(id.to_owned());
        self.inner.persist(Persist::Seen(id.to_owned())).await;
    }

    /// A numeric resourceversion older than the newest delivered one for the
    /// same resource; records the version otherwise.
    fn is_stale(&self, st: &mut State, msg: &Message) -> bool {
        let Ok(rv) = msg.header.resourceversion.parse::<u64>() else {
            return false;
        };
        if msg.route.resource.is_empty() {
            return false;
        }
        match st.versions.get_mut(&msg.route.resource) {
            Some(last) if *last > rv => true,
            Some(last) => {
                *last = rv;
                false
            }
            None => {
                st.versions.insert(msg.route.resource.clone(), rv);
                st.version_order.push_back(msg.route.resource.clone());
                if st.version_order.len() > self.inner.cfg.version_limit
                    && let Some(old) = st.version_order.pop_front()
                {
                    st.versions.remove(&old);
                }
                false
            }
        }
    }
}
