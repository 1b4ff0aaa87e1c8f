//! The Gold tables of one product: writers, in-memory groups, which file
//! holds which bucket, and how far each table is in the Silver chain.

use std::sync::Arc;

use arrow::array::RecordBatch;
use medallion_lake::{FileInfo, Lake, TableOptions, TableWriter, read_all, read_parquet};
use medallion_spec::{Contract, TableRef};
use medallion_stage::Partitions;
use tracing::info;

use crate::APP_ID;
use crate::merge::Ahead;
use crate::state::{BUCKETS, GoldState, bucket_of};

/// One Gold table: its writer, its in-memory groups, and which data file
/// holds each bucket.
pub(crate) struct GoldTable {
    pub writer: TableWriter,
    pub state: GoldState,
    pub files: Vec<Vec<FileInfo>>,
    /// Last Silver version merged (the table's transaction version).
    pub processed: i64,
    /// The table was built under a different spec (its columns differ from
    /// the plan's): the next Silver version rebuilds it whole instead of
    /// merging into rows of another shape.
    pub rebuild: bool,
    /// Gold version the groups and files reflect.
    pub seen: i64,
    /// Partials computed before their turn.
    pub ahead: Option<Ahead>,
}

/// A product's Gold tables.
pub(crate) struct ProductTables {
    pub tables: Vec<GoldTable>,
    /// The partitions of the last pass: when they change, other replicas
    /// may have committed since, so the tables are read again.
    pub partitions: Option<Partitions>,
}

impl GoldTable {
    /// Catches up with commits other replicas made: each rewrote whole
    /// buckets, so a bucket's groups are replaced by its new file's rows.
    pub async fn sync(&mut self) -> Result<(), String> {
        let before = self.writer.version();
        let mut commits = Vec::new();
        for v in (self.seen + 1)..=before {
            if let Some(c) =
                medallion_lake::commit_summary(self.writer.table_ref(), self.writer.table(), v)
                    .await
                    .map_err(|e| e.to_string())?
            {
                commits.push((v, c));
            }
        }
        commits.extend(self.writer.follow().await.map_err(|e| e.to_string())?);
        self.processed = self.writer.txn_version().unwrap_or(-1);
        let current = self.writer.version();
        if current <= self.seen {
            return Ok(());
        }
        let tref = self.writer.table_ref().clone();
        let table = self.writer.table().clone();
        let store = table.log_store().object_store(None);
        let listed = medallion_lake::list_files(&tref, &table)
            .await
            .map_err(|e| e.to_string())?;
        for (v, c) in commits {
            if v <= self.seen {
                continue;
            }
            for removed in &c.removed {
                for (b, files) in self.files.iter_mut().enumerate() {
                    if files.iter().any(|f| &f.path == removed) {
                        files.retain(|f| &f.path != removed);
                        self.state.clear_bucket(b);
                    }
                }
            }
            for added in &c.added {
                let batches = read_parquet(&store, added)
                    .await
                    .map_err(|e| e.to_string())?;
                let Some(b) = batches.iter().find(|b| b.num_rows() > 0) else {
                    continue;
                };
                let bucket = bucket_of(&state_key(&self.state, b));
                self.state.clear_bucket(bucket);
                for b in &batches {
                    self.state.load_rows(b);
                }
                // A file rewritten again by a later commit is not listed:
                // that commit's removal and addition follow.
                self.files[bucket] = listed
                    .iter()
                    .filter(|f| &f.path == added)
                    .cloned()
                    .collect();
            }
        }
        self.seen = current;
        self.ahead = None;
        Ok(())
    }
}

/// Which files hold which bucket: every row of a file belongs to one bucket.
pub(crate) async fn bucket_files(
    writer: &TableWriter,
    state: &GoldState,
) -> Result<Vec<Vec<FileInfo>>, String> {
    let mut out = vec![Vec::new(); BUCKETS];
    let store = writer.table().log_store().object_store(None);
    for f in writer.files().await.map_err(|e| e.to_string())? {
        let batches = read_parquet(&store, &f.path)
            .await
            .map_err(|e| e.to_string())?;
        let Some(b) = batches.iter().find(|b| b.num_rows() > 0) else {
            continue;
        };
        let key = state_key(state, b);
        out[bucket_of(&key)].push(f);
    }
    Ok(out)
}

fn state_key(state: &GoldState, b: &RecordBatch) -> Vec<u8> {
    let cols: Vec<arrow::array::ArrayRef> = state
        .plan
        .keys
        .iter()
        .map(|k| {
            b.column(state.table_schema.index_of(&k.name).expect("key column"))
                .slice(0, 1)
        })
        .collect();
    let conv = arrow::row::RowConverter::new(
        state
            .plan
            .keys
            .iter()
            .map(|k| arrow::row::SortField::new(k.data_type.clone()))
            .collect(),
    )
    .expect("row-encodable");
    conv.convert_columns(&cols)
        .expect("row-encodable")
        .row(0)
        .as_ref()
        .to_vec()
}

/// Commit metadata naming the query a Gold table's rows were computed by.
pub(crate) const GOLD_SQL_KEY: &str = "medallion.gold_sql";

pub(crate) fn normalized_sql(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub(crate) async fn open_tables(
    lake: &Lake,
    contract: &Arc<Contract>,
) -> Result<ProductTables, String> {
    let mut out = Vec::new();
    for plan in &contract.gold {
        let tref = TableRef::gold(contract.domain(), &plan.name);
        let state = GoldState::new(plan.clone());
        let options = TableOptions {
            description: Some(format!(
                "{} — maintained incrementally from silver.{}.{}",
                plan.sql.trim(),
                contract.domain(),
                contract.name()
            )),
            append_only: false,
            partition_columns: vec![],
            unique_columns: vec![],
        };
        let writer =
            TableWriter::open_or_create(lake, &tref, state.table_schema.clone(), APP_ID, &options)
                .await
                .map_err(|e| e.to_string())?;
        let same_shape = writer.schema().fields().len() == state.table_schema.fields().len()
            && writer
                .schema()
                .fields()
                .iter()
                .zip(state.table_schema.fields())
                .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
        // Same columns but another query (a new WHERE, a changed expression):
        // the stored groups were computed differently, so merging into them
        // would mix two definitions.
        let built_by = match writer.table().version() {
            Some(v) if v > 0 => medallion_lake::commit_metadata(&tref, writer.table(), v as i64)
                .await
                .map_err(|e| e.to_string())?
                .and_then(|m| {
                    m.get(GOLD_SQL_KEY)
                        .and_then(|s| s.as_str().map(String::from))
                }),
            _ => None,
        };
        let same_query = built_by.is_none_or(|sql| sql == normalized_sql(&plan.sql));
        let same_shape = same_shape && same_query;
        let mut t = GoldTable {
            processed: writer.txn_version().unwrap_or(-1),
            seen: writer.version(),
            writer,
            state,
            files: vec![Vec::new(); BUCKETS],
            rebuild: !same_shape,
            ahead: None,
        };
        if same_shape {
            let all = read_all(&tref, t.writer.table())
                .await
                .map_err(|e| e.to_string())?;
            for b in &all {
                t.state.load_rows(b);
            }
            t.files = bucket_files(&t.writer, &t.state).await?;
        } else {
            info!(table = %tref, "gold table was built under another spec; rebuilding it from silver on the next silver version");
        }
        info!(table = %tref, groups = t.state.groups(), silver_version = t.processed, "gold state loaded");
        out.push(t);
    }
    Ok(ProductTables {
        tables: out,
        partitions: None,
    })
}
