//! Table maintenance on real Delta tables: many small commits merged into
//! few files with every row kept, time travel intact until vacuum passes the
//! retention, checkpoints at the configured interval, crash leftovers
//! cleaned, and Bronze expiry invisible to the layers built from it.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use medallion_lake::maintenance::{self, Compaction, Properties};
use medallion_lake::{
    Lake, TableOptions, TableWriter, WriteMode, commit_summary, open_at, open_table, read_all,
    read_commit,
};
use medallion_spec::TableRef;
use medallion_testkit::rows_read_by_python_deltalake_at;

const COMPACTION: Compaction = Compaction {
    target_file_size: 8 << 20,
    fanout: 4,
};

fn rows(from: i64, n: i64, received_us: i64) -> RecordBatch {
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("qty", DataType::Int64, true),
            Field::new(
                "received_at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
        ])),
        vec![
            Arc::new(StringArray::from(
                (from..from + n)
                    .map(|i| format!("id-{i}"))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from((from..from + n).collect::<Vec<_>>())),
            Arc::new(
                TimestampMicrosecondArray::from(vec![received_us; n as usize]).with_timezone("UTC"),
            ),
        ],
    )
    .unwrap()
}

/// Every `id`, sorted: the rows as a multiset.
fn ids(batches: &[RecordBatch]) -> Vec<String> {
    let mut out: Vec<String> = batches
        .iter()
        .flat_map(|b| {
            let col = b
                .column_by_name("id")
                .unwrap()
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone();
            (0..col.len()).map(move |i| col.value(i).to_string())
        })
        .collect();
    out.sort();
    out
}

fn properties(append_only: Option<bool>) -> Properties {
    Properties {
        checkpoint_interval: 10,
        log_retention: Duration::from_secs(30 * 86400),
        deleted_file_retention: Duration::from_secs(7 * 86400),
        append_only,
    }
}

async fn streamed_table(lake: &Lake, t: &TableRef, commits: i64, options: &TableOptions) -> i64 {
    let now = chrono::Utc::now().timestamp_micros();
    let first = rows(0, 50, now);
    let mut w = TableWriter::open_or_create(lake, t, first.schema(), "stage", options)
        .await
        .unwrap();
    let mut table = w.table().clone();
    maintenance::ensure_properties(
        t,
        &mut table,
        &properties(options.append_only.then_some(true)),
    )
    .await
    .unwrap();
    w.refresh().await.unwrap();
    for i in 0..commits {
        w.commit(&[rows(i * 50, 50, now)], i + 1, WriteMode::Append, &[])
            .await
            .unwrap();
    }
    w.version()
}

#[tokio::test]
async fn small_commits_are_merged_and_time_travel_holds_until_vacuum() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::from_location(dir.path().to_str().unwrap()).unwrap();
    let t = TableRef::silver("shop", "streamed");
    let last = streamed_table(&lake, &t, 64, &TableOptions::default()).await;
    let mut table = open_table(&lake, &t).await.unwrap().unwrap();
    let before = ids(&read_all(&t, &table).await.unwrap());
    assert_eq!(before.len(), 64 * 50);
    let files_before = medallion_lake::list_files(&t, &table).await.unwrap().len();
    assert_eq!(files_before, 64);
    // What a consumer catching up reads of each commit.
    let mut per_commit = Vec::new();
    for v in 0..=last {
        if let Some(c) = read_commit(&t, &table, v).await.unwrap() {
            per_commit.push((v, ids(&c.batches)));
        }
    }
    assert_eq!(per_commit.iter().filter(|(_, r)| r.len() == 50).count(), 64);
    let old_version = 20;
    let old_rows = ids(&read_all(
        &t,
        &open_at(&lake, &t, Some(old_version))
            .await
            .unwrap()
            .unwrap(),
    )
    .await
    .unwrap());

    // Checkpoints come at the configured interval: a reader replays fewer
    // log entries than that on top of the last one.
    let h = maintenance::health(&t, &table, &COMPACTION).await.unwrap();
    assert!(h.checkpoint_version.is_some(), "{h:?}");
    assert!(h.log_since_checkpoint <= 10, "{h:?}");

    // Compaction until nothing is left to merge: a few files, the same rows.
    let mut rounds = 0;
    loop {
        let c = maintenance::compact(&t, &mut table, &COMPACTION)
            .await
            .unwrap();
        if c.files_removed == 0 {
            break;
        }
        rounds += 1;
        let v = c.version.unwrap();
        // Consumers of the table's commits skip a compaction.
        let s = commit_summary(&t, &table, v).await.unwrap().unwrap();
        assert!(!s.has_data(), "compaction seen as data: {s:?}");
        assert!(
            read_commit(&t, &table, v)
                .await
                .unwrap()
                .unwrap()
                .batches
                .is_empty()
        );
    }
    assert!(
        rounds >= 2,
        "64 tiny files take more than one tier of merges"
    );
    let after = medallion_lake::list_files(&t, &table).await.unwrap();
    assert!(
        after.len() < COMPACTION.fanout,
        "{} files left",
        after.len()
    );
    assert_eq!(ids(&read_all(&t, &table).await.unwrap()), before);
    let path = dir.path().join("silver/shop/streamed");
    assert_eq!(
        rows_read_by_python_deltalake_at(&path, None).unwrap(),
        before.len()
    );

    // Time travel still reads the old files until the retention passes.
    let old = open_at(&lake, &t, Some(old_version))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids(&read_all(&t, &old).await.unwrap()), old_rows);
    assert_eq!(
        rows_read_by_python_deltalake_at(&path, Some(old_version)).unwrap(),
        old_rows.len()
    );
    let v = maintenance::vacuum(
        &t,
        &table,
        Duration::from_secs(3600),
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    assert_eq!(v.files_deleted, 0, "nothing is older than the retention");
    let h = maintenance::health(&t, &table, &COMPACTION).await.unwrap();
    assert!(
        h.unreferenced_files >= 64,
        "the merged-away files wait for vacuum: {h:?}"
    );

    // State a stage keeps beside the table survives vacuum.
    let keep = path.join("_medallion/dedupe-1.bin");
    std::fs::create_dir_all(keep.parent().unwrap()).unwrap();
    std::fs::write(&keep, b"state").unwrap();
    // A file written but never committed (a crash mid-compaction).
    let orphan = path.join("part-00000-orphan-of-a-crash.parquet");
    std::fs::copy(path.join(&after[0].path), &orphan).unwrap();

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let v = maintenance::vacuum(&t, &table, Duration::from_secs(1), Duration::from_secs(1))
        .await
        .unwrap();
    assert!(v.files_deleted >= 65, "{v:?}");
    assert!(keep.exists(), "vacuum deleted the stage's own state");
    assert!(
        maintenance::last_vacuum(&table).await.is_some(),
        "the run is recorded"
    );
    assert!(!orphan.exists(), "the crash's leftover is still there");
    let h = maintenance::health(&t, &table, &COMPACTION).await.unwrap();
    assert_eq!(h.unreferenced_files, 0, "{h:?}");
    assert_eq!(ids(&read_all(&t, &table).await.unwrap()), before);
    assert_eq!(
        rows_read_by_python_deltalake_at(&path, None).unwrap(),
        before.len()
    );
    // A consumer that fell behind (or a full refresh from version 1) still
    // reads every old commit's rows: compaction recorded where they went,
    // through every round of merges.
    for (v, want) in &per_commit {
        let got = read_commit(&t, &table, *v).await.unwrap().unwrap();
        assert_eq!(
            &ids(&got.batches),
            want,
            "commit {v} after compaction and vacuum"
        );
    }
    // The old version's files are gone now: time travel that far back fails
    // (the retention is what protects it).
    let err = rows_read_by_python_deltalake_at(&path, Some(old_version));
    assert!(
        err.is_err(),
        "version {old_version} still readable after vacuum: {err:?}"
    );
    assert!(last > old_version);
}

#[tokio::test]
async fn bronze_expiry_removes_only_whole_old_files_and_is_not_a_data_change() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::from_location(dir.path().to_str().unwrap()).unwrap();
    let t = TableRef::bronze("shop", "raw");
    let options = TableOptions {
        append_only: true,
        ..Default::default()
    };
    let now = chrono::Utc::now();
    let old = (now - chrono::Duration::days(100)).timestamp_micros();
    let recent = (now - chrono::Duration::days(1)).timestamp_micros();
    let first = rows(0, 10, old);
    let mut w = TableWriter::open_or_create(&lake, &t, first.schema(), "ingest", &options)
        .await
        .unwrap();
    w.commit(&[first], 1, WriteMode::Append, &[]).await.unwrap();
    w.commit(&[rows(10, 10, old)], 2, WriteMode::Append, &[])
        .await
        .unwrap();
    // One file holding old and recent rows: kept until all of it is old.
    let mixed =
        arrow::compute::concat_batches(&first_schema(), &[rows(20, 5, old), rows(25, 5, recent)])
            .unwrap();
    w.commit(&[mixed], 3, WriteMode::Append, &[]).await.unwrap();
    w.commit(&[rows(30, 10, recent)], 4, WriteMode::Append, &[])
        .await
        .unwrap();

    let mut table = open_table(&lake, &t).await.unwrap().unwrap();
    let cutoff = now - chrono::Duration::days(90);
    // Append-only Bronze refuses the delete: retention must be asked for.
    assert!(
        maintenance::expire(&t, &mut table, "received_at", cutoff)
            .await
            .is_err()
    );
    maintenance::ensure_properties(&t, &mut table, &properties(Some(false)))
        .await
        .unwrap();
    let n = maintenance::expire(&t, &mut table, "received_at", cutoff)
        .await
        .unwrap();
    assert_eq!(n, 2);
    let left = ids(&read_all(&t, &table).await.unwrap());
    assert_eq!(left.len(), 20, "{left:?}");
    assert!(
        left.contains(&"id-20".to_string()),
        "the mixed file was expired early"
    );
    // The transform reading Bronze's commits sees nothing to do.
    let v = table.version().unwrap() as i64;
    let s = commit_summary(&t, &table, v).await.unwrap().unwrap();
    assert!(!s.has_data(), "{s:?}");
    assert!(
        !read_commit(&t, &table, v)
            .await
            .unwrap()
            .unwrap()
            .removed_data
    );
    // Nothing more to expire.
    assert_eq!(
        maintenance::expire(&t, &mut table, "received_at", cutoff)
            .await
            .unwrap(),
        0
    );
}

fn first_schema() -> arrow::datatypes::SchemaRef {
    rows(0, 1, 0).schema()
}
