//! Golden tests: spec + raw messages → expected Silver rows, quarantine rows
//! and quality counts. One YAML fixture per case in `tests/golden/`.

use std::path::PathBuf;

use arrow::array::RecordBatch;
use medallion_spec::Contract;
use medallion_transform::dedupe::KeySet;
use medallion_transform::pipeline::transform;
use rstest::rstest;
use serde_json::Value;

mod common;
use common::bronze;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    spec: String,
    /// Each entry is one Bronze commit (a list of message payloads).
    commits: Vec<Vec<String>>,
    silver: Vec<Value>,
    #[serde(default)]
    quarantine: Vec<Value>,
    #[serde(default)]
    counts: Option<Value>,
    #[serde(default)]
    halt: Option<String>,
}

fn to_json(batch: &RecordBatch, skip: &[&str]) -> Vec<Value> {
    let keep: Vec<usize> = (0..batch.num_columns())
        .filter(|i| !skip.contains(&batch.schema().field(*i).name().as_str()))
        .collect();
    let b = batch.project(&keep).unwrap();
    let mut w = arrow_json::ArrayWriter::new(Vec::new());
    w.write(&b).unwrap();
    w.finish().unwrap();
    let bytes = w.into_inner();
    if bytes.is_empty() {
        return Vec::new();
    }
    serde_json::from_slice(&bytes).unwrap()
}

#[rstest]
#[tokio::test]
async fn golden(#[files("tests/golden/*.yaml")] path: PathBuf) {
    let case: Case = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let contract = Contract::from_yaml(&case.spec)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut keys = KeySet::default();
    let mut silver = Vec::new();
    let mut quarantine = Vec::new();
    let mut counts = medallion_transform::pipeline::QualityCounts::default();
    let mut seq = 1;
    for (v, commit) in case.commits.iter().enumerate() {
        let b = bronze(commit, seq);
        seq += commit.len() as i64;
        match transform(
            &contract,
            Some(b"golden-test-key-0123456789"),
            &b,
            v as i64 + 1,
            &keys,
            &medallion_transform::dedupe::KeyHashSet::default(),
            0,
        ) {
            Ok(out) => {
                keys.extend(out.new_keys.iter().copied());
                silver.extend(to_json(&out.silver, &["_ingested_at"]));
                quarantine.extend(
                    to_json(&out.quarantine, &["quarantined_at", "payload"])
                        .into_iter()
                        .zip(
                            arrow::array::AsArray::as_binary::<i32>(out.quarantine.column(0))
                                .iter()
                                .map(|p| String::from_utf8_lossy(p.unwrap()).to_string()),
                        )
                        .map(|(mut row, payload)| {
                            row.as_object_mut()
                                .unwrap()
                                .insert("payload".into(), Value::String(payload));
                            row
                        }),
                );
                counts.add(&out.counts);
            }
            Err(h) => {
                let want = case
                    .halt
                    .as_deref()
                    .unwrap_or_else(|| panic!("{}: unexpected halt: {h}", path.display()));
                assert!(
                    h.to_string().contains(want),
                    "{}: halt {h} lacks {want}",
                    path.display()
                );
                break;
            }
        }
    }
    let name = path.display();
    assert_eq!(
        silver,
        case.silver,
        "{name}: silver rows\n{}",
        serde_json::to_string_pretty(&silver).unwrap()
    );
    assert_eq!(
        quarantine,
        case.quarantine,
        "{name}: quarantine rows\n{}",
        serde_json::to_string_pretty(&quarantine).unwrap()
    );
    if let Some(want) = case.counts {
        let got = serde_json::to_value(&counts).unwrap();
        for (k, v) in want.as_object().unwrap() {
            assert_eq!(&got[k], v, "{name}: counts.{k} in {got}");
        }
    }
}
