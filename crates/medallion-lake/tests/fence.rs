//! The fence behind the leases: two writers with the same app id (a replica
//! that lost its lease mid-step and the one that took the unit over) can
//! never both advance the cursor, and an emptied table (a full refresh)
//! takes a new schema with its first rows.

use std::sync::Arc;

use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use medallion_lake::{CommitOutcome, Lake, TableOptions, TableWriter, WriteMode, read_all};
use medallion_spec::TableRef;

fn rows(ids: &[&str]) -> RecordBatch {
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("qty", DataType::Int64, true),
        ])),
        vec![
            Arc::new(StringArray::from(ids.to_vec())),
            Arc::new(Int64Array::from(vec![1i64; ids.len()])),
        ],
    )
    .unwrap()
}

fn total(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

#[tokio::test]
async fn a_stale_writer_cannot_advance_a_cursor_another_writer_moved() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::from_location(dir.path().to_str().unwrap()).unwrap();
    let t = TableRef::silver("shop", "fenced");
    let first = rows(&["a"]);
    let mut old =
        TableWriter::open_or_create(&lake, &t, first.schema(), "stage", &TableOptions::default())
            .await
            .unwrap();
    old.commit(&[first], 1, WriteMode::Append, &[])
        .await
        .unwrap();
    // The new holder opens the table and commits step 2 first.
    let mut new = TableWriter::open(&lake, &t, "stage")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        new.commit(&[rows(&["b"])], 2, WriteMode::Append, &[])
            .await
            .unwrap(),
        CommitOutcome::Committed(2)
    );
    // The old holder, on its stale snapshot, tries the same step: refused by
    // the transaction check, and once it has re-read the table it sees the
    // step done.
    let late = old.commit(&[rows(&["b"])], 2, WriteMode::Append, &[]).await;
    assert!(late.is_err(), "a stale writer committed: {late:?}");
    assert_eq!(
        old.commit(&[rows(&["b"])], 2, WriteMode::Append, &[])
            .await
            .unwrap(),
        CommitOutcome::AlreadyCommitted(2)
    );
    // Another app id's cursor is not fenced by this one.
    let mut other = TableWriter::open(&lake, &t, "other")
        .await
        .unwrap()
        .unwrap();
    other
        .commit(&[rows(&["c"])], 1, WriteMode::Append, &[])
        .await
        .unwrap();
    let table = TableWriter::open(&lake, &t, "reader")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(total(&read_all(&t, table.table()).await.unwrap()), 3);
}

#[tokio::test]
async fn an_emptied_table_takes_a_new_schema_with_its_first_rows() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::from_location(dir.path().to_str().unwrap()).unwrap();
    let t = TableRef::silver("shop", "refreshed");
    let first = rows(&["a", "b"]);
    let mut w =
        TableWriter::open_or_create(&lake, &t, first.schema(), "stage", &TableOptions::default())
            .await
            .unwrap();
    w.commit(&[first], 1, WriteMode::Append, &[]).await.unwrap();
    let retyped = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("qty", DataType::Float64, true),
        ])),
        vec![
            Arc::new(StringArray::from(vec!["a"])),
            Arc::new(Float64Array::from(vec![1.5])),
        ],
    )
    .unwrap();
    // Rows are there: a retyped column is refused.
    assert!(
        w.commit(&[retyped.clone()], 2, WriteMode::Append, &[])
            .await
            .is_err()
    );
    // Emptied (the first commit of a full refresh), the table takes it.
    w.commit(&[], 3, WriteMode::Overwrite, &[]).await.unwrap();
    w.commit(&[retyped], 4, WriteMode::Append, &[])
        .await
        .unwrap();
    let reopened = TableWriter::open(&lake, &t, "reader")
        .await
        .unwrap()
        .unwrap();
    let after = read_all(&t, reopened.table()).await.unwrap();
    assert_eq!(total(&after), 1);
    assert_eq!(
        after[0]
            .schema()
            .field_with_name("qty")
            .unwrap()
            .data_type(),
        &DataType::Float64
    );
}
