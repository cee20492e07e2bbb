//! The shared state of one KubeEdge session: its connections with their
//! bounded queues, the REMOVEs waiting for the writer, and what the read
//! loop does with each message from the edge (ADR 0017).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, mpsc, oneshot};
use tracing::debug;

use super::codec::{MessageType, TunnelMessage};
use super::session::{KubeEdgeOptions, StreamEndHook};

/// What the cloud sends, in order.
pub(super) enum Out {
    /// A tunnel message that belongs to no connection's data (CONNECT).
    Msg(Bytes),
    /// `DATA` of connection `id`: dropped if its REMOVE went out meanwhile.
    Data(u64, Bytes),
    Ping(Bytes),
    Pong(Bytes),
}

/// One connection's state, guarded by the session lock.
pub(super) struct Conn {
    pub(super) queue: VecDeque<Bytes>,
    pub(super) queued: usize,
    /// The edge sent REMOVE_CONNECT: nothing more is sent for it.
    pub(super) edge_removed: bool,
    /// Ended by the cloud, with the reason; reads fail.
    pub(super) failed: Option<&'static str>,
    /// Our REMOVE_CONNECT is queued for the writer.
    pub(super) remove_queued: bool,
    /// ... and written: nothing more is sent for it.
    pub(super) remove_written: bool,
    /// The cloud-side pipe (hyper's connection) is gone.
    pub(super) pipe_dropped: bool,
    pub(super) reader: Option<Waker>,
    pub(super) permit: Option<OwnedSemaphorePermit>,
}

impl Conn {
    pub(super) fn silent(&self) -> bool {
        self.edge_removed || self.remove_queued || self.remove_written
    }

    pub(super) fn wake(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }
}

#[derive(Default)]
pub(super) struct State {
    pub(super) next_id: u64,
    pub(super) conns: HashMap<u64, Conn>,
    pub(super) queued_total: usize,
    pub(super) removes: Vec<u64>,
    /// REMOVEs held back briefly after the cloud side finished, in time
    /// order: the edge usually ends the connection itself right then, and
    /// a REMOVE racing its end can crash it (compat doc, section 8).
    pub(super) deferred: VecDeque<(u64, Instant)>,
    pub(super) probes: VecDeque<(u64, oneshot::Sender<()>)>,
    /// Readers to wake when the read loop next waits for the socket.
    pub(super) wakes: Vec<Waker>,
    /// `close()` was called: no new streams; CLOSE_CONNECT once idle.
    pub(super) closing: bool,
    /// The session is over: every connection fails.
    pub(super) ended: bool,
}

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) out: mpsc::Sender<Out>,
    pub(super) wake_writer: Notify,
    pub(super) killed: AtomicBool,
    pub(super) kill: Notify,
    pub(super) opts: Arc<KubeEdgeOptions>,
    pub(super) on_stream_end: Option<StreamEndHook>,
    pub(super) started: Instant,
    pub(super) rtt_micros: AtomicU64,
}

impl Shared {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("kubeedge session lock")
    }

    pub(super) fn count(&self, reason: &'static str) {
        if let Some(h) = &self.on_stream_end {
            h(reason);
        }
    }

    /// Ends connection `id` from the cloud side: its reads fail, its slot
    /// is freed, and one REMOVE_CONNECT goes out unless the edge ended it.
    pub(super) fn fail(&self, st: &mut State, id: u64, reason: &'static str) {
        let Some(c) = st.conns.get_mut(&id) else {
            return;
        };
        if c.failed.is_some() {
            return;
        }
        c.failed = Some(reason);
        st.queued_total -= c.queued;
        c.queue.clear();
        c.queued = 0;
        c.permit = None;
        c.wake();
        if !c.silent() {
            c.remove_queued = true;
            st.removes.push(id);
            self.wake_writer.notify_one();
        }
        // One line per stream the cloud ends, in the session's span (node):
        // the client only sees its body fail, so the reason is told here.
        tracing::info!(stream.id = id, reason, "kubeedge stream ended by the cloud");
        self.count(reason);
    }

    /// One message from the edge.
    pub(super) fn dispatch(&self, msg: TunnelMessage) {
        let mut st = self.lock();
        let known = st
            .conns
            .get(&msg.id)
            .is_some_and(|c| !c.edge_removed && c.failed.is_none() && !c.pipe_dropped);
        match MessageType::from_wire(msg.kind) {
            Some(MessageType::Data) if known => {
                let n = msg.data.len();
                if n == 0 {
                    return;
                }
                let c = st.conns.get_mut(&msg.id).expect("known");
                c.queue.push_back(msg.data);
                c.queued += n;
                // Woken once the socket's buffered frames are all queued
                // (`wake_readers`): the client then takes many 256-byte
                // pieces in one read instead of one at a time.
                let waker = c.reader.take();
                let over_stream = c.queued > self.opts.stream_buffer;
                st.queued_total += n;
                st.wakes.extend(waker);
                if over_stream {
                    debug!(stream.id = msg.id, "client stalled past the stream bound");
                    self.fail(&mut st, msg.id, "client_stalled");
                } else if st.queued_total > self.opts.session_buffer {
                    let biggest = st
                        .conns
                        .iter()
                        .filter(|(_, c)| c.failed.is_none())
                        .max_by_key(|(_, c)| c.queued)
                        .map(|(id, _)| *id);
                    if let Some(id) = biggest {
                        self.fail(&mut st, id, "session_budget");
                    }
                }
            }
            Some(MessageType::RemoveConnect) if st.conns.contains_key(&msg.id) => {
                let c = st.conns.get_mut(&msg.id).expect("present");
                c.edge_removed = true;
                c.wake();
                if c.pipe_dropped {
                    st.conns.remove(&msg.id);
                }
            }
            // Late DATA or REMOVE for an ended connection: expected, dropped.
            Some(MessageType::Data | MessageType::RemoveConnect) => {
                if !st.conns.contains_key(&msg.id) && msg.id >= st.next_id {
                    debug!(stream.id = msg.id, "data for an unknown connection");
                    self.count("unknown_connection");
                }
            }
            // A type the edge never sends, or none at all: that stream ends.
            _ if known => {
                debug!(
                    stream.id = msg.id,
                    kind = msg.kind,
                    "unexpected message type"
                );
                self.fail(&mut st, msg.id, "bad_input");
            }
            _ => self.count("bad_input"),
        }
    }

    /// Wakes the readers that got data since the last call.
    pub(super) fn wake_readers(&self) {
        let wakes = std::mem::take(&mut self.lock().wakes);
        for w in wakes {
            w.wake();
        }
    }

    /// The session is over: every connection fails at once.
    pub(super) fn end(&self) {
        let mut st = self.lock();
        st.ended = true;
        st.removes.clear();
        for c in st.conns.values_mut() {
            if c.failed.is_none() && !c.edge_removed {
                c.failed = Some("session_ended");
            }
            c.remove_written = true;
            c.permit = None;
            c.wake();
        }
        st.probes.clear();
    }

    pub(super) fn rtt(&self, payload: &[u8]) {
        let mut st = self.lock();
        match payload {
            [b't', b'p', t @ ..] if t.len() == 8 => {
                let sent = u64::from_be_bytes(t.try_into().expect("8 bytes"));
                let now = self.started.elapsed().as_micros() as u64;
                let rtt = now.saturating_sub(sent).max(1);
                self.rtt_micros.store(rtt, Ordering::Relaxed);
            }
            [b't', b'q', n @ ..] if n.len() == 8 => {
                let nonce = u64::from_be_bytes(n.try_into().expect("8 bytes"));
                if let Some(i) = st.probes.iter().position(|(k, _)| *k == nonce)
                    && let Some((_, tx)) = st.probes.remove(i)
                {
                    let _ = tx.send(());
                }
            }
            _ => {}
        }
    }
}
