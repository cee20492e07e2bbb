//! The tasks of one KubeEdge session: the read loop that never waits for a
//! client, the bounded writer, and the kill switch.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::codec::{
    CodecError, FrameReader, MAX_MESSAGE, MessageType, TunnelMessage, WsEvent, encode_frame,
    encode_message, opcode,
};
use super::session::WRITE_BATCH;
use super::state::{Out, Shared};

/// Runs the session: the read loop, the writer, the kill switch; whichever
/// ends first ends it.
pub(super) async fn drive<S>(
    io: S,
    initial: Bytes,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Out>,
    done: watch::Sender<Option<&'static str>>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(io);
    let reader = read_loop(rd, initial, shared.clone());
    let writer = write_loop(wr, shared.clone(), rx);
    tokio::pin!(reader, writer);
    let reason = tokio::select! {
        r = &mut reader => match r {
            Ok(()) => "closed",
            Err(e) => {
                debug!(error = %e, "kubeedge session read ended");
                "error"
            }
        },
        w = &mut writer => match w {
            // Graceful close sent: give the edge a moment to hang up.
            Ok(()) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut reader).await;
                "closed"
            }
            Err(e) => {
                warn!(error = %e, "kubeedge session write failed");
                "error"
            }
        },
        _ = shared.kill.notified() => "revoked",
    };
    // A terminate() that raced the others still counts as revoked.
    let reason = if shared.killed.load(Ordering::Acquire) {
        "revoked"
    } else {
        reason
    };
    shared.end();
    debug!(reason, "kubeedge session ended");
    let _ = done.send(Some(reason));
}

/// Why the session's read loop ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReadEnd {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("no frame from the edge for {0:?}")]
    Idle(Duration),
}

pub(super) async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    initial: Bytes,
    shared: Arc<Shared>,
) -> Result<(), ReadEnd> {
    let mut frames = FrameReader::new(&initial, MAX_MESSAGE);
    let idle = shared.opts.idle_timeout;
    loop {
        let ev = match frames.decode()? {
            Some(ev) => Some(ev),
            None => {
                shared.wake_readers();
                let more = tokio::time::timeout(idle, frames.fill(&mut rd))
                    .await
                    .map_err(|_| ReadEnd::Idle(idle))??;
                if more {
                    continue;
                }
                None
            }
        };
        match ev {
            None | Some(WsEvent::Close) => return Ok(()),
            // Dropped when the writer is full: the edge ignores pongs.
            Some(WsEvent::Ping(p)) => {
                let _ = shared.out.try_send(Out::Pong(p));
            }
            Some(WsEvent::Pong(p)) => shared.rtt(&p),
            Some(WsEvent::Message(m)) => shared.dispatch(TunnelMessage::decode(m)?),
        }
    }
}

/// Why the writer ended the session.
#[derive(Debug, thiserror::Error)]
pub(super) enum WriteEnd {
    #[error("tunnel write failed: {0}")]
    Io(#[from] io::Error),
    #[error("tunnel write did not finish within {0:?}")]
    Timeout(Duration),
}

pub(super) async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Out>,
) -> Result<(), WriteEnd> {
    let mut buf = BytesMut::with_capacity(16 << 10);
    let mut tick = tokio::time::interval(shared.opts.ping_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let deadline = shared.opts.write_timeout;
    loop {
        let mut closing = false;
        let next_deferred = shared.lock().deferred.front().map(|d| d.1);
        tokio::select! {
            biased;
            _ = shared.wake_writer.notified() => {}
            _ = tokio::time::sleep_until(next_deferred.unwrap_or_else(Instant::now).into()), if next_deferred.is_some() => {}
            m = rx.recv() => match m {
                Some(o) => encode(&shared, o, &mut buf),
                None => return Ok(()),
            },
            _ = tick.tick() => {
                let mut p = b"tp".to_vec();
                p.extend_from_slice(&(shared.started.elapsed().as_micros() as u64).to_be_bytes());
                encode_frame(&mut buf, opcode::PING, &p);
            }
        }
        // Everything already queued goes first, so a connection's DATA
        // precedes its REMOVE.
        while buf.len() < WRITE_BATCH
            && let Ok(o) = rx.try_recv()
        {
            encode(&shared, o, &mut buf);
        }
        {
            let mut st = shared.lock();
            let now = Instant::now();
            while let Some(&(id, at)) = st.deferred.front()
                && at <= now
            {
                st.deferred.pop_front();
                if st.conns.get(&id).is_some_and(|c| !c.edge_removed) {
                    st.removes.push(id);
                }
            }
            let removes = std::mem::take(&mut st.removes);
            for id in removes {
                // The edge may have ended it since the REMOVE was queued:
                // then nothing more may be sent for it.
                let Some(c) = st.conns.get_mut(&id).filter(|c| !c.edge_removed) else {
                    continue;
                };
                c.remove_written = true;
                let drop_entry = c.pipe_dropped;
                let frame = encode_message(id, MessageType::RemoveConnect, b"");
                encode_frame(&mut buf, opcode::TEXT, &frame);
                if drop_entry {
                    st.conns.remove(&id);
                }
            }
            if st.closing && st.conns.values().all(|c| c.pipe_dropped) && rx.is_empty() {
                let reason = "tether cloud closed the session (replaced or shutting down); redial";
                encode_frame(
                    &mut buf,
                    opcode::TEXT,
                    &encode_message(0, MessageType::CloseConnect, reason.as_bytes()),
                );
                encode_frame(&mut buf, opcode::CLOSE, &1000u16.to_be_bytes());
                closing = true;
            }
        }
        if !buf.is_empty() {
            let write = async {
                wr.write_all(&buf).await?;
                wr.flush().await
            };
            tokio::time::timeout(deadline, write)
                .await
                .map_err(|_| WriteEnd::Timeout(deadline))??;
            buf.clear();
            if buf.capacity() > 1 << 20 {
                buf = BytesMut::with_capacity(16 << 10);
            }
        }
        if closing {
            let _ = tokio::time::timeout(deadline, wr.shutdown()).await;
            return Ok(());
        }
    }
}

pub(super) fn encode(shared: &Shared, o: Out, buf: &mut BytesMut) {
    match o {
        Out::Msg(m) => encode_frame(buf, opcode::TEXT, &m),
        Out::Data(id, m) => {
            let st = shared.lock();
            // Never after either side's REMOVE (an edge race can crash it).
            let live = st
                .conns
                .get(&id)
                .is_some_and(|c| !c.edge_removed && !c.remove_written);
            if live {
                encode_frame(buf, opcode::TEXT, &m);
            }
        }
        Out::Ping(p) => encode_frame(buf, opcode::PING, &p),
        Out::Pong(p) => encode_frame(buf, opcode::PONG, &p),
    }
}
