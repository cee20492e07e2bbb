//! The budget for connections that have not proven who they are yet.
//!
//! Every listener (front, tunnel, hub, bootstrap, peer, admin) accepts
//! without waiting for a slot, then gives each new connection a
//! [`PreAuthTicket`] from the process's one [`PreAuthGate`]. The gate holds at
//! most `max_pending` such connections across all listeners, and at most
//! `max_pending_per_source` from one source (an IPv4 address or an IPv6
//! /64). Holding a stalled connection costs a descriptor and a few KiB, so
//! the budget is large: a flood must be held, not left in the kernel's
//! accept queue, where it would make legitimate SYNs wait for a retransmit. When a bound is reached, the oldest connection that has
//! not yet sent a complete TLS ClientHello (or, on plain HTTP, a request
//! head) is shed to make room; a connection that is already handshaking is
//! never shed, and if only those fill the bound the newcomer is refused.
//!
//! So a client that stalls mid-ClientHello only ever displaces other
//! stallers: a legitimate peer sends its ClientHello in its first flight
//! and leaves the sheddable set at once. Nothing an authenticated peer needs
//! (stream slots, sessions, the authenticated connection budget) is spent
//! before the handshake finishes. See `docs/adr/0013-pre-auth-budget.md`.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

/// Bounds of one listener's unauthenticated connections.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PreAuthLimits {
    /// Connections that have not finished their handshake, across all
    /// listeners of the process (default 8192).
    pub max_pending: usize,
    /// Of those, from one IPv4 address or IPv6 /64 (default 6144).
    pub max_pending_per_source: usize,
    /// Deadline from accept to a finished TLS handshake, or on plain-HTTP
    /// listeners to a complete first request head (default 5 s). Each
    /// connection gets a deadline between half of this and all of it.
    #[serde(with = "crate::limits::secs")]
    pub handshake_timeout: Duration,
    /// TLS handshakes past their ClientHello that may compute at once, per
    /// listener (default 16). The rest wait their turn, within their
    /// deadline, so a reconnect storm cannot crowd out the sessions already
    /// up: their keepalives and requests share the cores with at most this
    /// many handshakes. Per listener, so the apiserver's connections to the
    /// front never queue behind a storm of edges on the tunnel port.
    pub max_handshaking: usize,
}

impl Default for PreAuthLimits {
    fn default() -> Self {
        Self {
            max_pending: 8192,
            max_pending_per_source: 6144,
            handshake_timeout: Duration::from_secs(5),
            max_handshaking: 16,
        }
    }
}

impl PreAuthLimits {
    /// Refuses values that cannot work, naming the field and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=65_536).contains(&self.max_pending) {
            return Err("max_pending must be within 1..=65536".into());
        }
        if self.max_pending_per_source == 0 || self.max_pending_per_source > self.max_pending {
            return Err("max_pending_per_source must be within 1..=max_pending".into());
        }
        if self.handshake_timeout < Duration::from_millis(100)
            || self.handshake_timeout > Duration::from_secs(120)
        {
            return Err("handshake_timeout must be within 0.1..=120 seconds".into());
        }
        if !(1..=4096).contains(&self.max_handshaking) {
            return Err("max_handshaking must be within 1..=4096".into());
        }
        Ok(())
    }
}

/// Listen backlog of Tether's listeners: the kernel caps it at
/// `net.core.somaxconn` (4096 on current kernels).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener with [`LISTEN_BACKLOG`], so a burst of connections
/// waits in the accept queue instead of having its SYNs dropped.
pub fn bind_listener(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Why a pre-authentication phase ended without a result.
#[derive(Debug, thiserror::Error)]
pub enum PreAuthError {
    /// The handshake deadline passed.
    #[error("handshake not finished within {0:?}")]
    Timeout(Duration),
    /// Room was needed for a newer connection while this one had not sent a
    /// complete ClientHello or request head.
    #[error("shed: pre-authentication budget full and this connection had sent nothing usable")]
    Shed,
    /// TLS failed (garbage, wrong CA, missing client certificate).
    #[error("tls handshake failed: {0}")]
    Tls(#[source] std::io::Error),
}

impl PreAuthError {
    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Shed => "shed",
            Self::Tls(_) => "tls",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    listener: &'static str,
    outcome: &'static str,
}

/// Metric families of every gate in a process (label `listener`).
#[derive(Clone, Debug)]
pub struct PreAuthMetrics {
    pending: Family<ListenerLabel, Gauge>,
    ended: Family<OutcomeLabel, Counter>,
    handshake_wait: Histogram,
}

impl Default for PreAuthMetrics {
    fn default() -> Self {
        Self {
            pending: Family::default(),
            ended: Family::default(),
            // 1 ms .. ~16 s.
            handshake_wait: Histogram::new(exponential_buckets(0.001, 4.0, 8)),
        }
    }
}

impl PreAuthMetrics {
    /// Registers the families.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tether_preauth_pending",
            "Connections that have not finished their handshake, by listener",
            self.pending.clone(),
        );
        registry.register(
            "tether_preauth_ended",
            "Pre-authentication phases ended without a handshake, by listener and outcome (shed, refused, timeout, tls)",
            self.ended.clone(),
        );
        registry.register(
            "tether_preauth_handshake_wait_seconds",
            "Time TLS handshakes waited for a turn to compute (max_handshaking paces reconnect storms)",
            self.handshake_wait.clone(),
        );
    }

    fn handshake_wait(&self, waited: Duration) {
        self.handshake_wait.observe(waited.as_secs_f64());
    }

    fn set_pending(&self, listener: &'static str, n: i64) {
        self.pending
            .get_or_create(&ListenerLabel { listener })
            .set(n);
    }

    fn ended(&self, listener: &'static str, outcome: &'static str) {
        self.ended
            .get_or_create(&OutcomeLabel { listener, outcome })
            .inc();
    }
}

/// The pre-authentication budget of a process; cheap to clone.
#[derive(Clone, Debug)]
pub struct PreAuthGate {
    inner: Arc<Gate>,
}

#[derive(Debug)]
struct Gate {
    limits: PreAuthLimits,
    metrics: PreAuthMetrics,
    pool: Mutex<Pool>,
    /// Turns to compute a TLS handshake ([`PreAuthLimits::max_handshaking`]),
    /// one pool per listener.
    handshaking: Mutex<HashMap<&'static str, Arc<tokio::sync::Semaphore>>>,
}

/// Who is pending. `waiting` holds the sequence numbers of connections that
/// may still be shed, oldest first.
#[derive(Debug, Default)]
struct Pool {
    next: u64,
    entries: HashMap<u64, Entry>,
    waiting: BTreeSet<u64>,
    sources: HashMap<IpAddr, Source>,
    listeners: HashMap<&'static str, i64>,
}

#[derive(Debug)]
struct Entry {
    source: IpAddr,
    listener: &'static str,
    signal: Arc<Signal>,
}

#[derive(Debug, Default)]
struct Source {
    pending: usize,
    waiting: BTreeSet<u64>,
}

#[derive(Debug, Default)]
struct Signal {
    shed: AtomicBool,
    notify: Notify,
}

/// The groups per-source caps count by: an IPv6 client usually holds a /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl Pool {
    /// Takes `seq` out of the pool; its listener's new pending count.
    fn take(&mut self, seq: u64) -> Option<(Entry, i64)> {
        let e = self.entries.remove(&seq)?;
        self.waiting.remove(&seq);
        if let Some(s) = self.sources.get_mut(&e.source) {
            s.waiting.remove(&seq);
            s.pending -= 1;
            if s.pending == 0 {
                self.sources.remove(&e.source);
            }
        }
        let n = self.listeners.entry(e.listener).or_default();
        *n -= 1;
        let n = *n;
        Some((e, n))
    }
}

impl Gate {
    /// The handshake turns of `listener`.
    fn turns(&self, listener: &'static str) -> Arc<tokio::sync::Semaphore> {
        self.handshaking
            .lock()
            .expect("handshake turns lock")
            .entry(listener)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.limits.max_handshaking)))
            .clone()
    }
}

impl PreAuthGate {
    /// The budget of one process; give every listener a clone.
    pub fn new(limits: PreAuthLimits, metrics: PreAuthMetrics) -> Self {
        Self {
            inner: Arc::new(Gate {
                handshaking: Mutex::new(HashMap::new()),
                limits,
                metrics,
                pool: Mutex::new(Pool::default()),
            }),
        }
    }

    /// Admits a connection from `peer` on `listener` (a metric label),
    /// shedding the oldest sheddable connection when a bound is reached.
    /// `None`: the bound is full of connections that are already
    /// handshaking, so the newcomer is refused (the caller closes it).
    pub fn admit(&self, listener: &'static str, peer: IpAddr) -> Option<PreAuthTicket> {
        let g = &self.inner;
        let source = source_key(peer);
        let mut pool = g.pool.lock().expect("pre-auth pool lock");
        let mut shed = Vec::new();
        let per_source_full = pool
            .sources
            .get(&source)
            .is_some_and(|s| s.pending >= g.limits.max_pending_per_source);
        let victim = if per_source_full {
            Some(
                pool.sources
                    .get(&source)
                    .and_then(|s| s.waiting.first().copied()),
            )
        } else if pool.entries.len() >= g.limits.max_pending {
            Some(pool.waiting.first().copied())
        } else {
            None
        };
        match victim {
            Some(Some(seq)) => shed.extend(pool.take(seq)),
            Some(None) => {
                drop(pool);
                g.metrics.ended(listener, "refused");
                return None;
            }
            None => {}
        }
        let seq = pool.next;
        pool.next += 1;
        let signal = Arc::new(Signal::default());
        pool.entries.insert(
            seq,
            Entry {
                source,
                listener,
                signal: signal.clone(),
            },
        );
        pool.waiting.insert(seq);
        let s = pool.sources.entry(source).or_default();
        s.pending += 1;
        s.waiting.insert(seq);
        let n = pool.listeners.entry(listener).or_default();
        *n += 1;
        let pending = *n;
        drop(pool);
        for (e, n) in shed {
            e.signal.shed.store(true, Ordering::Release);
            e.signal.notify.notify_one();
            g.metrics.ended(e.listener, "shed");
            g.metrics.set_pending(e.listener, n);
        }
        g.metrics.set_pending(listener, pending);
        // Spread deadlines over the last half of the timeout, so that a
        // flood admitted at once does not expire (and redial) at once.
        let timeout = g.limits.handshake_timeout;
        let spread = timeout / 2 * ((seq.wrapping_mul(7919) % 1000) as u32) / 1000;
        Some(PreAuthTicket {
            gate: self.inner.clone(),
            listener,
            seq,
            signal,
            deadline: Instant::now() + timeout - spread,
        })
    }

    /// Connections pending now, across listeners.
    pub fn pending(&self) -> usize {
        self.inner
            .pool
            .lock()
            .expect("pre-auth pool lock")
            .entries
            .len()
    }
}

/// One connection's place in its listener's pre-authentication budget. It
/// leaves the budget when dropped.
#[derive(Debug)]
pub struct PreAuthTicket {
    gate: Arc<Gate>,
    listener: &'static str,
    seq: u64,
    signal: Arc<Signal>,
    deadline: Instant,
}

impl PreAuthTicket {
    /// The connection sent a complete ClientHello (or request head): from
    /// now on it is never shed for a newcomer.
    pub fn progressed(&self) {
        let mut pool = self.gate.pool.lock().expect("pre-auth pool lock");
        if let Some(e) = pool.entries.get(&self.seq) {
            let source = e.source;
            pool.waiting.remove(&self.seq);
            if let Some(s) = pool.sources.get_mut(&source) {
                s.waiting.remove(&self.seq);
            }
        }
    }

    /// Resolves when this connection is shed for a newer one.
    pub async fn shed(&self) {
        loop {
            let notified = self.signal.notify.notified();
            if self.signal.shed.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// The handshake deadline (fixed at admission).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Runs `f` until it finishes, the handshake deadline passes or the
    /// connection is shed; counts the outcome when it is not a result.
    pub async fn guard<T>(
        &self,
        f: impl Future<Output = Result<T, std::io::Error>>,
    ) -> Result<T, PreAuthError> {
        let r = tokio::select! {
            r = tokio::time::timeout_at(self.deadline, f) => match r {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => PreAuthError::Tls(e),
                Err(_) => PreAuthError::Timeout(self.gate.limits.handshake_timeout),
            },
            _ = self.shed() => PreAuthError::Shed,
        };
        // Shedding was counted when it happened.
        if !matches!(r, PreAuthError::Shed) {
            self.gate.metrics.ended(self.listener, r.label());
        }
        Err(r)
    }

    /// The TLS server handshake under this ticket: the ClientHello first
    /// (the sheddable phase), then the rest with `config(hello)`.
    pub async fn accept_tls<IO>(
        &self,
        io: IO,
        config: impl FnOnce(&rustls::server::ClientHello<'_>) -> Arc<rustls::ServerConfig>,
    ) -> Result<TlsStream<IO>, PreAuthError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
        let start = self.guard(acceptor).await?;
        self.progressed();
        let config = config(&start.client_hello());
        // The key exchange and signature are the expensive part: wait for a
        // turn (within the deadline) so a storm of them is paced.
        let turns = self.gate.turns(self.listener);
        let turn = self.guard(async {
            turns
                .acquire_owned()
                .await
                .map_err(|_| std::io::Error::other("handshake semaphore closed"))
        });
        let waited = Instant::now();
        let _turn = turn.await?;
        self.gate.metrics.handshake_wait(waited.elapsed());
        self.guard(start.into_stream(config)).await
    }
}

impl Drop for PreAuthTicket {
    fn drop(&mut self) {
        let g = &self.gate;
        let taken = g.pool.lock().expect("pre-auth pool lock").take(self.seq);
        if let Some((_, n)) = taken {
            g.metrics.set_pending(self.listener, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(max: usize, per_source: usize) -> PreAuthGate {
        PreAuthGate::new(
            PreAuthLimits {
                max_pending: max,
                max_pending_per_source: per_source,
                handshake_timeout: Duration::from_secs(5),
                max_handshaking: 16,
            },
            PreAuthMetrics::default(),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn oldest_waiting_is_shed_first() {
        let g = gate(3, 3);
        let a = g.admit("test", ip("10.0.0.1")).unwrap();
        let b = g.admit("test", ip("10.0.0.2")).unwrap();
        b.progressed();
        let _c = g.admit("test", ip("10.0.0.3")).unwrap();
        let _d = g.admit("test", ip("10.0.0.4")).unwrap();
        // `a` was the oldest that had sent nothing; `b` is handshaking.
        tokio::time::timeout(Duration::from_secs(1), a.shed())
            .await
            .expect("a shed");
        assert!(!b.signal.shed.load(Ordering::Acquire));
        assert_eq!(g.pending(), 3);
    }

    #[tokio::test]
    async fn per_source_cap_sheds_within_the_source() {
        let g = gate(100, 2);
        let a1 = g.admit("test", ip("10.0.0.1")).unwrap();
        let other = g.admit("test", ip("10.0.0.9")).unwrap();
        let _a2 = g.admit("test", ip("10.0.0.1")).unwrap();
        let _a3 = g.admit("test", ip("10.0.0.1")).unwrap();
        assert!(a1.signal.shed.load(Ordering::Acquire));
        assert!(!other.signal.shed.load(Ordering::Acquire));
        assert_eq!(g.pending(), 3);
    }

    #[tokio::test]
    async fn handshaking_connections_are_never_shed() {
        let g = gate(2, 2);
        let a = g.admit("test", ip("10.0.0.1")).unwrap();
        let b = g.admit("test", ip("10.0.0.2")).unwrap();
        a.progressed();
        b.progressed();
        assert!(
            g.admit("test", ip("10.0.0.3")).is_none(),
            "newcomer refused"
        );
        drop(a);
        assert!(g.admit("test", ip("10.0.0.3")).is_some());
    }

    #[test]
    fn ipv6_sources_group_by_64() {
        let g = gate(100, 1);
        let a = g.admit("test", ip("2001:db8::1")).unwrap();
        let _b = g.admit("test", ip("2001:db8::2")).unwrap();
        assert!(a.signal.shed.load(Ordering::Acquire));
        let _c = g.admit("test", ip("2001:db8:0:1::1")).unwrap();
        assert_eq!(g.pending(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn guard_times_out_at_the_deadline() {
        let g = gate(1, 1);
        let t = g.admit("test", ip("10.0.0.1")).unwrap();
        let r = t
            .guard(std::future::pending::<Result<(), std::io::Error>>())
            .await;
        assert!(matches!(r, Err(PreAuthError::Timeout(_))));
    }

    #[tokio::test]
    async fn each_listener_has_its_own_handshake_turns() {
        let g = gate(100, 100);
        let tunnel = g.inner.turns("tunnel");
        let _all: Vec<_> = (0..16)
            .map(|_| tunnel.clone().try_acquire_owned().expect("a turn"))
            .collect();
        assert!(
            g.inner.turns("tunnel").try_acquire().is_err(),
            "tunnel turns all taken"
        );
        assert!(
            g.inner.turns("front").try_acquire().is_ok(),
            "the front does not wait behind the tunnel's storm"
        );
    }

    #[test]
    fn validation_names_the_field() {
        let mut l = PreAuthLimits::default();
        assert!(l.validate().is_ok());
        l.max_pending = 0;
        assert!(l.validate().unwrap_err().contains("max_pending"));
        l = PreAuthLimits {
            max_pending_per_source: 10_000,
            ..Default::default()
        };
        assert!(l.validate().unwrap_err().contains("max_pending_per_source"));
        l = PreAuthLimits {
            max_handshaking: 0,
            ..Default::default()
        };
        assert!(l.validate().unwrap_err().contains("max_handshaking"));
    }
}
