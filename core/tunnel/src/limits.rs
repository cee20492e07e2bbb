//! Bounds and tuning of one tunnel session. Defaults follow the measurements in
//! `docs/PERFORMANCE.md`: large h2 frames for throughput, ~64 KiB WebSocket
//! messages and small idle buffers. A per-session memory budget (ADR 0015)
//! bounds the data buffered across all streams of a session: half of it is the
//! receive side (the h2 connection window), half the send side (per-stream send
//! buffers), and each stream's share is `budget / 2 / max_streams`, so even
//! every stream stalled at once cannot take the window another stream needs.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Limits and timers of a tunnel session; every field has a default.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TunnelLimits {
    /// Concurrent streams per node session (default 128). Further requests get
    /// a "busy" error instead of queueing.
    pub max_streams: u32,
    /// Upper bound of the per-stream flow-control window in bytes (default
    /// 16 MiB). A fixed window (the edge's) is the smaller of this and the
    /// stream's share of `session_budget` (see
    /// [`TunnelLimits::effective_stream_window`]); the cloud's governed window
    /// (ADR 0020) grows up to this when the budget has room.
    pub stream_window: u32,
    /// Bytes one session may buffer across all its streams, both directions
    /// together (default 32 MiB). Half bounds what peers may send us ahead of
    /// our readers (the connection window), half what we queue to send.
    pub session_budget: u32,
    /// Largest h2 frame a peer may send us (default 256 KiB).
    pub max_frame_size: u32,
    /// Largest decoded header block per request or response (default 64 KiB).
    pub max_header_list_size: u32,
    /// Upper bound of the per-stream send buffer in bytes (default 1 MiB); the
    /// buffer used is the smaller of this and the stream's budget share.
    pub max_send_buf: usize,
    /// Payload cap of one outgoing WebSocket message (default 64 KiB).
    pub ws_message_size: usize,
    /// Largest incoming WebSocket message (default 1 MiB); bigger closes the session.
    pub ws_max_incoming: usize,
    /// Interval between h2 PINGs (default 5 s).
    #[serde(with = "secs")]
    pub keepalive_interval: Duration,
    /// A PING not answered within this closes the session (default 10 s).
    #[serde(with = "secs")]
    pub keepalive_timeout: Duration,
    /// Deadline for TCP connect, TLS and WebSocket handshakes (default 10 s).
    #[serde(with = "secs")]
    pub handshake_timeout: Duration,
    /// Edges per second a stopping cloud asks back (default 400; 0: no
    /// pacing). Each session's close tells its edge when to reconnect, so
    /// the edges of a restarted cloud return at about this rate rather than
    /// all at once (ADR 0023). Set it near the TLS handshakes a second the
    /// clouds they return to complete.
    pub reconnect_rate: u32,
    /// Edges a stopping cloud asks back at once, before the paced rest
    /// (default 1000).
    pub reconnect_burst: u32,
}

impl Default for TunnelLimits {
    fn default() -> Self {
        Self {
            max_streams: 128,
            stream_window: 16 << 20,
            // Windows are credit, not allocations: an idle session costs
            // nothing for it, and a busy one needs room for one stream to
            // reach about twice the bandwidth-delay product (ADR 0020).
            session_budget: 32 << 20,
            max_frame_size: 256 << 10,
            max_header_list_size: 64 << 10,
            max_send_buf: 1 << 20,
            ws_message_size: 64 << 10,
            ws_max_incoming: 1 << 20,
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            reconnect_rate: 400,
            reconnect_burst: 1000,
        }
    }
}

impl TunnelLimits {
    /// The receive half of the session budget: the h2 connection window, the
    /// most a peer may send us ahead of our readers across all streams.
    pub fn connection_window(&self) -> u32 {
        (self.session_budget / 2).max(65_535)
    }

    /// One stream's share of the receive half, capped by `stream_window`.
    /// Every stream stalled at once holds at most the connection window, so a
    /// stalled reader never takes the window another stream needs
    /// (TUNNEL-NOTES: stalled readers; ADR 0002 and 0015).
    pub fn effective_stream_window(&self) -> u32 {
        let share = self.connection_window() / self.max_streams.max(1);
        share.min(self.stream_window).max(65_535)
    }

    /// The floor of a governed window (ADR 0020): half a stream's share of
    /// the receive half, so the other half of the budget is a growth pool
    /// that a stream whose reader keeps up may borrow.
    pub fn window_floor(&self) -> u32 {
        (self.connection_window() / self.max_streams.max(1) / 2)
            .min(self.stream_window)
            .max(16 << 10)
    }

    /// One stream's share of the send half, capped by `max_send_buf`: what h2
    /// may queue for one stream beyond the chunk in hand.
    pub fn effective_send_buf(&self) -> usize {
        let share = (self.session_budget / 2 / self.max_streams.max(1)) as usize;
        share.min(self.max_send_buf).max(16 << 10)
    }

    /// When the `i`-th edge of a stopping cloud should reconnect
    /// ([`TunnelLimits::reconnect_rate`]); None without pacing.
    pub fn reconnect_after(&self, i: usize) -> Option<Duration> {
        if self.reconnect_rate == 0 {
            return None;
        }
        let paced = i.saturating_sub(self.reconnect_burst as usize) as f64;
        Some(
            Duration::from_secs_f64(paced / f64::from(self.reconnect_rate))
                .min(crate::MAX_RECONNECT_AFTER),
        )
    }

    /// Refuses values that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_streams == 0 {
            return Err("max_streams must be at least 1".into());
        }
        if !(16_384..=16_777_215).contains(&self.max_frame_size) {
            return Err("max_frame_size must be within 16384..=16777215".into());
        }
        if self.stream_window < 65_535 {
            return Err("stream_window must be at least 65535".into());
        }
        if self.session_budget > i32::MAX as u32 {
            return Err("session_budget must be at most 2147483647".into());
        }
        // Each stream's share of the receive half must be a legal h2 window.
        let least = (128 << 10) * u64::from(self.max_streams);
        if u64::from(self.session_budget) < least {
            return Err(format!(
                "session_budget must be at least max_streams * 128 KiB ({least} bytes for max_streams {})",
                self.max_streams
            ));
        }
        if self.ws_message_size < 1024 || self.ws_message_size > self.ws_max_incoming {
            return Err("ws_message_size must be within 1024..=ws_max_incoming".into());
        }
        if self.keepalive_interval.is_zero() || self.keepalive_timeout.is_zero() {
            return Err("keepalive_interval and keepalive_timeout must be positive".into());
        }
        Ok(())
    }

    /// WebSocket settings: small idle read buffer that grows with traffic, no
    /// write batching inside tungstenite (the adapter batches until h2 flushes).
    /// tungstenite zero-fills its whole read buffer, so every idle session
    /// keeps all of it resident; bulk reads go in chunks of this size out of
    /// rustls' plaintext (a memory copy each), which costs little.
    pub fn ws_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(WS_READ_CHUNK)
            .write_buffer_size(0)
            .max_write_buffer_size(4 * (self.ws_message_size + 1024))
            .max_message_size(Some(self.ws_max_incoming))
            .max_frame_size(Some(self.ws_max_incoming))
    }
}

/// tungstenite's read buffer (and largest single read) per session.
const WS_READ_CHUNK: usize = 1 << 10;

pub(crate) mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopping_cloud_asks_a_burst_back_at_once_and_paces_the_rest() {
        let l = TunnelLimits::default();
        assert_eq!(l.reconnect_after(0), Some(Duration::ZERO));
        assert_eq!(l.reconnect_after(999), Some(Duration::ZERO));
        assert_eq!(l.reconnect_after(1_400), Some(Duration::from_secs(1)));
        // 18,000 edges: the last ones about 42.5 s after the stop.
        assert_eq!(l.reconnect_after(17_000), Some(Duration::from_secs(40)));
        assert_eq!(
            l.reconnect_after(usize::MAX),
            Some(crate::MAX_RECONNECT_AFTER)
        );
        let off = TunnelLimits {
            reconnect_rate: 0,
            ..l
        };
        assert_eq!(off.reconnect_after(5_000), None);
    }
}
