//! One Bronze commit → Silver rows + quarantine rows + quality counts. Pure:
//! no IO, so golden tests run it directly.

use std::borrow::Cow;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, BooleanArray, Int64Array, ListBuilder, RecordBatch,
    StringBuilder, TimestampMicrosecondArray,
};
use arrow::compute::{filter, filter_record_batch};
use arrow::datatypes::{Int64Type, TimestampMicrosecondType};
use medallion_spec::layout::{bronze, quarantine_schema};
use medallion_spec::model::SourceFormat;
use medallion_spec::{Contract, ExpectationAction};

use crate::cdc_envelope::Op;
use crate::cdc_records::ChangeRecords;
use crate::cleanse::{cast_column, check_required, mask_pii, standardize};
use crate::decode::{Record, decode, raw_schema, split_records};
use crate::dedupe::{KeyHashSet, KeySet, key_hashes};

pub use medallion_bus::quality::{ExpectationCount, QualityCounts};

/// A `fail` expectation was violated: the product stops before this batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Halt {
    pub expectation: String,
    pub rule: String,
    pub rows: u64,
    pub first_bronze_seq: i64,
}

impl std::fmt::Display for Halt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "expectation `{}` ({}) has action fail and {} row(s) violate it, first at bronze stream_seq {}; \
             fix the data or the spec, then the product resumes from this batch",
            self.expectation, self.rule, self.rows, self.first_bronze_seq
        )
    }
}

pub struct Output {
    pub silver: RecordBatch,
    pub quarantine: RecordBatch,
    pub counts: QualityCounts,
    /// Keys of the Silver rows: added to the key set once the commit lands.
    pub new_keys: Vec<u128>,
}

/// Transforms the rows of Bronze version `bronze_version`. `seen` holds keys of
/// Silver rows already committed; `pending` those of earlier batches of the
/// same (not yet committed) Silver commit.
pub fn transform(
    contract: &Contract,
    pii_key: Option<&[u8]>,
    bronze_batch: &RecordBatch,
    bronze_version: i64,
    seen: &KeySet,
    pending: &KeyHashSet,
    now_us: i64,
) -> Result<Output, Halt> {
    let spec = &contract.product.spec;
    let payloads = bronze_batch
        .column_by_name(bronze::PAYLOAD)
        .expect("bronze payload column")
        .as_binary::<i32>();
    let seqs = bronze_batch
        .column_by_name(bronze::STREAM_SEQ)
        .expect("bronze stream_seq column")
        .as_primitive::<Int64Type>();
    let received = bronze_batch
        .column_by_name(bronze::RECEIVED_AT)
        .expect("bronze received_at column")
        .as_primitive::<TimestampMicrosecondType>();

    let split = split_records(spec.source.format, payloads);
    let mut quarantine = QuarantineRows::new(now_us, bronze_version);
    let mut counts = QualityCounts {
        rows_in: split.len() as u64,
        ..Default::default()
    };
    // A change feed's records are envelopes: their row images are what the
    // contract reads, and quarantine keeps the envelope.
    let changes = contract
        .cdc
        .as_ref()
        .map(|plan| ChangeRecords::unwrap(plan, &split));
    if let Some(c) = &changes {
        for (i, reason) in &c.invalid {
            let r = &split[*i];
            quarantine.push(r.bytes, seqs.value(r.row), r.line, &[reason.clone()], &[]);
        }
        counts.invalid += c.invalid.len() as u64;
        counts.changes = Some(medallion_bus::quality::ChangeCounts {
            tombstones: c.tombstones,
            ..Default::default()
        });
    }
    // Without a change feed the split records are decoded as they are (no
    // copy on this hot path) and quarantine keeps their bytes.
    let (records, envelopes): (Cow<'_, [Record<'_>]>, Option<Vec<&[u8]>>) = match &changes {
        Some(c) => (Cow::Owned(c.records(&split)), Some(c.raw(&split))),
        None => (Cow::Borrowed(&split), None),
    };
    let envelope_of = |i: usize| envelopes.as_ref().map_or(records[i].bytes, |e| e[i]);
    let format = if changes.is_some() {
        SourceFormat::Json
    } else {
        spec.source.format
    };
    let decoded = decode(format, &raw_schema(&contract.declared_schema), &records);
    for (i, reason) in &decoded.errors {
        let r = &records[*i];
        quarantine.push(
            envelope_of(*i),
            seqs.value(r.row),
            r.line,
            &[reason.clone()],
            &[],
        );
    }
    counts.invalid += decoded.errors.len() as u64;
    // Deletes carry the key only (Debezium's `before` may hold nothing else).
    let is_delete: Vec<bool> = match &changes {
        Some(c) => decoded.ok.iter().map(|i| c.ops[*i] == Op::Delete).collect(),
        None => Vec::new(),
    };
    let deleted = |j: usize| is_delete.get(j).copied().unwrap_or(false);

    // Type every column; collect per-row errors.
    let n = decoded.batch.num_rows();
    let mut row_errors: Vec<Vec<String>> = vec![Vec::new(); n];
    let mut typed: Vec<ArrayRef> = Vec::with_capacity(spec.schema.len());
    for (ci, column) in spec.schema.iter().enumerate() {
        let raw = decoded.batch.column(ci).as_string::<i32>();
        if is_delete.iter().any(|d| *d) && !contract.key().contains(&column.name) {
            let mut errors: Vec<Vec<String>> = vec![Vec::new(); n];
            let values = cast_column(&standardize(raw, column), column, &mut errors);
            check_required(&values, column, &mut errors);
            for (j, e) in errors.into_iter().enumerate() {
                if !deleted(j) {
                    row_errors[j].extend(e);
                }
            }
            typed.push(mask_pii(values, column, pii_key));
            continue;
        }
        let values = cast_column(&standardize(raw, column), column, &mut row_errors);
        check_required(&values, column, &mut row_errors);
        typed.push(mask_pii(values, column, pii_key));
    }
    let mut valid: Vec<bool> = row_errors.iter().map(Vec::is_empty).collect();
    for (j, errs) in row_errors.iter().enumerate() {
        if !errs.is_empty() {
            let i = decoded.ok[j];
            let r = &records[i];
            quarantine.push(envelope_of(i), seqs.value(r.row), r.line, errs, &[]);
            counts.invalid += 1;
        }
    }

    // Derive, column by column, over the rows that typed cleanly.
    let mut keep_idx: Vec<usize> = (0..n).filter(|j| valid[*j]).collect();
    let mask = BooleanArray::from(valid.clone());
    let mut columns: Vec<ArrayRef> = typed
        .iter()
        .map(|c| filter(c, &mask).expect("same length"))
        .collect();
    // A change feed's deletes carry the key only: its rows are checked
    // against the spec's required columns when written, not here.
    let loosen = |f: &Arc<arrow::datatypes::Field>| match changes {
        Some(_) => Arc::new(f.as_ref().clone().with_nullable(true)),
        None => f.clone(),
    };
    let mut fields: Vec<_> = contract
        .declared_schema
        .fields()
        .iter()
        .map(loosen)
        .collect();
    for d in &contract.derive {
        let schema = Arc::new(arrow::datatypes::Schema::new(fields.clone()));
        let batch = RecordBatch::try_new(schema, columns.clone()).expect("declared columns match");
        let (values, failed) = evaluate_rowwise_on_error(&d.expr, &batch, &d.data_type);
        if !failed.is_empty() {
            // Rows where the expression errors (e.g. an overflow) are quarantined.
            let mut drop = vec![true; batch.num_rows()];
            for (row, msg) in &failed {
                let j = keep_idx[*row];
                if deleted(j) {
                    // A delete keeps its key only: nothing to derive.
                    continue;
                }
                drop[*row] = false;
                let r = &records[decoded.ok[j]];
                quarantine.push(
                    envelope_of(decoded.ok[j]),
                    seqs.value(r.row),
                    r.line,
                    &[format!("derive {}: {msg}", d.name)],
                    &[],
                );
                counts.invalid += 1;
                valid[j] = false;
            }
            let m = BooleanArray::from(drop);
            columns = columns
                .iter()
                .map(|c| filter(c, &m).expect("same length"))
                .collect();
            keep_idx = keep_idx
                .iter()
                .zip(m.values().iter())
                .filter(|(_, k)| *k)
                .map(|(i, _)| *i)
                .collect();
            columns.push(filter(&values, &m).expect("same length"));
        } else {
            columns.push(values);
        }
        fields.push(Arc::new(arrow::datatypes::Field::new(
            &d.name,
            d.data_type.clone(),
            true,
        )));
    }
    let logical_schema = match changes {
        Some(_) => Arc::new(arrow::datatypes::Schema::new(
            contract
                .logical_schema
                .fields()
                .iter()
                .map(loosen)
                .collect::<Vec<_>>(),
        )),
        None => contract.logical_schema.clone(),
    };
    let logical = RecordBatch::try_new(logical_schema, columns).expect("logical schema matches");

    // Expectations: NULL counts as a failure (SQL's unknown is not a pass).
    let m = logical.num_rows();
    let mut failed_by_row: Vec<Vec<(usize, ExpectationAction)>> = vec![Vec::new(); m];
    for (ei, e) in contract.expectations.iter().enumerate() {
        let result = e
            .expr
            .evaluate(&logical)
            .and_then(|v| v.into_array(m))
            .map(|a| a.as_boolean().clone());
        let entry = counts.expectations.entry(e.name.clone()).or_default();
        entry.action = e.action.to_string();
        for (row, failed) in failed_by_row.iter_mut().enumerate() {
            if deleted(keep_idx[row]) {
                // A delete has no row image to check.
                continue;
            }
            let pass = match &result {
                Ok(b) => b.is_valid(row) && b.value(row),
                Err(_) => false,
            };
            if pass {
                entry.passed += 1;
            } else {
                entry.failed += 1;
                failed.push((ei, e.action));
            }
        }
    }
    if let Some((ei, rows, first)) =
        first_fail(&failed_by_row, &keep_idx, &decoded.ok, &records, seqs)
    {
        let e = &contract.expectations[ei];
        return Err(Halt {
            expectation: e.name.clone(),
            rule: e.rule.clone(),
            rows,
            first_bronze_seq: first,
        });
    }

    // Route rows, then de-duplicate what is left (first occurrence wins).
    let key_cols: Vec<ArrayRef> = contract
        .key()
        .iter()
        .map(|k| {
            logical
                .column_by_name(k)
                .expect("key columns are declared")
                .clone()
        })
        .collect();
    // A change feed keeps every change (no dedupe): no key hashes.
    let hashes = if key_cols.is_empty() || changes.is_some() {
        Vec::new()
    } else {
        key_hashes(&key_cols).expect("row encoding of supported types")
    };
    let mut batch_keys = KeyHashSet::with_capacity_and_hasher(hashes.len(), Default::default());
    let mut keep = vec![false; m];
    let mut new_keys = Vec::with_capacity(hashes.len());
    let change_seqs = changes
        .as_ref()
        .map(|c| c.sequences(contract, &logical, &keep_idx, &decoded.ok));
    for row in 0..m {
        let failed = &failed_by_row[row];
        let i = decoded.ok[keep_idx[row]];
        let r = &records[i];
        if failed
            .iter()
            .any(|(_, a)| *a == ExpectationAction::Quarantine)
        {
            let names: Vec<String> = failed
                .iter()
                .map(|(ei, _)| contract.expectations[*ei].name.clone())
                .collect();
            quarantine.push(envelope_of(i), seqs.value(r.row), r.line, &[], &names);
            continue;
        }
        if failed.iter().any(|(_, a)| *a == ExpectationAction::Drop) {
            counts.dropped += 1;
            continue;
        }
        if let Some(s) = &change_seqs {
            // A change feed keeps every change: the apply step orders them.
            if let Some(reason) = s.missing(row) {
                quarantine.push(envelope_of(i), seqs.value(r.row), r.line, &[reason], &[]);
                counts.invalid += 1;
                continue;
            }
            keep[row] = true;
            continue;
        }
        if let Some(&h) = hashes.get(row) {
            if seen.contains(h) || pending.contains(&h) || !batch_keys.insert(h) {
                counts.duplicates += 1;
                continue;
            }
            new_keys.push(h);
        }
        keep[row] = true;
    }
    let keep_mask = BooleanArray::from(keep.clone());
    let kept = filter_record_batch(&logical, &keep_mask).expect("same length");
    let origin: Vec<usize> = (0..m)
        .filter(|r| keep[*r])
        .map(|r| records[decoded.ok[keep_idx[r]]].row)
        .collect();
    let mut silver_cols = kept.columns().to_vec();
    silver_cols.push(Arc::new(Int64Array::from_iter_values(
        origin.iter().map(|r| seqs.value(*r)),
    )));
    silver_cols.push(Arc::new(
        TimestampMicrosecondArray::from_iter_values(origin.iter().map(|r| received.value(*r)))
            .with_timezone("UTC"),
    ));
    let silver = match (&changes, &change_seqs) {
        (Some(c), Some(s)) => {
            let rows: Vec<usize> = (0..m).filter(|r| keep[*r]).collect();
            silver_cols.push(s.column(&rows));
            silver_cols.push(c.op_column(rows.iter().map(|r| decoded.ok[keep_idx[*r]])));
            new_keys.clear();
            RecordBatch::try_new(crate::cdc_apply::change_schema(contract), silver_cols)
                .expect("change schema matches")
        }
        _ => RecordBatch::try_new(contract.silver_schema.clone(), silver_cols)
            .expect("silver schema matches"),
    };
    counts.rows_out = silver.num_rows() as u64;
    counts.quarantined = quarantine.len() as u64;
    Ok(Output {
        silver,
        quarantine: quarantine.finish(),
        counts,
        new_keys,
    })
}

/// Splits a Bronze batch into slices of about `max_bytes` of payload. Ingest
/// commits up to tens of MB at once; transformed whole, every intermediate
/// buffer is a fresh multi-MB allocation the kernel has to zero, the work
/// runs on one core, and the caches never hold it. Slices share the batch's
/// buffers (no copy) and keep its row order.
pub fn slices(bronze_batch: &RecordBatch, max_bytes: usize) -> Vec<RecordBatch> {
    let Some(payloads) = bronze_batch
        .column_by_name(bronze::PAYLOAD)
        .and_then(|c| c.as_binary_opt::<i32>())
    else {
        return vec![bronze_batch.clone()];
    };
    let offsets = payloads.value_offsets();
    let mut out = Vec::new();
    let mut start = 0;
    for row in 0..payloads.len() {
        let bytes = (offsets[row + 1] - offsets[start]) as usize;
        if row > start && bytes > max_bytes {
            out.push(bronze_batch.slice(start, row - start));
            start = row;
        }
    }
    if start < bronze_batch.num_rows() || out.is_empty() {
        out.push(bronze_batch.slice(start, bronze_batch.num_rows() - start));
    }
    out
}

/// Removes the Silver rows whose key an earlier batch of the same step already
/// keeps (batches are transformed in parallel, each against the committed key
/// set only), counting them as duplicates: the result is what transforming the
/// batches one after another would give.
pub fn drop_keys_seen(o: &mut Output, earlier: &KeyHashSet) {
    if o.new_keys.is_empty() || earlier.is_empty() {
        return;
    }
    let keep: Vec<bool> = o.new_keys.iter().map(|k| !earlier.contains(k)).collect();
    let removed = keep.iter().filter(|k| !**k).count();
    if removed == 0 {
        return;
    }
    let mask = BooleanArray::from(keep.clone());
    o.silver = filter_record_batch(&o.silver, &mask).expect("same length");
    let mut flags = keep.iter();
    o.new_keys
        .retain(|_| *flags.next().expect("one flag per key"));
    o.counts.rows_out -= removed as u64;
    o.counts.duplicates += removed as u64;
}

/// `(expectation index, violating rows, first bronze seq)` of the first `fail` violation.
fn first_fail(
    failed_by_row: &[Vec<(usize, ExpectationAction)>],
    keep_idx: &[usize],
    ok: &[usize],
    records: &[crate::decode::Record<'_>],
    seqs: &arrow::array::Int64Array,
) -> Option<(usize, u64, i64)> {
    let mut first: Option<(usize, i64)> = None;
    let mut rows = 0;
    for (row, failed) in failed_by_row.iter().enumerate() {
        if let Some((ei, _)) = failed.iter().find(|(_, a)| *a == ExpectationAction::Fail) {
            rows += 1;
            if first.is_none() {
                first = Some((*ei, seqs.value(records[ok[keep_idx[row]]].row)));
            }
        }
    }
    first.map(|(ei, seq)| (ei, rows, seq))
}

/// Evaluates `expr`; if it errors on the batch, evaluates row by row so only
/// the offending rows are reported. Returns the values and `(row, error)`s.
fn evaluate_rowwise_on_error(
    expr: &Arc<dyn datafusion::physical_expr::PhysicalExpr>,
    batch: &RecordBatch,
    data_type: &arrow::datatypes::DataType,
) -> (ArrayRef, Vec<(usize, String)>) {
    let n = batch.num_rows();
    let eval = |b: &RecordBatch| -> Result<ArrayRef, String> {
        let a = expr
            .evaluate(b)
            .and_then(|v| v.into_array(b.num_rows()))
            .map_err(|e| medallion_spec::contract::clean_df_error(&e.to_string()))?;
        if a.data_type() == data_type {
            Ok(a)
        } else {
            arrow::compute::cast(&a, data_type).map_err(|e| e.to_string())
        }
    };
    if let Ok(a) = eval(batch) {
        return (a, Vec::new());
    }
    let mut parts = Vec::with_capacity(n);
    let mut failed = Vec::new();
    for row in 0..n {
        match eval(&batch.slice(row, 1)) {
            Ok(a) => parts.push(a),
            Err(e) => {
                failed.push((row, e));
                parts.push(arrow::array::new_null_array(data_type, 1));
            }
        }
    }
    let refs: Vec<&dyn Array> = parts.iter().map(|a| a.as_ref()).collect();
    let values = if refs.is_empty() {
        arrow::array::new_empty_array(data_type)
    } else {
        arrow::compute::concat(&refs).expect("same type")
    };
    (values, failed)
}

struct QuarantineRows {
    payload: BinaryBuilder,
    seq: Vec<i64>,
    line: Vec<i64>,
    errors: ListBuilder<StringBuilder>,
    failed: ListBuilder<StringBuilder>,
    now_us: i64,
    version: i64,
}

impl QuarantineRows {
    fn new(now_us: i64, version: i64) -> Self {
        let list = || {
            ListBuilder::new(StringBuilder::new()).with_field(Arc::new(
                arrow::datatypes::Field::new("element", arrow::datatypes::DataType::Utf8, true),
            ))
        };
        QuarantineRows {
            payload: BinaryBuilder::new(),
            seq: Vec::new(),
            line: Vec::new(),
            errors: list(),
            failed: list(),
            now_us,
            version,
        }
    }

    fn len(&self) -> usize {
        self.seq.len()
    }

    fn push(&mut self, payload: &[u8], seq: i64, line: i64, errors: &[String], failed: &[String]) {
        self.payload.append_value(payload);
        self.seq.push(seq);
        self.line.push(line);
        for e in errors {
            self.errors.values().append_value(e);
        }
        self.errors.append(true);
        for f in failed {
            self.failed.values().append_value(f);
        }
        self.failed.append(true);
    }

    fn finish(mut self) -> RecordBatch {
        let n = self.seq.len();
        RecordBatch::try_new(
            quarantine_schema(),
            vec![
                Arc::new(self.payload.finish()),
                Arc::new(Int64Array::from(self.seq)),
                Arc::new(Int64Array::from(self.line)),
                Arc::new(Int64Array::from(vec![self.version; n])),
                Arc::new(self.errors.finish()),
                Arc::new(self.failed.finish()),
                Arc::new(
                    TimestampMicrosecondArray::from(vec![self.now_us; n]).with_timezone("UTC"),
                ),
            ],
        )
        .expect("quarantine schema matches")
    }
}
