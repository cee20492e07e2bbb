//! End-to-end tests of the message channel: the real cloud and edge hubs
//! in-process, real mTLS WebSocket hub sessions on loopback, redb stores in
//! a temporary directory. (Process-level restarts are in tests/hub_cli.rs.)

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, ensure};
use tether_cloudhub::hub::{CloudHub, CloudHubConfig};
use tether_edgehub::hub::{EdgeHub, EdgeHubConfig};
use tether_hub::dispatch::{Event, Filter};
use tether_hub::{ChannelConfig, Content, HubMetrics, Message, Route, Store};
use tether_tests::harness::{CLOUD_NAME, Pki};
use tether_tunnel::{Backoff, ServerTls, Shutdown, ShutdownTrigger, TunnelDialer, TunnelLimits};
use tokio::sync::mpsc;

const NODE: &str = "edge-1";

struct Env {
    pki: Pki,
    dir: PathBuf,
    cloud: CloudHub,
    cloud_stop: Option<ShutdownTrigger>,
    addr: std::net::SocketAddr,
    edge: EdgeHub,
    edge_stop: Option<ShutdownTrigger>,
}

fn channel_cfg() -> ChannelConfig {
    ChannelConfig {
        queue_capacity: 20_000,
        rate: None,
        keepalive_interval: Duration::from_secs(1),
        keepalive_timeout: Duration::from_secs(5),
        ..ChannelConfig::default()
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tether-hub-{name}-{}-{}",
        std::process::id(),
        tether_pki::rand_u64()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Env {
    async fn start(name: &str, cloud_cfg: CloudHubConfig) -> anyhow::Result<Self> {
        let pki = Pki::generate()?;
        let dir = temp_dir(name);
        let (cloud, stop, addr) = start_cloud(&pki, &dir, cloud_cfg, None).await?;
        let (edge, edge_stop) = start_edge(&pki, &dir, NODE, addr).await?;
        let env = Self {
            pki,
            dir,
            cloud,
            cloud_stop: Some(stop),
            addr,
            edge,
            edge_stop: Some(edge_stop),
        };
        env.wait_online(true).await?;
        Ok(env)
    }

    async fn wait_online(&self, online: bool) -> anyhow::Result<()> {
        for _ in 0..200 {
            if self.edge.is_online() == online
                && self.cloud.node(NODE).is_some_and(|s| s.online == online)
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("hub link never became online={online}")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start_cloud(
    pki: &Pki,
    dir: &std::path::Path,
    cfg: CloudHubConfig,
    port: Option<u16>,
) -> anyhow::Result<(CloudHub, ShutdownTrigger, std::net::SocketAddr)> {
    let store = open_store(&dir.join("cloud.redb")).await?;
    let hub = CloudHub::new(cfg, store, HubMetrics::default())?;
    let tcp = tokio::net::TcpListener::bind(("127.0.0.1", port.unwrap_or(0))).await?;
    let addr = tcp.local_addr()?;
    let (trigger, shutdown) = Shutdown::new(Duration::from_secs(1));
    let listener = hub.listener(
        tcp,
        ServerTls::new(pki.tunnel_server_tls()?),
        TunnelLimits::default(),
        shutdown.clone(),
    );
    tokio::spawn(listener.run(shutdown));
    Ok((hub, trigger, addr))
}

/// Opens a store file, waiting (bounded) for a stopped predecessor's tasks
/// to let go of it, as a restarted process waits for the old one to exit.
async fn open_store(path: &std::path::Path) -> anyhow::Result<Store> {
    for _ in 0..100 {
        match Store::open(path) {
            Ok(s) => return Ok(s),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    Ok(Store::open(path)?)
}

async fn start_edge(
    pki: &Pki,
    dir: &std::path::Path,
    node: &str,
    addr: std::net::SocketAddr,
) -> anyhow::Result<(EdgeHub, ShutdownTrigger)> {
    let store = open_store(&dir.join(format!("{node}.redb"))).await?;
    let hub = EdgeHub::new(
        EdgeHubConfig {
            channel: channel_cfg(),
            ..EdgeHubConfig::default()
        },
        store,
        HubMetrics::default(),
    )?;
    let cert = pki.edge_ca.issue_node_client(node, &[])?;
    let dialer = TunnelDialer::new(
        addr.to_string(),
        CLOUD_NAME,
        pki.edge_client_tls(&cert)?,
        node.to_owned(),
        TunnelLimits::default(),
    )?;
    let (trigger, shutdown) = Shutdown::new(Duration::from_secs(1));
    let run = hub.clone();
    tokio::spawn(async move {
        run.run(
            dialer,
            Backoff::new(Duration::from_millis(5), Duration::from_millis(50)),
            shutdown,
        )
        .await
    });
    Ok((hub, trigger))
}

fn cloud_cfg() -> CloudHubConfig {
    CloudHubConfig {
        channel: channel_cfg(),
        ..CloudHubConfig::default()
    }
}

fn msg(resource: &str, n: u64) -> Message {
    Message::new(
        Route {
            source: "test".into(),
            group: "app".into(),
            operation: "update".into(),
            resource: resource.into(),
        },
        Content::Json(serde_json::json!(n)),
    )
}

/// Collects `(resource, n)` of `total` messages from a subscription.
async fn collect(
    rx: &mut mpsc::Receiver<Event>,
    total: usize,
) -> anyhow::Result<HashMap<String, Vec<u64>>> {
    let mut got: HashMap<String, Vec<u64>> = HashMap::new();
    let mut n = 0;
    while n < total {
        let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .with_context(|| format!("only {n} of {total} messages arrived"))?
            .context("subscription ended")?;
        if let Event::Message { message, .. } = ev {
            let Content::Json(v) = message.content else {
                anyhow::bail!("unexpected content")
            };
            got.entry(message.route.resource)
                .or_default()
                .push(v.as_u64().context("number")?);
            n += 1;
        }
    }
    Ok(got)
}

fn check_exactly_once_in_order(
    got: &HashMap<String, Vec<u64>>,
    resources: usize,
    per: u64,
) -> anyhow::Result<()> {
    ensure!(got.len() == resources, "resources: {:?}", got.keys());
    for (r, ns) in got {
        ensure!(
            ns.iter().copied().eq(0..per),
            "{r}: not exactly 0..{per} in order (len {}, first wrong at {:?})",
            ns.len(),
            ns.iter().enumerate().find(|(i, n)| *i as u64 != **n)
        );
    }
    Ok(())
}

const RESOURCES: usize = 8;
const PER_RESOURCE: u64 = 1250; // 8 x 1250 = 10,000 each way

async fn publish_all<F, Fut>(publish: F)
where
    F: Fn(Message) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let mut tasks = Vec::new();
    for r in 0..RESOURCES {
        let publish = publish.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..PER_RESOURCE {
                publish(msg(&format!("r{r}"), n)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_link_delivers_20000_messages_exactly_once_in_order() {
    tokio::time::timeout(Duration::from_secs(240), async {
        let env = Env::start("flap", cloud_cfg()).await?;
        let mut up = env.cloud.subscribe(Filter::default())?;
        let mut down = env.edge.subscribe(Filter::default())?;
        let cloud = env.cloud.clone();
        let edge = env.edge.clone();
        let down_pub = tokio::spawn(publish_all(move |m| {
            let cloud = cloud.clone();
            async move { cloud.publish(NODE, m).await.map(drop).map_err(Into::into) }
        }));
        let up_pub = tokio::spawn(publish_all(move |m| {
            let edge = edge.clone();
            async move { edge.publish(m).await.map(drop).map_err(Into::into) }
        }));
        // 100 cuts at pseudo-random moments while traffic flows.
        let cloud = env.cloud.clone();
        let cutter = tokio::spawn(async move {
            let mut seed = 0x2545_f491_4f6c_dd1du64;
            let mut cuts = 0;
            for _ in 0..2000 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                tokio::time::sleep(Duration::from_millis(5 + seed % 40)).await;
                if cloud.disconnect(NODE) {
                    cuts += 1;
                    if cuts == 100 {
                        break;
                    }
                }
            }
            cuts
        });
        let (down_got, up_got) = tokio::try_join!(
            collect(&mut down, RESOURCES * PER_RESOURCE as usize),
            collect(&mut up, RESOURCES * PER_RESOURCE as usize),
        )?;
        down_pub.await?;
        up_pub.await?;
        let cuts = cutter.await?;
        ensure!(cuts == 100, "only {cuts} cuts happened");
        check_exactly_once_in_order(&down_got, RESOURCES, PER_RESOURCE)?;
        check_exactly_once_in_order(&up_got, RESOURCES, PER_RESOURCE)?;
        // Nothing further trickles in: no duplicates after the fact.
        env.wait_online(true).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        ensure!(
            matches!(
                down.try_recv(),
                Err(_) | Ok(Event::Online { .. } | Event::Offline { .. })
            ),
            "extra downstream delivery"
        );
        ensure!(env.cloud.node(NODE).context("node")?.queued == 0);
        ensure!(env.edge.queued() == 0);
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_survive_edge_and_cloud_restarts() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let mut env = Env::start("restart", cloud_cfg()).await?;
        // Edge restart: the edge queues upstream messages while the cloud
        // is unreachable, restarts, and delivers them afterwards.
        let port = env.addr.port();
        env.cloud_stop.take().context("cloud")?.trigger();
        env.wait_online(false).await?;
        for n in 0..50 {
            env.edge.publish(msg("up", n)).await?;
        }
        env.edge_stop.take().context("edge")?.trigger();
        // Let go of both hubs, as exiting processes do.
        drop(std::mem::replace(
            &mut env.edge,
            EdgeHub::new(
                EdgeHubConfig::default(),
                Store::in_memory(),
                HubMetrics::default(),
            )?,
        ));
        drop(std::mem::replace(
            &mut env.cloud,
            CloudHub::new(cloud_cfg(), Store::in_memory(), HubMetrics::default())?,
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Cloud restart: it reloads what it accepted for the node.
        let (cloud, stop, addr) = start_cloud(&env.pki, &env.dir, cloud_cfg(), Some(port)).await?;
        for n in 0..50 {
            cloud.publish(NODE, msg("down", n)).await?;
        }
        stop.trigger();
        drop(cloud);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (cloud, stop, _) =
            start_cloud(&env.pki, &env.dir, cloud_cfg(), Some(addr.port())).await?;
        ensure!(cloud.node(NODE).context("queue reloaded")?.queued == 50);
        let mut up = cloud.subscribe(Filter::default())?;
        let (edge, edge_stop) = start_edge(&env.pki, &env.dir, NODE, addr).await?;
        ensure!(
            edge.queued() == 50,
            "edge queue reloaded: {}",
            edge.queued()
        );
        let mut down = edge.subscribe(Filter::default())?;
        let (d, u) = tokio::try_join!(collect(&mut down, 50), collect(&mut up, 50))?;
        check_exactly_once_in_order(&d, 1, 50)?;
        check_exactly_once_in_order(&u, 1, 50)?;
        stop.trigger();
        edge_stop.trigger();
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_and_rate_limit_refuse_clearly_and_spare_other_nodes() {
    tokio::time::timeout(Duration::from_secs(60), async {
        // Rate limit: 20 at once, then 0.1/s (no refill during the test).
        let cfg = CloudHubConfig {
            channel: ChannelConfig {
                queue_capacity: 100,
                rate: Some((0.1, 20.0)),
                ..channel_cfg()
            },
            ..CloudHubConfig::default()
        };
        let rated = Env::start("rate", cfg).await?;
        for n in 0..20 {
            rated.cloud.publish("busy-node", msg("r", n)).await?;
        }
        let e = rated
            .cloud
            .publish("busy-node", msg("r", 20))
            .await
            .unwrap_err();
        ensure!(
            e.to_string() == "rate limit exceeded for busy-node: 0.1 messages/s, burst 20",
            "{e}"
        );
        let mut down = rated.edge.subscribe(Filter::default())?;
        rated.cloud.publish(NODE, msg("ok", 0)).await?;
        collect(&mut down, 1).await?;
        drop(rated);

        // Queue bound: an offline node's queue fills up.
        let cfg = CloudHubConfig {
            channel: ChannelConfig {
                queue_capacity: 5,
                ..channel_cfg()
            },
            ..CloudHubConfig::default()
        };
        let env = Env::start("limits", cfg).await?;
        for n in 0..5 {
            env.cloud.publish("offline-node", msg("r", n)).await?;
        }
        let e = env
            .cloud
            .publish("offline-node", msg("r", 5))
            .await
            .unwrap_err();
        ensure!(
            e.to_string() == "queue full for offline-node: 5 messages await acknowledgement",
            "{e}"
        );
        // The connected node is unaffected.
        let mut down = env.edge.subscribe(Filter::default())?;
        env.cloud.publish(NODE, msg("ok", 0)).await?;
        collect(&mut down, 1).await?;
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .unwrap();
}
