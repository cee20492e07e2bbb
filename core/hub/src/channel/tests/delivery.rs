//! Delivery guarantees end to end: once and in order across cuts, stale
//! versions dropped, sync requests answered, and messages deferred until a
//! subscriber takes them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{link, msg, pair, value, yes};
use crate::channel::persist::Persist;
use crate::channel::{Channel, ChannelConfig, Delivery, RequestError};
use crate::message::Content;
use crate::metrics::HubMetrics;
use crate::store::Store;

#[tokio::test]
async fn each_message_arrives_once_in_order_across_many_cuts() {
    let (a, _arx, b, mut brx) = pair(ChannelConfig::default());
    const N: u64 = 2000;
    let publisher = {
        let a = a.clone();
        tokio::spawn(async move {
            for n in 0..N {
                a.publish(msg(&format!("r{}", n % 3), n)).await.unwrap();
            }
        })
    };
    let mut got: HashMap<String, Vec<u64>> = HashMap::new();
    let mut received = 0;
    let mut rounds = 0;
    for round in 0..200u64 {
        rounds += 1;
        let cut = tokio::time::sleep(Duration::from_micros(500 + round * 37 % 3000));
        let recv = async {
            while let Some(d) = brx.recv().await {
                let (r, n) = value(d);
                got.entry(r).or_default().push(n);
                received += 1;
                if received == N {
                    break;
                }
            }
        };
        tokio::select! {
            _ = link(&a, &b, cut) => {}
            _ = recv => {}
        }
        if received == N {
            break;
        }
    }
    // The last round may end by cut; finish on a stable link.
    if received < N {
        let (x, y) = tokio::io::duplex(4096);
        let serve = async { tokio::join!(a.serve(x), b.serve(y)) };
        let recv = async {
            while received < N {
                let (r, n) = value(brx.recv().await.unwrap());
                got.entry(r).or_default().push(n);
                received += 1;
            }
        };
        tokio::select! {
            _ = serve => panic!("link ended"),
            _ = tokio::time::timeout(Duration::from_secs(20), recv) => {}
        }
    }
    publisher.await.unwrap();
    assert_eq!(received, N);
    assert!(
        rounds >= 20,
        "only {rounds} links: the cuts did not interleave"
    );
    for (r, ns) in got {
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "{r} out of order or duplicated"
        );
    }
}

#[tokio::test]
async fn older_resource_versions_are_dropped() {
    let (a, _arx, b, mut brx) = pair(ChannelConfig::default());
    for rv in ["5", "3", "6"] {
        let mut m = msg("ns/pod/x", rv.parse().unwrap());
        m.header.resourceversion = rv.into();
        a.publish(m).await.unwrap();
    }
    a.publish(msg("other", 1)).await.unwrap();
    let recv = async {
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(value(brx.recv().await.unwrap()));
        }
        got
    };
    let got = tokio::select! {
        _ = link(&a, &b, std::future::pending()) => panic!("link ended"),
        g = recv => g,
    };
    assert_eq!(
        got,
        vec![
            ("ns/pod/x".into(), 5),
            ("ns/pod/x".into(), 6),
            ("other".into(), 1)
        ]
    );
}

#[tokio::test]
async fn sync_request_gets_the_peer_response() {
    let (a, _arx, b, mut brx) = pair(ChannelConfig::default());
    let responder = {
        let b = b.clone();
        async move {
            let Some(Delivery::Message { message, .. }) = brx.recv().await else {
                panic!("no request")
            };
            assert!(message.header.sync);
            let mut resp = msg("r", 42);
            resp.route.operation = "response".into();
            resp.header.parent_msg_id = message.header.msg_id;
            b.publish(resp).await.unwrap();
            std::future::pending::<()>().await;
        }
    };
    let resp = tokio::select! {
        _ = link(&a, &b, std::future::pending()) => panic!("link ended"),
        _ = responder => unreachable!(),
        r = a.request(msg("r", 1), Duration::from_secs(5)) => r.unwrap(),
    };
    assert_eq!(resp.content, Content::Json(serde_json::json!(42)));
    let e = a
        .request(msg("r", 2), Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(e, RequestError::Timeout { .. }));
}

#[tokio::test]
async fn a_message_nobody_takes_yet_waits_for_a_subscriber() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let open = Arc::new(AtomicBool::new(false));
    let (atx, _arx) = mpsc::channel(64);
    let (btx, mut brx) = mpsc::channel(64);
    let m = HubMetrics::default();
    let cfg = ChannelConfig::default();
    let a = Channel::open(
        "b",
        "q",
        cfg.clone(),
        Store::in_memory(),
        m.clone(),
        atx,
        yes(),
    )
    .unwrap();
    let gate = open.clone();
    let b = Channel::open(
        "a",
        "q",
        cfg,
        Store::in_memory(),
        m,
        btx,
        Arc::new(move |_| gate.load(Ordering::SeqCst)),
    )
    .unwrap();
    a.publish(msg("r", 1)).await.unwrap();
    a.publish(msg("r", 2)).await.unwrap();
    let got = async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(brx.try_recv().is_err(), "delivered without a subscriber");
        open.store(true, Ordering::SeqCst);
        let first = value(brx.recv().await.unwrap());
        let second = value(brx.recv().await.unwrap());
        while a.queued() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (first, second)
    };
    let (first, second) = tokio::select! {
        _ = link(&a, &b, std::future::pending()) => panic!("link ended"),
        g = tokio::time::timeout(Duration::from_secs(10), got) => g.expect("never delivered"),
    };
    assert_eq!((first, second), (("r".into(), 1), ("r".into(), 2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_arriving_mid_stream_sees_every_message_in_order() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let open = Arc::new(AtomicBool::new(false));
    let (atx, _arx) = mpsc::channel(64);
    let (btx, mut brx) = mpsc::channel(64);
    let m = HubMetrics::default();
    let a = Channel::open(
        "b",
        "q",
        ChannelConfig::default(),
        Store::in_memory(),
        m.clone(),
        atx,
        yes(),
    )
    .unwrap();
    let gate = open.clone();
    let b = Channel::open(
        "a",
        "q",
        ChannelConfig::default(),
        Store::in_memory(),
        m,
        btx,
        Arc::new(move |_| gate.load(Ordering::SeqCst)),
    )
    .unwrap();
    const N: u64 = 300;
    let publisher = {
        let a = a.clone();
        tokio::spawn(async move {
            for n in 0..N {
                a.publish(msg("r", n)).await.unwrap();
                if n % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    let got = async {
        // The application subscribes while messages are in flight.
        tokio::time::sleep(Duration::from_millis(60)).await;
        open.store(true, Ordering::SeqCst);
        let mut got = Vec::new();
        while got.len() < N as usize {
            got.push(value(brx.recv().await.unwrap()).1);
        }
        got
    };
    let got = tokio::select! {
        _ = link(&a, &b, std::future::pending()) => panic!("link ended"),
        g = tokio::time::timeout(Duration::from_secs(30), got) => g.expect("not all delivered"),
    };
    publisher.await.unwrap();
    assert!(
        got.iter().copied().eq(0..N),
        "out of order: {:?}",
        &got[..20]
    );
}

/// An idle channel holds no persister: one starts with the first record,
/// ends after its quiet spell (its queue with it), and the next record
/// starts another.
#[tokio::test(start_paused = true)]
async fn the_persister_starts_on_demand_and_ends_when_quiet() {
    let store = Store::in_memory();
    let (tx, _rx) = mpsc::channel(8);
    let ch = Channel::open(
        "p",
        "q",
        ChannelConfig::default(),
        store.clone(),
        HubMetrics::default(),
        tx,
        yes(),
    )
    .unwrap();
    let held = |ch: &Channel| ch.inner.persist.lock().unwrap().is_some();
    assert!(!held(&ch), "an idle channel has no persister");

    ch.inner.persist(Persist::Seen("first".into())).await;
    assert!(held(&ch));
    assert!(recorded(&store, "first").await);

    tokio::time::sleep(Duration::from_secs(31)).await;
    tokio::task::yield_now().await;
    assert!(!held(&ch), "a quiet persister ends and its queue goes");

    ch.inner.persist(Persist::Seen("second".into())).await;
    assert!(held(&ch), "the next record starts another");
    assert!(recorded(&store, "second").await);
}

/// Whether `id` reaches peer "p"'s seen ids within a second. The store's
/// writer is a thread, so this waits in real time, in bounded steps, while
/// the test's clock is paused.
async fn recorded(store: &Store, id: &str) -> bool {
    for _ in 0..200 {
        if store.load_seen("p").unwrap().iter().any(|s| s == id) {
            return true;
        }
        tokio::time::advance(Duration::from_millis(1)).await;
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}
