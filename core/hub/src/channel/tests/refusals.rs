//! Refusals: bad input from the peer gets a clear error and the session
//! stays up; a full queue and an exceeded rate are clear publish errors.

use std::time::Duration;

use super::{msg, pair, value};
use crate::channel::{ChannelConfig, PublishError, read_raw_frame, write_raw_frame};
use crate::message::{Content, HUB_GROUP, Message};

#[tokio::test]
async fn bad_input_gets_clear_errors_and_the_session_stays_up() {
    let cfg = ChannelConfig {
        max_message: 1024,
        ..ChannelConfig::default()
    };
    let (_a, _arx, b, mut brx) = pair(cfg);
    let (x, mut y) = tokio::io::duplex(1 << 20);
    let serve = tokio::spawn(async move { b.serve(x).await });
    let mut errors = Vec::new();
    let good = msg("r", 7);
    let mut good = good;
    good.prepare().unwrap();
    for frame in [
        b"{not json".to_vec(),
        br#"{"header":{"msg_id":"1"}}"#.to_vec(),
        vec![b' '; 2048],
        Message::control("ack", "no-such-id", Content::None).to_json(),
        good.to_json(),
    ] {
        write_raw_frame(&mut y, &frame).await.unwrap();
    }
    let mut acked = false;
    while errors.len() < 4 || !acked {
        let f = tokio::time::timeout(Duration::from_secs(5), read_raw_frame(&mut y, 1 << 20))
            .await
            .expect("reply")
            .unwrap()
            .unwrap();
        let m = Message::from_json(&f, 1 << 20).unwrap();
        assert_eq!(m.route.group, HUB_GROUP);
        match m.route.operation.as_str() {
            "error" => errors.push(format!("{:?}", m.content)),
            "ack" => {
                assert_eq!(m.header.parent_msg_id, good.header.msg_id);
                acked = true;
            }
            _ => {}
        }
    }
    assert!(errors[0].contains("malformed message"), "{errors:?}");
    assert!(errors[1].contains("no route"), "{errors:?}");
    assert!(
        errors[2].contains("exceeds the 1024-byte limit"),
        "{errors:?}"
    );
    assert!(errors[3].contains("unknown message id"), "{errors:?}");
    assert_eq!(value(brx.recv().await.unwrap()), ("r".into(), 7));
    assert!(!serve.is_finished());
    serve.abort();
}

#[tokio::test]
async fn full_queue_and_rate_limit_are_clear_errors() {
    let cfg = ChannelConfig {
        queue_capacity: 3,
        ..ChannelConfig::default()
    };
    let (a, _arx, _b, _brx) = pair(cfg);
    for n in 0..3 {
        a.publish(msg("r", n)).await.unwrap();
    }
    let e = a.publish(msg("r", 3)).await.unwrap_err();
    assert!(
        matches!(e, PublishError::QueueFull { capacity: 3, .. }),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "queue full for b: 3 messages await acknowledgement"
    );

    let cfg = ChannelConfig {
        rate: Some((1.0, 2.0)),
        ..ChannelConfig::default()
    };
    let (a, _arx, _b, _brx) = pair(cfg);
    a.publish(msg("r", 0)).await.unwrap();
    a.publish(msg("r", 1)).await.unwrap();
    let e = a.publish(msg("r", 2)).await.unwrap_err();
    assert!(
        e.to_string().starts_with("rate limit exceeded for b"),
        "{e}"
    );
}
