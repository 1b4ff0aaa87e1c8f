//! The transform loop: Bronze events (or the Bronze table) → Silver + quarantine.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use arrow::array::RecordBatch;
use async_nats::jetstream;
use futures::StreamExt;
use medallion_bus::batching::{Batch, Batcher};
use medallion_bus::horizon::Reach;
use medallion_bus::streams::BRONZE_STREAM;
use medallion_bus::{Commit, Operation, publish_commit};
use medallion_lake::{CommitOutcome, Lake, TableOptions, TableWriter, WriteMode, read_commit};
use medallion_runtime::metrics::PipelineMetrics;
use medallion_runtime::{Runtime, failpoint};
use medallion_spec::layout::{quarantine, quarantine_schema};
use medallion_spec::{Contract, TableRef};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::crash_check::CrashCheck;
use crate::dedupe::{KeyHashSet, KeySet};
use crate::pipeline::{Output, QualityCounts, drop_keys_seen, slices, transform};
use crate::poison::{self, Poison};
use crate::{APP_ID, REPLAY_SUBJECT, TransformConfig};
use medallion_bus::registry::{SpecSource, sync_specs};
use medallion_spec::PiiMode;
use medallion_spec::products::{ProductId, Products};

const LAYER: &str = "silver";
/// Transaction versions are `generation << 40 | bronze version`: a replay
/// bumps the generation, so its commits are newer than anything before it.
const GEN_SHIFT: u32 = 40;
const VERSION_MASK: i64 = (1 << GEN_SHIFT) - 1;
const SNAPSHOT_EVERY: u32 = 16;

pub async fn run(config: TransformConfig, rt: Runtime) -> anyhow::Result<()> {
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
    info!(%addr, lake = %lake.root(), specs = ?config.specs, "transform started");
    let attempts = match medallion_bus::attempts::Attempts::open(&js, &config.streams).await {
        Ok(a) => Some(a),
        Err(e) => {
            warn!(error = %e, "attempts ledger unavailable: a record that kills the process will be retried without a crash check");
            None
        }
    };
    let crash_exe = crate::crash_check::locate();
    if crash_exe.is_none() {
        warn!("the medallion-transform binary was not found: no crash checks in child processes");
    }

    let consumer = medallion_bus::consumer::stage_consumer(
        &js,
        BRONZE_STREAM,
        APP_ID,
        "medallion.bronze.>",
        config.ack_wait,
    )
    .await
    .context("creating the bronze consumer")?;
    let mut events = Batcher::new(
        medallion_bus::consumer::pull_messages(&consumer)
            .await
            .context("pulling bronze events")?,
        config.batch,
    );
    let mut replays = client
        .subscribe(REPLAY_SUBJECT)
        .await
        .context("subscribing to replay requests")?;
    let mut t = Transform {
        lake,
        js,
        client: client.clone(),
        products: Products::new(),
        upstream: Default::default(),
        states: HashMap::new(),
        metrics,
        rt: rt.clone(),
        pii_key: config.pii_key.clone(),
        max_rows: config.batch.messages,
        max_deliver: config.max_deliver,
        lake_backoff: Default::default(),
        attempts,
        crash_exe,
        tick_horizon: Default::default(),
        pending_links: Default::default(),
        in_flight: Default::default(),
        reload_interval: config.reload_interval,
    };
    t.reload(&source).await;
    rt.health.set_started();
    let mut tick = tokio::time::interval(config.reload_interval);
    loop {
        tokio::select! {
            _ = rt.shutdown.cancelled() => break,
            _ = tick.tick() => {
                t.reload(&source).await;
                t.catch_up_all().await;
            }
            _ = source.changed() => t.reload(&source).await,
            Some(req) = replays.next() => {
                // A replay right after a spec change must run the new spec.
                t.reload(&source).await;
                let answer = t.replay(String::from_utf8_lossy(&req.payload).trim()).await;
                if let Some(reply) = req.reply {
                    let _ = client.publish(reply, answer.into()).await;
                }
            }
            batch = events.next(&rt.shutdown) => match batch {
                Batch::Shutdown => break,
                // Without an idle period the batcher waits for a message.
                Batch::Idle => {}
                Batch::Messages(msgs) => t.on_events(msgs).await,
                Batch::Broken(msgs, e) => {
                    warn!(error = %e, "bronze event stream interrupted; re-subscribing");
                    t.on_events(msgs).await;
                    match medallion_bus::consumer::pull_messages(&consumer).await {
                        Ok(m) => events.stream = m,
                        Err(e) => {
                            t.rt.health.set_problem("nats", format!("cannot pull bronze events: {e}"));
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            }
        }
    }
    info!("transform stopping: snapshotting dedupe state and flushing NATS");
    for s in t.states.values_mut() {
        s.snapshot().await;
    }
    medallion_bus::flush_for_shutdown(&client, std::time::Duration::from_secs(5)).await;
    Ok(())
}

struct Transform {
    lake: Lake,
    js: jetstream::Context,
    client: async_nats::Client,
    products: Products,
    /// The upstream tables, refreshed incrementally on every poll.
    upstream: medallion_lake::TableCache,
    states: HashMap<ProductId, ProductState>,
    metrics: PipelineMetrics,
    rt: Runtime,
    pii_key: Option<Vec<u8>>,
    max_rows: usize,
    max_deliver: u32,
    /// Products whose tables failed to open or commit: retried with back-off.
    lake_backoff: medallion_runtime::backoff::Backoff<ProductId>,
    /// Where each product's last step started, to notice a process that died in it.
    attempts: Option<medallion_bus::attempts::Attempts>,
    /// This service's binary, run as a child to check a step that killed a process.
    crash_exe: Option<std::path::PathBuf>,
    /// What the timer may take from Bronze without its event.
    tick_horizon: medallion_bus::horizon::TickHorizon<ProductId>,
    /// Trace contexts of Bronze events whose versions are not processed yet.
    pending_links: medallion_bus::horizon::PendingLinks<ProductId>,
    /// Parts of Bronze events whose other parts are in the next pull.
    in_flight: medallion_bus::PartsInFlight,
    /// The timer's period; also how long it waits for a backlog's events.
    reload_interval: Duration,
}

struct ProductState {
    contract: Arc<Contract>,
    silver: TableWriter,
    quarantine: TableWriter,
    keys: KeySet,
    /// Last Bronze version reflected in Silver.
    processed: i64,
    generation: i64,
    /// Why a `fail` expectation stopped the product, until its spec changes.
    halted: Option<String>,
    commits_since_snapshot: u32,
}

impl ProductState {
    async fn snapshot(&mut self) {
        if self.commits_since_snapshot == 0 || self.contract.key().is_empty() {
            return;
        }
        let store = self.silver.table().log_store().object_store(None);
        match self.keys.save(store.as_ref(), self.silver.version()).await {
            Ok(()) => self.commits_since_snapshot = 0,
            Err(e) => {
                warn!(table = %self.silver.table_ref(), error = %e, "dedupe snapshot not written; restart will read more commits")
            }
        }
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn pid(c: &Contract) -> String {
    format!("{}.{}", c.domain(), c.name())
}

impl Transform {
    async fn reload(&mut self, source: &SpecSource) {
        let has_key = self.pii_key.is_some();
        let check = |c: &Contract| -> Result<(), String> {
            match c
                .product
                .spec
                .schema
                .iter()
                .position(|col| col.pii == Some(PiiMode::Hash))
            {
                Some(i) if !has_key => Err(format!(
                    "spec.schema[{i}].pii: column {} is hashed, but MEDALLION_PII_KEY is not set; set it (the same key on every transform replica)",
                    c.product.spec.schema[i].name
                )),
                _ => Ok(()),
            }
        };
        let changes = sync_specs(
            source,
            &mut self.products,
            check,
            has_key as u64,
            &self.rt.health,
        )
        .await;
        for id in changes.updated.iter().chain(changes.removed.iter()) {
            // A new spec version starts from the committed state (and clears a halt).
            self.states.remove(id);
            self.rt
                .health
                .clear_problem(&format!("product {}.{}", id.0, id.1));
            self.metrics
                .product_failed
                .with_label_values(&[&format!("{}.{}", id.0, id.1)])
                .set(0);
        }
    }

    async fn catch_up_all(&mut self) {
        let ids: Vec<ProductId> = self.products.contracts.keys().cloned().collect();
        for id in ids {
            self.catch_up(&id, &mut BTreeMap::new(), &[], Reach::Tick)
                .await;
        }
    }

    async fn on_events(&mut self, msgs: Vec<jetstream::Message>) {
        let states = &self.states;
        let more = medallion_bus::horizon::more_waiting(&msgs);
        self.tick_horizon.pulled(more, self.reload_interval);
        let (tables, malformed) = medallion_bus::announced(
            msgs.iter()
                .map(|m| (m.subject.as_str(), m.headers.as_ref(), &m.payload)),
            |t, v| {
                states
                    .get(&(t.domain.clone(), t.name.clone()))
                    .is_none_or(|s| v > s.processed)
            },
            &mut self.in_flight,
        );
        for subject in malformed {
            warn!(subject = %subject, "malformed bronze event ignored; the table is read instead");
        }
        for (table, mut announced) in tables {
            let id = (table.domain.clone(), table.name.clone());
            if !self.products.contracts.contains_key(&id) {
                continue;
            }
            debug!(
                product = %format!("{}.{}", id.0, id.1),
                messages = msgs.len(),
                more,
                through = ?announced.through,
                versions = ?announced.rows.keys().collect::<Vec<_>>(),
                "bronze events pulled"
            );
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

    async fn state(&mut self, id: &ProductId) -> Option<&mut ProductState> {
        if !self.states.contains_key(id) {
            if !self.lake_backoff.ready(id) {
                return None;
            }
            let contract = self.products.contracts.get(id)?.clone();
            match open_state(&self.lake, contract).await {
                Ok(s) => {
                    self.rt
                        .health
                        .clear_problem(&format!("lake {}.{}", id.0, id.1));
                    // Only a commit that lands resets the back-off: on a full
                    // disk the tables open fine and the commit fails.
                    self.states.insert(id.clone(), s);
                }
                Err(e) => {
                    let attempt = self.lake_backoff.failed(id.clone());
                    let product = format!("{}.{}", id.0, id.1);
                    // The first failure in a row is an error, the retries behind
                    // it (after a failed commit too) are warnings.
                    if attempt == 1 {
                        error!(product, attempt, error = %e, "cannot open silver tables");
                    } else {
                        warn!(product, attempt, error = %e, "cannot open silver tables");
                    }
                    self.rt
                        .health
                        .set_problem(format!("lake {}.{}", id.0, id.1), e);
                    return None;
                }
            }
        }
        self.states.get_mut(id)
    }

    /// Brings Silver up to the latest Bronze version, using event rows where
    /// present and reading the Bronze table for the rest.
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
        let bronze_ref = TableRef::bronze(&id.0, &id.1);
        let Ok(Some(bronze)) = self.upstream.latest(&self.lake, &bronze_ref).await else {
            return false;
        };
        let latest = bronze.version().map(|v| v as i64).unwrap_or(-1);
        let latest = match reach {
            Reach::Latest => latest,
            Reach::Tick => self.tick_horizon.through(id, latest),
            Reach::Through(v) => v.min(latest),
        };
        let pii_key = self.pii_key.clone();
        let max_rows = self.max_rows;
        let max_deliver = self.max_deliver;
        let metrics = self.metrics.clone();
        let js = self.js.clone();
        let max_payload = medallion_bus::max_payload(&self.client);
        let health = self.rt.health.clone();
        let attempts = self.attempts.clone();
        let crash_exe = self.crash_exe.clone();
        if self.state(id).await.is_none() {
            return false;
        }
        let Some(state) = self.states.get_mut(id) else {
            return false;
        };
        let lake_backoff = &mut self.lake_backoff;
        if state.halted.is_some() {
            return false;
        }
        while state.processed < latest {
            // A crash between the quarantine and the Silver commit leaves
            // quarantine ahead: redo exactly that range first, so the
            // quarantine commit is recognised as done instead of re-adding
            // its rows under a larger transaction version.
            let target = match state.quarantine.txn_version() {
                Some(q)
                    if q >> GEN_SHIFT == state.generation
                        && (q & VERSION_MASK) > state.processed =>
                {
                    (q & VERSION_MASK).min(latest)
                }
                _ => latest,
            };
            let product = pid(&state.contract);
            let crash_check = match &attempts {
                Some(a) => {
                    crash_check_if_died_before(a, crash_exe.as_deref(), state, pii_key.as_deref())
                        .await
                }
                None => None,
            };
            let span = info_span!(
                "transform.batch",
                product,
                layer = LAYER,
                from = state.processed + 1,
                to = tracing::field::Empty,
                rows = tracing::field::Empty,
                version = tracing::field::Empty
            );
            let result = step(
                state,
                &bronze,
                &bronze_ref,
                target,
                fast,
                pii_key.as_deref(),
                max_rows,
                max_deliver,
                crash_check.as_ref(),
                &metrics,
            )
            .instrument(span.clone())
            .await;
            match result {
                Ok(Step::Commit {
                    out_silver,
                    out_quarantine,
                    counts,
                    new_keys,
                    last,
                    halt,
                    poison,
                }) => {
                    let links = medallion_bus::trace::continue_traces(
                        "transform.message",
                        links.iter().map(String::as_str),
                        &span,
                    );
                    let commit_span = info_span!(
                        parent: &span,
                        "silver.commit",
                        product,
                        layer = LAYER,
                        rows = counts.rows_out,
                        quarantined = counts.quarantined,
                        bronze_version = last,
                        version = tracing::field::Empty
                    );
                    medallion_bus::trace::link_all(&commit_span, links.iter().map(String::as_str));
                    match commit(
                        state,
                        out_silver,
                        out_quarantine,
                        counts,
                        new_keys,
                        last,
                        &poison,
                        &js,
                        max_payload,
                        &metrics,
                        &links,
                    )
                    .instrument(commit_span)
                    .await
                    {
                        Ok(()) => {
                            span.record("version", state.silver.version());
                            health.clear_problem(&format!("lake {product}"));
                            lake_backoff.succeeded(id);
                        }
                        Err(e) => {
                            metrics
                                .errors
                                .with_label_values(&["transform", "commit"])
                                .inc();
                            warn!(product, error = %e, "silver commit failed; retrying from the table");
                            health.set_problem(format!("lake {product}"), e);
                            self.states.remove(id);
                            self.lake_backoff.failed(id.clone());
                            return false;
                        }
                    }
                    if let Some(h) = halt {
                        error!(product, reason = %h, "product halted by a fail expectation");
                        metrics.product_failed.with_label_values(&[&product]).set(1);
                        health.set_problem(format!("product {product}"), h.clone());
                        state.halted = Some(h);
                        return false;
                    }
                }
                Err(e) => {
                    metrics
                        .errors
                        .with_label_values(&["transform", "read"])
                        .inc();
                    warn!(product, error = %e, "cannot read bronze; retrying on the next tick");
                    return false;
                }
            }
        }
        true
    }

    /// Full refresh of one product's Silver from Bronze; earlier versions stay
    /// readable by time travel. Answers with a one-line result.
    async fn replay(&mut self, product: &str) -> String {
        let Some((d, p)) = product.split_once('.') else {
            return format!("error: expected <domain>.<product>, got {product:?}");
        };
        let id = (d.to_string(), p.to_string());
        if !self.products.contracts.contains_key(&id) {
            return format!("error: no product spec registered for {product}");
        }
        self.states.remove(&id);
        let Some(state) = self.state(&id).await else {
            return format!("error: cannot open the silver tables of {product}");
        };
        state.generation += 1;
        state.processed = -1;
        state.keys.clear();
        state.halted = None;
        let generation = state.generation;
        info!(product, generation, "replay: rebuilding silver from bronze");
        self.catch_up(&id, &mut BTreeMap::new(), &[], Reach::Latest)
            .await;
        match self.states.get(&id) {
            Some(s) if s.generation == generation => format!(
                "ok: silver.{product} rebuilt from bronze up to version {} (silver version {})",
                s.processed,
                s.silver.version()
            ),
            _ => format!("error: replay of {product} did not finish; see the transform logs"),
        }
    }
}

enum Step {
    Commit {
        out_silver: Vec<RecordBatch>,
        out_quarantine: Vec<RecordBatch>,
        counts: QualityCounts,
        new_keys: KeyHashSet,
        last: i64,
        halt: Option<String>,
        /// Messages of versions up to `last` dead-lettered instead of transformed.
        poison: Vec<Poison>,
    },
}

/// Payload bytes per unit of parallel transform work (see [`slices`]).
const SLICE_BYTES: usize = 1 << 20;

#[allow(clippy::too_many_arguments)]
async fn step(
    state: &mut ProductState,
    bronze: &deltalake::DeltaTable,
    bronze_ref: &TableRef,
    latest: i64,
    fast: &mut BTreeMap<i64, Vec<RecordBatch>>,
    pii_key: Option<&[u8]>,
    max_rows: usize,
    max_deliver: u32,
    crash_check: Option<&CrashCheck>,
    metrics: &PipelineMetrics,
) -> Result<Step, String> {
    let product = pid(&state.contract);
    let format = state.contract.product.spec.source.format;
    // Gather Bronze versions until the step holds `max_rows` records.
    let mut inputs: Vec<(i64, RecordBatch)> = Vec::new();
    let mut versions = Vec::new();
    let mut records = 0usize;
    for v in (state.processed + 1)..=latest {
        let batches = match fast.remove(&v) {
            Some(b) => b,
            None => {
                metrics.catch_up_commits.with_label_values(&[LAYER]).inc();
                match read_commit(bronze_ref, bronze, v)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    Some(c) => c.batches,
                    None => {
                        warn!(
                            product,
                            version = v,
                            "bronze version no longer in the log; skipped"
                        );
                        Vec::new()
                    }
                }
            }
        };
        records += batches
            .iter()
            .map(|b| crate::decode::count_records(format, b))
            .sum::<usize>();
        inputs.extend(
            batches
                .iter()
                .flat_map(|b| slices(b, SLICE_BYTES))
                .map(|b| (v, b)),
        );
        versions.push(v);
        failpoint::hit("transform.after_version");
        if records >= max_rows {
            break;
        }
    }

    let checked = match crash_check {
        Some(check) => isolate_killers(&product, check, &mut inputs, max_deliver),
        None => Vec::new(),
    };
    let mut outputs = transform_parallel(
        &state.contract,
        pii_key,
        &state.keys,
        &inputs,
        now_us(),
        max_deliver,
    );
    for (i, killers) in checked {
        outputs[i].1.extend(killers);
    }

    // Fold in Bronze order; keys of earlier batches of this step count as seen
    // (first occurrence wins), and a version with a halt ends the step before it.
    let mut out_silver = Vec::new();
    let mut out_quarantine = Vec::new();
    let mut counts = QualityCounts::default();
    // Sized once: grown by doubling, its rehashes were 2% of the CPU.
    let mut pending = KeyHashSet::with_capacity_and_hasher(
        outputs
            .iter()
            .map(|(r, _)| r.as_ref().map_or(0, |o| o.new_keys.len()))
            .sum(),
        Default::default(),
    );
    let mut last = state.processed;
    let mut halt = None;
    let mut poisoned = Vec::new();
    let mut outputs = inputs.iter().map(|(v, _)| *v).zip(outputs).peekable();
    for v in versions {
        let mut version_out = Vec::new();
        let mut version_poison = Vec::new();
        while let Some((_, (r, p))) = outputs.next_if(|(ov, _)| *ov == v) {
            for x in &p {
                warn!(product, bronze_version = v, stream_seq = x.stream_seq, deliveries = x.deliveries, reason = %x.reason, "poison message isolated; dead-lettering it");
            }
            version_poison.extend(p);
            match r {
                Ok(o) => version_out.push(o),
                Err(h) => {
                    halt.get_or_insert(h);
                }
            }
        }
        if halt.is_some() {
            // Poison of this version is parked when the version commits.
            break;
        }
        poisoned.extend(version_poison);
        for mut o in version_out {
            drop_keys_seen(&mut o, &pending);
            pending.extend(o.new_keys.iter().copied());
            counts.add(&o.counts);
            out_silver.push(o.silver);
            out_quarantine.push(o.quarantine);
        }
        last = v;
    }
    tracing::Span::current()
        .record("to", last)
        .record("rows", counts.rows_out);
    Ok(Step::Commit {
        out_silver,
        out_quarantine,
        counts,
        new_keys: pending,
        last,
        halt,
        poison: poisoned,
    })
}

/// A crash check for this step when an earlier process started the same step
/// and never got past it (see [`crate::crash_check`]).
async fn crash_check_if_died_before(
    attempts: &medallion_bus::attempts::Attempts,
    exe: Option<&std::path::Path>,
    state: &ProductState,
    pii_key: Option<&[u8]>,
) -> Option<CrashCheck> {
    let product = pid(&state.contract);
    let start = format!("{}:{}", state.generation, state.processed + 1);
    let attempt = match attempts
        .begin(&format!("transform.{product}"), &start)
        .await
    {
        Ok(n) => n,
        Err(e) => {
            warn!(product, error = %e, "cannot record the attempt; going on without a crash check");
            return None;
        }
    };
    if attempt <= 1 {
        return None;
    }
    warn!(
        product,
        from = state.processed + 1,
        attempt,
        "an earlier process died on these bronze versions; checking them in a child process first"
    );
    match CrashCheck::new(
        exe?.to_path_buf(),
        &state.contract,
        pii_key,
        CRASH_CHECK_TIMEOUT,
    ) {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(product, error = %e, "crash check unavailable");
            None
        }
    }
}

/// Longest a child may take over one slice before it counts as a crash.
const CRASH_CHECK_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs each input in a crash-check child; in an input the child does not
/// survive, finds the records that kill it on their own (`max_deliver` times
/// each) and takes them out. Returns them by input index.
fn isolate_killers(
    product: &str,
    check: &CrashCheck,
    inputs: &mut [(i64, RecordBatch)],
    max_deliver: u32,
) -> Vec<(usize, Vec<Poison>)> {
    let mut out = Vec::new();
    for (i, (v, b)) in inputs.iter_mut().enumerate() {
        // `isolate` runs the whole slice first: a slice the child survives
        // costs one child.
        if let Some(iso) = poison::isolate(b, *v, max_deliver, |x| check.run(*v, x)) {
            warn!(
                product,
                bronze_version = *v,
                killers = iso.poison.len(),
                "the transform dies on these bronze records; dead-lettering them"
            );
            *b = iso.rest;
            out.push((i, iso.poison));
        }
    }
    out
}

/// What one slice of Bronze gave: its output (or the halt it hit), and the
/// messages that crash the transform by themselves, taken out of it.
type SliceResult = (Result<Output, String>, Vec<Poison>);

/// Transforms the batches on every core. Each batch is independent given the
/// committed key set; cross-batch duplicates within the step are removed
/// afterwards by [`drop_keys_seen`], in Bronze order. A panic on hostile input
/// must not take the service down: the messages that crash it on their own
/// are taken out for the dead-letter stream and the rest goes on; if no
/// single message does, the product halts at that version.
fn transform_parallel(
    contract: &Arc<Contract>,
    pii_key: Option<&[u8]>,
    keys: &KeySet,
    inputs: &[(i64, RecordBatch)],
    now: i64,
    max_deliver: u32,
) -> Vec<SliceResult> {
    let one = |(v, b): &(i64, RecordBatch)| -> SliceResult {
        let none = KeyHashSet::default();
        let run = |b: &RecordBatch| {
            poison::guarded(|| {
                poison::inject(b);
                transform(contract, pii_key, b, *v, keys, &none, now)
            })
        };
        let mut r = run(b);
        let mut poisoned = Vec::new();
        if r.is_err()
            && let Some(iso) = poison::isolate(b, *v, max_deliver, |x| {
                run(x)
                    .map(|_| ())
                    .map_err(|m| format!("transform panicked: {m}"))
            })
        {
            poisoned = iso.poison;
            r = run(&iso.rest);
        }
        let r = match r {
            Ok(Ok(o)) => Ok(o),
            Ok(Err(h)) => Err(h.to_string()),
            Err(msg) => Err(format!("transform crashed on bronze version {v}: {msg}")),
        };
        (r, poisoned)
    };
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(inputs.len());
    if workers <= 1 {
        return inputs.iter().map(one).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<SliceResult>> = (0..inputs.len()).map(|_| None).collect();
    let done: Vec<Vec<(usize, SliceResult)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(input) = inputs.get(i) else {
                            break;
                        };
                        mine.push((i, one(input)));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("transform worker panics are caught"))
            .collect()
    });
    for (i, r) in done.into_iter().flatten() {
        results[i] = Some(r);
    }
    results
        .into_iter()
        .map(|r| r.expect("every batch transformed"))
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn commit(
    state: &mut ProductState,
    silver: Vec<RecordBatch>,
    quarantine: Vec<RecordBatch>,
    mut counts: QualityCounts,
    new_keys: KeyHashSet,
    last: i64,
    poison: &[Poison],
    js: &jetstream::Context,
    max_payload: usize,
    metrics: &PipelineMetrics,
    links: &[String],
) -> Result<(), String> {
    // Bronze messages parked in the DLQ by this commit (their records are in
    // no other count).
    counts.dead_lettered = poison.len() as u64;
    if last == state.processed {
        return Ok(());
    }
    let product = pid(&state.contract);
    let txn = (state.generation << GEN_SHIFT) | last;
    let mode = |w: &TableWriter| {
        // The first commit of a replay replaces the table's rows.
        if state.generation > 0
            && state.processed < 0
            && w.txn_version().map(|t| t >> GEN_SHIFT) != Some(state.generation)
        {
            WriteMode::Overwrite
        } else {
            WriteMode::Append
        }
    };
    let started = Instant::now();
    // Parked before the commit that covers their version: never lost, and a
    // retry after a crash finds them already parked.
    let (domain, name) = (
        state.contract.domain().to_string(),
        state.contract.name().to_string(),
    );
    poison::park(js, &domain, &name, poison).await?;
    if !poison.is_empty() {
        failpoint::hit("transform.after_park");
    }
    let qmode = mode(&state.quarantine);
    let smode = mode(&state.silver);
    let replaced = matches!(smode, WriteMode::Overwrite);
    let q_rows: usize = quarantine.iter().map(|b| b.num_rows()).sum();
    if q_rows > 0 || matches!(qmode, WriteMode::Overwrite) {
        state
            .quarantine
            .commit(
                &quarantine,
                txn,
                qmode,
                &[("medallion.bronze_version", last.into())],
            )
            .await
            .map_err(|e| e.to_string())?;
    }
    failpoint::hit("transform.between_commits");
    let outcome = state
        .silver
        .commit(
            &silver,
            txn,
            smode,
            &[
                ("medallion.bronze_version", last.into()),
                ("medallion.generation", state.generation.into()),
            ],
        )
        .await
        .map_err(|e| e.to_string())?;
    let version = match outcome {
        CommitOutcome::Committed(v) => v,
        CommitOutcome::AlreadyCommitted(_) => {
            return Err(
                "silver already has this bronze version (another transform replica?)".into(),
            );
        }
    };
    state.processed = last;
    state.keys.extend(new_keys);
    state.commits_since_snapshot += 1;
    tracing::Span::current().record("version", version);
    let silver_ref = state.silver.table_ref().clone();
    metrics
        .commit_seconds
        .with_label_values(&[LAYER])
        .observe(started.elapsed().as_secs_f64());
    metrics
        .rows_in
        .with_label_values(&[LAYER, &product])
        .inc_by(counts.rows_in);
    metrics
        .rows_out
        .with_label_values(&[LAYER, &product])
        .inc_by(counts.rows_out);
    metrics
        .quarantined
        .with_label_values(&[&product, "invalid"])
        .inc_by(counts.invalid);
    metrics
        .deduplicated
        .with_label_values(&[&product])
        .inc_by(counts.duplicates);
    metrics
        .dead_lettered
        .with_label_values(&["transform", "panic"])
        .inc_by(poison.len() as u64);
    // Per-rule counts: a row failing two rules counts under both.
    for (name, e) in &counts.expectations {
        match e.action.as_str() {
            "warn" => metrics
                .warned
                .with_label_values(&[&product, name])
                .inc_by(e.failed),
            "drop" => metrics
                .dropped
                .with_label_values(&[&product, name])
                .inc_by(e.failed),
            "quarantine" => metrics
                .quarantined
                .with_label_values(&[&product, name])
                .inc_by(e.failed),
            _ => {}
        }
    }
    metrics.committed(&silver_ref.sql_name(), version);
    if !replaced {
        for b in &silver {
            if let Some(at) = medallion_spec::ingested_at_micros(b) {
                metrics.observe_latency(LAYER, at);
            }
        }
    }
    tracing::Span::current().record("version", version);
    info!(
        product,
        layer = LAYER,
        rows = counts.rows_out,
        quarantined = counts.quarantined,
        dead_lettered = poison.len(),
        version,
        bronze_version = last,
        "silver committed"
    );

    let schema = state.silver.schema().clone();
    let commit = Commit {
        table: &silver_ref,
        version,
        operation: if replaced {
            Operation::Overwrite
        } else {
            Operation::Append
        },
        schema,
        batches: &silver,
        links,
    };
    match publish_commit(js, commit, max_payload).await {
        Ok(n) => metrics
            .events_published
            .with_label_values(&[LAYER])
            .inc_by(n as u64),
        Err(e) => {
            warn!(table = %silver_ref, version, error = %e, "silver event not published; aggregate reads the commit from the table")
        }
    }
    publish_quality(js, &state.contract, version, last, &counts).await;
    if state.commits_since_snapshot >= SNAPSHOT_EVERY {
        state.snapshot().await;
    }
    Ok(())
}

async fn publish_quality(
    js: &jetstream::Context,
    c: &Contract,
    silver_version: i64,
    bronze_version: i64,
    counts: &QualityCounts,
) {
    let body = serde_json::json!({
        "product": pid(c),
        "silver_version": silver_version,
        "bronze_version": bronze_version,
        "at": chrono::Utc::now().to_rfc3339(),
        "counts": counts,
    });
    let subject = format!("medallion.quality.{}.{}", c.domain(), c.name());
    let mut h = async_nats::HeaderMap::new();
    h.insert(
        "Nats-Msg-Id",
        format!("quality:{}@{silver_version}", pid(c)).as_str(),
    );
    let sent = match js
        .publish_with_headers(subject, h, body.to_string().into())
        .await
    {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = sent {
        warn!(product = %pid(c), error = %e, "quality event not published");
    }
}

async fn open_state(lake: &Lake, contract: Arc<Contract>) -> Result<ProductState, String> {
    let (d, p) = (contract.domain().to_string(), contract.name().to_string());
    let silver_ref = TableRef::silver(&d, &p);
    let options = TableOptions {
        description: Some(contract.product.spec.description.clone()),
        append_only: false,
        partition_columns: vec![],
        // A single-column key is unique in Silver by construction.
        unique_columns: match contract.key() {
            [k] => vec![k.clone()],
            _ => vec![],
        },
    };
    let silver = TableWriter::open_or_create(
        lake,
        &silver_ref,
        contract.silver_schema.clone(),
        APP_ID,
        &options,
    )
    .await
    .map_err(|e| e.to_string())?;
    // A spec whose columns differ from the table's is fine here: the writer
    // adds new optional columns on the next commit, and refuses anything else
    // with the fix (a full refresh, which rewrites the table under the new
    // schema).
    let qoptions = TableOptions {
        description: Some(format!(
            "Rows of {d}.{p} rejected by its contract, with the reasons"
        )),
        append_only: false,
        partition_columns: vec![],
        unique_columns: vec![quarantine::PAYLOAD.into()],
    };
    let quarantine = TableWriter::open_or_create(
        lake,
        &TableRef::quarantine(&d, &p),
        quarantine_schema(),
        APP_ID,
        &qoptions,
    )
    .await
    .map_err(|e| e.to_string())?;
    let txn = silver.txn_version().unwrap_or(-1);
    let (processed, generation) = if txn < 0 {
        (-1, 0)
    } else {
        (txn & VERSION_MASK, txn >> GEN_SHIFT)
    };
    let keys = load_keys(&silver, contract.key()).await?;
    Ok(ProductState {
        contract,
        silver,
        quarantine,
        keys,
        processed,
        generation,
        halted: None,
        commits_since_snapshot: 0,
    })
}

/// The key set as of Silver's current version: newest snapshot + later commits.
async fn load_keys(silver: &TableWriter, key: &[String]) -> Result<KeySet, String> {
    if key.is_empty() {
        return Ok(KeySet::default());
    }
    let current = silver.version();
    let store = silver.table().log_store().object_store(None);
    let (from, mut keys) = match KeySet::load(store.as_ref(), current)
        .await
        .map_err(|e| e.to_string())?
    {
        Some((v, set)) => (v + 1, set),
        None => (0, KeySet::default()),
    };
    let started = Instant::now();
    for v in from..=current {
        if let Some(c) = read_commit(silver.table_ref(), silver.table(), v)
            .await
            .map_err(|e| e.to_string())?
        {
            if c.removed_data {
                keys.clear();
            }
            for b in &c.batches {
                keys.add_batch(b, key).map_err(|e| e.to_string())?;
            }
        }
    }
    info!(table = %silver.table_ref(), keys = keys.len(), from_version = from, to_version = current, ms = started.elapsed().as_millis() as u64, "dedupe state loaded");
    Ok(keys)
}
