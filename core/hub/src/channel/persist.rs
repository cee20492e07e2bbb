//! Recording what a channel learns, off the connection's path: removing
//! acknowledged messages from the store and remembering delivered ids, in
//! batches, retrying what a failed write (a full disk) could not record.

use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::store::{Store, StoreError};

/// What the reader and writer hand the persister.
pub(super) enum Persist {
    Seen(String),
    Acked(u64),
}

/// Writes what the channel learns to the store in batches, off the
/// connection's path.
pub(super) async fn persister(
    store: Store,
    queue: String,
    peer: String,
    seen_limit: usize,
    mut rx: mpsc::Receiver<Persist>,
) {
    // Grown by bursts and shrunk after each: most channels are idle, and
    // 256 slots held by each would cost every edge 6 KiB.
    let mut batch = Vec::new();
    // What a failed write could not record is kept and written again (a
    // full disk recovers by itself), so a message acknowledged before the
    // failure is not sent again after a restart. Bounded: beyond it the
    // oldest are given up (the peer's seen set still drops a resend).
    let (mut seen, mut acked): (Vec<String>, Vec<u64>) = (Vec::new(), Vec::new());
    let mut closed_retries = CLOSED_RETRIES;
    loop {
        let got = if seen.is_empty() && acked.is_empty() {
            match tokio::time::timeout(PERSIST_IDLE, rx.recv_many(&mut batch, 256)).await {
                Ok(n) => n,
                Err(_) => {
                    // Quiet: stop taking, then record what raced the close
                    // (the loop ends when the queue is empty and closed).
                    rx.close();
                    rx.recv_many(&mut batch, 256).await
                }
            }
        } else {
            tokio::select! {
                n = rx.recv_many(&mut batch, 256) => n,
                () = tokio::time::sleep(PERSIST_RETRY) => usize::MAX,
            }
        };
        if got == 0 {
            // Closed and empty. Records a failed write left are tried again
            // for a while (a full disk recovers), not forever.
            if (seen.is_empty() && acked.is_empty()) || closed_retries == 0 {
                break;
            }
            closed_retries -= 1;
            tokio::time::sleep(PERSIST_RETRY).await;
        }
        for p in batch.drain(..) {
            match p {
                Persist::Seen(id) => seen.push(id),
                Persist::Acked(seq) => acked.push(seq),
            }
        }
        batch.shrink_to(16);
        for (kept, what) in [(seen.len(), "seen ids"), (acked.len(), "acknowledgements")] {
            if kept > MAX_UNPERSISTED {
                warn!(%peer, kept, "giving up the oldest unpersisted {what}");
            }
        }
        if seen.len() > MAX_UNPERSISTED {
            seen.drain(..seen.len() - MAX_UNPERSISTED);
        }
        if acked.len() > MAX_UNPERSISTED {
            acked.drain(..acked.len() - MAX_UNPERSISTED);
        }
        if !acked.is_empty() {
            match store.remove(&queue, acked.clone()).await {
                Ok(()) => acked = Vec::new(),
                Err(e) => {
                    debug!(%peer, error = %e, "acknowledged messages not removed yet; will retry")
                }
            }
        }
        if !seen.is_empty() {
            match store.mark_seen(&peer, seen.clone(), seen_limit).await {
                Ok(()) | Err(StoreError::IdTooLong { .. }) => seen = Vec::new(),
                Err(e) => debug!(%peer, error = %e, "delivered ids not recorded yet; will retry"),
            }
        }
    }
}

/// A persister with nothing to record for this long ends; the channel
/// starts another when it next has something.
const PERSIST_IDLE: Duration = Duration::from_secs(30);
/// Retries of what a failed write left once the queue is closed (a minute).
const CLOSED_RETRIES: u32 = 120;
/// How often the persister writes again what a failed write left.
const PERSIST_RETRY: Duration = Duration::from_millis(500);
/// Most acknowledgements (and seen ids) kept for writing again.
const MAX_UNPERSISTED: usize = 65_536;
