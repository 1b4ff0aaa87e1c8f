//! Keyed aggregate state of one Gold table: partial results per group,
//! merged batch by batch, kept in memory and rebuilt from the Gold table.
//!
//! Groups are spread over [`BUCKETS`] buckets by key hash, and the Gold table
//! holds one data file per bucket. A commit rewrites only the buckets a batch
//! touched (Delta remove + add in one commit), so its cost follows the groups
//! touched, never the table. Buckets rather than a partition column keep the
//! table's columns exactly the user's SELECT.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, SortField};
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::TreeNode;
use datafusion::datasource::{MemTable, provider_as_source};
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder};
use datafusion::prelude::SessionContext;
use medallion_spec::{AggKind, GoldPlan, OutputColumn};
use xxhash_rust::xxh3::xxh3_64;

pub const BUCKETS: usize = 64;

#[derive(Debug, Clone)]
struct Group {
    keys: Vec<ScalarValue>,
    partials: Vec<ScalarValue>,
}

pub struct GoldState {
    pub plan: GoldPlan,
    /// How each partial merges: Count, Sum, Min or Max.
    merge: Vec<AggKind>,
    converter: RowConverter,
    buckets: Vec<HashMap<Vec<u8>, Group>>,
    pub table_schema: SchemaRef,
}

pub fn bucket_of(key: &[u8]) -> usize {
    (xxh3_64(key) % BUCKETS as u64) as usize
}

impl GoldState {
    pub fn new(plan: GoldPlan) -> Self {
        let mut merge = vec![AggKind::Count; plan.partial_exprs.len()];
        for a in &plan.aggregates {
            match a.kind {
                AggKind::Avg => {
                    merge[a.partials[0]] = AggKind::Sum;
                    merge[a.partials[1]] = AggKind::Count;
                }
                k => merge[a.partials[0]] = k,
            }
        }
        let converter = RowConverter::new(
            plan.keys
                .iter()
                .map(|k| SortField::new(k.data_type.clone()))
                .collect(),
        )
        .expect("group key types are row-encodable");
        let table_schema = plan.table_schema();
        GoldState {
            plan,
            merge,
            converter,
            buckets: (0..BUCKETS).map(|_| HashMap::new()).collect(),
            table_schema,
        }
    }

    pub fn groups(&self) -> usize {
        self.buckets.iter().map(HashMap::len).sum()
    }

    pub fn clear(&mut self) {
        self.buckets.iter_mut().for_each(HashMap::clear);
    }

    /// Forgets one bucket's groups (before loading its rewritten file).
    pub fn clear_bucket(&mut self, bucket: usize) {
        self.buckets[bucket].clear();
    }

    /// Aggregates Silver rows into partial results with the Gold SQL's own
    /// group expressions and WHERE clause (planned by DataFusion).
    pub async fn partials(
        &self,
        silver: &[RecordBatch],
    ) -> datafusion::error::Result<Vec<RecordBatch>> {
        let Some(first) = silver.first() else {
            return Ok(Vec::new());
        };
        let table = Arc::new(MemTable::try_new(first.schema(), vec![silver.to_vec()])?);
        let source = provider_as_source(table);
        let input = self
            .plan
            .input
            .clone()
            .transform_up(|p| {
                Ok(match p {
                    LogicalPlan::TableScan(mut scan) => {
                        scan.source = source.clone();
                        datafusion::common::tree_node::Transformed::yes(LogicalPlan::TableScan(
                            scan,
                        ))
                    }
                    other => datafusion::common::tree_node::Transformed::no(other),
                })
            })?
            .data;
        let plan = LogicalPlanBuilder::from(input)
            .aggregate(
                self.plan
                    .keys
                    .iter()
                    .map(|k| k.expr.clone().alias(&k.name))
                    .collect::<Vec<_>>(),
                self.plan.partial_exprs.clone(),
            )?
            .build()?;
        SessionContext::new()
            .execute_logical_plan(plan)
            .await?
            .collect()
            .await
    }

    /// Merges partial results; returns the buckets and keys touched.
    pub fn merge(&mut self, partials: &[RecordBatch]) -> (BTreeSet<usize>, Vec<Vec<u8>>) {
        let mut buckets = BTreeSet::new();
        let mut touched = Vec::new();
        let nk = self.plan.keys.len();
        for b in partials {
            let keys: Vec<ArrayRef> = (0..nk)
                .map(|i| {
                    cast(b.column(i), &self.plan.keys[i].data_type).expect("key keeps its type")
                })
                .collect();
            let rows = self
                .converter
                .convert_columns(&keys)
                .expect("row-encodable");
            for r in 0..b.num_rows() {
                let key = rows.row(r).as_ref().to_vec();
                let bucket = bucket_of(&key);
                let values: Vec<ScalarValue> = (0..self.merge.len())
                    .map(|p| ScalarValue::try_from_array(b.column(nk + p), r).expect("in range"))
                    .collect();
                let merge = &self.merge;
                match self.buckets[bucket].get_mut(&key) {
                    Some(g) => {
                        for (p, v) in values.into_iter().enumerate() {
                            g.partials[p] = combine(merge[p], &g.partials[p], v);
                        }
                    }
                    None => {
                        let keys = (0..nk)
                            .map(|i| ScalarValue::try_from_array(&keys[i], r).expect("in range"))
                            .collect();
                        self.buckets[bucket].insert(
                            key.clone(),
                            Group {
                                keys,
                                partials: values,
                            },
                        );
                    }
                }
                buckets.insert(bucket);
                touched.push(key);
            }
        }
        touched.sort();
        touched.dedup();
        (buckets, touched)
    }

    /// Whether every group of `partials` is in the state, or in `merging`
    /// (partials merged first).
    pub fn holds_groups(&self, partials: &[RecordBatch], merging: &[RecordBatch]) -> bool {
        let incoming: std::collections::HashSet<Vec<u8>> =
            merging.iter().flat_map(|b| self.group_keys(b)).collect();
        partials.iter().all(|b| {
            self.group_keys(b).into_iter().all(|key| {
                incoming.contains(&key) || self.buckets[bucket_of(&key)].contains_key(&key)
            })
        })
    }

    /// The row-encoded group key of each row of a partials batch.
    fn group_keys(&self, b: &RecordBatch) -> Vec<Vec<u8>> {
        let keys: Vec<ArrayRef> = (0..self.plan.keys.len())
            .map(|i| cast(b.column(i), &self.plan.keys[i].data_type).expect("key keeps its type"))
            .collect();
        let rows = self
            .converter
            .convert_columns(&keys)
            .expect("row-encodable");
        (0..b.num_rows())
            .map(|r| rows.row(r).as_ref().to_vec())
            .collect()
    }

    /// Takes rows out again: `partials` are of the rows a change-feed commit
    /// replaced or deleted. Counts and sums are subtracted; a group left
    /// with no row is removed, a sum left with no non-NULL value is NULL.
    /// Returns the buckets and keys touched, or why the state cannot take
    /// it (a group that is not there: the caller recomputes instead).
    pub fn retract(
        &mut self,
        partials: &[RecordBatch],
    ) -> Result<(BTreeSet<usize>, Vec<Vec<u8>>), String> {
        let Some(r) = self.plan.retraction.clone() else {
            return Err("this Gold plan keeps no retraction state".into());
        };
        let nk = self.plan.keys.len();
        let mut negated = Vec::with_capacity(partials.len());
        for b in partials {
            let mut cols = b.columns().to_vec();
            for c in cols.iter_mut().skip(nk) {
                *c = arrow::compute::kernels::numeric::neg(c).map_err(|e| e.to_string())?;
            }
            negated.push(RecordBatch::try_new(b.schema(), cols).map_err(|e| e.to_string())?);
        }
        if !self.holds_groups(partials, &[]) {
            return Err("a retracted row's group is not in Gold; recomputing it".into());
        }
        let (buckets, touched) = self.merge(&negated);
        for key in &touched {
            let bucket = bucket_of(key);
            let Some(g) = self.buckets[bucket].get_mut(key) else {
                continue;
            };
            if is_zero(&g.partials[r.rows]) {
                self.buckets[bucket].remove(key);
                continue;
            }
            // A sum (an avg's too) of no value left is NULL, not what
            // subtracting left over.
            let avgs = self
                .plan
                .aggregates
                .iter()
                .filter(|a| a.kind == AggKind::Avg)
                .map(|a| (a.partials[0], a.partials[1]));
            let sums = r.non_null.iter().map(|(_, s, c)| (*s, *c));
            for (sum, count) in sums.chain(avgs) {
                if is_zero(&g.partials[count]) {
                    g.partials[sum] = ScalarValue::try_from(&self.plan.partial_types[sum])
                        .unwrap_or(ScalarValue::Null);
                }
            }
        }
        Ok((buckets, touched))
    }

    /// The Gold rows of one bucket (sorted by key, so files are deterministic).
    pub fn bucket_rows(&self, bucket: usize) -> RecordBatch {
        let mut keys: Vec<&Vec<u8>> = self.buckets[bucket].keys().collect();
        keys.sort();
        self.rows(keys.into_iter().map(|k| &self.buckets[bucket][k]))
    }

    /// The Gold rows of the given keys.
    pub fn rows_of(&self, keys: &[Vec<u8>]) -> RecordBatch {
        self.rows(
            keys.iter()
                .filter_map(|k| self.buckets[bucket_of(k)].get(k)),
        )
    }

    pub fn all_rows(&self) -> RecordBatch {
        let batches: Vec<RecordBatch> = (0..BUCKETS).map(|b| self.bucket_rows(b)).collect();
        arrow::compute::concat_batches(&self.table_schema, &batches).expect("same schema")
    }

    fn rows<'a>(&self, groups: impl Iterator<Item = &'a Group>) -> RecordBatch {
        let groups: Vec<&Group> = groups.collect();
        let mut cols: Vec<ArrayRef> = Vec::new();
        let scalars =
            |f: &dyn Fn(&Group) -> ScalarValue, dt: &arrow::datatypes::DataType| -> ArrayRef {
                if groups.is_empty() {
                    return arrow::array::new_empty_array(dt);
                }
                let a = ScalarValue::iter_to_array(groups.iter().map(|g| f(g))).expect("same type");
                if a.data_type() == dt {
                    a
                } else {
                    cast(&a, dt).expect("castable to the Gold type")
                }
            };
        for (i, out) in self.plan.outputs.iter().enumerate() {
            let dt = self.table_schema.field(i).data_type().clone();
            let col = match *out {
                OutputColumn::Key(k) => scalars(&|g| g.keys[k].clone(), &dt),
                OutputColumn::Aggregate(a) => {
                    let agg = &self.plan.aggregates[a];
                    match agg.kind {
                        AggKind::Avg => {
                            let (s, c) = (agg.partials[0], agg.partials[1]);
                            scalars(&|g| avg(&g.partials[s], &g.partials[c]), &dt)
                        }
                        _ => {
                            let p = agg.partials[0];
                            scalars(&|g| g.partials[p].clone(), &dt)
                        }
                    }
                }
            };
            cols.push(col);
        }
        let mut i = self.plan.outputs.len();
        let mut hidden: Vec<usize> = Vec::new();
        for agg in &self.plan.aggregates {
            if agg.kind == AggKind::Avg {
                hidden.extend([agg.partials[0], agg.partials[1]]);
            }
        }
        if let Some(r) = &self.plan.retraction {
            hidden.push(r.rows);
            hidden.extend(r.non_null.iter().map(|(_, _, c)| *c));
        }
        for p in hidden {
            let dt = self.table_schema.field(i).data_type().clone();
            cols.push(scalars(&|g| g.partials[p].clone(), &dt));
            i += 1;
        }
        RecordBatch::try_new(self.table_schema.clone(), cols).expect("gold schema matches")
    }

    /// Loads groups from rows of the Gold table (start-up, after a restart).
    /// Returns the bucket of each row's group, in order.
    pub fn load_rows(&mut self, b: &RecordBatch) -> Vec<usize> {
        let schema = &self.table_schema;
        let col = |name: &str| {
            b.column(schema.index_of(name).expect("gold column"))
                .clone()
        };
        let keys: Vec<ArrayRef> = self.plan.keys.iter().map(|k| col(&k.name)).collect();
        let rows = self
            .converter
            .convert_columns(&keys)
            .expect("row-encodable");
        let mut partial_cols: Vec<Option<ArrayRef>> = vec![None; self.merge.len()];
        for a in &self.plan.aggregates {
            if a.kind == AggKind::Avg {
                let (s, c) = GoldPlan::avg_state_columns(&a.name);
                partial_cols[a.partials[0]] = Some(col(&s));
                partial_cols[a.partials[1]] = Some(col(&c));
            } else {
                partial_cols[a.partials[0]] = Some(col(&a.name));
            }
        }
        if let Some(r) = &self.plan.retraction {
            partial_cols[r.rows] = Some(col(medallion_spec::ROWS_COLUMN));
            for (a, _, c) in &r.non_null {
                partial_cols[*c] = Some(col(&GoldPlan::non_null_column(
                    &self.plan.aggregates[*a].name,
                )));
            }
        }
        let mut out = Vec::with_capacity(b.num_rows());
        for r in 0..b.num_rows() {
            let key = rows.row(r).as_ref().to_vec();
            let bucket = bucket_of(&key);
            let group = Group {
                keys: keys
                    .iter()
                    .map(|k| ScalarValue::try_from_array(k, r).expect("in range"))
                    .collect(),
                partials: partial_cols
                    .iter()
                    .zip(&self.plan.partial_types)
                    .map(|(c, dt)| {
                        let v = ScalarValue::try_from_array(
                            c.as_ref().expect("every partial is stored"),
                            r,
                        )
                        .expect("in range");
                        v.cast_to(dt).unwrap_or(v)
                    })
                    .collect(),
            };
            self.buckets[bucket].insert(key, group);
            out.push(bucket);
        }
        out
    }
}

fn combine(kind: AggKind, a: &ScalarValue, b: ScalarValue) -> ScalarValue {
    if a.is_null() {
        return b;
    }
    if b.is_null() {
        return a.clone();
    }
    match kind {
        AggKind::Count | AggKind::Sum | AggKind::Avg => a.add(&b).unwrap_or(b),
        AggKind::Min => {
            if b < *a {
                b
            } else {
                a.clone()
            }
        }
        AggKind::Max => {
            if b > *a {
                b
            } else {
                a.clone()
            }
        }
    }
}

fn is_zero(v: &ScalarValue) -> bool {
    matches!(v, ScalarValue::Int64(Some(0)) | ScalarValue::Int64(None))
}

fn avg(sum: &ScalarValue, count: &ScalarValue) -> ScalarValue {
    let n = match count {
        ScalarValue::Int64(Some(n)) if *n > 0 => *n as f64,
        _ => return ScalarValue::Float64(None),
    };
    match sum.cast_to(&arrow::datatypes::DataType::Float64) {
        Ok(ScalarValue::Float64(Some(s))) => ScalarValue::Float64(Some(s / n)),
        _ => ScalarValue::Float64(None),
    }
}
