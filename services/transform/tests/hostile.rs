//! Hostile input ends in quarantine with a reason, never a crash, and the
//! counts add up: records in = Silver + quarantine + dropped + duplicates.

use arrow::array::AsArray;
use medallion_spec::Contract;
use medallion_transform::dedupe::KeySet;
use medallion_transform::pipeline::transform;

mod common;
use common::bronze;

const SPEC: &str = r#"apiVersion: medallion.dev/v1alpha1
kind: DataProduct
metadata: {name: hostile}
spec:
  domain: test
  owner: t@example.com
  description: hostile input
  source: {format: json}
  schema:
    - {name: id, type: string, required: true}
    - {name: n, type: int64}
    - {name: x, type: float64}
    - {name: ts, type: timestamp}
    - {name: note, type: string}
  key: [id]
  expectations:
    - {name: small_n, rule: "n IS NULL OR n < 1000", action: drop}
"#;

#[tokio::test]
async fn hostile_records_are_quarantined_and_counts_add_up() {
    let contract = Contract::from_yaml(SPEC).await.unwrap();
    let deep = format!(
        r#"{{"id":"deep","note":{}1{}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let huge = format!(r#"{{"id":"huge","note":"{}"}}"#, "x".repeat(1 << 20));
    let hostile: Vec<(Vec<u8>, &str)> = vec![
        (br#"{"id":"ok1","n":1}"#.to_vec(), ""),
        (br#"{"id":"ok1","n":2}"#.to_vec(), "dup"),
        (br#"{"id":"big","n":5000}"#.to_vec(), "drop"),
        (br#"{"id":"a","n":"12abc"}"#.to_vec(), "not a valid int64"),
        (
            br#"{"id":"b","n":99999999999999999999999}"#.to_vec(),
            "int64",
        ),
        (br#"{"id":"c","x":"NaN"}"#.to_vec(), "float64"),
        (br#"{"id":"d","x":1e999}"#.to_vec(), "float64"),
        (
            br#"{"id":"e","ts":"2024-13-45T99:00:00Z"}"#.to_vec(),
            "timestamp",
        ),
        (br#"{"id":"f","ts":"0000-00-00"}"#.to_vec(), "timestamp"),
        (b"{\"id\":\"g\x00\"}".to_vec(), "NUL"),
        (
            vec![
                b'{', b'"', b'i', b'd', b'"', b':', b'"', 0xff, 0xfe, b'"', b'}',
            ],
            "",
        ),
        (br#"{"id":"h","note":{"a":{"b":{"c":1}}}}"#.to_vec(), ""),
        (deep.into_bytes(), ""),
        (br#"{"id":"#.to_vec(), "malformed"),
        (br#"[]"#.to_vec(), ""),
        (br#"null"#.to_vec(), ""),
        (Vec::new(), "empty"),
        (huge.into_bytes(), ""),
    ];
    let payloads: Vec<Vec<u8>> = hostile.iter().map(|(p, _)| p.clone()).collect();
    let out = transform(
        &contract,
        None,
        &bronze(&payloads, 1),
        1,
        &KeySet::default(),
        &medallion_transform::dedupe::KeyHashSet::default(),
        0,
    )
    .expect("no fail rule");
    let c = &out.counts;
    assert_eq!(c.rows_in as usize, hostile.len());
    assert_eq!(
        c.rows_in,
        c.rows_out + c.quarantined + c.dropped + c.duplicates,
        "{c:?}"
    );
    assert_eq!((c.dropped, c.duplicates), (1, 1));

    let errors = out
        .quarantine
        .column_by_name("errors")
        .unwrap()
        .as_list::<i32>()
        .clone();
    let seqs = out
        .quarantine
        .column_by_name("bronze_seq")
        .unwrap()
        .as_primitive::<arrow::datatypes::Int64Type>()
        .clone();
    let reason_of = |seq: i64| -> Option<String> {
        (0..out.quarantine.num_rows())
            .find(|r| seqs.value(*r) == seq)
            .map(|r| {
                let e = errors.value(r);
                e.as_string::<i32>()
                    .iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("; ")
            })
    };
    for (i, (_, want)) in hostile.iter().enumerate().skip(3) {
        let seq = i as i64 + 1;
        let silver_ids = out
            .silver
            .column_by_name("id")
            .unwrap()
            .as_string::<i32>()
            .clone();
        let in_silver = (0..out.silver.num_rows()).any(|r| {
            out.silver
                .column_by_name("_bronze_seq")
                .unwrap()
                .as_primitive::<arrow::datatypes::Int64Type>()
                .value(r)
                == seq
        });
        match reason_of(seq) {
            Some(reason) => {
                assert!(
                    !reason.is_empty(),
                    "record {i} quarantined without a reason"
                );
                assert!(
                    reason.contains(want),
                    "record {i}: {reason:?} lacks {want:?}"
                );
            }
            None => assert!(
                in_silver,
                "record {i} neither in silver nor quarantined ({silver_ids:?})"
            ),
        }
    }
}
