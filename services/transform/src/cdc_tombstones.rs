//! Deleted keys of a change-feed table, remembered for
//! `spec.cdc.keep_deletes_for` so that an older change arriving after the
//! delete does not bring the row back. A Delta table shows no deleted row,
//! so they are kept beside it: each change-feed commit writes the set to a
//! file of its own (`_medallion/cdc/tombstones-<unique>.arrow`) before it
//! commits, and names that file in the commit's metadata
//! ([`METADATA_KEY`]). A restart reads the file the newest commit naming one
//! names: a set written for a commit that never landed is never read.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, UInt64Type};
use deltalake::{ObjectStore, Path};
use futures::TryStreamExt;
#[allow(unused_imports)]
use object_store::ObjectStoreExt;

use crate::cdc_envelope::SeqValue;

const DIR: &str = "_medallion/cdc";

/// Key hash → the sequences of its deletes → when each was applied (µs).
/// SCD1 needs a key's newest delete only; SCD2 every one its rows do not
/// show (two deletes in a row: the first ends the version before them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tombstones {
    map: HashMap<u128, BTreeMap<SeqValue, i64>>,
}

/// The commit metadata key naming the set a commit wrote.
pub const METADATA_KEY: &str = "medallion.cdc.tombstones";

/// Commits read back from the newest when looking for the one naming a set
/// (maintenance commits in between name none).
const LOOK_BACK: i64 = 50;

impl Tombstones {
    /// Every `(key hash, delete sequence)`.
    pub fn iter(&self) -> impl Iterator<Item = (u128, &SeqValue)> {
        self.map
            .iter()
            .flat_map(|(h, seqs)| seqs.keys().map(move |s| (*h, s)))
    }

    /// Deletes remembered, over all keys.
    pub fn len(&self) -> usize {
        self.map.values().map(BTreeMap::len).sum()
    }

    /// Records a delete (a delete already known keeps when it was first applied).
    pub fn remember(&mut self, hash: u128, seq: SeqValue, now_us: i64) {
        self.map
            .entry(hash)
            .or_default()
            .entry(seq)
            .or_insert(now_us);
    }

    /// When the delete `seq` of `hash` was first applied, if it is known.
    pub fn since(&self, hash: u128, seq: Option<&SeqValue>) -> Option<i64> {
        self.map.get(&hash)?.get(seq?).copied()
    }

    pub fn forget(&mut self, hash: u128) {
        self.map.remove(&hash);
    }

    pub fn expire(&mut self, now_us: i64, keep: std::time::Duration) {
        let since = now_us.saturating_sub(keep.as_micros().min(i64::MAX as u128) as i64);
        self.map.retain(|_, seqs| {
            seqs.retain(|_, at| *at >= since);
            !seqs.is_empty()
        });
    }

    /// Writes the set to a new file, before the commit that names it;
    /// returns the file's name for the commit's metadata.
    pub async fn save(&self, store: &Arc<dyn ObjectStore>) -> Result<String, String> {
        let err = |e: &dyn std::fmt::Display| format!("change-feed tombstones: {e}");
        let mut hi = Vec::with_capacity(self.map.len());
        let mut lo = Vec::with_capacity(self.map.len());
        let mut ints = Vec::with_capacity(self.map.len());
        let mut strs = Vec::with_capacity(self.map.len());
        let mut at = Vec::with_capacity(self.map.len());
        for (h, seq, t) in self
            .map
            .iter()
            .flat_map(|(h, seqs)| seqs.iter().map(move |(s, t)| (h, s, t)))
        {
            hi.push((*h >> 64) as u64);
            lo.push(*h as u64);
            match seq {
                SeqValue::Int(n) => {
                    ints.push(Some(*n));
                    strs.push(None);
                }
                SeqValue::Str(s) => {
                    ints.push(None);
                    strs.push(Some(s.clone()));
                }
            }
            at.push(*t);
        }
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(UInt64Array::from(hi)),
                Arc::new(UInt64Array::from(lo)),
                Arc::new(Int64Array::from(ints)),
                Arc::new(StringArray::from(strs)),
                Arc::new(Int64Array::from(at)),
            ],
        )
        .map_err(|e| err(&e))?;
        let mut bytes = Vec::new();
        {
            let mut w = arrow::ipc::writer::FileWriter::try_new(&mut bytes, &batch.schema())
                .map_err(|e| err(&e))?;
            w.write(&batch).map_err(|e| err(&e))?;
            w.finish().map_err(|e| err(&e))?;
        }
        let name = format!(
            "tombstones-{:020}-{:08x}.arrow",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros())
                .unwrap_or(0),
            rand_suffix()
        );
        store
            .put(&Path::from(format!("{DIR}/{name}")), bytes.into())
            .await
            .map_err(|e| err(&e))?;
        Ok(name)
    }

    /// Removes every set but `keep` (after the commit naming `keep` landed).
    pub async fn clean(store: &Arc<dyn ObjectStore>, keep: &str) {
        let Ok(metas) = store
            .list(Some(&Path::from(DIR)))
            .try_collect::<Vec<_>>()
            .await
        else {
            return;
        };
        for m in metas {
            if m.location.filename() != Some(keep) {
                // Best effort: a leftover is never read (no commit names it).
                let _ = store.delete(&m.location).await;
            }
        }
    }

    /// The set named by the newest commit of `table` that names one; empty
    /// if none does.
    pub async fn load(
        tref: &medallion_spec::TableRef,
        table: &deltalake::DeltaTable,
    ) -> Result<Tombstones, String> {
        let version = table.version().map(|v| v as i64).unwrap_or(-1);
        let mut name = None;
        for v in (0..=version).rev().take(LOOK_BACK as usize) {
            let meta = medallion_lake::commit_metadata(tref, table, v)
                .await
                .map_err(|e| e.to_string())?;
            if let Some(n) = meta
                .as_ref()
                .and_then(|m| m.get(METADATA_KEY))
                .and_then(|n| n.as_str())
            {
                name = Some(n.to_string());
                break;
            }
        }
        let Some(name) = name else {
            return Ok(Tombstones::default());
        };
        let store = table.log_store().object_store(None);
        Self::read(&store, &name).await
    }

    /// The set in file `name`.
    async fn read(store: &Arc<dyn ObjectStore>, name: &str) -> Result<Tombstones, String> {
        let err = |e: &dyn std::fmt::Display| format!("change-feed tombstones: {e}");
        let bytes = store
            .get(&Path::from(format!("{DIR}/{name}")))
            .await
            .map_err(|e| err(&e))?
            .bytes()
            .await
            .map_err(|e| err(&e))?;
        let reader = arrow::ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes), None)
            .map_err(|e| err(&e))?;
        let mut out = Tombstones::default();
        for b in reader {
            let b = b.map_err(|e| err(&e))?;
            let hi = b.column(0).as_primitive::<UInt64Type>();
            let lo = b.column(1).as_primitive::<UInt64Type>();
            let ints = b.column(2).as_primitive::<Int64Type>();
            let strs = b.column(3).as_string::<i32>();
            let at = b.column(4).as_primitive::<Int64Type>();
            for r in 0..b.num_rows() {
                let h = ((hi.value(r) as u128) << 64) | lo.value(r) as u128;
                let seq = if ints.is_valid(r) {
                    SeqValue::Int(ints.value(r))
                } else {
                    SeqValue::Str(strs.value(r).to_string())
                };
                out.map.entry(h).or_default().insert(seq, at.value(r));
            }
        }
        Ok(out)
    }
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("hash_hi", DataType::UInt64, false),
        Field::new("hash_lo", DataType::UInt64, false),
        Field::new("seq_int", DataType::Int64, true),
        Field::new("seq_str", DataType::Utf8, true),
        Field::new("deleted_at_us", DataType::Int64, false),
    ]))
}

/// Tells apart two sets written in the same microsecond (two replicas).
fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_set_is_read_back_and_clean_keeps_only_the_named_one() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let mut t = Tombstones::default();
        t.remember(7, SeqValue::Int(10), 1_000);
        let first = t.save(&store).await.unwrap();
        t.remember(9, SeqValue::Str("a/b".into()), 2_000);
        t.remember(7, SeqValue::Int(10), 2_000); // known: keeps 1,000
        let second = t.save(&store).await.unwrap();
        assert_ne!(first, second);
        assert_eq!(Tombstones::read(&store, &first).await.unwrap().len(), 1);
        let back = Tombstones::read(&store, &second).await.unwrap();
        assert_eq!(back, t);
        Tombstones::clean(&store, &second).await;
        assert!(Tombstones::read(&store, &first).await.is_err());
        assert_eq!(Tombstones::read(&store, &second).await.unwrap(), t);
        let mut e = back.clone();
        e.expire(2_500, std::time::Duration::from_micros(1_000));
        assert_eq!(
            e.len(),
            1,
            "the delete applied at 1,000 µs is past the window"
        );
    }
}
