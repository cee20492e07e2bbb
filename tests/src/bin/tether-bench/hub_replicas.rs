//! Hub messages across cloud replicas (ADR 0021), `hub_cross_replica_ok`:
//! two replicas in this process with their hubs linked over the peer
//! listeners, one edge held by replica b. Messages are published on replica
//! a; halfway through, the node moves to a, and b publishes too. The figure
//! is the fraction of messages the edge application got exactly once
//! (target 1); `hub_cross_replica_msgs_per_s` is the rate from the first
//! publish to the last delivery. Correctness, not speed, is the point: the
//! bound on the run is generous.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tether_hub::dispatch::{Event, Filter};
use tether_hub::{Content, Message, Route};
use tether_tests::replicas::HubPair;

use crate::Plan;
use crate::figures::phase;
use crate::report::Report;

const NODE: &str = "edge-hubx";

fn message(resource: &str, n: u64) -> Message {
    Message::new(
        Route {
            source: "bench".into(),
            group: "app".into(),
            operation: "update".into(),
            resource: resource.into(),
        },
        Content::Json(serde_json::json!(n)),
    )
}

/// Runs the figure and reports it.
pub(crate) async fn figure(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let msgs: u64 = if plan.quick { 1000 } else { 5000 };
    let limit = Duration::from_secs(if plan.quick { 60 } else { 180 });
    let (once, elapsed) = phase("hub across replicas", limit, run(msgs)).await?;
    let ok = once as f64 / msgs as f64;
    report.put("hub_cross_replica_msgs", msgs);
    report.num("hub_cross_replica_ok", ok);
    report.num(
        "hub_cross_replica_msgs_per_s",
        msgs as f64 / elapsed.as_secs_f64(),
    );
    println!(
        "{:<22} {once} of {msgs} exactly once (published on a for a node held by b, moved to a halfway) in {:.2} s  {}",
        "hub across replicas",
        elapsed.as_secs_f64(),
        report.verdict("hub_cross_replica_ok")
    );
    Ok(())
}

/// Publishes `msgs` (half on a while b holds the node, then a quarter on
/// each after the move) and counts those delivered exactly once.
async fn run(msgs: u64) -> anyhow::Result<(u64, Duration)> {
    let pair = HubPair::start("bench-hubx", NODE).await?;
    let mut down = pair.edge.hub.subscribe(Filter::default())?;
    let started = Instant::now();
    let half = msgs / 2;
    for n in 0..half {
        pair.a.hub.publish(NODE, message("a", n)).await?;
    }
    pair.move_to("cloud-a").await?;
    for n in half..msgs {
        let (hub, resource) = match n % 2 {
            0 => (&pair.a.hub, "a"),
            _ => (&pair.b().hub, "b"),
        };
        hub.publish(NODE, message(resource, n)).await?;
    }
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let mut delivered = 0;
    while delivered < msgs {
        let ev = tokio::time::timeout(Duration::from_secs(30), down.recv())
            .await
            .with_context(|| format!("only {delivered} of {msgs} delivered"))?
            .context("subscription ended")?;
        if let Event::Message { message, .. } = ev {
            let Content::Json(v) = message.content else {
                anyhow::bail!("unexpected content")
            };
            *seen.entry(v.as_u64().context("number")?).or_default() += 1;
            delivered += 1;
        }
    }
    let elapsed = started.elapsed();
    // Late duplicates would show up here.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(ev) = down.try_recv() {
        if let Event::Message { message, .. } = ev
            && let Content::Json(v) = message.content
        {
            *seen.entry(v.as_u64().unwrap_or(u64::MAX)).or_default() += 1;
        }
    }
    let once = (0..msgs).filter(|n| seen.get(n) == Some(&1)).count() as u64;
    Ok((once, elapsed))
}
