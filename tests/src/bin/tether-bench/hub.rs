//! The message-hub figures: cloud → edge messages per second for one node
//! (NDJSON-sized batches, and single publishes), publish-to-delivery latency
//! at half that rate, and messages per second fanned out to many nodes. The
//! real cloud and edge hubs run in this process, each on its role's runtime,
//! over mTLS hub sessions on loopback, with redb stores in a temporary
//! directory (the fan-out's edges use in-memory stores). A message bus has no
//! direct path to compare with, so these figures are absolute. This module
//! sets the hubs up and reports; [`crate::hub_load`] drives and times the
//! traffic.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, ensure};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use tether_cloudhub::hub::{CloudHub, CloudHubConfig};
use tether_edgehub::hub::{EdgeHub, EdgeHubConfig};
use tether_hub::dispatch::{Event, Filter};
use tether_hub::{ChannelConfig, HubMetrics, Store};
use tether_tests::harness::{CLOUD_NAME, Pki};
use tether_tunnel::{Backoff, ServerTls, Shutdown, ShutdownTrigger, TunnelDialer, TunnelLimits};

use crate::Plan;
use crate::figures::phase;
use crate::hub_load::{
    Cpu, Load, NODE, Rate, Runs, delivery_latency, message, parse, publish, throughput_runs,
};
use crate::idle::TempDir;
use crate::report::Report;
use crate::rig::Runtimes;
use crate::stats;

/// Publisher tasks of the fan-out figure.
const FANOUT_PUBLISHERS: usize = 16;
/// Fan-out edges started per batch, and the pause between batches, so the
/// TLS handshakes do not all land at once.
const EDGE_BATCH: usize = 50;
const EDGE_BATCH_PAUSE: Duration = Duration::from_millis(20);
/// Sockets per fan-out edge in this process: its own and the cloud's.
const FDS_PER_EDGE: u64 = 2;
/// How long the single edge may take to come online.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(20);
/// Drain allowed when the hubs stop.
const STOP_DRAIN: Duration = Duration::from_secs(1);

/// Sizes and deadlines of the hub figures.
#[derive(Debug)]
pub(crate) struct HubPlan {
    reps: usize,
    batch_msgs: u64,
    batch_size: usize,
    batch_publishers: usize,
    single_msgs: u64,
    single_publishers: usize,
    latency_window: Duration,
    nodes: usize,
    per_node: u64,
    nodes_online: Duration,
}

impl HubPlan {
    pub(crate) fn new(quick: bool, nodes: Option<usize>, batch_msgs: Option<u64>) -> Self {
        Self {
            reps: if quick { 2 } else { 3 },
            batch_msgs: batch_msgs.unwrap_or(if quick { 20_000 } else { 50_000 }),
            batch_size: 500,
            batch_publishers: 4,
            single_msgs: if quick { 4_800 } else { 16_000 },
            single_publishers: 16,
            latency_window: Duration::from_millis(if quick { 1500 } else { 3000 }),
            nodes: nodes.unwrap_or(1000),
            per_node: 20,
            nodes_online: Duration::from_secs(if quick { 20 } else { 45 }),
        }
    }
}

/// Production channel bounds except two that would otherwise be the figure:
/// no per-node rate limit (the cloud's default is 100 messages/s), and room
/// for 20,000 unacknowledged messages (the cloud's default is 1,024), as in
/// the hub's own tests.
fn channel_cfg() -> ChannelConfig {
    ChannelConfig {
        queue_capacity: 20_000,
        rate: None,
        ..ChannelConfig::default()
    }
}

/// The cloud hub and what it needs to keep serving.
struct Cloud {
    hub: CloudHub,
    addr: SocketAddr,
    /// Holds the hub's metric families (the ack latency histogram).
    registry: Registry,
    _stop: ShutdownTrigger,
}

/// Starts the cloud hub on the current runtime, listening on loopback.
async fn start_cloud(tls: Arc<rustls::ServerConfig>, store: &Path) -> anyhow::Result<Cloud> {
    let store = Store::open(store).context("open the cloud store")?;
    let mut registry = Registry::default();
    let metrics = HubMetrics::register(&mut registry, "cloud");
    let cfg = CloudHubConfig {
        channel: channel_cfg(),
        ..CloudHubConfig::default()
    };
    let hub = CloudHub::new(cfg, store, metrics).context("start the cloud hub")?;
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("bind the hub listener")?;
    let addr = tcp.local_addr()?;
    let (stop, shutdown) = Shutdown::new(STOP_DRAIN);
    let listener = hub.listener(
        tcp,
        ServerTls::new(tls),
        TunnelLimits::default(),
        shutdown.clone(),
    );
    tokio::spawn(listener.run(shutdown));
    Ok(Cloud {
        hub,
        addr,
        registry,
        _stop: stop,
    })
}

/// Starts an edge hub for `node` on `rt`, subscribed to everything before
/// it connects (a message nobody subscribes to is deferred, not delivered).
fn start_edge(
    rt: &tokio::runtime::Handle,
    tls: Arc<rustls::ClientConfig>,
    node: &str,
    cloud: SocketAddr,
    store: Store,
    shutdown: Shutdown,
) -> anyhow::Result<(EdgeHub, mpsc::Receiver<Event>)> {
    // EdgeHub::new spawns its dispatcher onto the runtime it is entered in.
    let _entered = rt.enter();
    let cfg = EdgeHubConfig {
        channel: channel_cfg(),
        ..EdgeHubConfig::default()
    };
    let hub = EdgeHub::new(cfg, store, HubMetrics::default()).context("start an edge hub")?;
    let events = hub.subscribe(Filter::default())?;
    let dialer = TunnelDialer::new(
        cloud.to_string(),
        CLOUD_NAME,
        tls,
        node.to_owned(),
        TunnelLimits::default(),
    )?;
    let run = hub.clone();
    rt.spawn(async move {
        let backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
        run.run(dialer, backoff, shutdown).await
    });
    Ok((hub, events))
}

/// Cumulative `(upper bound in seconds, count)` of the cloud's ack latency
/// histogram.
fn ack_buckets(registry: &Registry) -> anyhow::Result<Vec<(f64, u64)>> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).context("encode metrics")?;
    text.lines()
        .filter(|l| l.starts_with("tether_hub_ack_latency_seconds_bucket"))
        .map(|l| {
            // `{le="` or `,le="`: `role="` ends in `le="` too.
            let le = l
                .split_once("{le=\"")
                .or_else(|| l.split_once(",le=\""))
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(le, _)| le)
                .with_context(|| format!("no le in {l:?}"))?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse()?
            };
            let count = l
                .rsplit(' ')
                .next()
                .and_then(|c| c.parse().ok())
                .with_context(|| format!("no count in {l:?}"))?;
            Ok((le, count))
        })
        .collect()
}

/// The upper bound, in ms, of the histogram bucket that holds the p99 of the
/// acks counted between two snapshots; `None` without acks or beyond the
/// last finite bucket.
fn bucket_p99_ms(before: &[(f64, u64)], after: &[(f64, u64)]) -> Option<f64> {
    let counts: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|(a, b)| (a.0, a.1.saturating_sub(b.1)))
        .collect();
    let total = counts.last()?.1;
    let rank = (total as f64 * 0.99).ceil() as u64;
    counts
        .iter()
        .find(|(_, c)| total > 0 && *c >= rank)
        .map(|(le, _)| le * 1e3)
        .filter(|ms| ms.is_finite())
}

/// What the fan-out figure measured.
struct FanOut {
    online_after: Duration,
    rate: Rate,
}

/// The soft limit on open files and how many are open now.
fn fd_room() -> anyhow::Result<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").context("read /proc/self/limits")?;
    let soft = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|l| l.split_whitespace().next())
        .map(|v| v.parse().unwrap_or(u64::MAX))
        .context("no open-files line in /proc/self/limits")?;
    let open = std::fs::read_dir("/proc/self/fd")
        .context("read /proc/self/fd")?
        .count() as u64;
    Ok((soft, open))
}

/// `nodes` edge hubs with in-memory stores connect to the cloud; once all
/// are online, [`FANOUT_PUBLISHERS`] tasks publish `per_node` messages to
/// each node as one batch; the clock runs from the first publish until
/// every edge's subscriber has all of its own, in order. `Err(reason)`
/// inside `Ok` is a skip.
async fn fanout(
    pki: Arc<Pki>,
    cloud: &Cloud,
    runtimes: &Runtimes,
    plan: &HubPlan,
    limit: Duration,
) -> anyhow::Result<Result<FanOut, String>> {
    let nodes = plan.nodes;
    let per_node = plan.per_node;
    let (soft, open) = fd_room()?;
    let need = open + nodes as u64 * FDS_PER_EDGE + 256;
    if soft < need {
        return Ok(Err(format!(
            "needs about {need} open files and the limit is {soft} (raise `ulimit -n`)"
        )));
    }
    let names: Vec<String> = (0..nodes).map(|i| format!("hub-fan-{i:04}")).collect();
    let tls = {
        let names = names.clone();
        tokio::task::spawn_blocking(move || {
            names
                .iter()
                .map(|name| {
                    let cert = pki.edge_ca.issue_node_client(name, &[])?;
                    pki.edge_client_tls(&cert)
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .await
        .context("issue node certificates")??
    };

    let (stop, shutdown) = Shutdown::new(STOP_DRAIN);
    let mut edges = Vec::with_capacity(nodes);
    let mut receivers = JoinSet::new();
    let connecting = Instant::now();
    for (i, (name, tls)) in names.iter().zip(tls).enumerate() {
        let (edge, mut events) = start_edge(
            runtimes.edge(),
            tls,
            name,
            cloud.addr,
            Store::in_memory(),
            shutdown.clone(),
        )?;
        edges.push(edge);
        let name = name.clone();
        receivers.spawn(async move {
            let mut next = 0;
            while next < per_node {
                let ev = events.recv().await.context("edge subscription ended")?;
                if let Some((_, n, _)) = parse(ev)? {
                    ensure!(
                        n == next,
                        "{name}: message {n} arrived where {next} was due"
                    );
                    next += 1;
                }
            }
            anyhow::Ok(())
        });
        if i % EDGE_BATCH == EDGE_BATCH - 1 {
            tokio::time::sleep(EDGE_BATCH_PAUSE).await;
        }
    }
    loop {
        let online = names
            .iter()
            .filter(|n| cloud.hub.node(n).is_some_and(|s| s.online))
            .count();
        if online == nodes {
            break;
        }
        if connecting.elapsed() > plan.nodes_online {
            return Ok(Err(format!(
                "only {online} of {nodes} edge hubs online after {:?}",
                plan.nodes_online
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let online_after = connecting.elapsed();

    let cpu_before = Cpu::now()?;
    let started = Instant::now();
    let deadline = started + limit;
    let names = Arc::new(names);
    let mut publishers = JoinSet::new();
    for p in 0..FANOUT_PUBLISHERS {
        let cloud = cloud.hub.clone();
        let names = names.clone();
        publishers.spawn(async move {
            let mut queue_full = 0;
            for name in names.iter().skip(p).step_by(FANOUT_PUBLISHERS) {
                let make = |i| message("fan", i, 0);
                queue_full += publish(&cloud, name, 0..per_node, make, deadline).await?;
            }
            anyhow::Ok(queue_full)
        });
    }
    let mut done = 0;
    let mut queue_full = 0;
    while done < nodes {
        tokio::select! {
            r = tokio::time::timeout_at(deadline, receivers.join_next()) => {
                r.map_err(|_| anyhow!("only {done} of {nodes} nodes had all messages within {limit:?}"))?
                    .context("receivers ended early")?
                    .context("receiver task")??;
                done += 1;
            }
            Some(r) = publishers.join_next() => queue_full += r.context("publisher task")??,
        }
    }
    let elapsed = started.elapsed();
    let cpu = Cpu::now()? - cpu_before;
    while let Some(r) = publishers.join_next().await {
        queue_full += r.context("publisher task")??;
    }
    stop.trigger();
    drop(edges);
    Ok(Ok(FanOut {
        online_after,
        rate: Rate {
            msgs: nodes as u64 * per_node,
            elapsed,
            cpu,
            queue_full,
        },
    }))
}

fn line(figure: &str, text: &str) {
    println!("{figure:<22} {text}");
}

/// Records a throughput figure's best rate, the CPU and refusals of all its
/// runs under `key`, and prints its line.
fn put_rate(report: &mut Report, key: &str, figure: &str, what: &str, r: &Runs, roles: bool) {
    let Some(best) = &r.best else {
        return;
    };
    let cpu = r.cpu.us_per_msg(r.msgs);
    report.put(&format!("{key}_msgs"), best.msgs);
    report.num(key, r.per_sec());
    report.put(
        &format!("{key}_runs"),
        r.rates
            .iter()
            .map(|x| stats::round3(*x))
            .collect::<Vec<_>>(),
    );
    report.num(&format!("{key}_cpu_us_per_msg"), cpu[0]);
    report.put(&format!("{key}_queue_full_retries"), r.queue_full);
    let mut split = String::new();
    if roles {
        for (role, v) in ["client", "cloud", "edge", "store"].iter().zip(&cpu[1..]) {
            report.num(&format!("{key}_cpu_us_per_msg_{role}"), *v);
        }
        split = format!(
            " (client {:.0}, cloud {:.0}, edge {:.0}, store writers {:.0})",
            cpu[1], cpu[2], cpu[3], cpu[4]
        );
    }
    let runs = match r.rates.len() {
        1 => String::new(),
        n => format!(
            " (best of {n}: {})",
            r.rates
                .iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    line(
        figure,
        &format!(
            "{what}: {} msgs in {:.2} s = {:.0} msgs/s{runs}, absolute (no direct baseline); \
             {:.0} us CPU/msg{split}",
            best.msgs,
            best.elapsed.as_secs_f64(),
            r.per_sec(),
            cpu[0]
        ),
    );
}

/// Runs the hub figures on a fresh cloud hub and edge hub(s).
pub(crate) async fn figures(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let hp = &plan.hub;
    let runtimes = Runtimes::new(plan.shared_runtime)?;
    let dir = TempDir(std::env::temp_dir().join(format!(
        "tether-bench-hub-{}-{}",
        std::process::id(),
        tether_pki::rand_u64()
    )));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("create {}", dir.0.display()))?;
    let result = run(plan, hp, &runtimes, &dir.0, report).await;
    runtimes.shutdown();
    drop(dir);
    result
}

async fn run(
    plan: &Plan,
    hp: &HubPlan,
    runtimes: &Runtimes,
    dir: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let roles = runtimes.separate();
    let pki = Arc::new(Pki::generate().context("generate pki")?);
    let server_tls = pki.tunnel_server_tls()?;
    let cloud_store = dir.join("cloud.redb");
    let cloud = runtimes
        .cloud()
        .spawn(async move { start_cloud(server_tls, &cloud_store).await })
        .await
        .context("cloud start task")??;
    let cert = pki.edge_ca.issue_node_client(NODE, &[])?;
    let (edge_stop, shutdown) = Shutdown::new(STOP_DRAIN);
    let edge_store = Store::open(&dir.join("edge.redb")).context("open the edge store")?;
    let (edge, mut down) = start_edge(
        runtimes.edge(),
        pki.edge_client_tls(&cert)?,
        NODE,
        cloud.addr,
        edge_store,
        shutdown,
    )?;
    let online = async {
        while !(edge.is_online() && cloud.hub.node(NODE).is_some_and(|s| s.online)) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::Ok(())
    };
    phase("hub edge online", ONLINE_TIMEOUT, online).await?;
    report.put("hub_batch_size", hp.batch_size);

    // Untimed: one batch to warm the link, the stores and the allocator.
    let limit = Duration::from_secs(if plan.quick { 10 } else { 30 });
    let warm = Load {
        prefix: "warm",
        publishers: 1,
        per_task: 500,
        batch: 500,
    };
    throughput_runs(&cloud.hub, &mut down, warm, 1, limit).await?;

    let load = Load {
        prefix: "batch",
        publishers: hp.batch_publishers,
        per_task: hp.batch_msgs / hp.batch_publishers as u64,
        batch: hp.batch_size,
    };
    let batch = throughput_runs(&cloud.hub, &mut down, load, hp.reps, limit).await?;
    put_rate(
        report,
        "hub_msgs_per_s",
        &format!("hub {}-msg batches", hp.batch_size),
        &format!("{} publishers", hp.batch_publishers),
        &batch,
        roles,
    );

    let load = Load {
        prefix: "single",
        publishers: hp.single_publishers,
        per_task: hp.single_msgs / hp.single_publishers as u64,
        batch: 1,
    };
    let single = throughput_runs(&cloud.hub, &mut down, load, hp.reps, limit).await?;
    put_rate(
        report,
        "hub_msgs_per_s_single",
        "hub single publishes",
        &format!("{} publishers", hp.single_publishers),
        &single,
        roles,
    );

    let acks_before = ack_buckets(&cloud.registry)?;
    let rate = batch.per_sec() / 2.0;
    ensure!(rate > 0.0, "no batch rate to pace the latency figure by");
    let lat_limit = hp.latency_window + limit;
    let lat = delivery_latency(&cloud.hub, &mut down, rate, hp.latency_window, lat_limit);
    let lat = phase("hub latency", lat_limit + Duration::from_secs(5), lat).await?;
    let ack_p99 = bucket_p99_ms(&acks_before, &ack_buckets(&cloud.registry)?);
    report.num("hub_latency_rate_msgs_per_s", lat.rate);
    report.put("hub_latency_msgs", lat.msgs);
    report.num("hub_delivery_p50_ms", lat.latency.p50_ms);
    report.num("hub_ack_p99_ms", lat.latency.p99_ms);
    report.num("hub_publish_stored_p50_ms", lat.stored.p50_ms);
    report.num("hub_publish_stored_p99_ms", lat.stored.p99_ms);
    if let Some(ms) = ack_p99 {
        report.num("hub_ack_histogram_p99_le_ms", ms);
    }
    line(
        "hub delivery latency",
        &format!(
            "{} msgs at {:.0} msgs/s (half the batch rate): publish to edge delivery \
             p50 {:.2} p99 {:.2} ms (hub_ack_p99_ms); publish stored p50 {:.2} p99 {:.2} ms; \
             ack histogram p99 <= {}",
            lat.msgs,
            lat.rate,
            lat.latency.p50_ms,
            lat.latency.p99_ms,
            lat.stored.p50_ms,
            lat.stored.p99_ms,
            ack_p99.map_or("-".to_owned(), |ms| format!("{ms} ms"))
        ),
    );
    edge_stop.trigger();
    drop(edge);

    let key = format!("hub_msgs_per_s_{}_nodes", hp.nodes);
    report.put("hub_fanout_nodes", hp.nodes);
    report.put("hub_fanout_msgs_per_node", hp.per_node);
    let fan = fanout(pki, &cloud, runtimes, hp, limit);
    let figure = format!("hub fan-out {} nodes", hp.nodes);
    let bound = hp.nodes_online + limit + Duration::from_secs(30);
    match phase("hub fan-out", bound, fan).await? {
        Ok(f) => {
            report.num("hub_fanout_online_s", f.online_after.as_secs_f64());
            let what = format!(
                "{} each, all online after {:.1} s",
                hp.per_node,
                f.online_after.as_secs_f64()
            );
            let mut runs = Runs::default();
            runs.add(f.rate);
            put_rate(report, &key, &figure, &what, &runs, roles);
        }
        Err(reason) => {
            report.put("hub_fanout_skipped", reason.clone());
            line(&figure, &format!("skipped: {reason}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_bucket_of_the_acks_between_snapshots() {
        let before = [(0.0005, 10), (0.002, 10), (0.008, 10), (f64::INFINITY, 10)];
        let after = [
            (0.0005, 10),
            (0.002, 100),
            (0.008, 110),
            (f64::INFINITY, 110),
        ];
        assert_eq!(bucket_p99_ms(&before, &after), Some(8.0));
        let after = [
            (0.0005, 10),
            (0.002, 110),
            (0.008, 110),
            (f64::INFINITY, 110),
        ];
        assert_eq!(bucket_p99_ms(&before, &after), Some(2.0));
        assert_eq!(bucket_p99_ms(&before, &before), None);
    }
}
