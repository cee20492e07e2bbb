//! A slow-handshake attacker for the fault suite and the benchmark: holds
//! many TCP connections that send a partial first flight (a truncated TLS
//! ClientHello, half an HTTP request head, or nothing) and then stall.
//! Whenever the server closes one, it dials again at once, so the pressure
//! stays constant. Every connection comes from one source address, like one
//! unauthenticated client. Loopback only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What each stalled connection sends before it stalls.
#[derive(Clone, Copy, Debug)]
pub enum Stall {
    /// The first 16 bytes of a ClientHello that announces 512.
    PartialClientHello,
    /// An HTTP request head without its final empty line.
    PartialRequestHead,
    /// Nothing at all.
    Idle,
}

impl Stall {
    fn bytes(self) -> &'static [u8] {
        match self {
            // Record: handshake, TLS 1.0 record version, 512 bytes; then a
            // ClientHello header announcing 508 bytes, and its version.
            Self::PartialClientHello => &[
                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x5a, 0x5a, 0x5a,
                0x5a, 0x5a,
            ],
            Self::PartialRequestHead => b"GET /metrics HTTP/1.1\r\nHost: admin\r\nX-Slow: 1\r\n",
            Self::Idle => b"",
        }
    }
}

/// A running attacker; it stops when dropped.
pub struct Slowloris {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    open: Arc<AtomicUsize>,
    dials: Arc<AtomicUsize>,
}

/// Dials per connection slot at most, so the attack is bounded even if the
/// test that started it forgets to stop it.
const MAX_DIALS_PER_SLOT: usize = 200_000;

impl Slowloris {
    /// Holds `conns` stalled connections to `target` from `source` (a
    /// loopback address such as 127.0.0.3, so the attacker is a client of
    /// its own).
    pub fn start(target: SocketAddr, source: IpAddr, conns: usize, stall: Stall) -> Self {
        let (stop, stopped) = watch::channel(false);
        let open = Arc::new(AtomicUsize::new(0));
        let dials = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        for _ in 0..conns {
            let mut stopped = stopped.clone();
            let (open, dials) = (open.clone(), dials.clone());
            tasks.spawn(async move {
                for _ in 0..MAX_DIALS_PER_SLOT {
                    if *stopped.borrow() {
                        return;
                    }
                    dials.fetch_add(1, Ordering::Relaxed);
                    let Some(mut tcp) = dial(target, source).await else {
                        // Refused or out of ports: pause, then try again.
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(20)) => continue,
                            _ = stopped.changed() => return,
                        }
                    };
                    if tcp.write_all(stall.bytes()).await.is_err() {
                        continue;
                    }
                    open.fetch_add(1, Ordering::Relaxed);
                    let mut buf = [0u8; 512];
                    // Hold until the server closes it (read 0 or an error).
                    let done = tokio::select! {
                        _ = async { while let Ok(n) = tcp.read(&mut buf).await { if n == 0 { break } } } => false,
                        _ = stopped.changed() => true,
                    };
                    open.fetch_sub(1, Ordering::Relaxed);
                    if done {
                        return;
                    }
                }
            });
        }
        Self {
            stop,
            tasks,
            open,
            dials,
        }
    }

    /// Connections open on the attacker's side now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections dialled so far.
    pub fn dials(&self) -> usize {
        self.dials.load(Ordering::Relaxed)
    }

    /// Waits until `n` connections are open at once, for at most `limit`;
    /// false if the attack did not get there.
    pub async fn wait_open(&self, n: usize, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.open() < n {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stops and closes every connection.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn dial(target: SocketAddr, source: IpAddr) -> Option<tokio::net::TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .ok()?;
    // Closing with RST (linger 0) leaves no TIME_WAIT behind: a soak run
    // dials tens of thousands of times from one source address, and bound
    // source ports stay taken for a minute otherwise.
    socket.set_zero_linger().ok()?;
    socket.bind(SocketAddr::new(source, 0)).ok()?;
    tokio::time::timeout(Duration::from_secs(5), socket.connect(target))
        .await
        .ok()?
        .ok()
}

/// File descriptors this process holds now.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}
