//! Several cloud replicas: a request that reaches a replica without the
//! node's session is forwarded over mTLS to the replica that holds it, and
//! after that replica stops, the edge reconnects to a survivor and requests
//! succeed again. Real replicas, edge and fixture kubelet in-process over
//! real TLS and sockets; the ownership records are an in-memory stand-in
//! (`tether_tests::ownership`) for cluster mode's Kubernetes Leases, which
//! tests/tests/cluster.rs checks against the API double.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use tether_tests::fixture::{FixtureKubelet, LogVerifier};
use tether_tests::harness::{CloudHandle, CloudSpec, EdgeHandle, EdgeSpec, Pki};
use tether_tests::kubectl;
use tether_tests::ownership::OwnershipBoard;

const NODE: &str = "edge-ha";

/// A stand-in for the Kubernetes Service in front of the replicas: TCP
/// connections go to whichever tunnel address is current.
#[derive(Clone)]
struct Service {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
}

impl Service {
    async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let svc = Self {
            addr: listener.local_addr()?,
            target: Arc::new(Mutex::new(target)),
        };
        let target = svc.target.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let to = *target.lock().expect("lock");
                tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Ok(svc)
    }

    fn point_to(&self, to: SocketAddr) {
        *self.target.lock().expect("lock") = to;
    }
}

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
