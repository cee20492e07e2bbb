//! This replica's tunnel port, claimed in the KubeEdge-compatible `tunnelport`
//! ConfigMap whose `tunnelportrecord.kubeedge.io` annotation maps replica
//! IPs to ports (`{"ipTunnelPort":{"10.0.0.5":10351},"port":{"10351":true}}`).
//!
//! The claim is optimistic concurrency on the ConfigMap's resourceVersion:
//! read, pick, write back with the version read; a 409 means another replica
//! wrote first, so read again and pick again. Two replicas starting together
//! therefore never leave with the same port. A replica that restarts with
//! the same IP keeps its port. Release removes both the `ipTunnelPort` and the
//! `port` entry (KubeEdge leaves the latter behind, KubeEdge#5543); a `port`
//! entry that no replica maps to is such a leak and counts as free.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::RangeInclusive;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tracing::{Instrument, debug, info, info_span, warn};

use tether_iptables_manager::TunnelPortRecord;
use tether_iptables_manager::records::RecordError;

use crate::retry::{self, RetryPolicy};
use crate::{Cluster, FIELD_MANAGER};

/// The ConfigMap KubeEdge and Tether keep tunnel-port records in.
pub const RECORD_CONFIGMAP: &str = "tunnelport";
/// Its annotation holding the JSON record.
pub const RECORD_ANNOTATION: &str = "tunnelportrecord.kubeedge.io";

/// Why a claim or release failed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Every port of the range is held by another replica.
    #[error("no free tunnel port in {min}-{max}: every port is held by another replica")]
    Exhausted {
        /// Range start.
        min: u16,
        /// Range end.
        max: u16,
    },
    /// The port asked for (`--tunnel-port`) is outside the range.
    #[error("tunnel port {port} is outside the allowed range {min}-{max}")]
    OutOfRange {
        /// The port.
        port: u16,
        /// Range start.
        min: u16,
        /// Range end.
        max: u16,
    },
    /// The port asked for (`--tunnel-port`) belongs to another replica.
    #[error("tunnel port {port} is already held by replica {holder}")]
    Taken {
        /// The port.
        port: u16,
        /// The replica IP holding it.
        holder: String,
    },
    /// The annotation holds something else than a record; it is not
    /// overwritten, so an operator can see and fix it.
    #[error("configmap {namespace}/{name}: annotation {RECORD_ANNOTATION}: {source}")]
    Malformed {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The parse error.
        #[source]
        source: RecordError,
    },
    /// The apiserver refused the request (403, 422, ...).
    #[error("configmap {namespace}/{name}: {source}")]
    Api {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The error.
        #[source]
        source: kube::Error,
    },
    /// Retriable failures (conflicts, 5xx, transport) did not stop in time.
    #[error("configmap {namespace}/{name}: gave up after {attempts} attempts: {source}")]
    GaveUp {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        #[source]
        source: kube::Error,
    },
}

/// What to claim.
#[derive(Clone, Debug)]
pub struct ClaimSpec {
    /// This replica's address as control-plane hosts reach it.
    pub ip: IpAddr,
    /// Ports replicas may hold (default 10350-10999, iptables-manager's too).
    pub range: RangeInclusive<u16>,
    /// Claim exactly this port (`--tunnel-port`) instead of a free one.
    pub fixed: Option<u16>,
    /// Retry schedule for conflicts and transient failures.
    pub retry: RetryPolicy,
}

impl ClaimSpec {
    /// Any free port of the default range for `ip`.
    pub fn new(ip: IpAddr) -> Self {
        Self {
            ip,
            range: 10350..=10999,
            fixed: None,
            retry: RetryPolicy {
                // Conflicts between replicas clear fast; keep the first retry short.
                base: std::time::Duration::from_millis(50),
                max: std::time::Duration::from_secs(2),
                attempts: 30,
            },
        }
    }
}

/// Gives `ip` a port in `record`: its current one when still valid, else
/// `fixed`, else the lowest free one. Returns the port and whether the
/// record changed.
pub fn assign(
    record: &mut TunnelPortRecord,
    ip: IpAddr,
    range: &RangeInclusive<u16>,
    fixed: Option<u16>,
) -> Result<(u16, bool), ClaimError> {
    let me = ip.to_string();
    let (min, max) = (*range.start(), *range.end());
    let held: BTreeMap<u16, &str> = record
        .ip_tunnel_port
        .iter()
        .filter(|(k, _)| **k != me)
        .map(|(k, p)| (*p, k.as_str()))
        .collect();
    let mine = record.ip_tunnel_port.get(&me).copied();
    let port = match fixed {
        Some(port) => {
            if !range.contains(&port) {
                return Err(ClaimError::OutOfRange { port, min, max });
            }
            if let Some(holder) = held.get(&port) {
                return Err(ClaimError::Taken {
                    port,
                    holder: (*holder).to_owned(),
                });
            }
            port
        }
        None => match mine {
            Some(p) if range.contains(&p) && !held.contains_key(&p) => p,
            _ => range
                .clone()
                .find(|p| !held.contains_key(p))
                .ok_or(ClaimError::Exhausted { min, max })?,
        },
    };
    let before = record.clone();
    if let Some(old) = mine.filter(|old| *old != port)
        && !held.contains_key(&old)
    {
        record.port.remove(&old.to_string());
    }
    record.ip_tunnel_port.insert(me, port);
    record.port.insert(port.to_string(), true);
    Ok((port, *record != before))
}

/// Removes `ip`'s claim of `port` from `record`: its `ipTunnelPort` entry and
/// the `port` entry unless another replica maps to that port. Returns whether
/// the record changed.
pub fn unassign(record: &mut TunnelPortRecord, ip: IpAddr, port: u16) -> bool {
    let me = ip.to_string();
    let before = record.clone();
    if record.ip_tunnel_port.get(&me) == Some(&port) {
        record.ip_tunnel_port.remove(&me);
    }
    let still_used: BTreeSet<u16> = record.ip_tunnel_port.values().copied().collect();
    if !still_used.contains(&port) {
        record.port.remove(&port.to_string());
    }
    *record != before
}

/// A port this replica holds in the record. Release it on graceful shutdown.
#[derive(Debug)]
pub struct TunnelPortClaim {
    api: Api<ConfigMap>,
    namespace: String,
    ip: IpAddr,
    port: u16,
    retry: RetryPolicy,
}

/// The record in a ConfigMap; a missing annotation is an empty record.
fn record_of(cm: &ConfigMap, namespace: &str) -> Result<TunnelPortRecord, ClaimError> {
    let Some(json) = cm
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(RECORD_ANNOTATION))
    else {
        return Ok(TunnelPortRecord::default());
    };
    serde_json::from_str(json).map_err(|e| ClaimError::Malformed {
        namespace: namespace.to_owned(),
        name: RECORD_CONFIGMAP.to_owned(),
        source: RecordError::Malformed(e.to_string()),
    })
}

fn set_record(cm: &mut ConfigMap, record: &TunnelPortRecord) {
    let json = serde_json::to_string(record).expect("a record always serializes");
    cm.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(RECORD_ANNOTATION.to_owned(), json);
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    }
}

/// One read-modify-write round.
enum Round<T> {
    Done(T),
    /// Someone else wrote between our read and write; read again.
    Conflict(kube::Error),
}

impl TunnelPortClaim {
    /// Claims a port for `spec.ip` in `cluster`'s namespace, creating the
    /// ConfigMap if it is missing.
    pub async fn claim(cluster: &Cluster, spec: &ClaimSpec) -> Result<Self, ClaimError> {
        let api: Api<ConfigMap> = Api::namespaced(cluster.client().clone(), cluster.namespace());
        let claim = Self {
            api,
            namespace: cluster.namespace().to_owned(),
            ip: spec.ip,
            port: 0,
            retry: spec.retry.clone(),
        };
        let span = info_span!("tunnel_port", replica.ip = %spec.ip, namespace = %claim.namespace);
        let port = claim
            .retrying(|| claim.claim_round(spec))
            .instrument(span)
            .await?;
        Ok(Self { port, ..claim })
    }

    /// The claimed port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The replica address the claim is for.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Frees the port: both of this replica's entries leave the record.
    pub async fn release(self) -> Result<(), ClaimError> {
        let span = info_span!("tunnel_port", replica.ip = %self.ip, namespace = %self.namespace);
        self.retrying(|| self.release_round())
            .instrument(span)
            .await
    }

    /// Runs `round` until it is done, retrying conflicts and transient
    /// failures on the jittered schedule, at most `retry.attempts` times.
    async fn retrying<T, F, Fut>(&self, mut round: F) -> Result<T, ClaimError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Round<T>, ClaimError>>,
    {
        let mut backoff = self.retry.backoff();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let failure = match round().await {
                Ok(Round::Done(v)) => return Ok(v),
                Ok(Round::Conflict(e)) => e,
                Err(ClaimError::Api { source, .. }) if retry::retriable(&source) => source,
                Err(e) => return Err(e),
            };
            if attempts >= self.retry.attempts {
                return Err(ClaimError::GaveUp {
                    namespace: self.namespace.clone(),
                    name: RECORD_CONFIGMAP.to_owned(),
                    attempts,
                    source: failure,
                });
            }
            let delay = backoff.next_delay();
            debug!(error = %failure, ?delay, attempts, "tunnel-port record write failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    fn api_error(&self, source: kube::Error) -> ClaimError {
        ClaimError::Api {
            namespace: self.namespace.clone(),
            name: RECORD_CONFIGMAP.to_owned(),
            source,
        }
    }

    async fn claim_round(&self, spec: &ClaimSpec) -> Result<Round<u16>, ClaimError> {
        let existing = self
            .api
            .get_opt(RECORD_CONFIGMAP)
            .await
            .map_err(|e| self.api_error(e))?;
        let Some(mut cm) = existing else {
            let mut record = TunnelPortRecord::default();
            let (port, _) = assign(&mut record, spec.ip, &spec.range, spec.fixed)?;
            let mut cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(RECORD_CONFIGMAP.to_owned()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                ..ConfigMap::default()
            };
            set_record(&mut cm, &record);
            return match self.api.create(&post_params(), &cm).await {
                Ok(_) => {
                    info!(port, "created the tunnel-port record and claimed a port");
                    Ok(Round::Done(port))
                }
                // Another replica created it first: read theirs.
                Err(e) if retry::status_code(&e) == Some(409) => Ok(Round::Conflict(e)),
                Err(e) => Err(self.api_error(e)),
            };
        };
        let mut record = record_of(&cm, &self.namespace)?;
        let (port, changed) = assign(&mut record, spec.ip, &spec.range, spec.fixed)?;
        if !changed {
            info!(port, "kept this replica's tunnel port");
            return Ok(Round::Done(port));
        }
        set_record(&mut cm, &record);
        // `cm` carries the resourceVersion we read: a write in between is a 409.
        match self
            .api
            .replace(RECORD_CONFIGMAP, &post_params(), &cm)
            .await
        {
            Ok(_) => {
                info!(port, "claimed a tunnel port");
                Ok(Round::Done(port))
            }
            Err(e) if retry::status_code(&e) == Some(409) => Ok(Round::Conflict(e)),
            Err(e) => Err(self.api_error(e)),
        }
    }

    async fn release_round(&self) -> Result<Round<()>, ClaimError> {
        let Some(mut cm) = self
            .api
            .get_opt(RECORD_CONFIGMAP)
            .await
            .map_err(|e| self.api_error(e))?
        else {
            warn!(
                port = self.port,
                "the tunnel-port record is gone; nothing to release"
            );
            return Ok(Round::Done(()));
        };
        let mut record = record_of(&cm, &self.namespace)?;
        if !unassign(&mut record, self.ip, self.port) {
            return Ok(Round::Done(()));
        }
        set_record(&mut cm, &record);
        match self
            .api
            .replace(RECORD_CONFIGMAP, &post_params(), &cm)
            .await
        {
            Ok(_) => {
                info!(port = self.port, "released the tunnel port");
                Ok(Round::Done(()))
            }
            Err(e) if retry::status_code(&e) == Some(409) => Ok(Round::Conflict(e)),
            // Deleted between our read and write: nothing left to release.
            Err(e) if retry::status_code(&e) == Some(404) => Ok(Round::Done(())),
            Err(e) => Err(self.api_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANGE: RangeInclusive<u16> = 10350..=10999;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rec(json: &str) -> TunnelPortRecord {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn first_claim_takes_the_lowest_free_port() {
        let mut r = TunnelPortRecord::default();
        assert_eq!(
            assign(&mut r, ip("10.0.0.5"), &RANGE, None).unwrap(),
            (10350, true)
        );
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"ipTunnelPort":{"10.0.0.5":10350},"port":{"10350":true}}"#
        );
        assert_eq!(
            assign(&mut r, ip("10.0.0.6"), &RANGE, None).unwrap(),
            (10351, true)
        );
    }

    #[test]
    fn same_ip_keeps_its_port_without_a_write() {
        let mut r = rec(
            r#"{"ipTunnelPort":{"10.0.0.5":10352,"10.0.0.6":10350},"port":{"10350":true,"10352":true}}"#,
        );
        assert_eq!(
            assign(&mut r, ip("10.0.0.5"), &RANGE, None).unwrap(),
            (10352, false)
        );
    }

    #[test]
    fn a_leaked_port_entry_is_free_and_a_stolen_port_is_replaced() {
        // 10350 leaked by KubeEdge (no replica maps to it).
        let mut r = rec(r#"{"ipTunnelPort":{},"port":{"10350":true}}"#);
        assert_eq!(
            assign(&mut r, ip("10.0.0.5"), &RANGE, None).unwrap(),
            (10350, true)
        );
        // Two replicas on one port (hand edit): the one asking moves away,
        // and the shared `port` entry stays for the other.
        let mut r =
            rec(r#"{"ipTunnelPort":{"10.0.0.5":10350,"10.0.0.6":10350},"port":{"10350":true}}"#);
        assert_eq!(
            assign(&mut r, ip("10.0.0.5"), &RANGE, None).unwrap(),
            (10351, true)
        );
        assert_eq!(r.port.get("10350"), Some(&true));
        assert_eq!(r.port.get("10351"), Some(&true));
    }

    #[test]
    fn fixed_port_is_checked_against_range_and_holders() {
        let mut r = rec(r#"{"ipTunnelPort":{"10.0.0.6":10351},"port":{"10351":true}}"#);
        assert!(matches!(
            assign(&mut r, ip("10.0.0.5"), &RANGE, Some(10351)),
            Err(ClaimError::Taken { port: 10351, .. })
        ));
        assert!(matches!(
            assign(&mut r, ip("10.0.0.5"), &RANGE, Some(80)),
            Err(ClaimError::OutOfRange { port: 80, .. })
        ));
        assert_eq!(
            assign(&mut r, ip("10.0.0.5"), &RANGE, Some(10360)).unwrap(),
            (10360, true)
        );
        // Moving to another fixed port frees the old one.
        assert_eq!(
            assign(&mut r, ip("10.0.0.5"), &RANGE, Some(10361)).unwrap(),
            (10361, true)
        );
        assert!(!r.port.contains_key("10360"));
    }

    #[test]
    fn exhausted_range_is_an_error() {
        let mut r = rec(r#"{"ipTunnelPort":{"10.0.0.6":10350,"10.0.0.7":10351}}"#);
        assert!(matches!(
            assign(&mut r, ip("10.0.0.5"), &(10350..=10351), None),
            Err(ClaimError::Exhausted { .. })
        ));
    }

    #[test]
    fn release_removes_both_entries_and_only_ours() {
        let mut r = rec(
            r#"{"ipTunnelPort":{"10.0.0.5":10350,"10.0.0.6":10351},"port":{"10350":true,"10351":true}}"#,
        );
        assert!(unassign(&mut r, ip("10.0.0.5"), 10350));
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"ipTunnelPort":{"10.0.0.6":10351},"port":{"10351":true}}"#
        );
        assert!(!unassign(&mut r, ip("10.0.0.5"), 10350));
    }
}
