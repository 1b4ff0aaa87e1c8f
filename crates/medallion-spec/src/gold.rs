//! Gold SQL → an incremental plan.
//!
//! The user's `SELECT <keys>, <aggregates> FROM silver [WHERE ..] GROUP BY ..` is
//! planned by DataFusion, then taken apart: every Silver batch is aggregated
//! into *partial* states with the same group expressions, and partial states are
//! merged per group key into the Gold table. Only decomposable aggregates can be
//! merged this way; everything else is refused here, at registration, with the
//! offending expression named.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::Column;
use datafusion::common::tree_node::TreeNode;
use datafusion::datasource::MemTable;
use datafusion::functions_aggregate::count::count_udaf;
use datafusion::functions_aggregate::sum::sum_udaf;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::prelude::SessionContext;

/// How a Gold column's partial states merge and finalize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggKind {
    /// count(*), count(x): partial counts add up.
    Count,
    /// sum(x): partial sums add up (NULL when every input was NULL).
    Sum,
    Min,
    Max,
    /// avg(x): keeps sum(x) and count(x); the value is their ratio.
    Avg,
}

pub const SUPPORTED_AGGREGATES: &str = "count, sum, min, max, avg";

#[derive(Debug, Clone)]
pub struct GoldKey {
    pub name: String,
    pub expr: Expr,
    pub data_type: DataType,
}

#[derive(Debug, Clone)]
pub struct GoldAggregate {
    pub name: String,
    pub kind: AggKind,
    /// Indices into [`GoldPlan::partial_exprs`]: one, or two for avg (sum, count).
    pub partials: Vec<usize>,
    pub data_type: DataType,
    /// The aggregate as written, for messages and lineage.
    pub display: String,
}

/// A Gold output column, in the user's SELECT order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputColumn {
    Key(usize),
    Aggregate(usize),
}

/// Which Silver columns feed a Gold column.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ColumnLineage {
    pub column: String,
    pub sources: Vec<String>,
    pub transformation: String,
}

#[derive(Debug, Clone)]
pub struct GoldPlan {
    pub name: String,
    pub sql: String,
    pub keys: Vec<GoldKey>,
    pub aggregates: Vec<GoldAggregate>,
    pub outputs: Vec<OutputColumn>,
    /// The user's result schema (names and types exactly as the SQL produces them).
    pub output_schema: SchemaRef,
    /// The rows feeding the aggregate: a scan of `silver`, with the WHERE clause.
    pub input: LogicalPlan,
    /// Partial aggregates per batch, aliased `__p<i>`.
    pub partial_exprs: Vec<Expr>,
    pub partial_types: Vec<DataType>,
    pub lineage: Vec<ColumnLineage>,
    /// Silver columns the WHERE clause reads.
    pub filter_columns: Vec<String>,
    /// The extra partials that let rows be taken out again (a change
    /// feed's Silver updates and deletes rows), once
    /// [`enable_retraction`](Self::enable_retraction) added them.
    pub retraction: Option<Retraction>,
    /// `count(x)` of each sum's argument, by aggregate index, ready for
    /// [`enable_retraction`](Self::enable_retraction).
    sum_counts: Vec<(usize, Expr)>,
}

/// Where the hidden partials of a retractable plan are: the group's row
/// count (a group whose rows are all taken out is gone) and, per sum, how
/// many of its values were not NULL (a sum of none is NULL, not 0).
#[derive(Debug, Clone)]
pub struct Retraction {
    pub rows: usize,
    /// `(aggregate index, its sum partial, the count partial)`.
    pub non_null: Vec<(usize, usize, usize)>,
}

/// The hidden Gold column holding a group's row count (retractable plans).
pub const ROWS_COLUMN: &str = "__rows";

/// Column names Delta Lake accepts without column mapping.
pub fn is_delta_safe_name(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(|c| " ,;{}()\n\t=".contains(c))
}

impl GoldPlan {
    /// Plans `sql` against the Silver schema; `field` locates it in the spec for messages.
    pub async fn analyze(
        name: &str,
        sql: &str,
        silver: SchemaRef,
        field: &str,
    ) -> Result<GoldPlan, String> {
        let ctx = SessionContext::new();
        let empty = MemTable::try_new(silver, vec![vec![]]).map_err(|e| e.to_string())?;
        ctx.register_table("silver", Arc::new(empty))
            .map_err(|e| e.to_string())?;
        let plan = ctx
            .state()
            .create_logical_plan(sql)
            .await
            .map_err(|e| format!("{field}: {}", first_line(&e.to_string())))?;

        let LogicalPlan::Projection(projection) = &plan else {
            return Err(format!(
                "{field}: expected `SELECT <group keys>, <aggregates> FROM silver [WHERE ..] GROUP BY ..`; {}",
                unsupported_shape(&plan)
            ));
        };
        let LogicalPlan::Aggregate(aggregate) = projection.input.as_ref() else {
            return Err(format!(
                "{field}: a Gold table must aggregate with GROUP BY (or a global aggregate such as count(*)); {}",
                unsupported_shape(projection.input.as_ref())
            ));
        };
        check_input(&aggregate.input, field)?;

        let n_groups = aggregate.group_expr.len();
        let agg_schema = aggregate.schema.clone();
        let mut partial_exprs = Vec::new();
        let mut aggregates: Vec<GoldAggregate> = Vec::new();
        let mut agg_index_of: Vec<Option<usize>> = vec![None; aggregate.aggr_expr.len()];
        let mut sum_counts = Vec::new();
        let mut keys: Vec<Option<GoldKey>> = vec![None; n_groups];
        let mut outputs = Vec::new();
        let mut fields = Vec::new();
        let mut lineage = Vec::new();

        for (i, expr) in projection.expr.iter().enumerate() {
            let out_field = projection.schema.field(i);
            let out_name = out_field.name().clone();
            if !is_delta_safe_name(&out_name) {
                return Err(format!(
                    "{field}: give `{out_name}` a column name with AS (for example `{} AS total`): \
                     Delta column names cannot contain spaces, commas, parentheses or `=`",
                    out_name
                ));
            }
            let inner = strip_alias(expr);
            let Expr::Column(col) = inner else {
                return Err(format!(
                    "{field}: `{}` computes over group keys or aggregates; a Gold column must be a \
                     GROUP BY expression or a single aggregate ({SUPPORTED_AGGREGATES}) — compute \
                     derived ratios when you query Gold",
                    inner.human_display()
                ));
            };
            let idx = agg_schema
                .index_of_column(col)
                .map_err(|e| format!("{field}: {e}"))?;
            if idx < n_groups {
                let group_expr = aggregate.group_expr[idx].clone();
                lineage.push(ColumnLineage {
                    column: out_name.clone(),
                    sources: source_columns(&group_expr, &aggregate.input),
                    transformation: format!("group key {}", group_expr.human_display()),
                });
                if keys[idx].is_some() {
                    return Err(format!(
                        "{field}: the group key `{}` is selected twice; select it once",
                        group_expr.human_display()
                    ));
                }
                keys[idx] = Some(GoldKey {
                    name: out_name.clone(),
                    expr: group_expr,
                    data_type: out_field.data_type().clone(),
                });
                outputs.push(OutputColumn::Key(idx));
            } else {
                let a = idx - n_groups;
                let agg_expr = strip_alias(&aggregate.aggr_expr[a]).clone();
                let Expr::AggregateFunction(func) = &agg_expr else {
                    return Err(format!(
                        "{field}: `{}` is not an aggregate function",
                        agg_expr.human_display()
                    ));
                };
                let display = agg_expr.human_display().to_string();
                let kind = aggregate_kind(func, &display, field)?;
                let partials = match agg_index_of[a] {
                    Some(existing) => aggregates[existing].partials.clone(),
                    None => {
                        let parts = partial_aggregates(kind, func);
                        let start = partial_exprs.len();
                        for (k, e) in parts.into_iter().enumerate() {
                            partial_exprs.push(e.alias(format!("__p{}", start + k)));
                        }
                        (start..partial_exprs.len()).collect()
                    }
                };
                if kind == AggKind::Sum && agg_index_of[a].is_none() {
                    sum_counts.push((aggregates.len(), count_of(func)));
                }
                agg_index_of[a] = Some(aggregates.len());
                lineage.push(ColumnLineage {
                    column: out_name.clone(),
                    sources: source_columns(&agg_expr, &aggregate.input),
                    transformation: display.clone(),
                });
                aggregates.push(GoldAggregate {
                    name: out_name.clone(),
                    kind,
                    partials,
                    data_type: out_field.data_type().clone(),
                    display,
                });
                outputs.push(OutputColumn::Aggregate(aggregates.len() - 1));
            }
            fields.push(Field::new(out_name, out_field.data_type().clone(), true));
        }

        let keys = keys
            .into_iter()
            .enumerate()
            .map(|(i, k)| {
                k.ok_or_else(|| {
                    format!(
                        "{field}: add the GROUP BY expression `{}` to the SELECT list: Gold merges \
                         new rows into existing ones by their group key",
                        aggregate.group_expr[i].human_display()
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Re-map outputs to the deduplicated key order (keys are indexed by group position).
        let mut names = BTreeSet::new();
        for f in &fields {
            if !names.insert(f.name().clone()) {
                return Err(format!(
                    "{field}: the column name `{}` appears twice; give each column its own name",
                    f.name()
                ));
            }
        }

        let input = aggregate.input.as_ref().clone();
        let partial_plan = datafusion::logical_expr::LogicalPlanBuilder::from(input.clone())
            .aggregate(
                keys.iter().map(|k| k.expr.clone()).collect::<Vec<_>>(),
                partial_exprs.clone(),
            )
            .and_then(|b| b.build())
            .map_err(|e| format!("{field}: {}", first_line(&e.to_string())))?;
        let partial_types = partial_plan
            .schema()
            .fields()
            .iter()
            .skip(keys.len())
            .map(|f| f.data_type().clone())
            .collect();
        let filter_columns = filter_columns(&input);

        Ok(GoldPlan {
            name: name.to_string(),
            sql: sql.to_string(),
            keys,
            aggregates,
            outputs,
            output_schema: Arc::new(Schema::new(fields)),
            input,
            partial_exprs,
            partial_types,
            lineage,
            filter_columns,
            retraction: None,
            sum_counts,
        })
    }

    /// Adds the partials that let rows be retracted (see [`Retraction`]):
    /// possible when every aggregate is a count, sum or avg (a min or max
    /// cannot forget a value; such a plan is recomputed instead). Returns
    /// whether it did.
    pub fn enable_retraction(&mut self) -> bool {
        if self.retraction.is_some() {
            return true;
        }
        if self
            .aggregates
            .iter()
            .any(|a| matches!(a.kind, AggKind::Min | AggKind::Max))
        {
            return false;
        }
        let push = |e: Expr, exprs: &mut Vec<Expr>, types: &mut Vec<DataType>| {
            let i = exprs.len();
            exprs.push(e.alias(format!("__p{i}")));
            types.push(DataType::Int64);
            i
        };
        let rows = push(
            datafusion::functions_aggregate::count::count_all(),
            &mut self.partial_exprs,
            &mut self.partial_types,
        );
        let mut non_null = Vec::new();
        for (a, e) in self.sum_counts.clone() {
            let c = push(e, &mut self.partial_exprs, &mut self.partial_types);
            non_null.push((a, self.aggregates[a].partials[0], c));
        }
        self.retraction = Some(Retraction { rows, non_null });
        true
    }

    /// The hidden column of a sum's non-NULL count (retractable plans).
    pub fn non_null_column(name: &str) -> String {
        format!("__{name}_nonnull")
    }

    pub fn key_names(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.name.clone()).collect()
    }

    /// Names of the hidden state columns an avg keeps next to its value.
    pub fn avg_state_columns(name: &str) -> (String, String) {
        (format!("__{name}_sum"), format!("__{name}_count"))
    }

    /// The Gold table's full schema: the user's columns, then the state columns
    /// an avg needs to merge later batches.
    pub fn table_schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> = self
            .output_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        for a in &self.aggregates {
            if a.kind == AggKind::Avg {
                let (s, c) = Self::avg_state_columns(&a.name);
                fields.push(Field::new(
                    s,
                    self.partial_types[a.partials[0]].clone(),
                    true,
                ));
                fields.push(Field::new(c, DataType::Int64, true));
            }
        }
        if let Some(r) = &self.retraction {
            fields.push(Field::new(ROWS_COLUMN, DataType::Int64, true));
            for (a, _, _) in &r.non_null {
                fields.push(Field::new(
                    Self::non_null_column(&self.aggregates[*a].name),
                    DataType::Int64,
                    true,
                ));
            }
        }
        Arc::new(Schema::new(fields))
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

fn strip_alias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip_alias(&a.expr),
        other => other,
    }
}

fn unsupported_shape(plan: &LogicalPlan) -> String {
    match plan {
        LogicalPlan::Sort(_) => {
            "ORDER BY is not supported (Gold tables are unordered; sort when you query)".into()
        }
        LogicalPlan::Limit(_) => {
            "LIMIT is not supported (a limit cannot be maintained incrementally)".into()
        }
        LogicalPlan::Filter(_) => "HAVING is not supported (filter when you query Gold)".into(),
        LogicalPlan::Distinct(_) => "SELECT DISTINCT is not supported; use GROUP BY".into(),
        LogicalPlan::Window(_) => "window functions are not supported".into(),
        LogicalPlan::Union(_) => "UNION is not supported".into(),
        LogicalPlan::Join(_) => "joins are not supported".into(),
        other => format!("found `{}`", first_line(&other.display().to_string())),
    }
}

/// Rows may be filtered and projected before aggregating, but must come from one
/// scan of `silver`: a join or nested aggregate would break per-batch merging.
fn check_input(plan: &LogicalPlan, field: &str) -> Result<(), String> {
    match plan {
        LogicalPlan::TableScan(scan) => {
            if scan.table_name.table() != "silver" {
                return Err(format!(
                    "{field}: read from `silver` (the product's Silver table), not `{}`",
                    scan.table_name
                ));
            }
            Ok(())
        }
        LogicalPlan::Filter(_) | LogicalPlan::Projection(_) | LogicalPlan::SubqueryAlias(_) => {
            for input in plan.inputs() {
                check_input(input, field)?;
            }
            if let LogicalPlan::Filter(f) = plan
                && f.predicate
                    .exists(|e| {
                        Ok(matches!(
                            e,
                            Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_)
                        ))
                    })
                    .unwrap_or(false)
            {
                return Err(format!("{field}: subqueries in WHERE are not supported"));
            }
            Ok(())
        }
        other => Err(format!("{field}: {}", unsupported_shape(other))),
    }
}

fn aggregate_kind(func: &AggregateFunction, display: &str, field: &str) -> Result<AggKind, String> {
    let name = func.func.name().to_ascii_lowercase();
    if func.params.distinct {
        return Err(format!(
            "{field}: `{display}` (DISTINCT) cannot be maintained incrementally without keeping \
             every value; supported: {SUPPORTED_AGGREGATES}"
        ));
    }
    let kind = match name.as_str() {
        "count" => AggKind::Count,
        "sum" => AggKind::Sum,
        "min" => AggKind::Min,
        "max" => AggKind::Max,
        "avg" | "mean" => AggKind::Avg,
        _ => {
            return Err(format!(
                "{field}: `{display}` is not an incremental aggregate; supported: {SUPPORTED_AGGREGATES} \
                 (a median, percentile or distinct count needs every value, not a mergeable state)"
            ));
        }
    };
    Ok(kind)
}

/// `count(x)` over the same argument and filter as `func`.
fn count_of(func: &AggregateFunction) -> Expr {
    Expr::AggregateFunction(AggregateFunction::new_udf(
        count_udaf(),
        func.params.args.clone(),
        false,
        func.params.filter.clone(),
        vec![],
        None,
    ))
}

fn partial_aggregates(kind: AggKind, func: &AggregateFunction) -> Vec<Expr> {
    let same = Expr::AggregateFunction(func.clone());
    let with = |udaf| {
        Expr::AggregateFunction(AggregateFunction::new_udf(
            udaf,
            func.params.args.clone(),
            false,
            func.params.filter.clone(),
            vec![],
            None,
        ))
    };
    match kind {
        AggKind::Avg => vec![with(sum_udaf()), with(count_udaf())],
        _ => vec![same],
    }
}

/// Silver columns an expression reads, looking through projections of subqueries.
fn source_columns(expr: &Expr, input: &LogicalPlan) -> Vec<String> {
    let mut out = BTreeSet::new();
    for col in expr.column_refs() {
        resolve_column(col, input, &mut out);
    }
    out.into_iter().collect()
}

fn resolve_column(col: &Column, plan: &LogicalPlan, out: &mut BTreeSet<String>) {
    match plan {
        LogicalPlan::TableScan(_) => {
            out.insert(col.name.clone());
        }
        LogicalPlan::Projection(p) => {
            let found = p
                .schema
                .index_of_column(col)
                .ok()
                .or_else(|| p.schema.index_of_column_by_name(None, &col.name));
            match found {
                Some(i) => {
                    for inner in p.expr[i].column_refs() {
                        resolve_column(inner, &p.input, out);
                    }
                }
                None => {
                    out.insert(col.name.clone());
                }
            }
        }
        other => {
            for input in other.inputs() {
                resolve_column(col, input, out);
            }
        }
    }
}

fn filter_columns(plan: &LogicalPlan) -> Vec<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![plan];
    while let Some(p) = stack.pop() {
        if let LogicalPlan::Filter(f) = p {
            for c in f.predicate.column_refs() {
                resolve_column(c, &f.input, &mut out);
            }
        }
        stack.extend(p.inputs());
    }
    out.into_iter().collect()
}
