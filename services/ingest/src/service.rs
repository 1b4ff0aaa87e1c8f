//! The ingest loop: pull in order → commit per product → announce → purge.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use medallion_bus::batching::{Batch, next_batch_or_idle};
use medallion_bus::streams::{DLQ_SUBJECTS, INGEST_STREAM, INGEST_SUBJECTS};
use medallion_bus::{Commit, Operation, headers, publish_commit, trace};
use medallion_lake::{CommitOutcome, Lake, TableOptions, TableWriter, WriteMode};
use medallion_runtime::metrics::PipelineMetrics;
use medallion_runtime::{Runtime, failpoint};
use medallion_spec::layout::{bronze, bronze_schema};
use medallion_spec::{TableRef, parse_ingest_subject};
use tracing::{Instrument, info, info_span, warn};

use crate::bronze_rows::{RawMessage, to_batch};
use crate::{APP_ID, IngestConfig};

const LAYER: &str = "bronze";

pub async fn run(config: IngestConfig, rt: Runtime) -> anyhow::Result<()> {
    let lake = config
        .lake
        .clone()
        .context("MEDALLION_LAKE is not usable")?;
    lake.check_writable().await?;
    let (client, js) = medallion_bus::connect_and_declare(&config.nats, &config.streams)
        .await
        .context("connecting to NATS and declaring the streams")?;
    let metrics = PipelineMetrics::register(&rt.registry)?;
    let addr = rt.serve_http(config.addr, axum::Router::new()).await?;
    info!(%addr, lake = %lake.root(), nats = %config.nats.url, "ingest started");

    let mut stream = medallion_bus::streams::open_stream(&js, INGEST_STREAM)
        .await
        .context("opening the ingest stream")?;
    // The stream's creation time scopes the transaction ids: if the stream is
    // ever deleted and re-created, its sequences restart at 1 and must not be
    // mistaken for positions that are already committed.
    let created = stream.cached_info().created.unix_timestamp();
    let mut ingest = Ingest {
        lake,
        js: js.clone(),
        client: client.clone(),
        app_id: format!("{APP_ID}:{INGEST_STREAM}:{created}"),
        writers: HashMap::new(),
        metrics,
        rt: rt.clone(),
    };
    rt.health.set_started();

    let mut consumer_name = ConsumerName::default();
    while !rt.shutdown.is_cancelled() {
        // Everything still in the stream is not yet known to be in Bronze: start there.
        let first = match stream.info().await {
            Ok(info) => info.state.first_sequence.max(1),
            Err(e) => {
                ingest.problem("nats", format!("cannot read the ingest stream: {e}"));
                backoff(&rt).await;
                continue;
            }
        };
        // Re-reading under the old name fails ("start sequence can not be
        // updated") for as long as the old consumer exists, and on a cluster
        // whose node hosting it died that is until the node returns: delete it
        // and use a fresh name.
        if let Some(old) = consumer_name.previous() {
            let _ = stream.delete_consumer(&old).await;
        }
        let consumer = match stream
            .create_consumer(OrderedConfig {
                name: Some(consumer_name.next()),
                filter_subject: INGEST_SUBJECTS.into(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: first,
                },
                ..Default::default()
            })
            .await
        {
            Ok(c) => c,
            Err(e) => {
                ingest.problem("nats", format!("cannot create the ingest consumer: {e}"));
                backoff(&rt).await;
                continue;
            }
        };
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                ingest.problem("nats", format!("cannot pull from the ingest stream: {e}"));
                backoff(&rt).await;
                continue;
            }
        };
        ingest.rt.health.clear_problem("nats");
        loop {
            match next_batch_or_idle(&mut messages, config.batch, Some(IDLE_CHECK), &rt.shutdown)
                .await
            {
                Batch::Shutdown => break,
                Batch::Idle => {
                    // Ingest purges what it commits, so messages still in the
                    // stream while the consumer hears nothing were lost on
                    // the way (a reconnect while a pull was in flight drops
                    // them, and an ordered pull consumer does not notice a
                    // gap at the tail): read again from the stream.
                    if let Ok(info) = stream.info().await
                        && info.state.messages > 0
                    {
                        warn!(
                            messages = info.state.messages,
                            "ingest consumer idle while the stream holds messages; re-reading from the stream"
                        );
                        ingest
                            .metrics
                            .errors
                            .with_label_values(&["ingest", "consumer"])
                            .inc();
                        break;
                    }
                }
                Batch::Messages(batch) => {
                    if !ingest.process(&stream, batch).await {
                        break;
                    }
                }
                Batch::Broken(batch, error) => {
                    warn!(%error, "ingest message stream interrupted; resuming from the stream");
                    ingest
                        .metrics
                        .errors
                        .with_label_values(&["ingest", "consumer"])
                        .inc();
                    if !batch.is_empty() {
                        ingest.process(&stream, batch).await;
                    }
                    break;
                }
            }
        }
    }
    info!("ingest stopping: flushing NATS");
    medallion_bus::flush_for_shutdown(&client, std::time::Duration::from_secs(5)).await;
    Ok(())
}

/// Names of this process's successive ordered consumers:
/// `medallion-ingest-<pid>-<start ms>-<n>`, unique across restarts and replicas.
struct ConsumerName {
    prefix: String,
    n: u64,
}

impl Default for ConsumerName {
    fn default() -> Self {
        ConsumerName {
            prefix: format!("{APP_ID}-{}-{}", std::process::id(), now_us() / 1000),
            n: 0,
        }
    }
}

impl ConsumerName {
    fn next(&mut self) -> String {
        self.n += 1;
        format!("{}-{}", self.prefix, self.n)
    }

    /// The last name handed out, if any.
    fn previous(&self) -> Option<String> {
        (self.n > 0).then(|| format!("{}-{}", self.prefix, self.n))
    }
}

/// How long the ingest consumer may hear nothing before its liveness is checked.
const IDLE_CHECK: Duration = Duration::from_secs(3);

async fn backoff(rt: &Runtime) {
    tokio::select! {
        _ = rt.shutdown.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
}

struct Ingest {
    lake: Lake,
    js: jetstream::Context,
    client: async_nats::Client,
    app_id: String,
    writers: HashMap<TableRef, TableWriter>,
    metrics: PipelineMetrics,
    rt: Runtime,
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Ingest {
    fn problem(&self, key: &str, message: String) {
        warn!(problem = %message, "ingest not ready");
        self.rt.health.set_problem(key, message);
    }

    /// Commits one micro-batch and purges it from the stream. Returns false when
    /// the loop should re-read from the stream (shutdown, or an interrupted batch).
    async fn process(
        &mut self,
        stream: &jetstream::stream::Stream,
        batch: Vec<jetstream::Message>,
    ) -> bool {
        let received_us = now_us();
        let span = info_span!(
            "ingest.batch",
            messages = batch.len(),
            bytes = tracing::field::Empty
        );
        let mut groups: BTreeMap<TableRef, Vec<RawMessage>> = BTreeMap::new();
        let mut invalid = Vec::new();
        let mut last_seq = 0;
        let mut bytes = 0usize;
        for m in &batch {
            let Ok(info) = m.info() else { continue };
            last_seq = last_seq.max(info.stream_sequence);
            self.metrics
                .consumer_pending
                .with_label_values(&["medallion-ingest"])
                .set(info.pending as i64);
            bytes += m.payload.len();
            let raw = RawMessage {
                subject: m.subject.to_string(),
                payload: m.payload.clone(),
                headers: m.headers.clone(),
                stream_seq: info.stream_sequence,
                published_us: (info.published.unix_timestamp_nanos() / 1000) as i64,
                received_us,
                msg_id: header(m.headers.as_ref(), headers::MSG_ID),
                traceparent: header(m.headers.as_ref(), headers::TRACEPARENT),
            };
            match parse_ingest_subject(&raw.subject) {
                Some((domain, product)) => groups
                    .entry(TableRef::bronze(domain, product))
                    .or_default()
                    .push(raw),
                None => invalid.push(raw),
            }
        }
        span.record("bytes", bytes);
        // The batch span links to every traced message, and each message's
        // trace continues here; the bronze event carries those contexts on.
        let links: BTreeMap<TableRef, Vec<String>> = groups
            .iter()
            .map(|(tref, msgs)| {
                let l = trace::continue_traces(
                    "ingest.message",
                    msgs.iter().filter_map(|m| m.traceparent.as_deref()),
                    &span,
                );
                (tref.clone(), l)
            })
            .collect();
        let ok = async {
            if !invalid.is_empty() && !self.dead_letter(&invalid).await {
                return false;
            }
            for (tref, msgs) in groups {
                if !self.commit_product(&tref, &msgs, &links[&tref]).await {
                    return false;
                }
            }
            failpoint::hit("ingest.before_purge");
            // The purge is the acknowledgement: everything up to last_seq is in Bronze.
            loop {
                match stream.purge().sequence(last_seq + 1).await {
                    Ok(_) => {
                        self.rt.health.clear_problem("nats");
                        return true;
                    }
                    Err(e) => {
                        self.problem(
                            "nats",
                            format!("cannot acknowledge (purge) the ingest stream: {e}"),
                        );
                        if self.rt.shutdown.is_cancelled() {
                            return false;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
        .instrument(span)
        .await;
        ok
    }

    async fn writer(&mut self, tref: &TableRef) -> Result<&mut TableWriter, String> {
        if !self.writers.contains_key(tref) {
            let options = TableOptions {
                description: Some(format!(
                    "Raw messages of medallion.ingest.{}.{}",
                    tref.domain, tref.name
                )),
                append_only: true,
                partition_columns: vec![],
                unique_columns: vec![bronze::PAYLOAD.into(), bronze::MSG_ID.into()],
            };
            let w = TableWriter::open_or_create(
                &self.lake,
                tref,
                bronze_schema(),
                &self.app_id,
                &options,
            )
            .await
            .map_err(|e| e.to_string())?;
            self.writers.insert(tref.clone(), w);
        }
        Ok(self.writers.get_mut(tref).expect("inserted above"))
    }

    /// Commits the messages of one product that are not in Bronze yet, retrying
    /// until the lake accepts them (or shutdown: then nothing is purged and the
    /// messages are read again at the next start).
    async fn commit_product(
        &mut self,
        tref: &TableRef,
        msgs: &[RawMessage],
        links: &[String],
    ) -> bool {
        let product = format!("{}.{}", tref.domain, tref.name);
        let table = tref.sql_name();
        let in_bytes: usize = msgs.iter().map(|m| m.payload.len()).sum();
        self.metrics
            .rows_in
            .with_label_values(&[LAYER, &product])
            .inc_by(msgs.len() as u64);
        self.metrics
            .bytes_in
            .with_label_values(&[LAYER, &product])
            .inc_by(in_bytes as u64);
        let mut attempt = 0u32;
        loop {
            if self.rt.shutdown.is_cancelled() {
                return false;
            }
            let result = self.try_commit(tref, &product, msgs, links).await;
            match result {
                Ok(()) => {
                    self.rt.health.clear_problem("lake");
                    return true;
                }
                Err(e) => {
                    attempt += 1;
                    self.metrics
                        .errors
                        .with_label_values(&["ingest", "commit"])
                        .inc();
                    self.problem("lake", format!("cannot commit to {table}: {e}"));
                    let delay = Duration::from_millis((100 * 2u64.pow(attempt.min(6))).min(5_000));
                    tokio::select! {
                        _ = self.rt.shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn try_commit(
        &mut self,
        tref: &TableRef,
        product: &str,
        msgs: &[RawMessage],
        links: &[String],
    ) -> Result<(), String> {
        let metrics = self.metrics.clone();
        let writer = self.writer(tref).await?;
        let done = writer.txn_version().unwrap_or(0);
        let fresh: Vec<&RawMessage> = msgs.iter().filter(|m| m.stream_seq as i64 > done).collect();
        let skipped = msgs.len() - fresh.len();
        if skipped > 0 {
            metrics
                .skipped
                .with_label_values(&[LAYER, product])
                .inc_by(skipped as u64);
        }
        let Some(txn) = fresh.iter().map(|m| m.stream_seq as i64).max() else {
            return Ok(());
        };
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
            .commit(
                std::slice::from_ref(&batch),
                txn,
                WriteMode::Append,
                &[("medallion.rows", (fresh.len() as i64).into())],
            )
            .instrument(span.clone())
            .await
            .map_err(|e| e.to_string())?;
        let version = match outcome {
            CommitOutcome::Committed(v) => v,
            CommitOutcome::AlreadyCommitted(_) => return Ok(()),
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
        metrics.committed(&tref.sql_name(), version);
        failpoint::hit("ingest.after_commit");
        self.announce(tref, version, &schema, &batch, links)
            .instrument(span)
            .await;
        Ok(())
    }

    /// Publishes the committed rows on `medallion.bronze.<domain>.<product>`.
    /// A failure here loses nothing: transform reads any version it did not
    /// hear about from the table.
    async fn announce(
        &self,
        tref: &TableRef,
        version: i64,
        schema: &arrow::datatypes::SchemaRef,
        batch: &arrow::array::RecordBatch,
        links: &[String],
    ) {
        let commit = Commit {
            table: tref,
            version,
            operation: Operation::Append,
            schema: schema.clone(),
            batches: std::slice::from_ref(batch),
            links,
        };
        match publish_commit(&self.js, commit, medallion_bus::max_payload(&self.client)).await {
            Ok(parts) => self
                .metrics
                .events_published
                .with_label_values(&[LAYER])
                .inc_by(parts as u64),
            Err(e) => {
                self.metrics
                    .errors
                    .with_label_values(&["ingest", "publish"])
                    .inc();
                warn!(table = %tref, version, error = %e, "bronze event not published; transform will read the commit from the table");
            }
        }
    }

    /// Messages on subjects that name no valid product cannot have a Bronze
    /// table; they are parked in the dead-letter stream with the reason.
    async fn dead_letter(&self, msgs: &[RawMessage]) -> bool {
        for m in msgs {
            let mut h = m.headers.clone().unwrap_or_default();
            // Re-parking after a crash before the purge is de-duplicated.
            h.insert(
                headers::MSG_ID,
                format!("dlq:{INGEST_STREAM}:{}", m.stream_seq).as_str(),
            );
            h.insert(headers::DLQ_STREAM, INGEST_STREAM);
            h.insert(headers::DLQ_SEQUENCE, m.stream_seq.to_string().as_str());
            h.insert(headers::DLQ_SUBJECT, m.subject.as_str());
            h.insert(
                headers::DLQ_REASON,
                "subject is not medallion.ingest.<domain>.<product> with lower snake_case names",
            );
            let subject = DLQ_SUBJECTS.replace('>', "ingest");
            loop {
                let sent = match self
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
                        self.problem("nats", format!("cannot dead-letter a message: {e}"));
                        if self.rt.shutdown.is_cancelled() {
                            return false;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            self.metrics
                .dead_lettered
                .with_label_values(&["ingest", "invalid_subject"])
                .inc();
            warn!(subject = %m.subject, stream_seq = m.stream_seq, "message dead-lettered: invalid product subject");
        }
        true
    }
}

fn header(h: Option<&HeaderMap>, name: &str) -> Option<String> {
    h.and_then(|h| h.get(name)).map(|v| v.as_str().to_string())
}
