//! Incremental Gold equals the same SQL run once over all of Silver.

use std::sync::Arc;

use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use datafusion::prelude::SessionContext;
use medallion_aggregate::state::GoldState;
use medallion_spec::Contract;
use proptest::prelude::*;

const SPEC: &str = r#"apiVersion: medallion.dev/v1alpha1
kind: DataProduct
metadata: {name: sales}
spec:
  domain: shop
  owner: t@example.com
  description: merge property
  schema:
    - {name: id, type: string, required: true}
    - {name: ts, type: timestamp}
    - {name: country, type: string}
    - {name: qty, type: int64}
    - {name: price, type: float64}
  key: [id]
  gold:
    - name: by_country_hour
      sql: |
        SELECT country, date_trunc('hour', ts) AS hour, count(*) AS n, count(qty) AS n_qty,
               sum(qty) AS qty, min(qty) AS min_qty, max(price) AS max_price,
               avg(price) AS avg_price, sum(price) AS revenue
        FROM silver WHERE qty IS NULL OR qty < 90 GROUP BY country, date_trunc('hour', ts)
"#;

type Row = (Option<u8>, u8, Option<i64>, Option<f64>);

fn batch(contract: &Contract, rows: &[Row], offset: usize) -> RecordBatch {
    let n = rows.len();
    let countries = ["FR", "DE", "US"];
    RecordBatch::try_new(
        contract.silver_schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("id{}", offset + i)),
            )),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(
                    rows.iter().map(|r| r.1 as i64 * 1_200_000_000),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter(
                rows.iter().map(|r| r.0.map(|c| countries[c as usize % 3])),
            )),
            Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.2))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.3))),
            Arc::new(Int64Array::from_iter_values(0..n as i64)),
            Arc::new(TimestampMicrosecondArray::from_iter_values(vec![0; n]).with_timezone("UTC")),
        ],
    )
    .unwrap()
}

/// Rows as strings, sorted; float cells are returned separately so they can
/// be compared with a tolerance (float sums depend on the order of additions).
fn sorted_rows(b: &RecordBatch, cols: usize) -> Vec<(Vec<String>, Vec<f64>)> {
    let mut rows: Vec<(Vec<String>, Vec<f64>)> = (0..b.num_rows())
        .map(|r| {
            let mut exact = Vec::new();
            let mut floats = Vec::new();
            for c in 0..cols {
                let s = arrow::util::display::array_value_to_string(b.column(c), r).unwrap();
                if b.column(c).data_type() == &arrow::datatypes::DataType::Float64 && !s.is_empty()
                {
                    floats.push(s.parse::<f64>().unwrap());
                } else {
                    exact.push(s);
                }
            }
            (exact, floats)
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

fn assert_same(a: &[(Vec<String>, Vec<f64>)], b: &[(Vec<String>, Vec<f64>)]) {
    assert_eq!(a.len(), b.len(), "group count");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(
            x.0, y.0,
            "exact columns (keys, counts, integer sums, min/max)"
        );
        assert_eq!(x.1.len(), y.1.len());
        for (f, g) in x.1.iter().zip(&y.1) {
            assert!(
                (f - g).abs() <= 1e-9 * f.abs().max(g.abs()).max(1.0),
                "{f} vs {g} in {:?}",
                x.0
            );
        }
    }
}

/// The Gold SQL run once by DataFusion over `silver`.
async fn one_shot(sql: &str, silver: RecordBatch) -> RecordBatch {
    let ctx = SessionContext::new();
    ctx.register_batch("silver", silver).unwrap();
    let df = ctx.sql(sql).await.unwrap();
    // From the plan, not the first batch: a WHERE can leave no batch at all.
    let schema = df.schema().inner().clone();
    let once = df.collect().await.unwrap();
    arrow::compute::concat_batches(&schema, &once).unwrap()
}

fn row_strategy() -> impl Strategy<Value = Row> {
    (
        proptest::option::weighted(0.9, 0u8..3),
        0u8..12,
        proptest::option::weighted(0.9, 0i64..100),
        proptest::option::weighted(0.9, (0i64..100_000).prop_map(|c| c as f64 / 100.0)),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn incremental_equals_one_shot(
        batches in proptest::collection::vec(proptest::collection::vec(row_strategy(), 0..40), 1..8),
        order in any::<proptest::sample::Index>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let contract = Contract::from_yaml(SPEC).await.unwrap();
            let plan = contract.gold[0].clone();
            let mut offset = 0;
            let mut silver: Vec<RecordBatch> = Vec::new();
            for rows in &batches {
                silver.push(batch(&contract, rows, offset));
                offset += rows.len();
            }
            // Merge in a rotated order, and split the state across a "restart"
            // (rebuilt from the Gold rows) halfway through.
            let k = order.index(silver.len());
            let mut rotated = silver.clone();
            rotated.rotate_left(k);
            let mut state = GoldState::new(plan.clone());
            let half = rotated.len() / 2;
            for b in &rotated[..half] {
                let p = state.partials(std::slice::from_ref(b)).await.unwrap();
                state.merge(&p);
            }
            let snapshot = state.all_rows();
            let mut state = GoldState::new(plan.clone());
            state.load_rows(&snapshot);
            for b in &rotated[half..] {
                let p = state.partials(std::slice::from_ref(b)).await.unwrap();
                state.merge(&p);
            }
            let incremental = state.all_rows();

            let once = one_shot(&plan.sql, arrow::compute::concat_batches(&contract.silver_schema, &silver).unwrap()).await;
            let n = plan.output_schema.fields().len();
            assert_same(&sorted_rows(&incremental, n), &sorted_rows(&once, n));
        });
    }
}

#[tokio::test]
async fn unsupported_aggregates_are_rejected_at_registration() {
    let text = SPEC.replace("avg(price) AS avg_price", "median(price) AS med");
    let err = Contract::from_yaml(&text).await.unwrap_err().to_string();
    assert!(
        err.contains("spec.gold[0]") && err.contains("median"),
        "{err}"
    );
}

/// The same product as a change feed: its Gold plan (no min/max) keeps the
/// state to take rows out again.
fn cdc_spec() -> String {
    SPEC.replace(
        "  key: [id]\n",
        "  key: [id]\n  cdc: {format: debezium, sequence_by: source.lsn}\n",
    )
    .replace(" min(qty) AS min_qty, max(price) AS max_price,", "")
}

/// [`batch`] of the plain product, plus the change feed's `__sequence`.
fn cdc_batch(contract: &Contract, plain: &Contract, rows: &[Row], offset: usize) -> RecordBatch {
    let plain = batch(plain, rows, offset);
    let mut cols = plain.columns().to_vec();
    cols.push(Arc::new(Int64Array::from_iter_values(
        (0..rows.len()).map(|i| (offset + i) as i64),
    )));
    RecordBatch::try_new(contract.silver_schema.clone(), cols).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    /// Rows merged, then some taken out again (a change feed's updates and
    /// deletes), across a restart: Gold equals the SQL over the rows left;
    /// a group whose rows are all gone is gone, a sum over only NULLs is NULL.
    #[test]
    fn retracting_rows_equals_one_shot_over_what_is_left(
        rows in proptest::collection::vec(row_strategy(), 1..80),
        gone in proptest::collection::vec(any::<bool>(), 80),
        split in 1usize..4,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let contract = Contract::from_yaml(&cdc_spec()).await.unwrap();
            let plan = contract.gold[0].clone();
            assert!(plan.retraction.is_some(), "counts, sums and avg retract");
            let plain = Contract::from_yaml(SPEC).await.unwrap();
            let all = cdc_batch(&contract, &plain, &rows, 0);
            let mut state = GoldState::new(plan.clone());
            for part in 0..split {
                let (from, to) = (all.num_rows() * part / split, all.num_rows() * (part + 1) / split);
                let p = state.partials(&[all.slice(from, to - from)]).await.unwrap();
                state.merge(&p);
            }
            let out = arrow::array::BooleanArray::from(gone[..all.num_rows()].to_vec());
            let keep = arrow::compute::not(&out).unwrap();
            let removed = arrow::compute::filter_record_batch(&all, &out).unwrap();
            let left = arrow::compute::filter_record_batch(&all, &keep).unwrap();
            // Half taken out, a restart from the Gold rows, then the rest.
            let half = removed.num_rows() / 2;
            let p = state.partials(&[removed.slice(0, half)]).await.unwrap();
            state.retract(&p).unwrap();
            let snapshot = state.all_rows();
            let mut state = GoldState::new(plan.clone());
            state.load_rows(&snapshot);
            let p = state.partials(&[removed.slice(half, removed.num_rows() - half)]).await.unwrap();
            state.retract(&p).unwrap();
            let incremental = state.all_rows();

            let once = one_shot(&plan.sql, left).await;
            let n = plan.output_schema.fields().len();
            assert_same(&sorted_rows(&incremental, n), &sorted_rows(&once, n));
        });
    }
}

#[tokio::test]
async fn a_group_not_in_gold_is_refused_so_gold_is_recomputed() {
    let contract = Contract::from_yaml(&cdc_spec()).await.unwrap();
    let mut state = GoldState::new(contract.gold[0].clone());
    let plain = Contract::from_yaml(SPEC).await.unwrap();
    let b = cdc_batch(&contract, &plain, &[(Some(0), 1, Some(3), Some(1.5))], 0);
    let p = state.partials(&[b]).await.unwrap();
    assert!(state.retract(&p).is_err());
    assert_eq!(state.groups(), 0);
}
