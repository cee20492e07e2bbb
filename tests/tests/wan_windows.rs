//! Windows that follow the link, on the product (ADR 0020): a real tunnel
//! (cloud, edge, fixture kubelet) whose edge dials the cloud across the
//! emulated 50 ms link. The cloud's session drives h2 directly and its
//! window governor announces the stream window; the tests read that window
//! from the cloud's exported metrics. A logs stream whose reader keeps up
//! grows the window far past the fixed share; on the same session a reader
//! that stops brings it back to the floor, what the session holds for it
//! stays within its reservation and the budget, and another stream still
//! completes. No throughput is asserted: only windows and byte counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use tether_tests::bounded;
use tether_tests::fixture::{FixtureKubelet, LogVerifier};
use tether_tests::harness::{CloudHandle, CloudSpec, EdgeHandle, EdgeSpec, Pki};
use tether_tests::kubectl;
use tether_tests::wan::{WanLink, WanSpec};
use tether_tunnel::TunnelLimits;

const NODE: &str = "wan-windows-edge";
const RTT: Duration = Duration::from_millis(50);
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

/// The fixed share before ADR 0020 (16 MiB budget / 2 / 128 streams).
const FIXED_SHARE: i64 = 64 << 10;
/// "Well past the fixed share".
const GROWN: i64 = 16 * FIXED_SHARE;

/// One sample of the cloud's `tether_cloud_<name>` metric.
fn metric(cloud: &CloudHandle, name: &str) -> anyhow::Result<i64> {
    let full = format!("tether_cloud_{name}");
    let text = cloud.metrics_text();
    text.lines()
        .find_map(|l| {
            let (key, value) = l.split_once(' ')?;
            (key == full).then(|| value.trim().parse::<f64>().ok())?
        })
        .map(|v| v as i64)
        .with_context(|| format!("metric {full} not exported"))
}

async fn wait_for(
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    tokio::time::timeout(limit, async {
        while !cond()? {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("{what} within {limit:?}"))?
}

struct Rig {
    pki: Pki,
    cloud: CloudHandle,
    edge: EdgeHandle,
    _link: WanLink,
    _fixture: FixtureKubelet,
}

impl Rig {
    async fn start() -> anyhow::Result<Self> {
        let pki = Pki::generate()?;
        let fixture = FixtureKubelet::start(None).await?;
        let cloud = CloudHandle::start(&pki, CloudSpec::default()).await?;
        let link = WanLink::start(cloud.tunnel_addr, WanSpec::new(RTT, 100_000_000)).await?;
        let edge = EdgeHandle::start(&pki, link.addr(), EdgeSpec::new(NODE, fixture.addr))?;
        cloud
            .registry
            .wait_for_node(NODE, None, Duration::from_secs(10))
            .await
            .context("edge never connected across the link")?;
        Ok(Self {
            pki,
            cloud,
            edge,
            _link: link,
            _fixture: fixture,
        })
    }

    async fn logs(&self, pod: &str, bytes: u64) -> anyhow::Result<hyper::body::Incoming> {
        let tls = self.pki.apiserver_tls()?;
        let resp = kubectl::get_streaming(
            self.cloud.front_conn(tls).await?,
            NODE,
            &format!("/containerLogs/default/{pod}/app?bytes={bytes}"),
        )
        .await?;
        ensure!(resp.status() == 200, "{pod}: {}", resp.status());
        Ok(resp.into_body())
    }

    async fn stop(self) {
        self.edge.stop().await;
        self.cloud.stop().await;
    }
}

/// Reads a logs body to its end, checking every byte.
async fn read_all(mut body: hyper::body::Incoming) -> anyhow::Result<u64> {
    let mut verifier = LogVerifier::new(0);
    while let Some(chunk) = kubectl::next_chunk(&mut body).await? {
        verifier.update(&chunk)?;
    }
    Ok(verifier.offset())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_grows_past_the_fixed_share_across_the_long_link() {
    bounded(TEST_TIMEOUT, async {
        let rig = Rig::start().await?;
        let limits = TunnelLimits::default();
        let floor = i64::from(limits.window_floor());
        let budget = i64::from(limits.connection_window());
        ensure!(
            metric(&rig.cloud, "tunnel_window_bytes")? == floor,
            "a new session starts at the floor"
        );

        let want: u64 = 32 << 20;
        let got = read_all(rig.logs("grow", want).await?).await?;
        ensure!(got == want, "got {got} bytes, want {want}");

        let peak = metric(&rig.cloud, "tunnel_window_peak_bytes")?;
        ensure!(
            peak >= GROWN,
            "window peaked at {peak} bytes; the floor is {floor}, the fixed share {FIXED_SHARE}"
        );
        ensure!(
            peak <= i64::from(limits.stream_window),
            "window {peak} beyond its cap"
        );
        ensure!(metric(&rig.cloud, "tunnel_window_steps_total{direction=\"grow\"}")? > 0);
        ensure!(metric(&rig.cloud, "tunnel_window_reserved_bytes")? <= budget);
        // An idle session returns to the floor.
        wait_for("window back at the floor", Duration::from_secs(5), || {
            Ok(metric(&rig.cloud, "tunnel_window_bytes")? == floor)
        })
        .await?;
        rig.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_shrinks_the_window_and_another_stream_completes() {
    bounded(TEST_TIMEOUT, async {
        let rig = Rig::start().await?;
        let limits = TunnelLimits::default();
        let floor = i64::from(limits.window_floor());
        let budget = i64::from(limits.connection_window());

        // An endless log read until the window has grown, then not at all.
        let reading = Arc::new(AtomicBool::new(true));
        let read = Arc::new(AtomicU64::new(0));
        let mut body = rig.logs("stalled", 1 << 30).await?;
        let reader = {
            let (reading, read) = (reading.clone(), read.clone());
            tokio::spawn(async move {
                while reading.load(Ordering::Relaxed) {
                    match kubectl::next_chunk(&mut body).await {
                        Ok(Some(c)) => read.fetch_add(c.len() as u64, Ordering::Relaxed),
                        _ => break,
                    };
                }
                // Keep the stream open, unread.
                body
            })
        };
        wait_for("window growth", Duration::from_secs(30), || {
            Ok(metric(&rig.cloud, "tunnel_window_bytes")? >= GROWN)
        })
        .await?;
        let shrinks = metric(
            &rig.cloud,
            "tunnel_window_steps_total{direction=\"shrink\"}",
        )?;

        reading.store(false, Ordering::Relaxed);
        let stalled = reader.await?;
        wait_for("window back at the floor", Duration::from_secs(30), || {
            Ok(metric(&rig.cloud, "tunnel_window_bytes")? == floor)
        })
        .await?;
        ensure!(
            metric(
                &rig.cloud,
                "tunnel_window_steps_total{direction=\"shrink\"}"
            )? > shrinks,
            "the stall was not counted as a shrink"
        );
        // The stalled stream fills what it was granted; the session holds it
        // within its reservation and the budget.
        wait_for(
            "the stalled stream holds data",
            Duration::from_secs(10),
            || Ok(metric(&rig.cloud, "tunnel_window_buffered_bytes")? > 0),
        )
        .await?;
        for _ in 0..10 {
            let held = metric(&rig.cloud, "tunnel_window_buffered_bytes")?;
            let reserved = metric(&rig.cloud, "tunnel_window_reserved_bytes")?;
            ensure!(
                held <= reserved && reserved <= budget,
                "held {held} reserved {reserved} budget {budget}"
            );
            tokio::time::sleep(RTT).await;
        }

        // Another stream of the same session still completes, byte-exact.
        let want: u64 = 2 << 20;
        let got = read_all(rig.logs("moving", want).await?).await?;
        ensure!(
            got == want,
            "got {got} bytes beside the stalled stream, want {want}"
        );
        ensure!(
            metric(&rig.cloud, "tunnel_window_reserved_bytes")? <= budget,
            "budget exceeded"
        );
        ensure!(
            read.load(Ordering::Relaxed) > 0,
            "the stalled reader read first"
        );
        drop(stalled);
        rig.stop().await;
        Ok(())
    })
    .await;
}
