//! Durable queues. Temporary in-memory stand-in with the final API; the
//! redb-backed store replaces this file.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store is gone.
    #[error("store closed")]
    Closed,
}

/// Outbound queues and seen sets.
#[derive(Clone, Default)]
pub struct Store {
    inner: Arc<Mutex<Mem>>,
}

#[derive(Default)]
struct Mem {
    queues: HashMap<String, BTreeMap<u64, Vec<u8>>>,
    seen: HashMap<String, VecDeque<String>>,
}

impl Store {
    /// A store in memory.
    pub fn in_memory() -> Store {
        Store::default()
    }

    /// Appends entries.
    pub async fn append(
        &self,
        queue: &str,
        entries: Vec<(u64, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        let mut m = self.inner.lock().map_err(|_| StoreError::Closed)?;
        m.queues
            .entry(queue.to_owned())
            .or_default()
            .extend(entries);
        Ok(())
    }

    /// Removes entries by seq.
    pub async fn remove(&self, queue: &str, seqs: Vec<u64>) -> Result<(), StoreError> {
        let mut m = self.inner.lock().map_err(|_| StoreError::Closed)?;
        if let Some(q) = m.queues.get_mut(queue) {
            for s in seqs {
                q.remove(&s);
            }
        }
        Ok(())
    }

    /// All entries of a queue in seq order.
    pub fn load(&self, queue: &str) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let m = self.inner.lock().map_err(|_| StoreError::Closed)?;
        Ok(m.queues
            .get(queue)
            .map(|q| q.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default())
    }

    /// Names of non-empty queues.
    pub fn queues(&self) -> Result<Vec<String>, StoreError> {
        let m = self.inner.lock().map_err(|_| StoreError::Closed)?;
        Ok(m.queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(k, _)| k.clone())
            .collect())
    }

    /// Records delivered ids.
    pub async fn mark_seen(
        &self,
        peer: &str,
        ids: Vec<String>,
        limit: usize,
    ) -> Result<(), StoreError> {
        let mut m = self.inner.lock().map_err(|_| StoreError::Closed)?;
        let s = m.seen.entry(peer.to_owned()).or_default();
        s.extend(ids);
        while s.len() > limit {
            s.pop_front();
        }
        Ok(())
    }

    /// Seen ids, oldest first.
    pub fn load_seen(&self, peer: &str) -> Result<Vec<String>, StoreError> {
        let m = self.inner.lock().map_err(|_| StoreError::Closed)?;
        Ok(m.seen
            .get(peer)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default())
    }
}
