//! Bulk log streams: single-stream throughput (figure 1), many concurrent streams
//! (figure 4), and throughput while other streams on the same node are stalled
//! (figure 5). Bodies are drained counting bytes; the total is checked exactly.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use hyper::body::Incoming;
use tokio::task::JoinSet;

use tether_tests::fixture::LogVerifier;
use tether_tests::kubectl;

use crate::rig::{Dial, Side};
use crate::stats::{cpu_by_role, cpu_time, mb_per_s, ms};

/// Size of the verified warm-up stream before the timed runs.
const WARMUP_BYTES: u64 = 8 << 20;
/// Shortest and longest wait for stalled streams to fill their windows and buffers
/// (or to be torn down) before the next measurement.
const STALL_SETTLE_MIN: Duration = Duration::from_millis(500);
const STALL_SETTLE: Duration = Duration::from_secs(5);

fn logs_path(pod: &str, bytes: u64) -> String {
    format!("/containerLogs/default/{pod}/app?bytes={bytes}")
}

/// Reads `body` to its end and returns how many bytes it carried.
async fn drain(mut body: Incoming) -> anyhow::Result<u64> {
    let mut n = 0u64;
    while let Some(chunk) = kubectl::next_chunk(&mut body).await? {
        n += chunk.len() as u64;
    }
    Ok(n)
}

/// One log stream of `bytes` on a fresh connection; times request to last byte
/// (the connection is set up before the clock starts).
async fn log_stream(dial: &Dial, side: Side, pod: &str, bytes: u64) -> anyhow::Result<Duration> {
    let io = dial.connect(side).await?;
    let started = Instant::now();
    let resp = kubectl::get_streaming(io, dial.node(), &logs_path(pod, bytes)).await?;
    ensure!(
        resp.status() == 200,
        "{side:?} logs: status {}",
        resp.status()
    );
    let got = drain(resp.into_body())
        .await
        .with_context(|| format!("{side:?} logs body from {}", dial.node()))?;
    let elapsed = started.elapsed();
    ensure!(got == bytes, "{side:?} logs: got {got} bytes, want {bytes}");
    Ok(elapsed)
}

/// An untimed log stream whose every byte is checked against the fixture's pattern.
async fn verified_log_stream(dial: &Dial, side: Side, bytes: u64) -> anyhow::Result<()> {
    let io = dial.connect(side).await?;
    let resp = kubectl::get_streaming(io, dial.node(), &logs_path("verified", bytes)).await?;
    ensure!(
        resp.status() == 200,
        "{side:?} logs: status {}",
        resp.status()
    );
    let mut body = resp.into_body();
    let mut verifier = LogVerifier::new(0);
    while let Some(chunk) = kubectl::next_chunk(&mut body).await? {
        verifier
            .update(&chunk)
            .with_context(|| format!("{side:?} logs content"))?;
    }
    ensure!(
        verifier.offset() == bytes,
        "{side:?} logs: got {} bytes, want {bytes}",
        verifier.offset()
    );
    Ok(())
}

/// Single-stream throughput of one side.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Throughput {
    /// Best run, MB/s.
    pub(crate) mbps: f64,
    /// CPU time of the whole process (client, fixture, cloud and edge) per MB
    /// moved, over all runs.
    pub(crate) cpu_ms_per_mb: f64,
    /// Average cores busy during the runs (CPU time / wall time).
    pub(crate) cores: f64,
    /// [`Throughput::cpu_ms_per_mb`] split by [`crate::stats::ROLES`].
    pub(crate) role_ms_per_mb: [f64; 4],
}

/// Best single-stream throughput of each side, `[direct, tunnel]` (zero for a side
/// not in `sides`); runs are interleaved (direct, tunnel, direct, ...) so drifting
/// machine noise hits both alike.
pub(crate) async fn logs_throughput(
    dial: &Dial,
    sides: &[Side],
    bytes: u64,
    runs: usize,
) -> anyhow::Result<[Throughput; 2]> {
    let paths: Vec<(&Dial, Side)> = sides.iter().map(|side| (dial, *side)).collect();
    let measured = paths_throughput(&paths, bytes, runs).await?;
    let mut out = [Throughput::default(); 2];
    for (side, x) in sides.iter().zip(measured) {
        out[usize::from(*side == Side::Tunnel)] = x;
    }
    Ok(out)
}

/// Best single-stream throughput of each path (a dial, which names the node,
/// and a side), in the order given; runs are interleaved path by path so
/// drifting machine noise hits every path alike.
pub(crate) async fn paths_throughput(
    paths: &[(&Dial, Side)],
    bytes: u64,
    runs: usize,
) -> anyhow::Result<Vec<Throughput>> {
    // Warm-up (the edge's pooled kubelet connection, TLS sessions, allocator),
    // checked byte for byte since the timed runs only count bytes.
    for (dial, side) in paths {
        verified_log_stream(dial, *side, WARMUP_BYTES).await?;
    }
    let n = paths.len();
    let mut best = vec![Duration::MAX; n];
    let mut cpu = vec![Duration::ZERO; n];
    let mut roles = vec![[Duration::ZERO; 4]; n];
    let mut wall = vec![Duration::ZERO; n];
    for _ in 0..runs {
        for (i, (dial, side)) in paths.iter().enumerate() {
            let (cpu_before, roles_before) = (cpu_time()?, cpu_by_role()?);
            let took = log_stream(dial, *side, "throughput", bytes).await?;
            cpu[i] += cpu_time()?.saturating_sub(cpu_before);
            for (sum, (after, before)) in roles[i]
                .iter_mut()
                .zip(cpu_by_role()?.iter().zip(roles_before))
            {
                *sum += after.saturating_sub(before);
            }
            wall[i] += took;
            best[i] = best[i].min(took);
        }
    }
    let mb = (bytes * runs as u64) as f64 / 1e6;
    Ok((0..n)
        .map(|i| Throughput {
            mbps: mb_per_s(bytes, best[i]),
            cpu_ms_per_mb: ms(cpu[i]) / mb,
            cores: cpu[i].as_secs_f64() / wall[i].as_secs_f64().max(1e-9),
            role_ms_per_mb: roles[i].map(|d| ms(d) / mb),
        })
        .collect())
}

/// Opens `count` tunnel log streams of `bytes` each, reads one chunk of each and
/// returns their bodies, to be held and never read again.
async fn open_stalled(dial: &Dial, count: usize, bytes: u64) -> anyhow::Result<Vec<Incoming>> {
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let io = dial.connect(Side::Tunnel).await?;
        let resp =
            kubectl::get_streaming(io, dial.node(), &logs_path(&format!("stalled-{i}"), bytes))
                .await
                .context("open stalled stream")?;
        ensure!(
            resp.status() == 200,
            "stalled stream: status {}",
            resp.status()
        );
        let mut body = resp.into_body();
        // One chunk proves the stream flows; after that it is never read again.
        kubectl::next_chunk(&mut body)
            .await?
            .context("stalled stream ended at once")?;
        held.push(body);
    }
    settle().await?;
    Ok(held)
}

/// Waits at least [`STALL_SETTLE_MIN`] and until the process is idle (CPU below 5%
/// of a core over 200 ms), at most [`STALL_SETTLE`]: stalled streams filling every
/// buffer on their way, or closing, must not compete with the next measurement.
async fn settle() -> anyhow::Result<()> {
    const STEP: Duration = Duration::from_millis(200);
    let deadline = Instant::now() + STALL_SETTLE;
    tokio::time::sleep(STALL_SETTLE_MIN).await;
    while Instant::now() < deadline {
        let before = cpu_time()?;
        tokio::time::sleep(STEP).await;
        if cpu_time()?.saturating_sub(before) <= STEP / 20 {
            break;
        }
    }
    Ok(())
}

/// Tunnel throughput beside stalled readers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stalled {
    /// Best run while `count` other streams of the node are held and never read.
    pub(crate) stalled_mbps: f64,
    /// Best run with no stalled stream, interleaved with the stalled runs.
    pub(crate) unstalled_mbps: f64,
}

/// Alternates a tunnel run with no stalled stream and one while `count` streams
/// of the same node (each asking for `stalled_bytes`) are held open and never
/// read; the stalled streams are opened afresh for each stalled run.
pub(crate) async fn stalled_throughput(
    dial: &Dial,
    count: usize,
    stalled_bytes: u64,
    bytes: u64,
    runs: usize,
) -> anyhow::Result<Stalled> {
    let (mut stalled, mut unstalled) = (Duration::MAX, Duration::MAX);
    for _ in 0..runs {
        unstalled = unstalled.min(log_stream(dial, Side::Tunnel, "unstalled", bytes).await?);
        let held = open_stalled(dial, count, stalled_bytes).await?;
        stalled = stalled.min(log_stream(dial, Side::Tunnel, "beside-stalled", bytes).await?);
        drop(held);
        settle().await?;
    }
    Ok(Stalled {
        stalled_mbps: mb_per_s(bytes, stalled),
        unstalled_mbps: mb_per_s(bytes, unstalled),
    })
}

/// Outcome of one side of the concurrent-streams figure.
#[derive(Debug, Default)]
pub(crate) struct Concurrent {
    /// Streams that delivered exactly the bytes asked for.
    pub(crate) ok: usize,
    /// From the first request to the last stream's end (connections set up before).
    pub(crate) elapsed: Duration,
    /// The first failure, if any stream failed.
    pub(crate) first_error: Option<String>,
}

/// `streams` log streams of `bytes` each, all at once, one connection each.
/// A stream that fails or misses `deadline` counts as not ok; it is not an error.
pub(crate) async fn concurrent_streams(
    dial: &Dial,
    side: Side,
    streams: usize,
    bytes: u64,
    deadline: Duration,
) -> anyhow::Result<Concurrent> {
    let mut connecting = JoinSet::new();
    for _ in 0..streams {
        let dial = dial.clone();
        connecting.spawn(async move { dial.connect(side).await });
    }
    // A connection that fails counts as a failed stream, like one that breaks later.
    let mut conns = Vec::with_capacity(streams);
    let mut first_error = None;
    while let Some(conn) = connecting.join_next().await {
        match conn.context("connect task")? {
            Ok(io) => conns.push(io),
            Err(e) => {
                first_error.get_or_insert_with(|| format!("connect: {e:#}"));
            }
        }
    }

    let started = Instant::now();
    let node = dial.node();
    let mut running = JoinSet::new();
    for (i, io) in conns.into_iter().enumerate() {
        running.spawn(async move {
            let resp =
                kubectl::get_streaming(io, node, &logs_path(&format!("many-{i}"), bytes)).await?;
            ensure!(resp.status() == 200, "status {}", resp.status());
            let got = drain(resp.into_body()).await?;
            ensure!(got == bytes, "got {got} bytes, want {bytes}");
            anyhow::Ok(())
        });
    }
    let mut ok = 0;
    let collect = async {
        while let Some(done) = running.join_next().await {
            match done {
                Ok(Ok(())) => ok += 1,
                Ok(Err(e)) => {
                    first_error.get_or_insert_with(|| format!("{e:#}"));
                }
                Err(e) => {
                    first_error.get_or_insert_with(|| format!("task: {e}"));
                }
            }
        }
    };
    if tokio::time::timeout(deadline, collect).await.is_err() {
        first_error.get_or_insert_with(|| format!("not all streams done within {deadline:?}"));
        running.abort_all();
    }
    Ok(Concurrent {
        ok,
        elapsed: started.elapsed(),
        first_error,
    })
}
