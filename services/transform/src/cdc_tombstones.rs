//! Deleted keys of a change-feed table, remembered for
//! `spec.cdc.keep_deletes_for` so that an older change arriving after the
//! delete does not bring the row back. A Delta table shows no deleted row,
//! so they are kept beside it: one Arrow IPC file per Silver version that
//! has any (`_medallion/cdc/tombstones-<version>.arrow`), written before
//! the commit of that version; a restart reads the newest at or below the
//! table's version.

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

fn path(version: i64) -> Path {
    Path::from(format!("{DIR}/tombstones-{version:020}.arrow"))
}

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

    /// Writes the set for Silver `version` (before its commit: a commit
    /// never lands without its tombstones), and removes older sets but the
    /// one before, which a reader of the previous version may still load.
    pub async fn save(&self, store: &Arc<dyn ObjectStore>, version: i64) -> Result<(), String> {
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
        store
            .put(&path(version), bytes.into())
            .await
            .map_err(|e| err(&e))?;
        // The newest set below this one stays: if this commit never lands,
        // a restart reads it. Older ones go (best effort: a leftover is only
        // read if nothing newer is).
        let sets = list(store).await?;
        if let Some(keep) = sets.iter().map(|(v, _)| *v).filter(|v| *v < version).max() {
            for (v, p) in sets {
                if v < keep {
                    let _ = store.delete(&p).await;
                }
            }
        }
        Ok(())
    }

    /// The newest set at or below `version`; empty if there is none.
    pub async fn load(store: &Arc<dyn ObjectStore>, version: i64) -> Result<Tombstones, String> {
        let err = |e: &dyn std::fmt::Display| format!("change-feed tombstones: {e}");
        let Some((_, p)) = list(store)
            .await?
            .into_iter()
            .filter(|(v, _)| *v <= version)
            .max_by_key(|(v, _)| *v)
        else {
            return Ok(Tombstones::default());
        };
        let bytes = store
            .get(&p)
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

/// Every set's `(version, path)`.
async fn list(store: &Arc<dyn ObjectStore>) -> Result<Vec<(i64, Path)>, String> {
    let metas: Vec<_> = store
        .list(Some(&Path::from(DIR)))
        .try_collect()
        .await
        .map_err(|e| format!("change-feed tombstones: {e}"))?;
    Ok(metas
        .into_iter()
        .filter_map(|m| {
            let name = m.location.filename()?;
            let v = name
                .strip_prefix("tombstones-")?
                .strip_suffix(".arrow")?
                .parse()
                .ok()?;
            Some((v, m.location))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_newest_set_at_or_below_a_version_is_read_back() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let mut t = Tombstones::default();
        t.remember(7, SeqValue::Int(10), 1_000);
        t.save(&store, 3).await.unwrap();
        t.remember(9, SeqValue::Str("a/b".into()), 2_000);
        t.remember(7, SeqValue::Int(10), 2_000); // known: keeps 1,000
        t.save(&store, 5).await.unwrap();
        assert_eq!(Tombstones::load(&store, 2).await.unwrap().len(), 0);
        // Commit 5 may never land: the set of 3 is what version 4 reads.
        assert_eq!(Tombstones::load(&store, 4).await.unwrap().len(), 1);
        t.save(&store, 8).await.unwrap();
        assert_eq!(
            Tombstones::load(&store, 4).await.unwrap().len(),
            0,
            "the set of 3 is gone"
        );
        assert_eq!(Tombstones::load(&store, 7).await.unwrap().len(), 2);
        let back = Tombstones::load(&store, 9).await.unwrap();
        assert_eq!(back, t);
        let mut e = back.clone();
        e.expire(2_500, std::time::Duration::from_micros(1_000));
        assert_eq!(
            e.len(),
            1,
            "the delete applied at 1,000 µs is past the window"
        );
    }
}
