//! Cross-batch de-duplication on the product key.
//!
//! Each key is kept as a 128-bit hash (xxh3-128 of Arrow's row encoding of the
//! key columns): 16 bytes per key in a hash set, ~32 bytes with the set's
//! overhead, so 10 million keys take ~320 MiB. The chance that two different
//! keys collide is ~n²/2¹²⁹: negligible at any realistic table size.
//!
//! A product may bound the set with a horizon (`spec.dedupe.within`, like
//! Spark's `dropDuplicatesWithinWatermark`): keys are then kept in
//! generations by commit time and forgotten at least `within` after they
//! were committed, so memory follows the rate times the horizon, not the
//! table's size.
//!
//! Restart cost: the set is snapshotted into the Silver table directory
//! (`_medallion/dedupe-<version>.bin`, sorted hashes) every few commits; at
//! start the newest snapshot is loaded and only the commits after it are read,
//! so start-up reads O(keys) bytes of snapshot plus a bounded tail of commits,
//! never the whole table's Parquet files.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use arrow::array::{Array, ArrayRef, RecordBatch, TimestampMicrosecondArray};
use arrow::row::{RowConverter, SortField};
use bytes::Bytes;
use deltalake::{ObjectStore, Path};
use medallion_lake::LakeError;
use medallion_spec::INGESTED_AT_COLUMN;
use object_store::{ObjectStoreExt, PutPayload};
use xxhash_rust::xxh3::xxh3_128;

pub const SNAPSHOT_DIR: &str = "_medallion";

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
#[derive(Default)]
pub struct KeySet {
    generations: VecDeque<Generation>,
    horizon_ms: Option<i64>,
}

struct Generation {
    started_ms: i64,
    /// When a key was last added (a generation takes keys for a quarter
    /// of the horizon from its start).
    last_ms: i64,
    keys: KeyHashSet,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl KeySet {
    /// Applies a dedupe horizon (`None`: keys are kept for ever).
    pub fn with_horizon(mut self, horizon: Option<std::time::Duration>) -> Self {
        self.horizon_ms = horizon.map(|h| h.as_millis().max(1) as i64);
        self.forget_old(now_ms());
        self
    }

    pub fn len(&self) -> usize {
        self.generations.iter().map(|g| g.keys.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.generations.iter().all(|g| g.keys.is_empty())
    }

    pub fn contains(&self, k: u128) -> bool {
        self.generations.iter().any(|g| g.keys.contains(&k))
    }

    pub fn extend(&mut self, keys: impl IntoIterator<Item = u128>) {
        self.extend_at(keys, now_ms());
    }

    fn extend_at(&mut self, keys: impl IntoIterator<Item = u128>, now: i64) {
        let g = self.current(now);
        g.keys.extend(keys);
        g.last_ms = g.last_ms.max(now);
        self.forget_old(now);
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
            self.generations.push_back(Generation {
                started_ms: now,
                last_ms: now,
                keys: KeyHashSet::default(),
            });
        }
        self.generations.back_mut().expect("just ensured")
    }

    /// Once the newest key of the oldest generation is older than the
    /// horizon, all of its keys are (checked at every commit).
    pub fn forget_old_now(&mut self) {
        self.forget_old(now_ms());
    }

    fn forget_old(&mut self, now: i64) {
        let Some(h) = self.horizon_ms else { return };
        while self
            .generations
            .front()
            .is_some_and(|g| g.last_ms + h <= now)
        {
            self.generations.pop_front();
        }
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

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.len() * 16 + self.generations.len() * 20);
        out.extend_from_slice(b"MDK2");
        out.extend_from_slice(&(self.generations.len() as u32).to_le_bytes());
        for g in &self.generations {
            let mut v: Vec<u128> = g.keys.iter().copied().collect();
            v.sort_unstable();
            out.extend_from_slice(&g.started_ms.to_le_bytes());
            out.extend_from_slice(&g.last_ms.to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            for k in v {
                out.extend_from_slice(&k.to_le_bytes());
            }
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<KeySet> {
        fn keys(body: &[u8], n: usize) -> Option<(KeyHashSet, &[u8])> {
            let len = n.checked_mul(16)?;
            let (k, rest) = (body.get(..len)?, body.get(len..)?);
            let set = k
                .chunks_exact(16)
                .map(|c| u128::from_le_bytes(c.try_into().expect("16 bytes")))
                .collect();
            Some((set, rest))
        }
        let u32_at = |b: &[u8]| -> Option<usize> {
            Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize)
        };
        let mut generations = VecDeque::new();
        if let Some(body) = bytes.strip_prefix(b"MDK1") {
            // One generation: written before horizons existed.
            let (set, rest) = keys(body.get(4..)?, u32_at(body)?)?;
            if !rest.is_empty() {
                return None;
            }
            // Kept for the horizon from now: when they were added is unknown.
            generations.push_back(Generation {
                started_ms: now_ms(),
                last_ms: now_ms(),
                keys: set,
            });
        } else {
            let body = bytes.strip_prefix(b"MDK2")?;
            let n = u32_at(body)?;
            let mut rest = body.get(4..)?;
            for _ in 0..n {
                let started_ms = i64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
                let last_ms = i64::from_le_bytes(rest.get(8..16)?.try_into().ok()?);
                let count = u32_at(rest.get(16..)?)?;
                let (set, after) = keys(rest.get(20..)?, count)?;
                generations.push_back(Generation {
                    started_ms,
                    last_ms,
                    keys: set,
                });
                rest = after;
            }
            if !rest.is_empty() {
                return None;
            }
        }
        Some(KeySet {
            generations,
            horizon_ms: None,
        })
    }

    /// Writes the set as of Silver `version` (atomically: object stores put whole objects).
    pub async fn save(&self, store: &dyn ObjectStore, version: i64) -> Result<(), LakeError> {
        let path = Path::from(format!("{SNAPSHOT_DIR}/dedupe-{version:020}.bin"));
        store
            .put(&path, PutPayload::from(Bytes::from(self.encode())))
            .await?;
        // Older snapshots are no longer needed.
        for (v, p) in list_snapshots(store).await? {
            if v < version {
                let _ = store.delete(&p).await;
            }
        }
        Ok(())
    }

    /// The newest readable snapshot at or below `max_version`.
    pub async fn load(
        store: &dyn ObjectStore,
        max_version: i64,
    ) -> Result<Option<(i64, KeySet)>, LakeError> {
        let mut snaps = list_snapshots(store).await?;
        snaps.sort_by_key(|(v, _)| std::cmp::Reverse(*v));
        for (v, p) in snaps {
            if v > max_version {
                continue;
            }
            let bytes = store.get(&p).await?.bytes().await?;
            if let Some(set) = KeySet::decode(&bytes) {
                return Ok(Some((v, set)));
            }
        }
        Ok(None)
    }
}

async fn list_snapshots(store: &dyn ObjectStore) -> Result<Vec<(i64, Path)>, LakeError> {
    use futures::TryStreamExt;
    let prefix = Path::from(SNAPSHOT_DIR);
    let metas: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
    Ok(metas
        .into_iter()
        .filter_map(|m| {
            let name = m.location.filename()?.to_string();
            let v = name
                .strip_prefix("dedupe-")?
                .strip_suffix(".bin")?
                .parse()
                .ok()?;
            Some((v, m.location))
        })
        .collect())
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
        #[test]
        fn snapshot_round_trips(keys in proptest::collection::hash_set(any::<u128>(), 0..500)) {
            let mut set = KeySet::default();
            set.extend(keys.iter().copied());
            let back = KeySet::decode(&set.encode()).unwrap();
            prop_assert_eq!(back.len(), keys.len());
            prop_assert!(keys.iter().all(|k| back.contains(*k)));
        }
    }

    proptest! {
        /// With a horizon, a key is remembered at least that long and
        /// forgotten within 1.25 times it; generations survive a snapshot.
        #[test]
        fn a_horizon_forgets_keys_between_one_and_five_quarters_of_it(
            steps in proptest::collection::vec((0i64..400, 0u128..50), 1..200),
        ) {
            let h = 1_000i64;
            let mut set = KeySet::default().with_horizon(Some(std::time::Duration::from_millis(h as u64)));
            let mut now = 1_000_000i64;
            let mut last_added: std::collections::HashMap<u128, i64> = Default::default();
            for (dt, k) in steps {
                now += dt;
                set.forget_old(now);
                for (key, at) in &last_added {
                    let age = now - at;
                    if age < h {
                        prop_assert!(set.contains(*key), "key {key} forgotten after {age} ms");
                    }
                    if age > h + h / 4 {
                        prop_assert!(!set.contains(*key), "key {key} kept after {age} ms");
                    }
                }
                set.extend_at([k], now);
                last_added.insert(k, now);
                if k % 7 == 0 {
                    set = KeySet::decode(&set.encode()).unwrap();
                    set.horizon_ms = Some(h);
                }
            }
        }
    }

    #[test]
    fn a_snapshot_of_the_first_format_is_read() {
        let mut v1 = b"MDK1".to_vec();
        v1.extend_from_slice(&2u32.to_le_bytes());
        v1.extend_from_slice(&5u128.to_le_bytes());
        v1.extend_from_slice(&9u128.to_le_bytes());
        let set = KeySet::decode(&v1).unwrap();
        assert!(set.contains(5) && set.contains(9) && set.len() == 2);
    }

    #[test]
    fn truncated_snapshot_is_refused() {
        let mut set = KeySet::default();
        set.extend([1, 2, 3]);
        let bytes = set.encode();
        assert!(KeySet::decode(&bytes[..bytes.len() - 1]).is_none());
    }
}
