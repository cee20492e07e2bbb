//! The tunnel's state as the agent last saw it, for the edge admin
//! endpoint's `/status` (read by `tether edge status`): which state the
//! reconnecting client is in, since when, and the last error that ended a
//! dial or a session. Written by [`crate::run`] at each transition.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// The reconnecting client's state, as operators see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelState {
    /// Dialling the cloud (TCP, TLS, WebSocket upgrade).
    Connecting,
    /// A session is up.
    Connected,
    /// Waiting before the next dial, after a failure or a lost session.
    Backoff,
}

impl TunnelState {
    /// The name used in `/status`, logs and `tether_edge_session_state`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Backoff => "backoff",
        }
    }
}

/// A copy of the status at one moment.
#[derive(Clone, Debug)]
pub struct StatusSnapshot {
    /// Current state.
    pub state: TunnelState,
    /// When the current state was entered.
    pub since: SystemTime,
    /// When the current session came up (only while connected).
    pub connected_since: Option<SystemTime>,
    /// When the next dial starts (only in backoff).
    pub retry_at: Option<SystemTime>,
    /// The last dial failure or session loss, and when; kept after a
    /// reconnect, so a flapping link shows what ended the previous session.
    pub last_error: Option<(String, SystemTime)>,
    /// Sessions established since the agent started.
    pub connects: u64,
}

/// Shared, cheap-to-clone status of the agent's tunnel.
#[derive(Clone, Debug)]
pub struct TunnelStatus(Arc<Mutex<StatusSnapshot>>);

impl Default for TunnelStatus {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(StatusSnapshot {
            state: TunnelState::Connecting,
            since: SystemTime::now(),
            connected_since: None,
            retry_at: None,
            last_error: None,
            connects: 0,
        })))
    }
}

impl TunnelStatus {
    /// A copy of the current status.
    pub fn snapshot(&self) -> StatusSnapshot {
        self.0.lock().expect("status lock").clone()
    }

    fn set(&self, f: impl FnOnce(&mut StatusSnapshot)) {
        f(&mut self.0.lock().expect("status lock"));
    }

    pub(crate) fn connecting(&self) {
        self.set(|s| {
            s.state = TunnelState::Connecting;
            s.since = SystemTime::now();
            s.connected_since = None;
            s.retry_at = None;
        });
    }

    pub(crate) fn connected(&self) {
        self.set(|s| {
            let now = SystemTime::now();
            s.state = TunnelState::Connected;
            s.since = now;
            s.connected_since = Some(now);
            s.retry_at = None;
            s.connects += 1;
        });
    }

    /// Backing off for `delay`; `error` is what ended the dial or session
    /// (`None` when the cloud closed it cleanly).
    pub(crate) fn backoff(&self, delay: Duration, error: Option<String>) {
        self.set(|s| {
            let now = SystemTime::now();
            s.state = TunnelState::Backoff;
            s.since = now;
            s.connected_since = None;
            s.retry_at = Some(now + delay);
            if let Some(e) = error {
                s.last_error = Some((e, now));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_error_outlives_a_reconnect() {
        let st = TunnelStatus::default();
        assert_eq!(st.snapshot().state, TunnelState::Connecting);
        st.backoff(Duration::from_secs(2), Some("connection refused".into()));
        let s = st.snapshot();
        assert_eq!(s.state, TunnelState::Backoff);
        assert!(s.retry_at.is_some());
        st.connecting();
        st.connected();
        let s = st.snapshot();
        assert_eq!(s.state, TunnelState::Connected);
        assert_eq!(s.connects, 1);
        assert!(s.connected_since.is_some() && s.retry_at.is_none());
        assert_eq!(
            s.last_error.map(|e| e.0).as_deref(),
            Some("connection refused")
        );
    }
}
