//! An in-memory stand-in for the ownership records that cluster mode keeps
//! in Kubernetes Leases (`tether_cluster::leases`), for in-process tests
//! of forwarding between replicas. A fixture, not the production store.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tether_cloudstream::peer::{HeldNode, Ownership, PeerAddr};
use tether_tunnel::SessionInfo;

#[derive(Default)]
struct Board {
    owners: HashMap<String, String>,
    ips: HashMap<IpAddr, String>,
    endpoints: HashMap<String, Vec<SocketAddr>>,
    replicas: HashMap<String, (SocketAddr, bool)>,
}

/// The shared records; each replica gets its own view.
#[derive(Clone, Default)]
pub struct OwnershipBoard {
    inner: Arc<Mutex<Board>>,
}

impl OwnershipBoard {
    /// The records as `replica` sees and writes them.
    pub fn view(&self, replica: &str) -> Arc<dyn Ownership> {
        Arc::new(View {
            board: self.clone(),
            me: replica.to_owned(),
        })
    }

    /// Publishes a replica's peer address (its replica Lease).
    pub fn register(&self, replica: &str, addr: SocketAddr) {
        self.lock()
            .replicas
            .insert(replica.to_owned(), (addr, true));
    }

    /// Marks a replica dead, as an expired replica Lease does.
    pub fn expire(&self, replica: &str) {
        if let Some(r) = self.lock().replicas.get_mut(replica) {
            r.1 = false;
        }
    }

    /// The replica recorded as holding `node`.
    pub fn holder(&self, node: &str) -> Option<String> {
        self.lock().owners.get(node).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Board> {
        self.inner.lock().expect("board lock")
    }
}

struct View {
    board: OwnershipBoard,
    me: String,
}

impl Ownership for View {
    fn claim(&self, session: &SessionInfo) {
        let mut b = self.board.lock();
        let node = session.node.clone();
        b.owners.insert(node.clone(), self.me.clone());
        for ip in &session.ips {
            b.ips.insert(*ip, node.clone());
        }
        b.endpoints.insert(node, session.endpoints.clone());
    }

    fn remote_nodes(&self) -> Vec<HeldNode> {
        let b = self.board.lock();
        b.owners
            .iter()
            .filter(|(_, r)| **r != self.me && b.replicas.get(*r).is_some_and(|(_, alive)| *alive))
            .map(|(node, replica)| HeldNode {
                node: node.clone(),
                replica: replica.clone(),
                ips: b
                    .ips
                    .iter()
                    .filter(|(_, n)| *n == node)
                    .map(|(ip, _)| *ip)
                    .collect(),
                endpoints: b.endpoints.get(node).cloned().unwrap_or_default(),
            })
            .collect()
    }

    fn release(&self, node: &str) {
        let mut b = self.board.lock();
        if b.owners.get(node) == Some(&self.me) {
            b.owners.remove(node);
        }
    }

    fn owner_of_ip(&self, ip: IpAddr) -> Option<(String, PeerAddr)> {
        let node = self.board.lock().ips.get(&ip).cloned()?;
        let peer = self.owner(&node)?;
        Some((node, peer))
    }

    fn live_replicas(&self) -> Vec<PeerAddr> {
        let b = self.board.lock();
        b.replicas
            .iter()
            .filter(|(id, (_, alive))| *alive && **id != self.me)
            .map(|(id, (addr, _))| PeerAddr {
                replica: id.clone(),
                addr: *addr,
            })
            .collect()
    }

    fn owner(&self, node: &str) -> Option<PeerAddr> {
        let b = self.board.lock();
        let holder = b.owners.get(node).filter(|h| **h != self.me)?;
        match b.replicas.get(holder) {
            Some((addr, true)) => Some(PeerAddr {
                replica: holder.clone(),
                addr: *addr,
            }),
            _ => None,
        }
    }
}
