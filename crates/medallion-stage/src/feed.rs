//! Upstream events of the units a replica holds: one durable consumer per
//! unit (so the next holder goes on where this one acked), pulled in
//! bounded fetches by a task per unit, all into one channel the stage reads
//! in micro-batches.
//!
//! Fetches rather than a continuous pull: when a unit is handed over, its
//! task finishes the fetch in hand and stops, so every message it received
//! is processed and acked here — the next holder starts with no message
//! waiting out an ack wait for redelivery. A stopping unit's last messages
//! jump the queue: on a busy replica the channel holds other units' work
//! enough for many steps, and the handover would wait for all of it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::AckPolicy, consumer::pull};
use futures::StreamExt;
use medallion_bus::BusError;
use medallion_bus::batching::BatchLimits;
use medallion_bus::ownership::UnitId;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Bytes the server may send per fetch: a backlog of big events is sent a
/// slice at a time, never all at once to a busy stage.
const FETCH_BYTES: usize = 16 << 20;
const FETCH_MESSAGES: usize = 200;
/// How long one fetch waits for messages before the next is asked for.
const FETCH_EXPIRES: Duration = Duration::from_secs(1);
/// Items of the channel, as many as it holds.
const CHANNEL: usize = 2 * FETCH_MESSAGES;

enum Item {
    Message(UnitId, jetstream::Message),
    /// The unit's task stopped after a graceful stop; nothing more comes.
    Ended(UnitId),
}

impl Item {
    fn unit(&self) -> &UnitId {
        match self {
            Item::Message(u, _) | Item::Ended(u) => u,
        }
    }
}

/// What [`Feeds::next`] gathered.
#[derive(Default)]
pub struct FeedBatch {
    pub messages: Vec<(UnitId, jetstream::Message)>,
    /// Units whose feeds have stopped: every message they received is in
    /// this batch or an earlier one.
    pub ended: Vec<UnitId>,
}

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The durable consumer of one unit: `<durable_prefix>-<domain>-<product>-<partition>`
/// on `subject`, created if missing.
pub async fn unit_consumer(
    js: &jetstream::Context,
    stream: &str,
    durable_prefix: &str,
    unit: &UnitId,
    subject: String,
    ack_wait: Duration,
) -> Result<jetstream::consumer::Consumer<pull::Config>, BusError> {
    let durable = format!(
        "{durable_prefix}-{}-{}-{}",
        unit.domain, unit.product, unit.partition
    );
    let err = |e: String| BusError::Consumer {
        consumer: durable.clone(),
        stream: stream.to_string(),
        message: e,
    };
    let s = js
        .get_stream(stream)
        .await
        .map_err(|e| err(e.to_string()))?;
    s.create_consumer(pull::Config {
        durable_name: Some(durable.clone()),
        description: Some(format!("Medallion {durable_prefix}: unit {unit}")),
        filter_subject: subject,
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        max_ack_pending: 10_000,
        ..Default::default()
    })
    .await
    .map_err(|e| err(e.to_string()))
}

pub struct Feeds {
    tx: mpsc::Sender<Item>,
    rx: mpsc::Receiver<Item>,
    running: HashMap<UnitId, Running>,
    /// Units asked to stop whose end has not been handed out yet.
    stopping: HashSet<UnitId>,
    /// Items read from the channel ahead of their turn, while looking for a
    /// stopping unit's last ones: handed out before the channel's, in order.
    early: VecDeque<Item>,
    /// `early` may hold items of a unit that started stopping since it was
    /// last searched.
    search_early: bool,
    limits: BatchLimits,
    pending: FeedBatch,
    bytes: usize,
    deadline: Option<Instant>,
    /// Messages pulled but dropped unacked (a lost lease, a drain cut
    /// short): the next holder gets them again after the ack wait.
    left: u64,
}

impl Feeds {
    pub fn new(limits: BatchLimits) -> Self {
        let (tx, rx) = mpsc::channel(CHANNEL);
        Feeds {
            tx,
            rx,
            running: HashMap::new(),
            stopping: HashSet::new(),
            early: VecDeque::new(),
            search_early: false,
            limits,
            pending: FeedBatch::default(),
            bytes: 0,
            deadline: None,
            left: 0,
        }
    }

    pub fn is_running(&self, unit: &UnitId) -> bool {
        self.running.contains_key(unit)
    }

    /// Starts pulling a unit's consumer.
    pub fn start(&mut self, unit: UnitId, consumer: jetstream::consumer::Consumer<pull::Config>) {
        self.kill(&unit);
        let stop = CancellationToken::new();
        let task = tokio::spawn(pull_unit(
            unit.clone(),
            consumer,
            self.tx.clone(),
            stop.clone(),
        ));
        self.running.insert(unit, Running { stop, task });
    }

    /// Asks a unit's feed to stop after the fetch in hand; [`FeedBatch::ended`]
    /// reports it once its last message is out.
    pub fn stop(&mut self, unit: &UnitId) {
        if let Some(r) = self.running.get(unit) {
            r.stop.cancel();
            self.stopping.insert(unit.clone());
            self.search_early = true;
        }
    }

    /// Stops a unit's feed at once and forgets what it pulled but was not
    /// handed out yet (the lease is lost: the messages are redelivered to
    /// whoever holds it now).
    pub fn kill(&mut self, unit: &UnitId) {
        if let Some(r) = self.running.remove(unit) {
            r.task.abort();
        }
        self.stopping.remove(unit);
        let before = self.pending.messages.len();
        self.pending.messages.retain(|(u, _)| u != unit);
        self.left += (before - self.pending.messages.len()) as u64;
        let left = &mut self.left;
        self.early.retain(|i| match i {
            Item::Message(u, _) if u == unit => {
                *left += 1;
                false
            }
            Item::Ended(u) => u != unit,
            Item::Message(..) => true,
        });
    }

    /// How many pulled messages were dropped unacked so far.
    pub fn left_unacked(&self) -> u64 {
        self.left
    }

    /// The next micro-batch: waits for a first message (or an ended feed),
    /// then gathers more until a limit or the batch wait. Cancel-safe.
    pub async fn next(&mut self, shutdown: &CancellationToken) -> Option<FeedBatch> {
        loop {
            let full = self.pending.messages.len() >= self.limits.messages
                || self.bytes >= self.limits.bytes;
            if full || !self.pending.ended.is_empty() {
                return Some(self.take());
            }
            if !self.stopping.is_empty() {
                self.take_stopping_early();
                if !self.pending.ended.is_empty() {
                    continue;
                }
            }
            let item = if let Some(i) = self.early.pop_front() {
                i
            } else {
                let item = match self.deadline {
                    None => tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        i = self.rx.recv() => i,
                    },
                    Some(deadline) => {
                        match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                            Err(_) => return Some(self.take()),
                            Ok(i) => i,
                        }
                    }
                };
                // The sender half lives in `self`: never closed.
                item?
            };
            self.accept(item);
        }
    }

    /// Moves the stopping units' items waiting in the channel (behind other
    /// units' messages) into the batch, and sets the others aside in order.
    fn take_stopping_early(&mut self) {
        let searched = if self.search_early {
            0
        } else {
            self.early.len()
        };
        self.search_early = false;
        // Bounded: what is set aside is held in memory beside the channel.
        while self.early.len() < CHANNEL {
            match self.rx.try_recv() {
                Ok(i) => self.early.push_back(i),
                Err(_) => break,
            }
        }
        if !self
            .early
            .range(searched..)
            .any(|i| self.stopping.contains(i.unit()))
        {
            return;
        }
        let mut rest = VecDeque::with_capacity(self.early.len());
        for (n, item) in std::mem::take(&mut self.early).into_iter().enumerate() {
            if n >= searched && self.stopping.contains(item.unit()) {
                self.accept(item);
            } else {
                rest.push_back(item);
            }
        }
        self.early = rest;
    }

    fn accept(&mut self, item: Item) {
        match item {
            Item::Message(u, m) => {
                // A message a killed feed sent before it was aborted.
                if !self.running.contains_key(&u) {
                    self.left += 1;
                    return;
                }
                if self.deadline.is_none() {
                    self.deadline = Some(Instant::now() + self.limits.wait);
                }
                self.bytes += m.payload.len();
                self.pending.messages.push((u, m));
            }
            Item::Ended(u) => {
                self.stopping.remove(&u);
                if self.running.remove(&u).is_some() {
                    self.pending.ended.push(u);
                }
            }
        }
    }

    fn take(&mut self) -> FeedBatch {
        self.deadline = None;
        self.bytes = 0;
        std::mem::take(&mut self.pending)
    }

    /// Stops every feed at once (shutdown: unacked messages are redelivered).
    pub fn kill_all(&mut self) {
        let units: Vec<UnitId> = self.running.keys().cloned().collect();
        for u in units {
            self.kill(&u);
        }
    }
}

async fn pull_unit(
    unit: UnitId,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    tx: mpsc::Sender<Item>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        let batch = consumer
            .batch()
            .max_messages(FETCH_MESSAGES)
            .max_bytes(FETCH_BYTES)
            .expires(FETCH_EXPIRES)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    warn!(unit = %unit, error = %e, "cannot fetch the unit's events; retrying");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
        };
        failures = 0;
        while let Some(m) = batch.next().await {
            match m {
                Ok(m) => {
                    if tx.send(Item::Message(unit.clone(), m)).await.is_err() {
                        return;
                    }
                }
                // A fetch that ends early (a server status, a reconnect):
                // the next one picks up from the consumer.
                Err(e) => {
                    tracing::debug!(unit = %unit, error = %e, "fetch ended early");
                    break;
                }
            }
        }
    }
    let _ = tx.send(Item::Ended(unit)).await;
}
