//! Front latency under a pre-TLS flood: `front_p99_under_slowloris_ms` is the
//! p99 of authenticated requests, each on a new connection through the front
//! and the tunnel, while connections that send half a ClientHello and stall
//! are held against the front (and redialled as the cloud closes them) from
//! another source address, over a window longer than the handshake deadline
//! (7 s quick, 15 s full). `front_p99_quiet_ms` is the same request just
//! before the flood, in the same run.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

use tether_tests::kubectl;
use tether_tests::slowloris::{Slowloris, Stall};

use crate::Plan;
use crate::report::Report;
use crate::rig::{NODE, Rig, Side};
use crate::stats::{Latency, ratio};

/// The attacker's source address (the clients dial from 127.0.0.1).
const ATTACKER: [u8; 4] = [127, 0, 0, 3];

pub(crate) async fn figure(rig: &Rig, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    // The window outlasts the 5 s handshake deadline, so the flood's
    // connections are closed and redialled while requests are measured.
    let (stalls, samples, window) = if plan.quick {
        (2_000, 60, Duration::from_secs(7))
    } else {
        (5_000, 200, Duration::from_secs(15))
    };
    let quiet = Latency::from_samples(requests(rig, samples, Duration::ZERO).await?);
    let attack = Slowloris::start(
        rig.dial.front(),
        IpAddr::from(ATTACKER),
        stalls,
        Stall::PartialClientHello,
    );
    let held = attack
        .wait_open(stalls * 96 / 100, Duration::from_secs(60))
        .await;
    let loaded = if held {
        Some(Latency::from_samples(requests(rig, samples, window).await?))
    } else {
        None
    };
    let dials = attack.dials();
    attack.stop().await;
    let loaded = loaded.context("the flood never held 96% of its connections")?;
    report.put("slowloris_stalls", stalls);
    report.num("front_p99_quiet_ms", quiet.p99_ms);
    report.num("front_p99_under_slowloris_ms", loaded.p99_ms);
    report.num(
        "front_p99_slowloris_ratio",
        ratio(loaded.p99_ms, quiet.p99_ms),
    );
    println!(
        "front under {stalls} pre-TLS stalls ({dials} dials): p99 {:.1} ms (quiet {:.1} ms), p50 {:.1} ms, {} requests over {window:?}",
        loaded.p99_ms, quiet.p99_ms, loaded.p50_ms, loaded.samples
    );
    Ok(())
}

/// At least `n` requests, one after another, each on a new front
/// connection, for at least `window` (evenly paced); at most 10,000.
async fn requests(rig: &Rig, n: usize, window: Duration) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    let begun = Instant::now();
    let pace = window / n as u32;
    while (out.len() < n || begun.elapsed() < window) && out.len() < 10_000 {
        tokio::time::sleep_until((begun + pace * out.len() as u32).into()).await;
        let started = Instant::now();
        let conn = rig.dial.connect(Side::Tunnel).await?;
        let (parts, _) = kubectl::get(conn, NODE, "/healthz").await?;
        ensure!(parts.status == 200, "front answered {}", parts.status);
        out.push(started.elapsed());
    }
    Ok(out)
}
