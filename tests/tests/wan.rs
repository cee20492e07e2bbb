//! The emulated long link (`tether_tests::wan`) and the tunnel across it:
//! the relay delays without corrupting, and a tunnel whose edge dials the
//! cloud through a 50 ms link still carries logs byte-exact beside a stalled
//! reader on the same session. No throughput is asserted here (figures
//! belong to `tether-bench`); the only time asserted is the relay's lower
//! bound on a round trip, which is what the relay is for.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use tether_tests::bounded;
use tether_tests::fixture::{FixtureKubelet, LogVerifier};
use tether_tests::harness::{CloudHandle, CloudSpec, EdgeHandle, EdgeSpec, Pki};
use tether_tests::kubectl;
use tether_tests::wan::{WanLink, WanSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NODE: &str = "wan-edge";
const RTT: Duration = Duration::from_millis(50);
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A TCP echo server on port 0.
async fn echo_server() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_adds_the_round_trip_and_carries_bytes_intact() {
    bounded(TEST_TIMEOUT, async {
        let echo = echo_server().await?;
        let link = WanLink::start(echo, WanSpec::new(RTT, 50_000_000)).await?;
        let mut s = TcpStream::connect(link.addr()).await?;
        s.set_nodelay(true)?;

        // One small round trip crosses the delay both ways.
        let started = Instant::now();
        s.write_all(b"ping").await?;
        let mut pong = [0u8; 4];
        s.read_exact(&mut pong).await?;
        let rtt = started.elapsed();
        ensure!(&pong == b"ping", "echo changed the bytes");
        ensure!(
            rtt >= RTT,
            "round trip {rtt:?} is shorter than the link's {RTT:?}"
        );

        // Bulk both ways at once, in odd-sized writes, comes back unchanged
        // and in order, and the half-close passes through.
        let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = s.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(7777) {
                w.write_all(chunk).await?;
            }
            w.shutdown().await?;
            anyhow::Ok(())
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await?;
        writer.await??;
        ensure!(
            back.len() == data.len(),
            "got {} bytes back, sent {}",
            back.len(),
            data.len()
        );
        ensure!(back == data, "bytes changed crossing the link");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_across_a_long_link_keeps_a_stream_going_beside_a_stalled_one() {
    bounded(TEST_TIMEOUT, async {
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
        let tls = pki.apiserver_tls()?;

        // A reader of a big log that takes one chunk and then never reads
        // again: its window fills and stays full.
        let resp = kubectl::get_streaming(
            cloud.front_conn(tls.clone()).await?,
            NODE,
            "/containerLogs/default/stalled/app?bytes=1073741824",
        )
        .await?;
        ensure!(resp.status() == 200, "stalled stream: {}", resp.status());
        let mut stalled = resp.into_body();
        kubectl::next_chunk(&mut stalled)
            .await?
            .context("stalled stream ended at once")?;

        // Another stream of the same session still arrives whole.
        let want: u64 = 2 << 20;
        let resp = kubectl::get_streaming(
            cloud.front_conn(tls).await?,
            NODE,
            &format!("/containerLogs/default/moving/app?bytes={want}"),
        )
        .await?;
        ensure!(resp.status() == 200, "moving stream: {}", resp.status());
        let mut body = resp.into_body();
        let mut verifier = LogVerifier::new(0);
        while let Some(chunk) = kubectl::next_chunk(&mut body).await? {
            verifier.update(&chunk)?;
        }
        ensure!(
            verifier.offset() == want,
            "got {} bytes, want {want}",
            verifier.offset()
        );

        drop(stalled);
        edge.stop().await;
        cloud.stop().await;
        Ok(())
    })
    .await;
}
