//! How Tether retries Kubernetes API calls: which failures are worth another
//! try (conflicts, throttling, server errors, transport errors) and a bounded,
//! jittered schedule built on the tunnel's [`Backoff`], so that many replicas
//! or nodes failing together do not retry together, and nothing retries forever.

use std::time::Duration;

use tether_tunnel::Backoff;

/// A bounded retry schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First delay (default 200 ms); later ones double, with jitter.
    pub base: Duration,
    /// Longest delay (default 10 s).
    pub max: Duration,
    /// Attempts in all, the first included (default 10).
    pub attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(200),
            max: Duration::from_secs(10),
            attempts: 10,
        }
    }
}

impl RetryPolicy {
    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::new(self.base, self.max)
    }
}

/// The HTTP status of an API error, if the apiserver answered.
pub(crate) fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// True for failures another attempt may cure: 409 Conflict, 429, 5xx, and
/// transport errors (connection refused or reset, timeouts).
pub(crate) fn retriable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 409 || s.code == 429 || s.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

/// Adapts [`Backoff`] to kube-runtime's watcher backoff, so watch restarts
/// after errors follow the same jittered schedule (and tests can shorten it).
pub(crate) struct WatchBackoff {
    inner: Backoff,
}

impl WatchBackoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Self {
            inner: Backoff::new(base, max),
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.inner.next_delay())
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.inner.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            ..Default::default()
        }))
    }

    #[test]
    fn retries_only_what_may_pass_later() {
        for code in [409, 429, 500, 503] {
            assert!(retriable(&api(code)), "{code}");
        }
        for code in [400, 403, 404, 422] {
            assert!(!retriable(&api(code)), "{code}");
        }
        assert_eq!(status_code(&api(404)), Some(404));
        let serde = serde_json::from_str::<u8>("x").unwrap_err();
        assert!(!retriable(&kube::Error::SerdeError(serde)));
    }
}
