//! Silver versions → one Gold table: partial aggregates computed ahead (the
//! costly part, on every replica at once), then merged into the groups and
//! committed as the touched buckets when the table's turn comes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use arrow::array::RecordBatch;
use async_nats::jetstream;
use medallion_bus::{Commit, Operation, publish_commit};
use medallion_lake::{CommitOutcome, Lake, WriteMode, read_all, read_commit};
use medallion_runtime::failpoint;
use medallion_runtime::metrics::PipelineMetrics;
use medallion_spec::TableRef;
use medallion_spec::products::ProductId;
use tracing::{Instrument, info, info_span, warn};

use crate::poison::{self, PoisonRow};
use crate::state::BUCKETS;
use crate::tables::{GOLD_SQL_KEY, GoldTable, normalized_sql};

pub(crate) const LAYER: &str = "gold";
/// Silver rows per merge.
const MAX_ROWS: usize = 200_000;

/// Partials of a run of Silver versions, waiting for their turn.
pub(crate) struct Ahead {
    pub first: i64,
    pub last: i64,
    /// Silver was rebuilt (or the table's spec changed): the partials are of
    /// the whole of Silver at `last`, and replace every group.
    pub refresh: bool,
    pub partials: Vec<RecordBatch>,
    pub poisoned: Vec<PoisonRow>,
    /// The Silver rows merged (their ingest times feed the latency metric).
    pub rows: Vec<RecordBatch>,
    /// Partials of the rows change-feed commits replaced or deleted, to take out.
    pub retract: Vec<RecordBatch>,
    pub span: tracing::Span,
    pub links: Vec<String>,
    pub started: Instant,
}

/// Computes the partials of `versions` (as many as make [`MAX_ROWS`] rows).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn compute(
    lake: &Lake,
    t: &GoldTable,
    silver: &deltalake::DeltaTable,
    silver_ref: &TableRef,
    versions: &[i64],
    fast: &BTreeMap<i64, Vec<RecordBatch>>,
    links: &[String],
    (product, max_deliver): (&ProductId, u32),
) -> Result<Ahead, String> {
    let started = Instant::now();
    let span = info_span!(
        "aggregate.merge",
        product = %format!("{}.{}", product.0, product.1),
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
    let mut rows = Vec::new();
    // Silver version of each batch in `rows` (for dead-letter positions).
    let mut batch_versions = Vec::new();
    let mut last = versions[0];
    let mut refresh = t.rebuild;
    let mut n = 0usize;
    let mut retracted: Vec<RecordBatch> = Vec::new();
    if refresh {
        last = *versions.last().expect("a run is never empty");
    }
    for &v in versions {
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
                    // A change feed's commit: the rows it replaced come out,
                    // the rows it wrote go in, when the plan can take rows out.
                    let diff = match t.state.plan.retraction {
                        Some(_) => crate::retract::changed_rows(silver_ref, silver, v, c.batches)
                            .await
                            .map_err(|e| e.to_string())?,
                        None => None,
                    };
                    match diff {
                        Some((added, removed)) => {
                            retracted.extend(removed);
                            added
                        }
                        None => {
                            // Silver was rebuilt (replay), or the plan has a
                            // min/max: Gold is recomputed from it.
                            refresh = true;
                            last = v;
                            break;
                        }
                    }
                }
                Some(c) => c.batches,
                None => Vec::new(),
            },
        };
        n += batches.iter().map(|b| b.num_rows()).sum::<usize>();
        batch_versions.extend(std::iter::repeat_n(v, batches.len()));
        rows.extend(batches);
        last = v;
        if n >= MAX_ROWS {
            break;
        }
    }
    // Partials of the replaced rows; if one's group is not (yet) in the
    // state (an earlier run not committed when this one is computed ahead,
    // or a state that cannot take it), Gold is recomputed instead.
    let mut retract = Vec::new();
    let mut merged = None;
    if !refresh && !retracted.is_empty() {
        let added = poison::partials(&t.state, &rows, &batch_versions, max_deliver)
            .instrument(span.clone())
            .await?;
        // Under the same guard as rows merged: a row that was dead-lettered
        // when it came in was never added, so it cannot come out; Gold is
        // recomputed instead.
        let versions = vec![last; retracted.len()];
        let (out, poisoned) = poison::partials(&t.state, &retracted, &versions, max_deliver)
            .instrument(span.clone())
            .await?;
        retract = out;
        if poisoned.is_empty() && t.state.holds_groups(&retract, &added.0) {
            merged = Some(added);
        } else {
            refresh = true;
            retract.clear();
        }
    }
    let (partials, poisoned) = if let Some(m) = merged {
        m
    } else if refresh {
        let table = medallion_lake::open_at(lake, silver_ref, Some(last))
            .await
            .map_err(|e| e.to_string())?
            .ok_or("silver table vanished")?;
        let all = read_all(silver_ref, &table)
            .await
            .map_err(|e| e.to_string())?;
        // Rows of a rebuilt Silver are not tied to one version: the version
        // the rebuild reads is their position.
        let all_versions = vec![last; all.len()];
        rows.clear();
        poison::partials(&t.state, &all, &all_versions, max_deliver)
            .instrument(span.clone())
            .await?
    } else {
        poison::partials(&t.state, &rows, &batch_versions, max_deliver)
            .instrument(span.clone())
            .await?
    };
    span.record("silver_rows", n);
    Ok(Ahead {
        retract,
        first: versions[0],
        last,
        refresh,
        partials,
        poisoned,
        rows,
        span,
        links,
        started,
    })
}

/// Merges computed partials into the table's groups and commits the
/// buckets they touched.
pub(crate) async fn commit(
    t: &mut GoldTable,
    ahead: Ahead,
    js: &jetstream::Context,
    max_payload: usize,
    metrics: &PipelineMetrics,
    product: &ProductId,
) -> Result<(), String> {
    let Ahead {
        last,
        refresh,
        partials,
        poisoned,
        rows,
        retract,
        span,
        links,
        started,
        ..
    } = ahead;
    let (mode, buckets, touched) = if refresh {
        t.state.clear();
        let (_, touched) = t.state.merge(&partials);
        info!(table = %t.writer.table_ref(), silver_version = last, "silver was rebuilt: full refresh of gold");
        (
            WriteMode::Overwrite,
            (0..BUCKETS).collect::<BTreeSet<_>>(),
            touched,
        )
    } else {
        let (mut buckets, mut touched) = t.state.merge(&partials);
        if !retract.is_empty() {
            // On an error the groups are already changed: the caller drops
            // them and reopens the table, which recomputes.
            let (b, k) = t.state.retract(&retract)?;
            buckets.extend(b);
            touched.extend(k);
            touched.sort();
            touched.dedup();
        }
        let removes = buckets
            .iter()
            .flat_map(|b| t.files[*b].iter().map(|f| f.remove.clone()))
            .collect();
        (WriteMode::Replace(removes), buckets, touched)
    };
    span.record("rows", touched.len());
    let commit_span = info_span!(
        parent: &span,
        "gold.commit",
        product = %format!("{}.{}", product.0, product.1),
        layer = LAYER,
        table = %t.writer.table_ref(),
        rows = touched.len(),
        version = tracing::field::Empty
    );
    medallion_bus::trace::link_all(&commit_span, links.iter().map(String::as_str));
    async {
        let groups: Vec<Vec<RecordBatch>> = buckets
            .iter()
            .map(|b| vec![t.state.bucket_rows(*b)])
            .collect();
        // Parked before the Gold commit that covers their Silver versions.
        let tname = t.writer.table_ref().name.clone();
        for p in &poisoned {
            warn!(product = %format!("{}.{}", product.0, product.1), table = %tname, silver_version = p.silver_version, bronze_seq = p.bronze_seq, deliveries = p.deliveries, reason = %p.reason, "poison row isolated; dead-lettering it");
        }
        // On an error the merge above has already changed the in-memory
        // groups: the caller drops them and reopens the table rather than
        // commit without the DLQ.
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
                return Err("gold already has this silver version".to_string());
            }
        };
        t.processed = last;
        t.rebuild = false;
        t.seen = version;
        track_files(t, &buckets, &groups).await?;
        let tref = t.writer.table_ref().clone();
        tracing::Span::current().record("version", version);
        span.record("version", version);
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
        for b in &rows {
            if let Some(at) = medallion_spec::ingested_at_micros(b) {
                metrics.observe_latency(LAYER, at);
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
            links: &links,
            // Nothing downstream is partitioned: Gold's consumers are users,
            // on the plain subject.
            partition: 0,
        };
        if let Err(e) = publish_commit(js, commit, max_payload).await {
            warn!(table = %tref, version, error = %e, "gold event not published");
        } else {
            metrics.events_published.with_label_values(&[LAYER]).inc();
        }
        Ok(())
    }
    .instrument(commit_span)
    .await
}

/// The files the last commit wrote are the touched buckets' files now (one
/// per bucket that has groups, in bucket order).
async fn track_files(
    t: &mut GoldTable,
    buckets: &BTreeSet<usize>,
    groups: &[Vec<RecordBatch>],
) -> Result<(), String> {
    let listed = t.writer.files().await.map_err(|e| e.to_string())?;
    let mut added = t.writer.added_files().iter();
    for (b, g) in buckets.iter().zip(groups) {
        t.files[*b].clear();
        if g.iter().all(|x| x.num_rows() == 0) {
            continue;
        }
        let path = added.next().ok_or("fewer files written than buckets")?;
        let f = listed
            .iter()
            .find(|f| &f.path == path)
            .ok_or("a written file is not in the table")?;
        t.files[*b].push(f.clone());
    }
    Ok(())
}
