//! Relaying a queue to another replica: taken in order, removed only once
//! handed over, admitted there with the same ids, a resent relay skipped,
//! and nothing lost or doubled at the receiving peer.

use std::time::Duration;

use super::{link, msg, pair, value};
use crate::channel::ChannelConfig;
use crate::message::Message;

#[tokio::test]
async fn a_relayed_queue_arrives_once_in_order_through_the_other_replica() {
    // `x` is the replica without the peer; `a` holds it, `b` is the peer.
    let (x, _xrx, _, _) = pair(ChannelConfig::default());
    let (a, _arx, b, mut brx) = pair(ChannelConfig {
        rate: Some((0.001, 1.0)),
        ..ChannelConfig::default()
    });
    for n in 0..10 {
        x.publish(msg("r", n)).await.unwrap();
    }
    let first = x.relay_batch(4, usize::MAX);
    assert_eq!(first.len(), 4);
    let parse = |batch: &[crate::channel::Relayed]| -> Vec<Message> {
        batch
            .iter()
            .map(|r| Message::from_json(&r.frame, usize::MAX).unwrap())
            .collect()
    };
    // Admitted past the rate limit (burst 1), ids kept.
    let (n, e) = a.accept_relayed(parse(&first)).await;
    assert!(n == 4 && e.is_none(), "{n} {e:?}");
    // The answer was lost: the same batch again is queued again (the
    // peer drops the copies by id).
    let (n, e) = a.accept_relayed(parse(&first)).await;
    assert!(n == 4 && e.is_none(), "{n} {e:?}");
    assert_eq!(a.queued(), 8);
    let seqs: Vec<u64> = first.iter().map(|r| r.seq).collect();
    x.relayed(&seqs).await;
    assert_eq!(x.queued(), 6);
    let rest = x.relay_batch(100, 1);
    assert_eq!(rest.len(), 1, "the byte bound still takes one");
    let rest = x.relay_batch(100, usize::MAX);
    let (n, e) = a.accept_relayed(parse(&rest)).await;
    assert!(n == 6 && e.is_none(), "{n} {e:?}");
    x.relayed(&rest.iter().map(|r| r.seq).collect::<Vec<_>>())
        .await;
    assert_eq!(x.queued(), 0);
    assert!(x.relay_batch(100, usize::MAX).is_empty());
    let recv = async {
        let mut got = Vec::new();
        while got.len() < 10 {
            got.push(value(brx.recv().await.unwrap()).1);
        }
        got
    };
    let got = tokio::select! {
        got = recv => got,
        _ = link(&a, &b, std::future::pending()) => unreachable!(),
    };
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(brx.try_recv().is_err(), "a message arrived twice");
}

#[tokio::test]
async fn copies_relayed_across_at_once_are_both_kept() {
    // `x` and `y` each hold a copy of one message (a relay whose answer
    // was lost) and relay it to each other at the same moment: each must
    // keep the copy it gets, since each removes its own.
    let (x, _xrx, _, _) = pair(ChannelConfig::default());
    let (y, _yrx, _, _) = pair(ChannelConfig::default());
    x.publish(msg("r", 1)).await.unwrap();
    let from_x = x.relay_batch(10, usize::MAX);
    let copy = |b: &[crate::channel::Relayed]| -> Vec<Message> {
        b.iter()
            .map(|r| Message::from_json(&r.frame, usize::MAX).unwrap())
            .collect()
    };
    assert_eq!(y.accept_relayed(copy(&from_x)).await.0, 1);
    let from_y = y.relay_batch(10, usize::MAX);
    assert_eq!(y.accept_relayed(copy(&from_x)).await.0, 1);
    assert_eq!(x.accept_relayed(copy(&from_y)).await.0, 1);
    x.relayed(&from_x.iter().map(|r| r.seq).collect::<Vec<_>>())
        .await;
    y.relayed(&from_y.iter().map(|r| r.seq).collect::<Vec<_>>())
        .await;
    assert!(x.queued() + y.queued() >= 1, "the message was lost");
}

#[tokio::test]
async fn a_full_queue_takes_a_prefix_of_a_relay() {
    let (x, _xrx, _, _) = pair(ChannelConfig::default());
    let (a, _arx, _, _) = pair(ChannelConfig {
        queue_capacity: 3,
        ..ChannelConfig::default()
    });
    for n in 0..5 {
        x.publish(msg("r", n)).await.unwrap();
    }
    let batch: Vec<Message> = x
        .relay_batch(10, usize::MAX)
        .iter()
        .map(|r| Message::from_json(&r.frame, usize::MAX).unwrap())
        .collect();
    let (taken, refused) = a.accept_relayed(batch).await;
    assert_eq!(taken, 3);
    assert!(refused.unwrap().to_string().starts_with("queue full"));
}

#[tokio::test]
async fn a_message_relayed_away_and_back_is_taken_again() {
    // The node was on `y`, moved to `x`: `x` relayed its message to `y`,
    // and `y` now hands it back. It was never delivered, so it must not be
    // skipped as known.
    let (x, _xrx, _, _) = pair(ChannelConfig::default());
    let (y, _yrx, _, _) = pair(ChannelConfig::default());
    x.publish(msg("r", 1)).await.unwrap();
    let parse = |batch: Vec<crate::channel::Relayed>| -> (Vec<u64>, Vec<Message>) {
        let seqs = batch.iter().map(|r| r.seq).collect();
        let msgs = batch
            .iter()
            .map(|r| Message::from_json(&r.frame, usize::MAX).unwrap())
            .collect();
        (seqs, msgs)
    };
    let (seqs, msgs) = parse(x.relay_batch(10, usize::MAX));
    assert_eq!(y.accept_relayed(msgs).await.0, 1);
    x.relayed(&seqs).await;
    let (seqs, msgs) = parse(y.relay_batch(10, usize::MAX));
    assert_eq!(x.accept_relayed(msgs).await.0, 1);
    y.relayed(&seqs).await;
    assert_eq!((x.queued(), y.queued()), (1, 0));
}

#[tokio::test]
async fn a_new_connection_holds_until_released_and_relayed_messages_go_first() {
    let (a, _arx, b, mut brx) = pair(ChannelConfig::default());
    let connects = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = connects.clone();
    a.on_connect(
        std::sync::Arc::new(move |_: &crate::channel::Channel| {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }),
        Duration::from_secs(30),
    );
    // Queued here first, but accepted elsewhere later than the relayed one.
    a.publish(msg("r", 2)).await.unwrap();
    let (n, e) = a.accept_relayed(vec![msg("r", 1)]).await;
    assert!(n == 1 && e.is_none(), "{n} {e:?}");
    let recv = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(brx.try_recv().is_err(), "sent while held");
        assert_eq!(connects.load(std::sync::atomic::Ordering::Relaxed), 1);
        a.release_hold();
        let first = value(brx.recv().await.unwrap());
        let second = value(brx.recv().await.unwrap());
        (first.1, second.1)
    };
    let got = tokio::select! {
        got = recv => got,
        _ = link(&a, &b, std::future::pending()) => unreachable!(),
    };
    assert_eq!(got, (1, 2));
}
