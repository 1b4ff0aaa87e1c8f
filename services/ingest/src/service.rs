//! The ingest stage: which units this replica holds, and a worker per unit.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use futures::StreamExt;
use medallion_bus::ownership::UnitId;
use medallion_bus::registry::{SpecSource, sync_specs};
use medallion_bus::streams::{INGEST_STREAM, INGEST_SUBJECTS};
use medallion_runtime::Runtime;
use medallion_runtime::metrics::MaintenanceMetrics;
use medallion_spec::parse_ingest_slot;
use medallion_spec::products::Products;
use medallion_stage::maintenance::MaintainedTable;
use medallion_stage::{Change, Ownership};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::unit::{DLQ_UNIT, Shared, dead_letter_worker, unit_worker};
use crate::{APP_ID, IngestConfig};

pub async fn run(config: IngestConfig, rt: Runtime) -> anyhow::Result<()> {
    let c = config.stage.connect("ingest", &rt).await?;
    let (lake, js, client, metrics, source) = (c.lake, c.js, c.client, c.metrics, c.source);
    let mut ownership =
        Ownership::start(c.owners, "ingest", &config.stage.ownership, &rt.registry)?;

    let stream = medallion_bus::streams::open_stream(&js, INGEST_STREAM)
        .await
        .context("opening the ingest stream")?;
    // The stream's creation time scopes the transaction ids: if the stream is
    // ever deleted and re-created, its sequences restart at 1 and must not be
    // mistaken for positions that are already committed.
    let created = stream.cached_info().created.unix_timestamp();
    let shared = Arc::new(Shared {
        lake,
        js: js.clone(),
        client: client.clone(),
        stream,
        app_id: format!("{APP_ID}:{INGEST_STREAM}:{created}"),
        metrics,
        rt: rt.clone(),
        batch: config.stage.batch,
        ownership: ownership.handle(),
        partition_counts: Default::default(),
    });
    let (contracts, watched) = watch::channel(Default::default());
    medallion_stage::maintenance::start(
        "ingest",
        config.stage.maintenance.clone(),
        shared.lake.clone(),
        ownership.handle(),
        watched,
        Box::new(|c| vec![MaintainedTable::bronze(c)]),
        MaintenanceMetrics::register(&rt.registry)
            .context("registering the maintenance metrics")?,
    )
    .context("starting table maintenance")?;
    let mut stage = Ingest {
        shared,
        contracts,
        products: Products::new(),
        workers: HashMap::new(),
        releasing: BTreeSet::new(),
        done: mpsc::unbounded_channel(),
    };
    stage.reload(&source, &ownership).await;
    rt.health.set_started();
    let mut tick = tokio::time::interval(config.stage.reload_interval);
    loop {
        tokio::select! {
            _ = rt.shutdown.cancelled() => break,
            Some(change) = ownership.next_change() => stage.on_change(change, &ownership),
            Some(u) = stage.done.1.recv() => stage.on_done(u, &ownership),
            _ = source.changed() => stage.reload(&source, &ownership).await,
            _ = tick.tick() => stage.reload(&source, &ownership).await,
        }
    }
    info!("ingest stopping: finishing each unit's batch");
    ownership.stop_acquiring();
    for w in stage.workers.values() {
        w.stop.cancel();
    }
    let handles: Vec<_> = stage.workers.drain().map(|(_, w)| w.handle).collect();
    if tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(handles))
        .await
        .is_err()
    {
        warn!(
            "units did not finish within 10 s; their messages stay in the stream for the next holder"
        );
    }
    ownership.shutdown().await;
    medallion_bus::flush_for_shutdown(&client, Duration::from_secs(5)).await;
    Ok(())
}

struct Worker {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    partitions: watch::Sender<u32>,
}

struct Ingest {
    shared: Arc<Shared>,
    /// What table maintenance sees of the specs.
    contracts: watch::Sender<medallion_stage::maintenance::Contracts>,
    products: Products,
    workers: HashMap<UnitId, Worker>,
    /// Units asked to stop for a hand-over: released once their worker ends.
    releasing: BTreeSet<UnitId>,
    done: (
        mpsc::UnboundedSender<UnitId>,
        mpsc::UnboundedReceiver<UnitId>,
    ),
}

impl Ingest {
    fn partitions_of(&self, u: &UnitId) -> u32 {
        self.products
            .contracts
            .get(&(u.domain.clone(), u.product.clone()))
            .map(|c| c.partitions())
            .unwrap_or(1)
    }

    /// Units: every partition of every registered product, every product
    /// with messages waiting (no spec is needed for Bronze), and the unit
    /// that dead-letters subjects naming no valid product.
    async fn reload(&mut self, source: &SpecSource, ownership: &Ownership) {
        let changes = sync_specs(
            source,
            &mut self.products,
            |_| Ok(()),
            0,
            &self.shared.rt.health,
        )
        .await;
        if !(changes.updated.is_empty() && changes.removed.is_empty()) {
            self.contracts.send_replace(self.products.contracts.clone());
        }
        *self.shared.partition_counts.lock().expect("not poisoned") = self
            .products
            .contracts
            .iter()
            .map(|(id, c)| (id.clone(), c.partitions()))
            .collect();
        let mut units: BTreeSet<UnitId> = BTreeSet::from([DLQ_UNIT.clone()]);
        for (id, c) in &self.products.contracts {
            units.extend((0..c.partitions()).map(|k| UnitId::new(&id.0, &id.1, k)));
        }
        match waiting_products(&self.shared.stream).await {
            Ok(waiting) => {
                self.shared.rt.health.clear_problem("nats");
                for (d, p) in waiting {
                    let n = self
                        .products
                        .contracts
                        .get(&(d.clone(), p.clone()))
                        .map(|c| c.partitions())
                        .unwrap_or(1);
                    units.extend((0..n).map(|k| UnitId::new(&d, &p, k)));
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot list the ingest stream's subjects");
                self.shared
                    .rt
                    .health
                    .set_problem("nats", format!("cannot read the ingest stream: {e}"));
                // Keep the units held: losing them over a listing error
                // would only move work around.
                units.extend(ownership.held());
            }
        }
        ownership.set_units(units);
        for (u, w) in &self.workers {
            let n = self.partitions_of(u);
            w.partitions.send_if_modified(|old| {
                let changed = *old != n;
                *old = n;
                changed
            });
        }
    }

    fn on_change(&mut self, change: Change, ownership: &Ownership) {
        match change {
            Change::Acquired(u) => {
                let stop = CancellationToken::new();
                let (tx, rx) = watch::channel(self.partitions_of(&u));
                let done = self.done.0.clone();
                let shared = self.shared.clone();
                let unit = u.clone();
                let s = stop.clone();
                let handle = tokio::spawn(async move {
                    if unit == *DLQ_UNIT {
                        dead_letter_worker(shared, s).await;
                    } else {
                        unit_worker(unit.clone(), shared, s, rx).await;
                    }
                    let _ = done.send(unit);
                });
                self.workers.insert(
                    u,
                    Worker {
                        stop,
                        handle,
                        partitions: tx,
                    },
                );
            }
            Change::Release(u) => match self.workers.get(&u) {
                Some(w) => {
                    w.stop.cancel();
                    self.releasing.insert(u);
                }
                None => ownership.released(&u),
            },
            Change::Lost(u) => {
                if let Some(w) = self.workers.remove(&u) {
                    // Stop first: whatever the abort does not reach (a task
                    // the worker spawned) gives up instead of retrying.
                    w.stop.cancel();
                    w.handle.abort();
                }
                self.releasing.remove(&u);
            }
        }
    }

    fn on_done(&mut self, u: UnitId, ownership: &Ownership) {
        self.workers.remove(&u);
        if self.releasing.remove(&u) {
            ownership.released(&u);
        }
    }
}

/// Products with messages in the ingest stream.
async fn waiting_products(
    stream: &jetstream::stream::Stream,
) -> Result<BTreeSet<(String, String)>, String> {
    let mut out = BTreeSet::new();
    let mut subjects = stream
        .info_with_subjects(INGEST_SUBJECTS)
        .await
        .map_err(|e| e.to_string())?;
    while let Some(s) = subjects.next().await {
        let (subject, _) = s.map_err(|e| e.to_string())?;
        if let Some((d, p, _)) = parse_ingest_slot(&subject) {
            out.insert((d.to_string(), p.to_string()));
        }
    }
    Ok(out)
}

/// Subjects of the ingest stream that name no valid product, with their
/// message counts.
pub(crate) async fn invalid_subjects(
    stream: &jetstream::stream::Stream,
) -> Result<BTreeMap<String, usize>, String> {
    let mut out = BTreeMap::new();
    let mut subjects = stream
        .info_with_subjects(INGEST_SUBJECTS)
        .await
        .map_err(|e| e.to_string())?;
    while let Some(s) = subjects.next().await {
        let (subject, n) = s.map_err(|e| e.to_string())?;
        if parse_ingest_slot(&subject).is_none() {
            out.insert(subject, n);
        }
    }
    Ok(out)
}
