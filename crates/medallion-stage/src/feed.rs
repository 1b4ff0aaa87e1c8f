//! Upstream events of the units a replica holds: one durable consumer per
//! unit (so the next holder goes on where this one acked), pulled in
//! bounded fetches by a task per unit, all into one channel the stage reads
//! in micro-batches.
//!
//! Fetches rather than a continuous pull: when a unit is handed over, its
//! task finishes the fetch in hand and stops, so every message it received
//! is processed and acked here — the next holder starts with no message
//! waiting out an ack wait for redelivery.
//!
//! Each unit has a channel of its own, read in turn, and a stopping unit's
//! is read first: behind one shared channel, a handover on a busy replica
//! waited for every other unit's queued messages to be processed first.

use std::collections::{BTreeMap, BTreeSet};
use std::task::Poll;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::AckPolicy, consumer::pull};
use futures::StreamExt;
use medallion_bus::BusError;
use medallion_bus::batching::BatchLimits;
use medallion_bus::ownership::UnitId;
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Bytes the server may send per fetch: a backlog of big events is sent a
/// slice at a time, never all at once to a busy stage.
const FETCH_BYTES: usize = 16 << 20;
const FETCH_MESSAGES: usize = 200;
/// How long one fetch waits for messages before the next is asked for.
const FETCH_EXPIRES: Duration = Duration::from_secs(1);
/// Messages a unit's task may have handed over but not yet taken (the rest
/// of its fetch waits in the client).
const UNIT_CHANNEL: usize = 64;

enum Item {
    Message(jetstream::Message),
    /// The unit's task stopped after a graceful stop; nothing more comes.
    Ended,
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
    rx: mpsc::Receiver<Item>,
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
    running: BTreeMap<UnitId, Running>,
    /// Units asked to stop whose end has not been handed out yet.
    stopping: BTreeSet<UnitId>,
    /// Where the next wait starts reading the units, so each gets its turn.
    turn: usize,
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
        Feeds {
            running: BTreeMap::new(),
            stopping: BTreeSet::new(),
            turn: 0,
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
        let (tx, rx) = mpsc::channel(UNIT_CHANNEL);
        let task = tokio::spawn(pull_unit(unit.clone(), consumer, tx, stop.clone()));
        self.running.insert(unit, Running { stop, task, rx });
    }

    /// Asks a unit's feed to stop after the fetch in hand; [`FeedBatch::ended`]
    /// reports it once its last message is out.
    pub fn stop(&mut self, unit: &UnitId) {
        if let Some(r) = self.running.get(unit) {
            r.stop.cancel();
            self.stopping.insert(unit.clone());
        }
    }

    /// Stops a unit's feed at once and forgets what it pulled but was not
    /// handed out yet (the lease is lost: the messages are redelivered to
    /// whoever holds it now).
    pub fn kill(&mut self, unit: &UnitId) {
        if let Some(mut r) = self.running.remove(unit) {
            r.task.abort();
            while let Ok(item) = r.rx.try_recv() {
                if let Item::Message(_) = item {
                    self.left += 1;
                }
            }
        }
        self.stopping.remove(unit);
        let before = self.pending.messages.len();
        self.pending.messages.retain(|(u, _)| u != unit);
        self.left += (before - self.pending.messages.len()) as u64;
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
            if self.take_stopping() {
                continue;
            }
            let (unit, item) = match self.deadline {
                None => tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    got = self.recv_any() => got,
                },
                Some(deadline) => match tokio::time::timeout_at(deadline, self.recv_any()).await {
                    Err(_) => return Some(self.take()),
                    Ok(got) => got,
                },
            };
            self.accept(&unit, item);
        }
    }

    /// Takes what the stopping units' tasks have sent; whether there was any.
    fn take_stopping(&mut self) -> bool {
        let mut any = false;
        for u in self.stopping.clone() {
            loop {
                let Some(r) = self.running.get_mut(&u) else {
                    self.stopping.remove(&u);
                    break;
                };
                match r.rx.try_recv() {
                    Ok(item) => self.accept(&u, Some(item)),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => self.accept(&u, None),
                }
                any = true;
            }
        }
        any
    }

    /// The next item of any unit, each unit in turn. Pending while no unit
    /// runs: a unit is only started between calls of [`Feeds::next`].
    async fn recv_any(&mut self) -> (UnitId, Option<Item>) {
        std::future::poll_fn(|cx| {
            let n = self.running.len();
            if n == 0 {
                return Poll::Pending;
            }
            let first = self.turn % n;
            let got = first_ready(self.running.iter_mut().skip(first), cx)
                .or_else(|| first_ready(self.running.iter_mut().take(first), cx));
            match got {
                Some(got) => {
                    self.turn = self.turn.wrapping_add(1);
                    Poll::Ready(got)
                }
                None => Poll::Pending,
            }
        })
        .await
    }

    /// `None`: the unit's task is gone without saying so (it panicked); its
    /// feed counts as ended, so a handover does not wait for it forever.
    fn accept(&mut self, u: &UnitId, item: Option<Item>) {
        match item {
            Some(Item::Message(m)) => {
                if self.deadline.is_none() {
                    self.deadline = Some(Instant::now() + self.limits.wait);
                }
                self.bytes += m.payload.len();
                self.pending.messages.push((u.clone(), m));
            }
            Some(Item::Ended) | None => {
                self.stopping.remove(u);
                if self.running.remove(u).is_some() {
                    self.pending.ended.push(u.clone());
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

/// The first of `units` with an item ready (each one polled, so each will
/// wake the task when it has one).
fn first_ready<'a>(
    mut units: impl Iterator<Item = (&'a UnitId, &'a mut Running)>,
    cx: &mut std::task::Context<'_>,
) -> Option<(UnitId, Option<Item>)> {
    units.find_map(|(u, r)| match r.rx.poll_recv(cx) {
        Poll::Ready(item) => Some((u.clone(), item)),
        Poll::Pending => None,
    })
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
                    if tx.send(Item::Message(m)).await.is_err() {
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
    let _ = tx.send(Item::Ended).await;
}
