//! Several cloud replicas: a request that reaches a replica without the
//! node's session is forwarded over mTLS to the replica that holds it, and
//! after that replica stops, the edge reconnects to a survivor and requests
//! succeed again. Real replicas, edge and fixture kubelet in-process over
//! real TLS and sockets; the ownership records are an in-memory stand-in
//! (`tether_tests::ownership`) for cluster mode's Kubernetes Leases, which
//! tests/tests/cluster.rs checks against the API double. The message hub's
//! messages across replicas (ADR 0021) are at the end.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use tether_tests::fixture::{FixtureKubelet, LogVerifier};
use tether_tests::harness::{CloudHandle, CloudSpec, EdgeHandle, EdgeSpec, Pki};
use tether_tests::kubectl;
use tether_tests::ownership::OwnershipBoard;
use tether_tests::replicas::Service;

const NODE: &str = "edge-ha";

async fn replica(pki: &Pki, board: &OwnershipBoard, id: &str) -> anyhow::Result<CloudHandle> {
    let cloud = CloudHandle::start(
        pki,
        CloudSpec {
            replica: Some((id.to_owned(), board.view(id))),
            ..CloudSpec::default()
        },
    )
    .await?;
    board.register(id, cloud.peer_addr.context("peer listener")?);
    Ok(cloud)
}

/// The claim follows the session's registration; wait (bounded) for it.
async fn wait_holder(board: &OwnershipBoard, replica: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
        if board.holder(NODE).as_deref() == Some(replica) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!(
        "{replica} never recorded as the holder: {:?}",
        board.holder(NODE)
    )
}

async fn logs_through(pki: &Pki, cloud: &CloudHandle, bytes: u64) -> anyhow::Result<u16> {
    let conn = cloud.front_conn(pki.apiserver_tls()?).await?;
    let resp = kubectl::get_streaming(
        conn,
        NODE,
        &format!("/containerLogs/default/web/app?bytes={bytes}"),
    )
    .await?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Ok(status);
    }
    let mut body = resp.into_body();
    let mut v = LogVerifier::new(0);
    while let Some(chunk) = kubectl::next_chunk(&mut body).await? {
        v.update(&chunk)?;
    }
    ensure!(v.offset() == bytes, "got {} of {bytes} bytes", v.offset());
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_the_other_replica_are_forwarded_and_survive_its_loss() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let pki = Pki::generate()?;
        let kubelet = FixtureKubelet::start(None).await?;
        let board = OwnershipBoard::default();
        let a = replica(&pki, &board, "cloud-a").await?;
        let b = replica(&pki, &board, "cloud-b").await?;
        let service = Service::start(a.tunnel_addr).await?;
        let mut spec = EdgeSpec::new(NODE, kubelet.addr);
        spec.ips = vec!["10.200.0.7".parse()?];
        let _edge = EdgeHandle::start(&pki, service.addr, spec)?;
        a.registry
            .wait_for_node(NODE, None, Duration::from_secs(10))
            .await
            .context("edge never reached replica a")?;
        wait_holder(&board, "cloud-a").await?;
        ensure!(b.registry.get(NODE).is_none());

        // Through replica b, which has no session: logs stream byte-exact...
        ensure!(logs_through(&pki, &b, 8 << 20).await? == 200);
        // ...a follow stream delivers before it ends...
        let conn = b.front_conn(pki.apiserver_tls()?).await?;
        let resp = kubectl::get_streaming(
            conn,
            NODE,
            "/containerLogs/default/web/app?follow=true&bytes=1024",
        )
        .await?;
        ensure!(resp.status() == 200, "follow: {}", resp.status());
        let mut body = resp.into_body();
        ensure!(
            kubectl::next_chunk(&mut body).await?.is_some(),
            "no follow data"
        );
        drop(body);
        // ...a request naming the node only by address is forwarded too
        // (the apiserver's CONNECT and DNAT name nodes by IP)...
        let (p, body) = kubectl::get(
            b.front_conn(pki.apiserver_tls()?).await?,
            "10.200.0.7:10250",
            "/containerLogs/default/web/app?bytes=2048",
        )
        .await?;
        ensure!(
            p.status == 200 && body.len() == 2048,
            "by address: {}",
            p.status
        );
        // ...and exec upgrades end to end.
        let path = kubectl::exec_path(
            "default",
            "web",
            "app",
            &["sh", "-c", "read x; echo out-$x; exit 4"],
            true,
        );
        let out = kubectl::exec_ws(
            b.front_conn(pki.apiserver_tls()?).await?,
            NODE,
            &path,
            b"ha\n",
        )
        .await?;
        ensure!(
            out.stdout == b"out-ha\n",
            "stdout {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        ensure!(out.exit_code == 4, "exit {} {}", out.exit_code, out.status);

        // The peer listener admits replicas only: the apiserver's
        // certificate is refused there.
        let peer = b.peer_addr.context("peer")?;
        let tcp = tokio::net::TcpStream::connect(peer).await?;
        let refused = match tokio_rustls::TlsConnector::from(pki.apiserver_tls()?)
            .connect(rustls_pki_types::ServerName::try_from("tether-peer")?, tcp)
            .await
        {
            Err(_) => true,
            Ok(tls) => kubectl::get(tls, NODE, "/healthz").await.is_err(),
        };
        ensure!(refused, "the peer listener served a non-replica");

        // Replica a goes away; the Service sends the edge to b.
        let stopped = Instant::now();
        service.point_to(b.tunnel_addr);
        a.stop().await;
        let mut recovered = None;
        for _ in 0..300 {
            if let Ok(200) = logs_through(&pki, &b, 4096).await {
                recovered = Some(stopped.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let took = recovered.context("requests did not succeed again within 15 s")?;
        eprintln!("failover: requests succeed again {took:?} after the owning replica stopped");
        wait_holder(&board, "cloud-b").await?;
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replica_is_not_forwarded_to() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let pki = Pki::generate()?;
        let kubelet = FixtureKubelet::start(None).await?;
        let board = OwnershipBoard::default();
        let a = replica(&pki, &board, "cloud-a").await?;
        let b = replica(&pki, &board, "cloud-b").await?;
        let _edge = EdgeHandle::start(&pki, a.tunnel_addr, EdgeSpec::new(NODE, kubelet.addr))?;
        a.registry
            .wait_for_node(NODE, None, Duration::from_secs(10))
            .await
            .context("edge never connected")?;
        wait_holder(&board, "cloud-a").await?;
        ensure!(logs_through(&pki, &b, 1024).await? == 200);
        // Its replica Lease expired (crashed without releasing): b answers
        // at once that the node has no session, instead of dialling a corpse.
        board.expire("cloud-a");
        ensure!(logs_through(&pki, &b, 1024).await? == 404);
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .unwrap();
}

// Hub messages across replicas (ADR 0021): a message published on any
// replica reaches its node wherever the node's sessions are, and a move
// between replicas loses and doubles nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tether_cloudhub::hub::CloudHub;
use tether_cloudhub::replicas::Outcome;
use tether_hub::dispatch::{Event, Filter};
use tether_hub::{Content, Message, Route};
use tether_tests::replicas::HubPair;

fn hub_msg(group: &str, resource: &str, n: u64) -> Message {
    Message::new(
        Route {
            source: "test".into(),
            group: group.into(),
            operation: "update".into(),
            resource: resource.into(),
        },
        Content::Json(serde_json::json!(n)),
    )
}

/// Collects `total` messages of a subscription: values by resource, in
/// arrival order.
async fn collect(
    rx: &mut tokio::sync::mpsc::Receiver<Event>,
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

/// Each of `resources` got exactly `0..per`, in order when `ordered`.
fn check_once(
    got: &HashMap<String, Vec<u64>>,
    resources: &[String],
    per: u64,
    ordered: bool,
) -> anyhow::Result<()> {
    ensure!(got.len() == resources.len(), "resources: {:?}", got.keys());
    for r in resources {
        let ns = got.get(r).with_context(|| format!("nothing for {r}"))?;
        let mut sorted = ns.clone();
        if !ordered {
            sorted.sort_unstable();
        }
        ensure!(
            sorted.iter().copied().eq(0..per),
            "{r}: not exactly 0..{per}{} (len {}, first wrong at {:?})",
            if ordered { " in order" } else { "" },
            ns.len(),
            sorted.iter().enumerate().find(|(i, n)| *i as u64 != **n)
        );
    }
    Ok(())
}

/// Publishes `0..per` on each resource through `hub`, one task per
/// resource, counting into `done`; a short pause every 16 messages so a
/// stream spans the moves made meanwhile.
async fn publish_all(
    hub: CloudHub,
    resources: Vec<String>,
    per: u64,
    done: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for r in resources {
        let (hub, done) = (hub.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..per {
                hub.publish(NODE, hub_msg("app", &r, n)).await?;
                done.fetch_add(1, Ordering::Relaxed);
                if n % 16 == 15 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Waits (bounded) until nothing is queued for the node on `hub`.
async fn wait_drained(hub: &CloudHub) -> anyhow::Result<()> {
    for _ in 0..800 {
        if hub.node(NODE).is_none_or(|s| s.queued == 0) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("still queued: {:?}", hub.node(NODE))
}

/// Nothing more arrives: no late duplicates.
async fn quiet(rx: &mut tokio::sync::mpsc::Receiver<Event>) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(ev) = rx.try_recv() {
        ensure!(
            !matches!(ev, Event::Message { .. }),
            "extra delivery: {ev:?}"
        );
    }
    Ok(())
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_messages_published_on_one_replica_reach_the_node_held_by_the_other() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let env = HubPair::start("hubx-relay", NODE).await?;
        let mut down = env.edge.hub.subscribe(Filter {
            group: Some("app".into()),
            ..Filter::default()
        })?;
        // An edge application answering sync requests.
        let mut rpc = env.edge.hub.subscribe(Filter {
            group: Some("rpc".into()),
            ..Filter::default()
        })?;
        let edge = env.edge.hub.clone();
        tokio::spawn(async move {
            while let Some(ev) = rpc.recv().await {
                if let Event::Message { message, .. } = ev {
                    let mut reply = hub_msg("rpc", "pong", 1);
                    reply.header.parent_msg_id = message.header.msg_id;
                    let _ = edge.publish(reply).await;
                }
            }
        });
        const PER: u64 = 500;
        let resources = names("a", 4);
        let started = Instant::now();
        publish_all(env.a.hub.clone(), resources.clone(), PER, Arc::default()).await?;
        let got = collect(&mut down, resources.len() * PER as usize).await?;
        eprintln!(
            "relay: {} messages published on a, delivered through b in {:?}; {} relayed",
            resources.len() * PER as usize,
            started.elapsed(),
            env.a.relay.sent()
        );
        check_once(&got, &resources, PER, true)?;
        wait_drained(&env.a.hub).await?;
        wait_drained(&env.b().hub).await?;
        ensure!(env.a.relay.batches(Outcome::Unreachable) == 0);
        // A sync request through a is forwarded to b and answered by the edge.
        let resp = env
            .a
            .hub
            .request(NODE, hub_msg("rpc", "ping", 0), Duration::from_secs(10))
            .await?;
        ensure!(
            matches!(&resp.content, Content::Json(v) if *v == serde_json::json!(1)),
            "response {resp:?}"
        );
        quiet(&mut down).await?;
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_messages_survive_the_node_moving_between_replicas_mid_stream() {
    tokio::time::timeout(Duration::from_secs(180), async {
        let env = HubPair::start("hubx-move", NODE).await?;
        let mut down = env.edge.hub.subscribe(Filter::default())?;
        const PER: u64 = 400;
        let (on_a, on_b) = (names("a", 3), names("b", 3));
        let total = (on_a.len() + on_b.len()) as u64 * PER;
        let done = Arc::new(AtomicU64::new(0));
        let pub_a = tokio::spawn(publish_all(
            env.a.hub.clone(),
            on_a.clone(),
            PER,
            done.clone(),
        ));
        let pub_b = tokio::spawn(publish_all(
            env.b().hub.clone(),
            on_b.clone(),
            PER,
            done.clone(),
        ));
        // B to A mid-stream, then back and to A again, while both publish.
        for (i, to) in ["cloud-a", "cloud-b", "cloud-a"].into_iter().enumerate() {
            let at = total * (i as u64 + 1) / 5;
            for _ in 0..3000 {
                if done.load(Ordering::Relaxed) >= at {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            eprintln!(
                "move to {to} after {} of {total} published",
                done.load(Ordering::Relaxed)
            );
            env.move_to(to).await?;
        }
        let got = collect(&mut down, total as usize).await.with_context(|| {
            format!(
                "queued on a {:?}, on b {:?}",
                env.a.hub.node(NODE),
                env.b().hub.node(NODE)
            )
        })?;
        pub_a.await??;
        pub_b.await??;
        let all: Vec<String> = on_a.iter().chain(&on_b).cloned().collect();
        check_once(&got, &all, PER, false)?;
        let reordered = got
            .values()
            .filter(|ns| ns.windows(2).any(|w| w[0] > w[1]))
            .count();
        for (r, ns) in &got {
            if let Some(i) = (1..ns.len()).find(|&i| ns[i] < ns[i - 1]) {
                let lo = i.saturating_sub(3);
                eprintln!("  {r}: late at {i}: {:?}", &ns[lo..(i + 4).min(ns.len())]);
            }
        }
        let pulls = |r: &tether_tests::replicas::HubReplica| {
            [Outcome::Ok, Outcome::Refused, Outcome::Unreachable].map(|o| r.relay.pulls(o))
        };
        eprintln!(
            "move: {total} messages exactly once; {reordered} of {} resources reordered by the moves; relayed a {} b {}; pulls ok/refused/late a {:?} b {:?}",
            all.len(),
            env.a.relay.sent(),
            env.b().relay.sent(),
            pulls(&env.a),
            pulls(env.b())
        );
        wait_drained(&env.a.hub).await?;
        wait_drained(&env.b().hub).await?;
        quiet(&mut down).await?;
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_messages_for_a_node_on_a_dead_replica_wait_and_arrive_once_it_reconnects() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let mut env = HubPair::start("hubx-dead", NODE).await?;
        let mut down = env.edge.hub.subscribe(Filter {
            group: Some("app".into()),
            ..Filter::default()
        })?;
        // Replica b crashes: its listeners are gone, but its records still
        // name it until its Lease expires.
        let info = env
            .b()
            .cloud
            .registry
            .get(NODE)
            .context("session on b")?
            .info()
            .clone();
        let _ = env.b.take().context("b")?.stop().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        env.board.view("cloud-b").claim(&info);
        ensure!(env.board.holder(NODE).as_deref() == Some("cloud-b"));
        // Publishing on a still succeeds: stored there, relayed later.
        const N: u64 = 200;
        for n in 0..N {
            env.a.hub.publish(NODE, hub_msg("app", "down", n)).await?;
        }
        for _ in 0..200 {
            if env.a.relay.batches(Outcome::Unreachable) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        ensure!(
            env.a.relay.batches(Outcome::Unreachable) > 0,
            "no relay tried"
        );
        let queued = env.a.hub.node(NODE).context("queue on a")?.queued;
        ensure!(queued == N as usize, "queued on a: {queued}");
        // A sync request cannot be forwarded: a clear 502, nothing queued.
        let e = env
            .a
            .hub
            .request(NODE, hub_msg("rpc", "ping", 0), Duration::from_secs(2))
            .await
            .unwrap_err();
        let status = tether_cloudhub::api::hub_error(&e).status();
        ensure!(status == 502, "{status}: {e}");
        ensure!(e.to_string().contains("cloud-b"), "{e}");
        ensure!(env.a.hub.node(NODE).context("a")?.queued == N as usize);
        // The node reconnects to a: everything arrives once, in order.
        env.tunnel.point_to(env.a.cloud.tunnel_addr);
        env.hub.point_to(env.a.hub_addr);
        let got = collect(&mut down, N as usize).await?;
        check_once(&got, &["down".to_owned()], N, true)?;
        wait_drained(&env.a.hub).await?;
        quiet(&mut down).await?;
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_messages_queued_on_a_stopping_replica_are_handed_to_another() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let mut env = HubPair::start("hubx-leave", NODE).await?;
        let mut down = env.edge.hub.subscribe(Filter {
            group: Some("app".into()),
            ..Filter::default()
        })?;
        // The edge's hub channel is down (its link is out), so what b
        // accepts for it waits in b's queue.
        let nowhere = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await?
            .local_addr()?;
        env.hub.point_to(nowhere);
        env.b().hub.disconnect(NODE);
        for _ in 0..200 {
            if !env.edge.hub.is_online() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        ensure!(!env.edge.hub.is_online(), "the hub channel stayed up");
        const N: u64 = 100;
        for n in 0..N {
            env.b().hub.publish(NODE, hub_msg("app", "left", n)).await?;
        }
        ensure!(env.b().hub.node(NODE).context("b")?.queued == N as usize);
        // b stops (a rolling update): its store is pod-local, so it hands
        // the queue to a, the live replica, before it exits.
        let handed = env.b.take().context("b")?.stop().await;
        ensure!(
            handed.handed == N as usize && handed.left == 0,
            "{handed:?}"
        );
        ensure!(env.a.hub.node(NODE).context("a")?.queued == N as usize);
        // The edge comes back through a: all of it, once, in order.
        env.tunnel.point_to(env.a.cloud.tunnel_addr);
        env.hub.point_to(env.a.hub_addr);
        let got = collect(&mut down, N as usize).await?;
        check_once(&got, &["left".to_owned()], N, true)?;
        wait_drained(&env.a.hub).await?;
        quiet(&mut down).await?;
        Ok::<_, anyhow::Error>(())
    })
    .await
    .expect("test timed out")
    .unwrap();
}
