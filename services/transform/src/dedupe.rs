//! Cross-batch de-duplication on the product key.
//!
//! Each key is kept as a 128-bit hash (xxh3-128 of Arrow's row encoding of the
//! key columns): 16 bytes per key in a hash set, ~20–40 bytes with the set's
//! overhead. The chance that two different keys collide is ~n²/2¹²⁹:
//! negligible at any realistic table size.
//!
//! Memory is bounded by `MEDALLION_DEDUPE_MEMORY` per product: once the
//! in-memory set would outgrow it, its keys are written out as a sorted run
//! on local disk ([`crate::key_run`]) that keeps ~1.3 bytes per key in
//! memory, and the set starts empty again. Runs of similar size are merged
//! four at a time, so a lookup checks a handful of runs' filters.
//!
//! A product may bound the set with a horizon (`spec.dedupe.within`, like
//! Spark's `dropDuplicatesWithinWatermark`): keys are then kept in
//! generations by commit time and forgotten at least `within` after they
//! were committed, so memory follows the rate times the horizon, not the
//! table's size.
//!
//! Restart cost: the set is snapshotted into the Silver table directory
//! every few commits ([`crate::dedupe_snapshot`]: the in-memory keys, plus
//! each run uploaded once); at start the newest snapshot is loaded and only
//! the commits after it are read, so start-up reads O(keys) bytes of snapshot
//! plus a bounded tail of commits, never the whole table's Parquet files.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use arrow::array::{Array, ArrayRef, RecordBatch, TimestampMicrosecondArray};
use arrow::row::{RowConverter, SortField};
use medallion_spec::INGESTED_AT_COLUMN;
use tracing::{info, warn};
use xxhash_rust::xxh3::{xxh3_64, xxh3_128};

use crate::key_budget::SpillDir;
use crate::key_run::KeyRun;

/// Keys are already uniform 128-bit hashes: hashing them again (SipHash, the
/// std default) cost more than the set lookups themselves, so the set uses
/// the key's own bits.
#[derive(Default, Clone, Copy)]
pub struct PrehashedKey(u64);

impl Hasher for PrehashedKey {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u128` is used for keys; fold anything else in anyway.
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }

    fn write_u128(&mut self, k: u128) {
        self.0 = (k as u64) ^ ((k >> 64) as u64);
    }
}

/// A set of key hashes.
pub type KeyHashSet = HashSet<u128, BuildHasherDefault<PrehashedKey>>;

/// The keys committed to Silver, in generations by commit time (oldest
/// first). Without a horizon there is one generation holding every key.
/// With `dedupe.within`, a new generation starts every quarter of the
/// horizon and a generation is forgotten once the one after it is older
/// than the horizon: a key is remembered at least `within` and at most
/// 1.25 × `within` after it was committed, and memory is bounded by the
/// keys of that span.
#[derive(Default, Debug)]
pub struct KeySet {
    pub(crate) generations: VecDeque<Generation>,
    pub(crate) horizon_ms: Option<i64>,
    /// Where keys beyond the memory budget go; `None`: all stay in memory.
    pub(crate) spill: Option<SpillDir>,
    /// In-memory key count when writing a run last failed.
    pub(crate) spill_failed_at: Option<usize>,
}

#[derive(Debug)]
pub(crate) struct Generation {
    pub started_ms: i64,
    /// When a key was last added (a generation takes keys for a quarter
    /// of the horizon from its start).
    pub last_ms: i64,
    /// Keys in memory.
    pub keys: KeyHashSet,
    /// Keys spilled to disk, each run sorted.
    pub runs: Vec<KeyRun>,
}

impl Generation {
    pub(crate) fn new(started_ms: i64, last_ms: i64) -> Generation {
        Generation {
            started_ms,
            last_ms,
            keys: KeyHashSet::default(),
            runs: Vec::new(),
        }
    }

    fn contains(&self, k: u128) -> bool {
        self.keys.contains(&k) || self.runs.iter().any(|r| r.contains(k))
    }

    fn len(&self) -> usize {
        self.keys.len() + self.runs.iter().map(|r| r.len() as usize).sum::<usize>()
    }
}

/// Runs merged at once, and how many of a size wait before a merge.
const MERGE_FANOUT: usize = 4;

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs disk work that takes a while at millions of keys (writing and
/// merging runs) so that, on a multi-threaded runtime, the runtime's other
/// tasks (lease renewals, other products) move meanwhile.
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A name for a new run, unique among every replica's.
pub(crate) fn new_run_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    xxh3_64(format!("{host}/{}/{nanos}/{n}", std::process::id()).as_bytes())
}

impl KeySet {
    /// Keys beyond `spill.max_hot_keys` go to runs in its directory.
    pub fn with_spill(mut self, spill: Option<SpillDir>) -> Self {
        self.spill = spill;
        self.spill_if_over(0);
        self
    }

    /// Applies a dedupe horizon (`None`: keys are kept for ever).
    pub fn with_horizon(mut self, horizon: Option<std::time::Duration>) -> Self {
        self.horizon_ms = horizon.map(|h| h.as_millis().max(1) as i64);
        self.forget_old(now_ms());
        self
    }

    pub fn len(&self) -> usize {
        self.generations.iter().map(Generation::len).sum()
    }

    /// Keys held in memory (the rest are in runs on disk).
    pub fn in_memory(&self) -> usize {
        self.generations.iter().map(|g| g.keys.len()).sum()
    }

    /// Runs on disk.
    pub fn runs(&self) -> usize {
        self.generations.iter().map(|g| g.runs.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, k: u128) -> bool {
        self.generations.iter().any(|g| g.contains(k))
    }

    pub fn extend(&mut self, keys: impl IntoIterator<Item = u128>) {
        self.extend_at(keys, now_ms());
    }

    pub(crate) fn extend_at(&mut self, keys: impl IntoIterator<Item = u128>, now: i64) {
        let keys = keys.into_iter();
        // Keys past the horizon are not worth writing out; and spilling
        // before the set would outgrow the budget spares it a doubling.
        self.forget_old(now);
        self.spill_if_over(keys.size_hint().0);
        let g = self.current(now);
        g.keys.extend(keys);
        g.last_ms = g.last_ms.max(now);
        self.spill_if_over(0);
    }

    pub fn clear(&mut self) {
        self.generations.clear();
    }

    fn current(&mut self, now: i64) -> &mut Generation {
        let width = self.horizon_ms.map(|h| (h / 4).max(1));
        let fresh = match (self.generations.back(), width) {
            (None, _) => true,
            (Some(g), Some(w)) => now - g.started_ms >= w,
            (Some(_), None) => false,
        };
        if fresh {
            self.generations.push_back(Generation::new(now, now));
        }
        self.generations.back_mut().expect("just ensured")
    }

    /// Once the newest key of the oldest generation is older than the
    /// horizon, all of its keys are (checked at every commit).
    pub fn forget_old_now(&mut self) {
        self.forget_old(now_ms());
    }

    pub(crate) fn forget_old(&mut self, now: i64) {
        let Some(h) = self.horizon_ms else { return };
        while self
            .generations
            .front()
            .is_some_and(|g| g.last_ms + h <= now)
        {
            self.generations.pop_front();
        }
    }

    /// Writes the in-memory keys out as runs once they exceed the budget.
    /// A run that cannot be written leaves its keys in memory: over budget,
    /// never wrong.
    fn spill_if_over(&mut self, incoming: usize) {
        let Some(spill) = &self.spill else { return };
        let held = self.in_memory();
        if held == 0 || held + incoming <= spill.max_hot_keys {
            return;
        }
        if self
            .spill_failed_at
            .is_some_and(|n| held < n.saturating_mul(2))
        {
            // The last attempt failed (disk full?): try again once the set
            // has doubled, not on every commit.
            return;
        }
        blocking(|| self.spill_now());
    }

    fn spill_now(&mut self) {
        let Some(spill) = &self.spill else { return };
        let started = std::time::Instant::now();
        let spilled = self.in_memory();
        for g in &mut self.generations {
            if g.keys.is_empty() {
                continue;
            }
            let mut sorted: Vec<u128> = g.keys.iter().copied().collect();
            sorted.sort_unstable();
            let n = sorted.len();
            match KeyRun::write(&spill.path, new_run_id(), sorted.into_iter().map(Ok), n) {
                Ok(run) => {
                    g.keys = KeyHashSet::default();
                    g.runs.push(run);
                    merge_runs(&spill.path, &mut g.runs, spill.max_hot_keys);
                }
                Err(e) => {
                    warn!(dir = %spill.path.display(), error = %e, "dedupe keys cannot be spilled to disk; they stay in memory");
                    self.spill_failed_at = Some(spilled);
                    return;
                }
            }
        }
        self.spill_failed_at = None;
        info!(
            keys = spilled,
            runs = self.runs(),
            ms = started.elapsed().as_millis() as u64,
            "dedupe keys spilled to disk"
        );
    }

    /// Adds the keys of Silver rows. With `since_us`, rows ingested before it
    /// (by `_ingested_at`) are past the horizon and skipped.
    pub fn add_batch(
        &mut self,
        batch: &RecordBatch,
        key: &[String],
    ) -> Result<(), arrow::error::ArrowError> {
        self.add_batch_since(batch, key, None)
    }

    pub fn add_batch_since(
        &mut self,
        batch: &RecordBatch,
        key: &[String],
        since_us: Option<i64>,
    ) -> Result<(), arrow::error::ArrowError> {
        let cols: Vec<ArrayRef> = key
            .iter()
            .map(|k| batch.column_by_name(k).cloned())
            .collect::<Option<_>>()
            .ok_or_else(|| {
                arrow::error::ArrowError::SchemaError("key column missing from Silver".into())
            })?;
        let hashes = key_hashes(&cols)?;
        let Some(since) = since_us else {
            self.extend(hashes);
            return Ok(());
        };
        let at = batch
            .column_by_name(INGESTED_AT_COLUMN)
            .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
            .ok_or_else(|| {
                arrow::error::ArrowError::SchemaError(format!(
                    "{INGESTED_AT_COLUMN} missing from Silver"
                ))
            })?;
        let recent = hashes
            .into_iter()
            .enumerate()
            .filter(|(i, _)| at.is_null(*i) || at.value(*i) >= since)
            .map(|(_, h)| h);
        self.extend(recent);
        Ok(())
    }
}

/// Size tier of a run: runs within a factor [`MERGE_FANOUT`] of each other
/// share one, so a key is rewritten about log₄(keys / budget) times.
fn tier(len: u64, base: usize) -> u32 {
    let mut t = 0;
    let mut bound = base.max(1) as u64;
    while len > bound {
        bound = bound.saturating_mul(MERGE_FANOUT as u64);
        t += 1;
    }
    t
}

/// Merges [`MERGE_FANOUT`] runs of one tier into one until no tier has that many.
fn merge_runs(dir: &std::path::Path, runs: &mut Vec<KeyRun>, base: usize) {
    loop {
        let mut by_tier: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
        for (i, r) in runs.iter().enumerate() {
            by_tier.entry(tier(r.len(), base)).or_default().push(i);
        }
        let Some(group) = by_tier.into_values().find(|g| g.len() >= MERGE_FANOUT) else {
            return;
        };
        let started = std::time::Instant::now();
        let mut picked = Vec::with_capacity(group.len());
        for i in group.into_iter().rev() {
            picked.push(runs.swap_remove(i));
        }
        match KeyRun::merge(dir, new_run_id(), &picked) {
            Ok(merged) => {
                info!(
                    runs = picked.len(),
                    keys = merged.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "dedupe key runs merged"
                );
                runs.push(merged);
            }
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "dedupe key runs not merged; lookups check each of them");
                runs.extend(picked);
                return;
            }
        }
    }
}

/// One 128-bit hash per row of the key columns.
pub fn key_hashes(cols: &[ArrayRef]) -> Result<Vec<u128>, arrow::error::ArrowError> {
    let n = cols.first().map(|c| c.len()).unwrap_or(0);
    let converter = RowConverter::new(
        cols.iter()
            .map(|c| SortField::new(c.data_type().clone()))
            .collect(),
    )?;
    let rows = converter.convert_columns(cols)?;
    Ok((0..n).map(|i| xxh3_128(rows.row(i).as_ref())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// However keys arrive and spill, the set answers as a plain set of
        /// every key added.
        #[test]
        fn a_spilling_set_answers_as_a_plain_set(
            batches in proptest::collection::vec(proptest::collection::vec(0u128..5_000, 0..400), 1..30),
            budget in 1usize..600,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let spill = SpillDir::at(dir.path().join("p"), budget).unwrap();
            let mut set = KeySet::default().with_spill(Some(spill));
            let mut model = std::collections::HashSet::new();
            for b in batches {
                let fresh: Vec<u128> = b.into_iter().filter(|k| !set.contains(*k)).collect();
                set.extend(fresh.iter().copied());
                model.extend(fresh);
                prop_assert!(set.in_memory() <= budget);
                prop_assert_eq!(set.len(), model.len());
            }
            for k in 0..5_200u128 {
                prop_assert_eq!(set.contains(k), model.contains(&k), "key {}", k);
            }
        }
    }

    #[test]
    fn runs_merge_by_size_tier() {
        assert_eq!((tier(0, 100), tier(100, 100), tier(101, 100)), (0, 0, 1));
        assert_eq!(
            (tier(400, 100), tier(401, 100), tier(1_601, 100)),
            (1, 2, 3)
        );
    }
}
