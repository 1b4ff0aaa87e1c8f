//! Finding the rows of a data file that compaction merged into a newer file
//! and vacuum then deleted: a consumer catching up on old commits (a stage
//! that fell behind, a full refresh reading Bronze from version 1) reads
//! each commit by its files, and those files are gone once the time-travel
//! retention passed. Every compaction commit records where each input
//! file's rows went ([`Moved`], in its commit info under [`MOVED_KEY`]); a
//! file merged twice is followed through both.
//!
//! The compaction commits of a table are indexed once per process, from the
//! oldest version asked about to the newest, so a replay over thousands of
//! versions reads each log entry once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use arrow::array::RecordBatch;
use deltalake::kernel::Action;
use deltalake::{DeltaTable, Path};
use futures::TryStreamExt;
use medallion_spec::TableRef;
use object_store::ObjectStoreExt;
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::arrow::arrow_reader::{RowSelection, RowSelector};
// Deprecated upstream in favour of a hand-written `AsyncFileReader`; it still
// does what this needs (ranged reads of only the row groups selected).
#[allow(deprecated)]
use parquet::arrow::async_reader::ParquetObjectReader;

use crate::LakeError;
use crate::commits::commit_actions;
use crate::maintenance::{MOVED_KEY, Moved};

/// Compaction moves seen in one table's log between two versions.
#[derive(Default)]
struct MoveIndex {
    /// Versions `lo..=hi` have been read (empty while `lo > hi`).
    lo: i64,
    hi: i64,
    by_from: HashMap<String, Moved>,
}

fn indexes() -> &'static Mutex<HashMap<String, Arc<tokio::sync::Mutex<MoveIndex>>>> {
    static INDEXES: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<MoveIndex>>>>> =
        OnceLock::new();
    INDEXES.get_or_init(Default::default)
}

fn normal(p: &str) -> String {
    Path::from_url_path(p)
        .unwrap_or_else(|_| Path::from(p))
        .to_string()
}

async fn scan(
    tref: &TableRef,
    table: &DeltaTable,
    index: &mut MoveIndex,
    from: i64,
    to: i64,
) -> Result<(), LakeError> {
    for v in from..=to {
        let Some(actions) = commit_actions(tref, table, v).await? else {
            continue;
        };
        for a in actions {
            if let Action::CommitInfo(ci) = a
                && let Some(m) = ci.info.get(MOVED_KEY)
            {
                let moves: Vec<Moved> = serde_json::from_value(m.clone()).unwrap_or_default();
                for m in moves {
                    index.by_from.insert(normal(&m.from), m);
                }
            }
        }
    }
    Ok(())
}

/// The rows file `path` (added at `version`) held, read from where
/// compaction put them.
pub(crate) async fn read_moved(
    tref: &TableRef,
    table: &DeltaTable,
    version: i64,
    path: &str,
) -> Result<Vec<RecordBatch>, LakeError> {
    let current = table.version().map(|v| v as i64).unwrap_or(-1);
    let key = table.table_url().to_string();
    let index = indexes()
        .lock()
        .expect("index map")
        .entry(key)
        .or_insert_with(|| {
            Arc::new(tokio::sync::Mutex::new(MoveIndex {
                lo: i64::MAX,
                hi: i64::MIN,
                ..Default::default()
            }))
        })
        .clone();
    let mut index = index.lock().await;
    // A file is moved by a commit after the one that added it.
    if index.lo > index.hi {
        scan(tref, table, &mut index, version + 1, current).await?;
        (index.lo, index.hi) = (version + 1, current);
    } else {
        if version + 1 < index.lo {
            let lo = index.lo;
            scan(tref, table, &mut index, version + 1, lo - 1).await?;
            index.lo = version + 1;
        }
        if current > index.hi {
            let hi = index.hi;
            scan(tref, table, &mut index, hi + 1, current).await?;
            index.hi = current;
        }
    }
    // Follow the file through every compaction that moved it.
    let (mut file, mut offset, mut rows) = (normal(path), 0usize, None::<usize>);
    let store = table.log_store().object_store(None);
    for _ in 0..64 {
        let Some(m) = index.by_from.get(&file) else {
            return Err(LakeError::RowsGone {
                table: tref.to_string(),
                version,
                file: path.to_string(),
            });
        };
        file = normal(&m.to);
        offset += m.offset;
        let rows_here = *rows.get_or_insert(m.rows);
        match read_rows(&store, &file, offset, rows_here).await {
            Err(e) if e.is_not_found() => continue,
            r => return r,
        }
    }
    Err(LakeError::RowsGone {
        table: tref.to_string(),
        version,
        file: path.to_string(),
    })
}

/// Rows `offset..offset + rows` of a data file, fetching only the row
/// groups that hold them.
async fn read_rows(
    store: &Arc<dyn deltalake::ObjectStore>,
    file: &str,
    offset: usize,
    rows: usize,
) -> Result<Vec<RecordBatch>, LakeError> {
    // A file merged again and vacuumed: known here, where the error is
    // still the store's own NotFound (the reader wraps it).
    let meta = store.head(&Path::from(file)).await?;
    #[allow(deprecated)]
    let reader =
        ParquetObjectReader::new(store.clone(), Path::from(file)).with_file_size(meta.size);
    let builder = ParquetRecordBatchStreamBuilder::new(reader).await?;
    let total = builder.metadata().file_metadata().num_rows().max(0) as usize;
    let mut selectors = vec![RowSelector::skip(offset), RowSelector::select(rows)];
    if offset + rows < total {
        selectors.push(RowSelector::skip(total - offset - rows));
    }
    let stream = builder
        .with_row_selection(RowSelection::from(selectors))
        .build()?;
    Ok(stream.try_collect().await?)
}
