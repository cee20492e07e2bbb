//! Jittered exponential backoff for reconnecting edges: "full jitter" between
//! half and all of the capped exponential delay, so a fleet that lost the cloud
//! at once does not come back at once, and never a zero delay (no busy loop).

use std::time::Duration;

/// Reconnect delay generator.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    seed: u64,
}

impl Backoff {
    /// Delays start near `base` and double up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base: base.max(Duration::from_millis(1)),
            max: max.max(base),
            attempt: 0,
            seed: tether_pki::rand_u64() | 1,
        }
    }

    /// The next delay; grows with each call until [`Backoff::reset`].
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64: cheap, and per-instance seeded.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let frac = (self.seed % 1000) as f64 / 1000.0;
        exp.mul_f64(0.5 + 0.5 * frac)
    }

    /// Call after a connection held long enough to count as healthy.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The delay before reconnecting after a session that lasted `lasted`
    /// and that the cloud, closing it, asked to wait `cloud_asked` after
    /// (ADR 0023). A healthy session ([`HEALTHY_SESSION`]) or an announced
    /// close resets the backoff: failures before the session (a connect
    /// storm) say nothing about when to return, and the cloud just said it.
    /// The cloud's delay comes on top of the backoff, never instead of it.
    pub fn after_session(&mut self, lasted: Duration, cloud_asked: Option<Duration>) -> Duration {
        if lasted >= HEALTHY_SESSION || cloud_asked.is_some() {
            self.reset();
        }
        self.next_delay() + cloud_asked.unwrap_or_default()
    }
}

/// A session that lasted this long counts as healthy and resets the backoff.
pub(crate) const HEALTHY_SESSION: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(
            d.iter()
                .all(|x| *x <= Duration::from_secs(2) && *x > Duration::ZERO)
        );
        assert!(d[9] >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn an_announced_close_or_a_healthy_session_resets_and_the_cloud_delay_adds() {
        let grown = || {
            let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(60));
            for _ in 0..8 {
                b.next_delay();
            }
            b
        };
        let short = Duration::from_secs(1);
        // A short session the cloud ended without a word keeps the growth.
        assert!(grown().after_session(short, None) >= Duration::from_secs(12));
        // A healthy one resets it.
        assert!(grown().after_session(HEALTHY_SESSION, None) <= Duration::from_millis(100));
        // An announced close resets it, and the cloud's delay comes on top.
        let d = grown().after_session(short, Some(Duration::from_secs(5)));
        assert!(
            d > Duration::from_secs(5) && d <= Duration::from_millis(5_100),
            "{d:?}"
        );
    }
}
