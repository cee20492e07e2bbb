//! The admin HTTP endpoint of every role: `/metrics` (OpenMetrics text),
//! `/healthz` (the process runs), `/readyz` (the role can do its job) and, on
//! the cloud, `/tunnelport` (this replica's tunnel-port record, the input of
//! iptables-manager), `/sd` (Prometheus HTTP service discovery) and
//! `/debug/sessions` (connected nodes), plus the JSON documents a role adds
//! (the cloud's `/nodes`, the edge's `/status`). Plain HTTP, meant for loopback or a
//! pod network with a NetworkPolicy. Each crate registers its own metric
//! families into the registry handed in here.

mod heap;
pub mod traces;

pub use heap::{spawn_heap_trimmer, trim_if_worth_it};

use std::sync::{Arc, Mutex};

use http::{Response, StatusCode};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tether_tunnel::Shutdown;
use tokio::net::TcpListener;
use tracing::warn;

pub type Ready = Arc<dyn Fn() -> bool + Send + Sync>;

/// What the admin endpoint serves.
#[derive(Clone)]
pub struct Admin {
    /// Metric families for `/metrics`.
    pub registry: Arc<Mutex<Registry>>,
    /// Readiness for `/readyz`.
    pub ready: Ready,
    /// This replica's tunnel-port record for `/tunnelport` (cloud only).
    pub tunnelport: Option<Bytes>,
    /// Prometheus HTTP service discovery for `/sd` (cloud only).
    pub sd: Option<Json>,
    /// Connected nodes for `/debug/sessions` (cloud only).
    pub sessions: Option<Json>,
    /// Requests under `/hub/` go here (the cloud hub API), if set.
    pub hub_api: Option<Handler>,
    /// Further JSON documents by exact path, e.g. the cloud's `/nodes` and
    /// the edge's `/status` (read by `tether nodes` and `tether edge status`).
    pub documents: Vec<(&'static str, Json)>,
    /// The process's budget of connections that have not sent a request
    /// head yet (`tether_preauth_*{listener="admin"}`). Admin connections
    /// stay in it until they close.
    pub preauth: tether_tunnel::PreAuthGate,
}

/// Idle timeout between requests of a kept-alive connection (the first
/// request head must arrive within the gate's handshake deadline).
pub const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A handler for a path prefix of the admin endpoint.
pub type Handler = Arc<
    dyn Fn(
            http::Request<hyper::body::Incoming>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Response<tether_tunnel::Body>> + Send>,
        > + Send
        + Sync,
>;

/// Produces a JSON document on each request.
pub type Json = Arc<dyn Fn() -> Bytes + Send + Sync>;

impl Admin {
    fn answer(&self, path: &str) -> (StatusCode, &'static str, Bytes) {
        let text = |code, s: &'static str| (code, "text/plain", Bytes::from_static(s.as_bytes()));
        match path {
            "/metrics" => {
                let mut out = String::new();
                let reg = self.registry.lock().expect("metrics lock");
                match prometheus_client::encoding::text::encode(&mut out, &reg) {
                    Ok(()) => (
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        Bytes::from(out),
                    ),
                    Err(_) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "metrics encoding failed\n",
                    ),
                }
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" if (self.ready)() => text(StatusCode::OK, "ready\n"),
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            "/tunnelport" => match &self.tunnelport {
                Some(record) => (StatusCode::OK, "application/json", record.clone()),
                None => text(
                    StatusCode::NOT_FOUND,
                    "no tunnel-port record: set advertise_address and tunnel_port\n",
                ),
            },
            "/sd" => match &self.sd {
                Some(sd) => (StatusCode::OK, "application/json", sd()),
                None => text(StatusCode::NOT_FOUND, "no service discovery on this role\n"),
            },
            "/debug/sessions" => match &self.sessions {
                Some(s) => (StatusCode::OK, "application/json", s()),
                None => text(StatusCode::NOT_FOUND, "no sessions on this role\n"),
            },
            other => match self.documents.iter().find(|(p, _)| *p == other) {
                Some((_, doc)) => (StatusCode::OK, "application/json", doc()),
                None => text(StatusCode::NOT_FOUND, "not found\n"),
            },
        }
    }
}

/// Serves the admin endpoint until shutdown. Half-sent connections are closed
/// at the gate's deadline, or earlier when a newer connection needs their
/// slot; kept-alive ones after [`ADMIN_HEADER_TIMEOUT`] idle. So probes
/// always get through.
pub async fn serve(listener: TcpListener, admin: Admin, shutdown: Shutdown) {
    let gate = admin.preauth.clone();
    let admin = Arc::new(admin);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.triggered() => return,
        };
        let Some(ticket) = gate.admit("admin", peer.ip()) else {
            continue;
        };
        let ticket = Arc::new(ticket);
        let admin = admin.clone();
        let progress = ticket.clone();
        let service =
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                // A whole request head arrived: no longer sheddable.
                progress.progressed();
                let admin = admin.clone();
                async move {
                    if let Some(api) = &admin.hub_api
                        && req.uri().path().starts_with("/hub/")
                    {
                        return Ok::<_, std::convert::Infallible>(api(req).await);
                    }
                    let (status, ctype, body) = admin.answer(req.uri().path());
                    Ok(Response::builder()
                        .status(status)
                        .header("content-type", ctype)
                        .body(tether_tunnel::body_from(body))
                        .expect("static response"))
                }
            });
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = conn => {}
                _ = ticket.shed() => {}
                _ = shutdown.triggered() => {}
            }
        });
    }
}

/// Registers what every role exposes about its process, read at each scrape:
/// `process_open_fds`, `process_resident_memory_bytes` (the Prometheus
/// conventions) and `tether_runtime_alive_tasks` (a task leak shows there
/// first). The fault suite checks all three after every cycle.
pub fn register_process(registry: &mut Registry) {
    registry.register_collector(Box::new(ProcessCollector));
}

#[derive(Debug)]
struct ProcessCollector;

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count());
        let rss_kib = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse::<i64>().ok()
            });
        let tasks = tokio::runtime::Handle::try_current().map(|h| h.metrics().num_alive_tasks());
        let gauges = [
            (
                "process_open_fds",
                "Open file descriptors",
                fds.ok().map(|n| n as i64),
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                rss_kib.map(|kib| kib * 1024),
            ),
            (
                "tether_runtime_alive_tasks",
                "Tokio tasks alive in this process",
                tasks.ok().map(|n| n as i64),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        Ok(())
    }
}

/// Registers `tether_build_info{version, role} 1`, a gauge (promtool 2.42
/// cannot parse the OpenMetrics `info` type).
pub fn register_build_info(registry: &mut Registry, role: &'static str) {
    let info = prometheus_client::metrics::family::Family::<
        Vec<(&'static str, &'static str)>,
        prometheus_client::metrics::gauge::Gauge,
    >::default();
    info.get_or_create(&vec![
        ("version", env!("CARGO_PKG_VERSION")),
        ("role", role),
    ])
    .set(1);
    registry.register(
        "tether_build_info",
        "Tether version and role (always 1)",
        info,
    );
}
