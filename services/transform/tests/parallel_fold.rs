//! The transform cuts Bronze batches into slices, runs them in parallel, each
//! against the committed key set only, then removes keys an earlier slice
//! already keeps. That must equal transforming whole batches one after another.

mod common;

use arrow::array::AsArray;
use common::bronze;
use medallion_spec::Contract;
use medallion_transform::dedupe::{KeyHashSet, KeySet};
use medallion_transform::pipeline::{QualityCounts, drop_keys_seen, slices, transform};
use proptest::prelude::*;

const SPEC: &str = r#"apiVersion: medallion.dev/v1alpha1
kind: DataProduct
metadata: {name: fold}
spec:
  domain: test
  owner: t@example.com
  description: parallel fold
  source: {format: ndjson}
  schema:
    - {name: id, type: string, required: true}
    - {name: n, type: int64}
  key: [id]
  expectations:
    - {name: not_negative, rule: "n IS NULL OR n >= 0", action: quarantine}
    - {name: not_huge, rule: "n IS NULL OR n < 15", action: drop}
"#;

fn contract() -> &'static Contract {
    static C: std::sync::OnceLock<Contract> = std::sync::OnceLock::new();
    C.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(Contract::from_yaml(SPEC))
            .unwrap()
    })
}

fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (0..12u8, proptest::option::of(-3..20i64)).prop_map(|(k, n)| match n {
            Some(n) => format!(r#"{{"id":"k{k}","n":{n}}}"#),
            None => format!(r#"{{"id":"k{k}"}}"#),
        }),
        1 => Just(r#"{"id":"k1","n":"not a number"}"#.to_string()),
        1 => Just("{broken".to_string()),
    ]
}

fn batches() -> impl Strategy<Value = Vec<Vec<String>>> {
    proptest::collection::vec(
        proptest::collection::vec(proptest::collection::vec(line(), 1..6), 1..5),
        1..6,
    )
    .prop_map(|bs| {
        bs.into_iter()
            .map(|msgs| msgs.into_iter().map(|m| m.join("\n")).collect())
            .collect()
    })
}

fn rows(b: &arrow::array::RecordBatch) -> Vec<String> {
    let opts = arrow::util::display::FormatOptions::default();
    let cols: Vec<_> = b
        .columns()
        .iter()
        .map(|c| arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &opts).unwrap())
        .collect();
    (0..b.num_rows())
        .map(|r| {
            cols.iter()
                .map(|c| c.value(r).to_string())
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn sliced_parallel_then_fold_equals_sequential(input in batches(), committed in proptest::collection::vec(0..12u8, 0..4), slice_bytes in 1..300usize) {
        let contract = contract();
        // Keys already in Silver before the step.
        let mut seen = KeySet::default();
        let pre: Vec<String> = committed.iter().map(|k| format!(r#"{{"id":"k{k}","n":1}}"#)).collect();
        if !pre.is_empty() {
            let o = transform(contract, None, &bronze(&[pre.join("\n")], 1), 1, &seen, &KeyHashSet::default(), 0).unwrap();
            seen.extend(o.new_keys);
        }

        let mut seq_pending = KeyHashSet::default();
        let (mut seq_silver, mut seq_quarantine, mut seq_counts) = (Vec::new(), Vec::new(), QualityCounts::default());
        let mut earlier = KeyHashSet::default();
        let (mut par_silver, mut par_quarantine, mut par_counts) = (Vec::new(), Vec::new(), QualityCounts::default());
        let mut seq_no = 100;
        for (v, msgs) in input.iter().enumerate() {
            let b = bronze(msgs, seq_no);
            seq_no += msgs.len() as i64;
            let v = v as i64 + 2;

            let s = transform(contract, None, &b, v, &seen, &seq_pending, 0).unwrap();
            seq_pending.extend(s.new_keys.iter().copied());
            seq_silver.extend(rows(&s.silver));
            seq_quarantine.extend(rows(&s.quarantine));
            seq_counts.add(&s.counts);

            let parts = slices(&b, slice_bytes);
            prop_assert_eq!(parts.iter().map(|p| p.num_rows()).sum::<usize>(), b.num_rows());
            for part in &parts {
                let offsets = part.column_by_name("payload").unwrap().as_binary::<i32>().value_offsets();
                let bytes = (offsets[part.num_rows()] - offsets[0]) as usize;
                prop_assert!(part.num_rows() <= 1 || bytes <= slice_bytes, "{} rows, {} bytes", part.num_rows(), bytes);
                let mut p = transform(contract, None, part, v, &seen, &KeyHashSet::default(), 0).unwrap();
                drop_keys_seen(&mut p, &earlier);
                prop_assert_eq!(p.new_keys.len(), p.silver.num_rows());
                earlier.extend(p.new_keys.iter().copied());
                par_silver.extend(rows(&p.silver));
                par_quarantine.extend(rows(&p.quarantine));
                par_counts.add(&p.counts);
            }
        }
        // Silver keeps Bronze order; quarantine rows are the same set.
        seq_quarantine.sort();
        par_quarantine.sort();
        prop_assert_eq!(par_silver, seq_silver);
        prop_assert_eq!(par_quarantine, seq_quarantine);
        prop_assert_eq!(par_counts, seq_counts);
        prop_assert_eq!(earlier, seq_pending);
    }
}
