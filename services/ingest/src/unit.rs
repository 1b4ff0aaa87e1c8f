//! One unit of ingest: a product partition's subjects read in order → Bronze
//! commits → announced → purged from the stream.
//!
//! A partition reads the plain subject (partition 0) and the keyed slots
//! `s` with `s mod partitions == k`. Each slot is its own cursor — a Delta
//! transaction app id whose version is the highest stream sequence of that
//! slot in Bronze — so slots can move between partitions (the partition
//! count changes) with messages still waiting, and a commit is refused by
//! delta-rs if another replica advanced the same slot meanwhile.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use medallion_bus::batching::{Batch, BatchLimits, next_batch_or_idle};
use medallion_bus::ordered::ordered_messages;
use medallion_bus::ownership::UnitId;
use medallion_bus::streams::{DLQ_SUBJECTS, INGEST_STREAM};
use medallion_bus::{Commit, Operation, headers, publish_commit, trace};
use medallion_lake::{CommitOutcome, Lake, TableOptions, TableWriter};
use medallion_runtime::metrics::PipelineMetrics;
use medallion_runtime::{Runtime, failpoint};
use medallion_spec::layout::{bronze, bronze_schema};
use medallion_spec::{INGEST_SLOTS, IngestSlot, TableRef, ingest_slot_subject, parse_ingest_slot};
use medallion_stage::OwnershipHandle;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::bronze_rows::{RawMessage, to_batch};

const LAYER: &str = "bronze";
/// How long a unit's consumer may hear nothing before its liveness is checked.
const IDLE_CHECK: Duration = Duration::from_secs(3);

/// The unit that parks messages on subjects naming no valid product.
pub(crate) static DLQ_UNIT: LazyLock<UnitId> =
    LazyLock::new(|| UnitId::new("_invalid", "_subjects", 0));

/// What every unit worker of the replica shares.
pub(crate) struct Shared {
    pub lake: Lake,
    pub js: jetstream::Context,
    pub client: async_nats::Client,
    pub stream: jetstream::stream::Stream,
    /// Transaction app id of plain publishes; a keyed slot adds `:s<slot>`.
    pub app_id: String,
    pub metrics: PipelineMetrics,
    pub rt: Runtime,
    pub batch: BatchLimits,
    pub ownership: OwnershipHandle,
    /// Partitions of each registered product (1 for the others).
    pub partition_counts: std::sync::Mutex<std::collections::HashMap<(String, String), u32>>,
}

impl Shared {
    fn problem(&self, key: &str, message: String) {
        warn!(problem = %message, "ingest not ready");
        self.rt.health.set_problem(key, message);
    }

    fn app_id(&self, slot: IngestSlot) -> String {
        match slot {
            IngestSlot::Plain => self.app_id.clone(),
            IngestSlot::Keyed(s) => format!("{}:s{s}", self.app_id),
        }
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The ingest stream subjects of partition `k` of `partitions`.
pub(crate) fn unit_subjects(u: &UnitId, partitions: u32) -> Vec<String> {
    let mut slots: Vec<IngestSlot> = (0..INGEST_SLOTS)
        .map(IngestSlot::Keyed)
        .filter(|s| s.partition(partitions) == u.partition)
        .collect();
    if u.partition == 0 {
        slots.insert(0, IngestSlot::Plain);
    }
    slots
        .into_iter()
        .map(|s| ingest_slot_subject(&u.domain, &u.product, s))
        .collect()
}

/// Names of this process's successive ordered consumers: unique across
/// restarts and replicas (a name is refused while the previous consumer of
/// that name lives, which on a cluster whose node hosting it died is until
/// the node returns).
struct ConsumerName {
    prefix: String,
    n: u64,
}

impl ConsumerName {
    fn new(u: &UnitId) -> Self {
        ConsumerName {
            prefix: format!(
                "{}-{}-{}-{}-{}-{}",
                crate::APP_ID,
                std::process::id(),
                now_us() / 1000,
                u.domain,
                u.product,
                u.partition
            ),
            n: 0,
        }
    }

    fn next(&mut self) -> String {
        self.n += 1;
        format!("{}-{}", self.prefix, self.n)
    }

    fn previous(&self) -> Option<String> {
        (self.n > 0).then(|| format!("{}-{}", self.prefix, self.n))
    }
}

async fn pause(stop: &CancellationToken) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
}

/// Works on one unit until `stop` (a hand-over or shutdown: the batch in
/// hand is committed and purged first) or until aborted (the lease is lost).
pub(crate) async fn unit_worker(
    u: UnitId,
    shared: Arc<Shared>,
    stop: CancellationToken,
    mut partitions: watch::Receiver<u32>,
) {
    let tref = TableRef::bronze(&u.domain, &u.product);
    let mut unit = Committer::new(Unit {
        u: u.clone(),
        tref,
        shared: shared.clone(),
        writer: None,
        trailing: None,
    });
    let mut names = ConsumerName::new(&u);
    while !stop.is_cancelled() {
        // Re-reading starts after the last purge: less to skip.
        unit.finish().await;
        let n = *partitions.borrow_and_update();
        let subjects = unit_subjects(&u, n);
        if let Some(old) = names.previous() {
            let _ = shared.stream.delete_consumer(&old).await;
        }
        // Everything still in the stream on these subjects is not yet known
        // to be in Bronze: read it all (committed messages are skipped).
        let mut messages = match ordered_messages(
            &shared.stream,
            OrderedConfig {
                name: Some(names.next()),
                filter_subjects: subjects.clone(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            },
            medallion_bus::max_payload(&shared.client),
        )
        .await
        {
            Ok(m) => m,
            Err(e) => {
                shared.problem("nats", format!("cannot read the messages of {u}: {e}"));
                pause(&stop).await;
                continue;
            }
        };
        shared.rt.health.clear_problem("nats");
        loop {
            let batch = tokio::select! {
                _ = partitions.changed() => break,
                b = next_batch_or_idle(&mut messages, shared.batch, Some(IDLE_CHECK), &stop) => b,
            };
            match batch {
                Batch::Shutdown => {
                    unit.finish().await;
                    return;
                }
                Batch::Idle => {
                    // The last batch's purge too: its messages are still in
                    // the stream until it lands.
                    if !unit.finish().await {
                        break;
                    }
                    // Purged after every commit: messages still there while
                    // the consumer hears nothing were lost on the way (a
                    // reconnect while a pull was in flight drops them, and an
                    // ordered consumer does not notice a gap at the tail).
                    if waiting(&shared.stream, &u, &subjects).await > 0 {
                        warn!(unit = %u, "consumer idle while the stream holds the unit's messages; re-reading");
                        shared
                            .metrics
                            .errors
                            .with_label_values(&["ingest", "consumer"])
                            .inc();
                        break;
                    }
                    shared.ownership.set_backlog(&u, 0);
                }
                Batch::Messages(batch) => {
                    // The batch before this one is still being committed:
                    // this one waits for it (a failure there means reading
                    // again from the stream, this batch included).
                    if !unit.settle().await {
                        break;
                    }
                    unit.start(batch, &stop);
                }
                Batch::Broken(batch, error) => {
                    warn!(unit = %u, %error, "message stream interrupted; resuming from the stream");
                    shared
                        .metrics
                        .errors
                        .with_label_values(&["ingest", "consumer"])
                        .inc();
                    if unit.settle().await && !batch.is_empty() {
                        unit.start(batch, &stop);
                    }
                    break;
                }
            }
        }
    }
    unit.finish().await;
    if let Some(old) = names.previous() {
        let _ = shared.stream.delete_consumer(&old).await;
    }
}

/// Runs a unit's commits one at a time beside the reading: while batch N is
/// committed, batch N+1 is gathered from the stream (on one core the
/// receiving and the Parquet encoding no longer take turns).
struct Committer {
    idle: Option<Unit>,
    busy: Option<tokio::task::JoinHandle<(Unit, bool)>>,
}

impl Committer {
    fn new(unit: Unit) -> Self {
        Committer {
            idle: Some(unit),
            busy: None,
        }
    }

    /// Waits for the commit in progress; false when it failed or stopped
    /// (read again from the stream). The handle stays in place while
    /// awaited, so a worker aborted here still aborts the commit on drop.
    async fn settle(&mut self) -> bool {
        let Some(h) = self.busy.as_mut() else {
            return true;
        };
        let done = h.await;
        self.busy = None;
        match done {
            Ok((unit, ok)) => {
                self.idle = Some(unit);
                ok
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("a unit's commit task was cancelled: {e}"),
        }
    }

    /// Commits `batch` in the background; call after [`Committer::settle`].
    fn start(&mut self, batch: Vec<jetstream::Message>, stop: &CancellationToken) {
        let mut unit = self.idle.take().expect("settled before the next batch");
        let stop = stop.clone();
        self.busy = Some(tokio::spawn(async move {
            let ok = unit.process(batch, &stop).await;
            (unit, ok)
        }));
    }

    /// Every commit, announcement and purge of the unit done; false as
    /// for [`Committer::settle`].
    async fn finish(&mut self) -> bool {
        let ok = self.settle().await;
        if let Some(unit) = self.idle.as_mut() {
            unit.finish_trailing().await;
        }
        ok
    }
}

impl Drop for Committer {
    /// A worker aborted (its lease lost) takes its commit in progress with it,
    /// as when the commit ran in the worker itself.
    fn drop(&mut self) {
        if let Some(h) = self.busy.take() {
            h.abort();
        }
    }
}

/// Messages in the stream on `subjects` (the unit's).
async fn waiting(stream: &jetstream::stream::Stream, u: &UnitId, subjects: &[String]) -> usize {
    use futures::StreamExt;
    let base = medallion_spec::ingest_subject(&u.domain, &u.product);
    let mut n = 0;
    for filter in [base.clone(), format!("{base}.*")] {
        if let Ok(mut info) = stream.info_with_subjects(filter).await {
            while let Some(Ok((subject, count))) = info.next().await {
                if subjects.contains(&subject) {
                    n += count;
                }
            }
        }
    }
    n
}

struct Unit {
    u: UnitId,
    tref: TableRef,
    shared: Arc<Shared>,
    writer: Option<TableWriter>,
    /// The last batch's announcement and purge, running while the next
    /// batch is gathered and committed: the commit chain never waits on
    /// the bus round trips. One at a time, so events and purges keep order.
    trailing: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Unit {
    /// A unit let go without [`Unit::finish_trailing`] (its worker aborted on
    /// a lost lease) publishes nothing more: the next holder announces its
    /// own versions, and re-reads and skips what was not purged.
    fn drop(&mut self) {
        if let Some(t) = self.trailing.take() {
            t.abort();
        }
    }
}

struct Announcement {
    version: i64,
    schema: arrow::datatypes::SchemaRef,
    batch: arrow::array::RecordBatch,
    links: Vec<String>,
    span: tracing::Span,
}

impl Unit {
    /// Commits one micro-batch and purges it from the stream. False when
    /// the loop should re-read from the stream (stop, or a failure).
    async fn process(&mut self, batch: Vec<jetstream::Message>, stop: &CancellationToken) -> bool {
        let received_us = now_us();
        let span = info_span!(
            "ingest.batch",
            messages = batch.len(),
            bytes = tracing::field::Empty
        );
        let mut msgs = Vec::with_capacity(batch.len());
        let mut bytes = 0usize;
        let mut pending = None;
        for m in &batch {
            let Ok(info) = m.info() else { continue };
            // The last message's count is the batch's: set once below.
            pending = Some(info.pending as i64);
            bytes += m.payload.len();
            let Some((_, _, slot)) = parse_ingest_slot(&m.subject) else {
                continue;
            };
            msgs.push((
                slot,
                RawMessage {
                    subject: m.subject.to_string(),
                    payload: m.payload.clone(),
                    headers: m.headers.clone(),
                    stream_seq: info.stream_sequence,
                    published_us: (info.published.unix_timestamp_nanos() / 1000) as i64,
                    received_us,
                    msg_id: header(m.headers.as_ref(), headers::MSG_ID),
                    traceparent: header(m.headers.as_ref(), headers::TRACEPARENT),
                },
            ));
        }
        if let Some(p) = pending {
            self.shared
                .metrics
                .consumer_pending
                .with_label_values(&[&format!("medallion-ingest-{}", self.u)])
                .set(p);
            self.shared.ownership.set_backlog(&self.u, p);
        }
        span.record("bytes", bytes);
        // The batch span links to every traced message, and each message's
        // trace continues here; the bronze event carries those contexts on.
        let links = trace::continue_traces(
            "ingest.message",
            msgs.iter().filter_map(|(_, m)| m.traceparent.as_deref()),
            &span,
        );
        let event = match self
            .commit(&msgs, &links, stop)
            .instrument(span.clone())
            .await
        {
            Some(a) => a,
            None => return false,
        };
        let mut last: BTreeMap<IngestSlot, u64> = BTreeMap::new();
        for (slot, m) in &msgs {
            let e = last.entry(*slot).or_default();
            *e = (*e).max(m.stream_seq);
        }
        self.finish_trailing().await;
        // What goes out after the commit: the Bronze event, then the purge.
        let (shared, u, tref, stop) = (
            self.shared.clone(),
            self.u.clone(),
            self.tref.clone(),
            stop.clone(),
        );
        self.trailing = Some(tokio::spawn(
            async move {
                if let Some(a) = event {
                    announce(&shared, &u, &tref, a).await;
                }
                failpoint::hit("ingest.before_purge");
                purge(&shared, &u, &last, &stop).await;
            }
            .instrument(span),
        ));
        true
    }

    /// Waits for the last batch's announcement and purge (before the next
    /// one goes out, and before the unit is let go: its purge is the ack).
    async fn finish_trailing(&mut self) {
        if let Some(t) = self.trailing.as_mut() {
            let _ = t.await;
            self.trailing = None;
        }
    }

    async fn writer(&mut self) -> Result<&mut TableWriter, String> {
        if self.writer.is_none() {
            let options = TableOptions {
                description: Some(format!(
                    "Raw messages of medallion.ingest.{}.{}",
                    self.tref.domain, self.tref.name
                )),
                append_only: true,
                partition_columns: vec![],
                unique_columns: vec![bronze::PAYLOAD.into(), bronze::MSG_ID.into()],
            };
            let w = TableWriter::open_or_create(
                &self.shared.lake,
                &self.tref,
                bronze_schema(),
                &self.shared.app_id,
                &options,
            )
            .await
            .map_err(|e| e.to_string())?;
            self.writer = Some(w);
        }
        Ok(self.writer.as_mut().expect("opened above"))
    }

    /// Commits the messages not in Bronze yet, retrying until the lake
    /// accepts them (or stop, `None`: then nothing is purged and the
    /// messages are read again by whoever holds the unit next). Gives the
    /// event to announce, if this call committed a version.
    async fn commit(
        &mut self,
        msgs: &[(IngestSlot, RawMessage)],
        links: &[String],
        stop: &CancellationToken,
    ) -> Option<Option<Announcement>> {
        let product = self.u.product_name();
        let table = self.tref.sql_name();
        let in_bytes: usize = msgs.iter().map(|(_, m)| m.payload.len()).sum();
        let metrics = &self.shared.metrics;
        metrics
            .rows_in
            .with_label_values(&[LAYER, &product])
            .inc_by(msgs.len() as u64);
        metrics
            .bytes_in
            .with_label_values(&[LAYER, &product])
            .inc_by(in_bytes as u64);
        let mut attempt = 0u32;
        loop {
            if stop.is_cancelled() && attempt > 0 {
                return None;
            }
            if !self.shared.ownership.holds(&self.u) {
                return None;
            }
            match self.try_commit(&product, msgs, links).await {
                Ok(announce) => {
                    self.shared.rt.health.clear_problem("lake");
                    return Some(announce);
                }
                Err(e) => {
                    attempt += 1;
                    self.shared
                        .metrics
                        .errors
                        .with_label_values(&["ingest", "commit"])
                        .inc();
                    self.shared
                        .problem("lake", format!("cannot commit to {table}: {e}"));
                    // Whatever happened, re-read where each slot stands.
                    self.writer = None;
                    let delay = Duration::from_millis((100 * 2u64.pow(attempt.min(6))).min(5_000));
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn try_commit(
        &mut self,
        product: &str,
        msgs: &[(IngestSlot, RawMessage)],
        links: &[String],
    ) -> Result<Option<Announcement>, String> {
        let shared = self.shared.clone();
        let metrics = shared.metrics.clone();
        let unit = self.u.clone();
        let writer = self.writer().await?;
        // Per slot: skip what Bronze already has.
        let mut done: BTreeMap<IngestSlot, i64> = BTreeMap::new();
        for (slot, _) in msgs {
            if !done.contains_key(slot) {
                let v = writer
                    .txn_version_of(&shared.app_id(*slot))
                    .await
                    .map_err(|e| e.to_string())?
                    .unwrap_or(0);
                done.insert(*slot, v);
            }
        }
        let fresh: Vec<&RawMessage> = msgs
            .iter()
            .filter(|(slot, m)| m.stream_seq as i64 > done[slot])
            .map(|(_, m)| m)
            .collect();
        let skipped = msgs.len() - fresh.len();
        if skipped > 0 {
            metrics
                .skipped
                .with_label_values(&[LAYER, product])
                .inc_by(skipped as u64);
        }
        if fresh.is_empty() {
            return Ok(None);
        }
        let mut txns: BTreeMap<IngestSlot, i64> = BTreeMap::new();
        for (slot, m) in msgs {
            if m.stream_seq as i64 > done[slot] {
                let e = txns.entry(*slot).or_default();
                *e = (*e).max(m.stream_seq as i64);
            }
        }
        let txns: Vec<(String, i64)> = txns
            .into_iter()
            .map(|(s, v)| (shared.app_id(s), v))
            .collect();
        if !shared.ownership.holds(&unit) {
            return Err(format!("{unit} is not held by this replica any more"));
        }
        let bytes: usize = fresh.iter().map(|m| m.payload.len()).sum();
        let span = info_span!(
            "bronze.commit",
            product,
            layer = LAYER,
            rows = fresh.len(),
            bytes,
            version = tracing::field::Empty
        );
        trace::link_all(&span, links.iter().map(String::as_str));
        let schema = writer.schema().clone();
        let batch = to_batch(&schema, &fresh).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let outcome = writer
            .commit_txns(
                std::slice::from_ref(&batch),
                &txns,
                &[("medallion.rows", (fresh.len() as i64).into())],
            )
            .instrument(span.clone())
            .await
            .map_err(|e| e.to_string())?;
        let version = match outcome {
            CommitOutcome::Committed(v) => v,
            CommitOutcome::AlreadyCommitted(_) => return Ok(None),
        };
        span.record("version", version);
        let committed_us = now_us();
        metrics
            .commit_seconds
            .with_label_values(&[LAYER])
            .observe(started.elapsed().as_secs_f64());
        let latency = metrics.latency_seconds.with_label_values(&[LAYER]);
        for m in &fresh {
            latency.observe((committed_us - m.published_us).max(0) as f64 / 1e6);
        }
        metrics
            .rows_out
            .with_label_values(&[LAYER, product])
            .inc_by(fresh.len() as u64);
        metrics.batch_rows.observe(fresh.len() as f64);
        metrics.committed(&self.tref.sql_name(), version);
        failpoint::hit("ingest.after_commit");
        Ok(Some(Announcement {
            version,
            schema,
            batch,
            links: links.to_vec(),
            span,
        }))
    }
}

impl Shared {
    /// The partition count the stage knows for a product.
    fn partitions(&self, u: &UnitId) -> u32 {
        self.partition_counts
            .lock()
            .expect("not poisoned")
            .get(&(u.domain.clone(), u.product.clone()))
            .copied()
            .unwrap_or(1)
    }
}

/// Publishes the committed rows on the partition subject of the version.
/// A failure here loses nothing: transform reads any version it did not
/// hear about from the table.
async fn announce(shared: &Shared, u: &UnitId, tref: &TableRef, a: Announcement) {
    let commit = Commit {
        table: tref,
        version: a.version,
        operation: Operation::Append,
        schema: a.schema.clone(),
        batches: std::slice::from_ref(&a.batch),
        links: &a.links,
        partition: medallion_spec::version_partition(a.version, shared.partitions(u)),
    };
    match publish_commit(
        &shared.js,
        commit,
        medallion_bus::max_payload(&shared.client),
    )
    .instrument(a.span)
    .await
    {
        Ok(parts) => shared
            .metrics
            .events_published
            .with_label_values(&[LAYER])
            .inc_by(parts as u64),
        Err(e) => {
            shared
                .metrics
                .errors
                .with_label_values(&["ingest", "publish"])
                .inc();
            warn!(table = %tref, version = a.version, error = %e, "bronze event not published; transform will read the commit from the table");
        }
    }
}

/// The purge is the acknowledgement: each slot's messages up to `last` are
/// in Bronze. Given up only at stop: the next holder reads them again and
/// skips them.
async fn purge(
    shared: &Shared,
    u: &UnitId,
    last: &BTreeMap<IngestSlot, u64>,
    stop: &CancellationToken,
) {
    for (slot, seq) in last {
        let subject = ingest_slot_subject(&u.domain, &u.product, *slot);
        loop {
            match shared
                .stream
                .purge()
                .filter(subject.clone())
                .sequence(seq + 1)
                .await
            {
                Ok(_) => break,
                Err(e) => {
                    shared.problem(
                        "nats",
                        format!("cannot acknowledge (purge) the ingest stream: {e}"),
                    );
                    if stop.is_cancelled() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
    shared.rt.health.clear_problem("nats");
}

fn header(h: Option<&HeaderMap>, name: &str) -> Option<String> {
    h.and_then(|h| h.get(name)).map(|v| v.as_str().to_string())
}

/// Parks messages on subjects that name no valid product in the dead-letter
/// stream, with the reason, then purges them.
pub(crate) async fn dead_letter_worker(shared: Arc<Shared>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        match crate::service::invalid_subjects(&shared.stream).await {
            Ok(subjects) if !subjects.is_empty() => {
                let names: Vec<String> = subjects.keys().take(64).cloned().collect();
                if let Err(e) = dead_letter(&shared, names, &stop).await {
                    shared.problem("nats", format!("cannot dead-letter invalid subjects: {e}"));
                }
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot list the ingest stream's subjects"),
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

async fn dead_letter(
    shared: &Shared,
    subjects: Vec<String>,
    stop: &CancellationToken,
) -> Result<(), String> {
    use futures::StreamExt;
    let mut messages = ordered_messages(
        &shared.stream,
        OrderedConfig {
            filter_subjects: subjects.clone(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        },
        medallion_bus::max_payload(&shared.client),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        let m = match tokio::time::timeout(Duration::from_millis(500), messages.next()).await {
            Ok(Some(Ok(m))) => m,
            _ => break,
        };
        let Ok(info) = m.info() else { continue };
        let seq = info.stream_sequence;
        let pending = info.pending;
        let mut h = m.headers.clone().unwrap_or_default();
        // Re-parking after a crash before the purge is de-duplicated.
        h.insert(
            headers::MSG_ID,
            format!("dlq:{INGEST_STREAM}:{seq}").as_str(),
        );
        h.insert(headers::DLQ_STREAM, INGEST_STREAM);
        h.insert(headers::DLQ_SEQUENCE, seq.to_string().as_str());
        h.insert(headers::DLQ_SUBJECT, m.subject.as_str());
        h.insert(
            headers::DLQ_REASON,
            "subject is not medallion.ingest.<domain>.<product> with lower snake_case names",
        );
        let subject = DLQ_SUBJECTS.replace('>', "ingest");
        loop {
            let sent = match shared
                .js
                .publish_with_headers(subject.clone(), h.clone(), m.payload.clone())
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match sent {
                Ok(()) => break,
                Err(e) => {
                    shared.problem("nats", format!("cannot dead-letter a message: {e}"));
                    if stop.is_cancelled() {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        shared
            .metrics
            .dead_lettered
            .with_label_values(&["ingest", "invalid_subject"])
            .inc();
        warn!(subject = %m.subject, stream_seq = seq, "message dead-lettered: invalid product subject");
        last.insert(m.subject.to_string(), seq);
        if pending == 0 {
            break;
        }
    }
    for (subject, seq) in last {
        shared
            .stream
            .purge()
            .filter(subject)
            .sequence(seq + 1)
            .await
            .map_err(|e| e.to_string())?;
    }
    shared.rt.health.clear_problem("nats");
    Ok(())
}
