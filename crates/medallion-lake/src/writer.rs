//! Idempotent commits.
//!
//! Every commit carries a Delta `txn` action `(app_id, version)` where the
//! version is a position in the writer's input (a stream sequence, or the
//! source table's version). delta-rs records the action but does not refuse an
//! old or repeated version, so the writer does: it knows the table's last
//! transaction version and refuses anything at or below it. Replaying input
//! after a crash therefore never duplicates rows.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use deltalake::kernel::engine::arrow_conversion::{TryIntoArrow, TryIntoKernel};
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::{Action, MetadataExt as _, Remove, StructType, Transaction};
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::parquet::schema::types::ColumnPath;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use futures::TryStreamExt;
use medallion_spec::TableRef;
use tracing::warn;

use crate::{Lake, LakeError};

/// How long an append keeps trying while other writers win every race for
/// the next version. Blind appends (no schema change) do not conflict with
/// one another, and the conflict check still refuses one whose transaction
/// another writer advanced, so losing races is no reason to give up: up to
/// `MAX_PARTITIONS` ingest units append to one Bronze table, and delta-rs'
/// 16 attempts ran out under that load — the unit then rewrote its data
/// files and went not-ready until its retry landed. Each round starts again
/// from the writer's snapshot, so every commit that landed meanwhile is
/// checked against this one. Short enough that a stage stopping mid-commit
/// still drains within a pod's grace period.
const APPEND_PATIENCE: std::time::Duration = std::time::Duration::from_secs(20);

/// A pause between rounds, random so writers that keep colliding spread out.
fn race_pause(round: u32) -> std::time::Duration {
    let cap_ms = (10u64 << round.min(6)).min(500);
    let jitter = (uuid::Uuid::new_v4().as_u128() % u128::from(cap_ms)) as u64;
    std::time::Duration::from_millis(cap_ms / 2 + jitter / 2)
}

/// How a commit changes the table.
#[derive(Debug, Clone)]
pub enum WriteMode {
    /// Add the rows.
    Append,
    /// Replace every row (a full refresh); history keeps the old versions.
    Overwrite,
    /// Add the rows and remove these files, in one commit (Gold rewrites the
    /// files of the groups a batch touched).
    Replace(Vec<Remove>),
}

/// What happened to a commit request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Committed as this table version.
    Committed(i64),
    /// Refused: the table already holds input up to this transaction version.
    AlreadyCommitted(i64),
}

/// Options set on new tables.
#[derive(Debug, Clone, Default)]
pub struct TableOptions {
    pub description: Option<String>,
    /// Bronze is append-only: Delta refuses any commit that removes data.
    pub append_only: bool,
    pub partition_columns: Vec<String>,
    /// Columns whose values are (nearly) all distinct (a product's key, a raw
    /// payload): written without dictionary encoding, which for them costs a
    /// hash and a copy per value and is then abandoned for plain encoding.
    pub unique_columns: Vec<String>,
}

/// Writes one table, remembering its transaction version for `app_id`.
pub struct TableWriter {
    tref: TableRef,
    table: DeltaTable,
    schema: SchemaRef,
    app_id: String,
    txn: Option<i64>,
    /// Transaction versions of other app ids this writer commits under
    /// (ingest's keyed slots), read on first use.
    other_txns: HashMap<String, Option<i64>>,
    properties: WriterProperties,
    added: Vec<String>,
    storage_options: HashMap<String, String>,
}

impl std::fmt::Debug for TableWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableWriter")
            .field("table", &self.tref.sql_name())
            .field("app_id", &self.app_id)
            .field("txn", &self.txn)
            .finish()
    }
}

pub(crate) fn writer_properties(unique_columns: &[String]) -> WriterProperties {
    unique_columns
        .iter()
        .fold(
            WriterProperties::builder()
                .set_compression(Compression::ZSTD(
                    ZstdLevel::try_new(1).expect("zstd level 1 is valid"),
                ))
                .set_max_row_group_row_count(Some(128 * 1024))
                // A column with many distinct values (timestamps, amounts) gives
                // up on its dictionary at this size; the smaller the limit, the
                // fewer values are hashed in vain first. Low-cardinality columns
                // (countries, currencies) stay far below it.
                .set_dictionary_page_size_limit(256 << 10),
            |b, c| b.set_column_dictionary_enabled(ColumnPath::from(c.as_str()), false),
        )
        .build()
}

/// Opens a table, or `None` when nothing has been committed there yet.
pub async fn open_table(lake: &Lake, tref: &TableRef) -> Result<Option<DeltaTable>, LakeError> {
    let mut table = match DeltaTableBuilder::from_url(lake.table_url(tref))
        .map_err(|e| LakeError::delta(tref, e))?
        .with_storage_options(lake.storage_options().clone())
        .build()
    {
        Ok(t) => t,
        Err(e) if is_missing(&e) => return Ok(None),
        Err(e) => return Err(LakeError::delta(tref, e)),
    };
    match table.load().await {
        Ok(()) => Ok(Some(table)),
        Err(e) if is_missing(&e) => Ok(None),
        Err(e) => Err(LakeError::delta(tref, e)),
    }
}

/// "No table here yet": delta-rs reports it as `NotATable`, or (for a local
/// directory that does not exist) as the kernel's invalid-location error,
/// whose type is not re-exported, hence the match on its message.
fn is_missing(e: &DeltaTableError) -> bool {
    match e {
        DeltaTableError::NotATable(_) => true,
        DeltaTableError::KernelError(k) => k.to_string().starts_with("Invalid table location"),
        _ => false,
    }
}

/// The last transaction version `app_id` committed to the loaded table
/// (a stage's cursor in the table it writes).
pub async fn txn_version(
    tref: &TableRef,
    table: &DeltaTable,
    app_id: &str,
) -> Result<Option<i64>, LakeError> {
    table
        .snapshot()
        .map_err(|e| LakeError::delta(tref, e))?
        .transaction_version(table.log_store().as_ref(), app_id)
        .await
        .map_err(|e| LakeError::delta(tref, e))
}

/// The Arrow schema of a loaded table.
pub fn table_schema(tref: &TableRef, table: &DeltaTable) -> Result<SchemaRef, LakeError> {
    let snapshot = table.snapshot().map_err(|e| LakeError::delta(tref, e))?;
    let kernel = snapshot.schema();
    let arrow: Schema = kernel
        .as_ref()
        .try_into_arrow()
        .map_err(|e| LakeError::Schema {
            table: tref.to_string(),
            message: e.to_string(),
        })?;
    Ok(Arc::new(arrow))
}

impl TableWriter {
    /// Opens the table, creating it with `schema` if it does not exist yet.
    pub async fn open_or_create(
        lake: &Lake,
        tref: &TableRef,
        schema: SchemaRef,
        app_id: impl Into<String>,
        options: &TableOptions,
    ) -> Result<TableWriter, LakeError> {
        let table = match open_table(lake, tref).await? {
            Some(t) => t,
            None => create_table(lake, tref, &schema, options).await?,
        };
        let properties = writer_properties(&options.unique_columns);
        Self::from_table(lake, tref.clone(), table, app_id.into(), properties).await
    }

    /// Opens an existing table; `None` if it was never created.
    pub async fn open(
        lake: &Lake,
        tref: &TableRef,
        app_id: impl Into<String>,
    ) -> Result<Option<TableWriter>, LakeError> {
        match open_table(lake, tref).await? {
            Some(t) => Ok(Some(
                Self::from_table(lake, tref.clone(), t, app_id.into(), writer_properties(&[]))
                    .await?,
            )),
            None => Ok(None),
        }
    }

    async fn from_table(
        lake: &Lake,
        tref: TableRef,
        table: DeltaTable,
        app_id: String,
        properties: WriterProperties,
    ) -> Result<TableWriter, LakeError> {
        let schema = table_schema(&tref, &table)?;
        let mut w = TableWriter {
            tref,
            table,
            schema,
            app_id,
            txn: None,
            other_txns: HashMap::new(),
            properties,
            added: Vec::new(),
            storage_options: lake.storage_options().clone(),
        };
        w.txn = w.read_txn().await?;
        Ok(w)
    }

    async fn read_txn(&self) -> Result<Option<i64>, LakeError> {
        self.read_txn_of(&self.app_id).await
    }

    async fn read_txn_of(&self, app_id: &str) -> Result<Option<i64>, LakeError> {
        txn_version(&self.tref, &self.table, app_id).await
    }

    /// The last transaction version committed under another app id.
    pub async fn txn_version_of(&mut self, app_id: &str) -> Result<Option<i64>, LakeError> {
        if app_id == self.app_id {
            return Ok(self.txn);
        }
        if let Some(v) = self.other_txns.get(app_id) {
            return Ok(*v);
        }
        let v = self.read_txn_of(app_id).await?;
        self.other_txns.insert(app_id.to_string(), v);
        Ok(v)
    }

    /// Appends `batches` as one commit carrying a transaction action per
    /// `(app_id, version)` — one writer advancing several cursors at once —
    /// unless any of them is already at or past its version.
    pub async fn commit_txns(
        &mut self,
        batches: &[RecordBatch],
        txns: &[(String, i64)],
        metadata: &[(&str, serde_json::Value)],
    ) -> Result<CommitOutcome, LakeError> {
        for (app, v) in txns {
            if let Some(done) = self.txn_version_of(app).await?
                && *v <= done
            {
                return Ok(CommitOutcome::AlreadyCommitted(done));
            }
        }
        let result = self
            .try_commit(&[batches.to_vec()], txns, WriteMode::Append, metadata)
            .await;
        match &result {
            Ok(_) => {
                for (app, v) in txns {
                    if *app == self.app_id {
                        self.txn = Some(*v);
                    } else {
                        self.other_txns.insert(app.clone(), Some(*v));
                    }
                }
            }
            Err(_) => {
                let _ = self.refresh().await;
            }
        }
        result
    }

    pub fn table_ref(&self) -> &TableRef {
        &self.tref
    }

    pub fn table(&self) -> &DeltaTable {
        &self.table
    }

    /// The table's Arrow schema: batches must match it.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The last transaction version committed for this writer's app id.
    pub fn txn_version(&self) -> Option<i64> {
        self.txn
    }

    /// The table's current Delta version.
    pub fn version(&self) -> i64 {
        self.table.version().map(|v| v as i64).unwrap_or(-1)
    }

    pub fn app_id(&self) -> &str {
        &self.app_id
    }

    /// Reloads the table and the transaction version from storage: after a
    /// failed commit the outcome is unknown (the log entry may have landed).
    pub async fn refresh(&mut self) -> Result<(), LakeError> {
        self.table
            .update_state()
            .await
            .map_err(|e| LakeError::delta(&self.tref, e))?;
        self.schema = table_schema(&self.tref, &self.table)?;
        self.txn = self.read_txn().await?;
        self.other_txns.clear();
        Ok(())
    }

    /// Moves to the table's latest version, reading only the commits other
    /// writers made since (not the whole log, as [`refresh`](Self::refresh)
    /// does for the transaction versions): their summaries, oldest first.
    pub async fn follow(&mut self) -> Result<Vec<(i64, crate::CommitSummary)>, LakeError> {
        let before = self.version();
        self.table
            .update_state()
            .await
            .map_err(|e| LakeError::delta(&self.tref, e))?;
        let after = self.version();
        let mut out = Vec::new();
        for v in (before + 1)..=after {
            let Some(s) = crate::commit_summary(&self.tref, &self.table, v).await? else {
                continue;
            };
            for (app, t) in &s.txns {
                if *app == self.app_id {
                    self.txn = Some(*t);
                } else if let Some(known) = self.other_txns.get_mut(app) {
                    *known = Some(*t);
                }
            }
            out.push((v, s));
        }
        if after != before {
            self.schema = table_schema(&self.tref, &self.table)?;
        }
        Ok(out)
    }

    /// Active data files (relative paths).
    pub async fn files(&self) -> Result<Vec<FileInfo>, LakeError> {
        list_files(&self.tref, &self.table).await
    }

    /// Commits `batches` tagged with transaction version `txn`, unless the
    /// table already has `txn` or a later one.
    pub async fn commit(
        &mut self,
        batches: &[RecordBatch],
        txn: i64,
        mode: WriteMode,
        metadata: &[(&str, serde_json::Value)],
    ) -> Result<CommitOutcome, LakeError> {
        self.commit_files(&[batches.to_vec()], txn, mode, metadata)
            .await
    }

    /// Like [`commit`](Self::commit), writing each group to its own data file
    /// (in order: [`added_files`](Self::added_files) lists their paths after
    /// the commit), so a caller can later replace one group's file alone.
    pub async fn commit_files(
        &mut self,
        groups: &[Vec<RecordBatch>],
        txn: i64,
        mode: WriteMode,
        metadata: &[(&str, serde_json::Value)],
    ) -> Result<CommitOutcome, LakeError> {
        if let Some(done) = self.txn
            && txn <= done
        {
            return Ok(CommitOutcome::AlreadyCommitted(done));
        }
        let txns = [(self.app_id.clone(), txn)];
        let result = self.try_commit(groups, &txns, mode, metadata).await;
        if result.is_ok() {
            self.txn = Some(txn);
        }
        if result.is_err() {
            // The log entry may or may not have been written; learn which before
            // the caller retries, so a retry can never commit twice.
            let _ = self.refresh().await;
        }
        result
    }

    /// Paths (relative to the table root) of the files the last commit added, one per group.
    pub fn added_files(&self) -> &[String] {
        &self.added
    }

    async fn try_commit(
        &mut self,
        groups: &[Vec<RecordBatch>],
        txns: &[(String, i64)],
        mode: WriteMode,
        metadata: &[(&str, serde_json::Value)],
    ) -> Result<CommitOutcome, LakeError> {
        let tref = self.tref.clone();
        let delta = |e| LakeError::delta(&tref, e);
        let mut actions: Vec<Action> = Vec::new();
        let mut added = Vec::new();
        let evolve_to = match self.schema_change(groups, &mode) {
            // No rows to break: an emptied table (a full refresh's first
            // commit) takes the new spec's schema with its first rows.
            Err(LakeError::Schema { .. })
                if list_files(&self.tref, &self.table).await?.is_empty() =>
            {
                self.schema_change(groups, &WriteMode::Overwrite)?
            }
            r => r?,
        };
        for batches in groups {
            if batches.iter().all(|b| b.num_rows() == 0) {
                continue;
            }
            let writer = match &evolve_to {
                None => RecordBatchWriter::for_table(&self.table),
                Some((arrow, _)) => RecordBatchWriter::try_new(
                    self.table.table_url().as_str(),
                    arrow.clone(),
                    None,
                    Some(self.storage_options.clone()),
                ),
            };
            let plain = crate::dictionary::near_unique_columns(batches, |c| {
                self.properties.dictionary_enabled(&ColumnPath::from(c))
            });
            let properties = if plain.is_empty() {
                self.properties.clone()
            } else {
                plain
                    .iter()
                    .fold(self.properties.clone().into_builder(), |b, c| {
                        b.set_column_dictionary_enabled(ColumnPath::from(c.as_str()), false)
                    })
                    .build()
            };
            let mut writer = writer.map_err(delta)?.with_writer_properties(properties);
            for b in batches.iter().filter(|b| b.num_rows() > 0) {
                writer.write(b.clone()).await.map_err(delta)?;
            }
            for add in writer.flush().await.map_err(delta)? {
                added.push(add.path.clone());
                actions.push(Action::Add(add));
            }
        }
        let append = matches!(mode, WriteMode::Append);
        let save_mode = match mode {
            WriteMode::Append => SaveMode::Append,
            WriteMode::Overwrite => {
                for f in list_files(&self.tref, &self.table).await? {
                    actions.push(Action::Remove(f.remove));
                }
                SaveMode::Overwrite
            }
            WriteMode::Replace(removes) => {
                actions.extend(removes.into_iter().map(Action::Remove));
                SaveMode::Append
            }
        };
        let snapshot = self.table.snapshot().map_err(delta)?;
        if let Some((_, kernel)) = &evolve_to {
            let metadata = snapshot
                .metadata()
                .clone()
                .with_schema(kernel)
                .map_err(|e| LakeError::Schema {
                    table: tref.to_string(),
                    message: e.to_string(),
                })?;
            actions.push(Action::Metadata(metadata));
        }
        let partition_by = {
            let cols: Vec<String> = snapshot.metadata().partition_columns().to_vec();
            (!cols.is_empty()).then_some(cols)
        };
        let operation = DeltaOperation::Write {
            mode: save_mode,
            partition_by,
            predicate: None,
        };
        let mut app_metadata: HashMap<String, serde_json::Value> = HashMap::new();
        if let Some((app, txn)) = txns.first() {
            app_metadata.insert("medallion.app".into(), app.clone().into());
            app_metadata.insert("medallion.txn".into(), (*txn).into());
        }
        for (k, v) in metadata {
            app_metadata.insert((*k).into(), v.clone());
        }
        // Each app id's transaction is also the fence: delta-rs refuses this
        // commit (ConcurrentTransaction) if a commit that landed since our
        // snapshot carries one of them — another replica advanced the same
        // cursor, so these rows may already be there.
        let properties = CommitProperties::default()
            .with_application_transactions(
                txns.iter()
                    .map(|(app, v)| Transaction::new(app, *v))
                    .collect::<Vec<_>>(),
            )
            .with_metadata(app_metadata);
        let started = std::time::Instant::now();
        let mut round = 0u32;
        let finalized = loop {
            let attempt = CommitBuilder::from(properties.clone())
                .with_actions(actions.clone())
                .build(Some(snapshot), self.table.log_store(), operation.clone())
                .await;
            match attempt {
                Err(DeltaTableError::Transaction {
                    source: TransactionError::MaxCommitAttempts(_),
                }) if append && started.elapsed() < APPEND_PATIENCE => {
                    round += 1;
                    warn!(table = %tref, round, "append lost every race for a version; trying again");
                    tokio::time::sleep(race_pause(round)).await;
                }
                Err(e) => {
                    if round > 0 {
                        warn!(
                            table = %tref,
                            rounds = round,
                            seconds = started.elapsed().as_secs_f64(),
                            error = %e,
                            "append failed after losing races for a version"
                        );
                    }
                    return Err(delta(e));
                }
                Ok(done) => break done,
            }
        };
        let version = finalized.version();
        self.table.state = Some(finalized.snapshot());
        if let Some((arrow, _)) = evolve_to {
            self.schema = arrow;
        }
        self.added = added;
        Ok(CommitOutcome::Committed(version as i64))
    }
}

impl TableWriter {
    /// The schema the table moves to with this commit, if the batches differ
    /// from it (compared as Delta types, so Arrow-only differences such as
    /// timestamp units do not count). A spec may add nullable columns at any
    /// time; anything else (a removed, retyped or newly required column) only
    /// with a full refresh, which rewrites every row under the new schema.
    fn schema_change(
        &self,
        groups: &[Vec<RecordBatch>],
        mode: &WriteMode,
    ) -> Result<Option<(SchemaRef, StructType)>, LakeError> {
        let Some(incoming) = groups
            .iter()
            .flatten()
            .find(|b| b.num_rows() > 0)
            .map(|b| b.schema())
        else {
            return Ok(None);
        };
        if incoming.fields() == self.schema.fields() {
            return Ok(None);
        }
        let Ok(new): Result<StructType, _> = incoming.as_ref().try_into_kernel() else {
            // Not expressible as Delta types as is; the writer casts to the table schema.
            return Ok(None);
        };
        let current = self
            .table
            .snapshot()
            .map_err(|e| LakeError::delta(&self.tref, e))?
            .schema();
        if new == *current.as_ref() {
            return Ok(None);
        }
        if !matches!(mode, WriteMode::Overwrite) {
            let mut breaking = Vec::new();
            for f in current.fields() {
                match new.field(f.name()) {
                    None => breaking.push(format!("column {} is missing", f.name())),
                    Some(n) if n.data_type() != f.data_type() => breaking.push(format!(
                        "column {} changes type from {} to {}",
                        f.name(),
                        f.data_type(),
                        n.data_type()
                    )),
                    Some(n) if !n.is_nullable() && f.is_nullable() => {
                        breaking.push(format!("column {} becomes required", f.name()))
                    }
                    Some(_) => {}
                }
            }
            for n in new.fields() {
                if current.field(n.name()).is_none() && !n.is_nullable() {
                    breaking.push(format!("new column {} is required", n.name()));
                }
            }
            if !breaking.is_empty() {
                return Err(LakeError::Schema {
                    table: self.tref.to_string(),
                    message: format!(
                        "{}; existing rows cannot take this change: rebuild the table with a full refresh (`medallion replay`)",
                        breaking.join(", ")
                    ),
                });
            }
        }
        Ok(Some((incoming, new)))
    }
}

/// One active data file of a table.
#[derive(Debug, Clone)]
pub struct FileInfo {
    pub path: String,
    pub size: i64,
    pub num_records: Option<usize>,
    /// When the file was written (milliseconds since the epoch).
    pub modified: i64,
    pub remove: Remove,
}

pub async fn list_files(tref: &TableRef, table: &DeltaTable) -> Result<Vec<FileInfo>, LakeError> {
    let snapshot = table.snapshot().map_err(|e| LakeError::delta(tref, e))?;
    snapshot
        .snapshot()
        .file_views(table.log_store().as_ref(), None)
        .map_ok(|f| FileInfo {
            path: f.path().to_string(),
            size: f.size(),
            num_records: f.num_records(),
            modified: f.modification_time(),
            remove: f.remove_action(true),
        })
        .try_collect()
        .await
        .map_err(|e| LakeError::delta(tref, e))
}

async fn create_table(
    lake: &Lake,
    tref: &TableRef,
    schema: &SchemaRef,
    options: &TableOptions,
) -> Result<DeltaTable, LakeError> {
    let kernel: StructType = schema
        .as_ref()
        .try_into_kernel()
        .map_err(|e| LakeError::Schema {
            table: tref.to_string(),
            message: e.to_string(),
        })?;
    let mut config: HashMap<String, Option<String>> = HashMap::new();
    if options.append_only {
        config.insert("delta.appendOnly".into(), Some("true".into()));
    }
    let mut builder = deltalake::operations::create::CreateBuilder::new()
        .with_location(lake.table_url(tref).to_string())
        .with_storage_options(lake.storage_options().clone())
        .with_table_name(tref.sql_name())
        .with_columns(kernel.fields().cloned())
        .with_partition_columns(options.partition_columns.clone())
        .with_configuration(config)
        // Another writer creating the same table at the same moment is fine.
        .with_save_mode(SaveMode::Ignore);
    if let Some(d) = &options.description {
        builder = builder.with_comment(d.clone());
    }
    builder.await.map_err(|e| LakeError::delta(tref, e))
}

/// Upstream tables a stage polls: loaded once, then brought up to date
/// incrementally (only new log entries are read) instead of re-opened.
#[derive(Default)]
pub struct TableCache {
    tables: HashMap<TableRef, DeltaTable>,
}

impl TableCache {
    /// The table at its latest version; `None` while it does not exist.
    pub async fn latest(
        &mut self,
        lake: &Lake,
        tref: &TableRef,
    ) -> Result<Option<DeltaTable>, LakeError> {
        if let Some(t) = self.tables.get_mut(tref) {
            t.update_state()
                .await
                .map_err(|e| LakeError::delta(tref, e))?;
            return Ok(Some(t.clone()));
        }
        let Some(t) = open_table(lake, tref).await? else {
            return Ok(None);
        };
        self.tables.insert(tref.clone(), t.clone());
        Ok(Some(t))
    }
}
