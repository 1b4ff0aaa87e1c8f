use std::sync::Arc;

use arrow::array::{
    Array, AsArray, BinaryArray, Int64Array, MapBuilder, RecordBatch, StringArray, StringBuilder,
    TimestampMicrosecondArray,
};
use medallion_spec::layout::{bronze_schema, quarantine_schema};
use medallion_spec::{Contract, parse_yaml};

use super::*;

fn contract(format: &str) -> Contract {
    let yaml = format!(
        r#"
apiVersion: medallion.dev/v1alpha1
kind: DataProduct
metadata: {{name: orders}}
spec:
  domain: shop
  owner: shop@example.com
  description: orders
  source: {{format: {format}}}
  schema:
    - {{name: id, type: string, required: true}}
    - {{name: customer, type: string, standardize: lower}}
    - {{name: n, type: int64}}
    - {{name: email, type: string, pii: hash}}
    - {{name: phone, type: string, pii: redact}}
  key: [id]
"#
    );
    let product = parse_yaml(&yaml).unwrap();
    futures::executor::block_on(Contract::compile(product)).unwrap()
}

fn bronze(payloads: &[&str]) -> RecordBatch {
    let n = payloads.len();
    let mut headers = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    for _ in 0..n {
        headers.keys().append_value("traceparent");
        headers.values().append_value("00-x");
        headers.append(true).unwrap();
    }
    let schema = bronze_schema();
    let map_type = schema
        .field_with_name("headers")
        .unwrap()
        .data_type()
        .clone();
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(BinaryArray::from_iter_values(
                payloads.iter().map(|p| p.as_bytes()),
            )),
            Arc::new(Int64Array::from_iter_values(1..=n as i64)),
            Arc::new(StringArray::from(vec!["medallion.ingest.shop.orders"; n])),
            Arc::new(TimestampMicrosecondArray::from(vec![1; n]).with_timezone("UTC")),
            Arc::new(TimestampMicrosecondArray::from(vec![2; n]).with_timezone("UTC")),
            Arc::new(StringArray::from(vec![None::<&str>; n])),
            arrow::compute::cast(&headers.finish(), &map_type).unwrap(),
        ],
    )
    .unwrap()
}

fn payloads(b: &RecordBatch) -> Vec<String> {
    let p = b.column_by_name("payload").unwrap().as_binary::<i32>();
    (0..p.len())
        .map(|i| String::from_utf8(p.value(i).to_vec()).unwrap())
        .collect()
}

#[test]
fn bronze_messages_lose_only_the_subjects_lines() {
    let c = contract("ndjson");
    let s = Subject::new(&c, "customer", "Alice", None, "e1").unwrap();
    let b = bronze(&[
        "{\"id\":\"1\",\"customer\":\"ALICE\"}\n{\"id\":\"2\",\"customer\":\"bob\"}\n",
        "{\"id\":\"3\",\"customer\":\"bob\"}",
        "{\"id\":\"4\",\"customer\":\"alice\"}\n",
        "{\"id\":\"5\",\"customer\":\"alice\" broken\n{\"id\":\"6\",\"customer\":\"carol\"}",
    ]);
    let (out, removed) = s.erase_bronze(&b).expect("the subject is there");
    assert_eq!(
        removed, 3,
        "two typed matches and one undecodable record naming her"
    );
    assert_eq!(out.num_rows(), b.num_rows(), "every message keeps its row");
    assert_eq!(
        payloads(&out),
        vec![
            "{\"id\":\"2\",\"customer\":\"bob\"}\n".to_string(),
            "{\"id\":\"3\",\"customer\":\"bob\"}".into(),
            "".into(),
            "{\"id\":\"6\",\"customer\":\"carol\"}".into(),
        ]
    );
    // Only the emptied message is marked, and the others' headers stay.
    let h = out.column_by_name("headers").unwrap().as_map();
    let keys = |row: usize| -> Vec<String> {
        h.value(row)
            .column(0)
            .as_string::<i32>()
            .iter()
            .map(|k| k.unwrap().to_string())
            .collect()
    };
    assert_eq!(keys(0), vec!["traceparent"]);
    assert_eq!(keys(2), vec!["traceparent", ERASED_HEADER]);
    let skipped = without_erased_messages(out);
    assert_eq!(skipped.num_rows(), 3);
    assert!(
        s.erase_bronze(&skipped).is_none(),
        "erasing twice changes nothing"
    );
}

#[test]
fn json_and_csv_messages_are_matched_by_their_typed_column() {
    let c = contract("json");
    let s = Subject::new(&c, "n", "007", None, "e").unwrap();
    let b = bronze(&["{\"id\":\"1\",\"n\":7}", "{\"id\":\"2\",\"n\":70}"]);
    let (out, removed) = s.erase_bronze(&b).unwrap();
    assert_eq!((removed, payloads(&out)[0].as_str()), (1, ""));
    assert_eq!(payloads(&out)[1], "{\"id\":\"2\",\"n\":70}");

    let c = contract("csv");
    let s = Subject::new(&c, "customer", "bob", None, "e").unwrap();
    let b = bronze(&["1,alice,1,,\r\n2,Bob,2,,\r\n3,carol,3,,"]);
    let (out, removed) = s.erase_bronze(&b).unwrap();
    assert_eq!(removed, 1);
    assert_eq!(payloads(&out)[0], "1,alice,1,,\r\n3,carol,3,,");
}

#[test]
fn silver_rows_match_through_the_pii_token() {
    let c = contract("ndjson");
    let key = b"k".as_slice();
    let s = Subject::new(&c, "email", " a@x.org ", Some(key), "e").unwrap();
    let token = crate::cleanse::pii_token(key, " a@x.org ");
    let batch = RecordBatch::try_from_iter(vec![
        (
            "email",
            Arc::new(StringArray::from(vec![
                Some(token.as_str()),
                Some("other"),
                None,
            ])) as Arc<dyn Array>,
        ),
        (
            "n",
            Arc::new(Int64Array::from(vec![1, 2, 3])) as Arc<dyn Array>,
        ),
    ])
    .unwrap();
    let (out, removed) = s.erase_silver(&batch).unwrap();
    assert_eq!((removed, out.num_rows()), (1, 2));
    assert!(s.erase_silver(&out).is_none());
}

#[test]
fn quarantine_rows_are_matched_as_raw_records() {
    let c = contract("ndjson");
    let s = Subject::new(&c, "customer", "alice", None, "e").unwrap();
    let q = quarantine_schema();
    let n = 3;
    let cols: Vec<Arc<dyn Array>> = q
        .fields()
        .iter()
        .map(|f| match f.name().as_str() {
            "payload" => Arc::new(BinaryArray::from_iter_values([
                b"{\"id\":\"1\",\"customer\":\"alice\",\"n\":\"x\"}".as_slice(),
                b"not json, mentions alice",
                b"{\"id\":\"3\",\"customer\":\"bob\",\"n\":\"x\"}",
            ])) as Arc<dyn Array>,
            _ if f.is_nullable() => arrow::array::new_null_array(f.data_type(), n),
            _ => arrow::compute::cast(&Int64Array::from(vec![0; n]), f.data_type()).unwrap(),
        })
        .collect();
    let batch = RecordBatch::try_new(q, cols).unwrap();
    let (out, removed) = s.erase_quarantine(&batch).unwrap();
    assert_eq!((removed, out.num_rows()), (2, 1));
}

#[test]
fn requests_that_cannot_be_applied_say_why() {
    let c = contract("ndjson");
    let e = Subject::new(&c, "nope", "x", None, "e")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("\"nope\"") && e.contains("id, customer, n, email, phone"),
        "{e}"
    );
    let e = Subject::new(&c, "n", "abc", None, "e")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("does not convert"), "{e}");
    let e = Subject::new(&c, "phone", "1", None, "e")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("redact"), "{e}");
    let e = Subject::new(&c, "email", "a", None, "e")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("MEDALLION_PII_KEY"), "{e}");
}
