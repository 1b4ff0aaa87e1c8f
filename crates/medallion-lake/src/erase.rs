//! Erasing a data subject from a table (`medallion forget`): rewriting the
//! current files that hold the subject's rows, then removing every trace of
//! the older versions — data files and the Delta log entries whose
//! statistics (min/max per column) can name the subject.
//!
//! Two kinds of rewrite:
//! - rows removed ([`RowEdit::Drop`]): a Silver, quarantine or Gold style
//!   delete, committed with `dataChange = true` so consumers of the commit
//!   rebuild what they derived from the table;
//! - rows kept in place ([`RowEdit::InPlace`]): Bronze, where a message
//!   keeps its row and only its payload loses the subject's records. Row
//!   positions do not move, so the commit records a [`Moved`] per file
//!   (like compaction) and is `dataChange = false`: a replay reading an old
//!   commit by its files finds the rewritten rows where the old ones were.

use std::collections::HashSet;

use arrow::array::RecordBatch;
use deltalake::DeltaTable;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add};
use deltalake::protocol::DeltaOperation;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use futures::StreamExt;
use medallion_spec::TableRef;
use object_store::ObjectStore;
use object_store::path::Path;
use tracing::{debug, warn};

use crate::LakeError;
use crate::maintenance::{MOVED_KEY, Moved, is_data_file};
use crate::writer::{list_files, table_schema, writer_properties};

/// Commit info key naming the erasure request a rewrite belongs to.
pub const ERASURE_KEY: &str = "medallion.erasure";

/// How a rewrite changes a table's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowEdit {
    /// Rows are removed: a data change.
    Drop,
    /// Every row stays where it is; only values change.
    InPlace,
}

/// What [`rewrite`] did.
#[derive(Debug, Default, Clone)]
pub struct Rewritten {
    /// The commit, if any file held the subject.
    pub version: Option<i64>,
    pub files_rewritten: usize,
    pub bytes_written: u64,
    /// What `edit` counted (rows or records removed) in the files rewritten
    /// by the commit that landed.
    pub removed_count: u64,
    /// The files the commit removed (they hold the subject: delete them).
    pub removed: Vec<String>,
}

/// Rewrites every current file in which `edit` changes a batch, in one
/// commit marked with `erasure_id`. `edit` returns `None` for a batch it
/// leaves as is, else the replacement and how much it removed (summed into
/// [`Rewritten::removed_count`]; a retried attempt counts afresh); for
/// [`RowEdit::InPlace`] a replacement must keep the row count. A concurrent commit that removed one of the same files makes
/// Delta refuse this one: the table is read again and the rewrite redone.
pub async fn rewrite<F>(
    tref: &TableRef,
    table: &mut DeltaTable,
    erasure_id: &str,
    mode: RowEdit,
    mut edit: F,
) -> Result<Rewritten, LakeError>
where
    F: FnMut(&RecordBatch) -> Result<Option<(RecordBatch, u64)>, LakeError>,
{
    let delta = |e| LakeError::delta(tref, e);
    let mut attempt = 0u32;
    loop {
        let snapshot = table.snapshot().map_err(delta)?.clone();
        let store = table.log_store().object_store(None);
        let schema = table_schema(tref, table)?;
        let mut out = Rewritten::default();
        let mut actions: Vec<Action> = Vec::new();
        let mut moved: Vec<Moved> = Vec::new();
        for f in list_files(tref, table).await? {
            let batches = crate::read_parquet(&store, &f.path)
                .await?
                .into_iter()
                .map(|b| crate::commits::conform(b, &schema))
                .collect::<Result<Vec<_>, _>>()?;
            let mut changed = false;
            let mut kept = Vec::with_capacity(batches.len());
            for b in batches {
                match edit(&b)? {
                    Some((n, count)) => {
                        out.removed_count += count;
                        if mode == RowEdit::InPlace && n.num_rows() != b.num_rows() {
                            return Err(LakeError::Erase {
                                table: tref.to_string(),
                                message: "an in-place rewrite changed the number of rows".into(),
                            });
                        }
                        changed = true;
                        kept.push(n);
                    }
                    None => kept.push(b),
                }
            }
            if !changed {
                continue;
            }
            let rows: usize = kept.iter().map(|b| b.num_rows()).sum();
            let adds: Vec<Add> = if rows == 0 {
                Vec::new()
            } else {
                let mut w = RecordBatchWriter::for_table(table)
                    .map_err(delta)?
                    .with_writer_properties(writer_properties(&[]));
                for b in kept.into_iter().filter(|b| b.num_rows() > 0) {
                    w.write(b).await.map_err(delta)?;
                }
                w.flush().await.map_err(delta)?
            };
            if mode == RowEdit::InPlace {
                match adds.as_slice() {
                    [add] => moved.push(Moved {
                        from: f.path.clone(),
                        to: add.path.clone(),
                        offset: 0,
                        rows,
                    }),
                    _ => {
                        return Err(LakeError::Erase {
                            table: tref.to_string(),
                            message: format!(
                                "an in-place rewrite of {} wrote {} files",
                                f.path,
                                adds.len()
                            ),
                        });
                    }
                }
            }
            let data_change = mode == RowEdit::Drop;
            for mut add in adds {
                out.bytes_written += add.size.max(0) as u64;
                add.data_change = data_change;
                actions.push(Action::Add(add));
            }
            let mut r = f.remove.clone();
            r.data_change = data_change;
            actions.push(Action::Remove(r));
            out.removed.push(f.path.clone());
            out.files_rewritten += 1;
        }
        if actions.is_empty() {
            return Ok(out);
        }
        medallion_runtime::failpoint::hit("lake.erase.before_commit");
        let mut metadata = vec![(ERASURE_KEY.to_string(), erasure_id.into())];
        if mode == RowEdit::InPlace {
            metadata.push((
                MOVED_KEY.to_string(),
                serde_json::to_value(&moved).expect("plain data"),
            ));
        }
        let operation = DeltaOperation::Delete {
            predicate: Some(format!("medallion forget {erasure_id}")),
        };
        match CommitBuilder::from(CommitProperties::default().with_metadata(metadata))
            .with_actions(actions)
            .build(Some(&snapshot), table.log_store(), operation)
            .await
        {
            Ok(done) => {
                out.version = Some(done.version() as i64);
                table.state = Some(done.snapshot());
                debug!(table = %tref, files = out.files_rewritten, "erasure rewrite committed");
                return Ok(out);
            }
            Err(e) if attempt < 8 => {
                attempt += 1;
                warn!(table = %tref, error = %e, attempt, "erasure rewrite refused; reading the table again");
                tokio::time::sleep(std::time::Duration::from_millis(50 * attempt as u64)).await;
                table.update_state().await.map_err(delta)?;
            }
            Err(e) => return Err(delta(e)),
        }
    }
}

/// The newest commit at or before the current version that carries
/// `erasure_id` (a rewrite made before a crash), looking back through the
/// log entries that still exist.
pub async fn find_erasure(
    tref: &TableRef,
    table: &DeltaTable,
    erasure_id: &str,
) -> Result<Option<i64>, LakeError> {
    let mut v = table.version().map(|v| v as i64).unwrap_or(-1);
    while v >= 0 {
        let Some(info) = crate::commits::commit_metadata(tref, table, v).await? else {
            return Ok(None);
        };
        if info.get(ERASURE_KEY).and_then(|x| x.as_str()) == Some(erasure_id) {
            return Ok(Some(v));
        }
        v -= 1;
    }
    Ok(None)
}

/// Deletes `paths` (relative to the table), ignoring those already gone.
pub async fn delete_files(
    store: &dyn ObjectStore,
    paths: impl IntoIterator<Item = String>,
) -> Result<u64, LakeError> {
    let doomed: Vec<Path> = paths.into_iter().map(|p| normal_path(&p)).collect();
    let mut deleted = 0;
    for chunk in doomed.chunks(256) {
        let results: Vec<_> = store
            .delete_stream(futures::stream::iter(chunk.to_vec().into_iter().map(Ok)).boxed())
            .collect()
            .await;
        for r in results {
            match r {
                Ok(_) => deleted += 1,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(deleted)
}

fn normal_path(p: &str) -> Path {
    Path::from_url_path(p).unwrap_or_else(|_| Path::from(p))
}

/// The data files in the table's directory that the current version does not
/// reference (older versions', and orphans of crashed writes).
pub async fn unreferenced_files(
    tref: &TableRef,
    table: &DeltaTable,
) -> Result<Vec<(String, i64)>, LakeError> {
    let current: HashSet<String> = list_files(tref, table)
        .await?
        .iter()
        .map(|f| normal_path(&f.path).to_string())
        .collect();
    let store = table.log_store().object_store(None);
    let mut out = Vec::new();
    let mut listing = store.list(None);
    while let Some(meta) = listing.next().await {
        let meta = meta?;
        let p = meta.location.to_string();
        if is_data_file(&p) && !current.contains(&p) {
            out.push((p, meta.last_modified.timestamp_millis()));
        }
    }
    Ok(out)
}

/// Files the table's log records as removed (safe to delete at any age:
/// no version from now on names them).
pub async fn tombstones(tref: &TableRef, table: &DeltaTable) -> Result<HashSet<String>, LakeError> {
    let snapshot = table.snapshot().map_err(|e| LakeError::delta(tref, e))?;
    let mut out = HashSet::new();
    let mut t = snapshot.all_tombstones(table.log_store().as_ref());
    while let Some(x) = t.next().await {
        let x = x.map_err(|e| LakeError::delta(tref, e))?;
        out.insert(normal_path(x.path().as_ref()).to_string());
    }
    Ok(out)
}

/// The newest version of the table that added or removed rows (maintenance
/// and erasure rewrites of Bronze are not data).
pub async fn last_data_version(tref: &TableRef, table: &DeltaTable) -> Result<i64, LakeError> {
    let mut v = table.version().map(|v| v as i64).unwrap_or(-1);
    while v >= 0 {
        match crate::commits::commit_summary(tref, table, v).await? {
            Some(c) if c.has_data() => return Ok(v),
            Some(_) => v -= 1,
            None => break,
        }
    }
    Ok(v)
}

/// What [`seal`] removed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sealed {
    pub log_entries_deleted: u64,
    pub files_deleted: u64,
}

/// Ends the table's history before `at`: writes a checkpoint of version
/// `at`, deletes every log entry and checkpoint older than it (their file
/// statistics can hold the erased values), and deletes the data files only
/// those versions referenced. Time travel before `at` is no longer possible.
///
/// A file no version references and no commit removed (a crash's
/// leftover) is deleted only once older than `in_flight`: a younger one may
/// belong to a commit in flight, and is left for vacuum.
pub async fn seal(
    tref: &TableRef,
    table: &DeltaTable,
    at: i64,
    in_flight: std::time::Duration,
) -> Result<Sealed, LakeError> {
    let delta = |e| LakeError::delta(tref, e);
    let mut at_table = table.clone();
    at_table.load_version(at as u64).await.map_err(delta)?;
    deltalake::checkpoints::create_checkpoint(&at_table, None)
        .await
        .map_err(delta)?;
    let store = table.log_store().object_store(None);
    // Referenced from `at` on: the files of version `at` and every file a
    // later commit added (listed after the checkpoint, so a commit that
    // lands meanwhile is seen).
    let mut latest = table.clone();
    latest.update_state().await.map_err(delta)?;
    let mut referenced: HashSet<String> = list_files(tref, &at_table)
        .await?
        .iter()
        .map(|f| normal_path(&f.path).to_string())
        .collect();
    let newest = latest.version().map(|v| v as i64).unwrap_or(at);
    for v in (at + 1)..=newest {
        if let Some(actions) = crate::commits::commit_actions(tref, &latest, v).await? {
            for a in actions {
                if let Action::Add(a) = a {
                    referenced.insert(normal_path(&a.path).to_string());
                }
            }
        }
    }
    // Files the log removed up to `at`: no version from `at` on needs
    // them, however young (the rewrite's own inputs among them).
    let mut removed: HashSet<String> = HashSet::new();
    let mut v = at;
    while v >= 0 {
        let Some(actions) = crate::commits::commit_actions(tref, &latest, v).await? else {
            break;
        };
        for a in actions {
            if let Action::Remove(r) = a {
                removed.insert(normal_path(&r.path).to_string());
            }
        }
        v -= 1;
    }
    // Log entries older than `at`.
    let mut old_log = Vec::new();
    let mut listing = store.list(Some(&Path::from("_delta_log")));
    while let Some(meta) = listing.next().await {
        let meta = meta?;
        let name = meta.location.filename().unwrap_or_default().to_string();
        if let Some(v) = log_entry_version(&name)
            && v < at
        {
            old_log.push(meta.location.to_string());
        }
    }
    let log_entries_deleted = delete_files(store.as_ref(), old_log).await?;
    let young = chrono::Utc::now().timestamp_millis() - in_flight.as_millis() as i64;
    let doomed: Vec<String> = unreferenced_files(tref, &latest)
        .await?
        .into_iter()
        .filter(|(p, modified)| {
            !referenced.contains(p) && (*modified < young || removed.contains(p))
        })
        .map(|(p, _)| p)
        .collect();
    let files_deleted = delete_files(store.as_ref(), doomed).await?;
    Ok(Sealed {
        log_entries_deleted,
        files_deleted,
    })
}

/// The version a `_delta_log` file belongs to: commits, checkpoints (single
/// or multi-part), checksums and compacted logs; `None` for the rest
/// (`_last_checkpoint`).
fn log_entry_version(name: &str) -> Option<i64> {
    let digits: String = name.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.len() != 20 {
        return None;
    }
    let rest = &name[20..];
    let known = rest == ".json"
        || rest == ".crc"
        || (rest.starts_with(".checkpoint") && rest.ends_with(".parquet"))
        || (rest.starts_with('.') && rest.ends_with(".compacted.json"));
    if !known {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::log_entry_version;

    #[test]
    fn log_entries_are_recognised_by_name() {
        assert_eq!(log_entry_version("00000000000000000007.json"), Some(7));
        assert_eq!(
            log_entry_version("00000000000000000010.checkpoint.parquet"),
            Some(10)
        );
        assert_eq!(
            log_entry_version("00000000000000000010.checkpoint.0000000001.0000000002.parquet"),
            Some(10)
        );
        assert_eq!(log_entry_version("00000000000000000003.crc"), Some(3));
        assert_eq!(log_entry_version("_last_checkpoint"), None);
        assert_eq!(log_entry_version("00000000000000000003.json.tmp"), None);
    }
}
