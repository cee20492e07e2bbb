//! Exec round trip (figure 3): a `v5.channel.k8s.io` exec of `cat` held open on each
//! side; 1 KiB goes out on stdin (channel 0) and the clock stops when the same bytes
//! are back on stdout (channel 1). Both sessions stay open and the round trips
//! alternate between them, so machine noise hits both sides alike.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::ClientRequestBuilder;

use tether_tests::kubectl::{self, IO_TIMEOUT};

use crate::rig::{Conn, Dial, Side};
use crate::stats::Latency;

/// Bytes sent per round trip.
const PAYLOAD: usize = 1024;
/// Round trips per side before the measured ones.
const WARMUP_TRIPS: usize = 50;
/// How long closing a session may take; a slow close is not a measurement error.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// An open exec of `cat` with stdin, stdout and stderr.
struct ExecSession {
    side: Side,
    ws: WebSocketStream<Conn>,
    frame: Bytes,
    echo: Vec<u8>,
}

impl ExecSession {
    async fn open(dial: &Dial, side: Side) -> anyhow::Result<Self> {
        let io = dial.connect(side).await?;
        let path = kubectl::exec_path("default", "bench", "app", &["cat"], true);
        let request = ClientRequestBuilder::new(format!("ws://{}{path}", dial.node()).parse()?)
            .with_sub_protocol("v5.channel.k8s.io");
        let (ws, resp) =
            tokio::time::timeout(IO_TIMEOUT, tokio_tungstenite::client_async(request, io))
                .await
                .context("exec handshake timed out")?
                .with_context(|| format!("{side:?} exec handshake"))?;
        ensure!(
            resp.headers()
                .get("sec-websocket-protocol")
                .is_some_and(|p| p == "v5.channel.k8s.io"),
            "{side:?} exec: server did not pick v5.channel.k8s.io"
        );
        let mut frame = Vec::with_capacity(PAYLOAD + 1);
        frame.push(0);
        frame.extend((0..PAYLOAD).map(|i| b'a' + (i % 26) as u8));
        let mut session = Self {
            side,
            ws,
            frame: frame.into(),
            echo: Vec::with_capacity(PAYLOAD),
        };
        // The kubelet says "ready" with an empty frame on stdout.
        loop {
            let data = session.next_binary().await?;
            if data.first() == Some(&1) && data.len() == 1 {
                break;
            }
        }
        Ok(session)
    }

    async fn next_binary(&mut self) -> anyhow::Result<Bytes> {
        loop {
            match tokio::time::timeout(IO_TIMEOUT, self.ws.next()).await {
                Err(_) => bail!("{:?} exec: no frame within {IO_TIMEOUT:?}", self.side),
                Ok(None) => bail!("{:?} exec: stream ended", self.side),
                Ok(Some(Err(e))) => {
                    return Err(e).with_context(|| format!("{:?} exec stream", self.side));
                }
                Ok(Some(Ok(Message::Binary(data)))) => return Ok(data),
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Sends the payload and waits until all of it is echoed back.
    async fn round_trip(&mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        tokio::time::timeout(
            IO_TIMEOUT,
            self.ws.send(Message::Binary(self.frame.clone())),
        )
        .await
        .context("exec stdin send timed out")?
        .context("exec stdin send")?;
        self.echo.clear();
        while self.echo.len() < PAYLOAD {
            let data = self.next_binary().await?;
            match data.split_first() {
                Some((1, rest)) => self.echo.extend_from_slice(rest),
                Some((2, rest)) => bail!("exec stderr: {}", String::from_utf8_lossy(rest)),
                Some((3, rest)) => bail!("exec ended: {}", String::from_utf8_lossy(rest)),
                _ => {}
            }
        }
        let elapsed = started.elapsed();
        ensure!(
            self.echo[..] == self.frame[1..],
            "{:?} exec: echo differs from what was sent",
            self.side
        );
        Ok(elapsed)
    }

    /// Closes stdin (v5 `[255, 0]`) so `cat` exits, then the WebSocket.
    async fn close(mut self) {
        let close = async {
            self.ws.send(Message::binary(vec![255u8, 0])).await?;
            while let Some(msg) = self.ws.next().await {
                if matches!(msg?, Message::Close(_)) {
                    break;
                }
            }
            self.ws.close(None).await
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
    }
}

/// Latencies of `trips` round trips on each side: (direct, tunnel).
pub(crate) async fn exec_rtt(dial: &Dial, trips: usize) -> anyhow::Result<(Latency, Latency)> {
    let mut direct = ExecSession::open(dial, Side::Direct).await?;
    let mut tunnel = ExecSession::open(dial, Side::Tunnel).await?;
    for _ in 0..WARMUP_TRIPS {
        direct.round_trip().await?;
        tunnel.round_trip().await?;
    }
    let mut samples = (Vec::with_capacity(trips), Vec::with_capacity(trips));
    for _ in 0..trips {
        samples.0.push(direct.round_trip().await?);
        samples.1.push(tunnel.round_trip().await?);
    }
    direct.close().await;
    tunnel.close().await;
    Ok((
        Latency::from_samples(samples.0),
        Latency::from_samples(samples.1),
    ))
}
