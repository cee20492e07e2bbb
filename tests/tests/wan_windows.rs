//! Windows that follow the link, on real HTTP/2 across the emulated 50 ms
//! link (ADR 0020). The product's sessions drive h2 through hyper, which
//! cannot change SETTINGS at run time, so this test drives h2 directly: a
//! receiver whose stream window is decided by `tether_tunnel::WindowGovernor`
//! (announced as SETTINGS_INITIAL_WINDOW_SIZE), a sender serving bulk and
//! endless bodies, and the relay between them. It checks the governor's
//! promises with h2's real settings acknowledgements and round trips: a
//! stream whose reader keeps up grows the window far past the fixed share;
//! on the same session a reader that stops brings the window back to the
//! floor, what it holds stays within the budget, and another stream still
//! completes. No throughput is asserted: only windows and byte counts.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use h2::RecvStream;
use http::{Request, Response};
use tether_tests::wan::{WanLink, WanSpec};
use tether_tunnel::WindowGovernor;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

const RTT: Duration = Duration::from_millis(50);
/// The receive half of the default session budget, 128 streams, and a floor
/// of half the fixed share: a 4 MiB growth pool (ADR 0020).
const BUDGET: u32 = 8 << 20;
const STREAMS: u32 = 128;
const FLOOR: u32 = 32 << 10;
/// "Far past the fixed share": the fixed share is 64 KiB.
const GROWN: u32 = 16 * FLOOR;
const CHUNK: usize = 64 << 10;
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves `/bytes/N` with N bytes and anything else with an endless body.
async fn sender(listener: TcpListener) {
    while let Ok((tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(tcp).await else {
                return;
            };
            while let Some(Ok((req, respond))) = conn.accept().await {
                tokio::spawn(serve(req, respond));
            }
        });
    }
}

async fn serve(
    req: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) -> Result<(), h2::Error> {
    let mut left: u64 = req
        .uri()
        .path()
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    let mut send = respond.send_response(Response::new(()), false)?;
    let chunk = Bytes::from(vec![7u8; CHUNK]);
    while left > 0 {
        send.reserve_capacity(CHUNK.min(usize::try_from(left).unwrap_or(CHUNK)));
        let Some(cap) = poll_fn(|cx| send.poll_capacity(cx)).await else {
            return Ok(());
        };
        let n = cap?.min(usize::try_from(left).unwrap_or(usize::MAX));
        if n == 0 {
            continue;
        }
        left -= n as u64;
        send.send_data(chunk.slice(..n), left == 0)?;
    }
    Ok(())
}

type Change = (u32, oneshot::Sender<()>);

/// Drives the client connection and applies window changes in order; a
/// change waits while the previous one awaits the peer's acknowledgement.
async fn drive(
    mut conn: h2::client::Connection<TcpStream, Bytes>,
    mut changes: mpsc::Receiver<Change>,
) {
    let mut pending: Option<Change> = None;
    let mut retry = tokio::time::interval(Duration::from_millis(5));
    let mut open = true;
    loop {
        tokio::select! {
            _ = &mut conn => return,
            c = changes.recv(), if open && pending.is_none() => match c {
                Some(c) => pending = Some(c),
                None => open = false,
            },
            _ = retry.tick(), if pending.is_some() => {}
        }
        if let Some((w, ack)) = pending.take() {
            match conn.set_initial_window_size(w) {
                Ok(()) => {
                    let _ = ack.send(());
                }
                Err(_) => pending = Some((w, ack)),
            }
        }
    }
}

/// The receiving end: an h2 client whose window the governor decides.
#[derive(Clone)]
struct Receiver {
    send: h2::client::SendRequest<Bytes>,
    governor: Arc<Mutex<WindowGovernor>>,
    changes: mpsc::Sender<Change>,
    largest: Arc<AtomicU32>,
    broken: Arc<AtomicBool>,
}

impl Receiver {
    async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(FLOOR)
            .initial_connection_window_size(BUDGET)
            .max_frame_size(CHUNK as u32)
            .handshake::<_, Bytes>(tcp)
            .await?;
        let (changes, rx) = mpsc::channel(16);
        tokio::spawn(drive(conn, rx));
        let me = Self {
            send,
            governor: Arc::new(Mutex::new(WindowGovernor::new(BUDGET, STREAMS, FLOOR))),
            changes,
            largest: Arc::new(AtomicU32::new(FLOOR)),
            broken: Arc::new(AtomicBool::new(false)),
        };
        // One tick per round trip (the product would time its h2 PINGs).
        let ticker = me.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(RTT);
            loop {
                every.tick().await;
                let change = {
                    let mut g = ticker.governor.lock().expect("governor lock");
                    if g.reserved() > u64::from(BUDGET) || g.buffered() > u64::from(BUDGET) {
                        ticker.broken.store(true, Ordering::Relaxed);
                    }
                    g.tick()
                };
                if let Some(w) = change {
                    ticker.largest.fetch_max(w, Ordering::Relaxed);
                    if !ticker.announce(w).await {
                        return;
                    }
                }
            }
        });
        Ok(me)
    }

    fn window(&self) -> u32 {
        self.governor.lock().expect("governor lock").window()
    }

    /// Sends a window change and waits until h2 has queued it.
    async fn announce(&self, w: u32) -> bool {
        let (ack, done) = oneshot::channel();
        self.changes.send((w, ack)).await.is_ok() && done.await.is_ok()
    }

    /// Opens stream `id` for `path`, announcing a lower window first when
    /// the governor asks for one.
    async fn open(&self, id: u64, path: &str) -> anyhow::Result<RecvStream> {
        let change = self.governor.lock().expect("governor lock").open(id)?;
        if let Some(w) = change {
            ensure!(self.announce(w).await, "connection gone");
        }
        let mut send = self.send.clone().ready().await?;
        let req = Request::get(format!("http://wan{path}")).body(())?;
        let (resp, _) = send.send_request(req, true)?;
        Ok(resp.await?.into_body())
    }

    /// Reads `id` until its end, counting what arrives; while `reading` is
    /// set, also consumes it (releases the window), otherwise holds it.
    async fn pump(
        &self,
        id: u64,
        mut body: RecvStream,
        reading: Arc<AtomicBool>,
    ) -> anyhow::Result<u64> {
        let mut got = 0u64;
        while let Some(chunk) = body.data().await {
            let n = chunk?.len();
            got += n as u64;
            let consume = reading.load(Ordering::Relaxed);
            {
                let mut g = self.governor.lock().expect("governor lock");
                g.received(id, n as u64);
                if consume {
                    g.consumed(id, n as u64);
                }
            }
            if consume {
                body.flow_control().release_capacity(n)?;
            }
        }
        self.governor.lock().expect("governor lock").close(id);
        Ok(got)
    }
}

async fn setup() -> anyhow::Result<(Receiver, WanLink)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let target = listener.local_addr()?;
    tokio::spawn(sender(listener));
    let link = WanLink::start(target, WanSpec::new(RTT, 100_000_000)).await?;
    let rx = Receiver::connect(link.addr()).await?;
    Ok((rx, link))
}

async fn wait_for(
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    tokio::time::timeout(limit, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .with_context(|| format!("{what} within {limit:?}"))
}

async fn bounded<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test timed out")
        .expect("test failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_grows_past_the_fixed_share_across_the_long_link() {
    bounded(async {
        let (rx, _link) = setup().await?;
        let want: u64 = 32 << 20;
        let body = rx.open(1, &format!("/bytes/{want}")).await?;
        let got = rx.pump(1, body, Arc::new(AtomicBool::new(true))).await?;
        ensure!(got == want, "got {got} bytes, want {want}");
        let largest = rx.largest.load(Ordering::Relaxed);
        ensure!(
            largest >= GROWN,
            "window peaked at {largest} bytes; the floor is {FLOOR}, the fixed share 64 KiB"
        );
        ensure!(largest <= BUDGET, "window {largest} beyond the budget");
        ensure!(
            !rx.broken.load(Ordering::Relaxed),
            "budget exceeded at a tick"
        );
        ensure!(rx.window() == FLOOR, "an idle session returns to the floor");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_shrinks_the_window_and_another_stream_completes() {
    bounded(async {
        let (rx, _link) = setup().await?;
        let reading = Arc::new(AtomicBool::new(true));
        let body = rx.open(1, "/endless").await?;
        let pump = {
            let (rx, reading) = (rx.clone(), reading.clone());
            tokio::spawn(async move { rx.pump(1, body, reading).await })
        };
        wait_for("window growth", Duration::from_secs(20), || {
            rx.window() >= GROWN
        })
        .await?;

        // The reader stops; the stream stays open, holding what arrives.
        reading.store(false, Ordering::Relaxed);
        wait_for("window back at the floor", Duration::from_secs(10), || {
            rx.window() == FLOOR
        })
        .await?;
        // Let the stalled stream take all it was granted, then check.
        tokio::time::sleep(4 * RTT).await;
        {
            let g = rx.governor.lock().expect("governor lock");
            ensure!(g.buffered() > 0, "the stalled stream holds data");
            ensure!(
                g.buffered() <= g.reserved() && g.reserved() <= u64::from(BUDGET),
                "held {} reserved {} budget {BUDGET}",
                g.buffered(),
                g.reserved()
            );
        }

        // Another stream of the same session still completes.
        let want: u64 = 1 << 20;
        let body = rx.open(2, &format!("/bytes/{want}")).await?;
        let got = rx.pump(2, body, Arc::new(AtomicBool::new(true))).await?;
        ensure!(
            got == want,
            "got {got} bytes beside the stalled stream, want {want}"
        );
        ensure!(rx.window() == FLOOR, "no growth while a reader is stalled");
        ensure!(
            !rx.broken.load(Ordering::Relaxed),
            "budget exceeded at a tick"
        );
        pump.abort();
        Ok(())
    })
    .await;
}
