//! Keeping a streaming table healthy for years: small files merged,
//! checkpoints written and old log entries dropped (through table
//! properties), files no version within the retention needs deleted, and
//! Bronze rows older than the owner wants expired.
//!
//! Every commit made here carries `medallion.maintenance` in its commit info.
//! A compaction's actions have `dataChange = false`, so consumers of the
//! table's commits skip it like Delta readers do; an expiry removes data but
//! is marked so consumers do not mistake it for a rewrite of the table
//! ([`crate::CommitSummary`] leaves its removes out).

use std::collections::HashMap;
use std::time::Duration;

use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add};
use deltalake::protocol::DeltaOperation;
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, Path};
use futures::{StreamExt, TryStreamExt};
use medallion_spec::TableRef;
use object_store::ObjectStoreExt;
use parquet::schema::types::ColumnPath;
use tracing::debug;

use crate::LakeError;
use crate::writer::{table_schema, writer_properties};

/// Commit-info key marking a commit made by table maintenance; its value
/// names the job (`compact`, `expire`, `properties`).
pub const MAINTENANCE_KEY: &str = "medallion.maintenance";

/// How small files are merged.
///
/// Size-tiered: files are grouped by size class (a factor of `fanout` apart)
/// and merged only with files of their class once `fanout` of them wait, so
/// each row is rewritten about log_fanout(target / commit size) times in its
/// life rather than once per maintenance cycle, and the number of files below
/// the target stays under `fanout` per class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compaction {
    /// Files at or above half of this are left alone; merges stop at it.
    pub target_file_size: u64,
    /// Files of one size class merged at once (and the trigger: this many waiting).
    pub fanout: usize,
}

/// The table properties maintenance keeps in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Properties {
    /// A checkpoint every this many commits.
    pub checkpoint_interval: u64,
    /// Log entries older than this are removed (at checkpoints).
    pub log_retention: Duration,
    /// Removed files stay readable for time travel this long.
    pub deleted_file_retention: Duration,
    /// `delta.appendOnly` (Bronze, unless its rows expire).
    pub append_only: Option<bool>,
}

/// Table properties as Delta spells them.
impl Properties {
    fn wanted(&self) -> Vec<(String, String)> {
        let mut out = vec![
            (
                "delta.checkpointInterval".to_string(),
                self.checkpoint_interval.max(1).to_string(),
            ),
            (
                "delta.logRetentionDuration".to_string(),
                interval(self.log_retention),
            ),
            (
                "delta.deletedFileRetentionDuration".to_string(),
                interval(self.deleted_file_retention),
            ),
        ];
        if let Some(a) = self.append_only {
            out.push(("delta.appendOnly".to_string(), a.to_string()));
        }
        out
    }
}

fn interval(d: Duration) -> String {
    format!("interval {} seconds", d.as_secs().max(1))
}

/// What a compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compacted {
    pub version: Option<i64>,
    pub files_removed: usize,
    pub files_added: usize,
    pub bytes_rewritten: i64,
}

/// What a vacuum did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vacuumed {
    pub files_deleted: usize,
}

/// A table's shape, for operators.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TableHealth {
    pub version: i64,
    /// Data files of the current version.
    pub files: usize,
    pub bytes: i64,
    pub average_file_bytes: i64,
    /// Data files below half the compaction target.
    pub small_files: usize,
    /// Version of the last checkpoint, if any.
    pub checkpoint_version: Option<i64>,
    /// Log entries a reader replays on top of the last checkpoint.
    pub log_since_checkpoint: i64,
    /// Files on storage the current version does not reference (kept for
    /// time travel until the retention passes, or orphans of a crash).
    pub unreferenced_files: usize,
    pub unreferenced_bytes: i64,
}

/// One active data file as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStat {
    pub path: String,
    pub size: u64,
    pub modified: i64,
}

/// Groups of files to merge, each group becoming one file.
pub fn plan(files: &[FileStat], c: &Compaction) -> Vec<Vec<FileStat>> {
    let fanout = c.fanout.max(2);
    let small = c.target_file_size / 2;
    let mut classes: HashMap<u32, Vec<&FileStat>> = HashMap::new();
    for f in files.iter().filter(|f| f.size < small) {
        classes
            .entry(size_class(f.size, fanout as u64))
            .or_default()
            .push(f);
    }
    let mut keys: Vec<u32> = classes.keys().copied().collect();
    keys.sort_unstable();
    let mut out = Vec::new();
    for k in keys {
        let mut class = classes.remove(&k).unwrap_or_default();
        if class.len() < fanout {
            continue;
        }
        // Oldest first: rows stay roughly in commit order within a file.
        class.sort_by(|a, b| (a.modified, &a.path).cmp(&(b.modified, &b.path)));
        for chunk in class.chunks(fanout) {
            if chunk.len() < fanout {
                break;
            }
            // A chunk is at most `fanout` files of one class: below the
            // target unless the class touches it, then split by size.
            let mut bin: Vec<FileStat> = Vec::new();
            let mut bytes = 0;
            for f in chunk {
                if !bin.is_empty() && bytes + f.size > c.target_file_size {
                    if bin.len() > 1 {
                        out.push(std::mem::take(&mut bin));
                    }
                    bin.clear();
                    bytes = 0;
                }
                bytes += f.size;
                bin.push((*f).clone());
            }
            if bin.len() > 1 {
                out.push(bin);
            }
        }
    }
    out
}

/// Size class: files within a factor `fanout` of each other share one.
fn size_class(size: u64, fanout: u64) -> u32 {
    let mut class = 0;
    let mut bound = 64 * 1024;
    while size >= bound && class < 32 {
        bound = bound.saturating_mul(fanout);
        class += 1;
    }
    class
}

/// Commit info key of a compaction's map of where rows went.
pub const MOVED_KEY: &str = "medallion.moved";

/// The rows of data file `from` are rows `offset..offset + rows` of `to`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Moved {
    pub from: String,
    pub to: String,
    pub offset: usize,
    pub rows: usize,
}

fn maintenance_properties(job: &str) -> CommitProperties {
    CommitProperties::default().with_metadata([(MAINTENANCE_KEY.to_string(), job.into())])
}

impl From<&crate::writer::FileInfo> for FileStat {
    fn from(f: &crate::writer::FileInfo) -> FileStat {
        FileStat {
            path: f.path.clone(),
            size: f.size.max(0) as u64,
            modified: f.modified,
        }
    }
}

async fn active(tref: &TableRef, table: &DeltaTable) -> Result<Vec<FileStat>, LakeError> {
    Ok(crate::writer::list_files(tref, table)
        .await?
        .iter()
        .map(FileStat::from)
        .collect())
}

/// Merges small files as [`plan`] groups them, one commit per call. Rows,
/// their values and the table's versions for time travel are unchanged; a
/// crash before the commit leaves only unreferenced files for vacuum.
pub async fn compact(
    tref: &TableRef,
    table: &mut DeltaTable,
    c: &Compaction,
) -> Result<Compacted, LakeError> {
    let delta = |e| LakeError::delta(tref, e);
    let snapshot = table.snapshot().map_err(delta)?;
    if !snapshot.metadata().partition_columns().is_empty() {
        return Ok(Compacted::default());
    }
    let listed = crate::writer::list_files(tref, table).await?;
    let files: Vec<FileStat> = listed.iter().map(FileStat::from).collect();
    let bins = plan(&files, c);
    if bins.is_empty() {
        return Ok(Compacted::default());
    }
    let store = table.log_store().object_store(None);
    let schema = table_schema(tref, table)?;
    let by_path: HashMap<&str, &deltalake::kernel::Remove> = listed
        .iter()
        .map(|f| (f.path.as_str(), &f.remove))
        .collect();
    let mut actions: Vec<Action> = Vec::new();
    let mut out = Compacted::default();
    // Where each input file's rows went, so a consumer reading an old commit
    // by its files still finds its rows once vacuum deleted them.
    let mut moved: Vec<Moved> = Vec::new();
    for bin in &bins {
        let mut inputs: Vec<(String, usize)> = Vec::with_capacity(bin.len());
        // One input file in memory at a time: a bin can hold up to the
        // target size, many times that once decoded.
        let mut writer: Option<RecordBatchWriter> = None;
        for f in bin {
            let batches = crate::read_parquet(&store, &f.path)
                .await?
                .into_iter()
                .map(|b| crate::commits::conform(b, &schema))
                .collect::<Result<Vec<_>, _>>()?;
            if writer.is_none() {
                // Dictionary encoding decided from the first file, as the
                // stages decide it per commit.
                let base = writer_properties(&[]);
                let plain = crate::dictionary::near_unique_columns(&batches, |col| {
                    base.dictionary_enabled(&ColumnPath::from(col))
                });
                writer = Some(
                    RecordBatchWriter::for_table(table)
                        .map_err(delta)?
                        .with_writer_properties(writer_properties(&plain)),
                );
            }
            let w = writer.as_mut().expect("created above");
            let mut rows = 0;
            for b in batches.into_iter().filter(|b| b.num_rows() > 0) {
                rows += b.num_rows();
                w.write(b).await.map_err(delta)?;
            }
            inputs.push((f.path.clone(), rows));
        }
        let Some(mut writer) = writer else { continue };
        let adds: Vec<Add> = writer.flush().await.map_err(delta)?;
        // Without a target size the writer makes one file of a bin, rows in
        // the order written; should it ever make more, the map is left out
        // (an old commit of those inputs is then unreadable after vacuum,
        // as without compaction's map).
        if let [add] = adds.as_slice() {
            let mut offset = 0;
            for (from, rows) in inputs {
                moved.push(Moved {
                    from,
                    to: add.path.clone(),
                    offset,
                    rows,
                });
                offset += rows;
            }
        }
        medallion_runtime::failpoint::hit("lake.compact.before_commit");
        for mut add in adds {
            add.data_change = false;
            out.files_added += 1;
            actions.push(Action::Add(add));
        }
        for f in bin {
            if let Some(r) = by_path.get(f.path.as_str()) {
                out.files_removed += 1;
                out.bytes_rewritten += f.size as i64;
                // Not data: consumers of commits skip this one.
                let mut r = (*r).clone();
                r.data_change = false;
                actions.push(Action::Remove(r));
            }
        }
    }
    let operation = DeltaOperation::Optimize {
        predicate: None,
        target_size: c.target_file_size as i64,
    };
    // A concurrent commit that removed one of these files (an overwrite)
    // makes delta-rs refuse this one; the next cycle plans again.
    // `with_metadata` replaces the map: both keys at once.
    let properties = CommitProperties::default().with_metadata([
        (MAINTENANCE_KEY.to_string(), "compact".into()),
        (
            MOVED_KEY.to_string(),
            serde_json::to_value(&moved).expect("plain data"),
        ),
    ]);
    let finalized = CommitBuilder::from(properties)
        .with_actions(actions)
        .build(Some(snapshot), table.log_store(), operation)
        .await
        .map_err(delta)?;
    out.version = Some(finalized.version() as i64);
    table.state = Some(finalized.snapshot());
    Ok(out)
}

/// Sets the properties that differ from `wanted`, in one metadata commit.
/// Returns whether a commit was made.
///
/// delta-rs counts every file as read by a metadata commit, so any commit
/// that removes files in between (Gold merges, several a second) refuses
/// it: it is retried from a fresh snapshot, which leaves a window of
/// milliseconds.
pub async fn ensure_properties(
    tref: &TableRef,
    table: &mut DeltaTable,
    wanted: &Properties,
) -> Result<bool, LakeError> {
    let delta = |e| LakeError::delta(tref, e);
    let mut attempt = 0;
    loop {
        let current = table
            .snapshot()
            .map_err(delta)?
            .metadata()
            .configuration()
            .clone();
        let changes: HashMap<String, String> = wanted
            .wanted()
            .into_iter()
            .filter(|(k, v)| current.get(k) != Some(v))
            .collect();
        if changes.is_empty() {
            return Ok(false);
        }
        match table
            .clone()
            .set_tbl_properties()
            .with_properties(changes)
            .with_commit_properties(maintenance_properties("properties"))
            .await
        {
            Ok(updated) => {
                *table = updated;
                return Ok(true);
            }
            Err(e) if attempt >= 8 => return Err(delta(e)),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                table.update_state().await.map_err(delta)?;
            }
        }
    }
}

/// Removes whole files whose every row has `column` before `cutoff`
/// (microseconds since the epoch), as one Delta delete. Files straddling
/// the cutoff wait until all their rows are old: retention is a floor.
pub async fn expire(
    tref: &TableRef,
    table: &mut DeltaTable,
    column: &str,
    cutoff: chrono::DateTime<chrono::Utc>,
) -> Result<usize, LakeError> {
    let delta = |e| LakeError::delta(tref, e);
    let snapshot = table.snapshot().map_err(delta)?;
    let expired: Vec<deltalake::kernel::Remove> = snapshot
        .snapshot()
        .file_views(table.log_store().as_ref(), None)
        .try_filter_map(|f| {
            let newest = f.stats().and_then(|s| max_timestamp(&s, column));
            futures::future::ready(Ok(match newest {
                Some(t) if t < cutoff => Some(f.remove_action(true)),
                _ => None,
            }))
        })
        .try_collect()
        .await
        .map_err(delta)?;
    if expired.is_empty() {
        return Ok(0);
    }
    let n = expired.len();
    let operation = DeltaOperation::Delete {
        predicate: Some(format!("{column} < '{}'", cutoff.to_rfc3339())),
    };
    let finalized = CommitBuilder::from(maintenance_properties("expire"))
        .with_actions(expired.into_iter().map(Action::Remove).collect())
        .build(Some(snapshot), table.log_store(), operation)
        .await
        .map_err(delta)?;
    table.state = Some(finalized.snapshot());
    Ok(n)
}

/// The largest value of a timestamp column in a file's statistics.
fn max_timestamp(stats: &str, column: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let v: serde_json::Value = serde_json::from_str(stats).ok()?;
    let s = v.get("maxValues")?.get(column)?.as_str()?;
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// Where vacuum records its last run (a table's own state, beside it).
pub const LAST_VACUUM: &str = "_medallion/last_vacuum.json";

/// Deletes the files no version within the retention needs: files removed
/// from the table more than `retention` ago, and files no version references
/// (what a crash between writing a file and committing it leaves) once they
/// are older than `orphan_age` (a younger one may be a commit in flight).
///
/// Unlike Delta's VACUUM this writes no log entries: delta-rs's start and
/// end commits count every file of the table as read, so they fail against
/// any concurrent commit that removes files (Gold's merges, several a
/// second), and a stream's table would never be vacuumed. The run is
/// recorded in [`LAST_VACUUM`] instead.
pub async fn vacuum(
    tref: &TableRef,
    table: &DeltaTable,
    retention: Duration,
    orphan_age: Duration,
) -> Result<Vacuumed, LakeError> {
    let delta = |e| LakeError::delta(tref, e);
    let now = chrono::Utc::now().timestamp_millis();
    let removed_before = now - retention.as_millis() as i64;
    let orphan_before = now - orphan_age.as_millis() as i64;
    let state = table.snapshot().map_err(delta)?;
    let normal = |p: &str| {
        Path::from_url_path(p)
            .unwrap_or_else(|_| Path::from(p))
            .to_string()
    };
    let active: std::collections::HashSet<String> = active(tref, table)
        .await?
        .iter()
        .map(|f| normal(&f.path))
        .collect();
    // Removed within the retention: time travel still reads them.
    let mut recent = std::collections::HashSet::new();
    let mut expired = std::collections::HashSet::new();
    let mut tombstones = state.all_tombstones(table.log_store().as_ref());
    while let Some(t) = tombstones.next().await {
        let t = t.map_err(delta)?;
        let path = normal(&t.path());
        if t.deletion_timestamp().unwrap_or(now) > removed_before {
            recent.insert(path);
        } else {
            expired.insert(path);
        }
    }
    let store = table.log_store().object_store(None);
    let mut doomed = Vec::new();
    let mut listing = store.list(None);
    while let Some(meta) = listing.next().await {
        let meta = meta?;
        let p = meta.location.to_string();
        if !is_data_file(&p) {
            continue;
        }
        if active.contains(&p) || recent.contains(&p) {
            continue;
        }
        if expired.contains(&p) || meta.last_modified.timestamp_millis() <= orphan_before {
            doomed.push(meta.location);
        }
    }
    let mut files_deleted = 0;
    for chunk in doomed.chunks(256) {
        let deleted: Vec<_> = store
            .delete_stream(futures::stream::iter(chunk.to_vec().into_iter().map(Ok)).boxed())
            .collect()
            .await;
        for d in deleted {
            match d {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => files_deleted += 1,
                Err(e) => return Err(e.into()),
            }
        }
        medallion_runtime::failpoint::hit("lake.vacuum.between_deletes");
    }
    let record = serde_json::json!({"at_ms": now, "version": table.version(), "files_deleted": files_deleted});
    store
        .put(
            &Path::from(LAST_VACUUM),
            object_store::PutPayload::from(record.to_string().into_bytes()),
        )
        .await?;
    debug!(table = %tref, files = files_deleted, "vacuumed");
    Ok(Vacuumed { files_deleted })
}

/// Whether a path in a table's directory can be a data file: the log,
/// `_medallion/` state and hidden files never are.
pub(crate) fn is_data_file(p: &str) -> bool {
    !(p.starts_with('_') || p.starts_with('.') || p.contains("/_") || p.contains("/."))
}

/// When the table was last vacuumed (ms), from [`LAST_VACUUM`].
pub async fn last_vacuum(table: &DeltaTable) -> Option<i64> {
    let store = table.log_store().object_store(None);
    let bytes = store
        .get(&Path::from(LAST_VACUUM))
        .await
        .ok()?
        .bytes()
        .await
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("at_ms")?
        .as_i64()
}

/// Files, sizes, log length and unreferenced bytes of a table.
pub async fn health(
    tref: &TableRef,
    table: &DeltaTable,
    c: &Compaction,
) -> Result<TableHealth, LakeError> {
    let files = active(tref, table).await?;
    let version = table.version().map(|v| v as i64).unwrap_or(-1);
    let store = table.log_store().object_store(None);
    let checkpoint_version = match store.get(&Path::from("_delta_log/_last_checkpoint")).await {
        Ok(r) => r
            .bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("version").and_then(|v| v.as_i64())),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let referenced: std::collections::HashSet<&str> =
        files.iter().map(|f| f.path.as_str()).collect();
    let mut unreferenced_files = 0;
    let mut unreferenced_bytes = 0;
    let mut listing = store.list(None);
    while let Some(meta) = listing.next().await {
        let meta = meta?;
        let p = meta.location.as_ref();
        if !is_data_file(p) {
            continue;
        }
        let decoded = percent_decoded(p);
        if !referenced.contains(p) && !referenced.contains(decoded.as_str()) {
            unreferenced_files += 1;
            unreferenced_bytes += meta.size as i64;
        }
    }
    let bytes: i64 = files.iter().map(|f| f.size as i64).sum();
    Ok(TableHealth {
        version,
        files: files.len(),
        bytes,
        average_file_bytes: if files.is_empty() {
            0
        } else {
            bytes / files.len() as i64
        },
        small_files: files
            .iter()
            .filter(|f| f.size < c.target_file_size / 2)
            .count(),
        checkpoint_version,
        log_since_checkpoint: version - checkpoint_version.unwrap_or(-1),
        unreferenced_files,
        unreferenced_bytes,
    })
}

/// What the newest commits of a table say about it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RecentCommits {
    /// The newest commit that changed rows (not maintenance): version and
    /// time in ms. Freshness is measured from it: a compaction or a vacuum
    /// does not make stale data fresh.
    pub last_data: Option<(i64, Option<i64>)>,
    pub last_compaction_ms: Option<i64>,
}

/// Walks back at most `max_back` log entries from the table's version.
pub async fn recent_commits(
    tref: &TableRef,
    table: &DeltaTable,
    max_back: i64,
) -> Result<RecentCommits, LakeError> {
    let mut out = RecentCommits::default();
    let Some(latest) = table.version().map(|v| v as i64) else {
        return Ok(out);
    };
    let mut v = latest;
    while v >= 0 && latest - v < max_back {
        let Some(actions) = crate::commits::commit_actions(tref, table, v).await? else {
            break;
        };
        let mut data = false;
        let mut job = None;
        let mut at = None;
        for a in &actions {
            match a {
                Action::Add(a) if a.data_change => data = true,
                Action::Remove(r) if r.data_change => data = true,
                Action::CommitInfo(ci) => {
                    at = ci.timestamp;
                    job = ci
                        .info
                        .get(MAINTENANCE_KEY)
                        .and_then(|j| j.as_str())
                        .map(str::to_string);
                }
                _ => {}
            }
        }
        match job.as_deref() {
            Some("compact") if out.last_compaction_ms.is_none() => out.last_compaction_ms = at,
            None if data && out.last_data.is_none() => out.last_data = Some((v, at)),
            _ => {}
        }
        if out.last_data.is_some() && out.last_compaction_ms.is_some() {
            break;
        }
        v -= 1;
    }
    Ok(out)
}

fn percent_decoded(p: &str) -> String {
    Path::from_url_path(p)
        .map(|p| p.to_string())
        .unwrap_or_else(|_| p.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn f(path: &str, size: u64, modified: i64) -> FileStat {
        FileStat {
            path: path.into(),
            size,
            modified,
        }
    }

    const C: Compaction = Compaction {
        target_file_size: 128 << 20,
        fanout: 4,
    };

    #[test]
    fn waits_until_a_class_has_fanout_files() {
        let files: Vec<FileStat> = (0..3).map(|i| f(&format!("{i}"), 10_000, i)).collect();
        assert!(plan(&files, &C).is_empty());
        let files: Vec<FileStat> = (0..9).map(|i| f(&format!("{i}"), 10_000, i)).collect();
        let bins = plan(&files, &C);
        assert_eq!(bins.len(), 2);
        assert_eq!(
            bins[0].iter().map(|f| f.modified).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
    }

    #[test]
    fn big_files_are_left_alone_and_classes_do_not_mix() {
        let mut files: Vec<FileStat> = (0..8)
            .map(|i| f(&format!("big{i}"), 100 << 20, i))
            .collect();
        files.extend((0..3).map(|i| f(&format!("s{i}"), 10_000, i)));
        files.extend((0..3).map(|i| f(&format!("m{i}"), 2 << 20, i)));
        assert!(plan(&files, &C).is_empty());
    }

    proptest! {
        /// Every planned file is small, in one bin only, bins stay at or
        /// below the target (or are two files that each were small), and
        /// after merging what is left below the target is bounded per class.
        #[test]
        fn bins_are_disjoint_bounded_and_leave_few_small_files(
            sizes in proptest::collection::vec(1u64..(80 << 20), 0..200),
        ) {
            let files: Vec<FileStat> = sizes.iter().enumerate().map(|(i, s)| f(&format!("{i}"), *s, i as i64)).collect();
            let bins = plan(&files, &C);
            let mut seen = std::collections::HashSet::new();
            for bin in &bins {
                prop_assert!(bin.len() >= 2 && bin.len() <= C.fanout);
                let total: u64 = bin.iter().map(|f| f.size).sum();
                prop_assert!(total <= C.target_file_size);
                for x in bin {
                    prop_assert!(x.size < C.target_file_size / 2);
                    prop_assert!(seen.insert(x.path.clone()));
                }
            }
            let mut left: HashMap<u32, usize> = HashMap::new();
            for x in files.iter().filter(|x| x.size < C.target_file_size / 2 && !seen.contains(&x.path)) {
                *left.entry(size_class(x.size, C.fanout as u64)).or_default() += 1;
            }
            // A class keeps fewer than `fanout` files, unless files too big to
            // share a bin were set aside.
            for (class, n) in left {
                let big = (64u64 * 1024).saturating_mul((C.fanout as u64).pow(class)) >= C.target_file_size / (C.fanout as u64);
                prop_assert!(n < C.fanout || big, "class {class} keeps {n}");
            }
        }
    }
}
