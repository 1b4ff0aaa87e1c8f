//! The apply step against a real Delta table: any order of arrival, any
//! split into commits, duplicates and restarts (state read back from the
//! table) give the table a sequence-ordered replay gives.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::Int64Type;
use medallion_lake::{Lake, TableOptions, TableWriter, read_all};
use medallion_spec::{Contract, TableRef};
use proptest::prelude::*;

use crate::cdc_apply::{CdcTable, change_schema};

async fn contract(stored_as: &str) -> Contract {
    Contract::from_yaml(&format!(
        "apiVersion: medallion.dev/v1alpha1\nkind: DataProduct\nmetadata: {{name: t}}\nspec:\n  domain: d\n  schema:\n    - {{name: id, type: int64, required: true}}\n    - {{name: v, type: string}}\n  key: [id]\n  cdc: {{format: debezium, sequence_by: source.lsn, stored_as: {stored_as}}}\n"
    ))
    .await
    .unwrap()
}

/// `(key, sequence, op)`; the value written is derived from both.
type Change = (i64, i64, char);

fn batch(c: &Contract, changes: &[Change]) -> RecordBatch {
    let n = changes.len();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(changes.iter().map(|c| c.0))),
        Arc::new(StringArray::from_iter(
            changes
                .iter()
                .map(|(k, s, op)| (*op != 'd').then(|| format!("k{k}@{s}"))),
        )),
        Arc::new(Int64Array::from(vec![1; n])),
        Arc::new(TimestampMicrosecondArray::from(vec![0; n]).with_timezone("UTC")),
        Arc::new(Int64Array::from_iter_values(changes.iter().map(|c| c.1))),
        Arc::new(StringArray::from_iter_values(
            changes.iter().map(|c| c.2.to_string()),
        )),
    ];
    RecordBatch::try_new(change_schema(c), columns).unwrap()
}

/// What replaying the distinct changes in sequence order gives: SCD1 rows
/// `(key, value, seq, None)`, SCD2 rows `(key, value, start, end)`.
fn reference(changes: &[Change], scd2: bool) -> BTreeSet<(i64, String, i64, Option<i64>)> {
    let mut per_key: BTreeMap<i64, BTreeMap<i64, char>> = BTreeMap::new();
    for (k, s, op) in changes {
        per_key.entry(*k).or_default().entry(*s).or_insert(*op);
    }
    let mut out = BTreeSet::new();
    for (k, events) in per_key {
        let events: Vec<(i64, char)> = events.into_iter().collect();
        if scd2 {
            for (i, (s, op)) in events.iter().enumerate() {
                if *op != 'd' {
                    out.insert((k, format!("k{k}@{s}"), *s, events.get(i + 1).map(|e| e.0)));
                }
            }
        } else if let Some((s, op)) = events.last()
            && *op != 'd'
        {
            out.insert((k, format!("k{k}@{s}"), *s, None));
        }
    }
    out
}

fn rows(batches: &[RecordBatch], scd2: bool) -> BTreeSet<(i64, String, i64, Option<i64>)> {
    let mut out = BTreeSet::new();
    for b in batches {
        let id = b.column_by_name("id").unwrap().as_primitive::<Int64Type>();
        let v = b.column_by_name("v").unwrap().as_string::<i32>();
        let (start, end) = if scd2 {
            (
                b.column_by_name("__start_at").unwrap(),
                b.column_by_name("__end_at"),
            )
        } else {
            (b.column_by_name("__sequence").unwrap(), None)
        };
        let start = start.as_primitive::<Int64Type>();
        for r in 0..b.num_rows() {
            let end = end.and_then(|e| {
                let e = e.as_primitive::<Int64Type>();
                e.is_valid(r).then(|| e.value(r))
            });
            let row = (id.value(r), v.value(r).to_string(), start.value(r), end);
            assert!(out.insert(row.clone()), "row twice: {row:?}");
        }
    }
    out
}

/// Applies `commits` one after the other (reading the state back from the
/// table before those flagged), returns the table's rows.
async fn run(
    scd2: bool,
    commits: &[(Vec<Change>, bool)],
) -> BTreeSet<(i64, String, i64, Option<i64>)> {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::from_location(dir.path().to_str().unwrap()).unwrap();
    let c = contract(if scd2 { "scd2" } else { "scd1" }).await;
    let tref = TableRef::silver("d", "t");
    let mut w = TableWriter::open_or_create(
        &lake,
        &tref,
        c.silver_schema.clone(),
        "test",
        &TableOptions::default(),
    )
    .await
    .unwrap();
    let mut table = CdcTable::empty(w.version());
    for (i, (changes, restart)) in commits.iter().enumerate() {
        if *restart {
            table = CdcTable::load(&c, &w).await.unwrap();
        }
        let applied = table
            .apply(&c, &w, &[batch(&c, changes)], 1_000_000)
            .await
            .unwrap();
        let store = w.table().log_store().object_store(None);
        let name = applied.tombstones.save(&store).await.unwrap();
        let mode = medallion_lake::WriteMode::Replace(applied.removes.clone());
        let groups = applied.groups.clone();
        let metadata = [(crate::cdc_tombstones::METADATA_KEY, name.into())];
        let v = match w
            .commit_files(&groups, i as i64 + 1, mode, &metadata)
            .await
            .unwrap()
        {
            medallion_lake::CommitOutcome::Committed(v) => v,
            other => panic!("{other:?}"),
        };
        table.committed(&w, applied, v).await.unwrap();
    }
    rows(&read_all(&tref, w.table()).await.unwrap(), scd2)
}

fn commits() -> impl Strategy<Value = (Vec<Change>, Vec<(Vec<Change>, bool)>)> {
    // Up to 12 keys, each with a few changes at distinct sequences.
    let changes = prop::collection::vec(
        (
            0i64..12,
            0i64..40,
            prop::sample::select(vec!['c', 'u', 'd', 'r']),
        ),
        1..60,
    )
    .prop_map(|mut v| {
        // One change per (key, sequence): a duplicate is the same change.
        let mut seen = BTreeSet::new();
        v.retain(|(k, s, _)| seen.insert((*k, *s)));
        v
    });
    changes.prop_flat_map(|all| {
        let n = all.len();
        (
            Just(all.clone()),
            Just(all).prop_shuffle(),
            prop::collection::vec(0..n, 0..n / 3 + 1),
            prop::collection::vec(any::<bool>(), 4),
            1usize..5,
        )
            .prop_map(|(all, shuffled, dupes, restarts, parts)| {
                let mut arriving = shuffled.clone();
                arriving.extend(dupes.iter().map(|i| shuffled[*i]));
                let size = arriving.len().div_ceil(parts);
                let commits = arriving
                    .chunks(size.max(1))
                    .enumerate()
                    .map(|(i, c)| (c.to_vec(), restarts[i % 4]))
                    .collect();
                (all, commits)
            })
    })
}

proptest! {
    // PROPTEST_CASES raises it for a longer search.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        ..ProptestConfig::default()
    })]

    #[test]
    fn scd1_and_scd2_equal_a_sequence_ordered_replay((all, commits) in commits()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for scd2 in [false, true] {
            let got = rt.block_on(run(scd2, &commits));
            prop_assert_eq!(got, reference(&all, scd2), "scd2 = {}", scd2);
        }
    }
}

#[tokio::test]
async fn a_key_deleted_in_one_commit_and_inserted_in_a_later_one_is_back() {
    // The tombstone of the first commit is all the second one knows of the key.
    let commits = vec![
        (vec![(1, 1, 'c'), (1, 2, 'd'), (2, 1, 'c')], false),
        (vec![(1, 3, 'c')], true),
        (vec![(1, 0, 'u')], false),
    ];
    let all: Vec<Change> = commits.iter().flat_map(|(c, _)| c.clone()).collect();
    for scd2 in [false, true] {
        assert_eq!(
            run(scd2, &commits).await,
            reference(&all, scd2),
            "scd2 = {scd2}"
        );
    }
}
