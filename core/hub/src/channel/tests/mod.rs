//! Channel tests: two channels linked by an in-memory duplex, or one
//! channel against a hand-driven peer speaking the raw framing. Shared
//! helpers here; the tests by concern in the submodules.

mod delivery;
mod liveness;
mod refusals;
mod relay;

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{Accepts, Channel, ChannelConfig, Delivery};
use crate::message::{Content, Message, Route};
use crate::metrics::HubMetrics;
use crate::store::Store;

fn route(resource: &str) -> Route {
    Route {
        source: "test".into(),
        group: "app".into(),
        operation: "update".into(),
        resource: resource.into(),
    }
}

fn yes() -> Accepts {
    Arc::new(|_| true)
}

fn msg(resource: &str, n: u64) -> Message {
    Message::new(route(resource), Content::Json(serde_json::json!(n)))
}

fn pair(
    cfg: ChannelConfig,
) -> (
    Channel,
    mpsc::Receiver<Delivery>,
    Channel,
    mpsc::Receiver<Delivery>,
) {
    let (atx, arx) = mpsc::channel(64);
    let (btx, brx) = mpsc::channel(64);
    let m = HubMetrics::default();
    let a = Channel::open(
        "b",
        "to-b",
        cfg.clone(),
        Store::in_memory(),
        m.clone(),
        atx,
        yes(),
    )
    .unwrap();
    let b = Channel::open("a", "to-a", cfg, Store::in_memory(), m, btx, yes()).unwrap();
    (a, arx, b, brx)
}

fn value(d: Delivery) -> (String, u64) {
    match d {
        Delivery::Message { message, .. } => match message.content {
            Content::Json(v) => (message.route.resource, v.as_u64().unwrap()),
            c => panic!("content {c:?}"),
        },
        d => panic!("unexpected {d:?}"),
    }
}

/// Connects `a` and `b` until `cut` resolves.
async fn link(a: &Channel, b: &Channel, cut: impl std::future::Future<Output = ()>) {
    let (x, y) = tokio::io::duplex(4096);
    tokio::select! {
        _ = a.serve(x) => {}
        _ = b.serve(y) => {}
        _ = cut => {}
    }
}
