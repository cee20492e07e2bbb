//! iptables-manager: keeps the nat chain `TUNNEL-PORT` (or Tether's own
//! nftables table) in step with the tunnel-port records, so that the
//! apiserver's connections to `<node-ip>:<tunnel-port>` are DNATed to the
//! cloud replica that holds the node's session.
//!
//! Every sync is ONE atomic transaction (`iptables-restore --noflush`, or
//! `nft -f`) that rewrites only what Tether owns. A timer re-reads the table
//! and repairs drift. `cleanup` removes what Tether owns and nothing else.

mod metrics;
mod netfilter;
pub mod records;
pub mod render;
mod source;

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::time::Duration;

use tether_tunnel::Shutdown;
use tracing::{debug, info, warn};

pub use metrics::ManagerMetrics;
pub use netfilter::{Backend, BackendChoice, NetfilterError};
pub use records::{Records, TunnelPortRecord};
pub use render::{Cidr, DestMatch, Family, RenderError};
pub use source::{FileSource, HttpSource, RecordSource, SourceError};

/// How the manager renders and checks rules.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// Which netfilter interface to program.
    pub backend: BackendChoice,
    /// The cloud's kubelet-API front port that rules DNAT to (default 10003).
    pub stream_port: u16,
    /// Which destinations are redirected.
    pub dst: DestMatch,
    /// Tunnel ports records may use (default 10350-10999).
    pub port_range: RangeInclusive<u16>,
    /// How often to check for drift (default 10 s).
    pub resync: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            backend: BackendChoice::Auto,
            stream_port: 10003,
            dst: DestMatch::default(),
            port_range: 10350..=10999,
            resync: Duration::from_secs(10),
        }
    }
}

/// Why a sync failed. Nothing was applied for the failing transaction.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A netfilter tool failed.
    #[error(transparent)]
    Netfilter(#[from] NetfilterError),
    /// The configuration cannot be rendered.
    #[error(transparent)]
    Render(#[from] RenderError),
}

impl SyncError {
    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Netfilter(e) => e.label(),
            Self::Render(_) => "render",
        }
    }
}

/// What the manager last applied, as the kernel reported it back.
#[derive(Debug, Default, PartialEq, Eq)]
enum Snapshot {
    #[default]
    None,
    Iptables(HashMap<Family, render::Owned>),
    Nftables(Option<String>),
}

/// Applies records to netfilter.
pub struct Manager {
    backend: Backend,
    cfg: ManagerConfig,
    snapshot: Snapshot,
    metrics: ManagerMetrics,
}

impl Manager {
    /// Picks the backend (logging why) and checks the configuration.
    pub async fn new(cfg: ManagerConfig, metrics: ManagerMetrics) -> Result<Self, SyncError> {
        render::validate(&cfg.dst)?;
        let (backend, why) = netfilter::detect(cfg.backend).await?;
        info!(%backend, "{why}");
        Ok(Self {
            backend,
            cfg,
            snapshot: Snapshot::None,
            metrics,
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Makes the kernel hold exactly the rules for `records`. Returns the
    /// number of DNAT rules.
    pub async fn sync(&mut self, records: &Records) -> Result<usize, SyncError> {
        let r = self.try_sync(records).await;
        match &r {
            Ok(n) => {
                self.metrics.sync("ok");
                self.metrics.rules(*n);
            }
            Err(e) => self.metrics.sync(e.label()),
        }
        r
    }

    async fn try_sync(&mut self, records: &Records) -> Result<usize, SyncError> {
        let (stream_port, dst) = (self.cfg.stream_port, &self.cfg.dst);
        if self.backend == Backend::Nftables {
            let script = render::nft_sync(records, stream_port, dst)?;
            Backend::nft_apply(&script).await?;
            self.snapshot = Snapshot::Nftables(Backend::nft_list().await?);
            return Ok(script.lines().filter(|l| l.contains(" dnat ")).count());
        }
        let known = match std::mem::take(&mut self.snapshot) {
            Snapshot::Iptables(s) => s,
            _ => HashMap::new(),
        };
        let mut snaps = HashMap::new();
        let mut rules = 0;
        for family in [Family::V4, Family::V6] {
            let wanted = render::chain_rules(records, family, stream_port, dst);
            // The common path is ONE exec per family: the restore, built from
            // what the last sync left (the drift check keeps that honest).
            // Without it (first sync), or when it proves stale, read first.
            let cached = known.get(&family).cloned();
            if wanted.is_empty() && cached.as_ref() == Some(&render::Owned::default()) {
                snaps.insert(family, render::Owned::default());
                continue;
            }
            let mut current = match cached {
                Some(c) => c,
                None => match self.read(family, wanted.is_empty()).await? {
                    Some(c) => c,
                    None => {
                        snaps.insert(family, render::Owned::default());
                        continue;
                    }
                },
            };
            if wanted.is_empty() && current == render::Owned::default() {
                snaps.insert(family, current);
                continue;
            }
            let input = render::iptables_sync(records, family, stream_port, dst, &current);
            if let Err(e) = self.backend.restore(family, &input).await {
                if !known.contains_key(&family) {
                    return Err(e.into());
                }
                debug!(error = %e, "restore from the cached state failed; re-reading");
                current = self.read(family, false).await?.unwrap_or_default();
                let input = render::iptables_sync(records, family, stream_port, dst, &current);
                self.backend.restore(family, &input).await?;
            }
            snaps.insert(family, render::expected(&wanted));
            rules += wanted.len();
        }
        self.snapshot = Snapshot::Iptables(snaps);
        Ok(rules)
    }

    /// Tether's part of the nat table for `family`. None when the family has
    /// no usable nat (no ip6tables, no kernel support) and nothing needs it.
    async fn read(
        &self,
        family: Family,
        optional: bool,
    ) -> Result<Option<render::Owned>, SyncError> {
        match self.backend.save(family).await {
            Ok(save) => Ok(Some(render::Owned::from_save(&save))),
            Err(e @ (NetfilterError::NoNat { .. } | NetfilterError::MissingBinary { .. }))
                if family == Family::V6 && optional =>
            {
                debug!(error = %e, "skipping IPv6");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// After a drift repair, read the rules back. When they are ours in a
    /// different spelling (iptables-save orders some options its own way),
    /// adopt that spelling as the baseline so a formatting difference can
    /// never cause a repair loop. Anything else (someone changed the rules
    /// again meanwhile) is not adopted: the next drift check repairs it.
    async fn adopt_current(&mut self) -> Result<(), SyncError> {
        if let Snapshot::Iptables(snaps) = &mut self.snapshot {
            for (family, want) in snaps.iter_mut() {
                if *want == render::Owned::default() {
                    continue;
                }
                let now = render::Owned::from_save(&self.backend.save(*family).await?);
                if now != *want && render::same_rules(&now, want) {
                    *want = now;
                }
            }
        }
        Ok(())
    }

    /// True when what Tether owns differs from what it last applied.
    pub async fn drifted(&self) -> Result<bool, SyncError> {
        Ok(match &self.snapshot {
            Snapshot::None => false,
            Snapshot::Nftables(want) => &Backend::nft_list().await? != want,
            Snapshot::Iptables(snaps) => {
                for (family, want) in snaps {
                    if *want == render::Owned::default() {
                        continue;
                    }
                    let now = render::Owned::from_save(&self.backend.save(*family).await?);
                    if &now != want {
                        return Ok(true);
                    }
                }
                false
            }
        })
    }

    /// Removes everything Tether owns and nothing else.
    pub async fn cleanup(&mut self) -> Result<(), SyncError> {
        if self.backend == Backend::Nftables {
            Backend::nft_apply(&render::nft_cleanup()).await?;
        } else {
            for family in [Family::V4, Family::V6] {
                let current = match self.backend.save(family).await {
                    Ok(save) => render::Owned::from_save(&save),
                    Err(
                        e @ (NetfilterError::NoNat { .. } | NetfilterError::MissingBinary { .. }),
                    ) if family == Family::V6 => {
                        debug!(error = %e, "no IPv6 nat to clean");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                if let Some(input) = render::iptables_cleanup(&current) {
                    self.backend.restore(family, &input).await?;
                }
            }
        }
        self.snapshot = Snapshot::None;
        self.metrics.rules(0);
        info!(backend = %self.backend, "removed Tether's rules");
        Ok(())
    }
}

/// Reconciles until shutdown: applies every new record version, retries a
/// failed sync and repairs drift on the resync timer. Rules stay in place at
/// shutdown so traffic keeps flowing while the manager restarts.
pub async fn run(mut manager: Manager, mut source: Box<dyn RecordSource>, shutdown: Shutdown) {
    let mut resync = tokio::time::interval(manager.cfg.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await;
    let mut current: Option<Records> = None;
    let mut pending: Option<Records> = None;
    let mut repair = false;
    loop {
        tokio::select! {
            r = source.next() => match r {
                Ok(records) if Some(&records) == current.as_ref() => pending = None,
                Ok(records) => pending = Some(records),
                Err(e) => {
                    manager.metrics.record_error();
                    warn!(error = %e, "records refused; keeping the last good rules");
                    continue;
                }
            },
            _ = resync.tick() => {
                if pending.is_none() {
                    match manager.drifted().await {
                        Ok(false) => continue,
                        Ok(true) => {
                            warn!("rules were changed by someone else; restoring them");
                            manager.metrics.drift_repaired();
                            pending = current.clone();
                            repair = true;
                        }
                        Err(e) => {
                            warn!(error = %e, "drift check failed");
                            continue;
                        }
                    }
                }
            }
            _ = shutdown.triggered() => return,
        }
        let Some(records) = pending.take() else {
            continue;
        };
        let started = std::time::Instant::now();
        match manager.sync(&records).await {
            Ok(rules) => {
                if std::mem::take(&mut repair)
                    && let Err(e) = manager.adopt_current().await
                {
                    warn!(error = %e, "cannot read the repaired rules back");
                }
                info!(rules, records = records.entries.len(), took = ?started.elapsed(), "synced");
                current = Some(records);
            }
            Err(e) => {
                warn!(error = %e, "sync failed; the previous rules stay in place, retrying on the next resync");
                pending = Some(records);
            }
        }
    }
}
