//! Exercises the fixture kubelet directly, without Tether in between, so tunnel tests
//! can trust that any difference they see comes from the tunnel.

use std::time::Duration;

use tether_tests::bounded;
use tether_tests::fixture::{
    self, FixtureKubelet, LOG_LINE_LEN, LogVerifier, MetricsKind, log_bytes, log_pattern_byte,
};
use tether_tests::{kubectl, spdy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn connect(kubelet: &FixtureKubelet) -> TcpStream {
    TcpStream::connect(kubelet.addr)
        .await
        .expect("connect to fixture")
}

/// Pseudo-random bytes, so a shifted or reordered chunk cannot compare equal.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn log_of_one_mib_is_byte_exact() {
    bounded(TEST_TIMEOUT, async {
        let kubelet = FixtureKubelet::start(None).await?;
        let host = kubelet.addr.to_string();
        let path = "/containerLogs/default/web-0/nginx?bytes=1048576";
        let mut resp = kubectl::get_streaming(connect(&kubelet).await, &host, path).await?;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-fixture"], "kubelet");
        assert_eq!(resp.headers()["content-type"], "text/plain");
        assert_eq!(resp.headers()["x-fixture-target"], "default/web-0/nginx");
        let mut verifier = LogVerifier::new(0);
        while let Some(chunk) = kubectl::next_chunk(resp.body_mut()).await? {
            verifier.update(&chunk)?;
        }
        assert_eq!(verifier.offset(), 1 << 20);

        // The three views of the content agree.
        let whole: Vec<u8> = log_bytes(1 << 20).flat_map(|c| c.to_vec()).collect();
        assert_eq!(whole.len(), 1 << 20);
        for offset in [0, 1, 15, 16, 63, 64, 65, 4095, 1_000_003] {
            assert_eq!(
                whole[offset],
                log_pattern_byte(offset as u64),
                "offset {offset}"
            );
        }
        assert_eq!(
            &whole[..LOG_LINE_LEN as usize],
            b"0000000000000000 fixture log line abcdefghijklmnopqrstuvwxyz012\n"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn log_honours_tail_lines_and_limit_bytes() {
    bounded(TEST_TIMEOUT, async {
        let kubelet = FixtureKubelet::start(None).await?;
        let host = kubelet.addr.to_string();

        let (_, body) =
            kubectl::get(connect(&kubelet).await, &host, "/containerLogs/ns/p/c").await?;
        assert_eq!(body.len() as u64, fixture::DEFAULT_LOG_BYTES);

        let path = "/containerLogs/ns/p/c?bytes=10000&tailLines=3";
        let (_, body) = kubectl::get(connect(&kubelet).await, &host, path).await?;
        let start = fixture::log_tail_start(10_000, 3);
        assert_eq!(start, 9_856);
        let mut verifier = LogVerifier::new(start);
        verifier.update(&body)?;
        assert_eq!(verifier.offset(), 10_000);

        let path = "/containerLogs/ns/p/c?bytes=10000&limitBytes=100";
        let (_, body) = kubectl::get(connect(&kubelet).await, &host, path).await?;
        assert_eq!(body.len(), 100);
        LogVerifier::new(0).update(&body)?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn follow_disconnect_is_counted_within_a_second() {
    bounded(TEST_TIMEOUT, async {
        let kubelet = FixtureKubelet::start(None).await?;
        let host = kubelet.addr.to_string();
        let path = "/containerLogs/default/web-0/nginx?follow=true&bytes=100";
        let since = kubelet.follow_disconnects();

        let mut resp = kubectl::get_streaming(connect(&kubelet).await, &host, path).await?;
        let mut verifier = LogVerifier::new(0);
        // The initial 100 bytes, then the follow lines continue the same pattern.
        while verifier.offset() < 100 + 2 * LOG_LINE_LEN {
            let chunk = kubectl::next_chunk(resp.body_mut())
                .await?
                .expect("follow ended");
            verifier.update(&chunk)?;
        }
        assert_eq!(kubelet.follow_disconnects(), since);
        drop(resp);
        assert!(
            kubelet
                .wait_follow_disconnect(since, Duration::from_secs(1))
                .await
        );
        assert_eq!(kubelet.follow_disconnects(), since + 1);

        // Same with a bare socket that just goes away.
        let mut tcp = connect(&kubelet).await;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let mut buf = [0u8; 512];
        let n = tcp.read(&mut buf).await?;
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK"));
        drop(tcp);
        assert!(
            kubelet
                .wait_follow_disconnect(since + 1, Duration::from_secs(1))
                .await
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn exec_over_websocket_relays_stdio_and_exit_code() {
    bounded(TEST_TIMEOUT, async {
        let kubelet = FixtureKubelet::start(None).await?;
        let host = kubelet.addr.to_string();
        let script = "read x; echo out-$x; echo err >&2; exit 3";
        let path = kubectl::exec_path("default", "web-0", "nginx", &["sh", "-c", script], true);
        let out = kubectl::exec_ws(connect(&kubelet).await, &host, &path, b"hi\n").await?;
        assert_eq!(out.stdout, b"out-hi\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.exit_code, 3);
        assert_eq!(out.status["status"], "Failure");
        assert_eq!(out.status["reason"], "NonZeroExitCode");
        assert_eq!(
            out.status["message"],
            "command terminated with non-zero exit code: exit status 3"
        );

        // A large stdin through `cat` comes back whole and the exit is a Success.
        let input = noise(3 << 20);
        let path = kubectl::exec_path("default", "web-0", "nginx", &["cat"], true);
        let out = kubectl::exec_ws(connect(&kubelet).await, &host, &path, &input).await?;
        assert!(
            out.stdout == input,
            "cat echoed {} of {} bytes",
            out.stdout.len(),
            input.len()
        );
        assert_eq!(out.exit_code, 0);
        assert_eq!(
            out.status,
            serde_json::json!({"metadata": {}, "status": "Success"})
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn port_forward_over_websocket_echoes() {
    bounded(TEST_TIMEOUT, async {
        let kubelet = FixtureKubelet::start(None).await?;
        let host = kubelet.addr.to_string();
        let payload = noise(1 << 20);
        let path = "/portForward/default/web-0?ports=8080";
        let echoed =
            kubectl::port_forward_ws(connect(&kubelet).await, &host, path, &payload).await?;
        assert!(echoed == payload);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn exec_over_spdy_relays_stdio_and_exit_code() {
    bounded(TEST_TIMEOUT, async {
        let kubelet = FixtureKubelet::start(None).await?;
        let host = kubelet.addr.to_string();
        let script = "read x; echo out-$x; echo err >&2; exit 3";
        let path = kubectl::exec_path("default", "web-0", "nginx", &["sh", "-c", script], true);
        let out = kubectl::exec_spdy(connect(&kubelet).await, &host, &path, b"hi\n").await?;
        assert_eq!(out.stdout, b"out-hi\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.exit_code, 3);
        assert_eq!(out.status["status"], "Failure");
        assert_eq!(out.status["reason"], "NonZeroExitCode");
        assert_eq!(out.status["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(
            out.status["message"],
            "command terminated with non-zero exit code: exit status 3"
        );

        // A large stdin through `cat` comes back whole and the exit is a Success.
        let input = noise(3 << 20);
        let path = kubectl::exec_path("default", "web-0", "nginx", &["cat"], true);
        let out = kubectl::exec_spdy(connect(&kubelet).await, &host, &path, &input).await?;
        assert!(
            out.stdout == input,
            "cat echoed {} of {} bytes",
            out.stdout.len(),
            input.len()
        );
        assert_eq!(out.exit_code, 0);
        assert_eq!(
            out.status,
            serde_json::json!({"metadata": {}, "status": "Success"})
        );

        // No stdin stream; and attach (to `cat`) the same way.
        let path = kubectl::exec_path("default", "web-0", "nginx", &["true"], false);
        let out = kubectl::exec_spdy(connect(&kubelet).await, &host, &path, b"").await?;
        assert_eq!((out.exit_code, out.stdout.len()), (0, 0));
        let path = "/attach/default/web-0/nginx?stdin=true&stdout=true";
        let out = kubectl::exec_spdy(connect(&kubelet).await, &host, path, b"attached\n").await?;
        assert_eq!(out.stdout, b"attached\n");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn spdy_exec_refuses_protocols_it_does_not_serve() {
    bounded(TEST_TIMEOUT, async {
        let kubelet = FixtureKubelet::start(None).await?;
        let host = kubelet.addr.to_string();
        let path = kubectl::exec_path("default", "web-0", "nginx", &["true"], false);
        let refused = kubectl::raw_upgrade(
            connect(&kubelet).await,
            &host,
            &path,
            "SPDY/3.1",
            &[("X-Stream-Protocol-Version", "v3.channel.k8s.io")],
        )
        .await
        .expect_err("v3 refused");
        let text = format!("{refused:#}");
        assert!(text.contains("403") && text.contains("negotiate"), "{text}");
        Ok(())
    })
    .await;
}

/// Opens a SPDY exec by hand and returns the frame reader and writer.
async fn spdy_session(
    kubelet: &FixtureKubelet,
) -> anyhow::Result<(
    spdy::FrameReader<impl tokio::io::AsyncRead + Unpin>,
    spdy::FrameWriter<impl tokio::io::AsyncWrite + Unpin>,
)> {
    let path = kubectl::exec_path("default", "web-0", "nginx", &["cat"], true);
    let (_, io) = kubectl::raw_upgrade(
        connect(kubelet).await,
        &kubelet.addr.to_string(),
        &path,
        "SPDY/3.1",
        &[("X-Stream-Protocol-Version", "v4.channel.k8s.io")],
    )
    .await?;
    let (read, write) = tokio::io::split(io);
    Ok((spdy::FrameReader::new(read), spdy::FrameWriter::new(write)?))
}

/// Reads frames until the connection ends; returns the GOAWAY status seen.
async fn goaway_then_eof(
    reader: &mut spdy::FrameReader<impl tokio::io::AsyncRead + Unpin>,
) -> anyhow::Result<Option<u32>> {
    let mut status = None;
    for _ in 0..16 {
        match reader.read_frame_within(kubectl::IO_TIMEOUT).await? {
            Some(spdy::Frame::GoAway { status: s, .. }) => status = Some(s),
            Some(_) => {}
            None => return Ok(status),
        }
    }
    anyhow::bail!("the fixture kept talking after bad input")
}

#[tokio::test]
async fn bad_spdy_input_ends_the_session_with_a_protocol_error() {
    bounded(TEST_TIMEOUT, async {
        let kubelet = FixtureKubelet::start(None).await?;
        // A data frame claiming 16 MiB - 1: refused from its head alone.
        let (mut reader, mut writer) = spdy_session(&kubelet).await?;
        writer.write_raw(&[0, 0, 0, 1, 0, 0xff, 0xff, 0xff]).await?;
        assert_eq!(
            goaway_then_eof(&mut reader).await?,
            Some(spdy::GOAWAY_PROTOCOL_ERROR)
        );
        // A SYN_STREAM whose header block is not zlib.
        let (mut reader, mut writer) = spdy_session(&kubelet).await?;
        let garbage = [
            0x80, 3, 0, 1, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef,
        ];
        writer.write_raw(&garbage).await?;
        assert_eq!(
            goaway_then_eof(&mut reader).await?,
            Some(spdy::GOAWAY_PROTOCOL_ERROR)
        );
        // A stream id that goes backwards.
        let (mut reader, mut writer) = spdy_session(&kubelet).await?;
        for stream_id in [3, 1] {
            let headers = vec![("streamtype".to_owned(), "error".to_owned())];
            let frame = spdy::Frame::SynStream {
                stream_id,
                associated_id: 0,
                priority: 0,
                flags: 0,
                headers,
            };
            writer.write_frame(&frame).await?;
        }
        assert_eq!(
            goaway_then_eof(&mut reader).await?,
            Some(spdy::GOAWAY_PROTOCOL_ERROR)
        );
        // The fixture still serves.
        let host = kubelet.addr.to_string();
        let path = kubectl::exec_path("default", "web-0", "nginx", &["true"], false);
        let out = kubectl::exec_spdy(connect(&kubelet).await, &host, &path, b"").await?;
        assert_eq!(out.exit_code, 0);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn spdy_port_forward_upgrade_echoes_raw_bytes() {
    bounded(TEST_TIMEOUT, async {
        let kubelet = FixtureKubelet::start(None).await?;
        let host = kubelet.addr.to_string();
        let headers = [("X-Stream-Protocol-Version", "portforward.k8s.io")];
        let path = "/portForward/default/web-0?ports=8080";
        let (parts, io) =
            kubectl::raw_upgrade(connect(&kubelet).await, &host, path, "SPDY/3.1", &headers)
                .await?;
        assert_eq!(parts.status, 101);
        assert_eq!(parts.headers["upgrade"], "SPDY/3.1");
        assert_eq!(
            parts.headers["x-stream-protocol-version"],
            "portforward.k8s.io"
        );
        assert_eq!(parts.headers["x-fixture"], "kubelet");
        let payload = noise(1 << 20);
        assert!(kubectl::echo_through(io, &payload).await? == payload);

        // `tether-echo` works on any path.
        let (parts, io) = kubectl::raw_upgrade(
            connect(&kubelet).await,
            &host,
            "/anything",
            "tether-echo",
            &[],
        )
        .await?;
        assert_eq!(parts.status, 101);
        assert_eq!(kubectl::echo_through(io, b"ping").await?, b"ping");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn metrics_bodies_are_intact() {
    bounded(TEST_TIMEOUT, async {
        let kubelet = FixtureKubelet::start(None).await?;
        let host = kubelet.addr.to_string();

        let (parts, body) =
            kubectl::get(connect(&kubelet).await, &host, "/metrics/single-line").await?;
        assert_eq!(parts.headers["content-type"], "text/plain; version=0.0.4");
        assert_eq!(body.len(), 5 << 20);
        assert_eq!(body.iter().filter(|b| **b == b'\n').count(), 1);
        assert_eq!(body.last(), Some(&b'\n'));
        assert!(body == fixture::metrics_body(MetricsKind::SingleLine, 5 << 20));

        let (_, body) = kubectl::get(connect(&kubelet).await, &host, "/metrics/cadvisor").await?;
        assert!(body == fixture::metrics_body(MetricsKind::Cadvisor, 4 << 20));
        let long_lines = body
            .split(|b| *b == b'\n')
            .filter(|l| l.len() > 64 * 1024)
            .count();
        assert!(long_lines >= 4, "only {long_lines} lines over 64 KiB");

        let (_, body) = kubectl::get(connect(&kubelet).await, &host, "/metrics?bytes=1000").await?;
        assert!(body == fixture::metrics_body(MetricsKind::Kubelet, 1000));
        assert_eq!(body.len(), 1000);
        assert!(body.ends_with(b"\n"));
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn small_endpoints_and_errors() {
    bounded(TEST_TIMEOUT, async {
        let kubelet = FixtureKubelet::start(None).await?;
        let host = kubelet.addr.to_string();
        let before = kubelet.requests();

        let (parts, body) = kubectl::get(connect(&kubelet).await, &host, "/no/such/path").await?;
        assert_eq!(parts.status, 404);
        assert_eq!(body, "404 page not found\n");
        assert_eq!(parts.headers["x-fixture"], "kubelet");

        let (parts, _) = kubectl::get(connect(&kubelet).await, &host, "/error500").await?;
        assert_eq!(parts.status, 500);

        let (parts, body) = kubectl::get(connect(&kubelet).await, &host, "/healthz").await?;
        assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"ok"[..]));

        let (_, body) = kubectl::get(connect(&kubelet).await, &host, "/pods").await?;
        let pods: serde_json::Value = serde_json::from_slice(&body)?;
        assert_eq!(pods["kind"], "PodList");

        let (_, body) = kubectl::get(connect(&kubelet).await, &host, "/stats/summary").await?;
        let summary: serde_json::Value = serde_json::from_slice(&body)?;
        assert_eq!(summary["node"]["nodeName"], "fixture-node");

        let started = tokio::time::Instant::now();
        let (parts, _) = kubectl::get(connect(&kubelet).await, &host, "/slow?ms=100").await?;
        assert_eq!(parts.status, 200);
        assert!(started.elapsed() >= Duration::from_millis(100));

        assert_eq!(kubelet.requests(), before + 6);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn serves_https_with_a_self_signed_cert() {
    bounded(TEST_TIMEOUT, async {
        let (server, cert) = fixture::self_signed_tls()?;
        let kubelet = FixtureKubelet::start(Some(server)).await?;
        let host = kubelet.addr.to_string();
        let connector = tokio_rustls::TlsConnector::from(fixture::client_tls(cert)?);
        let connect_tls = || async {
            let name = rustls_pki_types::ServerName::try_from("localhost")?;
            anyhow::Ok(connector.connect(name, connect(&kubelet).await).await?)
        };

        let (parts, body) = kubectl::get(connect_tls().await?, &host, "/healthz").await?;
        assert_eq!(parts.status, 200);
        assert_eq!(body, "ok");

        let path = kubectl::exec_path("ns", "pod", "c", &["sh", "-c", "echo tls"], false);
        let out = kubectl::exec_ws(connect_tls().await?, &host, &path, b"").await?;
        assert_eq!(out.stdout, b"tls\n");
        assert_eq!(out.exit_code, 0);

        let payload = noise(256 * 1024);
        let (_, io) =
            kubectl::raw_upgrade(connect_tls().await?, &host, "/x", "tether-echo", &[]).await?;
        assert!(kubectl::echo_through(io, &payload).await? == payload);

        // A client that does not trust the cert is refused.
        let (_, other) = fixture::self_signed_tls()?;
        let stranger = tokio_rustls::TlsConnector::from(fixture::client_tls(other)?);
        let name = rustls_pki_types::ServerName::try_from("localhost")?;
        assert!(
            stranger
                .connect(name, connect(&kubelet).await)
                .await
                .is_err()
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn websocket_without_a_supported_protocol_is_refused() {
    bounded(TEST_TIMEOUT, async {
        let kubelet = FixtureKubelet::start(None).await?;
        let mut tcp = connect(&kubelet).await;
        let request = format!(
            "GET /exec/ns/pod/c?command=true HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: v9.nope\r\n\r\n",
            kubelet.addr
        );
        tcp.write_all(request.as_bytes()).await?;
        let mut buf = [0u8; 64];
        let n = tcp.read(&mut buf).await?;
        assert!(buf[..n].starts_with(b"HTTP/1.1 400"));
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn drop_stops_the_fixture() {
    bounded(TEST_TIMEOUT, async {
        let kubelet = FixtureKubelet::start(None).await?;
        let addr = kubelet.addr;
        drop(kubelet);
        // The listener goes away once the aborted accept task is reaped.
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_err() {
                return Ok(());
            }
            tokio::task::yield_now().await;
        }
        anyhow::bail!("fixture still accepting after drop")
    })
    .await;
}

/// A minimal apiserver in front of the fixture for a real `kubectl exec`: it
/// answers the pod GET and splices `POST .../exec` onto the fixture's `/exec`
/// upgrade, so kubectl's own SPDY/3.1 client (moby/spdystream) talks to the
/// fixture's SPDY exec byte for byte.
async fn apiserver_front(kubelet: &FixtureKubelet) -> anyhow::Result<std::net::SocketAddr> {
    use http::{Request, Response, StatusCode};
    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let upstream = kubelet.addr;
    let serve = move |mut req: Request<Incoming>| async move {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let mut resp = Response::new(Full::new(Bytes::new()));
        // Discovery (kubectl asks before anything else), then the pod.
        let body = match (req.method() == http::Method::GET, path.as_str()) {
            (true, "/api") => Some(serde_json::json!({"kind": "APIVersions", "versions": ["v1"]})),
            (true, "/apis") => {
                Some(serde_json::json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}))
            }
            (true, "/api/v1") => Some(serde_json::json!({
                "kind": "APIResourceList", "groupVersion": "v1",
                "resources": [
                    {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod", "verbs": ["get"]},
                    {"name": "pods/exec", "singularName": "", "namespaced": true, "kind": "PodExecOptions", "verbs": ["create", "get"]}
                ]
            })),
            (true, "/api/v1/namespaces/default/pods/web-0") => Some(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web-0", "namespace": "default"},
                "spec": {"containers": [{"name": "nginx", "image": "nginx"}]},
                "status": {"phase": "Running"}
            })),
            _ => None,
        };
        if let Some(body) = body {
            *resp.body_mut() = Full::new(Bytes::from(body.to_string()));
            resp.headers_mut()
                .insert("content-type", "application/json".parse().expect("static"));
            return Ok::<_, std::convert::Infallible>(resp);
        }
        let spdy = req
            .headers()
            .get("upgrade")
            .is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"SPDY/3.1"));
        if path != "/api/v1/namespaces/default/pods/web-0/exec" || !spdy {
            *resp.status_mut() = StatusCode::NOT_FOUND;
            return Ok(resp);
        }
        // What the apiserver does: the kubelet's /exec path, the same query and
        // protocol headers, and the kubelet's 101 passed back.
        let versions: Vec<String> = req
            .headers()
            .get_all("x-stream-protocol-version")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect();
        let headers: Vec<(&str, &str)> = versions
            .iter()
            .map(|v| ("X-Stream-Protocol-Version", v.as_str()))
            .collect();
        let target = format!("/exec/default/web-0/nginx?{query}");
        let Ok(tcp) = tokio::net::TcpStream::connect(upstream).await else {
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            return Ok(resp);
        };
        let upgraded = kubectl::upgrade_with(
            tcp,
            http::Method::POST,
            &upstream.to_string(),
            &target,
            "SPDY/3.1",
            &headers,
        )
        .await;
        let Ok((parts, mut kubelet_io)) = upgraded else {
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            return Ok(resp);
        };
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        for name in ["connection", "upgrade", "x-stream-protocol-version"] {
            if let Some(v) = parts.headers.get(name) {
                resp.headers_mut().insert(name, v.clone());
            }
        }
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(client) = on_upgrade.await {
                let mut client = TokioIo::new(client);
                let splice = tokio::io::copy_bidirectional(&mut client, &mut kubelet_io);
                let _ = tokio::time::timeout(TEST_TIMEOUT, splice).await;
            }
        });
        Ok(resp)
    };
    tokio::spawn(async move {
        // One connection per kubectl request; the test runs three.
        for _ in 0..16 {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let service = hyper::service::service_fn(serve);
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades(),
            );
        }
    });
    Ok(addr)
}

/// Runs the real `kubectl exec` over SPDY (its WebSocket client turned off).
async fn kubectl_exec(
    server: std::net::SocketAddr,
    stdin: &[u8],
    command: &[&str],
) -> anyhow::Result<std::process::Output> {
    use anyhow::Context;
    let dir = std::env::temp_dir().join(format!("tether-selftest-kubectl-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, "")?;
    let mut child = tokio::process::Command::new("kubectl")
        .env("KUBECONFIG", &kubeconfig)
        .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
        .args(["--server", &format!("http://{server}"), "-n", "default"])
        .arg(format!("--cache-dir={}", dir.join("cache").display()))
        .args(["exec", "-i", "web-0", "-c", "nginx", "--"])
        .args(command)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running kubectl (scripts/test.sh installs Debian's kubernetes-client)")?;
    let mut pipe = child.stdin.take().context("stdin")?;
    let input = stdin.to_vec();
    let writer = tokio::spawn(async move {
        let _ = pipe.write_all(&input).await;
    });
    let out = tokio::time::timeout(kubectl::IO_TIMEOUT * 2, child.wait_with_output())
        .await
        .context("kubectl exec timed out")??;
    let _ = writer.await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

#[tokio::test]
async fn real_kubectl_execs_over_spdy_against_the_fixture() {
    bounded(TEST_TIMEOUT, async {
        let kubelet = FixtureKubelet::start(None).await?;
        let server = apiserver_front(&kubelet).await?;
        let script = "read x; echo out-$x; echo err >&2; exit 3";
        let out = kubectl_exec(server, b"hi\n", &["sh", "-c", script]).await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.stdout, b"out-hi\n", "kubectl stderr: {stderr}");
        assert!(stderr.starts_with("err\n"), "kubectl stderr: {stderr}");
        assert_eq!(out.status.code(), Some(3), "kubectl stderr: {stderr}");

        let input = noise(1 << 20);
        let out = kubectl_exec(server, &input, &["cat"]).await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "kubectl stderr: {stderr}");
        assert!(
            out.stdout == input,
            "cat through kubectl returned {} of {} bytes",
            out.stdout.len(),
            input.len()
        );
        Ok(())
    })
    .await;
}
