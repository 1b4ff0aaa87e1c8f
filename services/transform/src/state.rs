//! What the transform keeps per product: the Silver and quarantine writers,
//! where the chain stands, and the keys committed so far.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use medallion_lake::{Lake, TableOptions, TableWriter, read_commit, read_parquet_columns};
use medallion_spec::layout::{quarantine, quarantine_schema};
use medallion_spec::{Contract, INGESTED_AT_COLUMN, TableRef};
use medallion_stage::Partitions;
use tracing::{info, warn};

use crate::APP_ID;
use crate::dedupe::KeySet;
use crate::key_budget::KeyBudget;
use crate::step::Step;

pub(crate) const LAYER: &str = "silver";
/// Transaction versions are `generation << 40 | bronze version`: a replay
/// bumps the generation, so its commits are newer than anything before it.
pub(crate) const GEN_SHIFT: u32 = 40;
pub(crate) const VERSION_MASK: i64 = (1 << GEN_SHIFT) - 1;
pub(crate) const SNAPSHOT_EVERY: u32 = 16;

pub(crate) struct ProductState {
    pub contract: Arc<Contract>,
    pub silver: TableWriter,
    pub quarantine: TableWriter,
    pub keys: KeySet,
    /// Silver version through which `keys` holds every committed key.
    pub keys_at: i64,
    /// Last Bronze version reflected in Silver.
    pub processed: i64,
    pub generation: i64,
    /// Why a `fail` expectation stopped the product, until its spec changes.
    pub halted: Option<String>,
    pub commits_since_snapshot: u32,
    /// The partitions of the last pass: when they change, other replicas
    /// may have committed since, so the tables are read again.
    pub partitions: Option<Partitions>,
    /// A step computed before its turn, with the Bronze version it starts at,
    /// its span and the trace contexts of its inputs.
    pub ahead: Option<Ahead>,
    /// A change feed's files by bucket and its tombstones, read at its
    /// first commit and after any commit not its own.
    pub cdc: Option<crate::cdc_apply::CdcTable>,
}

pub(crate) struct Ahead {
    pub first: i64,
    pub step: Step,
    pub span: tracing::Span,
    pub links: Vec<String>,
}

/// Why the state no longer matches the tables.
pub(crate) enum Stale {
    /// A full refresh (another generation) or an overwrite: open it again.
    Reopen,
    Read(String),
}

pub(crate) fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

pub(crate) fn pid(c: &Contract) -> String {
    format!("{}.{}", c.domain(), c.name())
}

impl ProductState {
    /// The columns Silver de-duplicates on: none for a change feed, which
    /// keeps a key's changes by sequence instead.
    pub fn dedupe_key(&self) -> &[String] {
        dedupe_key(&self.contract)
    }

    pub async fn snapshot(&mut self) {
        if self.commits_since_snapshot == 0 || self.dedupe_key().is_empty() {
            return;
        }
        let store = self.silver.table().log_store().object_store(None);
        // As of `keys_at`: the keys are complete through that version only.
        match self.keys.save(store.as_ref(), self.keys_at).await {
            Ok(()) => self.commits_since_snapshot = 0,
            Err(e) => {
                warn!(table = %self.silver.table_ref(), error = %e, "dedupe snapshot not written; restart will read more commits")
            }
        }
    }

    /// Catches up with commits other replicas made: the writers' versions,
    /// where the chain stands, and the keys of the rows they added.
    pub async fn sync(&mut self) -> Result<(), Stale> {
        let read = |e: medallion_lake::LakeError| Stale::Read(e.to_string());
        let before = self.silver.version();
        let new = self.silver.follow().await.map_err(read)?;
        self.quarantine.follow().await.map_err(read)?;
        let (processed, generation) = position(self.silver.txn_version());
        if generation != self.generation {
            return Err(Stale::Reopen);
        }
        self.processed = processed;
        let key = self.dedupe_key().to_vec();
        let current = self.silver.version();
        if key.is_empty() || current <= self.keys_at {
            self.keys_at = self.keys_at.max(current);
            return Ok(());
        }
        let tref = self.silver.table_ref().clone();
        let table = self.silver.table().clone();
        let store = table.log_store().object_store(None);
        // Versions this state saw but whose keys it lacks, then the new ones.
        let mut missing = Vec::new();
        for v in (self.keys_at + 1)..=before {
            if let Some(c) = medallion_lake::commit_summary(&tref, &table, v)
                .await
                .map_err(read)?
            {
                missing.push((v, c));
            }
        }
        missing.extend(new.into_iter().filter(|(v, _)| *v > self.keys_at));
        for (_, c) in missing {
            if !c.removed.is_empty() {
                return Err(Stale::Reopen);
            }
            for f in &c.added {
                // Gone: compacted and vacuumed since; the keys are read
                // from the current files when the state is opened again.
                let batches = match read_parquet_columns(&store, f, &key).await {
                    Err(e) if e.is_not_found() => return Err(Stale::Reopen),
                    r => r.map_err(read)?,
                };
                for b in batches {
                    self.keys
                        .add_batch(&b, &key)
                        .map_err(|e| Stale::Read(e.to_string()))?;
                }
            }
        }
        self.keys_at = current;
        Ok(())
    }
}

fn dedupe_key(c: &Contract) -> &[String] {
    if c.cdc.is_some() { &[] } else { c.key() }
}

/// `(last Bronze version, generation)` of a Silver transaction version.
pub(crate) fn position(txn: Option<i64>) -> (i64, i64) {
    match txn {
        None => (-1, 0),
        Some(t) => (t & VERSION_MASK, t >> GEN_SHIFT),
    }
}

pub(crate) async fn open_state(
    lake: &Lake,
    contract: Arc<Contract>,
    budget: &KeyBudget,
) -> Result<ProductState, String> {
    let (d, p) = (contract.domain().to_string(), contract.name().to_string());
    let silver_ref = TableRef::silver(&d, &p);
    let options = TableOptions {
        description: Some(contract.product.spec.description.clone()),
        append_only: false,
        partition_columns: vec![],
        // A single-column key is unique in Silver by construction.
        unique_columns: match contract.key() {
            [k] => vec![k.clone()],
            _ => vec![],
        },
    };
    let silver = TableWriter::open_or_create(
        lake,
        &silver_ref,
        contract.silver_schema.clone(),
        APP_ID,
        &options,
    )
    .await
    .map_err(|e| e.to_string())?;
    // A spec whose columns differ from the table's is fine here: the writer
    // adds new optional columns on the next commit, and refuses anything else
    // with the fix (a full refresh, which rewrites the table under the new
    // schema).
    let qoptions = TableOptions {
        description: Some(format!(
            "Rows of {d}.{p} rejected by its contract, with the reasons"
        )),
        append_only: false,
        partition_columns: vec![],
        unique_columns: vec![quarantine::PAYLOAD.into()],
    };
    let quarantine = TableWriter::open_or_create(
        lake,
        &TableRef::quarantine(&d, &p),
        quarantine_schema(),
        APP_ID,
        &qoptions,
    )
    .await
    .map_err(|e| e.to_string())?;
    let (processed, generation) = position(silver.txn_version());
    let keys = load_keys(
        &silver,
        dedupe_key(&contract),
        contract.dedupe_within,
        budget,
        &pid(&contract),
    )
    .await?;
    Ok(ProductState {
        keys_at: silver.version(),
        contract,
        silver,
        quarantine,
        keys,
        processed,
        generation,
        halted: None,
        commits_since_snapshot: 0,
        partitions: None,
        ahead: None,
        cdc: None,
    })
}

/// The key set as of Silver's current version: newest snapshot + later
/// commits; or, without a snapshot or when a later commit's files are gone
/// (compacted, then vacuumed), the key columns of the current files.
async fn load_keys(
    silver: &TableWriter,
    key: &[String],
    horizon: Option<std::time::Duration>,
    budget: &KeyBudget,
    product: &str,
) -> Result<KeySet, String> {
    if key.is_empty() {
        return Ok(KeySet::default());
    }
    let current = silver.version();
    let store = silver.table().log_store().object_store(None);
    let started = Instant::now();
    let spill = || budget.product_dir(product).map(Some);
    let snapshot = KeySet::load(store.as_ref(), current, spill)
        .await
        .map_err(|e| e.to_string())?;
    let (keys, from) = match snapshot {
        Some((v, set)) => match replay_keys(silver, key, set.with_horizon(horizon), v + 1).await {
            Ok(keys) => (keys, v + 1),
            Err(e) => {
                warn!(table = %silver.table_ref(), error = %e, "dedupe snapshot cannot be brought up to date; reading the keys of the current files");
                (scan_keys(silver, key, horizon, spill).await?, -1)
            }
        },
        None => (scan_keys(silver, key, horizon, spill).await?, -1),
    };
    info!(table = %silver.table_ref(), keys = keys.len(), in_memory = keys.in_memory(), runs = keys.runs(), from_version = from, to_version = current, ms = started.elapsed().as_millis() as u64, "dedupe state loaded");
    Ok(keys)
}

async fn replay_keys(
    silver: &TableWriter,
    key: &[String],
    mut keys: KeySet,
    from: i64,
) -> Result<KeySet, String> {
    for v in from..=silver.version() {
        if let Some(c) = read_commit(silver.table_ref(), silver.table(), v)
            .await
            .map_err(|e| e.to_string())?
        {
            if c.removed_data {
                // A full refresh or an erasure rewrote rows: the keys are
                // those of the files from then on, read from the table.
                return Err(format!("version {v} rewrote rows"));
            }
            for b in &c.batches {
                keys.add_batch(b, key).map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(keys)
}

/// Reads only the key columns of every current file (and, with a horizon,
/// when each row was ingested: older keys are past it).
async fn scan_keys(
    silver: &TableWriter,
    key: &[String],
    horizon: Option<std::time::Duration>,
    spill: impl FnOnce() -> std::io::Result<Option<crate::key_budget::SpillDir>>,
) -> Result<KeySet, String> {
    let store = silver.table().log_store().object_store(None);
    let spill = spill().map_err(|e| format!("dedupe key directory: {e}"))?;
    let mut keys = KeySet::default().with_spill(spill).with_horizon(horizon);
    let since = horizon.map(|h| now_us() - h.as_micros() as i64);
    let mut columns = key.to_vec();
    if since.is_some() {
        columns.push(INGESTED_AT_COLUMN.to_string());
    }
    for f in silver.files().await.map_err(|e| e.to_string())? {
        for b in read_parquet_columns(&store, &f.path, &columns)
            .await
            .map_err(|e| e.to_string())?
        {
            keys.add_batch_since(&b, key, since)
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(keys)
}
