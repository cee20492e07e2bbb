//! The decision core of windows that follow the link (ADR 0020, part 2): one
//! session-wide stream window that grows with the measured bandwidth-delay
//! product while readers keep up and falls back to a floor share when a
//! reader stalls or a new stream needs room, under a reservation invariant
//! that keeps the session budget exact and a stalled reader harmless:
//!
//! `Σ reserved(open streams) + (max_streams - open) × floor ≤ receive budget`
//!
//! A stream's reservation is the largest window granted to it since its
//! reader last had nothing buffered, so it bounds what the stream can hold
//! even after the window shrinks. The governor does no I/O: the session
//! feeds it byte counts and one tick per measured round trip, and announces
//! the window it returns (HTTP/2 SETTINGS_INITIAL_WINDOW_SIZE applies to every
//! stream, which is why there is one window and not one per stream).

use std::collections::HashMap;

/// Why a stream could not be admitted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// Every stream slot is taken.
    #[error("{0} streams are open, the session's maximum")]
    Full(u32),
    /// The id is already open.
    #[error("stream {0} is already open")]
    Duplicate(u64),
}

#[derive(Debug, Default)]
struct StreamFlow {
    reserved: u64,
    received: u64,
    consumed: u64,
    // Counts at the previous tick.
    received_then: u64,
    consumed_then: u64,
}

impl StreamFlow {
    fn buffered(&self) -> u64 {
        self.received - self.consumed
    }
}

/// Session-wide window decisions for one receiving side.
#[derive(Debug)]
pub struct WindowGovernor {
    budget: u64,
    max_streams: u32,
    floor: u32,
    max_window: u32,
    window: u32,
    /// The window before the last tick's change: a change reaches the
    /// sender half a round trip after it is sent, so the round trip that
    /// follows a change was mostly sent under this one.
    window_then: u32,
    streams: HashMap<u64, StreamFlow>,
}

impl WindowGovernor {
    /// `budget` is the receive half of the session budget (the connection
    /// window); `floor` the window every stream is always owed. Requires
    /// `max_streams × floor ≤ budget`; what is left is the growth pool.
    pub fn new(budget: u32, max_streams: u32, floor: u32) -> Self {
        let max_streams = max_streams.max(1);
        let floor = floor.min(budget / max_streams).max(1);
        Self {
            budget: u64::from(budget),
            max_streams,
            floor,
            max_window: i32::MAX as u32,
            window: floor,
            window_then: floor,
            streams: HashMap::new(),
        }
    }

    /// Caps the window however much room the budget has (the configured
    /// `stream_window`); never below the floor.
    pub fn with_max_window(mut self, max: u32) -> Self {
        self.max_window = max.clamp(self.floor, i32::MAX as u32);
        self
    }

    /// The stream window to announce now.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// The floor share.
    pub fn floor(&self) -> u32 {
        self.floor
    }

    /// Bytes reserved: open streams' reservations plus a floor share for
    /// every slot still free. Never above the budget.
    pub fn reserved(&self) -> u64 {
        let free = u64::from(self.max_streams) - self.streams.len() as u64;
        self.streams.values().map(|s| s.reserved).sum::<u64>() + free * u64::from(self.floor)
    }

    /// Bytes received and not yet consumed, across all streams.
    pub fn buffered(&self) -> u64 {
        self.streams.values().map(StreamFlow::buffered).sum()
    }

    /// Admits stream `id`. When granting it the current window would break
    /// the invariant, the window first drops to the floor: the returned
    /// window must be announced before the stream opens.
    pub fn open(&mut self, id: u64) -> Result<Option<u32>, WindowError> {
        if self.streams.contains_key(&id) {
            return Err(WindowError::Duplicate(id));
        }
        if self.streams.len() as u32 >= self.max_streams {
            return Err(WindowError::Full(self.max_streams));
        }
        // The new stream trades its free-slot floor for the current window.
        let extra = u64::from(self.window - self.floor);
        let change = if self.reserved() + extra > self.budget {
            self.window = self.floor;
            Some(self.floor)
        } else {
            None
        };
        self.streams.insert(
            id,
            StreamFlow {
                reserved: u64::from(self.window),
                ..StreamFlow::default()
            },
        );
        Ok(change)
    }

    /// The peer sent `n` bytes on `id`.
    pub fn received(&mut self, id: u64, n: u64) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.received += n;
        }
    }

    /// The reader of `id` took `n` bytes. A reader that caught up gives back
    /// what it reserved beyond the current window.
    pub fn consumed(&mut self, id: u64, n: u64) {
        let window = u64::from(self.window);
        if let Some(s) = self.streams.get_mut(&id) {
            s.consumed = (s.consumed + n).min(s.received);
            if s.buffered() == 0 {
                s.reserved = window;
            }
        }
    }

    /// Stream `id` ended; its reservation returns to the pool.
    pub fn close(&mut self, id: u64) -> Option<u32> {
        self.streams.remove(&id);
        if self.streams.is_empty() && self.window != self.floor {
            // Idle sessions owe nobody more than the floor.
            self.window = self.floor;
            return Some(self.floor);
        }
        None
    }

    /// One measured round trip has passed. Shrinks to the floor when a reader
    /// stalled (consumed nothing while holding at least half a window);
    /// when every reader kept up and some stream used the whole window its
    /// sender had, grows to twice what was delivered in the round trip or
    /// twice the window now, whichever is more. (Growth is seen one round
    /// trip late, so without the second term the window would double only
    /// every other round trip.) Returns the new window when it changed.
    pub fn tick(&mut self) -> Option<u32> {
        let window = u64::from(self.window);
        let sent_under = u64::from(self.window_then.min(self.window));
        self.window_then = self.window;
        let mut stalled = false;
        let mut keeping_up = true;
        let mut blocked = false;
        let mut delivered = 0u64;
        for s in self.streams.values_mut() {
            let got = s.received - s.received_then;
            let took = s.consumed - s.consumed_then;
            delivered += took;
            if took == 0 && s.buffered() >= window.div_ceil(2) {
                stalled = true;
            }
            // Keeping up: what is buffered now arrived within this round trip.
            if s.buffered() > got {
                keeping_up = false;
            }
            if got >= sent_under {
                blocked = true;
            }
            s.received_then = s.received;
            s.consumed_then = s.consumed;
        }
        let next = if stalled {
            self.floor
        } else if keeping_up && blocked {
            self.largest_fitting(delivered.max(window).saturating_mul(2))
        } else {
            self.window
        };
        if next == self.window {
            return None;
        }
        if next > self.window {
            for s in self.streams.values_mut() {
                s.reserved = s.reserved.max(u64::from(next));
            }
        }
        self.window = next;
        Some(next)
    }

    /// The largest window up to `want` that every open stream may be granted
    /// without breaking the invariant.
    fn largest_fitting(&self, want: u64) -> u32 {
        let free = u64::from(self.max_streams) - self.streams.len() as u64;
        let fits = |w: u64| {
            let held: u64 = self.streams.values().map(|s| s.reserved.max(w)).sum();
            held + free * u64::from(self.floor) <= self.budget
        };
        let (mut lo, mut hi) = (u64::from(self.window), want.min(u64::from(self.max_window)));
        if !fits(lo) {
            return self.window;
        }
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if fits(mid) { lo = mid } else { hi = mid - 1 }
        }
        lo as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: u32 = 8 << 20;
    const STREAMS: u32 = 128;
    const FLOOR: u32 = 32 << 10;

    /// One round trip of a link carrying `bdp` bytes per round trip to
    /// stream `id`, as far as its window allows; with `read`, its reader
    /// consumes everything it holds.
    fn round_trip(g: &mut WindowGovernor, id: u64, bdp: u64, read: bool) -> Option<u32> {
        let buffered_before = g.streams[&id].buffered();
        let room = u64::from(g.window()).saturating_sub(buffered_before);
        let n = room.min(bdp);
        g.received(id, n);
        if read {
            g.consumed(id, buffered_before + n);
        }
        g.tick()
    }

    #[test]
    fn window_grows_towards_the_link_while_the_reader_keeps_up() {
        let mut g = WindowGovernor::new(BUDGET, STREAMS, FLOOR);
        g.open(1).unwrap();
        // 100 MB/s × 50 ms.
        let bdp = 5_000_000;
        for _ in 0..20 {
            round_trip(&mut g, 1, bdp, true);
            assert!(g.reserved() <= u64::from(BUDGET));
        }
        let pool = BUDGET - STREAMS * FLOOR;
        assert!(
            g.window() > 16 * FLOOR,
            "window {} stayed near the floor {FLOOR}",
            g.window()
        );
        assert!(g.window() <= FLOOR + pool, "window beyond floor + pool");
    }

    #[test]
    fn a_stalled_reader_shrinks_the_window_and_others_keep_their_share() {
        let mut g = WindowGovernor::new(BUDGET, STREAMS, FLOOR);
        g.open(1).unwrap();
        for _ in 0..20 {
            round_trip(&mut g, 1, 5_000_000, true);
        }
        let grown = g.window();
        assert!(grown > FLOOR);
        // The reader stops: it fills its window, then the next round trip
        // sees nothing consumed.
        let shrunk = round_trip(&mut g, 1, 5_000_000, false);
        assert_eq!(shrunk, Some(FLOOR), "a stall drops the window to the floor");
        assert_eq!(round_trip(&mut g, 1, 5_000_000, false), None);
        // It still holds what it was granted: the reservation covers it.
        assert!(g.streams[&1].buffered() <= g.streams[&1].reserved);
        // Every other slot still gets its floor, and the budget holds.
        for id in 2..=u64::from(STREAMS) {
            g.open(id).unwrap();
            g.received(id, u64::from(FLOOR));
            assert!(g.reserved() <= u64::from(BUDGET));
            assert!(g.buffered() <= u64::from(BUDGET));
        }
        assert_eq!(g.open(999), Err(WindowError::Full(STREAMS)));
        // No growth while a reader is stalled.
        assert_eq!(g.tick(), None);
        assert_eq!(g.window(), FLOOR);
        // The stalled reader drains: its reservation returns to the pool.
        let held = g.streams[&1].buffered();
        g.consumed(1, held);
        assert_eq!(g.streams[&1].reserved, u64::from(FLOOR));
    }

    #[test]
    fn growth_seen_a_round_trip_late_still_doubles_every_round_trip() {
        let mut g = WindowGovernor::new(BUDGET, STREAMS, FLOOR);
        g.open(1).unwrap();
        // The sender learns of a change one round trip after it is made.
        let mut senders = g.window();
        for _ in 0..6 {
            let now = g.window();
            g.received(1, u64::from(senders));
            g.consumed(1, u64::from(senders));
            senders = now;
            g.tick();
            assert_eq!(g.window(), 2 * now);
            assert!(g.reserved() <= u64::from(BUDGET));
        }
    }

    #[test]
    fn the_window_never_grows_past_its_cap() {
        let cap = 4 * FLOOR;
        let mut g = WindowGovernor::new(BUDGET, STREAMS, FLOOR).with_max_window(cap);
        g.open(1).unwrap();
        for _ in 0..20 {
            round_trip(&mut g, 1, 5_000_000, true);
        }
        assert_eq!(g.window(), cap);
    }

    #[test]
    fn opening_a_stream_that_would_break_the_budget_lowers_the_window_first() {
        let mut g = WindowGovernor::new(BUDGET, STREAMS, FLOOR);
        g.open(1).unwrap();
        for _ in 0..20 {
            round_trip(&mut g, 1, 50_000_000, true);
        }
        assert!(g.window() > FLOOR);
        // The first stream took the whole pool: a second cannot also get it.
        assert_eq!(g.open(2).unwrap(), Some(FLOOR));
        assert!(g.reserved() <= u64::from(BUDGET));
        // The last stream closing returns an idle session to the floor.
        g.close(2);
        g.close(1);
        assert_eq!(g.window(), FLOOR);
        assert_eq!(g.reserved(), u64::from(STREAMS * FLOOR));
    }
}
