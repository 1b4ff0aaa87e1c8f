//! A validated product: the spec plus everything the services derive from it
//! (Arrow schemas, compiled derive/expectation expressions, Gold plans).
//! Building one IS validation: a spec that cannot be compiled is refused, with
//! every problem listed.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;
use regex::Regex;

use crate::error::{SpecError, SpecErrors};
use crate::gold::GoldPlan;
use crate::model::{API_VERSION, DataProduct, ExpectationAction, KIND, PiiMode};
use crate::types::{ColumnType, parse_duration, timestamp_utc};

/// Silver columns the platform adds to every row: where it came from.
pub const BRONZE_SEQ_COLUMN: &str = "_bronze_seq";
pub const INGESTED_AT_COLUMN: &str = "_ingested_at";

/// Columns a change-feed (`spec.cdc`) Silver table adds: the winning
/// change's sequence (SCD1), or the span each version was current (SCD2,
/// `__end_at` NULL for the current one).
pub const CDC_SEQUENCE_COLUMN: &str = "__sequence";
pub const CDC_START_COLUMN: &str = "__start_at";
pub const CDC_END_COLUMN: &str = "__end_at";

/// A validated `spec.cdc`.
#[derive(Debug, Clone)]
pub struct CdcPlan {
    pub format: crate::model::CdcFormat,
    pub stored_as: crate::model::CdcStorage,
    /// Envelope field paths (debezium), split on `.`; or the one column (generic).
    pub sequence_paths: Vec<Vec<String>>,
    /// The operation field (generic).
    pub operation: Option<String>,
    /// Type of the sequence columns: Int64 for one integer field, the
    /// column's type for generic, Utf8 for a list of fields.
    pub sequence_type: DataType,
    pub keep_deletes_for: std::time::Duration,
}

/// Deletes are remembered a week unless `spec.cdc.keep_deletes_for` says otherwise.
pub const DEFAULT_KEEP_DELETES_FOR: std::time::Duration =
    std::time::Duration::from_secs(7 * 86_400);

/// When ingest received each row's message (µs since the epoch), if `b` is
/// a Silver batch.
pub fn ingested_at_micros(b: &arrow::array::RecordBatch) -> Option<&[i64]> {
    b.column_by_name(INGESTED_AT_COLUMN)?
        .as_any()
        .downcast_ref::<arrow::array::TimestampMicrosecondArray>()
        .map(|a| a.values().as_ref())
}

static PRODUCT_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new("^[a-z][a-z0-9_]{0,62}$").expect("static regex"));
static COLUMN_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new("^[a-z][a-z0-9_]{0,127}$").expect("static regex"));
static ROLE_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new("^[a-z][a-z0-9_.-]{0,63}$").expect("static regex"));

/// True for names usable as a product, domain or Gold table (they become path
/// segments and SQL identifiers, so nothing that could escape either).
pub fn is_valid_name(name: &str) -> bool {
    PRODUCT_NAME.is_match(name) && !name.contains("__")
}

pub struct CompiledExpectation {
    pub name: String,
    pub rule: String,
    pub action: ExpectationAction,
    pub expr: Arc<dyn PhysicalExpr>,
}

pub struct CompiledDerive {
    pub name: String,
    pub expr: Arc<dyn PhysicalExpr>,
    pub data_type: DataType,
}

/// A product ready to run.
pub struct Contract {
    pub product: DataProduct,
    /// Declared columns with their Arrow types, in spec order.
    pub declared_schema: SchemaRef,
    /// Declared columns + derived columns: what derive/expectation SQL sees.
    pub logical_schema: SchemaRef,
    /// The Silver table: logical schema + provenance columns.
    pub silver_schema: SchemaRef,
    pub derive: Vec<CompiledDerive>,
    pub expectations: Vec<CompiledExpectation>,
    pub gold: Vec<GoldPlan>,
    pub freshness: Option<std::time::Duration>,
    /// `spec.retention.time_travel`, if set.
    pub time_travel: Option<std::time::Duration>,
    /// `spec.retention.bronze`, if set.
    pub bronze_retention: Option<std::time::Duration>,
    /// `spec.dedupe.within`, if set.
    pub dedupe_within: Option<std::time::Duration>,
    /// `spec.cdc`, if the product is a change feed.
    pub cdc: Option<CdcPlan>,
}

impl std::fmt::Debug for Contract {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contract")
            .field("product", &self.product.qualified_name())
            .finish_non_exhaustive()
    }
}

impl Contract {
    pub fn domain(&self) -> &str {
        self.product.domain()
    }

    pub fn name(&self) -> &str {
        self.product.name()
    }

    pub fn key(&self) -> &[String] {
        &self.product.spec.key
    }

    /// Units of work this product is spread over in every stage.
    pub fn partitions(&self) -> u32 {
        self.product.spec.partitions.max(1)
    }

    /// Parses YAML and compiles it.
    pub async fn from_yaml(text: &str) -> Result<Contract, SpecErrors> {
        Contract::compile(parse_yaml(text)?).await
    }

    pub async fn compile(product: DataProduct) -> Result<Contract, SpecErrors> {
        let mut errors = Vec::new();
        check_structure(&product, &mut errors);

        let declared: Vec<Field> = product
            .spec
            .schema
            .iter()
            .map(|c| Field::new(&c.name, c.data_type.arrow_type(), !c.required))
            .collect();
        let declared_schema = Arc::new(Schema::new(declared.clone()));

        let ctx = SessionContext::new();
        let mut logical_fields = declared;
        let mut derive = Vec::new();
        for (i, d) in product.spec.derive.iter().enumerate() {
            let field = format!("spec.derive[{i}].expr");
            let schema = Schema::new(logical_fields.clone());
            match compile_expr(&ctx, &d.expr, &schema) {
                Ok((expr, data_type)) => {
                    logical_fields.push(Field::new(&d.name, data_type.clone(), true));
                    derive.push(CompiledDerive {
                        name: d.name.clone(),
                        expr,
                        data_type,
                    });
                }
                Err(e) => {
                    errors.push(SpecError::new(field, e));
                    // Keep later expressions checkable: a failed derive still names a column.
                    logical_fields.push(Field::new(&d.name, DataType::Null, true));
                }
            }
        }
        let logical_schema = Arc::new(Schema::new(logical_fields.clone()));

        let mut expectations = Vec::new();
        for (i, e) in product.spec.expectations.iter().enumerate() {
            let field = format!("spec.expectations[{i}].rule");
            match compile_expr(&ctx, &e.rule, &logical_schema) {
                Ok((expr, DataType::Boolean)) => expectations.push(CompiledExpectation {
                    name: e.name.clone(),
                    rule: e.rule.clone(),
                    action: e.action,
                    expr,
                }),
                Ok((_, other)) => errors.push(SpecError::new(
                    field,
                    format!(
                        "`{}` is {other}, not a true/false predicate; write a comparison such as `amount > 0`",
                        e.rule
                    ),
                )),
                Err(msg) => errors.push(SpecError::new(field, msg)),
            }
        }

        let mut silver_fields = logical_fields;
        silver_fields.push(Field::new(BRONZE_SEQ_COLUMN, DataType::Int64, false));
        silver_fields.push(Field::new(INGESTED_AT_COLUMN, timestamp_utc(), false));
        let cdc = product
            .spec
            .cdc
            .as_ref()
            .and_then(|c| check_cdc(&product, c, &mut errors));
        if let Some(c) = &cdc {
            match c.stored_as {
                crate::model::CdcStorage::Scd1 => silver_fields.push(Field::new(
                    CDC_SEQUENCE_COLUMN,
                    c.sequence_type.clone(),
                    false,
                )),
                crate::model::CdcStorage::Scd2 => {
                    silver_fields.push(Field::new(
                        CDC_START_COLUMN,
                        c.sequence_type.clone(),
                        false,
                    ));
                    silver_fields.push(Field::new(CDC_END_COLUMN, c.sequence_type.clone(), true));
                }
            }
        }
        let silver_schema = Arc::new(Schema::new(silver_fields));

        let mut gold = Vec::new();
        for (i, g) in product.spec.gold.iter().enumerate() {
            let field = format!("spec.gold[{i}].sql");
            match GoldPlan::analyze(&g.name, &g.sql, silver_schema.clone(), &field).await {
                Ok(mut plan) => {
                    // A change feed updates and deletes Silver rows: Gold
                    // takes their old values out where it can.
                    if cdc.is_some() {
                        plan.enable_retraction();
                    }
                    gold.push(plan)
                }
                Err(msg) => {
                    let (f, m) = msg
                        .split_once(": ")
                        .map(|(f, m)| (f.to_string(), m.to_string()))
                        .unwrap_or((field, msg));
                    errors.push(SpecError::new(f, m));
                }
            }
        }

        check_masks(&product, &silver_schema, &gold, &mut errors);

        let freshness = product
            .spec
            .sla
            .as_ref()
            .and_then(|s| parse_duration(&s.freshness));

        let retention = product.spec.retention.clone().unwrap_or_default();
        let time_travel = retention.time_travel.as_deref().and_then(parse_duration);
        let bronze_retention = retention.bronze.as_deref().and_then(parse_duration);
        let dedupe_within = product
            .spec
            .dedupe
            .as_ref()
            .and_then(|d| parse_duration(&d.within));

        if !errors.is_empty() {
            return Err(SpecErrors(errors));
        }
        Ok(Contract {
            product,
            declared_schema,
            logical_schema,
            silver_schema,
            derive,
            expectations,
            gold,
            freshness,
            time_travel,
            bronze_retention,
            dedupe_within,
            cdc,
        })
    }
}

/// Validates `spec.cdc` against the rest of the spec.
fn check_cdc(
    p: &DataProduct,
    c: &crate::model::Cdc,
    errors: &mut Vec<SpecError>,
) -> Option<CdcPlan> {
    use crate::model::CdcFormat;
    let before = errors.len();
    let mut err = |f: &str, m: String| errors.push(SpecError::new(f, m));
    let s = &p.spec;
    if s.key.is_empty() {
        err(
            "spec.key",
            "a change feed (spec.cdc) needs the key of the source table, e.g. `key: [id]`".into(),
        );
    }
    if s.partitions > 1 {
        err(
            "spec.partitions",
            "a change feed (spec.cdc) is applied by one transform in sequence order; set `partitions: 1`".into(),
        );
    }
    if s.dedupe.is_some() {
        err(
            "spec.dedupe",
            "a change feed keeps one row per key by sequence (spec.cdc.sequence_by); remove spec.dedupe".into(),
        );
    }
    if s.source.format == crate::model::SourceFormat::Csv {
        err(
            "spec.source.format",
            "change events are JSON records; use `format: json` (one per message) or `ndjson` (one per line)".into(),
        );
    }
    let paths = c.sequence_by.paths();
    if paths.is_empty() || paths.iter().any(|p| p.trim().is_empty()) {
        err(
            "spec.cdc.sequence_by",
            "name the field that orders changes, e.g. `source.lsn` (Postgres) or `[source.file, source.pos, source.row]` (MySQL)".into(),
        );
    }
    let mut sequence_type = if paths.len() == 1 {
        DataType::Int64
    } else {
        DataType::Utf8
    };
    match c.format {
        CdcFormat::Debezium => {
            if c.operation.is_some() {
                err(
                    "spec.cdc.operation",
                    "Debezium events carry their operation in `op`; remove spec.cdc.operation (it is for format: generic)".into(),
                );
            }
        }
        CdcFormat::Generic => {
            match c.operation.as_deref() {
                None | Some("") => err(
                    "spec.cdc.operation",
                    "format: generic needs the field holding each change's operation (c/u/d or insert/update/delete), e.g. `operation: op`".into(),
                ),
                Some(_) => {}
            }
            if paths.len() != 1 {
                err(
                    "spec.cdc.sequence_by",
                    "format: generic orders changes by one declared column; name it, e.g. `sequence_by: seq`".into(),
                );
            } else {
                match p.column(paths[0]) {
                    None => err(
                        "spec.cdc.sequence_by",
                        format!(
                            "`{}` is not a declared column; format: generic orders changes by a column of spec.schema",
                            paths[0]
                        ),
                    ),
                    Some(col) => match col.data_type {
                        ColumnType::Int64 => sequence_type = DataType::Int64,
                        ColumnType::Timestamp => sequence_type = timestamp_utc(),
                        ColumnType::String => sequence_type = DataType::Utf8,
                        _ => err(
                            "spec.cdc.sequence_by",
                            format!(
                                "column `{}` is {}; a sequence is an int64, timestamp or string column",
                                paths[0], col.data_type
                            ),
                        ),
                    },
                }
            }
        }
    }
    let keep_deletes_for = match c.keep_deletes_for.as_deref() {
        None => DEFAULT_KEEP_DELETES_FOR,
        Some(d) => match parse_duration(d) {
            Some(d) => d,
            None => {
                err(
                    "spec.cdc.keep_deletes_for",
                    format!("`{d}` is not a duration; write e.g. `7d`, `12h` or `30m`"),
                );
                DEFAULT_KEEP_DELETES_FOR
            }
        },
    };
    if errors.len() > before {
        return None;
    }
    Some(CdcPlan {
        format: c.format,
        stored_as: c.stored_as,
        sequence_paths: paths
            .iter()
            .map(|p| p.split('.').map(|s| s.trim().to_string()).collect())
            .collect(),
        operation: c.operation.clone(),
        sequence_type,
        keep_deletes_for,
    })
}

/// YAML → DataProduct, with serde's path to the offending field in the message.
pub fn parse_yaml(text: &str) -> Result<DataProduct, SpecErrors> {
    serde_yaml::from_str::<DataProduct>(text).map_err(|e| {
        let msg = e.to_string();
        // serde_yaml prefixes the path ("spec.schema[2].type: ...") when it knows it.
        match msg.split_once(": ") {
            Some((path, rest))
                if !path.contains(' ')
                    && (path.starts_with("spec") || path.starts_with("metadata")) =>
            {
                // A type that fails to parse is reported at its column; point at the key.
                if rest.starts_with("unknown type") && path.ends_with(']') {
                    SpecErrors::single(format!("{path}.type"), rest)
                } else {
                    SpecErrors::single(path, rest)
                }
            }
            _ => SpecErrors::single("document", msg),
        }
    })
}

fn compile_expr(
    ctx: &SessionContext,
    sql: &str,
    schema: &Schema,
) -> Result<(Arc<dyn PhysicalExpr>, DataType), String> {
    let df_schema = DFSchema::try_from(schema.clone()).map_err(|e| e.to_string())?;
    let expr = ctx
        .parse_sql_expr(sql, &df_schema)
        .map_err(|e| clean_df_error(&e.to_string()))?;
    let physical = ctx
        .create_physical_expr(expr, &df_schema)
        .map_err(|e| clean_df_error(&e.to_string()))?;
    let data_type = physical
        .data_type(schema)
        .map_err(|e| clean_df_error(&e.to_string()))?;
    Ok((physical, data_type))
}

/// DataFusion errors carry a kind prefix and sometimes a backtrace hint; keep the message.
pub fn clean_df_error(msg: &str) -> String {
    let line = msg.lines().next().unwrap_or(msg);
    line.trim().to_string()
}

fn check_structure(p: &DataProduct, errors: &mut Vec<SpecError>) {
    let mut err = |f: String, m: String| errors.push(SpecError::new(f, m));
    if p.api_version != API_VERSION {
        err(
            "apiVersion".into(),
            format!("`{}` is not supported; use `{API_VERSION}`", p.api_version),
        );
    }
    if p.kind != KIND {
        err(
            "kind".into(),
            format!("`{}` is not supported; use `{KIND}`", p.kind),
        );
    }
    if !is_valid_name(&p.metadata.name) {
        err(
            "metadata.name".into(),
            format!(
                "`{}` is not a valid product name; use lower snake_case matching [a-z][a-z0-9_]* \
                 (at most 63 characters, no `__`)",
                p.metadata.name
            ),
        );
    }
    let s = &p.spec;
    if !is_valid_name(&s.domain) {
        err(
            "spec.domain".into(),
            format!(
                "`{}` is not a valid domain; use lower snake_case matching [a-z][a-z0-9_]*",
                s.domain
            ),
        );
    }
    if s.schema.is_empty() {
        err("spec.schema".into(), "declare at least one column".into());
    }
    let mut names = HashSet::new();
    for (i, c) in s.schema.iter().enumerate() {
        if !COLUMN_NAME.is_match(&c.name) {
            err(
                format!("spec.schema[{i}].name"),
                format!(
                    "`{}` is not a valid column name; use lower snake_case matching [a-z][a-z0-9_]* \
                     (names starting with `_` are reserved for provenance columns)",
                    c.name
                ),
            );
        }
        if !names.insert(c.name.as_str()) {
            err(
                format!("spec.schema[{i}].name"),
                format!("column `{}` is declared twice", c.name),
            );
        }
        if c.pii == Some(PiiMode::Hash) && c.data_type != ColumnType::String {
            err(
                format!("spec.schema[{i}].pii"),
                format!(
                    "`hash` turns `{}` into a string token, so declare it `type: string` (or use `pii: redact`)",
                    c.name
                ),
            );
        }
        if c.standardize.is_some() && !c.data_type.is_string() {
            err(
                format!("spec.schema[{i}].standardize"),
                format!(
                    "`standardize` applies to string columns; `{}` is {}",
                    c.name, c.data_type
                ),
            );
        }
    }
    for (i, d) in s.derive.iter().enumerate() {
        if !COLUMN_NAME.is_match(&d.name) {
            err(
                format!("spec.derive[{i}].name"),
                format!(
                    "`{}` is not a valid column name; use lower snake_case",
                    d.name
                ),
            );
        }
        if !names.insert(d.name.as_str()) {
            err(
                format!("spec.derive[{i}].name"),
                format!("`{}` is already a column; pick another name", d.name),
            );
        }
    }
    let mut seen_key = HashSet::new();
    for (i, k) in s.key.iter().enumerate() {
        if !s.schema.iter().any(|c| &c.name == k) {
            err(
                format!("spec.key[{i}]"),
                format!(
                    "`{k}` is not a column of spec.schema; the key must name declared columns ({})",
                    s.schema
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        if !seen_key.insert(k) {
            err(
                format!("spec.key[{i}]"),
                format!("`{k}` appears twice in the key"),
            );
        }
    }
    let mut exp_names = HashSet::new();
    for (i, e) in s.expectations.iter().enumerate() {
        if !COLUMN_NAME.is_match(&e.name) {
            err(
                format!("spec.expectations[{i}].name"),
                format!(
                    "`{}` is not a valid expectation name; use lower snake_case",
                    e.name
                ),
            );
        }
        if !exp_names.insert(e.name.as_str()) {
            err(
                format!("spec.expectations[{i}].name"),
                format!("expectation `{}` is declared twice", e.name),
            );
        }
    }
    let mut gold_names = HashSet::new();
    for (i, g) in s.gold.iter().enumerate() {
        if !is_valid_name(&g.name) {
            err(
                format!("spec.gold[{i}].name"),
                format!(
                    "`{}` is not a valid table name; use lower snake_case matching [a-z][a-z0-9_]*",
                    g.name
                ),
            );
        }
        if !gold_names.insert(g.name.as_str()) {
            err(
                format!("spec.gold[{i}].name"),
                format!("Gold table `{}` is declared twice", g.name),
            );
        }
    }
    for (i, a) in s.access.iter().enumerate() {
        if !ROLE_NAME.is_match(&a.role) {
            err(
                format!("spec.access[{i}].role"),
                format!("`{}` is not a valid role name", a.role),
            );
        }
        if a.layers.is_empty() {
            err(
                format!("spec.access[{i}].layers"),
                "grant at least one of bronze, silver, gold".into(),
            );
        }
    }
    if !(1..=crate::model::MAX_PARTITIONS).contains(&s.partitions) {
        err(
            "spec.partitions".into(),
            format!(
                "{} is not a partition count; use 1 to {} (1 unless one product needs more than one replica per stage)",
                s.partitions,
                crate::model::MAX_PARTITIONS
            ),
        );
    }
    if let Some(r) = &s.retention {
        check_retention(r, &mut err);
    }
    if let Some(d) = &s.dedupe {
        match parse_duration(&d.within) {
            Some(t) if t >= std::time::Duration::from_secs(1) => {}
            _ => err(
                "spec.dedupe.within".into(),
                format!(
                    "`{}` is not a duration of at least a second; write e.g. `7d` or `12h`",
                    d.within
                ),
            ),
        }
        if s.key.is_empty() {
            err(
                "spec.dedupe.within".into(),
                "de-duplication needs a key: set spec.key, or remove spec.dedupe".into(),
            );
        }
    }
    if let Some(sla) = &s.sla
        && parse_duration(&sla.freshness).is_none()
    {
        err(
            "spec.sla.freshness".into(),
            format!(
                "`{}` is not a duration; write e.g. `60s`, `5m` or `1h`",
                sla.freshness
            ),
        );
    }
}

fn check_retention(r: &crate::model::Retention, err: &mut impl FnMut(String, String)) {
    for (field, value) in [("time_travel", &r.time_travel), ("bronze", &r.bronze)] {
        let Some(v) = value else { continue };
        match parse_duration(v) {
            Some(d) if d >= std::time::Duration::from_secs(1) => {}
            _ => err(
                format!("spec.retention.{field}"),
                format!(
                    "`{v}` is not a duration of at least a second; write e.g. `7d`, `90d` or `12h`"
                ),
            ),
        }
    }
}

fn check_masks(p: &DataProduct, silver: &Schema, gold: &[GoldPlan], errors: &mut Vec<SpecError>) {
    let mut known: BTreeSet<String> = silver.fields().iter().map(|f| f.name().clone()).collect();
    for g in gold {
        known.extend(g.output_schema.fields().iter().map(|f| f.name().clone()));
    }
    for (i, a) in p.spec.access.iter().enumerate() {
        for (j, m) in a.mask.iter().enumerate() {
            if !known.contains(m) {
                errors.push(SpecError::new(
                    format!("spec.access[{i}].mask[{j}]"),
                    format!("`{m}` is not a column of this product's Silver or Gold tables"),
                ));
            }
        }
    }
}
