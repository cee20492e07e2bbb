//! Liveness and retries on paused time: a silent peer is dead after the
//! keepalive timeout, keepalives hold an idle link, and an unacknowledged
//! message is resent then reported failed.

use std::time::Duration;

use tokio::time::Instant;

use super::{msg, pair};
use crate::channel::{ChannelConfig, ConnectionEnd, Delivery, read_raw_frame};
use crate::message::Message;

#[tokio::test(start_paused = true)]
async fn a_silent_peer_is_dead_after_the_keepalive_timeout() {
    let cfg = ChannelConfig {
        keepalive_interval: Duration::from_secs(5),
        keepalive_timeout: Duration::from_secs(15),
        ..ChannelConfig::default()
    };
    let (a, _arx, _b, _brx) = pair(cfg);
    let (x, _silent) = tokio::io::duplex(1 << 20);
    let started = Instant::now();
    let end = a.serve(x).await;
    assert!(matches!(end, ConnectionEnd::PeerDead(_)), "{end}");
    assert_eq!(started.elapsed(), Duration::from_secs(15));
    assert!(!a.is_connected());
}

#[tokio::test(start_paused = true)]
async fn keepalives_keep_an_idle_link_up() {
    let cfg = ChannelConfig {
        keepalive_interval: Duration::from_secs(5),
        keepalive_timeout: Duration::from_secs(15),
        ..ChannelConfig::default()
    };
    let (a, _arx, b, _brx) = pair(cfg);
    let (x, y) = tokio::io::duplex(4096);
    tokio::select! {
        _ = a.serve(x) => panic!("a ended"),
        _ = b.serve(y) => panic!("b ended"),
        _ = tokio::time::sleep(Duration::from_secs(120)) => {}
    }
}

#[tokio::test(start_paused = true)]
async fn unacknowledged_messages_are_retried_then_reported_failed() {
    let cfg = ChannelConfig {
        ack_timeout: Duration::from_secs(1),
        max_attempts: 3,
        keepalive_timeout: Duration::from_secs(3600),
        ..ChannelConfig::default()
    };
    let (a, mut arx, _b, _brx) = pair(cfg);
    let id = a.publish(msg("r", 1)).await.unwrap();
    // A peer that reads and never acks.
    let (x, mut y) = tokio::io::duplex(1 << 20);
    let reader = async {
        let mut frames = 0;
        while let Ok(Some(f)) = read_raw_frame(&mut y, 1 << 20).await {
            let m = Message::from_json(&f, 1 << 20).unwrap();
            if !m.is_control() {
                frames += 1;
            }
        }
        frames
    };
    let failed = tokio::select! {
        _ = a.serve(x) => panic!("serve ended"),
        _ = reader => panic!("reader ended"),
        d = arx.recv() => d.unwrap(),
    };
    match failed {
        Delivery::Failed {
            msg_id, attempts, ..
        } => {
            assert_eq!(msg_id, id);
            assert_eq!(attempts, 3);
        }
        d => panic!("unexpected {d:?}"),
    }
    assert_eq!(a.queued(), 0);
}
