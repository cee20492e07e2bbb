//! Cluster mode against a scripted kube-apiserver DOUBLE (`api_double`), not
//! a real apiserver: the double checks the exact requests Tether sends
//! (verbs, paths, queries, bodies, content types, resourceVersion
//! preconditions) and plays conflicts, 404s, 5xx, dropped connections, watch
//! restarts and 410 Gone. The front-and-edge tests run the real front and
//! edges too; the lease tests run several replicas' ownership records
//! against one double.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use http::Method;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::json;
use tether_cloudstream::peer::{Ownership, PeerAddr};
use tether_cluster::{
    ClaimError, ClaimSpec, Cluster, ConfigMapSource, KubeletPortPatcher, LeaseOptions,
    LeaseOwnership, PodCache, PodCacheOptions, RECORD_ANNOTATION, RetryPolicy, TunnelPortClaim,
};
use tether_iptables_manager::{RecordSource, SourceError};
use tether_tests::api_double::{self, ApiDouble, Fault, Recorded, node, pod};
use tether_tests::fixture::FixtureKubelet;
use tether_tests::harness::{CloudHandle, CloudSpec, EdgeHandle, EdgeSpec, Pki};
use tether_tests::kubectl;
use tether_tunnel::{Shutdown, ShutdownTrigger};

const NS: &str = "tether";
const WAIT: Duration = Duration::from_secs(10);
const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const CM_PATH: &str = "/api/v1/namespaces/tether/configmaps/tunnelport";

async fn bounded<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) {
    // Warnings (failed watches, refused patches) show with a failing test.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TETHER_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test timed out")
        .expect("test failed");
}

fn cluster(double: &ApiDouble, replica: &str) -> anyhow::Result<Cluster> {
    Ok(Cluster::from_config(double.config(), NS, replica)?)
}

/// Short delays so retry tests stay fast; still bounded in count.
fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        base: Duration::from_millis(10),
        max: Duration::from_millis(50),
        attempts: 10,
    }
}

fn patcher(double: &ApiDouble) -> anyhow::Result<(KubeletPortPatcher, ShutdownTrigger)> {
    let (trigger, shutdown) = Shutdown::new(Duration::ZERO);
    Ok((
        KubeletPortPatcher::new(&cluster(double, "r1")?, quick_retry(), shutdown),
        trigger,
    ))
}

fn statuses(reqs: &[Recorded]) -> Vec<u16> {
    reqs.iter().map(|r| r.status).collect()
}

fn kubelet_port(double: &ApiDouble, name: &str) -> Option<u64> {
    double.get("nodes", "", name)?["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"].as_u64()
}

// ---- node status patch ----

#[tokio::test]
async fn status_patch_against_api_double_sends_one_exact_merge_patch() {
    bounded(async {
        let double = api_double::start().await?;
        double.put("nodes", node("edge-1"));
        let (patcher, _trigger) = patcher(&double)?;
        patcher.request("edge-1", 10351);
        ensure!(patcher.wait_idle(WAIT).await, "patch never finished");
        let reqs = double.requests();
        ensure!(reqs.len() == 1, "want exactly one request, got {reqs:#?}");
        let r = &reqs[0];
        ensure!(r.method == Method::PATCH);
        ensure!(r.path == "/api/v1/nodes/edge-1/status", "path {}", r.path);
        ensure!(
            r.params() == [("fieldManager".into(), "tether-cloud".into())].into(),
            "query {:?}",
            r.query
        );
        ensure!(
            r.content_type.as_deref() == Some("application/merge-patch+json"),
            "content type {:?}",
            r.content_type
        );
        ensure!(
            r.body == r#"{"status":{"daemonEndpoints":{"kubeletEndpoint":{"Port":10351}}}}"#,
            "body {:?}",
            r.body
        );
        ensure!(r.status == 200);
        ensure!(kubelet_port(&double, "edge-1") == Some(10351));
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn status_patch_against_api_double_retries_409_503_and_transport_errors() {
    bounded(async {
        let double = api_double::start().await?;
        double.put("nodes", node("edge-1"));
        let path = "/api/v1/nodes/edge-1/status";
        double.fail_next(
            Method::PATCH,
            path,
            &[Fault::Status(409), Fault::Status(503), Fault::Disconnect],
        );
        let (patcher, _trigger) = patcher(&double)?;
        patcher.request("edge-1", 10352);
        ensure!(patcher.wait_idle(WAIT).await, "patch never finished");
        let reqs = double.requests_to(&Method::PATCH, path);
        ensure!(
            statuses(&reqs) == [409, 503, 0, 200],
            "want 409, 503, dropped, then success: {:?}",
            statuses(&reqs)
        );
        ensure!(reqs.iter().all(|r| r.body == reqs[0].body), "bodies differ");
        ensure!(kubelet_port(&double, "edge-1") == Some(10352));
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn status_patch_against_api_double_stops_on_404() {
    bounded(async {
        let double = api_double::start().await?;
        let (patcher, _trigger) = patcher(&double)?;
        patcher.request("ghost", 10351);
        ensure!(patcher.wait_idle(WAIT).await, "patch never finished");
        // The worker has exited: nothing can send another request.
        let reqs = double.requests();
        ensure!(
            statuses(&reqs) == [404],
            "want one 404 and nothing more: {reqs:#?}"
        );
        ensure!(reqs[0].path == "/api/v1/nodes/ghost/status");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn status_patch_against_api_double_gives_up_after_bounded_attempts() {
    bounded(async {
        let double = api_double::start().await?;
        double.put("nodes", node("edge-1"));
        let path = "/api/v1/nodes/edge-1/status";
        double.fail_next(Method::PATCH, path, &[Fault::Status(500); 20]);
        let (patcher, _trigger) = patcher(&double)?;
        patcher.request("edge-1", 10351);
        ensure!(patcher.wait_idle(WAIT).await, "patcher never gave up");
        let n = double.requests_to(&Method::PATCH, path).len();
        ensure!(
            n == 10,
            "want exactly the 10 attempts of the policy, got {n}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn status_patch_against_api_double_coalesces_bursts_and_keeps_nodes_apart() {
    bounded(async {
        let double = api_double::start().await?;
        double.put("nodes", node("busy"));
        double.put("nodes", node("calm"));
        let busy = "/api/v1/nodes/busy/status";
        // The busy node's first patch fails; while its worker backs off, a
        // burst of reconnects asks for ever newer ports.
        double.fail_next(Method::PATCH, busy, &[Fault::Status(503)]);
        let (trigger, shutdown) = Shutdown::new(Duration::ZERO);
        let slow = RetryPolicy {
            base: Duration::from_secs(2),
            max: Duration::from_secs(2),
            attempts: 5,
        };
        let patcher = KubeletPortPatcher::new(&cluster(&double, "r1")?, slow, shutdown);
        patcher.request("busy", 10351);
        ensure!(
            double
                .wait_for(WAIT, |log| log.iter().any(|r| r.path == busy))
                .await
        );
        for port in 10400..10500 {
            patcher.request("busy", port);
        }
        // Another node is not held up by the busy one's backoff.
        patcher.request("calm", 10351);
        ensure!(
            double
                .wait_for(WAIT, |log| log
                    .iter()
                    .any(|r| r.path == "/api/v1/nodes/calm/status" && r.status == 200))
                .await
        );
        ensure!(
            patcher.pending() >= 1 && kubelet_port(&double, "busy") == Some(10250),
            "the calm node had to wait for the busy one"
        );
        ensure!(patcher.wait_idle(WAIT).await);
        let reqs = double.requests_to(&Method::PATCH, busy);
        ensure!(
            statuses(&reqs) == [503, 200],
            "a burst of 100 must coalesce into one more patch: {:?}",
            statuses(&reqs)
        );
        ensure!(reqs[1].json()["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == 10499);
        ensure!(kubelet_port(&double, "busy") == Some(10499));
        drop(trigger);
        Ok(())
    })
    .await;
}

// ---- tunnel-port record ----

fn spec(ip: &str) -> anyhow::Result<ClaimSpec> {
    let mut s = ClaimSpec::new(ip.parse::<IpAddr>()?);
    s.retry = RetryPolicy {
        base: Duration::from_millis(5),
        max: Duration::from_millis(100),
        attempts: 30,
    };
    Ok(s)
}

fn record(double: &ApiDouble) -> serde_json::Value {
    let cm = double
        .get("configmaps", NS, "tunnelport")
        .expect("the tunnelport configmap exists");
    serde_json::from_str(
        cm["metadata"]["annotations"][RECORD_ANNOTATION]
            .as_str()
            .expect("annotation"),
    )
    .expect("annotation is json")
}

#[tokio::test]
async fn tunnel_port_claim_against_api_double_creates_the_record() {
    bounded(async {
        let double = api_double::start().await?;
        let claim = TunnelPortClaim::claim(&cluster(&double, "r1")?, &spec("10.0.0.5")?).await?;
        ensure!(claim.port() == 10350, "port {}", claim.port());
        let reqs = double.requests();
        ensure!(
            reqs.iter()
                .map(|r| (r.method.clone(), r.path.as_str(), r.status))
                .collect::<Vec<_>>()
                == [
                    (Method::GET, CM_PATH, 404),
                    (Method::POST, "/api/v1/namespaces/tether/configmaps", 201)
                ],
            "{reqs:#?}"
        );
        ensure!(reqs[1].params() == [("fieldManager".into(), "tether-cloud".into())].into());
        let cm = double
            .get("configmaps", NS, "tunnelport")
            .context("created")?;
        ensure!(
            cm["metadata"]["annotations"][RECORD_ANNOTATION]
                == r#"{"ipTunnelPort":{"10.0.0.5":10350},"port":{"10350":true}}"#,
            "annotation {}",
            cm["metadata"]["annotations"]
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_port_claim_against_api_double_concurrent_replicas_never_share_a_port() {
    bounded(async {
        let double = api_double::start().await?;
        let mut ports = Vec::new();
        // Round 1 races on creating the ConfigMap, round 2 on replacing it:
        // the gate makes every replica read the same version first.
        for round in [
            ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
            ["10.0.0.4", "10.0.0.5", "10.0.0.6"],
        ] {
            double.gate(Method::GET, CM_PATH, round.len());
            let mut tasks = tokio::task::JoinSet::new();
            for ip in round {
                let (c, s) = (cluster(&double, ip)?, spec(ip)?);
                tasks.spawn(async move { TunnelPortClaim::claim(&c, &s).await });
            }
            while let Some(r) = tasks.join_next().await {
                ports.push(r??.port());
            }
        }
        let mut unique = ports.clone();
        unique.sort();
        unique.dedup();
        ensure!(unique.len() == 6, "replicas share ports: {ports:?}");
        ensure!(unique == (10350..10356).collect::<Vec<_>>(), "{unique:?}");
        let reqs = double.requests();
        ensure!(
            reqs.iter()
                .any(|r| r.method == Method::POST && r.status == 409),
            "the create race never happened"
        );
        ensure!(
            reqs.iter()
                .any(|r| r.method == Method::PUT && r.status == 409),
            "the stale-resourceVersion race never happened"
        );
        // Every write carried the version it read.
        for r in reqs.iter().filter(|r| r.method == Method::PUT) {
            ensure!(
                r.json()["metadata"]["resourceVersion"].is_string(),
                "PUT without resourceVersion"
            );
        }
        let rec = record(&double);
        let ips = rec["ipTunnelPort"].as_object().context("ipTunnelPort")?;
        ensure!(
            ips.len() == 6 && rec["port"].as_object().map(|m| m.len()) == Some(6),
            "{rec}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn tunnel_port_claim_against_api_double_restart_keeps_the_port() {
    bounded(async {
        let double = api_double::start().await?;
        let a = TunnelPortClaim::claim(&cluster(&double, "a")?, &spec("10.0.0.5")?).await?;
        let b = TunnelPortClaim::claim(&cluster(&double, "b")?, &spec("10.0.0.6")?).await?;
        ensure!((a.port(), b.port()) == (10350, 10351));
        let writes = |d: &ApiDouble| {
            d.requests()
                .iter()
                .filter(|r| r.method != Method::GET)
                .count()
        };
        let before = writes(&double);
        // Replica a restarts without releasing (a crash): same IP, same port,
        // and nothing to write.
        drop(a);
        let again = TunnelPortClaim::claim(&cluster(&double, "a")?, &spec("10.0.0.5")?).await?;
        ensure!(again.port() == 10350, "port {}", again.port());
        ensure!(writes(&double) == before, "a kept claim must not write");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn tunnel_port_claim_against_api_double_release_frees_both_entries() {
    bounded(async {
        let double = api_double::start().await?;
        let a = TunnelPortClaim::claim(&cluster(&double, "a")?, &spec("10.0.0.5")?).await?;
        let _b = TunnelPortClaim::claim(&cluster(&double, "b")?, &spec("10.0.0.6")?).await?;
        // Someone writes between our read and write on release: a 409.
        double.fail_next(Method::PUT, CM_PATH, &[Fault::Status(409)]);
        a.release().await?;
        let rec = record(&double);
        ensure!(
            rec == json!({"ipTunnelPort": {"10.0.0.6": 10351}, "port": {"10351": true}}),
            "release must drop both entries: {rec}"
        );
        // The freed port is free again.
        let c = TunnelPortClaim::claim(&cluster(&double, "c")?, &spec("10.0.0.7")?).await?;
        ensure!(c.port() == 10350, "port {}", c.port());
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn tunnel_port_claim_against_api_double_refuses_a_taken_fixed_port() {
    bounded(async {
        let double = api_double::start().await?;
        let _a = TunnelPortClaim::claim(&cluster(&double, "a")?, &spec("10.0.0.5")?).await?;
        let mut s = spec("10.0.0.6")?;
        s.fixed = Some(10350);
        let err = TunnelPortClaim::claim(&cluster(&double, "b")?, &s)
            .await
            .expect_err("port 10350 is taken");
        ensure!(
            matches!(err, ClaimError::Taken { port: 10350, .. }),
            "{err}"
        );
        s.fixed = Some(10400);
        let b = TunnelPortClaim::claim(&cluster(&double, "b")?, &s).await?;
        ensure!(b.port() == 10400);
        Ok(())
    })
    .await;
}

// ---- pod cache ----

fn quick_watch() -> PodCacheOptions {
    PodCacheOptions {
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
    }
}

fn pod_lists(double: &ApiDouble) -> Vec<Recorded> {
    double
        .requests_to(&Method::GET, "/api/v1/pods")
        .into_iter()
        .filter(|r| !r.params().contains_key("watch"))
        .collect()
}

fn pod_watches(double: &ApiDouble) -> Vec<Recorded> {
    double
        .requests_to(&Method::GET, "/api/v1/pods")
        .into_iter()
        .filter(|r| r.params().get("watch").map(String::as_str) == Some("true"))
        .collect()
}

/// A started cache over pods a (node-1), b (node-2) and an unscheduled c.
async fn started_cache(double: &ApiDouble) -> anyhow::Result<(PodCache, ShutdownTrigger)> {
    double.put("pods", pod("default", "a", Some("node-1")));
    double.put("pods", pod("kube-system", "b", Some("node-2")));
    double.put("pods", pod("default", "c", None));
    let (trigger, shutdown) = Shutdown::new(Duration::ZERO);
    let cache = PodCache::start(&cluster(double, "r1")?, quick_watch(), shutdown);
    ensure!(cache.wait_ready(WAIT).await, "initial list never loaded");
    ensure!(
        double.wait_for(WAIT, |_| double.open_watches() == 1).await,
        "no watch opened"
    );
    Ok((cache, trigger))
}

#[tokio::test]
async fn pod_cache_against_api_double_lists_then_follows_the_watch() {
    bounded(async {
        let double = api_double::start().await?;
        let (cache, _t) = started_cache(&double).await?;
        ensure!(cache.node_of("default", "a").as_deref() == Some("node-1"));
        ensure!(cache.node_of("kube-system", "b").as_deref() == Some("node-2"));
        ensure!(
            cache.node_of("default", "c").is_none(),
            "unscheduled pods are not kept"
        );
        ensure!(
            cache.node_of("default", "b").is_none(),
            "namespaces are apart"
        );
        let lists = pod_lists(&double);
        ensure!(lists.len() == 1, "{lists:#?}");
        let p = lists[0].params();
        ensure!(
            p.get("fieldSelector").map(String::as_str) == Some("spec.nodeName!="),
            "{p:?}"
        );
        ensure!(p.get("limit").map(String::as_str) == Some("500"), "{p:?}");
        let w = pod_watches(&double)[0].params();
        ensure!(
            w.get("fieldSelector").map(String::as_str) == Some("spec.nodeName!="),
            "{w:?}"
        );
        // A consistent (not cached) paginated list; the watch resumes at the
        // version the list answered (3: three objects were stored).
        ensure!(!p.contains_key("resourceVersion"), "{p:?}");
        ensure!(
            w.get("resourceVersion").map(String::as_str) == Some("3"),
            "{w:?}"
        );
        // Add, move (a pod of the same name recreated elsewhere), delete.
        double.put("pods", pod("default", "d", Some("node-3")));
        double.put("pods", pod("default", "a", Some("node-3")));
        double.delete("pods", "kube-system", "b");
        ensure!(
            cache
                .wait_until(WAIT, |c| c.node_of("default", "d").as_deref()
                    == Some("node-3")
                    && c.node_of("default", "a").as_deref() == Some("node-3")
                    && c.node_of("kube-system", "b").is_none())
                .await,
            "watch events not applied: a={:?} b={:?} d={:?}",
            cache.node_of("default", "a"),
            cache.node_of("kube-system", "b"),
            cache.node_of("default", "d")
        );
        // Scheduling c later makes it appear.
        double.put("pods", pod("default", "c", Some("node-1")));
        ensure!(
            cache
                .wait_until(WAIT, |c| c.node_of("default", "c").as_deref()
                    == Some("node-1"))
                .await
        );
        ensure!(cache.len() == 3, "len {}", cache.len());
        ensure!(pod_lists(&double).len() == 1, "no relist without a reason");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn pod_cache_against_api_double_survives_a_watch_restart() {
    bounded(async {
        let double = api_double::start().await?;
        let (cache, _t) = started_cache(&double).await?;
        let first_rv: u64 = pod_watches(&double)[0].params()["resourceVersion"].parse()?;
        // The watch ends (apiserver timeout); changes made before the client
        // re-watches must be replayed from the version it resumes at.
        double.end_watches();
        double.put("pods", pod("default", "e", Some("node-9")));
        double.delete("pods", "default", "a");
        ensure!(
            cache
                .wait_until(WAIT, |c| c.node_of("default", "e").as_deref()
                    == Some("node-9")
                    && c.node_of("default", "a").is_none())
                .await,
            "changes around the restart were lost: {:#?}",
            double.requests()
        );
        let watches = pod_watches(&double);
        ensure!(watches.len() >= 2, "never re-watched");
        let resumed: u64 = watches[1].params()["resourceVersion"].parse()?;
        ensure!(
            resumed >= first_rv,
            "re-watch went back in time: {resumed} < {first_rv}"
        );
        ensure!(
            pod_lists(&double).len() == 1,
            "a plain restart must not relist"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn pod_cache_against_api_double_relists_after_410_gone() {
    bounded(async {
        let double = api_double::start().await?;
        let (cache, _t) = started_cache(&double).await?;
        // Changes the watch never hears of, then 410 Gone: only a relist
        // can bring the cache back in step.
        double.put_unseen("pods", pod("default", "a", Some("node-7")));
        double.delete_unseen("pods", "kube-system", "b");
        double.put_unseen("pods", pod("default", "f", Some("node-8")));
        double.expire_watches();
        ensure!(
            cache
                .wait_until(WAIT, |c| c.node_of("default", "a").as_deref()
                    == Some("node-7")
                    && c.node_of("kube-system", "b").is_none()
                    && c.node_of("default", "f").as_deref() == Some("node-8"))
                .await,
            "cache did not relist after 410 Gone"
        );
        ensure!(pod_lists(&double).len() == 2, "want exactly one relist");
        // And it keeps following the new watch.
        ensure!(double.wait_for(WAIT, |_| double.open_watches() == 1).await);
        double.put("pods", pod("default", "g", Some("node-1")));
        ensure!(
            cache
                .wait_until(WAIT, |c| c.node_of("default", "g").as_deref()
                    == Some("node-1"))
                .await
        );
        Ok(())
    })
    .await;
}

// ---- iptables-manager's ConfigMap source ----

async fn next(
    source: &mut ConfigMapSource,
) -> Result<tether_iptables_manager::Records, SourceError> {
    tokio::time::timeout(WAIT, source.next())
        .await
        .expect("source stalled")
}

fn tunnelport_cm(annotation: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "tunnelport", "namespace": NS,
                     "annotations": {RECORD_ANNOTATION: annotation}},
    })
}

#[tokio::test]
async fn configmap_source_against_api_double_parses_the_annotation() {
    bounded(async {
        let double = api_double::start().await?;
        // An unrelated ConfigMap in the namespace must not count.
        double.put(
            "configmaps",
            json!({"metadata": {"name": "other", "namespace": NS,
                   "annotations": {RECORD_ANNOTATION: "{not json"}}}),
        );
        let mut source = ConfigMapSource::new(
            &cluster(&double, "iptables-manager")?,
            NS,
            "tunnelport",
            10350..=10999,
            Duration::from_millis(20),
            Duration::from_millis(200),
        );
        // Missing ConfigMap: nobody holds a port.
        ensure!(next(&mut source).await?.entries.is_empty());
        let w = double
            .requests()
            .into_iter()
            .find(|r| r.path == "/api/v1/namespaces/tether/configmaps")
            .context("no list")?;
        ensure!(
            w.params().get("fieldSelector").map(String::as_str) == Some("metadata.name=tunnelport")
        );
        double.put(
            "configmaps",
            tunnelport_cm(r#"{"ipTunnelPort":{"10.0.0.5":10351},"port":{"10351":true}}"#),
        );
        let recs = next(&mut source).await?;
        ensure!(recs.entries.len() == 1);
        ensure!(recs.entries[0].port == 10351 && recs.entries[0].replica.to_string() == "10.0.0.5");
        double.put(
            "configmaps",
            tunnelport_cm(
                r#"{"ipTunnelPort":{"10.0.0.5":10351,"fd00::6":10352},"port":{"10351":true,"10352":true}}"#,
            ),
        );
        ensure!(next(&mut source).await?.entries.len() == 2);
        double.put("configmaps", tunnelport_cm(r#"{"ipTunnelPort":{"10.0.0.5":80}}"#));
        match next(&mut source).await {
            Err(SourceError::Invalid { origin, cause }) => ensure!(
                origin == "configmap://tether/tunnelport"
                    && cause.to_string().contains("outside the allowed range"),
                "{origin}: {cause}"
            ),
            other => anyhow::bail!("want an invalid-record error, got {other:?}"),
        }
        double.delete("configmaps", NS, "tunnelport");
        ensure!(next(&mut source).await?.entries.is_empty());
        Ok(())
    })
    .await;
}

// ---- through the real front and tunnel ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_cache_against_api_double_routes_logs_through_the_front() {
    bounded(async {
        let double = api_double::start().await?;
        double.put("pods", pod("default", "web", Some("edge-1")));
        double.put("pods", pod("shop", "db", Some("edge-2")));
        double.put("pods", pod("shop", "gone", Some("edge-9")));
        let (_trigger, shutdown) = Shutdown::new(Duration::ZERO);
        let cache = PodCache::start(&cluster(&double, "r1")?, quick_watch(), shutdown);
        ensure!(cache.wait_ready(WAIT).await);
        ensure!(double.wait_for(WAIT, |_| double.open_watches() == 1).await);
        let pki = Pki::generate()?;
        let cloud = CloudHandle::start(
            &pki,
            CloudSpec {
                pod_locator: Some(cache.locator()),
                ..CloudSpec::default()
            },
        )
        .await?;
        let (k1, k2) = (
            FixtureKubelet::start(None).await?,
            FixtureKubelet::start(None).await?,
        );
        // No IP SANs: neither Host nor a DNAT'd destination can name them.
        let e1 = EdgeHandle::start(&pki, cloud.tunnel_addr, EdgeSpec::new("edge-1", k1.addr))?;
        let e2 = EdgeHandle::start(&pki, cloud.tunnel_addr, EdgeSpec::new("edge-2", k2.addr))?;
        for n in ["edge-1", "edge-2"] {
            cloud
                .registry
                .wait_for_node(n, None, WAIT)
                .await
                .with_context(|| format!("{n} never connected"))?;
        }
        let tls = pki.apiserver_tls()?;
        let front_host = cloud.front_addr.to_string();
        let (parts, _) = kubectl::get(
            cloud.front_conn(tls.clone()).await?,
            &front_host,
            "/containerLogs/shop/db/main?bytes=64",
        )
        .await?;
        ensure!(parts.status == 200, "status {}", parts.status);
        ensure!(
            (k1.requests(), k2.requests()) == (0, 1),
            "went to the wrong node"
        );
        let (parts, _) = kubectl::get(
            cloud.front_conn(tls.clone()).await?,
            "localhost",
            "/containerLogs/default/web/app?bytes=64",
        )
        .await?;
        ensure!(parts.status == 200, "status {}", parts.status);
        ensure!(
            (k1.requests(), k2.requests()) == (1, 1),
            "went to the wrong node"
        );
        // A pod on a node without a session, and one the cache does not know.
        let (parts, body) = kubectl::get(
            cloud.front_conn(tls.clone()).await?,
            "localhost",
            "/containerLogs/shop/gone/main",
        )
        .await?;
        ensure!(parts.status == 404);
        ensure!(
            String::from_utf8_lossy(&body).contains("pod shop/gone on node edge-9"),
            "{body:?}"
        );
        let (parts, body) = kubectl::get(
            cloud.front_conn(tls).await?,
            "localhost",
            "/containerLogs/shop/nope/main",
        )
        .await?;
        ensure!(parts.status == 404);
        ensure!(
            String::from_utf8_lossy(&body).contains("not in the pod cache"),
            "{body:?}"
        );
        // One list and one watch: no API request per kubelet request.
        ensure!(double.requests().len() == 2, "{:#?}", double.requests());
        e1.stop().await;
        e2.stop().await;
        cloud.stop().await;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_patch_against_api_double_follows_edge_connects() {
    bounded(async {
        let double = api_double::start().await?;
        double.put("nodes", node("edge-1"));
        let (_trigger, shutdown) = Shutdown::new(Duration::ZERO);
        let patcher = KubeletPortPatcher::new(&cluster(&double, "r1")?, quick_retry(), shutdown);
        let hook = {
            let patcher = patcher.clone();
            std::sync::Arc::new(move |ev: &tether_tunnel::TunnelEvent<'_>| {
                if let tether_tunnel::TunnelEvent::Connected { info, .. } = ev {
                    patcher.request(&info.node, 10357);
                }
            }) as tether_cloudstream::SessionHook
        };
        let pki = Pki::generate()?;
        let cloud = CloudHandle::start(
            &pki,
            CloudSpec {
                session_hook: Some(hook),
                ..CloudSpec::default()
            },
        )
        .await?;
        let kubelet = FixtureKubelet::start(None).await?;
        let edge = EdgeHandle::start(
            &pki,
            cloud.tunnel_addr,
            EdgeSpec::new("edge-1", kubelet.addr),
        )?;
        let path = "/api/v1/nodes/edge-1/status";
        ensure!(
            double
                .wait_for(WAIT, |log| log
                    .iter()
                    .any(|r| r.path == path && r.status == 200))
                .await,
            "no patch after the edge connected"
        );
        ensure!(kubelet_port(&double, "edge-1") == Some(10357));
        edge.stop().await;
        cloud.stop().await;
        Ok(())
    })
    .await;
}

// ---- ownership leases (several replicas) ----

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/tether/leases";

fn lease_path(name: &str) -> String {
    format!("{LEASES}/{name}")
}

fn quick_leases(seconds: u64) -> LeaseOptions {
    LeaseOptions {
        lease_duration: Duration::from_secs(seconds),
        retry: quick_retry(),
        watch_backoff_base: Duration::from_millis(20),
        watch_backoff_max: Duration::from_millis(200),
        resign_timeout: Duration::from_secs(5),
    }
}

/// A replica's ownership records, with its cache loaded and its own Lease
/// written.
async fn replica(
    double: &ApiDouble,
    id: &str,
    addr: &str,
    seconds: u64,
) -> anyhow::Result<(Arc<LeaseOwnership>, ShutdownTrigger)> {
    let (trigger, shutdown) = Shutdown::new(Duration::ZERO);
    let own = LeaseOwnership::start(
        &cluster(double, id)?,
        addr.parse()?,
        quick_leases(seconds),
        shutdown,
    )?;
    ensure!(own.wait_ready(WAIT).await, "{id}: lease cache never loaded");
    let key = (NS.to_owned(), format!("tether-replica-{id}"));
    ensure!(
        double
            .wait_for_objects(WAIT, |o| o
                .get("leases")
                .is_some_and(|m| m.contains_key(&key)))
            .await,
        "{id}: replica lease never written"
    );
    Ok((own, trigger))
}

fn micro(t: Timestamp) -> serde_json::Value {
    serde_json::to_value(MicroTime(t)).expect("a time serializes")
}

/// Another replica's Lease, as that replica would keep it, last renewed
/// `secs_ago` seconds ago with a 15 s duration.
fn replica_lease(id: &str, addr: &str, secs_ago: i64) -> serde_json::Value {
    let renewed = Timestamp::now() - SignedDuration::from_secs(secs_ago);
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {
            "name": format!("tether-replica-{id}"), "namespace": NS,
            "labels": {"app.kubernetes.io/name": "tether", "tether.dev/lease": "replica"},
            "annotations": {"tether.dev/peer-address": addr},
        },
        "spec": {"holderIdentity": id, "leaseDurationSeconds": 15,
                 "acquireTime": micro(renewed), "renewTime": micro(renewed)},
    })
}

/// A node Lease held by `holder` since a minute ago.
fn node_lease(node: &str, holder: &str) -> serde_json::Value {
    let at = micro(Timestamp::now() - SignedDuration::from_secs(60));
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {
            "name": format!("tether-node-{node}"), "namespace": NS,
            "labels": {"app.kubernetes.io/name": "tether", "tether.dev/lease": "node",
                       "tether.dev/node": node},
        },
        "spec": {"holderIdentity": holder, "acquireTime": at, "renewTime": at},
    })
}

fn lease_holder(double: &ApiDouble, name: &str) -> Option<String> {
    double.get("leases", NS, name)?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

fn peer(replica: &str, addr: &str) -> Option<PeerAddr> {
    Some(PeerAddr {
        replica: replica.to_owned(),
        addr: addr.parse().expect("address"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_against_api_double_claim_creates_and_the_newest_claim_takes_over() {
    bounded(async {
        let double = api_double::start().await?;
        let (a, _ta) = replica(&double, "r-a", "10.0.0.1:7001", 15).await?;
        let (b, _tb) = replica(&double, "r-b", "10.0.0.2:7001", 15).await?;
        let name = "tether-node-edge-1";
        let path = lease_path(name);
        a.claim(&session("edge-1"));
        ensure!(a.wait_idle(WAIT).await, "claim never written");
        ensure!(statuses(&double.requests_to(&Method::GET, &path)) == [404]);
        let posts: Vec<Recorded> = double
            .requests_to(&Method::POST, LEASES)
            .into_iter()
            .filter(|r| r.json()["metadata"]["name"] == name)
            .collect();
        ensure!(statuses(&posts) == [201], "{posts:#?}");
        ensure!(posts[0].params() == [("fieldManager".into(), "tether-cloud".into())].into());
        let body = posts[0].json();
        ensure!(
            body["metadata"]["labels"]
                == json!({"app.kubernetes.io/name": "tether", "tether.dev/lease": "node",
                          "tether.dev/node": "edge-1"}),
            "labels {}",
            body["metadata"]["labels"]
        );
        let spec = &body["spec"];
        ensure!(
            spec["holderIdentity"] == "r-a" && spec["leaseTransitions"] == 0,
            "{spec}"
        );
        ensure!(spec["acquireTime"].is_string(), "{spec}");
        ensure!(
            spec.get("leaseDurationSeconds").is_none(),
            "a node lease lives by its holder's replica lease: {spec}"
        );
        let created_rv =
            double.get("leases", NS, name).context("created")?["metadata"]["resourceVersion"]
                .clone();

        // Both replicas claim at once, B last. The gate makes both read the
        // same version, so one PUT is stale: the double answers 409 and that
        // replica reads again. B's claim is the newer and wins either way.
        double.gate(Method::GET, &path, 2);
        a.claim(&session("edge-1"));
        b.claim(&session("edge-1"));
        ensure!(a.wait_idle(WAIT).await && b.wait_idle(WAIT).await);
        let puts = double.requests_to(&Method::PUT, &path);
        ensure!(
            puts.iter().filter(|r| r.status == 409).count() == 1,
            "want exactly one stale write: {:?}",
            statuses(&puts)
        );
        ensure!(
            puts[..2]
                .iter()
                .all(|r| r.json()["metadata"]["resourceVersion"] == created_rv),
            "the racing writes must carry the version both read"
        );
        ensure!(lease_holder(&double, name).as_deref() == Some("r-b"));
        let stored = double.get("leases", NS, name).context("stored")?;
        ensure!(
            stored["spec"]["leaseTransitions"] == 1,
            "{}",
            stored["spec"]
        );

        // A scripted stale write: B reads again and writes again.
        let before = double.requests_to(&Method::PUT, &path).len();
        double.fail_next(Method::PUT, &path, &[Fault::Status(409)]);
        b.claim(&session("edge-1"));
        ensure!(b.wait_idle(WAIT).await);
        let puts = double.requests_to(&Method::PUT, &path);
        ensure!(
            statuses(&puts[before..]) == [409, 200],
            "{:?}",
            statuses(&puts)
        );
        ensure!(lease_holder(&double, name).as_deref() == Some("r-b"));
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_against_api_double_release_keeps_another_replicas_record() {
    bounded(async {
        let double = api_double::start().await?;
        let (a, _ta) = replica(&double, "r-a", "10.0.0.1:7001", 15).await?;
        let (b, _tb) = replica(&double, "r-b", "10.0.0.2:7001", 15).await?;
        let name = "tether-node-edge-1";
        let path = lease_path(name);
        a.claim(&session("edge-1"));
        ensure!(a.wait_idle(WAIT).await);
        b.claim(&session("edge-1"));
        ensure!(b.wait_idle(WAIT).await);
        ensure!(lease_holder(&double, name).as_deref() == Some("r-b"));
        // A's old session ends after B took the node over: nothing to delete.
        a.release("edge-1");
        ensure!(a.wait_idle(WAIT).await);
        ensure!(
            double.requests_to(&Method::DELETE, &path).is_empty(),
            "a release by a replica that no longer holds the node deleted it"
        );
        ensure!(lease_holder(&double, name).as_deref() == Some("r-b"));

        // A release racing a takeover: both read the record naming A. If the
        // delete lands second its precondition is stale (409) and A reads
        // again; if first, B's write finds nothing and creates. B holds it.
        a.claim(&session("edge-1"));
        ensure!(a.wait_idle(WAIT).await);
        ensure!(lease_holder(&double, name).as_deref() == Some("r-a"));
        double.gate(Method::GET, &path, 2);
        a.release("edge-1");
        b.claim(&session("edge-1"));
        ensure!(a.wait_idle(WAIT).await && b.wait_idle(WAIT).await);
        ensure!(
            lease_holder(&double, name).as_deref() == Some("r-b"),
            "a racing release removed the newer claim: {:#?}",
            double.requests()
        );

        // The holder releases with the version it read as a precondition; a
        // stale one (scripted 409) is read again and retried.
        let rv = double.get("leases", NS, name).context("stored")?["metadata"]["resourceVersion"]
            .clone();
        let before = double.requests_to(&Method::DELETE, &path).len();
        double.fail_next(Method::DELETE, &path, &[Fault::Status(409)]);
        b.release("edge-1");
        ensure!(b.wait_idle(WAIT).await);
        let dels = double.requests_to(&Method::DELETE, &path);
        ensure!(
            statuses(&dels[before..]) == [409, 200],
            "{:?}",
            statuses(&dels)
        );
        for d in &dels[before..] {
            ensure!(
                d.json()["preconditions"]["resourceVersion"] == rv,
                "delete without the version read: {}",
                d.json()
            );
        }
        ensure!(double.get("leases", NS, name).is_none());
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_against_api_double_owner_resolves_through_the_replica_lease() {
    bounded(async {
        let double = api_double::start().await?;
        let (a, _ta) = replica(&double, "r-a", "10.0.0.1:7001", 15).await?;
        let (b, _tb) = replica(&double, "r-b", "10.0.0.2:7002", 15).await?;
        a.claim(&session("edge-1"));
        ensure!(
            b.wait_until(WAIT, |b| b.owner("edge-1") == peer("r-a", "10.0.0.1:7001"))
                .await,
            "B never found A: {:?}",
            b.owner("edge-1")
        );
        ensure!(
            a.owner("edge-1").is_none(),
            "a replica never forwards to itself"
        );
        ensure!(b.owner("edge-2").is_none(), "nobody holds edge-2");
        // The record carries the node's addresses and endpoints: B routes by
        // address and lists the node in its service discovery.
        ensure!(
            b.owner_of_ip("10.0.0.7".parse()?)
                == Some((
                    "edge-1".into(),
                    peer("r-a", "10.0.0.1:7001").context("peer")?
                )),
            "by address: {:?}",
            b.owner_of_ip("10.0.0.7".parse()?)
        );
        ensure!(b.owner_of_ip("10.0.0.8".parse()?).is_none());
        let held = b.remote_nodes();
        ensure!(
            held.len() == 1
                && held[0].node == "edge-1"
                && held[0].replica == "r-a"
                && held[0].endpoints == ["127.0.0.1:9100".parse::<std::net::SocketAddr>()?],
            "remote nodes: {held:?}"
        );
        ensure!(
            a.remote_nodes().is_empty(),
            "a's own nodes are not remote to it"
        );

        // A replica that stopped renewing a minute ago is dead. The edge-3
        // record comes last: once B sees it, it has seen the others.
        double.put("leases", replica_lease("r-dead", "10.0.0.9:7001", 60));
        double.put("leases", node_lease("edge-2", "r-dead"));
        double.put("leases", node_lease("edge-3", "r-a"));
        ensure!(
            b.wait_until(WAIT, |b| b.owner("edge-3").is_some()).await,
            "watch events not applied"
        );
        ensure!(
            b.owner("edge-2").is_none(),
            "forwarded to an expired replica"
        );
        // Renewed again: alive.
        double.put("leases", replica_lease("r-dead", "10.0.0.9:7001", 0));
        ensure!(
            b.wait_until(WAIT, |b| b.owner("edge-2")
                == peer("r-dead", "10.0.0.9:7001"))
                .await
        );
        // Gone (shut down): nobody to forward to.
        double.delete("leases", NS, "tether-replica-r-dead");
        ensure!(b.wait_until(WAIT, |b| b.owner("edge-2").is_none()).await);

        // Names that cannot name a Lease are refused before any request.
        let posts = double.requests_to(&Method::POST, LEASES).len();
        let too_long = "a".repeat(242);
        a.claim(&session("Edge_1"));
        a.claim(&session(&too_long));
        ensure!(a.pending() == 0, "a refused name was queued");
        ensure!(double.requests_to(&Method::POST, LEASES).len() == posts);
        ensure!(
            double
                .requests()
                .iter()
                .all(|r| !r.path.contains("Edge_1") && !r.path.contains(&too_long))
        );
        ensure!(b.owner("Edge_1").is_none() && b.owner(&too_long).is_none());
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_against_api_double_cache_survives_a_watch_restart_and_410_gone() {
    bounded(async {
        let double = api_double::start().await?;
        let (b, _tb) = replica(&double, "r-b", "10.0.0.2:7002", 15).await?;
        double.put("leases", replica_lease("r-x", "10.0.0.7:7001", 0));
        double.put("leases", replica_lease("r-y", "10.0.0.8:7001", 0));
        double.put("leases", node_lease("edge-1", "r-x"));
        ensure!(
            b.wait_until(WAIT, |b| b.owner("edge-1") == peer("r-x", "10.0.0.7:7001"))
                .await
        );
        let lists = || {
            double
                .requests_to(&Method::GET, LEASES)
                .into_iter()
                .filter(|r| !r.params().contains_key("watch"))
                .collect::<Vec<_>>()
        };
        let watches = || {
            double
                .requests_to(&Method::GET, LEASES)
                .into_iter()
                .filter(|r| r.params().get("watch").map(String::as_str) == Some("true"))
                .collect::<Vec<_>>()
        };
        ensure!(lists().len() == 1);
        for r in lists().iter().chain(watches().iter()) {
            ensure!(
                r.params().get("labelSelector").map(String::as_str)
                    == Some("app.kubernetes.io/name=tether"),
                "{:?}",
                r.query
            );
        }
        // The watch ends; a change made before the re-watch is replayed.
        double.end_watches();
        double.put("leases", node_lease("edge-1", "r-y"));
        ensure!(
            b.wait_until(WAIT, |b| b.owner("edge-1") == peer("r-y", "10.0.0.8:7001"))
                .await,
            "change around the restart lost"
        );
        ensure!(watches().len() >= 2, "never re-watched");
        ensure!(lists().len() == 1, "a plain restart must not relist");
        // A change no watch hears of, then 410 Gone: only a relist finds it.
        double.put_unseen("leases", node_lease("edge-1", "r-x"));
        double.expire_watches();
        ensure!(
            b.wait_until(WAIT, |b| b.owner("edge-1") == peer("r-x", "10.0.0.7:7001"))
                .await,
            "cache did not relist after 410 Gone"
        );
        ensure!(lists().len() == 2, "want exactly one relist");
        ensure!(double.wait_for(WAIT, |_| double.open_watches() == 1).await);
        double.put("leases", node_lease("edge-1", "r-y"));
        ensure!(
            b.wait_until(WAIT, |b| b.owner("edge-1") == peer("r-y", "10.0.0.8:7001"))
                .await,
            "the new watch is not followed"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_against_api_double_replica_lease_is_renewed_and_removed_on_shutdown() {
    bounded(async {
        let double = api_double::start().await?;
        let (b, _tb) = replica(&double, "r-b", "10.0.0.2:7002", 15).await?;
        let (a, ta) = replica(&double, "r-a", "10.0.0.1:7001", 1).await?;
        let name = "tether-replica-r-a";
        let path = lease_path(name);
        let first = double.get("leases", NS, name).context("written")?;
        ensure!(
            first["metadata"]["labels"]
                == json!({"app.kubernetes.io/name": "tether", "tether.dev/lease": "replica"}),
            "{}",
            first["metadata"]
        );
        ensure!(
            first["metadata"]["annotations"] == json!({"tether.dev/peer-address": "10.0.0.1:7001"})
        );
        let spec = &first["spec"];
        ensure!(
            spec["holderIdentity"] == "r-a" && spec["leaseDurationSeconds"] == 1,
            "{spec}"
        );
        let start: Timestamp = spec["renewTime"].as_str().context("renewTime")?.parse()?;
        a.claim(&session("edge-1"));
        ensure!(a.wait_idle(WAIT).await);

        // Renewed every third of a second, each PUT from the version last
        // written, until the Lease has outlived its 1 s duration.
        let renewed = |d: &ApiDouble| -> Option<Timestamp> {
            d.get("leases", NS, name)?["spec"]["renewTime"]
                .as_str()?
                .parse()
                .ok()
        };
        let outlived = start + SignedDuration::from_millis(1500);
        ensure!(
            double
                .wait_for_objects(WAIT, |_| renewed(&double).is_some_and(|t| t > outlived))
                .await,
            "never renewed past its duration"
        );
        let puts = double.requests_to(&Method::PUT, &path);
        ensure!(puts.len() >= 4, "{} renewals", puts.len());
        ensure!(
            puts.iter().all(|r| r.status == 200),
            "{:?}",
            statuses(&puts)
        );
        let times: Vec<Timestamp> = puts
            .iter()
            .map(|r| r.json()["spec"]["renewTime"].as_str().unwrap_or("").parse())
            .collect::<Result<_, _>>()?;
        ensure!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
        ensure!(
            b.owner("edge-1") == peer("r-a", "10.0.0.1:7001"),
            "a renewed replica counted as dead"
        );

        // Graceful shutdown: both leases go, and peers stop forwarding.
        ta.trigger();
        ensure!(a.wait_stopped(WAIT).await, "shutdown never finished");
        ensure!(
            double.get("leases", NS, name).is_none(),
            "replica lease left"
        );
        ensure!(
            double.get("leases", NS, "tether-node-edge-1").is_none(),
            "node lease left"
        );
        let del = double.requests_to(&Method::DELETE, &path);
        ensure!(statuses(&del) == [200]);
        ensure!(del[0].json()["preconditions"]["resourceVersion"].is_string());
        ensure!(b.wait_until(WAIT, |b| b.owner("edge-1").is_none()).await);
        // After shutdown a claim writes nothing.
        a.claim(&session("edge-2"));
        ensure!(a.pending() == 0);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_against_api_double_restart_releases_records_of_an_earlier_run() {
    bounded(async {
        let double = api_double::start().await?;
        // What r-a left when it crashed, and another replica's record.
        double.put("leases", replica_lease("r-a", "10.0.0.1:7001", 5));
        double.put("leases", node_lease("edge-1", "r-a"));
        double.put("leases", node_lease("edge-2", "r-a"));
        double.put("leases", node_lease("edge-3", "r-other"));
        let (_t, shutdown) = Shutdown::new(Duration::ZERO);
        let a = LeaseOwnership::start(
            &cluster(&double, "r-a")?,
            "10.0.0.1:7005".parse()?,
            quick_leases(15),
            shutdown,
        )?;
        // edge-2 reconnects at once; edge-1 does not.
        a.claim(&session("edge-2"));
        ensure!(
            double
                .wait_for_objects(WAIT, |_| double
                    .get("leases", NS, "tether-node-edge-1")
                    .is_none())
                .await,
            "stale record of an earlier run kept"
        );
        ensure!(a.wait_idle(WAIT).await);
        ensure!(lease_holder(&double, "tether-node-edge-2").as_deref() == Some("r-a"));
        ensure!(lease_holder(&double, "tether-node-edge-3").as_deref() == Some("r-other"));
        // Its own Lease is taken over with the new address.
        ensure!(
            double
                .wait_for_objects(WAIT, |_| double
                    .get("leases", NS, "tether-replica-r-a")
                    .is_some_and(|l| l["metadata"]["annotations"]["tether.dev/peer-address"]
                        == "10.0.0.1:7005"))
                .await
        );
        Ok(())
    })
    .await;
}

/// A session of `node` as the tunnel listener reports it.
fn session(node: &str) -> tether_tunnel::SessionInfo {
    tether_tunnel::SessionInfo {
        kind: tether_tunnel::SessionKind::Tether,
        node: node.to_owned(),
        id: 1,
        peer: "127.0.0.1:1".parse().expect("address"),
        ips: vec!["10.0.0.7".parse().expect("address")],
        connected_at: std::time::SystemTime::now(),
        identity: tether_pki::Identity {
            common_name: format!("system:node:{node}"),
            organizations: vec!["system:nodes".to_owned()],
            ips: Vec::new(),
            serial: "1".to_owned(),
            not_before: 0,
            not_after: 0,
        },
        endpoints: vec!["127.0.0.1:9100".parse().expect("address")],
        carries_hub: false,
    }
}
