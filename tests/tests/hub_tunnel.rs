//! The message hub's channel inside the tunnel session (ADR 0022), beside
//! bulk traffic of the same edge: the channel is its own HTTP/2 stream with
//! its own flow-control window, so a logs stream moving as fast as it can
//! delays hub messages by a bounded amount rather than until it ends.
//!
//! The bound asserted here is loose on purpose (timed assertions on this
//! noisy 2-core machine would flake): it catches head-of-line blocking,
//! which shows as seconds, and prints the measured delays for the record.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use tether_cloudhub::hub::{CloudHub, CloudHubConfig};
use tether_edgehub::hub::{EdgeHub, EdgeHubConfig};
use tether_hub::dispatch::{Event, Filter};
use tether_hub::{ChannelConfig, Content, HubMetrics, Message, Route, Store};
use tether_tests::fixture::{FixtureKubelet, LogVerifier};
use tether_tests::harness::{CloudHandle, CloudSpec, EdgeHandle, EdgeSpec, Pki};
use tether_tests::kubectl;
use tokio::sync::mpsc;

const NODE: &str = "edge-bulk";
/// A delay beyond this is head-of-line blocking, not noise.
const BOUND: Duration = Duration::from_secs(1);
/// Messages each way while the bulk stream runs.
const LOADED: usize = 40;

fn msg(n: usize) -> Message {
    Message::new(
        Route {
            source: "test".into(),
            group: "app".into(),
            operation: "update".into(),
            resource: "probe".into(),
        },
        Content::Json(serde_json::json!(n)),
    )
}

fn channel_cfg() -> ChannelConfig {
    ChannelConfig {
        rate: None,
        ..ChannelConfig::default()
    }
}

/// Waits for message `n` on `rx`.
async fn received(rx: &mut mpsc::Receiver<Event>, n: usize) -> anyhow::Result<()> {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .with_context(|| format!("message {n} never arrived"))?
            .context("subscription ended")?;
        if let Event::Message { message, .. } = ev
            && message.content == Content::Json(serde_json::json!(n))
        {
            return Ok(());
        }
    }
}

/// Publishes `count` messages each way, one at a time, and returns the
/// delays from publish to delivery (down: cloud to edge; up: edge to cloud).
async fn probe(
    cloud: &CloudHub,
    edge: &EdgeHub,
    down: &mut mpsc::Receiver<Event>,
    up: &mut mpsc::Receiver<Event>,
    from: usize,
    count: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut delays = Vec::with_capacity(count * 2);
    for n in from..from + count {
        let t = Instant::now();
        cloud.publish(NODE, msg(n)).await?;
        received(down, n).await?;
        delays.push(t.elapsed());
        let t = Instant::now();
        edge.publish(msg(n)).await?;
        received(up, n).await?;
        delays.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(delays)
}

fn summary(d: &mut [Duration]) -> (Duration, Duration, Duration) {
    d.sort();
    let at = |q: usize| d[(d.len() * q / 100).min(d.len() - 1)];
    (at(50), at(99), d[d.len() - 1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_messages_beside_a_bulk_stream_are_delayed_a_bounded_amount() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let pki = Pki::generate()?;
        let fixture = FixtureKubelet::start(None).await?;
        let cloud_hub = CloudHub::new(
            CloudHubConfig {
                channel: channel_cfg(),
                ..CloudHubConfig::default()
            },
            Store::in_memory(),
            HubMetrics::default(),
        )?;
        let cloud = CloudHandle::start(
            &pki,
            CloudSpec {
                hub: Some(cloud_hub.clone()),
                ..CloudSpec::default()
            },
        )
        .await?;
        let edge_hub = EdgeHub::new(
            EdgeHubConfig {
                channel: channel_cfg(),
                ..EdgeHubConfig::default()
            },
            Store::in_memory(),
            HubMetrics::default(),
        )?;
        let mut spec = EdgeSpec::new(NODE, fixture.addr);
        spec.hub = Some(edge_hub.clone());
        let edge = EdgeHandle::start(&pki, cloud.tunnel_addr, spec)?;
        for _ in 0..400 {
            if edge_hub.is_online() && cloud_hub.node(NODE).is_some_and(|n| n.online) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        ensure!(edge_hub.is_online(), "hub channel never came up in the tunnel");
        let mut down = edge_hub.subscribe(Filter::default())?;
        let mut up = cloud_hub.subscribe(Filter::default())?;

        let mut idle = probe(&cloud_hub, &edge_hub, &mut down, &mut up, 0, 20).await?;

        // A logs stream far longer than the probes, read as fast as it comes.
        let conn = cloud.front_conn(pki.apiserver_tls()?).await?;
        let resp = kubectl::get_streaming(
            conn,
            NODE,
            &format!("/containerLogs/default/web/app?bytes={}", 8u64 << 30),
        )
        .await?;
        ensure!(resp.status() == 200, "logs: {}", resp.status());
        let mut body = resp.into_body();
        let (stop_tx, mut stop) = tokio::sync::oneshot::channel::<()>();
        let reader = tokio::spawn(async move {
            let mut v = LogVerifier::new(0);
            loop {
                tokio::select! {
                    chunk = kubectl::next_chunk(&mut body) => match chunk? {
                        Some(c) => v.update(&c)?,
                        None => anyhow::bail!("the bulk stream ended early at {}", v.offset()),
                    },
                    _ = &mut stop => return Ok::<_, anyhow::Error>(v.offset()),
                }
            }
        });
        // Let it reach full speed first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut loaded = probe(&cloud_hub, &edge_hub, &mut down, &mut up, 1000, LOADED).await?;
        ensure!(!reader.is_finished(), "the bulk stream did not outlast the probes");
        let _ = stop_tx.send(());
        let moved = reader.await??;

        let (i50, i99, imax) = summary(&mut idle);
        let (l50, l99, lmax) = summary(&mut loaded);
        println!(
            "hub delay, publish to delivery, both ways: idle p50 {i50:?} p99 {i99:?} max {imax:?}; \
             beside a bulk logs stream ({} MiB moved meanwhile, byte-exact) p50 {l50:?} p99 {l99:?} max {lmax:?}",
            moved >> 20
        );
        ensure!(moved > 16 << 20, "the bulk stream hardly moved: {moved} bytes");
        ensure!(
            lmax < BOUND,
            "a hub message waited {lmax:?} beside the bulk stream (bound {BOUND:?})"
        );
        edge.stop().await;
        cloud.stop().await;
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .unwrap();
}
