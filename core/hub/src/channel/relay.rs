//! Handing queued messages to another cloud replica. When the peer's
//! session is held elsewhere, this side's queue is relayed there: the
//! oldest messages go out in order, and only once the other replica has
//! stored them durably are they removed here, as if the peer had
//! acknowledged them. The other replica admits them with their ids, so the
//! edge's de-duplication by id still holds whichever way a message travels.

use bytes::Bytes;

use super::persist::Persist;
use super::publish::Admission;
use super::{Channel, PublishError};
use crate::message::Message;

/// A queued message taken for relaying.
#[derive(Clone, Debug)]
pub struct Relayed {
    /// Its place in this side's queue.
    pub seq: u64,
    /// The message as stored (its JSON form).
    pub frame: Bytes,
}

impl Channel {
    /// The oldest queued messages, in order, while no connection is served
    /// here: at most `max` and about `max_bytes` (always at least one).
    /// Empty when the queue is empty or a connection is up (it sends them
    /// itself).
    pub fn relay_batch(&self, max: usize, max_bytes: usize) -> Vec<Relayed> {
        self.batch(max, max_bytes, false)
    }

    /// Like [`Self::relay_batch`], even while a connection is served here:
    /// the peer is known to be connected elsewhere now, so this connection
    /// is stale. Whatever it still delivers, the peer drops as duplicates.
    pub fn hand_over_batch(&self, max: usize, max_bytes: usize) -> Vec<Relayed> {
        self.batch(max, max_bytes, true)
    }

    fn batch(&self, max: usize, max_bytes: usize, stale_connection: bool) -> Vec<Relayed> {
        let st = self.lock();
        if st.connected && !stale_connection {
            return Vec::new();
        }
        let mut bytes = 0;
        let mut batch = Vec::new();
        for p in st.pending.iter().take(max) {
            if !batch.is_empty() && bytes + p.frame.len() > max_bytes {
                break;
            }
            bytes += p.frame.len();
            batch.push(Relayed {
                seq: p.seq,
                frame: p.frame.clone(),
            });
        }
        batch
    }

    /// Another replica stored these messages durably: they leave this
    /// queue (and the store) as if acknowledged. Ids no longer queued (a
    /// connection got them acknowledged meanwhile) are skipped.
    pub async fn relayed(&self, seqs: &[u64]) {
        let mut removed = Vec::with_capacity(seqs.len());
        {
            let mut st = self.lock();
            for &seq in seqs {
                let Some(i) = st.pending.iter().position(|p| p.seq == seq) else {
                    continue;
                };
                let p = st.pending.remove(i).expect("index from position");
                if i < st.in_flight {
                    st.in_flight -= 1;
                }
                // A connection that came up meanwhile may still see an ack.
                st.recently_relayed.insert(p.id);
                removed.push(seq);
            }
        }
        self.inner.metrics.queue_depth.dec_by(removed.len() as i64);
        self.inner.wake.notify_one();
        for seq in removed {
            self.inner.persist(Persist::Acked(seq)).await;
        }
    }

    /// Calls `hook` on every new connection, whose data frames then wait
    /// until [`Self::release_hold`] or for `hold` at most: the new holder
    /// of a node pulls older queues from other replicas first, so they go
    /// out ahead of what waits here. Set once; later calls are ignored.
    pub fn on_connect(&self, hook: super::ConnectHook, hold: std::time::Duration) {
        let _ = self.inner.on_connect.set((hook, hold));
    }

    /// Lets the current connection send (see [`Self::on_connect`]).
    pub fn release_hold(&self) {
        self.lock().hold_until = None;
        self.inner.wake.notify_waiters();
        self.inner.wake.notify_one();
    }

    /// Admits messages another replica relays, keeping their ids, in one
    /// transaction: bounded by the queue, not by the rate limit (the
    /// replica that accepted them from the application applied it). Ids
    /// the peer lately acknowledged here are skipped; ids still queued
    /// here are queued again (see `admit`). Returns how many, from the
    /// front, are taken care of, and why the rest were not.
    pub async fn accept_relayed(&self, messages: Vec<Message>) -> (usize, Option<PublishError>) {
        let (admitted, refused) = self.admit(messages, Admission::Relayed).await;
        (admitted.taken, refused)
    }
}
