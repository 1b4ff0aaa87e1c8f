//! A change-feed Silver commit as rows in and rows out. Such a commit
//! rewrites whole key buckets (see the transform's `cdc_apply`): most rows of
//! a removed file are written again unchanged. What changed is the multiset
//! difference of the removed files' rows and the added files' rows, whole
//! rows compared: rows only added go into Gold, rows only removed (an
//! update's old version, a delete) come out.

use std::collections::HashMap;

use arrow::array::{BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::row::{RowConverter, SortField};
use deltalake::DeltaTable;
use medallion_lake::commits::conform;
use medallion_lake::{LakeError, commit_summary, read_parquet};
use medallion_spec::TableRef;

/// `(rows added, rows removed)` by the commit of `version`, whose added rows
/// are `added`; `None` when a removed file is gone (vacuumed), so the caller
/// recomputes instead.
pub(crate) async fn changed_rows(
    tref: &TableRef,
    table: &DeltaTable,
    version: i64,
    added: Vec<RecordBatch>,
) -> Result<Option<(Vec<RecordBatch>, Vec<RecordBatch>)>, LakeError> {
    let Some(summary) = commit_summary(tref, table, version).await? else {
        return Ok(None);
    };
    // A replay rewrote Silver under a new generation (perhaps a new spec):
    // its old rows are not what Gold once took in, so Gold is recomputed.
    let generation = |m: Option<std::collections::HashMap<String, serde_json::Value>>| {
        m.and_then(|m| m.get("medallion.generation").and_then(|g| g.as_i64()))
    };
    let now = generation(medallion_lake::commit_metadata(tref, table, version).await?);
    let before = generation(medallion_lake::commit_metadata(tref, table, version - 1).await?);
    if now.is_none() || now != before {
        return Ok(None);
    }
    let store = table.log_store().object_store(None);
    let schema = medallion_lake::writer::table_schema(tref, table)?;
    let mut removed = Vec::new();
    for path in &summary.removed {
        match read_parquet(&store, path).await {
            Ok(batches) => {
                for b in batches {
                    removed.push(conform(b, &schema)?);
                }
            }
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    let added = added
        .into_iter()
        .map(|b| conform(b, &schema))
        .collect::<Result<Vec<_>, _>>()?;
    let converter = RowConverter::new(
        schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect(),
    )?;
    let encode = |b: &RecordBatch| -> Result<Vec<Vec<u8>>, LakeError> {
        let rows = converter.convert_columns(b.columns())?;
        Ok((0..b.num_rows())
            .map(|r| rows.row(r).as_ref().to_vec())
            .collect())
    };
    let added_rows = added.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
    let removed_rows = removed.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
    // Added minus removed, per distinct row.
    let mut balance: HashMap<&[u8], i64> = HashMap::new();
    for r in added_rows.iter().flatten() {
        *balance.entry(r).or_default() += 1;
    }
    for r in removed_rows.iter().flatten() {
        *balance.entry(r).or_default() -= 1;
    }
    let mut pick = |batches: &[RecordBatch], rows: &[Vec<Vec<u8>>], sign: i64| {
        let mut out = Vec::new();
        for (b, rows) in batches.iter().zip(rows) {
            let keep: Vec<bool> = rows
                .iter()
                .map(|r| {
                    let n = balance.get_mut(r.as_slice()).expect("every row counted");
                    if *n * sign > 0 {
                        *n -= sign;
                        true
                    } else {
                        false
                    }
                })
                .collect();
            if keep.iter().any(|k| *k) {
                out.push(
                    filter_record_batch(b, &BooleanArray::from(keep)).expect("one flag per row"),
                );
            }
        }
        out
    };
    let only_added = pick(&added, &added_rows, 1);
    let only_removed = pick(&removed, &removed_rows, -1);
    Ok(Some((only_added, only_removed)))
}
