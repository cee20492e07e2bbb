//! The edge end of the message channel: dials the cloud hub with the node
//! certificate, serves the `tether-hub` stream the cloud opens in the
//! session, and keeps upstream messages in a durable queue across
//! disconnects and restarts.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tether_hub::dispatch::{Dispatcher, Event, Filter, TooManySubscribers};
use tether_hub::{
    Channel, ChannelConfig, HUB_TARGET, HubMetrics, Message, PublishError, RequestError, Store,
    StoreError,
};
use tether_tunnel::{Backoff, Body, Shutdown, TunnelDialer};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

/// The edge's peer name in events.
pub const CLOUD_PEER: &str = "cloud";

/// Edge hub bounds.
#[derive(Clone, Debug)]
pub struct EdgeHubConfig {
    /// Channel bounds; `queue_capacity` bounds the durable upstream queue.
    pub channel: ChannelConfig,
    /// Local subscriptions at most.
    pub max_subscribers: usize,
    /// A subscriber that does not read for this long is dropped.
    pub subscriber_timeout: Duration,
}

impl Default for EdgeHubConfig {
    fn default() -> Self {
        Self {
            channel: ChannelConfig {
                queue_capacity: 10_000,
                ..ChannelConfig::default()
            },
            max_subscribers: 64,
            subscriber_timeout: Duration::from_secs(5),
        }
    }
}

/// The edge hub. Cheap to clone.
#[derive(Clone)]
pub struct EdgeHub {
    channel: Channel,
    dispatcher: Dispatcher,
}

impl EdgeHub {
    /// A hub whose upstream queue lives in `store` (messages queued before
    /// a restart are sent once connected).
    pub fn new(cfg: EdgeHubConfig, store: Store, metrics: HubMetrics) -> Result<Self, StoreError> {
        let (dispatcher, deliveries) =
            Dispatcher::start(cfg.max_subscribers, cfg.subscriber_timeout, metrics.clone());
        let accepts = {
            let d = dispatcher.clone();
            Arc::new(move |m: &Message| d.accepts(CLOUD_PEER, m))
        };
        let channel = Channel::open(
            CLOUD_PEER,
            "up",
            cfg.channel,
            store,
            metrics,
            deliveries,
            accepts,
        )?;
        Ok(Self {
            channel,
            dispatcher,
        })
    }

    /// Queues `message` for the cloud; returns its id once stored durably.
    pub async fn publish(&self, message: Message) -> Result<String, PublishError> {
        self.channel.publish(message).await
    }

    /// Queues the longest acceptable prefix of `batch` in one store
    /// transaction; returns the ids and why the rest was refused.
    pub async fn publish_batch(&self, batch: Vec<Message>) -> (Vec<String>, Option<PublishError>) {
        self.channel.publish_batch(batch).await
    }

    /// Sends a sync request to the cloud and waits for the response.
    pub async fn request(
        &self,
        message: Message,
        timeout: Duration,
    ) -> Result<Message, RequestError> {
        self.channel.request(message, timeout).await
    }

    /// Subscribes to messages from the cloud, failures of upstream
    /// messages, and online/offline of the link.
    pub fn subscribe(&self, filter: Filter) -> Result<mpsc::Receiver<Event>, TooManySubscribers> {
        self.dispatcher.subscribe(filter)
    }

    /// True while the channel to the cloud is up.
    pub fn is_online(&self) -> bool {
        self.channel.is_connected()
    }

    /// Upstream messages not yet acknowledged by the cloud.
    pub fn queued(&self) -> usize {
        self.channel.queued()
    }

    /// Keeps a hub session to the cloud until shutdown, reconnecting with
    /// `backoff`.
    pub async fn run(&self, mut dialer: TunnelDialer, mut backoff: Backoff, shutdown: Shutdown) {
        let span = info_span!("edgehub", node = %dialer.node(), cloud = %dialer.addr());
        async move {
            loop {
                let dialed = tokio::select! {
                    r = dialer.dial() => r,
                    _ = shutdown.triggered() => return,
                };
                let delay = match dialed {
                    Ok(transport) => {
                        let started = tokio::time::Instant::now();
                        let hub = self.clone();
                        let session = tether_tunnel::serve_edge_session(
                            transport,
                            dialer.limits().clone(),
                            {
                                let shutdown = shutdown.clone();
                                move |req| {
                                    let hub = hub.clone();
                                    let shutdown = shutdown.clone();
                                    async move { hub.accept(req, shutdown) }
                                }
                            },
                            shutdown.clone(),
                        );
                        let result = tokio::select! {
                            r = session => r.map_err(|e| e.to_string()),
                            _ = dialer.tls_changed() => Err("certificate renewed".to_owned()),
                        };
                        if shutdown.is_triggered() {
                            return;
                        }
                        // As the agent's tunnel does (ADR 0023).
                        let asked = result.as_ref().ok().and_then(|end| end.reconnect_after);
                        match result {
                            Ok(_) => info!(cloud_asked = ?asked, "hub session closed by the cloud"),
                            Err(e) => info!(reason = %e, "hub session ended"),
                        }
                        backoff.after_session(started.elapsed(), asked)
                    }
                    Err(e) => {
                        warn!(error = %e, "hub dial failed");
                        backoff.next_delay()
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.triggered() => return,
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Accepts the cloud's hub stream and serves the channel on it: the
    /// handler of the hub's own session, and of the `tether-hub` stream
    /// inside the stream tunnel (ADR 0022).
    pub fn accept(&self, mut req: Request<Incoming>, shutdown: Shutdown) -> Response<Body> {
        let is_hub = req.method() == http::Method::CONNECT
            && req.uri().authority().map(|a| a.as_str()) == Some(HUB_TARGET);
        if !is_hub {
            return tether_tunnel::wire::status_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                "this is a hub session; it carries only the tether-hub stream",
            );
        }
        let upgrade = hyper::upgrade::on(&mut req);
        let hub = self.clone();
        tokio::spawn(
            async move {
                let io = match upgrade.await {
                    Ok(io) => hyper_util::rt::TokioIo::new(io),
                    Err(e) => {
                        debug!(error = %e, "hub stream upgrade failed");
                        return;
                    }
                };
                let peer: Arc<str> = CLOUD_PEER.into();
                info!("hub channel up");
                hub.dispatcher
                    .announce(Event::Online { peer: peer.clone() })
                    .await;
                let end = tokio::select! {
                    end = hub.channel.serve(io) => end,
                    _ = shutdown.triggered() => tether_hub::ConnectionEnd::Shutdown,
                };
                info!(reason = %end, "hub channel down");
                if !matches!(end, tether_hub::ConnectionEnd::Replaced) {
                    hub.dispatcher.announce(Event::Offline { peer }).await;
                }
            }
            .in_current_span(),
        );
        Response::new(tether_tunnel::body_empty())
    }
}
