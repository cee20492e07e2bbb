//! Budgets of failed bootstrap attempts (ADR 0014).
//!
//! Credentials are checked first and a valid one is never refused by a
//! budget: an mTLS renewal is never counted at all, and a token is checked
//! (in constant time) before any lockout decision. What the budgets bound is
//! failure: a source (IPv4 address or IPv6 /64) past [`MAX_SOURCE_FAILURES`]
//! failures a minute gets 429 for each further *failing* attempt, and a
//! token id whose secret was wrong [`MAX_SECRET_FAILURES`] times in a minute
//! has no secret evaluated until the minute is over. Edges behind one NAT
//! share a source; an attacker among them can make their failing attempts
//! answer 429, never their valid ones.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::TokenRefusal;

/// Failed anonymous attempts per source per window before they are answered 429.
pub(crate) const MAX_SOURCE_FAILURES: u32 = 10;
/// Wrong secrets per existing token id per window before its secret is no
/// longer evaluated: the bound on guessing a token whose id is known.
pub(crate) const MAX_SECRET_FAILURES: u32 = 10;
/// The window of both budgets.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Entries each map keeps; past it, expired ones are dropped first and then
/// the map is cleared (forgetting failures only ever favours a retry).
const MAX_TRACKED: usize = 16_384;

/// Fixed-window failure counters.
struct Counters<K> {
    map: Mutex<HashMap<K, (u32, Instant)>>,
    max: u32,
}

impl<K: Hash + Eq> Counters<K> {
    fn new(max: u32) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            max,
        }
    }

    /// Counts one failure; true when `key` is now past its budget.
    fn fail(&self, key: K) -> bool {
        let mut m = self.map.lock().expect("attempts lock");
        if m.len() >= MAX_TRACKED {
            m.retain(|_, (_, since)| since.elapsed() < WINDOW);
            if m.len() >= MAX_TRACKED {
                m.clear();
            }
        }
        let e = m.entry(key).or_insert((0, Instant::now()));
        if e.1.elapsed() >= WINDOW {
            *e = (0, Instant::now());
        }
        e.0 = e.0.saturating_add(1);
        e.0 > self.max
    }

    /// True when `key` has used its budget in the current window.
    fn exhausted(&self, key: &K) -> bool {
        let m = self.map.lock().expect("attempts lock");
        m.get(key)
            .is_some_and(|(n, since)| *n >= self.max && since.elapsed() < WINDOW)
    }
}

/// The bootstrap server's failure budgets.
pub(crate) struct FailureBudgets {
    sources: Counters<IpAddr>,
    secrets: Counters<String>,
    // Makes "may it be checked, check, count" one step, so concurrent
    // requests cannot exceed the per-token budget.
    serial: Mutex<()>,
}

impl FailureBudgets {
    pub(crate) fn new() -> Self {
        Self {
            sources: Counters::new(MAX_SOURCE_FAILURES),
            secrets: Counters::new(MAX_SECRET_FAILURES),
            serial: Mutex::new(()),
        }
    }

    /// Counts a failed anonymous attempt from `ip`; true when the source is
    /// past its budget, so this failure is answered 429.
    pub(crate) fn source_failed(&self, ip: IpAddr) -> bool {
        self.sources.fail(source_key(ip))
    }

    /// Runs `redeem`, which evaluates the secret of token `id`, unless that
    /// id has had its budget of wrong secrets this window (then `None`);
    /// counts a wrong secret.
    pub(crate) fn check_secret<T>(
        &self,
        id: &str,
        redeem: impl FnOnce() -> Result<T, TokenRefusal>,
    ) -> Option<Result<T, TokenRefusal>> {
        let _serial = self.serial.lock().expect("attempts lock");
        let id = id.to_owned();
        if self.secrets.exhausted(&id) {
            return None;
        }
        let r = redeem();
        if matches!(r, Err(TokenRefusal::WrongSecret)) {
            self.secrets.fail(id);
        }
        Some(r)
    }
}

/// An IPv6 client usually holds a /64: count it as one source.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_count_per_source_and_per_token() {
        let b = FailureBudgets::new();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..MAX_SOURCE_FAILURES {
            assert!(!b.source_failed(ip));
        }
        assert!(b.source_failed(ip));
        assert!(!b.source_failed("10.0.0.2".parse().unwrap()));
        // One IPv6 /64 is one source.
        let (v6a, v6b): (IpAddr, IpAddr) = (
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
        );
        for _ in 0..MAX_SOURCE_FAILURES {
            b.source_failed(v6a);
        }
        assert!(b.source_failed(v6b));
        let wrong = || Err::<(), _>(TokenRefusal::WrongSecret);
        for _ in 0..MAX_SECRET_FAILURES {
            assert!(b.check_secret("aa", wrong).is_some());
        }
        assert!(b.check_secret("aa", || Ok(())).is_none());
        assert_eq!(b.check_secret("bb", || Ok(())), Some(Ok(())));
    }
}
