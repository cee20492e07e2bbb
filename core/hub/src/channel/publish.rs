//! The application's side of sending: publish a message or a batch (stored
//! durably before it is accepted, bounded by the queue and the rate limit)
//! and sync requests that wait for the peer's response.

use std::time::Duration;

use tokio::sync::oneshot;

use super::state::Pending;
use super::{Channel, PublishError, RequestError};
use crate::message::{BadMessage, Message};

impl Channel {
    /// Accepts `message` for delivery and returns its id once it is stored
    /// durably. Fails fast when the queue is full or the rate is exceeded.
    pub async fn publish(&self, message: Message) -> Result<String, PublishError> {
        let (mut ids, refused) = self.publish_batch(vec![message]).await;
        match refused {
            Some(e) => Err(e),
            None => Ok(ids.pop().expect("one message accepted")),
        }
    }

    /// Accepts the longest prefix of `messages` that is valid and fits the
    /// queue and the rate limit, stored in one transaction. Returns the ids
    /// accepted and why the next one was refused; nothing after a refused
    /// message is accepted, so per-resource order survives a resend.
    pub async fn publish_batch(
        &self,
        messages: Vec<Message>,
    ) -> (Vec<String>, Option<PublishError>) {
        let (admitted, refused) = self.admit(messages, Admission::Publish).await;
        (admitted.ids, refused)
    }

    /// Validates, bounds and durably stores `messages` (a prefix of them),
    /// then queues them for sending. A relayed batch skips the rate limit
    /// (the replica that first accepted it applied it) and messages the
    /// peer lately acknowledged here; those count as accepted.
    pub(super) async fn admit(
        &self,
        messages: Vec<Message>,
        how: Admission,
    ) -> (Admitted, Option<PublishError>) {
        let m = &self.inner.metrics;
        let total = messages.len();
        // (index in `messages`, message, frame)
        let mut ready = Vec::with_capacity(total);
        let mut refused = None;
        let mut first_refused = total;
        for (i, mut message) in messages.into_iter().enumerate() {
            if let Err(e) = message.prepare() {
                m.refused("invalid");
                refused = Some(e.into());
                first_refused = i;
                break;
            }
            let frame = message.to_json();
            if frame.len() > self.inner.cfg.max_message {
                m.refused("too_large");
                refused = Some(
                    BadMessage::TooLarge {
                        size: frame.len(),
                        max: self.inner.cfg.max_message,
                    }
                    .into(),
                );
                first_refused = i;
                break;
            }
            ready.push((i, message, frame));
        }
        let first_seq = {
            let mut st = self.lock();
            if how == Admission::Relayed {
                // Only what the peer acknowledged here is skipped. A copy
                // still queued here is queued again: the sender removes
                // its copy once this answers, and two replicas relaying
                // copies to each other at once would otherwise each skip
                // and each remove, and lose the message. The peer drops
                // the second copy by id.
                ready.retain(|(_, msg, _)| !st.recently_acked.set.contains(&msg.header.msg_id));
            }
            let room = self
                .inner
                .cfg
                .queue_capacity
                .saturating_sub(st.pending.len() + st.reserved);
            if ready.len() > room {
                first_refused = ready[room].0;
                ready.truncate(room);
                m.refused("queue_full");
                refused = Some(PublishError::QueueFull {
                    peer: self.inner.peer.to_string(),
                    capacity: self.inner.cfg.queue_capacity,
                });
            }
            if let (Some(b), Admission::Publish) = (st.bucket.as_mut(), how) {
                let allowed = (0..ready.len()).take_while(|_| b.take()).count();
                if allowed < ready.len() {
                    first_refused = ready[allowed].0;
                    ready.truncate(allowed);
                    m.refused("rate_limited");
                    refused = Some(PublishError::RateLimited {
                        peer: self.inner.peer.to_string(),
                        qps: b.qps,
                        burst: b.burst,
                    });
                }
            }
            st.reserved += ready.len();
            st.next_seq += ready.len() as u64;
            st.next_seq - ready.len() as u64
        };
        if ready.is_empty() {
            return (
                Admitted {
                    ids: Vec::new(),
                    taken: first_refused,
                },
                refused,
            );
        }
        let entries = ready
            .iter()
            .zip(first_seq..)
            .map(|((_, _, frame), seq)| (seq, frame.clone()))
            .collect();
        let stored = self.inner.store.append(&self.inner.queue, entries).await;
        let mut st = self.lock();
        st.reserved -= ready.len();
        if let Err(e) = stored {
            self.inner.metrics.refused("store");
            return (
                Admitted {
                    ids: Vec::new(),
                    taken: 0,
                },
                Some(e.into()),
            );
        }
        let mut ids = Vec::with_capacity(ready.len());
        let relayed = how == Admission::Relayed;
        for ((_, message, frame), seq) in ready.into_iter().zip(first_seq..) {
            let at = if relayed {
                // Accepted elsewhere before what waits here: first in line
                // among the unsent, after earlier relayed ones.
                let mut at = st.in_flight;
                while at < st.pending.len() && st.pending[at].relayed {
                    at += 1;
                }
                at
            } else {
                // Concurrent publishers may finish storing out of seq
                // order; keep the queue sorted, but never ahead of what was
                // already sent, nor of relayed messages.
                let mut at = st.pending.len();
                while at > st.in_flight
                    && st.pending[at - 1].seq > seq
                    && !st.pending[at - 1].relayed
                {
                    at -= 1;
                }
                at
            };
            ids.push(message.header.msg_id.clone());
            st.pending.insert(
                at,
                Pending {
                    seq,
                    id: message.header.msg_id,
                    route: message.route,
                    frame: frame.into(),
                    attempts: 0,
                    sent_at: None,
                    due: None,
                    relayed,
                },
            );
        }
        drop(st);
        m.queue_depth.inc_by(ids.len() as i64);
        self.inner.wake.notify_one();
        (
            Admitted {
                ids,
                taken: first_refused,
            },
            refused,
        )
    }

    /// Sends `message` as a sync request and waits for the peer
    /// application's response (a message whose `parent_msg_id` is the
    /// request's id).
    pub async fn request(
        &self,
        mut message: Message,
        timeout: Duration,
    ) -> Result<Message, RequestError> {
        message.header.sync = true;
        message.prepare().map_err(PublishError::from)?;
        let id = message.header.msg_id.clone();
        let (tx, rx) = oneshot::channel();
        self.lock().waiters.insert(id.clone(), tx);
        if let Err(e) = self.publish(message).await {
            self.lock().waiters.remove(&id);
            return Err(e.into());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(resp)) => Ok(resp),
            _ => {
                self.lock().waiters.remove(&id);
                Err(RequestError::Timeout {
                    msg_id: id,
                    timeout,
                })
            }
        }
    }
}

/// Who hands messages to [`Channel::admit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Admission {
    /// The application publishes.
    Publish,
    /// Another cloud replica hands over messages it accepted.
    Relayed,
}

/// What [`Channel::admit`] took.
pub(super) struct Admitted {
    /// Ids of the messages stored and queued.
    pub(super) ids: Vec<String>,
    /// How many of the given messages were taken care of, from the front:
    /// stored, or skipped as already known.
    pub(super) taken: usize,
}
