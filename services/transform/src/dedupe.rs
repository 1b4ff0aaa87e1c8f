//! Cross-batch de-duplication on the product key.
//!
//! Each key is kept as a 128-bit hash (xxh3-128 of Arrow's row encoding of the
//! key columns): 16 bytes per key in a hash set, ~32 bytes with the set's
//! overhead, so 10 million keys take ~320 MiB. The chance that two different
//! keys collide is ~n²/2¹²⁹: negligible at any realistic table size.
//!
//! Restart cost: the set is snapshotted into the Silver table directory
//! (`_medallion/dedupe-<version>.bin`, sorted hashes) every few commits; at
//! start the newest snapshot is loaded and only the commits after it are read,
//! so start-up reads O(keys) bytes of snapshot plus a bounded tail of commits,
//! never the whole table's Parquet files.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use arrow::array::{ArrayRef, RecordBatch};
use arrow::row::{RowConverter, SortField};
use bytes::Bytes;
use deltalake::{ObjectStore, Path};
use medallion_lake::LakeError;
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

#[derive(Default)]
pub struct KeySet {
    keys: KeyHashSet,
}

impl KeySet {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn contains(&self, k: u128) -> bool {
        self.keys.contains(&k)
    }

    pub fn extend(&mut self, keys: impl IntoIterator<Item = u128>) {
        self.keys.extend(keys);
    }

    pub fn clear(&mut self) {
        self.keys.clear();
    }

    pub fn add_batch(
        &mut self,
        batch: &RecordBatch,
        key: &[String],
    ) -> Result<(), arrow::error::ArrowError> {
        let cols: Vec<ArrayRef> = key
            .iter()
            .map(|k| batch.column_by_name(k).cloned())
            .collect::<Option<_>>()
            .ok_or_else(|| {
                arrow::error::ArrowError::SchemaError("key column missing from Silver".into())
            })?;
        self.keys.extend(key_hashes(&cols)?);
        Ok(())
    }

    fn encode(&self) -> Vec<u8> {
        let mut v: Vec<u128> = self.keys.iter().copied().collect();
        v.sort_unstable();
        let mut out = Vec::with_capacity(8 + v.len() * 16);
        out.extend_from_slice(b"MDK1");
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        for k in v {
            out.extend_from_slice(&k.to_le_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<KeySet> {
        let body = bytes.strip_prefix(b"MDK1")?;
        let n = u32::from_le_bytes(body.get(..4)?.try_into().ok()?) as usize;
        let rest = &body[4..];
        if rest.len() != n * 16 {
            return None;
        }
        let keys = rest
            .chunks_exact(16)
            .map(|c| u128::from_le_bytes(c.try_into().expect("16 bytes")))
            .collect();
        Some(KeySet { keys })
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
            prop_assert_eq!(back.keys.into_iter().collect::<HashSet<u128>>(), keys);
        }
    }

    #[test]
    fn truncated_snapshot_is_refused() {
        let mut set = KeySet::default();
        set.extend([1, 2, 3]);
        let bytes = set.encode();
        assert!(KeySet::decode(&bytes[..bytes.len() - 1]).is_none());
    }
}
