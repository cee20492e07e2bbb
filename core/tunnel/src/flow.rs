//! The receive flow of one direct h2 session (ADR 0020 decision 2): the
//! [`WindowGovernor`], what each open stream's reader has taken, and h2's own
//! count of what arrived and waits unread. Response bodies and upgraded
//! streams report what their reader pulls; the connection driver ticks once
//! per measured round trip and announces the window the governor decides.
//! [`WindowMetrics`] exports the window, its steps and the reserved bytes.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::{TunnelLimits, WindowError, WindowGovernor};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    direction: &'static str,
}

/// Window metrics of the cloud's direct h2 sessions. Labels are a closed
/// set; gauges sum over sessions, so with one session they are its values.
#[derive(Clone, Debug, Default)]
pub struct WindowMetrics {
    window: Gauge,
    peak: Gauge,
    reserved: Gauge,
    buffered: Gauge,
    steps: Family<StepLabel, Counter>,
}

impl WindowMetrics {
    /// Registers the families (under the caller's prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tunnel_window_bytes",
            "Stream flow-control window the cloud announces (SETTINGS_INITIAL_WINDOW_SIZE), summed over sessions",
            self.window.clone(),
        );
        registry.register(
            "tunnel_window_peak_bytes",
            "Largest stream window any session announced since start",
            self.peak.clone(),
        );
        registry.register(
            "tunnel_window_reserved_bytes",
            "Receive budget reserved by open streams plus a floor share per free slot, summed over sessions",
            self.reserved.clone(),
        );
        registry.register(
            "tunnel_window_buffered_bytes",
            "Bytes received on streams and not yet taken by their readers, summed over sessions (as of the last round trip)",
            self.buffered.clone(),
        );
        registry.register(
            "tunnel_window_steps",
            "Window changes by direction: grow (readers keep up), shrink (a reader stalled or a new stream needed room)",
            self.steps.clone(),
        );
        for direction in ["grow", "shrink"] {
            let _ = self.steps.get_or_create(&StepLabel { direction });
        }
    }

    /// The largest window announced since start.
    pub fn peak(&self) -> i64 {
        self.peak.get()
    }
}

/// What one open stream's reader has taken, against h2's view.
#[derive(Debug, Default)]
struct Track {
    recv: Option<h2::FlowControl>,
    consumed: u64,
    /// Received bytes already reported to the governor.
    reported: u64,
}

#[derive(Debug)]
struct State {
    governor: WindowGovernor,
    tracks: HashMap<u64, Track>,
    next_id: u64,
    /// What the metrics were last told, to apply deltas.
    shown_window: i64,
    shown_reserved: i64,
    shown_buffered: i64,
    waker: Option<Waker>,
    /// Bytes arrived or were taken since the last tick.
    moved: bool,
    /// The last tick saw no bytes move: the driver pings at the keepalive
    /// interval, not once per round trip.
    quiet: bool,
}

/// The shared receive flow of one session.
#[derive(Debug)]
pub(crate) struct Flow {
    state: Mutex<State>,
    metrics: WindowMetrics,
    announced: watch::Sender<u32>,
}

impl Flow {
    pub(crate) fn new(limits: &TunnelLimits, metrics: WindowMetrics) -> Arc<Self> {
        let floor = limits.window_floor();
        let governor = WindowGovernor::new(limits.connection_window(), limits.max_streams, floor)
            .with_max_window(limits.stream_window);
        let flow = Arc::new(Self {
            state: Mutex::new(State {
                governor,
                tracks: HashMap::new(),
                next_id: 0,
                shown_window: 0,
                shown_reserved: 0,
                shown_buffered: 0,
                waker: None,
                moved: false,
                quiet: true,
            }),
            metrics,
            announced: watch::channel(floor).0,
        });
        flow.show(&mut flow.lock());
        flow
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The window first announced, at the handshake.
    pub(crate) fn floor(&self) -> u32 {
        self.lock().governor.floor()
    }

    /// The window the governor wants announced now.
    pub(crate) fn wanted(&self) -> u32 {
        self.lock().governor.window()
    }

    /// True while bytes move on some open stream: the governor then ticks
    /// once per round trip. An open stream that carries nothing (the hub's
    /// stream, an idle `logs -f`) does not count, or every idle session
    /// would ping a hundred times a second.
    pub(crate) fn busy(&self) -> bool {
        let st = self.lock();
        !st.quiet && !st.tracks.is_empty()
    }

    /// The driver wants to hear about window changes.
    pub(crate) fn register(&self, waker: &Waker) {
        let mut st = self.lock();
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            st.waker = Some(waker.clone());
        }
    }

    /// The driver queued `w` as SETTINGS_INITIAL_WINDOW_SIZE.
    pub(crate) fn announced(&self, w: u32) {
        self.announced.send_replace(w);
    }

    /// Admits a stream. When the governor must lower the window first, waits
    /// until the driver has queued it, so the SETTINGS precede the stream's
    /// HEADERS on the wire.
    pub(crate) async fn open(self: &Arc<Self>) -> Result<FlowTicket, WindowError> {
        let (id, change) = {
            let mut st = self.lock();
            let id = st.next_id;
            st.next_id += 1;
            let change = st.governor.open(id)?;
            st.tracks.insert(id, Track::default());
            if change.is_some() {
                self.metrics.steps_of("shrink").inc();
            }
            self.show(&mut st);
            if let Some(w) = st.waker.take() {
                w.wake();
            }
            (id, change)
        };
        let ticket = FlowTicket {
            flow: self.clone(),
            id,
        };
        if let Some(w) = change {
            let mut rx = self.announced.subscribe();
            // The sender lives in `self`, so this ends when the driver
            // queues `w` (or anything lower); the caller bounds it in time.
            let _ = rx.wait_for(|a| *a <= w).await;
        }
        Ok(ticket)
    }

    /// One measured round trip: bring the governor up to date with what h2
    /// received, tick it, and return the window when it changed.
    pub(crate) fn tick(&self) -> Option<u32> {
        let mut guard = self.lock();
        let st = &mut *guard;
        for (id, t) in st.tracks.iter_mut() {
            let Some(recv) = &mut t.recv else { continue };
            // h2 decides on a stream WINDOW_UPDATE only when its reader
            // releases capacity. After the peer acknowledges a lower
            // SETTINGS window, a stream whose reader has already taken
            // everything would wait for an update no release will send (the
            // edge, at its new window, sends nothing more): a deadlock. A
            // zero release each round trip makes h2 look again.
            let _ = recv.release_capacity(0);
            let arrived = t.consumed + recv.used_capacity() as u64;
            if arrived > t.reported {
                st.governor.received(*id, arrived - t.reported);
                t.reported = arrived;
                st.moved = true;
            }
        }
        st.quiet = !std::mem::take(&mut st.moved);
        let before = st.governor.window();
        let change = st.governor.tick();
        if let Some(w) = change {
            let step = if w > before { "grow" } else { "shrink" };
            self.metrics.steps_of(step).inc();
        }
        self.show(st);
        change
    }

    /// Publishes the window and reservation as metric deltas.
    fn show(&self, st: &mut State) {
        let window = i64::from(st.governor.window());
        let reserved = i64::try_from(st.governor.reserved()).unwrap_or(i64::MAX);
        self.metrics.window.inc_by(window - st.shown_window);
        let buffered = i64::try_from(st.governor.buffered()).unwrap_or(i64::MAX);
        self.metrics.reserved.inc_by(reserved - st.shown_reserved);
        self.metrics.buffered.inc_by(buffered - st.shown_buffered);
        self.metrics
            .peak
            .inner()
            .fetch_max(window, Ordering::Relaxed);
        st.shown_window = window;
        st.shown_reserved = reserved;
        st.shown_buffered = buffered;
    }

    /// Takes this session's share out of the summed gauges.
    pub(crate) fn retire(&self) {
        let mut st = self.lock();
        self.metrics.window.dec_by(st.shown_window);
        self.metrics.reserved.dec_by(st.shown_reserved);
        self.metrics.buffered.dec_by(st.shown_buffered);
        st.shown_buffered = 0;
        st.shown_window = 0;
        st.shown_reserved = 0;
    }
}

impl WindowMetrics {
    fn steps_of(&self, direction: &'static str) -> Counter {
        self.steps.get_or_create(&StepLabel { direction }).clone()
    }
}

/// One stream's place in the governor; dropping it closes the stream there.
#[derive(Debug)]
pub(crate) struct FlowTicket {
    flow: Arc<Flow>,
    id: u64,
}

impl FlowTicket {
    /// The stream's response arrived: h2 now counts what it receives.
    pub(crate) fn attach(&self, recv: h2::FlowControl) {
        if let Some(t) = self.flow.lock().tracks.get_mut(&self.id) {
            t.recv = Some(recv);
        }
    }

    /// The reader took `n` bytes (and the caller released them to h2).
    pub(crate) fn pulled(&self, n: usize) {
        let mut st = self.flow.lock();
        let State {
            governor, tracks, ..
        } = &mut *st;
        let Some(t) = tracks.get_mut(&self.id) else {
            return;
        };
        t.consumed += n as u64;
        if t.consumed > t.reported {
            governor.received(self.id, t.consumed - t.reported);
            t.reported = t.consumed;
        }
        governor.consumed(self.id, n as u64);
        if n > 0 {
            st.moved = true;
            if std::mem::take(&mut st.quiet) {
                // Bytes move again: the driver goes back to a tick per
                // round trip now, not at its next keepalive.
                if let Some(w) = st.waker.take() {
                    w.wake();
                }
            }
        }
    }
}

impl Drop for FlowTicket {
    fn drop(&mut self) {
        let mut st = self.flow.lock();
        st.tracks.remove(&self.id);
        if st.governor.close(self.id).is_some() {
            self.flow.metrics.steps_of("shrink").inc();
            if let Some(w) = st.waker.take() {
                w.wake();
            }
        }
        self.flow.show(&mut st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_open_stream_that_carries_nothing_lets_the_driver_rest() {
        let flow = Flow::new(&TunnelLimits::default(), WindowMetrics::default());
        assert!(!flow.busy(), "no stream, no fast ticks");
        // A long-lived stream that carries nothing, such as the hub's.
        let quiet = flow.open().await.unwrap();
        assert!(!flow.busy(), "an open stream alone is not traffic");
        let _ = flow.tick();
        assert!(!flow.busy());

        // Bytes taken wake the driver into a tick per round trip at once.
        let woken = Arc::new(WakeCount::default());
        flow.register(&Waker::from(woken.clone()));
        quiet.pulled(1024);
        assert!(flow.busy());
        assert_eq!(woken.0.load(Ordering::Relaxed), 1);
        quiet.pulled(1024);
        assert_eq!(
            woken.0.load(Ordering::Relaxed),
            1,
            "one wake per quiet spell"
        );

        // A round trip with movement keeps it busy; one without rests it.
        let _ = flow.tick();
        assert!(flow.busy());
        let _ = flow.tick();
        assert!(!flow.busy());
    }

    #[derive(Default)]
    struct WakeCount(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for WakeCount {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn gauges_sum_over_sessions_and_a_retired_session_leaves_them() {
        let limits = TunnelLimits::default();
        let metrics = WindowMetrics::default();
        let a = Flow::new(&limits, metrics.clone());
        let b = Flow::new(&limits, metrics.clone());
        let floor = i64::from(limits.window_floor());
        assert_eq!(metrics.window.get(), 2 * floor);
        let slots = i64::from(limits.max_streams);
        assert_eq!(metrics.reserved.get(), 2 * slots * floor);

        // A stream whose reader keeps up and fills its window grows it.
        let t = a.open().await.unwrap();
        t.pulled(floor as usize);
        let grown = a.tick().expect("the window grows");
        assert!(i64::from(grown) > floor);
        assert_eq!(metrics.window.get(), i64::from(grown) + floor);
        assert_eq!(metrics.peak(), i64::from(grown));
        assert_eq!(metrics.steps_of("grow").get(), 1);

        // The last stream closing returns the session to the floor.
        drop(t);
        assert_eq!(a.wanted(), limits.window_floor());
        assert_eq!(metrics.steps_of("shrink").get(), 1);
        a.retire();
        assert_eq!(metrics.window.get(), floor);
        b.retire();
        assert_eq!(metrics.window.get(), 0);
        assert_eq!(metrics.reserved.get(), 0);
        assert_eq!(metrics.buffered.get(), 0);
    }
}
