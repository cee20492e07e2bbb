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
}

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
}
