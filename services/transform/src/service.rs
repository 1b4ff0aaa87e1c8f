//! The transform stage: Bronze versions (from their events, or the Bronze
//! table) → Silver + quarantine, run by the stage runtime.

use std::sync::Arc;

use anyhow::Context;

use async_nats::jetstream;
use medallion_bus::streams::BRONZE_STREAM;
use medallion_bus::{Commit, Operation, publish_commit};
use medallion_lake::{Lake, WriteMode};
use medallion_runtime::Runtime;
use medallion_runtime::metrics::PipelineMetrics;
use medallion_spec::products::ProductId;
use medallion_spec::{Contract, Layer, PiiMode, TableRef};
use medallion_stage::maintenance::{MaintainedTable, TablesOf};
use medallion_stage::{Advance, Progress, Reply, Stage, StageSpec};
use tracing::{Instrument, error, info, info_span, warn};

use crate::commit::commit;
use crate::state::{Ahead, GEN_SHIFT, LAYER, ProductState, Stale, open_state, pid, position};
use crate::step::{crash_check_if_died_before, step};
use crate::{APP_ID, REPLAY_SUBJECT, TransformConfig};

pub async fn run(config: TransformConfig, rt: Runtime) -> anyhow::Result<()> {
    let c = config.stage.connect("transform", &rt).await?;
    let (lake, js, client, metrics) = (
        c.lake.clone(),
        c.js.clone(),
        c.client.clone(),
        c.metrics.clone(),
    );
    let attempts = match medallion_bus::attempts::Attempts::open(&js, &config.stage.streams).await {
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
    let key_budget = crate::key_budget::KeyBudget::prepare(&config.dedupe_dir, config.dedupe_memory)
        .with_context(|| {
            format!(
                "MEDALLION_DEDUPE_DIR: cannot use {} for dedupe keys beyond the memory budget; point it at a writable directory",
                config.dedupe_dir.display()
            )
        })?;
    let erasures = medallion_bus::erasures::Erasures::open(&js, &config.stage.streams)
        .await
        .context("opening the erasure requests bucket")?;
    let specs =
        medallion_bus::registry::SpecSource::open(&config.stage.specs, &js, &config.stage.streams)
            .await
            .context("opening the spec source for erasures")?;
    crate::forget::ForgetJob {
        lake: lake.clone(),
        js: js.clone(),
        erasures,
        specs,
        pii_key: config.pii_key.clone(),
        replica: config.stage.ownership.replica.clone(),
    }
    .start(rt.shutdown.clone());
    let stage = Transform {
        key_budget,
        lake: lake.clone(),
        js: js.clone(),
        max_payload: medallion_bus::max_payload(&client),
        metrics: metrics.clone(),
        health: rt.health.clone(),
        pii_key: config.pii_key.clone(),
        max_rows: config.stage.batch.messages,
        max_deliver: config.max_deliver,
        attempts,
        crash_exe,
    };
    medallion_stage::runner::run(
        stage,
        StageSpec {
            name: "transform",
            durable_prefix: APP_ID,
            upstream_stream: BRONZE_STREAM,
            upstream_layer: Layer::Bronze,
        },
        c.into_deps(&config.stage, rt),
    )
    .await
}

struct Transform {
    /// Where each product's dedupe keys beyond its memory budget go.
    key_budget: crate::key_budget::KeyBudget,
    lake: Lake,
    js: jetstream::Context,
    max_payload: usize,
    metrics: PipelineMetrics,
    health: medallion_runtime::Health,
    pii_key: Option<Vec<u8>>,
    max_rows: usize,
    max_deliver: u32,
    /// Where each partition's last step started, to notice a process that died in it.
    attempts: Option<medallion_bus::attempts::Attempts>,
    /// This service's binary, run as a child to check a step that killed a process.
    crash_exe: Option<std::path::PathBuf>,
}

impl Stage for Transform {
    type Product = ProductState;

    fn spec_check(
        &self,
    ) -> (
        Box<dyn Fn(&Contract) -> Result<(), String> + Send + Sync>,
        u64,
    ) {
        let has_key = self.pii_key.is_some();
        let check = move |c: &Contract| -> Result<(), String> {
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
        (Box::new(check), has_key as u64)
    }

    async fn open(&mut self, contract: Arc<Contract>) -> Result<ProductState, String> {
        open_state(&self.lake, contract, &self.key_budget).await
    }

    fn wants(&self, p: &ProductState, version: i64) -> bool {
        version > p.processed
    }

    async fn advance(&mut self, state: &mut ProductState, mut pass: Advance<'_>) -> Progress {
        if state.halted.is_some() {
            return Progress::Stalled;
        }
        // A key past the dedupe horizon must not drop a row, even after a
        // quiet spell with no commit to forget it at.
        state.keys.forget_old_now();
        let shared = !pass.partitions.all_held();
        if shared || state.partitions.as_ref() != Some(pass.partitions) {
            // Other replicas commit too (or did while this one held fewer
            // partitions): read where the chain and the keys are now.
            match state.sync().await {
                Ok(()) => {}
                Err(Stale::Reopen) => return Progress::Reopen,
                Err(Stale::Read(e)) => {
                    warn!(product = %pid(&state.contract), error = %e, "cannot read silver; retrying on the next tick");
                    return Progress::Stalled;
                }
            }
            state.partitions = Some(pass.partitions.clone());
        }
        let mut committed = false;
        loop {
            let run = match pass.plan(state.processed).await {
                Ok(Some(r)) => r,
                Ok(None) => return Progress::Done { committed },
                Err(e) => {
                    warn!(product = %pid(&state.contract), error = %e, "cannot read bronze; retrying on the next tick");
                    return Progress::Stalled;
                }
            };
            let mut versions = run.versions.clone();
            // A crash between the quarantine and the Silver commit leaves
            // quarantine ahead: redo exactly that range first, so the
            // quarantine commit is recognised as done instead of re-adding
            // its rows under a larger transaction version.
            let (q, qgen) = position(state.quarantine.txn_version());
            if qgen == state.generation && q > state.processed {
                versions.retain(|v| *v <= q);
                if versions.is_empty() {
                    // Another replica's range: it redoes it.
                    return Progress::Waiting { committed };
                }
            }
            if state.ahead.as_ref().is_some_and(|a| a.first != versions[0]) {
                state.ahead = None;
            }
            if state.ahead.is_none() {
                match self.compute(state, &mut pass, &versions).await {
                    Ok(a) => state.ahead = Some(a),
                    Err(e) => {
                        self.metrics
                            .errors
                            .with_label_values(&["transform", "read"])
                            .inc();
                        warn!(product = %pid(&state.contract), error = %e, "cannot read bronze; retrying on the next tick");
                        return Progress::Stalled;
                    }
                }
            }
            if !run.ready {
                return Progress::Waiting { committed };
            }
            if shared && !pass.holds(&run) {
                // The lease is gone or about to go: the next holder commits.
                state.ahead = None;
                return Progress::Stalled;
            }
            let Ahead {
                mut step,
                span,
                links,
                ..
            } = state.ahead.take().expect("computed above");
            if shared {
                step.drop_committed(&state.keys);
            }
            let halt = step.halt.clone();
            let product = pid(&state.contract);
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
                rows = step.counts.rows_out,
                quarantined = step.counts.quarantined,
                bronze_version = step.last,
                version = tracing::field::Empty
            );
            medallion_bus::trace::link_all(&commit_span, links.iter().map(String::as_str));
            match commit(
                state,
                step,
                &self.js,
                self.max_payload,
                &self.metrics,
                &links,
            )
            .instrument(commit_span)
            .await
            {
                Ok(()) => {
                    span.record("version", state.silver.version());
                    committed = true;
                }
                Err(e) => return Progress::CommitFailed(e),
            }
            if let Some(h) = halt {
                error!(product, reason = %h, "product halted by a fail expectation");
                self.metrics
                    .product_failed
                    .with_label_values(&[&product])
                    .set(1);
                self.health
                    .set_problem(format!("product {product}"), h.clone());
                state.halted = Some(h);
                return Progress::Stalled;
            }
        }
    }

    async fn close(&mut self, state: &mut ProductState) {
        state.snapshot().await;
    }

    /// Silver and its quarantine are appended: both are compacted. A
    /// change feed's Silver is laid out by key bucket (one file each, every
    /// commit rewrites the buckets it touches): compaction would mix buckets,
    /// and its removals do not conflict with an apply's in delta-rs, so the
    /// two could both rewrite one file and leave rows twice.
    fn maintained_tables(&self) -> TablesOf {
        Box::new(|c| {
            let silver = TableRef::silver(c.domain(), c.name());
            vec![
                if c.cdc.is_some() {
                    MaintainedTable::rewritten(silver)
                } else {
                    MaintainedTable::appended(silver)
                },
                MaintainedTable::appended(TableRef::quarantine(c.domain(), c.name())),
            ]
        })
    }

    fn control_subject(&self) -> Option<&'static str> {
        Some(REPLAY_SUBJECT)
    }

    async fn control(
        &mut self,
        request: &str,
        product: Option<(&ProductId, &mut ProductState)>,
    ) -> Reply {
        match product {
            Some((_, state)) => self.replay(state).await,
            None => Reply::Now(match request.split_once('.') {
                Some(_) => format!("error: no product spec registered for {request}"),
                None => format!("error: expected <domain>.<product>, got {request:?}"),
            }),
        }
    }
}

/// How often the reply to a replay looks at Silver, and for how long.
const REPLAY_POLL: std::time::Duration = std::time::Duration::from_millis(200);
const REPLAY_LIMIT: std::time::Duration = std::time::Duration::from_secs(3600);

impl Transform {
    /// Computes the step of `versions` ahead of its commit.
    async fn compute(
        &self,
        state: &ProductState,
        pass: &mut Advance<'_>,
        versions: &[i64],
    ) -> Result<Ahead, String> {
        let product = pid(&state.contract);
        let crash_check = match &self.attempts {
            Some(a) => {
                let partition =
                    medallion_spec::version_partition(versions[0], pass.partitions.count);
                crash_check_if_died_before(
                    a,
                    self.crash_exe.as_deref(),
                    state,
                    (versions[0], partition),
                    self.pii_key.as_deref(),
                )
                .await
            }
            None => None,
        };
        let span = info_span!(
            "transform.batch",
            product,
            layer = LAYER,
            from = versions[0],
            to = tracing::field::Empty,
            rows = tracing::field::Empty,
            version = tracing::field::Empty
        );
        let step = step(
            state,
            pass.upstream,
            pass.upstream_ref,
            versions,
            pass.fast,
            self.pii_key.as_deref(),
            self.max_rows,
            self.max_deliver,
            crash_check.as_ref(),
            &self.metrics,
        )
        .instrument(span.clone())
        .await?;
        Ok(Ahead {
            first: versions[0],
            step,
            span,
            links: pass.links.to_vec(),
        })
    }

    /// Full refresh of one product's Silver from Bronze, as a new
    /// generation: one commit empties Silver (earlier versions stay readable
    /// by time travel) and tells every replica; the chain then rebuilds it
    /// from Bronze version 1, each replica its own partitions. Answers once
    /// Silver holds everything Bronze held when asked.
    async fn replay(&mut self, state: &mut ProductState) -> Reply {
        let product = pid(&state.contract);
        if let Err(Stale::Read(e)) = state.sync().await {
            return Reply::Now(format!("error: cannot read silver.{product}: {e}"));
        }
        let bronze_ref =
            medallion_spec::TableRef::bronze(state.contract.domain(), state.contract.name());
        let target = match medallion_lake::open_table(&self.lake, &bronze_ref).await {
            Ok(Some(t)) => t.version().map(|v| v as i64).unwrap_or(0),
            Ok(None) => 0,
            Err(e) => return Reply::Now(format!("error: cannot read {bronze_ref}: {e}")),
        };
        let generation = state.generation + 1;
        // Bronze version 0 is the table's creation: nothing to redo there.
        let txn = (generation << GEN_SHIFT) | 0;
        info!(product, generation, "replay: rebuilding silver from bronze");
        let outcome = state
            .silver
            .commit(
                &[],
                txn,
                WriteMode::Overwrite,
                &[
                    ("medallion.bronze_version", 0.into()),
                    ("medallion.generation", generation.into()),
                ],
            )
            .await;
        let version = match outcome {
            Ok(medallion_lake::CommitOutcome::Committed(v)) => v,
            Ok(medallion_lake::CommitOutcome::AlreadyCommitted(_)) => {
                return Reply::Now(format!(
                    "error: another replay of {product} started at the same time; ask again"
                ));
            }
            Err(e) => return Reply::Now(format!("error: cannot reset silver.{product}: {e}")),
        };
        state.generation = generation;
        state.processed = 0;
        state.keys.clear();
        state.keys_at = version;
        state.halted = None;
        state.ahead = None;
        let silver_ref = state.silver.table_ref().clone();
        let schema = state.silver.schema().clone();
        let event = Commit {
            table: &silver_ref,
            version,
            operation: Operation::Overwrite,
            schema,
            batches: &[],
            links: &[],
            partition: medallion_spec::version_partition(version, state.contract.partitions()),
        };
        if let Err(e) = publish_commit(&self.js, event, self.max_payload).await {
            warn!(product, error = %e, "replay event not published; aggregate reads the reset from the table");
        }
        let lake = self.lake.clone();
        Reply::Later(Box::pin(async move {
            let started = std::time::Instant::now();
            while started.elapsed() < REPLAY_LIMIT {
                if let Ok(Some(w)) =
                    medallion_lake::TableWriter::open(&lake, &silver_ref, APP_ID).await
                {
                    let (processed, g) = position(w.txn_version());
                    if g > generation {
                        return format!("error: a later replay of {product} replaced this one");
                    }
                    if g == generation && processed >= target {
                        return format!(
                            "ok: silver.{product} rebuilt from bronze up to version {processed} (silver version {})",
                            w.version()
                        );
                    }
                }
                tokio::time::sleep(REPLAY_POLL).await;
            }
            format!("error: replay of {product} did not finish; see the transform logs")
        }))
    }
}
