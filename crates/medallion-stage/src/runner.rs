//! The loop of a stage downstream of a table (transform reads Bronze,
//! aggregate reads Silver). It owns everything the two have in common —
//! specs and their reload, the units this replica holds and their event
//! feeds, events turned into rows (and trace links) per upstream version,
//! the timer that reads versions whose events never came, back-off when the
//! lake fails, and the wake-ups of the commit chain — and calls the stage
//! only for what is its own: opening a product's tables and state, and
//! advancing them over upstream versions ([`Stage::advance`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arrow::array::RecordBatch;
use async_nats::jetstream;
use futures::StreamExt;
use futures::future::BoxFuture;
use medallion_bus::batching::BatchLimits;
use medallion_bus::horizon::{PendingLinks, Reach, TickHorizon};
use medallion_bus::ownership::{Owners, UnitId};
use medallion_bus::registry::{SpecSource, sync_specs};
use medallion_bus::{Announced, PartsInFlight};
use medallion_lake::{Lake, TableCache};
use medallion_runtime::Runtime;
use medallion_runtime::backoff::Backoff;
use medallion_runtime::metrics::{MaintenanceMetrics, PipelineMetrics};
use medallion_spec::products::{ProductId, Products};
use medallion_spec::{Contract, Layer, TableRef};
use tracing::{debug, error, info, warn};

use crate::chain::{Partitions, Run};
use crate::feed::{FeedBatch, Feeds, unit_consumer};
use crate::lease::{Change, Ownership, OwnershipSettings};

/// What distinguishes one downstream stage from another to the runner.
#[derive(Debug, Clone, Copy)]
pub struct StageSpec {
    /// `transform` or `aggregate`: lease keys, metrics, chain subjects.
    pub name: &'static str,
    /// Prefix of the per-unit durable consumers (`<prefix>-<domain>-<product>-<partition>`).
    pub durable_prefix: &'static str,
    /// The stream of the upstream layer's events.
    pub upstream_stream: &'static str,
    pub upstream_layer: Layer,
}

/// What a stage gets from its service.
pub struct StageDeps {
    pub lake: Lake,
    pub js: jetstream::Context,
    pub client: async_nats::Client,
    pub source: SpecSource,
    pub owners: Owners,
    pub ownership: OwnershipSettings,
    pub batch: BatchLimits,
    pub ack_wait: Duration,
    pub reload_interval: Duration,
    pub maintenance: crate::maintenance::MaintenanceSettings,
    pub rt: Runtime,
    pub metrics: PipelineMetrics,
}

/// How far one call of [`Stage::advance`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Everything in reach is committed (`committed`: at least one commit landed).
    Done { committed: bool },
    /// The next versions are computed but another replica's versions come
    /// first; a wake-up of the chain calls again.
    Waiting { committed: bool },
    /// The product could not look at its upstream (halted, unreadable):
    /// trace links are kept for the next pass.
    Stalled,
    /// A commit failed: the runner drops the product's state and retries
    /// after a back-off.
    CommitFailed(String),
    /// The table moved under another generation (a full refresh): the
    /// runner drops the state and opens it again.
    Reopen,
}

/// One pass of a product over its upstream table.
pub struct Advance<'a> {
    pub product: &'a ProductId,
    pub upstream_ref: &'a TableRef,
    /// The upstream table at its latest version.
    pub upstream: &'a deltalake::DeltaTable,
    /// How far this pass may go (the timer's reach, or what events announced).
    pub latest: i64,
    pub partitions: &'a Partitions,
    /// Rows of upstream versions that came with their events.
    pub fast: &'a mut BTreeMap<i64, Vec<RecordBatch>>,
    /// Trace contexts of the inputs of this pass.
    pub links: &'a [String],
    kinds: &'a mut BTreeMap<i64, bool>,
    ownership: &'a Ownership,
}

impl Advance<'_> {
    /// The next run of versions this replica may process after `processed`.
    pub async fn plan(&mut self, processed: i64) -> Result<Option<Run>, String> {
        loop {
            let mut unknown = None;
            let run = crate::chain::plan(processed, self.latest, self.partitions, |v| {
                let k = self.kinds.get(&v).copied();
                if k.is_none() && unknown.is_none() {
                    unknown = Some(v);
                }
                k
            });
            let Some(v) = unknown else {
                return Ok(run);
            };
            let summary = medallion_lake::commit_summary(self.upstream_ref, self.upstream, v)
                .await
                .map_err(|e| e.to_string())?;
            // A log entry that is gone held nothing anyone still waits for.
            self.kinds.insert(v, summary.is_some_and(|s| s.has_data()));
        }
    }

    /// Whether this replica still holds the partitions of every version in
    /// `run` that is its own (checked right before committing).
    pub fn holds(&self, run: &Run) -> bool {
        run.versions
            .iter()
            .filter(|v| self.partitions.takes(**v))
            .all(|v| {
                self.ownership.holds(&UnitId::new(
                    &self.product.0,
                    &self.product.1,
                    medallion_spec::version_partition(*v, self.partitions.count),
                ))
            })
    }
}

/// A request on a stage's control subject, answered with one line.
pub enum Reply {
    Now(String),
    /// Answered when the future resolves (the loop goes on meanwhile).
    Later(BoxFuture<'static, String>),
}

/// A downstream stage: what it keeps per product and how it advances it.
pub trait Stage: Send {
    type Product: Send;

    /// This service's own requirements on a spec, and a salt that changes
    /// when they do (see [`sync_specs`]).
    fn spec_check(
        &self,
    ) -> (
        Box<dyn Fn(&Contract) -> Result<(), String> + Send + Sync>,
        u64,
    ) {
        (Box::new(|_| Ok(())), 0)
    }

    /// Opens a product's tables and state.
    fn open(
        &mut self,
        contract: Arc<Contract>,
    ) -> impl Future<Output = Result<Self::Product, String>> + Send;

    /// Whether an announced upstream version is still to be processed (the
    /// rows of one that is not are never decoded).
    fn wants(&self, product: &Self::Product, version: i64) -> bool;

    /// Brings the product's tables as far as the pass allows.
    fn advance(
        &mut self,
        product: &mut Self::Product,
        pass: Advance<'_>,
    ) -> impl Future<Output = Progress> + Send;

    /// Called when the replica stops working on a product (its units moved,
    /// or shutdown): a chance to save state that makes the next start cheaper.
    fn close(&mut self, _product: &mut Self::Product) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// The tables of a product this stage writes, for table maintenance.
    fn maintained_tables(&self) -> crate::maintenance::TablesOf;

    /// The core NATS subject of the stage's requests (queue group per stage), if any.
    fn control_subject(&self) -> Option<&'static str> {
        None
    }

    /// Answers a request; `product` is opened if the request names one the
    /// stage runs (`<domain>.<product>`).
    fn control(
        &mut self,
        _request: &str,
        _product: Option<(&ProductId, &mut Self::Product)>,
    ) -> impl Future<Output = Reply> + Send {
        async { Reply::Now("error: this stage takes no requests".into()) }
    }
}

/// Runs a stage until shutdown.
pub async fn run<S: Stage>(stage: S, spec: StageSpec, deps: StageDeps) -> anyhow::Result<()> {
    let mut ownership = Ownership::start(
        deps.owners.clone(),
        spec.name,
        &deps.ownership,
        &deps.rt.registry,
    )
    .context("registering the ownership metrics")?;
    let mut feeds = Feeds::new(deps.batch);
    let mut notes = deps
        .client
        .subscribe(format!("medallion.chain.{}.>", spec.name))
        .await
        .context("subscribing to the commit chain")?;
    let mut control = match stage.control_subject() {
        Some(s) => Some(
            deps.client
                .queue_subscribe(s, format!("medallion-{}", spec.name))
                .await
                .context("subscribing to requests")?,
        ),
        None => None,
    };
    retire_shared_consumer(&deps.js, spec).await;
    let (contracts, watched) = tokio::sync::watch::channel(Default::default());
    crate::maintenance::start(
        spec.name,
        deps.maintenance.clone(),
        deps.lake.clone(),
        ownership.handle(),
        watched,
        stage.maintained_tables(),
        MaintenanceMetrics::register(&deps.rt.registry)
            .context("registering the maintenance metrics")?,
    )
    .context("starting table maintenance")?;
    let mut r = Runner {
        stage,
        spec,
        lake: deps.lake,
        js: deps.js,
        client: deps.client,
        products: Products::new(),
        states: HashMap::new(),
        active: BTreeMap::new(),
        waiting_consumer: BTreeSet::new(),
        upstream: TableCache::default(),
        lake_backoff: Backoff::default(),
        tick_horizon: TickHorizon::default(),
        pending_links: PendingLinks::default(),
        in_flight: PartsInFlight::default(),
        kinds: HashMap::new(),
        announced: HashMap::new(),
        ack_wait: deps.ack_wait,
        reload_interval: deps.reload_interval,
        rt: deps.rt.clone(),
        metrics: deps.metrics,
        contracts,
    };
    let source = deps.source;
    r.reload(&source, &ownership).await;
    let rt = deps.rt;
    rt.health.set_started();
    info!(
        stage = spec.name,
        replica = ownership.replica(),
        "stage started"
    );
    let mut tick = tokio::time::interval(r.reload_interval);
    // Not `biased`: chain wake-ups and ticks would starve the feeds. A
    // steady flow of events must not hold a shutdown back either, hence
    // the check before each turn.
    while !rt.shutdown.is_cancelled() {
        tokio::select! {
            _ = rt.shutdown.cancelled() => break,
            Some(change) = ownership.next_change() => r.on_change(change, &mut feeds, &ownership).await,
            _ = source.changed() => r.reload(&source, &ownership).await,
            _ = tick.tick() => {
                r.reload(&source, &ownership).await;
                r.start_waiting_consumers(&mut feeds).await;
                r.catch_up_all(&ownership).await;
            }
            Some(note) = notes.next() => {
                if let Some(id) = product_of_note(&note.subject, spec.name) {
                    r.on_chain_moved(&id, &ownership).await;
                }
            }
            Some(req) = next_request(&mut control) => r.on_request(req, &ownership).await,
            batch = feeds.next(&rt.shutdown) => match batch {
                None => break,
                Some(b) => r.on_batch(b, &ownership).await,
            }
        }
    }
    info!(stage = spec.name, "stopping: handing the units over");
    ownership.stop_acquiring();
    let left_before = feeds.left_unacked();
    // Every unit's feed finishes its fetch; what it pulled is processed and
    // acked here, so the next holder has nothing waiting for redelivery.
    for u in r.active_units() {
        feeds.stop(&u);
    }
    let drained = async {
        let never = tokio_util::sync::CancellationToken::new();
        while !r.active.is_empty() {
            match feeds.next(&never).await {
                Some(b) => r.on_batch(b, &ownership).await,
                None => break,
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), drained)
        .await
        .is_err()
    {
        warn!(
            stage = spec.name,
            "units did not drain within 10 s; their last events are redelivered to the next holder"
        );
        feeds.kill_all();
    }
    let ids: Vec<ProductId> = r.states.keys().cloned().collect();
    for id in ids {
        r.close(&id).await;
    }
    ownership.shutdown().await;
    medallion_bus::flush_for_shutdown(&r.client, Duration::from_secs(5)).await;
    // A drain cut short leaves events for the next holders to get again.
    info!(
        stage = spec.name,
        left_unacked = feeds.left_unacked() - left_before,
        "stage stopped"
    );
    Ok(())
}

async fn next_request(control: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    match control {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Before units, one durable consumer read every product's events; it is
/// not read any more and would only hold messages on the server.
async fn retire_shared_consumer(js: &jetstream::Context, spec: StageSpec) {
    if let Ok(s) = js.get_stream(spec.upstream_stream).await
        && s.consumer_info(spec.durable_prefix).await.is_ok()
    {
        let _ = s.delete_consumer(spec.durable_prefix).await;
        info!(
            consumer = spec.durable_prefix,
            "retired the shared consumer of earlier versions"
        );
    }
}

fn product_of_note(subject: &str, stage: &str) -> Option<ProductId> {
    let rest = subject.strip_prefix(&format!("medallion.chain.{stage}."))?;
    let (d, p) = rest.split_once('.')?;
    Some((d.to_string(), p.to_string()))
}

struct Runner<S: Stage> {
    stage: S,
    spec: StageSpec,
    lake: Lake,
    js: jetstream::Context,
    client: async_nats::Client,
    products: Products,
    /// What table maintenance sees of the specs.
    contracts: tokio::sync::watch::Sender<crate::maintenance::Contracts>,
    states: HashMap<ProductId, S::Product>,
    /// Partitions this replica works on, per product (held and not handed over).
    active: BTreeMap<ProductId, BTreeSet<u32>>,
    /// Units held whose consumer could not be created yet (retried at each tick).
    waiting_consumer: BTreeSet<UnitId>,
    upstream: TableCache,
    lake_backoff: Backoff<ProductId>,
    tick_horizon: TickHorizon<ProductId>,
    pending_links: PendingLinks<ProductId>,
    in_flight: PartsInFlight,
    /// Whether other replicas' upstream versions hold data, per product.
    kinds: HashMap<ProductId, BTreeMap<i64, bool>>,
    /// The newest upstream version an event announced, per product.
    announced: HashMap<ProductId, i64>,
    ack_wait: Duration,
    reload_interval: Duration,
    rt: Runtime,
    metrics: PipelineMetrics,
}

fn pname(id: &ProductId) -> String {
    format!("{}.{}", id.0, id.1)
}

impl<S: Stage> Runner<S> {
    fn upstream_ref(&self, id: &ProductId) -> TableRef {
        TableRef::new(self.spec.upstream_layer, &id.0, &id.1)
    }

    fn active_units(&self) -> Vec<UnitId> {
        self.active
            .iter()
            .flat_map(|(id, ks)| ks.iter().map(|k| UnitId::new(&id.0, &id.1, *k)))
            .collect()
    }

    fn partitions(&self, id: &ProductId) -> Option<Partitions> {
        let held = self.active.get(id)?.clone();
        let count = self.products.contracts.get(id)?.partitions();
        Some(Partitions { count, held })
    }

    async fn reload(&mut self, source: &SpecSource, ownership: &Ownership) {
        let (check, salt) = self.stage.spec_check();
        let changes = sync_specs(
            source,
            &mut self.products,
            |c| check(c),
            salt,
            &self.rt.health,
        )
        .await;
        if !(changes.updated.is_empty() && changes.removed.is_empty()) {
            self.contracts.send_replace(self.products.contracts.clone());
        }
        for id in changes.updated.iter().chain(changes.removed.iter()) {
            // A new spec version starts from the committed state (and clears a halt).
            if let Some(mut s) = self.states.remove(id) {
                self.stage.close(&mut s).await;
            }
            self.rt
                .health
                .clear_problem(&format!("product {}", pname(id)));
            self.metrics
                .product_failed
                .with_label_values(&[&pname(id)])
                .set(0);
        }
        ownership.set_units(
            self.products
                .contracts
                .iter()
                .flat_map(|(id, c)| (0..c.partitions()).map(|k| UnitId::new(&id.0, &id.1, k)))
                .collect(),
        );
    }

    async fn on_change(&mut self, change: Change, feeds: &mut Feeds, ownership: &Ownership) {
        match change {
            Change::Acquired(u) => {
                let id = (u.domain.clone(), u.product.clone());
                // Work the previous holder left is read from the table by
                // the next pass; the stage notices its partitions changed.
                self.active.entry(id).or_default().insert(u.partition);
                self.start_feed(u, feeds).await;
            }
            Change::Release(u) => {
                if feeds.is_running(&u) {
                    // Released once its feed has ended (see `on_batch`).
                    feeds.stop(&u);
                } else {
                    self.waiting_consumer.remove(&u);
                    self.finish_unit(&u, ownership).await;
                }
            }
            Change::Lost(u) => {
                feeds.kill(&u);
                self.waiting_consumer.remove(&u);
                self.finish_unit(&u, ownership).await;
            }
        }
    }

    /// Drops a product's state; the next pass opens it from the tables.
    async fn drop_pending_state(&mut self, id: &ProductId) {
        if let Some(mut s) = self.states.remove(id) {
            self.stage.close(&mut s).await;
        }
    }

    async fn start_feed(&mut self, u: UnitId, feeds: &mut Feeds) {
        let subject = self
            .upstream_ref(&(u.domain.clone(), u.product.clone()))
            .partition_subject(u.partition);
        match unit_consumer(
            &self.js,
            self.spec.upstream_stream,
            self.spec.durable_prefix,
            &u,
            subject,
            self.ack_wait,
        )
        .await
        {
            Ok(c) => {
                self.waiting_consumer.remove(&u);
                feeds.start(u, c);
            }
            Err(e) => {
                warn!(unit = %u, error = %e, "cannot create the unit's consumer; its versions are read from the table until it can");
                self.waiting_consumer.insert(u);
            }
        }
    }

    async fn start_waiting_consumers(&mut self, feeds: &mut Feeds) {
        for u in std::mem::take(&mut self.waiting_consumer) {
            self.start_feed(u, feeds).await;
        }
    }

    /// The replica no longer works on `u`.
    async fn finish_unit(&mut self, u: &UnitId, ownership: &Ownership) {
        let id = (u.domain.clone(), u.product.clone());
        let now_empty = match self.active.get_mut(&id) {
            Some(ks) => {
                ks.remove(&u.partition);
                ks.is_empty()
            }
            None => true,
        };
        if now_empty {
            self.active.remove(&id);
            self.close(&id).await;
        }
        ownership.released(u);
    }

    async fn close(&mut self, id: &ProductId) {
        if let Some(mut s) = self.states.remove(id) {
            self.stage.close(&mut s).await;
        }
        self.pending_links.take(id, &[]);
    }

    async fn catch_up_all(&mut self, ownership: &Ownership) {
        let ids: Vec<ProductId> = self.active.keys().cloned().collect();
        for id in ids {
            self.catch_up(&id, &mut BTreeMap::new(), &[], Reach::Tick, ownership)
                .await;
        }
    }

    async fn on_chain_moved(&mut self, id: &ProductId, ownership: &Ownership) {
        if !self.active.contains_key(id) {
            return;
        }
        let through = self.announced.get(id).copied().unwrap_or(-1);
        self.catch_up(
            id,
            &mut BTreeMap::new(),
            &[],
            Reach::Through(through),
            ownership,
        )
        .await;
    }

    async fn on_request(&mut self, req: async_nats::Message, ownership: &Ownership) {
        let text = String::from_utf8_lossy(&req.payload).trim().to_string();
        let id = text
            .split_once('.')
            .map(|(d, p)| (d.to_string(), p.to_string()));
        let reply = match id {
            Some(id) if self.products.contracts.contains_key(&id) => {
                if self.open(&id).await {
                    let state = self.states.get_mut(&id).expect("opened above");
                    let reply = self.stage.control(&text, Some((&id, state))).await;
                    // Whatever the request changed, this replica's part of
                    // it starts now rather than at the next tick.
                    self.catch_up(&id, &mut BTreeMap::new(), &[], Reach::Latest, ownership)
                        .await;
                    let _ = self
                        .client
                        .publish(
                            format!("medallion.chain.{}.{}.{}", self.spec.name, id.0, id.1),
                            "".into(),
                        )
                        .await;
                    reply
                } else {
                    Reply::Now(format!(
                        "error: cannot open the tables of {}; see the {} logs",
                        pname(&id),
                        self.spec.name
                    ))
                }
            }
            _ => self.stage.control(&text, None).await,
        };
        let Some(to) = req.reply else { return };
        match reply {
            Reply::Now(answer) => {
                let _ = self.client.publish(to, answer.into()).await;
            }
            Reply::Later(answer) => {
                let client = self.client.clone();
                tokio::spawn(async move {
                    let _ = client.publish(to, answer.await.into()).await;
                });
            }
        }
    }

    async fn on_batch(&mut self, batch: FeedBatch, ownership: &Ownership) {
        let FeedBatch { messages, ended } = batch;
        // The last message of each unit tells how much waits behind it.
        let mut behind: BTreeMap<UnitId, u64> = BTreeMap::new();
        let mut by_product: BTreeMap<ProductId, Vec<&jetstream::Message>> = BTreeMap::new();
        for (u, m) in &messages {
            if let Ok(info) = m.info() {
                behind.insert(u.clone(), info.pending);
                if info.delivered > 1 {
                    // Not lost work (the table is the cursor) but repeated
                    // work: a handover that did not drain, or a crash.
                    self.metrics
                        .redeliveries
                        .with_label_values(&[&format!("{}-{u}", self.spec.durable_prefix)])
                        .inc();
                    info!(unit = %u, stream_seq = info.stream_sequence, delivered = info.delivered, "event redelivered");
                }
            }
            by_product
                .entry((u.domain.clone(), u.product.clone()))
                .or_default()
                .push(m);
        }
        for (u, pending) in &behind {
            ownership.set_backlog(u, *pending as i64);
            self.metrics
                .consumer_pending
                .with_label_values(&[&format!("{}-{u}", self.spec.durable_prefix)])
                .set(*pending as i64);
        }
        for (id, msgs) in by_product {
            let more = behind
                .iter()
                .any(|(u, p)| u.domain == id.0 && u.product == id.1 && *p > 0);
            self.tick_horizon.pulled(more, self.reload_interval);
            let states = &self.states;
            let stage = &self.stage;
            let (tables, malformed) = medallion_bus::announced(
                msgs.iter()
                    .map(|m| (m.subject.as_str(), m.headers.as_ref(), &m.payload)),
                |_, v| states.get(&id).is_none_or(|s| stage.wants(s, v)),
                &mut self.in_flight,
            );
            for subject in malformed {
                warn!(subject = %subject, "malformed upstream event ignored; the table is read instead");
            }
            for (table, mut announced) in tables {
                if table != self.upstream_ref(&id) || !self.products.contracts.contains_key(&id) {
                    continue;
                }
                self.note_announced(&id, &announced);
                debug!(
                    product = %pname(&id),
                    messages = msgs.len(),
                    more,
                    through = ?announced.through,
                    versions = ?announced.rows.keys().collect::<Vec<_>>(),
                    "upstream events pulled"
                );
                match Reach::for_pull(more, &announced) {
                    Some(reach) => {
                        self.catch_up(&id, &mut announced.rows, &announced.links, reach, ownership)
                            .await
                    }
                    None => self.pending_links.add(&id, &announced.links),
                }
            }
        }
        for (_, m) in messages {
            let _ = m.ack().await;
        }
        for u in ended {
            self.finish_unit(&u, ownership).await;
        }
    }

    fn note_announced(&mut self, id: &ProductId, a: &Announced) {
        let kinds = self.kinds.entry(id.clone()).or_default();
        for v in a.rows.keys() {
            kinds.insert(*v, true);
        }
        if let Some(t) = a.through {
            let e = self.announced.entry(id.clone()).or_insert(-1);
            *e = (*e).max(t);
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
        match self.stage.open(contract).await {
            Ok(s) => {
                self.rt.health.clear_problem(&format!("lake {}", pname(id)));
                // Only a commit that lands resets the back-off: on a full
                // disk the tables open fine and every commit fails.
                self.states.insert(id.clone(), s);
                true
            }
            Err(e) => {
                let attempt = self.lake_backoff.failed(id.clone());
                // The first failure in a row is an error, the retries behind
                // it (after a failed commit too) are warnings.
                if attempt == 1 {
                    error!(product = %pname(id), attempt, error = %e, "cannot open the product's tables");
                } else {
                    warn!(product = %pname(id), attempt, error = %e, "cannot open the product's tables");
                }
                self.rt.health.set_problem(format!("lake {}", pname(id)), e);
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
        ownership: &Ownership,
    ) {
        let links = self.pending_links.take(id, links);
        if !self.catch_up_pass(id, fast, &links, reach, ownership).await {
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
        ownership: &Ownership,
    ) -> bool {
        let Some(partitions) = self.partitions(id) else {
            // Not ours (any more): nothing to do, nothing to keep.
            return true;
        };
        let upstream_ref = self.upstream_ref(id);
        let upstream = match self.upstream.latest(&self.lake, &upstream_ref).await {
            Ok(Some(t)) => t,
            _ => return false,
        };
        let latest = upstream.version().map(|v| v as i64).unwrap_or(-1);
        let latest = match reach {
            Reach::Latest => latest,
            Reach::Tick => self.tick_horizon.through(id, latest),
            Reach::Through(v) => v.min(latest),
        };
        if !self.open(id).await {
            return false;
        }
        let kinds = self.kinds.entry(id.clone()).or_default();
        let state = self.states.get_mut(id).expect("opened above");
        let progress = self
            .stage
            .advance(
                state,
                Advance {
                    product: id,
                    upstream_ref: &upstream_ref,
                    upstream: &upstream,
                    latest,
                    partitions: &partitions,
                    fast,
                    links,
                    kinds,
                    ownership,
                },
            )
            .await;
        let product = pname(id);
        let committed = match &progress {
            Progress::Done { committed } | Progress::Waiting { committed } => *committed,
            _ => false,
        };
        if committed {
            self.rt.health.clear_problem(&format!("lake {product}"));
            self.lake_backoff.succeeded(id);
            if !partitions.all_held() {
                // Wakes the replicas whose turn may come next.
                let _ = self
                    .client
                    .publish(
                        format!("medallion.chain.{}.{}.{}", self.spec.name, id.0, id.1),
                        "".into(),
                    )
                    .await;
            }
        }
        if let Some(kinds) = self.kinds.get_mut(id)
            && kinds.len() > 4096
        {
            // Versions far behind are settled: forget them.
            let keep = kinds.split_off(&(latest - 1024));
            *kinds = keep;
        }
        match progress {
            Progress::Done { .. } | Progress::Waiting { .. } => true,
            Progress::Stalled => false,
            Progress::Reopen => {
                self.drop_pending_state(id).await;
                false
            }
            Progress::CommitFailed(e) => {
                self.metrics
                    .errors
                    .with_label_values(&[self.spec.name, "commit"])
                    .inc();
                let attempt = self.lake_backoff.failed(id.clone());
                warn!(product, attempt, error = %e, "commit failed; retrying from the tables");
                self.rt.health.set_problem(format!("lake {product}"), e);
                self.drop_pending_state(id).await;
                false
            }
        }
    }
}
