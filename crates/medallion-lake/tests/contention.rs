//! Many writers appending to one table at once — a hot product's ingest
//! units, each committing its own partition's rows into one Bronze table.
//! Blind appends do not conflict with one another, so none of them may fail
//! for losing the race to commit: an ingest unit whose commit fails rewrites
//! its files and goes not-ready until its retry lands.

use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use medallion_lake::{CommitOutcome, Lake, TableOptions, TableWriter, WriteMode, read_all};
use medallion_spec::TableRef;

/// As many as a product can have partitions: one ingest unit each.
const WRITERS: usize = medallion_spec::model::MAX_PARTITIONS as usize;
const COMMITS: i64 = 3;

fn rows(writer: usize, step: i64) -> RecordBatch {
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("qty", DataType::Int64, true),
        ])),
        vec![
            Arc::new(StringArray::from(vec![format!("{writer}-{step}")])),
            Arc::new(Int64Array::from(vec![step])),
        ],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_racing_for_one_table_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::from_location(dir.path().to_str().unwrap()).unwrap();
    let t = TableRef::bronze("shop", "hot");
    TableWriter::open_or_create(
        &lake,
        &t,
        rows(0, 0).schema(),
        "setup",
        &TableOptions::default(),
    )
    .await
    .unwrap();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let lake = lake.clone();
        let t = t.clone();
        writers.spawn(async move {
            let mut writer = TableWriter::open(&lake, &t, &format!("unit-{w}"))
                .await
                .unwrap()
                .unwrap();
            for step in 1..=COMMITS {
                let outcome = writer
                    .commit(&[rows(w, step)], step, WriteMode::Append, &[])
                    .await
                    .unwrap_or_else(|e| panic!("writer {w} step {step}: {e}"));
                assert!(
                    matches!(outcome, CommitOutcome::Committed(_)),
                    "{outcome:?}"
                );
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    let reader = TableWriter::open(&lake, &t, "reader")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reader.version(), WRITERS as i64 * COMMITS);
    let total: usize = read_all(&t, reader.table())
        .await
        .unwrap()
        .iter()
        .map(RecordBatch::num_rows)
        .sum();
    assert_eq!(total, WRITERS * COMMITS as usize);
}
