//! A slice's change events as the transform sees them: the row images it
//! decodes, the envelopes quarantine keeps, and each change's operation and
//! sequence.

use std::borrow::Cow;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Int64Type, TimestampMicrosecondType};
use medallion_spec::model::CdcFormat;
use medallion_spec::{CdcPlan, Contract};

use crate::cdc_envelope::{Op, SeqValue, Unwrapped, unwrap};
use crate::decode::Record;

pub struct ChangeRecords<'a> {
    /// Index in the split records of each change.
    src: Vec<usize>,
    images: Vec<Cow<'a, [u8]>>,
    pub ops: Vec<Op>,
    seqs: Vec<Option<SeqValue>>,
    /// Records that are not changes: `(split index, reason)`.
    pub invalid: Vec<(usize, String)>,
    pub tombstones: u64,
}

impl<'a> ChangeRecords<'a> {
    pub fn unwrap(plan: &CdcPlan, split: &[Record<'a>]) -> Self {
        let mut out = ChangeRecords {
            src: Vec::with_capacity(split.len()),
            images: Vec::with_capacity(split.len()),
            ops: Vec::with_capacity(split.len()),
            seqs: Vec::with_capacity(split.len()),
            invalid: Vec::new(),
            tombstones: 0,
        };
        for (i, r) in split.iter().enumerate() {
            match unwrap(plan, r.bytes) {
                Unwrapped::Change { op, seq, image } => {
                    out.src.push(i);
                    out.images.push(image);
                    out.ops.push(op);
                    out.seqs.push(seq);
                }
                Unwrapped::Tombstone => out.tombstones += 1,
                Unwrapped::Invalid(reason) => out.invalid.push((i, reason)),
            }
        }
        out
    }

    /// The row images, each where its envelope was in Bronze.
    pub fn records(&self, split: &[Record<'a>]) -> Vec<Record<'_>> {
        self.src
            .iter()
            .zip(&self.images)
            .map(|(i, image)| Record {
                row: split[*i].row,
                line: split[*i].line,
                bytes: image,
            })
            .collect()
    }

    /// The envelope of each change, for quarantine.
    pub fn raw(&self, split: &[Record<'a>]) -> Vec<&'a [u8]> {
        self.src.iter().map(|i| split[*i].bytes).collect()
    }

    /// The sequence of each row of `logical` (rows are changes
    /// `ok[keep_idx[row]]`).
    pub fn sequences(
        &self,
        contract: &Contract,
        logical: &RecordBatch,
        keep_idx: &[usize],
        ok: &[usize],
    ) -> Sequences {
        let plan = contract.cdc.as_ref().expect("a change feed");
        let data_type = plan.sequence_type.clone();
        let values = match plan.format {
            CdcFormat::Debezium => keep_idx.iter().map(|j| self.seqs[ok[*j]].clone()).collect(),
            CdcFormat::Generic => {
                let column = plan.sequence_paths[0].join(".");
                let a = logical
                    .column_by_name(&column)
                    .expect("sequence_by is a declared column");
                (0..logical.num_rows())
                    .map(|r| {
                        if a.is_null(r) {
                            return None;
                        }
                        Some(match a.data_type() {
                            DataType::Int64 => {
                                SeqValue::Int(a.as_primitive::<Int64Type>().value(r))
                            }
                            DataType::Timestamp(..) => {
                                SeqValue::Int(a.as_primitive::<TimestampMicrosecondType>().value(r))
                            }
                            _ => SeqValue::Str(a.as_string::<i32>().value(r).to_string()),
                        })
                    })
                    .collect()
            }
        };
        Sequences {
            values,
            data_type,
            column: plan.sequence_paths[0].join("."),
        }
    }

    /// The `__op` column of the changes `rows` (indices into the changes).
    pub fn op_column(&self, rows: impl Iterator<Item = usize>) -> ArrayRef {
        Arc::new(StringArray::from_iter_values(
            rows.map(|i| self.ops[i].code()),
        ))
    }
}

/// Each kept row's sequence.
pub struct Sequences {
    values: Vec<Option<SeqValue>>,
    data_type: DataType,
    column: String,
}

impl Sequences {
    /// Why `row` cannot be ordered, if it has no sequence.
    pub fn missing(&self, row: usize) -> Option<String> {
        self.values[row].is_none().then(|| {
            format!(
                "sequence column `{}` (spec.cdc.sequence_by) is empty",
                self.column
            )
        })
    }

    pub fn column(&self, rows: &[usize]) -> ArrayRef {
        let values = rows.iter().map(|r| self.values[*r].as_ref());
        seq_array(&self.data_type, values)
    }
}

/// Sequence values as a column of the product's sequence type.
pub fn seq_array<'v>(
    data_type: &DataType,
    values: impl Iterator<Item = Option<&'v SeqValue>>,
) -> ArrayRef {
    let int = |v: Option<&SeqValue>| match v {
        Some(SeqValue::Int(n)) => Some(*n),
        _ => None,
    };
    match data_type {
        DataType::Int64 => Arc::new(values.map(int).collect::<Int64Array>()),
        DataType::Timestamp(..) => Arc::new(
            values
                .map(int)
                .collect::<TimestampMicrosecondArray>()
                .with_timezone("UTC"),
        ),
        _ => Arc::new(
            values
                .map(|v| match v {
                    Some(SeqValue::Str(s)) => Some(s.clone()),
                    Some(SeqValue::Int(n)) => Some(n.to_string()),
                    None => None,
                })
                .collect::<StringArray>(),
        ),
    }
}

/// The sequence at `row` of a column written by [`seq_array`].
pub fn seq_at(a: &dyn Array, row: usize) -> Option<SeqValue> {
    if a.is_null(row) {
        return None;
    }
    Some(match a.data_type() {
        DataType::Int64 => SeqValue::Int(a.as_primitive::<Int64Type>().value(row)),
        DataType::Timestamp(..) => {
            SeqValue::Int(a.as_primitive::<TimestampMicrosecondType>().value(row))
        }
        DataType::Utf8 => SeqValue::Str(a.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => SeqValue::Str(a.as_string::<i64>().value(row).to_string()),
        DataType::Utf8View => SeqValue::Str(a.as_string_view().value(row).to_string()),
        _ => return None,
    })
}
