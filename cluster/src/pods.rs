//! Which node each pod runs on, from a list+watch of pods kept in memory, so
//! that the front can route `/containerLogs/<ns>/<pod>/...` and friends when
//! nothing in the connection or headers names the node, without one API
//! request per kubelet request.
//!
//! kube-runtime's watcher does the list, the watch, the restarts of a watch
//! that ended, and the relist after 410 Gone; this module folds its events
//! into a map. Only scheduled pods are watched (`spec.nodeName!=`) and only
//! `metadata` and `spec.nodeName` are decoded and kept.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher::Config};
use serde::Deserialize;
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use tether_tunnel::Shutdown;

use crate::Cluster;
use crate::retry::WatchBackoff;

/// A pod as far as placement goes; every other field is skipped when decoding.
#[derive(Clone, Debug, Deserialize)]
struct PodPlacement {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: PlacementSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct PlacementSpec {
    #[serde(rename = "nodeName", default)]
    node_name: Option<String>,
}

impl kube::Resource for PodPlacement {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// `(namespace, pod) -> node`, shaped like cloudstream's `PodLocator`
/// (this crate does not depend on cloudstream).
pub type PodLocatorFn = Arc<dyn Fn(&str, &str) -> Option<String> + Send + Sync>;

/// namespace -> pod -> node.
type Index = HashMap<String, HashMap<String, String>>;

/// Tuning of the pod watch.
#[derive(Clone, Debug)]
pub struct PodCacheOptions {
    /// First delay before re-listing or re-watching after an error (default 500 ms).
    pub backoff_base: Duration,
    /// Longest such delay (default 30 s).
    pub backoff_max: Duration,
}

impl Default for PodCacheOptions {
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

struct Shared {
    index: RwLock<Index>,
    /// True once the first complete list is in.
    ready: watch::Sender<bool>,
    /// Bumped on every change of the index.
    version: watch::Sender<u64>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Index)) {
        f(&mut self.index.write().expect("pod cache lock"));
        self.version.send_modify(|v| *v += 1);
    }
}

/// Stops the watch task when the last [`PodCache`] clone goes.
struct TaskGuard(tokio::task::AbortHandle);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The pod-to-node cache. Cheap to clone; the watch stops when the last
/// clone is dropped or at shutdown.
#[derive(Clone)]
pub struct PodCache {
    shared: Arc<Shared>,
    _task: Arc<TaskGuard>,
}

impl PodCache {
    /// Starts listing and watching pods in all namespaces.
    pub fn start(cluster: &Cluster, opts: PodCacheOptions, shutdown: Shutdown) -> Self {
        let shared = Arc::new(Shared {
            index: RwLock::new(Index::new()),
            ready: watch::channel(false).0,
            version: watch::channel(0).0,
        });
        let api: Api<PodPlacement> = Api::all(cluster.client().clone());
        // Default list semantics: consistent, paginated reads, so a relist
        // after 410 Gone never goes back in time.
        let config = Config::default().fields("spec.nodeName!=");
        let events = watcher::watcher(api, config)
            .backoff(WatchBackoff::new(opts.backoff_base, opts.backoff_max));
        let task = tokio::spawn(
            follow(events, shared.clone(), shutdown).instrument(info_span!("pod_cache")),
        );
        Self {
            shared,
            _task: Arc::new(TaskGuard(task.abort_handle())),
        }
    }

    /// The node `namespace/pod` is scheduled on, if the cache knows the pod.
    pub fn node_of(&self, namespace: &str, pod: &str) -> Option<String> {
        let index = self.shared.index.read().expect("pod cache lock");
        index.get(namespace)?.get(pod).cloned()
    }

    /// Pods in the cache.
    pub fn len(&self) -> usize {
        let index = self.shared.index.read().expect("pod cache lock");
        index.values().map(HashMap::len).sum()
    }

    /// True when the cache holds no pod.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once the first complete list has been loaded.
    pub fn is_ready(&self) -> bool {
        *self.shared.ready.borrow()
    }

    /// Waits until the first list is loaded, or `timeout` passes.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.shared.ready.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits until `pred` holds for the cache, or `timeout` passes.
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&Self) -> bool) -> bool {
        let mut rx = self.shared.version.subscribe();
        tokio::time::timeout(timeout, async {
            loop {
                if pred(self) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok()
    }

    /// The cache as the front's pod locator.
    pub fn locator(&self) -> PodLocatorFn {
        let cache = self.clone();
        Arc::new(move |ns, pod| cache.node_of(ns, pod))
    }
}

/// Folds watcher events into the index until shutdown.
async fn follow<S>(events: S, shared: Arc<Shared>, shutdown: Shutdown)
where
    S: futures_util::Stream<Item = Result<Event<PodPlacement>, watcher::Error>> + Send,
{
    futures_util::pin_mut!(events);
    // A relist is collected here and swapped in whole at InitDone, so a
    // lookup never sees a half-loaded cache.
    let mut relist: Option<Index> = None;
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = shutdown.triggered() => return,
        };
        let Some(event) = event else {
            // The watcher stream never ends by itself; be loud if it does.
            warn!("pod watch ended; the pod cache is frozen");
            return;
        };
        match event {
            Ok(Event::Init) => relist = Some(Index::new()),
            Ok(Event::InitApply(pod)) => {
                if let Some(buf) = relist.as_mut() {
                    place(buf, &pod);
                }
            }
            Ok(Event::InitDone) => {
                let fresh = relist.take().unwrap_or_default();
                let pods: usize = fresh.values().map(HashMap::len).sum();
                shared.update(|index| *index = fresh);
                shared.ready.send_replace(true);
                info!(pods, "pod cache loaded");
            }
            Ok(Event::Apply(pod)) => shared.update(|index| place(index, &pod)),
            Ok(Event::Delete(pod)) => shared.update(|index| remove(index, &pod)),
            // The watcher restarts (or relists after 410 Gone) on its own on
            // the next poll, after the backoff delay.
            Err(e) => warn!(error = %e, "pod watch failed; retrying"),
        }
    }
}

fn key(pod: &PodPlacement) -> Option<(&str, &str)> {
    Some((
        pod.metadata.namespace.as_deref()?,
        pod.metadata.name.as_deref()?,
    ))
}

fn place(index: &mut Index, pod: &PodPlacement) {
    let Some((ns, name)) = key(pod) else {
        return;
    };
    match pod.spec.node_name.as_deref().filter(|n| !n.is_empty()) {
        Some(node) => {
            debug!(pod = %format_args!("{ns}/{name}"), node, "pod placed");
            index
                .entry(ns.to_owned())
                .or_default()
                .insert(name.to_owned(), node.to_owned());
        }
        None => remove(index, pod),
    }
}

fn remove(index: &mut Index, pod: &PodPlacement) {
    let Some((ns, name)) = key(pod) else {
        return;
    };
    if let Some(pods) = index.get_mut(ns) {
        pods.remove(name);
        if pods.is_empty() {
            index.remove(ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: &str) -> PodPlacement {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn decodes_only_placement_and_indexes_it() {
        let p = pod(
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web","namespace":"default","resourceVersion":"7"},
                "spec":{"nodeName":"edge-1","containers":[{"name":"app","image":"x"}]},"status":{"phase":"Running"}}"#,
        );
        let mut index = Index::new();
        place(&mut index, &p);
        assert_eq!(index["default"]["web"], "edge-1");
        // Unscheduled again (or never scheduled): forgotten.
        place(
            &mut index,
            &pod(r#"{"metadata":{"name":"web","namespace":"default"}}"#),
        );
        assert!(index.is_empty());
        place(&mut index, &p);
        remove(&mut index, &p);
        assert!(index.is_empty());
    }
}
