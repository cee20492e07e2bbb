//! The session memory budget (issue 11 item 10, ADR 0015): with readers
//! stalled on many streams of one session, the data buffered for that session
//! stays within its budget, and another stream of the same session still
//! completes. No timing is asserted: only byte counts.

use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use hyper::body::Frame;
use std::task::{Context, Poll};

/// Payload of each body chunk the edge hands to h2.
const CHUNK: usize = 16 << 10;
/// The tokio duplex pipe standing in for TLS/TCP.
const PIPE: usize = 64 << 10;

/// An endless (or `left`-byte) body counting every byte h2 pulls from it.
struct Counted {
    pulled: Arc<AtomicU64>,
    left: u64,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = (CHUNK as u64).min(self.left);
        self.left -= n;
        self.pulled.fetch_add(n, Ordering::Relaxed);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![7u8; n as usize])))))
    }
}

fn info() -> SessionInfo {
    SessionInfo {
        kind: crate::SessionKind::Tether,
        node: "budget-node".into(),
        id: 1,
        peer: "127.0.0.1:1".parse().unwrap(),
        ips: Vec::new(),
        connected_at: SystemTime::now(),
        identity: tether_pki::Identity {
            common_name: "budget-node".into(),
            organizations: Vec::new(),
            ips: Vec::new(),
            serial: "1".into(),
            not_before: 0,
            not_after: 0,
        },
        endpoints: Vec::new(),
        carries_hub: false,
    }
}

/// A cloud session and an edge session over an in-memory pipe; the edge
/// serves `/stall` with an endless body counted in `stalled` and `/bulk/N`
/// with N bytes.
async fn pair(
    limits: &TunnelLimits,
    stalled: Arc<AtomicU64>,
) -> (Arc<H2Session>, crate::ShutdownTrigger) {
    let (cloud, trigger, _edge) = pair_with_edge(limits, stalled).await;
    (cloud, trigger)
}

/// [`pair`], with the edge session's task.
async fn pair_with_edge(
    limits: &TunnelLimits,
    stalled: Arc<AtomicU64>,
) -> (
    Arc<H2Session>,
    crate::ShutdownTrigger,
    tokio::task::JoinHandle<Result<crate::EdgeSessionEnd, hyper::Error>>,
) {
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let (a, b) = tokio::io::duplex(PIPE);
    let cfg = Some(limits.ws_config());
    let (ca, eb) = tokio::join!(
        WebSocketStream::from_raw_socket(a, Role::Client, cfg),
        WebSocketStream::from_raw_socket(b, Role::Server, cfg),
    );
    let (trigger, shutdown) = Shutdown::new(std::time::Duration::from_secs(1));
    let edge_limits = limits.clone();
    let edge = tokio::spawn(serve_edge_session(
        WsStream::new(eb, limits.ws_message_size),
        edge_limits,
        move |req: Request<Incoming>| {
            let stalled = stalled.clone();
            async move {
                let path = req.uri().path().to_owned();
                if req.method() == http::Method::CONNECT {
                    return echo_upgrade(req);
                }
                if path == "/echo" {
                    return Response::new(req.into_body().map_err(BoxError::from).boxed_unsync());
                }
                let body = match path.strip_prefix("/bulk/") {
                    Some(n) => Counted {
                        pulled: Arc::new(AtomicU64::new(0)),
                        left: n.parse().unwrap_or(0),
                    },
                    None => Counted {
                        pulled: stalled,
                        left: u64::MAX,
                    },
                };
                Response::new(body.boxed_unsync())
            }
        },
        shutdown,
    ));
    let cloud = H2Session::start(WsStream::new(ca, limits.ws_message_size), info(), limits)
        .await
        .expect("h2 handshake");
    (cloud, trigger, edge)
}

/// Answers a CONNECT with 200 and echoes the stream's bytes back.
fn echo_upgrade(mut req: Request<Incoming>) -> Response<Body> {
    let up = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(up) = up.await else { return };
        let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
    });
    Response::new(body_empty())
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(body_empty()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item10_session_memory_budget_bounds_buffering() {
    let limits = TunnelLimits {
        max_streams: 8,
        session_budget: 2 << 20,
        ..TunnelLimits::default()
    };
    limits.validate().unwrap();
    let stalled_streams = limits.max_streams as u64 - 1;
    // What may sit between the edge's bodies and the cloud's readers besides
    // the budget: per stream, the chunk hyper holds and one past h2's send
    // buffer; per session, the WebSocket buffers (a message being built, the
    // tungstenite write queue, the message being read) and the pipe.
    let slack = stalled_streams * 2 * CHUNK as u64
        + 6 * (limits.ws_message_size as u64 + 1024)
        + PIPE as u64;
    let bound = u64::from(limits.session_budget) + slack;

    let body = async {
        let pulled = Arc::new(AtomicU64::new(0));
        let (cloud, trigger) = pair(&limits, pulled.clone()).await;
        // Every slot but one: readers that take the response head and then
        // never read its body.
        let mut held = Vec::new();
        for i in 0..stalled_streams {
            let resp = cloud.send(get(&format!("/stall/{i}")), "kubelet").await;
            held.push(resp.expect("stalled stream opens"));
        }
        // The last slot moves many budgets' worth of data past them.
        let bulk = 16 * u64::from(limits.session_budget);
        let resp = cloud
            .send(get(&format!("/bulk/{bulk}")), "kubelet")
            .await
            .expect("bulk stream opens");
        let mut got = 0u64;
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            got += frame
                .expect("bulk frame")
                .into_data()
                .map_or(0, |d| d.len() as u64);
            // The bound holds at every moment, not only at the end.
            let now = pulled.load(Ordering::Relaxed);
            assert!(
                now <= bound,
                "stalled streams buffered {now} bytes; bound {bound}"
            );
        }
        assert_eq!(
            got, bulk,
            "the unstalled stream must complete (no starvation)"
        );
        let buffered = pulled.load(Ordering::Relaxed);
        assert!(
            buffered <= bound,
            "stalled streams buffered {buffered} bytes; budget {} + slack {slack}",
            limits.session_budget
        );
        drop(held);
        trigger.trigger();
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), body)
        .await
        .expect("test timed out");
}

#[test]
fn default_budget_is_well_under_64_mib_and_shares_it_per_stream() {
    let l = TunnelLimits::default();
    l.validate().unwrap();
    assert!(l.session_budget <= 32 << 20);
    let streams = u64::from(l.max_streams);
    // Every stream stalled at once fits the receive half...
    assert!(streams * u64::from(l.effective_stream_window()) <= u64::from(l.connection_window()));
    // ...and the send buffers fit the send half.
    assert!(streams * l.effective_send_buf() as u64 <= u64::from(l.session_budget) / 2);
    assert!(u64::from(l.connection_window()) <= u64::from(l.session_budget) / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_trailers_and_connect_streams_cross_the_direct_h2_session() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = async {
        let limits = TunnelLimits::default();
        let (cloud, trigger) = pair(&limits, Arc::new(AtomicU64::new(0))).await;

        // A request body bigger than the window, then trailers, echoed back.
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-sum", http::HeaderValue::from_static("42"));
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from(vec![1u8; 300_000]))),
            Ok(Frame::data(Bytes::from(vec![2u8; 5]))),
            Ok(Frame::trailers(trailers)),
        ];
        let req = Request::post("/echo")
            .body(
                http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync(),
            )
            .unwrap();
        let resp = cloud.send(req, "kubelet").await.expect("echo stream");
        let got = resp.into_body().collect().await.expect("echo body");
        assert_eq!(
            got.trailers().map(|t| t["x-sum"].clone()),
            Some(http::HeaderValue::from_static("42"))
        );
        assert_eq!(got.to_bytes().len(), 300_005);

        // A CONNECT stream: bytes both ways, half-close passes through.
        let req = Request::connect("127.0.0.1:9").body(body_empty()).unwrap();
        let mut resp = cloud
            .send(req, "127.0.0.1:9")
            .await
            .expect("connect stream");
        assert_eq!(resp.status(), 200);
        let permit = resp.extensions_mut().remove::<StreamPermit>();
        assert!(permit.is_some(), "the caller keeps the stream's slot");
        let io = crate::upgrade::on(&mut resp)
            .await
            .expect("connect byte stream");
        assert!(matches!(io, crate::upgrade::TunnelIo::H2(_)));
        let (mut r, mut w) = tokio::io::split(io);
        let sent: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
        let expect = sent.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(10_000) {
                w.write_all(chunk).await?;
            }
            w.shutdown().await
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.expect("read echo");
        writer.await.unwrap().expect("write");
        assert!(back == expect, "bytes changed crossing the stream");
        assert!(
            crate::upgrade::on(&mut resp).await.is_err(),
            "the stream is taken once"
        );
        drop(permit);
        trigger.trigger();
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), body)
        .await
        .expect("test timed out");
}

/// A stopping cloud closes its sessions with GOAWAY(NO_ERROR) while the
/// hub's long-lived stream is open: the edge sees a clean close (it logs
/// "tunnel closed by cloud"), not a lost tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_closing_the_session_is_a_clean_close_for_the_edge() {
    let limits = TunnelLimits::default();
    let (cloud, _trigger, edge) = pair_with_edge(&limits, Arc::new(AtomicU64::new(0))).await;
    let req = Request::connect("127.0.0.1:9").body(body_empty()).unwrap();
    let mut resp = cloud
        .send(req, "127.0.0.1:9")
        .await
        .expect("connect stream");
    let io = crate::upgrade::on(&mut resp)
        .await
        .expect("connect byte stream");
    cloud.close();
    drop((io, resp));
    let end = tokio::time::timeout(std::time::Duration::from_secs(10), edge)
        .await
        .expect("the edge's session ends")
        .expect("edge task");
    let end = end.expect("a clean close");
    assert_eq!(end.reconnect_after, None, "nothing was announced");
}

/// ADR 0023: the delay a stopping cloud announces reaches the edge before
/// the session ends, whether the session was idle or still had a stream.
#[tokio::test]
async fn a_stopping_cloud_tells_the_edge_when_to_come_back() {
    let limits = TunnelLimits::default();
    let after = std::time::Duration::from_millis(2_345);
    for with_stream in [false, true] {
        let (cloud, _trigger, edge) = pair_with_edge(&limits, Arc::new(AtomicU64::new(0))).await;
        let stream = if with_stream {
            let req = Request::connect("127.0.0.1:9").body(body_empty()).unwrap();
            let mut resp = cloud.send(req, "127.0.0.1:9").await.expect("connect");
            let io = crate::upgrade::on(&mut resp).await.expect("byte stream");
            Some((io, resp))
        } else {
            None
        };
        cloud.announce_reconnect(after);
        cloud.close();
        drop(stream);
        let end = tokio::time::timeout(std::time::Duration::from_secs(10), edge)
            .await
            .expect("the edge's session ends")
            .expect("edge task")
            .expect("a clean close");
        assert_eq!(
            end.reconnect_after,
            Some(after),
            "with_stream={with_stream}"
        );
    }
}
