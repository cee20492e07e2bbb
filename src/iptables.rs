//! `tether iptables-manager`: flags, then the iptables-manager crate.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use tracing::info;

use tether_iptables_manager::{
    BackendChoice, Cidr, DestMatch, FileSource, HttpSource, Manager, ManagerConfig, ManagerMetrics,
    RecordSource,
};
use tether_tunnel::Shutdown;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Tunnel-port records: a JSON file (re-read on change), a cloud admin
    /// URL such as http://10.0.0.5:10005/tunnelport, or in cluster mode the
    /// KubeEdge-compatible ConfigMap as configmap://<namespace>/<name>
    /// (watched), e.g. configmap://tether/tunnelport.
    #[arg(long, env = "TETHER_RECORDS", required_unless_present = "cleanup")]
    records: Option<String>,
    /// Kubeconfig for configmap:// records [default: the in-cluster service account].
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
    /// Apply one sync and exit.
    #[arg(long)]
    once: bool,
    /// Remove every rule Tether owns (and nothing else), then exit.
    #[arg(long, conflicts_with = "once")]
    cleanup: bool,
    /// auto, legacy, nft or nftables. auto uses the iptables flavour that
    /// already holds rules, like kube-proxy.
    #[arg(long, env = "TETHER_BACKEND", default_value = "auto")]
    backend: BackendChoice,
    /// The cloud's kubelet-API front port the rules DNAT to.
    #[arg(long, env = "TETHER_STREAM_PORT", default_value_t = 10003)]
    stream_port: u16,
    /// Only redirect traffic to these edge-node networks (repeatable).
    /// Without any destination match every address's tunnel port is redirected.
    #[arg(long = "node-cidr", env = "TETHER_NODE_CIDRS", value_delimiter = ',')]
    node_cidrs: Vec<Cidr>,
    /// Only redirect traffic to addresses in this IPv4 ipset.
    #[arg(long, env = "TETHER_IPSET")]
    ipset: Option<String>,
    /// Only redirect traffic to addresses in this IPv6 ipset.
    #[arg(long, env = "TETHER_IPSET6")]
    ipset6: Option<String>,
    /// Tunnel ports records may use, as MIN-MAX.
    #[arg(long, env = "TETHER_PORT_RANGE", default_value = "10350-10999", value_parser = crate::config::parse_port_range)]
    port_range: (u16, u16),
    /// Seconds between drift checks.
    #[arg(long, env = "TETHER_RESYNC_SECS", default_value_t = 10.0)]
    resync_secs: f64,
    /// Milliseconds between reads of the records file or URL (a ConfigMap
    /// is watched instead).
    #[arg(long, env = "TETHER_POLL_MS", default_value_t = 1000)]
    poll_ms: u64,
    /// Admin (metrics, probes) listen address.
    #[arg(long, env = "TETHER_ADMIN_ADDR", default_value = "127.0.0.1:10007")]
    admin_addr: SocketAddr,
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let range = a.port_range.0..=a.port_range.1;
    let cfg = ManagerConfig {
        backend: a.backend,
        stream_port: a.stream_port,
        dst: DestMatch {
            cidrs: a.node_cidrs,
            ipset: a.ipset,
            ipset6: a.ipset6,
        },
        port_range: range.clone(),
        resync: Duration::try_from_secs_f64(a.resync_secs)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--resync-secs must be a positive number")?,
    };
    let mut registry = Registry::default();
    tether_metrics_adapter::register_build_info(&mut registry, "iptables-manager");
    tether_metrics_adapter::register_process(&mut registry);
    let metrics = ManagerMetrics::register(&mut registry);
    let mut manager = Manager::new(cfg, metrics).await?;
    if a.cleanup {
        manager.cleanup().await?;
        return Ok(());
    }
    let records = a.records.context("--records is required")?;
    let every = Duration::from_millis(a.poll_ms.max(10));
    let mut source: Box<dyn RecordSource> = if records.starts_with("configmap://") {
        let (ns, name) = tether_cluster::configmap_url(&records).with_context(|| {
            format!("--records {records:?}: want configmap://<namespace>/<name>")
        })?;
        let cluster =
            tether_cluster::Cluster::connect(a.kubeconfig.as_deref(), ns, "iptables-manager")
                .await
                .context("connecting to the cluster for --records configmap://")?;
        Box::new(tether_cluster::ConfigMapSource::new(
            &cluster,
            ns,
            name,
            range,
            Duration::from_millis(500),
            Duration::from_secs(30),
        ))
    } else if records.starts_with("http://") {
        Box::new(HttpSource::new(&records, every, range)?)
    } else {
        Box::new(FileSource::new(records.into(), every, range))
    };
    if a.once {
        let recs = source.next().await?;
        let rules = manager.sync(&recs).await?;
        info!(rules, backend = %manager.backend(), "synced once");
        return Ok(());
    }
    let listener = crate::bind(a.admin_addr, "the admin endpoint").await?;
    let admin_addr = listener.local_addr()?;
    let (trigger, shutdown) = Shutdown::new(Duration::ZERO);
    let preauth = tether_tunnel::PreAuthMetrics::default();
    preauth.register(&mut registry);
    tokio::spawn(tether_metrics_adapter::serve(
        listener,
        tether_metrics_adapter::Admin {
            registry: Arc::new(Mutex::new(registry)),
            ready: Arc::new(|| true),
            tunnelport: None,
            sd: None,
            sessions: None,
            hub_api: None,
            documents: Vec::new(),
            preauth: tether_tunnel::PreAuthGate::new(Default::default(), preauth),
        },
        shutdown.clone(),
    ));
    info!(backend = %manager.backend(), admin = %admin_addr, "iptables-manager started");
    let run = tokio::spawn(tether_iptables_manager::run(manager, source, shutdown));
    crate::stop_signal().await;
    trigger.trigger();
    run.await?;
    info!("iptables-manager stopped; rules stay in place");
    Ok(())
}
