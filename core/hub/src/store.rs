//! The hub's durable store: per-name outbound queues of `(seq, frame)`
//! entries and per-peer bounded sets of delivered message ids, kept in one
//! redb file (ADR 0009). All writes go through a single writer thread that
//! group-commits: every operation queued while one transaction is being
//! fsync'd lands in the next transaction, so concurrent callers share the
//! cost of one sync. Reads use redb read transactions directly and never
//! wait for the writer.

use std::fs::OpenOptions;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use redb::backends::{FileBackend, InMemoryBackend};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, StorageBackend, Table, TableDefinition,
};
use tokio::sync::{mpsc, oneshot};

/// Queue entries: `(queue name, seq)` → frame. One table for all queues
/// keeps `queues()` a walk over names rather than over tables.
const QUEUE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("queue");
/// Seen ids: `(peer, insertion counter)` → message id. The counter orders
/// ids by insertion and makes pruning a range delete of the oldest keys.
const SEEN: TableDefinition<(&str, u64), &str> = TableDefinition::new("seen");
/// One entry written and removed again to prove a reopened store can take
/// as much as the write that failed.
const PROBE: TableDefinition<u64, &[u8]> = TableDefinition::new("probe");
/// Most bytes a probe writes (the failed write's entries, up to this).
const PROBE_MAX_BYTES: usize = 8 << 20;
/// Next insertion counter of each peer's seen set.
const SEEN_NEXT: TableDefinition<&str, u64> = TableDefinition::new("seen_next");

/// Longest accepted message id, in bytes.
const MAX_ID_LEN: usize = 128;
/// Operations waiting for the writer; senders wait when it is full.
const CHANNEL_CAPACITY: usize = 4096;
/// Most operations folded into one write transaction, so one batch's
/// memory and commit latency stay bounded.
const MAX_BATCH: usize = 1024;
/// redb's page cache. Its default (1 GiB) is far more than queues of
/// in-flight messages need, and edge nodes are small.
const CACHE_BYTES: usize = 32 * 1024 * 1024;
/// While failing, how often the writer reopens the file and tries a write,
/// with or without callers waiting: recovery follows freed space by itself.
const RECOVER_EVERY: Duration = Duration::from_millis(500);

/// Failures of the durable store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or created.
    #[error("cannot open store {}: {source}", path.display())]
    Open {
        /// The file that was being opened.
        path: PathBuf,
        /// What redb or the file system reported.
        #[source]
        source: Arc<redb::Error>,
    },
    /// A read or write transaction failed (I/O error, full disk, ...).
    #[error("store: {0}")]
    Storage(#[source] Arc<redb::Error>),
    /// redb found the file's contents inconsistent.
    #[error("store is corrupt: {detail}")]
    Corrupt {
        /// redb's description of the damage.
        detail: String,
    },
    /// The store failed (disk full, I/O error) and is being reopened; the
    /// write was not made. Retry later.
    #[error("store unavailable after a failed write ({cause}); retrying in the background")]
    Unavailable {
        /// The failure that took the store down.
        cause: String,
    },
    /// The writer thread is gone (it panicked), so nothing can be written.
    #[error("store writer has stopped")]
    Closed,
    /// The writer thread could not be started.
    #[error("cannot start store writer: {0}")]
    Spawn(#[source] Arc<std::io::Error>),
    /// A message id longer than 128 bytes was given to `mark_seen`.
    #[error("message id of {len} bytes for peer {peer:?} is longer than {MAX_ID_LEN}")]
    IdTooLong {
        /// The peer whose seen set was being written.
        peer: String,
        /// Length of the offending id in bytes.
        len: usize,
    },
}

/// Maps any redb error, keeping corruption distinct so callers can tell
/// "retry later" from "the file needs attention".
fn storage(err: impl Into<redb::Error>) -> StoreError {
    match err.into() {
        redb::Error::Corrupted(detail) => StoreError::Corrupt { detail },
        other => StoreError::Storage(Arc::new(other)),
    }
}

/// One write, applied by the writer thread inside a shared transaction.
enum Op {
    Append {
        queue: String,
        entries: Vec<(u64, Vec<u8>)>,
    },
    Remove {
        queue: String,
        seqs: Vec<u64>,
    },
    MarkSeen {
        peer: String,
        ids: Vec<String>,
        limit: usize,
    },
}

/// The sizes of the values a failed batch wrote, for the recovery probe;
/// at least one small entry, at most [`PROBE_MAX_BYTES`] in all.
fn failed_sizes(batch: &[Request]) -> Vec<usize> {
    let mut sizes = vec![4096];
    let mut total = 4096;
    for request in batch {
        let lens: Vec<usize> = match &request.op {
            Op::Append { entries, .. } => entries.iter().map(|(_, f)| f.len()).collect(),
            Op::MarkSeen { ids, .. } => ids.iter().map(String::len).collect(),
            Op::Remove { .. } => Vec::new(),
        };
        for len in lens {
            if total + len > PROBE_MAX_BYTES {
                return sizes;
            }
            total += len;
            sizes.push(len);
        }
    }
    sizes
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// The open database, or None while the writer reopens it after a failure.
struct Slot {
    db: RwLock<Option<Arc<Database>>>,
    /// The file, for reopening (None: in memory, never reopened).
    path: Option<PathBuf>,
    health: StoreHealth,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// Whether the store can write, for readiness and metrics. Cheap to clone.
#[derive(Clone, Debug)]
pub struct StoreHealth {
    healthy: Gauge,
    errors: Family<KindLabel, Counter>,
    cause: Arc<std::sync::Mutex<String>>,
}

impl Default for StoreHealth {
    fn default() -> Self {
        let h = Self {
            healthy: Gauge::default(),
            errors: Family::default(),
            cause: Arc::default(),
        };
        h.healthy.set(1);
        for kind in ["enospc", "eio", "other"] {
            let _ = h.errors.get_or_create(&KindLabel { kind });
        }
        h
    }
}

impl StoreHealth {
    /// True while writes succeed (or none has failed since the last recovery).
    pub fn is_healthy(&self) -> bool {
        self.healthy.get() == 1
    }

    /// Why the store is failing, if it is.
    pub fn cause(&self) -> Option<String> {
        (!self.is_healthy()).then(|| self.cause.lock().expect("cause lock").clone())
    }

    /// Registers `tether_hub_store_healthy` and `tether_hub_store_errors_total{kind}`.
    pub fn register(
        &self,
        registry: &mut prometheus_client::registry::Registry,
        role: &'static str,
    ) {
        let r = registry
            .sub_registry_with_prefix("tether_hub_store")
            .sub_registry_with_label(("role".into(), role.into()));
        r.register(
            "healthy",
            "1 while the hub store can write; 0 after a failed write until it recovers",
            self.healthy.clone(),
        );
        r.register(
            "errors",
            "Failed hub store writes, by kind: enospc, eio, other",
            self.errors.clone(),
        );
    }

    fn failed(&self, error: &StoreError) {
        let kind = match error {
            StoreError::Storage(e) | StoreError::Open { source: e, .. } => match &**e {
                redb::Error::Io(io) if io.raw_os_error() == Some(28) => "enospc",
                redb::Error::Io(io) if io.raw_os_error() == Some(5) => "eio",
                _ => "other",
            },
            _ => "other",
        };
        self.errors.get_or_create(&KindLabel { kind }).inc();
        *self.cause.lock().expect("cause lock") = error.to_string();
        self.healthy.set(0);
    }
}

/// Handle to the store; clones share one database and one writer thread.
#[derive(Clone)]
pub struct Store {
    // Declared before `shared`: the last handle must close the channel
    // before `Shared::drop` joins the writer, or the join would never end.
    tx: mpsc::Sender<Request>,
    shared: Arc<Shared>,
}

struct Shared {
    slot: Arc<Slot>,
    writer: Option<JoinHandle<()>>,
    #[cfg(test)]
    commits: Arc<AtomicU64>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Every sender is gone, so the writer finishes its current batch and
        // exits. Waiting for it means the file is closed when the last handle
        // is dropped and can be reopened at once.
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("store writer panicked");
        }
    }
}

impl Store {
    /// Opens or creates the database file (parent dir must exist); file mode 0600.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_error = |source: redb::Error| StoreError::Open {
            path: path.to_owned(),
            source: Arc::new(source),
        };
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        // Frames may carry secrets; only the hub's user may read them.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(path).map_err(|e| open_error(e.into()))?;
        let backend = FileBackend::new(file).map_err(|e| open_error(e.into()))?;
        Store::start(backend, Some(path.to_owned())).map_err(|e| match e {
            StoreError::Storage(source) => StoreError::Open {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// A store in memory (tests, benchmarks, and cluster mode before its durable store exists).
    pub fn in_memory() -> Store {
        // Invariant: an empty in-memory database only fails to initialise if
        // memory or threads are exhausted, where std would panic anyway.
        Store::start(InMemoryBackend::new(), None).expect("in-memory store starts")
    }

    fn start(backend: impl StorageBackend, path: Option<PathBuf>) -> Result<Store, StoreError> {
        let db = Arc::new(init(backend)?);
        let slot = Arc::new(Slot {
            db: RwLock::new(Some(db)),
            path,
            health: StoreHealth::default(),
        });
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let commits = Arc::new(AtomicU64::new(0));
        let writer = std::thread::Builder::new()
            .name("hub-store-writer".into())
            .spawn({
                let slot = slot.clone();
                let commits = commits.clone();
                move || run_writer(&slot, rx, &commits)
            })
            .map_err(|e| StoreError::Spawn(Arc::new(e)))?;
        Ok(Store {
            tx,
            shared: Arc::new(Shared {
                slot,
                writer: Some(writer),
                #[cfg(test)]
                commits,
            }),
        })
    }

    /// Whether the store can write; for readiness and metrics.
    pub fn health(&self) -> StoreHealth {
        self.shared.slot.health.clone()
    }

    /// The database for a read, unless it is being reopened.
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        let slot = &self.shared.slot;
        let db = slot.db.read().expect("store slot lock").clone();
        db.ok_or_else(|| StoreError::Unavailable {
            cause: slot.health.cause().unwrap_or_default(),
        })
    }

    /// Durably appends entries (one fsync'd transaction shared with concurrent callers: group commit). Returns when committed.
    pub async fn append(
        &self,
        queue: &str,
        entries: Vec<(u64, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.submit(Op::Append {
            queue: queue.to_owned(),
            entries,
        })
        .await
    }

    /// Durably removes entries by seq (missing ones ignored).
    pub async fn remove(&self, queue: &str, seqs: Vec<u64>) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.submit(Op::Remove {
            queue: queue.to_owned(),
            seqs,
        })
        .await
    }

    /// All entries of a queue in seq order (startup).
    pub fn load(&self, queue: &str) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db()?.begin_read().map_err(storage)?;
        let table = txn.open_table(QUEUE).map_err(storage)?;
        let range = table
            .range((queue, 0u64)..=(queue, u64::MAX))
            .map_err(storage)?;
        range
            .map(|item| {
                let (key, value) = item.map_err(storage)?;
                Ok((key.value().1, value.value().to_vec()))
            })
            .collect()
    }

    /// Names of queues that hold entries (startup: which nodes have pending messages).
    pub fn queues(&self) -> Result<Vec<String>, StoreError> {
        let txn = self.db()?.begin_read().map_err(storage)?;
        let table = txn.open_table(QUEUE).map_err(storage)?;
        let mut names: Vec<String> = Vec::new();
        // Seek past each queue's last possible key: one lookup per queue
        // instead of a scan over every entry.
        loop {
            let start = match names.last() {
                Some(name) => Bound::Excluded((name.as_str(), u64::MAX)),
                None => Bound::Unbounded,
            };
            let mut range = table
                .range::<(&str, u64)>((start, Bound::Unbounded))
                .map_err(storage)?;
            match range.next() {
                Some(item) => {
                    let (key, _) = item.map_err(storage)?;
                    let name = key.value().0.to_owned();
                    names.push(name);
                }
                None => return Ok(names),
            }
        }
    }

    /// Durably records delivered message ids for `peer`, pruning to the newest `limit`.
    ///
    /// Ids are recorded as given: the caller marks each id once (it checks
    /// its in-memory set before delivering), so the store does not dedupe.
    pub async fn mark_seen(
        &self,
        peer: &str,
        ids: Vec<String>,
        limit: usize,
    ) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        // Checked here rather than in the writer so one bad call cannot fail
        // the other operations of its batch.
        if let Some(id) = ids.iter().find(|id| id.len() > MAX_ID_LEN) {
            return Err(StoreError::IdTooLong {
                peer: peer.to_owned(),
                len: id.len(),
            });
        }
        self.submit(Op::MarkSeen {
            peer: peer.to_owned(),
            ids,
            limit,
        })
        .await
    }

    /// The seen ids of `peer`, oldest first.
    pub fn load_seen(&self, peer: &str) -> Result<Vec<String>, StoreError> {
        let txn = self.db()?.begin_read().map_err(storage)?;
        let table = txn.open_table(SEEN).map_err(storage)?;
        let range = table
            .range((peer, 0u64)..=(peer, u64::MAX))
            .map_err(storage)?;
        range
            .map(|item| {
                let (_, id) = item.map_err(storage)?;
                Ok(id.value().to_owned())
            })
            .collect()
    }

    /// Number of write transactions committed so far.
    #[cfg(test)]
    pub(crate) fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    async fn submit(&self, op: Op) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request { op, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// Opens `backend` as the store and makes sure its tables exist (a write).
fn init(backend: impl StorageBackend) -> Result<Database, StoreError> {
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create_with_backend(backend)
        .map_err(|e| StoreError::Storage(Arc::new(e.into())))?;
    // Create the tables up front so read transactions can always open them.
    let txn = db.begin_write().map_err(storage)?;
    txn.open_table(QUEUE).map_err(storage)?;
    txn.open_table(SEEN).map_err(storage)?;
    txn.open_table(SEEN_NEXT).map_err(storage)?;
    txn.commit().map_err(storage)?;
    Ok(db)
}

/// After a failed write redb refuses every later one ("previous I/O
/// error"), so the writer closes the file and opens it again. Committed
/// data is safe: a failed commit never became the database's state.
fn reopen(slot: &Slot, probe: &[usize]) -> Result<(), StoreError> {
    let Some(path) = &slot.path else {
        // In memory: nothing to reopen; the next write tries again.
        return Ok(());
    };
    let old = slot.db.write().expect("store slot lock").take();
    if let Some(old) = old {
        // Readers hold the database only for one read transaction.
        let mut old = old;
        for _ in 0..200 {
            match Arc::try_unwrap(old) {
                Ok(db) => {
                    drop(db);
                    break;
                }
                Err(shared) => {
                    old = shared;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| StoreError::Storage(Arc::new(e.into())))?;
    let backend = FileBackend::new(file).map_err(|e| StoreError::Storage(Arc::new(e.into())))?;
    let db = init(backend)?;
    // Reopening works on a full disk too; writing entries of the sizes
    // that failed (then removing them) shows whether they fit again.
    for insert in [true, false] {
        let txn = db.begin_write().map_err(storage)?;
        {
            let mut table = txn.open_table(PROBE).map_err(storage)?;
            for (key, len) in (0u64..).zip(probe) {
                if insert {
                    table
                        .insert(key, vec![0u8; *len].as_slice())
                        .map_err(storage)?;
                } else {
                    table.remove(key).map_err(storage)?;
                }
            }
        }
        txn.commit().map_err(storage)?;
    }
    *slot.db.write().expect("store slot lock") = Some(Arc::new(db));
    Ok(())
}

/// The writer thread: waits for one request, folds in whatever else is
/// queued, commits them in one durable transaction and answers them all.
/// After a failed commit it reopens the store every [`RECOVER_EVERY`]
/// (answering writes with [`StoreError::Unavailable`] meanwhile) until a
/// reopen and its probe write succeed. Ends when every `Store` handle
/// (hence every sender) is gone.
fn run_writer(slot: &Slot, mut rx: mpsc::Receiver<Request>, commits: &AtomicU64) {
    let health = &slot.health;
    let mut batch: Vec<Request> = Vec::with_capacity(MAX_BATCH);
    let mut next_try = Instant::now();
    let mut probe: Vec<usize> = Vec::new();
    loop {
        if health.is_healthy() {
            match rx.blocking_recv() {
                Some(first) => batch.push(first),
                None => return,
            }
        } else {
            if Instant::now() >= next_try {
                next_try = Instant::now() + RECOVER_EVERY;
                match reopen(slot, &probe) {
                    Ok(()) => {
                        tracing::info!("hub store writable again");
                        health.healthy.set(1);
                        continue;
                    }
                    Err(error) => tracing::debug!(%error, "hub store still failing"),
                }
            }
            match rx.try_recv() {
                Ok(request) => batch.push(request),
                Err(mpsc::error::TryRecvError::Empty) => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let db = slot.db.read().expect("store slot lock").clone();
        let result = match db {
            Some(db) if health.is_healthy() => commit_batch(&db, &batch),
            _ => Err(StoreError::Unavailable {
                cause: health.cause().unwrap_or_default(),
            }),
        };
        match &result {
            Ok(()) => {
                commits.fetch_add(1, Ordering::Relaxed);
            }
            Err(StoreError::Unavailable { .. }) => {}
            Err(error) => {
                tracing::warn!(%error, ops = batch.len(), "store commit failed; reopening it");
                health.failed(error);
                next_try = Instant::now();
                probe = failed_sizes(&batch);
            }
        }
        for request in batch.drain(..) {
            // A caller that stopped waiting does not need the answer.
            let _ = request.reply.send(result.clone());
        }
    }
}

fn commit_batch(db: &Database, batch: &[Request]) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(storage)?;
    txn.set_durability(Durability::Immediate).map_err(storage)?;
    {
        let mut queue = txn.open_table(QUEUE).map_err(storage)?;
        let mut seen = txn.open_table(SEEN).map_err(storage)?;
        let mut seen_next = txn.open_table(SEEN_NEXT).map_err(storage)?;
        for request in batch {
            apply(&request.op, &mut queue, &mut seen, &mut seen_next).map_err(storage)?;
        }
    }
    // On error the transaction is dropped, which aborts it: no op of the
    // batch is applied and all of them get the error.
    txn.commit().map_err(storage)
}

fn apply(
    op: &Op,
    queue: &mut Table<'_, (&'static str, u64), &'static [u8]>,
    seen: &mut Table<'_, (&'static str, u64), &'static str>,
    seen_next: &mut Table<'_, &'static str, u64>,
) -> Result<(), redb::Error> {
    match op {
        Op::Append {
            queue: name,
            entries,
        } => {
            for (seq, frame) in entries {
                queue.insert((name.as_str(), *seq), frame.as_slice())?;
            }
        }
        Op::Remove { queue: name, seqs } => {
            for seq in seqs {
                queue.remove((name.as_str(), *seq))?;
            }
        }
        Op::MarkSeen { peer, ids, limit } => {
            let peer = peer.as_str();
            let limit = *limit as u64;
            let mut next = seen_next.get(peer)?.map_or(0, |g| g.value());
            // Ids that would be pruned at once are counted but not written.
            let skipped = (ids.len() as u64).saturating_sub(limit);
            next += skipped;
            for id in ids.iter().skip(skipped as usize) {
                seen.insert((peer, next), id.as_str())?;
                next += 1;
            }
            seen_next.insert(peer, next)?;
            // Keys below the previous cut were already deleted, so this
            // range holds exactly the ids to prune: O(pruned).
            let cut = next.saturating_sub(limit);
            if cut > 0 {
                seen.retain_in((peer, 0u64)..(peer, cut), |_, _| false)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::time::{Duration, Instant};

    /// Every test future runs under this deadline.
    async fn bounded<T>(future: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), future)
            .await
            .expect("test finished within its deadline")
    }

    /// A unique directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let path = std::env::temp_dir().join(format!(
                "tether-hub-store-{tag}-{}-{}-{nanos}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed),
            ));
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        fn file(&self) -> PathBuf {
            self.0.join("hub.redb")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn frame(n: u64) -> Vec<u8> {
        format!("frame-{n}").into_bytes()
    }

    #[tokio::test]
    async fn append_load_remove_round_trip() {
        bounded(async {
            let store = Store::in_memory();
            assert!(store.queues().unwrap().is_empty());
            store
                .append("down/a", vec![(1, frame(1)), (2, frame(2))])
                .await
                .unwrap();
            store.append("down/b", vec![(7, frame(7))]).await.unwrap();
            store
                .append("down/a", vec![(3, frame(3)), (10, frame(10))])
                .await
                .unwrap();
            store.append("up", vec![]).await.unwrap();

            assert_eq!(
                store.load("down/a").unwrap(),
                vec![(1, frame(1)), (2, frame(2)), (3, frame(3)), (10, frame(10))]
            );
            assert_eq!(store.load("down/b").unwrap(), vec![(7, frame(7))]);
            assert!(store.load("down").unwrap().is_empty());
            assert_eq!(store.queues().unwrap(), vec!["down/a", "down/b"]);

            store.remove("down/a", vec![2, 10, 99]).await.unwrap();
            assert_eq!(
                store.load("down/a").unwrap(),
                vec![(1, frame(1)), (3, frame(3))]
            );
            store.remove("down/b", vec![7]).await.unwrap();
            assert!(store.load("down/b").unwrap().is_empty());
            assert_eq!(store.queues().unwrap(), vec!["down/a"]);
            // Removing from an unknown queue is not an error.
            store.remove("nowhere", vec![1]).await.unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn queue_names_that_prefix_each_other_stay_apart() {
        bounded(async {
            let store = Store::in_memory();
            store.append("a", vec![(u64::MAX, frame(0))]).await.unwrap();
            store.append("a/b", vec![(0, frame(1))]).await.unwrap();
            store.append("", vec![(5, frame(2))]).await.unwrap();
            assert_eq!(store.queues().unwrap(), vec!["", "a", "a/b"]);
            assert_eq!(store.load("a").unwrap(), vec![(u64::MAX, frame(0))]);
            assert_eq!(store.load("a/b").unwrap(), vec![(0, frame(1))]);
        })
        .await;
    }

    #[tokio::test]
    async fn reopen_finds_entries_and_seen_ids() {
        let dir = TempDir::new("reopen");
        bounded(async {
            let store = Store::open(&dir.file()).unwrap();
            store
                .append("down/n1", vec![(1, frame(1)), (2, frame(2)), (3, frame(3))])
                .await
                .unwrap();
            store.append("up", vec![(1, frame(9))]).await.unwrap();
            store.remove("down/n1", vec![2]).await.unwrap();
            store
                .mark_seen("n1", vec!["m1".into(), "m2".into()], 10)
                .await
                .unwrap();
            drop(store);

            let store = Store::open(&dir.file()).unwrap();
            assert_eq!(store.queues().unwrap(), vec!["down/n1", "up"]);
            assert_eq!(
                store.load("down/n1").unwrap(),
                vec![(1, frame(1)), (3, frame(3))]
            );
            assert_eq!(store.load("up").unwrap(), vec![(1, frame(9))]);
            assert_eq!(store.load_seen("n1").unwrap(), vec!["m1", "m2"]);
            // The per-peer counter survived too: new ids sort after old ones.
            store.mark_seen("n1", vec!["m3".into()], 2).await.unwrap();
            assert_eq!(store.load_seen("n1").unwrap(), vec!["m2", "m3"]);
        })
        .await;
    }

    #[cfg(unix)]
    #[test]
    fn new_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("mode");
        let store = Store::open(&dir.file()).unwrap();
        let mode = std::fs::metadata(dir.file()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(store);
    }

    #[tokio::test]
    async fn seen_pruning_keeps_newest_in_order() {
        bounded(async {
            let store = Store::in_memory();
            let ids = |range: std::ops::Range<u32>| -> Vec<String> {
                range.map(|i| format!("id-{i}")).collect()
            };
            store.mark_seen("p", ids(0..3), 5).await.unwrap();
            assert_eq!(store.load_seen("p").unwrap(), ids(0..3));
            store.mark_seen("p", ids(3..7), 5).await.unwrap();
            assert_eq!(store.load_seen("p").unwrap(), ids(2..7));
            for i in 7..20 {
                store.mark_seen("p", ids(i..i + 1), 5).await.unwrap();
            }
            assert_eq!(store.load_seen("p").unwrap(), ids(15..20));
            // One call larger than the limit keeps only its own tail.
            store.mark_seen("p", ids(20..32), 5).await.unwrap();
            assert_eq!(store.load_seen("p").unwrap(), ids(27..32));
            // Other peers are untouched.
            store.mark_seen("q", ids(0..2), 5).await.unwrap();
            assert_eq!(store.load_seen("q").unwrap(), ids(0..2));
            assert_eq!(store.load_seen("p").unwrap(), ids(27..32));
            assert!(store.load_seen("nobody").unwrap().is_empty());
        })
        .await;
    }

    #[tokio::test]
    async fn overlong_id_is_refused() {
        bounded(async {
            let store = Store::in_memory();
            let err = store
                .mark_seen("p", vec!["x".repeat(MAX_ID_LEN + 1)], 10)
                .await
                .unwrap_err();
            assert!(
                matches!(err, StoreError::IdTooLong { len: 129, .. }),
                "{err}"
            );
            store
                .mark_seen("p", vec!["x".repeat(MAX_ID_LEN)], 10)
                .await
                .unwrap();
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_share_commits() {
        const TASKS: u64 = 50;
        const PER_TASK: u64 = 40;
        let dir = TempDir::new("group");
        bounded(async {
            let store = Store::open(&dir.file()).unwrap();
            let before = store.commits();
            let mut tasks = tokio::task::JoinSet::new();
            for task in 0..TASKS {
                let store = store.clone();
                tasks.spawn(async move {
                    let queue = format!("down/node-{}", task % 5);
                    for i in 0..PER_TASK {
                        let seq = task * PER_TASK + i;
                        store.append(&queue, vec![(seq, frame(seq))]).await?;
                    }
                    Ok::<_, StoreError>(())
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.unwrap().unwrap();
            }
            let commits = store.commits() - before;
            let appends = TASKS * PER_TASK;
            assert!(
                commits <= appends / 4,
                "{commits} commits for {appends} appends"
            );
            drop(store);

            let store = Store::open(&dir.file()).unwrap();
            let mut total = 0;
            for queue in store.queues().unwrap() {
                total += store.load(&queue).unwrap().len();
            }
            assert_eq!(total as u64, appends);
        })
        .await;
    }

    #[test]
    fn open_without_parent_dir_names_the_path() {
        let dir = TempDir::new("missing");
        let path = dir.0.join("no-such-dir").join("hub.redb");
        let Err(err) = Store::open(&path) else {
            panic!("open succeeded without a parent directory");
        };
        assert!(matches!(&err, StoreError::Open { path: p, .. } if *p == path));
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
    }

    /// Micro-benchmark, run by hand:
    /// `cargo test --release -p tether-hub store::tests::bench -- --ignored --nocapture`
    #[ignore]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bench_single_entry_appends() {
        const TASKS: u64 = 10;
        const PER_TASK: u64 = 1_000;
        let dir = TempDir::new("bench");
        let store = Store::open(&dir.file()).unwrap();
        let before = store.commits();
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..TASKS {
            let store = store.clone();
            tasks.spawn(async move {
                for i in 0..PER_TASK {
                    let seq = task * PER_TASK + i;
                    store
                        .append(&format!("down/node-{task}"), vec![(seq, vec![0u8; 256])])
                        .await
                        .unwrap();
                }
            });
        }
        bounded(async {
            while let Some(done) = tasks.join_next().await {
                done.unwrap();
            }
        })
        .await;
        let elapsed = started.elapsed();
        println!(
            "{} appends from {TASKS} tasks in {elapsed:?} ({} commits)",
            TASKS * PER_TASK,
            store.commits() - before
        );
    }
}
