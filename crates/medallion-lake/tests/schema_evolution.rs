//! A spec change reaches the table: added nullable columns evolve it in
//! place; anything else needs a full refresh, which rewrites the schema.

use std::sync::Arc;

use arrow::array::{Array, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use medallion_lake::{CommitOutcome, Lake, TableOptions, TableWriter, WriteMode, read_all};
use medallion_spec::TableRef;

fn batch(fields: Vec<Field>, cols: Vec<Arc<dyn Array>>) -> RecordBatch {
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
}

fn v1(ids: &[&str]) -> RecordBatch {
    batch(
        vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("amount", DataType::Int64, true),
        ],
        vec![
            Arc::new(StringArray::from(ids.to_vec())),
            Arc::new(Int64Array::from(vec![1i64; ids.len()])),
        ],
    )
}

#[tokio::test]
async fn added_nullable_column_appends_and_breaking_change_needs_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::from_location(dir.path().to_str().unwrap()).unwrap();
    let t = TableRef::silver("finance", "evolve");
    let first = v1(&["a", "b"]);
    let mut w =
        TableWriter::open_or_create(&lake, &t, first.schema(), "test", &TableOptions::default())
            .await
            .unwrap();
    assert_eq!(
        w.commit(&[first], 1, WriteMode::Append, &[]).await.unwrap(),
        CommitOutcome::Committed(1)
    );

    // v2 adds an optional column: appended in place, old rows read it as NULL.
    let second = batch(
        vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("amount", DataType::Int64, true),
            Field::new("note", DataType::Utf8, true),
        ],
        vec![
            Arc::new(StringArray::from(vec!["c"])),
            Arc::new(Int64Array::from(vec![2])),
            Arc::new(StringArray::from(vec![Some("new")])),
        ],
    );
    w.commit(&[second], 2, WriteMode::Append, &[])
        .await
        .unwrap();
    assert_eq!(w.schema().fields().len(), 3);
    let reopened = TableWriter::open(&lake, &t, "test").await.unwrap().unwrap();
    assert_eq!(reopened.schema().field(2).name(), "note");
    let rows = read_all(&t, reopened.table()).await.unwrap();
    let notes: Vec<Option<String>> = rows
        .iter()
        .flat_map(|b| {
            let i = b.schema().index_of("note").unwrap();
            let a = b
                .column(i)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone();
            (0..a.len())
                .map(move |r| a.is_valid(r).then(|| a.value(r).to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut sorted = notes.clone();
    sorted.sort();
    assert_eq!(sorted, vec![None, None, Some("new".to_string())]);

    // v3 retypes `amount`: refused on append, with the reason and the fix…
    let retyped = batch(
        vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("amount", DataType::Float64, true),
        ],
        vec![
            Arc::new(StringArray::from(vec!["d"])),
            Arc::new(Float64Array::from(vec![2.5])),
        ],
    );
    let err = w
        .commit(&[retyped.clone()], 3, WriteMode::Append, &[])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("amount changes type"), "{err}");
    assert!(err.contains("column note is missing"), "{err}");
    assert!(err.contains("full refresh"), "{err}");

    // …and taken by a full refresh, which keeps the old versions for time travel.
    w.commit(&[retyped], 3, WriteMode::Overwrite, &[])
        .await
        .unwrap();
    let reopened = TableWriter::open(&lake, &t, "test").await.unwrap().unwrap();
    assert_eq!(reopened.schema().fields().len(), 2);
    assert_eq!(reopened.schema().field(1).data_type(), &DataType::Float64);
    let rows: usize = read_all(&t, reopened.table())
        .await
        .unwrap()
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert_eq!(rows, 1);
    let old = medallion_lake::open_at(&lake, &t, Some(1))
        .await
        .unwrap()
        .unwrap();
    let old_rows: usize = read_all(&t, &old)
        .await
        .unwrap()
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert_eq!(old_rows, 2);
}
