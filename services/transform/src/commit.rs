//! Committing a step: quarantine, then Silver, then the events.

use std::time::Instant;

use async_nats::jetstream;
use medallion_bus::{Commit, Operation, publish_commit};
use medallion_lake::{CommitOutcome, TableWriter, WriteMode};
use medallion_runtime::failpoint;
use medallion_runtime::metrics::PipelineMetrics;
use medallion_spec::Contract;
use tracing::{info, warn};

use crate::cdc_apply::CdcTable;
use crate::pipeline::QualityCounts;
use crate::poison;
use crate::state::{GEN_SHIFT, LAYER, ProductState, SNAPSHOT_EVERY, now_us, pid, position};
use crate::step::Step;

/// Commits a step: poison parked, then quarantine, then Silver (each with
/// the transaction version of the step), then the Silver event and the
/// quality counts.
pub(crate) async fn commit(
    state: &mut ProductState,
    step: Step,
    js: &jetstream::Context,
    max_payload: usize,
    metrics: &PipelineMetrics,
    links: &[String],
) -> Result<(), String> {
    let Step {
        out_silver: silver,
        out_quarantine: quarantine,
        mut counts,
        new_keys,
        last,
        poison,
        ..
    } = step;
    let poison = &poison;
    // Bronze messages parked in the DLQ by this commit (their records are in
    // no other count).
    counts.dead_lettered = poison.len() as u64;
    if last == state.processed {
        return Ok(());
    }
    let product = pid(&state.contract);
    let txn = (state.generation << GEN_SHIFT) | last;
    let mode = |w: &TableWriter| {
        // A table's first commit of a new generation (a full refresh)
        // replaces its rows; a table still behind on the generation (the
        // quarantine after a refresh) catches up the same way.
        if position(w.txn_version()).1 < state.generation {
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
    // A change feed's step is applied to the rows it changes: the files of
    // the touched buckets are rewritten in the same commit.
    let mut metadata = vec![
        ("medallion.bronze_version", last.into()),
        ("medallion.generation", state.generation.into()),
    ];
    let (groups, smode, applied) = match &state.contract.cdc {
        None => (vec![silver.clone()], smode, None),
        Some(_) => {
            let table = match state.cdc.take() {
                _ if replaced => CdcTable::empty(state.silver.version()),
                Some(t) if t.version == state.silver.version() => t,
                _ => CdcTable::load(&state.contract, &state.silver).await?,
            };
            let mut applied = table
                .apply(&state.contract, &state.silver, &silver, now_us())
                .await?;
            let store = state.silver.table().log_store().object_store(None);
            let name = applied.tombstones.save(&store).await?;
            metadata.push((crate::cdc_tombstones::METADATA_KEY, name.clone().into()));
            counts.rows_out = applied.rows_changed();
            counts.changes.get_or_insert_default().add(&applied.counts);
            let mode = if replaced {
                WriteMode::Overwrite
            } else {
                WriteMode::Replace(std::mem::take(&mut applied.removes))
            };
            let groups = std::mem::take(&mut applied.groups);
            (groups, mode, Some((table, applied, name)))
        }
    };
    let outcome = state
        .silver
        .commit_files(&groups, txn, smode, &metadata)
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
    if let Some((mut table, applied, name)) = applied {
        // Only a commit right after the one the files were read at keeps
        // them current: one that landed after another's (an erasure's
        // rewrite, rebased by delta-rs) is read again next time.
        state.cdc = None;
        if version == table.version + 1
            && table
                .committed(&state.silver, applied, version)
                .await
                .is_ok()
        {
            state.cdc = Some(table);
        }
        let store = state.silver.table().log_store().object_store(None);
        crate::cdc_tombstones::Tombstones::clean(&store, &name).await;
    }
    state.processed = last;
    state.keys.extend(new_keys);
    for (place, n) in [
        ("memory", state.keys.in_memory()),
        ("disk", state.keys.len() - state.keys.in_memory()),
    ] {
        metrics
            .dedupe_keys
            .with_label_values(&[&product, place])
            .set(n as i64);
    }
    if version == state.keys_at + 1 {
        state.keys_at = version;
    }
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
    let cdc = state.contract.cdc.is_some();
    let commit = Commit {
        table: &silver_ref,
        version,
        operation: if replaced {
            Operation::Overwrite
        } else if cdc {
            Operation::Merge
        } else {
            Operation::Append
        },
        schema,
        // A change feed's commit is read from the table, removals included.
        batches: if cdc { &[] } else { &silver },
        links,
        partition: medallion_spec::version_partition(version, state.contract.partitions()),
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

pub(crate) async fn publish_quality(
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
