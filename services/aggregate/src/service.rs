//! The aggregate loop: Silver events (or the Silver table) → Gold tables.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arrow::array::RecordBatch;
use async_nats::jetstream;
use medallion_bus::batching::{Batch, Batcher};
use medallion_bus::horizon::Reach;
use medallion_bus::registry::{SpecSource, sync_specs};
use medallion_bus::streams::SILVER_STREAM;
use medallion_bus::{Commit, Operation, publish_commit};
use medallion_lake::{
    CommitOutcome, FileInfo, Lake, TableOptions, TableWriter, WriteMode, read_all, read_commit,
};
use medallion_runtime::metrics::PipelineMetrics;
use medallion_runtime::{Runtime, failpoint};
use medallion_spec::products::{ProductId, Products};
use medallion_spec::{Contract, TableRef};
use tracing::{Instrument, info, info_span, warn};

use crate::poison;
use crate::state::{BUCKETS, GoldState, bucket_of};
use crate::{APP_ID, AggregateConfig};

const LAYER: &str = "gold";

pub async fn run(config: AggregateConfig, rt: Runtime) -> anyhow::Result<()> {
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
    let source = SpecSource::open(&config.specs, &js, &config.streams)
        .await
        .context("opening the product registry")?;
    info!(%addr, lake = %lake.root(), specs = ?config.specs, "aggregate started");
    let consumer = medallion_bus::consumer::stage_consumer(
        &js,
        SILVER_STREAM,
        APP_ID,
        "medallion.silver.>",
        config.ack_wait,
    )
    .await
    .context("creating the silver consumer")?;
    let mut events = Batcher::new(
        medallion_bus::consumer::pull_messages(&consumer)
            .await
            .context("pulling silver events")?,
        config.batch,
    );
    let mut a = Aggregate {
        lake,
        js,
        max_payload: medallion_bus::max_payload(&client),
        products: Products::new(),
        upstream: Default::default(),
        states: HashMap::new(),
        metrics,
        rt: rt.clone(),
        max_deliver: config.max_deliver,
        lake_backoff: Default::default(),
        tick_horizon: Default::default(),
        pending_links: Default::default(),
        in_flight: Default::default(),
        reload_interval: config.reload_interval,
    };
    a.reload(&source).await;
    rt.health.set_started();
    let mut tick = tokio::time::interval(config.reload_interval);
    loop {
        tokio::select! {
            _ = rt.shutdown.cancelled() => break,
            _ = source.changed() => a.reload(&source).await,
            _ = tick.tick() => {
                a.reload(&source).await;
                let ids: Vec<ProductId> = a.products.contracts.keys().cloned().collect();
                for id in ids {
                    a.catch_up(&id, &mut BTreeMap::new(), &[], Reach::Tick).await;
                }
            }
            batch = events.next(&rt.shutdown) => match batch {
                Batch::Shutdown => break,
                // Without an idle period the batcher waits for a message.
                Batch::Idle => {}
                Batch::Messages(msgs) => a.on_events(msgs).await,
                Batch::Broken(msgs, e) => {
                    warn!(error = %e, "silver event stream interrupted; re-subscribing");
                    a.on_events(msgs).await;
                    match medallion_bus::consumer::pull_messages(&consumer).await {
                        Ok(m) => events.stream = m,
                        Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                    }
                }
            }
        }
    }
    info!("aggregate stopping: flushing NATS");
    medallion_bus::flush_for_shutdown(&client, std::time::Duration::from_secs(5)).await;
    Ok(())
}

struct Aggregate {
    lake: Lake,
    js: jetstream::Context,
    max_payload: usize,
    products: Products,
    /// The upstream tables, refreshed incrementally on every poll.
    upstream: medallion_lake::TableCache,
    states: HashMap<ProductId, Vec<GoldTable>>,
    metrics: PipelineMetrics,
    rt: Runtime,
    max_deliver: u32,
    /// Products whose Gold tables failed to open or commit: retried with a
    /// growing wait, not on every tick and event.
    lake_backoff: medallion_runtime::backoff::Backoff<ProductId>,
    /// What the timer may take from Silver without its event.
    tick_horizon: medallion_bus::horizon::TickHorizon<ProductId>,
    /// Trace contexts of Silver events whose versions are not processed yet.
    pending_links: medallion_bus::horizon::PendingLinks<ProductId>,
    /// Parts of Silver events whose other parts are in the next pull.
    in_flight: medallion_bus::PartsInFlight,
    /// The timer's period; also how long it waits for a backlog's events.
    reload_interval: Duration,
}

/// One Gold table: its writer, its in-memory groups, and which data file
/// holds each bucket.
struct GoldTable {
    writer: TableWriter,
    state: GoldState,
    files: Vec<Vec<FileInfo>>,
    /// Last Silver version merged (the table's transaction version).
    processed: i64,
    /// The table was built under a different spec (its columns differ from
    /// the plan's): the next Silver version rebuilds it whole instead of
    /// merging into rows of another shape.
    rebuild: bool,
}

impl Aggregate {
    async fn reload(&mut self, source: &SpecSource) {
        let changes = sync_specs(source, &mut self.products, |_| Ok(()), 0, &self.rt.health).await;
        for id in changes.updated.iter().chain(changes.removed.iter()) {
            self.states.remove(id);
        }
    }

    async fn on_events(&mut self, msgs: Vec<jetstream::Message>) {
        let states = &self.states;
        let more = medallion_bus::horizon::more_waiting(&msgs);
        self.tick_horizon.pulled(more, self.reload_interval);
        let (tables, malformed) = medallion_bus::announced(
            msgs.iter()
                .map(|m| (m.subject.as_str(), m.headers.as_ref(), &m.payload)),
            // Wanted unless every Gold table of the product has merged it.
            |t, v| {
                states
                    .get(&(t.domain.clone(), t.name.clone()))
                    .is_none_or(|tables| tables.iter().any(|g| v > g.processed))
            },
            &mut self.in_flight,
        );
        for subject in malformed {
            warn!(subject = %subject, "malformed silver event ignored; the table is read instead");
        }
        for (table, mut announced) in tables {
            let id = (table.domain.clone(), table.name.clone());
            if !self.products.contracts.contains_key(&id) {
                continue;
            }
            match Reach::for_pull(more, &announced) {
                Some(reach) => {
                    self.catch_up(&id, &mut announced.rows, &announced.links, reach)
                        .await
                }
                None => self.pending_links.add(&id, &announced.links),
            }
        }
        for m in msgs {
            let _ = m.ack().await;
        }
    }

    async fn open(&mut self, id: &ProductId) -> bool {
        if self.states.contains_key(id) {
            return true;
        }
        if !self.lake_backoff.ready(id) {
            return false;
        }
        let Some(contract) = self.products.contracts.get(id).cloned() else {
            return false;
        };
        match open_tables(&self.lake, &contract).await {
            Ok(t) => {
                self.rt
                    .health
                    .clear_problem(&format!("gold {}.{}", id.0, id.1));
                // The back-off is reset by a commit that lands, not by an
                // open: on a full disk the tables open fine and every commit
                // fails, and resetting here retried at every tick and event.
                self.states.insert(id.clone(), t);
                true
            }
            Err(e) => {
                let attempt = self.lake_backoff.failed(id.clone());
                warn!(product = %format!("{}.{}", id.0, id.1), attempt, error = %e, "cannot open gold tables");
                self.rt
                    .health
                    .set_problem(format!("gold {}.{}", id.0, id.1), e);
                false
            }
        }
    }

    async fn catch_up(
        &mut self,
        id: &ProductId,
        fast: &mut BTreeMap<i64, Vec<RecordBatch>>,
        links: &[String],
        reach: Reach,
    ) {
        let links = self.pending_links.take(id, links);
        if !self.catch_up_pass(id, fast, &links, reach).await {
            self.pending_links.keep(id, links);
        }
    }

    /// One pass over the upstream versions; false when it could not look
    /// (tables not open, a failed commit), so the links are kept.
    async fn catch_up_pass(
        &mut self,
        id: &ProductId,
        fast: &mut BTreeMap<i64, Vec<RecordBatch>>,
        links: &[String],
        reach: Reach,
    ) -> bool {
        let silver_ref = TableRef::silver(&id.0, &id.1);
        let Ok(Some(silver)) = self.upstream.latest(&self.lake, &silver_ref).await else {
            return false;
        };
        let latest = silver.version().map(|v| v as i64).unwrap_or(-1);
        let latest = match reach {
            Reach::Latest => latest,
            Reach::Tick => self.tick_horizon.through(id, latest),
            Reach::Through(v) => v.min(latest),
        };
        if !self.open(id).await {
            return false;
        }
        let max_deliver = self.max_deliver;
        let (js, max_payload, metrics, lake) = (
            self.js.clone(),
            self.max_payload,
            self.metrics.clone(),
            self.lake.clone(),
        );
        let product = format!("{}.{}", id.0, id.1);
        let tables = self.states.get_mut(id).expect("opened above");
        for t in tables.iter_mut() {
            while t.processed < latest {
                let span = info_span!(
                    "aggregate.merge",
                    product,
                    layer = LAYER,
                    table = %t.writer.table_ref(),
                    silver_rows = tracing::field::Empty,
                    rows = tracing::field::Empty,
                    version = tracing::field::Empty
                );
                let links = medallion_bus::trace::continue_traces(
                    "aggregate.message",
                    links.iter().map(String::as_str),
                    &span,
                );
                match advance(
                    &lake,
                    t,
                    &silver,
                    &silver_ref,
                    latest,
                    fast,
                    &js,
                    max_payload,
                    &metrics,
                    &links,
                    (id, max_deliver),
                )
                .instrument(span)
                .await
                {
                    Ok(()) => {}
                    Err(e) => {
                        metrics
                            .errors
                            .with_label_values(&["aggregate", "commit"])
                            .inc();
                        let attempt = self.lake_backoff.failed(id.clone());
                        warn!(product, attempt, error = %e, "gold commit failed; retrying from the tables");
                        self.rt.health.set_problem(format!("gold {product}"), e);
                        self.states.remove(id);
                        return false;
                    }
                }
            }
        }
        self.rt.health.clear_problem(&format!("gold {product}"));
        self.lake_backoff.succeeded(id);
        true
    }
}

/// Merges the next Silver versions into one Gold table and commits the
/// touched buckets.
#[allow(clippy::too_many_arguments)]
async fn advance(
    lake: &Lake,
    t: &mut GoldTable,
    silver: &deltalake::DeltaTable,
    silver_ref: &TableRef,
    latest: i64,
    fast: &BTreeMap<i64, Vec<RecordBatch>>,
    js: &jetstream::Context,
    max_payload: usize,
    metrics: &PipelineMetrics,
    links: &[String],
    (product, max_deliver): (&ProductId, u32),
) -> Result<(), String> {
    let started = Instant::now();
    let mut rows = Vec::new();
    // Silver version of each batch in `rows` (for dead-letter positions).
    let mut versions = Vec::new();
    let mut last = t.processed;
    let mut refresh = t.rebuild;
    if refresh {
        last = latest;
    }
    let mut n = 0usize;
    for v in (t.processed + 1)..=latest {
        if refresh {
            break;
        }
        let batches = match fast.get(&v) {
            Some(b) => b.clone(),
            None => match read_commit(silver_ref, silver, v)
                .await
                .map_err(|e| e.to_string())?
            {
                Some(c) if c.removed_data => {
                    // Silver was rebuilt (replay): Gold is recomputed from it.
                    refresh = true;
                    last = v;
                    break;
                }
                Some(c) => c.batches,
                None => Vec::new(),
            },
        };
        n += batches.iter().map(|b| b.num_rows()).sum::<usize>();
        versions.extend(std::iter::repeat_n(v, batches.len()));
        rows.extend(batches);
        last = v;
        if n >= 200_000 {
            break;
        }
    }
    let poisoned;
    let (mode, buckets, touched) = if refresh {
        let table = medallion_lake::open_at(lake, silver_ref, Some(last))
            .await
            .map_err(|e| e.to_string())?
            .ok_or("silver table vanished")?;
        let all = read_all(silver_ref, &table)
            .await
            .map_err(|e| e.to_string())?;
        t.state.clear();
        // Rows of a rebuilt Silver are not tied to one version: the version
        // the rebuild reads is their position.
        let all_versions = vec![last; all.len()];
        let (partials, p) = poison::partials(&t.state, &all, &all_versions, max_deliver).await?;
        poisoned = p;
        let (_, touched) = t.state.merge(&partials);
        info!(table = %t.writer.table_ref(), silver_version = last, "silver was rebuilt: full refresh of gold");
        (
            WriteMode::Overwrite,
            (0..BUCKETS).collect::<std::collections::BTreeSet<_>>(),
            touched,
        )
    } else {
        let (partials, p) = poison::partials(&t.state, &rows, &versions, max_deliver).await?;
        poisoned = p;
        let (buckets, touched) = t.state.merge(&partials);
        let removes = buckets
            .iter()
            .flat_map(|b| t.files[*b].iter().map(|f| f.remove.clone()))
            .collect();
        (WriteMode::Replace(removes), buckets, touched)
    };
    let merge_span = tracing::Span::current();
    merge_span
        .record("silver_rows", n)
        .record("rows", touched.len());
    let commit_span = info_span!(
        parent: &merge_span,
        "gold.commit",
        product = %format!("{}.{}", product.0, product.1),
        layer = LAYER,
        table = %t.writer.table_ref(),
        rows = touched.len(),
        version = tracing::field::Empty
    );
    medallion_bus::trace::link_all(&commit_span, links.iter().map(String::as_str));
    commit_gold(
        t,
        buckets,
        touched,
        mode,
        refresh,
        last,
        &rows,
        started,
        js,
        max_payload,
        metrics,
        links,
        &merge_span,
        (product, poisoned),
    )
    .instrument(commit_span)
    .await
}

/// Writes the touched buckets as one Delta commit and announces the changed groups.
#[allow(clippy::too_many_arguments)]
async fn commit_gold(
    t: &mut GoldTable,
    buckets: std::collections::BTreeSet<usize>,
    touched: Vec<Vec<u8>>,
    mode: WriteMode,
    refresh: bool,
    last: i64,
    rows: &[RecordBatch],
    started: Instant,
    js: &jetstream::Context,
    max_payload: usize,
    metrics: &PipelineMetrics,
    links: &[String],
    merge_span: &tracing::Span,
    (product, poisoned): (&ProductId, Vec<poison::PoisonRow>),
) -> Result<(), String> {
    let groups: Vec<Vec<RecordBatch>> = buckets
        .iter()
        .map(|b| vec![t.state.bucket_rows(*b)])
        .collect();
    // Parked before the Gold commit that covers their Silver versions.
    let tname = t.writer.table_ref().name.clone();
    for p in &poisoned {
        warn!(product = %format!("{}.{}", product.0, product.1), table = %tname, silver_version = p.silver_version, bronze_seq = p.bronze_seq, deliveries = p.deliveries, reason = %p.reason, "poison row isolated; dead-lettering it");
    }
    // On an error the merge above has already changed the in-memory groups:
    // the caller drops them and reopens the table rather than commit
    // without the DLQ.
    poison::park(js, &product.0, &product.1, &tname, &poisoned).await?;
    if !poisoned.is_empty() {
        failpoint::hit("aggregate.after_park");
    }
    failpoint::hit("aggregate.before_commit");
    let outcome = t
        .writer
        .commit_files(
            &groups,
            last,
            mode,
            &[
                ("medallion.silver_version", last.into()),
                (GOLD_SQL_KEY, normalized_sql(&t.state.plan.sql).into()),
            ],
        )
        .await
        .map_err(|e| e.to_string())?;
    let version = match outcome {
        CommitOutcome::Committed(v) => v,
        CommitOutcome::AlreadyCommitted(_) => {
            return Err("gold already has this silver version".into());
        }
    };
    t.processed = last;
    t.rebuild = false;
    t.files = bucket_files(&t.writer, &t.state).await?;
    let tref = t.writer.table_ref().clone();
    tracing::Span::current().record("version", version);
    merge_span.record("version", version);
    metrics
        .commit_seconds
        .with_label_values(&[LAYER])
        .observe(started.elapsed().as_secs_f64());
    metrics
        .rows_out
        .with_label_values(&[LAYER, &tref.name])
        .inc_by(touched.len() as u64);
    metrics.committed(&tref.sql_name(), version);
    metrics
        .dead_lettered
        .with_label_values(&["aggregate", "panic"])
        .inc_by(poisoned.len() as u64);
    if !refresh {
        for b in rows {
            if let Some(at) = medallion_spec::ingested_at_micros(b) {
                metrics.observe_latency(LAYER, at);
            }
        }
    }
    info!(table = %tref, groups = touched.len(), version, silver_version = last, "gold committed");
    let changed = t.state.rows_of(&touched);
    let commit = Commit {
        table: &tref,
        version,
        operation: Operation::Append,
        schema: t.state.table_schema.clone(),
        batches: std::slice::from_ref(&changed),
        links,
    };
    if let Err(e) = publish_commit(js, commit, max_payload).await {
        warn!(table = %tref, version, error = %e, "gold event not published");
    } else {
        metrics.events_published.with_label_values(&[LAYER]).inc();
    }
    Ok(())
}

/// Which files hold which bucket: every row of a file belongs to one bucket.
async fn bucket_files(
    writer: &TableWriter,
    state: &GoldState,
) -> Result<Vec<Vec<FileInfo>>, String> {
    let mut out = vec![Vec::new(); BUCKETS];
    let store = writer.table().log_store().object_store(None);
    for f in writer.files().await.map_err(|e| e.to_string())? {
        let batches = medallion_lake::read_parquet(&store, &f.path)
            .await
            .map_err(|e| e.to_string())?;
        let Some(b) = batches.iter().find(|b| b.num_rows() > 0) else {
            continue;
        };
        let key = state_key(state, b);
        out[bucket_of(&key)].push(f);
    }
    Ok(out)
}

fn state_key(state: &GoldState, b: &RecordBatch) -> Vec<u8> {
    let cols: Vec<arrow::array::ArrayRef> = state
        .plan
        .keys
        .iter()
        .map(|k| {
            b.column(state.table_schema.index_of(&k.name).expect("key column"))
                .slice(0, 1)
        })
        .collect();
    let conv = arrow::row::RowConverter::new(
        state
            .plan
            .keys
            .iter()
            .map(|k| arrow::row::SortField::new(k.data_type.clone()))
            .collect(),
    )
    .expect("row-encodable");
    conv.convert_columns(&cols)
        .expect("row-encodable")
        .row(0)
        .as_ref()
        .to_vec()
}

/// Commit metadata naming the query a Gold table's rows were computed by.
const GOLD_SQL_KEY: &str = "medallion.gold_sql";

fn normalized_sql(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}

async fn open_tables(lake: &Lake, contract: &Arc<Contract>) -> Result<Vec<GoldTable>, String> {
    let mut out = Vec::new();
    for plan in &contract.gold {
        let tref = TableRef::gold(contract.domain(), &plan.name);
        let state = GoldState::new(plan.clone());
        let options = TableOptions {
            description: Some(format!(
                "{} — maintained incrementally from silver.{}.{}",
                plan.sql.trim(),
                contract.domain(),
                contract.name()
            )),
            append_only: false,
            partition_columns: vec![],
            unique_columns: vec![],
        };
        let writer =
            TableWriter::open_or_create(lake, &tref, state.table_schema.clone(), APP_ID, &options)
                .await
                .map_err(|e| e.to_string())?;
        let same_shape = writer.schema().fields().len() == state.table_schema.fields().len()
            && writer
                .schema()
                .fields()
                .iter()
                .zip(state.table_schema.fields())
                .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
        // Same columns but another query (a new WHERE, a changed expression):
        // the stored groups were computed differently, so merging into them
        // would mix two definitions.
        let built_by = match writer.table().version() {
            Some(v) if v > 0 => medallion_lake::commit_metadata(&tref, writer.table(), v as i64)
                .await
                .map_err(|e| e.to_string())?
                .and_then(|m| {
                    m.get(GOLD_SQL_KEY)
                        .and_then(|s| s.as_str().map(String::from))
                }),
            _ => None,
        };
        let same_query = built_by.is_none_or(|sql| sql == normalized_sql(&plan.sql));
        let same_shape = same_shape && same_query;
        let mut t = GoldTable {
            processed: writer.txn_version().unwrap_or(-1),
            writer,
            state,
            files: vec![Vec::new(); BUCKETS],
            rebuild: !same_shape,
        };
        if same_shape {
            let all = read_all(&tref, t.writer.table())
                .await
                .map_err(|e| e.to_string())?;
            for b in &all {
                t.state.load_rows(b);
            }
            t.files = bucket_files(&t.writer, &t.state).await?;
        } else {
            info!(table = %tref, "gold table was built under another spec; rebuilding it from silver on the next silver version");
        }
        info!(table = %tref, groups = t.state.groups(), silver_version = t.processed, "gold state loaded");
        out.push(t);
    }
    Ok(out)
}
