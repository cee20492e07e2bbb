//! The live sessions of one cloud process: at most one per node. A newer
//! session for a node replaces the older one, which is closed cleanly (its
//! in-flight streams finish; new streams go to the new session).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::{NodeSession, SessionInfo};

type Session = Arc<dyn NodeSession>;

/// Result of looking a node up by address.
pub enum IpLookup {
    /// No live session claims the address.
    None,
    /// Exactly one.
    One(Session),
    /// More than one node's certificate claims the address.
    Ambiguous(Vec<String>),
}

#[derive(Default)]
struct Inner {
    nodes: HashMap<String, Session>,
    ips: HashMap<IpAddr, Vec<String>>,
}

/// Shared registry of live node sessions. Cheap to clone.
#[derive(Clone)]
pub struct SessionRegistry {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Default for SessionRegistry {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            changed: Arc::new(watch::channel(0).0),
        }
    }
}

impl std::fmt::Debug for SessionRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRegistry")
            .field("sessions", &self.len())
            .finish()
    }
}

impl SessionRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a session; returns the one it replaced, already told to close.
    pub fn insert(&self, session: Session) -> Option<Session> {
        let info = session.info().clone();
        let old = {
            let mut inner = self.inner.lock().expect("registry lock");
            let old = inner.nodes.insert(info.node.clone(), session);
            if let Some(old) = &old {
                unindex(&mut inner.ips, old.info());
            }
            for ip in &info.ips {
                inner.ips.entry(*ip).or_default().push(info.node.clone());
            }
            old
        };
        if let Some(old) = &old {
            old.close();
        }
        self.changed.send_modify(|g| *g += 1);
        old
    }

    /// Removes the node's session if it is still session `id`; a session that
    /// was already replaced leaves its successor alone.
    pub fn remove(&self, node: &str, id: u64) -> bool {
        let removed = {
            let mut inner = self.inner.lock().expect("registry lock");
            match inner.nodes.get(node) {
                Some(s) if s.info().id == id => {
                    let s = inner.nodes.remove(node).expect("present");
                    unindex(&mut inner.ips, s.info());
                    true
                }
                _ => false,
            }
        };
        if removed {
            self.changed.send_modify(|g| *g += 1);
        }
        removed
    }

    /// The node's live session.
    pub fn get(&self, node: &str) -> Option<Session> {
        let inner = self.inner.lock().expect("registry lock");
        inner.nodes.get(node).filter(|s| !s.is_closed()).cloned()
    }

    /// The session whose certificate claims `ip`.
    pub fn by_ip(&self, ip: IpAddr) -> IpLookup {
        let inner = self.inner.lock().expect("registry lock");
        match inner.ips.get(&ip).map(Vec::as_slice) {
            None | Some([]) => IpLookup::None,
            Some([one]) => match inner.nodes.get(one) {
                Some(s) if !s.is_closed() => IpLookup::One(s.clone()),
                _ => IpLookup::None,
            },
            Some(many) => IpLookup::Ambiguous(many.to_vec()),
        }
    }

    /// Number of registered sessions.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("registry lock").nodes.len()
    }

    /// True when no session is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Facts about every registered session.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let inner = self.inner.lock().expect("registry lock");
        inner.nodes.values().map(|s| s.info().clone()).collect()
    }

    /// Every registered session.
    pub fn all(&self) -> Vec<Session> {
        let inner = self.inner.lock().expect("registry lock");
        inner.nodes.values().cloned().collect()
    }

    /// Closes every session (shutdown), asking their edges back at the pace
    /// `limits` set (ADR 0023): the first `reconnect_burst` at once, the
    /// rest spread at `reconnect_rate` a second, so a restart's reconnect
    /// storm arrives at the rate a cloud can take it.
    /// Returns how many sessions it closed.
    pub fn close_all(&self, limits: &crate::TunnelLimits) -> usize {
        let all: Vec<Session> = {
            let inner = self.inner.lock().expect("registry lock");
            inner.nodes.values().cloned().collect()
        };
        let n = all.len();
        for (i, s) in all.into_iter().enumerate() {
            if let Some(after) = limits.reconnect_after(i) {
                s.announce_reconnect(after);
            }
            s.close();
        }
        n
    }

    /// Waits until `pred` holds for the registry, or the timeout passes.
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&Self) -> bool) -> bool {
        let mut rx = self.changed.subscribe();
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
            && pred(self)
    }

    /// Waits until a live session for `node` other than `not_id` exists.
    pub async fn wait_for_node(
        &self,
        node: &str,
        not_id: Option<u64>,
        timeout: Duration,
    ) -> Option<Session> {
        let ok = self
            .wait_until(timeout, |r| {
                r.get(node).is_some_and(|s| Some(s.info().id) != not_id)
            })
            .await;
        if ok { self.get(node) } else { None }
    }
}

fn unindex(ips: &mut HashMap<IpAddr, Vec<String>>, info: &SessionInfo) {
    for ip in &info.ips {
        if let Some(names) = ips.get_mut(ip) {
            names.retain(|n| n != &info.node);
            if names.is_empty() {
                ips.remove(ip);
            }
        }
    }
}
