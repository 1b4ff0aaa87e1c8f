//! Reading a table's rows back: one commit at a time (how a consumer catches up
//! on versions whose events it missed), or the whole table at a version.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, new_null_array};
use arrow::datatypes::{Field, Schema, SchemaRef};
use deltalake::kernel::Action;
use deltalake::logstore::get_actions;
use deltalake::{DeltaTable, ObjectStore, Path};
use medallion_spec::TableRef;
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::writer::list_files;
use crate::{Lake, LakeError};

/// What one commit did to a table.
#[derive(Debug, Clone)]
pub struct CommitRows {
    pub version: i64,
    /// Rows the commit added (data files with `dataChange`).
    pub batches: Vec<RecordBatch>,
    /// True when the commit also removed data (an overwrite or rewrite): a
    /// consumer of appends must rebuild rather than add.
    pub removed_data: bool,
    /// Transaction actions of the commit: `(app_id, version)`.
    pub txns: Vec<(String, i64)>,
    /// Commit time in milliseconds since the epoch, if recorded.
    pub timestamp: Option<i64>,
}

/// Reads the rows added by `version`; `None` if that commit's log entry is gone
/// (log retention) or was never written.
pub async fn read_commit(
    tref: &TableRef,
    table: &DeltaTable,
    version: i64,
) -> Result<Option<CommitRows>, LakeError> {
    let Some(actions) = commit_actions(tref, table, version).await? else {
        return Ok(None);
    };
    let store = table.log_store().object_store(None);
    let schema = crate::writer::table_schema(tref, table)?;
    let mut rows = CommitRows {
        version,
        batches: Vec::new(),
        removed_data: false,
        txns: Vec::new(),
        timestamp: None,
    };
    let mut expiry = false;
    for action in actions {
        match action {
            Action::Add(add) if add.data_change => {
                let batches = match read_parquet(&store, &add.path).await {
                    // Compacted, then vacuumed: the rows are in a newer file.
                    Err(e) if e.is_not_found() => {
                        crate::moved::read_moved(tref, table, version, &add.path).await?
                    }
                    r => r?,
                };
                for b in batches {
                    rows.batches.push(conform(b, &schema)?);
                }
            }
            Action::Remove(r) if r.data_change => rows.removed_data = true,
            Action::Txn(t) => rows.txns.push((t.app_id, t.version)),
            Action::CommitInfo(ci) => {
                rows.timestamp = ci.timestamp;
                expiry |= is_expiry(&ci.info);
            }
            _ => {}
        }
    }
    // Expired Bronze rows leave the table, not the layers built from it.
    rows.removed_data &= !expiry;
    Ok(Some(rows))
}

/// What a commit did, from its log entry alone (no data file is read).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommitSummary {
    /// Data files added with `dataChange` (new rows).
    pub added: Vec<String>,
    /// Data files removed with `dataChange` (an overwrite or a rewrite).
    pub removed: Vec<String>,
    /// Transaction actions: `(app_id, version)`.
    pub txns: Vec<(String, i64)>,
}

impl CommitSummary {
    /// Whether a consumer of the table's rows must look at this commit; a
    /// compaction (`dataChange = false`) or a metadata change need not.
    pub fn has_data(&self) -> bool {
        !self.added.is_empty() || !self.removed.is_empty()
    }
}

/// The summary of the commit of `version`; `None` if its log entry is gone.
pub async fn commit_summary(
    tref: &TableRef,
    table: &DeltaTable,
    version: i64,
) -> Result<Option<CommitSummary>, LakeError> {
    let Some(actions) = commit_actions(tref, table, version).await? else {
        return Ok(None);
    };
    let mut out = CommitSummary::default();
    let mut expiry = false;
    for action in actions {
        match action {
            Action::Add(a) if a.data_change => out.added.push(a.path),
            Action::Remove(r) if r.data_change => out.removed.push(r.path),
            Action::Txn(t) => out.txns.push((t.app_id, t.version)),
            Action::CommitInfo(ci) => expiry |= is_expiry(&ci.info),
            _ => {}
        }
    }
    if expiry {
        out.removed.clear();
    }
    Ok(Some(out))
}

/// A retention expiry made by table maintenance (see [`crate::maintenance`]).
fn is_expiry(info: &std::collections::HashMap<String, serde_json::Value>) -> bool {
    info.get(crate::maintenance::MAINTENANCE_KEY)
        .and_then(|v| v.as_str())
        == Some("expire")
}

/// Reads only `columns` of one data file (the key columns of a commit, say).
pub async fn read_parquet_columns(
    store: &Arc<dyn ObjectStore>,
    relative: &str,
    columns: &[String],
) -> Result<Vec<RecordBatch>, LakeError> {
    let path = Path::from_url_path(relative).unwrap_or_else(|_| Path::from(relative));
    let bytes = store.get(&path).await?.bytes().await?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let schema = builder.parquet_schema();
    let roots: Vec<usize> = (0..schema.root_schema().get_fields().len())
        .filter(|i| {
            columns
                .iter()
                .any(|c| schema.root_schema().get_fields()[*i].name() == c)
        })
        .collect();
    let mask = parquet::arrow::ProjectionMask::roots(schema, roots);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(64 * 1024)
        .build()?;
    Ok(reader.collect::<Result<Vec<_>, _>>()?)
}

/// The application metadata (`medallion.*` keys and the like) that the commit
/// of `version` carries; `None` if that log entry is gone.
pub async fn commit_metadata(
    tref: &TableRef,
    table: &DeltaTable,
    version: i64,
) -> Result<Option<std::collections::HashMap<String, serde_json::Value>>, LakeError> {
    let Some(actions) = commit_actions(tref, table, version).await? else {
        return Ok(None);
    };
    Ok(actions.into_iter().find_map(|a| match a {
        Action::CommitInfo(ci) => Some(ci.info),
        _ => None,
    }))
}

/// The actions of the log entry of `version`; `None` if it is gone.
pub(crate) async fn commit_actions(
    tref: &TableRef,
    table: &DeltaTable,
    version: i64,
) -> Result<Option<Vec<Action>>, LakeError> {
    let Some(bytes) = table
        .log_store()
        .read_commit_entry(version as u64)
        .await
        .map_err(|e| LakeError::delta(tref, e))?
    else {
        return Ok(None);
    };
    get_actions(version as u64, &bytes)
        .map(Some)
        .map_err(|e| LakeError::delta(tref, e))
}

/// Every row of the table at its loaded version.
pub async fn read_all(tref: &TableRef, table: &DeltaTable) -> Result<Vec<RecordBatch>, LakeError> {
    let store = table.log_store().object_store(None);
    let schema = crate::writer::table_schema(tref, table)?;
    let mut out = Vec::new();
    for f in list_files(tref, table).await? {
        for b in read_parquet(&store, &f.path).await? {
            out.push(conform(b, &schema)?);
        }
    }
    Ok(out)
}

/// Shapes a batch read from one data file like the table: files written
/// before a column was added lack it (NULL, as Delta readers show it), and
/// column order follows the table.
pub fn conform(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, LakeError> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch);
    }
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        columns.push(match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => c.clone(),
            Some(c) => arrow::compute::cast(c, f.data_type())?,
            None => new_null_array(f.data_type(), batch.num_rows()),
        });
    }
    // Nullability follows the data: a column the file lacks is NULL there.
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .zip(&columns)
        .map(|(f, c)| {
            f.as_ref()
                .clone()
                .with_nullable(f.is_nullable() || c.null_count() > 0)
        })
        .collect();
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone())),
        columns,
    )?)
}

/// Reads one data file by its path relative to the table root.
pub async fn read_parquet(
    store: &Arc<dyn ObjectStore>,
    relative: &str,
) -> Result<Vec<RecordBatch>, LakeError> {
    let path = Path::from_url_path(relative).unwrap_or_else(|_| Path::from(relative));
    // Whole-file reads: our files are bounded by the writer's batch limits, and
    // one GET is cheaper than ranged reads on object stores.
    let bytes = store.get(&path).await?.bytes().await?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let rows = batch_rows(builder.metadata().row_groups().iter().map(|g| {
        (
            g.num_rows().max(0) as usize,
            g.total_byte_size().max(0) as usize,
        )
    }));
    let reader = builder.with_batch_size(rows).build()?;
    Ok(reader.collect::<Result<Vec<_>, _>>()?)
}

/// Rows per decoded batch so a batch holds about [`BATCH_BYTES`]: Bronze rows
/// are whole messages (up to a MiB each), and a reader filling one buffer
/// with a whole file grows it by doubling, each time into fresh pages the
/// kernel must zero (a sixth of the transform's CPU in profiles). At 1 MiB
/// (the transform's unit of work too) the allocator reuses the buffers
/// instead of asking the kernel for fresh ones: 8 MiB still left a tenth
/// of the transform's CPU in reallocation and page faults.
fn batch_rows(groups: impl Iterator<Item = (usize, usize)>) -> usize {
    let widest = groups
        .filter(|(rows, _)| *rows > 0)
        .map(|(rows, bytes)| bytes.div_ceil(rows))
        .max()
        .unwrap_or(1)
        .max(1);
    (BATCH_BYTES / widest).clamp(1, 64 * 1024)
}

const BATCH_BYTES: usize = 1 << 20;

/// Opens a table at a specific version (time travel); `None` if the table does not exist.
pub async fn open_at(
    lake: &Lake,
    tref: &TableRef,
    version: Option<i64>,
) -> Result<Option<DeltaTable>, LakeError> {
    let Some(mut table) = crate::writer::open_table(lake, tref).await? else {
        return Ok(None);
    };
    if let Some(v) = version {
        let latest = table.version().map(|v| v as i64).unwrap_or(-1);
        if v < 0 || v > latest {
            return Err(LakeError::NoSuchVersion {
                table: tref.to_string(),
                version: v,
                latest,
            });
        }
        table
            .load_version(v as u64)
            .await
            .map_err(|e| LakeError::delta(tref, e))?;
    }
    Ok(Some(table))
}

/// Opens a table as it was at `at`: its last version committed at or
/// before that instant. An instant before the table existed is an error
/// naming the first commit's time.
pub async fn open_as_of(
    lake: &Lake,
    tref: &TableRef,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<Option<DeltaTable>, LakeError> {
    let Some(mut table) = crate::writer::open_table(lake, tref).await? else {
        return Ok(None);
    };
    let as_of_error = |message: String| LakeError::AsOf {
        table: tref.to_string(),
        at: at.to_rfc3339(),
        message,
    };
    table
        .load_with_datetime(at)
        .await
        .map_err(|e| as_of_error(e.to_string()))?;
    // delta-rs answers version 0 for any earlier instant; like Spark, refuse
    // an instant before the table existed.
    if table.version() == Some(0)
        && let Some(first) = read_commit(tref, &table, 0)
            .await?
            .and_then(|c| c.timestamp)
        && first > at.timestamp_millis()
    {
        let created = chrono::DateTime::from_timestamp_millis(first).unwrap_or_default();
        return Err(as_of_error(format!(
            "the table was created at {}; ask for that time or later",
            created.to_rfc3339()
        )));
    }
    Ok(Some(table))
}

#[cfg(test)]
mod tests {
    use super::{BATCH_BYTES, batch_rows};

    #[test]
    fn batches_hold_about_one_mib_whatever_the_row_width() {
        // 1,000 messages of 200 KB: 5 rows a batch.
        assert_eq!(batch_rows([(1_000, 200_000_000)].into_iter()), 5);
        assert_eq!(batch_rows([(1_000, 100_000_000)].into_iter()), 10);
        // Narrow rows are capped at 64 Ki rows; the widest row group decides.
        assert_eq!(batch_rows([(100_000, 1_000_000)].into_iter()), 64 * 1024);
        assert_eq!(
            batch_rows([(100_000, 1_000_000), (10, 80 << 20)].into_iter()),
            1
        );
        // A row wider than the target still makes progress, one row at a time.
        assert_eq!(batch_rows([(1, 4 * BATCH_BYTES)].into_iter()), 1);
        assert_eq!(batch_rows(std::iter::empty()), 64 * 1024);
    }
}

/// One entry of a table's history, as its readers see it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HistoryEntry {
    pub version: i64,
    /// Commit time, ms since the epoch.
    pub timestamp_ms: Option<i64>,
    pub operation: Option<String>,
    /// Rows in the files added with `dataChange` (maintenance moves rows
    /// without changing them, and counts none). A remove carries no row
    /// count, so removals are counted in files.
    pub rows_added: u64,
    pub files_added: usize,
    pub files_removed: usize,
    /// The maintenance job (`compact`, `expire`, …), if it was one.
    pub maintenance: Option<String>,
}

/// The newest `limit` log entries still present, newest first.
pub async fn history(
    tref: &TableRef,
    table: &DeltaTable,
    limit: usize,
) -> Result<Vec<HistoryEntry>, LakeError> {
    let Some(latest) = table.version().map(|v| v as i64) else {
        return Ok(Vec::new());
    };
    let rows_of = |stats: &Option<String>| {
        stats
            .as_deref()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
            .and_then(|v| v["numRecords"].as_u64())
            .unwrap_or(0)
    };
    let mut out = Vec::new();
    let mut v = latest;
    while v >= 0 && out.len() < limit {
        // An erasure or log cleanup deletes old entries: history ends there.
        let Some(actions) = commit_actions(tref, table, v).await? else {
            break;
        };
        let mut e = HistoryEntry {
            version: v,
            timestamp_ms: None,
            operation: None,
            rows_added: 0,
            files_added: 0,
            files_removed: 0,
            maintenance: None,
        };
        for a in &actions {
            match a {
                Action::Add(a) => {
                    e.files_added += 1;
                    if a.data_change {
                        e.rows_added += rows_of(&a.stats);
                    }
                }
                Action::Remove(_) => e.files_removed += 1,
                Action::CommitInfo(ci) => {
                    e.timestamp_ms = ci.timestamp;
                    e.operation = ci.operation.clone();
                    e.maintenance = ci
                        .info
                        .get(crate::maintenance::MAINTENANCE_KEY)
                        .and_then(|j| j.as_str())
                        .map(str::to_string);
                }
                _ => {}
            }
        }
        out.push(e);
        v -= 1;
    }
    Ok(out)
}
