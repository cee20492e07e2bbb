//! End-to-end tests of the message channel: the real cloud and edge hubs
//! in-process, real mTLS WebSocket sessions on loopback, redb stores in a
//! temporary directory. Each guarantee is checked over both transports: the
//! hub's own port (a session of its own) and inside the stream tunnel's
//! session (ADR 0022). (Process-level restarts are in tests/hub_cli.rs.)

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, ensure};
use tether_cloudhub::hub::{CloudHub, CloudHubConfig};
use tether_edgehub::hub::{EdgeHub, EdgeHubConfig};
use tether_hub::dispatch::{Event, Filter};
use tether_hub::{ChannelConfig, Content, HubMetrics, Message, Route, Store};
use tether_tests::harness::{CLOUD_NAME, CloudHandle, CloudSpec, EdgeHandle, EdgeSpec, Pki};
use tether_tunnel::{
    Backoff, ServerTls, SessionRegistry, Shutdown, ShutdownTrigger, TunnelDialer, TunnelLimits,
};
use tokio::sync::mpsc;

const NODE: &str = "edge-1";

/// How the hub's channel travels between edge and cloud.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    /// A session of its own on the hub port (edges before 0.2).
    Port,
    /// A stream inside the node's tunnel session.
    Tunnel,
}

/// Stops one side, as an exiting process would.
enum Stop {
    Trigger(ShutdownTrigger),
    Cloud(CloudHandle),
    Edge(EdgeHandle),
}

impl Stop {
    /// Stops and waits for the drain (bounded by its 1-2 s deadline).
    async fn stop(self) {
        match self {
            Self::Trigger(t) => t.trigger(),
            Self::Cloud(c) => c.stop().await,
            Self::Edge(e) => e.stop().await,
        }
    }
}

struct Env {
    pki: Pki,
    dir: PathBuf,
    cloud: CloudHub,
    cloud_stop: Option<Stop>,
    /// The stream tunnel's sessions (tunnel transport only).
    tunnels: Option<SessionRegistry>,
    addr: std::net::SocketAddr,
    edge: EdgeHub,
    edge_stop: Option<Stop>,
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
    async fn start(
        name: &str,
        cloud_cfg: CloudHubConfig,
        transport: Transport,
    ) -> anyhow::Result<Self> {
        let pki = Pki::generate()?;
        let dir = temp_dir(name);
        let (cloud, stop, addr, tunnels) =
            start_cloud(&pki, &dir, cloud_cfg, None, transport).await?;
        let (edge, edge_stop) = start_edge(&pki, &dir, NODE, addr, transport).await?;
        let env = Self {
            pki,
            dir,
            cloud,
            cloud_stop: Some(stop),
            tunnels,
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
    transport: Transport,
) -> anyhow::Result<(
    CloudHub,
    Stop,
    std::net::SocketAddr,
    Option<SessionRegistry>,
)> {
    let store = open_store(&dir.join("cloud.redb")).await?;
    let hub = CloudHub::new(cfg, store, HubMetrics::default())?;
    let at = port.map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p)));
    if transport == Transport::Tunnel {
        let cloud = CloudHandle::start(
            pki,
            CloudSpec {
                tunnel_addr: at,
                drain: Some(Duration::from_secs(1)),
                hub: Some(hub.clone()),
                ..CloudSpec::default()
            },
        )
        .await?;
        let (addr, tunnels) = (cloud.tunnel_addr, cloud.registry.clone());
        return Ok((hub, Stop::Cloud(cloud), addr, Some(tunnels)));
    }
    let tcp = tokio::net::TcpListener::bind(at.unwrap_or(([127, 0, 0, 1], 0).into())).await?;
    let addr = tcp.local_addr()?;
    let (trigger, shutdown) = Shutdown::new(Duration::from_secs(1));
    let listener = hub.listener(
        tcp,
        ServerTls::new(pki.tunnel_server_tls()?),
        TunnelLimits::default(),
        shutdown.clone(),
    );
    tokio::spawn(listener.run(shutdown));
    Ok((hub, Stop::Trigger(trigger), addr, None))
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
    transport: Transport,
) -> anyhow::Result<(EdgeHub, Stop)> {
    let store = open_store(&dir.join(format!("{node}.redb"))).await?;
    let hub = EdgeHub::new(
        EdgeHubConfig {
            channel: channel_cfg(),
            ..EdgeHubConfig::default()
        },
        store,
        HubMetrics::default(),
    )?;
    if transport == Transport::Tunnel {
        // No kubelet: these tests use the hub stream only.
        let mut spec = EdgeSpec::new(node, ([127, 0, 0, 1], 9).into());
        spec.hub = Some(hub.clone());
        let edge = EdgeHandle::start(pki, addr, spec)?;
        return Ok((hub, Stop::Edge(edge)));
    }
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
    Ok((hub, Stop::Trigger(trigger)))
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
    flapping_link(Transport::Port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_link_delivers_20000_messages_exactly_once_in_order_in_the_tunnel() {
    flapping_link(Transport::Tunnel).await;
}

async fn flapping_link(transport: Transport) {
    tokio::time::timeout(Duration::from_secs(240), async {
        let env = Env::start("flap", cloud_cfg(), transport).await?;
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
        // 100 cuts at pseudo-random moments while traffic flows. Inside the
        // tunnel, every other cut ends the whole tunnel session rather than
        // just the hub stream.
        let cloud = env.cloud.clone();
        let tunnels = env.tunnels.clone();
        let cutter = tokio::spawn(async move {
            let mut seed = 0x2545_f491_4f6c_dd1du64;
            let mut cuts = 0;
            for _ in 0..2000 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                tokio::time::sleep(Duration::from_millis(5 + seed % 40)).await;
                let cut = match &tunnels {
                    Some(t) if cuts % 2 == 1 => t.get(NODE).is_some_and(|session| {
                        session.terminate();
                        true
                    }),
                    _ => cloud.disconnect(NODE),
                };
                if cut {
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
    restarts(Transport::Port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_survive_edge_and_cloud_restarts_in_the_tunnel() {
    restarts(Transport::Tunnel).await;
}

async fn restarts(transport: Transport) {
    tokio::time::timeout(Duration::from_secs(120), async {
        let mut env = Env::start("restart", cloud_cfg(), transport).await?;
        // Edge restart: the edge queues upstream messages while the cloud
        // is unreachable, restarts, and delivers them afterwards.
        let port = env.addr.port();
        env.cloud_stop.take().context("cloud")?.stop().await;
        env.wait_online(false).await?;
        for n in 0..50 {
            env.edge.publish(msg("up", n)).await?;
        }
        env.edge_stop.take().context("edge")?.stop().await;
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
        let (cloud, stop, addr, _) =
            start_cloud(&env.pki, &env.dir, cloud_cfg(), Some(port), transport).await?;
        for n in 0..50 {
            cloud.publish(NODE, msg("down", n)).await?;
        }
        stop.stop().await;
        drop(cloud);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (cloud, stop, _, _) = start_cloud(
            &env.pki,
            &env.dir,
            cloud_cfg(),
            Some(addr.port()),
            transport,
        )
        .await?;
        ensure!(cloud.node(NODE).context("queue reloaded")?.queued == 50);
        let mut up = cloud.subscribe(Filter::default())?;
        let (edge, edge_stop) = start_edge(&env.pki, &env.dir, NODE, addr, transport).await?;
        ensure!(
            edge.queued() == 50,
            "edge queue reloaded: {}",
            edge.queued()
        );
        let mut down = edge.subscribe(Filter::default())?;
        let (d, u) = tokio::try_join!(collect(&mut down, 50), collect(&mut up, 50))?;
        check_exactly_once_in_order(&d, 1, 50)?;
        check_exactly_once_in_order(&u, 1, 50)?;
        stop.stop().await;
        edge_stop.stop().await;
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_and_rate_limit_refuse_clearly_and_spare_other_nodes() {
    limits(Transport::Port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_and_rate_limit_refuse_clearly_and_spare_other_nodes_in_the_tunnel() {
    limits(Transport::Tunnel).await;
}

async fn limits(transport: Transport) {
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
        let rated = Env::start("rate", cfg, transport).await?;
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
        let env = Env::start("limits", cfg, transport).await?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_clear_errors_and_the_session_stays_up() {
    bad_frames(Transport::Port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_clear_errors_and_the_session_stays_up_in_the_tunnel() {
    bad_frames(Transport::Tunnel).await;
}

async fn bad_frames(transport: Transport) {
    use tether_hub::channel::{read_raw_frame, write_raw_frame};
    tokio::time::timeout(Duration::from_secs(60), async {
        let pki = Pki::generate()?;
        let dir = temp_dir("bad");
        let cfg = CloudHubConfig {
            channel: ChannelConfig {
                max_message: 4096,
                ..channel_cfg()
            },
            ..CloudHubConfig::default()
        };
        let (cloud, _stop, addr, _tunnels) = start_cloud(&pki, &dir, cfg, None, transport).await?;
        let mut up = cloud.subscribe(Filter::default())?;
        // A hand-made edge: a real hub session whose channel stream the
        // test drives byte by byte.
        let cert = pki.edge_ca.issue_node_client(NODE, &[])?;
        let mut dialer = TunnelDialer::new(
            addr.to_string(),
            CLOUD_NAME,
            pki.edge_client_tls(&cert)?,
            NODE,
            TunnelLimits::default(),
        )?;
        dialer.carry_hub(transport == Transport::Tunnel);
        let transport = dialer.dial().await?;
        let (io_tx, mut io_rx) = mpsc::channel(1);
        let (_t, shutdown) = Shutdown::new(Duration::from_secs(1));
        tokio::spawn(tether_tunnel::serve_edge_session(
            transport,
            TunnelLimits::default(),
            move |mut req: http::Request<hyper::body::Incoming>| {
                let io_tx = io_tx.clone();
                async move {
                    let upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        if let Ok(io) = upgrade.await {
                            let _ = io_tx.send(hyper_util::rt::TokioIo::new(io)).await;
                        }
                    });
                    http::Response::new(tether_tunnel::body_empty())
                }
            },
            shutdown,
        ));
        let mut io = io_rx.recv().await.context("no hub stream")?;
        let mut good = msg("after", 1);
        good.prepare()?;
        for frame in [
            b"{not json".to_vec(),
            br#"{"header":{"msg_id":"m1"}}"#.to_vec(),
            vec![b' '; 8192],
            br#"{"header":{"parent_msg_id":"never-sent"},"route":{"group":"tether.hub","operation":"ack"}}"#.to_vec(),
            good.to_json(),
        ] {
            write_raw_frame(&mut io, &frame).await?;
        }
        let mut errors = Vec::new();
        let mut acked = false;
        for _ in 0..50 {
            if errors.len() == 4 && acked {
                break;
            }
            let frame = read_raw_frame(&mut io, 1 << 20).await?.context("frame")?;
            let m = Message::from_json(&frame, 1 << 20)?;
            match m.route.operation.as_str() {
                "error" => errors.push(format!("{:?}", m.content)),
                "ack" => acked |= m.header.parent_msg_id == good.header.msg_id,
                _ => {}
            }
        }
        ensure!(errors.len() == 4 && acked, "errors {errors:?}, acked {acked}");
        for (e, want) in errors.iter().zip([
            "malformed message",
            "no route",
            "exceeds the 4096-byte limit",
            "ack for unknown message id",
        ]) {
            ensure!(e.contains(want), "{e} lacks {want:?}");
        }
        // The well-formed message after the bad ones reached the application.
        let got = collect(&mut up, 1).await?;
        ensure!(got.get("after") == Some(&vec![1]), "{got:?}");
        ensure!(cloud.node(NODE).context("node")?.online, "session dropped");
        let _ = std::fs::remove_dir_all(&dir);
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .unwrap();
}
