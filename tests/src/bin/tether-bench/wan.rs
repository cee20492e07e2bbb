//! One logs stream across an emulated long link (issue 13 item 3): the rig's
//! edge reaches the cloud through a [`WanLink`], and the direct side reaches
//! the fixture kubelet through another relay of the same shape, so both sides
//! cross the same emulated round trip and bandwidth cap. A stream that has not
//! finished by the deadline is cut off and its rate taken over what it moved,
//! so a window-limited tunnel cannot hold the run for minutes.
//!
//! [`WanLink`]: tether_tests::wan::WanLink

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

use tether_tests::kubectl;

use crate::rig::{Dial, NODE, Side};
use crate::stats::mb_per_s;

/// One side's stream across the link.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct WanRun {
    /// Bytes received before the end or the deadline.
    pub(crate) bytes: u64,
    /// From the request to the last byte (or the deadline).
    pub(crate) elapsed: Duration,
    /// Whether every byte asked for arrived.
    pub(crate) complete: bool,
    /// TCP connect plus TLS handshake of the client connection: about one
    /// round trip of the link on the direct side, loopback on the tunnel side
    /// (the front is local; the link is between cloud and edge).
    pub(crate) handshake: Duration,
}

impl WanRun {
    pub(crate) fn mbps(&self) -> f64 {
        mb_per_s(self.bytes, self.elapsed)
    }
}

/// A logs stream of `bytes` on `side`, read until its end or `limit`.
async fn stream_across(
    dial: &Dial,
    side: Side,
    pod: &str,
    bytes: u64,
    limit: Duration,
) -> anyhow::Result<WanRun> {
    let connecting = Instant::now();
    let io = dial.connect(side).await?;
    let handshake = connecting.elapsed();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let path = format!("/containerLogs/default/{pod}/app?bytes={bytes}");
    let resp = tokio::time::timeout_at(deadline, kubectl::get_streaming(io, NODE, &path))
        .await
        .with_context(|| format!("{side:?} wan logs: no response head within {limit:?}"))??;
    ensure!(
        resp.status() == 200,
        "{side:?} wan logs: status {}",
        resp.status()
    );
    let mut body = resp.into_body();
    let mut got = 0u64;
    let complete = loop {
        match tokio::time::timeout_at(deadline, kubectl::next_chunk(&mut body)).await {
            Err(_) => break false,
            Ok(chunk) => match chunk.with_context(|| format!("{side:?} wan logs body"))? {
                Some(c) => got += c.len() as u64,
                None => break true,
            },
        }
    };
    let elapsed = started.elapsed();
    if complete {
        ensure!(
            got == bytes,
            "{side:?} wan logs: got {got} bytes, want {bytes}"
        );
    }
    Ok(WanRun {
        bytes: got,
        elapsed,
        complete,
        handshake,
    })
}

/// `[direct, tunnel]` (default for a side not in `sides`), each the better of
/// `runs` streams, interleaved so drifting load hits both alike. A short
/// warm-up per side first (the edge's kubelet connection, TLS sessions).
pub(crate) async fn wan_logs(
    dial: &Dial,
    sides: &[Side],
    bytes: u64,
    runs: usize,
    limit: Duration,
) -> anyhow::Result<[WanRun; 2]> {
    for side in sides {
        stream_across(dial, *side, "wan-warmup", 1 << 20, limit).await?;
    }
    let mut best = [WanRun::default(); 2];
    for _ in 0..runs {
        for side in sides {
            let i = usize::from(*side == Side::Tunnel);
            let run = stream_across(dial, *side, "wan", bytes, limit).await?;
            if run.mbps() > best[i].mbps() {
                best[i] = run;
            }
        }
    }
    Ok(best)
}
