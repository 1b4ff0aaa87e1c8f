//! Poison messages: a Bronze message whose transform panics every time.
//!
//! The transform runs each Bronze batch under `catch_unwind`. When a batch
//! panics, [`isolate`] bisects it down to the rows that panic on their own,
//! retries each of those up to `MEDALLION_MAX_DELIVER` times (a panic that
//! does not repeat is not poison), and hands back the batch without them.
//! The caller transforms the rest as usual; the poison rows are parked in
//! `MEDALLION_DLQ` ([`park`]) *before* the Silver commit that covers their
//! Bronze version, so a crash in between re-finds and re-parks them, and the
//! per-message DLQ subject makes that second park a no-op. Once the Silver
//! commit lands, its transaction version covers the Bronze version, so they
//! are never processed again: each poison message is in the DLQ exactly once
//! and in the quality counts (`dead_lettered`) exactly once.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use async_nats::jetstream;
use medallion_bus::dlq::one_line;
use medallion_bus::headers;
use medallion_bus::streams::INGEST_STREAM;
use medallion_runtime::failpoint;
use medallion_spec::layout::bronze;

/// Test-only fail point: `MEDALLION_FAIL_POINTS=transform.decode.panic_on=<marker>`
/// makes the transform panic on every Bronze message whose payload contains
/// the marker.
pub const FAIL_POINT: &str = "transform.decode.panic_on";
/// Test-only fail point: `transform.decode.abort_on=<marker>` aborts the
/// whole process instead (see [`crate::crash_check`]).
pub const ABORT_POINT: &str = "transform.decode.abort_on";

/// One Bronze message the transform cannot process.
#[derive(Debug, Clone)]
pub struct Poison {
    pub bronze_version: i64,
    /// The message's ingest stream sequence (`stream_seq` in Bronze).
    pub stream_seq: i64,
    pub subject: String,
    pub payload: Vec<u8>,
    pub reason: String,
    pub deliveries: u32,
}

/// Called inside the unwind boundary, before the transform of `b`.
pub fn inject(b: &RecordBatch) {
    let (panics, aborts) = (
        failpoint::is_set(FAIL_POINT),
        failpoint::is_set(ABORT_POINT),
    );
    if !panics && !aborts {
        return;
    }
    if let Some(p) = b.column_by_name(bronze::PAYLOAD) {
        let p = p.as_binary::<i32>();
        for i in 0..p.len() {
            failpoint::abort_on(ABORT_POINT, p.value(i));
            failpoint::panic_on(FAIL_POINT, p.value(i));
        }
    }
}

pub use medallion_stage::poison::guarded;

/// What is left of a batch once its poison rows are taken out.
pub struct Isolated {
    pub poison: Vec<Poison>,
    pub rest: RecordBatch,
}

/// Finds the rows of `batch` (Bronze version `version`) that make `attempt`
/// panic by themselves, `max_deliver` times in a row. `None` when no single
/// row does (the panic needs several rows together, or did not repeat): the
/// caller then treats the batch as before, without dead-lettering anything.
pub fn isolate(
    batch: &RecordBatch,
    version: i64,
    max_deliver: u32,
    attempt: impl FnMut(&RecordBatch) -> Result<(), String>,
) -> Option<Isolated> {
    let suspects = medallion_stage::poison::isolate_sync(batch, max_deliver, attempt);
    if suspects.is_empty() {
        return None;
    }
    let rest = medallion_stage::poison::without(batch, &suspects).ok()?;
    let poison = suspects
        .into_iter()
        .map(|s| describe(batch, s.row, version, s.reason, s.deliveries))
        .collect();
    Some(Isolated { poison, rest })
}

fn describe(
    batch: &RecordBatch,
    row: usize,
    version: i64,
    reason: String,
    deliveries: u32,
) -> Poison {
    let seq = batch
        .column_by_name(bronze::STREAM_SEQ)
        .map(|c| c.as_primitive::<Int64Type>().value(row))
        .unwrap_or(-1);
    let subject = batch
        .column_by_name(bronze::SUBJECT)
        .map(|c| c.as_string::<i32>().value(row).to_string())
        .unwrap_or_default();
    let payload = batch
        .column_by_name(bronze::PAYLOAD)
        .map(|c| c.as_binary::<i32>().value(row).to_vec())
        .unwrap_or_default();
    Poison {
        bronze_version: version,
        stream_seq: seq,
        subject,
        payload,
        reason,
        deliveries,
    }
}

/// The DLQ subject of one poison message: unique per message, so whether it
/// is already parked is one lookup, whatever the dedupe window.
pub fn dlq_subject(domain: &str, product: &str, p: &Poison) -> String {
    format!(
        "medallion.dlq.transform.{domain}.{product}.{}.{}",
        p.bronze_version, p.stream_seq
    )
}

/// Parks each poison message in `MEDALLION_DLQ` unless it is already there
/// (an earlier attempt crashed before its Silver commit). Returns how many
/// were newly parked; an error means nothing may be committed yet.
pub async fn park(
    js: &jetstream::Context,
    domain: &str,
    product: &str,
    poison: &[Poison],
) -> Result<usize, String> {
    if poison.is_empty() {
        return Ok(0);
    }
    let mut parked = 0;
    for p in poison {
        let subject = dlq_subject(domain, product, p);
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::DLQ_STREAM, INGEST_STREAM);
        h.insert(headers::DLQ_SEQUENCE, p.stream_seq.to_string().as_str());
        h.insert(headers::DLQ_SUBJECT, p.subject.as_str());
        h.insert(
            headers::DLQ_TABLE,
            format!("bronze.{domain}.{product}").as_str(),
        );
        h.insert(
            headers::DLQ_TABLE_VERSION,
            p.bronze_version.to_string().as_str(),
        );
        h.insert(headers::DLQ_REASON, one_line(&p.reason).as_str());
        h.insert(headers::DLQ_DELIVERIES, p.deliveries.to_string().as_str());
        if medallion_bus::dlq::park_once(js, subject, h, p.payload.clone().into()).await? {
            parked += 1;
        }
    }
    Ok(parked)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{BinaryArray, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch(payloads: &[&[u8]]) -> RecordBatch {
        let n = payloads.len();
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new(bronze::PAYLOAD, DataType::Binary, false),
                Field::new(bronze::STREAM_SEQ, DataType::Int64, false),
                Field::new(bronze::SUBJECT, DataType::Utf8, false),
            ])),
            vec![
                Arc::new(BinaryArray::from(payloads.to_vec())),
                Arc::new(Int64Array::from((1..=n as i64).collect::<Vec<_>>())),
                Arc::new(StringArray::from(vec!["medallion.ingest.d.p"; n])),
            ],
        )
        .unwrap()
    }

    fn crashes_on_bad(b: &RecordBatch) -> Result<(), String> {
        guarded(|| {
            let p = b.column(0).as_binary::<i32>();
            for i in 0..p.len() {
                assert!(!p.value(i).starts_with(b"bad"), "bad row");
            }
        })
    }

    #[test]
    fn finds_exactly_the_rows_that_always_panic() {
        let rows: Vec<Vec<u8>> = (0..1000)
            .map(|i| {
                if [3, 500, 501, 999].contains(&i) {
                    format!("bad{i}").into_bytes()
                } else {
                    format!("ok{i}").into_bytes()
                }
            })
            .collect();
        let refs: Vec<&[u8]> = rows.iter().map(Vec::as_slice).collect();
        let b = batch(&refs);
        let mut calls = 0;
        let out = isolate(&b, 7, 5, |x| {
            calls += 1;
            crashes_on_bad(x)
        })
        .expect("poison found");
        let seqs: Vec<i64> = out.poison.iter().map(|p| p.stream_seq).collect();
        assert_eq!(seqs, vec![4, 501, 502, 1000]);
        assert!(
            out.poison.iter().all(|p| p.deliveries == 5
                && p.bronze_version == 7
                && p.reason.contains("bad row"))
        );
        assert_eq!(out.rest.num_rows(), 996);
        assert!(crashes_on_bad(&out.rest).is_ok());
        assert!(calls < 120, "bisection, not one call per row: {calls}");
    }

    #[test]
    fn a_panic_that_does_not_repeat_is_not_poison() {
        let b = batch(&[b"ok", b"bad"]);
        let mut n = 0;
        let out = isolate(&b, 1, 5, |x| {
            n += 1;
            // Panics only on its first two calls (batch, then the row).
            if n <= 3 { crashes_on_bad(x) } else { Ok(()) }
        });
        assert!(out.is_none());
    }
}
