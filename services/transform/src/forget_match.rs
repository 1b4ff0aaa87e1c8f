//! Which records and rows belong to a data subject (`medallion forget`), and
//! the batches without them: Bronze messages lose the subject's records,
//! quarantine and Silver lose the subject's rows.
//!
//! A record belongs to the subject when its column, typed as the contract
//! types it, equals the requested value typed the same way (so `007` and
//! `7` match in an integer column, and a `standardize: lower` column matches
//! whatever the case). A record that does not decode or type has no column
//! to compare: it is the subject's when its raw bytes contain the value,
//! which errs on the side of erasing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, MapBuilder, MapFieldNames, RecordBatch,
    StringArray, StringBuilder,
};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::DataType;
use medallion_spec::layout::{bronze, quarantine};
use medallion_spec::{Column, Contract, PiiMode, SourceFormat};

use crate::cleanse::{cast_column, mask_pii, standardize};
use crate::decode::{Record, decode, raw_schema, split_records};

/// Header set on a Bronze message whose records were all erased: its
/// payload is empty, and the transform skips it instead of quarantining an
/// empty message.
pub const ERASED_HEADER: &str = "Medallion-Erased";

/// The subject of one erasure request, resolved against a contract.
pub struct Subject {
    format: SourceFormat,
    column_index: usize,
    column: Column,
    raw_schema: arrow::datatypes::SchemaRef,
    /// The value typed as the column is (before any PII masking).
    typed: String,
    /// The value as Silver stores it (the PII token for a hashed column).
    silver: String,
    /// What a record that cannot be decoded is searched for: the value as
    /// given and as the column standardizes it.
    needles: Vec<Vec<u8>>,
    erasure_id: String,
}

/// Why a request cannot be applied as asked: the requester's to fix.
#[derive(Debug, thiserror::Error)]
pub enum SubjectError {
    #[error(
        "column {column:?} is not in the spec of {product}; use one of: {columns} (docs/reference.md#forget)"
    )]
    NoSuchColumn {
        column: String,
        product: String,
        columns: String,
    },
    #[error("value does not convert to the type of column {column:?} ({ty})")]
    Mistyped { column: String, ty: String },
    #[error(
        "column {column:?} is redacted in Silver (pii: redact), so its rows cannot be found there; erase by another column that identifies the subject"
    )]
    Redacted { column: String },
    #[error(
        "column {column:?} is hashed in Silver (pii: hash) and this transform has no MEDALLION_PII_KEY"
    )]
    NoPiiKey { column: String },
}

fn typed_strings(raw: &StringArray, column: &Column) -> ArrayRef {
    let mut errors = vec![Vec::new(); raw.len()];
    let typed = cast_column(&standardize(raw, column), column, &mut errors);
    let s = cast(&typed, &DataType::Utf8).expect("every column type casts to text");
    // A value that failed to type is NULL here: it has no typed form.
    let nulls: Vec<bool> = errors.iter().map(|e| e.is_empty()).collect();
    let s = s.as_string::<i32>();
    Arc::new(StringArray::from_iter(
        s.iter().zip(nulls).map(|(v, ok)| if ok { v } else { None }),
    ))
}

impl Subject {
    pub fn new(
        contract: &Contract,
        column: &str,
        value: &str,
        pii_key: Option<&[u8]>,
        erasure_id: &str,
    ) -> Result<Subject, SubjectError> {
        let spec = &contract.product.spec;
        let Some(column_index) = spec.schema.iter().position(|c| c.name == column) else {
            return Err(SubjectError::NoSuchColumn {
                column: column.into(),
                product: format!("{}.{}", contract.domain(), contract.name()),
                columns: spec
                    .schema
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let col = spec.schema[column_index].clone();
        let one = StringArray::from(vec![value]);
        let typed = typed_strings(&one, &col);
        let typed = typed.as_string::<i32>();
        if typed.is_null(0) {
            return Err(SubjectError::Mistyped {
                column: column.into(),
                ty: format!("{:?}", col.data_type).to_lowercase(),
            });
        }
        let silver = match col.pii {
            Some(PiiMode::Redact) => {
                return Err(SubjectError::Redacted {
                    column: column.into(),
                });
            }
            Some(PiiMode::Hash) if pii_key.is_none() => {
                return Err(SubjectError::NoPiiKey {
                    column: column.into(),
                });
            }
            _ => {
                let mut errors = vec![Vec::new(); 1];
                let t = cast_column(&standardize(&one, &col), &col, &mut errors);
                let masked = mask_pii(t, &col, pii_key);
                cast(&masked, &DataType::Utf8)
                    .expect("text")
                    .as_string::<i32>()
                    .value(0)
                    .to_string()
            }
        };
        Ok(Subject {
            format: spec.source.format,
            column_index,
            raw_schema: raw_schema(&contract.declared_schema),
            typed: typed.value(0).to_string(),
            silver,
            needles: vec![
                value.as_bytes().to_vec(),
                typed.value(0).as_bytes().to_vec(),
            ],
            column: col,
            erasure_id: erasure_id.into(),
        })
    }

    fn named_in(&self, bytes: &[u8]) -> bool {
        self.needles.iter().any(|n| contains(bytes, n))
    }

    /// For each record, whether it is the subject's.
    fn matches(&self, records: &[Record<'_>]) -> Vec<bool> {
        let decoded = decode(self.format, &self.raw_schema, records);
        let mut hit = vec![false; records.len()];
        let raw = decoded.batch.column(self.column_index).as_string::<i32>();
        let typed = typed_strings(raw, &self.column);
        let typed = typed.as_string::<i32>();
        for (j, &i) in decoded.ok.iter().enumerate() {
            hit[i] = if typed.is_null(j) {
                self.named_in(records[i].bytes)
            } else {
                typed.value(j) == self.typed
            };
        }
        for (i, _) in &decoded.errors {
            hit[*i] = self.named_in(records[*i].bytes);
        }
        hit
    }

    /// A Bronze batch without the subject's records (`None`: none there),
    /// and how many records went. Every message keeps its row: a message
    /// left with no record gets an empty payload and [`ERASED_HEADER`].
    pub fn erase_bronze(&self, batch: &RecordBatch) -> Option<(RecordBatch, u64)> {
        let payloads = batch.column_by_name(bronze::PAYLOAD)?.as_binary::<i32>();
        let records = split_records(self.format, payloads);
        let hits = self.matches(&records);
        if !hits.iter().any(|h| *h) {
            return None;
        }
        let mut lines: HashMap<usize, HashSet<i64>> = HashMap::new();
        let mut removed = 0u64;
        for (r, hit) in records.iter().zip(&hits) {
            // An empty message is one empty record: nothing of anyone's.
            if *hit && !r.bytes.is_empty() {
                lines.entry(r.row).or_default().insert(r.line);
                removed += 1;
            }
        }
        if removed == 0 {
            return None;
        }
        let mut emptied = vec![false; batch.num_rows()];
        let new_payloads: Vec<Vec<u8>> = (0..payloads.len())
            .map(|row| {
                let bytes = payloads.value(row);
                let Some(drop) = lines.get(&row) else {
                    return bytes.to_vec();
                };
                let kept = match self.format {
                    SourceFormat::Json => Vec::new(),
                    SourceFormat::Ndjson | SourceFormat::Csv => without_lines(bytes, drop),
                };
                emptied[row] = kept.iter().all(|b| b.is_ascii_whitespace());
                kept
            })
            .collect();
        let payload: ArrayRef = Arc::new(BinaryArray::from_iter_values(new_payloads.iter()));
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        let schema = batch.schema();
        let pi = schema.index_of(bronze::PAYLOAD).ok()?;
        columns[pi] = payload;
        if let Ok(hi) = schema.index_of(bronze::HEADERS) {
            columns[hi] = self.mark_headers(columns[hi].as_map(), &emptied)?;
        }
        RecordBatch::try_new(schema, columns)
            .ok()
            .map(|b| (b, removed))
    }

    /// The headers with [`ERASED_HEADER`] added to the `marked` rows.
    fn mark_headers(&self, headers: &arrow::array::MapArray, marked: &[bool]) -> Option<ArrayRef> {
        let names = MapFieldNames {
            entry: "key_value".into(),
            key: "key".into(),
            value: "value".into(),
        };
        let mut b = MapBuilder::new(Some(names), StringBuilder::new(), StringBuilder::new());
        for row in 0..headers.len() {
            if headers.is_valid(row) {
                let entries = headers.value(row);
                let keys = entries.column(0).as_string::<i32>();
                let values = entries.column(1).as_string::<i32>();
                for i in 0..entries.len() {
                    b.keys().append_value(keys.value(i));
                    if values.is_null(i) {
                        b.values().append_null();
                    } else {
                        b.values().append_value(values.value(i));
                    }
                }
            }
            if marked[row] {
                b.keys().append_value(ERASED_HEADER);
                b.values().append_value(&self.erasure_id);
            }
            b.append(headers.is_valid(row) || marked[row]).ok()?;
        }
        // The builder's field flags differ from the table's: cast to its type.
        cast(&b.finish(), headers.data_type()).ok()
    }

    /// Quarantine rows (one raw record each) without the subject's;
    /// `None` when none is there.
    pub fn erase_quarantine(&self, batch: &RecordBatch) -> Option<(RecordBatch, u64)> {
        let payloads = batch
            .column_by_name(quarantine::PAYLOAD)?
            .as_binary::<i32>();
        let records: Vec<Record<'_>> = (0..payloads.len())
            .map(|row| Record {
                row,
                line: 0,
                bytes: payloads.value(row),
            })
            .collect();
        let hits = self.matches(&records);
        keep_rows(batch, &hits)
    }

    /// Silver rows without the subject's; `None` when none is there.
    pub fn erase_silver(&self, batch: &RecordBatch) -> Option<(RecordBatch, u64)> {
        let column = batch.column_by_name(&self.column.name)?;
        let text = cast(column, &DataType::Utf8).ok()?;
        let text = text.as_string::<i32>();
        let hits: Vec<bool> = (0..text.len())
            .map(|i| text.is_valid(i) && text.value(i) == self.silver)
            .collect();
        keep_rows(batch, &hits)
    }
}

fn keep_rows(batch: &RecordBatch, hits: &[bool]) -> Option<(RecordBatch, u64)> {
    let removed = hits.iter().filter(|h| **h).count() as u64;
    if removed == 0 {
        return None;
    }
    let keep = BooleanArray::from(hits.iter().map(|h| !h).collect::<Vec<_>>());
    filter_record_batch(batch, &keep).ok().map(|b| (b, removed))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(haystack, needle).is_some()
}

/// `bytes` without the lines numbered in `drop` (0-based, as
/// [`split_records`] numbers them); every other byte stays as it was.
fn without_lines(bytes: &[u8], drop: &HashSet<i64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for (i, line) in bytes.split_inclusive(|b| *b == b'\n').enumerate() {
        if !drop.contains(&(i as i64)) {
            out.extend_from_slice(line);
        }
    }
    out
}

/// A Bronze batch without the messages an erasure emptied (they held only
/// the subject's records); the same batch when there are none.
pub fn without_erased_messages(batch: RecordBatch) -> RecordBatch {
    let Some(payloads) = batch
        .column_by_name(bronze::PAYLOAD)
        .map(|c| c.as_binary::<i32>().clone())
    else {
        return batch;
    };
    if !(0..payloads.len()).any(|i| payloads.value(i).is_empty()) {
        return batch;
    }
    let Some(headers) = batch
        .column_by_name(bronze::HEADERS)
        .map(|c| c.as_map().clone())
    else {
        return batch;
    };
    let erased = |row: usize| {
        headers.is_valid(row)
            && headers
                .value(row)
                .column(0)
                .as_string::<i32>()
                .iter()
                .any(|k| k == Some(ERASED_HEADER))
    };
    let keep: Vec<bool> = (0..payloads.len())
        .map(|i| !(payloads.value(i).is_empty() && erased(i)))
        .collect();
    if keep.iter().all(|k| *k) {
        return batch;
    }
    filter_record_batch(&batch, &BooleanArray::from(keep)).unwrap_or(batch)
}

#[cfg(test)]
#[path = "forget_match_tests.rs"]
mod tests;
