//! Trace linkage across the tunnel: the production tracing layer
//! (`tether_metrics_adapter::traces::layer`) with an in-memory exporter in
//! place of OTLP, the real cloud and edge in-process, real TLS and sockets.
//! Its own test binary because it installs the global subscriber.

use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tether_tests::fixture::FixtureKubelet;
use tether_tests::harness::{CloudHandle, CloudSpec, EdgeHandle, EdgeSpec, Pki};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const NODE: &str = "edge-1";
const APISERVER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const APISERVER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_request_spans_link_cloud_and_edge_in_one_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    tracing_subscriber::registry()
        .with(tether_metrics_adapter::traces::layer(&provider))
        .init();
    tokio::time::timeout(Duration::from_secs(60), run(&exporter))
        .await
        .expect("test timed out")
        .unwrap();
}

async fn run(exporter: &InMemorySpanExporter) -> anyhow::Result<()> {
    let pki = Pki::generate()?;
    let fixture = FixtureKubelet::start(None).await?;
    let cloud = CloudHandle::start(&pki, CloudSpec::default()).await?;
    let _edge = EdgeHandle::start(&pki, cloud.tunnel_addr, EdgeSpec::new(NODE, fixture.addr))?;
    cloud
        .registry
        .wait_for_node(NODE, None, Duration::from_secs(10))
        .await
        .context("edge never connected")?;

    // 1. The apiserver sent a traceparent: the cloud's span is its child.
    let incoming = format!("00-{APISERVER_TRACE}-{APISERVER_SPAN}-01");
    let kubelet_saw = logs(&pki, &cloud, Some(&incoming)).await?;
    let trace = TraceId::from_hex(APISERVER_TRACE)?;
    let spans = wait_for_trace(exporter, trace).await?;
    let front = one(&spans, "front.request")?;
    let tunnel = one(&spans, "tunnel.stream")?;
    let edge = one(&spans, "edge.stream")?;
    ensure!(front.parent_span_id == SpanId::from_hex(APISERVER_SPAN)?);
    ensure!(
        front
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "client.traceparent"
                && kv.value.as_str() == incoming.as_str()),
        "front span does not carry the apiserver's traceparent: {:?}",
        front.attributes
    );
    ensure!(tunnel.parent_span_id == front.span_context.span_id());
    ensure!(
        edge.parent_span_id == tunnel.span_context.span_id(),
        "edge span's parent {} is not the cloud tunnel span {}",
        edge.parent_span_id,
        tunnel.span_context.span_id()
    );
    ensure!(
        edge.parent_span_is_remote,
        "the link crossed the tunnel as W3C context"
    );
    // The kubelet was handed the edge span as its parent.
    let expected = format!("00-{APISERVER_TRACE}-{}-01", edge.span_context.span_id());
    ensure!(
        kubelet_saw.as_deref() == Some(expected.as_str()),
        "kubelet saw traceparent {kubelet_saw:?}, want {expected}"
    );

    // 2. No traceparent from the client: the front starts a new trace and
    //    the edge still joins it.
    exporter.reset();
    logs(&pki, &cloud, None).await?;
    let front = wait_for_span(exporter, "front.request").await?;
    ensure!(
        front.parent_span_id == SpanId::INVALID,
        "front span is a root"
    );
    let spans = wait_for_trace(exporter, front.span_context.trace_id()).await?;
    let tunnel = one(&spans, "tunnel.stream")?;
    let edge = one(&spans, "edge.stream")?;
    ensure!(edge.parent_span_id == tunnel.span_context.span_id());
    Ok(())
}

/// A `kubectl logs` through the front, optionally with a traceparent; returns
/// the traceparent the fixture kubelet received.
async fn logs(
    pki: &Pki,
    cloud: &CloudHandle,
    traceparent: Option<&str>,
) -> anyhow::Result<Option<String>> {
    let conn = cloud.front_conn(pki.apiserver_tls()?).await?;
    let (mut sender, http) = hyper::client::conn::http1::handshake(TokioIo::new(conn)).await?;
    tokio::spawn(http);
    let mut req = http::Request::get("/containerLogs/default/web/app?bytes=4096")
        .header(http::header::HOST, format!("{NODE}:10250"));
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let resp = sender
        .send_request(req.body(Empty::<Bytes>::new())?)
        .await?;
    ensure!(resp.status() == 200, "logs answered {}", resp.status());
    let seen = resp
        .headers()
        .get("x-fixture-traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.into_body().collect().await?.to_bytes();
    ensure!(body.len() == 4096, "log body of {} bytes", body.len());
    Ok(seen)
}

fn one<'a>(spans: &'a [SpanData], name: &str) -> anyhow::Result<&'a SpanData> {
    let found: Vec<&SpanData> = spans.iter().filter(|s| s.name == name).collect();
    ensure!(
        found.len() == 1,
        "want one {name} span in the trace, found {}: {:?}",
        found.len(),
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    Ok(found[0])
}

/// Spans end (and are exported) as each hop finishes; poll briefly.
async fn wait_for_trace(
    exporter: &InMemorySpanExporter,
    trace: TraceId,
) -> anyhow::Result<Vec<SpanData>> {
    for _ in 0..100 {
        let spans: Vec<SpanData> = exporter
            .get_finished_spans()?
            .into_iter()
            .filter(|s| s.span_context.trace_id() == trace)
            .collect();
        let names = ["front.request", "tunnel.stream", "edge.stream"];
        if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) {
            return Ok(spans);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!(
        "trace {trace} incomplete after 5 s: {:?}",
        exporter
            .get_finished_spans()?
            .iter()
            .map(|s| (s.name.to_string(), s.span_context.trace_id()))
            .collect::<Vec<_>>()
    )
}

async fn wait_for_span(exporter: &InMemorySpanExporter, name: &str) -> anyhow::Result<SpanData> {
    for _ in 0..100 {
        if let Some(s) = exporter
            .get_finished_spans()?
            .into_iter()
            .find(|s| s.name == name)
        {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("no {name} span after 5 s")
}
