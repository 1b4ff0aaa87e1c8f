//! Which columns of a commit to write without dictionary encoding.
//!
//! Parquet's writer tries a dictionary for every column and gives up on it
//! only once the dictionary page is full: for a column whose values are
//! nearly all distinct (event times, amounts, ids) that is tens of thousands
//! of values hashed and copied per row group for nothing, a few percent of a
//! stage's CPU. The first rows of a commit tell: a column with more distinct
//! values than half of a sample is written plain.

use std::collections::HashSet;

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use arrow::row::{RowConverter, SortField};

/// Rows looked at per column.
const SAMPLE_ROWS: usize = 4096;
/// Below this many rows the choice hardly matters and the sample says little.
const MIN_ROWS: usize = 1024;

/// Top-level columns whose sampled values are more than half distinct, among
/// those `undecided` (a column already written plain — a raw payload, a key —
/// is not sampled: its values can be large). Nested columns keep the
/// writer's default (their leaves have other paths).
pub fn near_unique_columns(
    batches: &[RecordBatch],
    undecided: impl Fn(&str) -> bool,
) -> Vec<String> {
    let Some(first) = batches.iter().find(|b| b.num_rows() > 0) else {
        return Vec::new();
    };
    if first.num_rows() < MIN_ROWS {
        return Vec::new();
    }
    let n = first.num_rows().min(SAMPLE_ROWS);
    first
        .schema()
        .fields()
        .iter()
        .zip(first.columns())
        .filter(|(f, _)| undecided(f.name()))
        .filter(|(f, _)| {
            f.data_type().is_primitive()
                || matches!(
                    f.data_type(),
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Binary | DataType::LargeBinary
                )
        })
        .filter(|(f, column)| {
            let Ok(converter) = RowConverter::new(vec![SortField::new(f.data_type().clone())])
            else {
                return false;
            };
            let Ok(rows) = converter.convert_columns(&[column.slice(0, n)]) else {
                return false;
            };
            let distinct: HashSet<&[u8]> = rows.iter().map(|r| r.data()).collect();
            distinct.len() * 2 > n
        })
        .map(|(f, _)| f.name().clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;

    fn batch(rows: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("ts", DataType::Int64, false),
            Field::new("country", DataType::Utf8, true),
            Field::new("amount", DataType::Float64, true),
            Field::new("id", DataType::Utf8, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(0..rows)),
                Arc::new(StringArray::from_iter_values(
                    (0..rows).map(|i| ["GB", "US", "DE"][i as usize % 3]),
                )),
                // Half the sample distinct: still worth a dictionary.
                Arc::new(Float64Array::from_iter_values(
                    (0..rows).map(|i| (i / 2) as f64),
                )),
                Arc::new(StringArray::from_iter_values(
                    (0..rows).map(|i| format!("ev-{i}")),
                )),
            ],
        )
        .unwrap()
    }

    #[test]
    fn distinct_columns_are_named_and_repeating_ones_are_not() {
        assert_eq!(
            near_unique_columns(&[batch(10_000)], |_| true),
            ["ts", "id"]
        );
        assert!(
            near_unique_columns(&[batch(0), batch(100)], |_| true).is_empty(),
            "too few rows to judge"
        );
        assert_eq!(
            near_unique_columns(&[batch(0), batch(2_000)], |_| true),
            ["ts", "id"]
        );
    }
}
