//! Small-request rate (figure 2): `GET /pods` (~1 KiB of JSON) on keep-alive
//! HTTP/1.1 connections, one per concurrent worker like an apiserver's pool, for a
//! fixed window after a warm-up. A worker whose response says `Connection: close`
//! opens a new connection for its next request, inside that request's time.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use bytes::Bytes;
use http::Request;
use http::header::{CONNECTION, HOST};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use tether_tests::kubectl::IO_TIMEOUT;

use crate::rig::{Dial, Side};
use crate::stats::{Latency, cpu_by_role, cpu_time};

/// What one measurement window of one side saw.
#[derive(Debug, Default)]
pub(crate) struct GetWindow {
    window: Duration,
    /// Latency of every request that started and finished inside the window.
    samples: Vec<Duration>,
    /// CPU time of the whole process during the window.
    cpu: Duration,
    /// The same split by [`crate::stats::ROLES`].
    roles: [Duration; 4],
    /// Connections opened again because a response said `Connection: close`.
    reconnects: usize,
}

impl GetWindow {
    fn per_sec(&self) -> f64 {
        self.samples.len() as f64 / self.window.as_secs_f64().max(1e-9)
    }
}

/// Rate and latency of one side at one concurrency, over several windows.
#[derive(Debug, Default)]
pub(crate) struct GetRate {
    /// Requests per second in the best window: on a shared machine the least
    /// disturbed window is the closest to what the code can do.
    pub(crate) per_sec: f64,
    /// Latency over all windows.
    pub(crate) latency: Latency,
    /// CPU time of the whole process per request, over all windows, µs.
    pub(crate) cpu_us_per_req: f64,
    /// [`GetRate::cpu_us_per_req`] split by [`crate::stats::ROLES`].
    pub(crate) role_us_per_req: [f64; 4],
    /// Connections opened again after `Connection: close`, over all windows.
    pub(crate) reconnects: usize,
}

impl GetRate {
    pub(crate) fn from_windows(windows: Vec<GetWindow>) -> Self {
        let per_sec = windows.iter().map(GetWindow::per_sec).fold(0.0, f64::max);
        let requests = windows
            .iter()
            .map(|w| w.samples.len())
            .sum::<usize>()
            .max(1) as f64;
        let us = |d: Duration| d.as_secs_f64() * 1e6 / requests;
        let cpu: Duration = windows.iter().map(|w| w.cpu).sum();
        let mut roles = [Duration::ZERO; 4];
        for w in &windows {
            for (sum, d) in roles.iter_mut().zip(w.roles) {
                *sum += d;
            }
        }
        Self {
            per_sec,
            reconnects: windows.iter().map(|w| w.reconnects).sum(),
            cpu_us_per_req: us(cpu),
            role_us_per_req: roles.map(us),
            latency: Latency::from_samples(windows.into_iter().flat_map(|w| w.samples).collect()),
        }
    }
}

/// The measurement window every worker shares: `[start, end)`.
type Window = Option<(Instant, Instant)>;

/// Runs `concurrency` workers; each connects, then all warm up for `warmup` and
/// record the requests that complete inside the next `window`.
pub(crate) async fn small_gets(
    dial: &Dial,
    side: Side,
    concurrency: usize,
    warmup: Duration,
    window: Duration,
) -> anyhow::Result<GetWindow> {
    let (connected_tx, mut connected_rx) = mpsc::channel::<()>(concurrency);
    let (window_tx, window_rx) = watch::channel::<Window>(None);
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let dial = dial.clone();
        let connected = connected_tx.clone();
        let window = window_rx.clone();
        workers.spawn(worker(dial, side, connected, window));
    }
    drop(connected_tx);
    // Ends early if a worker failed before connecting; its error surfaces below.
    for _ in 0..concurrency {
        if connected_rx.recv().await.is_none() {
            break;
        }
    }
    let start = Instant::now() + warmup;
    // Ignoring the send error: with no receivers left every worker has already
    // returned, and its result says why.
    let _ = window_tx.send(Some((start, start + window)));
    tokio::time::sleep_until(start.into()).await;
    let (cpu_before, roles_before) = (cpu_time()?, cpu_by_role()?);
    tokio::time::sleep_until((start + window).into()).await;
    let cpu = cpu_time()?.saturating_sub(cpu_before);
    let mut roles = cpu_by_role()?;
    for (after, before) in roles.iter_mut().zip(roles_before) {
        *after = after.saturating_sub(before);
    }

    let (mut samples, mut reconnects) = (Vec::new(), 0);
    while let Some(done) = workers.join_next().await {
        let (worker_samples, worker_reconnects) = done.context("worker task")??;
        samples.extend(worker_samples);
        reconnects += worker_reconnects;
    }
    Ok(GetWindow {
        window,
        samples,
        cpu,
        roles,
        reconnects,
    })
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// A new HTTP/1.1 client connection; its driver runs in the returned task.
async fn open(dial: &Dial, side: Side) -> anyhow::Result<(Sender, tokio::task::JoinHandle<()>)> {
    let io = dial.connect(side).await?;
    let (sender, conn) = tokio::time::timeout(
        IO_TIMEOUT,
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io)),
    )
    .await
    .context("http handshake timed out")??;
    let conn = tokio::spawn(async move {
        // Its errors surface on the sender.
        let _ = conn.await;
    });
    Ok((sender, conn))
}

/// One keep-alive connection issuing requests back to back (a new one after a
/// `Connection: close` response); returns the latencies of the requests that
/// started and finished inside the window, and how many reconnects it made.
async fn worker(
    dial: Dial,
    side: Side,
    connected: mpsc::Sender<()>,
    mut window: watch::Receiver<Window>,
) -> anyhow::Result<(Vec<Duration>, usize)> {
    let (mut sender, mut conn) = open(&dial, side).await?;
    let _ = connected.send(()).await;
    // Dropped so the coordinator stops waiting once every worker connected or failed.
    drop(connected);
    let set = *window
        .wait_for(Option::is_some)
        .await
        .context("window never set")?;
    let (start, end) = set.context("window unset")?;

    let mut samples = Vec::new();
    let mut reconnects = 0;
    let mut closed = false;
    let run = async {
        loop {
            let sent = Instant::now();
            if sent >= end {
                break;
            }
            if closed {
                conn.abort();
                (sender, conn) = open(&dial, side).await?;
                reconnects += 1;
            }
            sender.ready().await.context("connection closed")?;
            let req = Request::get("/pods")
                .header(HOST, dial.node())
                .body(Empty::<Bytes>::new())?;
            let resp = sender.send_request(req).await.context("send request")?;
            ensure!(
                resp.status() == 200,
                "{side:?} /pods: status {}",
                resp.status()
            );
            closed = resp
                .headers()
                .get(CONNECTION)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            let body = resp.into_body().collect().await.context("read body")?;
            ensure!(!body.to_bytes().is_empty(), "{side:?} /pods: empty body");
            let done = Instant::now();
            if sent >= start && done <= end {
                samples.push(done - sent);
            }
        }
        anyhow::Ok(())
    };
    let limit = end.saturating_duration_since(Instant::now()) + IO_TIMEOUT;
    let result = tokio::time::timeout(limit, run).await;
    conn.abort();
    result.with_context(|| format!("{side:?} request stalled"))??;
    Ok((samples, reconnects))
}
