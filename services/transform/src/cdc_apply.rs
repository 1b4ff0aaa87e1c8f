//! Applies a step's changes to a change-feed Silver table: SCD1 (the latest
//! row per key) or SCD2 (every version, `__start_at` / `__end_at`).
//!
//! Copy-on-write by key bucket: every row belongs to one of [`BUCKETS`]
//! buckets (a hash of its key), a commit rewrites the files holding the
//! buckets whose keys changed, one new file per bucket, and removes the old
//! ones in the same Delta commit (so time travel shows the table as of any
//! version). The result depends only on the set of changes, never on their
//! arrival order: for SCD1 the highest sequence wins (deletes are
//! remembered as tombstones, `spec.cdc.keep_deletes_for`, so a late older
//! insert does not bring a key back); for SCD2 a key's history is its
//! changes sorted by sequence, each version ending where the next change
//! (a delete included) begins.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::kernel::Remove;
use medallion_bus::quality::ChangeCounts;
use medallion_lake::commits::conform;
use medallion_lake::{FileInfo, TableWriter, read_parquet, read_parquet_columns};
use medallion_spec::model::CdcStorage;
use medallion_spec::{CDC_END_COLUMN, CDC_SEQUENCE_COLUMN, CDC_START_COLUMN, Contract};

use crate::cdc_envelope::{Op, SeqValue};
use crate::cdc_records::{seq_array, seq_at};
use crate::cdc_tombstones::Tombstones;
use crate::dedupe::key_hashes;

/// Key buckets of a change-feed table: the most files one commit rewrites.
pub const BUCKETS: u64 = 64;
/// The change batch's operation column (`c`, `r`, `u`, `d`).
pub const OP_COLUMN: &str = "__op";

fn bucket(hash: u128) -> u64 {
    (hash % BUCKETS as u128) as u64
}

/// What the transform hands to the apply step: the Silver columns before the
/// change-feed ones, then the change's sequence and operation.
pub fn change_schema(contract: &Contract) -> SchemaRef {
    let plan = contract.cdc.as_ref().expect("a change feed");
    // Nullable: a delete carries its key only, whatever the spec requires
    // of a row (rows written to Silver are checked against it).
    let mut fields: Vec<Arc<Field>> = base_fields(contract)
        .into_iter()
        .map(|f| Arc::new(f.as_ref().clone().with_nullable(true)))
        .collect();
    fields.push(Arc::new(Field::new(
        CDC_SEQUENCE_COLUMN,
        plan.sequence_type.clone(),
        false,
    )));
    fields.push(Arc::new(Field::new(OP_COLUMN, DataType::Utf8, false)));
    Arc::new(Schema::new(fields))
}

/// Silver's columns without the ones the change feed adds.
fn base_fields(contract: &Contract) -> Vec<Arc<Field>> {
    contract
        .silver_schema
        .fields()
        .iter()
        .filter(|f| {
            ![CDC_SEQUENCE_COLUMN, CDC_START_COLUMN, CDC_END_COLUMN].contains(&f.name().as_str())
        })
        .cloned()
        .collect()
}

/// The active files of a change-feed table and the buckets each holds.
pub struct CdcTable {
    /// Table version this reflects: anything else (a forget, a compaction,
    /// another replica) means it is read again.
    pub version: i64,
    files: HashMap<String, (FileInfo, BTreeSet<u64>)>,
    pub tombstones: Tombstones,
}

/// A step's changes, ready to commit.
pub struct Applied {
    /// One group (one data file) per bucket rewritten.
    pub groups: Vec<Vec<RecordBatch>>,
    group_buckets: Vec<u64>,
    pub removes: Vec<Remove>,
    removed_paths: Vec<String>,
    pub counts: ChangeCounts,
    pub tombstones: Tombstones,
}

impl Applied {
    pub fn rows_changed(&self) -> u64 {
        self.counts.inserts + self.counts.updates + self.counts.deletes
    }
}

/// Where an output row comes from: a row of a file being rewritten, or a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Existing(usize, usize),
    Change(usize, usize),
}

/// One key's state while a step applies.
#[derive(Default)]
struct KeyState {
    /// SCD1: the current row and its sequence.
    current: Option<(Src, SeqValue)>,
    /// SCD2: every change by sequence; `None` is a delete.
    history: BTreeMap<SeqValue, Option<Src>>,
    /// The latest delete (SCD1).
    deleted: Option<SeqValue>,
    changed: bool,
    /// Has a place in the output order (a key known only by its tombstone
    /// gets one with its first change).
    placed: bool,
}

impl CdcTable {
    /// An empty table (a new product, or a full refresh's first commit).
    pub fn empty(version: i64) -> Self {
        CdcTable {
            version,
            files: HashMap::new(),
            tombstones: Tombstones::default(),
        }
    }

    /// Reads which bucket each active file holds, and the tombstones.
    pub async fn load(contract: &Contract, writer: &TableWriter) -> Result<CdcTable, String> {
        let store = writer.table().log_store().object_store(None);
        let mut files = HashMap::new();
        for f in writer.files().await.map_err(|e| e.to_string())? {
            let batches = read_parquet_columns(&store, &f.path, contract.key())
                .await
                .map_err(|e| e.to_string())?;
            let mut buckets = BTreeSet::new();
            for b in &batches {
                buckets.extend(row_hashes(contract, b)?.into_iter().map(bucket));
            }
            files.insert(f.path.clone(), (f, buckets));
        }
        let version = writer.version();
        let tombstones = Tombstones::load(writer.table_ref(), writer.table()).await?;
        Ok(CdcTable {
            version,
            files,
            tombstones,
        })
    }

    /// Applies `changes` (batches of [`change_schema`]).
    pub async fn apply(
        &self,
        contract: &Contract,
        writer: &TableWriter,
        changes: &[RecordBatch],
        now_us: i64,
    ) -> Result<Applied, String> {
        let plan = contract.cdc.as_ref().expect("a change feed");
        let scd2 = plan.stored_as == CdcStorage::Scd2;
        let mut counts = ChangeCounts::default();

        // The changes, in arrival order.
        struct Change {
            src: Src,
            hash: u128,
            seq: SeqValue,
            op: Op,
        }
        let mut list = Vec::new();
        for (bi, b) in changes.iter().enumerate() {
            if b.num_rows() == 0 {
                continue;
            }
            let hashes = row_hashes(contract, b)?;
            let seqs = b
                .column_by_name(CDC_SEQUENCE_COLUMN)
                .expect("change schema");
            let ops = b
                .column_by_name(OP_COLUMN)
                .expect("change schema")
                .as_string::<i32>();
            for (row, hash) in hashes.into_iter().enumerate() {
                list.push(Change {
                    src: Src::Change(bi, row),
                    hash,
                    seq: seq_at(seqs.as_ref(), row).expect("changes carry a sequence"),
                    op: Op::from_code(ops.value(row)).expect("change ops are codes"),
                });
            }
        }
        let touched: BTreeSet<u64> = list.iter().map(|c| bucket(c.hash)).collect();

        // The rows of every file holding a touched bucket.
        let store = writer.table().log_store().object_store(None);
        let schema = writer.schema().clone();
        let mut read: Vec<&String> = self
            .files
            .iter()
            .filter(|(_, (_, b))| b.iter().any(|b| touched.contains(b)))
            .map(|(p, _)| p)
            .collect();
        read.sort();
        let mut existing: Vec<RecordBatch> = Vec::new();
        let mut existing_file: Vec<usize> = Vec::new();
        for (fi, path) in read.iter().enumerate() {
            for b in read_parquet(&store, path)
                .await
                .map_err(|e| e.to_string())?
            {
                existing.push(conform(b, &schema).map_err(|e| e.to_string())?);
                existing_file.push(fi);
            }
        }

        // The state of each key a change names, from the table, in the
        // order its rows are met; the other rows are only copied.
        let named: HashSet<u128> = list.iter().map(|c| c.hash).collect();
        let mut keys: HashMap<u128, KeyState> = HashMap::new();
        let mut order: Vec<(u128, Src)> = Vec::new();
        let mut existing_hashes: Vec<Vec<u128>> = Vec::with_capacity(existing.len());
        for (bi, b) in existing.iter().enumerate() {
            let hashes = row_hashes(contract, b)?;
            let col = |name: &str| b.column_by_name(name).cloned();
            let (seq, start, end) = (
                col(CDC_SEQUENCE_COLUMN),
                col(CDC_START_COLUMN),
                col(CDC_END_COLUMN),
            );
            for (row, &hash) in hashes.iter().enumerate() {
                if !named.contains(&hash) {
                    continue;
                }
                let src = Src::Existing(bi, row);
                let k = keys.entry(hash).or_default();
                k.placed = true;
                order.push((hash, src));
                if scd2 {
                    let (Some(start), Some(end)) = (&start, &end) else {
                        return Err(missing_columns(writer));
                    };
                    let s = seq_at(start.as_ref(), row).ok_or_else(|| missing_columns(writer))?;
                    k.history.insert(s, Some(src));
                    if let Some(e) = seq_at(end.as_ref(), row) {
                        // A version no later version starts at was ended by
                        // a delete; a start read later replaces it.
                        k.history.entry(e).or_insert(None);
                    }
                } else {
                    let Some(seq) = &seq else {
                        return Err(missing_columns(writer));
                    };
                    let s = seq_at(seq.as_ref(), row).ok_or_else(|| missing_columns(writer))?;
                    k.current = Some((src, s));
                }
            }
            existing_hashes.push(hashes);
        }
        // Deletes the rows do not show (SCD1 always; SCD2 a delete that
        // ended nothing), within the window.
        for (hash, seq) in self.tombstones.iter() {
            if !named.contains(&hash) {
                continue;
            }
            let k = keys.entry(hash).or_default();
            if scd2 {
                k.history.entry(seq.clone()).or_insert(None);
            } else if k.deleted.as_ref().is_none_or(|d| d < seq) {
                k.deleted = Some(seq.clone());
            }
        }

        // Apply, in arrival order: what a change finds is what came before it.
        for c in &list {
            let k = keys.entry(c.hash).or_default();
            if !k.placed {
                k.placed = true;
                order.push((c.hash, c.src));
            }
            let applied = if scd2 {
                match k.history.get(&c.seq) {
                    // Same sequence: a redelivery (or a delete already
                    // inferred from a version's end, now confirmed).
                    Some(Some(_)) => false,
                    Some(None) if c.op == Op::Delete => false,
                    _ => {
                        k.history
                            .insert(c.seq.clone(), (c.op != Op::Delete).then_some(c.src));
                        true
                    }
                }
            } else {
                let newest = [k.current.as_ref().map(|(_, s)| s), k.deleted.as_ref()]
                    .into_iter()
                    .flatten()
                    .max();
                if newest.is_some_and(|n| *n >= c.seq) {
                    false
                } else if c.op == Op::Delete {
                    k.current = None;
                    k.deleted = Some(c.seq.clone());
                    true
                } else {
                    k.current = Some((c.src, c.seq.clone()));
                    k.deleted = None;
                    true
                }
            };
            if !applied {
                counts.stale += 1;
                continue;
            }
            k.changed = true;
            match c.op {
                Op::Insert | Op::Snapshot => counts.inserts += 1,
                Op::Update => counts.updates += 1,
                Op::Delete => counts.deletes += 1,
            }
        }

        // Tombstones: the deletes that still decide something, within the window.
        let mut tombstones = self.tombstones.clone();
        for (hash, k) in &keys {
            if !k.changed {
                continue;
            }
            if scd2 {
                for (seq, src) in &k.history {
                    if src.is_none() {
                        tombstones.remember(*hash, seq.clone(), now_us);
                    }
                }
            } else {
                // The newest delete is all SCD1 needs.
                let since = tombstones.since(*hash, k.deleted.as_ref());
                tombstones.forget(*hash);
                if let Some(seq) = &k.deleted {
                    tombstones.remember(*hash, seq.clone(), since.unwrap_or(now_us));
                }
            }
        }
        tombstones.expire(now_us, plan.keep_deletes_for);

        // Rewrite the files holding a changed key, every bucket they hold.
        let changed_buckets: BTreeSet<u64> = keys
            .iter()
            .filter(|(_, k)| k.changed)
            .map(|(h, _)| bucket(*h))
            .collect();
        let rewritten: BTreeSet<usize> = read
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                self.files[p.as_str()]
                    .1
                    .iter()
                    .any(|b| changed_buckets.contains(b))
            })
            .map(|(i, _)| i)
            .collect();
        // Rows of the rewritten files whose key did not change are copied as
        // they are, by bucket; the changed keys' rows are built.
        let changed_keys: HashSet<u128> = keys
            .iter()
            .filter(|(_, k)| k.changed)
            .map(|(h, _)| *h)
            .collect();
        let mut kept: BTreeMap<u64, Vec<RecordBatch>> = BTreeMap::new();
        for (bi, b) in existing.iter().enumerate() {
            if !rewritten.contains(&existing_file[bi]) {
                continue;
            }
            let hashes = &existing_hashes[bi];
            let buckets: BTreeSet<u64> = hashes.iter().map(|h| bucket(*h)).collect();
            for bk in buckets {
                let mask: BooleanArray = hashes
                    .iter()
                    .map(|h| Some(bucket(*h) == bk && !changed_keys.contains(h)))
                    .collect();
                if mask.true_count() == 0 {
                    continue;
                }
                let rows = filter_record_batch(b, &mask).map_err(|e| e.to_string())?;
                kept.entry(bk).or_default().push(as_silver(contract, rows)?);
            }
        }
        let mut out: BTreeMap<u64, OutRows> = BTreeMap::new();
        let mut emitted: HashSet<u128> = HashSet::new();
        for (hash, _) in &order {
            let k = &keys[hash];
            if !k.changed || !emitted.insert(*hash) {
                continue;
            }
            let rows = out.entry(bucket(*hash)).or_default();
            if scd2 {
                let versions: Vec<(&SeqValue, &Option<Src>)> = k.history.iter().collect();
                for (i, (start, src)) in versions.iter().enumerate() {
                    if let Some(src) = src {
                        let end = versions.get(i + 1).map(|(s, _)| (*s).clone());
                        rows.push(*src, (*start).clone(), end);
                    }
                }
            } else if let Some((src, seq)) = &k.current {
                rows.push(*src, seq.clone(), None);
            }
        }

        let sources: Vec<Vec<ArrayRef>> = base_fields(contract)
            .iter()
            .map(|field| {
                existing
                    .iter()
                    .chain(changes.iter())
                    .map(|b| {
                        b.column_by_name(field.name()).cloned().unwrap_or_else(|| {
                            arrow::array::new_null_array(field.data_type(), b.num_rows())
                        })
                    })
                    .collect()
            })
            .collect();
        let mut groups = Vec::new();
        let mut group_buckets = Vec::new();
        let all: BTreeSet<u64> = kept.keys().chain(out.keys()).copied().collect();
        for b in all {
            let mut group = kept.remove(&b).unwrap_or_default();
            if let Some(rows) = out.get(&b).filter(|r| !r.src.is_empty()) {
                group.push(rows.batch(
                    contract,
                    &sources,
                    existing.len(),
                    plan.sequence_type.clone(),
                    scd2,
                )?);
            }
            if group.iter().all(|g| g.num_rows() == 0) {
                continue;
            }
            groups.push(group);
            group_buckets.push(b);
        }
        let removed_paths: Vec<String> = rewritten.iter().map(|i| read[*i].clone()).collect();
        let removes = removed_paths
            .iter()
            .map(|p| self.files[p].0.remove.clone())
            .collect();
        Ok(Applied {
            groups,
            group_buckets,
            removes,
            removed_paths,
            counts,
            tombstones,
        })
    }

    /// Takes in a commit of `applied` as `version`; `added` are the files
    /// the commit wrote, one per group.
    pub async fn committed(
        &mut self,
        writer: &TableWriter,
        applied: Applied,
        version: i64,
    ) -> Result<(), String> {
        for p in &applied.removed_paths {
            self.files.remove(p);
        }
        let listed = writer.files().await.map_err(|e| e.to_string())?;
        for (path, b) in writer.added_files().iter().zip(&applied.group_buckets) {
            if let Some(f) = listed.iter().find(|f| &f.path == path) {
                self.files
                    .insert(path.clone(), (f.clone(), BTreeSet::from([*b])));
            }
        }
        self.tombstones = applied.tombstones;
        self.version = version;
        Ok(())
    }
}

/// The rows one bucket's new file gets.
#[derive(Default)]
struct OutRows {
    src: Vec<Src>,
    seq: Vec<SeqValue>,
    end: Vec<Option<SeqValue>>,
}

impl OutRows {
    fn push(&mut self, src: Src, seq: SeqValue, end: Option<SeqValue>) {
        self.src.push(src);
        self.seq.push(seq);
        self.end.push(end);
    }

    fn batch(
        &self,
        contract: &Contract,
        sources: &[Vec<ArrayRef>],
        n_existing: usize,
        seq_type: DataType,
        scd2: bool,
    ) -> Result<RecordBatch, String> {
        let indices: Vec<(usize, usize)> = self
            .src
            .iter()
            .map(|s| match s {
                Src::Existing(b, r) => (*b, *r),
                Src::Change(b, r) => (n_existing + b, *r),
            })
            .collect();
        let mut columns: Vec<ArrayRef> = Vec::new();
        for (field, arrays) in base_fields(contract).iter().zip(sources) {
            let typed: Vec<ArrayRef> = arrays
                .iter()
                .map(|a| {
                    if a.data_type() == field.data_type() {
                        Ok(a.clone())
                    } else if a.len() == 0 {
                        Ok(arrow::array::new_empty_array(field.data_type()))
                    } else {
                        arrow::compute::cast(a, field.data_type()).map_err(|e| e.to_string())
                    }
                })
                .collect::<Result<_, String>>()?;
            let refs: Vec<&dyn Array> = typed.iter().map(|a| a.as_ref()).collect();
            columns.push(arrow::compute::interleave(&refs, &indices).map_err(|e| e.to_string())?);
        }
        columns.push(seq_array(&seq_type, self.seq.iter().map(Some)));
        if scd2 {
            columns.push(seq_array(&seq_type, self.end.iter().map(Option::as_ref)));
        }
        RecordBatch::try_new(contract.silver_schema.clone(), columns).map_err(|e| e.to_string())
    }
}

/// A row of the table as the spec's Silver schema has it (a file written
/// before a column was added lacks it: NULL).
fn as_silver(contract: &Contract, b: RecordBatch) -> Result<RecordBatch, String> {
    let b = conform(b, &contract.silver_schema).map_err(|e| e.to_string())?;
    RecordBatch::try_new(contract.silver_schema.clone(), b.columns().to_vec())
        .map_err(|e| e.to_string())
}

fn row_hashes(contract: &Contract, b: &RecordBatch) -> Result<Vec<u128>, String> {
    let cols: Vec<ArrayRef> = contract
        .key()
        .iter()
        .map(|k| {
            b.column_by_name(k)
                .cloned()
                .ok_or_else(|| format!("key column `{k}` is missing from a change-feed file"))
        })
        .collect::<Result<_, _>>()?;
    key_hashes(&cols).map_err(|e| e.to_string())
}

fn missing_columns(writer: &TableWriter) -> String {
    format!(
        "{} lacks its change-feed columns (was it built before spec.cdc was set?); run `medallion replay` to rebuild it",
        writer.table_ref()
    )
}
