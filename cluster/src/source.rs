//! iptables-manager's cluster-mode input: the `tunnelport` ConfigMap's
//! record annotation, watched (not polled) through kube-runtime's watcher,
//! behind iptables-manager's [`RecordSource`] trait so that crate stays free
//! of Kubernetes dependencies.
//!
//! A missing ConfigMap or annotation is an empty record set: no replica holds
//! a port, so no rule is wanted.

use std::future::Future;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Config, Event};

use tether_iptables_manager::{RecordSource, Records, SourceError};

use crate::Cluster;
use crate::retry::WatchBackoff;
use crate::tunnelport::RECORD_ANNOTATION;

/// Parses `configmap://<namespace>/<name>` into its namespace and name.
pub fn configmap_url(url: &str) -> Option<(&str, &str)> {
    let (ns, name) = url.strip_prefix("configmap://")?.split_once('/')?;
    (valid_name(ns) && valid_name(name)).then_some((ns, name))
}

/// Kubernetes object names: RFC 1123 subdomains.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// What the watch says the annotation is now; `None` for absent.
type Seen = Result<Option<String>, String>;

/// Tunnel-port records from a watched ConfigMap annotation.
pub struct ConfigMapSource {
    origin: String,
    range: RangeInclusive<u16>,
    events: BoxStream<'static, Result<Event<ConfigMap>, watcher::Error>>,
    /// The annotation as of the last complete list or event.
    current: Option<String>,
    /// Set between Init and InitDone: the relist being collected.
    relist: Option<Option<String>>,
    /// What `next` last reported, so unchanged content never resolves again.
    reported: Option<Seen>,
}

impl ConfigMapSource {
    /// Watches `namespace/name` in `cluster`. Watch errors are retried after
    /// a jittered delay from `retry_base` up to `retry_max`.
    pub fn new(
        cluster: &Cluster,
        namespace: &str,
        name: &str,
        range: RangeInclusive<u16>,
        retry_base: Duration,
        retry_max: Duration,
    ) -> Self {
        let api: Api<ConfigMap> = Api::namespaced(cluster.client().clone(), namespace);
        let config = Config::default().fields(&format!("metadata.name={name}"));
        let events = watcher::watcher(api, config)
            .backoff(WatchBackoff::new(retry_base, retry_max))
            .boxed();
        Self {
            origin: format!("configmap://{namespace}/{name}"),
            range,
            events,
            current: None,
            relist: None,
            reported: None,
        }
    }

    fn annotation(cm: &ConfigMap) -> Option<String> {
        cm.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(RECORD_ANNOTATION))
            .cloned()
    }

    /// Folds one watch event in; returns what is now known, if the event
    /// completes a view (not while a relist is being collected).
    fn fold(&mut self, event: Result<Event<ConfigMap>, watcher::Error>) -> Option<Seen> {
        match event {
            Ok(Event::Init) => {
                self.relist = Some(None);
                None
            }
            Ok(Event::InitApply(cm)) => {
                self.relist = Some(Self::annotation(&cm));
                None
            }
            Ok(Event::InitDone) => {
                self.current = self.relist.take().flatten();
                Some(Ok(self.current.clone()))
            }
            Ok(Event::Apply(cm)) => {
                self.current = Self::annotation(&cm);
                Some(Ok(self.current.clone()))
            }
            Ok(Event::Delete(_)) => {
                self.current = None;
                Some(Ok(None))
            }
            Err(e) => Some(Err(e.to_string())),
        }
    }

    async fn changed(&mut self) -> Result<Records, SourceError> {
        loop {
            let Some(event) = self.events.next().await else {
                // The watcher never ends by itself; report it, then park
                // rather than spin (iptables-manager keeps its rules).
                if self.reported.as_ref().is_some_and(Result::is_err) {
                    std::future::pending::<()>().await;
                }
                self.reported = Some(Err("watch ended".into()));
                return Err(self.fetch_error("watch ended".into()));
            };
            let Some(seen) = self.fold(event) else {
                continue;
            };
            if self.reported.as_ref() == Some(&seen) {
                continue;
            }
            self.reported = Some(seen.clone());
            return match seen {
                Ok(annotation) => Records::parse(
                    annotation.as_deref().unwrap_or("{}").as_bytes(),
                    &self.range,
                )
                .map_err(|cause| SourceError::Invalid {
                    origin: self.origin.clone(),
                    cause,
                }),
                Err(reason) => Err(self.fetch_error(reason)),
            };
        }
    }

    fn fetch_error(&self, reason: String) -> SourceError {
        SourceError::Fetch {
            url: self.origin.clone(),
            reason,
        }
    }
}

impl RecordSource for ConfigMapSource {
    fn next(&mut self) -> Pin<Box<dyn Future<Output = Result<Records, SourceError>> + Send + '_>> {
        Box::pin(self.changed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            configmap_url("configmap://tether/tunnelport"),
            Some(("tether", "tunnelport"))
        );
        assert_eq!(configmap_url("configmap://tether/"), None);
        assert_eq!(configmap_url("configmap://Tether/x"), None);
        assert_eq!(configmap_url("configmap://a/b/c"), None);
        assert_eq!(configmap_url("http://a/b"), None);
    }
}
