//! Poison rows: a Silver row whose aggregation panics every time.
//!
//! The partial aggregation of a run of Silver versions runs under
//! `catch_unwind`. When it panics, [`partials`] bisects the rows down to those
//! that panic on their own, retries each up to `MEDALLION_MAX_DELIVER` times,
//! and aggregates the rest. The poison rows are parked in `MEDALLION_DLQ`
//! ([`park`]) before the Gold commit whose transaction version covers their
//! Silver version; the per-row DLQ subject makes a re-park after a crash a
//! no-op, and once Gold has committed, the version is never merged again.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type};
use async_nats::jetstream;
use medallion_bus::headers;
use medallion_bus::streams::INGEST_STREAM;
use medallion_runtime::failpoint;
use medallion_spec::contract::BRONZE_SEQ_COLUMN;

use crate::state::GoldState;

/// Test-only fail point: `MEDALLION_FAIL_POINTS=aggregate.merge.panic_on=<marker>`
/// makes the aggregation panic on every Silver row with a string value
/// containing the marker.
pub const FAIL_POINT: &str = "aggregate.merge.panic_on";

/// One Silver row the aggregate cannot merge.
#[derive(Debug, Clone)]
pub struct PoisonRow {
    pub silver_version: i64,
    /// `_bronze_seq` of the row: the ingest stream sequence of its message.
    pub bronze_seq: i64,
    /// The row as one JSON object.
    pub json: String,
    pub reason: String,
    pub deliveries: u32,
}

fn inject(rows: &[RecordBatch]) {
    if !failpoint::is_set(FAIL_POINT) {
        return;
    }
    for b in rows {
        for c in b.columns() {
            if c.data_type() == &DataType::Utf8 {
                let s = c.as_string::<i32>();
                for i in 0..s.len() {
                    if s.is_valid(i) {
                        failpoint::panic_on(FAIL_POINT, s.value(i).as_bytes());
                    }
                }
            }
        }
    }
}

/// `Err(panic message)` if aggregating `rows` panics.
async fn attempt(
    state: &GoldState,
    rows: &[RecordBatch],
) -> Result<datafusion::error::Result<Vec<RecordBatch>>, String> {
    medallion_stage::poison::guarded_async(async {
        inject(rows);
        state.partials(rows).await
    })
    .await
}

/// The partial aggregates of `rows` (batch `i` from Silver version
/// `versions[i]`), leaving out rows that panic by themselves `max_deliver`
/// times; those are returned to be dead-lettered. A panic that no single
/// row reproduces is an error (the commit is retried later).
pub async fn partials(
    state: &GoldState,
    rows: &[RecordBatch],
    versions: &[i64],
    max_deliver: u32,
) -> Result<(Vec<RecordBatch>, Vec<PoisonRow>), String> {
    let first = match attempt(state, rows).await {
        Ok(r) => return r.map(|p| (p, Vec::new())).map_err(|e| e.to_string()),
        Err(m) => m,
    };
    let mut poison = Vec::new();
    let mut clean: Vec<RecordBatch> = Vec::new();
    for (bi, b) in rows.iter().enumerate() {
        let suspects = medallion_stage::poison::isolate(b, max_deliver, |slice| async move {
            attempt(state, std::slice::from_ref(&slice))
                .await
                .map(|_| ())
        })
        .await;
        for s in &suspects {
            poison.push(describe(
                &b.slice(s.row, 1),
                versions[bi],
                s.reason.clone(),
                s.deliveries,
            ));
        }
        clean.push(medallion_stage::poison::without(b, &suspects).map_err(|e| e.to_string())?);
    }
    if poison.is_empty() {
        return Err(format!(
            "aggregation panicked, but no single row does: {first}"
        ));
    }
    match attempt(state, &clean).await {
        Ok(r) => r.map(|p| (p, poison)).map_err(|e| e.to_string()),
        Err(m) => Err(format!("aggregation panicked without the poison rows: {m}")),
    }
}

fn describe(row: &RecordBatch, silver_version: i64, reason: String, deliveries: u32) -> PoisonRow {
    let bronze_seq = row
        .column_by_name(BRONZE_SEQ_COLUMN)
        .filter(|c| c.data_type() == &DataType::Int64)
        .map(|c| c.as_primitive::<Int64Type>().value(0))
        .unwrap_or(-1);
    let mut w = arrow::json::LineDelimitedWriter::new(Vec::new());
    let json = match w.write(row).and_then(|_| w.finish()) {
        Ok(()) => String::from_utf8_lossy(&w.into_inner()).trim().to_string(),
        Err(e) => format!("{{\"error\":\"row not representable as JSON: {e}\"}}"),
    };
    PoisonRow {
        silver_version,
        bronze_seq,
        json,
        reason: format!("aggregate panicked: {reason}"),
        deliveries,
    }
}

/// One DLQ subject per row and Gold table: `<bronze seq>.<row hash>`, with
/// `-<n>` for identical rows of one message. Not the Silver version: a row
/// keeps its subject when a replay rebuilds Silver, so it is parked once.
fn subjects(domain: &str, product: &str, table: &str, rows: &[PoisonRow]) -> Vec<String> {
    let mut seen = std::collections::HashMap::new();
    rows.iter()
        .map(|r| {
            let h = xxhash_rust::xxh3::xxh3_64(r.json.as_bytes());
            let n = seen.entry((r.bronze_seq, h)).or_insert(0u32);
            *n += 1;
            format!(
                "medallion.dlq.aggregate.{domain}.{product}.{table}.{}.{h:016x}-{n}",
                r.bronze_seq
            )
        })
        .collect()
}

/// Parks the rows in `MEDALLION_DLQ` unless already there. An error means
/// the Gold commit must wait.
pub async fn park(
    js: &jetstream::Context,
    domain: &str,
    product: &str,
    table: &str,
    rows: &[PoisonRow],
) -> Result<(), String> {
    if rows.is_empty() {
        return Ok(());
    }
    for (r, subject) in rows.iter().zip(subjects(domain, product, table, rows)) {
        let reason = medallion_bus::dlq::one_line(&r.reason);
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::DLQ_STREAM, INGEST_STREAM);
        h.insert(headers::DLQ_SEQUENCE, r.bronze_seq.to_string().as_str());
        h.insert(
            headers::DLQ_SUBJECT,
            format!("medallion.ingest.{domain}.{product}").as_str(),
        );
        h.insert(
            headers::DLQ_TABLE,
            format!("silver.{domain}.{product}").as_str(),
        );
        h.insert(
            headers::DLQ_TABLE_VERSION,
            r.silver_version.to_string().as_str(),
        );
        h.insert(headers::DLQ_REASON, reason.as_str());
        h.insert(headers::DLQ_DELIVERIES, r.deliveries.to_string().as_str());
        h.insert("Content-Type", "application/json");
        medallion_bus::dlq::park_once(js, subject, h, r.json.clone().into()).await?;
    }
    Ok(())
}
