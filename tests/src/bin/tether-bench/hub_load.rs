//! The traffic of the hub figures and what is measured of it: bench
//! messages, publishing with retries while a queue is full, timed
//! throughput runs checked for loss, duplication and order, paced
//! publishing for the delivery latency, and CPU time per message by role.

use std::ops::{Range, Sub};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail, ensure};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use tether_cloudhub::hub::{CloudHub, HubError};
use tether_hub::dispatch::Event;
use tether_hub::{Content, Message, PublishError, Route};

use crate::figures::phase;
use crate::stats::{self, Latency, ratio};

/// The node of the single-node figures.
pub(crate) const NODE: &str = "hub-bench";
/// Wait after a publish refused because the node's queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(1);
/// The latency figure's publish tick.
const TICK: Duration = Duration::from_millis(1);
/// Publishes of the latency figure in flight at once.
const MAX_IN_FLIGHT: usize = 64;

/// A bench message: number `n` of `resource`, stamped with the nanoseconds
/// from the figure's start at which it was due (latency figure; else 0).
pub(crate) fn message(resource: &str, n: u64, due_ns: u64) -> Message {
    Message::new(
        Route {
            source: "tether-bench".into(),
            group: "bench".into(),
            operation: "update".into(),
            resource: resource.into(),
        },
        Content::Json(serde_json::json!({ "n": n, "due_ns": due_ns })),
    )
}

/// `(resource, n, due_ns)` of a bench message; `None` for link events.
pub(crate) fn parse(ev: Event) -> anyhow::Result<Option<(String, u64, u64)>> {
    match ev {
        Event::Message { message, .. } => {
            let Content::Json(v) = &message.content else {
                bail!("unexpected content {:?}", message.content);
            };
            let field = |k: &str| v[k].as_u64().with_context(|| format!("no {k} in {v}"));
            Ok(Some((
                message.route.resource,
                field("n")?,
                field("due_ns")?,
            )))
        }
        Event::Failed { msg_id, .. } => bail!("message {msg_id} was reported failed"),
        Event::Online { .. } | Event::Offline { .. } => Ok(None),
    }
}

/// Publishes `make(i)` for every `i` in `range` to `node`: one `publish`
/// for a single message, else one `publish_batch` (as the HTTP API does with
/// an NDJSON body), resending the refused rest while the node's queue is
/// full. Returns how many publishes were refused for a full queue.
pub(crate) async fn publish(
    cloud: &CloudHub,
    node: &str,
    range: Range<u64>,
    make: impl Fn(u64) -> Message,
    deadline: Instant,
) -> anyhow::Result<u64> {
    let mut next = range.start;
    let mut queue_full = 0;
    while next < range.end {
        let (accepted, refused) = if range.end - next == 1 {
            match cloud.publish(node, make(next)).await {
                Ok(_) => (1, None),
                Err(e) => (0, Some(e)),
            }
        } else {
            let batch = (next..range.end).map(&make).collect();
            let (ids, refused) = cloud.publish_batch(node, batch).await;
            (ids.len() as u64, refused)
        };
        next += accepted;
        match refused {
            None => {}
            Some(HubError::Publish(PublishError::QueueFull { .. })) => {
                queue_full += 1;
                ensure!(
                    Instant::now() < deadline,
                    "the queue for {node} stayed full until the deadline"
                );
                tokio::time::sleep(QUEUE_FULL_PAUSE).await;
            }
            Some(e) => return Err(e).with_context(|| format!("publish to {node}")),
        }
    }
    Ok(queue_full)
}

/// CPU time used so far: per [`stats::ROLES`], and by the store writer
/// threads of all hubs (counted in the client role too).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Cpu {
    roles: [Duration; 4],
    store: Duration,
}

impl Cpu {
    pub(crate) fn now() -> anyhow::Result<Self> {
        Ok(Self {
            roles: stats::cpu_by_role()?,
            store: stats::cpu_of_threads("hub-store")?,
        })
    }

    /// Microseconds per message: total, then client (bench publishers and
    /// subscribers, without the store writers), cloud, edge, store writers.
    pub(crate) fn us_per_msg(&self, msgs: u64) -> [f64; 5] {
        let us = |d: Duration| d.as_secs_f64() * 1e6 / msgs.max(1) as f64;
        let total: Duration = self.roles.iter().sum();
        [
            us(total),
            us(self.roles[0].saturating_sub(self.store)),
            us(self.roles[3]),
            us(self.roles[2]),
            us(self.store),
        ]
    }
}

impl std::ops::Add for Cpu {
    type Output = Cpu;

    fn add(self, other: Cpu) -> Cpu {
        let mut roles = self.roles;
        for (r, o) in roles.iter_mut().zip(other.roles) {
            *r += o;
        }
        Cpu {
            roles,
            store: self.store + other.store,
        }
    }
}

impl Sub for Cpu {
    type Output = Cpu;

    fn sub(self, before: Cpu) -> Cpu {
        let mut roles = self.roles;
        for (r, b) in roles.iter_mut().zip(before.roles) {
            *r = r.saturating_sub(b);
        }
        Cpu {
            roles,
            store: self.store.saturating_sub(before.store),
        }
    }
}

/// What a throughput figure measured.
pub(crate) struct Rate {
    pub(crate) msgs: u64,
    pub(crate) elapsed: Duration,
    pub(crate) cpu: Cpu,
    pub(crate) queue_full: u64,
}

impl Rate {
    pub(crate) fn per_sec(&self) -> f64 {
        ratio(self.msgs as f64, self.elapsed.as_secs_f64())
    }
}

/// The runs of one throughput figure: the fastest one counts (the machine
/// is shared, and outside load only ever slows a run down); CPU time and
/// queue-full refusals are summed over all of them.
#[derive(Default)]
pub(crate) struct Runs {
    pub(crate) best: Option<Rate>,
    pub(crate) rates: Vec<f64>,
    pub(crate) msgs: u64,
    pub(crate) cpu: Cpu,
    pub(crate) queue_full: u64,
}

impl Runs {
    pub(crate) fn add(&mut self, r: Rate) {
        self.rates.push(r.per_sec());
        self.msgs += r.msgs;
        self.cpu = self.cpu + r.cpu;
        self.queue_full += r.queue_full;
        if self.best.as_ref().is_none_or(|b| r.per_sec() > b.per_sec()) {
            self.best = Some(r);
        }
    }

    pub(crate) fn per_sec(&self) -> f64 {
        self.best.as_ref().map_or(0.0, Rate::per_sec)
    }
}

/// What one throughput run publishes: `publishers` tasks, each on its own
/// resource `{prefix}{task}`, `per_task` messages each, in batches of `batch`.
#[derive(Clone, Copy)]
pub(crate) struct Load<'a> {
    pub(crate) prefix: &'a str,
    pub(crate) publishers: usize,
    pub(crate) per_task: u64,
    pub(crate) batch: usize,
}

/// Publishes `load` to [`NODE`]; the clock runs from the first publish
/// until the edge's subscriber has every message, each resource's exactly
/// once and in order.
async fn throughput(
    cloud: &CloudHub,
    down: &mut mpsc::Receiver<Event>,
    load: &Load<'_>,
    limit: Duration,
) -> anyhow::Result<Rate> {
    let Load {
        prefix,
        publishers,
        per_task,
        batch,
    } = *load;
    let cpu_before = Cpu::now()?;
    let started = Instant::now();
    let deadline = started + limit;
    let mut tasks = JoinSet::new();
    for t in 0..publishers {
        let cloud = cloud.clone();
        let resource = format!("{prefix}{t}");
        tasks.spawn(async move {
            let mut queue_full = 0;
            let mut n = 0;
            while n < per_task {
                let end = (n + batch as u64).min(per_task);
                let make = |i| message(&resource, i, 0);
                queue_full += publish(&cloud, NODE, n..end, make, deadline).await?;
                n = end;
            }
            anyhow::Ok(queue_full)
        });
    }
    let total = publishers as u64 * per_task;
    let mut next = vec![0u64; publishers];
    let mut got = 0;
    let mut queue_full = 0;
    while got < total {
        let ev = tokio::select! {
            ev = tokio::time::timeout_at(deadline, down.recv()) => ev
                .map_err(|_| anyhow!("only {got} of {total} messages arrived within {limit:?}"))?
                .context("the edge subscription ended")?,
            Some(done) = tasks.join_next() => {
                queue_full += done.context("publisher task")??;
                continue;
            }
        };
        let Some((resource, n, _)) = parse(ev)? else {
            continue;
        };
        let t = resource
            .strip_prefix(prefix)
            .and_then(|t| t.parse::<usize>().ok())
            .filter(|t| *t < publishers)
            .with_context(|| format!("message for an unexpected resource {resource:?}"))?;
        ensure!(
            n == next[t],
            "{resource}: message {n} arrived where {} was due (lost, duplicated or reordered)",
            next[t]
        );
        next[t] += 1;
        got += 1;
    }
    let elapsed = started.elapsed();
    let cpu = Cpu::now()? - cpu_before;
    while let Some(done) = tasks.join_next().await {
        queue_full += done.context("publisher task")??;
    }
    Ok(Rate {
        msgs: total,
        elapsed,
        cpu,
        queue_full,
    })
}

/// What the latency figure measured.
pub(crate) struct Delivery {
    pub(crate) msgs: u64,
    pub(crate) rate: f64,
    /// Due time to delivery at the edge's subscriber, per message.
    pub(crate) latency: Latency,
    /// Due time to the publish call's return (stored durably), per call.
    pub(crate) stored: Latency,
}

/// Publishes `rate` messages per second to [`NODE`] for `window`: at each
/// 1 ms tick the messages that fall due in it go out as one publish (its
/// own task, at most [`MAX_IN_FLIGHT`] at once). Each message's latency runs
/// from its tick's scheduled time (so a publisher that falls behind counts
/// against the hub) until the edge's subscriber has it.
pub(crate) async fn delivery_latency(
    cloud: &CloudHub,
    down: &mut mpsc::Receiver<Event>,
    rate: f64,
    window: Duration,
    limit: Duration,
) -> anyhow::Result<Delivery> {
    let total = ((rate * window.as_secs_f64()) as u64).max(1);
    let t0 = Instant::now();
    let deadline = t0 + limit;
    let publisher = {
        let cloud = cloud.clone();
        async move {
            let mut tick = tokio::time::interval_at(t0, TICK);
            tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
            let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
            let mut tasks = JoinSet::new();
            let mut stored = Vec::new();
            let mut next = 0;
            while next < total {
                let at = tick.tick().await;
                let since = at.duration_since(t0);
                let due = (((since + TICK).as_secs_f64() * rate) as u64).min(total);
                if due > next {
                    let permit = in_flight.clone().acquire_owned().await?;
                    let due_ns = since.as_nanos() as u64;
                    let cloud = cloud.clone();
                    tasks.spawn(async move {
                        let make = |i| message("latency", i, due_ns);
                        publish(&cloud, NODE, next..due, make, deadline).await?;
                        drop(permit);
                        anyhow::Ok(at.elapsed())
                    });
                    next = due;
                }
                while let Some(done) = tasks.try_join_next() {
                    stored.push(done.context("publisher task")??);
                }
            }
            while let Some(done) = tasks.join_next().await {
                stored.push(done.context("publisher task")??);
            }
            anyhow::Ok(stored)
        }
    };
    let receiver = async {
        let mut seen = vec![false; total as usize];
        let mut samples = Vec::with_capacity(total as usize);
        while samples.len() < total as usize {
            let ev = tokio::time::timeout_at(deadline, down.recv())
                .await
                .map_err(|_| {
                    anyhow!(
                        "only {} of {total} messages arrived within {limit:?}",
                        samples.len()
                    )
                })?
                .context("the edge subscription ended")?;
            let now = Instant::now();
            let Some((resource, n, due_ns)) = parse(ev)? else {
                continue;
            };
            ensure!(resource == "latency", "unexpected resource {resource:?}");
            let slot = seen
                .get_mut(n as usize)
                .with_context(|| format!("message {n} was never published"))?;
            ensure!(!*slot, "message {n} arrived twice");
            *slot = true;
            samples.push(now.duration_since(t0 + Duration::from_nanos(due_ns)));
        }
        anyhow::Ok(samples)
    };
    let (stored, samples) = tokio::try_join!(publisher, receiver)?;
    Ok(Delivery {
        msgs: total,
        rate,
        latency: Latency::from_samples(samples),
        stored: Latency::from_samples(stored),
    })
}

/// Runs `load` `reps` times, each bounded by `limit`.
pub(crate) async fn throughput_runs(
    cloud: &CloudHub,
    down: &mut mpsc::Receiver<Event>,
    load: Load<'_>,
    reps: usize,
    limit: Duration,
) -> anyhow::Result<Runs> {
    let mut runs = Runs::default();
    for rep in 0..reps {
        let prefix = format!("{}{rep}-", load.prefix);
        let this = Load {
            prefix: &prefix,
            ..load
        };
        let run = throughput(cloud, down, &this, limit);
        let name = format!("hub {} run {rep}", load.prefix);
        runs.add(phase(&name, limit + Duration::from_secs(5), run).await?);
    }
    Ok(runs)
}
