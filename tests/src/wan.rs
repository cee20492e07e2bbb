//! An emulated long link on loopback: a userspace TCP relay that holds every
//! chunk for a one-way delay before passing it on, paces each direction to a
//! bandwidth cap, and keeps at most a fixed number of bytes in flight per
//! direction. `tc netem` is not available in this kernel, so this stands in
//! for it.
//!
//! The relay behaves like a link with a bounded queue: when a direction holds
//! `queue_bytes`, it stops reading, so TCP back-pressure reaches the sender
//! instead of the relay buffering without bound. Flow control that spans the
//! link end to end (HTTP/2 windows) sees the full round trip; plain TCP sees
//! only loopback hops on either side of the relay, like TCP with windows
//! large enough for the path. Both sides of a figure must therefore cross a
//! relay with the same [`WanSpec`].

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, debug, info_span};

/// Largest chunk the relay reads at once; also the pacing granularity.
const CHUNK: usize = 64 << 10;
/// Chunks queued per direction at most, besides the byte bound: many tiny
/// writes must not grow the queue's bookkeeping without bound either.
const QUEUE_CHUNKS: usize = 8192;

/// The shape of an emulated link.
#[derive(Clone, Copy, Debug)]
pub struct WanSpec {
    /// Delay added to every byte in each direction (half the round trip).
    pub one_way: Duration,
    /// Bytes per second each direction carries at most; `None` for no cap.
    pub rate: Option<u64>,
    /// Bytes one direction may hold (queued plus in flight) before it stops
    /// reading. Must cover `rate × one_way` or the queue, not the rate, is
    /// the limit.
    pub queue_bytes: usize,
}

impl WanSpec {
    /// A link with round trip `rtt`, capped at `rate` bytes per second each
    /// way, whose queue holds twice the one-way bandwidth-delay product (at
    /// least 1 MiB), like a router buffer sized to the path.
    pub fn new(rtt: Duration, rate: u64) -> Self {
        let one_way = rtt / 2;
        let bdp = (rate as f64 * one_way.as_secs_f64()) as usize;
        Self {
            one_way,
            rate: Some(rate),
            queue_bytes: (2 * bdp).max(1 << 20),
        }
    }

    /// When a chunk of `len` bytes read at `now` leaves the far end, given
    /// that the previous chunk finished serialising at `link_free`. Returns
    /// (delivery time, new `link_free`).
    fn schedule(&self, now: Instant, link_free: Instant, len: usize) -> (Instant, Instant) {
        let start = now.max(link_free);
        let serialise = match self.rate {
            Some(r) if r > 0 => Duration::from_secs_f64(len as f64 / r as f64),
            _ => Duration::ZERO,
        };
        let free = start + serialise;
        (free + self.one_way, free)
    }
}

/// A running relay: connections to [`WanLink::addr`] are forwarded to the
/// target through the emulated link. Dropping it stops the relay and every
/// connection through it.
pub struct WanLink {
    addr: SocketAddr,
    spec: WanSpec,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WanLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for WanLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WanLink")
            .field("addr", &self.addr)
            .field("spec", &self.spec)
            .finish()
    }
}

impl WanLink {
    /// Binds a loopback port and relays each connection to `target` on the
    /// current runtime.
    pub async fn start(target: SocketAddr, spec: WanSpec) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let span = info_span!("wan", relay.addr = %addr, target = %target);
        let task = tokio::spawn(accept_loop(listener, target, spec).instrument(span));
        Ok(Self { addr, spec, task })
    }

    /// Where to connect to cross the link.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The link's shape.
    pub fn spec(&self) -> WanSpec {
        self.spec
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, spec: WanSpec) {
    // The connections live in this set, so aborting the loop ends them all.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((near, peer)) => {
                    conns.spawn(
                        relay_connection(near, target, spec)
                            .instrument(info_span!("conn", peer.addr = %peer)),
                    );
                }
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn relay_connection(near: TcpStream, target: SocketAddr, spec: WanSpec) {
    let far = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "connect to target failed");
            return;
        }
    };
    // Small writes must not wait for Nagle on top of the emulated delay.
    let _ = near.set_nodelay(true);
    let _ = far.set_nodelay(true);
    let (near_r, near_w) = near.into_split();
    let (far_r, far_w) = far.into_split();
    let (up, down) = tokio::join!(
        direction(near_r, far_w, spec),
        direction(far_r, near_w, spec)
    );
    debug!(up = ?up, down = ?down, "relay connection closed");
}

/// A chunk on its way across the link, holding its share of the queue.
struct InFlight {
    deliver_at: Instant,
    data: Bytes,
    _queue: OwnedSemaphorePermit,
}

/// Carries one direction until EOF or an error; returns the bytes carried.
async fn direction(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    spec: WanSpec,
) -> io::Result<u64> {
    let queue = Arc::new(Semaphore::new(spec.queue_bytes));
    let (tx, mut rx) = mpsc::channel::<InFlight>(QUEUE_CHUNKS);
    let reader = async move {
        let mut link_free = Instant::now();
        loop {
            // Take queue room before reading, so a full queue stops reading
            // and the sender feels TCP back-pressure.
            let room = queue
                .clone()
                .acquire_many_owned(CHUNK.min(spec.queue_bytes) as u32)
                .await
                .map_err(|_| io::Error::other("queue closed"))?;
            let mut buf = BytesMut::with_capacity(CHUNK.min(spec.queue_bytes));
            let n = from.read_buf(&mut buf).await?;
            if n == 0 {
                return Ok::<_, io::Error>(());
            }
            // Keep only what was read charged against the queue.
            let mut room = room;
            if let Some(unused) = room.split(room.num_permits() - n) {
                drop(unused);
            }
            let (deliver_at, free) = spec.schedule(Instant::now(), link_free, n);
            link_free = free;
            let chunk = InFlight {
                deliver_at,
                data: buf.freeze(),
                _queue: room,
            };
            if tx.send(chunk).await.is_err() {
                return Ok(());
            }
        }
    };
    let writer = async move {
        let mut carried = 0u64;
        // Chunks already due are written together: fewer syscalls at high rates.
        let mut due: VecDeque<InFlight> = VecDeque::new();
        while let Some(first) = rx.recv().await {
            tokio::time::sleep_until(first.deliver_at).await;
            due.push_back(first);
            while let Ok(next) = rx.try_recv() {
                if next.deliver_at > Instant::now() {
                    // Not due yet: write what is, then wait for it.
                    let wait = next.deliver_at;
                    write_due(&mut to, &mut due, &mut carried).await?;
                    tokio::time::sleep_until(wait).await;
                }
                due.push_back(next);
            }
            write_due(&mut to, &mut due, &mut carried).await?;
        }
        // The near side finished sending: pass the half-close on.
        to.shutdown().await?;
        Ok::<_, io::Error>(carried)
    };
    let (read, carried) = tokio::join!(reader, writer);
    read?;
    carried
}

async fn write_due(
    to: &mut OwnedWriteHalf,
    due: &mut VecDeque<InFlight>,
    carried: &mut u64,
) -> io::Result<()> {
    // Each chunk's queue permit is released once its bytes are written.
    while let Some(chunk) = due.pop_front() {
        to.write_all(&chunk.data).await?;
        *carried += chunk.data.len() as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_serialises_chunks_back_to_back_then_adds_the_delay() {
        let spec = WanSpec {
            one_way: Duration::from_millis(25),
            rate: Some(1_000_000),
            queue_bytes: 1 << 20,
        };
        let t0 = Instant::now();
        let (d1, f1) = spec.schedule(t0, t0, 10_000);
        assert_eq!(f1, t0 + Duration::from_millis(10));
        assert_eq!(d1, t0 + Duration::from_millis(35));
        // A chunk read while the link is busy waits for it.
        let (d2, f2) = spec.schedule(t0 + Duration::from_millis(1), f1, 10_000);
        assert_eq!(f2, t0 + Duration::from_millis(20));
        assert_eq!(d2, t0 + Duration::from_millis(45));
        // An idle link starts at once.
        let late = t0 + Duration::from_secs(1);
        let (d3, _) = spec.schedule(late, f2, 0);
        assert_eq!(d3, late + Duration::from_millis(25));
    }

    #[test]
    fn queue_covers_twice_the_one_way_product() {
        let spec = WanSpec::new(Duration::from_millis(50), 100_000_000);
        assert_eq!(spec.one_way, Duration::from_millis(25));
        assert_eq!(spec.queue_bytes, 5_000_000);
        let slow = WanSpec::new(Duration::from_millis(50), 1_000);
        assert_eq!(slow.queue_bytes, 1 << 20);
    }
}
