//! The aggregate stage: Silver versions (from their events, or the Silver
//! table) → Gold tables, run by the stage runtime.

use std::sync::Arc;

use async_nats::jetstream;
use medallion_bus::streams::SILVER_STREAM;
use medallion_lake::Lake;
use medallion_runtime::Runtime;
use medallion_runtime::metrics::PipelineMetrics;
use medallion_spec::{Contract, Layer, TableRef};
use medallion_stage::maintenance::{MaintainedTable, TablesOf};
use medallion_stage::{Advance, Progress, Stage, StageSpec};
use tracing::warn;

use crate::merge::{commit, compute};
use crate::tables::{ProductTables, open_tables};
use crate::{APP_ID, AggregateConfig};

pub async fn run(config: AggregateConfig, rt: Runtime) -> anyhow::Result<()> {
    let c = config.stage.connect("aggregate", &rt).await?;
    let (lake, js, client, metrics) = (
        c.lake.clone(),
        c.js.clone(),
        c.client.clone(),
        c.metrics.clone(),
    );
    let stage = Aggregate {
        lake: lake.clone(),
        js: js.clone(),
        max_payload: medallion_bus::max_payload(&client),
        metrics: metrics.clone(),
        max_deliver: config.max_deliver,
    };
    medallion_stage::runner::run(
        stage,
        StageSpec {
            name: "aggregate",
            durable_prefix: APP_ID,
            upstream_stream: SILVER_STREAM,
            upstream_layer: Layer::Silver,
        },
        c.into_deps(&config.stage, rt),
    )
    .await
}

struct Aggregate {
    lake: Lake,
    js: jetstream::Context,
    max_payload: usize,
    metrics: PipelineMetrics,
    max_deliver: u32,
}

impl Stage for Aggregate {
    type Product = ProductTables;

    async fn open(&mut self, contract: Arc<Contract>) -> Result<ProductTables, String> {
        open_tables(&self.lake, &contract).await
    }

    /// Wanted unless every Gold table of the product has merged it.
    fn wants(&self, p: &ProductTables, version: i64) -> bool {
        p.tables.iter().any(|g| version > g.processed)
    }

    /// Gold keeps one file per bucket, rewritten as groups change: its file
    /// count is bounded already, so it is vacuumed and checkpointed, never
    /// compacted (a merge would undo the bucket layout).
    fn maintained_tables(&self) -> TablesOf {
        Box::new(|c| {
            c.gold
                .iter()
                .map(|g| MaintainedTable::rewritten(TableRef::gold(c.domain(), &g.name)))
                .collect()
        })
    }

    async fn advance(&mut self, p: &mut ProductTables, mut pass: Advance<'_>) -> Progress {
        let shared = !pass.partitions.all_held();
        let product = pass.product.clone();
        let name = format!("{}.{}", product.0, product.1);
        if shared || p.partitions.as_ref() != Some(pass.partitions) {
            // Other replicas commit too (or did while this one held fewer
            // partitions): take in what they wrote.
            for t in &mut p.tables {
                if let Err(e) = t.sync().await {
                    warn!(product = %name, table = %t.writer.table_ref(), error = %e, "cannot read gold; retrying on the next tick");
                    return Progress::Stalled;
                }
            }
            p.partitions = Some(pass.partitions.clone());
        }
        let mut committed = false;
        let mut waiting = false;
        for t in &mut p.tables {
            loop {
                let run = match pass.plan(t.processed).await {
                    Ok(Some(r)) => r,
                    Ok(None) => break,
                    Err(e) => {
                        warn!(product = %name, error = %e, "cannot read silver; retrying on the next tick");
                        return Progress::Stalled;
                    }
                };
                if t.ahead.as_ref().is_some_and(|a| a.first != run.first()) {
                    t.ahead = None;
                }
                if t.ahead.is_none() {
                    match compute(
                        &self.lake,
                        t,
                        pass.upstream,
                        pass.upstream_ref,
                        &run.versions,
                        pass.fast,
                        pass.links,
                        (&product, self.max_deliver),
                    )
                    .await
                    {
                        Ok(a) => t.ahead = Some(a),
                        Err(e) => return Progress::CommitFailed(e),
                    }
                }
                if !run.ready {
                    waiting = true;
                    break;
                }
                if shared && !pass.holds(&run) {
                    t.ahead = None;
                    return Progress::Stalled;
                }
                let ahead = t.ahead.take().expect("computed above");
                match commit(
                    t,
                    ahead,
                    &self.js,
                    self.max_payload,
                    &self.metrics,
                    &product,
                )
                .await
                {
                    Ok(()) => committed = true,
                    Err(e) => return Progress::CommitFailed(e),
                }
            }
        }
        if waiting {
            Progress::Waiting { committed }
        } else {
            Progress::Done { committed }
        }
    }
}
