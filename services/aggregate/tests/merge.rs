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

            let ctx = SessionContext::new();
            ctx.register_batch("silver", arrow::compute::concat_batches(&contract.silver_schema, &silver).unwrap()).unwrap();
            let df = ctx.sql(&plan.sql).await.unwrap();
            // From the plan, not the first batch: a WHERE can leave no batch at all.
            let schema = df.schema().inner().clone();
            let once = df.collect().await.unwrap();
            let once = arrow::compute::concat_batches(&schema, &once).unwrap();
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
